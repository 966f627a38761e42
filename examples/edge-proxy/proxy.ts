/**
 * The edge proxy's moving parts: a client's tun read by the native on-ramp; every TCP flow upgraded by
 * Bumblebee into an accepted socket and spliced by Splicer with a fresh connection to the flow's
 * destination; everything else (UDP, ICMP) sent through one Fish registration; one audit line per
 * Splicer envelope.
 *
 * It is also a {@link HandoffParticipant}: on a restart the tun, the sink socket, Fish's end of it and the
 * on-ramp's end of every flow's packet socket go to the successor through lib/handoff, with the flows'
 * tracking state. What is not handed over needs no handing: relays live in Splicer (their envelopes go to
 * whichever process holds the owner id), accepted sockets' other ends live in Bumblebee, and Fish keeps
 * forwarding the same socket while the successor registers it again under the same id.
 */
import fs from 'node:fs';
import net from 'node:net';
import type { Logger } from 'pino';
import { BumblebeeClient } from '../../lib/client/bumblebee.js';
import { FishClient, type RegisterOptions } from '../../lib/client/fish.js';
import { SplicerClient, type Envelope, type ReturnedRelay } from '../../lib/client/splicer.js';
import type { ExportSummary, HandoffParticipant } from '../../lib/handoff/participant.js';
import type { NativeBinding, OnRamp, OnRampFlow, PausedOnRamp, PausedOnRampFlow } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { fdKindMismatch } from '../../lib/protocol/fd-kinds.js';

/** Everything the proxy is told on its command line. */
export interface EdgeProxyOptions {
  /** Path of the client's network namespace (`/run/netns/<name>`). */
  clientNetns: string;
  /** The client's tun inside it. */
  tunName: string;
  splicer: string;
  bumblebee: string;
  fish: string;
  /** Owner id at all three daemons; the successor uses the same one, so it collects the envelopes. */
  owner: string;
  /** Bumblebee tenant of the client's flows. */
  tenant: string;
  registration: RegisterOptions;
  /** Also append audit lines to this file (they always go to the log). */
  auditLog: string | null;
  closeDelayMs: number;
  idleTimeoutMs: number;
  connectTimeoutMs: number;
  /** How long a SIGTERM waits for the client's flows to end before closing everything. */
  drainMs: number;
}

/** One line of the audit log: a finished TCP flow, as its Splicer envelope describes it. */
export interface AuditLine {
  event: 'tcp';
  taskId: string;
  flowId: number;
  client: string;
  destination: string;
  /** Bytes from the client to the destination, and back. */
  bytesUp: number;
  bytesDown: number;
  durationMs: number;
  reason: string;
  code: string | null;
  /** Smoothed RTT (ms) of the client's socket and of the upstream one, from TCP_INFO when the relay ended. */
  rttMs: { client: number | null; upstream: number | null };
  /** Segments retransmitted over each socket's lifetime (TCP_INFO totalRetrans). */
  retransmits: { client: number | null; upstream: number | null };
  /** The pid that started the relay, and the pid that wrote this line (they differ across a restart). */
  startedBy: number;
  loggedBy: number;
}

/** What the on-ramp side of a hand-over carries (fds are indices into the hand-over's fd list). */
interface ExportedProxyState {
  tun: number;
  sink: number;
  fish: number;
  registration: RegisterOptions;
  flows: PausedOnRampFlow[];
  nextFlowId: number;
}

const hostPort = (address: string, port: number) => (address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`);

/** The edge proxy of one client. */
export class EdgeProxy implements HandoffParticipant {
  readonly #binding: NativeBinding;
  readonly #log: Logger;
  readonly #options: EdgeProxyOptions;
  /** Splicer, with raw fds: the accepted socket comes from Bumblebee as an fd and goes on as one. */
  readonly splicer: SplicerClient<'fd'>;
  /** Bumblebee, with raw fds (see `splicer`). */
  readonly bumblebee: BumblebeeClient<'fd'>;
  /** Fish: one registration, the client's sink socket. */
  readonly fish: FishClient;
  #onramp: OnRamp | null = null;
  /** The client's tun, our end of the sink pair, and our copy of Fish's end (to register it again after a restart). */
  #tunFd = -1;
  #sinkFd = -1;
  #fishFd = -1;
  #paused: PausedOnRamp | null = null;
  #imported: { state: ExportedProxyState; fds: readonly number[] } | null = null;
  /** Flows between the on-ramp and Splicer (upgrading, connecting upstream, being handed to Splicer). */
  readonly #setups = new Set<Promise<void>>();
  #stopping = false;
  #handedOver = false;
  /** Figures for the log and the demo. */
  readonly counters = { flows: 0, spliced: 0, refused: 0, audited: 0 };

  constructor(binding: NativeBinding, log: Logger, options: EdgeProxyOptions) {
    this.#binding = binding;
    this.#log = log;
    this.#options = options;
    this.splicer = new SplicerClient({ owner: options.owner, path: options.splicer, sockets: 'fd', binding });
    this.bumblebee = new BumblebeeClient({ owner: options.owner, path: options.bumblebee, sockets: 'fd', binding });
    this.fish = new FishClient({ owner: options.owner, path: options.fish, binding });
    // Envelopes with no splice() waiting here: relays started by a predecessor, or before a daemon restart.
    this.splicer.on('envelope', (relay) => this.#finished(relay));
    for (const [name, client] of [
      ['splicer', this.splicer],
      ['bumblebee', this.bumblebee],
      ['fish', this.fish],
    ] as const) {
      client.on('error', (error: Error) => this.#log.warn({ err: error, daemon: name }, `${name} client error`));
      client.on('disconnect', (error: Error | null) => this.#log.info({ daemon: name, reason: error?.message }, `${name}: disconnected, reconnecting`));
    }
    this.fish.on('reregistered', (result) => this.#log.info({ result }, 'fish: registered again after a reconnect'));
  }

  /** Connects to the three daemons (before a take-over too: it costs the predecessor nothing). */
  async connect(): Promise<void> {
    await Promise.all([this.splicer.connect(), this.bumblebee.connect(), this.fish.connect()]);
  }

  /** A fresh start: opens the client's tun, registers with Fish, starts the on-ramp. */
  async start(): Promise<void> {
    const { clientNetns, tunName, registration } = this.#options;
    this.#tunFd = this.#binding.openTunInNamespace(clientNetns, tunName);
    [this.#sinkFd, this.#fishFd] = this.#binding.seqpacketPair();
    // Registered before the on-ramp reads anything, so the client's first datagram already has somewhere to go.
    const result = await this.fish.register(this.#binding.dup(this.#fishFd), registration);
    this.#log.info({ result }, 'fish: registered');
    this.#startOnRamp([], 1);
    this.#log.info({ clientNetns, tunName }, 'edge proxy: reading the client tun');
  }

  /** On-ramp figures, for the log. */
  stats(): Record<string, unknown> {
    return { ...this.counters, onramp: this.#onramp && !this.#paused ? this.#onramp.stats() : null, setups: this.#setups.size };
  }

  // ---- HandoffParticipant -------------------------------------------------------------------------------

  /** Pauses the on-ramp (one tun reader at a time: from here nobody reads it until the successor does). */
  pauseAndExport(fds: number[]): { state: Record<string, unknown>; summary: ExportSummary } {
    if (!this.#onramp) throw new Error('the on-ramp is not running');
    const paused = this.#onramp.pause();
    this.#paused = paused;
    const index = (fd: number) => fds.push(fd) - 1;
    const state: ExportedProxyState = {
      tun: index(this.#tunFd),
      sink: index(this.#sinkFd),
      fish: index(this.#fishFd),
      registration: this.#options.registration,
      flows: paused.flows.map((flow) => ({ ...flow, fd: index(flow.fd) })),
      nextFlowId: paused.nextFlowId,
    };
    // Flows the on-ramp had opened but not yet delivered: their on-ramp ends are in `flows`, their Bumblebee
    // ends are ours, so they are set up here like any other (whoever resumes the on-ramp relays them).
    if (paused.pending.length) this.#onFlows(paused.pending);
    return { state: state as unknown as Record<string, unknown>, summary: { tasks: paused.flows.length, bytesInFlight: 0 } };
  }

  /** Rolled back: the same on-ramp carries on with the same flows. */
  resumeAfterRollback(): void {
    if (!this.#onramp || !this.#paused) return;
    this.#onramp.resume(this.#paused);
    this.#paused = null;
  }

  /** Committed: the successor reads the tun now; close our copies of everything we sent. */
  releaseExported(): void {
    this.#handedOver = true;
    const paused = this.#paused;
    this.#paused = null;
    this.#onramp?.close();
    this.#onramp = null;
    this.#binding.closeAll([this.#tunFd, this.#sinkFd, this.#fishFd, ...(paused?.flows.map((flow) => flow.fd) ?? [])]);
    this.#tunFd = this.#sinkFd = this.#fishFd = -1;
  }

  /** Successor: checks every fd's kind and keeps the state, paused (nothing reads the tun yet). */
  importState(state: Record<string, unknown>, fds: readonly number[]): ExportSummary {
    const exported = state as unknown as ExportedProxyState;
    const check = (index: unknown, kind: 'char' | 'seqpacket-socket', what: string) => {
      const fd = typeof index === 'number' ? fds[index] : undefined;
      if (fd === undefined) throw new ProtocolError('EFDFERRY_STATE', `${what}: fd index ${String(index)} is out of range`);
      const description = this.#binding.describeFd(fd);
      const mismatch = kind === 'char' ? (description.kind === 'char' ? null : `is a ${description.kind}, not a tun`) : fdKindMismatch(kind, description);
      if (mismatch) throw new ProtocolError('EFDFERRY_STATE', `${what} ${mismatch}`);
    };
    check(exported.tun, 'char', 'the tun');
    check(exported.sink, 'seqpacket-socket', 'the sink');
    check(exported.fish, 'seqpacket-socket', "Fish's end of the sink");
    if (!Array.isArray(exported.flows)) throw new ProtocolError('EFDFERRY_STATE', 'the state has no flow list');
    for (const flow of exported.flows) check(flow.fd, 'seqpacket-socket', `flow ${flow.flowId}`);
    this.#imported = { state: exported, fds };
    return { tasks: exported.flows.length, bytesInFlight: 0 };
  }

  /** Successor, committed: the on-ramp resumes every flow on the same tun, and Fish gets the same socket again. */
  resumeImported(): void {
    if (!this.#imported) throw new Error('nothing was imported');
    const { state, fds } = this.#imported;
    this.#imported = null;
    this.#tunFd = fds[state.tun]!;
    this.#sinkFd = fds[state.sink]!;
    this.#fishFd = fds[state.fish]!;
    this.#startOnRamp(
      state.flows.map((flow) => ({ ...flow, fd: fds[flow.fd]! })),
      state.nextFlowId,
    );
    // The same id and the same socket: Fish takes the registration over from our predecessor's connection
    // and keeps every mapping (and so every port) the client's flows had.
    this.fish.register(this.#binding.dup(this.#fishFd), state.registration).then(
      (result) => this.#log.info({ result }, 'fish: registration taken over'),
      (error: unknown) => this.#log.error({ err: error }, 'fish: could not take the registration over'),
    );
    this.#log.info({ flows: state.flows.length }, 'edge proxy: resumed the on-ramp with the flows handed over');
  }

  // ---- stopping -----------------------------------------------------------------------------------------

  /** Resolves once no flow is being set up (or after `ms`): a handed-over process waits for this before it exits. */
  async settle(ms: number): Promise<void> {
    const deadline = Date.now() + ms;
    while (this.#setups.size && Date.now() < deadline) {
      await Promise.race([Promise.allSettled([...this.#setups]), new Promise((resolve) => setTimeout(resolve, 50))]);
    }
  }

  /** After a hand-over: finishes what is in progress, then closes the clients (the successor holds the owner id). */
  async finishAfterHandOver(): Promise<void> {
    await this.settle(10_000);
    // The Fish registration is the successor's: closing our connection does not end it (it took it over).
    this.fish.close();
    this.bumblebee.close();
    this.splicer.close();
  }

  /** A clean stop: no new flows; waits for the client's flows to end (at most drainMs), then undoes everything. */
  async stop(): Promise<void> {
    this.#stopping = true;
    const deadline = Date.now() + this.#options.drainMs;
    while (Date.now() < deadline && (this.#setups.size > 0 || (this.#onramp && !this.#paused && this.#onramp.stats().flows > 0))) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    // Envelopes of relays that just ended are on their way; a moment lets them be audited here.
    await new Promise((resolve) => setTimeout(resolve, 200));
    this.#onramp?.close();
    this.#onramp = null;
    try {
      // Unregistering (rather than letting the grace period run out) flushes the client's conntrack entries now.
      await this.fish.unregister(this.#options.registration.id);
    } catch (error) {
      this.#log.warn({ err: error }, 'fish: unregister failed');
    }
    this.fish.close();
    this.bumblebee.close();
    this.splicer.close();
    this.#binding.closeAll([this.#tunFd, this.#sinkFd, this.#fishFd].filter((fd) => fd >= 0));
    this.#tunFd = this.#sinkFd = this.#fishFd = -1;
  }

  // ---- flows --------------------------------------------------------------------------------------------

  #startOnRamp(flows: PausedOnRampFlow[], nextFlowId: number): void {
    const { closeDelayMs, idleTimeoutMs } = this.#options;
    this.#onramp = this.#binding.createOnRamp(this.#tunFd, { closeDelayMs, idleTimeoutMs, sinkFd: this.#sinkFd, flows, nextFlowId }, (batch) => this.#onFlows(batch));
  }

  #onFlows(flows: OnRampFlow[]): void {
    for (const flow of flows) {
      if (this.#stopping || this.#handedOver) {
        // Closing the Bumblebee end closes the flow: the client's connect fails fast instead of hanging.
        this.#binding.closeAll([flow.fd]);
        continue;
      }
      this.counters.flows++;
      const setup = this.#setUp(flow).finally(() => this.#setups.delete(setup));
      this.#setups.add(setup);
    }
  }

  async #setUp(flow: OnRampFlow): Promise<void> {
    const { tuple } = flow;
    const client = hostPort(tuple.clientAddress, tuple.clientPort);
    const destination = hostPort(tuple.destinationAddress, tuple.destinationPort);
    let accepted: number | null = null;
    let upstream: net.Socket | null = null;
    try {
      const upgraded = await this.bumblebee.upgrade(flow.fd, { tenant: this.#options.tenant, context: { flowId: flow.flowId } });
      accepted = upgraded.socket;
      upstream = await this.#connect(tuple.destinationAddress, tuple.destinationPort);
      const meta = { client, destination, flowId: flow.flowId, startedBy: process.pid };
      const started = await this.splicer.start(accepted, upstream, meta);
      accepted = null;
      upstream = null;
      this.counters.spliced++;
      this.#log.debug({ flowId: flow.flowId, client, destination, taskId: started.taskId }, 'flow spliced');
      void started.done.then((relay) => this.#finished(relay));
    } catch (error) {
      this.counters.refused++;
      if (error instanceof ProtocolError) this.#binding.closeAll(error.fds);
      if (accepted !== null) this.#binding.closeAll([accepted]);
      upstream?.destroy();
      this.#log.warn({ flowId: flow.flowId, client, destination, err: error }, 'flow refused');
    }
  }

  #connect(address: string, port: number): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host: address, port });
      const timer = setTimeout(() => socket.destroy(new Error(`connecting to ${hostPort(address, port)} timed out`)), this.#options.connectTimeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(socket);
      });
      socket.once('error', (error) => {
        clearTimeout(timer);
        reject(error);
      });
    });
  }

  /** One envelope, one audit line; the returned sockets are closed (both ends are done). */
  #finished(relay: ReturnedRelay<number>): void {
    this.#binding.closeAll([relay.a, relay.b]);
    const line = auditLine(relay.envelope);
    this.counters.audited++;
    this.#log.info({ audit: line }, 'audit');
    if (this.#options.auditLog) fs.appendFileSync(this.#options.auditLog, `${JSON.stringify(line)}\n`);
  }
}

/** Turns a Splicer envelope into an audit line (A is the client's socket, B the upstream one). */
export function auditLine(envelope: Envelope): AuditLine {
  const meta = envelope.meta;
  const rtt = (info: { rtt: number } | null) => (info ? info.rtt / 1000 : null);
  const retransmits = (info: { totalRetrans: number } | null) => (info ? info.totalRetrans : null);
  return {
    event: 'tcp',
    taskId: envelope.taskId,
    flowId: Number(meta.flowId),
    client: String(meta.client),
    destination: String(meta.destination),
    bytesUp: envelope.bytesAToB,
    bytesDown: envelope.bytesBToA,
    durationMs: envelope.durationMs,
    reason: envelope.reason,
    code: envelope.code,
    rttMs: { client: rtt(envelope.tcpInfo.a), upstream: rtt(envelope.tcpInfo.b) },
    retransmits: { client: retransmits(envelope.tcpInfo.a), upstream: retransmits(envelope.tcpInfo.b) },
    startedBy: Number(meta.startedBy),
    loggedBy: process.pid,
  };
}

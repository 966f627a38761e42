/**
 * The streaming relays of the hand-over benchmark: set-up, traffic, pause figures, and the end-to-end
 * check that not a byte was lost.
 *
 * Each relay is two AF_UNIX stream socket pairs from `binding.streamPair()`: one end of each goes to
 * Splicer (`SplicerClient.start`; this process closes its copies once the daemon has accepted them), the
 * other end (the "near" end) stays in this process. So a relay costs 2 fds here and 2 in the daemon, plus
 * a pipe (2 fds) per direction while it has bytes in flight.
 *
 * - Probe relays (the first `probes`) run in a worker thread (bench/lib/handoff-probe-worker.ts) with
 *   their own event loop: a chunk each way every tick, every arrival timestamped.
 * - Background relays run on the main thread: a chunk each way every `backgroundIntervalMs`.
 *
 * Both sides hash everything (bench/lib/handoff-flows.ts); `finish()` half-closes every sender, waits for
 * every receiver's end and every relay's envelope, and compares.
 */
import { Worker } from 'node:worker_threads';
import type { ReturnedRelay, SplicerClient } from '../../lib/client/splicer.js';
import type { NativeBinding } from '../../lib/native.js';
import { TrafficGroup, nearSocket, type GapFigures, type PaceSettings, type RelayFlows } from './handoff-flows.js';
import type { ProbeRequest } from './handoff-probe-worker.js';
import type { Stall } from './handoff-stalls.js';

/** How the fleet's traffic is paced. */
export interface TrafficSettings {
  /** The pacing timers' period (ms), on both threads. */
  tickMs: number;
  /** Bytes per write of a probe relay (each way, every tick). */
  probeChunk: number;
  /** Bytes per write of a background relay. */
  backgroundChunk: number;
  /** A background relay writes once each way every this many ms. */
  backgroundIntervalMs: number;
  /** A sender skips its turn while Node holds more than this many of its bytes unwritten (backpressure). */
  maxBuffered: number;
}

/** What `finish()` found. */
export interface FleetCheck {
  relays: number;
  /** Relays whose bytes arrived intact both ways (sha256 and count), with a `complete` envelope that counts them. */
  intact: number;
  /** Bytes sent minus bytes received, over every direction (0 when nothing was lost). */
  bytesLost: number;
  bytesSent: number;
  probeBytes: number;
  backgroundBytes: number;
  /** Turns skipped because a sender's buffer was full. */
  skippedTurns: number;
  /** Socket errors and mismatches, at most 20 described. */
  problems: string[];
}

/** The probe worker, asked by request and answer. */
class ProbeWorker {
  readonly #worker: Worker;
  readonly #pending = new Map<number, { resolve: (value: unknown) => void; reject: (error: Error) => void }>();
  #nextId = 1;
  #failure: Error | null = null;

  constructor(settings: PaceSettings) {
    // Under `node --import tsx` a worker given a .ts file does not get tsx's loader (Node 20): the worker
    // loads it through tsx's API instead.
    const body = new URL('./handoff-probe-worker.ts', import.meta.url).href;
    const code = `import(${JSON.stringify(import.meta.resolve('tsx/esm/api'))}).then(({ tsImport }) => tsImport(${JSON.stringify(body)}, ${JSON.stringify(import.meta.url)}))`;
    this.#worker = new Worker(code, { eval: true, workerData: settings });
    this.#worker.on('message', (message: { id: number; ok: boolean; result?: unknown; error?: string }) => {
      const pending = this.#pending.get(message.id);
      if (!pending) return;
      this.#pending.delete(message.id);
      if (message.ok) pending.resolve(message.result);
      else pending.reject(new Error(`probe worker: ${message.error}`));
    });
    const fail = (error: Error) => {
      this.#failure = error;
      for (const pending of this.#pending.values()) pending.reject(error);
      this.#pending.clear();
    };
    this.#worker.on('error', (error) => fail(new Error(`probe worker failed: ${error.stack ?? error.message}`)));
    this.#worker.on('exit', (code) => fail(new Error(`probe worker exited (${code})`)));
  }

  ask<T>(request: ProbeRequest): Promise<T> {
    if (this.#failure) return Promise.reject(this.#failure);
    const id = this.#nextId++;
    return new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (value: unknown) => void, reject });
      this.#worker.postMessage({ id, ...request });
    });
  }

  async terminate(): Promise<void> {
    await this.#worker.terminate();
  }
}

/** Streaming relays through one Splicer daemon. */
export class RelayFleet {
  readonly #binding: NativeBinding;
  readonly #client: SplicerClient<'fd'>;
  readonly #background: TrafficGroup;
  readonly #probes: ProbeWorker;
  readonly #done = new Map<number, Promise<ReturnedRelay<number>>>();
  readonly #problems: string[] = [];
  #probeCount = 0;

  constructor(binding: NativeBinding, client: SplicerClient<'fd'>, settings: TrafficSettings) {
    this.#binding = binding;
    this.#client = client;
    const { tickMs, maxBuffered } = settings;
    this.#background = new TrafficGroup({ tickMs, maxBuffered, chunk: settings.backgroundChunk, intervalMs: settings.backgroundIntervalMs, timestamps: false });
    this.#probes = new ProbeWorker({ tickMs, maxBuffered, chunk: settings.probeChunk, intervalMs: tickMs, timestamps: true });
  }

  get size(): number {
    return this.#done.size;
  }

  #problem(text: string): void {
    if (this.#problems.length < 20) this.#problems.push(text);
  }

  /**
   * Sets up `count` relays, `concurrency` hand-overs at a time; the first `probes` go to the probe
   * worker. Traffic does not start until `start()`.
   */
  async add(count: number, probes: number, concurrency = 48): Promise<void> {
    const toWorker: Array<{ index: number; fdA: number; fdB: number }> = [];
    let next = 0;
    const loop = async () => {
      while (next < count) {
        const index = next++;
        const [a, nearA] = this.#binding.streamPair();
        const [b, nearB] = this.#binding.streamPair();
        let started;
        try {
          started = await this.#client.start(a, b, { i: index });
        } catch (error) {
          this.#binding.closeAll([...((error as { fds?: number[] }).fds ?? []), nearA, nearB]);
          throw error;
        }
        this.#done.set(index, started.done);
        if (index < probes) toWorker.push({ index, fdA: nearA, fdB: nearB });
        else this.#background.add(index, nearSocket(nearA), nearSocket(nearB));
      }
    };
    try {
      await Promise.all(Array.from({ length: concurrency }, loop));
    } finally {
      // Whatever was set up goes to the worker, which owns (and closes) those fds from here.
      toWorker.sort((x, y) => x.index - y.index);
      if (toWorker.length) await this.#probes.ask({ op: 'add', relays: toWorker });
      this.#probeCount += toWorker.length;
    }
  }

  /** Starts the traffic on both threads. */
  async start(): Promise<void> {
    await this.#probes.ask({ op: 'start' });
    this.#background.start();
  }

  /** Starts (or stops) recording probe arrivals, the probe thread's loop delay and its stalls. */
  async record(on: boolean): Promise<void> {
    await this.#probes.ask({ op: 'record', on });
  }

  /** The probe thread's event-loop delay since the last call (or since recording started), ms; starts over. */
  probeLoopDelay(): Promise<{ p99: number; max: number }> {
    return this.#probes.ask({ op: 'delay' });
  }

  /** The probe thread's longest loop stall overlapping [from, to] (shared clock). */
  probeStall(from: number, to: number): Promise<Stall | null> {
    return this.#probes.ask({ op: 'stall', from, to });
  }

  /** Per probe relay, the longest gap overlapping [from, to] and when it ended relative to `endRef`. */
  gaps(from: number, to: number, endRef: number): Promise<GapFigures> {
    return this.#probes.ask({ op: 'gaps', from, to, endRef });
  }

  /** Bytes received so far over every direction of every relay. */
  async receivedBytes(): Promise<number> {
    return this.#background.receivedBytes() + (await this.#probes.ask<number>({ op: 'received' }));
  }

  /**
   * Stops the traffic, half-closes every sender, waits (up to `ms`) for every receiver's end and every
   * envelope, compares what was sent with what arrived, and closes everything.
   */
  async finish(ms = 60_000): Promise<FleetCheck> {
    const [probeSide, backgroundFlows] = await Promise.all([
      this.#probes.ask<{ flows: RelayFlows[]; problems: string[] }>({ op: 'finish', ms }),
      this.#background.finish(ms),
    ]);
    for (const problem of [...probeSide.problems, ...this.#background.problems]) this.#problem(problem);
    await this.#probes.terminate();
    const flows = [...probeSide.flows, ...backgroundFlows];
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), ms)));
    const envelopes = new Map<number, ReturnedRelay<number>>();
    const all = Promise.all(
      [...this.#done].map(async ([index, done]) => {
        const relay = await done;
        this.#binding.closeAll([relay.a, relay.b]);
        envelopes.set(index, relay);
      }),
    );
    if ((await Promise.race([all, timeout])) === 'timeout') this.#problem(`${this.#done.size - envelopes.size} envelopes did not come within ${ms} ms`);
    clearTimeout(timer);

    const check: FleetCheck = {
      relays: this.#done.size,
      intact: 0,
      bytesLost: 0,
      bytesSent: 0,
      probeBytes: 0,
      backgroundBytes: 0,
      skippedTurns: 0,
      problems: this.#problems,
    };
    for (const relay of flows) {
      let intact = true;
      for (const [name, flow] of [['A->B', relay.aToB], ['B->A', relay.bToA]] as const) {
        check.bytesSent += flow.sentBytes;
        check.bytesLost += flow.sentBytes - flow.receivedBytes;
        check.skippedTurns += flow.skipped;
        if (relay.index < this.#probeCount) check.probeBytes += flow.receivedBytes;
        else check.backgroundBytes += flow.receivedBytes;
        if (flow.sentSha256 !== flow.receivedSha256 || flow.sentBytes !== flow.receivedBytes) {
          intact = false;
          this.#problem(
            `relay ${relay.index} ${name}: sent ${flow.sentBytes} B, received ${flow.receivedBytes} B, sha256 ${flow.sentSha256 === flow.receivedSha256 ? 'equal' : 'differs'}`,
          );
        }
      }
      const envelope = envelopes.get(relay.index)?.envelope;
      if (!envelope) {
        intact = false;
      } else {
        if (envelope.reason !== 'complete') {
          intact = false;
          this.#problem(`relay ${relay.index}: envelope reason ${envelope.reason} (${String(envelope.code)})`);
        }
        if (envelope.bytesAToB !== relay.aToB.sentBytes || envelope.bytesBToA !== relay.bToA.sentBytes) {
          intact = false;
          this.#problem(`relay ${relay.index}: the envelope counts ${envelope.bytesAToB}/${envelope.bytesBToA} B, ${relay.aToB.sentBytes}/${relay.bToA.sentBytes} B were sent`);
        }
      }
      if (intact) check.intact++;
    }
    if (flows.length !== this.#done.size) this.#problem(`${flows.length} relays reported traffic, ${this.#done.size} were set up`);
    return check;
  }

  /** Stops everything and closes every near end (after a failure). */
  async close(): Promise<void> {
    this.#background.close();
    await this.#probes.ask({ op: 'close' }).catch(() => undefined);
    await this.#probes.terminate();
    for (const done of this.#done.values()) void done.then((relay) => this.#binding.closeAll([relay.a, relay.b]));
  }
}

/**
 * Fish: takes one SOCK_SEQPACKET socket carrying a client's raw IP packets, plus an egress address and
 * a port range (a slice of a shared address), and forwards the client's flows from that slice, every
 * five-tuple reserved in conntrack before its first packet leaves, replies sent back on the same socket.
 *
 * This file is policy only: registrations, their lifetimes, limits and bookkeeping. Packets and
 * reservations move on the pump's epoll thread; the host's tun, rules and conntrack table are set up by
 * `FishHost` (host.ts). The control connection that registered an id is that registration's lifetime:
 * when it goes, the registration lives on for `registrationGraceMs` (a proxy restarting re-registers the
 * same id and keeps its ports), then its conntrack entries are flushed.
 */
import type { DaemonContext, Service } from '../../lib/daemon.js';
import type { PassedFd } from '../../lib/systemd/activation.js';
import type { MetricSource, Sample } from '../../lib/metrics.js';
import type { ExportSummary } from '../../lib/handoff/participant.js';
import type { ConnectionInfo } from '../../lib/rpc/server.js';
import type { FishEvent, FishMapping, FishMappingRow, FishPump, FishPumpOptions, FishStats } from '../../lib/native.js';
import {
  mappingMatches,
  parseExplainRequest,
  parseRegisterRequest,
  parseRegistrationId,
  type ExhaustedEvent,
  type RegisterRequest,
  type RegisterResult,
} from '../../lib/protocol/fish.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { clientAddress6 } from '../../lib/netlink/conntrack.js';
import { defineMethod, type MethodTable } from '../../lib/rpc/server.js';
import type { FishHost, HostStart } from './host.js';
import { RegistrationTable, type Registration } from './registrations.js';
import type { EgressPolicy } from './egress-policy.js';
import { exportRegistrations, importRegistrations, type FishState } from './handoff.js';
import { conntrackGuardIo } from './conntrack-control.js';
import { GUARD_FINDING_KINDS, SliceGuard, slicesOf, type GuardSnapshot, type SliceGuardOptions } from './slice-guard.js';

/** Fish's own settings (flags of `fdferry fish`). */
export interface FishOptions {
  policy: EgressPolicy;
  pump: Omit<FishPumpOptions, 'tunFd'>;
  /** How long a registration outlives its control connection before it ends and its entries are flushed. */
  registrationGraceMs: number;
  /** After a crash, how long mappings found in conntrack wait for their registration to come back. */
  restartGraceMs: number;
  /** On a clean stop, leave the tun, rules, table and conntrack entries for the next start. */
  keepHostSetup: boolean;
  /** Log every registration, refusal and end at info level (an audit trail) instead of debug. */
  audit: boolean;
  /** Most mapping rows `mappings` returns at once. */
  maxListedMappings: number;
  /** The slice guard's settings (slice-guard.ts), or false for none. Default: on, with its defaults. */
  sliceGuard?: false | Omit<SliceGuardOptions, 'markBase'>;
}

/** How many refusals `explain` remembers. */
const RECENT_REFUSALS = 256;

/** Builds the host side (injected so tests can replace it). */
export type FishHostFactory = (context: DaemonContext) => FishHost;

/** The Fish service. */
export class FishService implements Service {
  readonly name = 'fish';
  readonly controlMethods = ['explain'] as const;
  readonly #context: DaemonContext;
  readonly #options: FishOptions;
  readonly #host: FishHost;
  readonly #table: RegistrationTable;
  #pump: FishPump | null = null;
  #guard: SliceGuard | null = null;
  /** A stopped guard's (or a predecessor's) state, for the next guard: counts stay monotonic, findings are not repeated. */
  #guardCarried: GuardSnapshot | null = null;
  #tunFd = -1;
  #tunIfindex = 0;
  #stopping = false;
  /** Grace timers of registrations whose control connection went away. */
  readonly #graceTimers = new Map<number, NodeJS.Timeout>();
  /** Mappings a cold start found in conntrack, waiting for their registration to come back. */
  #orphans = new Map<number, FishMapping[]>();
  #orphanTimer: NodeJS.Timeout | null = null;
  /** Refusals by reason, and registrations by how they ended. */
  readonly #counters: Record<string, number> = { registered: 0, refused: 0 };
  readonly #exhausted: Record<string, number> = { slice: 0, limit: 0, conntrack: 0 };
  readonly #ended: Record<string, number> = {};
  /** The last refusals, so `explain` can say why a client tuple never got a mapping. */
  readonly #recentRefusals: Array<ExhaustedEvent & { at: number }> = [];

  constructor(context: DaemonContext, options: FishOptions, createHost: FishHostFactory) {
    this.#context = context;
    this.#options = options;
    this.#table = new RegistrationTable(options.policy);
    this.#host = createHost(context);
    context.server.on('disconnect', (connection) => this.#onDisconnect(connection));
  }

  start(passed: PassedFd[] = []): void {
    const { binding, log } = this.#context;
    // Fish's crash recovery is the persistent tun and conntrack itself (docs/fish.md): nothing is kept in the fd store.
    if (passed.length) log.warn({ names: [...new Set(passed.map((p) => p.name))] }, 'fds passed by the service manager that Fish does not use: closed');
    binding.closeAll(passed.map((p) => p.fd));
    const started: HostStart = this.#host.start();
    this.#tunFd = started.tunFd;
    this.#tunIfindex = started.ifindex;
    this.#startPump();
    this.#startGuard();
    // A cold start after a crash: the kernel kept every reservation; give each registration its ports back
    // when its proxy re-registers, and flush what nobody claims.
    const found = started.mappings;
    for (const mapping of found) {
      const list = this.#orphans.get(mapping.rid) ?? [];
      list.push(mapping);
      this.#orphans.set(mapping.rid, list);
    }
    if (this.#orphans.size) {
      log.info({ registrations: this.#orphans.size, mappings: found.length, graceMs: this.#options.restartGraceMs }, 'found mappings in conntrack from before a restart; waiting for their registrations');
      this.#orphanTimer = setTimeout(() => this.#flushOrphans(), this.#options.restartGraceMs);
      this.#orphanTimer.unref();
    }
    log.info({ tun: started.tunName, ifindex: started.ifindex, reattached: started.reattached, policy: this.#describePolicy() }, 'Fish ready');
  }

  methods(): MethodTable {
    return {
      register: defineMethod({
        fds: { min: 1, max: 1, kind: 'seqpacket-socket' },
        parse: parseRegisterRequest,
        handle: ({ params, fds, connection }) => ({ result: this.#register(params, fds[0]!, connection) as unknown as Record<string, unknown> }),
      }),
      unregister: defineMethod({
        parse: (params) => parseRegistrationId(params, true)!,
        handle: ({ params: id, connection }) => {
          const registration = this.#table.get(id);
          if (!registration || (registration.uid !== connection.peer.uid && !connection.control)) {
            throw new ProtocolError('EFDFERRY_NOTFOUND', `no registration ${id} of yours`);
          }
          this.#end(registration, 'unregistered');
          return { result: { id, ended: true } };
        },
      }),
      registrations: defineMethod({
        handle: ({ connection }) => {
          const stats = new Map((this.#pump?.stats().registrations ?? []).map((row) => [row.rid, row]));
          const now = Date.now();
          const visible = this.#table.all().filter((r) => connection.control || r.uid === connection.peer.uid);
          return {
            result: {
              registrations: visible.map((r) => ({
                id: r.id,
                owner: r.owner,
                peerPid: r.peer.pid,
                peerUid: r.uid,
                egress4: r.egress4,
                egress6: r.egress6,
                ports: r.ports,
                protocols: r.protocols,
                maxMappings: r.maxMappings,
                connected: r.connectionId !== null,
                ageMs: now - r.registeredAt,
                ...(r.orphanedAt === null ? {} : { graceLeftMs: Math.max(0, r.orphanedAt + this.#options.registrationGraceMs - now) }),
                ...(stats.get(r.id) ?? {}),
              })),
            },
          };
        },
      }),
      mappings: defineMethod({
        parse: (params) => parseRegistrationId(params, false),
        handle: ({ params: id, connection }) => {
          const mine = new Set(this.#table.all().filter((r) => connection.control || r.uid === connection.peer.uid).map((r) => r.id));
          const rows = this.#pumpOrThrow().mappings(id ?? undefined).filter((row) => mine.has(row.rid));
          const limit = this.#options.maxListedMappings;
          return { result: { mappings: rows.slice(0, limit), total: rows.length, truncated: rows.length > limit } };
        },
      }),
      explain: defineMethod({
        parse: parseExplainRequest,
        handle: ({ params }) => ({ result: this.#explain(params) }),
      }),
    };
  }

  metricSources(): MetricSource[] {
    const stats = (): FishStats => this.#pump?.stats() ?? { registrations: [], returnDrops: {}, packetsFromTun: 0, packetsToTun: 0 };
    const perRegistration = (pick: (row: FishStats['registrations'][number]) => Sample[]) => () => stats().registrations.flatMap(pick);
    return [
      { name: 'fdferry_tasks_active', help: 'Tasks running (Fish: registrations)', type: 'gauge', read: () => [[{}, this.#table.size]] },
      { name: 'fdferry_fish_mappings', help: 'Mappings (reserved egress tuples) per registration', type: 'gauge', labelNames: ['registration'], read: perRegistration((r) => [[{ registration: r.rid }, r.mappings]]) },
      {
        name: 'fdferry_fish_packets_total',
        help: 'Packets forwarded, by direction',
        type: 'counter',
        labelNames: ['registration', 'direction'],
        read: perRegistration((r) => [
          [{ registration: r.rid, direction: 'egress' }, r.packetsOut],
          [{ registration: r.rid, direction: 'return' }, r.packetsIn],
        ]),
      },
      {
        name: 'fdferry_fish_bytes_total',
        help: 'Bytes of IP packets forwarded, by direction',
        type: 'counter',
        labelNames: ['registration', 'direction'],
        read: perRegistration((r) => [
          [{ registration: r.rid, direction: 'egress' }, r.bytesOut],
          [{ registration: r.rid, direction: 'return' }, r.bytesIn],
        ]),
      },
      {
        name: 'fdferry_fish_reservations_total',
        help: 'Conntrack reservations: made, and EEXIST answers (the port was someone else\'s) skipped',
        type: 'counter',
        labelNames: ['registration', 'outcome'],
        read: perRegistration((r) => [
          [{ registration: r.rid, outcome: 'reserved' }, r.reserved],
          [{ registration: r.rid, outcome: 'collision' }, r.collisions],
        ]),
      },
      {
        name: 'fdferry_fish_exhausted_total',
        help: 'New flows refused an egress tuple, by reason (the client got a reset or an ICMP administratively prohibited)',
        type: 'counter',
        labelNames: ['reason'],
        read: () => Object.entries(this.#exhausted).map(([reason, count]): Sample => [{ reason }, count]),
      },
      {
        name: 'fdferry_fish_drops_total',
        help: 'Packets dropped, by where they were counted (a registration: its client packets and the replies its socket refused; the tun: replies that matched nothing or could not be parsed) and reason',
        type: 'counter',
        labelNames: ['counted_at', 'reason'],
        read: () => {
          const totals = new Map<string, number>();
          for (const row of stats().registrations) for (const [reason, count] of Object.entries(row.drops)) totals.set(reason, (totals.get(reason) ?? 0) + count);
          return [
            ...[...totals].map(([reason, count]): Sample => [{ counted_at: 'registration', reason }, count]),
            ...Object.entries(stats().returnDrops).map(([reason, count]): Sample => [{ counted_at: 'tun', reason }, count]),
          ];
        },
      },
      {
        name: 'fdferry_fish_registrations_ended_total',
        help: 'Registrations ended, by reason',
        type: 'counter',
        labelNames: ['reason'],
        read: () => Object.entries(this.#ended).map(([reason, count]): Sample => [{ reason }, count]),
      },
      {
        name: 'fdferry_fish_guard_findings_total',
        help: 'Slice guard findings: foreign entries in a slice, Fish entries the kernel NATed (rewritten) or deleted while active (dropped)',
        type: 'counter',
        labelNames: ['kind'],
        read: () => GUARD_FINDING_KINDS.map((kind): Sample => [{ kind }, this.#guardCounts()[kind] ?? 0]),
      },
    ];
  }

  status(): Record<string, unknown> {
    const stats = this.#pump?.stats();
    return {
      registrations: this.#table.size,
      mappings: stats?.registrations.reduce((sum, r) => sum + r.mappings, 0) ?? 0,
      waitingForReregistration: this.#orphans.size,
      policy: this.#describePolicy(),
      counters: { ...this.#counters, exhausted: { ...this.#exhausted }, ended: { ...this.#ended } },
      packetsFromTun: stats?.packetsFromTun ?? 0,
      packetsToTun: stats?.packetsToTun ?? 0,
      returnDrops: stats?.returnDrops ?? {},
      guard: this.#guard?.status() ?? { running: false, findings: this.#guardCounts() },
      stopping: this.#stopping,
    };
  }

  pauseAndExport(fds: number[]): { state: Record<string, unknown>; summary: ExportSummary } {
    const rows = this.#pumpOrThrow().pause();
    const state: FishState = {
      tun: fds.push(this.#tunFd) - 1,
      tunIfindex: this.#tunIfindex,
      registrations: exportRegistrations(this.#table.all(), fds),
      mappings: rows,
      orphans: [...this.#orphans.values()].flat(),
      counters: { ...this.#counters },
      exhausted: { ...this.#exhausted },
      ended: { ...this.#ended },
      guard: this.#guard?.snapshot() ?? this.#guardCarried ?? undefined,
    };
    return { state: state as unknown as Record<string, unknown>, summary: { tasks: this.#table.size, bytesInFlight: 0 } };
  }

  resumeAfterRollback(): void {
    this.#pump?.resume();
  }

  releaseExported(): void {
    const { binding } = this.#context;
    // The successor owns the tun, the rules and the reservations now: close our copies, touch nothing else.
    this.#stopGuard();
    this.#pump?.close();
    this.#pump = null;
    for (const registration of this.#table.all()) binding.closeAll([registration.fd]);
    binding.closeAll([this.#tunFd]);
    this.#tunFd = -1;
    this.#clearTimers();
  }

  importState(state: Record<string, unknown>, fds: readonly number[]): ExportSummary {
    const { binding } = this.#context;
    const fish = state as unknown as FishState;
    if (!Number.isInteger(fish.tun) || !Array.isArray(fish.registrations) || !Array.isArray(fish.mappings)) {
      throw new ProtocolError('EFDFERRY_STATE', 'fish state: no tun, registration or mapping list');
    }
    const tunFd = fds[fish.tun];
    if (tunFd === undefined || binding.describeFd(tunFd).kind !== 'char') throw new ProtocolError('EFDFERRY_STATE', 'fish state: the tun fd is not a character device');
    const registrations = importRegistrations(fish.registrations, fds, (fd) => binding.describeFd(fd));
    if (!Number.isInteger(fish.tunIfindex) || fish.tunIfindex <= 0) throw new ProtocolError('EFDFERRY_STATE', 'fish state: no tun ifindex');
    this.#host.adopt(this.#table.ranges(registrations), fish.tunIfindex);
    this.#tunFd = tunFd;
    this.#tunIfindex = fish.tunIfindex;
    this.#startPump();
    for (const registration of registrations) {
      this.#table.set(registration);
      this.#pump!.addRegistration(this.#pumpRegistration(registration));
    }
    this.#pump!.addMappings(fish.mappings.filter((m) => this.#table.get(m.rid)));
    this.#pump!.pause();
    for (const mapping of Array.isArray(fish.orphans) ? fish.orphans : []) {
      const list = this.#orphans.get(mapping.rid) ?? [];
      list.push(mapping);
      this.#orphans.set(mapping.rid, list);
    }
    Object.assign(this.#counters, fish.counters ?? {});
    Object.assign(this.#exhausted, fish.exhausted ?? {});
    Object.assign(this.#ended, fish.ended ?? {});
    this.#guardCarried = fish.guard ?? null;
    return { tasks: registrations.length, bytesInFlight: 0 };
  }

  resumeImported(): void {
    const { server, log } = this.#context;
    // Control connections came over with the server; a registration whose connection did not is in its grace period.
    const byOwner = new Map(server.connections().filter((c) => c.ownerKey).map((c) => [c.ownerKey!, c.id]));
    for (const registration of this.#table.all()) {
      registration.connectionId = byOwner.get(registration.ownerKey) ?? null;
      if (registration.connectionId === null) this.#startGrace(registration);
    }
    if (this.#orphans.size) this.#orphanTimer = setTimeout(() => this.#flushOrphans(), this.#options.restartGraceMs).unref();
    this.#pump?.resume();
    this.#startGuard();
    log.info({ registrations: this.#table.size }, 'registrations resumed');
  }

  /**
   * SIGTERM: stop forwarding, end every registration (flushing its reservations) and remove what Fish
   * installed on the host, unless told to keep it all for the next start (`--keep-host-setup`).
   */
  async shutdown(): Promise<void> {
    this.#stopping = true;
    const { binding, log } = this.#context;
    this.#clearTimers();
    this.#stopGuard();
    this.#pump?.close();
    this.#pump = null;
    const keep = this.#options.keepHostSetup;
    for (const registration of this.#table.all()) {
      binding.closeAll([registration.fd]);
      if (!keep) this.#flush(registration.id);
      this.#table.remove(registration.id);
    }
    if (!keep) for (const id of this.#orphans.keys()) this.#flush(id);
    this.#orphans.clear();
    this.#host.stop(this.#tunFd, keep);
    this.#tunFd = -1;
    log.info({ keptHostSetup: keep }, keep ? 'stopped; the tun, rules and reservations are kept for the next start' : 'stopped; host setup removed');
  }

  #startPump(): void {
    this.#pump = this.#context.binding.createFishPump({ ...this.#options.pump, tunFd: this.#tunFd }, (events) => this.#onEvents(events));
  }

  /**
   * The slice guard runs once the host is set up (or adopted). It only reports, so a failure to open its
   * event socket is logged and Fish forwards without it.
   */
  #startGuard(): void {
    if (this.#options.sliceGuard === false || this.#guard) return;
    const guard = new SliceGuard(
      { io: conntrackGuardIo(this.#context.binding), log: this.#context.log, slices: () => slicesOf(this.#table.all()), mappings: () => this.#pump?.mappings() ?? [] },
      { ...this.#options.sliceGuard, markBase: this.#options.pump.markBase },
    );
    guard.restore(this.#guardCarried);
    try {
      guard.start();
      this.#guard = guard;
      this.#guardCarried = null;
    } catch (error) {
      guard.stop();
      this.#context.log.error({ err: error }, 'slice guard could not start (no conntrack events): Fish forwards without it');
    }
  }

  #stopGuard(): void {
    if (!this.#guard) return;
    this.#guardCarried = this.#guard.snapshot();
    this.#guard.stop();
    this.#guard = null;
  }

  #guardCounts(): Partial<Record<string, number>> {
    return this.#guard?.counts() ?? this.#guardCarried?.counts ?? {};
  }

  #pumpOrThrow(): FishPump {
    if (!this.#pump) throw new ProtocolError('EFDFERRY_SHUTDOWN', 'Fish is not forwarding');
    return this.#pump;
  }

  #register(request: RegisterRequest, fd: number, connection: ConnectionInfo): RegisterResult {
    const { binding, log } = this.#context;
    if (this.#stopping) throw new ProtocolError('EFDFERRY_SHUTDOWN', 'Fish is stopping');
    const pump = this.#pumpOrThrow();
    let existing: Registration | undefined;
    try {
      existing = this.#table.check(request, connection.peer.uid);
    } catch (error) {
      this.#counters.refused!++;
      throw error;
    }
    const registration: Registration = {
      id: request.id,
      fd,
      uid: connection.peer.uid,
      ownerKey: connection.ownerKey!,
      owner: connection.owner!,
      peer: connection.peer,
      connectionId: connection.id,
      egress4: request.egress4,
      egress6: request.egress6,
      ports: request.ports,
      protocols: request.protocols,
      maxMappings: request.maxMappings || this.#options.policy.defaultMaxMappings,
      registeredAt: Date.now(),
      orphanedAt: null,
    };
    // Replies must be routed to the tun before the first packet of the new slice leaves (notes §3.4).
    const others = this.#table.all().filter((r) => r.id !== request.id);
    try {
      this.#host.setRanges(new RegistrationTable(this.#options.policy).ranges([...others, registration]));
    } catch (error) {
      this.#counters.refused!++;
      throw new ProtocolError('EFDFERRY_NETWORK', `policy routing for ${request.ports.join('-')} could not be installed: ${(error as Error).message}`);
    }
    // A re-registration (a proxy that restarted, or came back after a Fish crash) keeps the ports its
    // flows had, where they still fit the slice it asks for now.
    const fits = (m: FishMapping) =>
      m.egressPort >= registration.ports[0] && m.egressPort <= registration.ports[1] && (m.egressAddress === registration.egress4 || m.egressAddress === registration.egress6) && registration.protocols.includes(m.protocol);
    let kept: FishMapping[] = [];
    if (existing) {
      kept = pump.mappings(existing.id).filter(fits);
      pump.removeRegistration(existing.id);
      binding.closeAll([existing.fd]);
      this.#clearGrace(existing.id);
    }
    const orphans = this.#orphans.get(request.id);
    if (orphans) {
      this.#orphans.delete(request.id);
      // Rebuilt from conntrack labels, an IPv6 client address has only its low 64 bits: the /64 comes now.
      const whole = orphans.flatMap((m) => (m.family === 4 ? [m] : request.client6Prefix ? [{ ...m, clientAddress: clientAddress6(request.client6Prefix.split('/')[0]!, m.clientAddress) }] : []));
      kept.push(...whole.filter(fits));
    }
    this.#table.set(registration);
    pump.addRegistration(this.#pumpRegistration(registration));
    this.#guard?.slicesChanged();
    if (kept.length) pump.addMappings(kept.map(({ rid, protocol, family, clientAddress, clientPort, destinationAddress, destinationPort, egressAddress, egressPort }) => ({ rid, protocol, family, clientAddress, clientPort, destinationAddress, destinationPort, egressAddress, egressPort })));
    this.#counters.registered!++;
    log[this.#options.audit ? 'info' : 'debug'](
      { id: registration.id, owner: registration.owner, peerPid: registration.peer.pid, peerUid: registration.uid, egress4: registration.egress4, egress6: registration.egress6, ports: registration.ports, protocols: registration.protocols, keptMappings: kept.length, takeover: Boolean(existing) },
      existing || orphans ? 'registration resumed' : 'registered',
    );
    return {
      id: registration.id,
      egress4: registration.egress4,
      egress6: registration.egress6,
      ports: registration.ports,
      protocols: registration.protocols,
      maxMappings: registration.maxMappings,
      mappings: kept.length,
      resumed: Boolean(existing || orphans),
    };
  }

  #pumpRegistration(registration: Registration) {
    return {
      rid: registration.id,
      fd: registration.fd,
      egress4: registration.egress4,
      egress6: registration.egress6,
      portLo: registration.ports[0],
      portHi: registration.ports[1],
      protocols: { tcp: registration.protocols.includes('tcp'), udp: registration.protocols.includes('udp'), icmp: registration.protocols.includes('icmp') },
      maxMappings: registration.maxMappings,
    };
  }

  /** Ends a registration: stop pumping it, close its socket, flush its reservations, shrink the rules. */
  #end(registration: Registration, reason: string): void {
    const { binding, log } = this.#context;
    if (this.#table.get(registration.id) !== registration) return;
    this.#clearGrace(registration.id);
    this.#pump?.removeRegistration(registration.id);
    binding.closeAll([registration.fd]);
    this.#table.remove(registration.id);
    this.#flush(registration.id);
    this.#guard?.slicesChanged();
    try {
      this.#host.setRanges(this.#table.ranges());
    } catch (error) {
      log.error({ err: error, id: registration.id }, 'could not remove the policy routing of an ended registration');
    }
    this.#ended[reason] = (this.#ended[reason] ?? 0) + 1;
    log[this.#options.audit ? 'info' : 'debug']({ id: registration.id, owner: registration.owner, reason }, 'registration ended');
  }

  #flush(id: number): void {
    try {
      const flushed = this.#host.flushRegistration(id);
      this.#context.log.debug({ id, flushed }, 'conntrack entries of the registration flushed');
    } catch (error) {
      this.#context.log.error({ err: error, id }, 'could not flush the registration\'s conntrack entries (they expire by themselves)');
    }
  }

  #onDisconnect(connection: ConnectionInfo): void {
    for (const registration of this.#table.ofConnection(connection.id)) this.#startGrace(registration);
  }

  #startGrace(registration: Registration): void {
    registration.connectionId = null;
    registration.orphanedAt = Date.now();
    this.#clearGrace(registration.id);
    if (this.#stopping) return;
    this.#context.log.info({ id: registration.id, owner: registration.owner, graceMs: this.#options.registrationGraceMs }, 'control connection gone: the registration ends unless it is taken over in time');
    const timer = setTimeout(() => this.#end(registration, 'control-connection-closed'), this.#options.registrationGraceMs);
    timer.unref();
    this.#graceTimers.set(registration.id, timer);
  }

  #clearGrace(id: number): void {
    const timer = this.#graceTimers.get(id);
    if (timer) clearTimeout(timer);
    this.#graceTimers.delete(id);
  }

  #clearTimers(): void {
    for (const timer of this.#graceTimers.values()) clearTimeout(timer);
    this.#graceTimers.clear();
    if (this.#orphanTimer) clearTimeout(this.#orphanTimer);
    this.#orphanTimer = null;
  }

  #flushOrphans(): void {
    this.#orphanTimer = null;
    for (const [id, mappings] of this.#orphans) {
      if (this.#table.get(id)) continue;
      this.#context.log.info({ id, mappings: mappings.length }, 'registration did not come back after the restart: its conntrack entries are flushed');
      this.#flush(id);
    }
    this.#orphans.clear();
  }

  #explain(flow: ReturnType<typeof parseExplainRequest>): Record<string, unknown> {
    const rows: FishMappingRow[] = this.#pump?.mappings() ?? [];
    const match = rows.find((row) => mappingMatches(row, flow));
    // What the slice guard saw of this tuple (a foreign entry holding it, or one of Fish's rewritten or dropped).
    const finding = this.#guard?.findingFor(flow);
    const guard = finding ? { guard: finding } : {};
    if (match) {
      const registration = this.#table.get(match.rid);
      return { verdict: 'mapped', mapping: match, registration: registration ? { id: registration.id, owner: registration.owner, ports: registration.ports } : null, ...guard };
    }
    if (finding?.kind === 'foreign') return { verdict: 'foreign', reason: finding.detail, entry: finding };
    const inSlice = (r: Registration) => (r.egress4 === flow.address || r.egress6 === flow.address) && flow.port >= r.ports[0] && flow.port <= r.ports[1];
    const registration = this.#table.all().find(inSlice);
    const waiting = [...this.#orphans.values()].flat().find((m) => mappingMatches(m, flow));
    if (waiting) return { verdict: 'waiting-for-registration', mapping: waiting, ...guard };
    if (registration) return { verdict: 'unmapped', reason: `the port is in registration ${registration.id}'s slice but no flow uses it: replies to it are dropped (returnDrops.unmapped)`, registration: { id: registration.id, owner: registration.owner, ports: registration.ports }, ...guard };
    const refusal = [...this.#recentRefusals].reverse().find((r) => r.protocol === flow.protocol && r.clientAddress === flow.address && r.clientPort === flow.port && r.destinationAddress === flow.destinationAddress && r.destinationPort === flow.destinationPort);
    if (refusal) {
      const why = { slice: 'every port of the slice was taken for this destination', limit: 'the registration had reached its mapping limit', conntrack: `conntrack refused the reservation (${String(refusal.code)})` }[refusal.reason];
      return { verdict: 'refused', reason: `registration ${refusal.id} refused this flow ${new Date(refusal.at).toISOString()}: ${why}; the client got a reset or an ICMP administratively prohibited`, refusal };
    }
    return { verdict: 'unknown', reason: 'no registration, mapping or recent refusal matches: if this is a client tuple, the flow never started (or its refusal is older than the last 256)' };
  }

  #onEvents(events: FishEvent[]): void {
    const { server, log } = this.#context;
    for (const event of events) {
      switch (event.type) {
        case 'exhausted': {
          this.#exhausted[event.reason] = (this.#exhausted[event.reason] ?? 0) + 1 + event.suppressed;
          const registration = this.#table.get(event.rid);
          const { type: _type, rid, ...rest } = event;
          const data: ExhaustedEvent = { id: rid, ...rest };
          this.#recentRefusals.push({ ...data, at: Date.now() });
          if (this.#recentRefusals.length > RECENT_REFUSALS) this.#recentRefusals.shift();
          log.warn({ ...data, owner: registration?.owner }, `registration ${rid}: no egress tuple for a new ${event.protocol} flow to ${event.destinationAddress}:${event.destinationPort} (${event.reason})`);
          if (registration?.connectionId != null) server.notify(registration.connectionId, 'exhausted', data as unknown as Record<string, unknown>);
          break;
        }
        case 'closed': {
          const registration = this.#table.get(event.rid);
          if (registration) this.#end(registration, event.reason === 'eof' ? 'packet-socket-closed' : 'packet-socket-error');
          break;
        }
        case 'notice':
          log.warn({ id: event.rid, code: event.code }, event.message);
          break;
      }
    }
  }

  #describePolicy(): Record<string, unknown> {
    const policy = this.#options.policy;
    return { egressAllow: policy.allow.map((c) => c.text), portRange: policy.portRange, maxRegistrations: policy.maxRegistrations };
  }
}

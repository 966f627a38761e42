/**
 * Fish's slice guard (issue #6 item 4): reports conntrack entries that undermine Fish's promise that its
 * flows leave from the exact tuple it reserved.
 *
 * - `foreign`: an entry that is not Fish's (another mark, or none) holding a tuple of an egress slice: its
 *   reply goes to `E:port` (or it leaves from `E:port`) with the port inside a registration's slice. Fish's
 *   exclusive create skips such a port (EEXIST), so flows are not harmed, but the slice is smaller than the
 *   operator thinks, and something on the host (a NAT rule, a local socket, another tool) uses Fish's address.
 * - `rewritten`: one of Fish's entries whose REPLY tuple is not the exact swap of its ORIG tuple, or that
 *   carries IPS_SRC_NAT/IPS_DST_NAT: the kernel NATed it, so replies would not come back to the reserved
 *   tuple (notes/fish-kernel.md §8).
 * - `dropped`: a DESTROY event for one of Fish's entries while the pump still holds its mapping and the flow
 *   was active recently — the entry cannot have timed out; something deleted it (`conntrack -D`, a flush,
 *   early drop at nf_conntrack_max). Its next packets would be tracked as a new, unreserved entry.
 *
 * Sources: an unfiltered dump per family at start and when the slices change (rate-limited: its cost grows
 * with the host's table), and NEW and DESTROY events while running. DESTROY events of timed-out entries arrive
 * 16–47 s late (notes §7), hence the recheck before calling an entry dropped (`lookup`): the pump may have
 * revalidated and re-reserved the same tuple in between (§9).
 *
 * Pure logic: the sockets come in as {@link SliceGuardIo}, time as `now`, so the classification is unit-tested
 * without root.
 */
import type { Logger } from 'pino';
import type { FishMappingRow, FishProtocol, NetlinkBatch } from '../../lib/native.js';
import type { IpVersion } from '../../lib/netlink/address.js';
import { CT_MSG, FISH_MARK_MASK, IPS, type ConntrackEntry, type ConntrackTuple } from '../../lib/netlink/conntrack.js';
import { decodeEntry } from '../../lib/netlink/conntrack.js';
import type { ExplainRequest } from '../../lib/protocol/fish.js';
import type { Registration } from './registrations.js';

/** What the guard reports. */
export type GuardFindingKind = 'foreign' | 'rewritten' | 'dropped';

/** Every kind, for counters that must show zeros. */
export const GUARD_FINDING_KINDS: readonly GuardFindingKind[] = ['foreign', 'rewritten', 'dropped'];

/** One finding, as logged and listed in `status`. */
export interface GuardFinding {
  /** A sequence number, per Fish (carried across hand-overs): `status` lists findings by it. */
  id: number;
  kind: GuardFindingKind;
  /** When it was found (ISO 8601). */
  at: string;
  /** A start-up or slice-change dump, or a conntrack event. */
  source: 'dump' | 'event';
  family: IpVersion;
  protocol: number;
  orig: ConntrackTuple | null;
  reply: ConntrackTuple | null;
  mark: number | null;
  status: number | null;
  /** `foreign`: the registrations whose slice the entry is in; otherwise the registration of the mark. */
  registrations: number[];
  /** One sentence for humans. */
  detail: string;
}

/**
 * A guard's state for its successor (carried in the hand-over's state document): the counters, so the metric
 * stays monotonic; the entries found now, so the successor's start dump does not report them again; the
 * recent findings, so `status` and `explain` still show them.
 */
export interface GuardSnapshot {
  counts: Record<GuardFindingKind, number>;
  current: GuardFinding[];
  recent: GuardFinding[];
}

/** One slice as the guard sees it: a registration's egress address and port range. */
export interface GuardSlice {
  rid: number;
  family: IpVersion;
  egress: string;
  lo: number;
  hi: number;
  protocols: readonly FishProtocol[];
}

/** The slices of the registrations: one per egress address of each. */
export function slicesOf(registrations: readonly Registration[]): GuardSlice[] {
  const slices: GuardSlice[] = [];
  for (const r of registrations) {
    if (r.egress4) slices.push({ rid: r.id, family: 4, egress: r.egress4, lo: r.ports[0], hi: r.ports[1], protocols: r.protocols });
    if (r.egress6) slices.push({ rid: r.id, family: 6, egress: r.egress6, lo: r.ports[0], hi: r.ports[1], protocols: r.protocols });
  }
  return slices;
}

const PROTOCOL_NAMES: Record<number, FishProtocol> = { 6: 'tcp', 17: 'udp', 1: 'icmp', 58: 'icmp' };

/** A tuple's source "port": the port for TCP/UDP, the echo id for ICMP (Fish's slices cover both). */
function sourcePort(tuple: ConntrackTuple): number | undefined {
  return PROTOCOL_NAMES[tuple.protocol] === 'icmp' ? tuple.icmpId : tuple.srcPort;
}
function destinationPort(tuple: ConntrackTuple): number | undefined {
  return PROTOCOL_NAMES[tuple.protocol] === 'icmp' ? tuple.icmpId : tuple.dstPort;
}

/** Whether the entry carries Fish's mark (`markBase | rid`). */
export function isFishEntry(entry: ConntrackEntry, markBase: number): boolean {
  return entry.mark !== null && (entry.mark & FISH_MARK_MASK) >>> 0 === (markBase & FISH_MARK_MASK) >>> 0;
}

/** Whether `reply` is exactly `orig` seen from the other end: what an entry nobody NATed looks like. */
export function isExactSwap(orig: ConntrackTuple, reply: ConntrackTuple): boolean {
  if (orig.protocol !== reply.protocol || orig.src !== reply.dst || orig.dst !== reply.src) return false;
  if (PROTOCOL_NAMES[orig.protocol] === 'icmp') return orig.icmpId === reply.icmpId;
  return orig.srcPort === reply.dstPort && orig.dstPort === reply.srcPort;
}

/** The slices whose egress tuple the entry holds, by its reply destination or its original source. */
export function slicesHeldBy(entry: ConntrackEntry, slices: readonly GuardSlice[]): GuardSlice[] {
  const protocol = PROTOCOL_NAMES[entry.orig?.protocol ?? entry.reply?.protocol ?? -1];
  if (!protocol) return [];
  const inSlice = (slice: GuardSlice, address: string | undefined, port: number | undefined) =>
    address === slice.egress && port !== undefined && port >= slice.lo && port <= slice.hi;
  return slices.filter(
    (slice) =>
      slice.family === entry.family &&
      slice.protocols.includes(protocol) &&
      ((entry.reply !== null && inSlice(slice, entry.reply.dst, destinationPort(entry.reply))) || (entry.orig !== null && inSlice(slice, entry.orig.src, sourcePort(entry.orig)))),
  );
}

/** A dump entry or NEW event classified: `foreign`, `rewritten`, or nothing to report (null). */
export function classifyEntry(entry: ConntrackEntry, slices: readonly GuardSlice[], markBase: number): { kind: 'foreign' | 'rewritten'; registrations: number[]; detail: string } | null {
  if (isFishEntry(entry, markBase)) {
    const rid = entry.mark! & 0xffff;
    const natted = ((entry.status ?? 0) & (IPS.SRC_NAT | IPS.DST_NAT)) !== 0;
    if (!entry.orig || !entry.reply) return null;
    if (natted || !isExactSwap(entry.orig, entry.reply)) {
      return { kind: 'rewritten', registrations: [rid], detail: `registration ${rid}'s entry ${describeTuple(entry.orig)} was NATed by the kernel: replies go to ${describeTuple(entry.reply)}` };
    }
    return null;
  }
  const held = slicesHeldBy(entry, slices);
  if (!held.length) return null;
  const rids = [...new Set(held.map((s) => s.rid))].sort((a, b) => a - b);
  return {
    kind: 'foreign',
    registrations: rids,
    detail: `a conntrack entry that is not Fish's (${describeTuple(entry.orig)}, replies to ${describeTuple(entry.reply)}) holds a port of registration ${rids.join(', ')}'s slice: Fish skips it toward that destination`,
  };
}

/** The mapping a DESTROYed entry of Fish's was made for, if the pump still holds it. */
export function mappingOfDestroyed(entry: ConntrackEntry, rows: readonly FishMappingRow[], markBase: number): FishMappingRow | undefined {
  if (!isFishEntry(entry, markBase) || !entry.orig) return undefined;
  const rid = entry.mark! & 0xffff;
  const protocol = PROTOCOL_NAMES[entry.orig.protocol];
  const egressPort = sourcePort(entry.orig);
  const dport = protocol === 'icmp' ? 0 : entry.orig.dstPort;
  return rows.find(
    (row) =>
      row.rid === rid &&
      row.protocol === protocol &&
      row.egressAddress === entry.orig!.src &&
      row.egressPort === egressPort &&
      row.destinationAddress === entry.orig!.dst &&
      row.destinationPort === dport,
  );
}

/** `udp 203.0.113.7:40000 → 198.51.100.2:9000`. */
export function describeTuple(tuple: ConntrackTuple | null): string {
  if (!tuple) return '(no tuple)';
  const name = PROTOCOL_NAMES[tuple.protocol] ?? `proto ${tuple.protocol}`;
  const at = (address: string, port: number | undefined) => (port === undefined ? address : address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`);
  return `${name} ${at(tuple.src, sourcePort(tuple))} → ${at(tuple.dst, PROTOCOL_NAMES[tuple.protocol] === 'icmp' ? undefined : tuple.dstPort)}`;
}

/** Whether a finding is about the flow `explain` asks for (given by its egress side or as the entry's original tuple). */
export function findingMatches(finding: GuardFinding, flow: ExplainRequest): boolean {
  const protocols = flow.protocol === 'icmp' ? [1, 58] : flow.protocol === 'tcp' ? [6] : [17];
  if (!protocols.includes(finding.protocol)) return false;
  const icmp = flow.protocol === 'icmp';
  const { orig, reply } = finding;
  if (reply && reply.dst === flow.address && destinationPort(reply) === flow.port && reply.src === flow.destinationAddress && (icmp || reply.srcPort === flow.destinationPort)) return true;
  if (orig && orig.src === flow.address && sourcePort(orig) === flow.port && orig.dst === flow.destinationAddress && (icmp || orig.dstPort === flow.destinationPort)) return true;
  return false;
}

/** The guard's access to conntrack: injected, so tests answer from memory. */
export interface SliceGuardIo {
  /** Opens the event socket (NEW and DESTROY groups, a large receive buffer) and returns its fd. */
  openEvents(): number;
  /** Drains it without blocking (see `netlinkReceive`). */
  receive(fd: number, maxMessages: number): NetlinkBatch;
  closeEvents(fd: number): void;
  /** Every entry of a family, unfiltered. */
  dump(family: IpVersion): ConntrackEntry[];
  /** The entry with this ORIG tuple now, or null (ENOENT). */
  lookup(tuple: ConntrackTuple): ConntrackEntry | null;
  /** Closes the request socket, if any. */
  close(): void;
}

/** Guard settings. */
export interface SliceGuardOptions {
  /** Fish's mark base (`0xF15E0000`): entries with it under 0xffff0000 are Fish's. */
  markBase: number;
  /**
   * How often events are drained. A timer, not a readable callback: the guard is an operator-facing report,
   * never on the packet path (the pump reserves on its own thread), and 4 MB of receive buffer holds ≈20 000
   * events, far more than a host creates in a quarter second; a timer keeps the event socket out of libuv
   * and the hand-over simple (it is closed by the predecessor, reopened by the successor).
   */
  drainIntervalMs?: number;
  /** Least time between two unfiltered dumps (start, slice changes, overflows coalesce onto it). */
  rescanIntervalMs?: number;
  /** At most one warning per kind per this long; the others are counted as suppressed and summed up. */
  logIntervalMs?: number;
  /**
   * A mapping with a packet within this long whose entry is destroyed was dropped, not expired: the shortest
   * timeout conntrack gives any of Fish's entries by default is TCP CLOSE's 10 s.
   */
  activeWithinMs?: number;
  /** How many recent findings `status` lists. */
  recent?: number;
  /** Most foreign and rewritten entries remembered (to report each once); beyond it they are only counted. */
  maxTracked?: number;
  /** Messages drained per batch; several batches per tick at most. */
  batch?: number;
  now?: () => number;
}

/** What the guard reads from the service. */
export interface SliceGuardSources {
  io: SliceGuardIo;
  log: Pick<Logger, 'warn' | 'info' | 'error' | 'debug'>;
  /** The slices now (from the registration table). */
  slices: () => GuardSlice[];
  /** The pump's mappings now, with their idle time. */
  mappings: () => FishMappingRow[];
}

const BATCHES_PER_TICK = 8;

/** The slice guard. Start it once the host is set up; stop it before the host goes or a successor takes over. */
export class SliceGuard {
  readonly #sources: SliceGuardSources;
  readonly #markBase: number;
  readonly #drainIntervalMs: number;
  readonly #rescanIntervalMs: number;
  readonly #logIntervalMs: number;
  readonly #activeWithinMs: number;
  readonly #recentMax: number;
  readonly #maxTracked: number;
  readonly #batch: number;
  readonly #now: () => number;
  #fd = -1;
  #timer: NodeJS.Timeout | null = null;
  /** Foreign and rewritten entries known now, by entry key: each is reported once. */
  readonly #tracked = new Map<string, GuardFinding>();
  readonly #recent: GuardFinding[] = [];
  readonly #counts: Record<GuardFindingKind, number> = { foreign: 0, rewritten: 0, dropped: 0 };
  readonly #lastLog: Record<GuardFindingKind, number> = { foreign: -Infinity, rewritten: -Infinity, dropped: -Infinity };
  readonly #suppressed: Record<GuardFindingKind, number> = { foreign: 0, rewritten: 0, dropped: 0 };
  #scanPending = false;
  #lastScan = -Infinity;
  #scans = 0;
  #overflows = 0;
  #events = 0;
  #errors = 0;
  #lastId = 0;

  constructor(sources: SliceGuardSources, options: SliceGuardOptions) {
    this.#sources = sources;
    this.#markBase = options.markBase;
    this.#drainIntervalMs = options.drainIntervalMs ?? 250;
    this.#rescanIntervalMs = options.rescanIntervalMs ?? 5_000;
    this.#logIntervalMs = options.logIntervalMs ?? 10_000;
    this.#activeWithinMs = options.activeWithinMs ?? 10_000;
    this.#recentMax = options.recent ?? 50;
    this.#maxTracked = options.maxTracked ?? 10_000;
    this.#batch = options.batch ?? 1024;
    this.#now = options.now ?? Date.now;
  }

  /** Whether the event socket is open. */
  get running(): boolean {
    return this.#fd >= 0;
  }

  /**
   * Opens the event socket first and dumps after, so nothing created in between is missed (it may be seen
   * twice: findings are keyed by entry and reported once). `timer: false` leaves the ticking to the caller.
   */
  start(options: { timer?: boolean } = {}): void {
    if (this.#fd >= 0) return;
    this.#fd = this.#sources.io.openEvents();
    this.#scanPending = true;
    this.tick();
    if (options.timer !== false) {
      this.#timer = setInterval(() => this.tick(), this.#drainIntervalMs);
      this.#timer.unref();
    }
  }

  /** Closes the event socket; findings and counters stay (a successor starts from its own dump). */
  stop(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
    const fd = this.#fd;
    this.#fd = -1;
    if (fd >= 0) this.#sources.io.closeEvents(fd);
    this.#sources.io.close();
  }

  /** The slices changed (a registration came or went): dump again, no sooner than the rescan interval. */
  slicesChanged(): void {
    this.#scanPending = true;
  }

  /** One turn: drain events, dump if due, log suppressed counts. Errors are logged, never thrown (a report must not stop Fish). */
  tick(): void {
    if (this.#fd < 0) return;
    try {
      this.drain();
      if (this.#scanPending && this.#now() - this.#lastScan >= this.#rescanIntervalMs) this.scan();
    } catch (error) {
      this.#errors++;
      this.#sources.log.error({ err: error }, 'slice guard: conntrack could not be read (the next turn retries)');
    }
    this.#flushSuppressed();
  }

  /** Reads queued events (a bounded number per call) and classifies them. */
  drain(): void {
    const destroyed: ConntrackEntry[] = [];
    let slices: GuardSlice[] | null = null;
    for (let i = 0; i < BATCHES_PER_TICK && this.#fd >= 0; i++) {
      const batch = this.#sources.io.receive(this.#fd, this.#batch);
      if (batch.overflow) {
        this.#overflows++;
        this.#scanPending = true;
        this.#sources.log.warn({ overflows: this.#overflows }, 'slice guard: conntrack events were lost (receive queue overflow); dumping again — early drops in that window go unreported');
      }
      for (const message of batch.messages) {
        let entry: ConntrackEntry;
        try {
          entry = decodeEntry(message);
        } catch {
          continue;
        }
        this.#events++;
        if (entry.messageType === CT_MSG.DELETE) {
          this.#tracked.delete(entryKey(entry));
          if (isFishEntry(entry, this.#markBase)) destroyed.push(entry);
        } else {
          this.#consider(entry, 'event', (slices ??= this.#sources.slices()));
        }
      }
      if (!batch.more) break;
    }
    if (destroyed.length) this.#checkDestroyed(destroyed);
  }

  /** Dumps every family the slices use and reports foreign and rewritten entries not known yet. */
  scan(): void {
    this.#scanPending = false;
    this.#lastScan = this.#now();
    const slices = this.#sources.slices();
    const families = [...new Set(slices.map((s) => s.family))].sort();
    this.#scans++;
    const seen = new Set<string>();
    for (const family of families) {
      for (const entry of this.#sources.io.dump(family)) {
        const key = this.#consider(entry, 'dump', slices);
        if (key) seen.add(key);
      }
    }
    // What the dump did not show is gone (or left the slices): forget it, so it is reported again if it comes back.
    for (const [key, finding] of this.#tracked) if (!seen.has(key) && (families.includes(finding.family) || !slices.length)) this.#tracked.delete(key);
  }

  /** Findings by kind since start (and from the predecessor's state, if imported). */
  counts(): Record<GuardFindingKind, number> {
    return { ...this.#counts };
  }

  /** What a successor needs to go on where this guard stopped (see {@link GuardSnapshot}). */
  snapshot(): GuardSnapshot {
    return { counts: this.counts(), current: [...this.#tracked.values()], recent: this.recent() };
  }

  /**
   * Takes over a predecessor's snapshot before {@link start}: its counts go on from there, and the entries it
   * already reported are not reported (and counted) again when the start dump finds them.
   */
  restore(snapshot: Partial<GuardSnapshot> | null | undefined): void {
    if (!snapshot) return;
    for (const kind of GUARD_FINDING_KINDS) {
      const count = snapshot.counts?.[kind];
      if (typeof count === 'number' && Number.isFinite(count)) this.#counts[kind] += count;
    }
    for (const finding of Array.isArray(snapshot.current) ? snapshot.current.slice(0, this.#maxTracked) : []) {
      if (finding && (finding.kind === 'foreign' || finding.kind === 'rewritten') && finding.orig) this.#tracked.set(findingKey(finding.family, finding.orig), finding);
    }
    if (Array.isArray(snapshot.recent)) this.#recent.push(...snapshot.recent.slice(-this.#recentMax));
    for (const finding of [...this.#tracked.values(), ...this.#recent]) if (Number.isInteger(finding.id)) this.#lastId = Math.max(this.#lastId, finding.id);
  }

  /** The most recent findings, newest last. */
  recent(): GuardFinding[] {
    return [...this.#recent];
  }

  /** The guard's section of `status`. */
  status(): Record<string, unknown> {
    const tracked: Record<string, number> = { foreign: 0, rewritten: 0 };
    for (const finding of this.#tracked.values()) tracked[finding.kind] = (tracked[finding.kind] ?? 0) + 1;
    return {
      running: this.running,
      findings: this.counts(),
      current: tracked,
      scans: this.#scans,
      lastScanAt: Number.isFinite(this.#lastScan) ? new Date(this.#lastScan).toISOString() : null,
      events: this.#events,
      overflows: this.#overflows,
      errors: this.#errors,
      recent: this.recent(),
    };
  }

  /** The current (foreign, rewritten) or most recent (dropped) finding about a flow, for `explain`. */
  findingFor(flow: ExplainRequest): GuardFinding | undefined {
    for (const finding of this.#tracked.values()) if (findingMatches(finding, flow)) return finding;
    for (let i = this.#recent.length - 1; i >= 0; i--) if (findingMatches(this.#recent[i]!, flow)) return this.#recent[i];
    return undefined;
  }

  /** Classifies a dump entry or NEW event; returns its key when it is a current finding. */
  #consider(entry: ConntrackEntry, source: 'dump' | 'event', slices: readonly GuardSlice[]): string | null {
    const verdict = classifyEntry(entry, slices, this.#markBase);
    if (!verdict) return null;
    const key = entryKey(entry);
    if (this.#tracked.has(key)) return key;
    const finding = this.#finding(verdict.kind, source, entry, verdict.registrations, verdict.detail);
    if (this.#tracked.size < this.#maxTracked) this.#tracked.set(key, finding);
    this.#report(finding);
    return key;
  }

  #checkDestroyed(entries: ConntrackEntry[]): void {
    const rows = this.#sources.mappings();
    for (const entry of entries) {
      const mapping = mappingOfDestroyed(entry, rows, this.#markBase);
      // Not held any more (the registration ended, the pump forgot an idle flow), or idle long enough to have expired.
      if (!mapping || mapping.idleMs >= this.#activeWithinMs) continue;
      // DESTROY events can be late: if the pump has reserved the tuple again since, with Fish's mark, all is well.
      const now = this.#sources.io.lookup(entry.orig!);
      if (now && isFishEntry(now, this.#markBase)) continue;
      const rid = entry.mark! & 0xffff;
      const finding = this.#finding(
        'dropped',
        'event',
        entry,
        [rid],
        `registration ${rid}'s entry ${describeTuple(entry.orig)} was destroyed while its flow was active (idle ${mapping.idleMs} ms): something deleted it; its next packets are tracked unreserved${now ? ' (an unmarked entry holds the tuple now)' : ''}`,
      );
      this.#report(finding);
    }
  }

  #finding(kind: GuardFindingKind, source: 'dump' | 'event', entry: ConntrackEntry, registrations: number[], detail: string): GuardFinding {
    return {
      id: ++this.#lastId,
      kind,
      at: new Date(this.#now()).toISOString(),
      source,
      family: entry.family,
      protocol: entry.orig?.protocol ?? entry.reply?.protocol ?? 0,
      orig: entry.orig,
      reply: entry.reply,
      mark: entry.mark,
      status: entry.status,
      registrations,
      detail,
    };
  }

  #report(finding: GuardFinding): void {
    this.#counts[finding.kind]++;
    this.#recent.push(finding);
    if (this.#recent.length > this.#recentMax) this.#recent.splice(0, this.#recent.length - this.#recentMax);
    const now = this.#now();
    if (now - this.#lastLog[finding.kind] < this.#logIntervalMs) {
      this.#suppressed[finding.kind]++;
      return;
    }
    const suppressed = this.#suppressed[finding.kind];
    this.#suppressed[finding.kind] = 0;
    this.#lastLog[finding.kind] = now;
    const { detail, id: _id, ...fields } = finding;
    this.#sources.log.warn({ guard: fields, suppressed }, `slice guard: ${finding.kind}: ${detail}`);
  }

  /** Findings held back by the log rate limit are summed up once the interval has passed. */
  #flushSuppressed(): void {
    const now = this.#now();
    for (const kind of GUARD_FINDING_KINDS) {
      if (!this.#suppressed[kind] || now - this.#lastLog[kind] < this.#logIntervalMs) continue;
      this.#sources.log.warn({ kind, suppressed: this.#suppressed[kind] }, `slice guard: ${this.#suppressed[kind]} more ${kind} finding(s) (see status.guard.recent)`);
      this.#suppressed[kind] = 0;
      this.#lastLog[kind] = now;
    }
  }
}

/** An entry's identity: family and ORIG tuple (the kernel's own key, less the zone: Fish works in zone 0). */
function findingKey(family: IpVersion, o: ConntrackTuple): string {
  return `${family}/${o.protocol}/${o.src}/${o.srcPort ?? o.icmpId ?? ''}/${o.dst}/${o.dstPort ?? o.icmpType ?? ''}`;
}

function entryKey(entry: ConntrackEntry): string {
  return entry.orig ? findingKey(entry.family, entry.orig) : `${entry.family}/?/${entry.id ?? ''}`;
}

// The slice guard's logic without root or the addon: classification of entries (foreign in a slice, Fish's
// rewritten by NAT), DESTROY events of active mappings (dropped, unless re-reserved since), de-duplication
// across dumps and events, overflow resyncs, the log rate limit, explain matching and the status section.
import t, { type Test } from 'tap';
import type { FishMappingRow, NetlinkBatch } from '../../lib/native.js';
import { attrBe32, encodeMessage } from '../../lib/netlink/message.js';
import { CT_MSG, CTA, IPS, tupleAttribute, type ConntrackEntry, type ConntrackTuple } from '../../lib/netlink/conntrack.js';
import {
  classifyEntry,
  findingMatches,
  isExactSwap,
  mappingOfDestroyed,
  SliceGuard,
  slicesOf,
  type GuardSlice,
  type SliceGuardIo,
} from '../../services/fish/slice-guard.js';
import type { Registration } from '../../services/fish/registrations.js';

const MARK = 0xf15e0000;
const E = '203.0.113.7';
const E6 = '2001:db8:e::7';
const ORIGIN = '198.51.100.2';
const SLICES: GuardSlice[] = [
  { rid: 1, family: 4, egress: E, lo: 40000, hi: 40003, protocols: ['tcp', 'udp', 'icmp'] },
  { rid: 2, family: 4, egress: E, lo: 40002, hi: 40010, protocols: ['udp'] },
];

const udp = (src: string, sport: number, dst: string, dport: number): ConntrackTuple => ({ src, dst, protocol: 17, srcPort: sport, dstPort: dport });
const swap = (tuple: ConntrackTuple): ConntrackTuple => ({ ...tuple, src: tuple.dst, dst: tuple.src, srcPort: tuple.dstPort, dstPort: tuple.srcPort });
const entry = (orig: ConntrackTuple, reply: ConntrackTuple, extra: Partial<ConntrackEntry> = {}): ConntrackEntry => ({
  family: 4,
  messageType: CT_MSG.NEW,
  orig,
  reply,
  status: IPS.CONFIRMED,
  timeout: 30,
  mark: null,
  labels: null,
  tcpState: null,
  id: null,
  zone: null,
  ...extra,
});
/** notes §8's foreign entry: 10.9.9.9:5555 → origin:9000, NATed so that replies go to E:40000. */
const foreign = entry(udp('10.9.9.9', 5555, ORIGIN, 9000), udp(ORIGIN, 9000, E, 40000), { status: IPS.CONFIRMED | IPS.SRC_NAT });
const fishOrig = udp(E, 40001, ORIGIN, 9000);
const fish = entry(fishOrig, swap(fishOrig), { mark: MARK | 1 });

/** An entry as the kernel sends it in an event (or a dump). */
function message(type: number, e: ConntrackEntry): Buffer {
  const attributes = [tupleAttribute(CTA.TUPLE_ORIG, e.orig!), tupleAttribute(CTA.TUPLE_REPLY, e.reply!), attrBe32(CTA.STATUS, e.status ?? 0)];
  if (e.mark !== null) attributes.push(attrBe32(CTA.MARK, e.mark));
  return encodeMessage({ type, flags: 0, seq: 0 }, Buffer.from([2, 0, 0, 0]), attributes);
}

const row = (over: Partial<FishMappingRow> = {}): FishMappingRow => ({
  rid: 1,
  protocol: 'udp',
  family: 4,
  clientAddress: '100.64.0.2',
  clientPort: 20001,
  destinationAddress: ORIGIN,
  destinationPort: 9000,
  egressAddress: E,
  egressPort: 40001,
  packetsOut: 3,
  packetsIn: 3,
  idleMs: 200,
  ...over,
});

/** A guard over an in-memory conntrack: queued event batches, a table to dump, a table to look up. */
function harness(t: Test, options: { slices?: GuardSlice[]; mappings?: FishMappingRow[] } = {}) {
  let clock = 1_000_000;
  const batches: NetlinkBatch[] = [];
  const table: ConntrackEntry[] = [];
  const live = new Map<string, ConntrackEntry>();
  const warnings: Array<{ fields: Record<string, unknown>; msg: string }> = [];
  const calls = { dumps: 0, closed: 0, lookups: 0 };
  const io: SliceGuardIo = {
    openEvents: () => 42,
    receive: () => batches.shift() ?? { messages: [], overflow: false, more: false },
    closeEvents: () => calls.closed++,
    dump: (family) => {
      calls.dumps++;
      return table.filter((e) => e.family === family);
    },
    lookup: (tuple) => {
      calls.lookups++;
      return live.get(JSON.stringify(tuple)) ?? null;
    },
    close: () => {},
  };
  const log = {
    warn: (fields: Record<string, unknown>, msg: string) => warnings.push({ fields, msg }),
    info: () => {},
    debug: () => {},
    error: (fields: Record<string, unknown>) => t.fail(`unexpected error log ${String(fields.err)}`),
  };
  const state = { slices: options.slices ?? SLICES, mappings: options.mappings ?? [] };
  const guard = new SliceGuard(
    { io, log: log as never, slices: () => state.slices, mappings: () => state.mappings },
    { markBase: MARK, now: () => clock, rescanIntervalMs: 5_000, logIntervalMs: 10_000 },
  );
  t.teardown(() => guard.stop());
  return {
    guard,
    table,
    live,
    warnings,
    calls,
    state,
    advance: (ms: number) => (clock += ms),
    events: (...messages: Buffer[]) => batches.push({ messages, overflow: false, more: false }),
    /** A full batch: the drain reads on in the same turn. */
    fullBatch: (...messages: Buffer[]) => batches.push({ messages, overflow: false, more: true }),
    overflow: () => batches.push({ messages: [], overflow: true, more: false }),
  };
}

t.test('classification: foreign entries in a slice, Fish\'s entries rewritten, everything else ignored', (t) => {
  t.match(classifyEntry(foreign, SLICES, MARK), { kind: 'foreign', registrations: [1] }, 'a reply to E:40000 is in registration 1\'s slice');
  const both = entry(udp('10.9.9.9', 5555, ORIGIN, 9000), udp(ORIGIN, 9000, E, 40002));
  t.match(classifyEntry(both, SLICES, MARK), { kind: 'foreign', registrations: [1, 2] }, 'overlapping slices are both named');
  const tcpIn2 = entry({ ...udp(E, 40005, ORIGIN, 80), protocol: 6 }, { ...udp(ORIGIN, 80, E, 40005), protocol: 6 });
  t.equal(classifyEntry(tcpIn2, SLICES, MARK), null, 'registration 2 has no TCP: its slice does not cover TCP ports');
  const leaving = entry(udp(E, 40003, ORIGIN, 53), udp(ORIGIN, 53, E, 40003));
  t.match(classifyEntry(leaving, SLICES, MARK), { kind: 'foreign' }, 'a local socket leaving from E:40003 (original source) is foreign');
  t.equal(classifyEntry(entry(udp('10.9.9.9', 5555, ORIGIN, 9000), udp(ORIGIN, 9000, E, 39999)), SLICES, MARK), null, 'a port below the slice');
  t.equal(classifyEntry(entry(udp('10.9.9.9', 5555, ORIGIN, 9000), udp(ORIGIN, 9000, '203.0.113.8', 40000)), SLICES, MARK), null, 'another address');
  const v6 = entry(udp('fd00::9', 5555, '2001:db8:1::2', 9000), udp('2001:db8:1::2', 9000, E6, 40000), { family: 6 });
  t.equal(classifyEntry(v6, SLICES, MARK), null, 'no IPv6 slice');
  t.match(classifyEntry(v6, slicesOf([{ id: 3, egress4: null, egress6: E6, ports: [40000, 40000], protocols: ['udp'] } as unknown as Registration]), MARK), { kind: 'foreign', registrations: [3] }, 'an IPv6 slice');
  const ping = entry({ src: '10.9.9.9', dst: ORIGIN, protocol: 1, icmpId: 7, icmpType: 8, icmpCode: 0 }, { src: ORIGIN, dst: E, protocol: 1, icmpId: 40001, icmpType: 0, icmpCode: 0 });
  t.match(classifyEntry(ping, SLICES, MARK), { kind: 'foreign' }, 'an ICMP echo whose id is in the slice');

  t.equal(classifyEntry(fish, SLICES, MARK), null, 'Fish\'s own entry with an exact swap is fine');
  const natted = entry(fishOrig, udp(ORIGIN, 9000, '198.51.100.1', 4288), { mark: MARK | 1, status: IPS.CONFIRMED | IPS.SRC_NAT });
  t.match(classifyEntry(natted, SLICES, MARK), { kind: 'rewritten', registrations: [1] }, 'a NATed entry of Fish\'s is rewritten');
  const bitOnly = entry(fishOrig, swap(fishOrig), { mark: MARK | 1, status: IPS.CONFIRMED | IPS.DST_NAT });
  t.match(classifyEntry(bitOnly, SLICES, MARK), { kind: 'rewritten' }, 'the DST_NAT bit alone is enough');
  const otherBase = entry(udp('10.9.9.9', 5555, ORIGIN, 9000), udp(ORIGIN, 9000, E, 40000), { mark: 0x12340001 });
  t.match(classifyEntry(otherBase, SLICES, MARK), { kind: 'foreign' }, 'another mark is not Fish\'s');
  t.ok(isExactSwap(fishOrig, swap(fishOrig)));
  t.notOk(isExactSwap(fishOrig, { ...swap(fishOrig), dstPort: 40002 }));
  t.end();
});

t.test('DESTROY of an active mapping: matched by its egress tuple and registration', (t) => {
  const rows = [row(), row({ egressPort: 40002, clientPort: 20002 })];
  t.equal(mappingOfDestroyed(fish, rows, MARK), rows[0]);
  t.equal(mappingOfDestroyed(entry(fishOrig, swap(fishOrig), { mark: MARK | 2 }), rows, MARK), undefined, 'another registration');
  t.equal(mappingOfDestroyed(foreign, rows, MARK), undefined, 'not Fish\'s');
  t.end();
});

t.test('the guard: start dump, events, de-duplication, rescans when slices change, overflow', (t) => {
  const h = harness(t);
  h.table.push(foreign, fish);
  h.guard.start({ timer: false });
  t.equal(h.calls.dumps, 1, 'one dump at start (IPv4 only: no IPv6 slice)');
  t.match(h.guard.counts(), { foreign: 1, rewritten: 0, dropped: 0 });
  t.equal(h.warnings.length, 1, 'one warning');
  t.match(h.warnings[0]!.msg, /slice guard: foreign: .*udp 10\.9\.9\.9:5555 → 198\.51\.100\.2:9000.*registration 1/);
  t.match(h.guard.recent()[0], { kind: 'foreign', source: 'dump', registrations: [1], reply: { dst: E, dstPort: 40000 } });

  h.events(message(CT_MSG.NEW, foreign));
  h.guard.tick();
  t.equal(h.guard.counts().foreign, 1, 'the same entry seen again as an event is not counted twice');

  h.guard.slicesChanged();
  h.advance(1000);
  h.guard.tick();
  t.equal(h.calls.dumps, 1, 'a rescan waits for the rescan interval');
  h.advance(5000);
  h.guard.tick();
  t.equal(h.calls.dumps, 2, 'then it runs');
  t.equal(h.guard.counts().foreign, 1, 'and reports nothing twice');

  h.events(message(CT_MSG.DELETE, foreign));
  h.guard.tick();
  t.match(h.guard.status(), { current: { foreign: 0 } }, 'a DESTROY forgets it');
  const natted = entry(udp(E, 40002, ORIGIN, 9001), udp(ORIGIN, 9001, '198.51.100.1', 61000), { mark: MARK | 1, status: IPS.CONFIRMED | IPS.SRC_NAT });
  h.events(message(CT_MSG.NEW, foreign), message(CT_MSG.NEW, natted));
  h.guard.tick();
  t.match(h.guard.counts(), { foreign: 2, rewritten: 1 }, 'it comes back: reported again; a NATed entry of Fish\'s reported');
  t.equal(h.warnings.length, 2, 'the second foreign warning is held back by the rate limit, the rewritten one is not');
  h.advance(10_000);
  h.guard.tick();
  t.match(h.warnings.at(-1), { fields: { kind: 'foreign', suppressed: 1 } }, 'the suppressed one is summed up once the interval passed');

  h.overflow();
  h.advance(5000);
  h.guard.tick();
  t.equal(h.calls.dumps, 3, 'an overflow makes it dump again');
  t.match(h.guard.status(), { overflows: 1, running: true, findings: { foreign: 2, rewritten: 1, dropped: 0 } });
  t.ok(h.warnings.some((w) => /events were lost/.test(w.msg)), 'and says events were lost');

  h.guard.stop();
  t.equal(h.calls.closed, 1, 'stop closes the event socket');
  t.notOk(h.guard.running);
  t.end();
});

t.test('the guard: dropped entries of active mappings, unless idle or re-reserved since', (t) => {
  const h = harness(t, { mappings: [row({ idleMs: 200 }), row({ egressPort: 40002, clientPort: 20002, idleMs: 60_000 }), row({ egressPort: 40003, clientPort: 20003, idleMs: 100 })] });
  h.guard.start({ timer: false });
  const idle = entry(udp(E, 40002, ORIGIN, 9000), udp(ORIGIN, 9000, E, 40002), { mark: MARK | 1 });
  const again = entry(udp(E, 40003, ORIGIN, 9000), udp(ORIGIN, 9000, E, 40003), { mark: MARK | 1 });
  h.live.set(JSON.stringify(again.orig), again);
  h.events(message(CT_MSG.DELETE, fish), message(CT_MSG.DELETE, idle), message(CT_MSG.DELETE, again), message(CT_MSG.DELETE, foreign));
  h.guard.tick();
  t.equal(h.guard.counts().dropped, 1, 'only the active, not re-reserved mapping is reported');
  t.equal(h.calls.lookups, 2, 'looked up again before reporting (DESTROY events can be late)');
  t.match(h.guard.recent().at(-1), { kind: 'dropped', registrations: [1], orig: { src: E, srcPort: 40001 } });
  t.match(h.warnings.at(-1)!.msg, /dropped: registration 1's entry udp 203\.0\.113\.7:40001 → 198\.51\.100\.2:9000 was destroyed while its flow was active/);

  const flow = { protocol: 'udp' as const, address: E, port: 40001, destinationAddress: ORIGIN, destinationPort: 9000 };
  t.match(h.guard.findingFor(flow), { kind: 'dropped' }, 'explain finds it by the egress tuple');
  t.equal(h.guard.findingFor({ ...flow, port: 40009 }), undefined);
  t.end();
});

t.test('explain matching: by the reply destination or the original source', (t) => {
  const h = harness(t);
  h.table.push(foreign);
  h.guard.start({ timer: false });
  const finding = h.guard.recent()[0]!;
  t.ok(findingMatches(finding, { protocol: 'udp', address: E, port: 40000, destinationAddress: ORIGIN, destinationPort: 9000 }), 'the egress tuple the entry holds');
  t.ok(findingMatches(finding, { protocol: 'udp', address: '10.9.9.9', port: 5555, destinationAddress: ORIGIN, destinationPort: 9000 }), 'the entry\'s own original tuple');
  t.notOk(findingMatches(finding, { protocol: 'tcp', address: E, port: 40000, destinationAddress: ORIGIN, destinationPort: 9000 }), 'another protocol');
  t.notOk(findingMatches(finding, { protocol: 'udp', address: E, port: 40000, destinationAddress: ORIGIN, destinationPort: 9001 }), 'another destination port');
  t.end();
});

t.test('slices of registrations, and a guard with no slices dumps nothing', (t) => {
  const registrations = [{ id: 1, egress4: E, egress6: E6, ports: [40000, 40999], protocols: ['udp'] }] as unknown as Registration[];
  t.same(slicesOf(registrations), [
    { rid: 1, family: 4, egress: E, lo: 40000, hi: 40999, protocols: ['udp'] },
    { rid: 1, family: 6, egress: E6, lo: 40000, hi: 40999, protocols: ['udp'] },
  ]);
  const h = harness(t, { slices: [] });
  h.table.push(foreign);
  h.guard.start({ timer: false });
  t.equal(h.calls.dumps, 0);
  t.equal(h.guard.counts().foreign, 0);
  t.end();
});

t.test('a successor restores the snapshot: counts go on, entries already reported are not reported again', (t) => {
  const before = harness(t);
  before.table.push(foreign);
  before.guard.start({ timer: false });
  const snapshot = JSON.parse(JSON.stringify(before.guard.snapshot())) as ReturnType<SliceGuard['snapshot']>;
  before.guard.stop();
  t.match(snapshot, { counts: { foreign: 1 }, current: [{ kind: 'foreign' }], recent: [{ kind: 'foreign' }] });

  const after = harness(t);
  after.table.push(foreign);
  after.guard.restore(snapshot);
  after.guard.start({ timer: false });
  t.match(after.guard.counts(), { foreign: 1 }, 'the start dump finds the same entry: not counted again');
  t.equal(after.warnings.length, 0, 'nor logged again');
  t.match(after.guard.recent(), [{ kind: 'foreign', id: 1 }], 'the recent findings came along');
  after.events(message(CT_MSG.DELETE, fish), message(CT_MSG.NEW, entry(udp('10.9.9.9', 6666, ORIGIN, 9000), udp(ORIGIN, 9000, E, 40001))));
  after.guard.tick();
  t.match(after.guard.recent().at(-1), { kind: 'foreign', id: 2 }, 'ids go on from the predecessor\'s');

  const gone = harness(t);
  gone.guard.restore(snapshot);
  gone.guard.start({ timer: false });
  t.match(gone.guard.status(), { current: { foreign: 0 }, findings: { foreign: 1 } }, 'an entry gone since is forgotten (and would be reported again if it came back)');
  t.end();
});

t.test('a full batch is followed by another read in the same turn', (t) => {
  const h = harness(t);
  h.guard.start({ timer: false });
  const second = entry(udp('10.9.9.9', 6666, ORIGIN, 9000), udp(ORIGIN, 9000, E, 40001));
  h.fullBatch(message(CT_MSG.NEW, foreign));
  h.events(message(CT_MSG.NEW, second));
  h.guard.tick();
  t.equal(h.guard.counts().foreign, 2, 'both batches were read in one turn');
  t.match(h.guard.status(), { events: 2 });
  t.end();
});

// The slice guard end to end (issue #6 item 4), in the topology of notes/fish-kernel.md §10 with Fish in a
// "host" namespace the test made (never the machine's own): a foreign conntrack entry already holds a port of
// a small slice toward the origin's UDP port, and the host has a masquerade rule that would remap Fish's
// flows if they were not reserved. Fish skips the foreign port, the guard reports the entry (log, status,
// metric, explain), none of Fish's entries is rewritten, and deleting an active entry of Fish's is reported
// as dropped.
import { execFileSync } from 'node:child_process';
import t from 'tap';
import { FishClient } from '../../lib/client/fish.js';
import { loadNative } from '../../lib/native.js';
import { isRunning } from '../../lib/process.js';
import { clientRelay, EGRESS4, fishTopology, hostExec, HOST4, ORIGIN4, ORIGIN_UDP_PORTS, startDaemonInHost, startOrigin, udpRequestIn } from '../helpers/fish-topology.js';
import { eventually } from '../helpers/native-helpers.js';

const binding = loadNative();
const SLICE: [number, number] = [40000, 40003];
const FOREIGN_PORT = 40000;
const MARK = 0xf15e0001;

const notRoot = process.getuid?.() === 0 ? false : 'Fish needs root: network namespaces, a tun, rules and conntrack';

/** The tuples of `conntrack -L` lines: the first src/dst/sport/dport group is ORIG, the second REPLY. */
function parseConntrack(text: string): Array<{ orig: Record<string, string>; reply: Record<string, string>; line: string }> {
  return text
    .split('\n')
    .filter((line) => line.includes('src='))
    .map((line) => {
      const pairs = [...line.matchAll(/(src|dst|sport|dport)=(\S+)/g)].map((m) => [m[1]!, m[2]!] as const);
      return { orig: Object.fromEntries(pairs.slice(0, 4)), reply: Object.fromEntries(pairs.slice(4, 8)), line };
    });
}

t.test('slice guard: a foreign entry in the slice is skipped and reported, nothing of Fish\'s is rewritten by host NAT, a deleted entry is reported dropped', { skip: notRoot }, async (t) => {
  const topology = fishTopology(t, binding);
  const origin = await startOrigin(topology, { fileMiB: 1 });
  const [originAddress, originPort] = [ORIGIN4[0], ORIGIN_UDP_PORTS[0]];

  // notes §8: a foreign entry whose replies go to E:40000 (as if a NAT had mapped 10.9.9.9:5555 there), made
  // before Fish starts; and a host masquerade rule, which rewrites any unreserved flow to the host's address.
  hostExec(topology, ['conntrack', '-I', '-p', 'udp', '-s', '10.9.9.9', '-d', originAddress, '--sport', '5555', '--dport', String(originPort),
    '--reply-src', originAddress, '--reply-dst', EGRESS4, '--reply-port-src', String(originPort), '--reply-port-dst', String(FOREIGN_PORT), '-t', '600']);
  t.match(hostExec(topology, ['conntrack', '-L', '-f', 'ipv4', '-p', 'udp']), new RegExp(`dst=${EGRESS4.replace(/\./g, '\\.')} sport=${originPort} dport=${FOREIGN_PORT}`), 'the foreign entry is in the host\'s table');
  hostExec(topology, ['nft', 'add', 'table', 'ip', 'hostnat']);
  hostExec(topology, ['nft', 'add', 'chain', 'ip', 'hostnat', 'post', '{ type nat hook postrouting priority 100; }']);
  hostExec(topology, ['nft', 'add', 'rule', 'ip', 'hostnat', 'post', 'masquerade']);

  const daemon = await startDaemonInHost(topology, 'fish', ['--guard-rescan-interval', '200', '--registration-grace', '500']);
  const relay = clientRelay(topology);
  const client = new FishClient({ owner: 'edge', path: daemon.socket, binding });
  t.teardown(() => client.close());
  await client.connect();
  await client.register(relay.releaseFd(), { id: 1, egress4: EGRESS4, ports: SLICE, protocols: ['udp'] });

  // The registration's slice now covers the foreign entry: the guard's rescan finds it.
  const logged = await daemon.waitForLog((line) => typeof line.msg === 'string' && line.msg.startsWith('slice guard: foreign'), 10_000);
  t.match(logged, { level: 'warn', guard: { kind: 'foreign', source: 'dump', registrations: [1], reply: { dst: EGRESS4, dstPort: FOREIGN_PORT } } }, 'the guard logged the foreign entry as a warning');

  // Three flows from the client to one destination: with 40000 held, they must take 40001..40003.
  const localPorts = [20001, 20002, 20003];
  for (const localPort of localPorts) {
    const answer = await udpRequestIn(topology.client, originAddress, originPort, { count: 2, localPort });
    t.equal(answer.matched, 2, `the flow from client port ${localPort} is answered`);
  }
  const seen = origin.seen.filter((line) => line.event === 'udp' && line.local === originAddress && line.localPort === originPort);
  t.ok(seen.length >= 6, `the origin saw the datagrams (${seen.length})`);
  t.same([...new Set(seen.map((line) => line.remote))], [EGRESS4], `the origin saw only the egress address, never the host's ${HOST4} (no masquerade)`);
  const ports = [...new Set(seen.map((line) => line.remotePort as number))].sort();
  t.same(ports, [40001, 40002, 40003], 'the three flows left from the three free ports; the foreign one was skipped');

  // Fish's entries: every REPLY is the exact swap of its ORIG (nothing rewritten by the masquerade rule).
  const ours = parseConntrack(hostExec(topology, ['conntrack', '-L', '-f', 'ipv4', '-m', `${MARK}/${0xffffffff}`]));
  t.equal(ours.length, 3, 'three entries of Fish\'s');
  for (const { orig, reply, line } of ours) {
    t.same(
      [reply.src, reply.dst, reply.sport, reply.dport],
      [orig.dst, orig.src, orig.dport, orig.sport],
      `exact swap: ${line.replace(/\s+/g, ' ').trim()}`,
    );
    t.equal(orig.src, EGRESS4);
  }

  const status = JSON.parse(execFileSync(process.execPath, ['--import', 'tsx', 'services/cli.ts', 'ctl', 'fish', 'status', '--json', '--socket', daemon.socket], { encoding: 'utf8' })) as {
    guard: { running: boolean; findings: Record<string, number>; recent: Array<Record<string, unknown>> };
  };
  t.match(status.guard, { running: true, findings: { foreign: 1, rewritten: 0, dropped: 0 } }, 'status: one foreign entry, nothing rewritten or dropped');
  t.match(status.guard.recent, [{ kind: 'foreign', orig: { src: '10.9.9.9', srcPort: 5555 }, reply: { dst: EGRESS4, dstPort: FOREIGN_PORT } }], 'status lists the finding with its tuples');
  const metrics = () => execFileSync(process.execPath, ['--import', 'tsx', 'services/cli.ts', 'ctl', 'fish', 'metrics', '--socket', daemon.socket], { encoding: 'utf8' });
  t.match(metrics(), /fdferry_fish_guard_findings_total\{kind="foreign"[^}]*\} 1\b/, 'the metric counts it');
  t.match(metrics(), /fdferry_fish_guard_findings_total\{kind="rewritten"[^}]*\} 0\b/, 'and no rewritten entry');

  const explained = await client.explain({ protocol: 'udp', address: EGRESS4, port: FOREIGN_PORT, destinationAddress: originAddress, destinationPort: originPort });
  t.match(explained, { verdict: 'foreign', entry: { kind: 'foreign', orig: { src: '10.9.9.9' } } }, 'explain names the foreign entry holding the tuple');

  // Dropped: refresh one flow, then delete its entry behind Fish's back while the mapping is active.
  const again = await udpRequestIn(topology.client, originAddress, originPort, { count: 1, localPort: localPorts[0] });
  t.equal(again.matched, 1);
  const mapping = (await client.mappings(1)).find((m) => m.clientPort === localPorts[0]);
  t.ok(mapping, 'the flow\'s mapping');
  hostExec(topology, ['conntrack', '-D', '-p', 'udp', '-s', EGRESS4, '--sport', String(mapping!.egressPort), '-d', originAddress, '--dport', String(originPort)]);
  const dropped = await daemon.waitForLog((line) => typeof line.msg === 'string' && line.msg.startsWith('slice guard: dropped'), 10_000);
  t.match(dropped, { guard: { kind: 'dropped', registrations: [1], orig: { src: EGRESS4, srcPort: mapping!.egressPort } } }, 'the guard reported the deleted entry as dropped');
  t.ok(await eventually(() => /fdferry_fish_guard_findings_total\{kind="dropped"[^}]*\} 1\b/.test(metrics()), 5000), 'and counted it');

  // Why it matters, and proof the masquerade rule is live: the flow's next datagram is tracked unreserved, so
  // the host NATs it to its own address; the guard sees that entry as a foreign one holding the slice's port.
  await udpRequestIn(topology.client, originAddress, originPort, { count: 1, localPort: localPorts[0], perRequestTimeoutMs: 1500 });
  const natted = await origin.waitFor((line) => line.event === 'udp' && line.remote === HOST4, 5000);
  t.ok(natted, `unreserved, the datagram reached the origin from the host's address ${HOST4}:${String(natted.remotePort)}`);
  t.ok(await eventually(() => /fdferry_fish_guard_findings_total\{kind="foreign"[^}]*\} 2\b/.test(metrics()), 5000), 'the guard counted the unreserved entry in the slice as a second foreign one');
  const later = JSON.parse(execFileSync(process.execPath, ['--import', 'tsx', 'services/cli.ts', 'ctl', 'fish', 'status', '--json', '--socket', daemon.socket], { encoding: 'utf8' })) as { guard: { recent: Array<Record<string, unknown>> } };
  t.match(later.guard.recent.at(-1), { kind: 'foreign', source: 'event', orig: { src: EGRESS4, srcPort: mapping!.egressPort } }, 'from the NEW event of an entry without Fish\'s mark, leaving from the slice');

  // A hand-over: the predecessor closes its guard, the successor starts its own and carries the counts on.
  const ctlJson = (args: string[]) => JSON.parse(execFileSync(process.execPath, ['--import', 'tsx', 'services/cli.ts', 'ctl', 'fish', ...args, '--json', '--socket', daemon.socket], { encoding: 'utf8', timeout: 60_000 })) as Record<string, unknown>;
  const reload = ctlJson(['reload']);
  const successor = Number(reload.newPid);
  // The successor is the old daemon's child, not ours to reap: stop it by its pid (ours: we caused it) at teardown.
  t.teardown(async () => {
    if (successor > 0 && isRunning(successor)) {
      process.kill(successor, 'SIGKILL');
      await eventually(() => !isRunning(successor), 5000);
    }
  });
  t.match(reload, { ok: true, oldPid: daemon.pid, tasks: 1 }, `handed over to pid ${successor}`);
  t.equal(await daemon.exited, 0, 'the predecessor exited cleanly');
  const afterHandover = ctlJson(['status']) as { pid: number; guard: Record<string, unknown> };
  t.match(afterHandover, { pid: successor, guard: { running: true, findings: { foreign: 2, rewritten: 0, dropped: 1 } } }, 'the successor runs its own guard, with the counts carried over');

  process.kill(successor, 'SIGTERM');
  t.ok(await eventually(() => !isRunning(successor), 15_000), 'the successor stopped on SIGTERM');
  t.notOk(daemon.logs.some((line) => typeof line.msg === 'string' && /slice guard: rewritten|slice guard could not start|conntrack could not be read/.test(line.msg)), 'no rewritten finding and no guard error all along');
  t.notMatch(hostExec(topology, ['conntrack', '-L', '-m', `${0xf15e0000}/${0xffff0000}`]), /src=/, 'the stop flushed Fish\'s entries');
});

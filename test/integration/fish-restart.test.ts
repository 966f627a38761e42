// Fish's restarts, end to end (notes/fish-kernel.md §9): a live TCP connection and a UDP flow keep their egress
// ports across a SIGHUP hand-over (no gap) and across SIGKILL plus a cold start, where the new Fish rebuilds
// its mappings from conntrack and the proxy's FishClient registers the same id with the same socket again.
// Everything runs in namespaces the test made; the "host" stands in for the machine's own.
import t from 'tap';
import { FishClient, type RegisterResult } from '../../lib/client/fish.js';
import { loadNative } from '../../lib/native.js';
import { HeldFlows } from '../helpers/bumblebee-topology.js';
import { cliCommand, tempDir } from '../helpers/daemon.js';
import { clientRelay, EGRESS4, EGRESS6, fishTopology, hostExec, ORIGIN4, ORIGIN6, ORIGIN_TCP_ECHO_PORT, ORIGIN_UDP_PORTS, startDaemonInHost, startOrigin, udpRequestIn, type FishOrigin } from '../helpers/fish-topology.js';
import { eventually } from '../helpers/native-helpers.js';
import { alive, Generations, reload } from '../helpers/restart.js';

const binding = loadNative();
const notRoot = process.getuid?.() === 0 ? false : 'Fish needs root: network namespaces, a tun, rules and conntrack';
const UDP_LOCAL_PORT = 31_000;

/** The egress port the origin saw on the latest datagram from our UDP flow (of one family). */
function lastUdpPort(origin: FishOrigin, family: 4 | 6 = 4): number | undefined {
  const [egress, to] = family === 4 ? [EGRESS4, ORIGIN4[0]] : [EGRESS6, ORIGIN6[0]];
  const lines = origin.seen.filter((line) => line.event === 'udp' && line.remote === egress && line.local === to && line.localPort === ORIGIN_UDP_PORTS[0]);
  return lines.at(-1)?.remotePort as number | undefined;
}

/** One UDP request/response on the long-lived IPv6 flow. */
const udp6 = (topology: Parameters<typeof udpRequestIn>[0]) => udpRequestIn(topology, ORIGIN6[0], ORIGIN_UDP_PORTS[0], { count: 1, localPort: UDP_LOCAL_PORT + 1 });

t.test('a TCP connection and a UDP flow keep their egress ports across SIGHUP and across SIGKILL plus a cold start', { skip: notRoot }, async (t) => {
  const topology = fishTopology(t, binding);
  const origin = await startOrigin(topology, { fileMiB: 1 });
  const dir = tempDir(t);
  const args = ['--port-range', '40000-40999', '--restart-grace', '60000', '--registration-grace', '30000'];
  const first = await startDaemonInHost(topology, 'fish', args, { dir });
  const generations = new Generations(t, first.pid);
  const relay = clientRelay(topology);
  const client = new FishClient({ owner: 'edge', path: first.socket, binding, requestTimeoutMs: 10_000 });
  t.teardown(() => client.close());
  const reregistered: RegisterResult[] = [];
  client.on('reregistered', (result) => reregistered.push(result));
  client.on('error', (error) => t.comment(`FishClient: ${error.message}`));
  await client.connect();
  await client.register(relay.releaseFd(), { id: 9, egress4: EGRESS4, egress6: EGRESS6, ports: [40000, 40999], client6Prefix: 'fd00:64::/64' });

  const held = new HeldFlows(t, topology.client as never, ['--target', `${ORIGIN4[0]}:${ORIGIN_TCP_ECHO_PORT}`, '--count', '1']);
  t.match(await held.ready(), { ready: 1 }, 'a TCP connection is open through Fish');
  const tcp = await origin.waitFor((line) => line.event === 'tcp' && line.remote === EGRESS4);
  const tcpPort = tcp.remotePort as number;
  t.ok(tcpPort >= 40000 && tcpPort <= 40999, `the origin sees the connection from ${EGRESS4}:${tcpPort}`);
  t.equal((await udpRequestIn(topology.client, ORIGIN4[0], ORIGIN_UDP_PORTS[0], { count: 2, localPort: UDP_LOCAL_PORT })).matched, 2, 'the UDP flow is answered');
  const udpPort = lastUdpPort(origin);
  t.ok(udpPort && udpPort >= 40000 && udpPort <= 40999, `the UDP flow leaves from ${EGRESS4}:${String(udpPort)}`);
  t.equal((await udp6(topology.client)).matched, 1, 'an IPv6 UDP flow is answered');
  const udp6Port = lastUdpPort(origin, 6);
  t.ok(udp6Port, `it leaves from [${EGRESS6}]:${String(udp6Port)}`);

  // SIGHUP: a hand-over to a successor, the registration and its mappings carried in the state memfd.
  const { report } = await reload('fish', first.socket);
  t.ok(report.ok && report.newPid, `the hand-over succeeded: ${JSON.stringify(report.failure ?? { tasks: report.tasks, pauseMs: report.pauseMs })}`);
  generations.add(report.newPid!);
  t.ok(await eventually(() => !alive(first.pid), 10_000), 'the old generation exited');
  t.match(await held.ping(), { pinged: 1, failed: 0 }, 'the TCP connection echoes right after the hand-over');
  t.equal((await udpRequestIn(topology.client, ORIGIN4[0], ORIGIN_UDP_PORTS[0], { count: 2, localPort: UDP_LOCAL_PORT })).matched, 2, 'the UDP flow is answered after the hand-over');
  t.equal(lastUdpPort(origin), udpPort, 'and still leaves from the same egress port');
  t.equal(origin.seen.filter((line) => line.event === 'tcp' && line.remote === EGRESS4).length, 1, 'no new TCP connection was made');

  // SIGKILL: the tun, rules and reservations outlive the process; a cold start rebuilds the mappings.
  process.kill(generations.current, 'SIGKILL');
  t.ok(await eventually(() => !alive(generations.current), 10_000), 'the live generation is gone');
  t.match(hostExec(topology, ['ip', 'link', 'show', 'fish0']), /fish0/, 'the persistent tun survived the crash');
  const second = await startDaemonInHost(topology, 'fish', args, { dir });
  generations.add(second.pid);
  await second.waitForLog((line) => line.msg === 'Fish ready', 20_000);
  t.ok(await eventually(() => reregistered.length > 0, 20_000), 'the client registered the same id again on reconnect');
  t.match(reregistered[0], { id: 9, resumed: true }, 'and got its mappings back');
  t.ok((reregistered[0]?.mappings ?? 0) >= 3, `mappings rebuilt from conntrack: ${String(reregistered[0]?.mappings)}`);
  t.match(await held.ping(), { pinged: 1, failed: 0 }, 'the TCP connection echoes after the crash and cold start');
  t.equal((await udpRequestIn(topology.client, ORIGIN4[0], ORIGIN_UDP_PORTS[0], { count: 2, localPort: UDP_LOCAL_PORT })).matched, 2, 'the UDP flow is answered after the cold start');
  t.equal(lastUdpPort(origin), udpPort, 'and still leaves from the same egress port');
  t.equal((await udp6(topology.client)).matched, 1, 'the IPv6 UDP flow is answered after the cold start');
  t.equal(lastUdpPort(origin, 6), udp6Port, 'from the same egress port: its mapping was rebuilt with the registration\'s /64');
  t.equal(origin.seen.filter((line) => line.event === 'tcp' && line.remote === EGRESS4).length, 1, 'still the one TCP connection');
  const totals = await held.close();
  t.match(totals, { resets: 0 }, `no connection was reset: ${JSON.stringify(totals)}`);

  // After a crash, `fdferry fish cleanup` removes what the dead process left (a clean stop is fish-egress's).
  second.kill('SIGKILL');
  await second.exited;
  const { command, args: cli } = cliCommand();
  const cleanup = hostExec(topology, [command, ...cli, 'fish', 'cleanup']);
  t.match(cleanup, /removed .*rule\(s\).*the nftables table inet fishct.*the tun fish0/, `cleanup names what it removed: ${cleanup.trim()}`);
  t.notMatch(hostExec(topology, ['ip', 'rule', 'show']) + hostExec(topology, ['ip', '-6', 'rule', 'show']), /lookup 4242/, 'no rule left');
  t.notMatch(hostExec(topology, ['ip', 'link', 'show']), /fish0/, 'no tun left');
  t.notMatch(hostExec(topology, ['nft', 'list', 'ruleset']), /fishct/, 'no nftables table left');
  t.notMatch(hostExec(topology, ['conntrack', '-L', '-m', `${0xf15e0000}/${0xffff0000}`]), /src=/, 'no conntrack entry of Fish\'s left');
});

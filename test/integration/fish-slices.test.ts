// Fish with several registrations on one egress address: three clients with the same private address and
// the same source ports, with disjoint and overlapping slices, all work and every five-tuple the origin sees is
// distinct; an ICMP port unreachable from the origin reaches the client as a connection refusal. Namespaces
// only, made by the test.
import t from 'tap';
import { FishClient } from '../../lib/client/fish.js';
import { loadNative } from '../../lib/native.js';
import {
  addClient,
  clientRelay,
  EGRESS4,
  fishTopology,
  hostExec,
  ORIGIN4,
  ORIGIN_TCP_ECHO_PORT,
  ORIGIN_UDP_PORTS,
  runInClient,
  startDaemonInHost,
  startOrigin,
  tcpFlowClientIn,
  udpRequestIn,
} from '../helpers/fish-topology.js';

const binding = loadNative();
const notRoot = process.getuid?.() === 0 ? false : 'Fish needs root: network namespaces, a tun, rules and conntrack';

t.test('three registrations, one client address and port, disjoint and overlapping slices: all distinct, all answered', { skip: notRoot }, async (t) => {
  const topology = fishTopology(t, binding);
  const origin = await startOrigin(topology, { fileMiB: 1 });
  const daemon = await startDaemonInHost(topology, 'fish', ['--port-range', '40000-40999']);
  const slices: Array<[number, number]> = [
    [40000, 40009],
    [40010, 40019],
    [40005, 40014],
  ];
  const clients = [topology.client, addClient(topology), addClient(topology)];
  for (const [i, namespace] of clients.entries()) {
    const relay = clientRelay(topology, { client: namespace });
    const fish = new FishClient({ owner: `proxy-${i + 1}`, path: daemon.socket, binding });
    t.teardown(() => fish.close());
    await fish.register(relay.releaseFd(), { id: i + 1, egress4: EGRESS4, ports: slices[i]! });
  }

  // The same client tuple (100.64.0.2:5000 -> origin:9000) from all three, twice each.
  for (const namespace of clients) {
    const answer = await udpRequestIn(namespace, ORIGIN4[0], ORIGIN_UDP_PORTS[0], { count: 2, localPort: 5000 });
    t.equal(answer.matched, 2, `${namespace.name}: answered`);
  }
  // And the same TCP tuple (local port 6000) from all three.
  for (const namespace of clients) {
    const echo = await tcpFlowClientIn(namespace, ['echo', '--target', `${ORIGIN4[0]}:${ORIGIN_TCP_ECHO_PORT}`, '--count', '1', '--bytes', '4096', '--local-port-base', '6000']);
    t.match(echo, { ok: 1, failed: 0 }, `${namespace.name}: TCP echo intact`);
  }

  const udp = origin.seen.filter((line) => line.event === 'udp' && line.remote === EGRESS4);
  const udpPorts = [...new Set(udp.map((line) => line.remotePort as number))];
  t.equal(udpPorts.length, 3, `three distinct UDP egress ports for one client tuple: ${udpPorts.join(', ')}`);
  const tcp = origin.seen.filter((line) => line.event === 'tcp' && line.remote === EGRESS4);
  const tcpPorts = [...new Set(tcp.map((line) => line.remotePort as number))];
  t.equal(tcpPorts.length, 3, `three distinct TCP egress ports: ${tcpPorts.join(', ')}`);

  // Each registration's ports are inside its own slice: read them from conntrack by each one's mark.
  for (const [i, [lo, hi]] of slices.entries()) {
    const entries = hostExec(topology, ['conntrack', '-L', '-f', 'ipv4', '-m', `${(0xf15e0000 | (i + 1)) >>> 0}/${0xffffffff}`]);
    const ports = [...entries.matchAll(/src=203\.0\.113\.7 dst=198\.51\.100\.2 sport=(\d+)/g)].map((match) => Number(match[1]));
    t.ok(ports.length >= 2 && ports.every((port) => port >= lo && port <= hi), `registration ${i + 1}: egress ports ${ports.join(', ')} inside ${lo}-${hi}`);
  }
});

t.test('an ICMP port unreachable from the origin reaches the client as a connection refusal', { skip: notRoot }, async (t) => {
  const topology = fishTopology(t, binding);
  await startOrigin(topology, { fileMiB: 1 });
  const daemon = await startDaemonInHost(topology, 'fish', ['--port-range', '40000-40999']);
  const relay = clientRelay(topology);
  const fish = new FishClient({ owner: 'proxy', path: daemon.socket, binding });
  t.teardown(() => fish.close());
  await fish.register(relay.releaseFd(), { id: 1, egress4: EGRESS4, ports: [40000, 40999] });
  // Nothing listens on 9999 at the origin: its kernel answers with port unreachable, quoting Fish's egress tuple.
  const probe = [
    'import socket',
    's = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)',
    `s.connect(("${ORIGIN4[0]}", 9999))`,
    's.settimeout(5)',
    'try:',
    '    s.send(b"anyone?")',
    '    s.recv(100)',
    '    print("answered")',
    'except ConnectionRefusedError:',
    '    print("refused")',
    'except socket.timeout:',
    '    print("timeout")',
  ].join('\n');
  const result = await runInClient(topology.client, 'python3', ['-c', probe], { timeoutMs: 15_000 });
  t.equal(result.stdout.trim(), 'refused', `the client saw ECONNREFUSED ${result.stderr}`);
});

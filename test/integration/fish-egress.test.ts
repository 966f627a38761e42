// Fish as a daemon, end to end, in the topology of notes/fish-kernel.md §10: a client namespace whose tun
// the native on-ramp relays into one packet socket per registration, Fish in a "host" namespace the test
// created (never the machine's own), and an origin behind a veth. Real curl, UDP and ping clients; the origin
// reports what source address and port it saw; conntrack, rules and the tun are inspected in the host.
import { execFileSync } from 'node:child_process';
import t from 'tap';
import { FishClient, type ExhaustedEvent } from '../../lib/client/fish.js';
import { loadNative } from '../../lib/native.js';
import {
  addClient,
  clientRelay,
  curlIn,
  EGRESS4,
  EGRESS6,
  fishTopology,
  hostExec,
  ORIGIN4,
  ORIGIN6,
  ORIGIN_HTTP_PORT,
  ORIGIN_UDP_PORTS,
  pingIn,
  startDaemonInHost,
  startOrigin,
  udpRequestIn,
} from '../helpers/fish-topology.js';
import { eventually } from '../helpers/native-helpers.js';

const binding = loadNative();
const SLICE: [number, number] = [40000, 40999];

const notRoot = process.getuid?.() === 0 ? false : 'Fish needs root: network namespaces, a tun, rules and conntrack';

{
  t.test('Fish end to end: TCP, UDP and ping over IPv4 and IPv6 from the slice; exhaustion; a clean stop leaves nothing', { skip: notRoot }, async (t) => {
    const topology = fishTopology(t, binding);
    const origin = await startOrigin(topology, { fileMiB: 8 });
    const daemon = await startDaemonInHost(topology, 'fish', ['--port-range', '40000-41999', '--registration-grace', '500', '--audit']);
    const relay = clientRelay(topology);
    const client = new FishClient({ owner: 'edge', path: daemon.socket, binding });
    t.teardown(() => client.close());
    const exhausted: ExhaustedEvent[] = [];
    client.on('exhausted', (event) => exhausted.push(event));
    await client.connect();
    const registered = await client.register(relay.releaseFd(), { id: 1, egress4: EGRESS4, egress6: EGRESS6, ports: SLICE });
    t.match(registered, { id: 1, egress4: EGRESS4, egress6: EGRESS6, ports: SLICE, protocols: ['tcp', 'udp', 'icmp'], mappings: 0, resumed: false });

    const rules = hostExec(topology, ['ip', 'rule', 'show']) + hostExec(topology, ['ip', '-6', 'rule', 'show']);
    t.match(rules, new RegExp(`to ${EGRESS4} ipproto udp dport 40000-40999 lookup 4242`), 'the IPv4 UDP rule covers the slice');
    t.match(rules, new RegExp(`to ${EGRESS6} ipproto tcp dport 40000-40999 lookup 4242`), 'the IPv6 TCP rule covers the slice');
    t.match(rules, new RegExp(`to ${EGRESS4} ipproto icmp lookup 4242`), 'ICMP for the egress address reaches the tun');

    const inSlice = (port: unknown) => typeof port === 'number' && port >= SLICE[0] && port <= SLICE[1];
    for (const [family, originAddress, egress] of [
      [4, ORIGIN4[0], EGRESS4],
      [6, ORIGIN6[0], EGRESS6],
    ] as const) {
      const url = family === 4 ? `http://${originAddress}:${ORIGIN_HTTP_PORT}/file` : `http://[${originAddress}]:${ORIGIN_HTTP_PORT}/file`;
      const download = await curlIn(topology.client, url);
      t.equal(download.code, 0, `IPv${family}: curl succeeded ${download.stderr}`);
      t.equal(download.sha256, origin.file.sha256, `IPv${family}: the downloaded file hashes as the origin's (${download.bytes} bytes)`);
      const http = await origin.waitFor((line) => line.event === 'http' && line.remote === egress);
      t.ok(inSlice(http.remotePort), `IPv${family}: the origin saw ${String(http.remote)}:${String(http.remotePort)}, inside the slice`);

      const udp = await udpRequestIn(topology.client, originAddress, ORIGIN_UDP_PORTS[0], { count: 5 });
      t.equal(udp.matched, 5, `IPv${family}: 5 UDP requests, 5 matching answers`);
      const datagram = await origin.waitFor((line) => line.event === 'udp' && line.remote === egress);
      t.ok(inSlice(datagram.remotePort), `IPv${family}: UDP left from ${String(datagram.remotePort)}, inside the slice`);

      const ping = await pingIn(topology.client, originAddress, { count: 3 });
      t.equal(ping.received, 3, `IPv${family}: 3 pings answered`);
    }

    const conntrack = hostExec(topology, ['conntrack', '-L', '-f', 'ipv4', '-m', `${0xf15e0001}/${0xffffffff}`]);
    t.match(conntrack, new RegExp(`src=${EGRESS4.replace(/\./g, '\\.')} dst=${ORIGIN4[0].replace(/\./g, '\\.')} sport=4\\d{4} dport=${ORIGIN_UDP_PORTS[0]}`), 'the UDP flow is reserved in conntrack under registration 1\'s mark');

    const listed = await client.registrations();
    t.match(listed, [{ id: 1, owner: 'edge', connected: true, ports: SLICE }], 'the registration is listed');
    t.ok((listed[0]!.packetsOut as number) > 1000 && (listed[0]!.packetsIn as number) > 1000, 'with its packets counted both ways');
    const mappings = await client.mappings(1);
    t.ok(mappings.some((m) => m.protocol === 'udp' && m.egressAddress === EGRESS4 && inSlice(m.egressPort)), 'mappings name the egress tuple');

    // Exhaustion: a second client with the same private address, a slice of two ports, three UDP flows to one
    // destination. The third flow gets an ICMP administratively prohibited, and the proxy an event.
    const second = addClient(topology);
    const secondRelay = clientRelay(topology, { client: second });
    const secondClient = new FishClient({ owner: 'edge-2', path: daemon.socket, binding });
    t.teardown(() => secondClient.close());
    const secondExhausted: ExhaustedEvent[] = [];
    secondClient.on('exhausted', (event) => secondExhausted.push(event));
    await secondClient.register(secondRelay.releaseFd(), { id: 2, egress4: EGRESS4, ports: [41000, 41001], protocols: ['udp', 'icmp'] });
    const ports = [20001, 20002, 20003];
    const answers = [];
    for (const localPort of ports) answers.push(await udpRequestIn(second, ORIGIN4[1], ORIGIN_UDP_PORTS[1], { count: 1, localPort, perRequestTimeoutMs: 1500 }));
    t.same(answers.map((a) => a.matched), [1, 1, 0], 'two flows fit a two-port slice; the third is refused');
    t.ok(await eventually(() => secondExhausted.length > 0, 5000), 'the proxy got an exhausted event');
    t.match(secondExhausted[0], { id: 2, protocol: 'udp', family: 4, destinationAddress: ORIGIN4[1], destinationPort: ORIGIN_UDP_PORTS[1], reason: 'slice' });
    t.equal(exhausted.length, 0, 'the first registration heard nothing of it');
    const metrics = execFileSync(process.execPath, ['--import', 'tsx', 'services/cli.ts', 'ctl', 'fish', 'metrics', '--socket', daemon.socket], { encoding: 'utf8' });
    t.match(metrics, /fdferry_fish_exhausted_total\{reason="slice"[^}]*\} [1-9]/, 'the refusal is counted by reason');
    const explained = await client.explain({ protocol: 'udp', address: '100.64.0.2', port: 20001, destinationAddress: ORIGIN4[1], destinationPort: ORIGIN_UDP_PORTS[1] });
    t.match(explained, { verdict: 'mapped', mapping: { rid: 2, egressAddress: EGRESS4 } }, 'explain finds a client tuple\'s mapping');
    const refused = await client.explain({ protocol: 'udp', address: '100.64.0.2', port: 20003, destinationAddress: ORIGIN4[1], destinationPort: ORIGIN_UDP_PORTS[1] });
    t.match(refused, { verdict: 'refused', reason: /every port of the slice was taken/, refusal: { id: 2, reason: 'slice' } }, 'explain says why the refused flow got no mapping');

    // A registration whose control connection goes away ends after the grace period, and its entries are flushed.
    secondClient.close();
    t.ok(
      await eventually(() => !hostExec(topology, ['conntrack', '-L', '-f', 'ipv4', '-m', `${0xf15e0002}/${0xffffffff}`]).includes('src='), 10_000),
      'registration 2 ended after its grace period and its conntrack entries were flushed',
    );

    // A clean stop removes everything Fish installed in the host namespace.
    daemon.kill('SIGTERM');
    t.equal(await daemon.exited, 0, 'Fish stopped cleanly');
    t.notMatch(hostExec(topology, ['ip', 'rule', 'show']) + hostExec(topology, ['ip', '-6', 'rule', 'show']), /lookup 4242/, 'no rule left');
    t.equal(hostExec(topology, ['ip', 'route', 'show', 'table', '4242']).trim(), '', 'no route left');
    t.notMatch(hostExec(topology, ['ip', 'link', 'show']), /fish0/, 'no tun left');
    t.notMatch(hostExec(topology, ['nft', 'list', 'ruleset']), /fishct/, 'no nftables table left');
    t.notMatch(hostExec(topology, ['conntrack', '-L', '-m', `${0xf15e0000}/${0xffff0000}`]), /src=/, 'no conntrack entry of Fish\'s left');
  });
}

// The Fish test topology without Fish: the plumbing every Fish integration test stands on. From the host
// namespace (where Fish will run) the origin's servers answer on every address, the client's packets
// reach the on-ramp sink, a daemon started "in the host" really runs there, and the teardown leaves no
// namespace and no process behind.
import t from 'tap';
import fs from 'node:fs';
import { spawnSync } from 'node:child_process';
import { loadNative } from '../../lib/native.js';
import { eventually, openRecorded } from '../helpers/native-helpers.js';
import { ICMP6_ECHO_REQUEST, ICMP_ECHO_REQUEST, parseIpPacket, type ParsedIpPacket } from '../helpers/packets.js';
import {
  CLIENT4,
  CLIENT6,
  HOST4,
  HOST6,
  ORIGIN4,
  ORIGIN6,
  addClient,
  clientRelay,
  curlIn,
  fishTopology,
  hostExec,
  hostPort,
  pingIn,
  startDaemonInHost,
  startOrigin,
  tcpFlowClientIn,
  udpRequestIn,
  type FishTopology,
} from '../helpers/fish-topology.js';

t.setTimeout(180_000);

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};
const namespaceList = (): string => spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout;

if (process.getuid?.() !== 0) {
  t.skip('the Fish topology tests need root (network namespaces, veth, tun devices)', () => {});
} else {
  const binding = loadNative();
  let built: { names: string[]; pids: number[] } | null = null;

  t.test('the topology works end to end without Fish', async (t) => {
    const topology: FishTopology = fishTopology(t, binding);
    const names = [topology.host.name, topology.origin.name, topology.client.name];
    t.match(names, [/^fishH-\d+-\d+$/, /^fishO-\d+-\d+$/, /^fishC-\d+-\d+$/], 'unique namespace names');
    const listed = namespaceList();
    t.ok(names.every((name) => listed.includes(name)), 'all three namespaces exist');
    t.not(spawnSync('ip', ['link', 'show', 'h-o'], { stdio: 'ignore' }).status, 0, 'the veth never appeared in the machine\'s own namespace');

    t.equal(hostExec(topology, ['sysctl', '-n', 'net.ipv4.ip_forward']).trim(), '1', 'the host forwards IPv4');
    t.equal(hostExec(topology, ['sysctl', '-n', 'net.ipv6.conf.all.forwarding']).trim(), '1', 'and IPv6');
    t.equal(hostExec(topology, ['sysctl', '-n', 'net.ipv4.conf.all.rp_filter']).trim(), '1', 'with strict rp_filter');
    // The tools Fish tests inspect the host with work there (scripts/ensure-test-deps.mjs installs them).
    t.doesNotThrow(() => hostExec(topology, ['conntrack', '-L']), 'conntrack -L runs in the host namespace');
    t.doesNotThrow(() => hostExec(topology, ['nft', 'list', 'ruleset']), 'nft runs in the host namespace');

    const origin = await startOrigin(topology, { fileMiB: 4 });
    t.ok(alive(origin.pid), 'the origin servers run');

    for (const address of [ORIGIN4[0], ORIGIN6[1]]) {
      const download = await curlIn(topology.host, `http://${hostPort(address, 80)}/file`);
      t.equal(download.code, 0, `curl from the host to ${address} succeeds ${download.stderr}`);
      t.equal(download.bytes, origin.file.size, 'the whole file arrived');
      t.equal(download.sha256, origin.file.sha256, 'byte for byte (sha256)');
      const from = address.includes(':') ? HOST6 : HOST4;
      await t.resolves(origin.waitFor((line) => line.event === 'http' && line.local === address && line.remote === from), 'the origin logged the request with its source');
    }

    for (const address of [...ORIGIN4, ...ORIGIN6]) {
      const udp = await udpRequestIn(topology.host, address, 9000, { count: 2 });
      t.equal(udp.matched, 2, `UDP echo from ${address}`);
      t.same(udp.from, [hostPort(address, 9000)], 'answered from the address it was sent to');
      const from = address.includes(':') ? HOST6 : HOST4;
      await t.resolves(
        origin.waitFor((line) => line.event === 'udp' && line.local === address && line.remote === from && line.remotePort === udp.localPort),
        'the origin logged the source address and port it saw',
      );
    }

    const echo = await tcpFlowClientIn(topology.host, ['echo', '--target', hostPort(ORIGIN4[1], 7), '--count', '2', '--bytes', '100000']);
    t.match(echo, { ok: 2, failed: 0 }, 'TCP echo from the host');
    await t.resolves(origin.waitFor((line) => line.event === 'tcp' && line.local === ORIGIN4[1] && line.remote === HOST4));

    for (const address of [ORIGIN4[0], ORIGIN6[0]]) {
      const ping = await pingIn(topology.host, address);
      t.equal(ping.received, 3, `ping from the host to ${address}: ${ping.output.split('\n').slice(-3).join(' ')}`);
    }

    // The client side: its packets arrive on the sink, one socket for every flow.
    const clients = [topology.client, addClient(topology)];
    t.equal(clients[1]!.name, `${topology.client.name}-1`, 'an extra client namespace');
    const sinks = clients.map((client) => {
      const relay = clientRelay(topology, { client });
      const seen: ParsedIpPacket[] = [];
      // openSeqpacket takes ownership of the fd: its close() closes it, so the relay must not close it again.
      const recorded = openRecorded(binding, relay.releaseFd(), (message) => {
        const packet = parseIpPacket(message.data);
        if (packet) seen.push(packet);
      });
      topology.cleanup(() => recorded.socket.close());
      return { relay, seen, recorded };
    });
    const sent = [0, 0];
    for (const [i, client] of clients.entries()) {
      for (const [address, source, type] of [
        [ORIGIN4[0], CLIENT4, ICMP_ECHO_REQUEST],
        [ORIGIN6[0], CLIENT6, ICMP6_ECHO_REQUEST],
      ] as const) {
        const before = sinks[i]!.seen.length;
        // Nothing answers yet (that is Fish's job): ping sends every 0.2 s until its 1 s deadline.
        const ping = await pingIn(client, address, { count: 1, timeoutMs: 1000 });
        t.ok(ping.transmitted >= 1, `client ${i} pinged ${address} (${ping.transmitted} requests)`);
        const requests = () => sinks[i]!.seen.slice(before).filter((p) => p.kind === type && p.dst === address);
        t.ok(await eventually(() => requests().length === ping.transmitted), `client ${i}: every echo request to ${address} arrived on its own sink`);
        t.ok(requests().every((p) => p.src === source && p.checksumsValid), 'from the client address');
        sent[i] += ping.transmitted;
      }
    }
    t.equal(sinks[0]!.seen.length, sent[0], 'the first sink saw only its own client');
    t.equal(sinks[0]!.relay.stats().packetsToSink, sent[0], 'and the on-ramp counted it');
    t.equal(sinks[1]!.seen.length, sent[1], 'the second sink likewise');

    // A daemon "in the host": ip netns exec execs, so the pid started is the daemon's own, inside the host.
    const daemon = await startDaemonInHost(topology, 'splicer');
    t.match(fs.readFileSync(`/proc/${daemon.pid}/cmdline`, 'utf8'), /services\/cli\.ts\0splicer/, 'the tracked pid is the daemon, not a wrapper');
    t.equal(fs.statSync(`/proc/${daemon.pid}/ns/net`).ino, fs.statSync(`/run/netns/${topology.host.name}`).ino, 'running in the host namespace');
    t.ok(fs.statSync(daemon.socket).isSocket(), 'its path-named socket is visible from here');

    built = { names: [...names, clients[1]!.name], pids: [origin.pid, daemon.pid] };
  });

  t.test('the teardown left nothing behind', async (t) => {
    t.ok(built, 'the topology was built');
    if (!built) return;
    const listed = namespaceList();
    for (const name of built.names) t.notOk(listed.includes(name), `${name} is gone`);
    for (const pid of built.pids) t.notOk(alive(pid), `pid ${pid} is gone`);
  });
}

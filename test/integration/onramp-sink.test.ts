// The on-ramp's catch-all sink: with demultiplexTcp false one SOCK_SEQPACKET socket carries every packet
// of a client namespace (what a Fish registration receives), and whatever is written to its other end
// reaches the namespace. This test plays the far side by hand: it answers pings and UDP, refuses TCP.
import t from 'tap';
import type { Test } from 'tap';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadNative } from '../../lib/native.js';
import type { OnRampFlow } from '../../lib/native.js';
import { CLIENT4, CLIENT6, DESTINATION4, DESTINATION6, clientNamespace, type ClientNamespace } from '../helpers/bumblebee-topology.js';
import { eventually, openRecorded, type Recorded } from '../helpers/native-helpers.js';
import {
  ACK,
  ICMP6_ECHO_REQUEST,
  ICMP_ECHO_REQUEST,
  RST,
  SYN,
  icmpEchoPacket,
  parseIpPacket,
  tcpPacket,
  udpPacket,
  type ParsedIpPacket,
} from '../helpers/packets.js';

t.setTimeout(120_000);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

if (process.getuid?.() !== 0) {
  t.skip('the on-ramp sink tests need root (network namespaces and tun devices)', () => {});
} else {
  const binding = loadNative();

  /** Runs a program in the namespace, kills it (by its pid) at the deadline, resolves with its output. */
  const run = async (namespace: ClientNamespace, command: string, args: string[], ms = 20_000) => {
    const child = namespace.spawn(command, args);
    child.stdin!.end();
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), ms);
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    clearTimeout(timer);
    return { code, stdout, stderr };
  };
  const udpClient = (namespace: ClientNamespace, target: string, count = 1) =>
    run(namespace, process.execPath, ['--import', 'tsx', path.join(root, 'test', 'helpers', 'udp-client.ts'), '--target', target, '--count', String(count), '--timeout-ms', '3000']);

  /**
   * The far side of the sink: records every packet, answers ICMP echo requests and UDP datagrams (an echo from
   * where they went), and refuses TCP with an RST, all written back into the sink.
   */
  const farSide = (theirs: number) => {
    const seen: ParsedIpPacket[] = [];
    const answers = { sent: 0 };
    const recorded: Recorded = openRecorded(binding, theirs, (message, socket) => {
      const packet = parseIpPacket(message.data);
      if (!packet) return;
      seen.push(packet);
      const { src, dst } = packet;
      const answer = (reply: Buffer) => {
        socket.send(reply, []);
        answers.sent++;
      };
      if (packet.kind === (packet.family === 4 ? ICMP_ECHO_REQUEST : ICMP6_ECHO_REQUEST) && (packet.protocol === 1 || packet.protocol === 58)) {
        answer(icmpEchoPacket({ src: dst, dst: src, reply: true, id: packet.sport, seq: packet.seq, payload: packet.payload }));
      } else if (packet.protocol === 17) {
        answer(udpPacket({ src: dst, dst: src, sport: packet.dport, dport: packet.sport, payload: packet.payload }));
      } else if (packet.protocol === 6 && (packet.kind & (SYN | ACK)) === SYN) {
        answer(tcpPacket({ src: dst, dst: src, sport: packet.dport, dport: packet.sport, seq: 0, ack: packet.seq + 1, flags: RST | ACK }));
      }
    });
    return { seen, recorded, answers };
  };

  const setup = (t: Test, demultiplexTcp: boolean) => {
    const namespace = clientNamespace(t, binding);
    const [ours, theirs] = binding.seqpacketPair();
    const flows: OnRampFlow[] = [];
    const onramp = binding.createOnRamp(namespace.tunFd, { closeDelayMs: 300, idleTimeoutMs: 0, sinkFd: ours, demultiplexTcp }, (list) => flows.push(...list));
    const far = farSide(theirs);
    // The on-ramp borrows both the tun and `ours`: it stops before either is closed. tap runs teardowns last
    // in, first out, so this runs before clientNamespace's teardown closes the tun.
    t.teardown(() => {
      onramp.close();
      binding.closeAll([ours]);
      far.recorded.socket.close();
      binding.closeAll(flows.map((flow) => flow.fd));
    });
    return { namespace, onramp, flows, far, ours };
  };

  t.test('demultiplexTcp false: ping, UDP and TCP all travel through the sink, both ways, IPv4 and IPv6', async (t) => {
    const { namespace, onramp, flows, far } = setup(t, false);

    for (const [family, destination, client] of [
      [4, DESTINATION4, CLIENT4],
      [6, DESTINATION6, CLIENT6],
    ] as const) {
      const ping = await run(namespace, 'ping', ['-c', '3', '-i', '0.2', '-W', '2', '-w', '10', destination]);
      t.equal(ping.code, 0, `IPv${family} ping exits 0: ${ping.stdout.split('\n').slice(-3).join(' ')} ${ping.stderr}`);
      t.match(ping.stdout, /3 packets transmitted, 3 received/, `IPv${family}: the replies written into the sink reached ping`);
      const requests = far.seen.filter((p) => p.family === family && p.kind === (family === 4 ? ICMP_ECHO_REQUEST : ICMP6_ECHO_REQUEST));
      t.equal(requests.length, 3, `IPv${family}: three echo requests arrived on the sink`);
      t.ok(requests.every((p) => p.src === client && p.dst === destination && p.checksumsValid), 'from the client to the destination, checksums valid');

      const target = family === 4 ? `${destination}:5353` : `[${destination}]:5353`;
      const udp = await udpClient(namespace, target, 2);
      t.equal(udp.code, 0, `udp client exits 0 ${udp.stderr}`);
      const result = JSON.parse(udp.stdout) as { sent: number; matched: number; from: string[]; localPort: number };
      t.equal(result.matched, 2, `IPv${family}: both UDP echoes written into the sink reached the client's socket`);
      t.same(result.from, [family === 4 ? `${destination}:5353` : `[${destination}]:5353`], 'from the address it sent to');
      const datagrams = far.seen.filter((p) => p.family === family && p.protocol === 17 && p.dport === 5353);
      t.equal(datagrams.length, 2, `IPv${family}: two UDP datagrams arrived on the sink`);
      t.ok(datagrams.every((p) => p.src === client && p.sport === result.localPort && p.checksumsValid), 'from the client socket, checksums valid');

      const url = family === 4 ? `http://${destination}:8080/` : `http://[${destination}]:8080/`;
      const curl = await run(namespace, 'curl', ['-sS', '-g', '--max-time', '10', url]);
      t.equal(curl.code, 7, `IPv${family}: curl is refused by the RST written into the sink (${curl.stderr.trim()})`);
      const syns = far.seen.filter((p) => p.family === family && p.protocol === 6 && (p.kind & SYN) !== 0);
      t.ok(syns.length >= 1 && syns.every((p) => p.dst === destination && p.dport === 8080 && p.checksumsValid), `IPv${family}: the SYN arrived on the sink`);
    }

    t.equal(flows.length, 0, 'no TCP flow was demultiplexed');
    const stats = onramp.stats();
    t.equal(stats.flowsTotal, 0);
    t.equal(stats.packetsToSink, stats.packetsFromTun, 'every packet read from the tun went to the sink');
    t.equal(stats.packetsFromSink, far.answers.sent, `every reply written into the sink was read from it (${far.answers.sent})`);
    t.equal(stats.packetsToTun, stats.packetsFromSink, 'and every one of them was written to the tun');
    t.equal(stats.drops.sinkFull, 0);
    t.equal(stats.drops.sinkError, 0);
    t.equal(stats.drops.notTcp, 0, 'nothing dropped as notTcp');
    t.equal(stats.sinkEof, false);
  });

  t.test('demultiplexTcp true with a sink: TCP gets its flow sockets, the rest goes to the sink', async (t) => {
    const { namespace, onramp, flows, far } = setup(t, true);
    const udp = await udpClient(namespace, `${DESTINATION4}:5353`);
    t.equal((JSON.parse(udp.stdout) as { matched: number }).matched, 1, 'UDP goes through the sink');
    // Nobody serves the flow socket: the client's connect just waits; its SYN is what matters.
    const connecting = namespace.spawn('curl', ['-sS', '--max-time', '20', `http://${DESTINATION4}:8080/`]);
    t.teardown(() => {
      if (connecting.exitCode === null) connecting.kill('SIGKILL');
    });
    t.ok(await eventually(() => flows.length === 1, 10_000), 'the SYN opened a flow socket');
    t.match(flows[0]!.tuple, { family: 4, clientAddress: CLIENT4, destinationAddress: DESTINATION4, destinationPort: 8080 });
    t.notOk(far.seen.some((p) => p.protocol === 6), 'no TCP packet reached the sink');
    t.equal(onramp.stats().drops.notTcp, 0, 'nothing dropped as notTcp: it went to the sink');
  });

  t.test('the sink peer closing does not stop the loop', async (t) => {
    const { namespace, onramp, far } = setup(t, false);
    far.recorded.socket.close();
    // Traffic from the namespace now fails to reach the sink (EPIPE), and is counted.
    const ping = await run(namespace, 'ping', ['-c', '2', '-i', '0.2', '-W', '1', '-w', '5', DESTINATION4]);
    t.not(ping.code, 0, 'no replies now');
    t.ok(await eventually(() => onramp.stats().sinkEof, 5000), 'the on-ramp saw the EOF');
    const stats = onramp.stats();
    t.ok(stats.drops.sinkError! >= 2, `sends to the closed sink are counted as sinkError (${stats.drops.sinkError})`);
    t.ok(stats.packetsFromTun >= 2, 'the tun is still being read');
  });

  t.test('options are checked', async (t) => {
    const namespace = clientNamespace(t, binding);
    t.throws(() => binding.createOnRamp(namespace.tunFd, { closeDelayMs: 300, idleTimeoutMs: 0, demultiplexTcp: false }, () => {}), /needs a "sinkFd"/);
    t.throws(() => binding.createOnRamp(namespace.tunFd, { closeDelayMs: 300, idleTimeoutMs: 0, sinkFd: namespace.tunFd }, () => {}), { code: 'ENOTSOCK' });
    const [a, b] = binding.seqpacketPair();
    t.teardown(() => binding.closeAll([a, b]));
    t.throws(() => binding.createOnRamp(namespace.tunFd, { closeDelayMs: 300, idleTimeoutMs: 0, sinkFd: a, demultiplexTcp: 'no' as unknown as boolean }, () => {}), /must be a boolean/);
  });
}

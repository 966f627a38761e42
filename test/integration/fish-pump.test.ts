// Fish's native pump (native/fish_pump.cc) against a real kernel: a "host" namespace with forwarding, strict
// rp_filter, the conntrack enabler table, a tun fish0 and the policy rules of notes/fish-kernel.md §3, an
// "origin" namespace behind a veth with UDP echo servers and a TCP listener. The pump runs in a child process
// started in the host namespace (its conntrack socket must be there, as the daemon's is); this process plays
// the proxy: it writes raw client packets on the registration socket and reads what comes back.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { loadNative } from '../../lib/native.js';
import type { FishEvent, FishMappingRow, FishStats } from '../../lib/native.js';
import { PUMP_ADDRESSES, sh, startPumpHarness, until } from '../helpers/fish-pump-harness.js';
import { ACK, RST, SYN, icmpEchoPacket, mssOption, parseIpPacket, parseTcpPacket, tcpPacket, udpPacket } from '../helpers/packets.js';

const isRoot = process.getuid?.() === 0;
const tools = ['ip', 'nft', 'conntrack'].every((tool) => spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0);
const skip = !isRoot ? 'needs root (namespaces, tun, conntrack)' : !tools ? 'needs ip, nft and conntrack' : false;

const { egress4: E, origin4: ORIGIN, client4: CLIENT, egress6: E6, origin6: ORIGIN6, client6: CLIENT6 } = PUMP_ADDRESSES;
const REVALIDATE_MS = 300;
const ICMP_IDLE_MS = 1500;
const LO = 40000;
const HI = 40009;
const MSS_CLAMP = 1240;

t.setTimeout(120_000);

t.test('the fish pump NATs a registration through a tun with conntrack reservations', { skip }, async (t) => {
  const native = loadNative();
  const originCode = `
    const dgram = require('node:dgram'), net = require('node:net');
    for (const [type, address, port] of [['udp4', '${ORIGIN}', 9000], ['udp4', '${ORIGIN}', 9001], ['udp6', '${ORIGIN6}', 9000]]) {
      const s = dgram.createSocket(type);
      s.on('message', (m, r) => { console.log('udp ' + r.address + ' ' + r.port + ' ' + port); s.send(m, r.port, r.address); });
      s.bind(port, address);
    }
    net.createServer((c) => { console.log('tcp ' + c.remoteAddress + ' ' + c.remotePort); c.destroy(); }).listen(7, '${ORIGIN}', () => console.log('ready'));
  `;
  const harness = await startPumpHarness(t, native, 'fp', originCode);
  const { host, origin, call, events, track } = harness;
  const [clientFd, client2Fd] = harness.clientFds as [number, number];
  const inHost = (...args: string[]) => sh(['ip', 'netns', 'exec', host, ...args]);

  // Routes and rules once the tun has its reader (notes §3: rules cover the slice before it is used).
  sh(['ip', '-n', host, 'link', 'set', 'fish0', 'up']);
  sh(['ip', '-n', host, 'route', 'add', 'default', 'dev', 'fish0', 'table', '4242']);
  for (const proto of ['udp', 'tcp']) {
    sh(['ip', '-n', host, 'rule', 'add', 'pref', '100', 'to', E, 'ipproto', proto, 'dport', `${LO}-${HI}`, 'lookup', '4242']);
  }
  sh(['ip', '-n', host, 'rule', 'add', 'pref', '101', 'to', E, 'ipproto', 'icmp', 'lookup', '4242']);
  sh(['ip', '-n', host, '-6', 'route', 'add', 'default', 'dev', 'fish0', 'table', '4242']);
  for (const proto of ['udp', 'tcp']) {
    sh(['ip', '-n', host, '-6', 'rule', 'add', 'pref', '100', 'to', E6, 'ipproto', proto, 'dport', `${LO}-${HI}`, 'lookup', '4242']);
  }
  sh(['ip', '-n', host, '-6', 'rule', 'add', 'pref', '101', 'to', E6, 'ipproto', 'ipv6-icmp', 'lookup', '4242']);

  // --- the proxy's end of the registration ----------------------------------------------------------------
  const replies: Buffer[] = [];
  const client = native.openSeqpacket(clientFd, {
    message: (data) => replies.push(Buffer.from(data)),
    drain: () => {},
    close: () => {},
  });
  t.teardown(() => client.close());
  /** Waits for (and removes) the first reply matching `match`. */
  const reply = (what: string, match: (packet: Buffer) => boolean, ms = 5000) =>
    until(what, () => {
      const index = replies.findIndex(match);
      return index < 0 ? null : replies.splice(index, 1)[0]!;
    }, ms);
  const stats = () => call<FishStats>('stats');
  const registrationStats = async () => (await stats()).registrations.find((r) => r.rid === 1)!;

  await call('create', {
    markBase: 0xf15e0000,
    mssClamp: MSS_CLAMP,
    reserveTimeoutS: { tcp: 60, udp: 30, icmp: 30 },
    idleTimeoutMs: { tcp: 600_000, udp: 60_000, icmp: ICMP_IDLE_MS },
    revalidateAfterMs: REVALIDATE_MS,
    verifyChecksums: true,
  });
  await call('addRegistration', {
    rid: 1,
    egress4: E,
    egress6: E6,
    portLo: LO,
    portHi: HI,
    protocols: { tcp: true, udp: true, icmp: true },
    maxMappings: 0,
  });

  const udpTo = (port: number, clientPort: number, payload: string) =>
    udpPacket({ src: CLIENT, dst: ORIGIN, sport: clientPort, dport: port, payload: Buffer.from(payload) });
  const isUdpReply = (clientPort: number, payload: string) => (packet: Buffer) => {
    const p = parseIpPacket(packet);
    return p?.protocol === 17 && p.l4.readUInt16BE(2) === clientPort && p.l4.subarray(8).toString() === payload;
  };

  await t.test('a UDP datagram goes out from the slice and its answer comes back rewritten', async (t) => {
    client.send(udpTo(9000, 5000, 'hello'), []);
    const packet = parseIpPacket(await reply('the UDP echo', isUdpReply(5000, 'hello')))!;
    t.equal(packet.src, ORIGIN, 'from the origin');
    t.equal(packet.dst, CLIENT, 'to the client address');
    t.equal(packet.l4.readUInt16BE(0), 9000, 'from the server port');
    t.ok(packet.checksumsValid, 'IPv4 header and UDP checksums verify');
    const seen = /^udp (\S+) (\d+) 9000$/m.exec(harness.originLog());
    t.equal(seen?.[1], E, 'the origin saw the egress address');
    const port = Number(seen?.[2]);
    t.ok(port >= LO && port <= HI, `the origin saw a slice port (${port})`);
    const rows = await call<FishMappingRow[]>('mappings', 1);
    t.match(rows, [{ rid: 1, protocol: 'udp', family: 4, clientAddress: CLIENT, clientPort: 5000, destinationAddress: ORIGIN, destinationPort: 9000, egressAddress: E, egressPort: port, packetsOut: 1, packetsIn: 1 }]);
    const listed = inHost('conntrack', '-L', '-m', '0xf15e0001/0xffffffff');
    t.match(listed, new RegExp(`udp .*src=${E.replace(/\./g, '\\.')} dst=198\\.51\\.100\\.2 sport=${port} dport=9000`), 'conntrack holds the reservation with the registration mark');
    const s = await registrationStats();
    t.equal(s.reserved, 1, 'one reservation');
    t.equal(s.packetsOut, 1);
    t.equal(s.packetsIn, 1);
  });

  await t.test('ICMP echo goes out with a slice id and the reply comes back with the client id', async (t) => {
    client.send(icmpEchoPacket({ src: CLIENT, dst: ORIGIN, id: 777, seq: 1, payload: Buffer.from('ping') }), []);
    const packet = parseIpPacket(
      await reply('the echo reply', (b) => {
        const p = parseIpPacket(b);
        return p?.protocol === 1 && p.l4[0] === 0;
      }),
    )!;
    t.equal(packet.dst, CLIENT);
    t.equal(packet.l4.readUInt16BE(4), 777, 'the client echo id');
    t.equal(packet.l4.subarray(8).toString(), 'ping');
    t.ok(packet.checksumsValid, 'checksums verify');
    const row = (await call<FishMappingRow[]>('mappings', 1)).find((r) => r.protocol === 'icmp');
    t.ok(row && row.egressPort >= LO && row.egressPort <= HI, 'the echo id came from the slice');
  });

  await t.test('malformed client packets are dropped and counted; the pump keeps serving', async (t) => {
    const badChecksum = udpTo(9000, 5000, 'corrupt');
    badChecksum[badChecksum.length - 1]! ^= 0xff;
    // A first fragment of 20 bytes: every fragment but the last must carry a multiple of 8 (RFC 791), so the
    // reassembler refuses it as a bad header (test/integration/fish-fragments.test.ts covers the good ones).
    const fragment = tcpPacket({ src: CLIENT, dst: ORIGIN, sport: 5001, dport: 7, seq: 1, flags: SYN, fragment: 0x2000 });
    const icmpError = Buffer.from(icmpEchoPacket({ src: CLIENT, dst: ORIGIN, id: 1, seq: 1 }));
    icmpError[20] = 3; // destination unreachable: a client may not send errors through Fish
    icmpError.writeUInt16BE(0, 22);
    let folded = 0;
    for (let i = 20; i < icmpError.length; i += 2) folded += icmpError.readUInt16BE(i);
    while (folded > 0xffff) folded = (folded & 0xffff) + (folded >>> 16);
    icmpError.writeUInt16BE(~folded & 0xffff, 22);
    const junk = [Buffer.from([0x45, 0, 0]), Buffer.from([0x10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]), badChecksum, fragment, icmpError];
    for (const packet of junk) client.send(packet, []);
    client.send(udpTo(9000, 5000, 'still there'), []);
    await reply('the echo after the junk', isUdpReply(5000, 'still there'));
    const s = await registrationStats();
    t.match(s.drops, { truncated: 1, badVersion: 1, badChecksum: 1, badHeader: 1, icmpError: 1 }, 'each counted by reason');
    t.equal(s.reserved, 2, 'no reservation for junk (the UDP flow and the echo only)');
  });

  await t.test('foreign conntrack entries are skipped (EEXIST); a full slice refuses with ICMP admin-prohibited', async (t) => {
    // Foreign entries whose reply tuples take every slice port toward ORIGIN:9001 (notes §8).
    for (let port = LO; port <= HI; port++) {
      inHost('conntrack', '-I', '-p', 'udp', '-s', '10.9.9.9', '-d', ORIGIN, '--sport', String(5000 + port - LO), '--dport', '9001',
        '-r', ORIGIN, '-q', E, '--reply-port-src', '9001', '--reply-port-dst', String(port), '-t', '120');
    }
    const before = await registrationStats();
    const request = udpTo(9001, 6000, 'refused');
    client.send(request, []);
    const refusal = parseIpPacket(
      await reply('ICMP administratively prohibited', (b) => {
        const p = parseIpPacket(b);
        return p?.protocol === 1 && p.l4[0] === 3;
      }),
    )!;
    t.equal(refusal.l4[1], 13, 'code 13: communication administratively prohibited');
    t.equal(refusal.src, ORIGIN, 'from the destination the client asked for');
    t.equal(refusal.dst, CLIENT);
    t.ok(refusal.checksumsValid, 'checksums verify');
    t.same(refusal.l4.subarray(8), request, 'it quotes the refused packet whole (it is short)');
    let s = await registrationStats();
    t.equal(s.collisions - before.collisions, 10, 'every port answered EEXIST');
    t.equal(s.exhausted - before.exhausted, 1, 'one refusal');
    const event = await until('the exhausted event', () =>
      events.find((e): e is Extract<FishEvent, { type: 'exhausted' }> => e.type === 'exhausted' && e.protocol === 'udp'),
    );
    t.match(event, { rid: 1, family: 4, clientAddress: CLIENT, clientPort: 6000, destinationAddress: ORIGIN, destinationPort: 9001, reason: 'slice', code: null });

    // A burst of refusals: every client hears at once, JS hears at most every 100 ms, and no refusal goes uncounted.
    for (let i = 0; i < 4; i++) client.send(udpTo(9001, 6010 + i, 'refused'), []);
    for (let i = 0; i < 4; i++) {
      await reply(`refusal ${i + 1} of the burst`, (b) => {
        const p = parseIpPacket(b);
        return p?.protocol === 1 && p.l4[0] === 3 && p.l4[1] === 13;
      });
    }
    const refusals = () =>
      events.filter((e): e is Extract<FishEvent, { type: 'exhausted' }> => e.type === 'exhausted' && e.destinationPort === 9001)
        .reduce((total, e) => total + 1 + e.suppressed, 0);
    await until('every refusal reported', () => refusals() === 5);
    t.ok(events.filter((e) => e.type === 'exhausted' && e.destinationPort === 9001).length < 5, 'some folded into `suppressed`');

    // One port freed: the next flow gets exactly that one.
    inHost('conntrack', '-D', '-p', 'udp', '-s', '10.9.9.9', '--sport', String(5003), '-d', ORIGIN, '--dport', '9001');
    client.send(udpTo(9001, 6001, 'through'), []);
    await reply('the echo on the freed port', isUdpReply(6001, 'through'));
    t.match(harness.originLog(), new RegExp(`^udp ${E.replace(/\./g, '\\.')} ${LO + 3} 9001$`, 'm'), `the origin saw port ${LO + 3}`);
    s = await registrationStats();
    t.ok(s.collisions - before.collisions >= 10, 'the occupied ports were skipped again');
  });

  await t.test('TCP: SYN-ACKs come back clamped; a SYN past the slice gets an RST', async (t) => {
    const syn = (clientPort: number, seq: number) =>
      tcpPacket({ src: CLIENT, dst: ORIGIN, sport: clientPort, dport: 7, seq, flags: SYN, options: mssOption(1460) });
    for (let i = 0; i < 10; i++) client.send(syn(7000 + i, 1000 * i), []);
    const synAck = parseTcpPacket(
      await reply('a SYN-ACK', (b) => {
        const p = parseTcpPacket(b);
        return p !== null && p.dport === 7000 && (p.flags & (SYN | ACK)) === (SYN | ACK);
      }),
    )!;
    t.ok(synAck.checksumsValid, 'checksums verify');
    t.equal(synAck.ack, 1, 'acknowledges the SYN');
    t.equal(synAck.mss, MSS_CLAMP, 'MSS clamped on the way back');
    await until('ten TCP mappings', async () => (await call<FishMappingRow[]>('mappings', 1)).filter((r) => r.protocol === 'tcp').length === 10);

    client.send(syn(7100, 0x7fff0000), []);
    const rst = parseTcpPacket(
      await reply('the RST', (b) => {
        const p = parseTcpPacket(b);
        return p !== null && p.dport === 7100;
      }),
    )!;
    t.equal(rst.flags, RST | ACK, 'RST|ACK');
    t.equal(rst.seq, 0);
    t.equal(rst.ack, 0x7fff0001, 'acknowledges the SYN');
    t.equal(rst.sport, 7, 'from the port the client asked for');
    t.ok(rst.checksumsValid, 'checksums verify');
    const event = await until('the TCP exhausted event', () =>
      events.find((e) => e.type === 'exhausted' && e.protocol === 'tcp' && e.clientPort === 7100),
    );
    t.match(event, { reason: 'slice', destinationPort: 7 });
  });

  const escape = (text: string) => text.replace(/[.:]/g, (c) => `\\${c}`);
  const udpPort = (clientPort: number) => async () =>
    (await call<FishMappingRow[]>('mappings', 1)).find((r) => r.protocol === 'udp' && r.clientPort === clientPort && r.family === 4);

  await t.test('an ICMP port unreachable is translated back to the client tuple', async (t) => {
    const request = udpTo(9999, 5100, 'nobody home');
    client.send(request, []);
    const error = parseIpPacket(
      await reply('the port unreachable', (b) => {
        const p = parseIpPacket(b);
        return p?.protocol === 1 && p.l4[0] === 3 && p.l4[1] === 3;
      }),
    )!;
    t.equal(error.src, ORIGIN, 'from the origin');
    t.equal(error.dst, CLIENT, 'to the client');
    t.ok(error.checksumsValid, 'outer IPv4 and ICMP checksums verify');
    const quoted = error.l4.subarray(8);
    const inner = parseIpPacket(Buffer.from(quoted))!;
    t.equal(inner.src, CLIENT, 'the quoted source is the client again');
    t.equal(inner.dst, ORIGIN);
    t.equal(inner.l4.readUInt16BE(0), 5100, 'the quoted source port is the client port');
    t.equal(inner.l4.readUInt16BE(2), 9999);
    t.ok(inner.checksumsValid, 'the quoted IPv4 header and UDP checksums verify (the whole datagram was quoted)');
  });

  await t.test('an idle mapping is revalidated: gone => the same port again; taken => another port', async (t) => {
    const row = await until('the UDP mapping', udpPort(5000));
    const port = row.egressPort;
    const before = await registrationStats();
    inHost('conntrack', '-D', '-p', 'udp', '-s', E, '--sport', String(port), '-d', ORIGIN, '--dport', '9000');
    await until('the mapping to go idle', async () => ((await udpPort(5000)())?.idleMs ?? 0) > REVALIDATE_MS);
    client.send(udpTo(9000, 5000, 'revalidated'), []);
    await reply('the echo after revalidation', isUdpReply(5000, 'revalidated'));
    let s = await registrationStats();
    t.equal(s.reserved - before.reserved, 1, 'reserved again');
    t.equal((await udpPort(5000)())?.egressPort, port, 'on the same port');
    t.match(inHost('conntrack', '-L', '-m', '0xf15e0001/0xffffffff'), new RegExp(`sport=${port} dport=9000`), 'the entry is back');

    // Now someone else takes the tuple while the mapping idles.
    inHost('conntrack', '-D', '-p', 'udp', '-s', E, '--sport', String(port), '-d', ORIGIN, '--dport', '9000');
    inHost('conntrack', '-I', '-p', 'udp', '-s', '10.9.9.8', '-d', ORIGIN, '--sport', '4444', '--dport', '9000',
      '-r', ORIGIN, '-q', E, '--reply-port-src', '9000', '--reply-port-dst', String(port), '-t', '120');
    await until('the mapping to go idle', async () => ((await udpPort(5000)())?.idleMs ?? 0) > REVALIDATE_MS);
    client.send(udpTo(9000, 5000, 'remapped'), []);
    await reply('the echo after the remap', isUdpReply(5000, 'remapped'));
    const moved = (await udpPort(5000)())!;
    t.not(moved.egressPort, port, `moved to another port (${moved.egressPort})`);
    t.match(harness.originLog(), new RegExp(`^udp ${escape(E)} ${moved.egressPort} 9000$`, 'm'), 'the origin saw the new port');
    s = await registrationStats();
    t.equal(s.drops.remapped, 1, 'counted as remapped');
  });

  await t.test('IPv6: UDP, ICMPv6 echo and a translated ICMPv6 port unreachable', async (t) => {
    client.send(udpPacket({ src: CLIENT6, dst: ORIGIN6, sport: 5000, dport: 9000, payload: Buffer.from('hello six') }), []);
    const udp = parseIpPacket(await reply('the UDP echo over IPv6', (b) => {
      const p = parseIpPacket(b);
      return p?.family === 6 && p.protocol === 17 && p.l4.subarray(8).toString() === 'hello six';
    }))!;
    t.equal(udp.src, ORIGIN6);
    t.equal(udp.dst, CLIENT6);
    t.equal(udp.l4.readUInt16BE(2), 5000);
    t.ok(udp.checksumsValid, 'UDP checksum verifies');
    const seen = new RegExp(`^udp ${escape(E6)} (\\d+) 9000$`, 'm').exec(harness.originLog());
    t.ok(seen && Number(seen[1]) >= LO && Number(seen[1]) <= HI, 'the origin saw the IPv6 egress address and a slice port');
    t.match(inHost('conntrack', '-L', '-f', 'ipv6', '-m', '0xf15e0001/0xffffffff'), /udp .*src=2001:db8:e::7 dst=2001:db8:1::2/, 'reserved in conntrack');

    client.send(icmpEchoPacket({ src: CLIENT6, dst: ORIGIN6, id: 4242, seq: 9, payload: Buffer.from('ping6') }), []);
    const echo = parseIpPacket(await reply('the ICMPv6 echo reply', (b) => {
      const p = parseIpPacket(b);
      return p?.family === 6 && p.protocol === 58 && p.l4[0] === 129;
    }))!;
    t.equal(echo.dst, CLIENT6);
    t.equal(echo.l4.readUInt16BE(4), 4242, 'the client echo id');
    t.ok(echo.checksumsValid, 'ICMPv6 checksum (with pseudo-header) verifies');

    client.send(udpPacket({ src: CLIENT6, dst: ORIGIN6, sport: 5101, dport: 9999, payload: Buffer.from('nobody') }), []);
    const error = parseIpPacket(await reply('the ICMPv6 port unreachable', (b) => {
      const p = parseIpPacket(b);
      return p?.family === 6 && p.protocol === 58 && p.l4[0] === 1;
    }))!;
    t.equal(error.l4[1], 4, 'code 4: port unreachable');
    t.equal(error.dst, CLIENT6);
    t.ok(error.checksumsValid, 'ICMPv6 checksum verifies after the translation');
    const inner = parseIpPacket(Buffer.from(error.l4.subarray(8)))!;
    t.equal(inner.src, CLIENT6, 'the quoted source is the client');
    t.equal(inner.l4.readUInt16BE(0), 5101, 'and its port');
    t.ok(inner.checksumsValid, 'the quoted UDP checksum verifies');
  });

  await t.test('unmapped return traffic is counted', async (t) => {
    const before = (await stats()).returnDrops.unmapped ?? 0;
    sh(['ip', 'netns', 'exec', origin, process.execPath, '-e',
      `const s = require('node:dgram').createSocket('udp4'); s.send('x', ${HI}, '${E}', () => s.close());`]);
    await until('an unmapped drop', async () => ((await stats()).returnDrops.unmapped ?? 0) > before);
    t.pass('counted as unmapped');
  });

  await t.test('idle mappings expire by protocol', async (t) => {
    const echoMappings = async () => (await call<FishMappingRow[]>('mappings', 1)).filter((r) => r.protocol === 'icmp');
    t.ok((await echoMappings()).length >= 1, 'echo mappings exist');
    await until('the echo mappings to expire', async () => (await echoMappings()).length === 0, ICMP_IDLE_MS + 5000);
    t.ok((await call<FishMappingRow[]>('mappings', 1)).some((r) => r.protocol === 'udp'), 'UDP mappings (longer timeout) stay');
  });

  await t.test('a second registration: maxMappings refuses with reason limit; addMappings installs without reserving', async (t) => {
    const replies2: Buffer[] = [];
    const client2 = native.openSeqpacket(client2Fd, { message: (data) => replies2.push(Buffer.from(data)), drain: () => {}, close: () => {} });
    t.teardown(() => client2.close());
    const reply2 = (what: string, match: (packet: Buffer) => boolean) =>
      until(what, () => {
        const index = replies2.findIndex(match);
        return index < 0 ? null : replies2.splice(index, 1)[0]!;
      });
    const CLIENT_B = '100.64.0.3';
    await call('addRegistration', { rid: 2, fd: 5, egress4: E, egress6: null, portLo: LO, portHi: HI, protocols: { tcp: false, udp: true, icmp: false }, maxMappings: 1 });
    await t.rejects(call('addRegistration', { rid: 2, fd: 5, egress4: E, egress6: null, portLo: LO, portHi: HI, protocols: { tcp: true, udp: true, icmp: true }, maxMappings: 0 }), { code: 'EFDFERRY_EXISTS' }, 'a rid is registered once');

    client2.send(udpPacket({ src: CLIENT_B, dst: ORIGIN, sport: 5000, dport: 9000, payload: Buffer.from('B') }), []);
    const echoed = parseIpPacket(await reply2('the echo for registration 2', (b) => parseIpPacket(b)?.protocol === 17))!;
    t.equal(echoed.dst, CLIENT_B, 'answers go to the registration that sent');
    const rows2 = await call<FishMappingRow[]>('mappings', 2);
    t.equal(rows2.length, 1);
    const rows1 = await call<FishMappingRow[]>('mappings', 1);
    t.notOk(rows1.some((r) => r.destinationPort === 9000 && r.protocol === 'udp' && r.family === 4 && r.egressPort === rows2[0]!.egressPort),
      'overlapping slices: conntrack gave the two registrations different ports toward the same destination');

    client2.send(udpPacket({ src: CLIENT_B, dst: ORIGIN, sport: 5001, dport: 9000, payload: Buffer.from('B2') }), []);
    const refusal = parseIpPacket(await reply2('admin-prohibited for the second flow', (b) => parseIpPacket(b)?.protocol === 1))!;
    t.equal(refusal.l4[0], 3);
    t.equal(refusal.l4[1], 13);
    const event = await until('the limit event', () => events.find((e) => e.type === 'exhausted' && e.rid === 2));
    t.match(event, { reason: 'limit', protocol: 'udp', clientPort: 5001 });

    client2.send(icmpEchoPacket({ src: CLIENT_B, dst: ORIGIN, id: 1, seq: 1 }), []);
    await reply2('admin-prohibited for a protocol it may not use', (b) => parseIpPacket(b)?.protocol === 1);
    await until('the denied drop', async () => (await stats()).registrations.find((r) => r.rid === 2)?.drops.denied === 1);

    // A mapping from a conntrack dump (after a restart): installed as is; return traffic finds it.
    await call('addMappings', [{ rid: 2, protocol: 'udp', family: 4, clientAddress: CLIENT_B, clientPort: 5555, destinationAddress: ORIGIN, destinationPort: 9002, egressAddress: E, egressPort: 40005 }]);
    const reserved = (await stats()).registrations.find((r) => r.rid === 2)!.reserved;
    sh(['ip', 'netns', 'exec', origin, process.execPath, '-e',
      `const s = require('node:dgram').createSocket('udp4'); s.bind(9002, '${ORIGIN}', () => s.send('adopted', 40005, '${E}', () => s.close()));`]);
    const adopted = parseIpPacket(await reply2('return traffic of the adopted mapping', (b) => parseIpPacket(b)?.l4.subarray(8).toString() === 'adopted'))!;
    t.equal(adopted.dst, CLIENT_B);
    t.equal(adopted.l4.readUInt16BE(2), 5555, 'to the client port of the installed mapping');
    t.ok(adopted.checksumsValid);
    t.equal((await stats()).registrations.find((r) => r.rid === 2)!.reserved, reserved, 'nothing was reserved for it');
    t.equal(await call('removeRegistration', 2), true, 'removed');
    t.same(await call('mappings', 2), [], 'with its mappings');
  });

  await t.test('on the wire: fresh IPv4 IDs for DF=0 packets, clamped MSS in SYNs (IPv6: 20 less)', async (t) => {
    const dump = spawn('ip', ['netns', 'exec', origin, 'tcpdump', '-i', 'o-h', '-n', '-vv', '-l', '-c', '2',
      `(src host ${E} and udp dst port 9000) or (src host ${E6} and tcp dst port 7)`], { stdio: ['ignore', 'pipe', 'pipe'] });
    track(dump);
    let seen = '';
    dump.stdout!.on('data', (chunk: Buffer) => (seen += chunk.toString()));
    dump.stderr!.on('data', (chunk: Buffer) => (seen += chunk.toString()));
    await until('tcpdump to listen', () => seen.includes('listening on'));

    const datagram = udpTo(9000, 5000, 'no DF');
    datagram.writeUInt16BE(0xbeef, 4);
    datagram.writeUInt16BE(0, 6); // DF=0: may be fragmented on the way
    datagram.writeUInt16BE(0, 10);
    let total = 0;
    for (let i = 0; i < 20; i += 2) total += datagram.readUInt16BE(i);
    while (total > 0xffff) total = (total & 0xffff) + (total >>> 16);
    datagram.writeUInt16BE(~total & 0xffff, 10);
    client.send(datagram, []);
    await reply('the echo of the DF=0 datagram', isUdpReply(5000, 'no DF'));
    client.send(tcpPacket({ src: CLIENT6, dst: ORIGIN6, sport: 7200, dport: 7, seq: 1, flags: SYN, options: mssOption(1440) }), []);
    // `-c 2`: tcpdump exits once it has printed both.
    await until('tcpdump to see both packets', () => dump.exitCode !== null, 5000);
    const id = /id (\d+),.*proto UDP/.exec(seen);
    t.ok(id, `tcpdump shows the datagram: ${seen}`);
    t.not(Number(id?.[1]), 0xbeef, `the IPv4 ID was replaced (${id?.[1]})`);
    t.match(seen, /udp sum ok/, 'the UDP checksum verifies on the wire');
    t.notMatch(seen, /bad cksum|incorrect/, 'so do the others');
    t.match(seen, new RegExp(`${escape(E6)}\\.\\d+ > ${escape(ORIGIN6)}\\.7: .*mss ${MSS_CLAMP - 20}`), `the IPv6 SYN left with MSS ${MSS_CLAMP - 20}`);
  });

  await t.test('a burst goes through the batched paths intact', async (t) => {
    const count = 300;
    const flow = async () => (await udpPort(5000)())!;
    const before = await flow();
    const fullBefore = (await registrationStats()).drops.full ?? 0;
    for (let i = 0; i < count; i++) client.send(udpTo(9000, 5000, `burst ${i}`), []);
    const got = new Set<string>();
    let corrupt = 0;
    const collect = () => {
      for (let i = replies.length - 1; i >= 0; i--) {
        const p = parseIpPacket(replies[i]!);
        const text = p?.protocol === 17 ? p.l4.subarray(8).toString() : '';
        if (!text.startsWith('burst ')) continue;
        if (p!.checksumsValid && p!.dst === CLIENT && p!.l4.readUInt16BE(2) === 5000) got.add(text);
        else corrupt++;
        replies.splice(i, 1);
      }
    };
    await until('every datagram written to the tun', async () => (await flow()).packetsOut - before.packetsOut === count);
    // The kernel (tun queue, forwarding, the origin's socket) may lose some of a burst; the pump must account
    // for every echo it read from the tun: delivered to the proxy, or counted as `full`.
    let last = '';
    await until('the echoes to settle', async () => {
      collect();
      const delivered = (await flow()).packetsIn - before.packetsIn;
      const full = ((await registrationStats()).drops.full ?? 0) - fullBefore;
      last = `${got.size} received, ${delivered} sent by the pump, ${full} dropped as full`;
      return got.size >= count / 2 && got.size === delivered;
    }, 15_000).catch((error: Error) => {
      throw new Error(`${error.message}: ${last}`);
    });
    t.comment(`burst: ${last}`);
    t.equal(corrupt, 0, 'no echo was corrupted or misaddressed');
    t.ok(got.size >= count / 2, `${got.size} of ${count} echoed back with valid checksums`);
  });

  await t.test('pause stops the data path and returns the mappings; resume restarts it', async (t) => {
    const packetsOut = (await registrationStats()).packetsOut;
    const expected = (await call<FishMappingRow[]>('mappings')).length;
    const rows = await call<FishMappingRow[]>('pause');
    t.equal(rows.length, expected, `${rows.length} mappings handed out`);
    client.send(udpTo(9000, 5000, 'after resume'), []);
    // The packet is in the socket before the stats call reaches the pump thread: a paused pump leaves it there.
    t.equal((await registrationStats()).packetsOut, packetsOut, 'nothing read while paused');
    await call('resume');
    await reply('the echo after resume', isUdpReply(5000, 'after resume'));
    t.ok((await registrationStats()).packetsOut > packetsOut, 'read after the resume');
  });

  await t.test('the proxy hanging up ends the registration, not the pump', async (t) => {
    client.close();
    const closed = await until('the closed event', () => events.find((e) => e.type === 'closed'));
    t.match(closed, { type: 'closed', rid: 1, reason: 'eof', code: null });
    t.same(await call('mappings', 1), [], 'its mappings are forgotten');
    t.same((await stats()).registrations, [], 'and the registration');
    t.equal(await call('removeRegistration', 1), false, 'removing it again is a no-op');
    await call('close');
  });
});

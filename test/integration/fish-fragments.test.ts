// Fragments through Fish's native pump (native/fish_pump.cc, native/reassembly.h) against a real kernel, in the
// topology of fish-pump.test.ts: a "host" namespace with forwarding, strict rp_filter, the conntrack enabler, a
// tun fish0 and the policy rules; an "origin" namespace behind a veth whose UDP echo servers log what they got
// (length and hash). This process plays the proxy: it writes a client's fragments on the registration socket.
//
// What must hold (notes/fish-kernel.md §4 "Fragments"):
// - IPv4: Fish reassembles the client's fragments, NATs the whole datagram and writes it whole; the host's
//   kernel re-fragments it (DF=0), so the origin reassembles fragments. The echo, fragmented by the origin and
//   defragmented and re-fragmented by the host's conntrack, is reassembled by Fish and reaches the client as one
//   message with valid checksums.
// - IPv6: the same, but Fish splits the datagram for the tun itself (the kernel never fragments forwarded IPv6).
// - Big pings (ICMP echo with 2000 bytes) both families.
// - Overlapping, incomplete and oversized fragments, and those past the table's bound, are dropped and counted.
import t from 'tap';
import { createHash } from 'node:crypto';
import { spawn, spawnSync } from 'node:child_process';
import { loadNative } from '../../lib/native.js';
import type { FishStats } from '../../lib/native.js';
import { PUMP_ADDRESSES, sh, startPumpHarness, until } from '../helpers/fish-pump-harness.js';
import { fragmentIpv4, fragmentIpv6, icmpEchoPacket, parseIpPacket, udpPacket } from '../helpers/packets.js';

const isRoot = process.getuid?.() === 0;
const tools = ['ip', 'nft'].every((tool) => spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0);
const skip = !isRoot ? 'needs root (namespaces, tun, conntrack)' : !tools ? 'needs ip and nft' : false;

const { egress4: E, origin4: ORIGIN, client4: CLIENT, egress6: E6, origin6: ORIGIN6, client6: CLIENT6 } = PUMP_ADDRESSES;
const LO = 40000;
const HI = 40009;
const FRAGMENT_TIMEOUT_MS = 500;

t.setTimeout(120_000);

const sha = (data: Buffer) => createHash('sha256').update(data).digest('hex');
/** Deterministic, non-repeating test bytes (a repeated pattern would hide misplaced fragments). */
const bytes = (length: number, seed: number) => Buffer.from(Array.from({ length }, (_, i) => (i * 131 + seed + (i >> 8) * 7) & 0xff));

t.test('fragments through the fish pump', { skip }, async (t) => {
  const native = loadNative();
  const originCode = `
    const dgram = require('node:dgram'), crypto = require('node:crypto');
    for (const [type, address] of [['udp4', '${ORIGIN}'], ['udp6', '${ORIGIN6}']]) {
      const s = dgram.createSocket(type);
      s.on('message', (m, r) => {
        console.log('udp ' + r.address + ' ' + r.port + ' ' + m.length + ' ' + crypto.createHash('sha256').update(m).digest('hex'));
        s.send(m, r.port, r.address);
      });
      s.bind(9000, address);
    }
    setImmediate(() => console.log('ready'));
  `;
  const harness = await startPumpHarness(t, native, 'ff', originCode);
  const { host, origin, call, track } = harness;
  const [clientFd, unused] = harness.clientFds as [number, number];
  native.closeAll([unused]);

  /** The origin's reassembly counter (IpReasmOKs / Ip6ReasmOKs): what arrived there as fragments. */
  const originReassembled = (family: 4 | 6): number => {
    if (family === 6) {
      const line = /^Ip6ReasmOKs\s+(\d+)$/m.exec(sh(['ip', 'netns', 'exec', origin, 'cat', '/proc/net/snmp6']));
      return Number(line?.[1] ?? 0);
    }
    const lines = sh(['ip', 'netns', 'exec', origin, 'cat', '/proc/net/snmp']).split('\n').filter((l) => l.startsWith('Ip:'));
    const names = lines[0]!.split(/\s+/);
    const values = lines[1]!.split(/\s+/);
    return Number(values[names.indexOf('ReasmOKs')]);
  };


  sh(['ip', '-n', host, 'link', 'set', 'fish0', 'up']);
  sh(['ip', '-n', host, 'route', 'add', 'default', 'dev', 'fish0', 'table', '4242']);
  sh(['ip', '-n', host, '-6', 'route', 'add', 'default', 'dev', 'fish0', 'table', '4242']);
  for (const [flag, egress, icmp] of [['-4', E, 'icmp'], ['-6', E6, 'ipv6-icmp']] as const) {
    sh(['ip', '-n', host, flag, 'rule', 'add', 'pref', '100', 'to', egress, 'ipproto', 'udp', 'dport', `${LO}-${HI}`, 'lookup', '4242']);
    sh(['ip', '-n', host, flag, 'rule', 'add', 'pref', '101', 'to', egress, 'ipproto', icmp, 'lookup', '4242']);
  }

  const replies: Buffer[] = [];
  const client = native.openSeqpacket(clientFd, { message: (data) => replies.push(Buffer.from(data)), drain: () => {}, close: () => {} });
  t.teardown(() => client.close());
  const reply = (what: string, match: (packet: Buffer) => boolean, ms = 5000) =>
    until(what, () => {
      const index = replies.findIndex(match);
      return index < 0 ? null : replies.splice(index, 1)[0]!;
    }, ms);
  const stats = () => call<FishStats>('stats');
  const drops = async () => (await stats()).registrations.find((r) => r.rid === 1)!.drops;

  await call('create', {
    markBase: 0xf15e0000,
    mssClamp: 0,
    reserveTimeoutS: { tcp: 60, udp: 30, icmp: 30 },
    idleTimeoutMs: { tcp: 600_000, udp: 60_000, icmp: 60_000 },
    revalidateAfterMs: 5000,
    verifyChecksums: true,
    fragmentTimeoutMs: FRAGMENT_TIMEOUT_MS,
    fragmentEntries: 8,
  });
  await call('addRegistration', { rid: 1, egress4: E, egress6: E6, portLo: LO, portHi: HI, protocols: { tcp: true, udp: true, icmp: true }, maxMappings: 0 });

  const escape = (text: string) => text.replace(/[.:]/g, (c) => `\\${c}`);

  for (const family of [4, 6] as const) {
    await t.test(`IPv${family}: a 3000-byte UDP datagram in fragments reaches the origin whole and its echo comes back whole`, async (t) => {
      const payload = bytes(3000, family);
      const clientPort = 5000 + family;
      const whole = udpPacket({ src: family === 4 ? CLIENT : CLIENT6, dst: family === 4 ? ORIGIN : ORIGIN6, sport: clientPort, dport: 9000, payload });
      // As a client's stack with a 1280-byte MTU would send it; the last fragment first, to exercise ordering.
      const fragments = family === 4 ? fragmentIpv4(whole, 1256) : fragmentIpv6(whole, 1232);
      t.ok(fragments.length >= 3, `${fragments.length} fragments`);
      const reassembledBefore = originReassembled(family);
      for (const fragment of [fragments[fragments.length - 1]!, ...fragments.slice(0, -1)]) client.send(fragment, []);

      const echo = parseIpPacket(await reply('the echo', (b) => {
        const p = parseIpPacket(b);
        return p?.family === family && p.protocol === 17 && p.dport === clientPort;
      }))!;
      t.equal(echo.payload.length, 3000, 'one message with the whole datagram');
      t.equal(sha(echo.payload), sha(payload), 'the payload is intact');
      t.ok(echo.checksumsValid, 'IP header and UDP checksums verify');
      t.equal(echo.src, family === 4 ? ORIGIN : ORIGIN6);
      t.equal(echo.dst, family === 4 ? CLIENT : CLIENT6, 'to the client address');
      t.equal(echo.sport, 9000);

      const seen = new RegExp(`^udp ${escape(family === 4 ? E : E6)} (\\d+) (\\d+) (\\w+)$`, 'm').exec(harness.originLog());
      t.ok(seen && Number(seen[1]) >= LO && Number(seen[1]) <= HI, `the origin saw the egress address and a slice port: ${seen?.[0]}`);
      t.equal(Number(seen?.[2]), 3000, 'the origin got 3000 bytes');
      t.equal(seen?.[3], sha(payload), 'the origin got them intact');
      t.ok(originReassembled(family) > reassembledBefore, `they arrived at the origin as fragments (IPv${family} reassembly counter rose)`);
      const d = await drops();
      t.notOk(Object.keys(d).some((name) => name.startsWith('fragment')), `no fragment drops: ${JSON.stringify(d)}`);
      const returnDrops = (await stats()).returnDrops;
      t.notOk(Object.keys(returnDrops).some((name) => name.startsWith('fragment')), `no return fragment drops: ${JSON.stringify(returnDrops)}`);
    });

    await t.test(`IPv${family}: a big ping (2000-byte payload) in fragments is answered whole`, async (t) => {
      const payload = bytes(2000, 40 + family);
      const request = icmpEchoPacket({ src: family === 4 ? CLIENT : CLIENT6, dst: family === 4 ? ORIGIN : ORIGIN6, id: 900 + family, seq: 1, payload });
      const fragments = family === 4 ? fragmentIpv4(request, 1000, 0x5151) : fragmentIpv6(request, 1000, 0x51515151);
      for (const fragment of fragments) client.send(fragment, []);
      const echo = parseIpPacket(await reply('the echo reply', (b) => {
        const p = parseIpPacket(b);
        return p?.family === family && (p.protocol === 1 || p.protocol === 58) && p.kind === (family === 4 ? 0 : 129);
      }))!;
      t.equal(echo.sport, 900 + family, 'the client echo id');
      t.equal(sha(echo.payload), sha(payload), '2000 bytes back intact');
      t.ok(echo.checksumsValid, 'checksums verify');
    });
  }

  await t.test("IPv6 is split for the tun's MTU, read from the device as it changes", async (t) => {
    sh(['ip', '-n', host, 'link', 'set', 'fish0', 'mtu', '1400']);
    t.teardown(() => {
      sh(['ip', '-n', host, 'link', 'set', 'fish0', 'mtu', '1500']);
    });
    const dump = spawn('ip', ['netns', 'exec', host, 'tcpdump', '-i', 'fish0', '-n', '-l', `ip6 and src host ${E6}`], { stdio: ['ignore', 'pipe', 'pipe'] });
    track(dump);
    t.teardown(() => {
      if (dump.exitCode === null && dump.signalCode === null) dump.kill('SIGKILL');
    });
    let seen = '';
    dump.stdout!.on('data', (chunk: Buffer) => (seen += chunk.toString()));
    dump.stderr!.on('data', (chunk: Buffer) => (seen += chunk.toString()));
    await until('tcpdump to listen', () => seen.includes('listening on'));
    // (1400 - 40 - 8) rounded down to 8: 1352 bytes per fragment. The pump reads the MTU again every second, so
    // datagrams (as fragments: Fish splits only what the client fragmented; a whole one too big for the path gets
    // the kernel's packet-too-big) go out until one is split for the new MTU. Each gets its echo.
    const payload = bytes(3000, 13);
    const datagram = udpPacket({ src: CLIENT6, dst: ORIGIN6, sport: 5300, dport: 9000, payload });
    let id = 0x01000000;
    let sent = 0;
    await until('a datagram split for MTU 1400', () => {
      for (const fragment of fragmentIpv6(datagram, 1232, id++)) client.send(fragment, []);
      sent++;
      return /frag \(0\|1352\)/.test(seen);
    }, 5000).catch((error: Error) => {
      throw new Error(`${error.message}: ${seen}`);
    });
    const sizes = [...seen.matchAll(/frag \((\d+)\|(\d+)\)/g)].map((m) => Number(m[2]));
    t.ok(sizes.length >= 3, `${sizes.length} fragments seen on fish0, of sizes ${[...new Set(sizes)].join(', ')}`);
    const switched = sizes.indexOf(1352);
    t.ok(sizes.slice(switched).every((size) => size <= 1352), 'once read, no fragment exceeds the new MTU');
    // The echoes need not come back: the origin fragments them for its 1500-byte link, and the host refuses to
    // re-fragment them for a 1400-byte fish0 (it sends the origin a packet-too-big, as for any forwarded IPv6).
    await until('the origin to get the split datagram whole', () =>
      harness.originLog().split('\n').filter((line) => line.startsWith(`udp ${E6} `) && line.endsWith(` 3000 ${sha(payload)}`)).length === sent);
    t.pass(`the origin got all ${sent} datagrams whole`);
  });

  await t.test('overlapping fragments drop the whole datagram, later ones too, each counted', async (t) => {
    const before = (await drops()).fragmentOverlap ?? 0;
    const whole = udpPacket({ src: CLIENT, dst: ORIGIN, sport: 5100, dport: 9000, payload: bytes(3000, 7) });
    const [first, second, third] = fragmentIpv4(whole, 1256, 0x6161);
    // The second again, moved back 8 bytes into the first's range (RFC 5722 style overlap).
    const overlapping = Buffer.from(second!);
    overlapping.writeUInt16BE(0x2000 | ((second!.readUInt16BE(6) & 0x1fff) - 1), 6);
    overlapping.writeUInt16BE(0, 10);
    let total = 0;
    for (let i = 0; i < 20; i += 2) total += overlapping.readUInt16BE(i);
    while (total > 0xffff) total = (total & 0xffff) + (total >>> 16);
    overlapping.writeUInt16BE(~total & 0xffff, 10);
    for (const fragment of [first!, overlapping, second!, third!]) client.send(fragment, []);
    await until('four overlap drops', async () => ((await drops()).fragmentOverlap ?? 0) - before === 4);
    t.pass('the two held, and the two that came after the overlap, are counted as fragmentOverlap');
    t.notOk(replies.some((b) => parseIpPacket(b)?.dport === 5100), 'nothing went through');
    t.notOk(harness.originLog().includes(sha(bytes(3000, 7))), 'the origin never saw it');
  });

  await t.test('incomplete datagrams time out, a full table and an oversized datagram refuse, each counted', async (t) => {
    const before = await drops();
    const whole = udpPacket({ src: CLIENT, dst: ORIGIN, sport: 5200, dport: 9000, payload: bytes(3000, 9) });
    const [first, second] = fragmentIpv4(whole, 1256, 0x7171);
    client.send(first!, []);
    client.send(second!, []);
    const started = Date.now();
    await until('the timeout', async () => ((await drops()).fragmentTimeout ?? 0) - (before.fragmentTimeout ?? 0) === 2, FRAGMENT_TIMEOUT_MS + 3000);
    t.ok(Date.now() - started >= FRAGMENT_TIMEOUT_MS - 50, `not before the timeout (${Date.now() - started} ms)`);

    // A registration may hold a quarter of fragmentEntries (8) datagrams at once: the third is refused.
    const heldBefore = await drops();
    for (const id of [0x7401, 0x7402, 0x7403]) {
      client.send(fragmentIpv4(udpPacket({ src: CLIENT, dst: ORIGIN, sport: 5202, dport: 9000, payload: bytes(3000, id) }), 1256, id)[0]!, []);
    }
    await until('the table-full drop', async () => ((await drops()).fragmentTableFull ?? 0) - (heldBefore.fragmentTableFull ?? 0) === 1);
    t.pass('counted as fragmentTableFull');
    await until('the two held to time out', async () => ((await drops()).fragmentTimeout ?? 0) - (heldBefore.fragmentTimeout ?? 0) === 2, FRAGMENT_TIMEOUT_MS + 3000);
    t.pass('and the two held then time out');

    // A fragment ending past 65535 bytes.
    const far = Buffer.from(first!);
    far.writeUInt16BE(0x2000 | 8180, 6);
    far.writeUInt16BE(0x7272, 4);
    far.writeUInt16BE(0, 10);
    let total = 0;
    for (let i = 0; i < 20; i += 2) total += far.readUInt16BE(i);
    while (total > 0xffff) total = (total & 0xffff) + (total >>> 16);
    far.writeUInt16BE(~total & 0xffff, 10);
    client.send(far, []);
    await until('the too-big drop', async () => ((await drops()).fragmentTooBig ?? 0) - (before.fragmentTooBig ?? 0) === 1);
    t.pass('counted as fragmentTooBig');

    // The pump still serves fragmented traffic afterwards.
    const payload = bytes(3000, 11);
    for (const fragment of fragmentIpv4(udpPacket({ src: CLIENT, dst: ORIGIN, sport: 5201, dport: 9000, payload }), 1256, 0x7373)) client.send(fragment, []);
    const echo = parseIpPacket(await reply('the echo after the drops', (b) => parseIpPacket(b)?.dport === 5201))!;
    t.equal(sha(echo.payload), sha(payload));
  });
});

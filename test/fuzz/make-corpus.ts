// Writes the packet fuzzer's seed corpus (test/fuzz/packet-corpus/): real IPv4/IPv6 packets as a Linux client
// and server send them, plus the shapes native/packet.h must refuse. Run it after changing it and commit the
// output: `node --import tsx test/fuzz/make-corpus.ts`.
//
// Names say what a file is: `tcp-*` files are complete TCP packets whose checksums verify (the fuzz test checks
// this), everything else (`udp-`, `frag-`, `ext-`, `trunc-`, `bad-`) is something ParseTcp refuses.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ACK, FIN, PSH, RST, SYN, fragmentIpv4, fragmentIpv6, icmpEchoPacket, icmpErrorPacket, mssOption, tcpPacket, udpPacket, type SegmentSpec } from '../helpers/packets.js';

const out = path.join(path.dirname(fileURLToPath(import.meta.url)), 'packet-corpus');

const v4 = { src: '192.0.2.10', dst: '198.51.100.7' };
const v6 = { src: '2001:db8::10', dst: '2001:db8:1::7' };

/** One's-complement sum, folded, not inverted. */
function sum(bytes: Buffer, total = 0): number {
  for (let i = 0; i + 1 < bytes.length; i += 2) total += bytes.readUInt16BE(i);
  if (bytes.length % 2) total += bytes[bytes.length - 1]! << 8;
  while (total > 0xffff) total = (total & 0xffff) + (total >>> 16);
  return total;
}

/** Where the TCP header starts. */
const tcpStart = (packet: Buffer) => (packet[0]! >> 4 === 4 ? (packet[0]! & 0x0f) * 4 : 40);

/** Recomputes the IPv4 header checksum (after an edit). */
function fixIpv4Header(packet: Buffer): Buffer {
  const header = (packet[0]! & 0x0f) * 4;
  packet.writeUInt16BE(0, 10);
  packet.writeUInt16BE(~sum(packet.subarray(0, header)) & 0xffff, 10);
  return packet;
}

/** Recomputes the TCP checksum (after an edit), over the IP total length. */
function fixTcp(packet: Buffer): Buffer {
  const family = packet[0]! >> 4;
  const start = tcpStart(packet);
  const total = family === 4 ? packet.readUInt16BE(2) : 40 + packet.readUInt16BE(4);
  const tcp = packet.subarray(start, total);
  tcp.writeUInt16BE(0, 16);
  const addresses = family === 4 ? packet.subarray(12, 20) : packet.subarray(8, 40);
  const pseudo = sum(addresses, 6 + tcp.length);
  tcp.writeUInt16BE(~sum(tcp, pseudo) & 0xffff, 16);
  return packet;
}

// The options Linux puts in a SYN: MSS, SACK permitted, timestamps, NOP, window scale.
const timestamps = (value: number, echo: number) => {
  const option = Buffer.alloc(10);
  option[0] = 8;
  option[1] = 10;
  option.writeUInt32BE(value, 2);
  option.writeUInt32BE(echo, 6);
  return option;
};
const synOptions = (mss: number) => Buffer.concat([mssOption(mss), Buffer.from([4, 2]), timestamps(0x1a2b3c4d, 0), Buffer.from([1, 3, 3, 7])]);
const ackOptions = () => Buffer.concat([Buffer.from([1, 1]), timestamps(0x1a2b3c99, 0x55667788)]);

const client = (addresses: { src: string; dst: string }, spec: Partial<SegmentSpec>): Buffer =>
  tcpPacket({ ...addresses, sport: 43_512, dport: 443, seq: 0x11223344, flags: SYN, ...spec });
const server = (addresses: { src: string; dst: string }, spec: Partial<SegmentSpec>): Buffer =>
  tcpPacket({ src: addresses.dst, dst: addresses.src, sport: 443, dport: 43_512, seq: 0x55667788, ack: 0x11223345, flags: SYN | ACK, ...spec });

const request = Buffer.from('GET /index.html HTTP/1.1\r\nHost: example.test\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n');

const files: Record<string, Buffer> = {};

for (const [family, addresses, mss] of [['v4', v4, 1460], ['v6', v6, 1440]] as const) {
  files[`tcp-${family}-syn-options`] = client(addresses, { options: synOptions(mss), window: 64_240 });
  files[`tcp-${family}-syn-bare`] = client(addresses, {});
  files[`tcp-${family}-synack`] = server(addresses, { options: synOptions(mss - 40), window: 65_160 });
  files[`tcp-${family}-ack`] = client(addresses, { flags: ACK, seq: 0x11223345, ack: 0x55667789, options: ackOptions() });
  files[`tcp-${family}-ack-data`] = client(addresses, { flags: PSH | ACK, seq: 0x11223345, ack: 0x55667789, options: ackOptions(), payload: request });
  files[`tcp-${family}-data-odd`] = server(addresses, { flags: PSH | ACK, seq: 0x55667789, ack: 0x1122339e, payload: Buffer.from('HTTP/1.1 200 OK\r\n') });
  files[`tcp-${family}-fin`] = client(addresses, { flags: FIN | ACK, seq: 0x1122339e, ack: 0x5566779a, options: ackOptions() });
  files[`tcp-${family}-rst`] = server(addresses, { flags: RST, seq: 0x5566779a, ack: 0 });
  // MSS after one NOP: its value sits at an odd offset of the TCP header (the checksum window straddles it).
  files[`tcp-${family}-syn-mss-odd`] = client(addresses, { options: Buffer.from([1, 2, 4, 0x05, 0xb4, 1, 1, 1]) });
  // A malformed MSS (length 3) before the real one, and an MSS of 0xffff.
  files[`tcp-${family}-syn-mss-second`] = client(addresses, { options: Buffer.from([2, 3, 0, 2, 4, 0xff, 0xff, 0]) });
  // 40 bytes of options, the most a TCP header holds.
  files[`tcp-${family}-syn-max-options`] = client(addresses, {
    options: Buffer.concat([synOptions(9000), Buffer.from([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0])]),
  });
}

// IPv4 header options (IHL 6): the TCP header starts at 24.
{
  const plain = client(v4, { options: synOptions(1460) });
  const packet = Buffer.concat([plain.subarray(0, 20), Buffer.from([1, 1, 1, 0]), plain.subarray(20)]);
  packet[0] = 0x46;
  packet.writeUInt16BE(packet.length, 2);
  files['tcp-v4-ip-options'] = fixTcp(fixIpv4Header(packet));
}
// Ethernet-style padding after the IP total length: ignored by the parser, left alone by the rewrite.
files['tcp-v4-trailing-bytes'] = Buffer.concat([client(v4, { flags: ACK, ack: 1 }), Buffer.alloc(6, 0xee)]);
// A TCP checksum field of 0xffff where a full computation gives 0: the other one's-complement zero, which
// verifies too. The two payload bytes are chosen to make the sum come out that way.
{
  const packet = client(v4, { flags: PSH | ACK, ack: 1, payload: Buffer.from('zz') });
  const start = tcpStart(packet);
  packet.writeUInt16BE(0, packet.length - 2);
  fixTcp(packet);
  // With the two bytes at 0 the checksum is c; making them ~c (as a word) drives the sum of the rest to 0xffff.
  packet.writeUInt16BE(packet.readUInt16BE(start + 16), packet.length - 2);
  fixTcp(packet);
  if (packet.readUInt16BE(start + 16) !== 0) throw new Error('the 0xffff checksum seed did not come out as 0');
  packet.writeUInt16BE(0xffff, start + 16);
  files['tcp-v4-checksum-ffff'] = packet;
}

// What ParseTcp refuses.
{
  const syn = files['tcp-v4-syn-options']!;
  const bad = Buffer.from(syn);
  bad[bad.length - 1]! ^= 0x01; // the last option byte (window scale): the TCP checksum no longer verifies
  files['bad-v4-tcp-checksum'] = bad;
  const header = Buffer.from(syn);
  header[8] = 63; // TTL changed without fixing the header checksum
  files['bad-v4-ip-checksum'] = header;
  const version = Buffer.from(syn);
  version[0] = 0x55;
  files['bad-version'] = version;
  const ihl = Buffer.from(syn);
  ihl[0] = 0x44;
  files['bad-v4-ihl'] = fixIpv4Header(ihl);
  const offset = Buffer.from(syn);
  offset[20 + 12] = 0x40; // data offset 4 words
  files['bad-v4-data-offset'] = fixTcp(offset);
  const past = Buffer.from(files['tcp-v6-syn-bare']!);
  past[40 + 12] = 0xf0; // a 60-byte TCP header in a 20-byte segment
  files['bad-v6-data-offset-past-end'] = fixTcp(past);
}
files['trunc-v4-19'] = files['tcp-v4-syn-options']!.subarray(0, 19);
files['trunc-v4-headers'] = files['tcp-v4-syn-options']!.subarray(0, 30);
files['trunc-v4-tail'] = files['tcp-v4-ack-data']!.subarray(0, files['tcp-v4-ack-data']!.length - 1);
files['trunc-v6-39'] = files['tcp-v6-syn-options']!.subarray(0, 39);
files['trunc-v6-tail'] = files['tcp-v6-ack-data']!.subarray(0, 60);
files['trunc-v4-options'] = files['tcp-v4-syn-max-options']!.subarray(0, 20 + 40);

files['udp-v4'] = udpPacket({ ...v4, sport: 53_000, dport: 53, payload: Buffer.from('\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00', 'latin1') });
files['udp-v6'] = udpPacket({ ...v6, sport: 53_000, dport: 443, payload: Buffer.alloc(33, 0xc3) });
files['frag-v4-first'] = client(v4, { flags: PSH | ACK, ack: 1, payload: request, fragment: 0x2000 });
files['frag-v4-last'] = client(v4, { flags: PSH | ACK, ack: 1, payload: request, fragment: 0x0010 });

// IPv6 with a hop-by-hop header (PadN) before TCP: not walked, so refused as not TCP.
{
  const plain = files['tcp-v6-syn-options']!;
  const hopByHop = Buffer.from([6, 0, 1, 4, 0, 0, 0, 0]);
  const packet = Buffer.concat([plain.subarray(0, 40), hopByHop, plain.subarray(40)]);
  packet[6] = 0;
  packet.writeUInt16BE(packet.length - 40, 4);
  files['ext-v6-hop-by-hop'] = packet;
}

// Fish's packets (native/ip_packet.h): ICMP echo both ways, and ICMP errors quoting what Fish sent from its egress
// address (UDP with a checksum, UDP without, TCP, an echo request), truncated as routers quote.
{
  const egress4 = { src: '203.0.113.7', dst: '198.51.100.2' };
  const egress6 = { src: '2001:db8:e::7', dst: '2001:db8:1::2' };
  files['icmp-v4-echo'] = icmpEchoPacket({ ...v4, id: 0x1234, seq: 1, payload: Buffer.from('abcdefghijklmnopqrstuvwabcdefghi') });
  files['icmp-v4-echo-reply'] = icmpEchoPacket({ ...v4, id: 40001, seq: 1, payload: Buffer.from('abcdefgh'), reply: true });
  files['icmp-v6-echo'] = icmpEchoPacket({ ...v6, id: 0x1234, seq: 7, payload: Buffer.alloc(13, 0x5a) });
  files['icmp-v6-echo-reply'] = icmpEchoPacket({ ...v6, id: 40001, seq: 7, reply: true });
  const udp4 = udpPacket({ ...egress4, sport: 40003, dport: 9000, payload: Buffer.from('hello there') });
  const tcp4 = tcpPacket({ ...egress4, sport: 40004, dport: 7, seq: 99, flags: PSH | ACK, ack: 5, payload: request });
  const echo4 = icmpEchoPacket({ ...egress4, id: 40005, seq: 3, payload: Buffer.from('ping') });
  const udp4NoSum = Buffer.from(udp4);
  udp4NoSum.writeUInt16BE(0, 26);
  const router4 = '198.51.100.1';
  files['icmp-v4-port-unreachable'] = icmpErrorPacket({ src: egress4.dst, dst: egress4.src, type: 3, code: 3, quote: udp4 });
  files['icmp-v4-port-unreachable-nosum'] = icmpErrorPacket({ src: egress4.dst, dst: egress4.src, type: 3, code: 3, quote: udp4NoSum });
  files['icmp-v4-frag-needed-tcp28'] = icmpErrorPacket({ src: router4, dst: egress4.src, type: 3, code: 4, rest: 1280, quote: tcp4.subarray(0, 28) });
  files['icmp-v4-frag-needed-tcp'] = icmpErrorPacket({ src: router4, dst: egress4.src, type: 3, code: 4, rest: 1280, quote: tcp4.subarray(0, 548 - 28) });
  files['icmp-v4-time-exceeded-echo'] = icmpErrorPacket({ src: router4, dst: egress4.src, type: 11, code: 0, quote: echo4 });
  const udp6 = udpPacket({ ...egress6, sport: 40003, dport: 9000, payload: Buffer.from('hello six') });
  const tcp6 = tcpPacket({ ...egress6, sport: 40004, dport: 7, seq: 99, flags: PSH | ACK, ack: 5, payload: request });
  const echo6 = icmpEchoPacket({ ...egress6, id: 40005, seq: 3 });
  files['icmp-v6-port-unreachable'] = icmpErrorPacket({ src: egress6.dst, dst: egress6.src, type: 1, code: 4, quote: udp6 });
  files['icmp-v6-packet-too-big'] = icmpErrorPacket({ src: '2001:db8:1::1', dst: egress6.src, type: 2, code: 0, rest: 1280, quote: tcp6 });
  files['icmp-v6-time-exceeded-echo'] = icmpErrorPacket({ src: '2001:db8:1::1', dst: egress6.src, type: 3, code: 0, quote: echo6 });
}

// Fragments Fish reassembles (native/reassembly.h): the first and last fragments of a UDP datagram per family,
// and the whole datagrams, which the fuzzer splits and reassembles again in orders of its choosing.
{
  const payload = Buffer.from(Array.from({ length: 1400 }, (_, i) => (i * 7 + (i >> 8)) & 0xff));
  const whole4 = udpPacket({ ...v4, sport: 5000, dport: 9000, payload });
  const whole6 = udpPacket({ ...v6, sport: 5000, dport: 9000, payload });
  const fragments4 = fragmentIpv4(whole4, 512);
  const fragments6 = fragmentIpv6(whole6, 512);
  files['udp-v4-1400'] = whole4;
  files['udp-v6-1400'] = whole6;
  files['frag-v4-udp-first'] = fragments4[0]!;
  files['frag-v4-udp-last'] = fragments4[fragments4.length - 1]!;
  files['frag-v6-udp-first'] = fragments6[0]!;
  files['frag-v6-udp-last'] = fragments6[fragments6.length - 1]!;
}

fs.rmSync(out, { recursive: true, force: true });
fs.mkdirSync(out, { recursive: true });
for (const [name, bytes] of Object.entries(files)) fs.writeFileSync(path.join(out, `${name}.bin`), bytes);
console.log(`${Object.keys(files).length} packets in ${path.relative(process.cwd(), out)}`);

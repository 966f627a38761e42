/**
 * Raw IPv4/IPv6 TCP, UDP and ICMP echo packets built and read in tests, with correct checksums (RFC 1071),
 * so a test can play a client's TCP stack by hand through a flow socket, answer a client through an
 * on-ramp sink, and forge every kind of bad packet.
 */
import net from 'node:net';

/** An address as bytes (4 or 16). */
export function addressBytes(address: string): Buffer {
  if (net.isIPv4(address)) return Buffer.from(address.split('.').map(Number));
  if (!net.isIPv6(address)) throw new Error(`not an IP address: ${address}`);
  const [head = '', tail = ''] = address.split('::');
  const words = (part: string) => (part ? part.split(':').map((word) => parseInt(word, 16)) : []);
  const left = words(head);
  const right = address.includes('::') ? words(tail) : [];
  const all = [...left, ...new Array(8 - left.length - right.length).fill(0), ...right];
  const bytes = Buffer.alloc(16);
  all.forEach((word, i) => bytes.writeUInt16BE(word, i * 2));
  return bytes;
}

/** One's-complement sum, folded, not inverted. */
function sum(...parts: Buffer[]): number {
  let total = 0;
  for (const part of parts) {
    for (let i = 0; i + 1 < part.length; i += 2) total += part.readUInt16BE(i);
    if (part.length % 2) total += part[part.length - 1]! << 8;
  }
  while (total > 0xffff) total = (total & 0xffff) + (total >>> 16);
  return total;
}

/** TCP flag bits. */
export const FIN = 0x01;
export const SYN = 0x02;
export const RST = 0x04;
export const PSH = 0x08;
export const ACK = 0x10;

/** What a forged segment says. */
export interface SegmentSpec {
  src: string;
  dst: string;
  sport: number;
  dport: number;
  seq: number;
  ack?: number;
  flags: number;
  window?: number;
  /** TCP options, padded to 4 bytes by the caller. */
  options?: Buffer;
  payload?: Buffer;
  /** IPv4 flags+fragment offset word (0x2000 = more fragments). */
  fragment?: number;
}

function ipHeader(family: 4 | 6, protocol: number, src: Buffer, dst: Buffer, payloadLength: number, fragment = 0): Buffer {
  if (family === 4) {
    const header = Buffer.alloc(20);
    header[0] = 0x45;
    header.writeUInt16BE(20 + payloadLength, 2);
    header.writeUInt16BE(0x1234, 4);
    header.writeUInt16BE(fragment || 0x4000, 6);
    header[8] = 64;
    header[9] = protocol;
    src.copy(header, 12);
    dst.copy(header, 16);
    header.writeUInt16BE(~sum(header) & 0xffff, 10);
    return header;
  }
  const header = Buffer.alloc(40);
  header[0] = 0x60;
  header.writeUInt16BE(payloadLength, 4);
  header[6] = protocol;
  header[7] = 64;
  src.copy(header, 8);
  dst.copy(header, 24);
  return header;
}

function pseudoHeader(src: Buffer, dst: Buffer, protocol: number, length: number): Buffer {
  const tail = Buffer.alloc(src.length === 4 ? 4 : 8);
  if (src.length === 4) {
    tail[1] = protocol;
    tail.writeUInt16BE(length, 2);
  } else {
    tail.writeUInt32BE(length, 0);
    tail[7] = protocol;
  }
  return Buffer.concat([src, dst, tail]);
}

/** A complete IPv4 or IPv6 TCP packet (family taken from the addresses). */
export function tcpPacket(spec: SegmentSpec): Buffer {
  const src = addressBytes(spec.src);
  const dst = addressBytes(spec.dst);
  const options = spec.options ?? Buffer.alloc(0);
  const payload = spec.payload ?? Buffer.alloc(0);
  const tcp = Buffer.alloc(20 + options.length + payload.length);
  tcp.writeUInt16BE(spec.sport, 0);
  tcp.writeUInt16BE(spec.dport, 2);
  tcp.writeUInt32BE(spec.seq >>> 0, 4);
  tcp.writeUInt32BE((spec.ack ?? 0) >>> 0, 8);
  tcp[12] = ((20 + options.length) / 4) << 4;
  tcp[13] = spec.flags;
  tcp.writeUInt16BE(spec.window ?? 65_535, 14);
  options.copy(tcp, 20);
  payload.copy(tcp, 20 + options.length);
  tcp.writeUInt16BE(~sum(pseudoHeader(src, dst, 6, tcp.length), tcp) & 0xffff, 16);
  return Buffer.concat([ipHeader(src.length === 4 ? 4 : 6, 6, src, dst, tcp.length, spec.fragment), tcp]);
}

/** A complete UDP packet. */
export function udpPacket(spec: { src: string; dst: string; sport: number; dport: number; payload: Buffer }): Buffer {
  const src = addressBytes(spec.src);
  const dst = addressBytes(spec.dst);
  const udp = Buffer.alloc(8 + spec.payload.length);
  udp.writeUInt16BE(spec.sport, 0);
  udp.writeUInt16BE(spec.dport, 2);
  udp.writeUInt16BE(udp.length, 4);
  spec.payload.copy(udp, 8);
  udp.writeUInt16BE(~sum(pseudoHeader(src, dst, 17, udp.length), udp) & 0xffff || 0xffff, 6);
  return Buffer.concat([ipHeader(src.length === 4 ? 4 : 6, 17, src, dst, udp.length), udp]);
}

/** A parsed TCP packet (enough to play the client side of a handshake). */
export interface ParsedSegment {
  family: 4 | 6;
  src: Buffer;
  dst: Buffer;
  sport: number;
  dport: number;
  seq: number;
  ack: number;
  flags: number;
  payload: Buffer;
  /** Whether the IPv4 header and TCP checksums verify. */
  checksumsValid: boolean;
  /** The MSS option, if any. */
  mss: number | null;
}

/** Reads a TCP packet; null if it is not one. */
export function parseTcpPacket(packet: Buffer): ParsedSegment | null {
  const family = packet[0]! >> 4;
  let headerLength: number;
  let total: number;
  let src: Buffer;
  let dst: Buffer;
  if (family === 4) {
    headerLength = (packet[0]! & 0x0f) * 4;
    total = packet.readUInt16BE(2);
    if (packet[9] !== 6) return null;
    src = packet.subarray(12, 16);
    dst = packet.subarray(16, 20);
  } else if (family === 6) {
    headerLength = 40;
    total = 40 + packet.readUInt16BE(4);
    if (packet[6] !== 6) return null;
    src = packet.subarray(8, 24);
    dst = packet.subarray(24, 40);
  } else {
    return null;
  }
  const tcp = packet.subarray(headerLength, total);
  const dataOffset = (tcp[12]! >> 4) * 4;
  let mss: number | null = null;
  for (let i = 20; i < dataOffset; ) {
    const kind = tcp[i]!;
    if (kind === 0) break;
    if (kind === 1) {
      i++;
      continue;
    }
    if (kind === 2) mss = tcp.readUInt16BE(i + 2);
    i += tcp[i + 1]! || 1;
  }
  const ipValid = family === 6 || sum(packet.subarray(0, headerLength)) === 0xffff;
  return {
    family: family as 4 | 6,
    src,
    dst,
    sport: tcp.readUInt16BE(0),
    dport: tcp.readUInt16BE(2),
    seq: tcp.readUInt32BE(4),
    ack: tcp.readUInt32BE(8),
    flags: tcp[13]!,
    payload: Buffer.from(tcp.subarray(dataOffset)),
    checksumsValid: ipValid && sum(pseudoHeader(src, dst, 6, tcp.length), tcp) === 0xffff,
    mss,
  };
}

/** The MSS option (4 bytes). */
export const mssOption = (mss: number): Buffer => Buffer.from([2, 4, mss >> 8, mss & 0xff]);

/** An address's bytes (4 or 16) as text, in the form Node prints (`::` compression for IPv6). */
export function addressString(bytes: Buffer): string {
  if (bytes.length === 4) return [...bytes].join('.');
  const words = Array.from({ length: 8 }, (_, i) => bytes.readUInt16BE(i * 2).toString(16));
  // RFC 5952: the longest run (first if tied) of two or more zero words becomes `::`.
  let bestStart = -1;
  let bestLength = 1;
  for (let i = 0; i < 8; ) {
    if (words[i] !== '0') {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && words[j] === '0') j++;
    if (j - i > bestLength) [bestStart, bestLength] = [i, j - i];
    i = j;
  }
  if (bestStart < 0) return words.join(':');
  return `${words.slice(0, bestStart).join(':')}::${words.slice(bestStart + bestLength).join(':')}`;
}

/** ICMP (IPv4) and ICMPv6 echo type numbers. */
export const ICMP_ECHO_REPLY = 0;
export const ICMP_ECHO_REQUEST = 8;
export const ICMP6_ECHO_REQUEST = 128;
export const ICMP6_ECHO_REPLY = 129;

/**
 * A complete ICMP (IPv4) or ICMPv6 echo request or reply. ICMPv6's checksum covers a pseudo-header
 * (RFC 4443 §2.3), ICMPv4's only the message (RFC 792).
 */
export function icmpEchoPacket(spec: { src: string; dst: string; reply?: boolean; id: number; seq: number; payload?: Buffer }): Buffer {
  const src = addressBytes(spec.src);
  const dst = addressBytes(spec.dst);
  const v4 = src.length === 4;
  const payload = spec.payload ?? Buffer.alloc(0);
  const icmp = Buffer.alloc(8 + payload.length);
  icmp[0] = v4 ? (spec.reply ? ICMP_ECHO_REPLY : ICMP_ECHO_REQUEST) : spec.reply ? ICMP6_ECHO_REPLY : ICMP6_ECHO_REQUEST;
  icmp.writeUInt16BE(spec.id, 4);
  icmp.writeUInt16BE(spec.seq, 6);
  payload.copy(icmp, 8);
  const protocol = v4 ? 1 : 58;
  icmp.writeUInt16BE(~(v4 ? sum(icmp) : sum(pseudoHeader(src, dst, protocol, icmp.length), icmp)) & 0xffff, 2);
  return Buffer.concat([ipHeader(v4 ? 4 : 6, protocol, src, dst, icmp.length), icmp]);
}

/** Any IPv4/IPv6 packet, read far enough to tell flows apart (no IPv6 extension headers are walked). */
export interface ParsedIpPacket {
  family: 4 | 6;
  /** 6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, or whatever the header says. */
  protocol: number;
  src: string;
  dst: string;
  /** TCP/UDP ports; for ICMP echo, the identifier as both (what NAT keys it by), else 0. */
  sport: number;
  dport: number;
  /** ICMP type, TCP flags: whatever distinguishes packets of the protocol; 0 for UDP. */
  kind: number;
  /** ICMP echo sequence number (0 otherwise). */
  seq: number;
  /** The transport payload (after the TCP/UDP/ICMP header). */
  payload: Buffer;
  /** The IPv4 identification (0 for IPv6). */
  id: number;
  /** The L4 message (TCP segment, UDP datagram, ICMP message), as far as the IP length says. */
  l4: Buffer;
  /** IPv4 header and transport checksums verify (UDP checksum 0 over IPv4 counts as valid). */
  checksumsValid: boolean;
}

/** Reads an IPv4/IPv6 TCP, UDP or ICMP packet; null if it is none of those or is cut short. */
export function parseIpPacket(packet: Buffer): ParsedIpPacket | null {
  if (packet.length < 1) return null;
  const family = packet[0]! >> 4;
  let headerLength: number;
  let total: number;
  let protocol: number;
  let src: Buffer;
  let dst: Buffer;
  if (family === 4 && packet.length >= 20) {
    headerLength = (packet[0]! & 0x0f) * 4;
    total = packet.readUInt16BE(2);
    protocol = packet[9]!;
    src = packet.subarray(12, 16);
    dst = packet.subarray(16, 20);
  } else if (family === 6 && packet.length >= 40) {
    headerLength = 40;
    total = 40 + packet.readUInt16BE(4);
    protocol = packet[6]!;
    src = packet.subarray(8, 24);
    dst = packet.subarray(24, 40);
  } else {
    return null;
  }
  if (total > packet.length || total < headerLength) return null;
  const l4 = packet.subarray(headerLength, total);
  const ipValid = family === 6 || sum(packet.subarray(0, headerLength)) === 0xffff;
  const base = { family: family as 4 | 6, protocol, src: addressString(src), dst: addressString(dst), id: family === 4 ? packet.readUInt16BE(4) : 0, l4 };
  if (protocol === 6) {
    const tcp = parseTcpPacket(packet);
    if (!tcp) return null;
    return { ...base, sport: tcp.sport, dport: tcp.dport, kind: tcp.flags, seq: tcp.seq, payload: tcp.payload, checksumsValid: tcp.checksumsValid };
  }
  if (protocol === 17) {
    if (l4.length < 8) return null;
    const checksum = l4.readUInt16BE(6);
    const l4Valid = (family === 4 && checksum === 0) || sum(pseudoHeader(src, dst, 17, l4.length), l4) === 0xffff;
    return { ...base, sport: l4.readUInt16BE(0), dport: l4.readUInt16BE(2), kind: 0, seq: 0, payload: Buffer.from(l4.subarray(8)), checksumsValid: ipValid && l4Valid };
  }
  if (protocol === 1 || protocol === 58) {
    if (l4.length < 8) return null;
    const l4Valid = protocol === 1 ? sum(l4) === 0xffff : sum(pseudoHeader(src, dst, 58, l4.length), l4) === 0xffff;
    const type = l4[0]!;
    const echo = protocol === 1 ? type === ICMP_ECHO_REQUEST || type === ICMP_ECHO_REPLY : type === ICMP6_ECHO_REQUEST || type === ICMP6_ECHO_REPLY;
    const id = echo ? l4.readUInt16BE(4) : 0;
    return { ...base, sport: id, dport: id, kind: type, seq: echo ? l4.readUInt16BE(6) : 0, payload: Buffer.from(l4.subarray(8)), checksumsValid: ipValid && l4Valid };
  }
  return null;
}

/**
 * An ICMP (IPv4) or ICMPv6 error from `src` to `dst` quoting `quote` (the offending packet, as far as the
 * router quoted it). `rest` is the 4 bytes after the checksum (the next-hop MTU of frag-needed, the MTU of a
 * packet-too-big, 0 otherwise).
 */
export function icmpErrorPacket(spec: { src: string; dst: string; type: number; code: number; quote: Buffer; rest?: number }): Buffer {
  const src = addressBytes(spec.src);
  const dst = addressBytes(spec.dst);
  const v4 = src.length === 4;
  const icmp = Buffer.alloc(8 + spec.quote.length);
  icmp[0] = spec.type;
  icmp[1] = spec.code;
  icmp.writeUInt32BE((spec.rest ?? 0) >>> 0, 4);
  spec.quote.copy(icmp, 8);
  const covered = v4 ? [icmp] : [pseudoHeader(src, dst, 58, icmp.length), icmp];
  icmp.writeUInt16BE(~sum(...covered) & 0xffff, 2);
  return Buffer.concat([ipHeader(v4 ? 4 : 6, v4 ? 1 : 58, src, dst, icmp.length), icmp]);
}

/**
 * Splits a whole IPv4 packet into fragments (RFC 791 §3.2) of at most `payload` bytes of its payload each (a
 * multiple of 8), DF cleared, MF on all but the last, identification `id`, header checksums fixed.
 */
export function fragmentIpv4(packet: Buffer, payload: number, id = 0x4242): Buffer[] {
  const headerLength = (packet[0]! & 0x0f) * 4;
  const total = packet.readUInt16BE(2);
  const body = packet.subarray(headerLength, total);
  const fragments: Buffer[] = [];
  for (let offset = 0; offset < body.length; offset += payload) {
    const chunk = body.subarray(offset, offset + payload);
    const header = Buffer.from(packet.subarray(0, headerLength));
    header.writeUInt16BE(headerLength + chunk.length, 2);
    header.writeUInt16BE(id, 4);
    const more = offset + chunk.length < body.length;
    header.writeUInt16BE((more ? 0x2000 : 0) | (offset / 8), 6);
    header.writeUInt16BE(0, 10);
    header.writeUInt16BE(~sum(header) & 0xffff, 10);
    fragments.push(Buffer.concat([header, chunk]));
  }
  return fragments;
}

/**
 * Splits a whole IPv6 packet (no extension headers) into fragments with a Fragment header (RFC 8200 §4.5)
 * carrying at most `payload` bytes (a multiple of 8) of its payload each, identification `id`.
 */
export function fragmentIpv6(packet: Buffer, payload: number, id = 0x42424242): Buffer[] {
  const body = packet.subarray(40, 40 + packet.readUInt16BE(4));
  const fragments: Buffer[] = [];
  for (let offset = 0; offset < body.length; offset += payload) {
    const chunk = body.subarray(offset, offset + payload);
    const header = Buffer.from(packet.subarray(0, 40));
    header.writeUInt16BE(8 + chunk.length, 4);
    header[6] = 44;
    const fragmentHeader = Buffer.alloc(8);
    fragmentHeader[0] = packet[6]!;
    const more = offset + chunk.length < body.length;
    fragmentHeader.writeUInt16BE(offset | (more ? 1 : 0), 2);
    fragmentHeader.writeUInt32BE(id >>> 0, 4);
    fragments.push(Buffer.concat([header, fragmentHeader, chunk]));
  }
  return fragments;
}

/**
 * ctnetlink messages (uapi linux/netfilter/nfnetlink_conntrack.h, conntrack(8); notes/fish-kernel.md §7):
 * the reservation Fish makes for a new flow, lookups and deletes by tuple, the flush and dump of Fish's
 * entries by mark, the decoding of dumped entries (and DESTROY events), and the CTA_LABELS layout that lets
 * a restarted Fish rebuild its mappings from conntrack alone.
 *
 * The native pump builds reservations itself on the hot path; {@link reserveMessage} is the same layout for
 * tests and tools. ct attribute scalars are big-endian; nlmsghdr and nlattr headers are host order.
 */
import { addressBytes, addressVersion, familyOf, formatAddress, versionOf, type IpVersion } from './address.js';
import {
  Attributes,
  NLMSG_HDRLEN,
  NLM_F,
  NetlinkDecodeError,
  attrBe16,
  attrBe32,
  attrBytes,
  attrNested,
  attrU8,
  decodeHeader,
  encodeMessage,
  type Attribute,
} from './message.js';

/** `NETLINK_NETFILTER`, the protocol for `netlinkOpen`. */
export const NETLINK_NETFILTER = 12;
/** `NFNL_SUBSYS_CTNETLINK`: the high byte of every conntrack message type. */
export const NFNL_SUBSYS_CTNETLINK = 1;
/** Conntrack message types (subsystem included). */
export const CT_MSG = { NEW: 0x100, GET: 0x101, DELETE: 0x102 } as const;
/** `nl_groups` bit of DESTROY events: 1 << (NFNLGRP_CONNTRACK_DESTROY(3) − 1). */
export const CT_DESTROY_GROUP = 0x4;
/** `nl_groups` bit of NEW events: 1 << (NFNLGRP_CONNTRACK_NEW(1) − 1). */
export const CT_NEW_GROUP = 0x1;

/** Top-level conntrack attributes. */
export const CTA = {
  TUPLE_ORIG: 1,
  TUPLE_REPLY: 2,
  STATUS: 3,
  PROTOINFO: 4,
  TIMEOUT: 7,
  MARK: 8,
  ID: 12,
  ZONE: 18,
  MARK_MASK: 21,
  LABELS: 22,
} as const;
/** Inside a tuple. */
export const CTA_TUPLE = { IP: 1, PROTO: 2 } as const;
/** Inside CTA_TUPLE_IP. */
export const CTA_IP = { V4_SRC: 1, V4_DST: 2, V6_SRC: 3, V6_DST: 4 } as const;
/** Inside CTA_TUPLE_PROTO (ICMPv6 uses its own three numbers). */
export const CTA_PROTO = {
  NUM: 1,
  SRC_PORT: 2,
  DST_PORT: 3,
  ICMP_ID: 4,
  ICMP_TYPE: 5,
  ICMP_CODE: 6,
  ICMPV6_ID: 7,
  ICMPV6_TYPE: 8,
  ICMPV6_CODE: 9,
} as const;
/** CTA_PROTOINFO > CTA_PROTOINFO_TCP > CTA_PROTOINFO_TCP_STATE. */
export const CTA_PROTOINFO_TCP = 1;
/** See {@link CTA_PROTOINFO_TCP}. */
export const CTA_PROTOINFO_TCP_STATE = 1;

/** Status bits (linux/netfilter/nf_conntrack_common.h). */
export const IPS = { EXPECTED: 0x1, SEEN_REPLY: 0x2, ASSURED: 0x4, CONFIRMED: 0x8, SRC_NAT: 0x10, DST_NAT: 0x20, DYING: 0x200 } as const;
/** TCP conntrack states (CTA_PROTOINFO_TCP_STATE). */
export const TCP_CONNTRACK = { NONE: 0, SYN_SENT: 1, SYN_RECV: 2, ESTABLISHED: 3, FIN_WAIT: 4, CLOSE_WAIT: 5, LAST_ACK: 6, TIME_WAIT: 7, CLOSE: 8 } as const;

/** Fish's mark space: `FISH_MARK_BASE | rid`; `FISH_MARK_MASK` selects all of Fish's entries. */
export const FISH_MARK_BASE = 0xf15e0000;
/** See {@link FISH_MARK_BASE}. */
export const FISH_MARK_MASK = 0xffff0000;

const IPPROTO_ICMP = 1;
const IPPROTO_ICMPV6 = 58;

/** One direction of a connection. Ports for TCP/UDP; id/type/code for ICMP and ICMPv6 (echo). */
export interface ConntrackTuple {
  src: string;
  dst: string;
  /** IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6). */
  protocol: number;
  srcPort?: number;
  dstPort?: number;
  icmpId?: number;
  icmpType?: number;
  icmpCode?: number;
}

/** A decoded conntrack entry (from a dump, a GET or an event). */
export interface ConntrackEntry {
  family: IpVersion;
  /** The message type it came in (CT_MSG.NEW for dumps and GETs, CT_MSG.DELETE for DESTROY events). */
  messageType: number;
  orig: ConntrackTuple | null;
  reply: ConntrackTuple | null;
  status: number | null;
  /** Seconds left. */
  timeout: number | null;
  mark: number | null;
  /** The 16 raw bytes of CTA_LABELS, when the entry has labels. */
  labels: Buffer | null;
  /** CTA_PROTOINFO_TCP_STATE for TCP entries. */
  tcpState: number | null;
  id: number | null;
  zone: number | null;
}

function nfgenmsg(family: IpVersion): Buffer {
  // u8 family, u8 version (NFNETLINK_V0), be16 res_id 0.
  return Buffer.from([familyOf(family), 0, 0, 0]);
}

function tupleFamily(tuple: ConntrackTuple): IpVersion {
  const version = addressVersion(tuple.src);
  if (addressVersion(tuple.dst) !== version) throw new TypeError(`a tuple mixes IPv4 and IPv6: ${tuple.src} → ${tuple.dst}`);
  return version;
}

/** Encodes a tuple as the nested attribute `type` (CTA_TUPLE_ORIG or CTA_TUPLE_REPLY). */
export function tupleAttribute(type: number, tuple: ConntrackTuple): Attribute {
  const v4 = tupleFamily(tuple) === 4;
  const ip = attrNested(CTA_TUPLE.IP, [
    attrBytes(v4 ? CTA_IP.V4_SRC : CTA_IP.V6_SRC, addressBytes(tuple.src)),
    attrBytes(v4 ? CTA_IP.V4_DST : CTA_IP.V6_DST, addressBytes(tuple.dst)),
  ]);
  const proto: Attribute[] = [attrU8(CTA_PROTO.NUM, tuple.protocol)];
  if (tuple.protocol === IPPROTO_ICMP || tuple.protocol === IPPROTO_ICMPV6) {
    const six = tuple.protocol === IPPROTO_ICMPV6;
    if (tuple.icmpId !== undefined) proto.push(attrBe16(six ? CTA_PROTO.ICMPV6_ID : CTA_PROTO.ICMP_ID, tuple.icmpId));
    if (tuple.icmpType !== undefined) proto.push(attrU8(six ? CTA_PROTO.ICMPV6_TYPE : CTA_PROTO.ICMP_TYPE, tuple.icmpType));
    if (tuple.icmpCode !== undefined) proto.push(attrU8(six ? CTA_PROTO.ICMPV6_CODE : CTA_PROTO.ICMP_CODE, tuple.icmpCode));
  } else {
    if (tuple.srcPort !== undefined) proto.push(attrBe16(CTA_PROTO.SRC_PORT, tuple.srcPort));
    if (tuple.dstPort !== undefined) proto.push(attrBe16(CTA_PROTO.DST_PORT, tuple.dstPort));
  }
  return attrNested(type, [ip, attrNested(CTA_TUPLE.PROTO, proto)]);
}

/** What a reservation carries (notes §7, "Entries Fish creates"). */
export interface Reservation {
  seq: number;
  orig: ConntrackTuple;
  reply: ConntrackTuple;
  /** CTA_TIMEOUT in seconds (a create without it is EINVAL). */
  timeout: number;
  /** CTA_STATUS; must include IPS_CONFIRMED (ASSURED alone is EBUSY). */
  status: number;
  mark: number;
  /** 16 bytes from {@link encodeLabels}, or null for none. */
  labels: Buffer | null;
}

/**
 * IPCTNL_MSG_CT_NEW with REQUEST|ACK|CREATE|EXCL: an exclusive create, answered EEXIST when either tuple is
 * taken. Attribute order ORIG, REPLY, TIMEOUT, STATUS, MARK, LABELS, as the notes' 168-byte sample.
 */
export function reserveMessage(reservation: Reservation): Buffer {
  const attributes: Attribute[] = [
    tupleAttribute(CTA.TUPLE_ORIG, reservation.orig),
    tupleAttribute(CTA.TUPLE_REPLY, reservation.reply),
    attrBe32(CTA.TIMEOUT, reservation.timeout),
    attrBe32(CTA.STATUS, reservation.status),
    attrBe32(CTA.MARK, reservation.mark),
  ];
  if (reservation.labels) attributes.push(attrBytes(CTA.LABELS, reservation.labels));
  const flags = NLM_F.REQUEST | NLM_F.ACK | NLM_F.CREATE | NLM_F.EXCL;
  return encodeMessage({ type: CT_MSG.NEW, flags, seq: reservation.seq }, nfgenmsg(tupleFamily(reservation.orig)), attributes);
}

/**
 * IPCTNL_MSG_CT_DELETE without a tuple: deletes every entry of `family` whose mark matches `mark` under
 * `mask` (0xffff0000 = all of Fish, 0xffffffff = one registration). Once per family.
 */
export function flushByMarkMessage(options: { seq: number; family: IpVersion; mark: number; mask: number }): Buffer {
  return encodeMessage(
    { type: CT_MSG.DELETE, flags: NLM_F.REQUEST | NLM_F.ACK, seq: options.seq },
    nfgenmsg(options.family),
    [attrBe32(CTA.MARK, options.mark), attrBe32(CTA.MARK_MASK, options.mask)],
  );
}

/** IPCTNL_MSG_CT_GET with REQUEST|DUMP, filtered in the kernel by mark and mask. Once per family. */
export function dumpByMarkMessage(options: { seq: number; family: IpVersion; mark: number; mask: number }): Buffer {
  return encodeMessage(
    { type: CT_MSG.GET, flags: NLM_F.REQUEST | NLM_F.DUMP, seq: options.seq },
    nfgenmsg(options.family),
    [attrBe32(CTA.MARK, options.mark), attrBe32(CTA.MARK_MASK, options.mask)],
  );
}

/** IPCTNL_MSG_CT_GET with REQUEST|DUMP and no filter: every entry of `family` (zone 0 and every other). */
export function dumpAllMessage(options: { seq: number; family: IpVersion }): Buffer {
  return encodeMessage({ type: CT_MSG.GET, flags: NLM_F.REQUEST | NLM_F.DUMP, seq: options.seq }, nfgenmsg(options.family), []);
}

/** IPCTNL_MSG_CT_GET, REQUEST|ACK, by one tuple (ORIG or REPLY both find the entry); ENOENT if absent. */
export function getByTupleMessage(options: { seq: number; tuple: ConntrackTuple; direction?: 'orig' | 'reply' }): Buffer {
  const type = options.direction === 'reply' ? CTA.TUPLE_REPLY : CTA.TUPLE_ORIG;
  return encodeMessage(
    { type: CT_MSG.GET, flags: NLM_F.REQUEST | NLM_F.ACK, seq: options.seq },
    nfgenmsg(tupleFamily(options.tuple)),
    [tupleAttribute(type, options.tuple)],
  );
}

/** IPCTNL_MSG_CT_DELETE, REQUEST|ACK, of the one entry with this tuple; ENOENT if absent. */
export function deleteByTupleMessage(options: { seq: number; tuple: ConntrackTuple; direction?: 'orig' | 'reply' }): Buffer {
  const type = options.direction === 'reply' ? CTA.TUPLE_REPLY : CTA.TUPLE_ORIG;
  return encodeMessage(
    { type: CT_MSG.DELETE, flags: NLM_F.REQUEST | NLM_F.ACK, seq: options.seq },
    nfgenmsg(tupleFamily(options.tuple)),
    [tupleAttribute(type, options.tuple)],
  );
}

function decodeTuple(attributes: Attributes | undefined): ConntrackTuple | null {
  if (!attributes) return null;
  const ip = attributes.nested(CTA_TUPLE.IP);
  const proto = attributes.nested(CTA_TUPLE.PROTO);
  if (!ip || !proto) throw new NetlinkDecodeError('a conntrack tuple without CTA_TUPLE_IP or CTA_TUPLE_PROTO');
  const src = ip.get(CTA_IP.V4_SRC) ?? ip.get(CTA_IP.V6_SRC);
  const dst = ip.get(CTA_IP.V4_DST) ?? ip.get(CTA_IP.V6_DST);
  const protocol = proto.u8(CTA_PROTO.NUM);
  if (!src || !dst || protocol === undefined) throw new NetlinkDecodeError('a conntrack tuple without addresses or protocol');
  const tuple: ConntrackTuple = { src: formatAddress(src), dst: formatAddress(dst), protocol };
  if (protocol === IPPROTO_ICMP || protocol === IPPROTO_ICMPV6) {
    const six = protocol === IPPROTO_ICMPV6;
    const id = proto.be16(six ? CTA_PROTO.ICMPV6_ID : CTA_PROTO.ICMP_ID);
    const type = proto.u8(six ? CTA_PROTO.ICMPV6_TYPE : CTA_PROTO.ICMP_TYPE);
    const code = proto.u8(six ? CTA_PROTO.ICMPV6_CODE : CTA_PROTO.ICMP_CODE);
    if (id !== undefined) tuple.icmpId = id;
    if (type !== undefined) tuple.icmpType = type;
    if (code !== undefined) tuple.icmpCode = code;
  } else {
    const srcPort = proto.be16(CTA_PROTO.SRC_PORT);
    const dstPort = proto.be16(CTA_PROTO.DST_PORT);
    if (srcPort !== undefined) tuple.srcPort = srcPort;
    if (dstPort !== undefined) tuple.dstPort = dstPort;
  }
  return tuple;
}

/** Decodes one conntrack message (a dump entry, a GET answer, a NEW/DESTROY event). */
export function decodeEntry(message: Buffer): ConntrackEntry {
  const header = decodeHeader(message);
  if (header.type >> 8 !== NFNL_SUBSYS_CTNETLINK) throw new NetlinkDecodeError(`not a ctnetlink message: type 0x${header.type.toString(16)}`);
  if (header.length < NLMSG_HDRLEN + 4) throw new NetlinkDecodeError('a truncated nfgenmsg');
  const body = message.subarray(NLMSG_HDRLEN, header.length);
  const attributes = new Attributes(body, 4);
  const tcp = attributes.nested(CTA.PROTOINFO)?.nested(CTA_PROTOINFO_TCP);
  const labels = attributes.get(CTA.LABELS);
  return {
    family: versionOf(body[0] ?? 0),
    messageType: header.type,
    orig: decodeTuple(attributes.nested(CTA.TUPLE_ORIG)),
    reply: decodeTuple(attributes.nested(CTA.TUPLE_REPLY)),
    status: attributes.be32(CTA.STATUS) ?? null,
    timeout: attributes.be32(CTA.TIMEOUT) ?? null,
    mark: attributes.be32(CTA.MARK) ?? null,
    labels: labels ? Buffer.from(labels) : null,
    tcpState: tcp?.u8(CTA_PROTOINFO_TCP_STATE) ?? null,
    id: attributes.be32(CTA.ID) ?? null,
    zone: attributes.be16(CTA.ZONE) ?? null,
  };
}

// ----------------------------------------------------------------------------------------------------------
// Labels: `be32 rid | be16 client port | u8 ver 1 | u8 ipver 4/6 | 8 bytes address` (notes §7).

/** The layout version in byte 6 of Fish's labels. */
export const LABELS_VERSION = 1;

/** What Fish stores in an entry's CTA_LABELS: enough to rebuild the mapping after a restart. */
export interface FishLabels {
  rid: number;
  /** The client's port (ICMP echo: its echo id). */
  clientPort: number;
  ipVersion: IpVersion;
  /**
   * IPv4: the client address. IPv6: the low 64 bits of it as an address with a zero upper half
   * ("::a:b:c:d"); combine with the registration's /64 via {@link clientAddress6}.
   */
  address: string;
}

/** Encodes Fish's 16-byte labels. An IPv6 address keeps only its low 64 bits (the /64 is the registration's). */
export function encodeLabels(labels: FishLabels): Buffer {
  const out = Buffer.alloc(16);
  out.writeUInt32BE(labels.rid >>> 0, 0);
  out.writeUInt16BE(labels.clientPort, 4);
  out[6] = LABELS_VERSION;
  out[7] = labels.ipVersion;
  const bytes = addressBytes(labels.address);
  if (bytes.length !== (labels.ipVersion === 4 ? 4 : 16)) throw new TypeError(`labels: ${labels.address} is not IPv${labels.ipVersion}`);
  if (labels.ipVersion === 4) bytes.copy(out, 8);
  else bytes.copy(out, 8, 8, 16);
  return out;
}

/** Decodes Fish's labels; null when the bytes are not Fish's layout (another user of ct labels, or none). */
export function decodeLabels(labels: Buffer | null): FishLabels | null {
  if (!labels || labels.length !== 16 || labels[6] !== LABELS_VERSION) return null;
  const ipVersion = labels[7];
  if (ipVersion !== 4 && ipVersion !== 6) return null;
  const address =
    ipVersion === 4
      ? formatAddress(labels.subarray(8, 12))
      : formatAddress(Buffer.concat([Buffer.alloc(8), labels.subarray(8, 16)]));
  return { rid: labels.readUInt32BE(0), clientPort: labels.readUInt16BE(4), ipVersion, address };
}

/** The client's IPv6 address: the registration's /64 `prefix` with the labels' low 64 bits. */
export function clientAddress6(prefix: string, low: string): string {
  const out = addressBytes(prefix);
  addressBytes(low).copy(out, 8, 8, 16);
  return formatAddress(out);
}

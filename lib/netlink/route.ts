/**
 * rtnetlink messages Fish's host setup needs (rtnetlink(7), ip-rule(8), uapi linux/rtnetlink.h and
 * linux/fib_rules.h; notes/fish-kernel.md §3 step 4): bring the tun up with an MTU, the default route of
 * Fish's table through the tun, and the policy rules that send return traffic for the egress addresses to that
 * table; plus dumps of rules and routes decoded so a cleanup can find what points at the table.
 *
 * Builders return whole requests (header included); the caller sends them with `netlinkRequest`.
 */
import { addressBytes, addressVersion, familyOf, formatAddress, versionOf, type IpVersion } from './address.js';
import {
  Attributes,
  NLMSG_HDRLEN,
  NLM_F,
  NetlinkDecodeError,
  attrBytes,
  attrU32,
  attrU8,
  decodeHeader,
  encodeMessage,
  host16,
  host32,
  readHost16,
  readHost32,
  type Attribute,
} from './message.js';

/** `NETLINK_ROUTE`, the protocol for `netlinkOpen`. */
export const NETLINK_ROUTE = 0;

/** rtnetlink message types used here. */
export const RTM = {
  NEWLINK: 16,
  GETLINK: 18,
  NEWROUTE: 24,
  DELROUTE: 25,
  GETROUTE: 26,
  NEWRULE: 32,
  DELRULE: 33,
  GETRULE: 34,
} as const;

/** `IFF_UP`. */
export const IFF_UP = 0x1;
/** `IFLA_IFNAME`, `IFLA_MTU`, `IFLA_TXQLEN`. */
export const IFLA = { IFNAME: 3, MTU: 4, TXQLEN: 13 } as const;
/** Route attributes: `RTA_DST`, `RTA_OIF`, `RTA_TABLE`. */
export const RTA = { DST: 1, OIF: 4, PRIORITY: 6, TABLE: 15 } as const;
/** `RTPROT_STATIC`: what `ip route add` marks routes with; a delete with it matches only such routes. */
export const RTPROT_STATIC = 4;
/** `RT_SCOPE_LINK`: a route straight out of a device, no gateway. */
export const RT_SCOPE_LINK = 253;
/** `RTN_UNICAST`. */
export const RTN_UNICAST = 1;
/** Fib rule attributes (linux/fib_rules.h). */
export const FRA = { DST: 1, SRC: 2, PRIORITY: 6, TABLE: 15, IP_PROTO: 22, SPORT_RANGE: 23, DPORT_RANGE: 24 } as const;
/** `FR_ACT_TO_TBL`: a rule that looks up a table. */
export const FR_ACT_TO_TBL = 1;
/** IP protocol numbers used by Fish's rules. */
export const IPPROTO = { ICMP: 1, TCP: 6, UDP: 17, ICMPV6: 58 } as const;

/** Flags of a creating request: REQUEST|ACK|CREATE|EXCL (0x605), as `ip ... add` sends. */
export const CREATE_FLAGS = NLM_F.REQUEST | NLM_F.ACK | NLM_F.CREATE | NLM_F.EXCL;
/** Flags of a request that changes or deletes: REQUEST|ACK. */
export const CHANGE_FLAGS = NLM_F.REQUEST | NLM_F.ACK;
/** Flags of a dump: REQUEST|DUMP. */
export const DUMP_FLAGS = NLM_F.REQUEST | NLM_F.DUMP;

// ----------------------------------------------------------------------------------------------------------
// Link.

/**
 * RTM_NEWLINK on an existing device by index: sets IFF_UP (change mask IFF_UP, so no other flag moves) and,
 * when given, the MTU. Flags REQUEST|ACK: the device must exist.
 */
export function linkSetUp(options: { seq: number; ifindex: number; mtu?: number; txQueueLength?: number }): Buffer {
  const ifinfomsg = Buffer.concat([Buffer.from([0, 0]), host16(0), host32(options.ifindex), host32(IFF_UP), host32(IFF_UP)]);
  const attributes = [
    ...(options.mtu === undefined ? [] : [attrU32(IFLA.MTU, options.mtu)]),
    ...(options.txQueueLength === undefined ? [] : [attrU32(IFLA.TXQLEN, options.txQueueLength)]),
  ];
  return encodeMessage({ type: RTM.NEWLINK, flags: CHANGE_FLAGS, seq: options.seq }, ifinfomsg, attributes);
}

/**
 * RTM_GETLINK by name (IFLA_IFNAME), REQUEST|ACK: one RTM_NEWLINK answer, or ENODEV when there is no such
 * device. Lets a cleanup ask whether the tun exists without creating it.
 */
export function linkGetByName(options: { seq: number; name: string }): Buffer {
  const ifinfomsg = Buffer.concat([Buffer.from([0, 0]), host16(0), host32(0), host32(0), host32(0)]);
  const name = Buffer.concat([Buffer.from(options.name, 'utf8'), Buffer.alloc(1)]);
  return encodeMessage({ type: RTM.GETLINK, flags: CHANGE_FLAGS, seq: options.seq }, ifinfomsg, [attrBytes(IFLA.IFNAME, name)]);
}

/** The interface index and name of an RTM_NEWLINK message. */
export function decodeLink(message: Buffer): { ifindex: number; name: string | null; flags: number; mtu: number | null } {
  const header = decodeHeader(message);
  if (header.type !== RTM.NEWLINK) throw new NetlinkDecodeError(`not an RTM_NEWLINK: type ${header.type}`);
  if (header.length < NLMSG_HDRLEN + 16) throw new NetlinkDecodeError('a truncated ifinfomsg');
  const body = message.subarray(NLMSG_HDRLEN, header.length);
  const attributes = new Attributes(body, 16);
  return {
    ifindex: readHost32(body, 4),
    name: attributes.string(IFLA.IFNAME) ?? null,
    flags: readHost32(body, 8),
    mtu: attributes.u32(IFLA.MTU) ?? null,
  };
}

// ----------------------------------------------------------------------------------------------------------
// Routes.

/** A route as `routeMessage` encodes it and `decodeRoute` returns it. */
export interface Route {
  family: IpVersion;
  /** The table number (RTA_TABLE: tables above 255 do not fit rtmsg's byte). */
  table: number;
  /** Destination prefix; `null` and 0 for the default route. */
  dst: string | null;
  dstLen: number;
  /** RTA_OIF, when the route has one. */
  ifindex: number | null;
  protocol: number;
  scope: number;
  type: number;
}

/**
 * RTM_NEWROUTE / RTM_DELROUTE for `default dev <ifindex> table <table>` (notes §3). `mode: 'create'` sends
 * CREATE|EXCL (EEXIST if there is one already), `'replace'` CREATE|REPLACE (idempotent, and it repoints a
 * route left behind towards an older device). A delete matches protocol static, the table and the device.
 */
export function routeMessage(options: {
  seq: number;
  op: 'add' | 'delete';
  family: IpVersion;
  table: number;
  ifindex?: number | null;
  dst?: string | null;
  dstLen?: number;
  mode?: 'create' | 'replace';
}): Buffer {
  const dstLen = options.dstLen ?? 0;
  const rtmsg = Buffer.concat([
    Buffer.from([familyOf(options.family), dstLen, 0, 0, 0, RTPROT_STATIC, RT_SCOPE_LINK, RTN_UNICAST]),
    host32(0),
  ]);
  const attributes: Attribute[] = [];
  if (options.dst) attributes.push(attrBytes(RTA.DST, addressBytes(options.dst)));
  attributes.push(attrU32(RTA.TABLE, options.table));
  if (options.ifindex) attributes.push(attrU32(RTA.OIF, options.ifindex));
  let flags = CHANGE_FLAGS;
  let type: number = RTM.DELROUTE;
  if (options.op === 'add') {
    type = RTM.NEWROUTE;
    flags = options.mode === 'replace' ? NLM_F.REQUEST | NLM_F.ACK | NLM_F.CREATE | NLM_F.REPLACE : CREATE_FLAGS;
  }
  return encodeMessage({ type, flags, seq: options.seq }, rtmsg, attributes);
}

/** RTM_DELROUTE for a route from a dump, matching its prefix, table, device, protocol and type exactly. */
export function deleteDumpedRoute(options: { seq: number; route: Route }): Buffer {
  const { route } = options;
  const rtmsg = Buffer.concat([
    Buffer.from([familyOf(route.family), route.dstLen, 0, 0, 0, route.protocol, route.scope, route.type]),
    host32(0),
  ]);
  const attributes: Attribute[] = [];
  if (route.dst) attributes.push(attrBytes(RTA.DST, addressBytes(route.dst)));
  attributes.push(attrU32(RTA.TABLE, route.table));
  if (route.ifindex) attributes.push(attrU32(RTA.OIF, route.ifindex));
  return encodeMessage({ type: RTM.DELROUTE, flags: CHANGE_FLAGS, seq: options.seq }, rtmsg, attributes);
}

/** RTM_GETROUTE dump of one family (every table: the kernel filters tables only under strict checking). */
export function routeDump(options: { seq: number; family: IpVersion }): Buffer {
  const rtmsg = Buffer.concat([Buffer.from([familyOf(options.family), 0, 0, 0, 0, 0, 0, 0]), host32(0)]);
  return encodeMessage({ type: RTM.GETROUTE, flags: DUMP_FLAGS, seq: options.seq }, rtmsg);
}

/** Decodes one RTM_NEWROUTE message of a dump; null for families other than IPv4/IPv6. */
export function decodeRoute(message: Buffer): Route | null {
  const header = decodeHeader(message);
  if (header.type !== RTM.NEWROUTE) throw new NetlinkDecodeError(`not an RTM_NEWROUTE: type ${header.type}`);
  if (header.length < NLMSG_HDRLEN + 12) throw new NetlinkDecodeError('a truncated rtmsg');
  const body = message.subarray(NLMSG_HDRLEN, header.length);
  const family = body[0] ?? 0;
  if (family !== 2 && family !== 10) return null;
  const attributes = new Attributes(body, 12);
  const dst = attributes.get(RTA.DST);
  return {
    family: versionOf(family),
    table: attributes.u32(RTA.TABLE) ?? body[4] ?? 0,
    dst: dst ? formatAddress(dst) : null,
    dstLen: body[1] ?? 0,
    ifindex: attributes.u32(RTA.OIF) ?? null,
    protocol: body[5] ?? 0,
    scope: body[6] ?? 0,
    type: body[7] ?? 0,
  };
}

// ----------------------------------------------------------------------------------------------------------
// Rules.

/** A policy rule as Fish writes it: `pref P to E/32 [ipproto X [dport lo-hi]] lookup T`. */
export interface Rule {
  family: IpVersion;
  priority: number;
  table: number;
  /** The egress address (a host prefix), or null for a rule without `to`. */
  dst: string | null;
  /** Prefix length of `dst`; a host prefix (32 / 128) when omitted. */
  dstLen?: number;
  /** FRA_IP_PROTO, or null for any protocol. */
  ipProto: number | null;
  /** FRA_DPORT_RANGE, or null. */
  dport: { lo: number; hi: number } | null;
}

/** A rule from a dump: what Fish matches on, plus the action it takes. */
export interface DumpedRule extends Rule {
  dstLen: number;
  srcLen: number;
  action: number;
  /** FRA_SPORT_RANGE: a rule Fish never writes, but it has to be deleted exactly all the same. */
  sport: { lo: number; hi: number } | null;
  /** Attribute types present that this decoder does not model (iif, fwmark...). */
  otherAttributes: number[];
}

/**
 * RTM_NEWRULE / RTM_DELRULE. Attributes in `ip rule`'s order (PRIORITY, DST, TABLE, IP_PROTO, DPORT_RANGE),
 * which the notes' byte-exact sample follows. A delete carries the same attributes: the kernel deletes the
 * first rule matching every attribute given.
 */
export function ruleMessage(options: { seq: number; op: 'add' | 'delete'; rule: Rule }): Buffer {
  const { rule } = options;
  const dstLen = rule.dst ? (rule.dstLen ?? (addressVersion(rule.dst) === 4 ? 32 : 128)) : 0;
  // fib_rule_hdr: family, dst_len, src_len, tos, table (0: the number is in FRA_TABLE), res1, res2, action,
  // u32 flags.
  const header = Buffer.concat([Buffer.from([familyOf(rule.family), dstLen, 0, 0, 0, 0, 0, FR_ACT_TO_TBL]), host32(0)]);
  const attributes: Attribute[] = [attrU32(FRA.PRIORITY, rule.priority)];
  if (rule.dst) attributes.push(attrBytes(FRA.DST, addressBytes(rule.dst)));
  attributes.push(attrU32(FRA.TABLE, rule.table));
  if (rule.ipProto !== null) attributes.push(attrU8(FRA.IP_PROTO, rule.ipProto));
  // struct fib_rule_port_range { __u16 start; __u16 end; } in host order.
  if (rule.dport) attributes.push({ type: FRA.DPORT_RANGE, value: Buffer.concat([host16(rule.dport.lo), host16(rule.dport.hi)]) });
  const type = options.op === 'add' ? RTM.NEWRULE : RTM.DELRULE;
  const flags = options.op === 'add' ? CREATE_FLAGS : CHANGE_FLAGS;
  return encodeMessage({ type, flags, seq: options.seq }, header, attributes);
}

/** RTM_DELRULE for a rule from a dump, carrying everything it was decoded with. */
export function deleteDumpedRule(options: { seq: number; rule: DumpedRule }): Buffer {
  const { rule } = options;
  const header = Buffer.concat([Buffer.from([familyOf(rule.family), rule.dstLen, 0, 0, 0, 0, 0, rule.action]), host32(0)]);
  const attributes: Attribute[] = [attrU32(FRA.PRIORITY, rule.priority)];
  if (rule.dst) attributes.push(attrBytes(FRA.DST, addressBytes(rule.dst)));
  attributes.push(attrU32(FRA.TABLE, rule.table));
  if (rule.ipProto !== null) attributes.push(attrU8(FRA.IP_PROTO, rule.ipProto));
  if (rule.sport) attributes.push({ type: FRA.SPORT_RANGE, value: Buffer.concat([host16(rule.sport.lo), host16(rule.sport.hi)]) });
  if (rule.dport) attributes.push({ type: FRA.DPORT_RANGE, value: Buffer.concat([host16(rule.dport.lo), host16(rule.dport.hi)]) });
  return encodeMessage({ type: RTM.DELRULE, flags: CHANGE_FLAGS, seq: options.seq }, header, attributes);
}

/** RTM_GETRULE dump of one family. */
export function ruleDump(options: { seq: number; family: IpVersion }): Buffer {
  const header = Buffer.concat([Buffer.from([familyOf(options.family), 0, 0, 0, 0, 0, 0, 0]), host32(0)]);
  return encodeMessage({ type: RTM.GETRULE, flags: DUMP_FLAGS, seq: options.seq }, header);
}

// struct fib_rule_port_range: two host-order u16s.
function portRange(payload: Buffer | undefined): { lo: number; hi: number } | null {
  if (!payload) return null;
  if (payload.length < 4) throw new NetlinkDecodeError(`a port range of ${payload.length} bytes`);
  return { lo: readHost16(payload, 0), hi: readHost16(payload, 2) };
}

/** Decodes one RTM_NEWRULE message of a dump; null for families other than IPv4/IPv6. */
export function decodeRule(message: Buffer): DumpedRule | null {
  const header = decodeHeader(message);
  if (header.type !== RTM.NEWRULE) throw new NetlinkDecodeError(`not an RTM_NEWRULE: type ${header.type}`);
  if (header.length < NLMSG_HDRLEN + 12) throw new NetlinkDecodeError('a truncated fib_rule_hdr');
  const body = message.subarray(NLMSG_HDRLEN, header.length);
  const family = body[0] ?? 0;
  if (family !== 2 && family !== 10) return null;
  const attributes = new Attributes(body, 12);
  const dst = attributes.get(FRA.DST);
  const known = new Set<number>([FRA.DST, FRA.PRIORITY, FRA.TABLE, FRA.IP_PROTO, FRA.SPORT_RANGE, FRA.DPORT_RANGE]);
  return {
    family: versionOf(family),
    priority: attributes.u32(FRA.PRIORITY) ?? 0,
    // Tables above 255 are in FRA_TABLE only (the header byte says RT_TABLE_COMPAT then).
    table: attributes.u32(FRA.TABLE) ?? body[4] ?? 0,
    dst: dst ? formatAddress(dst) : null,
    dstLen: body[1] ?? 0,
    srcLen: body[2] ?? 0,
    action: body[7] ?? 0,
    ipProto: attributes.u8(FRA.IP_PROTO) ?? null,
    sport: portRange(attributes.get(FRA.SPORT_RANGE)),
    dport: portRange(attributes.get(FRA.DPORT_RANGE)),
    otherAttributes: attributes.types().filter((type) => !known.has(type)),
  };
}

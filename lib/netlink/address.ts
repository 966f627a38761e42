/**
 * IP addresses as netlink carries them: 4 or 16 bytes in network order. Kept apart from the message
 * encoders because rtnetlink (FRA_DST, RTA_DST) and ctnetlink (CTA_IP_V4_SRC ...) share them.
 */
import net from 'node:net';

/** 4 for IPv4, 6 for IPv6. */
export type IpVersion = 4 | 6;

/** `AF_INET` and `AF_INET6`, the family bytes of rtmsg, fib_rule_hdr and nfgenmsg. */
export const AF_INET = 2;
/** See {@link AF_INET}. */
export const AF_INET6 = 10;

/** The address family number of an IP version. */
export function familyOf(version: IpVersion): number {
  return version === 4 ? AF_INET : AF_INET6;
}

/** The IP version of an address family number; throws for anything but AF_INET and AF_INET6. */
export function versionOf(family: number): IpVersion {
  if (family === AF_INET) return 4;
  if (family === AF_INET6) return 6;
  throw new RangeError(`not an IP address family: ${family}`);
}

/** The IP version of an address in text form; throws a TypeError for anything else. */
export function addressVersion(address: string): IpVersion {
  const version = net.isIP(address);
  if (version === 4 || version === 6) return version;
  throw new TypeError(`not an IP address: ${JSON.stringify(address)}`);
}

/** Parses an IPv4 or IPv6 address into its 4 or 16 network-order bytes. */
export function addressBytes(address: string): Buffer {
  const version = addressVersion(address);
  if (version === 4) return Buffer.from(address.split('.').map(Number));
  // Expand "::" and an embedded dotted quad, then read eight groups.
  let text = address;
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (dotted?.[1]) {
    const quad = addressBytes(dotted[1]);
    text = `${text.slice(0, -dotted[1].length)}${quad.readUInt16BE(0).toString(16)}:${quad.readUInt16BE(2).toString(16)}`;
  }
  const [head = '', tail] = text.split('::');
  const headGroups = head ? head.split(':') : [];
  const tailGroups = tail ? tail.split(':') : [];
  const zeros = tail === undefined ? [] : new Array<string>(8 - headGroups.length - tailGroups.length).fill('0');
  const groups = [...headGroups, ...zeros, ...tailGroups];
  const bytes = Buffer.alloc(16);
  groups.forEach((group, i) => bytes.writeUInt16BE(parseInt(group, 16), i * 2));
  return bytes;
}

/** Formats 4 or 16 network-order bytes as text (IPv6 in RFC 5952 form: lower case, longest zero run as "::"). */
export function formatAddress(bytes: Uint8Array): string {
  if (bytes.length === 4) return Array.from(bytes).join('.');
  if (bytes.length !== 16) throw new RangeError(`an IP address has 4 or 16 bytes, not ${bytes.length}`);
  const view = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const groups = Array.from({ length: 8 }, (_, i) => view.readUInt16BE(i * 2));
  // RFC 5952 §4.2: compress the longest run of two or more zero groups (the first one on a tie).
  let best = -1;
  let bestLength = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLength) {
      best = i;
      bestLength = j - i;
    }
    i = j;
  }
  const hex = groups.map((group) => group.toString(16));
  if (best < 0) return hex.join(':');
  return `${hex.slice(0, best).join(':')}::${hex.slice(best + bestLength).join(':')}`;
}

/** The canonical text of an address ("2001:DB8:0::7" → "2001:db8::7"), so equal addresses compare equal. */
export function canonicalAddress(address: string): string {
  return formatAddress(addressBytes(address));
}

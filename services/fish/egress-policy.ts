/**
 * Which egress addresses and ports registrations may use. Fish forwards from addresses that are local
 * nowhere, so a proxy naming any address it likes would hijack someone else's: the daemon's operator
 * says which prefixes and which port range are Fish's, and everything else is refused.
 */
import net from 'node:net';

/** One allowed prefix. */
export interface Cidr {
  family: 4 | 6;
  network: bigint;
  bits: number;
  text: string;
  /** The prefix as written (`check-config` prints options as JSON, which has no bigint). */
  toJSON(): string;
}

/** The operator's egress policy (flags `--egress-allow`, `--port-range`, `--max-registrations`). */
export interface EgressPolicy {
  allow: Cidr[];
  portRange: [number, number];
  maxRegistrations: number;
  /** Mappings a registration may hold when it asks for none in particular. */
  defaultMaxMappings: number;
}

/** An address as an unsigned integer of 32 or 128 bits. */
export function addressValue(address: string): bigint {
  if (net.isIPv4(address)) return address.split('.').reduce((value, byte) => (value << 8n) | BigInt(Number(byte)), 0n);
  if (!net.isIPv6(address)) throw new Error(`not an IP address: ${address}`);
  let text = address;
  // An IPv4 tail (::ffff:1.2.3.4) becomes two hex words.
  const tail = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (tail) {
    const v4 = addressValue(tail[1]!);
    text = `${text.slice(0, -tail[1]!.length)}${(v4 >> 16n).toString(16)}:${(v4 & 0xffffn).toString(16)}`;
  }
  const [head = '', rest] = text.split('::');
  const words = (part: string) => (part ? part.split(':') : []);
  const left = words(head);
  const right = rest === undefined ? [] : words(rest);
  const all = [...left, ...new Array<string>(8 - left.length - right.length).fill('0'), ...right];
  return all.reduce((value, word) => (value << 16n) | BigInt(parseInt(word, 16)), 0n);
}

/** Parses `203.0.113.0/24` or `2001:db8::/32`; throws naming `flag` on anything else. */
export function parseCidr(text: string, flag = 'egress-allow'): Cidr {
  const [address = '', prefix] = text.trim().split('/');
  const family = net.isIP(address);
  const max = family === 4 ? 32 : 128;
  const bits = prefix === undefined ? max : Number(prefix);
  if (!family || !Number.isInteger(bits) || bits < 0 || bits > max || prefix === '') {
    throw new Error(`--${flag}: ${JSON.stringify(text)} is not an IPv4 or IPv6 prefix (e.g. 203.0.113.0/24, 2001:db8:e::/64)`);
  }
  const shift = BigInt(max - bits);
  const normalized = `${address}/${bits}`;
  return { family: family as 4 | 6, network: (addressValue(address) >> shift) << shift, bits, text: normalized, toJSON: () => normalized };
}

/** Whether `address` lies inside one of the allowed prefixes. */
export function isAllowed(policy: Pick<EgressPolicy, 'allow'>, address: string): boolean {
  const family = net.isIP(address);
  const value = addressValue(address);
  const max = family === 4 ? 32 : 128;
  return policy.allow.some((cidr) => cidr.family === family && value >> BigInt(max - cidr.bits) === cidr.network >> BigInt(max - cidr.bits));
}

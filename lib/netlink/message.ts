/**
 * Netlink framing shared by rtnetlink and ctnetlink (netlink(7), notes/fish-kernel.md §3–4, §7): the
 * nlmsghdr, attributes (nlattr), sequence numbers, and how the addon's netlink errors are recognised.
 *
 * The nlmsghdr and nlattr headers are in host byte order; attribute payloads are whatever the protocol says
 * (rtnetlink scalars are host order, ctnetlink's are big-endian), so both kinds of scalar helpers are here.
 * Every length is checked while decoding: a message from the kernel is trusted, but a malformed one (or a
 * test's) must end in an error, never in a read past the buffer.
 */
import os from 'node:os';

/** Request flags (nlmsg_flags). `DUMP` is ROOT|MATCH; `EXCL`/`CREATE` are for NEW requests. */
export const NLM_F = {
  REQUEST: 0x1,
  MULTI: 0x2,
  ACK: 0x4,
  ECHO: 0x8,
  DUMP_INTR: 0x10,
  DUMP_FILTERED: 0x20,
  ROOT: 0x100,
  MATCH: 0x200,
  DUMP: 0x300,
  REPLACE: 0x100,
  EXCL: 0x200,
  CREATE: 0x400,
  APPEND: 0x800,
} as const;

/** Control message types every netlink family shares. */
export const NLMSG = { NOOP: 1, ERROR: 2, DONE: 3, OVERRUN: 4 } as const;

/** nlattr type bits: the payload is nested attributes / is in network order. */
export const NLA_F_NESTED = 0x8000;
/** See {@link NLA_F_NESTED}. */
export const NLA_F_NET_BYTEORDER = 0x4000;
/** The type without the two flag bits. */
export const NLA_TYPE_MASK = 0x3fff;

/** sizeof(struct nlmsghdr). */
export const NLMSG_HDRLEN = 16;
/** sizeof(struct nlattr). */
export const NLA_HDRLEN = 4;

/** Rounds a length up to netlink's 4-byte alignment (NLMSG_ALIGN, NLA_ALIGN). */
export function align4(length: number): number {
  return (length + 3) & ~3;
}

const littleEndian = os.endianness() === 'LE';

/** A decoded nlmsghdr. */
export interface NetlinkHeader {
  length: number;
  type: number;
  flags: number;
  seq: number;
  pid: number;
}

/** A malformed netlink message (a length pointing past the buffer, a missing header). */
export class NetlinkDecodeError extends Error {
  /** Stable code for callers that branch on it. */
  readonly code = 'EFDFERRY_NETLINK_DECODE';
  constructor(message: string) {
    super(message);
    this.name = 'NetlinkDecodeError';
  }
}

// ----------------------------------------------------------------------------------------------------------
// Scalars. Host order is what the kernel's own structs use; big-endian is ctnetlink's attribute convention.

/** A host-order u16. */
export function host16(value: number): Buffer {
  const b = Buffer.alloc(2);
  if (littleEndian) b.writeUInt16LE(value);
  else b.writeUInt16BE(value);
  return b;
}

/** A host-order u32. */
export function host32(value: number): Buffer {
  const b = Buffer.alloc(4);
  if (littleEndian) b.writeUInt32LE(value >>> 0);
  else b.writeUInt32BE(value >>> 0);
  return b;
}

/** A big-endian (network order) u16. */
export function be16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value);
  return b;
}

/** A big-endian (network order) u32. */
export function be32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0);
  return b;
}

/** Reads a host-order u16 at `offset`. */
export function readHost16(buffer: Buffer, offset = 0): number {
  return littleEndian ? buffer.readUInt16LE(offset) : buffer.readUInt16BE(offset);
}

/** Reads a host-order u32 at `offset`. */
export function readHost32(buffer: Buffer, offset = 0): number {
  return littleEndian ? buffer.readUInt32LE(offset) : buffer.readUInt32BE(offset);
}

/** Reads a host-order s32 at `offset`. */
export function readHostS32(buffer: Buffer, offset = 0): number {
  return littleEndian ? buffer.readInt32LE(offset) : buffer.readInt32BE(offset);
}

// ----------------------------------------------------------------------------------------------------------
// Attributes.

/** An attribute to encode: a payload, or (nested) a list of attributes. */
export interface Attribute {
  type: number;
  value: Buffer | Attribute[];
}

/** A u8 attribute (a 1-byte payload, padded to 4 on the wire). */
export function attrU8(type: number, value: number): Attribute {
  return { type, value: Buffer.from([value]) };
}

/** A host-order u32 attribute (rtnetlink scalars). */
export function attrU32(type: number, value: number): Attribute {
  return { type, value: host32(value) };
}

/** A big-endian u16 attribute (ctnetlink ports, ICMP ids). */
export function attrBe16(type: number, value: number): Attribute {
  return { type, value: be16(value) };
}

/** A big-endian u32 attribute (ctnetlink status, timeout, mark). */
export function attrBe32(type: number, value: number): Attribute {
  return { type, value: be32(value) };
}

/** An attribute holding raw bytes. */
export function attrBytes(type: number, value: Uint8Array): Attribute {
  return { type, value: Buffer.from(value) };
}

/** A nested attribute: NLA_F_NESTED is set on the wire. */
export function attrNested(type: number, children: Attribute[]): Attribute {
  return { type, value: children };
}

/** Encodes attributes: `u16 len (unpadded) | u16 type`, payload, zero padding to 4. */
export function encodeAttributes(attributes: readonly Attribute[]): Buffer {
  const parts: Buffer[] = [];
  for (const attribute of attributes) {
    const nested = Array.isArray(attribute.value);
    const payload = Array.isArray(attribute.value) ? encodeAttributes(attribute.value) : attribute.value;
    const length = NLA_HDRLEN + payload.length;
    if (length > 0xffff) throw new RangeError(`attribute ${attribute.type} is too long (${length} bytes)`);
    const header = Buffer.concat([host16(length), host16(attribute.type | (nested ? NLA_F_NESTED : 0))]);
    parts.push(header, payload, Buffer.alloc(align4(length) - length));
  }
  return Buffer.concat(parts);
}

/**
 * Decoded attributes of one level. Types are stored without the flag bits; a repeated type keeps its last
 * value (netlink's convention, as nla_parse does).
 */
export class Attributes {
  private readonly map = new Map<number, Buffer>();

  /** Parses `buffer[offset, end)` as a sequence of nlattrs. */
  constructor(buffer: Buffer, offset = 0, end = buffer.length) {
    let at = offset;
    while (at + NLA_HDRLEN <= end) {
      const length = readHost16(buffer, at);
      const type = readHost16(buffer, at + 2) & NLA_TYPE_MASK;
      if (length < NLA_HDRLEN || at + length > end) {
        throw new NetlinkDecodeError(`attribute ${type} at ${at} claims ${length} bytes; ${end - at} remain`);
      }
      this.map.set(type, buffer.subarray(at + NLA_HDRLEN, at + length));
      at += align4(length);
    }
  }

  /** Whether the attribute is present. */
  has(type: number): boolean {
    return this.map.has(type);
  }

  /** The raw payload, or undefined. */
  get(type: number): Buffer | undefined {
    return this.map.get(type);
  }

  /** The attribute types present, in the order first seen. */
  types(): number[] {
    return [...this.map.keys()];
  }

  /** The nested attributes inside `type`, or undefined. */
  nested(type: number): Attributes | undefined {
    const payload = this.map.get(type);
    return payload ? new Attributes(payload) : undefined;
  }

  /** A u8 payload. */
  u8(type: number): number | undefined {
    return this.sized(type, 1)?.readUInt8(0);
  }

  /** A host-order u32 payload. */
  u32(type: number): number | undefined {
    const payload = this.sized(type, 4);
    return payload ? readHost32(payload) : undefined;
  }

  /** A big-endian u16 payload. */
  be16(type: number): number | undefined {
    return this.sized(type, 2)?.readUInt16BE(0);
  }

  /** A big-endian u32 payload. */
  be32(type: number): number | undefined {
    return this.sized(type, 4)?.readUInt32BE(0);
  }

  /** A NUL-terminated string payload. */
  string(type: number): string | undefined {
    const payload = this.map.get(type);
    if (!payload) return undefined;
    const nul = payload.indexOf(0);
    return payload.subarray(0, nul < 0 ? payload.length : nul).toString('utf8');
  }

  private sized(type: number, size: number): Buffer | undefined {
    const payload = this.map.get(type);
    if (payload && payload.length < size) {
      throw new NetlinkDecodeError(`attribute ${type} has ${payload.length} bytes, expected ${size}`);
    }
    return payload;
  }
}

// ----------------------------------------------------------------------------------------------------------
// Messages.

/** What a request's header says besides its length. `pid` is 0: the kernel fills in the sender's port id. */
export interface RequestHeader {
  type: number;
  flags: number;
  seq: number;
}

/** Encodes a whole message: nlmsghdr (host order), the family header, attributes. */
export function encodeMessage(header: RequestHeader, familyHeader: Buffer, attributes: readonly Attribute[] = []): Buffer {
  const body = Buffer.concat([familyHeader, Buffer.alloc(align4(familyHeader.length) - familyHeader.length), encodeAttributes(attributes)]);
  const length = NLMSG_HDRLEN + body.length;
  return Buffer.concat([host32(length), host16(header.type), host16(header.flags), host32(header.seq), host32(0), body]);
}

/** Decodes the nlmsghdr at the start of `message` and checks its length against the buffer. */
export function decodeHeader(message: Buffer): NetlinkHeader {
  if (message.length < NLMSG_HDRLEN) throw new NetlinkDecodeError(`a netlink message of ${message.length} bytes`);
  const header = {
    length: readHost32(message, 0),
    type: readHost16(message, 4),
    flags: readHost16(message, 6),
    seq: readHost32(message, 8),
    pid: readHost32(message, 12),
  };
  if (header.length < NLMSG_HDRLEN || header.length > message.length) {
    throw new NetlinkDecodeError(`nlmsg_len ${header.length} does not fit a ${message.length}-byte buffer`);
  }
  return header;
}

/**
 * Splits a buffer holding several netlink messages back to back (as one recv() returns them) into whole
 * messages. The addon already hands over one message per Buffer; this is for events and tests.
 */
export function splitMessages(buffer: Buffer): Buffer[] {
  const messages: Buffer[] = [];
  let at = 0;
  while (at + NLMSG_HDRLEN <= buffer.length) {
    const { length } = decodeHeader(buffer.subarray(at));
    messages.push(buffer.subarray(at, at + length));
    at += align4(length);
  }
  return messages;
}

/**
 * The payload of an NLMSG_ERROR: 0 for an ACK, otherwise the positive errno. Fish's requests go through the
 * addon, which turns these into exceptions; events and tests decode them here.
 */
export function decodeErrorMessage(message: Buffer): number {
  const header = decodeHeader(message);
  if (header.type !== NLMSG.ERROR || header.length < NLMSG_HDRLEN + 4) {
    throw new NetlinkDecodeError(`not an NLMSG_ERROR: type ${header.type}, ${header.length} bytes`);
  }
  return -readHostS32(message, NLMSG_HDRLEN);
}

// ----------------------------------------------------------------------------------------------------------
// Sequence numbers and errors.

/**
 * Sequence numbers for one socket: 1, 2, ... wrapping before 2^32 and skipping 0 (the seq of kernel events),
 * so a late reply to a timed-out request is never taken for the answer to a later one.
 */
export class SequenceNumbers {
  private last: number;

  /** `start` is the last number handed out (a random start makes replies of a predecessor unlikely to match). */
  constructor(start = 0) {
    this.last = start >>> 0;
  }

  /** The next number. */
  next(): number {
    this.last = (this.last + 1) >>> 0;
    if (this.last === 0) this.last = 1;
    return this.last;
  }
}

/** An error the addon threw for a netlink answer (`syscall: 'netlink'`), or a socket call's error. */
export interface NetlinkError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

/** Whether `error` is the addon's error for a netlink answer with one of `codes` (e.g. `'EEXIST'`). */
export function isNetlinkError(error: unknown, ...codes: string[]): error is NetlinkError {
  if (!(error instanceof Error)) return false;
  const { code, syscall } = error as Partial<NetlinkError>;
  return syscall === 'netlink' && typeof code === 'string' && (codes.length === 0 || codes.includes(code));
}

/**
 * The fixed binary header of every fdferry message (protocol v1) and its pure encoder and decoder.
 *
 * Layout, all integers little-endian (both ends are on one host; little-endian is what every Linux
 * target fdferry runs on uses natively):
 *
 * | offset | size | field      | meaning                                                        |
 * |-------:|-----:|------------|----------------------------------------------------------------|
 * |      0 |    4 | magic      | the bytes `F D F Y` (0x46 0x44 0x46 0x59)                      |
 * |      4 |    1 | version    | 1                                                              |
 * |      5 |    1 | type       | 1 request, 2 reply, 3 error, 4 event                          |
 * |      6 |    2 | flags      | bit 0: the body is in a sealed memfd, attached as the last fd  |
 * |      8 |    4 | requestId  | chosen by the requester; replies and errors echo it; 0 = none |
 * |     12 |    2 | fdCount    | fds attached to this message, the body memfd included          |
 * |     14 |    2 | reserved   | 0                                                              |
 * |     16 |    4 | bodyLength | bytes of UTF-8 JSON body, inline after the header or in memfd  |
 */
import { ProtocolError } from './errors.js';

/** Size of the fixed header in bytes. */
export const HEADER_SIZE = 20;
/** The magic bytes `FDFY` read as a little-endian u32. */
export const MAGIC = 0x59464446;
/** The protocol version this code speaks. */
export const PROTOCOL_VERSION = 1;
/** Largest message, header included; the receive buffer is exactly this size so MSG_TRUNC means a bad peer. */
export const MAX_FRAME = 65536;
/** Largest body carried inline; anything larger travels in a sealed memfd. */
export const MAX_INLINE_BODY = MAX_FRAME - HEADER_SIZE;
/** SCM_MAX_FD: the kernel's limit of fds in one message. */
export const MAX_FDS_PER_MESSAGE = 253;

/** Message types. */
export const MessageType = {
  request: 1,
  reply: 2,
  error: 3,
  event: 4,
} as const;

/** One of the four message type names. */
export type MessageTypeName = keyof typeof MessageType;

/** Header flag: the body is in a sealed memfd attached as the last fd. */
export const FLAG_BODY_IN_MEMFD = 0x1;
const KNOWN_FLAGS = FLAG_BODY_IN_MEMFD;

/** A decoded header. */
export interface FrameHeader {
  version: number;
  type: MessageTypeName;
  flags: number;
  requestId: number;
  fdCount: number;
  bodyLength: number;
}

const typeNames = new Map<number, MessageTypeName>(
  Object.entries(MessageType).map(([name, value]) => [value, name as MessageTypeName]),
);

/** Encodes a header followed by `inlineBody` (empty when the body is in a memfd). */
export function encodeFrame(header: Omit<FrameHeader, 'version'>, inlineBody: Uint8Array): Buffer {
  if (header.flags & FLAG_BODY_IN_MEMFD ? inlineBody.length !== 0 : inlineBody.length !== header.bodyLength) {
    throw new RangeError('inline body length does not match the header');
  }
  if (HEADER_SIZE + inlineBody.length > MAX_FRAME) throw new RangeError('frame larger than MAX_FRAME');
  const frame = Buffer.allocUnsafe(HEADER_SIZE + inlineBody.length);
  frame.writeUInt32LE(MAGIC, 0);
  frame.writeUInt8(PROTOCOL_VERSION, 4);
  frame.writeUInt8(MessageType[header.type], 5);
  frame.writeUInt16LE(header.flags, 6);
  frame.writeUInt32LE(header.requestId >>> 0, 8);
  frame.writeUInt16LE(header.fdCount, 12);
  frame.writeUInt16LE(0, 14);
  frame.writeUInt32LE(header.bodyLength >>> 0, 16);
  frame.set(inlineBody, HEADER_SIZE);
  return frame;
}

/**
 * The request id of a message, if enough of it is readable to reply to, even when the rest is bad: so a
 * malformed request still gets its error (and its fds) back under the id it used.
 */
export function peekRequestId(frame: Uint8Array): number {
  if (frame.length < 12) return 0;
  const view = Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength);
  return view.readUInt32LE(0) === MAGIC ? view.readUInt32LE(8) : 0;
}

/**
 * Whether a message, even a malformed one, says its body is in a memfd (so the last fd is ours to close,
 * not the sender's to get back).
 */
export function peekBodyInMemfd(frame: Uint8Array): boolean {
  if (frame.length < HEADER_SIZE) return false;
  const view = Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength);
  return view.readUInt32LE(0) === MAGIC && (view.readUInt16LE(6) & FLAG_BODY_IN_MEMFD) !== 0;
}

/**
 * Decodes and checks a header against what actually arrived (`frame` bytes, `fdsArrived` fds).
 * Throws a {@link ProtocolError} naming the first thing that is wrong.
 */
export function decodeHeader(frame: Uint8Array, fdsArrived: number, maxBodyBytes: number): FrameHeader {
  if (frame.length < HEADER_SIZE) {
    throw new ProtocolError('EFDFERRY_SHORT', `message of ${frame.length} bytes is shorter than the ${HEADER_SIZE}-byte header`);
  }
  const view = Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength);
  if (view.readUInt32LE(0) !== MAGIC) throw new ProtocolError('EFDFERRY_MAGIC', 'bad magic: not an fdferry message');
  const version = view.readUInt8(4);
  if (version !== PROTOCOL_VERSION) {
    throw new ProtocolError('EFDFERRY_VERSION', `protocol version ${version} is not supported (this daemon speaks ${PROTOCOL_VERSION})`, { supported: [PROTOCOL_VERSION] });
  }
  const type = typeNames.get(view.readUInt8(5));
  if (type === undefined) throw new ProtocolError('EFDFERRY_TYPE', `unknown message type ${view.readUInt8(5)}`);
  const flags = view.readUInt16LE(6);
  if (flags & ~KNOWN_FLAGS) throw new ProtocolError('EFDFERRY_HEADER', `unknown flag bits 0x${flags.toString(16)}`);
  if (view.readUInt16LE(14) !== 0) throw new ProtocolError('EFDFERRY_HEADER', 'reserved header field is not zero');
  const requestId = view.readUInt32LE(8);
  const fdCount = view.readUInt16LE(12);
  const bodyLength = view.readUInt32LE(16);
  if (fdCount !== fdsArrived) {
    throw new ProtocolError('EFDFERRY_FDCOUNT', `header declares ${fdCount} fds but ${fdsArrived} arrived`);
  }
  if (flags & FLAG_BODY_IN_MEMFD) {
    if (frame.length !== HEADER_SIZE) throw new ProtocolError('EFDFERRY_LENGTH', 'a memfd body must not also carry inline bytes');
    if (fdCount < 1) throw new ProtocolError('EFDFERRY_FDCOUNT', 'memfd body flag set but no fd attached');
  } else if (frame.length - HEADER_SIZE !== bodyLength) {
    throw new ProtocolError('EFDFERRY_LENGTH', `header declares a ${bodyLength}-byte body but ${frame.length - HEADER_SIZE} bytes arrived`);
  }
  if (bodyLength > maxBodyBytes) {
    throw new ProtocolError('EFDFERRY_TOOBIG', `body of ${bodyLength} bytes exceeds the limit of ${maxBodyBytes}`, { limit: maxBodyBytes });
  }
  return { version, type, flags, requestId, fdCount, bodyLength };
}

/**
 * A raw protocol connection for the integration tests that must send what the real client never would:
 * hand-built frames (lib/protocol/frame.ts encodeFrame, then bytes patched as needed) over a bare
 * SeqpacketSocket, with whatever fds the test likes. Whatever the daemon answers is decoded with the real
 * codec, so its fds are received exactly as a client would receive them.
 */
import fs from 'node:fs';
import type { NativeBinding } from '../../lib/native.js';
import { MessageCodec, type Message } from '../../lib/protocol/codec.js';
import { encodeFrame, FLAG_BODY_IN_MEMFD, type MessageTypeName } from '../../lib/protocol/frame.js';
import { toNativeAddress } from '../../lib/rpc/socket-path.js';
import { openRecorded, type Recorded } from './native-helpers.js';

/** The bytes of a request frame with an inline JSON body; `fdCount` is what the header declares. */
export function requestFrame(requestId: number, method: string, params: Record<string, unknown> = {}, fdCount = 0): Buffer {
  const body = Buffer.from(JSON.stringify({ method, params }));
  return encodeFrame({ type: 'request', flags: 0, requestId, fdCount, bodyLength: body.length }, body);
}

/** A frame of any type with `body` (raw bytes, not necessarily JSON) inline. */
export function rawFrame(type: MessageTypeName, requestId: number, body: Uint8Array | string, fdCount = 0): Buffer {
  const bytes = typeof body === 'string' ? Buffer.from(body) : body;
  return encodeFrame({ type, flags: 0, requestId, fdCount, bodyLength: bytes.length }, bytes);
}

/** The header of a request whose body is in a memfd attached last (`fdCount` includes it). */
export function memfdHeader(requestId: number, bodyLength: number, fdCount: number): Buffer {
  return encodeFrame({ type: 'request', flags: FLAG_BODY_IN_MEMFD, requestId, fdCount, bodyLength }, new Uint8Array(0));
}

/** A copy of `frame` with `value` written at `offset` (u8, u16 or u32 little-endian by `size`). */
export function patched(frame: Buffer, offset: number, value: number, size: 1 | 2 | 4): Buffer {
  const copy = Buffer.from(frame);
  if (size === 1) copy.writeUInt8(value, offset);
  else if (size === 2) copy.writeUInt16LE(value, offset);
  else copy.writeUInt32LE(value >>> 0, offset);
  return copy;
}

/** A request body as bytes, for a memfd. */
export function requestBody(method: string, params: Record<string, unknown> = {}): Buffer {
  return Buffer.from(JSON.stringify({ method, params }));
}

/** The inode behind an fd: equal inodes mean the same socket or file, whatever the fd number. */
export function inode(fd: number): number {
  return fs.fstatSync(fd).ino;
}

/** A bare protocol connection: frames go out as given, answers come back decoded, in arrival order. */
export class RawConnection {
  readonly recorded: Recorded;
  readonly #codec: MessageCodec;
  readonly #binding: NativeBinding;
  #read = 0;
  #nextId = 1000;

  constructor(binding: NativeBinding, socketPath: string) {
    this.#binding = binding;
    this.#codec = new MessageCodec(binding);
    this.recorded = openRecorded(binding, binding.seqpacketConnect(toNativeAddress(socketPath)));
  }

  /** A request id not used yet on this connection. */
  nextId(): number {
    return this.#nextId++;
  }

  /** Sends one datagram with `fds` attached; the fds stay the caller's. */
  send(frame: Uint8Array, fds: number[] = []): boolean {
    return this.recorded.socket.send(frame, fds);
  }

  /** Messages received and not yet taken with `next`. */
  get unread(): number {
    return this.recorded.messages.items.length - this.#read;
  }

  /** The next answer, decoded (the caller owns its fds). Throws on a receive fault or a message that does not decode. */
  async next(ms = 10_000, what = 'an answer from the daemon'): Promise<Message> {
    const index = this.#read++;
    const all = await this.recorded.messages.wait(index + 1, ms, what);
    const received = all[index]!;
    if (received.fault) throw new Error(`receive fault ${JSON.stringify(received.fault)}`);
    return this.#codec.decode(received.data, received.fds);
  }

  /** Sends a well-formed request and waits for its answer. */
  async call(method: string, params: Record<string, unknown> = {}, fds: number[] = [], ms = 10_000): Promise<Message> {
    const requestId = this.nextId();
    this.send(requestFrame(requestId, method, params, fds.length), fds);
    const message = await this.next(ms, `the answer to ${method}`);
    if (message.requestId !== requestId) {
      this.#binding.closeAll(message.fds);
      throw new Error(`answer to request ${message.requestId}, expected ${requestId}`);
    }
    return message;
  }

  /** Says hello as `owner`; throws unless the daemon accepts. */
  async hello(owner: string): Promise<void> {
    const answer = await this.call('hello', { owner, protocol: 1 });
    if (answer.type !== 'reply') throw new Error(`hello refused: ${JSON.stringify(answer)}`);
  }

  /** Closes the socket (idempotent). */
  close(): void {
    this.recorded.socket.close();
  }
}

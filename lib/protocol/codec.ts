/**
 * Whole messages: header + UTF-8 JSON body (inline, or spilled into a sealed memfd) + fds.
 *
 * The codec owns the memfd handling on both sides, so nothing above it ever sees a body fd: on encode it
 * spills large bodies into a fresh sealed memfd, on decode it checks the seals and size before reading,
 * then closes the memfd whatever happens.
 */
import fs from 'node:fs';
import type { NativeBinding } from '../native.js';
import { ProtocolError } from './errors.js';
import {
  decodeHeader,
  encodeFrame,
  FLAG_BODY_IN_MEMFD,
  HEADER_SIZE,
  MAX_FDS_PER_MESSAGE,
  MAX_INLINE_BODY,
  peekBodyInMemfd,
  peekRequestId,
} from './frame.js';

/** The wire shape of an error body. */
export interface WireError {
  code: string;
  message: string;
  details?: Record<string, unknown>;
}

/** A request: a method name and its parameters. */
export interface RequestMessage {
  type: 'request';
  requestId: number;
  method: string;
  params: Record<string, unknown>;
  fds: number[];
}

/** The successful answer to a request. */
export interface ReplyMessage {
  type: 'reply';
  requestId: number;
  result: Record<string, unknown>;
  fds: number[];
}

/** The failed answer to a request (or, with requestId 0, a connection-level fault). */
export interface ErrorMessage {
  type: 'error';
  requestId: number;
  error: WireError;
  fds: number[];
}

/** Something the daemon pushes: a task result kept until the owner acknowledges its `id`. */
export interface EventMessage {
  type: 'event';
  requestId: number;
  event: string;
  id: string;
  data: Record<string, unknown>;
  fds: number[];
}

/** Any decoded message. `fds` never include the body memfd. */
export type Message = RequestMessage | ReplyMessage | ErrorMessage | EventMessage;

/** A message ready for `SeqpacketSocket.send`. `owned` are fds the codec created and the sender must close after sending. */
export interface EncodedMessage {
  frame: Buffer;
  fds: number[];
  owned: number[];
}

/** The native calls the codec needs; injected so it can be tested with a fake. */
export type CodecBinding = Pick<NativeBinding, 'memfdCreate' | 'memfdSeal' | 'memfdSeals' | 'closeAll' | 'constants'>;

/** Options of a {@link MessageCodec}. */
export interface CodecOptions {
  /** Largest body accepted, inline or in a memfd. */
  maxBodyBytes: number;
}

/** Default limit for a body in a memfd: large enough for a 64 MiB state or batch, small enough to bound memory. */
export const DEFAULT_MAX_BODY_BYTES = 128 * 1024 * 1024;

const isObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === 'object' && value !== null && !Array.isArray(value);

/** Encodes and decodes fdferry messages; see `docs/protocol.md`. */
export class MessageCodec {
  readonly #binding: CodecBinding;
  readonly #maxBodyBytes: number;
  readonly #requiredSeals: number;

  constructor(binding: CodecBinding, options: Partial<CodecOptions> = {}) {
    this.#binding = binding;
    this.#maxBodyBytes = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
    const c = binding.constants;
    this.#requiredSeals = (c.F_SEAL_SHRINK ?? 0) | (c.F_SEAL_GROW ?? 0) | (c.F_SEAL_WRITE ?? 0) | (c.F_SEAL_SEAL ?? 0);
  }

  /** Largest body this codec accepts. */
  get maxBodyBytes(): number {
    return this.#maxBodyBytes;
  }

  /**
   * Encodes a message. Throws {@link ProtocolError} `EFDFERRY_TOOMANYFDS` when the fds (plus a body memfd,
   * if one is needed) exceed 253, and `EFDFERRY_TOOBIG` for a body over the limit. The caller's fds are
   * only referenced, never closed.
   */
  encode(message: Message): EncodedMessage {
    const body = Buffer.from(JSON.stringify(bodyOf(message)), 'utf8');
    if (body.length > this.#maxBodyBytes) {
      throw new ProtocolError('EFDFERRY_TOOBIG', `body of ${body.length} bytes exceeds the limit of ${this.#maxBodyBytes}`);
    }
    const header = { type: message.type, requestId: message.requestId, bodyLength: body.length };
    if (body.length <= MAX_INLINE_BODY) {
      checkFdCount(message.fds.length, false);
      return { frame: encodeFrame({ ...header, flags: 0, fdCount: message.fds.length }, body), fds: message.fds, owned: [] };
    }
    checkFdCount(message.fds.length, true);
    const memfd = this.#binding.memfdCreate('fdferry-body');
    try {
      writeFully(memfd, body);
      this.#binding.memfdSeal(memfd);
    } catch (error) {
      this.#binding.closeAll([memfd]);
      throw error;
    }
    const fds = [...message.fds, memfd];
    return {
      frame: encodeFrame({ ...header, flags: FLAG_BODY_IN_MEMFD, fdCount: fds.length }, new Uint8Array(0)),
      fds,
      owned: [memfd],
    };
  }

  /**
   * Decodes a received message and takes ownership of `fds`. On success the body memfd (if any) is
   * closed and the remaining fds travel with the message. On failure a {@link ProtocolError} is thrown
   * whose `fds` are the ones to give back to the sender (the body memfd is closed, never returned), and
   * whose `requestId` is the id to answer under.
   */
  decode(data: Uint8Array, fds: number[]): Message {
    let header;
    try {
      header = decodeHeader(data, fds.length, this.#maxBodyBytes);
    } catch (error) {
      if (fds.length > 0 && peekBodyInMemfd(data)) {
        this.#binding.closeAll(fds.slice(-1));
        throw withReturn(error, fds.slice(0, -1), peekRequestId(data));
      }
      throw withReturn(error, fds, peekRequestId(data));
    }
    const bodyInMemfd = (header.flags & FLAG_BODY_IN_MEMFD) !== 0;
    const payloadFds = bodyInMemfd ? fds.slice(0, -1) : fds;
    let body: unknown;
    try {
      const bytes = bodyInMemfd
        ? this.#readMemfdBody(fds[fds.length - 1]!, header.bodyLength)
        : data.subarray(HEADER_SIZE);
      body = parseJson(bytes);
    } catch (error) {
      throw withReturn(error, payloadFds, header.requestId);
    } finally {
      if (bodyInMemfd) this.#binding.closeAll([fds[fds.length - 1]!]);
    }
    try {
      return shapeMessage(header.type, header.requestId, body, payloadFds);
    } catch (error) {
      throw withReturn(error, payloadFds, header.requestId);
    }
  }

  #readMemfdBody(fd: number, length: number): Buffer {
    let seals: number;
    try {
      seals = this.#binding.memfdSeals(fd);
    } catch {
      throw new ProtocolError('EFDFERRY_NOTMEMFD', 'the body fd is not a sealable memfd');
    }
    if ((seals & this.#requiredSeals) !== this.#requiredSeals) {
      throw new ProtocolError(
        'EFDFERRY_UNSEALED',
        `the body memfd lacks required seals (has 0x${seals.toString(16)}, needs 0x${this.#requiredSeals.toString(16)})`,
      );
    }
    const size = fs.fstatSync(fd).size;
    if (size !== length) throw new ProtocolError('EFDFERRY_LENGTH', `header declares a ${length}-byte body but the memfd holds ${size}`);
    const buffer = Buffer.allocUnsafe(length);
    let offset = 0;
    while (offset < length) {
      const n = fs.readSync(fd, buffer, offset, length - offset, offset);
      if (n === 0) throw new ProtocolError('EFDFERRY_LENGTH', 'the body memfd ended early');
      offset += n;
    }
    return buffer;
  }
}

function checkFdCount(count: number, withBodyMemfd: boolean): void {
  const total = count + (withBodyMemfd ? 1 : 0);
  if (total > MAX_FDS_PER_MESSAGE) {
    throw new ProtocolError(
      'EFDFERRY_TOOMANYFDS',
      withBodyMemfd
        ? `${count} fds plus the body memfd exceed the ${MAX_FDS_PER_MESSAGE}-fd limit of one message`
        : `${count} fds exceed the ${MAX_FDS_PER_MESSAGE}-fd limit of one message`,
    );
  }
}

function writeFully(fd: number, bytes: Buffer): void {
  let offset = 0;
  while (offset < bytes.length) offset += fs.writeSync(fd, bytes, offset, bytes.length - offset, offset);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/**
 * Deepest nesting a body may have. JSON.parse copes with any depth, but everything after it that recurses
 * (JSON.stringify for a size check or a reply, logging) runs out of stack a few thousand levels down: a
 * body that deep is refused here, before anything else sees it.
 */
export const MAX_JSON_DEPTH = 512;

/** Whether `value` nests deeper than `limit` (iteratively: the check must not recurse either). */
export function nestsDeeperThan(value: unknown, limit: number): boolean {
  const stack: Array<[unknown, number]> = [[value, 1]];
  while (stack.length) {
    const [item, depth] = stack.pop()!;
    if (typeof item !== 'object' || item === null) continue;
    if (depth > limit) return true;
    for (const child of Object.values(item)) if (typeof child === 'object' && child !== null) stack.push([child, depth + 1]);
  }
  return false;
}

function parseJson(bytes: Uint8Array): unknown {
  let value: unknown;
  try {
    value = JSON.parse(utf8.decode(bytes));
  } catch (error) {
    throw new ProtocolError('EFDFERRY_JSON', `body is not UTF-8 JSON: ${(error as Error).message}`);
  }
  if (nestsDeeperThan(value, MAX_JSON_DEPTH)) throw new ProtocolError('EFDFERRY_JSON', `body nests deeper than ${MAX_JSON_DEPTH} levels`);
  return value;
}

function bodyOf(message: Message): Record<string, unknown> {
  switch (message.type) {
    case 'request':
      return { method: message.method, params: message.params };
    case 'reply':
      return { result: message.result };
    case 'error':
      return { error: message.error };
    case 'event':
      return { event: message.event, id: message.id, data: message.data };
  }
}

function shapeMessage(type: Message['type'], requestId: number, body: unknown, fds: number[]): Message {
  if (!isObject(body)) throw new ProtocolError('EFDFERRY_JSON', 'body must be a JSON object');
  switch (type) {
    case 'request': {
      const { method, params = {} } = body;
      if (typeof method !== 'string' || method.length === 0 || method.length > 64) {
        throw new ProtocolError('EFDFERRY_JSON', 'a request body needs "method", a string of 1 to 64 characters');
      }
      if (!isObject(params)) throw new ProtocolError('EFDFERRY_JSON', '"params" must be an object');
      if (requestId === 0) throw new ProtocolError('EFDFERRY_HEADER', 'a request needs a non-zero request id');
      return { type, requestId, method, params, fds };
    }
    case 'reply': {
      if (!isObject(body.result)) throw new ProtocolError('EFDFERRY_JSON', 'a reply body needs "result", an object');
      return { type, requestId, result: body.result, fds };
    }
    case 'error': {
      const error = body.error;
      if (!isObject(error) || typeof error.code !== 'string' || typeof error.message !== 'string') {
        throw new ProtocolError('EFDFERRY_JSON', 'an error body needs "error": {code, message}');
      }
      const wire: WireError = { code: error.code, message: error.message };
      if (isObject(error.details)) wire.details = error.details;
      return { type, requestId, error: wire, fds };
    }
    case 'event': {
      const { event, id, data = {} } = body;
      if (typeof event !== 'string' || typeof id !== 'string' || !isObject(data)) {
        throw new ProtocolError('EFDFERRY_JSON', 'an event body needs "event" and "id" strings and a "data" object');
      }
      return { type, requestId, event, id, data, fds };
    }
  }
}

function withReturn(error: unknown, fds: number[], requestId: number): ProtocolError {
  const protocolError =
    error instanceof ProtocolError ? error : new ProtocolError('EFDFERRY_INTERNAL', (error as Error).message);
  protocolError.fds = fds;
  protocolError.requestId = requestId;
  return protocolError;
}

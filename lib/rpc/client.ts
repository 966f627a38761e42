/**
 * The generic fdferry protocol client that the per-service clients are built on.
 *
 * It correlates replies with requests, applies timeouts, reconnects (saying hello again with the same
 * owner id, so kept results are delivered), and guards every fd it is given: a request takes ownership
 * of its fds and keeps them until the daemon's reply says what happened. Accepted: they are closed (the
 * daemon holds its own copies). Rejected, timed out or disconnected: they come back to the caller on the
 * error, so nothing handed over is ever lost — even when the kernel dropped fds in transit.
 */
import { EventEmitter } from 'node:events';
import type { NativeBinding } from '../native.js';
import type { EventMessage, Message } from '../protocol/codec.js';
import { ProtocolError, isErrorCode } from '../protocol/errors.js';
import { PROTOCOL_VERSION } from '../protocol/frame.js';
import { Channel, type ChannelBinding } from './channel.js';
import { toNativeAddress } from './socket-path.js';

/** The native calls a client needs. */
export type ClientBinding = ChannelBinding & Pick<NativeBinding, 'seqpacketConnect'>;

/** What the daemon says in reply to `hello`. */
export interface HelloResult {
  protocol: number;
  service: string;
  version: string;
  pid: number;
  generation: number;
  pending: number;
  limits: { maxFdsPerMessage: number; maxInlineBody: number; maxBodyBytes: number; maxInflight: number };
  methods: string[];
}

/** A successful reply; the caller owns `fds`. */
export interface RpcReply {
  result: Record<string, unknown>;
  fds: number[];
}

/** A pushed result; whoever handles the `event` event owns `fds` and should `ack` the id once it is safe. */
export interface RpcEvent {
  event: string;
  id: string;
  data: Record<string, unknown>;
  fds: number[];
}

/** Options of an {@link RpcClient}. */
export interface RpcClientOptions {
  /** The daemon's socket: a path or `@abstract`. */
  path: string;
  /** This application's owner id; results of long tasks are delivered to it, also after a reconnect. */
  owner: string;
  binding: ClientBinding;
  /** Reconnect after the connection drops (default true), with exponential back-off. */
  reconnect?: boolean;
  reconnectMinDelayMs?: number;
  reconnectMaxDelayMs?: number;
  /** Default timeout of a request in milliseconds; 0 waits for ever (default 30 s). */
  requestTimeoutMs?: number;
}

/** Events of an {@link RpcClient}. */
export interface RpcClientEvents {
  /** Connected and said hello (also after each reconnect). */
  connect: [hello: HelloResult];
  /** The connection dropped. */
  disconnect: [error: Error | null];
  /** A pushed result. If nobody listens, its fds are closed and it is not acknowledged (it will come again). */
  event: [event: RpcEvent];
  /** Something went wrong outside any request (a malformed message from the daemon, a failed reconnect). */
  error: [error: Error];
}

interface Pending {
  method: string;
  heldFds: number[];
  resolve: (reply: RpcReply) => void;
  reject: (error: ProtocolError) => void;
  timer: NodeJS.Timeout | null;
}

/** A connection to one fdferry daemon. */
export class RpcClient extends EventEmitter<RpcClientEvents> {
  readonly #options: Required<Omit<RpcClientOptions, 'binding'>> & { binding: ClientBinding };
  readonly #pending = new Map<number, Pending>();
  #channel: Channel | null = null;
  #hello: HelloResult | null = null;
  #nextRequestId = 1;
  #closedByUser = false;
  #reconnectDelay: number;
  #reconnectTimer: NodeJS.Timeout | null = null;
  #connecting: Promise<HelloResult> | null = null;
  #refed = true;

  constructor(options: RpcClientOptions) {
    super();
    this.#options = {
      reconnect: true,
      reconnectMinDelayMs: 50,
      reconnectMaxDelayMs: 5_000,
      requestTimeoutMs: 30_000,
      ...options,
    };
    this.#reconnectDelay = this.#options.reconnectMinDelayMs;
  }

  /** The daemon's hello reply, or null while disconnected. */
  get hello(): HelloResult | null {
    return this.#hello;
  }

  /** Whether the client is connected and has said hello. */
  get connected(): boolean {
    return this.#hello !== null && this.#channel !== null && !this.#channel.closed;
  }

  /** Connects and says hello; resolves with the daemon's hello reply. */
  connect(): Promise<HelloResult> {
    if (this.connected) return Promise.resolve(this.#hello!);
    this.#closedByUser = false;
    this.#connecting ??= this.#open().finally(() => {
      this.#connecting = null;
    });
    return this.#connecting;
  }

  /**
   * Sends a request and waits for its reply. Takes ownership of `fds`: they are closed once the daemon
   * accepts, and handed back on the rejection (`error.fds`) otherwise.
   */
  async request(
    method: string,
    params: Record<string, unknown> = {},
    fds: number[] = [],
    options: { timeoutMs?: number } = {},
  ): Promise<RpcReply> {
    if (!this.connected && method !== 'hello') {
      try {
        await this.connect();
      } catch (error) {
        throw new ProtocolError('EFDFERRY_DISCONNECTED', `not connected: ${(error as Error).message}`, undefined, fds);
      }
    }
    return this.#send(method, params, fds, options.timeoutMs ?? this.#options.requestTimeoutMs);
  }

  /** Acknowledges pushed results so the daemon can forget them (and close its copies of their fds). */
  async ack(ids: string[]): Promise<{ acked: number; unknown: string[] }> {
    const reply = await this.request('ack', { ids });
    return reply.result as { acked: number; unknown: string[] };
  }

  /** Lets the process exit while the client is connected. */
  unref(): void {
    this.#refed = false;
    this.#channel?.unref();
  }

  /** Keeps the process alive while connected (the default). */
  ref(): void {
    this.#refed = true;
    this.#channel?.ref();
  }

  /** Closes the connection for good; requests in progress fail with their fds returned. */
  close(): void {
    this.#closedByUser = true;
    if (this.#reconnectTimer) clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    this.#channel?.close();
  }

  /** Why the daemon refused this connection (an error with request id 0), until the close that follows. */
  #connectionError: ProtocolError | null = null;

  /**
   * Connects, retrying while the daemon's listen backlog is full (EAGAIN: a burst of connections ahead of
   * us, which the daemon accepts in a moment) until the request timeout.
   */
  async #connectSocket(): Promise<number> {
    const deadline = Date.now() + (this.#options.requestTimeoutMs || 30_000);
    for (let delay = 5; ; delay = Math.min(delay * 2, 100)) {
      try {
        return this.#options.binding.seqpacketConnect(toNativeAddress(this.#options.path));
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EAGAIN' || Date.now() + delay > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
  }

  async #open(): Promise<HelloResult> {
    const fd = await this.#connectSocket();
    const channel = new Channel(fd, this.#options.binding);
    this.#channel = channel;
    if (!this.#refed) channel.unref();
    channel.on('message', (message) => this.#onMessage(message));
    channel.on('fault', (error) => this.#onFault(error));
    channel.on('close', (error) => this.#onClose(channel, error));
    let reply: RpcReply;
    try {
      reply = await this.#send('hello', { owner: this.#options.owner, protocol: PROTOCOL_VERSION }, [], this.#options.requestTimeoutMs);
    } catch (error) {
      // A daemon that refuses our hello will refuse it again: stop instead of reconnecting in a loop.
      const code = (error as ProtocolError).code;
      if (code !== 'EFDFERRY_DISCONNECTED' && code !== 'EFDFERRY_TIMEOUT') this.#closedByUser = true;
      channel.close();
      throw error;
    }
    this.#hello = reply.result as unknown as HelloResult;
    this.#reconnectDelay = this.#options.reconnectMinDelayMs;
    this.emit('connect', this.#hello);
    return this.#hello;
  }

  #send(method: string, params: Record<string, unknown>, fds: number[], timeoutMs: number): Promise<RpcReply> {
    const channel = this.#channel;
    return new Promise<RpcReply>((resolve, reject) => {
      if (!channel || channel.closed) {
        reject(new ProtocolError('EFDFERRY_DISCONNECTED', 'not connected', undefined, fds));
        return;
      }
      const requestId = this.#allocateRequestId();
      const pending: Pending = { method, heldFds: fds, resolve, reject, timer: null };
      try {
        channel.send({ type: 'request', requestId, method, params, fds });
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        if (code === 'EPIPE' || code === 'ECONNRESET') {
          // The daemon closed first. What it said before closing (why it refused us) is still waiting to be
          // read: let the close that follows answer this request, with that reason.
          this.#pending.set(requestId, pending);
          return;
        }
        const protocolError =
          error instanceof ProtocolError ? error : new ProtocolError('EFDFERRY_DISCONNECTED', (error as Error).message);
        protocolError.fds = fds;
        reject(protocolError);
        return;
      }
      if (timeoutMs > 0) {
        pending.timer = setTimeout(() => {
          this.#pending.delete(requestId);
          // The daemon may still act on it; the caller gets the fds back and decides.
          reject(new ProtocolError('EFDFERRY_TIMEOUT', `"${method}" got no reply within ${timeoutMs} ms; the daemon may still act on it`, undefined, fds));
        }, timeoutMs);
      }
      this.#pending.set(requestId, pending);
    });
  }

  #allocateRequestId(): number {
    do {
      this.#nextRequestId = (this.#nextRequestId % 0xffffffff) + 1;
    } while (this.#pending.has(this.#nextRequestId));
    return this.#nextRequestId;
  }

  #settle(requestId: number): Pending | undefined {
    const pending = this.#pending.get(requestId);
    if (!pending) return undefined;
    this.#pending.delete(requestId);
    if (pending.timer) clearTimeout(pending.timer);
    return pending;
  }

  #onMessage(message: Message): void {
    const binding = this.#options.binding;
    switch (message.type) {
      case 'reply': {
        const pending = this.#settle(message.requestId);
        if (!pending) {
          binding.closeAll(message.fds);
          return;
        }
        binding.closeAll(pending.heldFds);
        pending.resolve({ result: message.result, fds: message.fds });
        return;
      }
      case 'error': {
        const pending = this.#settle(message.requestId);
        const code = isErrorCode(message.error.code) ? message.error.code : 'EFDFERRY_INTERNAL';
        // The originals we held are complete even if the returned copies were cut short in transit.
        binding.closeAll(message.fds);
        if (!pending) {
          const error = new ProtocolError(code, `daemon: ${message.error.message}`, message.error.details);
          // Request id 0 is about the connection (refused: not allowed, too many): the close that follows
          // fails whatever is pending with this reason rather than a bare "disconnected".
          if (message.requestId === 0) this.#connectionError = error;
          this.#reportError(error);
          return;
        }
        pending.reject(new ProtocolError(code, message.error.message, message.error.details, pending.heldFds));
        return;
      }
      case 'event':
        this.#onEvent(message);
        return;
      case 'request':
        binding.closeAll(message.fds);
        this.#reportError(new ProtocolError('EFDFERRY_TYPE', 'the daemon sent a request'));
        return;
    }
  }

  #onEvent(message: EventMessage): void {
    const event: RpcEvent = { event: message.event, id: message.id, data: message.data, fds: message.fds };
    if (this.listenerCount('event') === 0) {
      this.#options.binding.closeAll(event.fds);
      return;
    }
    this.emit('event', event);
  }

  #onFault(error: ProtocolError): void {
    this.#options.binding.closeAll(error.fds);
    const pending = this.#settle(error.requestId);
    if (pending) {
      error.fds = pending.heldFds;
      pending.reject(error);
    } else {
      this.#reportError(error);
    }
  }

  /** 'error' events are for whoever listens; with no listener they must not crash the application. */
  #reportError(error: Error): void {
    if (this.listenerCount('error')) this.emit('error', error);
  }

  #onClose(channel: Channel, error: Error | null): void {
    if (this.#channel !== channel) return;
    this.#channel = null;
    this.#hello = null;
    const reason = this.#connectionError;
    this.#connectionError = null;
    for (const requestId of [...this.#pending.keys()]) {
      const pending = this.#settle(requestId)!;
      pending.reject(
        reason
          ? new ProtocolError(reason.code, reason.message.replace(/^daemon: /, ''), reason.details, pending.heldFds)
          : new ProtocolError('EFDFERRY_DISCONNECTED', `connection closed before "${pending.method}" was answered`, undefined, pending.heldFds),
      );
    }
    this.emit('disconnect', error);
    if (!this.#closedByUser && this.#options.reconnect) this.#scheduleReconnect();
  }

  #scheduleReconnect(): void {
    const delay = this.#reconnectDelay;
    this.#reconnectDelay = Math.min(delay * 2, this.#options.reconnectMaxDelayMs);
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null;
      if (this.#closedByUser || this.connected) return;
      this.connect().catch((error: Error) => {
        this.#reportError(error);
        if (!this.#closedByUser && !this.connected && !this.#reconnectTimer) this.#scheduleReconnect();
      });
    }, delay);
    if (!this.#refed) this.#reconnectTimer.unref();
  }
}

/**
 * `SplicerClient`: what an application uses to hand Splicer its relays.
 *
 * `splice(a, b, meta)` resolves, when the relay is over, with both original sockets and the envelope.
 * The relay does not depend on this process: if the application restarts, a new client with the same
 * owner id receives the envelopes of relays that ended meanwhile through the `envelope` event.
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { loadNative, type NativeBinding } from '../native.js';
import { RpcClient, type HelloResult, type RpcEvent } from '../rpc/client.js';
import { ProtocolError } from '../protocol/errors.js';
import { defaultSocketPath } from '../version.js';
import { adoptSocket, assertDetachable, toDetached, type SocketLike } from './detach.js';
import type { Envelope } from '../protocol/splicer.js';

export type { Envelope } from '../protocol/splicer.js';

/** Per-relay options; omitted ones take the daemon's defaults. Zero means "no limit". */
export interface SpliceOptions {
  idleTimeoutMs?: number;
  maxDurationMs?: number;
  maxBytesAToB?: number;
  maxBytesBToA?: number;
  /** Bytes to deliver to B before anything read from A (in addition to what detaching `a` found unread). */
  prefaceAToB?: Uint8Array;
  /** Bytes to deliver to A before anything read from B. */
  prefaceBToA?: Uint8Array;
}

/** A finished relay: the envelope and both original sockets, now the application's again. */
export interface ReturnedRelay<S = net.Socket> {
  envelope: Envelope;
  a: S;
  b: S;
}

/** A relay that was accepted: its id (for `cancel`) and its eventual result. */
export interface StartedRelay<S = net.Socket> {
  taskId: string;
  done: Promise<ReturnedRelay<S>>;
}

/** Options of a {@link SplicerClient}. */
export interface SplicerClientOptions<S extends 'net' | 'fd' = 'net'> {
  owner: string;
  /** Splicer's socket (default /run/fdferry/splicer.sock). */
  path?: string;
  /** `net` (default) returns `net.Socket`s; `fd` returns raw fds. */
  sockets?: S;
  binding?: NativeBinding;
  reconnect?: boolean;
  requestTimeoutMs?: number;
}

type SocketOf<S> = S extends 'fd' ? number : net.Socket;

/** Events of a {@link SplicerClient}. */
export interface SplicerClientEvents<S> {
  /** An envelope with no `splice()` call waiting for it (the relay was handed over before a restart). */
  envelope: [relay: ReturnedRelay<S>];
  connect: [hello: HelloResult];
  disconnect: [error: Error | null];
  error: [error: Error];
}

/** A client of the Splicer daemon. */
export class SplicerClient<S extends 'net' | 'fd' = 'net'> extends EventEmitter<SplicerClientEvents<SocketOf<S>>> {
  readonly #rpc: RpcClient;
  readonly #binding: NativeBinding;
  readonly #sockets: 'net' | 'fd';
  readonly #waiting = new Map<string, { resolve: (relay: ReturnedRelay<SocketOf<S>>) => void }>();
  /** Envelopes that arrived before their splice reply (possible for a relay that ends at once). */
  readonly #early = new Map<string, RpcEvent>();
  #requestsInFlight = 0;
  #acks: string[] = [];

  constructor(options: SplicerClientOptions<S>) {
    super();
    this.#binding = options.binding ?? loadNative();
    this.#sockets = options.sockets ?? 'net';
    this.#rpc = new RpcClient({
      path: options.path ?? defaultSocketPath('splicer'),
      owner: options.owner,
      binding: this.#binding,
      ...(options.reconnect === undefined ? {} : { reconnect: options.reconnect }),
      ...(options.requestTimeoutMs === undefined ? {} : { requestTimeoutMs: options.requestTimeoutMs }),
    });
    this.#rpc.on('event', (event) => this.#onEvent(event));
    this.#rpc.on('connect', (hello) => this.emit('connect', hello));
    this.#rpc.on('disconnect', (error) => this.emit('disconnect', error));
    this.#rpc.on('error', (error) => {
      if (this.listenerCount('error')) this.emit('error', error);
    });
  }

  /** Connects and says hello; envelopes kept for this owner start arriving right after. */
  connect(): Promise<HelloResult> {
    return this.#rpc.connect();
  }

  /**
   * Hands a relay to Splicer and resolves once it is accepted. `a` and `b` (net.Sockets, which are
   * detached and destroyed, or fds, which the call takes over) are given back when the relay ends, or
   * on the rejection error (`error.fds`) if Splicer refuses them.
   */
  async start(a: SocketLike, b: SocketLike, meta: Record<string, unknown> = {}, options: SpliceOptions = {}): Promise<StartedRelay<SocketOf<S>>> {
    // Both are checked before either is detached: a failure must not cost the caller the other socket.
    assertDetachable(a);
    assertDetachable(b);
    const first = await toDetached(a, this.#binding);
    let second;
    try {
      second = await toDetached(b, this.#binding);
    } catch (error) {
      this.#binding.closeAll([first.fd]);
      throw error;
    }
    const params: Record<string, unknown> = { meta };
    for (const key of ['idleTimeoutMs', 'maxDurationMs', 'maxBytesAToB', 'maxBytesBToA'] as const) {
      if (options[key] !== undefined) params[key] = options[key];
    }
    const prefaceAToB = Buffer.concat([first.preface, options.prefaceAToB ?? Buffer.alloc(0)]);
    const prefaceBToA = Buffer.concat([second.preface, options.prefaceBToA ?? Buffer.alloc(0)]);
    if (prefaceAToB.length) params.prefaceAToB = prefaceAToB.toString('base64');
    if (prefaceBToA.length) params.prefaceBToA = prefaceBToA.toString('base64');
    this.#requestsInFlight++;
    let taskId: string;
    try {
      const reply = await this.#rpc.request('splice', params, [first.fd, second.fd]);
      taskId = String(reply.result.taskId);
    } catch (error) {
      // The fds come back on the error; the bytes Node had already read from them must come back too.
      if (error instanceof ProtocolError) error.prefaces = [first.preface, second.preface];
      throw error;
    } finally {
      this.#requestsInFlight--;
    }
    const done = new Promise<ReturnedRelay<SocketOf<S>>>((resolve) => this.#waiting.set(taskId, { resolve }));
    const early = this.#early.get(taskId);
    if (early) {
      this.#early.delete(taskId);
      this.#onEvent(early);
    }
    this.#flushEarly();
    return { taskId, done };
  }

  /** Hands a relay to Splicer and resolves when it is over, with the envelope and both sockets. */
  async splice(a: SocketLike, b: SocketLike, meta: Record<string, unknown> = {}, options: SpliceOptions = {}): Promise<ReturnedRelay<SocketOf<S>>> {
    return (await this.start(a, b, meta, options)).done;
  }

  /** Ends a relay now; its envelope (reason `cancelled`) follows as usual. */
  async cancel(taskId: string): Promise<void> {
    await this.#rpc.request('cancel', { taskId });
  }

  /** Lets the process exit while connected. */
  unref(): void {
    this.#rpc.unref();
  }

  /** Closes the connection. Relays go on in Splicer; their envelopes wait for this owner's next connection. */
  close(): void {
    // Envelopes already handed to the application are acknowledged first: the request reaches the daemon
    // even though its answer will not reach us.
    this.#flushAcks();
    this.#rpc.close();
  }

  #onEvent(event: RpcEvent): void {
    if (event.event !== 'envelope' || event.fds.length !== 2) {
      this.#binding.closeAll(event.fds);
      this.emit('error', new ProtocolError('EFDFERRY_FDCOUNT', `unexpected ${event.event} event with ${event.fds.length} fds`));
      return;
    }
    const taskId = event.id;
    const waiter = this.#waiting.get(taskId);
    if (!waiter && this.#requestsInFlight > 0) {
      this.#early.set(taskId, event);
      return;
    }
    if (!waiter && this.listenerCount('envelope') === 0) {
      // Nobody can take it now; unacknowledged, it comes again on the next connection.
      this.#binding.closeAll(event.fds);
      return;
    }
    const relay = this.#wrap(event);
    if (waiter) {
      this.#waiting.delete(taskId);
      waiter.resolve(relay);
    } else {
      this.emit('envelope', relay);
    }
    this.#queueAck(taskId);
  }

  /**
   * Acknowledges envelopes in batches: every envelope that arrives in one turn of the event loop is
   * acknowledged by one request, which halves the daemon's requests per short relay.
   */
  #queueAck(taskId: string): void {
    this.#acks.push(taskId);
    if (this.#acks.length === 1) setImmediate(() => this.#flushAcks());
  }

  #flushAcks(): void {
    while (this.#acks.length) {
      // The daemon takes at most 4,096 ids per ack.
      this.#rpc.ack(this.#acks.splice(0, 4096)).catch(() => {
        // Not acknowledged: the daemon sends them again on the next connection; the ids deduplicate them.
      });
    }
  }

  #flushEarly(): void {
    if (this.#requestsInFlight > 0) return;
    const early = [...this.#early.values()];
    this.#early.clear();
    for (const event of early) this.#onEvent(event);
  }

  #wrap(event: RpcEvent): ReturnedRelay<SocketOf<S>> {
    const [a, b] = event.fds as [number, number];
    const envelope = event.data as unknown as Envelope;
    if (this.#sockets === 'fd') return { envelope, a, b } as ReturnedRelay<SocketOf<S>>;
    return { envelope, a: adoptSocket(a), b: adoptSocket(b) } as ReturnedRelay<SocketOf<S>>;
  }
}

/**
 * `BumblebeeClient`: what a proxy uses to turn a raw IP flow into a kernel TCP socket.
 *
 * `upgrade(flowFd, {context, tenant})` hands Bumblebee one SOCK_SEQPACKET socket carrying the flow's IP
 * packets (its SYN first) and resolves with the accepted TCP socket and the flow's addresses. The proxy
 * keeps relaying the flow's packets on its own end of that socket pair for as long as the connection
 * lives; Bumblebee pumps the other end. A refusal (not a SYN, no free slot...) gives the flow socket
 * back, unread, on the error (`error.fds`).
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { loadNative, type NativeBinding } from '../native.js';
import { RpcClient, type HelloResult } from '../rpc/client.js';
import { ProtocolError } from '../protocol/errors.js';
import type { UpgradeResult } from '../protocol/bumblebee.js';
import { defaultSocketPath } from '../version.js';
import { adoptSocket } from './detach.js';

export type { FlowTuple, InternalTuple, UpgradeResult } from '../protocol/bumblebee.js';

/** Options of one upgrade. */
export interface UpgradeOptions {
  /** Opaque metadata, returned as given. */
  context?: Record<string, unknown>;
  /** Who the flow belongs to (default `default`). */
  tenant?: string;
}

/** An upgraded flow: its socket (a `net.Socket`, or an fd) and what Bumblebee knows of it. */
export type UpgradedFlow<S> = UpgradeResult & { socket: S };

/** Options of a {@link BumblebeeClient}. */
export interface BumblebeeClientOptions<S extends 'net' | 'fd' = 'net'> {
  owner: string;
  /** Bumblebee's socket (default /run/fdferry/bumblebee.sock). */
  path?: string;
  /** `net` (default) returns a `net.Socket`; `fd` returns the raw fd (to hand to Splicer as is). */
  sockets?: S;
  binding?: NativeBinding;
  reconnect?: boolean;
  requestTimeoutMs?: number;
}

type SocketOf<S> = S extends 'fd' ? number : net.Socket;

/** Events of a {@link BumblebeeClient}. */
export interface BumblebeeClientEvents {
  connect: [hello: HelloResult];
  disconnect: [error: Error | null];
  error: [error: Error];
}

/** A client of the Bumblebee daemon. */
export class BumblebeeClient<S extends 'net' | 'fd' = 'net'> extends EventEmitter<BumblebeeClientEvents> {
  readonly #rpc: RpcClient;
  readonly #binding: NativeBinding;
  readonly #sockets: 'net' | 'fd';
  /** Upgrades beyond the daemon's in-flight limit wait here instead of being refused with EFDFERRY_BUSY. */
  readonly #queue: Array<() => void> = [];
  #inflight = 0;

  constructor(options: BumblebeeClientOptions<S>) {
    super();
    const binding = options.binding ?? loadNative();
    this.#binding = binding;
    this.#sockets = options.sockets ?? 'net';
    this.#rpc = new RpcClient({
      path: options.path ?? defaultSocketPath('bumblebee'),
      owner: options.owner,
      binding,
      ...(options.reconnect === undefined ? {} : { reconnect: options.reconnect }),
      ...(options.requestTimeoutMs === undefined ? {} : { requestTimeoutMs: options.requestTimeoutMs }),
    });
    this.#rpc.on('connect', (hello) => this.emit('connect', hello));
    this.#rpc.on('disconnect', (error) => this.emit('disconnect', error));
    this.#rpc.on('error', (error) => {
      if (this.listenerCount('error')) this.emit('error', error);
    });
    // Bumblebee pushes no events; anything pushed is closed rather than leaked.
    this.#rpc.on('event', (event) => binding.closeAll(event.fds));
  }

  /** Connects and says hello. */
  connect(): Promise<HelloResult> {
    return this.#rpc.connect();
  }

  /**
   * Hands a flow's packet socket to Bumblebee (the call takes the fd over) and resolves once the kernel
   * has accepted the handshake, with the TCP socket and the flow's addresses.
   */
  async upgrade(flowFd: number, options: UpgradeOptions = {}): Promise<UpgradedFlow<SocketOf<S>>> {
    const params: Record<string, unknown> = {};
    if (options.context !== undefined) params.context = options.context;
    if (options.tenant !== undefined) params.tenant = options.tenant;
    // A SYN flood's worth of upgrades is normal for an on-ramp: keep within the daemon's in-flight limit
    // per connection (its hello says it) and queue the rest, each waiting only for a handshake.
    const limit = this.#rpc.hello?.limits.maxInflight ?? 64;
    if (this.#inflight >= limit) await new Promise<void>((resolve) => this.#queue.push(resolve));
    this.#inflight++;
    let reply;
    try {
      reply = await this.#rpc.request('upgrade', params, [flowFd]);
    } finally {
      this.#inflight--;
      this.#queue.shift()?.();
    }
    if (reply.fds.length !== 1) {
      this.#binding.closeAll(reply.fds);
      throw new ProtocolError('EFDFERRY_FDCOUNT', `an upgrade reply carries 1 fd, got ${reply.fds.length}`);
    }
    const result = reply.result as unknown as UpgradeResult;
    const socket = (this.#sockets === 'fd' ? reply.fds[0]! : adoptSocket(reply.fds[0]!)) as SocketOf<S>;
    return { ...result, socket };
  }

  /** Lists this uid's flows (root: every flow). */
  async flows(): Promise<Record<string, unknown>[]> {
    return (await this.#rpc.request('flows')).result.flows as Record<string, unknown>[];
  }

  /** Ends a flow now (Bumblebee stops pumping it and closes its end). */
  async cancel(taskId: string): Promise<void> {
    await this.#rpc.request('cancel', { taskId });
  }

  /** Lets the process exit while connected. */
  unref(): void {
    this.#rpc.unref();
  }

  /** Closes the connection; flows already upgraded go on. */
  close(): void {
    this.#rpc.close();
  }
}

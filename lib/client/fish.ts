/**
 * `FishClient`: what a proxy uses to send a client's raw IP packets out from a slice of a shared
 * egress address.
 *
 * `register(packetFd, {id, egress4, ports})` hands Fish one SOCK_SEQPACKET socket carrying the client's
 * IP packets (one per message, every flow); Fish forwards them from the slice and sends the replies back
 * on the same socket. The proxy keeps the other end of the pair and relays the client's packets on it.
 *
 * The control connection is the registration's lifetime. The client keeps a duplicate of every
 * registered socket, so when the connection drops (Fish crashed and restarted, or the proxy's connection
 * broke) it registers the same id with the same socket again on reconnect: Fish gives back the same
 * ports, and packets queued in the socket meanwhile are not lost (notes/fish-kernel.md §9).
 */
import { EventEmitter } from 'node:events';
import { loadNative, type NativeBinding } from '../native.js';
import { RpcClient, type HelloResult } from '../rpc/client.js';
import type { ExhaustedEvent, ExplainRequest, FishProtocol, RegisterResult } from '../protocol/fish.js';
import { defaultSocketPath } from '../version.js';

export type { ExhaustedEvent, ExplainRequest, FishProtocol, RegisterResult } from '../protocol/fish.js';

/** What one registration asks for. */
export interface RegisterOptions {
  /** 1..65535, chosen by the proxy; the same id after a restart keeps the same ports. */
  id: number;
  egress4?: string;
  egress6?: string;
  /** The slice: `[lo, hi]` inclusive. */
  ports: [number, number];
  /** Default: tcp, udp and icmp. */
  protocols?: FishProtocol[];
  maxMappings?: number;
  /** The client's IPv6 /64: lets a Fish restarted after a crash rebuild the client's IPv6 mappings. */
  client6Prefix?: string;
}

/** Options of a {@link FishClient}. */
export interface FishClientOptions {
  owner: string;
  /** Fish's socket (default /run/fdferry/fish.sock). */
  path?: string;
  binding?: NativeBinding;
  /** Reconnect and re-register after the connection drops (default true). */
  reconnect?: boolean;
  requestTimeoutMs?: number;
}

/** Events of a {@link FishClient}. */
export interface FishClientEvents {
  connect: [hello: HelloResult];
  disconnect: [error: Error | null];
  /** A registration was registered again after a reconnect. */
  reregistered: [result: RegisterResult];
  /** A new flow of a registration got no egress tuple (the client has already been told). */
  exhausted: [event: ExhaustedEvent];
  error: [error: Error];
}

/** A client of the Fish daemon. */
export class FishClient extends EventEmitter<FishClientEvents> {
  readonly #rpc: RpcClient;
  readonly #binding: NativeBinding;
  /** Our duplicate of each registered packet socket, for re-registering after a reconnect. */
  readonly #registered = new Map<number, { options: RegisterOptions; fd: number }>();
  #everConnected = false;

  constructor(options: FishClientOptions) {
    super();
    const binding = options.binding ?? loadNative();
    this.#binding = binding;
    this.#rpc = new RpcClient({
      path: options.path ?? defaultSocketPath('fish'),
      owner: options.owner,
      binding,
      ...(options.reconnect === undefined ? {} : { reconnect: options.reconnect }),
      ...(options.requestTimeoutMs === undefined ? {} : { requestTimeoutMs: options.requestTimeoutMs }),
    });
    this.#rpc.on('connect', (hello) => {
      if (this.#everConnected) void this.#reregister();
      this.#everConnected = true;
      this.emit('connect', hello);
    });
    this.#rpc.on('disconnect', (error) => this.emit('disconnect', error));
    this.#rpc.on('error', (error) => {
      if (this.listenerCount('error')) this.emit('error', error);
    });
    this.#rpc.on('event', (event) => {
      binding.closeAll(event.fds);
      if (event.event === 'exhausted') this.emit('exhausted', event.data as unknown as ExhaustedEvent);
    });
  }

  /** Connects and says hello. */
  connect(): Promise<HelloResult> {
    return this.#rpc.connect();
  }

  /**
   * Registers a client's packet socket (the call takes `packetFd` over; the client keeps a duplicate
   * to register again after a reconnect). A refusal gives the socket back on the error (`error.fds`).
   */
  async register(packetFd: number, options: RegisterOptions): Promise<RegisterResult> {
    const kept = this.#binding.dup(packetFd);
    try {
      const result = await this.#send(packetFd, options);
      const previous = this.#registered.get(options.id);
      if (previous) this.#binding.closeAll([previous.fd]);
      this.#registered.set(options.id, { options, fd: kept });
      return result;
    } catch (error) {
      this.#binding.closeAll([kept]);
      throw error;
    }
  }

  /** Ends a registration now: Fish stops forwarding it and flushes its conntrack entries. */
  async unregister(id: number): Promise<void> {
    const kept = this.#registered.get(id);
    this.#registered.delete(id);
    if (kept) this.#binding.closeAll([kept.fd]);
    await this.#rpc.request('unregister', { id });
  }

  /** Lists this uid's registrations (root: every one) with their counters. */
  async registrations(): Promise<Record<string, unknown>[]> {
    return (await this.#rpc.request('registrations')).result.registrations as Record<string, unknown>[];
  }

  /** Lists mappings (of one registration, or all of this uid's). */
  async mappings(id?: number): Promise<Record<string, unknown>[]> {
    return (await this.#rpc.request('mappings', id === undefined ? {} : { id })).result.mappings as Record<string, unknown>[];
  }

  /** Says which registration and mapping a five-tuple belongs to, or why not (control peers only). */
  async explain(flow: ExplainRequest): Promise<Record<string, unknown>> {
    return (await this.#rpc.request('explain', flow as unknown as Record<string, unknown>)).result;
  }

  /** Lets the process exit while connected. */
  unref(): void {
    this.#rpc.unref();
  }

  /** Closes the connection (registrations end after Fish's grace period) and our duplicates. */
  close(): void {
    this.#rpc.close();
    this.#binding.closeAll([...this.#registered.values()].map((entry) => entry.fd));
    this.#registered.clear();
  }

  async #send(fd: number, options: RegisterOptions): Promise<RegisterResult> {
    const params: Record<string, unknown> = { id: options.id, ports: options.ports };
    if (options.egress4 !== undefined) params.egress4 = options.egress4;
    if (options.egress6 !== undefined) params.egress6 = options.egress6;
    if (options.protocols !== undefined) params.protocols = options.protocols;
    if (options.maxMappings !== undefined) params.maxMappings = options.maxMappings;
    if (options.client6Prefix !== undefined) params.client6Prefix = options.client6Prefix;
    const reply = await this.#rpc.request('register', params, [fd]);
    return reply.result as unknown as RegisterResult;
  }

  async #reregister(): Promise<void> {
    for (const [id, { options, fd }] of this.#registered) {
      try {
        const result = await this.#send(this.#binding.dup(fd), options);
        this.emit('reregistered', result);
      } catch (error) {
        if ((error as { fds?: number[] }).fds) this.#binding.closeAll((error as { fds: number[] }).fds);
        if (this.listenerCount('error')) this.emit('error', new Error(`re-registering ${id} failed: ${(error as Error).message}`));
      }
    }
  }
}

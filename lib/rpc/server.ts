/**
 * The generic fdferry protocol server that every daemon is built on.
 *
 * It accepts SOCK_SEQPACKET connections, records each peer's credentials, requires a `hello` naming the
 * client's owner id (scoped to the peer's uid), validates every request (shape, fd count, fd kinds)
 * before a method sees it, answers every request exactly once, and gives a rejected request's fds back
 * with the error. Long tasks answer `accepted` at once and later `deliver()` a result into the owner's
 * mailbox, where it stays until the owner acknowledges it.
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import type { Logger } from 'pino';
import type { FdDescription, NativeBinding, PeerCredentials, SeqpacketListener } from '../native.js';
import { MessageCodec, DEFAULT_MAX_BODY_BYTES, type Message, type RequestMessage } from '../protocol/codec.js';
import { ProtocolError } from '../protocol/errors.js';
import { fdKindMismatch, type FdKind } from '../protocol/fd-kinds.js';
import { MAX_FDS_PER_MESSAGE, MAX_INLINE_BODY, PROTOCOL_VERSION } from '../protocol/frame.js';
import { accessOf, defaultAccessPolicy, peerExecutable, peerGroups, type AccessPolicy } from './access.js';
import { Channel, type ChannelBinding } from './channel.js';
import { Mailbox, type ExpiryReason, type MailboxEntry, type MailboxLimits } from './mailbox.js';
import { DEFAULT_QUOTAS, Quotas, type QuotaLimits } from './quotas.js';
import { ensureSocketDirectory, isAbstract, toNativeAddress } from './socket-path.js';

/** What the server knows about a connected client. */
export interface ConnectionInfo {
  readonly id: number;
  readonly peer: PeerCredentials;
  /** The owner id the client named in `hello`, or null before it. */
  owner: string | null;
  /** `<uid>:<owner>`: owner ids are scoped to the peer's uid, so nobody collects another user's results. */
  ownerKey: string | null;
  readonly connectedAt: number;
  /** Whether the peer is on the control allow-list (reload, metrics, other people's tasks). */
  readonly control: boolean;
}

/** How many fds a method takes, and of what kind. */
export interface FdSpec {
  min: number;
  max: number;
  kind: FdKind;
}

/** A validated request as a method handler sees it. The handler owns `fds` once it returns successfully. */
export interface RequestContext<P> {
  params: P;
  fds: number[];
  fdDescriptions: FdDescription[];
  connection: ConnectionInfo;
  requestId: number;
  log: Logger;
}

/** A handler's answer. `fds` are sent with the reply and then closed by the server. */
export interface HandlerResult {
  result: Record<string, unknown>;
  fds?: number[];
}

/**
 * A handler's way of saying "this request is answered later, by `replyTo`" (a reload, whose answer may
 * come from the successor process).
 */
export const DEFERRED = Symbol('fdferry.deferred');

/**
 * One method of a daemon. `parse` validates the parameters (throwing `EFDFERRY_INVALID`), `handle`
 * does the work. A handler that throws must not have kept any of the request's fds: the server sends
 * them back with the error.
 */
export interface MethodDefinition<P = Record<string, unknown>> {
  fds?: FdSpec;
  parse?: (params: Record<string, unknown>) => P;
  handle: (context: RequestContext<P>) => HandlerResult | typeof DEFERRED | Promise<HandlerResult | typeof DEFERRED>;
}

/** A method table; `defineMethod` keeps each entry's parameter type. */
export type MethodTable = Record<string, MethodDefinition<any>>;

/** Identity of the type-checked method definition; exists so `P` is inferred from `parse`. */
export function defineMethod<P>(definition: MethodDefinition<P>): MethodDefinition<P> {
  return definition;
}

/** Server limits; every one has a daemon flag. */
export interface ServerLimits {
  maxConnections: number;
  maxInflightPerConnection: number;
  maxBodyBytes: number;
  mailbox: MailboxLimits;
}

/** Defaults sized for one daemon on a machine capped at 20,000 open files per process. */
export const DEFAULT_SERVER_LIMITS: ServerLimits = {
  maxConnections: 1024,
  maxInflightPerConnection: 64,
  maxBodyBytes: DEFAULT_MAX_BODY_BYTES,
  mailbox: { maxPerOwner: 10_000, maxTotal: 50_000, maxAgeMs: 10 * 60_000 },
};

/** The native calls a server needs. */
export type ServerBinding = ChannelBinding &
  Pick<NativeBinding, 'seqpacketListen' | 'seqpacketConnect' | 'openListener' | 'describeFd'>;

/** Options of an {@link RpcServer}. */
export interface RpcServerOptions {
  binding: ServerBinding;
  logger: Logger;
  service: string;
  version: string;
  generation?: number;
  methods: MethodTable;
  limits?: Partial<Omit<ServerLimits, 'mailbox'>> & { mailbox?: Partial<MailboxLimits> };
  /** Unix mode for a filesystem socket path. */
  socketMode?: number;
  /** Owner and group of a filesystem socket path (default: left as created, i.e. the daemon's). */
  socketOwner?: number;
  socketGroup?: number;
  /** Who may connect, and who may use control methods (default: root and the daemon's own uid). */
  access?: AccessPolicy;
  /** Methods only control peers may call. */
  controlMethods?: readonly string[];
  quotas?: Partial<QuotaLimits>;
  /** A connection that has not said hello by then is closed (0 = never). */
  helloTimeoutMs?: number;
}

/** Counters the server keeps; exported through status and metrics. */
export interface ServerCounters {
  connectionsAccepted: number;
  connectionsRefused: number;
  /** Connections from peers not on the allow-list. */
  connectionsDenied: number;
  /** Requests refused for a quota (rate, fds in flight). */
  quotaRefusals: number;
  requests: number;
  errors: number;
  faults: number;
  acceptFdExhaustion: number;
  receiveFdExhaustion: number;
}

interface Connection extends ConnectionInfo {
  groups: number[];
  channel: Channel;
  inflight: number;
  log: Logger;
}

const OWNER_PATTERN = /^[\x21-\x7e]{1,128}$/;
const FD_EXHAUSTION_CODES = new Set(['EMFILE', 'ENFILE', 'ENOBUFS', 'ENOMEM']);
const EXHAUSTION_LOG_INTERVAL_MS = 10_000;

/** A connection as it travels to a successor (its fd is an index into the hand-over's fd list). */
export interface ExportedConnection {
  fd: number;
  id: number;
  peer: PeerCredentials;
  /** The peer's supplementary groups as read when it connected (its pid may be gone or reused since). */
  groups?: number[];
  owner: string | null;
  ownerKey: string | null;
  connectedAt: number;
}

/** The server's part of a hand-over state. */
export interface ExportedServerState {
  listener: number | null;
  connections: ExportedConnection[];
  mailbox: Array<Omit<MailboxEntry, 'fds'> & { fds: number[] }>;
}

/** Events of an {@link RpcServer}. */
export interface RpcServerEvents {
  /** A connection said hello (a returning owner can be told about its kept results). */
  hello: [connection: ConnectionInfo];
  /** A connection closed. */
  disconnect: [connection: ConnectionInfo];
  /** An owner acknowledged a kept result (the mailbox shrank). */
  ack: [ownerKey: string, id: string];
  /** A kept result expired unacknowledged (its fds were closed). */
  expire: [ownerKey: string, id: string];
}

/** A protocol server on one listening socket. */
export class RpcServer extends EventEmitter<RpcServerEvents> {
  readonly counters: ServerCounters = {
    connectionsAccepted: 0,
    connectionsRefused: 0,
    connectionsDenied: 0,
    quotaRefusals: 0,
    requests: 0,
    errors: 0,
    faults: 0,
    acceptFdExhaustion: 0,
    receiveFdExhaustion: 0,
  };
  readonly #options: RpcServerOptions;
  readonly #limits: ServerLimits;
  readonly #codec: MessageCodec;
  readonly #log: Logger;
  readonly #connections = new Map<number, Connection>();
  readonly #owners = new Map<string, Connection>();
  readonly #mailbox: Mailbox;
  #listener: SeqpacketListener | null = null;
  #boundPath: string | null = null;
  #nextConnectionId = 1;
  /** Sequence of unkept events (`notify`), for their ids. */
  #notices = 0;
  #lastExhaustionLog = 0;
  readonly #lastQuotaLog = new Map<string, number>();
  #sweepTimer: NodeJS.Timeout | null = null;
  #paused = false;
  #inflightSettled: (() => void) | null = null;
  readonly #access: AccessPolicy;
  /** Read per request: the daemon adds its service's control methods after the server exists. */
  readonly #controlMethods: readonly string[];
  /** Per-uid and per-owner quotas. */
  readonly quotas: Quotas;
  /** Error answers by code (for metrics). */
  readonly errorsByCode = new Map<string, number>();

  constructor(options: RpcServerOptions) {
    super();
    this.#options = options;
    this.#limits = {
      ...DEFAULT_SERVER_LIMITS,
      ...options.limits,
      mailbox: { ...DEFAULT_SERVER_LIMITS.mailbox, ...options.limits?.mailbox },
    };
    this.#codec = new MessageCodec(options.binding, { maxBodyBytes: this.#limits.maxBodyBytes });
    this.#log = options.logger;
    this.#access = options.access ?? defaultAccessPolicy();
    this.#controlMethods = options.controlMethods ?? [];
    this.quotas = new Quotas({ ...DEFAULT_QUOTAS, ...options.quotas });
    this.#mailbox = new Mailbox({
      limits: this.#limits.mailbox,
      closeFds: (fds) => options.binding.closeAll(fds),
      onExpire: (entry, reason) => this.#logExpiry(entry, reason),
    });
  }

  /** Binds `address` (a path, or `@name` for an abstract socket) and starts accepting. */
  listen(address: string): void {
    const native = toNativeAddress(address);
    if (!isAbstract(address)) {
      ensureSocketDirectory(address);
      removeStaleSocket(address, this.#options.binding);
    }
    const fd = this.#options.binding.seqpacketListen(native, 511);
    if (!isAbstract(address)) {
      fs.chmodSync(address, this.#options.socketMode ?? 0o660);
      if (this.#options.socketOwner !== undefined || this.#options.socketGroup !== undefined) {
        fs.chownSync(address, this.#options.socketOwner ?? -1, this.#options.socketGroup ?? -1);
      }
      this.#boundPath = address;
    }
    this.adoptListener(fd);
  }

  /** Starts accepting on an already listening fd (socket activation, a predecessor's hand-over). */
  adoptListener(fd: number): void {
    if (this.#listener) throw new Error('this server is already listening');
    this.#listener = this.#options.binding.openListener(fd, (error, connectionFd) => this.#onAccept(error, connectionFd));
    this.#sweepTimer = setInterval(() => {
      this.#mailbox.sweep();
      this.quotas.sweep();
    }, Math.min(60_000, this.#limits.mailbox.maxAgeMs / 4));
    this.#sweepTimer.unref();
  }

  /** The listening fd, or -1. */
  get listenerFd(): number {
    return this.#listener?.fd ?? -1;
  }

  /** Connected clients. */
  connections(): ConnectionInfo[] {
    return [...this.#connections.values()].map(({ id, peer, owner, ownerKey, connectedAt, control }) => ({
      id,
      peer,
      owner,
      ownerKey,
      connectedAt,
      control,
    }));
  }

  /** Results kept for owners. */
  get mailboxSize(): number {
    return this.#mailbox.size;
  }

  /** The limits in force. */
  get limits(): Readonly<ServerLimits> {
    return this.#limits;
  }

  /** Whether an owner currently has a connection. */
  isOwnerConnected(ownerKey: string): boolean {
    return this.#owners.has(ownerKey);
  }

  /**
   * Keeps a long task's result for its owner and sends it now if the owner is connected. The mailbox
   * owns `fds` from here on: they are closed once the owner acknowledges, or when the entry expires.
   */
  deliver(ownerKey: string, event: string, id: string, data: Record<string, unknown>, fds: number[]): void {
    const entry = this.#mailbox.put({ ownerKey, id, event, data, fds });
    const connection = this.#owners.get(ownerKey);
    if (connection) this.#sendEvent(connection, entry);
  }

  /**
   * Sends one connection an event that is news rather than a result (Fish's `exhausted`): not kept in
   * the mailbox, not to be acknowledged, lost if the connection is gone. False when it could not be sent.
   */
  notify(connectionId: number, event: string, data: Record<string, unknown>): boolean {
    const connection = this.#connections.get(connectionId);
    if (!connection) return false;
    try {
      return this.#send(connection, { type: 'event', requestId: 0, event, id: `${event}-${++this.#notices}`, data, fds: [] });
    } catch (error) {
      connection.log.error({ err: error, event }, 'an event could not be encoded');
      return false;
    }
  }

  /** Answers a request that a handler deferred (see {@link DEFERRED}); false if its connection is gone. */
  replyTo(connectionId: number, requestId: number, result: Record<string, unknown>): boolean {
    const connection = this.#connections.get(connectionId);
    if (!connection) return false;
    this.#reply(connection, requestId, { result });
    return true;
  }

  /**
   * Hand-over, step 1: stops accepting and reading, then waits until every request in progress is
   * answered (a request the caller will carry, such as the reload itself, was deferred and does not
   * count) and every send queue is empty. Rejects after `timeoutMs`.
   */
  async pause(timeoutMs: number): Promise<void> {
    this.#paused = true;
    this.#listener?.setAccepting(false);
    for (const connection of this.#connections.values()) connection.channel.setReading(false);
    const settled = () =>
      [...this.#connections.values()].every((connection) => connection.inflight === 0 && connection.channel.queued === 0);
    if (settled()) return;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#inflightSettled = null;
        reject(new ProtocolError('EFDFERRY_BUSY', `requests still in progress or replies unsent after ${timeoutMs} ms`));
      }, timeoutMs);
      this.#inflightSettled = () => {
        if (!settled()) return;
        clearTimeout(timer);
        this.#inflightSettled = null;
        resolve();
      };
    });
  }

  /** Undoes {@link pause} (a rolled-back hand-over), or starts a successor that imported its state. */
  resume(): void {
    this.#paused = false;
    this.#listener?.setAccepting(true);
    for (const connection of this.#connections.values()) connection.channel.setReading(true);
  }

  /**
   * Hand-over, step 2 (paused): describes the listener, every connection and every kept result, adding
   * their fds to `fds` and recording indices into it.
   */
  exportState(fds: number[]): ExportedServerState {
    const index = (fd: number) => fds.push(fd) - 1;
    return {
      listener: this.#listener ? index(this.#listener.fd) : null,
      connections: [...this.#connections.values()].map((connection) => ({
        fd: index(connection.channel.fd),
        id: connection.id,
        peer: connection.peer,
        groups: connection.groups,
        owner: connection.owner,
        ownerKey: connection.ownerKey,
        connectedAt: connection.connectedAt,
      })),
      mailbox: this.#mailbox.entries().map((entry) => ({
        ownerKey: entry.ownerKey,
        id: entry.id,
        event: entry.event,
        data: entry.data,
        fds: entry.fds.map(index),
        createdAt: entry.createdAt,
        deliveries: entry.deliveries,
      })),
    };
  }

  /**
   * Hand-over, after commit: the successor owns everything exported. Closes our copies without a word
   * to anyone (closing an fd the successor also holds neither ends nor resets the socket).
   */
  releaseExported(): void {
    if (this.#sweepTimer) clearInterval(this.#sweepTimer);
    this.#sweepTimer = null;
    this.#listener?.close();
    this.#listener = null;
    this.#boundPath = null; // the path now belongs to the successor: never unlink it
    for (const connection of [...this.#connections.values()]) {
      connection.channel.removeAllListeners('close');
      connection.channel.close();
      this.#connections.delete(connection.id);
    }
    this.#owners.clear();
    this.#options.binding.closeAll(this.#mailbox.release().flatMap((entry) => entry.fds));
  }

  /**
   * Successor: adopts a predecessor's listener, connections and kept results, paused until
   * {@link resume}. Returns the new connection id of each old one.
   */
  importState(state: ExportedServerState, fds: readonly number[], address?: string): Map<number, number> {
    this.#paused = true;
    if (state.listener !== null) {
      this.adoptListener(fds[state.listener]!);
      this.#listener!.setAccepting(false);
      // The socket file is ours now: the last generation to stop removes it.
      if (address && !isAbstract(address)) this.#boundPath = address;
    }
    const ids = new Map<number, number>();
    for (const exported of state.connections) {
      const connection = this.#open(fds[exported.fd]!, exported);
      if (connection) ids.set(exported.id, connection.id);
    }
    for (const entry of state.mailbox) {
      this.#mailbox.restore({ ...entry, fds: entry.fds.map((i) => fds[i]!) });
    }
    return ids;
  }

  /** Closes one client's connection (an operator's kick, or a misbehaving peer); false if it is gone. */
  dropConnection(id: number): boolean {
    const connection = this.#connections.get(id);
    if (!connection) return false;
    connection.log.info('connection dropped by the daemon');
    connection.channel.close();
    return true;
  }

  /** Stops accepting, closes every connection and expires every kept result. */
  close(): void {
    if (this.#sweepTimer) clearInterval(this.#sweepTimer);
    this.#sweepTimer = null;
    this.#listener?.close();
    this.#listener = null;
    if (this.#boundPath) fs.rmSync(this.#boundPath, { force: true });
    this.#boundPath = null;
    for (const connection of [...this.#connections.values()]) connection.channel.close();
    this.#mailbox.clear('shutdown');
  }

  #onAccept(error: Error | null, fd: number): void {
    if (error) {
      const code = (error as NodeJS.ErrnoException).code ?? '';
      if (FD_EXHAUSTION_CODES.has(code)) {
        this.counters.acceptFdExhaustion++;
        this.#warnFdExhaustion(code, 'out of file descriptors: new connections wait in the backlog; existing ones are served (raise LimitNOFILE or lower the load)');
      } else {
        this.#log.error({ err: error }, 'accept failed');
      }
      return;
    }
    if (this.#connections.size >= this.#limits.maxConnections) {
      this.counters.connectionsRefused++;
      this.#log.warn({ limit: this.#limits.maxConnections }, 'connection refused: too many connections');
      this.#options.binding.closeAll([fd]);
      return;
    }
    this.#open(fd);
  }

  /** Logs quota refusals once per interval per limit: a client hammering a quota must not flood the log. */
  #warnQuota(connection: Connection, error: ProtocolError): void {
    const limit = String(error.details?.limit ?? error.code);
    const now = Date.now();
    if (now - (this.#lastQuotaLog.get(limit) ?? 0) < EXHAUSTION_LOG_INTERVAL_MS) return;
    this.#lastQuotaLog.set(limit, now);
    connection.log.warn({ limit, quotaRefusals: this.counters.quotaRefusals }, `request refused: ${error.message}`);
  }

  #warnFdExhaustion(code: string, message: string): void {
    const now = Date.now();
    if (now - this.#lastExhaustionLog < EXHAUSTION_LOG_INTERVAL_MS) return;
    this.#lastExhaustionLog = now;
    this.#log.warn(
      {
        code,
        acceptFdExhaustion: this.counters.acceptFdExhaustion,
        receiveFdExhaustion: this.counters.receiveFdExhaustion,
        connections: this.#connections.size,
      },
      message,
    );
  }

  #open(fd: number, restored?: ExportedConnection): Connection | null {
    const channel = new Channel(fd, this.#options.binding, this.#codec);
    // A connection adopted from a predecessor stays silent until the hand-over commits.
    if (this.#paused) channel.setReading(false);
    let peer: PeerCredentials;
    try {
      peer = restored?.peer ?? channel.peerCredentials();
    } catch (error) {
      this.#log.warn({ err: error }, 'connection dropped: no peer credentials');
      channel.close();
      return null;
    }
    // Checked before a single message is read: a peer that may not use the daemon learns nothing from it.
    const groups = restored ? (restored.groups ?? []) : peerGroups(peer.pid);
    const access = accessOf(this.#access, peer, groups);
    if (!access.connect) {
      this.#deny(channel, peer, `uid ${peer.uid} (gid ${peer.gid}) is not allowed to use this daemon`, 'not on the allow-list');
      return null;
    }
    if (!restored && !this.quotas.connect(peer.uid)) {
      this.#deny(channel, peer, `uid ${peer.uid} already has ${this.quotas.limits.maxConnectionsPerUid} connections open`, 'too many connections for its uid', 'EFDFERRY_LIMIT');
      return null;
    }
    if (restored) this.quotas.connect(peer.uid);
    const id = this.#nextConnectionId++;
    const connection: Connection = {
      id,
      control: access.control,
      groups,
      peer,
      owner: restored?.owner ?? null,
      ownerKey: restored?.ownerKey ?? null,
      connectedAt: restored?.connectedAt ?? Date.now(),
      channel,
      inflight: 0,
      log: this.#log.child({ conn: id, peerPid: peer.pid, peerUid: peer.uid, ...(restored?.owner ? { owner: restored.owner } : {}) }),
    };
    if (connection.ownerKey) this.#owners.set(connection.ownerKey, connection);
    this.#connections.set(id, connection);
    this.counters.connectionsAccepted++;
    connection.log.debug({ peerGid: peer.gid }, 'connection accepted');
    channel.on('message', (message) => this.#onMessage(connection, message));
    channel.on('fault', (error) => {
      this.counters.faults++;
      if (error.code === 'EFDFERRY_CTRUNC') {
        // The kernel dropped the request's fds because we are at RLIMIT_NOFILE: say so clearly, but once per
        // interval; the client still holds its copies and gets the refusal.
        this.counters.receiveFdExhaustion++;
        this.#warnFdExhaustion('EMFILE', 'out of file descriptors: a request\'s fds were dropped by the kernel and it was refused; existing tasks continue (raise LimitNOFILE or lower the load)');
      } else {
        connection.log.info({ code: error.code, requestId: error.requestId }, `bad message: ${error.message}`);
      }
      this.#reject(connection, error.requestId, error, error.fds);
    });
    channel.on('drain', () => {
      if (!this.#paused) channel.setReading(true);
      this.#inflightSettled?.();
    });
    const helloTimeoutMs = this.#options.helloTimeoutMs ?? 0;
    const helloTimer =
      helloTimeoutMs > 0 && connection.ownerKey === null
        ? setTimeout(() => {
            if (connection.ownerKey !== null || channel.closed) return;
            connection.log.info({ helloTimeoutMs }, 'connection closed: no hello in time');
            channel.close();
          }, helloTimeoutMs).unref()
        : null;
    channel.on('close', (error) => {
      if (helloTimer) clearTimeout(helloTimer);
      this.quotas.disconnect(peer.uid);
      this.#connections.delete(id);
      if (connection.ownerKey && this.#owners.get(connection.ownerKey) === connection) this.#passOwnership(connection.ownerKey);
      connection.log.debug({ err: error ?? undefined }, 'connection closed');
      this.emit('disconnect', connection);
    });
    return connection;
  }

  /**
   * Refuses a connection before reading from it: one connection-level error (request id 0) says why, then
   * it is closed. Logged with who the peer is, once per connection.
   */
  #deny(channel: Channel, peer: PeerCredentials, message: string, why: string, code: 'EFDFERRY_DENIED' | 'EFDFERRY_LIMIT' = 'EFDFERRY_DENIED'): void {
    this.counters.connectionsDenied++;
    this.#log.warn({ peerPid: peer.pid, peerUid: peer.uid, peerGid: peer.gid, peerExe: peerExecutable(peer.pid) }, `connection refused: ${why}`);
    try {
      channel.send({ type: 'error', requestId: 0, error: { code, message }, fds: [] });
    } catch {
      // The peer is already gone: nothing to tell.
    }
    channel.close();
  }

  /**
   * The owner's registered connection closed: if the owner has another connection open, results go there
   * from now on (and what is kept is sent to it), instead of waiting for a hello that will not come.
   */
  #passOwnership(ownerKey: string): void {
    this.#owners.delete(ownerKey);
    let next: Connection | undefined;
    for (const candidate of this.#connections.values()) if (candidate.ownerKey === ownerKey) next = candidate;
    if (!next) return;
    this.#owners.set(ownerKey, next);
    for (const entry of this.#mailbox.pending(ownerKey)) this.#sendEvent(next, entry);
  }

  #onMessage(connection: Connection, message: Message): void {
    if (message.type !== 'request') {
      this.counters.faults++;
      this.#reject(connection, message.requestId, new ProtocolError('EFDFERRY_TYPE', `a client may send requests only, not ${message.type}`), message.fds);
      return;
    }
    this.counters.requests++;
    if (connection.inflight >= this.#limits.maxInflightPerConnection) {
      this.#reject(
        connection,
        message.requestId,
        new ProtocolError('EFDFERRY_BUSY', `more than ${this.#limits.maxInflightPerConnection} requests in progress on this connection`),
        message.fds,
      );
      return;
    }
    const uid = connection.peer.uid;
    const ownerKey = connection.ownerKey;
    const fdCount = message.fds.length;
    try {
      this.quotas.admit(uid, ownerKey, fdCount);
    } catch (error) {
      this.counters.quotaRefusals++;
      this.#warnQuota(connection, error as ProtocolError);
      this.#reject(connection, message.requestId, error as ProtocolError, message.fds);
      return;
    }
    connection.inflight++;
    this.#dispatch(connection, message)
      .then(
        (outcome) => {
          if (outcome !== DEFERRED) this.#reply(connection, message.requestId, outcome);
        },
        (error: unknown) => {
          const protocolError =
            error instanceof ProtocolError ? error : new ProtocolError('EFDFERRY_INTERNAL', (error as Error)?.message ?? String(error));
          if (!(error instanceof ProtocolError)) connection.log.error({ err: error, method: message.method }, 'method failed');
          this.#reject(connection, message.requestId, protocolError, protocolError.fds.length ? protocolError.fds : message.fds);
        },
      )
      .finally(() => {
        this.quotas.settle(uid, ownerKey, fdCount);
        connection.inflight--;
        this.#inflightSettled?.();
      });
  }

  async #dispatch(connection: Connection, request: RequestMessage): Promise<HandlerResult | typeof DEFERRED> {
    const { method: name, params, fds } = request;
    if (name === 'hello') return this.#hello(connection, params, fds);
    if (connection.ownerKey === null) throw new ProtocolError('EFDFERRY_NOHELLO', `"${name}" before "hello": name an owner first`);
    if (name === 'ping') {
      expectNoFds(fds);
      return { result: { pong: true, time: Date.now() } };
    }
    if (name === 'ack') return this.#ack(connection, params, fds);
    const method = this.#options.methods[name];
    if (!method || !Object.hasOwn(this.#options.methods, name)) {
      throw new ProtocolError('EFDFERRY_METHOD', `unknown method "${name}"`, { methods: this.methodNames() });
    }
    if (this.#controlMethods.includes(name) && !connection.control) {
      connection.log.warn({ method: name, peerGid: connection.peer.gid, peerExe: peerExecutable(connection.peer.pid) }, 'control method refused: peer not on the control allow-list');
      throw new ProtocolError('EFDFERRY_DENIED', `uid ${connection.peer.uid} may not call "${name}" (not on the control allow-list)`);
    }
    const fdDescriptions = this.#checkFds(method.fds ?? { min: 0, max: 0, kind: 'any' }, fds);
    const parsed: unknown = method.parse ? method.parse(params) : params;
    return method.handle({
      params: parsed,
      fds,
      fdDescriptions,
      connection,
      requestId: request.requestId,
      log: connection.log,
    });
  }

  /** Every method a client may call, built-ins included. */
  methodNames(): string[] {
    return ['hello', 'ping', 'ack', ...Object.keys(this.#options.methods)];
  }

  #checkFds(spec: FdSpec, fds: number[]): FdDescription[] {
    if (fds.length < spec.min || fds.length > spec.max) {
      const wanted = spec.min === spec.max ? `${spec.min}` : `${spec.min} to ${spec.max}`;
      throw new ProtocolError('EFDFERRY_FDCOUNT', `this method takes ${wanted} fds, got ${fds.length}`);
    }
    return fds.map((fd, index) => {
      const description = this.#options.binding.describeFd(fd);
      const mismatch = fdKindMismatch(spec.kind, description);
      if (mismatch) throw new ProtocolError('EFDFERRY_FDKIND', `fd #${index} ${mismatch}`, { index });
      return description;
    });
  }

  #hello(connection: Connection, params: Record<string, unknown>, fds: number[]): HandlerResult {
    expectNoFds(fds);
    const { owner, protocol = PROTOCOL_VERSION } = params;
    if (protocol !== PROTOCOL_VERSION) {
      // JSON.stringify, not String(): a hostile {"toString":0} must get its EFDFERRY_VERSION too.
      throw new ProtocolError('EFDFERRY_VERSION', `client speaks protocol ${JSON.stringify(protocol)}, this daemon speaks ${PROTOCOL_VERSION}`, {
        supported: [PROTOCOL_VERSION],
      });
    }
    if (typeof owner !== 'string' || !OWNER_PATTERN.test(owner)) {
      throw new ProtocolError('EFDFERRY_INVALID', '"owner" must be 1 to 128 printable ASCII characters without spaces');
    }
    if (connection.ownerKey !== null && connection.owner !== owner) {
      throw new ProtocolError('EFDFERRY_INVALID', 'a connection names its owner once');
    }
    connection.owner = owner;
    connection.ownerKey = `${connection.peer.uid}:${owner}`;
    connection.log = connection.log.child({ owner });
    this.#owners.set(connection.ownerKey, connection);
    // Kept results go out only after the hello reply, so a client never sees an event before its hello.
    setImmediate(() => {
      if (connection.channel.closed || this.#owners.get(connection.ownerKey!) !== connection) return;
      for (const entry of this.#mailbox.pending(connection.ownerKey!)) this.#sendEvent(connection, entry);
      this.emit('hello', connection);
    });
    return {
      result: {
        protocol: PROTOCOL_VERSION,
        service: this.#options.service,
        version: this.#options.version,
        pid: process.pid,
        generation: this.#options.generation ?? 1,
        pending: this.#mailbox.pending(connection.ownerKey).length,
        limits: {
          maxFdsPerMessage: MAX_FDS_PER_MESSAGE,
          maxInlineBody: MAX_INLINE_BODY,
          maxBodyBytes: this.#limits.maxBodyBytes,
          maxInflight: this.#limits.maxInflightPerConnection,
        },
        methods: this.methodNames(),
      },
    };
  }

  #ack(connection: Connection, params: Record<string, unknown>, fds: number[]): HandlerResult {
    expectNoFds(fds);
    const { ids } = params;
    if (!Array.isArray(ids) || ids.length > 4096 || !ids.every((id) => typeof id === 'string')) {
      throw new ProtocolError('EFDFERRY_INVALID', '"ids" must be an array of at most 4096 strings');
    }
    const unknown = (ids as string[]).filter((id) => {
      if (!this.#mailbox.ack(connection.ownerKey!, id)) return true;
      this.emit('ack', connection.ownerKey!, id);
      return false;
    });
    return { result: { acked: ids.length - unknown.length, unknown } };
  }

  #sendEvent(connection: Connection, entry: MailboxEntry): void {
    entry.deliveries++;
    try {
      this.#send(connection, { type: 'event', requestId: 0, event: entry.event, id: entry.id, data: entry.data, fds: entry.fds });
    } catch (error) {
      // Unencodable (too many fds with a spilled body, too big): the entry stays kept and logged; the owner's
      // connection is not punished for it.
      connection.log.error({ err: error, id: entry.id, event: entry.event }, 'a kept result cannot be encoded; it stays in the mailbox');
    }
  }

  #reply(connection: Connection, requestId: number, outcome: HandlerResult): void {
    const fds = outcome.fds ?? [];
    try {
      this.#send(connection, { type: 'reply', requestId, result: outcome.result, fds });
    } catch (error) {
      // The reply cannot be encoded: the request still gets exactly one answer, an error, with the fds
      // (#reject closes our copies).
      this.#reject(connection, requestId, new ProtocolError('EFDFERRY_INTERNAL', `the reply could not be encoded: ${(error as Error).message}`), fds);
      return;
    }
    this.#options.binding.closeAll(fds);
  }

  /** Answers with an error and gives `fds` back to the peer; the server's copies are closed either way. */
  #reject(connection: Connection, requestId: number, error: ProtocolError, fds: number[]): void {
    this.counters.errors++;
    this.errorsByCode.set(error.code, (this.errorsByCode.get(error.code) ?? 0) + 1);
    const wire = { code: error.code, message: error.message, ...(error.details ? { details: error.details } : {}) };
    try {
      let sent: boolean;
      try {
        sent = this.#send(connection, { type: 'error', requestId, error: wire, fds });
      } catch {
        // An error message is small; it can only fail to encode with more fds than a message holds.
        sent = this.#send(connection, { type: 'error', requestId, error: { ...wire, message: `${wire.message} (its fds could not be returned)` }, fds: [] });
      }
      if (!sent && fds.length) connection.log.warn({ fds: fds.length, code: error.code }, 'could not return fds: the client is gone');
    } finally {
      this.#options.binding.closeAll(fds);
    }
  }

  /**
   * Sends, applying backpressure (stop reading until the queue drains). Returns false when the peer is
   * gone (the connection is closed then). Throws the {@link ProtocolError} of a message that cannot be
   * encoded: that is the sender's problem, not the connection's.
   */
  #send(connection: Connection, message: Message): boolean {
    if (connection.channel.closed) return false;
    try {
      if (!connection.channel.send(message)) connection.channel.setReading(false);
      return true;
    } catch (error) {
      if (error instanceof ProtocolError) throw error;
      const code = (error as NodeJS.ErrnoException).code;
      // Not a socket failure (no errno): the message itself could not be encoded. The sender gets an error
      // for it; the connection is fine.
      if (code === undefined) throw new ProtocolError('EFDFERRY_INTERNAL', `the reply could not be encoded: ${(error as Error).message}`);
      // A peer that went away (EPIPE, ECONNRESET) is ordinary; anything else deserves attention.
      const level = code === 'EPIPE' || code === 'ECONNRESET' ? 'debug' : 'warn';
      connection.log[level]({ err: error, type: message.type }, 'send failed; closing the connection');
      connection.channel.close();
      return false;
    }
  }

  #logExpiry(entry: MailboxEntry, reason: ExpiryReason): void {
    this.emit('expire', entry.ownerKey, entry.id);
    this.#log.warn(
      { ownerKey: entry.ownerKey, id: entry.id, event: entry.event, data: entry.data, fds: entry.fds.length, reason, deliveries: entry.deliveries },
      'result expired without acknowledgement; its fds are closed',
    );
  }
}

function expectNoFds(fds: number[]): void {
  if (fds.length) throw new ProtocolError('EFDFERRY_FDCOUNT', `this method takes no fds, got ${fds.length}`);
}

/**
 * Removes a leftover socket file from a daemon that died, but refuses to steal the path from a live one.
 * A live listener is detected by connecting to it.
 */
function removeStaleSocket(address: string, binding: ServerBinding): void {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(address);
  } catch {
    return;
  }
  if (!stat.isSocket()) {
    throw Object.assign(new Error(`${address} exists and is not a socket; refusing to replace it`), { code: 'EEXIST' });
  }
  let probe: number;
  try {
    probe = binding.seqpacketConnect(address);
  } catch {
    fs.rmSync(address, { force: true });
    return;
  }
  binding.closeAll([probe]);
  throw Object.assign(new Error(`another daemon is listening on ${address}`), { code: 'EADDRINUSE' });
}

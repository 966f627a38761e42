/**
 * The typed boundary to fdferry's C++ addon, and its loader.
 *
 * Everything that crosses into native code is declared here, so the rest of `lib/` depends on
 * {@link NativeBinding} (an interface) and never on the `.node` file itself: classes take the binding as
 * a constructor argument, and unit tests pass an in-memory fake instead.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import type { BumblebeeBinding } from './native-bumblebee.js';
import type { FishBinding } from './native-fish.js';
import type { CompletionCallback, SpliceEngine, SpliceEngineOptions } from './native-splice.js';

export type * from './native-splice.js';
export type * from './native-bumblebee.js';
export type * from './native-fish.js';

/** Credentials of the process at the other end of a connected AF_UNIX socket (`SO_PEERCRED`). */
export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}

/** What `describeFd` finds behind an fd: enough to validate a handed-over fd before trusting it. */
export interface FdDescription {
  /** `socket`, `file` (regular), `pipe` (FIFO), `char`, `dir` or `other`, from `fstat`. */
  kind: 'socket' | 'file' | 'pipe' | 'char' | 'dir' | 'other';
  /** For sockets: `SO_DOMAIN` (AF_UNIX = 1, AF_INET = 2, AF_INET6 = 10, ...). */
  family?: number;
  /** For sockets: `SO_TYPE` (SOCK_STREAM = 1, SOCK_DGRAM = 2, SOCK_SEQPACKET = 5, ...). */
  type?: number;
  /** For sockets: `SO_PROTOCOL` (IPPROTO_TCP = 6, ...). */
  protocol?: number;
  /** For sockets: `SO_ACCEPTCONN`. */
  listening?: boolean;
  /** For sockets: whether `getpeername` succeeds. */
  connected?: boolean;
  /** For regular files: size in bytes. */
  size?: number;
}

/** A snapshot of `struct tcp_info` (see tcp(7)); times are in microseconds as the kernel reports them. */
export interface TcpInfo {
  state: number;
  caState: number;
  retransmits: number;
  probes: number;
  backoff: number;
  options: number;
  sndWscale: number;
  rcvWscale: number;
  rto: number;
  ato: number;
  sndMss: number;
  rcvMss: number;
  unacked: number;
  sacked: number;
  lost: number;
  retrans: number;
  lastDataSent: number;
  lastDataRecv: number;
  lastAckRecv: number;
  pmtu: number;
  rcvSsthresh: number;
  rtt: number;
  rttvar: number;
  sndSsthresh: number;
  sndCwnd: number;
  advmss: number;
  reordering: number;
  rcvRtt: number;
  rcvSpace: number;
  totalRetrans: number;
  bytesAcked: number;
  bytesReceived: number;
  segsOut: number;
  segsIn: number;
  minRtt: number;
  dataSegsIn: number;
  dataSegsOut: number;
  deliveryRate: number;
  busyTime: number;
  bytesSent: number;
  bytesRetrans: number;
}

/** Why a received message could not be taken whole; the addon has already closed every fd that arrived. */
export interface ReceiveFault {
  /** `MSG_CTRUNC`: some fds were dropped by the kernel (receiver at RLIMIT_NOFILE, an LSM refused one...). */
  ctrunc: boolean;
  /** `MSG_TRUNC`: the message was larger than the receive buffer. */
  trunc: boolean;
}

/**
 * Called for each message a {@link SeqpacketSocket} receives. `fds` are owned by the callee from then on
 * (they arrive close-on-exec). When `fault` is set, `fds` is empty and `data` is what did arrive.
 */
export type MessageCallback = (data: Buffer, fds: number[], fault: ReceiveFault | null) => void;

/** Callbacks a {@link SeqpacketSocket} reports through; all run on the loop that created the socket. */
export interface SeqpacketCallbacks {
  message: MessageCallback;
  /** The send queue emptied after `send` had returned false. */
  drain: () => void;
  /** The peer closed (EOF or hang-up), or a fatal error happened; the socket is closed when this runs. */
  close: (error: Error | null) => void;
}

/**
 * A connected AF_UNIX SOCK_SEQPACKET socket polled on the environment's own libuv loop. It owns its fd:
 * `close()` closes it.
 */
export interface SeqpacketSocket {
  /** The fd, or -1 once closed. */
  readonly fd: number;
  /**
   * Sends one message with up to 253 fds. The fds stay the caller's: they are duplicated only when the
   * message has to wait in the send queue. Returns `false` when the queue is above its high-water mark
   * (wait for `drain`). Throws a Node-style error for a closed socket or an unsendable message.
   */
  send(data: Uint8Array, fds: number[]): boolean;
  /** Messages waiting in the send queue. */
  readonly queued: number;
  /** Stops or restarts reading (sending carries on). Paused sockets keep their messages in the kernel. */
  setReading(reading: boolean): void;
  /** `SO_PEERCRED` of the peer. */
  peerCredentials(): PeerCredentials;
  /** Closes the socket (queued messages are dropped, their duplicated fds closed). Idempotent. */
  close(): void;
  /** Lets the loop exit while this socket is open (`uv_unref`). */
  unref(): void;
  /** Keeps the loop alive while this socket is open (`uv_ref`); the default. */
  ref(): void;
}

/** A listening AF_UNIX SOCK_SEQPACKET socket that hands every accepted connection's fd to a callback. */
export interface SeqpacketListener {
  readonly fd: number;
  /** Stops or restarts accepting; pending connections wait in the kernel backlog. */
  setAccepting(accepting: boolean): void;
  close(): void;
  unref(): void;
  ref(): void;
}

/** Everything fdferry needs from native code. */
export interface NativeBinding extends BumblebeeBinding, FishBinding {
  /** Creates, binds and listens on a SOCK_SEQPACKET socket (nonblocking, close-on-exec). A leading NUL means abstract. */
  seqpacketListen(path: string, backlog: number): number;
  /** Connects a new SOCK_SEQPACKET socket (nonblocking, close-on-exec) to `path`. */
  seqpacketConnect(path: string): number;
  /** A connected pair of SOCK_SEQPACKET sockets (nonblocking, close-on-exec). */
  seqpacketPair(): [number, number];
  /** A connected pair of AF_UNIX SOCK_STREAM sockets (nonblocking, close-on-exec). */
  streamPair(): [number, number];
  /** Wraps a connected SOCK_SEQPACKET fd (taking ownership) and starts reading. */
  openSeqpacket(fd: number, callbacks: SeqpacketCallbacks): SeqpacketSocket;
  /** Wraps a listening SOCK_SEQPACKET fd (taking ownership); `onConnection` gets each accepted fd (or an error, e.g. EMFILE). */
  openListener(fd: number, onConnection: (error: Error | null, fd: number) => void): SeqpacketListener;

  /** `memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)`. */
  memfdCreate(name: string): number;
  /** Adds F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL. */
  memfdSeal(fd: number): void;
  /** `fcntl(F_GET_SEALS)`; throws EINVAL for an fd that is not a memfd (or was made without sealing). */
  memfdSeals(fd: number): number;

  /** `fcntl(F_DUPFD_CLOEXEC)`. */
  dup(fd: number): number;
  /** Grows the fd table to hold `count` fds now (it never shrinks); false when the fd limit forbids it. */
  reserveFdTable(count: number): boolean;
  /** `close(2)`; throws on EBADF. */
  close(fd: number): void;
  /** Closes each fd, ignoring errors: for cleanup paths that must not throw. */
  closeAll(fds: readonly number[]): void;
  /** Inspects an fd (fstat, SO_DOMAIN, SO_TYPE, SO_PROTOCOL, SO_ACCEPTCONN, getpeername). */
  describeFd(fd: number): FdDescription;
  /** `getsockopt(TCP_INFO)`. */
  tcpInfo(fd: number): TcpInfo;
  /** Bytes waiting to be read in a pipe or socket (`ioctl(FIONREAD)`). */
  pendingBytes(fd: number): number;
  /** Sets or clears O_NONBLOCK (read-modify-write of F_GETFL). */
  setNonblocking(fd: number, nonblocking: boolean): void;
  /** An unbound AF_UNIX SOCK_DGRAM socket (nonblocking, close-on-exec): the sd_notify sender. */
  datagramSocket(): number;
  /** A SOCK_DGRAM socket bound to `path` (tests play systemd's notify socket with it). */
  datagramBind(path: string): number;
  /** Sends one datagram to `address` with `fds` attached. */
  datagramSend(fd: number, address: string, data: Uint8Array, fds: number[]): void;
  /**
   * Starts a splice engine (its own epoll threads). `onComplete` receives batches of ended relays on this
   * thread's loop.
   */
  createSpliceEngine(options: SpliceEngineOptions, onComplete: CompletionCallback): SpliceEngine;
  /** The constants of the seals, socket families and types, as the running kernel headers define them. */
  readonly constants: Readonly<Record<string, number>>;
}

/** Seal bits every memfd body and state file must carry. */
export const REQUIRED_SEALS_NAMES = ['F_SEAL_SHRINK', 'F_SEAL_GROW', 'F_SEAL_WRITE', 'F_SEAL_SEAL'] as const;

let cached: NativeBinding | undefined;

/** Where the loader looks for the compiled addon, in order. */
export function candidatePaths(root: string = packageRoot()): string[] {
  return [
    path.join(root, 'build', 'Release', 'fdferry.node'),
    path.join(root, 'build', 'Debug', 'fdferry.node'),
  ];
}

/** The project root: two levels above this file both in `lib/` (tsx) and in `dist/lib/` (compiled). */
function packageRoot(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  return path.basename(path.dirname(here)) === 'dist' ? path.resolve(here, '..', '..') : path.resolve(here, '..');
}

/**
 * Loads the addon on first use. Importing this module never requires a built addon; calling this does,
 * and a failure names every path that was tried and why each failed.
 */
export function loadNative(): NativeBinding {
  if (cached) return cached;
  const require = createRequire(import.meta.url);
  const tried: string[] = [];
  for (const candidate of candidatePaths()) {
    try {
      cached = require(candidate) as NativeBinding;
      return cached;
    } catch (error) {
      tried.push(`  ${candidate}: ${(error as Error).message.split('\n')[0]}`);
    }
  }
  throw new Error(
    `fdferry: the native addon is not built (run \`npm run build\`). Tried:\n${tried.join('\n')}`,
  );
}

/**
 * The typed boundary of the native splice engine (native/splice_engine.cc): relays between pairs of
 * stream sockets run on the engine's own epoll threads, never on the JavaScript thread.
 *
 * The engine never owns the relay's two sockets: it borrows them from `add` until the relay's
 * completion is reported (or it is paused), then they are the caller's again, untouched. It does own the
 * pipes it borrows from its pool while bytes are in flight.
 */

/** Why a relay ended. */
export type RelayEndReason =
  /** Both directions saw EOF and delivered everything (half-closes propagated). */
  | 'complete'
  /** A socket failed (reset, broken pipe...): see `code`, `errno`, `side`. */
  | 'error'
  | 'idle-timeout'
  | 'max-duration'
  /** A direction reached its byte cap. */
  | 'byte-cap'
  /** The owner cancelled it. */
  | 'cancelled'
  /** The daemon is stopping. */
  | 'shutdown';

/** Per-relay limits and prefaces. Zero means "no limit". */
export interface RelayOptions {
  idleTimeoutMs: number;
  maxDurationMs: number;
  maxBytesAToB: number;
  maxBytesBToA: number;
  /** Bytes written to B before anything read from A (the proxy already read them from A). */
  prefaceAToB?: Uint8Array;
  /** Bytes written to A before anything read from B. */
  prefaceBToA?: Uint8Array;
}

/** What the engine reports when a relay ends; `fdA`/`fdB` are the caller's again. */
export interface RelayCompletion {
  id: number;
  reason: RelayEndReason;
  /** The errno that ended the relay (positive, as the kernel gives it), or 0. */
  errno: number;
  /** The errno's name (`ECONNRESET`), or null. */
  code: string | null;
  /** Which socket failed (`a` or `b`), or null. */
  side: 'a' | 'b' | null;
  bytesAToB: number;
  bytesBToA: number;
  /** Whether each direction finished with an EOF that was propagated by shutdown(SHUT_WR). */
  finishedAToB: boolean;
  finishedBToA: boolean;
  /** Wall-clock milliseconds (Date.now() scale). */
  startedAt: number;
  endedAt: number;
  /** Bytes read from A (resp. B) that never reached the other side because the relay ended first; null when none. */
  unsentAToB: Buffer | null;
  unsentBToA: Buffer | null;
}

/** A live relay as `snapshot()` sees it. */
export interface RelaySnapshot {
  id: number;
  bytesAToB: number;
  bytesBToA: number;
  finishedAToB: boolean;
  finishedBToA: boolean;
  /** Milliseconds since bytes last moved. */
  idleMs: number;
  /** Pipes this relay holds right now (0 when idle). */
  pipes: number;
}

/** Engine-wide figures for status and metrics. */
export interface SpliceEngineStats {
  threads: number;
  relays: number;
  pipesInUse: number;
  pipesIdle: number;
  /** The pipe size asked for with F_SETPIPE_SZ. */
  pipeSizeRequested: number;
  /** Pipes that could not be enlarged (EPERM: no CAP_SYS_RESOURCE and over the user's pipe quota) and kept a smaller size. */
  pipeResizeFailures: number;
  /** Smallest pipe size currently in use. */
  pipeSizeMin: number;
  /** Times a relay had to wait because the pool was at `maxPipes`. */
  pipeWaits: number;
  /** Relays that use read/write copying because their fds cannot be spliced. */
  copyRelays: number;
  bytesTotal: number;
}

/** Options of the engine. */
export interface SpliceEngineOptions {
  /** Epoll threads; each relay lives on one. */
  threads: number;
  /** Pipe size to ask for (bytes). */
  pipeSize: number;
  /** Upper bound on pipes borrowed at once (each costs 2 fds). */
  maxPipes: number;
  /** Empty pipes kept in the pool for reuse. */
  maxIdlePipes: number;
  /**
   * Crash survival: make all `maxPipes` pipes at start, never close them, and record in a memfd table
   * which relay and direction holds each (see {@link PipeTable}).
   */
  persistentPipes?: boolean;
}

/**
 * A persistent pipe pool for the fd store: the owner table (a memfd of one little-endian 64-bit word per
 * pipe: 0 = idle, else `(relayId * 2 + direction) + 1`, direction 0 = A to B) and every pipe, by number.
 */
export interface PipeTable {
  tableFd: number;
  pipes: Array<{ index: number; fds: [number, number] }>;
}

/** A paused relay: everything needed to resume it here or in a successor process. */
export interface PausedRelay {
  id: number;
  fdA: number;
  fdB: number;
  options: RelayOptions;
  bytesAToB: number;
  bytesBToA: number;
  finishedAToB: boolean;
  finishedBToA: boolean;
  /** EOF already read from A (resp. B) but not yet propagated. */
  eofAToB: boolean;
  eofBToA: boolean;
  /** Pipes holding bytes in flight, as [readFd, writeFd], with how many bytes they hold; null when empty. */
  pipeAToB: { fds: [number, number]; bytes: number } | null;
  pipeBToA: { fds: [number, number]; bytes: number } | null;
  startedAt: number;
}

/** The native splice engine. */
export interface SpliceEngine {
  /** The persistent pipe pool (null unless the engine was made with `persistentPipes`). */
  pipeTable(): PipeTable | null;
  /** Starts relaying between two connected stream sockets. Throws if the id is in use or an fd is unusable. */
  add(id: number, fdA: number, fdB: number, options: RelayOptions): void;
  /** Ends a relay with reason `cancelled` (its completion follows); false if no such relay. */
  cancel(id: number): boolean;
  /** Ends every relay with reason `shutdown`; their completions follow. */
  endAll(): void;
  snapshot(): RelaySnapshot[];
  stats(): SpliceEngineStats;
  /** Stops every relay where it is and returns their state; the engine no longer touches their fds. */
  pauseAll(): PausedRelay[];
  /** Reports completions that are already waiting, synchronously (before a pause is exported). */
  flush(): void;
  /** Resumes a paused relay (here, or in a successor that received its fds). */
  resume(relay: PausedRelay): void;
  /** Stops the threads; relays still running end with `shutdown` first. */
  close(): void;
}

/** Called on the JS thread with a batch of completions. */
export type CompletionCallback = (completions: RelayCompletion[]) => void;

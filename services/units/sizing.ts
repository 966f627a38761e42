/**
 * The numbers in a service unit, derived from the daemon's effective configuration so that they cannot
 * contradict it:
 *
 * - `TimeoutStartSec=` also bounds every reload (systemd 252 has no separate reload timeout, and a
 *   `RELOADING=1` state counts as starting): twice the hand-over deadline plus 10 s for starting Node and
 *   the config check, and never under 30 s.
 * - the reload client (`ctl ... reload --wait --timeout`) gives up 5 s after the hand-over deadline, well
 *   before systemd would kill it, so a stuck reload is reported by fdferry rather than as a systemd timeout.
 * - `TimeoutStopSec=`: a stop during a hand-over first rolls it back (up to the deadline), then the daemon
 *   has its shutdown grace; 10 s on top before SIGKILL.
 * - `FileDescriptorStoreMax=`: everything the daemon may hold (listener, tasks' sockets, pipes, state),
 *   never under 16384; systemd closes what does not fit, which would lose relays after a crash.
 * - `LimitNOFILE=`: twice that (fds in flight in requests, a recovering process holding the stored fds
 *   while it rebuilds), never under 65536.
 */

/** What the numbers are derived from. */
export interface SizingInput {
  /** `--handoff-timeout` (ms). */
  handoffTimeoutMs: number;
  /** `--shutdown-grace` (ms). */
  shutdownGraceMs: number;
  /** fds the daemon may hold at its configured limits. */
  fds: number;
  /** `WatchdogSec=` in seconds; 0 leaves the watchdog off. */
  watchdogSec: number;
}

/** The numbers as they go into the unit. */
export interface UnitSizing {
  timeoutStartSec: number;
  timeoutStopSec: number;
  reloadClientTimeoutMs: number;
  watchdogSec: number;
  fileDescriptorStoreMax: number;
  limitNoFile: number;
}

export const MIN_TIMEOUT_START_SEC = 30;
export const MIN_FD_STORE = 16_384;
export const MIN_LIMIT_NOFILE = 65_536;
/** The longest single hand-over phase budget (lib/handoff: hello, validate, done are 5 s each). */
export const LONGEST_HANDOFF_PHASE_SEC = 5;
export const DEFAULT_WATCHDOG_SEC = 30;

const seconds = (ms: number): number => Math.ceil(ms / 1000);

/** Derives the unit's numbers; throws when an input makes no sense. */
export function unitSizing(input: SizingInput): UnitSizing {
  const { handoffTimeoutMs, shutdownGraceMs, fds, watchdogSec } = input;
  for (const [name, value] of Object.entries({ handoffTimeoutMs, shutdownGraceMs, fds, watchdogSec })) {
    if (!Number.isSafeInteger(value) || value < 0) throw new Error(`${name} must be a non-negative integer, got ${value}`);
  }
  if (handoffTimeoutMs < 1) throw new Error('handoffTimeoutMs must be positive');
  // Both generations ping during a hand-over, but a phase that blocks a loop must not look like a hang.
  if (watchdogSec !== 0 && watchdogSec < 2 * LONGEST_HANDOFF_PHASE_SEC) {
    throw new Error(`WatchdogSec must be 0 (off) or at least ${2 * LONGEST_HANDOFF_PHASE_SEC} s, got ${watchdogSec}`);
  }
  const timeoutStartSec = Math.max(MIN_TIMEOUT_START_SEC, 2 * seconds(handoffTimeoutMs) + 10);
  const fileDescriptorStoreMax = Math.max(MIN_FD_STORE, fds);
  return {
    timeoutStartSec,
    timeoutStopSec: seconds(handoffTimeoutMs) + seconds(shutdownGraceMs) + 10,
    reloadClientTimeoutMs: handoffTimeoutMs + 5_000,
    watchdogSec,
    fileDescriptorStoreMax,
    limitNoFile: Math.max(MIN_LIMIT_NOFILE, 2 * fileDescriptorStoreMax),
  };
}

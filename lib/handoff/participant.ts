/**
 * What a service gives the hand-over mechanism: two functions on each side, plus the undo and the
 * clean-up. The mechanism (predecessor.ts, successor.ts) owns the order; the service owns its tasks.
 */

/** Figures a service reports about what it moved. */
export interface ExportSummary {
  tasks: number;
  /** Bytes that were in flight inside the data plane (for Splicer: in its pipes). */
  bytesInFlight: number;
}

/** A service's side of a hand-over. */
export interface HandoffParticipant {
  /**
   * Predecessor: pauses every task where it is and describes it, appending every fd it needs to `fds`
   * and recording indices into that list. Nothing may move until `resumeAfterRollback` or
   * `releaseExported`.
   */
  pauseAndExport(fds: number[]): { state: Record<string, unknown>; summary: ExportSummary };
  /** Predecessor, on rollback: resumes every paused task exactly where it stopped, on the same fds. */
  resumeAfterRollback(): void;
  /** Predecessor, after commit: the successor owns the tasks; close our copies of their fds. */
  releaseExported(): void;
  /**
   * Successor: checks the state (shape and fd kinds) and adopts it, paused. Throws a `ProtocolError`
   * (`EFDFERRY_STATE`) to refuse it; nothing is kept then.
   */
  importState(state: Record<string, unknown>, fds: readonly number[]): ExportSummary;
  /** Successor, after commit: resumes every imported task. */
  resumeImported(): void;
}

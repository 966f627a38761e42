/**
 * The daemons' hand-over for applications that have no protocol server of their own: an edge proxy that
 * wants to restart without dropping what it holds (a tun, packet sockets) uses the same mechanism, the same
 * state file and the same two-way commit as Splicer, Bumblebee and Fish (docs/restart.md).
 *
 * The application implements {@link HandoffParticipant} and calls {@link takeOver} once at start-up (it
 * returns null on a fresh start) and {@link handOver} when it should restart (on SIGHUP, say). The successor
 * is the same program with the same arguments, started through `setsid --fork` with the channel on fd 3.
 * Everything before commit rolls back: the participant's `resumeAfterRollback` runs and the old process
 * carries on. `examples/edge-proxy/` shows it in use.
 */
import type { Logger } from 'pino';
import type { NativeBinding } from '../native.js';
import { Notifier } from '../systemd/notify.js';
import type { HandoffParticipant } from './participant.js';
import { Predecessor, type HandoffReport } from './predecessor.js';
import { Successor, takeSuccessorEnvironment } from './successor.js';

/** Default deadline of a whole hand-over, as the daemons' `--handoff-timeout`. */
export const DEFAULT_HANDOFF_TIMEOUT_MS = 10_000;

/** What {@link handOver} needs. */
export interface HandOverOptions {
  binding: NativeBinding;
  log: Logger;
  participant: HandoffParticipant;
  /** The application's name, written into the state document. */
  service: string;
  /** This process's generation: 1 after a fresh start, else what {@link takeOver} returned. */
  generation: number;
  timeoutMs?: number;
  /** Where `RELOADING=1` and the rollback status go; default: nowhere (an application is not a unit's main process here). */
  notifier?: Notifier;
}

/**
 * Hands everything the participant exports to a successor. Resolves with the report: `ok` means the
 * successor took over (the participant's `releaseExported` has run; this process should finish what it
 * still has in progress and exit), otherwise the hand-over was rolled back and this process carries on.
 * Rejects only when the successor took over and then died (nothing is left to roll back to).
 */
export function handOver(options: HandOverOptions): Promise<HandoffReport> {
  const predecessor = new Predecessor({
    binding: options.binding,
    log: options.log,
    server: null,
    participant: options.participant,
    // An empty environment makes a notifier that sends nothing.
    notifier: options.notifier ?? new Notifier(options.binding, {}),
    service: options.service,
    generation: options.generation,
    timeoutMs: options.timeoutMs ?? DEFAULT_HANDOFF_TIMEOUT_MS,
  });
  return predecessor.start(null, null);
}

/** What {@link takeOver} needs. */
export interface TakeOverOptions {
  binding: NativeBinding;
  log: Logger;
  participant: HandoffParticipant;
  timeoutMs?: number;
}

/** A successful take-over. */
export interface TakenOver {
  /** This process's generation (the predecessor's plus one). */
  generation: number;
  /** The predecessor's pid. */
  predecessorPid: number;
  /** The predecessor's report, completed with the resume phase. */
  report: HandoffReport;
}

/**
 * On a fresh start (no hand-over variables in the environment) resolves with null at once. Started as a
 * successor: receives the predecessor's state, has the participant import it (paused), commits, calls
 * `resumeImported` and tells the predecessor it is done. Call it before doing anything the predecessor
 * still does (reading the tun...). A failure before commit ends this process with exit code 1, exactly as
 * a daemon's successor: the predecessor rolls back, and nothing here was ever resumed.
 */
export async function takeOver(options: TakeOverOptions): Promise<TakenOver | null> {
  const environment = takeSuccessorEnvironment();
  if (!environment) return null;
  const { binding, log, participant } = options;
  const successor = new Successor(binding, log, environment);
  try {
    await successor.waitUntilReparented();
    const adopted = await successor.receive(null, participant, options.timeoutMs ?? DEFAULT_HANDOFF_TIMEOUT_MS);
    const resumeStarted = Date.now();
    participant.resumeImported();
    const resumedAt = Date.now();
    const pauseMs = resumedAt - adopted.pausedAt;
    const previous = adopted.predecessorReport;
    const report: HandoffReport = {
      ok: true,
      oldPid: previous?.oldPid ?? environment.parentPid,
      newPid: process.pid,
      generation: environment.generation,
      phasesMs: { ...(previous?.phasesMs ?? {}), resume: resumedAt - resumeStarted },
      totalMs: (previous?.totalMs ?? 0) + (Date.now() - resumeStarted),
      pauseMs,
      tasks: adopted.tasks,
      connections: 0,
      fds: previous?.fds ?? 0,
      bytesInFlight: adopted.bytesInFlight,
    };
    successor.done({ pauseMs, phasesMs: { resume: resumedAt - resumeStarted } });
    return { generation: environment.generation, predecessorPid: report.oldPid, report };
  } catch (error) {
    log.error({ err: error }, 'hand-over failed in the successor; exiting (the predecessor rolls back)');
    process.exit(1);
  }
}

/**
 * The old process's side of a hand-over (DESIGN §4, `notes/systemd-restart.md` §3 and §11).
 *
 * spawn → pid → hello → pause → transfer → validate → commit → done. Until commit every failure rolls
 * back: the successor is killed by the pid it reported, every task resumes where it paused, the server
 * accepts and reads again, systemd hears `READY=1` with the reason in `STATUS=`. After commit the
 * successor owns everything and this process only waits for "done" before it exits.
 */
import type { Logger } from 'pino';
import type { NativeBinding } from '../native.js';
import { MAX_FDS_PER_MESSAGE } from '../protocol/frame.js';
import { Channel } from '../rpc/channel.js';
import type { RpcServer } from '../rpc/server.js';
import type { Notifier } from '../systemd/notify.js';
import { HandoffError, Inbox, sendEvent } from './channel-inbox.js';
import type { HandoffParticipant } from './participant.js';
import { spawnSuccessor, type HandoffFault } from './spawn.js';
import { STATE_FORMAT, writeStateMemfd } from './state-file.js';
import { openFileCount } from '../limits.js';
import { isRunning } from '../process.js';

/**
 * Time budgets of the phases; each is also bounded by what is left of the whole deadline.
 * `pid` is generous because nothing is paused yet, so waiting costs no relay anything, while a Node
 * start on a loaded 2-core machine has been seen to take over 3 s (a CI soak reload timed out there).
 */
export const PHASE_BUDGET_MS = { pid: 8_000, hello: 5_000, pause: 2_000, validate: 5_000, done: 5_000 } as const;

/** Who asked for a reload over the control socket; the successor answers them. */
export interface Requester {
  connectionId: number;
  requestId: number;
}

/** What a hand-over achieved, for logs, `reload --wait` and the benchmark. */
export interface HandoffReport {
  ok: boolean;
  oldPid: number;
  newPid: number | null;
  generation: number;
  /** Milliseconds per phase. */
  phasesMs: Record<string, number>;
  totalMs: number;
  /** From the moment tasks paused to the moment the successor resumed them (the pause a relay sees). */
  pauseMs: number | null;
  tasks: number;
  connections: number;
  fds: number;
  bytesInFlight: number;
  failure?: { phase: string; code: string; message: string };
}

/** Everything the predecessor works with. */
export interface PredecessorContext {
  binding: NativeBinding;
  log: Logger;
  /**
   * The daemon's protocol server, paused and handed over with the tasks; null for an application that has
   * none and hands over only its participant's state (see `handOver` in application.ts).
   */
  server: RpcServer | null;
  participant: HandoffParticipant;
  notifier: Notifier;
  service: string;
  generation: number;
  timeoutMs: number;
}

/** Runs hand-overs for one daemon, one at a time. */
export class Predecessor {
  readonly #context: PredecessorContext;
  #running: Promise<HandoffReport> | null = null;
  #abort: ((error: HandoffError) => void) | null = null;
  #committed = false;

  constructor(context: PredecessorContext) {
    this.#context = context;
  }

  /** Whether a hand-over is under way. */
  get busy(): boolean {
    return this.#running !== null;
  }

  /** Whether the successor took over (this process must only wait for "done" and exit). */
  get committed(): boolean {
    return this.#committed;
  }

  /** Starts a hand-over; throws if one is already running (the caller answers `busy`). */
  start(fault: HandoffFault | null, requester: Requester | null): Promise<HandoffReport> {
    if (this.#running) throw new Error('a hand-over is already in progress');
    this.#running = this.#run(fault, requester).finally(() => {
      this.#running = null;
      this.#abort = null;
    });
    return this.#running;
  }

  /** Aborts a running hand-over (SIGTERM): before commit it rolls back; resolves when it has finished. */
  async abort(reason: string): Promise<void> {
    if (!this.#running) return;
    this.#abort?.(new HandoffError('abort', 'ABORTED', reason));
    await this.#running.catch(() => undefined);
  }

  async #run(fault: HandoffFault | null, requester: Requester | null): Promise<HandoffReport> {
    const { binding, log, server, participant, notifier, generation } = this.#context;
    const started = Date.now();
    const deadline = started + this.#context.timeoutMs;
    const budget = (phase: keyof typeof PHASE_BUDGET_MS) => Math.min(PHASE_BUDGET_MS[phase], deadline - Date.now());
    const report: HandoffReport = {
      ok: false,
      oldPid: process.pid,
      newPid: null,
      generation: generation + 1,
      phasesMs: {},
      totalMs: 0,
      pauseMs: null,
      tasks: 0,
      connections: server?.connections().length ?? 0,
      fds: 0,
      bytesInFlight: 0,
    };
    let phaseStarted = started;
    const phaseDone = (name: string) => {
      const now = Date.now();
      report.phasesMs[name] = now - phaseStarted;
      phaseStarted = now;
    };
    const abort = new Promise<never>((_, reject) => (this.#abort = reject));
    abort.catch(() => undefined);
    this.#committed = false;
    let paused = false;
    const [mine, theirs] = binding.seqpacketPair();
    const channel = new Channel(mine, binding);
    const inbox = new Inbox(channel, binding);
    notifier.send({ RELOADING: 1, STATUS: `generation ${generation}: handing over to a successor` });
    log.info({ fault: fault ?? undefined }, 'hand-over: starting the successor');
    try {
      try {
        await spawnSuccessor(theirs, generation + 1, fault, openFileCount());
      } catch (error) {
        throw new HandoffError('spawn', 'SPAWN', (error as Error).message);
      } finally {
        binding.closeAll([theirs]);
      }
      const pid = await inbox.next('spawn', ['pid'], budget('pid'), abort);
      report.newPid = Number(pid.data.pid);
      phaseDone('spawn');

      const hello = await inbox.next('hello', ['hello'], budget('hello'), abort);
      const formats = Array.isArray(hello.data.formats) ? (hello.data.formats as number[]) : [];
      if (!formats.includes(STATE_FORMAT)) {
        throw new HandoffError('hello', 'INCOMPATIBLE', `the successor reads state formats ${formats.join(', ') || 'none'}, not ${STATE_FORMAT}`);
      }
      phaseDone('hello');

      if (server) {
        try {
          await Promise.race([server.pause(budget('pause')), abort]);
        } catch (error) {
          server.resume();
          throw error instanceof HandoffError ? error : new HandoffError('pause', 'BUSY', (error as Error).message);
        }
      }
      const pausedAt = Date.now();
      const fds: number[] = [];
      // The service first: relays that end as they pause put their envelopes into the mailbox the server exports next.
      const exported = participant.pauseAndExport(fds);
      paused = true;
      const serverState = server ? server.exportState(fds) : null;
      report.tasks = exported.summary.tasks;
      report.bytesInFlight = exported.summary.bytesInFlight;
      report.fds = fds.length;
      phaseDone('pause');

      const document = {
        service: this.#context.service,
        generation: generation + 1,
        fdCount: fds.length,
        server: serverState,
        tasks: exported.state,
        requester,
        pausedAt,
      };
      const memfd = writeStateMemfd(binding, document, generation + 1);
      try {
        let batches = 0;
        for (let offset = 0; offset < fds.length; offset += MAX_FDS_PER_MESSAGE) {
          sendEvent(channel, 'fds', { offset, count: Math.min(MAX_FDS_PER_MESSAGE, fds.length - offset) }, fds.slice(offset, offset + MAX_FDS_PER_MESSAGE));
          batches++;
        }
        sendEvent(channel, 'state', { fdCount: fds.length, batches }, [memfd]);
      } finally {
        binding.closeAll([memfd]);
      }
      phaseDone('transfer');

      const verdict = await inbox.next('validate', ['ready', 'reject'], budget('validate'), abort);
      if (verdict.event === 'reject') {
        throw new HandoffError('validate', String(verdict.data.code ?? 'REJECTED'), `the successor refused the state: ${String(verdict.data.message ?? '')}`);
      }
      phaseDone('validate');

      // Commit is two-way: the successor resumes only after it has said "committed", so until that word
      // arrives it has moved nothing and a rollback is still safe.
      sendEvent(channel, 'commit', { report: { ...report, totalMs: Date.now() - started }, pausedAt });
      try {
        await inbox.next('commit', ['committed'], Math.max(budget('validate'), 500), abort);
      } catch (error) {
        // No answer: stop the successor for certain, then look at everything it sent before it died. If
        // "committed" is among it, the successor had taken over and there is nothing to return to.
        await this.#killAndWait(report.newPid);
        await inbox.closed(2_000);
        if (!inbox.take('committed')) throw error;
        this.#committed = true;
        throw new HandoffError('commit', 'LOST', 'the successor took over and then died; the tasks are lost (systemd Restart= applies)');
      }
      // The point of no return: from here the successor owns every fd we sent.
      this.#committed = true;
      participant.releaseExported();
      server?.releaseExported();
      phaseDone('commit');

      try {
        const done = await inbox.next('done', ['done'], Math.max(budget('done'), 1_000));
        Object.assign(report.phasesMs, (done.data.phasesMs as Record<string, number>) ?? {});
        report.pauseMs = typeof done.data.pauseMs === 'number' ? done.data.pauseMs : null;
      } catch (error) {
        // Committed: there is nothing to roll back to. The successor may still be fine; systemd's Restart= and
        // the fd store are the net if it is not.
        log.error({ err: error }, 'hand-over committed, but the successor did not report done');
      }
      report.ok = true;
      report.totalMs = Date.now() - started;
      log.info({ report }, 'hand-over done: the successor has taken over');
      return report;
    } catch (error) {
      const failure =
        error instanceof HandoffError
          ? { phase: error.phase, code: error.code, message: error.message }
          : { phase: 'internal', code: 'INTERNAL', message: (error as Error).message };
      if (this.#committed) throw error;
      await this.#rollBack(report.newPid, paused);
      report.failure = failure;
      report.totalMs = Date.now() - started;
      log.warn({ report }, `hand-over failed in ${failure.phase} and was rolled back: ${failure.message}`);
      notifier.send({ READY: 1, STATUS: `upgrade failed: ${failure.phase}: ${failure.code}; generation ${generation} still serving` });
      return report;
    } finally {
      channel.close();
    }
  }

  /**
   * SIGKILLs the successor (by the pid it reported) and waits until it is gone, at most 2 s. Gone includes a
   * zombie: the successor is not our child, so whoever reaps it (init, a subreaper) may take its time, but a
   * zombie holds no fds and moves no bytes.
   */
  async #killAndWait(successorPid: number | null): Promise<void> {
    if (!successorPid) return;
    try {
      process.kill(successorPid, 'SIGKILL');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ESRCH') this.#context.log.warn({ err: error, successorPid }, 'could not kill the successor');
      return;
    }
    const deadline = Date.now() + 2_000;
    while (Date.now() < deadline && isRunning(successorPid)) await new Promise((resolve) => setTimeout(resolve, 2));
  }

  async #rollBack(successorPid: number | null, paused: boolean): Promise<void> {
    const { server, participant } = this.#context;
    // Dead before anything resumes here: the successor must never move a byte of a relay we resume.
    await this.#killAndWait(successorPid);
    if (paused) participant.resumeAfterRollback();
    server?.resume();
  }
}

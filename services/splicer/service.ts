/**
 * Splicer: takes two connected stream sockets, relays bytes both ways in the kernel until the relay is
 * over, then gives both sockets back to their owner in an envelope with the whole story.
 *
 * This file is policy only: validation, limits, ownership and delivery. The bytes move in the native
 * splice engine's threads; the envelope travels through the server's mailbox, so it survives the owner
 * restarting.
 */
import crypto from 'node:crypto';
import type { DaemonContext, Service } from '../../lib/daemon.js';
import type { MetricSource } from '../../lib/metrics.js';
import type { ExportSummary } from '../../lib/handoff/participant.js';
import type { PausedRelay, RelayCompletion, SpliceEngine, SpliceEngineOptions } from '../../lib/native-splice.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { defineMethod, type MethodTable } from '../../lib/rpc/server.js';
import { openFileLimit } from '../../lib/limits.js';
import { buildEnvelope, snapshotTcp } from './envelope.js';
import { FdStore } from '../../lib/systemd/fd-store.js';
import type { PassedFd } from '../../lib/systemd/activation.js';
import { CrashSurvival, recover, type CrashSurvivalExport } from './crash-survival.js';
import { exportRelay, importRelay, pausedFds, type SplicerState } from './handoff.js';
import { parseSpliceRequest, type SpliceRequestLimits, DEFAULT_REQUEST_LIMITS } from './request.js';
import { TaskTable, type SpliceTask, type TaskLimits } from './task-table.js';

/** Splicer's own settings (flags of `fdferry splicer`). */
export interface SplicerOptions {
  engine: SpliceEngineOptions;
  tasks: TaskLimits;
  request?: SpliceRequestLimits;
  /** Defaults for requests that do not say. */
  idleTimeoutMs: number;
  maxDurationMs: number;
  /** On SIGTERM, how long absent owners have to come back for their envelopes. */
  shutdownGraceMs: number;
  /** Log every relay's end at info level (an audit trail) instead of debug. */
  audit: boolean;
  /** Keep relays, pipes and a checkpoint in systemd's fd store, so a crash loses nothing (docs/operations.md). */
  fdStore: boolean;
}

/** Event name of an envelope in the owner's mailbox. */
export const ENVELOPE_EVENT = 'envelope';

/** The Splicer service. */
export class SplicerService implements Service {
  readonly name = 'splicer';
  /** Ending every relay of an owner is an operator's act, not a client's. */
  readonly controlMethods = ['drain'];
  readonly #context: DaemonContext;
  readonly #options: SplicerOptions;
  readonly #engine: SpliceEngine;
  readonly #tasks: TaskTable;
  readonly #bootId = crypto.randomBytes(4).toString('hex');
  #nextEngineId = 1;
  #stopping = false;
  #relaysEnded = 0;
  #relaysStarted = 0;
  readonly #endedByReason = new Map<string, number>();
  #onIdle: (() => void) | null = null;
  /** Relays paused for a hand-over (exported, or imported and waiting for commit). */
  #paused: PausedRelay[] = [];
  /** The fd store bookkeeping, when crash survival is on and a service manager listens. */
  #crash: CrashSurvival | null = null;
  /** A predecessor's fd store bookkeeping, taken over once the imported relays run. */
  #inheritedCrash: CrashSurvivalExport | null = null;
  #fdStore: FdStore | null = null;

  constructor(context: DaemonContext, options: SplicerOptions) {
    this.#context = context;
    this.#options = options;
    this.#tasks = new TaskTable(options.tasks);
    const fdStore = options.fdStore && context.notifier.enabled;
    if (options.fdStore && !fdStore) context.log.warn('--fd-store needs a service manager (NOTIFY_SOCKET): crash survival is off');
    this.#engine = context.binding.createSpliceEngine({ ...options.engine, persistentPipes: fdStore }, (completions) => this.#onCompletions(completions));
    if (fdStore) {
      let lastWarning = 0;
      const store = new FdStore(context.notifier, (error) => {
        if (Date.now() - lastWarning < 10_000) return;
        lastWarning = Date.now();
        context.log.warn({ err: error, failures: store.failures }, 'the service manager did not take an fd store message: a crash now would lose what it was about');
      });
      this.#fdStore = store;
      this.#crash = new CrashSurvival(context.binding, store, context.log, this.#bootId);
      const gone = (_ownerKey: string, id: string) => this.#crash?.resultGone(id);
      context.server.on('ack', gone);
      context.server.on('expire', gone);
    }
    const stats = this.#engine.stats();
    context.log.info({ engine: options.engine, pipeSizeMin: stats.pipeSizeMin, limits: options.tasks }, 'splice engine started');
    // Each relay holds 2 fds, each borrowed pipe 2 more; client connections and kept envelopes come on top.
    const needed = 2 * options.tasks.maxTasks + 2 * options.engine.maxPipes + 256;
    const limit = openFileLimit();
    if (limit && needed > limit.soft) {
      context.log.warn(
        { openFileLimit: limit.soft, needed, maxTasks: options.tasks.maxTasks, maxPipes: options.engine.maxPipes },
        `--max-tasks and --max-pipes need about ${needed} fds but the open-file limit is ${limit.soft}: new relays will be refused (EFDFERRY_CTRUNC: fds dropped by the kernel) before the task limit is reached (raise LimitNOFILE= or lower the limits)`,
      );
    }
  }

  methods(): MethodTable {
    return {
      splice: defineMethod({
        fds: { min: 2, max: 2, kind: 'stream-socket' },
        parse: (params) =>
          parseSpliceRequest(params, { idleTimeoutMs: this.#options.idleTimeoutMs, maxDurationMs: this.#options.maxDurationMs }, this.#options.request ?? DEFAULT_REQUEST_LIMITS),
        handle: ({ params, fds, connection, log }) => {
          if (this.#stopping) throw new ProtocolError('EFDFERRY_SHUTDOWN', 'Splicer is stopping; hand this relay to the next instance');
          this.#tasks.checkRoom(connection.ownerKey!, connection.peer.uid);
          const engineId = this.#nextEngineId++;
          const task: SpliceTask = {
            taskId: `${this.#bootId}-${engineId}`,
            engineId,
            ownerKey: connection.ownerKey!,
            owner: connection.owner!,
            peer: connection.peer,
            fdA: fds[0]!,
            fdB: fds[1]!,
            meta: params.meta,
            relay: params.relay,
            acceptedAt: Date.now(),
          };
          this.#engine.add(engineId, task.fdA, task.fdB, params.relay);
          this.#tasks.add(task);
          this.#crash?.taskStarted(task);
          this.#relaysStarted++;
          log.debug({ taskId: task.taskId }, 'relay started');
          return { result: { taskId: task.taskId } };
        },
      }),
      cancel: defineMethod({
        parse: (params) => {
          if (typeof params.taskId !== 'string') throw new ProtocolError('EFDFERRY_INVALID', '"taskId" must be a string');
          return { taskId: params.taskId };
        },
        handle: ({ params, connection }) => {
          const task = this.#tasks.byTaskId(params.taskId);
          // The owner, the uid that handed it over, or a control peer may cancel. Anyone else is told it does not
          // exist: ids must not reveal what others run.
          const allowed = task && (task.ownerKey === connection.ownerKey || connection.control || connection.peer.uid === task.peer.uid);
          if (!task || !allowed) throw new ProtocolError('EFDFERRY_NOTFOUND', `no relay ${params.taskId} of yours is running`);
          this.#engine.cancel(task.engineId);
          return { result: { taskId: task.taskId, cancelling: true } };
        },
      }),
      drain: defineMethod({
        parse: (params) => {
          if (typeof params.owner !== 'string' || params.owner.length === 0) throw new ProtocolError('EFDFERRY_INVALID', '"owner" must be an owner id');
          if (params.uid !== undefined && (typeof params.uid !== 'number' || !Number.isSafeInteger(params.uid) || params.uid < 0)) {
            throw new ProtocolError('EFDFERRY_INVALID', '"uid" must be a uid');
          }
          return { owner: params.owner, uid: params.uid as number | undefined };
        },
        handle: ({ params, connection, log }) => {
          // Owner ids are scoped to a uid: the caller's own unless it names another.
          const ownerKey = `${params.uid ?? connection.peer.uid}:${params.owner}`;
          const tasks = this.#tasks.all().filter((task) => task.ownerKey === ownerKey);
          for (const task of tasks) this.#engine.cancel(task.engineId);
          log.info({ ownerKey, relays: tasks.length }, 'drain: ending every relay of an owner');
          return { result: { owner: params.owner, uid: params.uid ?? connection.peer.uid, draining: tasks.length } };
        },
      }),
      tasks: defineMethod({
        handle: ({ connection }) => {
          const now = Date.now();
          const tasks = this.#engine.snapshot().flatMap((relay) => {
            const task = this.#tasks.byEngineId(relay.id);
            // Control peers see every relay; anyone else only those their uid handed over.
            if (!task || !(connection.control || task.peer.uid === connection.peer.uid)) return [];
            return [
              {
                taskId: task.taskId,
                owner: task.owner,
                peerPid: task.peer.pid,
                peerUid: task.peer.uid,
                ageMs: now - task.acceptedAt,
                bytesAToB: relay.bytesAToB,
                bytesBToA: relay.bytesBToA,
                idleMs: relay.idleMs,
                state: relay.finishedAToB || relay.finishedBToA ? 'half-closed' : 'relaying',
              },
            ];
          });
          return { result: { tasks } };
        },
      }),
    };
  }

  /**
   * A fresh start. After a crash, what the fd store kept comes back here: relays are resumed (with the
   * bytes that were in their pipes) and unacknowledged envelopes go back to their owners' mailboxes.
   */
  start(passed: PassedFd[] = []): void {
    const { binding, log, server } = this.#context;
    if (!this.#crash) {
      if (passed.length) log.warn({ names: [...new Set(passed.map((p) => p.name))] }, 'fds passed by the service manager that are not used without --fd-store: closed');
      binding.closeAll(passed.map((p) => p.fd));
      return;
    }
    const recovery = passed.length ? recover(binding, log, passed) : null;
    const pool = this.#engine.pipeTable()!;
    if (!recovery) {
      this.#crash.begin(pool, [], []);
      return;
    }
    for (const { task, paused } of recovery.relays) {
      this.#tasks.add(task);
      this.#engine.resume(paused);
    }
    this.#nextEngineId = Math.max(this.#nextEngineId, recovery.maxEngineId + 1);
    for (const envelope of recovery.envelopes) server.deliver(envelope.ownerKey, ENVELOPE_EVENT, envelope.taskId, envelope.envelope, envelope.fds);
    this.#crash.begin(
      pool,
      recovery.relays.map((r) => r.task),
      recovery.envelopes.map((e) => ({ op: 'end' as const, taskId: e.taskId, ownerKey: e.ownerKey, envelope: e.envelope })),
    );
    this.#crash.forget(recovery.staleNames);
    log.warn(
      { relays: recovery.relays.length, envelopes: recovery.envelopes.length, bytesInPipes: recovery.bytesInPipes },
      'recovered after a crash: relays resumed from the fd store, envelopes back in their mailboxes',
    );
  }

  boundListener(fd: number): void {
    // The socket this process bound must outlive a crash, so clients never find it gone.
    if (this.#crash) this.#fdStore?.store(this.name, [fd]);
  }

  metricSources(): MetricSource[] {
    return [
      { name: 'fdferry_tasks_active', help: 'Tasks running (Splicer: relays)', type: 'gauge', read: () => [[{}, this.#tasks.size]] },
      { name: 'fdferry_splicer_relays_started_total', help: 'Relays accepted by this process', type: 'counter', read: () => [[{}, this.#relaysStarted]] },
      {
        name: 'fdferry_splicer_relays_ended_total',
        help: 'Relays that ended in this process, by reason',
        type: 'counter',
        labelNames: ['reason'],
        read: () => [...this.#endedByReason].map(([reason, count]) => [{ reason }, count]),
      },
      { name: 'fdferry_splicer_bytes_total', help: 'Bytes relayed (both directions)', type: 'counter', read: () => [[{}, this.#engine.stats().bytesTotal]] },
      {
        name: 'fdferry_splicer_pipes',
        help: 'Pipes borrowed by relays with bytes in flight, and kept idle for reuse',
        type: 'gauge',
        labelNames: ['state'],
        read: () => {
          const stats = this.#engine.stats();
          return [
            [{ state: 'in_use' }, stats.pipesInUse],
            [{ state: 'idle' }, stats.pipesIdle],
          ];
        },
      },
    ];
  }

  status(): Record<string, unknown> {
    return {
      tasks: this.#tasks.size,
      relaysEnded: this.#relaysEnded,
      limits: this.#tasks.limits,
      engine: this.#engine.stats(),
      stopping: this.#stopping,
    };
  }

  pauseAndExport(fds: number[]): { state: Record<string, unknown>; summary: ExportSummary } {
    this.#paused = this.#engine.pauseAll();
    // Relays that ended just before the pause have completions waiting: report them now, so they leave as
    // envelopes (in the mailbox the server exports next) instead of travelling as running relays.
    this.#engine.flush();
    const relays = this.#paused.flatMap((paused) => {
      const task = this.#tasks.byEngineId(paused.id);
      return task ? [exportRelay(task, paused, fds)] : [];
    });
    const state: SplicerState = { nextEngineId: this.#nextEngineId, relaysEnded: this.#relaysEnded, relays };
    if (this.#crash) state.fdStore = this.#crash.export();
    const bytesInFlight = this.#paused.reduce((sum, p) => sum + (p.pipeAToB?.bytes ?? 0) + (p.pipeBToA?.bytes ?? 0), 0);
    return { state: state as unknown as Record<string, unknown>, summary: { tasks: relays.length, bytesInFlight } };
  }

  resumeAfterRollback(): void {
    for (const paused of this.#paused) this.#engine.resume(paused);
    this.#paused = [];
  }

  releaseExported(): void {
    const { binding } = this.#context;
    for (const paused of this.#paused) {
      binding.closeAll(pausedFds(paused));
      const task = this.#tasks.byEngineId(paused.id);
      if (task) this.#tasks.remove(task);
    }
    this.#paused = [];
    // The successor keeps the fd store current from here on.
    this.#crash = null;
    this.#engine.close();
  }

  importState(state: Record<string, unknown>, fds: readonly number[]): ExportSummary {
    const { binding } = this.#context;
    const splicer = state as unknown as SplicerState;
    if (!Array.isArray(splicer.relays) || typeof splicer.nextEngineId !== 'number') {
      throw new ProtocolError('EFDFERRY_STATE', 'splicer state: no relay list');
    }
    const imported = splicer.relays.map((record) => importRelay(record, fds, (fd) => binding.describeFd(fd)));
    for (const { task, paused } of imported) {
      this.#tasks.add(task);
      this.#paused.push(paused);
    }
    this.#nextEngineId = Math.max(this.#nextEngineId, splicer.nextEngineId);
    this.#inheritedCrash = splicer.fdStore ?? null;
    this.#relaysEnded = splicer.relaysEnded ?? 0;
    const bytesInFlight = this.#paused.reduce((sum, p) => sum + (p.pipeAToB?.bytes ?? 0) + (p.pipeBToA?.bytes ?? 0), 0);
    return { tasks: imported.length, bytesInFlight };
  }

  resumeImported(): void {
    for (const paused of this.#paused) this.#engine.resume(paused);
    this.#paused = [];
    if (this.#crash) {
      // Our own pool and checkpoint replace the predecessor's; its relays' and envelopes' sockets stay stored.
      this.#crash.begin(this.#engine.pipeTable()!, this.#tasks.all(), this.#inheritedCrash?.ended ?? [], true);
      this.#crash.forget(this.#inheritedCrash?.names ?? []);
    }
    this.#inheritedCrash = null;
  }

  /**
   * SIGTERM: refuse new relays, end every relay, deliver every envelope; give absent owners the grace
   * period to come back; whatever is left is logged one record per task and closed by the mailbox.
   */
  async shutdown(): Promise<void> {
    this.#stopping = true;
    const { log, server } = this.#context;
    this.#engine.endAll();
    await new Promise<void>((resolve) => {
      if (this.#tasks.size === 0) resolve();
      else this.#onIdle = resolve;
    });
    this.#engine.close();
    const deadline = Date.now() + this.#options.shutdownGraceMs;
    if (server.mailboxSize > 0) {
      log.info({ envelopes: server.mailboxSize, graceMs: this.#options.shutdownGraceMs }, 'waiting for owners to collect their envelopes');
      await new Promise<void>((resolve) => {
        const check = () => {
          if (server.mailboxSize === 0 || Date.now() >= deadline) {
            server.off('ack', check);
            clearTimeout(timer);
            resolve();
          }
        };
        const timer = setTimeout(check, Math.max(0, deadline - Date.now()));
        server.on('ack', check);
      });
    }
  }

  #onCompletions(completions: RelayCompletion[]): void {
    const { binding, log, server } = this.#context;
    for (const completion of completions) {
      const task = this.#tasks.byEngineId(completion.id);
      if (!task) {
        log.error({ engineId: completion.id }, 'engine reported an unknown relay');
        continue;
      }
      this.#tasks.remove(task);
      this.#relaysEnded++;
      this.#endedByReason.set(completion.reason, (this.#endedByReason.get(completion.reason) ?? 0) + 1);
      const describe = (fd: number) => binding.describeFd(fd);
      const tcpInfo = (fd: number) => binding.tcpInfo(fd);
      const envelope = buildEnvelope(task, completion, {
        a: snapshotTcp(task.fdA, tcpInfo, describe),
        b: snapshotTcp(task.fdB, tcpInfo, describe),
      });
      const record = {
        taskId: task.taskId,
        owner: task.owner,
        peerPid: task.peer.pid,
        peerUid: task.peer.uid,
        reason: envelope.reason,
        code: envelope.code ?? undefined,
        bytesAToB: envelope.bytesAToB,
        bytesBToA: envelope.bytesBToA,
        durationMs: envelope.durationMs,
      };
      if (this.#options.audit) log.info(record, 'relay ended');
      else log.debug(record, 'relay ended');
      this.#crash?.taskEnded(task.taskId, task.ownerKey, envelope as unknown as Record<string, unknown>);
      server.deliver(task.ownerKey, ENVELOPE_EVENT, task.taskId, envelope as unknown as Record<string, unknown>, [task.fdA, task.fdB]);
    }
    if (this.#tasks.size === 0 && this.#onIdle) {
      const resolve = this.#onIdle;
      this.#onIdle = null;
      resolve();
    }
  }
}

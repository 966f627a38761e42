/**
 * Bumblebee: takes one SOCK_SEQPACKET socket carrying a client TCP flow's raw IP packets, gets the
 * kernel to complete the handshake inside an anonymous network namespace, and gives back the accepted
 * kernel TCP socket with the flow's original addresses. It keeps pumping the flow's packets for as long
 * as the connection lives.
 *
 * This file is policy only: validation, limits, ownership and bookkeeping. Namespaces are made on a
 * dedicated native thread; packets move on the pump's epoll thread, never here.
 */
import crypto from 'node:crypto';
import type { DaemonContext, Service } from '../../lib/daemon.js';
import type { PassedFd } from '../../lib/systemd/activation.js';
import type { MetricSource, Sample } from '../../lib/metrics.js';
import type { ExportSummary } from '../../lib/handoff/participant.js';
import type { PausedPump, PumpEvent, UpgradePump, UpgradePumpOptions } from '../../lib/native.js';
import { parseUpgradeRequest, type UpgradeRequestLimits, type UpgradeResult, DEFAULT_UPGRADE_LIMITS } from '../../lib/protocol/bumblebee.js';
import { ProtocolError, isErrorCode } from '../../lib/protocol/errors.js';
import { defineMethod, type HandlerResult, type MethodTable } from '../../lib/rpc/server.js';
import { openFileLimit } from '../../lib/limits.js';
import {
  createEnvironments,
  environmentFds,
  exportEnvironment,
  importEnvironment,
  pumpEnvironment,
  type Environment,
  type EnvironmentSettings,
} from './environments.js';
import { FlowTable, type Flow, type FlowLimits } from './flow-table.js';
import { exportFlow, importFlow, type BumblebeeState } from './handoff.js';

/** Bumblebee's own settings (flags of `fdferry bumblebee`). */
export interface BumblebeeOptions {
  environments: number;
  environment: EnvironmentSettings;
  pump: UpgradePumpOptions;
  flows: FlowLimits;
  request?: UpgradeRequestLimits;
  /** On SIGTERM, how long flows have to end by themselves before they are cut. */
  shutdownGraceMs: number;
  /** Log every upgrade and flow end at info level (an audit trail) instead of debug. */
  audit: boolean;
}

interface PendingUpgrade {
  resolve: (result: HandlerResult) => void;
  reject: (error: ProtocolError) => void;
}

/** The Bumblebee service. */
export class BumblebeeService implements Service {
  readonly name = 'bumblebee';
  readonly #context: DaemonContext;
  readonly #options: BumblebeeOptions;
  readonly #pump: UpgradePump;
  readonly #flows: FlowTable;
  readonly #pending = new Map<number, PendingUpgrade>();
  readonly #bootId = crypto.randomBytes(4).toString('hex');
  #environments: Environment[] = [];
  #nextFlowId = 1;
  #stopping = false;
  #onIdle: (() => void) | null = null;
  /** Flows paused for a hand-over (exported, or imported and waiting for commit). */
  #paused: PausedPump | null = null;
  readonly #counters: Record<string, number> = { upgrades: 0, refused: 0, flowsEnded: 0 };

  constructor(context: DaemonContext, options: BumblebeeOptions) {
    this.#context = context;
    this.#options = options;
    this.#flows = new FlowTable(options.flows);
    this.#pump = context.binding.createUpgradePump(options.pump, (events) => this.#onEvents(events));
    // Nothing is pumped until there is something to pump: fresh environments (start) or imported ones.
    this.#pump.pause();
    // Each flow holds its packet socket here; accepted sockets pass through one at a time.
    const needed = options.flows.maxFlows + 4 * options.environments + 256;
    const limit = openFileLimit();
    if (limit && needed > limit.soft) {
      context.log.warn(
        { openFileLimit: limit.soft, needed, maxFlows: options.flows.maxFlows },
        `--max-flows needs about ${needed} fds but the open-file limit is ${limit.soft}: upgrades will fail with EMFILE before the flow limit is reached (raise LimitNOFILE= or lower --max-flows)`,
      );
    }
  }

  start(passed: PassedFd[] = []): void {
    const { binding, log } = this.#context;
    // Bumblebee recovers nothing after a crash (docs/bumblebee.md): whatever a service manager kept is closed.
    if (passed.length) log.warn({ names: [...new Set(passed.map((p) => p.name))] }, 'fds passed by the service manager that Bumblebee does not use: closed');
    binding.closeAll(passed.map((p) => p.fd));
    this.#environments = createEnvironments(binding, this.#options.environments, this.#options.environment);
    for (const environment of this.#environments) this.#pump.addEnvironment(pumpEnvironment(environment));
    this.#pump.resume({ flows: [], quarantine: [], cursors: [] });
    log.info(
      { environments: this.#environments.map(({ id, netnsInode, ifindex }) => ({ id, netnsInode, ifindex })), settings: this.#options.environment, pump: this.#options.pump },
      'network environments ready',
    );
  }

  methods(): MethodTable {
    return {
      upgrade: defineMethod({
        fds: { min: 1, max: 1, kind: 'seqpacket-socket' },
        parse: (params) => parseUpgradeRequest(params, this.#options.request ?? DEFAULT_UPGRADE_LIMITS),
        handle: ({ params, fds, connection }) => {
          if (this.#stopping) throw new ProtocolError('EFDFERRY_SHUTDOWN', 'Bumblebee is stopping');
          this.#flows.checkRoom(connection.ownerKey!, params.tenant);
          const flowId = this.#nextFlowId++;
          const environmentId = this.#flows.leastLoaded(this.#environments.map((environment) => environment.id));
          const flow: Flow = {
            flowId,
            taskId: `${this.#bootId}-${flowId}`,
            environmentId,
            fd: fds[0]!,
            ownerKey: connection.ownerKey!,
            owner: connection.owner!,
            peer: connection.peer,
            tenant: params.tenant,
            context: params.context,
            tuple: null,
            internal: null,
            slot: 0,
            requestedAt: Date.now(),
            acceptedAt: null,
          };
          this.#flows.add(flow);
          this.#counters.upgrades!++;
          return new Promise<HandlerResult>((resolve, reject) => {
            this.#pending.set(flowId, { resolve, reject });
            this.#pump.upgrade(flowId, environmentId, flow.fd);
          });
        },
      }),
      flows: defineMethod({
        handle: ({ connection }) => {
          const byId = new Map(this.#pump.snapshot().map((row) => [row.flowId, row]));
          const now = Date.now();
          // Control peers see every flow; anyone else only the flows their uid handed over.
          const visible = this.#flows.all().filter((flow) => connection.control || flow.peer.uid === connection.peer.uid);
          const flows = visible.map((flow) => {
            const row = byId.get(flow.flowId);
            return {
              taskId: flow.taskId,
              owner: flow.owner,
              tenant: flow.tenant,
              peerPid: flow.peer.pid,
              peerUid: flow.peer.uid,
              environment: flow.environmentId,
              state: row?.state ?? 'handshake',
              tuple: flow.tuple ?? row?.tuple ?? null,
              internal: flow.internal,
              ageMs: now - flow.requestedAt,
              packetsIn: row?.packetsIn ?? 0,
              packetsOut: row?.packetsOut ?? 0,
              idleMs: row?.idleMs ?? 0,
            };
          });
          return { result: { flows } };
        },
      }),
      cancel: defineMethod({
        parse: (params) => {
          if (typeof params.taskId !== 'string') throw new ProtocolError('EFDFERRY_INVALID', '"taskId" must be a string');
          return { taskId: params.taskId };
        },
        handle: ({ params, connection }) => {
          const flow = this.#flows.byTaskId(params.taskId);
          const allowed = flow && (flow.ownerKey === connection.ownerKey || connection.control || connection.peer.uid === flow.peer.uid);
          if (!flow || !allowed) throw new ProtocolError('EFDFERRY_NOTFOUND', `no flow ${params.taskId} of yours is running`);
          this.#pump.end(flow.flowId);
          return { result: { taskId: flow.taskId, cancelling: true } };
        },
      }),
    };
  }

  metricSources(): MetricSource[] {
    const perEnvironment = (pick: (stats: ReturnType<UpgradePump['stats']>[number]) => Sample[]) => () => this.#pump.stats().flatMap(pick);
    const counter = (key: string) => this.#counters[key] ?? 0;
    return [
      { name: 'fdferry_tasks_active', help: 'Tasks running (Bumblebee: flows, upgrades in progress included)', type: 'gauge', read: () => [[{}, this.#flows.size]] },
      {
        name: 'fdferry_bumblebee_upgrades_total',
        help: 'Upgrades by outcome',
        type: 'counter',
        labelNames: ['outcome'],
        read: () => [
          [{ outcome: 'requested' }, counter('upgrades')],
          [{ outcome: 'refused' }, counter('refused')],
        ],
      },
      {
        name: 'fdferry_bumblebee_flows_ended_total',
        help: 'Flows ended, by reason',
        type: 'counter',
        labelNames: ['reason'],
        read: () => Object.entries(this.#counters).flatMap(([key, value]): Sample[] => (key.startsWith('ended_') ? [[{ reason: key.slice('ended_'.length) }, value]] : [])),
      },
      {
        name: 'fdferry_bumblebee_slots',
        help: 'NAT slots per environment: in use by flows, and in TIME_WAIT quarantine',
        type: 'gauge',
        labelNames: ['environment', 'state'],
        read: perEnvironment((e) => [
          [{ environment: e.id, state: 'in_use' }, e.flows + e.pending],
          [{ environment: e.id, state: 'quarantine' }, e.slotsInQuarantine],
        ]),
      },
      {
        name: 'fdferry_bumblebee_packets_total',
        help: 'Packets pumped, by direction',
        type: 'counter',
        labelNames: ['environment', 'direction'],
        read: perEnvironment((e) => [
          [{ environment: e.id, direction: 'to_kernel' }, e.packetsToKernel],
          [{ environment: e.id, direction: 'to_client' }, e.packetsToClient],
        ]),
      },
      {
        name: 'fdferry_bumblebee_bytes_total',
        help: 'Bytes of IP packets pumped, by direction',
        type: 'counter',
        labelNames: ['environment', 'direction'],
        read: perEnvironment((e) => [
          [{ environment: e.id, direction: 'to_kernel' }, e.bytesToKernel],
          [{ environment: e.id, direction: 'to_client' }, e.bytesToClient],
        ]),
      },
      {
        name: 'fdferry_bumblebee_drops_total',
        help: 'Packets dropped, by reason',
        type: 'counter',
        labelNames: ['environment', 'reason'],
        read: perEnvironment((e) => Object.entries(e.drops).map(([reason, count]): Sample => [{ environment: e.id, reason }, count])),
      },
      {
        name: 'fdferry_bumblebee_orphans_total',
        help: 'Accepted sockets that matched no pending upgrade (closed)',
        type: 'counter',
        labelNames: ['environment'],
        read: perEnvironment((e) => [[{ environment: e.id }, e.orphans]]),
      },
    ];
  }

  status(): Record<string, unknown> {
    const all = this.#flows.all();
    return {
      flows: all.filter((flow) => flow.acceptedAt !== null).length,
      pending: this.#pending.size,
      limits: this.#flows.limits,
      tenants: this.#flows.tenants(),
      flowCounters: this.#counters,
      environments: this.#pump.stats(),
      stopping: this.#stopping,
    };
  }

  pauseAndExport(fds: number[]): { state: Record<string, unknown>; summary: ExportSummary } {
    this.#paused = this.#pump.pause();
    const environments = this.#environments.map((environment) => exportEnvironment(environment, fds));
    const flows = this.#paused.flows.flatMap((paused) => {
      const flow = this.#flows.get(paused.flowId);
      return flow ? [exportFlow(flow, paused, fds)] : [];
    });
    const state: BumblebeeState = {
      nextFlowId: this.#nextFlowId,
      counters: { ...this.#counters },
      environments,
      flows,
      quarantine: this.#paused.quarantine,
      cursors: this.#paused.cursors,
    };
    return { state: state as unknown as Record<string, unknown>, summary: { tasks: flows.length, bytesInFlight: 0 } };
  }

  resumeAfterRollback(): void {
    if (this.#paused) this.#pump.resume(this.#paused);
    this.#paused = null;
  }

  releaseExported(): void {
    const { binding } = this.#context;
    // The pump reads none of these fds any more (it is paused); stop its thread before closing them anyway.
    this.#pump.close();
    for (const flow of this.#flows.all()) binding.closeAll([flow.fd]);
    for (const environment of this.#environments) binding.closeAll(environmentFds(environment));
    this.#environments = [];
    this.#paused = null;
  }

  importState(state: Record<string, unknown>, fds: readonly number[]): ExportSummary {
    const { binding } = this.#context;
    const bumblebee = state as unknown as BumblebeeState;
    if (!Array.isArray(bumblebee.environments) || !Array.isArray(bumblebee.flows) || typeof bumblebee.nextFlowId !== 'number') {
      throw new ProtocolError('EFDFERRY_STATE', 'bumblebee state: no environment or flow list');
    }
    const environments = bumblebee.environments.map((exported) => importEnvironment(binding, exported, fds));
    const ids = new Set(environments.map((environment) => environment.id));
    const slots = new Map(environments.map((environment) => [environment.id, environment.settings.slots]));
    const taken = new Set<string>();
    const imported = bumblebee.flows.map((record) => importFlow(record, fds, ids, (fd) => binding.describeFd(fd), (id) => slots.get(id) ?? 0, taken));
    this.#environments = environments;
    for (const environment of environments) this.#pump.addEnvironment(pumpEnvironment(environment));
    for (const { flow } of imported) this.#flows.add(flow);
    this.#paused = {
      flows: imported.map(({ paused }) => paused),
      quarantine: Array.isArray(bumblebee.quarantine) ? bumblebee.quarantine : [],
      cursors: Array.isArray(bumblebee.cursors) ? bumblebee.cursors : [],
    };
    this.#nextFlowId = Math.max(this.#nextFlowId, bumblebee.nextFlowId);
    Object.assign(this.#counters, bumblebee.counters ?? {});
    return { tasks: imported.length, bytesInFlight: 0 };
  }

  resumeImported(): void {
    if (this.#paused) this.#pump.resume(this.#paused);
    this.#paused = null;
  }

  /**
   * SIGTERM: refuse new upgrades, give running flows the grace period to end by themselves, then stop
   * pumping and close everything. The handed-out sockets then fail within their keepalive and
   * TCP_USER_TIMEOUT bounds, and the namespaces go with the last of them.
   */
  async shutdown(): Promise<void> {
    this.#stopping = true;
    const { binding, log } = this.#context;
    if (this.#flows.size > 0 && this.#options.shutdownGraceMs > 0) {
      log.info({ flows: this.#flows.size, graceMs: this.#options.shutdownGraceMs }, 'waiting for flows to end');
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, this.#options.shutdownGraceMs);
        this.#onIdle = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    this.#onIdle = null;
    this.#pump.close();
    for (const [flowId, pending] of this.#pending) {
      this.#pending.delete(flowId);
      pending.reject(new ProtocolError('EFDFERRY_SHUTDOWN', 'Bumblebee stopped before the handshake completed'));
    }
    const cut = this.#flows.all().filter((flow) => flow.acceptedAt !== null);
    if (cut.length) log.warn({ flows: cut.length }, 'stopping with flows still open: their sockets will time out');
    for (const flow of cut) {
      binding.closeAll([flow.fd]);
      this.#flows.remove(flow);
    }
    for (const environment of this.#environments) binding.closeAll(environmentFds(environment));
    this.#environments = [];
  }

  #onEvents(events: PumpEvent[]): void {
    const { binding, log } = this.#context;
    const audit = this.#options.audit ? 'info' : 'debug';
    for (const event of events) {
      if (event.type === 'notice') {
        log.warn({ code: event.code }, `${event.message} (raise LimitNOFILE= or lower --max-flows)`);
        continue;
      }
      const flow = this.#flows.get(event.flowId);
      if (!flow) {
        if (event.type === 'accepted') binding.closeAll([event.fd]);
        log.error({ event }, 'the pump reported an unknown flow');
        continue;
      }
      switch (event.type) {
        case 'accepted': {
          flow.tuple = event.tuple;
          flow.internal = event.internal;
          flow.slot = event.slot;
          flow.acceptedAt = Date.now();
          const result: UpgradeResult = {
            flowId: flow.taskId,
            tuple: event.tuple,
            internal: event.internal,
            environment: flow.environmentId,
            context: flow.context,
            tenant: flow.tenant,
          };
          log[audit]({ taskId: flow.taskId, owner: flow.owner, tenant: flow.tenant, peerPid: flow.peer.pid, peerUid: flow.peer.uid, tuple: event.tuple }, 'flow upgraded');
          this.#settle(flow.flowId)?.resolve({ result: result as unknown as Record<string, unknown>, fds: [event.fd] });
          break;
        }
        case 'rejected': {
          this.#flows.remove(flow);
          this.#counters.refused!++;
          const code = isErrorCode(event.code) ? event.code : 'EFDFERRY_INTERNAL';
          log[audit]({ taskId: flow.taskId, owner: flow.owner, code, reason: event.message }, 'upgrade refused');
          // The server gives the flow socket back with the error: the pump has not consumed a byte of it.
          this.#settle(flow.flowId)?.reject(new ProtocolError(code, event.message));
          break;
        }
        case 'ended': {
          this.#flows.remove(flow);
          binding.closeAll([flow.fd]);
          this.#counters.flowsEnded!++;
          const key = `ended_${event.reason}`;
          this.#counters[key] = (this.#counters[key] ?? 0) + 1;
          log[audit]({ taskId: flow.taskId, owner: flow.owner, tenant: flow.tenant, reason: event.reason, code: event.code }, 'flow ended');
          break;
        }
      }
    }
    if (this.#flows.size === 0) this.#onIdle?.();
  }

  #settle(flowId: number): PendingUpgrade | undefined {
    const pending = this.#pending.get(flowId);
    this.#pending.delete(flowId);
    return pending;
  }
}

/**
 * The lifecycle every fdferry daemon shares: logger, protocol server, systemd notification, graceful
 * restart (hand-over to a successor), signals and clean shutdown.
 *
 * A service supplies its methods, its status, its shutdown and its side of a hand-over; this module owns
 * the order of things. SIGHUP is handled from the first moment: Node would otherwise exit on it, and
 * systemd sends it to every process of the unit, a successor that is still starting included.
 */
import type { Logger, LevelWithSilent } from 'pino';
import { Predecessor, type HandoffReport, type Requester } from './handoff/predecessor.js';
import type { HandoffParticipant } from './handoff/participant.js';
import { HANDOFF_FAULTS, type HandoffFault } from './handoff/spawn.js';
import { Successor, takeSuccessorEnvironment } from './handoff/successor.js';
import { createLogger } from './log.js';
import { DaemonMetrics, serveMetrics, type MetricSource } from './metrics.js';
import { loadNative, type NativeBinding } from './native.js';
import type { AccessPolicy } from './rpc/access.js';
import type { QuotaLimits } from './rpc/quotas.js';
import { ProtocolError } from './protocol/errors.js';
import { DEFERRED, RpcServer, defineMethod, type MethodTable, type ServerLimits } from './rpc/server.js';
import type { MailboxLimits } from './rpc/mailbox.js';
import { chooseListener, takeListenFds, type PassedFd } from './systemd/activation.js';
import { Notifier } from './systemd/notify.js';
import { startWatchdog } from './systemd/watchdog.js';
import { VERSION } from './version.js';

/** Options every daemon takes (each has a flag and a config-file key). */
export interface CommonDaemonOptions {
  socket: string;
  socketMode: number;
  socketOwner?: number;
  socketGroup?: number;
  /** Who may connect and who may use control operations (see lib/rpc/access.ts). */
  access?: AccessPolicy;
  quotas?: QuotaLimits;
  helloTimeoutMs?: number;
  /** Also serve metrics over HTTP on this loopback address. */
  metricsListen?: { host: string; port: number };
  logLevel: LevelWithSilent;
  maxConnections: number;
  maxInflight: number;
  maxBodyBytes: number;
  mailboxMaxPerOwner: number;
  mailboxMaxTotal: number;
  mailboxMaxAgeMs: number;
  /** Deadline of a whole hand-over, in milliseconds. */
  handoffTimeoutMs: number;
  /** Accept `fault` in reload requests (tests only; see docs/restart.md). */
  allowFaultInjection: boolean;
}

/** What a daemon gives the service it runs. */
export interface DaemonContext {
  log: Logger;
  binding: NativeBinding;
  server: RpcServer;
  generation: number;
  /** The service manager's notify socket (a no-op without one). */
  notifier: Notifier;
}

/** A service: its methods, its status, its shutdown, and its side of a hand-over. */
export interface Service extends HandoffParticipant {
  readonly name: string;
  /** Methods clients may call, beyond the built-in hello/ping/ack/status/reload. */
  methods(): MethodTable;
  /** Service-specific metrics, read at every scrape. */
  metricSources?(): MetricSource[];
  /** Which of its methods only control peers may call (reload is always one). */
  readonly controlMethods?: readonly string[];
  /**
   * Called once when the daemon starts fresh (not as a successor), before it listens: where a service
   * builds what a successor would import instead (Bumblebee's network environments). `passed` are the
   * fds the service manager gave besides the listener: after a crash, what the fd store kept.
   */
  start?(passed: PassedFd[]): void;
  /** Called when the daemon bound its socket itself (no socket activation): a crash must not lose it. */
  boundListener?(fd: number): void;
  /** Service-specific figures for `status`. */
  status(): Record<string, unknown>;
  /** Called once on SIGTERM/SIGINT; resolves when the service is done. */
  shutdown(): Promise<void>;
}

/** Running daemon handle. */
export interface RunningDaemon {
  context: DaemonContext;
  /** Stops the daemon as SIGTERM would; resolves when everything is closed. */
  stop(reason?: string): Promise<void>;
  /** Resolves when the daemon has stopped, or handed over and should exit. */
  stopped: Promise<void>;
}

/** Starts a daemon (or, started as a successor, takes over from its predecessor). */
export async function runDaemon(
  serviceName: string,
  options: CommonDaemonOptions,
  createService: (context: DaemonContext) => Service,
  binding: NativeBinding = loadNative(),
): Promise<RunningDaemon> {
  let onHangup: () => void = () => log.info('SIGHUP before start-up finished: ignored');
  const hangup = () => onHangup();
  process.on('SIGHUP', hangup);

  // Taken by every process, so that no child inherits them; only a fresh start may use them.
  const passedFds = takeListenFds(binding);
  const successorEnvironment = takeSuccessorEnvironment();
  const generation = successorEnvironment?.generation ?? 1;
  const log = createLogger({ service: serviceName, level: options.logLevel, generation });
  const successor = successorEnvironment ? new Successor(binding, log, successorEnvironment) : null;
  const notifier = new Notifier(binding);
  const startedAt = Date.now();
  const limits: Partial<ServerLimits> & { mailbox: Partial<MailboxLimits> } = {
    maxConnections: options.maxConnections,
    maxInflightPerConnection: options.maxInflight,
    maxBodyBytes: options.maxBodyBytes,
    mailbox: { maxPerOwner: options.mailboxMaxPerOwner, maxTotal: options.mailboxMaxTotal, maxAgeMs: options.mailboxMaxAgeMs },
  };
  const methods: MethodTable = {};
  // Filled once the service exists (it names its own control methods); the server reads it per request.
  const controlMethods: string[] = ['reload', 'metrics'];
  const server = new RpcServer({
    binding,
    logger: log,
    service: serviceName,
    version: VERSION,
    generation,
    methods,
    limits,
    socketMode: options.socketMode,
    ...(options.socketOwner === undefined ? {} : { socketOwner: options.socketOwner }),
    ...(options.socketGroup === undefined ? {} : { socketGroup: options.socketGroup }),
    ...(options.access ? { access: options.access } : {}),
    ...(options.quotas ? { quotas: options.quotas } : {}),
    helloTimeoutMs: options.helloTimeoutMs ?? 0,
    controlMethods,
  });
  const context: DaemonContext = { log, binding, server, generation, notifier };
  const service = createService(context);
  controlMethods.push(...(service.controlMethods ?? []));
  const metrics = new DaemonMetrics(serviceName, VERSION, generation);
  const serverSources: MetricSource[] = [
    { name: 'fdferry_connections', help: 'Client connections open', type: 'gauge', read: () => [[{}, server.connections().length]] },
    { name: 'fdferry_requests_total', help: 'Requests received', type: 'counter', read: () => [[{}, server.counters.requests]] },
    {
      name: 'fdferry_errors_total',
      help: 'Error answers, by code',
      type: 'counter',
      labelNames: ['code'],
      read: () => [...server.errorsByCode].map(([code, count]) => [{ code }, count]),
    },
    { name: 'fdferry_connections_denied_total', help: 'Connections refused (allow-list, per-uid limit)', type: 'counter', read: () => [[{}, server.counters.connectionsDenied]] },
    { name: 'fdferry_quota_refusals_total', help: 'Requests refused by a quota', type: 'counter', read: () => [[{}, server.counters.quotaRefusals]] },
    {
      name: 'fdferry_fd_exhaustion_total',
      help: 'Times the daemon was out of fds (accepting, or receiving a request\'s fds)',
      type: 'counter',
      labelNames: ['where'],
      read: () => [
        [{ where: 'accept' }, server.counters.acceptFdExhaustion],
        [{ where: 'receive' }, server.counters.receiveFdExhaustion],
      ],
    },
    { name: 'fdferry_mailbox_results', help: 'Results kept for owners, not yet acknowledged', type: 'gauge', read: () => [[{}, server.mailboxSize]] },
  ];
  for (const source of [...serverSources, ...(service.metricSources?.() ?? [])]) metrics.add(source);
  let metricsHttp: { close(): void } | null = null;
  const predecessor = new Predecessor({
    binding,
    log,
    server,
    participant: service,
    notifier,
    service: serviceName,
    generation,
    timeoutMs: options.handoffTimeoutMs,
  });

  let watchdog: ReturnType<typeof startWatchdog> = null;
  /** STATUS= for `systemctl status`: one line with the counts that matter, refreshed while live. */
  const statusLine = () => {
    const figures = service.status();
    const tasks = figures.tasks ?? figures.flows;
    return `generation ${generation}: ${server.connections().length} connections${typeof tasks === 'number' ? `, ${tasks} ${figures.tasks !== undefined ? 'tasks' : 'flows'}` : ''}`;
  };
  let statusTimer: NodeJS.Timeout | null = null;
  const becomeLive = () => {
    watchdog = startWatchdog(notifier);
    if (options.metricsListen) metricsHttp = serveMetrics(metrics, options.metricsListen, log);
    if (watchdog) log.info({ intervalMs: watchdog.intervalMs }, 'pinging the service manager\'s watchdog');
    if (notifier.enabled) {
      statusTimer = setInterval(() => notifier.send({ STATUS: statusLine() }), 10_000);
      statusTimer.unref();
    }
  };
  const stopBeingLive = () => {
    watchdog?.stop();
    watchdog = null;
    metricsHttp?.close();
    metricsHttp = null;
    if (statusTimer) clearInterval(statusTimer);
    statusTimer = null;
  };

  let resolveStopped!: () => void;
  const stopped = new Promise<void>((resolve) => (resolveStopped = resolve));
  let stopping: Promise<void> | null = null;

  /** A hand-over ended: exit if the successor took over, otherwise answer whoever asked. */
  const handoffFinished = (report: HandoffReport, requester: Requester | null) => {
    metrics.handoff(report);
    if (report.ok) {
      stopBeingLive();
      notifier.close();
      process.off('SIGHUP', hangup);
      process.off('SIGTERM', onTerm);
      process.off('SIGINT', onTerm);
      resolveStopped();
      return;
    }
    if (requester) server.replyTo(requester.connectionId, requester.requestId, report as unknown as Record<string, unknown>);
  };
  const startHandoff = (fault: HandoffFault | null, requester: Requester | null) => {
    predecessor.start(fault, requester).then(
      (report) => handoffFinished(report, requester),
      (error: unknown) => {
        // Only a failure after commit gets here: the successor owns everything, so this process must go.
        log.error({ err: error }, 'hand-over failed after commit; exiting');
        resolveStopped();
      },
    );
  };

  Object.assign(methods, {
    status: defineMethod({
      handle: () => ({
        result: {
          service: serviceName,
          version: VERSION,
          pid: process.pid,
          generation,
          uptimeMs: Date.now() - startedAt,
          connections: server.connections().length,
          mailbox: server.mailboxSize,
          counters: server.counters,
          handoffInProgress: predecessor.busy,
          ...service.status(),
        },
      }),
    }),
    metrics: defineMethod({
      handle: async () => ({ result: { contentType: metrics.contentType, text: await metrics.text() } }),
    }),
    reload: defineMethod({
      parse: (params) => {
        const fault = params.fault ?? null;
        if (fault !== null && !(HANDOFF_FAULTS as readonly unknown[]).includes(fault)) {
          throw new ProtocolError('EFDFERRY_INVALID', `"fault" must be one of ${HANDOFF_FAULTS.join(', ')}`);
        }
        return { wait: params.wait !== false, fault: fault as HandoffFault | null };
      },
      handle: ({ params, connection, requestId }) => {
        if (params.fault && !options.allowFaultInjection) {
          throw new ProtocolError('EFDFERRY_DENIED', 'fault injection is off (start the daemon with --allow-fault-injection)');
        }
        if (stopping) throw new ProtocolError('EFDFERRY_SHUTDOWN', 'the daemon is stopping');
        if (predecessor.busy) throw new ProtocolError('EFDFERRY_BUSY', 'a hand-over is already in progress');
        const requester = params.wait ? { connectionId: connection.id, requestId } : null;
        startHandoff(params.fault, requester);
        return params.wait ? DEFERRED : { result: { started: true, pid: process.pid } };
      },
    }),
    ...service.methods(),
  });

  const stop = (reason = 'stop requested'): Promise<void> => {
    stopping ??= (async () => {
      if (predecessor.busy) {
        log.info({ reason }, 'stop requested during a hand-over: rolling it back first');
        await predecessor.abort(reason);
        if (predecessor.committed) return; // the successor runs the show now; handoffFinished ends us
      }
      stopBeingLive();
      notifier.send({ STOPPING: 1, STATUS: `stopping: ${reason}` });
      log.info({ reason }, 'stopping: no new work; finishing tasks');
      try {
        await service.shutdown();
      } catch (error) {
        log.error({ err: error }, 'service shutdown failed');
      }
      server.close();
      notifier.close();
      process.off('SIGHUP', hangup);
      process.off('SIGTERM', onTerm);
      process.off('SIGINT', onTerm);
      log.info('stopped');
      resolveStopped();
    })();
    return stopping;
  };
  const onTerm = (signal: NodeJS.Signals) => {
    if (stopping) {
      log.warn({ signal }, 'second stop signal: exiting now');
      process.exit(1);
    }
    void stop(signal);
  };
  process.on('SIGTERM', onTerm);
  process.on('SIGINT', onTerm);
  onHangup = () => {
    if (stopping) return log.info('SIGHUP while stopping: ignored');
    if (predecessor.busy) return log.info('SIGHUP during a hand-over: busy, ignored');
    log.info('SIGHUP: handing over to a successor');
    startHandoff(null, null);
  };

  if (successor) {
    try {
      await successor.waitUntilReparented();
      const adopted = await successor.receive(server, service, options.handoffTimeoutMs, options.socket);
      const resumeStarted = Date.now();
      service.resumeImported();
      server.resume();
      const resumedAt = Date.now();
      notifier.send({ MAINPID: process.pid, READY: 1, STATUS: `generation ${generation}: took over ${adopted.tasks} tasks` });
      await notifier.barrier();
      becomeLive();
      const pauseMs = resumedAt - adopted.pausedAt;
      const previous = adopted.predecessorReport;
      const report: HandoffReport = {
        ok: true,
        oldPid: previous?.oldPid ?? successorEnvironment!.parentPid,
        newPid: process.pid,
        generation,
        phasesMs: { ...(previous?.phasesMs ?? {}), resume: resumedAt - resumeStarted },
        totalMs: (previous?.totalMs ?? 0) + (Date.now() - resumeStarted),
        pauseMs,
        tasks: adopted.tasks,
        connections: adopted.connectionIds.size,
        fds: previous?.fds ?? 0,
        bytesInFlight: adopted.bytesInFlight,
      };
      successor.done({ pauseMs, phasesMs: { resume: resumedAt - resumeStarted } });
      metrics.handoff(report);
      if (adopted.requester) {
        const connectionId = adopted.connectionIds.get(adopted.requester.connectionId);
        if (connectionId !== undefined) server.replyTo(connectionId, adopted.requester.requestId, report as unknown as Record<string, unknown>);
      }
      log.info({ report }, `${serviceName} took over from pid ${report.oldPid}`);
    } catch (error) {
      log.error({ err: error }, 'hand-over failed in the successor; exiting (the predecessor rolls back)');
      process.exit(1);
    }
  } else {
    const chosen = passedFds ? chooseListener(binding, passedFds, serviceName) : null;
    const others = passedFds?.filter((passed) => passed !== chosen) ?? [];
    // The listener first (and, bound here, into the fd store first): a crash from now on always finds it.
    // Nothing is accepted before start() has run: accepting happens on the loop, after this function.
    if (chosen) {
      server.adoptListener(chosen.fd);
      log.info({ name: chosen.name, fd: chosen.fd }, 'adopted the listening socket from the service manager');
    } else {
      server.listen(options.socket);
      service.boundListener?.(server.listenerFd);
    }
    // Fds beyond the listener are what the fd store kept: the service takes what it knows and closes the rest.
    service.start?.(others);
    notifier.send({ READY: 1, STATUS: `generation ${generation}: listening` });
    becomeLive();
    log.info({ socket: passedFds ? '(socket activation)' : options.socket, version: VERSION, node: process.version }, `${serviceName} listening`);
  }
  return { context, stop, stopped };
}

/**
 * The lifecycle every fdferry daemon shares: logger, protocol server, signals and clean shutdown.
 *
 * A service supplies its methods, its status and its own shutdown; this module owns the order of
 * things. SIGHUP is handled from the first moment (Node would otherwise exit on it, and systemd sends
 * it to the whole unit on reload).
 */
import type { Logger, LevelWithSilent } from 'pino';
import { createLogger } from './log.js';
import { loadNative, type NativeBinding } from './native.js';
import { RpcServer, type MethodTable, type ServerLimits } from './rpc/server.js';
import type { MailboxLimits } from './rpc/mailbox.js';
import { VERSION } from './version.js';

/** Options every daemon takes (each has a flag and a config-file key). */
export interface CommonDaemonOptions {
  socket: string;
  socketMode: number;
  logLevel: LevelWithSilent;
  maxConnections: number;
  maxInflight: number;
  maxBodyBytes: number;
  mailboxMaxPerOwner: number;
  mailboxMaxTotal: number;
  mailboxMaxAgeMs: number;
}

/** What a daemon gives the service it runs. */
export interface DaemonContext {
  log: Logger;
  binding: NativeBinding;
  server: RpcServer;
}

/** A service: its methods, its status and its shutdown. */
export interface Service {
  readonly name: string;
  /** Methods clients may call, beyond the built-in hello/ping/ack/status. */
  methods(): MethodTable;
  /** Service-specific figures for `status`. */
  status(): Record<string, unknown>;
  /** Called once on SIGTERM/SIGINT after the daemon stops accepting; resolves when the service is done. */
  shutdown(): Promise<void>;
}

/** Running daemon handle (tests and `fdferry up` use it in-process). */
export interface RunningDaemon {
  context: DaemonContext;
  /** Stops the daemon as SIGTERM would; resolves when everything is closed. */
  stop(reason?: string): Promise<void>;
  /** Resolves when the daemon has stopped. */
  stopped: Promise<void>;
}

/** Starts a daemon: builds its context, lets `createService` make the service, listens, wires signals. */
export function runDaemon(
  serviceName: string,
  options: CommonDaemonOptions,
  createService: (context: DaemonContext) => Service,
  binding: NativeBinding = loadNative(),
): RunningDaemon {
  const log = createLogger({ service: serviceName, level: options.logLevel });
  const startedAt = Date.now();
  let service: Service | null = null;
  const methods: MethodTable = {
    status: {
      handle: () => ({
        result: {
          service: serviceName,
          version: VERSION,
          pid: process.pid,
          generation: 1,
          uptimeMs: Date.now() - startedAt,
          connections: server.connections().length,
          mailbox: server.mailboxSize,
          counters: server.counters,
          ...(service?.status() ?? {}),
        },
      }),
    },
  };
  const limits: Partial<ServerLimits> & { mailbox: Partial<MailboxLimits> } = {
    maxConnections: options.maxConnections,
    maxInflightPerConnection: options.maxInflight,
    maxBodyBytes: options.maxBodyBytes,
    mailbox: { maxPerOwner: options.mailboxMaxPerOwner, maxTotal: options.mailboxMaxTotal, maxAgeMs: options.mailboxMaxAgeMs },
  };
  const server = new RpcServer({
    binding,
    logger: log,
    service: serviceName,
    version: VERSION,
    methods,
    limits,
    socketMode: options.socketMode,
  });
  const context: DaemonContext = { log, binding, server };
  service = createService(context);
  Object.assign(methods, service.methods());

  let resolveStopped!: () => void;
  const stopped = new Promise<void>((resolve) => (resolveStopped = resolve));
  let stopping: Promise<void> | null = null;
  const stop = (reason = 'stop requested'): Promise<void> => {
    stopping ??= (async () => {
      log.info({ reason }, 'stopping: no new connections; finishing tasks');
      try {
        await service!.shutdown();
      } catch (error) {
        log.error({ err: error }, 'service shutdown failed');
      }
      server.close();
      process.off('SIGHUP', onHangup);
      process.off('SIGTERM', onTerm);
      process.off('SIGINT', onTerm);
      log.info('stopped');
      resolveStopped();
    })();
    return stopping;
  };
  const onHangup = () => log.warn('SIGHUP received: zero-downtime restart is not available in this version; still serving');
  const onTerm = (signal: NodeJS.Signals) => {
    if (stopping) {
      log.warn({ signal }, 'second stop signal: exiting now');
      process.exit(1);
    }
    void stop(signal);
  };
  process.on('SIGHUP', onHangup);
  process.on('SIGTERM', onTerm);
  process.on('SIGINT', onTerm);

  server.listen(options.socket);
  log.info({ socket: options.socket, version: VERSION, node: process.version }, `${serviceName} listening`);
  return { context, stop, stopped };
}

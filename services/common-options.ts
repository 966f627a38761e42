/**
 * The flags every daemon takes, shared by the `fdferry <service>` commands. Each flag is also a key of
 * the JSON config file (`--config`, default `/etc/fdferry/<service>.json` when it exists); flags win.
 */
import fs from 'node:fs';
import type { Argv } from 'yargs';
import type { CommonDaemonOptions } from '../lib/daemon.js';
import { parseMetricsListen } from '../lib/metrics.js';
import { defaultAccessPolicy, parseIdList } from '../lib/rpc/access.js';
import { DEFAULT_QUOTAS } from '../lib/rpc/quotas.js';
import { DEFAULT_SERVER_LIMITS } from '../lib/rpc/server.js';
import { defaultSocketPath } from '../lib/version.js';

/** Default config file of a service. */
export const defaultConfigPath = (service: string): string => `/etc/fdferry/${service}.json`;

const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'] as const;

/** Adds the common daemon flags to a yargs command. */
export function withCommonOptions<T>(yargs: Argv<T>, service: string) {
  const configPath = defaultConfigPath(service);
  return yargs
    .config('config', `JSON file whose keys are these flags' names (default ${configPath} when it exists)`, (file: string) =>
      JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>,
    )
    .default('config', fs.existsSync(configPath) ? configPath : undefined, fs.existsSync(configPath) ? configPath : 'none')
    .option('socket', { type: 'string', default: defaultSocketPath(service), describe: 'socket path, or @name for an abstract socket', group: 'Daemon:' })
    .option('socket-mode', { type: 'string', default: '0660', describe: 'mode of the socket file (octal)', group: 'Daemon:' })
    .option('socket-owner', { type: 'string', describe: 'owner of the socket file, user name or uid (default: the daemon\'s)', group: 'Access:' })
    .option('socket-group', { type: 'string', describe: 'group of the socket file, group name or gid (default: the daemon\'s)', group: 'Access:' })
    .option('allow-uid', { type: 'string', describe: 'users (names or uids, comma-separated) that may connect and hand over tasks (default: root and the daemon\'s own uid)', group: 'Access:' })
    .option('allow-gid', { type: 'string', describe: 'groups whose members may connect and hand over tasks (default: none)', group: 'Access:' })
    .option('control-uid', { type: 'string', describe: 'users that may reload, cancel or drain other people\'s tasks (default: root and the daemon\'s own uid)', group: 'Access:' })
    .option('control-gid', { type: 'string', describe: 'groups whose members may use control operations (default: none)', group: 'Access:' })
    .option('hello-timeout', { type: 'number', default: 10_000, describe: 'ms a new connection has to say hello before it is closed (0 = never)', group: 'Access:' })
    .option('max-connections-per-uid', { type: 'number', default: DEFAULT_QUOTAS.maxConnectionsPerUid, describe: 'connections at once per client uid (0 = no limit)', group: 'Quotas:' })
    .option('max-fds-inflight-per-uid', { type: 'number', default: DEFAULT_QUOTAS.maxFdsInflightPerUid, describe: 'fds in requests in progress per client uid (0 = no limit)', group: 'Quotas:' })
    .option('max-fds-inflight-per-owner', { type: 'number', default: DEFAULT_QUOTAS.maxFdsInflightPerOwner, describe: 'fds in requests in progress per owner id (0 = no limit)', group: 'Quotas:' })
    .option('max-request-rate-per-uid', { type: 'number', default: DEFAULT_QUOTAS.requestRatePerUid, describe: 'requests per second per client uid (0 = no limit)', group: 'Quotas:' })
    .option('max-request-rate-per-owner', { type: 'number', default: DEFAULT_QUOTAS.requestRatePerOwner, describe: 'requests per second per owner id (0 = no limit)', group: 'Quotas:' })
    .option('metrics-listen', { type: 'string', describe: 'also serve Prometheus metrics over HTTP at [host:]port, loopback only (default: only `fdferry ctl <service> metrics`)', group: 'Daemon:' })
    .option('log-level', { choices: LOG_LEVELS, default: 'info' as (typeof LOG_LEVELS)[number], describe: 'log level (per-task lines are debug)', group: 'Daemon:' })
    .option('max-connections', { type: 'number', default: DEFAULT_SERVER_LIMITS.maxConnections, describe: 'client connections at once', group: 'Limits:' })
    .option('max-inflight', { type: 'number', default: DEFAULT_SERVER_LIMITS.maxInflightPerConnection, describe: 'requests in progress per connection', group: 'Limits:' })
    .option('max-body-bytes', { type: 'number', default: DEFAULT_SERVER_LIMITS.maxBodyBytes, describe: 'largest request body (memfd bodies included)', group: 'Limits:' })
    .option('mailbox-max-per-owner', { type: 'number', default: DEFAULT_SERVER_LIMITS.mailbox.maxPerOwner, describe: 'unacknowledged results kept per owner', group: 'Limits:' })
    .option('mailbox-max-total', { type: 'number', default: DEFAULT_SERVER_LIMITS.mailbox.maxTotal, describe: 'unacknowledged results kept overall', group: 'Limits:' })
    .option('mailbox-max-age', { type: 'number', default: DEFAULT_SERVER_LIMITS.mailbox.maxAgeMs, describe: 'ms an unacknowledged result is kept', group: 'Limits:' })
    .option('handoff-timeout', { type: 'number', default: 10_000, describe: 'ms a whole hand-over to a successor may take before it is rolled back', group: 'Restart:' })
    .option('allow-fault-injection', { type: 'boolean', default: false, describe: 'accept "fault" in reload requests (tests only, see docs/restart.md)', group: 'Restart:' });
}

/** Checks and converts the parsed common flags. */
export function commonOptionsFrom(argv: {
  socket: string;
  socketMode: string;
  logLevel: CommonDaemonOptions['logLevel'];
  maxConnections: number;
  maxInflight: number;
  maxBodyBytes: number;
  mailboxMaxPerOwner: number;
  mailboxMaxTotal: number;
  mailboxMaxAge: number;
  handoffTimeout: number;
  allowFaultInjection: boolean;
  socketOwner?: string | undefined;
  socketGroup?: string | undefined;
  allowUid?: string | undefined;
  allowGid?: string | undefined;
  controlUid?: string | undefined;
  controlGid?: string | undefined;
  helloTimeout?: number;
  maxConnectionsPerUid?: number;
  maxFdsInflightPerUid?: number;
  maxFdsInflightPerOwner?: number;
  maxRequestRatePerUid?: number;
  maxRequestRatePerOwner?: number;
  metricsListen?: string | undefined;
}): CommonDaemonOptions {
  const socketMode = Number.parseInt(argv.socketMode, 8);
  if (!/^[0-7]{3,4}$/.test(argv.socketMode)) throw new Error(`--socket-mode must be octal like 0660, got ${argv.socketMode}`);
  for (const [flag, value] of Object.entries({
    'max-connections': argv.maxConnections,
    'max-inflight': argv.maxInflight,
    'max-body-bytes': argv.maxBodyBytes,
    'mailbox-max-per-owner': argv.mailboxMaxPerOwner,
    'mailbox-max-total': argv.mailboxMaxTotal,
    'mailbox-max-age': argv.mailboxMaxAge,
    'handoff-timeout': argv.handoffTimeout,
  })) {
    if (!Number.isSafeInteger(value) || value < 1) throw new Error(`--${flag} must be a positive integer, got ${value}`);
  }
  const quota = (flag: string, value: number | undefined, fallback: number): number => {
    const chosen = value ?? fallback;
    if (!Number.isSafeInteger(chosen) || chosen < 0) throw new Error(`--${flag} must be a non-negative integer (0 = no limit), got ${chosen}`);
    return chosen;
  };
  const defaults = defaultAccessPolicy();
  const single = (flag: string, value: string | undefined, file: '/etc/passwd' | '/etc/group'): number | undefined => {
    if (value === undefined) return undefined;
    const ids = parseIdList(flag, value, file);
    if (ids.length !== 1) throw new Error(`--${flag} takes one name or id, got ${value}`);
    return ids[0];
  };
  const socketOwner = single('socket-owner', argv.socketOwner, '/etc/passwd');
  const socketGroup = single('socket-group', argv.socketGroup, '/etc/group');
  return {
    socket: argv.socket,
    socketMode,
    ...(socketOwner === undefined ? {} : { socketOwner }),
    ...(socketGroup === undefined ? {} : { socketGroup }),
    access: {
      allowUids: argv.allowUid === undefined ? defaults.allowUids : parseIdList('allow-uid', argv.allowUid, '/etc/passwd'),
      allowGids: argv.allowGid === undefined ? defaults.allowGids : parseIdList('allow-gid', argv.allowGid, '/etc/group'),
      controlUids: argv.controlUid === undefined ? defaults.controlUids : parseIdList('control-uid', argv.controlUid, '/etc/passwd'),
      controlGids: argv.controlGid === undefined ? defaults.controlGids : parseIdList('control-gid', argv.controlGid, '/etc/group'),
    },
    helloTimeoutMs: quota('hello-timeout', argv.helloTimeout, 10_000),
    ...(argv.metricsListen === undefined ? {} : { metricsListen: parseMetricsListen(argv.metricsListen) }),
    quotas: {
      maxConnectionsPerUid: quota('max-connections-per-uid', argv.maxConnectionsPerUid, DEFAULT_QUOTAS.maxConnectionsPerUid),
      maxFdsInflightPerUid: quota('max-fds-inflight-per-uid', argv.maxFdsInflightPerUid, DEFAULT_QUOTAS.maxFdsInflightPerUid),
      maxFdsInflightPerOwner: quota('max-fds-inflight-per-owner', argv.maxFdsInflightPerOwner, DEFAULT_QUOTAS.maxFdsInflightPerOwner),
      requestRatePerUid: quota('max-request-rate-per-uid', argv.maxRequestRatePerUid, DEFAULT_QUOTAS.requestRatePerUid),
      requestRatePerOwner: quota('max-request-rate-per-owner', argv.maxRequestRatePerOwner, DEFAULT_QUOTAS.requestRatePerOwner),
    },
    logLevel: argv.logLevel,
    maxConnections: argv.maxConnections,
    maxInflight: argv.maxInflight,
    maxBodyBytes: argv.maxBodyBytes,
    mailboxMaxPerOwner: argv.mailboxMaxPerOwner,
    mailboxMaxTotal: argv.mailboxMaxTotal,
    mailboxMaxAgeMs: argv.mailboxMaxAge,
    handoffTimeoutMs: argv.handoffTimeout,
    allowFaultInjection: argv.allowFaultInjection,
  };
}

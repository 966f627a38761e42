/**
 * The flags every daemon takes, shared by the `fdferry <service>` commands. Each flag is also a key of
 * the JSON config file (`--config`, default `/etc/fdferry/<service>.json` when it exists); flags win.
 */
import fs from 'node:fs';
import type { Argv } from 'yargs';
import type { CommonDaemonOptions } from '../lib/daemon.js';
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
  return {
    socket: argv.socket,
    socketMode,
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

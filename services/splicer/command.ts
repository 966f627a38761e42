/** `fdferry splicer`: the command that runs the Splicer daemon, with its flags. */
import type { Argv } from 'yargs';
import { runDaemon, type RunningDaemon } from '../../lib/daemon.js';
import { commonOptionsFrom, withCommonOptions } from '../common-options.js';
import { SplicerService, type SplicerOptions } from './service.js';

/** Adds Splicer's flags to the command. */
export function splicerOptions<T>(yargs: Argv<T>) {
  return withCommonOptions(yargs, 'splicer')
    .option('threads', { type: 'number', default: 1, describe: 'splice engine threads', group: 'Engine:' })
    .option('pipe-size', { type: 'number', default: 256 * 1024, describe: 'pipe size to ask for (F_SETPIPE_SZ); smaller is used when refused', group: 'Engine:' })
    .option('max-pipes', { type: 'number', default: 1024, describe: 'pipes borrowed at once (2 fds each); only relays with bytes in flight hold one', group: 'Engine:' })
    .option('max-idle-pipes', { type: 'number', default: 64, describe: 'empty pipes kept for reuse', group: 'Engine:' })
    .option('max-tasks', { type: 'number', default: 8000, describe: 'relays at once (each holds 2 fds)', group: 'Limits:' })
    .option('max-tasks-per-owner', { type: 'number', describe: 'relays at once per owner id (default: --max-tasks)', group: 'Limits:' })
    .option('max-tasks-per-uid', { type: 'number', describe: 'relays at once per client uid (default: --max-tasks)', group: 'Limits:' })
    .option('idle-timeout', { type: 'number', default: 0, describe: 'default ms without traffic before a relay ends (0 = never)', group: 'Relays:' })
    .option('max-duration', { type: 'number', default: 0, describe: 'default ms a relay may last (0 = no limit)', group: 'Relays:' })
    .option('shutdown-grace', { type: 'number', default: 30_000, describe: 'on SIGTERM, ms absent owners have to collect envelopes', group: 'Relays:' })
    .option('audit', { type: 'boolean', default: false, describe: 'log every relay end at info level', group: 'Daemon:' })
    .option('fd-store', { type: 'boolean', default: false, describe: 'survive a crash: keep relays, pipes and a checkpoint in systemd\'s fd store (FileDescriptorStoreMax=)', group: 'Daemon:' });
}

type SplicerArgv = Awaited<ReturnType<ReturnType<typeof splicerOptions>['parseAsync']>>;

const positive = (flag: string, value: number | undefined, fallback: number): number => {
  const chosen = value ?? fallback;
  if (!Number.isSafeInteger(chosen) || chosen < 1) throw new Error(`--${flag} must be a positive integer, got ${chosen}`);
  return chosen;
};
const nonNegative = (flag: string, value: number): number => {
  if (!Number.isSafeInteger(value) || value < 0) throw new Error(`--${flag} must be a non-negative integer, got ${value}`);
  return value;
};

/** Converts parsed flags to {@link SplicerOptions}, with clear errors for bad values. */
export function splicerOptionsFrom(argv: SplicerArgv): SplicerOptions {
  const maxTasks = positive('max-tasks', argv.maxTasks, 8000);
  return {
    engine: {
      threads: positive('threads', argv.threads, 1),
      pipeSize: positive('pipe-size', argv.pipeSize, 262144),
      maxPipes: positive('max-pipes', argv.maxPipes, 1024),
      maxIdlePipes: nonNegative('max-idle-pipes', argv.maxIdlePipes),
    },
    tasks: {
      maxTasks,
      maxTasksPerOwner: positive('max-tasks-per-owner', argv.maxTasksPerOwner, maxTasks),
      maxTasksPerUid: positive('max-tasks-per-uid', argv.maxTasksPerUid, maxTasks),
    },
    idleTimeoutMs: nonNegative('idle-timeout', argv.idleTimeout),
    maxDurationMs: nonNegative('max-duration', argv.maxDuration),
    shutdownGraceMs: nonNegative('shutdown-grace', argv.shutdownGrace),
    audit: argv.audit,
    fdStore: argv.fdStore,
  };
}

/** Runs Splicer until it is stopped (or has handed over to a successor). */
export function startSplicer(argv: SplicerArgv): Promise<RunningDaemon> {
  const common = commonOptionsFrom(argv);
  const options = splicerOptionsFrom(argv);
  return runDaemon('splicer', common, (context) => new SplicerService(context, options));
}

/**
 * The daemons' logger: pino JSON lines on stdout with `service`, `pid` and `generation` on every line.
 *
 * Under systemd (JOURNAL_STREAM names our stdout) each line gets a `<N>` syslog priority prefix, so
 * journald files warnings and errors at their real priority; anywhere else stdout stays pure JSON.
 */
import fs from 'node:fs';
import { pino, type Logger, type LevelWithSilent } from 'pino';

/** Options of {@link createLogger}. */
export interface LoggerOptions {
  service: string;
  generation?: number;
  level?: LevelWithSilent;
  /** Where lines go; defaults to stdout (synchronously, so nothing is lost at exit). */
  destination?: pino.DestinationStream;
}

const SYSLOG_PRIORITY: Record<number, number> = { 10: 7, 20: 7, 30: 6, 40: 4, 50: 3, 60: 2 };

/** Whether stdout is the journal stream systemd gave us (JOURNAL_STREAM is `dev:inode` of it). */
export function stdoutIsJournal(env: NodeJS.ProcessEnv = process.env): boolean {
  const stream = env.JOURNAL_STREAM;
  if (!stream) return false;
  try {
    const stat = fs.fstatSync(1);
    return stream === `${stat.dev}:${stat.ino}`;
  } catch {
    return false;
  }
}

/** Creates the process's root logger. */
export function createLogger(options: LoggerOptions): Logger {
  const journal = options.destination === undefined && stdoutIsJournal();
  return pino(
    {
      level: options.level ?? 'info',
      base: { service: options.service, pid: process.pid, generation: options.generation ?? 1 },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label, number) => ({ level: label, levelValue: number }) },
      ...(journal
        ? {
            hooks: {
              streamWrite: (line: string) => {
                const match = /"levelValue":(\d+)/.exec(line);
                return `<${SYSLOG_PRIORITY[Number(match?.[1])] ?? 6}>${line}`;
              },
            },
          }
        : {}),
    },
    options.destination ?? pino.destination({ dest: 1, sync: true }),
  );
}

/**
 * Processes for the protocol integration tests (test/integration/rpc-*.test.ts): the echo daemon
 * (test/helpers/echo-daemon.ts) and client children (test/helpers/rpc-client-child.ts), started from the
 * TypeScript sources under tsx, with their stdout parsed as JSON lines, and always killed — by the pid we
 * started — when the test ends.
 *
 * startDaemon() in test/helpers/daemon.ts runs the fdferry CLI; these run plain scripts, so they have their
 * own (small) spawn helper.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Test } from 'tap';
import { tempDir } from './daemon.js';
import { Inbox, withDeadline } from './native-helpers.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..', '..');

/** A child process whose stdout is JSON lines. */
export interface LineProcess {
  pid: number;
  process: ChildProcess;
  /** Parsed stdout lines so far (a line that is not JSON becomes `{unparsed: text}`). */
  lines: Inbox<Record<string, unknown>>;
  /** stdout and stderr so far, for failure messages. */
  output(): string;
  /** Resolves with the first line (past or future) matching `predicate`; rejects after `ms` or at exit. */
  waitFor(predicate: (line: Record<string, unknown>) => boolean, ms: number, what: string): Promise<Record<string, unknown>>;
  /** Resolves with the exit code, or the signal name, once the process has exited and its pipes closed. */
  exited: Promise<number | string>;
  /** Whether it is still running. */
  running(): boolean;
  /** Sends a signal (by the pid we started) if it is still running. */
  kill(signal?: NodeJS.Signals): void;
}

/** Spawns `node --import tsx <script> ...args` and parses its stdout; killed with SIGKILL at teardown. */
export function spawnScript(t: Test, script: string, args: string[]): LineProcess {
  const child = spawn(process.execPath, ['--import', 'tsx', path.join(here, script), ...args], {
    cwd: root,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  if (child.pid === undefined) throw new Error(`could not spawn ${script}`);
  const pid = child.pid;
  const lines = new Inbox<Record<string, unknown>>();
  const waiters = new Set<() => void>();
  let output = '';
  let buffered = '';
  child.stdout!.on('data', (chunk: Buffer) => {
    output += chunk.toString();
    buffered += chunk.toString();
    let newline;
    while ((newline = buffered.indexOf('\n')) >= 0) {
      const text = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      let line: Record<string, unknown>;
      try {
        line = JSON.parse(text) as Record<string, unknown>;
      } catch {
        line = { unparsed: text };
      }
      lines.push(line);
      for (const wake of [...waiters]) wake();
    }
  });
  child.stderr!.on('data', (chunk: Buffer) => {
    output += chunk.toString();
  });
  // 'close', not 'exit': the stdio pipes are closed by then, so fd accounting in the test sees them gone.
  const exited = new Promise<number | string>((resolve) => child.on('close', (code, signal) => resolve(signal ?? code ?? -1)));
  let done = false;
  void exited.then(() => {
    done = true;
    for (const wake of [...waiters]) wake();
  });
  const running = (): boolean => !done && child.exitCode === null && child.signalCode === null;
  t.teardown(async () => {
    if (running()) child.kill('SIGKILL');
    await exited;
  });
  const waitFor = (predicate: (line: Record<string, unknown>) => boolean, ms: number, what: string) =>
    withDeadline(
      new Promise<Record<string, unknown>>((resolve, reject) => {
        const check = (): void => {
          const found = lines.items.find(predicate);
          if (found) {
            waiters.delete(check);
            resolve(found);
          } else if (done) {
            waiters.delete(check);
            reject(new Error(`${script} (pid ${pid}) exited before ${what}; output:\n${output.slice(-3000)}`));
          }
        };
        waiters.add(check);
        check();
      }),
      ms,
      `${what} from ${script} (pid ${pid}); output:\n${output.slice(-3000)}`,
    );
  return {
    pid,
    process: child,
    lines,
    output: () => output,
    waitFor,
    exited,
    running,
    kill: (signal = 'SIGTERM') => {
      if (running()) process.kill(pid, signal);
    },
  };
}

/** A running echo daemon. */
export interface EchoDaemon extends LineProcess {
  socket: string;
  dir: string;
  /** Open fds of the daemon process right now, from /proc/<pid>/fd. */
  openFds(): number;
  /** SIGTERM, then resolves with how it exited (rejects if it does not within `ms`). */
  stop(ms?: number): Promise<number | string>;
}

/** Starts test/helpers/echo-daemon.ts on a socket in a fresh temporary directory and waits for `echo listening`. */
export async function startEchoDaemon(t: Test, options: { logLevel?: string } = {}): Promise<EchoDaemon> {
  const dir = tempDir(t, 'fdf-rpc-');
  const socket = path.join(dir, 'echo.sock');
  const daemon = spawnScript(t, 'echo-daemon.ts', [socket, '--log-level', options.logLevel ?? 'info']);
  await daemon.waitFor((line) => line.msg === 'echo listening', 20_000, '"echo listening"');
  return {
    ...daemon,
    socket,
    dir,
    openFds: () => fs.readdirSync(`/proc/${daemon.pid}/fd`).length,
    stop: async (ms = 10_000) => {
      daemon.kill('SIGTERM');
      return withDeadline(daemon.exited, ms, `the echo daemon (pid ${daemon.pid}) to exit after SIGTERM`);
    },
  };
}

/** Starts test/helpers/rpc-client-child.ts in `mode` (see there) against `socket`. */
export function spawnClientChild(t: Test, mode: string, socket: string, args: string[] = []): LineProcess {
  return spawnScript(t, 'rpc-client-child.ts', [mode, socket, ...args]);
}

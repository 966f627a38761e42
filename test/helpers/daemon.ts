/**
 * Real daemons as child processes for integration tests: started from the TypeScript sources with tsx,
 * each on its own socket in a fresh temporary directory, with every log line captured (and parsed),
 * and always stopped — by the pid we started — when the test ends, whatever happened.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Test } from 'tap';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** A started daemon. */
export interface TestDaemon {
  pid: number;
  socket: string;
  dir: string;
  process: ChildProcess;
  /** Parsed JSON log lines so far. */
  logs: Array<Record<string, unknown>>;
  /** Resolves with the first log line (past or future) matching `predicate`. */
  waitForLog(predicate: (line: Record<string, unknown>) => boolean, ms?: number): Promise<Record<string, unknown>>;
  /** Resolves with the exit code (or signal name) once the process has exited. */
  exited: Promise<number | string>;
  /** Everything the daemon (and its successors) wrote to stderr. */
  stderr(): string;
  /** Open fds of the daemon process right now. */
  openFds(): number;
  /** Sends a signal to the daemon (by the pid we started). */
  kill(signal?: NodeJS.Signals): void;
}

/** Short temporary directory (socket paths must stay under 107 bytes). */
export function tempDir(t: Test, prefix = 'fdf-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** The command line that runs the `fdferry` CLI from source. */
export function cliCommand(): { command: string; args: string[] } {
  return { command: process.execPath, args: ['--import', 'tsx', path.join(root, 'services', 'cli.ts')] };
}

/** Starts `fdferry <service> ...args` and resolves once it logs that it is listening. */
export async function startDaemon(
  t: Test,
  service: string,
  args: string[] = [],
  options: {
    env?: NodeJS.ProcessEnv;
    uid?: number;
    gid?: number;
    dir?: string;
    /**
     * A named network namespace (`ip netns add`) to run the daemon in, via `ip netns exec`: it execs the
     * daemon, so the pid we track and kill is the daemon's own, not a wrapper's.
     */
    netns?: string;
  } = {},
): Promise<TestDaemon> {
  const dir = options.dir ?? tempDir(t);
  const socket = path.join(dir, `${service}.sock`);
  const cli = cliCommand();
  const daemonArgs = [...cli.args, service, '--socket', socket, '--log-level', 'debug', ...args];
  const [command, commandArgs] =
    options.netns === undefined ? [cli.command, daemonArgs] : ['ip', ['netns', 'exec', options.netns, cli.command, ...daemonArgs]];
  const child = spawn(command, commandArgs, {
    cwd: root,
    env: { ...process.env, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
    ...(options.uid === undefined ? {} : { uid: options.uid }),
    ...(options.gid === undefined ? {} : { gid: options.gid }),
  });
  const logs: Array<Record<string, unknown>> = [];
  const waiters: Array<{ predicate: (line: Record<string, unknown>) => boolean; resolve: (line: Record<string, unknown>) => void }> = [];
  let stderr = '';
  let buffered = '';
  child.stdout!.on('data', (chunk: Buffer) => {
    buffered += chunk.toString();
    let newline;
    while ((newline = buffered.indexOf('\n')) >= 0) {
      const text = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      let line: Record<string, unknown>;
      try {
        line = JSON.parse(text) as Record<string, unknown>;
      } catch {
        line = { msg: text, unparsed: true };
      }
      logs.push(line);
      for (const waiter of [...waiters]) {
        if (waiter.predicate(line)) {
          waiters.splice(waiters.indexOf(waiter), 1);
          waiter.resolve(line);
        }
      }
    }
  });
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const exited = new Promise<number | string>((resolve) => child.on('exit', (code, signal) => resolve(signal ?? code ?? -1)));
  const pid = child.pid!;
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await exited;
    }
  });
  const waitForLog = (predicate: (line: Record<string, unknown>) => boolean, ms = 15_000) => {
    const found = logs.find(predicate);
    if (found) return Promise.resolve(found);
    return new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new Error(`${service} (pid ${pid}) did not log the expected line within ${ms} ms; stderr: ${stderr.slice(-2000)}`));
      }, ms);
      waiters.push({
        predicate,
        resolve: (line) => {
          clearTimeout(timer);
          resolve(line);
        },
      });
      void exited.then((status) => {
        clearTimeout(timer);
        reject(new Error(`${service} exited (${status}) before logging the expected line; stderr: ${stderr.slice(-2000)}`));
      });
    });
  };
  await waitForLog((line) => line.msg === `${service} listening`);
  return {
    pid,
    socket,
    dir,
    process: child,
    logs,
    waitForLog,
    exited,
    openFds: () => fs.readdirSync(`/proc/${pid}/fd`).length,
    stderr: () => stderr,
    kill: (signal = 'SIGTERM') => {
      if (child.exitCode === null && child.signalCode === null) process.kill(pid, signal);
    },
  };
}

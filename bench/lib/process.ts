/**
 * Child processes of a benchmark: started from the TypeScript sources with tsx, tracked by pid, and
 * always stopped — by the pid we started, in `finally` blocks, and on SIGINT/SIGTERM/exit of the
 * benchmark itself — so a benchmark never leaves a process behind.
 */
import { fork, spawn, spawnSync, type ChildProcess, type ForkOptions, type SpawnOptions } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The project root (this file is `bench/lib/process.ts`). */
export const projectRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** Node flags that let a child run a `.ts` file. */
export const TSX_EXEC_ARGV = ['--import', 'tsx'];

/**
 * Where the benchmark and its children run. `none` leaves it to the scheduler (what users get, but on a
 * small VM a round trip costs several times more when the two processes land on different CPUs, and
 * where they land changes from run to run); `same` pins this process and every child to CPU 0 (the
 * software's own cost); `split` pins this process to CPU 0 and the children to CPU 1 (always a
 * cross-CPU wake-up). Pinning uses taskset(1).
 */
export type Placement = 'none' | 'same' | 'split';
export const PLACEMENTS: readonly Placement[] = ['none', 'same', 'split'];

let placement: Placement = 'none';

/** The CPU children are pinned to, or null. */
function childCpu(): string | null {
  return placement === 'same' ? '0' : placement === 'split' ? '1' : null;
}

/** Applies a placement: pins this process (all its threads) to CPU 0 unless `none`. Call before spawning. */
export function setPlacement(wanted: Placement): void {
  if (wanted !== 'none') {
    if (wanted === 'split' && os.cpus().length < 2) throw new Error('--pin split needs at least 2 CPUs');
    const result = spawnSync('taskset', ['-a', '-p', '-c', '0', String(process.pid)], { encoding: 'utf8' });
    if (result.error || result.status !== 0) {
      throw new Error(`cannot pin the benchmark to CPU 0 with taskset: ${result.error?.message ?? result.stderr.trim()}`);
    }
  }
  placement = wanted;
}

const live = new Map<number, ChildProcess>();
let hooksInstalled = false;

function installHooks(): void {
  if (hooksInstalled) return;
  hooksInstalled = true;
  // Last resort: a crash or a plain process.exit() still takes the children down.
  process.on('exit', () => {
    for (const pid of live.keys()) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  });
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      process.stderr.write(`bench: ${signal}, stopping ${live.size} child process(es)\n`);
      process.exit(130);
    });
  }
}

function track(child: ChildProcess): ChildProcess {
  installHooks();
  if (child.pid === undefined) throw new Error('the child process did not start');
  const pid = child.pid;
  live.set(pid, child);
  child.once('exit', () => live.delete(pid));
  return child;
}

/** Spawns `node --import tsx <script> ...args` (no IPC channel); stdout is piped, stderr inherited. */
export function spawnTs(script: string, args: string[] = [], options: SpawnOptions = {}): ChildProcess {
  const cpu = childCpu();
  const command = [process.execPath, ...TSX_EXEC_ARGV, path.resolve(projectRoot, script), ...args];
  // taskset execs node: the pid we get is node's.
  const [file, ...argv] = cpu === null ? command : ['taskset', '-c', cpu, ...command];
  const child = spawn(file!, argv, {
    cwd: projectRoot,
    stdio: ['ignore', 'pipe', 'inherit'],
    ...options,
  });
  return track(child);
}

/** `child_process.fork` of a `.ts` script under tsx, with Node's IPC channel. */
export function forkTs(script: string, args: string[] = [], options: ForkOptions = {}): ChildProcess {
  const cpu = childCpu();
  const child = fork(path.resolve(projectRoot, script), args, {
    cwd: projectRoot,
    // fork runs `<execPath> ...execArgv <script> ...args`; taskset execs node, keeping the pid and the IPC fd.
    ...(cpu === null ? { execArgv: TSX_EXEC_ARGV } : { execPath: 'taskset', execArgv: ['-c', cpu, process.execPath, ...TSX_EXEC_ARGV] }),
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    ...options,
  });
  return track(child);
}

/** Rejects when `child` exits before `promise` settles, or after `ms`. */
function guard<T>(child: ChildProcess, promise: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => finish(() => reject(new Error(`${what}: no answer within ${ms} ms`))), ms);
    const onExit = (code: number | null, signal: NodeJS.Signals | null) =>
      finish(() => reject(new Error(`${what}: the child exited (${signal ?? code}) first`)));
    child.once('exit', onExit);
    function finish(settle: () => void): void {
      clearTimeout(timer);
      child.off('exit', onExit);
      settle();
    }
    promise.then(
      (value) => finish(() => resolve(value)),
      (error: unknown) => finish(() => reject(error)),
    );
  });
}

/** Resolves once the child writes a stdout line equal to `line`. */
export function waitForLine(child: ChildProcess, line: string, ms = 15_000): Promise<void> {
  const stdout = child.stdout;
  if (!stdout) return Promise.reject(new Error('the child has no piped stdout'));
  const seen = new Promise<void>((resolve) => {
    let buffered = '';
    const onData = (chunk: Buffer) => {
      buffered += chunk.toString();
      const lines = buffered.split('\n');
      buffered = lines.pop() ?? '';
      if (lines.some((text) => text.trim() === line)) {
        stdout.off('data', onData);
        stdout.resume();
        resolve();
      }
    };
    stdout.on('data', onData);
  });
  return guard(child, seen, ms, `waiting for "${line}" from pid ${child.pid}`);
}

/** Resolves with the first IPC message for which `predicate` holds. */
export function waitForMessage<T>(child: ChildProcess, predicate: (message: unknown) => boolean, ms = 15_000): Promise<T> {
  const seen = new Promise<T>((resolve) => {
    const onMessage = (message: unknown) => {
      if (!predicate(message)) return;
      child.off('message', onMessage);
      resolve(message as T);
    };
    child.on('message', onMessage);
  });
  return guard(child, seen, ms, `waiting for a message from pid ${child.pid}`);
}

/**
 * Stops a child we started: SIGTERM by its pid, SIGKILL after `graceMs`, and resolves once it has
 * exited. Safe to call for a child that is already gone.
 */
export async function stopChild(child: ChildProcess, graceMs = 2_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  const pid = child.pid;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  if (child.connected) child.disconnect();
  const signal = (name: NodeJS.Signals) => {
    try {
      process.kill(pid, name);
    } catch {
      // already gone
    }
  };
  signal('SIGTERM');
  const timer = setTimeout(() => signal('SIGKILL'), graceMs);
  try {
    await exited;
  } finally {
    clearTimeout(timer);
  }
}

/** Pids of the children still running (for a final check). */
export function liveChildren(): number[] {
  return [...live.keys()];
}

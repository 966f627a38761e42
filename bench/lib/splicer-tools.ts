/**
 * Helpers of the Splicer benchmark: the external programs (iperf3, socat, HAProxy) found or installed,
 * started and always stopped by pid; waiting for ports and output lines; and what /proc says about a
 * process (CPU time, RSS, open fds) and about kernel memory (slab).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Placement } from './process.js';
import { projectRoot } from './process.js';

// ---------------------------------------------------------------------------------------------------
// Tools

/** The external programs the benchmark uses. */
export const TOOL_NAMES = ['iperf3', 'socat', 'haproxy'] as const;
export type ToolName = (typeof TOOL_NAMES)[number];

export interface ToolsReport {
  /** Where each available tool is, and its version line. */
  found: Partial<Record<ToolName, { path: string; version: string }>>;
  /** Debian packages installed by this run. */
  installed: string[];
  /** Tools that are not available, and why. */
  missing: Partial<Record<ToolName, string>>;
}

const VERSION_ARGS: Record<ToolName, string[]> = { iperf3: ['--version'], socat: ['-V'], haproxy: ['-v'] };

function versionLine(tool: ToolName, file: string): string {
  const result = spawnSync(file, VERSION_ARGS[tool], { encoding: 'utf8', timeout: 5_000 });
  const lines = `${result.stdout ?? ''}\n${result.stderr ?? ''}`.split('\n').map((line) => line.trim());
  const pattern = tool === 'socat' ? /^socat version/ : tool === 'haproxy' ? /^HAProxy version/ : /^iperf /;
  return lines.find((line) => pattern.test(line)) ?? lines.find(Boolean) ?? 'unknown';
}

/**
 * Finds iperf3, socat and HAProxy, installing the missing ones from Debian's packages when running as
 * root unless `install` is false (scripts/ensure-bench-tools.mjs, which says on stderr what it installs).
 * Never throws: what cannot be had is listed in `missing`.
 */
export function ensureTools(progress: (line: string) => void, options: { install?: boolean } = {}): ToolsReport {
  const script = path.join(projectRoot, 'scripts', 'ensure-bench-tools.mjs');
  const result = spawnSync(process.execPath, [script, '--json', ...(options.install === false ? ['--no-install'] : []), ...TOOL_NAMES], {
    cwd: projectRoot,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    timeout: 600_000,
  });
  const report: ToolsReport = { found: {}, installed: [], missing: {} };
  let parsed: { found?: Record<string, string>; installed?: string[]; missing?: Record<string, string> } = {};
  try {
    parsed = JSON.parse(result.stdout.trim().split('\n').pop() ?? '{}') as typeof parsed;
  } catch {
    for (const tool of TOOL_NAMES) report.missing[tool] = `scripts/ensure-bench-tools.mjs failed (${result.error?.message ?? `exit ${result.status}`})`;
    return report;
  }
  report.installed = parsed.installed ?? [];
  for (const tool of TOOL_NAMES) {
    const file = parsed.found?.[tool];
    if (file) report.found[tool] = { path: file, version: versionLine(tool, file) };
    else report.missing[tool] = parsed.missing?.[tool] ?? 'not found';
  }
  if (report.installed.length) progress(`installed Debian packages: ${report.installed.join(', ')}`);
  for (const [tool, why] of Object.entries(report.missing)) progress(`MISSING: ${tool}: ${why}; what needs it is skipped`);
  return report;
}

// ---------------------------------------------------------------------------------------------------
// External processes, tracked by pid

const live = new Map<number, ChildProcess>();
let exitHook = false;

/** Tracks a started program by pid; whatever is still running when the benchmark exits is killed. */
function track(child: ChildProcess, file: string): number {
  if (child.pid === undefined) throw new Error(`${file} did not start`);
  const pid = child.pid;
  live.set(pid, child);
  child.once('exit', () => live.delete(pid));
  if (!exitHook) {
    exitHook = true;
    process.on('exit', () => {
      for (const running of live.keys()) signalAll([...descendants(running), running], 'SIGKILL');
    });
  }
  return pid;
}

/** The CPU external programs are pinned to under a placement (as bench/lib/process.ts does for Node children). */
function cpuFor(placement: Placement): string | null {
  return placement === 'same' ? '0' : placement === 'split' ? '1' : null;
}

/** Pids of `pid`'s children, grandchildren, ... (from /proc/<pid>/task/<tid>/children). */
export function descendants(pid: number): number[] {
  const found: number[] = [];
  const visit = (parent: number) => {
    let tasks: string[];
    try {
      tasks = fs.readdirSync(`/proc/${parent}/task`);
    } catch {
      return;
    }
    for (const task of tasks) {
      let text = '';
      try {
        text = fs.readFileSync(`/proc/${parent}/task/${task}/children`, 'utf8');
      } catch {
        continue;
      }
      for (const child of text.split(/\s+/).filter(Boolean).map(Number)) {
        found.push(child);
        visit(child);
      }
    }
  };
  visit(pid);
  return found;
}

function signalAll(pids: number[], signal: NodeJS.Signals): void {
  for (const pid of pids) {
    try {
      process.kill(pid, signal);
    } catch {
      // already gone
    }
  }
}

/** A started external program; `output()` is what it wrote to the piped streams so far. */
export interface ToolProcess {
  child: ChildProcess;
  pid: number;
  output(): string;
}

/**
 * Starts an external program (pinned like the Node children under `--pin`), tracked by pid: stop it with
 * {@link stopProcess}; anything still running when the benchmark exits is killed, descendants included.
 */
export function startProcess(file: string, args: string[], placement: Placement, options: { cwd?: string } = {}): ToolProcess {
  const cpu = cpuFor(placement);
  const [command, ...argv] = cpu === null ? [file, ...args] : ['taskset', '-c', cpu, file, ...args];
  const child = spawn(command!, argv, { cwd: options.cwd ?? projectRoot, stdio: ['ignore', 'pipe', 'pipe'] });
  const pid = track(child, file);
  let output = '';
  const keep = (chunk: Buffer) => {
    output += chunk.toString();
    if (output.length > 100_000) output = output.slice(-50_000);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  return { child, pid, output: () => output };
}

/** Stops a program we started, and its descendants (socat forks one per connection): SIGTERM, then SIGKILL. */
export async function stopProcess(tool: ToolProcess, graceMs = 2_000): Promise<void> {
  const { child, pid } = tool;
  const family = [...descendants(pid)];
  if (child.exitCode !== null || child.signalCode !== null) {
    signalAll(family, 'SIGKILL');
    return;
  }
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  signalAll([pid, ...family], 'SIGTERM');
  const timer = setTimeout(() => signalAll([pid, ...descendants(pid), ...family], 'SIGKILL'), graceMs);
  try {
    await exited;
  } finally {
    clearTimeout(timer);
  }
  signalAll(family, 'SIGKILL');
}

/** Runs a program to its end (pinned under `--pin`), with a time limit; resolves with its output and exit code. */
export function runProcess(file: string, args: string[], placement: Placement, timeoutMs: number): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const cpu = cpuFor(placement);
  const [command, ...argv] = cpu === null ? [file, ...args] : ['taskset', '-c', cpu, file, ...args];
  return new Promise((resolve, reject) => {
    const child = spawn(command!, argv, { cwd: projectRoot, stdio: ['ignore', 'pipe', 'pipe'] });
    let pid: number;
    try {
      pid = track(child, file);
    } catch (error) {
      return reject(error);
    }
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const timer = setTimeout(() => signalAll([pid], 'SIGKILL'), timeoutMs);
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

// ---------------------------------------------------------------------------------------------------
// Waiting

/**
 * Reads a child's stdout line by line for as long as it runs (so the pipe never fills up) and lets callers
 * wait for a line.
 */
export class LineReader {
  readonly #child: ChildProcess;
  readonly #lines: string[] = [];
  readonly #waiters = new Set<(line: string) => boolean>();
  #buffered = '';

  constructor(child: ChildProcess) {
    this.#child = child;
    const stdout = child.stdout;
    if (!stdout) throw new Error('the child has no piped stdout');
    stdout.on('data', (chunk: Buffer) => {
      this.#buffered += chunk.toString();
      const lines = this.#buffered.split('\n');
      this.#buffered = lines.pop() ?? '';
      for (const line of lines) {
        let taken = false;
        for (const waiter of this.#waiters) {
          if (waiter(line)) {
            taken = true;
            break;
          }
        }
        if (!taken && this.#lines.length < 1_000) this.#lines.push(line);
      }
    });
  }

  /** Resolves with `match(line)` for the first line (already read and not taken, or future) where it is not null. */
  wait<T>(match: (line: string) => T | null, ms = 15_000, what = 'output'): Promise<T> {
    for (let i = 0; i < this.#lines.length; i++) {
      const value = match(this.#lines[i]!);
      if (value !== null) {
        this.#lines.splice(i, 1);
        return Promise.resolve(value);
      }
    }
    const child = this.#child;
    return new Promise<T>((resolve, reject) => {
      const waiter = (line: string): boolean => {
        const value = match(line);
        if (value === null) return false;
        finish(() => resolve(value));
        return true;
      };
      const finish = (settle: () => void) => {
        clearTimeout(timer);
        this.#waiters.delete(waiter);
        child.off('exit', onExit);
        settle();
      };
      const onExit = (code: number | null, signal: string | null) =>
        finish(() => reject(new Error(`pid ${child.pid} exited (${signal ?? code}) before printing ${what}`)));
      const timer = setTimeout(() => finish(() => reject(new Error(`pid ${child.pid}: no ${what} within ${ms} ms`))), ms);
      this.#waiters.add(waiter);
      child.once('exit', onExit);
    });
  }
}

/** Parses a `port <n>` line. */
export const portLine = (line: string): number | null => {
  const match = /^port (\d+)$/.exec(line.trim());
  return match ? Number(match[1]) : null;
};

/** Whether some socket listens on 127.0.0.1:port or the wildcard address (from /proc/net/tcp and tcp6). */
export function isListening(port: number): boolean {
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text = '';
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/);
      if (fields[3] === '0A' && fields[1]?.endsWith(`:${hexPort}`)) return true;
    }
  }
  return false;
}

/** Resolves once something listens on `port`; rejects after `ms` or when `tool` exits first. */
export async function waitForListen(port: number, tool: ToolProcess, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!isListening(port)) {
    if (tool.child.exitCode !== null || tool.child.signalCode !== null) {
      throw new Error(`pid ${tool.pid} exited before listening on port ${port}: ${tool.output().slice(-1_000)}`);
    }
    if (Date.now() > deadline) throw new Error(`nothing listens on port ${port} after ${ms} ms: ${tool.output().slice(-1_000)}`);
    await sleep(20);
  }
}

/** Resolves once `file` exists (a daemon's socket), or rejects after `ms` or when `child` exits. */
export async function waitForFile(file: string, child: ChildProcess, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!fs.existsSync(file)) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`pid ${child.pid} exited before creating ${file}`);
    if (Date.now() > deadline) throw new Error(`${file} did not appear within ${ms} ms`);
    await sleep(20);
  }
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen({ host: '127.0.0.1', port: 0 }, () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------------------------------------------
// /proc

let clockTicks: number | null = null;

/** Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`, 100 almost everywhere). */
export function ticksPerSecond(): number {
  if (clockTicks === null) {
    const result = spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' });
    const value = Number(result.stdout?.trim());
    clockTicks = Number.isInteger(value) && value > 0 ? value : 100;
  }
  return clockTicks;
}

/** CPU seconds of a process: user and system, its own (all threads) plus those of children it has reaped. */
export interface CpuTime {
  user: number;
  system: number;
}

/** utime/stime (+ cutime/cstime) of one process, in seconds; zero for a process that is gone. */
export function processCpu(pid: number): CpuTime {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return { user: 0, system: 0 };
  }
  // Fields after the command name, which is in parentheses and may hold spaces: state is [0], utime [11].
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const tick = ticksPerSecond();
  const value = (index: number) => Number(fields[index]) / tick;
  return { user: value(11) + value(13), system: value(12) + value(14) };
}

/** CPU time of a process and all its live descendants (reaped ones are in its cutime/cstime). */
export function treeCpu(pid: number): CpuTime {
  const total = processCpu(pid);
  for (const child of descendants(pid)) {
    const own = processCpu(child);
    total.user += own.user;
    total.system += own.system;
  }
  return total;
}

/** Context switches (voluntary + involuntary) of all threads of a process so far; NaN when it is gone. */
export function contextSwitches(pid: number): number {
  let total = 0;
  let tasks: string[];
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return Number.NaN;
  }
  for (const task of tasks) {
    try {
      const text = fs.readFileSync(`/proc/${pid}/task/${task}/status`, 'utf8');
      total += Number(/^voluntary_ctxt_switches:\s+(\d+)/m.exec(text)?.[1] ?? 0);
      total += Number(/^nonvoluntary_ctxt_switches:\s+(\d+)/m.exec(text)?.[1] ?? 0);
    } catch {
      // the thread ended meanwhile
    }
  }
  return total;
}

/**
 * CPU seconds the whole machine has been busy, all CPUs together (/proc/stat: user + nice + system + irq +
 * softirq; not idle, iowait or steal).
 */
export function machineBusySeconds(): number {
  const line = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
  const [, user, nice, system, , , irq, softirq] = line.trim().split(/\s+/).map(Number);
  return (user! + nice! + system! + irq! + softirq!) / ticksPerSecond();
}

/** A field of /proc/<pid>/status in bytes (`VmRSS`, `VmHWM`...), or NaN. */
export function statusBytes(pid: number, field: string): number {
  try {
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) * 1024 : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

/** Open fds of a process. */
export function openFdCount(pid: number | 'self'): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

/** `Max open files` (soft) of a process. */
export function openFileLimit(pid: number | 'self' = 'self'): number | null {
  const match = /^Max open files\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/limits`, 'utf8'));
  return match ? Number(match[1]) : null;
}

/** Kernel memory in slab caches, in bytes (/proc/meminfo `Slab`, with its reclaimable and unreclaimable parts). */
export interface SlabTotals {
  slab: number;
  reclaimable: number;
  unreclaimable: number;
}

export function slabTotals(): SlabTotals {
  const text = fs.readFileSync('/proc/meminfo', 'utf8');
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? Number.NaN) * 1024;
  return { slab: field('Slab'), reclaimable: field('SReclaimable'), unreclaimable: field('SUnreclaim') };
}

/** Bytes held by each slab cache (active objects x object size), from /proc/slabinfo; null when unreadable (not root). */
export function slabCaches(): Map<string, number> | null {
  let text: string;
  try {
    text = fs.readFileSync('/proc/slabinfo', 'utf8');
  } catch {
    return null;
  }
  const caches = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('slabinfo') || line.startsWith('#')) continue;
    const [name, activeObjects, , objectSize] = line.trim().split(/\s+/);
    if (name && activeObjects && objectSize) caches.set(name, Number(activeObjects) * Number(objectSize));
  }
  return caches;
}

/** The caches that grew or shrank the most between two readings, largest change first. */
export function slabChanges(before: Map<string, number>, after: Map<string, number>, count: number): Array<{ cache: string; bytes: number }> {
  const names = new Set([...before.keys(), ...after.keys()]);
  return [...names]
    .map((cache) => ({ cache, bytes: (after.get(cache) ?? 0) - (before.get(cache) ?? 0) }))
    .sort((a, b) => Math.abs(b.bytes) - Math.abs(a.bytes))
    .slice(0, count);
}

/** The running kernel's release (`uname -r`). */
export function kernelRelease(): string {
  try {
    return fs.readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim();
  } catch {
    return 'unknown';
  }
}

/**
 * The Splicer daemon of the hand-over benchmark, followed across generations.
 *
 * The first generation is our child (`node --import tsx services/cli.ts splicer ...`, tracked by
 * bench/lib/process.ts). A successor is not: it is started through `setsid --fork` and re-parented away
 * from its predecessor (lib/handoff/spawn.ts), so we learn its pid only from the reload report and can
 * neither wait() for it nor rely on the process.ts hooks. Every pid of every generation is therefore kept
 * here and killed by that pid — at the end of a run, and from an `exit` hook if the benchmark dies — and
 * nothing is ever killed by name.
 *
 * A reload is the `reload` request of `fdferry ctl splicer reload --json` (services/ctl.ts), sent from
 * this process on its own control connection: the same request and the same report, without starting a
 * CLI process (node + tsx, most of a second of CPU on a 2-core machine) next to the measured traffic.
 * The request's connection is handed over with everything else; the successor answers it.
 */
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type { NativeBinding } from '../../lib/native.js';
import type { HandoffReport } from '../../lib/handoff/predecessor.js';
import { RpcClient } from '../../lib/rpc/client.js';
import { spawnTs, stopChild } from './process.js';
import { LineReader, sleep, waitForFile } from './splicer-tools.js';

/** Every daemon pid this benchmark ever started or learned of; the exit hook kills the live ones. */
const knownPids = new Set<number>();
/** Socket paths of the daemons not yet stopped (unique per run: they name this process and a time). */
const liveSockets = new Set<string>();
let exitHookInstalled = false;

/**
 * Pids of processes started with `--socket <socket>` for one of `sockets`. Only for the exit hook: a
 * successor that has taken over but whose report has not arrived yet (the benchmark was interrupted in
 * the middle of a hand-over) is known by nothing else. The path is unique to one run of this process.
 */
function pidsServing(sockets: ReadonlySet<string>): number[] {
  const found: number[] = [];
  let entries: string[] = [];
  try {
    entries = fs.readdirSync('/proc');
  } catch {
    return found;
  }
  for (const entry of entries) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const argv = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
      const at = argv.indexOf('--socket');
      if (at >= 0 && sockets.has(argv[at + 1] ?? '')) found.push(Number(entry));
    } catch {
      // gone meanwhile, or not ours to read
    }
  }
  return found;
}

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // bench/lib/process.ts turns SIGINT/SIGTERM into process.exit(), so this runs on those too.
  process.on('exit', () => {
    for (const pid of knownPids) signal(pid, 'SIGKILL');
    if (liveSockets.size) for (const pid of pidsServing(liveSockets)) signal(pid, 'SIGKILL');
  });
}

function signal(pid: number, name: NodeJS.Signals): void {
  try {
    process.kill(pid, name);
  } catch {
    // already gone
  }
}

/** Whether a process exists (and is not a zombie: a reaped-late first generation counts as gone). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/** Open fds of a process, or NaN when it is gone. */
export function fdCount(pid: number): number {
  try {
    return fs.readdirSync(`/proc/${pid}/fd`).length;
  } catch {
    return Number.NaN;
  }
}

/** Resolves true once `pid` has gone, false after `ms`. */
export async function waitGone(pid: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (alive(pid)) {
    if (Date.now() > deadline) return false;
    await sleep(10);
  }
  return true;
}

/** The engine figures of `status`. */
export interface EngineStatus {
  relays: number;
  pipesInUse: number;
  pipesIdle: number;
  pipeWaits: number;
  bytesTotal: number;
}

/** The daemon's flags in this benchmark (after `splicer --socket <path>`). */
export function daemonFlags(maxPipes: number, maxTasks: number): string[] {
  return [
    '--log-level',
    'warn',
    // Nothing waits for absent owners when a run stops the daemon.
    '--shutdown-grace',
    '0',
    // Room for the 48 relay hand-overs in flight while the relays are set up.
    '--max-inflight',
    '512',
    // Every direction of every relay may hold a pipe at once (2,500 relays: 5,000 pipes, 10,000 fds),
    // so no relay ever waits for the pool; only relays with bytes in flight hold one.
    '--max-pipes',
    String(maxPipes),
    // With those pipes, what fits under 20,000 open files: 2 x 3,000 relay fds + 2 x 6,000 pipe fds + the
    // daemon's own (it warns at start-up when its limits could exceed the open-file limit).
    '--max-tasks',
    String(maxTasks),
  ];
}

/** A Splicer daemon and its successors. */
export class DaemonGenerations {
  readonly socket: string;
  readonly pids: number[] = [];
  /** Successors of failed reloads (the predecessor kills them itself; stop() makes sure). */
  readonly #rejected: number[] = [];
  readonly #first: ChildProcess;
  readonly #control: RpcClient;

  private constructor(first: ChildProcess, socket: string, binding: NativeBinding) {
    this.#first = first;
    this.socket = socket;
    this.pids.push(first.pid!);
    knownPids.add(first.pid!);
    // Keep reading stdout (shared by every generation: successors inherit it) so the pipe never fills.
    new LineReader(first);
    this.#control = new RpcClient({ path: socket, owner: `bench-handoff-ctl-${process.pid}`, binding, reconnect: false, requestTimeoutMs: 60_000 });
  }

  /** Starts the first generation and connects the control connection. */
  static async start(dir: string, binding: NativeBinding, maxPipes: number, maxTasks: number): Promise<DaemonGenerations> {
    installExitHook();
    const socket = path.join(dir, `splicer-${process.pid}-${Date.now()}.sock`);
    liveSockets.add(socket);
    const child = spawnTs('services/cli.ts', ['splicer', '--socket', socket, ...daemonFlags(maxPipes, maxTasks)]);
    const daemon = new DaemonGenerations(child, socket, binding);
    try {
      await waitForFile(socket, child);
      // The socket file exists from bind(); until listen() a connection is refused. Try again a while.
      const deadline = Date.now() + 10_000;
      for (;;) {
        try {
          await daemon.#control.connect();
          break;
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code !== 'ECONNREFUSED' || Date.now() > deadline || child.exitCode !== null) throw error;
          await sleep(20);
        }
      }
    } catch (error) {
      await daemon.stop();
      throw error;
    }
    return daemon;
  }

  /** The pid of the generation serving now. */
  get current(): number {
    return this.pids[this.pids.length - 1]!;
  }

  /** The engine figures of the serving generation. */
  async engine(): Promise<EngineStatus> {
    const reply = await this.#control.request('status');
    return (reply.result as { engine: EngineStatus }).engine;
  }

  /**
   * Hands over to a successor (`reload`, waiting for the report) and records the successor's pid. The
   * report is returned as is, failed or not.
   */
  async reload(): Promise<HandoffReport> {
    const reply = await this.#control.request('reload', { wait: true });
    const report = reply.result as unknown as HandoffReport;
    if (report.newPid) {
      knownPids.add(report.newPid);
      (report.ok ? this.pids : this.#rejected).push(report.newPid);
    }
    return report;
  }

  /**
   * Stops every generation: SIGTERM to the serving one (relays already ended), SIGKILL to it after
   * `graceMs` and to any other generation still there. Resolves once all are gone.
   */
  async stop(graceMs = 3_000): Promise<void> {
    this.#control.close();
    const all = [...new Set([this.#first.pid!, ...this.pids, ...this.#rejected])];
    const current = this.current;
    if (current === this.#first.pid) {
      await stopChild(this.#first, graceMs);
    } else {
      signal(current, 'SIGTERM');
      if (!(await waitGone(current, graceMs))) signal(current, 'SIGKILL');
    }
    for (const pid of all) {
      if (alive(pid)) signal(pid, 'SIGKILL');
    }
    for (const pid of all) {
      if (!(await waitGone(pid, 5_000))) throw new Error(`daemon pid ${pid} is still there after SIGKILL`);
      knownPids.delete(pid);
    }
    liveSockets.delete(this.socket);
    // The first generation is our child: let Node reap it. Its stdout (which every generation shared) is
    // at its end now; close our side at once rather than whenever the end is read.
    if (this.#first.exitCode === null && this.#first.signalCode === null) await stopChild(this.#first, 0);
    this.#first.stdout?.destroy();
  }
}

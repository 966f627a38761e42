/**
 * Bumblebee benchmark: upgrades (raw IP flow -> accepted kernel TCP socket) and bulk traffic through the
 * pump, against the same load over a plain veth pair between two namespaces.
 *
 *   npm run bench -- bumblebee [--json] [--runs N] [--pin none|same|split]
 *
 * Use --pin none (the default): same and split pin the load generator, the daemon and the servers too, so the
 * traffic's source, sink and Bumblebee would share one CPU.
 *
 * Environment (run.ts takes no benchmark-specific flags):
 *   FDFERRY_BENCH_QUICK=1            short phases (1 s, at most 3,000 connections, small warm-up): a smoke test
 *   FDFERRY_BENCH_SECONDS=N          length of every timed phase in seconds (default 3; quick 1)
 *   FDFERRY_BENCH_CONNECTIONS=N      at most N connections per upgrade phase (default 20,000; quick 3,000)
 *   FDFERRY_BENCH_CONCURRENCY=a,b    concurrency of the upgrade phases (default 16,64)
 *   FDFERRY_BENCH_SYSTEMS=a,b        of bumblebee, veth (default both)
 *
 * Systems, alternating from run to run (A B, B A, ...), each run in fresh processes and fresh namespaces:
 *
 * - bumblebee: the topology of notes/bumblebee-kernel.md §9 and test/helpers/bumblebee-topology.ts. A client
 *   namespace `bbc-<pid>-<n>` whose default route is a tun (`ctun`, 10.1.0.2/24, no offloads) opened in this
 *   process with `openTunInNamespace`; the native on-ramp (`createOnRamp`) splits it into one SOCK_SEQPACKET
 *   socket per TCP flow; this process hands each to the Bumblebee daemon (`fdferry bumblebee --log-level
 *   warn`, a child process from source, stopped by pid after the run) with `BumblebeeClient.upgrade` and
 *   serves the accepted socket (bench/lib/bumblebee-serve.ts) by the flow's destination port. Destination:
 *   203.0.113.10, which exists nowhere else.
 * - veth: client namespace `bbb-c-<pid>-<n>` (veth 10.2.0.2/24) and server namespace `bbb-s-<pid>-<n>`
 *   (10.2.0.1/24), default veth offloads; the server is bench/lib/bumblebee-server.ts, serving with the same code.
 *
 * In both, the same load generator (bench/lib/bumblebee-load.ts) runs inside the client namespace, after a
 * warm-up (untimed upgrades and a short upload):
 *
 * 1. upgrades at each concurrency: connect, 1 byte each way, the client closes, done at the server's FIN;
 *    for FDFERRY_BENCH_SECONDS or FDFERRY_BENCH_CONNECTIONS connections, whichever comes first. Rate, p50/p99.
 * 2. bulk, one connection: upload (client writes, server discards), download (server writes), both at once.
 *    Gbit/s; TCP segments/s in the client namespace (per MSS-sized segment, GSO or not); for Bumblebee the
 *    packets through the pump from the daemon's `status` (packetsToKernel + packetsToClient deltas).
 *
 * CPU of every process involved (utime + stime from /proc/<pid>/stat, before and after each phase): the
 * daemon, this process (the requester's JavaScript and the on-ramp's thread), the veth server, the load
 * generator, and the whole machine's busy time (/proc/stat). Everything shares the 2 CPUs.
 *
 * After each Bumblebee run: flows, pending upgrades and on-ramp flows must drain to 0, the daemon's fd count
 * must return to where it was, and refusals, drops, orphans and the daemon's warnings are collected.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import readline from 'node:readline';
import type { ChildProcess } from 'node:child_process';
import { BumblebeeClient } from '../lib/client/bumblebee.js';
import { loadNative, type NativeBinding, type OnRampStats, type PumpEnvironmentStats } from '../lib/native.js';
import { RpcClient } from '../lib/rpc/client.js';
import { DESTINATION4, startOnRamp } from '../test/helpers/bumblebee-topology.js';
import { alternate } from './lib/alternate.js';
import { formatNumber, textTable, type BenchOptions } from './lib/bench.js';
import { bumblebeeClientNamespace, newCleanups, spawnInNamespace, vethTopology, VETH_SERVER, type Cleanups, type NamespaceProcess } from './lib/bumblebee-netns.js';
import { DISCARD_PORT, ECHO_PORT, SOURCE_PORT, newServeCounters, serve, type ServeCounters } from './lib/bumblebee-serve.js';
import { waitForQuiet, type QuietReading } from './lib/handoff-stalls.js';
import { spawnTs, stopChild, type Placement } from './lib/process.js';
import { kernelRelease, machineBusySeconds, openFdCount, processCpu, sleep, ticksPerSecond, waitForFile, type CpuTime } from './lib/splicer-tools.js';
import { median, ratio, round } from './lib/stats.js';

export const description = 'Bumblebee vs a plain veth pair: upgrades/s and p50/p99 (c=16, 64), bulk Gbit/s, packets/s through the pump, CPU per packet';
export const defaultRuns = 5;

const SYSTEMS = ['bumblebee', 'veth'] as const;
type System = (typeof SYSTEMS)[number];

/** Goals of the issue (notes/bumblebee-kernel.md §12 measured 8.7k-11.4k upgrades/s, 203-260k packets/s). */
const GOAL_UPGRADES_PER_S = 8_000;
const GOAL_PUMP_PACKETS_PER_S = 200_000;

/** Before each run, wait up to this long (quick: 2 s) for other processes to use less than QUIET_PERCENT of one CPU. */
const QUIET_WAIT_MS = 10_000;
const QUIET_PERCENT = 25;
/** A run during which other processes used more than this (percent of one CPU) in a phase is measured again: */
const DISTURBED_PERCENT = 50;
/** once per run at most, at most MAX_REPEATS times in all, and only within RETRY_BUDGET_S of the start (quick: never). */
const MAX_REPEATS = 3;
const RETRY_BUDGET_S = 150;

// ---------------------------------------------------------------------------------------------------
// Settings

interface Settings {
  quick: boolean;
  seconds: number;
  connections: number;
  concurrency: number[];
  systems: System[];
  warmupConnections: number;
  quietWaitMs: number;
  maxRepeats: number;
  warmupUploadMs: number;
  /** Pause between phases: the on-ramp closes a flow's socket 300 ms after both FINs. */
  gapMs: number;
  /** CPU for the programs in the namespaces (`--pin same`: 0, `split`: 1), like spawnTs does for the daemon. */
  childCpu: string | null;
}

function positiveInteger(name: string, text: string): number {
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 1) throw new Error(`${name} must be a positive integer, got "${text}"`);
  return value;
}

function readSettings(env: NodeJS.ProcessEnv, placement: Placement): Settings {
  const quick = env.FDFERRY_BENCH_QUICK === '1' || env.FDFERRY_BENCH_QUICK === 'true';
  const concurrency = (env.FDFERRY_BENCH_CONCURRENCY ?? '16,64').split(',').filter(Boolean).map((text) => positiveInteger('FDFERRY_BENCH_CONCURRENCY', text));
  if (concurrency.some((c) => c >= 1000)) throw new Error('FDFERRY_BENCH_CONCURRENCY: each value must be below 1,000');
  if (new Set(concurrency).size !== concurrency.length || concurrency.includes(1)) throw new Error('FDFERRY_BENCH_CONCURRENCY: distinct values, none 1 (port 7001 is the warm-up\'s)');
  let systems: System[] = [...SYSTEMS];
  if (env.FDFERRY_BENCH_SYSTEMS) {
    const wanted = env.FDFERRY_BENCH_SYSTEMS.split(',').map((name) => name.trim()).filter(Boolean);
    for (const name of wanted) if (!(SYSTEMS as readonly string[]).includes(name)) throw new Error(`FDFERRY_BENCH_SYSTEMS: unknown system "${name}" (known: ${SYSTEMS.join(', ')})`);
    systems = SYSTEMS.filter((name) => wanted.includes(name));
  }
  return {
    quick,
    seconds: env.FDFERRY_BENCH_SECONDS ? positiveInteger('FDFERRY_BENCH_SECONDS', env.FDFERRY_BENCH_SECONDS) : quick ? 1 : 3,
    connections: env.FDFERRY_BENCH_CONNECTIONS ? positiveInteger('FDFERRY_BENCH_CONNECTIONS', env.FDFERRY_BENCH_CONNECTIONS) : quick ? 3_000 : 20_000,
    concurrency,
    systems,
    warmupConnections: quick ? 300 : 1_000,
    quietWaitMs: quick ? 2_000 : QUIET_WAIT_MS,
    maxRepeats: quick ? 0 : MAX_REPEATS,
    warmupUploadMs: quick ? 200 : 500,
    gapMs: 500,
    childCpu: placement === 'same' ? '0' : placement === 'split' ? '1' : null,
  };
}

/** Ports of a run's phases: one per phase, so no phase meets an earlier phase's TIME_WAIT sockets. */
const PORTS = {
  warmupEcho: ECHO_PORT + 1,
  echo: (concurrency: number) => ECHO_PORT + concurrency,
  warmupUpload: DISCARD_PORT + 1,
  upload: DISCARD_PORT + 2,
  download: SOURCE_PORT + 2,
  bothUpload: DISCARD_PORT + 3,
  bothDownload: SOURCE_PORT + 3,
};

function serverPorts(settings: Settings): number[] {
  return [PORTS.warmupEcho, ...settings.concurrency.map(PORTS.echo), PORTS.warmupUpload, PORTS.upload, PORTS.download, PORTS.bothUpload, PORTS.bothDownload];
}

// ---------------------------------------------------------------------------------------------------
// Talking to the load generator

/** One JSON object per line from a child's stdout, one at a time. */
class JsonLines {
  readonly #child: ChildProcess;
  readonly #queue: string[] = [];
  readonly #waiters: Array<(line: string | null) => void> = [];
  #closed = false;

  constructor(child: ChildProcess) {
    this.#child = child;
    const lines = readline.createInterface({ input: child.stdout! });
    lines.on('line', (line) => {
      const waiter = this.#waiters.shift();
      if (waiter) waiter(line);
      else this.#queue.push(line);
    });
    lines.on('close', () => {
      this.#closed = true;
      for (const waiter of this.#waiters.splice(0)) waiter(null);
    });
  }

  send(message: Record<string, unknown>): void {
    this.#child.stdin!.write(`${JSON.stringify(message)}\n`);
  }

  /** The next line parsed as JSON; rejects when the child's stdout ends or after `ms`. */
  next(ms: number, what: string): Promise<Record<string, unknown>> {
    const line = this.#queue.shift();
    if (line !== undefined) return Promise.resolve(JSON.parse(line) as Record<string, unknown>);
    if (this.#closed) return Promise.reject(new Error(`${what}: pid ${this.#child.pid} ended its output`));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const index = this.#waiters.indexOf(waiter);
        if (index >= 0) this.#waiters.splice(index, 1);
        reject(new Error(`${what}: no answer from pid ${this.#child.pid} within ${ms} ms`));
      }, ms);
      const waiter = (text: string | null) => {
        clearTimeout(timer);
        if (text === null) reject(new Error(`${what}: pid ${this.#child.pid} ended its output`));
        else resolve(JSON.parse(text) as Record<string, unknown>);
      };
      this.#waiters.push(waiter);
    });
  }

  async request(message: Record<string, unknown>, ms: number): Promise<Record<string, unknown>> {
    this.send(message);
    const answer = await this.next(ms, `load generator ${String(message.op)}`);
    if (typeof answer.error === 'string') throw new Error(`load generator ${String(message.op)}: ${answer.error}`);
    return answer;
  }
}

// ---------------------------------------------------------------------------------------------------
// A system under test, as the phases see it

type Answer = Record<string, any>;

interface PumpCounters {
  toKernel: number;
  toClient: number;
  bytesToKernel: number;
  bytesToClient: number;
  accepted: number;
}

interface Snapshot {
  t: number;
  machine: number;
  cpu: Record<string, number>;
  pump: PumpCounters | null;
  /** TCP OutSegs of the server's namespace (veth), or null (Bumblebee's namespace is anonymous). */
  serverOutSegs: number | null;
}

interface Target {
  system: System;
  /** The client namespace the load generator runs in. */
  namespace: string;
  /** Where it connects. */
  address: string;
  /** pids whose CPU is measured, by role (daemon, requester, server). */
  pids: Record<string, number>;
  /** Roles whose process is also split into its main (JavaScript) thread and the rest (native threads, GC). */
  splitThreads: string[];
  pump(): Promise<PumpCounters | null>;
  serverOutSegs(): Promise<number | null>;
}

const cpuSeconds = (time: CpuTime) => time.user + time.system;

/** CPU seconds of a process's main thread (tid = pid: the JavaScript thread of a Node process); 0 when gone. */
function mainThreadCpu(pid: number): number {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/task/${pid}/stat`, 'utf8');
  } catch {
    return 0;
  }
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / ticksPerSecond();
}

async function snapshot(target: Target, loadPid: number): Promise<Snapshot> {
  const pump = await target.pump();
  const serverOutSegs = await target.serverOutSegs();
  const cpu: Record<string, number> = { load: cpuSeconds(processCpu(loadPid)) };
  for (const [role, pid] of Object.entries(target.pids)) {
    cpu[role] = cpuSeconds(processCpu(pid));
    if (target.splitThreads.includes(role)) cpu[`${role}Js`] = mainThreadCpu(pid);
  }
  return { t: performance.now(), machine: machineBusySeconds(), cpu, pump, serverOutSegs };
}

/** CPU of each role, and of the machine, over a phase: seconds, and percent of one CPU. */
function cpuOver(before: Snapshot, after: Snapshot) {
  const wall = (after.t - before.t) / 1000;
  const seconds: Record<string, number> = {};
  for (const role of Object.keys(after.cpu)) seconds[role] = after.cpu[role]! - (before.cpu[role] ?? 0);
  seconds.machine = after.machine - before.machine;
  const ours = Object.entries(seconds).filter(([role]) => role !== 'machine' && !role.endsWith('Js')).reduce((total, [, value]) => total + value, 0);
  // Machine busy time minus our processes': other jobs on the machine (approximate: the two are accounted differently).
  seconds.others = seconds.machine - ours;
  return { wall, seconds };
}

const NAN = Number.NaN;

/**
 * MSS-sized TCP segments both ways over a phase: the client namespace's OutSegs plus the server side's. For
 * veth the server namespace's OutSegs (InSegs would count a GRO bundle once); for Bumblebee the client
 * namespace's InSegs, which are single packets (the tun has no offloads) and equal the pump's packets to the
 * client.
 */
function segmentsOver(answer: Answer, before: Snapshot, after: Snapshot): number {
  const server = before.serverOutSegs !== null && after.serverOutSegs !== null ? after.serverOutSegs - before.serverOutSegs : (answer.tcp.inSegs as number);
  return (answer.tcp.outSegs as number) + server;
}

interface UpgradeFigures {
  perS: number;
  p50Ms: number;
  p90Ms: number;
  p99Ms: number;
  maxMs: number;
  connectP50Ms: number;
  connectP99Ms: number;
  echoP50Ms: number;
  echoP99Ms: number;
  completed: number;
  failed: number;
  /** MSS-sized TCP segments both ways per upgrade. */
  segmentsPerUpgrade: number;
  pumpPacketsPerUpgrade: number;
  cpuUsPerUpgrade: Record<string, number>;
  cpuPct: Record<string, number>;
}

interface BulkFigures {
  /** Sum of both directions. */
  gbps: number;
  uploadGbps: number;
  downloadGbps: number;
  bytes: number;
  /** MSS-sized TCP segments both ways per second (see segmentsOver). */
  segmentsPerS: number;
  retransSegs: number;
  pumpPacketsPerS: number;
  pumpToKernelPerS: number;
  pumpToClientPerS: number;
  daemonUsPerPacket: number;
  requesterUsPerPacket: number;
  /** Machine busy CPU per MSS-sized TCP segment (comparable across systems). */
  machineUsPerSegment: number;
  machineCpuSPerGiB: number;
  cpuPct: Record<string, number>;
}

interface RunFigures {
  upgrades: Record<string, UpgradeFigures>;
  bulk: Record<'upload' | 'download' | 'both', BulkFigures>;
  health: Record<string, unknown>;
  /** The machine before and during the run: the quiet gate, and other processes' CPU in the busiest phase. */
  machine: { quiet: QuietReading; othersPctMax: number; attempt: number };
}

/** Other processes' CPU (percent of one CPU) in the busiest measured phase of a run. */
function othersPctMax(figures: Pick<RunFigures, 'upgrades' | 'bulk'>): number {
  const phases = [...Object.values(figures.upgrades), ...Object.values(figures.bulk)];
  return Math.max(...phases.map((phase) => phase.cpuPct.others ?? 0));
}


function upgradeFigures(answer: Answer, before: Snapshot, after: Snapshot): UpgradeFigures {
  const { wall, seconds } = cpuOver(before, after);
  const completed = answer.completed as number;
  const per = (value: number) => (completed > 0 ? (value * 1e6) / completed : NAN);
  const cpuUsPerUpgrade: Record<string, number> = {};
  const cpuPct: Record<string, number> = {};
  for (const [role, value] of Object.entries(seconds)) {
    if (role !== 'others') cpuUsPerUpgrade[role] = per(value);
    cpuPct[role] = (value / wall) * 100;
  }
  const packets = before.pump && after.pump ? after.pump.toKernel - before.pump.toKernel + (after.pump.toClient - before.pump.toClient) : NAN;
  const q = (name: string, key: string) => (answer[name]?.[key] as number | null) ?? NAN;
  return {
    perS: answer.perS as number,
    p50Ms: q('totalMs', 'p50'),
    p90Ms: q('totalMs', 'p90'),
    p99Ms: q('totalMs', 'p99'),
    maxMs: q('totalMs', 'max'),
    connectP50Ms: q('connectMs', 'p50'),
    connectP99Ms: q('connectMs', 'p99'),
    echoP50Ms: q('echoMs', 'p50'),
    echoP99Ms: q('echoMs', 'p99'),
    completed,
    failed: answer.failed as number,
    segmentsPerUpgrade: completed > 0 ? segmentsOver(answer, before, after) / completed : NAN,
    pumpPacketsPerUpgrade: completed > 0 ? packets / completed : NAN,
    cpuUsPerUpgrade,
    cpuPct,
  };
}

function bulkFigures(answer: Answer, before: Snapshot, after: Snapshot): BulkFigures {
  const { wall, seconds } = cpuOver(before, after);
  const up = answer.upload as { bytes: number; gbps: number; error: string | null } | undefined;
  const down = answer.download as { bytes: number; gbps: number; error: string | null } | undefined;
  const bytes = (up?.bytes ?? 0) + (down?.bytes ?? 0);
  const segments = segmentsOver(answer, before, after);
  const toKernel = before.pump && after.pump ? after.pump.toKernel - before.pump.toKernel : NAN;
  const toClient = before.pump && after.pump ? after.pump.toClient - before.pump.toClient : NAN;
  const packets = toKernel + toClient;
  const cpuPct: Record<string, number> = {};
  for (const [role, value] of Object.entries(seconds)) cpuPct[role] = (value / wall) * 100;
  return {
    gbps: (up?.gbps ?? 0) + (down?.gbps ?? 0),
    uploadGbps: up?.gbps ?? NAN,
    downloadGbps: down?.gbps ?? NAN,
    bytes,
    segmentsPerS: segments / wall,
    retransSegs: answer.tcp.retransSegs as number,
    pumpPacketsPerS: packets / wall,
    pumpToKernelPerS: toKernel / wall,
    pumpToClientPerS: toClient / wall,
    daemonUsPerPacket: seconds.daemon !== undefined ? (seconds.daemon * 1e6) / packets : NAN,
    requesterUsPerPacket: seconds.requester !== undefined ? (seconds.requester * 1e6) / packets : NAN,
    machineUsPerSegment: (seconds.machine! * 1e6) / segments,
    machineCpuSPerGiB: seconds.machine! / (bytes / 1024 ** 3),
    cpuPct,
  };
}

/** Runs the load generator's phases against a target; returns the figures and the generator's own failures. */
async function phases(target: Target, settings: Settings, cleanups: Cleanups, progress: (line: string) => void): Promise<Pick<RunFigures, 'upgrades' | 'bulk'> & { loadFailures: number; loadErrors: Record<string, number>; bulkErrors: string[] }> {
  const load = spawnInNamespace(cleanups, target.namespace, 'bench/lib/bumblebee-load.ts', [target.address], settings.childCpu);
  const channel = new JsonLines(load.child);
  try {
    await channel.next(20_000, 'load generator start');
  } catch (error) {
    throw new Error(`${(error as Error).message}: ${load.stderr().slice(-2_000)}`);
  }
  const phaseMs = settings.seconds * 1000;
  const timeout = phaseMs + 30_000;
  const loadErrors: Record<string, number> = {};
  let loadFailures = 0;
  const bulkErrors: string[] = [];
  const note = (answer: Answer) => {
    loadFailures += (answer.failed as number | undefined) ?? 0;
    for (const [code, count] of Object.entries((answer.errors as Record<string, number> | undefined) ?? {})) loadErrors[code] = (loadErrors[code] ?? 0) + count;
    for (const direction of ['upload', 'download']) if (answer[direction]?.error) bulkErrors.push(`${direction}: ${answer[direction].error}`);
  };

  // Warm-up: JIT of every process involved, the daemon's first environment use, ARP on the veth.
  note(await channel.request({ op: 'upgrades', port: PORTS.warmupEcho, concurrency: 16, count: settings.warmupConnections, ms: 10_000 }, 60_000));
  note(await channel.request({ op: 'upload', port: PORTS.warmupUpload, ms: settings.warmupUploadMs }, 60_000));
  await sleep(settings.gapMs);

  const measure = async (command: Record<string, unknown>) => {
    const before = await snapshot(target, load.pid);
    const answer = await channel.request(command, timeout);
    const after = await snapshot(target, load.pid);
    note(answer);
    await sleep(settings.gapMs);
    return { answer, before, after };
  };

  const upgrades: Record<string, UpgradeFigures> = {};
  for (const concurrency of settings.concurrency) {
    const { answer, before, after } = await measure({ op: 'upgrades', port: PORTS.echo(concurrency), concurrency, count: settings.connections, ms: phaseMs });
    const figures = upgradeFigures(answer, before, after);
    upgrades[`c${concurrency}`] = figures;
    progress(`  ${target.system} c=${concurrency}: ${formatNumber(figures.perS, 0)} upgrades/s, p50 ${formatNumber(figures.p50Ms, 2)} ms, p99 ${formatNumber(figures.p99Ms, 2)} ms, ${figures.completed} done, ${figures.failed} failed`);
  }
  const upload = await measure({ op: 'upload', port: PORTS.upload, ms: phaseMs });
  const download = await measure({ op: 'download', port: PORTS.download, ms: phaseMs });
  const both = await measure({ op: 'both', upload: PORTS.bothUpload, download: PORTS.bothDownload, ms: phaseMs });
  const bulk = {
    upload: bulkFigures(upload.answer, upload.before, upload.after),
    download: bulkFigures(download.answer, download.before, download.after),
    both: bulkFigures(both.answer, both.before, both.after),
  };
  progress(
    `  ${target.system} bulk: up ${formatNumber(bulk.upload.gbps, 2)}, down ${formatNumber(bulk.download.gbps, 2)}, both ${formatNumber(bulk.both.gbps, 2)} Gbit/s` +
      (target.system === 'bumblebee' ? `; pump ${formatNumber(bulk.upload.pumpPacketsPerS, 0)} / ${formatNumber(bulk.download.pumpPacketsPerS, 0)} / ${formatNumber(bulk.both.pumpPacketsPerS, 0)} packets/s` : ''),
  );
  channel.send({ op: 'exit' });
  await new Promise<void>((resolve) => (load.child.exitCode !== null ? resolve() : load.child.once('exit', () => resolve())));
  return { upgrades, bulk, loadFailures, loadErrors, bulkErrors };
}

// ---------------------------------------------------------------------------------------------------
// Bumblebee

let daemonCounter = 0;

function tempDir(cleanups: Cleanups): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fdf-bbb-'));
  const remove = () => fs.rmSync(dir, { recursive: true, force: true });
  cleanups.add(`directory ${dir}`, remove, remove);
  return dir;
}

/** Connects a client once the daemon's socket accepts (its file appears at bind(), before listen()). */
async function connectWhenReady<T extends { connect(): Promise<unknown>; close(): void }>(make: () => T, child: ChildProcess, ms = 20_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const client = make();
    try {
      await client.connect();
      return client;
    } catch (error) {
      client.close();
      if (Date.now() > deadline || child.exitCode !== null) throw error;
    }
    await sleep(30);
  }
}

/** Warning and error lines of the daemon's JSON log (stdout). */
function collectWarnings(child: ChildProcess): string[] {
  const warnings: string[] = [];
  const lines = readline.createInterface({ input: child.stdout! });
  lines.on('line', (line) => {
    let level = 0;
    let message = line;
    try {
      const parsed = JSON.parse(line) as { level?: number; msg?: string };
      level = parsed.level ?? 0;
      message = parsed.msg ?? line;
    } catch {
      level = 40;
    }
    if (level >= 40 && warnings.length < 20) warnings.push(message.slice(0, 300));
  });
  return warnings;
}

async function until(condition: () => Promise<boolean> | boolean, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await condition()) return true;
    await sleep(50);
  }
  return condition();
}

async function bumblebeeRun(binding: NativeBinding, settings: Settings, progress: (line: string) => void): Promise<Omit<RunFigures, 'machine'>> {
  const cleanups = newCleanups();
  try {
    const dir = tempDir(cleanups);
    const socket = path.join(dir, `bb-${++daemonCounter}.sock`);
    const daemon = spawnTs('services/cli.ts', ['bumblebee', '--socket', socket, '--log-level', 'warn']);
    const daemonPid = daemon.pid!;
    cleanups.add(`Bumblebee daemon pid ${daemonPid}`, () => stopChild(daemon), () => {
      try {
        process.kill(daemonPid, 'SIGKILL');
      } catch {
        // gone
      }
    });
    const warnings = collectWarnings(daemon);
    await waitForFile(socket, daemon, 20_000);
    const owner = `bench-bumblebee-${process.pid}`;
    const client = await connectWhenReady(() => new BumblebeeClient({ owner, path: socket, binding, reconnect: false }), daemon);
    cleanups.add('Bumblebee client', () => client.close());
    const control = await connectWhenReady(() => new RpcClient({ path: socket, owner: `${owner}-ctl`, binding, reconnect: false }), daemon);
    cleanups.add('Bumblebee control client', () => control.close());
    const status = async () =>
      (await control.request('status')).result as {
        flows: number;
        pending: number;
        /** The RPC server's counters (requests, errors...). */
        counters: Record<string, number>;
        /** Bumblebee's own (upgrades, refused, flowsEnded, ended_<reason>); `counters` in older daemons. */
        flowCounters?: Record<string, number>;
        environments: PumpEnvironmentStats[];
      };

    const namespace = bumblebeeClientNamespace(cleanups, binding);
    const counters: ServeCounters = newServeCounters();
    const harness = startOnRamp(cleanups.asTest(), binding, client, namespace.tunFd, (flow) => serve(flow.socket, flow.tuple.destinationPort, counters), { tenant: 'bench' });
    const daemonFdsBefore = openFdCount(daemonPid);

    const target: Target = {
      system: 'bumblebee',
      namespace: namespace.name,
      address: DESTINATION4,
      pids: { daemon: daemonPid, requester: process.pid },
      splitThreads: ['daemon', 'requester'],
      serverOutSegs: async () => null,
      pump: async () => {
        const environment = (await status()).environments[0]!;
        return {
          toKernel: environment.packetsToKernel,
          toClient: environment.packetsToClient,
          bytesToKernel: environment.bytesToKernel,
          bytesToClient: environment.bytesToClient,
          accepted: environment.accepted,
        };
      },
    };
    const measured = await phases(target, settings, cleanups, progress);

    // Every flow must end: the on-ramp closes each flow socket 300 ms after both FINs, Bumblebee then forgets it.
    const drained = await until(async () => {
      const now = await status();
      return now.flows === 0 && now.pending === 0 && harness.onramp.stats().flows === 0;
    }, 10_000);
    const fdsBack = await until(() => openFdCount(daemonPid) === daemonFdsBefore, 5_000);
    const final = await status();
    const environment = final.environments[0]!;
    const onramp: OnRampStats = harness.onramp.stats();
    const refusalCodes: Record<string, number> = {};
    for (const refusal of harness.refusals) refusalCodes[refusal.code] = (refusalCodes[refusal.code] ?? 0) + 1;
    const health = {
      upgraded: harness.upgraded,
      accepted: environment.accepted,
      refusals: harness.refusals.length,
      refusalCodes,
      orphans: environment.orphans,
      drops: Object.fromEntries(Object.entries(environment.drops).filter(([, count]) => count > 0)),
      onrampDrops: Object.fromEntries(Object.entries(onramp.drops).filter(([, count]) => count > 0)),
      onrampFlowsTotal: onramp.flowsTotal,
      drained,
      flowsLeft: final.flows,
      pendingLeft: final.pending,
      onrampFlowsLeft: onramp.flows,
      slotsInQuarantine: environment.slotsInQuarantine,
      daemonFdsBefore,
      daemonFdsAfter: openFdCount(daemonPid),
      daemonFdsBack: fdsBack,
      daemonCounters: final.counters,
      flowCounters: final.flowCounters ?? null,
      daemonWarnings: warnings,
      loadFailures: measured.loadFailures,
      loadErrors: measured.loadErrors,
      bulkErrors: measured.bulkErrors,
      serveErrors: counters.errors,
      servedConnections: counters.connections,
    };
    return { upgrades: measured.upgrades, bulk: measured.bulk, health };
  } finally {
    await cleanups.run(progress);
  }
}

// ---------------------------------------------------------------------------------------------------
// veth baseline

async function vethRun(settings: Settings, progress: (line: string) => void): Promise<Omit<RunFigures, 'machine'>> {
  const cleanups = newCleanups();
  try {
    const topology = vethTopology(cleanups);
    const server: NamespaceProcess = spawnInNamespace(cleanups, topology.server, 'bench/lib/bumblebee-server.ts', [VETH_SERVER, ...serverPorts(settings).map(String)], settings.childCpu);
    const lines = new JsonLines(server.child);
    try {
      await lines.next(20_000, 'veth server start');
    } catch (error) {
      throw new Error(`${(error as Error).message}: ${server.stderr().slice(-2_000)}`);
    }
    const counters = async () => {
      server.child.stdin!.write('counters\n');
      return (await lines.next(10_000, 'veth server counters')) as unknown as ServeCounters & { outSegs: number };
    };
    const target: Target = {
      system: 'veth',
      namespace: topology.client,
      address: topology.serverAddress,
      pids: { server: server.pid },
      splitThreads: [],
      serverOutSegs: async () => (await counters()).outSegs,
      pump: async () => null,
    };
    const measured = await phases(target, settings, cleanups, progress);
    const served = await counters();
    return {
      upgrades: measured.upgrades,
      bulk: measured.bulk,
      health: { loadFailures: measured.loadFailures, loadErrors: measured.loadErrors, bulkErrors: measured.bulkErrors, serveErrors: served.errors, servedConnections: served.connections },
    };
  } finally {
    await cleanups.run(progress);
  }
}

// ---------------------------------------------------------------------------------------------------
// Medians, ratios, goals

/** Rounds every number of a JSON-like value; NaN and infinities become null. */
function roundDeep(value: unknown): unknown {
  if (typeof value === 'number') return Number.isFinite(value) ? round(value, 4) : null;
  if (Array.isArray(value)) return value.map(roundDeep);
  if (value && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, roundDeep(item)]));
  return value;
}

/** The per-leaf median over objects of the same shape (numbers only; NaN where any run lacks it). */
function medianDeep<T>(items: T[]): T {
  const first = items[0] as unknown;
  if (typeof first === 'number') return median(items as number[]) as T;
  if (first && typeof first === 'object') {
    return Object.fromEntries(Object.keys(first).map((key) => [key, medianDeep(items.map((item) => (item as Record<string, unknown>)[key]))])) as T;
  }
  return first as T;
}

/** Figures whose bumblebee / veth ratio means nothing (counts, shares of a CPU that may be about 0). */
const NO_RATIO = new Set(['cpuPct', 'completed', 'failed', 'bytes', 'retransSegs']);

/** bumblebee / veth of every number of two same-shaped objects. */
function ratioDeep(a: unknown, b: unknown): unknown {
  if (typeof a === 'number' && typeof b === 'number') return ratio(a, b);
  if (a && b && typeof a === 'object' && typeof b === 'object') {
    return Object.fromEntries(
      Object.keys(a)
        .filter((key) => key in (b as object) && !NO_RATIO.has(key))
        .map((key) => [key, ratioDeep((a as Record<string, unknown>)[key], (b as Record<string, unknown>)[key])]),
    );
  }
  return null;
}

interface Goal {
  goal: string;
  value: number | null;
  target: number;
  met: boolean | null;
}

function goals(medians: Partial<Record<System, Pick<RunFigures, 'upgrades' | 'bulk'>>>, settings: Settings): Goal[] {
  const list: Goal[] = [];
  const bb = medians.bumblebee;
  if (!bb) return list;
  for (const concurrency of settings.concurrency) {
    const value = bb.upgrades[`c${concurrency}`]?.perS ?? NAN;
    list.push({ goal: `upgrades per second >= ${formatNumber(GOAL_UPGRADES_PER_S, 0)} at concurrency ${concurrency}`, value: Number.isFinite(value) ? round(value, 4) : null, target: GOAL_UPGRADES_PER_S, met: Number.isFinite(value) ? value >= GOAL_UPGRADES_PER_S : null });
  }
  const best = Math.max(...(['upload', 'download', 'both'] as const).map((phase) => bb.bulk[phase].pumpPacketsPerS).filter(Number.isFinite));
  list.push({ goal: `packets per second through the pump >= ${formatNumber(GOAL_PUMP_PACKETS_PER_S, 0)} (best bulk phase)`, value: Number.isFinite(best) ? round(best, 4) : null, target: GOAL_PUMP_PACKETS_PER_S, met: Number.isFinite(best) ? best >= GOAL_PUMP_PACKETS_PER_S : null });
  return list;
}

/** Everything in a Bumblebee run's health that is not as it should be. */
function problemsOf(run: number, health: Record<string, any>): string[] {
  const problems: string[] = [];
  const at = `run ${run + 1}`;
  if (health.loadFailures) problems.push(`${at}: ${health.loadFailures} load-generator connections failed ${JSON.stringify(health.loadErrors)}`);
  if (health.bulkErrors?.length) problems.push(`${at}: bulk errors ${health.bulkErrors.join('; ')}`);
  if (health.refusals) problems.push(`${at}: ${health.refusals} upgrades refused ${JSON.stringify(health.refusalCodes)}`);
  if (health.orphans) problems.push(`${at}: ${health.orphans} orphan sockets`);
  if (health.drops && Object.keys(health.drops).length) problems.push(`${at}: pump drops ${JSON.stringify(health.drops)}`);
  if (health.onrampDrops && Object.keys(health.onrampDrops).length) problems.push(`${at}: on-ramp drops ${JSON.stringify(health.onrampDrops)}`);
  if (health.drained === false) problems.push(`${at}: not drained after 10 s: flows ${health.flowsLeft}, pending ${health.pendingLeft}, on-ramp flows ${health.onrampFlowsLeft}`);
  if (health.daemonFdsBack === false) problems.push(`${at}: daemon fds ${health.daemonFdsBefore} -> ${health.daemonFdsAfter}`);
  if (health.upgraded !== undefined && health.accepted !== undefined && health.upgraded !== health.accepted) problems.push(`${at}: ${health.accepted} accepted by the pump but ${health.upgraded} upgrades answered`);
  if (health.serveErrors) problems.push(`${at}: ${health.serveErrors} served sockets failed (reset) instead of ending`);
  if (health.daemonCounters?.errors) problems.push(`${at}: the daemon's RPC server counted ${health.daemonCounters.errors} errors`);
  if (health.flowCounters?.refused) problems.push(`${at}: the daemon counted ${health.flowCounters.refused} refused upgrades`);
  const abnormal = Object.entries((health.flowCounters ?? {}) as Record<string, number>).filter(([key, count]) => key.startsWith('ended_') && key !== 'ended_closed' && count > 0);
  if (abnormal.length) problems.push(`${at}: flows ended otherwise than by close: ${JSON.stringify(Object.fromEntries(abnormal))}`);
  if (health.daemonWarnings?.length) problems.push(`${at}: daemon warnings: ${health.daemonWarnings.slice(0, 3).join(' | ')}`);
  return problems;
}

// ---------------------------------------------------------------------------------------------------
// Entry

export async function run(options: BenchOptions): Promise<Record<string, unknown>> {
  const started = performance.now();
  const settings = readSettings(process.env, options.placement);
  if (process.getuid?.() !== 0) throw new Error('the Bumblebee benchmark needs root (network namespaces, tuns, CAP_SYS_ADMIN for the daemon)');
  const binding = loadNative();
  const fdsBefore = openFdCount('self');
  options.progress(
    `bumblebee: ${settings.systems.join(' vs ')}, ${options.runs} run(s); upgrades at c=${settings.concurrency.join(', ')} for ${settings.seconds} s or ${formatNumber(settings.connections, 0)} connections; bulk ${settings.seconds} s up, down, both${settings.quick ? ' (QUICK)' : ''}`,
  );
  let repeats = 0;
  const runs = await alternate(settings.systems, options.runs, async (system, runIndex) => {
    if (system === settings.systems[runIndex % settings.systems.length]) options.progress(`run ${runIndex + 1}/${options.runs}`);
    for (let attempt = 1; ; attempt++) {
      const quiet = await waitForQuiet(settings.quietWaitMs, QUIET_PERCENT, os.cpus().length);
      if (!quiet.quiet) options.progress(`  the machine is busy: other processes use ${formatNumber(quiet.othersPercent, 0)}% of a CPU after ${formatNumber(quiet.waitedMs / 1000, 0)} s of waiting; measuring anyway`);
      const figures = system === 'bumblebee' ? await bumblebeeRun(binding, settings, options.progress) : await vethRun(settings, options.progress);
      const others = othersPctMax(figures);
      const record: RunFigures = { ...figures, machine: { quiet, othersPctMax: others, attempt } };
      if (others <= DISTURBED_PERCENT || attempt > 1 || repeats >= settings.maxRepeats || (performance.now() - started) / 1000 > RETRY_BUDGET_S) return record;
      repeats++;
      options.progress(`  ${system}: other processes used up to ${formatNumber(others, 0)}% of a CPU during this run: measuring it again`);
    }
  });

  const medians: Partial<Record<System, Pick<RunFigures, 'upgrades' | 'bulk'>>> = {};
  for (const system of settings.systems) medians[system] = medianDeep(runs[system].map(({ upgrades, bulk }) => ({ upgrades, bulk })));
  const ratios = medians.bumblebee && medians.veth ? ratioDeep(medians.bumblebee, medians.veth) : null;
  const problems = (runs.bumblebee ?? []).flatMap((figures, index) => problemsOf(index, figures.health));
  for (const [index, figures] of (runs.veth ?? []).entries()) {
    if (figures.health.loadFailures) problems.push(`veth run ${index + 1}: ${String(figures.health.loadFailures)} load-generator connections failed ${JSON.stringify(figures.health.loadErrors)}`);
    if (figures.health.serveErrors) problems.push(`veth run ${index + 1}: ${String(figures.health.serveErrors)} served sockets failed (reset)`);
  }
  const disturbed = settings.systems.flatMap((system) => runs[system].flatMap((figures, index) => (figures.machine.othersPctMax > DISTURBED_PERCENT ? [`${system} run ${index + 1} (${formatNumber(figures.machine.othersPctMax, 0)}%)`] : [])));
  const result: Record<string, unknown> = {
    benchmark: 'bumblebee',
    runs: options.runs,
    placement: options.placement,
    quick: settings.quick,
    settings: { seconds: settings.seconds, connections: settings.connections, concurrency: settings.concurrency, systems: settings.systems, warmupConnections: settings.warmupConnections },
    machine: { cpus: os.cpus().length, node: process.version, kernel: kernelRelease() },
    medians: roundDeep(medians),
    ratios: roundDeep(ratios),
    goals: goals(medians, settings),
    problems,
    disturbedRuns: disturbed,
    repeatedRuns: settings.systems.reduce((total, system) => total + runs[system].filter((figures) => figures.machine.attempt > 1).length, 0),
    quietGate: `before each run, up to ${settings.quietWaitMs / 1000} s of waiting until other processes use < ${QUIET_PERCENT}% of one CPU; a run in which they used > ${DISTURBED_PERCENT}% in some phase is measured again (once per run, ${settings.maxRepeats} times at most, within ${RETRY_BUDGET_S} s of the start)`,
    perRun: roundDeep(runs),
    leakedFds: openFdCount('self') - fdsBefore,
    elapsedS: round((performance.now() - started) / 1000, 3),
  };
  return result;
}

// ---------------------------------------------------------------------------------------------------
// Table

const num = (value: unknown, digits = 1): string => (typeof value === 'number' && Number.isFinite(value) ? formatNumber(value, digits) : '-');

export function formatTable(result: Record<string, unknown>): string {
  const out: string[] = [];
  const machine = result.machine as { cpus: number; node: string; kernel: string };
  const settings = result.settings as { seconds: number; connections: number; concurrency: number[]; systems: System[] };
  out.push(
    `Bumblebee: median of ${String(result.runs)} alternating runs${result.quick ? ' (QUICK)' : ''} (Node ${machine.node}, ${machine.cpus} CPUs, Linux ${machine.kernel}, --pin ${String(result.placement)})`,
  );
  const medians = result.medians as Record<string, any>;
  const ratios = result.ratios as Record<string, any> | null;
  const systems = settings.systems;
  const header = (title: string) => [title, ...systems, ...(ratios ? ['bb/veth'] : [])];
  const row = (label: string, pick: (figures: any) => unknown, digits = 1, ratioDigits = 2) => [
    label,
    ...systems.map((system) => num(pick(medians[system]), digits)),
    ...(ratios ? [num(pick(ratios), ratioDigits)] : []),
  ];

  const upgradeRows: string[][] = [header(`upgrades (connect, 1 byte each way, close; ${settings.seconds} s or ${formatNumber(settings.connections, 0)})`)];
  for (const concurrency of settings.concurrency) {
    const key = `c${concurrency}`;
    const u = (figures: any) => figures?.upgrades?.[key];
    upgradeRows.push(row(`c=${concurrency}: upgrades/s`, (f) => u(f)?.perS, 0));
    upgradeRows.push(row(`c=${concurrency}: p50 (ms)`, (f) => u(f)?.p50Ms, 2));
    upgradeRows.push(row(`c=${concurrency}: p99 (ms)`, (f) => u(f)?.p99Ms, 2));
    upgradeRows.push(row(`c=${concurrency}: connect p50 / p99 (ms)`, () => null));
    const last = upgradeRows[upgradeRows.length - 1]!;
    for (const [i, system] of systems.entries()) last[i + 1] = `${num(u(medians[system])?.connectP50Ms, 2)} / ${num(u(medians[system])?.connectP99Ms, 2)}`;
    if (ratios) last[systems.length + 1] = `${num(u(ratios)?.connectP50Ms, 2)} / ${num(u(ratios)?.connectP99Ms, 2)}`;
    upgradeRows.push(row(`c=${concurrency}: CPU µs/upgrade, machine`, (f) => u(f)?.cpuUsPerUpgrade?.machine, 0));
    upgradeRows.push(row(`c=${concurrency}:   Bumblebee daemon`, (f) => u(f)?.cpuUsPerUpgrade?.daemon, 0));
    upgradeRows.push(row(`c=${concurrency}:     its JavaScript thread`, (f) => u(f)?.cpuUsPerUpgrade?.daemonJs, 0));
    upgradeRows.push(row(`c=${concurrency}:   requester + on-ramp`, (f) => u(f)?.cpuUsPerUpgrade?.requester, 0));
    upgradeRows.push(row(`c=${concurrency}:     its JavaScript thread`, (f) => u(f)?.cpuUsPerUpgrade?.requesterJs, 0));
    upgradeRows.push(row(`c=${concurrency}:   veth server`, (f) => u(f)?.cpuUsPerUpgrade?.server, 0));
    upgradeRows.push(row(`c=${concurrency}:   load generator`, (f) => u(f)?.cpuUsPerUpgrade?.load, 0));
    upgradeRows.push(row(`c=${concurrency}: pump packets/upgrade`, (f) => u(f)?.pumpPacketsPerUpgrade, 1));
  }
  out.push('', textTable(upgradeRows));

  const bulkRows: string[][] = [header(`bulk, 1 connection per direction, ${settings.seconds} s`)];
  for (const phase of ['upload', 'download', 'both'] as const) {
    const b = (figures: any) => figures?.bulk?.[phase];
    bulkRows.push(row(`${phase}: Gbit/s`, (f) => b(f)?.gbps, 2));
    bulkRows.push(row(`${phase}: TCP segments/s (MSS-sized)`, (f) => b(f)?.segmentsPerS, 0));
    bulkRows.push(row(`${phase}: pump packets/s`, (f) => b(f)?.pumpPacketsPerS, 0));
    bulkRows.push(row(`${phase}:   to kernel / to client`, () => null));
    const last = bulkRows[bulkRows.length - 1]!;
    for (const [i, system] of systems.entries()) last[i + 1] = system === 'bumblebee' ? `${num(b(medians[system])?.pumpToKernelPerS, 0)} / ${num(b(medians[system])?.pumpToClientPerS, 0)}` : '-';
    if (ratios) last[systems.length + 1] = '-';
    bulkRows.push(row(`${phase}: daemon CPU µs/packet`, (f) => b(f)?.daemonUsPerPacket, 2));
    bulkRows.push(row(`${phase}: requester+on-ramp µs/packet`, (f) => b(f)?.requesterUsPerPacket, 2));
    bulkRows.push(row(`${phase}: machine CPU µs/segment`, (f) => b(f)?.machineUsPerSegment, 2));
    bulkRows.push(row(`${phase}: machine CPU s/GiB`, (f) => b(f)?.machineCpuSPerGiB, 3));
    bulkRows.push(row(`${phase}: retransmitted segments`, (f) => b(f)?.retransSegs, 0));
  }
  if (systems.includes('bumblebee')) {
    const cpu = (phase: string) => {
      const pct = medians.bumblebee?.bulk?.[phase]?.cpuPct ?? {};
      return `daemon ${num(pct.daemon, 0)}%, requester+on-ramp ${num(pct.requester, 0)}%, load ${num(pct.load, 0)}%, machine ${num(pct.machine, 0)}% (others ${num(pct.others, 0)}%)`;
    };
    out.push('', textTable(bulkRows), `CPU during bulk (bumblebee, % of one CPU): upload ${cpu('upload')}; download ${cpu('download')}; both ${cpu('both')}`);
  } else {
    out.push('', textTable(bulkRows));
  }

  const goalList = result.goals as Goal[];
  if (goalList.length) {
    out.push('', 'goals:');
    for (const item of goalList) out.push(`  ${item.met === null ? 'n/a ' : item.met ? 'MET ' : 'MISS'} ${item.goal}: ${num(item.value, 0)} (target ${num(item.target, 0)})`);
  }
  const problems = result.problems as string[];
  out.push('', problems.length ? `problems (${problems.length}):` : 'problems: none (no failed connection, refusal, drop, orphan, leak or daemon warning)');
  for (const problem of problems.slice(0, 20)) out.push(`  ${problem}`);
  const disturbed = result.disturbedRuns as string[];
  out.push(`runs measured again because other processes were busy: ${String(result.repeatedRuns)}; runs still disturbed (others > ${DISTURBED_PERCENT}% of a CPU in a phase): ${disturbed.length ? disturbed.join(', ') : 'none'}`);
  out.push('', `elapsed ${num(result.elapsedS, 0)} s; benchmark fds leaked: ${String(result.leakedFds)}`);
  return out.join('\n');
}

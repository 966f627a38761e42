/**
 * Splicer benchmark: the Splicer daemon against the relays a user would use otherwise.
 *
 *   npm run bench -- splicer [--json] [--runs N] [--pin none|same|split]
 *
 * Environment (run.ts takes no benchmark-specific flags):
 *   FDFERRY_BENCH_QUICK=1              short everything (iperf3 -t 1, short windows, 1,000 idle relays): a smoke test
 *   FDFERRY_BENCH_SECTIONS=a,b         only these of throughput, setup, handover, idle (default: all)
 *   FDFERRY_BENCH_SECONDS=N            iperf3 -t (default 3; quick 1)
 *   FDFERRY_BENCH_PIPE_SIZE=N          the Splicer daemon's --pipe-size in every section (default: the daemon's, 256 KiB)
 *   FDFERRY_BENCH_PIPE_SIZES=N,M       extra throughput systems: Splicer with --pipe-size N, M (default 1048576,
 *                                      the best found; quick: none; empty: none)
 *   FDFERRY_BENCH_SYSTEMS=a,b          only these throughput systems besides Splicer (of direct, socat, haproxy, node)
 *   FDFERRY_BENCH_HAPROXY_THREADS=N    HAProxy's nbthread (default: HAProxy's own, one per CPU)
 *   FDFERRY_BENCH_HAPROXY_PIPESIZE=N   HAProxy's tune.pipesize (default: HAProxy's own, the kernel's 64 KiB)
 *   FDFERRY_BENCH_RETURNED=net|fd      how the Splicer proxy takes sockets back (default net: net.Socket, destroyed)
 *   FDFERRY_BENCH_NO_INSTALL=1         do not install missing tools (skip what needs them)
 *
 * Sections, each system in fresh processes per run, systems alternating from run to run (A B C, B C A...),
 * every figure the median over the runs:
 *
 * 1. throughput: iperf3 (client -> server, 1 and 4 parallel streams, `-t 3`) on 127.0.0.1 through: nothing
 *    (direct), Splicer (a minimal Node proxy accepts and hands each pair to the daemon), socat
 *    (`TCP-LISTEN,fork`), HAProxy (`mode tcp`, `option splice-request`/`splice-response`), and the naive
 *    Node relay (the same proxy doing `a.pipe(b); b.pipe(a)`). With each: relay CPU seconds (utime + stime
 *    from /proc/<pid>/stat, before and after; for Splicer the daemon, whose engine thread is in it, plus
 *    the accepting proxy) per GiB received by the iperf3 server, and the whole machine's busy CPU seconds
 *    (/proc/stat) per GiB.
 * 2. setup: short connections per second (connect, send 1 byte, read it back, close; 32 at once from this
 *    process) through the Splicer proxy, the same proxy relaying with pipe(), and HAProxy, to a Node echo
 *    server; p50/p99 of a whole connection.
 * 3. handover: the raw hand-over, with ready-made AF_UNIX socket pairs: hand two sockets over
 *    (`SplicerClient.start`), 1 byte each way through the relay, both peers close, envelope back. One at a
 *    time, and 32 at once.
 * 4. idle: 5,000 idle relays (Unix socket pairs; this process keeps the far ends, 10,000 fds): the daemon's
 *    RSS, JS heap (the daemon runs under bench/lib/splicer-daemon.ts, which adds a heap probe on SIGUSR2),
 *    open fds, and kernel slab memory, each per relay.
 *
 * Tools: iperf3, socat and HAProxy are located, or installed with apt-get when running as root
 * (scripts/ensure-bench-tools.mjs says what it installs); what cannot be had is skipped and reported.
 */
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { ChildProcess } from 'node:child_process';
import { SplicerClient } from '../lib/client/splicer.js';
import { loadNative, type NativeBinding } from '../lib/native.js';
import { alternate } from './lib/alternate.js';
import { formatNumber, textTable, type BenchOptions } from './lib/bench.js';
import { spawnTs, stopChild, type Placement } from './lib/process.js';
import {
  LineReader,
  contextSwitches,
  machineBusySeconds,
  ensureTools,
  freePort,
  kernelRelease,
  openFdCount,
  openFileLimit,
  portLine,
  processCpu,
  runProcess,
  sleep,
  slabCaches,
  slabChanges,
  slabTotals,
  startProcess,
  statusBytes,
  stopProcess,
  treeCpu,
  descendants,
  waitForFile,
  waitForListen,
  type CpuTime,
  type ToolProcess,
  type ToolsReport,
} from './lib/splicer-tools.js';
import { median, percentile, ratio, round, sum } from './lib/stats.js';

export const description = 'Splicer vs direct, socat, HAProxy (splice), naive Node relay: throughput, CPU/GiB, set-up rate, hand-overs, 5,000 idle relays';
export const defaultRuns = 5;

const GiB = 1024 ** 3;
const ONE = Buffer.from('x');

// ---------------------------------------------------------------------------------------------------
// Settings

const SECTIONS = ['throughput', 'setup', 'handover', 'idle'] as const;
type Section = (typeof SECTIONS)[number];

interface Settings {
  quick: boolean;
  sections: Section[];
  iperfSeconds: number;
  streams: number[];
  pipeSize: number | null;
  exploredPipeSizes: number[];
  haproxyThreads: number | null;
  haproxyPipeSize: number | null;
  /** Throughput systems to run besides Splicer; null: all. */
  systems: string[] | null;
  returned: 'net' | 'fd';
  setup: { concurrency: number; warmupMs: number; measureMs: number };
  handover: { warmup: number; sequential: number; concurrent: number; concurrency: number };
  idle: { relays: number; warmup: number; concurrency: number };
}

function positiveInteger(name: string, text: string): number {
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 1) throw new Error(`${name} must be a positive integer, got "${text}"`);
  return value;
}

function readSettings(env: NodeJS.ProcessEnv): Settings {
  const quick = env.FDFERRY_BENCH_QUICK === '1' || env.FDFERRY_BENCH_QUICK === 'true';
  let sections: Section[] = [...SECTIONS];
  if (env.FDFERRY_BENCH_SECTIONS) {
    const wanted = env.FDFERRY_BENCH_SECTIONS.split(',').map((name) => name.trim()).filter(Boolean);
    for (const name of wanted) {
      if (!(SECTIONS as readonly string[]).includes(name)) throw new Error(`FDFERRY_BENCH_SECTIONS: unknown section "${name}" (known: ${SECTIONS.join(', ')})`);
    }
    sections = SECTIONS.filter((name) => wanted.includes(name));
  }
  const returned = env.FDFERRY_BENCH_RETURNED ?? 'net';
  if (returned !== 'net' && returned !== 'fd') throw new Error(`FDFERRY_BENCH_RETURNED must be net or fd, got "${returned}"`);
  return {
    quick,
    sections,
    iperfSeconds: env.FDFERRY_BENCH_SECONDS ? positiveInteger('FDFERRY_BENCH_SECONDS', env.FDFERRY_BENCH_SECONDS) : quick ? 1 : 3,
    streams: [1, 4],
    pipeSize: env.FDFERRY_BENCH_PIPE_SIZE ? positiveInteger('FDFERRY_BENCH_PIPE_SIZE', env.FDFERRY_BENCH_PIPE_SIZE) : null,
    // 1 MiB measured best among 64 KiB - 1 MiB (docs/benchmarks.md); "" explores none.
    exploredPipeSizes: (env.FDFERRY_BENCH_PIPE_SIZES ?? (quick ? '' : '1048576'))
      .split(',')
      .filter(Boolean)
      .map((text) => positiveInteger('FDFERRY_BENCH_PIPE_SIZES', text)),
    systems: env.FDFERRY_BENCH_SYSTEMS ? env.FDFERRY_BENCH_SYSTEMS.split(',').map((name) => name.trim()) : null,
    haproxyPipeSize: env.FDFERRY_BENCH_HAPROXY_PIPESIZE ? positiveInteger('FDFERRY_BENCH_HAPROXY_PIPESIZE', env.FDFERRY_BENCH_HAPROXY_PIPESIZE) : null,
    haproxyThreads: env.FDFERRY_BENCH_HAPROXY_THREADS ? positiveInteger('FDFERRY_BENCH_HAPROXY_THREADS', env.FDFERRY_BENCH_HAPROXY_THREADS) : null,
    returned,
    setup: quick ? { concurrency: 32, warmupMs: 200, measureMs: 500 } : { concurrency: 32, warmupMs: 500, measureMs: 2_000 },
    handover: quick ? { warmup: 200, sequential: 200, concurrent: 500, concurrency: 32 } : { warmup: 1_000, sequential: 1_000, concurrent: 3_000, concurrency: 32 },
    idle: quick ? { relays: 1_000, warmup: 200, concurrency: 48 } : { relays: 5_000, warmup: 500, concurrency: 48 },
  };
}

/** Flags every Splicer daemon of the benchmark gets. */
function daemonArgs(socket: string, settings: Settings, pipeSize: number | null = settings.pipeSize): string[] {
  return [
    'splicer',
    '--socket',
    socket,
    '--log-level',
    'warn',
    // Nothing waits for absent owners when the benchmark stops a daemon.
    '--shutdown-grace',
    '0',
    // Room for a proxy's 48 hand-overs in flight plus the acknowledgements of envelopes.
    '--max-inflight',
    '512',
    ...(pipeSize === null ? [] : ['--pipe-size', String(pipeSize)]),
  ];
}

// ---------------------------------------------------------------------------------------------------
// Processes of a run

/** A Splicer daemon started from source, stopped by pid. */
interface Daemon {
  child: ChildProcess;
  pid: number;
  socket: string;
  lines: LineReader;
}

let runCounter = 0;

/** A fresh temporary directory, removed by the returned function, or at exit (SIGINT) at the latest. */
function tempDir(): { dir: string; remove: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fdf-bench-'));
  const remove = () => {
    process.off('exit', remove);
    fs.rmSync(dir, { recursive: true, force: true });
  };
  process.on('exit', remove);
  return { dir, remove };
}

async function startDaemon(dir: string, settings: Settings, options: { probe?: boolean; pipeSize?: number | null } = {}): Promise<Daemon> {
  const socket = path.join(dir, `splicer-${++runCounter}.sock`);
  const script = options.probe ? 'bench/lib/splicer-daemon.ts' : 'services/cli.ts';
  const child = spawnTs(script, daemonArgs(socket, settings, options.pipeSize === undefined ? settings.pipeSize : options.pipeSize));
  const lines = new LineReader(child);
  try {
    await waitForFile(socket, child);
    await waitForAccept(socket, child);
  } catch (error) {
    await stopChild(child);
    throw error;
  }
  return { child, pid: child.pid!, socket, lines };
}

/** Resolves once the daemon's socket accepts a connection (the file appears at bind(), before listen()). */
async function waitForAccept(socket: string, child: ChildProcess, ms = 15_000): Promise<void> {
  const binding = loadNative();
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      binding.close(binding.seqpacketConnect(socket));
      return;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ECONNREFUSED' || Date.now() > deadline || child.exitCode !== null) throw error;
    }
    await sleep(20);
  }
}

/** A Node child that prints `port <n>` once it listens (the proxy, the echo server). */
async function startListeningChild(script: string, args: string[]): Promise<{ child: ChildProcess; pid: number; port: number }> {
  const child = spawnTs(script, args);
  const lines = new LineReader(child);
  try {
    const port = await lines.wait(portLine, 15_000, 'its port');
    return { child, pid: child.pid!, port };
  } catch (error) {
    await stopChild(child);
    throw error;
  }
}

/** HAProxy in the foreground (`-db`, no daemon mode), `mode tcp` with splicing both ways, config in `dir`. */
async function startHaproxy(file: string, dir: string, upstreamPort: number, settings: Settings, placement: Placement): Promise<{ tool: ToolProcess; port: number }> {
  const port = await freePort();
  const config = path.join(dir, `haproxy-${++runCounter}.cfg`);
  fs.writeFileSync(
    config,
    [
      'global',
      '  maxconn 4096',
      ...(settings.haproxyThreads === null ? [] : [`  nbthread ${settings.haproxyThreads}`]),
      ...(settings.haproxyPipeSize === null ? [] : [`  tune.pipesize ${settings.haproxyPipeSize}`]),
      'defaults',
      '  mode tcp',
      '  timeout connect 5s',
      '  timeout client 60s',
      '  timeout server 60s',
      '  option splice-request',
      '  option splice-response',
      'frontend bench',
      `  bind 127.0.0.1:${port}`,
      '  default_backend upstream',
      'backend upstream',
      `  server up 127.0.0.1:${upstreamPort}`,
      '',
    ].join('\n'),
  );
  const tool = startProcess(file, ['-f', config, '-db'], placement);
  try {
    await waitForListen(port, tool);
  } catch (error) {
    await stopProcess(tool);
    throw error;
  }
  return { tool, port };
}

async function startSocat(file: string, upstreamPort: number, placement: Placement): Promise<{ tool: ToolProcess; port: number }> {
  const port = await freePort();
  const tool = startProcess(file, [`TCP-LISTEN:${port},bind=127.0.0.1,fork,reuseaddr`, `TCP:127.0.0.1:${upstreamPort}`], placement);
  try {
    await waitForListen(port, tool);
  } catch (error) {
    await stopProcess(tool);
    throw error;
  }
  return { tool, port };
}

/** A relay under test: where to connect, what its processes have used, how to stop it. */
interface Relay {
  port: number;
  /** CPU time of the relay's processes (for Splicer: daemon + proxy). */
  cpu(): CpuTime;
  /** CPU time of the Splicer daemon alone (Splicer only). */
  daemonCpu?(): CpuTime;
  /** Context switches of the relay's processes, all threads; NaN where not meaningful (socat forks per connection). */
  switches(): number;
  /** Waits until per-connection helper processes are gone (socat), so their CPU time is accounted. */
  settle(): Promise<void>;
  stop(): Promise<void>;
}

const cpuSum = (...times: CpuTime[]): CpuTime => ({ user: sum(times.map((t) => t.user)), system: sum(times.map((t) => t.system)) });

async function splicerRelay(dir: string, upstreamPort: number, settings: Settings, pipeSize: number | null): Promise<Relay> {
  const daemon = await startDaemon(dir, settings, { pipeSize });
  let proxy;
  try {
    proxy = await startListeningChild('bench/lib/splicer-proxy.ts', ['splicer', String(upstreamPort), daemon.socket, settings.returned]);
  } catch (error) {
    await stopChild(daemon.child);
    throw error;
  }
  const started = proxy;
  return {
    port: started.port,
    cpu: () => cpuSum(processCpu(daemon.pid), processCpu(started.pid)),
    daemonCpu: () => processCpu(daemon.pid),
    switches: () => contextSwitches(daemon.pid) + contextSwitches(started.pid),
    settle: async () => {},
    stop: async () => {
      await stopChild(started.child);
      await stopChild(daemon.child);
    },
  };
}

async function pipeRelay(upstreamPort: number): Promise<Relay> {
  const proxy = await startListeningChild('bench/lib/splicer-proxy.ts', ['pipe', String(upstreamPort)]);
  return {
    port: proxy.port,
    cpu: () => processCpu(proxy.pid),
    switches: () => contextSwitches(proxy.pid),
    settle: async () => {},
    stop: () => stopChild(proxy.child),
  };
}

function toolRelay(started: { tool: ToolProcess; port: number }, forks: boolean): Relay {
  const { tool, port } = started;
  return {
    port,
    cpu: () => treeCpu(tool.pid),
    switches: () => (forks ? Number.NaN : contextSwitches(tool.pid)),
    settle: async () => {
      const deadline = Date.now() + 3_000;
      while (forks && descendants(tool.pid).length > 0 && Date.now() < deadline) await sleep(20);
    },
    stop: () => stopProcess(tool),
  };
}

// ---------------------------------------------------------------------------------------------------
// 1. Throughput

/** Figures of one iperf3 run through one relay. */
interface StreamFigures {
  gbps: number;
  gib: number;
  retransmits: number;
  /** Relay CPU seconds per GiB: user + system, and each. NaN for `direct`. */
  cpuSPerGiB: number;
  userSPerGiB: number;
  sysSPerGiB: number;
  /** Splicer only: the daemon's share. */
  daemonCpuSPerGiB: number;
  /** Relay context switches per GiB (all threads); NaN for direct and socat. */
  switchesPerGiB: number;
  /** CPU seconds of the whole machine per GiB (iperf3 client and server, relay, softirq; and whatever else runs). */
  machineCpuSPerGiB: number;
}

interface IperfResult {
  bitsPerSecond: number;
  bytes: number;
  retransmits: number;
}

async function runIperf(file: string, port: number, streams: number, seconds: number, placement: Placement): Promise<IperfResult> {
  const args = ['-c', '127.0.0.1', '-p', String(port), '-t', String(seconds), '-P', String(streams), '-J'];
  let last = '';
  // The server refuses a test while it still winds down the previous one ("busy"): try again shortly.
  for (let attempt = 0; attempt < 3; attempt++) {
    const { code, stdout, stderr } = await runProcess(file, args, placement, (seconds + 30) * 1000);
    let report: { error?: string; end?: { sum_received?: { bits_per_second: number; bytes: number }; sum_sent?: { retransmits?: number } } };
    try {
      report = JSON.parse(stdout) as typeof report;
    } catch {
      report = { error: `exit ${code}: ${stderr.trim() || stdout.slice(0, 200)}` };
    }
    const received = report.end?.sum_received;
    if (!report.error && received) {
      return { bitsPerSecond: received.bits_per_second, bytes: received.bytes, retransmits: report.end?.sum_sent?.retransmits ?? 0 };
    }
    last = report.error ?? `exit ${code}`;
    await sleep(500);
  }
  throw new Error(`iperf3 ${args.join(' ')}: ${last}`);
}

type ThroughputSystem = string;

interface ThroughputContext {
  settings: Settings;
  tools: ToolsReport;
  placement: Placement;
  dir: string;
  progress: (line: string) => void;
}

async function startThroughputRelay(system: ThroughputSystem, upstreamPort: number, context: ThroughputContext): Promise<Relay | null> {
  const { settings, tools, placement, dir } = context;
  if (system === 'direct') return null;
  if (system === 'splicer') return splicerRelay(dir, upstreamPort, settings, settings.pipeSize);
  if (system.startsWith('splicer-pipe-')) return splicerRelay(dir, upstreamPort, settings, Number(system.slice('splicer-pipe-'.length)));
  if (system === 'node') return pipeRelay(upstreamPort);
  if (system === 'socat') return toolRelay(await startSocat(tools.found.socat!.path, upstreamPort, placement), true);
  if (system === 'haproxy') return toolRelay(await startHaproxy(tools.found.haproxy!.path, dir, upstreamPort, settings, placement), false);
  throw new Error(`unknown system ${system}`);
}

async function throughputRun(system: ThroughputSystem, context: ThroughputContext): Promise<Record<string, StreamFigures>> {
  const { settings, tools, placement } = context;
  const iperf = tools.found.iperf3!.path;
  const serverPort = await freePort();
  const server = startProcess(iperf, ['-s', '-B', '127.0.0.1', '-p', String(serverPort)], placement);
  let relay: Relay | null = null;
  try {
    await waitForListen(serverPort, server);
    relay = await startThroughputRelay(system, serverPort, context);
    const figures: Record<string, StreamFigures> = {};
    for (const streams of settings.streams) {
      const cpuBefore = relay?.cpu() ?? { user: 0, system: 0 };
      const daemonBefore = relay?.daemonCpu?.() ?? { user: 0, system: 0 };
      const switchesBefore = relay?.switches() ?? Number.NaN;
      const machineBefore = machineBusySeconds();
      const result = await runIperf(iperf, relay?.port ?? serverPort, streams, settings.iperfSeconds, placement);
      await relay?.settle();
      const cpuAfter = relay?.cpu() ?? { user: 0, system: 0 };
      const daemonAfter = relay?.daemonCpu?.() ?? { user: 0, system: 0 };
      const switchesAfter = relay?.switches() ?? Number.NaN;
      const machineAfter = machineBusySeconds();
      const gib = result.bytes / GiB;
      const user = cpuAfter.user - cpuBefore.user;
      const system_ = cpuAfter.system - cpuBefore.system;
      const perGiB = (value: number) => (relay ? value / gib : Number.NaN);
      figures[`streams${streams}`] = {
        gbps: result.bitsPerSecond / 1e9,
        gib,
        retransmits: result.retransmits,
        cpuSPerGiB: perGiB(user + system_),
        userSPerGiB: perGiB(user),
        sysSPerGiB: perGiB(system_),
        daemonCpuSPerGiB: relay?.daemonCpu ? perGiB(daemonAfter.user + daemonAfter.system - daemonBefore.user - daemonBefore.system) : Number.NaN,
        switchesPerGiB: perGiB(switchesAfter - switchesBefore),
        machineCpuSPerGiB: (machineAfter - machineBefore) / gib,
      };
    }
    context.progress(
      `  ${system.padEnd(10)} ${settings.streams
        .map((streams) => {
          const f = figures[`streams${streams}`]!;
          return `${streams} stream(s) ${formatNumber(f.gbps, 2)} Gbit/s${relay ? `, ${formatNumber(f.cpuSPerGiB, 3)} CPU s/GiB` : ''}`;
        })
        .join('; ')}`,
    );
    return figures;
  } finally {
    await relay?.stop();
    await stopProcess(server);
  }
}

// ---------------------------------------------------------------------------------------------------
// 2. Set-up: short connections through a proxy

/** One short connection: connect, send 1 byte, read it back, close; resolves once the socket has closed cleanly. */
function shortConnection(port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port, noDelay: true });
    let answered = false;
    let failure: Error | null = null;
    const timer = setTimeout(() => socket.destroy(new Error('no answer within 5 s')), 5_000);
    socket.once('connect', () => socket.write(ONE));
    socket.on('data', () => {
      if (answered) return;
      answered = true;
      socket.end();
    });
    socket.on('error', (error) => (failure = error));
    socket.once('close', () => {
      clearTimeout(timer);
      if (answered && !failure) resolve();
      else reject(failure ?? new Error('closed before the answer'));
    });
  });
}

interface ConnectionsResult {
  completed: number;
  errors: number;
  elapsedMs: number;
  samplesMs: number[];
  firstError: string | null;
}

/** `concurrency` loops of short connections for `durationMs` (each finishes the connection it is in). */
async function shortConnections(port: number, concurrency: number, durationMs: number): Promise<ConnectionsResult> {
  const samplesMs: number[] = [];
  let errors = 0;
  let firstError: string | null = null;
  let stopping = false;
  const timer = setTimeout(() => (stopping = true), durationMs);
  const loop = async () => {
    while (!stopping) {
      const start = performance.now();
      try {
        await shortConnection(port);
        samplesMs.push(performance.now() - start);
      } catch (error) {
        errors++;
        firstError ??= (error as Error).message;
        await sleep(5);
      }
    }
  };
  const start = performance.now();
  await Promise.all(Array.from({ length: concurrency }, loop));
  clearTimeout(timer);
  return { completed: samplesMs.length, errors, elapsedMs: performance.now() - start, samplesMs, firstError };
}

const SETUP_SYSTEMS = ['splicer', 'pipe', 'haproxy'] as const;
type SetupSystem = (typeof SETUP_SYSTEMS)[number];

interface SetupFigures {
  connectionsPerS: number;
  p50Ms: number;
  p99Ms: number;
  errors: number;
  /** CPU milliseconds per 1,000 connections, by process. */
  cpuMsPer1000: Record<string, number>;
}

async function setupRun(system: SetupSystem, context: ThroughputContext): Promise<SetupFigures> {
  const { settings, tools, placement, dir } = context;
  const echo = await startListeningChild('bench/lib/splicer-echo.ts', []);
  let relay: Relay | null = null;
  try {
    relay =
      system === 'splicer'
        ? await splicerRelay(dir, echo.port, settings, settings.pipeSize)
        : system === 'pipe'
          ? await pipeRelay(echo.port)
          : toolRelay(await startHaproxy(tools.found.haproxy!.path, dir, echo.port, settings, placement), false);
    const { concurrency, warmupMs, measureMs } = settings.setup;
    await shortConnections(relay.port, concurrency, warmupMs);
    const relayBefore = relay.cpu();
    const daemonBefore = relay.daemonCpu?.();
    const echoBefore = processCpu(echo.pid);
    const clientBefore = process.cpuUsage();
    const result = await shortConnections(relay.port, concurrency, measureMs);
    const client = process.cpuUsage(clientBefore);
    const relayAfter = relay.cpu();
    const daemonAfter = relay.daemonCpu?.();
    const echoAfter = processCpu(echo.pid);
    if (result.completed === 0) throw new Error(`${system}: no short connection completed (${result.firstError ?? 'no error'})`);
    const per1000 = (seconds: number) => (seconds * 1000 * 1000) / result.completed;
    const cpu = (after: CpuTime, before: CpuTime) => after.user + after.system - before.user - before.system;
    const cpuMsPer1000: Record<string, number> = {
      client: per1000((client.user + client.system) / 1e6),
      echo: per1000(cpu(echoAfter, echoBefore)),
    };
    if (daemonBefore && daemonAfter) {
      cpuMsPer1000.daemon = per1000(cpu(daemonAfter, daemonBefore));
      cpuMsPer1000.proxy = per1000(cpu(relayAfter, relayBefore) - cpu(daemonAfter, daemonBefore));
    } else {
      cpuMsPer1000[system === 'haproxy' ? 'haproxy' : 'proxy'] = per1000(cpu(relayAfter, relayBefore));
    }
    const figures: SetupFigures = {
      connectionsPerS: (result.completed * 1000) / result.elapsedMs,
      p50Ms: percentile(result.samplesMs, 50),
      p99Ms: percentile(result.samplesMs, 99),
      errors: result.errors,
      cpuMsPer1000,
    };
    context.progress(
      `  ${system.padEnd(8)} ${formatNumber(figures.connectionsPerS, 0)} connections/s, p50 ${formatNumber(figures.p50Ms, 2)} ms, ` +
        `p99 ${formatNumber(figures.p99Ms, 2)} ms${result.errors ? `, ${result.errors} errors (${result.firstError})` : ''}`,
    );
    return figures;
  } finally {
    await relay?.stop();
    await stopChild(echo.child);
  }
}

// ---------------------------------------------------------------------------------------------------
// 3. Raw hand-over

/** A ready-made relay: `a` and `b` go to Splicer; `peerA`/`peerB` are the far ends, wrapped for the exchange. */
interface ReadyPair {
  a: number;
  b: number;
  peerA: net.Socket;
  peerB: net.Socket;
}

function readyPairs(binding: NativeBinding, count: number): ReadyPair[] {
  const pairs: ReadyPair[] = [];
  for (let i = 0; i < count; i++) {
    const [a, farA] = binding.streamPair();
    const [b, farB] = binding.streamPair();
    pairs.push({ a, b, peerA: new net.Socket({ fd: farA, readable: true, writable: true }), peerB: new net.Socket({ fd: farB, readable: true, writable: true }) });
  }
  return pairs;
}

/** Hands one pair over, sends 1 byte each way through the relay, closes both peers, waits for the envelope. */
async function handOverOnce(client: SplicerClient<'fd'>, binding: NativeBinding, pair: ReadyPair): Promise<void> {
  const { done } = await client.start(pair.a, pair.b);
  const atB = once(pair.peerB, 'data');
  pair.peerA.write(ONE);
  await atB;
  const atA = once(pair.peerA, 'data');
  pair.peerB.write(ONE);
  await atA;
  pair.peerA.end();
  pair.peerB.end();
  const relay = await done;
  if (relay.envelope.reason !== 'complete' || relay.envelope.bytesAToB !== 1 || relay.envelope.bytesBToA !== 1) {
    throw new Error(`hand-over: unexpected envelope ${JSON.stringify({ reason: relay.envelope.reason, code: relay.envelope.code, ab: relay.envelope.bytesAToB, ba: relay.envelope.bytesBToA })}`);
  }
  binding.closeAll([relay.a, relay.b]);
  pair.peerA.destroy();
  pair.peerB.destroy();
}

interface HandoverSeries {
  count: number;
  concurrency: number;
  perS: number;
  p50Us: number;
  p99Us: number;
}

/** Runs `pairs` through `concurrency` loops; the clock starts once the pairs exist. */
async function handOverSeries(
  client: SplicerClient<'fd'>,
  binding: NativeBinding,
  pairs: ReadyPair[],
  concurrency: number,
): Promise<{ samplesMs: number[]; elapsedMs: number }> {
  const samplesMs: number[] = [];
  let next = 0;
  const loop = async () => {
    while (next < pairs.length) {
      const pair = pairs[next++]!;
      const start = performance.now();
      await handOverOnce(client, binding, pair);
      samplesMs.push(performance.now() - start);
    }
  };
  const start = performance.now();
  await Promise.all(Array.from({ length: concurrency }, loop));
  return { samplesMs, elapsedMs: performance.now() - start };
}

/**
 * {@link handOverSeries} over `count` pairs, made in chunks that fit this process's open-file limit (4 fds
 * a pair; with the usual limits, one chunk). Pair making is outside the clock; the figures cover all chunks.
 */
async function handOverChunked(client: SplicerClient<'fd'>, binding: NativeBinding, count: number, concurrency: number): Promise<HandoverSeries> {
  const limit = openFileLimit() ?? 1024;
  const chunk = Math.max(concurrency, Math.min(count, Math.floor((limit - openFdCount('self') - 256) / 4)));
  const samplesMs: number[] = [];
  let elapsedMs = 0;
  for (let done = 0; done < count; done += chunk) {
    const series = await handOverSeries(client, binding, readyPairs(binding, Math.min(chunk, count - done)), concurrency);
    samplesMs.push(...series.samplesMs);
    elapsedMs += series.elapsedMs;
  }
  return {
    count,
    concurrency,
    perS: (count * 1000) / elapsedMs,
    p50Us: percentile(samplesMs, 50) * 1000,
    p99Us: percentile(samplesMs, 99) * 1000,
  };
}

interface HandoverFigures {
  sequential: HandoverSeries;
  concurrent: HandoverSeries;
  /** CPU milliseconds per 1,000 hand-overs of the concurrent series. */
  cpuMsPer1000: { client: number; daemon: number };
}

async function handoverRun(binding: NativeBinding, context: ThroughputContext): Promise<HandoverFigures> {
  const { settings, dir } = context;
  const daemon = await startDaemon(dir, settings);
  const client = new SplicerClient({ owner: `bench-handover-${process.pid}`, path: daemon.socket, sockets: 'fd', binding, reconnect: false });
  try {
    await client.connect();
    const { warmup, sequential, concurrent, concurrency } = settings.handover;
    await handOverChunked(client, binding, warmup, concurrency);
    const one = await handOverChunked(client, binding, sequential, 1);
    const clientBefore = process.cpuUsage();
    const daemonBefore = processCpu(daemon.pid);
    const many = await handOverChunked(client, binding, concurrent, concurrency);
    const clientCpu = process.cpuUsage(clientBefore);
    const daemonAfter = processCpu(daemon.pid);
    const per1000 = (seconds: number) => (seconds * 1000 * 1000) / many.count;
    context.progress(
      `  sequential ${formatNumber(one.perS, 0)}/s (p50 ${formatNumber(one.p50Us, 0)} µs, p99 ${formatNumber(one.p99Us, 0)} µs); ` +
        `${concurrency} at once ${formatNumber(many.perS, 0)}/s (p50 ${formatNumber(many.p50Us, 0)} µs, p99 ${formatNumber(many.p99Us, 0)} µs)`,
    );
    return {
      sequential: one,
      concurrent: many,
      cpuMsPer1000: {
        client: per1000((clientCpu.user + clientCpu.system) / 1e6),
        daemon: per1000(daemonAfter.user + daemonAfter.system - daemonBefore.user - daemonBefore.system),
      },
    };
  } finally {
    client.close();
    await stopChild(daemon.child);
  }
}

// ---------------------------------------------------------------------------------------------------
// 4. Idle scale

interface HeapProbe {
  usedHeapSize: number;
  totalHeapSize: number;
  mallocedMemory: number;
  external: number;
  arrayBuffers: number;
  rss: number;
}

interface IdleReading {
  heap: HeapProbe;
  rss: number;
  fds: number;
  slab: ReturnType<typeof slabTotals>;
  caches: Map<string, number> | null;
}

async function idleReading(daemon: Daemon): Promise<IdleReading> {
  process.kill(daemon.pid, 'SIGUSR2');
  const heap = await daemon.lines.wait((line) => (line.startsWith('heap ') ? (JSON.parse(line.slice(5)) as HeapProbe) : null), 15_000, 'the heap probe');
  // Slab first: listing /proc/<pid>/fd makes a proc inode and a dentry per fd, which would count as the relays' own.
  const slab = slabTotals();
  const caches = slabCaches();
  return { heap, rss: statusBytes(daemon.pid, 'VmRSS'), fds: openFdCount(daemon.pid), slab, caches };
}

interface IdleFigures {
  relays: number;
  handOverMs: number;
  rssPerRelayBytes: number;
  heapPerRelayBytes: number;
  externalPerRelayBytes: number;
  fdsPerRelay: number;
  /** Kernel slab per relay: everything (its 4 Unix sockets included), the sockets alone, and the rest. */
  slabPerRelayBytes: number;
  slabSocketsPerRelayBytes: number;
  slabSplicerPerRelayBytes: number;
  /** Epoll registrations (eventpoll_epi + eventpoll_pwq caches) per relay. */
  slabEpollPerRelayBytes: number;
  /** After all relays ended: what the daemon kept, per relay that was. */
  rssKeptPerRelayBytes: number;
  heapKeptPerRelayBytes: number;
  fdsKept: number;
  topSlabCaches: Array<{ cache: string; bytesPerRelay: number }>;
  daemonRssBytes: { before: number; loaded: number; after: number };
  daemonHeapBytes: { before: number; loaded: number; after: number };
  daemonFds: { before: number; loaded: number; after: number };
}

/** Ends idle relays by closing the far ends, `batch` at a time, and waits for their envelopes. */
async function endIdleRelays(binding: NativeBinding, peers: number[][], done: Array<Promise<{ a: number; b: number }>>, batch: number): Promise<void> {
  for (let i = 0; i < peers.length; i += batch) {
    for (const pair of peers.slice(i, i + batch)) binding.closeAll(pair);
    const relays = await Promise.all(done.slice(i, i + batch));
    for (const relay of relays) binding.closeAll([relay.a, relay.b]);
  }
}

async function idleRun(binding: NativeBinding, context: ThroughputContext): Promise<IdleFigures> {
  const { settings, dir } = context;
  const { relays, warmup, concurrency } = settings.idle;
  const daemon = await startDaemon(dir, settings, { probe: true });
  const client = new SplicerClient({ owner: `bench-idle-${process.pid}`, path: daemon.socket, sockets: 'fd', binding, reconnect: false });
  const peers: number[][] = [];
  const done: Array<Promise<{ a: number; b: number }>> = [];
  /** Makes `count` pairs of socket pairs: [a, b] to hand over, [farA, farB] kept here. */
  const makePairs = (count: number) =>
    Array.from({ length: count }, () => {
      const [a, farA] = binding.streamPair();
      const [b, farB] = binding.streamPair();
      return { a, b, far: [farA, farB] };
    });
  /** Hands pairs over, `concurrency` requests at a time; keeps the far ends and the envelopes to come. */
  const handOver = async (pairs: Array<{ a: number; b: number; far: number[] }>) => {
    let next = 0;
    const loop = async () => {
      while (next < pairs.length) {
        const pair = pairs[next++]!;
        peers.push(pair.far);
        const started = await client.start(pair.a, pair.b);
        done.push(started.done);
      }
    };
    await Promise.all(Array.from({ length: concurrency }, loop));
  };
  try {
    await client.connect();
    // Warm-up: the same path once, so the JIT and the engine's pipe pool are settled before the baseline.
    await handOver(makePairs(warmup));
    await endIdleRelays(binding, peers.splice(0), done.splice(0), 128);
    await sleep(300);
    const before = await idleReading(daemon);
    // The first half's sockets are made before any is handed over: the kernel's cost of the sockets alone.
    const firstHalf = Math.floor(relays / 2);
    const pairs = makePairs(firstHalf);
    const socketsOnly = slabTotals();
    let start = performance.now();
    await handOver(pairs);
    let handOverMs = performance.now() - start;
    const secondHalf = makePairs(relays - firstHalf);
    start = performance.now();
    await handOver(secondHalf);
    handOverMs += performance.now() - start;
    await sleep(500);
    const loaded = await idleReading(daemon);
    if (done.length !== relays) throw new Error(`idle: ${done.length} of ${relays} relays were accepted`);
    await endIdleRelays(binding, peers.splice(0), done.splice(0), 128);
    await sleep(300);
    const after = await idleReading(daemon);
    const per = (value: number) => value / relays;
    const slabAll = per(loaded.slab.slab - before.slab.slab);
    const slabSockets = (socketsOnly.slab - before.slab.slab) / firstHalf;
    const changes = before.caches && loaded.caches ? slabChanges(before.caches, loaded.caches, 8) : [];
    const epoll =
      before.caches && loaded.caches
        ? ['eventpoll_epi', 'eventpoll_pwq'].reduce((total, name) => total + (loaded.caches!.get(name) ?? 0) - (before.caches!.get(name) ?? 0), 0)
        : Number.NaN;
    const figures: IdleFigures = {
      relays,
      handOverMs,
      rssPerRelayBytes: per(loaded.rss - before.rss),
      heapPerRelayBytes: per(loaded.heap.usedHeapSize - before.heap.usedHeapSize),
      externalPerRelayBytes: per(loaded.heap.external - before.heap.external),
      fdsPerRelay: per(loaded.fds - before.fds),
      slabPerRelayBytes: slabAll,
      slabSocketsPerRelayBytes: slabSockets,
      slabSplicerPerRelayBytes: slabAll - slabSockets,
      slabEpollPerRelayBytes: per(epoll),
      rssKeptPerRelayBytes: per(after.rss - before.rss),
      heapKeptPerRelayBytes: per(after.heap.usedHeapSize - before.heap.usedHeapSize),
      fdsKept: after.fds - before.fds,
      topSlabCaches: changes.map(({ cache, bytes }) => ({ cache, bytesPerRelay: per(bytes) })),
      daemonRssBytes: { before: before.rss, loaded: loaded.rss, after: after.rss },
      daemonHeapBytes: { before: before.heap.usedHeapSize, loaded: loaded.heap.usedHeapSize, after: after.heap.usedHeapSize },
      daemonFds: { before: before.fds, loaded: loaded.fds, after: after.fds },
    };
    context.progress(
      `  ${relays} idle relays (handed over in ${formatNumber(handOverMs, 0)} ms): RSS ${formatNumber(figures.rssPerRelayBytes, 0)} B, ` +
        `heap ${formatNumber(figures.heapPerRelayBytes, 0)} B, fds ${formatNumber(figures.fdsPerRelay, 2)}, slab ${formatNumber(slabAll, 0)} B ` +
        `(sockets ${formatNumber(slabSockets, 0)} B, epoll ${formatNumber(figures.slabEpollPerRelayBytes, 0)} B) per relay`,
    );
    return figures;
  } finally {
    // Whatever is still open here (an error half-way) is closed; the daemon gets SIGTERM and then SIGKILL.
    for (const pair of peers) binding.closeAll(pair);
    client.close();
    await stopChild(daemon.child);
  }
}

// ---------------------------------------------------------------------------------------------------
// Run and report

/** Per-key medians of numeric figures (nested one level for `cpuMsPer1000` and the like). */
function medianFigures<T extends object>(runs: T[]): T {
  const first = runs[0] as Record<string, unknown>;
  const result: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(first)) {
    if (typeof value === 'number') result[key] = median(runs.map((run) => (run as Record<string, number>)[key]!));
    else if (value && typeof value === 'object' && !Array.isArray(value)) result[key] = medianFigures(runs.map((run) => (run as Record<string, object>)[key]!));
    else result[key] = value;
  }
  return result as T;
}

/** Rounds every number of a JSON-like value to 4 significant digits. */
function roundDeep<T>(value: T): T {
  if (typeof value === 'number') return round(value) as T;
  if (Array.isArray(value)) return value.map(roundDeep) as T;
  if (value && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([key, inner]) => [key, roundDeep(inner)])) as T;
  return value;
}

/** Turns NaN into null, so the JSON says "not measured" instead of a bogus 0 or a string. */
const orNull = (value: number): number | null => (Number.isFinite(value) ? value : null);

interface Goal {
  goal: string;
  value: number | null;
  target: number;
  /** null when a compared system was skipped. */
  met: boolean | null;
}

function goal(text: string, value: number | null, target: number, atLeast: boolean): Goal {
  const known = value !== null && Number.isFinite(value);
  return { goal: text, value: known ? value : null, target, met: known ? (atLeast ? value >= target : value <= target) : null };
}

export async function run(options: BenchOptions): Promise<Record<string, unknown>> {
  const settings = readSettings(process.env);
  const binding = loadNative();
  const started = performance.now();
  const fdsBefore = openFdCount('self');
  const { dir, remove } = tempDir();
  options.progress(
    `splicer: ${options.runs} alternating run(s) per section (${settings.sections.join(', ')})${settings.quick ? ', QUICK' : ''}, CPU placement: ${options.placement}`,
  );
  const tools = ensureTools(options.progress, { install: !['1', 'true'].includes(process.env.FDFERRY_BENCH_NO_INSTALL ?? '') });
  for (const [tool, found] of Object.entries(tools.found)) options.progress(`  ${tool}: ${found.path} (${found.version})`);
  const context: ThroughputContext = { settings, tools, placement: options.placement, dir, progress: options.progress };
  const skipped: Record<string, string> = {};
  const result: Record<string, unknown> = {
    benchmark: 'splicer',
    command: 'npm run bench -- splicer --json',
    runs: options.runs,
    quick: settings.quick,
    placement: options.placement,
    statistic: 'median over alternating runs',
    machine: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model ?? 'unknown', node: process.version, kernel: kernelRelease(), openFileLimit: openFileLimit() },
    tools: { found: tools.found, installed: tools.installed, missing: tools.missing },
    settings: {
      iperf3: `iperf3 -c 127.0.0.1 -t ${settings.iperfSeconds} -P <streams> -J (server: iperf3 -s -B 127.0.0.1)`,
      splicerDaemon: `fdferry splicer ${daemonArgs('<socket>', settings).slice(1).join(' ')}`,
      splicerPipeSize: settings.pipeSize ?? 'daemon default (262144)',
      splicerProxyReturnedSockets: settings.returned,
      haproxy:
        `mode tcp, option splice-request, option splice-response, nbthread ${settings.haproxyThreads ?? 'default (one per CPU)'}, ` +
        `tune.pipesize ${settings.haproxyPipeSize ?? 'default (the kernel pipe size, 64 KiB)'}`,
      socat: 'TCP-LISTEN:<port>,bind=127.0.0.1,fork,reuseaddr TCP:127.0.0.1:<upstream> (default 8 KiB buffer)',
      naiveNode: 'bench/lib/splicer-proxy.ts pipe: a.pipe(b); b.pipe(a)',
      setup: settings.setup,
      handover: settings.handover,
      idle: settings.idle,
    },
    skipped,
  };
  const perRun: Record<string, unknown> = {};
  try {
    // 1. Throughput
    if (settings.sections.includes('throughput')) {
      if (!tools.found.iperf3) {
        skipped.throughput = `iperf3 is not available: ${tools.missing.iperf3}`;
        options.progress(`throughput: SKIPPED, ${skipped.throughput}`);
      } else {
        const wanted = (system: string) => settings.systems === null || settings.systems.includes(system);
        const systems: string[] = [...(wanted('direct') ? ['direct'] : []), 'splicer', ...settings.exploredPipeSizes.map((size) => `splicer-pipe-${size}`)];
        for (const tool of ['socat', 'haproxy'] as const) {
          if (!wanted(tool)) continue;
          if (tools.found[tool]) systems.push(tool);
          else skipped[`throughput.${tool}`] = `${tool} is not available: ${tools.missing[tool]}`;
        }
        if (wanted('node')) systems.push('node');
        options.progress(`throughput: ${systems.join(', ')}; iperf3 -t ${settings.iperfSeconds}, ${settings.streams.join(' and ')} stream(s)`);
        const runs = await alternate(systems, options.runs, async (system, runIndex) => {
          if (system === systems[runIndex % systems.length]) options.progress(`run ${runIndex + 1}/${options.runs}`);
          return throughputRun(system, context);
        });
        perRun.throughput = roundDeep(runs);
        const medians: Record<string, Record<string, StreamFigures>> = {};
        for (const system of systems) medians[system] = Object.fromEntries(settings.streams.map((s) => [`streams${s}`, medianFigures(runs[system]!.map((r) => r[`streams${s}`]!))]));
        const throughput: Record<string, unknown> = {};
        const ratios: Record<string, unknown> = {};
        for (const streams of settings.streams) {
          const key = `streams${streams}`;
          throughput[key] = Object.fromEntries(
            systems.map((system) => {
              const f = medians[system]![key]!;
              return [
                system,
                {
                  gbps: f.gbps,
                  gibMoved: f.gib,
                  retransmits: f.retransmits,
                  relayCpuSPerGiB: orNull(f.cpuSPerGiB),
                  relayUserSPerGiB: orNull(f.userSPerGiB),
                  relaySysSPerGiB: orNull(f.sysSPerGiB),
                  ...(system.startsWith('splicer') ? { daemonCpuSPerGiB: orNull(f.daemonCpuSPerGiB) } : {}),
                  relayContextSwitchesPerGiB: orNull(f.switchesPerGiB),
                  machineCpuSPerGiB: f.machineCpuSPerGiB,
                },
              ];
            }),
          );
          const keyRatios: Record<string, unknown> = {};
          for (const variant of systems.filter((system) => system.startsWith('splicer'))) {
            const splicer = medians[variant]![key]!;
            const against = (other: string) => {
              const f = medians[other]?.[key];
              return f
                ? {
                    gbps: orNull(ratio(splicer.gbps, f.gbps)),
                    relayCpuSPerGiB: orNull(ratio(splicer.cpuSPerGiB, f.cpuSPerGiB)),
                    machineCpuSPerGiB: orNull(ratio(splicer.machineCpuSPerGiB, f.machineCpuSPerGiB)),
                  }
                : null;
            };
            for (const other of ['haproxy', 'socat', 'node']) keyRatios[`${variant}/${other}`] = against(other);
            keyRatios[`${variant}/direct`] = medians.direct ? { gbps: orNull(ratio(splicer.gbps, medians.direct[key]!.gbps)) } : null;
          }
          ratios[key] = keyRatios;
        }
        result.throughput = roundDeep(throughput);
        result.throughputRatios = roundDeep(ratios);
      }
    }

    // 2. Set-up: short connections
    if (settings.sections.includes('setup')) {
      const systems: SetupSystem[] = SETUP_SYSTEMS.filter((system) => system !== 'haproxy' || tools.found.haproxy);
      if (!tools.found.haproxy) skipped['setup.haproxy'] = `haproxy is not available: ${tools.missing.haproxy}`;
      const { concurrency, measureMs } = settings.setup;
      options.progress(`setup: short connections (connect, 1 byte each way, close), ${concurrency} at once for ${measureMs} ms: ${systems.join(', ')}`);
      const runs = await alternate(systems, options.runs, async (system, runIndex) => {
        if (system === systems[runIndex % systems.length]) options.progress(`run ${runIndex + 1}/${options.runs}`);
        return setupRun(system, context);
      });
      perRun.setup = roundDeep(runs);
      const medians = Object.fromEntries(systems.map((system) => [system, medianFigures(runs[system])])) as Record<SetupSystem, SetupFigures>;
      result.setup = roundDeep({
        ...medians,
        ratios: {
          'splicer/pipe': { connectionsPerS: ratio(medians.splicer.connectionsPerS, medians.pipe.connectionsPerS) },
          'splicer/haproxy': medians.haproxy ? { connectionsPerS: ratio(medians.splicer.connectionsPerS, medians.haproxy.connectionsPerS) } : null,
        },
      });
    }

    // 3. Raw hand-over
    if (settings.sections.includes('handover')) {
      const { sequential, concurrent, concurrency } = settings.handover;
      options.progress(`handover: ready-made Unix socket pairs, hand over + 1 byte each way + envelope back: ${sequential} one at a time, ${concurrent} with ${concurrency} at once`);
      const runs = await alternate(['splicer'], options.runs, async (_system, runIndex) => {
        options.progress(`run ${runIndex + 1}/${options.runs}`);
        return handoverRun(binding, context);
      });
      perRun.handover = roundDeep(runs.splicer);
      result.handover = roundDeep(medianFigures(runs.splicer));
    }

    // 4. Idle scale
    if (settings.sections.includes('idle')) {
      // This process holds 2 fds per relay, and 4 per relay of the half being made; the daemon 2 per relay.
      const limit = Math.min(openFileLimit() ?? 1024, 20_000);
      const fits = Math.floor((limit - openFdCount('self') - 300) / 3);
      if (fits < settings.idle.relays) {
        options.progress(`idle: only ${fits} relays fit this process's open-file limit (${limit}); measuring ${fits} instead of ${settings.idle.relays}`);
        skipped['idle.relays'] = `${fits} idle relays instead of ${settings.idle.relays}: the open-file limit is ${limit}`;
        settings.idle.relays = fits;
      }
      options.progress(`idle: ${settings.idle.relays} idle relays (Unix socket pairs; the far ends stay here)`);
      const runs = await alternate(['splicer'], options.runs, async (_system, runIndex) => {
        options.progress(`run ${runIndex + 1}/${options.runs}`);
        return idleRun(binding, context);
      });
      perRun.idle = roundDeep(runs.splicer.map(({ topSlabCaches: _top, ...figures }) => figures));
      const medians = medianFigures(runs.splicer.map(({ topSlabCaches: _top, ...figures }) => figures));
      result.idle = roundDeep({
        ...medians,
        heapNote: 'used V8 heap after a full GC (bench/lib/splicer-daemon.ts probe, SIGUSR2), loaded minus before, per relay',
        topSlabCaches: runs.splicer[Math.floor(runs.splicer.length / 2)]!.topSlabCaches,
      });
    }
  } finally {
    remove();
  }

  result.goals = roundDeep(goals(result));
  result.perRun = perRun;
  result.leakedFds = openFdCount('self') - fdsBefore;
  result.elapsedS = round((performance.now() - started) / 1000, 3);
  return result;
}

type Ratios = Record<string, Record<string, { gbps: number | null; relayCpuSPerGiB?: number | null; machineCpuSPerGiB?: number | null } | null>>;

function goals(result: Record<string, unknown>): Goal[] {
  const list: Goal[] = [];
  const ratios = result.throughputRatios as Ratios | undefined;
  if (ratios) {
    const variants = [...new Set(Object.values(ratios).flatMap((keyRatios) => Object.keys(keyRatios).map((name) => name.split('/')[0]!)))];
    for (const variant of variants) {
      const who = variant === 'splicer' ? 'Splicer' : `Splicer --pipe-size ${variant.slice('splicer-pipe-'.length)}`;
      for (const key of Object.keys(ratios)) {
        const label = key.replace('streams', '') === '1' ? '1 stream' : `${key.replace('streams', '')} streams`;
        const r = ratios[key]!;
        list.push(goal(`throughput >= HAProxy (splice), ${label}: ${who}/HAProxy Gbit/s`, r[`${variant}/haproxy`]?.gbps ?? null, 1, true));
        list.push(goal(`throughput >= 1.5x socat, ${label}: ${who}/socat Gbit/s`, r[`${variant}/socat`]?.gbps ?? null, 1.5, true));
        list.push(goal(`throughput >= 1.5x naive Node relay, ${label}: ${who}/node Gbit/s`, r[`${variant}/node`]?.gbps ?? null, 1.5, true));
        list.push(goal(`relay CPU per GiB < HAProxy's, ${label}: ${who}/HAProxy relay CPU s per GiB (below 1)`, r[`${variant}/haproxy`]?.relayCpuSPerGiB ?? null, 1, false));
      }
    }
  }
  const setup = result.setup as { ratios: { 'splicer/pipe': { connectionsPerS: number } } } | undefined;
  if (setup) list.push(goal('short connections through the Splicer proxy >= 0.8x the same proxy relaying with pipe()', setup.ratios['splicer/pipe'].connectionsPerS, 0.8, true));
  const handover = result.handover as HandoverFigures | undefined;
  if (handover) list.push(goal(`raw hand-overs per second >= 10,000 (${handover.concurrent.concurrency} at once)`, handover.concurrent.perS, 10_000, true));
  const idle = result.idle as IdleFigures | undefined;
  if (idle) {
    list.push(goal('JS heap per idle relay <= 2 KiB (bytes)', idle.heapPerRelayBytes, 2048, false));
    list.push(goal('open fds per idle relay <= 2', idle.fdsPerRelay, 2, false));
  }
  // A goal is only settled when strictly below for "below HAProxy's".
  for (const item of list) if (item.goal.startsWith('relay CPU') && item.value !== null) item.met = item.value < 1;
  return list;
}

// ---------------------------------------------------------------------------------------------------
// Table

const num = (value: unknown, digits = 1): string => (typeof value === 'number' && Number.isFinite(value) ? formatNumber(value, digits) : '-');

export function formatTable(result: Record<string, unknown>): string {
  const out: string[] = [];
  const machine = result.machine as { cpus: number; node: string; kernel: string };
  out.push(
    `Splicer: median of ${String(result.runs)} alternating runs${result.quick ? ' (QUICK)' : ''} (Node ${machine.node}, ${machine.cpus} CPUs, Linux ${machine.kernel}, --pin ${String(result.placement)})`,
  );
  const skipped = result.skipped as Record<string, string>;
  for (const [what, why] of Object.entries(skipped)) out.push(`SKIPPED ${what}: ${why}`);
  const throughput = result.throughput as Record<string, Record<string, Record<string, number | null>>> | undefined;
  if (throughput) {
    const keys = Object.keys(throughput);
    const systems = Object.keys(throughput[keys[0]!]!);
    const rows: string[][] = [['throughput (iperf3 via the relay)', ...systems]];
    for (const key of keys) {
      const label = key === 'streams1' ? '1 stream' : `${key.replace('streams', '')} streams`;
      rows.push([`${label}: Gbit/s`, ...systems.map((s) => num(throughput[key]![s]!.gbps, 2))]);
      rows.push([`${label}: relay CPU s/GiB`, ...systems.map((s) => num(throughput[key]![s]!.relayCpuSPerGiB, 3))]);
      rows.push([`${label}:   user / sys`, ...systems.map((s) => (throughput[key]![s]!.relayCpuSPerGiB === null ? '-' : `${num(throughput[key]![s]!.relayUserSPerGiB, 3)}/${num(throughput[key]![s]!.relaySysSPerGiB, 3)}`))]);
      rows.push([`${label}: relay ctx switches/GiB`, ...systems.map((s) => num(throughput[key]![s]!.relayContextSwitchesPerGiB, 0))]);
      rows.push([`${label}: machine CPU s/GiB`, ...systems.map((s) => num(throughput[key]![s]!.machineCpuSPerGiB, 3))]);
    }
    out.push('', textTable(rows));
    const ratios = result.throughputRatios as Ratios;
    for (const variant of systems.filter((system) => system.startsWith('splicer'))) {
      const ratioRows: string[][] = [[`${variant} / ...`, 'haproxy', 'socat', 'node']];
      for (const key of keys) {
        const label = key === 'streams1' ? '1 stream' : `${key.replace('streams', '')} streams`;
        const r = ratios[key]!;
        ratioRows.push([`${label}: Gbit/s`, ...['haproxy', 'socat', 'node'].map((o) => num(r[`${variant}/${o}`]?.gbps, 2))]);
        ratioRows.push([`${label}: relay CPU s/GiB`, ...['haproxy', 'socat', 'node'].map((o) => num(r[`${variant}/${o}`]?.relayCpuSPerGiB, 2))]);
        ratioRows.push([`${label}: machine CPU s/GiB`, ...['haproxy', 'socat', 'node'].map((o) => num(r[`${variant}/${o}`]?.machineCpuSPerGiB, 2))]);
      }
      out.push('', textTable(ratioRows));
    }
  }
  const setup = result.setup as Record<string, SetupFigures> | undefined;
  if (setup) {
    const systems = Object.keys(setup).filter((key) => key !== 'ratios');
    const rows: string[][] = [['short connections', ...systems.map((s) => (s === 'pipe' ? 'pipe proxy' : s === 'splicer' ? 'splicer proxy' : s))]];
    rows.push(['connections/s', ...systems.map((s) => num(setup[s]!.connectionsPerS, 0))]);
    rows.push(['p50 (ms)', ...systems.map((s) => num(setup[s]!.p50Ms, 2))]);
    rows.push(['p99 (ms)', ...systems.map((s) => num(setup[s]!.p99Ms, 2))]);
    const parts = [...new Set(systems.flatMap((s) => Object.keys(setup[s]!.cpuMsPer1000)))];
    for (const part of parts) rows.push([`CPU ms / 1,000: ${part}`, ...systems.map((s) => num(setup[s]!.cpuMsPer1000[part], 0))]);
    out.push('', textTable(rows));
  }
  const handover = result.handover as HandoverFigures | undefined;
  if (handover) {
    const rows: string[][] = [['raw hand-over', 'per second', 'p50 (µs)', 'p99 (µs)']];
    for (const series of [handover.sequential, handover.concurrent]) {
      rows.push([series.concurrency === 1 ? 'one at a time' : `${series.concurrency} at once`, num(series.perS, 0), num(series.p50Us, 0), num(series.p99Us, 0)]);
    }
    out.push('', textTable(rows), `CPU per 1,000 hand-overs (${handover.concurrent.concurrency} at once): client ${num(handover.cpuMsPer1000.client, 0)} ms, daemon ${num(handover.cpuMsPer1000.daemon, 0)} ms`);
  }
  const idle = result.idle as IdleFigures | undefined;
  if (idle) {
    const rows: string[][] = [[`${formatNumber(idle.relays, 0)} idle relays`, 'per relay']];
    rows.push(['daemon RSS (bytes)', num(idle.rssPerRelayBytes, 0)]);
    rows.push(['daemon JS heap (bytes)', num(idle.heapPerRelayBytes, 0)]);
    rows.push(['daemon open fds', num(idle.fdsPerRelay, 2)]);
    rows.push(['kernel slab, all (bytes)', num(idle.slabPerRelayBytes, 0)]);
    rows.push(['  its 4 Unix sockets (bytes)', num(idle.slabSocketsPerRelayBytes, 0)]);
    rows.push(['  the rest (bytes)', num(idle.slabSplicerPerRelayBytes, 0)]);
    rows.push(['  epoll entries (bytes)', num(idle.slabEpollPerRelayBytes, 0)]);
    out.push('', textTable(rows), `hand-over of all ${formatNumber(idle.relays, 0)}: ${num(idle.handOverMs, 0)} ms`);
  }
  const goalList = result.goals as Goal[];
  if (goalList.length) {
    out.push('', 'goals:');
    for (const item of goalList) out.push(`  ${item.met === null ? 'n/a ' : item.met ? 'MET ' : 'MISS'} ${item.goal}: ${num(item.value, 2)} (target ${num(item.target, 2)})`);
  }
  return out.join('\n');
}

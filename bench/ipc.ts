/**
 * IPC benchmark: fdferry protocol v1 against Node's built-in handle passing.
 *
 *   npm run bench -- ipc [--json] [--runs N] [--pin none|same|split]
 *
 * Both systems pass the same kind of fd (dups of one end of an AF_UNIX stream socketpair) from this
 * process to a child process, which closes them and answers:
 *
 * - fdferry: a child running `RpcServer` on the real addon (bench/lib/ipc-server.ts, silent logger) with
 *   a `take` method (0–253 fds of kind `any`, closed, reply `{n}`); this process calls
 *   `RpcClient.request('take', {}, fds)`. One request carries all its fds in one message.
 * - node: a child started with `child_process.fork` (bench/lib/node-ipc-child.ts); this process calls
 *   `child.send(message, socket)`. Node carries at most one handle per message, so a request with k fds
 *   is k messages (a plain message for 0 fds), the last one asking for the answer; Node itself waits for
 *   the child's internal acknowledgement of each handle before sending the next.
 *
 * Per request the fds are made before the clock starts (a `dup` each, plus wrapping in a `net.Socket` for
 * Node); the clock covers sending, the child's work, the answer, and the sender closing its copies. The
 * systems run alternately (fdferry, node, then node, fdferry, ...), each run in fresh child processes
 * after a warm-up, and every figure is the median over the runs.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { loadNative, type NativeBinding } from '../lib/native.js';
import { MAX_FDS_PER_MESSAGE, PROTOCOL_VERSION } from '../lib/protocol/frame.js';
import { RpcClient } from '../lib/rpc/client.js';
import { alternate } from './lib/alternate.js';
import { formatNumber, textTable, type BenchOptions } from './lib/bench.js';
import { forkTs, spawnTs, stopChild, waitForLine, waitForMessage } from './lib/process.js';
import { median, medianOfRuns, ratio, round, summariseLatencies, type LatencySummary } from './lib/stats.js';

export const description = 'fdferry protocol v1 vs Node fork()+send(message, socket): req/s, p50/p99 round trip with 0, 2, 253 fds; 10,000 fds';
export const defaultRuns = 5;

const SYSTEMS = ['fdferry', 'node'] as const;
type System = (typeof SYSTEMS)[number];

/**
 * The round-trip cases: fds per request, requests timed, and requests sent first, untimed, to warm up
 * both processes. Every case is warmed before the first is timed. fdferry's JavaScript path needs a few
 * thousand requests before V8 has optimised it (Node's IPC is mostly built in), hence 5,000.
 */
const CASES = [
  { key: 'fds0', fds: 0, requests: 2_000, warmup: 3_000 },
  { key: 'fds2', fds: 2, requests: 2_000, warmup: 2_000 },
  { key: 'fds253', fds: MAX_FDS_PER_MESSAGE, requests: 200, warmup: 20 },
] as const;
type CaseKey = (typeof CASES)[number]['key'];

/**
 * The bulk case: this many fds in batches of at most `batch`, one batch after the other (each waits for
 * its answer), for both systems: a batch is one fdferry request, or `batch` Node messages. fdferry also
 * sends the same batches pipelined (all requests at once; the protocol allows 64 in flight). Node has no
 * pipelined variant: it sends one handle at a time anyway, and firing all 10,000 `send`s at once is
 * several times slower than batching, because each handle's acknowledgement re-queues every handle
 * still waiting (quadratic in the backlog).
 */
const TRANSFER = { fds: 10_000, batch: MAX_FDS_PER_MESSAGE };

/** One system's side. `B` is what one request carries (fds, or net.Sockets). */
interface Harness<B> {
  /** Makes `count` fresh fds ready to send; not timed. */
  prepare(count: number): B;
  /** Sends one request and waits for its answer; timed. */
  roundTrip(batch: B): Promise<void>;
  /** Sends every batch at once (pipelined) and waits until all are answered; timed. */
  pipelined?(batches: B[]): Promise<void>;
  /** Closes a prepared batch that was not sent. */
  discard(batch: B): void;
  /** Stops the child (by pid) and closes what the harness holds. */
  close(): Promise<void>;
}

/** What one run of one system measured. */
interface RunFigures {
  cases: Record<CaseKey, LatencySummary>;
  transferMs: number;
  /** fdferry only. */
  pipelinedMs: number | null;
}

function expectCount(system: System, got: unknown, wanted: number): void {
  if (got !== wanted) throw new Error(`${system}: the child reports ${String(got)} fds, ${wanted} were sent`);
}

async function startFdferry(binding: NativeBinding, run: number): Promise<Harness<number[]>> {
  const address = `@fdferry-bench-ipc-${process.pid}-${run}`;
  const child = spawnTs('bench/lib/ipc-server.ts', [address]);
  const [source, peer] = binding.streamPair();
  let client: RpcClient | null = null;
  try {
    await waitForLine(child, 'ready');
    client = new RpcClient({ path: address, owner: 'bench', binding, reconnect: false });
    await client.connect();
  } catch (error) {
    client?.close();
    binding.closeAll([source, peer]);
    await stopChild(child);
    throw error;
  }
  const connected = client;
  // A rejected request hands its fds back on the error: close them before passing the error on.
  const take = async (fds: number[]): Promise<number> => {
    try {
      const reply = await connected.request('take', {}, fds);
      return reply.result.n as number;
    } catch (error) {
      binding.closeAll((error as { fds?: number[] }).fds ?? []);
      throw error;
    }
  };
  return {
    prepare: (count) => Array.from({ length: count }, () => binding.dup(source)),
    async roundTrip(fds) {
      expectCount('fdferry', await take(fds), fds.length);
    },
    async pipelined(batches) {
      const counts = await Promise.all(batches.map(take));
      expectCount('fdferry', counts.reduce((a, b) => a + b, 0), batches.reduce((n, fds) => n + fds.length, 0));
    },
    discard: (fds) => binding.closeAll(fds),
    async close() {
      connected.close();
      binding.closeAll([source, peer]);
      await stopChild(child);
    },
  };
}

async function startNode(binding: NativeBinding): Promise<Harness<net.Socket[]>> {
  const child = forkTs('bench/lib/node-ipc-child.ts');
  const [source, peer] = binding.streamPair();
  const waiting = new Map<number, { resolve: (n: number) => void; reject: (error: Error) => void }>();
  const failAll = (error: Error) => {
    for (const waiter of waiting.values()) waiter.reject(error);
    waiting.clear();
  };
  child.on('message', (message: { id?: number; n?: number }) => {
    if (typeof message.id !== 'number') return;
    const waiter = waiting.get(message.id);
    waiting.delete(message.id);
    waiter?.resolve(message.n ?? -1);
  });
  child.on('error', failAll);
  child.on('exit', (code, signal) => failAll(new Error(`node: the child exited (${signal ?? code})`)));
  try {
    await waitForMessage(child, (message) => (message as { ready?: boolean }).ready === true);
  } catch (error) {
    binding.closeAll([source, peer]);
    await stopChild(child);
    throw error;
  }
  let nextId = 0;
  /** One message per handle (a plain message when there are none); the last asks for the answer. */
  const exchange = (sockets: net.Socket[]): Promise<number> => {
    const id = ++nextId;
    const answer = new Promise<number>((resolve, reject) => waiting.set(id, { resolve, reject }));
    if (sockets.length === 0) child.send({ id, last: true });
    for (let i = 0; i < sockets.length; i++) child.send({ id, last: i === sockets.length - 1 }, sockets[i]);
    return answer;
  };
  return {
    prepare: (count) => Array.from({ length: count }, () => new net.Socket({ fd: binding.dup(source) })),
    async roundTrip(sockets) {
      expectCount('node', await exchange(sockets), sockets.length);
    },
    discard: (sockets) => sockets.forEach((socket) => socket.destroy()),
    async close() {
      binding.closeAll([source, peer]);
      await stopChild(child);
    },
  };
}

async function measure<B>(system: System, harness: Harness<B>, progress: (line: string) => void): Promise<RunFigures> {
  const timeRequests = async (fds: number, count: number): Promise<number[]> => {
    const samples: number[] = [];
    for (let i = 0; i < count; i++) {
      const batch = harness.prepare(fds);
      const start = performance.now();
      await harness.roundTrip(batch);
      samples.push(performance.now() - start);
    }
    return samples;
  };
  for (const { fds, warmup } of CASES) await timeRequests(fds, warmup);
  const cases = {} as Record<CaseKey, LatencySummary>;
  for (const { key, fds, requests } of CASES) cases[key] = summariseLatencies(await timeRequests(fds, requests));
  const prepareTransfer = (): B[] => {
    const batches: B[] = [];
    try {
      for (let left = TRANSFER.fds; left > 0; left -= TRANSFER.batch) batches.push(harness.prepare(Math.min(left, TRANSFER.batch)));
    } catch (error) {
      batches.forEach((batch) => harness.discard(batch));
      throw error;
    }
    return batches;
  };
  let batches = prepareTransfer();
  let start = performance.now();
  for (const batch of batches) await harness.roundTrip(batch);
  const transferMs = performance.now() - start;
  let pipelinedMs: number | null = null;
  if (harness.pipelined) {
    batches = prepareTransfer();
    start = performance.now();
    await harness.pipelined(batches);
    pipelinedMs = performance.now() - start;
  }
  progress(
    `  ${system.padEnd(7)} ${CASES.map(({ key }) => `${key} ${formatNumber(cases[key].rps, 0)} req/s`).join(', ')}, ` +
      `10k fds ${formatNumber(transferMs)} ms${pipelinedMs === null ? '' : ` (pipelined ${formatNumber(pipelinedMs)} ms)`}`,
  );
  return { cases, transferMs, pipelinedMs };
}

/** Open fds of this process, to catch a leak between runs. */
function openFds(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/** `Max open files` (soft) of this process, from /proc/self/limits. */
function openFileLimit(): number | null {
  const match = /^Max open files\s+(\d+)/m.exec(fs.readFileSync('/proc/self/limits', 'utf8'));
  return match ? Number(match[1]) : null;
}

const roundAll = (figures: Record<string, number>): Record<string, number> =>
  Object.fromEntries(Object.entries(figures).map(([key, value]) => [key, round(value)]));

export async function run(options: BenchOptions): Promise<Record<string, unknown>> {
  const binding = loadNative();
  const started = performance.now();
  const fdsBefore = openFds();
  options.progress(`ipc: ${options.runs} alternating run(s) of ${SYSTEMS.join(' and ')}, CPU placement: ${options.placement}`);
  const perRun = await alternate(SYSTEMS, options.runs, async (system, runIndex) => {
    options.progress(`run ${runIndex + 1}/${options.runs}: ${system}`);
    const before = openFds();
    const harness = system === 'fdferry' ? await startFdferry(binding, runIndex) : await startNode(binding);
    let figures: RunFigures;
    try {
      figures = await measure(system, harness as Harness<unknown>, options.progress);
    } finally {
      await harness.close();
    }
    const after = openFds();
    if (after > before) options.progress(`  warning: ${after - before} more fds open after the ${system} run`);
    return figures;
  });

  const cases: Record<string, unknown> = {};
  for (const { key, fds, requests, warmup } of CASES) {
    const fdferry = medianOfRuns(perRun.fdferry.map((figures) => figures.cases[key]));
    const node = medianOfRuns(perRun.node.map((figures) => figures.cases[key]));
    cases[key] = {
      fds,
      requests,
      warmup,
      nodeMessagesPerRequest: Math.max(1, fds),
      fdferry: roundAll({ ...fdferry }),
      node: roundAll({ ...node }),
      ratio: roundAll({ rps: ratio(fdferry.rps, node.rps), p50Us: ratio(fdferry.p50Us, node.p50Us), p99Us: ratio(fdferry.p99Us, node.p99Us) }),
    };
  }
  const transfer = {
    fdferry: medianOfRuns(perRun.fdferry.map(({ transferMs }) => ({ totalMs: transferMs }))),
    node: medianOfRuns(perRun.node.map(({ transferMs }) => ({ totalMs: transferMs }))),
  };
  const leaked = openFds() - fdsBefore;
  return {
    benchmark: 'ipc',
    protocol: PROTOCOL_VERSION,
    runs: options.runs,
    placement: options.placement,
    statistic: 'median over runs; within a run rps = requests / sum of round trips, p50/p99 of the round trips',
    machine: { cpus: os.cpus().length, node: process.version, openFileLimit: openFileLimit() },
    cases,
    fds10000: {
      fds: TRANSFER.fds,
      fdferryRequests: Math.ceil(TRANSFER.fds / TRANSFER.batch),
      fdsPerRequest: TRANSFER.batch,
      nodeMessages: TRANSFER.fds,
      order: 'batches one after the other, each waiting for its answer',
      fdferry: roundAll(transfer.fdferry),
      node: roundAll(transfer.node),
      ratio: { totalMs: round(ratio(transfer.fdferry.totalMs, transfer.node.totalMs)) },
      fdferryPipelined: { totalMs: round(median(perRun.fdferry.map(({ pipelinedMs }) => pipelinedMs ?? Number.NaN))) },
    },
    perRun: Object.fromEntries(
      SYSTEMS.map((system) => [
        system,
        perRun[system].map((figures) => ({
          ...Object.fromEntries(CASES.map(({ key }) => [key, roundAll({ ...figures.cases[key] })])),
          fds10000Ms: round(figures.transferMs),
          ...(figures.pipelinedMs === null ? {} : { fds10000PipelinedMs: round(figures.pipelinedMs) }),
        })),
      ]),
    ),
    leakedFds: leaked,
    elapsedS: round((performance.now() - started) / 1000, 3),
  };
}

interface Figures {
  rps: number;
  p50Us: number;
  p99Us: number;
}
interface CaseResult {
  fds: number;
  fdferry: Figures;
  node: Figures;
  ratio: Figures;
}

/** The readable table of a result of {@link run}. */
export function formatTable(result: Record<string, unknown>): string {
  const cases = result.cases as Record<CaseKey, CaseResult>;
  const bulk = result.fds10000 as {
    fdferry: { totalMs: number };
    node: { totalMs: number };
    ratio: { totalMs: number };
    fdferryPipelined: { totalMs: number };
  };
  const machine = result.machine as { cpus: number; node: string };
  const placement = String(result.placement);
  const rows: string[][] = [['', 'fdferry', 'node', 'fdferry/node']];
  for (const { key, fds } of CASES) {
    const { fdferry, node, ratio: r } = cases[key];
    const label = `${fds} fds`;
    rows.push([`${label}: requests/s`, formatNumber(fdferry.rps, 0), formatNumber(node.rps, 0), r.rps.toFixed(2)]);
    rows.push([`${label}: p50 round trip (µs)`, formatNumber(fdferry.p50Us), formatNumber(node.p50Us), r.p50Us.toFixed(2)]);
    rows.push([`${label}: p99 round trip (µs)`, formatNumber(fdferry.p99Us), formatNumber(node.p99Us), r.p99Us.toFixed(2)]);
  }
  rows.push([
    `10,000 fds, 40 batches (ms)`,
    formatNumber(bulk.fdferry.totalMs),
    formatNumber(bulk.node.totalMs),
    bulk.ratio.totalMs.toFixed(2),
  ]);
  rows.push(['10,000 fds, pipelined (ms)', formatNumber(bulk.fdferryPipelined.totalMs), '-', '-']);
  return [
    `IPC, protocol v1: median of ${String(result.runs)} alternating runs (Node ${machine.node}, ${machine.cpus} CPUs, --pin ${placement})`,
    textTable(rows),
    'node = child_process.fork + send(message, net.Socket): one handle per message (k fds = k messages);',
    'fdferry = one request per batch of up to 253 fds (10,000 fds = 40 requests; node: 40 batches of up to 253 messages).',
  ].join('\n');
}

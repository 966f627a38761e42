/**
 * The load generator of the Bumblebee benchmark, run inside a client network namespace (the Bumblebee
 * client namespace, whose default route is the on-ramp's tun, or the veth baseline's client namespace):
 *
 *   ip netns exec <ns> node --import tsx bench/lib/bumblebee-load.ts <target address>
 *
 * It prints `{"ready":true}`, then takes one JSON command per stdin line and answers each with one JSON
 * line on stdout, one command at a time (the servers behind the ports: bench/lib/bumblebee-serve.ts):
 *
 *   {"op":"upgrades","port":P,"concurrency":C,"count":N,"ms":T}
 *       short connections, C at once, until N have started or T ms have passed (those started finish):
 *       connect, write 1 byte, read it back, end(), wait for the server's FIN (the socket's `close`).
 *       Answers the rate (completed / wall time from the first connect to the last close) and latency
 *       percentiles of the whole connection, of connect() alone and of connect-to-echo.
 *   {"op":"upload","port":P,"ms":T}      one connection writes 256 KiB buffers for T ms, then end(); done at
 *                                        the server's FIN, which it sends only after reading every byte
 *   {"op":"download","port":P,"ms":T}    one connection reads for T ms, then sends 1 byte ("stop") and reads
 *                                        until the server's FIN
 *   {"op":"both","upload":P,"download":Q,"ms":T}   both at once, one connection each
 *   {"op":"exit"}
 *
 * Every answer carries the namespace's TCP counters over the command (/proc/self/net/snmp is this
 * namespace's): segments out (counted per MSS-sized segment even when GSO sends them as one packet) and in
 * (counted per received packet: a GRO bundle counts once), retransmissions, resets, failed connection
 * attempts. The client always closes first, so TIME_WAIT sockets
 * stay in this namespace; the caller uses one port per phase and a fresh namespace per run.
 */
import fs from 'node:fs';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import readline from 'node:readline';

const host = process.argv[2];
if (!host || net.isIP(host) === 0) {
  process.stderr.write('usage: bumblebee-load.ts <target address>\n');
  process.exit(2);
}

const ONE = Buffer.from('x');
const CHUNK = Buffer.alloc(256 * 1024, 0xa5);
/** A connection of an upgrade phase that has not closed after this long is abandoned and counted as failed. */
const CONNECTION_TIMEOUT_MS = 5_000;

// ---------------------------------------------------------------------------------------------------
// TCP counters of this namespace

type TcpCounters = Record<string, number>;

function tcpCounters(): TcpCounters {
  const lines = fs.readFileSync('/proc/self/net/snmp', 'utf8').split('\n').filter((line) => line.startsWith('Tcp:'));
  const names = lines[0]!.split(/\s+/).slice(1);
  const values = lines[1]!.split(/\s+/).slice(1).map(Number);
  return Object.fromEntries(names.map((name, i) => [name, values[i]!]));
}

function tcpDelta(before: TcpCounters, after: TcpCounters) {
  const d = (name: string) => (after[name] ?? 0) - (before[name] ?? 0);
  return {
    inSegs: d('InSegs'),
    outSegs: d('OutSegs'),
    retransSegs: d('RetransSegs'),
    outRsts: d('OutRsts'),
    attemptFails: d('AttemptFails'),
    estabResets: d('EstabResets'),
    activeOpens: d('ActiveOpens'),
  };
}

// ---------------------------------------------------------------------------------------------------
// Statistics

function quantiles(samples: Float64Array, count: number) {
  if (count === 0) return { p50: null, p90: null, p99: null, max: null, mean: null };
  const sorted = Float64Array.from(samples.subarray(0, count)).sort();
  const at = (p: number) => {
    const rank = (p / 100) * (count - 1);
    const low = Math.floor(rank);
    const high = Math.ceil(rank);
    return sorted[low]! + (sorted[high]! - sorted[low]!) * (rank - low);
  };
  let total = 0;
  for (let i = 0; i < count; i++) total += sorted[i]!;
  return { p50: at(50), p90: at(90), p99: at(99), max: sorted[count - 1]!, mean: total / count };
}

// ---------------------------------------------------------------------------------------------------
// Upgrades: short connections

function upgrades(port: number, concurrency: number, count: number, ms: number): Promise<Record<string, unknown>> {
  const total = new Float64Array(count);
  const connect = new Float64Array(count);
  const echo = new Float64Array(count);
  const errors: Record<string, number> = {};
  let started = 0;
  let completed = 0;
  let failed = 0;
  let active = 0;
  const t0 = performance.now();
  const deadline = t0 + ms;
  let lastEnd = t0;

  return new Promise((resolve) => {
    const fail = (code: string) => {
      failed++;
      errors[code] = (errors[code] ?? 0) + 1;
    };
    const next = () => {
      while (active < concurrency && started < count && performance.now() < deadline) {
        started++;
        active++;
        one();
      }
      if (active === 0) {
        resolve({
          started,
          completed,
          failed,
          errors,
          elapsedMs: lastEnd - t0,
          perS: completed / ((lastEnd - t0) / 1000),
          totalMs: quantiles(total, completed),
          connectMs: quantiles(connect, completed),
          echoMs: quantiles(echo, completed),
        });
      }
    };
    const one = () => {
      const begin = performance.now();
      let connected = 0;
      let echoed = 0;
      let settled = false;
      const socket = net.connect({ host, port });
      const timer = setTimeout(() => {
        if (settled) return;
        settled = true;
        fail(connected === 0 ? 'connect-timeout' : echoed === 0 ? 'echo-timeout' : 'close-timeout');
        socket.destroy();
        active--;
        next();
      }, CONNECTION_TIMEOUT_MS);
      socket.setNoDelay(true);
      socket.once('connect', () => {
        connected = performance.now();
        socket.write(ONE);
      });
      socket.once('data', () => {
        echoed = performance.now();
        socket.end();
      });
      socket.on('error', (error: NodeJS.ErrnoException) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        fail(error.code ?? error.message);
        socket.destroy();
        active--;
        next();
      });
      socket.once('close', () => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        const end = performance.now();
        if (echoed === 0) {
          fail('closed-before-echo');
        } else {
          total[completed] = end - begin;
          connect[completed] = connected - begin;
          echo[completed] = echoed - begin;
          completed++;
          if (end > lastEnd) lastEnd = end;
        }
        active--;
        next();
      });
    };
    next();
  });
}

// ---------------------------------------------------------------------------------------------------
// Bulk

interface BulkResult {
  bytes: number;
  elapsedMs: number;
  gbps: number;
  error: string | null;
}

const bulkResult = (bytes: number, begin: number, error: string | null): BulkResult => {
  const elapsedMs = performance.now() - begin;
  return { bytes, elapsedMs, gbps: (bytes * 8) / (elapsedMs / 1000) / 1e9, error };
};

function upload(port: number, ms: number): Promise<BulkResult> {
  return new Promise((resolve) => {
    const begin = performance.now();
    let bytes = 0;
    let stopped = false;
    let done = false;
    const finish = (error: string | null) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(bulkResult(bytes, begin, error));
    };
    const socket = net.connect({ host, port });
    const write = () => {
      while (!stopped) {
        bytes += CHUNK.length;
        if (!socket.write(CHUNK)) return;
      }
    };
    const timer = setTimeout(() => {
      stopped = true;
      socket.end();
    }, ms);
    socket.once('connect', write);
    socket.on('drain', write);
    socket.resume();
    // The server sends its FIN only after it has read our FIN, i.e. every byte.
    socket.once('end', () => finish(null));
    socket.on('error', (error: NodeJS.ErrnoException) => finish(error.code ?? error.message));
  });
}

function download(port: number, ms: number): Promise<BulkResult> {
  return new Promise((resolve) => {
    const begin = performance.now();
    let bytes = 0;
    let done = false;
    const socket = net.connect({ host, port });
    const timer = setTimeout(() => socket.write(ONE), ms);
    socket.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
    });
    const finish = (error: string | null) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(bulkResult(bytes, begin, error));
    };
    socket.once('end', () => finish(null));
    socket.on('error', (error: NodeJS.ErrnoException) => finish(error.code ?? error.message));
  });
}

// ---------------------------------------------------------------------------------------------------
// Commands

interface Command {
  op: string;
  port?: number;
  concurrency?: number;
  count?: number;
  ms?: number;
  upload?: number;
  download?: number;
}

async function execute(command: Command): Promise<Record<string, unknown>> {
  const ms = command.ms ?? 3_000;
  switch (command.op) {
    case 'upgrades':
      return upgrades(command.port!, command.concurrency ?? 16, command.count ?? 20_000, ms);
    case 'upload':
      return { upload: await upload(command.port!, ms) };
    case 'download':
      return { download: await download(command.port!, ms) };
    case 'both': {
      const [up, down] = await Promise.all([upload(command.upload!, ms), download(command.download!, ms)]);
      return { upload: up, download: down };
    }
    default:
      throw new Error(`unknown op ${command.op}`);
  }
}

process.stdout.write(`${JSON.stringify({ ready: true })}\n`);
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) process.exit(0);
}, 1_000).unref();
for await (const line of readline.createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const command = JSON.parse(line) as Command;
  if (command.op === 'exit') break;
  const before = tcpCounters();
  let answer: Record<string, unknown>;
  try {
    answer = await execute(command);
  } catch (error) {
    answer = { error: (error as Error).message };
  }
  answer.op = command.op;
  answer.tcp = tcpDelta(before, tcpCounters());
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
process.exit(0);

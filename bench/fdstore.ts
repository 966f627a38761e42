/**
 * What Splicer's crash survival costs: relay set-ups per second with `--fd-store` against the same
 * daemon without it, both with a service manager's notify socket (played by this process, which keeps
 * what it is sent, as systemd's fd store would), alternating from run to run.
 *
 *   npm run bench -- fdstore [--json] [--runs N]
 *
 * Environment: FDFERRY_BENCH_RELAYS (relays per run, default 4,000), FDFERRY_BENCH_CONCURRENCY (default 32).
 *
 * One relay set-up: two ready-made AF_UNIX stream socket pairs, `SplicerClient.start` (the fd store
 * bookkeeping happens here: a notify message with both sockets, a checkpoint record), both near ends
 * closed, the relay completes, the envelope comes back and is acknowledged (with the fd store: a
 * checkpoint record and a removal message). Timed from the first start to the last envelope.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { SplicerClient } from '../lib/client/splicer.js';
import { loadNative, type SeqpacketSocket } from '../lib/native.js';
import { alternate } from './lib/alternate.js';
import { formatNumber, textTable, type BenchOptions } from './lib/bench.js';
import { spawnTs } from './lib/process.js';
import { median, ratio, round } from './lib/stats.js';

export const description = 'Splicer relay set-ups per second with and without crash survival (--fd-store)';

const binding = loadNative();
const SYSTEMS = ['plain', 'fd-store'] as const;
type System = (typeof SYSTEMS)[number];

/** The service manager's side: keeps stored fds, drops removed ones, closes barrier fds. */
function serviceManager(address: string) {
  const stored = new Map<string, number[]>();
  let messages = 0;
  const socket: SeqpacketSocket = binding.openSeqpacket(binding.datagramBind(address), {
    message(data, fds) {
      messages++;
      const fields = Object.fromEntries(data.toString().split('\n').map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]));
      if (fields.FDSTORE === '1') {
        const name = fields.FDNAME ?? 'stored';
        stored.set(name, [...(stored.get(name) ?? []), ...fds]);
        return;
      }
      if (fields.FDSTOREREMOVE === '1') {
        binding.closeAll(stored.get(fields.FDNAME ?? 'stored') ?? []);
        stored.delete(fields.FDNAME ?? 'stored');
      }
      binding.closeAll(fds);
    },
    drain() {},
    close() {},
  });
  return {
    messages: () => messages,
    storedFds: () => [...stored.values()].reduce((sum, fds) => sum + fds.length, 0),
    close: () => {
      socket.close();
      for (const fds of stored.values()) binding.closeAll(fds);
    },
  };
}

interface RunResult {
  perS: number;
  notifyMessages: number;
  storedFdsAfter: number;
}

async function measure(system: System, relays: number, concurrency: number): Promise<RunResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fdf-bench-fdstore-'));
  const manager = serviceManager(path.join(dir, 'notify.sock'));
  const socket = path.join(dir, 'splicer.sock');
  let daemon: ChildProcess | null = null;
  const client = new SplicerClient({ owner: `bench-${process.pid}`, path: socket, sockets: 'fd' });
  try {
    daemon = spawnTs('services/cli.ts', ['splicer', '--socket', socket, '--log-level', 'warn', ...(system === 'fd-store' ? ['--fd-store'] : [])], {
      env: { ...process.env, NOTIFY_SOCKET: path.join(dir, 'notify.sock') },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    const deadline = Date.now() + 20_000;
    for (;;) {
      try {
        await client.connect();
        break;
      } catch (error) {
        if (Date.now() > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    const one = async () => {
      const [a, nearA] = binding.streamPair();
      const [b, nearB] = binding.streamPair();
      const relay = await client.start(a, b);
      binding.closeAll([nearA, nearB]);
      const done = await relay.done;
      binding.closeAll([done.a, done.b]);
    };
    // Warm-up, untimed.
    for (let i = 0; i < 200; i++) await one();
    const before = manager.messages();
    const started = performance.now();
    let next = 0;
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        while (next++ < relays) await one();
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    // Acknowledgements, and the removals they cause, travel after the envelopes (and wait their turn when
    // the notify socket is full): count messages once the store has stopped changing.
    let last = -1;
    for (let waited = 0; waited < 20_000 && manager.storedFds() !== last; waited += 500) {
      last = manager.storedFds();
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    return { perS: relays / seconds, notifyMessages: (manager.messages() - before) / relays, storedFdsAfter: manager.storedFds() };
  } finally {
    client.close();
    if (daemon && daemon.exitCode === null) {
      daemon.kill('SIGTERM');
      await new Promise((resolve) => daemon!.once('exit', resolve));
    }
    manager.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export async function run(options: BenchOptions): Promise<Record<string, unknown>> {
  const relays = Number(process.env.FDFERRY_BENCH_RELAYS ?? 4000);
  const concurrency = Number(process.env.FDFERRY_BENCH_CONCURRENCY ?? 32);
  const results = await alternate(SYSTEMS, options.runs, (system) => measure(system, relays, concurrency), ({ run, system, result }) =>
    options.progress(`run ${run + 1} ${system}: ${formatNumber(result.perS, 0)} relay set-ups/s, ${result.notifyMessages.toFixed(2)} notify messages per relay`),
  );
  const medians = Object.fromEntries(
    SYSTEMS.map((system) => [
      system,
      {
        perS: round(median(results[system].map((r) => r.perS)), 1),
        notifyMessagesPerRelay: round(median(results[system].map((r) => r.notifyMessages)), 3),
        storedFdsAfter: median(results[system].map((r) => r.storedFdsAfter)),
      },
    ]),
  ) as Record<System, { perS: number; notifyMessagesPerRelay: number; storedFdsAfter: number }>;
  return {
    benchmark: 'fdstore',
    relays,
    concurrency,
    runs: options.runs,
    medians,
    ratio: round(ratio(medians['fd-store'].perS, medians.plain.perS), 3),
    perRun: results,
  };
}

export function formatTable(result: Record<string, unknown>): string {
  const medians = result.medians as Record<System, { perS: number; notifyMessagesPerRelay: number; storedFdsAfter: number }>;
  return [
    `Splicer crash survival: median of ${String(result.runs)} alternating runs, ${String(result.relays)} relays each at concurrency ${String(result.concurrency)}`,
    '',
    textTable([
      ['', 'plain', '--fd-store', 'fd-store/plain'],
      ['relay set-ups/s', formatNumber(medians.plain.perS, 0), formatNumber(medians['fd-store'].perS, 0), String(result.ratio)],
      ['notify messages per relay', String(medians.plain.notifyMessagesPerRelay), String(medians['fd-store'].notifyMessagesPerRelay), ''],
      ['fds stored after the run', String(medians.plain.storedFdsAfter), String(medians['fd-store'].storedFdsAfter), ''],
    ]),
  ].join('\n');
}

// Zero-downtime restart of Splicer: hand-overs under load, injected faults with rollback, SIGTERM during a
// hand-over, and the systemd notification sequence.
import t from 'tap';
import type { Test } from 'tap';
import crypto from 'node:crypto';
import fs from 'node:fs';
import { SplicerClient } from '../../lib/client/splicer.js';
import { loadNative } from '../../lib/native.js';
import { RpcClient } from '../../lib/rpc/client.js';
import { startDaemon } from '../helpers/daemon.js';
import { eventually, withDeadline } from '../helpers/native-helpers.js';
import { alive, Generations, reload, streamForever } from '../helpers/restart.js';
import { PairFactory, receiveAll, type PairKind } from '../helpers/streams.js';

t.setTimeout(600_000);
const binding = loadNative();
const pool = crypto.randomBytes(8 * 1024 * 1024);

/** Relays that stream both ways without pause, checked by hash when stopped. */
async function streamingRelays(t: Test, client: SplicerClient, pairs: PairFactory, count: number) {
  const kinds: PairKind[] = ['unix', 'tcp4', 'tcp6'];
  return Promise.all(
    Array.from({ length: count }, async (_, i) => {
      const left = await pairs.pair(kinds[i % 3]!);
      const right = await pairs.pair(kinds[(i + 2) % 3]!);
      const relay = await client.start(left.far, right.far, { i });
      const errors: string[] = [];
      left.near.on('error', (error: NodeJS.ErrnoException) => errors.push(`relay ${i} ${left.kind} side A: ${error.code}`));
      right.near.on('error', (error: NodeJS.ErrnoException) => errors.push(`relay ${i} ${right.kind} side B: ${error.code}`));
      // A reset is recorded in `errors` and reported by the test, not thrown as an unhandled rejection.
      const atRight = receiveAll(right.near).catch(() => ({ sha256: 'reset', bytes: 0 }));
      const atLeft = receiveAll(left.near).catch(() => ({ sha256: 'reset', bytes: 0 }));
      // Paced: 8 KiB every 10 ms each way per relay (about 300 MiB/s across 200 relays), so the test
      // machine's 2 cores are not spent on hashing alone.
      const toRight = streamForever(left.near, pool, 8 * 1024, 10);
      const toLeft = streamForever(right.near, pool, 8 * 1024, 10);
      return {
        relay,
        progress: () => toRight.bytes() + toLeft.bytes(),
        errors,
        async finish() {
          await Promise.all([toRight.stop(), toLeft.stop()]);
          const [gotRight, gotLeft] = await Promise.all([atRight, atLeft]);
          const returned = await relay.done;
          for (const socket of [left.near, right.near, returned.a, returned.b]) socket.destroy();
          return {
            intact: gotRight.sha256 === toRight.sent().sha256 && gotLeft.sha256 === toLeft.sent().sha256,
            bytes: gotRight.bytes + gotLeft.bytes,
            envelope: returned.envelope,
          };
        },
      };
    }),
  );
}

async function setup(t: Test, args: string[] = [], env: NodeJS.ProcessEnv = {}) {
  const daemon = await startDaemon(t, 'splicer', ['--allow-fault-injection', ...args], { env });
  const generations = new Generations(t, daemon.pid);
  t.teardown(() => {
    if (t.passing()) return;
    for (const line of daemon.logs) if (Number(line.levelValue) >= 40) t.comment(JSON.stringify(line).slice(0, 800));
    if (process.env.FDFERRY_TEST_LOG_DUMP) fs.writeFileSync(process.env.FDFERRY_TEST_LOG_DUMP, daemon.logs.map((l) => JSON.stringify(l)).join('\n') + '\nSTDERR:\n' + daemon.stderr());
  });
  const client = new SplicerClient({ owner: `restart-${process.pid}`, path: daemon.socket });
  await client.connect();
  t.teardown(() => client.close());
  let disconnects = 0;
  client.on('disconnect', () => disconnects++);
  return { daemon, generations, client, pairs: new PairFactory(t, binding), disconnects: () => disconnects };
}

const waitForProgress = async (t: Test, relays: Array<{ progress(): number }>, atLeast: number) => {
  const before = relays.map((r) => r.progress());
  t.ok(
    await eventually(() => relays.every((r, i) => r.progress() >= before[i]! + atLeast), 20_000),
    `every relay moved at least ${atLeast} more bytes`,
  );
};

t.test('soak: 200 streaming relays, 20 reloads in a row, not a byte lost, nobody refused', async (t) => {
  const reloads = Number(process.env.FDFERRY_TEST_RELOADS ?? 20);
  const { daemon, generations, client, pairs, disconnects } = await setup(t);
  const fdsBefore = daemon.openFds();
  const relays = await streamingRelays(t, client, pairs, Number(process.env.FDFERRY_TEST_SOAK_RELAYS ?? 200));
  await waitForProgress(t, relays, 64 * 1024);

  // A client connecting in a tight loop through every reload: each attempt must get a hello reply.
  let connects = 0;
  const refusals: string[] = [];
  let looping = true;
  const loop = (async () => {
    while (looping) {
      const probe = new RpcClient({ path: daemon.socket, owner: 'prober', binding, reconnect: false });
      try {
        await probe.connect();
        connects++;
      } catch (error) {
        refusals.push((error as NodeJS.ErrnoException).code ?? (error as Error).message);
      } finally {
        probe.close();
      }
      // Tight, but not a microtask spin: let the loop's other work (the relays, the reloads) run too.
      await new Promise((resolve) => setImmediate(resolve));
    }
  })();

  const reports = [];
  for (let i = 0; i < reloads; i++) {
    const { exitCode, report } = await reload('splicer', daemon.socket);
    reports.push(report);
    if (!report.ok || !report.newPid) {
      t.fail(`reload ${i + 1} failed: ${JSON.stringify(report.failure)}`);
      break;
    }
    t.equal(exitCode, 0, `reload ${i + 1}: pid ${report.oldPid} -> ${report.newPid}, ${String(report.tasks)} relays, pause ${String(report.pauseMs)} ms`);
    generations.add(report.newPid);
    await eventually(() => !alive(report.oldPid), 5_000);
    t.notOk(alive(report.oldPid), `generation ${i + 1} exited`);
    await new Promise((resolve) => setTimeout(resolve, 200)); // the pacing between reloads
  }
  looping = false;
  await loop;
  t.same(refusals, [], `no connection refused during the reloads (${connects} connected)`);
  t.equal(reports.filter((r) => r.ok).length, reloads, 'every reload succeeded');
  t.ok(reports.every((r) => r.tasks === relays.length), 'every relay travelled with every hand-over');
  await waitForProgress(t, relays, 64 * 1024);

  const errors = relays.flatMap((r) => r.errors);
  t.same(errors, [], 'no socket saw an error');
  if (errors.length) return;
  const results = await withDeadline(Promise.all(relays.map((r) => r.finish())), 120_000, 'streams to finish');
  t.equal(results.filter((r) => r.intact).length, relays.length, `every byte arrived, sha256 per direction (${(results.reduce((s, r) => s + r.bytes, 0) / 2 ** 20).toFixed(0)} MiB)`);
  t.ok(results.every((r) => r.envelope.reason === 'complete'), 'no relay was reset: each completed by half-closes');
  t.equal(disconnects(), 0, "the client's control connection stayed up through every reload");
  const live = generations.pids.filter(alive);
  t.same(live, [generations.current], 'exactly one daemon process remains');
  // Empty pipes stay pooled for reuse (up to --max-idle-pipes); everything else must be gone.
  const status = async () => {
    const probe = new RpcClient({ path: daemon.socket, owner: 'status', binding, reconnect: false });
    try {
      await probe.connect();
      return (await probe.request('status')).result as { engine: { pipesIdle: number; relays: number } };
    } finally {
      probe.close();
    }
  };
  const deadline = Date.now() + 10_000;
  let settled: number;
  for (;;) {
    const { engine } = await status();
    settled = readFds(generations.current) - 2 * engine.pipesIdle;
    if ((engine.relays === 0 && settled <= fdsBefore + 1) || Date.now() > deadline) break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  t.ok(settled <= fdsBefore + 1, `fd count (idle pipe pool aside) back to ${fdsBefore}: ${settled}`);
});

const readFds = (pid: number) => {
  try {
    return fs.readdirSync(`/proc/${pid}/fd`).length;
  } catch {
    return -1;
  }
};

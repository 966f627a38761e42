// Splicer survives its own crash: relays stream, the process is SIGKILLed, and the next one — started the
// way systemd would, with what the fd store kept — resumes every relay: every byte arrives (sha256 both
// ways), bytes that were sitting in its pipes included, and every envelope reaches its owner.
import t from 'tap';
import type { Test } from 'tap';
import type { ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import path from 'node:path';
import readline from 'node:readline';
import { SplicerClient, type StartedRelay } from '../../lib/client/splicer.js';
import { loadNative } from '../../lib/native.js';
import { RpcClient } from '../../lib/rpc/client.js';
import { tempDir } from '../helpers/daemon.js';
import { eventually, withDeadline } from '../helpers/native-helpers.js';
import { reload, streamForever } from '../helpers/restart.js';
import { FakeServiceManager } from '../helpers/service-manager.js';
import { PairFactory, receiveAll, type StreamPair } from '../helpers/streams.js';

t.setTimeout(180_000);
const binding = loadNative();

/** A daemon started by the fake service manager, with its log lines. */
function watch(t: Test, child: ChildProcess) {
  const logs: Array<Record<string, unknown>> = [];
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  readline.createInterface({ input: child.stdout! }).on('line', (line) => {
    try {
      logs.push(JSON.parse(line) as Record<string, unknown>);
    } catch {
      logs.push({ msg: line });
    }
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  });
  const waitFor = async (msg: string) => {
    if (!(await eventually(() => logs.some((line) => line.msg === msg), 30_000))) throw new Error(`no "${msg}" log line; stderr: ${stderr.slice(-2000)}`);
    return logs.find((line) => line.msg === msg)!;
  };
  return { logs, exited, waitFor };
}

t.test('100 streaming relays survive a SIGKILL of Splicer: every byte arrives, envelopes reach their owner', async (t) => {
  const dir = tempDir(t);
  const manager = new FakeServiceManager(t, dir);
  const socket = path.join(dir, 'splicer.sock');
  const args = ['splicer', '--socket', socket, '--log-level', 'info', '--fd-store', '--max-pipes', '256'];
  const first = manager.start(args);
  const firstLogs = watch(t, first);
  await firstLogs.waitFor('splicer listening');
  t.ok(manager.names().has('splicer'), 'the socket it bound is in the fd store');
  const client = new SplicerClient({ owner: `crash-${process.pid}`, path: socket, reconnect: true });
  client.on('error', () => {});
  await client.connect();
  t.teardown(() => client.close());
  const pairs = new PairFactory(t, binding);
  const pool = crypto.randomBytes(1 << 20);
  const relays: Array<{ left: StreamPair; right: StreamPair; started: StartedRelay; toRight: ReturnType<typeof streamForever>; toLeft: ReturnType<typeof streamForever>; atRight: Promise<{ sha256: string; bytes: number }>; atLeft: Promise<{ sha256: string; bytes: number }> }> = [];
  for (let i = 0; i < 100; i++) {
    const left = await pairs.pair('tcp4');
    const right = await pairs.pair('tcp4');
    const started = await client.start(left.far, right.far, { i });
    const atRight = receiveAll(right.near);
    const atLeft = receiveAll(left.near);
    // Ten receivers stop reading: their relays back up until bytes sit in Splicer's pipes at the crash.
    if (i < 10) right.near.pause();
    relays.push({ left, right, started, atRight, atLeft, toRight: streamForever(left.near, pool, 16 * 1024, 5), toLeft: streamForever(right.near, pool, 16 * 1024, 5) });
  }
  t.ok(await eventually(() => relays.every((r) => manager.names().get(`r-${r.started.taskId}`) === 2), 10_000), 'both sockets of every relay are in the fd store');
  t.ok([...manager.names().keys()].some((name) => name.startsWith('state-')), 'and a checkpoint');
  // Let bytes pile up until the paused relays hold them in Splicer's pipes (a pipe is borrowed only then).
  const observer = new RpcClient({ path: socket, owner: `observer-${process.pid}`, binding, reconnect: false });
  await observer.connect();
  const pipesInUse = async () => ((await observer.request('status')).result.engine as { pipesInUse: number }).pipesInUse;
  const deadline = Date.now() + 30_000;
  while ((await pipesInUse()) < 10 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
  t.ok((await pipesInUse()) >= 10, 'the paused relays hold bytes in pipes');
  observer.close();

  first.kill('SIGKILL');
  await firstLogs.exited;
  const second = manager.start(args);
  const secondLogs = watch(t, second);
  const recovered = await secondLogs.waitFor('recovered after a crash: relays resumed from the fd store, envelopes back in their mailboxes');
  await secondLogs.waitFor('splicer listening');
  t.equal(recovered.relays, 100, 'the next process resumed all 100 relays');
  t.ok(Number(recovered.bytesInPipes) > 0, `bytes that were in Splicer's pipes at the crash were found: ${recovered.bytesInPipes}`);
  t.same(manager.faults, [], 'everything was stored the way systemd expects (FDPOLL=0, fds attached)');

  for (const r of relays.slice(0, 10)) r.right.near.resume();
  await eventually(() => relays.every((r) => r.toRight.bytes() > 6 << 20), 20_000);
  await Promise.all(relays.flatMap((r) => [r.toRight.stop(), r.toLeft.stop()]));
  const results = await withDeadline(Promise.all(relays.map(async (r) => [await r.atRight, await r.atLeft] as const)), 60_000, 'every byte to arrive');
  const sent = relays.map((r) => ({ right: r.toRight.sent(), left: r.toLeft.sent() }));
  const broken = results
    .map(([atRight, atLeft], i) => ({ i, right: atRight.bytes - sent[i]!.right.bytes, left: atLeft.bytes - sent[i]!.left.bytes, okRight: atRight.sha256 === sent[i]!.right.sha256, okLeft: atLeft.sha256 === sent[i]!.left.sha256 }))
    .filter((b) => !b.okRight || !b.okLeft);
  t.same(broken, [], `every byte sent both ways on all 100 relays arrived, in order (sha256; ${results.reduce((sum, [a, b]) => sum + a.bytes + b.bytes, 0)} bytes)`);
  const envelopes = await withDeadline(Promise.all(relays.map((r) => r.started.done)), 30_000, 'the envelopes');
  t.equal(envelopes.filter((e) => e.envelope.reason === 'complete').length, 100, 'every envelope reached its owner, the relay complete');
  for (const e of envelopes) {
    e.a.destroy();
    e.b.destroy();
  }
  t.ok(await eventually(() => ![...manager.names().keys()].some((name) => name.startsWith('r-')), 10_000), `acknowledged envelopes leave nothing of their relays in the fd store (left: ${[...manager.names()].filter(([n]) => n.startsWith('r-')).length})`);
});

t.test('with the fd store, a rolled-back reload keeps the pipe pool whole, and after a reload a crash still finds the bytes in the pipes', async (t) => {
  const dir = tempDir(t);
  const manager = new FakeServiceManager(t, dir);
  const socket = path.join(dir, 'splicer.sock');
  const first = manager.start(['splicer', '--socket', socket, '--log-level', 'info', '--fd-store', '--max-pipes', '4', '--allow-fault-injection']);
  const firstLogs = watch(t, first);
  await firstLogs.waitFor('splicer listening');
  const client = new SplicerClient({ owner: `crash2-${process.pid}`, path: socket, reconnect: true });
  client.on('error', () => {});
  await client.connect();
  t.teardown(() => client.close());
  const observer = new RpcClient({ path: socket, owner: `observer2-${process.pid}`, binding, reconnect: true });
  await observer.connect();
  t.teardown(() => observer.close());
  const engine = async () => (await withDeadline(observer.request('status'), 10_000, 'status (the engine must answer)')).result.engine as { pipesInUse: number; pipesIdle: number };
  const pairs = new PairFactory(t, binding);
  const pool = crypto.randomBytes(1 << 20);
  const stalled = async () => {
    const left = await pairs.pair('tcp4');
    const right = await pairs.pair('tcp4');
    const started = await client.start(left.far, right.far);
    right.near.pause();
    const atRight = receiveAll(right.near);
    const toRight = streamForever(left.near, pool, 64 * 1024, 2);
    return { left, right, started, atRight, toRight };
  };
  const relays = [await stalled()];
  const deadline = Date.now() + 30_000;
  while ((await engine()).pipesInUse < 1 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
  const rolledBack = await reload('splicer', socket, 'reject-state');
  t.equal(rolledBack.report.ok, false, 'a reload the successor refuses is rolled back');
  const afterRollback = await engine();
  t.equal(afterRollback.pipesInUse + afterRollback.pipesIdle, 4, 'the pipe pool is whole again (the stalled relay\'s pipe went back to it)');
  for (let i = 0; i < 3; i++) relays.push(await stalled());
  const until = Date.now() + 30_000;
  while ((await engine()).pipesInUse < 4 && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 100));
  t.equal((await engine()).pipesInUse, 4, 'four stalled relays hold the four pipes, and the engine still answers');
  const handedOver = await reload('splicer', socket);
  t.equal(handedOver.report.ok, true, 'a reload to a successor');
  t.ok(await eventually(() => first.exitCode !== null, 10_000), 'the old process exits');
  process.kill(handedOver.report.newPid!, 'SIGKILL');
  const third = manager.start(['splicer', '--socket', socket, '--log-level', 'info', '--fd-store', '--max-pipes', '4']);
  const thirdLogs = watch(t, third);
  const recovered = await thirdLogs.waitFor('recovered after a crash: relays resumed from the fd store, envelopes back in their mailboxes');
  t.equal(recovered.relays, 4, 'after the successor crashed, its relays were recovered');
  t.ok(Number(recovered.bytesInPipes) > 0, `with the bytes that were in the pipes it had taken over (${recovered.bytesInPipes})`);
  for (const r of relays) r.right.near.resume();
  await Promise.all(relays.map((r) => r.toRight.stop()));
  const results = await withDeadline(Promise.all(relays.map((r) => r.atRight)), 60_000, 'every byte');
  const sent = relays.map((r) => r.toRight.sent());
  t.same(
    results.map((result, i) => ({ bytes: result.bytes - sent[i]!.bytes, intact: result.sha256 === sent[i]!.sha256 })),
    relays.map(() => ({ bytes: 0, intact: true })),
    `every byte arrived in order on all 4 relays (${results.map((r) => r.bytes).join(', ')})`,
  );
});

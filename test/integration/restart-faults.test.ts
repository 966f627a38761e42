// Hand-overs that go wrong: every fault a successor can be told to commit (FDFERRY_HANDOFF_FAULT) must end
// in a rollback — the old process (same pid) keeps serving, every streaming relay carries on with every byte
// intact, the successor is gone — and a later plain reload must still work. Also: fault injection is refused
// unless the daemon allows it, a second reload during one is answered busy, and SIGTERM in the middle of a
// hand-over rolls it back and then stops cleanly.
import t from 'tap';
import { isRunning } from '../../lib/process.js';
import type { Test } from 'tap';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import { SplicerClient, type StartedRelay } from '../../lib/client/splicer.js';
import type { HandoffReport } from '../../lib/handoff/predecessor.js';
import { HANDOFF_FAULTS, type HandoffFault } from '../../lib/handoff/spawn.js';
import { loadNative } from '../../lib/native.js';
import { RpcClient } from '../../lib/rpc/client.js';
import { cliCommand, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { eventually, withDeadline } from '../helpers/native-helpers.js';
import { isDaemonOn, streamForever } from '../helpers/restart.js';
import { PairFactory, receiveAll, type PairKind } from '../helpers/streams.js';

t.setTimeout(120_000);
const binding = loadNative();
const pool = crypto.randomBytes(4 * 1024 * 1024);
const RELAYS = Number(process.env.FDFERRY_TEST_FAULT_RELAYS ?? 20);
/**
 * --handoff-timeout of the daemons here: the deadline of the hang faults. It also bounds starting the
 * successor's Node process, which took over 3 s on a loaded 2-core CI machine: 6 s leaves room for that.
 */
const HANDOFF_TIMEOUT_MS = 6_000;

/** Where each fault must make the hand-over fail, and with which code. */
const EXPECTED: Record<HandoffFault, { phase: RegExp; code: string }> = {
  // The successor says its pid, then exits: the channel closes while the old process waits for hello.
  'crash-before-hello': { phase: /^hello$/, code: 'EXITED' },
  // The successor says its pid, then hangs: the hello deadline (bounded by --handoff-timeout) expires.
  'hang-before-hello': { phase: /^hello$/, code: 'TIMEOUT' },
  // The successor takes every fd and the state, then exits: the channel closes while validation is awaited.
  'crash-after-fds': { phase: /^validate$/, code: 'EXITED' },
  // The successor refuses the state with a typed error.
  'reject-state': { phase: /^validate$/, code: 'EFDFERRY_STATE' },
  // The successor says ready, then never answers commit with committed: it has moved nothing, so the old
  // process kills it and takes everything back.
  'hang-after-ack': { phase: /^commit$/, code: 'TIMEOUT' },
};

// ---- processes -------------------------------------------------------------------------------------------

/** Every live daemon process on `socket` (a check that nothing was left behind; never used to pick what to kill). */
function daemonsOn(socket: string): number[] {
  return fs
    .readdirSync('/proc')
    .filter((name) => /^\d+$/.test(name))
    .map(Number)
    .filter((pid) => isDaemonOn(pid, socket) && isRunning(pid));
}

/** Pids that wrote log lines on the daemon's stdout (successors inherit it). */
const logPids = (daemon: TestDaemon) => new Set(daemon.logs.map((line) => Number(line.pid)).filter((pid) => pid > 0));

/** The pids of the processes a test started; at teardown every one still running our daemon is SIGKILLed. */
class Started {
  readonly pids = new Set<number>();
  constructor(t: Test, daemon: TestDaemon) {
    this.pids.add(daemon.pid);
    t.teardown(() => {
      for (const pid of new Set([...this.pids, ...logPids(daemon)])) {
        if (isRunning(pid) && isDaemonOn(pid, daemon.socket)) process.kill(pid, 'SIGKILL');
      }
    });
  }
  add(pid: number | null | undefined): void {
    if (pid) this.pids.add(pid);
  }
}

// ---- fdferry ctl ---------------------------------------------------------------------------------------------

interface CtlRun {
  exitCode: number | null;
  stdout: string;
  stderr: string;
  report: (HandoffReport & { started?: boolean; pid?: number }) | null;
}

/** Runs `fdferry ctl splicer <args> --json`; killed at teardown if still running, and after a hard deadline. */
function ctl(t: Test, socket: string, args: string[], timeoutMs = 20_000): Promise<CtlRun> {
  const { command, args: base } = cliCommand();
  const child = spawn(command, [...base, 'ctl', 'splicer', ...args, '--json', '--socket', socket, '--timeout', String(timeoutMs)], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const kill = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  };
  t.teardown(kill);
  const hard = setTimeout(kill, timeoutMs + 15_000);
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  return new Promise((resolve) => {
    child.on('close', (code) => {
      clearTimeout(hard);
      let report: CtlRun['report'] = null;
      try {
        report = JSON.parse(stdout.trim().split('\n').pop() ?? '') as CtlRun['report'];
      } catch {
        // no report: the exit code and stderr say why
      }
      resolve({ exitCode: code, stdout, stderr, report });
    });
  });
}

async function status(socket: string) {
  const probe = new RpcClient({ path: socket, owner: 'status-probe', binding, reconnect: false, requestTimeoutMs: 5_000 });
  try {
    await probe.connect();
    return (await probe.request('status')).result as { pid: number; generation: number; tasks: number; handoffInProgress: boolean };
  } finally {
    probe.close();
  }
}

/** One request on a fresh connection: its result, or the protocol error code it was answered with. */
async function rpc(socket: string, method: string, params: Record<string, unknown> = {}): Promise<{ result?: Record<string, unknown>; code?: string }> {
  const client = new RpcClient({ path: socket, owner: `rpc-${process.pid}`, binding, reconnect: false, requestTimeoutMs: 20_000 });
  try {
    await client.connect();
    return { result: (await client.request(method, params)).result };
  } catch (error) {
    return { code: (error as { code?: string }).code ?? (error as Error).message };
  } finally {
    client.close();
  }
}

// ---- relays ------------------------------------------------------------------------------------------------

/** Relays that stream both ways without pause, with sha256 on both ends. */
async function streamingRelays(t: Test, client: SplicerClient, pairs: PairFactory, count: number) {
  const kinds: PairKind[] = ['unix', 'tcp4', 'tcp6'];
  const relays = await Promise.all(
    Array.from({ length: count }, async (_, i) => {
      const left = await pairs.pair(kinds[i % 3]!);
      const right = await pairs.pair(kinds[(i + 2) % 3]!);
      const relay: StartedRelay = await client.start(left.far, right.far, { i });
      const errors: string[] = [];
      left.near.on('error', (error: NodeJS.ErrnoException) => errors.push(`relay ${i} ${left.kind} side A: ${error.code}`));
      right.near.on('error', (error: NodeJS.ErrnoException) => errors.push(`relay ${i} ${right.kind} side B: ${error.code}`));
      const atRight = receiveAll(right.near).catch(() => ({ sha256: 'reset', bytes: 0 }));
      const atLeft = receiveAll(left.near).catch(() => ({ sha256: 'reset', bytes: 0 }));
      const toRight = streamForever(left.near, pool);
      const toLeft = streamForever(right.near, pool);
      let abandoned = false;
      // Sockets that come back after the test gave up on them are closed as they arrive.
      void relay.done.then((returned) => {
        if (abandoned) for (const socket of [returned.a, returned.b]) socket.destroy();
      });
      return {
        relay,
        progress: () => toRight.bytes() + toLeft.bytes(),
        errors,
        /** Half-closes both ways and compares hashes once the relay has completed. */
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
        /** Drops everything on the test's side (for relays that will not complete, or that the daemon ended). */
        abandon(returned?: { a: { destroy(): void }; b: { destroy(): void } }) {
          abandoned = true;
          for (const socket of [left.near, right.near, returned?.a, returned?.b]) socket?.destroy();
        },
      };
    }),
  );
  // Whatever happened, nothing of ours keeps streaming after the test.
  t.teardown(() => relays.forEach((relay) => relay.abandon()));
  return relays;
}
type Relays = Awaited<ReturnType<typeof streamingRelays>>;

/** Whether every relay moved at least `atLeast` more bytes (writes accepted by the kernel) within `ms`. */
async function progressed(relays: Relays, atLeast: number, ms = 10_000): Promise<boolean> {
  const before = relays.map((r) => r.progress());
  return eventually(() => relays.every((r, i) => r.progress() >= before[i]! + atLeast), ms);
}

async function setup(t: Test, args: string[]) {
  const daemon = await startDaemon(t, 'splicer', args);
  const started = new Started(t, daemon);
  t.teardown(() => {
    if (t.passing()) return;
    for (const line of daemon.logs) if (Number(line.levelValue) >= 40) t.comment(JSON.stringify(line).slice(0, 600));
  });
  const client = new SplicerClient({ owner: `faults-${process.pid}`, path: daemon.socket });
  await client.connect();
  t.teardown(() => client.close());
  let disconnects = 0;
  client.on('disconnect', () => disconnects++);
  return { daemon, started, client, pairs: new PairFactory(t, binding), disconnects: () => disconnects };
}

// ---- tests ---------------------------------------------------------------------------------------------------

t.test('every injected fault rolls back: same pid, every relay carries on intact, successor gone, a later reload works', async (t) => {
  const { daemon, started, client, pairs, disconnects } = await setup(t, ['--allow-fault-injection', '--handoff-timeout', String(HANDOFF_TIMEOUT_MS)]);
  const relays = await streamingRelays(t, client, pairs, RELAYS);
  t.ok(await progressed(relays, 64 * 1024), `${RELAYS} relays stream both ways`);

  // One daemon goes through every fault in turn, as a long-running service would; a fault that is not rolled
  // back ends the series (what follows would only repeat the same failure).
  for (const fault of HANDOFF_FAULTS) {
    let servingOn = false;
    await t.test(fault, async (t) => {
      const pidsBefore = logPids(daemon);
      const failed = await ctl(t, daemon.socket, ['reload', '--fault', fault]);
      // The successor's pid: from the report, otherwise from its log lines (it logs as soon as its engine starts;
      // the line may be read from the pipe only after the report).
      await eventually(() => [...logPids(daemon)].some((pid) => !pidsBefore.has(pid)), 2_000);
      const newLogPids = [...logPids(daemon)].filter((pid) => !pidsBefore.has(pid));
      for (const pid of newLogPids) started.add(pid);
      started.add(failed.report?.newPid);
      const successor = failed.report?.newPid ?? newLogPids[0] ?? null;

      t.not(failed.exitCode, 0, `reload --fault ${fault} exits non-zero (${String(failed.exitCode)})`);
      t.ok(failed.report, `it prints a report${failed.report ? '' : `; stderr: ${failed.stderr.trim()}`}`);
      const report = failed.report;
      t.equal(report?.ok, false, 'the report says ok: false');
      t.match(report?.failure, { phase: EXPECTED[fault].phase, code: EXPECTED[fault].code, message: String }, `failure names the phase and code: ${JSON.stringify(report?.failure)}`);
      t.equal(report?.oldPid, daemon.pid, 'the report names the old process');
      if (['crash-after-fds', 'reject-state', 'hang-after-ack'].includes(fault)) {
        // These fail after the pause: every relay was paused and exported, bytes in its pipes included.
        t.equal(report?.tasks, RELAYS, `every relay had been paused and sent (${String(report?.bytesInFlight)} bytes in pipes)`);
      }
      if (fault.startsWith('hang')) {
        // The whole hand-over, rollback included, is bounded by --handoff-timeout (plus the time to kill the successor).
        t.ok(
          report && report.totalMs >= HANDOFF_TIMEOUT_MS - 1_000 && report.totalMs <= HANDOFF_TIMEOUT_MS + 1_000,
          `the hang was cut at the deadline (--handoff-timeout ${HANDOFF_TIMEOUT_MS}): ${String(report?.totalMs)} ms, phases ${JSON.stringify(report?.phasesMs)}`,
        );
      }

      t.ok(successor, `the successor's pid is known (${String(successor)})`);
      if (report?.newPid) t.ok(newLogPids.includes(report.newPid), 'the reported successor is the process that logged');
      t.ok(successor && (await eventually(() => !isRunning(successor), 5_000)), `the successor ${String(successor)} is gone`);
      t.ok(isRunning(daemon.pid), `the old process ${daemon.pid} is still running`);
      const after = await status(daemon.socket).catch((error: Error) => ({ error: error.message }));
      const same = t.match(after, { pid: daemon.pid, generation: 1, tasks: RELAYS, handoffInProgress: false }, 'it answers status: same pid, same generation, every relay, no hand-over');
      const moving = t.ok(await progressed(relays, 256 * 1024), 'every relay carries on after the rollback');
      t.same(relays.flatMap((r) => r.errors), [], 'no socket saw an error');
      servingOn = same && moving;
    });
    if (!servingOn) {
      t.fail(`${fault} was not rolled back: stopping the series`);
      return;
    }
  }

  const plain = await ctl(t, daemon.socket, ['reload']);
  started.add(plain.report?.newPid);
  t.equal(plain.exitCode, 0, 'a later plain reload exits 0');
  t.match(plain.report, { ok: true, oldPid: daemon.pid, tasks: RELAYS }, `and hands every relay over (pid ${daemon.pid} -> ${String(plain.report?.newPid)})`);
  const next = plain.report?.newPid;
  t.ok(next && isRunning(next), 'the new successor runs');
  t.equal(await withDeadline(daemon.exited, 10_000, 'the old process to exit').catch(() => 'still running'), 0, 'the old process exits 0');
  t.ok(await progressed(relays, 256 * 1024), 'every relay carries on in the new process');

  const errors = relays.flatMap((r) => r.errors);
  t.same(errors, [], 'no socket saw an error');
  if (errors.length) return;
  const results = await withDeadline(Promise.all(relays.map((r) => r.finish())), 30_000, 'streams to finish');
  t.equal(results.filter((r) => r.intact).length, RELAYS, `every byte arrived, sha256 per direction (${(results.reduce((s, r) => s + r.bytes, 0) / 2 ** 20).toFixed(0)} MiB)`);
  t.ok(results.every((r) => r.envelope.reason === 'complete'), 'every relay completed by half-closes');
  t.equal(disconnects(), 0, "the client's control connection stayed up through every attempt");
  t.same(daemonsOn(daemon.socket), next ? [next] : [], 'exactly one daemon process remains');
});

t.test('fault injection is refused unless the daemon allows it; unknown faults are invalid', async (t) => {
  const daemon = await startDaemon(t, 'splicer', ['--handoff-timeout', String(HANDOFF_TIMEOUT_MS)]);
  const started = new Started(t, daemon);
  const refused = await ctl(t, daemon.socket, ['reload', '--fault', 'crash-before-hello']);
  t.not(refused.exitCode, 0, 'reload --fault exits non-zero');
  t.match(refused.stderr, /EFDFERRY_DENIED/, `refused with EFDFERRY_DENIED: ${refused.stderr.trim()}`);
  t.notOk(daemon.logs.some((line) => line.msg === 'hand-over: starting the successor'), 'no successor was started');
  t.same([...logPids(daemon)], [daemon.pid], 'no other process logged');
  t.equal((await rpc(daemon.socket, 'reload', { fault: 'hang-after-ack' })).code, 'EFDFERRY_DENIED', 'so is a reload request with a fault over the socket');
  t.equal((await rpc(daemon.socket, 'reload', { fault: 'explode' })).code, 'EFDFERRY_INVALID', 'an unknown fault is EFDFERRY_INVALID');
  t.notOk(daemon.logs.some((line) => line.msg === 'hand-over: starting the successor'), 'still no successor was started');
  t.match(await status(daemon.socket), { pid: daemon.pid, generation: 1, handoffInProgress: false }, 'the daemon serves on, unchanged');

  // A plain reload asked over the socket: the answer comes from the successor, on the same connection.
  const plain = await rpc(daemon.socket, 'reload', { wait: true });
  started.add(plain.result?.newPid as number | undefined);
  t.match(plain.result, { ok: true, oldPid: daemon.pid }, 'a plain reload is allowed');
  t.equal(await withDeadline(daemon.exited, 10_000, 'the old process to exit'), 0, 'the old process exits 0');
});

t.test('a second reload while one is in progress is answered busy', async (t) => {
  const daemon = await startDaemon(t, 'splicer', ['--allow-fault-injection', '--handoff-timeout', String(HANDOFF_TIMEOUT_MS)]);
  const started = new Started(t, daemon);
  const first = await ctl(t, daemon.socket, ['reload', '--no-wait', '--fault', 'hang-before-hello']);
  t.equal(first.exitCode, 0, 'reload --no-wait returns at once');
  t.match(first.report, { started: true, pid: daemon.pid }, 'and says the hand-over started');
  // The hanging successor logs as its engine starts; from then on it waits for hello for up to the deadline.
  const successorLine = await daemon.waitForLog((line) => Number(line.pid) !== daemon.pid, 10_000);
  const successor = Number(successorLine.pid);
  started.add(successor);
  t.ok(isRunning(successor), `the hanging successor ${successor} runs`);

  const second = await ctl(t, daemon.socket, ['reload']);
  t.not(second.exitCode, 0, 'a second reload exits non-zero');
  t.match(second.stderr, /EFDFERRY_BUSY/, `answered EFDFERRY_BUSY: ${second.stderr.trim()}`);
  t.equal((await rpc(daemon.socket, 'reload', { fault: 'reject-state' })).code, 'EFDFERRY_BUSY', 'so is a reload request with a fault');
  t.match(await status(daemon.socket), { pid: daemon.pid, handoffInProgress: true }, 'status says a hand-over is in progress');
  daemon.kill('SIGHUP');
  await t.resolves(daemon.waitForLog((line) => line.msg === 'SIGHUP during a hand-over: busy, ignored', 5_000), 'SIGHUP during it is ignored as busy');

  const rolledBack = await daemon.waitForLog((line) => typeof line.msg === 'string' && line.msg.startsWith('hand-over failed in'), HANDOFF_TIMEOUT_MS + 5_000);
  const report = rolledBack.report as HandoffReport;
  t.match(report, { ok: false, newPid: successor, failure: { phase: 'hello', code: 'TIMEOUT' } }, 'the first hand-over times out in hello and rolls back');
  t.ok(await eventually(() => !isRunning(successor), 5_000), 'its successor is gone');
  t.ok(isRunning(daemon.pid), 'the old process runs on');

  const plain = await rpc(daemon.socket, 'reload', { wait: true });
  const next = plain.result?.newPid as number | undefined;
  started.add(next);
  t.match(plain.result, { ok: true, oldPid: daemon.pid }, 'then a plain reload succeeds');
  t.equal(await withDeadline(daemon.exited, 10_000, 'the old process to exit'), 0, 'the old process exits 0');
  t.same(daemonsOn(daemon.socket), next ? [next] : [], 'exactly one daemon process remains');
});

t.test('SIGTERM during a hand-over: rollback, then a clean stop with every envelope delivered', async (t) => {
  // A long deadline: the hang must end because of SIGTERM, not because the hand-over timed out.
  const { daemon, started, client, pairs } = await setup(t, ['--allow-fault-injection', '--handoff-timeout', '30000', '--shutdown-grace', '5000']);
  const relays = await streamingRelays(t, client, pairs, RELAYS);
  t.ok(await progressed(relays, 64 * 1024), `${RELAYS} relays stream both ways`);

  const reloading = ctl(t, daemon.socket, ['reload', '--fault', 'hang-before-hello']);
  const successorLine = await daemon.waitForLog((line) => Number(line.pid) !== daemon.pid, 10_000);
  const successor = Number(successorLine.pid);
  started.add(successor);
  t.match(await status(daemon.socket), { handoffInProgress: true }, `the hand-over to ${successor} is in progress`);

  const envelopes = Promise.all(relays.map((r) => r.relay.done));
  daemon.kill('SIGTERM');
  const exitCode = await withDeadline(daemon.exited, 20_000, 'the daemon to stop').catch((error: Error) => error.message);
  t.equal(exitCode, 0, 'the daemon exits 0');
  // The exit can be seen before the last lines of its stdout have been read.
  const ownLines = () => daemon.logs.filter((line) => Number(line.pid) === daemon.pid).map((line) => String(line.msg));
  await eventually(() => ownLines().includes('stopped'), 5_000);
  const messages = ownLines();
  const order = ['stop requested during a hand-over: rolling it back first', 'hand-over failed in', 'stopping: no new work; finishing tasks', 'stopped'].map((prefix) =>
    messages.findIndex((msg) => msg.startsWith(prefix)),
  );
  t.ok(order.every((index, i) => index >= 0 && (i === 0 || index > order[i - 1]!)), `rollback, then stop, in that order (log positions ${order.join(', ')})`);

  const returned = await withDeadline(envelopes, 10_000, 'every envelope').catch((error: Error) => error);
  if (returned instanceof Error) {
    t.fail(returned.message);
  } else {
    t.equal(returned.length, RELAYS, 'every relay came back to its connected owner');
    const reasons = [...new Set(returned.map((r) => r.envelope.reason))];
    t.same(reasons, ['shutdown'], 'each with reason shutdown');
    t.ok(returned.every((r) => r.envelope.bytesAToB > 0 && r.envelope.bytesBToA > 0), 'having relayed both ways');
    returned.forEach((r, i) => relays[i]!.abandon(r));
  }
  const reload = await reloading;
  t.not(reload.exitCode, 0, 'the interrupted reload exits non-zero');
  if (reload.report) t.equal(reload.report.ok, false, `its report says ok: false (${JSON.stringify(reload.report.failure)})`);
  t.ok(await eventually(() => !isRunning(successor), 5_000), `the successor ${successor} is gone`);
  t.same(daemonsOn(daemon.socket), [], 'no daemon process is left');
});

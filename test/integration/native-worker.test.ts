/**
 * The addon inside a worker_threads Worker: catches code that assumes the main thread's loop (uv_default_loop),
 * static per-process JS state, and teardown bugs (a Worker's loop must close with no handle of ours left on
 * it, and every fd the Worker left open must be closed by the environment cleanup hook).
 */
import t from 'tap';
import { once } from 'node:events';
import { Worker } from 'node:worker_threads';
import type { WorkerReport } from '../helpers/native-worker-body.js';
import { fdLeak, openFds, withDeadline } from '../helpers/native-helpers.js';
import { loadNative } from '../../lib/native.js';

const body = new URL('../helpers/native-worker-body.ts', import.meta.url);
const WAIT = 20_000;

t.setTimeout(60_000);

// The main thread has the addon loaded too: both environments must keep separate state.
const native = loadNative();

async function runWorker(leave: 'unref' | 'ref'): Promise<{ report: WorkerReport; exitCode: number }> {
  const worker = new Worker(body, { workerData: { leave } });
  const errors: Error[] = [];
  worker.on('error', (error) => errors.push(error));
  const exited = once(worker, 'exit') as Promise<[number]>;
  const exitedEarly = exited.then(() => Promise.reject(new Error(`worker exited early: ${errors.join('; ')}`)));
  const [report] = (await withDeadline(
    Promise.race([once(worker, 'message'), exitedEarly]),
    WAIT,
    'the worker report',
  )) as [WorkerReport];
  if (leave === 'ref') await worker.terminate();
  const [exitCode] = await withDeadline(exited, WAIT, 'the worker to exit');
  if (errors.length > 0) throw errors[0];
  return { report, exitCode };
}

for (const leave of ['unref', 'ref'] as const) {
  const how = leave === 'unref' ? 'exits by itself' : 'is terminated';
  t.test(`a worker that ${how} with sockets still open`, async (t) => {
    const before = openFds();
    const { report, exitCode } = await runWorker(leave);
    t.ok(report.checks.length >= 8, `${report.checks.length} checks ran`);
    for (const check of report.checks) t.ok(check.ok, check.name, { detail: check.detail });
    t.equal(exitCode, leave === 'unref' ? 0 : 1, `exit code (${how})`);
    t.equal(await fdLeak(before), null, 'the cleanup hook closed everything the worker left open');
    t.ok(report.leftOpen.every((fd) => !openFds().includes(fd) || before.includes(fd)), 'the left-open fds are gone');
  });
}

t.test('main thread keeps working while and after workers use the addon', async (t) => {
  const before = openFds();
  const [a, b] = native.seqpacketPair();
  const received = new Promise<Buffer>((resolve) => {
    const right = native.openSeqpacket(b, {
      message(data) {
        right.close();
        resolve(data);
      },
      drain() {},
      close() {},
    });
  });
  const worker = runWorker('unref');
  const left = native.openSeqpacket(a, { message() {}, drain() {}, close() {} });
  left.send(Buffer.from('main'), []);
  t.equal((await withDeadline(received, WAIT, 'the main-thread message')).toString(), 'main');
  left.close();
  t.equal((await worker).exitCode, 0);
  t.equal(await fdLeak(before), null, 'no fd leaked');
});

/**
 * Runs inside a worker_threads Worker for test/integration/native-worker.test.ts: a representative slice of
 * the addon (a SEQPACKET round trip carrying fds, a listener, memfd sealing) on the Worker's own loop. It posts
 * one `WorkerReport` and then, depending on `workerData.leave`, leaves sockets open for the environment
 * cleanup hook to close:
 *
 *   'unref'  the leftovers are unref'd, so the Worker's loop ends by itself;
 *   'ref'    they stay ref'd, so the Worker runs until the parent terminates it.
 */
import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { loadNative } from '../../lib/native.js';
import { openRecorded, uniqueName } from './native-helpers.js';

/** What the Worker reports back: each check by name with whether it held, and the fds it left open. */
export interface WorkerReport {
  checks: Array<{ name: string; ok: boolean; detail?: string }>;
  leftOpen: number[];
}

const native = loadNative();
const checks: WorkerReport['checks'] = [];
const check = (name: string, ok: boolean, detail?: string): void => {
  checks.push(detail === undefined ? { name, ok } : { name, ok, detail });
};
const WAIT = 10_000;

async function roundTrip(): Promise<void> {
  const [a, b] = native.seqpacketPair();
  const left = openRecorded(native, a);
  const right = openRecorded(native, b);
  const memfd = native.memfdCreate('worker');
  fs.writeSync(memfd, 'from the worker');
  left.socket.send(Buffer.from('with fds'), [memfd, memfd]);
  native.close(memfd);
  const [message] = await right.messages.wait(1, WAIT, 'a message');
  check('data arrives', message?.data.toString() === 'with fds', message?.data.toString());
  check('two fds arrive', message?.fds.length === 2, JSON.stringify(message?.fds));
  const content = Buffer.alloc(32);
  const n = fs.readSync(message!.fds[0]!, content, 0, 32, 0);
  check('the fds work', content.subarray(0, n).toString() === 'from the worker');
  native.closeAll(message!.fds);

  right.socket.send(Buffer.from('back'), []);
  const [back] = await left.messages.wait(1, WAIT, 'a reply');
  check('replies arrive', back?.data.toString() === 'back');
  right.socket.close();
  const [closeError] = await left.closes.wait(1, WAIT, 'the peer close');
  check('peer close is reported', closeError === null);
}

function memfdSeal(): void {
  const fd = native.memfdCreate('worker-sealed');
  fs.writeSync(fd, 'sealed');
  native.memfdSeal(fd);
  const C = native.constants;
  const all = C.F_SEAL_SHRINK! | C.F_SEAL_GROW! | C.F_SEAL_WRITE! | C.F_SEAL_SEAL!;
  check('memfd carries all four seals', (native.memfdSeals(fd) & all) === all);
  let code: unknown;
  try {
    fs.writeSync(fd, 'more');
  } catch (error) {
    code = (error as NodeJS.ErrnoException).code;
  }
  check('a sealed memfd refuses writes', code === 'EPERM', String(code));
  native.close(fd);
}

async function listenAndConnect(): Promise<void> {
  const name = `\0${uniqueName('fdferry-worker')}`;
  let accepted = -1;
  const connected = new Promise<void>((resolve) => {
    const listener = native.openListener(native.seqpacketListen(name, 4), (error, fd) => {
      if (error) throw error;
      accepted = fd;
      listener.close();
      resolve();
    });
  });
  const client = native.seqpacketConnect(name);
  await connected;
  const server = openRecorded(native, accepted);
  check('peer credentials in a worker', server.socket.peerCredentials().pid === process.pid);
  server.socket.close();
  native.close(client);
}

/** Sockets and a listener that nobody closes: the environment cleanup hook must. */
function leaveOpen(ref: boolean): number[] {
  const [a, b] = native.seqpacketPair();
  const socket = native.openSeqpacket(a, { message() {}, drain() {}, close() {} });
  const peer = native.openSeqpacket(b, { message() {}, drain() {}, close() {} });
  // Nobody reads, so the kernel buffer fills and one message (with a duplicated fd) ends up in our own send
  // queue: teardown must close that duplicate too.
  peer.setReading(false);
  socket.setReading(false);
  const memfd = native.memfdCreate('left-in-queue');
  while (socket.send(Buffer.alloc(1024), [memfd]) && socket.queued === 0);
  native.close(memfd);
  const listenFd = native.seqpacketListen(`\0${uniqueName('fdferry-worker-left')}`, 1);
  const listener = native.openListener(listenFd, () => {});
  if (!ref) {
    socket.unref();
    peer.unref();
    listener.unref();
  }
  return [a, b, listenFd];
}

try {
  await roundTrip();
  memfdSeal();
  await listenAndConnect();
} catch (error) {
  check('no exception', false, String((error as Error).stack));
}
const report: WorkerReport = { checks, leftOpen: leaveOpen(workerData?.leave === 'ref') };
parentPort!.postMessage(report);

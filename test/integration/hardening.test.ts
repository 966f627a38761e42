// Who may hand fdferry sockets, quotas, and resource exhaustion, against real daemon processes: refusals
// are clear and give fds back, and everyone else — running relays above all — carries on.
import t from 'tap';
import type { Test } from 'tap';
import { execFile, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import crypto from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { BumblebeeClient } from '../../lib/client/bumblebee.js';
import { SplicerClient } from '../../lib/client/splicer.js';
import { loadNative } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { RpcClient } from '../../lib/rpc/client.js';
import { startDaemon, tempDir, type TestDaemon } from '../helpers/daemon.js';
import { withDeadline } from '../helpers/native-helpers.js';
import { streamForever } from '../helpers/restart.js';
import { PairFactory, receiveAll } from '../helpers/streams.js';

t.setTimeout(180_000);
const binding = loadNative();
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const run = promisify(execFile);
const NOBODY = 65534;

/** Runs the peer probe as `uid`; resolves with its report. */
async function probeAs(uid: number, dir: string, socket: string, owner: string, method?: string, params?: Record<string, unknown>) {
  const args = ['--import', 'tsx', path.join(root, 'test', 'helpers', 'peer-probe.ts'), socket, owner, ...(method ? [method] : []), ...(params ? [JSON.stringify(params)] : [])];
  const { stdout } = await run(process.execPath, args, { cwd: root, uid, gid: uid, env: { ...process.env, HOME: dir, TMPDIR: dir }, timeout: 30_000 });
  return JSON.parse(stdout.trim().split('\n').pop()!) as { hello: string; pending?: number; method: string | null; message?: string };
}

/** A daemon another uid can reach through the file system (the directory and socket are world-usable). */
async function openDaemon(t: Test, service: string, args: string[]): Promise<{ daemon: TestDaemon; dir: string }> {
  const dir = tempDir(t);
  fs.chmodSync(dir, 0o777);
  const daemon = await startDaemon(t, service, ['--socket-mode', '0666', ...args], { dir });
  return { daemon, dir };
}

async function control(t: Test, daemon: TestDaemon): Promise<RpcClient> {
  const client = new RpcClient({ path: daemon.socket, owner: `control-${process.pid}`, binding, reconnect: false });
  await client.connect();
  t.teardown(() => client.close());
  return client;
}

t.test('a uid not on the allow-list is refused before any request is read; an allowed one is served', async (t) => {
  const closed = await openDaemon(t, 'splicer', []);
  const refused = await probeAs(NOBODY, closed.dir, closed.daemon.socket, 'intruder', 'status');
  t.equal(refused.hello, 'EFDFERRY_DENIED', `uid ${NOBODY} is told it is not allowed (${refused.message})`);
  const logged = await closed.daemon.waitForLog((line) => line.msg === 'connection refused: not on the allow-list');
  t.match(logged, { peerUid: NOBODY, peerGid: NOBODY, peerExe: process.execPath }, 'the refusal is logged with pid, uid, gid and executable');
  t.ok(Number(logged.peerPid) > 0);
  const status = (await (await control(t, closed.daemon)).request('status')).result as Record<string, any>;
  t.equal(status.counters.connectionsDenied, 1, 'and counted');
  t.equal(status.counters.requests, 2, 'the refused peer got no request read: the only requests counted are ours (hello, status)');

  const open = await openDaemon(t, 'splicer', ['--allow-uid', `root,${NOBODY}`]);
  t.match(await probeAs(NOBODY, open.dir, open.daemon.socket, 'guest', 'status'), { hello: 'ok', method: 'ok' }, 'with --allow-uid it is served');
  const reload = await probeAs(NOBODY, open.dir, open.daemon.socket, 'guest', 'reload', { wait: false });
  t.equal(reload.method, 'EFDFERRY_DENIED', `but control operations need the control list (${reload.message})`);
  await open.daemon.waitForLog((line) => line.msg === 'control method refused: peer not on the control allow-list');
  const groups = await openDaemon(t, 'splicer', ['--allow-gid', String(NOBODY)]);
  t.match(await probeAs(NOBODY, groups.dir, groups.daemon.socket, 'guest'), { hello: 'ok' }, '--allow-gid admits members of the group');
});

t.test('a client of another uid claiming an existing owner id gets none of that owner\'s envelopes', async (t) => {
  const { daemon, dir } = await openDaemon(t, 'splicer', ['--allow-uid', `0,${NOBODY}`]);
  const owner = `shared-${process.pid}`;
  const splicer = new SplicerClient({ owner, path: daemon.socket });
  await splicer.connect();
  const pairs = new PairFactory(t, binding);
  const left = await pairs.pair('unix');
  const right = await pairs.pair('unix');
  await splicer.start(left.far, right.far);
  splicer.close();
  left.near.destroy();
  right.near.destroy();
  const observer = await control(t, daemon);
  const deadline = Date.now() + 10_000;
  while (((await observer.request('status')).result.mailbox as number) < 1 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
  t.equal((await observer.request('status')).result.mailbox, 1, 'the envelope waits for its owner');
  const other = await probeAs(NOBODY, dir, daemon.socket, owner);
  t.match(other, { hello: 'ok', pending: 0 }, `uid ${NOBODY} naming the same owner id sees nothing pending`);
  const rightful = new SplicerClient({ owner, path: daemon.socket, sockets: 'fd' });
  const got = new Promise<number[]>((resolve) => rightful.on('envelope', ({ a, b }) => resolve([a, b])));
  const hello = await rightful.connect();
  t.equal(hello.pending, 1, 'the real owner is told about it');
  binding.closeAll(await withDeadline(got, 10_000, 'the envelope'));
  rightful.close();
});

t.test('quotas: fds in flight per uid and request rate are enforced, with the fds back', async (t) => {
  const bumblebee = await startDaemon(t, 'bumblebee', ['--max-fds-inflight-per-uid', '2', '--upgrade-timeout', '60000']);
  const client = new BumblebeeClient({ owner: `quota-${process.pid}`, path: bumblebee.socket });
  await client.connect();
  t.teardown(() => client.close());
  // Flow sockets whose SYN never comes: their upgrades stay in progress, holding one fd each.
  const pairs = [binding.seqpacketPair(), binding.seqpacketPair(), binding.seqpacketPair()];
  const pending = pairs.slice(0, 2).map(([, theirs]) => client.upgrade(theirs).catch((error: ProtocolError) => error));
  await new Promise((resolve) => setTimeout(resolve, 100)); // let both reach the daemon (pacing, not a wait on a result)
  const third = await client.upgrade(pairs[2]![1]).catch((error: ProtocolError) => error);
  t.match(third, { code: 'EFDFERRY_LIMIT', details: { limit: 'maxFdsInflightPerUid' } }, 'the third upgrade is over the fds-in-flight quota');
  t.equal((third as ProtocolError).fds.length, 1, 'its flow socket comes back');
  binding.closeAll((third as ProtocolError).fds);
  for (const [ours] of pairs) binding.closeAll([ours]);
  const settled = await Promise.all(pending);
  t.same(settled.map((e) => (e as ProtocolError).code), ['EFDFERRY_CLOSED', 'EFDFERRY_CLOSED'], 'the two in flight end when their flows close');
  for (const error of settled) binding.closeAll((error as ProtocolError).fds);

  const splicer = await startDaemon(t, 'splicer', ['--max-request-rate-per-uid', '20']);
  const pinger = await control(t, splicer);
  const outcomes = await Promise.all(Array.from({ length: 60 }, () => pinger.request('ping').then(() => 'ok', (error: ProtocolError) => error.details?.limit ?? error.code)));
  const ok = outcomes.filter((o) => o === 'ok').length;
  // 20 tokens at once, plus what refills while the 60 are being answered on a busy machine.
  t.ok(ok >= 15 && ok <= 40, `about 20 of 60 pings at once pass a 20/s quota (${ok})`);
  t.ok(outcomes.every((o) => o === 'ok' || o === 'requestRatePerUid'), 'the rest are refused naming the limit');
  await splicer.waitForLog((line) => String(line.msg).startsWith('request refused: uid 0 sends more than 20 requests per second'));
});

t.test('at the fd limit: a burst is refused cleanly, running relays keep every byte, service resumes', async (t) => {
  const daemon = await startDaemon(t, 'splicer');
  const client = new SplicerClient({ owner: `exhaust-${process.pid}`, path: daemon.socket, sockets: 'fd' });
  await client.connect();
  t.teardown(() => client.close());
  const pairs = new PairFactory(t, binding);
  const pool = crypto.randomBytes(1 << 20);
  const streams = await Promise.all(
    Array.from({ length: 10 }, async () => {
      const left = await pairs.pair('tcp4');
      const right = await pairs.pair('tcp4');
      const relay = await client.start(left.far, right.far);
      const received = receiveAll(right.near);
      const stream = streamForever(left.near, pool, 16 * 1024, 5);
      return { left, right, relay, received, stream };
    }),
  );
  const limits = /^Max open files\s+(\d+)\s+(\d+)/m.exec(fs.readFileSync(`/proc/${daemon.pid}/limits`, 'utf8'))!;
  const [soft, hard] = [Number(limits[1]), Number(limits[2])];
  const restore = () => void spawnSync('prlimit', ['--pid', String(daemon.pid), `--nofile=${soft}:${hard}`]);
  t.teardown(restore);
  t.equal(spawnSync('prlimit', ['--pid', String(daemon.pid), `--nofile=${daemon.openFds() + 4}:${hard}`]).status, 0, 'lowered the daemon\'s fd limit to 4 above what it uses');
  const burst = await Promise.all(
    Array.from({ length: 30 }, async () => {
      const left = await pairs.pair('unix');
      const right = await pairs.pair('unix');
      return client.start(left.far, right.far).then(
        (relay) => ({ relay, error: null as ProtocolError | null, left, right }),
        (error: ProtocolError) => ({ relay: null, error, left, right }),
      );
    }),
  );
  const refused = burst.filter((b) => b.error);
  t.ok(refused.length >= 20, `most of a burst of 30 is refused (${refused.length})`);
  t.ok(refused.every((b) => b.error!.code === 'EFDFERRY_CTRUNC' && b.error!.fds.length === 2), 'each with EFDFERRY_CTRUNC and both its sockets back');
  await daemon.waitForLog((line) => String(line.msg).startsWith('out of file descriptors'));
  restore();
  const after = await pairs.pair('unix');
  const after2 = await pairs.pair('unix');
  t.ok(await client.start(after.far, after2.far), 'with fds free again, a new relay is accepted');
  for (const { stream } of streams) await stream.stop();
  for (const s of streams) {
    const got = await withDeadline(s.received, 30_000, 'a running relay\'s bytes');
    t.equal(got.sha256, s.stream.sent().sha256, `a relay that ran through it all delivered ${got.bytes} bytes intact`);
  }
  for (const b of refused) binding.closeAll(b.error!.fds);
});

t.test('5,000 connections that never send and clients stalled mid-message block nobody; memory stays bounded', async (t) => {
  const daemon = await startDaemon(t, 'splicer', ['--max-connections', '6000', '--max-connections-per-uid', '6000', '--hello-timeout', '3000']);
  const rssOf = () => Number(/^VmRSS:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${daemon.pid}/status`, 'utf8'))![1]) * 1024;
  const before = rssOf();
  const silent: number[] = [];
  t.teardown(() => binding.closeAll(silent));
  const native = daemon.socket;
  const connect = async (): Promise<number> => {
    for (;;) {
      try {
        return binding.seqpacketConnect(native);
      } catch (error) {
        // The listen backlog is full: let the daemon accept what is queued (pacing, not a wait on a result).
        if ((error as NodeJS.ErrnoException).code !== 'EAGAIN') throw error;
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
    }
  };
  while (silent.length < 5000) silent.push(await connect());
  // Half a header, then nothing: SOCK_SEQPACKET delivers it as one short message, refused at once.
  const stalled: ReturnType<typeof binding.openSeqpacket>[] = [];
  for (let i = 0; i < 50; i++) stalled.push(binding.openSeqpacket(await connect(), { message() {}, drain() {}, close() {} }));
  for (const s of stalled) s.send(Buffer.from('F'), []);
  t.teardown(() => stalled.forEach((s) => s.close()));
  const observer = await control(t, daemon);
  const started = Date.now();
  for (let i = 0; i < 100; i++) await observer.request('ping');
  t.ok(Date.now() - started < 5000, `100 pings from a real client took ${Date.now() - started} ms among them`);
  const during = rssOf();
  const bound = 64 * 1024 * 1024;
  t.ok(during - before < bound, `5,050 idle connections cost ${((during - before) / 1048576).toFixed(1)} MiB of RSS (bound: 64 MiB)`);
  const deadline = Date.now() + 20_000;
  let connections = Infinity;
  while (Date.now() < deadline && connections > 1) {
    connections = (await observer.request('status')).result.connections as number;
    if (connections > 1) await new Promise((resolve) => setTimeout(resolve, 200));
  }
  t.equal(connections, 1, 'connections that never said hello are closed after --hello-timeout; only ours is left');
});

t.test('drain ends every relay of one owner, and only control peers may ask for it', async (t) => {
  const { daemon, dir } = await openDaemon(t, 'splicer', ['--allow-uid', `0,${NOBODY}`]);
  const pairs = new PairFactory(t, binding);
  const owner = (name: string) => new SplicerClient({ owner: `${name}-${process.pid}`, path: daemon.socket, sockets: 'fd' });
  const a = owner('a');
  const b = owner('b');
  await Promise.all([a.connect(), b.connect()]);
  t.teardown(() => {
    a.close();
    b.close();
  });
  const start = async (client: SplicerClient<'fd'>) => {
    const left = await pairs.pair('unix');
    const right = await pairs.pair('unix');
    return client.start(left.far, right.far);
  };
  const ofA = await Promise.all([start(a), start(a), start(a)]);
  const ofB = await start(b);
  const denied = await probeAs(NOBODY, dir, daemon.socket, 'guest', 'drain', { owner: `a-${process.pid}`, uid: 0 });
  t.equal(denied.method, 'EFDFERRY_DENIED', 'a peer that may only use the daemon cannot drain');
  const { stdout } = await run(process.execPath, ['--import', 'tsx', path.join(root, 'services', 'cli.ts'), 'ctl', 'splicer', 'drain', '--owner', `a-${process.pid}`, '--json', '--socket', daemon.socket], { cwd: root });
  t.match(JSON.parse(stdout), { draining: 3 }, '`fdferry ctl splicer drain --owner` ends its three relays');
  const envelopes = await withDeadline(Promise.all(ofA.map((relay) => relay.done)), 10_000, 'the drained envelopes');
  t.same(envelopes.map((e) => e.envelope.reason), ['cancelled', 'cancelled', 'cancelled'], 'each comes back to its owner as cancelled');
  for (const e of envelopes) binding.closeAll([e.a, e.b]);
  const tasks = (await (await control(t, daemon)).request('tasks')).result.tasks as Array<{ taskId: string }>;
  t.same(tasks.map((task) => task.taskId), [ofB.taskId], 'the other owner\'s relay runs on');
});

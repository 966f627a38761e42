/**
 * Malformed input and misbehaving clients against a real daemon process (test/helpers/echo-daemon.ts):
 * every kind of broken frame gets its error code under the right request id with the sender's fds given
 * back, and the same connection keeps working; clients that vanish mid-request or flood the daemon disturb
 * nobody else; 10,000 mixed requests leave the daemon with the fds it started with; SIGTERM ends it cleanly.
 */
import t from 'tap';
import type { Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import { spawn, spawnSync } from 'node:child_process';
import { loadNative } from '../../lib/native.js';
import type { Message } from '../../lib/protocol/codec.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { HEADER_SIZE, MAX_FRAME } from '../../lib/protocol/frame.js';
import { RpcClient, type RpcEvent } from '../../lib/rpc/client.js';
import { eventually, fdLeak, openFds, uniqueName, withDeadline } from '../helpers/native-helpers.js';
import { startEchoDaemon, type EchoDaemon } from '../helpers/rpc-processes.js';
import { RawConnection, inode, memfdHeader, patched, rawFrame, requestFrame } from '../helpers/rpc-raw.js';

const binding = loadNative();
const WAIT = 10_000;
const hasPrlimit = !spawnSync('prlimit', ['--version'], { stdio: 'ignore' }).error;

t.setTimeout(90_000);

// The libuv SIGCHLD pipe and friends are opened on first use and kept: open them before counting fds.
await once(spawn(process.execPath, ['-e', ''], { stdio: 'ignore' }), 'close');

/** A client of `daemon`, closed at teardown. */
function clientOf(t: Test, daemon: EchoDaemon, owner = uniqueName('owner')): RpcClient {
  const client = new RpcClient({ path: daemon.socket, owner, binding, reconnect: false, requestTimeoutMs: 20_000 });
  t.teardown(() => client.close());
  return client;
}

/** A raw connection that said hello; closed at teardown. */
async function rawOf(t: Test, daemon: EchoDaemon, hello = true): Promise<RawConnection> {
  const raw = new RawConnection(binding, daemon.socket);
  t.teardown(() => raw.close());
  if (hello) await raw.hello(uniqueName('raw'));
  return raw;
}

/** Fails the test if the daemon logged anything at error level or above (a crash path, a failed method). */
function noDaemonErrors(t: Test, daemon: EchoDaemon): void {
  const errors = daemon.lines.items.filter((line) => typeof line.levelValue === 'number' && line.levelValue >= 50);
  t.same(errors, [], 'the daemon logged no errors');
  t.ok(daemon.running(), 'the daemon is still running', { output: daemon.output().slice(-2000) });
}

/** A ping from `client` answered within `ms`. */
async function pingWithin(client: RpcClient, ms: number): Promise<boolean> {
  const reply = await withDeadline(client.request('ping'), ms, 'a ping');
  return reply.result.pong === true;
}

/** A regular file, opened read-only (its directory is gone already). */
function regularFile(): number {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fdf-file-'));
  fs.writeFileSync(path.join(dir, 'plain'), 'just a file');
  const fd = fs.openSync(path.join(dir, 'plain'), 'r');
  fs.rmSync(dir, { recursive: true, force: true });
  return fd;
}

type FdKind = 'socket' | 'file';

/** Makes fds of the given kinds; `close()` closes them and the other ends of the sockets. */
function makeFds(kinds: readonly FdKind[]): { fds: number[]; close(): void } {
  const fds: number[] = [];
  const others: number[] = [];
  for (const kind of kinds) {
    if (kind === 'file') {
      fds.push(regularFile());
    } else {
      const [a, b] = binding.streamPair();
      fds.push(a);
      others.push(b);
    }
  }
  return { fds, close: () => binding.closeAll([...fds, ...others]) };
}

// -------------------------------------------------------------------------------------------------------------

interface BadCase {
  name: string;
  /** The datagram, built for request id `id` with `fdCount` fds attached. */
  frame: (id: number, fdCount: number) => Buffer;
  /** Kinds of the fds attached (default one socket). */
  fds?: FdKind[];
  code: string;
  /** The request id the error must carry: the one sent (default) or 0 (connection-level). */
  connectionLevel?: boolean;
  details?: Record<string, unknown>;
  /** How many of the attached fds come back, the first ones (default all). */
  back?: number;
}

const ping = (id: number, fdCount: number): Buffer => requestFrame(id, 'ping', {}, fdCount);
const okBody = (id: number, fdCount: number, method = 'echo'): Buffer => requestFrame(id, method, { x: 1 }, fdCount);

/** `frame` with a bodyLength `delta` bytes off what it carries. */
const misdeclared = (frame: Buffer, delta: number): Buffer => patched(frame, 16, frame.length - HEADER_SIZE + delta, 4);

/** A message over MAX_FRAME (the receiver sees MSG_TRUNC): a valid header declaring every byte. */
function oversized(id: number, fdCount: number): Buffer {
  const frame = Buffer.alloc(MAX_FRAME + 4000, 0x20);
  ping(id, fdCount).copy(frame, 0, 0, HEADER_SIZE);
  frame.writeUInt32LE(frame.length - HEADER_SIZE, 16);
  return frame;
}

const badCases: BadCase[] = [
  {
    name: 'garbage bytes',
    frame: () => Buffer.from('this is not an fdferry message, not even close'),
    code: 'EFDFERRY_MAGIC',
    connectionLevel: true,
  },
  { name: 'a 3-byte message', frame: () => Buffer.from('FDF'), code: 'EFDFERRY_SHORT', connectionLevel: true },
  { name: 'a header cut at 16 bytes', frame: (id, n) => ping(id, n).subarray(0, 16), code: 'EFDFERRY_SHORT' },
  {
    name: 'wrong magic',
    frame: (id, n) => patched(ping(id, n), 0, 0x47, 1),
    code: 'EFDFERRY_MAGIC',
    connectionLevel: true,
  },
  {
    name: 'version 2',
    frame: (id, n) => patched(ping(id, n), 4, 2, 1),
    code: 'EFDFERRY_VERSION',
    details: { supported: [1] },
  },
  { name: 'version 0', frame: (id, n) => patched(ping(id, n), 4, 0, 1), code: 'EFDFERRY_VERSION' },
  { name: 'unknown type 9', frame: (id, n) => patched(ping(id, n), 5, 9, 1), code: 'EFDFERRY_TYPE' },
  { name: 'type 0', frame: (id, n) => patched(ping(id, n), 5, 0, 1), code: 'EFDFERRY_TYPE' },
  {
    name: 'a reply sent by a client',
    frame: (id, n) => rawFrame('reply', id, '{"result":{}}', n),
    code: 'EFDFERRY_TYPE',
  },
  {
    name: 'an event sent by a client',
    frame: (id, n) => rawFrame('event', id, '{"event":"x","id":"y","data":{}}', n),
    code: 'EFDFERRY_TYPE',
  },
  {
    name: 'an error sent by a client',
    frame: (id, n) => rawFrame('error', id, '{"error":{"code":"X","message":"y"}}', n),
    code: 'EFDFERRY_TYPE',
  },
  {
    name: 'bodyLength longer than the bytes sent',
    frame: (id, n) => misdeclared(ping(id, n), +100),
    code: 'EFDFERRY_LENGTH',
  },
  {
    name: 'bodyLength shorter than the bytes sent',
    frame: (id, n) => misdeclared(ping(id, n), -5),
    code: 'EFDFERRY_LENGTH',
  },
  { name: 'bodyLength 0 with a body', frame: (id, n) => patched(ping(id, n), 16, 0, 4), code: 'EFDFERRY_LENGTH' },
  { name: 'header counts 2 fds, 1 attached', frame: (id) => okBody(id, 2), code: 'EFDFERRY_FDCOUNT' },
  {
    name: 'header counts 0 fds, 2 attached',
    frame: (id) => okBody(id, 0),
    fds: ['socket', 'socket'],
    code: 'EFDFERRY_FDCOUNT',
  },
  { name: 'header counts 1 fd, none attached', frame: (id) => okBody(id, 1), fds: [], code: 'EFDFERRY_FDCOUNT' },
  {
    name: 'invalid JSON',
    frame: (id, n) => rawFrame('request', id, '{"method":"ping","par', n),
    code: 'EFDFERRY_JSON',
  },
  {
    name: 'a body that is not UTF-8',
    frame: (id, n) => rawFrame('request', id, Buffer.from([0x7b, 0xff, 0xfe, 0x7d]), n),
    code: 'EFDFERRY_JSON',
  },
  { name: 'a JSON array body', frame: (id, n) => rawFrame('request', id, '["ping"]', n), code: 'EFDFERRY_JSON' },
  {
    name: 'a body without method',
    frame: (id, n) => rawFrame('request', id, '{"params":{}}', n),
    code: 'EFDFERRY_JSON',
  },
  { name: 'a 65-character method', frame: (id, n) => requestFrame(id, 'm'.repeat(65), {}, n), code: 'EFDFERRY_JSON' },
  {
    name: 'params that are not an object',
    frame: (id, n) => rawFrame('request', id, '{"method":"echo","params":[1]}', n),
    code: 'EFDFERRY_JSON',
  },
  { name: 'unknown flag bits', frame: (id, n) => patched(ping(id, n), 6, 0x4, 2), code: 'EFDFERRY_HEADER' },
  { name: 'a non-zero reserved field', frame: (id, n) => patched(ping(id, n), 14, 7, 2), code: 'EFDFERRY_HEADER' },
  { name: 'request id 0', frame: (_id, n) => ping(0, n), code: 'EFDFERRY_HEADER', connectionLevel: true },
  {
    name: 'the memfd flag with inline bytes (the last fd is taken for the body and closed)',
    frame: (id, n) => patched(okBody(id, n), 6, 1, 2),
    fds: ['socket', 'socket'],
    code: 'EFDFERRY_LENGTH',
    back: 1,
  },
  { name: 'the memfd flag without any fd', frame: (id) => memfdHeader(id, 100, 0), fds: [], code: 'EFDFERRY_FDCOUNT' },
  {
    name: 'a memfd body over the daemon limit (header says 200 MiB)',
    frame: (id, n) => memfdHeader(id, 200 * 1024 * 1024, n),
    fds: ['socket', 'file'],
    code: 'EFDFERRY_TOOBIG',
    back: 1,
  },
  {
    name: 'a message over MAX_FRAME (MSG_TRUNC: what arrived is closed)',
    frame: oversized,
    code: 'EFDFERRY_TRUNC',
    back: 0,
  },
  { name: 'an unknown method', frame: (id, n) => requestFrame(id, 'nope', {}, n), code: 'EFDFERRY_METHOD' },
  {
    name: 'a file where needsSocket wants sockets (first)',
    frame: (id, n) => requestFrame(id, 'needsSocket', {}, n),
    fds: ['file', 'socket'],
    code: 'EFDFERRY_FDKIND',
    details: { index: 0 },
  },
  {
    name: 'a file where needsSocket wants sockets (second)',
    frame: (id, n) => requestFrame(id, 'needsSocket', {}, n),
    fds: ['socket', 'file'],
    code: 'EFDFERRY_FDKIND',
    details: { index: 1 },
  },
  {
    name: 'one fd where needsSocket wants two',
    frame: (id, n) => requestFrame(id, 'needsSocket', {}, n),
    code: 'EFDFERRY_FDCOUNT',
  },
  {
    name: 'three fds where needsSocket wants two',
    frame: (id, n) => requestFrame(id, 'needsSocket', {}, n),
    fds: ['socket', 'socket', 'socket'],
    code: 'EFDFERRY_FDCOUNT',
  },
  { name: 'an fd with ping', frame: ping, code: 'EFDFERRY_FDCOUNT' },
  {
    name: 'hello with protocol 2',
    frame: (id, n) => requestFrame(id, 'hello', { owner: 'x', protocol: 2 }, n),
    fds: [],
    code: 'EFDFERRY_VERSION',
    details: { supported: [1] },
  },
  {
    name: 'a second hello naming another owner',
    frame: (id, n) => requestFrame(id, 'hello', { owner: 'someone-else', protocol: 1 }, n),
    fds: [],
    code: 'EFDFERRY_INVALID',
  },
  {
    name: 'invalid parameters',
    frame: (id, n) => requestFrame(id, 'slow', { ms: 'soon' }, n),
    code: 'EFDFERRY_INVALID',
  },
];

/** Checks one answer against a case; returns nothing, closes the returned fds. */
function checkAnswer(t: Test, c: BadCase, answer: Message, id: number, sent: number[]): void {
  t.equal(answer.type, 'error', 'an error');
  if (answer.type === 'error') {
    t.equal(answer.error.code, c.code, `code ${c.code}`, { message: answer.error.message });
    t.ok(answer.error.message.length > 0, 'with a message', { message: answer.error.message });
    if (c.details) t.match(answer.error.details, c.details, 'and details');
  }
  t.equal(answer.requestId, c.connectionLevel ? 0 : id, c.connectionLevel ? 'connection-level (request id 0)' : 'under the request id');
  const back = c.back ?? sent.length;
  t.equal(answer.fds.length, back, `${back} fd(s) came back`);
  t.same(answer.fds.map(inode), sent.slice(0, back).map(inode), 'the fds sent, in order');
  binding.closeAll(answer.fds);
}

t.test('malformed messages: each gets its error with the fds back, the same connection and other clients carry on', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const bystander = clientOf(t, daemon);
  await bystander.connect();
  const raw = await rawOf(t, daemon);
  const baseline = daemon.openFds();

  for (const c of badCases) {
    await t.test(c.name, async (t) => {
      const made = makeFds(c.fds ?? ['socket']);
      const id = raw.nextId();
      raw.send(c.frame(id, made.fds.length), made.fds);
      checkAnswer(t, c, await raw.next(WAIT, `the answer to "${c.name}"`), id, made.fds);
      made.close();
      t.match(await raw.call('ping'), { type: 'reply', result: { pong: true } }, 'the same connection still answers a ping');
      t.ok(await pingWithin(bystander, WAIT), 'another client is unaffected');
      t.ok(await eventually(() => daemon.openFds() === baseline), 'the daemon holds no fd of it', { baseline, now: daemon.openFds() });
    });
  }
  t.equal(raw.unread, 0, 'exactly one answer per message');
  noDaemonErrors(t, daemon);
  raw.close();
  bystander.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('requests before hello get EFDFERRY_NOHELLO with their fds back; hello then works', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const raw = await rawOf(t, daemon, false);
  const made = makeFds(['socket', 'file']);
  const echo = await raw.call('echo', { early: true }, made.fds);
  checkAnswer(t, { name: 'echo before hello', frame: ping, code: 'EFDFERRY_NOHELLO' }, echo, echo.requestId, made.fds);
  t.match(await raw.call('ping'), { type: 'error', error: { code: 'EFDFERRY_NOHELLO' } }, 'ping before hello too');
  t.match(await raw.call('hello', { owner: 'has a space' }), { type: 'error', error: { code: 'EFDFERRY_INVALID' } }, 'a bad owner id');
  await raw.hello(uniqueName('late'));
  const again = await raw.call('echo', { early: false }, made.fds);
  t.match(again, { type: 'reply', result: { params: { early: false }, fdCount: 2, kinds: ['socket', 'file'] } }, 'after hello it works');
  binding.closeAll(again.fds);
  made.close();
  raw.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

const prlimitSkip = { skip: hasPrlimit ? false : 'prlimit (util-linux) is not installed' };

t.test('fds lost in transit (daemon at RLIMIT_NOFILE): EFDFERRY_CTRUNC, and service resumes', prlimitSkip, async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const raw = await rawOf(t, daemon);
  const limits = /^Max open files\s+(\d+)\s+(\d+)/m.exec(fs.readFileSync(`/proc/${daemon.pid}/limits`, 'utf8'));
  const [soft, hard] = [Number(limits?.[1]), Number(limits?.[2])];
  t.ok(soft > 0 && hard > 0, 'read the daemon limits');
  // Room for 3 more fds: 10 attached cannot all be installed.
  const restore = (): void => void spawnSync('prlimit', ['--pid', String(daemon.pid), `--nofile=${soft}:${hard}`]);
  t.teardown(restore);
  const lowered = spawnSync('prlimit', ['--pid', String(daemon.pid), `--nofile=${daemon.openFds() + 3}:${hard}`]);
  t.equal(lowered.status, 0, 'lowered the daemon limit', { stderr: lowered.stderr?.toString() });

  const made = makeFds(Array<FdKind>(10).fill('socket'));
  const id = raw.nextId();
  raw.send(requestFrame(id, 'echo', {}, 10), made.fds);
  const answer = await raw.next(WAIT, 'the CTRUNC answer');
  t.match(answer, { type: 'error', requestId: id, error: { code: 'EFDFERRY_CTRUNC' } }, 'refused with EFDFERRY_CTRUNC under the request id');
  t.equal(answer.fds.length, 0, 'the fds that did arrive were closed, not half-returned');
  restore();
  t.match(await raw.call('ping'), { type: 'reply' }, 'the connection still works');
  const again = await raw.call('echo', {}, made.fds);
  t.match(again, { type: 'reply', result: { fdCount: 10 } }, 'and the same request goes through once there is room');
  binding.closeAll(again.fds);
  made.close();
  noDaemonErrors(t, daemon);
  raw.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('more requests in flight than maxInflight: the excess get EFDFERRY_BUSY with their fds back', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const client = clientOf(t, daemon);
  const { limits } = await client.connect();
  const total = limits.maxInflight + 6;
  const outcomes = await Promise.allSettled(
    Array.from({ length: total }, (_, i) => client.request('slow', { ms: 1000, i }, [binding.memfdCreate(`busy-${i}`)])),
  );
  const busy = outcomes.filter((o) => o.status === 'rejected' && (o.reason as ProtocolError).code === 'EFDFERRY_BUSY');
  const ok = outcomes.filter((o) => o.status === 'fulfilled');
  t.equal(ok.length, limits.maxInflight, `${limits.maxInflight} accepted`);
  t.equal(busy.length, total - limits.maxInflight, 'the rest refused as busy');
  for (const o of outcomes) {
    if (o.status === 'fulfilled') {
      t.equal(o.value.fds.length, 1);
      binding.closeAll(o.value.fds);
    } else {
      t.equal((o.reason as ProtocolError).fds.length, 1);
      binding.closeAll((o.reason as ProtocolError).fds);
    }
  }
  client.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('a client that disconnects mid-request disturbs nobody, and its fds are released', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const bystander = clientOf(t, daemon);
  await bystander.connect();
  const baseline = daemon.openFds();

  const quitter = clientOf(t, daemon);
  await quitter.connect();
  const fds = [binding.memfdCreate('q1'), binding.memfdCreate('q2'), binding.memfdCreate('q3')];
  const pending = quitter.request('slow', { ms: 300 }, fds);
  quitter.close();
  const error = await pending.then(
    () => null,
    (e: ProtocolError) => e,
  );
  t.equal(error?.code, 'EFDFERRY_DISCONNECTED', 'the request fails as disconnected');
  t.same(error?.fds, fds, 'with the caller’s fds back');
  binding.closeAll(error?.fds ?? []);

  const rawQuitter = await rawOf(t, daemon);
  const made = makeFds(['socket', 'socket']);
  rawQuitter.send(requestFrame(rawQuitter.nextId(), 'slow', { ms: 300 }, 2), made.fds);
  made.close();
  rawQuitter.close();

  // While the daemon still holds those requests, and after it tried to answer them, others are served.
  for (let i = 0; i < 10; i++) t.ok(await pingWithin(bystander, 3000), `ping ${i} answered`);
  t.ok(await eventually(() => daemon.openFds() === baseline), 'the daemon released both connections and their fds', {
    baseline,
    now: daemon.openFds(),
  });
  t.ok(await pingWithin(bystander, 3000), 'still answering');
  noDaemonErrors(t, daemon);
  bystander.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('a client flooding pipelined requests without reading replies does not starve another', async (t) => {
  t.setTimeout(40_000);
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const bystander = clientOf(t, daemon);
  await bystander.connect();
  const baseline = daemon.openFds();

  const flood = await rawOf(t, daemon);
  flood.recorded.socket.setReading(false);
  const total = 5000;
  const ids = new Map<number, string>();
  const [fdA, fdB] = binding.streamPair();
  for (let i = 0; i < total; i++) {
    const id = flood.nextId();
    if (i % 50 === 0) {
      ids.set(id, 'echo');
      flood.send(requestFrame(id, 'echo', { i }, 1), [fdA]);
    } else if (i % 10 === 0) {
      ids.set(id, 'slow');
      flood.send(requestFrame(id, 'slow', { ms: 1 }), []);
    } else {
      ids.set(id, 'ping');
      flood.send(requestFrame(id, 'ping'), []);
    }
  }
  binding.closeAll([fdA, fdB]);
  t.ok(flood.recorded.socket.queued > 0, 'the flood backs up in the sender', { queued: flood.recorded.socket.queued });

  for (let i = 0; i < 20; i++) t.ok(await pingWithin(bystander, 3000), `bystander ping ${i} answered within 3 s`);
  t.ok(daemon.running(), 'the daemon is up');
  // Backpressure: the daemon stops reading a client that does not read its replies. Its request counter
  // settles (each stats call adds only itself) well short of the flood: it has not swallowed all of it.
  const requestsSeen = async (): Promise<number> =>
    ((await bystander.request('stats')).result as { counters: { requests: number } }).counters.requests;
  let settled = -1;
  let previous = await requestsSeen();
  for (let calm = 0; calm < 3; ) {
    const now = await requestsSeen();
    calm = now === previous + 1 ? calm + 1 : 0;
    previous = settled = now;
  }
  t.comment(`the daemon had read ${settled} requests (the flood is ${total})`);
  t.ok(settled < total, 'the daemon paused reading the flood while it kept serving others', { requestsSeen: settled, flood: total });

  flood.recorded.socket.setReading(true);
  const answered = new Map<number, number>();
  const codes = new Map<string, number>();
  let echoFds = 0;
  for (let i = 0; i < total; i++) {
    const answer = await flood.next(WAIT, `flood answer ${i}`);
    answered.set(answer.requestId, (answered.get(answer.requestId) ?? 0) + 1);
    const key = answer.type === 'error' ? answer.error.code : 'ok';
    codes.set(key, (codes.get(key) ?? 0) + 1);
    if (ids.get(answer.requestId) === 'echo') echoFds += answer.fds.length;
    binding.closeAll(answer.fds);
  }
  t.comment(`flood answers: ${JSON.stringify(Object.fromEntries(codes))}`);
  t.equal(echoFds, total / 50, 'each echo answer (reply or busy) carries its fd back');
  t.equal(answered.size, total, 'every request answered');
  t.ok([...answered.values()].every((n) => n === 1), 'each exactly once');
  t.ok([...ids.keys()].every((id) => answered.has(id)), 'under the ids sent');
  t.ok([...codes.keys()].every((code) => code === 'ok' || code === 'EFDFERRY_BUSY'), 'replies, or busy', {
    codes: Object.fromEntries(codes),
  });
  flood.close();
  t.ok(await eventually(() => daemon.openFds() === baseline), 'the daemon let go of the flood', { baseline, now: daemon.openFds() });
  t.ok(await pingWithin(bystander, 3000), 'and still answers');
  noDaemonErrors(t, daemon);
  bystander.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('after 10,000 mixed requests the daemon has exactly the fds it had before', async (t) => {
  t.setTimeout(60_000);
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const client = clientOf(t, daemon);
  const events = new Set<string>();
  client.on('event', (event: RpcEvent) => {
    binding.closeAll(event.fds);
    events.add(event.id);
  });
  await client.connect();
  const raw = await rawOf(t, daemon);
  const big = 'b'.repeat(70_000);

  type Outcome = { key: string; fdsBack: number };
  const request = async (method: string, params: Record<string, unknown>, fds: number[], extra: number[] = []): Promise<Outcome> => {
    try {
      const reply = await client.request(method, params, fds);
      binding.closeAll(reply.fds);
      return { key: `${method}:ok`, fdsBack: reply.fds.length };
    } catch (error) {
      const e = error as ProtocolError;
      binding.closeAll(e.fds);
      return { key: `${method}:${e.code}`, fdsBack: e.fds.length };
    } finally {
      binding.closeAll(extra);
    }
  };
  const one = async (i: number): Promise<Outcome> => {
    switch (i % 10) {
      case 0:
        return request('ping', {}, []);
      case 1: {
        const [a, b] = binding.streamPair();
        return request('echo', { i }, [a, binding.memfdCreate('e')], [b]);
      }
      case 2: {
        const [a, b] = binding.streamPair();
        return request('needsSocket', {}, [regularFile(), a], [b]);
      }
      case 3:
        return request('needsSocket', {}, binding.streamPair());
      case 4:
        return request('nope', {}, [binding.memfdCreate('n')]);
      case 5:
        return request('slow', { ms: 0 }, [binding.memfdCreate('s')]);
      case 6:
        return request('echo', { big }, [binding.memfdCreate('b')]);
      case 7:
        return request('ping', {}, [binding.memfdCreate('p')]);
      case 8:
        return request('later', { ms: 0 }, [binding.memfdCreate('l')]);
      default: {
        const [a, b] = binding.streamPair();
        try {
          raw.send(Buffer.from('garbage that is long enough for a header'), [a]);
          const answer = await raw.next(WAIT, 'the garbage answer');
          binding.closeAll(answer.fds);
          return { key: `garbage:${answer.type === 'error' ? answer.error.code : 'ok'}`, fdsBack: answer.fds.length };
        } finally {
          binding.closeAll([a, b]);
        }
      }
    }
  };
  // Warm up (one of each) before taking the daemon's baseline, so lazily opened fds do not count.
  for (let i = 0; i < 10; i++) await one(i);
  t.ok(await eventually(() => events.size === 1), 'the warm-up event arrived');
  t.same(await client.ack([...events]), { acked: 1, unknown: [] }, 'and is acked');
  events.clear();
  const baseline = daemon.openFds();

  const total = 10_000;
  const counts = new Map<string, number>();
  const fdsBack = new Map<string, number>();
  let next = 0;
  const started = Date.now();
  await Promise.all(
    Array.from({ length: 32 }, async () => {
      while (next < total) {
        const outcome = await one(next++);
        counts.set(outcome.key, (counts.get(outcome.key) ?? 0) + 1);
        fdsBack.set(outcome.key, (fdsBack.get(outcome.key) ?? 0) + outcome.fdsBack);
      }
    }),
  );
  t.comment(`10,000 requests in ${Date.now() - started} ms`);
  const each = total / 10;
  t.same(
    Object.fromEntries([...counts].sort()),
    {
      'echo:ok': 2 * each,
      'garbage:EFDFERRY_MAGIC': each,
      'later:ok': each,
      'needsSocket:EFDFERRY_FDKIND': each,
      'needsSocket:ok': each,
      'nope:EFDFERRY_METHOD': each,
      'ping:EFDFERRY_FDCOUNT': each,
      'ping:ok': each,
      'slow:ok': each,
    },
    'every request got the answer it should',
  );
  t.same(
    Object.fromEntries([...fdsBack].sort()),
    {
      'echo:ok': 3 * each,
      'garbage:EFDFERRY_MAGIC': each,
      'later:ok': 0,
      'needsSocket:EFDFERRY_FDKIND': 2 * each,
      'needsSocket:ok': 0,
      'nope:EFDFERRY_METHOD': each,
      'ping:EFDFERRY_FDCOUNT': each,
      'ping:ok': 0,
      'slow:ok': each,
    },
    'with the fds each should carry back',
  );
  t.ok(await eventually(() => events.size === each), 'every later event arrived', { events: events.size });
  const ids = [...events];
  for (let i = 0; i < ids.length; i += 4096) await client.ack(ids.slice(i, i + 4096));
  const stats = (await client.request('stats')).result as { mailbox: number; counters: Record<string, number> };
  t.equal(stats.mailbox, 0, 'the mailbox is empty after the acks');
  t.ok(await eventually(() => daemon.openFds() === baseline), 'the daemon is back to its baseline of open fds', {
    baseline,
    now: daemon.openFds(),
  });
  noDaemonErrors(t, daemon);
  raw.close();
  client.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('SIGTERM: pending requests fail as disconnected with their fds back, and the daemon exits 0 by itself', async (t) => {
  const before = openFds(); // the daemon's stdio pipes go with it
  const daemon = await startEchoDaemon(t);
  const client = clientOf(t, daemon);
  await client.connect();
  const held = await client.request('later', {}, [binding.memfdCreate('held')]);
  t.match(held.result, { id: /^later-/ }, 'an event is held');
  const fds = [binding.memfdCreate('slow-1'), binding.memfdCreate('slow-2')];
  const pending = client.request('slow', { ms: 60_000 }, fds).then(
    () => null,
    (e: ProtocolError) => e,
  );
  await client.request('stats'); // answered in order after the slow request was taken
  t.equal(await daemon.stop(), 0, 'exit code 0 after SIGTERM');
  const error = await withDeadline(pending, WAIT, 'the pending request to fail');
  t.equal(error?.code, 'EFDFERRY_DISCONNECTED');
  t.same(error?.fds, fds, 'with the fds back');
  binding.closeAll(error?.fds ?? []);
  t.notOk(fs.existsSync(daemon.socket), 'the socket file is removed');
  t.ok(daemon.lines.items.some((line) => line.msg === 'echo stopped'), 'it logged that it stopped');
  t.same(daemon.lines.items.filter((line) => Number(line.levelValue) >= 50), [], 'and no errors');
  client.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

/** A known lib bug: the assertions that show it are marked todo until lib is fixed (then drop the mark). */

t.test('a reply too large to encode with its fds is answered with an error, not a dropped connection', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const client = clientOf(t, daemon);
  await client.connect();
  // The request fits (253 fds, a body just under the inline limit); the echo reply adds fdCount and 253 kinds,
  // so its body must spill into a memfd: 254 fds, which no message can carry.
  const fds = Array.from({ length: 253 }, (_, i) => binding.memfdCreate(`r-${i}`));
  const outcome = await client.request('echo', { pad: 'p'.repeat(65_300) }, fds).then(
    (reply) => ({ code: 'ok', fds: reply.fds }),
    (error: ProtocolError) => ({ code: error.code, fds: error.fds }),
  );
  t.not(outcome.code, 'EFDFERRY_DISCONNECTED', 'answered on the connection, not by dropping it', {
    code: outcome.code,
  });
  t.ok(client.connected, 'the connection is still open');
  t.equal(outcome.fds.length, 253, 'the 253 fds come back either way');
  binding.closeAll(outcome.fds);
  client.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

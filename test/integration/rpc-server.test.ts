/**
 * The protocol server and client (lib/rpc) against a real daemon process (test/helpers/echo-daemon.ts) with
 * the real addon: sockets that keep working after a round trip through the daemon or on to another
 * process, the 253-fd limit with and without a memfd body, peer credentials, and long-task results that
 * outlive their SIGKILLed owner. Every test checks that this process ends with the fds it started with.
 */
import t from 'tap';
import type { Test } from 'tap';
import net from 'node:net';
import fs from 'node:fs';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { adoptSocket, detachSocket } from '../../lib/client/detach.js';
import { loadNative } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { RpcClient, type RpcEvent } from '../../lib/rpc/client.js';
import { Inbox, eventually, fdLeak, openFds, uniqueName, withDeadline } from '../helpers/native-helpers.js';
import { spawnClientChild, startEchoDaemon, type EchoDaemon } from '../helpers/rpc-processes.js';
import { inode } from '../helpers/rpc-raw.js';

const binding = loadNative();
const C = binding.constants;
const WAIT = 10_000;

t.setTimeout(60_000);

// Node and libuv open a few fds lazily and keep them (the SIGCHLD pipe on the first spawn, for one): pay for
// them before any test counts fds.
await warmUp();

async function warmUp(): Promise<void> {
  const child = spawn(process.execPath, ['-e', ''], { stdio: 'ignore' });
  await once(child, 'close');
  const server = net.createServer((socket) => socket.destroy());
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await once(client, 'close');
  server.close();
  await once(server, 'close');
}

/** A client of `daemon`, closed at teardown. */
function clientOf(t: Test, daemon: EchoDaemon, owner = uniqueName('owner')): RpcClient {
  const client = new RpcClient({ path: daemon.socket, owner, binding, reconnect: false, requestTimeoutMs: 20_000 });
  t.teardown(() => client.close());
  return client;
}

/** Polls an async condition until it holds or `ms` pass; returns whether it held. */
async function until(condition: () => Promise<boolean>, ms = WAIT): Promise<boolean> {
  const end = Date.now() + ms;
  while (!(await condition())) {
    if (Date.now() > end) return false;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  return true;
}

/** What the daemon's `stats` method says. */
async function stats(client: RpcClient): Promise<{ mailbox: number; connections: number; fds: number }> {
  return (await client.request('stats')).result as { mailbox: number; connections: number; fds: number };
}

/** The ProtocolError a promise rejects with (fails the test if it resolves). */
async function rejection(t: Test, promise: Promise<unknown>): Promise<ProtocolError> {
  try {
    await promise;
  } catch (error) {
    t.type(error, ProtocolError, 'rejects with a ProtocolError');
    return error as ProtocolError;
  }
  throw new Error('expected a rejection');
}

interface TcpConnection {
  server: net.Server;
  port: number;
  client: net.Socket;
  accepted: net.Socket;
  close(): Promise<void>;
}

async function tcpConnection(): Promise<TcpConnection> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as net.AddressInfo).port;
  const acceptedP = once(server, 'connection') as Promise<[net.Socket]>;
  const client = net.connect(port, '127.0.0.1');
  await once(client, 'connect');
  const [accepted] = await acceptedP;
  return { server, port, client, accepted, close: () => closeTcp(server, [client, accepted]) };
}

async function closeTcp(server: net.Server, sockets: net.Socket[]): Promise<void> {
  for (const socket of sockets) socket.destroy();
  server.close();
  if (server.listening) await once(server, 'close');
}

/** Collects what arrives on a net.Socket; the returned function waits until `text` is among it. */
function textCollector(socket: net.Socket): (text: string) => Promise<void> {
  let received = '';
  const waiters = new Set<() => void>();
  socket.on('data', (chunk: Buffer) => {
    received += chunk.toString();
    for (const wake of [...waiters]) wake();
  });
  return (text) =>
    withDeadline(
      new Promise<void>((resolve) => {
        const check = (): void => {
          if (received.includes(text)) {
            waiters.delete(check);
            resolve();
          }
        };
        waiters.add(check);
        check();
      }),
      WAIT,
      `"${text}" on the TCP connection (have "${received}")`,
    );
}

/** `count` memfds, each holding `fd-<i>`, so a returned fd can be checked by reading it back. */
function labelledMemfds(count: number): number[] {
  return Array.from({ length: count }, (_, i) => {
    const fd = binding.memfdCreate(`label-${i}`);
    fs.writeSync(fd, `fd-${i}`);
    return fd;
  });
}

function readLabel(fd: number): string {
  const buffer = Buffer.alloc(32);
  return buffer.subarray(0, fs.readSync(fd, buffer, 0, buffer.length, 0)).toString();
}

// -------------------------------------------------------------------------------------------------------------

t.test('a connected TCP socket sent through echo comes back working, bytes in flight included', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const client = clientOf(t, daemon);
  await client.connect();

  const tcp = await tcpConnection();
  const atServer = textCollector(tcp.accepted);
  const { fd, preface } = await detachSocket(tcp.client, binding);
  t.equal(preface.length, 0, 'nothing was read before the hand-over');
  const sentInode = inode(fd);
  // Written while the fd is on its way: it must wait in the kernel and reach whoever holds the socket next.
  tcp.accepted.write('in flight;');

  const reply = await client.request('echo', { label: 'tcp' }, [fd]);
  t.same(reply.result, { params: { label: 'tcp' }, fdCount: 1, kinds: ['socket'] }, 'the daemon saw one socket');
  t.equal(reply.fds.length, 1, 'one fd came back');
  const [returned] = reply.fds as [number];
  t.equal(inode(returned), sentInode, 'the same socket');
  t.match(binding.describeFd(returned), { kind: 'socket', family: C.AF_INET, type: C.SOCK_STREAM, connected: true });

  const back = adoptSocket(returned);
  const atClient = textCollector(back);
  await atClient('in flight;');
  back.write('client->server;');
  await atServer('client->server;');
  tcp.accepted.write('server->client;');
  await atClient('server->client;');
  t.pass('data flows both ways after the round trip');

  back.destroy();
  await closeTcp(tcp.server, [tcp.accepted]);
  client.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('a connected TCP socket handed to a different client process through the daemon keeps working there', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const owner = uniqueName('receiver');
  const child = spawnClientChild(t, 'receive-tcp', daemon.socket, [owner]);
  await child.waitFor((line) => line.ready === true, WAIT, 'the child to connect');

  const client = clientOf(t, daemon);
  await client.connect();
  const tcp = await tcpConnection();
  const atServer = textCollector(tcp.accepted);
  const { fd } = await detachSocket(tcp.client, binding);
  tcp.accepted.write('early bird;'); // in the kernel while the socket travels through two processes

  const reply = await client.request('later', { ms: 0, to: owner }, [fd]);
  t.match(reply.result, { id: /^later-/ }, 'accepted with a task id');
  t.equal(reply.fds.length, 0);

  await atServer(`hello from child ${child.pid}`);
  await atServer('pong:early bird;');
  tcp.accepted.write('ping;');
  await atServer('pong:ping;');
  t.pass('the child reads and writes the socket it received');
  const acked = await child.waitFor((line) => 'acked' in line, WAIT, 'the ack');
  t.same(acked.acked, { acked: 1, unknown: [] }, 'the child acknowledged the event');
  t.ok(await until(async () => (await stats(client)).mailbox === 0), 'the daemon forgot the acknowledged event');

  tcp.accepted.end();
  await child.waitFor((line) => line.done === true, WAIT, 'the child to see the end');
  t.equal(await withDeadline(child.exited, WAIT, 'the child to exit'), 0, 'the child exited cleanly', { output: child.output() });
  t.notOk(child.lines.items.some((line) => 'error' in line), 'the child reported no error', { lines: child.lines.items });

  await closeTcp(tcp.server, [tcp.accepted]);
  client.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('253 fds in one request arrive intact and come back usable', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const client = clientOf(t, daemon);
  await client.connect();
  const daemonBaseline = daemon.openFds();

  const pairs = Array.from({ length: 253 }, () => binding.streamPair());
  const sent = pairs.map(([a]) => a);
  const inodes = sent.map(inode);
  const reply = await client.request('echo', { n: 253 }, sent);
  t.equal(reply.result.fdCount, 253, 'the daemon received 253 fds');
  t.equal(reply.fds.length, 253, '253 came back');
  t.same(reply.fds.map(inode), inodes, 'the same sockets, in the order sent');
  let usable = 0;
  for (const [i, fd] of reply.fds.entries()) {
    fs.writeSync(pairs[i]![1], `m${i};`);
    const buffer = Buffer.alloc(16);
    try {
      // An AF_UNIX write is in the peer's queue when writeSync returns, so this read cannot come too early.
      if (buffer.subarray(0, fs.readSync(fd, buffer)).toString() === `m${i};`) usable++;
    } catch {
      // EAGAIN: not the socket whose other end was written to
    }
  }
  t.equal(usable, 253, 'each returned fd reads what was written to its other end');
  binding.closeAll(reply.fds);
  binding.closeAll(pairs.map(([, b]) => b));
  t.ok(await eventually(() => daemon.openFds() === daemonBaseline), 'the daemon closed its copies', {
    baseline: daemonBaseline,
    now: daemon.openFds(),
  });
  client.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('254 fds are refused client-side with EFDFERRY_TOOMANYFDS, and nothing leaks', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const client = clientOf(t, daemon);
  await client.connect();
  const daemonBaseline = daemon.openFds();

  const fds = labelledMemfds(254);
  const count = openFds().length;
  const error = await rejection(t, client.request('echo', {}, fds));
  t.equal(error.code, 'EFDFERRY_TOOMANYFDS');
  t.same(error.fds, fds, 'every fd comes back on the error, in order');
  t.equal(openFds().length, count, 'no fd opened or closed in this process');
  t.equal(error.fds.map(readLabel).join(','), fds.map((_, i) => `fd-${i}`).join(','), 'and each is still open');
  t.equal(daemon.openFds(), daemonBaseline, 'the daemon got nothing');
  t.match((await client.request('ping')).result, { pong: true }, 'the connection still works');
  binding.closeAll(error.fds);
  client.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('252 fds plus a body spilled into a memfd work; 253 plus a spilled body are refused with the fds back', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const client = clientOf(t, daemon);
  await client.connect();
  const daemonBaseline = daemon.openFds();
  const blob = 'x'.repeat(100_000); // over the 65,516-byte inline limit

  const fds = labelledMemfds(252);
  const reply = await client.request('echo', { blob }, fds);
  t.equal(reply.result.fdCount, 252, 'the daemon received 252 fds (the body memfd not among them)');
  t.equal((reply.result.params as { blob: string }).blob, blob, 'the spilled body arrived and came back whole');
  t.equal(reply.fds.length, 252, '252 fds came back with a spilled reply');
  t.equal(reply.fds.map(readLabel).join(','), fds.map((_, i) => `fd-${i}`).join(','), 'each is the memfd sent, in order');
  binding.closeAll(reply.fds);

  const more = labelledMemfds(253);
  const count = openFds().length;
  const error = await rejection(t, client.request('echo', { blob }, more));
  t.equal(error.code, 'EFDFERRY_TOOMANYFDS', 'refused: 253 fds plus the body memfd');
  t.same(error.fds, more, 'the 253 fds come back on the error');
  t.equal(openFds().length, count, 'no body memfd left behind in this process');
  t.equal(error.fds.map(readLabel).join(','), more.map((_, i) => `fd-${i}`).join(','), 'all still open');
  binding.closeAll(error.fds);

  t.match((await client.request('ping')).result, { pong: true }, 'the connection still works');
  t.ok(await eventually(() => daemon.openFds() === daemonBaseline), 'the daemon closed its copies and the body memfds', {
    baseline: daemonBaseline,
    now: daemon.openFds(),
  });
  client.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('peer credentials and owner key match the real client process', async (t) => {
  const daemon = await startEchoDaemon(t);
  const owner = uniqueName('peer');
  const client = clientOf(t, daemon, owner);
  await client.connect();
  const uid = process.getuid!();
  const gid = process.getgid!();
  const mine = (await client.request('peer')).result;
  t.same(mine, { peer: { pid: process.pid, uid, gid }, owner, ownerKey: `${uid}:${owner}` }, 'this process');

  const childOwner = uniqueName('peer-child');
  const child = spawnClientChild(t, 'peer', daemon.socket, [childOwner]);
  const line = await child.waitFor((l) => 'result' in l || 'error' in l, WAIT, 'the peer report');
  t.same([line.uid, line.gid], [uid, gid], 'the child runs as this user');
  t.same(
    line.result,
    { peer: { pid: child.pid, uid, gid }, owner: childOwner, ownerKey: `${uid}:${childOwner}` },
    'a child process: its own pid, uid and gid',
  );
  t.not(child.pid, process.pid);
  t.equal(await withDeadline(child.exited, WAIT, 'the child to exit'), 0);
  client.close();
});

t.test('a long task result outlives its SIGKILLed owner and goes to the next client of that owner until acked', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const owner = uniqueName('proxy');
  const other = clientOf(t, daemon, uniqueName('operator'));
  await other.connect();
  const daemonBaseline = daemon.openFds();

  // The child connects to our TCP server, writes, and hands its socket to `later` (held until released).
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const acceptedP = once(server, 'connection') as Promise<[net.Socket]>;
  const child = spawnClientChild(t, 'later', daemon.socket, [owner, String((server.address() as net.AddressInfo).port)]);
  const [accepted] = await withDeadline(acceptedP, WAIT, 'the child to connect over TCP');
  const atServer = textCollector(accepted);
  await atServer(`child ${child.pid} was here`);
  const { id } = (await child.waitFor((line) => 'id' in line || 'error' in line, WAIT, 'the task id')) as { id: string };
  t.match(id, /^later-/, 'the child got a task id');

  child.kill('SIGKILL');
  t.equal(await withDeadline(child.exited, WAIT, 'the child to die'), 'SIGKILL');
  t.ok(await until(async () => (await stats(other)).connections === 1), 'the daemon saw the owner go');

  t.same((await other.request('release', { id })).result, { released: id }, 'the result is produced with its owner gone');
  t.equal((await stats(other)).mailbox, 1, 'and kept in the mailbox');

  // A new client with the same owner id collects it; it does not ack, so the next one gets it again.
  const collect = async (ackIt: boolean): Promise<{ pending: number; event: RpcEvent }> => {
    const client = clientOf(t, daemon, owner);
    const events = new Inbox<RpcEvent>();
    client.on('event', (event) => events.push(event));
    const hello = await client.connect();
    const [event] = await events.wait(1, WAIT, 'the kept result');
    if (ackIt) t.same(await client.ack([id]), { acked: 1, unknown: [] }, 'acked');
    client.close();
    return { pending: hello.pending, event: event! };
  };
  const first = await collect(false);
  t.equal(first.pending, 1, 'hello says one result is waiting');
  t.match(first.event, { event: 'done', id, data: { id, fromPid: child.pid } }, 'the result, naming the dead child');
  t.equal(first.event.fds.length, 1, 'with its fd');
  const firstInode = inode(first.event.fds[0]!);
  const socket = adoptSocket(first.event.fds[0]!);
  const atClient = textCollector(socket);
  socket.write('new owner here;');
  await atServer('new owner here;');
  accepted.write('welcome;');
  await atClient('welcome;');
  t.pass('the fd of the dead owner works for the new one');

  const second = await collect(true);
  t.equal(second.pending, 1, 'not acked: delivered again');
  t.equal(second.event.id, id, 'same id (the client deduplicates by it)');
  t.equal(second.event.fds.length, 1, 'with its fd');
  t.equal(inode(second.event.fds[0]!), firstInode, 'the same socket again');
  binding.closeAll(second.event.fds);
  t.equal((await stats(other)).mailbox, 0, 'the ack removed it');

  const third = clientOf(t, daemon, owner);
  const late: RpcEvent[] = [];
  third.on('event', (event) => late.push(event));
  t.equal((await third.connect()).pending, 0, 'nothing pending for the owner any more');
  await third.request('ping'); // any kept result would have been sent before this reply
  t.same(late, [], 'and nothing delivered');
  third.close();

  socket.destroy();
  await closeTcp(server, [accepted]);
  t.ok(await eventually(() => daemon.openFds() === daemonBaseline), 'the daemon closed its copy of the socket after the ack', {
    baseline: daemonBaseline,
    now: daemon.openFds(),
  });
  other.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

t.test('a result delivered while its owner is connected arrives at once, fd included', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const client = clientOf(t, daemon);
  const events = new Inbox<RpcEvent>();
  client.on('event', (event) => events.push(event));
  await client.connect();
  const [fd] = labelledMemfds(1) as [number];
  const { result } = await client.request('later', { ms: 20 }, [fd]);
  const [event] = await events.wait(1, WAIT, 'the event');
  t.match(event, { event: 'done', id: result.id, data: { ms: 20, fromPid: process.pid } });
  t.equal(readLabel(event!.fds[0]!), 'fd-0', 'the memfd we sent');
  binding.closeAll(event!.fds);
  t.same(await client.ack([result.id as string, 'no-such-id']), { acked: 1, unknown: ['no-such-id'] });
  client.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

/** Known lib bugs: the assertions that show them are marked todo until lib is fixed (then drop the mark). */

t.test('an error answer arriving after its request timed out does not crash a client without an error listener', async (t) => {
  const daemon = await startEchoDaemon(t);
  const child = spawnClientChild(t, 'late-error', daemon.socket, [uniqueName('late')]);
  const early = await child.waitFor((line) => 'early' in line || 'error' in line, WAIT, 'the timeout');
  t.equal(early.early, 'EFDFERRY_TIMEOUT', 'the first request timed out client-side');
  const status = await withDeadline(child.exited, WAIT, 'the child to finish');
  t.ok(child.lines.items.some((line) => line.survived === true), 'the client lived on after the late error', {
    output: child.output(),
  });
  t.equal(status, 0, 'and exited cleanly');
});

t.test('an owner with two connections: closing the newer one does not stop results reaching the older', async (t) => {
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const owner = uniqueName('pool');
  const older = clientOf(t, daemon, owner);
  const newer = clientOf(t, daemon, owner);
  const operator = clientOf(t, daemon, uniqueName('operator'));
  const events = new Inbox<RpcEvent>();
  older.on('event', (event) => events.push(event));
  await older.connect();
  await newer.connect();
  await operator.connect();
  newer.close();
  t.ok(await until(async () => (await stats(operator)).connections === 2), 'the daemon saw the newer connection go');

  const { result } = await operator.request('later', { to: owner }, labelledMemfds(1));
  await operator.request('release', { id: result.id });
  const delivered = await events.wait(1, 3000, 'the result on the older connection').then(
    (list) => list,
    () => [] as RpcEvent[],
  );
  t.equal(delivered.length, 1, 'the still-connected older connection gets the result at once');
  for (const event of delivered) binding.closeAll(event.fds);
  await older.ack([result.id as string]);
  older.close();
  operator.close();
  t.equal(await fdLeak(before), null, 'no fd leaked in this process');
});

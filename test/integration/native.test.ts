/**
 * Integration tests of the real C++ addon (build/Release/fdferry.node): syscalls, SCM_RIGHTS, the libuv
 * poller, Node-shaped errors, and fd hygiene. Every test checks that the process has exactly the fds it had
 * before the test once the test is over.
 */
import t from 'tap';
import { execFile, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { loadNative } from '../../lib/native.js';
import type { SeqpacketListener } from '../../lib/native.js';
import {
  FDINFO_CLOEXEC,
  Inbox,
  eventually,
  fdFlags,
  fdLeak,
  openFds,
  openRecorded,
  uniqueName,
  withDeadline,
} from '../helpers/native-helpers.js';

const native = loadNative();
const C = native.constants;
const execFileAsync = promisify(execFile);
const childScript = fileURLToPath(new URL('../helpers/native-child.ts', import.meta.url));
const ALL_SEALS = C.F_SEAL_SHRINK! | C.F_SEAL_GROW! | C.F_SEAL_WRITE! | C.F_SEAL_SEAL!;
const WAIT = 10_000;

type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

/** The RLIMIT_NOFILE tests lower a child's limit with prlimit(1) from util-linux. */
const hasPrlimit = !spawnSync('prlimit', ['--version'], { stdio: 'ignore' }).error;
const prlimitSkip: { skip: string | false } = { skip: hasPrlimit ? false : 'prlimit (util-linux) is not installed' };

t.setTimeout(120_000);

// Node and libuv open a few fds lazily and keep them (the SIGCHLD signal pipe on the first spawn, for one).
// Pay for them once here so that the per-test fd accounting sees only what the tests themselves open.
await warmUp();

/** A subtest that fails if the process has more (or fewer) fds once `body` is done than before it ran. */
function leakChecked(name: string, body: (t: Tap) => Promise<void>): void;
function leakChecked(name: string, options: { skip: string | false }, body: (t: Tap) => Promise<void>): void;
function leakChecked(
  name: string,
  optionsOrBody: { skip: string | false } | ((t: Tap) => Promise<void>),
  maybeBody?: (t: Tap) => Promise<void>,
): void {
  const [options, body] = typeof optionsOrBody === 'function' ? [{}, optionsOrBody] : [optionsOrBody, maybeBody!];
  t.test(name, options, async (t) => {
    const before = openFds();
    await body(t);
    t.equal(await fdLeak(before), null, 'no fd leaked');
  });
}

async function warmUp(): Promise<void> {
  const child = spawn(process.execPath, ['-e', ''], { stdio: 'ignore', env: {} });
  await once(child, 'close');
  const server = net.createServer((socket) => socket.destroy());
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await once(client, 'close');
  server.close();
  await once(server, 'close');
}

/** The fd behind a net.Socket or net.Server (internal, but the only way to hand an adopted socket over). */
function handleFd(owner: net.Socket | net.Server): number {
  const fd = (owner as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('no fd on this handle');
  return fd;
}

/** A short private directory for filesystem socket paths (sun_path is only 108 bytes). */
function tempDir(t: Tap): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fdf-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

interface TcpConnection {
  server: net.Server;
  client: net.Socket;
  accepted: net.Socket;
  close(): Promise<void>;
}

async function tcpConnection(): Promise<TcpConnection> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const acceptedP = once(server, 'connection') as Promise<[net.Socket]>;
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await once(client, 'connect');
  const [accepted] = await acceptedP;
  return {
    server,
    client,
    accepted,
    async close() {
      client.destroy();
      accepted.destroy();
      server.close();
      await once(server, 'close');
    },
  };
}

/** Collects what arrives on a net.Socket and waits for a given text to be among it. */
function textCollector(socket: net.Socket): (text: string) => Promise<void> {
  let received = '';
  const waiters = new Set<() => void>();
  socket.on('data', (chunk: Buffer) => {
    received += chunk.toString();
    for (const wake of waiters) wake();
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

/** Spawns test/helpers/native-child.ts with `fd` as its fd 3, under the same TS loader as this file. */
function spawnChild(
  mode: string,
  fd: number,
  args: string[] = [],
): { pid: number; exited: Promise<number | null>; output: () => string } {
  const child = spawn(process.execPath, [...process.execArgv, childScript, mode, ...args], {
    stdio: ['ignore', 'pipe', 'pipe', fd],
  });
  let output = '';
  child.stdout?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  // 'close', not 'exit': the stdio pipes are closed by then, so the fd accounting sees them gone.
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  if (child.pid === undefined) throw new Error('spawn failed');
  return { pid: child.pid, exited, output: () => output };
}

const json = (data: Buffer): Record<string, unknown> => JSON.parse(data.toString()) as Record<string, unknown>;

// -------------------------------------------------------------------------------------------------------------

leakChecked('errors are Node-shaped', async (t) => {
  const badClose = (fd: number): unknown => {
    try {
      native.close(fd);
    } catch (error) {
      return error;
    }
    return undefined;
  };
  const error = badClose(-1);
  t.ok(error instanceof Error, 'an Error');
  t.match(error, { code: 'EBADF', errno: -9, syscall: 'close', message: 'close EBADF: bad file descriptor' });

  const fd = native.memfdCreate('closed-twice');
  native.close(fd);
  t.match(badClose(fd), { code: 'EBADF', errno: -9, syscall: 'close' }, 'closing a closed fd');

  const missing = path.join(tempDir(t), 'nobody-listens');
  t.throws(() => native.seqpacketConnect(missing), {
    code: 'ENOENT',
    errno: -2,
    syscall: 'connect',
    path: missing,
    message: `connect ENOENT: no such file or directory '${missing}'`,
  });
  t.throws(() => native.describeFd(-1), { code: 'EBADF', syscall: 'fstat' });
  t.throws(() => native.dup(-1), { code: 'EBADF', syscall: 'fcntl' });
  t.throws(() => native.close('3' as unknown as number), TypeError, 'usage errors are TypeErrors');
});

leakChecked('seqpacketPair carries data both ways', async (t) => {
  const [a, b] = native.seqpacketPair();
  t.not(a, b);
  for (const fd of [a, b]) {
    t.match(native.describeFd(fd), { kind: 'socket', family: C.AF_UNIX, type: C.SOCK_SEQPACKET, connected: true });
    t.ok(fdFlags(fd) & FDINFO_CLOEXEC, 'close-on-exec');
    t.ok(fdFlags(fd) & C.O_NONBLOCK!, 'nonblocking');
  }
  const left = openRecorded(native, a);
  const right = openRecorded(native, b);
  t.equal(left.socket.fd, a);
  t.equal(left.socket.send(Buffer.from('hello'), []), true, 'send returns true below the high-water mark');
  t.equal(left.socket.queued, 0);
  right.socket.send(new Uint8Array([1, 2, 3]), []);
  // A view into a larger buffer: only the viewed bytes go out.
  right.socket.send(new Uint8Array(Buffer.from('xxsubarrayxx')).subarray(2, 10), []);

  const [toRight] = await right.messages.wait(1, WAIT, 'messages to the right');
  t.equal(toRight?.data.toString(), 'hello');
  t.same(toRight?.fds, []);
  t.equal(toRight?.fault, null);
  const toLeft = await left.messages.wait(2, WAIT, 'messages to the left');
  t.same([...(toLeft[0]?.data ?? [])], [1, 2, 3]);
  t.equal(toLeft[1]?.data.toString(), 'subarray');

  left.socket.close();
  right.socket.close();
  t.equal(left.socket.fd, -1);
});

leakChecked('listen, accept and connect on a filesystem path; SO_PEERCRED', async (t) => {
  const socketPath = path.join(tempDir(t), 's');
  const listenFd = native.seqpacketListen(socketPath, 8);
  t.match(native.describeFd(listenFd), { kind: 'socket', type: C.SOCK_SEQPACKET, listening: true, connected: false });
  t.ok(fs.statSync(socketPath).isSocket(), 'bound to the path');

  const accepted = new Inbox<number>();
  const listener: SeqpacketListener = native.openListener(listenFd, (error, fd) => {
    if (error) throw error;
    accepted.push(fd);
  });
  t.equal(listener.fd, listenFd);
  // Paused: the connection waits in the backlog and is accepted once we resume.
  listener.setAccepting(false);
  const clientFd = native.seqpacketConnect(socketPath);
  listener.setAccepting(true);
  const [serverFd] = await accepted.wait(1, WAIT, 'accepted connections');
  if (serverFd === undefined) throw new Error('unreachable');
  t.ok(fdFlags(serverFd) & FDINFO_CLOEXEC, 'accepted fd is close-on-exec');
  t.ok(fdFlags(serverFd) & C.O_NONBLOCK!, 'accepted fd is nonblocking');

  const client = openRecorded(native, clientFd);
  const server = openRecorded(native, serverFd);
  const credentials = { pid: process.pid, uid: process.getuid!(), gid: process.getgid!() };
  t.same(client.socket.peerCredentials(), credentials, 'the listener side is this process');
  t.same(server.socket.peerCredentials(), credentials, 'the connect()ing side is this process');

  client.socket.send(Buffer.from('ping'), []);
  const [ping] = await server.messages.wait(1, WAIT, 'ping');
  t.equal(ping?.data.toString(), 'ping');
  server.socket.send(Buffer.from('pong'), []);
  const [pong] = await client.messages.wait(1, WAIT, 'pong');
  t.equal(pong?.data.toString(), 'pong');

  client.socket.close();
  server.socket.close();
  listener.close();
  t.equal(listener.fd, -1);
  listener.close(); // idempotent
});

leakChecked('listen and connect on an abstract name', async (t) => {
  const name = `\0${uniqueName('fdferry-test')}`;
  const listenFd = native.seqpacketListen(name, 8);
  t.throws(() => native.seqpacketListen(name, 8), { code: 'EADDRINUSE', syscall: 'bind', path: name });
  const accepted = new Inbox<number>();
  const listener = native.openListener(listenFd, (error, fd) => {
    if (error) throw error;
    accepted.push(fd);
  });
  const clientFd = native.seqpacketConnect(name);
  const [serverFd] = await accepted.wait(1, WAIT, 'accepted connections');
  if (serverFd === undefined) throw new Error('unreachable');
  const client = openRecorded(native, clientFd);
  const server = openRecorded(native, serverFd);
  t.same(server.socket.peerCredentials().pid, process.pid);
  server.socket.send(Buffer.from('abstract'), []);
  const [message] = await client.messages.wait(1, WAIT, 'a message');
  t.equal(message?.data.toString(), 'abstract');
  client.socket.close();
  server.socket.close();
  listener.close();
  // The name is released with the socket: binding it again works.
  native.close(native.seqpacketListen(name, 1));
});

leakChecked('socket path length limits', async (t) => {
  const dir = tempDir(t);
  const exact = path.join(dir, 'p'.repeat(107 - dir.length - 1));
  t.equal(Buffer.byteLength(exact), 107);
  native.close(native.seqpacketListen(exact, 1));
  t.ok(fs.statSync(exact).isSocket(), 'a 107-byte path binds');
  fs.unlinkSync(exact);

  const tooLong = `${exact}q`;
  for (const call of [() => native.seqpacketListen(tooLong, 1), () => native.seqpacketConnect(tooLong)]) {
    t.throws(call, { code: 'ENAMETOOLONG', path: tooLong, message: /name too long/ });
  }
  t.throws(() => native.seqpacketListen(tooLong, 1), { code: 'ENAMETOOLONG', syscall: 'bind' });
  t.throws(() => native.seqpacketConnect(tooLong), { code: 'ENAMETOOLONG', syscall: 'connect' });

  const abstract = `\0${uniqueName('a').padEnd(107, 'x')}`;
  native.close(native.seqpacketListen(abstract, 1));
  t.pass('an abstract name of 107 bytes after the NUL binds');
  t.throws(() => native.seqpacketListen(`${abstract}x`, 1), { code: 'ENAMETOOLONG' });
  t.throws(() => native.seqpacketListen('', 1), { code: 'EINVAL' }, 'no accidental autobind');
  t.throws(() => native.seqpacketListen(`${dir}/a\0b`, 1), { code: 'EINVAL' }, 'no NUL inside a path');
  t.equal(fs.readdirSync(dir).length, 0, 'nothing was bound by the failures');
});

leakChecked('SCM_RIGHTS: 253 fds in one message arrive distinct, usable and close-on-exec', async (t) => {
  const memfd = native.memfdCreate('scm-rights');
  fs.ftruncateSync(memfd, 253);
  const dups = Array.from({ length: 253 }, () => native.dup(memfd));
  const [a, b] = native.seqpacketPair();
  const sender = openRecorded(native, a);
  const receiver = openRecorded(native, b);
  t.equal(sender.socket.send(Buffer.from('many'), dups), true);
  native.closeAll(dups);

  const [message] = await receiver.messages.wait(1, WAIT, 'the message');
  if (!message) throw new Error('unreachable');
  t.equal(message.fault, null);
  t.equal(message.fds.length, 253, 'all 253 arrived');
  t.equal(new Set(message.fds).size, 253, 'distinct numbers');
  t.notOk(message.fds.includes(memfd), 'new fds, not the sender numbers');
  t.ok(message.fds.every((fd) => fdFlags(fd) & FDINFO_CLOEXEC), 'every one is close-on-exec');
  // Each received fd is a live handle on the same memfd: write one byte through each, read them all back.
  message.fds.forEach((fd, i) => fs.writeSync(fd, Buffer.from([i]), 0, 1, i));
  const readBack = Buffer.alloc(253);
  fs.readSync(memfd, readBack, 0, 253, 0);
  t.ok(readBack.every((byte, i) => byte === i), 'every fd wrote through to the memfd');
  native.closeAll(message.fds);

  const tooMany = Array.from({ length: 254 }, () => native.dup(memfd));
  const count = openFds().length;
  t.throws(() => sender.socket.send(Buffer.from('too many'), tooMany), { code: 'EFDFERRY_TOOMANYFDS' });
  t.equal(openFds().length, count, 'a refused send opens no fd');
  t.equal(sender.socket.queued, 0, 'and queues nothing');
  native.closeAll(tooMany);

  sender.socket.close();
  receiver.socket.close();
  native.close(memfd);
});

leakChecked('a connected TCP socket sent to a child process keeps working there', async (t) => {
  const tcp = await tcpConnection();
  const [mine, theirs] = native.seqpacketPair();
  const control = openRecorded(native, mine);
  const child = spawnChild('tcp', theirs);
  native.close(theirs); // the child has its own copy as fd 3
  const waitText = textCollector(tcp.accepted);

  const [ready] = await control.messages.wait(1, WAIT, 'the child to start');
  t.same(json(ready!.data), { ready: true }, 'the child started', { output: child.output() });

  // Hand over the client side: pause it so it reads nothing more, send its fd, then drop our copy. destroy()
  // only closes our fd; the connection lives on in the child.
  tcp.client.pause();
  control.socket.send(Buffer.from('tcp'), [handleFd(tcp.client)]);
  tcp.client.destroy();

  await waitText('hello from child');
  tcp.accepted.write('ping');
  await waitText('pong:ping');
  t.pass('data flows both ways through the handed-over socket');
  tcp.accepted.end();

  const [, done] = await control.messages.wait(2, WAIT, 'the child to finish');
  t.same(json(done!.data), { done: true });
  const code = await withDeadline(child.exited, WAIT, 'the child to exit');
  t.equal(code, 0, 'the child exited cleanly', { output: child.output() });
  const closes = await control.closes.wait(1, WAIT, 'the control socket to close');
  t.same(closes, [null], 'peer EOF reported as close(null)');
  await tcp.close();
});

leakChecked('backpressure: queue until false, drain, order and duplicated fds', async (t) => {
  const [a, b] = native.seqpacketPair();
  const sender = openRecorded(native, a);
  const receiver = openRecorded(native, b);
  receiver.socket.setReading(false); // the peer does not read: the kernel buffer fills, then our queue

  const expected: string[] = [];
  const withFd = new Set<number>();
  let accepted = true;
  while (accepted) {
    const i = expected.length;
    const text = `message-${i}`;
    const fds: number[] = [];
    if (i % 64 === 0) {
      const memfd = native.memfdCreate(text);
      fs.writeSync(memfd, text);
      fds.push(memfd);
      withFd.add(i);
    }
    accepted = sender.socket.send(Buffer.from(text), fds);
    // The caller's fds go right away: a queued message must hold its own duplicates.
    native.closeAll(fds);
    expected.push(text);
    if (i > 100_000) throw new Error('send never reported backpressure');
  }
  t.equal(sender.socket.queued, C.HIGH_WATER_MARK, 'false exactly at the high-water mark');
  const firstQueued = expected.length - sender.socket.queued;
  t.ok([...withFd].some((i) => i >= firstQueued), 'some queued messages carry fds');
  t.equal(sender.drains.items.length, 0, 'no drain yet');

  receiver.socket.setReading(true);
  const [queuedAtDrain] = await sender.drains.wait(1, WAIT, 'drain');
  t.equal(queuedAtDrain, 0, 'drain fires once the queue is empty');
  const received = await receiver.messages.wait(expected.length, WAIT, 'messages');
  t.same(
    received.map((m) => m.data.toString()),
    expected,
    'every message arrived, in order',
  );
  received.forEach((message, i) => {
    if (!withFd.has(i)) return;
    const [fd] = message.fds;
    t.equal(message.fds.length, 1, `message ${i} carries its fd`);
    const content = Buffer.alloc(64);
    const n = fs.readSync(fd!, content, 0, 64, 0);
    t.equal(content.subarray(0, n).toString(), expected[i], `message ${i}'s fd is its own memfd`);
    native.close(fd!);
  });
  t.equal(sender.drains.items.length, 1, 'drain fired once');
  sender.socket.close();
  receiver.socket.close();
});

const ctruncTest = 'MSG_CTRUNC: a receiver at RLIMIT_NOFILE gets a fault and keeps its fd count';
leakChecked(ctruncTest, prlimitSkip, async (t) => {
  const [mine, theirs] = native.seqpacketPair();
  const control = openRecorded(native, mine);
  const child = spawnChild('ctrunc', theirs);
  native.close(theirs);
  const [ready] = await control.messages.wait(1, WAIT, 'the child to start');
  const { open } = json(ready!.data);
  t.ok(Array.isArray(open), 'the child reported its open fds', { output: child.output() });

  // Lower the child's RLIMIT_NOFILE so that only 4 fd numbers are free below it (fds are allocated lowest
  // first, and inherited fds can leave gaps), far fewer than the 200 we send.
  const taken = new Set(open as number[]);
  let limit = 0;
  for (let free = 0; free < 4; limit++) if (!taken.has(limit)) free++;
  await execFileAsync('prlimit', ['--pid', String(child.pid), `--nofile=${limit}:${limit}`]);

  const memfd = native.memfdCreate('ctrunc');
  const many = Array.from({ length: 200 }, () => native.dup(memfd));
  control.socket.send(Buffer.from('many'), many);
  native.closeAll(many);
  const two = [native.dup(memfd), native.dup(memfd)];
  control.socket.send(Buffer.from('two'), two);
  native.closeAll(two);
  native.close(memfd);

  const [, first, second] = (await control.messages.wait(3, WAIT, 'the child reports')).map((m) => json(m.data));
  const wanted = { message: 1, fds: 0, fault: { ctrunc: true, trunc: false } };
  t.match(first, wanted, 'MSG_CTRUNC reported, no fds handed out', { output: child.output() });
  t.equal(first?.after, first?.before, 'the fds that did arrive were closed');
  t.match(second, { message: 2, fds: 2, fault: null }, 'the socket still works after the fault');
  const code = await withDeadline(child.exited, WAIT, 'the child to exit');
  t.equal(code, 0, 'the child exited cleanly', { output: child.output() });
  await control.closes.wait(1, WAIT, 'the control socket to close');
});

leakChecked('a listener at EMFILE reports the error and backs off instead of spinning', prlimitSkip, async (t) => {
  const name = uniqueName('fdferry-emfile');
  const [mine, theirs] = native.seqpacketPair();
  const control = openRecorded(native, mine);
  const child = spawnChild('emfile', theirs, [name]);
  native.close(theirs);
  const [ready] = await control.messages.wait(1, WAIT, 'the child to start');
  const { open, reserve } = json(ready!.data) as { open: number[]; reserve: number };

  // No free fd number below the limit: the child's next accept4 fails with EMFILE until it frees `reserve`.
  const taken = new Set(open);
  let limit = 0;
  while (taken.has(limit)) limit++;
  t.ok(reserve < limit, 'the reserve fd counts against the limit', { open, reserve, limit });
  await execFileAsync('prlimit', ['--pid', String(child.pid), `--nofile=${limit}:${limit}`]);
  const client = native.seqpacketConnect(`\0${name}`);

  const [, result] = await control.messages.wait(2, WAIT, 'the child to accept');
  const { codes, gaps } = json(result!.data) as { codes: string[]; gaps: number[] };
  t.same(codes, ['EMFILE', 'EMFILE', 'EMFILE'], 'each failed accept4 is reported', { output: child.output() });
  // A level-triggered poll on a listener whose backlog is not empty wakes at once: without the back-off these
  // errors would come microseconds apart, as fast as the loop can spin.
  const spacing = gaps.map((gap) => gap.toFixed(1)).join(', ');
  t.ok(gaps.length === 2 && gaps.every((gap) => gap >= 80), `retries are spaced by the back-off (${spacing} ms)`);
  const code = await withDeadline(child.exited, WAIT, 'the child to exit');
  t.equal(code, 0, 'the child exited cleanly', { output: child.output() });
  native.close(client);
  await control.closes.wait(1, WAIT, 'the control socket to close');
});

leakChecked('MSG_TRUNC: an oversized message is reported and its fds closed', async (t) => {
  const [a, b] = native.seqpacketPair();
  const sender = openRecorded(native, a);
  const receiver = openRecorded(native, b);
  const memfd = native.memfdCreate('trunc');
  sender.socket.send(Buffer.alloc(C.MAX_FRAME! + 1, 1), [memfd]);
  native.close(memfd);
  const [message] = await receiver.messages.wait(1, WAIT, 'the message');
  t.same(message?.fault, { ctrunc: false, trunc: true });
  t.same(message?.fds, [], 'the fd that came with it was closed');
  t.equal(message?.data.length, C.MAX_FRAME, 'data is what fitted');
  sender.socket.close();
  receiver.socket.close();
});

leakChecked('memfd: create, write, seal', async (t) => {
  const fd = native.memfdCreate('sealed-state');
  t.match(native.describeFd(fd), { kind: 'file', size: 0 });
  t.ok(fdFlags(fd) & FDINFO_CLOEXEC, 'MFD_CLOEXEC');
  t.equal(native.memfdSeals(fd), 0, 'sealable and not sealed yet');
  fs.writeSync(fd, 'state');
  native.memfdSeal(fd);
  t.equal(native.memfdSeals(fd) & ALL_SEALS, ALL_SEALS, 'all four seals');
  t.throws(() => fs.writeSync(fd, 'more'), { code: 'EPERM' }, 'F_SEAL_WRITE');
  t.throws(() => fs.ftruncateSync(fd, 0), { code: 'EPERM' }, 'F_SEAL_SHRINK');
  t.throws(() => native.memfdSeal(fd), { code: 'EPERM', syscall: 'fcntl' }, 'F_SEAL_SEAL');
  t.match(native.describeFd(fd), { kind: 'file', size: 5 });
  const content = Buffer.alloc(5);
  fs.readSync(fd, content, 0, 5, 0);
  t.equal(content.toString(), 'state');
  native.close(fd);

  const [r, w] = native.streamPair();
  t.throws(() => native.memfdSeals(r), { code: 'EINVAL', syscall: 'fcntl' }, 'not a memfd');
  native.closeAll([r, w]);
});

leakChecked('describeFd and tcpInfo', async (t) => {
  const tcp = await tcpConnection();
  t.match(native.describeFd(handleFd(tcp.client)), {
    kind: 'socket',
    family: C.AF_INET,
    type: C.SOCK_STREAM,
    protocol: C.IPPROTO_TCP,
    listening: false,
    connected: true,
  });
  t.match(native.describeFd(handleFd(tcp.server)), {
    kind: 'socket',
    family: C.AF_INET,
    type: C.SOCK_STREAM,
    listening: true,
    connected: false,
  });
  const info = native.tcpInfo(handleFd(tcp.accepted));
  t.equal(info.state, C.TCP_ESTABLISHED, 'ESTABLISHED');
  t.ok(info.rtt >= 0, 'rtt');
  t.ok(info.sndMss > 0, 'sndMss');
  t.equal(native.tcpInfo(handleFd(tcp.server)).state, C.TCP_LISTEN);
  await tcp.close();

  const [x, y] = native.streamPair();
  t.match(native.describeFd(x), {
    kind: 'socket',
    family: C.AF_UNIX,
    type: C.SOCK_STREAM,
    connected: true,
    listening: false,
  });
  // EOPNOTSUPP, which libuv (and so Node) names ENOTSUP: the two are the same number on Linux.
  t.throws(() => native.tcpInfo(x), { code: 'ENOTSUP', syscall: 'getsockopt' }, 'not TCP');
  native.closeAll([x, y]);

  const file = path.join(tempDir(t), 'file');
  fs.writeFileSync(file, 'twelve bytes');
  const fileFd = fs.openSync(file, 'r');
  t.same(native.describeFd(fileFd), { kind: 'file', size: 12 });
  fs.closeSync(fileFd);

  const fifo = path.join(tempDir(t), 'fifo');
  t.equal(spawnSync('mkfifo', [fifo]).status, 0, 'mkfifo');
  // O_RDWR on a FIFO opens at once on Linux (no waiting for the other end).
  const fifoFd = fs.openSync(fifo, fs.constants.O_RDWR | fs.constants.O_NONBLOCK);
  t.same(native.describeFd(fifoFd), { kind: 'pipe' });
  t.throws(() => native.memfdSeals(fifoFd), { code: 'EINVAL' }, 'memfdSeals on a pipe');
  fs.closeSync(fifoFd);

  const dirFd = fs.openSync(os.tmpdir(), 'r');
  t.same(native.describeFd(dirFd), { kind: 'dir' });
  fs.closeSync(dirFd);
});

leakChecked('dup and setNonblocking', async (t) => {
  const [x, y] = native.streamPair();
  const copy = native.dup(x);
  t.ok(copy >= 3 && copy !== x, 'a new number');
  t.ok(fdFlags(copy) & FDINFO_CLOEXEC, 'the copy is close-on-exec');
  native.setNonblocking(x, false);
  t.notOk(fdFlags(copy) & C.O_NONBLOCK!, 'O_NONBLOCK is shared through the open file description');
  native.setNonblocking(copy, true);
  t.ok(fdFlags(x) & C.O_NONBLOCK!, 'and set again');
  native.setNonblocking(copy, true); // no change: no write
  t.ok(fdFlags(x) & FDINFO_CLOEXEC, 'F_SETFL left FD_CLOEXEC alone');
  native.closeAll([x, y, copy]);
  native.closeAll([-1, 1_000_000]); // errors are ignored
  t.pass('closeAll ignores bad fds');
});

leakChecked('peer close fires close(null) once; JS close() fires nothing', async (t) => {
  const [a, b] = native.seqpacketPair();
  const left = openRecorded(native, a);
  const right = openRecorded(native, b);
  right.socket.close();
  t.equal(right.socket.fd, -1);
  t.same(await left.closes.wait(1, WAIT, 'the close callback'), [null]);
  t.equal(left.socket.fd, -1, 'closed when the callback runs');
  // Give any (wrong) second report a chance to arrive: two full loop turns.
  await new Promise((resolve) => setImmediate(resolve));
  await new Promise((resolve) => setTimeout(resolve, 0));
  t.equal(left.closes.items.length, 1, 'exactly once');
  t.equal(right.closes.items.length, 0, 'close() from JS does not call the close callback');
  t.throws(() => left.socket.send(Buffer.from('late'), []), { code: 'EBADF', syscall: 'sendmsg' });
  t.throws(() => left.socket.peerCredentials(), { code: 'EBADF' });
  left.socket.close(); // idempotent
  left.socket.setReading(true); // harmless on a closed socket
  left.socket.ref();
  left.socket.unref();
});

leakChecked('closing a socket from inside its message callback', async (t) => {
  const [a, b] = native.seqpacketPair();
  const sender = openRecorded(native, a);
  const receiver = openRecorded(native, b, (message, socket) => {
    native.closeAll(message.fds);
    socket.close();
  });
  const memfd = native.memfdCreate('in-flight');
  for (const text of ['one', 'two', 'three']) sender.socket.send(Buffer.from(text), [memfd]);
  native.close(memfd);
  await receiver.messages.wait(1, WAIT, 'the first message');
  // The receiver closed with two messages unread: the sender sees ECONNRESET (POLLERR), then EOF.
  t.same(await sender.closes.wait(1, WAIT, 'the sender to see the hang-up'), [null]);
  t.equal(receiver.messages.items.length, 1, 'nothing was read after close()');
  t.equal(receiver.closes.items.length, 0);
});

leakChecked('misuse is refused instead of crashing libuv', async (t) => {
  const [a, b] = native.seqpacketPair();
  const left = openRecorded(native, a);
  t.throws(() => openRecorded(native, a), { code: 'EEXIST' }, 'a second watcher on one fd');
  t.throws(() => native.close(a), { code: 'EFDFERRY_POLLED' }, 'closing an fd a socket owns');
  native.closeAll([a]); // skipped, not closed
  t.equal(left.socket.fd, a);
  t.throws(() => left.socket.send(new Uint8Array(0), []), { code: 'EFDFERRY_EMPTY' });
  t.throws(() => left.socket.send('text' as unknown as Uint8Array, []), TypeError);
  const noClose = { message: () => {}, drain: () => {} } as unknown as Parameters<typeof native.openSeqpacket>[1];
  t.throws(() => native.openSeqpacket(b, noClose), TypeError, 'all three callbacks are required');
  t.throws(() => native.openSeqpacket(-1, { message() {}, drain() {}, close() {} }), { code: 'EBADF' });
  left.socket.close();
  native.close(b); // the failed openSeqpacket left it to us
});

leakChecked('an exception thrown by a callback becomes an uncaught exception', async (t) => {
  const [a, b] = native.seqpacketPair();
  const sender = openRecorded(native, a);
  const receiver = native.openSeqpacket(b, {
    message() {
      throw new Error('thrown from message');
    },
    drain() {},
    close() {},
  });
  const listeners = process.listeners('uncaughtException');
  process.removeAllListeners('uncaughtException');
  const caught = new Promise<Error>((resolve) => process.once('uncaughtException', resolve));
  try {
    sender.socket.send(Buffer.from('boom'), []);
    const error = await withDeadline(caught, WAIT, 'uncaughtException');
    t.equal(error.message, 'thrown from message');
  } finally {
    for (const listener of listeners) process.on('uncaughtException', listener);
  }
  t.ok(await eventually(() => receiver.fd === b), 'the socket is still open');
  receiver.close();
  sender.socket.close();
});

leakChecked('unref lets the loop exit with a socket open', async (t) => {
  const addonPath = fileURLToPath(new URL('../../build/Release/fdferry.node', import.meta.url));
  const script = `
    const native = require(${JSON.stringify(addonPath)});
    const [a, b] = native.seqpacketPair();
    const s = native.openSeqpacket(a, { message() {}, drain() {}, close() {} });
    const l = native.openListener(native.seqpacketListen('\\0' + ${JSON.stringify(uniqueName('unref'))}, 1), () => {});
    s.unref(); l.unref();
    s.ref(); s.unref();
  `;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'inherit', 'pipe'], env: {} });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const [code] = (await withDeadline(once(child, 'close'), WAIT, 'the child to exit')) as [number];
  t.equal(code, 0, `exits on its own, cleanly: ${stderr}`);
});

// Splicer relays for real: a daemon process, real sockets of every kind, data checked by hash end to end.
import t from 'tap';
import type { Test } from 'tap';
import crypto from 'node:crypto';
import net from 'node:net';
import { SplicerClient } from '../../lib/client/splicer.js';
import { loadNative } from '../../lib/native.js';
import { startDaemon } from '../helpers/daemon.js';
import { withDeadline } from '../helpers/native-helpers.js';
import { PairFactory, receiveAll, receiveBytes, sendAndEnd, sha256, type PairKind } from '../helpers/streams.js';

t.setTimeout(240_000);
const binding = loadNative();

const setup = async (t: Test, args: string[] = []) => {
  const daemon = await startDaemon(t, 'splicer', args);
  const client = new SplicerClient({ owner: `relay-test-${process.pid}`, path: daemon.socket });
  await client.connect();
  t.teardown(() => client.close());
  return { daemon, client, pairs: new PairFactory(t, binding) };
};

t.test('1,000 concurrent relays move 1 GiB both ways and every byte arrives (sha256 per direction)', async (t) => {
  const { daemon, client, pairs } = await setup(t);
  const relays = Number(process.env.FDFERRY_TEST_RELAYS ?? 1000);
  const perDirection = 512 * 1024; // 1000 relays x 2 directions x 512 KiB = 1 GiB
  const pool = crypto.randomBytes(16 * 1024 * 1024);
  const slice = () => {
    const offset = crypto.randomInt(0, pool.length - perDirection);
    return pool.subarray(offset, offset + perDirection);
  };
  const kinds: PairKind[] = ['tcp4', 'tcp6', 'unix'];
  const started = Date.now();
  const work = Array.from({ length: relays }, async (_, i) => {
    const left = await pairs.pair(kinds[i % 3]!);
    const right = await pairs.pair(kinds[(i + 1) % 3]!);
    const relay = await client.start(left.far, right.far, { i });
    const toRight = slice();
    const toLeft = slice();
    const [atRight, atLeft] = await Promise.all([
      receiveAll(right.near),
      receiveAll(left.near),
      sendAndEnd(left.near, toRight),
      sendAndEnd(right.near, toLeft),
    ]);
    const returned = await relay.done;
    left.near.destroy();
    right.near.destroy();
    returned.a.destroy();
    returned.b.destroy();
    return {
      ok: atRight.sha256 === sha256(toRight) && atLeft.sha256 === sha256(toLeft),
      envelope: returned.envelope,
      i,
    };
  });
  const results = await withDeadline(Promise.all(work), 200_000, '1,000 relays');
  const seconds = (Date.now() - started) / 1000;
  t.equal(results.filter((r) => r.ok).length, relays, `every direction of every relay hashed equal (${seconds.toFixed(1)} s)`);
  t.equal(results.filter((r) => r.envelope.reason === 'complete').length, relays, 'every relay completed');
  t.ok(results.every((r) => r.envelope.bytesAToB === perDirection && r.envelope.bytesBToA === perDirection), 'byte counts match');
  t.ok(results.every((r) => (r.envelope.meta as { i: number }).i === r.i), 'metadata comes back exactly as given');
  t.ok(daemon.openFds() < 200, `daemon holds no relay fds afterwards (${daemon.openFds()} open)`);
});

t.test('half-close in both orders: EOF travels, the other direction goes on', async (t) => {
  const { client, pairs } = await setup(t);
  for (const first of ['a', 'b'] as const) {
    const left = await pairs.pair('tcp4');
    const right = await pairs.pair('unix');
    const relay = await client.start(left.far, right.far);
    const [early, late] = first === 'a' ? [left.near, right.near] : [right.near, left.near];
    const earlyReceives = receiveAll(early);
    const lateReceives = receiveAll(late);
    await sendAndEnd(early, Buffer.from('first side done'));
    // The late side sees EOF while it can still send: the relay is half-closed, not over.
    const seen = await lateReceives;
    t.equal(seen.bytes, 15, `${first}: EOF reached the other side after the data`);
    late.write('still talking after your EOF');
    await sendAndEnd(late, Buffer.from('; bye'));
    t.equal((await earlyReceives).sha256, sha256(Buffer.from('still talking after your EOF; bye')), `${first}: the reverse direction kept flowing`);
    const { envelope, a, b } = await relay.done;
    t.match(envelope, { reason: 'complete', finishedAToB: true, finishedBToA: true });
    a.destroy();
    b.destroy();
    left.near.destroy();
    right.near.destroy();
  }
});

t.test('a reset in the middle ends the relay with the errno and the side, and returns both sockets', async (t) => {
  const { client, pairs } = await setup(t);
  const left = await pairs.pair('tcp4');
  const right = await pairs.pair('tcp6');
  const relay = await client.start(left.far, right.far, { case: 'reset' });
  left.near.write('some bytes first');
  await receiveBytes(right.near, 16);
  right.near.resetAndDestroy();
  const { envelope, a, b } = await withDeadline(relay.done, 10_000, 'the envelope after a reset');
  t.equal(envelope.reason, 'error');
  t.equal(envelope.side, 'b');
  t.ok(['ECONNRESET', 'EPIPE'].includes(envelope.code ?? ''), `errno named (${envelope.code})`);
  t.equal(envelope.tcpInfo.b?.stateName, 'CLOSE', 'TCP_INFO of the reset socket says CLOSE');
  t.equal(envelope.tcpInfo.a?.stateName, 'ESTABLISHED', 'the healthy socket is still established');
  t.type(a, net.Socket);
  // The healthy socket came back usable: the proxy can still talk to its client.
  const heard = receiveBytes(left.near, 5);
  a.write('sorry');
  t.equal((await heard).toString(), 'sorry');
  a.destroy();
  b.destroy();
  left.near.destroy();
});

t.test('idle timeout, byte cap and cancel each end a relay with their reason; sockets come back open', async (t) => {
  const { client, pairs } = await setup(t);
  const idle = await pairs.pair('unix');
  const idle2 = await pairs.pair('unix');
  const idleRelay = await client.start(idle.far, idle2.far, {}, { idleTimeoutMs: 300 });
  const startedIdle = Date.now();
  const idleEnd = await withDeadline(idleRelay.done, 5_000, 'idle timeout');
  t.equal(idleEnd.envelope.reason, 'idle-timeout');
  t.ok(Date.now() - startedIdle >= 290, 'not before the timeout');

  const capped = await pairs.pair('tcp4');
  const capped2 = await pairs.pair('tcp4');
  const capRelay = await client.start(capped.far, capped2.far, {}, { maxBytesAToB: 1000 });
  const got = receiveBytes(capped2.near, 1000);
  capped.near.write(crypto.randomBytes(5000));
  const capEnd = await withDeadline(capRelay.done, 5_000, 'byte cap');
  t.equal(capEnd.envelope.reason, 'byte-cap');
  t.equal(capEnd.envelope.bytesAToB, 1000, 'exactly the cap went through');
  t.equal((await got).length, 1000);

  const cancelled = await pairs.pair('tcp6');
  const cancelled2 = await pairs.pair('unix');
  const cancelRelay = await client.start(cancelled.far, cancelled2.far);
  await client.cancel(cancelRelay.taskId);
  const cancelEnd = await withDeadline(cancelRelay.done, 5_000, 'cancel');
  t.equal(cancelEnd.envelope.reason, 'cancelled');
  const echo = receiveBytes(cancelled.near, 4);
  cancelEnd.a.write('back');
  t.equal((await echo).toString(), 'back', 'a cancelled relay returns live sockets');

  const duration = await pairs.pair('unix');
  const duration2 = await pairs.pair('unix');
  const durationRelay = await client.start(duration.far, duration2.far, {}, { maxDurationMs: 200 });
  const keepBusy = setInterval(() => duration.near.write('x'), 20);
  const durationEnd = await withDeadline(durationRelay.done, 5_000, 'max duration');
  clearInterval(keepBusy);
  t.equal(durationEnd.envelope.reason, 'max-duration', 'a busy relay still ends at its maximum duration');
  for (const socket of [idle, idle2, capped, capped2, cancelled, cancelled2, duration, duration2].map((p) => p.near)) socket.destroy();
  for (const end of [idleEnd, capEnd, cancelEnd, durationEnd]) {
    end.a.destroy();
    end.b.destroy();
  }
});

t.test('preface bytes go first, including bytes Node had already read from a handed-over net.Socket', async (t) => {
  const { client, pairs } = await setup(t);
  const left = await pairs.pair('tcp4');
  const right = await pairs.pair('tcp4');
  // Let Node read from the far socket, as a proxy does while it parses a request, without consuming it.
  left.far.resume();
  left.far.pause();
  left.near.write('GET / HTTP/1.1\r\n');
  await new Promise<void>((resolve) => {
    const check = () => (left.far.readableLength >= 16 ? resolve() : setTimeout(check, 2));
    left.far.resume();
    left.far.once('data', (chunk: Buffer) => {
      left.far.pause();
      left.far.unshift(chunk);
      check();
    });
  });
  t.equal(left.far.readableLength, 16, 'the bytes sit unread inside Node');
  const relay = await client.start(left.far, right.far, {}, { prefaceAToB: Buffer.from('[proxy header]') , prefaceBToA: Buffer.from('HTTP/1.1 100 Continue\r\n\r\n') });
  const atRight = receiveAll(right.near);
  const atLeft = receiveAll(left.near);
  await sendAndEnd(left.near, Buffer.from('Host: example\r\n\r\n'));
  await sendAndEnd(right.near, Buffer.from('body'));
  t.equal((await atRight).sha256, sha256(Buffer.from('GET / HTTP/1.1\r\n[proxy header]Host: example\r\n\r\n')), 'unread bytes, then the preface, then the stream');
  t.equal((await atLeft).sha256, sha256(Buffer.from('HTTP/1.1 100 Continue\r\n\r\nbody')));
  const { a, b } = await relay.done;
  a.destroy();
  b.destroy();
  left.near.destroy();
  right.near.destroy();
});

t.test('every combination of TCP v4, TCP v6 and Unix stream sockets relays, with TCP_INFO for TCP ends', async (t) => {
  const { client, pairs } = await setup(t);
  const kinds: PairKind[] = ['tcp4', 'tcp6', 'unix'];
  for (const first of kinds) {
    for (const second of kinds) {
      const left = await pairs.pair(first);
      const right = await pairs.pair(second);
      const relay = await client.start(left.far, right.far);
      const data = crypto.randomBytes(256 * 1024);
      const back = crypto.randomBytes(100 * 1024);
      const [atRight, atLeft] = await Promise.all([receiveAll(right.near), receiveAll(left.near), sendAndEnd(left.near, data), sendAndEnd(right.near, back)]);
      t.equal(atRight.sha256, sha256(data), `${first} -> ${second}`);
      t.equal(atLeft.sha256, sha256(back), `${second} -> ${first}`);
      const { envelope, a, b } = await relay.done;
      t.equal(envelope.tcpInfo.a === null, first === 'unix', `${first}: TCP_INFO only for TCP`);
      t.equal(envelope.tcpInfo.b === null, second === 'unix', `${second}: TCP_INFO only for TCP`);
      if (envelope.tcpInfo.a) t.ok(envelope.tcpInfo.a.bytesReceived >= 100 * 1024 || envelope.tcpInfo.a.bytesAcked > 0, 'TCP_INFO has real counters');
      a.destroy();
      b.destroy();
      left.near.destroy();
      right.near.destroy();
    }
  }
});

/**
 * Splicer's owners and mailbox against a real daemon process, with real proxy processes
 * (test/helpers/splicer-proxy.ts) that hand relays over and die:
 *
 * - a proxy killed with SIGKILL while its relays run does not stop them (bytes in flight at the kill arrive,
 *   hash-checked, and new bytes keep flowing); a proxy killed right after an envelope was sent to it (not
 *   acknowledged) loses nothing either: a new process with the same owner id receives every envelope, the
 *   same task ids again, with sockets that still carry bytes both ways;
 * - SIGTERM ends every relay with reason `shutdown`: a connected owner gets its envelopes at once, an absent
 *   owner that comes back within --shutdown-grace gets its own, and whatever nobody collected is logged one
 *   record per task before the daemon exits 0.
 */
import t from 'tap';
import type { Test } from 'tap';
import crypto from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { SplicerClient, type ReturnedRelay } from '../../lib/client/splicer.js';
import { loadNative } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { RpcClient } from '../../lib/rpc/client.js';
import { cliCommand, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { eventually, uniqueName, withDeadline } from '../helpers/native-helpers.js';
import { spawnScript } from '../helpers/rpc-processes.js';
import { PairFactory, receiveBytes, sha256, type StreamPair } from '../helpers/streams.js';

t.setTimeout(60_000);
const binding = loadNative();
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const run = promisify(execFile);
const WAIT = 15_000;

/** `fdferry ctl splicer <args> --socket <daemon's>`, run from source as this (root) process; resolves with stdout. */
async function ctl(daemon: TestDaemon, ...args: string[]): Promise<string> {
  const { command, args: base } = cliCommand();
  const { stdout } = await run(command, [...base, 'ctl', 'splicer', ...args, '--socket', daemon.socket], { cwd: root, timeout: WAIT });
  return stdout;
}

/** A protocol client that only looks (status, tasks); closed at teardown. */
async function observerOf(t: Test, daemon: TestDaemon): Promise<RpcClient> {
  const observer = new RpcClient({ path: daemon.socket, owner: uniqueName('observer'), binding, reconnect: false });
  await observer.connect();
  t.teardown(() => observer.close());
  return observer;
}

/** Everything a socket receives, kept, with waits on its length; it can pause itself at a given length. */
class Collector {
  readonly chunks: Buffer[] = [];
  length = 0;
  ended = false;
  #pauseAt = Infinity;
  readonly #waiters = new Set<() => void>();

  constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.length += chunk.length;
      if (this.length >= this.#pauseAt) {
        this.#pauseAt = Infinity;
        socket.pause();
      }
      this.#wake();
    });
    socket.on('end', () => {
      this.ended = true;
      this.#wake();
    });
    socket.on('error', () => {});
    socket.resume();
  }

  #wake(): void {
    for (const wake of [...this.#waiters]) wake();
  }

  /** Stops reading (the kernel applies backpressure) once `length` bytes have arrived. */
  pauseAt(length: number): void {
    this.#pauseAt = length;
  }

  resume(): void {
    this.socket.resume();
  }

  /** Resolves once at least `length` bytes have arrived; rejects after `ms`. */
  until(length: number, what: string, ms = WAIT): Promise<void> {
    return withDeadline(
      new Promise<void>((resolve) => {
        const check = (): void => {
          if (this.length >= length) {
            this.#waiters.delete(check);
            resolve();
          }
        };
        this.#waiters.add(check);
        check();
      }),
      ms,
      `${what} (${this.length} of ${length} bytes so far)`,
    );
  }

  all(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

/** Two TCP listeners (127.0.0.1 and ::1) whose accepted sockets are found by the connecting side's port. */
class Acceptor {
  readonly #servers = new Map<'tcp4' | 'tcp6', net.Server>();
  readonly #accepted = new Map<string, net.Socket>();
  readonly #waiting = new Map<string, (socket: net.Socket) => void>();

  constructor(t: Test) {
    t.teardown(() => {
      for (const server of this.#servers.values()) server.close();
      for (const socket of this.#accepted.values()) socket.destroy();
    });
  }

  async listen(): Promise<{ port4: number; port6: number }> {
    for (const kind of ['tcp4', 'tcp6'] as const) {
      const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (socket) => {
        const key = `${kind}:${socket.remotePort}`;
        const waiter = this.#waiting.get(key);
        if (waiter) {
          this.#waiting.delete(key);
          waiter(socket);
        } else {
          this.#accepted.set(key, socket);
        }
      });
      await new Promise<void>((resolve) => server.listen(0, kind === 'tcp4' ? '127.0.0.1' : '::1', resolve));
      this.#servers.set(kind, server);
    }
    return {
      port4: (this.#servers.get('tcp4')!.address() as net.AddressInfo).port,
      port6: (this.#servers.get('tcp6')!.address() as net.AddressInfo).port,
    };
  }

  /** The accepted socket whose peer has local port `port`. */
  get(kind: 'tcp4' | 'tcp6', port: number): Promise<net.Socket> {
    const key = `${kind}:${port}`;
    const early = this.#accepted.get(key);
    if (early) {
      this.#accepted.delete(key);
      return Promise.resolve(early);
    }
    return withDeadline(new Promise<net.Socket>((resolve) => this.#waiting.set(key, resolve)), WAIT, `the ${kind} connection from port ${port}`);
  }
}

/** One relay as the test sees it: the peers of A and B, what was sent each way, and what arrived. */
interface TestRelay {
  i: number;
  taskId: string;
  atA: Collector;
  atB: Collector;
  sentAToB: Buffer[];
  sentBToA: Buffer[];
}

const total = (chunks: Buffer[]): number => chunks.reduce((sum, chunk) => sum + chunk.length, 0);

/** Sends `size` random bytes each way through `relay` (A's peer to B's peer and back). */
function sendBothWays(relay: TestRelay, size: number): void {
  const toB = crypto.randomBytes(size);
  const toA = crypto.randomBytes(size);
  relay.sentAToB.push(toB);
  relay.sentBToA.push(toA);
  relay.atA.socket.write(toB);
  relay.atB.socket.write(toA);
}

/** Waits until everything sent so far has arrived, and checks it by hash, each direction. */
async function checkArrived(t: Test, relay: TestRelay, what: string): Promise<void> {
  await relay.atB.until(total(relay.sentAToB), `relay ${relay.i} A->B ${what}`);
  await relay.atA.until(total(relay.sentBToA), `relay ${relay.i} B->A ${what}`);
  t.equal(sha256(relay.atB.all()), sha256(Buffer.concat(relay.sentAToB)), `relay ${relay.i}: every byte A->B arrived in order ${what}`);
  t.equal(sha256(relay.atA.all()), sha256(Buffer.concat(relay.sentBToA)), `relay ${relay.i}: every byte B->A arrived in order ${what}`);
}

t.test('proxies killed with SIGKILL (while relays run, and holding an unacknowledged envelope) lose nothing', async (t) => {
  const daemon = await startDaemon(t, 'splicer');
  const observer = await observerOf(t, daemon);
  const acceptor = new Acceptor(t);
  const { port4, port6 } = await acceptor.listen();
  const owner = uniqueName('edge');
  const COUNT = 4;
  const SMALL = 64 * 1024;
  const BIG = 8 * 1024 * 1024;
  // Relay 0 is capped just past what the test sends before it ends it on purpose.
  const CAP = SMALL + BIG + SMALL + 1000;

  // 1. The first proxy hands over four relays (TCP over IPv4 on A, over IPv6 on B).
  const first = spawnScript(t, 'splicer-proxy.ts', ['relays', daemon.socket, owner, String(port4), String(port6), String(COUNT), String(CAP)]);
  await first.waitFor((line) => line.ready === true, WAIT * 2, 'the first proxy to start its relays');
  const started = first.lines.items.filter((line) => typeof line.started === 'number');
  t.equal(started.length, COUNT, 'the first proxy started every relay');
  const relays: TestRelay[] = await Promise.all(
    started.map(async (line) => ({
      i: line.started as number,
      taskId: line.taskId as string,
      atA: new Collector(await acceptor.get('tcp4', line.portA as number)),
      atB: new Collector(await acceptor.get('tcp6', line.portB as number)),
      sentAToB: [],
      sentBToA: [],
    })),
  );
  const byIndex = (i: number) => relays.find((relay) => relay.i === i)!;
  for (const relay of relays) sendBothWays(relay, SMALL);
  for (const relay of relays) await checkArrived(t, relay, 'before the kill');

  // 2. SIGKILL the proxy in the middle of 8 MiB each way: the receivers stop reading after 1 MiB, so the rest
  //    is in flight (socket buffers, the relay's pipes, the senders' queues) when the proxy dies.
  for (const relay of relays) {
    relay.atB.pauseAt(relay.atB.length + 1024 * 1024);
    relay.atA.pauseAt(relay.atA.length + 1024 * 1024);
    sendBothWays(relay, BIG);
  }
  for (const relay of relays) {
    await relay.atB.until(SMALL + 1024 * 1024, `relay ${relay.i}: the first MiB A->B`);
    await relay.atA.until(SMALL + 1024 * 1024, `relay ${relay.i}: the first MiB B->A`);
  }
  t.ok(
    relays.every((relay) => relay.atB.length < total(relay.sentAToB) && relay.atA.length < total(relay.sentBToA)),
    'the big transfers are in the middle when the proxy is killed',
  );
  first.kill('SIGKILL');
  t.equal(await withDeadline(first.exited, WAIT, 'the first proxy to die'), 'SIGKILL', 'the first proxy died of SIGKILL');
  for (const relay of relays) {
    relay.atA.resume();
    relay.atB.resume();
  }
  for (const relay of relays) await checkArrived(t, relay, 'across the SIGKILL');
  const running = (await observer.request('tasks')).result.tasks as Array<Record<string, unknown>>;
  t.same(
    running.filter((task) => task.owner === owner).map((task) => [task.taskId, task.peerPid]).sort(),
    relays.map((relay) => [relay.taskId, first.pid]).sort(),
    'the daemon still runs every relay of the dead proxy (tasks lists them with its pid)',
  );
  for (const relay of relays) sendBothWays(relay, SMALL);
  for (const relay of relays) await checkArrived(t, relay, 'after the proxy died');

  // 3. Relay 0 reaches its byte cap while its owner is away: the envelope waits in the mailbox. The bytes
  //    beyond the cap stay unread in socket A, for whoever gets A back.
  const capped = byIndex(0);
  const beyond = 'beyond the cap\n';
  capped.atA.socket.write(Buffer.concat([crypto.randomBytes(1000), Buffer.from(beyond)]));
  const cappedEnd = await daemon.waitForLog((line) => line.msg === 'relay ended' && line.taskId === capped.taskId, WAIT);
  t.match(cappedEnd, { reason: 'byte-cap', bytesAToB: CAP, owner }, 'relay 0 ended at its byte cap, exactly');
  await capped.atB.until(CAP, 'the last bytes below the cap');

  // 4. A proxy connects with the same owner id, is sent the kept envelope and a fresh one, acknowledges
  //    neither, and is killed with SIGKILL with both in hand.
  const holder = spawnScript(t, 'splicer-proxy.ts', ['hold', daemon.socket, owner]);
  await holder.waitFor((line) => line.ready === true, WAIT * 2, 'the holding proxy to connect');
  await holder.waitFor((line) => line.id === capped.taskId, WAIT, 'the kept envelope of relay 0');
  const cancelledLive = byIndex(1);
  t.match(JSON.parse(await ctl(daemon, 'cancel', cancelledLive.taskId)), { taskId: cancelledLive.taskId, cancelling: true }, 'root cancels a relay with fdferry ctl');
  const held = await holder.waitFor((line) => line.id === cancelledLive.taskId, WAIT, 'the envelope of relay 1, sent while it is connected');
  t.match(held, { event: 'envelope', reason: 'cancelled', fds: 2 }, 'the holder received relay 1 with both sockets');
  holder.kill('SIGKILL');
  t.equal(await withDeadline(holder.exited, WAIT, 'the holder to die'), 'SIGKILL', 'the holder died of SIGKILL');
  t.ok(
    await eventually(() => daemon.logs.some((line) => line.msg === 'connection closed' && line.peerPid === holder.pid), WAIT),
    'the daemon saw the holder go',
  );
  t.equal((await observer.request('status')).result.mailbox, 2, 'both envelopes the holder had are still kept (it acknowledged none)');

  // 5. Another relay ends while no process of the owner exists at all.
  const cancelledAbsent = byIndex(2);
  await ctl(daemon, 'cancel', cancelledAbsent.taskId);
  await daemon.waitForLog((line) => line.msg === 'relay ended' && line.taskId === cancelledAbsent.taskId, WAIT);

  // 6. The proxy comes back once more: it gets all three kept envelopes (the same task ids, relay 1's again)
  //    and cancels the last relay itself; every returned socket still carries bytes both ways.
  const last = byIndex(3);
  const third = spawnScript(t, 'splicer-proxy.ts', ['collect', daemon.socket, owner, String(COUNT), last.taskId]);
  await third.waitFor((line) => line.collected === COUNT, WAIT * 2, 'the third proxy to collect every envelope');
  const envelopes = third.lines.items.filter((line) => typeof line.envelope === 'string');
  t.same(envelopes.map((line) => line.envelope).sort(), relays.map((relay) => relay.taskId).sort(), 'every envelope arrived exactly once, under its task id');
  t.ok(third.lines.items.some((line) => line.cancelled === last.taskId), 'the owner cancelled its own relay from a new process');
  for (const relay of relays) {
    const envelope = envelopes.find((line) => line.envelope === relay.taskId)!;
    t.match(
      envelope,
      {
        reason: relay.i === 0 ? 'byte-cap' : 'cancelled',
        bytesAToB: relay.i === 0 ? CAP : total(relay.sentAToB),
        bytesBToA: total(relay.sentBToA),
        meta: { i: relay.i, proxyPid: first.pid },
      },
      `relay ${relay.i}: reason, byte counts and metadata`,
    );
  }
  for (const relay of relays) {
    const toA = `from ${third.pid} to ${relay.taskId}/a\n`;
    const toB = `from ${third.pid} to ${relay.taskId}/b\n`;
    const sentToB = relay.i === 0 ? CAP : total(relay.sentAToB);
    await relay.atA.until(total(relay.sentBToA) + toA.length, `relay ${relay.i}: the new proxy's bytes on A`);
    await relay.atB.until(sentToB + toB.length, `relay ${relay.i}: the new proxy's bytes on B`);
    t.equal(relay.atA.all().subarray(total(relay.sentBToA)).toString(), toA, `relay ${relay.i}: the new proxy writes through the returned A`);
    t.equal(relay.atB.all().subarray(sentToB).toString(), toB, `relay ${relay.i}: the new proxy writes through the returned B`);
  }
  await third.waitFor((line) => line.read === 'a' && line.taskId === capped.taskId && line.text === beyond, WAIT, 'the bytes beyond the cap');
  t.pass('the bytes beyond the cap were left in socket A for the new proxy to read');
  cancelledLive.atB.socket.write('are you there?\n');
  await third.waitFor((line) => line.read === 'b' && line.taskId === cancelledLive.taskId && line.text === 'are you there?\n', WAIT, 'bytes on a redelivered socket');
  t.pass('a socket first sent to the killed holder reads in the new proxy');
  const acked = await withDeadline(
    (async () => {
      for (;;) {
        const status = (await observer.request('status')).result;
        if (status.mailbox === 0) return status;
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    })(),
    WAIT,
    'the mailbox to empty',
  );
  t.match(acked, { mailbox: 0, tasks: 0 }, 'every envelope was acknowledged; no relay is left');
  t.ok(
    daemon.logs.every((line) => line.msg !== 'result expired without acknowledgement; its fds are closed'),
    'no envelope expired',
  );
  for (const relay of relays) {
    relay.atA.socket.destroy();
    relay.atB.socket.destroy();
  }
});

t.test('SIGTERM: connected owners get their envelopes, absent ones have the grace period, the rest is logged', async (t) => {
  const GRACE = 3000;
  const daemon = await startDaemon(t, 'splicer', ['--shutdown-grace', String(GRACE)]);
  const pairs = new PairFactory(t, binding);
  const clients = new Map<string, SplicerClient>();
  const clientOf = async (owner: string) => {
    const client = new SplicerClient({ owner, path: daemon.socket, reconnect: false });
    client.on('error', () => {});
    t.teardown(() => client.close());
    await client.connect();
    clients.set(owner, client);
    return client;
  };
  interface Running {
    owner: string;
    taskId: string;
    left: StreamPair;
    right: StreamPair;
    sent: number;
    done: Promise<ReturnedRelay>;
  }
  const startRelays = async (owner: string, client: SplicerClient, count: number): Promise<Running[]> => {
    const started: Running[] = [];
    for (let i = 0; i < count; i++) {
      const left = await pairs.pair(i % 2 ? 'tcp4' : 'unix');
      const right = await pairs.pair(i % 2 ? 'unix' : 'tcp6');
      const relay = await client.start(left.far, right.far, { owner, i });
      const data = crypto.randomBytes(10_000 + i);
      const arrived = receiveBytes(right.near, data.length);
      left.near.write(data);
      t.equal(sha256((await withDeadline(arrived, WAIT, 'relay data')).subarray(0, data.length)), sha256(data), `${owner} relay ${i} relays`);
      relay.done.catch(() => {});
      started.push({ owner, taskId: relay.taskId, left, right, sent: data.length, done: relay.done });
    }
    return started;
  };
  const connected = uniqueName('connected');
  const returning = uniqueName('returning');
  const gone = uniqueName('gone');
  const connectedRelays = await startRelays(connected, await clientOf(connected), 2);
  const returningRelays = await startRelays(returning, await clientOf(returning), 2);
  const goneRelays = await startRelays(gone, await clientOf(gone), 2);
  // Two owners go away; their relays go on.
  clients.get(returning)!.close();
  clients.get(gone)!.close();
  t.ok(
    await eventually(() => [returning, gone].every((owner) => daemon.logs.some((line) => line.msg === 'connection closed' && line.owner === owner)), WAIT),
    'the daemon saw both owners go',
  );

  daemon.kill('SIGTERM');
  // The connected owner gets both sockets of every relay back at once, reason `shutdown`.
  for (const relay of connectedRelays) {
    const { envelope, a, b } = await withDeadline(relay.done, WAIT, 'the connected owner\'s envelope');
    t.match(envelope, { taskId: relay.taskId, reason: 'shutdown', bytesAToB: relay.sent, bytesBToA: 0 }, 'connected owner: envelope with reason shutdown');
    const heard = receiveBytes(relay.left.near, 3);
    a.write('bye');
    t.equal((await withDeadline(heard, WAIT, 'bytes through a socket returned at shutdown')).toString(), 'bye', 'connected owner: the returned socket works');
    a.destroy();
    b.destroy();
  }
  const waiting = await daemon.waitForLog((line) => line.msg === 'waiting for owners to collect their envelopes', WAIT);
  t.match(waiting, { graceMs: GRACE }, 'the daemon waits for absent owners');
  t.ok((waiting.envelopes as number) >= 4, `the absent owners' envelopes are kept (${String(waiting.envelopes)})`);

  // The returning owner comes back within the grace period and collects both envelopes.
  const back = new SplicerClient({ owner: returning, path: daemon.socket, reconnect: false });
  back.on('error', () => {});
  t.teardown(() => back.close());
  const collected: ReturnedRelay[] = [];
  const both = new Promise<void>((resolve) =>
    back.on('envelope', (relay) => {
      collected.push(relay);
      if (collected.length === returningRelays.length) resolve();
    }),
  );
  await back.connect();
  await withDeadline(both, WAIT, 'the returning owner\'s envelopes');
  for (const relay of returningRelays) {
    const got = collected.find((returned) => returned.envelope.taskId === relay.taskId);
    t.match(got?.envelope, { reason: 'shutdown', bytesAToB: relay.sent, meta: { owner: returning } }, 'returning owner: its envelope, reason shutdown');
    const heard = receiveBytes(relay.right.near, 5);
    got?.b.write('later');
    t.equal((await withDeadline(heard, WAIT, 'bytes through a collected socket')).toString(), 'later', 'returning owner: the socket works');
  }
  // While stopping, new relays are refused, and their sockets come back.
  const extra = await pairs.pair('unix');
  const extra2 = await pairs.pair('unix');
  const refused = await back.start(extra.far, extra2.far).then(
    () => null,
    (error: ProtocolError) => error,
  );
  t.equal(refused?.code, 'EFDFERRY_SHUTDOWN', 'a splice during shutdown is refused');
  t.equal(refused?.fds.length, 2, 'with both fds given back');
  const again = new net.Socket({ fd: refused!.fds[0]!, readable: true, writable: true });
  const heardAgain = receiveBytes(extra.near, 4);
  again.write('mine');
  t.equal((await withDeadline(heardAgain, WAIT, 'a refused socket')).toString(), 'mine', 'the refused socket is usable');
  again.destroy();
  binding.closeAll([refused!.fds[1]!]);

  // The owner that never returns: after the grace period its envelopes are logged, one record each.
  const status = await withDeadline(daemon.exited, GRACE + WAIT, 'the daemon to exit after the grace period');
  t.equal(status, 0, 'the daemon exits 0');
  const expired = daemon.logs.filter((line) => line.msg === 'result expired without acknowledgement; its fds are closed');
  t.same(expired.map((line) => line.id).sort(), goneRelays.map((relay) => relay.taskId).sort(), 'exactly the envelopes nobody collected are logged');
  for (const relay of goneRelays) {
    const line = expired.find((record) => record.id === relay.taskId);
    t.match(
      line,
      {
        level: 'warn',
        reason: 'shutdown',
        ownerKey: `0:${gone}`,
        event: 'envelope',
        fds: 2,
        data: { taskId: relay.taskId, reason: 'shutdown', bytesAToB: relay.sent, bytesBToA: 0, meta: { owner: gone } },
      },
      'the record holds the whole envelope: bytes, reason, metadata',
    );
  }
  const stoppedAt = Date.parse(daemon.logs.find((line) => line.msg === 'stopped')!.time as string);
  const waitedFrom = Date.parse(waiting.time as string);
  t.ok(stoppedAt - waitedFrom >= GRACE - 50, `the daemon waited the grace period for the absent owner (${stoppedAt - waitedFrom} ms)`);
  for (const relay of goneRelays) {
    // The daemon held the last copies of these sockets: the far ends see them closed.
    const near = relay.left.near;
    const closed = near.readableEnded ? Promise.resolve() : new Promise<void>((resolve) => near.once('end', resolve).resume());
    await withDeadline(closed, WAIT, 'EOF on a socket whose envelope expired');
  }
  t.pass('sockets of expired envelopes are closed');
  for (const relay of [...connectedRelays, ...returningRelays, ...goneRelays]) {
    relay.left.near.destroy();
    relay.right.near.destroy();
  }
  for (const returned of collected) {
    returned.a.destroy();
    returned.b.destroy();
  }
});

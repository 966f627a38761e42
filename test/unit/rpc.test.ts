import t from 'tap';
import type { Test } from 'tap';
import { pino } from 'pino';
import { RpcClient, type RpcEvent } from '../../lib/rpc/client.js';
import { RpcServer, defineMethod, type MethodTable } from '../../lib/rpc/server.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { Channel } from '../../lib/rpc/channel.js';
import { toNativeAddress } from '../../lib/rpc/socket-path.js';
import { FakeBinding } from '../helpers/fake-binding.js';

let nextAddress = 0;

const methods = (server: () => RpcServer): MethodTable => ({
  echo: defineMethod({
    fds: { min: 0, max: 253, kind: 'any' },
    handle: ({ params, fds }) => ({ result: params, fds }),
  }),
  hold: defineMethod({
    fds: { min: 2, max: 2, kind: 'stream-socket' },
    parse: (params) => {
      if (typeof params.label !== 'string') throw new ProtocolError('EFDFERRY_INVALID', '"label" must be a string');
      return { label: params.label };
    },
    handle: ({ params, fds, connection }) => {
      const id = `task-${params.label}`;
      setImmediate(() => server().deliver(connection.ownerKey!, 'done', id, { label: params.label }, fds));
      return { result: { accepted: true, id } };
    },
  }),
  boom: defineMethod({
    handle: () => {
      throw new Error('kaboom');
    },
  }),
  stall: defineMethod({ handle: () => new Promise(() => undefined) }),
});

const setup = (t: Test, limits: ConstructorParameters<typeof RpcServer>[0]['limits'] = {}) => {
  const binding = new FakeBinding();
  const address = `@fake-${process.pid}-${nextAddress++}`;
  let server: RpcServer;
  server = new RpcServer({
    binding,
    logger: pino({ level: 'silent' }),
    service: 'test',
    version: '0.0.0',
    methods: methods(() => server),
    limits,
    // The fake's clients are uids 1000 and 2000.
    access: { allowUids: [1000, 2000], allowGids: [], controlUids: [], controlGids: [] },
  });
  server.listen(address);
  const clients: RpcClient[] = [];
  const client = (owner = 'proxy', options: Partial<ConstructorParameters<typeof RpcClient>[0]> = {}) => {
    const c = new RpcClient({ path: address, owner, binding, reconnect: false, ...options });
    clients.push(c);
    return c;
  };
  t.teardown(() => {
    for (const c of clients) c.close();
    server.close();
    binding.dispose();
  });
  return { binding, server, client, address };
};

const rejection = async (promise: Promise<unknown>): Promise<ProtocolError> => {
  try {
    await promise;
  } catch (error) {
    return error as ProtocolError;
  }
  throw new Error('expected a rejection');
};

const settle = () => new Promise((resolve) => setImmediate(() => setImmediate(resolve)));

t.test('hello names the daemon and its limits; ping answers', async (t) => {
  const { client } = setup(t);
  const c = client();
  const hello = await c.connect();
  t.match(hello, { protocol: 1, service: 'test', limits: { maxFdsPerMessage: 253 } });
  t.ok(hello.methods.includes('echo'));
  t.match((await c.request('ping')).result, { pong: true });
});

t.test('requests before hello are refused', async (t) => {
  const { binding, address } = setup(t);
  const fd = binding.seqpacketConnect(toNativeAddress(address));
  const channel = new Channel(fd, binding);
  const passenger = binding.makeDescribed({ kind: 'pipe' });
  const reply = new Promise<unknown>((resolve) => channel.once('message', resolve));
  channel.send({ type: 'request', requestId: 5, method: 'echo', params: {}, fds: [passenger] });
  binding.closeAll([passenger]);
  const message = (await reply) as { type: string; error: { code: string }; fds: number[]; requestId: number };
  t.equal(message.type, 'error');
  t.equal(message.requestId, 5);
  t.equal(message.error.code, 'EFDFERRY_NOHELLO');
  t.equal(message.fds.length, 1, 'the fd came back');
  binding.closeAll(message.fds);
  channel.close();
});

t.test('a rejected request returns the caller fds; an accepted one closes the held copies', async (t) => {
  const { binding, client } = setup(t);
  const c = client();
  await c.connect();
  const before = binding.openFds;
  const file = binding.makeDescribed({ kind: 'file', size: 10 });
  const socket = binding.makeDescribed({ kind: 'socket', family: 2, type: 1, connected: true, listening: false });
  const error = await rejection(c.request('hold', { label: 'x' }, [socket, file]));
  t.equal(error.code, 'EFDFERRY_FDKIND');
  t.match(error.message, /fd #1 needs a connected TCP or Unix stream socket, got a regular file/);
  t.same(error.fds, [socket, file], 'the caller gets its fds back');
  const wrongCount = await rejection(c.request('hold', { label: 'x' }, [socket]));
  t.equal(wrongCount.code, 'EFDFERRY_FDCOUNT');
  t.same(wrongCount.fds, [socket]);
  const invalid = await rejection(c.request('hold', { label: 7 }, [socket, binding.dup(socket)]));
  t.equal(invalid.code, 'EFDFERRY_INVALID');
  binding.closeAll([file, ...invalid.fds]);
  const unknown = await rejection(c.request('nope'));
  t.equal(unknown.code, 'EFDFERRY_METHOD');
  const internal = await rejection(c.request('boom'));
  t.equal(internal.code, 'EFDFERRY_INTERNAL');
  t.match(internal.message, /kaboom/);
  await settle();
  t.equal(binding.openFds, before, 'nothing leaked on either side');
});

t.test('echo carries fds both ways', async (t) => {
  const { binding, client } = setup(t);
  const c = client();
  await c.connect();
  const fds = Array.from({ length: 253 }, () => binding.makeDescribed({ kind: 'pipe' }));
  const before = binding.openFds;
  const reply = await c.request('echo', { n: 253 }, fds);
  t.equal(reply.fds.length, 253);
  t.same(reply.result, { n: 253 });
  binding.closeAll(reply.fds);
  await settle();
  t.equal(binding.openFds, before - 253, 'the sent fds were closed once accepted, the echoed ones by us');
});

t.test('long tasks: results are kept until acknowledged and redelivered to a returning owner', async (t) => {
  const { binding, server, client } = setup(t);
  const first = client('edge');
  await first.connect();
  const [a, b] = binding.streamPair();
  const seenByFirst = new Promise<RpcEvent>((resolve) => first.once('event', resolve));
  const accepted = await first.request('hold', { label: 'one' }, [a, b]);
  t.same(accepted.result, { accepted: true, id: 'task-one' });
  const event = await seenByFirst;
  t.equal(event.id, 'task-one');
  t.equal(event.fds.length, 2);
  binding.closeAll(event.fds);
  first.close();
  await settle();
  t.equal(server.mailboxSize, 1, 'not acknowledged: still kept');

  const other = client('edge');
  const seenAgain = new Promise<RpcEvent>((resolve) => other.once('event', resolve));
  const hello = await other.connect();
  t.equal(hello.pending, 1);
  const again = await seenAgain;
  t.equal(again.id, 'task-one', 'same id on redelivery');
  t.equal(again.fds.length, 2);
  binding.closeAll(again.fds);
  t.same(await other.ack(['task-one', 'never']), { acked: 1, unknown: ['never'] });
  t.equal(server.mailboxSize, 0);
});

t.test('owner ids are scoped to the peer uid', async (t) => {
  const { binding, server, client } = setup(t);
  const mine = client('shared');
  await mine.connect();
  const [a, b] = binding.streamPair();
  mine.on('event', () => undefined);
  await mine.request('hold', { label: 'secret' }, [a, b]);
  mine.close();
  await settle();
  binding.clientCredentials = { pid: 999, uid: 2000, gid: 2000 };
  const intruder = client('shared');
  let stolen = 0;
  intruder.on('event', (event) => {
    stolen++;
    binding.closeAll(event.fds);
  });
  const hello = await intruder.connect();
  await intruder.request('ping');
  t.equal(hello.pending, 0);
  t.equal(stolen, 0, 'another uid with the same owner id gets nothing');
  t.equal(server.mailboxSize, 1);
});

t.test('too many requests in flight are refused with their fds', async (t) => {
  const { binding, client } = setup(t, { maxInflightPerConnection: 2 });
  const c = client('busy', { requestTimeoutMs: 0 });
  await c.connect();
  void c.request('stall').catch(() => undefined);
  void c.request('stall').catch(() => undefined);
  const fd = binding.makeDescribed({ kind: 'pipe' });
  const error = await rejection(c.request('echo', {}, [fd]));
  t.equal(error.code, 'EFDFERRY_BUSY');
  t.same(error.fds, [fd]);
  binding.closeAll([fd]);
});

t.test('a request that times out gets its fds back; a dropped connection fails requests with theirs', async (t) => {
  const { binding, server, client } = setup(t);
  const c = client('slow');
  await c.connect();
  const fd = binding.makeDescribed({ kind: 'pipe' });
  const timedOut = await rejection(c.request('stall', {}, [], { timeoutMs: 20 }));
  t.equal(timedOut.code, 'EFDFERRY_TIMEOUT');
  const pending = c.request('stall', {}, [], { timeoutMs: 0 });
  const held = c.request('echo', {}, [fd], { timeoutMs: 0 });
  server.close();
  const [a, b] = [await rejection(pending), await rejection(held)];
  t.equal(a.code, 'EFDFERRY_DISCONNECTED');
  t.equal(b.code === 'EFDFERRY_DISCONNECTED' || b.fds.length === 0, true);
  binding.closeAll(b.fds);
});

t.test('the client reconnects and says hello again', async (t) => {
  const { server, client } = setup(t);
  const c = client('phoenix', { reconnect: true, reconnectMinDelayMs: 5 });
  await c.connect();
  const [info] = server.connections();
  const reconnected = new Promise((resolve) => c.once('connect', resolve));
  t.ok(server.dropConnection(info!.id), 'dropped');
  await reconnected;
  const [again] = server.connections();
  t.not(again!.id, info!.id, 'a new connection');
  t.equal(again!.owner, 'phoenix');
  t.match((await c.request('ping')).result, { pong: true });
});

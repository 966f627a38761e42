/**
 * Property-based tests (fast-check) of the wire protocol: the decoder is total, encoding round-trips, the
 * server answers every message exactly once and leaks no fd whatever it is fed, and request validation
 * (`splice`, `upgrade`) either returns the documented shape or refuses with EFDFERRY_INVALID.
 *
 * Every `fc.assert` uses one seed, printed at the start: replay a failure with FDFERRY_FC_SEED=<seed>
 * (fast-check also prints the seed and the shrunk counterexample).
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { pino } from 'pino';
import t from 'tap';
import type { SeqpacketCallbacks, SeqpacketSocket } from '../../lib/native.js';
import { parseUpgradeRequest, DEFAULT_UPGRADE_LIMITS, type UpgradeRequestLimits } from '../../lib/protocol/bumblebee.js';
import { MessageCodec, type Message } from '../../lib/protocol/codec.js';
import { isErrorCode, ProtocolError } from '../../lib/protocol/errors.js';
import { FLAG_BODY_IN_MEMFD, HEADER_SIZE, MAGIC, MAX_FRAME, MAX_INLINE_BODY, peekBodyInMemfd } from '../../lib/protocol/frame.js';
import { DEFAULT_QUOTAS } from '../../lib/rpc/quotas.js';
import { RpcServer, defineMethod, type MethodTable } from '../../lib/rpc/server.js';
import { toNativeAddress } from '../../lib/rpc/socket-path.js';
import { DEFAULT_REQUEST_LIMITS, parseSpliceRequest, type SpliceRequestLimits } from '../../services/splicer/request.js';
import { FakeBinding } from '../helpers/fake-binding.js';
import {
  anyBytes,
  anyFdSpecs,
  anyJson,
  anyJsonObject,
  anyString,
  FC_SEED,
  fcParams,
  identity,
  isOpen,
  materializeFd,
  nestedJsonText,
  objectFrom,
  spliceParamsArb,
  upgradeParamsArb,
  viaWire,
  wireArb,
  type FdSpec,
  type MadeFd,
} from '../helpers/protocol-arbitraries.js';

/** Runs per property: enough to matter, the whole file well under 20 s on the 2-core machine. */
const RUNS = {
  decodeBytes: 2500,
  decodeFrames: 3500,
  roundTrip: 800,
  server: 500,
  splice: 4000,
  upgrade: 4000,
  nonObjectParams: 1000,
};

/**
 * Nesting depth of JSON in generated params: below the codec's MAX_JSON_DEPTH (512), so generated
 * messages stay valid; deeper bodies are refused by the decoder (tested on its own below).
 */
const MAX_NESTING = 500;

t.comment(`fast-check seed ${FC_SEED}: replay with FDFERRY_FC_SEED=${FC_SEED}`);

const readU32 = (bytes: Uint8Array, offset: number) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).readUInt32LE(offset);
const hasMagic = (frame: Uint8Array) => frame.length >= 4 && readU32(frame, 0) === MAGIC;
/** The request id a receiver can read (docs: errors about unreadable headers use 0). */
const readableId = (frame: Uint8Array) => (frame.length >= 12 && hasMagic(frame) ? readU32(frame, 8) : 0);
const isPlainObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === 'object' && value !== null && !Array.isArray(value);

/** The fds a receiver hands on (with a message, or back with an error): all but a body memfd. */
const payloadOf = <T>(frame: Uint8Array, fds: T[]): T[] => (peekBodyInMemfd(frame) && fds.length > 0 ? fds.slice(0, -1) : fds);

/** Checks a decoded message against the body shapes of docs/protocol.md. */
function assertWellShaped(message: Message, frame: Uint8Array): void {
  assert.equal(message.requestId, readableId(frame), 'requestId is the header one');
  switch (message.type) {
    case 'request':
      assert.equal(typeof message.method, 'string');
      assert.ok(message.method.length >= 1 && message.method.length <= 64, 'method of 1 to 64 characters');
      assert.ok(isPlainObject(message.params), 'params is an object');
      assert.notEqual(message.requestId, 0, 'a request has a non-zero id');
      break;
    case 'reply':
      assert.ok(isPlainObject(message.result), 'result is an object');
      break;
    case 'error':
      assert.equal(typeof message.error.code, 'string');
      assert.equal(typeof message.error.message, 'string');
      assert.ok(message.error.details === undefined || isPlainObject(message.error.details));
      break;
    case 'event':
      assert.equal(typeof message.event, 'string');
      assert.equal(typeof message.id, 'string');
      assert.ok(isPlainObject(message.data));
      break;
    default:
      assert.fail(`unknown message type ${(message as { type: unknown }).type}`);
  }
}

const describeError = (error: unknown) =>
  error instanceof Error ? `${error.constructor.name}: ${error.message}\n${error.stack}` : `a thrown ${typeof error}: ${String(error)}`;

// -------------------------------------------------------------------------------------------------
// 1. Decoder totality
// -------------------------------------------------------------------------------------------------

t.test('decoding any bytes with any fds yields a valid message or a ProtocolError, and every fd is handed on or closed', async (t) => {
  const binding = new FakeBinding();
  t.teardown(() => binding.dispose());
  const codecs = [new MessageCodec(binding), new MessageCodec(binding, { maxBodyBytes: 100_000 })];

  const check = (frame: Uint8Array, specs: FdSpec[], codecIndex: number) => {
    const before = binding.openFds;
    const made = specs.map((spec) => materializeFd(binding, spec));
    const fds = made.map((m) => m.fd);
    const expected = payloadOf(frame, fds);
    let handedOn: number[] = [];
    let failure: unknown = null;
    try {
      let message: Message | null = null;
      try {
        message = codecs[codecIndex]!.decode(frame, fds);
      } catch (error) {
        if (!(error instanceof ProtocolError)) assert.fail(`decode threw something other than a ProtocolError: ${describeError(error)}`);
        handedOn = error.fds;
        assert.ok(isErrorCode(error.code), `code ${error.code} is one of ErrorCodes`);
        assert.notEqual(error.code, 'EFDFERRY_INTERNAL', `an unexpected failure: ${error.message}`);
        assert.equal(error.requestId, readableId(frame), 'the error answers under the readable request id');
        assert.deepEqual(error.fds, expected, 'the error gives back every fd but a body memfd, in order');
        if (frame.length < HEADER_SIZE) assert.equal(error.code, 'EFDFERRY_SHORT');
        else if (!hasMagic(frame)) assert.equal(error.code, 'EFDFERRY_MAGIC');
      }
      if (message) {
        handedOn = message.fds;
        assert.ok(frame.length >= HEADER_SIZE && hasMagic(frame), 'only a frame with a header decodes');
        assertWellShaped(message, frame);
        assert.deepEqual(message.fds, expected, 'the message carries every fd but the body memfd, in order');
      }
    } catch (error) {
      failure = error;
    }
    const leftOpen = fds.filter((fd) => !handedOn.includes(fd) && isOpen(binding, fd));
    binding.closeAll(handedOn);
    binding.closeAll(made.flatMap((m) => m.extras));
    binding.closeAll(fds);
    if (failure) throw failure;
    assert.deepEqual(leftOpen, [], 'every fd not handed on was closed by the decoder');
    assert.equal(binding.openFds, before, 'no fd leaked');
  };

  await t.test('arbitrary bytes (up to 70 KiB) with 0-10 fds of any kind', async (t) => {
    fc.assert(
      fc.property(anyBytes, anyFdSpecs(10), fc.nat({ max: 1 }), (bytes, specs, codec) => check(bytes, specs, codec)),
      fcParams(RUNS.decodeBytes),
    );
    t.pass(`${RUNS.decodeBytes} runs`);
  });

  await t.test('valid frames (inline and memfd bodies), bit flips, truncations, extensions, header fields and fds changed', async (t) => {
    const wires = wireArb({ maxNestingDepth: MAX_NESTING, bigWeight: 1, maxFds: 10 });
    fc.assert(
      fc.property(wires, fc.nat({ max: 1 }), (wire, codec) => check(wire.frame, wire.fds, codec)),
      fcParams(RUNS.decodeFrames),
    );
    t.pass(`${RUNS.decodeFrames} runs`);
  });
});

// -------------------------------------------------------------------------------------------------
// 2. Round trip
// -------------------------------------------------------------------------------------------------

const methodName = fc.oneof(
  fc.string({ minLength: 1, maxLength: 64 }),
  fc.string({ unit: 'binary', minLength: 1, maxLength: 32 }),
).filter((m) => m.length >= 1 && m.length <= 64);
const wireId = fc.oneof(fc.integer({ min: 1, max: 1000 }), fc.integer({ min: 1, max: 0xffffffff }));
/** An object made big enough (sometimes) to need a memfd body. */
const maybeBig = (object: fc.Arbitrary<Record<string, unknown>>) =>
  fc.tuple(object, fc.nat({ max: 9 }), fc.integer({ min: MAX_INLINE_BODY - 100, max: MAX_INLINE_BODY + 50_000 })).map(([value, roll, size]) =>
    roll === 0 ? objectFrom([...Object.entries(value), ['blob', 'b'.repeat(size)]]) : value,
  );

type Unsent = { [K in Message['type']]: Omit<Extract<Message, { type: K }>, 'fds'> }[Message['type']];

const messageArb: fc.Arbitrary<Unsent> = fc.oneof(
  fc.record({ type: fc.constant('request' as const), requestId: wireId, method: methodName, params: maybeBig(anyJsonObject) }),
  fc.record({ type: fc.constant('reply' as const), requestId: fc.oneof(wireId, fc.constant(0)), result: maybeBig(anyJsonObject) }),
  fc
    .record({ type: fc.constant('error' as const), requestId: fc.oneof(wireId, fc.constant(0)), code: anyString, message: anyString, details: fc.option(maybeBig(anyJsonObject), { nil: undefined }) })
    .map(({ type, requestId, code, message, details }) => ({ type, requestId, error: details === undefined ? { code, message } : { code, message, details } })),
  fc.record({ type: fc.constant('event' as const), requestId: fc.oneof(wireId, fc.constant(0)), event: anyString, id: anyString, data: maybeBig(anyJsonObject) }),
);

t.test('any valid message encodes and decodes to the same value (inline and memfd bodies)', async (t) => {
  const binding = new FakeBinding();
  t.teardown(() => binding.dispose());
  const codec = new MessageCodec(binding);
  let spilled = 0;
  fc.assert(
    fc.property(messageArb, anyFdSpecs(10), (unsent, specs) => {
      const before = binding.openFds;
      // JSON is the wire: -0 becomes 0 on the way, so the expected value is the JSON-normalized one.
      const value = viaWire(unsent) as Unsent;
      const made = specs.map((spec) => materializeFd(binding, spec));
      const fds = made.map((m) => m.fd);
      const message = { ...value, fds } as Message;
      try {
        const encoded = codec.encode(message);
        assert.ok(encoded.frame.length <= MAX_FRAME, 'a frame fits in MAX_FRAME');
        const bodyLength = encoded.frame.readUInt32LE(16);
        const inMemfd = (encoded.frame.readUInt16LE(6) & FLAG_BODY_IN_MEMFD) !== 0;
        assert.equal(inMemfd, bodyLength > MAX_INLINE_BODY, 'the body is in a memfd exactly when it is too big to be inline');
        assert.equal(encoded.frame.readUInt16LE(12), encoded.fds.length, 'fdCount counts the body memfd');
        assert.deepEqual(encoded.fds.slice(0, fds.length), fds);
        // In transit the kernel duplicates every fd; the sender closes the memfd it owns.
        const received = encoded.fds.map((fd) => binding.dup(fd));
        binding.closeAll(encoded.owned);
        if (inMemfd) spilled++;
        const decoded = codec.decode(encoded.frame, received);
        const payload = received.slice(0, fds.length);
        assert.deepEqual(decoded, { ...value, fds: payload });
        assert.deepEqual(JSON.stringify(decoded), JSON.stringify({ ...value, fds: payload }), 'same member order too');
        binding.closeAll(payload);
      } finally {
        binding.closeAll(fds);
        binding.closeAll(made.flatMap((m) => m.extras));
      }
      assert.equal(binding.openFds, before, 'the body memfd was closed on both sides; nothing leaked');
    }),
    fcParams(RUNS.roundTrip),
  );
  t.ok(spilled > 0, `${RUNS.roundTrip} runs, ${spilled} with a memfd body`);
});

// -------------------------------------------------------------------------------------------------
// 3. Server robustness
// -------------------------------------------------------------------------------------------------

/** The fake binding, with every socket's message callback watched: whatever it throws is recorded. */
class WatchedBinding extends FakeBinding {
  readonly thrown: unknown[] = [];
  override openSeqpacket(fd: number, callbacks: SeqpacketCallbacks): SeqpacketSocket {
    return super.openSeqpacket(fd, {
      ...callbacks,
      message: (data, fds, fault) => {
        try {
          callbacks.message(data, fds, fault);
        } catch (error) {
          this.thrown.push(error);
        }
      },
    });
  }
}

/** Methods shaped like the daemons' own: fds checked by kind, params parsed by the real validators. */
function propertyMethods(binding: FakeBinding, server: () => RpcServer): MethodTable {
  let next = 0;
  return {
    echo: defineMethod({
      fds: { min: 0, max: 253, kind: 'any' },
      handle: ({ params, fds }) => ({ result: params, fds }),
    }),
    keep: defineMethod({
      fds: { min: 0, max: 4, kind: 'any' },
      parse: (params) => {
        if (typeof params.label !== 'string') throw new ProtocolError('EFDFERRY_INVALID', '"label" must be a string');
        return { label: params.label };
      },
      handle: ({ params, fds, connection }) => {
        const id = `kept-${++next}`;
        server().deliver(connection.ownerKey!, 'kept', id, { label: params.label }, fds);
        return { result: { id } };
      },
    }),
    splice: defineMethod({
      fds: { min: 2, max: 2, kind: 'stream-socket' },
      parse: (params) => parseSpliceRequest(params, { idleTimeoutMs: 1000, maxDurationMs: 0 }),
      handle: ({ params, fds, connection }) => {
        const id = `task-${++next}`;
        server().deliver(connection.ownerKey!, 'envelope', id, { taskId: id, meta: params.meta, reason: 'complete' }, fds);
        return { result: { taskId: id } };
      },
    }),
    upgrade: defineMethod({
      fds: { min: 1, max: 1, kind: 'seqpacket-socket' },
      parse: (params) => parseUpgradeRequest(params),
      // The real daemon answers with a new TCP socket; giving the flow socket back keeps the fd bookkeeping simple.
      handle: ({ params, fds }) => ({ result: { flowId: `flow-${++next}`, context: params.context, tenant: params.tenant }, fds }),
    }),
    boom: defineMethod({
      handle: () => {
        throw new Error('kaboom');
      },
    }),
  };
}

interface Received {
  message: Message;
  /** Identities of the fds that came with it (the fds themselves are closed at once). */
  identities: unknown[];
}

/** A bare client connection on the fake binding: raw frames out, decoded answers in. */
class RawClient {
  readonly answers: Received[] = [];
  readonly events: Received[] = [];
  readonly undecodable: string[] = [];
  closedByPeer = false;
  readonly #socket: SeqpacketSocket;
  readonly #codec: MessageCodec;
  readonly #binding: FakeBinding;

  constructor(binding: FakeBinding, address: string) {
    this.#binding = binding;
    this.#codec = new MessageCodec(binding);
    const fd = binding.seqpacketConnect(toNativeAddress(address));
    this.#socket = binding.openSeqpacket(fd, {
      message: (data, fds, fault) => this.#receive(data, fds, fault !== null),
      drain: () => undefined,
      close: () => {
        this.closedByPeer = true;
      },
    });
  }

  #receive(data: Buffer, fds: number[], fault: boolean): void {
    if (fault) {
      this.undecodable.push(`receive fault on a server message of ${data.length} bytes`);
      this.#binding.closeAll(fds);
      return;
    }
    let message: Message;
    try {
      message = this.#codec.decode(data, fds);
    } catch (error) {
      this.undecodable.push(`the server sent a message that does not decode: ${describeError(error)}`);
      this.#binding.closeAll((error as ProtocolError).fds ?? fds);
      return;
    }
    const received = { message, identities: message.fds.map((fd) => identity(this.#binding, fd)) };
    this.#binding.closeAll(message.fds);
    (message.type === 'event' ? this.events : this.answers).push(received);
  }

  send(frame: Uint8Array, fds: number[]): void {
    this.#socket.send(frame, fds);
  }

  async answerTo(requestId: number, ms = 2000): Promise<Message> {
    const end = Date.now() + ms;
    for (;;) {
      const found = this.answers.find((a) => a.message.requestId === requestId);
      if (found) return found.message;
      if (Date.now() > end || this.closedByPeer) throw new Error(`no answer to request ${requestId}${this.closedByPeer ? ' (the server closed the connection)' : ''}`);
      await tick();
    }
  }

  async request(requestId: number, method: string, params: Record<string, unknown>): Promise<Message> {
    const body = Buffer.from(JSON.stringify({ method, params }));
    const header = Buffer.alloc(HEADER_SIZE);
    header.writeUInt32LE(MAGIC, 0);
    header.writeUInt8(1, 4);
    header.writeUInt8(1, 5);
    header.writeUInt32LE(requestId, 8);
    header.writeUInt32LE(body.length, 16);
    this.send(Buffer.concat([header, body]), []);
    return this.answerTo(requestId);
  }

  close(): void {
    this.#socket.close();
  }
}

const tick = () => new Promise<void>((resolve) => setImmediate(resolve));

async function eventually(condition: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > end) return false;
    await tick();
  }
  return true;
}

/** Pings on `client`, saying hello first if the connection has not; asserts the pong. */
async function assertServes(client: RawClient, ids: number, owner: string): Promise<void> {
  let answer = await client.request(ids, 'ping', {});
  // A request-rate quota (8 a second in some runs) may be spent: the next token comes within 125 ms.
  for (let retry = 1; answer.type === 'error' && answer.error.code === 'EFDFERRY_LIMIT' && retry <= 3; retry++) {
    await new Promise((resolve) => setTimeout(resolve, 130));
    answer = await client.request(ids + 10 * retry, 'ping', {});
  }
  if (answer.type === 'error' && answer.error.code === 'EFDFERRY_NOHELLO') {
    const hello = await client.request(ids + 1, 'hello', { owner, protocol: 1 });
    assert.equal(hello.type, 'reply', `hello accepted: ${JSON.stringify(hello)}`);
    answer = await client.request(ids + 2, 'ping', {});
  }
  assert.equal(answer.type, 'reply', `ping answered with a pong: ${JSON.stringify(answer)}`);
  assert.equal(answer.type === 'reply' && answer.result.pong, true);
}

interface Sent {
  frame: Uint8Array;
  made: MadeFd[];
  /** Identities of the fds the server should hand back on refusal (all but a body memfd). */
  payload: unknown[];
  mentionsBoom: boolean;
}

let nextAddress = 0;

const sequenceArb = fc.record({
  helloFirst: fc.oneof({ weight: 3, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
  maxInflight: fc.constantFrom(64, 64, 2, 5),
  control: fc.boolean(),
  quotas: fc.record({
    maxFdsInflightPerUid: fc.constantFrom(DEFAULT_QUOTAS.maxFdsInflightPerUid, DEFAULT_QUOTAS.maxFdsInflightPerUid, 3),
    maxFdsInflightPerOwner: fc.constantFrom(DEFAULT_QUOTAS.maxFdsInflightPerOwner, DEFAULT_QUOTAS.maxFdsInflightPerOwner, 2),
    requestRatePerOwner: fc.constantFrom(DEFAULT_QUOTAS.requestRatePerOwner, DEFAULT_QUOTAS.requestRatePerOwner, DEFAULT_QUOTAS.requestRatePerOwner, 8),
  }),
  messages: fc.array(
    fc.record({
      wire: fc.oneof(
        { weight: 6, arbitrary: wireArb({ maxNestingDepth: MAX_NESTING, bigWeight: 1, maxFds: 6, mutationWeight: 1, fittingWeight: 3 }) },
        { weight: 1, arbitrary: fc.record({ frame: anyBytes, fds: anyFdSpecs(4) }) },
      ),
      zeroId: fc.nat({ max: 9 }).map((n) => n === 0),
    }),
    { minLength: 1, maxLength: 10 },
  ),
});

t.test('a server fed any messages answers each exactly once, never throws, keeps serving and leaks no fd', async (t) => {
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown) => unhandled.push(reason);
  process.on('unhandledRejection', onUnhandled);
  t.teardown(() => {
    process.off('unhandledRejection', onUnhandled);
  });
  const stats = { messages: 0, errors: 0, replies: 0, events: 0, codes: new Map<string, number>() };

  await fc.assert(
    fc.asyncProperty(sequenceArb, async ({ helloFirst, maxInflight, control, quotas, messages }) => {
      const binding = new WatchedBinding();
      const address = `@fdferry-prop-${process.pid}-${nextAddress++}`;
      let server: RpcServer | undefined;
      const clients: RawClient[] = [];
      const sent: Sent[] = [];
      try {
        server = new RpcServer({
          binding,
          logger: pino({ level: 'silent' }),
          service: 'prop',
          version: '0.0.0',
          methods: propertyMethods(binding, () => server!),
          limits: { maxInflightPerConnection: maxInflight },
          // The fake's clients are uid 1000; `upgrade` stands in for a control method.
          access: { allowUids: [1000], allowGids: [], controlUids: control ? [1000] : [], controlGids: [] },
          controlMethods: ['upgrade'],
          quotas,
        });
        server.listen(address);
        const client = new RawClient(binding, address);
        clients.push(client);
        if (helloFirst) assert.equal((await client.request(1, 'hello', { owner: 'prop', protocol: 1 })).type, 'reply');

        // Every message gets its own request id (unless it tests id 0), so each answer names its message.
        messages.forEach(({ wire, zeroId }, index) => {
          const frame = Buffer.from(wire.frame);
          if (frame.length >= 12 && hasMagic(frame)) frame.writeUInt32LE(zeroId ? 0 : 10_000 + index, 8);
          const made = wire.fds.map((spec) => materializeFd(binding, spec));
          const fds = made.map((m) => m.fd);
          const memfdContent = wire.fds.flatMap((spec) => (spec.kind === 'memfd' ? [Buffer.from(spec.content)] : []));
          sent.push({
            frame,
            made,
            payload: payloadOf(frame, fds).map((fd) => identity(binding, fd)),
            mentionsBoom: [frame, ...memfdContent].some((bytes) => bytes.includes('boom')),
          });
          client.send(frame, fds);
        });
        const firstAnswer = helloFirst ? 1 : 0;
        const complete = await eventually(() => client.answers.length >= firstAnswer + sent.length || client.closedByPeer, 3000);
        for (let i = 0; i < 3; i++) await tick(); // room for a duplicate answer to show up
        assert.deepEqual(binding.thrown.map(describeError), [], 'the server never threw out of its message handler');
        assert.deepEqual(client.undecodable, [], 'every server message decodes');
        assert.equal(client.closedByPeer, false, 'the server kept the connection open');
        assert.ok(complete, `answers: ${client.answers.length - firstAnswer} of ${sent.length} within 3 s`);

        const answers = client.answers.slice(firstAnswer);
        const expectedIds = sent.map((s) => readableId(s.frame)).sort((a, b) => a - b);
        assert.deepEqual(answers.map((a) => a.message.requestId).sort((a, b) => a - b), expectedIds, 'exactly one answer per message, under its request id');
        for (const { message, identities } of answers) {
          assert.ok(message.type === 'reply' || message.type === 'error', `an answer is a reply or an error, not ${message.type}`);
          const index = message.requestId - 10_000;
          const source = message.requestId !== 0 ? sent[index] : undefined;
          if (message.type === 'error') {
            stats.codes.set(message.error.code, (stats.codes.get(message.error.code) ?? 0) + 1);
            assert.ok(isErrorCode(message.error.code), `stable code ${message.error.code}`);
            if (message.error.code === 'EFDFERRY_INTERNAL') {
              assert.ok(source?.mentionsBoom, `EFDFERRY_INTERNAL for a message that is not a call of "boom": ${message.error.message}`);
            }
            if (!source) continue;
            const lost = message.error.code === 'EFDFERRY_TRUNC' || message.error.message.includes('could not be returned');
            assert.deepEqual(identities, lost ? [] : source.payload, `the refused message's fds come back, in order (${message.error.code})`);
          } else if (source && identities.length) {
            assert.deepEqual(identities, source.payload, 'a reply carries the request fds (echo, upgrade)');
          }
        }
        stats.messages += sent.length;
        stats.errors += answers.filter((a) => a.message.type === 'error').length;
        stats.replies += answers.filter((a) => a.message.type === 'reply').length;
        stats.events += client.events.length;

        // Keeps serving: this connection, and a new one.
        await assertServes(client, 900_001, 'late');
        const fresh = new RawClient(binding, address);
        clients.push(fresh);
        await assertServes(fresh, 1, 'fresh');
        assert.deepEqual(binding.thrown.map(describeError), [], 'the server never threw out of its message handler');
      } finally {
        for (const c of clients) c.close();
        for (const s of sent) binding.closeAll([...s.made.map((m) => m.fd), ...s.made.flatMap((m) => m.extras)]);
        server?.close();
      }
      const drained = await eventually(() => binding.openFds === 0, 2000);
      const open = binding.openFds;
      binding.dispose();
      assert.ok(drained, `${open} fds still open after the client and the server closed`);
      assert.deepEqual(unhandled.map(describeError), [], 'no unhandled rejection');
    }),
    fcParams(RUNS.server),
  );
  t.pass(`${RUNS.server} runs: ${stats.messages} messages (${stats.replies} replies, ${stats.errors} errors, ${stats.events} events)`);
  t.comment(`error codes seen: ${[...stats.codes].sort().map(([code, n]) => `${code} ${n}`).join(', ')}`);
});

// -------------------------------------------------------------------------------------------------
// 4. Request validation
// -------------------------------------------------------------------------------------------------

const SPLICE_KEYS = new Set(['meta', 'idleTimeoutMs', 'maxDurationMs', 'maxBytesAToB', 'maxBytesBToA', 'prefaceAToB', 'prefaceBToA']);
const SPLICE_DEFAULTS = { idleTimeoutMs: 1000, maxDurationMs: 0 };
const isCount = (value: unknown) => typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;
const isBase64 = (value: unknown) => typeof value === 'string' && value.length % 4 === 0 && /^[A-Za-z0-9+/]*={0,2}$/.test(value);
const jsonBytes = (value: unknown) => Buffer.byteLength(JSON.stringify(value));

/** What docs and the splice contract accept, written independently of the parser. */
function spliceAcceptable(params: Record<string, unknown>, limits: SpliceRequestLimits): boolean {
  if (!Object.keys(params).every((key) => SPLICE_KEYS.has(key))) return false;
  // The size limit applies to the default `{}` too (a limit under 2 bytes refuses every request).
  if (!isPlainObject(params.meta ?? {}) || jsonBytes(params.meta ?? {}) > limits.maxMetaBytes) return false;
  if (!['idleTimeoutMs', 'maxDurationMs', 'maxBytesAToB', 'maxBytesBToA'].every((key) => params[key] === undefined || isCount(params[key]))) return false;
  return ['prefaceAToB', 'prefaceBToA'].every((key) => params[key] === undefined || (isBase64(params[key]) && Buffer.from(params[key] as string, 'base64').length <= limits.maxPrefaceBytes));
}

const spliceLimitsArb: fc.Arbitrary<SpliceRequestLimits> = fc.oneof(
  fc.constant(DEFAULT_REQUEST_LIMITS),
  fc.record({ maxMetaBytes: fc.nat({ max: 300 }), maxPrefaceBytes: fc.nat({ max: 64 }) }),
);

/** Params nesting JSON under `key`, up to MAX_NESTING levels. */
const nestedUnder = (key: string) =>
  fc
    .record({ depth: fc.integer({ min: 1, max: MAX_NESTING }), kind: fc.constantFrom<'array' | 'object'>('array', 'object') })
    .map(({ depth, kind }) => JSON.parse(`{"${key}":{"n":${nestedJsonText(depth, kind)}}}`) as Record<string, unknown>);

function assertSpliceShape(params: Record<string, unknown>, parsed: ReturnType<typeof parseSpliceRequest>): void {
  assert.deepEqual(Object.keys(parsed).sort(), ['meta', 'relay']);
  assert.ok(isPlainObject(parsed.meta));
  assert.deepEqual(parsed.meta, params.meta ?? {}, 'meta comes back exactly as given');
  const relay = parsed.relay;
  for (const key of Object.keys(relay)) {
    assert.ok(['idleTimeoutMs', 'maxDurationMs', 'maxBytesAToB', 'maxBytesBToA', 'prefaceAToB', 'prefaceBToA'].includes(key), `relay.${key}`);
  }
  assert.equal(relay.idleTimeoutMs, params.idleTimeoutMs ?? SPLICE_DEFAULTS.idleTimeoutMs);
  assert.equal(relay.maxDurationMs, params.maxDurationMs ?? SPLICE_DEFAULTS.maxDurationMs);
  assert.equal(relay.maxBytesAToB, params.maxBytesAToB ?? 0);
  assert.equal(relay.maxBytesBToA, params.maxBytesBToA ?? 0);
  for (const key of ['idleTimeoutMs', 'maxDurationMs', 'maxBytesAToB', 'maxBytesBToA'] as const) assert.ok(isCount(relay[key]), `relay.${key} is a count`);
  for (const key of ['prefaceAToB', 'prefaceBToA'] as const) {
    const expected = typeof params[key] === 'string' ? Buffer.from(params[key], 'base64') : Buffer.alloc(0);
    if (expected.length === 0) assert.equal(relay[key], undefined, `an empty ${key} is left out`);
    else assert.deepEqual(Buffer.from(relay[key]!), expected, `${key} is the decoded base64`);
  }
}

t.test('parseSpliceRequest: any JSON object is accepted in the documented shape or refused with EFDFERRY_INVALID', async (t) => {
  let accepted = 0;
  fc.assert(
    fc.property(
      fc.oneof({ weight: 6, arbitrary: spliceParamsArb }, { weight: 2, arbitrary: anyJsonObject }, { weight: 1, arbitrary: nestedUnder('meta') }),
      spliceLimitsArb,
      (raw, limits) => {
        const params = viaWire(raw);
        let parsed: ReturnType<typeof parseSpliceRequest>;
        try {
          parsed = parseSpliceRequest(params, SPLICE_DEFAULTS, limits);
        } catch (error) {
          if (!(error instanceof ProtocolError)) assert.fail(`threw something other than a ProtocolError: ${describeError(error)}`);
          assert.equal(error.code, 'EFDFERRY_INVALID');
          assert.equal(spliceAcceptable(params, limits), false, `refused acceptable params: ${error.message}`);
          return;
        }
        accepted++;
        assert.equal(spliceAcceptable(params, limits), true, 'accepted params the contract refuses');
        assertSpliceShape(params, parsed);
      },
    ),
    fcParams(RUNS.splice),
  );
  t.ok(accepted > RUNS.splice / 20, `${RUNS.splice} runs, ${accepted} accepted`);
});

const TENANT = /^[\x21-\x7e]{1,128}$/;

function upgradeAcceptable(params: Record<string, unknown>, limits: UpgradeRequestLimits): boolean {
  if (!Object.keys(params).every((key) => key === 'context' || key === 'tenant')) return false;
  // A destructuring default: an explicit `null` is not "absent" here (unlike splice's `meta ?? {}`).
  const context = params.context === undefined ? {} : params.context;
  if (!isPlainObject(context) || jsonBytes(context) > limits.maxContextBytes) return false;
  return params.tenant === undefined || (typeof params.tenant === 'string' && TENANT.test(params.tenant));
}

const upgradeLimitsArb: fc.Arbitrary<UpgradeRequestLimits> = fc.oneof(fc.constant(DEFAULT_UPGRADE_LIMITS), fc.record({ maxContextBytes: fc.nat({ max: 300 }) }));

t.test('parseUpgradeRequest: any JSON object is accepted in the documented shape or refused with EFDFERRY_INVALID', async (t) => {
  let accepted = 0;
  fc.assert(
    fc.property(
      fc.oneof({ weight: 6, arbitrary: upgradeParamsArb }, { weight: 2, arbitrary: anyJsonObject }, { weight: 1, arbitrary: nestedUnder('context') }),
      upgradeLimitsArb,
      (raw, limits) => {
        const params = viaWire(raw);
        let parsed: ReturnType<typeof parseUpgradeRequest>;
        try {
          parsed = parseUpgradeRequest(params, limits);
        } catch (error) {
          if (!(error instanceof ProtocolError)) assert.fail(`threw something other than a ProtocolError: ${describeError(error)}`);
          assert.equal(error.code, 'EFDFERRY_INVALID');
          assert.equal(upgradeAcceptable(params, limits), false, `refused acceptable params: ${error.message}`);
          return;
        }
        accepted++;
        assert.equal(upgradeAcceptable(params, limits), true, 'accepted params the contract refuses');
        assert.deepEqual(Object.keys(parsed).sort(), ['context', 'tenant']);
        assert.ok(isPlainObject(parsed.context));
        assert.deepEqual(parsed.context, params.context ?? {}, 'context comes back exactly as given');
        assert.equal(parsed.tenant, params.tenant ?? 'default');
        assert.match(parsed.tenant, TENANT);
      },
    ),
    fcParams(RUNS.upgrade),
  );
  t.ok(accepted > RUNS.upgrade / 20, `${RUNS.upgrade} runs, ${accepted} accepted`);
});

t.test('parseSpliceRequest and parseUpgradeRequest given params that are not an object', async (t) => {
  // The server only ever passes an object (codec: "params" must be an object), but the validators are
  // exported; a non-object must still not escape as anything but EFDFERRY_INVALID.
  const notObject = anyJson.filter((value) => !isPlainObject(value));
  fc.assert(
    fc.property(notObject, (raw) => {
      const params = viaWire(raw) as Record<string, unknown>;
      for (const parse of [() => parseSpliceRequest(params, SPLICE_DEFAULTS), () => parseUpgradeRequest(params)]) {
        let value: unknown;
        try {
          value = parse();
        } catch (error) {
          if (!(error instanceof ProtocolError)) assert.fail(`threw something other than a ProtocolError: ${describeError(error)}`);
          assert.equal(error.code, 'EFDFERRY_INVALID');
          continue;
        }
        assert.ok(isPlainObject(value), 'an accepted value is an object');
      }
    }),
    fcParams(RUNS.nonObjectParams),
  );
  t.pass(`${RUNS.nonObjectParams} runs`);
});


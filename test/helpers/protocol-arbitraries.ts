/**
 * fast-check arbitraries for the property tests of the wire protocol (test/unit/protocol-properties.test.ts):
 * JSON values with awkward keys, fds of every kind the fake binding can describe, valid frames (inline or
 * with a memfd body) and mutations of them, and the parameters of `splice` and `upgrade`.
 *
 * Everything generated is plain data (specs); `materializeFd` and `buildWire` turn it into fake fds and
 * bytes on a {@link FakeBinding}, so a counterexample prints readably and shrinks.
 */
import fs from 'node:fs';
import fc from 'fast-check';
import type { FdDescription } from '../../lib/native.js';
import { encodeFrame, FLAG_BODY_IN_MEMFD, MAGIC, MAX_INLINE_BODY, type MessageTypeName } from '../../lib/protocol/frame.js';
import type { FakeBinding } from './fake-binding.js';

// ---------------------------------------------------------------------------------------------------
// Run configuration
// ---------------------------------------------------------------------------------------------------

/** The seed every `fc.assert` of a run uses: FDFERRY_FC_SEED when set, otherwise a fresh one (printed). */
export const FC_SEED: number = process.env.FDFERRY_FC_SEED ? Number(process.env.FDFERRY_FC_SEED) : (Date.now() ^ (Math.random() * 0x7fffffff)) | 0;

/** `fc.assert` parameters with the run's seed. */
export const fcParams = <T>(numRuns: number): fc.Parameters<T> => ({ seed: FC_SEED, numRuns });

// ---------------------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------------------

/** Keys that trip code treating parsed JSON as ordinary objects (prototype keys, our own field names). */
export const AWKWARD_KEYS = [
  '__proto__',
  'constructor',
  'prototype',
  'toString',
  'valueOf',
  'toJSON',
  'hasOwnProperty',
  'then',
  'length',
  '',
  'method',
  'params',
  'owner',
  'protocol',
  'ids',
  'meta',
  'context',
  'tenant',
  'label',
] as const;

const awkwardStrings = fc.constantFrom('', ' ', '\u0000', '\ud800', '\udfff', 'é', '\u{1f600}', '"', '\\', '\n', 'a'.repeat(129), '__proto__');

/** A string: mostly short printable text, sometimes any code point, sometimes a known awkward one. */
export const anyString: fc.Arbitrary<string> = fc.oneof(
  { weight: 4, arbitrary: fc.string({ maxLength: 12 }) },
  { weight: 2, arbitrary: fc.string({ unit: 'binary', maxLength: 12 }) },
  { weight: 1, arbitrary: awkwardStrings },
);

const anyKey: fc.Arbitrary<string> = fc.oneof({ weight: 3, arbitrary: fc.string({ maxLength: 8 }) }, { weight: 2, arbitrary: fc.constantFrom(...AWKWARD_KEYS) });

const anyNumber = fc.oneof(
  fc.integer({ min: -5, max: 5 }),
  fc.integer(),
  fc.constantFrom(-0, 0.5, -1, 2 ** 53, 2 ** 53 - 1, 1e308, -1e-308, 4294967296),
  fc.double({ noNaN: true, noDefaultInfinity: true }),
);

/** An object built with own data properties, so `__proto__` is a key like any other (as JSON.parse makes it). */
export function objectFrom(entries: ReadonlyArray<readonly [string, unknown]>): Record<string, unknown> {
  const object: Record<string, unknown> = {};
  for (const [key, value] of entries) Object.defineProperty(object, key, { value, enumerable: true, writable: true, configurable: true });
  return object;
}

const json = fc.letrec<{ value: unknown; array: unknown[]; object: Record<string, unknown> }>((tie) => ({
  value: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    fc.constant(null),
    fc.boolean(),
    anyNumber,
    anyString,
    tie('array'),
    tie('object'),
  ),
  array: fc.array(tie('value'), { maxLength: 4 }),
  object: fc.array(fc.tuple(anyKey, tie('value')), { maxLength: 5 }).map(objectFrom),
}));

/** Any JSON value (JS values that survive JSON.stringify; `-0` and lone surrogates included). */
export const anyJson: fc.Arbitrary<unknown> = json.value;
/** Any JSON object. */
export const anyJsonObject: fc.Arbitrary<Record<string, unknown>> = json.object;

/** What the wire turns `value` into: JSON.parse(JSON.stringify(value)). */
export function viaWire<T>(value: T): T {
  return JSON.parse(JSON.stringify(value)) as T;
}

/** The JSON text of an array or object nested `depth` deep: `[[[...]]]` or `{"a":{"a":...}}`. */
export function nestedJsonText(depth: number, kind: 'array' | 'object'): string {
  return kind === 'array' ? `${'['.repeat(depth)}${']'.repeat(depth)}` : `${'{"a":'.repeat(depth)}{}${'}'.repeat(depth)}`;
}

// ---------------------------------------------------------------------------------------------------
// Fds
// ---------------------------------------------------------------------------------------------------

/** An fd to create on the fake binding. */
export type FdSpec =
  | { kind: 'described'; description: FdDescription }
  /** A fake memfd (a real temp file) with `content` and exactly `seals` (15 = all four). */
  | { kind: 'memfd'; content: Uint8Array; seals: number }
  /** One end of a fake seqpacket pair; the peer is kept open (connected) or closed at once. */
  | { kind: 'seqpacket'; connected: boolean };

const AF = { unix: 1, inet: 2, inet6: 10, netlink: 16, packet: 17 };
const SOCK = { stream: 1, dgram: 2, raw: 3, seqpacket: 5 };

const socket = (family: number, type: number, connected: boolean, listening = false, protocol = 0): FdDescription => ({
  kind: 'socket',
  family,
  type,
  protocol,
  connected,
  listening,
});

/** Descriptions of fds a daemon may be handed: the right kinds and every near miss. */
export const NAMED_DESCRIPTIONS: Record<string, FdDescription> = {
  'tcp4 connected': socket(AF.inet, SOCK.stream, true, false, 6),
  'tcp6 connected': socket(AF.inet6, SOCK.stream, true, false, 6),
  'tcp4 listening': socket(AF.inet, SOCK.stream, false, true, 6),
  'tcp4 unconnected': socket(AF.inet, SOCK.stream, false, false, 6),
  'unix stream connected': socket(AF.unix, SOCK.stream, true),
  'unix stream listening': socket(AF.unix, SOCK.stream, false, true),
  'unix seqpacket connected': socket(AF.unix, SOCK.seqpacket, true),
  'unix seqpacket unconnected': socket(AF.unix, SOCK.seqpacket, false),
  'unix dgram': socket(AF.unix, SOCK.dgram, false),
  'udp4 connected': socket(AF.inet, SOCK.dgram, true, false, 17),
  'udp6': socket(AF.inet6, SOCK.dgram, false, false, 17),
  'raw packet': socket(AF.packet, SOCK.raw, false),
  'netlink': socket(AF.netlink, SOCK.raw, false),
  'regular file': { kind: 'file', size: 0 },
  'regular file 70000': { kind: 'file', size: 70_000 },
  'pipe': { kind: 'pipe' },
  'char device': { kind: 'char' },
  'directory': { kind: 'dir' },
  'other': { kind: 'other' },
};

const description: fc.Arbitrary<FdDescription> = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom(...Object.values(NAMED_DESCRIPTIONS)) },
  {
    weight: 1,
    arbitrary: fc
      .record({
        family: fc.constantFrom(0, AF.unix, AF.inet, AF.inet6, AF.netlink, AF.packet, 255),
        type: fc.constantFrom(0, SOCK.stream, SOCK.dgram, SOCK.raw, SOCK.seqpacket, 10),
        connected: fc.boolean(),
        listening: fc.boolean(),
        protocol: fc.constantFrom(0, 6, 17),
      })
      .map(({ family, type, connected, listening, protocol }) => socket(family, type, connected, listening, protocol)),
  },
);

const memfdSeals = fc.oneof({ weight: 3, arbitrary: fc.constant(15) }, { weight: 2, arbitrary: fc.integer({ min: 0, max: 15 }) });

/** Any fd the fake binding can make. */
export const anyFdSpec: fc.Arbitrary<FdSpec> = fc.oneof(
  { weight: 6, arbitrary: description.map((d): FdSpec => ({ kind: 'described', description: d })) },
  {
    weight: 2,
    arbitrary: fc
      .record({ content: fc.uint8Array({ maxLength: 32 }), seals: memfdSeals })
      .map(({ content, seals }): FdSpec => ({ kind: 'memfd', content, seals })),
  },
  { weight: 2, arbitrary: fc.boolean().map((connected): FdSpec => ({ kind: 'seqpacket', connected })) },
);

/** 0 to `max` fds of random kinds. */
export const anyFdSpecs = (max = 10): fc.Arbitrary<FdSpec[]> => fc.array(anyFdSpec, { maxLength: max });

/** A materialized fd: `fd` goes into the message; `extras` (a seqpacket peer) are the test's to close. */
export interface MadeFd {
  fd: number;
  extras: number[];
}

/** Creates the fd `spec` describes. */
export function materializeFd(binding: FakeBinding, spec: FdSpec): MadeFd {
  switch (spec.kind) {
    case 'described':
      return { fd: binding.makeDescribed(spec.description), extras: [] };
    case 'memfd': {
      const fd = binding.memfdCreate('prop');
      if (spec.content.length) fs.writeSync(fd, spec.content, 0, spec.content.length, 0);
      binding.setSeals(fd, spec.seals);
      return { fd, extras: [] };
    }
    case 'seqpacket': {
      const [mine, peer] = binding.seqpacketPair();
      if (spec.connected) return { fd: mine, extras: [peer] };
      binding.closeAll([peer]);
      return { fd: mine, extras: [] };
    }
  }
}

/** Whether `fd` is open on the fake binding (memfds included). */
export function isOpen(binding: FakeBinding, fd: number): boolean {
  try {
    binding.describeFd(fd);
    return true;
  } catch {
    return false;
  }
}

/** What an fd is, for comparing a returned fd with the one sent (the fake's object, or a memfd's inode). */
export function identity(binding: FakeBinding, fd: number): unknown {
  try {
    return binding.objectOf(fd);
  } catch {
    return `inode:${fs.fstatSync(fd).ino}`;
  }
}

// ---------------------------------------------------------------------------------------------------
// Bodies and frames
// ---------------------------------------------------------------------------------------------------

/** A message before framing: its header type, request id and body bytes (not necessarily JSON). */
export interface BodySpec {
  type: MessageTypeName;
  requestId: number;
  body: Uint8Array;
  /** The request's method, when the body was built as a request (for the test's bookkeeping only). */
  method?: string;
}

const utf8 = (text: string): Uint8Array => Buffer.from(text, 'utf8');
const requestId = fc.oneof({ weight: 5, arbitrary: fc.integer({ min: 1, max: 1000 }) }, { weight: 1, arbitrary: fc.constantFrom(0, 0xffffffff, 0x80000000) });

/** Owner ids: valid ones, and every way to be invalid. */
export const ownerArb: fc.Arbitrary<unknown> = fc.oneof(
  { weight: 4, arbitrary: fc.stringMatching(/^[\x21-\x7e]{1,16}$/) },
  { weight: 1, arbitrary: fc.constantFrom('', 'has space', 'x'.repeat(128), 'x'.repeat(129), 'é', '\u0000') },
  { weight: 1, arbitrary: anyJson },
);

const maybe = <T>(arb: fc.Arbitrary<T>) => fc.option(arb, { nil: undefined, freq: 3 });
const dropUndefined = (record: Record<string, unknown>): Record<string, unknown> =>
  objectFrom(Object.entries(record).filter(([, value]) => value !== undefined));

const countArb = fc.oneof(
  { weight: 4, arbitrary: fc.nat({ max: 100_000 }) },
  { weight: 1, arbitrary: fc.constantFrom(-1, -0, 0.5, 2 ** 53, Number.MAX_SAFE_INTEGER, 1e300, '5', null, true, [], {}) },
);

const base64Arb = fc.oneof(
  { weight: 3, arbitrary: fc.uint8Array({ maxLength: 48 }).map((bytes) => Buffer.from(bytes).toString('base64')) },
  { weight: 1, arbitrary: fc.constantFrom('', '====', 'A===', 'AB=', 'AB==', 'ABC=', 'not base64!', 'AAAA====', '-_-_', 'QQ==\n') },
  { weight: 1, arbitrary: anyJson },
);

/** Parameters of a `splice` request: mostly plausible, with every field sometimes wrong. */
export const spliceParamsArb: fc.Arbitrary<Record<string, unknown>> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc
      .record({
        meta: maybe(fc.oneof({ weight: 4, arbitrary: anyJsonObject }, { weight: 1, arbitrary: anyJson })),
        idleTimeoutMs: maybe(countArb),
        maxDurationMs: maybe(countArb),
        maxBytesAToB: maybe(countArb),
        maxBytesBToA: maybe(countArb),
        prefaceAToB: maybe(base64Arb),
        prefaceBToA: maybe(base64Arb),
        extra: fc.option(fc.tuple(anyKey, anyJson), { nil: undefined, freq: 5 }),
      })
      .map(({ extra, ...fields }) => {
        const params = dropUndefined(fields);
        return extra ? objectFrom([...Object.entries(params), extra]) : params;
      }),
  },
  { weight: 1, arbitrary: anyJsonObject },
);

/** Parameters of an `upgrade` request. */
export const upgradeParamsArb: fc.Arbitrary<Record<string, unknown>> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc
      .record({
        context: maybe(fc.oneof({ weight: 4, arbitrary: anyJsonObject }, { weight: 1, arbitrary: anyJson })),
        tenant: maybe(ownerArb),
        extra: fc.option(fc.tuple(anyKey, anyJson), { nil: undefined, freq: 5 }),
      })
      .map(({ extra, ...fields }) => {
        const params = dropUndefined(fields);
        return extra ? objectFrom([...Object.entries(params), extra]) : params;
      }),
  },
  { weight: 1, arbitrary: anyJsonObject },
);

/** The `protocol` of a hello: 1, other versions, any JSON (objects with a "toString" key included). */
const helloProtocolArb: fc.Arbitrary<unknown> = fc.oneof(
  { weight: 6, arbitrary: fc.constant(1) },
  { weight: 2, arbitrary: fc.constantFrom(0, 2, '1', 1.5, null, true, [], {}, [1]) },
  { weight: 1, arbitrary: fc.constantFrom({ toString: 0 }, { valueOf: [] }, [{ toString: null }]) },
  { weight: 2, arbitrary: anyJson },
);

/** Methods the property server knows, the built-ins, and names it does not. */
export const METHODS = ['hello', 'ping', 'ack', 'echo', 'keep', 'splice', 'upgrade', 'boom'] as const;

const paramsFor = (method: string): fc.Arbitrary<unknown> => {
  switch (method) {
    case 'hello':
      return fc
        .record({ owner: maybe(ownerArb), protocol: maybe(helloProtocolArb) })
        .map(dropUndefined);
    case 'ack':
      return fc.oneof(
        fc.record({ ids: fc.array(fc.oneof(fc.constantFrom('kept-1', 'kept-2', 'kept-3'), anyString), { maxLength: 5 }) }),
        fc.record({ ids: anyJson }),
      );
    case 'keep':
      return fc.oneof(fc.record({ label: anyString }), anyJsonObject);
    case 'splice':
      return spliceParamsArb;
    case 'upgrade':
      return upgradeParamsArb;
    default:
      return anyJsonObject;
  }
};

/** A request body: a known method or not, its params usually an object, sometimes missing or not one. */
const requestBodyText: fc.Arbitrary<{ method: string; text: string }> = fc
  .tuple(
    fc.oneof(
      { weight: 8, arbitrary: fc.constantFrom<string>(...METHODS) },
      { weight: 1, arbitrary: fc.constantFrom('', 'nope', 'x'.repeat(64), 'x'.repeat(65), '__proto__', 'constructor', 'toString', 'hasOwnProperty') },
      { weight: 1, arbitrary: anyString },
    ),
    fc.nat({ max: 19 }),
  )
  .chain(([method, shape]) => {
    if (shape === 0) return fc.constant({ method, text: JSON.stringify({ method }) });
    if (shape === 1) return anyJson.map((params) => ({ method, text: JSON.stringify({ method, params }) }));
    if (shape === 2) return anyJson.map((m) => ({ method: typeof m === 'string' ? m : '(not a string)', text: JSON.stringify({ method: m, params: {} }) }));
    return paramsFor(method).map((params) => ({ method, text: JSON.stringify({ method, params }) }));
  });

const replyBodyText = fc.oneof(anyJsonObject.map((result) => JSON.stringify({ result })), anyJson.map((result) => JSON.stringify({ result })));
const errorBodyText = fc.oneof(
  fc.record({ code: anyString, message: anyString, details: maybe(anyJson) }).map((error) => JSON.stringify({ error: dropUndefined(error) })),
  anyJson.map((error) => JSON.stringify({ error })),
);
const eventBodyText = fc
  .record({ event: maybe(anyJson), id: maybe(anyJson), data: maybe(anyJson) })
  .map((body) => JSON.stringify(dropUndefined(body)));

/** A body that is not UTF-8 JSON of the right shape at all. */
const garbageBody: fc.Arbitrary<Uint8Array> = fc.oneof(
  fc.uint8Array({ maxLength: 40 }),
  anyJson.map((value) => utf8(JSON.stringify(value) ?? '')),
  fc.constantFrom(utf8(''), utf8('{'), utf8('{"method":"ping"'), Buffer.from([0xc3, 0x28]), Buffer.from([0xef, 0xbb, 0xbf, 0x7b, 0x7d]), utf8('{}'), utf8('[]'), utf8('null')),
);

/** Deeply nested params for a method (the caller caps the depth below the codec limit). */
export const nestedParamsText = (depth: fc.Arbitrary<number>, methods: fc.Arbitrary<string>) =>
  fc.record({ method: methods, depth, kind: fc.constantFrom<'array' | 'object'>('array', 'object'), key: fc.constantFrom('x', 'meta', 'context', 'label') }).map(
    ({ method, depth, kind, key }) => ({ method, text: `{"method":${JSON.stringify(method)},"params":{"${key}":${nestedJsonText(depth, kind)}}}` }),
  );

/** Pads a JSON object text with a long string member so it needs a memfd (over 65,516 bytes). */
const padded = (text: string, padding: number): string => `{"pad":"${'p'.repeat(padding)}",${text.slice(1)}`;

export interface BodyOptions {
  /** Most nesting depth for the nested-params shape (below the codec MAX_JSON_DEPTH). */
  maxNestingDepth: number;
  /** Weight of bodies too big for a frame (spilled to a memfd). */
  bigWeight: number;
}

/** Any message body, of any type, as bytes. */
export const bodySpecArb = (options: BodyOptions): fc.Arbitrary<BodySpec> => {
  const request = fc.oneof(
    { weight: 20, arbitrary: requestBodyText },
    { weight: 2, arbitrary: nestedParamsText(fc.integer({ min: 1, max: options.maxNestingDepth }), fc.constantFrom<string>(...METHODS)) },
  );
  const big = fc.record({ inner: request, padding: fc.integer({ min: MAX_INLINE_BODY - 40, max: MAX_INLINE_BODY + 4000 }) });
  return fc.oneof(
    { weight: 12, arbitrary: fc.record({ requestId, r: request }).map(({ requestId, r }): BodySpec => ({ type: 'request', requestId, method: r.method, body: utf8(r.text) })) },
    {
      weight: options.bigWeight,
      arbitrary: fc.record({ requestId, big }).map(({ requestId, big }): BodySpec => ({ type: 'request', requestId, method: big.inner.method, body: utf8(padded(big.inner.text, big.padding)) })),
    },
    { weight: 1, arbitrary: fc.record({ requestId, text: replyBodyText }).map(({ requestId, text }): BodySpec => ({ type: 'reply', requestId, body: utf8(text) })) },
    { weight: 1, arbitrary: fc.record({ requestId, text: errorBodyText }).map(({ requestId, text }): BodySpec => ({ type: 'error', requestId, body: utf8(text) })) },
    { weight: 1, arbitrary: fc.record({ requestId, text: eventBodyText }).map(({ requestId, text }): BodySpec => ({ type: 'event', requestId, body: utf8(text) })) },
    {
      weight: 2,
      arbitrary: fc
        .record({ requestId, type: fc.constantFrom<MessageTypeName>('request', 'reply', 'error', 'event'), body: garbageBody })
        .map(({ requestId, type, body }): BodySpec => ({ type, requestId, body })),
    },
  );
};

/** Header fields: offset and size. */
export const HEADER_FIELDS = {
  magic: [0, 4],
  version: [4, 1],
  type: [5, 1],
  flags: [6, 2],
  requestId: [8, 4],
  fdCount: [12, 2],
  reserved: [14, 2],
  bodyLength: [16, 4],
} as const;
export type HeaderField = keyof typeof HEADER_FIELDS;

/** One change to a message on its way to the receiver. */
export type Mutation =
  | { op: 'flip'; at: number; bit: number }
  | { op: 'truncate'; keep: number }
  | { op: 'extend'; bytes: Uint8Array }
  | { op: 'set'; field: HeaderField; value: number }
  | { op: 'nudge'; field: HeaderField; delta: number }
  | { op: 'dropFd'; at: number }
  | { op: 'addFd'; at: number; fd: FdSpec };

const fieldValue = (field: HeaderField): fc.Arbitrary<number> => {
  const size = HEADER_FIELDS[field][1];
  const full = fc.integer({ min: 0, max: 2 ** (8 * size) - 1 });
  switch (field) {
    case 'magic':
      return fc.oneof(fc.constantFrom(0, MAGIC ^ 1, MAGIC ^ 0x80000000, 0x46444659), full);
    case 'version':
      return fc.constantFrom(0, 1, 2, 255);
    case 'type':
      return fc.oneof(fc.integer({ min: 0, max: 5 }), full);
    case 'flags':
      return fc.oneof(fc.constantFrom(0, 1, 2, 3, 0x8000, 0x8001), full);
    case 'fdCount':
      return fc.oneof(fc.integer({ min: 0, max: 12 }), fc.constantFrom(253, 254, 0xffff), full);
    case 'bodyLength':
      return fc.oneof(fc.integer({ min: 0, max: 100 }), fc.constantFrom(MAX_INLINE_BODY, MAX_INLINE_BODY + 1, 128 * 1024 * 1024, 128 * 1024 * 1024 + 1, 0xffffffff), full);
    default:
      return fc.oneof(fc.integer({ min: 0, max: 3 }), full);
  }
};

const headerField = fc.constantFrom<HeaderField>(...(Object.keys(HEADER_FIELDS) as HeaderField[]));

/** Any mutation. */
export const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ op: fc.constant('flip' as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ op: fc.constant('truncate' as const), keep: fc.nat() }),
  fc.record({ op: fc.constant('extend' as const), bytes: fc.uint8Array({ minLength: 1, maxLength: 16 }) }),
  headerField.chain((field) => fc.record({ op: fc.constant('set' as const), field: fc.constant(field), value: fieldValue(field) })),
  fc.record({ op: fc.constant('nudge' as const), field: fc.constantFrom<HeaderField>('fdCount', 'bodyLength', 'type', 'flags', 'version'), delta: fc.constantFrom(-2, -1, 1, 2) }),
  fc.record({ op: fc.constant('dropFd' as const), at: fc.nat() }),
  fc.record({ op: fc.constant('addFd' as const), at: fc.nat(), fd: anyFdSpec }),
);

/** A message as sent: a frame and its fd specs (a memfd body, when there is one, is the last fd). */
export interface WireSpec {
  frame: Uint8Array;
  fds: FdSpec[];
}

/**
 * A message of `body`, inline or (always when too big, else when `memfd`) with its body in a memfd with
 * `seals` (15, all four, makes it well-formed).
 */
export function buildWire(body: BodySpec, passengers: FdSpec[], memfd: boolean, seals = 15): WireSpec {
  if (memfd || body.body.length > MAX_INLINE_BODY) {
    const fds = [...passengers, { kind: 'memfd', content: body.body, seals } as FdSpec];
    const frame = encodeFrame({ type: body.type, flags: FLAG_BODY_IN_MEMFD, requestId: body.requestId, fdCount: fds.length, bodyLength: body.body.length }, new Uint8Array(0));
    return { frame, fds };
  }
  const frame = encodeFrame({ type: body.type, flags: 0, requestId: body.requestId, fdCount: passengers.length, bodyLength: body.body.length }, body.body);
  return { frame, fds: passengers };
}

/** Applies `mutations` in order. */
export function mutate(wire: WireSpec, mutations: readonly Mutation[]): WireSpec {
  let frame = Buffer.from(wire.frame);
  const fds = [...wire.fds];
  for (const m of mutations) {
    switch (m.op) {
      case 'flip':
        if (frame.length) frame[m.at % frame.length]! ^= 1 << m.bit;
        break;
      case 'truncate':
        frame = frame.subarray(0, m.keep % (frame.length + 1));
        break;
      case 'extend':
        frame = Buffer.concat([frame, m.bytes]);
        break;
      case 'set':
      case 'nudge': {
        const [offset, size] = HEADER_FIELDS[m.field];
        if (frame.length < offset + size) break;
        const read = size === 1 ? frame.readUInt8(offset) : size === 2 ? frame.readUInt16LE(offset) : frame.readUInt32LE(offset);
        const modulus = 2 ** (8 * size);
        const value = m.op === 'set' ? m.value : (((read + m.delta) % modulus) + modulus) % modulus;
        if (size === 1) frame.writeUInt8(value, offset);
        else if (size === 2) frame.writeUInt16LE(value, offset);
        else frame.writeUInt32LE(value >>> 0, offset);
        break;
      }
      case 'dropFd':
        if (fds.length) fds.splice(m.at % fds.length, 1);
        break;
      case 'addFd':
        fds.splice(m.at % (fds.length + 1), 0, m.fd);
        break;
    }
  }
  return { frame, fds };
}

const described = (name: string): FdSpec => ({ kind: 'described', description: NAMED_DESCRIPTIONS[name]! });
const streamSocket = fc.constantFrom('tcp4 connected', 'tcp6 connected', 'unix stream connected').map(described);

/** Fds that fit what `method` takes (so a request gets past the fd checks to its parser and handler). */
export const fittingFds = (method: string | undefined): fc.Arbitrary<FdSpec[]> => {
  switch (method) {
    case 'splice':
      return fc.tuple(streamSocket, streamSocket);
    case 'upgrade':
      return fc.constant([{ kind: 'seqpacket', connected: true } as FdSpec]);
    case 'keep':
      return anyFdSpecs(4);
    case 'echo':
      return anyFdSpecs(6);
    default:
      return fc.constant([]);
  }
};

/** A valid message, possibly mutated (0 to 3 changes); its fds random or fitting its method. */
export const wireArb = (
  options: BodyOptions & { maxFds: number; mutationWeight?: number; fittingWeight?: number },
): fc.Arbitrary<WireSpec & { mutations: Mutation[] }> =>
  bodySpecArb(options)
    .chain((body) =>
      fc.record({
        body: fc.constant(body),
        passengers: fc.oneof({ weight: 1, arbitrary: anyFdSpecs(options.maxFds) }, { weight: options.fittingWeight ?? 1, arbitrary: fittingFds(body.method) }),
        memfdChance: fc.nat({ max: 6 }),
        seals: fc.oneof({ weight: 6, arbitrary: fc.constant(15) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 14 }) }),
        mutations: fc.oneof(
          { weight: 2, arbitrary: fc.constant([] as Mutation[]) },
          { weight: options.mutationWeight ?? 5, arbitrary: fc.array(mutationArb, { minLength: 1, maxLength: 3 }) },
        ),
      }),
    )
    .map(({ body, passengers, memfdChance, seals, mutations }) => {
      const wire = mutate(buildWire(body, passengers, memfdChance === 0, seals), mutations);
      return { ...wire, mutations };
    });

/** Random bytes of any length up to 70 KiB (big ones filled from a seed, so they generate and shrink fast). */
export const anyBytes: fc.Arbitrary<Uint8Array> = fc.oneof(
  { weight: 4, arbitrary: fc.uint8Array({ maxLength: 64 }) },
  { weight: 2, arbitrary: fc.uint8Array({ maxLength: 2048 }) },
  {
    weight: 1,
    arbitrary: fc.record({ length: fc.integer({ min: 0, max: 70 * 1024 }), seed: fc.integer(), withMagic: fc.boolean() }).map(({ length, seed, withMagic }) => {
      const bytes = Buffer.alloc(length);
      let x = seed | 1;
      for (let i = 0; i < length; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        bytes[i] = x & 0xff;
      }
      if (withMagic && length >= 4) bytes.writeUInt32LE(MAGIC, 0);
      return bytes;
    }),
  },
  // A header-sized start that is right, then garbage: gets past the magic check.
  {
    weight: 2,
    arbitrary: fc.record({ rest: fc.uint8Array({ minLength: 0, maxLength: 64 }), version: fc.constantFrom(1, 1, 2) }).map(({ rest, version }) => {
      const bytes = Buffer.concat([Buffer.alloc(4), rest]);
      bytes.writeUInt32LE(MAGIC, 0);
      if (bytes.length > 4) bytes[4] = version;
      return bytes;
    }),
  },
);


import t from 'tap';
import type { Test } from 'tap';
import { MessageCodec } from '../../lib/protocol/codec.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { encodeFrame, HEADER_SIZE, MAX_INLINE_BODY } from '../../lib/protocol/frame.js';
import { FakeBinding } from '../helpers/fake-binding.js';

const setup = (t: Test, maxBodyBytes?: number) => {
  const binding = new FakeBinding();
  t.teardown(() => binding.dispose());
  return { binding, codec: new MessageCodec(binding, maxBodyBytes ? { maxBodyBytes } : {}) };
};

/** A request whose params nest `levels` arrays deep (plus the body object and params: levels + 2). */
const deep = (levels: number) => {
  const body = Buffer.from(`{"method":"x","params":{"a":${'['.repeat(levels)}${']'.repeat(levels)}}}`);
  return encodeFrame({ type: 'request', requestId: 9, flags: 0, fdCount: 0, bodyLength: body.length }, body);
};

const expectError = (t: Test, fn: () => unknown, code: string) => {
  try {
    fn();
    t.fail(`expected ${code}`);
    return undefined;
  } catch (error) {
    t.type(error, ProtocolError);
    t.equal((error as ProtocolError).code, code);
    return error as ProtocolError;
  }
};

t.test('an inline request round-trips with its fds', (t) => {
  const { binding, codec } = setup(t);
  const fds = binding.streamPair();
  const encoded = codec.encode({ type: 'request', requestId: 7, method: 'echo', params: { a: 1 }, fds });
  t.same(encoded.owned, []);
  t.equal(encoded.frame.readUInt16LE(12), 2, 'fd count in header');
  const decoded = codec.decode(encoded.frame, encoded.fds);
  t.match(decoded, { type: 'request', requestId: 7, method: 'echo', params: { a: 1 }, fds });
  binding.closeAll(fds);
  t.end();
});

t.test('a body over the inline limit spills into a sealed memfd and comes back intact', (t) => {
  const { binding, codec } = setup(t);
  const blob = 'x'.repeat(MAX_INLINE_BODY + 1);
  const encoded = codec.encode({ type: 'reply', requestId: 3, result: { blob }, fds: [] });
  t.equal(encoded.frame.length, HEADER_SIZE, 'no inline bytes');
  t.equal(encoded.fds.length, 1);
  t.equal(binding.memfdSeals(encoded.fds[0]!), 15, 'all four seals');
  const received = binding.dup(encoded.fds[0]!);
  binding.closeAll(encoded.owned);
  const decoded = codec.decode(encoded.frame, [received]);
  t.equal(decoded.type === 'reply' && decoded.result.blob, blob);
  t.same(decoded.fds, [], 'the body memfd is not handed on');
  t.equal(binding.openFds, 0, 'the body memfd was closed');
  t.end();
});

t.test('253 fds fit; 253 fds plus a spilled body do not', (t) => {
  const { binding, codec } = setup(t);
  const fds = Array.from({ length: 253 }, () => binding.makeDescribed({ kind: 'pipe' }));
  t.equal(codec.encode({ type: 'request', requestId: 1, method: 'm', params: {}, fds }).fds.length, 253);
  expectError(t, () => codec.encode({ type: 'request', requestId: 1, method: 'm', params: { big: 'y'.repeat(70_000) }, fds }), 'EFDFERRY_TOOMANYFDS');
  expectError(t, () => codec.encode({ type: 'request', requestId: 1, method: 'm', params: {}, fds: [...fds, fds[0]!] }), 'EFDFERRY_TOOMANYFDS');
  const fewer = fds.slice(0, 252);
  const spilled = codec.encode({ type: 'request', requestId: 1, method: 'm', params: { big: 'y'.repeat(70_000) }, fds: fewer });
  t.equal(spilled.fds.length, 253, '252 fds plus the body memfd');
  binding.closeAll(spilled.owned);
  binding.closeAll(fds);
  t.equal(binding.openFds, 0);
  t.end();
});

t.test('malformed frames give precise errors and hand every fd back', async (t) => {
  const { binding, codec } = setup(t);
  const good = codec.encode({ type: 'request', requestId: 9, method: 'ping', params: {}, fds: [] }).frame;
  const mutate = (fn: (b: Buffer) => void) => {
    const copy = Buffer.from(good);
    fn(copy);
    return copy;
  };
  const cases: Array<[string, Buffer, number, string]> = [
    ['short', good.subarray(0, 10), 0, 'EFDFERRY_SHORT'],
    ['magic', mutate((b) => b.write('XXXX', 0)), 0, 'EFDFERRY_MAGIC'],
    ['version', mutate((b) => b.writeUInt8(2, 4)), 0, 'EFDFERRY_VERSION'],
    ['type', mutate((b) => b.writeUInt8(9, 5)), 0, 'EFDFERRY_TYPE'],
    ['flags', mutate((b) => b.writeUInt16LE(0x80, 6)), 0, 'EFDFERRY_HEADER'],
    ['reserved', mutate((b) => b.writeUInt16LE(1, 14)), 0, 'EFDFERRY_HEADER'],
    ['length lies (longer)', mutate((b) => b.writeUInt32LE(b.length, 16)), 0, 'EFDFERRY_LENGTH'],
    ['length lies (shorter)', mutate((b) => b.writeUInt32LE(1, 16)), 0, 'EFDFERRY_LENGTH'],
    ['fd count lies', mutate((b) => b.writeUInt16LE(3, 12)), 1, 'EFDFERRY_FDCOUNT'],
    ['not json', encodeFrame({ type: 'request', requestId: 9, flags: 0, fdCount: 0, bodyLength: 3 }, Buffer.from('{{{')), 0, 'EFDFERRY_JSON'],
    ['invalid utf-8', encodeFrame({ type: 'request', requestId: 9, flags: 0, fdCount: 0, bodyLength: 2 }, Buffer.from([0xc3, 0x28])), 0, 'EFDFERRY_JSON'],
    ['no method', encodeFrame({ type: 'request', requestId: 9, flags: 0, fdCount: 0, bodyLength: 2 }, Buffer.from('{}')), 0, 'EFDFERRY_JSON'],
    ['array body', encodeFrame({ type: 'request', requestId: 9, flags: 0, fdCount: 0, bodyLength: 2 }, Buffer.from('[]')), 0, 'EFDFERRY_JSON'],
    // Found by the property tests: past a few thousand levels, anything that recurses over the value blows the stack.
    ['nested 10,000 deep', deep(10_000), 0, 'EFDFERRY_JSON'],
    ['nested 513 deep', deep(511), 0, 'EFDFERRY_JSON'],
    ['request id 0', encodeFrame({ type: 'request', requestId: 0, flags: 0, fdCount: 0, bodyLength: 14 }, Buffer.from('{"method":"x"}')), 0, 'EFDFERRY_HEADER'],
  ];
  for (const [name, frame, fdCount, code] of cases) {
    const fds = Array.from({ length: fdCount }, () => binding.makeDescribed({ kind: 'file', size: 0 }));
    const error = expectError(t, () => codec.decode(frame, fds), code);
    t.same(error?.fds, fds, `${name}: the fds come back`);
    if (frame.length >= 12 && frame.readUInt32LE(0) === good.readUInt32LE(0)) t.equal(error?.requestId, frame.readUInt32LE(8), `${name}: answerable`);
    binding.closeAll(fds);
  }
  t.equal(binding.openFds, 0);
});

t.test('memfd bodies: unsealed, not a memfd, wrong size, too big', (t) => {
  const { binding, codec } = setup(t, 100_000);
  const big = { type: 'reply' as const, requestId: 1, result: { blob: 'z'.repeat(70_000) }, fds: [] };
  const send = () => {
    const encoded = codec.encode(big);
    const received = binding.dup(encoded.fds[0]!);
    binding.closeAll(encoded.owned);
    return { frame: encoded.frame, memfd: received };
  };
  let { frame, memfd } = send();
  binding.setSeals(memfd, 2 | 4 | 1);
  const passenger = binding.makeDescribed({ kind: 'pipe' });
  let framed = Buffer.from(frame);
  framed.writeUInt16LE(2, 12);
  const unsealed = expectError(t, () => codec.decode(framed, [passenger, memfd]), 'EFDFERRY_UNSEALED');
  t.same(unsealed?.fds, [passenger], 'the passenger comes back, the body memfd does not');
  binding.closeAll([passenger]);

  ({ frame, memfd } = send());
  const notMemfd = binding.makeDescribed({ kind: 'file', size: 70_000 });
  binding.closeAll([memfd]);
  expectError(t, () => codec.decode(frame, [notMemfd]), 'EFDFERRY_NOTMEMFD');

  ({ frame, memfd } = send());
  framed = Buffer.from(frame);
  framed.writeUInt32LE(frame.readUInt32LE(16) - 1, 16);
  expectError(t, () => codec.decode(framed, [memfd]), 'EFDFERRY_LENGTH');

  ({ frame, memfd } = send());
  framed = Buffer.from(frame);
  framed.writeUInt32LE(200_000, 16);
  expectError(t, () => codec.decode(framed, [memfd]), 'EFDFERRY_TOOBIG');
  expectError(t, () => codec.encode({ ...big, result: { blob: 'q'.repeat(200_000) } }), 'EFDFERRY_TOOBIG');
  t.equal(binding.openFds, 0, 'every body memfd was closed');
  t.end();
});

t.test('nesting up to the limit is accepted', (t) => {
  const { codec } = setup(t);
  const body = Buffer.from(`{"method":"x","params":{"a":${'['.repeat(510)}${']'.repeat(510)}}}`);
  const frame = encodeFrame({ type: 'request', requestId: 9, flags: 0, fdCount: 0, bodyLength: body.length }, body);
  t.match(codec.decode(frame, []), { type: 'request', method: 'x' }, '512 levels (body, params, 510 arrays) decode');
  t.end();
});

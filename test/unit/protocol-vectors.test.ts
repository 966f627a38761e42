// The hex vectors in docs/protocol.md are part of the contract: they must encode and decode as written.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { MessageCodec } from '../../lib/protocol/codec.js';
import { decodeHeader, encodeFrame, FLAG_BODY_IN_MEMFD } from '../../lib/protocol/frame.js';
import { FakeBinding } from '../helpers/fake-binding.js';

const doc = fs.readFileSync(path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'docs', 'protocol.md'), 'utf8');
const vectors = [...doc.matchAll(/```fdferry-vector\n([^\n]+)\n([\s\S]*?)```/g)].map((match) => ({
  spec: JSON.parse(match[1]!) as {
    type: 'request' | 'reply' | 'error' | 'event';
    requestId: number;
    fdCount: number;
    flags?: number;
    bodyLength?: number;
    body?: Record<string, unknown>;
  },
  bytes: Buffer.from(match[2]!.replace(/\s+/g, ''), 'hex'),
}));

t.ok(vectors.length >= 6, `docs/protocol.md has vectors (${vectors.length})`);

for (const { spec, bytes } of vectors) {
  t.test(`${spec.type} ${spec.requestId} (${bytes.length} bytes)`, (t) => {
    const binding = new FakeBinding();
    t.teardown(() => binding.dispose());
    if (spec.flags === FLAG_BODY_IN_MEMFD) {
      t.same(encodeFrame({ type: spec.type, requestId: spec.requestId, flags: spec.flags, fdCount: spec.fdCount, bodyLength: spec.bodyLength! }, new Uint8Array(0)), bytes, 'encodes to the documented header');
      t.match(decodeHeader(bytes, spec.fdCount, 1 << 20), { type: spec.type, requestId: spec.requestId, flags: 1, fdCount: spec.fdCount, bodyLength: spec.bodyLength });
      t.end();
      return;
    }
    const codec = new MessageCodec(binding);
    const fds = Array.from({ length: spec.fdCount }, () => binding.makeDescribed({ kind: 'socket', family: 1, type: 1, connected: true }));
    const body = spec.body!;
    const message =
      spec.type === 'request'
        ? { type: spec.type, requestId: spec.requestId, method: body.method as string, params: body.params as Record<string, unknown>, fds }
        : spec.type === 'reply'
          ? { type: spec.type, requestId: spec.requestId, result: body.result as Record<string, unknown>, fds }
          : spec.type === 'error'
            ? { type: spec.type, requestId: spec.requestId, error: body.error as { code: string; message: string }, fds }
            : { type: spec.type, requestId: spec.requestId, event: body.event as string, id: body.id as string, data: body.data as Record<string, unknown>, fds };
    const encoded = codec.encode(message);
    t.equal(encoded.frame.toString('hex'), bytes.toString('hex'), 'encodes to the documented bytes');
    t.same(codec.decode(bytes, fds), message, 'the documented bytes decode to the message');
    binding.closeAll(fds);
    t.end();
  });
}

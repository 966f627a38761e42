import t from 'tap';
import { parseSpliceRequest } from '../../services/splicer/request.js';

const defaults = { idleTimeoutMs: 500, maxDurationMs: 0 };

t.test('defaults fill what the request leaves out', (t) => {
  t.same(parseSpliceRequest({}, defaults), {
    meta: {},
    relay: { idleTimeoutMs: 500, maxDurationMs: 0, maxBytesAToB: 0, maxBytesBToA: 0 },
  });
  const parsed = parseSpliceRequest(
    { meta: { a: [1] }, idleTimeoutMs: 0, maxBytesAToB: 10, prefaceBToA: Buffer.from('hi').toString('base64') },
    defaults,
  );
  t.same(parsed.meta, { a: [1] });
  t.equal(parsed.relay.idleTimeoutMs, 0, 'an explicit 0 wins over the default');
  t.equal(parsed.relay.maxBytesAToB, 10);
  t.equal(Buffer.from(parsed.relay.prefaceBToA!).toString(), 'hi');
  t.end();
});

t.test('bad parameters are refused with EFDFERRY_INVALID and say why', (t) => {
  const bad: Array<[Record<string, unknown>, RegExp]> = [
    [{ meta: [] }, /"meta" must be a JSON object/],
    [{ meta: 'x' }, /"meta" must be a JSON object/],
    [{ idleTimeoutMs: -1 }, /"idleTimeoutMs" must be a non-negative integer/],
    [{ maxBytesBToA: 1.5 }, /"maxBytesBToA"/],
    [{ prefaceAToB: 'not base64!' }, /"prefaceAToB" must be base64/],
    [{ prefaceAToB: 'A'.repeat(8) }, /at most 4 are accepted/],
    [{ meta: { big: 'x'.repeat(100) } }, /"meta" is \d+ bytes; at most 50/],
    [{ surprise: 1 }, /unknown parameter "surprise"/],
  ];
  for (const [params, message] of bad) {
    t.throws(() => parseSpliceRequest(params, defaults, { maxMetaBytes: 50, maxPrefaceBytes: 4 }), { code: 'EFDFERRY_INVALID', message });
  }
  t.end();
});

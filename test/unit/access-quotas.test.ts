// Who may talk to a daemon, and the per-peer quotas: pure logic, no root, no addon.
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { accessOf, defaultAccessPolicy, parseIdList, peerGroups } from '../../lib/rpc/access.js';
import { Quotas } from '../../lib/rpc/quotas.js';

t.test('allow-lists: uid or any group; control implies use; defaults are root and the daemon itself', (t) => {
  const policy = { allowUids: [1000], allowGids: [50], controlUids: [0], controlGids: [10] };
  const peer = (uid: number, gid: number) => ({ pid: 1, uid, gid });
  t.same(accessOf(policy, peer(1000, 1000), []), { connect: true, control: false }, 'an allowed uid');
  t.same(accessOf(policy, peer(2000, 2000), [50]), { connect: true, control: false }, 'a supplementary group counts');
  t.same(accessOf(policy, peer(2000, 50), []), { connect: true, control: false }, 'so does the primary group');
  t.same(accessOf(policy, peer(2000, 2000), []), { connect: false, control: false }, 'anyone else is refused');
  t.same(accessOf(policy, peer(3000, 3000), [10]), { connect: true, control: true }, 'a control group may also connect');
  t.same(defaultAccessPolicy(0), { allowUids: [0], allowGids: [], controlUids: [0], controlGids: [] });
  t.same(defaultAccessPolicy(1234).allowUids, [0, 1234]);
  t.end();
});

t.test('id lists: numbers and names, and a clear error for an unknown name', (t) => {
  t.same(parseIdList('allow-uid', '0, 65534', '/etc/passwd'), [0, 65534]);
  t.same(parseIdList('allow-uid', 'root', '/etc/passwd'), [0], 'names resolve from /etc/passwd');
  t.throws(() => parseIdList('allow-gid', 'no-such-group-here', '/etc/group'), { message: /--allow-gid: no group named "no-such-group-here"/ });
  const proc = fs.mkdtempSync(path.join(os.tmpdir(), 'fdf-proc-'));
  t.teardown(() => fs.rmSync(proc, { recursive: true, force: true }));
  fs.mkdirSync(path.join(proc, '42'));
  fs.writeFileSync(path.join(proc, '42', 'status'), 'Name:\tx\nGroups:\t4 24 27 \nPid:\t42\n');
  t.same(peerGroups(42, proc), [4, 24, 27], 'supplementary groups from /proc/<pid>/status');
  t.same(peerGroups(43, proc), [], 'a peer that is gone has none');
  t.end();
});

t.test('quotas: request rate, fds in flight per uid and owner, connections per uid', (t) => {
  let now = 0;
  const quotas = new Quotas({ maxConnectionsPerUid: 2, maxFdsInflightPerUid: 10, maxFdsInflightPerOwner: 6, requestRatePerUid: 5, requestRatePerOwner: 0 }, () => now);
  for (let i = 0; i < 5; i++) quotas.admit(1, null, 0);
  t.throws(() => quotas.admit(1, null, 0), { code: 'EFDFERRY_LIMIT', details: { limit: 'requestRatePerUid' } }, 'the sixth request in one instant is refused');
  t.doesNotThrow(() => quotas.admit(2, null, 0), 'another uid has its own bucket');
  now += 400;
  t.doesNotThrow(() => quotas.admit(1, null, 0), 'tokens come back with time (5/s: 2 after 400 ms)');
  now += 10_000;
  quotas.admit(1, '1:a', 6);
  t.throws(() => quotas.admit(1, '1:a', 1), { code: 'EFDFERRY_LIMIT', details: { limit: 'maxFdsInflightPerOwner' } }, 'the owner is at its 6 fds');
  quotas.admit(1, '1:b', 4);
  t.throws(() => quotas.admit(1, '1:c', 1), { code: 'EFDFERRY_LIMIT', details: { limit: 'maxFdsInflightPerUid' } }, 'the uid is at its 10 fds');
  quotas.settle(1, '1:a', 6);
  t.doesNotThrow(() => quotas.admit(1, '1:c', 5), 'answered requests give their fds back to the books');
  t.same(quotas.snapshot().fdsInflightPerUid, { 1: 9 });
  t.ok(quotas.connect(7) && quotas.connect(7), 'two connections for uid 7');
  t.notOk(quotas.connect(7), 'not a third');
  quotas.disconnect(7);
  t.ok(quotas.connect(7), 'one closed, one more may open');
  now += 10_000;
  quotas.sweep();
  t.end();
});

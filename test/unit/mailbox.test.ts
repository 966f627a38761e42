import t from 'tap';
import { Mailbox, type ExpiryReason, type MailboxEntry } from '../../lib/rpc/mailbox.js';

const setup = (limits: ConstructorParameters<typeof Mailbox>[0]['limits']) => {
  let now = 1_000;
  const closed: number[] = [];
  const expired: Array<[string, ExpiryReason]> = [];
  const mailbox = new Mailbox({
    limits,
    closeFds: (fds) => closed.push(...fds),
    onExpire: (entry: MailboxEntry, reason) => expired.push([entry.id, reason]),
    now: () => now,
  });
  return { mailbox, closed, expired, advance: (ms: number) => (now += ms) };
};

const put = (mailbox: Mailbox, ownerKey: string, id: string, fds: number[] = []) =>
  mailbox.put({ ownerKey, id, event: 'envelope', data: {}, fds });

t.test('ack removes the entry and closes its fds; unknown ids are reported', (t) => {
  const { mailbox, closed } = setup({});
  put(mailbox, '0:a', 'x', [10, 11]);
  t.same(mailbox.pending('0:a').map((e) => e.id), ['x']);
  t.equal(mailbox.ack('1:a', 'x'), false, 'another uid cannot ack it');
  t.equal(mailbox.ack('0:a', 'x'), true);
  t.equal(mailbox.ack('0:a', 'x'), false);
  t.same(closed, [10, 11]);
  t.equal(mailbox.size, 0);
  t.end();
});

t.test('limits per owner, in total and by age expire the oldest, logged first', (t) => {
  const { mailbox, closed, expired, advance } = setup({ maxPerOwner: 2, maxTotal: 3, maxAgeMs: 100 });
  put(mailbox, 'o1', 'a', [1]);
  put(mailbox, 'o1', 'b', [2]);
  put(mailbox, 'o1', 'c', [3]);
  t.same(expired, [['a', 'owner-limit']]);
  advance(10);
  put(mailbox, 'o2', 'd', [4]);
  put(mailbox, 'o3', 'e', [5]);
  t.same(expired.at(-1), ['b', 'total-limit']);
  advance(95);
  t.equal(mailbox.sweep(), 1, 'only c is older than 100 ms');
  t.same(expired.at(-1), ['c', 'age']);
  mailbox.clear();
  t.same(expired.slice(-2).map(([, reason]) => reason), ['shutdown', 'shutdown']);
  t.same(closed.sort(), [1, 2, 3, 4, 5]);
  t.equal(mailbox.size, 0);
  t.throws(() => {
    put(mailbox, 'o1', 'z');
    put(mailbox, 'o1', 'z');
  }, /already holds/);
  t.end();
});

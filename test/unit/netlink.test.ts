/**
 * Netlink encoders and decoders (lib/netlink/): the byte-exact samples of notes/fish-kernel.md §3 and §7,
 * round trips through the decoders, Fish's conntrack labels. No root, no addon.
 */
import t from 'tap';
import { addressBytes, canonicalAddress, formatAddress } from '../../lib/netlink/address.js';
import {
  CT_MSG,
  CTA,
  IPS,
  clientAddress6,
  decodeEntry,
  decodeLabels,
  deleteByTupleMessage,
  dumpByMarkMessage,
  encodeLabels,
  flushByMarkMessage,
  getByTupleMessage,
  reserveMessage,
} from '../../lib/netlink/conntrack.js';
import {
  Attributes,
  NLM_F,
  NetlinkDecodeError,
  SequenceNumbers,
  attrNested,
  attrU32,
  attrU8,
  decodeErrorMessage,
  decodeHeader,
  encodeAttributes,
  encodeMessage,
  host32,
  isNetlinkError,
  splitMessages,
} from '../../lib/netlink/message.js';
import {
  RTM,
  decodeRoute,
  decodeRule,
  deleteDumpedRule,
  linkSetUp,
  routeDump,
  routeMessage,
  ruleDump,
  ruleMessage,
} from '../../lib/netlink/route.js';

/** The notes write samples as space-separated hex groups, possibly over several lines. */
const hex = (text: string): Buffer => Buffer.from(text.replace(/\s+/g, ''), 'hex');

/** Turns an encoded request into the shape the kernel answers a dump with (type, flags NLM_F_MULTI). */
const asReply = (message: Buffer, type: number): Buffer => {
  const copy = Buffer.from(message);
  copy.writeUInt16LE(type, 4);
  copy.writeUInt16LE(NLM_F.MULTI, 6);
  return copy;
};

t.test('the notes\' rtnetlink samples, byte for byte (§3 step 4)', async (t) => {
  t.same(
    linkSetUp({ seq: 1, ifindex: 2, mtu: 1500 }),
    hex('28000000 1000 0500 01000000 00000000 00000000 02000000 01000000 01000000 0800 0400 dc050000'),
    'RTM_NEWLINK sample',
  );
  t.same(
    routeMessage({ seq: 2, op: 'add', family: 4, table: 4242, ifindex: 2 }),
    hex('2c000000 1800 0506 02000000 00000000 02000000 0004fd01 00000000 0800 0f00 92100000 0800 0400 02000000'),
    'RTM_NEWROUTE default dev table 4242',
  );
  t.same(
    ruleMessage({
      seq: 2,
      op: 'add',
      rule: { family: 4, priority: 100, table: 4242, dst: '203.0.113.7', ipProto: 17, dport: { lo: 40000, hi: 40999 } },
    }),
    hex(`44000000 2000 0506 02000000 00000000 02200000 00000001 00000000 0800 0600 64000000 0800 0100 cb007107
         0800 0f00 92100000 0500 1600 11000000 0800 1800 409c27a0`),
    'RTM_NEWRULE pref 100 to E udp dport 40000-40999 lookup 4242',
  );
});

t.test('route and rule variants', async (t) => {
  const v6 = routeMessage({ seq: 3, op: 'add', family: 6, table: 4242, ifindex: 5, mode: 'replace' });
  const header = decodeHeader(v6);
  t.equal(header.type, RTM.NEWROUTE);
  t.equal(header.flags, NLM_F.REQUEST | NLM_F.ACK | NLM_F.CREATE | NLM_F.REPLACE, 'replace mode');
  t.equal(v6[16], 10, 'AF_INET6');
  const del = routeMessage({ seq: 4, op: 'delete', family: 4, table: 4242, ifindex: 2 });
  t.equal(decodeHeader(del).type, RTM.DELROUTE);
  t.equal(decodeHeader(del).flags, NLM_F.REQUEST | NLM_F.ACK);
  t.same(del.subarray(8, 12), host32(4), 'seq');

  const icmp6 = ruleMessage({ seq: 5, op: 'delete', rule: { family: 6, priority: 101, table: 4242, dst: '2001:db8:e::7', ipProto: 58, dport: null } });
  t.equal(decodeHeader(icmp6).type, RTM.DELRULE);
  t.equal(icmp6[17], 128, '/128');
  // Decode it back as a dump entry would arrive.
  const decoded = decodeRule(asReply(icmp6, RTM.NEWRULE));
  t.match(decoded, { family: 6, priority: 101, table: 4242, dst: '2001:db8:e::7', dstLen: 128, ipProto: 58, dport: null, action: 1 });

  const udp = ruleMessage({ seq: 6, op: 'add', rule: { family: 4, priority: 100, table: 4242, dst: '203.0.113.7', ipProto: 17, dport: { lo: 40000, hi: 40999 } } });
  const rule = decodeRule(asReply(udp, RTM.NEWRULE));
  t.match(rule, { family: 4, dst: '203.0.113.7', dstLen: 32, ipProto: 17, dport: { lo: 40000, hi: 40999 }, sport: null, otherAttributes: [] });
  // Deleting the dumped rule re-encodes the same attributes as the add.
  const again = deleteDumpedRule({ seq: 6, rule: rule! });
  t.same(again.subarray(16), udp.subarray(16), 'delete of a dumped rule carries what the add carried');
  t.equal(decodeHeader(again).type, RTM.DELRULE);

  const dump = ruleDump({ seq: 7, family: 6 });
  t.equal(decodeHeader(dump).flags, NLM_F.REQUEST | NLM_F.DUMP);
  t.equal(dump.length, 28);
  t.equal(decodeHeader(routeDump({ seq: 8, family: 4 })).type, RTM.GETROUTE);

  const route = decodeRoute(asReply(routeMessage({ seq: 9, op: 'add', family: 6, table: 4242, ifindex: 7 }), RTM.NEWROUTE));
  t.same(route, { family: 6, table: 4242, dst: null, dstLen: 0, ifindex: 7, protocol: 4, scope: 253, type: 1 });
  // A family other than IPv4/IPv6 (e.g. the AF_UNSPEC default rules some kernels show) is skipped.
  const unspec = asReply(udp, RTM.NEWRULE);
  unspec[16] = 0;
  t.equal(decodeRule(unspec), null);
  t.throws(() => decodeRule(asReply(udp, RTM.NEWROUTE)), NetlinkDecodeError);
});

t.test('attributes: padding, nesting, bounds', async (t) => {
  const encoded = encodeAttributes([attrU8(1, 7), attrNested(2, [attrU32(3, 0x01020304)])]);
  t.same(encoded, hex('0500 0100 07000000 0c00 0280 0800 0300 04030201'));
  const parsed = new Attributes(encoded);
  t.equal(parsed.u8(1), 7);
  t.equal(parsed.nested(2)?.u32(3), 0x01020304);
  t.same(parsed.types(), [1, 2], 'flag bits stripped from types');
  t.throws(() => new Attributes(hex('0900 0100 07000000')), NetlinkDecodeError, 'length past the end');
  t.throws(() => new Attributes(hex('0500 0100 07000000')).u32(1), NetlinkDecodeError, 'too short for a u32');
  t.throws(() => decodeHeader(hex('ff000000 1000 0000 00000000 00000000')), NetlinkDecodeError);

  const two = Buffer.concat([encodeMessage({ type: 3, flags: 2, seq: 1 }, Buffer.alloc(4)), encodeMessage({ type: 2, flags: 0, seq: 1 }, hex('efffffff'))]);
  const messages = splitMessages(two);
  t.equal(messages.length, 2);
  t.equal(decodeErrorMessage(messages[1]!), 17, 'NLMSG_ERROR carries -EEXIST');

  const seq = new SequenceNumbers(0xfffffffe);
  t.same([seq.next(), seq.next(), seq.next()], [0xffffffff, 1, 2], 'wraps and skips 0');

  const error = Object.assign(new Error('netlink RTM_NEWRULE EEXIST'), { code: 'EEXIST', errno: -17, syscall: 'netlink' });
  t.ok(isNetlinkError(error, 'EEXIST'));
  t.notOk(isNetlinkError(error, 'ENOENT'));
  t.notOk(isNetlinkError(Object.assign(new Error('x'), { code: 'EEXIST', syscall: 'sendto' })));
});

t.test('addresses', async (t) => {
  t.equal(formatAddress(addressBytes('2001:db8:0:0:0:0:0:7')), '2001:db8::7');
  t.equal(canonicalAddress('2001:DB8::1:0:0:1'), '2001:db8::1:0:0:1');
  t.equal(canonicalAddress('::ffff:1.2.3.4'), '::ffff:102:304');
  t.equal(canonicalAddress('::'), '::');
  t.equal(canonicalAddress('1:0:0:2:0:0:0:3'), '1:0:0:2::3', 'the longest zero run');
  t.throws(() => addressBytes('not-an-address'), TypeError);
});

const sample168 = hex(`
a8000000 0001 0506 34120000 00000000 02000000
34000180 14000180 08000100 cb007107 08000200 c6336402
         1c000280 05000100 06000000 06000200 9c410000 06000300 00070000
34000280 14000180 08000100 c6336402 08000200 cb007107
         1c000280 05000100 06000000 06000200 00070000 06000300 9c410000
08000700 0000003c 08000300 00000008 08000800 f15e0001
14001600 00000001 c92e0104 64400002 00000000`);

t.test('the notes\' 168-byte ctnetlink reservation, byte for byte (§7)', async (t) => {
  const labels = encodeLabels({ rid: 1, clientPort: 51502, ipVersion: 4, address: '100.64.0.2' });
  const message = reserveMessage({
    seq: 0x1234,
    orig: { src: '203.0.113.7', dst: '198.51.100.2', protocol: 6, srcPort: 40001, dstPort: 7 },
    reply: { src: '198.51.100.2', dst: '203.0.113.7', protocol: 6, srcPort: 7, dstPort: 40001 },
    timeout: 60,
    status: IPS.CONFIRMED,
    mark: 0xf15e0001,
    labels,
  });
  t.equal(sample168.length, 168);
  t.same(message, sample168);

  const entry = decodeEntry(message);
  t.match(entry, {
    family: 4,
    messageType: CT_MSG.NEW,
    orig: { src: '203.0.113.7', dst: '198.51.100.2', protocol: 6, srcPort: 40001, dstPort: 7 },
    reply: { src: '198.51.100.2', dst: '203.0.113.7', protocol: 6, srcPort: 7, dstPort: 40001 },
    timeout: 60,
    status: 8,
    mark: 0xf15e0001,
    tcpState: null,
  });
  t.same(decodeLabels(entry.labels), { rid: 1, clientPort: 51502, ipVersion: 4, address: '100.64.0.2' });
});

t.test('conntrack requests and decoding', async (t) => {
  const flush = flushByMarkMessage({ seq: 9, family: 6, mark: 0xf15e0000, mask: 0xffff0000 });
  t.same(flush, hex('24000000 0201 0500 09000000 00000000 0a000000 08000800 f15e0000 08001500 ffff0000'));
  const dump = dumpByMarkMessage({ seq: 10, family: 4, mark: 0xf15e0000, mask: 0xffff0000 });
  t.equal(decodeHeader(dump).type, CT_MSG.GET);
  t.equal(decodeHeader(dump).flags, NLM_F.REQUEST | NLM_F.DUMP);

  const icmp6 = { src: '2001:db8:e::7', dst: '2001:db8:1::2', protocol: 58, icmpId: 40001, icmpType: 128, icmpCode: 0 };
  const get = getByTupleMessage({ seq: 11, tuple: icmp6 });
  t.equal(decodeHeader(get).flags, NLM_F.REQUEST | NLM_F.ACK);
  const decoded = decodeEntry(get);
  t.same(decoded.orig, icmp6, 'ICMPv6 id/type/code round trip');
  t.equal(decoded.family, 6);
  const icmp4 = { src: '203.0.113.7', dst: '198.51.100.2', protocol: 1, icmpId: 40002, icmpType: 0, icmpCode: 0 };
  t.same(decodeEntry(deleteByTupleMessage({ seq: 12, tuple: icmp4, direction: 'reply' })).reply, icmp4);
  t.equal(decodeHeader(deleteByTupleMessage({ seq: 12, tuple: icmp4 })).type, CT_MSG.DELETE);
  t.throws(() => getByTupleMessage({ seq: 1, tuple: { src: '1.2.3.4', dst: '::1', protocol: 6 } }), TypeError);

  // A dump entry as the kernel sends it, with PROTOINFO and ID the encoders never write.
  const base = reserveMessage({
    seq: 1,
    orig: { src: '203.0.113.7', dst: '198.51.100.2', protocol: 6, srcPort: 40001, dstPort: 7 },
    reply: { src: '198.51.100.2', dst: '203.0.113.7', protocol: 6, srcPort: 7, dstPort: 40001 },
    timeout: 60,
    status: IPS.CONFIRMED | IPS.ASSURED,
    mark: 0xf15e0002,
    labels: null,
  });
  const extra = encodeAttributes([
    attrNested(CTA.PROTOINFO, [attrNested(1, [attrU8(1, 3)])]),
    { type: CTA.ID, value: Buffer.from([0, 0, 0, 42]) },
  ]);
  const entryMessage = Buffer.concat([base, extra]);
  entryMessage.writeUInt32LE(entryMessage.length, 0);
  const entry = decodeEntry(entryMessage);
  t.equal(entry.tcpState, 3, 'ESTABLISHED');
  t.equal(entry.id, 42);
  t.equal(entry.status, 0xc);
  t.equal(entry.labels, null);
});

t.test('labels', async (t) => {
  const v6 = encodeLabels({ rid: 0xbeef, clientPort: 443, ipVersion: 6, address: 'fd00:64::1234:5678:9abc:def0' });
  t.same(v6, hex('0000beef 01bb 01 06 12345678 9abcdef0'));
  const decoded = decodeLabels(v6);
  t.same(decoded, { rid: 0xbeef, clientPort: 443, ipVersion: 6, address: '::1234:5678:9abc:def0' });
  t.equal(clientAddress6('fd00:64::', decoded!.address), 'fd00:64::1234:5678:9abc:def0');
  t.equal(decodeLabels(null), null);
  t.equal(decodeLabels(Buffer.alloc(16)), null, 'not Fish\'s layout');
  t.throws(() => encodeLabels({ rid: 1, clientPort: 1, ipVersion: 6, address: '1.2.3.4' }), TypeError);
});

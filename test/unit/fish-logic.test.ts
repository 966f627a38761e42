// Fish's pure logic, without root or the addon: request validation, the egress policy, the registration
// table (ownership, limits, the rule ranges it derives), flag parsing and the successor's state checks.
import t from 'tap';
import yargs from 'yargs';
import { mappingMatches, parseExplainRequest, parseRegisterRequest } from '../../lib/protocol/fish.js';
import { addressValue, isAllowed, parseCidr } from '../../services/fish/egress-policy.js';
import { RegistrationTable, type Registration } from '../../services/fish/registrations.js';
import { fishOptions, fishOptionsFrom, parsePortRange } from '../../services/fish/command.js';
import { importRegistrations } from '../../services/fish/handoff.js';
import type { FdDescription, FishMapping } from '../../lib/native.js';

t.test('register requests: defaults, and every bad parameter refused with the reason', (t) => {
  t.same(parseRegisterRequest({ id: 1, egress4: '203.0.113.7', ports: [40000, 40999] }), {
    id: 1,
    egress4: '203.0.113.7',
    egress6: null,
    ports: [40000, 40999],
    protocols: ['tcp', 'udp', 'icmp'],
    maxMappings: 0,
    client6Prefix: null,
  });
  t.same(parseRegisterRequest({ id: 65535, egress6: '2001:db8:e::7', ports: [1, 1], protocols: ['udp', 'tcp'] }).protocols, ['tcp', 'udp'], 'protocols in a stable order');
  t.equal(parseRegisterRequest({ id: 2, egress6: '2001:db8:e::7', ports: [1, 1], client6Prefix: 'fd00:64::/64' }).client6Prefix, 'fd00:64::/64');
  const bad: Array<[Record<string, unknown>, RegExp]> = [
    [{ egress4: '203.0.113.7', ports: [1, 2] }, /"id" must be an integer from 1 to 65535/],
    [{ id: 0, egress4: '203.0.113.7', ports: [1, 2] }, /"id"/],
    [{ id: 65536, egress4: '203.0.113.7', ports: [1, 2] }, /"id"/],
    [{ id: 1.5, egress4: '203.0.113.7', ports: [1, 2] }, /"id"/],
    [{ id: 1, ports: [1, 2] }, /an egress address is needed/],
    [{ id: 1, egress4: '2001:db8::1', ports: [1, 2] }, /"egress4" must be an IPv4 address/],
    [{ id: 1, egress6: '203.0.113.7', ports: [1, 2] }, /"egress6" must be an IPv6 address/],
    [{ id: 1, egress4: '203.0.113.7', ports: [2, 1] }, /"ports" must be \[lo, hi\]/],
    [{ id: 1, egress4: '203.0.113.7', ports: [0, 1] }, /"ports"/],
    [{ id: 1, egress4: '203.0.113.7', ports: [1, 65536] }, /"ports"/],
    [{ id: 1, egress4: '203.0.113.7', ports: '1-2' }, /"ports"/],
    [{ id: 1, egress4: '203.0.113.7', ports: [1, 2], protocols: [] }, /"protocols" must be a non-empty list/],
    [{ id: 1, egress4: '203.0.113.7', ports: [1, 2], protocols: ['sctp'] }, /"protocols"/],
    [{ id: 1, egress4: '203.0.113.7', ports: [1, 2], maxMappings: -1 }, /"maxMappings"/],
    [{ id: 1, egress4: '203.0.113.7', ports: [1, 2], surprise: 1 }, /unknown parameter "surprise"/],
    [{ id: 1, egress6: '2001:db8:e::7', ports: [1, 2], client6Prefix: 'fd00:64::/48' }, /"client6Prefix" must be an IPv6 \/64/],
    [{ id: 1, egress6: '2001:db8:e::7', ports: [1, 2], client6Prefix: '100.64.0.0/64' }, /"client6Prefix"/],
  ];
  for (const [params, message] of bad) t.throws(() => parseRegisterRequest(params), { code: 'EFDFERRY_INVALID', message }, JSON.stringify(params));
  t.end();
});

t.test('explain requests and matching from either side of the mapping', (t) => {
  const mapping: FishMapping = {
    rid: 3,
    protocol: 'udp',
    family: 4,
    clientAddress: '100.64.0.2',
    clientPort: 5353,
    destinationAddress: '198.51.100.2',
    destinationPort: 9000,
    egressAddress: '203.0.113.7',
    egressPort: 40001,
  };
  const client = parseExplainRequest({ protocol: 'udp', address: '100.64.0.2', port: 5353, destinationAddress: '198.51.100.2', destinationPort: 9000 });
  const egress = { ...client, address: '203.0.113.7', port: 40001 };
  t.ok(mappingMatches(mapping, client), 'the client view');
  t.ok(mappingMatches(mapping, egress), 'the egress view');
  t.notOk(mappingMatches(mapping, { ...client, protocol: 'tcp' }), 'another protocol');
  t.notOk(mappingMatches(mapping, { ...client, destinationPort: 9001 }), 'another destination');
  t.throws(() => parseExplainRequest({ protocol: 'udp', address: '100.64.0.2', port: 1, destinationAddress: '2001:db8::1' }), { code: 'EFDFERRY_INVALID', message: /same family/ });
  t.throws(() => parseExplainRequest({ protocol: 'gre', address: '100.64.0.2', port: 1, destinationAddress: '1.2.3.4' }), { code: 'EFDFERRY_INVALID' });
  t.end();
});

t.test('egress policy: prefixes of both families, and what they contain', (t) => {
  t.equal(addressValue('0.0.0.1'), 1n);
  t.equal(addressValue('::ffff:1.2.3.4'), 0xffff01020304n);
  t.equal(addressValue('2001:db8::1'), 0x20010db8000000000000000000000001n);
  const policy = { allow: [parseCidr('203.0.113.0/24'), parseCidr('2001:db8:e::/64'), parseCidr('192.0.2.9')] };
  t.ok(isAllowed(policy, '203.0.113.7'));
  t.ok(isAllowed(policy, '203.0.113.255'));
  t.notOk(isAllowed(policy, '203.0.114.1'));
  t.ok(isAllowed(policy, '2001:db8:e::7'));
  t.notOk(isAllowed(policy, '2001:db8:f::7'));
  t.ok(isAllowed(policy, '192.0.2.9'), 'a bare address is a /32');
  t.notOk(isAllowed(policy, '192.0.2.10'));
  t.same(parseCidr('203.0.113.77/24').network, addressValue('203.0.113.0'), 'host bits are cleared');
  for (const text of ['nope', '203.0.113.0/33', '2001:db8::/129', '203.0.113.0/', '/24']) t.throws(() => parseCidr(text), { message: /--egress-allow/ }, text);
  t.end();
});

const registration = (id: number, uid: number, ports: [number, number], egress4: string | null = '203.0.113.7', egress6: string | null = null): Registration => ({
  id,
  fd: 100 + id,
  uid,
  ownerKey: `${uid}:p`,
  owner: 'p',
  peer: { pid: 1, uid, gid: 0 },
  connectionId: 1,
  egress4,
  egress6,
  ports,
  protocols: ['tcp', 'udp', 'icmp'],
  maxMappings: 10,
  registeredAt: 0,
  orphanedAt: null,
});

t.test('registrations: policy, ownership by uid, the limit, and the merged rule ranges', (t) => {
  const table = new RegistrationTable({ allow: [parseCidr('203.0.113.0/24'), parseCidr('2001:db8:e::/64')], portRange: [1024, 65535], maxRegistrations: 3, defaultMaxMappings: 10 });
  const request = (id: number, ports: [number, number], egress4 = '203.0.113.7') => ({ id, egress4, egress6: null, ports, protocols: ['udp' as const], maxMappings: 0, client6Prefix: null });
  t.throws(() => table.check(request(1, [40000, 40999], '198.51.100.1'), 0), { code: 'EFDFERRY_CONFLICT', message: /outside --egress-allow/ });
  t.throws(() => table.check(request(1, [80, 90]), 0), { code: 'EFDFERRY_CONFLICT', message: /outside --port-range 1024-65535/ });
  t.equal(table.check(request(1, [40000, 40999]), 0), undefined, 'a new id');
  table.set(registration(1, 0, [40000, 40999]));
  t.equal(table.check(request(1, [40000, 40999]), 0)?.id, 1, 'the same uid takes its registration over');
  t.throws(() => table.check(request(1, [40000, 40999]), 1000), { code: 'EFDFERRY_CONFLICT', message: /belongs to another uid/ });
  table.set(registration(2, 0, [40500, 41499]));
  table.set(registration(3, 0, [41500, 41599], '203.0.113.7', '2001:db8:e::7'));
  t.throws(() => table.check(request(4, [50000, 50001]), 0), { code: 'EFDFERRY_LIMIT', message: /--max-registrations/ });
  t.same(
    table.ranges(),
    [
      { family: 4, egress: '203.0.113.7', portLo: 40000, portHi: 41599 },
      { family: 6, egress: '2001:db8:e::7', portLo: 41500, portHi: 41599 },
    ],
    'overlapping and adjacent slices merge; each egress address has its own ranges',
  );
  table.remove(2);
  t.same(table.ranges().filter((r) => r.family === 4), [
    { family: 4, egress: '203.0.113.7', portLo: 40000, portHi: 40999 },
    { family: 4, egress: '203.0.113.7', portLo: 41500, portHi: 41599 },
  ], 'a gap splits the range again');
  t.same(table.ofConnection(1).map((r) => r.id), [1, 3]);
  t.end();
});

const parse = (args: string[]) => fishOptionsFrom(fishOptions(yargs(args)).parseSync() as never);

t.test('flags: defaults, lists, and clear errors', (t) => {
  const defaults = parse([]);
  t.same(defaults.policy.portRange, [1024, 65535]);
  t.same(defaults.policy.allow.map((c) => c.text), ['203.0.113.0/24', '2001:db8:e::/64']);
  t.equal(defaults.pump.markBase, 0xf15e0000);
  t.same(parse(['--egress-allow', '192.0.2.0/24,198.18.0.0/15', '--egress-allow', '2001:db8::/32']).policy.allow.map((c) => c.text), ['192.0.2.0/24', '198.18.0.0/15', '2001:db8::/32']);
  t.throws(() => parse(['--port-range', '5-1']), { message: /--port-range must be lo-hi/ });
  t.throws(() => parse(['--egress-allow', 'x']), { message: /--egress-allow/ });
  t.throws(() => parse(['--max-registrations', '0']), { message: /--max-registrations must be an integer from 1/ });
  t.same(parsePortRange(' 40000-40999 '), [40000, 40999]);
  t.end();
});

t.test('a successor refuses registrations with bad ids, fds or protocols', (t) => {
  const seqpacket: FdDescription = { kind: 'socket', family: 1, type: 5, connected: true };
  const stream: FdDescription = { kind: 'socket', family: 1, type: 1, connected: true };
  const record = { ...registration(1, 0, [40000, 40999]), fd: 0 } as unknown as Record<string, unknown>;
  const ok = importRegistrations([record], [55], () => seqpacket);
  t.equal(ok[0]!.fd, 55, 'the fd index is resolved');
  t.equal(ok[0]!.connectionId, null, 'a control connection is matched only after commit');
  t.throws(() => importRegistrations([record], [55], () => stream), { code: 'EFDFERRY_STATE', message: /registration 1/ });
  t.throws(() => importRegistrations([{ ...record, fd: 3 }], [55], () => seqpacket), { code: 'EFDFERRY_STATE', message: /out of range/ });
  t.throws(() => importRegistrations([record, record], [55], () => seqpacket), { code: 'EFDFERRY_STATE', message: /repeated/ });
  t.throws(() => importRegistrations([{ ...record, protocols: ['gre'] }], [55], () => seqpacket), { code: 'EFDFERRY_STATE', message: /protocols/ });
  t.end();
});

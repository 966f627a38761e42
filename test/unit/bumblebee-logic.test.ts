// Bumblebee's pure logic, without root or the addon: request validation, flag parsing, limits and the
// checks a successor makes on a predecessor's state.
import t from 'tap';
import yargs from 'yargs';
import { parseUpgradeRequest } from '../../lib/protocol/bumblebee.js';
import { bumblebeeOptions, bumblebeeOptionsFrom } from '../../services/bumblebee/command.js';
import { FlowTable, type Flow } from '../../services/bumblebee/flow-table.js';
import { importFlow, type FlowRecord } from '../../services/bumblebee/handoff.js';
import type { FdDescription } from '../../lib/native.js';

t.test('upgrade requests: defaults, and every bad parameter refused with the reason', (t) => {
  t.same(parseUpgradeRequest({}), { context: {}, tenant: 'default' });
  t.same(parseUpgradeRequest({ context: { route: 'eu' }, tenant: 'acme' }), { context: { route: 'eu' }, tenant: 'acme' });
  const bad: Array<[Record<string, unknown>, RegExp]> = [
    [{ context: [] }, /"context" must be an object/],
    [{ context: 'x' }, /"context" must be an object/],
    [{ context: { big: 'x'.repeat(100) } }, /"context" is \d+ bytes as JSON; the limit is 50/],
    [{ tenant: '' }, /"tenant" must be 1 to 128/],
    [{ tenant: 'has space' }, /"tenant"/],
    [{ tenant: 7 }, /"tenant"/],
    [{ surprise: true }, /unknown parameter "surprise"/],
  ];
  for (const [params, message] of bad) {
    t.throws(() => parseUpgradeRequest(params, { maxContextBytes: 50 }), { code: 'EFDFERRY_INVALID', message });
  }
  t.end();
});

const parse = (args: string[]) => bumblebeeOptionsFrom(bumblebeeOptions(yargs(args)).parseSync() as never);

t.test('flags: defaults follow the kernel notes, bad values are refused with the flag named', (t) => {
  const options = parse([]);
  t.match(options.environment, { tunName: 'bb0', address4: '100.64.0.1', prefix4: 10, address6: 'fd00:bb::1', prefix6: 64, listenPort: 4242, pool4: '100.64.1.0', mtu: 1500 });
  t.match(options.pump, { upgradeTimeoutMs: 10_000, slotQuarantineMs: 60_000, verifyChecksums: true, keepaliveIdleS: 60, userTimeoutMs: 120_000 });
  t.equal(options.flows.maxFlowsPerOwner, options.flows.maxFlows, 'per-owner limit defaults to the total');
  t.match(parse(['--address4', '10.200.0.1/16', '--mtu', '9000']).environment, { address4: '10.200.0.1', prefix4: 16, mtu: 9000 });
  const bad: Array<[string[], RegExp]> = [
    [['--address4', '100.64.0.1'], /--address4 must be an IPv4 address with a prefix/],
    [['--address6', '100.64.0.1/10'], /--address6 must be an IPv6 address/],
    [['--mtu', '1000'], /--mtu must be an integer from 1280/],
    [['--pool4', 'nope'], /--pool4 must be an IPv4 address/],
    [['--tun-name', 'a/b'], /--tun-name/],
    [['--environments', '0'], /--environments/],
    [['--max-flows', '-1'], /--max-flows/],
  ];
  for (const [args, message] of bad) t.throws(() => parse(args), { message }, args.join(' '));
  t.end();
});

const flow = (id: number, over: Partial<Flow> = {}): Flow => ({
  flowId: id,
  taskId: `boot-${id}`,
  environmentId: 1,
  fd: 100 + id,
  ownerKey: '0:proxy',
  owner: 'proxy',
  peer: { pid: 1, uid: 0, gid: 0 },
  tenant: 'acme',
  context: {},
  tuple: null,
  internal: null,
  slot: 0,
  requestedAt: 0,
  acceptedAt: null,
  ...over,
});

t.test('flow limits: total, per owner and per tenant, with the limit named', (t) => {
  const table = new FlowTable({ maxFlows: 3, maxFlowsPerOwner: 2, maxFlowsPerTenant: 2 });
  table.add(flow(1));
  table.add(flow(2, { ownerKey: '0:other', tenant: 'other' }));
  table.add(flow(3, { tenant: 'other', environmentId: 2 }));
  t.throws(() => table.checkRoom('0:x', 'y'), { code: 'EFDFERRY_LIMIT', details: { limit: 'maxFlows' } });
  table.remove(table.get(2)!);
  t.throws(() => table.checkRoom('0:proxy', 'new'), { code: 'EFDFERRY_LIMIT', details: { limit: 'maxFlowsPerOwner' } });
  t.doesNotThrow(() => table.checkRoom('0:x', 'acme'));
  table.add(flow(4, { ownerKey: '0:x', tenant: 'other' }));
  table.remove(table.get(1)!);
  t.throws(() => table.checkRoom('0:y', 'other'), { code: 'EFDFERRY_LIMIT', details: { limit: 'maxFlowsPerTenant' } });
  t.equal(table.byTaskId('boot-3')?.flowId, 3);
  t.equal(table.byTaskId('other-3'), undefined, 'a task id from another boot is not found');
  t.equal(table.leastLoaded([1, 2]), 1, 'new flows go to the emptier environment');
  t.end();
});

t.test('a successor checks every flow record and its fd before adopting it', (t) => {
  const seqpacket: FdDescription = { kind: 'socket', family: 1, type: 5, connected: true };
  const describe = (fd: number): FdDescription => (fd === 7 ? seqpacket : { kind: 'file', size: 0 });
  const record: FlowRecord = {
    flowId: 9,
    taskId: 'b-9',
    environmentId: 1,
    fd: 0,
    slot: 5,
    ownerKey: '0:p',
    owner: 'p',
    peer: { pid: 1, uid: 0, gid: 0 },
    tenant: 't',
    context: { a: 1 },
    tuple: { family: 4, clientAddress: '10.0.0.1', clientPort: 1, destinationAddress: '10.0.0.2', destinationPort: 2 },
    internal: null,
    requestedAt: 0,
    acceptedAt: 1,
    packetsIn: 3,
    packetsOut: 4,
    idleMs: 5,
  };
  const { flow: adopted, paused } = importFlow(record, [7], new Set([1]), describe);
  t.equal(adopted.fd, 7);
  t.match(paused, { flowId: 9, fd: 7, slot: 5, packetsIn: 3 });
  const bad: Array<[Partial<FlowRecord>, number[], RegExp]> = [
    [{ environmentId: 2 }, [7], /unknown environment 2/],
    [{ fd: 3 }, [7], /no fd/],
    [{ slot: 0 }, [7], /no slot/],
    [{ slot: 99 }, [7], /outside its environment/],
    [{ tuple: { family: 5 } as never }, [7], /no tuple/],
    [{}, [8], /its packet socket needs a connected AF_UNIX seqpacket socket/],
  ];
  for (const [change, fds, message] of bad) {
    t.throws(() => importFlow({ ...record, ...change }, fds, new Set([1]), describe, () => 50), { code: 'EFDFERRY_STATE', message });
  }
  const taken = new Set<string>();
  importFlow(record, [7], new Set([1]), describe, () => 50, taken);
  t.throws(() => importFlow({ ...record, flowId: 10 }, [7], new Set([1]), describe, () => 50, taken), { code: 'EFDFERRY_STATE', message: /slot 5 of environment 1 is held by another flow/ }, 'two flows may not share a slot');
  t.end();
});

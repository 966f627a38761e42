/**
 * HostNetwork's logic against an in-memory kernel (no root, no addon): which rules it adds and removes and
 * in what order, idempotence, the forwarding and nft errors, uninstall's and cleanup's bookkeeping.
 */
import t from 'tap';
import { CT_MSG, decodeEntry } from '../../lib/netlink/conntrack.js';
import { decodeHeader } from '../../lib/netlink/message.js';
import { RTM, decodeRoute, decodeRule, routeMessage, ruleMessage, type Rule } from '../../lib/netlink/route.js';
import type { PersistentTun } from '../../lib/native.js';
import { HostNetwork, NFT_SCRIPT, rulesFor, type CommandResult, type HostNetworkBinding } from '../../services/fish/host-network.js';

const netlinkError = (code: string, errno: number) => Object.assign(new Error(`netlink ${code}`), { code, errno: -errno, syscall: 'netlink' });

/** Retypes a request as the NEW message a dump would return, so the dump decoders read it. */
const as = (message: Buffer, type: number) => {
  const copy = Buffer.from(message);
  copy.writeUInt16LE(type, 4);
  return copy;
};

/** Rules, routes and links kept in memory, answering the requests HostNetwork sends. */
class FakeKernel implements HostNetworkBinding {
  rules = new Map<string, Buffer>();
  routes = new Map<string, Buffer>();
  log: string[] = [];
  conntrackFlushes: { family: number; mark: number | null }[] = [];
  open = new Set<number>();
  links = new Map<string, number>();
  unpersisted: number[] = [];
  failNext: string | null = null;
  #nextFd = 10;

  netlinkOpen(): number {
    const fd = this.#nextFd++;
    this.open.add(fd);
    return fd;
  }
  close(fd: number): void {
    if (!this.open.delete(fd)) throw new Error(`EBADF ${fd}`);
  }
  openPersistentTun(name: string): PersistentTun {
    const fd = this.netlinkOpen();
    return { fd, ifindex: this.links.get(name) ?? 99, created: !this.links.has(name) };
  }
  unpersistTun(fd: number): void {
    this.unpersisted.push(fd);
  }

  netlinkRequest(fd: number, message: Buffer): Buffer[] {
    if (!this.open.has(fd)) throw new Error('request on a closed fd');
    const { type } = decodeHeader(message);
    const name = Object.entries(RTM).find(([, value]) => value === type)?.[0] ?? `0x${type.toString(16)}`;
    if (this.failNext === name) {
      this.failNext = null;
      throw netlinkError('EPERM', 1);
    }
    const ruleKey = (m: Buffer) => JSON.stringify({ ...decodeRule(as(m, RTM.NEWRULE)), otherAttributes: [] });
    const routeKey = (m: Buffer) => JSON.stringify(decodeRoute(as(m, RTM.NEWROUTE)));
    switch (type) {
      case RTM.NEWRULE: {
        const key = ruleKey(message);
        this.log.push(`add ${key}`);
        if (this.rules.has(key)) throw netlinkError('EEXIST', 17);
        this.rules.set(key, message);
        return [];
      }
      case RTM.DELRULE: {
        const key = ruleKey(message);
        this.log.push(`del ${key}`);
        if (!this.rules.delete(key)) throw netlinkError('ENOENT', 2);
        return [];
      }
      case RTM.GETRULE:
        return [...this.rules.values()].filter((m) => m[16] === message[16]).map((m) => as(m, RTM.NEWRULE));
      case RTM.NEWROUTE:
        this.routes.set(routeKey(message), message);
        return [];
      case RTM.DELROUTE: {
        const wanted = decodeRoute(as(message, RTM.NEWROUTE))!;
        const key = [...this.routes.keys()].find((k) => {
          const r = JSON.parse(k) as typeof wanted;
          return r.family === wanted.family && r.table === wanted.table && r.ifindex === wanted.ifindex;
        });
        if (!key) throw netlinkError('ESRCH', 3);
        this.routes.delete(key);
        return [];
      }
      case RTM.GETROUTE:
        return [...this.routes.values()].filter((m) => m[16] === message[16]).map((m) => as(m, RTM.NEWROUTE));
      case RTM.NEWLINK:
        this.log.push('link up');
        return [];
      case RTM.GETLINK: {
        const tunName = message.subarray(36).toString('utf8').replace(/\0.*$/s, '');
        if (!this.links.has(tunName)) throw netlinkError('ENODEV', 19);
        const reply = Buffer.alloc(32);
        reply.writeUInt32LE(32, 0);
        reply.writeUInt16LE(RTM.NEWLINK, 4);
        reply.writeUInt32LE(this.links.get(tunName)!, 20);
        return [reply];
      }
      case CT_MSG.DELETE: {
        const entry = decodeEntry(message);
        this.conntrackFlushes.push({ family: entry.family, mark: entry.mark });
        return [];
      }
      default:
        throw new Error(`fake kernel: unexpected request ${name}`);
    }
  }
}

const ok: CommandResult = { status: 0, stdout: '', stderr: '' };

t.test('rulesFor merges ranges per egress and adds one ICMP rule each', async (t) => {
  const rules = rulesFor(
    [
      { family: 4, egress: '203.0.113.7', portLo: 41000, portHi: 41999 },
      { family: 4, egress: '203.0.113.7', portLo: 40000, portHi: 40999 },
      { family: 4, egress: '203.0.113.7', portLo: 40500, portHi: 40600 },
      { family: 4, egress: '203.0.113.7', portLo: 43000, portHi: 43000 },
      { family: 6, egress: '2001:DB8:E:0::7', portLo: 40000, portHi: 40999 },
    ],
    4242,
    100,
  );
  const show = (r: Rule) => `${r.priority} ${r.dst} ${r.ipProto} ${r.dport ? `${r.dport.lo}-${r.dport.hi}` : '-'}`;
  t.same(rules.map(show), [
    '100 203.0.113.7 6 40000-41999',
    '100 203.0.113.7 17 40000-41999',
    '100 203.0.113.7 6 43000-43000',
    '100 203.0.113.7 17 43000-43000',
    '101 203.0.113.7 1 -',
    '100 2001:db8:e::7 6 40000-40999',
    '100 2001:db8:e::7 17 40000-40999',
    '101 2001:db8:e::7 58 -',
  ]);
  t.throws(() => rulesFor([{ family: 6, egress: '203.0.113.7', portLo: 1, portHi: 2 }], 1, 1), TypeError);
  t.throws(() => rulesFor([{ family: 4, egress: '203.0.113.7', portLo: 2, portHi: 1 }], 1, 1), RangeError);
  t.throws(() => rulesFor([{ family: 4, egress: '203.0.113.7', portLo: 0, portHi: 1 }], 1, 1), RangeError);
});

t.test('setRanges adds before it removes, and tolerates what is already there', async (t) => {
  const kernel = new FakeKernel();
  const host = new HostNetwork(kernel, { runCommand: () => ok });
  const first = host.setRanges([{ family: 4, egress: '203.0.113.7', portLo: 40000, portHi: 40999 }]);
  t.equal(first.added.length, 3);
  t.equal(kernel.rules.size, 3);

  // A rule left in the kernel by someone (a predecessor) is adopted, not an error.
  kernel.rules.set(
    JSON.stringify({ ...decodeRule(ruleMessage({ seq: 1, op: 'add', rule: { family: 4, priority: 100, table: 4242, dst: '198.51.100.9', ipProto: 6, dport: { lo: 1, hi: 2 } } })), otherAttributes: [] }),
    Buffer.alloc(0),
  );
  kernel.log = [];
  const second = host.setRanges([
    { family: 4, egress: '203.0.113.7', portLo: 40000, portHi: 41999 },
    { family: 4, egress: '198.51.100.9', portLo: 1, portHi: 2 },
  ]);
  t.equal(second.added.length, 5, 'merged span tcp/udp + 198.51.100.9 tcp/udp/icmp');
  t.equal(second.removed.length, 2, 'the old span');
  const firstDelete = kernel.log.findIndex((line) => line.startsWith('del'));
  t.ok(kernel.log.slice(0, firstDelete).every((line) => line.startsWith('add')), 'every add comes before the first delete');
  t.ok(kernel.log.slice(firstDelete).every((line) => line.startsWith('del')));
  t.equal(host.rules.length, 6);

  // A failure names the rule and keeps the kernel's code.
  kernel.failNext = 'NEWRULE';
  try {
    host.setRanges([{ family: 4, egress: '192.0.2.1', portLo: 5, portHi: 6 }]);
    t.fail('expected EPERM');
  } catch (error) {
    t.match(error, { code: 'EPERM', syscall: 'netlink', message: /adding rule 'pref 100 to 192\.0\.2\.1 ipproto tcp dport 5-6 lookup 4242'/ });
  }
  host.close();
  t.equal(kernel.open.size, 0, 'the netlink socket is closed');
});

t.test('forwarding check, nft install and its errors', async (t) => {
  const kernel = new FakeKernel();
  const values: Record<string, string> = { '/proc/sys/net/ipv4/ip_forward': '1\n', '/proc/sys/net/ipv6/conf/all/forwarding': '0\n' };
  const commands: { args: string[]; input?: string | undefined }[] = [];
  let nft: CommandResult = ok;
  const host = new HostNetwork(kernel, {
    readFile: (file) => {
      const value = values[file];
      if (value === undefined) throw new Error('ENOENT');
      return value;
    },
    runCommand: (command, args, input) => {
      t.equal(command, 'nft');
      commands.push({ args, input });
      return nft;
    },
  });
  host.checkForwarding({ ipv6: false });
  t.throws(() => host.checkForwarding({ ipv6: true }), { code: 'EFDFERRY_FORWARDING_OFF', message: /net\.ipv6\.conf\.all\.forwarding is 0.*sysctl -w net\.ipv6\.conf\.all\.forwarding=1/ });
  values['/proc/sys/net/ipv4/ip_forward'] = '0';
  t.throws(() => host.checkForwarding({ ipv6: false }), { message: /net\.ipv4\.ip_forward is 0/ });
  delete values['/proc/sys/net/ipv4/ip_forward'];
  t.throws(() => host.checkForwarding({ ipv6: false }), { code: 'EFDFERRY_FORWARDING_OFF', message: /cannot read net\.ipv4\.ip_forward/ });

  host.installConntrackTable();
  t.same(commands[0], { args: ['-f', '-'], input: NFT_SCRIPT });
  t.match(NFT_SCRIPT, /\n  ct label 127 counter\n/, 'the rule on a line of its own');
  nft = { status: 1, stdout: '', stderr: 'Error: syntax error\n' };
  t.throws(() => host.installConntrackTable(), { code: 'EFDFERRY_NFT_FAILED', message: /syntax error/ });
  nft = { status: null, stdout: '', stderr: '', error: Object.assign(new Error('spawnSync nft ENOENT'), { code: 'ENOENT' }) };
  t.throws(() => host.installConntrackTable(), { code: 'EFDFERRY_NFT_MISSING', message: /install the nftables package/ });
});

t.test('uninstall removes what was installed, and reports what it could not', async (t) => {
  const kernel = new FakeKernel();
  const commands: string[][] = [];
  const host = new HostNetwork(kernel, { runCommand: (_c, args) => (commands.push(args), ok) });
  host.installConntrackTable();
  host.bringUpTun(7, 1500);
  t.throws(() => host.bringUpTun(7, 1000), RangeError, 'an MTU below 1280 would take IPv6 off the tun');
  host.ensureRoutes(4242, 7);
  host.ensureRoutes(4242, 7);
  t.equal(kernel.routes.size, 2, 'replace: one route per family however often');
  host.setRanges([{ family: 6, egress: '2001:db8:e::7', portLo: 1000, portHi: 2000 }]);
  let unpersisted = 0;
  // One step fails; the others still run, and the failure is reported.
  kernel.failNext = 'DELROUTE';
  t.throws(() => host.uninstall(() => unpersisted++), { message: /uninstall left 1 step\(s\) undone: .*IPv[46] route of table 4242/ });
  t.equal(kernel.rules.size, 0);
  t.equal(kernel.routes.size, 1, 'the route whose delete failed');
  t.same(commands.at(-1), ['delete', 'table', 'inet', 'fishct']);
  t.equal(unpersisted, 1);
  // Running it again finishes the job.
  host.uninstall();
  t.equal(kernel.routes.size, 0);
  t.equal(kernel.open.size, 0);
});

t.test('cleanup removes by inspection only what points at Fish\'s table', async (t) => {
  const kernel = new FakeKernel();
  const host = new HostNetwork(kernel, { runCommand: () => ok });
  host.ensureRoutes(4242, 7);
  host.setRanges([
    { family: 4, egress: '203.0.113.7', portLo: 40000, portHi: 40999 },
    { family: 6, egress: '2001:db8:e::7', portLo: 40000, portHi: 40999 },
  ]);
  host.close();
  // Someone else's rule and route, in another table.
  const foreignRule = ruleMessage({ seq: 1, op: 'add', rule: { family: 4, priority: 100, table: 100, dst: '192.0.2.1', ipProto: null, dport: null } });
  kernel.rules.set('foreign', foreignRule);
  kernel.routes.set('foreign', routeMessage({ seq: 1, op: 'add', family: 4, table: 100, ifindex: 3 }));
  kernel.links.set('fish0', 7);

  const nft: string[][] = [];
  const report = HostNetwork.cleanup(kernel, { runCommand: (_c, args) => (nft.push(args), ok) });
  t.same(report, { rulesRemoved: 6, routesRemoved: 2, nftTableRemoved: true, tunRemoved: true, conntrackFlushed: [4, 6] });
  t.same([...kernel.rules.keys()], ['foreign']);
  t.same([...kernel.routes.keys()], ['foreign']);
  t.same(nft, [['delete', 'table', 'inet', 'fishct']]);
  t.equal(kernel.unpersisted.length, 1, 'the tun re-attached and unpersisted');
  t.same(kernel.conntrackFlushes, [{ family: 4, mark: 0xf15e0000 }, { family: 6, mark: 0xf15e0000 }]);
  t.equal(kernel.open.size, 0, 'every socket and the tun fd closed');

  // Nothing there: nothing removed, the tun is not created just to be deleted.
  kernel.links.clear();
  const again = HostNetwork.cleanup(kernel, {
    runCommand: () => ({ status: 1, stdout: '', stderr: 'Error: Could not process rule: No such file or directory\n' }),
  });
  t.same(again, { rulesRemoved: 0, routesRemoved: 0, nftTableRemoved: false, tunRemoved: false, conntrackFlushed: [4, 6] });
  t.equal(kernel.unpersisted.length, 1);
  t.equal(kernel.open.size, 0);
});

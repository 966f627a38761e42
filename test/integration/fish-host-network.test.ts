/**
 * Fish's host setup against the real kernel (services/fish/host-network.ts, native netlink.cc and tun.cc).
 * Everything runs in a child process started with `ip netns exec <ns>` in a namespace of its own (netlink
 * sockets, the tun and nft act in the namespace of the process), and is asserted from outside with
 * `ip netns exec <ns> ip|nft|conntrack`. Nothing here configures the machine's own namespace.
 */
import t from 'tap';
import type { Test } from 'tap';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { encodeMessage, NLM_F } from '../../lib/netlink/message.js';
import { linkGetByName, RTM, ruleDump, ruleMessage } from '../../lib/netlink/route.js';
import { encodeLabels, FISH_MARK_BASE, FISH_MARK_MASK, IPS, decodeLabels } from '../../lib/netlink/conntrack.js';
import { withDeadline } from '../helpers/native-helpers.js';

t.setTimeout(120_000);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const skip =
  process.getuid?.() !== 0
    ? 'needs root (network namespaces, CAP_NET_ADMIN)'
    : ['nft', 'conntrack', 'ip'].find((tool) => spawnSync(tool, ['--version']).error)
      ? 'nft, conntrack and ip (nftables, conntrack-tools, iproute2) must be installed'
      : false;

let namespaces = 0;

/** A fresh namespace with forwarding on, deleted at teardown; `run` executes a command inside it. */
function namespace(t: Test, forwarding = true): { name: string; run: (...args: string[]) => string } {
  const name = `fishnl-${process.pid}-${++namespaces}`;
  execFileSync('ip', ['netns', 'add', name]);
  t.teardown(() => {
    // Deleting the namespace takes its devices, rules, routes, nft tables and conntrack entries with it.
    spawnSync('ip', ['netns', 'del', name]);
  });
  const run = (...args: string[]) =>
    execFileSync('ip', ['netns', 'exec', name, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  run('ip', 'link', 'set', 'lo', 'up');
  const on = forwarding ? '1' : '0';
  run('sysctl', '-qw', `net.ipv4.ip_forward=${on}`, `net.ipv6.conf.all.forwarding=${on}`);
  return { name, run };
}

interface Answer {
  ok: boolean;
  result?: unknown;
  error?: { message: string; code?: string; errno?: number; syscall?: string };
}

/** The helper child in namespace `ns`: `call` sends one command and waits for its one answer line. */
class Child {
  readonly process: ChildProcess;
  readonly #answers: Answer[] = [];
  readonly #waiting: ((answer: Answer) => void)[] = [];
  readonly exited: Promise<number | null>;

  constructor(t: Test, ns: string, options: object = {}) {
    this.process = spawn(
      'ip',
      ['netns', 'exec', ns, process.execPath, '--import', 'tsx', path.join(root, 'test', 'helpers', 'fish-host-child.ts'), JSON.stringify(options)],
      { cwd: root, stdio: ['pipe', 'pipe', 'inherit'] },
    );
    this.exited = new Promise((resolve) => this.process.once('exit', (code) => resolve(code)));
    readline.createInterface({ input: this.process.stdout! }).on('line', (line) => {
      const answer = JSON.parse(line) as Answer;
      const waiter = this.#waiting.shift();
      if (waiter) waiter(answer);
      else this.#answers.push(answer);
    });
    t.teardown(async () => {
      // Only our own child, by its pid; `ip netns exec` execs node, so this is the node process itself.
      if (this.process.exitCode === null && this.process.signalCode === null) this.process.kill('SIGKILL');
      await this.exited;
    });
  }

  #next(): Promise<Answer> {
    const ready = this.#answers.shift();
    if (ready) return Promise.resolve(ready);
    return new Promise((resolve) => this.#waiting.push(resolve));
  }

  async ready(): Promise<void> {
    const answer = await withDeadline(this.#next(), 30_000, 'the helper child to start');
    if (answer.result !== 'ready') throw new Error(`unexpected first line ${JSON.stringify(answer)}`);
  }

  /** Sends a command; resolves with its answer. */
  async call(command: object): Promise<Answer> {
    this.process.stdin!.write(`${JSON.stringify(command)}\n`);
    return withDeadline(this.#next(), 20_000, `an answer to ${JSON.stringify(command)}`);
  }

  /** Asks the child to exit and waits until it has. */
  async exit(): Promise<void> {
    this.process.stdin!.end(`${JSON.stringify({ op: 'exit' })}\n`);
    await withDeadline(this.exited, 10_000, 'the helper child to exit');
  }

  /** Sends a command that must succeed; resolves with its result. */
  async must<T = unknown>(command: object): Promise<T> {
    const answer = await this.call(command);
    if (!answer.ok) throw new Error(`${JSON.stringify(command)} failed: ${answer.error?.message}`);
    return answer.result as T;
  }
}

const E4 = '203.0.113.7';
const E6 = '2001:db8:e::7';

/** The lines of `ip [-6] rule show` that look up `table`. */
function fishRules(run: (...args: string[]) => string, table = 4242): string[] {
  const lines = [...run('ip', 'rule', 'show').split('\n'), ...run('ip', '-6', 'rule', 'show').split('\n')];
  return lines.filter((line) => line.includes(`lookup ${table}`)).map((line) => line.replace(/\s+/g, ' ').trim());
}

function linkExists(run: (...args: string[]) => string, name: string): boolean {
  try {
    run('ip', 'link', 'show', name);
    return true;
  } catch {
    return false;
  }
}

/** Installs everything Fish sets up, with one v4 and one v6 range. */
async function installAll(child: Child, mtu = 1400): Promise<{ fd: number; ifindex: number; created: boolean }> {
  const tun = await child.must<{ fd: number; ifindex: number; created: boolean }>({ op: 'openTun' });
  await child.must({ op: 'checkForwarding', ipv6: true });
  await child.must({ op: 'installConntrackTable' });
  await child.must({ op: 'bringUpTun', mtu });
  await child.must({ op: 'ensureRoutes', table: 4242 });
  await child.must({
    op: 'setRanges',
    ranges: [
      { family: 4, egress: E4, portLo: 40000, portHi: 40999 },
      { family: 6, egress: E6, portLo: 40000, portHi: 40999 },
    ],
  });
  return tun;
}

t.test('install, change ranges, uninstall', { skip }, async (t) => {
  const { name, run } = namespace(t);
  const child = new Child(t, name);
  await child.ready();
  const tun = await installAll(child);
  t.equal(tun.created, true, 'the tun was created');
  t.ok(tun.ifindex > 0);

  t.same(fishRules(run).sort(), [
    `100: from all to ${E6} ipproto tcp dport 40000-40999 lookup 4242`,
    `100: from all to ${E6} ipproto udp dport 40000-40999 lookup 4242`,
    `100: from all to ${E4} ipproto tcp dport 40000-40999 lookup 4242`,
    `100: from all to ${E4} ipproto udp dport 40000-40999 lookup 4242`,
    `101: from all to ${E6} ipproto ipv6-icmp lookup 4242`,
    `101: from all to ${E4} ipproto icmp lookup 4242`,
  ].sort());
  t.match(run('ip', 'route', 'show', 'table', '4242'), /^default dev fish0 proto static scope link/);
  t.match(run('ip', '-6', 'route', 'show', 'table', '4242'), /^default dev fish0 proto static/);
  const link = run('ip', 'link', 'show', 'fish0');
  t.match(link, /mtu 1400/);
  t.match(link, /<[^>]*\bUP\b[^>]*>/, 'the tun is up');
  t.match(run('nft', 'list', 'ruleset'), /table inet fishct[\s\S]*ct label 127/);

  // Idempotent: installing again changes nothing (one ct label rule, same routes, no duplicate rules).
  await child.must({ op: 'installConntrackTable' });
  await child.must({ op: 'ensureRoutes', table: 4242 });
  t.equal(run('nft', 'list', 'ruleset').match(/ct label 127/g)?.length, 1, 'one ct label rule after a second install');
  t.equal(run('ip', 'route', 'show', 'table', '4242').trim().split('\n').length, 1);

  // A second v4 range adjacent to the first merges into one span; v6 goes away.
  const changes = await child.must<{ added: unknown[]; removed: unknown[] }>({
    op: 'setRanges',
    ranges: [
      { family: 4, egress: E4, portLo: 40000, portHi: 40999 },
      { family: 4, egress: E4, portLo: 41000, portHi: 41999 },
    ],
  });
  t.equal(changes.added.length, 2, 'tcp + udp for the merged span');
  t.equal(changes.removed.length, 5, 'the old v4 tcp/udp and all three v6 rules');
  t.same(fishRules(run).sort(), [
    `100: from all to ${E4} ipproto tcp dport 40000-41999 lookup 4242`,
    `100: from all to ${E4} ipproto udp dport 40000-41999 lookup 4242`,
    `101: from all to ${E4} ipproto icmp lookup 4242`,
  ].sort());
  const again = await child.must<{ added: unknown[]; removed: unknown[] }>({
    op: 'setRanges',
    ranges: [{ family: 4, egress: E4, portLo: 40000, portHi: 41999 }],
  });
  t.same(again, { added: [], removed: [] }, 'the same coverage changes nothing');

  await child.must({ op: 'uninstall' });
  t.same(fishRules(run), [], 'no rules left');
  t.equal(run('ip', 'route', 'show', 'table', '4242').trim(), '');
  t.equal(run('ip', '-6', 'route', 'show', 'table', '4242').trim(), '');
  t.notMatch(run('nft', 'list', 'ruleset'), /fishct/);
  t.notOk(linkExists(run, 'fish0'), 'the tun is gone');
  await child.exit();
});

t.test('cleanup after a SIGKILLed Fish removes everything it left', { skip }, async (t) => {
  const { name, run } = namespace(t);
  const first = new Child(t, name);
  await first.ready();
  await installAll(first);
  first.process.kill('SIGKILL');
  await withDeadline(first.exited, 10_000, 'the killed child to exit');

  // What a crash leaves: the persistent tun, its routes, the rules, the nft table, Fish's conntrack entries.
  t.ok(linkExists(run, 'fish0'), 'the persistent tun outlived its process');
  t.equal(fishRules(run).length, 6);
  run('conntrack', '-I', '-p', 'tcp', '-s', E4, '-d', '198.51.100.2', '--sport', '40001', '--dport', '7', '--state', 'ESTABLISHED', '-t', '60', '--mark', String(FISH_MARK_BASE + 1));
  run('conntrack', '-I', '-p', 'udp', '-s', E4, '-d', '198.51.100.2', '--sport', '40002', '--dport', '9000', '-t', '60', '--mark', '1234');

  // A successor re-attaches the same tun by name.
  const second = new Child(t, name);
  await second.ready();
  const tun = await second.must<{ created: boolean }>({ op: 'openTun' });
  t.equal(tun.created, false, 're-attached, not created');
  await second.exit();

  const cleaner = new Child(t, name);
  await cleaner.ready();
  const report = await cleaner.must({ op: 'cleanup' });
  t.same(report, { rulesRemoved: 6, routesRemoved: 2, nftTableRemoved: true, tunRemoved: true, conntrackFlushed: [4, 6] });
  t.same(fishRules(run), []);
  t.equal(run('ip', 'route', 'show', 'table', '4242').trim(), '');
  t.equal(run('ip', '-6', 'route', 'show', 'table', '4242').trim(), '');
  t.notMatch(run('nft', 'list', 'ruleset'), /fishct/);
  t.notOk(linkExists(run, 'fish0'));
  const left = run('conntrack', '-L');
  t.notMatch(left, /sport=40001/, "Fish's entry is flushed");
  t.match(left, /sport=40002.*mark=1234/, 'the foreign entry stays');

  // Nothing left: a second cleanup finds nothing and fails on nothing.
  t.same(await cleaner.must({ op: 'cleanup' }), { rulesRemoved: 0, routesRemoved: 0, nftTableRemoved: false, tunRemoved: false, conntrackFlushed: [4, 6] });
});

t.test('the forwarding check names the sysctl and the fix', { skip }, async (t) => {
  const { name, run } = namespace(t, false);
  const child = new Child(t, name);
  await child.ready();
  const v4 = await child.call({ op: 'checkForwarding', ipv6: false });
  t.equal(v4.ok, false);
  t.equal(v4.error?.code, 'EFDFERRY_FORWARDING_OFF');
  t.match(v4.error?.message, /net\.ipv4\.ip_forward is 0.*sysctl -w net\.ipv4\.ip_forward=1/);

  run('sysctl', '-qw', 'net.ipv4.ip_forward=1');
  t.equal((await child.call({ op: 'checkForwarding', ipv6: false })).ok, true, 'IPv6 is not checked without an IPv6 egress');
  const v6 = await child.call({ op: 'checkForwarding', ipv6: true });
  t.equal(v6.ok, false);
  t.match(v6.error?.message, /net\.ipv6\.conf\.all\.forwarding is 0.*sysctl -w net\.ipv6\.conf\.all\.forwarding=1/);
  await child.exit();
});

t.test('conntrack: dump and flush by mark, reserve with labels, netlink errors', { skip }, async (t) => {
  const { name, run } = namespace(t);
  const child = new Child(t, name);
  await child.ready();
  // Labels are stored only while a ruleset references `ct label` (notes §7).
  await child.must({ op: 'installConntrackTable' });

  run('conntrack', '-I', '-p', 'tcp', '-s', E4, '-d', '198.51.100.2', '--sport', '40001', '--dport', '7', '--state', 'ESTABLISHED', '-t', '60', '--mark', String(FISH_MARK_BASE + 1));
  run('conntrack', '-I', '-p', 'icmp', '-s', E4, '-d', '198.51.100.2', '--icmp-type', '8', '--icmp-code', '0', '--icmp-id', '40004', '-t', '30', '--mark', String(FISH_MARK_BASE + 2));
  run('conntrack', '-I', '-p', 'icmpv6', '-s', E6, '-d', '2001:db8:1::2', '--icmpv6-type', '128', '--icmpv6-code', '0', '--icmpv6-id', '40003', '-t', '30', '--mark', String(FISH_MARK_BASE + 3));
  run('conntrack', '-I', '-p', 'udp', '-s', E4, '-d', '198.51.100.2', '--sport', '40002', '--dport', '9000', '-t', '60', '--mark', '1234');

  // The notes' sample reservation (TCP 40005 here, so it cannot collide with the entry above), with labels.
  const labels = encodeLabels({ rid: 1, clientPort: 51502, ipVersion: 4, address: '100.64.0.2' });
  const reservation = {
    orig: { src: E4, dst: '198.51.100.2', protocol: 6, srcPort: 40005, dstPort: 7 },
    reply: { src: '198.51.100.2', dst: E4, protocol: 6, srcPort: 7, dstPort: 40005 },
    timeout: 60,
    status: IPS.CONFIRMED,
    mark: FISH_MARK_BASE + 1,
    labels: labels.toString('hex'),
  };
  t.same(await child.must({ op: 'ctReserve', reservation }), [], 'the exclusive create is acknowledged');
  const twice = await child.call({ op: 'ctReserve', reservation });
  t.equal(twice.ok, false, 'the same tuple again is refused');
  t.match(twice.error, { code: 'EEXIST', errno: -17, syscall: 'netlink' });
  t.match(twice.error?.message, /IPCTNL_MSG_CT_NEW/, 'the error names the request');

  type Entry = { orig: Record<string, unknown>; reply: Record<string, unknown>; mark: number; tcpState: number | null; labels: string | null; status: number };
  const v4 = await child.must<Entry[]>({ op: 'ctDump', family: 4, mark: FISH_MARK_BASE, mask: FISH_MARK_MASK });
  t.equal(v4.length, 3, "Fish's three IPv4 entries, not the foreign one");
  const bySport = (port: number) => v4.find((entry) => entry.orig['srcPort'] === port);
  t.match(bySport(40001), { orig: { src: E4, dst: '198.51.100.2', protocol: 6, dstPort: 7 }, reply: { srcPort: 7, dstPort: 40001 }, mark: FISH_MARK_BASE + 1, tcpState: 3 });
  const icmp = v4.find((entry) => entry.orig['protocol'] === 1);
  t.match(icmp, { orig: { icmpId: 40004, icmpType: 8, icmpCode: 0 }, reply: { icmpId: 40004, icmpType: 0 }, mark: FISH_MARK_BASE + 2 });
  const reserved = bySport(40005);
  t.ok(reserved, 'the reservation is in the dump');
  t.equal(reserved?.status! & IPS.CONFIRMED, IPS.CONFIRMED);
  t.same(decodeLabels(reserved?.labels ? Buffer.from(reserved.labels, 'hex') : null), { rid: 1, clientPort: 51502, ipVersion: 4, address: '100.64.0.2' });
  const v6 = await child.must<Entry[]>({ op: 'ctDump', family: 6, mark: FISH_MARK_BASE, mask: FISH_MARK_MASK });
  t.match(v6, [{ orig: { src: E6, protocol: 58, icmpId: 40003, icmpType: 128 }, reply: { icmpType: 129 }, mark: FISH_MARK_BASE + 3 }]);

  // One registration's entries: mask 0xffffffff.
  await child.must({ op: 'ctFlush', family: 4, mark: FISH_MARK_BASE + 2, mask: 0xffffffff });
  t.equal((await child.must<Entry[]>({ op: 'ctDump', family: 4, mark: FISH_MARK_BASE, mask: FISH_MARK_MASK })).length, 2);

  for (const family of [4, 6]) await child.must({ op: 'ctFlush', family, mark: FISH_MARK_BASE, mask: FISH_MARK_MASK });
  const left = run('conntrack', '-L');
  t.notMatch(left, /mark=40494694/, "none of Fish's entries is left");
  t.match(left, /sport=40002.*mark=1234/, 'the foreign entry stays');
  t.same(await child.must({ op: 'ctDump', family: 6, mark: FISH_MARK_BASE, mask: FISH_MARK_MASK }), []);
  await child.exit();
});

t.test('the addon\'s netlink request loop: replies, errors, timeouts', { skip }, async (t) => {
  const { name } = namespace(t);
  const child = new Child(t, name);
  await child.ready();
  const raw = (message: Buffer, timeoutMs = 2000) => child.call({ op: 'raw', protocol: 0, message: message.toString('hex'), timeoutMs });

  // REQUEST|ACK: the answer, then the ACK (excluded).
  const lo = await raw(linkGetByName({ seq: 7, name: 'lo' }));
  t.equal(lo.ok, true);
  t.equal((lo.result as string[]).length, 1, 'one RTM_NEWLINK, the ACK not returned');
  // Without ACK: the one answer ends the request.
  const plain = Buffer.from(linkGetByName({ seq: 8, name: 'lo' }));
  plain.writeUInt16LE(NLM_F.REQUEST, 6);
  t.equal(((await raw(plain)).result as string[]).length, 1);
  // A dump: every rule of the family until NLMSG_DONE.
  const rules = await raw(ruleDump({ seq: 9, family: 4 }));
  t.equal((rules.result as string[]).length, 3, 'local, main and default');

  const missing = await raw(linkGetByName({ seq: 10, name: 'nosuchdev0' }));
  t.match(missing.error, { code: 'ENODEV', errno: -19, syscall: 'netlink' });
  t.match(missing.error?.message, /^netlink RTM_GETLINK ENODEV: .*\(seq 10\)/);

  // The kernel's extended ACK text is part of the message when it gives one.
  const badRange = await raw(
    ruleMessage({ seq: 11, op: 'add', rule: { family: 4, priority: 100, table: 4242, dst: E4, ipProto: 17, dport: { lo: 2, hi: 1 } } }),
  );
  t.match(badRange.error, { code: 'EINVAL', syscall: 'netlink' });
  t.match(badRange.error?.message, /^netlink RTM_NEWRULE EINVAL: .*\(seq 11\): .*range/i, 'extended ACK text');

  // A message the kernel does not answer (NLMSG_NOOP without ACK) times out.
  const started = Date.now();
  const silent = await raw(encodeMessage({ type: 1, flags: NLM_F.REQUEST, seq: 12 }, Buffer.alloc(0)), 200);
  t.match(silent.error, { code: 'ETIMEDOUT', syscall: 'netlink' });
  t.ok(Date.now() - started >= 150, 'waited for the timeout');

  const wrongLength = linkGetByName({ seq: 13, name: 'lo' }).subarray(0, 20);
  t.match((await raw(wrongLength)).error, { code: 'ERR_INVALID_ARG_VALUE' });
  t.equal(RTM.GETLINK, 18);
  await child.exit();
});

/**
 * The host-namespace setup Fish owns (notes/fish-kernel.md §3, §9): forwarding checks, the `inet fishct`
 * nftables table that turns conntrack (and its labels) on, the tun brought up with an MTU, the default
 * routes of Fish's table through the tun, and the policy rules that send return traffic for the egress
 * slices to that table. Every step is idempotent and recorded, so `uninstall()` removes exactly what this
 * instance installed; `HostNetwork.cleanup()` removes the same things by inspection after a crash, when
 * there is no record.
 *
 * Everything acts in the namespace of the calling process (netlink sockets, `nft`, `/proc/sys/net`), which
 * is why tests run it under `ip netns exec`. The binding and the command runner are injected, so the logic is
 * unit-testable without root.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { canonicalAddress, addressVersion, type IpVersion } from '../../lib/netlink/address.js';
import { FISH_MARK_BASE, FISH_MARK_MASK, NETLINK_NETFILTER } from '../../lib/netlink/conntrack.js';
import { isNetlinkError } from '../../lib/netlink/message.js';
import {
  IPPROTO,
  NETLINK_ROUTE,
  decodeLink,
  decodeRoute,
  decodeRule,
  deleteDumpedRoute,
  deleteDumpedRule,
  linkGetByName,
  linkSetUp,
  routeDump,
  routeMessage,
  ruleDump,
  ruleMessage,
  type Rule,
} from '../../lib/netlink/route.js';
import { NetlinkSocket } from '../../lib/netlink/socket.js';
import type { NativeBinding } from '../../lib/native.js';
import { flushMarked } from './conntrack-control.js';

/** The native calls the host setup uses. */
export type HostNetworkBinding = Pick<NativeBinding, 'netlinkOpen' | 'netlinkRequest' | 'close' | 'openPersistentTun' | 'unpersistTun'>;

/** What running a command returned (spawnSync's shape, reduced). */
export interface CommandResult {
  status: number | null;
  stdout: string;
  stderr: string;
  /** Set when the command could not be started at all (ENOENT: not installed). */
  error?: NodeJS.ErrnoException | undefined;
}

/** Runs `command args` with `input` on stdin. Injected so tests can see and fake `nft`. */
export type CommandRunner = (command: string, args: string[], input?: string) => CommandResult;

/** Defaults: table 4242, rule priority 100 (ICMP rules at 101), tun fish0. */
export const HOST_NETWORK_DEFAULTS = { table: 4242, rulePriority: 100, tunName: 'fish0' } as const;

/** The nftables table Fish owns. */
export const NFT_TABLE = 'fishct';

/**
 * The conntrack enabler (notes §3 step 2): a prerouting chain makes the kernel register conntrack's hooks,
 * and referencing `ct label` makes it store CTA_LABELS. Declaring the table, deleting it and defining it again
 * in one transaction makes the install idempotent (no second rule in a table that already exists). nft needs
 * newlines around the rule, not only `;`.
 */
export const NFT_SCRIPT = [
  `add table inet ${NFT_TABLE}`,
  `delete table inet ${NFT_TABLE}`,
  `table inet ${NFT_TABLE} {`,
  ' chain pre {',
  '  type filter hook prerouting priority -150; policy accept;',
  '  ct label 127 counter',
  ' }',
  '}',
  '',
].join('\n');

/** Options of a {@link HostNetwork}. */
export interface HostNetworkOptions {
  /** Fish's routing table (default 4242). */
  table?: number;
  /** Priority of the tcp/udp rules; ICMP rules get one more (default 100). */
  rulePriority?: number;
  /** Per netlink request. */
  timeoutMs?: number;
  /** How `nft` is run (default: spawnSync). */
  runCommand?: CommandRunner;
  /** How sysctls are read (default: fs.readFileSync). */
  readFile?: (path: string) => string;
}

/** An egress slice that must be routed back to Fish: the family, the egress address and its port range. */
export interface EgressRange {
  family: IpVersion;
  egress: string;
  portLo: number;
  portHi: number;
}

/** What `setRanges` changed. */
export interface RuleChanges {
  added: Rule[];
  removed: Rule[];
}

/** What `HostNetwork.cleanup` found and removed. */
export interface CleanupReport {
  rulesRemoved: number;
  routesRemoved: number;
  nftTableRemoved: boolean;
  tunRemoved: boolean;
  /** The families whose Fish-marked conntrack entries were flushed. */
  conntrackFlushed: IpVersion[];
}

/** Options of `HostNetwork.cleanup`. */
export interface CleanupOptions {
  table?: number;
  tunName?: string;
  timeoutMs?: number;
  runCommand?: CommandRunner;
  /** The conntrack mark and mask selecting Fish's entries (default 0xF15E0000 / 0xFFFF0000). */
  mark?: number;
  markMask?: number;
}

/** A host setup failure with a stable code and a message saying what to do. */
export class HostNetworkError extends Error {
  /** `EFDFERRY_FORWARDING_OFF`, `EFDFERRY_NFT_MISSING` or `EFDFERRY_NFT_FAILED`. */
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = 'HostNetworkError';
    this.code = code;
  }
}

/** The default {@link CommandRunner}. */
export const spawnCommand: CommandRunner = (command, args, input) => {
  const result = spawnSync(command, args, { input: input ?? '', encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'] });
  return { status: result.status, stdout: result.stdout ?? '', stderr: result.stderr ?? '', error: result.error };
};

/** Runs nft; a missing binary is a clear error (nftables is a documented dependency of Fish). */
function runNft(run: CommandRunner, args: string[], input?: string): CommandResult {
  const result = run('nft', args, input);
  if (result.error?.code === 'ENOENT') {
    throw new HostNetworkError(
      'EFDFERRY_NFT_MISSING',
      'Fish needs nft (nftables) to enable conntrack and its labels (table inet fishct), but nft was not found ' +
        'in PATH; install the nftables package',
    );
  }
  if (result.error) throw result.error;
  return result;
}

/** `nft delete table inet fishct`; false when there was no such table. */
function deleteNftTable(run: CommandRunner): boolean {
  const result = runNft(run, ['delete', 'table', 'inet', NFT_TABLE]);
  if (result.status === 0) return true;
  if (/No such file or directory/.test(result.stderr)) return false;
  throw new HostNetworkError('EFDFERRY_NFT_FAILED', `nft delete table inet ${NFT_TABLE} failed: ${result.stderr.trim()}`);
}

/** Prefixes an error's message with what was being done, keeping its code/errno for callers. */
function withContext(error: unknown, doing: string): unknown {
  if (error instanceof Error) error.message = `${doing}: ${error.message}`;
  return error;
}

/** `pref 100 to 203.0.113.7 ipproto udp dport 40000-40999 lookup 4242`, for messages. */
export function describeRule(rule: Rule): string {
  const proto = rule.ipProto === null ? '' : ` ipproto ${({ 1: 'icmp', 6: 'tcp', 17: 'udp', 58: 'ipv6-icmp' } as Record<number, string>)[rule.ipProto] ?? rule.ipProto}`;
  const ports = rule.dport ? ` dport ${rule.dport.lo}-${rule.dport.hi}` : '';
  return `pref ${rule.priority}${rule.dst ? ` to ${rule.dst}` : ''}${proto}${ports} lookup ${rule.table}`;
}

function ruleKey(rule: Rule): string {
  return `${rule.family}|${rule.priority}|${rule.dst}|${rule.ipProto}|${rule.dport ? `${rule.dport.lo}-${rule.dport.hi}` : ''}|${rule.table}`;
}

/**
 * The rules that cover `ranges`: per family and egress address, overlapping or adjacent ranges merged, a tcp
 * and a udp rule per merged range at `priority`, and one portless icmp / ipv6-icmp rule at `priority + 1`
 * (replies to ICMP echo and the ICMP errors PMTUD needs, notes §4).
 */
export function rulesFor(ranges: readonly EgressRange[], table: number, priority: number): Rule[] {
  const byEgress = new Map<string, { family: IpVersion; egress: string; spans: [number, number][] }>();
  for (const range of ranges) {
    if (addressVersion(range.egress) !== range.family) {
      throw new TypeError(`egress ${range.egress} is not an IPv${range.family} address`);
    }
    if (!Number.isInteger(range.portLo) || !Number.isInteger(range.portHi) || range.portLo < 1 || range.portHi > 65535 || range.portLo > range.portHi) {
      throw new RangeError(`port range ${range.portLo}-${range.portHi} of ${range.egress} must be 1 ≤ lo ≤ hi ≤ 65535`);
    }
    const egress = canonicalAddress(range.egress);
    const key = `${range.family}|${egress}`;
    const group = byEgress.get(key) ?? { family: range.family, egress, spans: [] };
    group.spans.push([range.portLo, range.portHi]);
    byEgress.set(key, group);
  }
  const rules: Rule[] = [];
  for (const { family, egress, spans } of byEgress.values()) {
    spans.sort((a, b) => a[0] - b[0]);
    const merged: [number, number][] = [];
    for (const [lo, hi] of spans) {
      const last = merged[merged.length - 1];
      if (last && lo <= last[1] + 1) last[1] = Math.max(last[1], hi);
      else merged.push([lo, hi]);
    }
    for (const [lo, hi] of merged) {
      for (const ipProto of [IPPROTO.TCP, IPPROTO.UDP]) {
        rules.push({ family, priority, table, dst: egress, ipProto, dport: { lo, hi } });
      }
    }
    rules.push({ family, priority: priority + 1, table, dst: egress, ipProto: family === 4 ? IPPROTO.ICMP : IPPROTO.ICMPV6, dport: null });
  }
  return rules;
}

/** Fish's host-namespace setup; see the module comment. */
export class HostNetwork {
  readonly #binding: HostNetworkBinding;
  readonly #table: number;
  readonly #priority: number;
  readonly #timeoutMs: number | undefined;
  readonly #run: CommandRunner;
  readonly #readFile: (path: string) => string;
  #route: NetlinkSocket | null = null;
  #nftInstalled = false;
  readonly #routes = new Map<IpVersion, { table: number; ifindex: number }>();
  readonly #rules = new Map<string, Rule>();

  /** Nothing is touched until a method is called. */
  constructor(binding: HostNetworkBinding, options: HostNetworkOptions = {}) {
    this.#binding = binding;
    this.#table = options.table ?? HOST_NETWORK_DEFAULTS.table;
    this.#priority = options.rulePriority ?? HOST_NETWORK_DEFAULTS.rulePriority;
    this.#timeoutMs = options.timeoutMs;
    this.#run = options.runCommand ?? spawnCommand;
    this.#readFile = options.readFile ?? ((file) => fs.readFileSync(file, 'utf8'));
  }

  /** Fish's routing table number. */
  get table(): number {
    return this.#table;
  }

  /** The rules installed by this instance, in the order they were added. */
  get rules(): Rule[] {
    return [...this.#rules.values()];
  }

  #socket(): NetlinkSocket {
    this.#route ??= new NetlinkSocket(this.#binding, NETLINK_ROUTE, this.#timeoutMs === undefined ? {} : { timeoutMs: this.#timeoutMs });
    return this.#route;
  }

  /**
   * Throws a {@link HostNetworkError} naming the sysctl and the fix when forwarding is off: Fish's packets
   * are forwarded by the host (written into the tun, routed out). IPv6 is checked only when `ipv6` is set
   * (an IPv6 egress is configured).
   */
  checkForwarding(options: { ipv6: boolean }): void {
    const checks: [string, string][] = [['net.ipv4.ip_forward', '/proc/sys/net/ipv4/ip_forward']];
    if (options.ipv6) checks.push(['net.ipv6.conf.all.forwarding', '/proc/sys/net/ipv6/conf/all/forwarding']);
    for (const [name, file] of checks) {
      let value: string;
      try {
        value = this.#readFile(file).trim();
      } catch (error) {
        throw new HostNetworkError(
          'EFDFERRY_FORWARDING_OFF',
          `Fish cannot read ${name} (${file}: ${(error as Error).message}); is IPv${name.includes('ipv6') ? 6 : 4} enabled in this namespace?`,
        );
      }
      if (value !== '1') {
        throw new HostNetworkError(
          'EFDFERRY_FORWARDING_OFF',
          `${name} is ${value || 'empty'}, but Fish forwards its clients' packets through this host: enable it with ` +
            `\`sysctl -w ${name}=1\` and persist it in /etc/sysctl.d/`,
        );
      }
    }
  }

  /** Installs (or re-installs, atomically) the `inet fishct` table with `nft -f -`. */
  installConntrackTable(): void {
    const result = runNft(this.#run, ['-f', '-'], NFT_SCRIPT);
    if (result.status !== 0) {
      throw new HostNetworkError('EFDFERRY_NFT_FAILED', `nft -f - (table inet ${NFT_TABLE}) failed: ${result.stderr.trim()}`);
    }
    this.#nftInstalled = true;
  }

  /** Sets the tun up with `mtu` (≥ 1280, or the kernel takes IPv6 off the device). */
  bringUpTun(ifindex: number, mtu: number, txQueueLength?: number): void {
    if (!Number.isInteger(mtu) || mtu < 1280 || mtu > 65535) throw new RangeError(`tun MTU ${mtu} must be 1280..65535`);
    try {
      this.#socket().request((seq) => linkSetUp({ seq, ifindex, mtu, ...(txQueueLength === undefined ? {} : { txQueueLength }) }));
    } catch (error) {
      throw withContext(error, `Fish: setting tun ${ifindex} up with MTU ${mtu}`);
    }
  }

  /**
   * `default dev <ifindex> table <table>` for each family, replacing a route left towards an older device.
   * Call after {@link bringUpTun}: a route through a down device is refused.
   */
  ensureRoutes(table: number, ifindex: number, families: readonly IpVersion[] = [4, 6]): void {
    for (const family of families) {
      try {
        this.#socket().request((seq) => routeMessage({ seq, op: 'add', family, table, ifindex, mode: 'replace' }));
      } catch (error) {
        throw withContext(error, `Fish: adding the IPv${family} default route of table ${table} via tun ${ifindex}`);
      }
      this.#routes.set(family, { table, ifindex });
    }
  }

  /**
   * Makes the installed rules exactly those {@link rulesFor} `ranges`: adds the missing ones first (so a
   * range is never uncovered while it changes), then removes those no longer needed. A rule already present
   * in the kernel (EEXIST) counts as added; one already gone (ENOENT) as removed.
   */
  setRanges(ranges: readonly EgressRange[]): RuleChanges {
    const wanted = new Map(rulesFor(ranges, this.#table, this.#priority).map((rule) => [ruleKey(rule), rule]));
    const changes: RuleChanges = { added: [], removed: [] };
    for (const [key, rule] of wanted) {
      if (this.#rules.has(key)) continue;
      this.#addRule(rule);
      this.#rules.set(key, rule);
      changes.added.push(rule);
    }
    for (const [key, rule] of this.#rules) {
      if (wanted.has(key)) continue;
      this.#deleteRule(rule);
      this.#rules.delete(key);
      changes.removed.push(rule);
    }
    return changes;
  }

  #addRule(rule: Rule): void {
    try {
      this.#socket().request((seq) => ruleMessage({ seq, op: 'add', rule }));
    } catch (error) {
      if (isNetlinkError(error, 'EEXIST')) return;
      throw withContext(error, `Fish: adding rule '${describeRule(rule)}'`);
    }
  }

  #deleteRule(rule: Rule): void {
    try {
      this.#socket().request((seq) => ruleMessage({ seq, op: 'delete', rule }));
    } catch (error) {
      if (isNetlinkError(error, 'ENOENT')) return;
      throw withContext(error, `Fish: deleting rule '${describeRule(rule)}'`);
    }
  }

  /**
   * Removes everything this instance installed: rules, routes, the nftables table, and (through
   * `unpersistTun`, which the tun's owner supplies, e.g. `() => binding.unpersistTun(fd)`) the tun's
   * persistence. Tries every step; throws an AggregateError of what failed. Closes the netlink socket.
   */
  uninstall(unpersistTun?: () => void): void {
    const failures: unknown[] = [];
    const attempt = (step: () => void) => {
      try {
        step();
      } catch (error) {
        failures.push(error);
      }
    };
    for (const [key, rule] of this.#rules) {
      attempt(() => {
        this.#deleteRule(rule);
        this.#rules.delete(key);
      });
    }
    for (const [family, { table, ifindex }] of this.#routes) {
      attempt(() => {
        try {
          this.#socket().request((seq) => routeMessage({ seq, op: 'delete', family, table, ifindex }));
        } catch (error) {
          // ESRCH: the route went with its device (the tun was removed first).
          if (!isNetlinkError(error, 'ESRCH', 'ENOENT')) throw withContext(error, `Fish: deleting the IPv${family} route of table ${table}`);
        }
        this.#routes.delete(family);
      });
    }
    if (this.#nftInstalled) {
      attempt(() => {
        deleteNftTable(this.#run);
        this.#nftInstalled = false;
      });
    }
    if (unpersistTun) attempt(unpersistTun);
    this.close();
    if (failures.length > 0) throw new AggregateError(failures, `Fish: uninstall left ${failures.length} step(s) undone: ${failures.map((f) => (f as Error).message).join('; ')}`);
  }

  /** Closes the netlink socket (installed state stays as it is). */
  close(): void {
    this.#route?.close();
    this.#route = null;
  }

  /**
   * `fdferry fish cleanup`: after a crash (no record of what was installed), removes by inspection every
   * rule pointing at `table`, every route in it, the `inet fishct` table, the persistent tun `tunName`, and
   * Fish's conntrack entries (by mark) in both families. Tries every step; throws an AggregateError of what
   * failed, after doing the rest.
   */
  static cleanup(binding: HostNetworkBinding, options: CleanupOptions = {}): CleanupReport {
    const table = options.table ?? HOST_NETWORK_DEFAULTS.table;
    const tunName = options.tunName ?? HOST_NETWORK_DEFAULTS.tunName;
    const run = options.runCommand ?? spawnCommand;
    const socketOptions = options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs };
    const report: CleanupReport = { rulesRemoved: 0, routesRemoved: 0, nftTableRemoved: false, tunRemoved: false, conntrackFlushed: [] };
    const failures: unknown[] = [];
    const attempt = (step: () => void) => {
      try {
        step();
      } catch (error) {
        failures.push(error);
      }
    };

    const route = new NetlinkSocket(binding, NETLINK_ROUTE, socketOptions);
    try {
      for (const family of [4, 6] as const) {
        attempt(() => {
          const rules = route.dump((seq) => ruleDump({ seq, family })).map(decodeRule);
          for (const rule of rules) {
            if (!rule || rule.table !== table) continue;
            try {
              route.request((seq) => deleteDumpedRule({ seq, rule }));
              report.rulesRemoved++;
            } catch (error) {
              if (!isNetlinkError(error, 'ENOENT')) throw withContext(error, `Fish cleanup: deleting rule '${describeRule(rule)}'`);
            }
          }
        });
        attempt(() => {
          const routes = route.dump((seq) => routeDump({ seq, family })).map(decodeRoute);
          for (const found of routes) {
            if (!found || found.table !== table) continue;
            try {
              route.request((seq) => deleteDumpedRoute({ seq, route: found }));
              report.routesRemoved++;
            } catch (error) {
              if (!isNetlinkError(error, 'ESRCH', 'ENOENT')) throw withContext(error, `Fish cleanup: deleting a route of table ${table}`);
            }
          }
        });
      }
      attempt(() => {
        report.nftTableRemoved = deleteNftTable(run);
      });
      attempt(() => {
        // Asked by name first: re-attaching a tun that is not there would create one.
        let exists = true;
        try {
          decodeLink(route.request((seq) => linkGetByName({ seq, name: tunName }))[0]!);
        } catch (error) {
          if (!isNetlinkError(error, 'ENODEV')) throw withContext(error, `Fish cleanup: looking up ${tunName}`);
          exists = false;
        }
        if (!exists) return;
        const tun = binding.openPersistentTun(tunName);
        try {
          binding.unpersistTun(tun.fd);
        } finally {
          // The last fd: with persistence cleared, closing it removes the device and its routes.
          binding.close(tun.fd);
        }
        report.tunRemoved = true;
      });
    } finally {
      route.close();
    }

    attempt(() => {
      const conntrack = new NetlinkSocket(binding, NETLINK_NETFILTER, socketOptions);
      try {
        for (const family of [4, 6] as const) {
          flushMarked(conntrack, family, options.mark ?? FISH_MARK_BASE, options.markMask ?? FISH_MARK_MASK);
          report.conntrackFlushed.push(family);
        }
      } finally {
        conntrack.close();
      }
    });
    if (failures.length > 0) {
      throw new AggregateError(failures, `Fish cleanup left ${failures.length} step(s) undone: ${failures.map((f) => (f as Error).message).join('; ')}`);
    }
    return report;
  }
}

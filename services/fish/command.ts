/** `fdferry fish` (the Fish daemon, with its flags) and `fdferry fish cleanup`. */
import type { Argv, CommandModule } from 'yargs';
import { loadNative } from '../../lib/native.js';
import { runDaemon, type RunningDaemon } from '../../lib/daemon.js';
import { commonOptionsFrom, withCommonOptions } from '../common-options.js';
import { parseCidr } from './egress-policy.js';
import { cleanupFishHost, createFishHost, DEFAULT_HOST_SETTINGS, type FishHostSettings } from './host-setup.js';
import { FishService, type FishOptions } from './service.js';

const h = DEFAULT_HOST_SETTINGS;

/** Conntrack mark of Fish's entries (high 16 bits; the low 16 are the registration id), notes §7. */
export const FISH_MARK_BASE = 0xf15e0000;

/** Adds Fish's flags to the command. */
export function fishOptions<T>(yargs: Argv<T>) {
  return withCommonOptions(yargs, 'fish')
    .option('egress-allow', {
      type: 'string',
      array: true,
      default: ['203.0.113.0/24', '2001:db8:e::/64'],
      describe: 'prefixes registrations may take egress addresses from (comma or repeat); the defaults are documentation ranges, for trying Fish out',
      group: 'Egress:',
    })
    .option('port-range', { type: 'string', default: '1024-65535', describe: 'ports (and ICMP echo ids) slices may use, lo-hi', group: 'Egress:' })
    .option('max-registrations', { type: 'number', default: 1024, describe: 'registrations at once (each holds 1 fd and its rules)', group: 'Egress:' })
    .option('max-mappings', { type: 'number', default: 65_536, describe: 'mappings a registration may hold unless it asks for fewer', group: 'Egress:' })
    .option('tun-name', { type: 'string', default: h.tunName, describe: 'the persistent tun Fish injects packets into and reads replies from', group: 'Host:' })
    .option('mtu', { type: 'number', default: h.mtu, describe: 'tun MTU: the largest client MTU (>= 1280)', group: 'Host:' })
    .option('tx-queue-length', { type: 'number', default: h.txQueueLength, describe: 'the tun\'s txqueuelen: replies wait there for Fish (the kernel default 500 overflows in bursts)', group: 'Host:' })
    .option('route-table', { type: 'number', default: h.routeTable, describe: 'routing table whose default route is the tun (replies to slices are looked up there)', group: 'Host:' })
    .option('rule-priority', { type: 'number', default: h.rulePriority, describe: 'priority of the tcp/udp rules per slice; the icmp rules get the next one', group: 'Host:' })
    .option('keep-host-setup', { type: 'boolean', default: false, describe: 'on a clean stop keep the tun, rules, nftables table and reservations (for a restart that must keep ports)', group: 'Host:' })
    .option('mss-clamp', { type: 'number', default: 1360, describe: 'lower the MSS of SYN and SYN-ACK to this (IPv6: 20 less; 0 = leave)', group: 'Pump:' })
    .option('tcp-idle-timeout', { type: 'number', default: 7_440_000, describe: 'ms without a packet before a TCP mapping is forgotten', group: 'Pump:' })
    .option('udp-idle-timeout', { type: 'number', default: 120_000, describe: 'ms without a packet before a UDP mapping is forgotten', group: 'Pump:' })
    .option('icmp-idle-timeout', { type: 'number', default: 30_000, describe: 'ms without a packet before an ICMP echo mapping is forgotten', group: 'Pump:' })
    .option('revalidate-after', { type: 'number', default: 5_000, describe: 'ms of idleness after which a mapping is looked up in conntrack again before use', group: 'Pump:' })
    .option('verify-checksums', { type: 'boolean', default: true, describe: 'check client packets\' checksums so bad ones are counted, not forwarded', group: 'Pump:' })
    .option('registration-grace', { type: 'number', default: 10_000, describe: 'ms a registration outlives its control connection (a restarting proxy re-registers in time and keeps its ports)', group: 'Daemon:' })
    .option('restart-grace', { type: 'number', default: 60_000, describe: 'after a crash, ms mappings found in conntrack wait for their registration before they are flushed', group: 'Daemon:' })
    .option('audit', { type: 'boolean', default: false, describe: 'log every registration and its end at info level', group: 'Daemon:' })
    .option('slice-guard', { type: 'boolean', default: true, describe: 'report foreign, NATed and dropped conntrack entries in the slices (--no-slice-guard: off)', group: 'Daemon:' })
    .option('guard-rescan-interval', { type: 'number', default: 5_000, describe: 'least ms between two unfiltered conntrack dumps of the slice guard (each costs a walk of the host\'s table)', group: 'Daemon:' });
}

type FishArgv = Awaited<ReturnType<ReturnType<typeof fishOptions>['parseAsync']>>;

const integer = (flag: string, value: number | undefined, fallback: number, min: number, max: number): number => {
  const chosen = value ?? fallback;
  if (!Number.isSafeInteger(chosen) || chosen < min || chosen > max) throw new Error(`--${flag} must be an integer from ${min} to ${max}, got ${chosen}`);
  return chosen;
};

/** Parses `lo-hi`. */
export function parsePortRange(text: string, flag = 'port-range'): [number, number] {
  const match = /^(\d+)-(\d+)$/.exec(text.trim());
  const lo = Number(match?.[1]);
  const hi = Number(match?.[2]);
  if (!match || lo < 1 || hi > 65_535 || lo > hi) throw new Error(`--${flag} must be lo-hi with 1 <= lo <= hi <= 65535, got ${text}`);
  return [lo, hi];
}

/** Converts parsed flags to host settings. */
export function fishHostSettingsFrom(argv: Pick<FishArgv, 'tunName' | 'mtu' | 'routeTable' | 'rulePriority'> & { txQueueLength?: number }): FishHostSettings {
  if (!/^[A-Za-z0-9_.-]{1,15}$/.test(argv.tunName)) throw new Error(`--tun-name must be 1 to 15 letters, digits, '_', '.' or '-', got ${argv.tunName}`);
  return {
    tunName: argv.tunName,
    mtu: integer('mtu', argv.mtu, h.mtu, 1280, 65_535),
    txQueueLength: integer('tx-queue-length', argv.txQueueLength, h.txQueueLength, 1, 1 << 20),
    routeTable: integer('route-table', argv.routeTable, h.routeTable, 1, 0xfffffffe),
    // The kernel's own rules sit at 0, 32766 and 32767; Fish's must come before `main`.
    rulePriority: integer('rule-priority', argv.rulePriority, h.rulePriority, 1, 32_764),
    markBase: FISH_MARK_BASE,
  };
}

/** Converts parsed flags to {@link FishOptions}, with clear errors for bad values. */
export function fishOptionsFrom(argv: FishArgv): FishOptions {
  const allow = argv.egressAllow.flatMap((entry) => String(entry).split(',')).filter((entry) => entry.trim() !== '').map((entry) => parseCidr(entry));
  return {
    policy: {
      allow,
      portRange: parsePortRange(argv.portRange),
      maxRegistrations: integer('max-registrations', argv.maxRegistrations, 1024, 1, 65_535),
      defaultMaxMappings: integer('max-mappings', argv.maxMappings, 65_536, 1, 1 << 24),
    },
    pump: {
      markBase: FISH_MARK_BASE,
      mssClamp: integer('mss-clamp', argv.mssClamp, 1360, 0, 65_535),
      // notes/fish-kernel.md §7: long enough for the first reply; the kernel's tracker takes over from there.
      reserveTimeoutS: { tcp: 60, udp: 30, icmp: 30 },
      idleTimeoutMs: {
        tcp: integer('tcp-idle-timeout', argv.tcpIdleTimeout, 7_440_000, 1_000, Number.MAX_SAFE_INTEGER),
        udp: integer('udp-idle-timeout', argv.udpIdleTimeout, 120_000, 1_000, Number.MAX_SAFE_INTEGER),
        icmp: integer('icmp-idle-timeout', argv.icmpIdleTimeout, 30_000, 1_000, Number.MAX_SAFE_INTEGER),
      },
      revalidateAfterMs: integer('revalidate-after', argv.revalidateAfter, 5_000, 0, Number.MAX_SAFE_INTEGER),
      verifyChecksums: argv.verifyChecksums,
    },
    registrationGraceMs: integer('registration-grace', argv.registrationGrace, 10_000, 0, Number.MAX_SAFE_INTEGER),
    restartGraceMs: integer('restart-grace', argv.restartGrace, 60_000, 0, Number.MAX_SAFE_INTEGER),
    keepHostSetup: argv.keepHostSetup,
    audit: argv.audit,
    maxListedMappings: 10_000,
    sliceGuard: argv.sliceGuard ? { rescanIntervalMs: integer('guard-rescan-interval', argv.guardRescanInterval, 5_000, 0, Number.MAX_SAFE_INTEGER) } : false,
  };
}

/** Runs Fish until it is stopped (or has handed over to a successor). */
export function startFish(argv: FishArgv): Promise<RunningDaemon> {
  const common = commonOptionsFrom(argv);
  const options = fishOptionsFrom(argv);
  const host = fishHostSettingsFrom(argv);
  const needsIpv6 = options.policy.allow.some((cidr) => cidr.family === 6);
  return runDaemon('fish', common, (context) => new FishService(context, options, (ctx) => createFishHost(ctx, host, { ipv6: needsIpv6 })));
}

/**
 * `fdferry fish cleanup`: after a crash (or a stop with --keep-host-setup), removes what Fish installed
 * in this network namespace: its rules, the route table's routes, the nftables table, the persistent
 * tun and its conntrack entries. Safe to run when nothing is there.
 */
export const fishCleanupCommand: CommandModule = {
  command: 'cleanup',
  describe: 'remove what a crashed (or kept) Fish left in this network namespace: rules, routes, nftables table, tun, conntrack entries',
  builder: (y) =>
    y
      .option('tun-name', { type: 'string', default: h.tunName, describe: 'the tun Fish used' })
      .option('route-table', { type: 'number', default: h.routeTable, describe: 'the routing table Fish used' }),
  handler: (argv) => {
    const settings = fishHostSettingsFrom({ tunName: String(argv.tunName), mtu: h.mtu, routeTable: Number(argv.routeTable), rulePriority: h.rulePriority });
    const { removed, flushed } = cleanupFishHost(loadNative(), settings);
    console.log(`fdferry fish cleanup: ${removed.length ? `removed ${removed.join(', ')}` : 'no rule, route, nftables table or tun of Fish\'s was left'}`);
    console.log(`fdferry fish cleanup: flushed Fish's conntrack entries (${flushed.join(', ')})`);
  },
};

/** `fdferry bumblebee`: the command that runs the Bumblebee daemon, with its flags. */
import net from 'node:net';
import type { Argv } from 'yargs';
import { runDaemon, type RunningDaemon } from '../../lib/daemon.js';
import { commonOptionsFrom, withCommonOptions } from '../common-options.js';
import { DEFAULT_ENVIRONMENT } from './environments.js';
import { BumblebeeService, type BumblebeeOptions } from './service.js';

const d = DEFAULT_ENVIRONMENT;

/** Adds Bumblebee's flags to the command. */
export function bumblebeeOptions<T>(yargs: Argv<T>) {
  return withCommonOptions(yargs, 'bumblebee')
    .option('environments', { type: 'number', default: 1, describe: 'anonymous network namespaces to spread flows over', group: 'Environments:' })
    .option('tun-name', { type: 'string', default: d.tunName, describe: 'tun device name inside each namespace', group: 'Environments:' })
    .option('mtu', { type: 'number', default: d.mtu, describe: 'tun MTU (>= 1280, or IPv6 is removed from the device)', group: 'Environments:' })
    .option('tx-queue-length', { type: 'number', default: d.txQueueLength, describe: 'tun txqueuelen (the default 500 overflows in bursts)', group: 'Environments:' })
    .option('address4', { type: 'string', default: `${d.address4}/${d.prefix4}`, describe: 'tun IPv4 address/prefix; the listener binds it, the prefix must cover --pool4', group: 'Environments:' })
    .option('address6', { type: 'string', default: `${d.address6}/${d.prefix6}`, describe: 'tun IPv6 address/prefix (added without DAD); the listener binds it', group: 'Environments:' })
    .option('pool4', { type: 'string', default: d.pool4, describe: 'first internal IPv4 peer address (60,000 slots per address)', group: 'Environments:' })
    .option('pool6', { type: 'string', default: d.pool6, describe: 'first internal IPv6 peer address (its low 32 bits count addresses)', group: 'Environments:' })
    .option('listen-port', { type: 'number', default: d.listenPort, describe: 'port of the listeners inside the namespaces', group: 'Environments:' })
    .option('backlog', { type: 'number', default: d.backlog, describe: 'listen backlog, somaxconn and tcp_max_syn_backlog in each namespace', group: 'Environments:' })
    .option('slots', { type: 'number', default: d.slots, describe: 'NAT slots (internal tuples) per namespace: flows at once plus TIME_WAIT quarantine', group: 'Environments:' })
    .option('mss-clamp', { type: 'number', default: 0, describe: 'lower the MSS of SYN and SYN-ACK to this (0 = leave); for small on-ramp paths', group: 'Pump:' })
    .option('flow-idle-timeout', { type: 'number', default: 0, describe: 'ms without a packet before a flow is ended (0 = never)', group: 'Pump:' })
    .option('upgrade-timeout', { type: 'number', default: 10_000, describe: 'ms for the kernel to accept a handshake before the upgrade is refused', group: 'Pump:' })
    .option('slot-quarantine', { type: 'number', default: 60_000, describe: 'ms a freed internal tuple waits before reuse (TIME_WAIT is 60 s)', group: 'Pump:' })
    .option('verify-checksums', { type: 'boolean', default: true, describe: 'check client packets\' checksums so bad ones are counted, not silently lost', group: 'Pump:' })
    .option('keepalive-idle', { type: 'number', default: 60, describe: 's of silence before keepalive probes on upgraded sockets (0 = no keepalive)', group: 'Crash safety:' })
    .option('keepalive-interval', { type: 'number', default: 10, describe: 's between keepalive probes', group: 'Crash safety:' })
    .option('keepalive-count', { type: 'number', default: 6, describe: 'unanswered probes before the socket fails', group: 'Crash safety:' })
    .option('user-timeout', { type: 'number', default: 120_000, describe: 'TCP_USER_TIMEOUT of upgraded sockets in ms (0 = kernel default)', group: 'Crash safety:' })
    .option('max-flows', { type: 'number', default: 16_000, describe: 'flows at once, upgrades in progress included (each holds 1 fd)', group: 'Limits:' })
    .option('max-flows-per-owner', { type: 'number', describe: 'flows at once per owner id (default: --max-flows)', group: 'Limits:' })
    .option('max-flows-per-tenant', { type: 'number', describe: 'flows at once per tenant (default: --max-flows)', group: 'Limits:' })
    .option('shutdown-grace', { type: 'number', default: 10_000, describe: 'on SIGTERM, ms flows have to end before they are cut', group: 'Daemon:' })
    .option('audit', { type: 'boolean', default: false, describe: 'log every upgrade and flow end at info level', group: 'Daemon:' });
}

type BumblebeeArgv = Awaited<ReturnType<ReturnType<typeof bumblebeeOptions>['parseAsync']>>;

const integer = (flag: string, value: number | undefined, fallback: number, min: number, max: number): number => {
  const chosen = value ?? fallback;
  if (!Number.isSafeInteger(chosen) || chosen < min || chosen > max) throw new Error(`--${flag} must be an integer from ${min} to ${max}, got ${chosen}`);
  return chosen;
};

function addressWithPrefix(flag: string, value: string, family: 4 | 6): [string, number] {
  const [address = '', prefix = ''] = value.split('/');
  const bits = Number(prefix);
  if (net.isIP(address) !== family || !Number.isInteger(bits) || bits < 1 || bits > (family === 4 ? 32 : 128) || prefix === '') {
    throw new Error(`--${flag} must be an IPv${family} address with a prefix (e.g. ${family === 4 ? '100.64.0.1/10' : 'fd00:bb::1/64'}), got ${value}`);
  }
  return [address, bits];
}

function address(flag: string, value: string, family: 4 | 6): string {
  if (net.isIP(value) !== family) throw new Error(`--${flag} must be an IPv${family} address, got ${value}`);
  return value;
}

/** Converts parsed flags to {@link BumblebeeOptions}, with clear errors for bad values. */
export function bumblebeeOptionsFrom(argv: BumblebeeArgv): BumblebeeOptions {
  const [address4, prefix4] = addressWithPrefix('address4', argv.address4, 4);
  const [address6, prefix6] = addressWithPrefix('address6', argv.address6, 6);
  if (!/^[A-Za-z0-9_.-]{1,15}$/.test(argv.tunName)) throw new Error(`--tun-name must be 1 to 15 letters, digits, '_', '.' or '-', got ${argv.tunName}`);
  const maxFlows = integer('max-flows', argv.maxFlows, 16_000, 1, 1 << 24);
  return {
    environments: integer('environments', argv.environments, 1, 1, 64),
    environment: {
      tunName: argv.tunName,
      mtu: integer('mtu', argv.mtu, 1500, 1280, 65_535),
      txQueueLength: integer('tx-queue-length', argv.txQueueLength, 10_000, 1, 1 << 20),
      address4,
      prefix4,
      address6,
      prefix6,
      listenPort: integer('listen-port', argv.listenPort, 4242, 1, 65_535),
      backlog: integer('backlog', argv.backlog, 65_535, 1, 1 << 20),
      pool4: address('pool4', argv.pool4, 4),
      pool6: address('pool6', argv.pool6, 6),
      slots: integer('slots', argv.slots, 1_000_000, 2, 1 << 24),
    },
    pump: {
      mssClamp: integer('mss-clamp', argv.mssClamp, 0, 0, 65_535),
      flowIdleTimeoutMs: integer('flow-idle-timeout', argv.flowIdleTimeout, 0, 0, Number.MAX_SAFE_INTEGER),
      upgradeTimeoutMs: integer('upgrade-timeout', argv.upgradeTimeout, 10_000, 1, Number.MAX_SAFE_INTEGER),
      slotQuarantineMs: integer('slot-quarantine', argv.slotQuarantine, 60_000, 0, Number.MAX_SAFE_INTEGER),
      verifyChecksums: argv.verifyChecksums,
      keepaliveIdleS: integer('keepalive-idle', argv.keepaliveIdle, 60, 0, 32_767),
      keepaliveIntervalS: integer('keepalive-interval', argv.keepaliveInterval, 10, 0, 32_767),
      keepaliveCount: integer('keepalive-count', argv.keepaliveCount, 6, 0, 127),
      userTimeoutMs: integer('user-timeout', argv.userTimeout, 120_000, 0, 2_147_483_647),
    },
    flows: {
      maxFlows,
      maxFlowsPerOwner: integer('max-flows-per-owner', argv.maxFlowsPerOwner, maxFlows, 1, 1 << 24),
      maxFlowsPerTenant: integer('max-flows-per-tenant', argv.maxFlowsPerTenant, maxFlows, 1, 1 << 24),
    },
    shutdownGraceMs: integer('shutdown-grace', argv.shutdownGrace, 10_000, 0, Number.MAX_SAFE_INTEGER),
    audit: argv.audit,
  };
}

/** Runs Bumblebee until it is stopped (or has handed over to a successor). */
export function startBumblebee(argv: BumblebeeArgv): Promise<RunningDaemon> {
  const common = commonOptionsFrom(argv);
  const options = bumblebeeOptionsFrom(argv);
  return runDaemon('bumblebee', common, (context) => new BumblebeeService(context, options));
}

/**
 * Bumblebee's network environments: anonymous network namespaces, each with a tun and two listeners,
 * made by the addon on a dedicated thread. Every environment uses the same internal addresses: they are
 * separate namespaces, and the NAT slot (not the client's addresses) tells flows apart inside each one.
 */
import type { NativeBinding, NetworkEnvironmentFds, NetworkEnvironmentOptions, PumpEnvironment } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';

/** Addresses and sizes of every environment (flags of `fdferry bumblebee`). */
export interface EnvironmentSettings extends NetworkEnvironmentOptions {
  /** First internal peer address of each family (slot i: pool + floor(i / 60000), port 2000 + i % 60000). */
  pool4: string;
  pool6: string;
  /** NAT slots per environment: concurrent flows, plus those in TIME_WAIT quarantine. */
  slots: number;
}

/** Defaults from notes/bumblebee-kernel.md §3-4: a /10 around the pool, a NOARP tun, a deep backlog. */
export const DEFAULT_ENVIRONMENT: EnvironmentSettings = {
  tunName: 'bb0',
  mtu: 1500,
  txQueueLength: 10_000,
  address4: '100.64.0.1',
  prefix4: 10,
  address6: 'fd00:bb::1',
  prefix6: 64,
  listenPort: 4242,
  backlog: 65_535,
  pool4: '100.64.1.0',
  pool6: 'fd00:bb::1:0:0',
  slots: 1_000_000,
};

/** One environment: its id, its fds and the settings it was built with (they travel with it). */
export interface Environment extends NetworkEnvironmentFds {
  id: number;
  settings: EnvironmentSettings;
}

/** An environment in the hand-over state: fd numbers are indices into the transferred fd list. */
export interface ExportedEnvironment {
  id: number;
  settings: EnvironmentSettings;
  netnsInode: number;
  ifindex: number;
  netnsFd: number;
  tunFd: number;
  listener4Fd: number;
  listener6Fd: number;
}

/** What the pump needs to know of an environment. */
export function pumpEnvironment(environment: Environment): PumpEnvironment {
  const { settings } = environment;
  return {
    id: environment.id,
    tunFd: environment.tunFd,
    listener4Fd: environment.listener4Fd,
    listener6Fd: environment.listener6Fd,
    listener4: settings.address4,
    listener6: settings.address6,
    listenPort: settings.listenPort,
    pool4: settings.pool4,
    pool6: settings.pool6,
    slots: settings.slots,
  };
}

/** Every fd of an environment, the namespace last (closing it last is tidy; any order frees it). */
export function environmentFds(environment: Environment): number[] {
  return [environment.tunFd, environment.listener4Fd, environment.listener6Fd, environment.netnsFd];
}

/** Builds `count` environments; on a failure, closes the ones already built and rethrows. */
export function createEnvironments(binding: NativeBinding, count: number, settings: EnvironmentSettings): Environment[] {
  const built: Environment[] = [];
  try {
    for (let id = 1; id <= count; id++) {
      const fds = binding.createNetworkEnvironment(settings);
      built.push({ id, settings, ...fds });
    }
  } catch (error) {
    for (const environment of built) binding.closeAll(environmentFds(environment));
    throw error;
  }
  return built;
}

/** Adds an environment's fds to a hand-over's list and describes it by index. */
export function exportEnvironment(environment: Environment, fds: number[]): ExportedEnvironment {
  const index = (fd: number) => fds.push(fd) - 1;
  return {
    id: environment.id,
    settings: environment.settings,
    netnsInode: environment.netnsInode,
    ifindex: environment.ifindex,
    netnsFd: index(environment.netnsFd),
    tunFd: index(environment.tunFd),
    listener4Fd: index(environment.listener4Fd),
    listener6Fd: index(environment.listener6Fd),
  };
}

/**
 * Adopts an environment from a predecessor after checking every fd: the namespace is re-entered from a
 * new thread and must be the one recorded, with its tun up; the tun is a character device; both
 * listeners listen.
 */
export function importEnvironment(binding: NativeBinding, exported: ExportedEnvironment, fds: readonly number[]): Environment {
  const fd = (index: unknown, what: string): number => {
    if (typeof index !== 'number' || !Number.isInteger(index) || index < 0 || index >= fds.length) {
      throw new ProtocolError('EFDFERRY_STATE', `environment ${exported.id}: no ${what} fd`);
    }
    return fds[index]!;
  };
  const netnsFd = fd(exported.netnsFd, 'namespace');
  const tunFd = fd(exported.tunFd, 'tun');
  const listener4Fd = fd(exported.listener4Fd, 'IPv4 listener');
  const listener6Fd = fd(exported.listener6Fd, 'IPv6 listener');
  if (binding.describeFd(tunFd).kind !== 'char') throw new ProtocolError('EFDFERRY_STATE', `environment ${exported.id}: the tun fd is not a character device`);
  for (const [listener, name] of [[listener4Fd, 'IPv4'], [listener6Fd, 'IPv6']] as const) {
    if (!binding.describeFd(listener).listening) throw new ProtocolError('EFDFERRY_STATE', `environment ${exported.id}: the ${name} listener is not listening`);
  }
  let check;
  try {
    check = binding.checkNetworkEnvironment(netnsFd, exported.settings.tunName);
  } catch (error) {
    throw new ProtocolError('EFDFERRY_STATE', `environment ${exported.id}: cannot re-enter its namespace: ${(error as Error).message}`);
  }
  if (check.netnsInode !== exported.netnsInode) {
    throw new ProtocolError('EFDFERRY_STATE', `environment ${exported.id}: namespace inode ${check.netnsInode}, expected ${exported.netnsInode}`);
  }
  return { id: exported.id, settings: exported.settings, netnsFd, tunFd, listener4Fd, listener6Fd, netnsInode: exported.netnsInode, ifindex: exported.ifindex };
}

/**
 * What each daemon needs from its sandbox, and why: capabilities, socket families, namespaces, devices,
 * writable kernel tunables, and how many fds it may hold (which sizes `LimitNOFILE=` and
 * `FileDescriptorStoreMax=`). Everything not listed here is taken away by the service unit.
 *
 * A new daemon (Fish) adds its profile here; test/unit/units.test.ts fails until every daemon of
 * `fdferry up` has one.
 */
import type { CommonDaemonOptions } from '../../lib/daemon.js';
import type { BumblebeeOptions } from '../bumblebee/service.js';
import type { FishOptions } from '../fish/service.js';
import type { SplicerOptions } from '../splicer/service.js';

/** A unit setting with the reason it is there (rendered as a comment above it). */
export interface Reasoned {
  value: string;
  why: string;
}

/** What one daemon needs. */
export interface DaemonProfile<Options = unknown> {
  /** `Description=` of the service. */
  description: string;
  /** The doc file (under docs/) that describes the daemon. */
  doc: string;
  /** `CapabilityBoundingSet=`: each capability with the operation that needs it. Empty: none at all. */
  capabilities: Reasoned[];
  /** `RestrictAddressFamilies=`: the socket families the daemon creates (fds handed in are not affected). */
  addressFamilies: Reasoned[];
  /** `RestrictNamespaces=`: `yes` (none) or the kinds it creates. */
  namespaces: Reasoned;
  /** Devices: `private` (PrivateDevices=yes) or the device nodes it opens (DevicePolicy=closed + DeviceAllow=). */
  devices: { private: true; why: string } | { private: false; allow: Reasoned[] };
  /** Whether /proc/sys may stay writable (ProtectKernelTunables= off), and why. */
  writesKernelTunables: Reasoned | null;
  /** Arguments ExecStart= adds (crash survival, where the daemon has it). */
  startArgs: Reasoned[];
  /** The effective settings the unit is sized from. */
  sizing(common: CommonDaemonOptions, options: Options): { shutdownGraceMs: number; fds: number };
}

const UNIX = { value: 'AF_UNIX', why: 'its control socket, client connections, socketpairs, sd_notify' };

const splicer: DaemonProfile<SplicerOptions> = {
  description: 'fdferry Splicer: relays handed-over sockets in the kernel, across restarts',
  doc: 'splicer.md',
  capabilities: [
    {
      value: 'CAP_SYS_RESOURCE',
      why:
        'full-size pipes. F_SETPIPE_SZ above fs.pipe-max-size needs it, and without it, once root\'s processes together hold ' +
        'more than fs.pipe-user-pages-soft in pipes (1024 pipes of 256 KiB are over it), new pipes get one page (docs/splicer.md)',
    },
  ],
  addressFamilies: [UNIX, { value: 'AF_INET AF_INET6', why: 'only a loopback metrics listener would create one; relayed sockets are handed in' }],
  namespaces: { value: 'yes', why: 'Splicer creates no namespace' },
  startArgs: [{ value: '--fd-store', why: 'crash survival: relays, pipes and a checkpoint are kept in the fd store, and a restarted Splicer resumes every relay (docs/operations.md)' }],
  devices: { private: true, why: 'Splicer opens no device' },
  writesKernelTunables: null,
  sizing: (common, options) => ({
    shutdownGraceMs: options.shutdownGraceMs,
    // As services/splicer/service.ts counts it: 2 fds per relay, 2 per borrowed pipe, plus connections.
    fds: 2 * options.tasks.maxTasks + 2 * options.engine.maxPipes + common.maxConnections + 256,
  }),
};

const bumblebee: DaemonProfile<BumblebeeOptions> = {
  description: 'fdferry Bumblebee: turns raw IP flows into accepted kernel TCP sockets',
  doc: 'bumblebee.md',
  capabilities: [
    { value: 'CAP_SYS_ADMIN', why: 'unshare(CLONE_NEWNET) for its anonymous network namespaces, and setns() into them' },
    {
      value: 'CAP_NET_ADMIN',
      why: 'tun devices (TUNSETIFF), addresses, MTU and links (ioctl, rtnetlink), per-netns sysctls, SO_SNDBUFFORCE/SO_RCVBUFFORCE',
    },
  ],
  addressFamilies: [
    UNIX,
    { value: 'AF_INET AF_INET6', why: 'its listeners inside the namespaces, and the ioctl socket that configures the tun' },
    { value: 'AF_NETLINK', why: 'rtnetlink: IPv6 addresses without DAD' },
  ],
  namespaces: {
    value: 'net',
    why: 'Bumblebee unshares network namespaces and setns()es into them with CLONE_NEWNET (never 0); every other kind stays forbidden',
  },
  devices: { private: false, allow: [{ value: '/dev/net/tun rw', why: 'one tun device per namespace' }] },
  // A crashed Bumblebee's tun goes with it (docs/bumblebee.md), so there is nothing to keep in the fd store.
  startArgs: [],
  writesKernelTunables: {
    value: 'no',
    why: 'Bumblebee writes per-namespace sysctls (rp_filter, somaxconn, tcp_max_syn_backlog, addr_gen_mode) in its own namespaces',
  },
  sizing: (common, options) => ({
    shutdownGraceMs: options.shutdownGraceMs,
    // As services/bumblebee/service.ts counts it: 1 fd per flow, a few per environment, plus connections.
    fds: options.flows.maxFlows + 4 * options.environments + common.maxConnections + 256,
  }),
};

const fish: DaemonProfile<FishOptions> = {
  description: 'fdferry Fish: forwards clients\' packets from slices of shared egress addresses, every tuple reserved in conntrack',
  doc: 'fish.md',
  capabilities: [
    {
      value: 'CAP_NET_ADMIN',
      why: 'its persistent tun (TUNSETIFF, TUNSETPERSIST), routes and policy rules (rtnetlink), conntrack reservations and flushes (ctnetlink), the nftables table (nft)',
    },
  ],
  addressFamilies: [
    UNIX,
    { value: 'AF_NETLINK', why: 'rtnetlink (link, routes, rules), ctnetlink (reservations, flushes, dumps), and nft\'s nfnetlink' },
    { value: 'AF_INET AF_INET6', why: 'only a loopback metrics listener would create one; client packets arrive on handed-in sockets' },
  ],
  namespaces: { value: 'yes', why: 'Fish creates no namespace: it acts in the host\'s' },
  devices: { private: false, allow: [{ value: '/dev/net/tun rw', why: 'the persistent tun fish0' }] },
  // A crashed Fish recovers from its persistent tun and conntrack itself (docs/fish.md), not the fd store.
  startArgs: [],
  writesKernelTunables: null,
  sizing: (common, options) => ({
    shutdownGraceMs: 0,
    // As services/fish/service.ts counts it: 1 fd per registration, the tun, two netlink sockets, plus connections.
    fds: options.policy.maxRegistrations + common.maxConnections + 256,
  }),
};

/** Every daemon's profile, by service name. */
export const PROFILES: Readonly<Record<string, DaemonProfile<never>>> = { splicer, bumblebee, fish } as Record<string, DaemonProfile<never>>;

/** The profile of `service`, or an error naming the known ones. */
export function profileOf(service: string): DaemonProfile<never> {
  const profile = PROFILES[service];
  if (!profile) throw new Error(`no unit profile for ${service} (known: ${Object.keys(PROFILES).join(', ')})`);
  return profile;
}

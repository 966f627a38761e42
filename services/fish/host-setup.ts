/**
 * Fish's host side put together: forwarding checks, the conntrack-enabling nftables table, the
 * persistent tun, its route and the policy-routing rules (`HostNetwork`), and conntrack flushes and
 * dumps (`lib/netlink/conntrack.ts`). Everything acts in the namespace the daemon runs in.
 */
import type { DaemonContext } from '../../lib/daemon.js';
import type { FishHost, HostStart } from './host.js';
import type { EgressRange } from './registrations.js';

/** Where and how Fish sets the host up (flags of `fdferry fish`). */
export interface FishHostSettings {
  tunName: string;
  mtu: number;
  routeTable: number;
  rulePriority: number;
  markBase: number;
}

/** notes/fish-kernel.md §3: fish0, table 4242, rules at 100 (tcp/udp) and 101 (icmp). */
export const DEFAULT_HOST_SETTINGS: Omit<FishHostSettings, 'markBase'> = { tunName: 'fish0', mtu: 1500, routeTable: 4242, rulePriority: 100 };

/** Builds the host side of a Fish daemon. */
export function createFishHost(context: DaemonContext, settings: FishHostSettings, options: { ipv6: boolean }): FishHost {
  void context;
  void settings;
  void options;
  const unavailable = (): never => {
    throw new Error('Fish host setup is not built yet');
  };
  return {
    start: (): HostStart => unavailable(),
    adopt: (_ranges: EgressRange[]) => unavailable(),
    setRanges: (_ranges: EgressRange[]) => unavailable(),
    flushRegistration: () => unavailable(),
    stop: () => unavailable(),
  };
}

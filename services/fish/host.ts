/**
 * The host side of Fish, as the service sees it: the persistent tun, the policy-routing rules that
 * steer replies to it, the conntrack-enabling nftables table, and conntrack itself (flushes and the
 * cold-start dump). The service only says what it needs; `host-network.ts` and `lib/netlink/` do it.
 */
import type { FishMapping } from '../../lib/native.js';
import type { EgressRange } from './registrations.js';

/** What a fresh start found and made. */
export interface HostStart {
  tunFd: number;
  tunName: string;
  ifindex: number;
  /** The tun already existed (a crash, or a stop with --keep-host-setup): it was re-attached. */
  reattached: boolean;
  /** Fish's conntrack entries already there, as mappings (a cold start after a crash). */
  mappings: FishMapping[];
}

/** The host operations Fish needs. */
export interface FishHost {
  /** Checks forwarding, installs the conntrack table, opens (or re-attaches) the tun, routes, and dumps old mappings. */
  start(): HostStart;
  /** A successor: the predecessor's tun routes and rules for `ranges` are already there; take them over as they are. */
  adopt(ranges: EgressRange[], tunIfindex: number): void;
  /** Makes the rules cover exactly `ranges` (adding new ones before removing old ones). */
  setRanges(ranges: EgressRange[]): void;
  /** Deletes every conntrack entry of registration `id` (by mark); returns how many families were flushed. */
  flushRegistration(id: number): number;
  /** Removes what `start` installed (unless `keep`), and closes the tun. */
  stop(tunFd: number, keep: boolean): void;
}

/**
 * Fish's host side put together: forwarding checks, the conntrack-enabling nftables table, the
 * persistent tun, its route and the policy-routing rules (`HostNetwork`), and conntrack flushes and
 * dumps (`conntrack-control.ts`). Everything acts in the network namespace the daemon runs in.
 */
import type { DaemonContext } from '../../lib/daemon.js';
import type { FishMapping, NativeBinding } from '../../lib/native.js';
import { decodeLabels, FISH_MARK_MASK, NETLINK_NETFILTER, type ConntrackEntry } from '../../lib/netlink/conntrack.js';
import { NetlinkSocket } from '../../lib/netlink/socket.js';
import { dumpMarked, flushMarked } from './conntrack-control.js';
import type { FishHost, HostStart } from './host.js';
import { HostNetwork } from './host-network.js';

/** Where and how Fish sets the host up (flags of `fdferry fish`). */
export interface FishHostSettings {
  tunName: string;
  mtu: number;
  /** fish0's txqueuelen: replies queue there before Fish reads them; the default 500 overflows in bursts. */
  txQueueLength: number;
  routeTable: number;
  rulePriority: number;
  markBase: number;
}

/** notes/fish-kernel.md §3: fish0, table 4242, rules at 100 (tcp/udp) and 101 (icmp). */
export const DEFAULT_HOST_SETTINGS: Omit<FishHostSettings, 'markBase'> = { tunName: 'fish0', mtu: 1500, txQueueLength: 10_000, routeTable: 4242, rulePriority: 100 };

const PROTOCOLS: Record<number, FishMapping['protocol']> = { 6: 'tcp', 17: 'udp', 1: 'icmp', 58: 'icmp' };

/**
 * A conntrack entry of Fish's as the mapping it was made for, or null when its labels cannot say which
 * client it belongs to. IPv6 labels hold only the low 64 bits of the client address (notes §7): such a
 * mapping's `clientAddress` is `::<low 64 bits>` until its registration comes back with its /64.
 */
export function mappingOfEntry(entry: ConntrackEntry, markBase: number): FishMapping | null {
  const labels = decodeLabels(entry.labels);
  const orig = entry.orig;
  if (!labels || !orig || entry.mark === null || (entry.mark & FISH_MARK_MASK) >>> 0 !== markBase >>> 0 || labels.ipVersion !== (entry.family === 6 ? 6 : 4)) return null;
  const protocol = PROTOCOLS[orig.protocol];
  if (!protocol) return null;
  const rid = entry.mark & 0xffff;
  if (rid !== labels.rid) return null;
  return {
    rid,
    protocol,
    family: entry.family,
    clientAddress: labels.address,
    clientPort: labels.clientPort,
    destinationAddress: orig.dst,
    destinationPort: protocol === 'icmp' ? 0 : (orig.dstPort ?? 0),
    egressAddress: orig.src,
    egressPort: protocol === 'icmp' ? (orig.icmpId ?? 0) : (orig.srcPort ?? 0),
  };
}

/** Builds the host side of a Fish daemon. */
export function createFishHost(context: DaemonContext, settings: FishHostSettings, options: { ipv6: boolean }): FishHost {
  const { binding, log } = context;
  const network = new HostNetwork(binding, { table: settings.routeTable, rulePriority: settings.rulePriority });
  const families = options.ipv6 ? ([4, 6] as const) : ([4] as const);
  let conntrack: NetlinkSocket | null = null;
  const ct = () => (conntrack ??= new NetlinkSocket(binding, NETLINK_NETFILTER));
  const routeTun = (ifindex: number) => {
    network.bringUpTun(ifindex, settings.mtu, settings.txQueueLength);
    network.ensureRoutes(settings.routeTable, ifindex, families);
  };

  return {
    start(): HostStart {
      network.checkForwarding({ ipv6: options.ipv6 });
      network.installConntrackTable();
      const tun = binding.openPersistentTun(settings.tunName);
      try {
        routeTun(tun.ifindex);
        const entries = families.flatMap((family) => dumpMarked(ct(), family, settings.markBase, FISH_MARK_MASK));
        const mappings = entries.map((entry) => mappingOfEntry(entry, settings.markBase)).filter((m): m is FishMapping => m !== null);
        if (entries.length > mappings.length) log.info({ entries: entries.length, usable: mappings.length }, 'conntrack entries of Fish\'s without a usable client label: left to expire');
        return { tunFd: tun.fd, tunName: settings.tunName, ifindex: tun.ifindex, reattached: !tun.created, mappings };
      } catch (error) {
        binding.closeAll([tun.fd]);
        throw error;
      }
    },
    adopt(ranges, tunIfindex) {
      // The predecessor's rules, routes and table are there: re-stating them is a no-op (EEXIST, replace,
      // an atomic nft re-definition), and it gives this process the record a clean stop removes from.
      network.installConntrackTable();
      routeTun(tunIfindex);
      network.setRanges(ranges);
    },
    setRanges(ranges) {
      network.setRanges(ranges);
    },
    flushRegistration(id) {
      for (const family of families) flushMarked(ct(), family, (settings.markBase | id) >>> 0, 0xffffffff);
      return families.length;
    },
    stop(tunFd, keep) {
      conntrack?.close();
      conntrack = null;
      if (keep) {
        network.close();
        binding.closeAll([tunFd]);
        return;
      }
      try {
        network.uninstall(() => binding.unpersistTun(tunFd));
      } finally {
        // With persistence cleared, closing the last fd removes the device (and its routes).
        binding.closeAll([tunFd]);
      }
    },
  };
}

/** Removes everything of Fish's in this namespace; returns what it removed and what it flushed, for humans. */
export function cleanupFishHost(binding: NativeBinding, settings: FishHostSettings): { removed: string[]; flushed: string[] } {
  const report = HostNetwork.cleanup(binding, { table: settings.routeTable, tunName: settings.tunName, mark: settings.markBase, markMask: FISH_MARK_MASK });
  return {
    removed: [
      ...(report.rulesRemoved ? [`${report.rulesRemoved} rule(s)`] : []),
      ...(report.routesRemoved ? [`${report.routesRemoved} route(s) of table ${settings.routeTable}`] : []),
      ...(report.nftTableRemoved ? ['the nftables table inet fishct'] : []),
      ...(report.tunRemoved ? [`the tun ${settings.tunName}`] : []),
    ],
    // A flush by mark does not say how many entries it deleted.
    flushed: report.conntrackFlushed.map((family) => `IPv${family}`),
  };
}

/**
 * Fish's conntrack operations from the control plane, over a NETLINK_NETFILTER socket: flush entries by
 * mark (a registration ended, or a cleanup after a crash) and dump them (a cold start rebuilds its mappings
 * from the entries' labels). Messages come from lib/netlink/conntrack.ts; notes/fish-kernel.md §7, §9.
 */
import type { IpVersion } from '../../lib/netlink/address.js';
import { decodeEntry, dumpByMarkMessage, flushByMarkMessage, type ConntrackEntry } from '../../lib/netlink/conntrack.js';
import type { NetlinkSocket } from '../../lib/netlink/socket.js';

/**
 * Deletes every entry of `family` whose mark matches `mark` under `mask`. One request per family: the
 * kernel's filtered flush has no "any family" form Fish relies on (notes §13).
 */
export function flushMarked(socket: NetlinkSocket, family: IpVersion, mark: number, mask: number): void {
  socket.request((seq) => flushByMarkMessage({ seq, family, mark, mask }));
}

/** The entries of `family` whose mark matches `mark` under `mask`, filtered in the kernel. */
export function dumpMarked(socket: NetlinkSocket, family: IpVersion, mark: number, mask: number): ConntrackEntry[] {
  return socket.dump((seq) => dumpByMarkMessage({ seq, family, mark, mask })).map(decodeEntry);
}

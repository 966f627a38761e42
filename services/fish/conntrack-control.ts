/**
 * Fish's conntrack operations from the control plane, over a NETLINK_NETFILTER socket: flush entries by
 * mark (a registration ended, or a cleanup after a crash) and dump them (a cold start rebuilds its mappings
 * from the entries' labels). Messages come from lib/netlink/conntrack.ts; notes/fish-kernel.md §7, §9.
 */
import type { FishBinding } from '../../lib/native.js';
import type { IpVersion } from '../../lib/netlink/address.js';
import {
  CT_DESTROY_GROUP,
  CT_NEW_GROUP,
  NETLINK_NETFILTER,
  decodeEntry,
  dumpAllMessage,
  dumpByMarkMessage,
  flushByMarkMessage,
  getByTupleMessage,
  type ConntrackEntry,
} from '../../lib/netlink/conntrack.js';
import { isNetlinkError } from '../../lib/netlink/message.js';
import { NetlinkSocket, type NetlinkBinding } from '../../lib/netlink/socket.js';
import type { SliceGuardIo } from './slice-guard.js';

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

/**
 * Every entry of `family`, unfiltered (the slice guard looks for entries that are not Fish's). Its cost grows
 * with the host's conntrack table, so callers rate-limit it.
 */
export function dumpAll(socket: NetlinkSocket, family: IpVersion): ConntrackEntry[] {
  return socket.dump((seq) => dumpAllMessage({ seq, family })).map(decodeEntry);
}

/** The event socket's receive buffer: notes §7 (4 MB, SO_RCVBUFFORCE; ENOBUFS ⇒ resync by dump). */
export const GUARD_EVENT_BUFFER = 4 * 1024 * 1024;

/**
 * The slice guard's conntrack access: an event socket subscribed to NEW and DESTROY, and a request socket of
 * its own for dumps and lookups (a request on the event socket would read past, and so lose, queued events).
 */
export function conntrackGuardIo(binding: NetlinkBinding & Pick<FishBinding, 'netlinkReceive' | 'netlinkSetReceiveBuffer'>): SliceGuardIo {
  let requests: NetlinkSocket | null = null;
  const socket = () => (requests ??= new NetlinkSocket(binding, NETLINK_NETFILTER));
  return {
    openEvents() {
      const fd = binding.netlinkOpen(NETLINK_NETFILTER, CT_NEW_GROUP | CT_DESTROY_GROUP);
      try {
        binding.netlinkSetReceiveBuffer(fd, GUARD_EVENT_BUFFER);
      } catch (error) {
        binding.close(fd);
        throw error;
      }
      return fd;
    },
    receive: (fd, max) => binding.netlinkReceive(fd, max),
    closeEvents: (fd) => binding.close(fd),
    dump: (family) => dumpAll(socket(), family),
    lookup(tuple) {
      try {
        const [answer] = socket().request((seq) => getByTupleMessage({ seq, tuple }));
        return answer ? decodeEntry(answer) : null;
      } catch (error) {
        if (isNetlinkError(error, 'ENOENT')) return null;
        throw error;
      }
    },
    close() {
      requests?.close();
      requests = null;
    },
  };
}

/**
 * The child process of test/integration/fish-host-network.test.ts, started with
 * `ip netns exec <ns> node --import tsx test/helpers/fish-host-child.ts '<HostNetworkOptions JSON>'`, so its
 * netlink sockets, its tun and its `nft` all act in the test's namespace and never in the machine's own.
 *
 * Reads one JSON command per stdin line and answers each with one JSON line on stdout:
 * `{"ok":true,"result":...}` or `{"ok":false,"error":{"message","code","errno","syscall"}}`.
 */
import readline from 'node:readline';
import type { IpVersion } from '../../lib/netlink/address.js';
import { NETLINK_NETFILTER, reserveMessage, type Reservation } from '../../lib/netlink/conntrack.js';
import { NetlinkSocket } from '../../lib/netlink/socket.js';
import { loadNative, type PersistentTun } from '../../lib/native.js';
import { dumpMarked, flushMarked } from '../../services/fish/conntrack-control.js';
import { HostNetwork, type EgressRange, type HostNetworkOptions } from '../../services/fish/host-network.js';

const binding = loadNative();
const options = JSON.parse(process.argv[2] ?? '{}') as HostNetworkOptions & { tunName?: string };
const host = new HostNetwork(binding, options);
let tun: PersistentTun | null = null;

type Command =
  | { op: 'openTun' }
  | { op: 'checkForwarding'; ipv6: boolean }
  | { op: 'installConntrackTable' }
  | { op: 'bringUpTun'; mtu: number }
  | { op: 'ensureRoutes'; table: number }
  | { op: 'setRanges'; ranges: EgressRange[] }
  | { op: 'uninstall' }
  | { op: 'cleanup'; table?: number; tunName?: string }
  | { op: 'ctFlush' | 'ctDump'; family: IpVersion; mark: number; mask: number }
  | { op: 'ctReserve'; reservation: Omit<Reservation, 'seq' | 'labels'> & { labels: string | null } }
  | { op: 'raw'; protocol: number; message: string; timeoutMs: number }
  | { op: 'exit' };

function execute(command: Command): unknown {
  switch (command.op) {
    case 'openTun':
      tun = binding.openPersistentTun(options.tunName ?? 'fish0');
      return tun;
    case 'checkForwarding':
      return host.checkForwarding({ ipv6: command.ipv6 });
    case 'installConntrackTable':
      return host.installConntrackTable();
    case 'bringUpTun':
      return host.bringUpTun(tun!.ifindex, command.mtu);
    case 'ensureRoutes':
      return host.ensureRoutes(command.table, tun!.ifindex);
    case 'setRanges':
      return host.setRanges(command.ranges);
    case 'uninstall': {
      const fd = tun?.fd;
      host.uninstall(
        fd === undefined
          ? undefined
          : () => {
              binding.unpersistTun(fd);
              binding.close(fd);
              tun = null;
            },
      );
      return null;
    }
    case 'cleanup': {
      const cleanup: Parameters<typeof HostNetwork.cleanup>[1] = {};
      if (command.table !== undefined) cleanup.table = command.table;
      if (command.tunName !== undefined) cleanup.tunName = command.tunName;
      return HostNetwork.cleanup(binding, cleanup);
    }
    case 'ctFlush':
    case 'ctDump': {
      const socket = new NetlinkSocket(binding, NETLINK_NETFILTER);
      try {
        if (command.op === 'ctFlush') return flushMarked(socket, command.family, command.mark, command.mask);
        return dumpMarked(socket, command.family, command.mark, command.mask).map((entry) => ({
          ...entry,
          labels: entry.labels?.toString('hex') ?? null,
        }));
      } finally {
        socket.close();
      }
    }
    case 'ctReserve': {
      // The exclusive create the native pump sends for a new flow, built by the TypeScript encoder.
      const socket = new NetlinkSocket(binding, NETLINK_NETFILTER);
      try {
        const { labels, ...rest } = command.reservation;
        return socket.request((seq) => reserveMessage({ ...rest, seq, labels: labels === null ? null : Buffer.from(labels, 'hex') }));
      } finally {
        socket.close();
      }
    }
    case 'raw': {
      // The addon's request/reply loop on its own, for its error paths.
      const fd = binding.netlinkOpen(command.protocol, 0);
      try {
        return binding.netlinkRequest(fd, Buffer.from(command.message, 'hex'), command.timeoutMs).map((reply) => reply.toString('hex'));
      } finally {
        binding.close(fd);
      }
    }
    case 'exit':
      process.exit(0);
  }
}

const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  let answer: unknown;
  try {
    answer = { ok: true, result: execute(JSON.parse(line) as Command) ?? null };
  } catch (error) {
    const e = error as Error & { code?: string; errno?: number; syscall?: string };
    answer = { ok: false, error: { message: e.message, code: e.code, errno: e.errno, syscall: e.syscall } };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
});
lines.on('close', () => process.exit(0));
process.stdout.write(`${JSON.stringify({ ok: true, result: 'ready' })}\n`);

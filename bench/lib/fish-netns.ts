/**
 * Namespaces of the Fish benchmark (bench/fish.ts): the topology of notes/fish-kernel.md §10 without the
 * client namespace, plus what the kernel-NAT baseline and the packet generators need. Built per run, with
 * unique names, and torn down through a {@link Cleanups} stack (also at exit and on SIGINT/SIGTERM).
 *
 *   host fbH-<pid>-<n>                                      origin fbO-<pid>-<n>
 *   forwarding, rp_filter=1                                 198.51.100.2/24 on o-h, default via the host
 *   h-o 198.51.100.1/24 ═════════════ veth ═════════════    o-h; nft: udp dport 9000 from o-h counted, dropped
 *   fish:   Fish's fish0 and rules (Fish makes them)        ogen0: tun the return generator writes replies into
 *   kernel: ctun0 (tun, 100.64.0.0/24 routed to it),        (accept_local, forwarding: the replies leave from
 *           nft SNAT of 100.64.0.0/24 to E:40000-40999      198.51.100.2:9000 as if the origin's sockets sent them)
 *
 * No client namespace: the generator writes the client's raw IP packets straight into the registration's
 * SOCK_SEQPACKET socket (Fish), or into ctun0 in the host (kernel), so both systems start from the same
 * "a client packet appears in the host" and differ only in how it is translated. Nothing is configured in
 * the namespace the benchmark runs in: every `ip`, `sysctl` and `nft` runs inside a namespace made here.
 */
import { execFileSync } from 'node:child_process';
import type { NativeBinding } from '../../lib/native.js';
import { addNamespace, type Cleanups } from './bumblebee-netns.js';

/** Addresses of the topology (notes/fish-kernel.md §10). */
export const FISH_BENCH = {
  client: '100.64.0.2',
  host: '198.51.100.1',
  origin: '198.51.100.2',
  egress: '203.0.113.7',
  ports: [40000, 40999] as [number, number],
  originPort: 9000,
  /** Client source ports: clientPortBase + flow index. */
  clientPortBase: 20000,
} as const;

/** A built topology. */
export interface FishBenchTopology {
  host: string;
  origin: string;
  /** Tun in the origin namespace: packets written here leave the origin towards the host. */
  originTunFd: number;
  /** Kernel baseline only: the host's tun standing in for the client (write = client packet, read = reply). */
  clientTunFd: number | null;
}

let serial = 0;

/** Runs a command with a deadline; returns stdout, throws with stderr. */
export function run(command: string, args: string[]): string {
  return execFileSync(command, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 20_000 });
}

/** Runs a command inside namespace `name` (sysctl and nft must: their state is per namespace). */
export const execIn = (name: string, ...args: string[]): string => run('ip', ['netns', 'exec', name, ...args]);
const ipIn = (name: string, ...args: string[]): string => run('ip', ['-n', name, ...args]);

/** A namespace with its removal registered, and its loopback up. */
function addNamespaceWithLoopback(cleanups: Cleanups, name: string): void {
  addNamespace(cleanups, name);
  ipIn(name, 'link', 'set', 'lo', 'up');
}

/** Opens a tun made in a namespace; its fd is closed at cleanup (before the namespace goes). */
function openTun(cleanups: Cleanups, binding: NativeBinding, namespace: string, name: string): number {
  ipIn(namespace, 'tuntap', 'add', 'dev', name, 'mode', 'tun');
  // The queue Fish gives fish0 by default (--tx-queue-length 10,000): neither system gets a deeper buffer
  // against a descheduled reader than the other.
  ipIn(namespace, 'link', 'set', name, 'up', 'txqueuelen', '10000');
  const fd = binding.openTunInNamespace(`/run/netns/${namespace}`, name);
  cleanups.add(`tun ${name} fd ${fd}`, () => binding.closeAll([fd]));
  return fd;
}

/**
 * Builds the host and origin namespaces for `system`. For `kernel` also ctun0 and the SNAT rule; for
 * `fish` the host is left for Fish to set up (fish0, rules, conntrack enabler), as in production.
 */
export function fishBenchTopology(cleanups: Cleanups, binding: NativeBinding, system: 'fish' | 'kernel'): FishBenchTopology {
  const id = `${process.pid}-${++serial}`;
  const host = `fbH-${id}`;
  const origin = `fbO-${id}`;
  const { egress, ports, originPort } = FISH_BENCH;
  addNamespaceWithLoopback(cleanups, host);
  addNamespaceWithLoopback(cleanups, origin);
  execIn(host, 'sysctl', '-qw', 'net.ipv4.ip_forward=1', 'net.ipv4.conf.all.rp_filter=1', 'net.ipv4.conf.default.rp_filter=1');
  // Made inside the host with its peer created straight in the origin: the machine's namespace is never touched.
  ipIn(host, 'link', 'add', 'h-o', 'type', 'veth', 'peer', 'name', 'o-h', 'netns', origin);
  ipIn(host, 'addr', 'add', `${FISH_BENCH.host}/24`, 'dev', 'h-o');
  ipIn(host, 'link', 'set', 'h-o', 'up');
  ipIn(origin, 'addr', 'add', `${FISH_BENCH.origin}/24`, 'dev', 'o-h');
  ipIn(origin, 'link', 'set', 'o-h', 'up');
  ipIn(origin, 'route', 'add', 'default', 'via', FISH_BENCH.host);
  // The egress sink: a counter and a drop at prerouting. No socket (a Node one would read every datagram on
  // the CPUs under test) and no ICMP port-unreachable going back through the system under test.
  execIn(origin, 'nft', `add table ip fbsink; add chain ip fbsink pre { type filter hook prerouting priority 0; policy accept; }; add rule ip fbsink pre iifname "o-h" udp dport ${originPort} counter drop`);
  // The return generator's tun: replies written here carry the origin's own address as their source, which
  // the origin accepts from an interface only with accept_local (and no reverse-path check), then forwards.
  execIn(origin, 'sysctl', '-qw', 'net.ipv4.ip_forward=1', 'net.ipv4.conf.all.rp_filter=0', 'net.ipv4.conf.default.rp_filter=0', 'net.ipv4.conf.all.accept_local=1', 'net.ipv4.conf.default.accept_local=1');
  const originTunFd = openTun(cleanups, binding, origin, 'ogen0');
  let clientTunFd: number | null = null;
  if (system === 'kernel') {
    clientTunFd = openTun(cleanups, binding, host, 'ctun0');
    // rp_filter=1 passes: the client's addresses are routed back out of ctun0.
    ipIn(host, 'route', 'add', '100.64.0.0/24', 'dev', 'ctun0');
    execIn(
      host,
      'nft',
      `add table ip fbnat; add chain ip fbnat post { type nat hook postrouting priority srcnat; policy accept; }; add rule ip fbnat post oifname "h-o" ip saddr 100.64.0.0/24 ip protocol udp snat to ${egress}:${ports[0]}-${ports[1]}`,
    );
  }
  return { host, origin, originTunFd, clientTunFd };
}

/**
 * A "proxy" namespace `fbP-<pid>-<n>` with nothing in it but `net.unix.max_dgram_qlen = qlen`: unix sockets
 * made in it (the registration's seqpacket pair) queue up to `qlen` messages before a sender sees EAGAIN.
 */
export function proxyNamespace(cleanups: Cleanups, qlen: number): string {
  const name = `fbP-${process.pid}-${++serial}`;
  addNamespaceWithLoopback(cleanups, name);
  execIn(name, 'sysctl', '-qw', `net.unix.max_dgram_qlen=${qlen}`);
  return name;
}

/** Packets counted (and dropped) by the origin's sink rule. */
export function originSinkPackets(topology: FishBenchTopology): number {
  const text = execIn(topology.origin, 'nft', 'list', 'chain', 'ip', 'fbsink', 'pre');
  const match = /counter packets (\d+)/.exec(text);
  if (!match) throw new Error(`no counter in the origin's sink chain: ${text}`);
  return Number(match[1]);
}

/** One interface's counters from /proc/net/dev of a namespace. */
export interface InterfaceCounters {
  rxPackets: number;
  rxDropped: number;
  txPackets: number;
  txDropped: number;
}

/** /proc/net/dev of namespace `name`, by interface. */
export function interfaceCounters(name: string): Map<string, InterfaceCounters> {
  const result = new Map<string, InterfaceCounters>();
  for (const line of execIn(name, 'cat', '/proc/net/dev').split('\n').slice(2)) {
    const [iface, rest] = line.split(':');
    if (!iface || rest === undefined) continue;
    const f = rest.trim().split(/\s+/).map(Number);
    result.set(iface.trim(), { rxPackets: f[1]!, rxDropped: f[3]!, txPackets: f[9]!, txDropped: f[11]! });
  }
  return result;
}

/**
 * Egress ports the kernel's SNAT chose, by client source port, from the host's conntrack table (UDP flows
 * of the client towards the origin's sink port).
 */
export function kernelMappedPorts(topology: FishBenchTopology): Map<number, number> {
  const text = execIn(topology.host, 'conntrack', '-L', '-p', 'udp', '-s', FISH_BENCH.client);
  const ports = new Map<number, number>();
  for (const line of text.split('\n')) {
    // original: src=C dst=O sport=c dport=9000 ... reply: src=O dst=E sport=9000 dport=e
    const match = /sport=(\d+) dport=(\d+) .*src=\S+ dst=(\S+) sport=\d+ dport=(\d+)/.exec(line);
    if (match && Number(match[2]) === FISH_BENCH.originPort && match[3] === FISH_BENCH.egress) ports.set(Number(match[1]), Number(match[4]));
  }
  return ports;
}

/**
 * The Fish test topology (notes/fish-kernel.md §10): a client namespace whose every packet goes into a tun
 * read by the native on-ramp in this process (one SOCK_SEQPACKET sink per registration), a "host"
 * namespace standing in for the root namespace where Fish runs, and an origin namespace with servers,
 * joined to the host by a veth:
 *
 *   client fishC-<pid>-<n>            host fishH-<pid>-<n>                     origin fishO-<pid>-<n>
 *   ctun0 100.64.0.2/32               h-o 198.51.100.1/24 ══════veth══════ o-h 198.51.100.2/24, .3/24
 *         fd00:64::2/128                  2001:db8:1::1/64                     2001:db8:1::2/64, ::3/64
 *   default dev ctun0                 forwarding, rp_filter=1                  default via the host
 *
 * Nothing is configured in the machine's own namespace: every `ip` and `sysctl` runs inside a namespace
 * made here (`ip netns exec`, or `ip -n`), and one teardown removes it all, whatever happened, killing
 * only the processes started here.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import type { Test } from 'tap';
import type { NativeBinding, OnRamp, OnRampStats } from '../../lib/native.js';
import { startDaemon, tempDir, type TestDaemon } from './daemon.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
let topologies = 0;

/** What addClient needs from fishTopology's closure: where namespaces to delete go, and the tracked spawner. */
interface Internals {
  namespaces: string[];
  spawner(name: string): (command: string, args: string[]) => ChildProcess;
}
const internals = new WeakMap<FishTopology, Internals>();

/** The client's addresses: every client namespace has the same ones (registrations tell them apart). */
export const CLIENT4 = '100.64.0.2';
export const CLIENT6 = 'fd00:64::2';
/** The host end of the veth, the origin's default gateway. */
export const HOST4 = '198.51.100.1';
export const HOST6 = '2001:db8:1::1';
/** The origin's two addresses per family (UDP servers bind each one). */
export const ORIGIN4 = ['198.51.100.2', '198.51.100.3'] as const;
export const ORIGIN6 = ['2001:db8:1::2', '2001:db8:1::3'] as const;
/** Egress addresses of the recipe: routed nowhere, not local anywhere (Fish's policy rules bring replies back). */
export const EGRESS4 = '203.0.113.7';
export const EGRESS6 = '2001:db8:e::7';
/** The client tun's name. */
export const CLIENT_TUN = 'ctun0';
/** Origin server ports. */
export const ORIGIN_TCP_ECHO_PORT = 7;
export const ORIGIN_HTTP_PORT = 80;
export const ORIGIN_UDP_PORTS = [9000, 9001] as const;

/** A namespace of the topology, and a way to start programs in it that the teardown kills. */
export interface FishNamespace {
  name: string;
  /** Starts `command` inside the namespace (`ip netns exec`, which execs: the pid is the program's). */
  spawn(command: string, args: string[]): ChildProcess;
}

/** A client namespace, its tun open (nonblocking once an on-ramp reads it) in this process. */
export interface FishClient extends FishNamespace {
  /** -1 when the topology was made with `openTun: false`. */
  tunFd: number;
}

/** The three namespaces (plus any extra clients) and the bookkeeping their teardown needs. */
export interface FishTopology {
  /** Unique per topology: `<pid>-<n>`, the suffix of every namespace name. */
  id: string;
  host: FishNamespace;
  origin: FishNamespace;
  /** The first client namespace. */
  client: FishClient;
  /** Every client namespace, `client` first (see {@link addClient}). */
  clients: FishClient[];
  /** Runs `fn` at teardown, before the namespaces go (last registered, first run). */
  cleanup(fn: () => void | Promise<void>): void;
  /** The pids started here that have not exited yet. */
  livePids(): number[];
  readonly binding: NativeBinding;
  readonly t: Test;
}

/** Topology settings. */
export interface FishTopologyOptions {
  /** MTU of client tuns (default 1500). */
  clientMtu?: number;
  /**
   * Open each client's tun here (default true). False leaves it closed (`tunFd` -1) for a program that
   * opens it itself, such as the example edge proxy: a single-queue tun takes one reader only.
   */
  openTun?: boolean;
}

/** Runs a command and returns its stdout; throws with its stderr on failure or after 20 s. */
function run(command: string, args: string[]): string {
  return execFileSync(command, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 20_000 });
}

/** Runs `ip` inside namespace `name`. */
const ipIn = (name: string, ...args: string[]): string => run('ip', ['-n', name, ...args]);
/** Runs any command inside namespace `name` (sysctl must run there: /proc/sys/net is per namespace). */
const execIn = (name: string, ...args: string[]): string => run('ip', ['netns', 'exec', name, ...args]);

/**
 * Builds the topology: host, origin and one client namespace, all with unique names, removed at `t`'s
 * teardown. The client's tun is opened here through `binding.openTunInNamespace`.
 */
export function fishTopology(t: Test, binding: NativeBinding, options: FishTopologyOptions = {}): FishTopology {
  const id = `${process.pid}-${++topologies}`;
  const namespaces: string[] = [];
  const cleanups: Array<() => void | Promise<void>> = [];
  const children = new Set<ChildProcess>();
  const spawner = (name: string) => (command: string, args: string[]) => {
    const child = spawn('ip', ['netns', 'exec', name, command, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    children.add(child);
    child.once('exit', () => children.delete(child));
    // A child that failed to start reports 'error', not 'exit'; either way it is not ours to kill any more.
    child.once('error', () => children.delete(child));
    return child;
  };
  const topology: FishTopology = {
    id,
    host: { name: `fishH-${id}`, spawn: spawner(`fishH-${id}`) },
    origin: { name: `fishO-${id}`, spawn: spawner(`fishO-${id}`) },
    client: undefined as unknown as FishClient,
    clients: [],
    cleanup: (fn) => cleanups.push(fn),
    livePids: () => [...children].filter((child) => child.exitCode === null && child.signalCode === null).map((child) => child.pid!),
    binding,
    t,
  };
  // One teardown for everything, in a known order: our cleanups (on-ramps before the tuns they read),
  // then our processes (by pid, waiting for each), then the namespaces. Every step runs even if one throws.
  t.teardown(async () => {
    const errors: unknown[] = [];
    for (const fn of cleanups.reverse()) {
      try {
        await fn();
      } catch (error) {
        errors.push(error);
      }
    }
    await Promise.all(
      [...children].map(async (child) => {
        if (child.exitCode !== null || child.signalCode !== null) return;
        const exited = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGKILL');
        await exited;
      }),
    );
    for (const name of namespaces.reverse()) {
      try {
        run('ip', ['netns', 'del', name]);
      } catch (error) {
        errors.push(error);
      }
    }
    // Thrown only now, after every step: tap skips the remaining (earlier-registered) teardowns on a throw.
    if (errors.length) throw errors[0];
  });
  internals.set(topology, { namespaces, spawner });
  const addNamespace = (name: string) => {
    run('ip', ['netns', 'add', name]);
    namespaces.push(name);
    ipIn(name, 'link', 'set', 'lo', 'up');
  };

  const host = topology.host.name;
  const origin = topology.origin.name;
  addNamespace(host);
  addNamespace(origin);
  execIn(host, 'sysctl', '-qw', 'net.ipv4.ip_forward=1', 'net.ipv6.conf.all.forwarding=1', 'net.ipv4.conf.all.rp_filter=1');
  // Made inside the host namespace with its peer created straight in the origin: the veth never exists in the
  // machine's own namespace, not even for a moment.
  ipIn(host, 'link', 'add', 'h-o', 'type', 'veth', 'peer', 'name', 'o-h', 'netns', origin);
  ipIn(host, 'addr', 'add', `${HOST4}/24`, 'dev', 'h-o');
  ipIn(host, '-6', 'addr', 'add', `${HOST6}/64`, 'dev', 'h-o', 'nodad');
  ipIn(host, 'link', 'set', 'h-o', 'up');
  for (const address of ORIGIN4) ipIn(origin, 'addr', 'add', `${address}/24`, 'dev', 'o-h');
  // nodad: the addresses are usable (bindable, routable) at once instead of after DAD's second or so.
  for (const address of ORIGIN6) ipIn(origin, '-6', 'addr', 'add', `${address}/64`, 'dev', 'o-h', 'nodad');
  ipIn(origin, 'link', 'set', 'o-h', 'up');
  ipIn(origin, 'route', 'add', 'default', 'via', HOST4);
  ipIn(origin, '-6', 'route', 'add', 'default', 'via', HOST6);
  topology.client = addClient(topology, options);
  return topology;
}

/**
 * Adds a client namespace `fishC-<id>-<k>` with the same addresses as the first (100.64.0.2, fd00:64::2):
 * tests of several registrations from identical clients build one per registration.
 */
export function addClient(topology: FishTopology, options: FishTopologyOptions = {}): FishClient {
  const inner = internals.get(topology);
  if (!inner) throw new Error('addClient: not a topology made by fishTopology');
  const index = topology.clients.length;
  const name = index === 0 ? `fishC-${topology.id}` : `fishC-${topology.id}-${index}`;
  run('ip', ['netns', 'add', name]);
  // Listed at once, so the teardown deletes it even if the rest of the setup fails.
  inner.namespaces.push(name);
  let tunFd = -1;
  // Runs after the cleanups of relays on this tun (registered later) and before the namespace goes.
  topology.cleanup(() => {
    if (tunFd >= 0) topology.binding.closeAll([tunFd]);
    tunFd = -1;
  });
  // No link-local address on the tun (set before it exists, so it applies to it): it would send router and
  // MLD solicitations into the on-ramp, i.e. into Fish, as if the client had.
  execIn(name, 'sysctl', '-qw', 'net.ipv6.conf.default.addr_gen_mode=1');
  ipIn(name, 'link', 'set', 'lo', 'up');
  ipIn(name, 'tuntap', 'add', 'dev', CLIENT_TUN, 'mode', 'tun');
  ipIn(name, 'addr', 'add', `${CLIENT4}/32`, 'dev', CLIENT_TUN);
  ipIn(name, '-6', 'addr', 'add', `${CLIENT6}/128`, 'dev', CLIENT_TUN, 'nodad');
  ipIn(name, 'link', 'set', CLIENT_TUN, 'up', 'mtu', String(options.clientMtu ?? 1500), 'txqueuelen', '10000');
  ipIn(name, 'route', 'add', 'default', 'dev', CLIENT_TUN);
  ipIn(name, '-6', 'route', 'add', '::/0', 'dev', CLIENT_TUN);
  if (options.openTun !== false) tunFd = topology.binding.openTunInNamespace(`/run/netns/${name}`, CLIENT_TUN);
  const client: FishClient = { name, tunFd, spawn: inner.spawner(name) };
  topology.clients.push(client);
  return client;
}

/** The origin servers, and what they have seen. */
export interface FishOrigin {
  pid: number;
  /** The file served at `http://<origin>/file`. */
  file: { path: string; size: number; sha256: string };
  /** Every connection, request and datagram logged so far: {event: 'tcp'|'http'|'udp', local, localPort, remote, remotePort}. */
  seen: Array<Record<string, unknown>>;
  /** Resolves with the first logged line (past or future) matching `predicate`; rejects after `ms`. */
  waitFor(predicate: (line: Record<string, unknown>) => boolean, ms?: number): Promise<Record<string, unknown>>;
}

/** Origin settings. */
export interface FishOriginOptions {
  /** Size of the HTTP file in MiB (default 8). */
  fileMiB?: number;
}

/**
 * Starts the origin servers (test/helpers/fish-origin.ts) in the origin namespace: TCP echo on :7, HTTP on :80
 * serving a random file whose sha256 is computed here, UDP echo on :9000 and :9001 bound to each of the four
 * origin addresses. Resolves once the servers say they are ready.
 */
export async function startOrigin(topology: FishTopology, options: FishOriginOptions = {}): Promise<FishOrigin> {
  const dir = tempDir(topology.t, 'fish-origin-');
  const filePath = path.join(dir, 'file');
  const size = Math.round((options.fileMiB ?? 8) * 1024 * 1024);
  const hash = crypto.createHash('sha256');
  const fd = fs.openSync(filePath, 'w');
  for (let written = 0; written < size; ) {
    const chunk = crypto.randomBytes(Math.min(1024 * 1024, size - written));
    fs.writeSync(fd, chunk);
    hash.update(chunk);
    written += chunk.length;
  }
  fs.closeSync(fd);
  const child = topology.origin.spawn(process.execPath, [
    '--import',
    'tsx',
    path.join(root, 'test', 'helpers', 'fish-origin.ts'),
    '--file',
    filePath,
    '--tcp-port',
    String(ORIGIN_TCP_ECHO_PORT),
    '--http-port',
    String(ORIGIN_HTTP_PORT),
    '--udp-ports',
    ORIGIN_UDP_PORTS.join(','),
    '--udp-addresses',
    [...ORIGIN4, ...ORIGIN6].join(','),
  ]);
  child.stdin!.end();
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const seen: Array<Record<string, unknown>> = [];
  const waiters = new Set<{ predicate: (line: Record<string, unknown>) => boolean; resolve: (line: Record<string, unknown>) => void }>();
  let exited = false;
  const exitWaiters = new Set<() => void>();
  child.once('exit', () => {
    exited = true;
    for (const wake of exitWaiters) wake();
  });
  let ready: (line: Record<string, unknown>) => void;
  const readyLine = new Promise<Record<string, unknown>>((resolve) => (ready = resolve));
  readline.createInterface({ input: child.stdout! }).on('line', (text) => {
    let line: Record<string, unknown>;
    try {
      line = JSON.parse(text) as Record<string, unknown>;
    } catch {
      return;
    }
    if (line.event === 'ready') {
      ready(line);
      return;
    }
    seen.push(line);
    for (const waiter of [...waiters]) {
      if (waiter.predicate(line)) {
        waiters.delete(waiter);
        waiter.resolve(line);
      }
    }
  });
  const waitFor = (predicate: (line: Record<string, unknown>) => boolean, ms = 10_000) => {
    const found = seen.find(predicate);
    if (found) return Promise.resolve(found);
    return new Promise<Record<string, unknown>>((resolve, reject) => {
      const fail = (why: string) => {
        clearTimeout(timer);
        waiters.delete(waiter);
        exitWaiters.delete(onExit);
        reject(new Error(`origin: ${why}; stderr: ${stderr.slice(-2000)}`));
      };
      const timer = setTimeout(() => fail(`no matching line within ${ms} ms`), ms);
      const onExit = () => fail('the servers exited');
      const waiter = {
        predicate,
        resolve: (line: Record<string, unknown>) => {
          clearTimeout(timer);
          exitWaiters.delete(onExit);
          resolve(line);
        },
      };
      waiters.add(waiter);
      if (exited) onExit();
      else exitWaiters.add(onExit);
    });
  };
  const started = await Promise.race([
    readyLine,
    new Promise<null>((resolve) => {
      const timer = setTimeout(() => resolve(null), 30_000);
      child.once('exit', () => {
        clearTimeout(timer);
        resolve(null);
      });
    }),
  ]);
  if (!started) throw new Error(`the origin servers did not become ready: ${stderr.slice(-2000)}`);
  return { pid: child.pid!, file: { path: filePath, size, sha256: hash.digest('hex') }, seen, waitFor };
}

/** A client's packets on one socket: what a registration hands Fish. */
export interface ClientRelay {
  /**
   * The other end of the sink pair: every packet of the client arrives on it, and every packet written
   * to it reaches the client. Send it to Fish with a registration; close it with {@link ClientRelay.closeFd}.
   */
  fd: number;
  onramp: OnRamp;
  stats(): OnRampStats;
  /** Closes `fd` here (a registration keeps its own copy); idempotent, and done at teardown otherwise. */
  closeFd(): void;
  /** Hands `fd` over (e.g. to `openSeqpacket`, which takes ownership): the relay will not close it then. */
  releaseFd(): number;
}

/** Relay settings. */
export interface ClientRelayOptions {
  /** The client namespace whose tun to read (default: the topology's first client). */
  client?: FishClient;
}

/**
 * Starts the on-ramp on a client's tun with a sink and demultiplexTcp false, so one SOCK_SEQPACKET socket
 * carries all of the client's flows. Stopped at teardown before the tun and the sink are closed.
 */
export function clientRelay(topology: FishTopology, options: ClientRelayOptions = {}): ClientRelay {
  const client = options.client ?? topology.client;
  const binding = topology.binding;
  const [ours, theirs] = binding.seqpacketPair();
  let theirsOpen = true;
  let onramp: OnRamp;
  try {
    onramp = binding.createOnRamp(client.tunFd, { closeDelayMs: 300, idleTimeoutMs: 0, sinkFd: ours, demultiplexTcp: false }, () => {});
  } catch (error) {
    binding.closeAll([ours, theirs]);
    throw error;
  }
  const closeFd = () => {
    if (!theirsOpen) return;
    theirsOpen = false;
    binding.closeAll([theirs]);
  };
  // The on-ramp stops before the sink it borrows is closed (and before the client's tun, registered earlier).
  topology.cleanup(() => {
    onramp.close();
    binding.closeAll([ours]);
    closeFd();
  });
  const releaseFd = () => {
    theirsOpen = false;
    return theirs;
  };
  return { fd: theirs, onramp, stats: () => onramp.stats(), closeFd, releaseFd };
}

/** What a program run to completion did. */
export interface RunResult {
  /** Exit code, or null when killed (at the deadline or by a signal). */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** The deadline passed and the program was killed. */
  timedOut: boolean;
}

/** Runs `command` in a namespace of the topology (any of them, despite the name) with a deadline. */
export async function runInClient(namespace: FishNamespace, command: string, args: string[], options: { timeoutMs?: number; input?: string } = {}): Promise<RunResult> {
  const child = namespace.spawn(command, args);
  child.stdin!.end(options.input ?? '');
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, options.timeoutMs ?? 30_000);
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => {
    child.once('error', () => resolve([null, null]));
    child.once('close', (exitCode, exitSignal) => resolve([exitCode, exitSignal]));
  });
  clearTimeout(timer);
  return { code, signal, stdout, stderr, timedOut };
}

/** An address as it goes in a URL or `host:port` (brackets for IPv6). */
export const hostPort = (address: string, port: number): string => (address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`);

/** What a curl download through the topology delivered. */
export interface CurlResult {
  code: number | null;
  /** Bytes received, and their sha256, computed here from curl's stdout. */
  bytes: number;
  sha256: string;
  stderr: string;
  timedOut: boolean;
}

/** Downloads `url` with curl in `namespace`, hashing what arrives; killed at the deadline. */
export async function curlIn(namespace: FishNamespace, url: string, options: { timeoutMs?: number; args?: string[] } = {}): Promise<CurlResult> {
  const timeoutMs = options.timeoutMs ?? 60_000;
  // --max-time lets curl fail by itself first (a clean exit code); the kill is the backstop.
  const child = namespace.spawn('curl', ['-sS', '-g', '--fail', '--max-time', String(Math.ceil(timeoutMs / 1000)), ...(options.args ?? []), '-o', '-', url]);
  child.stdin!.end();
  const hash = crypto.createHash('sha256');
  let bytes = 0;
  let stderr = '';
  child.stdout!.on('data', (chunk: Buffer) => {
    hash.update(chunk);
    bytes += chunk.length;
  });
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, timeoutMs + 5000);
  const code = await new Promise<number | null>((resolve) => child.once('close', (exitCode) => resolve(exitCode)));
  clearTimeout(timer);
  return { code, bytes, sha256: hash.digest('hex'), stderr, timedOut };
}

/** What ping reported. */
export interface PingResult {
  code: number | null;
  transmitted: number;
  received: number;
  output: string;
}

/** Pings `address` `count` times from `namespace` (IPv4 or IPv6 by the address), giving up after `timeoutMs`. */
export async function pingIn(namespace: FishNamespace, address: string, options: { count?: number; timeoutMs?: number } = {}): Promise<PingResult> {
  const count = options.count ?? 3;
  const deadline = Math.ceil((options.timeoutMs ?? 10_000) / 1000);
  // -w: ping's own overall deadline; it exits as soon as `count` replies are in.
  const result = await runInClient(namespace, 'ping', [address.includes(':') ? '-6' : '-4', '-c', String(count), '-i', '0.2', '-W', '2', '-w', String(deadline), address], {
    timeoutMs: deadline * 1000 + 5000,
  });
  const summary = /(\d+) packets transmitted, (\d+) received/.exec(result.stdout);
  return { code: result.code, transmitted: Number(summary?.[1] ?? 0), received: Number(summary?.[2] ?? 0), output: result.stdout + result.stderr };
}

/** What test/helpers/udp-client.ts reports. */
export interface UdpResult {
  sent: number;
  received: number;
  /** Echoes equal to what was sent. */
  matched: number;
  localAddress: string;
  localPort: number;
  /** Every `address:port` a reply came from (`[v6]:port` for IPv6). */
  from: string[];
  rttMs: number[];
}

/** Sends `count` UDP datagrams one at a time from one socket in `namespace` and checks each echo. */
export async function udpRequestIn(
  namespace: FishNamespace,
  address: string,
  port: number,
  options: { count?: number; bytes?: number; perRequestTimeoutMs?: number; localPort?: number } = {},
): Promise<UdpResult> {
  const count = options.count ?? 1;
  const perRequest = options.perRequestTimeoutMs ?? 3000;
  const args = ['--import', 'tsx', path.join(root, 'test', 'helpers', 'udp-client.ts'), '--target', hostPort(address, port), '--count', String(count)];
  args.push('--bytes', String(options.bytes ?? 64), '--timeout-ms', String(perRequest));
  if (options.localPort) args.push('--local-port', String(options.localPort));
  const result = await runInClient(namespace, process.execPath, args, { timeoutMs: count * perRequest + 15_000 });
  if (result.code !== 0) throw new Error(`udp client exited ${result.code}${result.timedOut ? ' (deadline)' : ''}: ${result.stderr.slice(-2000)}`);
  return JSON.parse(result.stdout) as UdpResult;
}

/**
 * Runs test/helpers/flow-client.ts (TCP: `echo`, `stream` or `hold` modes, see there) in `namespace` and
 * resolves with its last JSON line.
 */
export async function tcpFlowClientIn(namespace: FishNamespace, args: string[], timeoutMs = 120_000): Promise<Record<string, unknown>> {
  const result = await runInClient(namespace, process.execPath, ['--import', 'tsx', path.join(root, 'test', 'helpers', 'flow-client.ts'), ...args], { timeoutMs });
  const last = result.stdout.trim().split('\n').pop();
  if (result.code !== 0 || !last) throw new Error(`flow client ${args.join(' ')} exited ${result.code}: ${result.stderr.slice(-2000)}`);
  return JSON.parse(last) as Record<string, unknown>;
}

/** Runs a command in the host namespace (`conntrack -L`, `ip rule`, `nft list ruleset`...) and returns its stdout. */
export function hostExec(topology: FishTopology, args: string[]): string {
  const [command, ...rest] = args;
  if (!command) throw new Error('hostExec: no command');
  return execIn(topology.host.name, command, ...rest);
}

/** Starts `fdferry <service>` in the host namespace (see {@link startDaemon}); its control socket is path-named, reachable from every namespace. */
export function startDaemonInHost(
  topology: FishTopology,
  service: string,
  args: string[] = [],
  options: Omit<Parameters<typeof startDaemon>[3] & object, 'netns'> = {},
): Promise<TestDaemon> {
  return startDaemon(topology.t, service, args, { ...options, netns: topology.host.name });
}

/**
 * The harness of the Fish pump tests (fish-pump, fish-fragments): a "host" namespace with forwarding, strict
 * rp_filter, the conntrack enabler table and a tun fish0, an "origin" namespace behind a veth running the
 * test's servers, and the pump itself in a child process started in the host namespace (its conntrack socket
 * must be there, as the daemon's is), driven over a control socket. This process plays the proxy on the
 * registration sockets it gets back. Everything is torn down at the end of the test; nothing touches the
 * machine's own namespace.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Test } from 'tap';
import type { FishEvent, NativeBinding, SeqpacketSocket } from '../../lib/native.js';

const childScript = path.resolve(path.dirname(fileURLToPath(import.meta.url)), 'fish-pump-child.ts');

/** Addresses of the pump topology (notes/fish-kernel.md §10). */
export const PUMP_ADDRESSES = {
  egress4: '203.0.113.7',
  origin4: '198.51.100.2',
  client4: '100.64.0.2',
  egress6: '2001:db8:e::7',
  origin6: '2001:db8:1::2',
  client6: 'fd00:64::2',
} as const;

/** Polls `condition` until it holds or `ms` pass; never a fixed sleep. */
export async function until<T>(what: string, condition: () => T | undefined | null | false | Promise<T | undefined | null | false>, ms = 5000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Runs a command and returns its stdout; throws with its stderr. */
export const sh = (args: string[], input?: string): string => execFileSync(args[0]!, args.slice(1), { encoding: 'utf8', input, stdio: ['pipe', 'pipe', 'pipe'] });

/** The namespaces, the origin's output, and the pump process's control. */
export interface PumpHarness {
  host: string;
  origin: string;
  /** Everything the origin servers printed so far. */
  originLog(): string;
  /** The proxy's ends of the registration socket pairs the pump process holds the other ends of. */
  clientFds: number[];
  /** Calls an operation of the pump process (test/helpers/fish-pump-child.ts). */
  call<T>(op: string, arg?: unknown): Promise<T>;
  /** Events the pump reported so far. */
  events: FishEvent[];
  /** Everything the pump process printed so far. */
  childLog(): string;
  /** Kills `child` at teardown if it still runs (a tcpdump, another server). */
  track(child: ChildProcess): void;
}

/**
 * Builds the topology, starts `originCode` (a Node script printing `ready` once it serves) in the origin and
 * the pump process in the host with `registrations` socket pairs, and resolves once both are ready. The
 * caller adds routes and rules (once the tun has its reader) and registrations.
 */
export async function startPumpHarness(t: Test, native: NativeBinding, prefix: string, originCode: string, registrations = 2): Promise<PumpHarness> {
  const suffix = `${process.pid}-${Math.random().toString(36).slice(2, 6)}`;
  const host = `${prefix}H-${suffix}`;
  const origin = `${prefix}O-${suffix}`;
  const started: ChildProcess[] = [];
  t.teardown(() => {
    for (const child of started) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    for (const ns of [host, origin]) spawnSync('ip', ['netns', 'del', ns], { stdio: 'ignore' });
  });
  const { origin4, origin6 } = PUMP_ADDRESSES;
  sh(['ip', 'netns', 'add', host]);
  sh(['ip', 'netns', 'add', origin]);
  sh(['ip', '-n', host, 'link', 'add', 'h-o', 'type', 'veth', 'peer', 'name', 'o-h', 'netns', origin]);
  sh(['ip', '-n', host, 'addr', 'add', '198.51.100.1/24', 'dev', 'h-o']);
  sh(['ip', '-n', origin, 'addr', 'add', `${origin4}/24`, 'dev', 'o-h']);
  for (const [ns, dev] of [[host, 'h-o'], [origin, 'o-h'], [host, 'lo'], [origin, 'lo']] as const) sh(['ip', '-n', ns, 'link', 'set', dev, 'up']);
  sh(['ip', '-n', host, 'addr', 'add', '2001:db8:1::1/64', 'dev', 'h-o', 'nodad']);
  sh(['ip', '-n', origin, 'addr', 'add', `${origin6}/64`, 'dev', 'o-h', 'nodad']);
  sh(['ip', '-n', origin, 'route', 'add', 'default', 'via', '198.51.100.1']);
  sh(['ip', '-n', origin, '-6', 'route', 'add', 'default', 'via', '2001:db8:1::1']);
  sh(['ip', 'netns', 'exec', host, 'sysctl', '-q', '-w', 'net.ipv4.ip_forward=1', 'net.ipv4.conf.all.rp_filter=1', 'net.ipv4.conf.default.rp_filter=1', 'net.ipv6.conf.all.forwarding=1']);
  sh(['ip', 'netns', 'exec', host, 'nft', '-f', '-'], 'table inet fishct {\n  chain pre {\n    type filter hook prerouting priority -150; policy accept;\n    ct label 127 counter\n  }\n}\n');
  sh(['ip', '-n', host, 'tuntap', 'add', 'fish0', 'mode', 'tun']);

  const server = spawn('ip', ['netns', 'exec', origin, process.execPath, '-e', originCode], { stdio: ['ignore', 'pipe', 'pipe'] });
  started.push(server);
  let originLog = '';
  server.stdout!.on('data', (chunk: Buffer) => (originLog += chunk.toString()));
  server.stderr!.on('data', (chunk: Buffer) => (originLog += chunk.toString()));
  await until('the origin servers', () => originLog.includes('ready'));

  // The pump process gets the control socket as fd 3 and the registrations' ends as fds 4, 5, ...
  const [controlMine, controlTheirs] = native.seqpacketPair();
  const pairs = Array.from({ length: registrations }, () => native.seqpacketPair());
  const child = spawn('ip', ['netns', 'exec', host, process.execPath, ...process.execArgv, childScript, host], {
    stdio: ['ignore', 'pipe', 'pipe', controlTheirs, ...pairs.map(([, theirs]) => theirs)],
  });
  started.push(child);
  native.closeAll([controlTheirs, ...pairs.map(([, theirs]) => theirs)]);
  let childLog = '';
  child.stdout!.on('data', (chunk: Buffer) => (childLog += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (childLog += chunk.toString()));

  const events: FishEvent[] = [];
  const pending = new Map<number, { resolve: (value: unknown) => void; reject: (error: Error) => void }>();
  let ready = false;
  let nextId = 1;
  const control: SeqpacketSocket = native.openSeqpacket(controlMine, {
    message: (data) => {
      const message = JSON.parse(data.toString()) as { id?: number; result?: unknown; error?: { code: string | null; message: string }; events?: FishEvent[]; ready?: boolean };
      if (message.ready) ready = true;
      if (message.events) events.push(...message.events);
      if (message.id !== undefined) {
        const waiter = pending.get(message.id);
        pending.delete(message.id);
        if (message.error) waiter?.reject(Object.assign(new Error(message.error.message), { code: message.error.code }));
        else waiter?.resolve(message.result);
      }
    },
    drain: () => {},
    close: () => {
      for (const waiter of pending.values()) waiter.reject(new Error(`the pump process went away: ${childLog}`));
      pending.clear();
    },
  });
  t.teardown(() => control.close());
  const call = <T>(op: string, arg?: unknown): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      const id = nextId++;
      pending.set(id, { resolve: resolve as (value: unknown) => void, reject });
      control.send(Buffer.from(JSON.stringify({ id, op, arg })), []);
    });
  await until('the pump process', () => ready, 15_000).catch((error: Error) => {
    throw new Error(`${error.message}; its output: ${childLog}`);
  });
  return { host, origin, originLog: () => originLog, clientFds: pairs.map(([mine]) => mine), call, events, childLog: () => childLog, track: (extra) => started.push(extra) };
}

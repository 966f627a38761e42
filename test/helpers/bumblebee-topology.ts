/**
 * The Bumblebee test topology (notes/bumblebee-kernel.md §9): a client network namespace whose default
 * routes go into a tun that the native on-ramp demultiplexer reads in this process, one SOCK_SEQPACKET
 * pair per TCP flow handed to Bumblebee, and this process as the requester serving the accepted sockets.
 * Ordinary programs in the client namespace make the connections; nothing is configured in the
 * machine's own namespace, and everything is removed when the test ends.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import type net from 'node:net';
import type { Test } from 'tap';
import { BumblebeeClient, type UpgradedFlow } from '../../lib/client/bumblebee.js';
import type { NativeBinding, OnRamp, OnRampFlow } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
let namespaces = 0;

/** Runs `ip` and returns its output; throws with its stderr on failure. */
export function ip(...args: string[]): string {
  return execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** A client namespace with its tun open in this process. */
export interface ClientNamespace {
  name: string;
  tunFd: number;
  /** Starts `command` inside the namespace. */
  spawn(command: string, args: string[]): ChildProcess;
}

/** Addresses the client namespace uses, and destinations that exist nowhere but behind Bumblebee. */
export const CLIENT4 = '10.1.0.2';
export const CLIENT6 = 'fd00:c::2';
export const DESTINATION4 = '203.0.113.10';
export const DESTINATION6 = '2001:db8::10';

/**
 * Builds a client namespace: a persistent tun `ctun` (made with `ip`, opened here from a native
 * thread that entered the namespace), 10.1.0.2/24 and fd00:c::2/64, default routes into the tun.
 */
export function clientNamespace(t: Test, binding: NativeBinding, options: { mtu?: number } = {}): ClientNamespace {
  const name = `bbc-${process.pid}-${++namespaces}`;
  ip('netns', 'add', name);
  let tunFd = -1;
  t.teardown(() => {
    if (tunFd >= 0) binding.closeAll([tunFd]);
    ip('netns', 'del', name);
  });
  const inside = (...args: string[]) => execFileSync('ip', ['netns', 'exec', name, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  // No link-local address on the tun: it would send router and MLD solicitations into the on-ramp.
  inside('sysctl', '-qw', 'net.ipv6.conf.default.addr_gen_mode=1');
  inside('ip', 'link', 'set', 'lo', 'up');
  inside('ip', 'tuntap', 'add', 'dev', 'ctun', 'mode', 'tun');
  inside('ip', 'addr', 'add', `${CLIENT4}/24`, 'dev', 'ctun');
  inside('ip', '-6', 'addr', 'add', `${CLIENT6}/64`, 'dev', 'ctun', 'nodad');
  inside('ip', 'link', 'set', 'ctun', 'up', 'mtu', String(options.mtu ?? 1500), 'txqueuelen', '10000');
  inside('ip', 'route', 'add', 'default', 'dev', 'ctun');
  inside('ip', '-6', 'route', 'add', '::/0', 'dev', 'ctun');
  tunFd = binding.openTunInNamespace(`/run/netns/${name}`, 'ctun');
  return {
    name,
    tunFd,
    spawn: (command, args) => spawn('ip', ['netns', 'exec', name, command, ...args], { stdio: ['pipe', 'pipe', 'pipe'] }),
  };
}

/** What the on-ramp did. */
export interface OnRampHarness {
  onramp: OnRamp;
  /** Upgrades Bumblebee refused, with their codes. */
  refusals: ProtocolError[];
  upgraded: number;
}

/**
 * Reads the client namespace's tun through the native on-ramp; hands each new flow to Bumblebee and
 * gives each accepted socket to `serve`.
 */
export function startOnRamp(
  t: Test,
  binding: NativeBinding,
  client: BumblebeeClient,
  tunFd: number,
  serve: (flow: UpgradedFlow<net.Socket>, onramp: OnRampFlow) => void,
  options: { tenant?: string } = {},
): OnRampHarness {
  const harness: OnRampHarness = { onramp: undefined as unknown as OnRamp, refusals: [], upgraded: 0 };
  harness.onramp = binding.createOnRamp(tunFd, { closeDelayMs: 300, idleTimeoutMs: 0 }, (flows) => {
    for (const flow of flows) {
      client.upgrade(flow.fd, { tenant: options.tenant ?? 'test', context: { onrampFlow: flow.flowId } }).then(
        (upgraded) => {
          harness.upgraded++;
          serve(upgraded, flow);
        },
        (error: unknown) => {
          if (error instanceof ProtocolError) {
            harness.refusals.push(error);
            binding.closeAll(error.fds);
          }
        },
      );
    }
  });
  t.teardown(() => harness.onramp.close());
  return harness;
}

/** Serves an accepted socket as an echo server. */
export function echo(flow: UpgradedFlow<net.Socket>): void {
  flow.socket.on('error', () => {});
  flow.socket.pipe(flow.socket);
}

/**
 * Starts the flow client (test/helpers/flow-client.ts) inside `namespace`; `result` resolves with its last JSON
 * line. Its stdin stays open until `stop()`: a `stream --until-stdin-eof` client streams until then.
 */
export function startFlowClient(namespace: ClientNamespace, args: string[], timeoutMs = 120_000): { stop(): void; result: Promise<Record<string, unknown>> } {
  const child = namespace.spawn(process.execPath, ['--import', 'tsx', path.join(root, 'test', 'helpers', 'flow-client.ts'), ...args]);
  const result = (async () => {
    let last: Record<string, unknown> | null = null;
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    for await (const line of readline.createInterface({ input: child.stdout! })) {
      last = JSON.parse(line) as Record<string, unknown>;
    }
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    const code = await new Promise<number | null>((resolve) => (child.exitCode !== null ? resolve(child.exitCode) : child.once('exit', resolve)));
    clearTimeout(timer);
    if (code !== 0 || !last) throw new Error(`flow client ${args.join(' ')} exited ${code}: ${stderr.slice(-2000)}`);
    return last;
  })();
  return { stop: () => child.stdin!.end(), result };
}

/** Runs the flow client inside `namespace` and resolves with its last JSON line. */
export function runFlowClient(namespace: ClientNamespace, args: string[], timeoutMs = 120_000): Promise<Record<string, unknown>> {
  const client = startFlowClient(namespace, args, timeoutMs);
  client.stop();
  return client.result;
}

/** A long-running flow client in `hold` mode: open connections, ping them on demand, close at the end. */
export class HeldFlows {
  readonly #child: ChildProcess;
  readonly #lines: AsyncIterator<string>;

  constructor(t: Test, namespace: ClientNamespace, args: string[]) {
    this.#child = namespace.spawn(process.execPath, ['--import', 'tsx', path.join(root, 'test', 'helpers', 'flow-client.ts'), 'hold', ...args]);
    this.#lines = readline.createInterface({ input: this.#child.stdout! })[Symbol.asyncIterator]();
    t.teardown(() => {
      if (this.#child.exitCode === null) this.#child.kill('SIGKILL');
    });
  }

  async #next(): Promise<Record<string, unknown>> {
    const line = await this.#lines.next();
    if (line.done) throw new Error('the held-flows client exited');
    return JSON.parse(line.value) as Record<string, unknown>;
  }

  /** Resolves once every connection is open. */
  ready(): Promise<Record<string, unknown>> {
    return this.#next();
  }

  /** Echoes 16 bytes on every connection. */
  ping(): Promise<Record<string, unknown>> {
    this.#child.stdin!.write('ping\n');
    return this.#next();
  }

  /** Closes every connection and resolves with the totals. */
  close(): Promise<Record<string, unknown>> {
    this.#child.stdin!.end();
    return this.#next();
  }
}

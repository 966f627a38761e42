/**
 * Network namespaces and in-namespace processes of the Bumblebee benchmark, always cleaned up.
 *
 * Every namespace, process and on-ramp made here registers a cleanup. Cleanups run in reverse order when
 * the run that made them ends (`Cleanups.run()`), and — synchronously — when the benchmark process exits
 * for any reason (SIGINT and SIGTERM included: bench/lib/process.ts turns them into process.exit). Processes
 * are killed by the pid we started; namespaces are removed with `ip netns del`. Nothing is ever configured
 * in the namespace the benchmark runs in: veth pairs are created inside the client namespace with their
 * peer moved straight into the server namespace.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import type { Test } from 'tap';
import { clientNamespace, ip, type ClientNamespace } from '../../test/helpers/bumblebee-topology.js';
import type { NativeBinding } from '../../lib/native.js';
import { TSX_EXEC_ARGV, projectRoot } from './process.js';

/** A stack of cleanups; each runs at most once, the last registered first. */
export class Cleanups {
  readonly #stack: Array<{ what: string; fn: () => void | Promise<void>; atExit?: () => void }> = [];

  /** `atExit`: what to do instead when the process is exiting and nothing can be awaited. */
  add(what: string, fn: () => void | Promise<void>, atExit?: () => void): void {
    this.#stack.push({ what, fn, ...(atExit ? { atExit } : {}) });
  }

  /** Runs every cleanup (async ones awaited), last first; failures are reported, not thrown. */
  async run(report: (line: string) => void = () => {}): Promise<void> {
    while (this.#stack.length) {
      const { what, fn } = this.#stack.pop()!;
      try {
        await fn();
      } catch (error) {
        report(`cleanup of ${what} failed: ${(error as Error).message}`);
      }
    }
  }

  /** At exit: only synchronous work is possible. */
  runSync(): void {
    while (this.#stack.length) {
      const { fn, atExit } = this.#stack.pop()!;
      try {
        if (atExit) atExit();
        else void fn();
      } catch {
        // best effort at exit
      }
    }
  }

  /** A tap-like object whose teardown registers here (the test helpers take one). */
  asTest(): Test {
    return { teardown: (fn: () => void) => this.add('test-helper teardown', fn) } as unknown as Test;
  }
}

const live = new Set<Cleanups>();
let exitHookInstalled = false;

/** A fresh stack of cleanups, also run at process exit if the run never gets to run it. */
export function newCleanups(): Cleanups {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const cleanups of live) cleanups.runSync();
    });
    // bench/lib/process.ts installs the same once a child is spawned through it; this covers the time before.
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      process.once(signal, () => {
        if (process.listenerCount(signal) === 0) process.exit(130);
      });
    }
  }
  const cleanups = new Cleanups();
  live.add(cleanups);
  const run = cleanups.run.bind(cleanups);
  cleanups.run = async (report) => {
    await run(report);
    live.delete(cleanups);
  };
  return cleanups;
}

let serial = 0;

/** Removes a namespace if it exists (ignoring "not found"). */
function deleteNamespace(name: string): void {
  try {
    execFileSync('ip', ['netns', 'del', name], { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (error) {
    const stderr = String((error as { stderr?: Buffer }).stderr ?? '');
    if (!/No such file|Invalid argument|does not exist/i.test(stderr)) throw error;
  }
}

/** Makes namespace `name` and registers its removal first, so a failure halfway still removes it. */
export function addNamespace(cleanups: Cleanups, name: string): void {
  ip('netns', 'add', name);
  cleanups.add(`namespace ${name}`, () => deleteNamespace(name));
}

const inside = (name: string, ...args: string[]) => execFileSync('ip', ['netns', 'exec', name, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });

/** Ephemeral ports 1024-65535 in a client namespace: room for every phase's connections of a run. */
function widePortRange(name: string): void {
  inside(name, 'sysctl', '-qw', 'net.ipv4.ip_local_port_range=1024 65535');
}

/** The veth baseline: client and server namespaces joined by a veth pair (10.2.0.2/24 <-> 10.2.0.1/24). */
export interface VethTopology {
  client: string;
  server: string;
  clientAddress: string;
  serverAddress: string;
}

export const VETH_CLIENT = '10.2.0.2';
export const VETH_SERVER = '10.2.0.1';

export function vethTopology(cleanups: Cleanups): VethTopology {
  const id = `${process.pid}-${++serial}`;
  const client = `bbb-c-${id}`;
  const server = `bbb-s-${id}`;
  addNamespace(cleanups, client);
  addNamespace(cleanups, server);
  // Made inside the client namespace, the peer moved straight into the server's: the root namespace is never touched.
  ip('-n', client, 'link', 'add', 'veth0', 'type', 'veth', 'peer', 'name', 'veth0', 'netns', server);
  for (const [name, address] of [
    [client, VETH_CLIENT],
    [server, VETH_SERVER],
  ] as const) {
    ip('-n', name, 'link', 'set', 'lo', 'up');
    ip('-n', name, 'addr', 'add', `${address}/24`, 'dev', 'veth0');
    ip('-n', name, 'link', 'set', 'veth0', 'up');
  }
  widePortRange(client);
  return { client, server, clientAddress: VETH_CLIENT, serverAddress: VETH_SERVER };
}

/**
 * The Bumblebee client namespace of test/helpers/bumblebee-topology.ts (`bbc-<pid>-<n>`: tun `ctun`,
 * 10.1.0.2/24, default routes into the tun, the tun opened in this process), with the wide port range.
 */
export function bumblebeeClientNamespace(cleanups: Cleanups, binding: NativeBinding): ClientNamespace {
  const namespace = clientNamespace(cleanups.asTest(), binding);
  widePortRange(namespace.name);
  return namespace;
}

/** A process started inside a namespace, killed by its pid at cleanup. */
export interface NamespaceProcess {
  child: ChildProcess;
  pid: number;
  /** Everything it wrote to stderr (the last 64 KiB). */
  stderr(): string;
}

/**
 * Starts `node --import tsx <script> ...args` inside namespace `name` (`ip netns exec` execs node, and so
 * does taskset, so the pid is node's), pinned to `cpu` with taskset unless null (`--pin`). stdin and stdout
 * are pipes; stderr is kept.
 */
export function spawnInNamespace(cleanups: Cleanups, name: string, script: string, args: string[], cpu: string | null = null): NamespaceProcess {
  const command = ['ip', 'netns', 'exec', name, process.execPath, ...TSX_EXEC_ARGV, path.resolve(projectRoot, script), ...args];
  const [file, ...argv] = cpu === null ? command : ['taskset', '-c', cpu, ...command];
  const child = spawn(file!, argv, {
    cwd: projectRoot,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  if (child.pid === undefined) throw new Error(`could not start ${script} in ${name}`);
  const pid = child.pid;
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-65_536);
  });
  child.stdin!.on('error', () => {});
  const running = () => child.exitCode === null && child.signalCode === null;
  const signal = (name: NodeJS.Signals) => {
    try {
      process.kill(pid, name);
    } catch {
      // already gone
    }
  };
  cleanups.add(
    `pid ${pid} (${script})`,
    async () => {
      if (!running()) return;
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      signal('SIGTERM');
      const timer = setTimeout(() => signal('SIGKILL'), 2_000);
      await exited;
      clearTimeout(timer);
    },
    () => {
      if (running()) signal('SIGKILL');
    },
  );
  return { child, pid, stderr: () => stderr };
}

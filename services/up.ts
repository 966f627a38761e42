/**
 * `fdferry up`: runs every daemon that exists so far in the foreground, with their logs on stdout;
 * Ctrl-C (or SIGTERM) stops them all cleanly. It is how `npm start` tries fdferry without installing
 * anything: it configures nothing in the machine's network. Splicer and Bumblebee touch nothing there, and
 * Fish, which does configure the network it runs in (a tun, rules, an nftables table), runs inside a
 * network namespace made for it and removed afterwards, unless `--fish-netns host` asks for the host's.
 *
 * A daemon reloads by handing over to a successor that is deliberately not our child (see
 * lib/handoff/spawn.ts), so `up` follows each daemon by the pid its socket reports, not by the process it
 * started: a generation that exits 0 after a hand-over is not a failure.
 */
import { execFileSync, spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadNative } from '../lib/native.js';
import { isRunning } from '../lib/process.js';
import { RpcClient } from '../lib/rpc/client.js';

/** The daemons that exist so far, in start order. */
export const SERVICES = ['splicer', 'bumblebee', 'fish'] as const;

/** Options of {@link runUp}. */
export interface UpOptions {
  runDir: string;
  logLevel: string;
  /** `own` (default): Fish runs in a network namespace made for it; `host`: in this one. */
  fishNetns?: 'own' | 'host';
}

/**
 * Makes the namespace Fish runs in under `up`: loopback up and forwarding on, inside it only. Returns a
 * function that removes it (and with it Fish's tun, rules, table and conntrack entries).
 */
function fishNamespace(): { name: string; remove: () => void } {
  const name = `fdferry-up-${process.pid}`;
  const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  try {
    ip('netns', 'add', name);
  } catch (error) {
    const why = (error as NodeJS.ErrnoException).code === 'ENOENT' ? '`ip` (Debian package iproute2) is not installed' : String((error as { stderr?: Buffer }).stderr ?? (error as Error).message).trim();
    throw new Error(`Fish runs in a network namespace of its own under \`up\`, and it could not be made: ${why} (or pass --fish-netns host)`);
  }
  try {
    ip('-n', name, 'link', 'set', 'lo', 'up');
    execFileSync('ip', ['netns', 'exec', name, 'sysctl', '-qw', 'net.ipv4.ip_forward=1', 'net.ipv6.conf.all.forwarding=1'], { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (error) {
    ip('netns', 'del', name);
    throw error;
  }
  return {
    name,
    remove: () => {
      try {
        ip('netns', 'del', name);
      } catch (error) {
        console.error(`fdferry up: could not remove the network namespace ${name}: ${(error as Error).message}`);
      }
    },
  };
}

/** Asks a daemon for its pid (the live generation's), or null if it does not answer. */
async function livePid(socket: string): Promise<number | null> {
  const client = new RpcClient({ path: socket, owner: `up-${process.pid}`, binding: loadNative(), reconnect: false, requestTimeoutMs: 5_000 });
  try {
    await client.connect();
    return Number((await client.request('status')).result.pid);
  } catch {
    return null;
  } finally {
    client.close();
  }
}

/** Starts the daemons and resolves with an exit code once they have all stopped. */
export function runUp(options: UpOptions): Promise<number> {
  const cli = path.join(path.dirname(fileURLToPath(import.meta.url)), 'cli.js');
  const pids = new Map<string, number>();
  const sockets = new Map<string, string>();
  const checking = new Set<string>();
  let stopping = false;
  let exitCode = 0;

  const namespace = options.fishNetns === 'host' ? null : fishNamespace();
  return new Promise<number>((resolve) => {
    // A generation that is gone may have handed over: the socket names its successor.
    const follow = (service: string, gone: number) => {
      if (checking.has(service)) return;
      checking.add(service);
      void livePid(sockets.get(service)!).then((pid) => {
        checking.delete(service);
        if (pids.get(service) !== gone) return finishIfDone();
        if (pid && pid !== gone && isRunning(pid)) {
          pids.set(service, pid);
          if (stopping) process.kill(pid, 'SIGTERM');
        } else if (stopping) {
          pids.delete(service);
        } else {
          lost(service, `pid ${gone} is gone and nothing answers on its socket`);
        }
        finishIfDone();
      });
    };
    const watch = setInterval(() => {
      // Successors are not our children: their end shows only as their pid going away, and a generation that
      // was told to stop in the middle of a hand-over may leave a successor behind, which must stop too.
      for (const [service, pid] of pids) if (!isRunning(pid)) follow(service, pid);
    }, 500);
    const finishIfDone = () => {
      if (pids.size > 0 || checking.size > 0) return;
      clearInterval(watch);
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      namespace?.remove();
      resolve(exitCode);
    };
    const stopAll = (reason: string) => {
      if (stopping) return;
      stopping = true;
      console.error(`fdferry up: ${reason}; stopping ${[...pids.keys()].join(', ') || 'nothing'}`);
      // A pid that is already gone may have handed over just now: its successor is asked for and stopped too.
      for (const [service, pid] of pids) {
        if (isRunning(pid)) process.kill(pid, 'SIGTERM');
        else follow(service, pid);
      }
      finishIfDone();
    };
    const lost = (service: string, why: string) => {
      pids.delete(service);
      if (!stopping) {
        exitCode = 1;
        stopAll(`${service} stopped unexpectedly (${why})`);
      }
      finishIfDone();
    };
    const onSignal = (signal: NodeJS.Signals) => stopAll(`${signal} received`);
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);

    for (const service of SERVICES) {
      const socket = path.join(options.runDir, `${service}.sock`);
      sockets.set(service, socket);
      const args = [cli, service, '--socket', socket, '--log-level', options.logLevel];
      // `ip netns exec` execs the daemon: the pid we follow is still the daemon's own.
      const [command, commandArgs] = service === 'fish' && namespace ? ['ip', ['netns', 'exec', namespace.name, process.execPath, ...args]] : [process.execPath, args];
      // A foreground Ctrl-C reaches the whole process group; the daemons get their SIGTERM from us instead.
      const child = spawn(command as string, commandArgs as string[], { stdio: ['ignore', 'inherit', 'inherit'], detached: true });
      pids.set(service, child.pid!);
      child.on('exit', (code, signal) => {
        if (pids.get(service) !== child.pid) return;
        if (code === 0 && !stopping) {
          follow(service, child.pid!); // exit 0 while not stopping: a hand-over
          return;
        }
        if (code !== 0 && stopping) {
          exitCode = 1;
          console.error(`fdferry up: ${service} stopped with ${signal ?? `code ${code}`}`);
        }
        lost(service, signal ?? `code ${code}`);
      });
    }
    const where = namespace ? ` (fish in the network namespace ${namespace.name})` : '';
    console.error(`fdferry up: started ${SERVICES.join(', ')} with sockets in ${options.runDir}${where}; Ctrl-C stops them`);
  });
}

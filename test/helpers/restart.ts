/**
 * Helpers for hand-over tests: reloading through `fdferry ctl`, following a daemon across generations
 * (the successor's pid comes from the reload report), and streaming relays that never pause while their
 * bytes are hashed on both ends.
 */
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import type net from 'node:net';
import type { Test } from 'tap';
import { isRunning } from '../../lib/process.js';
import { cliCommand } from './daemon.js';

/** The report `fdferry ctl <service> reload --json` prints. */
export interface ReloadResult {
  exitCode: number;
  report: Record<string, unknown> & { ok: boolean; oldPid: number; newPid: number | null; failure?: { phase: string; code: string } };
}

/** Runs `fdferry ctl <service> reload --json [--fault F]` and parses its report. */
export function reload(service: string, socket: string, fault?: string): Promise<ReloadResult> {
  const { command, args } = cliCommand();
  const extra = fault ? ['--fault', fault] : [];
  return new Promise((resolve, reject) => {
    execFile(command, [...args, 'ctl', service, 'reload', '--json', '--socket', socket, ...extra], { timeout: 60_000 }, (error, stdout, stderr) => {
      const line = stdout.trim().split('\n').pop() ?? '';
      try {
        resolve({ exitCode: error ? ((error as { code?: number }).code ?? 1) : 0, report: JSON.parse(line) as ReloadResult['report'] });
      } catch {
        reject(new Error(`reload printed no report (exit ${String((error as { code?: number } | null)?.code)}): ${stdout} ${stderr}`));
      }
    });
  });
}

/** Whether a process runs (a zombie does not: successors are reaped by init, late). */
export const alive = isRunning;

/** Whether `pid` is a Splicer daemon on `socket` (a successor runs the same command line as its predecessor). */
export function isDaemonOn(pid: number, socket: string): boolean {
  try {
    const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    const cli = argv.findIndex((arg) => arg.endsWith('cli.ts') || arg.endsWith('cli.js'));
    return cli >= 0 && argv[cli + 1] === 'splicer' && argv.includes(socket);
  } catch {
    return false;
  }
}

/** Follows a daemon across hand-overs and kills the live generation at teardown. */
export class Generations {
  readonly pids: number[];
  constructor(t: Test, firstPid: number) {
    this.pids = [firstPid];
    t.teardown(() => {
      for (const pid of this.pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
    });
  }
  /** The live generation's pid. */
  get current(): number {
    return this.pids[this.pids.length - 1]!;
  }
  /** Records the successor named by a successful reload. */
  add(pid: number): void {
    this.pids.push(pid);
  }
}

/**
 * Streams random bytes from `socket` until `stop()`, then half-closes; `sent()` is the sha256 and count of
 * everything written. With `intervalMs` 0 it writes again as soon as the kernel takes the last chunk;
 * otherwise it writes one chunk per interval (load-generator pacing, so hundreds of relays do not saturate
 * a 2-core machine) and still never lets a gap open longer than that while the relay takes the bytes.
 */
export function streamForever(socket: net.Socket, pool: Buffer, chunk = 16 * 1024, intervalMs = 0) {
  const hash = crypto.createHash('sha256');
  let bytes = 0;
  let stopped = false;
  let resolveDone!: () => void;
  const done = new Promise<void>((resolve) => (resolveDone = resolve));
  const writeOne = (): boolean => {
    const offset = crypto.randomInt(0, pool.length - chunk);
    const data = pool.subarray(offset, offset + chunk);
    hash.update(data);
    bytes += data.length;
    return socket.write(data);
  };
  const finish = () => socket.end(() => resolveDone());
  const pump = () => {
    if (stopped) return finish();
    if (intervalMs > 0) {
      if (writeOne()) setTimeout(pump, intervalMs);
      else socket.once('drain', pump);
      return;
    }
    while (!stopped) {
      if (!writeOne()) {
        socket.once('drain', pump);
        return;
      }
    }
    finish();
  };
  setImmediate(pump);
  return {
    // The pump only ever waits for a timer or 'drain', and sees the flag when it comes back.
    stop: () => {
      stopped = true;
      return done;
    },
    sent: () => ({ sha256: hash.digest('hex'), bytes }),
    bytes: () => bytes,
  };
}

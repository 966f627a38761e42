/**
 * A stand-in for systemd's fd store, for crash-survival tests (no service manager runs in the test
 * environment). It implements what systemd documents (sd_notify(3), `FILE_DESCRIPTOR_STORE.md`):
 *
 * - `FDSTORE=1` keeps every fd of the message under `FDNAME=` (default `stored`), in arrival order;
 * - `FDSTOREREMOVE=1` closes and forgets every fd stored under `FDNAME=`;
 * - `FDPOLL=0` entries are kept whatever happens to their peers (the daemon stores everything so; a
 *   polled entry would be dropped on POLLHUP, which this stand-in does not emulate and refuses instead);
 * - `BARRIER=1`'s fd is closed once the message is read, and any other fd sent is closed;
 * - the next process is started with the stored fds as 3, 4, ... and `LISTEN_FDS`, `LISTEN_FDNAMES` and
 *   `LISTEN_PID` naming that very process (`sh -c 'LISTEN_PID=$$ exec ...'`, as systemd sets it after fork).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Test } from 'tap';
import { loadNative } from '../../lib/native.js';
import { cliCommand } from './daemon.js';
import { notifySocket } from './notify-socket.js';

const binding = loadNative();
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** Device, inode and access mode (O_ACCMODE from /proc/self/fdinfo) of an open fd. */
function identityOf(fd: number): string {
  const { dev, ino } = fs.fstatSync(fd);
  const flags = /^flags:\s+([0-7]+)/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))?.[1] ?? '0';
  return `${dev}:${ino}:${parseInt(flags, 8) & 3}`;
}

/** One stored fd and its name. */
export interface StoredFd {
  name: string;
  fd: number;
}

/** The fake service manager. */
export class FakeServiceManager {
  readonly stored: StoredFd[] = [];
  readonly address: string;
  /** Protocol faults this stand-in saw (a polled entry, an FDSTORE without fds...). */
  readonly faults: string[] = [];

  constructor(t: Test, dir: string) {
    const notify = notifySocket(t, dir, (message) => {
      const fields = message.fields;
      const fds = message.fds.splice(0);
      if (fields.FDSTORE === '1') {
        if (fields.FDPOLL !== '0') this.faults.push(`FDSTORE without FDPOLL=0 for ${fields.FDNAME}`);
        if (fds.length === 0) this.faults.push(`FDSTORE without fds for ${fields.FDNAME}`);
        for (const fd of fds) {
          // systemd keeps one copy of an fd stored twice (the same open file description, which it tells by
          // inode and access mode: a pipe's two ends share an inode but are two descriptions): so does this.
          const identity = identityOf(fd);
          if (this.stored.some((entry) => identityOf(entry.fd) === identity)) binding.closeAll([fd]);
          else this.stored.push({ name: fields.FDNAME ?? 'stored', fd });
        }
        return;
      }
      if (fields.FDSTOREREMOVE === '1') {
        const name = fields.FDNAME ?? 'stored';
        const gone = this.stored.filter((entry) => entry.name === name);
        binding.closeAll(gone.map((entry) => entry.fd));
        this.stored.splice(0, this.stored.length, ...this.stored.filter((entry) => entry.name !== name));
      }
      binding.closeAll(fds);
    });
    this.address = notify.address;
    t.teardown(() => binding.closeAll(this.stored.map((entry) => entry.fd)));
  }

  /** Names stored, with how many fds each. */
  names(): Map<string, number> {
    const names = new Map<string, number>();
    for (const { name } of this.stored) names.set(name, (names.get(name) ?? 0) + 1);
    return names;
  }

  /** Starts `fdferry <args>` the way systemd would, with every stored fd passed. */
  start(args: string[]): ChildProcess {
    const { command, args: base } = cliCommand();
    const fds = this.stored.map((entry) => entry.fd);
    const env: NodeJS.ProcessEnv = { ...process.env, NOTIFY_SOCKET: this.address };
    if (fds.length) {
      env.LISTEN_FDS = String(fds.length);
      env.LISTEN_FDNAMES = this.stored.map((entry) => entry.name).join(':');
    }
    const script = fds.length ? 'LISTEN_PID=$$ exec "$@"' : 'exec "$@"';
    return spawn('sh', ['-c', script, 'sh', command, ...base, ...args], {
      cwd: root,
      env,
      stdio: ['ignore', 'pipe', 'pipe', ...fds],
    });
  }
}

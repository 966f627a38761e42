/**
 * Shared plumbing for the real-addon tests (test/integration/native*.test.ts): fd accounting through /proc,
 * deadlines instead of sleeps, and a socket wrapper that records everything the addon reports.
 */
import fs from 'node:fs';
import type { NativeBinding, ReceiveFault, SeqpacketSocket } from '../../lib/native.js';

/** The fds this process has open right now (the directory fd used to list them included, consistently). */
export function openFds(): number[] {
  return fs
    .readdirSync('/proc/self/fd')
    .map(Number)
    .sort((a, b) => a - b);
}

/** The `flags:` line of /proc/self/fdinfo/<fd>, as a number (the kernel prints it in octal). */
export function fdFlags(fd: number): number {
  const text = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
  const match = /^flags:\s+([0-7]+)$/m.exec(text);
  if (!match?.[1]) throw new Error(`no flags line in fdinfo of ${fd}`);
  return parseInt(match[1], 8);
}

/** O_CLOEXEC as fdinfo shows it (02000000 octal on x86-64 and arm64). */
export const FDINFO_CLOEXEC = 0o2000000;

/** Rejects with a message naming `what` if `promise` has not settled after `ms`. */
export async function withDeadline<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Polls `condition` until it holds or `ms` pass, for state that has no event of its own (an fd closed by a
 * libuv close callback, a child's pipes). Returns whether it held.
 */
export async function eventually(condition: () => boolean, ms = 5000): Promise<boolean> {
  const end = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > end) return false;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return true;
}

/** Waits until the open fds are back to `before`; returns a description of the difference if they are not. */
export async function fdLeak(before: readonly number[], ms = 5000): Promise<string | null> {
  if (await eventually(() => openFds().length === before.length, ms)) return null;
  const now = openFds();
  const added = now.filter((fd) => !before.includes(fd));
  const removed = before.filter((fd) => !now.includes(fd));
  const describe = (fd: number): string => {
    try {
      return `${fd} -> ${fs.readlinkSync(`/proc/self/fd/${fd}`)}`;
    } catch {
      return `${fd}`;
    }
  };
  return (
    `${before.length} fds before, ${now.length} after; ` +
    `new: [${added.map(describe).join(', ')}], gone: [${removed.join(', ')}]`
  );
}

/** An append-only list whose readers can wait for it to reach a length. */
export class Inbox<T> {
  readonly items: T[] = [];
  private waiters: Array<() => void> = [];

  push(item: T): void {
    this.items.push(item);
    for (const wake of this.waiters.splice(0)) wake();
  }

  /** Resolves with the first `count` items once they have arrived; rejects after `ms`. */
  async wait(count: number, ms: number, what: string): Promise<T[]> {
    const arrived = new Promise<T[]>((resolve) => {
      const check = (): void => {
        if (this.items.length >= count) resolve(this.items.slice(0, count));
        else this.waiters.push(check);
      };
      check();
    });
    return withDeadline(arrived, ms, `${count} ${what} (have ${this.items.length})`);
  }
}

/** One message as a SeqpacketSocket reported it. */
export interface Received {
  data: Buffer;
  fds: number[];
  fault: ReceiveFault | null;
}

/** A SeqpacketSocket together with everything it has reported. */
export interface Recorded {
  socket: SeqpacketSocket;
  messages: Inbox<Received>;
  closes: Inbox<Error | null>;
  drains: Inbox<number>;
}

/**
 * Opens `fd` as a SeqpacketSocket that records its callbacks. `onMessage` runs inside the message callback
 * (after recording), for tests that act from within it.
 */
export function openRecorded(
  native: NativeBinding,
  fd: number,
  onMessage?: (message: Received, socket: SeqpacketSocket) => void,
): Recorded {
  const messages = new Inbox<Received>();
  const closes = new Inbox<Error | null>();
  const drains = new Inbox<number>();
  const socket: SeqpacketSocket = native.openSeqpacket(fd, {
    message(data, fds, fault) {
      const message = { data, fds, fault };
      messages.push(message);
      onMessage?.(message, socket);
    },
    drain() {
      drains.push(socket.queued);
    },
    close(error) {
      closes.push(error);
    },
  });
  return { socket, messages, closes, drains };
}

/** A short random suffix for socket names: tap runs test files in parallel. */
export function uniqueName(prefix: string): string {
  return `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 10)}`;
}

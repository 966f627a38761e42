/**
 * sd_notify without libsystemd: one datagram of `KEY=VALUE` lines to `$NOTIFY_SOCKET`, sent by the
 * daemon itself through the addon. When NOTIFY_SOCKET is unset every call is a successful no-op.
 *
 * See `../shared/notes/systemd-restart.md` §1: on systemd 252, a successor announces itself with
 * `MAINPID=`, then `READY=1`, then `BARRIER=1` (one fd attached; systemd closes it once it has processed
 * everything before it), so the old process never exits before systemd knows the new main pid.
 */
import net from 'node:net';
import type { NativeBinding } from '../native.js';

/** The native calls notification needs. */
export type NotifyBinding = Pick<NativeBinding, 'datagramSocket' | 'datagramSend' | 'streamPair' | 'closeAll' | 'dup'>;

/** Notifications kept waiting for room at most (each may hold duplicated fds). */
const MAX_BACKLOG = 4096;

/** How long `close` keeps trying to hand over what waits (a process about to exit). */
const CLOSE_FLUSH_MS = 500;

/** Largest datagram systemd reads (PIPE_BUF). */
const MAX_NOTIFY_BYTES = 4096;

/** Talks to the service manager, if there is one. */
export class Notifier {
  readonly #binding: NotifyBinding;
  readonly #address: string | null;
  #fd = -1;
  /**
   * Datagrams the service manager's socket had no room for (EAGAIN: a datagram socket queues only
   * net.unix.max_dgram_qlen of them), in order, each with duplicates of its fds (the originals may be
   * closed meanwhile). Everything sent after one waits behind it, so the order systemd sees is ours.
   */
  readonly #backlog: Array<{ data: Buffer; fds: number[] }> = [];
  #retry: NodeJS.Timeout | null = null;

  constructor(binding: NotifyBinding, env: NodeJS.ProcessEnv = process.env) {
    this.#binding = binding;
    const socket = env.NOTIFY_SOCKET;
    // `@name` is an abstract address: systemd writes the leading NUL as '@'.
    this.#address = socket ? (socket.startsWith('@') ? `\0${socket.slice(1)}` : socket) : null;
  }

  /** Whether a service manager listens. */
  get enabled(): boolean {
    return this.#address !== null;
  }

  /** Sends `fields` (and `fds`) in one datagram. Newlines in values are replaced: one field, one line. */
  send(fields: Record<string, string | number>, fds: number[] = []): void {
    if (!this.#address) return;
    const text = Object.entries(fields)
      .map(([key, value]) => `${key}=${String(value).replace(/\n/g, ' ')}`)
      .join('\n');
    const data = Buffer.from(text, 'utf8').subarray(0, MAX_NOTIFY_BYTES);
    if (this.#fd < 0) this.#fd = this.#binding.datagramSocket();
    if (this.#backlog.length === 0) {
      try {
        this.#binding.datagramSend(this.#fd, this.#address, data, fds);
        return;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EAGAIN') throw error;
      }
    }
    if (this.#backlog.length >= MAX_BACKLOG) throw new Error(`the service manager has not taken ${MAX_BACKLOG} notifications: dropping this one`);
    const copies: number[] = [];
    try {
      for (const fd of fds) copies.push(this.#binding.dup(fd));
    } catch (error) {
      this.#binding.closeAll(copies);
      throw error;
    }
    this.#backlog.push({ data, fds: copies });
    this.#scheduleRetry();
  }

  /** Datagrams waiting for room in the service manager's socket. */
  get pending(): number {
    return this.#backlog.length;
  }

  #scheduleRetry(): void {
    if (this.#retry) return;
    this.#retry = setTimeout(() => {
      this.#retry = null;
      this.#flush();
    }, 2);
  }

  #flush(): void {
    while (this.#backlog.length && this.#fd >= 0 && this.#address) {
      const head = this.#backlog[0]!;
      try {
        this.#binding.datagramSend(this.#fd, this.#address, head.data, head.fds);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'EAGAIN') return this.#scheduleRetry();
        // The service manager is gone (or refuses it): nothing more can be said.
      }
      this.#backlog.shift();
      this.#binding.closeAll(head.fds);
    }
  }

  /**
   * `BARRIER=1`: resolves once the service manager has processed every earlier message (it closes the fd
   * we send; we see EOF on the other end), or after `timeoutMs` (resolving false).
   */
  async barrier(timeoutMs = 5_000): Promise<boolean> {
    if (!this.#address) return true;
    const [mine, theirs] = this.#binding.streamPair();
    try {
      this.send({ BARRIER: 1 }, [theirs]);
    } finally {
      // Our copy must go, or the other end never sees EOF.
      this.#binding.closeAll([theirs]);
    }
    const socket = new net.Socket({ fd: mine, readable: true, writable: false });
    return new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => finish(false), timeoutMs);
      const finish = (done: boolean) => {
        clearTimeout(timer);
        socket.destroy();
        resolve(done);
      };
      socket.on('data', () => undefined);
      socket.once('end', () => finish(true));
      socket.once('close', () => finish(true));
      socket.once('error', () => finish(true));
    });
  }

  /**
   * Closes the sending socket, after trying for a moment to send what waits (fd store entries of the last
   * relays, a last STOPPING=1): this process is about to exit, so blocking briefly is the lesser evil.
   */
  close(): void {
    const deadline = Date.now() + CLOSE_FLUSH_MS;
    const pause = new Int32Array(new SharedArrayBuffer(4));
    for (this.#flush(); this.#backlog.length && Date.now() < deadline; this.#flush()) Atomics.wait(pause, 0, 0, 2);
    if (this.#retry) clearTimeout(this.#retry);
    this.#retry = null;
    for (const waiting of this.#backlog.splice(0)) this.#binding.closeAll(waiting.fds);
    if (this.#fd >= 0) this.#binding.closeAll([this.#fd]);
    this.#fd = -1;
  }
}

/**
 * systemd's file descriptor store (sd_notify `FDSTORE=1`): fds kept by the service manager across a crash
 * of the service and handed to its next process through `LISTEN_FDS`/`LISTEN_FDNAMES`. Every entry is
 * stored with `FDPOLL=0`: systemd would otherwise drop a socket whose peer hangs up, and a relay's sockets
 * must stay until the relay's owner has them back. Names are ≤ 255 characters without `:`.
 */
import type { NativeBinding } from '../native.js';
import type { PassedFd } from './activation.js';
import type { Notifier } from './notify.js';

/** Most fds in one notify message (SCM_MAX_FD). */
const MAX_FDS = 253;

/** The fd store of the running service. */
export class FdStore {
  readonly #notifier: Notifier;
  readonly #binding: Pick<NativeBinding, 'dup' | 'closeAll'>;
  readonly #onFailure: (error: Error) => void;
  /**
   * Messages waiting because the service manager's socket was full (EAGAIN: its queue holds a few
   * hundred datagrams), in order, each with duplicates of its fds: the originals may be closed meanwhile.
   */
  readonly #backlog: Array<{ fields: Record<string, string | number>; fds: number[] }> = [];
  #retry: NodeJS.Timeout | null = null;
  /** Messages the service manager could not take (gone, or refusing them). */
  failures = 0;

  constructor(notifier: Notifier, binding: Pick<NativeBinding, 'dup' | 'closeAll'>, onFailure: (error: Error) => void = () => {}) {
    this.#notifier = notifier;
    this.#binding = binding;
    this.#onFailure = onFailure;
  }

  /** Messages not sent yet. */
  get pending(): number {
    return this.#backlog.length;
  }

  /** A lost fd store message costs crash protection for one entry; it must never fail the request. */
  #send(fields: Record<string, string | number>, fds: number[] = []): void {
    if (this.#backlog.length === 0) {
      try {
        this.#notifier.send(fields, fds);
        return;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EAGAIN') return this.#failed(error as Error);
      }
    }
    this.#backlog.push({ fields, fds: fds.map((fd) => this.#binding.dup(fd)) });
    this.#schedule();
  }

  #schedule(): void {
    if (this.#retry) return;
    this.#retry = setTimeout(() => {
      this.#retry = null;
      this.#flush();
    }, 2);
    this.#retry.unref();
  }

  #flush(): void {
    while (this.#backlog.length) {
      const head = this.#backlog[0]!;
      try {
        this.#notifier.send(head.fields, head.fds);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'EAGAIN') return this.#schedule();
        this.#failed(error as Error);
      }
      this.#backlog.shift();
      this.#binding.closeAll(head.fds);
    }
  }

  #failed(error: Error): void {
    this.failures++;
    this.#onFailure(error);
  }

  /** Stores `fds` under `name` (the service manager keeps its own copies). */
  store(name: string, fds: readonly number[]): void {
    if (/[:\n]/.test(name) || name.length > 255) throw new Error(`fd store name "${name}" is not valid`);
    for (let offset = 0; offset < fds.length; offset += MAX_FDS) {
      this.#send({ FDSTORE: 1, FDNAME: name, FDPOLL: 0 }, fds.slice(offset, offset + MAX_FDS));
    }
  }

  /** Drops every fd stored under `name`. */
  remove(name: string): void {
    this.#send({ FDSTOREREMOVE: 1, FDNAME: name });
  }
}

/** Passed fds grouped by name, in the order they came. */
export function groupByName(passed: readonly PassedFd[]): Map<string, number[]> {
  const groups = new Map<string, number[]>();
  for (const { name, fd } of passed) {
    const group = groups.get(name);
    if (group) group.push(fd);
    else groups.set(name, [fd]);
  }
  return groups;
}

/**
 * systemd's file descriptor store (sd_notify `FDSTORE=1`): fds kept by the service manager across a crash
 * of the service and handed to its next process through `LISTEN_FDS`/`LISTEN_FDNAMES`. Every entry is
 * stored with `FDPOLL=0`: systemd would otherwise drop a socket whose peer hangs up, and a relay's sockets
 * must stay until the relay's owner has them back. Names are ≤ 255 characters without `:`.
 */
import type { PassedFd } from './activation.js';
import type { Notifier } from './notify.js';

/** Most fds in one notify message (SCM_MAX_FD). */
const MAX_FDS = 253;

/** The fd store of the running service. */
export class FdStore {
  readonly #notifier: Notifier;
  readonly #onFailure: (error: Error) => void;
  /** Messages the service manager could not take (gone, or refusing them). */
  failures = 0;

  constructor(notifier: Notifier, onFailure: (error: Error) => void = () => {}) {
    this.#notifier = notifier;
    this.#onFailure = onFailure;
  }

  /**
   * A lost fd store message costs crash protection for one entry; it must never fail the request. (A full
   * socket is not a loss: the notifier keeps the message, with its fds, until there is room.)
   */
  #send(fields: Record<string, string | number>, fds: number[] = []): void {
    try {
      this.#notifier.send(fields, fds);
    } catch (error) {
      this.failures++;
      this.#onFailure(error as Error);
    }
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

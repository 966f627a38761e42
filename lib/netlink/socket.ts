/**
 * One netlink socket of the control plane: the addon's fd, its sequence numbers, and the request/dump
 * round trips (with the retry a dump interrupted by a concurrent change needs). The binding is injected, so
 * code above it is tested with a fake that answers from memory.
 */
import { randomInt } from 'node:crypto';
import type { FishBinding } from '../native-fish.js';
import { SequenceNumbers, isNetlinkError } from './message.js';

/** The native calls a {@link NetlinkSocket} needs. */
export type NetlinkBinding = Pick<FishBinding, 'netlinkOpen' | 'netlinkRequest'> & { close(fd: number): void };

/** How long one request may wait for the kernel by default. */
export const DEFAULT_NETLINK_TIMEOUT_MS = 5_000;

/** How often a dump is repeated when the kernel reports NLM_F_DUMP_INTR before giving up. */
const DUMP_ATTEMPTS = 5;

/** A netlink socket (`NETLINK_ROUTE`, `NETLINK_NETFILTER`...) opened through the addon. */
export class NetlinkSocket {
  readonly #binding: NetlinkBinding;
  readonly #timeoutMs: number;
  // A random start: a late reply to a predecessor's request on a recycled port id cannot match ours.
  readonly #seq = new SequenceNumbers(randomInt(1, 0x7fffffff));
  #fd: number;

  /** Opens the socket (bound to `groups`, 0 for requests only). */
  constructor(binding: NetlinkBinding, protocol: number, options: { groups?: number; timeoutMs?: number } = {}) {
    this.#binding = binding;
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_NETLINK_TIMEOUT_MS;
    this.#fd = binding.netlinkOpen(protocol, options.groups ?? 0);
  }

  /** The fd, or -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  /**
   * Sends the request `build(seq)` returns and gives back its replies (ACK/DONE excluded). A netlink error
   * throws the addon's error (`code`, `errno`, `syscall: 'netlink'`).
   */
  request(build: (seq: number) => Buffer): Buffer[] {
    if (this.#fd < 0) throw Object.assign(new Error('netlink socket is closed'), { code: 'EBADF' });
    return this.#binding.netlinkRequest(this.#fd, build(this.#seq.next()), this.#timeoutMs);
  }

  /** Like {@link request}, for dumps: starts over when the kernel says the dump was interrupted (EINTR). */
  dump(build: (seq: number) => Buffer): Buffer[] {
    for (let attempt = 1; ; attempt++) {
      try {
        return this.request(build);
      } catch (error) {
        if (!isNetlinkError(error, 'EINTR') || attempt >= DUMP_ATTEMPTS) throw error;
      }
    }
  }

  /** Closes the fd; idempotent. */
  close(): void {
    const fd = this.#fd;
    this.#fd = -1;
    if (fd >= 0) this.#binding.close(fd);
  }
}

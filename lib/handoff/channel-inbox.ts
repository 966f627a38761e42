/**
 * Waiting for the next hand-over message of a given kind, with a deadline, on a {@link Channel}.
 * Both sides of a hand-over speak in `event` messages (`pid`, `hello`, `fds`, `state`, `ready`,
 * `reject`, `commit`, `done`), so each step is "send one, wait for one".
 */
import type { EventMessage } from '../protocol/codec.js';
import type { Channel } from '../rpc/channel.js';
import type { NativeBinding } from '../native.js';

/** A failed hand-over step: which phase, a stable code, and what happened. */
export class HandoffError extends Error {
  constructor(
    readonly phase: string,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'HandoffError';
  }
}

/** Queues a channel's event messages and hands them out in order to whoever waits. */
export class Inbox {
  readonly #queue: EventMessage[] = [];
  #waiter: ((message: EventMessage | null) => void) | null = null;
  #closed = false;
  #binding: Pick<NativeBinding, 'closeAll'>;

  constructor(channel: Channel, binding: Pick<NativeBinding, 'closeAll'>) {
    this.#binding = binding;
    channel.on('message', (message) => {
      if (message.type !== 'event') {
        binding.closeAll(message.fds);
        return;
      }
      if (this.#waiter) {
        const waiter = this.#waiter;
        this.#waiter = null;
        waiter(message);
      } else {
        this.#queue.push(message);
      }
    });
    channel.on('fault', (error) => binding.closeAll(error.fds));
    channel.on('close', () => {
      this.#closed = true;
      this.#waiter?.(null);
      this.#waiter = null;
    });
  }

  /** Resolves once the peer has closed the channel (every message it sent has arrived), or after `ms`. */
  closed(ms: number): Promise<boolean> {
    if (this.#closed) return Promise.resolve(true);
    return new Promise((resolve) => {
      const started = Date.now();
      const check = () => {
        if (this.#closed) resolve(true);
        else if (Date.now() - started > ms) resolve(false);
        else setTimeout(check, 5);
      };
      check();
    });
  }

  /** Whether a message of `event` is waiting in the queue (takes it if so). */
  take(event: string): EventMessage | undefined {
    const index = this.#queue.findIndex((message) => message.event === event);
    return index < 0 ? undefined : this.#queue.splice(index, 1)[0];
  }

  /**
   * Resolves with the next message, which must be one of `events`; rejects with a {@link HandoffError}
   * in `phase` on a deadline, on the peer closing, or on an unexpected message (whose fds are closed).
   */
  next(phase: string, events: readonly string[], timeoutMs: number, abort?: Promise<never>): Promise<EventMessage> {
    const take = (message: EventMessage | null): EventMessage => {
      if (!message) throw new HandoffError(phase, 'EXITED', `the other process closed the hand-over channel during ${phase}`);
      if (!events.includes(message.event)) {
        this.#binding.closeAll(message.fds);
        throw new HandoffError(phase, 'PROTOCOL', `expected ${events.join(' or ')} during ${phase}, got ${message.event}`);
      }
      return message;
    };
    const queued = this.#queue.shift();
    if (queued) return Promise.resolve(take(queued));
    if (this.#closed) return Promise.reject(new HandoffError(phase, 'EXITED', `the other process closed the hand-over channel during ${phase}`));
    const arrival = new Promise<EventMessage>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiter = null;
        reject(new HandoffError(phase, 'TIMEOUT', `no answer within ${timeoutMs} ms during ${phase}`));
      }, Math.max(0, timeoutMs));
      this.#waiter = (message) => {
        clearTimeout(timer);
        try {
          resolve(take(message));
        } catch (error) {
          reject(error);
        }
      };
    });
    return abort ? Promise.race([arrival, abort]) : arrival;
  }
}

/** Sends one hand-over event. */
export function sendEvent(channel: Channel, event: string, data: Record<string, unknown> = {}, fds: number[] = []): void {
  channel.send({ type: 'event', requestId: 0, event, id: event, data, fds });
}

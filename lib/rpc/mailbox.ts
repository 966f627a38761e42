/**
 * Results of long tasks waiting for their owner's acknowledgement (at-least-once delivery).
 *
 * An entry stays until the owner acknowledges its id, so a result survives the owner's connection
 * dying or the owner restarting. Entries are bounded in number per owner, in total and in age; an
 * entry that has to go is handed to `onExpire` (so its content can be logged) before its fds are closed.
 */

/** One kept result. `fds` belong to the mailbox until the entry is acknowledged or expires. */
export interface MailboxEntry {
  ownerKey: string;
  id: string;
  event: string;
  data: Record<string, unknown>;
  fds: number[];
  createdAt: number;
  deliveries: number;
}

/** Limits of a {@link Mailbox}. */
export interface MailboxLimits {
  /** Entries kept for one owner; the oldest goes first. */
  maxPerOwner: number;
  /** Entries kept overall. */
  maxTotal: number;
  /** Milliseconds an unacknowledged entry is kept. */
  maxAgeMs: number;
}

/** Default mailbox limits. */
export const DEFAULT_MAILBOX_LIMITS: MailboxLimits = { maxPerOwner: 10_000, maxTotal: 50_000, maxAgeMs: 10 * 60_000 };

/** Why an entry left without an acknowledgement. */
export type ExpiryReason = 'age' | 'owner-limit' | 'total-limit' | 'shutdown';

/** Per-owner FIFO of unacknowledged results. */
export class Mailbox {
  readonly #byOwner = new Map<string, Map<string, MailboxEntry>>();
  readonly #limits: MailboxLimits;
  readonly #closeFds: (fds: number[]) => void;
  readonly #onExpire: (entry: MailboxEntry, reason: ExpiryReason) => void;
  readonly #now: () => number;
  #total = 0;

  constructor(options: {
    limits?: Partial<MailboxLimits>;
    closeFds: (fds: number[]) => void;
    onExpire: (entry: MailboxEntry, reason: ExpiryReason) => void;
    now?: () => number;
  }) {
    this.#limits = { ...DEFAULT_MAILBOX_LIMITS, ...options.limits };
    this.#closeFds = options.closeFds;
    this.#onExpire = options.onExpire;
    this.#now = options.now ?? Date.now;
  }

  /** Entries kept overall. */
  get size(): number {
    return this.#total;
  }

  /** Keeps a result; an entry with the same owner and id replaces nothing and is refused (ids are unique). */
  put(entry: Omit<MailboxEntry, 'createdAt' | 'deliveries'>): MailboxEntry {
    let owned = this.#byOwner.get(entry.ownerKey);
    if (!owned) this.#byOwner.set(entry.ownerKey, (owned = new Map()));
    if (owned.has(entry.id)) throw new Error(`mailbox already holds ${entry.id} for ${entry.ownerKey}`);
    const kept: MailboxEntry = { ...entry, createdAt: this.#now(), deliveries: 0 };
    owned.set(entry.id, kept);
    this.#total++;
    if (owned.size > this.#limits.maxPerOwner) this.#expire(owned.values().next().value!, 'owner-limit');
    if (this.#total > this.#limits.maxTotal) this.#expire(this.#oldest()!, 'total-limit');
    return kept;
  }

  /** Every entry, oldest first per owner (for a hand-over). */
  entries(): MailboxEntry[] {
    return [...this.#byOwner.values()].flatMap((owned) => [...owned.values()]);
  }

  /** Removes every entry without expiring it and returns them: their fds now belong to the caller. */
  release(): MailboxEntry[] {
    const all = this.entries();
    this.#byOwner.clear();
    this.#total = 0;
    return all;
  }

  /** Puts back an entry exactly as a predecessor kept it (age and delivery count included). */
  restore(entry: MailboxEntry): void {
    let owned = this.#byOwner.get(entry.ownerKey);
    if (!owned) this.#byOwner.set(entry.ownerKey, (owned = new Map()));
    if (!owned.has(entry.id)) this.#total++;
    owned.set(entry.id, { ...entry });
  }

  /** The entries waiting for an owner, oldest first. */
  pending(ownerKey: string): MailboxEntry[] {
    return [...(this.#byOwner.get(ownerKey)?.values() ?? [])];
  }

  /** Removes an acknowledged entry and closes its fds; false for an unknown id. */
  ack(ownerKey: string, id: string): boolean {
    const entry = this.#byOwner.get(ownerKey)?.get(id);
    if (!entry) return false;
    this.#remove(entry);
    this.#closeFds(entry.fds);
    return true;
  }

  /** Expires entries older than the age limit; returns how many went. */
  sweep(): number {
    const cutoff = this.#now() - this.#limits.maxAgeMs;
    let expired = 0;
    for (const owned of [...this.#byOwner.values()]) {
      for (const entry of [...owned.values()]) {
        if (entry.createdAt > cutoff) break;
        this.#expire(entry, 'age');
        expired++;
      }
    }
    return expired;
  }

  /** Expires everything (daemon shutdown). */
  clear(reason: ExpiryReason = 'shutdown'): void {
    for (const owned of [...this.#byOwner.values()]) for (const entry of [...owned.values()]) this.#expire(entry, reason);
  }

  #oldest(): MailboxEntry | undefined {
    let oldest: MailboxEntry | undefined;
    for (const owned of this.#byOwner.values()) {
      const first = owned.values().next().value;
      if (first && (!oldest || first.createdAt < oldest.createdAt)) oldest = first;
    }
    return oldest;
  }

  #expire(entry: MailboxEntry, reason: ExpiryReason): void {
    this.#remove(entry);
    try {
      this.#onExpire(entry, reason);
    } finally {
      this.#closeFds(entry.fds);
    }
  }

  #remove(entry: MailboxEntry): void {
    const owned = this.#byOwner.get(entry.ownerKey);
    if (!owned?.delete(entry.id)) return;
    this.#total--;
    if (owned.size === 0) this.#byOwner.delete(entry.ownerKey);
  }
}

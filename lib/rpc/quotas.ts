/**
 * Per-peer quotas of a daemon's server: how many fds a uid (and an owner) may have in requests in
 * progress, how many requests per second each may send, and how many connections a uid may hold.
 * Exceeding one refuses the request with `EFDFERRY_LIMIT` (naming the limit) and its fds back; the
 * connection and everyone else carry on.
 */
import { ProtocolError } from '../protocol/errors.js';

/** Quota settings (each has a flag); 0 means "no limit". */
export interface QuotaLimits {
  maxConnectionsPerUid: number;
  maxFdsInflightPerUid: number;
  maxFdsInflightPerOwner: number;
  /** Requests per second (a token bucket holding one second's worth). */
  requestRatePerUid: number;
  requestRatePerOwner: number;
}

/** Generous defaults: they stop a runaway or hostile client, never a busy proxy. */
export const DEFAULT_QUOTAS: QuotaLimits = {
  maxConnectionsPerUid: 512,
  maxFdsInflightPerUid: 8192,
  maxFdsInflightPerOwner: 4096,
  requestRatePerUid: 50_000,
  requestRatePerOwner: 50_000,
};

/** A token bucket: `rate` tokens per second, at most `rate` banked. */
class Bucket {
  #tokens: number;
  #at: number;
  constructor(readonly rate: number, now: number) {
    this.#tokens = rate;
    this.#at = now;
  }
  take(now: number): boolean {
    this.#tokens = Math.min(this.rate, this.#tokens + (Math.max(0, now - this.#at) / 1000) * this.rate);
    this.#at = now;
    if (this.#tokens < 1) return false;
    this.#tokens -= 1;
    return true;
  }
  full(now: number): boolean {
    return this.#tokens + ((now - this.#at) / 1000) * this.rate >= this.rate;
  }
}

/** The quota books of one server. */
export class Quotas {
  readonly limits: Readonly<QuotaLimits>;
  readonly #connections = new Map<number, number>();
  readonly #fdsPerUid = new Map<number, number>();
  readonly #fdsPerOwner = new Map<string, number>();
  readonly #uidBuckets = new Map<number, Bucket>();
  readonly #ownerBuckets = new Map<string, Bucket>();
  readonly #now: () => number;

  /** `now` is monotonic (ms): a wall clock stepped back would otherwise refuse everyone for that long. */
  constructor(limits: QuotaLimits, now: () => number = () => performance.now()) {
    this.limits = limits;
    this.#now = now;
  }

  /** Whether `uid` may open one more connection (and counts it if so). */
  connect(uid: number): boolean {
    const open = this.#connections.get(uid) ?? 0;
    if (this.limits.maxConnectionsPerUid && open >= this.limits.maxConnectionsPerUid) return false;
    this.#connections.set(uid, open + 1);
    return true;
  }

  disconnect(uid: number): void {
    adjust(this.#connections, uid, -1);
  }

  /**
   * Admits one request carrying `fds` fds, or throws `EFDFERRY_LIMIT`. An admitted request must be
   * {@link settle}d exactly once.
   */
  admit(uid: number, ownerKey: string | null, fds: number): void {
    const now = this.#now();
    if (this.limits.requestRatePerUid && !bucket(this.#uidBuckets, uid, this.limits.requestRatePerUid, now).take(now)) {
      throw new ProtocolError('EFDFERRY_LIMIT', `uid ${uid} sends more than ${this.limits.requestRatePerUid} requests per second`, { limit: 'requestRatePerUid' });
    }
    if (ownerKey && this.limits.requestRatePerOwner && !bucket(this.#ownerBuckets, ownerKey, this.limits.requestRatePerOwner, now).take(now)) {
      throw new ProtocolError('EFDFERRY_LIMIT', `this owner sends more than ${this.limits.requestRatePerOwner} requests per second`, { limit: 'requestRatePerOwner' });
    }
    if (fds === 0) return;
    const uidFds = (this.#fdsPerUid.get(uid) ?? 0) + fds;
    if (this.limits.maxFdsInflightPerUid && uidFds > this.limits.maxFdsInflightPerUid) {
      throw new ProtocolError('EFDFERRY_LIMIT', `uid ${uid} has more than ${this.limits.maxFdsInflightPerUid} fds in requests in progress`, { limit: 'maxFdsInflightPerUid' });
    }
    const ownerFds = ownerKey ? (this.#fdsPerOwner.get(ownerKey) ?? 0) + fds : 0;
    if (ownerKey && this.limits.maxFdsInflightPerOwner && ownerFds > this.limits.maxFdsInflightPerOwner) {
      throw new ProtocolError('EFDFERRY_LIMIT', `this owner has more than ${this.limits.maxFdsInflightPerOwner} fds in requests in progress`, { limit: 'maxFdsInflightPerOwner' });
    }
    this.#fdsPerUid.set(uid, uidFds);
    if (ownerKey) this.#fdsPerOwner.set(ownerKey, ownerFds);
  }

  /** A request admitted with `fds` fds was answered. */
  settle(uid: number, ownerKey: string | null, fds: number): void {
    if (fds === 0) return;
    adjust(this.#fdsPerUid, uid, -fds);
    if (ownerKey) adjust(this.#fdsPerOwner, ownerKey, -fds);
  }

  /** Forgets buckets that are full again, so the books do not grow with every uid and owner ever seen. */
  sweep(): void {
    const now = this.#now();
    for (const buckets of [this.#uidBuckets, this.#ownerBuckets] as Array<Map<unknown, Bucket>>) {
      for (const [key, b] of buckets) if (b.full(now)) buckets.delete(key);
    }
  }

  /** Figures for status: fds in requests in progress per uid. */
  snapshot(): { connectionsPerUid: Record<number, number>; fdsInflightPerUid: Record<number, number> } {
    return { connectionsPerUid: Object.fromEntries(this.#connections), fdsInflightPerUid: Object.fromEntries(this.#fdsPerUid) };
  }
}

function bucket<K>(buckets: Map<K, Bucket>, key: K, rate: number, now: number): Bucket {
  let found = buckets.get(key);
  if (!found) buckets.set(key, (found = new Bucket(rate, now)));
  return found;
}

function adjust<K>(counts: Map<K, number>, key: K, delta: number): void {
  const next = (counts.get(key) ?? 0) + delta;
  if (next <= 0) counts.delete(key);
  else counts.set(key, next);
}

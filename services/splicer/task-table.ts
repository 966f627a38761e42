/**
 * Splicer's live relays: who handed each one over, and the limits on how many anyone may have.
 */
import type { PeerCredentials } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import type { RelayOptions } from '../../lib/native-splice.js';

/** One relay the daemon is running. */
export interface SpliceTask {
  /** The id clients see (unique across restarts of the daemon). */
  taskId: string;
  /** The engine's numeric id. */
  engineId: number;
  ownerKey: string;
  owner: string;
  peer: PeerCredentials;
  fdA: number;
  fdB: number;
  meta: Record<string, unknown>;
  relay: RelayOptions;
  acceptedAt: number;
}

/** Task limits; each has a flag. */
export interface TaskLimits {
  maxTasks: number;
  maxTasksPerOwner: number;
  maxTasksPerUid: number;
}

/** The live relays, indexed three ways. */
export class TaskTable {
  readonly #byEngineId = new Map<number, SpliceTask>();
  readonly #byTaskId = new Map<string, SpliceTask>();
  readonly #perOwner = new Map<string, number>();
  readonly #perUid = new Map<number, number>();
  readonly #limits: TaskLimits;

  constructor(limits: TaskLimits) {
    this.#limits = limits;
  }

  get size(): number {
    return this.#byEngineId.size;
  }

  get limits(): Readonly<TaskLimits> {
    return this.#limits;
  }

  /** Throws `EFDFERRY_LIMIT` naming the limit a new task for this owner and uid would break. */
  checkRoom(ownerKey: string, uid: number): void {
    if (this.size >= this.#limits.maxTasks) {
      throw new ProtocolError('EFDFERRY_LIMIT', `the daemon runs its maximum of ${this.#limits.maxTasks} relays`, { limit: 'maxTasks' });
    }
    if ((this.#perOwner.get(ownerKey) ?? 0) >= this.#limits.maxTasksPerOwner) {
      throw new ProtocolError('EFDFERRY_LIMIT', `this owner runs its maximum of ${this.#limits.maxTasksPerOwner} relays`, { limit: 'maxTasksPerOwner' });
    }
    if ((this.#perUid.get(uid) ?? 0) >= this.#limits.maxTasksPerUid) {
      throw new ProtocolError('EFDFERRY_LIMIT', `uid ${uid} runs its maximum of ${this.#limits.maxTasksPerUid} relays`, { limit: 'maxTasksPerUid' });
    }
  }

  add(task: SpliceTask): void {
    this.#byEngineId.set(task.engineId, task);
    this.#byTaskId.set(task.taskId, task);
    this.#perOwner.set(task.ownerKey, (this.#perOwner.get(task.ownerKey) ?? 0) + 1);
    this.#perUid.set(task.peer.uid, (this.#perUid.get(task.peer.uid) ?? 0) + 1);
  }

  byEngineId(id: number): SpliceTask | undefined {
    return this.#byEngineId.get(id);
  }

  byTaskId(id: string): SpliceTask | undefined {
    return this.#byTaskId.get(id);
  }

  remove(task: SpliceTask): void {
    if (!this.#byEngineId.delete(task.engineId)) return;
    this.#byTaskId.delete(task.taskId);
    decrement(this.#perOwner, task.ownerKey);
    decrement(this.#perUid, task.peer.uid);
  }

  all(): SpliceTask[] {
    return [...this.#byEngineId.values()];
  }
}

function decrement<K>(counts: Map<K, number>, key: K): void {
  const left = (counts.get(key) ?? 1) - 1;
  if (left === 0) counts.delete(key);
  else counts.set(key, left);
}

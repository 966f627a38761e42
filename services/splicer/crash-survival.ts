/**
 * Splicer surviving its own crash (SIGKILL, OOM) through systemd's fd store.
 *
 * While running, the service manager keeps copies of: both sockets of every relay (`r-<taskId>`, from
 * the moment the relay starts until its owner has acknowledged the envelope), every pipe of the engine's
 * persistent pool (`p-<epoch>-<n>`, stored once at start: no message per pipe borrow), the pool's owner
 * table (`pipes-<epoch>`: which relay and direction holds each pipe, written by the engine thread) and a
 * crash checkpoint (`state-<epoch>-<n>`: one record per relay started, ended with its envelope, or gone).
 *
 * After a crash the next process gets all of it back through `LISTEN_FDS`: it replays the newest valid
 * checkpoint, resumes every relay on its sockets — with the bytes that were sitting in its pipes, found
 * through the owner table — and puts every envelope not yet acknowledged back in its owner's mailbox.
 *
 * What a crash still loses: bytes in user space (a preface not yet sent, a copy-mode relay's buffer), the
 * byte counts before the crash (a recovered relay's envelope counts from the recovery), and a relay started or ended in the instant before the crash whose record or fds had not
 * reached the service manager yet.
 */
import fs from 'node:fs';
import type { Logger } from 'pino';
import type { NativeBinding, PausedRelay, PipeTable, RelayOptions } from '../../lib/native.js';
import type { PassedFd } from '../../lib/systemd/activation.js';
import { Checkpoint, readCheckpoint } from '../../lib/systemd/checkpoint.js';
import { groupByName, type FdStore } from '../../lib/systemd/fd-store.js';
import { fdKindMismatch } from '../../lib/protocol/fd-kinds.js';
import type { SpliceTask } from './task-table.js';

/** A relay started. */
interface AddRecord {
  op: 'add';
  taskId: string;
  engineId: number;
  ownerKey: string;
  owner: string;
  peer: { pid: number; uid: number; gid: number };
  meta: Record<string, unknown>;
  options: Pick<RelayOptions, 'idleTimeoutMs' | 'maxDurationMs' | 'maxBytesAToB' | 'maxBytesBToA'>;
  acceptedAt: number;
}

/** A relay ended; its envelope waits for its owner (its sockets are still stored). */
interface EndRecord {
  op: 'end';
  taskId: string;
  ownerKey: string;
  envelope: Record<string, unknown>;
}

/** An envelope was acknowledged or expired: nothing of the relay is kept any more. */
interface GoneRecord {
  op: 'gone';
  taskId: string;
}

type CrashRecord = AddRecord | EndRecord | GoneRecord;

/** What a successor carries over from its predecessor's fd store bookkeeping. */
export interface CrashSurvivalExport {
  /** Names the predecessor stored for its own engine (pool, table, checkpoint): the successor drops them. */
  names: string[];
  ended: EndRecord[];
}

/** A relay rebuilt after a crash, ready for `engine.resume`. */
export interface RecoveredRelay {
  task: SpliceTask;
  paused: PausedRelay;
}

/** An envelope rebuilt after a crash, for its owner's mailbox. */
export interface RecoveredEnvelope {
  taskId: string;
  ownerKey: string;
  envelope: Record<string, unknown>;
  fds: [number, number];
}

/** Pipes stored per fd store message: 2 fds each, within the 253 fds a message carries. */
const PIPES_PER_GROUP = 126;

/** Compact the checkpoint when it has grown past this and holds mostly history. */
const COMPACT_BYTES = 4 << 20;

const relayName = (taskId: string) => `r-${taskId}`;

/** The running process's side: keeps the fd store and the checkpoint current. */
export class CrashSurvival {
  readonly #binding: NativeBinding;
  readonly #store: FdStore;
  readonly #log: Logger;
  readonly #epoch: string;
  readonly #live = new Map<string, AddRecord>();
  readonly #ended = new Map<string, EndRecord>();
  #checkpoint!: Checkpoint;
  #checkpointName = '';
  #compactions = 0;
  #names: string[] = [];

  constructor(binding: NativeBinding, store: FdStore, log: Logger, epoch: string) {
    this.#binding = binding;
    this.#store = store;
    this.#log = log;
    this.#epoch = epoch;
  }

  /**
   * Stores the engine's pipe pool and table and a first checkpoint holding `live` relays and `ended`
   * envelopes (after a recovery or a hand-over); from here on every change is recorded.
   */
  begin(pool: PipeTable, live: readonly SpliceTask[], ended: readonly EndRecord[], storeRelays = false): void {
    // A successor stores its relays' sockets again: a store message its predecessor still had queued when it
    // exited would otherwise be lost (systemd keeps one copy of an fd stored twice).
    if (storeRelays) for (const task of live) this.#store.store(relayName(task.taskId), [task.fdA, task.fdB]);
    // Pipes go in groups (one message each, not one per pipe): group k holds pipes k*126 to k*126+125, in order.
    const names: string[] = [];
    const ordered = [...pool.pipes].sort((a, b) => a.index - b.index);
    for (let group = 0; group * PIPES_PER_GROUP < ordered.length; group++) {
      const members = ordered.slice(group * PIPES_PER_GROUP, (group + 1) * PIPES_PER_GROUP);
      const name = `p-${this.#epoch}-${group}`;
      this.#store.store(name, members.flatMap((pipe) => pipe.fds));
      names.push(name);
    }
    this.#store.store(`pipes-${this.#epoch}`, [pool.tableFd]);
    this.#names = [...names, `pipes-${this.#epoch}`];
    for (const task of live) this.#live.set(task.taskId, addRecord(task));
    for (const record of ended) this.#ended.set(record.taskId, record);
    this.#writeCheckpoint();
    this.#log.info({ pipes: pool.pipes.length, relays: live.length, envelopes: ended.length }, 'crash survival: pipes, relays and checkpoint are in the service manager\'s fd store');
  }

  /** A relay started: its sockets and its record. */
  taskStarted(task: SpliceTask): void {
    this.#store.store(relayName(task.taskId), [task.fdA, task.fdB]);
    const record = addRecord(task);
    this.#live.set(task.taskId, record);
    this.#checkpoint.append(record);
  }

  /** A relay ended: its envelope is recorded; its sockets stay stored until the owner has them. */
  taskEnded(taskId: string, ownerKey: string, envelope: Record<string, unknown>): void {
    if (!this.#live.delete(taskId)) return;
    const record: EndRecord = { op: 'end', taskId, ownerKey, envelope };
    this.#ended.set(taskId, record);
    this.#checkpoint.append(record);
  }

  /** The owner acknowledged the envelope (or it expired): the service manager lets go of the sockets. */
  resultGone(taskId: string): void {
    if (!this.#ended.delete(taskId) && !this.#live.delete(taskId)) return;
    this.#store.remove(relayName(taskId));
    this.#checkpoint.append({ op: 'gone', taskId } satisfies GoneRecord);
    if (this.#checkpoint.size > COMPACT_BYTES && this.#checkpoint.size > 4 * 512 * (this.#live.size + this.#ended.size)) this.#writeCheckpoint();
  }

  /** For a successor: the names to drop and the envelopes still waiting. */
  export(): CrashSurvivalExport {
    return { names: [...this.#names, this.#checkpointName], ended: [...this.#ended.values()] };
  }

  /** Drops a predecessor's (or a crashed process's) pool, table and checkpoint from the store. */
  forget(names: readonly string[]): void {
    for (const name of names) this.#store.remove(name);
  }

  /**
   * Writes a fresh checkpoint of what is live, stores it, then drops the old one: at every instant the
   * store holds at least one complete checkpoint (recovery takes the newest valid one).
   */
  #writeCheckpoint(): void {
    const previous = this.#checkpoint;
    const previousName = this.#checkpointName;
    const checkpoint = Checkpoint.create(this.#binding, this.#epoch);
    for (const record of this.#live.values()) checkpoint.append(record);
    for (const record of this.#ended.values()) checkpoint.append(record);
    this.#checkpointName = `state-${this.#epoch}-${++this.#compactions}`;
    this.#store.store(this.#checkpointName, [checkpoint.fd]);
    this.#checkpoint = checkpoint;
    if (previous) {
      this.#store.remove(previousName);
      this.#binding.closeAll([previous.fd]);
    }
  }
}

function addRecord(task: SpliceTask): AddRecord {
  return {
    op: 'add',
    taskId: task.taskId,
    engineId: task.engineId,
    ownerKey: task.ownerKey,
    owner: task.owner,
    peer: { ...task.peer },
    meta: task.meta,
    options: {
      idleTimeoutMs: task.relay.idleTimeoutMs,
      maxDurationMs: task.relay.maxDurationMs,
      maxBytesAToB: task.relay.maxBytesAToB,
      maxBytesBToA: task.relay.maxBytesBToA,
    },
    acceptedAt: task.acceptedAt,
  };
}

/** What a recovery found. */
export interface Recovery {
  relays: RecoveredRelay[];
  envelopes: RecoveredEnvelope[];
  /** Names of the crashed process's pool, tables and checkpoints, to drop once the new ones are stored. */
  staleNames: string[];
  /** The highest engine id seen (new relays must number above it). */
  maxEngineId: number;
  /** Bytes found in pipes and handed back to their relays. */
  bytesInPipes: number;
}

/**
 * Rebuilds relays and envelopes from what the fd store kept. Every fd is checked; whatever is not used
 * is closed. Returns null when the passed fds hold no checkpoint (nothing to recover).
 */
export function recover(binding: NativeBinding, log: Logger, passed: readonly PassedFd[]): Recovery | null {
  const groups = groupByName(passed);
  const used = new Set<number>();
  // The newest complete checkpoint wins: a compaction stores the new one before dropping the old.
  let newest: { name: string; createdAt: number; records: CrashRecord[] } | null = null;
  for (const [name, fds] of groups) {
    if (!name.startsWith('state-')) continue;
    for (const fd of fds) {
      const contents = readCheckpoint(fd);
      if (!contents) {
        log.warn({ name }, 'crash recovery: a stored checkpoint is not one (ignored)');
        continue;
      }
      if (contents.torn) log.warn({ name, torn: contents.torn, records: contents.records.length }, 'crash recovery: the checkpoint ends in a torn record; everything before it is used');
      if (!newest || contents.createdAt > newest.createdAt) newest = { name, createdAt: contents.createdAt, records: contents.records as CrashRecord[] };
    }
  }
  if (!newest) {
    binding.closeAll(passed.map((p) => p.fd));
    return null;
  }
  const live = new Map<string, AddRecord>();
  const ended = new Map<string, EndRecord>();
  for (const record of newest.records) {
    if (record.op === 'add') live.set(record.taskId, record);
    else if (record.op === 'end') {
      live.delete(record.taskId);
      ended.set(record.taskId, record);
    } else if (record.op === 'gone') {
      live.delete(record.taskId);
      ended.delete(record.taskId);
    }
  }
  // Which pipe holds bytes for which relay: every stored owner table, with its epoch's pipes.
  const pipes = new Map<string, { fds: [number, number]; bytes: number }>();
  let bytesInPipes = 0;
  for (const [name, fds] of groups) {
    if (!name.startsWith('pipes-') || fds.length !== 1) continue;
    const epoch = name.slice('pipes-'.length);
    const table = readTable(fds[0]!);
    table.forEach((word, index) => {
      if (word === 0n) return;
      const group = groups.get(`p-${epoch}-${Math.floor(index / PIPES_PER_GROUP)}`);
      const at = (index % PIPES_PER_GROUP) * 2;
      if (!group || group.length < at + 2) return;
      const pipeFds = [group[at]!, group[at + 1]!];
      const bytes = binding.pendingBytes(pipeFds[0]!);
      if (bytes <= 0) return;
      const owner = word - 1n;
      const key = `${owner >> 1n}:${owner & 1n ? 'ba' : 'ab'}`;
      pipes.set(key, { fds: [pipeFds[0]!, pipeFds[1]!], bytes });
    });
  }
  const socketPair = (taskId: string): [number, number] | null => {
    const fds = groups.get(relayName(taskId));
    if (!fds || fds.length !== 2) return null;
    for (const fd of fds) if (fdKindMismatch('stream-socket', binding.describeFd(fd))) return null;
    return [fds[0]!, fds[1]!];
  };
  const relays: RecoveredRelay[] = [];
  let maxEngineId = 0;
  for (const record of live.values()) {
    maxEngineId = Math.max(maxEngineId, record.engineId);
    const fds = socketPair(record.taskId);
    if (!fds) {
      log.error({ taskId: record.taskId }, 'crash recovery: a relay\'s sockets were not kept (or are not sockets any more); it is lost');
      continue;
    }
    fds.forEach((fd) => used.add(fd));
    // Only the pipes a recovered relay takes are kept open; the others are closed with the rest.
    const pipeAToB = pipes.get(`${record.engineId}:ab`) ?? null;
    const pipeBToA = pipes.get(`${record.engineId}:ba`) ?? null;
    for (const pipe of [pipeAToB, pipeBToA]) {
      if (!pipe) continue;
      pipe.fds.forEach((fd) => used.add(fd));
      bytesInPipes += pipe.bytes;
    }
    const task: SpliceTask = {
      taskId: record.taskId,
      engineId: record.engineId,
      ownerKey: record.ownerKey,
      owner: record.owner,
      peer: record.peer,
      fdA: fds[0],
      fdB: fds[1],
      meta: { ...record.meta },
      relay: { ...record.options },
      acceptedAt: record.acceptedAt,
    };
    relays.push({
      task,
      paused: {
        id: record.engineId,
        fdA: fds[0],
        fdB: fds[1],
        options: { ...record.options },
        bytesAToB: 0,
        bytesBToA: 0,
        finishedAToB: false,
        finishedBToA: false,
        eofAToB: false,
        eofBToA: false,
        pipeAToB,
        pipeBToA,
        startedAt: record.acceptedAt,
      },
    });
  }
  const envelopes: RecoveredEnvelope[] = [];
  for (const record of ended.values()) {
    const fds = socketPair(record.taskId);
    if (!fds) continue;
    fds.forEach((fd) => used.add(fd));
    envelopes.push({ taskId: record.taskId, ownerKey: record.ownerKey, envelope: record.envelope, fds });
  }
  // Recovered relays' names stay stored (their sockets are the same); everything else goes.
  const kept = new Set([...relays.map((r) => relayName(r.task.taskId)), ...envelopes.map((e) => relayName(e.taskId))]);
  const staleNames = [...groups.keys()].filter((name) => !kept.has(name));
  binding.closeAll(passed.map((p) => p.fd).filter((fd) => !used.has(fd)));
  return { relays, envelopes, staleNames, maxEngineId, bytesInPipes };
}

/** The owner table: one little-endian 64-bit word per pipe. */
function readTable(fd: number): bigint[] {
  const size = fs.fstatSync(fd).size;
  const data = Buffer.alloc(size);
  fs.readSync(fd, data, 0, size, 0);
  const words: bigint[] = [];
  for (let offset = 0; offset + 8 <= size; offset += 8) words.push(data.readBigUInt64LE(offset));
  return words;
}

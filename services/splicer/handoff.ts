/**
 * Splicer's side of a hand-over: paused relays travel with their sockets, their pipes (bytes in flight
 * included), their counters and what is left of their prefaces; the successor resumes each one exactly
 * where it stopped.
 */
import type { FdDescription } from '../../lib/native.js';
import type { PausedRelay, RelayOptions } from '../../lib/native-splice.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { fdKindMismatch } from '../../lib/protocol/fd-kinds.js';
import type { CrashSurvivalExport } from './crash-survival.js';
import type { SpliceTask } from './task-table.js';

/** A pipe in the state: fd indices and the bytes it holds. */
interface PipeRecord {
  fds: [number, number];
  bytes: number;
}

/** One relay in the state (format 1). Fds are indices into the hand-over's fd list. */
export interface RelayRecord {
  taskId: string;
  engineId: number;
  ownerKey: string;
  owner: string;
  peer: { pid: number; uid: number; gid: number };
  meta: Record<string, unknown>;
  acceptedAt: number;
  startedAt: number;
  options: { idleTimeoutMs: number; maxDurationMs: number; maxBytesAToB: number; maxBytesBToA: number; prefaceAToB?: string; prefaceBToA?: string };
  bytesAToB: number;
  bytesBToA: number;
  finishedAToB: boolean;
  finishedBToA: boolean;
  eofAToB: boolean;
  eofBToA: boolean;
  fdA: number;
  fdB: number;
  pipeAToB: PipeRecord | null;
  pipeBToA: PipeRecord | null;
}

/** Splicer's part of the state document (format 1). */
export interface SplicerState {
  /** Crash survival's bookkeeping, when the fd store is in use (the successor takes it over). */
  fdStore?: CrashSurvivalExport;
  nextEngineId: number;
  relaysEnded: number;
  relays: RelayRecord[];
}

const toBase64 = (bytes: Uint8Array | undefined) => (bytes && bytes.length ? Buffer.from(bytes).toString('base64') : undefined);

/** Describes a paused relay and its task, appending its fds to `fds`. */
export function exportRelay(task: SpliceTask, paused: PausedRelay, fds: number[]): RelayRecord {
  const index = (fd: number) => fds.push(fd) - 1;
  const pipe = (p: PausedRelay['pipeAToB']): PipeRecord | null => (p ? { fds: [index(p.fds[0]), index(p.fds[1])], bytes: p.bytes } : null);
  const options: RelayRecord['options'] = {
    idleTimeoutMs: paused.options.idleTimeoutMs,
    maxDurationMs: paused.options.maxDurationMs,
    maxBytesAToB: paused.options.maxBytesAToB,
    maxBytesBToA: paused.options.maxBytesBToA,
  };
  const prefaceAToB = toBase64(paused.options.prefaceAToB);
  const prefaceBToA = toBase64(paused.options.prefaceBToA);
  if (prefaceAToB) options.prefaceAToB = prefaceAToB;
  if (prefaceBToA) options.prefaceBToA = prefaceBToA;
  return {
    taskId: task.taskId,
    engineId: task.engineId,
    ownerKey: task.ownerKey,
    owner: task.owner,
    peer: task.peer,
    meta: task.meta,
    acceptedAt: task.acceptedAt,
    startedAt: paused.startedAt,
    options,
    bytesAToB: paused.bytesAToB,
    bytesBToA: paused.bytesBToA,
    finishedAToB: paused.finishedAToB,
    finishedBToA: paused.finishedBToA,
    eofAToB: paused.eofAToB,
    eofBToA: paused.eofBToA,
    fdA: index(paused.fdA),
    fdB: index(paused.fdB),
    pipeAToB: pipe(paused.pipeAToB),
    pipeBToA: pipe(paused.pipeBToA),
  };
}

const invalid = (message: string) => new ProtocolError('EFDFERRY_STATE', `splicer state: ${message}`);
const isCount = (value: unknown): value is number => typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;

/**
 * Checks one relay record against the fds that arrived (indices in range, sockets are connected stream
 * sockets, pipes are pipes) and turns it back into a task and a paused relay on those fds.
 */
export function importRelay(
  record: RelayRecord,
  fds: readonly number[],
  describe: (fd: number) => FdDescription,
): { task: SpliceTask; paused: PausedRelay } {
  if (typeof record !== 'object' || record === null) throw invalid('a relay record is not an object');
  const { taskId, engineId, ownerKey, owner, options } = record;
  if (typeof taskId !== 'string' || !isCount(engineId) || typeof ownerKey !== 'string' || typeof owner !== 'string') {
    throw invalid('a relay record lacks its ids');
  }
  if (typeof options !== 'object' || options === null) throw invalid(`relay ${taskId} has no options`);
  const fdAt = (index: unknown, what: string, kind: 'stream-socket' | 'pipe'): number => {
    if (!isCount(index) || index >= fds.length) throw invalid(`relay ${taskId}: ${what} fd index ${String(index)} is out of range`);
    const fd = fds[index]!;
    const description = describe(fd);
    if (kind === 'pipe') {
      if (description.kind !== 'pipe') throw invalid(`relay ${taskId}: ${what} is not a pipe`);
    } else {
      const mismatch = fdKindMismatch(kind, description);
      if (mismatch) throw invalid(`relay ${taskId}: ${what} ${mismatch}`);
    }
    return fd;
  };
  const pipe = (p: PipeRecord | null, what: string): PausedRelay['pipeAToB'] => {
    if (p === null || p === undefined) return null;
    if (!Array.isArray(p.fds) || p.fds.length !== 2 || !isCount(p.bytes)) throw invalid(`relay ${taskId}: malformed ${what}`);
    return { fds: [fdAt(p.fds[0], `${what} read end`, 'pipe'), fdAt(p.fds[1], `${what} write end`, 'pipe')], bytes: p.bytes };
  };
  for (const key of ['idleTimeoutMs', 'maxDurationMs', 'maxBytesAToB', 'maxBytesBToA'] as const) {
    if (!isCount(options[key])) throw invalid(`relay ${taskId}: options.${key} is not a count`);
  }
  for (const key of ['bytesAToB', 'bytesBToA', 'startedAt', 'acceptedAt'] as const) {
    if (!isCount(record[key])) throw invalid(`relay ${taskId}: ${key} is not a count`);
  }
  const relay: RelayOptions = {
    idleTimeoutMs: options.idleTimeoutMs,
    maxDurationMs: options.maxDurationMs,
    maxBytesAToB: options.maxBytesAToB,
    maxBytesBToA: options.maxBytesBToA,
  };
  if (options.prefaceAToB) relay.prefaceAToB = Buffer.from(options.prefaceAToB, 'base64');
  if (options.prefaceBToA) relay.prefaceBToA = Buffer.from(options.prefaceBToA, 'base64');
  const fdA = fdAt(record.fdA, 'socket A', 'stream-socket');
  const fdB = fdAt(record.fdB, 'socket B', 'stream-socket');
  const task: SpliceTask = {
    taskId,
    engineId,
    ownerKey,
    owner,
    peer: record.peer,
    fdA,
    fdB,
    meta: record.meta ?? {},
    relay,
    acceptedAt: record.acceptedAt,
  };
  const paused: PausedRelay = {
    id: engineId,
    fdA,
    fdB,
    options: relay,
    bytesAToB: record.bytesAToB,
    bytesBToA: record.bytesBToA,
    finishedAToB: record.finishedAToB === true,
    finishedBToA: record.finishedBToA === true,
    eofAToB: record.eofAToB === true,
    eofBToA: record.eofBToA === true,
    pipeAToB: pipe(record.pipeAToB, 'pipe A->B'),
    pipeBToA: pipe(record.pipeBToA, 'pipe B->A'),
    startedAt: record.startedAt,
  };
  return { task, paused };
}

/** Every fd a paused relay holds (for closing our copies after commit). */
export function pausedFds(paused: PausedRelay): number[] {
  return [paused.fdA, paused.fdB, ...(paused.pipeAToB?.fds ?? []), ...(paused.pipeBToA?.fds ?? [])];
}

/**
 * Bumblebee's side of a hand-over: environments travel with their namespace, tun and listener fds
 * (handshakes waiting in an accept queue move with the listener), flows with their packet sockets and
 * NAT slots, and the slot allocator with its TIME_WAIT quarantine, so the successor pumps every flow
 * exactly as before and never hands out a tuple the kernel may still hold.
 */
import type { FdDescription, FlowTuple, InternalTuple, PausedFlow, PausedPump } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { fdKindMismatch } from '../../lib/protocol/fd-kinds.js';
import type { ExportedEnvironment } from './environments.js';
import type { Flow } from './flow-table.js';

/** One flow in the state (format 1); `fd` is an index into the hand-over's fd list. */
export interface FlowRecord {
  flowId: number;
  taskId: string;
  environmentId: number;
  fd: number;
  slot: number;
  ownerKey: string;
  owner: string;
  peer: { pid: number; uid: number; gid: number };
  tenant: string;
  context: Record<string, unknown>;
  tuple: FlowTuple;
  internal: InternalTuple | null;
  requestedAt: number;
  acceptedAt: number | null;
  packetsIn: number;
  packetsOut: number;
  idleMs: number;
}

/** Bumblebee's part of the state document (format 1). */
export interface BumblebeeState {
  nextFlowId: number;
  counters: Record<string, number>;
  environments: ExportedEnvironment[];
  flows: FlowRecord[];
  quarantine: PausedPump['quarantine'];
  cursors: PausedPump['cursors'];
}

/** Describes a paused flow and its record, appending its fd to `fds`. */
export function exportFlow(flow: Flow, paused: PausedFlow, fds: number[]): FlowRecord {
  return {
    flowId: flow.flowId,
    taskId: flow.taskId,
    environmentId: paused.environmentId,
    fd: fds.push(paused.fd) - 1,
    slot: paused.slot,
    ownerKey: flow.ownerKey,
    owner: flow.owner,
    peer: { ...flow.peer },
    tenant: flow.tenant,
    context: flow.context,
    tuple: paused.tuple,
    internal: flow.internal,
    requestedAt: flow.requestedAt,
    acceptedAt: flow.acceptedAt,
    packetsIn: paused.packetsIn,
    packetsOut: paused.packetsOut,
    idleMs: paused.idleMs,
  };
}

const isCount = (value: unknown): value is number => typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;

/**
 * Checks one flow record and its fd (a connected AF_UNIX seqpacket socket), returning the flow and how
 * the pump resumes it. Throws `EFDFERRY_STATE` for anything off.
 */
export function importFlow(
  record: FlowRecord,
  fds: readonly number[],
  environmentIds: ReadonlySet<number>,
  describe: (fd: number) => FdDescription,
  slotsOf: (environmentId: number) => number = () => Number.MAX_SAFE_INTEGER,
  taken: Set<string> = new Set(),
): { flow: Flow; paused: PausedFlow } {
  const bad = (why: string) => new ProtocolError('EFDFERRY_STATE', `flow ${String(record?.taskId)}: ${why}`);
  if (typeof record !== 'object' || record === null) throw bad('not an object');
  if (!isCount(record.flowId) || typeof record.taskId !== 'string') throw bad('no id');
  if (!environmentIds.has(record.environmentId)) throw bad(`unknown environment ${record.environmentId}`);
  if (!isCount(record.fd) || record.fd >= fds.length) throw bad('no fd');
  if (!isCount(record.slot) || record.slot < 1 || record.slot >= slotsOf(record.environmentId)) throw bad('no slot, or one outside its environment');
  const slotKey = `${record.environmentId}:${record.slot}`;
  if (taken.has(slotKey)) throw bad(`slot ${record.slot} of environment ${record.environmentId} is held by another flow`);
  taken.add(slotKey);
  const tuple = record.tuple;
  if (typeof tuple !== 'object' || tuple === null || (tuple.family !== 4 && tuple.family !== 6)) throw bad('no tuple');
  const fd = fds[record.fd]!;
  const mismatch = fdKindMismatch('seqpacket-socket', describe(fd));
  if (mismatch) throw bad(`its packet socket ${mismatch}`);
  const flow: Flow = {
    flowId: record.flowId,
    taskId: record.taskId,
    environmentId: record.environmentId,
    fd,
    ownerKey: record.ownerKey,
    owner: record.owner,
    peer: record.peer,
    tenant: record.tenant,
    context: record.context ?? {},
    tuple,
    internal: record.internal,
    slot: record.slot,
    requestedAt: record.requestedAt,
    acceptedAt: record.acceptedAt,
  };
  const paused: PausedFlow = {
    flowId: record.flowId,
    environmentId: record.environmentId,
    fd,
    slot: record.slot,
    tuple,
    packetsIn: isCount(record.packetsIn) ? record.packetsIn : 0,
    packetsOut: isCount(record.packetsOut) ? record.packetsOut : 0,
    idleMs: isCount(record.idleMs) ? record.idleMs : 0,
  };
  return { flow, paused };
}

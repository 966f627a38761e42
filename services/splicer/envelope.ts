/**
 * The envelope: what Splicer gives back when a relay ends. Both original sockets travel as its fds
 * (A first, then B); the data says everything that happened to them.
 */
import type { FdDescription, TcpInfo } from '../../lib/native.js';
import type { RelayCompletion } from '../../lib/native-splice.js';
import { TCP_STATES, type Envelope, type TcpSnapshot } from '../../lib/protocol/splicer.js';
import type { SpliceTask } from './task-table.js';

const AF_INET = 2;
const AF_INET6 = 10;
const IPPROTO_TCP = 6;

/** Whether an fd is a TCP socket (so `TCP_INFO` applies). */
export const isTcp = (description: FdDescription): boolean =>
  description.kind === 'socket' && (description.family === AF_INET || description.family === AF_INET6) && description.protocol === IPPROTO_TCP;

/** Reads `TCP_INFO`, or null when the socket is not TCP or the call fails (the socket is already gone). */
export function snapshotTcp(fd: number, tcpInfo: (fd: number) => TcpInfo, describe: (fd: number) => FdDescription): TcpSnapshot | null {
  try {
    if (!isTcp(describe(fd))) return null;
    const info = tcpInfo(fd);
    return { ...info, stateName: TCP_STATES[info.state] ?? `state ${info.state}` };
  } catch {
    return null;
  }
}

/** Builds an envelope from a task and its engine completion. */
export function buildEnvelope(task: SpliceTask, completion: RelayCompletion, tcp: Envelope['tcpInfo']): Envelope {
  return {
    taskId: task.taskId,
    meta: task.meta,
    reason: completion.reason,
    errno: completion.errno,
    code: completion.code,
    side: completion.side,
    bytesAToB: completion.bytesAToB,
    bytesBToA: completion.bytesBToA,
    finishedAToB: completion.finishedAToB,
    finishedBToA: completion.finishedBToA,
    acceptedAt: task.acceptedAt,
    startedAt: completion.startedAt,
    endedAt: completion.endedAt,
    durationMs: completion.endedAt - completion.startedAt,
    unsentAToB: completion.unsentAToB ? completion.unsentAToB.toString('base64') : '',
    unsentBToA: completion.unsentBToA ? completion.unsentBToA.toString('base64') : '',
    tcpInfo: tcp,
  };
}

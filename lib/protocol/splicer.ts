/**
 * Splicer's part of the wire contract: the envelope a finished relay comes back in. Shared by the
 * daemon that builds it and the client that reads it.
 */
import type { TcpInfo } from '../native.js';
import type { RelayEndReason } from '../native-splice.js';

export type { RelayEndReason } from '../native-splice.js';

/** TCP states by number (include/net/tcp_states.h). */
export const TCP_STATES = ['', 'ESTABLISHED', 'SYN_SENT', 'SYN_RECV', 'FIN_WAIT1', 'FIN_WAIT2', 'TIME_WAIT', 'CLOSE', 'CLOSE_WAIT', 'LAST_ACK', 'LISTEN', 'CLOSING', 'NEW_SYN_RECV'];

/** A `TCP_INFO` snapshot with its state named. */
export type TcpSnapshot = TcpInfo & { stateName: string };

/** The data of an `envelope` event. */
export interface Envelope {
  taskId: string;
  meta: Record<string, unknown>;
  reason: RelayEndReason;
  /** The errno that ended the relay, if any (positive), its name, and which socket it came from. */
  errno: number;
  code: string | null;
  side: 'a' | 'b' | null;
  bytesAToB: number;
  bytesBToA: number;
  finishedAToB: boolean;
  finishedBToA: boolean;
  acceptedAt: number;
  startedAt: number;
  endedAt: number;
  durationMs: number;
  /**
   * Bytes read from A (resp. B) that had not reached the other side when the relay ended (cancel, timeout,
   * cap, error, shutdown), base64; empty when everything was delivered. Nothing is silently dropped.
   */
  unsentAToB: string;
  unsentBToA: string;
  /** `TCP_INFO` of each socket taken as the relay ended; null for a non-TCP socket. */
  tcpInfo: { a: TcpSnapshot | null; b: TcpSnapshot | null };
}


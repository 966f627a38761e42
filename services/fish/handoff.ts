/**
 * Fish's side of a hand-over: the persistent tun and every registration's packet socket travel as fds;
 * registrations and mappings travel in the state document. Control connections travel with the server.
 * The predecessor touches neither the rules nor conntrack: the successor adopts them as they are, so a
 * flow keeps its egress port across the restart with no gap (notes/fish-kernel.md §9).
 */
import type { FdDescription, FishMapping, FishMappingRow } from '../../lib/native.js';
import { FISH_PROTOCOLS, type FishProtocol } from '../../lib/protocol/fish.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { fdKindMismatch } from '../../lib/protocol/fd-kinds.js';
import type { Registration } from './registrations.js';
import type { GuardSnapshot } from './slice-guard.js';

/** One registration in the state; `fd` is an index into the hand-over's fd list. */
export type RegistrationRecord = Omit<Registration, 'connectionId' | 'orphanedAt'> & { orphanedAt: number | null };

/** Fish's part of the state document. */
export interface FishState {
  /** Index of the tun in the fd list. */
  tun: number;
  /** The tun's ifindex (its routes are re-stated by the successor). */
  tunIfindex: number;
  registrations: RegistrationRecord[];
  mappings: FishMappingRow[];
  /** Mappings from before a crash still waiting for their registration. */
  orphans: FishMapping[];
  counters: Record<string, number>;
  exhausted: Record<string, number>;
  ended: Record<string, number>;
  /** The slice guard's counts and findings (absent from predecessors without a guard, or with it off). */
  guard?: GuardSnapshot;
}

/** Describes registrations, appending their packet sockets to `fds`. */
export function exportRegistrations(registrations: Registration[], fds: number[]): RegistrationRecord[] {
  return registrations.map(({ connectionId: _connectionId, ...rest }) => ({ ...rest, peer: { ...rest.peer }, fd: fds.push(rest.fd) - 1 }));
}

const bad = (message: string): never => {
  throw new ProtocolError('EFDFERRY_STATE', `fish state: ${message}`);
};

/**
 * Checks and rebuilds registrations (each with its fd, which must be a SOCK_SEQPACKET socket). Their
 * control connections are matched after commit; until then they count as disconnected.
 */
export function importRegistrations(records: unknown[], fds: readonly number[], describe: (fd: number) => FdDescription): Registration[] {
  const seen = new Set<number>();
  return records.map((value) => {
    const record = value as RegistrationRecord;
    if (typeof record !== 'object' || record === null) return bad('a registration is not an object');
    if (!Number.isInteger(record.id) || record.id < 1 || record.id > 65_535 || seen.has(record.id)) return bad(`bad or repeated registration id ${String(record.id)}`);
    seen.add(record.id);
    const fd = fds[record.fd];
    if (fd === undefined) return bad(`registration ${record.id}: fd index ${String(record.fd)} out of range`);
    const mismatch = fdKindMismatch('seqpacket-socket', describe(fd));
    if (mismatch) return bad(`registration ${record.id}: ${mismatch}`);
    if (!Array.isArray(record.ports) || !Array.isArray(record.protocols) || record.protocols.some((p) => !FISH_PROTOCOLS.includes(p as FishProtocol))) {
      return bad(`registration ${record.id}: bad ports or protocols`);
    }
    return { ...record, fd, connectionId: null, orphanedAt: record.orphanedAt ?? null };
  });
}

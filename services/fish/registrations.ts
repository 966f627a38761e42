/**
 * Fish's registration table: who holds which registration id, what slice it uses, and which
 * policy-routing ranges the union of all slices needs. Pure bookkeeping, no syscalls, so the rules are
 * unit-tested without root.
 */
import type { PeerCredentials } from '../../lib/native.js';
import type { FishProtocol, RegisterRequest } from '../../lib/protocol/fish.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { isAllowed, type EgressPolicy } from './egress-policy.js';

/** One registration. */
export interface Registration {
  id: number;
  /** The packet socket Fish pumps; the table's owner closes it when the registration ends. */
  fd: number;
  /** Owner ids are per uid: only the uid that registered an id may take it over. */
  uid: number;
  ownerKey: string;
  owner: string;
  peer: PeerCredentials;
  /** The control connection whose lifetime is the registration's; null while in its grace period. */
  connectionId: number | null;
  egress4: string | null;
  egress6: string | null;
  ports: [number, number];
  protocols: FishProtocol[];
  maxMappings: number;
  registeredAt: number;
  /** When the control connection went away (the grace period runs from here). */
  orphanedAt: number | null;
}

/** A policy-routing range: replies to `egress` on these ports must reach Fish's tun. */
export interface EgressRange {
  family: 4 | 6;
  egress: string;
  portLo: number;
  portHi: number;
}

/** The registrations of one Fish. */
export class RegistrationTable {
  readonly #byId = new Map<number, Registration>();
  readonly #policy: EgressPolicy;

  constructor(policy: EgressPolicy) {
    this.#policy = policy;
  }

  /** The policy in force. */
  get policy(): Readonly<EgressPolicy> {
    return this.#policy;
  }

  get size(): number {
    return this.#byId.size;
  }

  get(id: number): Registration | undefined {
    return this.#byId.get(id);
  }

  all(): Registration[] {
    return [...this.#byId.values()];
  }

  /**
   * Checks a request against the policy and the registrations already there, and returns the
   * registration it would take over (same id, same uid), if any. Throws `EFDFERRY_CONFLICT` or
   * `EFDFERRY_LIMIT` with the reason.
   */
  check(request: RegisterRequest, uid: number): Registration | undefined {
    for (const address of [request.egress4, request.egress6]) {
      if (address && !isAllowed(this.#policy, address)) {
        throw new ProtocolError('EFDFERRY_CONFLICT', `egress ${address} is outside --egress-allow (${this.#policy.allow.map((c) => c.text).join(', ') || 'nothing allowed'})`);
      }
    }
    const [lo, hi] = this.#policy.portRange;
    if (request.ports[0] < lo || request.ports[1] > hi) {
      throw new ProtocolError('EFDFERRY_CONFLICT', `ports ${request.ports[0]}-${request.ports[1]} are outside --port-range ${lo}-${hi}`);
    }
    const existing = this.#byId.get(request.id);
    if (existing && existing.uid !== uid) {
      throw new ProtocolError('EFDFERRY_CONFLICT', `registration ${request.id} belongs to another uid`);
    }
    if (!existing && this.#byId.size >= this.#policy.maxRegistrations) {
      throw new ProtocolError('EFDFERRY_LIMIT', `${this.#byId.size} registrations already (--max-registrations)`, { limit: 'max-registrations' });
    }
    return existing;
  }

  /** Adds or replaces a registration. */
  set(registration: Registration): void {
    this.#byId.set(registration.id, registration);
  }

  remove(id: number): Registration | undefined {
    const registration = this.#byId.get(id);
    this.#byId.delete(id);
    return registration;
  }

  /** Registrations held by a control connection. */
  ofConnection(connectionId: number): Registration[] {
    return this.all().filter((registration) => registration.connectionId === connectionId);
  }

  /**
   * The ranges policy routing must cover: per egress address, the union of its registrations' slices,
   * overlapping or adjacent slices merged (rules are a linear list: fewer is faster).
   */
  ranges(extra: Registration[] = []): EgressRange[] {
    const byEgress = new Map<string, { family: 4 | 6; spans: [number, number][] }>();
    for (const registration of [...this.#byId.values(), ...extra]) {
      for (const [family, egress] of [[4, registration.egress4], [6, registration.egress6]] as const) {
        if (!egress) continue;
        const entry = byEgress.get(egress) ?? { family, spans: [] };
        entry.spans.push([...registration.ports]);
        byEgress.set(egress, entry);
      }
    }
    const ranges: EgressRange[] = [];
    for (const [egress, { family, spans }] of [...byEgress].sort(([a, x], [b, y]) => x.family - y.family || a.localeCompare(b))) {
      spans.sort((a, b) => a[0] - b[0]);
      let current: [number, number] | null = null;
      for (const span of spans) {
        if (current && span[0] <= current[1] + 1) current[1] = Math.max(current[1], span[1]);
        else {
          if (current) ranges.push({ family, egress, portLo: current[0], portHi: current[1] });
          current = [span[0], span[1]];
        }
      }
      if (current) ranges.push({ family, egress, portLo: current[0], portHi: current[1] });
    }
    return ranges;
  }
}

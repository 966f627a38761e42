/**
 * Bumblebee's flows: upgrades waiting for their handshake and flows being pumped, who handed each one
 * over, and the limits on how many anyone may have.
 */
import type { FlowTuple, InternalTuple, PeerCredentials } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';

/** One flow the daemon holds (its packet socket is `fd`). */
export interface Flow {
  /** The pump's numeric id. */
  flowId: number;
  /** The id clients see (unique across restarts). */
  taskId: string;
  environmentId: number;
  fd: number;
  ownerKey: string;
  owner: string;
  peer: PeerCredentials;
  tenant: string;
  context: Record<string, unknown>;
  /** Known once the kernel accepted the handshake. */
  tuple: FlowTuple | null;
  internal: InternalTuple | null;
  slot: number;
  requestedAt: number;
  acceptedAt: number | null;
}

/** Flow limits; each has a flag. */
export interface FlowLimits {
  maxFlows: number;
  maxFlowsPerOwner: number;
  maxFlowsPerTenant: number;
}

/** Live flows (pending upgrades included), indexed by id, with per-owner, per-tenant and per-environment counts. */
export class FlowTable {
  readonly #flows = new Map<number, Flow>();
  readonly #perOwner = new Map<string, number>();
  readonly #perTenant = new Map<string, number>();
  readonly #perEnvironment = new Map<number, number>();
  readonly limits: Readonly<FlowLimits>;

  constructor(limits: FlowLimits) {
    this.limits = limits;
  }

  get size(): number {
    return this.#flows.size;
  }

  /** Throws `EFDFERRY_LIMIT` naming the limit one more flow would break. */
  checkRoom(ownerKey: string, tenant: string): void {
    if (this.size >= this.limits.maxFlows) {
      throw new ProtocolError('EFDFERRY_LIMIT', `Bumblebee holds its maximum of ${this.limits.maxFlows} flows`, { limit: 'maxFlows' });
    }
    if ((this.#perOwner.get(ownerKey) ?? 0) >= this.limits.maxFlowsPerOwner) {
      throw new ProtocolError('EFDFERRY_LIMIT', `this owner holds its maximum of ${this.limits.maxFlowsPerOwner} flows`, { limit: 'maxFlowsPerOwner' });
    }
    if ((this.#perTenant.get(tenant) ?? 0) >= this.limits.maxFlowsPerTenant) {
      throw new ProtocolError('EFDFERRY_LIMIT', `tenant ${tenant} holds its maximum of ${this.limits.maxFlowsPerTenant} flows`, { limit: 'maxFlowsPerTenant' });
    }
  }

  /** The environment with the fewest flows among `ids`. */
  leastLoaded(ids: readonly number[]): number {
    let best = ids[0]!;
    for (const id of ids) if ((this.#perEnvironment.get(id) ?? 0) < (this.#perEnvironment.get(best) ?? 0)) best = id;
    return best;
  }

  add(flow: Flow): void {
    this.#flows.set(flow.flowId, flow);
    increment(this.#perOwner, flow.ownerKey);
    increment(this.#perTenant, flow.tenant);
    increment(this.#perEnvironment, flow.environmentId);
  }

  get(flowId: number): Flow | undefined {
    return this.#flows.get(flowId);
  }

  byTaskId(taskId: string): Flow | undefined {
    const flowId = Number(taskId.split('-').at(-1));
    const flow = this.#flows.get(flowId);
    return flow?.taskId === taskId ? flow : undefined;
  }

  remove(flow: Flow): void {
    if (!this.#flows.delete(flow.flowId)) return;
    decrement(this.#perOwner, flow.ownerKey);
    decrement(this.#perTenant, flow.tenant);
    decrement(this.#perEnvironment, flow.environmentId);
  }

  all(): Flow[] {
    return [...this.#flows.values()];
  }

  /** Flows per tenant, for status. */
  tenants(): Record<string, number> {
    return Object.fromEntries(this.#perTenant);
  }
}

function increment<K>(counts: Map<K, number>, key: K): void {
  counts.set(key, (counts.get(key) ?? 0) + 1);
}

function decrement<K>(counts: Map<K, number>, key: K): void {
  const left = (counts.get(key) ?? 1) - 1;
  if (left === 0) counts.delete(key);
  else counts.set(key, left);
}

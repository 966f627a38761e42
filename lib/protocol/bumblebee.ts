/**
 * Bumblebee's part of the wire contract: what an `upgrade` request carries and what its reply says.
 * Shared by the daemon that validates it and the client that builds and reads it.
 */
import type { FlowTuple, InternalTuple } from '../native-bumblebee.js';
import { ProtocolError } from './errors.js';

export type { FlowTuple, InternalTuple } from '../native-bumblebee.js';

/** A validated `upgrade` request (its one fd is the flow's SOCK_SEQPACKET packet socket). */
export interface UpgradeRequest {
  /** Opaque metadata, returned exactly as given. */
  context: Record<string, unknown>;
  /** Who the flow belongs to (logged, counted, listed); tenants never see each other's flows. */
  tenant: string;
}

/** The result of an upgrade; the accepted TCP socket travels as the reply's one fd. */
export interface UpgradeResult {
  flowId: string;
  /** The client flow as its SYN had it: the proxy's view of who connected where. */
  tuple: FlowTuple;
  /** The NATed tuple the accepted socket shows (`getpeername` gives `address:port`). */
  internal: InternalTuple;
  environment: number;
  context: Record<string, unknown>;
  tenant: string;
}

/** Limits on what one request may carry. */
export interface UpgradeRequestLimits {
  maxContextBytes: number;
}

/** Defaults: the context is a routing or audit record, not a payload. */
export const DEFAULT_UPGRADE_LIMITS: UpgradeRequestLimits = { maxContextBytes: 16 * 1024 };

const TENANT_PATTERN = /^[\x21-\x7e]{1,128}$/;
const KNOWN = new Set(['context', 'tenant']);

/** Validates the parameters of an `upgrade` request; throws `EFDFERRY_INVALID` with the reason. */
export function parseUpgradeRequest(params: Record<string, unknown>, limits: UpgradeRequestLimits = DEFAULT_UPGRADE_LIMITS): UpgradeRequest {
  if (typeof params !== 'object' || params === null || Array.isArray(params)) throw new ProtocolError('EFDFERRY_INVALID', 'params must be an object');
  for (const key of Object.keys(params)) {
    if (!KNOWN.has(key)) throw new ProtocolError('EFDFERRY_INVALID', `unknown parameter "${key}" (known: ${[...KNOWN].join(', ')})`);
  }
  const { context = {}, tenant = 'default' } = params;
  if (typeof context !== 'object' || context === null || Array.isArray(context)) {
    throw new ProtocolError('EFDFERRY_INVALID', '"context" must be an object');
  }
  const size = Buffer.byteLength(JSON.stringify(context));
  if (size > limits.maxContextBytes) {
    throw new ProtocolError('EFDFERRY_INVALID', `"context" is ${size} bytes as JSON; the limit is ${limits.maxContextBytes}`);
  }
  if (typeof tenant !== 'string' || !TENANT_PATTERN.test(tenant)) {
    throw new ProtocolError('EFDFERRY_INVALID', '"tenant" must be 1 to 128 printable ASCII characters without spaces');
  }
  return { context: context as Record<string, unknown>, tenant };
}

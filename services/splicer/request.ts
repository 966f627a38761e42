/**
 * What a `splice` request may carry, and its validation. Everything a client sends is checked here,
 * before a task exists.
 */
import { ProtocolError } from '../../lib/protocol/errors.js';
import type { RelayOptions } from '../../lib/native-splice.js';

/** A validated splice request. */
export interface SpliceRequest {
  /** Opaque metadata, returned exactly as given in the envelope. */
  meta: Record<string, unknown>;
  relay: RelayOptions;
}

/** Limits on what one request may carry. */
export interface SpliceRequestLimits {
  maxMetaBytes: number;
  maxPrefaceBytes: number;
}

/** Defaults: metadata is an audit-log record, a preface is what one read() returned at most. */
export const DEFAULT_REQUEST_LIMITS: SpliceRequestLimits = { maxMetaBytes: 64 * 1024, maxPrefaceBytes: 4 * 1024 * 1024 };

const KNOWN = new Set(['meta', 'idleTimeoutMs', 'maxDurationMs', 'maxBytesAToB', 'maxBytesBToA', 'prefaceAToB', 'prefaceBToA']);
const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

const invalid = (message: string) => new ProtocolError('EFDFERRY_INVALID', message);

function optionalCount(params: Record<string, unknown>, key: string, fallback: number): number {
  const value = params[key];
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw invalid(`"${key}" must be a non-negative integer (0 = no limit)`);
  }
  return value;
}

function optionalPreface(params: Record<string, unknown>, key: string, limit: number): Uint8Array | undefined {
  const value = params[key];
  if (value === undefined) return undefined;
  if (typeof value !== 'string' || value.length % 4 !== 0 || !BASE64.test(value)) throw invalid(`"${key}" must be base64`);
  const bytes = Buffer.from(value, 'base64');
  if (bytes.length > limit) throw invalid(`"${key}" is ${bytes.length} bytes; at most ${limit} are accepted`);
  return bytes.length ? bytes : undefined;
}

/** Validates a `splice` request's parameters; `defaults` fill in what the client left out. */
export function parseSpliceRequest(
  params: Record<string, unknown>,
  defaults: Pick<RelayOptions, 'idleTimeoutMs' | 'maxDurationMs'>,
  limits: SpliceRequestLimits = DEFAULT_REQUEST_LIMITS,
): SpliceRequest {
  if (typeof params !== 'object' || params === null || Array.isArray(params)) throw invalid('params must be an object');
  for (const key of Object.keys(params)) if (!KNOWN.has(key)) throw invalid(`unknown parameter "${key}"`);
  const meta = params.meta ?? {};
  if (typeof meta !== 'object' || meta === null || Array.isArray(meta)) throw invalid('"meta" must be a JSON object');
  const metaBytes = Buffer.byteLength(JSON.stringify(meta));
  if (metaBytes > limits.maxMetaBytes) throw invalid(`"meta" is ${metaBytes} bytes; at most ${limits.maxMetaBytes} are accepted`);
  const relay: RelayOptions = {
    idleTimeoutMs: optionalCount(params, 'idleTimeoutMs', defaults.idleTimeoutMs),
    maxDurationMs: optionalCount(params, 'maxDurationMs', defaults.maxDurationMs),
    maxBytesAToB: optionalCount(params, 'maxBytesAToB', 0),
    maxBytesBToA: optionalCount(params, 'maxBytesBToA', 0),
  };
  const prefaceAToB = optionalPreface(params, 'prefaceAToB', limits.maxPrefaceBytes);
  const prefaceBToA = optionalPreface(params, 'prefaceBToA', limits.maxPrefaceBytes);
  if (prefaceAToB) relay.prefaceAToB = prefaceAToB;
  if (prefaceBToA) relay.prefaceBToA = prefaceBToA;
  return { meta: meta as Record<string, unknown>, relay };
}

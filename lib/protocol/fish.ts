/**
 * Fish's part of the wire contract: what a `register` request carries and what its reply and events
 * say. Shared by the daemon that validates it and the client that builds and reads it.
 */
import net from 'node:net';
import type { FishEvent, FishMapping, FishProtocol } from '../native-fish.js';
import { ProtocolError } from './errors.js';

export type { FishMapping, FishProtocol } from '../native-fish.js';

/** Every protocol Fish forwards, in a stable order. */
export const FISH_PROTOCOLS: readonly FishProtocol[] = ['tcp', 'udp', 'icmp'];

/** A validated `register` request (its one fd is the client's SOCK_SEQPACKET packet socket). */
export interface RegisterRequest {
  /** The registration id, 1..65535, chosen by the proxy; re-registering it keeps its mappings. */
  id: number;
  egress4: string | null;
  egress6: string | null;
  /** The slice: egress ports (and ICMP echo ids) `[lo, hi]` inclusive. */
  ports: [number, number];
  protocols: FishProtocol[];
  /** Concurrent mappings allowed (0 = the daemon's default). */
  maxMappings: number;
  /**
   * The client's IPv6 /64 (`fd00:64::/64`), if it uses IPv6: conntrack labels hold only the low 64 bits of
   * a client address, so after a crash Fish needs it to rebuild the client's IPv6 mappings.
   */
  client6Prefix: string | null;
}

/** The reply to `register`. */
export interface RegisterResult {
  id: number;
  egress4: string | null;
  egress6: string | null;
  ports: [number, number];
  protocols: FishProtocol[];
  maxMappings: number;
  /** Mappings the registration already had (a re-registration, or a cold start that found them in conntrack). */
  mappings: number;
  /** Whether an existing registration of this id was taken over. */
  resumed: boolean;
}

/**
 * The `exhausted` event: a client flow was refused an egress tuple (the client already got a TCP reset
 * or an ICMP administratively-prohibited). Not kept in the mailbox: it is news, not a result. It is the
 * pump's event with the registration id as `id`.
 */
export type ExhaustedEvent = Omit<Extract<FishEvent, { type: 'exhausted' }>, 'type' | 'rid'> & { id: number };

const KNOWN = new Set(['id', 'egress4', 'egress6', 'ports', 'protocols', 'maxMappings', 'client6Prefix']);

const fail = (message: string): never => {
  throw new ProtocolError('EFDFERRY_INVALID', message);
};

function optionalAddress(params: Record<string, unknown>, key: string, family: 4 | 6): string | null {
  const value = params[key];
  if (value === undefined || value === null) return null;
  if (typeof value !== 'string' || net.isIP(value) !== family) return fail(`"${key}" must be an IPv${family} address`);
  return value;
}

const isPort = (value: unknown): value is number => Number.isInteger(value) && (value as number) >= 1 && (value as number) <= 65_535;

/** Validates the parameters of a `register` request; throws `EFDFERRY_INVALID` with the reason. */
export function parseRegisterRequest(params: Record<string, unknown>): RegisterRequest {
  if (typeof params !== 'object' || params === null || Array.isArray(params)) fail('params must be an object');
  for (const key of Object.keys(params)) {
    if (!KNOWN.has(key)) fail(`unknown parameter "${key}" (known: ${[...KNOWN].join(', ')})`);
  }
  const { id, ports, protocols = FISH_PROTOCOLS, maxMappings = 0 } = params;
  if (!Number.isInteger(id) || (id as number) < 1 || (id as number) > 65_535) fail('"id" must be an integer from 1 to 65535');
  const egress4 = optionalAddress(params, 'egress4', 4);
  const egress6 = optionalAddress(params, 'egress6', 6);
  if (!egress4 && !egress6) fail('an egress address is needed: "egress4", "egress6" or both');
  if (!Array.isArray(ports) || ports.length !== 2 || !isPort(ports[0]) || !isPort(ports[1]) || ports[0] > ports[1]) {
    fail('"ports" must be [lo, hi] with 1 <= lo <= hi <= 65535');
  }
  if (!Array.isArray(protocols) || protocols.length === 0 || protocols.some((p) => !FISH_PROTOCOLS.includes(p as FishProtocol))) {
    fail(`"protocols" must be a non-empty list of ${FISH_PROTOCOLS.join(', ')}`);
  }
  if (!Number.isInteger(maxMappings) || (maxMappings as number) < 0 || (maxMappings as number) > 1 << 24) fail('"maxMappings" must be an integer from 0 to 16777216');
  const [lo, hi] = ports as [number, number];
  const { client6Prefix = null } = params;
  if (client6Prefix !== null) {
    const [address = '', bits] = typeof client6Prefix === 'string' ? client6Prefix.split('/') : [];
    if (net.isIP(address) !== 6 || bits !== '64') fail('"client6Prefix" must be an IPv6 /64 prefix such as fd00:64::/64');
  }
  return {
    id: id as number,
    egress4,
    egress6,
    ports: [lo, hi],
    protocols: FISH_PROTOCOLS.filter((p) => (protocols as string[]).includes(p)),
    maxMappings: maxMappings as number,
    client6Prefix: client6Prefix as string | null,
  };
}

/** Validates an `unregister` or `mappings` request's registration id. */
export function parseRegistrationId(params: Record<string, unknown>, required: boolean): number | null {
  const { id } = params ?? {};
  if (id === undefined && !required) return null;
  if (!Number.isInteger(id) || (id as number) < 1 || (id as number) > 65_535) fail('"id" must be an integer from 1 to 65535');
  return id as number;
}

/** A flow named for `explain`: the client's view (protocol, destination) or the egress view. */
export interface ExplainRequest {
  protocol: FishProtocol;
  /** Either side's address: a client address, or an egress address. */
  address: string;
  port: number;
  destinationAddress: string;
  destinationPort: number;
}

/** Validates an `explain` request. */
export function parseExplainRequest(params: Record<string, unknown>): ExplainRequest {
  const { protocol, address, port, destinationAddress, destinationPort = 0 } = params ?? {};
  if (!FISH_PROTOCOLS.includes(protocol as FishProtocol)) fail(`"protocol" must be one of ${FISH_PROTOCOLS.join(', ')}`);
  if (typeof address !== 'string' || !net.isIP(address)) fail('"address" must be an IP address');
  if (typeof destinationAddress !== 'string' || net.isIP(destinationAddress) !== net.isIP(address as string)) fail('"destinationAddress" must be an IP address of the same family');
  const portOk = (value: unknown) => Number.isInteger(value) && (value as number) >= 0 && (value as number) <= 65_535;
  if (!portOk(port) || !portOk(destinationPort)) fail('"port" and "destinationPort" must be integers from 0 to 65535');
  return { protocol: protocol as FishProtocol, address: address as string, port: port as number, destinationAddress: destinationAddress as string, destinationPort: destinationPort as number };
}

/** Whether a mapping is the flow `explain` asks about, seen from the client's side or the egress side. */
export function mappingMatches(mapping: FishMapping, flow: ExplainRequest): boolean {
  if (mapping.protocol !== flow.protocol || mapping.destinationAddress !== flow.destinationAddress || mapping.destinationPort !== flow.destinationPort) return false;
  return (mapping.clientAddress === flow.address && mapping.clientPort === flow.port) || (mapping.egressAddress === flow.address && mapping.egressPort === flow.port);
}

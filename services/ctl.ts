/** `fdferry ctl <service> <command>`: asks a running daemon over its socket and prints the answer. */
import fs from 'node:fs';
import { loadNative } from '../lib/native.js';
import { RpcClient } from '../lib/rpc/client.js';
import { ProtocolError } from '../lib/protocol/errors.js';
import { defaultSocketPath } from '../lib/version.js';

/** The commands `ctl` knows, with their help text. */
export const CTL_COMMANDS = {
  status: 'counts, limits and engine figures',
  tasks: 'Splicer: every running relay: owner, peer pid/uid, age, bytes each way, state',
  flows: 'Bumblebee: every flow: owner, tenant, client -> destination, state, packets each way, idle time',
  registrations: 'Fish: every registration: id, owner, egress, slice, mappings, packets each way',
  mappings: 'Fish: mappings (client -> destination via egress:port): ctl fish mappings [registration id]',
  explain: 'Fish: which registration and mapping a flow belongs to, or why not: ctl fish explain <tcp|udp|icmp> <address:port> <destination:port>',
  cancel: 'end a task now (its envelope goes to its owner): ctl <service> cancel <taskId>',
  drain: 'Splicer: end every relay of an owner (envelopes go to it): ctl splicer drain --owner <id> [--uid <uid>]',
  ping: 'check that the daemon answers',
  metrics: 'Prometheus text exposition of the daemon\'s metrics',
  reload: 'hand everything over to a fresh process (zero downtime); with --wait (default) report when done',
} as const;

/** Parsed `ctl` arguments. */
export interface CtlArguments {
  service: string;
  command: keyof typeof CTL_COMMANDS;
  args: string[];
  socket: string | undefined;
  json: boolean;
  timeoutMs: number;
  /** reload: wait for the hand-over to finish (default true). */
  wait?: boolean;
  /** reload: a fault for the successor to commit (tests; the daemon must allow it). */
  fault?: string;
  /** drain: the owner id, and the uid it belongs to (default: ours). */
  owner?: string;
  uid?: number;
}

/**
 * `/run/fdferry/<service>.sock` (fdferry up, a hand-started daemon) when it exists, else the socket of the
 * installed unit (`/run/fdferry-<service>/<service>.sock`, see services/units), else the former.
 */
function installedOrDefaultSocket(service: string): string {
  const plain = defaultSocketPath(service);
  const installed = `/run/fdferry-${service}/${service}.sock`;
  return !fs.existsSync(plain) && fs.existsSync(installed) ? installed : plain;
}

/** Runs one ctl command; resolves with the process exit code. */
export async function runCtl(options: CtlArguments): Promise<number> {
  const socket = options.socket ?? installedOrDefaultSocket(options.service);
  const client = new RpcClient({
    path: socket,
    owner: `ctl-${process.pid}`,
    binding: loadNative(),
    reconnect: false,
    requestTimeoutMs: options.timeoutMs,
  });
  try {
    await client.connect();
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' || code === 'ECONNREFUSED' ? `is ${options.service} running? (${code})` : (error as Error).message;
    console.error(`fdferry ctl: cannot reach ${socket}: ${why}`);
    return 1;
  }
  try {
    const params: Record<string, unknown> = {};
    if (options.command === 'cancel') {
      if (options.args.length !== 1) throw new Error('cancel takes one task id');
      params.taskId = options.args[0];
    }
    if (options.command === 'drain') {
      if (!options.owner) throw new Error('drain needs --owner <id>');
      params.owner = options.owner;
      if (options.uid !== undefined) params.uid = options.uid;
    }
    if (options.command === 'mappings' && options.args.length) params.id = Number(options.args[0]);
    if (options.command === 'explain') Object.assign(params, explainParams(options.args));
    if (options.command === 'reload') {
      params.wait = options.wait ?? true;
      if (options.fault) params.fault = options.fault;
    }
    const reply = await client.request(options.command, params);
    print(options, reply.result);
    if (options.command === 'reload' && reply.result.ok === false) return 1;
    return 0;
  } catch (error) {
    const code = error instanceof ProtocolError ? ` (${error.code})` : '';
    console.error(`fdferry ctl: ${options.command} failed${code}: ${(error as Error).message}`);
    return 1;
  } finally {
    client.close();
  }
}

function print(options: CtlArguments, result: Record<string, unknown>): void {
  if (options.command === 'metrics' && !options.json) {
    process.stdout.write(String(result.text));
    return;
  }
  if (options.command === 'reload' && !options.json) {
    if (result.started) {
      console.log(`reload started (pid ${String(result.pid)})`);
    } else if (result.ok) {
      const phases = Object.entries((result.phasesMs ?? {}) as Record<string, number>).map(([phase, ms]) => `${phase} ${ms} ms`).join(', ');
      console.log(`reloaded: pid ${String(result.oldPid)} -> ${String(result.newPid)} (generation ${String(result.generation)}) in ${String(result.totalMs)} ms`);
      console.log(`  tasks ${String(result.tasks)}, connections ${String(result.connections)}, fds ${String(result.fds)}, bytes in pipes ${String(result.bytesInFlight)}, pause ${String(result.pauseMs)} ms`);
      console.log(`  phases: ${phases}`);
    } else {
      const failure = (result.failure ?? {}) as Record<string, string>;
      console.error(`reload failed in ${failure.phase}: ${failure.code}: ${failure.message}; pid ${String(result.oldPid)} is still serving`);
    }
    return;
  }
  if (options.command === 'status' && !options.json) {
    printStatus(result);
    return;
  }
  if (!options.json && (options.command === 'registrations' || options.command === 'mappings')) {
    printFish(options.command, result);
    return;
  }
  if (options.json || (options.command !== 'tasks' && options.command !== 'flows')) {
    console.log(JSON.stringify(result, null, options.json ? 0 : 2));
    return;
  }
  if (options.command === 'tasks') {
    const tasks = (result.tasks ?? []) as Array<Record<string, unknown>>;
    table(tasks, ['taskId', 'owner', 'peerPid', 'peerUid', 'ageMs', 'bytesAToB', 'bytesBToA', 'state']);
    console.log(`${tasks.length} task(s)`);
    return;
  }
  const flows = ((result.flows ?? []) as Array<Record<string, unknown>>).map((flow) => {
    const tuple = flow.tuple as { family: number; clientAddress: string; clientPort: number; destinationAddress: string; destinationPort: number } | null;
    const endpoint = (address: string, port: number) => (tuple?.family === 6 ? `[${address}]:${port}` : `${address}:${port}`);
    return {
      ...flow,
      client: tuple ? endpoint(tuple.clientAddress, tuple.clientPort) : '',
      destination: tuple ? endpoint(tuple.destinationAddress, tuple.destinationPort) : '',
    };
  });
  table(flows, ['taskId', 'owner', 'tenant', 'client', 'destination', 'state', 'packetsIn', 'packetsOut', 'idleMs']);
  console.log(`${flows.length} flow(s)`);
}

/** Splits `address:port` (`[v6]:port` for IPv6; ICMP: the echo id as the port). */
function endpointArgument(text: string | undefined, what: string): { address: string; port: number } {
  const match = /^\[([^\]]+)\]:(\d+)$/.exec(text ?? '') ?? /^([^:]+):(\d+)$/.exec(text ?? '');
  if (!match) throw new Error(`explain: ${what} must be address:port ([address]:port for IPv6), got ${String(text)}`);
  return { address: match[1]!, port: Number(match[2]) };
}

function explainParams(args: string[]): Record<string, unknown> {
  if (args.length !== 3) throw new Error('explain takes <tcp|udp|icmp> <address:port> <destination:port>');
  const source = endpointArgument(args[1], 'the source');
  const destination = endpointArgument(args[2], 'the destination');
  return { protocol: args[0], address: source.address, port: source.port, destinationAddress: destination.address, destinationPort: destination.port };
}

function printFish(command: 'registrations' | 'mappings', result: Record<string, unknown>): void {
  const endpoint = (address: unknown, port: unknown) => (String(address).includes(':') ? `[${String(address)}]:${String(port)}` : `${String(address)}:${String(port)}`);
  if (command === 'registrations') {
    const rows = ((result.registrations ?? []) as Array<Record<string, unknown>>).map((r) => ({
      ...r,
      egress: [r.egress4, r.egress6].filter(Boolean).join(' '),
      slice: (r.ports as number[]).join('-'),
      protocols: (r.protocols as string[]).join(','),
    }));
    table(rows, ['id', 'owner', 'peerPid', 'egress', 'slice', 'protocols', 'connected', 'mappings', 'packetsOut', 'packetsIn', 'exhausted']);
    console.log(`${rows.length} registration(s)`);
    return;
  }
  const rows = ((result.mappings ?? []) as Array<Record<string, unknown>>).map((m) => ({
    ...m,
    client: endpoint(m.clientAddress, m.clientPort),
    destination: endpoint(m.destinationAddress, m.destinationPort),
    egress: endpoint(m.egressAddress, m.egressPort),
  }));
  table(rows, ['rid', 'protocol', 'client', 'destination', 'egress', 'packetsOut', 'packetsIn', 'idleMs']);
  console.log(`${rows.length} of ${String(result.total)} mapping(s)${result.truncated ? ' (truncated)' : ''}`);
}

/** `status` for humans: one aligned `name  value` line per figure, nested figures as dotted names. */
function printStatus(result: Record<string, unknown>): void {
  const lines: Array<[string, string]> = [];
  const walk = (value: unknown, name: string) => {
    if (Array.isArray(value) && value.every((item) => typeof item === 'object' && item !== null && 'id' in item)) {
      for (const item of value as Array<Record<string, unknown>>) walk(item, `${name}[${String(item.id)}]`);
    } else if (typeof value === 'object' && value !== null && !Array.isArray(value)) {
      const entries = Object.entries(value as Record<string, unknown>);
      if (entries.length === 0) lines.push([name, '-']);
      for (const [key, inner] of entries) walk(inner, name ? `${name}.${key}` : key);
    } else {
      lines.push([name, Array.isArray(value) ? value.join(', ') : String(value)]);
    }
  };
  walk(result, '');
  const width = Math.max(...lines.map(([name]) => name.length));
  for (const [name, value] of lines) console.log(`${name.padEnd(width)}  ${value}`);
}

function table(rows: Array<Record<string, unknown>>, columns: string[]): void {
  const cells = [columns, ...rows.map((row) => columns.map((column) => String(row[column] ?? '')))];
  const widths = columns.map((_, i) => Math.max(...cells.map((row) => row[i]!.length)));
  for (const row of cells) console.log(row.map((cell, i) => cell.padEnd(widths[i]!)).join('  ').trimEnd());
}

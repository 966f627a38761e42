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

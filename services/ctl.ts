/** `fdferry ctl <service> <command>`: asks a running daemon over its socket and prints the answer. */
import { loadNative } from '../lib/native.js';
import { RpcClient } from '../lib/rpc/client.js';
import { ProtocolError } from '../lib/protocol/errors.js';
import { defaultSocketPath } from '../lib/version.js';

/** The commands `ctl` knows, with their help text. */
export const CTL_COMMANDS = {
  status: 'counts, limits and engine figures',
  tasks: 'every running task: owner, peer pid/uid, age, bytes each way, state',
  cancel: 'end a task now (its envelope goes to its owner): ctl <service> cancel <taskId>',
  ping: 'check that the daemon answers',
} as const;

/** Parsed `ctl` arguments. */
export interface CtlArguments {
  service: string;
  command: keyof typeof CTL_COMMANDS;
  args: string[];
  socket: string | undefined;
  json: boolean;
  timeoutMs: number;
}

/** Runs one ctl command; resolves with the process exit code. */
export async function runCtl(options: CtlArguments): Promise<number> {
  const socket = options.socket ?? defaultSocketPath(options.service);
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
    const reply = await client.request(options.command, params);
    print(options, reply.result);
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
  if (options.json || options.command !== 'tasks') {
    console.log(JSON.stringify(result, null, options.json ? 0 : 2));
    return;
  }
  const tasks = (result.tasks ?? []) as Array<Record<string, unknown>>;
  const columns = ['taskId', 'owner', 'peerPid', 'peerUid', 'ageMs', 'bytesAToB', 'bytesBToA', 'state'];
  const rows = [columns, ...tasks.map((task) => columns.map((column) => String(task[column] ?? '')))];
  const widths = columns.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  for (const row of rows) console.log(row.map((cell, i) => cell.padEnd(widths[i]!)).join('  ').trimEnd());
  console.log(`${tasks.length} task(s)`);
}

/**
 * A client process for the hardening tests, usually run as another uid: connects to a daemon, says
 * hello, optionally calls one method, and reports what happened as one JSON line.
 *
 *   node --import tsx test/helpers/peer-probe.ts <socket> <owner> [method] [params-json]
 *   -> {"hello":"ok"|CODE, "pending":N, "method":"ok"|CODE|null, "message":...}
 */
import { loadNative } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { RpcClient } from '../../lib/rpc/client.js';

const [socket, owner, method, params] = process.argv.slice(2);
const client = new RpcClient({ path: socket!, owner: owner!, binding: loadNative(), reconnect: false, requestTimeoutMs: 10_000 });
client.on('error', () => {});
const codeOf = (error: unknown) => (error instanceof ProtocolError ? error.code : ((error as NodeJS.ErrnoException).code ?? String(error)));
const report: Record<string, unknown> = { method: null };
try {
  const hello = await client.connect();
  report.hello = 'ok';
  report.pending = hello.pending;
  if (method) {
    try {
      await client.request(method, params ? (JSON.parse(params) as Record<string, unknown>) : {});
      report.method = 'ok';
    } catch (error) {
      report.method = codeOf(error);
      report.message = (error as Error).message;
    }
  }
} catch (error) {
  report.hello = codeOf(error);
  report.message = (error as Error).message;
}
client.close();
console.log(JSON.stringify(report));

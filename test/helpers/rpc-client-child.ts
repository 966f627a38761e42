/**
 * A client process for the protocol integration tests (test/integration/rpc-*.test.ts): a real RpcClient in
 * a process of its own, reporting what happens as JSON lines on stdout.
 *
 *   node --import tsx test/helpers/rpc-client-child.ts <mode> <socket> [args...]
 *
 *   receive-tcp <owner>
 *       connects as <owner>, reports {ready}, waits for a 'done' event carrying one connected TCP socket,
 *       acks it, adopts the socket, writes "hello from child <pid>" and answers each chunk with
 *       "pong:<chunk>" until the other end ends; then reports {done} and exits 0.
 *   later <owner> <port> [ms]
 *       connects to 127.0.0.1:<port>, writes "child <pid> was here", hands the socket to the daemon's
 *       `later` method (event in <ms>, or held until `release` without it), reports {id} and stays
 *       connected until it is killed.
 *   late-error <owner>
 *       without an 'error' listener, sends a request that times out client-side and is answered with an
 *       error afterwards, then reports {survived} once a later request is answered.
 *   peer <owner>
 *       reports what the daemon's `peer` method says about this connection, and exits 0.
 */
import net from 'node:net';
import { once } from 'node:events';
import { detachSocket } from '../../lib/client/detach.js';
import { loadNative } from '../../lib/native.js';
import { RpcClient } from '../../lib/rpc/client.js';

const [mode, socket, owner, ...rest] = process.argv.slice(2);
const binding = loadNative();
const report = (value: Record<string, unknown>): void => {
  process.stdout.write(`${JSON.stringify({ pid: process.pid, ...value })}\n`);
};

if (!mode || !socket || !owner) {
  report({ error: 'usage: rpc-client-child.ts <mode> <socket> <owner> [args...]' });
  process.exit(2);
}

const client = new RpcClient({ path: socket, owner, binding, reconnect: false, requestTimeoutMs: 20_000 });
// Like an application that never thought of it, 'late-error' has no 'error' listener.
if (mode !== 'late-error') client.on('error', (error) => report({ error: error.message }));

try {
  if (mode === 'receive-tcp') {
    client.on('event', (event) => {
      if (event.event !== 'done' || event.fds.length !== 1) {
        report({ error: `unexpected event ${event.event} with ${event.fds.length} fds` });
        binding.closeAll(event.fds);
        return;
      }
      const tcp = new net.Socket({ fd: event.fds[0]!, readable: true, writable: true });
      void client.ack([event.id]).then((acked) => report({ acked }));
      tcp.write(`hello from child ${process.pid}`);
      tcp.on('data', (chunk: Buffer) => tcp.write(`pong:${chunk.toString()}`));
      tcp.on('end', () => {
        tcp.end();
        report({ done: true });
        client.close();
      });
      tcp.on('error', (error) => report({ error: error.message }));
    });
    await client.connect();
    report({ ready: true });
  } else if (mode === 'later') {
    const port = Number(rest[0]);
    const params = rest[1] === undefined ? {} : { ms: Number(rest[1]) };
    await client.connect();
    const tcp = net.connect(port, '127.0.0.1');
    await once(tcp, 'connect');
    tcp.write(`child ${process.pid} was here`);
    const { fd } = await detachSocket(tcp, binding);
    const reply = await client.request('later', params, [fd]);
    report({ id: reply.result.id });
  } else if (mode === 'late-error') {
    await client.connect();
    const early = await client.request('slow', { ms: 300, fail: 'EFDFERRY_INVALID' }, [], { timeoutMs: 20 }).then(
      () => 'answered',
      (error: { code?: string }) => error.code,
    );
    report({ early });
    // Answered after the late error (the same daemon timers, a later deadline): by then it has arrived.
    const reply = await client.request('slow', { ms: 400 });
    report({ survived: true, waited: reply.result.waited });
    client.close();
  } else if (mode === 'peer') {
    await client.connect();
    const reply = await client.request('peer');
    report({ result: reply.result, uid: process.getuid!(), gid: process.getgid!() });
    client.close();
  } else {
    report({ error: `unknown mode ${mode}` });
    client.close();
    process.exitCode = 2;
  }
} catch (error) {
  report({ error: (error as Error).message, code: (error as { code?: string }).code });
  client.close();
  process.exitCode = 1;
}

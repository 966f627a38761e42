/**
 * A "proxy" process for the Splicer integration tests (test/integration/splicer-owners.test.ts and
 * splicer-limits.test.ts): an application that hands relays to Splicer under an owner id, dies, and comes
 * back. It reports what happens as JSON lines on stdout (spawn it with spawnScript from rpc-processes.ts).
 *
 *   node --import tsx test/helpers/splicer-proxy.ts <mode> <socket> <owner> [args...]
 *
 *   relays <port4> <port6> <count> [capAToB]
 *       SplicerClient. For each i < count: connects A to 127.0.0.1:<port4> and B to [::1]:<port6>, hands both
 *       to Splicer (relay 0 with maxBytesAToB = capAToB when given) and reports
 *       {started: i, taskId, portA, portB} (the local ports, so the test can find its ends); then {ready}.
 *       Stays connected until it is killed.
 *   hold
 *       The raw RpcClient (lib/rpc/client.ts). Connects, reports {ready}; for each event reports
 *       {event, id, reason, fds} and neither acknowledges it nor closes its fds: a proxy that dies with
 *       envelopes in hand.
 *   collect <count> [taskId,...]
 *       SplicerClient with an `envelope` listener (it acknowledges each one after handing it over). Connects,
 *       reports {ready}, cancels the listed relays ({cancelled: taskId}). For each envelope: reports
 *       {envelope: taskId, reason, bytesAToB, bytesBToA, meta}, writes "from <pid> to <taskId>/<side>\n" to
 *       each returned socket and reports whatever arrives on it ({read: side, taskId, text}). After <count>
 *       envelopes, reports {collected: count}. Stays connected until it is killed.
 *   splice-pair
 *       SplicerClient. Makes two Unix stream socket pairs, hands one end of each to Splicer and reports
 *       {taskId} (or {refused: code, limit, message}), then {uid}. Stays connected until it is killed.
 */
import net from 'node:net';
import { once } from 'node:events';
import { SplicerClient } from '../../lib/client/splicer.js';
import { loadNative } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { RpcClient } from '../../lib/rpc/client.js';

const [mode, socket, owner, ...rest] = process.argv.slice(2);
const binding = loadNative();
const report = (value: Record<string, unknown>): void => {
  process.stdout.write(`${JSON.stringify({ pid: process.pid, ...value })}\n`);
};

if (!mode || !socket || !owner) {
  report({ error: 'usage: splicer-proxy.ts <mode> <socket> <owner> [args...]' });
  process.exit(2);
}

const connectTcp = async (port: number, host: string): Promise<net.Socket> => {
  const tcp = net.connect({ port, host, allowHalfOpen: true });
  await once(tcp, 'connect');
  return tcp;
};

try {
  if (mode === 'relays') {
    const [port4, port6, count, cap] = rest.map(Number) as [number, number, number, number | undefined];
    const client = new SplicerClient({ owner, path: socket, binding, reconnect: false });
    client.on('error', (error) => report({ error: error.message }));
    await client.connect();
    for (let i = 0; i < count; i++) {
      const a = await connectTcp(port4, '127.0.0.1');
      const b = await connectTcp(port6, '::1');
      const portA = a.localPort;
      const portB = b.localPort;
      const options = i === 0 && cap ? { maxBytesAToB: cap } : {};
      const relay = await client.start(a, b, { i, proxyPid: process.pid }, options);
      report({ started: i, taskId: relay.taskId, portA, portB });
    }
    report({ ready: true });
  } else if (mode === 'hold') {
    const client = new RpcClient({ path: socket, owner, binding, reconnect: false });
    client.on('error', (error) => report({ error: error.message }));
    client.on('event', (event) => {
      // Deliberately neither acknowledged nor closed: this process is about to be killed with them.
      report({ event: event.event, id: event.id, reason: event.data.reason, fds: event.fds.length });
    });
    await client.connect();
    report({ ready: true });
  } else if (mode === 'collect') {
    const count = Number(rest[0]);
    const cancel = rest[1] ? rest[1].split(',') : [];
    const client = new SplicerClient({ owner, path: socket, binding, reconnect: false });
    client.on('error', (error) => report({ error: error.message }));
    let collected = 0;
    client.on('envelope', ({ envelope, a, b }) => {
      const { taskId, reason, bytesAToB, bytesBToA, meta } = envelope;
      report({ envelope: taskId, reason, bytesAToB, bytesBToA, meta });
      for (const [side, end] of [['a', a], ['b', b]] as const) {
        end.on('data', (chunk: Buffer) => report({ read: side, taskId, text: chunk.toString() }));
        end.on('error', (error) => report({ error: error.message, taskId, side }));
        end.write(`from ${process.pid} to ${taskId}/${side}\n`);
      }
      if (++collected === count) report({ collected });
    });
    await client.connect();
    report({ ready: true });
    for (const taskId of cancel) {
      await client.cancel(taskId);
      report({ cancelled: taskId });
    }
  } else if (mode === 'splice-pair') {
    const client = new SplicerClient({ owner, path: socket, binding, sockets: 'fd', reconnect: false });
    client.on('error', (error) => report({ error: error.message }));
    await client.connect();
    const [a, nearA] = binding.streamPair();
    const [b, nearB] = binding.streamPair();
    try {
      const relay = await client.start(a, b, { uid: process.getuid!() });
      report({ taskId: relay.taskId });
    } catch (error) {
      const refused = error as ProtocolError;
      binding.closeAll(refused.fds ?? []);
      report({ refused: refused.code, limit: refused.details?.limit, message: refused.message });
    }
    // nearA/nearB stay open for the life of the process, so the relay stays up.
    report({ uid: process.getuid!(), near: [nearA, nearB].length });
  } else {
    report({ error: `unknown mode ${mode}` });
    process.exitCode = 2;
  }
} catch (error) {
  report({ error: (error as Error).message, code: (error as { code?: string }).code });
  process.exit(1);
}

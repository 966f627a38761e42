/**
 * A UDP request-response client for the on-ramp and Fish tests, run inside a client network namespace
 * (`ip netns exec`): it sends datagrams one at a time from one socket (so a NAT keeps one mapping) and
 * waits for each echo, checking it byte for byte.
 *
 *   udp-client.ts --target ADDR:PORT [--count N] [--bytes B] [--timeout-ms T] [--local-port P]
 *
 * Prints one JSON line: {sent, received, matched, localAddress, localPort, from: ["addr:port", ...], rttMs}.
 * A lost datagram is not retried (the test decides what loss means); the client never waits longer than
 * count × timeout-ms.
 */
import crypto from 'node:crypto';
import dgram from 'node:dgram';
import net from 'node:net';
import { flagReader, splitTarget } from './child-flags.js';

const argv = process.argv.slice(2);
const flag = flagReader(argv);
const target = flag('target');
const { host, port } = splitTarget(target);
const count = Number(flag('count', '1'));
const bytes = Math.max(8, Number(flag('bytes', '64')));
const timeoutMs = Number(flag('timeout-ms', '3000'));
const localPort = Number(flag('local-port', '0'));

const socket = dgram.createSocket(net.isIPv6(host) ? 'udp6' : 'udp4');
const replies: Array<{ data: Buffer; from: string }> = [];
let wake: (() => void) | null = null;
socket.on('message', (data, remote) => {
  replies.push({ data, from: remote.family === 'IPv6' ? `[${remote.address}]:${remote.port}` : `${remote.address}:${remote.port}` });
  wake?.();
});

/** Resolves with the next reply, or null once `ms` pass without one. */
function nextReply(ms: number): Promise<{ data: Buffer; from: string } | null> {
  if (replies.length) return Promise.resolve(replies.shift()!);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      wake = null;
      resolve(null);
    }, ms);
    wake = () => {
      clearTimeout(timer);
      wake = null;
      resolve(replies.shift()!);
    };
  });
}

await new Promise<void>((resolve, reject) => {
  socket.once('error', reject);
  socket.bind(localPort, () => resolve());
});
// connect() so the kernel picks the source address now (reported below) and drops datagrams from elsewhere.
await new Promise<void>((resolve) => socket.connect(port, host, () => resolve()));
const local = socket.address();
let sent = 0;
let received = 0;
let matched = 0;
const from = new Set<string>();
const rttMs: number[] = [];
for (let i = 0; i < count; i++) {
  const payload = crypto.randomBytes(bytes);
  payload.writeUInt32BE(i, 0);
  const started = process.hrtime.bigint();
  await new Promise<void>((resolve, reject) => socket.send(payload, (error) => (error ? reject(error) : resolve())));
  sent++;
  // Skip stale echoes of earlier (late) requests: they carry an older index.
  for (;;) {
    const reply = await nextReply(timeoutMs);
    if (!reply) break;
    received++;
    from.add(reply.from);
    if (reply.data.equals(payload)) {
      matched++;
      rttMs.push(Number(process.hrtime.bigint() - started) / 1e6);
      break;
    }
  }
}
socket.close();
process.stdout.write(
  `${JSON.stringify({ sent, received, matched, localAddress: local.address, localPort: local.port, from: [...from], rttMs })}\n`,
);

/**
 * The minimal TCP proxy of the Splicer benchmark, in one of two modes:
 *
 *   node --import tsx bench/lib/splicer-proxy.ts splicer <upstreamPort> <splicerSocket> [net|fd]
 *   node --import tsx bench/lib/splicer-proxy.ts pipe <upstreamPort>
 *
 * It listens on 127.0.0.1 (a port the kernel picks) and prints `port <n>` on stdout once it listens. For
 * each accepted client connection (A) it connects to 127.0.0.1:<upstreamPort> (B), then:
 *
 * - `splicer`: hands A and B to Splicer with `SplicerClient.start(a, b)` (both `net.Socket`s, detached by
 *   the client) and, when the envelope comes back, destroys the returned sockets: `net.Socket`s by
 *   default (`sockets: 'net'`, what `splice()` users get), or with `fd` raw fds (`sockets: 'fd'`), closed
 *   without ever becoming Node handles. At most {@link MAX_HANDOVERS_IN_FLIGHT}
 *   `splice` requests wait for their reply at once; further pairs queue here (the daemon refuses more
 *   than `--max-inflight` requests per connection).
 * - `pipe`: relays by itself, the naive way: `a.pipe(b); b.pipe(a)` (and destroys both on an error).
 *
 * A and B are accepted paused (`pauseOnConnect`), so nothing is read into Node before the hand-over.
 * In splicer mode its counters go to stderr on exit if a hand-over failed; the proxy stops on SIGTERM/SIGINT, or by itself once its parent is gone.
 */
import net from 'node:net';
import { SplicerClient } from '../../lib/client/splicer.js';
import { loadNative } from '../../lib/native.js';

const MAX_HANDOVERS_IN_FLIGHT = 48;

const [mode, upstreamText, socketPath, returned = 'net'] = process.argv.slice(2);
const upstreamPort = Number(upstreamText);
if (
  (mode !== 'splicer' && mode !== 'pipe') ||
  !(upstreamPort > 0) ||
  (mode === 'splicer' && !socketPath) ||
  (returned !== 'net' && returned !== 'fd')
) {
  process.stderr.write('usage: splicer-proxy.ts splicer <upstreamPort> <splicerSocket> [net|fd] | pipe <upstreamPort>\n');
  process.exit(2);
}

const binding = loadNative();
const counters = { accepted: 0, handedOver: 0, returned: 0, failed: 0 };
let client: SplicerClient<'net' | 'fd'> | null = null;
if (mode === 'splicer') {
  client = new SplicerClient<'net' | 'fd'>({ owner: `bench-proxy-${process.pid}`, path: socketPath!, sockets: returned as 'net' | 'fd', binding, reconnect: false });
  await client.connect();
  client.on('error', (error) => process.stderr.write(`splicer-proxy: client error: ${error.message}\n`));
}

/** Destroys a returned socket, whichever form it came back in. */
function destroy(socket: net.Socket | number): void {
  if (typeof socket === 'number') binding.close(socket);
  else socket.destroy();
}

let inFlight = 0;
const queue: Array<[net.Socket, net.Socket]> = [];

function handOver(a: net.Socket, b: net.Socket): void {
  if (inFlight >= MAX_HANDOVERS_IN_FLIGHT) {
    queue.push([a, b]);
    return;
  }
  inFlight++;
  client!.start(a, b).then(
    ({ done }) => {
      counters.handedOver++;
      next();
      return done.then((relay) => {
        counters.returned++;
        destroy(relay.a);
        destroy(relay.b);
      });
    },
    (error: Error & { fds?: number[] }) => {
      counters.failed++;
      binding.closeAll(error.fds ?? []);
      a.destroy();
      b.destroy();
      next();
    },
  );
}

function next(): void {
  inFlight--;
  const pair = queue.shift();
  if (pair) handOver(pair[0], pair[1]);
}

const server = net.createServer({ pauseOnConnect: true, noDelay: true }, (a) => {
  counters.accepted++;
  const b = net.connect({ host: '127.0.0.1', port: upstreamPort, noDelay: true });
  const fail = () => {
    counters.failed++;
    a.destroy();
    b.destroy();
  };
  if (mode === 'pipe') {
    a.on('error', fail);
    b.on('error', fail);
    a.pipe(b);
    b.pipe(a);
    return;
  }
  a.on('error', fail);
  b.on('error', fail);
  b.once('connect', () => {
    a.off('error', fail);
    b.off('error', fail);
    // A socket that failed meanwhile is destroyed; detaching it would throw.
    if (a.destroyed || b.destroyed) return fail();
    handOver(a, b);
  });
});
server.on('error', (error) => {
  process.stderr.write(`splicer-proxy: ${error.message}\n`);
  process.exit(1);
});
server.listen({ host: '127.0.0.1', port: 0, backlog: 4096 }, () => {
  process.stdout.write(`port ${(server.address() as net.AddressInfo).port}\n`);
});

const stop = (): void => {
  if (mode === 'splicer' && counters.failed > 0) process.stderr.write(`splicer-proxy (${mode}): ${JSON.stringify(counters)}\n`);
  server.close();
  client?.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) stop();
}, 1_000).unref();

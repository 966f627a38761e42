/**
 * The upstream server of the Splicer benchmark's short-connection test: a TCP echo server on 127.0.0.1.
 *
 *   node --import tsx bench/lib/splicer-echo.ts
 *
 * It prints `port <n>` once it listens (a port the kernel picks). Every connection gets back what it sends,
 * and is closed (FIN) once the other side has closed its sending half. It stops on SIGTERM/SIGINT, or by
 * itself once its parent is gone.
 */
import net from 'node:net';

const server = net.createServer({ noDelay: true }, (socket) => {
  socket.on('data', (chunk) => socket.write(chunk));
  socket.on('error', () => socket.destroy());
});
server.on('error', (error) => {
  process.stderr.write(`splicer-echo: ${error.message}\n`);
  process.exit(1);
});
server.listen({ host: '127.0.0.1', port: 0, backlog: 4096 }, () => {
  process.stdout.write(`port ${(server.address() as net.AddressInfo).port}\n`);
});

const stop = (): void => {
  server.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) stop();
}, 1_000).unref();

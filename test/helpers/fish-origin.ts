/**
 * The origin servers of the Fish test topology (notes/fish-kernel.md §10), run inside the origin network
 * namespace (`ip netns exec`): a TCP echo, an HTTP server for one file, and UDP echoes bound one socket per
 * address (a wildcard socket would answer from its own choice of address, not the one the client wrote to).
 *
 *   fish-origin.ts --file PATH --udp-addresses A,B,... [--tcp-port 7] [--http-port 80] [--udp-ports 9000,9001]
 *
 * Every line on stdout is JSON. First {"event":"ready",...} once every socket listens (the only readiness
 * signal: no sleeps), then one line per TCP connection, HTTP request and UDP datagram, naming the local
 * and remote address:port it saw, so tests can check what source address and port reached the origin.
 */
import dgram from 'node:dgram';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { flagReader } from './child-flags.js';

const argv = process.argv.slice(2);
const flag = flagReader(argv);
const file = flag('file');
const tcpPort = Number(flag('tcp-port', '7'));
const httpPort = Number(flag('http-port', '80'));
const udpPorts = flag('udp-ports', '9000,9001').split(',').map(Number);
const udpAddresses = flag('udp-addresses').split(',');
const size = fs.statSync(file).size;

/** Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; tests compare plain addresses. */
const plain = (address: string | undefined): string => (address ?? '').replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/, '');
const log = (line: Record<string, unknown>): void => {
  process.stdout.write(`${JSON.stringify(line)}\n`);
};

const listening: Array<Promise<void>> = [];

const echo = net.createServer((socket) => {
  log({ event: 'tcp', local: plain(socket.localAddress), localPort: socket.localPort, remote: plain(socket.remoteAddress), remotePort: socket.remotePort });
  socket.on('error', () => {});
  socket.pipe(socket);
});
listening.push(new Promise((resolve) => echo.listen({ port: tcpPort, host: '::', ipv6Only: false }, resolve)));

const web = http.createServer((request, response) => {
  const socket = request.socket;
  log({ event: 'http', path: request.url, local: plain(socket.localAddress), localPort: socket.localPort, remote: plain(socket.remoteAddress), remotePort: socket.remotePort });
  if (request.url !== '/file') {
    response.writeHead(404).end();
    return;
  }
  response.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(size) });
  fs.createReadStream(file).pipe(response);
});
web.on('clientError', (_error, socket) => socket.destroy());
listening.push(new Promise((resolve) => web.listen({ port: httpPort, host: '::', ipv6Only: false }, resolve)));

for (const address of udpAddresses) {
  for (const port of udpPorts) {
    const socket = dgram.createSocket({ type: net.isIPv6(address) ? 'udp6' : 'udp4' });
    socket.on('message', (data, remote) => {
      log({ event: 'udp', local: address, localPort: port, remote: remote.address, remotePort: remote.port, bytes: data.length });
      socket.send(data, remote.port, remote.address);
    });
    // A send to a vanished peer can report ICMP errors here; they must not kill the origin.
    socket.on('error', () => {});
    listening.push(new Promise((resolve) => socket.bind(port, address, () => resolve())));
  }
}

await Promise.all(listening);
log({ event: 'ready', pid: process.pid, tcpPort, httpPort, udpPorts, udpAddresses, fileSize: size });
process.on('SIGTERM', () => process.exit(0));

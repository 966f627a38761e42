/**
 * The veth baseline's server in the Bumblebee benchmark, run inside the server namespace:
 *
 *   ip netns exec bbb-s-<pid>-<n> node --import tsx bench/lib/bumblebee-server.ts <address> <port>...
 *
 * Listens on <address>:<port> for each port and serves every connection exactly as the requester serves
 * the sockets Bumblebee accepts (bench/lib/bumblebee-serve.ts: echo, discard or source by port). Prints
 * `{"ready":true}` once every port listens. Each stdin line `counters` prints one JSON line: the serve
 * counters and this namespace's TCP OutSegs (/proc/self/net/snmp: counted per MSS-sized segment even when
 * GSO sends them as one packet). It stops on SIGTERM/SIGINT, on stdin EOF, or by itself once its parent is
 * gone.
 */
import fs from 'node:fs';
import net from 'node:net';
import readline from 'node:readline';
import { newServeCounters, serve, serviceOf } from './bumblebee-serve.js';

const [address, ...portArgs] = process.argv.slice(2);
const ports = portArgs.map(Number);
if (!address || net.isIP(address) === 0 || ports.length === 0 || ports.some((port) => serviceOf(port) === null)) {
  process.stderr.write('usage: bumblebee-server.ts <address> <port>... (ports in 7000-7999, 9000-9999 or 19000-19999)\n');
  process.exit(2);
}

const counters = newServeCounters();
const servers = ports.map((port) => {
  const server = net.createServer((socket) => serve(socket, port, counters));
  server.on('error', (error) => {
    process.stderr.write(`bumblebee-server: ${address}:${port}: ${error.message}\n`);
    process.exit(1);
  });
  return new Promise<net.Server>((resolve) => server.listen({ host: address, port, backlog: 65_535 }, () => resolve(server)));
});
await Promise.all(servers);
process.stdout.write(`${JSON.stringify({ ready: true })}\n`);

function outSegs(): number {
  const lines = fs.readFileSync('/proc/self/net/snmp', 'utf8').split('\n').filter((line) => line.startsWith('Tcp:'));
  const names = lines[0]!.split(/\s+/);
  return Number(lines[1]!.split(/\s+/)[names.indexOf('OutSegs')]);
}

const stop = (): void => process.exit(0);
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  if (line.trim() === 'counters') process.stdout.write(`${JSON.stringify({ ...counters, outSegs: outSegs() })}\n`);
});
lines.on('close', stop);
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) stop();
}, 1_000).unref();

/**
 * A client program for Bumblebee tests, run inside a client network namespace (`ip netns exec`): it
 * makes ordinary kernel TCP connections to destinations that exist nowhere but behind the on-ramp, and
 * checks every byte that comes back against what it sent (the requester side echoes).
 *
 *   echo  --target ADDR:PORT --count N --bytes B [--concurrency C] [--local-port-base P]
 *         N connections, each sends B random bytes and reads the echo; prints one JSON line.
 *   stream --target ADDR:PORT (--seconds S | --until-stdin-eof)
 *         one connection streams random bytes for S seconds (or until stdin closes) while reading the echo,
 *         then half-closes;
 *         prints whether everything came back, byte for byte (sha256 both ways).
 *   hold  --target ADDR:PORT --count N [--local-port-base P]
 *         opens N connections, prints {"ready":N}; each stdin line "ping" makes every connection
 *         echo 16 bytes and prints {"pinged":ok,"failed":n}; stdin EOF closes them and prints the totals.
 */
import crypto from 'node:crypto';
import net from 'node:net';
import readline from 'node:readline';
import { flagReader, splitTarget } from './child-flags.js';

const argv = process.argv.slice(2);
const mode = argv[0];
const flag = flagReader(argv);
const target = flag('target');
const { host, port } = splitTarget(target);
const count = Number(flag('count', '1'));
const localPortBase = Number(flag('local-port-base', '0'));
let resets = 0;
const errors: string[] = [];

const connect = (i: number) =>
  new Promise<net.Socket>((resolve, reject) => {
    const socket = net.connect({ host, port, ...(localPortBase ? { localPort: localPortBase + i } : {}) });
    socket.once('connect', () => resolve(socket));
    socket.once('error', reject);
    socket.on('error', (error: NodeJS.ErrnoException) => {
      if (error.code === 'ECONNRESET') resets++;
      if (errors.length < 10) errors.push(`${i}: ${error.code ?? error.message}`);
    });
  });

/** Sends `data` and resolves with the sha256 of the same number of bytes read back. */
const echo = (socket: net.Socket, data: Buffer) =>
  new Promise<boolean>((resolve) => {
    const hash = crypto.createHash('sha256');
    let received = 0;
    const onData = (chunk: Buffer) => {
      hash.update(chunk);
      received += chunk.length;
      if (received >= data.length) {
        socket.off('data', onData);
        resolve(received === data.length && hash.digest('hex') === crypto.createHash('sha256').update(data).digest('hex'));
      }
    };
    socket.on('data', onData);
    socket.once('close', () => resolve(false));
    socket.write(data);
  });

async function runEcho(): Promise<void> {
  const bytes = Number(flag('bytes', '65536'));
  const concurrency = Number(flag('concurrency', String(count)));
  const started = Date.now();
  let ok = 0;
  let failed = 0;
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const i = next++;
      try {
        const socket = await connect(i);
        const good = await echo(socket, crypto.randomBytes(bytes));
        if (good) ok++;
        else failed++;
        socket.end();
        socket.destroySoon();
      } catch (error) {
        failed++;
        if (errors.length < 10) errors.push(`${i}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  console.log(JSON.stringify({ ok, failed, resets, ms: Date.now() - started, errors }));
}

async function runStream(): Promise<void> {
  const seconds = Number(flag('seconds', '5'));
  const socket = await connect(0);
  const sent = crypto.createHash('sha256');
  const received = crypto.createHash('sha256');
  let sentBytes = 0;
  let receivedBytes = 0;
  socket.on('data', (chunk: Buffer) => {
    received.update(chunk);
    receivedBytes += chunk.length;
  });
  const ended = new Promise<void>((resolve) => socket.once('end', resolve).once('close', resolve));
  const pool = crypto.randomBytes(4 << 20);
  // --until-stdin-eof: a test that must keep the stream going through slow steps (reloads on a loaded
  // machine) says when to stop instead of guessing a duration.
  let stopAt = Date.now() + seconds * 1000;
  if (argv.includes('--until-stdin-eof')) {
    stopAt = Number.POSITIVE_INFINITY;
    process.stdin.once('end', () => (stopAt = 0)).resume();
  }
  while (Date.now() < stopAt && !socket.destroyed) {
    const offset = crypto.randomInt(0, pool.length - 65_536);
    const chunk = pool.subarray(offset, offset + 65_536);
    sent.update(chunk);
    sentBytes += chunk.length;
    if (!socket.write(chunk)) await new Promise((resolve) => socket.once('drain', resolve));
  }
  socket.end();
  await ended;
  const ok = receivedBytes === sentBytes && received.digest('hex') === sent.digest('hex');
  console.log(JSON.stringify({ ok, sentBytes, receivedBytes, resets, errors }));
}

async function runHold(): Promise<void> {
  const sockets: net.Socket[] = [];
  for (let i = 0; i < count; i += 100) {
    const batch = await Promise.all(Array.from({ length: Math.min(100, count - i) }, (_, j) => connect(i + j)));
    sockets.push(...batch);
  }
  console.log(JSON.stringify({ ready: sockets.length }));
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line.trim() !== 'ping') continue;
    const results = await Promise.all(sockets.map((socket) => echo(socket, crypto.randomBytes(16))));
    console.log(JSON.stringify({ pinged: results.filter(Boolean).length, failed: results.filter((r) => !r).length, resets }));
  }
  const closed = sockets.filter((socket) => !socket.destroyed).length;
  for (const socket of sockets) socket.end();
  console.log(JSON.stringify({ closed, resets, errors }));
  setTimeout(() => process.exit(0), 200).unref();
}

const modes: Record<string, () => Promise<void>> = { echo: runEcho, stream: runStream, hold: runHold };
await (modes[mode ?? ''] ?? (() => Promise.reject(new Error(`unknown mode ${mode}`))))();

/**
 * The packet generator and drain of the Fish benchmark (bench/fish.ts), one small Node process each.
 *
 *   node --import tsx bench/lib/fish-blast.ts write     (fds 3.. inherited: where packets go)
 *   node --import tsx bench/lib/fish-blast.ts drain     (fd 3 inherited: read and discard until killed)
 *   ip netns exec <ns> node --import tsx bench/lib/fish-blast.ts pair   (fd 3: a seqpacket socket to the benchmark)
 *
 * `write` takes one JSON request per stdin line, `{fd, packets: [base64...], ms?, rounds?}`, writes the
 * packets round-robin with one `write(2)` each (one SOCK_SEQPACKET message or one tun packet per call) for
 * `ms` milliseconds or `rounds` rounds, whichever ends first, and answers `{sent, errors, elapsedMs}` on
 * stdout. The fd is made blocking, so a full registration socket holds the generator back instead of
 * losing packets at the generator: the generator runs exactly as fast as the receiver lets it. There is no
 * sendmmsg in the addon; a tight `fs.writeSync` loop is what a Node proxy would do, and the benchmark
 * measures its ceiling separately (into a seqpacket pair with nothing behind it but a drain).
 *
 * `pair` makes a SOCK_SEQPACKET pair in the namespace it runs in and sends both ends back over fd 3, then
 * exits. A unix socket's receive queue is capped at `net.unix.max_dgram_qlen` messages of the namespace it
 * was made in (a kernel default of 10; systemd raises it to 512), so the registration socket is made in a
 * "proxy" namespace where the benchmark sets it, instead of inheriting whatever the machine has.
 *
 * `drain` reads fd 3 (blocking) forever, discarding: the proxy's end of a registration socket (replies),
 * or a tun (the kernel baseline's replies). It is killed by pid when the run ends; it counts nothing
 * itself (the benchmark reads the counters of Fish and of the kernel, which cost nothing per packet).
 */
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import readline from 'node:readline';
import { loadNative } from '../../lib/native.js';

interface WriteRequest {
  fd: number;
  packets: string[];
  ms?: number;
  rounds?: number;
}

/** Writes `packets` round-robin to `fd` until `ms` pass or `rounds` rounds are done. */
function blast(request: WriteRequest): { sent: number; errors: number; elapsedMs: number; firstError: string | null } {
  const packets = request.packets.map((text) => Buffer.from(text, 'base64'));
  const rounds = request.rounds ?? Number.POSITIVE_INFINITY;
  const start = performance.now();
  const end = start + (request.ms ?? Number.POSITIVE_INFINITY);
  let sent = 0;
  let errors = 0;
  let firstError: string | null = null;
  // The clock is read once per round (256 writes), not per packet: it costs about as much as a write.
  for (let round = 0; round < rounds; round++) {
    for (const packet of packets) {
      try {
        fs.writeSync(request.fd, packet);
        sent++;
      } catch (error) {
        // A tun whose packets the kernel refuses (ENOBUFS, EIO) must not end the run; count and go on.
        errors++;
        firstError ??= (error as NodeJS.ErrnoException).code ?? String(error);
      }
    }
    if (performance.now() >= end) break;
  }
  return { sent, errors, elapsedMs: performance.now() - start, firstError };
}

function writer(): void {
  const binding = loadNative();
  const blocking = new Set<number>();
  readline.createInterface({ input: process.stdin }).on('line', (line) => {
    let answer: Record<string, unknown>;
    try {
      const request = JSON.parse(line) as WriteRequest;
      if (!blocking.has(request.fd)) {
        binding.setNonblocking(request.fd, false);
        blocking.add(request.fd);
      }
      answer = blast(request);
    } catch (error) {
      answer = { error: (error as Error).message };
    }
    process.stdout.write(`${JSON.stringify(answer)}\n`);
  });
  process.stdout.write('ready\n');
}

function drain(): void {
  loadNative().setNonblocking(3, false);
  const buffer = Buffer.alloc(65_536);
  process.stdout.write('ready\n');
  for (;;) {
    try {
      fs.readSync(3, buffer, 0, buffer.length, null);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      // EAGAIN: the fd is shared with the writer, which may have flipped O_NONBLOCK meanwhile; EINTR: retry.
      if (code === 'EAGAIN' || code === 'EINTR') continue;
      process.stderr.write(`fish-blast drain: ${String(error)}\n`);
      process.exit(1);
    }
  }
}

function pair(): void {
  const binding = loadNative();
  const fds = binding.seqpacketPair();
  const socket = binding.openSeqpacket(3, {
    message: () => {},
    drain: () => {},
    close: () => process.exit(0),
  });
  // The fds travel with the message (SCM_RIGHTS); ours can go once it is sent. The benchmark closes fd 3 when
  // it has them, which ends this process through `close`.
  if (!socket.send(Buffer.from('pair'), fds)) throw new Error('the pair could not be sent at once');
  binding.closeAll(fds);
}

const mode = process.argv[2];
if (mode === 'write') writer();
else if (mode === 'drain') drain();
else if (mode === 'pair') pair();
else {
  process.stderr.write('usage: fish-blast.ts write|drain|pair\n');
  process.exit(2);
}

/**
 * The streaming relays of the hand-over benchmark: set-up, paced traffic, arrival timestamps, and the
 * end-to-end check that not a byte was lost.
 *
 * Each relay is two AF_UNIX stream socket pairs from `binding.streamPair()`: one end of each goes to
 * Splicer (`SplicerClient.start`, fds closed here once the daemon accepts them), the other end (the "near"
 * end, a `net.Socket`) stays in this process. So a relay costs 2 fds here and 2 in the daemon (plus a pipe,
 * 2 fds, per direction while it has bytes in flight).
 *
 * Traffic is paced by one timer (every `tickMs`), so the two CPUs are not saturated and the event loop of
 * this process stays responsive enough to time arrivals:
 *
 * - probe relays: every tick, a chunk each way. Their receivers record the time of every arrival
 *   (`performance.now()`, the monotonic high-resolution clock of `process.hrtime`), so the longest
 *   interval without data around the reload is the pause that relay saw, to within about a tick.
 * - background relays: a chunk each way every `backgroundIntervalMs`, spread evenly over the ticks.
 *
 * Every byte written is hashed (sha256) at the sender and every byte read at the receiver, both ways of
 * every relay; `finish()` half-closes every sender, waits for every receiver's end and every envelope,
 * and compares.
 */
import crypto from 'node:crypto';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import type { ReturnedRelay, SplicerClient } from '../../lib/client/splicer.js';
import type { NativeBinding } from '../../lib/native.js';

/** How the fleet's traffic is paced. */
export interface TrafficSettings {
  /** The pacing timer's period (ms). */
  tickMs: number;
  /** Bytes per write of a probe relay (each way, every tick). */
  probeChunk: number;
  /** Bytes per write of a background relay. */
  backgroundChunk: number;
  /** A background relay writes once each way every this many ms. */
  backgroundIntervalMs: number;
  /** A sender skips its turn while Node holds more than this many of its bytes unwritten (backpressure). */
  maxBuffered: number;
}

/** One direction of one relay. */
interface Flow {
  from: net.Socket;
  to: net.Socket;
  sent: crypto.Hash;
  sentBytes: number;
  received: crypto.Hash;
  receivedBytes: number;
  /** Arrival times (probe relays only). */
  arrivals: number[] | null;
  /** Turns skipped because of backpressure. */
  skipped: number;
  offset: number;
  ended: Promise<void>;
}

interface Relay {
  index: number;
  probe: boolean;
  near: [net.Socket, net.Socket];
  aToB: Flow;
  bToA: Flow;
  done: Promise<ReturnedRelay<number>>;
}

/** What `finish()` found. */
export interface FleetCheck {
  relays: number;
  /** Relays whose bytes arrived intact both ways (sha256 and count), with a `complete` envelope. */
  intact: number;
  /** Bytes sent minus bytes received, over every direction (0 when nothing was lost). */
  bytesLost: number;
  bytesSent: number;
  probeBytes: number;
  backgroundBytes: number;
  /** Socket errors and mismatches, at most 20 described. */
  problems: string[];
  skippedTurns: number;
}

/** Per-relay pause figures of a window. */
export interface GapFigures {
  /** The longest interval without arrivals, per probe relay (max of its two directions), ms. */
  perRelayMs: number[];
  /** When each relay's longest gap ended, relative to `endRef` (negative: before), ms. */
  endsRelativeMs: number[];
}

const POOL = crypto.randomBytes(4 * 1024 * 1024);

function makeSocket(fd: number): net.Socket {
  return new net.Socket({ fd, readable: true, writable: true, allowHalfOpen: true });
}

/** Streaming relays through one Splicer daemon. */
export class RelayFleet {
  readonly #binding: NativeBinding;
  readonly #client: SplicerClient<'fd'>;
  readonly #settings: TrafficSettings;
  readonly #relays: Relay[] = [];
  readonly #problems: string[] = [];
  #timer: NodeJS.Timeout | null = null;
  #recording = false;
  #backgroundCursor = 0;
  #backgroundCredit = 0;

  constructor(binding: NativeBinding, client: SplicerClient<'fd'>, settings: TrafficSettings) {
    this.#binding = binding;
    this.#client = client;
    this.#settings = settings;
  }

  get size(): number {
    return this.#relays.length;
  }

  #problem(text: string): void {
    if (this.#problems.length < 20) this.#problems.push(text);
  }

  #flow(from: net.Socket, to: net.Socket, probe: boolean, what: string): Flow {
    const flow: Flow = {
      from,
      to,
      sent: crypto.createHash('sha256'),
      sentBytes: 0,
      received: crypto.createHash('sha256'),
      receivedBytes: 0,
      arrivals: probe ? [] : null,
      skipped: 0,
      offset: crypto.randomInt(0, POOL.length),
      ended: Promise.resolve(),
    };
    flow.ended = new Promise<void>((resolve) => {
      to.on('data', (chunk: Buffer) => {
        if (flow.arrivals && this.#recording) flow.arrivals.push(performance.now());
        flow.received.update(chunk);
        flow.receivedBytes += chunk.length;
      });
      to.once('end', () => resolve());
      to.once('close', () => resolve());
    });
    to.on('error', (error: NodeJS.ErrnoException) => this.#problem(`${what}: receiver: ${error.code ?? error.message}`));
    return flow;
  }

  /**
   * Sets up `count` relays (the first `probes` of them are probes), `concurrency` hand-overs at a time.
   * Traffic does not start until `start()`.
   */
  async add(count: number, probes: number, concurrency = 48): Promise<void> {
    let next = 0;
    const loop = async () => {
      while (next < count) {
        const index = next++;
        const probe = index < probes;
        const [a, nearA] = this.#binding.streamPair();
        const [b, nearB] = this.#binding.streamPair();
        const sockets: [net.Socket, net.Socket] = [makeSocket(nearA), makeSocket(nearB)];
        for (const [side, socket] of [['A', sockets[0]], ['B', sockets[1]]] as const) {
          socket.on('error', (error: NodeJS.ErrnoException) => this.#problem(`relay ${index} side ${side}: ${error.code ?? error.message}`));
        }
        let started;
        try {
          started = await this.#client.start(a, b, { i: index });
        } catch (error) {
          this.#binding.closeAll((error as { fds?: number[] }).fds ?? []);
          for (const socket of sockets) socket.destroy();
          throw error;
        }
        this.#relays.push({
          index,
          probe,
          near: sockets,
          aToB: this.#flow(sockets[0], sockets[1], probe, `relay ${index} A->B`),
          bToA: this.#flow(sockets[1], sockets[0], probe, `relay ${index} B->A`),
          done: started.done,
        });
      }
    };
    await Promise.all(Array.from({ length: concurrency }, loop));
    this.#relays.sort((x, y) => x.index - y.index);
  }

  #write(flow: Flow, size: number): void {
    if (flow.from.writableLength > this.#settings.maxBuffered) {
      flow.skipped++;
      return;
    }
    if (flow.offset + size > POOL.length) flow.offset = 0;
    const data = POOL.subarray(flow.offset, flow.offset + size);
    flow.offset += size + 1;
    flow.sent.update(data);
    flow.sentBytes += data.length;
    flow.from.write(data);
  }

  #tick = (): void => {
    const { probeChunk, backgroundChunk, backgroundIntervalMs, tickMs } = this.#settings;
    const background: Relay[] = [];
    for (const relay of this.#relays) {
      if (relay.probe) {
        this.#write(relay.aToB, probeChunk);
        this.#write(relay.bToA, probeChunk);
      } else {
        background.push(relay);
      }
    }
    if (background.length === 0) return;
    // Each background relay once per backgroundIntervalMs: that many relays per tick, round robin.
    this.#backgroundCredit += (background.length * tickMs) / backgroundIntervalMs;
    const turns = Math.floor(this.#backgroundCredit);
    this.#backgroundCredit -= turns;
    for (let i = 0; i < turns; i++) {
      const relay = background[this.#backgroundCursor++ % background.length]!;
      this.#write(relay.aToB, backgroundChunk);
      this.#write(relay.bToA, backgroundChunk);
    }
  };

  /** Starts the paced traffic. */
  start(): void {
    if (!this.#timer) this.#timer = setInterval(this.#tick, this.#settings.tickMs);
  }

  /** Records probe arrivals from now on (after a warm-up), or stops recording. */
  record(on: boolean): void {
    this.#recording = on;
  }

  /** Bytes received so far over every direction. */
  receivedBytes(): number {
    let total = 0;
    for (const relay of this.#relays) total += relay.aToB.receivedBytes + relay.bToA.receivedBytes;
    return total;
  }

  /**
   * The longest interval without arrivals of each probe relay that overlaps [from, to] (both
   * directions; the relay's figure is the larger), and when it ended relative to `endRef`.
   */
  gaps(from: number, to: number, endRef: number): GapFigures {
    const perRelayMs: number[] = [];
    const endsRelativeMs: number[] = [];
    for (const relay of this.#relays) {
      if (!relay.probe) continue;
      let longest = 0;
      let endedAt = Number.NaN;
      for (const flow of [relay.aToB, relay.bToA]) {
        const times = flow.arrivals!;
        for (let i = 1; i < times.length; i++) {
          const start = times[i - 1]!;
          const end = times[i]!;
          if (end < from || start > to) continue;
          if (end - start > longest) {
            longest = end - start;
            endedAt = end;
          }
        }
      }
      perRelayMs.push(longest);
      endsRelativeMs.push(endedAt - endRef);
    }
    return { perRelayMs, endsRelativeMs };
  }

  /**
   * Stops the traffic, half-closes every sender, waits (up to `ms`) for every receiver's end and every
   * envelope, compares what was sent with what arrived, and closes everything.
   */
  async finish(ms = 60_000): Promise<FleetCheck> {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
    this.#recording = false;
    for (const relay of this.#relays) {
      relay.near[0].end();
      relay.near[1].end();
    }
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), ms)));
    const everything = Promise.all(
      this.#relays.map(async (relay) => {
        await Promise.all([relay.aToB.ended, relay.bToA.ended]);
        return relay.done;
      }),
    );
    const outcome = await Promise.race([everything, timeout]);
    clearTimeout(timer);
    if (outcome === 'timeout') {
      this.#problem(`not every relay ended within ${ms} ms`);
      // Whatever comes back later is closed when it comes.
      for (const relay of this.#relays) void relay.done.then((late) => this.#binding.closeAll([late.a, late.b]));
    }
    const check: FleetCheck = {
      relays: this.#relays.length,
      intact: 0,
      bytesLost: 0,
      bytesSent: 0,
      probeBytes: 0,
      backgroundBytes: 0,
      problems: this.#problems,
      skippedTurns: 0,
    };
    const returned = outcome === 'timeout' ? null : outcome;
    this.#relays.forEach((relay, i) => {
      let intact = true;
      for (const [name, flow] of [['A->B', relay.aToB], ['B->A', relay.bToA]] as const) {
        check.bytesSent += flow.sentBytes;
        check.bytesLost += flow.sentBytes - flow.receivedBytes;
        check.skippedTurns += flow.skipped;
        if (relay.probe) check.probeBytes += flow.receivedBytes;
        else check.backgroundBytes += flow.receivedBytes;
        const sent = flow.sent.digest('hex');
        const received = flow.received.digest('hex');
        if (sent !== received || flow.sentBytes !== flow.receivedBytes) {
          intact = false;
          this.#problem(`relay ${relay.index} ${name}: sent ${flow.sentBytes} B, received ${flow.receivedBytes} B, sha256 ${sent === received ? 'equal' : 'differs'}`);
        }
      }
      const envelope = returned?.[i]?.envelope;
      if (!envelope) {
        intact = false;
      } else {
        if (envelope.reason !== 'complete') {
          intact = false;
          this.#problem(`relay ${relay.index}: envelope reason ${envelope.reason} (${String(envelope.code)})`);
        }
        if (envelope.bytesAToB !== relay.aToB.sentBytes || envelope.bytesBToA !== relay.bToA.sentBytes) {
          intact = false;
          this.#problem(`relay ${relay.index}: the envelope counts ${envelope.bytesAToB}/${envelope.bytesBToA} B, sent ${relay.aToB.sentBytes}/${relay.bToA.sentBytes} B`);
        }
      }
      if (intact) check.intact++;
    });
    if (returned) for (const relay of returned) this.#binding.closeAll([relay.a, relay.b]);
    this.close();
    return check;
  }

  /** Stops the traffic and destroys every near end (also after a failure). */
  close(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
    for (const relay of this.#relays) for (const socket of relay.near) socket.destroy();
  }
}

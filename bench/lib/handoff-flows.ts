/**
 * Paced, hashed, optionally timestamped traffic both ways over the near ends of relays: what the
 * hand-over benchmark runs on the main thread (background relays) and in its probe worker (probe relays).
 *
 * One timer every `tickMs`; each relay writes `chunk` bytes each way once every `intervalMs` (every tick
 * when `intervalMs <= tickMs`), the relays taking turns round robin so the writes spread evenly over the
 * ticks. A sender skips its turn while Node holds more than `maxBuffered` of its bytes unwritten.
 * Every byte written is hashed (sha256) at the sender and every byte read at the receiver. With
 * `timestamps`, receivers record the time of every arrival on the shared clock {@link now} (the
 * monotonic high-resolution clock behind `process.hrtime`, offset to be comparable across threads).
 */
import crypto from 'node:crypto';
import net from 'node:net';
import { performance } from 'node:perf_hooks';

/** Milliseconds on a clock every thread of the process shares (`timeOrigin` differs per thread). */
export const now = (): number => performance.timeOrigin + performance.now();

/** How a group's traffic is paced. */
export interface PaceSettings {
  tickMs: number;
  chunk: number;
  intervalMs: number;
  maxBuffered: number;
  timestamps: boolean;
}

/** The outcome of one direction. */
export interface FlowResult {
  sentBytes: number;
  receivedBytes: number;
  sentSha256: string;
  receivedSha256: string;
  skipped: number;
}

/** The outcome of one relay, both ways. */
export interface RelayFlows {
  index: number;
  aToB: FlowResult;
  bToA: FlowResult;
}

/** Per-relay longest gaps of a window. */
export interface GapFigures {
  /** The longest interval without arrivals, per relay (max of its two directions), ms. */
  perRelayMs: number[];
  /** When each relay's longest gap ended, relative to `endRef` (negative: before), ms. */
  endsRelativeMs: number[];
}

interface Flow {
  from: net.Socket;
  to: net.Socket;
  sent: crypto.Hash;
  sentBytes: number;
  received: crypto.Hash;
  receivedBytes: number;
  arrivals: number[] | null;
  skipped: number;
  offset: number;
  ended: Promise<void>;
}

interface Relay {
  index: number;
  sockets: [net.Socket, net.Socket];
  aToB: Flow;
  bToA: Flow;
}

const POOL = crypto.randomBytes(4 * 1024 * 1024);

/** Wraps a near end; the socket owns the fd from here on. */
export function nearSocket(fd: number): net.Socket {
  return new net.Socket({ fd, readable: true, writable: true, allowHalfOpen: true });
}

/** The traffic of a group of relays. */
export class TrafficGroup {
  readonly #settings: PaceSettings;
  readonly #relays: Relay[] = [];
  readonly problems: string[] = [];
  #timer: NodeJS.Timeout | null = null;
  #recording = false;
  #cursor = 0;
  #credit = 0;

  constructor(settings: PaceSettings) {
    this.#settings = settings;
  }

  get size(): number {
    return this.#relays.length;
  }

  #problem(text: string): void {
    if (this.problems.length < 20) this.problems.push(text);
  }

  #flow(from: net.Socket, to: net.Socket): Flow {
    const flow: Flow = {
      from,
      to,
      sent: crypto.createHash('sha256'),
      sentBytes: 0,
      received: crypto.createHash('sha256'),
      receivedBytes: 0,
      arrivals: this.#settings.timestamps ? [] : null,
      skipped: 0,
      offset: crypto.randomInt(0, POOL.length - this.#settings.chunk),
      ended: Promise.resolve(),
    };
    flow.ended = new Promise<void>((resolve) => {
      to.on('data', (chunk: Buffer) => {
        if (flow.arrivals && this.#recording) flow.arrivals.push(now());
        flow.received.update(chunk);
        flow.receivedBytes += chunk.length;
      });
      to.once('end', () => resolve());
      to.once('close', () => resolve());
    });
    return flow;
  }

  /** Adds a relay by its two near ends (A's and B's). */
  add(index: number, a: net.Socket, b: net.Socket): void {
    for (const [side, socket] of [['A', a], ['B', b]] as const) {
      socket.on('error', (error: NodeJS.ErrnoException) => this.#problem(`relay ${index} side ${side}: ${error.code ?? error.message}`));
    }
    this.#relays.push({ index, sockets: [a, b], aToB: this.#flow(a, b), bToA: this.#flow(b, a) });
  }

  #write(flow: Flow): void {
    const size = this.#settings.chunk;
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
    const relays = this.#relays;
    if (relays.length === 0) return;
    const { tickMs, intervalMs } = this.#settings;
    this.#credit += (relays.length * tickMs) / intervalMs;
    const turns = Math.min(relays.length, Math.floor(this.#credit));
    this.#credit -= turns;
    if (this.#credit > relays.length) this.#credit = relays.length;
    for (let i = 0; i < turns; i++) {
      const relay = relays[this.#cursor++ % relays.length]!;
      this.#write(relay.aToB);
      this.#write(relay.bToA);
    }
  };

  start(): void {
    if (!this.#timer) this.#timer = setInterval(this.#tick, this.#settings.tickMs);
  }

  /** Records arrivals (with `timestamps`) from now on, or stops recording. */
  record(on: boolean): void {
    this.#recording = on;
  }

  receivedBytes(): number {
    let total = 0;
    for (const relay of this.#relays) total += relay.aToB.receivedBytes + relay.bToA.receivedBytes;
    return total;
  }

  /**
   * Per relay, the longest interval between two arrivals (either direction) that overlaps [from, to],
   * and when it ended relative to `endRef` (all on the {@link now} clock).
   */
  gaps(from: number, to: number, endRef: number): GapFigures {
    const perRelayMs: number[] = [];
    const endsRelativeMs: number[] = [];
    for (const relay of this.#relays) {
      let longest = 0;
      let endedAt = Number.NaN;
      for (const flow of [relay.aToB, relay.bToA]) {
        const times = flow.arrivals ?? [];
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
   * Stops the traffic, half-closes every sender and waits (up to `ms`) for every receiver's end; then
   * reports both directions of every relay and destroys the sockets.
   */
  async finish(ms: number): Promise<RelayFlows[]> {
    this.stop();
    this.#recording = false;
    for (const relay of this.#relays) {
      relay.sockets[0].end();
      relay.sockets[1].end();
    }
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), ms)));
    const ended = Promise.all(this.#relays.flatMap((relay) => [relay.aToB.ended, relay.bToA.ended]));
    if ((await Promise.race([ended, timeout])) === 'timeout') this.#problem(`not every receiver saw its end within ${ms} ms`);
    clearTimeout(timer);
    const result = (flow: Flow): FlowResult => ({
      sentBytes: flow.sentBytes,
      receivedBytes: flow.receivedBytes,
      sentSha256: flow.sent.digest('hex'),
      receivedSha256: flow.received.digest('hex'),
      skipped: flow.skipped,
    });
    const flows = this.#relays.map((relay) => ({ index: relay.index, aToB: result(relay.aToB), bToA: result(relay.bToA) }));
    this.close();
    return flows;
  }

  stop(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
  }

  /** Stops the traffic and destroys every socket (also after a failure). */
  close(): void {
    this.stop();
    for (const relay of this.#relays) for (const socket of relay.sockets) socket.destroy();
  }
}

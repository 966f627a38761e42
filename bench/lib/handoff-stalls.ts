/**
 * Where the time of a gap went, for the hand-over benchmark: stalls of this process's event loop and
 * whether this thread was running or waiting for a CPU meanwhile, plus the machine's CPU use.
 *
 * An arrival is timestamped when the event loop gets to it, so a stall of this loop lengthens every gap
 * measured across it. `perf_hooks.monitorEventLoopDelay` gives the size of such stalls; the
 * {@link StallMonitor} also says, from `/proc/thread-self/schedstat` (time on a CPU and time waiting in the
 * run queue, in ns), whether a stall was this process's own work (JavaScript, GC: "ran") or the thread
 * was runnable and got no CPU ("waited": the machine is busy elsewhere).
 */
import fs from 'node:fs';
import { now } from './handoff-flows.js';

/** One stall of the event loop. */
export interface Stall {
  /** When the loop got going again (the shared clock of handoff-flows.ts, `now()`). */
  endAt: number;
  ms: number;
  /** Time on a CPU during the stall (this thread). */
  ranMs: number;
  /** Time runnable but waiting for a CPU during the stall (this thread). */
  waitedMs: number;
}

function schedstat(): [number, number] {
  try {
    const [run, wait] = fs.readFileSync('/proc/thread-self/schedstat', 'utf8').split(' ');
    return [Number(run) / 1e6, Number(wait) / 1e6];
  } catch {
    return [Number.NaN, Number.NaN];
  }
}

/** Records every interval of more than `thresholdMs` between 1 ms ticks of the event loop. */
export class StallMonitor {
  readonly #thresholdMs: number;
  readonly stalls: Stall[] = [];
  #timer: NodeJS.Timeout | null = null;
  #last = 0;
  #lastRun = 0;
  #lastWait = 0;

  constructor(thresholdMs = 10) {
    this.#thresholdMs = thresholdMs;
  }

  start(): void {
    this.#last = now();
    [this.#lastRun, this.#lastWait] = schedstat();
    this.#timer = setInterval(() => {
      const time = now();
      const [run, wait] = schedstat();
      if (time - this.#last > this.#thresholdMs) {
        this.stalls.push({ endAt: time, ms: time - this.#last, ranMs: run - this.#lastRun, waitedMs: wait - this.#lastWait });
      }
      this.#last = time;
      this.#lastRun = run;
      this.#lastWait = wait;
    }, 1);
  }

  stop(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
  }

  /** The longest stall that overlaps [from, to], or null. */
  longestIn(from: number, to: number): Stall | null {
    let longest: Stall | null = null;
    for (const stall of this.stalls) {
      if (stall.endAt < from || stall.endAt - stall.ms > to) continue;
      if (!longest || stall.ms > longest.ms) longest = stall;
    }
    return longest;
  }
}

/** Busy and total jiffies of the whole machine (/proc/stat). */
export interface MachineCpu {
  busy: number;
  total: number;
}

export function machineCpu(): MachineCpu {
  const line = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
  const fields = line.trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user.
  const total = fields.slice(0, 8).reduce((sum, value) => sum + value, 0);
  const idle = fields[3]! + fields[4]!;
  return { busy: total - idle, total };
}

/** The machine's CPU use between two readings, in percent of one CPU (so up to 100 x CPUs). */
export function machineBusyPercent(before: MachineCpu, after: MachineCpu, cpus: number): number {
  const total = after.total - before.total;
  return total > 0 ? ((after.busy - before.busy) / total) * 100 * cpus : Number.NaN;
}

/** The 1-minute load average. */
export function loadAverage(): number {
  try {
    return Number(fs.readFileSync('/proc/loadavg', 'utf8').split(' ')[0]);
  } catch {
    return Number.NaN;
  }
}

/** What {@link waitForQuiet} saw. */
export interface QuietReading {
  /** How long it waited for the machine to calm down (ms). */
  waitedMs: number;
  /** CPU use of everything but this process over the last sample, percent of one CPU. */
  othersPercent: number;
  quiet: boolean;
}

/**
 * Waits (up to `maxWaitMs`) until the rest of the machine uses less than `thresholdPercent` of one CPU
 * over a `sampleMs` sample: on a shared 2-core machine another job's burst would otherwise be measured
 * as pause. Resolves either way; `quiet` says which.
 */
export async function waitForQuiet(maxWaitMs: number, thresholdPercent: number, cpus: number, sampleMs = 500): Promise<QuietReading> {
  const started = Date.now();
  for (;;) {
    const machineBefore = machineCpu();
    const ownBefore = process.cpuUsage();
    const wallBefore = Date.now();
    await new Promise((resolve) => setTimeout(resolve, sampleMs));
    const own = process.cpuUsage(ownBefore);
    const ownPercent = ((own.user + own.system) / 1e3 / Math.max(1, Date.now() - wallBefore)) * 100;
    const othersPercent = machineBusyPercent(machineBefore, machineCpu(), cpus) - ownPercent;
    const waitedMs = Date.now() - started;
    if (othersPercent < thresholdPercent) return { waitedMs, othersPercent, quiet: true };
    if (waitedMs >= maxWaitMs) return { waitedMs, othersPercent, quiet: false };
  }
}

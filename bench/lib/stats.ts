/**
 * Small statistics for benchmarks: percentiles of latency samples, medians across runs, ratios.
 */

/**
 * The `p`-th percentile (0–100) of `values`, linearly interpolated between the closest ranks (the
 * "type 7" definition of R and NumPy). `values` need not be sorted; it is not modified.
 */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  if (!(p >= 0 && p <= 100)) throw new RangeError(`percentile must be within 0..100, got ${p}`);
  const sorted = [...values].sort((a, b) => a - b);
  const rank = (p / 100) * (sorted.length - 1);
  const low = Math.floor(rank);
  const high = Math.ceil(rank);
  return sorted[low]! + (sorted[high]! - sorted[low]!) * (rank - low);
}

/** The median of `values` (NaN for none). */
export function median(values: readonly number[]): number {
  return percentile(values, 50);
}

/** The arithmetic sum. */
export function sum(values: readonly number[]): number {
  let total = 0;
  for (const value of values) total += value;
  return total;
}

/** `a / b`, or NaN when `b` is 0 or either side is not finite. */
export function ratio(a: number, b: number): number {
  return Number.isFinite(a) && Number.isFinite(b) && b !== 0 ? a / b : Number.NaN;
}

/** Rounds to `digits` significant digits, keeping integers >= 10^digits whole (for readable JSON). */
export function round(value: number, digits = 4): number {
  if (!Number.isFinite(value) || value === 0) return value;
  const magnitude = Math.floor(Math.log10(Math.abs(value))) + 1;
  const decimals = Math.max(0, digits - magnitude);
  const factor = 10 ** decimals;
  return Math.round(value * factor) / factor;
}

/** Summary of one series of round-trip samples, in microseconds, and the rate they add up to. */
export interface LatencySummary {
  /** Requests per second: requests divided by the sum of their round trips. */
  rps: number;
  p50Us: number;
  p99Us: number;
}

/** Summarises round-trip samples given in milliseconds. */
export function summariseLatencies(samplesMs: readonly number[]): LatencySummary {
  const totalMs = sum(samplesMs);
  return {
    rps: totalMs > 0 ? (samplesMs.length * 1000) / totalMs : Number.NaN,
    p50Us: percentile(samplesMs, 50) * 1000,
    p99Us: percentile(samplesMs, 99) * 1000,
  };
}

/** The per-key median over several runs of the same figures. */
export function medianOfRuns<K extends string>(runs: ReadonlyArray<Record<K, number>>): Record<K, number> {
  const result = {} as Record<K, number>;
  if (runs.length === 0) return result;
  for (const key of Object.keys(runs[0]!) as K[]) result[key] = median(runs.map((run) => run[key]));
  return result;
}

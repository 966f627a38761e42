/**
 * The interface every benchmark module implements, so `bench/run.ts` can dispatch to it by name.
 *
 * A module exports `description`, `run(options)` and optionally `formatTable(result)` and `defaultRuns`.
 * `run` resolves with one JSON-serialisable object: the figures, printed as the last stdout line.
 */

import type { Placement } from './process.js';

/** What `bench/run.ts` passes to a benchmark. */
export interface BenchOptions {
  /** Where processes run (already applied to this process; `spawnTs`/`forkTs` apply it to children). */
  placement: Placement;
  /** How many alternating runs of each compared system (the figures are medians over them). */
  runs: number;
  /** Whether the caller wants JSON only (progress still goes to stderr). */
  json: boolean;
  /** Writes one progress line (to stderr, so stdout stays the result). */
  progress: (line: string) => void;
}

/** A benchmark module as `bench/run.ts` sees it. */
export interface BenchModule {
  /** One line for the list of benchmarks. */
  readonly description: string;
  /** Runs used when `--runs` is not given (5 if the module does not say). */
  readonly defaultRuns?: number;
  run(options: BenchOptions): Promise<Record<string, unknown>>;
  /** A readable table of a result, printed to stdout without `--json`. */
  formatTable?(result: Record<string, unknown>): string;
}

/** Formats a number for a table: thousands separators, `digits` decimals below 100, none above. */
export function formatNumber(value: number, digits = 1): string {
  if (!Number.isFinite(value)) return String(value);
  const decimals = Math.abs(value) >= 100 ? 0 : digits;
  return value.toLocaleString('en-US', { minimumFractionDigits: decimals, maximumFractionDigits: decimals });
}

/** Lays out rows as a text table; the first row is the header; columns after the first are right-aligned. */
export function textTable(rows: string[][]): string {
  const widths = rows[0]!.map((_, column) => Math.max(...rows.map((row) => (row[column] ?? '').length)));
  const line = (row: string[]) =>
    row.map((cell, column) => (column === 0 ? cell.padEnd(widths[column]!) : cell.padStart(widths[column]!))).join('  ');
  const [header, ...body] = rows;
  return [line(header!), widths.map((width) => '-'.repeat(width)).join('  '), ...body.map(line)].join('\n');
}

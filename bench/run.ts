/**
 * The benchmark runner.
 *
 *   npm run bench                                   lists the benchmarks
 *   npm run bench -- <name> [--json] [--runs N] [--pin none|same|split]     runs one
 *
 * Progress goes to stderr. Stdout gets a readable table (unless `--json`) and, always as its last line,
 * one JSON object with the figures, so scripts can read `tail -n 1`.
 *
 * A benchmark is a module implementing {@link BenchModule} (bench/lib/bench.ts); add it to `benchmarks`.
 */
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';
import type { BenchModule } from './lib/bench.js';
import { PLACEMENTS, liveChildren, setPlacement, type Placement } from './lib/process.js';

/** Every benchmark, by name; modules load only when asked for. */
export const benchmarks = {
  ipc: () => import('./ipc.js'),
  splicer: () => import('./splicer.js'),
  handoff: () => import('./handoff.js'),
  fdstore: () => import('./fdstore.js'),
  bumblebee: () => import('./bumblebee.js'),
  fish: () => import('./fish.js'),
} satisfies Record<string, () => Promise<BenchModule>>;

export type BenchmarkName = keyof typeof benchmarks;

const USAGE = `usage: npm run bench -- <name> [--json] [--runs N] [--pin ${PLACEMENTS.join('|')}]

  --json    stdout is only the JSON result (progress still goes to stderr)
  --runs N  alternating runs per system; figures are medians over them (default 5)
  --pin     none: leave CPU placement to the scheduler (default); same: this process and its
            children on CPU 0; split: this process on CPU 0, children on CPU 1 (taskset)`;

function isBenchmark(name: string): name is BenchmarkName {
  return Object.hasOwn(benchmarks, name);
}

async function list(): Promise<string> {
  const lines = ['benchmarks:'];
  for (const [name, load] of Object.entries(benchmarks) as Array<[string, () => Promise<BenchModule>]>) {
    let description: string;
    try {
      description = (await load()).description;
    } catch (error) {
      description = `(cannot load: ${(error as Error).message.split('\n')[0]})`;
    }
    lines.push(`  ${name.padEnd(10)} ${description}`);
  }
  lines.push('', USAGE);
  return lines.join('\n');
}

export async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: {
        json: { type: 'boolean', default: false },
        runs: { type: 'string' },
        pin: { type: 'string', default: 'none' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (error) {
    process.stderr.write(`${(error as Error).message}\n${USAGE}\n`);
    return 2;
  }
  const { values, positionals } = parsed;
  const name = positionals[0];
  if (values.help || name === undefined) {
    process.stdout.write(`${await list()}\n`);
    return 0;
  }
  if (positionals.length > 1) {
    process.stderr.write(`one benchmark at a time, got: ${positionals.join(' ')}\n${USAGE}\n`);
    return 2;
  }
  if (!isBenchmark(name)) {
    process.stderr.write(`unknown benchmark "${name}"\n${await list()}\n`);
    return 2;
  }
  const module: BenchModule = await benchmarks[name]();
  let runs = module.defaultRuns ?? 5;
  if (values.runs !== undefined) {
    runs = Number(values.runs);
    if (!Number.isInteger(runs) || runs < 1 || runs > 1000) {
      process.stderr.write(`--runs must be a whole number from 1 to 1000, got "${values.runs}"\n`);
      return 2;
    }
  }
  if (!(PLACEMENTS as readonly string[]).includes(values.pin)) {
    process.stderr.write(`--pin must be one of ${PLACEMENTS.join(', ')}, got "${values.pin}"\n`);
    return 2;
  }
  const placement = values.pin as Placement;
  setPlacement(placement);
  const result = await module.run({
    runs,
    placement,
    json: values.json,
    progress: (line) => process.stderr.write(`${line}\n`),
  });
  if (!values.json && module.formatTable) process.stdout.write(`\n${module.formatTable(result)}\n\n`);
  process.stdout.write(`${JSON.stringify(result)}\n`);
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).then(
    (code) => {
      const left = liveChildren();
      if (left.length) process.stderr.write(`bench: child processes still running: ${left.join(', ')}\n`);
      process.exitCode = code;
    },
    (error: unknown) => {
      process.stderr.write(`bench failed: ${(error as Error)?.stack ?? String(error)}\n`);
      process.exitCode = 1;
      // The process 'exit' hook of bench/lib/process.ts kills any child still running.
      process.exit(1);
    },
  );
}

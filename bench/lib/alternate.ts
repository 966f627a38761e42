/**
 * Alternation of the systems under comparison, so that slow drift of the machine (thermal throttling, a
 * noisy neighbour, page cache) spreads over every system instead of favouring whichever ran first.
 */

/**
 * The order in which `systems` run in run number `run` (0-based): the list rotated by one position per
 * run. With two systems that is A B, B A, A B, ...; with three, A B C, B C A, C A B, ...
 */
export function orderForRun<T>(systems: readonly T[], run: number): T[] {
  if (systems.length === 0) return [];
  const shift = run % systems.length;
  return [...systems.slice(shift), ...systems.slice(0, shift)];
}

/** One measured run of one system. */
export interface RunRecord<S extends string, R> {
  run: number;
  system: S;
  result: R;
}

/**
 * Runs every system `runs` times, alternating their order from run to run, and returns the results per
 * system in run order. `measure` is awaited one at a time: systems never run concurrently.
 */
export async function alternate<S extends string, R>(
  systems: readonly S[],
  runs: number,
  measure: (system: S, run: number) => Promise<R>,
  onDone?: (record: RunRecord<S, R>) => void,
): Promise<Record<S, R[]>> {
  const results = Object.fromEntries(systems.map((system) => [system, [] as R[]])) as Record<S, R[]>;
  for (let run = 0; run < runs; run++) {
    for (const system of orderForRun(systems, run)) {
      const result = await measure(system, run);
      results[system].push(result);
      onDone?.({ run, system, result });
    }
  }
  return results;
}

/**
 * The Splicer daemon, unchanged, plus a heap probe for the benchmark's idle-scale test.
 *
 *   node --import tsx bench/lib/splicer-daemon.ts splicer --socket <path> ...      (the CLI's arguments)
 *
 * It installs one signal handler and then runs `services/cli.ts` in this same process with the same
 * arguments, so everything else is exactly `fdferry splicer`. On SIGUSR2 (which the daemon does not use)
 * it runs a full garbage collection and prints one stdout line, `heap {...}`, with V8's heap figures and
 * `process.memoryUsage()`: the JavaScript heap of the daemon seen from inside, which /proc cannot show.
 * Start the daemon with `--log-level warn` (or quieter) so its own log lines stay off stdout.
 */
import v8 from 'node:v8';
import vm from 'node:vm';

// `--expose-gc` set at run time: `gc` appears in contexts created from now on.
v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

process.on('SIGUSR2', () => {
  gc();
  gc();
  const heap = v8.getHeapStatistics();
  const memory = process.memoryUsage();
  const figures = {
    usedHeapSize: heap.used_heap_size,
    totalHeapSize: heap.total_heap_size,
    mallocedMemory: heap.malloced_memory,
    external: memory.external,
    arrayBuffers: memory.arrayBuffers,
    rss: memory.rss,
  };
  process.stdout.write(`heap ${JSON.stringify(figures)}\n`);
});

await import('../../services/cli.js');

/**
 * The probe relays' end of the hand-over benchmark, in a worker thread of the benchmark process.
 *
 * The probes' near ends live on this thread's own event loop, so their arrival timestamps are not held
 * up by the main thread's work (the background relays' traffic, the burst of reads when thousands of
 * relays resume at once, the control connection). The main thread sets up every relay and passes the
 * probes' near fds here by number (fds belong to the process, not to a thread).
 *
 * Requests from the main thread are `{ id, op, ... }`; every one is answered `{ id, ok, result | error }`.
 */
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { parentPort, workerData } from 'node:worker_threads';
import { TrafficGroup, nearSocket, type PaceSettings } from './handoff-flows.js';
import { StallMonitor } from './handoff-stalls.js';

/** What the main thread may ask. */
export type ProbeRequest =
  | { op: 'add'; relays: Array<{ index: number; fdA: number; fdB: number }> }
  | { op: 'start' }
  | { op: 'record'; on: boolean }
  | { op: 'delay' }
  | { op: 'gaps'; from: number; to: number; endRef: number }
  | { op: 'stall'; from: number; to: number }
  | { op: 'received' }
  | { op: 'finish'; ms: number }
  | { op: 'close' };

const port = parentPort;
if (!port) throw new Error('bench/lib/handoff-probe-worker.ts runs as a worker thread');

const group = new TrafficGroup(workerData as PaceSettings);
const delay = monitorEventLoopDelay({ resolution: 1 });
const stalls = new StallMonitor(10);

async function handle(request: ProbeRequest): Promise<unknown> {
  switch (request.op) {
    case 'add':
      for (const { index, fdA, fdB } of request.relays) group.add(index, nearSocket(fdA), nearSocket(fdB));
      return group.size;
    case 'start':
      group.start();
      return null;
    case 'record':
      group.record(request.on);
      if (request.on) {
        delay.enable();
        stalls.start();
      } else {
        delay.disable();
        stalls.stop();
      }
      return null;
    case 'delay': {
      // The event-loop delay since the last 'delay' (or since recording started), in ms; then starts over.
      const figures = { p99: delay.percentile(99) / 1e6, max: delay.max / 1e6 };
      delay.reset();
      return figures;
    }
    case 'gaps':
      return group.gaps(request.from, request.to, request.endRef);
    case 'stall':
      return stalls.longestIn(request.from, request.to);
    case 'received':
      return group.receivedBytes();
    case 'finish':
      delay.disable();
      stalls.stop();
      return { flows: await group.finish(request.ms), problems: group.problems };
    case 'close':
      delay.disable();
      stalls.stop();
      group.close();
      return null;
  }
}

port.on('message', (message: ProbeRequest & { id: number }) => {
  handle(message).then(
    (result) => port.postMessage({ id: message.id, ok: true, result }),
    (error: unknown) => port.postMessage({ id: message.id, ok: false, error: (error as Error)?.stack ?? String(error) }),
  );
});

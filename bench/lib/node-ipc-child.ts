/**
 * The Node side of the IPC benchmark: a child started with `child_process.fork`, receiving messages and
 * handles through Node's built-in IPC channel (`process.on('message', (message, handle) => ...)`).
 *
 * Each message is `{id, last}`, with or without one handle (a `net.Socket`; Node carries at most one per
 * message). The child closes every socket it receives at once, and when a message says `last` it
 * answers `{id, n}` with the number of handles received since its previous answer. It says `{ready:
 * true}` once it listens and exits when the IPC channel closes.
 */
import type { Socket } from 'node:net';

if (!process.send) {
  process.stderr.write('node-ipc-child.ts must be started with child_process.fork\n');
  process.exit(2);
}

interface Request {
  id: number;
  last: boolean;
}

let received = 0;
process.on('message', (message: Request, handle?: Socket) => {
  if (handle) {
    received++;
    handle.destroy();
  }
  if (message.last) {
    process.send!({ id: message.id, n: received });
    received = 0;
  }
});
process.on('disconnect', () => process.exit(0));
process.send({ ready: true });

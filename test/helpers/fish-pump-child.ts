/**
 * The Fish pump under test, in its own process: test/integration/fish-pump.test.ts starts it with
 * `ip netns exec <host> node …` so that the pump's conntrack netlink socket (created on the thread that calls
 * createFishPump) lives in the test's host namespace, as the daemon's does when the whole daemon runs there.
 *
 * fd 3: a SOCK_SEQPACKET control socket to the parent, one JSON message each way per request
 *       (`{ id, op, arg }` → `{ id, result }` or `{ id, error: { code, message } }`); pump events are pushed
 *       as `{ events }`.
 * fd 4, 5: registrations' packet sockets (the pump ends of seqpacketPairs the parent made); a registration
 *       names its fd, 4 by default.
 * argv[2]: the host namespace's name; the tun `fish0` already exists there.
 */
import { loadNative } from '../../lib/native.js';
import type { FishPump } from '../../lib/native.js';

const native = loadNative();
const netns = process.argv[2]!;
const tunFd = native.openTunInNamespace(`/var/run/netns/${netns}`, 'fish0');
let pump: FishPump | null = null;

const control = native.openSeqpacket(3, {
  message: (data) => {
    const { id, op, arg } = JSON.parse(data.toString()) as { id: number; op: string; arg: any };
    try {
      control.send(Buffer.from(JSON.stringify({ id, result: run(op, arg) ?? null })), []);
    } catch (error) {
      const { code, message } = error as { code?: string; message: string };
      control.send(Buffer.from(JSON.stringify({ id, error: { code: code ?? null, message } })), []);
    }
  },
  drain: () => {},
  // The parent went away: nothing left to serve.
  close: () => {
    pump?.close();
    native.closeAll([tunFd, 4, 5]);
    process.exit(0);
  },
});

function run(op: string, arg: any): unknown {
  switch (op) {
    case 'create':
      pump = native.createFishPump({ ...arg, tunFd }, (events) => {
        control.send(Buffer.from(JSON.stringify({ events })), []);
      });
      return null;
    case 'addRegistration':
      return pump!.addRegistration({ fd: 4, ...arg });
    case 'removeRegistration':
      return pump!.removeRegistration(arg);
    case 'addMappings':
      return pump!.addMappings(arg);
    case 'mappings':
      return pump!.mappings(arg ?? undefined);
    case 'stats':
      return pump!.stats();
    case 'pause':
      return pump!.pause();
    case 'resume':
      return pump!.resume();
    case 'flush':
      return pump!.flush();
    case 'close':
      return pump!.close();
    default:
      throw new Error(`unknown op ${op}`);
  }
}

control.send(Buffer.from(JSON.stringify({ ready: true })), []);

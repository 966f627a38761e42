/**
 * A bound AF_UNIX datagram socket standing in for systemd's notify socket (NOTIFY_SOCKET), recording
 * every datagram a daemon sends: its fields in order, the fds that came with it, and when it arrived.
 */
import path from 'node:path';
import type { Test } from 'tap';
import { loadNative } from '../../lib/native.js';
import { Inbox } from './native-helpers.js';

const binding = loadNative();

/** One datagram: its fields in order, the fds that came with it, and when it arrived. */
export interface Notification {
  lines: string[];
  fields: Record<string, string>;
  fds: number[];
  at: number;
}

/** A bound datagram socket standing in for systemd's notify socket, at `<dir>/notify.sock`. */
export function notifySocket(t: Test, dir: string, onMessage?: (message: Notification) => void) {
  const address = path.join(dir, 'notify.sock');
  const received = new Inbox<Notification>();
  const faults: string[] = [];
  const socket = binding.openSeqpacket(binding.datagramBind(address), {
    message(data, fds, fault) {
      if (fault) faults.push(JSON.stringify(fault));
      const lines = data.toString('utf8').split('\n').filter((line) => line.length > 0);
      const fields = Object.fromEntries(lines.map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]));
      const message = { lines, fields, fds, at: Date.now() };
      received.push(message);
      onMessage?.(message);
    },
    drain: () => undefined,
    close: () => undefined,
  });
  t.teardown(() => {
    socket.close();
    // Fds the test did not close on purpose (a barrier it never saw through) must not outlive it.
    for (const message of received.items) binding.closeAll(message.fds);
  });
  return { address, received, faults };
}


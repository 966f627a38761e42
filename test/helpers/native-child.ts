/**
 * The child process of the cross-process tests in test/integration/native.test.ts. fd 3 is a SOCK_SEQPACKET
 * socket to the parent (passed through spawn's stdio slot 3); every report goes back over it as JSON.
 *
 *   tcp     receives one connected TCP socket, adopts it as a net.Socket, greets, and answers each chunk it
 *           reads with "pong:<chunk>" until the other end ends the connection.
 *   ctrunc  reports its open fds, waits (the parent lowers its RLIMIT_NOFILE with prlimit), then reports
 *           what the addon delivered for each of two messages and its fd count around the first one.
 *   emfile  listens on the abstract name argv[3] and reports its open fds; once the parent has left it no
 *           free fd, accept4 fails with EMFILE. After three such errors it frees a reserve fd, and reports the
 *           error codes and the time between errors once the pending connection is finally accepted.
 */
import fs from 'node:fs';
import net from 'node:net';
import { loadNative } from '../../lib/native.js';

const native = loadNative();
const mode = process.argv[2];
const fdCount = (): number => fs.readdirSync('/proc/self/fd').length;

const control = native.openSeqpacket(3, {
  message: (data, fds, fault) => onMessage(data, fds, fault),
  drain: () => {},
  close: () => {},
});
const report = (value: unknown): void => {
  control.send(Buffer.from(JSON.stringify(value)), []);
};

let onMessage: (data: Buffer, fds: number[], fault: unknown) => void;

if (mode === 'tcp') {
  onMessage = (_data, fds) => {
    const [fd] = fds;
    if (fds.length !== 1 || fd === undefined) {
      report({ error: `expected 1 fd, got ${fds.length}` });
      return;
    }
    const socket = new net.Socket({ fd, readable: true, writable: true });
    socket.write('hello from child');
    socket.on('data', (chunk) => socket.write(`pong:${chunk.toString()}`));
    socket.on('end', () => {
      socket.end();
      report({ done: true });
      control.close();
    });
    socket.on('error', (error) => report({ error: error.message }));
  };
  report({ ready: true });
} else if (mode === 'ctrunc') {
  const before = fdCount();
  let seen = 0;
  onMessage = (_data, fds, fault) => {
    seen++;
    // Measured inside the callback: the addon has already closed whatever part of the set did arrive.
    report({ message: seen, fds: fds.length, fault, before, after: fdCount() });
    native.closeAll(fds);
    if (seen === 2) control.close();
  };
  report({ ready: true, open: fs.readdirSync('/proc/self/fd').map(Number) });
} else if (mode === 'emfile') {
  const reserve = native.memfdCreate('reserve');
  const errors: Array<{ code: unknown; at: number }> = [];
  const listener = native.openListener(native.seqpacketListen(`\0${process.argv[3]}`, 8), (error, fd) => {
    if (error) {
      errors.push({ code: (error as NodeJS.ErrnoException).code, at: performance.now() });
      if (errors.length === 3) native.close(reserve);
      return;
    }
    const gaps = errors.slice(1).map((e, i) => e.at - errors[i]!.at);
    report({ accepted: true, codes: errors.map((e) => e.code), gaps });
    native.close(fd);
    listener.close();
    control.close();
  });
  onMessage = () => {};
  // Without the directory fd readdir used for the listing (it is closed by now, so its number is free).
  const open = fs.readdirSync('/proc/self/fd').map(Number).filter((fd) => fs.existsSync(`/proc/self/fd/${fd}`));
  report({ ready: true, open, reserve });
} else {
  report({ error: `unknown mode ${String(mode)}` });
  control.close();
}

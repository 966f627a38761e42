/**
 * Socket activation (sd_listen_fds(3) without libsystemd): the service manager passes listening sockets
 * as fds 3, 4, ... with `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`. A daemon adopts its socket only
 * after checking it — the variables must name this very process, and the fd must be a listening
 * AF_UNIX SOCK_SEQPACKET socket — and always removes the variables, so no child ever inherits them.
 */
import type { NativeBinding } from '../native.js';

/** The first passed fd (SD_LISTEN_FDS_START). */
export const LISTEN_FDS_START = 3;

/** One fd the service manager passed, with its name (`FileDescriptorName=`, or `unknown`). */
export interface PassedFd {
  fd: number;
  name: string;
}

/** The native calls activation needs. */
export type ActivationBinding = Pick<NativeBinding, 'dup' | 'closeAll' | 'describeFd'>;

/**
 * Takes the passed fds out of the environment: each is moved to a close-on-exec number (the manager
 * passes them without FD_CLOEXEC, and a child must not inherit a listener). Returns null when nothing was
 * passed to this process.
 */
export function takeListenFds(binding: ActivationBinding, env: NodeJS.ProcessEnv = process.env, pid: number = process.pid): PassedFd[] | null {
  const count = Number(env.LISTEN_FDS);
  const forPid = Number(env.LISTEN_PID);
  const names = (env.LISTEN_FDNAMES ?? '').split(':');
  delete env.LISTEN_FDS;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDNAMES;
  if (!Number.isInteger(count) || count < 1) return null;
  // Variables meant for another process (a parent that forgot to unset them): not ours to take.
  if (forPid !== pid) return null;
  const passed: PassedFd[] = [];
  for (let i = 0; i < count; i++) {
    const inherited = LISTEN_FDS_START + i;
    const fd = binding.dup(inherited);
    binding.closeAll([inherited]);
    passed.push({ fd, name: names[i] || 'unknown' });
  }
  return passed;
}

const AF_UNIX = 1;
const SOCK_SEQPACKET = 5;

/**
 * Picks the daemon's listener among the passed fds: the one named after the service, else the only
 * listening AF_UNIX SOCK_SEQPACKET socket. Null when there is none (after a crash the fd store may hold
 * everything but the listener: the daemon then binds its socket itself). Throws a clear error when the fd
 * named after the service is not a listening AF_UNIX SOCK_SEQPACKET socket.
 */
export function chooseListener(binding: ActivationBinding, passed: readonly PassedFd[], service: string): PassedFd | null {
  const isListener = (p: PassedFd) => {
    const description = binding.describeFd(p.fd);
    return description.kind === 'socket' && description.family === AF_UNIX && description.type === SOCK_SEQPACKET && description.listening === true;
  };
  const named = passed.find((p) => p.name === service);
  if (named) {
    if (!isListener(named)) {
      throw new Error(
        `socket activation passed "${named.name}" (fd ${named.fd}) but it is not a listening AF_UNIX SOCK_SEQPACKET socket (use ListenSequentialPacket= in the .socket unit)`,
      );
    }
    return named;
  }
  const listeners = passed.filter(isListener);
  if (listeners.length === 1) return listeners[0]!;
  if (listeners.length > 1) throw new Error(`socket activation passed ${listeners.length} listening sockets and none is named "${service}" (set FileDescriptorName=${service})`);
  return null;
}

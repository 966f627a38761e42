/**
 * Handing a `net.Socket` over without losing a byte.
 *
 * A `net.Socket` owns its fd (destroy() closes it) and may already hold bytes that it read from the
 * kernel but nobody consumed. Detaching: stop reading, let pending writes reach the kernel, duplicate
 * the fd natively, take the unconsumed bytes as a preface, and only then destroy the Node handle. The
 * duplicate and the kernel's socket buffer carry everything else.
 */
import net from 'node:net';
import type { NativeBinding } from '../native.js';

/** A socket ready to hand over: an fd the caller owns, plus bytes already read from it. */
export interface DetachedSocket {
  fd: number;
  /** Bytes read from the socket into Node but not consumed; deliver them before the socket's own. */
  preface: Buffer;
}

/** Either form a client method accepts for a socket. */
export type SocketLike = net.Socket | number;

/** The fd Node keeps inside a socket's handle (undocumented, but the only way to hand an adopted socket on). */
function handleFd(socket: net.Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('this net.Socket has no open fd (not connected, or already destroyed)');
  return fd;
}

/** Throws if a socket cannot be detached, so a call can check every socket before it detaches any. */
export function assertDetachable(socket: SocketLike): void {
  if (typeof socket === 'number') return;
  if (socket.destroyed) throw new Error('the net.Socket is destroyed');
  if (socket.connecting) throw new Error('the net.Socket is still connecting');
  handleFd(socket);
}

/**
 * Detaches a connected `net.Socket`: resolves with a duplicate of its fd and the unread bytes, after
 * which the socket is destroyed. Writes still queued in Node are flushed first.
 */
export async function detachSocket(socket: net.Socket, binding: Pick<NativeBinding, 'dup'>): Promise<DetachedSocket> {
  if (socket.connecting) throw new Error('the socket is still connecting');
  socket.pause();
  if (socket.writableLength > 0) {
    await new Promise<void>((resolve, reject) => {
      const onError = (error: Error) => reject(error);
      socket.once('error', onError);
      socket.once('drain', () => {
        socket.off('error', onError);
        resolve();
      });
    });
  }
  // From here to destroy() everything is synchronous: libuv cannot read more between the dup and the close.
  const fd = binding.dup(handleFd(socket));
  const chunks: Buffer[] = [];
  for (let chunk = socket.read() as Buffer | string | null; chunk !== null; chunk = socket.read() as Buffer | string | null) {
    chunks.push(typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
  }
  socket.destroy();
  return { fd, preface: Buffer.concat(chunks) };
}

/** Takes a `net.Socket` or a raw fd (which the call then owns) and returns an fd plus preface. */
export async function toDetached(socket: SocketLike, binding: Pick<NativeBinding, 'dup'>): Promise<DetachedSocket> {
  if (typeof socket === 'number') return { fd: socket, preface: Buffer.alloc(0) };
  return detachSocket(socket, binding);
}

/** Wraps a returned fd (a connected TCP or Unix stream socket) in a `net.Socket`, which then owns it. */
export function adoptSocket(fd: number): net.Socket {
  return new net.Socket({ fd, readable: true, writable: true });
}

/**
 * Connected stream-socket pairs of every kind Splicer relays (TCP over IPv4 and IPv6 on loopback, Unix),
 * and end-to-end integrity checks: what one end sends is hashed and compared with what the other end
 * receives.
 */
import crypto from 'node:crypto';
import net from 'node:net';
import type { Test } from 'tap';
import type { NativeBinding } from '../../lib/native.js';

/** Kinds of stream pairs. */
export type PairKind = 'tcp4' | 'tcp6' | 'unix';

/** A connected pair: `near` stays with the test, `far` is handed over. */
export interface StreamPair {
  kind: PairKind;
  near: net.Socket;
  far: net.Socket;
}

/** Makes connected pairs; one listening server per TCP family, closed at teardown. */
export class PairFactory {
  readonly #servers = new Map<PairKind, Promise<net.Server>>();
  /**
   * Accepted sockets by family and the connecting side's port, so concurrent connects pair up correctly
   * (an IPv4 and an IPv6 connection may well use the same ephemeral port at once).
   */
  readonly #accepted = new Map<string, net.Socket>();
  readonly #waiting = new Map<string, (socket: net.Socket) => void>();
  readonly #binding: NativeBinding;

  constructor(t: Test, binding: NativeBinding) {
    this.#binding = binding;
    t.teardown(async () => {
      for (const server of this.#servers.values()) (await server).close();
    });
  }

  #server(kind: 'tcp4' | 'tcp6'): Promise<net.Server> {
    let listening = this.#servers.get(kind);
    if (!listening) {
      listening = this.#listen(kind);
      this.#servers.set(kind, listening);
    }
    return listening;
  }

  async #listen(kind: 'tcp4' | 'tcp6'): Promise<net.Server> {
    const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (socket) => {
      const port = `${kind}:${socket.remotePort!}`;
      const waiter = this.#waiting.get(port);
      if (waiter) {
        this.#waiting.delete(port);
        waiter(socket);
      } else {
        this.#accepted.set(port, socket);
      }
    });
    await new Promise<void>((resolve) => server.listen(0, kind === 'tcp4' ? '127.0.0.1' : '::1', resolve));
    return server;
  }

  /** One connected pair of `kind`. */
  async pair(kind: PairKind): Promise<StreamPair> {
    if (kind === 'unix') {
      const [a, b] = this.#binding.streamPair();
      return { kind, near: new net.Socket({ fd: a, allowHalfOpen: true }), far: new net.Socket({ fd: b, allowHalfOpen: true }) };
    }
    const server = await this.#server(kind);
    const address = server.address() as net.AddressInfo;
    const near = net.connect({ port: address.port, host: address.address, allowHalfOpen: true });
    await new Promise<void>((resolve, reject) => near.once('connect', resolve).once('error', reject));
    const port = `${kind}:${near.localPort!}`;
    const early = this.#accepted.get(port);
    this.#accepted.delete(port);
    const far = early ?? (await new Promise<net.Socket>((resolve) => this.#waiting.set(port, resolve)));
    return { kind, near, far };
  }
}

/** Resolves with the sha256 and length of everything `socket` receives until EOF. */
export function receiveAll(socket: net.Socket): Promise<{ sha256: string; bytes: number }> {
  const hash = crypto.createHash('sha256');
  let bytes = 0;
  return new Promise((resolve, reject) => {
    socket.on('data', (chunk: Buffer) => {
      hash.update(chunk);
      bytes += chunk.length;
    });
    socket.once('end', () => resolve({ sha256: hash.digest('hex'), bytes }));
    socket.once('error', reject);
  });
}

/** sha256 of a buffer, hex. */
export const sha256 = (data: Uint8Array): string => crypto.createHash('sha256').update(data).digest('hex');

/** Writes `data` and then half-closes (`end`), resolving once it is all flushed to the kernel. */
export function sendAndEnd(socket: net.Socket, data: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => {
    socket.once('error', reject);
    socket.end(data, () => resolve());
  });
}

/** Collects exactly `count` bytes from `socket` (without waiting for EOF). */
export function receiveBytes(socket: net.Socket, count: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  return new Promise((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      chunks.push(chunk);
      total += chunk.length;
      if (total >= count) {
        socket.off('data', onData);
        resolve(Buffer.concat(chunks));
      }
    };
    socket.on('data', onData);
    socket.once('error', reject);
  });
}

/**
 * The server side of the Bumblebee benchmark, shared by both systems so they serve exactly alike: the
 * requester (bench/bumblebee.ts) serves every socket Bumblebee accepts with it, and the veth baseline's
 * server program (bench/lib/bumblebee-server.ts) every socket it accepts.
 *
 * What a connection gets is decided by the port the client connected to (for Bumblebee: the flow's
 * original destination port, from the upgrade reply), so the load generator chooses:
 *
 *   7000-7999    echo: every byte back; FIN once the client has sent its FIN
 *   9000-9999    discard: reads and counts everything; FIN once the client has sent its FIN (so the
 *                client's close proves that every byte arrived)
 *   19000-19999  source: writes a 256 KiB buffer over and over from the start; any byte from the client
 *                means "stop": no more writes, FIN
 *
 * Each phase of the load generator uses its own port of the range, so a phase's connections never meet
 * the TIME_WAIT sockets of an earlier phase's identical four-tuples.
 */
import type net from 'node:net';

export const ECHO_PORT = 7000;
export const DISCARD_PORT = 9000;
export const SOURCE_PORT = 19000;

export type Service = 'echo' | 'discard' | 'source';

/** The service of a destination port, or null for a port outside the three ranges. */
export function serviceOf(port: number): Service | null {
  if (port >= ECHO_PORT && port < ECHO_PORT + 1000) return 'echo';
  if (port >= DISCARD_PORT && port < DISCARD_PORT + 1000) return 'discard';
  if (port >= SOURCE_PORT && port < SOURCE_PORT + 1000) return 'source';
  return null;
}

/** What the server side has done (bytes are counted by the side that receives or sends them in bulk). */
export interface ServeCounters {
  connections: number;
  discardedBytes: number;
  sourcedBytes: number;
  /** Sockets that failed (ECONNRESET, EPIPE...) rather than ending with FIN. */
  errors: number;
  unknownPort: number;
}

export const newServeCounters = (): ServeCounters => ({ connections: 0, discardedBytes: 0, sourcedBytes: 0, errors: 0, unknownPort: 0 });

const SOURCE_CHUNK = Buffer.alloc(256 * 1024, 0x5a);

/** Serves one accepted socket by the port the client asked for. */
export function serve(socket: net.Socket, port: number, counters: ServeCounters): void {
  counters.connections++;
  socket.on('error', () => {
    counters.errors++;
    socket.destroy();
  });
  const service = serviceOf(port);
  switch (service) {
    case 'echo':
      socket.setNoDelay(true);
      socket.on('data', (chunk: Buffer) => socket.write(chunk));
      socket.on('end', () => socket.end());
      return;
    case 'discard':
      socket.on('data', (chunk: Buffer) => {
        counters.discardedBytes += chunk.length;
      });
      socket.on('end', () => socket.end());
      return;
    case 'source': {
      let stopped = false;
      const write = () => {
        while (!stopped && !socket.destroyed) {
          counters.sourcedBytes += SOURCE_CHUNK.length;
          if (!socket.write(SOURCE_CHUNK)) return;
        }
      };
      socket.on('drain', write);
      socket.on('data', () => {
        if (stopped) return;
        stopped = true;
        socket.end();
      });
      socket.on('end', () => {
        stopped = true;
        socket.end();
      });
      write();
      return;
    }
    default:
      counters.unknownPort++;
      socket.destroy();
  }
}

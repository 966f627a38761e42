/**
 * A tiny real daemon for the protocol integration tests (test/integration/rpc-*.test.ts): lib/rpc/server.ts's
 * RpcServer with the real addon and the real logger, and a handful of methods that exercise fds, bodies,
 * slowness, credentials and mailbox delivery. Nothing service-specific, so a failure points at lib/rpc.
 *
 *   node --import tsx test/helpers/echo-daemon.ts <socketPath> [--log-level <level>]
 *
 * Logs `echo listening` (pino JSON on stdout) once it accepts; SIGTERM closes the server, drops every
 * pending timer (closing the fds they held) and lets the process exit on its own with code 0 — so a
 * handle leaked by the server would show up as a daemon that does not exit.
 *
 * Methods (besides the built-in hello, ping, ack):
 *   echo         0..253 fds of any kind: replies {params, fdCount, kinds} with the same fds.
 *   needsSocket  exactly 2 connected stream sockets: replies {ok: true} and closes them.
 *   slow         0..253 fds of any kind: replies {waited} and the same fds after params.ms milliseconds
 *                (or, with params.fail, answers with that error code and the fds back).
 *   peer         replies the connection's SO_PEERCRED and ownerKey.
 *   hash         replies {sha256, length} of the UTF-8 bytes of params.blob (a string).
 *   later        exactly 1 fd of any kind: replies {id} at once, and after params.ms delivers the event
 *                'done' with that fd to the caller's owner, or to params.to (an owner id of the same uid).
 *                Without params.ms the event waits for `release`, so a test needs no timing at all.
 *   release      delivers the held `later` event params.id now (from any connection); EFDFERRY_NOTFOUND
 *                for an id that is not held.
 *   stats        replies {mailbox, connections, fds, counters}.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import type { LevelWithSilent } from 'pino';
import { createLogger } from '../../lib/log.js';
import { loadNative } from '../../lib/native.js';
import { ProtocolError, isErrorCode } from '../../lib/protocol/errors.js';
import { RpcServer, defineMethod } from '../../lib/rpc/server.js';

const socketPath = process.argv[2];
if (!socketPath) {
  process.stderr.write('usage: echo-daemon.ts <socketPath> [--log-level <level>]\n');
  process.exit(2);
}
const levelIndex = process.argv.indexOf('--log-level');
const level = (levelIndex > 0 ? process.argv[levelIndex + 1] : 'info') as LevelWithSilent;

const binding = loadNative();
const log = createLogger({ service: 'echo', level });

/** Timers of `slow` and `later`, so SIGTERM can drop them (and close the fds `later` holds). */
const pending = new Map<NodeJS.Timeout, number[]>();
/** `later` events waiting for `release`. */
const held = new Map<string, { fire: () => void; fds: number[] }>();
let nextLaterId = 1;

const milliseconds = (value: unknown): number => {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 60_000) {
    throw new ProtocolError('EFDFERRY_INVALID', '"ms" must be an integer from 0 to 60000');
  }
  return value;
};

const server: RpcServer = new RpcServer({
  binding,
  logger: log,
  service: 'echo',
  version: '0.0.0-test',
  methods: {
    echo: defineMethod({
      fds: { min: 0, max: 253, kind: 'any' },
      handle: ({ params, fds, fdDescriptions }) => ({
        result: { params, fdCount: fds.length, kinds: fdDescriptions.map((d) => d.kind) },
        fds,
      }),
    }),
    needsSocket: defineMethod({
      fds: { min: 2, max: 2, kind: 'stream-socket' },
      handle: ({ fds }) => {
        binding.closeAll(fds);
        return { result: { ok: true } };
      },
    }),
    slow: defineMethod({
      fds: { min: 0, max: 253, kind: 'any' },
      parse: (params) => {
        if (params.fail !== undefined && typeof params.fail !== 'string') {
          throw new ProtocolError('EFDFERRY_INVALID', '"fail" must be an error code');
        }
        return { ms: milliseconds(params.ms), fail: params.fail as string | undefined };
      },
      handle: ({ params, fds }) =>
        new Promise((resolve, reject) => {
          const started = Date.now();
          const timer = setTimeout(() => {
            pending.delete(timer);
            if (params.fail === undefined) {
              resolve({ result: { waited: Date.now() - started }, fds });
              return;
            }
            // A handler that fails keeps no fds: the server gives the request's fds back with the error.
            const code = isErrorCode(params.fail) ? params.fail : 'EFDFERRY_INTERNAL';
            reject(new ProtocolError(code, `failed as asked after ${params.ms} ms`));
          }, params.ms);
          pending.set(timer, fds);
        }),
    }),
    peer: defineMethod({
      handle: ({ connection }) => ({
        result: { peer: { ...connection.peer }, owner: connection.owner, ownerKey: connection.ownerKey },
      }),
    }),
    hash: defineMethod({
      parse: (params) => {
        if (typeof params.blob !== 'string') throw new ProtocolError('EFDFERRY_INVALID', '"blob" must be a string');
        return { blob: params.blob };
      },
      handle: ({ params }) => {
        const bytes = Buffer.from(params.blob, 'utf8');
        return { result: { sha256: crypto.createHash('sha256').update(bytes).digest('hex'), length: bytes.length } };
      },
    }),
    later: defineMethod({
      fds: { min: 1, max: 1, kind: 'any' },
      parse: (params) => {
        const to = params.to;
        if (to !== undefined && (typeof to !== 'string' || !/^[\x21-\x7e]{1,128}$/.test(to))) {
          throw new ProtocolError('EFDFERRY_INVALID', '"to" must be an owner id');
        }
        return { ms: params.ms === undefined ? null : milliseconds(params.ms), to: to as string | undefined };
      },
      handle: ({ params, fds, connection, log: requestLog }) => {
        const id = `later-${process.pid}-${nextLaterId++}`;
        const ownerKey = params.to === undefined ? connection.ownerKey! : `${connection.peer.uid}:${params.to}`;
        const fire = (): void => {
          requestLog.info({ id, ownerKey, connected: server.isOwnerConnected(ownerKey) }, 'later: delivering');
          server.deliver(ownerKey, 'done', id, { id, ms: params.ms, fromPid: connection.peer.pid }, fds);
        };
        if (params.ms === null) {
          held.set(id, { fire, fds });
        } else {
          const timer = setTimeout(() => {
            pending.delete(timer);
            fire();
          }, params.ms);
          pending.set(timer, fds);
        }
        return { result: { id } };
      },
    }),
    release: defineMethod({
      parse: (params) => {
        if (typeof params.id !== 'string') throw new ProtocolError('EFDFERRY_INVALID', '"id" must be a string');
        return { id: params.id };
      },
      handle: ({ params }) => {
        const entry = held.get(params.id);
        if (!entry) throw new ProtocolError('EFDFERRY_NOTFOUND', `no held event ${params.id}`);
        held.delete(params.id);
        entry.fire();
        return { result: { released: params.id } };
      },
    }),
    stats: defineMethod({
      handle: () => ({
        result: {
          mailbox: server.mailboxSize,
          connections: server.connections().length,
          fds: fs.readdirSync('/proc/self/fd').length,
          counters: { ...server.counters },
        },
      }),
    }),
  },
});

process.on('SIGTERM', () => {
  log.info({ pending: pending.size, connections: server.connections().length }, 'echo stopping');
  for (const [timer, fds] of pending) {
    clearTimeout(timer);
    binding.closeAll(fds);
  }
  pending.clear();
  for (const entry of held.values()) binding.closeAll(entry.fds);
  held.clear();
  server.close();
  process.removeAllListeners('SIGTERM');
  log.info('echo stopped');
  // No process.exit(): the process must end by itself, which proves the server let go of every handle.
});

server.listen(socketPath);
log.info({ socket: socketPath }, 'echo listening');

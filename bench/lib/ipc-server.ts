/**
 * The fdferry side of the IPC benchmark: a protocol v1 server on the real addon, with one method.
 *
 *   node --import tsx bench/lib/ipc-server.ts <socket>
 *
 * `take` accepts 0 to 253 fds of any kind (each still goes through the server's validation, `describeFd`
 * included), closes them and replies `{n}`. The server prints `ready` on stdout once it listens and stops
 * on SIGTERM or SIGINT (the benchmark stops it by pid), or by itself once its parent is gone.
 */
import { createLogger } from '../../lib/log.js';
import { loadNative } from '../../lib/native.js';
import { MAX_FDS_PER_MESSAGE } from '../../lib/protocol/frame.js';
import { RpcServer, defineMethod } from '../../lib/rpc/server.js';

const address = process.argv[2];
if (!address) {
  process.stderr.write('usage: ipc-server.ts <socket path or @abstract-name>\n');
  process.exit(2);
}

const binding = loadNative();
const server = new RpcServer({
  binding,
  logger: createLogger({ service: 'bench-ipc', level: 'silent' }),
  service: 'bench-ipc',
  version: '0.0.0',
  methods: {
    take: defineMethod({
      fds: { min: 0, max: MAX_FDS_PER_MESSAGE, kind: 'any' },
      handle: ({ fds }) => {
        binding.closeAll(fds);
        return { result: { n: fds.length } };
      },
    }),
  },
});
server.listen(address);
process.stdout.write('ready\n');

const stop = (): void => {
  server.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
// Orphaned (the benchmark was killed with SIGKILL): do not linger.
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) stop();
}, 1_000).unref();

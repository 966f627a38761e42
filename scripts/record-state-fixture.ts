/**
 * Records `test/fixtures/state/splicer-v1.state`: a format-1 hand-over state file of Splicer, as the old
 * process writes it into the sealed memfd (`lib/handoff/state-file.ts`).
 *
 * The document has the shape `lib/handoff/predecessor.ts` builds: the service's part first (its fds come
 * first in the fd list, because the predecessor exports the service before the server), then the server's
 * listener, connections and kept results. Two relays: one plain, one with both pipes holding bytes in
 * flight and a preface each way. Every fd index in `[0, fdCount)` is used exactly once.
 *
 * The values are fixed (no clock, no randomness), so re-running the script reproduces the file byte for
 * byte. Once committed, a fixture is never re-recorded: it stands for what a released version wrote, and
 * `test/unit/state-fixtures.test.ts` checks that the current code still reads it. A new format version gets
 * a new script run with a new file name.
 *
 *   node --import tsx scripts/record-state-fixture.ts [output path]
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { encodeState, STATE_FORMAT } from '../lib/handoff/state-file.js';
import type { ExportedServerState } from '../lib/rpc/server.js';
import type { RelayRecord, SplicerState } from '../services/splicer/handoff.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const output = process.argv[2] ?? path.join(root, 'test', 'fixtures', 'state', `splicer-v${STATE_FORMAT}.state`);

const GENERATION = 2;
const PAUSED_AT = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const BOOT_ID = '5e1f09a3';
const PROXY = { pid: 4242, uid: 998, gid: 998 };
const CTL = { pid: 4711, uid: 0, gid: 0 };

/** The fd list the predecessor fills; each call takes the next index. */
let fdCount = 0;
const nextFd = (): number => fdCount++;

const b64 = (text: string) => Buffer.from(text, 'latin1').toString('base64');

// The service first: relays' fds in exportRelay's order (A, B, then pipe A->B, then pipe B->A).
const plain: RelayRecord = {
  taskId: `${BOOT_ID}-7`,
  engineId: 7,
  ownerKey: `${PROXY.uid}:edge-proxy`,
  owner: 'edge-proxy',
  peer: PROXY,
  meta: { route: 'imap', client: '192.0.2.10:51544', upstream: '[2001:db8::25]:143' },
  acceptedAt: PAUSED_AT - 93_512,
  startedAt: PAUSED_AT - 93_511,
  options: { idleTimeoutMs: 300_000, maxDurationMs: 0, maxBytesAToB: 0, maxBytesBToA: 0 },
  bytesAToB: 18_204,
  bytesBToA: 2_950_117,
  finishedAToB: false,
  finishedBToA: false,
  eofAToB: false,
  eofBToA: false,
  fdA: nextFd(),
  fdB: nextFd(),
  pipeAToB: null,
  pipeBToA: null,
};
const busy: RelayRecord = {
  taskId: `${BOOT_ID}-12`,
  engineId: 12,
  ownerKey: `${PROXY.uid}:edge-proxy`,
  owner: 'edge-proxy',
  peer: PROXY,
  meta: { route: 'http', client: '198.51.100.7:40022', upstream: 'unix:/run/app.sock' },
  acceptedAt: PAUSED_AT - 4_120,
  startedAt: PAUSED_AT - 4_119,
  options: {
    idleTimeoutMs: 60_000,
    maxDurationMs: 3_600_000,
    maxBytesAToB: 1 << 30,
    maxBytesBToA: 0,
    // What the proxy had already read from each side before handing the sockets over (not yet written).
    prefaceAToB: b64('PROXY TCP4 198.51.100.7 203.0.113.1 40022 443\r\n'),
    prefaceBToA: b64('HTTP/1.1 100 Continue\r\n\r\n'),
  },
  bytesAToB: 1_048_576,
  bytesBToA: 7_340_032,
  finishedAToB: false,
  finishedBToA: false,
  eofAToB: true, // A half-closed; its EOF waits behind the bytes still in the pipe
  eofBToA: false,
  fdA: nextFd(),
  fdB: nextFd(),
  pipeAToB: { fds: [nextFd(), nextFd()], bytes: 65_536 },
  pipeBToA: { fds: [nextFd(), nextFd()], bytes: 1_203 },
};
const tasks: SplicerState = { nextEngineId: 13, relaysEnded: 11, relays: [plain, busy] };

// Then the server: listener, connections, kept results (an envelope waiting for an absent owner).
const listener = nextFd();
const proxyConnection = { fd: nextFd(), id: 3, peer: PROXY, owner: 'edge-proxy', ownerKey: `${PROXY.uid}:edge-proxy`, connectedAt: PAUSED_AT - 600_000 };
const ctlConnection = { fd: nextFd(), id: 9, peer: CTL, owner: `ctl-${CTL.pid}`, ownerKey: `${CTL.uid}:ctl-${CTL.pid}`, connectedAt: PAUSED_AT - 40 };
const envelopeFds = [nextFd(), nextFd()];
const server: ExportedServerState = {
  listener,
  connections: [proxyConnection, ctlConnection],
  mailbox: [
    {
      ownerKey: `${PROXY.uid}:batch-proxy`,
      id: `${BOOT_ID}-5`,
      event: 'envelope',
      data: {
        taskId: `${BOOT_ID}-5`,
        meta: { route: 'smtp' },
        reason: 'complete',
        errno: 0,
        code: null,
        side: null,
        bytesAToB: 40_960,
        bytesBToA: 512,
        finishedAToB: true,
        finishedBToA: true,
        acceptedAt: PAUSED_AT - 20_000,
        startedAt: PAUSED_AT - 19_999,
        endedAt: PAUSED_AT - 1_500,
        durationMs: 18_499,
        unsentAToB: '',
        unsentBToA: '',
        tcpInfo: { a: null, b: null },
      },
      fds: envelopeFds,
      createdAt: PAUSED_AT - 1_500,
      deliveries: 1,
    },
  ],
};

const document = {
  service: 'splicer',
  generation: GENERATION,
  fdCount,
  server,
  tasks,
  requester: { connectionId: ctlConnection.id, requestId: 2 },
  pausedAt: PAUSED_AT,
};

fs.mkdirSync(path.dirname(output), { recursive: true });
fs.writeFileSync(output, encodeState(document as unknown as Record<string, unknown>, GENERATION));
console.log(`wrote ${output}: format ${STATE_FORMAT}, generation ${GENERATION}, ${fdCount} fds, ${tasks.relays.length} relays`);

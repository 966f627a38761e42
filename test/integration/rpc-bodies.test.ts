/**
 * Bodies in memfds against a real daemon process (test/helpers/echo-daemon.ts): a 64 MiB body both ways,
 * verified by sha256 on each side, and bodies the reference client would never send — unsealed, partly
 * sealed, the wrong size, not a memfd — sent over a raw socket with hand-built frames. Each is refused with
 * its code, the other fds come back, the body fd is closed by the daemon, and the connection keeps working.
 */
import t from 'tap';
import type { Test } from 'tap';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import { spawn, spawnSync } from 'node:child_process';
import { loadNative } from '../../lib/native.js';
import { RpcClient } from '../../lib/rpc/client.js';
import { eventually, fdLeak, openFds, openRecorded, uniqueName, withDeadline } from '../helpers/native-helpers.js';
import { startEchoDaemon } from '../helpers/rpc-processes.js';
import { RawConnection, inode, memfdHeader, requestBody } from '../helpers/rpc-raw.js';

const binding = loadNative();
const C = binding.constants;
const ALL_SEALS = C.F_SEAL_SHRINK! | C.F_SEAL_GROW! | C.F_SEAL_WRITE! | C.F_SEAL_SEAL!;
const WAIT = 10_000;

t.setTimeout(60_000);

// The libuv SIGCHLD pipe and friends are opened on first use and kept: open them before counting fds.
await once(spawn(process.execPath, ['-e', ''], { stdio: 'ignore' }), 'close');

const sha256 = (bytes: Uint8Array | string): string => crypto.createHash('sha256').update(bytes).digest('hex');

/**
 * A memfd with exactly `seals` (which Node cannot make: the addon only adds all four at once), made by
 * python3 and passed to us over SCM_RIGHTS.
 */
const python = spawnSync('python3', ['-c', 'import os, socket; os.memfd_create; socket.CMSG_LEN'], { stdio: 'ignore' });
const pythonSkip: { skip: string | false } = {
  skip: python.status === 0 ? false : 'python3 (3.8+, with os.memfd_create) is needed to make partly sealed memfds',
};

const PARTIAL_MEMFD = `
import array, fcntl, os, socket, sys
seals, body = int(sys.argv[1]), sys.argv[2].encode()
fd = os.memfd_create('partly-sealed', os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
os.write(fd, body)
if seals:
    fcntl.fcntl(fd, 1033, seals)  # F_ADD_SEALS
s = socket.socket(fileno=3)
s.sendmsg([b'memfd'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [fd]))])
`;

async function partlySealedMemfd(seals: number, body: string): Promise<number> {
  const [mine, theirs] = binding.seqpacketPair();
  const receiver = openRecorded(binding, mine);
  const child = spawn('python3', ['-c', PARTIAL_MEMFD, String(seals), body], { stdio: ['ignore', 'inherit', 'inherit', theirs] });
  binding.close(theirs);
  try {
    const [message] = await receiver.messages.wait(1, WAIT, 'the memfd from python3');
    const code = await withDeadline(once(child, 'close'), WAIT, 'python3 to exit');
    if (code[0] !== 0 || message!.fds.length !== 1) throw new Error(`python3 exited ${String(code[0])} with ${message!.fds.length} fds`);
    return message!.fds[0]!;
  } finally {
    receiver.socket.close();
  }
}

/** A memfd holding `body`, sealed with all four seals unless `seal` is false. */
function memfdWith(body: Uint8Array, seal = true): number {
  const fd = binding.memfdCreate('test-body');
  fs.writeSync(fd, body);
  if (seal) binding.memfdSeal(fd);
  return fd;
}

// -------------------------------------------------------------------------------------------------------------

t.test('a 64 MiB body goes through a sealed memfd both ways, intact by sha256', async (t) => {
  t.setTimeout(45_000);
  const daemon = await startEchoDaemon(t);
  const before = openFds();
  const client = new RpcClient({ path: daemon.socket, owner: uniqueName('big'), binding, reconnect: false, requestTimeoutMs: 30_000 });
  t.teardown(() => client.close());
  await client.connect();
  const daemonBaseline = daemon.openFds();

  const blob = crypto.randomBytes(48 * 1024 * 1024).toString('base64'); // exactly 64 MiB of ASCII
  t.equal(blob.length, 64 * 1024 * 1024);
  const expected = sha256(blob);

  const hashed = await client.request('hash', { blob });
  t.same(hashed.result, { sha256: expected, length: blob.length }, 'the daemon hashed exactly what was sent');

  const echoed = await client.request('echo', { blob });
  const back = (echoed.result.params as { blob?: unknown }).blob;
  t.equal(typeof back === 'string' ? back.length : -1, blob.length, 'the echo is 64 MiB');
  t.equal(typeof back === 'string' ? sha256(back) : '', expected, 'and hashes the same here');
  t.same(echoed.fds, [], 'the reply body memfd is not handed to the caller');

  t.ok(await eventually(() => daemon.openFds() === daemonBaseline), 'the daemon closed both body memfds');
  client.close();
  t.equal(await fdLeak(before), null, 'no fd (or body memfd) leaked in this process');
});

/** A raw connection that said hello; closed at teardown. */
async function rawSession(t: Test, socket: string): Promise<RawConnection> {
  const raw = new RawConnection(binding, socket);
  t.teardown(() => raw.close());
  await raw.hello(uniqueName('raw'));
  return raw;
}

interface BodyCase {
  name: string;
  /** The body fd to attach last; `body` is what it should hold. */
  makeBodyFd: (body: Buffer) => Promise<number> | number;
  /** bodyLength to declare (defaults to the body's size). */
  declared?: (body: Buffer) => number;
  code: string | null;
  /** Seals the body fd must have, checked before sending so the case proves what it claims. */
  seals?: number | 'none';
  skip?: string | false;
}

const cases: BodyCase[] = [
  { name: 'a properly sealed memfd (control)', makeBodyFd: (body) => memfdWith(body), code: null, seals: ALL_SEALS },
  { name: 'an unsealed memfd', makeBodyFd: (body) => memfdWith(body, false), code: 'EFDFERRY_UNSEALED', seals: 0 },
  {
    name: 'a memfd missing only F_SEAL_SEAL',
    makeBodyFd: (body) => partlySealedMemfd(ALL_SEALS & ~C.F_SEAL_SEAL!, body.toString()),
    code: 'EFDFERRY_UNSEALED',
    seals: ALL_SEALS & ~C.F_SEAL_SEAL!,
    skip: pythonSkip.skip,
  },
  {
    name: 'a shrinkable memfd (no F_SEAL_SHRINK)',
    makeBodyFd: (body) => partlySealedMemfd(ALL_SEALS & ~C.F_SEAL_SHRINK!, body.toString()),
    code: 'EFDFERRY_UNSEALED',
    seals: ALL_SEALS & ~C.F_SEAL_SHRINK!,
    skip: pythonSkip.skip,
  },
  {
    name: 'a regular file',
    makeBodyFd: (body) => {
      const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'fdf-body-')), 'body.json');
      fs.writeFileSync(file, body);
      const fd = fs.openSync(file, 'r');
      fs.rmSync(path.dirname(file), { recursive: true, force: true });
      return fd;
    },
    code: 'EFDFERRY_NOTMEMFD',
    seals: 'none',
  },
  {
    name: 'a socket',
    makeBodyFd: () => {
      const [a, b] = binding.streamPair();
      binding.close(b);
      return a;
    },
    code: 'EFDFERRY_NOTMEMFD',
    seals: 'none',
  },
  {
    name: 'a sealed memfd larger than declared',
    makeBodyFd: (body) => memfdWith(body),
    declared: (body) => body.length - 1,
    code: 'EFDFERRY_LENGTH',
  },
  {
    name: 'a sealed memfd smaller than declared',
    makeBodyFd: (body) => memfdWith(body),
    declared: (body) => body.length + 1,
    code: 'EFDFERRY_LENGTH',
  },
];

for (const c of cases) {
  t.test(`body fd: ${c.name} ${c.code ? `is refused with ${c.code}` : 'is accepted'}`, { skip: c.skip ?? false }, async (t) => {
    const daemon = await startEchoDaemon(t);
    const before = openFds();
    const raw = await rawSession(t, daemon.socket);
    const baseline = daemon.openFds();

    const body = requestBody('echo', { label: c.name, pad: 'p'.repeat(70_000) });
    const bodyFd = await c.makeBodyFd(body);
    if (c.seals === 'none') t.throws(() => binding.memfdSeals(bodyFd), { code: 'EINVAL' }, 'the body fd is not a memfd');
    else if (c.seals !== undefined) t.equal(binding.memfdSeals(bodyFd), c.seals, `the body fd has seals 0x${c.seals.toString(16)}`);
    const [mine, other] = binding.streamPair();
    const requestId = raw.nextId();
    raw.send(memfdHeader(requestId, c.declared ? c.declared(body) : body.length, 2), [mine, bodyFd]);
    const answer = await raw.next(WAIT, `the answer to "${c.name}"`);
    t.equal(answer.requestId, requestId, 'answered under the request id');
    if (c.code === null) {
      t.equal(answer.type, 'reply');
      t.match(answer, { result: { params: { label: c.name }, fdCount: 1 } }, 'the body was read');
    } else {
      t.match(answer, { type: 'error', error: { code: c.code } }, `refused with ${c.code}`);
    }
    t.equal(answer.fds.length, 1, 'the socket comes back, the body fd does not');
    t.equal(answer.fds.length ? inode(answer.fds[0]!) : -1, inode(mine), 'it is the socket that was sent');
    binding.closeAll([...answer.fds, mine, other, bodyFd]);

    const ping = await raw.call('ping');
    t.match(ping, { type: 'reply', result: { pong: true } }, 'the same connection still works');
    t.ok(await eventually(() => daemon.openFds() === baseline), 'the daemon closed the body fd and the socket copy', {
      baseline,
      now: daemon.openFds(),
    });
    raw.close();
    t.equal(await fdLeak(before), null, 'no fd leaked in this process');
  });
}

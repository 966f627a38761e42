// Recorded hand-over state files (test/fixtures/state/*.state, one per format version ever written) must stay
// readable: an upgrade from any released version has to be a hand-over, never a restart. Each one decodes, its
// fd indices are consistent, and every Splicer relay in it passes importRelay's checks; corrupt or unknown
// files are refused with EFDFERRY_STATE.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { decodeState, SUPPORTED_FORMATS, STATE_HEADER_SIZE, type StateFile } from '../../lib/handoff/state-file.js';
import type { FdDescription } from '../../lib/native.js';
import { fdKindMismatch } from '../../lib/protocol/fd-kinds.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import type { ExportedServerState } from '../../lib/rpc/server.js';
import { importRelay, type RelayRecord, type SplicerState } from '../../services/splicer/handoff.js';

const directory = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'state');
const fixtures = fs
  .readdirSync(directory)
  .filter((name) => name.endsWith('.state'))
  .sort();

/** What each fd index of a state stands for, as the successor will check it. */
type Role = 'stream' | 'pipe' | 'listener' | 'connection';

const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_SEQPACKET = 5;
const DESCRIPTIONS: Record<Role, FdDescription> = {
  stream: { kind: 'socket', family: AF_UNIX, type: SOCK_STREAM, protocol: 0, listening: false, connected: true },
  pipe: { kind: 'pipe' },
  listener: { kind: 'socket', family: AF_UNIX, type: SOCK_SEQPACKET, protocol: 0, listening: true, connected: false },
  connection: { kind: 'socket', family: AF_UNIX, type: SOCK_SEQPACKET, protocol: 0, listening: false, connected: true },
};

/** Every fd index the document uses, with its role; a second use of one index is recorded as a conflict. */
function indexRoles(server: ExportedServerState, splicer: SplicerState) {
  const roles = new Map<number, Role>();
  const reused: number[] = [];
  const use = (index: number, role: Role) => {
    if (roles.has(index)) reused.push(index);
    roles.set(index, role);
  };
  for (const relay of splicer.relays) {
    use(relay.fdA, 'stream');
    use(relay.fdB, 'stream');
    for (const pipe of [relay.pipeAToB, relay.pipeBToA]) if (pipe) for (const fd of pipe.fds) use(fd, 'pipe');
  }
  if (server.listener !== null) use(server.listener, 'listener');
  for (const connection of server.connections) use(connection.fd, 'connection');
  // Kept results of Splicer are envelopes: both sockets of a finished relay.
  for (const entry of server.mailbox) for (const fd of entry.fds) use(fd, 'stream');
  return { roles, reused };
}

/** Fake fds (far from any real one) and a describe() that answers by the role of each index. */
function fakeFds(fdCount: number, roles: Map<number, Role>, override: Map<number, Role> = new Map()) {
  const fds = Array.from({ length: fdCount }, (_, i) => 1_000 + i);
  const described: number[] = [];
  const describe = (fd: number): FdDescription => {
    const index = fd - 1_000;
    const role = override.get(index) ?? roles.get(index);
    if (!role) throw new Error(`describe() called for fd ${fd}, which no record names`);
    described.push(index);
    return DESCRIPTIONS[role];
  };
  return { fds, describe, described };
}

function thrown(fn: () => unknown): ProtocolError {
  try {
    fn();
  } catch (error) {
    return error as ProtocolError;
  }
  throw new Error('expected an error, nothing was thrown');
}

const load = (name: string) => fs.readFileSync(path.join(directory, name));

t.test('there is a recorded fixture for every supported format', (t) => {
  t.ok(fixtures.length > 0, `fixtures in ${directory}: ${fixtures.join(', ')}`);
  const formats = new Set(fixtures.map((name) => decodeState(load(name)).format));
  for (const format of SUPPORTED_FORMATS) t.ok(formats.has(format), `format ${format} has a fixture`);
  t.end();
});

for (const name of fixtures) {
  t.test(`${name}: decodes, and the successor's checks accept it`, (t) => {
    const bytes = load(name);
    let state: StateFile;
    try {
      state = decodeState(bytes);
    } catch (error) {
      t.fail(`${name} does not decode: ${(error as Error).message}`);
      return t.end();
    }
    t.ok(SUPPORTED_FORMATS.includes(state.format), `format ${state.format} is one of ${SUPPORTED_FORMATS.join(', ')}`);
    const document = state.document;
    t.equal(document.service, 'splicer', 'a Splicer state');
    t.equal(document.generation, state.generation, 'the header and the body name the same generation');
    const fdCount = document.fdCount as number;
    t.ok(Number.isSafeInteger(fdCount) && fdCount > 0, `fdCount ${String(fdCount)}`);
    t.ok(Number.isSafeInteger(document.pausedAt), 'pausedAt is a timestamp');

    const server = document.server as ExportedServerState;
    const splicer = document.tasks as SplicerState;
    t.ok(Array.isArray(server.connections) && Array.isArray(server.mailbox), 'the server part has connections and kept results');
    t.ok(Array.isArray(splicer.relays) && splicer.relays.length > 0, `the Splicer part has relays (${splicer.relays.length})`);
    t.ok(server.listener !== null, 'the listener travels');
    t.ok(server.mailbox.length > 0, 'kept results travel');
    t.ok(
      splicer.relays.some((r) => r.pipeAToB && r.pipeBToA && r.options.prefaceAToB && r.options.prefaceBToA),
      'at least one relay has bytes in both pipes and a preface each way',
    );

    const { roles, reused } = indexRoles(server, splicer);
    t.same(reused, [], 'no fd index is used twice');
    t.same(
      [...roles.keys()].sort((a, b) => a - b),
      Array.from({ length: fdCount }, (_, i) => i),
      `the indices used are exactly 0..${fdCount - 1}`,
    );

    const { fds, describe, described } = fakeFds(fdCount, roles);
    // The server's fds, checked as Successor#checkServerFds does.
    t.equal(fdKindMismatch('listening-socket', describe(fds[server.listener!]!)), null, 'the listener index is a listening socket');
    for (const connection of server.connections) {
      t.equal(fdKindMismatch('seqpacket-socket', describe(fds[connection.fd]!)), null, `connection ${connection.id} is a seqpacket socket`);
    }
    for (const entry of server.mailbox) t.ok(entry.fds.every((i) => fds[i] !== undefined), `kept result ${entry.id}: fd indices in range`);
    const requester = document.requester as { connectionId: number } | null;
    if (requester) t.ok(server.connections.some((c) => c.id === requester.connectionId), 'the requester is one of the connections');

    described.length = 0;
    let highestEngineId = 0;
    for (const record of splicer.relays) {
      let imported: ReturnType<typeof importRelay>;
      try {
        imported = importRelay(record, fds, describe);
      } catch (error) {
        t.fail(`relay ${record.taskId} is refused: ${(error as Error).message}`);
        continue;
      }
      const { task, paused } = imported;
      highestEngineId = Math.max(highestEngineId, record.engineId);
      t.equal(task.taskId, record.taskId, `relay ${record.taskId} imported`);
      t.equal(paused.id, record.engineId, `${record.taskId}: engine id`);
      t.same([task.fdA, task.fdB, paused.fdA, paused.fdB], [fds[record.fdA], fds[record.fdB], fds[record.fdA], fds[record.fdB]], `${record.taskId}: sockets A and B`);
      t.same(paused.pipeAToB, record.pipeAToB && { fds: record.pipeAToB.fds.map((i) => fds[i]), bytes: record.pipeAToB.bytes }, `${record.taskId}: pipe A->B`);
      t.same(paused.pipeBToA, record.pipeBToA && { fds: record.pipeBToA.fds.map((i) => fds[i]), bytes: record.pipeBToA.bytes }, `${record.taskId}: pipe B->A`);
      t.same([paused.bytesAToB, paused.bytesBToA], [record.bytesAToB, record.bytesBToA], `${record.taskId}: byte counters`);
      t.same([paused.eofAToB, paused.eofBToA, paused.finishedAToB, paused.finishedBToA], [record.eofAToB, record.eofBToA, record.finishedAToB, record.finishedBToA], `${record.taskId}: EOF and half-close state`);
      const preface = (text: string | undefined) => (text ? Buffer.from(text, 'base64') : undefined);
      t.same(paused.options.prefaceAToB && Buffer.from(paused.options.prefaceAToB), preface(record.options.prefaceAToB), `${record.taskId}: preface A->B`);
      t.same(paused.options.prefaceBToA && Buffer.from(paused.options.prefaceBToA), preface(record.options.prefaceBToA), `${record.taskId}: preface B->A`);
      t.same(task.meta, record.meta, `${record.taskId}: meta`);
    }
    t.ok(splicer.nextEngineId > highestEngineId, 'nextEngineId is above every relay\'s engine id');
    const relayIndices = splicer.relays.flatMap((r) => [r.fdA, r.fdB, ...(r.pipeAToB?.fds ?? []), ...(r.pipeBToA?.fds ?? [])]);
    t.same(
      [...new Set(described)].sort((a, b) => a - b),
      [...relayIndices].sort((a, b) => a - b),
      'importRelay checked the kind of every relay fd',
    );
    t.end();
  });

  t.test(`${name}: importRelay refuses the relays when the fds do not match`, (t) => {
    const state = decodeState(load(name));
    const splicer = state.document.tasks as SplicerState;
    const server = state.document.server as ExportedServerState;
    const { roles } = indexRoles(server, splicer);
    const fdCount = state.document.fdCount as number;
    const withPipes = splicer.relays.find((r) => r.pipeAToB) as RelayRecord;

    const asPipe = fakeFds(fdCount, roles, new Map([[withPipes.fdA, 'pipe']]));
    const notASocket = thrown(() => importRelay(withPipes, asPipe.fds, asPipe.describe));
    t.equal(notASocket.code, 'EFDFERRY_STATE', `socket A arriving as a pipe: ${notASocket.message}`);

    const asSocket = fakeFds(fdCount, roles, new Map([[withPipes.pipeAToB!.fds[0], 'stream']]));
    const notAPipe = thrown(() => importRelay(withPipes, asSocket.fds, asSocket.describe));
    t.equal(notAPipe.code, 'EFDFERRY_STATE', `a pipe arriving as a socket: ${notAPipe.message}`);

    const short = fakeFds(fdCount, roles);
    const highest = Math.max(withPipes.fdA, withPipes.fdB, ...withPipes.pipeAToB!.fds, ...(withPipes.pipeBToA?.fds ?? []));
    const missing = thrown(() => importRelay(withPipes, short.fds.slice(0, highest), short.describe));
    t.equal(missing.code, 'EFDFERRY_STATE', `an fd missing: ${missing.message}`);
    t.match(missing.message, /out of range/);
    t.end();
  });

  t.test(`${name}: a corrupted copy fails the checksum`, (t) => {
    const original = load(name);
    const corrupt = Buffer.from(original);
    const at = STATE_HEADER_SIZE + Math.floor((corrupt.length - STATE_HEADER_SIZE) / 2);
    corrupt[at] = corrupt[at]! ^ 0x20;
    const error = thrown(() => decodeState(corrupt));
    t.ok(error instanceof ProtocolError, 'a ProtocolError');
    t.equal(error.code, 'EFDFERRY_STATE');
    t.match(error.message, /checksum mismatch/);
    // And the last byte, which keeps the JSON valid in many cases: the checksum must still catch it.
    const tail = Buffer.from(original);
    tail[tail.length - 1] = tail[tail.length - 1]! ^ 0x01;
    t.match(thrown(() => decodeState(tail)), { code: 'EFDFERRY_STATE', message: /checksum mismatch/ });
    t.doesNotThrow(() => decodeState(original), 'the original is untouched');
    t.end();
  });

  t.test(`${name}: an unknown format version is refused, naming the supported ones`, (t) => {
    for (const format of [0, Math.max(...SUPPORTED_FORMATS) + 1, 0xffff]) {
      const bytes = Buffer.from(load(name));
      bytes.writeUInt16LE(format, 4);
      const error = thrown(() => decodeState(bytes));
      t.equal(error.code, 'EFDFERRY_STATE', `format ${format}: EFDFERRY_STATE`);
      t.match(error.message, new RegExp(`format ${format} is not supported`), `format ${format}: the message names it`);
      t.ok(error.message.includes(`reads ${SUPPORTED_FORMATS.join(', ')}`), `format ${format}: the message names the supported formats: ${error.message}`);
      t.same(error.details, { format, supported: SUPPORTED_FORMATS }, `format ${format}: details for programs`);
    }
    t.end();
  });
}

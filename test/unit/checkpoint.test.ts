// The crash checkpoint's layout: complete records are read back in order; a torn or corrupted tail is
// detected and never mistaken for state. No root, no addon: the memfd is a temporary file here.
import t from 'tap';
import type { Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Checkpoint, readCheckpoint } from '../../lib/systemd/checkpoint.js';

const make = (t: Test) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fdf-ckpt-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const fds: number[] = [];
  t.teardown(() => fds.forEach((fd) => fs.closeSync(fd)));
  const binding = {
    memfdCreate: (name: string) => {
      const fd = fs.openSync(path.join(dir, name), 'w+');
      fds.push(fd);
      return fd;
    },
  };
  const checkpoint = Checkpoint.create(binding, 'a1b2c3d4');
  for (let i = 1; i <= 3; i++) checkpoint.append({ op: 'add', taskId: `t-${i}`, meta: { i } });
  return { checkpoint, file: path.join(dir, 'fdferry-checkpoint-a1b2c3d4') };
};

t.test('records come back whole and in order', (t) => {
  const { checkpoint } = make(t);
  const contents = readCheckpoint(checkpoint.fd)!;
  t.equal(contents.epoch, 'a1b2c3d4');
  t.ok(contents.createdAt > 0);
  t.same(contents.records.map((r) => (r as { taskId: string }).taskId), ['t-1', 't-2', 't-3']);
  t.equal(contents.torn, null, 'nothing torn');
  t.end();
});

t.test('a record cut short by a crash is detected; everything before it is kept', (t) => {
  const { checkpoint, file } = make(t);
  const size = fs.statSync(file).size;
  for (const cut of [1, 5, 17, 20]) {
    fs.truncateSync(file, size - cut);
    const contents = readCheckpoint(checkpoint.fd)!;
    t.equal(contents.records.length, 2, `cut ${cut} bytes short: the last record is not used`);
    t.ok(contents.torn, `and the tear is reported (${contents.torn})`);
  }
  t.end();
});

t.test('a flipped byte, a bad length or a sequence out of order stops the reader there', (t) => {
  const { checkpoint, file } = make(t);
  const original = fs.readFileSync(file);
  const firstRecordLength = original.readUInt32LE(32);
  const second = 32 + 16 + firstRecordLength;
  const cases: Array<[string, (data: Buffer) => void, RegExp]> = [
    ['a flipped payload byte', (d) => (d[second + 20] ^= 0xff), /checksum/],
    ['a huge length', (d) => d.writeUInt32LE(0x7fffffff, second), /runs past the end/],
    ['a repeated sequence number', (d) => d.writeBigUInt64LE(1n, second + 8), /checksum|sequence/],
  ];
  for (const [what, corrupt, why] of cases) {
    const data = Buffer.from(original);
    corrupt(data);
    fs.writeFileSync(file, data);
    const contents = readCheckpoint(checkpoint.fd)!;
    t.equal(contents.records.length, 1, `${what}: only the record before it is used`);
    t.match(contents.torn, why, `${what}: ${contents.torn}`);
  }
  fs.writeFileSync(file, Buffer.from('not a checkpoint at all, but long enough to have a header'));
  t.equal(readCheckpoint(checkpoint.fd), null, 'a file that is not a checkpoint is not read as one');
  t.end();
});

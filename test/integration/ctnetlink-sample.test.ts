// native/ctnetlink.h against the reservation sample of notes/fish-kernel.md §7 (168 bytes a 6.18 kernel
// accepted): builds native/check/ctnetlink_check.cc with the C++ compiler node-gyp uses and runs it. No root,
// no addon: the encoder is a pure header.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const compiler = process.env.CXX ?? 'c++';
const skip = spawnSync(compiler, ['--version'], { stdio: 'ignore' }).status === 0 ? false : `${compiler} is not installed`;

t.test('the ctnetlink reservation encoder reproduces the verified sample', { skip }, async (t) => {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'fdferry-ctnetlink-'));
  t.teardown(() => fs.rmSync(work, { recursive: true, force: true }));
  const binary = path.join(work, 'ctnetlink_check');
  const build = spawnSync(compiler, ['-std=c++20', '-Wall', '-Wextra', '-Werror', '-o', binary, path.join(root, 'native', 'check', 'ctnetlink_check.cc')], {
    encoding: 'utf8',
  });
  t.equal(build.status, 0, `compiles: ${build.stderr}`);
  if (build.status !== 0) return;
  const run = spawnSync(binary, [], { encoding: 'utf8' });
  t.comment(run.stdout.trim());
  t.equal(run.status, 0, 'every check passes');
  t.notMatch(run.stdout, /^not ok/m, 'no failed check');
  t.match(run.stdout, /byte for byte/, 'the sample was compared');
});

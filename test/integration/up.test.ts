// `fdferry up` (what `npm start` runs): the three daemons under one foreground supervisor, Fish in a network
// namespace of its own; Ctrl-C stops them all and removes the namespace. Nothing is configured in the
// machine's own namespace: the test checks that its links are exactly as they were.
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { loadNative } from '../../lib/native.js';
import { RpcClient } from '../../lib/rpc/client.js';
import { fileURLToPath } from 'node:url';
import { tempDir } from '../helpers/daemon.js';
import { eventually } from '../helpers/native-helpers.js';
import { alive } from '../helpers/restart.js';

t.setTimeout(180_000);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const notRoot = process.getuid?.() === 0 ? false : 'fdferry up starts Bumblebee and Fish, which need root';
const SERVICES = ['splicer', 'bumblebee', 'fish'];

async function statusOf(socket: string): Promise<Record<string, unknown>> {
  const client = new RpcClient({ path: socket, owner: `up-test-${process.pid}`, binding: loadNative(), reconnect: false, requestTimeoutMs: 10_000 });
  try {
    await client.connect();
    return (await client.request('status')).result;
  } finally {
    client.close();
  }
}

const namespaces = () => execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' });

t.test('fdferry up runs the three daemons, Fish in its own namespace, and Ctrl-C stops them all and removes it', { skip: notRoot }, async (t) => {
  const dir = tempDir(t, 'fdf-up-');
  const rootLinksBefore = execFileSync('ip', ['link', 'show'], { encoding: 'utf8' });
  // As `npm start` runs it: the built CLI, which starts each daemon from dist/ next to it.
  const up = spawn(process.execPath, [path.join(root, 'dist', 'services', 'cli.js'), 'up', '--run-dir', dir, '--log-level', 'warn'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  up.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => up.once('exit', (code) => resolve(code)));
  const pids: number[] = [];
  t.teardown(() => {
    if (up.exitCode === null) up.kill('SIGKILL');
    for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
  });

  t.ok(await eventually(() => SERVICES.every((service) => fs.existsSync(path.join(dir, `${service}.sock`))), 30_000), "every daemon's socket appeared", { stderr });
  const namespace = `fdferry-up-${up.pid}`;
  t.match(namespaces(), namespace, 'Fish got a network namespace of its own');
  for (const service of SERVICES) {
    const status = await statusOf(path.join(dir, `${service}.sock`));
    t.equal(status.service, service, `${service} answers`);
    pids.push(Number(status.pid));
  }
  t.match(execFileSync('ip', ['netns', 'exec', namespace, 'ip', 'link', 'show', 'fish0'], { encoding: 'utf8' }), /fish0/, 'fish0 is in that namespace');
  t.equal(execFileSync('ip', ['link', 'show'], { encoding: 'utf8' }), rootLinksBefore, 'and no link changed in the machine\'s own namespace');

  up.kill('SIGINT');
  t.equal(await exited, 0, 'up exited 0', { stderr });
  t.ok(pids.every((pid) => !alive(pid)), 'every daemon stopped');
  t.notMatch(namespaces(), namespace, 'the namespace is gone');
});

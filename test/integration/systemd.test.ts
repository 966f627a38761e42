// What a service manager sees and gives: socket activation under systemd-socket-activate, and the
// watchdog and STATUS= lines heard on a test notify socket, before and after a hand-over.
import t from 'tap';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadNative } from '../../lib/native.js';
import { RpcClient } from '../../lib/rpc/client.js';
import { cliCommand, startDaemon, tempDir } from '../helpers/daemon.js';
import { withDeadline } from '../helpers/native-helpers.js';
import { notifySocket } from '../helpers/notify-socket.js';
import { Generations, reload } from '../helpers/restart.js';

t.setTimeout(90_000);
const binding = loadNative();
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

t.test('socket activation: the daemon adopts the passed listener, checks it, and hides LISTEN_* from its children', async (t) => {
  const dir = tempDir(t);
  const socket = path.join(dir, 'activated.sock');
  const { command, args } = cliCommand();
  // systemd-socket-activate binds the socket and starts the daemon on the first connection.
  const child = spawn(
    'systemd-socket-activate',
    ['--seqpacket', '-l', socket, '--fdname=splicer', command, ...args, 'splicer', '--socket', path.join(dir, 'unused.sock'), '--log-level', 'debug'],
    { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const exited = new Promise((resolve) => child.once('exit', resolve));
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  });
  const deadline = Date.now() + 10_000;
  while (!fs.existsSync(socket) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
  const client = new RpcClient({ path: socket, owner: `activated-${process.pid}`, binding, reconnect: false, requestTimeoutMs: 20_000 });
  t.teardown(() => client.close());
  await withDeadline(client.connect(), 20_000, `hello through the activated socket; output: ${output}`);
  const status = (await client.request('status')).result;
  t.equal(status.service, 'splicer', 'the activated daemon answers on the socket it was given');
  t.ok(output.includes('adopted the listening socket from the service manager'), 'and says it adopted it');
  t.notOk(fs.existsSync(path.join(dir, 'unused.sock')), 'it bound nothing of its own');
  // A child of the daemon (its successor) must not inherit LISTEN_*: the fds they name are not its.
  const { report } = await reload('splicer', socket);
  t.equal(report.ok, true, 'the activated daemon hands over like any other');
  const environ = fs.readFileSync(`/proc/${report.newPid}/environ`, 'utf8').split('\0');
  t.same(environ.filter((entry) => entry.startsWith('LISTEN_')), [], 'its successor got no LISTEN_* variables');
  t.equal((await client.request('status')).result.pid, report.newPid, 'the successor serves the activated socket');
  process.kill(report.newPid!, 'SIGTERM');
  const stopDeadline = Date.now() + 20_000;
  while (fs.existsSync(`/proc/${report.newPid}`) && Date.now() < stopDeadline) await new Promise((resolve) => setTimeout(resolve, 20));
  t.ok(fs.existsSync(socket), 'the activated socket stays: it belongs to the service manager');
});

t.test('socket activation refuses a socket of the wrong kind with a clear error', async (t) => {
  const dir = tempDir(t);
  const socket = path.join(dir, 'stream.sock');
  const { command, args } = cliCommand();
  const child = spawn('systemd-socket-activate', ['-l', socket, '--fdname=splicer', command, ...args, 'splicer'], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const deadline = Date.now() + 10_000;
  while (!fs.existsSync(socket) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
  // A stream connection triggers the start.
  const net = await import('node:net');
  const poke = net.connect(socket);
  poke.on('error', () => {});
  t.teardown(() => poke.destroy());
  const code = await withDeadline(exited, 20_000, 'the daemon to refuse the socket');
  t.not(code, 0, 'the daemon exits with an error');
  t.match(output, /not a listening AF_UNIX SOCK_SEQPACKET socket \(use ListenSequentialPacket=/, 'saying what is wrong and how to fix it');
});

t.test('watchdog: pings at half WATCHDOG_USEC from the live generation, across a hand-over; STATUS= says what it does', async (t) => {
  const dir = tempDir(t);
  // Like systemd, close a BARRIER=1 fd once the message is processed (the successor waits for that).
  const notify = notifySocket(t, dir, (message) => {
    binding.closeAll(message.fds);
    message.fds.length = 0;
  });
  const daemon = await startDaemon(t, 'splicer', [], { dir, env: { NOTIFY_SOCKET: notify.address, WATCHDOG_USEC: '200000' } });
  const generations = new Generations(t, daemon.pid);
  const pings = () => notify.received.items.filter((m) => m.fields.WATCHDOG === '1');
  const waitPings = async (count: number) => {
    const deadline = Date.now() + 10_000;
    while (pings().length < count && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    return pings().length;
  };
  t.ok((await waitPings(6)) >= 6, 'the watchdog is pinged');
  const times = pings().slice(1, 6).map((m) => m.at);
  const gaps = times.slice(1).map((at, i) => at - times[i]!);
  // Timer-driven in the daemon; the margins are for a loaded machine delivering them late or in pairs.
  const average = (times[times.length - 1]! - times[0]!) / gaps.length;
  t.ok(average >= 70 && average <= 200, `about every 100 ms for WATCHDOG_USEC=200000 (${gaps.join(', ')} ms)`);
  const before = pings().length;
  const { report } = await reload('splicer', daemon.socket);
  t.equal(report.ok, true, 'a hand-over');
  t.same(daemon.logs.filter((line) => Number(line.levelValue) >= 40), [], 'without a warning');
  generations.add(report.newPid!);
  t.ok((await waitPings(before + 5)) >= before + 5, 'pings go on after it, from the successor (the old process is gone)');
  const ready = notify.received.items.findIndex((m) => m.fields.MAINPID === String(report.newPid));
  t.ok(ready > 0, 'the successor announced itself');
  const status = notify.received.items.find((m) => m.fields.STATUS?.startsWith('generation 1: listening'));
  t.ok(status, 'STATUS= says what the daemon is doing');
});

t.test('notify messages in order at start and stop: READY=1 with STATUS=, then STOPPING=1 before the exit', async (t) => {
  const dir = tempDir(t);
  const notify = notifySocket(t, dir, (message) => {
    binding.closeAll(message.fds);
    message.fds.length = 0;
  });
  const daemon = await startDaemon(t, 'bumblebee', [], { dir, env: { NOTIFY_SOCKET: notify.address } });
  daemon.kill('SIGTERM');
  t.equal(await daemon.exited, 0, 'a clean stop');
  const fields = notify.received.items.map((m) => m.fields);
  const ready = fields.findIndex((f) => f.READY === '1');
  const stopping = fields.findIndex((f) => f.STOPPING === '1');
  t.ok(ready >= 0 && stopping > ready, `READY=1 (message ${ready}) comes before STOPPING=1 (message ${stopping})`);
  t.match(fields[ready]!.STATUS, /^generation 1: listening/, 'READY=1 says what the daemon does');
  t.match(fields[stopping]!.STATUS, /^stopping: SIGTERM/, 'STOPPING=1 says why');
  t.equal(fields.slice(stopping + 1).filter((f) => f.READY === '1').length, 0, 'nothing claims readiness after it');
});

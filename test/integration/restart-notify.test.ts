// What systemd hears during a hand-over (notes/systemd-restart.md §1, §3, §11.7): the test plays the service
// manager's notify socket (an AF_UNIX datagram socket bound on a temporary path, given to the daemon as
// NOTIFY_SOCKET) and checks the sequence — READY=1 at start; RELOADING=1, then the successor's MAINPID= and
// READY=1, then BARRIER=1 with exactly one fd — and that the old process waits for the barrier before it exits.
// A failed hand-over must end the reload with READY=1 and a STATUS= saying the upgrade failed.
import t from 'tap';
import { isRunning } from '../../lib/process.js';
import { isDaemonOn } from '../helpers/restart.js';
import type { Test } from 'tap';
import { spawn } from 'node:child_process';
import type { HandoffReport } from '../../lib/handoff/predecessor.js';
import { loadNative } from '../../lib/native.js';
import { cliCommand, startDaemon, tempDir, type TestDaemon } from '../helpers/daemon.js';
import { eventually, withDeadline } from '../helpers/native-helpers.js';
import { notifySocket, type Notification } from '../helpers/notify-socket.js';

t.setTimeout(60_000);
const binding = loadNative();
/** How long the test, playing systemd, keeps the barrier fd before closing it. */
const BARRIER_HOLD_MS = 300;

/** At teardown, SIGKILLs every process that logged on the daemon's stdout (successors) and still runs it. */
function killSuccessorsAtTeardown(t: Test, daemon: TestDaemon, extra: () => Array<number | null | undefined>) {
  t.teardown(() => {
    const pids = new Set([...daemon.logs.map((line) => Number(line.pid)), ...extra()]);
    for (const pid of pids) if (pid && isRunning(pid) && isDaemonOn(pid, daemon.socket)) process.kill(pid, 'SIGKILL');
  });
}

/** `fdferry ctl splicer reload --json [args]`: resolves with the exit code, the report and when it ended. */
function reload(t: Test, socket: string, args: string[] = []) {
  const { command, args: base } = cliCommand();
  const child = spawn(command, [...base, 'ctl', 'splicer', 'reload', '--json', '--socket', socket, '--timeout', '20000', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  return new Promise<{ exitCode: number | null; report: HandoffReport | null; stderr: string; at: number }>((resolve) => {
    child.on('close', (exitCode) => {
      let report: HandoffReport | null = null;
      try {
        report = JSON.parse(stdout.trim().split('\n').pop() ?? '') as HandoffReport;
      } catch {
        // the exit code and stderr tell
      }
      resolve({ exitCode, report, stderr, at: Date.now() });
    });
  });
}

const render = (messages: Notification[]) => messages.map((m) => `[${m.lines.join(' | ')}${m.fds.length ? ` +${m.fds.length} fd` : ''}]`).join(' ');

t.test('start and a successful reload: READY; then RELOADING, MAINPID + READY, BARRIER; the old process waits for the barrier', async (t) => {
  const dir = tempDir(t);
  let oldPid = 0;
  const barrier: { heldFrom?: number; closedAt?: number; oldAliveWhileHeld?: boolean; fds?: number } = {};
  const notify = notifySocket(t, dir, (message) => {
    if (message.fields.BARRIER !== '1') return;
    barrier.heldFrom = Date.now();
    barrier.fds = message.fds.length;
    // Play a slow service manager: hold the barrier fd, then close it (that is the answer).
    setTimeout(() => {
      barrier.oldAliveWhileHeld = isRunning(oldPid);
      binding.closeAll(message.fds);
      message.fds = [];
      barrier.closedAt = Date.now();
    }, BARRIER_HOLD_MS);
  });
  const daemon = await startDaemon(t, 'splicer', ['--handoff-timeout', '10000'], { dir, env: { NOTIFY_SOCKET: notify.address } });
  oldPid = daemon.pid;
  let exitedAt = 0;
  void daemon.exited.then(() => (exitedAt = Date.now()));
  let newPid: number | null = null;
  killSuccessorsAtTeardown(t, daemon, () => [newPid]);

  const [ready] = await notify.received.wait(1, 10_000, 'notifications at start');
  t.equal(ready!.fields.READY, '1', `READY=1 once listening: ${render([ready!])}`);
  t.equal(notify.received.items.length, 1, 'and nothing else yet');

  const result = await reload(t, daemon.socket);
  newPid = result.report?.newPid ?? null;
  t.equal(result.exitCode, 0, `reload exits 0${result.exitCode === 0 ? '' : `: ${result.stderr}`}`);
  t.match(result.report, { ok: true, oldPid: daemon.pid }, `pid ${daemon.pid} -> ${String(newPid)}`);
  const messages = notify.received.items.slice(1);
  t.comment(`during the reload: ${render(messages)}`);

  const first = (predicate: (m: Notification) => boolean) => messages.findIndex(predicate);
  const reloading = first((m) => m.fields.RELOADING === '1');
  const mainpid = first((m) => m.fields.MAINPID !== undefined);
  const readyAgain = first((m) => m.fields.READY === '1');
  const barrierAt = first((m) => m.fields.BARRIER === '1');
  t.equal(reloading, 0, 'RELOADING=1 comes first (from the old process, before the successor exists)');
  t.ok(mainpid > reloading, 'then MAINPID=');
  t.equal(messages[mainpid]?.fields.MAINPID, String(newPid), 'naming the successor the report names');
  t.ok(readyAgain >= mainpid, 'READY=1 comes with or after MAINPID=, never before it');
  if (readyAgain === mainpid) {
    const lines = messages[mainpid]!.lines.map((line) => line.split('=')[0]);
    t.ok(lines.indexOf('MAINPID') < lines.indexOf('READY'), 'MAINPID= is the line before READY=1 in the same datagram');
  }
  t.ok(barrierAt > readyAgain, 'then BARRIER=1, in a datagram of its own');
  t.equal(messages[barrierAt]?.lines.length, 1, 'BARRIER=1 travels alone');
  t.equal(barrier.fds, 1, 'with exactly one fd attached');
  t.equal(messages.filter((m) => m.fields.READY === '1').length, 1, 'READY=1 is sent once per reload');
  t.equal(messages.filter((m) => m.fields.BARRIER === '1').length, 1, 'BARRIER=1 is sent once');
  t.notOk(messages.some((m) => m.fields.STATUS?.includes('upgrade failed')), 'no failure status');
  t.same(notify.faults, [], 'no datagram arrived truncated');

  // The barrier: the old process must not exit while systemd may not yet know the new main pid.
  t.equal(barrier.oldAliveWhileHeld, true, `the old process ${daemon.pid} was still running ${BARRIER_HOLD_MS} ms into the barrier`);
  t.equal(await withDeadline(daemon.exited, 10_000, 'the old process to exit').catch(() => 'still running'), 0, 'it exits 0');
  t.ok(barrier.closedAt && exitedAt >= barrier.closedAt, `it exited after the barrier fd was closed (${exitedAt - (barrier.closedAt ?? 0)} ms after)`);
  t.ok(barrier.closedAt && result.at >= barrier.closedAt, `the reload report arrived after the barrier fd was closed (${result.at - (barrier.closedAt ?? 0)} ms after)`);
  t.ok(barrier.heldFrom && barrier.closedAt && barrier.closedAt - barrier.heldFrom >= BARRIER_HOLD_MS - 5, 'the barrier was held for the whole delay');
  t.ok(newPid && isRunning(newPid), 'the successor serves');
});

t.test('a failed reload: RELOADING, then READY with STATUS=upgrade failed, and no MAINPID', async (t) => {
  const dir = tempDir(t);
  const notify = notifySocket(t, dir);
  const daemon = await startDaemon(t, 'splicer', ['--allow-fault-injection', '--handoff-timeout', '10000'], { dir, env: { NOTIFY_SOCKET: notify.address } });
  let successor: number | null = null;
  killSuccessorsAtTeardown(t, daemon, () => [successor]);
  await notify.received.wait(1, 10_000, 'notifications at start');
  t.equal(notify.received.items[0]!.fields.READY, '1', 'READY=1 once listening');

  const result = await reload(t, daemon.socket, ['--fault', 'reject-state']);
  successor = result.report?.newPid ?? null;
  t.not(result.exitCode, 0, 'reload exits non-zero');
  t.match(result.report, { ok: false, oldPid: daemon.pid, failure: { phase: 'validate', code: 'EFDFERRY_STATE' } }, 'the successor refused the state');
  // The rollback's READY=1 is sent right after the report is logged; allow it a moment to arrive.
  await notify.received.wait(3, 5_000, 'notifications after the rollback').catch(() => undefined);
  const messages = notify.received.items.slice(1);
  t.comment(`during the reload: ${render(messages)}`);
  t.equal(messages.length, 2, 'two notifications');
  t.equal(messages[0]?.fields.RELOADING, '1', 'RELOADING=1 first');
  t.equal(messages[1]?.fields.READY, '1', 'then READY=1 (the old process is ready again)');
  t.match(messages[1]?.fields.STATUS ?? '', /upgrade failed/, `with STATUS= saying so: ${String(messages[1]?.fields.STATUS)}`);
  t.match(messages[1]?.fields.STATUS ?? '', /validate.*EFDFERRY_STATE/, 'naming the phase and code');
  t.notOk(messages.some((m) => m.fields.MAINPID !== undefined || m.fields.BARRIER !== undefined), 'the refused successor never announced itself');
  t.ok(successor && (await eventually(() => !isRunning(successor!), 5_000)), `the successor ${String(successor)} is gone`);
  t.ok(isRunning(daemon.pid), 'the old process serves on');
});

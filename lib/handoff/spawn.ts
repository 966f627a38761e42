/**
 * Starting a successor: the same executable and arguments, the hand-over socket on fd 3, and
 * re-parented away from us.
 *
 * On systemd 252 a successor that is still the old main process's child when it sends `MAINPID=` is
 * treated as an alien and SIGKILLed at the next stop (`notes/systemd-restart.md` §3.2), so it is started
 * through `setsid --fork`: the setsid process forks the daemon and exits at once, and the daemon is
 * re-parented to the service manager, init, or the nearest subreaper (a test harness, `fdferry up`).
 * Plain `spawn({detached: true})` only calls setsid() and does not re-parent.
 */
import { spawn } from 'node:child_process';

/** Environment variables of the hand-over (read and removed by the successor). */
export const HANDOFF_ENV = {
  fd: 'FDFERRY_HANDOFF_FD',
  parent: 'FDFERRY_HANDOFF_PARENT',
  generation: 'FDFERRY_GENERATION',
  fault: 'FDFERRY_HANDOFF_FAULT',
  fds: 'FDFERRY_HANDOFF_FDS',
} as const;

/** The fd number the successor finds its hand-over socket on. */
export const HANDOFF_FD = 3;

/** Faults a successor can be told to commit, for tests (see docs/restart.md). */
export const HANDOFF_FAULTS = ['crash-before-hello', 'hang-before-hello', 'crash-after-fds', 'reject-state', 'hang-after-ack'] as const;
/** One injectable fault. */
export type HandoffFault = (typeof HANDOFF_FAULTS)[number];

/** Starts the successor with `channelFd` as its fd 3; resolves once the launcher has exited. */
export async function spawnSuccessor(channelFd: number, generation: number, fault: HandoffFault | null, expectedFds = 0): Promise<void> {
  const env: NodeJS.ProcessEnv = { ...process.env };
  // How many fds are coming, so the successor can size its fd table before the pause (see successor.ts).
  env[HANDOFF_ENV.fds] = String(expectedFds);
  env[HANDOFF_ENV.fd] = String(HANDOFF_FD);
  env[HANDOFF_ENV.parent] = String(process.pid);
  env[HANDOFF_ENV.generation] = String(generation);
  if (fault) env[HANDOFF_ENV.fault] = fault;
  else delete env[HANDOFF_ENV.fault];
  // The successor pings the watchdog only once it is the main process; systemd's WATCHDOG_PID names us.
  delete env.WATCHDOG_PID;
  const launcher = spawn('setsid', ['--fork', process.execPath, ...process.execArgv, ...process.argv.slice(1)], {
    env,
    stdio: ['ignore', 'inherit', 'inherit', channelFd],
  });
  await new Promise<void>((resolve, reject) => {
    launcher.once('error', (error) => reject(new Error(`cannot start the successor: ${error.message} (is util-linux's setsid installed?)`)));
    launcher.once('exit', (code, signal) =>
      code === 0 ? resolve() : reject(new Error(`the successor launcher failed (${signal ?? `exit ${code}`})`)),
    );
  });
}

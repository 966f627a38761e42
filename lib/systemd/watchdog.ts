/**
 * The service manager's watchdog: with `WATCHDOG_USEC` set (and `WATCHDOG_PID` naming this process, or
 * unset), `WATCHDOG=1` is sent at half the interval. Only the live generation pings: a successor starts
 * once it has taken over (its predecessor strips `WATCHDOG_PID`, which names the old process), and a
 * predecessor stops when it hands over.
 */
import type { Notifier } from './notify.js';

/** Pings the watchdog until stopped; `null` when no watchdog is configured for this process. */
export function startWatchdog(notifier: Notifier, env: NodeJS.ProcessEnv = process.env, pid: number = process.pid): { stop(): void; intervalMs: number } | null {
  const usec = Number(env.WATCHDOG_USEC);
  if (!notifier.enabled || !Number.isInteger(usec) || usec <= 0) return null;
  if (env.WATCHDOG_PID !== undefined && Number(env.WATCHDOG_PID) !== pid) return null;
  const intervalMs = Math.max(1, Math.floor(usec / 2000));
  notifier.send({ WATCHDOG: 1 });
  // A blocked event loop misses pings: exactly what the watchdog is for, so the timer is the loop's own.
  const timer = setInterval(() => notifier.send({ WATCHDOG: 1 }), intervalMs);
  timer.unref();
  return { stop: () => clearInterval(timer), intervalMs };
}

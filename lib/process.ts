/**
 * Whether a process still runs, for processes that are not our children (a successor is re-parented on
 * purpose, so we can neither wait for it nor see its exit): it exists and is not a zombie. A zombie holds no
 * fds and moves no bytes, and whoever reaps it (init, a subreaper) may take its time.
 */
import fs from 'node:fs';

/** True while `pid` exists and is not a zombie (state Z in /proc/<pid>/stat). */
export function isRunning(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The state follows the command name, which is in parentheses and may itself contain spaces.
    const close = stat.lastIndexOf(')');
    return stat.slice(close + 2, close + 3) !== 'Z';
  } catch {
    return false;
  }
}

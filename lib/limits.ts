/**
 * The process's file-descriptor limit, read from /proc (Node has no getrlimit), and the warning a daemon
 * gives when its configured limits cannot fit under it: an operator should learn at start-up, not at the
 * first EMFILE under load.
 */
import fs from 'node:fs';

/** RLIMIT_NOFILE (soft, hard) of this process, or null if /proc does not say. */
export function openFileLimit(limitsFile = '/proc/self/limits'): { soft: number; hard: number } | null {
  try {
    const line = fs.readFileSync(limitsFile, 'utf8').split('\n').find((l) => l.startsWith('Max open files'));
    const match = line ? /Max open files\s+(\S+)\s+(\S+)/.exec(line) : null;
    if (!match) return null;
    const parse = (value: string) => (value === 'unlimited' ? Number.POSITIVE_INFINITY : Number(value));
    return { soft: parse(match[1]!), hard: parse(match[2]!) };
  } catch {
    return null;
  }
}

/** Open fds this process has right now. */
export function openFileCount(): number {
  try {
    return fs.readdirSync('/proc/self/fd').length;
  } catch {
    return 0;
  }
}

/**
 * Who may talk to a daemon. fdferry runs as root and takes file descriptors from other processes, so
 * it trusts nobody by default: the socket file's mode, owner and group decide who can connect at all,
 * and every connection is then checked against allow-lists of uids and gids from `SO_PEERCRED` (with
 * the peer's supplementary groups from /proc) before a single request is read. Control operations
 * (reload, metrics, cancelling or draining other people's tasks) have their own, separate allow-list.
 */
import fs from 'node:fs';
import type { PeerCredentials } from '../native.js';

/** The allow-lists (each has a flag and a config-file key). */
export interface AccessPolicy {
  /** Peers that may connect and hand over tasks: by uid, or by any of their groups. */
  allowUids: readonly number[];
  allowGids: readonly number[];
  /** Peers that may use control operations. */
  controlUids: readonly number[];
  controlGids: readonly number[];
}

/** Root and the daemon's own user, for both lists: anyone else must be named. */
export function defaultAccessPolicy(ownUid: number = process.getuid?.() ?? 0): AccessPolicy {
  const uids = [...new Set([0, ownUid])];
  return { allowUids: uids, allowGids: [], controlUids: uids, controlGids: [] };
}

/** The peer's supplementary groups (`Groups:` of /proc/<pid>/status); empty when it cannot be read. */
export function peerGroups(pid: number, procRoot = '/proc'): number[] {
  try {
    const line = fs.readFileSync(`${procRoot}/${pid}/status`, 'utf8').split('\n').find((l) => l.startsWith('Groups:'));
    return line ? line.slice('Groups:'.length).trim().split(/\s+/).filter(Boolean).map(Number) : [];
  } catch {
    return [];
  }
}

/** The peer's executable, for refusal logs; null when it cannot be read (it exited, or another pid namespace). */
export function peerExecutable(pid: number, procRoot = '/proc'): string | null {
  try {
    return fs.readlinkSync(`${procRoot}/${pid}/exe`);
  } catch {
    return null;
  }
}

/** What a peer may do. */
export interface PeerAccess {
  connect: boolean;
  control: boolean;
}

/** Checks a peer against the policy; `groups` are its supplementary groups. */
export function accessOf(policy: AccessPolicy, peer: PeerCredentials, groups: readonly number[]): PeerAccess {
  const gids = [peer.gid, ...groups];
  const inList = (uids: readonly number[], allowed: readonly number[]) => uids.includes(peer.uid) || gids.some((gid) => allowed.includes(gid));
  const control = inList(policy.controlUids, policy.controlGids);
  // Whoever may control a daemon may also use it.
  return { connect: control || inList(policy.allowUids, policy.allowGids), control };
}

/** Parses a comma-separated list of user or group names and numbers, resolving names from `file`. */
export function parseIdList(flag: string, value: string | readonly (string | number)[], file: '/etc/passwd' | '/etc/group'): number[] {
  const items = (Array.isArray(value) ? value : String(value).split(',')).map((item) => String(item).trim()).filter(Boolean);
  return items.map((item) => {
    if (/^\d+$/.test(item)) return Number(item);
    const id = lookupName(item, file);
    if (id === null) throw new Error(`--${flag}: no ${file === '/etc/passwd' ? 'user' : 'group'} named "${item}" in ${file}`);
    return id;
  });
}

/** A user or group id by name from /etc/passwd or /etc/group (the third field); null if absent. */
export function lookupName(name: string, file: '/etc/passwd' | '/etc/group'): number | null {
  try {
    for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
      const fields = line.split(':');
      if (fields[0] === name && fields[2] !== undefined && /^\d+$/.test(fields[2])) return Number(fields[2]);
    }
  } catch {
    // No such file: only numbers can be used.
  }
  return null;
}

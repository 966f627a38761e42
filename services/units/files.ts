/**
 * Writing and removing unit files in a unit directory. Only files that start with the generated-file
 * marker are ever replaced or removed: a hand-written unit of the same name is left alone (install
 * refuses to overwrite it without --force), and so are drop-in directories and the symlinks that
 * `systemctl enable` creates.
 */
import fs from 'node:fs';
import path from 'node:path';
import { isGenerated } from './ini.js';
import type { UnitFile } from './render.js';

/** What happened to one file. */
export interface InstallResult {
  file: string;
  status: 'written' | 'unchanged';
}

/** What `uninstallUnitFiles` found and did. */
export interface UninstallResult {
  removed: string[];
  /** Files of the same name that fdferry did not write: left in place. */
  foreign: string[];
  /** Files that were not there. */
  missing: string[];
}

function requireDirectory(dir: string): void {
  let stat: fs.Stats;
  try {
    stat = fs.statSync(dir);
  } catch {
    throw new Error(`${dir} does not exist (install-units does not create the unit directory)`);
  }
  if (!stat.isDirectory()) throw new Error(`${dir} is not a directory`);
}

/** Reads a unit file we may replace or remove: its text, or null when it is missing, or 'foreign'. */
function ours(file: string): string | null | 'foreign' {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(file);
  } catch {
    return null;
  }
  // We only ever write regular files: a symlink or anything else of that name is someone else's.
  if (!stat.isFile()) return 'foreign';
  const text = fs.readFileSync(file, 'utf8');
  return isGenerated(text) ? text : 'foreign';
}

/**
 * Writes `units` into `dir`, each atomically (temporary file + rename, mode 0644). Checks every target
 * first, so nothing is written when one of them is foreign and `force` is off.
 */
export function installUnitFiles(dir: string, units: readonly UnitFile[], options: { force: boolean }): InstallResult[] {
  requireDirectory(dir);
  const targets = units.map((unit) => ({ unit, file: path.join(dir, unit.name) }));
  const existing = targets.map(({ file }) => ours(file));
  const foreign = targets.filter((_, i) => existing[i] === 'foreign').map(({ file }) => file);
  if (foreign.length && !options.force) {
    throw new Error(`not written by fdferry install-units, refusing to replace (use --force): ${foreign.join(', ')}`);
  }
  return targets.map(({ unit, file }, i) => {
    if (existing[i] === unit.text) return { file, status: 'unchanged' as const };
    const temporary = path.join(dir, `.${unit.name}.fdferry-${process.pid}.tmp`);
    try {
      fs.writeFileSync(temporary, unit.text, { mode: 0o644, flag: 'wx' });
      fs.chmodSync(temporary, 0o644); // whatever the umask
      if (existing[i] === 'foreign') fs.rmSync(file, { force: true }); // --force over a symlink: replace it, not its target
      fs.renameSync(temporary, file);
    } catch (error) {
      fs.rmSync(temporary, { force: true });
      throw error;
    }
    return { file, status: 'written' as const };
  });
}

/** Symlinks in `dir`'s `*.wants/`, `*.requires/` and `*.upholds/` named after one of `names` (what `systemctl enable` made). */
export function enablementLinks(dir: string, names: readonly string[]): string[] {
  const links: string[] = [];
  let entries: fs.Dirent[];
  try {
    entries = fs.readdirSync(dir, { withFileTypes: true });
  } catch {
    return links;
  }
  for (const entry of entries) {
    if (!entry.isDirectory() || !/\.(wants|requires|upholds)$/.test(entry.name)) continue;
    for (const name of fs.readdirSync(path.join(dir, entry.name))) {
      if (names.includes(name)) links.push(path.join(dir, entry.name, name));
    }
  }
  return links.sort();
}

/** Removes the files named `names` from `dir` if, and only if, fdferry wrote them. */
export function uninstallUnitFiles(dir: string, names: readonly string[]): UninstallResult {
  requireDirectory(dir);
  const result: UninstallResult = { removed: [], foreign: [], missing: [] };
  for (const name of names) {
    const file = path.join(dir, name);
    const text = ours(file);
    if (text === null) result.missing.push(file);
    else if (text === 'foreign') result.foreign.push(file);
    else {
      fs.unlinkSync(file);
      result.removed.push(file);
    }
  }
  return result;
}

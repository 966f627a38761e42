/**
 * The absolute command that runs this installation's `fdferry`: by default the Node binary running us
 * plus the absolute path of `dist/services/cli.js` of this package (no shebang, no `$PATH` lookup under
 * systemd's own `PATH`), or a path the operator gives (`--fdferry`).
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The command prefix, with what the sandbox must be able to read. */
export interface EntryPoint {
  /** argv prefix: `[node, cli.js]` or `[fdferry]`. */
  command: string[];
  /** The package root (for `Documentation=`), when known. */
  packageRoot: string | null;
  /** Paths the service must be able to read (symlinks resolved), for ProtectHome= decisions. */
  paths: string[];
}

/** The root of this fdferry package (the directory of its package.json). */
export function packageRoot(from: string = path.dirname(fileURLToPath(import.meta.url))): string {
  for (let dir = from; ; dir = path.dirname(dir)) {
    const file = path.join(dir, 'package.json');
    if (fs.existsSync(file)) {
      try {
        if ((JSON.parse(fs.readFileSync(file, 'utf8')) as { name?: string }).name === 'fdferry') return dir;
      } catch {
        // not ours: keep going up
      }
    }
    if (path.dirname(dir) === dir) throw new Error(`cannot find fdferry's package.json above ${from}`);
  }
}

const real = (file: string): string => {
  try {
    return fs.realpathSync(file);
  } catch {
    return file;
  }
};

/**
 * Resolves the entry point. `explicit` is `--fdferry`; `mustExist` is false for `--dry-run`, which
 * renders units even before a build.
 */
export function resolveEntryPoint(options: { explicit?: string | undefined; mustExist: boolean; node?: string; root?: string }): EntryPoint {
  if (options.explicit !== undefined) {
    const file = options.explicit;
    if (!path.isAbsolute(file)) throw new Error(`--fdferry must be an absolute path (systemd runs it as is), got ${file}`);
    if (options.mustExist) {
      try {
        fs.accessSync(file, fs.constants.X_OK);
      } catch {
        throw new Error(`--fdferry ${file} is not an executable file`);
      }
    }
    return { command: [file], packageRoot: null, paths: [...new Set([file, real(file)])] };
  }
  const node = options.node ?? process.execPath;
  const root = options.root ?? packageRoot();
  const cli = path.join(root, 'dist', 'services', 'cli.js');
  if (options.mustExist && !fs.existsSync(cli)) {
    throw new Error(`${cli} does not exist: build fdferry first (npm run build), or name the entry point with --fdferry`);
  }
  return { command: [node, cli], packageRoot: root, paths: [...new Set([node, real(node), cli, real(cli)])] };
}

/** Whether `file` lies where ProtectHome=yes would hide it. */
export function underHome(file: string): boolean {
  return ['/home', '/root', '/run/user'].some((dir) => file === dir || file.startsWith(`${dir}/`));
}

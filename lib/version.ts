/** fdferry's own version, read from package.json once. */
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

/** The package version, for `--version`, hello replies and logs. */
export const VERSION: string = (() => {
  const require = createRequire(import.meta.url);
  for (const candidate of ['../package.json', '../../package.json']) {
    try {
      const file = require.resolve(candidate);
      const pkg = JSON.parse(fs.readFileSync(file, 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'fdferry' && pkg.version) return pkg.version;
    } catch {
      // try the next layout (lib/ under tsx, dist/lib/ when compiled)
    }
  }
  return '0.0.0';
})();

/** Default directory of the daemons' sockets. */
export const RUN_DIR = '/run/fdferry';

/** Default socket path of a service. */
export const defaultSocketPath = (service: string): string => path.join(RUN_DIR, `${service}.sock`);

#!/usr/bin/env node
// `npm install`'s postinstall step: compiles the TypeScript into dist/ in a checkout. An installed
// package (npm pack, npm install -g <tarball>) already carries dist/ and has neither the sources' build
// config nor tsc (a devDependency): there is nothing to do then, and saying so beats failing.
import { existsSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';

if (!existsSync('tsconfig.build.json')) {
  if (existsSync('dist/services/cli.js')) process.exit(0);
  console.error('fdferry: neither the TypeScript build config nor a built dist/ is here; this package is incomplete');
  process.exit(1);
}
const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
const result = spawnSync(process.execPath, [tsc, '-p', 'tsconfig.build.json'], { stdio: 'inherit' });
process.exit(result.status ?? 1);

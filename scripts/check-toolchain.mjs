#!/usr/bin/env node
// Runs before `npm install` builds the addon: fail early, naming exactly what is missing, instead of
// letting node-gyp die halfway with a compiler error.
import { execFileSync } from 'node:child_process';

const problems = [];
const [major, minor] = process.versions.node.split('.').map(Number);
if (major !== 20 || minor < 19) problems.push(`Node ${process.versions.node} is not supported: fdferry needs Node ^20.19.0`);
if (process.platform !== 'linux') problems.push(`fdferry runs on Linux only (this is ${process.platform})`);

const tools = [
  ['python3', ['--version'], 'python3'],
  ['make', ['--version'], 'make'],
  ['g++', ['--version'], 'g++'],
];
for (const [command, args, debianPackage] of tools) {
  try {
    execFileSync(command, args, { stdio: 'ignore' });
  } catch {
    problems.push(`\`${command}\` is missing (Debian: apt-get install ${debianPackage})`);
  }
}

if (problems.length) {
  console.error('fdferry cannot be built here:');
  for (const problem of problems) console.error(`  - ${problem}`);
  console.error('On Debian 12: apt-get install -y python3 make g++   (the native addon is built with node-gyp)');
  process.exit(1);
}

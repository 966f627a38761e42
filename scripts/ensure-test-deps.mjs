#!/usr/bin/env node
// `npm test`'s pretest step: the Debian packages the tests use. As root it installs what is missing
// (saying what); otherwise it names exactly what to install and fails.
import { execFileSync, spawnSync } from 'node:child_process';

/** [command the tests run, Debian package that provides it, what for, optional shell check when `command -v` is not enough] */
const needed = [
  ['prlimit', 'util-linux', 'lowering a child process fd limit (MSG_CTRUNC and EMFILE tests)'],
  ['setsid', 'util-linux', 'starting a successor re-parented away from its predecessor (restart tests)'],
  ['python3', 'python3', 'forging partly sealed memfds the Node API cannot make (protocol tests)'],
  ['ip', 'iproute2', 'network namespaces and tun devices (TCP and Bumblebee tests)'],
  ['curl', 'curl', 'a real HTTP client downloading through Bumblebee, Splicer and Fish'],
  ['nft', 'nftables', 'the conntrack-enabling table Fish installs (a runtime dependency of Fish too)'],
  ['conntrack', 'conntrack', 'inspecting and pre-creating conntrack entries in Fish tests'],
  ['ping', 'iputils-ping', 'ICMP echo through Fish (and the Fish test topology)'],
  ['clang++', 'clang', 'building the libFuzzer target for the packet parser and NAT rewrite (packet fuzz test)'],
  [
    'clang++ -fsanitize=fuzzer',
    'libclang-rt-14-dev',
    'the libFuzzer, ASan and UBSan runtimes it links (packet fuzz test; only recommended by clang)',
    'ls "$(clang++ -print-runtime-dir)"/libclang_rt.fuzzer-*.a',
  ],
];

const has = ([command, , , check]) => spawnSync('sh', ['-c', check ?? `command -v ${command}`], { stdio: 'ignore' }).status === 0;
const missing = needed.filter((entry) => !has(entry));

if (missing.length === 0) process.exit(0);

const packages = [...new Set(missing.map(([, pkg]) => pkg))];
for (const [command, pkg, why] of missing) console.log(`fdferry tests: \`${command}\` is missing (Debian package ${pkg}): ${why}`);

if (process.getuid?.() !== 0) {
  console.error(`fdferry tests: run as root, or install them first: apt-get install -y ${packages.join(' ')}`);
  process.exit(1);
}
console.log(`fdferry tests: installing ${packages.join(' ')} with apt-get`);
const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
try {
  execFileSync('apt-get', ['update', '-qq'], { stdio: 'inherit', env });
  execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...packages], { stdio: 'inherit', env });
} catch {
  console.error(`fdferry tests: apt-get failed; install by hand: apt-get install -y ${packages.join(' ')}`);
  process.exit(1);
}
const still = needed.filter((entry) => !has(entry)).map(([command]) => command);
if (still.length) {
  console.error(`fdferry tests: still missing after install: ${still.join(', ')}`);
  process.exit(1);
}

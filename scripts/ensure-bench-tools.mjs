#!/usr/bin/env node
// The programs the Splicer benchmark compares against or drives: finds them, and as root installs the
// missing ones from Debian's packages with apt-get (saying what it installs). Without root, or when
// apt-get fails, it says which are missing and how to install them; the benchmark then skips what needs
// them.
//
//   node scripts/ensure-bench-tools.mjs [--json] [--no-install] [tool ...]     (default: every tool)
//
// Progress goes to stderr. With --json, stdout is one JSON line:
//   {"found": {"iperf3": "/usr/bin/iperf3", ...}, "installed": ["socat"], "missing": {"haproxy": "why"}}
// The exit code is 0 even when some are missing (the caller decides); 2 for a bad argument.
import { execFileSync, spawnSync } from 'node:child_process';

/** tool -> [Debian package, what the benchmark uses it for] */
const TOOLS = {
  iperf3: ['iperf3', 'the traffic source and sink of the throughput runs'],
  socat: ['socat', 'a relay compared against (TCP-LISTEN,fork -> TCP)'],
  haproxy: ['haproxy', 'a relay compared against (mode tcp with kernel splicing)'],
};

const args = process.argv.slice(2);
const json = args.includes('--json');
const noInstall = args.includes('--no-install');
const wanted = args.filter((arg) => !arg.startsWith('--'));
for (const tool of wanted) {
  if (!Object.hasOwn(TOOLS, tool)) {
    console.error(`ensure-bench-tools: unknown tool "${tool}"; known: ${Object.keys(TOOLS).join(', ')}`);
    process.exit(2);
  }
}
const tools = wanted.length ? wanted : Object.keys(TOOLS);

/** The absolute path of a command, or null. */
function locate(command) {
  const result = spawnSync('sh', ['-c', `command -v ${command}`], { encoding: 'utf8' });
  const path = result.status === 0 ? result.stdout.trim() : '';
  return path.startsWith('/') ? path : null;
}

const log = (line) => process.stderr.write(`ensure-bench-tools: ${line}\n`);
const found = {};
const missing = {};
const installed = [];
for (const tool of tools) {
  const path = locate(tool);
  if (path) found[tool] = path;
}
const absent = tools.filter((tool) => !found[tool]);
if (absent.length) {
  const packages = [...new Set(absent.map((tool) => TOOLS[tool][0]))];
  for (const tool of absent) log(`\`${tool}\` is missing (Debian package ${TOOLS[tool][0]}): ${TOOLS[tool][1]}`);
  let reason = null;
  if (noInstall) {
    reason = `not installed (--no-install); install with: apt-get install -y ${packages.join(' ')}`;
  } else if (process.getuid?.() !== 0) {
    reason = `not installed and not root; install with: apt-get install -y ${packages.join(' ')}`;
  } else {
    log(`installing ${packages.join(' ')} with apt-get (Debian packages, as root)`);
    const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
    try {
      execFileSync('apt-get', ['update', '-qq'], { stdio: ['ignore', 2, 2], env });
      execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...packages], { stdio: ['ignore', 2, 2], env });
    } catch (error) {
      reason = `apt-get install ${packages.join(' ')} failed (${error.message.split('\n')[0]})`;
    }
  }
  for (const tool of absent) {
    const path = locate(tool);
    if (path) {
      found[tool] = path;
      installed.push(TOOLS[tool][0]);
      log(`installed ${TOOLS[tool][0]}: ${path}`);
    } else {
      missing[tool] = reason ?? `still missing after installing ${TOOLS[tool][0]}`;
      log(`${tool} is not available: ${missing[tool]}`);
    }
  }
}
if (json) process.stdout.write(`${JSON.stringify({ found, installed, missing })}\n`);
else for (const tool of tools) console.log(`${tool.padEnd(8)} ${found[tool] ?? `missing: ${missing[tool]}`}`);

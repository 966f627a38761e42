#!/usr/bin/env node
/**
 * `npm run demo`: the whole suite at work, in a throwaway topology of network namespaces.
 *
 *   client edgeC-<pid>          host edgeH-<pid>                          origin edgeO-<pid>
 *   ctun0 100.64.0.2/32  ─tun─  edge proxy, Fish       h-o ══veth══ o-h   HTTP (a 64 MiB file), UDP echo, ping
 *   default dev ctun0           198.51.100.1/24                            198.51.100.2/24, default via the host
 *
 * Splicer and Bumblebee run here (they configure nothing in the namespace they run in), Fish runs in the
 * host namespace, and the example edge proxy (examples/edge-proxy) runs there too, reading the client's
 * tun. Real clients run in the client namespace: curl downloads the file (rate-limited so that it lasts),
 * a UDP request/response exchange, and ping. While the download runs every daemon reloads twice and the
 * proxy restarts once. Then it prints a table and removes everything it made, also on Ctrl-C: it kills
 * only processes it started (and their successors, found by the pids they report), and configures nothing
 * in the machine's own network namespace.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { loadNative } from '../lib/native.js';
import { isRunning } from '../lib/process.js';
import { RpcClient } from '../lib/rpc/client.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const FILE_MIB = Number(process.env.DEMO_FILE_MIB ?? 64);
const LIMIT_RATE = process.env.DEMO_LIMIT_RATE ?? '2000K';
const CLIENT4 = '100.64.0.2';
const HOST4 = '198.51.100.1';
const ORIGIN4 = '198.51.100.2';
const EGRESS4 = '203.0.113.7';
const SLICE = '40000-40999';

if (process.getuid?.() !== 0) {
  console.error('npm run demo: needs root (it makes network namespaces, a tun, and runs Fish); try sudo npm run demo');
  process.exit(1);
}
for (const tool of ['ip', 'curl', 'ping', 'setsid']) {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
  } catch {
    console.error(`npm run demo: needs ${tool} on the PATH`);
    process.exit(1);
  }
}

const names = { client: `edgeC-${process.pid}`, host: `edgeH-${process.pid}`, origin: `edgeO-${process.pid}` };
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fdferry-demo-'));
const namespaces: string[] = [];
/** Every pid this run started or learned of (successors report theirs); only these are ever killed. */
const pids = new Set<number>();
let cleanedUp = false;

const say = (text: string) => process.stdout.write(`${text}\n`);
const run = (command: string, args: string[]) => execFileSync(command, args, { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 20_000 });
const ipIn = (ns: string, ...args: string[]) => run('ip', ['-n', ns, ...args]);
const execIn = (ns: string, ...args: string[]) => run('ip', ['netns', 'exec', ns, ...args]);

/** Removes everything: synchronous, so it also runs from an exit handler. Idempotent. */
function cleanup(): void {
  if (cleanedUp) return;
  cleanedUp = true;
  for (const pid of pids) if (isRunning(pid)) process.kill(pid, 'SIGKILL');
  const deadline = Date.now() + 3_000;
  while ([...pids].some(isRunning) && Date.now() < deadline) execFileSync('sleep', ['0.05']);
  // Deleting the host namespace takes Fish's tun, rules, nftables table and conntrack entries with it.
  for (const ns of namespaces.reverse()) {
    try {
      run('ip', ['netns', 'del', ns]);
    } catch (error) {
      console.error(`demo: could not remove namespace ${ns}: ${(error as Error).message}`);
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
}
process.on('exit', cleanup);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(signal, () => {
    say(`\n${signal}: removing everything the demo made`);
    cleanup();
    process.exit(130);
  });
}

/** Starts a program (in a namespace, through `ip netns exec`, which execs: the pid is the program's). */
function start(command: string, args: string[], ns: string | null, logName: string): ChildProcess {
  const [file, argv] = ns ? ['ip', ['netns', 'exec', ns, command, ...args]] : [command, args];
  const child = spawn(file, argv, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
  pids.add(child.pid!);
  const logFile = fs.createWriteStream(path.join(dir, `${logName}.log`));
  child.stdout!.pipe(logFile, { end: false });
  child.stderr!.pipe(logFile, { end: false });
  return child;
}

const node = (script: string, ...args: string[]) => ['--import', 'tsx', path.join(root, script), ...args];

async function waitFor<T>(what: string, check: () => T | null | false | undefined | Promise<T | null | false | undefined>, ms = 30_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms / 1000} s (logs in ${dir})`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function request(socket: string, method: string, params: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
  const client = new RpcClient({ path: socket, owner: `demo-${process.pid}`, binding: loadNative(), reconnect: false, requestTimeoutMs: 30_000 });
  try {
    await client.connect();
    return (await client.request(method, params)).result;
  } finally {
    client.close();
  }
}

/** A daemon, followed across reloads. */
interface Daemon {
  service: string;
  socket: string;
  /** The live generation's pid. */
  pid: number;
}

/** Starts a daemon and resolves once it answers on its socket. */
async function daemon(service: string, ns: string | null, extra: string[] = []): Promise<Daemon> {
  const socket = path.join(dir, `${service}.sock`);
  const child = start(process.execPath, node('services/cli.ts', service, '--socket', socket, '--log-level', 'info', ...extra), ns, service);
  let exited: number | null = null;
  child.once('exit', (code) => (exited = code ?? -1));
  await waitFor(`${service} to answer`, async () => {
    if (exited !== null) throw new Error(`${service} exited (${exited}) at start-up (logs in ${dir})`);
    return fs.existsSync(socket) && (await request(socket, 'status').then(() => true, () => false));
  });
  return { service, socket, pid: child.pid! };
}

function buildTopology(): void {
  for (const ns of [names.host, names.origin, names.client]) {
    run('ip', ['netns', 'add', ns]);
    namespaces.push(ns);
    ipIn(ns, 'link', 'set', 'lo', 'up');
  }
  execIn(names.host, 'sysctl', '-qw', 'net.ipv4.ip_forward=1', 'net.ipv6.conf.all.forwarding=1', 'net.ipv4.conf.all.rp_filter=1');
  // Made inside the host namespace with its peer straight in the origin's: never in the machine's own.
  ipIn(names.host, 'link', 'add', 'h-o', 'type', 'veth', 'peer', 'name', 'o-h', 'netns', names.origin);
  ipIn(names.host, 'addr', 'add', `${HOST4}/24`, 'dev', 'h-o');
  ipIn(names.host, 'link', 'set', 'h-o', 'up');
  ipIn(names.origin, 'addr', 'add', `${ORIGIN4}/24`, 'dev', 'o-h');
  ipIn(names.origin, 'link', 'set', 'o-h', 'up');
  ipIn(names.origin, 'route', 'add', 'default', 'via', HOST4);
  // No IPv6 link-local address on the tun: its router solicitations would be the client's first "flows".
  execIn(names.client, 'sysctl', '-qw', 'net.ipv6.conf.default.addr_gen_mode=1');
  ipIn(names.client, 'tuntap', 'add', 'dev', 'ctun0', 'mode', 'tun');
  ipIn(names.client, 'addr', 'add', `${CLIENT4}/32`, 'dev', 'ctun0');
  ipIn(names.client, 'link', 'set', 'ctun0', 'up', 'txqueuelen', '10000');
  ipIn(names.client, 'route', 'add', 'default', 'dev', 'ctun0');
}

async function main(): Promise<void> {
  const started = Date.now();
  say(`fdferry demo: namespaces ${names.client} (client), ${names.host} (proxy and Fish), ${names.origin} (origin); files in ${dir}`);
  buildTopology();

  // The origin: a random file of FILE_MIB MiB over HTTP, a UDP echo, and the kernel's ping answers.
  const file = path.join(dir, 'file');
  const hash = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'w');
  for (let written = 0; written < FILE_MIB * 1024 * 1024; written += 1024 * 1024) {
    const chunk = crypto.randomBytes(1024 * 1024);
    hash.update(chunk);
    fs.writeSync(fd, chunk);
  }
  fs.closeSync(fd);
  const originSha = hash.digest('hex');
  const origin = start(process.execPath, node('test/helpers/fish-origin.ts', '--file', file, '--udp-addresses', ORIGIN4), names.origin, 'origin');
  const originLines: Array<Record<string, unknown>> = [];
  readline.createInterface({ input: origin.stdout! }).on('line', (line) => originLines.push(JSON.parse(line) as Record<string, unknown>));
  await waitFor('the origin servers', () => originLines.some((line) => line.event === 'ready'));

  const [splicer, bumblebee, fish] = await Promise.all([
    daemon('splicer', null),
    daemon('bumblebee', null),
    daemon('fish', names.host, ['--port-range', '40000-41999', '--registration-grace', '10000']),
  ]);
  say(`daemons up: splicer pid ${splicer.pid}, bumblebee pid ${bumblebee.pid}, fish pid ${fish.pid} (in ${names.host})`);

  const proxyLines: Array<Record<string, unknown>> = [];
  const proxy = start(
    process.execPath,
    node('examples/edge-proxy/main.ts', '--client-netns', names.client, '--splicer', splicer.socket, '--bumblebee', bumblebee.socket, '--fish', fish.socket, '--egress4', EGRESS4, '--ports', SLICE, '--owner', `demo-${process.pid}`),
    names.host,
    'edge-proxy',
  );
  // Every generation of the proxy writes here (successors inherit the pipe); their pids are tracked for clean-up.
  readline.createInterface({ input: proxy.stdout! }).on('line', (text) => {
    try {
      const line = JSON.parse(text) as Record<string, unknown>;
      if (typeof line.pid === 'number') pids.add(line.pid);
      proxyLines.push(line);
    } catch {
      // not a log line
    }
  });
  let proxyPid = proxy.pid!;
  await waitFor('the edge proxy', () => proxyLines.some((line) => line.msg === 'edge proxy running'));
  say(`edge proxy up: pid ${proxyPid}, reading ctun0 in ${names.client}`);

  // The download, rate-limited so that it outlasts the reloads.
  say(`curl: downloading ${FILE_MIB} MiB from http://${ORIGIN4}/file at ${LIMIT_RATE}/s`);
  const curl = start('curl', ['-sS', '--fail', '--limit-rate', LIMIT_RATE, '--max-time', '300', '-o', '-', `http://${ORIGIN4}/file`], names.client, 'curl');
  const curlHash = crypto.createHash('sha256');
  let curlBytes = 0;
  // The body is hashed here, not logged: unpiped from the log (which pauses the stream) and resumed.
  curl.stdout!.unpipe();
  curl.stdout!.on('data', (chunk: Buffer) => {
    curlHash.update(chunk);
    curlBytes += chunk.length;
  });
  curl.stdout!.resume();
  let curlDone = false;
  const curlExit = new Promise<number | null>((resolve) => curl.once('close', (code) => ((curlDone = true), resolve(code))));
  await waitFor('the download to start', () => curlBytes > 0);

  const reloads: Record<string, number> = { splicer: 0, bumblebee: 0, fish: 0 };
  let proxyRestarts = 0;
  for (let round = 0; round < 2; round++) {
    for (const target of [splicer, bumblebee, fish]) {
      const report = await request(target.socket, 'reload', { wait: true });
      if (!report.ok) throw new Error(`${target.service} reload failed: ${JSON.stringify(report.failure)}`);
      // The successor is tracked (and killed at clean-up) from here.
      pids.add(Number(report.newPid));
      target.pid = Number(report.newPid);
      reloads[target.service]!++;
      say(`  reloaded ${target.service}: pid ${String(report.oldPid)} -> ${String(report.newPid)}, relays paused ${String(report.pauseMs)} ms (${curlBytes >> 20} MiB downloaded)`);
    }
    if (round === 0) {
      const old = proxyPid;
      process.kill(old, 'SIGHUP');
      const took = await waitFor('the proxy successor', () => proxyLines.find((line) => typeof line.msg === 'string' && line.msg.startsWith('edge proxy took over') && line.pid !== old));
      proxyPid = took.pid as number;
      await waitFor('the old proxy to exit', () => !isRunning(old));
      proxyRestarts++;
      say(`  restarted the edge proxy: pid ${old} -> ${proxyPid}, flows handed over: ${String((took.report as Record<string, unknown>).tasks)} (${curlBytes >> 20} MiB downloaded)`);
    }
  }
  const reloadsDuringTransfer = !curlDone;

  const udp = JSON.parse(execIn(names.client, process.execPath, ...node('test/helpers/udp-client.ts', '--target', `${ORIGIN4}:9000`, '--count', '5', '--bytes', '64'))) as {
    sent: number;
    matched: number;
  };
  const pingOutput = (() => {
    try {
      return execIn(names.client, 'ping', '-c', '3', '-i', '0.2', '-W', '2', ORIGIN4);
    } catch (error) {
      return String((error as { stdout?: string }).stdout ?? '');
    }
  })();
  const pinged = /(\d+) packets transmitted, (\d+) received/.exec(pingOutput);

  say('waiting for the download to finish...');
  const curlCode = await curlExit;
  const curlSha = curlHash.digest('hex');
  // Read only now: the UDP client ran synchronously, so the origin's lines about it arrived after it.
  const udpSource = originLines.find((line) => line.event === 'udp');
  await waitFor('the audit line', () => proxyLines.some((line) => line.msg === 'audit'), 15_000);
  const audit = proxyLines.find((line) => line.msg === 'audit')!.audit as Record<string, any>;

  // A clean stop: the proxy unregisters from Fish; the daemons stop; nothing is left in the host namespace.
  process.kill(proxyPid, 'SIGTERM');
  await waitFor('the proxy to stop', () => !isRunning(proxyPid));
  for (const target of [fish, bumblebee, splicer]) {
    process.kill(target.pid, 'SIGTERM');
    await waitFor(`${target.service} to stop`, () => !isRunning(target.pid));
  }
  const fishLeft = run('ip', ['netns', 'exec', names.host, 'ip', 'rule', 'show']).includes('lookup 4242');

  const resets = audit.reason === 'complete' && curlCode === 0 ? 0 : 1;
  const rows: string[][] = [
    ['what', 'bytes', 'checksum', 'result'],
    [`curl http://${ORIGIN4}/file (${FILE_MIB} MiB)`, String(curlBytes), curlSha === originSha ? 'match' : 'MISMATCH', curlCode === 0 ? 'exit 0' : `exit ${curlCode}`],
    ['UDP request/response x5', String(udp.sent * 64), udp.matched === udp.sent ? 'match' : 'MISMATCH', `${udp.matched}/${udp.sent} answered, from ${EGRESS4}:${String(udpSource?.remotePort ?? '?')}`],
    ['ping x3', '-', '-', `${pinged?.[2] ?? 0}/${pinged?.[1] ?? 3} answered`],
    ['audit line of the download', `${audit.bytesUp} up, ${audit.bytesDown} down`, '-', `${audit.reason}, ${Math.round(audit.durationMs / 100) / 10} s, rtt ${audit.rttMs.client} ms, retransmits ${audit.retransmits.client}+${audit.retransmits.upstream}`],
    ['reloads during the transfer', '-', '-', `splicer ${reloads.splicer}, bumblebee ${reloads.bumblebee}, fish ${reloads.fish}, edge proxy ${proxyRestarts}${reloadsDuringTransfer ? '' : ' (the download ended first!)'}`],
    ['connections reset', '-', '-', String(resets)],
  ];
  const widths = rows[0]!.map((_, column) => Math.max(...rows.map((row) => row[column]!.length)));
  say('');
  for (const [index, row] of rows.entries()) {
    say(row.map((cell, column) => cell.padEnd(widths[column]!)).join('  ').trimEnd());
    if (index === 0) say(widths.map((width) => '-'.repeat(width)).join('  '));
  }
  cleanup();
  say(`\nremoved: ${namespaces.length} namespaces, ${pids.size} processes (${fishLeft ? 'Fish rules were left and went with the namespace' : 'Fish had removed its rules itself'}), ${dir}; ${Math.round((Date.now() - started) / 1000)} s in all`);
  const ok = curlCode === 0 && curlSha === originSha && udp.matched === udp.sent && pinged?.[1] === pinged?.[2] && resets === 0 && reloadsDuringTransfer;
  process.exit(ok ? 0 : 1);
}

main().catch((error: unknown) => {
  console.error(`demo failed: ${(error as Error).message}`);
  for (const log of ['edge-proxy', 'fish', 'bumblebee', 'splicer']) {
    const file = path.join(dir, `${log}.log`);
    if (fs.existsSync(file)) console.error(`--- ${log} (last lines)\n${fs.readFileSync(file, 'utf8').split('\n').slice(-8).join('\n')}`);
  }
  cleanup();
  process.exit(1);
});

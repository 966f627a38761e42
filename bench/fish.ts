/**
 * Fish benchmark (issue #6): UDP packets per second through Fish's egress pump, both ways, against the
 * kernel's own forwarding with an nftables SNAT rule to the same egress slice, on the same topology.
 *
 *   npm run bench -- fish [--json] [--runs N] [--pin none|same|split]
 *
 * Environment (run.ts takes no benchmark-specific flags):
 *   FDFERRY_BENCH_QUICK=1        1 s windows, short warm-up: a smoke test
 *   FDFERRY_BENCH_SECONDS=N      length of each timed window in seconds (default 3; quick 1)
 *   FDFERRY_BENCH_FLOWS=N        client flows (default 256, at most 1,000: the slice is 40000-40999)
 *   FDFERRY_BENCH_SYSTEMS=a,b    of fish, kernel (default both)
 *   FDFERRY_BENCH_UNIX_QLEN=N    net.unix.max_dgram_qlen where the registration socket is made (default 512,
 *                                systemd's setting; the kernel's own default is 10)
 *   FDFERRY_BENCH_FISH0_TXQLEN=N an experiment: set fish0's queue to N packets once Fish made it (default: leave
 *                                Fish's, --tx-queue-length 10,000)
 *
 * Topology: bench/lib/fish-netns.ts (notes/fish-kernel.md §10 without a client namespace), fresh for every
 * run of every system. Systems alternate from run to run (A B, B A, ...):
 *
 * - fish: `fdferry fish --port-range 40000-40999` runs in the host namespace (`ip netns exec`, so its pid is
 *   node's); this process registers one SOCK_SEQPACKET socket with FishClient (rid 1, egress 203.0.113.7,
 *   slice 40000-40999, udp) and hands the other end to the generator and the drain. The pair is made in a
 *   "proxy" namespace whose net.unix.max_dgram_qlen is FDFERRY_BENCH_UNIX_QLEN (a unix socket queues at most
 *   that many messages, whatever its buffer size).
 * - kernel: the host gets a tun `ctun0` (100.64.0.0/24 routed to it) and `snat to 203.0.113.7:40000-40999`
 *   in an nftables nat chain; the generator writes the client's packets into ctun0, the drain reads the
 *   replies from it. Conntrack is on in both (Fish's `fishct` table; the nat chain).
 *
 * The generator (bench/lib/fish-blast.ts) is the same Node process for both: one `write(2)` per packet,
 * round-robin over the flows' prebuilt 64-byte-payload UDP packets (100.64.0.2:20000+i -> 198.51.100.2:9000),
 * blocking when the receiver is full. Its own ceiling is measured once per run, into a seqpacket pair whose other
 * end only a drain reads.
 *
 * Per run: one packet per flow (mappings / conntrack entries appear), then
 * 1. egress: the generator blasts; packets/s = the origin's nft sink counter (`udp dport 9000 counter drop`)
 *    over the window;
 * 2. return: the generator writes replies 198.51.100.2:9000 -> 203.0.113.7:<each flow's egress port> into a
 *    tun in the origin (as if the origin's sockets sent them); packets/s = for Fish its `packetsIn` (replies
 *    sent into the registration socket), for the kernel ctun0's tx_packets (replies read from the tun).
 * Windows start after a warm-up inside the blast. CPU over each window from /proc: Fish's utime+stime, the
 * generator's, the drain's, every ksoftirqd thread's, and the machine's busy time (/proc/stat).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import readline from 'node:readline';
import { FishClient } from '../lib/client/fish.js';
import { loadNative, type NativeBinding } from '../lib/native.js';
import { RpcClient } from '../lib/rpc/client.js';
import { udpPacket } from '../test/helpers/packets.js';
import { alternate, orderForRun } from './lib/alternate.js';
import { formatNumber, textTable, type BenchOptions } from './lib/bench.js';
import { newCleanups, type Cleanups } from './lib/bumblebee-netns.js';
import { FISH_BENCH, execIn, fishBenchTopology, interfaceCounters, kernelMappedPorts, originSinkPackets, proxyNamespace, type FishBenchTopology } from './lib/fish-netns.js';
import { waitForQuiet } from './lib/handoff-stalls.js';
import { TSX_EXEC_ARGV, projectRoot, type Placement } from './lib/process.js';
import { kernelRelease, machineBusySeconds, processCpu, sleep, waitForFile } from './lib/splicer-tools.js';
import { median, ratio, round } from './lib/stats.js';

/** One line for `npm run bench`'s list. */
export const description = 'Fish vs kernel nftables SNAT: UDP packets/s egress and return (64-byte payload, 256 flows), CPU µs per packet, generator ceiling';
/** Runs per system when `--runs` is not given: medians of five. */
export const defaultRuns = 5;

const SYSTEMS = ['fish', 'kernel'] as const;
type System = (typeof SYSTEMS)[number];

/** Goals of issue #6 (notes/fish-kernel.md §12: a minimal C implementation did 143–169k egress, 99–114k return). */
const GOAL_EGRESS_PPS = 150_000;
const GOAL_RETURN_PPS = 100_000;
const PAYLOAD_BYTES = 64;
/** Before each run, wait up to this long for other processes to use less than QUIET_PERCENT of one CPU. */
const QUIET_WAIT_MS = 1_500;
const QUIET_PERCENT = 25;
/** A run during which other processes used more than this (percent of one CPU) in a window is measured again: */
const DISTURBED_PERCENT = 50;
/** at most MAX_REPEATS times in all, and only within RETRY_BUDGET_S of the start (quick: never). */
const MAX_REPEATS = 2;
const RETRY_BUDGET_S = 60;

// ---------------------------------------------------------------------------------------------------
// Settings

interface Settings {
  quick: boolean;
  seconds: number;
  flows: number;
  systems: System[];
  /** Blasting before a window opens: queues fill, the pump and the softirqs reach their steady state. */
  warmMs: number;
  /** Blasting after it closes, so the last snapshot is taken under load too. */
  tailMs: number;
  childCpu: string | null;
  /** net.unix.max_dgram_qlen of the namespace the registration's socket pair is made in. */
  unixQlen: number;
  quietWaitMs: number;
  maxRepeats: number;
  /** Length of each generator-ceiling measurement. */
  ceilingMs: number;
  /** fish0's txqueuelen to set after Fish made it, or null to leave Fish's. */
  fish0TxQueueLen: number | null;
}

function positiveInteger(name: string, text: string): number {
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 1) throw new Error(`${name} must be a positive integer, got "${text}"`);
  return value;
}

function readSettings(env: NodeJS.ProcessEnv, placement: Placement): Settings {
  const quick = env.FDFERRY_BENCH_QUICK === '1' || env.FDFERRY_BENCH_QUICK === 'true';
  let systems: System[] = [...SYSTEMS];
  if (env.FDFERRY_BENCH_SYSTEMS) {
    const wanted = env.FDFERRY_BENCH_SYSTEMS.split(',').map((name) => name.trim()).filter(Boolean);
    for (const name of wanted) if (!(SYSTEMS as readonly string[]).includes(name)) throw new Error(`FDFERRY_BENCH_SYSTEMS: unknown system "${name}" (known: ${SYSTEMS.join(', ')})`);
    systems = SYSTEMS.filter((name) => wanted.includes(name));
  }
  const flows = env.FDFERRY_BENCH_FLOWS ? positiveInteger('FDFERRY_BENCH_FLOWS', env.FDFERRY_BENCH_FLOWS) : 256;
  // One egress port per flow and destination: more flows than the slice has ports would be refused.
  if (flows > 1000) throw new Error('FDFERRY_BENCH_FLOWS must be at most 1,000 (the slice 40000-40999)');
  const seconds = env.FDFERRY_BENCH_SECONDS ? positiveInteger('FDFERRY_BENCH_SECONDS', env.FDFERRY_BENCH_SECONDS) : quick ? 1 : 3;
  if (seconds > 30) throw new Error('FDFERRY_BENCH_SECONDS must be at most 30 (the benchmark must stay bounded)');
  return {
    quick,
    seconds,
    flows,
    systems,
    warmMs: quick ? 300 : 500,
    tailMs: 200,
    childCpu: placement === 'same' ? '0' : placement === 'split' ? '1' : null,
    unixQlen: env.FDFERRY_BENCH_UNIX_QLEN ? positiveInteger('FDFERRY_BENCH_UNIX_QLEN', env.FDFERRY_BENCH_UNIX_QLEN) : 512,
    quietWaitMs: quick ? 0 : QUIET_WAIT_MS,
    maxRepeats: quick ? 0 : MAX_REPEATS,
    ceilingMs: quick ? 1000 : 2000,
    fish0TxQueueLen: env.FDFERRY_BENCH_FISH0_TXQLEN ? positiveInteger('FDFERRY_BENCH_FISH0_TXQLEN', env.FDFERRY_BENCH_FISH0_TXQLEN) : null,
  };
}

// ---------------------------------------------------------------------------------------------------
// Processes

/** A child process of ours, killed by its pid at cleanup, answering one JSON line per request. */
interface Child {
  child: ChildProcess;
  pid: number;
  stderr(): string;
  next(ms: number): Promise<string>;
}

/**
 * Starts `command` with `fds` as its fds 3, 4, ...; SIGTERM by pid at cleanup (SIGKILL 2 s later, or at
 * once when the benchmark is exiting).
 */
function startChild(cleanups: Cleanups, what: string, command: string[], fds: number[] = []): Child {
  const child = spawn(command[0]!, command.slice(1), { cwd: projectRoot, stdio: ['pipe', 'pipe', 'pipe', ...fds] });
  if (child.pid === undefined) throw new Error(`could not start ${what}`);
  const pid = child.pid;
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-16_384);
  });
  child.stdin!.on('error', () => {});
  const running = () => child.exitCode === null && child.signalCode === null;
  const signal = (name: NodeJS.Signals) => {
    try {
      process.kill(pid, name);
    } catch {
      // already gone
    }
  };
  cleanups.add(
    `${what} pid ${pid}`,
    async () => {
      if (!running()) return;
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      signal('SIGTERM');
      const timer = setTimeout(() => signal('SIGKILL'), 2_000);
      await exited;
      clearTimeout(timer);
    },
    () => {
      if (running()) signal('SIGKILL');
    },
  );
  const queue: string[] = [];
  const waiters: Array<(line: string | null) => void> = [];
  let closed = false;
  const lines = readline.createInterface({ input: child.stdout! });
  lines.on('line', (line) => {
    const waiter = waiters.shift();
    if (waiter) waiter(line);
    else queue.push(line);
  });
  lines.on('close', () => {
    closed = true;
    for (const waiter of waiters.splice(0)) waiter(null);
  });
  const next = (ms: number) => {
    const line = queue.shift();
    if (line !== undefined) return Promise.resolve(line);
    if (closed) return Promise.reject(new Error(`${what} (pid ${pid}) ended its output: ${stderr.slice(-2000)}`));
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        const index = waiters.indexOf(waiter);
        if (index >= 0) waiters.splice(index, 1);
        reject(new Error(`${what} (pid ${pid}): no answer within ${ms} ms: ${stderr.slice(-2000)}`));
      }, ms);
      const waiter = (text: string | null) => {
        clearTimeout(timer);
        if (text === null) reject(new Error(`${what} (pid ${pid}) ended its output: ${stderr.slice(-2000)}`));
        else resolve(text);
      };
      waiters.push(waiter);
    });
  };
  return { child, pid, stderr: () => stderr, next };
}

/** `node --import tsx bench/lib/fish-blast.ts <mode>`, pinned like the benchmark's other children. */
function startBlast(cleanups: Cleanups, settings: Settings, mode: 'write' | 'drain', fds: number[]): Child {
  const command = [process.execPath, ...TSX_EXEC_ARGV, path.join(projectRoot, 'bench', 'lib', 'fish-blast.ts'), mode];
  return startChild(cleanups, `fish-blast ${mode}`, settings.childCpu === null ? command : ['taskset', '-c', settings.childCpu, ...command], fds);
}

interface BlastAnswer {
  sent: number;
  errors: number;
  elapsedMs: number;
  firstError: string | null;
}

/**
 * A SOCK_SEQPACKET pair made in namespace `namespace` (by a helper process there, which sends both ends back
 * with SCM_RIGHTS): its sockets take that namespace's net.unix.max_dgram_qlen. Closed at cleanup.
 */
async function pairInNamespace(cleanups: Cleanups, binding: NativeBinding, namespace: string): Promise<[number, number]> {
  const [ours, theirs] = binding.seqpacketPair();
  let transfer: ReturnType<NativeBinding['openSeqpacket']> | null = null;
  const received = new Promise<number[]>((resolve, reject) => {
    transfer = binding.openSeqpacket(ours, {
      message: (_data, fds, fault) => (fault ? reject(new Error('the socket pair arrived truncated')) : resolve(fds)),
      drain: () => {},
      close: (error) => reject(error ?? new Error('the pair helper hung up before sending')),
    });
  });
  cleanups.add('pair transfer socket', () => transfer?.close());
  const command = ['ip', 'netns', 'exec', namespace, process.execPath, ...TSX_EXEC_ARGV, path.join(projectRoot, 'bench', 'lib', 'fish-blast.ts'), 'pair'];
  startChild(cleanups, 'pair helper', command, [theirs]).child.stdout!.resume();
  binding.closeAll([theirs]);
  let timer: NodeJS.Timeout | undefined;
  const fds = await Promise.race([
    received,
    new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error('no socket pair from the helper within 30 s')), 30_000))),
  ]).finally(() => clearTimeout(timer));
  // Closing our end lets the helper exit.
  transfer!.close();
  if (fds.length !== 2) {
    binding.closeAll(fds);
    throw new Error(`the pair helper sent ${fds.length} fds`);
  }
  return [fds[0]!, fds[1]!];
}

async function blast(generator: Child, request: { fd: number; packets: Buffer[]; ms?: number; rounds?: number }): Promise<BlastAnswer> {
  generator.child.stdin!.write(`${JSON.stringify({ ...request, packets: request.packets.map((packet) => packet.toString('base64')) })}\n`);
  const answer = JSON.parse(await generator.next((request.ms ?? 0) + 15_000)) as BlastAnswer & { error?: string };
  if (answer.error) throw new Error(`generator: ${answer.error}`);
  return answer;
}

// ---------------------------------------------------------------------------------------------------
// Packets

const payload = Buffer.alloc(PAYLOAD_BYTES, 0x5a);

/** The clients' packets: flow i is 100.64.0.2:(20000+i) -> 198.51.100.2:9000. */
function egressPackets(flows: number): Buffer[] {
  return Array.from({ length: flows }, (_, i) =>
    udpPacket({ src: FISH_BENCH.client, dst: FISH_BENCH.origin, sport: FISH_BENCH.clientPortBase + i, dport: FISH_BENCH.originPort, payload }),
  );
}

/** The origin's replies to every flow's egress tuple 203.0.113.7:<port>. */
function returnPackets(egressPorts: number[]): Buffer[] {
  return egressPorts.map((port) => udpPacket({ src: FISH_BENCH.origin, dst: FISH_BENCH.egress, sport: FISH_BENCH.originPort, dport: port, payload }));
}

// ---------------------------------------------------------------------------------------------------
// CPU

/** The kernel's softirq threads, whose CPU is the forwarding work deferred out of the syscalls. */
function ksoftirqdPids(): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (fs.readFileSync(`/proc/${entry}/comm`, 'utf8').startsWith('ksoftirqd/')) pids.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

const cpuSeconds = (pid: number) => {
  const time = processCpu(pid);
  return time.user + time.system;
};

/** Roles whose CPU is measured: Fish (fish only), the generator, the drain, ksoftirqd, the whole machine. */
type Role = 'fish' | 'generator' | 'drain' | 'ksoftirqd' | 'machine';
const ROLES: Role[] = ['fish', 'generator', 'drain', 'ksoftirqd', 'machine'];

interface Snapshot {
  t: number;
  count: number;
  cpu: Record<Role, number>;
}

async function snapshot(count: () => Promise<number>, pids: Partial<Record<Role, number>>, softirqPids: number[]): Promise<Snapshot> {
  // The counter read may exec a program (nft, cat in a namespace): its time is the middle of that call.
  const before = performance.now();
  const value = await count();
  const t = (before + performance.now()) / 2;
  const cpu = {} as Record<Role, number>;
  for (const role of ROLES) {
    if (role === 'machine') cpu.machine = machineBusySeconds();
    else if (role === 'ksoftirqd') cpu.ksoftirqd = softirqPids.reduce((total, pid) => total + cpuSeconds(pid), 0);
    else cpu[role] = pids[role] === undefined ? Number.NaN : cpuSeconds(pids[role]!);
  }
  return { t, count: value, cpu };
}

/** What one timed window measured. */
interface Window {
  pps: number;
  /** Packets per second the generator wrote over its whole blast (warm-up included). */
  offeredPps: number;
  /** CPU of each role in percent of one CPU over the window; `others` is the machine's busy time minus theirs. */
  cpuPercent: Record<Role | 'others', number>;
  /**
   * CPU µs per counted packet: Fish's own; ours (Fish + generator + drain + ksoftirqd: the whole path, since
   * the kernel forwards inside the syscalls that inject packets); the whole machine's (other jobs included).
   */
  fishUsPerPacket: number;
  oursUsPerPacket: number;
  machineUsPerPacket: number;
  generatorErrors: number;
}

/** Blasts `packets` at `fd` for warm-up + window + tail, and measures `count` and the CPU over the window. */
async function timedWindow(
  settings: Settings,
  generator: Child,
  fd: number,
  packets: Buffer[],
  count: () => Promise<number>,
  pids: Partial<Record<Role, number>>,
  softirqPids: number[],
): Promise<Window> {
  const windowMs = settings.seconds * 1000;
  const answer = blast(generator, { fd, packets, ms: settings.warmMs + windowMs + settings.tailMs });
  await sleep(settings.warmMs);
  const first = await snapshot(count, pids, softirqPids);
  await sleep(windowMs);
  const last = await snapshot(count, pids, softirqPids);
  const sent = await answer;
  const wall = (last.t - first.t) / 1000;
  const packetsCounted = last.count - first.count;
  const cpuPercent = {} as Record<Role | 'others', number>;
  for (const role of ROLES) cpuPercent[role] = ((last.cpu[role] - first.cpu[role]) / wall) * 100;
  // Everything else: other jobs on the machine, and this process. Approximate: softirq work is charged to
  // whichever task it interrupted, so part of the forwarding can land here.
  cpuPercent.others = cpuPercent.machine - (['fish', 'generator', 'drain', 'ksoftirqd'] as const).reduce((total, role) => total + (Number.isFinite(cpuPercent[role]) ? cpuPercent[role] : 0), 0);
  return {
    pps: packetsCounted / wall,
    offeredPps: (sent.sent / sent.elapsedMs) * 1000,
    cpuPercent,
    fishUsPerPacket: packetsCounted > 0 ? ((last.cpu.fish - first.cpu.fish) * 1e6) / packetsCounted : Number.NaN,
    oursUsPerPacket: packetsCounted > 0 ? ((cpuPercent.machine - cpuPercent.others) / 100) * wall * 1e6 / packetsCounted : Number.NaN,
    machineUsPerPacket: packetsCounted > 0 ? ((last.cpu.machine - first.cpu.machine) * 1e6) / packetsCounted : Number.NaN,
    generatorErrors: sent.errors,
  };
}

// ---------------------------------------------------------------------------------------------------
// One run of one system

interface RunResult {
  egress: Window;
  return: Window;
  /** Drops and other counters worth reading when a figure looks wrong. */
  counters: Record<string, unknown>;
}

async function waitFor(what: string, check: () => Promise<boolean> | boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await sleep(50);
  }
}

async function connectWhenReady<T extends { connect(): Promise<unknown>; close(): void }>(make: () => T, child: ChildProcess, ms = 20_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const client = make();
    try {
      await client.connect();
      return client;
    } catch (error) {
      client.close();
      if (Date.now() > deadline || child.exitCode !== null) throw error;
    }
    await sleep(30);
  }
}

async function runFish(settings: Settings, binding: NativeBinding, cleanups: Cleanups, topology: FishBenchTopology, softirqPids: number[]): Promise<RunResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fdf-fishbench-'));
  cleanups.add(`directory ${dir}`, () => fs.rmSync(dir, { recursive: true, force: true }));
  const socket = path.join(dir, 'fish.sock');
  const fishArgs = ['fish', '--socket', socket, '--log-level', 'warn', '--port-range', `${FISH_BENCH.ports[0]}-${FISH_BENCH.ports[1]}`, '--egress-allow', '203.0.113.0/24'];
  // `ip netns exec` and taskset exec: the pid is the daemon's own.
  const command = ['ip', 'netns', 'exec', topology.host, process.execPath, ...TSX_EXEC_ARGV, path.join(projectRoot, 'services', 'cli.ts'), ...fishArgs];
  const daemon = startChild(cleanups, 'Fish daemon', settings.childCpu === null ? command : ['taskset', '-c', settings.childCpu, ...command]);
  daemon.child.stdout!.resume();
  await waitForFile(socket, daemon.child, 30_000);
  const owner = `bench-fish-${process.pid}`;
  const client = await connectWhenReady(() => new FishClient({ owner, path: socket, binding, reconnect: false }), daemon.child);
  cleanups.add('Fish client', () => client.close());
  const control = await connectWhenReady(() => new RpcClient({ path: socket, owner: `${owner}-ctl`, binding, reconnect: false }), daemon.child);
  cleanups.add('Fish control client', () => control.close());

  const [ours, theirs] = await pairInNamespace(cleanups, binding, proxyNamespace(cleanups, settings.unixQlen));
  cleanups.add('registration socket', () => binding.closeAll([ours]));
  try {
    await client.register(theirs, { id: 1, egress4: FISH_BENCH.egress, ports: FISH_BENCH.ports, protocols: ['udp'] });
  } catch (error) {
    // A refusal hands the socket back: ours to close.
    binding.closeAll((error as { fds?: number[] }).fds ?? []);
    throw error;
  }
  // fish0 exists once Fish has started; a deeper queue lets replies wait for a descheduled pump.
  if (settings.fish0TxQueueLen !== null) execIn(topology.host, 'ip', 'link', 'set', 'fish0', 'txqueuelen', String(settings.fish0TxQueueLen));
  const generator = startBlast(cleanups, settings, 'write', [ours, topology.originTunFd]);
  const drain = startBlast(cleanups, settings, 'drain', [ours]);
  await Promise.all([generator.next(30_000), drain.next(30_000)]);
  const registration = async () => {
    const rows = await client.registrations();
    const row = rows.find((r) => r.id === 1);
    if (!row) throw new Error('registration 1 is gone');
    return row as { packetsIn: number; packetsOut: number; drops: Record<string, number>; mappings: number };
  };

  const packets = egressPackets(settings.flows);
  await blast(generator, { fd: 3, packets, rounds: 1 });
  await waitFor(`${settings.flows} mappings in Fish`, async () => (await registration()).mappings >= settings.flows);
  const pids = { fish: daemon.pid, generator: generator.pid, drain: drain.pid };
  const egress = await timedWindow(settings, generator, 3, packets, () => Promise.resolve(originSinkPackets(topology)), pids, softirqPids);

  const mappings = await client.mappings(1);
  const ports = new Map(mappings.map((m) => [m.clientPort as number, m.egressPort as number]));
  const egressPorts = packets.map((_, i) => ports.get(FISH_BENCH.clientPortBase + i));
  if (egressPorts.some((port) => port === undefined)) throw new Error(`Fish mapped ${ports.size} of ${settings.flows} flows`);
  const ret = await timedWindow(settings, generator, 4, returnPackets(egressPorts as number[]), async () => (await registration()).packetsIn, pids, softirqPids);

  const row = await registration();
  const status = (await control.request('status')).result as { returnDrops: Record<string, number>; packetsFromTun: number; packetsToTun: number };
  const fish0 = interfaceCounters(topology.host).get('fish0');
  return {
    egress,
    return: ret,
    counters: {
      registrationDrops: row.drops,
      returnDrops: status.returnDrops,
      packetsOut: row.packetsOut,
      packetsIn: row.packetsIn,
      // Replies the kernel could not queue on fish0 because Fish did not read them fast enough.
      fish0TxDropped: fish0?.txDropped ?? Number.NaN,
      daemonStderr: daemon.stderr().slice(-500),
    },
  };
}

async function runKernel(settings: Settings, cleanups: Cleanups, topology: FishBenchTopology, softirqPids: number[]): Promise<RunResult> {
  const tun = topology.clientTunFd!;
  const generator = startBlast(cleanups, settings, 'write', [tun, topology.originTunFd]);
  const drain = startBlast(cleanups, settings, 'drain', [tun]);
  await Promise.all([generator.next(30_000), drain.next(30_000)]);
  const packets = egressPackets(settings.flows);
  await blast(generator, { fd: 3, packets, rounds: 1 });
  await waitFor(`${settings.flows} SNAT entries in conntrack`, () => kernelMappedPorts(topology).size >= settings.flows);
  const pids = { generator: generator.pid, drain: drain.pid };
  const egress = await timedWindow(settings, generator, 3, packets, () => Promise.resolve(originSinkPackets(topology)), pids, softirqPids);

  const ports = kernelMappedPorts(topology);
  const egressPorts = packets.map((_, i) => ports.get(FISH_BENCH.clientPortBase + i));
  if (egressPorts.some((port) => port === undefined)) throw new Error(`conntrack holds ${ports.size} of ${settings.flows} flows`);
  const ctun0 = () => Promise.resolve(interfaceCounters(topology.host).get('ctun0')?.txPackets ?? Number.NaN);
  const ret = await timedWindow(settings, generator, 4, returnPackets(egressPorts as number[]), ctun0, pids, softirqPids);
  const counters = interfaceCounters(topology.host).get('ctun0');
  return { egress, return: ret, counters: { ctun0TxDropped: counters?.txDropped ?? Number.NaN } };
}

async function runOnce(settings: Settings, binding: NativeBinding, system: System, softirqPids: number[], progress: (line: string) => void): Promise<RunResult> {
  const cleanups = newCleanups();
  try {
    const topology = fishBenchTopology(cleanups, binding, system);
    return system === 'fish' ? await runFish(settings, binding, cleanups, topology, softirqPids) : await runKernel(settings, cleanups, topology, softirqPids);
  } finally {
    await cleanups.run(progress);
  }
}

/**
 * The generator alone, writing into a seqpacket pair (made like a registration's) whose other end only a
 * drain reads; packets/s by its own count (a blocking socket: written = read, give or take the queue).
 */
async function generatorCeiling(settings: Settings, binding: NativeBinding, progress: (line: string) => void): Promise<number> {
  const cleanups = newCleanups();
  try {
    const [a, b] = await pairInNamespace(cleanups, binding, proxyNamespace(cleanups, settings.unixQlen));
    cleanups.add('ceiling pair', () => binding.closeAll([a, b]));
    const generator = startBlast(cleanups, settings, 'write', [a]);
    const drain = startBlast(cleanups, settings, 'drain', [b]);
    await Promise.all([generator.next(30_000), drain.next(30_000)]);
    const answer = await blast(generator, { fd: 3, packets: egressPackets(settings.flows), ms: settings.ceilingMs });
    return (answer.sent / answer.elapsedMs) * 1000;
  } finally {
    await cleanups.run(progress);
  }
}

// ---------------------------------------------------------------------------------------------------
// The benchmark

const medianOf = (values: number[]) => round(median(values.filter(Number.isFinite)));

function summarise(windows: Window[]) {
  return {
    pps: medianOf(windows.map((w) => w.pps)),
    minPps: round(Math.min(...windows.map((w) => w.pps))),
    maxPps: round(Math.max(...windows.map((w) => w.pps))),
    offeredPps: medianOf(windows.map((w) => w.offeredPps)),
    fishUsPerPacket: medianOf(windows.map((w) => w.fishUsPerPacket)),
    oursUsPerPacket: medianOf(windows.map((w) => w.oursUsPerPacket)),
    machineUsPerPacket: medianOf(windows.map((w) => w.machineUsPerPacket)),
    cpuPercent: Object.fromEntries([...ROLES, 'others' as const].map((role) => [role, medianOf(windows.map((w) => w.cpuPercent[role]))])) as Record<Role | 'others', number>,
    generatorErrors: windows.reduce((total, w) => total + w.generatorErrors, 0),
  };
}

/**
 * Drops over all runs of a system, by where they happened: the pump's per-registration reasons (`full`: a
 * reply the registration socket refused; `tunFull`...), the pump's return drops, and the tun queues
 * (fish0 / ctun0 tx_dropped: replies the kernel could not queue because the reader lagged).
 */
function sumDrops(rows: RunResult[]): Record<string, number> {
  const totals: Record<string, number> = {};
  const add = (key: string, value: unknown) => {
    if (typeof value === 'number' && Number.isFinite(value)) totals[key] = (totals[key] ?? 0) + value;
  };
  for (const row of rows) {
    const c = row.counters;
    for (const [reason, count] of Object.entries((c.registrationDrops as Record<string, number> | undefined) ?? {})) add(`pump.${reason}`, count);
    for (const [reason, count] of Object.entries((c.returnDrops as Record<string, number> | undefined) ?? {})) add(`pumpReturn.${reason}`, count);
    add('fish0TxDropped', c.fish0TxDropped);
    add('ctun0TxDropped', c.ctun0TxDropped);
  }
  return totals;
}

/** Runs the benchmark (see the top of this file) and resolves with every figure, for the last stdout line. */
export async function run(options: BenchOptions): Promise<Record<string, unknown>> {
  if (process.getuid?.() !== 0) throw new Error('the Fish benchmark needs root: network namespaces, tuns, nftables, conntrack');
  const settings = readSettings(process.env, options.placement);
  const binding = loadNative();
  const softirqPids = ksoftirqdPids();
  const started = performance.now();
  options.progress(`fish: ${settings.flows} flows, ${PAYLOAD_BYTES}-byte UDP payload, ${settings.seconds} s windows, ${options.runs} run(s) of ${settings.systems.join(', ')}`);

  const quietReadings: number[] = [];
  let repeats = 0;
  const ceilings: number[] = [];
  const results = await alternate(settings.systems, options.runs, async (system, index) => {
    // The generator's ceiling, once per run (before its first system), so that a reader can tell whether Fish
    // or the generator limits the figures: measured under the same load as the runs around it.
    if (system === orderForRun(settings.systems, index)[0]) {
      ceilings.push(await generatorCeiling(settings, binding, options.progress));
      options.progress(`fish: run ${index + 1} generator ceiling (into a drained seqpacket pair) ${formatNumber(ceilings.at(-1)! / 1000)} kpps`);
    }
    let result: RunResult;
    for (let attempt = 0; ; attempt++) {
      // Other jobs share the 2 CPUs: give them a moment to calm down, and record how busy they were.
      if (settings.quietWaitMs > 0) quietReadings.push((await waitForQuiet(settings.quietWaitMs, QUIET_PERCENT, os.cpus().length)).othersPercent);
      result = await runOnce(settings, binding, system, softirqPids, options.progress);
      const others = Math.max(result.egress.cpuPercent.others, result.return.cpuPercent.others);
      const inBudget = (performance.now() - started) / 1000 < RETRY_BUDGET_S;
      if (others <= DISTURBED_PERCENT || attempt > 0 || repeats >= settings.maxRepeats || !inBudget) break;
      repeats++;
      options.progress(`fish: run ${index + 1} ${system}: other processes used ${formatNumber(others, 0)}% of a CPU during a window; measuring it again`);
    }
    options.progress(
      `fish: run ${index + 1} ${system.padEnd(6)} egress ${formatNumber(result.egress.pps / 1000)} kpps (offered ${formatNumber(result.egress.offeredPps / 1000)}), return ${formatNumber(result.return.pps / 1000)} kpps (offered ${formatNumber(result.return.offeredPps / 1000)})`,
    );
    return result;
  });

  const systems: Record<string, unknown> = {};
  for (const system of settings.systems) {
    const rows = results[system];
    systems[system] = {
      egress: summarise(rows.map((r) => r.egress)),
      return: summarise(rows.map((r) => r.return)),
      perRun: rows.map((r) => ({ egressPps: round(r.egress.pps), returnPps: round(r.return.pps), othersPercent: round(Math.max(r.egress.cpuPercent.others, r.return.cpuPercent.others), 3), ...r.counters })),
      drops: sumDrops(rows),
    };
  }
  const pps = (system: System, direction: 'egress' | 'return') => (systems[system] as Record<string, { pps: number }> | undefined)?.[direction]?.pps ?? Number.NaN;
  const fishEgress = pps('fish', 'egress');
  const fishReturn = pps('fish', 'return');
  return {
    benchmark: 'fish',
    kernel: kernelRelease(),
    cpus: os.cpus().length,
    runs: options.runs,
    seconds: settings.seconds,
    flows: settings.flows,
    payloadBytes: PAYLOAD_BYTES,
    placement: options.placement,
    unixQlen: settings.unixQlen,
    fish0TxQueueLen: settings.fish0TxQueueLen,
    repeatedRuns: repeats,
    othersBeforeRunsPercent: round(median(quietReadings), 3),
    generatorCeilingPps: medianOf(ceilings),
    generatorCeilingRunsPps: ceilings.map((value) => round(value)),
    fishEgressPps: fishEgress,
    fishReturnPps: fishReturn,
    kernelEgressPps: pps('kernel', 'egress'),
    kernelReturnPps: pps('kernel', 'return'),
    egressRatio: round(ratio(fishEgress, pps('kernel', 'egress')), 3),
    returnRatio: round(ratio(fishReturn, pps('kernel', 'return')), 3),
    fishEgressCpuUsPerPacket: (systems.fish as { egress: { fishUsPerPacket: number } } | undefined)?.egress.fishUsPerPacket ?? Number.NaN,
    fishReturnCpuUsPerPacket: (systems.fish as { return: { fishUsPerPacket: number } } | undefined)?.return.fishUsPerPacket ?? Number.NaN,
    pathCpuUsPerPacket: Object.fromEntries(
      settings.systems.flatMap((system) =>
        (['egress', 'return'] as const).map((direction) => [`${system}${direction[0]!.toUpperCase()}${direction.slice(1)}`, (systems[system] as Record<string, { oursUsPerPacket: number }>)[direction]!.oursUsPerPacket]),
      ),
    ),
    goal: { egressPps: GOAL_EGRESS_PPS, returnPps: GOAL_RETURN_PPS, egressMet: fishEgress >= GOAL_EGRESS_PPS, returnMet: fishReturn >= GOAL_RETURN_PPS },
    systems,
    elapsedS: round((performance.now() - started) / 1000, 3),
  };
}

/** The readable table of a {@link run} result (stdout without `--json`). */
export function formatTable(result: Record<string, unknown>): string {
  const systems = result.systems as Record<string, { egress: ReturnType<typeof summarise>; return: ReturnType<typeof summarise> }>;
  const kpps = (value: number) => formatNumber(value / 1000);
  // `others` is a difference of two clocks and can come out a hair below zero: shown as 0.
  const percent = (value: number) => (Number.isFinite(value) ? `${formatNumber(Math.max(0, value), 0)}%` : '–');
  const rows: string[][] = [['system / direction', 'kpps (median)', 'min–max', 'offered kpps', 'Fish µs/pkt', 'path µs/pkt', 'machine µs/pkt', 'Fish CPU', 'generator', 'drain', 'ksoftirqd', 'others', 'machine']];
  for (const [name, figures] of Object.entries(systems)) {
    for (const direction of ['egress', 'return'] as const) {
      const w = figures[direction];
      rows.push([
        `${name} ${direction}`,
        kpps(w.pps),
        `${kpps(w.minPps)}–${kpps(w.maxPps)}`,
        kpps(w.offeredPps),
        Number.isFinite(w.fishUsPerPacket) ? formatNumber(w.fishUsPerPacket, 2) : '–',
        formatNumber(w.oursUsPerPacket, 2),
        formatNumber(w.machineUsPerPacket, 2),
        percent(w.cpuPercent.fish),
        percent(w.cpuPercent.generator),
        percent(w.cpuPercent.drain),
        percent(w.cpuPercent.ksoftirqd),
        percent(w.cpuPercent.others),
        percent(w.cpuPercent.machine),
      ]);
    }
  }
  const lines = [textTable(rows), ''];
  for (const [name, figures] of Object.entries(systems)) {
    const drops = Object.entries((figures as unknown as { drops: Record<string, number> }).drops).map(([key, value]) => `${key} ${formatNumber(value, 0)}`);
    lines.push(`${name} drops over all runs: ${drops.length ? drops.join(', ') : 'none'}`);
  }
  lines.push(`generator ceiling (Node, one write(2) per packet, into a drained seqpacket pair): ${kpps(result.generatorCeilingPps as number)} kpps`);
  lines.push(`Fish / kernel SNAT: egress ${formatNumber(result.egressRatio as number, 2)}, return ${formatNumber(result.returnRatio as number, 2)}`);
  const goal = result.goal as { egressMet: boolean; returnMet: boolean };
  lines.push(`goal (notes §12): egress ${kpps(GOAL_EGRESS_PPS)} kpps ${goal.egressMet ? 'met' : 'missed'}, return ${kpps(GOAL_RETURN_PPS)} kpps ${goal.returnMet ? 'met' : 'missed'}`);
  lines.push(`${result.runs as number} runs per system, medians; ${result.seconds as number} s windows; ${result.flows as number} flows; net.unix.max_dgram_qlen ${result.unixQlen as number}`);
  lines.push('CPU in % of one CPU (2 CPUs = 200%); path µs/pkt = Fish + generator + drain + ksoftirqd CPU per packet counted');
  return lines.join('\n');
}

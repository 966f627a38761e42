// The whole suite at work (what `npm run demo` shows): the example edge proxy reads a client namespace's
// tun; curl downloads 64 MiB through Bumblebee and Splicer while every daemon reloads twice and the proxy
// restarts once; UDP and ping go through Fish; every TCP flow gets an audit line with its byte counts; a
// clean stop leaves nothing behind (processes, namespaces, the tun, Fish's rules and conntrack entries).
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import type { Test } from 'tap';
import { FishClient } from '../../lib/client/fish.js';
import { loadNative } from '../../lib/native.js';
import { isRunning } from '../../lib/process.js';
import { startDaemon, tempDir, type TestDaemon } from '../helpers/daemon.js';
import {
  curlIn,
  EGRESS4,
  fishTopology,
  hostExec,
  ORIGIN4,
  ORIGIN_HTTP_PORT,
  ORIGIN_TCP_ECHO_PORT,
  ORIGIN_UDP_PORTS,
  pingIn,
  startDaemonInHost,
  startOrigin,
  tcpFlowClientIn,
  udpRequestIn,
  type FishTopology,
} from '../helpers/fish-topology.js';
import { eventually } from '../helpers/native-helpers.js';
import { RpcClient } from '../../lib/rpc/client.js';

t.setTimeout(170_000);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const binding = loadNative();
const notRoot = process.getuid?.() === 0 ? false : 'the edge proxy needs root: network namespaces, a tun, Fish';
const FILE_MIB = 64;
/** 64 MiB at 2 MB/s: about 33 s, room for six daemon reloads and a proxy restart on a loaded 2-core machine. */
const LIMIT_RATE = '2000K';
const SLICE = '40000-40999';

/** The edge proxy, followed across its restarts by the pids its log lines carry. */
interface ProxyRun {
  lines: Array<Record<string, unknown>>;
  pids: Set<number>;
  current: number;
  waitFor(predicate: (line: Record<string, unknown>) => boolean, ms?: number): Promise<Record<string, unknown>>;
}

function startProxy(topology: FishTopology, args: string[]): ProxyRun {
  const child = topology.host.spawn(process.execPath, ['--import', 'tsx', path.join(root, 'examples', 'edge-proxy', 'main.ts'), ...args]);
  child.stdin!.end();
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const run: ProxyRun = { lines: [], pids: new Set([child.pid!]), current: child.pid!, waitFor: undefined as never };
  const waiters = new Set<{ predicate: (line: Record<string, unknown>) => boolean; resolve: (line: Record<string, unknown>) => void }>();
  // Successors inherit this pipe: every generation's lines arrive here.
  readline.createInterface({ input: child.stdout! }).on('line', (text) => {
    let line: Record<string, unknown>;
    try {
      line = JSON.parse(text) as Record<string, unknown>;
    } catch {
      return;
    }
    run.lines.push(line);
    if (typeof line.pid === 'number') run.pids.add(line.pid);
    for (const waiter of [...waiters]) {
      if (waiter.predicate(line)) {
        waiters.delete(waiter);
        waiter.resolve(line);
      }
    }
  });
  run.waitFor = (predicate, ms = 20_000) => {
    const found = run.lines.find(predicate);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`edge proxy: no matching line within ${ms} ms; stderr: ${stderr.slice(-2000)}`)), ms);
      waiters.add({
        predicate,
        resolve: (line) => {
          clearTimeout(timer);
          resolve(line);
        },
      });
    });
  };
  // Successors are not our children: they are killed by pid, before the namespaces go.
  topology.cleanup(() => {
    for (const pid of run.pids) if (isRunning(pid)) process.kill(pid, 'SIGKILL');
  });
  return run;
}

/** Follows a daemon across reloads; kills the live generation at teardown. */
function follow(t: Test, daemon: TestDaemon, service: string) {
  const pids = [daemon.pid];
  t.teardown(() => {
    for (const pid of pids) if (isRunning(pid)) process.kill(pid, 'SIGKILL');
  });
  return {
    service,
    socket: daemon.socket,
    pids,
    get current() {
      return pids[pids.length - 1]!;
    },
    /** A `reload` request (what `fdferry ctl <service> reload` sends), answered by the successor when it is done. */
    async reload() {
      const control = new RpcClient({ path: daemon.socket, owner: `reload-${process.pid}`, binding, reconnect: false, requestTimeoutMs: 30_000 });
      try {
        await control.connect();
        const report = (await control.request('reload', { wait: true })).result as { ok: boolean; newPid: number | null; totalMs: number };
        if (!report.ok || !report.newPid) throw new Error(`${service} reload failed: ${JSON.stringify(report)}`);
        pids.push(report.newPid);
        return report;
      } finally {
        control.close();
      }
    },
  };
}

const untilGone = (pid: number, ms = 15_000) => eventually(() => !isRunning(pid), ms);

t.test('the edge proxy under reloads: downloads intact, UDP and ping answered, audit lines exact, nothing left', { skip: notRoot }, async (t) => {
  const created = { namespaces: [] as string[], pids: [] as number[] };

  await t.test('the demo, asserted', async (t) => {
    const topology = fishTopology(t, binding, { openTun: false });
    created.namespaces.push(topology.host.name, topology.origin.name, topology.client.name);
    const dir = tempDir(t, 'edge-');
    const [origin, splicerDaemon, bumblebeeDaemon, fishDaemon] = await Promise.all([
      startOrigin(topology, { fileMiB: FILE_MIB }),
      startDaemon(t, 'splicer', [], { dir }),
      startDaemon(t, 'bumblebee', [], { dir }),
      startDaemonInHost(topology, 'fish', ['--port-range', '40000-41999', '--registration-grace', '10000'], { dir }),
    ]);
    created.pids.push(origin.pid);
    const splicer = follow(t, splicerDaemon, 'splicer');
    const bumblebee = follow(t, bumblebeeDaemon, 'bumblebee');
    const fish = follow(t, fishDaemon, 'fish');
    const owner = `edge-${process.pid}`;
    const proxy = startProxy(topology, [
      '--client-netns', topology.client.name,
      '--splicer', splicer.socket,
      '--bumblebee', bumblebee.socket,
      '--fish', fish.socket,
      '--egress4', EGRESS4,
      '--ports', SLICE,
      '--owner', owner,
    ]);
    await proxy.waitFor((line) => line.msg === 'edge proxy running', 30_000);

    const url = `http://${ORIGIN4[0]}:${ORIGIN_HTTP_PORT}/file`;
    let downloadDone = false;
    const downloadStarted = Date.now();
    const download = curlIn(topology.client, url, { timeoutMs: 120_000, args: ['--limit-rate', LIMIT_RATE] }).finally(() => (downloadDone = true));
    await origin.waitFor((line) => line.event === 'http' && line.path === '/file', 20_000);

    // Two rounds of daemon reloads with the proxy's restart between them, all while the download runs.
    const reloads: Record<string, number> = { splicer: 0, bumblebee: 0, fish: 0 };
    let proxyRestarts = 0;
    for (let round = 0; round < 2; round++) {
      for (const daemon of [splicer, bumblebee, fish]) {
        const report = await daemon.reload();
        reloads[daemon.service]!++;
        t.comment(`${daemon.service} reloaded in ${report.totalMs} ms (${Math.round((Date.now() - downloadStarted) / 1000)} s into the download)`);
      }
      if (round === 0) {
        const old = proxy.current;
        process.kill(old, 'SIGHUP');
        const took = await proxy.waitFor((line) => typeof line.msg === 'string' && line.msg.startsWith('edge proxy took over') && line.pid !== old, 30_000);
        proxy.current = took.pid as number;
        t.ok(await untilGone(old), `the old proxy (pid ${old}) exited after handing over to pid ${proxy.current}`);
        t.comment(`proxy restarted (${Math.round((Date.now() - downloadStarted) / 1000)} s into the download)`);
        proxyRestarts++;
      }
    }
    t.notOk(downloadDone, 'every reload and the proxy restart happened while the download was still running');
    t.same(reloads, { splicer: 2, bumblebee: 2, fish: 2 }, 'every daemon reloaded twice during the transfer');
    t.equal(proxyRestarts, 1, 'the proxy restarted once during the transfer');

    // Fish's path after its reloads and the proxy's restart (the registration was taken over by the successor).
    const udp = await udpRequestIn(topology.client, ORIGIN4[0], ORIGIN_UDP_PORTS[0], { count: 5 });
    t.equal(udp.matched, 5, 'UDP: 5 requests, 5 matching answers');
    const ping = await pingIn(topology.client, ORIGIN4[0], { count: 3 });
    t.equal(ping.received, 3, 'ping: 3 answers');
    const datagram = await origin.waitFor((line) => line.event === 'udp' && line.remote === EGRESS4);
    t.ok(Number(datagram.remotePort) >= 40000 && Number(datagram.remotePort) <= 40999, `UDP left from the egress address and the slice (${String(datagram.remotePort)})`);

    const result = await download;
    t.equal(result.code, 0, `curl succeeded ${result.stderr}`);
    t.equal(result.bytes, origin.file.size, `curl received every byte (${result.bytes})`);
    t.equal(result.sha256, origin.file.sha256, 'the download hashes as the origin file');

    // New flows through the successor proxy and the reloaded daemons: three echo connections of known size.
    const echoBytes = 100_000;
    const echo = await tcpFlowClientIn(topology.client, ['echo', '--target', `${ORIGIN4[0]}:${ORIGIN_TCP_ECHO_PORT}`, '--count', '3', '--bytes', String(echoBytes), '--concurrency', '3']);
    t.match(echo, { ok: 3, failed: 0, resets: 0 }, 'three echo connections through the restarted proxy, bytes checked');

    // One audit line per TCP flow, with the bytes each way.
    const audits = () => proxy.lines.filter((line) => line.msg === 'audit').map((line) => line.audit as Record<string, any>);
    t.ok(await eventually(() => audits().length >= 4, 15_000), `an audit line for each of the 4 TCP flows (${audits().length})`);
    const lines = audits();
    t.equal(lines.length, 4, 'exactly one line per flow');
    const downloadLine = lines.find((line) => line.destination === `${ORIGIN4[0]}:${ORIGIN_HTTP_PORT}`);
    t.ok(downloadLine, 'the download has its audit line');
    t.ok(downloadLine!.bytesDown >= origin.file.size && downloadLine!.bytesDown < origin.file.size + 1024, `the download's line counts the file and its headers down (${downloadLine!.bytesDown})`);
    t.ok(downloadLine!.bytesUp > 0 && downloadLine!.bytesUp < 1024, `and the request up (${downloadLine!.bytesUp})`);
    t.not(downloadLine!.startedBy, downloadLine!.loggedBy, 'the download was started by the first proxy and audited by its successor');
    t.ok(typeof downloadLine!.rttMs.client === 'number' && typeof downloadLine!.retransmits.upstream === 'number', 'with rtt and retransmits from TCP_INFO');
    const echoLines = lines.filter((line) => line.destination === `${ORIGIN4[0]}:${ORIGIN_TCP_ECHO_PORT}`);
    t.same(echoLines.map((line) => [line.bytesUp, line.bytesDown]), [[echoBytes, echoBytes], [echoBytes, echoBytes], [echoBytes, echoBytes]], 'each echo flow: its bytes up and down, exactly');
    t.same(lines.filter((line) => line.reason !== 'complete'), [], 'zero connections reset: every relay completed');
    t.same(lines.map((line) => line.client.split(':')[0]), ['100.64.0.2', '100.64.0.2', '100.64.0.2', '100.64.0.2'], 'the client is named in each line');

    // A clean stop of everything, in reverse order, and nothing of theirs is left in the host namespace.
    const allPids = () => [...proxy.pids, ...splicer.pids, ...bumblebee.pids, ...fish.pids];
    process.kill(proxy.current, 'SIGTERM');
    t.ok(await untilGone(proxy.current), 'the proxy stopped on SIGTERM');
    t.ok(
      await eventually(() => !hostExec(topology, ['conntrack', '-L', '-m', `${0xf15e0000}/${0xffff0000}`]).includes('src='), 10_000),
      'the proxy unregistered: no conntrack entry of its registration is left',
    );
    const control = new FishClient({ owner: `check-${process.pid}`, path: fish.socket, binding, reconnect: false });
    await control.connect();
    t.same(await control.registrations(), [], 'Fish holds no registration');
    control.close();
    for (const daemon of [fish, bumblebee, splicer]) {
      process.kill(daemon.current, 'SIGTERM');
      t.ok(await untilGone(daemon.current), `${daemon.service} stopped`);
    }
    t.notMatch(hostExec(topology, ['ip', 'rule', 'show']), /lookup 4242/, 'no rule of Fish left');
    t.equal(hostExec(topology, ['ip', 'route', 'show', 'table', '4242']).trim(), '', 'no route of Fish left');
    t.notMatch(hostExec(topology, ['ip', 'link', 'show']), /fish0/, "no Fish tun left");
    t.notMatch(hostExec(topology, ['conntrack', '-L', '-m', `${0xf15e0000}/${0xffff0000}`]), /src=/, "no conntrack entry of Fish's left in the host namespace");
    created.pids.push(...allPids());
    t.equal(
      allPids().filter((pid) => isRunning(pid)).length,
      0,
      `every process of the run has exited (${allPids().length}: ${proxy.pids.size} proxy generations, ${splicer.pids.length + bumblebee.pids.length + fish.pids.length} daemon generations)`,
    );
  });

  // After the subtest's teardown: the namespaces (and with them the client's tun and routes) are gone.
  const listed = fs.existsSync('/run/netns') ? fs.readdirSync('/run/netns') : [];
  t.same(created.namespaces.filter((name) => listed.includes(name)), [], 'every namespace the run made is gone');
  t.same(created.pids.filter((pid) => isRunning(pid)), [], 'no process of the run is left');
});

// Bumblebee with real kernel TCP on both ends: ordinary programs in a client network namespace connect
// to destinations that exist nowhere; the native on-ramp splits the namespace's tun into flow sockets;
// Bumblebee upgrades each one; this process serves the accepted sockets. Every byte is checked by hash.
import t from 'tap';
import type { Test } from 'tap';
import crypto from 'node:crypto';
import { execFile } from 'node:child_process';
import http from 'node:http';
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import { BumblebeeClient } from '../../lib/client/bumblebee.js';
import { SplicerClient } from '../../lib/client/splicer.js';
import { loadNative } from '../../lib/native.js';
import { RpcClient } from '../../lib/rpc/client.js';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { eventually, withDeadline } from '../helpers/native-helpers.js';
import { CLIENT4, CLIENT6, DESTINATION4, DESTINATION6, HeldFlows, clientNamespace, echo, runFlowClient, startOnRamp } from '../helpers/bumblebee-topology.js';

t.setTimeout(300_000);
const binding = loadNative();

const setup = async (t: Test, args: string[] = []) => {
  const daemon = await startDaemon(t, 'bumblebee', args);
  const client = new BumblebeeClient({ owner: `flows-${process.pid}`, path: daemon.socket });
  await client.connect();
  t.teardown(() => client.close());
  const control = new RpcClient({ path: daemon.socket, owner: `ctl-${process.pid}`, binding, reconnect: false });
  await control.connect();
  t.teardown(() => control.close());
  const status = async () => (await control.request('status')).result as Record<string, any>;
  return { daemon, client, status };
};

/** Polls an async condition until it holds or `ms` pass. */
async function until(condition: () => Promise<boolean>, ms = 10_000): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await condition()) return true;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return condition();
}

/** Every flow ended and the daemon is back to the fds it had before any. */
async function settled(t: Test, daemon: TestDaemon, status: () => Promise<Record<string, any>>, baselineFds: number) {
  t.ok(await until(async () => (await status()).flows === 0 && (await status()).pending === 0, 20_000), 'every flow ended once its client closed');
  t.ok(await until(async () => daemon.openFds() === baselineFds, 10_000), `the daemon is back to its ${baselineFds} fds (now ${daemon.openFds()})`);
}

t.test('IPv4 and IPv6 connections from a client namespace become accepted sockets; echoed bytes match by hash', async (t) => {
  const { daemon, client, status } = await setup(t);
  const baseline = daemon.openFds();
  const namespace = clientNamespace(t, binding);
  const accepted: Array<{ tuple: unknown; local: string | undefined }> = [];
  const harness = startOnRamp(t, binding, client, namespace.tunFd, (flow) => {
    accepted.push({ tuple: flow.tuple, local: flow.socket.localAddress });
    echo(flow);
  });
  const v4 = await runFlowClient(namespace, ['echo', '--target', `${DESTINATION4}:80`, '--count', '20', '--bytes', String(1 << 20), '--concurrency', '10']);
  const v6 = await runFlowClient(namespace, ['echo', '--target', `[${DESTINATION6}]:443`, '--count', '20', '--bytes', String(1 << 20), '--concurrency', '10']);
  t.match(v4, { ok: 20, failed: 0, resets: 0 }, `20 IPv4 connections echoed 1 MiB each, hashes equal (${v4.ms} ms)`);
  t.match(v6, { ok: 20, failed: 0, resets: 0 }, `20 IPv6 connections echoed 1 MiB each, hashes equal (${v6.ms} ms)`);
  t.equal(harness.refusals.length, 0, 'no upgrade was refused');
  const first4 = accepted.find((a) => (a.tuple as { family: number }).family === 4)!;
  t.match(first4, { tuple: { clientAddress: CLIENT4, destinationAddress: DESTINATION4, destinationPort: 80 }, local: '100.64.0.1' }, 'the reply names the client and where it wanted to go');
  t.match(accepted.find((a) => (a.tuple as { family: number }).family === 6), { tuple: { clientAddress: CLIENT6, destinationAddress: DESTINATION6, destinationPort: 443 }, local: 'fd00:bb::1' });
  const environment = (await status()).environments[0];
  t.equal(environment.accepted, 40, 'the pump accepted 40 handshakes');
  t.equal(environment.orphans, 0, 'no orphan sockets');
  await settled(t, daemon, status, baseline);
  t.equal(harness.onramp.stats().flows, 0, 'the on-ramp closed every flow');
});

t.test('curl downloads through Bumblebee and Splicer, and the checksum matches', async (t) => {
  const { client } = await setup(t);
  const splicer = await startDaemon(t, 'splicer');
  const splicerClient = new SplicerClient({ owner: `curl-${process.pid}`, path: splicer.socket });
  await splicerClient.connect();
  t.teardown(() => splicerClient.close());
  const file = crypto.randomBytes(32 * 1024 * 1024);
  const origin = http.createServer((_request, response) => {
    response.writeHead(200, { 'content-length': file.length });
    response.end(file);
  });
  await new Promise<void>((resolve) => origin.listen(0, '127.0.0.1', resolve));
  t.teardown(() => origin.close());
  const originPort = (origin.address() as AddressInfo).port;
  const namespace = clientNamespace(t, binding);
  const envelopes: Array<Record<string, unknown>> = [];
  startOnRamp(t, binding, client, namespace.tunFd, (flow) => {
    // What an edge proxy does: a fresh connection to the flow's destination (here, the test's origin),
    // and both sockets to Splicer.
    const upstream = net.connect(originPort, '127.0.0.1', () => {
      splicerClient.splice(flow.socket, upstream, { tuple: flow.tuple }).then(
        (relay) => {
          envelopes.push(relay.envelope as unknown as Record<string, unknown>);
          relay.a.destroy();
          relay.b.destroy();
        },
        () => flow.socket.destroy(),
      );
    });
  });
  const output = await new Promise<Buffer>((resolve, reject) => {
    execFile('ip', ['netns', 'exec', namespace.name, 'curl', '-sS', '--fail', '--max-time', '60', `http://${DESTINATION4}/file`], { encoding: 'buffer', maxBuffer: 64 << 20 }, (error, stdout, stderr) =>
      error ? reject(new Error(`curl failed: ${stderr.toString()}`)) : resolve(stdout),
    );
  });
  t.equal(output.length, file.length, 'curl got every byte');
  t.equal(crypto.createHash('sha256').update(output).digest('hex'), crypto.createHash('sha256').update(file).digest('hex'), 'sha256 of the download equals the origin file');
  t.ok(await eventually(() => envelopes.length === 1, 10_000), 'the relay came back from Splicer in its envelope');
  t.ok((envelopes[0]?.bytesBToA as number) >= file.length, 'the envelope counts the download');
});

t.test('1,000 concurrent flows, two tenants with identical five-tuples at once', async (t) => {
  const { daemon, client, status } = await setup(t);
  const baseline = daemon.openFds();
  const tenants = ['red', 'blue'].map((tenant) => {
    const namespace = clientNamespace(t, binding);
    const tuples = new Set<string>();
    const harness = startOnRamp(
      t,
      binding,
      client,
      namespace.tunFd,
      (flow) => {
        tuples.add(`${flow.tuple.clientAddress}:${flow.tuple.clientPort}->${flow.tuple.destinationAddress}:${flow.tuple.destinationPort}`);
        echo(flow);
      },
      { tenant },
    );
    return { tenant, namespace, tuples, harness };
  });
  // Both namespaces use the same client address and the same 500 source ports to the same destination.
  const started = Date.now();
  const results = await withDeadline(
    Promise.all(tenants.map(({ namespace }) => runFlowClient(namespace, ['echo', '--target', `${DESTINATION4}:80`, '--count', '500', '--bytes', '8192', '--concurrency', '500', '--local-port-base', '30000']))),
    240_000,
    '1,000 flows',
  );
  const refusals = tenants.flatMap(({ harness }) => harness.refusals.map((error) => error.code));
  for (const [i, result] of results.entries()) t.match(result, { ok: 500, failed: 0, resets: 0 }, `tenant ${tenants[i]!.tenant}: 500 flows echoed, hashes equal`);
  const [red, blue] = tenants;
  t.equal(red!.tuples.size, 500, 'red used 500 distinct five-tuples');
  t.same([...red!.tuples].sort(), [...blue!.tuples].sort(), 'blue used exactly the same five-tuples');
  t.ok(Date.now() - started > 0, `1,000 flows in ${Date.now() - started} ms`);
  t.same(refusals, [], 'no upgrade refused');
  await settled(t, daemon, status, baseline);
});

t.test('after SIGKILL, handed-out sockets fail fast instead of hanging (keepalive and TCP_USER_TIMEOUT)', async (t) => {
  const { daemon, client } = await setup(t, ['--keepalive-idle', '1', '--keepalive-interval', '1', '--keepalive-count', '2', '--user-timeout', '3000']);
  const namespace = clientNamespace(t, binding);
  const sockets: net.Socket[] = [];
  startOnRamp(t, binding, client, namespace.tunFd, (flow) => sockets.push(flow.socket));
  const held = new HeldFlows(t, namespace, ['--target', `${DESTINATION4}:80`, '--count', '2']);
  t.match(await held.ready(), { ready: 2 }, 'two connections are up');
  t.ok(await eventually(() => sockets.length === 2, 10_000), 'both were upgraded');
  const failures = sockets.map(
    (socket) => new Promise<string>((resolve) => socket.once('error', (error: NodeJS.ErrnoException) => resolve(error.code ?? error.message)).once('close', () => resolve('closed'))),
  );
  // One idle, one with unacknowledged data: keepalive catches the first, TCP_USER_TIMEOUT the second.
  sockets[1]!.write('into the void');
  const killedAt = Date.now();
  daemon.kill('SIGKILL');
  await daemon.exited;
  const codes = await withDeadline(Promise.all(failures), 20_000, 'the handed-out sockets to fail');
  // With the tun gone there is no route either: a socket that sends may learn it as ENETUNREACH first.
  const fastFailures = new Set(['ETIMEDOUT', 'ENETUNREACH', 'EHOSTUNREACH']);
  t.ok(codes.every((code) => fastFailures.has(code)), `both failed (${codes.join(', ')}) ${Date.now() - killedAt} ms after the kill`);
  t.equal(codes[0], 'ETIMEDOUT', 'the idle one was caught by keepalive');
  for (const socket of sockets) socket.destroy();
});

// Bumblebee hands over to a successor while flows run: a bulk transfer keeps streaming through two
// reloads, 1,000 idle flows stay up and still answer, and not a byte is lost or a connection reset.
import t from 'tap';
import net from 'node:net';
import { BumblebeeClient } from '../../lib/client/bumblebee.js';
import { loadNative } from '../../lib/native.js';
import { RpcClient } from '../../lib/rpc/client.js';
import { startDaemon } from '../helpers/daemon.js';
import { eventually, withDeadline } from '../helpers/native-helpers.js';
import { Generations, alive, reload } from '../helpers/restart.js';
import { DESTINATION4, DESTINATION6, HeldFlows, clientNamespace, echo, runFlowClient, startFlowClient, startOnRamp } from '../helpers/bumblebee-topology.js';

t.setTimeout(300_000);
const binding = loadNative();

t.test('reloads during a bulk transfer and with 1,000 idle flows: nothing lost, nothing reset', async (t) => {
  const daemon = await startDaemon(t, 'bumblebee');
  const generations = new Generations(t, daemon.pid);
  const client = new BumblebeeClient({ owner: `restart-${process.pid}`, path: daemon.socket });
  await client.connect();
  t.teardown(() => client.close());
  const control = new RpcClient({ path: daemon.socket, owner: `ctl-${process.pid}`, binding });
  await control.connect();
  t.teardown(() => control.close());
  const status = async () => (await control.request('status')).result as Record<string, any>;

  const namespace = clientNamespace(t, binding);
  const accepted: net.Socket[] = [];
  const harness = startOnRamp(t, binding, client, namespace.tunFd, (flow) => {
    accepted.push(flow.socket);
    echo(flow);
  });
  const idle = new HeldFlows(t, namespace, ['--target', `[${DESTINATION6}]:443`, '--count', '1000']);
  t.match(await withDeadline(idle.ready(), 60_000, '1,000 idle flows'), { ready: 1000 }, '1,000 idle flows are up');
  // It streams until both reloads are done, however long they take on a loaded machine.
  const bulk = startFlowClient(namespace, ['stream', '--target', `${DESTINATION4}:80`, '--until-stdin-eof']);
  t.ok(await eventually(() => accepted.length === 1001, 10_000), 'the bulk flow is up too');

  for (let i = 1; i <= 2; i++) {
    const { report } = await reload('bumblebee', daemon.socket);
    t.equal(report.ok, true, `reload ${i} succeeded (${JSON.stringify(report.failure ?? {})})`);
    if (report.newPid) generations.add(report.newPid);
    t.equal(report.tasks, 1001, `reload ${i} carried 1,001 flows (pause ${String(report.pauseMs)} ms)`);
    // The successor answers as soon as it has taken over; the old process exits when it hears so.
    t.ok(await eventually(() => !alive(report.oldPid), 10_000), `the old process (${report.oldPid}) is gone`);
  }
  bulk.stop();
  const result = await withDeadline(bulk.result, 60_000, 'the bulk transfer');
  t.match(result, { ok: true, resets: 0 }, `the bulk transfer streamed through both reloads: ${result.sentBytes} bytes each way, hashes equal`);
  t.match(await idle.ping(), { pinged: 1000, failed: 0, resets: 0 }, 'every idle flow still echoes after the reloads');
  const after = await status();
  t.equal(after.pid, generations.current, 'the last successor serves');
  t.equal(after.generation, 3, 'two hand-overs later');
  t.equal(harness.refusals.length, 0, 'no upgrade was refused');
  // A packet dropped at a full flow socket is a router's drop (TCP retransmits it) and not a loss; what
  // must never happen across a hand-over is a handshake with no flow (an orphan) or a reset (above).
  t.equal(after.environments[0].orphans, 0, `no accepted socket was orphaned (full-socket drops: ${after.environments[0].drops.socketFull ?? 0})`);
  // New flows after the reloads are upgraded by the successor.
  const fresh = await runFlowClient(namespace, ['echo', '--target', `${DESTINATION4}:80`, '--count', '10', '--bytes', '4096']);
  t.match(fresh, { ok: 10, failed: 0 }, 'new flows work after the reloads');
  t.match(await idle.close(), { closed: 1000, resets: 0 }, 'the idle flows close cleanly');
  for (const socket of accepted) socket.destroy();
});

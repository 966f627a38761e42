// The on-ramp's pause/resume, what an application's hand-over is built on (examples/edge-proxy): pausing
// stops every read without closing a flow; the flows resume on the same on-ramp (a rollback) or on a new
// one made on the same tun with `flows` (a successor), and held connections keep echoing across both.
import t from 'tap';
import net from 'node:net';
import { BumblebeeClient, type UpgradedFlow } from '../../lib/client/bumblebee.js';
import { loadNative, type OnRamp, type OnRampFlow } from '../../lib/native.js';
import { startDaemon } from '../helpers/daemon.js';
import { eventually } from '../helpers/native-helpers.js';
import { DESTINATION4, HeldFlows, clientNamespace, echo } from '../helpers/bumblebee-topology.js';

t.setTimeout(120_000);

if (process.getuid?.() !== 0) {
  t.skip('the on-ramp tests need root (network namespaces and tun devices)', () => {});
} else {
  const binding = loadNative();

  t.test('pause hands out every flow; resume and a new on-ramp with the flows carry held connections on', async (t) => {
    const daemon = await startDaemon(t, 'bumblebee');
    const client = new BumblebeeClient({ owner: `handoff-${process.pid}`, path: daemon.socket });
    await client.connect();
    t.teardown(() => client.close());
    const namespace = clientNamespace(t, binding);
    const sockets: net.Socket[] = [];
    const onFlows = (flows: OnRampFlow[]) => {
      for (const flow of flows) {
        client.upgrade(flow.fd, { tenant: 'handoff' }).then(
          (upgraded: UpgradedFlow<net.Socket>) => {
            sockets.push(upgraded.socket);
            echo(upgraded);
          },
          () => binding.closeAll([flow.fd]),
        );
      }
    };
    let onramp: OnRamp = binding.createOnRamp(namespace.tunFd, { closeDelayMs: 300, idleTimeoutMs: 0 }, onFlows);
    t.teardown(() => onramp.close());

    const held = new HeldFlows(t, namespace, ['--target', `${DESTINATION4}:80`, '--count', '3']);
    t.match(await held.ready(), { ready: 3 }, 'three connections are up');
    t.ok(await eventually(() => sockets.length === 3, 10_000), 'all three were upgraded');
    t.match(await held.ping(), { pinged: 3, failed: 0 }, 'they echo');

    // Rollback: pause, then resume the same on-ramp.
    const paused = onramp.pause();
    t.equal(paused.flows.length, 3, 'pause hands out the three flows');
    t.same(paused.pending, [], 'no flow was waiting for delivery');
    t.ok(paused.flows.every((flow) => binding.describeFd(flow.fd).type === 5), 'each as our end of its SEQPACKET socket');
    t.equal(onramp.stats().flows, 0, 'the paused on-ramp holds no flow');
    const duringPause = held.ping();
    await new Promise((resolve) => setTimeout(resolve, 300));
    onramp.resume(paused);
    t.match(await duringPause, { pinged: 3, failed: 0 }, 'a ping sent while paused waited in the queues and was answered after resume');
    t.equal(onramp.stats().flows, 3, 'the resumed on-ramp relays the three flows');

    // Hand-over: pause, close, and a new on-ramp on the same tun adopts the flows (what a successor does).
    const handed = onramp.pause();
    const before = onramp.stats();
    onramp.close();
    onramp = binding.createOnRamp(namespace.tunFd, { closeDelayMs: 300, idleTimeoutMs: 0, flows: handed.flows, nextFlowId: handed.nextFlowId }, onFlows);
    t.equal(onramp.stats().flows, 3, 'the new on-ramp adopted the three flows');
    t.ok(before.flowsTotal === 3, 'the old one had seen exactly three');
    t.match(await held.ping(), { pinged: 3, failed: 0 }, 'the held connections echo through the new on-ramp');

    // New flows on the new on-ramp carry on the numbering.
    const more = new HeldFlows(t, namespace, ['--target', `${DESTINATION4}:81`, '--count', '1']);
    t.match(await more.ready(), { ready: 1 }, 'a new connection through the new on-ramp');
    const fourth = onramp.pause();
    t.ok(fourth.flows.some((flow) => flow.flowId >= handed.nextFlowId), `its flow id continues the numbering (from ${handed.nextFlowId})`);
    onramp.resume(fourth);

    t.match(await held.close(), { closed: 3, resets: 0, errors: [] }, 'the held connections close cleanly, none reset');
    await more.close();
    t.ok(await eventually(() => onramp.stats().flows === 0, 10_000), 'every flow ended');
    t.throws(() => onramp.resume(fourth), /not paused/, 'resume refuses a running on-ramp');
    for (const socket of sockets) socket.destroy();
  });
}

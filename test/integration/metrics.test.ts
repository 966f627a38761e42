// Prometheus metrics of real daemons: valid text exposition, over the control socket and over HTTP,
// with counters that match what the test did.
import t from 'tap';
import http from 'node:http';
import net from 'node:net';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { BumblebeeClient } from '../../lib/client/bumblebee.js';
import { SplicerClient } from '../../lib/client/splicer.js';
import { loadNative } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { VERSION } from '../../lib/version.js';
import { cliCommand, startDaemon } from '../helpers/daemon.js';
import { withDeadline } from '../helpers/native-helpers.js';
import { udpPacket } from '../helpers/packets.js';
import { PairFactory, receiveAll, sendAndEnd } from '../helpers/streams.js';

t.setTimeout(60_000);
const binding = loadNative();
const run = promisify(execFile);

/** Parses the text exposition strictly; throws on any line that is not valid. */
function parseExposition(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  const types = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const comment = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$/.exec(line);
    if (comment) {
      if (comment[1] === 'TYPE') {
        if (!['counter', 'gauge', 'histogram', 'summary', 'untyped'].includes(comment[3]!)) throw new Error(`bad type: ${line}`);
        types.set(comment[2]!, comment[3]!);
      }
      continue;
    }
    const sample = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (-?[0-9.e+]+|NaN|\+Inf|-Inf)$/.exec(line);
    if (!sample) throw new Error(`not a valid sample line: ${line}`);
    const family = sample[1]!.replace(/_(bucket|sum|count)$/, '');
    if (!types.has(sample[1]!) && !types.has(family)) throw new Error(`sample without a TYPE: ${line}`);
    samples.set(`${sample[1]}${sample[2] ?? ''}`, Number(sample[3]));
  }
  return samples;
}

const freePort = () =>
  new Promise<number>((resolve) => {
    const server = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });

const httpGet = (port: number) =>
  new Promise<string>((resolve, reject) => {
    http.get({ host: '127.0.0.1', port, path: '/metrics' }, (response) => {
      let body = '';
      response.on('data', (chunk: Buffer) => (body += chunk.toString()));
      response.on('end', () => resolve(body));
    }).on('error', reject);
  });

t.test('Splicer: counters match three relays, over ctl and over HTTP', async (t) => {
  const port = await freePort();
  const daemon = await startDaemon(t, 'splicer', ['--metrics-listen', `127.0.0.1:${port}`]);
  const client = new SplicerClient({ owner: `metrics-${process.pid}`, path: daemon.socket });
  await client.connect();
  t.teardown(() => client.close());
  const pairs = new PairFactory(t, binding);
  for (let i = 0; i < 3; i++) {
    const left = await pairs.pair('tcp4');
    const right = await pairs.pair('unix');
    const relay = await client.start(left.far, right.far);
    const data = Buffer.alloc(1000, i);
    await Promise.all([receiveAll(right.near), sendAndEnd(left.near, data), receiveAll(left.near), sendAndEnd(right.near, Buffer.alloc(0))]);
    const returned = await withDeadline(relay.done, 10_000, 'the envelope');
    returned.a.destroy();
    returned.b.destroy();
  }
  const { command, args } = cliCommand();
  const { stdout } = await run(command, [...args, 'ctl', 'splicer', 'metrics', '--socket', daemon.socket]);
  const samples = parseExposition(stdout);
  t.pass('`fdferry ctl splicer metrics` prints valid Prometheus text');
  t.equal(samples.get('fdferry_splicer_relays_started_total{service="splicer"}'), 3, 'three relays started');
  t.equal(samples.get('fdferry_splicer_relays_ended_total{reason="complete",service="splicer"}'), 3, 'three completed');
  t.equal(samples.get('fdferry_splicer_bytes_total{service="splicer"}'), 3000, 'their 3,000 bytes');
  t.equal(samples.get('fdferry_tasks_active{service="splicer"}'), 0, 'none running');
  t.ok((samples.get('fdferry_open_fds{service="splicer"}') ?? 0) > 0, 'fds in use are reported');
  t.equal(samples.get(`fdferry_info{version="${VERSION}",generation="1",service="splicer"}`), 1, 'version and generation');
  const status = (await run(command, [...args, 'ctl', 'splicer', 'status', '--socket', daemon.socket])).stdout;
  t.match(status, /^relaysEnded\s+3$/m, '`ctl splicer status` is one aligned line per figure for humans');
  t.match(status, /^engine\.bytesTotal\s+3000$/m);
  const overHttp = parseExposition(await httpGet(port));
  t.equal(overHttp.get('fdferry_splicer_relays_ended_total{reason="complete",service="splicer"}'), 3, 'the same figures over HTTP');
});

t.test('Bumblebee: refusals by code, upgrades by outcome', async (t) => {
  const daemon = await startDaemon(t, 'bumblebee', ['--slots', '100']);
  const client = new BumblebeeClient({ owner: `metrics-${process.pid}`, path: daemon.socket });
  await client.connect();
  t.teardown(() => client.close());
  for (let i = 0; i < 2; i++) {
    const [ours, theirs] = binding.seqpacketPair();
    const sender = binding.openSeqpacket(ours, { message() {}, drain() {}, close() {} });
    sender.send(udpPacket({ src: '10.0.0.1', dst: '10.0.0.2', sport: 1, dport: 53, payload: Buffer.from('q') }), []);
    const error = await client.upgrade(theirs).catch((e: ProtocolError) => e);
    t.equal((error as ProtocolError).code, 'EFDFERRY_NOTTCP', 'a UDP first packet is refused');
    binding.closeAll((error as ProtocolError).fds);
    sender.close();
  }
  const { command, args } = cliCommand();
  const samples = parseExposition((await run(command, [...args, 'ctl', 'bumblebee', 'metrics', '--socket', daemon.socket])).stdout);
  t.equal(samples.get('fdferry_errors_total{code="EFDFERRY_NOTTCP",service="bumblebee"}'), 2, 'two NOTTCP refusals');
  t.equal(samples.get('fdferry_bumblebee_upgrades_total{outcome="refused",service="bumblebee"}'), 2, 'counted as refused upgrades');
  t.equal(samples.get('fdferry_bumblebee_slots{environment="1",state="in_use",service="bumblebee"}'), 0, 'no slot held');
});

// Bumblebee packet by packet: this test plays a client's TCP stack by hand through a flow socket, so it
// can check the NAT (addresses, ports, checksums, MSS) and forge every kind of bad packet.
import t from 'tap';
import type { Test } from 'tap';
import { BumblebeeClient } from '../../lib/client/bumblebee.js';
import { loadNative } from '../../lib/native.js';
import { ProtocolError } from '../../lib/protocol/errors.js';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { cliCommand, startDaemon } from '../helpers/daemon.js';
import { Generations, reload } from '../helpers/restart.js';
import { eventually, openRecorded, withDeadline, type Recorded } from '../helpers/native-helpers.js';
import { ACK, PSH, SYN, addressBytes, mssOption, parseTcpPacket, tcpPacket, udpPacket, type ParsedSegment } from '../helpers/packets.js';

t.setTimeout(120_000);
const binding = loadNative();

// MSS, SACK permitted, timestamps, window scale: the options a Linux client sends.
const clientOptions = (mss = 1460) =>
  Buffer.concat([mssOption(mss), Buffer.from([4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7])]);

/** One client flow played by hand: its end of the packet socket pair and its TCP sequence numbers. */
class HandFlow {
  readonly ours: Recorded;
  readonly theirs: number;
  seq = 1_000_000;
  ack = 0;
  #read = 0;

  constructor(
    readonly src: string,
    readonly dst: string,
    readonly sport: number,
    readonly dport: number,
  ) {
    const [ours, theirs] = binding.seqpacketPair();
    this.ours = openRecorded(binding, ours);
    this.theirs = theirs;
  }

  packet(flags: number, payload = Buffer.alloc(0), extra: Partial<Parameters<typeof tcpPacket>[0]> = {}): Buffer {
    return tcpPacket({ src: this.src, dst: this.dst, sport: this.sport, dport: this.dport, seq: this.seq, ack: this.ack, flags, payload, ...extra });
  }

  send(packet: Buffer): void {
    this.ours.socket.send(packet, []);
  }

  /** The next packet Bumblebee sent us, parsed. */
  async next(what: string): Promise<ParsedSegment> {
    const [message] = (await this.ours.messages.wait(this.#read + 1, 10_000, what)).slice(this.#read);
    this.#read++;
    const parsed = parseTcpPacket(message!.data);
    if (!parsed) throw new Error(`${what}: not a TCP packet`);
    return parsed;
  }

  /** SYN, then (while the upgrade waits for accept) SYN-ACK and ACK. */
  async handshake(client: BumblebeeClient, mss = 1460) {
    this.send(this.packet(SYN, Buffer.alloc(0), { options: clientOptions(mss) }));
    const upgrade = client.upgrade(this.theirs, { context: { hand: true }, tenant: 'hand' });
    const synAck = await this.next('SYN-ACK');
    this.seq++;
    this.ack = synAck.seq + 1;
    this.send(this.packet(ACK));
    return { upgraded: await withDeadline(upgrade, 10_000, 'upgrade'), synAck };
  }
}

/** Polls an async condition until it holds or `ms` pass. */
async function until(condition: () => Promise<boolean>, ms = 5000): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await condition()) return true;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return condition();
}

const setup = async (t: Test, args: string[] = []) => {
  const daemon = await startDaemon(t, 'bumblebee', args.includes('--slots') ? args : ['--slots', '1000', ...args]);
  const client = new BumblebeeClient({ owner: `packets-${process.pid}`, path: daemon.socket });
  await client.connect();
  t.teardown(() => client.close());
  const { RpcClient } = await import('../../lib/rpc/client.js');
  const control = new RpcClient({ path: daemon.socket, owner: `ctl-${process.pid}`, binding, reconnect: false });
  await control.connect();
  t.teardown(() => control.close());
  const status = async () => (await control.request('status')).result as Record<string, any>;
  const dropCounts = async () => ((await status()).environments[0].drops ?? {}) as Record<string, number>;
  return { daemon, client, status, dropCounts };
};

t.test('a hand-played IPv4 flow: NATed handshake, options kept, data both ways, checksums right', async (t) => {
  const { daemon, client, status } = await setup(t, ['--mss-clamp', '1200']);
  const flow = new HandFlow('10.9.0.2', '198.51.100.7', 40_000, 443);
  const { upgraded, synAck } = await flow.handshake(client);
  t.teardown(() => upgraded.socket.destroy());
  t.same(upgraded.tuple, { family: 4, clientAddress: '10.9.0.2', clientPort: 40_000, destinationAddress: '198.51.100.7', destinationPort: 443 }, 'the reply names the flow as its SYN had it');
  t.same(upgraded.context, { hand: true }, 'the context comes back as given');
  t.equal(upgraded.tenant, 'hand');
  t.match(upgraded.internal, { listenerAddress: '100.64.0.1', listenerPort: 4242 });
  t.equal(upgraded.socket.localAddress, '100.64.0.1', 'the accepted socket lives on the listener address');
  t.equal(upgraded.socket.remoteAddress, upgraded.internal.address, 'its peer is the internal tuple');
  t.equal(upgraded.socket.remotePort, upgraded.internal.port);
  t.ok(upgraded.internal.address.startsWith('100.64.1.'), 'the internal peer comes from the pool');
  const fd = (upgraded.socket as unknown as { _handle: { fd: number } })._handle.fd;
  t.not(binding.socketNamespaceInode(fd), binding.socketNamespaceInode(flow.ours.socket.fd), 'the socket lives in another network namespace');
  const info = binding.tcpInfo(fd);
  t.equal(info.options & 0x7, 0x7, 'timestamps, SACK and window scaling survived the NAT');
  t.equal(info.sndMss <= 1200, true, `the MSS was clamped both ways (snd_mss ${info.sndMss})`);

  t.ok(synAck.checksumsValid, 'the SYN-ACK reaches the client with valid checksums');
  t.equal(synAck.flags & (SYN | ACK), SYN | ACK);
  t.same([synAck.src, synAck.dst, synAck.sport, synAck.dport], [addressBytes('198.51.100.7'), addressBytes('10.9.0.2'), 443, 40_000], 'the SYN-ACK comes from where the client wanted to go');
  t.equal(synAck.mss, 1200, 'the SYN-ACK MSS was clamped');

  const received: Buffer[] = [];
  upgraded.socket.on('data', (chunk) => received.push(chunk));
  flow.send(flow.packet(PSH | ACK, Buffer.from('hello, kernel')));
  t.ok(await eventually(() => Buffer.concat(received).toString() === 'hello, kernel'), 'client data reaches the accepted socket');
  flow.seq += 'hello, kernel'.length;
  upgraded.socket.write('hello, client');
  let reply: ParsedSegment;
  do reply = await flow.next('data from the server');
  while (reply.payload.length === 0);
  t.equal(reply.payload.toString(), 'hello, client', 'server data reaches the flow socket');
  t.ok(reply.checksumsValid, 'with valid checksums');
  t.equal((await status()).flows, 1, 'status counts the flow');
  const { command, args } = cliCommand();
  const table = execFileSync(command, [...args, 'ctl', 'bumblebee', 'flows', '--socket', daemon.socket], { encoding: 'utf8' });
  t.match(table, /10\.9\.0\.2:40000\s+198\.51\.100\.7:443\s+established/, '`fdferry ctl bumblebee flows` lists the flow with its addresses');
  t.match(table, /1 flow\(s\)/);
  flow.ours.socket.close();
  t.ok(await until(async () => (await status()).flows === 0), 'closing the flow socket ends the flow');
});

t.test('refused upgrades give the flow socket back unread, with a clear code', async (t) => {
  const { client, status } = await setup(t);
  const src = '10.9.0.3';
  const dst = '198.51.100.8';
  const syn = tcpPacket({ src, dst, sport: 1234, dport: 80, seq: 1, flags: SYN });
  const badChecksum = Buffer.from(syn);
  badChecksum[badChecksum.length - 1] ^= 0xff;
  badChecksum[30] ^= 0x01; // the TCP window: the checksum no longer matches
  const cases: Array<[string, Buffer, string]> = [
    ['a UDP datagram', udpPacket({ src, dst, sport: 1234, dport: 53, payload: Buffer.from('query') }), 'EFDFERRY_NOTTCP'],
    ['an ACK', tcpPacket({ src, dst, sport: 1234, dport: 80, seq: 1, ack: 1, flags: ACK }), 'EFDFERRY_NOTSYN'],
    ['a truncated packet', syn.subarray(0, 30), 'EFDFERRY_MALFORMED'],
    ['a bad checksum', badChecksum, 'EFDFERRY_MALFORMED'],
    ['a fragment', tcpPacket({ src, dst, sport: 1234, dport: 80, seq: 1, flags: SYN, fragment: 0x2000 }), 'EFDFERRY_MALFORMED'],
    ['not IP at all', Buffer.from('GET / HTTP/1.1\r\n\r\n'), 'EFDFERRY_MALFORMED'],
  ];
  for (const [what, packet, code] of cases) {
    const [ours, theirs] = binding.seqpacketPair();
    const mine = openRecorded(binding, ours);
    mine.socket.send(packet, []);
    const error = await client.upgrade(theirs).then(
      () => null,
      (e: unknown) => e as ProtocolError,
    );
    t.equal(error?.code, code, `${what}: ${code} (${error?.message})`);
    t.equal(error?.fds.length, 1, `${what}: the flow socket comes back`);
    // The packet is still there, unread: the caller gets back exactly what it sent.
    const back = openRecorded(binding, error!.fds[0]!);
    const [first] = await back.messages.wait(1, 5000, 'the returned packet');
    t.same(first!.data, packet, `${what}: the packet is still in the socket, unread`);
    mine.socket.close();
    back.socket.close();
  }
  const [ours, theirs] = binding.seqpacketPair();
  const empty = openRecorded(binding, ours);
  empty.socket.close();
  const closed = await client.upgrade(theirs).then(
    () => null,
    (e: unknown) => e as ProtocolError,
  );
  t.equal(closed?.code, 'EFDFERRY_CLOSED', 'a flow socket closed before its first packet is refused');
  binding.closeAll(closed?.fds ?? []);
  t.equal((await status()).flowCounters.refused, cases.length + 1, 'every refusal is counted');
  t.equal((await status()).pending, 0, 'nothing is left pending');
});

t.test('bad packets on a running flow are dropped and counted; the flow and the daemon go on', async (t) => {
  const { client, dropCounts } = await setup(t);
  const flow = new HandFlow('10.9.0.4', '198.51.100.9', 40_001, 8080);
  const { upgraded } = await flow.handshake(client);
  t.teardown(() => upgraded.socket.destroy());
  const received: Buffer[] = [];
  upgraded.socket.on('data', (chunk) => received.push(chunk));

  const good = flow.packet(PSH | ACK, Buffer.from('GOOD'));
  const badChecksum = flow.packet(PSH | ACK, Buffer.from('EVIL'));
  badChecksum[badChecksum.length - 1] ^= 0x55;
  const truncated = Buffer.concat([flow.packet(PSH | ACK, Buffer.from('CUT!')).subarray(0, 44)]);
  truncated.writeUInt16BE(100, 2); // says 100 bytes, has 44
  const wrongTuple = tcpPacket({ src: flow.src, dst: flow.dst, sport: flow.sport + 1, dport: flow.dport, seq: flow.seq, ack: flow.ack, flags: PSH | ACK, payload: Buffer.from('SPOOF') });
  const fragment = flow.packet(PSH | ACK, Buffer.from('FRAG'), { fragment: 0x2000 });
  const udp = udpPacket({ src: flow.src, dst: flow.dst, sport: flow.sport, dport: flow.dport, payload: Buffer.from('UDP') });
  const garbage = Buffer.from([0x90, 1, 2, 3]);
  const before = await dropCounts();
  for (const packet of [badChecksum, truncated, wrongTuple, fragment, udp, garbage]) flow.send(packet);
  flow.send(good);
  t.ok(await eventually(() => Buffer.concat(received).toString() === 'GOOD'), 'only the good segment reached the socket');
  const after = await dropCounts();
  const delta = (reason: string) => (after[reason] ?? 0) - (before[reason] ?? 0);
  t.same(
    { badChecksum: delta('badChecksum'), truncated: delta('truncated'), wrongTuple: delta('wrongTuple'), fragment: delta('fragment'), notTcp: delta('notTcp'), badVersion: delta('badVersion') },
    { badChecksum: 1, truncated: 1, wrongTuple: 1, fragment: 1, notTcp: 1, badVersion: 1 },
    'each bad packet is counted under its reason',
  );
  // The daemon still upgrades new flows, IPv6 this time.
  const six = new HandFlow('fd00:9::2', '2001:db8::77', 50_000, 443);
  const { upgraded: upgraded6, synAck } = await six.handshake(client);
  t.teardown(() => upgraded6.socket.destroy());
  t.ok(synAck.checksumsValid, 'an IPv6 flow is upgraded after all that');
  t.equal(upgraded6.socket.localAddress, 'fd00:bb::1');
  t.same(upgraded6.tuple, { family: 6, clientAddress: 'fd00:9::2', clientPort: 50_000, destinationAddress: '2001:db8::77', destinationPort: 443 });
});

t.test('a flow survives a reload: its slot, its NAT and its packets waiting in the socket move to the successor', async (t) => {
  const { daemon, client, status } = await setup(t);
  const generations = new Generations(t, daemon.pid);
  const flow = new HandFlow('10.9.0.5', '198.51.100.10', 40_002, 443);
  const { upgraded } = await flow.handshake(client);
  t.teardown(() => upgraded.socket.destroy());
  const received: Buffer[] = [];
  upgraded.socket.on('data', (chunk) => received.push(chunk));
  const before = await status();
  const result = await reload('bumblebee', daemon.socket);
  t.equal(result.report.ok, true, `the reload succeeded (${JSON.stringify(result.report.failure ?? {})})`);
  generations.add(result.report.newPid!);
  t.equal(result.report.tasks, 1, 'one flow travelled');
  const after = await status();
  t.not(after.pid, before.pid, 'a new process answers');
  t.equal(after.flows, 1, 'it holds the flow');
  flow.send(flow.packet(PSH | ACK, Buffer.from('after the reload')));
  t.ok(await eventually(() => Buffer.concat(received).toString() === 'after the reload'), 'client data still reaches the socket');
  flow.seq += 'after the reload'.length;
  upgraded.socket.write('still here');
  let reply: ParsedSegment;
  do reply = await flow.next('data after the reload');
  while (reply.payload.length === 0);
  t.equal(reply.payload.toString(), 'still here', 'server data still reaches the flow socket');
  const next = new HandFlow('10.9.0.6', '198.51.100.10', 40_003, 443);
  const second = await next.handshake(client);
  t.teardown(() => second.upgraded.socket.destroy());
  t.not(second.upgraded.internal.port === upgraded.internal.port && second.upgraded.internal.address === upgraded.internal.address, true, 'the successor never hands out the slot in use');
});

t.test('slots: a freed internal tuple waits out TIME_WAIT before reuse; idle flows are ended', async (t) => {
  // Three slots, of which slot 0 is never used: two flows at once.
  const { client, status } = await setup(t, ['--slots', '3', '--flow-idle-timeout', '400']);
  const first = new HandFlow('10.9.1.1', '198.51.100.20', 1000, 80);
  const second = new HandFlow('10.9.1.2', '198.51.100.20', 1000, 80);
  const a = await first.handshake(client);
  const b = await second.handshake(client);
  t.teardown(() => {
    a.upgraded.socket.destroy();
    b.upgraded.socket.destroy();
  });
  t.not(a.upgraded.internal.port, b.upgraded.internal.port, 'two flows, two internal tuples');
  const refuse = async (what: string) => {
    const third = new HandFlow('10.9.1.3', '198.51.100.20', 1000, 80);
    third.send(third.packet(SYN));
    const error = await client.upgrade(third.theirs).then(
      () => null,
      (e: unknown) => e as ProtocolError,
    );
    t.equal(error?.code, 'EFDFERRY_SLOTS', `${what}: EFDFERRY_SLOTS`);
    t.equal(error?.fds.length, 1, `${what}: the flow socket comes back`);
    binding.closeAll(error?.fds ?? []);
    third.ours.socket.close();
  };
  await refuse('both slots in use');
  // Neither flow sends anything: the idle timeout ends both, and their slots go to quarantine.
  t.ok(await until(async () => (await status()).flows === 0), 'idle flows are ended');
  const counters = (await status()).flowCounters;
  t.equal(counters['ended_idle-timeout'], 2, 'as idle-timeout');
  t.equal((await status()).environments[0].slotsInQuarantine, 2, 'their slots are in quarantine');
  await refuse('every free slot still in TIME_WAIT quarantine');
});

t.test('--environments 2: flows spread over two namespaces, and a reload carries both', async (t) => {
  const { daemon, client, status } = await setup(t, ['--environments', '2']);
  const generations = new Generations(t, daemon.pid);
  const flows = [0, 1, 2, 3].map((i) => new HandFlow(`10.9.2.${i + 1}`, '198.51.100.30', 5000, 443));
  const upgraded: Array<Awaited<ReturnType<HandFlow['handshake']>>['upgraded']> = [];
  for (const flow of flows) upgraded.push((await flow.handshake(client)).upgraded);
  t.teardown(() => upgraded.forEach((u) => u.socket.destroy()));
  t.same(upgraded.map((u) => u.environment).sort(), [1, 1, 2, 2], 'two flows in each environment');
  const inodes = new Set(upgraded.map((u) => binding.socketNamespaceInode((u.socket as unknown as { _handle: { fd: number } })._handle.fd)));
  t.equal(inodes.size, 2, 'in two distinct network namespaces');
  const { report } = await reload('bumblebee', daemon.socket);
  t.equal(report.ok, true, 'a reload');
  generations.add(report.newPid!);
  t.same((await status()).environments.map((e: { id: number; flows: number }) => [e.id, e.flows]), [[1, 2], [2, 2]], 'the successor has both environments and their flows');
  const received: Buffer[] = [];
  upgraded[3]!.socket.on('data', (chunk) => received.push(chunk));
  flows[3]!.send(flows[3]!.packet(PSH | ACK, Buffer.from('second namespace')));
  t.ok(await eventually(() => Buffer.concat(received).toString() === 'second namespace'), 'a flow of the second environment still carries data');
});

t.test('out of fds while accepting: the handshake waits in the backlog, the daemon says so, and the upgrade completes once fds free up', async (t) => {
  const { daemon, client } = await setup(t);
  const limits = /^Max open files\s+(\d+)\s+(\d+)/m.exec(fs.readFileSync(`/proc/${daemon.pid}/limits`, 'utf8'))!;
  const restore = () => void spawnSync('prlimit', ['--pid', String(daemon.pid), `--nofile=${limits[1]}:${limits[2]}`]);
  t.teardown(restore);
  // Room for the flow socket the request brings, none for the socket accept() would make.
  t.equal(spawnSync('prlimit', ['--pid', String(daemon.pid), `--nofile=${daemon.openFds() + 1}:${limits[2]}`]).status, 0, 'lowered the daemon\'s fd limit');
  const flow = new HandFlow('10.9.3.1', '198.51.100.40', 6000, 443);
  const upgrade = flow.handshake(client);
  const warning = await daemon.waitForLog((line) => String(line.msg).startsWith('out of file descriptors: handshakes wait in the listen backlog'));
  t.match(warning, { code: 'EMFILE', levelValue: 40 }, 'the daemon warns, naming EMFILE');
  restore();
  const { upgraded } = await withDeadline(upgrade, 10_000, 'the upgrade once fds are back');
  t.teardown(() => upgraded.socket.destroy());
  t.equal(upgraded.tuple.clientAddress, '10.9.3.1', 'the waiting handshake was accepted and handed over');
});

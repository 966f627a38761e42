/**
 * An in-memory stand-in for the native addon, so protocol, server and client logic is tested without
 * root and without a compiled addon.
 *
 * Sockets are fake fd numbers (from 100000 up, never a real fd) joined in pairs; sending copies the
 * bytes and "duplicates" each fd (a new number for the same object), delivering on `setImmediate` as a
 * real event loop would. memfds are real temporary files, so the codec's `fs` calls work on them; their
 * seals are tracked here. The fake counts open fds so tests can assert nothing leaked.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type {
  FdDescription,
  NativeBinding,
  PeerCredentials,
  SeqpacketCallbacks,
  SeqpacketListener,
  SeqpacketSocket,
} from '../../lib/native.js';

/** One end of a fake socket pair (or a listener); several fds may refer to it after `dup`. */
interface SocketEnd {
  kind: 'seqpacket';
  /** The socket reading this end's inbox, once opened. */
  socket: FakeSocket | null;
  inbox: Array<{ data: Buffer; fds: number[] }>;
  /** Credentials of the process holding this end. */
  creds: PeerCredentials;
  peer: SocketEnd | null;
  listenerPath?: string;
}

type FakeObject = SocketEnd | { kind: 'described'; description: FdDescription };

const constants = {
  F_SEAL_SEAL: 1,
  F_SEAL_SHRINK: 2,
  F_SEAL_GROW: 4,
  F_SEAL_WRITE: 8,
  AF_UNIX: 1,
  SOCK_STREAM: 1,
  SOCK_SEQPACKET: 5,
  MAX_FRAME: 65536,
};

class FakeSocket implements SeqpacketSocket {
  fd: number;
  queued = 0;
  reading = true;
  #owner: FakeBinding;
  #end: SocketEnd;
  #callbacks: SeqpacketCallbacks;
  constructor(owner: FakeBinding, fd: number, end: SocketEnd, callbacks: SeqpacketCallbacks) {
    this.#owner = owner;
    this.#end = end;
    this.fd = fd;
    this.#callbacks = callbacks;
    end.socket = this;
    setImmediate(() => this.pump());
  }
  send(data: Uint8Array, fds: number[]): boolean {
    if (this.fd < 0) throw Object.assign(new Error('send EBADF'), { code: 'EBADF', errno: -9, syscall: 'sendmsg' });
    if (fds.length > 253) throw Object.assign(new Error('too many fds'), { code: 'EFDFERRY_TOOMANYFDS' });
    const peer = this.#end.peer;
    if (!peer) throw Object.assign(new Error('sendmsg EPIPE'), { code: 'EPIPE', errno: -32, syscall: 'sendmsg' });
    peer.inbox.push({ data: Buffer.from(data), fds: fds.map((fd) => this.#owner.dup(fd)) });
    setImmediate(() => peer.socket?.pump());
    return true;
  }
  pump(): void {
    while (this.fd >= 0 && this.reading && this.#end.inbox.length) {
      const { data, fds } = this.#end.inbox.shift()!;
      if (data.length > constants.MAX_FRAME) {
        this.#owner.closeAll(fds);
        this.#callbacks.message(data.subarray(0, constants.MAX_FRAME), [], { ctrunc: false, trunc: true });
      } else {
        this.#callbacks.message(data, fds, null);
      }
    }
    if (this.fd >= 0 && this.#end.inbox.length === 0 && this.#end.peer === null) {
      this.#detach();
      this.#callbacks.close(null);
    }
  }
  setReading(reading: boolean): void {
    this.reading = reading;
    if (reading) setImmediate(() => this.pump());
  }
  peerCredentials(): PeerCredentials {
    return this.#end.peer?.creds ?? { pid: 0, uid: 0, gid: 0 };
  }
  close(): void {
    if (this.fd < 0) return;
    this.#detach();
  }
  #detach(): void {
    const fd = this.fd;
    this.fd = -1;
    this.#owner.closeAll([fd]);
  }
  unref(): void {}
  ref(): void {}
}

/** The fake addon; `openFds` counts what is open so tests can check for leaks. */
export class FakeBinding implements NativeBinding {
  readonly constants = constants;
  readonly #objects = new Map<number, FakeObject>();
  readonly #refs = new Map<FakeObject, number>();
  readonly #memfds = new Map<number, { seals: number; path: string }>();
  readonly #listeners = new Map<string, { onConnection: (error: Error | null, fd: number) => void; accepting: boolean }>();
  #nextFd = 100_000;
  #tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'fdferry-fake-'));
  /** Credentials the next connecting client presents. */
  clientCredentials: PeerCredentials = { pid: 4242, uid: 1000, gid: 1000 };
  /** Credentials of the listening side. */
  serverCredentials: PeerCredentials = { pid: process.pid, uid: 0, gid: 0 };

  get openFds(): number {
    return this.#objects.size + this.#memfds.size;
  }

  objectOf(fd: number): FakeObject {
    const object = this.#objects.get(fd);
    if (!object) throw Object.assign(new Error(`EBADF ${fd}`), { code: 'EBADF', errno: -9, syscall: 'fake' });
    return object;
  }

  #install(object: FakeObject): number {
    const fd = this.#nextFd++;
    this.#objects.set(fd, object);
    this.#refs.set(object, (this.#refs.get(object) ?? 0) + 1);
    return fd;
  }

  /** A fake fd of any description (a "regular file", a "TCP socket"...). */
  makeDescribed(description: FdDescription): number {
    return this.#install({ kind: 'described', description });
  }

  #pairEnds(firstCreds: PeerCredentials, secondCreds: PeerCredentials): [number, number] {
    const first: SocketEnd = { kind: 'seqpacket', socket: null, inbox: [], creds: firstCreds, peer: null };
    const second: SocketEnd = { kind: 'seqpacket', socket: null, inbox: [], creds: secondCreds, peer: first };
    first.peer = second;
    return [this.#install(first), this.#install(second)];
  }

  seqpacketListen(address: string): number {
    if (this.#listeners.has(address)) throw Object.assign(new Error('bind EADDRINUSE'), { code: 'EADDRINUSE' });
    const fd = this.#install({ kind: 'seqpacket', socket: null, inbox: [], creds: this.serverCredentials, peer: null, listenerPath: address });
    this.#listeners.set(address, { onConnection: () => undefined, accepting: false });
    return fd;
  }

  seqpacketConnect(address: string): number {
    const listener = this.#listeners.get(address);
    if (!listener?.accepting) throw Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED', errno: -111 });
    const [client, server] = this.#pairEnds(this.clientCredentials, this.serverCredentials);
    setImmediate(() => listener.onConnection(null, server));
    return client;
  }

  seqpacketPair(): [number, number] {
    return this.#pairEnds(this.serverCredentials, this.serverCredentials);
  }

  streamPair(): [number, number] {
    const description: FdDescription = { kind: 'socket', family: 1, type: 1, protocol: 0, listening: false, connected: true };
    return [this.makeDescribed(description), this.makeDescribed(description)];
  }

  openSeqpacket(fd: number, callbacks: SeqpacketCallbacks): SeqpacketSocket {
    const object = this.objectOf(fd);
    if (object.kind !== 'seqpacket' || object.listenerPath) throw new Error('not a connected fake seqpacket');
    return new FakeSocket(this, fd, object, callbacks);
  }

  openListener(fd: number, onConnection: (error: Error | null, fd: number) => void): SeqpacketListener {
    const object = this.objectOf(fd);
    if (object.kind !== 'seqpacket' || !object.listenerPath) throw new Error('not a fake listener');
    const address = object.listenerPath;
    const entry = this.#listeners.get(address)!;
    entry.onConnection = onConnection;
    entry.accepting = true;
    const self = this;
    return {
      fd,
      setAccepting: (accepting) => {
        entry.accepting = accepting;
      },
      close() {
        if (this.fd < 0) return;
        self.#listeners.delete(address);
        self.closeAll([fd]);
        (this as { fd: number }).fd = -1;
      },
      ref() {},
      unref() {},
    };
  }

  memfdCreate(name: string): number {
    const file = path.join(this.#tmp, `${name}-${this.#nextFd++}`);
    const fd = fs.openSync(file, 'w+');
    this.#memfds.set(fd, { seals: 0, path: file });
    return fd;
  }

  memfdSeal(fd: number): void {
    const memfd = this.#memfds.get(fd);
    if (!memfd) throw Object.assign(new Error('fcntl EINVAL'), { code: 'EINVAL' });
    memfd.seals = 15;
  }

  memfdSeals(fd: number): number {
    const memfd = this.#memfds.get(fd);
    if (!memfd) throw Object.assign(new Error('fcntl EINVAL'), { code: 'EINVAL', errno: -22, syscall: 'fcntl' });
    return memfd.seals;
  }

  /** Marks a fake memfd with exactly `seals` (to forge unsealed bodies). */
  setSeals(fd: number, seals: number): void {
    this.#memfds.get(fd)!.seals = seals;
  }

  dup(fd: number): number {
    const memfd = this.#memfds.get(fd);
    if (memfd) {
      const copy = fs.openSync(memfd.path, 'r+');
      this.#memfds.set(copy, { ...memfd });
      return copy;
    }
    return this.#install(this.objectOf(fd));
  }

  close(fd: number): void {
    const memfd = this.#memfds.get(fd);
    if (memfd) {
      this.#memfds.delete(fd);
      fs.closeSync(fd);
      return;
    }
    const object = this.objectOf(fd);
    this.#objects.delete(fd);
    const refs = this.#refs.get(object)! - 1;
    this.#refs.set(object, refs);
    if (refs === 0 && object.kind === 'seqpacket') {
      this.closeAll(object.inbox.flatMap((message) => message.fds));
      object.inbox.length = 0;
      const peer = object.peer;
      if (peer) {
        // Last reference gone: the peer sees EOF, like a real socket.
        peer.peer = null;
        object.peer = null;
        setImmediate(() => peer.socket?.pump());
      }
    }
  }

  closeAll(fds: readonly number[]): void {
    for (const fd of fds) {
      try {
        this.close(fd);
      } catch {
        // cleanup path: already closed is fine
      }
    }
  }

  describeFd(fd: number): FdDescription {
    if (this.#memfds.has(fd)) return { kind: 'file', size: fs.fstatSync(fd).size };
    const object = this.objectOf(fd);
    if (object.kind === 'described') return object.description;
    return { kind: 'socket', family: 1, type: 5, protocol: 0, listening: !!object.listenerPath, connected: !!object.peer };
  }

  tcpInfo(): never {
    throw Object.assign(new Error('getsockopt EOPNOTSUPP'), { code: 'EOPNOTSUPP' });
  }

  setNonblocking(): void {}

  reserveFdTable(): boolean {
    return true;
  }

  datagramSocket(): never {
    throw new Error('the fake binding has no datagram sockets');
  }

  datagramBind(): never {
    throw new Error('the fake binding has no datagram sockets');
  }

  datagramSend(): never {
    throw new Error('the fake binding has no datagram sockets');
  }

  pendingBytes(): number {
    return 0;
  }
  // Bumblebee's native parts need namespaces and tun devices: they have no fake, and unit tests of its
  // logic inject their own stand-ins.
  createNetworkEnvironment(): never {
    throw new Error('FakeBinding: no network environments');
  }
  checkNetworkEnvironment(): never {
    throw new Error('FakeBinding: no network environments');
  }
  openTunInNamespace(): never {
    throw new Error('FakeBinding: no tun devices');
  }
  socketNamespaceInode(): never {
    throw new Error('FakeBinding: no namespaces');
  }
  createUpgradePump(): never {
    throw new Error('FakeBinding: no upgrade pump');
  }
  createOnRamp(): never {
    throw new Error('FakeBinding: no on-ramp');
  }
  netlinkOpen(): never {
    throw new Error('FakeBinding: no netlink sockets; Fish host-network tests inject their own');
  }
  netlinkRequest(): never {
    throw new Error('FakeBinding: no netlink sockets; Fish host-network tests inject their own');
  }
  netlinkReceive(): never {
    throw new Error('FakeBinding: no netlink sockets; slice guard tests inject their own');
  }
  netlinkSetReceiveBuffer(): never {
    throw new Error('FakeBinding: no netlink sockets; slice guard tests inject their own');
  }
  openPersistentTun(): never {
    throw new Error('FakeBinding: no tun devices');
  }
  unpersistTun(): never {
    throw new Error('FakeBinding: no tun devices');
  }
  createFishPump(): never {
    throw new Error('FakeBinding: no Fish pump');
  }
  createSpliceEngine(): never {
    throw new Error('the fake binding has no splice engine; Splicer tests use the real addon');
  }

  /** Removes the temporary directory of fake memfds. */
  dispose(): void {
    fs.rmSync(this.#tmp, { recursive: true, force: true });
  }
}

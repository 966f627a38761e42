/**
 * The typed boundary of Bumblebee's native parts: network environments made on a dedicated thread
 * (native/netns.cc), the upgrade pump that NATs flows onto a tun (native/upgrade_pump.cc), and the
 * on-ramp demultiplexer that splits a tun into one SOCK_SEQPACKET socket per TCP flow, with an optional
 * catch-all sink socket for the rest (native/onramp.cc).
 *
 * None of these ever runs on the JavaScript thread or a libuv pool thread: namespaces are per thread,
 * and packets are far too many for a JS callback each.
 */

/** How an anonymous network environment is built (see docs/bumblebee.md for the defaults). */
export interface NetworkEnvironmentOptions {
  /** Tun device name inside the namespace. */
  tunName: string;
  mtu: number;
  txQueueLength: number;
  /** The tun's IPv4 address; the listener binds it. */
  address4: string;
  prefix4: number;
  /** The tun's IPv6 address (added with IFA_F_NODAD over rtnetlink); the IPv6 listener binds it. */
  address6: string;
  prefix6: number;
  /** Port both listeners bind. */
  listenPort: number;
  /** listen(2) backlog, and somaxconn/tcp_max_syn_backlog in the namespace. */
  backlog: number;
}

/** The fds of one environment; they keep the namespace (and the non-persistent tun) alive. */
export interface NetworkEnvironmentFds {
  netnsFd: number;
  tunFd: number;
  listener4Fd: number;
  listener6Fd: number;
  /** Inode of the namespace (`/proc/thread-self/ns/net`), to tell namespaces apart. */
  netnsInode: number;
  ifindex: number;
}

/** An environment re-entered from a new thread after a hand-over. */
export interface NetworkEnvironmentCheck {
  netnsInode: number;
  /** SIOCGIFFLAGS of the tun, seen from inside the namespace. */
  tunFlags: number;
}

/** One environment as the pump knows it: its fds and its NAT addresses. */
export interface PumpEnvironment {
  id: number;
  tunFd: number;
  listener4Fd: number;
  listener6Fd: number;
  /** Listener addresses and port, the NAT destination of every client packet. */
  listener4: string;
  listener6: string;
  listenPort: number;
  /** First internal peer address of each family; slot `i` maps to pool + floor(i / 60000), port 2000 + i % 60000. */
  pool4: string;
  pool6: string;
  /** Slots in this environment (internal tuples), index 0 unused. */
  slots: number;
}

/** Pump-wide settings. */
export interface UpgradePumpOptions {
  /** Lower SYN and SYN-ACK MSS options to this (0 = leave them). */
  mssClamp: number;
  /** A flow with no packet either way for this long is ended (0 = never). */
  flowIdleTimeoutMs: number;
  /** An upgrade whose handshake has not been accepted by then is refused (EFDFERRY_TIMEOUT). */
  upgradeTimeoutMs: number;
  /** A freed internal tuple is not reused before this (TIME_WAIT is 60 s). */
  slotQuarantineMs: number;
  /** Verify IPv4 header and TCP checksums of client packets, so bad ones are counted, not silently lost. */
  verifyChecksums: boolean;
  /** Keepalive and TCP_USER_TIMEOUT set on accepted sockets so they fail fast if Bumblebee dies (0 = leave). */
  keepaliveIdleS: number;
  keepaliveIntervalS: number;
  keepaliveCount: number;
  userTimeoutMs: number;
}

/** A client flow's addresses, as its first packet (the SYN) had them. */
export interface FlowTuple {
  family: 4 | 6;
  clientAddress: string;
  clientPort: number;
  destinationAddress: string;
  destinationPort: number;
}

/** The internal (NATed) end of a flow, as the accepted socket sees its peer. */
export interface InternalTuple {
  address: string;
  port: number;
  listenerAddress: string;
  listenerPort: number;
}

/** What the pump reports, in batches, from its thread. */
export type PumpEvent =
  /** The kernel accepted the flow's handshake; `fd` (the TCP socket) is the caller's now. */
  | { type: 'accepted'; flowId: number; fd: number; slot: number; tuple: FlowTuple; internal: InternalTuple }
  /** The upgrade could not start or finish; the flow fd is the caller's again, untouched by the pump. */
  | { type: 'rejected'; flowId: number; code: string; message: string }
  /** Something an operator must hear about (the pump ran out of fds while accepting), at most every 10 s. */
  | { type: 'notice'; flowId: number; code: string; message: string }
  /** A running flow ended (its socket closed, errored or idled out); the flow fd is the caller's again. */
  | { type: 'ended'; flowId: number; reason: 'closed' | 'error' | 'idle-timeout' | 'cancelled'; errno: number; code: string | null };

/** A flow taken off the pump by `pause`, enough to resume it here or in a successor. */
export interface PausedFlow {
  flowId: number;
  environmentId: number;
  fd: number;
  slot: number;
  tuple: FlowTuple;
  packetsIn: number;
  packetsOut: number;
  idleMs: number;
}

/** Everything `pause` hands out: the flows and the slots still in quarantine. */
export interface PausedPump {
  flows: PausedFlow[];
  /** Recently freed slots per environment with how long ago (ms), so a successor does not reuse them early. */
  quarantine: { environmentId: number; slot: number; ageMs: number }[];
  /** Round-robin position of each environment's slot allocator. */
  cursors: { environmentId: number; next: number }[];
}

/** Per-environment counters. */
export interface PumpEnvironmentStats {
  id: number;
  flows: number;
  pending: number;
  slotsInQuarantine: number;
  slots: number;
  packetsToKernel: number;
  packetsToClient: number;
  bytesToKernel: number;
  bytesToClient: number;
  accepted: number;
  orphans: number;
  /** Drops by reason: malformed kinds, wrong tuple, unknown slot, full buffers. */
  drops: Record<string, number>;
}

/** One flow in `snapshot`. */
export interface PumpFlowRow {
  flowId: number;
  environmentId: number;
  slot: number;
  state: 'handshake' | 'established';
  tuple: FlowTuple;
  packetsIn: number;
  packetsOut: number;
  idleMs: number;
}

/** The upgrade pump (native/upgrade_pump.cc). */
export interface UpgradePump {
  addEnvironment(environment: PumpEnvironment): void;
  /** Starts an upgrade: the pump borrows `fd` until the flow's `accepted`/`rejected` and `ended`. */
  upgrade(flowId: number, environmentId: number, fd: number): void;
  /** Ends a flow ('cancelled'); false if unknown. */
  end(flowId: number): boolean;
  snapshot(): PumpFlowRow[];
  stats(): PumpEnvironmentStats[];
  /** Stops pumping (nothing is read from a tun or flow after this returns) and hands every flow out. */
  pause(): PausedPump;
  /** Resumes paused flows (rollback) or imported ones (successor), with their slots and quarantine. */
  resume(paused: PausedPump): void;
  /** Reports events already queued now instead of on the next loop turn. */
  flush(): void;
  /** Stops the thread; flows are not reported (the caller owns their fds anyway). */
  close(): void;
}

/** A TCP flow the on-ramp saw start (its first SYN); `fd` is the Bumblebee end of its packet socket. */
export interface OnRampFlow {
  flowId: number;
  fd: number;
  tuple: FlowTuple;
}

/** On-ramp settings. */
export interface OnRampOptions {
  /** How long after FIN both ways, or an RST, the flow's packet socket is closed (late ACKs still pass). */
  closeDelayMs: number;
  /** A flow with no packet either way for this long is closed (0 = never). */
  idleTimeoutMs: number;
  /**
   * A SOCK_SEQPACKET socket (borrowed: the on-ramp never closes it; close it after `close()`) that receives,
   * one message each, every packet the on-ramp does not demultiplex (non-TCP, fragments, malformed), and
   * whose messages are written to the tun as they are. Without it those packets are dropped and counted.
   */
  sinkFd?: number;
  /**
   * Whether TCP is split into one socket per flow (default true). False sends TCP to the sink too, so one
   * socket carries all of the client's packets, as a Fish registration wants; it needs `sinkFd`.
   */
  demultiplexTcp?: boolean;
  /**
   * Flows to adopt, as a paused on-ramp's `pause()` gave them (a predecessor process's, for a hand-over):
   * the loop starts relaying them at once. Their fds are the on-ramp's from the call on, even if it throws
   * after checking them. Every fd must be a SOCK_SEQPACKET socket.
   */
  flows?: PausedOnRampFlow[];
  /** The id the next new flow gets (a successor carries on its predecessor's numbering). */
  nextFlowId?: number;
}

/** One flow of a paused on-ramp: our end of its packet socket and what the loop tracked of it. */
export interface PausedOnRampFlow {
  flowId: number;
  /** The on-ramp's end of the flow's packet socket (Bumblebee holds the other end). */
  fd: number;
  tuple: FlowTuple;
  /** Milliseconds since the flow's last packet, as of the pause (the idle timeout carries on from there). */
  idleMs: number;
  /** Milliseconds left of the close delay (FIN both ways or an RST seen); -1 while the flow is open. */
  closeInMs: number;
  finFromClient: boolean;
  finFromServer: boolean;
  rst: boolean;
}

/** What `pause()` hands out: everything needed to resume here or in another process. */
export interface PausedOnRamp {
  flows: PausedOnRampFlow[];
  /**
   * Flows whose Bumblebee end had been made but not yet delivered to `onFlows`: the caller owns their fds
   * now, exactly as if they had been delivered (their on-ramp ends are in `flows`).
   */
  pending: OnRampFlow[];
  nextFlowId: number;
}

/** On-ramp counters. */
export interface OnRampStats {
  flows: number;
  flowsTotal: number;
  packetsFromTun: number;
  /** Packets written to the tun, from flow sockets and from the sink. */
  packetsToTun: number;
  /** Packets sent into the sink (0 without one). */
  packetsToSink: number;
  /** Messages received from the sink, whether or not the tun took them. */
  packetsFromSink: number;
  /** The sink's peer closed it, so the on-ramp stopped reading it (sends to it now count as sinkError). */
  sinkEof: boolean;
  /**
   * Drops by reason: notTcp, noFlow (a non-SYN for an unknown flow), malformed kinds, full sockets;
   * sinkFull / sinkError (tun -> sink send failed), sinkReadError (the sink failed and is no longer read).
   */
  drops: Record<string, number>;
}

/** The on-ramp demultiplexer (native/onramp.cc): a client tun split into one packet socket per TCP flow. */
export interface OnRamp {
  stats(): OnRampStats;
  /**
   * Stops reading the tun, the sink and every flow, without closing anything, and hands out every flow
   * (the caller owns their fds from here). Packets meanwhile wait in the kernel's queues. After it: `resume`
   * (rollback), or `close` and a new on-ramp with `flows` in another process (hand-over).
   */
  pause(): PausedOnRamp;
  /** Restarts a paused on-ramp with `paused.flows` (their fds are the on-ramp's again). */
  resume(paused: Pick<PausedOnRamp, 'flows' | 'nextFlowId'>): void;
  close(): void;
}

/** The native calls Bumblebee needs; part of {@link NativeBinding}. */
export interface BumblebeeBinding {
  /** Builds an anonymous network environment on a dedicated thread (unshare), and returns its fds. */
  createNetworkEnvironment(options: NetworkEnvironmentOptions): NetworkEnvironmentFds;
  /** Re-enters an environment from a new thread (setns) and checks its tun; throws if it cannot. */
  checkNetworkEnvironment(netnsFd: number, tunName: string): NetworkEnvironmentCheck;
  /** Opens an existing (persistent) tun inside the namespace at `netnsPath`, from a dedicated thread. */
  openTunInNamespace(netnsPath: string, tunName: string): number;
  /** Inode of the network namespace a socket belongs to (SIOCGSKNS). */
  socketNamespaceInode(fd: number): number;
  createUpgradePump(options: UpgradePumpOptions, onEvents: (events: PumpEvent[]) => void): UpgradePump;
  createOnRamp(tunFd: number, options: OnRampOptions, onFlows: (flows: OnRampFlow[]) => void): OnRamp;
}

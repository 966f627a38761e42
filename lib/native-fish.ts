/**
 * The typed boundary of Fish's native parts: the egress pump that NATs registrations' packets onto a
 * persistent tun and reserves every new five-tuple in conntrack (native/fish_pump.cc), the raw netlink
 * socket the control plane speaks rtnetlink and ctnetlink over (native/netlink.cc), and the persistent
 * tun itself (native/tun.cc).
 *
 * The pump runs on its own epoll thread: packets never cross into JavaScript, and a new flow's
 * reservation (an exclusive ctnetlink create) is built and sent there too, so a new UDP flow never waits
 * for the JS thread (DESIGN §2). Netlink requests from JS are control-plane only (rules, routes, flushes,
 * dumps) and are synchronous: each is one kernel round trip of microseconds.
 */

/** Transport protocols a registration may use. */
export type FishProtocol = 'tcp' | 'udp' | 'icmp';

/** Pump-wide settings. */
export interface FishPumpOptions {
  /** The persistent tun (fish0) in the daemon's namespace; the pump borrows it and sets O_NONBLOCK. */
  tunFd: number;
  /** A mapping's conntrack mark is `markBase | rid` (notes/fish-kernel.md §7: 0xF15E0000). */
  markBase: number;
  /** Lower the MSS option of SYNs and SYN-ACKs to this for IPv4, 20 less for IPv6 (0 = leave them). */
  mssClamp: number;
  /** CTA_TIMEOUT, in seconds, of a fresh reservation per protocol (the tracker takes over once packets flow). */
  reserveTimeoutS: Record<FishProtocol, number>;
  /** A mapping with no packet either way for this long is forgotten by the pump (its port may then be reused). */
  idleTimeoutMs: Record<FishProtocol, number>;
  /** A mapping idle longer than this is looked up in conntrack (CT_GET) before its next packet leaves. */
  revalidateAfterMs: number;
  /** Verify IPv4 header and L4 checksums of client packets, so corrupt ones are counted rather than forwarded. */
  verifyChecksums: boolean;
  /**
   * Fragments are reassembled (per registration on egress, from the tun on return) and the whole datagram is
   * NATed. A datagram not complete this long after its first fragment is dropped (`fragmentTimeout`). 5000.
   */
  fragmentTimeoutMs?: number;
  /**
   * Datagrams in reassembly at once, per direction (a quarter of it per registration); past it
   * `fragmentTableFull`. 1024.
   */
  fragmentEntries?: number;
  /** Bytes held for reassembly, per direction; past it `fragmentTableFull`. 4 MiB. */
  fragmentBytes?: number;
  /**
   * The MTU reassembled IPv6 datagrams are split for on their way into the tun (the kernel never fragments
   * forwarded IPv6); 0 or absent: the tun device's MTU, read again every second.
   */
  tunMtu?: number;
}

/** One registration as the pump knows it. The pump borrows `fd` until `removeRegistration` or `closed`. */
export interface FishRegistration {
  /** 1..65535; the low 16 bits of the conntrack mark. */
  rid: number;
  /** The proxy's SOCK_SEQPACKET packet socket: one client IP packet per message, replies sent back on it. */
  fd: number;
  egress4: string | null;
  egress6: string | null;
  /** The slice: egress ports (and ICMP echo ids) `portLo..portHi` inclusive. */
  portLo: number;
  portHi: number;
  protocols: Record<FishProtocol, boolean>;
  /** Concurrent mappings allowed (0 = only the slice bounds it). */
  maxMappings: number;
}

/** A mapping: one client flow and the egress tuple reserved for it. */
export interface FishMapping {
  rid: number;
  protocol: FishProtocol;
  family: 4 | 6;
  clientAddress: string;
  /** For ICMP echo: the client's echo id. */
  clientPort: number;
  destinationAddress: string;
  /** 0 for ICMP echo. */
  destinationPort: number;
  egressAddress: string;
  /** For ICMP echo: the egress echo id. */
  egressPort: number;
}

/** A mapping in `mappings()`, with its traffic. */
export interface FishMappingRow extends FishMapping {
  packetsOut: number;
  packetsIn: number;
  idleMs: number;
}

/** What the pump reports, in batches, from its thread. */
export type FishEvent =
  /**
   * A new flow got no egress tuple; the client was already told (TCP RST to a SYN, ICMP
   * administratively prohibited otherwise). `suppressed` counts further refusals of the same
   * registration folded into this event (at most one event per registration per 100 ms).
   */
  | {
      type: 'exhausted';
      rid: number;
      protocol: FishProtocol;
      family: 4 | 6;
      clientAddress: string;
      clientPort: number;
      destinationAddress: string;
      destinationPort: number;
      /** `slice` (every port of the slice is taken for this destination), `limit` (maxMappings), `conntrack` (the create failed otherwise). */
      reason: 'slice' | 'limit' | 'conntrack';
      /** For `conntrack`: the errno name of the failed create. */
      code: string | null;
      suppressed: number;
    }
  /** The packet socket hung up or failed; the pump stopped reading it and `fd` is the caller's again. */
  | { type: 'closed'; rid: number; reason: 'eof' | 'error'; code: string | null }
  /** Something an operator must hear about (the tun failed, the conntrack socket overflowed). */
  | { type: 'notice'; rid: number; code: string; message: string };

/** Counters of one registration. */
export interface FishRegistrationStats {
  rid: number;
  mappings: number;
  packetsOut: number;
  packetsIn: number;
  bytesOut: number;
  bytesIn: number;
  /** Reservations made, `EEXIST` answers skipped, new flows refused. */
  reserved: number;
  collisions: number;
  exhausted: number;
  /**
   * Client packets dropped, by reason (truncated, badChecksum, protocol, icmpError, full...; fragments given up
   * in reassembly: fragmentTimeout, fragmentOverlap, fragmentTooBig, fragmentTableFull, one per fragment).
   */
  drops: Record<string, number>;
}

/** Pump-wide counters. */
export interface FishStats {
  registrations: FishRegistrationStats[];
  /** Packets read from the tun that matched no mapping or could not be parsed, by reason. */
  returnDrops: Record<string, number>;
  packetsFromTun: number;
  packetsToTun: number;
}

/** The egress pump (native/fish_pump.cc). */
export interface FishPump {
  addRegistration(registration: FishRegistration): void;
  /** Stops reading the registration's socket and forgets its mappings; false if unknown. The fd is the caller's. */
  removeRegistration(rid: number): boolean;
  /** Re-installs mappings (from a conntrack dump after a restart) without reserving them again. */
  addMappings(mappings: FishMapping[]): void;
  mappings(rid?: number): FishMappingRow[];
  stats(): FishStats;
  /** Stops reading the tun and every registration socket and returns the mappings; `resume` restarts. */
  pause(): FishMappingRow[];
  resume(): void;
  /** Reports events already queued now instead of on the next loop turn. */
  flush(): void;
  /** Stops the thread; registrations' fds stay the caller's. */
  close(): void;
}

/** A persistent tun opened (or re-attached) in the calling process's network namespace. */
export interface PersistentTun {
  fd: number;
  ifindex: number;
  /** False when a tun of that name already existed (re-attached after a crash or by a successor). */
  created: boolean;
}

/** What one `netlinkReceive` drained from an event socket. */
export interface NetlinkBatch {
  /** Whole netlink messages (header included), in arrival order, from the kernel only. */
  messages: Buffer[];
  /** The kernel dropped messages (ENOBUFS, or one too large to read): the caller must resync, e.g. by dump. */
  overflow: boolean;
  /** `maxMessages` was reached: more may be queued. */
  more: boolean;
}

/** The native calls Fish needs; part of {@link NativeBinding}. */
export interface FishBinding {
  /** `socket(AF_NETLINK, SOCK_RAW|SOCK_CLOEXEC, protocol)` bound to `groups`; the caller closes it. */
  netlinkOpen(protocol: number, groups: number): number;
  /**
   * Sends one netlink request (its nlmsghdr already filled in, seq included) and reads until its ACK, its
   * error, or the `NLMSG_DONE` of a dump; returns every reply message whole (header included), the
   * terminating ACK/DONE excluded. A netlink error throws with `code`/`errno` and `syscall: 'netlink'`.
   */
  netlinkRequest(fd: number, message: Buffer, timeoutMs: number): Buffer[];
  /**
   * Drains an event socket (opened with groups) without blocking: every message the kernel queued, up to
   * `maxMessages`. Never throws ENOBUFS: a receive queue overflow (events lost) comes back as `overflow`.
   */
  netlinkReceive(fd: number, maxMessages: number): NetlinkBatch;
  /**
   * Sets the socket's receive buffer with SO_RCVBUFFORCE (SO_RCVBUF without CAP_NET_ADMIN); returns what the
   * kernel granted (twice the request, its bookkeeping included).
   */
  netlinkSetReceiveBuffer(fd: number, bytes: number): number;
  /** Opens the tun `name` (IFF_TUN|IFF_NO_PI, TUNSETPERSIST 1), creating it if needed. */
  openPersistentTun(name: string): PersistentTun;
  /** Clears TUNSETPERSIST on an open tun, so the device goes away when its last fd closes. */
  unpersistTun(fd: number): void;
  createFishPump(options: FishPumpOptions, onEvents: (events: FishEvent[]) => void): FishPump;
}

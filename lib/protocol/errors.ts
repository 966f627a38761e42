/**
 * Stable, machine-readable error codes of the fdferry protocol, and the error class that carries them.
 *
 * Codes are part of the wire contract (`docs/protocol.md`): clients branch on them, so they are never
 * renamed, only added.
 */

/** Every protocol-level error code, with the one-line meaning documented for clients. */
export const ErrorCodes = {
  /** Fewer bytes than a header. */
  EFDFERRY_SHORT: 'message shorter than the 20-byte header',
  /** The first four bytes are not `FDFY`. */
  EFDFERRY_MAGIC: 'bad magic',
  /** Header or hello names a protocol version this daemon does not speak. */
  EFDFERRY_VERSION: 'unsupported protocol version',
  /** Unknown message type, or a type that is not allowed in this direction. */
  EFDFERRY_TYPE: 'unknown or unexpected message type',
  /** Unknown flag bits, or a non-zero reserved field. */
  EFDFERRY_HEADER: 'malformed header',
  /** The declared body length does not match what arrived. */
  EFDFERRY_LENGTH: 'body length mismatch',
  /** The body is larger than this daemon accepts. */
  EFDFERRY_TOOBIG: 'body too large',
  /** The number of fds that arrived differs from the header's count, or from what the method takes. */
  EFDFERRY_FDCOUNT: 'wrong number of fds',
  /** More than 253 fds (SCM_MAX_FD) would be needed in one message. */
  EFDFERRY_TOOMANYFDS: 'too many fds for one message',
  /** An fd is not of the kind the method requires (regular file where a socket is needed...). */
  EFDFERRY_FDKIND: 'wrong kind of fd',
  /** A body spilled to a memfd arrived in something that is not a memfd. */
  EFDFERRY_NOTMEMFD: 'body fd is not a memfd',
  /** A body memfd lacks one of the required seals. */
  EFDFERRY_UNSEALED: 'body memfd is not sealed',
  /** Control data was truncated (`MSG_CTRUNC`): some fds were lost in transit. */
  EFDFERRY_CTRUNC: 'fds were lost in transit (MSG_CTRUNC)',
  /** The message was larger than the maximum frame (`MSG_TRUNC`). */
  EFDFERRY_TRUNC: 'message larger than the maximum frame (MSG_TRUNC)',
  /** The body is not UTF-8 JSON of the required shape. */
  EFDFERRY_JSON: 'body is not valid JSON of the expected shape',
  /** The first request on a connection must be `hello`. */
  EFDFERRY_NOHELLO: 'hello required first',
  /** No such method. */
  EFDFERRY_METHOD: 'unknown method',
  /** Parameters failed validation. */
  EFDFERRY_INVALID: 'invalid parameters',
  /** Too many requests in progress on this connection, or the daemon is at a limit. */
  EFDFERRY_BUSY: 'busy',
  /** A quota or limit was reached (tasks, owners, mailbox). */
  EFDFERRY_LIMIT: 'limit reached',
  /** The daemon is out of file descriptors (EMFILE/ENFILE). */
  EFDFERRY_NOFDS: 'daemon is out of file descriptors',
  /** The peer is not allowed to do this. */
  EFDFERRY_DENIED: 'permission denied',
  /** No such task or event. */
  EFDFERRY_NOTFOUND: 'not found',
  /** The daemon is shutting down. */
  EFDFERRY_SHUTDOWN: 'shutting down',
  /** The request did not complete in time (client side). */
  EFDFERRY_TIMEOUT: 'timed out',
  /** The connection closed before a reply arrived (client side). */
  EFDFERRY_DISCONNECTED: 'connection closed',
  /** A hand-over state file is missing, unsealed, corrupt or of an unknown format. */
  EFDFERRY_STATE: 'bad hand-over state',
  /** A hand-over failed and was rolled back; the message says in which phase and why. */
  EFDFERRY_HANDOFF: 'hand-over failed',
  /** Bumblebee: the flow's first packet is not a TCP SYN (a flow is handed over before its handshake). */
  EFDFERRY_NOTSYN: 'first packet is not a TCP SYN',
  /** Bumblebee: the flow's first packet is not TCP (UDP, ICMP, an IPv6 extension header...). */
  EFDFERRY_NOTTCP: 'first packet is not TCP',
  /** Bumblebee: the flow's first packet is malformed (truncated, bad header, bad checksum, a fragment). */
  EFDFERRY_MALFORMED: 'malformed packet',
  /** Bumblebee: no internal tuple is free (all in use, or freed less than a TIME_WAIT ago). */
  EFDFERRY_SLOTS: 'no free NAT slot',
  /** Bumblebee: the flow socket closed or failed before the handshake completed. */
  EFDFERRY_CLOSED: 'flow closed before the handshake completed',
  /** Bumblebee: the upgrade was cancelled. */
  EFDFERRY_CANCELLED: 'cancelled',
  /** Fish: the registration id is held by another peer uid, or its slice is outside what the daemon allows. */
  EFDFERRY_CONFLICT: 'registration conflicts with another or with the daemon\'s egress policy',
  /** Fish: the host network could not be set up for a registration (a rule could not be added). */
  EFDFERRY_NETWORK: 'host network setup failed',
  /** An unexpected failure inside the daemon; the message says what. */
  EFDFERRY_INTERNAL: 'internal error',
} as const;

/** One of the protocol's stable error codes. */
export type ErrorCode = keyof typeof ErrorCodes;

/** Whether `code` is one of the protocol's codes (as opposed to a syscall code such as `EMFILE`). */
export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && Object.hasOwn(ErrorCodes, code);
}

/**
 * An error that travels on the wire as `{code, message}`. `fds` are file descriptors that belong to
 * whoever catches it: the daemon sends them back with the error reply, the client returns them to the
 * caller.
 */
export class ProtocolError extends Error {
  /** The stable code. */
  readonly code: ErrorCode;
  /** Structured context that is safe to send to the peer. */
  readonly details: Record<string, unknown> | undefined;
  /** Fds that come back with this error (the caller owns them). */
  fds: number[];
  /** The request this error answers; 0 when none could be read (a connection-level fault). */
  requestId = 0;
  /**
   * Client side: bytes already read from the returned fds (unconsumed data a `net.Socket` held when it
   * was detached), in the same order as `fds`. Deliver them before anything read from the fd.
   */
  prefaces: Buffer[] | undefined;

  constructor(code: ErrorCode, message?: string, details?: Record<string, unknown>, fds: number[] = []) {
    super(message ?? ErrorCodes[code]);
    this.name = 'ProtocolError';
    this.code = code;
    this.details = details;
    this.fds = fds;
  }
}

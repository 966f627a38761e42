/**
 * A message channel: one connected SOCK_SEQPACKET socket speaking fdferry protocol v1.
 *
 * The server's connections and the client share it, so framing, memfd bodies and receive faults are
 * handled in exactly one place. It never interprets requests; it only turns datagrams into
 * {@link Message}s and back.
 */
import { EventEmitter } from 'node:events';
import type { NativeBinding, PeerCredentials, ReceiveFault, SeqpacketSocket } from '../native.js';
import { MessageCodec, type Message } from '../protocol/codec.js';
import { ProtocolError } from '../protocol/errors.js';
import { peekRequestId } from '../protocol/frame.js';

/** The native calls a channel needs. */
export type ChannelBinding = Pick<
  NativeBinding,
  'openSeqpacket' | 'memfdCreate' | 'memfdSeal' | 'memfdSeals' | 'closeAll' | 'constants'
>;

/** Events of a {@link Channel}. */
export interface ChannelEvents {
  /** A well-formed message; the listener owns `message.fds`. */
  message: [message: Message];
  /** A message that could not be decoded; `error.fds` are the sender's fds to give back, `error.requestId` the id to answer. */
  fault: [error: ProtocolError];
  /** The send queue drained after `send` returned false. */
  drain: [];
  /** The channel closed: by the peer (error null), by a socket error, or by `close()`. Emitted once. */
  close: [error: Error | null];
}

/** A protocol channel over a connected SOCK_SEQPACKET fd, which it owns. */
export class Channel extends EventEmitter<ChannelEvents> {
  readonly #socket: SeqpacketSocket;
  readonly #codec: MessageCodec;
  readonly #binding: ChannelBinding;
  #closed = false;

  constructor(fd: number, binding: ChannelBinding, codec: MessageCodec = new MessageCodec(binding)) {
    super();
    this.#binding = binding;
    this.#codec = codec;
    this.#socket = binding.openSeqpacket(fd, {
      message: (data, fds, fault) => this.#onMessage(data, fds, fault),
      drain: () => this.emit('drain'),
      close: (error) => this.#finish(error),
    });
  }

  /** The socket's fd (for handing the whole connection to a successor), or -1 once closed. */
  get fd(): number {
    return this.#socket.fd;
  }

  /** Whether the channel is closed. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Messages waiting in the native send queue. */
  get queued(): number {
    return this.#socket.queued;
  }

  /** The codec's body limit, for the hello reply. */
  get maxBodyBytes(): number {
    return this.#codec.maxBodyBytes;
  }

  /** `SO_PEERCRED` of the peer. */
  peerCredentials(): PeerCredentials {
    return this.#socket.peerCredentials();
  }

  /**
   * Sends a message. The fds stay the caller's (the native layer duplicates them only if the message must
   * wait). Returns false when the send queue is over its high-water mark. Throws {@link ProtocolError}
   * for a message that cannot be encoded, or the socket's error.
   */
  send(message: Message): boolean {
    if (this.#closed) throw new ProtocolError('EFDFERRY_DISCONNECTED', 'the channel is closed');
    const encoded = this.#codec.encode(message);
    try {
      return this.#socket.send(encoded.frame, encoded.fds);
    } finally {
      // A queued message holds its own duplicates, so the body memfd can be closed either way.
      this.#binding.closeAll(encoded.owned);
    }
  }

  /** Stops or restarts reading; used for backpressure and to freeze a connection before a hand-over. */
  setReading(reading: boolean): void {
    if (!this.#closed) this.#socket.setReading(reading);
  }

  /** Lets the process exit while this channel is open. */
  unref(): void {
    if (!this.#closed) this.#socket.unref();
  }

  /** Keeps the process alive while this channel is open. */
  ref(): void {
    if (!this.#closed) this.#socket.ref();
  }

  /** Closes the channel and emits `close` (with null) if it was open. */
  close(): void {
    if (this.#closed) return;
    this.#socket.close();
    this.#finish(null);
  }

  #finish(error: Error | null): void {
    if (this.#closed) return;
    this.#closed = true;
    this.emit('close', error);
  }

  #onMessage(data: Buffer, fds: number[], fault: ReceiveFault | null): void {
    if (fault) {
      const error = fault.ctrunc
        ? new ProtocolError('EFDFERRY_CTRUNC', 'fds were lost in transit (MSG_CTRUNC): the receiver may be out of file descriptors')
        : new ProtocolError('EFDFERRY_TRUNC', 'message larger than the maximum frame (MSG_TRUNC)');
      error.requestId = peekRequestId(data);
      this.emit('fault', error);
      return;
    }
    let message: Message;
    try {
      message = this.#codec.decode(data, fds);
    } catch (error) {
      this.emit('fault', error as ProtocolError);
      return;
    }
    this.emit('message', message);
  }
}

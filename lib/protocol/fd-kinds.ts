/**
 * The kinds of fd a method can require, and the check of a received fd against one.
 *
 * A daemon must never trust what a peer claims an fd is: each one is inspected (`fstat`, `SO_DOMAIN`,
 * `SO_TYPE`, `SO_ACCEPTCONN`, `getpeername`) before it touches any state.
 */
import type { FdDescription } from '../native.js';

/** Fd kinds a method may require. */
export type FdKind =
  /** A connected SOCK_STREAM socket: TCP over IPv4/IPv6, or AF_UNIX. */
  | 'stream-socket'
  /** A connected AF_UNIX SOCK_SEQPACKET socket. */
  | 'seqpacket-socket'
  /** A listening socket of any family. */
  | 'listening-socket'
  /** Anything at all (an opaque fd the daemon only carries). */
  | 'any';

const AF_UNIX = 1;
const AF_INET = 2;
const AF_INET6 = 10;
const SOCK_STREAM = 1;
const SOCK_SEQPACKET = 5;

const familyName = (family: number | undefined): string =>
  family === AF_UNIX ? 'AF_UNIX' : family === AF_INET ? 'AF_INET' : family === AF_INET6 ? 'AF_INET6' : `family ${family}`;

/** A short human description of an fd, for error messages. */
export function describeForHumans(description: FdDescription): string {
  if (description.kind !== 'socket') return description.kind === 'file' ? 'a regular file' : `a ${description.kind}`;
  const type = description.type === SOCK_STREAM ? 'stream' : description.type === SOCK_SEQPACKET ? 'seqpacket' : `type ${description.type}`;
  const state = description.listening ? 'listening' : description.connected ? 'connected' : 'unconnected';
  return `a ${state} ${familyName(description.family)} ${type} socket`;
}

/** Returns why `description` is not of kind `kind`, or null when it is. */
export function fdKindMismatch(kind: FdKind, description: FdDescription): string | null {
  const is = describeForHumans(description);
  switch (kind) {
    case 'any':
      return null;
    case 'stream-socket':
      return description.kind === 'socket' &&
        description.type === SOCK_STREAM &&
        [AF_UNIX, AF_INET, AF_INET6].includes(description.family ?? -1) &&
        !description.listening &&
        description.connected
        ? null
        : `needs a connected TCP or Unix stream socket, got ${is}`;
    case 'seqpacket-socket':
      return description.kind === 'socket' &&
        description.type === SOCK_SEQPACKET &&
        description.family === AF_UNIX &&
        description.connected
        ? null
        : `needs a connected AF_UNIX seqpacket socket, got ${is}`;
    case 'listening-socket':
      return description.kind === 'socket' && description.listening ? null : `needs a listening socket, got ${is}`;
  }
}

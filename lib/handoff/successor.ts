/**
 * The new process's side of a hand-over.
 *
 * Its first act is to say its pid on the hand-over socket (so the old process can kill it if it hangs),
 * then it waits to be re-parented (systemd 252 would treat a child of the old main process as an alien),
 * says hello, receives every fd and the sealed state, checks all of it, adopts it paused, and answers
 * ready. On commit it resumes everything; the daemon then tells systemd and reports done. Before commit,
 * any failure ends this process: the old one still holds everything and rolls back.
 */
import type { Logger } from 'pino';
import type { NativeBinding } from '../native.js';
import { ProtocolError } from '../protocol/errors.js';
import { fdKindMismatch } from '../protocol/fd-kinds.js';
import { Channel } from '../rpc/channel.js';
import type { ExportedServerState, RpcServer } from '../rpc/server.js';
import { HandoffError, Inbox, sendEvent } from './channel-inbox.js';
import type { HandoffParticipant } from './participant.js';
import type { HandoffReport, Requester } from './predecessor.js';
import { HANDOFF_ENV, HANDOFF_FAULTS, type HandoffFault } from './spawn.js';
import { readStateMemfd, SUPPORTED_FORMATS } from './state-file.js';

/** What the environment says about a hand-over this process is the successor of. */
export interface SuccessorEnvironment {
  fd: number;
  parentPid: number;
  generation: number;
  fault: HandoffFault | null;
  /** About how many fds the predecessor will send. */
  expectedFds: number;
}

/** Reads (and removes, so our own successors start clean) the hand-over variables; null for a normal start. */
export function takeSuccessorEnvironment(env: NodeJS.ProcessEnv = process.env): SuccessorEnvironment | null {
  const fd = Number(env[HANDOFF_ENV.fd]);
  const parentPid = Number(env[HANDOFF_ENV.parent]);
  const generation = Number(env[HANDOFF_ENV.generation]);
  const fault = env[HANDOFF_ENV.fault] as HandoffFault | undefined;
  const expectedFds = Number(env[HANDOFF_ENV.fds]);
  for (const name of Object.values(HANDOFF_ENV)) delete env[name];
  if (!Number.isInteger(fd) || fd < 0 || !Number.isInteger(parentPid) || parentPid <= 0) return null;
  return {
    fd,
    parentPid,
    generation: Number.isInteger(generation) && generation > 0 ? generation : 2,
    fault: fault && (HANDOFF_FAULTS as readonly string[]).includes(fault) ? fault : null,
    expectedFds: Number.isInteger(expectedFds) && expectedFds > 0 ? expectedFds : 0,
  };
}

/** What the successor learned from its predecessor. */
export interface Adopted {
  requester: Requester | null;
  /** New connection id of each of the predecessor's connection ids. */
  connectionIds: Map<number, number>;
  predecessorReport: HandoffReport | null;
  pausedAt: number;
  tasks: number;
  bytesInFlight: number;
}

const hang = () => new Promise<never>(() => setInterval(() => undefined, 1 << 30));

/** The successor's end of the hand-over channel. */
export class Successor {
  readonly #binding: NativeBinding;
  readonly #log: Logger;
  readonly #environment: SuccessorEnvironment;
  readonly #channel: Channel;
  readonly #inbox: Inbox;

  /** Opens the channel and says our pid at once. */
  constructor(binding: NativeBinding, log: Logger, environment: SuccessorEnvironment) {
    this.#binding = binding;
    this.#log = log;
    this.#environment = environment;
    this.#channel = new Channel(environment.fd, binding);
    this.#inbox = new Inbox(this.#channel, binding);
    sendEvent(this.#channel, 'pid', { pid: process.pid });
    // Grow the fd table now, while nothing is paused: growing it as thousands of fds arrive, in a
    // multi-threaded process, costs milliseconds per doubling inside the pause every relay sees.
    if (environment.expectedFds > 0) binding.reserveFdTable(environment.expectedFds + 1024);
    // If the predecessor goes away before commit it has rolled back (or died): nothing here is ours to keep.
    this.#channel.on('close', () => {
      if (!this.#committed) {
        this.#log.warn('the predecessor closed the hand-over channel before commit; exiting');
        process.exit(1);
      }
    });
  }

  #committed = false;

  /**
   * Makes sure we are not the predecessor's child (see spawn.ts). Started through `setsid --fork`, our
   * parent is first the launcher, and the predecessor waits for the launcher to exit before it reads our
   * hello, so by the time we send MAINPID (after commit) we belong to the reaper. This check catches a
   * successor started directly by the predecessor, which systemd 252 would treat as an alien.
   */
  async waitUntilReparented(timeoutMs = 5_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (process.ppid === this.#environment.parentPid) {
      if (Date.now() > deadline) throw new HandoffError('hello', 'REPARENT', "still the predecessor's child");
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
  }

  /**
   * Says hello, receives and checks everything, adopts it paused, answers ready and waits for commit.
   * `server` is null for an application without a protocol server (its predecessor sent none either).
   */
  async receive(server: RpcServer | null, participant: HandoffParticipant, timeoutMs: number, address?: string): Promise<Adopted> {
    const fault = this.#environment.fault;
    if (fault === 'crash-before-hello') process.exit(70);
    if (fault === 'hang-before-hello') await hang();
    sendEvent(this.#channel, 'hello', { pid: process.pid, formats: [...SUPPORTED_FORMATS] });

    const fds: number[] = [];
    let state;
    for (;;) {
      const message = await this.#inbox.next('transfer', ['fds', 'state'], timeoutMs);
      if (message.event === 'fds') {
        if (Number(message.data.offset) !== fds.length || Number(message.data.count) !== message.fds.length) {
          throw new HandoffError('transfer', 'FDCOUNT', `fd batch at ${String(message.data.offset)} of ${String(message.data.count)} arrived with ${message.fds.length} at ${fds.length}`);
        }
        fds.push(...message.fds);
        continue;
      }
      if (message.fds.length !== 1) throw new HandoffError('transfer', 'FDCOUNT', 'the state message must carry exactly the state memfd');
      try {
        state = readStateMemfd(this.#binding, message.fds[0]!);
      } finally {
        this.#binding.closeAll(message.fds);
      }
      break;
    }
    if (fault === 'crash-after-fds') process.exit(71);

    let adopted: Adopted;
    try {
      if (fault === 'reject-state') throw new ProtocolError('EFDFERRY_STATE', 'rejected by fault injection (reject-state)');
      const document = state.document;
      if (document.fdCount !== fds.length) {
        throw new ProtocolError('EFDFERRY_STATE', `the state names ${String(document.fdCount)} fds, ${fds.length} arrived`);
      }
      const serverState = (document.server ?? null) as ExportedServerState | null;
      if ((serverState === null) !== (server === null)) {
        throw new ProtocolError('EFDFERRY_STATE', server ? 'the state carries no protocol server' : 'the state carries a protocol server, and this process has none');
      }
      let connectionIds = new Map<number, number>();
      if (server && serverState) {
        this.#checkServerFds(serverState, fds);
        connectionIds = server.importState(serverState, fds, address);
      }
      const summary = participant.importState(document.tasks as Record<string, unknown>, fds);
      adopted = {
        requester: (document.requester as Requester | null) ?? null,
        connectionIds,
        predecessorReport: null,
        pausedAt: Number(document.pausedAt),
        tasks: summary.tasks,
        bytesInFlight: summary.bytesInFlight,
      };
    } catch (error) {
      const code = (error as ProtocolError).code ?? 'EFDFERRY_STATE';
      sendEvent(this.#channel, 'reject', { code, message: (error as Error).message });
      this.#log.error({ err: error }, 'hand-over: refusing the predecessor\'s state');
      // Wait for the predecessor to hang up (it rolls back and kills us); exit if it does not.
      setTimeout(() => process.exit(1), 2_000).unref();
      return hang();
    }
    sendEvent(this.#channel, 'ready', { fds: fds.length });
    if (fault === 'hang-after-ack') await hang();
    const commit = await this.#inbox.next('commit', ['commit'], timeoutMs);
    // Said before anything resumes: the predecessor rolls back only if this word never arrives.
    sendEvent(this.#channel, 'committed', {});
    this.#committed = true;
    adopted.predecessorReport = (commit.data.report as HandoffReport | undefined) ?? null;
    return adopted;
  }

  /** Tells the predecessor we are done (it exits on this) and closes the channel. */
  done(data: Record<string, unknown>): void {
    sendEvent(this.#channel, 'done', data);
    this.#channel.close();
  }

  #checkServerFds(state: ExportedServerState, fds: readonly number[]): void {
    const check = (index: number, kind: 'listening-socket' | 'seqpacket-socket', what: string) => {
      const fd = fds[index];
      if (fd === undefined) throw new ProtocolError('EFDFERRY_STATE', `${what}: fd index ${index} is out of range`);
      const mismatch = fdKindMismatch(kind, this.#binding.describeFd(fd));
      if (mismatch) throw new ProtocolError('EFDFERRY_STATE', `${what} ${mismatch}`);
    };
    if (state.listener !== null) check(state.listener, 'listening-socket', 'the listener');
    for (const connection of state.connections) check(connection.fd, 'seqpacket-socket', `connection ${connection.id}`);
    for (const entry of state.mailbox) {
      for (const index of entry.fds) if (fds[index] === undefined) throw new ProtocolError('EFDFERRY_STATE', `kept result ${entry.id}: fd index out of range`);
    }
  }
}

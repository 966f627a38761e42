/**
 * The hand-over state file: a sealed memfd carrying a daemon's state to its successor.
 *
 * Layout (little-endian): `FDFS` magic (4) · format version u16 · reserved u16 (0) · generation u32 ·
 * body length u32 · sha256 of the body (32) · UTF-8 JSON body. The successor refuses a memfd without all
 * four seals, a wrong magic, an unknown format version, a length that disagrees or a bad checksum, so a
 * corrupt or incompatible state makes the hand-over roll back instead of starting a broken successor.
 *
 * Every format version ever written stays readable (`SUPPORTED_FORMATS`), with a recorded fixture per
 * version under `test/fixtures/state/`, so an upgrade never degrades into a restart.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import type { NativeBinding } from '../native.js';
import { ProtocolError } from '../protocol/errors.js';

/** The format this code writes. */
export const STATE_FORMAT = 1;
/** Formats this code reads. */
export const SUPPORTED_FORMATS: readonly number[] = [1];

const MAGIC = Buffer.from('FDFS', 'latin1');
/** Bytes before the JSON body. */
export const STATE_HEADER_SIZE = 48;
/** Largest state accepted: far above 2,500 relays' worth, small enough to bound memory. */
export const MAX_STATE_BYTES = 256 * 1024 * 1024;

/** A decoded state file. */
export interface StateFile {
  format: number;
  generation: number;
  document: Record<string, unknown>;
}

/** Encodes a state document (pure: used for the memfd and for recording fixtures). */
export function encodeState(document: Record<string, unknown>, generation: number, format = STATE_FORMAT): Buffer {
  const body = Buffer.from(JSON.stringify(document), 'utf8');
  const header = Buffer.alloc(STATE_HEADER_SIZE);
  MAGIC.copy(header, 0);
  header.writeUInt16LE(format, 4);
  header.writeUInt32LE(generation, 8);
  header.writeUInt32LE(body.length, 12);
  crypto.createHash('sha256').update(body).digest().copy(header, 16);
  return Buffer.concat([header, body]);
}

/** Decodes and checks a state file's bytes; throws `EFDFERRY_STATE` naming what is wrong. */
export function decodeState(bytes: Buffer): StateFile {
  const fail = (message: string, details?: Record<string, unknown>) => new ProtocolError('EFDFERRY_STATE', `state file: ${message}`, details);
  if (bytes.length < STATE_HEADER_SIZE) throw fail(`${bytes.length} bytes is shorter than its header`);
  if (!bytes.subarray(0, 4).equals(MAGIC)) throw fail('bad magic');
  const format = bytes.readUInt16LE(4);
  if (!SUPPORTED_FORMATS.includes(format)) {
    throw fail(`format ${format} is not supported by this version (reads ${SUPPORTED_FORMATS.join(', ')})`, { format, supported: SUPPORTED_FORMATS });
  }
  if (bytes.readUInt16LE(6) !== 0) throw fail('reserved field is not zero');
  const generation = bytes.readUInt32LE(8);
  const length = bytes.readUInt32LE(12);
  if (length !== bytes.length - STATE_HEADER_SIZE) throw fail(`header says ${length} body bytes, file has ${bytes.length - STATE_HEADER_SIZE}`);
  const body = bytes.subarray(STATE_HEADER_SIZE);
  const checksum = crypto.createHash('sha256').update(body).digest();
  if (!checksum.equals(bytes.subarray(16, 48))) throw fail('checksum mismatch');
  let document: unknown;
  try {
    document = JSON.parse(body.toString('utf8'));
  } catch (error) {
    throw fail(`body is not JSON: ${(error as Error).message}`);
  }
  if (typeof document !== 'object' || document === null || Array.isArray(document)) throw fail('body is not a JSON object');
  return { format, generation, document: document as Record<string, unknown> };
}

/** The native calls the state file needs. */
export type StateBinding = Pick<NativeBinding, 'memfdCreate' | 'memfdSeal' | 'memfdSeals' | 'closeAll' | 'constants'>;

/** Writes a state document into a fresh sealed memfd; the caller owns (and closes) the fd. */
export function writeStateMemfd(binding: StateBinding, document: Record<string, unknown>, generation: number): number {
  const bytes = encodeState(document, generation);
  const fd = binding.memfdCreate(`fdferry-state-${generation}`);
  try {
    let offset = 0;
    while (offset < bytes.length) offset += fs.writeSync(fd, bytes, offset, bytes.length - offset, offset);
    binding.memfdSeal(fd);
    return fd;
  } catch (error) {
    binding.closeAll([fd]);
    throw error;
  }
}

/** Reads a state memfd after checking its seals and size; does not close it. */
export function readStateMemfd(binding: StateBinding, fd: number): StateFile {
  const c = binding.constants;
  const required = (c.F_SEAL_SHRINK ?? 0) | (c.F_SEAL_GROW ?? 0) | (c.F_SEAL_WRITE ?? 0) | (c.F_SEAL_SEAL ?? 0);
  let seals: number;
  try {
    seals = binding.memfdSeals(fd);
  } catch {
    throw new ProtocolError('EFDFERRY_STATE', 'state file: not a sealable memfd');
  }
  if ((seals & required) !== required) throw new ProtocolError('EFDFERRY_STATE', 'state file: the memfd is not sealed');
  const size = fs.fstatSync(fd).size;
  if (size > MAX_STATE_BYTES) throw new ProtocolError('EFDFERRY_STATE', `state file: ${size} bytes is over the ${MAX_STATE_BYTES}-byte limit`);
  const bytes = Buffer.allocUnsafe(size);
  let offset = 0;
  while (offset < size) {
    const n = fs.readSync(fd, bytes, offset, size - offset, offset);
    if (n === 0) break;
    offset += n;
  }
  return decodeState(bytes.subarray(0, offset));
}

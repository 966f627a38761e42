/**
 * The crash checkpoint: the one state memfd that is updated in place (DESIGN §4.7), kept in systemd's
 * fd store so that a process restarted after a crash knows what its predecessor was doing.
 *
 * Layout: a 32-byte header (`FDFYCKPT`, format, the writer's epoch, when it was made), then records
 * appended one after the other: `u32 length | u32 crc32 | u64 sequence | JSON`. A crash can only ever
 * leave the last record half-written; the checksum and the sequence numbers make that (and anything
 * else that is not a complete record in order) detectable, and a reader stops there: everything before
 * is valid, nothing after is trusted.
 */
import fs from 'node:fs';
import zlib from 'node:zlib';
import type { NativeBinding } from '../native.js';

const MAGIC = Buffer.from('FDFYCKPT');
const FORMAT = 1;
const HEADER = 32;
const RECORD_HEADER = 16;
/** Largest record accepted when reading (a record is one task's description). */
const MAX_RECORD = 1 << 20;

/** A checkpoint being written by this process. */
export class Checkpoint {
  readonly fd: number;
  readonly epoch: string;
  #offset = HEADER;
  #sequence = 0;

  private constructor(fd: number, epoch: string) {
    this.fd = fd;
    this.epoch = epoch;
  }

  /** A new, empty checkpoint in a fresh memfd (the caller stores it and closes it). */
  static create(binding: Pick<NativeBinding, 'memfdCreate'>, epoch: string): Checkpoint {
    const fd = binding.memfdCreate(`fdferry-checkpoint-${epoch}`);
    const header = Buffer.alloc(HEADER);
    MAGIC.copy(header, 0);
    header.writeUInt32LE(FORMAT, 8);
    header.write(epoch.padEnd(12, '\0').slice(0, 12), 12, 'latin1');
    header.writeDoubleLE(Date.now(), 24);
    fs.writeSync(fd, header, 0, HEADER, 0);
    return new Checkpoint(fd, epoch);
  }

  /** Bytes written so far. */
  get size(): number {
    return this.#offset;
  }

  /** Appends one record (one pwrite). */
  append(record: unknown): void {
    const json = Buffer.from(JSON.stringify(record));
    const frame = Buffer.alloc(RECORD_HEADER + json.length);
    frame.writeUInt32LE(json.length, 0);
    frame.writeBigUInt64LE(BigInt(++this.#sequence), 8);
    json.copy(frame, RECORD_HEADER);
    frame.writeUInt32LE(zlib.crc32(frame.subarray(8)), 4);
    fs.writeSync(this.fd, frame, 0, frame.length, this.#offset);
    this.#offset += frame.length;
  }
}

/** What a checkpoint held: its header and every complete record, and why reading stopped. */
export interface CheckpointContents {
  epoch: string;
  createdAt: number;
  records: unknown[];
  /** Null when the file ended cleanly; otherwise what was found after the last good record. */
  torn: string | null;
}

/** Reads a checkpoint; null if the fd is not one (wrong magic or format). */
export function readCheckpoint(fd: number): CheckpointContents | null {
  const size = fs.fstatSync(fd).size;
  if (size < HEADER) return null;
  const data = Buffer.alloc(size);
  let got = 0;
  while (got < size) {
    const n = fs.readSync(fd, data, got, size - got, got);
    if (n <= 0) break;
    got += n;
  }
  if (!data.subarray(0, 8).equals(MAGIC) || data.readUInt32LE(8) !== FORMAT) return null;
  const contents: CheckpointContents = {
    epoch: data.toString('latin1', 12, 24).replace(/\0+$/, ''),
    createdAt: data.readDoubleLE(24),
    records: [],
    torn: null,
  };
  let offset = HEADER;
  let sequence = 0n;
  while (offset < got) {
    if (offset + RECORD_HEADER > got) {
      contents.torn = 'a record header cut short';
      break;
    }
    const length = data.readUInt32LE(offset);
    if (length === 0 && data.subarray(offset).every((byte) => byte === 0)) break; // never written
    if (length > MAX_RECORD || offset + RECORD_HEADER + length > got) {
      contents.torn = `a record of ${length} bytes runs past the end`;
      break;
    }
    const checksum = data.readUInt32LE(offset + 4);
    if (zlib.crc32(data.subarray(offset + 8, offset + RECORD_HEADER + length)) !== checksum) {
      contents.torn = 'a record whose checksum does not match';
      break;
    }
    const next = data.readBigUInt64LE(offset + 8);
    if (next !== sequence + 1n) {
      contents.torn = `sequence ${next} after ${sequence}`;
      break;
    }
    try {
      contents.records.push(JSON.parse(data.toString('utf8', offset + RECORD_HEADER, offset + RECORD_HEADER + length)));
    } catch {
      contents.torn = 'a record that is not JSON';
      break;
    }
    sequence = next;
    offset += RECORD_HEADER + length;
  }
  return contents;
}

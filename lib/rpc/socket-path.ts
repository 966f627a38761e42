/**
 * Socket addresses as operators write them, and the checks made before `bind(2)`.
 *
 * `@name` means the abstract name `name` (as `ss` and systemd print it); anything else is a filesystem
 * path. `sun_path` holds 108 bytes including the terminating NUL, so 107 are usable either way.
 */
import fs from 'node:fs';
import path from 'node:path';

/** Bytes usable in `sun_path`. */
export const SUN_PATH_MAX = 107;

/** Whether an address names an abstract socket. */
export function isAbstract(address: string): boolean {
  return address.startsWith('@') || address.startsWith('\0');
}

/** Converts `@name` to the `\0name` form the addon binds, and checks the length. */
export function toNativeAddress(address: string): string {
  if (address.length === 0) throw new RangeError('a socket address must not be empty');
  const native = address.startsWith('@') ? `\0${address.slice(1)}` : address;
  const bytes = Buffer.byteLength(native) - (native.startsWith('\0') ? 1 : 0);
  if (bytes > SUN_PATH_MAX) {
    throw new RangeError(`socket address is ${bytes} bytes; Unix sockets allow at most ${SUN_PATH_MAX}: ${address}`);
  }
  return native;
}

/** Creates the directory of a filesystem socket path if needed (abstract names need nothing). */
export function ensureSocketDirectory(address: string): void {
  if (!isAbstract(address)) fs.mkdirSync(path.dirname(address), { recursive: true, mode: 0o755 });
}

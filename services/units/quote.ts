/**
 * Quoting for unit files (systemd.syntax(7), systemd.service(5) "Command lines"): `%` starts a specifier
 * and `$` an environment variable everywhere on an `Exec*=` line, so both are doubled; words with spaces,
 * quotes or backslashes are double-quoted with C-style escapes. Control characters are refused outright:
 * a newline would end the directive.
 */
import path from 'node:path';

const PLAIN = /^[A-Za-z0-9_@%$+=:,./-]+$/;

/** One word of an `Exec*=` command line. */
export function quoteArg(arg: string): string {
  if (/[\u0000-\u001f\u007f]/.test(arg)) throw new Error(`cannot put a control character in a unit file: ${JSON.stringify(arg)}`);
  if (arg === '') return '""';
  const escaped = arg.replace(/%/g, '%%').replace(/\$/g, '$$$$');
  if (PLAIN.test(escaped)) return escaped;
  return `"${escaped.replace(/\\/g, '\\\\').replace(/"/g, '\\"')}"`;
}

/** A whole command line; its first word must be an absolute path (systemd requires it for `ExecStart=`). */
export function commandLine(argv: readonly string[]): string {
  const [executable] = argv;
  if (!executable || !path.isAbsolute(executable)) throw new Error(`the command must start with an absolute path, got ${JSON.stringify(executable)}`);
  return argv.map(quoteArg).join(' ');
}

/** A path in a non-command directive (`ListenSequentialPacket=`, `EnvironmentFile=`...): specifiers escaped. */
export function quotePath(value: string): string {
  if (/[\s\u0000-\u001f\u007f]/.test(value)) throw new Error(`cannot put whitespace or a control character in this unit setting: ${JSON.stringify(value)}`);
  return value.replace(/%/g, '%%');
}

/**
 * Flag reading for the small programs tests run inside namespaces (flow-client, udp-client, fish-origin):
 * `--name value` pairs, a missing one taking its fallback or failing by name.
 */

/** Reads `--name value` from `argv` (default: this process's arguments). */
export function flagReader(argv: string[] = process.argv.slice(2)): (name: string, fallback?: string) => string {
  return (name, fallback) => {
    const index = argv.indexOf(`--${name}`);
    if (index < 0 || index + 1 >= argv.length) {
      if (fallback === undefined) throw new Error(`--${name} is required`);
      return fallback;
    }
    return argv[index + 1]!;
  };
}

/** Splits `address:port` (`[v6]:port` for IPv6). */
export function splitTarget(target: string): { host: string; port: number } {
  const separator = target.lastIndexOf(':');
  return { host: target.slice(0, separator).replace(/^\[|\]$/g, ''), port: Number(target.slice(separator + 1)) };
}

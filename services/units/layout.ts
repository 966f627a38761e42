/**
 * Where an installed daemon's pieces live: unit names, its runtime directory and socket, its config and
 * environment files. One runtime directory per daemon: systemd does not reference-count a shared
 * `RuntimeDirectory=` (systemd#5394), so the first daemon to stop would delete the others' sockets.
 */
import path from 'node:path';
import { defaultConfigPath } from '../common-options.js';

/** Where `install-units` writes by default. */
export const DEFAULT_UNIT_DIR = '/etc/systemd/system';

/** The names and paths of one daemon's units. */
export interface ServiceLayout {
  service: string;
  /** `fdferry-<service>`: unit name stem, runtime directory name and syslog identifier. */
  stem: string;
  serviceUnit: string;
  socketUnit: string;
  /** `RuntimeDirectory=` value (relative to /run). */
  runtimeDirectory: string;
  /** The control socket: `/run/fdferry-<service>/<service>.sock`. */
  socketPath: string;
  /** The JSON config file the daemon reads when it exists. */
  configFile: string;
  /** `EnvironmentFile=` (optional, `-` prefixed in the unit). */
  environmentFile: string;
}

/** The layout of `service`'s units. */
export function serviceLayout(service: string): ServiceLayout {
  if (!/^[a-z][a-z0-9-]*$/.test(service)) throw new Error(`not a service name: ${JSON.stringify(service)}`);
  const stem = `fdferry-${service}`;
  return {
    service,
    stem,
    serviceUnit: `${stem}.service`,
    socketUnit: `${stem}.socket`,
    runtimeDirectory: stem,
    socketPath: path.posix.join('/run', stem, `${service}.sock`),
    configFile: defaultConfigPath(service),
    environmentFile: `/etc/default/${stem}`,
  };
}

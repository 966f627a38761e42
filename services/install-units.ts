/**
 * `fdferry install-units` and `fdferry uninstall-units`: write (or remove) a `.service` and a `.socket`
 * per daemon, pointing at this installation with absolute paths and sized from each daemon's effective
 * configuration. Rendering lives in ./units/ (one concern per file); docs/operations.md explains the units.
 */
import type { CommandModule } from 'yargs';
import { VERSION } from '../lib/version.js';
import { parseDaemonConfig } from './check-config.js';
import { resolveEntryPoint } from './units/entry-point.js';
import { enablementLinks, installUnitFiles, uninstallUnitFiles } from './units/files.js';
import { DEFAULT_UNIT_DIR, serviceLayout } from './units/layout.js';
import { profileOf } from './units/profiles.js';
import { type UnitFile, renderUnits } from './units/render.js';
import { DEFAULT_WATCHDOG_SEC } from './units/sizing.js';
import { commandLine } from './units/quote.js';
import { SERVICES } from './up.js';

/** Options of {@link runInstallUnits}. */
export interface InstallUnitsOptions {
  prefix: string;
  services: string[];
  fdferry?: string | undefined;
  watchdogSec: number;
  force: boolean;
  dryRun: boolean;
}

/** Parses `--services splicer,bumblebee`. */
export function parseServices(value: string): string[] {
  const names = [...new Set(value.split(',').map((name) => name.trim()).filter(Boolean))];
  if (!names.length) throw new Error('--services names no daemon');
  const unknown = names.filter((name) => !(SERVICES as readonly string[]).includes(name));
  if (unknown.length) throw new Error(`--services: unknown ${unknown.join(', ')} (known: ${SERVICES.join(', ')})`);
  return names;
}

/** Renders every requested daemon's units; throws on a bad configuration or entry point. */
export function renderInstallation(options: Pick<InstallUnitsOptions, 'services' | 'fdferry' | 'watchdogSec' | 'dryRun'>): {
  units: UnitFile[];
  command: string[];
  notes: string[];
} {
  const entryPoint = resolveEntryPoint({ explicit: options.fdferry, mustExist: !options.dryRun });
  const notes: string[] = [];
  const units = options.services.flatMap((service) => {
    const config = parseDaemonConfig(service);
    const { shutdownGraceMs, fds } = profileOf(service).sizing(config.common, config.options as never);
    if (!config.configFile) notes.push(`${service}: no ${serviceLayout(service).configFile}: defaults (the units are sized from them)`);
    return renderUnits({
      service,
      entryPoint,
      version: VERSION,
      sizing: { handoffTimeoutMs: config.common.handoffTimeoutMs, shutdownGraceMs, fds, watchdogSec: options.watchdogSec },
    });
  });
  if (units.some((unit) => unit.text.includes('\nProtectHome=read-only'))) {
    notes.push('Node or fdferry lives under /home, /root or /run/user: the units use ProtectHome=read-only instead of yes');
  }
  return { units, command: entryPoint.command, notes };
}

/** `install-units`: resolves with the exit code. */
export function runInstallUnits(options: InstallUnitsOptions): number {
  const { units, command, notes } = renderInstallation(options);
  if (options.dryRun) {
    for (const unit of units) console.log(`# ---- ${options.prefix}/${unit.name} (dry run: not written) ----\n${unit.text}`);
    for (const note of notes) console.error(`note: ${note}`);
    return 0;
  }
  for (const result of installUnitFiles(options.prefix, units, { force: options.force })) {
    console.log(`${result.status === 'written' ? 'wrote' : 'unchanged'} ${result.file}`);
  }
  const layouts = options.services.map(serviceLayout);
  console.log(`\nExecStart= runs ${commandLine(command)} (fdferry ${VERSION})`);
  for (const note of notes) console.log(`note: ${note}`);
  console.log('\nNext steps:');
  if (options.prefix !== DEFAULT_UNIT_DIR) console.log(`  (the units are in ${options.prefix}, not ${DEFAULT_UNIT_DIR}: systemd reads them only from its unit directories)`);
  console.log('  systemctl daemon-reload');
  console.log(`  systemctl enable --now ${layouts.map((l) => l.socketUnit).join(' ')}`);
  console.log('Each daemon then starts on the first connection to its socket; to start them at boot instead:');
  console.log(`  systemctl enable --now ${layouts.map((l) => l.serviceUnit).join(' ')}`);
  console.log('Then:');
  for (const l of layouts) console.log(`  fdferry ctl ${l.service} status --socket ${l.socketPath}`);
  console.log(`  systemctl reload ${layouts[0]!.serviceUnit}    # hand-over to a fresh process; returns when done`);
  console.log(`  journalctl -u ${layouts[0]!.serviceUnit} -o cat`);
  return 0;
}

/** Options of {@link runUninstallUnits}. */
export interface UninstallUnitsOptions {
  prefix: string;
  services: string[];
  force: boolean;
}

/** `uninstall-units`: resolves with the exit code. */
export function runUninstallUnits(options: UninstallUnitsOptions): number {
  const layouts = options.services.map(serviceLayout);
  const names = layouts.flatMap((l) => [l.serviceUnit, l.socketUnit]);
  const links = enablementLinks(options.prefix, names);
  if (links.length && !options.force) {
    console.error(`fdferry uninstall-units: still enabled:\n${links.map((link) => `  ${link}`).join('\n')}`);
    console.error(`First run: systemctl disable --now ${names.join(' ')}`);
    console.error('(or --force to remove the unit files anyway; these links are systemctl\'s and are left in place)');
    return 1;
  }
  const result = uninstallUnitFiles(options.prefix, names);
  for (const file of result.removed) console.log(`removed ${file}`);
  for (const file of result.foreign) console.log(`left ${file}: not written by fdferry install-units`);
  for (const file of result.missing) console.log(`not there: ${file}`);
  if (result.removed.length) {
    console.log('\nNext steps:');
    console.log('  systemctl daemon-reload');
    console.log(`Left in place: config files (${layouts.map((l) => l.configFile).join(', ')}), drop-ins (systemctl edit), and`);
    console.log(`${layouts.map((l) => `/run/${l.runtimeDirectory}`).join(', ')} until reboot. To remove fdferry itself: npm rm -g fdferry`);
  }
  return 0;
}

const servicesOption = {
  type: 'string',
  default: SERVICES.join(','),
  describe: 'daemons, comma-separated',
} as const;

const prefixOption = {
  type: 'string',
  default: DEFAULT_UNIT_DIR,
  describe: 'unit directory',
} as const;

/** `fdferry install-units` for the CLI. */
export const installUnitsCommand: CommandModule = {
  command: 'install-units',
  describe: 'write a systemd .service and .socket per daemon for this installation',
  builder: (y) =>
    y
      .option('prefix', prefixOption)
      .option('services', servicesOption)
      .option('fdferry', {
        type: 'string',
        describe: 'absolute path that runs fdferry (default: this Node binary + this installation\'s dist/services/cli.js)',
      })
      .option('watchdog-sec', { type: 'number', default: DEFAULT_WATCHDOG_SEC, describe: 'WatchdogSec= of the services (0 = no watchdog)' })
      .option('force', { type: 'boolean', default: false, describe: 'replace unit files of the same name that fdferry did not write' })
      .option('dry-run', { type: 'boolean', default: false, describe: 'print the units instead of writing them' }),
  handler: (argv) => {
    try {
      process.exitCode = runInstallUnits({
        prefix: argv.prefix as string,
        services: parseServices(argv.services as string),
        fdferry: argv.fdferry as string | undefined,
        watchdogSec: argv.watchdogSec as number,
        force: argv.force as boolean,
        dryRun: argv.dryRun as boolean,
      });
    } catch (error) {
      console.error(`fdferry install-units: ${(error as Error).message}`);
      process.exitCode = 1;
    }
  },
};

/** `fdferry uninstall-units` for the CLI. */
export const uninstallUnitsCommand: CommandModule = {
  command: 'uninstall-units',
  describe: 'remove the unit files install-units wrote (and nothing else)',
  builder: (y) =>
    y
      .option('prefix', prefixOption)
      .option('services', servicesOption)
      .option('force', { type: 'boolean', default: false, describe: 'remove them even while systemctl still has them enabled' }),
  handler: (argv) => {
    try {
      process.exitCode = runUninstallUnits({
        prefix: argv.prefix as string,
        services: parseServices(argv.services as string),
        force: argv.force as boolean,
      });
    } catch (error) {
      console.error(`fdferry uninstall-units: ${(error as Error).message}`);
      process.exitCode = 1;
    }
  },
};

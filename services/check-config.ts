/**
 * `fdferry check-config <service> [--config FILE] [flags...]`: parses a daemon's configuration exactly as
 * the daemon would — the same yargs option builder (config file keys are its flags, unknown keys are
 * refused), the same `*OptionsFrom` converters — and prints `ok` with the effective configuration, or
 * the error and exits 1. The service units run it as `ExecStartPre=` and before every `ExecReload=`.
 *
 * `parseDaemonConfig()` is the same check as a function, for `install-units` (which sizes the units from
 * the effective configuration).
 */
import fs from 'node:fs';
import yargs, { type Argv, type CommandModule } from 'yargs';
import { hideBin } from 'yargs/helpers';
import type { CommonDaemonOptions } from '../lib/daemon.js';
import { bumblebeeOptions, bumblebeeOptionsFrom } from './bumblebee/command.js';
import { fishHostSettingsFrom, fishOptions, fishOptionsFrom } from './fish/command.js';
import { commonOptionsFrom, defaultConfigPath } from './common-options.js';
import { splicerOptions, splicerOptionsFrom } from './splicer/command.js';
import { SERVICES } from './up.js';

/** A daemon's configuration as the daemon would run with it. */
export interface EffectiveConfig {
  service: string;
  /** The config file that was read, or null (defaults and flags only). */
  configFile: string | null;
  /** Every flag (= config key) with its effective value, before conversion. */
  flags: Record<string, unknown>;
  /** What the daemon is started with: the common options... */
  common: CommonDaemonOptions;
  /** ...and the service's own (SplicerOptions, BumblebeeOptions). */
  options: unknown;
}

type Parsed = Record<string, unknown>;

/** How to parse one daemon's configuration: its command's option builder and converters. */
interface DaemonConfigSpec {
  builder(yargs: Argv): Argv<Parsed>;
  convert(argv: Parsed): { common: CommonDaemonOptions; options: unknown };
}

// The casts only bridge yargs' inferred argv types: the builders and converters are the daemons' own.
const DAEMONS: Record<(typeof SERVICES)[number], DaemonConfigSpec> = {
  splicer: {
    builder: (y) => splicerOptions(y) as unknown as Argv<Parsed>,
    convert: (argv) => ({ common: commonOptionsFrom(argv as never), options: splicerOptionsFrom(argv as never) }),
  },
  bumblebee: {
    builder: (y) => bumblebeeOptions(y) as unknown as Argv<Parsed>,
    convert: (argv) => ({ common: commonOptionsFrom(argv as never), options: bumblebeeOptionsFrom(argv as never) }),
  },
  fish: {
    builder: (y) => fishOptions(y) as unknown as Argv<Parsed>,
    convert: (argv) => {
      fishHostSettingsFrom(argv as never);
      return { common: commonOptionsFrom(argv as never), options: fishOptionsFrom(argv as never) };
    },
  },
};

function specOf(service: string): DaemonConfigSpec {
  const spec = (DAEMONS as Record<string, DaemonConfigSpec | undefined>)[service];
  if (!spec) throw new Error(`unknown service ${JSON.stringify(service)} (known: ${SERVICES.join(', ')})`);
  return spec;
}

/** Keys of a parsed argv that are not flags of the daemon (yargs' own, ours, aliases). */
const NOT_FLAGS = new Set(['_', '$0', 'config', 'quiet', 'help', 'version', 'h', 'V']);

/** The config file a command line makes the daemon read (`--config`, else the default when it exists). */
export function configFileOf(service: string, args: readonly string[]): string | null {
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--config' && args[i + 1] !== undefined) return args[i + 1]!;
    if (args[i]!.startsWith('--config=')) return args[i]!.slice('--config='.length);
  }
  const fallback = defaultConfigPath(service);
  return fs.existsSync(fallback) ? fallback : null;
}

/** `service: invalid configuration (config file X): reason`, with yargs' unknown-key message made readable. */
function configError(service: string, configFile: string | null, message: string): Error {
  const unknown = /^Unknown arguments?: (.*)$/.exec(message);
  let reason = message;
  if (unknown) {
    // yargs names every unknown key twice (bogus-key, bogusKey): keep the spelling a config file uses.
    const names = unknown[1]!.split(', ').filter((name, _, all) => !/[A-Z]/.test(name) || !all.some((other) => other !== name && camel(other) === name));
    reason = `unknown ${names.length === 1 ? 'key' : 'keys'} ${names.join(', ')}: every config key and flag must be one of \`fdferry ${service} --help\``;
  }
  const where = configFile ? `config file ${configFile}` : 'no config file';
  return new Error(`${service}: invalid configuration (${where}): ${reason}`);
}

const camel = (name: string): string => name.replace(/-([a-z0-9])/g, (_, c: string) => c.toUpperCase());

/** Converts a parsed argv (from the daemon's builder) into the effective configuration; throws a clear error. */
export function effectiveConfig(service: string, argv: Parsed): EffectiveConfig {
  const configFile = typeof argv.config === 'string' ? argv.config : null;
  const positional = (argv._ as unknown[] | undefined) ?? [];
  if (positional.length) throw configError(service, configFile, `unexpected arguments: ${positional.join(' ')}`);
  try {
    const { common, options } = specOf(service).convert(argv);
    const flags = Object.fromEntries(Object.entries(argv).filter(([key]) => !NOT_FLAGS.has(key) && !/[A-Z]/.test(key)));
    return { service, configFile, flags, common, options };
  } catch (error) {
    throw configError(service, configFile, (error as Error).message);
  }
}

/** Parses `args` (flags of `fdferry <service>`) as the daemon would; throws a clear error. */
export function parseDaemonConfig(service: string, args: readonly string[] = []): EffectiveConfig {
  const spec = specOf(service);
  let argv: Parsed;
  try {
    argv = spec
      .builder(yargs([...args]))
      .strict()
      .help(false)
      .version(false)
      .exitProcess(false)
      .fail((message, error) => {
        throw error ?? new Error(message);
      })
      .parseSync();
  } catch (error) {
    throw configError(service, configFileOf(service, args), (error as Error).message);
  }
  return effectiveConfig(service, argv);
}

/** The text `check-config` prints on success. */
export function describeConfig(config: EffectiveConfig): string {
  const source = config.configFile ? `config file ${config.configFile}` : `defaults and flags; there is no ${defaultConfigPath(config.service)}`;
  return `ok: ${config.service} configuration is valid (${source})`;
}

/** The `check-config` command for the CLI: one subcommand per daemon, with that daemon's flags. */
export const checkConfigCommand: CommandModule = {
  command: 'check-config',
  describe: 'check a daemon\'s configuration (config file and flags) as the daemon would; print the effective configuration',
  builder: (y) => {
    let out = y.usage('$0 check-config <service> [--config FILE] [flags...]');
    for (const service of SERVICES) {
      out = out.command(
        service,
        `check ${service}'s configuration (the flags are ${service}'s)`,
        (b) =>
          specOf(service)
            .builder(b)
            .option('quiet', { type: 'boolean', default: false, describe: 'print only the "ok" line', group: 'check-config:' }),
        (argv) => {
          try {
            // `_` starts with the command words themselves (check-config <service>).
            const config = effectiveConfig(service, { ...(argv as Parsed), _: argv._.slice(2) });
            console.log(describeConfig(config));
            if (!argv.quiet) console.log(JSON.stringify({ service, configFile: config.configFile, flags: config.flags, options: { ...config.common, ...(config.options as object) } }, null, 2));
          } catch (error) {
            console.error(`fdferry check-config: ${(error as Error).message}`);
            process.exitCode = 1;
          }
        },
      );
    }
    return out.demandCommand(1, `name a daemon: ${SERVICES.join(', ')}`).fail((message, error) => {
      // yargs' own refusals (unknown keys, a config file that is not JSON or cannot be read) land here.
      const args = hideBin(process.argv);
      const service = args[args.indexOf('check-config') + 1] ?? '';
      const text = error?.message ?? message ?? 'invalid arguments';
      const known = (SERVICES as readonly string[]).includes(service);
      const unknownDaemon = !known && service !== '' && !service.startsWith('-');
      console.error(
        `fdferry check-config: ${
          known
            ? configError(service, configFileOf(service, args), text).message
            : unknownDaemon
              ? `unknown daemon ${service} (known: ${SERVICES.join(', ')})`
              : text
        }`,
      );
      process.exit(1);
    });
  },
  handler: () => {},
};

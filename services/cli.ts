#!/usr/bin/env node
/**
 * `fdferry`: runs a daemon (`fdferry splicer`), talks to a running one (`fdferry ctl ...`), or runs
 * all of them in the foreground (`fdferry up`).
 */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { VERSION } from '../lib/version.js';
import { runCtl, CTL_COMMANDS } from './ctl.js';
import { runUp, SERVICES } from './up.js';
import { bumblebeeOptions, startBumblebee } from './bumblebee/command.js';
import { splicerOptions, startSplicer } from './splicer/command.js';
import { fishCleanupCommand, fishOptions, startFish } from './fish/command.js';
import { checkConfigCommand } from './check-config.js';
import { installUnitsCommand, uninstallUnitsCommand } from './install-units.js';

const fail = (error: unknown): never => {
  console.error(`fdferry: ${(error as Error).message}`);
  process.exit(1);
};

await yargs(hideBin(process.argv))
  .scriptName('fdferry')
  .usage('$0 <command> [options]\n\nDaemons that proxies hand their sockets to, so connections outlive restarts.')
  .command(
    'splicer',
    'run Splicer: relays bytes between two handed-over sockets in the kernel and gives them back',
    (y) => splicerOptions(y),
    async (argv) => {
      try {
        const daemon = await startSplicer(argv);
        await daemon.stopped;
        process.exit(0);
      } catch (error) {
        fail(error);
      }
    },
  )
  .command(
    'bumblebee',
    'run Bumblebee: turns a raw IP flow into an accepted kernel TCP socket inside an anonymous network namespace',
    (y) => bumblebeeOptions(y),
    async (argv) => {
      try {
        const daemon = await startBumblebee(argv);
        await daemon.stopped;
        process.exit(0);
      } catch (error) {
        fail(error);
      }
    },
  )
  .command(
    'fish',
    'run Fish: forwards a client\'s raw IP packets from a slice of a shared egress address, every five-tuple reserved in conntrack',
    (y) => fishOptions(y).command(fishCleanupCommand),
    async (argv) => {
      try {
        const daemon = await startFish(argv);
        await daemon.stopped;
        process.exit(0);
      } catch (error) {
        fail(error);
      }
    },
  )
  .command(
    'ctl <service> <command> [args..]',
    'talk to a running daemon',
    (y) =>
      y
        .positional('service', { choices: SERVICES, describe: 'which daemon' })
        .positional('command', { choices: Object.keys(CTL_COMMANDS), describe: 'what to ask' })
        .positional('args', { type: 'string', array: true, describe: 'arguments of the command (cancel: a task id)' })
        .option('socket', { type: 'string', describe: 'the daemon socket (default /run/fdferry/<service>.sock)' })
        .option('json', { type: 'boolean', default: false, describe: 'print the raw JSON reply' })
        .option('timeout', { type: 'number', default: 30_000, describe: 'ms to wait for the reply' })
        .option('wait', { type: 'boolean', default: true, describe: 'reload: return only when the hand-over is done (exit 1 if it failed)' })
        .option('fault', { type: 'string', describe: 'reload: make the successor fail on purpose (tests; needs --allow-fault-injection)' })
        .option('owner', { type: 'string', describe: 'drain: the owner id whose relays end' })
        .option('uid', { type: 'number', describe: 'drain: the uid that owner id belongs to (default: yours)' })
        .epilog(Object.entries(CTL_COMMANDS).map(([name, text]) => `  ${name.padEnd(8)} ${text}`).join('\n')),
    async (argv) => {
      process.exitCode = await runCtl({
        service: argv.service as (typeof SERVICES)[number],
        command: argv.command as keyof typeof CTL_COMMANDS,
        args: argv.args ?? [],
        socket: argv.socket,
        json: argv.json,
        timeoutMs: argv.timeout,
        wait: argv.wait,
        ...(argv.fault ? { fault: argv.fault } : {}),
        ...(argv.owner ? { owner: argv.owner } : {}),
        ...(argv.uid === undefined ? {} : { uid: argv.uid }),
      }).catch(fail);
    },
  )
  .command(
    'up',
    'run every daemon that exists so far in the foreground (Ctrl-C stops them all)',
    (y) =>
      y
        .option('run-dir', { type: 'string', default: '/run/fdferry', describe: 'where the daemons put their sockets' })
        .option('log-level', { type: 'string', default: 'info', describe: 'log level of every daemon' })
        .option('fish-netns', { choices: ['own', 'host'] as const, default: 'own' as const, describe: 'where Fish runs: a network namespace made for it (and removed after), or this host\'s (it then installs its tun, rules and nftables table here)' }),
    async (argv) => {
      process.exitCode = await runUp({ runDir: argv.runDir, logLevel: argv.logLevel, fishNetns: argv.fishNetns }).catch(fail);
    },
  )
  .command(checkConfigCommand)
  .command(installUnitsCommand)
  .command(uninstallUnitsCommand)
  .demandCommand(1, 'name a command: fdferry --help lists them')
  .strict()
  .version(VERSION)
  .alias('h', 'help')
  .alias('V', 'version')
  .wrap(Math.min(110, process.stdout.columns || 110))
  .fail((message, error) => {
    if (error) fail(error);
    console.error(`fdferry: ${message}\n(run with --help for usage)`);
    process.exit(2);
  })
  .parseAsync();

#!/usr/bin/env node
/**
 * The example edge proxy's command line (see README.md here):
 *
 *   node --import tsx examples/edge-proxy/main.ts --client-netns <name> --splicer <sock> --bumblebee <sock> \
 *     --fish <sock> --egress4 203.0.113.7 --ports 40000-40999 --owner edge-1
 *
 * SIGHUP hands everything over to a successor (the same command line) through lib/handoff; SIGTERM and
 * SIGINT stop cleanly. Log lines (JSON, one per line, audit lines among them) go to stdout.
 */
import path from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { parsePortRange } from '../../services/fish/command.js';
import { handOver, takeOver } from '../../lib/handoff/application.js';
import { HANDOFF_ENV } from '../../lib/handoff/spawn.js';
import { createLogger } from '../../lib/log.js';
import { loadNative } from '../../lib/native.js';
import { EdgeProxy, type EdgeProxyOptions } from './proxy.js';

// Installed first: Node exits on SIGHUP by default, and a restart must never look like a crash. SIGTERM and
// SIGINT too: a stop that arrives while a successor is taking over must not kill it between commit and resume.
let onHangup: () => void = () => undefined;
process.on('SIGHUP', () => onHangup());
let earlyStop: NodeJS.Signals | null = null;
let onStopSignal: (signal: NodeJS.Signals) => void = (signal) => (earlyStop = signal);
process.on('SIGTERM', (signal) => onStopSignal(signal));
process.on('SIGINT', (signal) => onStopSignal(signal));

const argv = await yargs(hideBin(process.argv))
  .scriptName('edge-proxy')
  .usage(
    '$0 [options]\n\nAn example VPN on-ramp on fdferry: reads a client\'s IP packets from a tun in its network namespace;\n' +
      'TCP flows go to Bumblebee and Splicer (with a fresh connection to each destination), UDP and ICMP to Fish.\n' +
      'SIGHUP restarts it without breaking a connection; SIGTERM stops it.',
  )
  .option('client-netns', { type: 'string', demandOption: true, describe: 'the client\'s network namespace: a name under /run/netns, or a path' })
  .option('tun', { type: 'string', default: 'ctun0', describe: 'the client\'s tun device inside that namespace' })
  .option('splicer', { type: 'string', demandOption: true, describe: 'Splicer\'s socket' })
  .option('bumblebee', { type: 'string', demandOption: true, describe: 'Bumblebee\'s socket' })
  .option('fish', { type: 'string', demandOption: true, describe: 'Fish\'s socket' })
  .option('egress4', { type: 'string', describe: 'IPv4 egress address for the client\'s UDP and ICMP (Fish)' })
  .option('egress6', { type: 'string', describe: 'IPv6 egress address' })
  .option('ports', { type: 'string', demandOption: true, describe: 'the client\'s slice of egress ports, lo-hi' })
  .option('registration-id', { type: 'number', default: 1, describe: 'Fish registration id (1-65535); a successor keeps it' })
  .option('owner', { type: 'string', demandOption: true, describe: 'owner id at the daemons; a successor keeps it and collects the envelopes' })
  .option('tenant', { type: 'string', default: 'edge', describe: 'Bumblebee tenant of the client\'s flows' })
  .option('audit-log', { type: 'string', describe: 'also append audit lines (JSON) to this file' })
  .option('close-delay', { type: 'number', default: 500, describe: 'ms the on-ramp keeps a finished flow for late ACKs' })
  .option('idle-timeout', { type: 'number', default: 0, describe: 'ms without a packet before the on-ramp drops a flow (0 = never)' })
  .option('connect-timeout', { type: 'number', default: 5_000, describe: 'ms to connect to a flow\'s destination' })
  .option('drain', { type: 'number', default: 5_000, describe: 'ms a SIGTERM waits for the client\'s flows to end' })
  .option('handoff-timeout', { type: 'number', default: 10_000, describe: 'ms a restart (hand-over) may take before it rolls back' })
  .option('log-level', { type: 'string', default: 'info', choices: ['debug', 'info', 'warn', 'error'] })
  .check((args) => {
    if (!args.egress4 && !args.egress6) throw new Error('give --egress4 and/or --egress6');
    parsePortRange(args.ports, 'ports');
    const id = args['registration-id'];
    if (!Number.isInteger(id) || id < 1 || id > 65_535) throw new Error('--registration-id must be an integer from 1 to 65535');
    return true;
  })
  .strict()
  .help()
  .parseAsync();

const options: EdgeProxyOptions = {
  clientNetns: argv['client-netns'].includes('/') ? argv['client-netns'] : path.join('/run/netns', argv['client-netns']),
  tunName: argv.tun,
  splicer: argv.splicer,
  bumblebee: argv.bumblebee,
  fish: argv.fish,
  owner: argv.owner,
  tenant: argv.tenant,
  registration: {
    id: argv['registration-id'],
    ports: parsePortRange(argv.ports, 'ports'),
    ...(argv.egress4 ? { egress4: argv.egress4 } : {}),
    ...(argv.egress6 ? { egress6: argv.egress6 } : {}),
  },
  auditLog: argv['audit-log'] ?? null,
  closeDelayMs: argv['close-delay'],
  idleTimeoutMs: argv['idle-timeout'],
  connectTimeoutMs: argv['connect-timeout'],
  drainMs: argv.drain,
};

const binding = loadNative();
// The generation is known before takeOver reads (and removes) the hand-over variables: log lines say it from the first.
let generation = Number(process.env[HANDOFF_ENV.generation]) || 1;
const log = createLogger({ service: 'edge-proxy', generation, level: argv['log-level'] as 'info' });
const proxy = new EdgeProxy(binding, log, options);

const fail = (message: string, error: unknown): never => {
  log.error({ err: error }, message);
  console.error(`edge-proxy: ${message}: ${(error as Error).message}`);
  process.exit(1);
};

try {
  await proxy.connect();
} catch (error) {
  fail('cannot reach the daemons (are Splicer, Bumblebee and Fish running on those sockets?)', error);
}
const taken = await takeOver({ binding, log, participant: proxy, timeoutMs: argv['handoff-timeout'] });
if (taken) {
  generation = taken.generation;
  log.info({ report: taken.report }, `edge proxy took over from pid ${taken.predecessorPid}`);
} else {
  try {
    await proxy.start();
  } catch (error) {
    fail(`cannot start on ${options.clientNetns} (${options.tunName})`, error);
  }
}
log.info({ owner: options.owner, registration: options.registration }, 'edge proxy running');

let state: 'running' | 'handing-over' | 'stopping' = 'running';
/** A stop asked for during a hand-over waits for its outcome: the paused on-ramp and its fds are the hand-over's until then. */
let stopAfterHandOver: NodeJS.Signals | null = null;
onHangup = () => {
  if (state !== 'running') return log.info(`SIGHUP while ${state}: ignored`);
  state = 'handing-over';
  log.info('SIGHUP: handing over to a successor');
  handOver({ binding, log, participant: proxy, service: 'edge-proxy', generation, timeoutMs: argv['handoff-timeout'] }).then(
    async (report) => {
      if (!report.ok) {
        state = 'running';
        log.warn({ failure: report.failure }, 'hand-over rolled back; still serving');
        if (stopAfterHandOver) onStop(stopAfterHandOver);
        return;
      }
      // A stop asked for meanwhile is the successor's now (it holds everything): passed on to it by the pid it reported.
      if (stopAfterHandOver && report.newPid) {
        log.info({ newPid: report.newPid }, `stop requested during the hand-over, which succeeded: passing ${stopAfterHandOver} on to the successor`);
        process.kill(report.newPid, stopAfterHandOver);
      }
      log.info({ newPid: report.newPid, totalMs: report.totalMs }, 'handed over; finishing flows in progress, then exiting');
      await proxy.finishAfterHandOver();
      process.exit(0);
    },
    (error: unknown) => fail('the successor took over and then died', error),
  );
};
function onStop(signal: NodeJS.Signals): void {
  if (state === 'stopping' || stopAfterHandOver) process.exit(1);
  if (state === 'handing-over') {
    log.info({ signal }, 'stop requested during a hand-over: stopping after it, if it rolls back');
    stopAfterHandOver = signal;
    return;
  }
  state = 'stopping';
  log.info({ signal, stats: proxy.stats() }, 'stopping');
  proxy.stop().then(
    () => {
      log.info('stopped');
      process.exit(0);
    },
    (error: unknown) => fail('stop failed', error),
  );
}
onStopSignal = onStop;
if (earlyStop) onStop(earlyStop);

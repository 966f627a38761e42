/**
 * `fdferry up`: runs every daemon that exists so far as child processes in the foreground, with their
 * logs on stdout; Ctrl-C (or SIGTERM) stops them all cleanly. It is how `npm start` tries fdferry
 * without installing anything: it configures nothing in the machine's network.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The daemons that exist so far, in start order. */
export const SERVICES = ['splicer'] as const;

/** Options of {@link runUp}. */
export interface UpOptions {
  runDir: string;
  logLevel: string;
}

/** Starts the daemons and resolves with an exit code once they have all stopped. */
export function runUp(options: UpOptions): Promise<number> {
  const cli = path.join(path.dirname(fileURLToPath(import.meta.url)), 'cli.js');
  const children = new Map<string, ChildProcess>();
  let stopping = false;
  let exitCode = 0;

  return new Promise<number>((resolve) => {
    const stopAll = (reason: string) => {
      if (stopping) return;
      stopping = true;
      console.error(`fdferry up: ${reason}; stopping ${[...children.keys()].join(', ') || 'nothing'}`);
      for (const child of children.values()) child.kill('SIGTERM');
      if (children.size === 0) finish();
    };
    const finish = () => {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      resolve(exitCode);
    };
    const onSignal = (signal: NodeJS.Signals) => stopAll(`${signal} received`);
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);

    for (const service of SERVICES) {
      const args = [cli, service, '--socket', path.join(options.runDir, `${service}.sock`), '--log-level', options.logLevel];
      // A foreground Ctrl-C reaches the whole process group; the daemons get their SIGTERM from us instead.
      const child = spawn(process.execPath, args, { stdio: ['ignore', 'inherit', 'inherit'], detached: true });
      children.set(service, child);
      child.on('exit', (code, signal) => {
        children.delete(service);
        if (!stopping) {
          exitCode = 1;
          stopAll(`${service} exited unexpectedly (${signal ?? `code ${code}`})`);
        } else if (code !== 0) {
          exitCode = 1;
          console.error(`fdferry up: ${service} stopped with ${signal ?? `code ${code}`}`);
        }
        if (children.size === 0 && stopping) finish();
      });
    }
    console.error(`fdferry up: started ${SERVICES.join(', ')} with sockets in ${options.runDir}; Ctrl-C stops them`);
  });
}

/**
 * Prometheus metrics of a daemon (prom-client text exposition), served over the control socket
 * (`fdferry ctl <service> metrics`) and, optionally, on a loopback HTTP port (`--metrics-listen`).
 *
 * Figures live where they are counted — the server's counters, the services' tables, the native
 * engines' atomics — and are read at scrape time: nothing on a hot path touches a metric.
 */
import http from 'node:http';
import fs from 'node:fs';
import net from 'node:net';
import type { Logger } from 'pino';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';

/** One sample: label values and the value. */
export type Sample = [labels: Record<string, string | number>, value: number];

/** A metric a service exposes: read at every scrape. */
export interface MetricSource {
  name: string;
  help: string;
  type: 'counter' | 'gauge';
  labelNames?: string[];
  read: () => Sample[];
}

/** What a hand-over report gives the metrics. */
export interface HandoffFigures {
  ok: boolean;
  totalMs: number;
  pauseMs?: number | null;
}

/** A daemon's metrics registry. */
export class DaemonMetrics {
  readonly registry = new Registry();
  readonly #handoffs: Counter<'outcome'>;
  readonly #handoffSeconds: Histogram<'outcome'>;
  readonly #pauseSeconds: Histogram;

  constructor(service: string, version: string, generation: number) {
    this.registry.setDefaultLabels({ service });
    new Gauge({ name: 'fdferry_info', help: 'Version and generation of this daemon (always 1)', labelNames: ['version', 'generation'], registers: [this.registry] })
      .labels(version, String(generation))
      .set(1);
    new Gauge({
      name: 'fdferry_open_fds',
      help: 'File descriptors open in this process',
      registers: [this.registry],
      collect() {
        try {
          this.set(fs.readdirSync('/proc/self/fd').length);
        } catch {
          // Not Linux /proc: leave the last value.
        }
      },
    });
    this.#handoffs = new Counter({ name: 'fdferry_handoffs_total', help: 'Hand-overs to a successor this process started, by outcome', labelNames: ['outcome'], registers: [this.registry] });
    this.#handoffSeconds = new Histogram({
      name: 'fdferry_handoff_duration_seconds',
      help: 'Whole hand-overs, start to done or rollback',
      labelNames: ['outcome'],
      buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers: [this.registry],
    });
    this.#pauseSeconds = new Histogram({
      name: 'fdferry_handoff_pause_seconds',
      help: 'How long tasks were paused during successful hand-overs',
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers: [this.registry],
    });
  }

  /** Registers a metric read at scrape time. Counters only ever go up: a drop in the source is ignored. */
  add(source: MetricSource): void {
    const labelNames = source.labelNames ?? [];
    if (source.type === 'gauge') {
      new Gauge({
        name: source.name,
        help: source.help,
        labelNames,
        registers: [this.registry],
        collect() {
          this.reset();
          for (const [labels, value] of source.read()) this.set(labels, value);
        },
      });
      return;
    }
    const seen = new Map<string, number>();
    new Counter({
      name: source.name,
      help: source.help,
      labelNames,
      registers: [this.registry],
      collect() {
        for (const [labels, value] of source.read()) {
          const key = JSON.stringify(labels);
          const delta = value - (seen.get(key) ?? 0);
          if (delta > 0) {
            this.inc(labels, delta);
            seen.set(key, value);
          } else if (!seen.has(key)) {
            this.inc(labels, 0);
            seen.set(key, value);
          }
        }
      },
    });
  }

  /** Records a finished hand-over (ours, as the predecessor; or, in a successor, the one that made it). */
  handoff(figures: HandoffFigures): void {
    const outcome = figures.ok ? 'ok' : 'rolled-back';
    this.#handoffs.inc({ outcome });
    this.#handoffSeconds.observe({ outcome }, figures.totalMs / 1000);
    if (figures.ok && typeof figures.pauseMs === 'number') this.#pauseSeconds.observe(figures.pauseMs / 1000);
  }

  /** The text exposition. */
  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}

/** Parses `--metrics-listen` (`port`, `host:port` or `[v6]:port`); only loopback addresses are allowed. */
export function parseMetricsListen(value: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(value) ?? /^()()(\d+)$/.exec(value);
  const host = match?.[1] || match?.[2] || '127.0.0.1';
  const port = Number(match?.[3]);
  if (!match || !Number.isInteger(port) || port < 1 || port > 65_535) throw new Error(`--metrics-listen must be [host:]port, got ${value}`);
  const loopback = host === 'localhost' || host === '::1' || (net.isIPv4(host) && host.startsWith('127.'));
  if (!loopback) throw new Error(`--metrics-listen must be a loopback address (metrics are not for the network), got ${host}`);
  return { host, port };
}

/**
 * Serves GET /metrics on a loopback port. A successor binds while its predecessor may still hold the
 * port for a moment (it closes its server when the hand-over commits): EADDRINUSE is retried for a while.
 */
export function serveMetrics(metrics: DaemonMetrics, address: { host: string; port: number }, log: Logger, retryForMs = 10_000): { close(): void } {
  const server = http.createServer((request, response) => {
    if (request.method !== 'GET' || (request.url !== '/metrics' && request.url !== '/')) {
      response.writeHead(404).end('try /metrics\n');
      return;
    }
    metrics.text().then(
      (text) => response.writeHead(200, { 'content-type': metrics.contentType }).end(text),
      (error: Error) => response.writeHead(500).end(`${error.message}\n`),
    );
  });
  const deadline = Date.now() + retryForMs;
  let timer: NodeJS.Timeout | null = null;
  const listen = () => server.listen(address.port, address.host);
  server.on('error', (error: NodeJS.ErrnoException) => {
    if (error.code === 'EADDRINUSE' && Date.now() < deadline) {
      timer = setTimeout(listen, 100);
      return;
    }
    log.error({ err: error, ...address }, 'cannot serve metrics over HTTP');
  });
  server.on('listening', () => log.info(address, 'serving metrics on http://%s:%d/metrics', address.host, address.port));
  listen();
  server.unref();
  return {
    close: () => {
      if (timer) clearTimeout(timer);
      server.close();
      server.closeAllConnections();
    },
  };
}

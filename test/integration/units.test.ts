/**
 * `fdferry install-units`, `uninstall-units` and `check-config` as an operator runs them (the CLI from
 * source, in a child process):
 *
 * - the units written into a temporary prefix pass `systemd-analyze verify` (systemd 252) with exit 0 and
 *   no output at all, since warnings do not change its exit code; a deliberately broken copy shows the
 *   check is not vacuous;
 * - install-units then uninstall-units leaves the prefix exactly as it was, including an unrelated unit and
 *   an operator's drop-in; a hand-written unit of the same name is never replaced or removed, and
 *   uninstall refuses while `systemctl enable` links still point at the units;
 * - check-config accepts the defaults, prints the effective configuration, and refuses a bad value, an
 *   unknown key and a file that is not JSON with the file's name and the daemon's own reason — and the
 *   daemon refuses the same files.
 *
 * No root needed and no service manager: nothing here starts a unit.
 */
import t from 'tap';
import type { Test } from 'tap';
import { execFile, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cliCommand, tempDir } from '../helpers/daemon.js';

t.setTimeout(180_000);

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const SERVICES = ['splicer', 'bumblebee', 'fish'] as const;
const analyze = spawnSync('systemd-analyze', ['--version'], { encoding: 'utf8' });
const noAnalyze = analyze.status === 0 ? false : 'systemd-analyze is not installed (apt-get install systemd)';
const builtCli = path.join(root, 'dist', 'services', 'cli.js');
const noBuild = fs.existsSync(builtCli) ? false : `${builtCli} is missing (npm run build): install-units points ExecStart= at it`;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command; resolves with its exit code and output whatever the code. */
function run(command: string, args: string[], options: { env?: NodeJS.ProcessEnv } = {}): Promise<Run> {
  return new Promise((resolve) => {
    execFile(command, args, { cwd: root, env: { ...process.env, ...options.env }, timeout: 60_000 }, (error, stdout, stderr) => {
      const code = error ? (typeof (error as { code?: unknown }).code === 'number' ? ((error as { code: number }).code) : -1) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

/** `fdferry <args>` from the sources. */
function fdferry(...args: string[]): Promise<Run> {
  const { command, args: base } = cliCommand();
  return run(command, [...base, ...args]);
}

/** Every file under `dir` with its mode and content (or link target): a before/after picture. */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (sub: string) => {
    for (const entry of fs.readdirSync(path.join(dir, sub), { withFileTypes: true })) {
      const rel = path.join(sub, entry.name);
      const full = path.join(dir, rel);
      const stat = fs.lstatSync(full);
      if (entry.isSymbolicLink()) out[rel] = `link -> ${fs.readlinkSync(full)}`;
      else if (entry.isDirectory()) {
        out[`${rel}/`] = `dir ${(stat.mode & 0o7777).toString(8)}`;
        walk(rel);
      } else out[rel] = `file ${(stat.mode & 0o7777).toString(8)} ${fs.readFileSync(full, 'utf8')}`;
    }
  };
  walk('');
  return out;
}

/** A prefix that already holds someone else's things. */
function busyPrefix(t: Test): string {
  const dir = tempDir(t, 'fdf-units-');
  fs.writeFileSync(path.join(dir, 'unrelated.service'), '[Service]\nExecStart=/bin/true\n', { mode: 0o644 });
  fs.mkdirSync(path.join(dir, 'fdferry-splicer.service.d'));
  fs.writeFileSync(path.join(dir, 'fdferry-splicer.service.d', 'override.conf'), '[Service]\nEnvironment=A=1\n');
  fs.mkdirSync(path.join(dir, 'multi-user.target.wants'));
  fs.symlinkSync(path.join(dir, 'unrelated.service'), path.join(dir, 'multi-user.target.wants', 'unrelated.service'));
  return dir;
}

const valueOf = (text: string, key: string): string => text.split('\n').find((line) => line.startsWith(`${key}=`))!.slice(key.length + 1);

t.test('install-units writes units systemd-analyze verify accepts without a warning; uninstall-units undoes it exactly', { skip: noAnalyze || noBuild }, async (t) => {
  const dir = busyPrefix(t);
  const before = snapshot(dir);

  const installed = await fdferry('install-units', '--prefix', dir);
  t.equal(installed.code, 0, `install-units exits 0; stderr: ${installed.stderr}`);
  for (const service of SERVICES) {
    for (const suffix of ['service', 'socket']) t.match(installed.stdout, `wrote ${path.join(dir, `fdferry-${service}.${suffix}`)}\n`);
  }
  t.match(installed.stdout, '\n  systemctl daemon-reload\n');
  t.match(installed.stdout, '\n  systemctl enable --now fdferry-splicer.socket fdferry-bumblebee.socket fdferry-fish.socket\n');

  for (const service of SERVICES) {
    const unit = path.join(dir, `fdferry-${service}.service`);
    const socket = path.join(dir, `fdferry-${service}.socket`);
    const text = fs.readFileSync(unit, 'utf8');
    const [executable, script] = valueOf(text, 'ExecStart').split(' ');
    t.equal(executable, process.execPath, 'ExecStart= runs this Node binary');
    t.equal(script, builtCli, '...with this installation\'s dist/services/cli.js');
    t.equal(valueOf(fs.readFileSync(socket, 'utf8'), 'ListenSequentialPacket'), `/run/fdferry-${service}/${service}.sock`);

    const verified = await run('systemd-analyze', ['verify', unit, socket]);
    t.equal(verified.code, 0, `systemd-analyze verify ${service}: exit 0`);
    t.equal(verified.stdout + verified.stderr, '', `systemd-analyze verify ${service}: no warning at all`);
  }

  // The same check sees a warning when there is one (so the empty output above means something).
  const broken = tempDir(t, 'fdf-units-broken-');
  for (const suffix of ['service', 'socket']) fs.copyFileSync(path.join(dir, `fdferry-splicer.${suffix}`), path.join(broken, `fdferry-splicer.${suffix}`));
  fs.appendFileSync(path.join(broken, 'fdferry-splicer.service'), 'NoSuchDirective=yes\n');
  const complaint = await run('systemd-analyze', ['verify', path.join(broken, 'fdferry-splicer.service'), path.join(broken, 'fdferry-splicer.socket')]);
  t.match(complaint.stdout + complaint.stderr, /Unknown key 'NoSuchDirective'/, 'a bad key is reported');

  const again = await fdferry('install-units', '--prefix', dir);
  t.equal(again.code, 0);
  t.match(again.stdout, `unchanged ${path.join(dir, 'fdferry-splicer.service')}`, 'installing twice changes nothing');

  const removed = await fdferry('uninstall-units', '--prefix', dir);
  t.equal(removed.code, 0, `uninstall-units exits 0; stderr: ${removed.stderr}`);
  t.match(removed.stdout, `removed ${path.join(dir, 'fdferry-bumblebee.socket')}`);
  t.same(snapshot(dir), before, 'the prefix is exactly as it was (unrelated unit, drop-in, links)');
});

t.test('the rendered ExecStartPre= and the first ExecReload= run and pass on this machine', { skip: noBuild || (fs.existsSync(path.join(root, 'dist', 'services', 'check-config.js')) ? false : 'dist/ predates check-config (npm run build:ts)') }, async (t) => {
  const dir = tempDir(t, 'fdf-units-');
  t.equal((await fdferry('install-units', '--prefix', dir)).code, 0);
  for (const service of SERVICES) {
    const text = fs.readFileSync(path.join(dir, `fdferry-${service}.service`), 'utf8');
    const pre = valueOf(text, 'ExecStartPre');
    t.equal(text.split('\n').find((line) => line.startsWith('ExecReload='))!.slice('ExecReload='.length), pre, 'the first ExecReload= is the same check');
    t.notMatch(pre, /["\\%$]/, 'nothing to unquote in this installation\'s paths');
    const [command, ...args] = pre.split(' ');
    const checked = await run(command!, args);
    t.equal(checked.code, 0, `${pre}: exit 0; stderr: ${checked.stderr}`);
    t.match(checked.stdout, new RegExp(`^ok: ${service} configuration is valid`));
  }
});

t.test('install-units: dry run, --services, --fdferry', async (t) => {
  const dir = tempDir(t, 'fdf-units-');
  const dry = await fdferry('install-units', '--prefix', dir, '--dry-run');
  t.equal(dry.code, 0);
  t.same(fs.readdirSync(dir), [], 'a dry run writes nothing');
  for (const service of SERVICES) {
    t.match(dry.stdout, `# ---- ${dir}/fdferry-${service}.service (dry run: not written) ----\n# Generated by \`fdferry install-units\``);
    t.match(dry.stdout, `ListenSequentialPacket=/run/fdferry-${service}/${service}.sock`);
  }

  const only = await fdferry('install-units', '--prefix', dir, '--services', 'bumblebee', '--fdferry', '/bin/true');
  t.equal(only.code, 0, only.stderr);
  t.same(fs.readdirSync(dir).sort(), ['fdferry-bumblebee.service', 'fdferry-bumblebee.socket']);
  t.equal(valueOf(fs.readFileSync(path.join(dir, 'fdferry-bumblebee.service'), 'utf8'), 'ExecStart'), '/bin/true bumblebee --socket /run/fdferry-bumblebee/bumblebee.sock');

  const relative = await fdferry('install-units', '--prefix', dir, '--fdferry', 'bin/fdferry');
  t.equal(relative.code, 1);
  t.match(relative.stderr, 'must be an absolute path');
  const missing = await fdferry('install-units', '--prefix', dir, '--fdferry', '/nonexistent/fdferry');
  t.equal(missing.code, 1);
  t.match(missing.stderr, 'is not an executable file');
  const unknown = await fdferry('install-units', '--prefix', dir, '--services', 'splicer,fishy');
  t.equal(unknown.code, 1);
  t.match(unknown.stderr, 'unknown fishy');
  const nowhere = await fdferry('install-units', '--prefix', path.join(dir, 'nope'), '--fdferry', '/bin/true');
  t.equal(nowhere.code, 1);
  t.match(nowhere.stderr, 'does not exist');
});

t.test('a hand-written unit is never replaced or removed; uninstall waits for systemctl disable', async (t) => {
  const dir = tempDir(t, 'fdf-units-');
  const mine = '[Unit]\nDescription=my own splicer\n';
  fs.writeFileSync(path.join(dir, 'fdferry-splicer.service'), mine);
  const refused = await fdferry('install-units', '--prefix', dir, '--services', 'splicer', '--fdferry', '/bin/true');
  t.equal(refused.code, 1);
  t.match(refused.stderr, 'not written by fdferry install-units, refusing to replace (use --force)');
  t.same(fs.readdirSync(dir), ['fdferry-splicer.service'], 'nothing written, not even the socket');
  const left = await fdferry('uninstall-units', '--prefix', dir, '--services', 'splicer');
  t.equal(left.code, 0);
  t.match(left.stdout, 'not written by fdferry install-units');
  t.equal(fs.readFileSync(path.join(dir, 'fdferry-splicer.service'), 'utf8'), mine, 'still there, untouched');

  const clean = tempDir(t, 'fdf-units-');
  t.equal((await fdferry('install-units', '--prefix', clean, '--services', 'splicer', '--fdferry', '/bin/true')).code, 0);
  fs.mkdirSync(path.join(clean, 'sockets.target.wants'));
  const link = path.join(clean, 'sockets.target.wants', 'fdferry-splicer.socket');
  fs.symlinkSync(path.join(clean, 'fdferry-splicer.socket'), link);
  const enabled = await fdferry('uninstall-units', '--prefix', clean, '--services', 'splicer');
  t.equal(enabled.code, 1, 'refused while enabled');
  t.match(enabled.stderr, 'still enabled');
  t.match(enabled.stderr, 'systemctl disable --now fdferry-splicer.service fdferry-splicer.socket');
  t.ok(fs.existsSync(path.join(clean, 'fdferry-splicer.service')));
  const forced = await fdferry('uninstall-units', '--prefix', clean, '--services', 'splicer', '--force');
  t.equal(forced.code, 0);
  t.notOk(fs.existsSync(path.join(clean, 'fdferry-splicer.service')));
  t.ok(fs.lstatSync(link).isSymbolicLink(), 'systemctl\'s link is not ours to remove');
});

t.test('check-config accepts the defaults and prints the effective configuration', async (t) => {
  const dir = tempDir(t, 'fdf-config-');
  const empty = path.join(dir, 'empty.json');
  fs.writeFileSync(empty, '{}\n');
  for (const service of SERVICES) {
    const checked = await fdferry('check-config', service, '--config', empty);
    t.equal(checked.code, 0, `${service}: exit 0; stderr: ${checked.stderr}`);
    const [first, ...rest] = checked.stdout.split('\n');
    t.equal(first, `ok: ${service} configuration is valid (config file ${empty})`);
    const effective = JSON.parse(rest.join('\n')) as { service: string; configFile: string; flags: Record<string, unknown>; options: Record<string, unknown> };
    t.equal(effective.service, service);
    t.equal(effective.configFile, empty);
    t.equal(effective.flags['handoff-timeout'], 10_000, 'flags under their config-file names');
    t.equal(effective.flags.socket, `/run/fdferry/${service}.sock`);
    t.notOk('handoffTimeout' in effective.flags, 'no camelCase duplicates');
    t.equal(effective.options.handoffTimeoutMs, 10_000, 'and what the daemon is started with');
    // Fish has no grace: a stop ends every registration at once (its flows are stateless to it).
    if (service !== 'fish') t.equal(effective.options.shutdownGraceMs, service === 'splicer' ? 30_000 : 10_000);

    const quiet = await fdferry('check-config', service, '--config', empty, '--quiet', '--socket', `/run/fdferry-${service}/${service}.sock`);
    t.equal(quiet.code, 0);
    t.equal(quiet.stdout, `ok: ${service} configuration is valid (config file ${empty})\n`, '--quiet: the ok line only');
  }
  if (!fs.existsSync('/etc/fdferry/splicer.json')) {
    const bare = await fdferry('check-config', 'splicer');
    t.equal(bare.code, 0);
    t.equal(bare.stdout.split('\n')[0], 'ok: splicer configuration is valid (defaults and flags; there is no /etc/fdferry/splicer.json)');
  }
  const none = await fdferry('check-config');
  t.equal(none.code, 1);
  t.match(none.stderr, 'name a daemon: splicer, bumblebee, fish');
  const other = await fdferry('check-config', 'fishy');
  t.equal(other.code, 1);
  t.match(other.stderr, 'unknown daemon fishy (known: splicer, bumblebee, fish)');
});

t.test('check-config refuses what the daemon refuses, naming the file and the reason', async (t) => {
  const dir = tempDir(t, 'fdf-config-');
  const file = (name: string, text: string) => {
    const full = path.join(dir, name);
    fs.writeFileSync(full, text);
    return full;
  };
  const cases: Array<{ service: string; name: string; config: string; reason: string; daemonReason: string }> = [
    {
      service: 'splicer',
      name: 'bad value',
      config: file('zero-threads.json', '{"threads": 0}'),
      reason: '--threads must be a positive integer, got 0',
      daemonReason: '--threads must be a positive integer, got 0',
    },
    {
      service: 'bumblebee',
      name: 'value out of range',
      config: file('small-mtu.json', '{"mtu": 100}'),
      reason: '--mtu must be an integer from 1280 to 65535, got 100',
      daemonReason: '--mtu must be an integer from 1280 to 65535, got 100',
    },
    {
      service: 'splicer',
      name: 'wrong type',
      config: file('socket-mode.json', '{"socket-mode": "rw-rw----"}'),
      reason: '--socket-mode must be octal like 0660, got rw-rw----',
      daemonReason: '--socket-mode must be octal like 0660, got rw-rw----',
    },
    {
      service: 'splicer',
      name: 'unknown key',
      config: file('typo.json', '{"max-taks": 10}'),
      reason: 'unknown key max-taks: every config key and flag must be one of `fdferry splicer --help`',
      daemonReason: 'Unknown arguments: max-taks, maxTaks',
    },
    {
      service: 'bumblebee',
      name: 'not JSON',
      config: file('broken.json', '{"mtu": '),
      reason: 'JSON',
      daemonReason: 'JSON',
    },
  ];
  // Every CLI run starts Node and tsx (about a second): run the cases side by side, check them in order.
  const runs = await Promise.all(
    cases.map((c) =>
      Promise.all([
        fdferry('check-config', c.service, '--config', c.config),
        // The daemon refuses the same file, before it touches anything.
        fdferry(c.service, '--config', c.config, '--socket', path.join(dir, `${c.service}-${path.basename(c.config)}.sock`)),
      ]),
    ),
  );
  for (const [i, c] of cases.entries()) {
    const [checked, daemon] = runs[i]!;
    t.equal(checked.code, 1, `${c.name}: exit 1`);
    t.equal(checked.stdout, '', `${c.name}: nothing on stdout`);
    t.match(checked.stderr, `fdferry check-config: ${c.service}: invalid configuration (config file ${c.config}): `, `${c.name}: names the file`);
    t.match(checked.stderr, c.reason, `${c.name}: says why`);
    t.notMatch(checked.stderr, /maxTaks/, `${c.name}: no camelCase twin`);

    t.not(daemon.code, 0, `${c.name}: the daemon refuses it too`);
    t.match(daemon.stderr, c.daemonReason);
    t.notOk(fs.existsSync(path.join(dir, `${c.service}-${path.basename(c.config)}.sock`)), `${c.name}: the daemon never listened`);
  }

  const missing = await fdferry('check-config', 'splicer', '--config', path.join(dir, 'nope.json'));
  t.equal(missing.code, 1);
  t.match(missing.stderr, `(config file ${path.join(dir, 'nope.json')}): ENOENT`);

  const flag = await fdferry('check-config', 'splicer', '--config', file('ok.json', '{}'), '--max-pipes', '0');
  t.equal(flag.code, 1, 'a bad flag is refused like a bad key');
  t.match(flag.stderr, '--max-pipes must be a positive integer, got 0');
  const flagWins = await fdferry('check-config', 'splicer', '--config', cases[0]!.config, '--threads', '2', '--quiet');
  t.equal(flagWins.code, 0, 'flags win over the file, as in the daemon');
});

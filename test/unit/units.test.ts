/**
 * Unit rendering for `fdferry install-units`, without root and without systemd: every directive the
 * baseline requires is there for every daemon, paths are absolute, each daemon has its own runtime
 * directory and socket, the numbers follow the configuration (TimeoutStartSec >= 2x the hand-over
 * deadline), quoting is safe, and the file operations touch only what install-units wrote.
 * `systemd-analyze verify` of the real files is in test/integration/units.test.ts.
 */
import t from 'tap';
import type { Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseServices } from '../../services/install-units.js';
import type { EntryPoint } from '../../services/units/entry-point.js';
import { underHome } from '../../services/units/entry-point.js';
import { enablementLinks, installUnitFiles, uninstallUnitFiles } from '../../services/units/files.js';
import { GENERATED_MARKER, isGenerated, valuesOf } from '../../services/units/ini.js';
import { serviceLayout } from '../../services/units/layout.js';
import { PROFILES } from '../../services/units/profiles.js';
import { commandLine, quoteArg, quotePath } from '../../services/units/quote.js';
import { type UnitFile, renderUnits } from '../../services/units/render.js';
import { type SizingInput, unitSizing } from '../../services/units/sizing.js';
import { SERVICES } from '../../services/up.js';

const NODE = '/usr/bin/node';
const CLI = '/opt/fdferry/lib/node_modules/fdferry/dist/services/cli.js';
const entryPoint: EntryPoint = { command: [NODE, CLI], packageRoot: '/opt/fdferry/lib/node_modules/fdferry', paths: [NODE, CLI] };
const DEFAULT_SIZING: SizingInput = { handoffTimeoutMs: 10_000, shutdownGraceMs: 30_000, fds: 19_328, watchdogSec: 30 };

const render = (service: string, sizing: Partial<SizingInput> = {}, entry: EntryPoint = entryPoint): { service: string; socket: string } => {
  const units = renderUnits({ service, entryPoint: entry, version: '9.9.9', sizing: { ...DEFAULT_SIZING, ...sizing } });
  const layout = serviceLayout(service);
  const byName = (name: string) => units.find((unit: UnitFile) => unit.name === name)!.text;
  return { service: byName(layout.serviceUnit), socket: byName(layout.socketUnit) };
};

/** The one value of `key` (fails the test if there is not exactly one). */
const one = (t: Test, text: string, key: string): string => {
  const values = valuesOf(text, key);
  t.equal(values.length, 1, `exactly one ${key}=`);
  return values[0] ?? '';
};

const seconds = (value: string): number => {
  const match = /^(\d+)s$/.exec(value);
  if (!match) throw new Error(`not a number of seconds: ${value}`);
  return Number(match[1]);
};

t.test('every daemon of `fdferry up` has a unit profile', (t) => {
  t.same(Object.keys(PROFILES).sort(), [...SERVICES].sort());
  t.end();
});

for (const name of SERVICES) {
  t.test(`${name}: the service unit has every directive of the baseline`, (t) => {
    const { service } = render(name);
    const layout = serviceLayout(name);
    const socketArgs = `--socket ${layout.socketPath}`;
    t.ok(service.startsWith(`${GENERATED_MARKER} (fdferry 9.9.9): ${layout.serviceUnit}\n`), 'generated-file header with the version');
    t.ok(isGenerated(service));

    t.equal(one(t, service, 'Requires'), layout.socketUnit);
    t.equal(one(t, service, 'After'), layout.socketUnit);
    t.equal(one(t, service, 'Type'), 'notify');
    t.equal(one(t, service, 'NotifyAccess'), 'all');
    t.equal(one(t, service, 'ExecStartPre'), `${NODE} ${CLI} check-config ${name} --quiet ${socketArgs}`);
    // Splicer survives a crash through the fd store; Bumblebee has nothing to keep there.
    t.equal(one(t, service, 'ExecStart'), `${NODE} ${CLI} ${name} ${socketArgs}${name === 'splicer' ? ' --fd-store' : ''}`);
    const reload = valuesOf(service, 'ExecReload');
    t.same(reload, [
      `${NODE} ${CLI} check-config ${name} --quiet ${socketArgs}`,
      `${NODE} ${CLI} ctl ${name} reload --wait --timeout 15000 ${socketArgs}`,
    ], 'ExecReload= checks the configuration, then waits for the hand-over');
    t.equal(one(t, service, 'KillMode'), 'mixed');
    t.equal(one(t, service, 'Restart'), 'on-failure');
    t.equal(one(t, service, 'SendSIGHUP'), 'no');
    t.ok(Number(one(t, service, 'LimitNOFILE')) >= 65_536, 'LimitNOFILE= raised');
    t.ok(Number(one(t, service, 'FileDescriptorStoreMax')) >= 16_384, 'FileDescriptorStoreMax= non-zero');
    t.ok(seconds(one(t, service, 'TimeoutStartSec')) >= 30);
    t.ok(seconds(one(t, service, 'TimeoutStopSec')) > 0);
    t.equal(one(t, service, 'WatchdogSec'), '30s');
    t.equal(one(t, service, 'RuntimeDirectory'), `fdferry-${name}`);
    t.equal(one(t, service, 'RuntimeDirectoryPreserve'), 'yes');
    t.equal(one(t, service, 'SyslogIdentifier'), `fdferry-${name}`);
    t.equal(one(t, service, 'EnvironmentFile'), `-/etc/default/fdferry-${name}`);

    // Hardening every daemon gets.
    for (const [key, value] of Object.entries({
      NoNewPrivileges: 'yes',
      ProtectSystem: 'strict',
      ProtectHome: 'yes',
      PrivateTmp: 'yes',
      ProtectKernelModules: 'yes',
      ProtectControlGroups: 'yes',
      LockPersonality: 'yes',
      MemoryDenyWriteExecute: 'no',
      SystemCallArchitectures: 'native',
      RestrictRealtime: 'yes',
      RestrictSUIDSGID: 'yes',
    })) {
      t.equal(one(t, service, key), value, `${key}=${value}`);
    }
    t.same(valuesOf(service, 'PrivateNetwork'), [], 'no PrivateNetwork=');
    t.same(valuesOf(service, 'User'), [], 'runs as root');
    const families = one(t, service, 'RestrictAddressFamilies').split(' ');
    for (const family of ['AF_UNIX', 'AF_INET', 'AF_INET6']) t.ok(families.includes(family), family);
    t.match(service, /\n# Must stay off: V8/, 'MemoryDenyWriteExecute=no says why');

    t.equal(one(t, service, 'WantedBy'), 'multi-user.target');
    t.equal(one(t, service, 'Also'), layout.socketUnit);
    t.end();
  });

  t.test(`${name}: the socket unit listens where ExecStart= says`, (t) => {
    const { service, socket } = render(name);
    const layout = serviceLayout(name);
    t.ok(socket.startsWith(`${GENERATED_MARKER} (fdferry 9.9.9): ${layout.socketUnit}\n`));
    const listen = one(t, socket, 'ListenSequentialPacket');
    t.equal(listen, `/run/fdferry-${name}/${name}.sock`);
    t.equal(path.dirname(listen), `/run/${one(t, service, 'RuntimeDirectory')}`, 'inside the service\'s RuntimeDirectory=');
    t.ok(one(t, service, 'ExecStart').includes(`--socket ${listen}`), 'ExecStart= passes the same path');
    for (const reload of valuesOf(service, 'ExecReload')) t.ok(reload.endsWith(`--socket ${listen}`), 'so does ExecReload=');
    t.ok(Buffer.byteLength(listen) < 108, 'fits in sun_path');
    t.equal(one(t, socket, 'SocketMode'), '0660');
    t.equal(one(t, socket, 'SocketUser'), 'root');
    t.equal(one(t, socket, 'SocketGroup'), 'root');
    t.equal(one(t, socket, 'FileDescriptorName'), name);
    t.equal(one(t, socket, 'Service'), layout.serviceUnit);
    t.equal(one(t, socket, 'Accept'), 'no');
    t.equal(one(t, socket, 'WantedBy'), 'sockets.target');
    t.end();
  });

  t.test(`${name}: every command and path is absolute`, (t) => {
    const { service, socket } = render(name);
    for (const key of ['ExecStartPre', 'ExecStart', 'ExecReload']) {
      for (const line of valuesOf(service, key)) t.ok(path.isAbsolute(line.split(' ')[0]!), `${key}= starts with an absolute path`);
    }
    t.ok(path.isAbsolute(one(t, service, 'EnvironmentFile').replace(/^-/, '')));
    t.ok(path.isAbsolute(one(t, socket, 'ListenSequentialPacket')));
    for (const url of [...valuesOf(service, 'Documentation'), ...valuesOf(socket, 'Documentation')]) t.match(url, /^file:\/\/\//);
    t.throws(() => render(name, {}, { command: ['node', 'cli.js'], packageRoot: null, paths: [] }), /absolute path/, 'a relative entry point is refused');
    t.end();
  });
}

t.test('each daemon has its own unit names, runtime directory and socket', (t) => {
  const layouts = SERVICES.map(serviceLayout);
  for (const key of ['serviceUnit', 'socketUnit', 'runtimeDirectory', 'socketPath', 'environmentFile'] as const) {
    t.equal(new Set(layouts.map((layout) => layout[key])).size, layouts.length, `${key} distinct`);
  }
  const runtimeDirs = SERVICES.map((name) => one(t, render(name).service, 'RuntimeDirectory'));
  t.equal(new Set(runtimeDirs).size, SERVICES.length, 'RuntimeDirectory= distinct in the rendered units');
  t.notOk(runtimeDirs.includes('fdferry'), 'no shared /run/fdferry');
  t.end();
});

t.test('capabilities and sandbox per daemon', (t) => {
  const splicer = render('splicer').service;
  t.equal(one(t, splicer, 'CapabilityBoundingSet'), 'CAP_SYS_RESOURCE');
  t.equal(one(t, splicer, 'RestrictNamespaces'), 'yes');
  t.equal(one(t, splicer, 'PrivateDevices'), 'yes');
  t.equal(one(t, splicer, 'ProtectKernelTunables'), 'yes');
  t.equal(one(t, splicer, 'RestrictAddressFamilies'), 'AF_UNIX AF_INET AF_INET6');

  const bumblebee = render('bumblebee').service;
  t.equal(one(t, bumblebee, 'CapabilityBoundingSet'), 'CAP_SYS_ADMIN CAP_NET_ADMIN');
  t.equal(one(t, bumblebee, 'RestrictNamespaces'), 'net', 'network namespaces only');
  t.same(valuesOf(bumblebee, 'PrivateDevices'), [], 'no PrivateDevices= (it would hide /dev/net/tun)');
  t.equal(one(t, bumblebee, 'DevicePolicy'), 'closed');
  t.equal(one(t, bumblebee, 'DeviceAllow'), '/dev/net/tun rw');
  t.same(valuesOf(bumblebee, 'ProtectKernelTunables'), [], 'no ProtectKernelTunables= (per-netns sysctls)');
  t.equal(one(t, bumblebee, 'RestrictAddressFamilies'), 'AF_UNIX AF_INET AF_INET6 AF_NETLINK');
  t.end();
});

t.test('TimeoutStartSec= is at least twice the hand-over deadline; the reload client gives up first', (t) => {
  for (const handoffTimeoutMs of [1, 999, 10_000, 14_500, 30_000, 120_000, 3_600_000]) {
    const sizing = unitSizing({ ...DEFAULT_SIZING, handoffTimeoutMs });
    t.ok(sizing.timeoutStartSec * 1000 >= 2 * handoffTimeoutMs, `${handoffTimeoutMs} ms: TimeoutStartSec=${sizing.timeoutStartSec}s`);
    t.ok(sizing.timeoutStartSec >= 30);
    t.ok(sizing.reloadClientTimeoutMs > handoffTimeoutMs, 'the reload client outwaits the hand-over');
    t.ok(sizing.reloadClientTimeoutMs < sizing.timeoutStartSec * 1000, 'and gives up before systemd kills it');
    t.ok(sizing.timeoutStopSec * 1000 >= handoffTimeoutMs + DEFAULT_SIZING.shutdownGraceMs, 'stop: rollback + grace');
    const text = render('splicer', { handoffTimeoutMs }).service;
    t.equal(seconds(one(t, text, 'TimeoutStartSec')), sizing.timeoutStartSec, 'the rendered unit uses it');
  }
  t.equal(unitSizing(DEFAULT_SIZING).timeoutStartSec, 30, 'the default 10 s deadline gives 30 s');
  t.end();
});

t.test('fd limits follow the configured limits', (t) => {
  const small = unitSizing({ ...DEFAULT_SIZING, fds: 100 });
  t.equal(small.fileDescriptorStoreMax, 16_384);
  t.equal(small.limitNoFile, 65_536);
  const big = unitSizing({ ...DEFAULT_SIZING, fds: 200_000 });
  t.equal(big.fileDescriptorStoreMax, 200_000);
  t.equal(big.limitNoFile, 400_000);
  // The profiles count like the daemons' own start-up warnings.
  const splicerFds = (PROFILES.splicer!.sizing as unknown as (c: unknown, o: unknown) => { fds: number })(
    { maxConnections: 1024 },
    { shutdownGraceMs: 1, tasks: { maxTasks: 8000 }, engine: { maxPipes: 1024 } },
  ).fds;
  t.equal(splicerFds, 2 * 8000 + 2 * 1024 + 1024 + 256);
  t.end();
});

t.test('the watchdog', (t) => {
  t.same(valuesOf(render('splicer', { watchdogSec: 0 }).service, 'WatchdogSec'), [], '--watchdog-sec 0 leaves it out');
  t.equal(one(t, render('splicer', { watchdogSec: 45 }).service, 'WatchdogSec'), '45s');
  t.throws(() => unitSizing({ ...DEFAULT_SIZING, watchdogSec: 5 }), /at least 10/, 'shorter than a hand-over phase is refused');
  t.end();
});

t.test('an installation under /root or /home gets ProtectHome=read-only', (t) => {
  t.ok(underHome('/root/.nvm/versions/node/v20.19.0/bin/node'));
  t.ok(underHome('/home/ops/fdferry/dist/services/cli.js'));
  t.notOk(underHome('/usr/bin/node'));
  t.notOk(underHome('/homework/x'));
  const node = '/root/.nvm/versions/node/v20.19.0/bin/node';
  const text = render('splicer', {}, { command: [node, CLI], packageRoot: null, paths: [node, CLI] }).service;
  t.equal(one(t, text, 'ProtectHome'), 'read-only');
  t.same(valuesOf(text, 'Documentation'), [], 'no Documentation= without a package root');
  t.end();
});

t.test('quoting', (t) => {
  t.equal(quoteArg('/usr/bin/node'), '/usr/bin/node');
  t.equal(quoteArg('--socket'), '--socket');
  t.equal(quoteArg('/opt/my fdferry/cli.js'), '"/opt/my fdferry/cli.js"');
  t.equal(quoteArg('100%'), '100%%', 'specifiers escaped');
  t.equal(quoteArg('$HOME'), '$$HOME', 'no environment expansion');
  t.equal(quoteArg('a"b\\c'), '"a\\"b\\\\c"');
  t.equal(quoteArg(''), '""');
  t.equal(quoteArg(';'), '";"', 'a lone ; is not a command separator');
  t.throws(() => quoteArg('a\nb'), /control character/);
  t.equal(commandLine(['/opt/a b/node', 'x']), '"/opt/a b/node" x');
  t.throws(() => commandLine(['node']), /absolute path/);
  t.equal(quotePath('/run/a%b'), '/run/a%%b');
  t.throws(() => quotePath('/run/a b'), /whitespace/);
  t.end();
});

t.test('--services', (t) => {
  t.same(parseServices('splicer,bumblebee'), ['splicer', 'bumblebee']);
  t.same(parseServices(' bumblebee , bumblebee'), ['bumblebee']);
  t.throws(() => parseServices('splicer,fishy'), /unknown fishy/);
  t.throws(() => parseServices(','), /no daemon/);
  t.end();
});

t.test('files: install, reinstall, refuse foreign files, uninstall only ours', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fdf-units-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const units = renderUnits({ service: 'splicer', entryPoint, version: '1', sizing: DEFAULT_SIZING });
  fs.writeFileSync(path.join(dir, 'other.service'), '[Service]\nExecStart=/bin/true\n');

  t.same(installUnitFiles(dir, units, { force: false }).map((r) => r.status), ['written', 'written']);
  for (const unit of units) {
    t.equal(fs.readFileSync(path.join(dir, unit.name), 'utf8'), unit.text);
    t.equal(fs.statSync(path.join(dir, unit.name)).mode & 0o777, 0o644);
  }
  t.same(installUnitFiles(dir, units, { force: false }).map((r) => r.status), ['unchanged', 'unchanged'], 'idempotent');
  t.same(fs.readdirSync(dir).sort(), ['fdferry-splicer.service', 'fdferry-splicer.socket', 'other.service'], 'no temporary files left');

  // A hand-written unit of the same name is not ours: refused, and nothing is written.
  const bumblebee = renderUnits({ service: 'bumblebee', entryPoint, version: '1', sizing: DEFAULT_SIZING });
  fs.writeFileSync(path.join(dir, 'fdferry-bumblebee.socket'), '[Socket]\nListenStream=/x\n');
  t.throws(() => installUnitFiles(dir, bumblebee, { force: false }), /not written by fdferry install-units/);
  t.notOk(fs.existsSync(path.join(dir, 'fdferry-bumblebee.service')), 'all or nothing');

  const links = path.join(dir, 'sockets.target.wants');
  fs.mkdirSync(links);
  fs.symlinkSync(path.join(dir, 'fdferry-splicer.socket'), path.join(links, 'fdferry-splicer.socket'));
  t.same(enablementLinks(dir, ['fdferry-splicer.service', 'fdferry-splicer.socket']), [path.join(links, 'fdferry-splicer.socket')]);

  const names = ['fdferry-splicer.service', 'fdferry-splicer.socket', 'fdferry-bumblebee.service', 'fdferry-bumblebee.socket'];
  const result = uninstallUnitFiles(dir, names);
  t.same(result.removed, [path.join(dir, 'fdferry-splicer.service'), path.join(dir, 'fdferry-splicer.socket')]);
  t.same(result.foreign, [path.join(dir, 'fdferry-bumblebee.socket')]);
  t.same(result.missing, [path.join(dir, 'fdferry-bumblebee.service')]);
  t.ok(fs.existsSync(path.join(dir, 'fdferry-bumblebee.socket')), 'the hand-written unit is still there');
  t.ok(fs.lstatSync(path.join(links, 'fdferry-splicer.socket')).isSymbolicLink(), 'systemctl\'s links are left alone');
  t.throws(() => installUnitFiles(path.join(dir, 'nope'), units, { force: false }), /does not exist/);
  t.end();
});

/**
 * The `.service` unit of one daemon. The reasoning behind the baseline is in
 * ../shared/notes/systemd-restart.md (§2 baseline, §3 hand-over, §6 stop, §7 hardening); each setting
 * carries its reason as a comment in the rendered file, and docs/operations.md ("Units") explains them.
 */
import { type Entry, renderUnitFile } from './ini.js';
import type { ServiceLayout } from './layout.js';
import type { DaemonProfile } from './profiles.js';
import { commandLine, quotePath } from './quote.js';
import type { UnitSizing } from './sizing.js';

/** What a service unit is rendered from. */
export interface ServiceUnitInput {
  layout: ServiceLayout;
  profile: DaemonProfile<never>;
  sizing: UnitSizing;
  /** Absolute command prefix that runs `fdferry` (e.g. `[/usr/bin/node, /opt/fdferry/dist/services/cli.js]`). */
  fdferry: readonly string[];
  /** The fdferry version, for the header. */
  version: string;
  /** Whether the installation lives under /home, /root or /run/user (then ProtectHome=read-only). */
  installedUnderHome: boolean;
  /** `file:` URLs for `Documentation=`, if the docs are installed. */
  documentation: string[];
}

/** Renders `fdferry-<service>.service`. */
export function renderServiceUnit(input: ServiceUnitInput): string {
  const { layout, profile, sizing } = input;
  const { service } = layout;
  const fdferry = (...args: string[]) => commandLine([...input.fdferry, ...args]);
  const socketArgs = ['--socket', layout.socketPath];

  const unit: Entry[] = [
    { key: 'Description', value: profile.description },
    ...input.documentation.map((url) => ({ key: 'Documentation', value: url })),
    {
      key: 'Requires',
      value: layout.socketUnit,
      why: 'The control socket is bound by the .socket unit and handed in (LISTEN_FDS); it outlives restarts of this service.',
    },
    { key: 'After', value: layout.socketUnit },
  ];

  const process: Entry[] = [
    {
      key: 'Type',
      value: 'notify',
      why: 'READY=1 once listening (or once a successor took over: MAINPID= + READY=1 + BARRIER=1).',
    },
    {
      key: 'NotifyAccess',
      value: 'all',
      why: 'A successor speaks before it is the main PID, and both generations notify during a hand-over.',
    },
    {
      key: 'ExecStartPre',
      value: fdferry('check-config', service, '--quiet', ...socketArgs),
      why: `Refuse to start on a bad ${layout.configFile} (or flags), with the reason in the journal.`,
    },
    {
      key: 'ExecStart',
      value: fdferry(service, ...socketArgs, ...profile.startArgs.map((arg) => arg.value)),
      why:
        'The socket path is fixed here (a "socket" key in the config file is overridden) and must match ' +
        `ListenSequentialPacket= in ${layout.socketUnit}. Every other setting comes from ${layout.configFile}.` +
        profile.startArgs.map((arg) => ` ${arg.value}: ${arg.why}.`).join(''),
    },
    {
      key: 'ExecReload',
      value: fdferry('check-config', service, '--quiet', ...socketArgs),
      why:
        'systemctl reload: check the (re-read) configuration first, then hand everything over to a fresh process and wait ' +
        'until it is done: exits 0 when the successor took over, 1 when the hand-over rolled back (the old process keeps serving).',
    },
    {
      key: 'ExecReload',
      value: fdferry('ctl', service, 'reload', '--wait', '--timeout', String(sizing.reloadClientTimeoutMs), ...socketArgs),
    },
    {
      key: 'SendSIGHUP',
      value: 'no',
      why: 'SIGHUP is the daemon\'s own upgrade trigger (the default, made explicit).',
    },
    {
      key: 'KillMode',
      value: 'mixed',
      why:
        'SIGTERM to the main process only (it rolls back a hand-over in progress, settles a successor, stops cleanly); ' +
        'SIGKILL to whatever is left once it exits.',
    },
    {
      key: 'Restart',
      value: 'on-failure',
      why: 'After a crash the listener and what the daemon put in the fd store come back through LISTEN_FDS.',
    },
    {
      key: 'TimeoutStartSec',
      value: `${sizing.timeoutStartSec}s`,
      why:
        'Also bounds every reload (systemd 252 has no separate reload timeout): at least twice the hand-over deadline ' +
        `(--handoff-timeout); the reload client above gives up after ${sizing.reloadClientTimeoutMs} ms.`,
    },
    {
      key: 'TimeoutStopSec',
      value: `${sizing.timeoutStopSec}s`,
      why: 'Rolling back a hand-over in progress (--handoff-timeout) plus --shutdown-grace, plus 10 s.',
    },
    ...(sizing.watchdogSec > 0
      ? [
          {
            key: 'WatchdogSec',
            value: `${sizing.watchdogSec}s`,
            why: 'The daemon pings every WATCHDOG_USEC/2 from its event loop; a loop blocked this long is restarted.',
          },
        ]
      : [{ comment: 'No WatchdogSec=: installed with --watchdog-sec 0.' }]),
    {
      key: 'FileDescriptorStoreMax',
      value: String(sizing.fileDescriptorStoreMax),
      why:
        'Crash survival: the daemon keeps its listener, tasks\' fds and state in the fd store (the default 0 keeps nothing). ' +
        'Sized to everything it may hold at its configured limits; the store is emptied on stop, not on restart or crash.',
    },
    {
      key: 'LimitNOFILE',
      value: String(sizing.limitNoFile),
      why: 'Twice the fds the daemon may hold at its configured limits. Re-run install-units after raising them.',
    },
    {
      key: 'RuntimeDirectory',
      value: layout.runtimeDirectory,
      why: 'One directory per daemon: systemd deletes a RuntimeDirectory= when its unit stops, shared or not (systemd#5394).',
    },
    {
      key: 'RuntimeDirectoryPreserve',
      value: 'yes',
      why:
        'Not "restart": the control socket lives in this directory and belongs to the .socket unit, which keeps listening ' +
        'when only this service stops; deleting the directory then would leave a listener nobody can reach.',
    },
    { key: 'RuntimeDirectoryMode', value: '0755' },
    { key: 'SyslogIdentifier', value: layout.stem, why: 'journalctl -t ' + layout.stem },
    {
      key: 'EnvironmentFile',
      value: `-${quotePath(layout.environmentFile)}`,
      why:
        `Optional site environment (e.g. NODE_OPTIONS=--max-old-space-size=4096). Daemon settings go in ${layout.configFile}, ` +
        'which a reload re-reads; the environment changes only on restart (a successor inherits its predecessor\'s).',
    },
  ];

  return renderUnitFile(
    `(fdferry ${input.version}): ${layout.serviceUnit}\n` +
      `Do not edit: install-units rewrites this file and uninstall-units removes it. Override with a drop-in: systemctl edit ${layout.serviceUnit}\n` +
      `Sized from the configuration at install time (TimeoutStartSec=, TimeoutStopSec=, FileDescriptorStoreMax=, LimitNOFILE=): ` +
      'run `fdferry install-units` again after changing handoff-timeout, shutdown-grace or the task/flow limits.',
    [
      { name: 'Unit', entries: unit },
      { name: 'Service', entries: [...process, ...sandbox(input)] },
      {
        name: 'Install',
        entries: [
          { key: 'WantedBy', value: 'multi-user.target', why: 'systemctl enable on this unit starts the daemon at boot instead of on first connection.' },
          { key: 'Also', value: layout.socketUnit },
        ],
      },
    ],
  );
}

/** The sandbox: capabilities and hardening. */
function sandbox(input: ServiceUnitInput): Entry[] {
  const { profile } = input;
  const reasons = (items: { value: string; why: string }[]) => items.map((item) => `${item.value}: ${item.why}.`).join('\n');
  const sentence = (text: string) => `${text.charAt(0).toUpperCase()}${text.slice(1)}${text.endsWith('.') ? '' : '.'}`;
  const entries: Entry[] = [
    { comment: 'Sandbox. Runs as root (no User=): the bounding set below is all it keeps.' },
    {
      key: 'CapabilityBoundingSet',
      value: profile.capabilities.map((c) => c.value).join(' '),
      why: profile.capabilities.length ? reasons(profile.capabilities) : 'No capability at all.',
    },
    { key: 'NoNewPrivileges', value: 'yes' },
    {
      key: 'ProtectSystem',
      value: 'strict',
      why: 'Read-only file system: the daemon writes only its runtime directory; state lives in memfds and the fd store.',
    },
    input.installedUnderHome
      ? { key: 'ProtectHome', value: 'read-only', why: 'read-only, not yes: this installation (Node or fdferry) lives under /home, /root or /run/user.' }
      : { key: 'ProtectHome', value: 'yes' },
    { key: 'PrivateTmp', value: 'yes' },
    { key: 'PrivateMounts', value: 'yes' },
  ];
  if (profile.devices.private) {
    entries.push({ key: 'PrivateDevices', value: 'yes', why: sentence(profile.devices.why) });
  } else {
    entries.push(
      { key: 'DevicePolicy', value: 'closed', why: 'Not PrivateDevices=yes, which would hide the device nodes below.' },
      ...profile.devices.allow.map((d) => ({ key: 'DeviceAllow', value: d.value, why: sentence(d.why) })),
    );
  }
  entries.push(
    profile.writesKernelTunables
      ? { comment: `No ProtectKernelTunables=: ${profile.writesKernelTunables.why}.` }
      : { key: 'ProtectKernelTunables', value: 'yes' },
    { key: 'ProtectKernelModules', value: 'yes', why: 'Load modules at boot instead (e.g. tun through /etc/modules-load.d).' },
    { key: 'ProtectKernelLogs', value: 'yes' },
    { key: 'ProtectControlGroups', value: 'yes' },
    { key: 'ProtectClock', value: 'yes' },
    { key: 'ProtectHostname', value: 'yes' },
    {
      comment:
        'No ProtectProc=invisible or ProcSubset=pid: access control reads /proc/<client pid>/status for supplementary groups ' +
        '(--allow-gid, --control-gid), and Node reads /proc/meminfo and /proc/stat.',
    },
    {
      key: 'RestrictAddressFamilies',
      value: profile.addressFamilies.map((f) => f.value).join(' '),
      why: `${reasons(profile.addressFamilies)}\nSockets handed in by clients are not affected.`,
    },
    { key: 'RestrictNamespaces', value: profile.namespaces.value, why: sentence(profile.namespaces.why) },
    {
      comment:
        'No PrivateNetwork=: clients\' sockets, Bumblebee\'s namespaces and a metrics listener live in the host\'s network. ' +
        'No PrivateUsers=: capabilities would only count inside a user namespace. No IPAddressDeny=: accepted sockets are ' +
        'charged to this unit\'s cgroup and then handed to clients.',
    },
    { key: 'LockPersonality', value: 'yes' },
    {
      key: 'MemoryDenyWriteExecute',
      value: 'no',
      why: 'Must stay off: V8 writes the machine code it compiles. With write-xor-execute enforced (checked through the kernel\'s equivalent, PR_SET_MDWE) Node aborts with SIGTRAP as soon as it compiles code.',
    },
    { key: 'RestrictRealtime', value: 'yes' },
    { key: 'RestrictSUIDSGID', value: 'yes' },
    { key: 'SystemCallArchitectures', value: 'native' },
    {
      key: 'SystemCallFilter',
      value: '@system-service @pkey',
      why:
        'Every call both daemons make (checked with strace over start, relays, a hand-over and stop) is in @system-service ' +
        '(splice, memfd_create, setns/unshare, ioctl...) except pkey_alloc, which V8 probes at start-up. A denied call fails ' +
        'with EPERM instead of killing the daemon.',
    },
    { key: 'SystemCallErrorNumber', value: 'EPERM' },
    {
      key: 'UMask',
      value: '0077',
      why: 'The control socket\'s mode comes from SocketMode= (or --socket-mode when the daemon binds it itself).',
    },
  );
  return entries;
}

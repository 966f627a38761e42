/**
 * The `.socket` unit of one daemon: systemd binds the control socket (SOCK_SEQPACKET) and hands it to the
 * service as a named fd (`LISTEN_FDNAMES=<service>`). The listener outlives restarts and crashes of the
 * service, so a client that connects meanwhile is queued, not refused (notes/systemd-restart.md §4.2).
 */
import { renderUnitFile } from './ini.js';
import type { ServiceLayout } from './layout.js';
import { quotePath } from './quote.js';

/** What a socket unit is rendered from. */
export interface SocketUnitInput {
  layout: ServiceLayout;
  version: string;
  documentation: string[];
}

/** Renders `fdferry-<service>.socket`. */
export function renderSocketUnit(input: SocketUnitInput): string {
  const { layout } = input;
  return renderUnitFile(
    `(fdferry ${input.version}): ${layout.socketUnit}\n` +
      `Do not edit: install-units rewrites this file and uninstall-units removes it. Override with a drop-in: systemctl edit ${layout.socketUnit}`,
    [
      {
        name: 'Unit',
        entries: [
          { key: 'Description', value: `fdferry ${layout.service} control socket` },
          ...input.documentation.map((url) => ({ key: 'Documentation', value: url })),
        ],
      },
      {
        name: 'Socket',
        entries: [
          {
            key: 'ListenSequentialPacket',
            value: quotePath(layout.socketPath),
            why: `In ${layout.serviceUnit}'s RuntimeDirectory= (/run/${layout.runtimeDirectory}); ExecStart= passes the same path as --socket.`,
          },
          { key: 'Accept', value: 'no', why: 'One daemon accepts every connection itself.' },
          {
            key: 'FileDescriptorName',
            value: layout.service,
            why: 'The daemon picks its listener by this name (LISTEN_FDNAMES), never by position: stored fds arrive alongside.',
          },
          {
            key: 'SocketMode',
            value: '0660',
            why:
              'Who may connect is also checked by the daemon (--allow-uid, --allow-gid). To let a group in, override SocketGroup= ' +
              'in a drop-in and name the group with allow-gid in the config file.',
          },
          { key: 'SocketUser', value: 'root' },
          { key: 'SocketGroup', value: 'root' },
          { key: 'DirectoryMode', value: '0755' },
          { key: 'RemoveOnStop', value: 'yes', why: 'The socket file goes when the socket unit stops (which also stops the service).' },
          { key: 'Service', value: layout.serviceUnit },
        ],
      },
      { name: 'Install', entries: [{ key: 'WantedBy', value: 'sockets.target' }] },
    ],
  );
}

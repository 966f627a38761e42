/** Renders both units of a daemon from its effective configuration and this installation's entry point. */
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { type EntryPoint, underHome } from './entry-point.js';
import { serviceLayout } from './layout.js';
import { profileOf } from './profiles.js';
import { quotePath } from './quote.js';
import { renderServiceUnit } from './service-unit.js';
import { renderSocketUnit } from './socket-unit.js';
import { type SizingInput, unitSizing } from './sizing.js';

/** A rendered unit file. */
export interface UnitFile {
  /** File name, e.g. `fdferry-splicer.service`. */
  name: string;
  text: string;
}

/** What the units of one daemon are rendered from. */
export interface RenderInput {
  service: string;
  entryPoint: EntryPoint;
  version: string;
  sizing: SizingInput;
}

/** The `.service` and `.socket` of one daemon. */
export function renderUnits(input: RenderInput): UnitFile[] {
  const layout = serviceLayout(input.service);
  const profile = profileOf(input.service);
  const root = input.entryPoint.packageRoot;
  const documentation = root
    ? [path.join(root, 'docs', 'operations.md'), path.join(root, 'docs', profile.doc)].map((file) => quotePath(pathToFileURL(file).href))
    : [];
  return [
    {
      name: layout.serviceUnit,
      text: renderServiceUnit({
        layout,
        profile,
        sizing: unitSizing(input.sizing),
        fdferry: input.entryPoint.command,
        version: input.version,
        installedUnderHome: input.entryPoint.paths.some(underHome),
        documentation,
      }),
    },
    { name: layout.socketUnit, text: renderSocketUnit({ layout, version: input.version, documentation }) },
  ];
}

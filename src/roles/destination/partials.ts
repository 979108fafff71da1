// Partial images left by migrations that did not finish: NAME.img.partial
// with NAME.img.journal beside it (NAME.qcow2.partial and NAME.qcow2.journal
// for a destination that writes qcow2). A later attempt resumes from them; those
// nobody resumes expire after the service's partialTtl, and
// `blockferry partial list|remove|prune` manages them by hand.
import { lstatSync, readdirSync, rmSync, type Stats } from 'node:fs';
import { join } from 'node:path';
import { BlockferryError, ErrorCode } from '../../errors.js';

/** Image names: a plain file name, no path, no leading dot. */
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** How long an untouched partial image is kept by default: 7 days. */
export const DEFAULT_PARTIAL_TTL_MS = 7 * 24 * 3600 * 1000;

export interface PartialInfo {
  name: string;
  /** Declared size of the partial image, and the bytes it occupies on disk (sparse). */
  size: number;
  allocated: number;
  hasPartial: boolean;
  hasJournal: boolean;
  /** Last modification of either file, ms since the epoch, and how long ago. */
  modified: number;
  ageMs: number;
}

export function validName(name: string): boolean {
  return NAME_RE.test(name) && !name.includes('..');
}

function stat(p: string): Stats | undefined {
  try {
    return lstatSync(p);
  } catch {
    return undefined;
  }
}

/** Every partial image (or lone journal) in dataDir, oldest first. */
export function listPartials(dataDir: string, now = Date.now()): PartialInfo[] {
  let entries: string[];
  try {
    entries = readdirSync(dataDir);
  } catch (e) {
    throw new BlockferryError(ErrorCode.DATA_DIR, `cannot read the data directory ${dataDir}: ${(e as Error).message}`, { cause: e });
  }
  const names = new Set<string>();
  for (const f of entries) {
    const m = /^(.*)\.(img|qcow2)\.(partial|journal)$/.exec(f);
    if (m && validName(m[1]!)) names.add(m[1]!);
  }
  const out: PartialInfo[] = [];
  for (const name of names) {
    const p = stat(join(dataDir, `${name}.img.partial`)) ?? stat(join(dataDir, `${name}.qcow2.partial`));
    const j = stat(join(dataDir, `${name}.img.journal`)) ?? stat(join(dataDir, `${name}.qcow2.journal`));
    const modified = Math.max(p?.mtimeMs ?? 0, j?.mtimeMs ?? 0);
    out.push({
      name, size: p?.isFile() ? p.size : 0, allocated: p?.isFile() ? p.blocks * 512 : 0,
      hasPartial: !!p, hasJournal: !!j, modified, ageMs: Math.max(0, now - modified),
    });
  }
  return out.sort((a, b) => a.modified - b.modified);
}

/** Removes NAME's partial image and journal (links are removed, never followed); false when there was none. */
export function removePartial(dataDir: string, name: string): boolean {
  if (!validName(name)) throw new BlockferryError(ErrorCode.NAME_INVALID, `image name ${JSON.stringify(name)} is not a plain file name`);
  let found = false;
  for (const suffix of ['.img.partial', '.img.journal', '.qcow2.partial', '.qcow2.journal']) {
    const p = join(dataDir, name + suffix);
    const st = stat(p);
    if (!st) continue;
    if (st.isDirectory()) throw new BlockferryError(ErrorCode.UNSAFE_PATH, `${p} is a directory; not removing it`);
    rmSync(p, { force: true });
    found = true;
  }
  return found;
}

/** Removes the partial images untouched for ttlMs or longer, except the names in `busy`; returns what it removed. */
export function prunePartials(dataDir: string, ttlMs: number, busy: ReadonlySet<string> = new Set(), now = Date.now()): PartialInfo[] {
  const removed: PartialInfo[] = [];
  for (const p of listPartials(dataDir, now)) {
    if (p.ageMs < ttlMs || busy.has(p.name)) continue;
    removePartial(dataDir, p.name);
    removed.push(p);
  }
  return removed;
}

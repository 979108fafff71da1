// Small ext4 images built from real files on this machine, for tests that
// need realistic content (executables, libraries, text) rather than random
// bytes. No network and no debootstrap: a sorted walk of /usr/bin, /usr/lib
// and /usr/share picks files up to a fixed byte budget, so the same machine
// gives the same trees on every run. Built once per FIXTURE_VERSION and
// cached under os.tmpdir().
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync, copyFileSync, existsSync, lstatSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync,
  renameSync, rmSync, statSync, utimesSync, writeFileSync, writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

/** Bump when the recipe changes: a new version builds into a new cache directory. */
export const FIXTURE_VERSION = 'dup-pair-v2';

export interface ImagePair { older: string; newer: string; blockSize: 4096 }

const KiB = 1024;
const MiB = 1024 * KiB;
/** A fixed time for every file and for mke2fs itself (2024-01-01T00:00:00Z). */
const EPOCH = 1704067200;

/** Regular files under root, depth first, names sorted; symlinks and unreadable entries skipped. */
function* walk(root: string): Generator<{ path: string; size: number }> {
  let names: string[];
  try { names = readdirSync(root).sort(); } catch { return; }
  for (const name of names) {
    const p = join(root, name);
    let st;
    try { st = lstatSync(p); } catch { continue; }
    if (st.isDirectory()) yield* walk(p);
    else if (st.isFile()) yield { path: p, size: st.size };
  }
}

/**
 * Files from a sorted walk of root whose sizes fall in [min, max], up to
 * budget bytes in all; every stride-th candidate so the pick spreads over
 * the tree instead of exhausting its first directory.
 */
function pick(root: string, budget: number, min: number, max: number, stride: number, skip: Set<string>): string[] {
  const out: string[] = [];
  let total = 0;
  let n = 0;
  for (const f of walk(root)) {
    if (f.size < min || f.size > max || skip.has(f.path)) continue;
    if (n++ % stride !== 0) continue;
    try { closeSync(openSync(f.path, 'r')); } catch { continue; }
    out.push(f.path);
    total += f.size;
    if (total >= budget) break;
  }
  return out;
}

/** The image of folder root: ext4, 4 KiB blocks, fixed UUID, hash seed and clock. */
export function mkfsImage(root: string, image: string, size: string): void {
  // Every file, directory and the root itself gets the same timestamps; the
  // host's ctimes, which mke2fs copies and cannot be told to override, are
  // reset with debugfs below.
  const stamp = (p: string) => {
    for (const name of readdirSync(p)) {
      const q = join(p, name);
      const st = lstatSync(q);
      if (st.isDirectory()) stamp(q);
      if (!st.isSymbolicLink()) utimesSync(q, EPOCH, EPOCH);
    }
  };
  stamp(root);
  utimesSync(root, EPOCH, EPOCH);
  execFileSync('mkfs.ext4', [
    '-q', '-F', '-t', 'ext4', '-b', '4096', '-I', '256', '-O', '^has_journal',
    '-U', '6a1b5c0e-0000-4000-8000-00000b10cf17',
    '-E', 'root_owner=0:0,hash_seed=6a1b5c0e-0000-4000-8000-0000000f1c75,lazy_itable_init=0,nodiscard',
    '-d', root, image, size,
  ], { stdio: 'pipe', env: { ...process.env, E2FSPROGS_FAKE_TIME: String(EPOCH), SOURCE_DATE_EPOCH: String(EPOCH) } });
  // mke2fs -d numbers inodes in order from the first non-reserved one (12), so
  // the used inodes are the root (2), lost+found (11) and 12 up to the count.
  const h = execFileSync('dumpe2fs', ['-h', image], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  const count = Number(/^Inode count:\s+(\d+)/m.exec(h)?.[1]);
  const free = Number(/^Free inodes:\s+(\d+)/m.exec(h)?.[1]);
  const used = count - free;
  if (!(used > 11)) throw new Error(`mkfsImage: cannot read the inode counts of ${image}`);
  const cmds = [2, 11, ...Array.from({ length: used - 11 }, (_, i) => 12 + i)]
    .map((ino) => `sif <${ino}> ctime @${EPOCH}\nsif <${ino}> ctime_extra 0\n`).join('');
  execFileSync('debugfs', ['-w', '-f', '-', image], { input: cmds, stdio: ['pipe', 'ignore', 'pipe'], env: { ...process.env, E2FSPROGS_FAKE_TIME: String(EPOCH) } });
}

function copyInto(src: string, destRoot: string, rel: string): string {
  const dest = join(destRoot, rel);
  mkdirSync(dirname(dest), { recursive: true });
  copyFileSync(src, dest);
  return dest;
}

/** A few bytes changed in place at a position fixed by the file's name in the tree (rel). */
function modifyInPlace(path: string, rel: string): void {
  const size = statSync(path).size;
  const h = createHash('sha1').update(rel).digest();
  const at = h.readUInt32LE(0) % Math.max(1, size - 8);
  const fd = openSync(path, 'r+');
  try { writeSync(fd, Buffer.from([0x42, 0x46, h[4]! ^ 0x5a, h[5]! ^ 0xa5]), 0, 4, at); } finally { closeSync(fd); }
}

function build(dir: string): void {
  // The trees live in memory when /dev/shm is there: copying and deleting
  // 100 MB of small files is the slow part on a busy disk.
  let work = dir;
  try { work = mkdtempSync(join('/dev/shm', 'blockferry-fixture-')); } catch { /* no /dev/shm: beside the images */ }
  try { buildIn(dir, work); } finally { if (work !== dir) rmSync(work, { recursive: true, force: true }); }
}

function buildIn(dir: string, work: string): void {
  const olderRoot = join(work, 'older.d');
  const newerRoot = join(work, 'newer.d');
  mkdirSync(olderRoot);
  mkdirSync(newerRoot);
  const used = new Set<string>();
  const base = [
    ...pick('/usr/bin', 10 * MiB, 4 * KiB, 2 * MiB, 2, used),
    ...pick('/usr/lib', 18 * MiB, 4 * KiB, 3 * MiB, 3, used),
    ...pick('/usr/share', 8 * MiB, 1 * KiB, 1 * MiB, 5, used),
  ];
  if (base.length < 100) throw new Error(`duplicateHeavyPair: only ${base.length} readable files under /usr; a Debian-like /usr is needed`);
  for (const f of base) used.add(f);
  const rel = (f: string) => f.slice(1); // "/usr/bin/ls" -> "usr/bin/ls"

  // older: the base files.
  for (const f of base) copyInto(f, olderRoot, rel(f));

  // newer: every 10th file removed, every 7th of the rest changed by a few
  // bytes in place, the others unchanged.
  const kept: string[] = [];
  base.forEach((f, i) => {
    if (i % 10 === 9) return;
    const dest = copyInto(f, newerRoot, rel(f));
    if (i % 7 === 3) modifyInPlace(dest, rel(f));
    else kept.push(f);
  });
  // Files added: a further pick not in older.
  const added = [
    ...pick('/usr/lib', 6 * MiB, 4 * KiB, 2 * MiB, 7, used),
    ...pick('/usr/share', 3 * MiB, 1 * KiB, 512 * KiB, 11, used),
  ];
  for (const f of added) copyInto(f, newerRoot, rel(f));
  // Several copies of the same files: small ones three times side by side in
  // one directory (the same 4 KiB content within a few blocks, inside one
  // 1 MiB batch); larger ones copied to two backup trees (far apart).
  const small = kept.filter((f) => { const s = statSync(f).size; return s >= 8 * KiB && s <= 96 * KiB; }).slice(0, 120);
  small.forEach((f, i) => {
    const name = rel(f).replace(/\//g, '_');
    for (let c = 0; c < 3; c++) copyInto(f, newerRoot, `srv/cache/${String(i).padStart(3, '0')}/${c}-${name}`);
  });
  let budget = 8 * MiB;
  const large = kept.filter((f) => statSync(f).size > 96 * KiB).filter((f) => (budget -= statSync(f).size) > 0);
  for (const f of large) {
    copyInto(f, newerRoot, `backup/1/${rel(f)}`);
    copyInto(f, newerRoot, `backup/2/${rel(f)}`);
  }
  // One file twice in a row within itself: 256 KiB of a library, then the same again.
  const lib = kept.find((f) => statSync(f).size >= 256 * KiB);
  if (lib) {
    const b = readFileSync(lib).subarray(0, 256 * KiB);
    writeFileSync(join(newerRoot, 'srv/twice.bin'), Buffer.concat([b, b]));
  }

  mkfsImage(olderRoot, join(dir, 'older.img'), '64M');
  mkfsImage(newerRoot, join(dir, 'newer.img'), '96M');
  rmSync(olderRoot, { recursive: true, force: true });
  rmSync(newerRoot, { recursive: true, force: true });
  writeFileSync(join(dir, 'COMPLETE'), `${FIXTURE_VERSION}\n`);
}

let pending: Promise<ImagePair> | undefined;

/**
 * Two ext4 images from real files: newer is older a little later (about 10 %
 * of files removed, 1 in 7 changed in place by a few bytes, files added) and
 * holds several copies of the same files, so it has many duplicate blocks,
 * some within a few blocks of each other. About 40 MB and 70 MB of data in
 * 64 MiB and 96 MiB images, byte-reproducible on one machine. Cached in os.tmpdir()/blockferry-fixture-<version>.
 */
export function duplicateHeavyPair(): Promise<ImagePair> {
  pending ??= (async () => {
    const dir = join(tmpdir(), `blockferry-fixture-${FIXTURE_VERSION}`);
    const result: ImagePair = { older: join(dir, 'older.img'), newer: join(dir, 'newer.img'), blockSize: 4096 };
    if (existsSync(join(dir, 'COMPLETE'))) return result;
    // Build beside the cache and rename into place: concurrent test processes
    // each build their own, the first rename wins, the others use its result.
    const tmp = mkdtempSync(join(tmpdir(), `blockferry-fixture-${FIXTURE_VERSION}.building-`));
    try {
      build(tmp);
      if (existsSync(dir) && !existsSync(join(dir, 'COMPLETE'))) rmSync(dir, { recursive: true, force: true });
      try { renameSync(tmp, dir); } catch (e) {
        if (!existsSync(join(dir, 'COMPLETE'))) throw e;
      }
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
    return result;
  })();
  pending.catch(() => { pending = undefined; });
  return pending;
}

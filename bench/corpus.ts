// The bench corpus: two raw ext4 images of a real Debian bookworm root
// filesystem, an "older" state made by debootstrap and a "newer" one a few
// weeks later (security and point updates applied, packages added), for
// measuring migrations and similarity on real filesystems rather than random
// bytes. Built once (needs root, network access to the Debian mirror and a
// few minutes) and cached; later calls return at once.
import { spawn, spawnSync, type SpawnSyncOptions } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync,
} from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';

export interface Corpus { older: string; newer: string; dir: string }

/** Bump when the recipe changes: a cache with another version is rebuilt. */
export const CORPUS_VERSION = 'bookworm-minbase-v2';
const SUITE = 'bookworm';
const IMAGE_SIZE = '2G';
/** Fixed mke2fs inputs, so the same trees give the same images (inode ctimes aside). */
const EPOCH = 1704067200;
const UUIDS = { older: '0c0b5e00-0000-4000-8000-0000000001de', newer: '0c0b5e00-0000-4000-8000-0000000002de' };
const HASH_SEED = '0c0b5e00-0000-4000-8000-00000000a5ee';

/**
 * The older state: debootstrap minbase plus what a small server image
 * usually carries (init, ssh, networking, an editor, python3).
 */
const OLDER_EXTRA = [
  'systemd', 'systemd-sysv', 'udev', 'dbus', 'openssh-server', 'ca-certificates', 'curl', 'iproute2', 'iputils-ping',
  'less', 'vim-tiny', 'procps', 'kmod', 'sudo', 'locales', 'cron', 'logrotate', 'rsyslog', 'python3', 'xz-utils', 'bzip2', 'gnupg',
];
/**
 * A few weeks later: git, a C compiler, python and perl modules and a few
 * tools added (about 300 MB; build-essential's g++ would add 55 MB more).
 */
const NEWER_ADD = [
  'git', 'gcc', 'make', 'libc6-dev', 'pkg-config', 'python3-venv', 'python3-yaml', 'python3-requests',
  'libwww-perl', 'libjson-perl', 'libdbi-perl', 'rsync', 'jq', 'tmux', 'htop', 'strace', 'unzip', 'zstd',
];

const defaultDir = () => process.env.BLOCKFERRY_CORPUS_DIR || '/var/cache/blockferry/corpus';

function run(argv: string[], log: (s: string) => void, opts: SpawnSyncOptions = {}): void {
  const t0 = performance.now();
  const r = spawnSync(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 256 << 20, ...opts });
  const secs = ((performance.now() - t0) / 1000).toFixed(1);
  if (r.error) throw new Error(`corpus: cannot run ${argv[0]}: ${r.error.message}`);
  if (r.status !== 0) {
    const tail = `${r.stdout ?? ''}${r.stderr ?? ''}`.trim().split('\n').slice(-30).join('\n');
    throw new Error(`corpus: \`${argv.join(' ')}\` failed (exit ${r.status ?? r.signal}) after ${secs} s:\n${tail}`);
  }
  const line = argv.join(' ');
  log(`  ${line.length > 100 ? line.slice(0, 99) + '…' : line}: ${secs} s`);
}

const have = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;

/** The Debian mirror apt on this machine uses (deb822 or one-line sources), else deb.debian.org. */
export function debianMirror(): string {
  const deb822 = '/etc/apt/sources.list.d/debian.sources';
  try {
    for (const stanza of readFileSync(deb822, 'utf8').split(/\n\s*\n/)) {
      const uris = /^URIs:\s*(\S+)/m.exec(stanza)?.[1];
      const suites = /^Suites:\s*(.+)$/m.exec(stanza)?.[1]?.split(/\s+/) ?? [];
      if (uris && suites.includes(SUITE)) return uris;
    }
  } catch { /* no deb822 file */ }
  try {
    const m = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s/m.exec(readFileSync('/etc/apt/sources.list', 'utf8'));
    if (m) return m[1]!;
  } catch { /* no sources.list */ }
  return 'http://deb.debian.org/debian';
}

/** The security mirror of the deb822 file, if it names one. */
function securityMirror(): string | undefined {
  try {
    for (const stanza of readFileSync('/etc/apt/sources.list.d/debian.sources', 'utf8').split(/\n\s*\n/)) {
      const uris = /^URIs:\s*(\S+)/m.exec(stanza)?.[1];
      if (uris && /^Suites:.*bookworm-security/m.test(stanza)) return uris;
    }
  } catch { /* none */ }
  return undefined;
}

function mkfs(root: string, image: string, uuid: string, log: (s: string) => void): void {
  run(['mkfs.ext4', '-q', '-F', '-t', 'ext4', '-b', '4096', '-I', '256', '-U', uuid,
    '-E', `root_owner=0:0,hash_seed=${HASH_SEED},lazy_itable_init=0,nodiscard`, '-d', root, image, IMAGE_SIZE],
  log, { env: { ...process.env, E2FSPROGS_FAKE_TIME: String(EPOCH), SOURCE_DATE_EPOCH: String(EPOCH) } });
}

/**
 * Mounts /proc into root for fn (maintainer scripts read it), and always
 * unmounts it (lazily if busy). /dev stays the nodes debootstrap made: a bind
 * of the host's /dev could propagate mounts back to the host.
 */
function withChrootMounts<T>(root: string, log: (s: string) => void, fn: () => T): T {
  const mounted: string[] = [];
  const mount = (args: string[], at: string) => {
    mkdirSync(at, { recursive: true });
    run(['mount', ...args, at], log);
    mounted.push(at);
  };
  try {
    mount(['-t', 'proc', 'proc'], join(root, 'proc'));
    return fn();
  } finally {
    for (const at of mounted.reverse()) {
      if (spawnSync('umount', [at], { stdio: 'ignore' }).status !== 0) spawnSync('umount', ['-l', at], { stdio: 'ignore' });
    }
  }
}

/** Everything the chroot's apt run should not leave in the image, and no services started. */
function chrootApt(root: string, script: string, log: (s: string) => void): void {
  const policy = join(root, 'usr/sbin/policy-rc.d');
  writeFileSync(policy, '#!/bin/sh\nexit 101\n', { mode: 0o755 });
  copyFileSync('/etc/resolv.conf', join(root, 'etc/resolv.conf'));
  try {
    withChrootMounts(root, log, () => run(['chroot', root, '/bin/sh', '-ec', script], log, {
      env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', DEBIAN_FRONTEND: 'noninteractive', LC_ALL: 'C.UTF-8', HOME: '/root' },
    }));
  } finally {
    rmSync(policy, { force: true });
  }
}

function stampOk(dir: string): boolean {
  try {
    const s = JSON.parse(readFileSync(join(dir, 'COMPLETE'), 'utf8')) as { version?: string };
    return s.version === CORPUS_VERSION && existsSync(join(dir, 'older.img')) && existsSync(join(dir, 'newer.img'));
  } catch { return false; }
}

/**
 * The corpus images, building them first if the cache (options.dir,
 * $BLOCKFERRY_CORPUS_DIR or /var/cache/blockferry/corpus) lacks a complete
 * build of this CORPUS_VERSION. Building needs root and the Debian mirror.
 */
export async function benchCorpus(options: { dir?: string; log?: (s: string) => void } = {}): Promise<Corpus> {
  const dir = options.dir ?? defaultDir();
  const log = options.log ?? ((s: string) => console.log(s));
  const corpus: Corpus = { older: join(dir, 'older.img'), newer: join(dir, 'newer.img'), dir };
  if (stampOk(dir)) return corpus;

  if (process.getuid?.() !== 0) throw new Error('corpus: building the bench corpus needs root (debootstrap, chroot, mount)');
  for (const tool of ['mkfs.ext4', 'chroot', 'mount']) if (!have(tool)) throw new Error(`corpus: ${tool} is not installed`);
  if (!have('debootstrap')) {
    log('corpus: installing debootstrap');
    run(['apt-get', 'update', '-qq'], log);
    run(['apt-get', 'install', '-y', '-qq', '--no-install-recommends', 'debootstrap'], log, { env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  }

  const parent = join(dir, '..');
  mkdirSync(parent, { recursive: true });
  // Leftovers of an interrupted build: unmount anything still mounted in them, then remove.
  for (const name of readdirSync(parent)) {
    if (name.startsWith('.corpus-build-')) cleanupBuild(join(parent, name));
  }
  const tmp = mkdtempSync(join(parent, '.corpus-build-'));
  const t0 = performance.now();
  const mirror = debianMirror();
  const security = securityMirror();
  const root = join(tmp, 'root');
  try {
    log(`corpus: building in ${tmp} from ${mirror}`);
    let t = performance.now();
    run(['debootstrap', '--variant=minbase', `--include=${OLDER_EXTRA.join(',')}`, SUITE, root, mirror], log);
    // debootstrap leaves the downloaded .debs and the host's resolv.conf; a built image has neither.
    chrootApt(root, 'apt-get clean; rm -rf /tmp/* /var/tmp/*', log);
    writeFileSync(join(root, 'etc/hostname'), 'corpus\n');
    rmSync(join(root, 'etc/resolv.conf'), { force: true });
    log(`corpus: older tree ${duMiB(root)} MiB in ${secs(t)} s`);
    t = performance.now();
    mkfs(root, join(tmp, 'older.img'), UUIDS.older, log);
    log(`corpus: older.img in ${secs(t)} s`);

    // A few weeks later: updates and security updates applied, packages added.
    t = performance.now();
    const sources = [
      `deb ${mirror} ${SUITE} main`,
      `deb ${mirror} ${SUITE}-updates main`,
      ...(security ? [`deb ${security} ${SUITE}-security main`] : []),
    ];
    writeFileSync(join(root, 'etc/apt/sources.list'), sources.join('\n') + '\n');
    // No translation indexes: debootstrap fetched none, and they would add 30 MB of text to the delta.
    writeFileSync(join(root, 'etc/apt/apt.conf.d/99corpus-no-translations'), 'Acquire::Languages "none";\n');
    chrootApt(root, [
      'apt-get update -qq',
      'apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade',
      `apt-get -y -qq -o Dpkg::Options::=--force-confold install --no-install-recommends ${NEWER_ADD.join(' ')}`,
      'apt-get clean',
      'rm -rf /tmp/* /var/tmp/*',
    ].join('\n'), log);
    rmSync(join(root, 'etc/resolv.conf'), { force: true });
    log(`corpus: newer tree ${duMiB(root)} MiB in ${secs(t)} s`);
    t = performance.now();
    mkfs(root, join(tmp, 'newer.img'), UUIDS.newer, log);
    log(`corpus: newer.img in ${secs(t)} s`);

    rmSync(root, { recursive: true, force: true });
    writeFileSync(join(tmp, 'COMPLETE'), JSON.stringify({ version: CORPUS_VERSION, mirror, built: new Date().toISOString(), seconds: +secs(t0) }) + '\n');
    if (existsSync(dir)) rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
    chmodSync(dir, 0o755);
    log(`corpus: built in ${secs(t0)} s, cached in ${dir}`);
    return corpus;
  } finally {
    if (existsSync(tmp)) cleanupBuild(tmp);
  }
}

/** Unmounts whatever is mounted below path (deepest first), then removes it. */
function cleanupBuild(path: string): void {
  const mounts = readFileSync('/proc/self/mounts', 'utf8').split('\n').map((l) => l.split(' ')[1] ?? '')
    .map((m) => m.replace(/\\040/g, ' ')).filter((m) => m === path || m.startsWith(path + '/')).sort().reverse();
  for (const m of mounts) {
    if (spawnSync('umount', [m], { stdio: 'ignore' }).status !== 0) spawnSync('umount', ['-l', m], { stdio: 'ignore' });
  }
  // Never delete through a mount that would not go away (a bind of the host's /dev).
  const still = readFileSync('/proc/self/mounts', 'utf8').split('\n').some((l) => (l.split(' ')[1] ?? '').startsWith(path + '/'));
  if (still) throw new Error(`corpus: ${path} still has mounts below it; unmount them and remove it by hand`);
  rmSync(path, { recursive: true, force: true });
}

const secs = (t: number) => ((performance.now() - t) / 1000).toFixed(1);

function duMiB(path: string): string {
  const r = spawnSync('du', ['-sm', '-x', path], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.split('\t')[0]! : '?';
}

/** Reads path in 4 KiB blocks, 1 MiB at a time, calling fn for each block (a view, valid during the call). */
async function forEachBlock(path: string, blockSize: number, fn: (block: Buffer, index: number) => void | Promise<void>): Promise<void> {
  const fh = await open(path, 'r');
  try {
    const chunk = Buffer.alloc(Math.max(blockSize, Math.floor((1 << 20) / blockSize) * blockSize));
    let index = 0;
    for (;;) {
      const { bytesRead } = await fh.read(chunk, 0, chunk.length, null);
      if (bytesRead === 0) break;
      for (let o = 0; o < bytesRead; o += blockSize) {
        const r = fn(chunk.subarray(o, Math.min(o + blockSize, bytesRead)), index++);
        if (r) await r;
      }
    }
  } finally {
    await fh.close();
  }
}

const zeros = Buffer.alloc(1 << 16);
/** An all-zero block (memcmp against a zero buffer). */
const isZeroAny = (b: Buffer) => b.length <= zeros.length ? b.equals(zeros.subarray(0, b.length)) : b.every((x) => x === 0);

/** SHA-1 (base64) of each non-zero block, in order. */
export async function blockDigests(path: string, blockSize = 4096): Promise<string[]> {
  const out: string[] = [];
  await forEachBlock(path, blockSize, (b) => {
    if (!isZeroAny(b)) out.push(createHash('sha1').update(b).digest('base64'));
  });
  return out;
}

/**
 * The distinct non-zero blocks of newer whose content older lacks, and with
 * the zstd CLI present, the size of those blocks compressed as one stream by
 * `zstd -3` (in the order they first appear in newer). The yardstick for a
 * migration: what any delta transfer must send at least, before compression.
 */
export async function missingDistinct(older: string, newer: string, blockSize = 4096): Promise<{ blocks: number; bytes: number; zstd3Bytes?: number }> {
  const have = new Set(await blockDigests(older, blockSize));
  const zstd = spawnSync('sh', ['-c', 'command -v zstd'], { stdio: 'ignore' }).status === 0
    ? spawn('zstd', ['-3', '-q', '-c', '-T1'], { stdio: ['pipe', 'pipe', 'inherit'] }) : undefined;
  let zBytes = 0;
  const zDone = zstd ? new Promise<void>((res, rej) => {
    zstd.stdout!.on('data', (d: Buffer) => { zBytes += d.length; });
    zstd.on('error', rej);
    zstd.on('close', (code) => (code === 0 ? res() : rej(new Error(`zstd -3 exited ${code}`))));
  }) : undefined;
  let blocks = 0, bytes = 0;
  await forEachBlock(newer, blockSize, async (b) => {
    if (isZeroAny(b)) return;
    const d = createHash('sha1').update(b).digest('base64');
    if (have.has(d)) return;
    have.add(d);
    blocks++;
    bytes += b.length;
    if (zstd && !zstd.stdin!.write(Buffer.from(b))) await new Promise((res) => zstd.stdin!.once('drain', res));
  });
  if (!zstd) return { blocks, bytes };
  zstd.stdin!.end();
  await zDone;
  return { blocks, bytes, zstd3Bytes: zBytes };
}

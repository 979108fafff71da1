// The blockferry command: a thin shell over the library API. Every command
// here is a few calls a program embedding blockferry can make itself.
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { Command, CommanderError, Option } from 'commander';
import Table from 'cli-table3';
import { BlockferryError, ErrorCode } from '../errors.js';
import { checkBlockSize } from '../engine/engine.js';
import { Scanner, blockMapsFor, type MapOptions } from '../scan/scanner.js';
import { MapCache } from '../blockmap/cache.js';
import { similarityMatrix, type SimilarityMatrix } from '../similarity/similarity.js';
import { Neighbourhood } from '../blockindex/neighbourhood.js';
import { createProgress, human, type ProgressMode } from './progress.js';
import { parseCompress } from '../protocol/codec.js';
import { describeMigration } from './describe.js';
import type { ChainMigrationResult } from '../snapmig/migrate-chain.js';
import { SNAP_STRATEGIES, type SnapStrategy } from '../snapmig/plan.js';
import type { ScatterGatherResult } from '../migrate/scatter-gather.js';
import { parseTarget } from '../transport/tcp.js';
import { DEFAULT_PARTIAL_TTL_MS, listPartials, prunePartials, removePartial } from '../roles/destination/partials.js';
import { migrate } from '../migrate/migrate.js';
import { STRATEGIES, type StrategyName } from '../migrate/strategies.js';
import { displayName, sourceName, type ImageFormat } from '../image/source.js';
import type { ThrottleInfo } from '../migrate/live.js';
import { spawnSync } from 'node:child_process';
import { chooseBackend, nativeStatus } from '../engine/backend.js';
import { wasmModule } from '../engine/wasm.js';
import type { NbdAddress, NbdServer } from '../nbd/server.js';
import { NBD_MAX_STRING } from '../nbd/protocol.js';
import os from 'node:os';
import { parseByteSize } from '../io/units.js';
import { cliLogger, type LogFormat } from './logging.js';
import { LOG_LEVELS, type LogLevel } from '../log.js';

// Each command loads what only it needs (the services, SnapMig, scatter-gather, the NBD
// server, the demo) when it runs, so that `migrate` and `scan` start without them.
/** The page writers (uPlot and the templates), loaded only by --html and --report so that other commands start without them. */
const pages = () => import('../report/index.js');

const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };

class UsageError extends BlockferryError {
  constructor(message: string) {
    super(ErrorCode.USAGE, message);
  }
}

function intArg(name: string, min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!/^\d+$/.test(v) || n < min || n > max) throw new UsageError(`${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(v)}`);
    return n;
  };
}

/** "4096", "4k", "512,1k,4k", "512-16k" (every power of two in the range). */
export function parseBlockSizes(v: string): number[] {
  const one = (s: string): number => {
    const m = /^(\d+)([kKmM]?)$/.exec(s.trim());
    if (!m) throw new UsageError(`block size ${JSON.stringify(s)} is not a number like 4096, 4k or 1m`);
    const n = Number(m[1]) * (m[2] ? (m[2].toLowerCase() === 'k' ? 1024 : 1 << 20) : 1);
    checkBlockSize(n);
    return n;
  };
  const out: number[] = [];
  if (!/^\s*\d/.test(v)) throw new UsageError(`block size ${JSON.stringify(v)} is not a number like 4096, 4k or 1m`);
  for (const part of v.split(',')) {
    const range = part.split('-');
    if (range.length === 2) {
      for (let bs = one(range[0]!); bs <= one(range[1]!); bs *= 2) out.push(bs);
    } else out.push(one(part));
  }
  return [...new Set(out)];
}

/** "90s", "15m", "2h", "7d", "500ms", or plain seconds: milliseconds. */
export function parseDuration(flag: string, v: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$/.exec(v.trim());
  if (!m) throw new UsageError(`${flag} ${JSON.stringify(v)}: expected a duration like 30s, 15m, 2h or 7d`);
  const mult: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3600_000, d: 86400_000 };
  return Math.round(Number(m[1]) * mult[m[2] ?? 's']!);
}

/** An NBD listening address, TCP HOST:PORT (port 0: any free port). */
function parseNbdListen(flag: string, v: string): { host: string; port: number } {
  const m = /^\[?([^\]]*?)\]?:(\d{1,5})$/.exec(v);
  if (!m || Number(m[2]) > 65535) throw new UsageError(`${flag} ${v}: expected HOST:PORT`);
  return { host: m[1] || '0.0.0.0', port: Number(m[2]) };
}

interface CommonOptions {
  format: ImageFormat;
  workers?: number;
  progress: ProgressMode;
  mapDir?: string;
  cacheMax?: string;
  rescan?: boolean;
  save: boolean;
}

function common(cmd: Command): Command {
  return cacheFlags(cmd
    .option('--workers <n>', 'scan worker threads (default: one per core)', intArg('--workers', 1, 256))
    .addOption(new Option('--progress <mode>', 'progress on stderr: a bar on a terminal, JSON lines, or nothing').choices(['auto', 'json', 'none']).default('auto'))
    .option('--rescan', 'ignore cached block maps and scan again')
    .option('--no-save', 'do not write block maps to the cache')
    .addOption(formatOption()));
}

/** --format: how a file is read (auto probes the qcow2 magic; raw never does: a guest's own qcow2 header is then just data). */
function formatOption(): Option {
  return new Option('--format <format>', 'image format: auto (qcow2 when the file starts with its magic, else raw), raw, qcow2').choices(['auto', 'raw', 'qcow2']).default('auto');
}

/** Block maps for every image (from the cache when current, else scanned), with progress. */
async function mapsFor(images: string[], sizes: number[], o: CommonOptions & { sha1?: boolean }) {
  const cache = mapCacheOf(o);
  const scanner = new Scanner(o.workers ? { workers: o.workers } : {});
  const progress = createProgress(o.progress);
  const notices: string[] = [];
  try {
    const results = [];
    for (const path of images) {
      const opts: MapOptions = {
        blockSize: sizes,
        sha1: o.sha1 ?? false,
        rescan: o.rescan ?? false,
        noSave: !o.save,
        cache,
        onProgress: (p) => progress.update(p),
        onNotice: (p, msg) => notices.push(`${p}: ${msg}`),
        format: o.format,
      };
      results.push({ path, ...(await blockMapsFor(scanner, path, opts)) });
    }
    return results;
  } finally {
    progress.stop();
    await scanner.close();
    for (const n of notices) process.stderr.write(`blockferry: notice: ${n}\n`);
  }
}

// ---- the block map cache (blockmap/cache.ts): --map-dir, --cache-max, `blockferry cache info|clear` ----

function cacheFlags(cmd: Command): Command {
  return cmd
    .option('--map-dir <dir>', 'keep the block map cache in this directory (default: BLOCKFERRY_CACHE_DIR, else $XDG_CACHE_HOME/blockferry or ~/.cache/blockferry)')
    .option('--cache-max <size>', 'size limit of the block map cache; least recently used maps go first (default: BLOCKFERRY_CACHE_MAX, else 1G)');
}

/** The cache --map-dir and --cache-max describe (one per command, so an unusable default directory is said once). */
function mapCacheOf(o: { mapDir?: string; cacheMax?: string }): MapCache {
  const max = o.cacheMax !== undefined ? { maxBytes: parseSize('--cache-max', o.cacheMax) } : {};
  return usage(() => (o.mapDir !== undefined ? new MapCache({ dir: o.mapDir, ...max }) : o.cacheMax !== undefined ? new MapCache(max) : MapCache.default()));
}

function addCacheCommands(program: Command): void {
  const cache = program.command('cache').description('the block map cache: where scans keep their maps (never beside the images)');
  cacheFlags(cache.command('info').description('where the cache is, its entries, bytes and limit').option('--json', 'print JSON'))
    .action((o: { mapDir?: string; cacheMax?: string; json?: boolean }) => {
      const info = mapCacheOf(o).info();
      if (o.json) return print(JSON.stringify(info, (_, v: unknown) => (v === undefined ? null : v), 2));
      const t = new Table({ style: { head: [], border: [] } });
      t.push(
        { directory: info.dir ?? '(none: no home directory)' },
        { entries: String(info.entries) },
        { size: `${human(info.bytes)} of ${human(info.maxBytes)}` },
        { 'least recently used': info.oldest ?? '—' },
        { 'most recently used': info.newest ?? '—' },
        ...(info.disabled ? [{ disabled: info.disabled }] : []),
      );
      print(t.toString());
    });
  cacheFlags(cache.command('clear').description('remove every cached block map'))
    .action((o: { mapDir?: string; cacheMax?: string }) => {
      const c = mapCacheOf(o);
      const r = c.clear();
      print(`${c.dir ?? '(no cache directory)'}: removed ${r.removed} block maps, ${human(r.bytes)}`);
    });
}

// ---- end of the block map cache ----

/** A library parser's InvalidArgumentError as a usage error (exit 2). */
function usage<T>(f: () => T): T {
  try {
    return f();
  } catch (e) {
    if (e instanceof BlockferryError && e.code === ErrorCode.INVALID_ARGUMENT) throw new UsageError(e.message);
    throw e;
  }
}

/** A size in bytes: 256M, 1G, 65536 (K, M, G, T are powers of 1024; KiB/MiB/GiB/TiB too). */
export function parseSize(flag: string, v: string): number {
  const n = parseByteSize(v);
  if (n === undefined) throw new UsageError(`${flag} ${JSON.stringify(v)}: expected a size like 256M or 1G`);
  return n;
}

/**
 * --bwlimit: bytes per second. k, M, G (and kB, MB, GB) are powers of 1000,
 * KiB, MiB, GiB powers of 1024; kbit, mbit, gbit are bits per second.
 */
export function parseRate(v: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(k|m|g|kb|mb|gb|kib|mib|gib|kbit|mbit|gbit)?$/i.exec(v.trim());
  if (!m) throw new UsageError(`--bwlimit ${JSON.stringify(v)}: expected a rate like 12.5M (bytes/s), 12MiB or 100mbit`);
  const n = Number(m[1]);
  const unit = (m[2] ?? '').toLowerCase();
  const mult: Record<string, number> = {
    '': 1, k: 1e3, m: 1e6, g: 1e9, kb: 1e3, mb: 1e6, gb: 1e9, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, kbit: 1e3 / 8, mbit: 1e6 / 8, gbit: 1e9 / 8,
  };
  const r = n * mult[unit]!;
  if (!(r >= 1024)) throw new UsageError(`--bwlimit ${v} is below 1 KiB/s`);
  return r;
}

/** The pre-shared key: --key-file, else BLOCKFERRY_KEY; none with --insecure. */
function authFrom(o: { keyFile?: string; insecure?: boolean }) {
  if (o.insecure) return { insecure: true };
  let key: Buffer | undefined;
  if (o.keyFile) {
    try {
      key = readFileSync(o.keyFile);
    } catch (e) {
      throw new UsageError(`--key-file ${o.keyFile}: ${(e as Error).message}`);
    }
    if (key.at(-1) === 10) key = key.subarray(0, key.length - 1);
  } else if (process.env.BLOCKFERRY_KEY) key = Buffer.from(process.env.BLOCKFERRY_KEY, 'utf8');
  if (!key || key.length < 16) throw new UsageError('a key of at least 16 bytes is needed: --key-file FILE or BLOCKFERRY_KEY (or --insecure on both sides, for loopback demos)');
  return { key };
}

/** --cert, --key, --ca (PEM files): mutual TLS with certificates. All three, or none. */
function tlsFrom(o: { cert?: string; key?: string; ca?: string; servername?: string; insecure?: boolean }) {
  const given = [o.cert, o.key, o.ca].filter((v) => v !== undefined).length;
  if (!given) return undefined;
  if (given !== 3) throw new UsageError('--cert, --key and --ca go together (this side\'s certificate, its key, and the CA that signs the peer\'s)');
  if (o.insecure) throw new UsageError('--insecure (plain TCP) cannot be combined with certificates');
  const read = (flag: string, f: string) => {
    try {
      return readFileSync(f);
    } catch (e) {
      throw new UsageError(`${flag} ${f}: ${(e as Error).message}`);
    }
  };
  return { cert: read('--cert', o.cert!), key: read('--key', o.key!), ca: read('--ca', o.ca!), ...(o.servername ? { servername: o.servername } : {}) };
}

/** Authentication for serve and migrate: certificates (a key file then optional), else the pre-shared key, else --insecure with a warning. */
function securityOptions(o: { keyFile?: string; insecure?: boolean; cert?: string; key?: string; ca?: string; servername?: string }, warn = (l: string): void => { process.stderr.write(`blockferry: warning: ${l}\n`); }) {
  const tls = tlsFrom(o);
  if (o.insecure) warn('--insecure: the stream is unprotected (plain TCP: no encryption, no integrity check, no authentication)');
  if (tls) return { tls, auth: o.keyFile || process.env.BLOCKFERRY_KEY ? authFrom(o) : {} };
  return { auth: authFrom(o) };
}

function secureFlags(cmd: Command, client: boolean): Command {
  cmd
    .option('--cert <file>', 'TLS certificate (PEM) of this side: mutual TLS 1.3 with certificates')
    .option('--key <file>', 'private key (PEM) of --cert')
    .option('--ca <file>', 'CA certificate(s) (PEM) that must sign the peer\'s certificate');
  if (client) cmd.option('--servername <name>', 'name the server\'s certificate must carry (default: the host of --to)');
  return cmd;
}

function runCmd(what: string, cmd: string, env?: Record<string, string>): void {
  const r = spawnSync('/bin/sh', ['-c', cmd], { stdio: ['ignore', 'inherit', 'inherit'], ...(env ? { env: { ...process.env, ...env } } : {}) });
  if (r.status !== 0) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `${what} ${JSON.stringify(cmd)} exited with ${r.status ?? r.signal}`);
}

/** A scatter-gather eviction's result, for a terminal. */
function describeScatterGather(r: ScatterGatherResult): string {
  const mb = (b: number) => `${(b / 1e6).toFixed(1)} MB`;
  const lines = [
    `evicted in ${r.evictionSeconds.toFixed(2)} s; all ${r.images.length} images at the destination, verified, in ${r.seconds.toFixed(2)} s`,
    `data ${mb(r.dedup.dataBytes)} in ${r.dedup.dataBlocks} blocks, ${r.dedup.distinctBlocks} distinct; sent once each: ${mb(r.dedup.stashedBytes)}; saved by cross-VM dedup ${mb(r.dedup.savedBytes)}`,
  ];
  for (const [peer, l] of Object.entries(r.links)) lines.push(`  ${peer}: sent ${mb(l.sent)}, received ${mb(l.received)}, ${l.stashedBlocks} blocks stashed${l.refusedBlocks ? `, ${l.refusedBlocks} refused` : ''}${l.failed ? ` (failed: ${l.failed})` : ''}`);
  for (const im of r.images) lines.push(`  ${im.name}: ${im.dataBlocks} data blocks, ${im.gathered} gathered, ${im.fromSource} from the source; placed ${JSON.stringify(im.placed)}`);
  return lines.join('\n');
}

function print(s: string): void {
  process.stdout.write(s.endsWith('\n') ? s : s + '\n');
}

const pct = (v: number) => `${v.toFixed(1)} %`;

function matrixTables(m: SimilarityMatrix): string {
  const names = m.images.map((i) => basename(i.path));
  const sim = new Table({ head: [`base \\ target (${m.blockSize} B blocks)`, ...names, 'average'], style: { head: [], border: [] } });
  m.similarity.forEach((row, b) => sim.push([names[b]!, ...row.map(pct), pct(m.average[b]!)]));
  const bytes = new Table({ head: ['still to send, base \\ target', ...names], style: { head: [], border: [] } });
  m.bytesToSend.forEach((row, b) => bytes.push([names[b]!, ...row.map((v) => human(v))]));
  return `${sim.toString()}\n${bytes.toString()}`;
}

function matrixCsv(ms: SimilarityMatrix[]): string {
  const lines = ['block_size,base,target,similarity_percent,bytes_to_send'];
  for (const m of ms) {
    m.similarity.forEach((row, b) =>
      row.forEach((v, t) => lines.push([m.blockSize, JSON.stringify(m.images[b]!.path), JSON.stringify(m.images[t]!.path), v.toFixed(3), m.bytesToSend[b]![t]].join(','))),
    );
  }
  return lines.join('\n');
}

function matrixMarkdown(m: SimilarityMatrix): string {
  const names = m.images.map((i) => basename(i.path));
  const rows = [
    `| base \\ target (${m.blockSize} B) | ${names.join(' | ')} | average |`,
    `|---|${names.map(() => '---:').join('|')}|---:|`,
    ...m.similarity.map((row, b) => `| ${names[b]} | ${row.map(pct).join(' | ')} | ${pct(m.average[b]!)} |`),
  ];
  return rows.join('\n');
}

export function buildProgram(): Command {
  const program = new Command('blockferry')
    .description('Dedup and block transfer for virtual-machine disk images')
    .version(pkg.version);

  common(
    program
      .command('scan')
      .description('scan images: zero, distinct and duplicate blocks; keeps a block map per image in the block map cache')
      .argument('<image...>', 'raw image files, block devices, or NBD URIs (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)')
      .option('--block-size <size>', 'block size, or a list (512,4k or 512-16k)', '4096')
      .option('--sha1', 'also record the SHA-1 digest of every non-zero block')
      .option('--json', 'print the results as JSON'),
  ).action(async (images: string[], o: CommonOptions & { blockSize: string; sha1?: boolean; json?: boolean }) => {
    const sizes = parseBlockSizes(o.blockSize);
    const results = await mapsFor(images, sizes, o);
    const rows = results.flatMap((r) =>
      r.maps.map((m, k) => {
        const s = m.stats();
        return {
          image: r.path, size: m.imageSize, blockSize: m.blockSize, blocks: s.blocks, zeroBlocks: s.zeroBlocks, dataRuns: m.runCount,
          distinctBlocks: s.distinctBlocks, duplicateBlocks: s.duplicateBlocks, seconds: +r.seconds.toFixed(3),
          mbPerSecond: r.seconds > 0 ? +(m.imageSize / r.seconds / 1e6).toFixed(1) : null, map: r.source, sha1: !!m.digests,
          mapFile: r.files[k] ?? null, ...(r.notCached ? { notCached: r.notCached } : {}),
        };
      }),
    );
    if (o.json) return print(JSON.stringify(rows, null, 2));
    const t = new Table({ head: ['image', 'size', 'block', 'blocks', 'zero', 'data runs', 'distinct', 'duplicate', 'time', 'MB/s', 'map'], style: { head: [], border: [] } });
    for (const r of rows) {
      t.push([displayName(r.image), human(r.size), r.blockSize, r.blocks, r.zeroBlocks, r.dataRuns, r.distinctBlocks, r.duplicateBlocks, `${r.seconds.toFixed(2)} s`, r.map === 'loaded' ? '—' : r.mbPerSecond ?? '—', r.map]);
    }
    print(t.toString());
  });

  common(
    program
      .command('similarity')
      .description('similarity matrix: % of each target\'s non-zero blocks found in each base, and the bytes still to send')
      .argument('<image...>', 'two or more images')
      .option('--block-size <size>', 'block size, or a list for a sweep (512-16k)', '4096')
      .addOption(new Option('--json', 'print JSON').conflicts(['csv', 'markdown']))
      .addOption(new Option('--csv', 'print CSV').conflicts(['markdown']))
      .option('--markdown', 'print Markdown tables')
      .option('--html <file>', 'also write a page: heatmaps of both matrices, and the block-size sweep as a chart'),
  ).action(async (images: string[], o: CommonOptions & { blockSize: string; json?: boolean; csv?: boolean; markdown?: boolean; html?: string }) => {
    if (images.length < 2) throw new UsageError('similarity needs at least two images');
    const sizes = parseBlockSizes(o.blockSize);
    const results = await mapsFor(images, sizes, o);
    const matrices = sizes.map((_, k) => similarityMatrix(results.map((r) => r.maps[k]!)));
    if (o.html) {
      const { similarityPage, writePage } = await pages();
      writePage(o.html, similarityPage(matrices), 'similarity page');
    }
    if (o.json) return print(JSON.stringify(matrices.length === 1 ? matrices[0] : matrices, null, 2));
    if (o.csv) return print(matrixCsv(matrices));
    if (o.markdown) return print(matrices.map(matrixMarkdown).join('\n\n'));
    print(matrices.map(matrixTables).join('\n\n'));
  });

  const index = program.command('index').description('block indexes over many images (a destination\'s neighbourhood)');
  common(
    index
      .command('build')
      .description('build a block index of images')
      .requiredOption('--out <file>', 'index file to write')
      .option('--block-size <size>', 'block size', '4096')
      .argument('<image...>', 'images to index'),
  ).action(async (images: string[], o: CommonOptions & { out: string; blockSize: string }) => {
    const [bs, ...rest] = parseBlockSizes(o.blockSize);
    if (rest.length) throw new UsageError('an index has one block size');
    const n = new Neighbourhood(bs!);
    for (const r of await mapsFor(images, [bs!], o)) n.add(r.maps[0]!);
    n.save(o.out);
    print(describeIndex(o.out, n));
  });
  common(
    index
      .command('add')
      .description('add images to an existing block index')
      .argument('<index>', 'index file')
      .argument('<image...>', 'images to add'),
  ).action(async (file: string, images: string[], o: CommonOptions) => {
    const n = Neighbourhood.load(file);
    for (const r of await mapsFor(images, [n.blockSize], o)) n.add(r.maps[0]!);
    n.save(file);
    print(describeIndex(file, n));
  });
  index
    .command('info')
    .description('show what a block index holds')
    .argument('<index>', 'index file')
    .option('--json', 'print JSON')
    .action((file: string, o: { json?: boolean }) => {
      const n = Neighbourhood.load(file);
      if (o.json) return print(JSON.stringify({ file, ...n.info() }, null, 2));
      print(describeIndex(file, n));
    });

  secureFlags(program
    .command('serve')
    .description('run a service: the destination (receives migrations into a data directory), or a base-image repository destinations fill from')
    .addOption(new Option('--role <role>', 'which service (intermediary: stores scattered blocks by content for scatter-gather; backup: holds base images and snapshots and sends them to destinations for SnapMig)').choices(['destination', 'repository', 'backup', 'intermediary']).default('destination'))
    .option('--capacity <size>', 'intermediary: bytes of scattered blocks it may hold (e.g. 8G); beyond, it refuses and the source sends elsewhere')
    .option('--stage <size>', 'destination: capacity of its stage, where scatter-gather sources send blocks directly (0: no scatter-gather)', '1G')
    .option('--bwlimit <rate>', 'destination: the rate at which it gathers from intermediaries (bytes/s, or 100mbit)')
    .requiredOption('--listen <addr>', 'HOST:PORT to listen on (port 0: any free port)')
    .requiredOption('--data-dir <dir>', 'where migrated images (NAME.img, or NAME.qcow2 with --image-format qcow2) and the neighbourhood index live')
    .option('--neighbour <image>', 'an image whose blocks migrations may reuse (repeatable)', (v: string, acc: string[]) => acc.concat(v), [] as string[])
    .option('--image <image>', 'repository: an image (a base) whose blocks destinations may fetch; backup: a layer it holds (a base or a qcow2 snapshot) (repeatable)', (v: string, acc: string[]) => acc.concat(v), [] as string[])
    .option('--repository <addr>', 'destination: HOST:PORT of a base-image repository to fill from (after the neighbours), with this service\'s key or certificates')
    .option('--block-size <size>', 'block size of the neighbourhood index', '4096')
    .option('--key-file <file>', 'pre-shared key (default: BLOCKFERRY_KEY)')
    .option('--insecure', 'plain TCP without authentication (loopback demos only)')
    .option('--handshake-timeout <ms>', 'milliseconds a connection has to authenticate', intArg('--handshake-timeout', 100, 600_000), 5000)
    .addOption(new Option('--compress <mode>', 'accept compressed block data from sources (none: refuse it)').choices(['auto', 'none']).default('auto'))
    .option('--max-image-size <size>', 'refuse images larger than this (e.g. 2T; default: no limit)')
    .option('--reserve <size>', 'disk space to leave free in the data directory (e.g. 10G)', '0')
    .option('--idle-timeout <duration>', 'end a connection that sends nothing for this long (0: never)', '60s')
    .option('--partial-ttl <duration>', 'remove partial images untouched for this long (0: never)', '7d')
    .addOption(new Option('--nbd <addr>', 'also serve the images over NBD on TCP HOST:PORT (complete ones, and post-copy ones while they arrive)').conflicts('nbdSocket'))
    .option('--nbd-socket <path>', 'the same on a Unix socket')
    .addOption(new Option('--log-format <format>', 'the log on stderr: a line of text per entry, or JSON lines (pino\'s shape)').choices(['text', 'json']).default('text'))
    .addOption(new Option('--log-level <level>', 'least severe entries logged').choices([...LOG_LEVELS]).default('info'))
    .addOption(new Option('--progress <mode>', 'progress of the migrations received, on stderr: a bar on a terminal, JSON lines, or nothing').choices(['auto', 'json', 'none']).default('auto'))
    .addOption(new Option('--image-format <format>', 'destination: write received images as raw (NAME.img) or as standalone qcow2 v3 (NAME.qcow2)').choices(['raw', 'qcow2']).default('raw')), false)
    .action(async (o: { progress: ProgressMode; logFormat: LogFormat; logLevel: LogLevel; role: 'destination' | 'repository' | 'backup' | 'intermediary'; capacity?: string; stage: string; bwlimit?: string; imageFormat: 'raw' | 'qcow2'; image: string[]; repository?: string; nbd?: string; nbdSocket?: string; listen: string; dataDir: string; neighbour: string[]; blockSize: string; keyFile?: string; insecure?: boolean; compress: 'auto' | 'none'; maxImageSize?: string; reserve: string; idleTimeout: string; partialTtl: string; cert?: string; key?: string; ca?: string; handshakeTimeout: number }) => {
      const m = /^\[?([^\]]*?)\]?:(\d{1,5})$/.exec(o.listen);
      if (!m || Number(m[2]) > 65535) throw new UsageError(`--listen ${o.listen}: expected HOST:PORT`);
      const [bs, ...rest] = parseBlockSizes(o.blockSize);
      if (rest.length) throw new UsageError('one block size');
      const logger = await cliLogger(o.logFormat, o.logLevel, 'blockferry serve');
      if (o.role === 'backup') {
        // SnapMig's backup server (paper 000): src/roles/backup/service.ts.
        if (!o.image.length) throw new UsageError('--role backup needs at least one --image (the base images and snapshots it holds)');
        if (o.neighbour.length || o.repository || o.nbd || o.nbdSocket) throw new UsageError('--neighbour, --repository and --nbd are options of the destination role');
        const { BackupService } = await import('../roles/backup/service.js');
        const bk = await BackupService.start({
          dataDir: o.dataDir, host: m[1] || '0.0.0.0', port: Number(m[2]), ...securityOptions(o, o.logFormat === 'json' ? (l) => logger.warn(l) : undefined), handshakeTimeout: o.handshakeTimeout, images: o.image,
          idleTimeout: parseDuration('--idle-timeout', o.idleTimeout), logger,
        });
        const ba = bk.address;
        print(JSON.stringify({ event: 'listening', role: 'backup', host: ba.host, port: ba.port, dataDir: o.dataDir, images: o.image.length, layers: bk.layers.length }));
        await new Promise<void>((res) => {
          process.once('SIGINT', res);
          process.once('SIGTERM', res);
        });
        logger.info({ ...bk.stats }, `backup: ${bk.stats.sent} of ${bk.stats.asked} layers asked for sent (${bk.stats.failed} failed)`);
        await bk.close();
        return;
      }
      if (o.role === 'intermediary') {
        if (o.capacity === undefined) throw new UsageError('--role intermediary needs --capacity SIZE (what it may hold)');
        if (o.image.length || o.neighbour.length || o.repository || o.nbd || o.nbdSocket) throw new UsageError('--image, --neighbour, --repository and --nbd are options of other roles');
        const capacity = parseSize('--capacity', o.capacity);
        if (!(capacity > 0)) throw new UsageError('--capacity must be more than 0');
        const { IntermediaryService } = await import('../roles/intermediary/service.js');
        const im = await IntermediaryService.start({
          dataDir: o.dataDir, host: m[1] || '0.0.0.0', port: Number(m[2]), ...securityOptions(o, o.logFormat === 'json' ? (l) => logger.warn(l) : undefined), handshakeTimeout: o.handshakeTimeout, capacity,
          idleTimeout: parseDuration('--idle-timeout', o.idleTimeout), logger,
        });
        const ia = im.address;
        print(JSON.stringify({ event: 'listening', role: 'intermediary', host: ia.host, port: ia.port, dataDir: o.dataDir, capacity, held: im.store.blocks, free: im.store.free }));
        await new Promise<void>((res) => {
          process.once('SIGINT', res);
          process.once('SIGTERM', res);
        });
        const st = im.stats;
        logger.info({ ...st }, `intermediary: ${st.stashed} blocks stored (${st.stashedBytes} bytes), ${st.held} already held, ${st.refused} refused (full); ${st.gathered} served, ${st.missed} not held${im.store.damage.corrupt ? `; ${im.store.damage.corrupt} damaged on disk, dropped (ERR_BF_STORE_CORRUPT)` : ''}`);
        await im.close();
        return;
      }
      if (o.capacity !== undefined) throw new UsageError('--capacity is an option of the intermediary role (a destination\'s stage is --stage)');
      if (o.role === 'repository') {
        if (!o.image.length) throw new UsageError('--role repository needs at least one --image (the base images it serves)');
        if (o.neighbour.length || o.repository || o.nbd || o.nbdSocket || o.imageFormat !== 'raw') throw new UsageError('--neighbour, --repository, --nbd and --image-format are options of the destination role');
        const { RepositoryService } = await import('../roles/repository/service.js');
        const repo = await RepositoryService.start({
          dataDir: o.dataDir, host: m[1] || '0.0.0.0', port: Number(m[2]), ...securityOptions(o, o.logFormat === 'json' ? (l) => logger.warn(l) : undefined), handshakeTimeout: o.handshakeTimeout, blockSize: bs!, images: o.image,
          idleTimeout: parseDuration('--idle-timeout', o.idleTimeout), logger,
        });
        const ra = repo.address;
        const info = repo.neighbourhood.info();
        print(JSON.stringify({ event: 'listening', role: 'repository', host: ra.host, port: ra.port, dataDir: o.dataDir, images: info.images.length, blocks: info.entries }));
        await new Promise<void>((res) => {
          process.once('SIGINT', res);
          process.once('SIGTERM', res);
        });
        repo.logger.info({ ...repo.stats }, `repository: ${repo.stats.served} of ${repo.stats.asked} blocks asked for served, in ${repo.stats.requests} requests`);
        await repo.close();
        return;
      }
      if (o.image.length) throw new UsageError('--image is an option of the repository role (a destination\'s own images to reuse are --neighbour)');
      if (o.repository !== undefined) {
        try { parseTarget(o.repository); } catch { throw new UsageError(`--repository ${o.repository}: expected HOST:PORT`); }
      }
      const progress = createProgress(o.progress);
      const { DestinationService } = await import('../roles/destination/service.js');
      const svc = await DestinationService.start({
        dataDir: o.dataDir, host: m[1] || '0.0.0.0', port: Number(m[2]), ...securityOptions(o, o.logFormat === 'json' ? (l) => logger.warn(l) : undefined), handshakeTimeout: o.handshakeTimeout, blockSize: bs!, neighbours: o.neighbour, compression: o.compress !== 'none',
        ...(o.maxImageSize !== undefined ? { maxImageSize: parseSize('--max-image-size', o.maxImageSize) } : {}),
        reserveBytes: parseSize('--reserve', o.reserve), idleTimeout: parseDuration('--idle-timeout', o.idleTimeout), partialTtl: parseDuration('--partial-ttl', o.partialTtl),
        logger, onProgress: (p) => progress.update(p), imageFormat: o.imageFormat,
        ...(parseSize('--stage', o.stage) > 0 ? { stage: { capacity: parseSize('--stage', o.stage) } } : { stage: false as const }),
        ...(o.bwlimit ? { gatherBwlimit: parseRate(o.bwlimit) } : {}),
        ...(o.repository !== undefined ? { repository: { to: o.repository } } : {}),
        ...(o.nbdSocket !== undefined ? { nbd: { path: o.nbdSocket } } : o.nbd !== undefined ? { nbd: parseNbdListen('--nbd', o.nbd) } : {}),
      });
      const a = svc.address;
      print(JSON.stringify({ event: 'listening', host: a.host, port: a.port, dataDir: o.dataDir, neighbours: svc.neighbourhood.images.length, ...(o.repository ? { repository: o.repository } : {}), ...(svc.nbdUri('') ? { nbd: svc.nbdUri('NAME') } : {}), ...(o.imageFormat !== 'raw' ? { imageFormat: o.imageFormat } : {}) }));
      await new Promise<void>((res) => {
        process.once('SIGINT', res);
        process.once('SIGTERM', res);
      });
      progress.stop();
      await svc.close();
    });

  program
    .command('export')
    .description('serve a raw image over NBD until SIGINT or SIGTERM (no TLS: a Unix socket or a trusted network)')
    .argument('<image>', 'the raw image file')
    .addOption(new Option('--nbd <addr>', 'TCP HOST:PORT to listen on (port 0: any free port; NBD\'s own is 10809)').conflicts('socket'))
    .option('--socket <path>', 'Unix socket to listen on (a stale socket file there is replaced)')
    .option('--name <name>', 'export name (default: the file name without extension); the empty name selects it too')
    .option('--read-only', 'refuse writes, trims and zeroing')
    .action(async (image: string, o: { nbd?: string; socket?: string; name?: string; readOnly?: boolean }) => {
      let listen: NbdAddress;
      if (o.socket !== undefined) {
        listen = { path: o.socket };
      } else if (o.nbd !== undefined) {
        listen = parseNbdListen('--nbd', o.nbd);
      } else {
        throw new UsageError('export needs --nbd HOST:PORT or --socket PATH');
      }
      if (o.name !== undefined && Buffer.byteLength(o.name) > NBD_MAX_STRING) throw new UsageError(`--name is longer than ${NBD_MAX_STRING} bytes`);
      const [{ FileExport }, { NbdServer }] = await Promise.all([import('../nbd/file-export.js'), import('../nbd/server.js')]);
      const exp = await FileExport.open(image, { readOnly: !!o.readOnly, ...(o.name !== undefined ? { name: o.name } : {}) });
      let server: NbdServer;
      try {
        server = await NbdServer.listen({
          listen, exports: new Map([[exp.name, exp]]), defaultExport: exp.name,
          logger: await cliLogger('text', 'info', 'blockferry export'),
          onError: (e, w) => process.stderr.write(`blockferry export: ${w.command} ${w.offset}+${w.length} failed: ${oneLine((e as Error)?.message ?? String(e))}\n`),
        });
      } catch (e) {
        await exp.close();
        throw e;
      }
      print(server.uri(exp.name));
      await new Promise<void>((res) => {
        process.once('SIGINT', res);
        process.once('SIGTERM', res);
      });
      await server.close();
      await exp.close();
    });

  const partial = program.command('partial').description('partial images left by migrations that did not finish (NAME.img.partial and NAME.img.journal)');
  partial
    .command('list')
    .description('list partial images, oldest first')
    .requiredOption('--data-dir <dir>', 'the destination\'s data directory')
    .option('--json', 'print JSON')
    .action((o: { dataDir: string; json?: boolean }) => {
      const list = listPartials(o.dataDir);
      if (o.json) return print(JSON.stringify(list, null, 2));
      const t = new Table({ head: ['name', 'size', 'on disk', 'journal', 'untouched for'], style: { head: [], border: [] } });
      for (const p of list) t.push([p.name, human(p.size), human(p.allocated), p.hasJournal ? 'yes' : 'no', `${(p.ageMs / 3600_000).toFixed(1)} h`]);
      print(list.length ? t.toString() : `${o.dataDir}: no partial images`);
    });
  partial
    .command('remove')
    .description('remove the partial image and journal of NAME (do not run while a migration into NAME is running)')
    .argument('<name>', 'image name')
    .requiredOption('--data-dir <dir>', 'the destination\'s data directory')
    .action((name: string, o: { dataDir: string }) => {
      if (!removePartial(o.dataDir, name)) throw new BlockferryError(ErrorCode.IMAGE_NOT_FOUND, `${o.dataDir}: no partial image named ${name}`);
      print(`removed the partial image of ${name}`);
    });
  partial
    .command('prune')
    .description('remove partial images untouched for longer than --partial-ttl')
    .requiredOption('--data-dir <dir>', 'the destination\'s data directory')
    .option('--partial-ttl <duration>', 'age from which a partial image is removed', `${DEFAULT_PARTIAL_TTL_MS / 86400_000}d`)
    .option('--json', 'print JSON')
    .action((o: { dataDir: string; partialTtl: string; json?: boolean }) => {
      const removed = prunePartials(o.dataDir, parseDuration('--partial-ttl', o.partialTtl));
      if (o.json) return print(JSON.stringify(removed, null, 2));
      print(`removed ${removed.length} partial image${removed.length === 1 ? '' : 's'}${removed.length ? ': ' + removed.map((p) => p.name).join(', ') : ''}`);
    });

  secureFlags(program
    .command('migrate')
    .description('migrate an image to a destination service, live: rounds of dirty blocks, then cutover')
    .argument('<image...>', 'the source image: a raw file, a block device, or an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH); several with --strategy scatter-gather')
    .requiredOption('--to <addr>', 'HOST:PORT of the destination service')
    .option('--name <name>', 'name at the destination (default: the file name without extension)')
    .addOption(new Option('--strategy <s>', 'what to send and when: full, similarity (pre-copy), postcopy (the destination takes over at once), hybrid (pre-copy of cold blocks, then post-copy); for a qcow2 chain with its snapshots: snapmig (backup servers send what they hold), fullmig (the source sends every layer), selectivemig (the latest state only); scatter-gather: several images evicted through intermediaries (--via)').choices(['full', 'similarity', 'postcopy', 'hybrid', 'scatter-gather', ...SNAP_STRATEGIES]).default('similarity'))
    .option('--backup <addr>', 'snapmig: HOST:PORT of a backup server (serve --role backup) (repeatable)', (v: string, acc: string[]) => acc.concat(v), [] as string[])
    .option('--backup-parallel <n>', 'snapmig: layers each backup server sends at once, each over its own connection (default: one after another)', intArg('--backup-parallel', 1, 64), 1)
    .option('--flatten', 'snapmig, fullmig: the destination writes the chain merged into NAME.img (NAME.qcow2 at a destination writing qcow2) instead of one image per layer')
    .option('--cache-dir <dir>', 'snapmig: where layer identities are cached (default: none)')
    .option('--via <addr>', 'scatter-gather: HOST:PORT of an intermediary (repeatable)', (v: string, acc: string[]) => acc.concat(v), [] as string[])
    .option('--index <spec>', 'scatter-gather: the location index shared by sources (redis://HOST:PORT[,HOST:PORT...]; default: this process only)')
    .option('--hot-threshold <n>', 'hybrid: blocks written this many times or more wait for the post-copy phase', intArg('--hot-threshold', 1, 2 ** 31), 2)
    .option('--key-file <file>', 'pre-shared key (default: BLOCKFERRY_KEY)')
    .option('--insecure', 'plain TCP without authentication (loopback demos only)')
    .option('--bwlimit <rate>', 'bandwidth limit: bytes/s (12.5M = 12.5e6, 12MiB) or bits (100mbit)')
    .option('--overwrite', 'replace a complete image of the same name at the destination')
    .option('--rescan', 'another process writes the image: rescan each round for changed blocks')
    .option('--qmp <socket>', "QEMU writes the image: its QMP socket; rounds come from QEMU's dirty bitmaps (the image must be an NBD URI of that QEMU)")
    .option('--qmp-node <node>', 'with --qmp: the block node whose writes are followed')
    .option('--max-downtime <duration>', 'downtime budget: cut over as soon as the predicted downtime fits (300ms, 1s)', '300ms')
    .addOption(new Option('--on-stall <action>', 'when rounds cannot converge: keep trying until --stall-timeout, cut over anyway, throttle the writer (--throttle-cmd), or postcopy (switch: the destination takes the image over now and the dirty blocks follow)').choices(['wait', 'force', 'throttle', 'postcopy']).default('wait'))
    .option('--stall-timeout <duration>', 'how long wait and throttle keep trying after a stall, then ERR_BF_NO_CONVERGENCE', '60s')
    .option('--throttle-cmd <cmd>', 'run on a stall with --on-stall throttle: BLOCKFERRY_THROTTLE_RATE (bytes/s wanted, "max" at the end), BLOCKFERRY_DIRTY_RATE, BLOCKFERRY_DRAIN_RATE, BLOCKFERRY_THROTTLE_STEP')
    .addOption(new Option('--order <order>', 'order of blocks in a round: by write count, cold first (hot-last), hottest first in the first pass when write counts are known (hot-first; rounds as hot-last), or by address').choices(['hot-last', 'hot-first', 'address']).default('hot-last'))
    .option('--no-delta', 'send re-sent blocks whole, not as deltas against the version sent before')
    .option('--no-hold-dirty', 'with --qmp or a tracked image: send blocks the writer dirtied since their round began anyway (by default they wait for the next round, found by a peek every 250 ms)')
    .option('--max-rounds <n>', 'a limit: cut over after this many rounds whatever the prediction (default: none)', intArg('--max-rounds', 0, 100000))
    .option('--dirty-threshold <n>', 'a limit: cut over once a round finds this many dirty blocks or fewer, whatever the prediction', intArg('--dirty-threshold', 0, 2 ** 31), 0)
    .addOption(formatOption())
    .option('--pause-cmd <cmd>', 'run at cutover to pause the writer (e.g. a hypervisor suspend)')
    .option('--resume-cmd <cmd>', 'run once the destination holds the verified image')
    .option('--compress <mode>', 'compression of block data: auto (adapts to the link; off where it does not pay), none, zstd or zstd:LEVEL', 'auto')
    .option('--memory <size>', 'memory for per-block state (e.g. 256M; binary units)', '256M')
    .addOption(new Option('--progress <mode>', 'progress on stderr: a bar on a terminal, JSON lines, or nothing').choices(['auto', 'json', 'none']).default('auto'))
    .option('--report <file>', 'write a page with the migration\'s timeline (also when it fails)')
    .option('--json', 'print the result as JSON'), true)
    .action(async (images: string[], o: { via: string[]; index?: string; report?: string; backup: string[]; backupParallel: number; flatten?: boolean; cacheDir?: string; cert?: string; key?: string; ca?: string; servername?: string; compress: string; memory: string; to: string; name?: string; strategy: StrategyName; hotThreshold: number; keyFile?: string; insecure?: boolean; bwlimit?: string; overwrite?: boolean; rescan?: boolean; qmp?: string; qmpNode?: string; maxRounds?: number; dirtyThreshold: number; pauseCmd?: string; resumeCmd?: string; json?: boolean; progress: ProgressMode; maxDowntime: string; onStall: 'wait' | 'force' | 'throttle' | 'postcopy'; stallTimeout: string; throttleCmd?: string; order: 'hot-last' | 'hot-first' | 'address'; delta: boolean; holdDirty: boolean; format: ImageFormat }) => {
      if (o.strategy === ('scatter-gather' as StrategyName)) {
        if (o.qmp || o.rescan || o.name) throw new UsageError('--strategy scatter-gather evicts images at rest: no --qmp, --rescan or --name (each image keeps its file name)');
        const { scatterGather } = await import('../migrate/scatter-gather.js');
        const r = await scatterGather(images, {
          to: o.to, via: o.via, ...securityOptions(o), overwrite: !!o.overwrite, ...(o.index ? { index: o.index } : {}), ...(o.bwlimit ? { bwlimit: parseRate(o.bwlimit) } : {}),
          onEvent: (e) => { if (e.phase === 'evicted' || e.phase === 'store-failed') process.stderr.write(`blockferry: ${e.phase} ${JSON.stringify(e.detail)}\n`); },
        });
        print(o.json ? JSON.stringify(r, null, 2) : describeScatterGather(r));
        return;
      }
      if (o.via.length || o.index) throw new UsageError('--via and --index are options of --strategy scatter-gather');
      if (images.length !== 1) throw new UsageError(`one image per migration (several only with --strategy scatter-gather), not ${images.length}`);
      const image = images[0]!;
      if (!o.qmp !== !o.qmpNode) throw new UsageError('--qmp and --qmp-node go together');
      if ((SNAP_STRATEGIES as readonly string[]).includes(o.strategy)) {
        // SnapMig and its baselines (paper 000): src/snapmig/migrate-chain.ts.
        if (o.qmp) throw new UsageError(`--qmp is not supported with --strategy ${o.strategy} (use --rescan)`);
        if (o.backup.length && (o.strategy as string) !== 'snapmig') throw new UsageError('--backup is an option of --strategy snapmig');
        const { migrateChain } = await import('../snapmig/migrate-chain.js');
        const r = await migrateChain(image, {
          to: o.to, strategy: o.strategy as SnapStrategy, backups: o.backup, backupParallel: o.backupParallel, flatten: !!o.flatten, ...securityOptions(o), overwrite: !!o.overwrite,
          ...(o.name ? { name: o.name } : {}), ...(o.cacheDir ? { cacheDir: o.cacheDir } : {}), ...(o.bwlimit ? { bwlimit: parseRate(o.bwlimit) } : {}),
          live: {
            rescan: !!o.rescan, maxDowntime: parseDuration('--max-downtime', o.maxDowntime), onStall: o.onStall === 'postcopy' ? 'wait' : o.onStall, stallTimeout: parseDuration('--stall-timeout', o.stallTimeout),
            ...(o.maxRounds !== undefined ? { maxRounds: o.maxRounds } : {}), dirtyThreshold: o.dirtyThreshold, order: o.order, delta: o.delta,
            ...(o.pauseCmd ? { pause: () => runCmd('--pause-cmd', o.pauseCmd!) } : {}),
            ...(o.resumeCmd ? { resume: () => runCmd('--resume-cmd', o.resumeCmd!) } : {}),
          },
        });
        print(o.json ? JSON.stringify(r, null, 2) : describeChainMigration(r));
        return;
      }
      if (o.onStall === 'postcopy' && !STRATEGIES[o.strategy]?.postcopyOnStall) throw new UsageError(`--on-stall postcopy needs a strategy that can switch to post-copy (--strategy hybrid), not ${o.strategy}`);
      if (o.onStall === 'throttle' && !o.throttleCmd) throw new UsageError('--on-stall throttle needs --throttle-cmd CMD (run with the rate wanted in BLOCKFERRY_THROTTLE_RATE)');
      const progress = createProgress(o.progress);
      const ms = (v: number) => `${(v * 1000).toFixed(0)} ms`;
      const mbs = (v: number) => `${(v / 1e6).toFixed(1)} MB/s`;
      // Stalls and forced cutovers are said on the terminal as they happen, before any pause.
      const say = (line: string) => { progress.stop(); process.stderr.write(`blockferry: ${line}\n`); };
      const onEvent = (e: { phase: string; detail?: unknown }) => {
        const d = e.detail as Record<string, any> | undefined; // eslint-disable-line @typescript-eslint/no-explicit-any
        if (e.phase === 'stall' && d) say(`stall after round ${d.round}: the writer dirties ${mbs(d.dirtyRate)}, rounds drain ${mbs(d.drainRate)}; predicted downtime ${ms(d.predictedSeconds)} > budget ${ms(d.budgetSeconds)} (${d.cause}); --on-stall ${d.action}`);
        if (e.phase === 'throttle' && d) say(`throttle step ${d.step}: asking the writer for ${mbs(d.wantedRate)} (it dirties ${mbs(d.dirtyRate)})`);
        if (e.phase === 'cutover' && d && d.reason === 'stall-force') say(`forcing the cutover: predicted downtime ${ms(d.predictedDowntime)} (budget ${ms(d.maxDowntime)})`);
      };
      const throttleCmd = o.throttleCmd;
      // Ctrl-C (or a TERM) cancels cleanly: the destination keeps what it has, the same command resumes.
      const cancel = new AbortController();
      const stop = (sig: string) => () => cancel.abort(new Error(`interrupted (${sig}); run the same command again to resume`));
      const onInt = stop('SIGINT'), onTerm = stop('SIGTERM');
      process.once('SIGINT', onInt);
      process.once('SIGTERM', onTerm);
      // --report: a recorder wraps the hooks; the page is written at the end, whatever the end.
      const page = o.report ? await pages() : undefined;
      const recorder = page ? new page.TimelineRecorder() : undefined;
      const record = <T extends object>(opts: T): T => (recorder ? recorder.attach(opts) : opts);
      const report = (result: Awaited<ReturnType<typeof migrate>> | undefined, error?: unknown) => {
        if (o.report && page) page.writePage(o.report, page.migrationReport(result, recorder!.stop(), { name: o.name ?? sourceName(image), to: o.to, ...(error !== undefined ? { error } : {}) }), 'migration report');
      };
      const r = await migrate(image, record({
        signal: cancel.signal, format: o.format,
        to: o.to, strategy: o.strategy, ...securityOptions(o), overwrite: !!o.overwrite, rescan: !!o.rescan,
        ...(o.maxRounds !== undefined ? { maxRounds: o.maxRounds } : {}), dirtyThreshold: o.dirtyThreshold, hotThreshold: o.hotThreshold,
        maxDowntime: parseDuration('--max-downtime', o.maxDowntime), onStall: o.onStall, stallTimeout: parseDuration('--stall-timeout', o.stallTimeout),
        order: o.order, delta: o.delta, holdDirty: o.holdDirty, onEvent,
        ...(throttleCmd ? {
          throttle: (t: ThrottleInfo) => runCmd('--throttle-cmd', throttleCmd, {
            BLOCKFERRY_THROTTLE_RATE: t.release ? 'max' : String(Math.round(t.wantedRate)),
            BLOCKFERRY_DIRTY_RATE: String(Math.round(t.dirtyRate)),
            BLOCKFERRY_DRAIN_RATE: String(Math.round(t.drainRate)),
            BLOCKFERRY_THROTTLE_STEP: String(t.step),
          }),
        } : {}),
        compress: usage(() => parseCompress(o.compress)), memoryBudget: parseSize('--memory', o.memory),
        onProgress: (p) => progress.update(p),
        ...(o.name ? { name: o.name } : {}),
        ...(o.qmp ? { qmp: { socket: o.qmp, node: o.qmpNode! } } : {}),
        ...(o.bwlimit ? { bwlimit: parseRate(o.bwlimit) } : {}),
        ...(o.pauseCmd ? { pause: () => runCmd('--pause-cmd', o.pauseCmd!) } : {}),
        ...(o.resumeCmd ? { resume: () => runCmd('--resume-cmd', o.resumeCmd!) } : {}),
      })).then((res) => { report(res); return res; }, (e: unknown) => { try { report(undefined, e); } catch { /* the migration's own error is the one to tell */ } throw e; })
        .finally(() => { progress.stop(); process.off('SIGINT', onInt); process.off('SIGTERM', onTerm); });
      print(o.json ? JSON.stringify(r, null, 2) : describeMigration(r));
    });

  program
    .command('doctor')
    .description('which backend runs each kernel here, and why')
    .option('--json', 'print JSON')
    .action((o: { json?: boolean }) => {
      wasmModule(); // throws ERR_BF_WASM_LOAD when the core is missing
      const choice = chooseBackend();
      const native = nativeStatus();
      const report = {
        blockferry: pkg.version,
        node: process.version,
        cpu: os.cpus()[0]?.model ?? 'unknown',
        cores: os.availableParallelism(),
        wasmCore: 'loaded',
        nativeAddon: native.loaded ? { loaded: true, path: native.path, ...native.info } : { loaded: false, path: native.path, error: native.error },
        sha1: choice.sha1,
        extents: choice.native ? 'native (SEEK_DATA/SEEK_HOLE)' : 'none: every byte is read, holes found by the zero scan',
        holePunching: choice.native ? 'native (fallocate)' : 'explicit zero writes',
        reason: choice.reason,
        forcedBy: process.env.BLOCKFERRY_BACKEND ? `BLOCKFERRY_BACKEND=${process.env.BLOCKFERRY_BACKEND}` : null,
      };
      if (o.json) return print(JSON.stringify(report, null, 2));
      const t = new Table({ style: { head: [], border: [] } });
      for (const [k, v] of Object.entries(report)) t.push({ [k]: typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v) });
      print(t.toString());
    });

  program
    .command('demo')
    .description('the main job on an embedded default: similar images, a destination service on loopback, a live migration')
    .option('--dir <dir>', 'where to make the images (default: a temporary directory, removed afterwards)')
    .addOption(new Option('--progress <mode>', 'progress on stderr').choices(['auto', 'json', 'none']).default('auto'))
    .action(async (o: { dir?: string; progress: ProgressMode }) => {
      const { runDemo } = await import('./demo.js');
      const m = await runDemo(o);
      print(m);
    });

  addCacheCommands(program);
  return program;
}

function describeIndex(file: string, n: Neighbourhood): string {
  const info = n.info();
  const t = new Table({ head: ['id', 'image', 'blocks', 'new contents indexed'], style: { head: [], border: [] } });
  for (const im of info.images) t.push([im.id, im.path, im.blocks, im.added]);
  return `${file}: ${info.images.length} images, ${info.entries} distinct blocks of ${info.blockSize} B, ` +
    `${info.bytesPerEntry.toFixed(1)} bytes per entry in memory\n${t.toString()}`;
}

/** Exit statuses (README, "Errors and exit statuses"). */
export const EXIT = { OK: 0, ERROR: 1, USAGE: 2, INTERNAL: 70 } as const;

/** Runs the CLI; returns the exit code (0 ok, 1 error, 2 usage, 70 internal). Never throws. */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  // Commander's own errors (unknown option, missing argument) as one line with ERR_BF_USAGE, on every (sub)command.
  const configure = (c: Command): void => {
    c.exitOverride();
    c.configureOutput({
      writeErr: (s) => process.stderr.write(s),
      outputError: (s, write) => write(`blockferry: error ${ErrorCode.USAGE}: ${s.replace(/^error: /, '').trim().replace(/\s*\n\s*/g, ' ')} (run with --help for usage)\n`),
    });
    for (const cc of c.commands) configure(cc);
  };
  configure(program);
  try {
    await program.parseAsync(argv, { from: 'user' });
    return EXIT.OK;
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') return EXIT.OK;
      // A parse callback's own error (intArg) arrives wrapped: commander printed it already.
      return EXIT.USAGE;
    }
    if (e instanceof BlockferryError) {
      const remote = (e as { remoteCode?: string }).remoteCode;
      const code = remote && remote !== e.code ? `${e.code} (${remote})` : e.code;
      process.stderr.write(`blockferry: error ${code}: ${oneLine(e.message)}\n`);
      return e.code === ErrorCode.USAGE ? EXIT.USAGE : EXIT.ERROR;
    }
    // A bug, not something a user did: still one line (BLOCKFERRY_DEBUG=1 for the stack).
    const errno = (e as NodeJS.ErrnoException)?.code;
    process.stderr.write(`blockferry: error ERR_BF_INTERNAL: ${oneLine(errno ? `${errno}: ${(e as Error).message}` : String((e as Error)?.message ?? e))}\n`);
    if (process.env.BLOCKFERRY_DEBUG) process.stderr.write(`${(e as Error)?.stack}\n`);
    return EXIT.INTERNAL;
  }
}

function oneLine(s: string): string {
  return s.replace(/[\r\n]+/g, ' ');
}

/** A SnapMig (or FullMig, SelectiveMig) result for people: per send who sent it, then bytes per sender. */
function describeChainMigration(r: ChainMigrationResult): string {
  const mb = (b: number) => `${(b / 1e6).toFixed(1)} MB`;
  const lines = [`${r.strategy} of ${r.name}${r.flatten ? ' (flattened)' : ''}: ${r.seconds.toFixed(2)} s, downtime ${(r.downtimeSeconds * 1000).toFixed(0)} ms`];
  for (const s of r.sends.slice().sort((a, b) => a.layers[0]! - b.layers[0]!)) {
    const what = s.layers.length > 1 ? `layers ${s.layers[0]}-${s.layers[s.layers.length - 1]}` : `layer ${s.layers[0]}`;
    lines.push(`  ${what.padEnd(11)} ${s.reason.padEnd(12)} ${s.sender.padEnd(21)} ${s.skipped ? 'held already' : `${mb(s.wireBytes)} in ${s.seconds.toFixed(2)} s`}${s.fallbackFrom ? ` (instead of ${s.fallbackFrom}: ${s.fallbackReason})` : ''}`);
  }
  lines.push(`  sent: ${Object.entries(r.bytesBySender).map(([k, v]) => `${k} ${mb(v)}`).join(', ')}; active layer ${mb(r.activeLayerBytes)}${r.backupsLost.length ? `; lost: ${r.backupsLost.join(', ')}` : ''}`);
  return lines.join('\n');
}

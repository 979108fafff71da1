// Scale: migrations of images far larger than their data, and of dense
// images, between two real processes on loopback (`blockferry serve` and
// `blockferry migrate --strategy full --json`, no bandwidth limit,
// --insecure), next to `qemu-img convert -O raw` and `cp --sparse=always` of
// the same image, each timed the same way: wall time of the process, peak
// resident memory (VmHWM) from `/usr/bin/time -v` (ru_maxrss of the process,
// all its threads; cross-checked by polling /proc/PID/status), the journal's
// largest size (polled), the metadata on the wire (everything but block data,
// both directions) and the maps on disk.
//
//   (a) thin:  1 TiB sparse, 1 GiB of data in 64 pieces of 16 MiB (seeded random), a few zero blocks inside
//   (b) dense: 8 GiB of random data, no holes
//   (c) packed: the data of (a), pieces one after another, as a dense 1 GiB image
//
// BLOCKFERRY_SCALE_DOSE=small: 64 GiB with 64 MiB of data, a 256 MiB dense image.
// Images live in os.tmpdir()/blockferry-scale and are reused while their marker matches.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readFileSync, readSync, readdirSync, rmSync, statSync, statfsSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import Table from 'cli-table3';
import { addon } from 'blockferry/native';
import { check, randomFill } from './lib.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const KiB = 1024;
const MiB = 1 << 20;
const GiB = 2 ** 30;
const TiB = 2 ** 40;
const BS = 4096;
const MARKER_VERSION = 1;

interface Dose { thinSize: number; pieces: number; pieceBytes: number; denseSize: number; name: string }
const DOSES: Record<string, Dose> = {
  full: { name: 'full', thinSize: 1 * TiB, pieces: 64, pieceBytes: 16 * MiB, denseSize: 8 * GiB },
  small: { name: 'small', thinSize: 64 * GiB, pieces: 64, pieceBytes: 1 * MiB, denseSize: 256 * MiB },
};

/** One timed process: wall seconds, peak RSS (bytes), and its output. */
interface Timed { seconds: number; hwm: number; polledHwm: number; out: string; err: string; code: number | null }

const fmtB = (n: number) => (n >= GiB ? `${(n / GiB).toFixed(2)} GiB` : n >= MiB ? `${(n / MiB).toFixed(1)} MiB` : n >= KiB ? `${(n / KiB).toFixed(1)} KiB` : `${n} B`);
const hwmOf = (pid: number): number => {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
};
const timeVHwm = (err: string) => Number(/Maximum resident set size \(kbytes\): (\d+)/.exec(err)?.[1] ?? 0) * 1024;
/** The pid of the program /usr/bin/time runs (its only child). */
const childOf = (pid: number): number | undefined => {
  try {
    const c = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/)[0];
    return c ? Number(c) : undefined;
  } catch {
    return undefined;
  }
};

/** Runs args under /usr/bin/time -v; polls the program's VmHWM and calls onPoll every 10 ms while it runs. */
function timed(args: string[], onPoll?: () => void): Promise<Timed> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const p = spawn('/usr/bin/time', ['-v', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '', err = '', polled = 0;
    p.stdout!.on('data', (d) => { out += d; });
    p.stderr!.on('data', (d) => { err += d; });
    const timer = setInterval(() => {
      const c = childOf(p.pid!);
      if (c) polled = Math.max(polled, hwmOf(c));
      onPoll?.();
    }, 10);
    p.once('error', reject);
    p.once('exit', (code) => {
      clearInterval(timer);
      onPoll?.();
      resolve({ seconds: (performance.now() - t0) / 1000, hwm: Math.max(timeVHwm(err), polled), polledHwm: polled, out, err, code });
    });
  });
}

/** `blockferry serve` under /usr/bin/time -v; stop() sends SIGTERM to the node process (it finishes indexing, then exits). */
async function startServe(dataDir: string): Promise<{ port: number; stop: () => Promise<Timed> }> {
  const t0 = performance.now();
  const p = spawn('/usr/bin/time', ['-v', process.execPath, bin, 'serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir, '--insecure'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '', polled = 0;
  p.stderr!.on('data', (d) => { err += d; });
  const exited = new Promise<number | null>((r) => p.once('exit', (c) => r(c)));
  const line = await Promise.race([
    new Promise<string>((r) => createInterface({ input: p.stdout! }).once('line', r)),
    exited.then((c) => { throw new Error(`serve exited with ${c}: ${err}`); }),
  ]);
  const timer = setInterval(() => { const c = childOf(p.pid!); if (c) polled = Math.max(polled, hwmOf(c)); }, 10);
  return {
    port: (JSON.parse(line) as { port: number }).port,
    stop: async () => {
      const c = childOf(p.pid!);
      if (c) polled = Math.max(polled, hwmOf(c));
      if (c) process.kill(c, 'SIGTERM');
      else p.kill('SIGKILL');
      const code = await exited;
      clearInterval(timer);
      return { seconds: (performance.now() - t0) / 1000, hwm: Math.max(timeVHwm(err), polled), polledHwm: polled, out: '', err, code };
    },
  };
}

// ---- images ----------------------------------------------------------------

interface Piece { at: number; length: number; seed: number; zeroAt?: number }

/** 64 pieces spread over the thin image, block-aligned but at irregular offsets; every 16th has a zero block inside. */
function thinPieces(d: Dose): Piece[] {
  const stride = Math.floor(d.thinSize / d.pieces / BS) * BS;
  const out: Piece[] = [];
  for (let i = 0; i < d.pieces; i++) {
    const jitter = ((i * 7919) % 1000) * BS;
    const at = Math.min(i * stride + jitter, d.thinSize - d.pieceBytes);
    out.push({ at, length: d.pieceBytes, seed: 1000 + i, ...(i % 16 === 5 ? { zeroAt: Math.floor(d.pieceBytes / 2 / BS) * BS } : {}) });
  }
  return out;
}

/** The same pieces, one after another. */
const packedPieces = (d: Dose): Piece[] => thinPieces(d).map((p, i) => ({ ...p, at: i * d.pieceBytes }));

function pieceBytes(p: Piece, buf: Buffer): Buffer {
  const b = buf.subarray(0, p.length);
  randomFill(b, p.seed);
  if (p.zeroAt !== undefined) b.fill(0, p.zeroAt, p.zeroAt + BS);
  return b;
}

function writeImage(path: string, size: number, pieces: Piece[]): void {
  const fd = openSync(path, 'w');
  const buf = Buffer.alloc(Math.max(...pieces.map((p) => p.length)));
  try {
    ftruncateSync(fd, size);
    for (const p of pieces) writeSync(fd, pieceBytes(p, buf), 0, p.length, p.at);
  } finally {
    closeSync(fd);
  }
}

/** A dense image of random data written 64 MiB at a time. */
function densePieces(size: number): Piece[] {
  const out: Piece[] = [];
  for (let at = 0, i = 0; at < size; at += 64 * MiB, i++) out.push({ at, length: Math.min(64 * MiB, size - at), seed: 5000 + i });
  return out;
}

/** The image at path, made unless a marker says it is already there with this layout. */
function ensureImage(path: string, size: number, pieces: Piece[]): void {
  const marker = `${path}.marker`;
  const want = JSON.stringify({ v: MARKER_VERSION, size, pieces: pieces.map((p) => [p.at, p.length, p.seed, p.zeroAt ?? -1]) });
  if (existsSync(path) && existsSync(marker) && readFileSync(marker, 'utf8') === want && statSync(path).size === size) return;
  rmSync(marker, { force: true });
  const t0 = performance.now();
  writeImage(path, size, pieces);
  writeFileSync(marker, want);
  console.log(`  made ${path} (${fmtB(size)}, ${fmtB(pieces.reduce((a, p) => a + p.length, 0))} of data) in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}

// ---- checks ----------------------------------------------------------------

function extentsOf(path: string): Array<[number, number]> {
  const size = statSync(path).size;
  if (!addon) return [[0, size]];
  const fd = openSync(path, 'r');
  try {
    const flat = addon.extents(fd, 0, size);
    const out: Array<[number, number]> = [];
    for (let i = 0; i < flat.length; i += 2) out.push([flat[i]!, flat[i + 1]!]);
    return out;
  } finally {
    closeSync(fd);
  }
}

const allocated = (path: string) => extentsOf(path).reduce((a, [, l]) => a + l, 0);

/** Same size, and the same bytes over every allocated extent of either file (holes read as zeros). */
function sameImage(a: string, b: string): boolean {
  if (statSync(a).size !== statSync(b).size) return false;
  const fa = openSync(a, 'r'), fb = openSync(b, 'r');
  const ba = Buffer.alloc(16 * MiB), bb = Buffer.alloc(16 * MiB);
  try {
    for (const list of [extentsOf(a), extentsOf(b)]) {
      for (const [off, len] of list) {
        for (let at = off; at < off + len; at += ba.length) {
          const n = Math.min(ba.length, off + len - at);
          if (readSync(fa, ba, 0, n, at) !== n || readSync(fb, bb, 0, n, at) !== n) return false;
          if (!ba.subarray(0, n).equals(bb.subarray(0, n))) return false;
        }
      }
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
  return true;
}

/** Reads the image's data extents once, so that every tool starts from the page cache. */
function warm(path: string): void {
  const fd = openSync(path, 'r');
  const buf = Buffer.allocUnsafe(16 * MiB);
  try {
    for (const [off, len] of extentsOf(path)) for (let at = off; at < off + len; at += buf.length) readSync(fd, buf, 0, Math.min(buf.length, off + len - at), at);
  } finally {
    closeSync(fd);
  }
}

// ---- one case ----------------------------------------------------------------

interface CaseResult {
  name: string;
  image: string;
  size: number;
  data: number;
  migrate: { seconds: number; reported: number; phases: Record<string, number>; sourceHwm: number; sourcePolledHwm: number; destHwm: number; destPolledHwm: number; destSeconds: number; metadata: number; sent: Record<string, number>; received: Record<string, number>; journalMax: number; indexBytes: number; destAllocated: number };
  scan: { seconds: number; hwm: number; mapBytes: number };
  qemu: { seconds: number; hwm: number; allocated: number };
  cp: { seconds: number; hwm: number; allocated: number };
}

async function runCase(name: string, image: string, scratch: string): Promise<CaseResult> {
  const size = statSync(image).size;
  const data = allocated(image);
  warm(image);
  // blockferry: serve and migrate, separate processes.
  const dataDir = join(scratch, `dst-${name}`);
  rmSync(dataDir, { recursive: true, force: true });
  const serve = await startServe(dataDir);
  const journal = join(dataDir, `${name}.img.journal`);
  let journalMax = 0;
  const pollJournal = () => { try { journalMax = Math.max(journalMax, statSync(journal).size); } catch { /* not there (yet, or any more) */ } };
  const m = await timed([process.execPath, bin, 'migrate', image, '--to', `127.0.0.1:${serve.port}`, '--insecure', '--strategy', 'full', '--name', name, '--json'], pollJournal);
  const d = await serve.stop();
  check(`migrate ${name}`, m.code === 0, m.err);
  check(`serve ${name} exits cleanly`, d.code === 0, d.err.slice(-2000));
  const r = JSON.parse(m.out) as { seconds: number; phases: Record<string, number>; wire: { sent: Record<string, number>; received: Record<string, number> } };
  const dst = join(dataDir, `${name}.img`);
  check(`blockferry ${name} result`, sameImage(image, dst));
  const indexFile = join(dataDir, 'neighbourhood.bfidx');
  const indexBytes = existsSync(indexFile) ? statSync(indexFile).size : 0;
  const destAllocated = allocated(dst);
  rmSync(dataDir, { recursive: true, force: true });
  const sum = (t: Record<string, number>) => Object.values(t).reduce((a, b) => a + b, 0);
  const metadata = sum(r.wire.sent) - (r.wire.sent.data ?? 0) + sum(r.wire.received);

  // blockferry scan (fresh map, not saved), then once more saving the map, for its size.
  const s = await timed([process.execPath, bin, 'scan', '--no-save', '--progress', 'none', '--json', image]);
  check(`scan ${name}`, s.code === 0, s.err);
  const mapDir = join(scratch, `maps-${name}`);
  rmSync(mapDir, { recursive: true, force: true });
  mkdirSync(mapDir);
  const saved = spawnSync(process.execPath, [bin, 'scan', '--rescan', '--progress', 'none', '--map-dir', mapDir, '--json', image], { encoding: 'utf8' });
  check(`scan ${name} with a map`, saved.status === 0, saved.stderr);
  const mapBytes = readdirSync(mapDir).reduce((a, f) => a + statSync(join(mapDir, f)).size, 0);
  rmSync(mapDir, { recursive: true, force: true });

  // Peers, timed the same way; each result checked, then deleted.
  const qOut = join(scratch, `qemu-${name}.raw`);
  rmSync(qOut, { force: true });
  const q = await timed(['qemu-img', 'convert', '-f', 'raw', '-O', 'raw', image, qOut]);
  check(`qemu-img convert ${name}`, q.code === 0, q.err);
  check(`qemu-img ${name} result`, sameImage(image, qOut));
  const qAlloc = allocated(qOut);
  rmSync(qOut, { force: true });
  const cOut = join(scratch, `cp-${name}.raw`);
  rmSync(cOut, { force: true });
  const c = await timed(['cp', '--sparse=always', image, cOut]);
  check(`cp ${name}`, c.code === 0, c.err);
  check(`cp ${name} result`, sameImage(image, cOut));
  const cAlloc = allocated(cOut);
  rmSync(cOut, { force: true });

  return {
    name, image, size, data,
    migrate: {
      seconds: m.seconds, reported: r.seconds, phases: r.phases, sourceHwm: m.hwm, sourcePolledHwm: m.polledHwm, destHwm: d.hwm, destPolledHwm: d.polledHwm, destSeconds: d.seconds,
      metadata, sent: r.wire.sent, received: r.wire.received, journalMax, indexBytes, destAllocated,
    },
    scan: { seconds: s.seconds, hwm: s.hwm, mapBytes },
    qemu: { seconds: q.seconds, hwm: q.hwm, allocated: qAlloc },
    cp: { seconds: c.seconds, hwm: c.hwm, allocated: cAlloc },
  };
}

// ---- the group ----------------------------------------------------------------

export interface ScaleResult {
  dose: string;
  cases: CaseResult[];
  skipped: string[];
  goals: Array<{ goal: string; value: string; met: boolean }>;
}

export async function benchScale(): Promise<ScaleResult | undefined> {
  const dose = DOSES[process.env.BLOCKFERRY_SCALE_DOSE ?? 'full'] ?? DOSES.full!;
  console.log(`\n## Scale (dose ${dose.name}): thin ${fmtB(dose.thinSize)} with ${fmtB(dose.pieces * dose.pieceBytes)} of data, dense ${fmtB(dose.denseSize)}, the same data packed; loopback, two processes, --strategy full`);
  if (!addon) {
    console.log('  (skipped: the native addon is not loaded, so holes cannot be listed and a sparse image would be read whole)');
    return undefined;
  }
  if (spawnSync('qemu-img', ['--version']).status !== 0 || !existsSync('/usr/bin/time')) {
    console.log('  (skipped: needs qemu-img and /usr/bin/time: apt-get install -y qemu-utils time)');
    return undefined;
  }
  const scratch = join(tmpdir(), 'blockferry-scale');
  mkdirSync(scratch, { recursive: true });
  const free = () => { const f = statfsSync(scratch); return f.bavail * f.bsize; };
  const skipped: string[] = [];
  const cases: CaseResult[] = [];

  const thin = join(scratch, `thin-${dose.name}.img`);
  const packed = join(scratch, `packed-${dose.name}.img`);
  const dense = join(scratch, `dense-${dose.name}.img`);
  const dataBytes = dose.pieces * dose.pieceBytes;
  // Every case needs its data twice more (the blockferry destination, then one peer's output at a time).
  check('disk space for the thin and packed images', free() > 4 * dataBytes + GiB, `${fmtB(free())} free`);
  ensureImage(thin, dose.thinSize, thinPieces(dose));
  check('thin image is sparse', allocated(thin) < dataBytes + 64 * MiB && statSync(thin).blocks * 512 < dataBytes + 64 * MiB);
  ensureImage(packed, dataBytes, packedPieces(dose));
  cases.push(await runCase('thin', thin, scratch));
  cases.push(await runCase('packed', packed, scratch));
  const denseThere = existsSync(dense) && statSync(dense).size === dose.denseSize;
  const need = (denseThere ? 0 : dose.denseSize) + dose.denseSize + GiB;
  if (free() < need) {
    const why = `dense ${fmtB(dose.denseSize)}: ${fmtB(free())} free in ${scratch}, needs ${fmtB(need)} (source + destination)`;
    console.log(`  (skipped ${why})`);
    skipped.push(why);
  } else {
    ensureImage(dense, dose.denseSize, densePieces(dose.denseSize));
    cases.push(await runCase('dense', dense, scratch));
  }

  const t = new Table({
    head: ['case', 'size / data', 'tool', 'wall s', 'peak RSS source', 'peak RSS dest', 'metadata on the wire', 'journal max', 'map / index on disk', 'output allocated'],
    style: { head: [], border: [] },
  });
  for (const c of cases) {
    const mm = c.migrate;
    t.push([c.name, `${fmtB(c.size)} / ${fmtB(c.data)}`, 'blockferry migrate --strategy full', mm.seconds.toFixed(2), fmtB(mm.sourceHwm), fmtB(mm.destHwm), fmtB(mm.metadata), fmtB(mm.journalMax), `index ${fmtB(mm.indexBytes)}`, fmtB(mm.destAllocated)]);
    t.push(['', '', 'blockferry scan --no-save', c.scan.seconds.toFixed(2), fmtB(c.scan.hwm), '', '', '', `map ${fmtB(c.scan.mapBytes)}`, '']);
    t.push(['', '', 'qemu-img convert -O raw', c.qemu.seconds.toFixed(2), fmtB(c.qemu.hwm), '', '', '', '', fmtB(c.qemu.allocated)]);
    t.push(['', '', 'cp --sparse=always', c.cp.seconds.toFixed(2), fmtB(c.cp.hwm), '', '', '', '', fmtB(c.cp.allocated)]);
  }
  console.log(t.toString());
  for (const c of cases) {
    const mm = c.migrate;
    console.log(`  ${c.name}: migrate reported ${mm.reported.toFixed(2)} s (${Object.entries(mm.phases).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ')}); serve ran ${mm.destSeconds.toFixed(2)} s in all (start, migration, indexing the new image); ` +
      `sent ${Object.entries(mm.sent).map(([k, v]) => `${k} ${v}`).join(', ')}; received ${Object.entries(mm.received).map(([k, v]) => `${k} ${v}`).join(', ')}; ` +
      `VmHWM polled: source ${fmtB(mm.sourcePolledHwm)}, dest ${fmtB(mm.destPolledHwm)}`);
  }

  const goals: ScaleResult['goals'] = [];
  const goal = (text: string, value: string, met: boolean) => {
    goals.push({ goal: text, value, met });
    console.log(`  goal: ${text}: ${value} ${met ? 'met' : 'MISSED'}`);
  };
  const a = cases.find((c) => c.name === 'thin')!;
  const cc = cases.find((c) => c.name === 'packed')!;
  const b = cases.find((c) => c.name === 'dense');
  goal('thin migrate time ≤ 1.3 × the same data packed dense (a vs c)', `${a.migrate.seconds.toFixed(2)} s vs ${cc.migrate.seconds.toFixed(2)} s = ${(a.migrate.seconds / cc.migrate.seconds).toFixed(2)}×`, a.migrate.seconds <= 1.3 * cc.migrate.seconds);
  goal('blockferry scan of the thin image ≤ 2 × qemu-img convert', `${a.scan.seconds.toFixed(2)} s vs ${a.qemu.seconds.toFixed(2)} s = ${(a.scan.seconds / a.qemu.seconds).toFixed(2)}×`, a.scan.seconds <= 2 * a.qemu.seconds);
  for (const c of [a, b]) {
    if (!c) continue;
    const peak = Math.max(c.migrate.sourceHwm, c.migrate.destHwm);
    goal(`peak memory ≤ 256 MiB on each side (${c.name})`, `source ${fmtB(c.migrate.sourceHwm)}, destination ${fmtB(c.migrate.destHwm)}`, peak <= 256 * MiB);
  }
  const holes = a.migrate.metadata - cc.migrate.metadata;
  goal('hole metadata on the wire ≤ 64 KiB (a) (metadata of a − metadata of c, the same data without holes)', `${fmtB(a.migrate.metadata)} − ${fmtB(cc.migrate.metadata)} = ${holes} B`, holes <= 64 * KiB);
  const prop = (x: number, y: number) => x <= 1.1 * y + 4 * KiB;
  goal('journal and maps of (a) proportional to its data: within 1.1× + 4 KiB of (c)\'s',
    `journal ${fmtB(a.migrate.journalMax)} vs ${fmtB(cc.migrate.journalMax)}, scan map ${fmtB(a.scan.mapBytes)} vs ${fmtB(cc.scan.mapBytes)}, destination index ${fmtB(a.migrate.indexBytes)} vs ${fmtB(cc.migrate.indexBytes)}`,
    prop(a.migrate.journalMax, cc.migrate.journalMax) && prop(a.scan.mapBytes, cc.scan.mapBytes) && prop(a.migrate.indexBytes, cc.migrate.indexBytes));
  return { dose: dose.name, cases, skipped, goals };
}

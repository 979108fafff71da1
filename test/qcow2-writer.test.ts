// The qcow2 writer, checked by qemu itself: every image it commits (and every
// partial image it closes) passes `qemu-img check` with no errors and no
// leaks, and `qemu-img compare`s equal to a raw file given the same writes;
// chains over qcow2 and raw backing files show in `qemu-img info
// --backing-chain`; a process killed in the middle of writing leaves leaks
// at worst, never corruption; a full disk is ERR_BF_NO_SPACE.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ErrorCode } from '../src/index.js';
import { Qcow2ImageSink } from '../src/image/qcow2-writer.js';
import { Qcow2ImageSource } from '../src/image/qcow2.js';
import { openSource, specFor } from '../src/image/source.js';
import { seededBytes, rng } from './util.js';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate } from '../src/migrate/migrate.js';
import { listPartials } from '../src/roles/destination/partials.js';

let dir: string;
before(() => { dir = mkdtempSync(join(tmpdir(), 'bfE-qcow2w-')); });
after(() => rmSync(dir, { recursive: true, force: true }));

const p = (name: string) => join(dir, name);
const KiB = 1024, MiB = 1 << 20;

function qemu(args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** `qemu-img check`: its exit status (0 clean, 2 corrupt, 3 leaks only) and its JSON report. */
function check(file: string): { status: number; corruptions: number; leaks: number; report: string } {
  const r = spawnSync('qemu-img', ['check', '--output=json', file], { encoding: 'utf8' });
  const j = JSON.parse(r.stdout || '{}') as { corruptions?: number; leaks?: number };
  return { status: r.status ?? -1, corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, report: r.stdout + r.stderr };
}

function assertClean(file: string): void {
  const c = check(file);
  assert.equal(c.status, 0, `qemu-img check ${file}: ${c.report}`);
  assert.equal(c.corruptions, 0);
  assert.equal(c.leaks, 0);
}

/** `qemu-img compare` (exit 0: identical contents) of a qcow2 file with a raw one. */
function assertSame(qcow2: string, raw: string): void {
  const r = spawnSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, raw], { encoding: 'utf8' });
  assert.equal(r.status, 0, `qemu-img compare ${qcow2} ${raw}: ${r.stdout}${r.stderr}`);
}

/** A tool run without blocking the event loop: its exit status and output. */
function tool(cmd: string, args: string[]): Promise<{ status: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    c.stdout.on('data', (d) => { out += d; });
    c.stderr.on('data', (d) => { out += d; });
    c.on('error', reject);
    c.on('close', (status) => resolve({ status, out }));
  });
}

/** The same operations on a sink and on an in-memory model of its content. */
class Twin {
  constructor(readonly sink: Qcow2ImageSink, readonly model: Buffer) {}
  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.sink.write(offset, data);
    this.model.set(data, offset);
  }
  async zero(offset: number, length: number): Promise<void> {
    await this.sink.zero(offset, length);
    this.model.fill(0, offset, offset + length);
  }
  /** The sink reads back the model, whole and in uneven pieces (and, without a backing file, zeros outside its extents). */
  async readBack(backing = false): Promise<void> {
    const all = Buffer.alloc(this.model.length);
    await this.sink.read(all, 0, all.length);
    assert.ok(all.equals(this.model), 'the sink reads back what was written');
    const r = rng(this.model.length);
    for (let i = 0; i < 50; i++) {
      const off = r() % this.model.length, len = Math.min(this.model.length - off, r() % (300 * KiB));
      const piece = Buffer.alloc(len);
      await this.sink.read(piece, off, len);
      assert.ok(piece.equals(this.model.subarray(off, off + len)), `bytes ${off}+${len}`);
    }
    if (backing) return;
    // Outside the extents, only zeros.
    let at = 0;
    for (const x of [...this.sink.extents(0, this.model.length), { offset: this.model.length, length: 0 }]) {
      assert.ok(this.model.subarray(at, x.offset).every((b) => b === 0), `bytes ${at}..${x.offset} outside the extents are zero`);
      at = x.offset + x.length;
    }
  }
}

/** qemu's view of where the image holds data: the data=true ranges of `qemu-img map`. */
function dataBytes(file: string): number {
  const map = JSON.parse(qemu(['map', '--output=json', file])) as Array<{ length: number; data: boolean; depth: number }>;
  return map.filter((m) => m.data && m.depth === 0).reduce((a, m) => a + m.length, 0);
}

/** Writes of every shape: aligned, unaligned, across cluster and L2 boundaries, zeros, zero ranges over data. */
async function exercise(t: Twin, seed: number): Promise<void> {
  const size = t.model.length;
  const cs = t.sink.clusterSize;
  await t.write(0, seededBytes(seed, 3 * cs)); // aligned, three clusters
  await t.write(cs + 100, seededBytes(seed + 1, 5000)); // unaligned, inside a data cluster
  await t.write(5 * cs - 700, seededBytes(seed + 2, 1400)); // across a cluster boundary, both new
  await t.write(8 * cs + 17, seededBytes(seed + 3, 2 * cs + 33)); // unaligned, three clusters
  await t.write(12 * cs, Buffer.alloc(4 * cs)); // all zeros: no cluster
  await t.write(13 * cs + 512, Buffer.alloc(512)); // zeros inside an unallocated cluster
  await t.zero(cs, cs); // a whole data cluster dropped
  await t.zero(2 * cs + 10, 20); // a few bytes inside data
  await t.zero(8 * cs + 100, cs); // across data clusters: parts
  await t.write(0, Buffer.alloc(cs)); // zeros over a whole data cluster: dropped too
  const r = rng(seed);
  for (let i = 0; i < 40; i++) {
    const off = r() % size, len = Math.min(size - off, 1 + (r() % (3 * cs)));
    if (i % 4 === 3) await t.zero(off, len);
    else await t.write(off, seededBytes(seed + 10 + i, len));
  }
  // The last bytes of the image (the last cluster is short when the size is not a multiple of it).
  await t.write(size - 1000, seededBytes(seed + 99, 1000));
  await t.write(size - 1, Buffer.from([0x5a]));
}

async function twin(name: string, size: number, options: Partial<Parameters<typeof Qcow2ImageSink.create>[1]> = {}): Promise<Twin> {
  const sink = await Qcow2ImageSink.create(p(name), { size, ...options });
  return new Twin(sink, Buffer.alloc(size));
}

describe('qcow2 writer: round trips checked by qemu-img', () => {
  for (const { cs, size } of [
    { cs: 65536, size: 3 * MiB + 512 * 3 }, // not a multiple of the cluster size
    { cs: 4096, size: 2 * MiB + 8 * KiB }, // many L2 entries per table, several tables
    { cs: 2 * MiB, size: 33 * MiB }, // clusters larger than the engine's largest block
  ]) {
    it(`${cs}-byte clusters, ${size} bytes: every kind of write; check, compare, our reader and qemu's convert agree`, async () => {
      const name = `rt-${cs}.qcow2`;
      const t = await twin(name, size, { clusterSize: cs });
      await exercise(t, cs);
      await t.readBack();
      await t.sink.commit();
      assert.ok(!existsSync(`${p(name)}.partial`), 'the partial file became the image');
      writeFileSync(p(`${name}.raw`), t.model);
      assertClean(p(name));
      assertSame(p(name), p(`${name}.raw`));
      const info = JSON.parse(qemu(['info', '--output=json', p(name)])) as { format: string; 'virtual-size': number; 'cluster-size': number; 'format-specific': { data: { compat: string; 'refcount-bits': number } } };
      assert.equal(info.format, 'qcow2');
      assert.equal(info['virtual-size'], size);
      assert.equal(info['cluster-size'], cs);
      assert.equal(info['format-specific'].data.compat, '1.1'); // version 3
      assert.equal(info['format-specific'].data['refcount-bits'], 16);
      // Our own reader.
      const src = openSource(specFor(p(name))) as Qcow2ImageSource;
      const all = Buffer.alloc(size);
      src.readInto(all, 0, size);
      src.close();
      assert.ok(all.equals(t.model), 'Qcow2ImageSource reads what was written');
      // qemu's convert.
      qemu(['convert', '-O', 'raw', p(name), p(`${name}.conv`)]);
      assert.ok(readFileSync(p(`${name}.conv`)).equals(t.model), 'qemu-img convert -O raw gives what was written');
    });
  }

  it('all-zero writes and zero ranges allocate no data cluster', async () => {
    const t = await twin('zeros.qcow2', 8 * MiB);
    await t.write(0, Buffer.alloc(4 * MiB));
    await t.write(4 * MiB + 3, Buffer.alloc(70_000));
    await t.zero(5 * MiB, 3 * MiB);
    assert.deepEqual(t.sink.extents(0, 8 * MiB), []);
    await t.write(MiB, seededBytes(7, 64 * KiB));
    await t.write(MiB, Buffer.alloc(64 * KiB)); // the cluster becomes zeros again: dropped
    assert.deepEqual(t.sink.extents(0, 8 * MiB), []);
    await t.sink.commit();
    assertClean(p('zeros.qcow2'));
    assert.equal(dataBytes(p('zeros.qcow2')), 0, 'qemu-img map finds no data');
    // Header, refcount table, L1 table, one refcount block, one L2 table; the dropped cluster is free, not leaked.
    assert.ok(statSync(p('zeros.qcow2')).size <= 6 * 64 * KiB, `file of ${statSync(p('zeros.qcow2')).size} bytes`);
  });

  it('a 256 GiB image with a few MiB written stays a few MiB on disk and in memory', async () => {
    const size = 256 * 1024 * MiB;
    const sink = await Qcow2ImageSink.create(p('huge.qcow2'), { size });
    const writes: Array<[number, Uint8Array]> = [];
    const r = rng(256);
    for (let i = 0; i < 64; i++) {
      const off = (r() * 4096 + (r() % 4096)) % (size - 64 * KiB);
      writes.push([Math.floor(off / 512) * 512, seededBytes(i, 48 * KiB)]);
    }
    writes.push([size - 4096, seededBytes(999, 4096)]);
    const rss0 = process.memoryUsage().rss;
    for (const [off, d] of writes) await sink.write(off, d);
    assert.ok(sink.memoryBytes < 8 * MiB, `tables in memory: ${sink.memoryBytes} bytes`);
    for (const [off, d] of writes) {
      const back = Buffer.alloc(d.length);
      await sink.read(back, off, d.length);
      assert.ok(back.equals(d));
    }
    await sink.commit();
    assert.ok(process.memoryUsage().rss - rss0 < 128 * MiB, 'no allocation follows the declared size');
    const st = statSync(p('huge.qcow2'));
    // 65 writes of at most 2 clusters each, plus their L2 tables (one each: they are spread out) and a few headers.
    assert.ok(st.size < 20 * MiB, `file size ${st.size}`);
    assert.ok(st.blocks * 512 < 20 * MiB, `allocated ${st.blocks * 512}`);
    assertClean(p('huge.qcow2'));
    // qemu reads the bytes back where they were written.
    const src = openSource(specFor(p('huge.qcow2'))) as Qcow2ImageSource;
    try {
      for (const [off, d] of writes) {
        const back = Buffer.alloc(d.length);
        src.readInto(back, off, d.length);
        assert.ok(back.equals(d), `our reader at ${off}`);
      }
    } finally {
      src.close();
    }
    const [off0, d0] = writes[0]!;
    const out = execFileSync('qemu-io', ['-r', '-c', `read -P 0 ${off0 + d0.length} 4096`, '-c', `read -v ${off0} 16`, p('huge.qcow2')], { encoding: 'utf8' });
    assert.match(out, new RegExp(Buffer.from(d0.subarray(0, 4)).toString('hex').replace(/(..)/g, '$1 ').trim()));
  });
});

describe('qcow2 writer: layers over a backing file', () => {
  const size = 4 * MiB;
  const base = () => {
    const b = Buffer.from(seededBytes(42, size));
    b.fill(0, 3 * MiB, 3 * MiB + 256 * KiB); // a zero region in the base
    return b;
  };

  for (const format of ['raw', 'qcow2'] as const) {
    it(`over a ${format} backing file: partial writes read the rest from below, zero clusters hide it; qemu sees the chain`, async () => {
      const b = base();
      writeFileSync(p(`base-${format}.raw`), b);
      let baseFile = `base-${format}.raw`;
      if (format === 'qcow2') {
        qemu(['convert', '-f', 'raw', '-O', 'qcow2', p(baseFile), p(`base-${format}.qcow2`)]);
        baseFile = `base-${format}.qcow2`;
      }
      const top = `top-${format}.qcow2`;
      // A relative backing name, as a chain that moves with its directory has.
      const sink = await Qcow2ImageSink.create(p(top), { size, backing: { path: baseFile, format } });
      const t = new Twin(sink, Buffer.from(b));
      await t.write(64 * KiB + 1000, seededBytes(1, 3000)); // a partial cluster: the rest comes from the base
      await t.write(200 * KiB, seededBytes(2, 200 * KiB)); // unaligned, several clusters
      await t.zero(MiB, 256 * KiB); // whole clusters over base data: zero clusters
      await t.zero(2 * MiB + 100, 50); // part of a cluster: read-modify-write from the base
      await t.write(3 * MiB, Buffer.alloc(64 * KiB)); // zeros over zeros of the base: nothing at all
      await t.write(3 * MiB + 256 * KiB - 10, Buffer.alloc(20)); // zeros over base data in part: a data cluster
      await t.readBack(true);
      // This layer's extents: exactly the clusters it holds data in.
      assert.deepEqual(sink.extents(0, size).map((x) => [x.offset / KiB, x.length / KiB]), [[64, 64], [192, 256], [2048, 64], [3328, 64]]);
      await sink.commit();
      writeFileSync(p(`${top}.raw`), t.model);
      assertClean(p(top));
      assertSame(p(top), p(`${top}.raw`));
      const chain = JSON.parse(qemu(['info', '--backing-chain', '--output=json', p(top)])) as Array<{ filename: string; format: string; 'backing-filename'?: string; 'backing-filename-format'?: string }>;
      assert.equal(chain.length, format === 'qcow2' ? 2 : 2);
      assert.equal(chain[0]!['backing-filename'], baseFile);
      assert.equal(chain[0]!['backing-filename-format'], format);
      assert.equal(chain[1]!.format, format);
      // The zero clusters hide the base: qemu says zero, and reads zeros.
      const map = JSON.parse(qemu(['map', '--output=json', p(top)])) as Array<{ start: number; length: number; zero: boolean; data: boolean; depth: number }>;
      const at1M = map.find((m) => m.start <= MiB && MiB < m.start + m.length)!;
      assert.equal(at1M.depth, 0, 'the zeroed range is this layer\'s');
      assert.equal(at1M.zero, true);
      assert.equal(at1M.data, false);
      // Only what this layer wrote is its own data: the partial cluster, the unaligned run, the two zero edits.
      const own = JSON.parse(qemu(['map', '--output=json', p(top)])) as Array<{ length: number; data: boolean; depth: number }>;
      const ownData = own.filter((m) => m.depth === 0 && m.data).reduce((a, m) => a + m.length, 0);
      assert.equal(ownData, 64 * KiB + 4 * 64 * KiB + 64 * KiB + 64 * KiB);
      // Our reader, whole chain and this layer's own map.
      const src = openSource(specFor(p(top))) as Qcow2ImageSource;
      try {
        const all = Buffer.alloc(size);
        src.readInto(all, 0, size);
        assert.ok(all.equals(t.model));
        assert.deepEqual(src.layers.map((l) => l.format), ['qcow2', format]);
        const zeros = src.layerMap(0).filter((r) => r.kind === 'zero');
        // The four clusters zeroed over base data, and two written with zeros over the base's zeros (they hide it too).
        assert.deepEqual(zeros.map((z) => [z.offset / KiB, z.length / KiB]), [[1024, 256], [3072, 64], [3264, 64]]);
      } finally {
        src.close();
      }
    });
  }

  it('a missing backing file is a typed error, and nothing is left behind', async () => {
    await assert.rejects(Qcow2ImageSink.create(p('orphan.qcow2'), { size, backing: { path: 'nope.raw', format: 'raw' } }), { code: ErrorCode.IMAGE_NOT_FOUND });
    assert.ok(!existsSync(p('orphan.qcow2.partial')));
  });

  it('options it cannot write are refused with typed errors', async () => {
    await assert.rejects(Qcow2ImageSink.create(p('bad.qcow2'), { size: 1000 }), { code: ErrorCode.UNSUPPORTED_FEATURE });
    await assert.rejects(Qcow2ImageSink.create(p('bad.qcow2'), { size: MiB, clusterSize: 3000 }), { code: ErrorCode.INVALID_ARGUMENT });
    await assert.rejects(Qcow2ImageSink.create(p('bad.qcow2'), { size: 2 ** 52, clusterSize: 4096 }), { code: ErrorCode.IMAGE_TOO_LARGE });
  });
});

describe('qcow2 writer: interrupted transfers', () => {
  it('a partial image closed mid-transfer checks clean; resumed and committed, it holds everything', async () => {
    const size = 6 * MiB;
    const t = await twin('resume.qcow2', size);
    await t.write(0, seededBytes(1, MiB));
    await t.write(2 * MiB + 3, seededBytes(2, 100 * KiB));
    await t.zero(64 * KiB, 128 * KiB); // frees two clusters
    await t.sink.close();
    assert.ok(!existsSync(p('resume.qcow2')), 'nothing under the final name before commit');
    assertClean(p('resume.qcow2.partial'));
    const sink = await Qcow2ImageSink.resume(p('resume.qcow2'), { size });
    const t2 = new Twin(sink, t.model);
    await t2.readBack();
    await t2.write(64 * KiB, seededBytes(3, 64 * KiB)); // reuses a freed cluster
    await t2.write(5 * MiB, seededBytes(4, 300 * KiB));
    await t2.readBack();
    await sink.commit();
    writeFileSync(p('resume.raw'), t2.model);
    assertClean(p('resume.qcow2'));
    assertSame(p('resume.qcow2'), p('resume.raw'));
  });

  it('resume refuses a partial image that is not this image: another size, a raw file, a link', async () => {
    const size = 2 * MiB;
    const t = await twin('other.qcow2', size);
    await t.sink.close();
    await assert.rejects(Qcow2ImageSink.resume(p('other.qcow2'), { size: 4 * MiB }), { code: ErrorCode.IMAGE_CHANGED });
    await assert.rejects(Qcow2ImageSink.resume(p('other.qcow2'), { size, backing: { path: 'x', format: 'raw' } }), { code: ErrorCode.IMAGE_CHANGED });
    writeFileSync(p('raw.qcow2.partial'), Buffer.alloc(size));
    await assert.rejects(Qcow2ImageSink.resume(p('raw.qcow2'), { size }), { code: ErrorCode.IMAGE_CHANGED });
    execFileSync('ln', ['-s', p('other.qcow2.partial'), p('link.qcow2.partial')]);
    await assert.rejects(Qcow2ImageSink.resume(p('link.qcow2'), { size }), { code: ErrorCode.UNSAFE_PATH });
    await assert.rejects(Qcow2ImageSink.create(p('link.qcow2'), { size }), { code: ErrorCode.UNSAFE_PATH });
  });

  it('kill -9 in the middle of writes leaves leaks at worst, never corruption; resume repairs the leaks', async () => {
    const size = 64 * MiB;
    const mod = new URL('../src/image/qcow2-writer.js', import.meta.url).pathname;
    // The child writes random runs, zeroes some, and flushes now and then, forever; it is killed mid-way.
    const script = `
      import { Qcow2ImageSink } from ${JSON.stringify(mod)};
      const sink = await Qcow2ImageSink.create(${JSON.stringify(p('killed.qcow2'))}, { size: ${size} });
      let x = 12345;
      const r = () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x; };
      for (let i = 0; ; i++) {
        const off = (r() % ${size / 4096 - 64}) * 4096 + (r() % 4096), len = 1 + (r() % (256 * 1024));
        if (i % 5 === 4) await sink.zero(off, len);
        else { const d = Buffer.alloc(len, 1 + (i % 250)); await sink.write(off, d); }
        if (i % 50 === 49) { await sink.flush(); process.stdout.write('flushed\\n'); }
      }`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    let flushes = 0;
    await new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (d: Buffer) => {
        flushes += d.toString().split('\n').filter((l) => l === 'flushed').length;
        if (flushes >= 3) { child.kill('SIGKILL'); resolve(); }
      });
      child.on('exit', (code, sig) => { if (sig !== 'SIGKILL') reject(new Error(`the writer exited on its own (${code})`)); });
    });
    await new Promise((r) => child.once('close', r));
    const c = check(p('killed.qcow2.partial'));
    assert.equal(c.corruptions, 0, c.report);
    assert.ok(c.status === 0 || c.status === 3, `qemu-img check: only leaks allowed (${c.status}): ${c.report}`);
    // Resume walks the tables, gives leaked clusters refcount 0; closed, the image checks clean.
    const sink = await Qcow2ImageSink.resume(p('killed.qcow2'), { size });
    await sink.write(0, seededBytes(5, 200 * KiB));
    await sink.close();
    assertClean(p('killed.qcow2.partial'));
  });
});

describe('qcow2 writer: a full disk', () => {
  it('ENOSPC on a small tmpfs is ERR_BF_NO_SPACE, and no image appears under the final name', async (t) => {
    const mnt = p('tmpfs');
    mkdirSync(mnt);
    const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=3m', 'bfE-tmpfs', mnt]);
    if (m.status !== 0) { t.skip(`cannot mount a tmpfs: ${m.stderr}`); return; }
    try {
      const sink = await Qcow2ImageSink.create(join(mnt, 'full.qcow2'), { size: 64 * MiB });
      const err = await (async () => {
        try {
          for (let i = 0; i < 32; i++) await sink.write(i * MiB, seededBytes(i, MiB));
          await sink.commit();
        } catch (e) {
          return e;
        }
        return undefined;
      })();
      assert.equal((err as { code?: string } | undefined)?.code, ErrorCode.NO_SPACE);
      await sink.close();
      assert.ok(!existsSync(join(mnt, 'full.qcow2')), 'no image under the final name');
      // What is left is the partial image of the last checkpoint: it references nothing that failed.
      const c = check(join(mnt, 'full.qcow2.partial'));
      assert.equal(c.corruptions, 0, c.report);
    } finally {
      spawnSync('umount', [mnt]);
    }
  });
});

describe('a destination that writes qcow2 (serve --image-format qcow2)', () => {
  const key = Buffer.from('blockferry-test-key-0123456789ab');
  const haveMkfs = spawnSync('mkfs.ext4', ['-V']).status === 0;
  /** An ext4 image of a file tree (mkfs.ext4 -d), 32 MiB. */
  function mkfs(name: string, files: Record<string, Uint8Array>): string {
    const root = p(`${name}.d`);
    mkdirSync(root);
    for (const [f, data] of Object.entries(files)) writeFileSync(join(root, f), data);
    const img = p(`${name}.img`);
    execFileSync('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', root, '-E', 'lazy_itable_init=0,nodiscard', img, '32M'], { stdio: 'pipe' });
    return img;
  }

  it('migrates into NAME.qcow2: qemu-img compares it equal to the source and checks it clean; it becomes a neighbour read as qcow2', { skip: haveMkfs ? false : 'mkfs.ext4 is not installed' }, async () => {
    const shared = { 'lib.so': seededBytes(10, 3_000_000), 'doc.txt': Buffer.from('hello qcow2\n'.repeat(5000)) };
    const a = mkfs('vm-a', { ...shared, 'a.dat': seededBytes(11, 2_000_000) });
    const b = mkfs('vm-b', { ...shared, 'b.dat': seededBytes(12, 1_000_000) });
    const svc = await DestinationService.start({ dataDir: p('dst-q'), auth: { key }, imageFormat: 'qcow2' });
    try {
      const to = `127.0.0.1:${svc.address.port}`;
      const r = await migrate(a, { to, name: 'a', strategy: 'similarity', auth: { key } });
      assert.equal(r.verified, true);
      const out = join(p('dst-q'), 'a.qcow2');
      assert.ok(existsSync(out) && !existsSync(join(p('dst-q'), 'a.img')));
      assert.equal(JSON.parse(qemu(['info', '--output=json', out])).format, 'qcow2');
      assertClean(out);
      assertSame(out, a);
      // Zero blocks of the source took no data clusters: the file holds about what the source's data is.
      assert.ok(statSync(out).size < statSync(a).size, `${statSync(out).size} bytes for a ${statSync(a).size}-byte source`);
      // Indexed as a neighbour, through the qcow2 reader: the second image's shared files come from it.
      const indexed = () => svc.neighbourhood.images.find((i) => i.path === out);
      for (let i = 0; i < 200 && !indexed(); i++) await new Promise((res) => setTimeout(res, 50)); // indexing follows DONE
      const im = indexed();
      assert.equal(im?.format, 'qcow2');
      const r2 = await migrate(b, { to, name: 'b', strategy: 'similarity', auth: { key } });
      assert.ok(r2.blocks.filledFromNeighbours > 700, `filled from the qcow2 neighbour: ${r2.blocks.filledFromNeighbours} blocks`);
      assertClean(join(p('dst-q'), 'b.qcow2'));
      assertSame(join(p('dst-q'), 'b.qcow2'), b);
      // The name is taken, whatever the format: no overwrite unless asked.
      await assert.rejects(migrate(a, { to, name: 'b', auth: { key } }), (e: Error & { code?: string }) => /exists/.test(e.message));
    } finally {
      await svc.close();
    }
  });

  it('resumes a dropped migration from the partial qcow2 image, which qemu-img checks clean meanwhile', async () => {
    const src = p('resume-src.img');
    const data = Buffer.from(seededBytes(77, 8 * MiB));
    data.fill(0, 2 * MiB, 3 * MiB);
    writeFileSync(src, data);
    const svc = await DestinationService.start({ dataDir: p('dst-r'), auth: { key }, imageFormat: 'qcow2' });
    try {
      const to = `127.0.0.1:${svc.address.port}`;
      let dropped = false;
      const first = migrate(src, { to, name: 'r', strategy: 'full', auth: { key }, bwlimit: 2 << 20, onEvent: (e) => {
        if (e.phase === 'transfer' && !dropped) {
          dropped = true;
          setTimeout(() => { for (const s of svc.sockets) s.destroy(); }, 1500);
        }
      } });
      await assert.rejects(first);
      const partial = join(p('dst-r'), 'r.qcow2.partial');
      assert.ok(existsSync(partial) && existsSync(join(p('dst-r'), 'r.qcow2.journal')));
      assert.ok(!existsSync(join(p('dst-r'), 'r.qcow2')));
      assert.deepEqual(listPartials(p('dst-r')).map((x) => x.name), ['r']);
      // Wait for the session to close the sink (its last checkpoint), then qemu's verdict on the partial image.
      for (let i = 0; i < 100 && check(partial).status !== 0; i++) await new Promise((res) => setTimeout(res, 50));
      assertClean(partial);
      const r = await migrate(src, { to, name: 'r', strategy: 'full', auth: { key } });
      assert.ok(r.blocks.resumed > 0, `resumed ${r.blocks.resumed}`);
      assertClean(join(p('dst-r'), 'r.qcow2'));
      assertSame(join(p('dst-r'), 'r.qcow2'), src);
    } finally {
      await svc.close();
    }
  });

  it('post-copy into qcow2: NBD clients read the image while it arrives; the committed NAME.qcow2 is served, also after a restart', async () => {
    const src = p('pc-src.img');
    const data = Buffer.from(seededBytes(91, 16 * MiB));
    data.fill(0, 4 * MiB, 6 * MiB);
    writeFileSync(src, data);
    const sock = p('pc.sock');
    const uri = `nbd+unix:///vm?socket=${sock}`;
    // Asynchronous: the NBD server answering these clients runs in this process.
    const compare = (target: string) => tool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', target, src]);
    let svc = await DestinationService.start({ dataDir: p('dst-pc'), auth: { insecure: true }, imageFormat: 'qcow2', nbd: { path: sock } });
    try {
      let during: ReturnType<typeof compare> | undefined;
      const r = await migrate(src, {
        to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'postcopy', auth: { insecure: true }, bwlimit: 4e6,
        // The VM starts here: a client reads the whole disk while the push goes on (its reads pull blocks ahead).
        resume: () => { during = compare(uri); },
      });
      assert.equal(r.verified, true);
      const c = await during!;
      assert.equal(c.status, 0, `qemu-img compare over NBD mid-migration: ${c.out}`);
      const out = join(p('dst-pc'), 'vm.qcow2');
      assertClean(out);
      assertSame(out, src);
      // The committed image is served from now on (through the writer, opened in place).
      assert.equal((await compare(uri)).status, 0);
    } finally {
      await svc.close();
    }
    // A restarted service serves the qcow2 images of its data directory.
    svc = await DestinationService.start({ dataDir: p('dst-pc'), auth: { insecure: true }, imageFormat: 'qcow2', nbd: { path: sock } });
    try {
      assert.equal((await compare(uri)).status, 0);
      const w = await tool('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 1000 5000', uri]);
      assert.equal(w.status, 0, w.out);
    } finally {
      await svc.close();
    }
    data.fill(0x77, 1000, 6000);
    writeFileSync(p('pc-expected.raw'), data);
    assertClean(join(p('dst-pc'), 'vm.qcow2'));
    assertSame(join(p('dst-pc'), 'vm.qcow2'), p('pc-expected.raw'));
  });

  it('an image format it does not write is refused: ERR_BF_INVALID_ARGUMENT', async () => {
    await assert.rejects(DestinationService.start({ dataDir: p('dst-n'), auth: { key }, imageFormat: 'vmdk' as 'raw' }), { code: ErrorCode.INVALID_ARGUMENT });
  });
});

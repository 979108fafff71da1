// qcow2 images and chains read natively, checked against qemu itself:
// images made and written with qemu-img and qemu-io, every read compared byte
// for byte with `qemu-img convert -O raw` of the same file, extents with
// `qemu-img map`; then hostile files, which must end in a typed error.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSource, specFor, sourceIdentity, ErrorCode, type Extent } from '../src/index.js';
import { Qcow2ImageSource } from '../src/image/qcow2.js';
import { Scanner, blockMapsFor } from '../src/scan/scanner.js';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate } from '../src/migrate/migrate.js';
import { BlockMap } from '../src/blockmap/blockmap.js';
import { rng } from './util.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;

let dir: string;
before(() => { dir = mkdtempSync(join(tmpdir(), 'bf-qcow2-')); });
after(() => rmSync(dir, { recursive: true, force: true }));

const p = (name: string) => join(dir, name);
function run(cmd: string, args: string[], cwd = dir): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}
function create(name: string, size: string, opts: string[] = []): string {
  run('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, p(name), size]);
  return p(name);
}
/** Writes through qemu-io: each command like 'write -P 0xaa 0 64k' or 'write -z 1M 64k'. */
function io(file: string, ...cmds: string[]): void {
  run('qemu-io', [...cmds.flatMap((c) => ['-c', c]), file]);
}
function rawOf(file: string): Buffer {
  const out = `${file}.converted.raw`;
  run('qemu-img', ['convert', '-O', 'raw', file, out]);
  const b = readFileSync(out);
  rmSync(out);
  return b;
}
/** qemu's allocation: the data=true ranges of `qemu-img map`, coalesced. */
function qemuData(file: string): Extent[] {
  const map = JSON.parse(run('qemu-img', ['map', '--output=json', file])) as Array<{ start: number; length: number; data: boolean }>;
  return coalesce(map.filter((m) => m.data).map((m) => ({ offset: m.start, length: m.length })));
}
function coalesce(xs: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const x of xs) {
    const last = out[out.length - 1];
    if (last && last.offset + last.length === x.offset) last.length += x.length;
    else out.push({ ...x });
  }
  return out;
}

/** Reads the image whole and in uneven pieces, compares with qemu's raw conversion, and its extents with qemu's map. */
function check(file: string, options: { map?: boolean } = {}): Qcow2ImageSource {
  const spec = specFor(file);
  assert.equal(spec.kind, 'qcow2');
  const src = openSource(spec) as Qcow2ImageSource;
  try {
    const want = rawOf(file);
    assert.equal(src.size, want.length, 'virtual size');
    const all = Buffer.alloc(src.size);
    src.readInto(all, 0, src.size);
    assert.ok(all.equals(want), 'the whole image reads as qemu-img convert -O raw');
    // Pieces that start and end anywhere: inside clusters, across cluster and L2-table boundaries.
    const r = rng(src.size);
    for (let i = 0; i < 200; i++) {
      const offset = r() % src.size;
      const length = Math.min(src.size - offset, r() % (3 << 20));
      const piece = Buffer.alloc(length);
      src.readInto(piece, offset, length);
      if (!piece.equals(want.subarray(offset, offset + length))) assert.fail(`bytes ${offset}+${length} differ from qemu's`);
    }
    const extents = src.extents(0, src.size);
    // The contract: everything outside the extents reads as zeros.
    let at = 0;
    for (const x of [...extents, { offset: src.size, length: 0 }]) {
      assert.ok(x.offset >= at, 'sorted, not overlapping');
      if (want.subarray(at, x.offset).some((b) => b !== 0)) assert.fail(`non-zero bytes in the hole ${at}..${x.offset}`);
      at = x.offset + x.length;
    }
    if (options.map !== false) assert.deepEqual(extents, qemuData(file), 'extents are qemu-img map\'s data ranges');
    return src;
  } catch (e) {
    src.close();
    throw e;
  }
}

describe('qcow2 read natively, against qemu-img', () => {
  it('version 3: data, partial clusters, zero clusters, unallocated', () => {
    const f = create('v3.qcow2', '16M');
    io(f, 'write -P 0xaa 0 1M', 'write -P 0xbb 1000 3000', 'write -P 0xcc 5M 200k', 'write -z 256k 128k', 'write -P 0xdd 16711680 65536');
    check(f).close();
  });

  it('version 2 (compat=0.10)', () => {
    const f = create('v2.qcow2', '16M', ['-o', 'compat=0.10']);
    io(f, 'write -P 0x11 0 300k', 'write -P 0x22 7M 1M', 'write -z 100k 64k');
    const src = check(f);
    src.close();
    assert.equal(readFileSync(f).readUInt32BE(4), 2, 'really version 2');
  });

  for (const [name, size, opts] of [['4k', '8M', ['-o', 'cluster_size=4096']], ['2m', '16M', ['-o', 'cluster_size=2M']], ['512', '3M', ['-o', 'cluster_size=512']]] as const) {
    it(`cluster size ${name}: runs across clusters and L2 tables`, () => {
      const f = create(`cs${name}.qcow2`, size, [...opts]);
      // 4 KiB clusters: an L2 table maps 2 MiB, so a write around 2 MiB crosses tables.
      io(f, 'write -P 0x31 0 5000', 'write -P 0x32 2000k 100k', 'write -P 0x33 2M 4096', 'write -z 2100k 8k', 'write -P 0x34 2500k 1k');
      check(f).close();
    });
  }

  it('a chain: qcow2 base, relative and absolute backing paths, zeros that hide the base', () => {
    mkdirSync(p('chain'), { recursive: true });
    const base = create('chain/base.qcow2', '12M');
    io(base, 'write -P 0x01 0 4M', 'write -P 0x02 8M 2M');
    // mid names its base relative to its own directory; top names mid by absolute path.
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], p('chain'));
    const mid = p('chain/mid.qcow2');
    io(mid, 'write -P 0x03 1M 1M', 'write -z 8M 512k');
    const top = create('top.qcow2', '12M', ['-b', mid, '-F', 'qcow2']);
    io(top, 'write -P 0x04 1536k 1M', 'write -z 0 64k', 'write -P 0x05 11M 4k');
    const src = check(top);
    try {
      assert.deepEqual(src.layers.map((l) => [l.path, l.format]), [[top, 'qcow2'], [mid, 'qcow2'], [base, 'qcow2']]);
      // Each layer's own map, as qemu-img map of that file alone sees it (no backing).
      for (const [i, file] of [top, mid, base].entries()) {
        const own = JSON.parse(run('qemu-img', ['map', '--output=json', '-f', 'qcow2', `json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"${file}"}}`])) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
        assert.deepEqual(src.layerAllocation(i), coalesce(own.filter((m) => m.data).map((m) => ({ offset: m.start, length: m.length }))), `layer ${i}'s own data`);
      }
      assert.deepEqual(src.layerMap(0).filter((r) => r.kind === 'zero'), [{ kind: 'zero', offset: 0, length: 65536 }]);
    } finally {
      src.close();
    }
  });

  it('a raw backing file (smaller than the overlay), named with a format and probed without one', () => {
    const base = p('base.raw');
    writeFileSync(base, Buffer.alloc(0));
    truncateSync(base, 3 << 20);
    const fd = openSync(base, 'r+');
    writeSync(fd, Buffer.alloc(100_000, 0x61), 0, 100_000, 5000);
    writeSync(fd, Buffer.alloc(4096, 0x62), 0, 4096, 2 << 20);
    closeSync(fd);
    const top = create('onraw.qcow2', '6M', ['-b', 'base.raw', '-F', 'raw']);
    io(top, 'write -P 0x63 64k 64k', 'write -P 0x64 2940k 300k');
    const want = rawOf(top);
    check(top).close();
    // The same overlay with its backing-format extension renamed to a type no one knows:
    // the extension is skipped and the backing file is probed (no qcow2 magic: raw).
    const probed = p('probed.qcow2');
    copyFileSync(top, probed);
    const b = readFileSync(probed);
    const at = b.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]), 104);
    assert.ok(at > 0, 'the backing format extension is there');
    b.writeUInt32BE(0x0badf00d, at);
    writeFileSync(probed, b);
    const src = openSource(specFor(probed)) as Qcow2ImageSource;
    try {
      assert.deepEqual(src.layers.map((l) => l.format), ['qcow2', 'raw']);
      const got = Buffer.alloc(src.size);
      src.readInto(got, 0, src.size);
      assert.ok(got.equals(want));
    } finally {
      src.close();
    }
  });

  it('compressed clusters: deflate and zstd (qemu-img convert -c)', () => {
    const f = create('plain.qcow2', '8M');
    io(f, 'write -P 0x41 0 1M', 'write -P 0x42 3M 100k', 'write -P 0x43 7M 1M');
    // Text-like content compresses to odd lengths that share sectors.
    const text = Buffer.from('the quick brown fox jumps over the lazy dog '.repeat(30000));
    const fd = openSync(p('text.raw'), 'w');
    writeSync(fd, text, 0, text.length, 0);
    closeSync(fd);
    truncateSync(p('text.raw'), 4 << 20);
    for (const [src, type] of [[f, 'zlib'], [p('text.raw'), 'zlib'], [f, 'zstd'], [p('text.raw'), 'zstd']] as const) {
      const out = p(`c-${type}-${src.endsWith('raw') ? 'text' : 'plain'}.qcow2`);
      run('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', `compression_type=${type}`, src, out]);
      check(out).close();
    }
  });

  it('extended L2 entries: subclusters of an overlay over its base', () => {
    const base = create('ebase.qcow2', '4M');
    io(base, 'write -P 0x51 0 4M');
    const top = create('etop.qcow2', '4M', ['-o', 'extended_l2=on,cluster_size=64k', '-b', base, '-F', 'qcow2']);
    // 2 KiB subclusters: a 2 KiB write allocates one, a zeroed subcluster hides the base.
    io(top, 'write -P 0x52 4096 2048', 'write -z 10240 2048', 'write -P 0x53 1M 100k', 'write -z 2M 64k');
    check(top).close();
  });

  it("format 'raw' reads a file with a qcow2 header as raw bytes (no probing: its backing file is never opened)", async () => {
    const secret = p('host-secret.raw');
    writeFileSync(secret, Buffer.alloc(65536, 0x5e));
    // What a guest could write at the start of its raw disk: a qcow2 header naming a host file.
    const disk = create('guest-disk.img', '64k', ['-b', secret, '-F', 'raw']);
    const bytes = readFileSync(disk);
    assert.equal(specFor(disk).kind, 'qcow2', 'probed: read as qcow2');
    const spec = specFor(disk, { format: 'raw' });
    assert.equal(spec.kind, 'file');
    const src = openSource(spec);
    try {
      const got = Buffer.alloc(src.size);
      src.readInto(got, 0, src.size);
      assert.ok(got.equals(bytes), 'the file itself, not its backing');
    } finally {
      src.close();
    }
    const scanner = new Scanner({ workers: 1 });
    try {
      const [m] = await scanner.scan(disk, { format: 'raw', blockSize: 4096 });
      assert.equal(m!.identity.size, bytes.length);
    } finally {
      await scanner.close();
    }
    assert.throws(() => openSource(specFor(secret, { format: 'qcow2' })), { code: ErrorCode.BAD_MAGIC });
  });

  it('scan of a qcow2 chain equals the scan of its raw conversion; a change in any layer makes its block map stale', async () => {
    const base = create('sbase.qcow2', '24M');
    io(base, 'write -P 0x61 0 6M', 'write -P 0x62 12M 2M');
    const top = create('stop.qcow2', '24M', ['-b', base, '-F', 'qcow2']);
    io(top, 'write -P 0x63 1M 1M', 'write -z 12M 1M', 'write -P 0x64 20M 300k');
    const raw = p('stop.raw');
    run('qemu-img', ['convert', '-O', 'raw', top, raw]);
    const scanner = new Scanner({ workers: 2 });
    try {
      const [q] = await scanner.scan(top, { blockSize: 4096, sha1: true });
      const [r] = await scanner.scan(raw, { blockSize: 4096, sha1: true });
      assert.equal(q!.identity.size, r!.identity.size);
      assert.deepEqual([...q!.dataRuns], [...r!.dataRuns]);
      assert.deepEqual(q!.fingerprints, r!.fingerprints);
      assert.deepEqual(q!.digests, r!.digests);

      const mapDir = p('maps');
      const first = await blockMapsFor(scanner, top, { mapDir });
      assert.equal(first.source, 'scanned');
      assert.match(first.files[0]!, /\/qcow2-[^/]*\.bfmap$/);
      assert.equal((await blockMapsFor(scanner, top, { mapDir })).source, 'loaded', 'an unchanged chain reuses its map');
      const before = sourceIdentity(specFor(top));
      io(base, 'write -P 0x65 16M 64k'); // the base changes, the top file does not
      assert.notDeepEqual(sourceIdentity(specFor(top)), before);
      const again = await blockMapsFor(scanner, top, { mapDir });
      assert.equal(again.source, 'scanned', 'a change in the base is a new key: the map is not reused');
      assert.notEqual(again.files[0], first.files[0]);
      assert.ok(!existsSync(first.files[0]!), 'the old version\'s entry is gone');
    } finally {
      await scanner.close();
    }
  });

  it('blockferry scan of a qcow2 chain (a process) reports and saves what the scan of its raw conversion does', () => {
    const base = create('cbase.qcow2', '16M');
    io(base, 'write -P 0x81 0 5M', 'write -P 0x82 9M 1M');
    const top = create('ctop.qcow2', '16M', ['-b', base, '-F', 'qcow2']);
    io(top, 'write -P 0x83 512k 1M', 'write -z 9M 256k', 'write -P 0x84 15M 4k');
    const raw = p('ctop.raw');
    run('qemu-img', ['convert', '-O', 'raw', top, raw]);
    const mapDir = p('cli-maps');
    const out = JSON.parse(run(process.execPath, [bin, 'scan', top, raw, '--sha1', '--map-dir', mapDir, '--json'])) as Array<Record<string, unknown>>;
    const strip = ({ image: _i, seconds: _s, mbPerSecond: _m, mapFile: _f, ...rest }: Record<string, unknown>) => rest;
    assert.equal(out.length, 2);
    assert.deepEqual(strip(out[0]!), strip(out[1]!));
    const [q, r] = [top, raw].map((f, i) => BlockMap.load(out[i]!.mapFile as string, f));
    assert.deepEqual([...q!.dataRuns], [...r!.dataRuns]);
    assert.deepEqual(q!.fingerprints, r!.fingerprints);
    assert.deepEqual(q!.digests, r!.digests);
  });

  it('migrate a qcow2 chain: the destination is byte-identical to qemu-img convert -O raw', async () => {
    const base = create('mbase.qcow2', '20M');
    io(base, 'write -P 0x71 0 8M', 'write -P 0x72 15M 1M');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mbase.qcow2', '-F', 'qcow2', 'mtop.qcow2']);
    const top = p('mtop.qcow2');
    io(top, 'write -P 0x73 2M 1M', 'write -z 4M 2M', 'write -P 0x74 19M 4k');
    const svc = await DestinationService.start({ dataDir: p('dest'), auth: { insecure: true } });
    try {
      const r = await migrate(top, { to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'full', auth: { insecure: true } });
      assert.equal(r.verified, true);
      assert.ok(readFileSync(join(p('dest'), 'vm.img')).equals(rawOf(top)), 'byte-identical');
    } finally {
      await svc.close();
    }
  });
});

describe('hostile qcow2 files get a typed error', () => {
  /** A valid image with data in its first cluster, to be damaged. */
  function victim(name: string): { file: string; bytes: Buffer } {
    const f = create(name, '4M');
    io(f, 'write -P 0x99 0 64k');
    return { file: f, bytes: readFileSync(f) };
  }
  /** Opening and reading everything (and its extents) fails with code. */
  function refused(file: string, code: string): void {
    assert.throws(() => {
      const src = openSource(specFor(file));
      try {
        src.extents(0, src.size);
        src.readInto(Buffer.alloc(src.size), 0, src.size);
      } finally {
        src.close();
      }
    }, (e: { code?: string; message?: string }) => {
      assert.equal(e.code, code, e.message);
      return true;
    });
  }

  it('a truncated header', () => {
    const { file, bytes } = victim('trunc.qcow2');
    writeFileSync(file, bytes.subarray(0, 50));
    refused(file, ErrorCode.TRUNCATED);
    writeFileSync(file, bytes.subarray(0, 90));
    refused(file, ErrorCode.TRUNCATED);
  });

  it('an L1 table past the end of the file, and one absurdly large', () => {
    const { file, bytes } = victim('l1.qcow2');
    const b = Buffer.from(bytes);
    b.writeBigUInt64BE(1n << 40n, 40);
    writeFileSync(file, b);
    refused(file, ErrorCode.CORRUPT);
    const c = Buffer.from(bytes);
    c.writeUInt32BE(0xffffffff, 36);
    writeFileSync(file, c);
    refused(file, ErrorCode.CORRUPT);
  });

  it('an L2 table past the end of the file', () => {
    const { file, bytes } = victim('l2.qcow2');
    const b = Buffer.from(bytes);
    const l1 = Number(b.readBigUInt64BE(40));
    b.writeBigUInt64BE((1n << 63n) | (1n << 40n), l1);
    writeFileSync(file, b);
    refused(file, ErrorCode.CORRUPT);
  });

  it('a data cluster past the end of the file', () => {
    const { file, bytes } = victim('data.qcow2');
    const b = Buffer.from(bytes);
    const l2 = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
    b.writeBigUInt64BE((1n << 63n) | (1n << 40n), l2);
    writeFileSync(file, b);
    refused(file, ErrorCode.CORRUPT);
  });

  it('a backing chain that loops (a → b → a), and one deeper than 64 files', () => {
    const b = create('loop-b.qcow2', '1M');
    const a = create('loop-a.qcow2', '1M', ['-b', b, '-F', 'qcow2']);
    run('qemu-img', ['rebase', '-u', '-b', a, '-F', 'qcow2', b]);
    refused(a, ErrorCode.CORRUPT);
    refused(b, ErrorCode.CORRUPT);
    mkdirSync(p('deep'));
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'l0.qcow2', '1M'], p('deep'));
    for (let i = 1; i <= 65; i++) run('qemu-img', ['rebase', '-u', '-b', `l${i - 1}.qcow2`, '-F', 'qcow2', (copyFileSync(p('deep/l0.qcow2'), p(`deep/l${i}.qcow2`)), `l${i}.qcow2`)], p('deep'));
    refused(p('deep/l65.qcow2'), ErrorCode.CORRUPT);
    // 64 files in all is still a chain.
    openSource(specFor(p('deep/l63.qcow2'))).close();
  });

  it('a missing backing file', () => {
    const base = create('gone-base.qcow2', '1M');
    const top = create('gone-top.qcow2', '1M', ['-b', base, '-F', 'qcow2']);
    rmSync(base);
    refused(top, ErrorCode.IMAGE_NOT_FOUND);
  });

  it('an unknown incompatible feature bit, external data file, bad cluster_bits', () => {
    const { file, bytes } = victim('feat.qcow2');
    const b = Buffer.from(bytes);
    b.writeBigUInt64BE(b.readBigUInt64BE(72) | (1n << 40n), 72);
    writeFileSync(file, b);
    refused(file, ErrorCode.UNSUPPORTED_FEATURE);
    const c = Buffer.from(bytes);
    c.writeBigUInt64BE(c.readBigUInt64BE(72) | 4n, 72);
    writeFileSync(file, c);
    refused(file, ErrorCode.UNSUPPORTED_FEATURE);
    const d = Buffer.from(bytes);
    d.writeUInt32BE(31, 20);
    writeFileSync(file, d);
    refused(file, ErrorCode.CORRUPT);
  });

  it('an encrypted image', () => {
    const f = p('enc.qcow2');
    run('qemu-img', ['create', '-q', '--object', 'secret,id=s0,data=hunter2', '-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=s0', f, '1M']);
    refused(f, ErrorCode.UNSUPPORTED_FEATURE);
  });

  it('a compressed cluster that does not decompress', () => {
    const f = create('cplain.qcow2', '1M');
    io(f, 'write -P 0x42 0 64k');
    const c = p('cbad.qcow2');
    run('qemu-img', ['convert', '-c', '-O', 'qcow2', f, c]);
    const b = readFileSync(c);
    const l2 = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
    const desc = b.readBigUInt64BE(l2);
    const host = Number(desc & ((1n << 54n) - 1n));
    b.fill(0xff, host, host + 64);
    writeFileSync(c, b);
    refused(c, ErrorCode.CORRUPT);
  });

  it('random damage to the metadata never crashes or hangs: a typed error or a successful read', () => {
    const { bytes } = victim('fuzz-src.qcow2');
    const file = p('fuzz.qcow2');
    const r = rng(11);
    const l1 = Number(bytes.readBigUInt64BE(40));
    const l2 = Number(bytes.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    for (let i = 0; i < 300; i++) {
      const b = Buffer.from(bytes);
      // Damage the header, the L1 table or the L2 table.
      const region = [[0, 112], [l1, 8], [l2, 64]][r() % 3]!;
      for (let k = 0; k < 1 + (r() % 4); k++) b[region[0]! + (r() % region[1]!)] = r() & 0xff;
      writeFileSync(file, b);
      try {
        const src = openSource(specFor(file));
        try {
          const n = Math.min(src.size, 8 << 20);
          src.extents(0, n);
          src.readInto(Buffer.alloc(n), 0, n);
        } finally {
          src.close();
        }
      } catch (e) {
        const code = (e as { code?: string }).code;
        assert.ok(typeof code === 'string' && code.startsWith('ERR_BF_') && code !== ErrorCode.INTERNAL, `case ${i}: ${String(e)}`);
      }
    }
  });
});


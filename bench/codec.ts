// The wire codec: zstd on one stream per direction, each 1 MiB frame payload
// flushed (ZSTD_e_flush), on real data cut into 4 KiB blocks in 1 MiB frames
// and on random data. blockferry's codec (zstd-napi, libzstd built from
// source) against the WASM builds on the registry:
// - @hpcc-js/wasm-zstd: libzstd 1.5.7 in WASM, a streaming context whose
//   compressChunk flushes (the same stream format as ours: checked below);
// - @bokuweb/zstd-wasm: one-shot ZSTD_compress per frame, no shared context
//   (what a codec without streaming would cost and save).
// Every peer's output is decoded and compared with the input before timing,
// and the hpcc stream is decoded by our decompressor too.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { Zstd } from '@hpcc-js/wasm-zstd';
import * as bokuweb from '@bokuweb/zstd-wasm';
import Table from 'cli-table3';
import { CodecId, createCompressor, createDecompressor } from '../src/protocol/codec.js';
import { check, randomFill, runGroup, type GroupResult } from './lib.js';

const MiB = 1 << 20;
const FRAME = MiB; // 256 blocks of 4 KiB
const LEVELS = [-5, 1, 3, 9];

/** Real data: 16 MiB of a tar of shared libraries (binaries), 8 MiB of a tar of TypeScript's lib (text). */
function realCorpus(): { data: Buffer; what: string } {
  const tar = (dir: string, sub: string, bytes: number) =>
    execFileSync('sh', ['-c', `tar cf - -C '${dir}' '${sub}' 2>/dev/null | head -c ${bytes}`], { maxBuffer: bytes + MiB });
  const libDir = existsSync('/usr/lib/x86_64-linux-gnu') ? ['/usr/lib', 'x86_64-linux-gnu'] : ['/usr', 'lib'];
  const bin = tar(libDir[0]!, libDir[1]!, 16 * MiB);
  const text = tar(new URL('../../node_modules/typescript', import.meta.url).pathname, 'lib', 8 * MiB);
  const data = Buffer.concat([bin, text]);
  const size = Math.floor(data.length / FRAME) * FRAME;
  return { data: data.subarray(0, size), what: `tar of ${libDir.join('/')} (${(bin.length / MiB).toFixed(0)} MiB) + typescript/lib (${(text.length / MiB).toFixed(0)} MiB)` };
}

const framesOf = (data: Buffer) => Array.from({ length: data.length / FRAME }, (_, i) => data.subarray(i * FRAME, (i + 1) * FRAME));
const total = (bufs: Uint8Array[]) => bufs.reduce((s, b) => s + b.byteLength, 0);

interface Peer {
  name: string;
  /** Compresses every frame on one fresh stream. */
  compress(frames: Buffer[], level: number): Uint8Array[];
  /** Decodes a stream made by compress, frame by frame. */
  decompress(compressed: Uint8Array[], frameSize: number): Uint8Array[];
}

export async function benchCodec(): Promise<GroupResult[]> {
  const hpccC = await Zstd.load();
  const hpccD = await Zstd.load();
  await bokuweb.init();

  const peers: Peer[] = [
    {
      name: 'blockferry zstd (zstd-napi)',
      compress(frames, level) {
        const c = createCompressor(CodecId.ZSTD, level);
        const out = frames.map((f) => c.compress(f));
        c.close();
        return out;
      },
      decompress(compressed, size) {
        const d = createDecompressor(CodecId.ZSTD);
        const out = compressed.map((c) => d.decompress(c, size));
        d.close();
        return out;
      },
    },
    {
      name: '@hpcc-js/wasm-zstd stream',
      compress(frames, level) {
        hpccC.reset();
        hpccC.setCompressionLevel(level);
        return frames.map((f) => hpccC.compressChunk(f));
      },
      decompress(compressed, size) {
        hpccD.reset();
        return compressed.map((c) => hpccD.decompressChunk(c, size));
      },
    },
    {
      name: '@bokuweb/zstd-wasm per frame',
      compress: (frames, level) => frames.map((f) => bokuweb.compress(f, level)),
      decompress: (compressed) => compressed.map((c) => bokuweb.decompress(c)),
    },
  ];

  const groups: GroupResult[] = [];
  const real = realCorpus();
  const random = Buffer.allocUnsafe(16 * MiB);
  randomFill(random, 7);
  const sets = [
    { label: 'real data', data: real.data, what: real.what, levels: LEVELS },
    { label: 'random data', data: random, what: 'xorshift random', levels: [1, 3] },
  ];
  const ratioTable = new Table({ head: ['data', 'level', ...peers.map((p) => p.name)], style: { head: [], border: [] } });
  for (const set of sets) {
    const frames = framesOf(set.data);
    const mib = set.data.length / MiB;
    for (const level of set.levels) {
      // Check every peer's round trip before timing it, and keep its stream for the decompression group.
      const streams = new Map<string, Uint8Array[]>();
      const ratios: string[] = [];
      for (const p of peers) {
        const c = p.compress(frames, level);
        const d = p.decompress(c, FRAME);
        check(`${p.name} level ${level} round trip`, d.length === frames.length && d.every((f, i) => Buffer.compare(f, frames[i]!) === 0));
        streams.set(p.name, c);
        ratios.push((total(c) / set.data.length).toFixed(3));
      }
      const ours = createDecompressor(CodecId.ZSTD);
      const cross = streams.get(peers[1]!.name)!.map((c) => ours.decompress(c, FRAME));
      check(`our decompressor reads the ${peers[1]!.name} stream at level ${level}`, cross.every((f, i) => Buffer.compare(f, frames[i]!) === 0));
      ratioTable.push([set.label, String(level), ...ratios]);

      const ops: Array<['compress' | 'decompress', (p: (typeof peers)[number]) => unknown]> = [
        ['compress', (p) => p.compress(frames, level)],
        ['decompress', (p) => p.decompress(streams.get(p.name)!, FRAME)],
      ];
      for (const [op, fn] of ops) {
        groups.push(await runGroup({
          title: `zstd level ${level}, ${op} ${mib} MiB of ${set.label} in 1 MiB frames on one stream (one core)`,
          workPerOp: set.data.length,
          unit: 'MB/s',
          warmupIterations: 0,
          iterations: 3,
          time: 400,
          tasks: peers.map((p, i) => ({ name: p.name, ours: i === 0, fn: () => fn(p) })),
        }));
      }
    }
  }
  console.log(`\n## zstd compressed size ÷ input size (real data: ${real.what})`);
  console.log(ratioTable.toString());

  // Shared context: the same 1 MiB frame sent twice on one stream.
  const c = createCompressor(CodecId.ZSTD, 3);
  const f = framesOf(real.data)[0]!;
  const first = c.compress(f).length;
  const again = c.compress(f).length;
  console.log(`  the same 1 MiB frame twice on one stream, level 3: ${first} then ${again} bytes`);
  return groups;
}

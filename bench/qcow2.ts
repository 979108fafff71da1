// Writing an image as qcow2 (Qcow2ImageSink) against writing it raw
// (FileImageSink) and against qemu's own qcow2 writer (`qemu-img convert -O
// qcow2` of the same bytes, process start included). Each result is checked
// with `qemu-img compare` against the source before anything is timed.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileImageSink } from '../src/image/sink.js';
import { Qcow2ImageSink } from '../src/image/qcow2-writer.js';
import { seededBytes } from '../test/util.js';
import { check, runGroup, type GroupResult } from './lib.js';

const SIZE = 64 << 20;

export async function benchQcow2(): Promise<GroupResult[]> {
  const dir = mkdtempSync(join(tmpdir(), 'bf-bench-qcow2-'));
  try {
    // Three quarters data (random: incompressible, no repeats), one quarter zero, in 4 MiB stripes.
    const src = Buffer.alloc(SIZE);
    for (let at = 0; at < SIZE; at += 4 << 20) if ((at >> 22) % 4 !== 3) src.set(seededBytes(at, 4 << 20), at);
    const raw = join(dir, 'src.raw');
    writeFileSync(raw, src);
    const results: GroupResult[] = [];
    for (const piece of [1 << 20, 64 << 10]) {
      const write = async (sink: { write(o: number, d: Uint8Array): Promise<void>; commit(): Promise<void> }) => {
        for (let at = 0; at < SIZE; at += piece) await sink.write(at, src.subarray(at, at + piece));
        await sink.commit();
      };
      const ours = async () => { await write(await Qcow2ImageSink.create(join(dir, 'out.qcow2'), { size: SIZE })); };
      const rawSink = async () => { await write(await FileImageSink.create(join(dir, 'out.raw.partial'), join(dir, 'out.raw'), SIZE)); };
      const qemu = () => { execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, join(dir, 'qemu.qcow2')]); };
      await ours();
      await rawSink();
      qemu();
      const same = (f: string, fmt: string) => spawnSync('qemu-img', ['compare', '-f', fmt, '-F', 'raw', f, raw]).status === 0;
      check('qcow2 sink output equals the source', same(join(dir, 'out.qcow2'), 'qcow2'));
      check('qcow2 sink output checks clean', spawnSync('qemu-img', ['check', join(dir, 'out.qcow2')]).status === 0);
      check('raw sink output equals the source', same(join(dir, 'out.raw'), 'raw'));
      check('qemu-img convert output equals the source', same(join(dir, 'qemu.qcow2'), 'qcow2'));
      results.push(
        await runGroup({
          title: `Writing a 64 MiB image (3/4 random data, 1/4 zero) in ${piece >> 10} KiB writes, committed (fdatasync)`,
          workPerOp: SIZE,
          unit: 'MB/s',
          tasks: [
            { name: 'blockferry Qcow2ImageSink', ours: true, fn: ours },
            { name: 'blockferry FileImageSink (raw)', fn: rawSink },
            { name: 'qemu-img convert -O qcow2', fn: qemu },
          ],
          goals: [{ vs: 'qemu-img convert -O qcow2', min: 0.5 }],
          iterations: 5,
          warmupIterations: 0,
          time: 500,
        }),
      );
    }
    return results;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

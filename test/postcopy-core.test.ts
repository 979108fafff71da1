// Post-copy at the destination, without NBD in the way: the taken-over image
// (ArrivingImage) serves reads and writes while the source pushes.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate } from '../src/migrate/migrate.js';
import { spawn } from 'node:child_process';
import { seededBytes, rng } from './util.js';
import { ArrivingImage } from '../src/roles/destination/arriving.js';
import { NbdExportError, NBD_EIO } from '../src/nbd/protocol.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;

const BS = 4096;
const MiB = 1 << 20;
let dir: string;
let image: string;
let bytes: Buffer;

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'bf-pcore-'));
  image = join(dir, 'src.img');
  // 16 MiB: random data, a repeated block, and a hole in the middle.
  bytes = Buffer.alloc(16 * MiB);
  Buffer.from(seededBytes(7, 6 * MiB)).copy(bytes, 0);
  Buffer.from(seededBytes(8, 4 * MiB)).copy(bytes, 11 * MiB);
  writeFileSync(image, bytes);
});
after(() => rmSync(dir, { recursive: true, force: true }));

describe('post-copy: the destination serves the image while it arrives', () => {
  for (const strategy of ['postcopy', 'hybrid'] as const) {
    it(`${strategy}: every read mid-migration returns the source's bytes; a client's writes survive`, async () => {
      const svc = await DestinationService.start({ dataDir: join(dir, strategy), auth: { insecure: true } });
      const reads: Array<Promise<void>> = [];
      const random = rng(3);
      const writes: Array<{ off: number; data: Buffer }> = [];
      try {
        const r = await migrate(image, {
          to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy, auth: { insecure: true }, bwlimit: 8e6,
          resume: () => {
            const exp = svc.exportOf('vm');
            assert.ok(exp, 'served once switched');
            for (let i = 0; i < 40; i++) {
              const off = random() % (bytes.length - 3 * BS);
              const len = 1 + (random() % (3 * BS));
              reads.push(exp.read(off, len).then((got) => assert.deepEqual(Buffer.from(got), bytes.subarray(off, off + len), `read ${off}+${len}`)));
            }
            // Writes: a whole block, a partial block (read-modify-write), and one into the hole.
            for (const [off, len] of [[5 * BS, BS], [100 * BS + 17, 100], [8 * MiB + 3 * BS, 2 * BS]] as const) {
              const data = Buffer.alloc(len, 0xa5);
              writes.push({ off, data });
              reads.push(exp.write!(off, data, false));
            }
          },
        });
        await Promise.all(reads);
        const want = Buffer.from(bytes);
        for (const w of writes) w.data.copy(want, w.off);
        assert.ok(readFileSync(join(dir, strategy, 'vm.img')).equals(want), 'the final image is the source with the client\'s writes');
        assert.ok(r.postcopy, 'post-copy counts reported');
        assert.ok(r.postcopy.owned >= 4, `the written blocks became the destination's (${r.postcopy.owned})`);
      } finally {
        await svc.close();
      }
    });
  }
});

describe('post-copy: the source goes away', () => {
  it('reads of missing blocks fail at once with EIO, arrived ones still read; a resumed migration completes the image with the writes kept', async () => {
    let taken!: () => void;
    const tookOver = new Promise<void>((r) => { taken = r; });
    const svc = await DestinationService.start({ dataDir: join(dir, 'gone'), auth: { insecure: true }, log: (l) => { if (l.includes('taken over')) taken(); } });
    try {
      // A real source process, slow enough to be killed mid-push.
      const child = spawn(process.execPath, [bin, 'migrate', image, '--to', `127.0.0.1:${svc.address.port}`, '--insecure', '--name', 'vm', '--strategy', 'postcopy', '--bwlimit', '2M', '--progress', 'none'], { stdio: 'ignore' });
      const exited = new Promise((r) => child.on('exit', r));
      await tookOver;
      const exp = svc.exportOf('vm') as ArrivingImage;
      assert.ok(exp instanceof ArrivingImage);
      // The first block is pulled before the source dies; then a write of ours.
      assert.deepEqual(Buffer.from(await exp.read(0, BS)), bytes.subarray(0, BS));
      const mine = Buffer.alloc(BS, 0x3c);
      await exp.write(12 * MiB, mine, false);
      child.kill('SIGKILL');
      await exited;
      while (!exp.sourceGone) await new Promise((r) => setTimeout(r, 20));
      const missing = svc.missingOf('vm')!;
      assert.ok(missing.length > 0, 'blocks are missing');
      const m = missing[missing.length - 1]!;
      await assert.rejects(exp.read(m.start * BS, BS), (e: unknown) => e instanceof NbdExportError && e.errno === NBD_EIO && /ERR_BF_SOURCE_GONE|source went away/.test(e.message));
      assert.deepEqual(Buffer.from(await exp.read(0, BS)), bytes.subarray(0, BS), 'what arrived still reads');
      // The source is back: the same migration again resumes the taken-over image.
      const r = await migrate(image, { to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'postcopy', auth: { insecure: true } });
      const want = Buffer.from(bytes);
      mine.copy(want, 12 * MiB);
      assert.ok(readFileSync(join(dir, 'gone', 'vm.img')).equals(want), 'complete, with the write made while the source was away');
      assert.ok(r.blocks.sent < bytes.length / BS, 'the resumed attempt did not send everything again');
      assert.deepEqual(Buffer.from(await exp.read(12 * MiB, BS)), mine, 'still served after completion');
    } finally {
      await svc.close();
    }
  });
});

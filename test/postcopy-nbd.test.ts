// Post-copy and hybrid with real NBD clients reading and writing the
// destination's export while the image is still arriving (issue 10):
// qemu-img compare against the source mid-migration, nbdinfo --map, nbdcopy,
// qemu-io writes and pattern reads, on a real ext4 image.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate } from '../src/migrate/migrate.js';
import { TrackedImage } from '../src/image/tracked.js';
import { duplicateHeavyPair, type ImagePair } from './fixtures.js';

let dir: string;
let pair: ImagePair;

function tool(cmd: string, args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '', err = '';
    p.stdout.on('data', (d) => { out += d; });
    p.stderr.on('data', (d) => { err += d; });
    p.on('error', reject);
    p.on('exit', (code) => resolve({ code, out, err }));
  });
}

before(async () => {
  pair = await duplicateHeavyPair();
  dir = mkdtempSync(join(tmpdir(), 'bf-pcnbd-'));
});
after(() => rmSync(dir, { recursive: true, force: true }));

describe('the destination serves the image over NBD while it arrives', () => {
  for (const strategy of ['postcopy', 'hybrid'] as const) {
    it(`${strategy}: qemu-img compare, nbdinfo --map and nbdcopy mid-migration see the source's bytes`, async () => {
      const sock = join(dir, `${strategy}.sock`);
      const svc = await DestinationService.start({ dataDir: join(dir, strategy), auth: { insecure: true }, nbd: { path: sock }, ...(strategy === 'hybrid' ? { neighbours: [pair.older] } : {}) });
      const uri = `nbd+unix:///vm?socket=${sock}`;
      // The source: a copy written through a tracked image. For hybrid, a hot set
      // (2048 blocks, each written 3 times during the first pass) is left for after the switch.
      const image = join(dir, `${strategy}-src.img`);
      copyFileSync(pair.newer, image);
      const tracked = new TrackedImage(image);
      const hot = () => {
        const b = Buffer.alloc(4096);
        for (let round = 0; round < 3; round++) {
          for (let k = 0; k < 2048; k++) { b.fill(k & 255); b.writeUInt32LE(round, 0); tracked.write((4096 + k) * 4096, b); }
        }
      };
      let complete = false;
      let finishedBefore = false;
      let clients: Promise<void> | undefined;
      try {
        const r = await migrate(image, {
          to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy, auth: { insecure: true }, bwlimit: 6e6, tracked,
          onEvent: (e) => { if (e.phase === 'fingerprints' && strategy === 'hybrid') hot(); },
          resume: () => {
            // The VM starts here: clients read while the push is still going.
            clients = (async () => {
              const [cmp, map, copy] = await Promise.all([
                tool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, image]),
                tool('nbdinfo', ['--map', uri]),
                tool('nbdcopy', [uri, join(dir, `${strategy}-copy.img`)]),
              ]);
              finishedBefore = !complete;
              assert.equal(cmp.code, 0, `qemu-img compare: ${cmp.out}${cmp.err}`);
              assert.equal(map.code, 0, map.err);
              assert.match(map.out, /data/, 'nbdinfo --map lists extents');
              assert.equal(copy.code, 0, copy.err);
            })();
          },
        });
        complete = true;
        await clients;
        assert.ok(readFileSync(join(dir, `${strategy}-copy.img`)).equals(readFileSync(image)), 'nbdcopy of the export mid-migration equals the source');
        assert.ok(readFileSync(join(dir, strategy, 'vm.img')).equals(readFileSync(image)), 'the final image equals the source');
        // They started right at the switch: their reads of blocks not yet pushed were pulled.
        assert.ok(r.postcopy && r.postcopy.pulls > 0, 'the clients pulled blocks ahead of the push');
        if (strategy === 'postcopy') assert.ok(finishedBefore, 'the clients were done before the push was (the whole image was missing at the switch)');
        if (strategy === 'hybrid') assert.ok(r.postcopy.missingAtSwitch >= 2048, `the hot set waited for the switch (${r.postcopy.missingAtSwitch} missing)`);
      } finally {
        tracked.close();
        await svc.close();
      }
    });
  }

  it('postcopy: qemu-io writes during the push (whole and partial blocks) survive, and read back', async () => {
    const sock = join(dir, 'w.sock');
    const svc = await DestinationService.start({ dataDir: join(dir, 'w'), auth: { insecure: true }, nbd: { path: sock } });
    const uri = `nbd+unix:///vm?socket=${sock}`;
    const writes: Array<[number, number, number]> = [[1 << 20, 65536, 0x5a], [3 * (1 << 20) + 100, 5000, 0xc3], [7 * (1 << 20), 4096, 0x11]];
    let io: Promise<void> | undefined;
    try {
      await migrate(pair.newer, {
        to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'postcopy', auth: { insecure: true }, bwlimit: 6e6,
        resume: () => {
          io = (async () => {
            const cmds = writes.flatMap(([off, len, p]) => ['-c', `write -P ${p} ${off} ${len}`, '-c', `read -P ${p} ${off} ${len}`]);
            const r = await tool('qemu-io', ['-f', 'raw', ...cmds, uri]);
            assert.equal(r.code, 0, r.err);
            assert.doesNotMatch(r.out, /Pattern verification failed|error/i, r.out);
          })();
        },
      });
      await io;
      const want = readFileSync(pair.newer);
      for (const [off, len, p] of writes) want.fill(p, off, off + len);
      assert.ok(readFileSync(join(dir, 'w', 'vm.img')).equals(want), 'the final image holds the client\'s writes, and the source\'s bytes everywhere else');
      const r = await tool('qemu-io', ['-f', 'raw', ...writes.flatMap(([off, len, p]) => ['-c', `read -P ${p} ${off} ${len}`]), uri]);
      assert.equal(r.code, 0, r.err);
      assert.doesNotMatch(r.out, /Pattern verification failed/, 'served from the committed image afterwards');
    } finally {
      await svc.close();
    }
  });
});

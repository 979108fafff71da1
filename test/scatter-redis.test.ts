// Scatter-gather with the fleet's index on a real Redis Cluster (three
// masters, three replicas, started here): two sources evicting images of one
// base at the same time share the index, so each distinct content is stored
// once across both; a master SIGKILLed in the middle of the evictions fails
// over to its replica and no block is lost or sent twice; a later eviction
// of the same contents sends nothing, because the index says where they are.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { scatterGather } from '../src/migrate/scatter-gather.js';
import { openLocationIndex } from '../src/fleet/open.js';
import { distinct, images, services } from './sg-fixtures.js';
import { startRedisCluster, type RedisCluster } from './redis-cluster.js';

const have = (cmd: string, arg: string) => { try { execFileSync(cmd, [arg], { stdio: 'ignore' }); return true; } catch { return false; } };
const skip = !have('mkfs.ext4', '-V') ? 'mkfs.ext4 is not installed (.ci/run installs e2fsprogs)' : !have('redis-server', '--version') ? 'redis-server is not installed (.ci/run installs it)' : false;

let dir: string;
let cluster: RedisCluster | undefined;
before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'bf-sgredis-'));
  if (!skip) cluster = await startRedisCluster({ prefix: 'bf-sgredis' });
});
after(async () => {
  await cluster?.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe('scatter-gather with the index on Redis Cluster', { skip }, () => {
  it('two sources share the index: each distinct content is stored once; a master killed mid-eviction loses nothing; a second eviction of the same contents sends none', async () => {
    const c = cluster!;
    const imgs = images(dir, 'r');
    const want = distinct(imgs);
    const s = await services(dir, 'r', 20 << 20);
    try {
      // The master that holds slot 0 dies as soon as the first source starts scattering.
      const masters = await c.masters();
      let killed: number | undefined;
      const killOnce = (phase: string) => {
        if (phase !== 'scatter' || killed !== undefined) return;
        killed = masters[0]!;
        c.kill(killed);
      };
      const [a, b] = await Promise.all([
        scatterGather(imgs.slice(0, 2), { to: s.to, via: s.via, auth: s.auth, index: c.url, onEvent: (e) => killOnce(e.phase) }),
        scatterGather(imgs.slice(2), { to: s.to, via: s.via, auth: s.auth, index: c.url }),
      ]);
      assert.ok(killed !== undefined, 'a master was killed during the evictions');
      for (let i = 0; i < imgs.length; i++) {
        assert.ok(readFileSync(join(dir, 'r-dst', `r-${i}.img`)).equals(readFileSync(imgs[i]!)), `image ${i} differs`);
      }
      // Across both sources, every distinct content went to a store exactly once.
      const stashed = s.ims[0]!.stats.stashed + s.ims[1]!.stats.stashed + s.dst.stageStats.stashed;
      assert.equal(stashed, want.blocks, `${stashed} stored for ${want.blocks} distinct contents`);
      assert.equal(a.dedup.stashedBlocks + b.dedup.stashedBlocks, want.blocks);
      for (const im of [...a.images, ...b.images]) assert.equal(im.fromSource, 0, `${im.name} asked its source for blocks`);
      // The failover finished: the cluster is whole again, and the index answers for what was recorded.
      await c.waitHealthy(30_000);
      const index = await openLocationIndex(c.url);
      try {
        const blocks = await index.getBlocks('r-0', 0, 64);
        assert.ok(blocks.some((v) => v !== 0), 'the (image, block) → SHA-1 map of r-0 is in the cluster');
        assert.ok((await index.size()) >= want.blocks, 'every distinct content has a holder recorded');
      } finally {
        await index.close();
      }
      // Another eviction of the same contents (under new names) finds them all held: nothing is stored again.
      const before = stashed;
      const again = await scatterGather(imgs.slice(0, 2), { to: s.to, via: s.via, auth: s.auth, index: c.url, names: ['r-0-again', 'r-1-again'] });
      assert.equal(again.dedup.stashedBlocks, 0);
      assert.equal(s.ims[0]!.stats.stashed + s.ims[1]!.stats.stashed + s.dst.stageStats.stashed, before);
      for (let i = 0; i < 2; i++) assert.ok(readFileSync(join(dir, 'r-dst', `r-${i}-again.img`)).equals(readFileSync(imgs[i]!)));
    } finally {
      for (const im of s.ims) await im.close();
      await s.dst.close();
    }
  });
});

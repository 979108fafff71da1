// The fleet's location index: lookups and inserts per second through a real
// Redis Cluster (3 masters + 3 replicas on loopback, started here) against the
// embedded index, in batches of 65,536 digests (one scatter round), and what
// an entry costs Redis in memory, against one key per digest.
import { Cluster } from 'ioredis';
import { DIGEST_BYTES, EmbeddedLocationIndex, type LocationIndex } from '../src/fleet/location-index.js';
import { openLocationIndex } from '../src/fleet/open.js';
import { keySlot, type RedisLocationIndex } from '../src/fleet/redis-index.js';
import { startRedisCluster, type RedisCluster } from '../test/redis-cluster.js';
import { check, randomFill, runGroup, type GroupResult } from './lib.js';

/** Entries loaded before lookups are timed. */
const N = 1 << 20;
/** Digests per call: one scatter round's worth. */
const BATCH = 1 << 16;
/** Lookups per second the cluster should answer on this machine (issue 12). */
const GOAL = 200_000;

/** EVALSHA calls and microseconds spent in them, summed over the masters (INFO commandstats). */
async function evalshaStats(cluster: RedisCluster): Promise<{ calls: number; usec: number }> {
  let calls = 0, usec = 0;
  for (const port of await cluster.masters()) {
    const m = /cmdstat_evalsha:calls=(\d+),usec=(\d+)/.exec(await cluster.cli(port, 'info', 'commandstats'));
    if (m) { calls += Number(m[1]); usec += Number(m[2]); }
  }
  return { calls, usec };
}

async function usedMemory(cluster: RedisCluster): Promise<number> {
  let total = 0;
  for (const port of await cluster.masters()) total += Number(/used_memory:(\d+)/.exec(await cluster.cli(port, 'info', 'memory'))![1]);
  return total;
}

export interface FleetIndexFigures {
  entries: number;
  batch: number;
  bytesPerEntry: number;
  bytesPerEntryKeyPerDigest: number;
  bytesPerBlock: number;
  lookupsPerSecond: number;
  insertsPerSecond: number;
  serverUsPerLookup: number;
}

export async function benchFleetIndex(): Promise<{ groups: GroupResult[]; figures: FleetIndexFigures }> {
  const cluster = await startRedisCluster({ prefix: 'bfC-bench' });
  try {
    const all = new Uint8Array(N * DIGEST_BYTES);
    randomFill(all, 1203);
    const redis = (await openLocationIndex(cluster.url, { namespace: 'bench' })) as RedisLocationIndex;
    const embedded = new EmbeddedLocationIndex();
    const mem0 = await usedMemory(cluster);
    const t0 = performance.now();
    for (let lo = 0; lo < N; lo += BATCH) {
      const part = all.subarray(lo * DIGEST_BYTES, (lo + BATCH) * DIGEST_BYTES);
      await redis.record('dst', part);
      await embedded.record('dst', part);
    }
    const bytesPerEntry = ((await usedMemory(cluster)) - mem0) / N;
    console.log(`(loaded ${N} entries into both indexes in ${((performance.now() - t0) / 1000).toFixed(1)} s)`);
    check('index size', (await redis.size()) === N && (await embedded.size()) === N);

    // (image, block) → digest: 20 bytes a block in 256-block strings.
    const mem1 = await usedMemory(cluster);
    for (let lo = 0; lo < N; lo += BATCH) await redis.setBlocks('vm', lo, all.subarray(lo * DIGEST_BYTES, (lo + BATCH) * DIGEST_BYTES));
    const bytesPerBlock = ((await usedMemory(cluster)) - mem1) / N;
    check('blocks read back', Buffer.from(await redis.getBlocks('vm', 12345, 1000)).equals(Buffer.from(all.subarray(12345 * 20, 13345 * 20))));

    // The peer layout: one key per digest ("{}naive:" + its 20 bytes, value "dst"), for the memory
    // figure; SETs pipelined per master by the same slot function as the index's keys.
    const naiveN = 1 << 18;
    const mem2 = await usedMemory(cluster);
    const c = new Cluster([{ host: '127.0.0.1', port: cluster.nodes[0]!.port }], { lazyConnect: true });
    await c.connect();
    const byNode = new Map<string, Buffer[]>();
    for (let i = 0; i < naiveN; i++) {
      const key = Buffer.concat([Buffer.from('{}naive:'), all.subarray(i * 20, i * 20 + 20)]);
      const node = c.slots[keySlot(key)]![0]!;
      if (!byNode.has(node)) byNode.set(node, []);
      byNode.get(node)!.push(key);
    }
    for (const conn of c.nodes('master')) {
      const keys = byNode.get(`${conn.options.host}:${conn.options.port}`) ?? [];
      for (let lo = 0; lo < keys.length; lo += 8192) {
        const p = conn.pipeline();
        for (const k of keys.slice(lo, lo + 8192)) p.set(k, 'dst');
        for (const [e] of (await p.exec())!) if (e) throw e;
      }
    }
    const bytesPerEntryKeyPerDigest = ((await usedMemory(cluster)) - mem2) / naiveN;
    c.disconnect();

    // Lookups: a batch of 65,536 known digests; checked against the embedded index first.
    let k = 0;
    const nextBatch = () => {
      const lo = (k++ * BATCH) % N;
      return all.subarray(lo * DIGEST_BYTES, (lo + BATCH) * DIGEST_BYTES);
    };
    const probe = nextBatch();
    const [a, b] = [await redis.locate(probe), await embedded.locate(probe)];
    check('lookups agree', a.every((h, i) => h.length === 1 && h[0] === 'dst' && b[i]![0] === 'dst'));
    const s0 = await evalshaStats(cluster);
    for (let i = 0; i < 8; i++) await redis.locate(nextBatch());
    const s1 = await evalshaStats(cluster);
    const serverUsPerLookup = (s1.usec - s0.usec) / (8 * BATCH);
    console.log(`(Redis's own time in the lookup scripts: ${((s1.usec - s0.usec) / (s1.calls - s0.calls) / 1000).toFixed(1)} ms a call of ${(BATCH / ((s1.calls - s0.calls) / 8)).toFixed(0)} digests, ${serverUsPerLookup.toFixed(2)} µs a digest summed over the masters)`);
    const lookups = await runGroup({
      title: `Index lookups through Redis Cluster (3 masters + 3 replicas, loopback), ${BATCH}-digest batches, ${N} entries`,
      workPerOp: BATCH,
      unit: 'M/s',
      floor: GOAL / 1e6,
      time: 3000,
      iterations: 5,
      tasks: [
        { name: 'Redis Cluster locate (pipelined scripts)', fn: () => redis.locate(nextBatch()), ours: true },
        { name: 'embedded locate (one process)', fn: () => embedded.locate(nextBatch()) },
      ],
    });

    // Inserts: a fresh batch each time (record of digests nobody holds), WAIT 1 included.
    const fresh = new Uint8Array(BATCH * DIGEST_BYTES);
    let seed = 5000;
    const insert = (idx: LocationIndex) => idx.record('im1', fresh);
    const inserts = await runGroup({
      title: `Index inserts through Redis Cluster (record, replicated: WAIT 1), ${BATCH}-digest batches`,
      workPerOp: BATCH,
      unit: 'M/s',
      time: 3000,
      iterations: 5,
      tasks: [
        { name: 'Redis Cluster record (pipelined scripts + WAIT 1)', fn: () => insert(redis), beforeEach: () => randomFill(fresh, seed++), ours: true },
        { name: 'embedded record (one process)', fn: () => insert(embedded), beforeEach: () => randomFill(fresh, seed++) },
      ],
    });
    const lookupsPerSecond = lookups.rows[0]!.perSecond * 1e6;
    const insertsPerSecond = inserts.rows[0]!.perSecond * 1e6;
    console.log(`\n(fleet index in Redis: ${bytesPerEntry.toFixed(1)} bytes per (digest, holder) entry on the masters (the replicas hold as much again), one key per digest ${bytesPerEntryKeyPerDigest.toFixed(1)}; ${bytesPerBlock.toFixed(1)} bytes per (image, block) → digest; ${redis.stats.pipelines} pipelines, ${redis.stats.commands} commands in all)`);
    await redis.close();
    return {
      groups: [lookups, inserts],
      figures: { entries: N, batch: BATCH, bytesPerEntry, bytesPerEntryKeyPerDigest, bytesPerBlock, lookupsPerSecond, insertsPerSecond, serverUsPerLookup },
    };
  } finally {
    await cluster.stop();
  }
}

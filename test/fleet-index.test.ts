// The fleet's location index: ONE conformance suite run over the embedded
// index and over a real Redis Cluster (three masters, three replicas, started
// here by test/redis-cluster.ts and stopped afterwards), then what only the
// cluster can show: batching proven by the servers' own command counts, keys
// on every master and nearly every slot, two processes racing to claim, a
// master SIGKILLed while batches are written, bad URLs and an unreachable
// cluster.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { Redis } from 'ioredis';
import { DIGEST_BYTES, EmbeddedLocationIndex, type LocationIndex } from '../src/fleet/location-index.js';
import { openLocationIndex } from '../src/fleet/open.js';
import { keySlot, parseRedisUrl, RedisLocationIndex } from '../src/fleet/redis-index.js';
import { ErrorCode } from '../src/errors.js';
import { freePorts, startRedisCluster, type RedisCluster } from './redis-cluster.js';
import { seededBytes } from './util.js';

const run = promisify(execFile);
let cluster: RedisCluster;
let nsCounter = 0;

before(async () => {
  cluster = await startRedisCluster();
});
after(async () => {
  await cluster?.stop();
});

/** n digests from a seed (distinct with overwhelming probability). */
const digests = (seed: number, n: number) => seededBytes(seed, n * DIGEST_BYTES);
const digest = (d: Uint8Array, i: number) => d.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
const concat = (...parts: Uint8Array[]) => new Uint8Array(Buffer.concat(parts));

async function codeOf(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
  } catch (e) {
    return (e as { code?: string }).code;
  }
  return undefined;
}

const backends: Array<{ name: string; open(): Promise<LocationIndex> }> = [
  { name: 'embedded', open: async () => new EmbeddedLocationIndex() },
  // A namespace per test: the tests share one cluster without seeing each other's keys.
  { name: 'Redis Cluster', open: () => openLocationIndex(cluster.url, { namespace: `t${++nsCounter}` }) },
];

for (const backend of backends) {
  describe(`location index conformance: ${backend.name}`, () => {
    it('locate finds nobody for unknown digests, then every location recorded, once each', async () => {
      const idx = await backend.open();
      try {
        const d = digests(1, 50);
        assert.deepEqual(await idx.locate(d), Array.from({ length: 50 }, () => []));
        await idx.record('dst', d.subarray(0, 30 * DIGEST_BYTES));
        await idx.record('im1', d.subarray(20 * DIGEST_BYTES));
        await idx.record('im1', d.subarray(20 * DIGEST_BYTES)); // again: no duplicate holder
        const got = (await idx.locate(d)).map((h) => [...h].sort());
        for (let i = 0; i < 50; i++) {
          const want = [...(i < 30 ? ['dst'] : []), ...(i >= 20 ? ['im1'] : [])].sort();
          assert.deepEqual(got[i], want, `digest ${i}`);
        }
        assert.equal(await idx.size(), 30 + 30);
        assert.deepEqual(await idx.locate(new Uint8Array(0)), []);
      } finally {
        await idx.close();
      }
    });

    it('claim wins only digests nobody holds or claimed, the first of a repeated digest only', async () => {
      const idx = await backend.open();
      try {
        const d = digests(2, 40);
        await idx.record('im1', d.subarray(0, 10 * DIGEST_BYTES));
        const batch = concat(d, digest(d, 15), digest(d, 39));
        const won = await idx.claim('dst', batch);
        assert.deepEqual(won, [...Array.from({ length: 10 }, () => false), ...Array.from({ length: 30 }, () => true), false, false]);
        assert.deepEqual(await idx.claim('im2', d), Array.from({ length: 40 }, () => false));
        assert.deepEqual((await idx.locate(digest(d, 15)))[0], ['dst']);
        assert.deepEqual((await idx.locate(digest(d, 5)))[0], ['im1']);
        // Once its only holder forgets it, a digest can be claimed again.
        await idx.forget('dst', digest(d, 15));
        assert.deepEqual(await idx.claim('im2', concat(digest(d, 15), digest(d, 16))), [true, false]);
      } finally {
        await idx.close();
      }
    });

    it('forget with digests drops only those; without, everything the location holds and nothing of others', async () => {
      const idx = await backend.open();
      try {
        const d = digests(3, 3000);
        await idx.record('dst', d);
        await idx.record('im1', d.subarray(0, 1000 * DIGEST_BYTES));
        await idx.claim('im2', digests(4, 500));
        assert.equal(await idx.size(), 3000 + 1000 + 500);
        await idx.forget('dst', d.subarray(0, 100 * DIGEST_BYTES));
        assert.equal(await idx.size(), 2900 + 1000 + 500);
        let got = await idx.locate(d);
        assert.deepEqual(got[50], ['im1']);
        assert.deepEqual([...got[500]!].sort(), ['dst', 'im1']);
        await idx.forget('dst');
        assert.equal(await idx.size(), 1000 + 500);
        got = await idx.locate(d);
        for (let i = 0; i < 3000; i++) assert.deepEqual(got[i], i < 1000 ? ['im1'] : [], `digest ${i}`);
        assert.ok((await idx.locate(digests(4, 500))).every((h) => h.length === 1 && h[0] === 'im2'));
        await idx.forget('nobody');
        await idx.forget('dst');
        assert.equal(await idx.size(), 1500);
      } finally {
        await idx.close();
      }
    });

    it('getBlocks reads what setBlocks wrote across windows, 20 zero bytes where nothing was set', async () => {
      const idx = await backend.open();
      try {
        const d = digests(5, 600);
        await idx.setBlocks('vm-a', 250, d); // blocks 250..849: three 256-block windows
        await idx.setBlocks('vm-{a}', 250, digests(6, 600)); // another image, a name with braces
        await idx.setBlocks('vm-a', 300, digests(7, 2)); // overwrite two
        const got = Buffer.from(await idx.getBlocks('vm-a', 200, 700));
        const want = Buffer.concat([Buffer.alloc(50 * DIGEST_BYTES), Buffer.from(d)]);
        Buffer.from(digests(7, 2)).copy(want, 100 * DIGEST_BYTES);
        assert.ok(got.equals(Buffer.concat([want, Buffer.alloc(50 * DIGEST_BYTES)])));
        assert.ok(Buffer.from(await idx.getBlocks('vm-{a}', 250, 600)).equals(Buffer.from(digests(6, 600))));
        assert.ok(Buffer.from(await idx.getBlocks('vm-b', 0, 10)).equals(Buffer.alloc(200)));
        assert.equal((await idx.getBlocks('vm-a', 0, 0)).length, 0);
        const far = 2 ** 40; // cost follows the data: a block far out is one small window
        await idx.setBlocks('vm-a', far, digest(d, 9));
        assert.ok(Buffer.from(await idx.getBlocks('vm-a', far - 1, 2)).equals(Buffer.concat([Buffer.alloc(20), digest(d, 9)])));
      } finally {
        await idx.close();
      }
    });

    it('a packed digest buffer that is not a multiple of 20 bytes is ERR_BF_INVALID_ARGUMENT', async () => {
      const idx = await backend.open();
      try {
        for (const p of [idx.locate(new Uint8Array(21)), idx.claim('dst', new Uint8Array(19)), idx.record('dst', new Uint8Array(1)), idx.setBlocks('x', 0, new Uint8Array(39))]) {
          assert.equal(await codeOf(p), ErrorCode.INVALID_ARGUMENT);
        }
      } finally {
        await idx.close();
      }
    });

    it('a batch of 200,000 digests: claimed, located and recorded whole', async () => {
      const idx = await backend.open();
      try {
        const n = 200_000;
        const d = digests(8, n);
        const before = idx instanceof RedisLocationIndex ? { ...idx.stats } : undefined;
        const won = await idx.claim('dst', d);
        assert.equal(won.filter(Boolean).length, n);
        await idx.record('im1', d.subarray(0, (n / 2) * DIGEST_BYTES));
        const got = await idx.locate(d);
        for (let i = 0; i < n; i += 997) assert.deepEqual([...got[i]!].sort(), i < n / 2 ? ['dst', 'im1'] : ['dst'], `digest ${i}`);
        assert.ok(got.every((h, i) => h.length === (i < n / 2 ? 2 : 1)));
        if (idx instanceof RedisLocationIndex) {
          // Claim, record and locate: 4 rounds each of ≤ 65,536 digests, a pipeline per master per round
          // (+1 for a membership bitmap per write round): tens of pipelines, never one per block.
          const pipelines = idx.stats.pipelines - before!.pipelines;
          const commands = idx.stats.commands - before!.commands;
          assert.ok(pipelines <= 3 * (4 + 4 + 4) + 8 + 64, `${pipelines} pipelines`);
          assert.ok(commands <= (n * 2.5) / 1000, `${commands} commands for ${n * 2.5} digests`);
        }
        assert.equal(await idx.size(), n + n / 2);
      } finally {
        await idx.close();
      }
    });
  });
}

/** commandstats calls of a command, summed over every node (a replica promoted meanwhile counts too). */
async function calls(name: string): Promise<number> {
  let total = 0;
  for (const { port } of cluster.nodes) {
    const m = new RegExp(`cmdstat_${name}:calls=(\\d+)`).exec(await cluster.cli(port, 'info', 'commandstats'));
    total += m ? Number(m[1]) : 0;
  }
  return total;
}

describe('location index on Redis Cluster', () => {
  it('a batch costs the servers a command per ~4,000 digests, not one per digest (INFO commandstats)', async () => {
    const idx = (await openLocationIndex(cluster.url, { namespace: `t${++nsCounter}` })) as RedisLocationIndex;
    try {
      const n = 200_000;
      const d = digests(20, n);
      await idx.record('dst', digests(21, 10)); // scripts loaded
      const before = await calls('evalsha');
      await idx.record('dst', d);
      const located = await idx.locate(d);
      const used = (await calls('evalsha')) - before;
      assert.ok(located.every((h) => h.length === 1));
      assert.ok(used >= 2 * Math.ceil(n / 4096) && used <= 2 * (Math.ceil(n / 4096) + 4 * 3) + 4, `${used} EVALSHA for ${2 * n} digests`);
    } finally {
      await idx.close();
    }
  });

  it('keys are routed to the slot Redis computes for them, braces in image names included', async () => {
    const port = (await cluster.masters())[0]!;
    for (const key of ['{}bf:h:00000', '{}bf:h:3ffff', '{}t4:b:0:vm-{a}', '{}x{a}', '{}bf:b:7:disk {1}}', '{}bf:m:dst', '{}bf:b:0:\u00e9t\u00e9']) {
      assert.equal(keySlot(key), Number(await cluster.cli(port, 'cluster', 'keyslot', key)), key);
    }
  });

  it('the keys spread over every master and nearly every slot (no hash tag pins them)', async () => {
    const idx = await openLocationIndex(cluster.url, { namespace: `t${++nsCounter}` });
    const masters = await cluster.masters();
    const conns = masters.map((port) => new Redis({ host: '127.0.0.1', port, lazyConnect: true }));
    try {
      await idx.record('dst', digests(30, 100_000));
      await idx.setBlocks('vm', 0, digests(31, 50_000));
      let nonEmpty = 0;
      for (const c of conns) {
        assert.ok((await c.dbsize()) > 10_000, `master ${c.options.port} holds keys`);
        const p = c.pipeline();
        for (let s = 0; s < 16384; s++) p.cluster('COUNTKEYSINSLOT', s);
        for (const [, v] of (await p.exec())!) if ((v as number) > 0) nonEmpty++;
      }
      // 100,000 digests over 262,144 buckets reach every slot but by a vanishing chance.
      assert.ok(nonEmpty >= 16_300, `${nonEmpty} slots hold keys`);
    } finally {
      for (const c of conns) c.disconnect();
      await idx.close();
    }
  });

  it('forget(location) walks only the slots the location used: a few commands, not a scan of the cluster', async () => {
    const idx = (await openLocationIndex(cluster.url, { namespace: `t${++nsCounter}` })) as RedisLocationIndex;
    try {
      await idx.record('big', digests(50, 100_000));
      await idx.record('small', digests(51, 10));
      const before = { ...idx.stats };
      await idx.forget('small');
      // Its bitmap (one GET), then at most 10 slots: one call per master holding one of them.
      assert.ok(idx.stats.commands - before.commands <= 1 + 3, `${idx.stats.commands - before.commands} commands`);
      assert.ok((await idx.locate(digests(51, 10))).every((h) => h.length === 0));
      assert.equal(await idx.size(), 100_000);
    } finally {
      await idx.close();
    }
  });

  it('the embedded default never loads ioredis; a redis:// index does', async () => {
    const mod = new URL('../src/fleet/open.js', import.meta.url).href;
    const child = `
      import { createRequire } from 'node:module';
      const require = createRequire(import.meta.url);
      const loaded = () => Object.keys(require.cache).some((k) => k.includes('/node_modules/ioredis/'));
      const { openLocationIndex } = await import(${JSON.stringify(mod)});
      await openLocationIndex();
      const before = loaded();
      await openLocationIndex('redis://h:0').catch(() => {});
      process.stdout.write(JSON.stringify([before, loaded()]));
    `;
    const { stdout } = await run(process.execPath, ['--input-type=module', '-e', child]);
    assert.deepEqual(JSON.parse(stdout), [false, true]);
  });

  it('two processes claiming the same 30,000 digests at once: exactly one wins each, and holds it alone', async () => {
    const ns = `t${++nsCounter}`;
    const n = 30_000;
    const mod = (p: string) => new URL(p, import.meta.url).href;
    const child = `
      const { openLocationIndex } = await import(${JSON.stringify(mod('../src/fleet/open.js'))});
      const { seededBytes } = await import(${JSON.stringify(mod('./util.js'))});
      const [url, ns, loc, n, reverse] = process.argv.slice(1);
      const d = seededBytes(40, Number(n) * 20);
      const idx = await openLocationIndex(url, { namespace: ns });
      const order = Array.from({ length: Number(n) }, (_, i) => reverse === '1' ? Number(n) - 1 - i : i);
      const won = new Array(Number(n));
      // Ten batches each, so the two processes interleave on the masters.
      for (let b = 0; b < 10; b++) {
        const part = order.slice(b * n / 10, (b + 1) * n / 10);
        const buf = new Uint8Array(part.length * 20);
        part.forEach((i, j) => buf.set(d.subarray(i * 20, i * 20 + 20), j * 20));
        (await idx.claim(loc, buf)).forEach((w, j) => { won[part[j]] = w ? '1' : '0'; });
      }
      await idx.close();
      process.stdout.write(won.join(''));
    `;
    const go = (loc: string, reverse: string) => run(process.execPath, ['--input-type=module', '-e', child, cluster.url, ns, loc, String(n), reverse], { maxBuffer: 1 << 20 });
    const [a, b] = await Promise.all([go('im1', '0'), go('im2', '1')]);
    assert.equal(a.stdout.length, n);
    assert.equal(b.stdout.length, n);
    let winsA = 0;
    for (let i = 0; i < n; i++) {
      assert.notEqual(a.stdout[i], b.stdout[i], `digest ${i}: exactly one claimer wins`);
      if (a.stdout[i] === '1') winsA++;
    }
    assert.ok(winsA > 0 && winsA < n, `both processes won some digests (${winsA} / ${n - winsA})`);
    const idx = await openLocationIndex(cluster.url, { namespace: ns });
    try {
      const got = await idx.locate(digests(40, n));
      for (let i = 0; i < n; i++) assert.deepEqual(got[i], [a.stdout[i] === '1' ? 'im1' : 'im2']);
    } finally {
      await idx.close();
    }
  });

  it('bad URLs are ERR_BF_INVALID_ARGUMENT; an unreachable cluster is ERR_BF_INDEX by the deadline', async () => {
    for (const url of ['redis://', 'redis://localhost', 'redis://h:0', 'redis://h:70000', 'redis://h:1/db', 'redis://a:1,,b:2', 'rediss://h:1', 'redis:/h:1', 'redis://:%zz@h:1']) {
      assert.equal(await codeOf(RedisLocationIndex.open(url)), ErrorCode.INVALID_ARGUMENT, url);
    }
    assert.equal(await codeOf(openLocationIndex('memcached://h:1')), ErrorCode.INVALID_ARGUMENT);
    // A free port of ours on loopback: nothing listens there.
    const [free] = await freePorts(1);
    assert.equal(await codeOf(openLocationIndex(`redis://127.0.0.1:${free}`, { deadlineMs: 1500 })), ErrorCode.INDEX);
    // Credentials and seeds, %-escapes decoded; the password never shows in an error.
    assert.deepEqual(parseRedisUrl('redis://fleet:p%40ss@10.0.0.1:7000,[::1]:7001,redis-2.lan:7002/'), {
      username: 'fleet', password: 'p@ss',
      seeds: [{ host: '10.0.0.1', port: 7000 }, { host: '::1', port: 7001 }, { host: 'redis-2.lan', port: 7002 }],
    });
    assert.deepEqual(parseRedisUrl('redis://s3cret@h:1'), { password: 's3cret', seeds: [{ host: 'h', port: 1 }] });
    assert.deepEqual(parseRedisUrl('redis://:s3cret@h:1'), { password: 's3cret', seeds: [{ host: 'h', port: 1 }] });
    const err = await RedisLocationIndex.open('redis://u:hunter2@h:0').catch((e: Error) => e);
    assert.ok(err instanceof Error && !err.message.includes('hunter2'), String(err));
  });

  it('a namespace written by another layout is refused (ERR_BF_INDEX), not misread', async () => {
    const ns = `t${++nsCounter}`;
    const port = (await cluster.masters())[0]!;
    await cluster.cli(port, '-c', 'set', `{}${ns}:meta`, 'blockferry-index 0');
    assert.equal(await codeOf(openLocationIndex(cluster.url, { namespace: ns })), ErrorCode.INDEX);
  });

  // Last: it leaves the cluster with a master that has no replica.
  it('a master SIGKILLed while batches are written: the writer finishes and every acknowledged record is there', async () => {
    const idx = (await openLocationIndex(cluster.url, { namespace: `t${++nsCounter}` })) as RedisLocationIndex;
    try {
      const victim = (await cluster.masters())[1]!;
      const batches = 24;
      const per = 5000;
      const acked: number[] = [];
      for (let k = 0; k < batches; k++) {
        const d = digests(100 + k, per);
        const writing = Promise.all([idx.record('dst', d), idx.setBlocks('vm', k * per, d), idx.claim('im1', digests(200 + k, per))]);
        if (k === 4) cluster.kill(victim); // while batch 4 is in flight
        const [, , won] = await writing;
        assert.equal(won.filter(Boolean).length, per);
        acked.push(k);
      }
      assert.equal(acked.length, batches);
      await cluster.waitHealthy();
      assert.ok(!(await cluster.masters()).includes(victim), 'the killed master is no longer serving');
      for (const k of acked) {
        const d = digests(100 + k, per);
        const got = await idx.locate(d);
        assert.ok(got.every((h) => h.length === 1 && h[0] === 'dst'), `batch ${k} recorded`);
        assert.ok(Buffer.from(await idx.getBlocks('vm', k * per, per)).equals(Buffer.from(d)), `batch ${k} blocks`);
        assert.ok((await idx.locate(digests(200 + k, per))).every((h) => h.length === 1 && h[0] === 'im1'), `batch ${k} claims`);
      }
      assert.equal(await idx.size(), 2 * batches * per);
    } finally {
      await idx.close();
    }
  });

  // After the one above: the master that took over has no replica; killing it leaves its slots
  // uncovered for good, and a write gives up with ERR_BF_INDEX at its deadline instead of hanging.
  it('a cluster that never recovers: ERR_BF_INDEX once the deadline has passed, no hang', async () => {
    let alone: number | undefined;
    for (const port of await cluster.masters()) {
      if (/connected_slaves:0/.test(await cluster.cli(port, 'info', 'replication'))) alone = port;
    }
    assert.ok(alone !== undefined, 'a master without replica after the failover');
    cluster.kill(alone);
    const code = await codeOf((async () => {
      const idx = await openLocationIndex(cluster.url, { namespace: `t${++nsCounter}`, deadlineMs: 4000 });
      try {
        await idx.record('dst', digests(300, 5000)); // a third of these digests' slots have no master now
      } finally {
        await idx.close();
      }
    })());
    assert.equal(code, ErrorCode.INDEX);
  });
});

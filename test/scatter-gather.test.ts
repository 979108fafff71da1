// Scatter-gather (paper 003): the intermediaries' content store, and
// evictions of several ext4 images built from one base through two real
// intermediaries into a real destination, over TCP. Asserted: every image
// arrives byte for byte; each distinct content leaves the source once
// (counted from what the stores took); blocks shared by the images cross
// once; an intermediary killed before the gather costs its blocks a trip
// from the source, never a wrong byte; a store hands out nothing damaged.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { createHash } from 'node:crypto';
import { mkdtempSync, openSync, readFileSync, readdirSync, rmSync, statSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ContentStore } from '../src/roles/intermediary/store.js';
import { IntermediaryService } from '../src/roles/intermediary/service.js';
import { DestinationService } from '../src/roles/destination/service.js';
import { scatterGather } from '../src/migrate/scatter-gather.js';
import {
  BEGIN, BEGIN_OK, BEGIN_OVERWRITE, BLOCK_INFO, FILL_SCATTER, GATHER, GATHER_RESULT, HOLDER_STAGE, INFO_END, SG_PLACE, STASH, STASH_BAD, STASH_FULL, STASH_HELD, STASH_OK, STASH_STORED,
  decode, encode, type MessageDef, type SgPlace,
} from '../src/protocol/messages.js';
import { Msg, Writer } from '../src/protocol/frame.js';
import type { Channel } from '../src/protocol/channel.js';
import { Engine } from '../src/engine/engine.js';
import { ErrorCode } from '../src/errors.js';
import { rawClient } from './raw-client.js';
import { decompressorFor } from '../src/protocol/compression.js';
import { CAP_ZSTD } from '../src/protocol/handshake.js';
import { seededBytes } from './util.js';
import { startRedisCluster } from './redis-cluster.js';
import { distinct as distinctIn, images as imagesIn, services as servicesIn } from './sg-fixtures.js';

const haveRedis = (() => { try { execFileSync('redis-server', ['--version'], { stdio: 'ignore' }); return true; } catch { return false; } })();
const haveMkfs = (() => { try { execFileSync('mkfs.ext4', ['-V'], { stdio: 'ignore' }); return true; } catch { return false; } })();
let dir: string;
before(() => { dir = mkdtempSync(join(tmpdir(), 'bfD-sg-')); });
after(() => rmSync(dir, { recursive: true, force: true }));

const sha1 = (b: Uint8Array) => createHash('sha1').update(b).digest();
const images = (tag: string) => imagesIn(dir, tag);
const distinct = distinctIn;
const services = (tag: string, gatherBwlimit = 0) => servicesIn(dir, tag, gatherBwlimit);
const block = (seed: number, n = 4096) => Buffer.from(seededBytes(seed, n));

describe('content store', () => {
  it('keeps blocks by SHA-1 across a restart, refuses what does not fit, and rejects bytes that are not their SHA-1', () => {
    const d = join(dir, 'store1');
    const blocks = [block(1), block(2), block(3)];
    const digests = Buffer.concat(blocks.map(sha1));
    const s = ContentStore.open(d, { capacity: 2 * (4096 + 24), memoryBytes: 4096 });
    assert.deepEqual(s.put(digests, blocks), [STASH_STORED, STASH_STORED, STASH_FULL]);
    assert.deepEqual(s.put(digests.subarray(0, 20), [blocks[0]!]), [STASH_HELD]);
    assert.deepEqual(s.put(sha1(block(9)), [block(10)]), [STASH_BAD]);
    assert.equal(s.free, 0);
    assert.ok(s.get(digests.subarray(0, 20))!.equals(blocks[0]!)); // from disk: the memory tier holds only the last
    assert.ok(s.get(digests.subarray(20, 40))!.equals(blocks[1]!));
    assert.equal(s.get(digests.subarray(40, 60)), undefined);
    s.close();
    const r = ContentStore.open(d, { capacity: 2 * (4096 + 24) });
    assert.equal(r.blocks, 2);
    assert.ok(r.get(digests.subarray(0, 20))!.equals(blocks[0]!));
    assert.ok(r.get(digests.subarray(20, 40))!.equals(blocks[1]!));
    assert.equal(r.free, 0);
    r.close();
  });

  it('drops a block whose bytes on disk were damaged instead of serving them, and cuts off a torn last record', () => {
    const d = join(dir, 'store2');
    const blocks = [block(4), block(5)];
    const digests = Buffer.concat(blocks.map(sha1));
    const s = ContentStore.open(d, { capacity: 1 << 20, memoryBytes: 0 });
    s.put(digests, blocks);
    s.close();
    const seg = join(d, readdirSync(d).find((f) => f.endsWith('.seg'))!);
    const fd = openSync(seg, 'r+');
    writeSync(fd, Buffer.from([0xff ^ blocks[0]![100]!]), 0, 1, 24 + 100); // one byte of the first block
    writeSync(fd, Buffer.alloc(30, 7), 0, 30, statSync(seg).size); // half a record: a crash mid-append
    closeSync(fd);
    const r = ContentStore.open(d, { capacity: 1 << 20, memoryBytes: 0 });
    assert.equal(r.damage.truncated, 1);
    assert.equal(statSync(seg).size, 2 * (4096 + 24));
    assert.throws(() => r.read(digests.subarray(0, 20)), { code: 'ERR_BF_STORE_CORRUPT' });
    assert.equal(r.get(digests.subarray(0, 20)), undefined); // dropped: not held any more
    assert.equal(r.damage.corrupt, 1);
    assert.equal(r.has(digests.subarray(0, 20)), false);
    assert.ok(r.get(digests.subarray(20, 40))!.equals(blocks[1]!));
    r.close();
  });
});

describe('scatter-gather eviction', { skip: haveMkfs ? false : 'mkfs.ext4 is not installed (.ci/run installs e2fsprogs)' }, () => {
  it('evicts four images from one base: each arrives byte for byte, each distinct content leaves the source once', async () => {
    const imgs = images('a');
    const want = distinct(imgs);
    const s = await services('a', 20 << 20);
    try {
      const r = await scatterGather(imgs, { to: s.to, via: s.via, auth: s.auth });
      for (let i = 0; i < imgs.length; i++) {
        assert.ok(readFileSync(join(dir, 'a-dst', `a-${i}.img`)).equals(readFileSync(imgs[i]!)), `image ${i} differs`);
      }
      assert.equal(r.dedup.dataBlocks, want.dataBlocks);
      assert.equal(r.dedup.distinctBlocks, want.blocks);
      // Every distinct content went to exactly one store, once; none came from the source.
      assert.equal(r.dedup.stashedBlocks, want.blocks);
      assert.equal(s.ims[0]!.stats.stashed + s.ims[1]!.stats.stashed + s.dst.stageStats.stashed, want.blocks);
      for (const im of r.images) assert.equal(im.fromSource, 0, `${im.name} asked the source for blocks`);
      for (const im of r.images) assert.equal(im.gathered, im.dataBlocks);
      // Shared blocks crossed once: the source sent far less than the images' data.
      assert.ok(r.dedup.savedBytes >= (want.dataBlocks - want.blocks) * 4096);
      assert.ok(r.evictionSeconds <= r.seconds);
      // The stores were used: both intermediaries took a share.
      assert.ok(s.ims[0]!.stats.stashed > 0 && s.ims[1]!.stats.stashed > 0);
      // Gathered once per content at the destination (the stage keeps what other images share).
      const gatheredFromIms = s.ims[0]!.stats.gathered + s.ims[1]!.stats.gathered;
      assert.ok(gatheredFromIms <= s.ims[0]!.stats.stashed + s.ims[1]!.stats.stashed, `${gatheredFromIms} gathered for ${s.ims[0]!.stats.stashed + s.ims[1]!.stats.stashed} stashed`);
    } finally {
      for (const im of s.ims) await im.close();
      await s.dst.close();
    }
  });

  it('an intermediary gone before the gather: its blocks come from the source, every image still byte for byte', async () => {
    const imgs = images('b');
    const s = await services('b', 4 << 20);
    try {
      let killed = false;
      const r = await scatterGather(imgs, {
        to: s.to, via: s.via, auth: s.auth,
        onEvent: (e) => { if (e.phase === 'evicted' && !killed) { killed = true; void s.ims[0]!.close(); } },
      });
      assert.ok(killed);
      for (let i = 0; i < imgs.length; i++) {
        assert.ok(readFileSync(join(dir, 'b-dst', `b-${i}.img`)).equals(readFileSync(imgs[i]!)), `image ${i} differs`);
      }
      const fromSource = r.images.reduce((a, im) => a + im.fromSource, 0);
      assert.ok(fromSource > 0, 'nothing came from the source although an intermediary died');
    } finally {
      for (const im of s.ims) await im.close();
      await s.dst.close();
    }
  });
});

// --- Four hosts: source, two intermediaries, destination --------------------
// Linux network namespaces on one bridge (in a fifth namespace, the switch);
// the source's uplink shaped to 1 Gbit/s and the destination's downlink to
// 50 Mbit/s with tbf, so the scatter outruns the gather. Each host runs its
// own blockferry process. Without root the same runs on loopback, and says so.
const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const HOSTS = ['src', 'im1', 'im2', 'dst'] as const;
const ns = (h: string) => `bfD${h}`;
const SW = 'bfDsw';
const NET = '10.213.251';
const ipOf = (h: (typeof HOSTS)[number]) => `${NET}.${HOSTS.indexOf(h) + 1}`;

function sh(args: string[]): boolean {
  return spawnSync(args[0]!, args.slice(1), { stdio: 'ignore' }).status === 0;
}

function dropNet(): void {
  for (const h of HOSTS) sh(['ip', 'netns', 'del', ns(h)]);
  sh(['ip', 'netns', 'del', SW]);
}

function makeNet(): boolean {
  if (process.getuid?.() !== 0) return false;
  dropNet(); // left over from a killed run
  if (!sh(['ip', 'netns', 'add', SW])) return false;
  let ok = sh(['ip', '-n', SW, 'link', 'add', 'br0', 'type', 'bridge']) && sh(['ip', '-n', SW, 'link', 'set', 'br0', 'up']);
  for (const h of HOSTS) {
    ok = ok && sh(['ip', 'netns', 'add', ns(h)]) &&
      sh(['ip', 'link', 'add', `bfD${h}`, 'netns', ns(h), 'type', 'veth', 'peer', 'name', `bfD${h}p`, 'netns', SW]) &&
      sh(['ip', '-n', SW, 'link', 'set', `bfD${h}p`, 'master', 'br0']) &&
      sh(['ip', '-n', SW, 'link', 'set', `bfD${h}p`, 'up']) &&
      sh(['ip', '-n', ns(h), 'addr', 'add', `${ipOf(h)}/24`, 'dev', `bfD${h}`]) &&
      sh(['ip', '-n', ns(h), 'link', 'set', `bfD${h}`, 'up']) &&
      sh(['ip', '-n', ns(h), 'link', 'set', 'lo', 'up']);
  }
  ok = ok &&
    sh(['ip', 'netns', 'exec', ns('src'), 'tc', 'qdisc', 'add', 'dev', 'bfDsrc', 'root', 'tbf', 'rate', '1gbit', 'burst', '512kb', 'latency', '100ms']) &&
    sh(['ip', 'netns', 'exec', SW, 'tc', 'qdisc', 'add', 'dev', 'bfDdstp', 'root', 'tbf', 'rate', '50mbit', 'burst', '256kb', 'latency', '200ms']);
  if (!ok) dropNet();
  return ok;
}

/** Bytes the source's veth sent (everything that left the source host, headers included). */
function srcTx(): number {
  const r = spawnSync('ip', ['netns', 'exec', ns('src'), 'cat', '/sys/class/net/bfDsrc/statistics/tx_bytes'], { encoding: 'utf8' });
  return Number(r.stdout.trim());
}

interface Proc { proc: ChildProcess; port: number; stop(signal?: NodeJS.Signals): Promise<void> }

async function serveIn(host: (typeof HOSTS)[number], args: string[], netns: boolean): Promise<Proc> {
  const argv = [...(netns ? ['ip', 'netns', 'exec', ns(host)] : []), process.execPath, bin, 'serve', ...args, '--insecure'];
  const proc = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => { stderr += d; });
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: proc.stdout! }).once('line', resolve);
    proc.once('exit', (c) => reject(new Error(`serve exited with ${c}: ${stderr}`)));
  });
  const { port } = JSON.parse(line) as { port: number };
  return { proc, port, stop: (signal = 'SIGTERM') => new Promise<void>((r) => { if (proc.exitCode !== null || proc.signalCode) return r(); proc.once('exit', () => r()); proc.kill(signal); }) };
}

describe('scatter-gather between hosts', { skip: haveMkfs ? false : 'mkfs.ext4 is not installed (.ci/run installs e2fsprogs)' }, () => {
  let netns = false;
  before(() => {
    netns = makeNet();
    if (!netns) console.log('# scatter-gather: cannot create network namespaces here (not root, or no iproute2): running on loopback instead');
  });
  after(() => { if (netns) dropNet(); });

  async function evict(tag: string, killMidGather: boolean, index?: string) {
    const imgs = images(tag);
    const want = distinct(imgs);
    const host = (h: (typeof HOSTS)[number]) => (netns ? ipOf(h) : '127.0.0.1');
    const procs: Proc[] = [];
    try {
      const im1 = await serveIn('im1', ['--role', 'intermediary', '--listen', `${host('im1')}:0`, '--data-dir', join(dir, `${tag}-im1`), '--capacity', '64M'], netns);
      procs.push(im1);
      const im2 = await serveIn('im2', ['--role', 'intermediary', '--listen', `${host('im2')}:0`, '--data-dir', join(dir, `${tag}-im2`), '--capacity', '64M'], netns);
      procs.push(im2);
      // The destination gathers at 24 Mbit/s (its --bwlimit): slower than the scatter, whatever the link.
      const dst = await serveIn('dst', ['--listen', `${host('dst')}:0`, '--data-dir', join(dir, `${tag}-dst`), '--stage', '4M', '--bwlimit', '24mbit'], netns);
      procs.push(dst);
      const tx0 = netns ? srcTx() : 0;
      const argv = [...(netns ? ['ip', 'netns', 'exec', ns('src')] : []), process.execPath, bin, 'migrate', '--strategy', 'scatter-gather', ...imgs,
        '--to', `${host('dst')}:${dst.port}`, '--via', `${host('im1')}:${im1.port}`, '--via', `${host('im2')}:${im2.port}`, '--insecure', '--json', ...(index ? ['--index', index] : [])];
      const p = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '', err = '';
      let killedAt: string | undefined;
      p.stdout!.on('data', (d) => { out += d; });
      p.stderr!.on('data', (d) => {
        err += d;
        if (killMidGather && !killedAt && /blockferry: evicted/.test(err)) { killedAt = 'evicted'; void im1.stop('SIGKILL'); }
      });
      const code = await new Promise<number | null>((r) => p.once('exit', (c) => r(c)));
      assert.equal(code, 0, err);
      const r = JSON.parse(out) as import('../src/migrate/scatter-gather.js').ScatterGatherResult;
      for (let i = 0; i < imgs.length; i++) {
        assert.ok(readFileSync(join(dir, `${tag}-dst`, `${tag}-${i}.img`)).equals(readFileSync(imgs[i]!)), `image ${i} differs`);
      }
      return { r, want, tx: netns ? srcTx() - tx0 : undefined, killedAt };
    } finally {
      for (const x of procs) await x.stop();
    }
  }

  it('four images from one base, the index on a Redis Cluster in the source\'s host: byte-identical; each distinct block leaves the source once; eviction before the end', async () => {
    // The location index lives in a real Redis Cluster (three masters, three replicas) on the source host's loopback.
    const cluster = haveRedis ? await startRedisCluster({ prefix: 'bfD-sg-redis', ...(netns ? { exec: ['ip', 'netns', 'exec', ns('src')] } : {}) }) : undefined;
    if (!cluster) console.log('# scatter-gather: redis-server is not installed (.ci/run installs it): the embedded index is used');
    let ran: Awaited<ReturnType<typeof evict>>;
    try {
      ran = await evict('n', false, cluster?.url);
      if (cluster) {
        // The index holds what the eviction recorded: every image's (block → SHA-1) map is in the cluster.
        const keys = (await Promise.all((await cluster.masters()).map((p) => cluster.cli(p, 'dbsize')))).reduce((a, v) => a + Number(v.trim()), 0);
        assert.ok(keys > 0, 'the eviction wrote its index into the cluster');
      }
    } finally {
      await cluster?.stop();
    }
    const { r, want, tx } = ran;
    assert.equal(r.dedup.distinctBlocks, want.blocks);
    assert.equal(r.dedup.stashedBlocks, want.blocks);
    assert.equal(r.images.reduce((a, im) => a + im.fromSource, 0), 0);
    assert.ok(r.evictionSeconds < r.seconds, `evicted at ${r.evictionSeconds} s, done at ${r.seconds} s`);
    const stashed = Object.values(r.links).reduce((a, l) => a + l.stashedBytes, 0);
    assert.equal(stashed, want.bytes);
    if (tx !== undefined) {
      // What left the source's host: the distinct contents once, plus metadata (fingerprints, placements, checks) and headers;
      // far less than the images' data (the blocks they share did not cross again).
      console.log(`# source veth sent ${tx} bytes for ${want.bytes} distinct bytes (${want.dataBlocks * 4096} bytes of data in the images)`);
      assert.ok(tx >= want.bytes, `${tx} < ${want.bytes}`);
      assert.ok(tx < want.bytes * 1.12 + (2 << 20), `${tx} bytes left the source for ${want.bytes} distinct bytes`);
      assert.ok(tx < want.dataBlocks * 4096 * 0.8);
    }
  });

  it('an intermediary SIGKILLed mid-gather: its blocks come from the source; every image byte-identical', async () => {
    const { r, killedAt } = await evict('k', true);
    assert.equal(killedAt, 'evicted');
    assert.ok(r.images.reduce((a, im) => a + im.fromSource, 0) > 0, 'no block came from the source although an intermediary died mid-gather');
  });
});

// --- The new messages: strict decoding, refused where they do not belong ----
describe('scatter-gather messages', () => {
  const key = Buffer.from('blockferry-scatter-key-012345678');
  const BS = 4096;

  /** The next frame is an ERROR with this code (NEEDs that answer earlier frames may come first). */
  async function expectError(ch: Channel, code: string): Promise<void> {
    for (;;) {
      let f;
      try {
        f = await ch.next();
      } catch (e) {
        assert.equal((e as { remoteCode?: string }).remoteCode, code, `expected ERROR ${code}, got ${(e as Error).message}`);
        return;
      }
      assert.equal(f.type, Msg.NEED, `expected ERROR ${code}, got frame type ${f.type}`);
    }
  }

  const place = (start: number, count: number, over: Partial<SgPlace> = {}): SgPlace => ({
    start, count, peers: ['127.0.0.1:1'], digests: Buffer.alloc(20 * count, 1), holders: new Uint8Array(count), ...over,
  });
  const info = (start: number, count: number) => ({ start, count, ...new Engine().fingerprints(Buffer.from(seededBytes(start + 1, count * BS)), BS) });

  it('a destination refuses SG_PLACE out of place with ERROR ERR_BF_PROTOCOL and keeps serving', async () => {
    const dst = await DestinationService.start({ dataDir: join(dir, 'conf-dst'), auth: { key } });
    const cases: Array<[string, number, (ch: Channel) => Promise<void>]> = [
      ['SG_PLACE in a migration without fills bit 2', 0, async (ch) => { await ch.send(SG_PLACE, place(0, 2)); }],
      ['SG_PLACE after INFO_END', FILL_SCATTER, async (ch) => { await ch.send(INFO_END, undefined); await ch.send(SG_PLACE, place(0, 2)); }],
      ['SG_PLACE for another run than the next BLOCK_INFO', FILL_SCATTER, async (ch) => { await ch.send(SG_PLACE, place(0, 2)); await ch.send(BLOCK_INFO, info(0, 3)); }],
      ['two SG_PLACE without a BLOCK_INFO between', FILL_SCATTER, async (ch) => { await ch.send(SG_PLACE, place(0, 2)); await ch.send(SG_PLACE, place(4, 2)); }],
      ['SG_PLACE left without its BLOCK_INFO at INFO_END', FILL_SCATTER, async (ch) => { await ch.send(SG_PLACE, place(0, 2)); await ch.send(INFO_END, undefined); }],
      ['SG_PLACE past the image', FILL_SCATTER, async (ch) => { await ch.send(SG_PLACE, place(15, 2)); }],
      ['SG_PLACE naming a holder that is not a peer', FILL_SCATTER, async (ch) => { await ch.send(SG_PLACE, place(0, 2, { holders: new Uint8Array([0, 3]) })); }],
      ['SG_PLACE with a peer address that is not HOST:PORT', FILL_SCATTER, async (ch) => { await ch.send(SG_PLACE, place(0, 2, { peers: ['evil\nhost:1'] })); }],
      ['SG_PLACE with 17 peers', FILL_SCATTER, async (ch) => { await ch.send(SG_PLACE, place(0, 2, { peers: Array.from({ length: 17 }, (_, i) => `10.0.0.${i}:1`) })); }],
      ['STASH inside a migration', FILL_SCATTER, async (ch) => { await ch.send(STASH, { digests: sha1(block(1)), lengths: [BS], data: block(1) }, 7); }],
    ];
    try {
      for (const [rule, fills, act] of cases) {
        const ch = await rawClient(dst.address.port, { key });
        await ch.send(BEGIN, { name: 'conf', size: 16 * BS, blockSize: BS, flags: BEGIN_OVERWRITE, fills, strategy: 'conformance' });
        await ch.recv(BEGIN_OK);
        await act(ch);
        await expectError(ch, ErrorCode.PROTOCOL).catch((e: Error) => { throw new Error(`${rule}: ${e.message}`); });
        ch.socket.destroy();
      }
      // And still serves: its stage takes a block and gives it back (compressed where it pays: zstd was agreed).
      const ch = await rawClient(dst.address.port, { key });
      ch.setCodec(undefined, decompressorFor(CAP_ZSTD));
      const ok = await ch.request(STASH, { digests: sha1(block(2)), lengths: [BS], data: block(2) }, STASH_OK);
      assert.deepEqual(ok.status, [STASH_STORED]);
      const got = await ch.request(GATHER, sha1(block(2)), GATHER_RESULT);
      assert.ok(got.data.equals(block(2)));
      ch.close();
    } finally {
      await dst.close();
    }
  });

  it('an intermediary refuses malformed STASH and GATHER, and anything else, with ERROR ERR_BF_PROTOCOL', async () => {
    const im = await IntermediaryService.start({ dataDir: join(dir, 'conf-im'), capacity: 1 << 20, auth: { key } });
    const stashOf = (n: number, lens: number[], data: Buffer) => {
      const w = new Writer().u32(n);
      for (let i = 0; i < lens.length; i++) w.bytes(Buffer.alloc(20, i)).u32(lens[i]!);
      return w.bytes(data).done();
    };
    const cases: Array<[string, (ch: Channel) => Promise<void>]> = [
      ['BEGIN (not a destination)', async (ch) => { await ch.send(BEGIN, { name: 'x', size: BS, blockSize: BS, flags: 0, fills: 0, strategy: 'x' }); }],
      ['STASH without a request id', async (ch) => { await ch.send(STASH, { digests: sha1(block(1)), lengths: [BS], data: block(1) }); }],
      ['STASH whose lengths do not add up to its data', async (ch) => { await ch.sendFrame(Msg.STASH, stashOf(1, [BS], Buffer.alloc(BS - 1)), 3); }],
      ['STASH with an empty block', async (ch) => { await ch.sendFrame(Msg.STASH, stashOf(1, [0], Buffer.alloc(0)), 3); }],
      ['STASH of 257 blocks', async (ch) => { await ch.sendFrame(Msg.STASH, stashOf(257, Array(257).fill(1), Buffer.alloc(257)), 3); }],
      ['STASH of more than 1 MiB', async (ch) => { await ch.sendFrame(Msg.STASH, stashOf(2, [1 << 20, 1], Buffer.alloc((1 << 20) + 1)), 3); }],
      ['STASH whose count lies', async (ch) => { await ch.sendFrame(Msg.STASH, new Writer().u32(100000).done(), 3); }],
      ['GATHER of nothing', async (ch) => { await ch.sendFrame(Msg.GATHER, new Writer().u32(0).done(), 3); }],
      ['GATHER of 257 digests', async (ch) => { await ch.sendFrame(Msg.GATHER, new Writer().u32(257).bytes(Buffer.alloc(257 * 20)).done(), 3); }],
      ['GATHER with a trailing byte', async (ch) => { await ch.sendFrame(Msg.GATHER, new Writer().u32(1).bytes(Buffer.alloc(21)).done(), 3); }],
    ];
    try {
      for (const [rule, act] of cases) {
        const ch = await rawClient(im.address.port, { key });
        await act(ch);
        await expectError(ch, ErrorCode.PROTOCOL).catch((e: Error) => { throw new Error(`${rule}: ${e.message}`); });
        ch.socket.destroy();
      }
      const ch = await rawClient(im.address.port, { key });
      const bad = await ch.request(STASH, { digests: sha1(block(3)), lengths: [BS], data: block(4) }, STASH_OK);
      assert.deepEqual(bad.status, [STASH_BAD]); // bytes that are not their SHA-1 are not kept
      const miss = await ch.request(GATHER, sha1(block(4)), GATHER_RESULT);
      assert.deepEqual(miss.lengths, [0]);
      ch.close();
    } finally {
      await im.close();
    }
  });

  it('every new message decodes its own encoding, and any truncation or flipped byte either decodes or throws ERR_BF_PROTOCOL', () => {
    const samples: Array<[MessageDef<any>, unknown]> = [ // eslint-disable-line @typescript-eslint/no-explicit-any
      [STASH, { digests: Buffer.concat([sha1(block(1)), sha1(block(2))]), lengths: [BS, 100], data: Buffer.concat([block(1), block(2, 100)]) }],
      [STASH_OK, { status: [0, 1, 2, 3], free: 12345 }],
      [GATHER, Buffer.concat([sha1(block(1)), sha1(block(2))])],
      [GATHER_RESULT, { lengths: [BS, 0, 3], data: Buffer.concat([block(1), Buffer.from([1, 2, 3])]) }],
      [SG_PLACE, place(10, 3, { peers: ['10.0.0.1:7000', '[::1]:7001'], holders: new Uint8Array([1, HOLDER_STAGE, 0]) })],
    ];
    let x = 7;
    const rnd = () => { x = (x * 1103515245 + 12345) >>> 0; return x; };
    for (const [d, m] of samples) {
      const bytes = encode(d, m);
      assert.deepEqual(decode(d, bytes), m, d.name);
      for (let cut = 0; cut < bytes.length; cut += Math.max(1, bytes.length >> 6)) {
        assert.throws(() => decode(d, bytes.subarray(0, cut)), { code: ErrorCode.PROTOCOL }, `${d.name} cut at ${cut}`);
      }
      for (let k = 0; k < 2000; k++) {
        const b = Buffer.from(bytes);
        b[rnd() % b.length]! ^= 1 + (rnd() % 255);
        try { decode(d, b); } catch (e) { assert.equal((e as { code?: string }).code, ErrorCode.PROTOCOL, `${d.name}: ${(e as Error).message}`); }
      }
    }
  });
});

// Real hosts: the destination and the source run as separate blockferry
// processes in two Linux network namespaces joined by a veth pair, the link
// shaped to 100 Mbit/s with tbf (the paper's emulated WAN). A third process
// writes to the source image during the migration. Without root (no
// namespaces) the same scenario runs on loopback, and says so.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, statSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { seededBytes } from './util.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const BS = 4096;
const MiB = 1 << 20;
const tag = `${process.pid % 100000}`;
const SRC = `bfsrc${tag}`, DST = `bfdst${tag}`;
const VS = `bfs${tag}`, VD = `bfd${tag}`;
const subnet = `10.213.${process.pid % 250}`;

function sh(args: string[]): boolean {
  return spawnSync(args[0]!, args.slice(1), { stdio: 'ignore' }).status === 0;
}

/** Creates the two namespaces; false (and nothing left behind) when this machine will not. */
function makeHosts(): boolean {
  if (process.getuid?.() !== 0) return false;
  if (!sh(['ip', 'netns', 'add', SRC])) return false;
  const ok =
    sh(['ip', 'netns', 'add', DST]) &&
    sh(['ip', 'link', 'add', VS, 'netns', SRC, 'type', 'veth', 'peer', 'name', VD, 'netns', DST]) &&
    sh(['ip', '-n', SRC, 'addr', 'add', `${subnet}.1/24`, 'dev', VS]) &&
    sh(['ip', '-n', DST, 'addr', 'add', `${subnet}.2/24`, 'dev', VD]) &&
    sh(['ip', '-n', SRC, 'link', 'set', VS, 'up']) &&
    sh(['ip', '-n', DST, 'link', 'set', VD, 'up']) &&
    sh(['ip', '-n', SRC, 'link', 'set', 'lo', 'up']) &&
    sh(['ip', '-n', DST, 'link', 'set', 'lo', 'up']) &&
    // 100 Mbit/s from the source to the destination, as in the paper's WAN.
    sh(['ip', 'netns', 'exec', SRC, 'tc', 'qdisc', 'add', 'dev', VS, 'root', 'tbf', 'rate', '100mbit', 'burst', '256kb', 'latency', '200ms']);
  if (!ok) dropHosts();
  return ok;
}

function dropHosts(): void {
  sh(['ip', 'netns', 'del', SRC]);
  sh(['ip', 'netns', 'del', DST]);
}

const netns = makeHosts();
const dstAddr = netns ? `${subnet}.2` : '127.0.0.1';
const inHost = (ns: string, args: string[]) => (netns ? ['ip', 'netns', 'exec', ns, process.execPath, bin, ...args] : [process.execPath, bin, ...args]);

let dir: string;
let keyFile: string;
before(() => {
  if (!netns) console.log('# netns: cannot create network namespaces here (not root, or no iproute2): running on loopback instead');
  dir = mkdtempSync(join(tmpdir(), 'bf-netns-'));
  keyFile = join(dir, 'key');
  writeFileSync(keyFile, 'netns-test-key-0123456789abcdef\n');
});
after(() => {
  if (netns) dropHosts();
  rmSync(dir, { recursive: true, force: true });
});

interface Server { proc: ChildProcess; port: number; stop(): Promise<void> }

/** Starts `blockferry serve` in the destination host; resolves with its port. */
async function serve(dataDir: string, neighbours: string[], extra: string[] = []): Promise<Server> {
  return serveIn(DST, ['--listen', `${dstAddr}:0`, '--data-dir', dataDir, ...neighbours.flatMap((n) => ['--neighbour', n]), ...extra]);
}

/** Starts `blockferry serve ARGS` (with the key) in a host; resolves with its port. */
async function serveIn(ns: string, serveArgs: string[]): Promise<Server> {
  const args = inHost(ns, ['serve', ...serveArgs, '--key-file', keyFile]);
  const proc = spawn(args[0]!, args.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => { stderr += d; });
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: proc.stdout! }).once('line', resolve);
    proc.once('exit', (c) => reject(new Error(`serve exited with ${c}: ${stderr}`)));
  });
  const { port } = JSON.parse(line) as { port: number };
  return {
    proc,
    port,
    stop: () => new Promise<void>((r) => { if (proc.exitCode !== null || proc.signalCode) return r(); proc.once('exit', () => r()); proc.kill('SIGTERM'); }),
  };
}

function migrateArgs(image: string, port: number, extra: string[]): string[] {
  return inHost(SRC, ['migrate', image, '--to', `${dstAddr}:${port}`, '--key-file', keyFile, '--json', ...extra]);
}

async function run(args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  const p = spawn(args[0]!, args.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  p.stdout!.on('data', (d) => { out += d; });
  p.stderr!.on('data', (d) => { err += d; });
  const code = await new Promise<number | null>((r) => p.once('exit', (c) => r(c)));
  return { code, out, err };
}

/** A writer in its own process: rewrites random blocks of the image until stopped. */
function startWriter(image: string, blocks: number): ChildProcess {
  const script = `
    const fs = require('node:fs');
    const fd = fs.openSync(${JSON.stringify(image)}, 'r+');
    let x = 12345;
    const b = Buffer.alloc(${BS});
    setInterval(() => {
      for (let k = 0; k < 8; k++) {
        x = (x * 1103515245 + 12345) >>> 0;
        b.fill(x & 255); b.writeUInt32LE(x, 100);
        fs.writeSync(fd, b, 0, b.length, (x % ${blocks}) * ${BS});
      }
    }, 5);`;
  return spawn(process.execPath, ['-e', script], { stdio: 'ignore' });
}

function qemuCompare(a: string, b: string): boolean | undefined {
  const r = spawnSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', a, b]);
  if (r.error) return undefined; // qemu-img not installed (.ci/run installs qemu-utils)
  return r.status === 0;
}

describe(`migration between ${netns ? 'network namespaces over a 100 Mbit/s veth link' : 'processes on loopback'}`, () => {
  it('migrates a live image written by another process: similarity, rescan rounds, pause at cutover; byte-identical', async () => {
    const neighbour = join(dir, 'base.img');
    const image = join(dir, 'vm.img');
    const base = Buffer.from(seededBytes(1, 48 * MiB));
    writeFileSync(neighbour, base);
    const vm = Buffer.from(base);
    vm.set(seededBytes(2, 8 * MiB), 16 * MiB); // 2048 blocks the destination lacks
    vm.fill(0, 40 * MiB, 44 * MiB);
    writeFileSync(image, vm);
    const server = await serve(join(dir, 'dst1'), [neighbour]);
    const writer = startWriter(image, (48 * MiB) / BS);
    try {
      await new Promise((r) => setTimeout(r, 100));
      const r = await run(migrateArgs(image, server.port, ['--name', 'vm', '--rescan', '--dirty-threshold', '0', '--max-rounds', '3', '--pause-cmd', `kill -STOP ${writer.pid}`]));
      assert.equal(r.code, 0, r.err);
      const res = JSON.parse(r.out);
      const dst = join(dir, 'dst1', 'vm.img');
      assert.deepEqual(readFileSync(dst), readFileSync(image), 'destination equals the source as paused');
      assert.notEqual(qemuCompare(image, dst), false, 'qemu-img compare');
      // What crossed the network: the 2048 new blocks and what the writer dirtied, not the 10 000 the neighbour holds.
      assert.ok(res.blocks.filledFromNeighbours > 9000, `filled ${res.blocks.filledFromNeighbours}`);
      assert.ok(res.blocks.sent >= 2048 && res.blocks.sent < 2048 + 3000, `sent ${res.blocks.sent}`);
      assert.ok(res.wire.sent.data < (res.blocks.sent + 64) * (BS + 16), 'data bytes match the blocks sent');
      assert.ok(res.wire.sent.data < 0.3 * 48 * MiB, `data ${res.wire.sent.data}`);
      assert.ok(res.rounds >= 1 && res.downtimeSeconds > 0);
      assert.equal(res.verified, true);
    } finally {
      writer.kill('SIGKILL');
      await server.stop();
    }
  });

  it('resumes after the destination process is killed mid-transfer, without resending verified blocks', async () => {
    const image = join(dir, 'big.img');
    writeFileSync(image, seededBytes(9, 40 * MiB));
    const data = join(dir, 'dst2');
    const first = await serve(data, []);
    const args = migrateArgs(image, first.port, ['--name', 'big', '--strategy', 'full', ...(netns ? [] : ['--bwlimit', '12.5M'])]);
    const p = spawn(args[0]!, args.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    const exited = new Promise<number | null>((r) => p.once('exit', (c) => r(c)));
    // Kill the destination once its journal records received blocks (it is saved about once a
    // second; an attempt that holds nothing has a 48-byte journal), before the 40 MiB are through.
    const journal = join(data, 'big.img.journal');
    const holds = () => existsSync(journal) && statSync(journal).size > 48;
    for (let t = 0; t < 400 && !holds(); t++) await new Promise((r) => setTimeout(r, 25));
    assert.ok(holds(), 'the destination saved a journal during the transfer');
    first.proc.kill('SIGKILL');
    assert.notEqual(await exited, 0, 'the source reports the failure');
    const second = await serve(data, []);
    try {
      const r = await run(migrateArgs(image, second.port, ['--name', 'big', '--strategy', 'full']));
      assert.equal(r.code, 0, r.err);
      const res = JSON.parse(r.out);
      assert.ok(res.blocks.resumed > 0, `resumed ${res.blocks.resumed}`);
      // Nothing writes the image: the pass is exact (no block twice, nothing repaired).
      assert.equal(res.blocks.resent, 0, 'resent');
      assert.equal(res.blocks.repaired, 0, 'repaired');
      assert.equal(res.blocks.resumed + res.blocks.sent, (40 * MiB) / BS);
      assert.deepEqual(readFileSync(join(data, 'big.img')), readFileSync(image));
    } finally {
      await second.stop();
    }
  });

  it('post-copy: the source process is killed after the switch; reads of missing blocks fail with EIO, a write there is kept, and a second source completes the image', async () => {
    const image = join(dir, 'pc.img');
    writeFileSync(image, seededBytes(21, 24 * MiB));
    const data = join(dir, 'dst-pc');
    const sock = join(dir, 'pc.sock');
    const args = inHost(DST, ['serve', '--listen', `${dstAddr}:0`, '--data-dir', data, '--key-file', keyFile, '--nbd-socket', sock]);
    const proc = spawn(args[0]!, args.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    let onTaken: () => void = () => {};
    const taken = new Promise<void>((r) => { onTaken = r; });
    proc.stderr!.on('data', (d) => { stderr += d; if (stderr.includes('taken over')) onTaken(); });
    const { port } = JSON.parse(await new Promise<string>((resolve) => createInterface({ input: proc.stdout! }).once('line', resolve))) as { port: number };
    const uri = `nbd+unix:///pc?socket=${sock}`;
    try {
      const a = migrateArgs(image, port, ['--name', 'pc', '--strategy', 'postcopy', '--bwlimit', '2M']);
      const first = spawn(a[0]!, a.slice(1), { stdio: 'ignore' });
      const exited = new Promise((r) => first.once('exit', r));
      await taken;
      first.kill('SIGKILL');
      await exited;
      for (let t = 0; t < 200 && !stderr.includes('source went away'); t++) await new Promise((r) => setTimeout(r, 25));
      assert.match(stderr, /source went away during post-copy with \d+ blocks missing/);
      // The end of the image had not arrived: its read fails at once, not a hang.
      const bad = spawnSync('qemu-io', ['-f', 'raw', '-c', `read ${23 * MiB} 4096`, uri], { encoding: 'utf8', timeout: 20_000 });
      assert.equal(bad.signal, null, 'no hang');
      assert.match(bad.stdout + bad.stderr, /Input\/output error/);
      // A write of the VM at the destination while the source is away.
      const w = spawnSync('qemu-io', ['-f', 'raw', '-c', `write -P 0x77 ${20 * MiB} 8192`, uri], { encoding: 'utf8', timeout: 20_000 });
      assert.equal(w.status, 0, w.stderr);
      const second = await run(migrateArgs(image, port, ['--name', 'pc', '--strategy', 'postcopy']));
      assert.equal(second.code, 0, second.err);
      const want = readFileSync(image);
      want.fill(0x77, 20 * MiB, 20 * MiB + 8192);
      assert.ok(readFileSync(join(data, 'pc.img')).equals(want), 'complete: the source\'s bytes and the write made while it was away');
      const res = JSON.parse(second.out);
      assert.ok(res.blocks.sent < (24 * MiB) / BS, `the second source sent only what was missing (${res.blocks.sent} blocks)`);
    } finally {
      await new Promise<void>((r) => { if (proc.exitCode !== null) return r(); proc.once('exit', () => r()); proc.kill('SIGTERM'); });
    }
  });

  it('a base image from a repository across the link: only the blocks changed since the base cross from the source', async () => {
    // The repository runs in the source's host: its answers cross the shaped link, like the source's blocks.
    const srcAddr = netns ? `${subnet}.1` : '127.0.0.1';
    const base = join(dir, 'repo-base.img');
    const clone = join(dir, 'repo-clone.img');
    const b = Buffer.from(seededBytes(31, 32 * MiB));
    writeFileSync(base, b);
    b.set(seededBytes(32, 2 * MiB), 8 * MiB); // 512 blocks changed since the base
    writeFileSync(clone, b);
    const repo = await serveIn(SRC, ['--role', 'repository', '--listen', `${srcAddr}:0`, '--data-dir', join(dir, 'repo'), '--image', base]);
    const server = await serve(join(dir, 'dst-repo'), [], ['--repository', `${srcAddr}:${repo.port}`]);
    try {
      const r = await run(migrateArgs(clone, server.port, ['--name', 'clone']));
      assert.equal(r.code, 0, r.err);
      const res = JSON.parse(r.out);
      assert.ok(readFileSync(join(dir, 'dst-repo', 'clone.img')).equals(b), 'byte-identical');
      assert.equal(res.blocks.sent, 512);
      assert.equal(res.blocks.filledFromRepository, (32 * MiB) / BS - 512, 'every unchanged block came from the repository');
      assert.equal(res.blocks.filledFromNeighbours, 0);
      assert.ok(res.wire.sent.data <= 1.05 * 512 * BS, `data ${res.wire.sent.data}`);
    } finally {
      await server.stop();
      await repo.stop();
    }
  });

  it('refuses a source with the wrong key and keeps serving', async () => {
    const image = join(dir, 'small.img');
    writeFileSync(image, seededBytes(4, 2 * MiB));
    const server = await serve(join(dir, 'dst3'), []);
    try {
      const wrong = join(dir, 'wrong-key');
      writeFileSync(wrong, 'not-the-right-key-at-all-000000');
      const bad = await run(inHost(SRC, ['migrate', image, '--to', `${dstAddr}:${server.port}`, '--key-file', wrong]));
      assert.equal(bad.code, 1);
      assert.match(bad.err, /ERR_BF_AUTH_FAILED/);
      const good = await run(migrateArgs(image, server.port, []));
      assert.equal(good.code, 0, good.err);
      assert.deepEqual(readFileSync(join(dir, 'dst3', 'small.img')), readFileSync(image));
    } finally {
      await server.stop();
    }
  });
});

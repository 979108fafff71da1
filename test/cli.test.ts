// The blockferry command as a user runs it: a separate process, real files,
// exit codes and stable error codes on stderr.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:net';
import { existsSync, mkdirSync, mkdtempSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { seededBytes } from './util.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
/** The CLI's environment: its block map cache under this test's directory ($XDG_CACHE_HOME/blockferry), never the user's. */
const cliEnv = () => {
  const env: NodeJS.ProcessEnv = { ...process.env, XDG_CACHE_HOME: join(dir, 'xdg') };
  delete env.BLOCKFERRY_CACHE_DIR;
  return env;
};
const run = (...args: string[]) => {
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8', env: cliEnv() });
  return { code: r.status, out: r.stdout, err: r.stderr };
};

/** The CLI as a process, without blocking this one (a server in this process may have to answer). */
const runAsync = (...args: string[]) => new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
  const p = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv() });
  let out = '', err = '';
  p.stdout.on('data', (d) => { out += d; });
  p.stderr.on('data', (d) => { err += d; });
  p.on('close', (code) => resolve({ code, out, err }));
});

/** Runs f while something listens on port. */
async function withBusyPort<T>(port: number, f: () => Promise<T>): Promise<T> {
  const s = createServer().listen(port, '127.0.0.1');
  await new Promise((r) => s.once('listening', r));
  try { return await f(); } finally { s.close(); }
}

let dir: string, a: string, b: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), 'bf-cli-'));
  a = join(dir, 'a.img');
  b = join(dir, 'b.img');
  writeFileSync(a, Buffer.concat([seededBytes(1, 40 * 4096), Buffer.alloc(8 * 4096)]));
  writeFileSync(b, Buffer.concat([seededBytes(1, 20 * 4096), seededBytes(2, 20 * 4096), Buffer.alloc(8 * 4096)]));
});
after(() => rmSync(dir, { recursive: true, force: true }));

describe('blockferry CLI', () => {
  it('scan --json reports blocks and keeps the block map in the cache, not beside the image', () => {
    const r = run('scan', '--json', '--progress=none', a);
    assert.equal(r.code, 0, r.err);
    const [row] = JSON.parse(r.out);
    assert.deepEqual({ blocks: row.blocks, zero: row.zeroBlocks, distinct: row.distinctBlocks, map: row.map }, { blocks: 48, zero: 8, distinct: 40, map: 'scanned' });
    assert.ok(existsSync(row.mapFile) && row.mapFile.startsWith(join(dir, 'xdg', 'blockferry') + '/'));
    assert.ok(!existsSync(`${a}.4096.bfmap`));
    assert.equal(JSON.parse(run('scan', '--json', a).out)[0].map, 'loaded');
  });

  it('similarity prints the matrix as JSON, CSV and Markdown', () => {
    const j = run('similarity', '--json', a, b);
    assert.equal(j.code, 0, j.err);
    const m = JSON.parse(j.out);
    assert.deepEqual(m.similarity, [[100, 50], [50, 100]]);
    assert.deepEqual(m.bytesToSend, [[0, 20 * 4096], [20 * 4096, 0]]);
    const csv = run('similarity', '--csv', a, b).out.trim().split('\n');
    assert.equal(csv[0], 'block_size,base,target,similarity_percent,bytes_to_send');
    assert.equal(csv.length, 5);
    assert.match(run('similarity', '--markdown', a, b).out, /\| a\.img \| 100\.0 % \| 50\.0 % \| 50\.0 % \|/);
    const sweep = JSON.parse(run('similarity', '--json', '--block-size', '4k-16k', a, b).out);
    assert.deepEqual(sweep.map((x: { blockSize: number }) => x.blockSize), [4096, 8192, 16384]);
  });

  it('prints JSON progress lines on stderr with --progress=json', () => {
    const r = run('scan', '--rescan', '--progress=json', '--json', a);
    const lines = r.err.trim().split('\n').map((l) => JSON.parse(l));
    assert.ok(lines.length >= 2);
    assert.deepEqual(Object.keys(lines.at(-1)).sort(), ['done', 'elapsed', 'eta', 'event', 'mbps', 'operation', 'path', 'phase', 'rate', 'round', 'total']);
    assert.equal(lines.at(-1).operation, 'scan');
    assert.equal(lines.at(-1).done, lines.at(-1).total);
  });

  it('builds, extends and describes a block index', () => {
    const idx = join(dir, 'n.bfidx');
    assert.equal(run('index', 'build', '--out', idx, a).code, 0);
    assert.equal(run('index', 'add', idx, b).code, 0);
    const info = JSON.parse(run('index', 'info', '--json', idx).out);
    assert.equal(info.images.length, 2);
    assert.equal(info.entries, 60);
  });

  it('answers bad input with one line, a stable code and a non-zero exit, leaving nothing behind', () => {
    const cases: Array<[string[], number, RegExp]> = [
      [['scan', join(dir, 'missing.img')], 1, /ERR_BF_IMAGE_NOT_FOUND/],
      [['scan', dir], 1, /ERR_BF_NOT_AN_IMAGE/],
      [['scan', '--block-size', '1000', a], 1, /ERR_BF_BAD_BLOCK_SIZE/],
      [['scan', '--block-size', 'lots', a], 2, /ERR_BF_USAGE/],
      [['scan', '--workers', '0', a], 2, /ERR_BF_USAGE/],
      [['similarity', a], 2, /ERR_BF_USAGE/],
      [['scan', '--frobnicate', a], 2, /unknown option/],
      [['index', 'info', a], 1, /ERR_BF_BAD_MAGIC/],
      [['migrate', join(dir, 'missing.img'), '--to', '127.0.0.1:1', '--insecure'], 1, /ERR_BF_IMAGE_NOT_FOUND/],
      [['migrate', a, '--to', 'nohost', '--insecure'], 1, /ERR_BF_INVALID_ARGUMENT/],
      [['migrate', a, '--to', '127.0.0.1:1', '--insecure'], 1, /ERR_BF_CONNECTION/],
      [['migrate', a, '--to', '127.0.0.1:1'], 2, /ERR_BF_USAGE: a key of at least 16 bytes/],
      [['migrate', a, '--to', '127.0.0.1:1', '--insecure', '--bwlimit', 'lots'], 2, /ERR_BF_USAGE/],
      [['serve', '--listen', 'nowhere', '--data-dir', dir, '--insecure'], 2, /ERR_BF_USAGE/],
      [['serve', '--role', 'repository', '--listen', '127.0.0.1:0', '--data-dir', dir, '--insecure'], 2, /ERR_BF_USAGE: --role repository needs at least one --image/],
      [['serve', '--role', 'repository', '--listen', '127.0.0.1:0', '--data-dir', dir, '--insecure', '--image', a, '--neighbour', a], 2, /ERR_BF_USAGE/],
      [['serve', '--listen', '127.0.0.1:0', '--data-dir', dir, '--insecure', '--image', a], 2, /ERR_BF_USAGE: --image is an option of the repository role/],
      [['serve', '--listen', '127.0.0.1:0', '--data-dir', dir, '--insecure', '--repository', 'nowhere'], 2, /ERR_BF_USAGE: --repository nowhere/],
    ];
    for (const [args, code, re] of cases) {
      const r = run(...args);
      assert.equal(r.code, code, `${args.join(' ')}: ${r.err}`);
      assert.match(r.err, re, args.join(' '));
      assert.doesNotMatch(r.err, /at .*\.js:\d+/, 'no stack trace');
    }
    const out = join(dir, 'never.bfidx');
    assert.equal(run('index', 'build', '--out', out, a, join(dir, 'missing.img')).code, 1);
    assert.equal(existsSync(out), false, 'a failed build leaves no index file');
  });

  it('reads rates and sizes with their units: powers of 1000 for k/M/G and kB/MB, of 1024 for KiB/MiB and for --memory', async () => {
    const { parseRate, parseSize } = await import('../src/cli/main.js');
    assert.equal(parseRate('12.5M'), 12.5e6);
    assert.equal(parseRate('12.5MB'), 12.5e6);
    assert.equal(parseRate('12MiB'), 12 * 2 ** 20);
    assert.equal(parseRate('100mbit'), 12.5e6);
    assert.equal(parseRate('64k'), 64e3);
    assert.throws(() => parseRate('-1M'), { code: 'ERR_BF_USAGE' });
    assert.throws(() => parseRate('12 furlongs'), { code: 'ERR_BF_USAGE' });
    assert.equal(parseSize('--memory', '256M'), 256 * 2 ** 20);
    assert.equal(parseSize('--memory', '1GiB'), 2 ** 30);
    assert.throws(() => parseSize('--memory', 'lots'), { code: 'ERR_BF_USAGE' });
  });

  it('ends every failure a user can cause with one line, a stable code and its documented exit status (README, "Errors and exit statuses")', async () => {
    const file = join(dir, 'plain-file');
    writeFileSync(file, 'x');
    const idx = join(dir, 'short.bfidx');
    writeFileSync(idx, Buffer.from('BFIDX'));
    const busy = createServer().listen(0, '127.0.0.1');
    await new Promise((r) => busy.once('listening', r));
    const busyPort = (busy.address() as { port: number }).port;
    // A running destination (--max-image-size 64K) for the rows that need a peer.
    const dataDir = join(dir, 'serve-data');
    const server = spawn(process.execPath, [bin, 'serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir, '--insecure', '--max-image-size', '64K'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const port = await new Promise<number>((res) => server.stdout.once('data', (d: Buffer) => res(JSON.parse(d.toString()).port)));
    const to = `127.0.0.1:${port}`;
    const small = join(dir, 'small.img');
    writeFileSync(small, seededBytes(5, 8 * 4096));
    const cases: Array<[string, string[], number]> = [
      ['ERR_BF_USAGE', ['scan', '--frobnicate', a], 2],
      ['ERR_BF_USAGE', ['scan'], 2],
      ['ERR_BF_USAGE', ['scan', '--block-size', '-1', a], 2],
      ['ERR_BF_USAGE', ['bogus'], 2],
      ['ERR_BF_USAGE', ['serve', '--listen', '127.0.0.1:0', '--data-dir', dir, '--insecure', '--partial-ttl', 'soon'], 2],
      ['ERR_BF_INVALID_ARGUMENT', ['migrate', a, '--to', 'nohost', '--insecure'], 1],
      ['ERR_BF_BAD_BLOCK_SIZE', ['scan', '--block-size', '1000', a], 1],
      ['ERR_BF_IMAGE_NOT_FOUND', ['scan', join(dir, 'missing.img')], 1],
      ['ERR_BF_NOT_AN_IMAGE', ['scan', dir], 1],
      ['ERR_BF_BAD_MAGIC', ['index', 'info', a], 1],
      ['ERR_BF_TRUNCATED', ['index', 'info', idx], 1],
      ['ERR_BF_WRITE_FAILED', ['scan', '--rescan', '--map-dir', join(file, 'sub'), a], 1],
      ['ERR_BF_CONNECTION', ['migrate', a, '--to', `127.0.0.1:${busyPort + 0}`, '--insecure', '--name', 'x'], 1],
      ['ERR_BF_AUTH_FAILED', ['migrate', small, '--to', to, '--key-file', a], 1],
      ['ERR_BF_REFUSED (ERR_BF_NAME_INVALID)', ['migrate', small, '--to', to, '--insecure', '--name', '../up', '--progress=none'], 1],
      ['ERR_BF_REFUSED (ERR_BF_IMAGE_TOO_LARGE)', ['migrate', b, '--to', to, '--insecure', '--name', 'big', '--progress=none'], 1],
      ['ERR_BF_REFUSED (ERR_BF_IMAGE_EXISTS)', ['migrate', small, '--to', to, '--insecure', '--name', 'small', '--progress=none'], 1],
      ['ERR_BF_ADDRESS_IN_USE', ['serve', '--listen', `127.0.0.1:${busyPort}`, '--data-dir', join(dir, 'd1'), '--insecure'], 1],
      ['ERR_BF_ADDRESS_UNAVAILABLE', ['serve', '--listen', '192.0.2.1:7000', '--data-dir', join(dir, 'd2'), '--insecure'], 1],
      ['ERR_BF_DATA_DIR', ['serve', '--listen', '127.0.0.1:0', '--data-dir', file, '--insecure'], 1],
      ['ERR_BF_DATA_DIR', ['serve', '--listen', '127.0.0.1:0', '--data-dir', '/proc/blockferry-cannot-be-here', '--insecure'], 1],
      ['ERR_BF_DATA_DIR', ['partial', 'list', '--data-dir', join(dir, 'no-such-dir')], 1],
      ['ERR_BF_NAME_INVALID', ['partial', 'remove', '../x', '--data-dir', dir], 1],
    ];
    try {
      // The image 'small' exists at the destination before the IMAGE_EXISTS row.
      const ok = await runAsync('migrate', small, '--to', to, '--insecure', '--name', 'small', '--progress=none');
      assert.equal(ok.code, 0, ok.err);
      // The CONNECTION row needs a port with nobody listening.
      busy.close();
      await new Promise((r) => setTimeout(r, 50));
      for (const [code, args, status] of cases) {
        const r = code === 'ERR_BF_ADDRESS_IN_USE' ? await withBusyPort(busyPort, () => runAsync(...args)) : await runAsync(...args);
        // --insecure's warning line may come first; the failure itself is one line.
        const lines = r.err.trim().split('\n').filter((l) => !l.startsWith('blockferry: warning: --insecure'));
        assert.equal(r.code, status, `${args.join(' ')}: ${r.err}`);
        assert.equal(lines.length, 1, `one line: ${r.err}`);
        assert.ok(lines[0]!.startsWith(`blockferry: error ${code}: `), `${args.join(' ')}: ${r.err}`);
      }
      assert.equal((await runAsync('scan', '--rescan', '--no-save', '--map-dir', join(file, 'sub'), a)).code, 0, '--no-save writes nothing, so nothing fails');
    } finally {
      // Waited for: the service writes into a directory the suite removes at the end.
      const gone = server.exitCode !== null || server.signalCode !== null ? undefined : new Promise((r) => server.once('exit', r));
      server.kill('SIGTERM');
      await gone;
      busy.close();
    }
  });

  it('lists, removes and prunes partial images', () => {
    const d = join(dir, 'partials');
    mkdirSync(d);
    for (const n of ['p1', 'p2']) { writeFileSync(join(d, `${n}.img.partial`), Buffer.alloc(4096)); writeFileSync(join(d, `${n}.img.journal`), 'j'); }
    const old = new Date(Date.now() - 10 * 86400_000);
    utimesSync(join(d, 'p1.img.partial'), old, old);
    utimesSync(join(d, 'p1.img.journal'), old, old);
    assert.deepEqual(JSON.parse(run('partial', 'list', '--json', '--data-dir', d).out).map((p: { name: string }) => p.name), ['p1', 'p2']);
    const pruned = run('partial', 'prune', '--json', '--data-dir', d);
    assert.equal(pruned.code, 0, pruned.err);
    assert.deepEqual(JSON.parse(pruned.out).map((p: { name: string }) => p.name), ['p1']);
    assert.equal(run('partial', 'remove', 'p2', '--data-dir', d).code, 0);
    assert.deepEqual(JSON.parse(run('partial', 'list', '--json', '--data-dir', d).out), []);
    assert.equal(run('partial', 'remove', 'p2', '--data-dir', d).code, 1);
  });

  it('runs the demo', () => {
    const r = run('demo', '--progress=none');
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /Destination image byte-identical to the source: yes/);
    assert.match(r.out, /verified +│ yes/);
  });
});

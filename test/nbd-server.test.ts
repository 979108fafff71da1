// The NBD server as real NBD clients see it (qemu-img, qemu-io, nbdinfo,
// nbdcopy), plus a raw client for what those never send: concurrency with a
// read that waits, out-of-range and hostile requests. The server runs in
// this process, so every client is spawned asynchronously (a synchronous
// spawn would stop the server it talks to).
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { seededBytes } from './util.js';
import { RawNbd } from './nbd-raw.js';
import { NbdServer, type NbdAddress, type NbdServerOptions } from '../src/nbd/server.js';
import { FileExport } from '../src/nbd/file-export.js';
import { nativeStatus } from '../src/engine/backend.js';
import { ErrorCode } from '../src/errors.js';
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH,
  NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_ENOTSUP,
  NBD_EPERM, NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_READ_ONLY, NBD_IHAVEOPT, NBD_MAX_PAYLOAD, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_LIST,
  NBD_OPT_STARTTLS, NBD_REP_ACK, NBD_REP_ERR_POLICY, NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNSUP, NBD_REP_SERVER,
  NBD_STATE_HOLE, NBD_STATE_ZERO, NbdExportError, type NbdExport,
} from '../src/nbd/protocol.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const native = nativeStatus().loaded;
const MiB = 1 << 20;

/** A command, asynchronously: its exit code and output. */
function run(cmd: string, args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '', err = '';
    p.stdout.on('data', (d) => { out += d; });
    p.stderr.on('data', (d) => { err += d; });
    p.on('close', (code) => resolve({ code, out, err }));
  });
}

async function ok(cmd: string, ...args: string[]): Promise<string> {
  const r = await run(cmd, args);
  assert.equal(r.code, 0, `${cmd} ${args.join(' ')}: exit ${r.code}\n${r.out}${r.err}`);
  return r.out;
}

let dir: string;
const servers: NbdServer[] = [];
const exports: FileExport[] = [];
const raws: RawNbd[] = [];
let socketCount = 0;

before(() => { dir = mkdtempSync(join(tmpdir(), 'bf-nbd-')); });
after(async () => {
  for (const r of raws) r.close();
  await Promise.all(servers.map((s) => s.close()));
  await Promise.all(exports.map((e) => e.close()));
  rmSync(dir, { recursive: true, force: true });
});

function sock(): NbdAddress {
  return { path: join(dir, `s${socketCount++}.sock`) };
}

async function serve(o: Partial<NbdServerOptions> & Pick<NbdServerOptions, 'exports'>, listen: NbdAddress = sock()): Promise<NbdServer> {
  const s = await NbdServer.listen({ listen, ...o });
  servers.push(s);
  return s;
}

async function open(raw: RawNbd | Promise<RawNbd>): Promise<RawNbd> {
  const r = await raw;
  raws.push(r);
  return r;
}

/** An 8 MiB image: data in a few places, holes elsewhere (a sparse file, written at 64 KiB-aligned offsets). */
function makeImage(name: string, seed: number): { path: string; bytes: Buffer } {
  const path = join(dir, name);
  const bytes = Buffer.alloc(8 * MiB);
  const fd = openSync(path, 'w');
  try {
    for (const [off, len] of [[0, 64 << 10], [MiB, 256 << 10], [3 * MiB + (128 << 10), 64 << 10], [8 * MiB - (64 << 10), 64 << 10]] as const) {
      const d = seededBytes(seed + off, len);
      bytes.set(d, off);
      writeSync(fd, d, 0, len, off);
    }
  } finally {
    closeSync(fd);
  }
  return { path, bytes };
}

async function fileExport(path: string, o: { readOnly?: boolean; name?: string } = {}): Promise<FileExport> {
  const e = await FileExport.open(path, o);
  exports.push(e);
  return e;
}

/** base:allocation of a file as qemu-img sees it (its own SEEK_DATA): [offset, length, hole][] merged. */
async function fileMap(path: string): Promise<[number, number, boolean][]> {
  const m = JSON.parse(await ok('qemu-img', 'map', '--output=json', '-f', 'raw', path)) as { start: number; length: number; data: boolean }[];
  return merge(m.map((e) => [e.start, e.length, !e.data]));
}

async function exportMap(uri: string): Promise<[number, number, boolean][]> {
  const m = JSON.parse(await ok('nbdinfo', '--map', '--json', uri)) as { offset: number; length: number; type: number }[];
  return merge(m.map((e) => [e.offset, e.length, (e.type & NBD_STATE_HOLE) !== 0]));
}

/** NBD_OPT_GO's data for a name, no information requests. */
function goData(name: string): Buffer {
  const n = Buffer.from(name);
  const d = Buffer.alloc(4 + n.length + 2);
  d.writeUInt32BE(n.length, 0);
  n.copy(d, 4);
  return d;
}

function merge(m: [number, number, boolean][]): [number, number, boolean][] {
  const out: [number, number, boolean][] = [];
  for (const e of m) {
    const last = out[out.length - 1];
    if (last && last[2] === e[2] && last[0] + last[1] === e[0]) last[1] += e[1];
    else out.push([...e]);
  }
  return out;
}

describe('NBD server: a file export to real clients', () => {
  let img: { path: string; bytes: Buffer };
  let unix: NbdServer, tcp: NbdServer;
  let uUri: string, tUri: string;
  before(async () => {
    img = makeImage('a.img', 1);
    const e = await fileExport(img.path, { name: 'disk' });
    unix = await serve({ exports: new Map([['disk', e]]), defaultExport: 'disk' });
    tcp = await serve({ exports: new Map([['disk', e]]) }, { host: '127.0.0.1', port: 0 });
    uUri = unix.uri('disk');
    tUri = tcp.uri('disk');
  });

  it('prints its URIs', () => {
    assert.match(uUri, /^nbd\+unix:\/\/\/disk\?socket=\/.*\.sock$/);
    assert.match(tUri, /^nbd:\/\/127\.0\.0\.1:\d+\/disk$/);
  });

  it('nbdinfo sees the size, the flags and base:allocation', async () => {
    const info = JSON.parse(await ok('nbdinfo', '--json', uUri)) as { structured: boolean; exports: Record<string, unknown>[] };
    assert.equal(info.structured, true);
    const x = info.exports[0]!;
    assert.equal(x['export-size'], 8 * MiB);
    assert.equal(x['is_read_only'], false);
    assert.equal(x['can_flush'], true);
    assert.equal(x['can_fua'], true);
    assert.equal(x['can_trim'], true);
    assert.equal(x['can_zero'], true);
    assert.equal(x['can_fast_zero'], native);
    assert.equal(x['can_multi_conn'], true);
    assert.equal(x['can_df'], true);
    assert.equal(x['block_size_minimum'], 1);
    assert.equal(x['block_size_preferred'], 4096);
    assert.equal(x['block_size_maximum'], NBD_MAX_PAYLOAD);
    assert.deepEqual(x['contexts'], ['base:allocation']);
  });

  it('the empty name selects the default export, and the list names it', async () => {
    const size = await ok('nbdinfo', '--size', unix.uri(''));
    assert.equal(size.trim(), String(8 * MiB));
    const list = JSON.parse(await ok('nbdinfo', '--list', '--json', unix.uri(''))) as { exports: { 'export-name': string }[] };
    assert.deepEqual(list.exports.map((e) => e['export-name']), ['disk']);
  });

  it('qemu-img compare: the export holds the file, over the Unix socket and TCP, two clients at once', async () => {
    const [a, b] = await Promise.all([
      ok('qemu-img', 'compare', '-f', 'raw', '-F', 'raw', img.path, uUri),
      ok('qemu-img', 'compare', '-f', 'raw', '-F', 'raw', img.path, tUri),
    ]);
    assert.match(a, /identical/);
    assert.match(b, /identical/);
  });

  it('nbdinfo --map shows the file\'s holes exactly', { skip: !native && 'needs the native addon (SEEK_DATA)' }, async () => {
    const want = await fileMap(img.path);
    assert.ok(want.some((e) => e[2]) && want.some((e) => !e[2]), 'the file has holes and data');
    assert.deepEqual(await exportMap(uUri), want);
  });

  it('qemu-io reads patterns and writes land in the file', async () => {
    await ok('qemu-io', '-f', 'raw', '-r', '-c', 'read -P 0 64k 64k', '-c', `read -v 0 16`, uUri);
    await ok('qemu-io', '-f', 'raw', '-c', 'write -P 0x5a 2M 64k', '-c', `write -P 0xa5 -f ${2 * MiB + (64 << 10)} 4k`, '-c', 'read -P 0x5a 2M 64k', '-c', 'flush', tUri);
    const f = readFileSync(img.path);
    assert.ok(f.subarray(2 * MiB, 2 * MiB + (64 << 10)).every((b) => b === 0x5a));
    assert.ok(f.subarray(2 * MiB + (64 << 10), 2 * MiB + (68 << 10)).every((b) => b === 0xa5));
    img.bytes.fill(0x5a, 2 * MiB, 2 * MiB + (64 << 10));
    img.bytes.fill(0xa5, 2 * MiB + (64 << 10), 2 * MiB + (68 << 10));
    assert.ok(f.equals(img.bytes));
    // A read of what was written, through the other socket.
    await ok('qemu-io', '-f', 'raw', '-r', '-c', `read -P 0xa5 ${2 * MiB + (64 << 10)} 4k`, uUri);
  });

  it('write -z -u and discard punch holes; write -z without -u writes zeros', async () => {
    await ok('qemu-io', '-f', 'raw', '-c', 'write -z -u 1M 64k', '-c', `discard ${MiB + (128 << 10)} 64k`, '-c', `write -z ${MiB + (192 << 10)} 64k`, '-c', 'read -P 0 1M 64k', '-c', `read -P 0 ${MiB + (128 << 10)} 128k`, uUri);
    const f = readFileSync(img.path);
    img.bytes.fill(0, MiB, MiB + (64 << 10));
    img.bytes.fill(0, MiB + (128 << 10), MiB + (256 << 10));
    assert.ok(f.equals(img.bytes));
    if (native) {
      const map = await fileMap(img.path);
      const at = (off: number) => map.find((e) => e[0] <= off && off < e[0] + e[1])![2];
      assert.equal(at(MiB), true, 'write -z -u punched a hole');
      assert.equal(at(MiB + (128 << 10)), true, 'discard punched a hole');
      assert.equal(at(MiB + (64 << 10)), false, 'data between the holes stays');
      assert.equal(at(MiB + (192 << 10)), false, 'write -z without -u (NO_HOLE) keeps the blocks allocated');
      assert.deepEqual(await exportMap(uUri), map);
    }
  });

  it('nbdcopy copies the export to a file and a file into the export, byte for byte', async () => {
    const out = join(dir, 'copy.img');
    await ok('nbdcopy', uUri, out);
    assert.ok(readFileSync(out).equals(readFileSync(img.path)));
    const src = join(dir, 'src.img');
    writeFileSync(src, Buffer.concat([seededBytes(77, 3 * MiB), Buffer.alloc(2 * MiB), seededBytes(78, 3 * MiB)]));
    await ok('nbdcopy', src, tUri);
    assert.ok(readFileSync(img.path).equals(readFileSync(src)));
  });

  it('qemu-img convert reads the export', async () => {
    const out = join(dir, 'converted.img');
    await ok('qemu-img', 'convert', '-f', 'raw', '-O', 'raw', tUri, out);
    assert.ok(readFileSync(out).equals(readFileSync(img.path)));
  });
});

describe('NBD server: a read-only export', () => {
  it('is advertised read-only and refuses writes with EPERM', async () => {
    const img = makeImage('ro.img', 2);
    const e = await fileExport(img.path, { readOnly: true });
    const s = await serve({ exports: new Map([['ro', e]]) });
    const info = JSON.parse(await ok('nbdinfo', '--json', s.uri('ro'))) as { exports: Record<string, unknown>[] };
    assert.equal(info.exports[0]!['is_read_only'], true);
    assert.equal(info.exports[0]!['can_trim'], false);
    const c = await open(RawNbd.open(s.address, 'ro'));
    assert.ok(c.flags & NBD_FLAG_READ_ONLY);
    assert.ok(c.flags & NBD_FLAG_CAN_MULTI_CONN);
    c.send({ type: NBD_CMD_WRITE, cookie: 1n, offset: 0 }, new Uint8Array(512));
    assert.equal((await c.reply()).error, NBD_EPERM);
    c.send({ type: NBD_CMD_TRIM, cookie: 2n, offset: 0, length: 4096 });
    assert.equal((await c.reply()).error, NBD_EPERM);
    assert.ok(readFileSync(img.path).equals(img.bytes));
  });
});

describe('NBD server: a file export without the native addon', () => {
  it('reports everything as data, zeroes by writing zeros, and offers no fast zeroing', async () => {
    const img = makeImage('portable.img', 6);
    const e = await FileExport.open(img.path, { native: null });
    exports.push(e);
    const s = await serve({ exports: new Map([['p', e]]) });
    assert.deepEqual(await exportMap(s.uri('p')), [[0, 8 * MiB, false]]);
    const info = JSON.parse(await ok('nbdinfo', '--json', s.uri('p'))) as { exports: Record<string, unknown>[] };
    assert.equal(info.exports[0]!['can_fast_zero'], false);
    await ok('qemu-io', '-f', 'raw', '-c', 'write -z -u 0 64k', '-c', `discard ${MiB} 64k`, s.uri('p'));
    img.bytes.fill(0, 0, 64 << 10);
    img.bytes.fill(0, MiB, MiB + (64 << 10));
    assert.ok(readFileSync(img.path).equals(img.bytes));
    const c = await open(RawNbd.open(s.address, 'p'));
    c.send({ type: NBD_CMD_WRITE_ZEROES, cookie: 1n, offset: 0, length: 4096, flags: NBD_CMD_FLAG_FAST_ZERO });
    assert.equal((await c.reply()).error, NBD_ENOTSUP);
  });
});

/** An export in memory whose reads of chosen offsets wait until released: a block still arriving. */
function waitingExport(size: number): NbdExport & { gates: Map<number, { release: () => void; started: Promise<void> }>; gate(offset: number): void; reads: number; maxConcurrent: number } {
  const data = seededBytes(9, size);
  const gates = new Map<number, { release: () => void; started: Promise<void>; wait: Promise<void>; start: () => void }>();
  let running = 0;
  const x = {
    name: 'slow', size, readOnly: false, gates, reads: 0, maxConcurrent: 0,
    gate(offset: number) {
      let release!: () => void, start!: () => void;
      const wait = new Promise<void>((r) => { release = r; });
      const started = new Promise<void>((r) => { start = r; });
      gates.set(offset, { release, started, wait, start });
    },
    async read(offset: number, length: number) {
      x.reads++;
      running++;
      x.maxConcurrent = Math.max(x.maxConcurrent, running);
      const g = gates.get(offset);
      if (g) { g.start(); await g.wait; }
      running--;
      return data.subarray(offset, offset + length);
    },
    async write(offset: number, d: Uint8Array) { data.set(d, offset); },
    async allocation(_offset: number, length: number) { return [{ length, flags: 0 }]; },
  };
  return x;
}

describe('NBD server: a read that waits stalls nothing else', { timeout: 60_000 }, () => {
  it('answers later requests on the same connection and other clients first', async () => {
    const e = waitingExport(MiB);
    e.gate(0);
    const s = await serve({ exports: new Map([['slow', e]]) });
    const c = await open(RawNbd.open(s.address, 'slow', { structured: true }));
    c.send({ type: NBD_CMD_READ, cookie: 1n, offset: 0, length: 4096 });
    await e.gates.get(0)!.started;
    // Same connection: a read, a write, a block status, all answered while read 1 waits.
    c.send({ type: NBD_CMD_READ, cookie: 2n, offset: 8192, length: 4096 });
    c.send({ type: NBD_CMD_WRITE, cookie: 3n, offset: 65536 }, new Uint8Array(4096).fill(7));
    c.send({ type: NBD_CMD_BLOCK_STATUS, cookie: 4n, offset: 0, length: MiB });
    const replies = [await c.reply(), await c.reply(), await c.reply()];
    assert.deepEqual(replies.map((r) => r.cookie).sort(), [2n, 3n, 4n]);
    assert.ok(replies.every((r) => r.error === 0));
    assert.ok(replies.find((r) => r.cookie === 2n)!.data!.equals(seededBytes(9, 12288).subarray(8192)));
    // Other clients: a raw one and nbdinfo (which negotiates and asks block status).
    const d = await open(RawNbd.open(s.address, 'slow'));
    d.send({ type: NBD_CMD_READ, cookie: 9n, offset: 65536, length: 4096 });
    const r = await d.reply();
    assert.equal(r.error, 0);
    assert.ok(r.data!.every((b) => b === 7));
    await ok('nbdinfo', '--map', s.uri('slow'));
    // Now the block arrives and read 1 is answered.
    e.gates.get(0)!.release();
    const r1 = await c.reply();
    assert.equal(r1.cookie, 1n);
    assert.ok(r1.data!.equals(seededBytes(9, 4096)));
  });

  it('stops reading a connection at its in-flight cap, and goes on once a request finishes', async () => {
    const e = waitingExport(MiB);
    for (const off of [0, 4096, 8192]) e.gate(off);
    const s = await serve({ exports: new Map([['slow', e]]), maxInFlight: 2 });
    const c = await open(RawNbd.open(s.address, 'slow'));
    for (const [i, off] of [0, 4096, 8192].entries()) c.send({ type: NBD_CMD_READ, cookie: BigInt(i + 1), offset: off, length: 512 });
    await e.gates.get(0)!.started;
    await e.gates.get(4096)!.started;
    // A round trip through the server on another connection: had the third request been read, it would have started by now.
    const d = await open(RawNbd.open(s.address, 'slow'));
    d.send({ type: NBD_CMD_FLUSH, cookie: 1n });
    assert.equal((await d.reply()).error, NBD_EINVAL, 'FLUSH is refused: this export has no flush');
    assert.equal(e.reads, 2, 'two reads running, the third still unread in the socket');
    e.gates.get(0)!.release();
    assert.equal((await c.reply()).cookie, 1n);
    await e.gates.get(8192)!.started;
    e.gates.get(4096)!.release();
    e.gates.get(8192)!.release();
    assert.deepEqual([(await c.reply()).cookie, (await c.reply()).cookie].sort(), [2n, 3n]);
    assert.equal(e.maxConcurrent, 2);
  });

  it('close() waits for the read in flight, answers it, then ends the connection and removes the socket', async () => {
    const e = waitingExport(MiB);
    e.gate(0);
    const s = await NbdServer.listen({ listen: sock(), exports: new Map([['slow', e]]) });
    const path = (s.address as { path: string }).path;
    const c = await open(RawNbd.open(s.address, 'slow'));
    c.send({ type: NBD_CMD_READ, cookie: 1n, offset: 0, length: 512 });
    await e.gates.get(0)!.started;
    let closed = false;
    const closing = s.close().then(() => { closed = true; });
    const reply = c.reply();
    // The reply cannot come before the read finishes; close() cannot finish before the reply.
    e.gates.get(0)!.release();
    assert.equal((await reply).cookie, 1n);
    await closing;
    assert.equal(closed, true);
    await c.closed;
    assert.equal(existsSync(path), false);
  });
});

describe('NBD server: errors and hostile clients', () => {
  let img: { path: string; bytes: Buffer };
  let s: NbdServer;
  const failures: unknown[] = [];
  before(async () => {
    img = makeImage('h.img', 3);
    const e = await fileExport(img.path);
    const failing: NbdExport = {
      name: 'failing', size: MiB, readOnly: false,
      async read(offset) { if (offset === 0) throw new Error('disk on fire'); throw new NbdExportError(NBD_ENOSPC, 'odd but chosen'); },
      async write() { throw Object.assign(new Error('quota'), { code: 'EDQUOT' }); },
      async allocation() { throw new Error('no map'); },
    };
    s = await serve({
      exports: (name) => (name === 'h' ? e : name === 'failing' ? failing : undefined),
      list: () => ['h', 'failing'],
      negotiationTimeout: 1000,
      onError: (err) => failures.push(err),
    });
  });

  /** A well-behaved client still gets the right bytes. */
  async function stillServes(): Promise<void> {
    assert.match(await ok('qemu-img', 'compare', '-f', 'raw', '-F', 'raw', img.path, s.uri('h')), /identical/);
  }

  it('out-of-range requests: EINVAL for reads and block status, ENOSPC for writes; simple and structured', async () => {
    for (const structured of [false, true]) {
      const c = await open(RawNbd.open(s.address, 'h', { structured }));
      c.send({ type: NBD_CMD_READ, cookie: 1n, offset: 8 * MiB - 512, length: 1024 });
      c.send({ type: NBD_CMD_READ, cookie: 2n, offset: 2 ** 52, length: 1 });
      c.send({ type: NBD_CMD_WRITE, cookie: 3n, offset: 8 * MiB }, new Uint8Array(512));
      c.send({ type: NBD_CMD_WRITE_ZEROES, cookie: 4n, offset: 8 * MiB - 512, length: 4096 });
      c.send({ type: NBD_CMD_TRIM, cookie: 5n, offset: 9 * MiB, length: 4096 });
      c.send({ type: NBD_CMD_READ, cookie: 6n, offset: 0, length: NBD_MAX_PAYLOAD + 1 });
      c.send({ type: 99, cookie: 7n });
      c.send({ type: NBD_CMD_READ, cookie: 8n, offset: 0, length: 512, flags: NBD_CMD_FLAG_REQ_ONE });
      if (structured) c.send({ type: NBD_CMD_BLOCK_STATUS, cookie: 9n, offset: 8 * MiB - 512, length: 4096 });
      else c.send({ type: NBD_CMD_BLOCK_STATUS, cookie: 9n, offset: 0, length: 4096 }); // no context selected
      const want = new Map([[1n, NBD_EINVAL], [2n, NBD_EINVAL], [3n, NBD_ENOSPC], [4n, NBD_ENOSPC], [5n, NBD_EINVAL], [6n, NBD_EINVAL], [7n, NBD_EINVAL], [8n, NBD_EINVAL], [9n, NBD_EINVAL]]);
      const got = new Map<bigint, number>();
      for (let i = 0; i < want.size; i++) {
        const r = await c.reply();
        got.set(r.cookie, r.error);
      }
      assert.deepEqual(got, want, structured ? 'structured' : 'simple');
      // The connection is still good.
      c.send({ type: NBD_CMD_READ, cookie: 10n, offset: MiB, length: 4096 });
      assert.ok((await c.reply()).data!.equals(img.bytes.subarray(MiB, MiB + 4096)));
    }
    assert.ok(readFileSync(img.path).equals(img.bytes));
  });

  it('block status: extents within the request, one with REQ_ONE; CACHE succeeds; DISC ends the connection', { skip: !native && 'needs the native addon (SEEK_DATA)' }, async () => {
    const c = await open(RawNbd.open(s.address, 'h', { structured: true }));
    c.send({ type: NBD_CMD_BLOCK_STATUS, cookie: 1n, offset: 32 << 10, length: MiB });
    const all = (await c.reply()).extents!;
    assert.deepEqual(all, [{ length: 32 << 10, flags: 0 }, { length: 960 << 10, flags: NBD_STATE_HOLE | NBD_STATE_ZERO }, { length: 32 << 10, flags: 0 }]);
    c.send({ type: NBD_CMD_BLOCK_STATUS, cookie: 2n, offset: MiB - 4096, length: 16384, flags: NBD_CMD_FLAG_REQ_ONE });
    assert.deepEqual((await c.reply()).extents, [{ length: 4096, flags: NBD_STATE_HOLE | NBD_STATE_ZERO }]);
    c.send({ type: NBD_CMD_CACHE, cookie: 3n, offset: 0, length: 4096 });
    assert.equal((await c.reply()).error, 0);
    c.send({ type: NBD_CMD_DISC, cookie: 4n });
    await c.closed;
  });

  it('export failures: NbdExportError gives its errno, a full disk ENOSPC, anything else EIO (reported to onError)', async () => {
    const c = await open(RawNbd.open(s.address, 'failing', { structured: true }));
    c.send({ type: NBD_CMD_READ, cookie: 1n, offset: 0, length: 512 });
    assert.equal((await c.reply()).error, NBD_EIO);
    c.send({ type: NBD_CMD_READ, cookie: 2n, offset: 4096, length: 512 });
    assert.equal((await c.reply()).error, NBD_ENOSPC);
    c.send({ type: NBD_CMD_WRITE, cookie: 3n, offset: 0 }, new Uint8Array(512));
    assert.equal((await c.reply()).error, NBD_ENOSPC);
    c.send({ type: NBD_CMD_BLOCK_STATUS, cookie: 4n, offset: 0, length: 4096 });
    assert.equal((await c.reply()).error, NBD_EIO);
    // This export has no zero(): not advertised, refused; FAST_ZERO without fastZero: ENOTSUP.
    c.send({ type: NBD_CMD_WRITE_ZEROES, cookie: 5n, offset: 0, length: 4096 });
    assert.equal((await c.reply()).error, NBD_EINVAL);
    assert.deepEqual(failures.map((f) => (f as Error).message), ['disk on fire', 'no map']);
  });

  it('FAST_ZERO where zeroing would write: ENOTSUP, and the range is untouched', { skip: !native && 'needs the native addon (fast zeroing)' }, async () => {
    const c = await open(RawNbd.open(s.address, 'h'));
    c.send({ type: NBD_CMD_WRITE_ZEROES, cookie: 1n, offset: 0, length: 4096, flags: NBD_CMD_FLAG_FAST_ZERO | 2 /* NO_HOLE */ });
    assert.equal((await c.reply()).error, NBD_ENOTSUP);
    assert.ok(readFileSync(img.path).equals(img.bytes));
  });

  it('garbage instead of the option magic, or of the request magic: the connection is closed', async () => {
    const a = await open(RawNbd.connect(s.address));
    await a.hello();
    a.socket.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    await a.closed;
    const b = await open(RawNbd.open(s.address, 'h'));
    b.socket.write(Buffer.alloc(28, 0xff));
    await b.closed;
    const c = await open(RawNbd.connect(s.address));
    await c.read(18);
    c.socket.write(Buffer.from([0, 0, 0, 0])); // not fixed newstyle
    await c.closed;
    await stillServes();
  });

  it('a client that ends its side after its requests still gets the replies', async () => {
    const c = await open(RawNbd.open(s.address, 'h'));
    c.send({ type: NBD_CMD_READ, cookie: 1n, offset: MiB, length: 64 << 10 });
    c.send({ type: NBD_CMD_READ, cookie: 2n, offset: 0, length: 4096 });
    c.socket.end();
    const got = [await c.reply(), await c.reply()].sort((a, b) => Number(a.cookie - b.cookie));
    assert.ok(got[0]!.data!.equals(img.bytes.subarray(MiB, MiB + (64 << 10))));
    assert.ok(got[1]!.data!.equals(img.bytes.subarray(0, 4096)));
    await c.closed;
  });

  it('a truncated option, then the client goes away: the server goes on', async () => {
    const a = await open(RawNbd.connect(s.address));
    await a.hello();
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(NBD_IHAVEOPT, 0);
    h.writeUInt32BE(7, 8);
    h.writeUInt32BE(100, 12);
    a.socket.write(Buffer.concat([h, Buffer.alloc(10)]));
    a.socket.end();
    await a.closed;
    await stillServes();
  });

  it('an oversized option is answered TOO_BIG and the connection closed; STARTTLS is refused; unknown options unsupported', async () => {
    const a = await open(RawNbd.connect(s.address));
    await a.hello();
    a.option(NBD_OPT_STARTTLS);
    assert.equal((await a.optionReply()).type >>> 0, NBD_REP_ERR_POLICY >>> 0);
    a.option(4242, Buffer.from('x'));
    assert.equal((await a.optionReply()).type >>> 0, NBD_REP_ERR_UNSUP >>> 0);
    a.option(NBD_OPT_LIST);
    const names: string[] = [];
    for (let r = await a.optionReply(); r.type !== NBD_REP_ACK; r = await a.optionReply()) {
      assert.equal(r.type, NBD_REP_SERVER);
      names.push(r.data.toString('utf8', 4, 4 + r.data.readUInt32BE(0)));
    }
    assert.deepEqual(names, ['h', 'failing']);
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(NBD_IHAVEOPT, 0);
    h.writeUInt32BE(NBD_OPT_LIST, 8);
    h.writeUInt32BE(0xffffffff, 12);
    a.socket.write(h);
    assert.equal((await a.optionReply()).type >>> 0, NBD_REP_ERR_TOO_BIG >>> 0);
    await a.closed;
    await stillServes();
  });

  it('a WRITE longer than NBD_MAX_PAYLOAD closes the connection (its data cannot be skipped)', async () => {
    const c = await open(RawNbd.open(s.address, 'h'));
    const r = Buffer.alloc(28);
    r.writeUInt32BE(0x25609513, 0);
    r.writeUInt16BE(NBD_CMD_WRITE, 6);
    r.writeUInt32BE(NBD_MAX_PAYLOAD + 1, 24);
    c.socket.write(Buffer.concat([r, Buffer.alloc(4096, 1)]));
    await c.closed;
    await stillServes();
    assert.ok(readFileSync(img.path).equals(img.bytes));
  });

  it('too many options, or a negotiation that never ends, close the connection', async () => {
    const a = await open(RawNbd.connect(s.address));
    await a.hello();
    let replies = 0;
    const count = (async () => { try { for (;;) { await a.optionReply(); replies++; } } catch { /* closed */ } })();
    for (let i = 0; i < 100; i++) a.option(4242);
    await a.closed;
    await count;
    assert.equal(replies, 64);
    const b = await open(RawNbd.connect(s.address));
    await b.hello();
    await b.closed; // the 1 s negotiation deadline of this server
    assert.equal(s.limited.options, 1);
    assert.equal(s.limited.deadline, 1);
    await stillServes();
  });

  it('NBD_OPT_EXPORT_NAME: the old way in (size and flags, no zeros with NO_ZEROES); a name over NBD_MAX_STRING is TOO_BIG to GO', async () => {
    const c = await open(RawNbd.connect(s.address));
    await c.hello();
    c.option(NBD_OPT_GO, goData('x'.repeat(5000)));
    assert.equal((await c.optionReply()).type >>> 0, NBD_REP_ERR_TOO_BIG >>> 0);
    c.option(NBD_OPT_EXPORT_NAME, Buffer.from('h'));
    const r = await c.read(10);
    assert.equal(Number(r.readBigUInt64BE(0)), 8 * MiB);
    c.send({ type: NBD_CMD_READ, cookie: 1n, offset: 8 * MiB - 4096, length: 4096 });
    assert.ok((await c.reply()).data!.equals(img.bytes.subarray(8 * MiB - 4096)));
    const d = await open(RawNbd.connect(s.address));
    await d.hello();
    d.option(NBD_OPT_EXPORT_NAME, Buffer.from('nope'));
    await d.closed; // no way to refuse EXPORT_NAME but closing
  });

  it('an unknown export name: NBD_REP_ERR_UNKNOWN to GO', async () => {
    await assert.rejects(RawNbd.open(s.address, 'nope').then((c) => open(c)), /GO refused: 0x80000006/);
    const r = await run('nbdinfo', [s.uri('nope')]);
    assert.notEqual(r.code, 0);
  });
});

describe('NBD server: listening', () => {
  const none: NbdServerOptions['exports'] = new Map();

  it('refuses to replace a file that is not a socket, replaces a stale socket, refuses a live one', async () => {
    const file = join(dir, 'not-a-socket');
    writeFileSync(file, 'keep me');
    await assert.rejects(NbdServer.listen({ listen: { path: file }, exports: none }), { code: ErrorCode.UNSAFE_PATH });
    assert.equal(readFileSync(file, 'utf8'), 'keep me');
    // A socket file whose server died without removing it (process.exit skips the cleanup).
    const stale = join(dir, 'stale.sock');
    const r = await run(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(stale)}, () => process.exit(0))`]);
    assert.equal(r.code, 0);
    assert.ok(existsSync(stale));
    const s = await serve({ exports: none }, { path: stale });
    await assert.rejects(NbdServer.listen({ listen: { path: stale }, exports: none }), { code: ErrorCode.ADDRESS_IN_USE });
    await s.close();
    assert.equal(existsSync(stale), false);
  });

  it('a TCP port in use is ADDRESS_IN_USE', async () => {
    const busy = createServer().listen(0, '127.0.0.1');
    await new Promise((r) => busy.once('listening', r));
    try {
      const port = (busy.address() as { port: number }).port;
      await assert.rejects(NbdServer.listen({ listen: { host: '127.0.0.1', port }, exports: none }), { code: ErrorCode.ADDRESS_IN_USE });
    } finally {
      busy.close();
    }
  });

  it('connections over maxConnections are closed at once', async () => {
    const img = makeImage('cap.img', 4);
    const e = await fileExport(img.path);
    const s = await serve({ exports: new Map([['cap', e]]), maxConnections: 1 });
    const a = await open(RawNbd.open(s.address, 'cap'));
    const b = await open(RawNbd.connect(s.address));
    await b.closed;
    assert.equal(s.limited.overCap, 1);
    a.send({ type: NBD_CMD_READ, cookie: 1n, offset: 0, length: 512 });
    assert.ok((await a.reply()).data!.equals(img.bytes.subarray(0, 512)));
  });
});

describe('blockferry export (the CLI)', () => {
  it('serves a file on a Unix socket, prints its URI, and stops on SIGTERM removing the socket', async () => {
    const img = makeImage('cli.img', 5);
    const path = join(dir, 'cli.sock');
    const p = spawn(process.execPath, [bin, 'export', img.path, '--socket', path, '--name', 'vm1'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d) => { err += d; });
    const exited = new Promise<number | null>((r) => p.on('close', r));
    const uri = await new Promise<string>((resolve, reject) => {
      let out = '';
      p.stdout.on('data', (d) => { out += d; if (out.includes('\n')) resolve(out.trim()); });
      p.once('close', () => reject(new Error(`exited before printing its URI: ${err}`)));
    });
    assert.equal(uri, `nbd+unix:///vm1?socket=${path}`);
    assert.match(await ok('qemu-img', 'compare', '-f', 'raw', '-F', 'raw', img.path, uri), /identical/);
    const info = JSON.parse(await ok('nbdinfo', '--json', uri)) as { exports: Record<string, unknown>[] };
    assert.equal(info.exports[0]!['export-name'], 'vm1');
    p.kill('SIGTERM');
    assert.equal(await exited, 0, err);
    assert.equal(existsSync(path), false);
  });

  it('without --nbd or --socket: a usage error', async () => {
    const r = await run(process.execPath, [bin, 'export', join(dir, 'a.img')]);
    assert.equal(r.code, 2);
    assert.match(r.err, /ERR_BF_USAGE/);
  });
});

// The NBD client against real peers (qemu-nbd, qemu-storage-daemon, nbdkit)
// and against a hostile fake server; then scans and migrations that read an
// NBD export, and live rounds from QEMU's dirty bitmaps over QMP. Every peer
// runs in the background with a pid file, on a socket in this run's own
// directory, and is killed in `after`.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, openSync, closeSync, readdirSync, readFileSync, rmSync, writeSync, ftruncateSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdClient } from '../src/nbd/client.js';
import { parseNbdUri, formatNbdUri } from '../src/nbd/uri.js';
import { QmpClient } from '../src/nbd/qmp.js';
import { QmpDirty } from '../src/migrate/rounds.js';
import { NbdImageSource } from '../src/image/nbd.js';
import { Scanner } from '../src/scan/scanner.js';
import { migrate } from '../src/migrate/migrate.js';
import { DestinationService } from '../src/roles/destination/service.js';
import { ErrorCode } from '../src/errors.js';
import { Worker } from 'node:worker_threads';
import { NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_STATE_DIRTY, encodeChunkHeader, type NbdRequest } from '../src/nbd/protocol.js';
import { dataChunk, fakeServer, greeting, negotiating, negotiatingWithoutExport, optReply, type Script } from './nbd-fake.js';
import { seededBytes } from './util.js';
import { startStorageDaemon } from './qsd.js';

const KiB = 1024, MiB = 1 << 20;
let dir: string;
const pidFiles: string[] = [];

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
}

/** Runs a peer that daemonizes once its socket is ready, and remembers its pid file for `after`. */
function daemon(cmd: string, args: string[], pidFile: string): void {
  pidFiles.push(pidFile);
  run(cmd, args);
}

function kill(pidFile: string): void {
  try {
    process.kill(Number(readFileSync(pidFile, 'utf8').trim()), 'SIGTERM');
  } catch { /* already gone */ }
}

let n = 0;
const unique = (what: string) => join(dir, `${what}-${++n}`);

/** qemu-nbd serving an image on a Unix socket (persistent, any number of clients); its URI. */
function qemuNbd(image: string, format: 'raw' | 'qcow2', extra: string[] = []): string {
  const sock = unique('qemu-nbd.sock'), pid = unique('qemu-nbd.pid');
  daemon('qemu-nbd', ['--fork', '--pid-file', pid, '-k', sock, '-t', '-e', '0', '-f', format, '-x', 'disk', ...extra, image], pid);
  return `nbd+unix:///disk?socket=${sock}`;
}

/** nbdkit on a Unix socket (it forks once the socket is ready); its URI. */
function nbdkit(args: string[]): string {
  const sock = unique('nbdkit.sock'), pid = unique('nbdkit.pid');
  daemon('nbdkit', ['-U', sock, '-P', pid, ...args], pid);
  return `nbd+unix:///?socket=${sock}`;
}

/** A sparse raw file: the given extents of seeded data, holes elsewhere. */
function sparseRaw(path: string, size: number, data: Array<[number, number]>): Buffer {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  const expect = Buffer.alloc(size);
  data.forEach(([off, len], i) => {
    const b = seededBytes(100 + i, len);
    writeSync(fd, b, 0, len, off);
    expect.set(b, off);
  });
  closeSync(fd);
  return expect;
}

const same = (a: Uint8Array, b: Uint8Array) => Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'bf-nbd-'));
});
after(() => {
  for (const p of pidFiles) kill(p);
  rmSync(dir, { recursive: true, force: true });
});

describe('NBD URIs', () => {
  it('parses TCP and Unix forms, the default port and percent-encoded names', () => {
    assert.deepEqual(parseNbdUri('nbd://example.com/disk'), { transport: 'tcp', host: 'example.com', port: 10809, exportName: 'disk' });
    assert.deepEqual(parseNbdUri('nbd://127.0.0.1:10900'), { transport: 'tcp', host: '127.0.0.1', port: 10900, exportName: '' });
    assert.deepEqual(parseNbdUri('nbd://[::1]:7/hello%20world'), { transport: 'tcp', host: '::1', port: 7, exportName: 'hello world' });
    assert.deepEqual(parseNbdUri('nbd://h//disk'), { transport: 'tcp', host: 'h', port: 10809, exportName: '/disk' });
    assert.deepEqual(parseNbdUri('nbd+unix:///disk?socket=/run/x.sock'), { transport: 'unix', socket: '/run/x.sock', exportName: 'disk' });
    assert.deepEqual(parseNbdUri('nbd+unix:///?socket=s'), { transport: 'unix', socket: 's', exportName: '' });
    const t = parseNbdUri('nbd+unix:///a%2Fb?socket=/tmp/a%20b.sock');
    assert.deepEqual(parseNbdUri(formatNbdUri(t)), t);
  });
  for (const bad of ['nbds://h/x', 'nbds+unix:///x?socket=s', 'http://h/x', 'nbd+unix:///x', 'nbd+unix://host/x?socket=s', 'nbd://h/x?socket=s', 'nbd+unix:///x?socket=s&foo=1', 'nbd://user@h/x', 'nbd://h/%zz', 'nbd:///x']) {
    it(`refuses ${bad} with INVALID_ARGUMENT`, () => {
      assert.throws(() => parseNbdUri(bad), { code: ErrorCode.INVALID_ARGUMENT });
    });
  }
});

describe('qemu-nbd', () => {
  const size = 24 * MiB;
  const layout: Array<[number, number]> = [[0, MiB], [5 * MiB, 64 * KiB], [12 * MiB + 4096, 3 * 4096], [size - 8192, 8192]];
  let raw: string, expect: Buffer, rawUri: string;
  before(() => {
    raw = unique('a.raw');
    expect = sparseRaw(raw, size, layout);
    rawUri = qemuNbd(raw, 'raw');
  });

  it('raw: every byte read equals the file; the data extents are exactly the written ones', async () => {
    const c = await NbdClient.connect(rawUri);
    try {
      assert.equal(c.size, size);
      assert.ok(same(await c.read(0, size), expect));
      // Reads at odd places and lengths, several in flight at once.
      const pieces = await Promise.all([[1, 4095], [MiB - 3, 10], [5 * MiB + 100, 100_000], [size - 1, 1]].map(async ([o, l]) => [o!, l!, await c.read(o!, l!)] as const));
      for (const [o, l, b] of pieces) assert.ok(same(b, expect.subarray(o, o + l)), `read ${o}+${l}`);
      const status = await c.blockStatus(0, size);
      assert.deepEqual(status.filter((x) => !(x.flags & 1)).map((x) => [x.offset, x.length]), layout);
      await c.flush(); // a writable export offers FLUSH
    } finally {
      await c.disconnect();
    }
    const src = new NbdImageSource(rawUri);
    try {
      assert.deepEqual(src.extents(0, size).map((x) => [x.offset, x.length]), layout);
      const buf = new Uint8Array(size);
      src.readInto(buf, 0, size); // 24 MiB: three turns through the bridge
      assert.ok(same(buf, expect));
    } finally {
      src.close();
    }
  });

  it('qcow2: reads equal qemu-img convert -O raw; zero clusters and unallocated space are not data', async () => {
    const q = unique('b.qcow2'), flat = unique('b.raw');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', q, '16M']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 64k', '-c', 'write -P 0x12 3M 128k', '-c', 'write -z 5M 64k', '-c', 'write -P 0x7e 15M 1M', q]);
    run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', q, flat]);
    const uri = qemuNbd(q, 'qcow2');
    const c = await NbdClient.connect(uri);
    try {
      assert.ok(same(await c.read(0, c.size), readFileSync(flat)));
    } finally {
      await c.disconnect();
    }
    const src = new NbdImageSource(uri);
    try {
      assert.deepEqual(src.extents(0, src.size), [{ offset: 0, length: 64 * KiB }, { offset: 3 * MiB, length: 128 * KiB }, { offset: 15 * MiB, length: MiB }]);
    } finally {
      src.close();
    }
  });

  it('qemu-nbd -B: the dirty extents of a persistent bitmap are exactly the writes made since it was added', async () => {
    const q = unique('c.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', q, '8M']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x01 0 1M', q]); // before the bitmap: not dirty
    run('qemu-img', ['bitmap', '--add', '-g', '65536', q, 'b0']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x55 128k 64k', '-c', 'write -P 0x55 2M 192k', '-c', 'write -P 0x55 7M 64k', q]);
    const uri = qemuNbd(q, 'qcow2', ['-B', 'b0']);
    const c = await NbdClient.connect(uri, { contexts: ['base:allocation', 'qemu:dirty-bitmap:b0'] });
    try {
      const dirty = (await c.blockStatus(0, c.size, 'qemu:dirty-bitmap:b0')).filter((x) => x.flags & NBD_STATE_DIRTY);
      assert.deepEqual(dirty.map((x) => [x.offset, x.length]), [[128 * KiB, 64 * KiB], [2 * MiB, 192 * KiB], [7 * MiB, 64 * KiB]]);
      await assert.rejects(c.blockStatus(0, c.size, 'qemu:dirty-bitmap:nope'), { code: ErrorCode.NBD });
    } finally {
      await c.disconnect();
    }
  });

  it('an unknown export name is ERR_BF_NBD, naming it', async () => {
    const t = parseNbdUri(rawUri);
    await assert.rejects(NbdClient.connect({ ...t, exportName: 'nope' }), (e: Error & { code?: string }) => e.code === ErrorCode.NBD && /nope/.test(e.message));
    assert.throws(() => new NbdImageSource(formatNbdUri({ ...t, exportName: 'nope' })), { code: ErrorCode.NBD });
  });

  it('a socket nobody listens on is ERR_BF_NBD', async () => {
    await assert.rejects(NbdClient.connect(`nbd+unix:///x?socket=${unique('none.sock')}`), { code: ErrorCode.NBD });
  });

  it('scanning the NBD URI gives the same block map as scanning the file', async () => {
    const scanner = new Scanner({ workers: 2 });
    try {
      const [fromFile] = await scanner.scan(raw, { blockSize: 4096, rangeBytes: 4 * MiB });
      const [fromNbd] = await scanner.scan(rawUri, { blockSize: 4096, rangeBytes: 4 * MiB });
      assert.equal(fromNbd!.imageSize, size);
      assert.deepEqual([...fromNbd!.runs()], [...fromFile!.runs()]);
      assert.deepEqual(fromNbd!.fingerprints, fromFile!.fingerprints);
      assert.deepEqual(fromNbd!.signatures, fromFile!.signatures);
    } finally {
      await scanner.close();
    }
  });

  it('blockferry scan: an NBD URI and its file give the same counts; --qmp without --qmp-node is a usage error', () => {
    const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
    const scan = (image: string) => {
      const r = spawnSync(process.execPath, [bin, 'scan', '--json', '--no-save', '--progress', 'none', image], { encoding: 'utf8' });
      assert.equal(r.status, 0, r.stderr);
      const [row] = JSON.parse(r.stdout) as Array<Record<string, unknown>>;
      for (const k of ['image', 'seconds', 'mbPerSecond', 'mapFile', 'notCached']) delete row![k]; // where maps are kept differs by design: an export's are never cached
      return row;
    };
    assert.deepEqual(scan(rawUri), scan(raw));
    const r = spawnSync(process.execPath, [bin, 'migrate', rawUri, '--to', '127.0.0.1:1', '--insecure', '--qmp', unique('qmp.sock')], { encoding: 'utf8' });
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, /--qmp-node/);
  });

  it('a migration from a qcow2 export gives a destination identical to qemu-img convert -O raw', async () => {
    const q = unique('d.qcow2'), flat = unique('d.raw');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', q, '20M']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x31 0 2M', '-c', 'write -P 0x32 6M 4k', '-c', 'write -P 0x31 9M 2M', '-c', 'write -z 12M 1M', '-c', 'write -P 0x99 19M 1M', q]);
    run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', q, flat]);
    const uri = qemuNbd(q, 'qcow2');
    const dataDir = unique('dst');
    const svc = await DestinationService.start({ dataDir, auth: { insecure: true } });
    try {
      const r = await migrate(uri, { to: `127.0.0.1:${svc.address.port}`, strategy: 'full', auth: { insecure: true } });
      assert.equal(r.name, 'disk');
      assert.equal(r.imageSize, 20 * MiB);
      assert.ok(readFileSync(join(dataDir, 'disk.img')).equals(readFileSync(flat)));
    } finally {
      await svc.close();
    }
  });
});

describe('nbdkit', () => {
  it('data plugin: the bytes it describes', async () => {
    const uri = nbdkit(['data', 'data=1 2 3 @1048576 4 5 6 @^4096 0xff', 'size=2M']);
    const expect = Buffer.alloc(2 * MiB);
    expect.set([1, 2, 3], 0);
    expect.set([4, 5, 6], MiB);
    expect[MiB + 4096] = 0xff;
    const c = await NbdClient.connect(uri);
    try {
      assert.ok(same(await c.read(0, c.size), expect));
    } finally {
      await c.disconnect();
    }
  });

  it('over TCP (nbd://127.0.0.1:PORT/EXPORT): the same bytes', async () => {
    // A port that was free a moment ago (nbdkit cannot report one it chose).
    const port = await new Promise<number>((resolve) => {
      const probe = net.createServer().listen(0, '127.0.0.1', () => {
        const p = (probe.address() as net.AddressInfo).port;
        probe.close(() => resolve(p));
      });
    });
    const pid = unique('nbdkit-tcp.pid');
    daemon('nbdkit', ['-i', '127.0.0.1', '-p', String(port), '-P', pid, '-e', 'tcpdisk', 'data', 'data=@8192 1 2 3 4', 'size=64K'], pid);
    const c = await NbdClient.connect(`nbd://127.0.0.1:${port}/tcpdisk`);
    try {
      assert.equal(c.size, 65536);
      assert.deepEqual([...(await c.read(8190, 6))], [0, 0, 1, 2, 3, 4]);
    } finally {
      await c.disconnect();
    }
  });

  it('memory plugin: all zeros, no data extents', async () => {
    const src = new NbdImageSource(nbdkit(['memory', '4M']));
    try {
      assert.deepEqual(src.extents(0, src.size), []);
      const buf = new Uint8Array(src.size).fill(7);
      src.readInto(buf, 0, src.size);
      assert.ok(buf.every((b) => b === 0));
    } finally {
      src.close();
    }
  });

  it('sparse-random plugin: the same bytes as nbdcopy copies; nothing outside the data extents', async () => {
    const uri = nbdkit(['sparse-random', '16M', 'seed=42', 'runlength=65536', 'percent=20']);
    const copy = unique('sr.raw');
    run('nbdcopy', [uri, copy]);
    const expect = readFileSync(copy);
    const src = new NbdImageSource(uri);
    try {
      const buf = new Uint8Array(src.size);
      src.readInto(buf, 0, src.size);
      assert.ok(same(buf, expect));
      const ext = src.extents(0, src.size);
      assert.ok(ext.length > 0);
      let at = 0;
      for (const x of [...ext, { offset: src.size, length: 0 }]) {
        assert.ok(expect.subarray(at, x.offset).every((b) => b === 0), `zeros in ${at}..${x.offset}`);
        at = x.offset + x.length;
      }
    } finally {
      src.close();
    }
  });

  it('error filter: a failing read is ERR_BF_NBD naming the errno, and the connection stays usable', async () => {
    const uri = nbdkit(['--filter=error', 'memory', '1M', 'error=EIO', 'error-pread-rate=100%']);
    const c = await NbdClient.connect(uri);
    try {
      await assert.rejects(c.read(0, 4096), (e: Error & { code?: string }) => e.code === ErrorCode.NBD && /EIO/.test(e.message));
      await assert.rejects(c.read(8192, 4096), { code: ErrorCode.NBD });
      assert.equal((await c.blockStatus(0, c.size)).length, 1);
    } finally {
      await c.disconnect();
    }
    const src = new NbdImageSource(uri);
    try {
      assert.throws(() => src.readInto(new Uint8Array(4096), 0, 4096), { code: ErrorCode.NBD });
    } finally {
      src.close();
    }
  });

  it('delay filter: slow answers still arrive whole', async () => {
    const uri = nbdkit(['--filter=delay', 'data', 'data=@65536 9 8 7', 'size=1M', 'rdelay=200ms']);
    const c = await NbdClient.connect(uri);
    try {
      const b = await c.read(65536, 4);
      assert.deepEqual([...b], [9, 8, 7, 0]);
    } finally {
      await c.disconnect();
    }
  });
});

describe('a hostile NBD server', () => {
  const cases: Array<[string, Script, string]> = [
    ['garbage instead of a greeting', (sock, buf) => { if (!buf.length) sock.write('HTTP/1.1 400 Bad Request\r\n\r\n'); }, ErrorCode.NBD],
    ['a truncated greeting, then the connection closed', (sock, buf) => { if (!buf.length) sock.end(greeting().subarray(0, 11)); }, ErrorCode.NBD],
    ['a truncated greeting, then silence', (sock, buf) => { if (!buf.length) sock.write(greeting().subarray(0, 11)); }, ErrorCode.TIMEOUT],
    ['an option reply claiming 4 GiB', (sock, buf) => {
      if (!buf.length) sock.write(greeting());
      else if (buf.length >= 20) sock.write(optReply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, Buffer.alloc(0), 0xffffffff));
    }, ErrorCode.NBD],
    ['a reply to another option', (sock, buf) => {
      if (!buf.length) sock.write(greeting());
      else if (buf.length >= 20) sock.write(optReply(NBD_OPT_GO, NBD_REP_ACK));
    }, ErrorCode.NBD],
    ['GO without NBD_INFO_EXPORT', negotiatingWithoutExport(), ErrorCode.NBD],
  ];
  for (const [what, script, code] of cases) {
    it(`${what}: ${code}`, async () => {
      const fake = await fakeServer(unique('fake.sock'), script);
      try {
        await assert.rejects(NbdClient.connect(fake.uri, { timeoutMs: 300 }), { code });
      } finally {
        fake.close();
      }
    });
  }

  const reads: Array<[string, (sock: net.Socket, r: NbdRequest) => void, string]> = [
    ['data outside the request', (sock, r) => sock.write(dataChunk(r.cookie, r.offset + r.length, Buffer.alloc(16))), ErrorCode.NBD],
    ['a chunk longer than the request', (sock, r) => sock.write(encodeChunkHeader(r.cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 0xfffffff0)), ErrorCode.NBD],
    ['a reply for a cookie never sent', (sock, r) => sock.write(dataChunk(r.cookie + 99n, r.offset, Buffer.alloc(r.length))), ErrorCode.NBD],
    ['a bad reply magic', (sock) => sock.write(Buffer.alloc(64, 0x41)), ErrorCode.NBD],
    ['a READ answered with a gap', (sock, r) => sock.write(dataChunk(r.cookie, r.offset, Buffer.alloc(r.length - 1))), ErrorCode.NBD],
    ['silence', () => {}, ErrorCode.TIMEOUT],
    ['half a reply, then the connection closed', (sock, r) => sock.end(dataChunk(r.cookie, r.offset, Buffer.alloc(r.length)).subarray(0, 30)), ErrorCode.NBD],
  ];
  for (const [what, onRequest, code] of reads) {
    it(`a READ answered with ${what}: ${code}, every request in flight fails`, async () => {
      const fake = await fakeServer(unique('fake.sock'), negotiating(onRequest));
      const c = await NbdClient.connect(fake.uri, { timeoutMs: 300 });
      try {
        const results = await Promise.allSettled([c.read(0, 4096), c.read(8192, 4096)]);
        for (const r of results) {
          assert.equal(r.status, 'rejected');
          assert.equal((r as PromiseRejectedResult).reason.code, code);
        }
        // The connection is over: later requests fail at once.
        await assert.rejects(c.read(0, 1), { code });
      } finally {
        c.destroy();
        fake.close();
      }
    });
  }

  const statusChunk = (r: NbdRequest, contextId: number, extents: Array<[number, number]>, claimed?: number) => {
    const body = Buffer.alloc(4 + 8 * extents.length);
    body.writeUInt32BE(contextId, 0);
    extents.forEach(([len, flags], i) => { body.writeUInt32BE(len, 4 + 8 * i); body.writeUInt32BE(flags, 8 + 8 * i); });
    return Buffer.concat([encodeChunkHeader(r.cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, claimed ?? body.length), body]);
  };
  const errorChunk = (r: NbdRequest, message: string, claimedMessage: number) => {
    const body = Buffer.alloc(6 + message.length);
    body.writeUInt32BE(5, 0);
    body.writeUInt16BE(claimedMessage, 4);
    body.write(message, 6);
    return Buffer.concat([encodeChunkHeader(r.cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, body.length), body]);
  };
  const statuses: Array<[string, (sock: net.Socket, r: NbdRequest) => void]> = [
    ['an extent of length 0', (sock, r) => sock.write(statusChunk(r, 1, [[0, 0]]))],
    ['a context never agreed', (sock, r) => sock.write(statusChunk(r, 7, [[r.length, 0]]))],
    ['a chunk claiming 1 GiB of extents', (sock, r) => sock.write(statusChunk(r, 1, [[r.length, 0]], 1 << 30))],
    ['an error chunk whose message length lies', (sock, r) => sock.write(errorChunk(r, 'oops', 4000))],
    ['DONE without extents', (sock, r) => sock.write(encodeChunkHeader(r.cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0))],
  ];
  for (const [what, onRequest] of statuses) {
    it(`BLOCK_STATUS answered with ${what}: ERR_BF_NBD`, async () => {
      const fake = await fakeServer(unique('fake.sock'), negotiating(onRequest));
      const c = await NbdClient.connect(fake.uri, { timeoutMs: 300 });
      try {
        await assert.rejects(c.blockStatus(0, 65536), { code: ErrorCode.NBD });
      } finally {
        c.destroy();
        fake.close();
      }
    });
  }

  it('the bridge turns a silent server into ERR_BF_TIMEOUT, not a hang', async () => {
    // The bridge blocks this thread: the server runs in another.
    const path = unique('fake.sock');
    const server = new Worker(new URL('./nbd-fake.js', import.meta.url), { workerData: { silent: path } });
    try {
      await new Promise((resolve, reject) => { server.once('message', resolve); server.once('error', reject); });
      const src = new NbdImageSource(`nbd+unix:///x?socket=${path}`, { timeoutMs: 300 });
      try {
        assert.throws(() => src.readInto(new Uint8Array(4096), 0, 4096), { code: ErrorCode.TIMEOUT });
      } finally {
        src.close();
      }
    } finally {
      await server.terminate();
    }
  });
});

/** qemu-storage-daemon serving `image` (qsd.ts), stopped with the others at the end. */
function storageDaemon(image: string): { uri: string; qmp: string } {
  const d = startStorageDaemon(dir, image, `qsd-${++n}`);
  pidFiles.push(d.pidFile);
  return d;
}

/** Writes through the NBD export with qemu-io (QEMU sees them, so its bitmaps do). */
function qemuIoWrite(uri: string, writes: Array<[number, number, number]>): Promise<void> {
  const args = ['-f', 'raw', ...writes.flatMap(([pattern, off, len]) => ['-c', `write -P ${pattern} ${off} ${len}`]), uri];
  return new Promise((resolve, reject) => {
    const p = spawn('qemu-io', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    p.stderr!.on('data', (d) => { err += d; });
    p.on('exit', (c) => (c === 0 ? resolve() : reject(new Error(`qemu-io failed (${c}): ${err}`))));
  });
}

describe('qemu-storage-daemon: dirty bitmaps over QMP', () => {
  it('each round reports exactly the blocks written since the last; writeCounts counts the rounds; nothing is left behind', async () => {
    const image = unique('live.raw');
    sparseRaw(image, 16 * MiB, [[0, 2 * MiB]]);
    const { uri, qmp } = storageDaemon(image);
    const dirty = await QmpDirty.start({ socket: qmp, node: 'disk0' }, uri, 4096);
    try {
      await qemuIoWrite(uri, [[0x11, 8192, 4096], [0x12, MiB, 3 * 4096]]);
      assert.deepEqual(await dirty.take(), [{ start: 2, count: 1 }, { start: 256, count: 3 }]);
      assert.deepEqual(await dirty.take(), [], 'no writes, no dirty blocks');
      await qemuIoWrite(uri, [[0x21, 8192, 100], [0x22, 10 * MiB + 4000, 200]]);
      assert.deepEqual(await dirty.take(), [{ start: 2, count: 1 }, { start: 2560, count: 2 }]);
      assert.deepEqual([...dirty.writeCounts].sort((a, b) => a[0] - b[0]), [[2, 2], [256, 1], [257, 1], [258, 1], [2560, 1], [2561, 1]]);
    } finally {
      await dirty.close();
    }
    const q = await QmpClient.connect(qmp);
    try {
      const nodes = await q.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: unknown[] }>>('query-named-block-nodes', { flat: true });
      assert.deepEqual(nodes.find((x) => x['node-name'] === 'disk0')?.['dirty-bitmaps'] ?? [], [], 'no bitmap left on the node');
      const exports = await q.execute<Array<{ id: string }>>('query-block-exports');
      assert.deepEqual(exports.map((e) => e.id), ['exp0'], 'no temporary export left');
      await assert.rejects(q.execute('no-such-command'), { code: ErrorCode.QMP });
    } finally {
      q.close();
    }
  });

  it('a live migration with rounds from the bitmaps, while a writer writes through the export: the destination equals the final image', async () => {
    const image = unique('live2.raw');
    sparseRaw(image, 32 * MiB, [[0, 4 * MiB], [20 * MiB, 2 * MiB]]);
    const { uri, qmp } = storageDaemon(image);
    const dataDir = unique('dst');
    const svc = await DestinationService.start({ dataDir, auth: { insecure: true } });
    let writing = false, writes = 0;
    let writer: Promise<void> = Promise.resolve();
    const startWriter = () => {
      if (writing) return;
      writing = true;
      writer = (async () => {
        for (let k = 0; writing; k++) {
          await qemuIoWrite(uri, [[(k % 200) + 1, ((k * 7919) % 8000) * 4096, 4096 * (1 + (k % 3))]]);
          writes++;
        }
      })();
    };
    const rounds: number[] = [];
    try {
      const r = await migrate(uri, {
        to: `127.0.0.1:${svc.address.port}`, name: 'live', strategy: 'full', auth: { insecure: true },
        qmp: { socket: qmp, node: 'disk0' }, maxRounds: 4, dirtyThreshold: 0,
        // The writer starts once the first bitmap records (the scan), and is stopped at cutover after a few writes at least.
        onEvent: (e) => { if (e.phase === 'scan') startWriter(); if (e.phase === 'round') rounds.push((e.detail as { dirty: number }).dirty); },
        pause: async () => {
          while (writes < 3) await new Promise((res) => setTimeout(res, 20));
          writing = false;
          await writer;
        },
      });
      assert.ok(writes >= 3);
      assert.ok(readFileSync(join(dataDir, 'live.img')).equals(readFileSync(image)), `destination equals the final image (${writes} writes, rounds ${JSON.stringify(rounds)}, ${r.rounds} in all)`);
    } finally {
      writing = false;
      await writer.catch(() => {});
      await svc.close();
    }
  });

  it('--qmp naming a node QEMU does not have: ERR_BF_QMP before the destination is asked', async () => {
    const image = unique('live3.raw');
    sparseRaw(image, MiB, [[0, 4096]]);
    const { uri, qmp } = storageDaemon(image);
    const dataDir = unique('dst');
    const svc = await DestinationService.start({ dataDir, auth: { insecure: true } });
    try {
      await assert.rejects(migrate(uri, { to: `127.0.0.1:${svc.address.port}`, auth: { insecure: true }, qmp: { socket: qmp, node: 'nope' } }), { code: ErrorCode.QMP });
      assert.deepEqual(readdirSync(dataDir).filter((f) => f.startsWith('disk')), [], 'no partial image at the destination');
    } finally {
      await svc.close();
    }
  });

  it('--qmp with a file source is refused', async () => {
    const svc = await DestinationService.start({ dataDir: unique('dst'), auth: { insecure: true } });
    try {
      const image = unique('plain.raw');
      sparseRaw(image, MiB, [[0, 4096]]);
      await assert.rejects(migrate(image, { to: `127.0.0.1:${svc.address.port}`, auth: { insecure: true }, qmp: { socket: unique('none.sock'), node: 'x' } }), { code: ErrorCode.INVALID_ARGUMENT });
    } finally {
      await svc.close();
    }
  });
});

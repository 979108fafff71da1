// A fake NBD server that does whatever a test tells it: the hostile peer of
// nbd-client.test.ts. Run as a worker thread (workerData.silent), it serves
// a well-negotiated export that never answers a request: a peer in another
// thread, for the synchronous bridge, which blocks the thread that calls it.
import net from 'node:net';
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import {
  NBD_IHAVEOPT, NBD_MAGIC, NBD_OPT_GO, NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_MAGIC,
  NBD_REP_META_CONTEXT, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS, NBD_OPT_STRUCTURED_REPLY,
  decodeRequest, encodeChunkHeader, type NbdRequest,
} from '../src/nbd/protocol.js';

const MiB = 1 << 20;

export type Script = (sock: net.Socket, data: Buffer) => void;

export async function fakeServer(path: string, script: Script): Promise<{ uri: string; close: () => void }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('error', () => {});
    let buf = Buffer.alloc(0);
    sock.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      script(sock, buf);
    });
    script(sock, Buffer.alloc(0));
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return { uri: `nbd+unix:///x?socket=${path}`, close: () => { for (const s of sockets) s.destroy(); server.close(); } };
}

export const greeting = () => {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(NBD_IHAVEOPT, 8);
  b.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE, 16);
  return b;
};

export function optReply(option: number, type: number, data: Buffer = Buffer.alloc(0), claimed = data.length): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type >>> 0, 12);
  h.writeUInt32BE(claimed >>> 0, 16);
  return Buffer.concat([h, data]);
}

/**
 * A well-behaved negotiation (structured replies, base:allocation as context
 * 1, a 1 MiB export), then `onRequest` for each request.
 */
export function negotiating(onRequest: (sock: net.Socket, r: NbdRequest) => void): Script {
  return (sock, buf) => {
    const s = sock as net.Socket & { at?: number; go?: boolean };
    if (s.at === undefined) { s.at = 0; sock.write(greeting()); return; }
    if (s.at === 0 && buf.length >= 4) s.at = 4;
    while (!s.go && buf.length >= s.at + 16) {
      const opt = buf.readUInt32BE(s.at + 8), len = buf.readUInt32BE(s.at + 12);
      if (buf.length < s.at + 16 + len) return;
      s.at += 16 + len;
      if (opt === NBD_OPT_STRUCTURED_REPLY) sock.write(optReply(opt, NBD_REP_ACK));
      else if (opt === NBD_OPT_SET_META_CONTEXT) {
        const ctx = Buffer.alloc(4 + 15);
        ctx.writeUInt32BE(1, 0);
        ctx.write('base:allocation', 4);
        sock.write(Buffer.concat([optReply(opt, NBD_REP_META_CONTEXT, ctx), optReply(opt, NBD_REP_ACK)]));
      } else if (opt === NBD_OPT_GO) {
        const info = Buffer.alloc(12);
        info.writeUInt16BE(0, 0);
        info.writeBigUInt64BE(BigInt(MiB), 2);
        info.writeUInt16BE(NBD_FLAG_HAS_FLAGS, 10);
        sock.write(Buffer.concat([optReply(opt, NBD_REP_INFO, info), optReply(opt, NBD_REP_ACK)]));
        s.go = true;
      } else sock.write(optReply(opt, NBD_REP_ERR_UNSUP));
    }
    while (s.go && buf.length >= s.at + 28) {
      const r = decodeRequest(buf.subarray(s.at, s.at + 28))!;
      s.at += 28;
      onRequest(sock, r);
    }
  };
}

export function negotiatingWithoutExport(): Script {
  return (sock, buf) => {
    const s = sock as net.Socket & { at?: number };
    if (s.at === undefined) { s.at = 4; sock.write(greeting()); return; }
    while (buf.length >= s.at + 16) {
      const opt = buf.readUInt32BE(s.at + 8), len = buf.readUInt32BE(s.at + 12);
      if (buf.length < s.at + 16 + len) return;
      s.at += 16 + len;
      sock.write(optReply(opt, opt === NBD_OPT_GO || opt === NBD_OPT_STRUCTURED_REPLY ? NBD_REP_ACK : NBD_REP_ERR_UNSUP));
    }
  };
}

export function dataChunk(cookie: bigint, offset: number, data: Buffer): Buffer {
  const o = Buffer.alloc(8);
  o.writeBigUInt64BE(BigInt(offset));
  return Buffer.concat([encodeChunkHeader(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 8 + data.length), o, data]);
}


if (!isMainThread && (workerData as { silent?: string } | undefined)?.silent) {
  void fakeServer((workerData as { silent: string }).silent, negotiating(() => {})).then(() => parentPort!.postMessage('listening'));
}

// Hostile clients for the limit tests and the stress scripts: idle
// connections, oversized HELLO headers, and an authenticated client that
// floods BLOCKS frames without ever reading a reply. Plus RSS of a process.
import { connect as netConnect, type Socket } from 'node:net';
import { readFileSync } from 'node:fs';
import { Channel } from '../../src/protocol/channel.js';
import { clientHandshake } from '../../src/protocol/handshake.js';
import { BEGIN, BEGIN_OK, BLOCK_INFO, BLOCKS, INFO_END } from '../../src/protocol/messages.js';
import { encodeHeader, Msg } from '../../src/protocol/frame.js';
import { connect as tlsConnect } from '../../src/transport/tls.js';
import { Engine } from '../../src/engine/engine.js';
import { seededBytes } from '../util.js';

/** A plain TCP connection from localAddress (any 127.0.0.0/8 address works on Linux loopback) that sends nothing. */
export function idle(port: number, localAddress = '127.0.0.1'): Promise<Socket> {
  return new Promise((res, rej) => {
    const s = netConnect({ port, host: '127.0.0.1', localAddress });
    s.once('connect', () => res(s));
    s.once('error', rej);
  });
}

/** Resolves once s is closed (by the peer's limits: the tests then assert which limit closed it). */
export function closedWithin(s: Socket): Promise<void> {
  if (s.destroyed || s.closed) return Promise.resolve();
  return new Promise((res) => { s.on('error', () => {}); s.resume(); s.once('close', () => res()); });
}

/** The old finding: a HELLO header declaring `declared` bytes, then `payload` bytes of it. Resolves when written or refused. */
export async function helloFlood(port: number, declared: number, payload: number, localAddress = '127.0.0.1'): Promise<Socket> {
  const s = await idle(port, localAddress);
  s.on('error', () => {});
  const h = encodeHeader(Msg.HELLO, 0);
  h.writeUInt32LE(declared, 0);
  s.write(h);
  const chunk = Buffer.alloc(1 << 20, 0x41);
  for (let sent = 0; sent < payload && !s.destroyed; sent += chunk.length) {
    if (!s.write(chunk.subarray(0, Math.min(chunk.length, payload - sent)))) {
      await new Promise<void>((r) => { s.once('drain', r); s.once('close', r); });
    }
  }
  return s;
}

/** VmRSS and VmHWM (peak) of a process, in bytes. */
export function rss(pid: number | 'self' = 'self'): { rss: number; peak: number } {
  const t = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+)`).exec(t)?.[1] ?? 0) * 1024;
  return { rss: kb('VmRSS'), peak: kb('VmHWM') };
}

/**
 * Authenticates (pre-shared key over TLS), opens a migration and sends
 * `bytes` of BLOCKS frames as fast as the link takes them, never reading
 * what the destination sends back. Resolves with the bytes sent.
 */
export async function blocksFlood(port: number, key: Buffer, bytes: number, name = 'flood'): Promise<number> {
  const BS = 4096, N = 4000;
  const data = Buffer.from(seededBytes(99, N * BS));
  const fp = new Engine({ initialBytes: 24 << 20 }).fingerprints(data, BS);
  const ch = new Channel(await tlsConnect({ host: '127.0.0.1', port }, { mode: 'psk', key }));
  try {
    await clientHandshake(ch, { key }, 0);
    await ch.send(BEGIN, { name, size: N * BS, blockSize: BS, flags: 0, fills: 0, strategy: 'flood' });
    await ch.recv(BEGIN_OK);
    await ch.send(BLOCK_INFO, { start: 0, count: N, fingerprints: fp.fingerprints, signatures: fp.signatures });
    await ch.send(INFO_END, undefined);
    let sent = 0;
    while (sent < bytes) {
      await ch.send(BLOCKS, { runs: [{ start: 0, count: N }], fingerprints: fp.fingerprints, data });
      sent += data.length;
    }
    return sent;
  } finally {
    ch.socket.destroy();
  }
}

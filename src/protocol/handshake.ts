// The handshake: version and capabilities, then mutual authentication with
// a pre-shared key (challenge-response with HMAC-SHA256 over both nonces),
// unless both sides run --insecure. docs/PROTOCOL.md, "Handshake".
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { ErrorCode, ProtocolError } from '../errors.js';
import { Msg, Reader, Writer } from './frame.js';
import type { Channel } from './channel.js';

export const PROTOCOL_MAGIC = Buffer.from('BFRY', 'latin1');
export const PROTOCOL_VERSION = 1;
const NONCE = 32;
const FLAG_INSECURE = 1;
/** Capability bits; a session uses what both sides announce. */
export const CAP_SIMILARITY = 1;
export const CAP_RESUME = 2;
export const CAPABILITIES = CAP_SIMILARITY | CAP_RESUME;

export interface AuthOptions {
  /** The pre-shared key (at least 16 bytes). */
  key?: Buffer;
  /** Plain, unauthenticated TCP: both sides must ask for it (loopback demos). */
  insecure?: boolean;
}

function proof(key: Buffer, label: string, a: Buffer, b: Buffer): Buffer {
  return createHmac('sha256', key).update(label).update(a).update(b).digest();
}

function checkAuth(o: AuthOptions): void {
  if (!o.insecure && (!o.key || o.key.length < 16)) {
    throw new ProtocolError(ErrorCode.AUTH_FAILED, 'a key of at least 16 bytes is required (or --insecure on both sides, for loopback demos)');
  }
}

/** Client side; resolves with the capabilities both sides share. */
export async function clientHandshake(ch: Channel, o: AuthOptions): Promise<number> {
  checkAuth(o);
  const nonceC = randomBytes(NONCE);
  await ch.send(Msg.HELLO, new Writer().bytes(PROTOCOL_MAGIC).u16(PROTOCOL_VERSION).u16(o.insecure ? FLAG_INSECURE : 0).u32(CAPABILITIES).bytes(nonceC).done());
  const ack = new Reader((await ch.recv(Msg.HELLO_ACK)).payload, 'HELLO_ACK');
  const version = ack.u16();
  const flags = ack.u16();
  const caps = ack.u32();
  const nonceS = ack.bytes(NONCE);
  const serverProof = ack.bytes(32);
  ack.end();
  if (version !== PROTOCOL_VERSION) throw new ProtocolError(ErrorCode.PROTOCOL_VERSION, `server speaks protocol version ${version}, this client ${PROTOCOL_VERSION}`);
  if (o.insecure) {
    if (!(flags & FLAG_INSECURE)) throw new ProtocolError(ErrorCode.AUTH_FAILED, 'the server requires authentication');
  } else {
    if (flags & FLAG_INSECURE || !timingSafeEqual(serverProof, proof(o.key!, 'bf-server', nonceC, nonceS))) {
      await ch.sendError(ErrorCode.AUTH_FAILED, 'server failed to prove the key');
      throw new ProtocolError(ErrorCode.AUTH_FAILED, 'the server does not know the key (wrong key, or not the server you meant)');
    }
  }
  await ch.send(Msg.AUTH, o.insecure ? Buffer.alloc(32) : proof(o.key!, 'bf-client', nonceS, nonceC));
  await ch.recv(Msg.READY);
  return caps & CAPABILITIES;
}

/** Server side; resolves with the shared capabilities, or sends ERROR and throws. */
export async function serverHandshake(ch: Channel, o: AuthOptions): Promise<number> {
  checkAuth(o);
  const hello = new Reader((await ch.recv(Msg.HELLO)).payload, 'HELLO');
  const magic = hello.bytes(4);
  const version = hello.u16();
  const flags = hello.u16();
  const caps = hello.u32();
  const nonceC = hello.bytes(NONCE);
  hello.end();
  if (!magic.equals(PROTOCOL_MAGIC)) throw new ProtocolError(ErrorCode.PROTOCOL, 'not a blockferry client (bad magic)');
  if (version !== PROTOCOL_VERSION) {
    await ch.sendError(ErrorCode.PROTOCOL_VERSION, `server speaks protocol version ${PROTOCOL_VERSION}, client ${version}`);
    throw new ProtocolError(ErrorCode.PROTOCOL_VERSION, `client speaks protocol version ${version}`);
  }
  const clientInsecure = (flags & FLAG_INSECURE) !== 0;
  if (clientInsecure !== !!o.insecure) {
    const msg = o.insecure ? 'this server runs --insecure; the client must too' : 'this server requires a key; insecure clients are refused';
    await ch.sendError(ErrorCode.AUTH_FAILED, msg);
    throw new ProtocolError(ErrorCode.AUTH_FAILED, msg);
  }
  const nonceS = randomBytes(NONCE);
  const mine = o.insecure ? Buffer.alloc(32) : proof(o.key!, 'bf-server', nonceC, nonceS);
  await ch.send(Msg.HELLO_ACK, new Writer().u16(PROTOCOL_VERSION).u16(o.insecure ? FLAG_INSECURE : 0).u32(CAPABILITIES).bytes(nonceS).bytes(mine).done());
  const auth = (await ch.recv(Msg.AUTH)).payload;
  if (!o.insecure && (auth.length !== 32 || !timingSafeEqual(auth, proof(o.key!, 'bf-client', nonceS, nonceC)))) {
    await ch.sendError(ErrorCode.AUTH_FAILED, 'wrong key');
    throw new ProtocolError(ErrorCode.AUTH_FAILED, 'client failed to prove the key');
  }
  await ch.send(Msg.READY);
  return caps & CAPABILITIES;
}

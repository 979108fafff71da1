// The handshake: version and capabilities, then mutual authentication with
// a pre-shared key (challenge-response with HMAC-SHA256 over both nonces),
// unless both sides run --insecure. docs/PROTOCOL.md, "Handshake".
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { ErrorCode, ProtocolError } from '../errors.js';
import { MAX_PAYLOAD } from './frame.js';
import { AUTH, HELLO, HELLO_ACK, NONCE_BYTES, PROOF_BYTES, PROTOCOL_VERSION, READY } from './messages.js';
import type { Channel } from './channel.js';

export { PROTOCOL_VERSION } from './messages.js';
const FLAG_INSECURE = 1;
/** Capability bits; a session uses what both sides announce (the handshake returns the intersection). */
export const CAP_SIMILARITY = 1;
export const CAP_RESUME = 2;
/** zstd-compressed frames (docs/PROTOCOL.md, "Compression"). */
export const CAP_ZSTD = 4;
export const CAPABILITIES = CAP_SIMILARITY | CAP_RESUME | CAP_ZSTD;
/** Largest frame before authentication: the handshake's messages are under 100 bytes. */
export const HANDSHAKE_FRAME_LIMIT = 256;

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
export async function clientHandshake(ch: Channel, o: AuthOptions, capabilities = CAPABILITIES): Promise<number> {
  checkAuth(o);
  ch.setFrameLimit(HANDSHAKE_FRAME_LIMIT);
  const nonceC = randomBytes(NONCE_BYTES);
  await ch.send(HELLO, { version: PROTOCOL_VERSION, flags: o.insecure ? FLAG_INSECURE : 0, capabilities, nonce: nonceC });
  const { version, flags, capabilities: caps, nonce: nonceS, proof: serverProof } = await ch.recv(HELLO_ACK);
  if (version !== PROTOCOL_VERSION) throw new ProtocolError(ErrorCode.PROTOCOL_VERSION, `server speaks protocol version ${version}, this client ${PROTOCOL_VERSION}`);
  if (o.insecure) {
    if (!(flags & FLAG_INSECURE)) throw new ProtocolError(ErrorCode.AUTH_FAILED, 'the server requires authentication');
  } else {
    if (flags & FLAG_INSECURE || !timingSafeEqual(serverProof, proof(o.key!, 'bf-server', nonceC, nonceS))) {
      await ch.sendError(ErrorCode.AUTH_FAILED, 'server failed to prove the key');
      throw new ProtocolError(ErrorCode.AUTH_FAILED, 'the server does not know the key (wrong key, or not the server you meant)');
    }
  }
  await ch.send(AUTH, { proof: o.insecure ? Buffer.alloc(PROOF_BYTES) : proof(o.key!, 'bf-client', nonceS, nonceC) });
  await ch.recv(READY);
  ch.setFrameLimit(MAX_PAYLOAD);
  return caps & capabilities;
}

/** Server side; resolves with the shared capabilities, or sends ERROR and throws. */
export async function serverHandshake(ch: Channel, o: AuthOptions, capabilities = CAPABILITIES): Promise<number> {
  checkAuth(o);
  ch.setFrameLimit(HANDSHAKE_FRAME_LIMIT);
  const { version, flags, capabilities: caps, nonce: nonceC } = await ch.recv(HELLO);
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
  const nonceS = randomBytes(NONCE_BYTES);
  const mine = o.insecure ? Buffer.alloc(PROOF_BYTES) : proof(o.key!, 'bf-server', nonceC, nonceS);
  await ch.send(HELLO_ACK, { version: PROTOCOL_VERSION, flags: o.insecure ? FLAG_INSECURE : 0, capabilities, nonce: nonceS, proof: mine });
  const { proof: auth } = await ch.recv(AUTH);
  if (!o.insecure && !timingSafeEqual(auth, proof(o.key!, 'bf-client', nonceS, nonceC))) {
    await ch.sendError(ErrorCode.AUTH_FAILED, 'wrong key');
    throw new ProtocolError(ErrorCode.AUTH_FAILED, 'client failed to prove the key');
  }
  await ch.send(READY, undefined);
  ch.setFrameLimit(MAX_PAYLOAD);
  return caps & capabilities;
}

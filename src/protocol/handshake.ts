// The handshake: version and capabilities, then mutual authentication with
// a pre-shared key (challenge-response with HMAC-SHA256 over both nonces and
// the TLS connection's exported keying material), unless the TLS layer
// authenticated both sides with certificates, or both sides run --insecure.
// docs/PROTOCOL.md, "Transport" and "Handshake".
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { TLSSocket } from 'node:tls';
import { ErrorCode, ProtocolError } from '../errors.js';
import { MAX_PAYLOAD } from './frame.js';
import { AUTH, HELLO, HELLO_ACK, NONCE_BYTES, PROOF_BYTES, PROTOCOL_VERSION, READY } from './messages.js';
import type { Channel } from './channel.js';
import { EXPORTER_LABEL } from '../transport/tls.js';

export { PROTOCOL_VERSION } from './messages.js';
const FLAG_INSECURE = 1;
/** HELLO flag: the TLS layer authenticated both sides with certificates. */
const FLAG_CERT = 2;
/** Capability bits; a session uses what both sides announce (the handshake returns the intersection). */
export const CAP_SIMILARITY = 1;
export const CAP_RESUME = 2;
/** zstd-compressed frames (docs/PROTOCOL.md, "Compression"). */
export const CAP_ZSTD = 4;
/** The destination can take over before every block arrived and serve the image meanwhile (post-copy, hybrid). */
export const CAP_POSTCOPY = 16;
/** BLOCKS_DELTA: re-sent blocks as the XOR against what the destination holds (docs/PROTOCOL.md, "BLOCKS_DELTA"). */
export const CAP_DELTA = 8;
/**
 * A base-image repository: answers FETCH (docs/PROTOCOL.md, "Repository").
 * Announced by `serve --role repository` only, never by a destination, so a
 * destination pointed at something else learns it at the handshake.
 */
export const CAP_REPOSITORY = 32;
/**
 * SnapMig (paper 000): a backup server answers LAYERS and SEND_LAYER; a
 * destination that announces it takes CHAIN_BEGIN and CHAIN_COMMIT as the
 * first message of a connection (docs/PROTOCOL.md, "SnapMig").
 */
export const CAP_SNAPMIG = 128;
/**
 * Scatter-gather (docs/PROTOCOL.md, "Scatter-gather"): a content store that
 * takes STASH and answers GATHER (`serve --role intermediary`, and a
 * destination's own stage), and a destination that takes SG_PLACE and
 * gathers a run's blocks from where it says.
 */
export const CAP_SCATTER = 64;
export const CAPABILITIES = CAP_SCATTER | CAP_SIMILARITY | CAP_RESUME | CAP_ZSTD | CAP_DELTA | CAP_POSTCOPY;
/** Largest frame before authentication: the handshake's messages are under 100 bytes. */
export const HANDSHAKE_FRAME_LIMIT = 256;

export interface AuthOptions {
  /** The pre-shared key (at least 16 bytes). */
  key?: Buffer;
  /** Plain, unauthenticated TCP: both sides must ask for it (loopback demos). */
  insecure?: boolean;
  /**
   * Set by the roles when TLS authenticated the peer with certificates: the
   * key is then optional (with a key, the proofs are checked as well).
   */
  certificates?: boolean;
}

/** The TLS connection's exporter value (empty on plain TCP): mixed into the proofs, so that a proof made for one connection is worthless on another. */
export function channelBinding(ch: Channel): Buffer {
  const s = ch.socket;
  return s instanceof TLSSocket ? s.exportKeyingMaterial(32, EXPORTER_LABEL, Buffer.alloc(0)) : Buffer.alloc(0);
}

function proof(key: Buffer, label: string, a: Buffer, b: Buffer, binding: Buffer): Buffer {
  return createHmac('sha256', key).update(label).update(a).update(b).update(binding).digest();
}

const flagsOf = (o: AuthOptions) => (o.insecure ? FLAG_INSECURE : 0) | (o.certificates ? FLAG_CERT : 0);
/** Whether this side proves a key (every mode but insecure and certificates without a key). */
const keyed = (o: AuthOptions) => !o.insecure && !!o.key;

function checkAuth(o: AuthOptions): void {
  if (!o.insecure && !o.certificates && (!o.key || o.key.length < 16)) {
    throw new ProtocolError(ErrorCode.AUTH_FAILED, 'a key of at least 16 bytes is required (or --insecure on both sides, for loopback demos)');
  }
}

/** Client side; resolves with the capabilities both sides share. */
export async function clientHandshake(ch: Channel, o: AuthOptions, capabilities = CAPABILITIES): Promise<number> {
  checkAuth(o);
  ch.setFrameLimit(HANDSHAKE_FRAME_LIMIT);
  const binding = channelBinding(ch);
  const nonceC = randomBytes(NONCE_BYTES);
  await ch.send(HELLO, { version: PROTOCOL_VERSION, flags: flagsOf(o), capabilities, nonce: nonceC });
  const { version, flags, capabilities: caps, nonce: nonceS, proof: serverProof } = await ch.recv(HELLO_ACK);
  if (version !== PROTOCOL_VERSION) throw new ProtocolError(ErrorCode.PROTOCOL_VERSION, `server speaks protocol version ${version}, this client ${PROTOCOL_VERSION}`);
  if (o.insecure) {
    if (!(flags & FLAG_INSECURE)) throw new ProtocolError(ErrorCode.AUTH_FAILED, 'the server requires authentication');
  } else if (flags !== flagsOf(o)) {
    await ch.sendError(ErrorCode.AUTH_FAILED, 'authentication modes differ');
    throw new ProtocolError(ErrorCode.AUTH_FAILED, flags & FLAG_INSECURE ? 'the server runs --insecure' : 'the server authenticates another way (certificates or key)');
  } else if (keyed(o) && !timingSafeEqual(serverProof, proof(o.key!, 'bf-server', nonceC, nonceS, binding))) {
    await ch.sendError(ErrorCode.AUTH_FAILED, 'server failed to prove the key');
    throw new ProtocolError(ErrorCode.AUTH_FAILED, 'the server does not know the key (wrong key, or not the server you meant)');
  }
  await ch.send(AUTH, { proof: keyed(o) ? proof(o.key!, 'bf-client', nonceS, nonceC, binding) : Buffer.alloc(PROOF_BYTES) });
  await ch.recv(READY);
  ch.setFrameLimit(MAX_PAYLOAD);
  return caps & capabilities;
}

/** Server side; resolves with the shared capabilities, or sends ERROR and throws. */
export async function serverHandshake(ch: Channel, o: AuthOptions, capabilities = CAPABILITIES): Promise<number> {
  checkAuth(o);
  ch.setFrameLimit(HANDSHAKE_FRAME_LIMIT);
  const binding = channelBinding(ch);
  const { version, flags, capabilities: caps, nonce: nonceC } = await ch.recv(HELLO);
  if (version !== PROTOCOL_VERSION) {
    await ch.sendError(ErrorCode.PROTOCOL_VERSION, `server speaks protocol version ${PROTOCOL_VERSION}, client ${version}`);
    throw new ProtocolError(ErrorCode.PROTOCOL_VERSION, `client speaks protocol version ${version}`);
  }
  if (flags !== flagsOf(o)) {
    const msg = o.insecure ? 'this server runs --insecure; the client must too'
      : flags & FLAG_INSECURE ? 'this server requires authentication; insecure clients are refused'
      : o.certificates ? 'this server authenticates with certificates' : 'this server authenticates with a pre-shared key';
    await ch.sendError(ErrorCode.AUTH_FAILED, msg);
    throw new ProtocolError(ErrorCode.AUTH_FAILED, msg);
  }
  const nonceS = randomBytes(NONCE_BYTES);
  const mine = keyed(o) ? proof(o.key!, 'bf-server', nonceC, nonceS, binding) : Buffer.alloc(PROOF_BYTES);
  await ch.send(HELLO_ACK, { version: PROTOCOL_VERSION, flags: flagsOf(o), capabilities, nonce: nonceS, proof: mine });
  const { proof: auth } = await ch.recv(AUTH);
  if (keyed(o) && !timingSafeEqual(auth, proof(o.key!, 'bf-client', nonceS, nonceC, binding))) {
    await ch.sendError(ErrorCode.AUTH_FAILED, 'wrong key');
    throw new ProtocolError(ErrorCode.AUTH_FAILED, 'client failed to prove the key');
  }
  await ch.send(READY, undefined);
  ch.setFrameLimit(MAX_PAYLOAD);
  return caps & capabilities;
}

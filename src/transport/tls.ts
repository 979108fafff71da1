// TLS 1.3 over the TCP transport (node:tls, OpenSSL). Two ways to
// authenticate, both mutual:
//   - certificates: each side presents a certificate signed by the CA the
//     other trusts; the client checks the server's name (the host it dials,
//     or an explicit servername).
//   - a pre-shared key: TLS 1.3 external PSK (psk_dhe_ke: the PSK
//     authenticates, an ephemeral ECDHE share gives forward secrecy). The TLS
//     PSK is derived from the key, never the key itself. The protocol's HMAC
//     proofs still run on top, bound to this TLS connection by an exporter
//     (handshake.ts), so a proof cannot be relayed to another connection.
// Plain TCP (tcp.ts) only when both sides ask for --insecure.
// docs/PROTOCOL.md, "Transport"; docs/SECURITY.md.
import { createHmac } from 'node:crypto';
import { isIP, type Socket } from 'node:net';
import { connect as tlsConnect, createSecureContext, TLSSocket, type SecureContext } from 'node:tls';
import { ErrorCode, InvalidArgumentError, ProtocolError } from '../errors.js';
import { parseTarget, type Target } from './tcp.js';

/** Certificates for mutual TLS: PEM text (or Buffers holding PEM). */
export interface TlsOptions {
  /** This side's certificate chain. */
  cert: string | Buffer;
  /** Its private key. */
  key: string | Buffer;
  /** The CA(s) that must have signed the peer's certificate (and only those: the system store is not used). */
  ca: string | Buffer | Array<string | Buffer>;
  /** Client only: the name the server's certificate must carry (default: the host dialled). */
  servername?: string;
}

/** How one side protects its connections. */
export type Security =
  | { mode: 'insecure' }
  | { mode: 'psk'; key: Buffer }
  | { mode: 'cert'; tls: TlsOptions };

/** Label of the keying-material exporter that binds the handshake's proofs to one TLS connection (RFC 8446 §7.5). */
export const EXPORTER_LABEL = 'EXPORTER-blockferry';
const PSK_IDENTITY = 'blockferry';
/** TLS 1.3 suites usable with a PSK in OpenSSL (the PSK's hash must be SHA-256); AES-GCM first (AES-NI). */
const PSK_CIPHERS = 'TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256';
/** Certificate mode: TLS 1.3's suites, AES-128-GCM first (as strong here, and the fastest with AES-NI). */
const CERT_CIPHERS = 'TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256';

/** The TLS PSK for a blockferry key: HMAC-SHA256(key, label), 32 bytes. */
export function tlsPsk(key: Buffer): Buffer {
  return createHmac('sha256', key).update('blockferry tls13 external psk').digest();
}

/** Which mode options ask for: insecure, certificates (when given), else the pre-shared key. */
export function securityFrom(auth: { key?: Buffer; insecure?: boolean }, tls?: TlsOptions): Security {
  if (auth.insecure) {
    if (tls) throw new InvalidArgumentError('tls', 'no certificates with insecure (plain TCP)', 'certificates');
    return { mode: 'insecure' };
  }
  if (tls) {
    for (const f of ['cert', 'key', 'ca'] as const) if (!tls[f] || (Array.isArray(tls[f]) && !(tls[f] as unknown[]).length)) throw new InvalidArgumentError(`tls.${f}`, 'PEM text', tls[f]);
    return { mode: 'cert', tls };
  }
  if (!auth.key || auth.key.length < 16) {
    throw new ProtocolError(ErrorCode.AUTH_FAILED, 'a key of at least 16 bytes or certificates (cert, key, ca) are required (or --insecure on both sides, for loopback demos)');
  }
  return { mode: 'psk', key: auth.key };
}

/** Node/OpenSSL verification codes that mean "this certificate is not acceptable". */
const CERT_CODES = new Set([
  'CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID', 'ERR_TLS_CERT_ALTNAME_INVALID', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT', 'UNABLE_TO_GET_ISSUER_CERT', 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'CERT_SIGNATURE_FAILURE', 'CERT_UNTRUSTED',
  'CERT_REJECTED', 'CERT_REVOKED', 'INVALID_CA', 'INVALID_PURPOSE', 'HOSTNAME_MISMATCH', 'IP_ADDRESS_MISMATCH', 'CERT_CHAIN_TOO_LONG',
]);

/**
 * A TLS or connection failure as a blockferry error with a stable code:
 * ERR_BF_TLS_CERT for a certificate refused (expired, another name, another
 * CA; by this side or, as an alert, by the peer), ERR_BF_AUTH_FAILED for a PSK
 * the peer does not share or a peer that does not speak TLS, else undefined.
 */
export function tlsError(e: Error & { code?: string }): ProtocolError | undefined {
  const code = e.code ?? '';
  if (CERT_CODES.has(code)) return new ProtocolError(ErrorCode.TLS_CERT, `certificate refused: ${code}: ${e.message}`, undefined, { cause: e });
  if (!code.startsWith('ERR_SSL_')) return undefined;
  if (/CERTIFICATE|UNKNOWN_CA|BAD_CERT|NO_CERT|PEER_DID_NOT_RETURN/.test(code)) {
    return new ProtocolError(ErrorCode.TLS_CERT, `the peer refused this side's certificate (${code})`, undefined, { cause: e });
  }
  if (/BINDER|ILLEGAL_PARAMETER|DECRYPT_ERROR|PSK|HANDSHAKE_FAILURE|NO_SHARED_CIPHER|NO_SUITABLE/.test(code)) {
    return new ProtocolError(ErrorCode.AUTH_FAILED, `TLS handshake failed (${code}): wrong key, or the peer authenticates another way (certificates or key)`, undefined, { cause: e });
  }
  if (/WRONG_VERSION_NUMBER|PACKET_LENGTH_TOO_LONG|RECORD_LAYER|UNSUPPORTED_PROTOCOL|HTTP_REQUEST/.test(code)) {
    return new ProtocolError(ErrorCode.AUTH_FAILED, `the peer does not speak TLS 1.3 (${code}): is it running --insecure?`, undefined, { cause: e });
  }
  return new ProtocolError(ErrorCode.CONNECTION, `TLS failed: ${code}: ${e.message}`, undefined, { cause: e });
}

/** A connected, handshaken TLS socket to `to` (TLS 1.3 only). */
export async function connect(to: string | Target, security: Exclude<Security, { mode: 'insecure' }>): Promise<TLSSocket> {
  const target = typeof to === 'string' ? parseTarget(to) : to;
  const common = { host: target.host, port: target.port, minVersion: 'TLSv1.3' as const, maxVersion: 'TLSv1.3' as const };
  let socket: TLSSocket;
  if (security.mode === 'psk') {
    const psk = tlsPsk(security.key);
    socket = tlsConnect({
      ...common, ciphers: PSK_CIPHERS,
      // No certificate in PSK mode: the PSK binder authenticates the server. A
      // server that answers with a certificate instead is refused below.
      rejectUnauthorized: false,
      checkServerIdentity: () => undefined,
      pskCallback: () => ({ psk, identity: PSK_IDENTITY }),
    });
  } else {
    const t = security.tls;
    const servername = t.servername ?? (isIP(target.host) ? undefined : target.host);
    socket = tlsConnect({
      ...common, ciphers: CERT_CIPHERS, cert: t.cert, key: t.key, ca: t.ca, rejectUnauthorized: true,
      // The name checked (and sent as SNI): the explicit one, else the host dialled (an address is checked against the certificate's IP names).
      ...(servername ? { servername } : {}),
    });
  }
  await new Promise<void>((res, rej) => {
    socket.once('secureConnect', () => res());
    socket.once('error', (e: Error & { code?: string }) => {
      socket.destroy();
      rej(tlsError(e) ?? new ProtocolError(ErrorCode.CONNECTION, `cannot connect to ${target.host}:${target.port}: ${e.message}`, undefined, { cause: e }));
    });
  });
  if (security.mode === 'psk' && socket.getPeerCertificate()?.raw) {
    socket.destroy();
    throw new ProtocolError(ErrorCode.AUTH_FAILED, 'the server answered with a certificate, not the pre-shared key: it runs with certificates (give --cert, --key and --ca)');
  }
  socket.setKeepAlive(true, 10_000);
  return socket;
}

/** What a server needs to wrap accepted connections: built once per service. */
export interface ServerTls {
  security: Exclude<Security, { mode: 'insecure' }>;
  context: SecureContext;
  psk?: Buffer;
}

export function serverTls(security: Exclude<Security, { mode: 'insecure' }>): ServerTls {
  if (security.mode === 'psk') {
    return { security, context: createSecureContext({ minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3', ciphers: PSK_CIPHERS }), psk: tlsPsk(security.key) };
  }
  const t = security.tls;
  let context: SecureContext;
  try {
    context = createSecureContext({ minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3', ciphers: CERT_CIPHERS, cert: t.cert, key: t.key, ca: t.ca });
  } catch (e) {
    throw new ProtocolError(ErrorCode.TLS_CERT, `cannot use the certificate, key or CA: ${(e as Error).message}`, undefined, { cause: e });
  }
  return { security, context };
}

/**
 * The server side of TLS over an accepted TCP socket. Resolves once the TLS
 * handshake is done; with certificates the client's certificate is then
 * checked: `refused` says why it is not acceptable (the caller tells the
 * client over TLS, then closes).
 */
export function wrapServer(raw: Socket, s: ServerTls): { socket: TLSSocket; secure: Promise<{ refused?: string }> } {
  const psk = s.psk;
  const socket = new TLSSocket(raw, {
    isServer: true,
    secureContext: s.context,
    // Certificates are checked after the handshake (below), so that a refused client learns why.
    requestCert: s.security.mode === 'cert',
    rejectUnauthorized: false,
    ...(psk ? { pskCallback: (_s: TLSSocket, identity: string) => (identity === PSK_IDENTITY ? psk : null) } : {}),
  } as ConstructorParameters<typeof TLSSocket>[1]);
  const secure = new Promise<{ refused?: string }>((res, rej) => {
    socket.once('secure', () => {
      if (s.security.mode !== 'cert') return res({});
      // What tls.Server does for its sockets (onServerSocketSecure), done here for a socket wrapped by hand.
      const cert = socket.getPeerCertificate();
      if (!cert || !cert.raw) return res({ refused: 'no client certificate' });
      const handle = (socket as unknown as { _handle?: { verifyError?: () => (Error & { code?: string }) | null } })._handle;
      const err: (Error & { code?: string }) | null = handle?.verifyError ? handle.verifyError() : new Error('cannot verify');
      res(err ? { refused: err.code ?? err.message } : {});
    });
    socket.once('error', (e: Error & { code?: string }) => {
      socket.destroy(); // a TLS socket that failed is finished (no server object to do it)
      rej(tlsError(e) ?? new ProtocolError(ErrorCode.CONNECTION, `TLS failed: ${e.message}`, undefined, { cause: e }));
    });
    socket.once('close', () => rej(new ProtocolError(ErrorCode.CONNECTION, 'connection closed during the TLS handshake')));
  });
  secure.catch(() => {});
  return { socket, secure };
}

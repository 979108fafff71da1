// The door every role's service keeps: TLS (PSK or certificates) or plain
// TCP, a deadline and a few slots for connections that have not
// authenticated yet, and the failure of one connection reported to its peer
// and logged without touching the others. The destination and the
// repository both serve through it (one place to harden).
import type { Socket } from 'node:net';
import { BlockferryError, ErrorCode, ProtocolError, isNoSpace } from '../errors.js';
import { Channel } from '../protocol/channel.js';
import { HANDSHAKE_FRAME_LIMIT } from '../protocol/handshake.js';
import { encodeHeader, Msg } from '../protocol/frame.js';
import { encode, ERROR } from '../protocol/messages.js';
import { wrapServer, type ServerTls } from '../transport/tls.js';
import type { Logger } from '../log.js';
import type { AuthOptions } from '../protocol/handshake.js';
import type { TlsOptions } from '../transport/tls.js';

/** Where a service listens and how its clients authenticate: the same four options for every role. */
export interface ListenOptions {
  /** Address to listen on (default: every address). */
  host?: string;
  /** Port (default: one the system picks; `address` tells it). */
  port?: number;
  /** A pre-shared key (TLS 1.3 with that PSK), or insecure (plain TCP); with `tls`, the key is optional. */
  auth: AuthOptions;
  /** Certificates: mutual TLS 1.3; a client must present a certificate signed by `tls.ca`. */
  tls?: TlsOptions;
}

export interface GateOptions {
  /** Milliseconds a connection has to authenticate (TLS and the protocol's handshake) before it is closed. Default 5000. */
  handshakeTimeout?: number;
  /** Connections not yet authenticated, at most, from one remote address (default 8) and in total (default 64). */
  maxUnauthenticatedPerAddress?: number;
  maxUnauthenticated?: number;
}

export class Gate {
  readonly sockets = new Set<Socket>();
  /** Connections not yet authenticated: per remote address, and in total. */
  private readonly unauthenticated = new Map<string, number>();
  private unauthenticatedTotal = 0;
  /** Connections closed by the limits before authentication: over a cap, or past the handshake deadline. */
  readonly limited = { overCap: 0, deadline: 0 };

  constructor(
    private readonly options: GateOptions,
    private readonly tls: ServerTls | undefined,
    private readonly logger: Logger,
    /** What a failed connection was, for the log ("migration", "fetch"). */
    private readonly what: string,
  ) {}

  /**
   * A new TCP connection. Until it authenticates it holds one of a few slots
   * (per remote address and in total; none free: closed at once) and has
   * handshakeTimeout to finish TLS and the handshake; frames are limited to
   * HANDSHAKE_FRAME_LIMIT meanwhile. After, the Channel bounds what it queues.
   * `serve` calls `authenticated` once the handshake is done.
   */
  accept(raw: Socket, serve: (ch: Channel, authenticated: () => void) => Promise<void>): void {
    this.sockets.add(raw);
    raw.on('close', () => this.sockets.delete(raw));
    const o = this.options;
    const addr = raw.remoteAddress ?? '?';
    const fromAddr = this.unauthenticated.get(addr) ?? 0;
    if (this.unauthenticatedTotal >= (o.maxUnauthenticated ?? 64) || fromAddr >= (o.maxUnauthenticatedPerAddress ?? 8)) {
      this.limited.overCap++;
      raw.on('error', () => {});
      raw.destroy();
      return;
    }
    this.unauthenticatedTotal++;
    this.unauthenticated.set(addr, fromAddr + 1);
    let pending = true;
    let expired = false;
    const release = () => {
      if (!pending) return;
      pending = false;
      clearTimeout(deadline);
      this.unauthenticatedTotal--;
      const left = (this.unauthenticated.get(addr) ?? 1) - 1;
      if (left > 0) this.unauthenticated.set(addr, left);
      else this.unauthenticated.delete(addr);
    };
    const deadline = setTimeout(() => {
      expired = true;
      this.limited.deadline++;
      this.logger.warn({ peer: addr, code: ErrorCode.LIMIT }, `connection from ${addr} closed: ${ErrorCode.LIMIT}: not authenticated within ${o.handshakeTimeout ?? 5000} ms`);
      socket.destroy();
      raw.destroy();
    }, o.handshakeTimeout ?? 5000);
    raw.once('close', release);
    raw.on('error', () => {}); // reported through the channel (or the TLS socket) above it
    const tls = this.tls;
    // The socket the channel speaks over: raw, or the TLS socket that takes over raw's handle (only it reports 'close' then).
    let socket: Socket = raw;
    void (async () => {
      let secure: Promise<{ refused?: string }> | undefined;
      if (tls) {
        // A plain-TCP blockferry client (--insecure) gets a readable refusal instead of a TLS error.
        const first = await firstByte(raw);
        if (first === undefined) return;
        if (first !== TLS_HANDSHAKE_RECORD) {
          refusePlain(raw, 'this server requires TLS; insecure (plain TCP) clients are refused');
          return;
        }
        ({ socket, secure } = wrapServer(raw, tls));
        const wrapped = socket;
        this.sockets.add(wrapped);
        wrapped.once('close', () => { this.sockets.delete(wrapped); release(); });
        wrapped.on('error', () => {});
      }
      const ch = new Channel(socket, { frameLimit: HANDSHAKE_FRAME_LIMIT });
      try {
        if (secure) {
          const { refused } = await secure;
          if (refused) throw new ProtocolError(ErrorCode.TLS_CERT, `client certificate refused: ${refused}`);
        }
        await serve(ch, release);
      } catch (err) {
        const e = err as Error;
        const code = isNoSpace(e) ? ErrorCode.NO_SPACE : e instanceof BlockferryError ? e.code : ErrorCode.INTERNAL;
        if (!expired) this.logger.warn({ peer: addr, code, error: e.message }, `${this.what} from ${addr} failed: ${code}: ${e.message}`);
        // Unless the handshake has told the peer already (a write after end would cut TLS short).
        if (!socket.writableEnded) await ch.sendError(code, e.message);
        // Closed for good, even if the peer never reads the error.
        setTimeout(() => socket.destroy(), 2000).unref();
      }
    })();
  }

  /** Ends every connection. */
  destroyAll(): void {
    for (const s of this.sockets) s.destroy();
  }
}

/** First byte of a TLS connection: a handshake record (ClientHello). A blockferry frame starts with its length's low byte. */
const TLS_HANDSHAKE_RECORD = 0x16;

/** Waits for the first byte without consuming it (undefined: the connection ended first). */
function firstByte(raw: Socket): Promise<number | undefined> {
  return new Promise((res) => {
    const onReadable = () => {
      const b = raw.read() as Buffer | null;
      if (!b) return;
      cleanup();
      raw.unshift(b);
      res(b[0]);
    };
    const onEnd = () => { cleanup(); res(undefined); };
    const cleanup = () => { raw.off('readable', onReadable); raw.off('end', onEnd); raw.off('close', onEnd); };
    raw.on('readable', onReadable);
    raw.once('end', onEnd);
    raw.once('close', onEnd);
  });
}

/** An ERROR frame in plain text, then close: for a client that speaks the protocol without TLS. */
function refusePlain(raw: Socket, message: string): void {
  const payload = encode(ERROR, { code: ErrorCode.AUTH_FAILED, message });
  // Nothing more is read from it: closed as soon as the refusal is written.
  raw.end(Buffer.concat([encodeHeader(Msg.ERROR, payload.length), payload]), () => raw.destroy());
  setTimeout(() => raw.destroy(), 2000).unref();
}

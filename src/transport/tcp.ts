// Connections between hosts: TCP now (TLS is the next entry here). Roles and
// migrations get a connected socket from connect() or listen() and never
// deal with addresses themselves.
import { connect as netConnect, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { BlockferryError, ErrorCode, InvalidArgumentError, ProtocolError } from '../errors.js';

export interface Target {
  host: string;
  port: number;
}

/** "HOST:PORT" or "[V6]:PORT". */
export function parseTarget(to: string): Target {
  const m = /^\[?([^\]]+?)\]?:(\d{1,5})$/.exec(to);
  if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) throw new InvalidArgumentError('to', 'HOST:PORT', to);
  return { host: m[1]!, port: Number(m[2]) };
}

/** A connected socket to `to`; a refused or unreachable peer is ERR_BF_CONNECTION. */
export async function connect(to: string | Target): Promise<Socket> {
  const target = typeof to === 'string' ? parseTarget(to) : to;
  const socket = netConnect({ host: target.host, port: target.port });
  await new Promise<void>((res, rej) => {
    socket.once('connect', () => res());
    socket.once('error', (e) => rej(new ProtocolError(ErrorCode.CONNECTION, `cannot connect to ${target.host}:${target.port}: ${e.message}`, undefined, { cause: e })));
  });
  socket.setKeepAlive(true, 10_000);
  return socket;
}

export interface Listener {
  readonly address: Target;
  close(): Promise<void>;
}

/** Listens on host:port (port 0: any free port) and hands every connection to onConnection. */
export async function listen(host: string, port: number, onConnection: (s: Socket) => void): Promise<Listener> {
  const server: Server = createServer((s) => {
    s.setKeepAlive(true, 10_000);
    onConnection(s);
  });
  await new Promise<void>((res, rej) => {
    server.once('error', (e: NodeJS.ErrnoException) => rej(listenFailure(e, `${host}:${port}`)));
    server.listen(port, host, () => res());
  });
  const a = server.address() as AddressInfo;
  return {
    address: { host: a.address, port: a.port },
    close: () => new Promise<void>((res) => server.close(() => res())),
  };
}

/**
 * A failure to listen on `where` (HOST:PORT or a Unix socket path) as a
 * stable code: ADDRESS_IN_USE when another socket has it, ADDRESS_UNAVAILABLE
 * when it cannot be bound here; anything else keeps the system's message.
 */
export function listenFailure(e: unknown, where: string): BlockferryError {
  const errno = (e as NodeJS.ErrnoException).code;
  if (errno === 'EADDRINUSE') return new BlockferryError(ErrorCode.ADDRESS_IN_USE, `cannot listen on ${where}: the address is in use (another service runs there?)`, { cause: e });
  const why: Record<string, string> = {
    EADDRNOTAVAIL: 'not an address of this host', EACCES: 'not permitted', EPERM: 'not permitted', ENOTFOUND: 'unknown host name',
    EAI_AGAIN: 'unknown host name', ENOENT: 'its directory does not exist', ENOTDIR: 'its directory does not exist', EINVAL: 'not a usable address (a path too long?)',
    EAFNOSUPPORT: 'address family not supported', ENAMETOOLONG: 'the path is too long',
  };
  if (errno && why[errno]) return new BlockferryError(ErrorCode.ADDRESS_UNAVAILABLE, `cannot listen on ${where}: ${why[errno]}`, { cause: e });
  return new BlockferryError(ErrorCode.INVALID_ARGUMENT, `cannot listen on ${where}: ${(e as Error).message}`, { cause: e });
}

// A role is a long-running service that serves authenticated connections:
// the destination, the repository, a backup server, an intermediary. Each
// decides nothing about policy: it answers the messages a source sends.
import { checkAborted } from '../errors.js';
import type { Channel } from '../protocol/channel.js';

export interface Role {
  /** The role's name (`blockferry serve --role NAME`). */
  readonly name: string;
  /** Serves one connection, from its handshake to its end. */
  serve(ch: Channel): Promise<void>;
  close(): Promise<void>;
}

/**
 * Ties a service that has just started to its `signal`: aborted already, the
 * service is closed and start() rejects (ERR_BF_ABORTED); aborted later, it
 * is closed. Returns what unties them, for the service's own close().
 */
export async function closeOnAbort(svc: { close(): Promise<void> }, signal: AbortSignal | undefined, what: string): Promise<() => void> {
  if (!signal) return () => {};
  if (signal.aborted) {
    await svc.close();
    checkAborted(signal, what);
  }
  const stop = () => void svc.close();
  signal.addEventListener('abort', stop, { once: true });
  return () => signal.removeEventListener('abort', stop);
}

// A role is a long-running service that serves authenticated connections:
// the destination now; a backup server, an intermediary, a repository later.
// Each decides nothing about policy: it answers the messages a source sends.
import type { Channel } from '../protocol/channel.js';

export interface Role {
  /** The role's name (`blockferry serve --role NAME`). */
  readonly name: string;
  /** Serves one connection, from its handshake to its end. */
  serve(ch: Channel): Promise<void>;
  close(): Promise<void>;
}

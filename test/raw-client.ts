// A raw protocol client for tests that play a peer frame by frame:
// connected and authenticated, nothing else.
import { connect } from 'node:net';
import { Channel } from '../src/protocol/channel.js';
import { clientHandshake, type AuthOptions } from '../src/protocol/handshake.js';

export async function rawClient(port: number, auth: AuthOptions): Promise<Channel> {
  const s = connect(port, '127.0.0.1');
  await new Promise((r, j) => { s.once('connect', r); s.once('error', j); });
  s.on('error', () => {});
  const ch = new Channel(s);
  await clientHandshake(ch, auth);
  return ch;
}

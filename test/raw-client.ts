// A raw protocol client for tests that play a peer frame by frame:
// connected (TLS with the pre-shared key, or plain TCP when insecure) and
// authenticated, nothing else.
import { connect } from 'node:net';
import { Channel } from '../src/protocol/channel.js';
import { clientHandshake, type AuthOptions } from '../src/protocol/handshake.js';
import { connect as tlsConnect } from '../src/transport/tls.js';

export async function rawClient(port: number, auth: AuthOptions): Promise<Channel> {
  let s;
  if (auth.insecure) {
    s = connect(port, '127.0.0.1');
    await new Promise((r, j) => { s!.once('connect', r); s!.once('error', j); });
  } else {
    s = await tlsConnect({ host: '127.0.0.1', port }, { mode: 'psk', key: auth.key! });
  }
  s.on('error', () => {});
  const ch = new Channel(s);
  await clientHandshake(ch, auth);
  return ch;
}

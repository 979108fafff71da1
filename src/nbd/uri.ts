// NBD URIs (doc/uri.md of the NBD project): nbd://HOST[:PORT]/EXPORT over
// TCP, nbd+unix:///EXPORT?socket=PATH over a Unix socket. The export name is
// the path without its leading '/', percent-decoded; it may be empty. TLS
// schemes (nbds, nbds+unix) are refused: this client does not speak TLS, and
// the specification forbids falling back to plain text for them.
import { InvalidArgumentError } from '../errors.js';
import { NBD_MAX_STRING } from './protocol.js';

/** The IANA port of NBD. */
export const NBD_DEFAULT_PORT = 10809;

/** Where an NBD export is: a TCP host and port, or a Unix socket path; and the export's name. */
export type NbdTarget =
  | { transport: 'tcp'; host: string; port: number; exportName: string }
  | { transport: 'unix'; socket: string; exportName: string };

/** Whether a location names an image by URI (scheme://...) rather than by path. */
export function isUri(location: string): boolean {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(location);
}

/** Parses an NBD URI; an INVALID_ARGUMENT error says what is wrong with it. */
export function parseNbdUri(uri: string): NbdTarget {
  const bad = (why: string) => new InvalidArgumentError('NBD URI', `nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (${why})`, uri);
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw bad('not a URI');
  }
  const scheme = u.protocol.slice(0, -1).toLowerCase();
  if (scheme === 'nbds' || scheme === 'nbds+unix') throw bad('TLS is not supported');
  if (scheme !== 'nbd' && scheme !== 'nbd+unix') throw bad(`unknown scheme ${scheme}`);
  if (u.username || u.password) throw bad('user information is only for TLS');
  let exportName: string;
  try {
    exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  } catch {
    throw bad('bad percent-encoding in the export name');
  }
  if (exportName.includes('\0') || Buffer.byteLength(exportName) > NBD_MAX_STRING) throw bad(`an export name of at most ${NBD_MAX_STRING} bytes without NUL`);
  const params = [...u.searchParams.keys()];
  if (scheme === 'nbd') {
    if (params.length) throw bad(`unknown query parameter ${params[0]}`);
    if (!u.hostname) throw bad('no host');
    const port = u.port ? Number(u.port) : NBD_DEFAULT_PORT;
    // WHATWG URL keeps the brackets of an IPv6 literal; net.connect wants it bare.
    return { transport: 'tcp', host: u.hostname.replace(/^\[(.*)\]$/, '$1'), port, exportName };
  }
  if (u.host) throw bad('a Unix socket URI has no host: nbd+unix:///EXPORT?socket=PATH');
  const unknown = params.find((p) => p !== 'socket');
  if (unknown) throw bad(`unknown query parameter ${unknown}`);
  const socket = u.searchParams.get('socket');
  if (!socket) throw bad('no socket= parameter');
  return { transport: 'unix', socket, exportName };
}

/** The URI of a target (for messages, and to name another export on the same server). */
export function formatNbdUri(t: NbdTarget): string {
  const name = t.exportName.split('/').map(encodeURIComponent).join('/');
  if (t.transport === 'unix') return `nbd+unix:///${name}?socket=${encodeURIComponent(t.socket)}`;
  const host = t.host.includes(':') ? `[${t.host}]` : t.host;
  return `nbd://${host}:${t.port}/${name}`;
}

// Throwaway PKI for the TLS tests, made with the openssl command: a CA, a
// server certificate for localhost and 127.0.0.1, a client certificate, and
// the bad ones (expired, another name, another CA).
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface Pki {
  dir: string;
  ca: Buffer;
  server: { cert: Buffer; key: Buffer };
  client: { cert: Buffer; key: Buffer };
  expiredServer: { cert: Buffer; key: Buffer };
  otherNameServer: { cert: Buffer; key: Buffer };
  otherCaServer: { cert: Buffer; key: Buffer };
  otherCaClient: { cert: Buffer; key: Buffer };
  expiredClient: { cert: Buffer; key: Buffer };
  /** File paths for the CLI. */
  files: Record<'ca' | 'serverCert' | 'serverKey' | 'clientCert' | 'clientKey', string>;
}

const ossl = (dir: string, ...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });

function ca(dir: string, name: string): void {
  ossl(dir, 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.pem`, '-days', '2', '-subj', `/CN=${name}`);
}

function leaf(dir: string, caName: string, name: string, cn: string, san: string, days: number): { cert: Buffer; key: Buffer } {
  ossl(dir, 'req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`);
  writeFileSync(join(dir, `${name}.ext`), `subjectAltName=${san}\n`);
  ossl(dir, 'x509', '-req', '-in', `${name}.csr`, '-CA', `${caName}.pem`, '-CAkey', `${caName}.key`, '-CAcreateserial', '-days', String(days), '-extfile', `${name}.ext`, '-out', `${name}.pem`);
  return { cert: readFileSync(join(dir, `${name}.pem`)), key: readFileSync(join(dir, `${name}.key`)) };
}

/** Builds the PKI in dir (which must exist). */
export function makePki(dir: string): Pki {
  ca(dir, 'ca');
  ca(dir, 'otherca');
  const server = leaf(dir, 'ca', 'server', 'localhost', 'DNS:localhost,IP:127.0.0.1', 2);
  const client = leaf(dir, 'ca', 'client', 'source-1', 'DNS:source-1', 2);
  return {
    dir,
    ca: readFileSync(join(dir, 'ca.pem')),
    server,
    client,
    // -days -1: notAfter a day before notBefore (now): expired.
    expiredServer: leaf(dir, 'ca', 'expired', 'localhost', 'DNS:localhost,IP:127.0.0.1', -1),
    otherNameServer: leaf(dir, 'ca', 'othername', 'elsewhere.example', 'DNS:elsewhere.example,IP:10.9.9.9', 2),
    otherCaServer: leaf(dir, 'otherca', 'othercaserver', 'localhost', 'DNS:localhost,IP:127.0.0.1', 2),
    otherCaClient: leaf(dir, 'otherca', 'othercaclient', 'source-2', 'DNS:source-2', 2),
    expiredClient: leaf(dir, 'ca', 'expiredclient', 'source-3', 'DNS:source-3', -1),
    files: {
      ca: join(dir, 'ca.pem'), serverCert: join(dir, 'server.pem'), serverKey: join(dir, 'server.key'),
      clientCert: join(dir, 'client.pem'), clientKey: join(dir, 'client.key'),
    },
  };
}

// The destination's disk fills up during a migration: a small ext4 in a
// loop-mounted file. Expect a clear ERR_BF_* error (not a crash), the
// partial image and its journal kept, and a resume that completes once space
// is freed. Needs root for mount; otherwise skipped, with the reason.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../../src/roles/destination/service.js';
import { migrate } from '../../src/migrate/migrate.js';
import { seededBytes } from '../util.js';

export interface DiskFullResult { skipped?: string; error?: { code: string; remoteCode?: string; message: string }; journalKept?: boolean; partialKept?: boolean; serviceAlive?: boolean; resumed?: number; identical?: boolean }

export async function diskFull(log?: (s: string) => void): Promise<DiskFullResult> {
  const dir = mkdtempSync(join(tmpdir(), 'bf-full-'));
  const fsFile = join(dir, 'fs.ext4');
  const mnt = join(dir, 'mnt');
  mkdirSync(mnt);
  try {
    writeFileSync(fsFile, Buffer.alloc(0));
    execFileSync('truncate', ['-s', '64M', fsFile]);
    execFileSync('mkfs.ext4', ['-q', '-F', fsFile], { stdio: 'ignore' });
    execFileSync('mount', ['-o', 'loop', fsFile, mnt], { stdio: 'pipe' });
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    return { skipped: `cannot loop-mount an ext4 here (${(e as Error).message.split('\n')[0]})` };
  }
  const key = Buffer.from('blockferry-diskfull-key-0123456789');
  let svc: DestinationService | undefined;
  try {
    // 40 MiB of filler leaves about 10 MiB for a 24 MiB image.
    execFileSync('dd', ['if=/dev/zero', `of=${join(mnt, 'filler')}`, 'bs=1M', 'count=40', 'status=none']);
    const image = join(dir, 'src.img');
    const data = Buffer.from(seededBytes(77, 24 << 20));
    writeFileSync(image, data);
    const dataDir = join(mnt, 'dst');
    const logs: string[] = [];
    svc = await DestinationService.start({ dataDir, auth: { key }, log: (l) => logs.push(l) });
    const to = `127.0.0.1:${svc.address.port}`;
    const out: DiskFullResult = {};
    try {
      await migrate(image, { to, name: 'vm', auth: { key }, strategy: 'full', compress: { mode: 'none' } });
      out.error = { code: 'none', message: 'the migration did not fail' };
    } catch (e) {
      const x = e as { code: string; remoteCode?: string; message: string };
      out.error = { code: x.code, ...(x.remoteCode ? { remoteCode: x.remoteCode } : {}), message: x.message };
    }
    log?.(`disk full: ${JSON.stringify(out.error)}; service log: ${logs.at(-1)}`);
    out.journalKept = existsSync(join(dataDir, 'vm.img.journal'));
    out.partialKept = existsSync(join(dataDir, 'vm.img.partial'));
    rmSync(join(mnt, 'filler'));
    const r = await migrate(image, { to, name: 'vm', auth: { key }, strategy: 'full', compress: { mode: 'none' } });
    out.serviceAlive = true;
    out.resumed = r.blocks.resumed;
    out.identical = readFileSync(join(dataDir, 'vm.img')).equals(data);
    return out;
  } finally {
    await svc?.close();
    try { execFileSync('umount', [mnt]); } catch { /* already gone */ }
    rmSync(dir, { recursive: true, force: true });
  }
}

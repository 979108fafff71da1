// kill -9 of the source or the destination at a random point of a
// migration, then the same migration again: the destination must end
// byte-identical to the source (resuming from its journal when it can).
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { seededBytes, rng } from '../util.js';

const bin = new URL('../../../bin/blockferry.js', import.meta.url).pathname;

export interface KillCounts { runs: number; identical: number; killedSource: number; killedDestination: number; finishedBeforeKill: number; resumedWithKeptBlocks: number; failures: string[] }

function serve(dataDir: string, keyFile: string): Promise<{ p: ChildProcess; port: number }> {
  const p = spawn(process.execPath, [bin, 'serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir, '--key-file', keyFile], { stdio: ['ignore', 'pipe', 'ignore'] });
  return new Promise((res, rej) => {
    p.stdout!.once('data', (d: Buffer) => res({ p, port: JSON.parse(d.toString()).port }));
    p.once('exit', (c) => rej(new Error(`serve exited ${c}`)));
  });
}

function run(args: string[]): { p: ChildProcess; done: Promise<{ code: number | null; out: string; err: string }> } {
  const p = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  p.stdout!.on('data', (d) => (out += d));
  p.stderr!.on('data', (d) => (err += d));
  return { p, done: new Promise((res) => p.once('exit', (code) => res({ code, out, err }))) };
}

const exited = (p: ChildProcess) => new Promise<void>((r) => (p.exitCode !== null || p.signalCode !== null ? r() : p.once('exit', () => r())));

export async function killResume(count: number, log?: (s: string) => void, imageMiB = 16, seed = 9): Promise<KillCounts> {
  const c: KillCounts = { runs: 0, identical: 0, killedSource: 0, killedDestination: 0, finishedBeforeKill: 0, resumedWithKeptBlocks: 0, failures: [] };
  const dir = mkdtempSync(join(tmpdir(), 'bf-kill-'));
  const keyFile = join(dir, 'key');
  writeFileSync(keyFile, 'blockferry-kill-test-key-0123456789');
  const image = join(dir, 'src.img');
  // Data, zeros and repeats, so that every kind of frame crosses.
  const parts: Buffer[] = [];
  for (let i = 0; i < imageMiB; i++) parts.push(i % 5 === 3 ? Buffer.alloc(1 << 20) : Buffer.from(seededBytes(seed * 1000 + (i % 7 === 6 ? 1 : i), 1 << 20)));
  const data = Buffer.concat(parts);
  writeFileSync(image, data);
  const dataDir = join(dir, 'dst');
  const next = rng(seed);
  let dst = await serve(dataDir, keyFile);
  const common = ['--key-file', keyFile, '--strategy', 'full', '--compress', 'none', '--progress=none', '--json'];
  try {
    for (let i = 0; i < count; i++) {
      c.runs++;
      const name = `vm${i}`;
      // About a second of transfer at this rate: the kill lands anywhere from the handshake to the commit.
      const first = run(['migrate', image, '--to', `127.0.0.1:${dst.port}`, '--name', name, '--bwlimit', `${imageMiB}M`, ...common]);
      const delay = 50 + (next() % 1200);
      const victim = next() % 2 === 0 ? 'source' : 'destination';
      const timer = new Promise<'timer'>((r) => setTimeout(() => r('timer'), delay));
      const r = await Promise.race([first.done, timer]);
      if (r !== 'timer') {
        c.finishedBeforeKill++;
      } else if (victim === 'source') {
        c.killedSource++;
        first.p.kill('SIGKILL');
        await first.done;
      } else {
        c.killedDestination++;
        dst.p.kill('SIGKILL');
        await exited(dst.p);
        await first.done; // the source fails: connection lost
        dst = await serve(dataDir, keyFile);
      }
      // The same migration again, to the end (the destination may still be tearing down the killed session: retry a busy refusal).
      let again;
      for (let attempt = 0; attempt < 20; attempt++) {
        again = await run(['migrate', image, '--to', `127.0.0.1:${dst.port}`, '--name', name, ...(r !== 'timer' ? ['--overwrite'] : []), ...common]).done;
        if (again.code === 0 || !/ERR_BF_BUSY/.test(again.err)) break;
        await new Promise((res) => setTimeout(res, 100));
      }
      const out = join(dataDir, `${name}.img`);
      if (again!.code !== 0) {
        c.failures.push(`run ${i} (${victim} at ${delay} ms): ${again!.err.trim()}`);
      } else if (existsSync(out) && readFileSync(out).equals(data)) {
        c.identical++;
        if (JSON.parse(again!.out).blocks.resumed > 0) c.resumedWithKeptBlocks++;
      } else {
        c.failures.push(`run ${i} (${victim} at ${delay} ms): destination differs`);
      }
      rmSync(out, { force: true });
      if (i % 10 === 9) log?.(`kill -9: ${c.identical}/${c.runs} identical`);
    }
  } finally {
    dst.p.kill('SIGTERM');
    await exited(dst.p);
    rmSync(dir, { recursive: true, force: true });
  }
  return c;
}

// Chains for the SnapMig tests: a base ext4 file system (mkfs.ext4 -d of a
// file tree) and three snapshots, each the file system after files were
// written into it (debugfs -w), turned into qcow2 overlays holding only what
// changed (overlayOf: qemu-img rebase against the layer below), plus patterns and zero
// clusters written through qemu-io.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { seededBytes } from './util.js';

export const run = (cmd: string, args: string[], cwd?: string) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], ...(cwd ? { cwd } : {}) });
export const io = (file: string, ...cmds: string[]) => run('qemu-io', [...cmds.flatMap((c) => ['-c', c]), file]);

export const haveTools = (() => {
  try {
    for (const t of ['mkfs.ext4', 'debugfs', 'qemu-img', 'qemu-io']) execFileSync('sh', ['-c', `command -v ${t}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

/**
 * A qcow2 overlay over `below` holding exactly the clusters where the raw
 * state differs from it: an empty overlay over the state converted whole,
 * rebased (safe mode) onto `below`, which writes the clusters that differ.
 */
export function overlayOf(state: string, below: string, out: string): void {
  const full = `${out}.full.qcow2`;
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', state, full]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', full, '-F', 'qcow2', out]);
  run('qemu-img', ['rebase', '-f', 'qcow2', '-b', below, '-F', 'qcow2', out]);
  rmSync(full);
}

/** base ← s1 ← s2 ← act in dir (qcow2, 48 MiB guests); returns the files base first. `activeMiB`: data the active layer adds. */
export function makeChain(dir: string, prefix = '', activeMiB = 2): string[] {
  const p = (n: string) => join(dir, `${prefix}${n}`);
  const tree = p('tree');
  mkdirSync(join(tree, 'usr/lib'), { recursive: true });
  mkdirSync(join(tree, 'etc'), { recursive: true });
  for (let i = 0; i < 12; i++) writeFileSync(join(tree, 'usr/lib', `lib${i}.so`), seededBytes(100 + i, 300_000 + i * 7_001));
  writeFileSync(join(tree, 'etc/config'), 'hostname=vm1\n'.repeat(500));
  run('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', tree, '-E', 'lazy_itable_init=0,nodiscard', p('base.raw'), '48M']);
  const states: [string, number, number][] = [['s1', 1, 1_500_000], ['s2', 2, 900_000], ['act', 3, activeMiB << 20]];
  let prev = 'base';
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', p('base.raw'), p('base.qcow2')]);
  for (const [name, seed, bytes] of states) {
    copyFileSync(p(`${prev}.raw`), p(`${name}.raw`));
    writeFileSync(p(`${name}.file`), seededBytes(1000 + seed, bytes));
    run('debugfs', ['-w', '-R', `write ${p(`${name}.file`)} ${name}.dat`, p(`${name}.raw`)]);
    if (name === 's2') run('debugfs', ['-w', '-R', 'rm usr/lib/lib3.so', p(`${name}.raw`)]);
    overlayOf(p(`${name}.raw`), p(`${prev}.qcow2`), p(`${name}.qcow2`));
    if (name === 's2') io(p('s2.qcow2'), 'write -z 40M 128k');
    prev = name;
  }
  io(p('act.qcow2'), 'write -P 0x5a 30M 256k', 'write -z 44M 64k');
  return ['base', 's1', 's2', 'act'].map((n) => p(`${n}.qcow2`));
}

/** The guest bytes of a chain up to the file given (qemu's own reading). */
export function qemuRaw(file: string): Buffer {
  const out = `${file}.qemu.raw`;
  run('qemu-img', ['convert', '-O', 'raw', file, out]);
  return readFileSync(out);
}

/** Layer k of a destination's chain read through layers 0..k (the manifest's covered ranges over each raw file). */
export function destinationState(dataDir: string, name: string, k: number): Buffer {
  const m = JSON.parse(readFileSync(join(dataDir, `${name}.chain.json`), 'utf8')) as { size: number; layers: { file: string; covered: { offset: number; length: number }[] }[] };
  const out = Buffer.alloc(m.size);
  for (const l of m.layers.slice(0, k + 1)) {
    const b = readFileSync(join(dataDir, l.file));
    for (const c of l.covered) b.copy(out, c.offset, c.offset, c.offset + c.length);
  }
  return out;
}

/**
 * What a backup system keeps of a chain: copies of its first `n` layers
 * under other names (nightly-I.qcow2 in dir/sub), each rebased onto the copy
 * below it, so the backup server finds them by content, not by name.
 */
export function backupCopies(files: string[], dir: string, sub: string, n = 3): string[] {
  const d = join(dir, sub);
  mkdirSync(d, { recursive: true });
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const f = join(d, `nightly-${i}.qcow2`);
    copyFileSync(files[i]!, f);
    if (i > 0) run('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', out[i - 1]!, '-F', 'qcow2', f]);
    out.push(f);
  }
  return out;
}

/** A `blockferry serve` process: its port (from the first line it prints), its stderr so far, and a stop that waits for it to exit. */
export interface ServeProcess { proc: ChildProcess; port: number; stderr: () => string; stop(): Promise<void> }

/**
 * Runs `argv` (a command line that ends in `blockferry serve ...`, with any
 * prefix such as `ip netns exec NS`), waits for the line that names its port,
 * and passes each stderr line to onLine.
 */
export async function spawnServe(argv: string[], onLine?: (l: string) => void): Promise<ServeProcess> {
  const proc = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  createInterface({ input: proc.stderr! }).on('line', (l) => { err += `${l}\n`; onLine?.(l); });
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: proc.stdout! }).once('line', resolve);
    proc.once('exit', (c) => reject(new Error(`serve exited with ${c}: ${err}`)));
  });
  return {
    proc, port: (JSON.parse(line) as { port: number }).port, stderr: () => err,
    stop: () => new Promise<void>((r) => { if (proc.exitCode !== null || proc.signalCode) return r(); proc.once('exit', () => r()); proc.kill('SIGTERM'); }),
  };
}

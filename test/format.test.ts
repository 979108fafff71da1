// --format: a qcow2 file is read as qcow2 by default (auto probes its magic);
// with --format raw it is just bytes (a guest's own qcow2 header never makes
// blockferry follow a backing file), and with --format qcow2 a raw file is refused.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { seededBytes } from './util.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const MiB = 1 << 20;
let dir: string;
let overlay: string;
let base: string;

const scan = (...args: string[]) => spawnSync(process.execPath, [bin, 'scan', ...args, '--no-save', '--progress', 'none', '--json'], { encoding: 'utf8' });

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'bf-format-'));
  base = join(dir, 'base.img');
  writeFileSync(base, seededBytes(41, 8 * MiB));
  overlay = join(dir, 'top.qcow2');
  const r = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', base, overlay]);
  assert.equal(r.status, 0, String(r.stderr));
});
after(() => rmSync(dir, { recursive: true, force: true }));

describe('--format', () => {
  it('auto reads the chain (the virtual size, the base\'s data); raw reads the file\'s own bytes; qcow2 refuses a raw file', () => {
    const auto = scan(overlay);
    assert.equal(auto.status, 0, auto.stderr);
    const a = JSON.parse(auto.stdout)[0];
    assert.equal(a.size, 8 * MiB, 'the virtual size');
    assert.equal(a.blocks - a.zeroBlocks, (8 * MiB) / 4096, 'every block of the base is data through the chain');
    const raw = scan(overlay, '--format', 'raw');
    assert.equal(raw.status, 0, raw.stderr);
    assert.equal(JSON.parse(raw.stdout)[0].size, statSync(overlay).size, 'the file itself, its backing not followed');
    const wrong = scan(base, '--format', 'qcow2');
    assert.equal(wrong.status, 1);
    assert.match(wrong.stderr, /ERR_BF_BAD_MAGIC/);
  });
});

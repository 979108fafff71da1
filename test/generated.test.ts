// The unrolled kernels are generated and committed; they must be exactly what
// their generators produce today.
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

const root = new URL('../../', import.meta.url);
for (const name of ['sha1', 'xxh3']) {
  it(`assembly/${name}.gen.ts is what assembly/gen/${name}.mjs generates`, () => {
    const fresh = execFileSync(process.execPath, [new URL(`assembly/gen/${name}.mjs`, root).pathname, '--stdout'], { encoding: 'utf8' });
    assert.equal(readFileSync(new URL(`assembly/${name}.gen.ts`, root), 'utf8'), fresh);
  });
}

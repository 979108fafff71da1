// Zero scan per block against Buffer.equals with a zero block.
import { Engine } from '../src/index.js';
import { check, runGroup, type GroupResult } from './lib.js';

const BS = 4096;

export async function benchZero(): Promise<GroupResult[]> {
  const results: GroupResult[] = [];
  for (const [size, label, goal, floor] of [
    [256 << 20, '256 MiB all-zero region (memory bandwidth)', 0, 20],
    [1 << 20, '1 MiB all-zero region (cache-resident)', 2, undefined],
  ] as const) {
    const engine = new Engine({ initialBytes: size + (1 << 20) });
    const region = engine.alloc(size);
    const n = size / BS;
    const flags = engine.alloc(n);
    const buf = Buffer.from(engine.memory.buffer, region.ptr, size); // same bytes, no copy
    const zero = Buffer.alloc(BS);
    // Fresh pages are all mapped to the kernel's one shared zero page, which
    // would make a 256 MiB scan a cache-resident one: write every page first.
    buf.fill(1);
    buf.fill(0);
    // Checks: all zero; then one non-zero last byte is seen by both.
    check('zero flags', engine.zeroFlagsAt(region.ptr, size, BS, flags.ptr) === n);
    buf[size - 1] = 1;
    check('zero flags last byte', engine.zeroFlagsAt(region.ptr, size, BS, flags.ptr) === n - 1);
    check('Buffer.equals last byte', !buf.subarray(size - BS).equals(zero));
    buf[size - 1] = 0;
    results.push(
      await runGroup({
        title: `Zero scan, 4 KiB blocks, ${label}`,
        workPerOp: size,
        unit: 'GB/s',
        tasks: [
          { name: 'blockferry wasm zeroFlags', ours: true, fn: () => engine.zeroFlagsAt(region.ptr, size, BS, flags.ptr) },
          {
            name: 'Buffer.equals(zero block)',
            fn: () => { let z = 0; for (let o = 0; o < size; o += BS) if (buf.subarray(o, o + BS).equals(zero)) z++; return z; },
          },
          // Not a per-block peer: glibc memchr (AVX2) over the whole region, the memory ceiling for reference.
          { name: 'Buffer.indexOf(1), whole region (memchr)', fn: () => buf.indexOf(1) },
        ],
        goals: goal ? [{ vs: 'Buffer.equals(zero block)', min: goal }] : [],
        ...(floor ? { floor } : {}),
      }),
    );
  }
  return results;
}

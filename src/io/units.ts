// Sizes as people write them: 256M, 1G, 65536, 1.5GiB (K, M, G, T and
// KiB..TiB are powers of 1024). One parser for flags and environment variables.

/** Bytes, or undefined when v is not a size. */
export function parseByteSize(v: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?$/i.exec(v.trim());
  if (!m) return undefined;
  const mult: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };
  return Math.round(Number(m[1]) * mult[(m[2] ?? '').toLowerCase()[0] ?? '']!);
}

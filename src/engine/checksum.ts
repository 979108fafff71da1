import { Engine, type Region } from './engine.js';

/**
 * Piece size of the tree checksum. 16 MiB keeps the WASM window small while
 * hashing at full XXH3 speed; a file of any size needs one piece of memory.
 */
export const CHECKSUM_PIECE = 16 << 20;

/**
 * The checksum blockferry's files end with: XXH3-64 over the concatenated
 * little-endian XXH3-64 values of each CHECKSUM_PIECE-byte piece of the
 * content (the last piece may be short; empty content is one empty piece).
 * Streaming: update() takes the content in any slices.
 */
export class TreeChecksum {
  private readonly engine = new Engine({ initialBytes: CHECKSUM_PIECE + (1 << 20) });
  private readonly piece: Region = this.engine.alloc(CHECKSUM_PIECE);
  private fill = 0;
  private readonly sums: bigint[] = [];

  update(data: Uint8Array): this {
    let at = 0;
    while (at < data.length) {
      const n = Math.min(CHECKSUM_PIECE - this.fill, data.length - at);
      this.engine.bytes.set(data.subarray(at, at + n), this.piece.ptr + this.fill);
      this.fill += n;
      at += n;
      if (this.fill === CHECKSUM_PIECE) this.flush();
    }
    return this;
  }

  private flush(): void {
    this.sums.push(BigInt.asUintN(64, this.engine.core.xxh3(this.piece.ptr, this.fill)));
    this.fill = 0;
  }

  digest(): bigint {
    if (this.fill > 0 || this.sums.length === 0) this.flush();
    const list = new BigUint64Array(this.sums);
    return this.engine.xxh3(new Uint8Array(list.buffer));
  }
}

export function treeChecksum(...parts: Uint8Array[]): bigint {
  const c = new TreeChecksum();
  for (const p of parts) c.update(p);
  return c.digest();
}

// The XOR delta of a block against the version the destination holds
// (docs/PROTOCOL.md, "BLOCKS_DELTA"): a re-sent block whose writes changed a
// few records is mostly zeros once XORed with what was sent before, and a
// run-length code of those zeros is a few dozen bytes instead of a block.
// The code is a sequence of (zero run, literal length, literal bytes), both
// lengths as LEB128 varints; the runs and literals together cover the block
// exactly. Where the wire also has zstd (CAP_ZSTD) the frame is compressed
// on top, so literals that repeat compress further.
import { ErrorCode, ProtocolError } from '../errors.js';

/** Zero bytes shorter than this inside a literal stay in it: a new pair of varints costs 2 bytes or more. */
const MIN_ZERO_RUN = 4;

function varint(out: Uint8Array, at: number, v: number): number {
  while (v >= 0x80) { out[at++] = (v & 0x7f) | 0x80; v >>>= 7; }
  out[at++] = v;
  return at;
}

/**
 * The code of `base` XOR `now` (same length) into `out`; returns its length,
 * or -1 when it would reach `limit` bytes (the delta does not pay: send the
 * block). Stops early on incompressible data, so random blocks cost little.
 */
export function encodeDelta(base: Uint8Array, now: Uint8Array, out: Uint8Array, limit: number): number {
  const n = now.length;
  let at = 0;
  let i = 0;
  const max = Math.min(limit, out.length) - 10; // room for the last pair of varints
  while (i < n) {
    const zs = i;
    while (i < n && base[i] === now[i]) i++;
    const zeros = i - zs;
    if (i === n) {
      // A trailing zero run needs no literal; it is still written so the code covers the block.
      if (at + 10 > max) return -1;
      at = varint(out, at, zeros);
      at = varint(out, at, 0);
      return at;
    }
    // A literal: up to the next run of MIN_ZERO_RUN equal bytes.
    const ls = i;
    let same = 0;
    while (i < n) {
      if (base[i] === now[i]) { if (++same === MIN_ZERO_RUN) { i -= MIN_ZERO_RUN - 1; break; } }
      else same = 0;
      i++;
    }
    const len = i - ls;
    if (at + 10 + len > max) return -1;
    at = varint(out, at, zeros);
    at = varint(out, at, len);
    for (let k = ls; k < i; k++) out[at++] = base[k]! ^ now[k]!;
  }
  return at;
}

/** Applies a delta code to `block` in place (the destination's current bytes become the new ones); malformed codes are ERR_BF_PROTOCOL. */
export function applyDelta(block: Uint8Array, code: Uint8Array): void {
  let at = 0;
  let i = 0;
  const read = (): number => {
    let v = 0, shift = 0;
    for (;;) {
      if (at >= code.length || shift > 28) throw new ProtocolError(ErrorCode.PROTOCOL, 'BLOCKS_DELTA: a truncated or oversized length in a delta');
      const b = code[at++]!;
      v += (b & 0x7f) * 2 ** shift;
      if (b < 0x80) return v;
      shift += 7;
    }
  };
  while (at < code.length) {
    i += read();
    const len = read();
    if (i > block.length || len > block.length - i || len > code.length - at) throw new ProtocolError(ErrorCode.PROTOCOL, 'BLOCKS_DELTA: a delta that runs past its block or its bytes');
    for (let k = 0; k < len; k++) block[i + k] = block[i + k]! ^ code[at + k]!;
    at += len;
    i += len;
  }
  if (i !== block.length) throw new ProtocolError(ErrorCode.PROTOCOL, `BLOCKS_DELTA: a delta covering ${i} of the block's ${block.length} bytes`);
}

// Glue between the codecs (codec.ts) and a channel: which side compresses
// what, once the handshake agreed on compression.
import { CAP_ZSTD } from './handshake.js';
import type { FrameCompressor, FrameDecompressor } from './channel.js';

/** The decompressor a receiver installs for the capabilities agreed (none: compressed frames are a protocol error). */
export function decompressorFor(caps: number): FrameDecompressor | undefined {
  if (!(caps & CAP_ZSTD)) return undefined;
  return undefined; // filled in with the zstd codec
}

export type CompressMode = { mode: 'auto' | 'none' | 'zstd'; level?: number };

/** The compressor a sender installs: none unless both sides can and the user did not say none. */
export function compressorFor(caps: number, _mode: CompressMode): FrameCompressor | undefined {
  if (!(caps & CAP_ZSTD)) return undefined;
  return undefined;
}

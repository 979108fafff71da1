// What a destination writes a received image as, and under which names: the
// one place that chooses the sink. Raw images are NAME.img, qcow2 images
// NAME.qcow2 (each with .partial and .journal beside it until commit), so a
// file's format follows from its name and is never probed: a raw image
// whose guest wrote a qcow2 header at its start stays raw.
import { join } from 'node:path';
import { FileImageSink, type ImageSink } from '../../image/sink.js';
import { Qcow2ImageSink } from '../../image/qcow2-writer.js';
import { FileExport } from '../../nbd/file-export.js';
import { SinkExport } from '../../nbd/sink-export.js';
import type { NbdExport } from '../../nbd/protocol.js';

/** The formats a destination writes (`serve --image-format`). */
export type OutputFormat = 'raw' | 'qcow2';
export const OUTPUT_FORMATS: readonly OutputFormat[] = ['raw', 'qcow2'];

/** File extension of a complete image of each format. */
export const IMAGE_EXTENSION: Record<OutputFormat, string> = { raw: '.img', qcow2: '.qcow2' };

export interface ImageFiles {
  format: OutputFormat;
  final: string;
  partial: string;
  journal: string;
}

export function imageFiles(dataDir: string, name: string, format: OutputFormat): ImageFiles {
  const final = join(dataDir, name + IMAGE_EXTENSION[format]);
  return { format, final, partial: `${final}.partial`, journal: `${final}.journal` };
}

/**
 * The sink for an image: a fresh one, or (`resume`) the partial image of
 * an earlier attempt, which must match (else an error: the caller starts
 * over). qcow2 images are standalone (no backing file), 64 KiB clusters.
 */
export async function openSink(files: ImageFiles, size: number, resume: boolean): Promise<ImageSink> {
  if (files.format === 'qcow2') {
    const o = { size, partial: files.partial };
    return resume ? Qcow2ImageSink.resume(files.final, o) : Qcow2ImageSink.create(files.final, o);
  }
  return resume ? FileImageSink.reopen(files.partial, files.final, size) : FileImageSink.create(files.partial, files.final, size);
}

/** A complete image served over NBD, read-write: a raw file as it is, a qcow2 image through the writer opened in place. */
export async function openExport(files: ImageFiles, name: string, description: string): Promise<NbdExport & { close(): Promise<void> }> {
  if (files.format === 'qcow2') return new SinkExport(name, await Qcow2ImageSink.open(files.final), description);
  return FileExport.open(files.final, { name, description });
}

import { closeSync, fsyncSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { BlockferryError, ErrorCode } from '../errors.js';

/**
 * Writes parts to file atomically: into FILE.tmp-PID, fsync, then rename over
 * FILE. A crash leaves the old file or the new one, never half of one; on
 * failure the temporary file is removed and WRITE_FAILED names `what`.
 */
export function writeFileAtomic(file: string, parts: Uint8Array[], what: string, mode = 0o644): void {
  const tmp = `${file}.tmp-${process.pid}`;
  let fd: number | undefined;
  try {
    fd = openSync(tmp, 'w', mode);
    for (const p of parts) for (let at = 0; at < p.length; ) at += writeSync(fd, p, at, p.length - at);
    fsyncSync(fd);
    closeSync(fd);
    fd = undefined;
    renameSync(tmp, file);
  } catch (cause) {
    if (fd !== undefined) closeSync(fd);
    rmSync(tmp, { force: true });
    throw new BlockferryError(ErrorCode.WRITE_FAILED, `cannot write ${what} ${file}: ${(cause as Error).message}`, { cause });
  }
}

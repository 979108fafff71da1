import { closeSync, constants, fsyncSync, lstatSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { open, rename, rm } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { BlockferryError, ErrorCode, isNoSpace } from '../errors.js';

/**
 * Writes parts to file atomically: into a fresh FILE.tmp-PID-RANDOM (created
 * with O_EXCL | O_NOFOLLOW, so nothing planted at that name is written
 * through), fsync, then rename over FILE. A crash leaves the old file or the
 * new one, never half of one; on failure the temporary file is removed and
 * WRITE_FAILED names `what`. A symbolic link (or anything but a regular
 * file) at FILE is refused with UNSAFE_PATH rather than replaced.
 */
export function writeFileAtomic(file: string, parts: Uint8Array[], what: string, mode = 0o644): void {
  checkRegularOrAbsent(file, what);
  const tmp = `${file}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`;
  let fd: number | undefined;
  let created = false;
  try {
    fd = openSync(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, mode);
    created = true;
    for (const p of parts) for (let at = 0; at < p.length; ) at += writeSync(fd, p, at, p.length - at);
    fsyncSync(fd);
    closeSync(fd);
    fd = undefined;
    checkRegularOrAbsent(file, what);
    renameSync(tmp, file);
  } catch (cause) {
    if (fd !== undefined) closeSync(fd);
    if (created) rmSync(tmp, { force: true });
    if (cause instanceof BlockferryError) throw cause;
    throw new BlockferryError(isNoSpace(cause) ? ErrorCode.NO_SPACE : ErrorCode.WRITE_FAILED, `cannot write ${what} ${file}: ${(cause as Error).message}`, { cause });
  }
}

/**
 * writeFileAtomic on libuv's pool: the same steps and guarantees, with the
 * event loop free meanwhile (an fsync can take tens of milliseconds while
 * other data is being written; a service answering reads must not stall).
 */
export async function writeFileAtomicAsync(file: string, parts: Uint8Array[], what: string, mode = 0o644): Promise<void> {
  checkRegularOrAbsent(file, what);
  const tmp = `${file}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`;
  let created = false;
  try {
    const fh = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, mode);
    created = true;
    try {
      for (const p of parts) await fh.write(p);
      await fh.sync();
    } finally {
      await fh.close();
    }
    checkRegularOrAbsent(file, what);
    await rename(tmp, file);
  } catch (cause) {
    if (created) await rm(tmp, { force: true });
    if (cause instanceof BlockferryError) throw cause;
    throw new BlockferryError(isNoSpace(cause) ? ErrorCode.NO_SPACE : ErrorCode.WRITE_FAILED, `cannot write ${what} ${file}: ${(cause as Error).message}`, { cause });
  }
}

/** Refuses a path that exists and is not a regular file (a planted symbolic link, a directory, a fifo). */
export function checkRegularOrAbsent(file: string, what: string): void {
  let st;
  try {
    st = lstatSync(file);
  } catch {
    return;
  }
  if (st.isSymbolicLink()) throw new BlockferryError(ErrorCode.UNSAFE_PATH, `${what} ${file} is a symbolic link; refusing to use it`);
  if (!st.isFile()) throw new BlockferryError(ErrorCode.UNSAFE_PATH, `${what} ${file} is not a regular file; refusing to use it`);
}

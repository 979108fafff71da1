// qemu-storage-daemon as a test and bench fixture: a raw file as block node
// disk0, exported writable over NBD on a Unix socket as "disk", with a QMP
// monitor beside it. Whatever writes through the export (qemu-io, fio's nbd
// engine) is seen by QEMU, so its dirty bitmaps see it too.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

export interface StorageDaemon {
  /** The NBD URI of the export. */
  uri: string;
  /** The QMP socket. */
  qmp: string;
  /** The daemon's pid file (for the caller's cleanup) and its pid. */
  pidFile: string;
  pid: number;
}

/** Starts the daemon (daemonized: it is ready when this returns); sockets and pid file are `dir/tag-*`. */
export function startStorageDaemon(dir: string, image: string, tag: string): StorageDaemon {
  const nbd = join(dir, `${tag}-nbd.sock`), qmp = join(dir, `${tag}-qmp.sock`), pidFile = join(dir, `${tag}.pid`);
  const r = spawnSync('qemu-storage-daemon', [
    '--daemonize', '--pidfile', pidFile,
    '--blockdev', `driver=file,node-name=disk0,filename=${image}`,
    '--nbd-server', `addr.type=unix,addr.path=${nbd}`,
    '--export', 'type=nbd,id=exp0,node-name=disk0,name=disk,writable=on',
    '--chardev', `socket,id=qmp0,path=${qmp},server=on,wait=off`,
    '--monitor', 'chardev=qmp0',
  ], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-storage-daemon exited with ${r.status ?? r.signal}: ${r.stderr}`);
  return { uri: `nbd+unix:///disk?socket=${nbd}`, qmp, pidFile, pid: Number(readFileSync(pidFile, 'utf8').trim()) };
}

/**
 * fio writing random 4 KiB blocks at `rate` (fio's --rate, e.g. '8m') into
 * [offset, offset + size) through the NBD export with its nbd ioengine
 * (libnbd), so QEMU's bitmaps see every write; runs until killed.
 */
export function fioThroughNbd(uri: string, offset: number, size: number, rate: string, runtimeSeconds = 600): ChildProcess {
  return spawn('fio', [
    '--name=w', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k', `--rate=${rate}`, `--offset=${offset}`, `--size=${size}`,
    '--time_based', `--runtime=${runtimeSeconds}`, '--refill_buffers', '--thread', '--output=/dev/null',
  ], { stdio: 'ignore' });
}

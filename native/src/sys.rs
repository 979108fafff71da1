//! The system calls Node does not offer: SEEK_DATA/SEEK_HOLE extents,
//! fallocate hole punching, and block-device ioctls. Declared against the C
//! library the Rust standard library already links (Linux).
use std::ffi::c_int;

extern "C" {
    fn lseek(fd: c_int, offset: i64, whence: c_int) -> i64;
    fn fallocate(fd: c_int, mode: c_int, offset: i64, len: i64) -> c_int;
    fn ioctl(fd: c_int, request: u64, ...) -> c_int;
    fn pwrite(fd: c_int, buf: *const u8, count: usize, offset: i64) -> isize;
    fn __errno_location() -> *mut c_int;
}

const SEEK_DATA: c_int = 3;
const SEEK_HOLE: c_int = 4;
const FALLOC_FL_KEEP_SIZE: c_int = 0x01;
const FALLOC_FL_PUNCH_HOLE: c_int = 0x02;
const FALLOC_FL_ZERO_RANGE: c_int = 0x10;
/// _IOR(0x12, 114, size_t): the device size in bytes.
const BLKGETSIZE64: u64 = 0x8008_1272;
/// _IO(0x12, 104): the logical sector size.
const BLKSSZGET: u64 = 0x1268;
const ENXIO: c_int = 6;
const EINTR: c_int = 4;

pub fn errno() -> c_int {
    unsafe { *__errno_location() }
}

/// Allocated extents of fd within [offset, offset + length), as (offset,
/// length) pairs. A file system without SEEK_DATA (EINVAL) reports the whole
/// range as data, which is always correct.
pub fn extents(fd: c_int, offset: u64, length: u64) -> Result<Vec<(u64, u64)>, (&'static str, c_int)> {
    let end = offset + length;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = unsafe { lseek(fd, pos as i64, SEEK_DATA) };
        if data < 0 {
            match errno() {
                ENXIO => break, // no data at or after pos: the rest is a hole
                22 if out.is_empty() && pos == offset => return Ok(vec![(offset, length)]),
                e => return Err(("lseek(SEEK_DATA)", e)),
            }
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        let hole = unsafe { lseek(fd, data as i64, SEEK_HOLE) };
        if hole < 0 {
            return Err(("lseek(SEEK_HOLE)", errno()));
        }
        let stop = (hole as u64).min(end);
        out.push((data, stop - data));
        pos = stop;
    }
    Ok(out)
}

/// How a range was zeroed.
#[derive(Clone, Copy)]
pub enum ZeroMode {
    Punched,
    ZeroRange,
    Written,
}

/// Makes [offset, offset + length) of fd read as zeros without changing the
/// file size: punch a hole; where the file system refuses, allocate zeros
/// (ZERO_RANGE); where that fails too, write zeros.
pub fn punch_hole(fd: c_int, offset: u64, length: u64) -> Result<ZeroMode, (&'static str, c_int)> {
    if length == 0 {
        return Ok(ZeroMode::Punched);
    }
    if unsafe { fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset as i64, length as i64) } == 0 {
        return Ok(ZeroMode::Punched);
    }
    let e = errno();
    if e == 9 {
        return Err(("fallocate", e)); // EBADF: no fallback will do better
    }
    if unsafe { fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset as i64, length as i64) } == 0 {
        return Ok(ZeroMode::ZeroRange);
    }
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < length {
        let n = ((length - done) as usize).min(zeros.len());
        let w = unsafe { pwrite(fd, zeros.as_ptr(), n, (offset + done) as i64) };
        if w < 0 {
            if errno() == EINTR {
                continue;
            }
            return Err(("pwrite", errno()));
        }
        done += w as u64;
    }
    Ok(ZeroMode::Written)
}

/// Size in bytes and logical sector size of the block device open at fd.
pub fn block_device_size(fd: c_int) -> Result<(u64, u32), (&'static str, c_int)> {
    let mut size: u64 = 0;
    if unsafe { ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) } != 0 {
        return Err(("ioctl(BLKGETSIZE64)", errno()));
    }
    let mut sector: c_int = 0;
    if unsafe { ioctl(fd, BLKSSZGET, &mut sector as *mut c_int) } != 0 {
        return Err(("ioctl(BLKSSZGET)", errno()));
    }
    Ok((size, sector as u32))
}

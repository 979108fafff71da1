//! blockferry's native accelerator. Every function has a twin elsewhere
//! (SHA-1 in WASM and node:crypto; extents, hole punching and device size
//! with slower portable fallbacks in TypeScript) and a test that the twins
//! agree. Every argument is checked; a bad one throws a TypeError with code
//! ERR_BF_INVALID_ARGUMENT, a failed system call an Error with code
//! ERR_BF_SYSCALL, errno and syscall. Nothing here may take the process down:
//! each entry point also turns a panic into a thrown error.
mod napi;
mod sha1;
mod sys;

use napi::*;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::OnceLock;

const MAX_SAFE: f64 = 9_007_199_254_740_991.0;
const MIN_BS: u64 = 512;
const MAX_BS: u64 = 1 << 20;

fn imp() -> sha1::Impl {
    static IMP: OnceLock<sha1::Impl> = OnceLock::new();
    *IMP.get_or_init(sha1::detect)
}

unsafe fn entry(env: napi_env, info: napi_callback_info, f: unsafe fn(napi_env, napi_callback_info) -> JsResult) -> napi_value {
    match catch_unwind(AssertUnwindSafe(|| f(env, info))) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            throw(env, e);
            ptr::null_mut()
        }
        Err(_) => {
            throw(env, JsError { code: "ERR_BF_NATIVE_PANIC", message: "internal error in the native addon".into(), type_error: false, errno: None, syscall: None });
            ptr::null_mut()
        }
    }
}

unsafe fn block_size(env: napi_env, v: napi_value) -> Result<usize, JsError> {
    let bs = uint(env, v, "blockSize", MAX_BS as f64)?;
    if bs < MIN_BS || !bs.is_power_of_two() {
        return Err(JsError { code: "ERR_BF_BAD_BLOCK_SIZE", ..JsError::arg(format!("block size must be a power of two from {MIN_BS} to {MAX_BS} bytes, got {bs}")) });
    }
    Ok(bs as usize)
}

unsafe fn fd_arg(env: napi_env, v: napi_value) -> Result<i32, JsError> {
    Ok(uint(env, v, "fd", i32::MAX as f64)? as i32)
}

unsafe fn range(env: napi_env, off: napi_value, len: napi_value) -> Result<(u64, u64), JsError> {
    let o = uint(env, off, "offset", MAX_SAFE)?;
    let l = uint(env, len, "length", MAX_SAFE)?;
    if o.checked_add(l).map_or(true, |e| e > i64::MAX as u64) {
        return Err(JsError::arg(format!("offset + length: {o} + {l} is past the largest file offset")));
    }
    Ok((o, l))
}

/// sha1Blocks(data, blockSize, out) -> number of digests written to out.
unsafe fn js_sha1_blocks(env: napi_env, info: napi_callback_info) -> JsResult {
    let [d, b, o] = args::<3>(env, info);
    let data = bytes(env, d, "data")?;
    let bs = block_size(env, b)?;
    let out = bytes(env, o, "out")?;
    let n = (data.len() + bs - 1) / bs;
    if out.len() < n * sha1::DIGEST {
        return Err(JsError::arg(format!("out: {} bytes cannot hold {n} digests ({} bytes)", out.len(), n * sha1::DIGEST)));
    }
    if ranges_overlap(data, out) {
        return Err(JsError::arg("out: must not overlap data".into()));
    }
    Ok(number(env, sha1::sha1_blocks(imp(), data, bs, out) as f64))
}

fn ranges_overlap(a: &[u8], b: &[u8]) -> bool {
    let (a0, a1) = (a.as_ptr() as usize, a.as_ptr() as usize + a.len());
    let (b0, b1) = (b.as_ptr() as usize, b.as_ptr() as usize + b.len());
    a0 < b1 && b0 < a1
}

/// sha1(data, out): the digest of all of data into out[0..20].
unsafe fn js_sha1(env: napi_env, info: napi_callback_info) -> JsResult {
    let [d, o] = args::<2>(env, info);
    let data = bytes(env, d, "data")?;
    let out = bytes(env, o, "out")?;
    if out.len() < sha1::DIGEST {
        return Err(JsError::arg(format!("out: {} bytes cannot hold a 20-byte digest", out.len())));
    }
    if ranges_overlap(data, out) {
        return Err(JsError::arg("out: must not overlap data".into()));
    }
    sha1::sha1(imp(), data, &mut out[..sha1::DIGEST]);
    let mut u = ptr::null_mut();
    napi_get_undefined(env, &mut u);
    Ok(u)
}

/// extents(fd, offset, length) -> [offset0, length0, offset1, length1, ...]
unsafe fn js_extents(env: napi_env, info: napi_callback_info) -> JsResult {
    let [f, o, l] = args::<3>(env, info);
    let fd = fd_arg(env, f)?;
    let (off, len) = range(env, o, l)?;
    let list = sys::extents(fd, off, len).map_err(|(sc, e)| JsError::sys(sc, e, String::new()))?;
    let mut arr = ptr::null_mut();
    napi_create_array_with_length(env, list.len() * 2, &mut arr);
    for (i, (a, b)) in list.iter().enumerate() {
        napi_set_element(env, arr, 2 * i as u32, number(env, *a as f64));
        napi_set_element(env, arr, 2 * i as u32 + 1, number(env, *b as f64));
    }
    Ok(arr)
}

/// punchHole(fd, offset, length) -> "punched" | "zero-range" | "written"
unsafe fn js_punch_hole(env: napi_env, info: napi_callback_info) -> JsResult {
    let [f, o, l] = args::<3>(env, info);
    let fd = fd_arg(env, f)?;
    let (off, len) = range(env, o, l)?;
    let mode = sys::punch_hole(fd, off, len).map_err(|(sc, e)| JsError::sys(sc, e, format!(" at {off}+{len}")))?;
    Ok(string(env, match mode {
        sys::ZeroMode::Punched => "punched",
        sys::ZeroMode::ZeroRange => "zero-range",
        sys::ZeroMode::Written => "written",
    }))
}

/// blockDeviceSize(fd) -> { size, logicalSectorSize }
unsafe fn js_block_device_size(env: napi_env, info: napi_callback_info) -> JsResult {
    let [f] = args::<1>(env, info);
    let fd = fd_arg(env, f)?;
    let (size, sector) = sys::block_device_size(fd).map_err(|(sc, e)| JsError::sys(sc, e, String::new()))?;
    let mut obj = ptr::null_mut();
    napi_create_object(env, &mut obj);
    set(env, obj, "size", number(env, size as f64));
    set(env, obj, "logicalSectorSize", number(env, sector as f64));
    Ok(obj)
}

/// info() -> { sha1: "sha-ni" | "portable", shaNi: boolean, version }
unsafe fn js_info(env: napi_env, _info: napi_callback_info) -> JsResult {
    let mut obj = ptr::null_mut();
    napi_create_object(env, &mut obj);
    set(env, obj, "sha1", string(env, if imp() == sha1::Impl::ShaNi { "sha-ni" } else { "portable" }));
    set(env, obj, "shaNi", boolean(env, sha1::has_sha_ni()));
    set(env, obj, "version", string(env, env!("CARGO_PKG_VERSION")));
    Ok(obj)
}

macro_rules! export {
    ($env:expr, $exports:expr, $name:literal, $f:ident) => {{
        unsafe extern "C" fn cb(env: napi_env, info: napi_callback_info) -> napi_value {
            entry(env, info, $f)
        }
        let mut func = ptr::null_mut();
        napi_create_function($env, concat!($name, "\0").as_ptr() as *const c_char, $name.len(), cb, ptr::null_mut(), &mut func);
        set($env, $exports, $name, func);
    }};
}

/// The module entry point Node looks up in a Node-API addon.
#[no_mangle]
pub unsafe extern "C" fn napi_register_module_v1(env: napi_env, exports: napi_value) -> napi_value {
    export!(env, exports, "sha1Blocks", js_sha1_blocks);
    export!(env, exports, "sha1", js_sha1);
    export!(env, exports, "extents", js_extents);
    export!(env, exports, "punchHole", js_punch_hole);
    export!(env, exports, "blockDeviceSize", js_block_device_size);
    export!(env, exports, "info", js_info);
    exports
}

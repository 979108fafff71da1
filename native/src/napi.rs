//! The handful of Node-API (N-API) functions blockferry uses, declared by
//! hand: the `napi-sys` crate is not reachable here. Signatures follow
//! `js_native_api.h` (Node-API version 8, Node >= 12.22). The symbols are
//! resolved against the running `node` binary when the addon is loaded.
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_void, CString};
use std::ptr;

pub type napi_env = *mut c_void;
pub type napi_value = *mut c_void;
pub type napi_callback_info = *mut c_void;
pub type napi_status = i32;
pub type napi_callback = unsafe extern "C" fn(napi_env, napi_callback_info) -> napi_value;

pub const NAPI_OK: napi_status = 0;
/// `napi_valuetype::napi_number`
pub const NAPI_NUMBER: i32 = 3;

extern "C" {
    pub fn napi_get_cb_info(
        env: napi_env,
        cbinfo: napi_callback_info,
        argc: *mut usize,
        argv: *mut napi_value,
        this_arg: *mut napi_value,
        data: *mut *mut c_void,
    ) -> napi_status;
    /// Accepts every TypedArray (Buffer, Uint8Array, views over a
    /// SharedArrayBuffer or over WebAssembly memory alike) and returns a
    /// pointer to its first byte: the addon works on the caller's memory.
    pub fn napi_get_typedarray_info(
        env: napi_env,
        typedarray: napi_value,
        type_: *mut i32,
        length: *mut usize,
        data: *mut *mut c_void,
        arraybuffer: *mut napi_value,
        byte_offset: *mut usize,
    ) -> napi_status;
    pub fn napi_is_typedarray(env: napi_env, value: napi_value, result: *mut bool) -> napi_status;
    pub fn napi_typeof(env: napi_env, value: napi_value, result: *mut i32) -> napi_status;
    pub fn napi_get_value_double(env: napi_env, value: napi_value, result: *mut f64) -> napi_status;
    pub fn napi_create_double(env: napi_env, value: f64, result: *mut napi_value) -> napi_status;
    pub fn napi_get_boolean(env: napi_env, value: bool, result: *mut napi_value) -> napi_status;
    pub fn napi_create_object(env: napi_env, result: *mut napi_value) -> napi_status;
    pub fn napi_create_array_with_length(env: napi_env, length: usize, result: *mut napi_value) -> napi_status;
    pub fn napi_set_element(env: napi_env, object: napi_value, index: u32, value: napi_value) -> napi_status;
    pub fn napi_set_named_property(env: napi_env, object: napi_value, name: *const c_char, value: napi_value) -> napi_status;
    pub fn napi_create_string_utf8(env: napi_env, s: *const c_char, length: usize, result: *mut napi_value) -> napi_status;
    pub fn napi_create_function(
        env: napi_env,
        name: *const c_char,
        length: usize,
        cb: napi_callback,
        data: *mut c_void,
        result: *mut napi_value,
    ) -> napi_status;
    pub fn napi_create_error(env: napi_env, code: napi_value, msg: napi_value, result: *mut napi_value) -> napi_status;
    pub fn napi_create_type_error(env: napi_env, code: napi_value, msg: napi_value, result: *mut napi_value) -> napi_status;
    pub fn napi_throw(env: napi_env, error: napi_value) -> napi_status;
    pub fn napi_get_undefined(env: napi_env, result: *mut napi_value) -> napi_status;
    pub fn napi_is_exception_pending(env: napi_env, result: *mut bool) -> napi_status;
}

/// An error to throw into JavaScript: a stable code, a message, and for
/// system calls the errno and the call's name.
pub struct JsError {
    pub code: &'static str,
    pub message: String,
    pub type_error: bool,
    pub errno: Option<i32>,
    pub syscall: Option<&'static str>,
}

impl JsError {
    pub fn arg(message: String) -> JsError {
        JsError { code: "ERR_BF_INVALID_ARGUMENT", message, type_error: true, errno: None, syscall: None }
    }
    pub fn sys(syscall: &'static str, errno: i32, what: String) -> JsError {
        JsError {
            code: "ERR_BF_SYSCALL",
            message: format!("{syscall} failed: {} (errno {errno}){what}", strerror(errno)),
            type_error: false,
            errno: Some(errno),
            syscall: Some(syscall),
        }
    }
}

pub type JsResult = Result<napi_value, JsError>;

fn strerror(errno: i32) -> &'static str {
    match errno {
        1 => "EPERM",
        2 => "ENOENT",
        5 => "EIO",
        9 => "EBADF",
        13 => "EACCES",
        14 => "EFAULT",
        22 => "EINVAL",
        25 => "ENOTTY",
        28 => "ENOSPC",
        29 => "ESPIPE",
        6 => "ENXIO",
        95 => "EOPNOTSUPP",
        _ => "error",
    }
}

pub unsafe fn string(env: napi_env, s: &str) -> napi_value {
    let mut v = ptr::null_mut();
    napi_create_string_utf8(env, s.as_ptr() as *const c_char, s.len(), &mut v);
    v
}

pub unsafe fn number(env: napi_env, n: f64) -> napi_value {
    let mut v = ptr::null_mut();
    napi_create_double(env, n, &mut v);
    v
}

pub unsafe fn boolean(env: napi_env, b: bool) -> napi_value {
    let mut v = ptr::null_mut();
    napi_get_boolean(env, b, &mut v);
    v
}

pub unsafe fn set(env: napi_env, obj: napi_value, name: &str, value: napi_value) {
    let c = CString::new(name).unwrap_or_default();
    napi_set_named_property(env, obj, c.as_ptr(), value);
}

pub unsafe fn throw(env: napi_env, e: JsError) {
    let mut pending = false;
    napi_is_exception_pending(env, &mut pending);
    if pending {
        return;
    }
    let code = string(env, e.code);
    let msg = string(env, &e.message);
    let mut err = ptr::null_mut();
    if e.type_error {
        napi_create_type_error(env, code, msg, &mut err);
    } else {
        napi_create_error(env, code, msg, &mut err);
    }
    if let Some(errno) = e.errno {
        set(env, err, "errno", number(env, errno as f64));
    }
    if let Some(sc) = e.syscall {
        set(env, err, "syscall", string(env, sc));
    }
    napi_throw(env, err);
}

/// The call's arguments (up to N; missing ones are `undefined`).
pub unsafe fn args<const N: usize>(env: napi_env, info: napi_callback_info) -> [napi_value; N] {
    let mut argv = [ptr::null_mut(); N];
    let mut argc = N;
    napi_get_cb_info(env, info, &mut argc, argv.as_mut_ptr(), ptr::null_mut(), ptr::null_mut());
    argv
}

/// A TypedArray argument as a byte slice over the caller's memory.
pub unsafe fn bytes<'a>(env: napi_env, v: napi_value, name: &str) -> Result<&'a mut [u8], JsError> {
    let mut is = false;
    if v.is_null() || napi_is_typedarray(env, v, &mut is) != NAPI_OK || !is {
        return Err(JsError::arg(format!("{name}: expected a Buffer or TypedArray")));
    }
    let (mut ty, mut len, mut data, mut off) = (0i32, 0usize, ptr::null_mut::<c_void>(), 0usize);
    let mut ab = ptr::null_mut();
    if napi_get_typedarray_info(env, v, &mut ty, &mut len, &mut data, &mut ab, &mut off) != NAPI_OK {
        return Err(JsError::arg(format!("{name}: unreadable TypedArray")));
    }
    // length is in elements: scale by the element size of the array type.
    let elem = match ty {
        0 | 1 | 2 => 1,  // Int8, Uint8, Uint8Clamped
        3 | 4 => 2,      // Int16, Uint16
        5 | 6 | 7 => 4,  // Int32, Uint32, Float32
        8 | 9 | 10 => 8, // Float64, BigInt64, BigUint64
        _ => 1,
    };
    let n = len * elem;
    if n == 0 || data.is_null() {
        return Ok(&mut []);
    }
    Ok(std::slice::from_raw_parts_mut(data as *mut u8, n))
}

/// A non-negative integer argument no larger than max (exact in a double).
pub unsafe fn uint(env: napi_env, v: napi_value, name: &str, max: f64) -> Result<u64, JsError> {
    let mut ty = 0;
    if v.is_null() || napi_typeof(env, v, &mut ty) != NAPI_OK || ty != NAPI_NUMBER {
        return Err(JsError::arg(format!("{name}: expected a number")));
    }
    let mut d = 0f64;
    napi_get_value_double(env, v, &mut d);
    if !(d >= 0.0 && d <= max && d.fract() == 0.0) {
        return Err(JsError::arg(format!("{name}: expected an integer from 0 to {max}, got {d}")));
    }
    Ok(d as u64)
}

//! The proxy-wasm 0.2.1 ABI's numbers (status codes, enums) and the guest-memory
//! accessors every host function uses: bounds-checked reads and writes, and
//! returning data through the guest's allocator.
//!
//! A bad pointer or length is never a host error: it is `INVALID_MEMORY_ACCESS`
//! for the call, and the host's own state is untouched.

use std::sync::Arc;

use wasmtime::{Caller, Extern, Memory, TypedFunc};

use super::state::PwState;

/// `proxy_status_t`.
pub mod status {
    /// Success.
    pub const OK: i32 = 0;
    /// The thing asked for does not exist.
    pub const NOT_FOUND: i32 = 1;
    /// An argument is invalid.
    pub const BAD_ARGUMENT: i32 = 2;
    /// A value could not be serialized.
    pub const SERIALIZATION_FAILURE: i32 = 3;
    /// A value could not be parsed.
    pub const PARSE_FAILURE: i32 = 4;
    /// A pointer or length is outside the guest's memory.
    pub const INVALID_MEMORY_ACCESS: i32 = 6;
    /// A queue is empty.
    pub const EMPTY: i32 = 7;
    /// Shared data changed since it was read.
    pub const CAS_MISMATCH: i32 = 8;
    /// The host could not do it.
    pub const INTERNAL_FAILURE: i32 = 10;
}

/// WASI preview1 errno values used by the WASI subset.
pub mod errno {
    /// Success.
    pub const SUCCESS: i32 = 0;
    /// Bad file descriptor.
    pub const BADF: i32 = 8;
    /// Invalid argument.
    pub const INVAL: i32 = 28;
    /// Not supported.
    pub const NOSYS: i32 = 52;
    /// Bad address (our answer to a bad pointer).
    pub const FAULT: i32 = 21;
}

/// `proxy_map_type_t` values this host serves.
pub mod map {
    /// Request headers.
    pub const REQUEST_HEADERS: i32 = 0;
    /// Request trailers.
    pub const REQUEST_TRAILERS: i32 = 1;
    /// Response headers.
    pub const RESPONSE_HEADERS: i32 = 2;
    /// Response trailers.
    pub const RESPONSE_TRAILERS: i32 = 3;
    /// `GRPC_RECEIVE_INITIAL_METADATA`: a gRPC stream's response head, during
    /// `proxy_on_grpc_receive_initial_metadata`.
    pub const GRPC_RECEIVE_INITIAL_METADATA: i32 = 4;
    /// `GRPC_RECEIVE_TRAILING_METADATA`: a gRPC stream's trailers, during
    /// `proxy_on_grpc_receive_trailing_metadata`.
    pub const GRPC_RECEIVE_TRAILING_METADATA: i32 = 5;
    /// `HTTP_CALL_RESPONSE_HEADERS`: the callout response being delivered.
    pub const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
    /// `HTTP_CALL_RESPONSE_TRAILERS`: the trailers of the HTTP callout being
    /// delivered.
    pub const HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;
    /// Largest defined map type (HTTP_CALL_RESPONSE_TRAILERS).
    pub const MAX: i32 = 7;
}

/// `proxy_buffer_type_t` values this host serves.
pub mod buffer {
    /// The request body held for the current `proxy_on_request_body`.
    pub const HTTP_REQUEST_BODY: i32 = 0;
    /// The response body held for the current `proxy_on_response_body`.
    pub const HTTP_RESPONSE_BODY: i32 = 1;
    /// The data read from downstream, during `proxy_on_downstream_data`.
    pub const DOWNSTREAM_DATA: i32 = 2;
    /// The data read from upstream, during `proxy_on_upstream_data`.
    pub const UPSTREAM_DATA: i32 = 3;
    /// The response of the HTTP callout being delivered.
    pub const HTTP_CALL_RESPONSE_BODY: i32 = 4;
    /// The response message of the gRPC call being delivered
    /// (`proxy_on_grpc_receive`).
    pub const GRPC_RECEIVE_BUFFER: i32 = 5;
    /// The VM configuration (`proxy_wasm.vm_config`).
    pub const VM_CONFIGURATION: i32 = 6;
    /// The plugin configuration.
    pub const PLUGIN_CONFIGURATION: i32 = 7;
}

/// `proxy_action_t`.
/// `proxy_peer_type_t`: who closed a connection (`proxy_on_*_connection_close`).
pub mod peer {
    /// The host closed it.
    pub const LOCAL: i32 = 1;
    /// The peer closed it.
    pub const REMOTE: i32 = 2;
}

/// `proxy_stream_type_t` (`proxy_continue_stream`, `proxy_close_stream`).
pub mod stream {
    /// The client connection of a TCP context.
    pub const DOWNSTREAM: i32 = 2;
    /// The upstream connection of a TCP context.
    pub const UPSTREAM: i32 = 3;
}

/// `proxy_action_t`.
pub mod action {
    /// Continue the stream.
    pub const CONTINUE: i32 = 0;
    /// Headers: hold the stream until `proxy_continue_stream` (after a callout
    /// response). Body: Envoy's `StopIterationAndBuffer` — hold the data and call
    /// again with everything held when more arrives.
    pub const PAUSE: i32 = 1;
}

/// Envoy's caps on one serialized header map.
pub const MAX_MAP_BYTES: usize = 1 << 20;
/// Envoy's caps on pairs in one header map.
pub const MAX_MAP_PAIRS: usize = 1024;

/// Why a host function stopped early: a status for the guest, or a trap.
pub enum Fail {
    /// Return this status.
    Status(i32),
    /// Trap the guest (its own allocator failed, or `proc_exit`).
    Trap(wasmtime::Error),
}

impl From<wasmtime::Error> for Fail {
    fn from(e: wasmtime::Error) -> Self {
        Fail::Trap(e)
    }
}

/// Result of the body of a host function.
pub type HResult<T> = Result<T, Fail>;

/// Runs a host function body: its status, or a trap.
pub fn run(
    caller: &mut Caller<'_, PwState>,
    f: impl FnOnce(&mut Caller<'_, PwState>) -> HResult<()>,
) -> wasmtime::Result<i32> {
    match f(caller) {
        Ok(()) => Ok(status::OK),
        Err(Fail::Status(s)) => Ok(s),
        Err(Fail::Trap(e)) => Err(e),
    }
}

/// Shorthand for a status failure.
pub fn fail<T>(s: i32) -> HResult<T> {
    Err(Fail::Status(s))
}

fn memory(caller: &mut Caller<'_, PwState>) -> HResult<Memory> {
    if let Some(m) = caller.data().memory {
        return Ok(m);
    }
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => {
            caller.data_mut().memory = Some(m);
            Ok(m)
        }
        _ => fail(status::INTERNAL_FAILURE),
    }
}

fn range(ptr: i32, len: i32, size: usize) -> HResult<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or(Fail::Status(status::INVALID_MEMORY_ACCESS))?;
    if end > size {
        return fail(status::INVALID_MEMORY_ACCESS);
    }
    Ok(start..end)
}

/// Copies `len` bytes at `ptr` out of guest memory.
pub fn read(caller: &mut Caller<'_, PwState>, ptr: i32, len: i32) -> HResult<Vec<u8>> {
    let m = memory(caller)?;
    let data = m.data(&*caller);
    let r = range(ptr, len, data.len())?;
    Ok(data[r].to_vec())
}

/// Reads a UTF-8 string at `ptr` (`BAD_ARGUMENT` if it is not UTF-8).
pub fn read_str(caller: &mut Caller<'_, PwState>, ptr: i32, len: i32) -> HResult<String> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| Fail::Status(status::BAD_ARGUMENT))
}

/// Writes `bytes` at `ptr`.
pub fn write(caller: &mut Caller<'_, PwState>, ptr: i32, bytes: &[u8]) -> HResult<()> {
    let m = memory(caller)?;
    let data = m.data_mut(&mut *caller);
    let len = i32::try_from(bytes.len()).map_err(|_| Fail::Status(status::BAD_ARGUMENT))?;
    let r = range(ptr, len, data.len())?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

/// Checks that `len` bytes at `ptr` are writable, before doing anything else.
pub fn check(caller: &mut Caller<'_, PwState>, ptr: i32, len: i32) -> HResult<()> {
    let m = memory(caller)?;
    let size = m.data(&*caller).len();
    range(ptr, len, size).map(|_| ())
}

/// Writes a little-endian u32.
pub fn write_u32(caller: &mut Caller<'_, PwState>, ptr: i32, v: u32) -> HResult<()> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Writes a little-endian u64.
pub fn write_u64(caller: &mut Caller<'_, PwState>, ptr: i32, v: u64) -> HResult<()> {
    write(caller, ptr, &v.to_le_bytes())
}

fn allocator(caller: &mut Caller<'_, PwState>) -> HResult<Arc<TypedFunc<i32, i32>>> {
    if let Some(f) = &caller.data().alloc {
        return Ok(Arc::clone(f));
    }
    // Envoy looks up `malloc` first, then the SDK's `proxy_on_memory_allocate`.
    for name in ["malloc", "proxy_on_memory_allocate"] {
        if let Some(Extern::Func(f)) = caller.get_export(name) {
            if let Ok(t) = f.typed::<i32, i32>(&*caller) {
                let t = Arc::new(t);
                caller.data_mut().alloc = Some(Arc::clone(&t));
                return Ok(t);
            }
        }
    }
    fail(status::INTERNAL_FAILURE)
}

/// Hands `bytes` to the guest: allocated with its allocator (the guest owns and
/// frees it), the address written at `ptr_out` and the length at `len_out`. The
/// out-pointers are checked before the allocation so a bad one leaks nothing.
///
/// No bytes: nothing is allocated, address 0 and length 0 are written, as
/// proxy-wasm-cpp-host's `copyToPointerSize` (and `proxy_get_buffer_bytes`
/// for a zero length) does; the SDKs read the null address as "none" (the
/// Rust SDK's buffers, properties and shared data give `None`; its header
/// values `Some("")`).
pub fn give(
    caller: &mut Caller<'_, PwState>,
    bytes: &[u8],
    ptr_out: i32,
    len_out: i32,
) -> HResult<()> {
    check(caller, ptr_out, 4)?;
    check(caller, len_out, 4)?;
    if bytes.is_empty() {
        write_u32(caller, ptr_out, 0)?;
        return write_u32(caller, len_out, 0);
    }
    let len = i32::try_from(bytes.len()).map_err(|_| Fail::Status(status::INTERNAL_FAILURE))?;
    let alloc = allocator(caller)?;
    let at = alloc.call(&mut *caller, len)?;
    if at == 0 {
        return fail(status::INTERNAL_FAILURE);
    }
    write(caller, at, bytes)?;
    write_u32(caller, ptr_out, at as u32)?;
    write_u32(caller, len_out, len as u32)
}

/// Header-like pairs as raw bytes.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Serializes header-like pairs in the proxy-wasm map format.
pub fn serialize_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut size = 4;
    for (k, v) in pairs {
        size += 8 + k.as_ref().len() + v.as_ref().len() + 2;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Parses the proxy-wasm map format (`None` if malformed or over Envoy's caps).
pub fn parse_pairs(data: &[u8]) -> Option<Pairs> {
    if data.is_empty() || data == [0] {
        return Some(Vec::new());
    }
    if data.len() > MAX_MAP_BYTES {
        return None;
    }
    let u32_at = |i: usize| -> Option<usize> {
        let b = data.get(i..i + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let n = u32_at(0)?;
    if n > MAX_MAP_PAIRS {
        return None;
    }
    let mut pos = 4 + n.checked_mul(8)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let kl = u32_at(4 + i * 8)?;
        let vl = u32_at(8 + i * 8)?;
        let k = data.get(pos..pos.checked_add(kl)?)?.to_vec();
        pos += kl + 1;
        let v = data.get(pos..pos.checked_add(vl)?)?.to_vec();
        pos += vl + 1;
        if pos > data.len() {
            return None;
        }
        out.push((k, v));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_spec_example() {
        let pairs = vec![(b"1".to_vec(), b"2".to_vec())];
        let bytes = serialize_pairs(&pairs);
        // The spec's example, with the correct bytes for '1' and '2'.
        assert_eq!(
            bytes,
            [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0x31, 0, 0x32, 0]
        );
        assert_eq!(parse_pairs(&bytes), Some(pairs));
        assert_eq!(parse_pairs(&[]), Some(vec![]));
        assert_eq!(parse_pairs(&[0]), Some(vec![]));
    }

    #[test]
    fn malformed_pairs_are_refused() {
        assert_eq!(parse_pairs(&[1, 0, 0, 0]), None);
        assert_eq!(
            parse_pairs(&[1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, b'a', 0]),
            None
        );
        assert_eq!(parse_pairs(&[0xff, 0xff, 0xff, 0xff]), None);
    }
}

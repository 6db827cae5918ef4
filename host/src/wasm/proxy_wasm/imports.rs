//! Every `env` host function of proxy-wasm ABI 0.2.1 (so modules built by the SDKs,
//! which import nearly all of them, instantiate), the two Emscripten runtime
//! imports Envoy's host links for C++ SDK filters, and the WASI preview1 calls
//! filters use, implemented directly on the module's memory under both
//! `wasi_snapshot_preview1` and `wasi_unstable`.
//!
//! Statuses are the ones the Rust SDK handles for each call (its wrappers panic on
//! anything else). What this host does not do yet answers as documented in
//! docs/proxy-wasm.md: foreign functions `NOT_FOUND`. gRPC calls and streams
//! are in [`super::grpc`]. Body buffers exist during the body callback of their direction
//! (Envoy's start/length rules for writes); trailers maps once trailers arrived. HTTP callouts go through the host's
//! callouts (the same grants, limits and stats as component plugins).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use rand::RngCore;
use wasmtime::{Caller, Linker};

use super::abi::{
    buffer, check, errno, fail, give, parse_pairs, read, read_str, run, serialize_pairs, status,
    write, write_u32, write_u64, Fail, HResult,
};
use super::state::{Metric, Phase, PwState};
use super::{grpc, headers, properties, shared};
use crate::filter::{CalloutRequest, Direction, LocalResponse};

type C<'a> = Caller<'a, PwState>;

const MAX_LOG: usize = 4096;

fn st(r: Result<(), i32>) -> HResult<()> {
    r.map_err(Fail::Status)
}

/// Logs `msg` at proxy-wasm `level` as one line (a message's newlines, e.g.
/// of the SDK's panic hook, escaped as the component host does), keeping it
/// at `error` and above for the failure of the running call
/// ([`crate::wasm::stdio::record`]).
fn log_line(c: &C<'_>, level: i32, msg: &[u8]) {
    log_as(&c.data().meta.name, level, msg);
}

/// [`log_line`] for plugin `name`.
pub(super) fn log_as(name: &str, level: i32, msg: &[u8]) {
    let raw = String::from_utf8_lossy(&msg[..msg.len().min(MAX_LOG)]);
    if level >= 4 {
        crate::wasm::stdio::record(&raw);
    }
    let text = legate_abi_rules::log::one_line(raw.trim_end_matches(['\r', '\n']), MAX_LOG);
    match level {
        0 => tracing::trace!(plugin = name, "{text}"),
        1 => tracing::debug!(plugin = name, "{text}"),
        2 => tracing::info!(plugin = name, "{text}"),
        3 => tracing::warn!(plugin = name, "{text}"),
        _ => tracing::error!(plugin = name, "{text}"),
    }
}

/// The body of the callout response being delivered, if any.
fn call_body(s: &PwState) -> Option<Bytes> {
    match &s.call_response {
        Some(Ok(r)) => Some(r.body.clone()),
        _ => None,
    }
}

/// The body buffer of `kind` (`HTTP_REQUEST_BODY`/`HTTP_RESPONSE_BODY`): it
/// exists only during the body callback of its direction, holding everything the
/// filter has held so far plus the new data.
/// On a TCP connection, the data buffers (`DOWNSTREAM_DATA`/`UPSTREAM_DATA`)
/// are the same per-direction slots during that direction's data callback,
/// and in a call's callback they hold what the filter holds (the chain lends
/// it, `NetworkFilter::held_in_callouts`).
fn body_mut(s: &mut PwState, kind: i32) -> Option<&mut crate::filter::BodyBuf> {
    let (d, phase) = match kind {
        buffer::HTTP_REQUEST_BODY => (Direction::Request, Phase::Body(Direction::Request)),
        buffer::HTTP_RESPONSE_BODY => (Direction::Response, Phase::Body(Direction::Response)),
        buffer::DOWNSTREAM_DATA => (Direction::Request, Phase::Data(Direction::Request)),
        buffer::UPSTREAM_DATA => (Direction::Response, Phase::Data(Direction::Response)),
        _ => return None,
    };
    let held = matches!(phase, Phase::Data(_))
        && s.phase == Phase::CalloutResponse
        && s.tcp_contexts.contains(&s.x_context);
    if s.phase != phase && !held {
        return None;
    }
    s.exchange()?.bodies[d.idx()].as_mut()
}

/// `proxy_set_buffer_bytes` on a body, with Envoy's rules (its `Buffer::copyFrom`
/// in source/extensions/common/wasm/context.cc): `start = 0` drains the first
/// `size` bytes (all of them if `size` is the length or more) and prepends
/// `data`, so `(0, 0)` prepends, `(0, n)` replaces the first `n` bytes and
/// `(0, len)` replaces the body; `start >= len` (and `start > 0`) appends;
/// anything else (a splice in the middle) is `BAD_ARGUMENT`. A body the write
/// would take over `cap` is `BAD_ARGUMENT` too, so a filter cannot grow a buffer
/// without bound.
fn write_body(
    body: &mut Vec<u8>,
    start: usize,
    size: usize,
    data: &[u8],
    cap: usize,
) -> Result<(), i32> {
    let len = body.len();
    let drained = if start == 0 { size.min(len) } else { 0 };
    if start != 0 && start < len {
        return Err(status::BAD_ARGUMENT);
    }
    let new_len = (len - drained).saturating_add(data.len());
    if new_len > cap.max(len) {
        return Err(status::BAD_ARGUMENT);
    }
    if start == 0 {
        body.splice(0..drained, data.iter().copied());
    } else {
        body.extend_from_slice(data);
    }
    Ok(())
}

/// `proxy_http_call`: checks the grant and the request, queues the callout (on
/// the exchange, sent by the chain after the call; or, from the root context, sent
/// by the filter after the call) and returns its token. `BAD_ARGUMENT` for a
/// cluster not in `capabilities.clusters` or a request without `:method`,
/// `:path` or `:authority` (Envoy's `httpCall` answers; the Rust SDK returns
/// them as errors; a `host` pair does not stand for `:authority`, as in Envoy),
/// `INTERNAL_FAILURE` when no callout can be sent now (too many outstanding, or
/// during start/configure/log). Fields the host owns are dropped
/// ([`callout_field`]).
fn http_call(
    s: &mut PwState,
    cluster: String,
    pairs: &[(Vec<u8>, Vec<u8>)],
    body: Vec<u8>,
    timeout_ms: u32,
) -> Result<u32, i32> {
    let (mut method, mut path, mut authority) = (None, None, None);
    let mut has_authority = false;
    let mut headers = HeaderMap::new();
    for (k, v) in pairs {
        match k.as_slice() {
            b":method" => method = http::Method::from_bytes(v).ok(),
            b":path" => path = std::str::from_utf8(v).ok().map(str::to_string),
            // Field names are case-insensitive (`Host` as much as `host`).
            k if k == b":authority" || k.eq_ignore_ascii_case(b"host") => {
                has_authority |= k == b":authority";
                authority = std::str::from_utf8(v).ok().map(str::to_string);
            }
            b":scheme" => {}
            _ => {
                let field = callout_field(k, v).ok_or(status::BAD_ARGUMENT)?;
                if let Some((name, value)) = field {
                    crate::wasm::host::put_field(&mut headers, name, value, false)
                        .map_err(|_| status::BAD_ARGUMENT)?;
                } else {
                    tracing::debug!(plugin = &*s.meta.name, "callout header dropped");
                }
            }
        }
    }
    let (Some(method), Some(path), true) = (method, path, has_authority) else {
        return Err(status::BAD_ARGUMENT);
    };
    queue_call(
        s, cluster, method, path, authority, headers, body, timeout_ms,
    )
}

/// A header a callout (`proxy_http_call`, gRPC metadata) asks for: `None` for
/// an invalid name or value; `Some(None)` for a field the host owns
/// ([`crate::wasm::host::denied_field`]: `connection`, `content-length`,
/// `te`, …), which is dropped. Component callouts refuse those; Envoy accepts
/// them (passing them on as given), and the Rust SDK panics on an error, so a
/// filter written for Envoy keeps working here.
pub(super) fn callout_field(k: &[u8], v: &[u8]) -> Option<Option<(HeaderName, HeaderValue)>> {
    let name = HeaderName::from_bytes(k).ok()?;
    let value = HeaderValue::from_bytes(v).ok()?;
    Some((!crate::wasm::host::denied_field(&name)).then_some((name, value)))
}

/// `proxy_grpc_call`: a unary gRPC call, sent as an HTTP/2 callout (the
/// cluster must speak `h2`) `POST /SERVICE/METHOD` with the message framed.
/// A bad or ungranted upstream is `PARSE_FAILURE` ([`grpc::request_head`]).
fn grpc_call(
    s: &mut PwState,
    upstream: &[u8],
    service: &str,
    method: &str,
    metadata: &[(Vec<u8>, Vec<u8>)],
    message: &[u8],
    timeout_ms: u32,
) -> Result<u32, i32> {
    let (cluster, path, headers) =
        grpc::request_head(s, upstream, service, method, metadata, timeout_ms)?;
    let body = grpc::frame(message).ok_or(status::BAD_ARGUMENT)?;
    let token = queue_call(
        s,
        cluster,
        http::Method::POST,
        path,
        None,
        headers,
        body.to_vec(),
        timeout_ms,
    )?;
    s.grpc_calls.insert(token);
    Ok(token)
}

/// The context a callout or stream opened now belongs to: the exchange's, or
/// the root context's outside any exchange; `INTERNAL_FAILURE` when none can
/// (a read-only phase, or the effective context is another one).
fn calling_context(s: &mut PwState) -> Result<u32, i32> {
    if s.exchange().is_some() {
        Ok(s.x_context)
    } else if s.phase == Phase::Root && s.x_context == 0 && s.effective == s.root {
        Ok(s.root)
    } else {
        Err(status::INTERNAL_FAILURE)
    }
}

/// Queues a callout of the current context (HTTP or gRPC), within the plugin's
/// granted clusters and the per-context and per-instance bounds; its token.
#[allow(clippy::too_many_arguments)]
fn queue_call(
    s: &mut PwState,
    cluster: String,
    method: http::Method,
    path: String,
    authority: Option<String>,
    headers: HeaderMap,
    body: Vec<u8>,
    timeout_ms: u32,
) -> Result<u32, i32> {
    use crate::wasm::host::{
        CALLOUTS_PER_CONTEXT, CALLOUTS_PER_INSTANCE, CALLOUT_MAX_RESPONSE, CALLOUT_MAX_TIMEOUT_MS,
    };
    if !s.meta.clusters.contains(&cluster) {
        tracing::warn!(
            plugin = &*s.meta.name,
            "a callout to cluster `{cluster}`, which the plugin is not granted: add it \
             to the plugin's `capabilities.clusters`"
        );
        return Err(status::BAD_ARGUMENT);
    }
    if !path.starts_with('/') || path.parse::<http::Uri>().is_err() {
        return Err(status::BAD_ARGUMENT);
    }
    let context = calling_context(s)?;
    let mine = s.outstanding.values().filter(|c| **c == context).count();
    if mine >= CALLOUTS_PER_CONTEXT || s.outstanding.len() >= CALLOUTS_PER_INSTANCE {
        return Err(status::INTERNAL_FAILURE);
    }
    let token = s.new_token();
    let req = CalloutRequest {
        id: u64::from(token),
        cluster,
        method,
        path,
        authority,
        headers,
        body: body.into(),
        // 0 is no timeout in Envoy (its `httpCall` sets none on the async
        // client; a unary gRPC call sends no `grpc-timeout`): here, the most
        // any call may wait.
        timeout: Duration::from_millis(u64::from(match timeout_ms {
            0 => CALLOUT_MAX_TIMEOUT_MS,
            ms => ms.min(CALLOUT_MAX_TIMEOUT_MS),
        })),
        max_response_body: CALLOUT_MAX_RESPONSE,
    };
    s.outstanding.insert(token, context);
    if context == s.root {
        s.root_callouts.push((s.root, req));
    } else {
        s.x.callouts.push(req);
    }
    s.meta.callouts_sent.inc();
    Ok(token)
}

/// The most verbose level tracing records, in proxy-wasm's numbering.
fn log_level() -> u32 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => 0,
        LevelFilter::DEBUG => 1,
        LevelFilter::INFO => 2,
        LevelFilter::WARN => 3,
        LevelFilter::ERROR => 4,
        _ => 5,
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn monotonic_nanos() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Builds a local response from `proxy_send_local_response`'s arguments.
fn local_response(
    code: u32,
    details: Vec<u8>,
    body: Vec<u8>,
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    grpc_status: i32,
) -> Result<LocalResponse, i32> {
    let mut headers = HeaderMap::new();
    for (k, v) in pairs {
        let n = HeaderName::from_bytes(&k).map_err(|_| status::BAD_ARGUMENT)?;
        let v = HeaderValue::from_bytes(&v).map_err(|_| status::BAD_ARGUMENT)?;
        crate::wasm::host::put_field(&mut headers, n, v, false)
            .map_err(|_| status::BAD_ARGUMENT)?;
    }
    let details = crate::local_reply::details(&String::from_utf8_lossy(&details));
    let code = u16::try_from(code).map_err(|_| status::BAD_ARGUMENT)?;
    if !(200..=599).contains(&code) {
        return Err(status::BAD_ARGUMENT);
    }
    Ok(LocalResponse {
        status: StatusCode::from_u16(code).map_err(|_| status::BAD_ARGUMENT)?,
        headers,
        body: Bytes::from(body),
        details,
        // As Envoy: a known gRPC status is used if the request is gRPC (the
        // answer then takes gRPC's form, `crate::local_reply`); otherwise, or
        // for -1, the status `code` maps to.
        grpc_status: u32::try_from(grpc_status).ok().filter(|&g| g <= 16),
    })
}

/// Links every import this host provides.
pub fn add_to_linker(l: &mut Linker<PwState>) -> wasmtime::Result<()> {
    add_env(l)?;
    for module in ["wasi_snapshot_preview1", "wasi_unstable"] {
        add_wasi(l, module)?;
    }
    Ok(())
}

#[allow(clippy::too_many_lines)]
fn add_env(l: &mut Linker<PwState>) -> wasmtime::Result<()> {
    const E: &str = "env";
    // ---- logging, time, ticks ----
    l.func_wrap(
        E,
        "proxy_log",
        |mut c: C<'_>, level: i32, p: i32, n: i32| {
            run(&mut c, |c| {
                let msg = read(c, p, n)?;
                log_line(c, level, &msg);
                Ok(())
            })
        },
    )?;
    l.func_wrap(E, "proxy_get_log_level", |mut c: C<'_>, out: i32| {
        run(&mut c, |c| write_u32(c, out, log_level()))
    })?;
    l.func_wrap(
        E,
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, out: i32| run(&mut c, |c| write_u64(c, out, now_nanos())),
    )?;
    l.func_wrap(
        E,
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, ms: i32| {
            run(&mut c, |c| {
                let ms = u64::from(ms as u32);
                // Per root context: each plugin of a shared VM ticks on its own.
                let s = c.data_mut();
                let root = s.root;
                if ms > 0 {
                    s.ticks.insert(root, Duration::from_millis(ms));
                } else {
                    s.ticks.remove(&root);
                }
                // Envoy's `setTickPeriod` re-arms the timer at once (the same
                // period too): the root's tick task, if it is waiting, waits
                // out the new period from now (0: no more ticks). From
                // `proxy_on_tick` itself this changes nothing: the task reads
                // the period after each tick.
                if let Some(n) = s.tick_changed.get(&root) {
                    n.notify_waiters();
                }
                Ok(())
            })
        },
    )?;
    // ---- buffers ----
    l.func_wrap(
        E,
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, max: i32, out_p: i32, out_n: i32| {
            run(&mut c, |c| {
                let meta = c.data().meta.clone();
                let call_body = call_body(c.data());
                let grpc_message = c.data().grpc_message.clone();
                // Copied out (the guest's allocator runs before the write).
                let body = body_mut(c.data_mut(), kind).map(|b| b.to_vec());
                let all: &[u8] = match kind {
                    buffer::HTTP_REQUEST_BODY
                    | buffer::HTTP_RESPONSE_BODY
                    | buffer::DOWNSTREAM_DATA
                    | buffer::UPSTREAM_DATA => match &body {
                        Some(b) => b,
                        None => return fail(status::NOT_FOUND),
                    },
                    buffer::VM_CONFIGURATION => &meta.vm_config,
                    buffer::PLUGIN_CONFIGURATION => &meta.plugin_config,
                    buffer::HTTP_CALL_RESPONSE_BODY => match &call_body {
                        Some(b) => b,
                        None => return fail(status::NOT_FOUND),
                    },
                    buffer::GRPC_RECEIVE_BUFFER => match &grpc_message {
                        Some(b) => b,
                        None => return fail(status::NOT_FOUND),
                    },
                    // Foreign-function arguments: none exist in this host.
                    0..=8 => return fail(status::NOT_FOUND),
                    _ => return fail(status::BAD_ARGUMENT),
                };
                let start = (start as u32 as usize).min(all.len());
                let end = start.saturating_add(max as u32 as usize).min(all.len());
                give(c, &all[start..end], out_p, out_n)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, size: i32, p: i32, n: i32| {
            run(&mut c, |c| {
                let data = read(c, p, n)?;
                let cap = c.data().meta.body_limit;
                if let Some(body) = body_mut(c.data_mut(), kind) {
                    let (start, size) = (start as u32 as usize, size as u32 as usize);
                    return st(write_body(body.to_mut(), start, size, &data, cap));
                }
                // Other buffers are read-only, or do not exist in this phase
                // (Envoy answers the same).
                fail(if (0..=8).contains(&kind) {
                    status::NOT_FOUND
                } else {
                    status::BAD_ARGUMENT
                })
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_get_buffer_status",
        |mut c: C<'_>, kind: i32, size_out: i32, flags_out: i32| {
            run(&mut c, |c| {
                let meta = c.data().meta.clone();
                let body = body_mut(c.data_mut(), kind).map(|b| b.len());
                let len = match kind {
                    buffer::HTTP_REQUEST_BODY
                    | buffer::HTTP_RESPONSE_BODY
                    | buffer::DOWNSTREAM_DATA
                    | buffer::UPSTREAM_DATA => match body {
                        Some(n) => n,
                        None => return fail(status::NOT_FOUND),
                    },
                    buffer::VM_CONFIGURATION => meta.vm_config.len(),
                    buffer::PLUGIN_CONFIGURATION => meta.plugin_config.len(),
                    buffer::HTTP_CALL_RESPONSE_BODY => match call_body(c.data()) {
                        Some(b) => b.len(),
                        None => return fail(status::NOT_FOUND),
                    },
                    buffer::GRPC_RECEIVE_BUFFER => match &c.data().grpc_message {
                        Some(b) => b.len(),
                        None => return fail(status::NOT_FOUND),
                    },
                    0..=8 => return fail(status::NOT_FOUND),
                    _ => return fail(status::BAD_ARGUMENT),
                };
                check(c, flags_out, 4)?;
                write_u32(c, size_out, len as u32)?;
                write_u32(c, flags_out, 0)
            })
        },
    )?;
    // ---- header maps ----
    l.func_wrap(
        E,
        "proxy_get_header_map_size",
        |mut c: C<'_>, m: i32, out: i32| {
            run(&mut c, |c| {
                let pairs = headers::pairs(c.data_mut(), m).map_err(Fail::Status)?;
                write_u32(c, out, serialize_pairs(&pairs).len() as u32)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, m: i32, out_p: i32, out_n: i32| {
            run(&mut c, |c| {
                let pairs = headers::pairs(c.data_mut(), m).map_err(Fail::Status)?;
                // An empty map is address 0, length 0 (cpp-host's `getPairs`).
                let bytes = if pairs.is_empty() {
                    Vec::new()
                } else {
                    serialize_pairs(&pairs)
                };
                give(c, &bytes, out_p, out_n)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, m: i32, p: i32, n: i32| {
            run(&mut c, |c| {
                let data = read(c, p, n)?;
                let pairs = parse_pairs(&data).ok_or(Fail::Status(status::BAD_ARGUMENT))?;
                st(headers::set_all(c.data_mut(), m, &pairs))
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_get_header_map_value",
        |mut c: C<'_>, m: i32, kp: i32, kn: i32, out_p: i32, out_n: i32| {
            run(&mut c, |c| {
                let key = read(c, kp, kn)?;
                check(c, out_p, 4)?;
                check(c, out_n, 4)?;
                let v = headers::value(c.data_mut(), m, &key).map_err(Fail::Status)?;
                give(c, &v, out_p, out_n)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_add_header_map_value",
        |mut c: C<'_>, m: i32, kp: i32, kn: i32, vp: i32, vn: i32| {
            run(&mut c, |c| {
                let (k, v) = (read(c, kp, kn)?, read(c, vp, vn)?);
                st(headers::apply(c.data_mut(), m, headers::Op::Add(&k, &v)))
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_replace_header_map_value",
        |mut c: C<'_>, m: i32, kp: i32, kn: i32, vp: i32, vn: i32| {
            run(&mut c, |c| {
                let (k, v) = (read(c, kp, kn)?, read(c, vp, vn)?);
                st(headers::apply(
                    c.data_mut(),
                    m,
                    headers::Op::Replace(&k, &v),
                ))
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_remove_header_map_value",
        |mut c: C<'_>, m: i32, kp: i32, kn: i32| {
            run(&mut c, |c| {
                let k = read(c, kp, kn)?;
                st(headers::apply(c.data_mut(), m, headers::Op::Remove(&k)))
            })
        },
    )?;
    // ---- stream control ----
    l.func_wrap(E, "proxy_continue_stream", |mut c: C<'_>, stream: i32| {
        // Resumes the exchange held since a phase returned PAUSE, once the current
        // call (a callout response) returns; nothing to do when it is not held.
        // A TCP connection resumes the directions named (filter.rs).
        // An unknown stream type is `BAD_ARGUMENT`, as in Envoy.
        run(&mut c, |c| {
            let Ok(t @ 0..=3) = u8::try_from(stream) else {
                return fail(status::BAD_ARGUMENT);
            };
            let data = c.data_mut();
            if let Some(ctx) = data.detached_http() {
                // Another HTTP context, made effective (from a tick, a queue
                // event, a root or other context's callback): as Envoy's
                // `continueStream` on that context, it resumes the context's
                // pause (its wake-up delivers the resume with the exchange);
                // for a context that is not paused it does nothing.
                if let Some(wait) = data.stream_waits.get_mut(&ctx) {
                    *data.pending_resume.entry(ctx).or_default() |= 1 << t;
                    wait.fire();
                }
                return Ok(());
            }
            if let Some(ctx) = data.detached_tcp() {
                // Another TCP context, made effective: as Envoy's
                // `continueReading` on that connection, `DOWNSTREAM` resumes
                // its new connection or downstream data, `UPSTREAM` its
                // upstream data (see `ProxyWasmFilter::net_wake`), when it
                // is paused; the HTTP types do nothing, as in Envoy.
                if i32::from(t) >= super::abi::stream::DOWNSTREAM {
                    if let Some(wait) = data.net_waits.get_mut(&ctx) {
                        *data.pending_resume.entry(ctx).or_default() |= 1 << t;
                        wait.fire();
                    }
                }
                return Ok(());
            }
            data.resume = true;
            data.resumed_streams |= 1 << t;
            Ok(())
        })
    })?;
    l.func_wrap(E, "proxy_close_stream", |mut c: C<'_>, stream: i32| {
        run(&mut c, |c| {
            // An unknown stream type is `BAD_ARGUMENT`, as in Envoy.
            if !(0..=3).contains(&stream) {
                return fail(status::BAD_ARGUMENT);
            }
            let data = c.data_mut();
            if let Some(ctx) = data.detached_http() {
                // Another HTTP context, made effective: its exchange is reset
                // when its pause wakes, or at its next phase call (Envoy
                // resets it at once).
                data.pending_close.insert(ctx);
                if let Some(wait) = data.stream_waits.get_mut(&ctx) {
                    wait.fire();
                }
                return Ok(());
            }
            if let Some(ctx) = data.detached_tcp() {
                // Another TCP context, made effective: `DOWNSTREAM` or
                // `UPSTREAM` closes its connection when its pause wakes (at
                // once), or at its next callback (Envoy closes it at once);
                // the HTTP types do nothing, as in Envoy.
                if stream >= super::abi::stream::DOWNSTREAM {
                    data.pending_close.insert(ctx);
                    if let Some(wait) = data.net_waits.get_mut(&ctx) {
                        wait.fire();
                    }
                }
                return Ok(());
            }
            data.close = true;
            Ok(())
        })
    })?;
    l.func_wrap(
        E,
        "proxy_get_status",
        |mut c: C<'_>, code_out: i32, out_p: i32, out_n: i32| {
            run(&mut c, |c| {
                // The status of the gRPC call being closed (`proxy_on_grpc_close`);
                // OK with no message elsewhere, as Envoy answers.
                let (code, message) = c.data().grpc_status.clone().unwrap_or((0, String::new()));
                write_u32(c, code_out, code)?;
                give(c, message.as_bytes(), out_p, out_n)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: i32,
         dp: i32,
         dn: i32,
         bp: i32,
         bn: i32,
         hp: i32,
         hn: i32,
         grpc: i32| {
            run(&mut c, |c| {
                let details = read(c, dp, dn)?;
                let body = read(c, bp, bn)?;
                let hdrs = read(c, hp, hn)?;
                let pairs = parse_pairs(&hdrs).ok_or(Fail::Status(status::BAD_ARGUMENT))?;
                let s = c.data_mut();
                // An HTTP context outside its exchange (a gRPC stream event
                // while it is not paused, a tick after
                // `proxy_set_effective_context`): Envoy answers at once; the
                // answer goes with the exchange when its pause wakes, else at
                // its next phase call here.
                let detached = if s.exchange().is_some() {
                    None
                } else {
                    Some(
                        s.detached_http()
                            .ok_or(Fail::Status(status::BAD_ARGUMENT))?,
                    )
                };
                let lr = local_response(code as u32, details, body, pairs, grpc)
                    .map_err(Fail::Status)?;
                match detached {
                    // The first answer of a callback stands, as Envoy's: its
                    // second `sendLocalReply` finds the response under way.
                    None => {
                        s.local.get_or_insert(lr);
                    }
                    Some(ctx) => {
                        // The first answer stands, as Envoy sends the first.
                        s.pending_local.entry(ctx).or_insert(lr);
                        // A paused context is answered now, with its exchange.
                        if let Some(wait) = s.stream_waits.get_mut(&ctx) {
                            wait.fire();
                        }
                    }
                }
                Ok(())
            })
        },
    )?;
    // ---- callouts: HTTP and unary gRPC through the host's callouts ----
    l.func_wrap(
        E,
        "proxy_http_call",
        |mut c: C<'_>,
         up: i32,
         un: i32,
         hp: i32,
         hn: i32,
         bp: i32,
         bn: i32,
         tp: i32,
         tn: i32,
         timeout: i32,
         token_out: i32| {
            run(&mut c, |c| {
                let cluster = read_str(c, up, un)?;
                let hdrs = read(c, hp, hn)?;
                let body = read(c, bp, bn)?;
                read(c, tp, tn)?;
                check(c, token_out, 4)?;
                let pairs = parse_pairs(&hdrs).ok_or(Fail::Status(status::BAD_ARGUMENT))?;
                let token = http_call(c.data_mut(), cluster, &pairs, body, timeout as u32)
                    .map_err(Fail::Status)?;
                write_u32(c, token_out, token)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_grpc_call",
        |mut c: C<'_>,
         up: i32,
         un: i32,
         sp: i32,
         sn: i32,
         mp: i32,
         mn: i32,
         mdp: i32,
         mdn: i32,
         msgp: i32,
         msgn: i32,
         timeout: i32,
         token_out: i32| {
            run(&mut c, |c| {
                let upstream = read(c, up, un)?;
                let service = read_str(c, sp, sn)?;
                let method = read_str(c, mp, mn)?;
                let md = read(c, mdp, mdn)?;
                let message = read(c, msgp, msgn)?;
                check(c, token_out, 4)?;
                let pairs = if md.is_empty() {
                    Vec::new()
                } else {
                    parse_pairs(&md).ok_or(Fail::Status(status::BAD_ARGUMENT))?
                };
                let token = grpc_call(
                    c.data_mut(),
                    &upstream,
                    &service,
                    &method,
                    &pairs,
                    &message,
                    timeout as u32,
                )
                .map_err(Fail::Status)?;
                write_u32(c, token_out, token)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_grpc_stream",
        |mut c: C<'_>,
         up: i32,
         un: i32,
         sp: i32,
         sn: i32,
         mp: i32,
         mn: i32,
         mdp: i32,
         mdn: i32,
         token_out: i32| {
            run(&mut c, |c| {
                let upstream = read(c, up, un)?;
                let service = read_str(c, sp, sn)?;
                let method = read_str(c, mp, mn)?;
                let md = read(c, mdp, mdn)?;
                check(c, token_out, 4)?;
                let pairs = if md.is_empty() {
                    Vec::new()
                } else {
                    parse_pairs(&md).ok_or(Fail::Status(status::PARSE_FAILURE))?
                };
                let s = c.data_mut();
                let context = calling_context(s).map_err(Fail::Status)?;
                let token = grpc::open(s, context, &upstream, &service, &method, &pairs)
                    .map_err(Fail::Status)?;
                write_u32(c, token_out, token)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_grpc_send",
        |mut c: C<'_>, token: i32, p: i32, n: i32, end: i32| {
            run(&mut c, |c| {
                let message = read(c, p, n)?;
                st(grpc::send(c.data_mut(), token as u32, &message, end != 0))
            })
        },
    )?;
    l.func_wrap(E, "proxy_grpc_cancel", |mut c: C<'_>, token: i32| {
        run(&mut c, |c| st(grpc::cancel(c.data_mut(), token as u32)))
    })?;
    l.func_wrap(E, "proxy_grpc_close", |mut c: C<'_>, token: i32| {
        run(&mut c, |c| st(grpc::close(c.data_mut(), token as u32)))
    })?;
    // ---- shared data and queues ----
    l.func_wrap(
        E,
        "proxy_get_shared_data",
        |mut c: C<'_>, kp: i32, kn: i32, out_p: i32, out_n: i32, cas_out: i32| {
            run(&mut c, |c| {
                let key = read(c, kp, kn)?;
                check(c, cas_out, 4)?;
                let vm = c.data().meta.vm_id.clone();
                let (value, cas) = shared::get(&vm, &key).ok_or(Fail::Status(status::NOT_FOUND))?;
                give(c, &value, out_p, out_n)?;
                write_u32(c, cas_out, cas)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_set_shared_data",
        |mut c: C<'_>, kp: i32, kn: i32, vp: i32, vn: i32, cas: i32| {
            run(&mut c, |c| {
                let (key, value) = (read(c, kp, kn)?, read(c, vp, vn)?);
                let vm = c.data().meta.vm_id.clone();
                st(shared::set(&vm, &key, &value, cas as u32))
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_register_shared_queue",
        |mut c: C<'_>, np: i32, nn: i32, out: i32| {
            run(&mut c, |c| {
                let name = read(c, np, nn)?;
                check(c, out, 4)?;
                let vm = c.data().meta.vm_id.clone();
                let id = shared::register_queue(&vm, &name).map_err(Fail::Status)?;
                let root = c.data().root;
                c.data_mut().new_queues.push((root, id));
                write_u32(c, out, id)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vp: i32, vn: i32, np: i32, nn: i32, out: i32| {
            run(&mut c, |c| {
                let vm = read_str(c, vp, vn)?;
                let name = read(c, np, nn)?;
                check(c, out, 4)?;
                let id =
                    shared::resolve_queue(&vm, &name).ok_or(Fail::Status(status::NOT_FOUND))?;
                write_u32(c, out, id)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: i32, p: i32, n: i32| {
            run(&mut c, |c| {
                let v = read(c, p, n)?;
                st(shared::enqueue(id as u32, &v))
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: i32, out_p: i32, out_n: i32| {
            run(&mut c, |c| {
                check(c, out_p, 4)?;
                check(c, out_n, 4)?;
                let v = shared::dequeue(id as u32).map_err(Fail::Status)?;
                give(c, &v, out_p, out_n)
            })
        },
    )?;
    // ---- metrics ----
    l.func_wrap(
        E,
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, np: i32, nn: i32, out: i32| {
            run(&mut c, |c| {
                let name = read_str(c, np, nn)?;
                check(c, out, 4)?;
                let meta = c.data().meta.clone();
                // A name not exported still gets an id (Envoy refuses
                // none); only an unknown kind is BAD_ARGUMENT, as in Envoy.
                let id = meta
                    .define_metric(kind, &name)
                    .or_else(|| meta.sink(kind, &name))
                    .ok_or(Fail::Status(status::BAD_ARGUMENT))?;
                write_u32(c, out, id)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_record_metric",
        |mut c: C<'_>, id: i32, value: i64| {
            run(&mut c, |c| {
                let m = c
                    .data()
                    .meta
                    .metric(id as u32)
                    .ok_or(Fail::Status(status::NOT_FOUND))?;
                let v = value as u64;
                match m {
                    // Envoy's (and proxy-wasm-cpp-host's) `recordMetric`
                    // adds the value to a counter.
                    Metric::Counter(k) => k.add(v),
                    Metric::Gauge(g) => g.set(i64::try_from(v).unwrap_or(i64::MAX)),
                    // Envoy's `recordValue` of the value as given (its
                    // histogram's unit is `Unspecified`).
                    Metric::Histogram(h) => h.observe_value(v as f64),
                }
                Ok(())
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_increment_metric",
        |mut c: C<'_>, id: i32, delta: i64| {
            run(&mut c, |c| {
                let m = c
                    .data()
                    .meta
                    .metric(id as u32)
                    .ok_or(Fail::Status(status::NOT_FOUND))?;
                match m {
                    Metric::Counter(k) if delta >= 0 => k.add(delta as u64),
                    Metric::Gauge(g) => g.set(g.get().saturating_add(delta)),
                    _ => return fail(status::BAD_ARGUMENT),
                }
                Ok(())
            })
        },
    )?;
    l.func_wrap(E, "proxy_get_metric", |mut c: C<'_>, id: i32, out: i32| {
        run(&mut c, |c| {
            let m = c
                .data()
                .meta
                .metric(id as u32)
                .ok_or(Fail::Status(status::NOT_FOUND))?;
            let v = match m {
                Metric::Counter(k) => k.get(),
                Metric::Gauge(g) => g.get() as u64,
                Metric::Histogram(_) => return fail(status::BAD_ARGUMENT),
            };
            write_u64(c, out, v)
        })
    })?;
    // ---- properties ----
    l.func_wrap(
        E,
        "proxy_get_property",
        |mut c: C<'_>, pp: i32, pn: i32, out_p: i32, out_n: i32| {
            run(&mut c, |c| {
                let path = read(c, pp, pn)?;
                check(c, out_p, 4)?;
                check(c, out_n, 4)?;
                let v = properties::get(c.data_mut(), &path).map_err(Fail::Status)?;
                give(c, &v, out_p, out_n)
            })
        },
    )?;
    l.func_wrap(
        E,
        "proxy_set_property",
        |mut c: C<'_>, pp: i32, pn: i32, vp: i32, vn: i32| {
            run(&mut c, |c| {
                let (path, value) = (read(c, pp, pn)?, read(c, vp, vn)?);
                st(properties::set(c.data_mut(), &path, &value))
            })
        },
    )?;
    // ---- contexts, foreign functions ----
    l.func_wrap(E, "proxy_set_effective_context", |mut c: C<'_>, id: i32| {
        run(&mut c, |c| {
            let id = id as u32;
            if !c.data().contexts.contains(&id) {
                return fail(status::BAD_ARGUMENT);
            }
            c.data_mut().effective = id;
            Ok(())
        })
    })?;
    l.func_wrap(E, "proxy_done", |mut c: C<'_>| {
        // Only meaningful after `on_done` returned false, which this host treats
        // as done anyway.
        run(&mut c, |_| Ok(()))
    })?;
    l.func_wrap(
        E,
        "proxy_call_foreign_function",
        |mut c: C<'_>, np: i32, nn: i32, ap: i32, an: i32, _out_p: i32, _out_n: i32| {
            run(&mut c, |c| {
                read(c, np, nn)?;
                read(c, ap, an)?;
                fail(status::NOT_FOUND)
            })
        },
    )?;
    // ---- Emscripten's runtime, as proxy-wasm-cpp-host (Envoy) links it ----
    // A filter built with the proxy-wasm C++ SDK (Emscripten, standalone Wasm)
    // imports these from `env`: its allocator calls the first whenever it grows
    // the memory, its libc the second. Left to the trap-when-called fallback,
    // such a filter failed as soon as its heap grew. Both as in Envoy's host:
    // nothing to do on growth (this host reads the memory afresh on every
    // call); one thread, so two ids are the same thread when they are equal.
    l.func_wrap(
        E,
        "emscripten_notify_memory_growth",
        |_: C<'_>, _memory_index: i32| {},
    )?;
    l.func_wrap(E, "pthread_equal", |_: C<'_>, a: i32, b: i32| -> i32 {
        i32::from(a == b)
    })?;
    Ok(())
}

fn add_wasi(l: &mut Linker<PwState>, m: &str) -> wasmtime::Result<()> {
    // Results are WASI errnos; a bad pointer is EFAULT, never a host error.
    fn errno_of(r: HResult<()>) -> wasmtime::Result<i32> {
        match r {
            Ok(()) => Ok(errno::SUCCESS),
            Err(Fail::Status(_)) => Ok(errno::FAULT),
            Err(Fail::Trap(e)) => Err(e),
        }
    }
    l.func_wrap(
        m,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, n: i32, written: i32| -> wasmtime::Result<i32> {
            if fd != 1 && fd != 2 {
                return Ok(errno::BADF);
            }
            let mut gather = || -> HResult<()> {
                let mut out = Vec::new();
                for i in 0..(n as u32).min(1024) {
                    let at = (iovs as u32).wrapping_add(i * 8) as i32;
                    let iov = read(&mut c, at, 8)?;
                    let p = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                    let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                    out.extend(read(&mut c, p, len)?);
                }
                write_u32(&mut c, written, out.len() as u32)?;
                // By line, as the component host's stdio: a line written in
                // several calls is one log line.
                let level = if fd == 1 { 2 } else { 4 };
                for line in c.data_mut().stdio_lines(usize::from(fd == 2), &out) {
                    log_line(&c, level, &line);
                }
                Ok(())
            };
            errno_of(gather())
        },
    )?;
    l.func_wrap(
        m,
        "clock_time_get",
        |mut c: C<'_>, id: i32, _precision: i64, out: i32| -> wasmtime::Result<i32> {
            let t = match id {
                0 => now_nanos(),
                1..=3 => monotonic_nanos(),
                _ => return Ok(errno::INVAL),
            };
            errno_of(write_u64(&mut c, out, t))
        },
    )?;
    l.func_wrap(
        m,
        "clock_res_get",
        |mut c: C<'_>, _id: i32, out: i32| -> wasmtime::Result<i32> {
            errno_of(write_u64(&mut c, out, 1))
        },
    )?;
    l.func_wrap(
        m,
        "random_get",
        |mut c: C<'_>, p: i32, n: i32| -> wasmtime::Result<i32> {
            let mut buf = vec![0u8; (n as u32 as usize).min(1 << 20)];
            rand::rng().fill_bytes(&mut buf);
            errno_of(write(&mut c, p, &buf))
        },
    )?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        l.func_wrap(
            m,
            name,
            |mut c: C<'_>, count: i32, size: i32| -> wasmtime::Result<i32> {
                errno_of(write_u32(&mut c, count, 0).and_then(|()| write_u32(&mut c, size, 0)))
            },
        )?;
    }
    for name in ["environ_get", "args_get"] {
        l.func_wrap(
            m,
            name,
            |_: C<'_>, _a: i32, _b: i32| -> wasmtime::Result<i32> { Ok(errno::SUCCESS) },
        )?;
    }
    l.func_wrap(
        m,
        "proc_exit",
        |_: C<'_>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::format_err!("the module called proc_exit({code})"))
        },
    )?;
    l.func_wrap(m, "sched_yield", |_: C<'_>| -> wasmtime::Result<i32> {
        Ok(errno::SUCCESS)
    })?;
    // What std's start-up probes: no preopened directories, stdio is a character
    // device with no rights to anything else.
    l.func_wrap(
        m,
        "fd_prestat_get",
        |_: C<'_>, _fd: i32, _out: i32| -> wasmtime::Result<i32> { Ok(errno::BADF) },
    )?;
    l.func_wrap(
        m,
        "fd_prestat_dir_name",
        |_: C<'_>, _fd: i32, _p: i32, _n: i32| -> wasmtime::Result<i32> { Ok(errno::BADF) },
    )?;
    l.func_wrap(
        m,
        "fd_close",
        |_: C<'_>, _fd: i32| -> wasmtime::Result<i32> { Ok(errno::BADF) },
    )?;
    // As Envoy's (proxy-wasm-cpp-host): stdout and stderr answer, with the
    // right to write (`FD_WRITE`) and the rest zero; any other fd is `BADF`.
    // Runtimes probe their stdio with it as they start (Go's, TinyGo's):
    // `ENOSYS` there can fail the start.
    l.func_wrap(
        m,
        "fd_fdstat_get",
        |mut c: C<'_>, fd: i32, out: i32| -> wasmtime::Result<i32> {
            if fd != 1 && fd != 2 {
                return Ok(errno::BADF);
            }
            let mut stat = [0u8; 24];
            stat[8..16].copy_from_slice(&64u64.to_le_bytes());
            errno_of(write(&mut c, out, &stat))
        },
    )?;
    Ok(())
}

/// Links every import of `module` this host does not provide: a WASI preview1
/// call as "not supported" (`ENOSYS`), anything else as a trap naming it. Returns
/// the non-WASI ones, for a warning at load: a module that imports a function it
/// never calls still runs, as SDK modules importing unused functions need.
pub fn stub_the_rest(l: &mut Linker<PwState>, module: &wasmtime::Module) -> Vec<String> {
    let mut unknown = Vec::new();
    for imp in module.imports() {
        let wasmtime::ExternType::Func(ty) = imp.ty() else {
            continue;
        };
        let wasi = matches!(imp.module(), "wasi_snapshot_preview1" | "wasi_unstable");
        let name = format!("{}::{}", imp.module(), imp.name());
        let returns_errno =
            ty.results().len() == 1 && matches!(ty.results().next(), Some(wasmtime::ValType::I32));
        let what = name.clone();
        let defined = l.func_new(imp.module(), imp.name(), ty, move |_c, _args, results| {
            if wasi && returns_errno {
                results[0] = wasmtime::Val::I32(errno::NOSYS);
                return Ok(());
            }
            Err(wasmtime::format_err!(
                "the module called `{what}`, which this host does not provide"
            ))
        });
        // An error means the name is already defined by this host.
        if defined.is_ok() && !wasi {
            unknown.push(name);
        }
    }
    unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_response_details_are_one_bounded_token() {
        // As a component's local response: Envoy's response code details
        // have no whitespace; a CR/LF or 200 KB reached the access log.
        let lr = local_response(403, b"denied by\r\npolicy".to_vec(), vec![], vec![], -1).unwrap();
        assert_eq!(lr.details, "denied_by__policy");
        let lr = local_response(403, vec![b'd'; 200_000], vec![], vec![], -1).unwrap();
        assert_eq!(lr.details.len(), crate::local_reply::MAX_DETAILS);
    }

    #[test]
    fn body_writes_follow_envoys_copy_from() {
        let cap = 16;
        let mut b = b"body".to_vec();
        // start 0, size 0: prepend.
        assert_eq!(write_body(&mut b, 0, 0, b"<", cap), Ok(()));
        assert_eq!(b, b"<body");
        // start = len: append.
        assert_eq!(write_body(&mut b, 5, 0, b">", cap), Ok(()));
        assert_eq!(b, b"<body>");
        // start 0, size >= len: replace.
        assert_eq!(write_body(&mut b, 0, 6, b"new", cap), Ok(()));
        assert_eq!(b, b"new");
        assert_eq!(write_body(&mut b, 0, usize::MAX, b"x", cap), Ok(()));
        assert_eq!(b, b"x");
        // start 0, 0 < size < len: the first `size` bytes replaced (Envoy
        // drains them, then prepends).
        let mut b = b"abcdef".to_vec();
        assert_eq!(write_body(&mut b, 0, 3, b"Z", cap), Ok(()));
        assert_eq!(b, b"Zdef");
        assert_eq!(write_body(&mut b, 0, 1, b"XY", cap), Ok(()));
        assert_eq!(b, b"XYdef");
        // An empty body: start 0 prepends whatever the size.
        let mut e = Vec::new();
        assert_eq!(write_body(&mut e, 0, 7, b"new", cap), Ok(()));
        assert_eq!(e, b"new");
        // A splice in the middle: refused, unchanged.
        let mut b = b"abcdef".to_vec();
        assert_eq!(
            write_body(&mut b, 2, 1, b"Z", cap),
            Err(status::BAD_ARGUMENT)
        );
        assert_eq!(b, b"abcdef");
        // Over the cap: refused, unchanged; a replace may shrink under it.
        assert_eq!(
            write_body(&mut b, 6, 0, &[b'x'; 11], cap),
            Err(status::BAD_ARGUMENT)
        );
        assert_eq!(b, b"abcdef");
        assert_eq!(write_body(&mut b, 0, 6, &[b'y'; 16], cap), Ok(()));
        assert_eq!(b.len(), 16);
    }

    #[test]
    fn callouts_drop_the_fields_the_host_owns() {
        for k in [
            "connection",
            "transfer-encoding",
            "upgrade",
            "te",
            "keep-alive",
            "proxy-connection",
            "content-length",
            "Content-Length",
        ] {
            assert_eq!(callout_field(k.as_bytes(), b"5"), Some(None), "{k}");
        }
        let kept = callout_field(b"x-ok", b"1")
            .flatten()
            .map(|(k, v)| (k.to_string(), v));
        assert_eq!(
            kept,
            Some(("x-ok".to_string(), HeaderValue::from_static("1")))
        );
        assert_eq!(callout_field(b"bad name", b"1"), None);
        assert_eq!(callout_field(b"x-ok", b"bad\nvalue"), None);
    }

    #[test]
    fn http_and_grpc_calls_go_out_without_host_owned_fields() {
        let mut s = PwState::new(super::super::state::tests::meta(), 1 << 20);
        let owned = [
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("keep-alive", "5"),
            ("proxy-connection", "close"),
            ("content-length", "5"),
        ];
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = [
            (":method", "GET"),
            (":path", "/check"),
            (":authority", "authz"),
            ("x-keep", "1"),
        ]
        .iter()
        .chain(&owned)
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
        http_call(&mut s, "authz".into(), &pairs, Vec::new(), 0).unwrap();
        pairs.drain(..3);
        grpc_call(&mut s, b"authz", "svc.S", "M", &pairs, b"m", 0).unwrap();
        let [(_, http), (_, grpc)] = &s.root_callouts[..] else {
            panic!("two callouts queued")
        };
        for h in [&http.headers, &grpc.headers] {
            assert_eq!(h.get("x-keep").map(|v| v.as_bytes()), Some(&b"1"[..]));
            for (k, _) in owned.iter().filter(|(k, _)| *k != "te") {
                assert!(h.get(*k).is_none(), "{k} dropped");
            }
        }
        assert_eq!(http.headers.len(), 1, "{:?}", http.headers);
        // gRPC: the host's own `te: trailers`, not the filter's.
        assert_eq!(
            grpc.headers.get_all("te").iter().collect::<Vec<_>>(),
            ["trailers"]
        );
    }
}

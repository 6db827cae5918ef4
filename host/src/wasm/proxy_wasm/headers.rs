//! Header maps as proxy-wasm sees them: the request head with its pseudo-headers
//! (`:method`, `:path`, `:authority`, `:scheme`), the response head with
//! `:status`, and the request and response trailers, read and written on the
//! [`Exchange`] in the store; read-only, the callout response's head and
//! trailers and a gRPC stream's metadata being delivered.
//!
//! Writes follow the component ABI's rules: only in the phase that owns the map,
//! and never to the fields the host owns (framing, connection management), which
//! are ignored as Envoy ignores writes it cannot honour — except that
//! `content-length` may be removed from a head (as in Envoy, a filter that
//! changes a body's size removes it in the headers callback).

use crate::wasm::host::put_field;
use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};

use super::abi::{map, status, Pairs};
use super::state::{Phase, PwState};
use crate::filter::{BodyMode, Direction, Exchange};

// `denied`: fields the host owns, never writable by a filter (as for
// component plugins).
use legate_abi_rules::headers::host_owned as denied;

/// The pairs of map `which` as the guest sees them (`Err` status for a map type
/// that does not exist; an absent map, such as trailers, is empty).
pub fn pairs(s: &mut PwState, which: i32) -> Result<Pairs, i32> {
    if !(0..=map::MAX).contains(&which) {
        return Err(status::BAD_ARGUMENT);
    }
    if which == map::HTTP_CALL_RESPONSE_HEADERS {
        let mut out: Pairs = Vec::new();
        if let Some(Ok(r)) = &s.call_response {
            out.push((b":status".to_vec(), r.status.as_str().as_bytes().to_vec()));
            for (k, v) in &r.headers {
                out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
            }
        }
        return Ok(out);
    }
    if which == map::GRPC_RECEIVE_INITIAL_METADATA {
        return Ok(s.grpc_initial.clone().unwrap_or_default());
    }
    if which == map::GRPC_RECEIVE_TRAILING_METADATA {
        return Ok(s
            .grpc_trailing
            .iter()
            .flatten()
            .map(|(k, v)| (k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect());
    }
    if which == map::HTTP_CALL_RESPONSE_TRAILERS {
        let mut out: Pairs = Vec::new();
        if let Some(Ok(r)) = &s.call_response {
            for (k, v) in &r.trailers {
                out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
            }
        }
        return Ok(out);
    }
    let Some(x) = s.exchange() else {
        // An HTTP context called outside its exchange reads its maps as its
        // last callback left them, if it has a stream open (the only way
        // such a call comes); Envoy reads the stream's live maps.
        let kept = s
            .detached_http()
            .and_then(|c| s.kept_maps.get(&c))
            .and_then(|m| m.get(usize::try_from(which).ok()?));
        return Ok(kept.cloned().unwrap_or_default());
    };
    let mut out: Pairs = Vec::new();
    match which {
        map::REQUEST_HEADERS => {
            out.push((b":authority".to_vec(), x.authority.as_bytes().to_vec()));
            out.push((b":path".to_vec(), x.path.as_bytes().to_vec()));
            out.push((b":method".to_vec(), x.method.as_str().as_bytes().to_vec()));
            let scheme: &[u8] = if x.https { b"https" } else { b"http" };
            out.push((b":scheme".to_vec(), scheme.to_vec()));
            for (k, v) in &**x.request_headers() {
                out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
            }
        }
        map::RESPONSE_HEADERS => {
            if let (Some(st), Some(h)) = (x.status, x.response_headers.as_deref()) {
                out.push((b":status".to_vec(), st.as_str().as_bytes().to_vec()));
                for (k, v) in h {
                    out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
                }
            }
        }
        map::REQUEST_TRAILERS | map::RESPONSE_TRAILERS => {
            let d = trailers_direction(which);
            if let Some(t) = &x.trailers[d.idx()] {
                for (k, v) in t {
                    out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
                }
            }
        }
        _ => {}
    }
    Ok(out)
}

/// The value of `key` in map `which`: repeated fields joined with `,` (Envoy
/// returns only the first, a known portability trap).
pub fn value(s: &mut PwState, which: i32, key: &[u8]) -> Result<Vec<u8>, i32> {
    let key = key.to_ascii_lowercase();
    let all = pairs(s, which)?;
    let values: Vec<&[u8]> = all
        .iter()
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v.as_slice())
        .collect();
    if values.is_empty() {
        return Err(status::NOT_FOUND);
    }
    Ok(values.join(&b","[..]))
}

/// The direction of trailers map `which` (`REQUEST_TRAILERS` or
/// `RESPONSE_TRAILERS`).
fn trailers_direction(which: i32) -> Direction {
    if which == map::REQUEST_TRAILERS {
        Direction::Request
    } else {
        Direction::Response
    }
}

/// The plain (non-pseudo) fields of map `which`, writable.
fn fields(x: &mut Exchange, which: i32) -> Result<&mut http::HeaderMap, i32> {
    match which {
        map::REQUEST_HEADERS => Ok(&mut **x.request_headers()),
        map::RESPONSE_HEADERS => x
            .response_headers
            .as_deref_mut()
            .ok_or(status::BAD_ARGUMENT),
        map::REQUEST_TRAILERS | map::RESPONSE_TRAILERS => x.trailers
            [trailers_direction(which).idx()]
        .as_mut()
        .ok_or(status::BAD_ARGUMENT),
        _ => Err(status::BAD_ARGUMENT),
    }
}

/// Whether `op` on field `name` is ignored: writes to host-owned fields are,
/// except removing `content-length` from a head (so a filter that changes the
/// body's size can drop it, as in Envoy; the host then frames the body itself).
fn ignored(name: &str, op: &Op<'_>) -> bool {
    denied(name) && !(name == "content-length" && matches!(op, Op::Remove(_)))
}

/// How a write changes a map.
pub enum Op<'a> {
    /// Append a value.
    Add(&'a [u8], &'a [u8]),
    /// Replace every value (or add).
    Replace(&'a [u8], &'a [u8]),
    /// Remove every value.
    Remove(&'a [u8]),
}

/// The exchange if map `which` is writable now; `None` if the write is to be
/// ignored: a head that already went out, written from a body or trailers
/// callback (Envoy answers OK and the change goes nowhere; filters written for
/// it do this, and the Rust SDK panics on any other status).
fn writable(s: &mut PwState, which: i32) -> Result<Option<&mut Exchange>, i32> {
    let phase = s.phase;
    // During a callout response the exchange is held at its request head until
    // a response exists, at its response head after.
    let at_response = s.x.status.is_some();
    // A head held with its body (buffered mode, or paused by the headers
    // callback until the body callback continues) is writable there.
    let held = |d: Direction| {
        phase == Phase::Body(d)
            && (s.x.body_ctl.modes[d.idx()] == BodyMode::Buffered
                || s.x.body_ctl.holds_head[d.idx()])
    };
    let ok = match which {
        map::REQUEST_HEADERS => {
            phase == Phase::RequestHeaders
                || (phase == Phase::CalloutResponse && !at_response)
                || held(Direction::Request)
        }
        map::RESPONSE_HEADERS => {
            phase == Phase::ResponseHeaders
                || (phase == Phase::CalloutResponse && at_response)
                || held(Direction::Response)
        }
        map::REQUEST_TRAILERS | map::RESPONSE_TRAILERS => {
            phase == Phase::Trailers(trailers_direction(which))
        }
        _ => false,
    };
    // A head already sent: Envoy keeps the map and accepts the write, which goes
    // nowhere (and SDKs panic on an error status, so refusing it kills the filter).
    let head = matches!(which, map::REQUEST_HEADERS | map::RESPONSE_HEADERS);
    // A callout's result delivered between phases, as it arrived: every head
    // that exists went on (or waits for the upstream) as the filters left it,
    // except one this filter's headers callback holds (`Pause`, Envoy's
    // StopIteration) while its body streams: written there, it goes on with
    // the first chunk the body callback continues, as in Envoy.
    let idle = phase == Phase::CalloutResponse && s.x.idle;
    let held_now = idle
        && match which {
            map::REQUEST_HEADERS => {
                !at_response && s.x.body_ctl.holds_head[Direction::Request.idx()]
            }
            map::RESPONSE_HEADERS => {
                at_response && s.x.body_ctl.holds_head[Direction::Response.idx()]
            }
            _ => false,
        };
    let ok = (ok && !idle) || held_now;
    let late = ((matches!(phase, Phase::Body(_) | Phase::Trailers(_)) || idle) && head)
        || (which == map::REQUEST_HEADERS
            && (phase == Phase::ResponseHeaders
                || (phase == Phase::CalloutResponse && at_response)));
    let name = s.meta.name.clone();
    let message_map = matches!(
        which,
        map::REQUEST_HEADERS
            | map::REQUEST_TRAILERS
            | map::RESPONSE_HEADERS
            | map::RESPONSE_TRAILERS
    );
    if message_map && s.exchange().is_none() && s.detached_http().is_some() {
        // Envoy keeps an HTTP context's maps for the stream's life and accepts
        // writes to a head already sent (they go nowhere).
        tracing::debug!(
            plugin = &*name,
            "a header write from an HTTP context outside its exchange (a callback while it \
             is not paused) is ignored"
        );
        return Ok(None);
    }
    match s.exchange() {
        Some(x) if ok => Ok(Some(x)),
        Some(_) if late => {
            tracing::debug!(
                plugin = &*name,
                "a header write to a head that is already sent is ignored (a head can be \
                 changed while it is held: in its headers callback, or paused there)"
            );
            Ok(None)
        }
        _ => Err(status::BAD_ARGUMENT),
    }
}

/// Applies one write to map `which`.
pub fn apply(s: &mut PwState, which: i32, op: Op<'_>) -> Result<(), i32> {
    let Some(x) = writable(s, which)? else {
        return Ok(());
    };
    let key = match &op {
        Op::Add(k, _) | Op::Replace(k, _) | Op::Remove(k) => k.to_ascii_lowercase(),
    };
    if key.first() == Some(&b':') {
        return pseudo(x, which, &key, &op);
    }
    let name = HeaderName::from_bytes(&key).map_err(|_| status::BAD_ARGUMENT)?;
    if ignored(name.as_str(), &op) {
        return Ok(());
    }
    let headers = fields(x, which)?;
    match op {
        Op::Add(_, v) => {
            let v = HeaderValue::from_bytes(v).map_err(|_| status::BAD_ARGUMENT)?;
            put_field(headers, name, v, false).map_err(|_| status::BAD_ARGUMENT)?;
        }
        Op::Replace(_, v) => {
            let v = HeaderValue::from_bytes(v).map_err(|_| status::BAD_ARGUMENT)?;
            put_field(headers, name, v, true).map_err(|_| status::BAD_ARGUMENT)?;
        }
        Op::Remove(_) => {
            headers.remove(name);
        }
    }
    if which == map::REQUEST_HEADERS {
        x.head_changed();
    }
    Ok(())
}

/// A checked write to a pseudo-header, not applied yet.
enum PseudoWrite {
    Path(String),
    Method(Method),
    Authority(String),
    Status(StatusCode),
    /// The scheme is the connection's; Envoy ignores a rewrite too.
    Ignored,
}

/// Checks a write to a pseudo-header of map `which`; removing one is refused.
fn check_pseudo(which: i32, key: &[u8], op: &Op<'_>) -> Result<PseudoWrite, i32> {
    let v = match op {
        Op::Add(_, v) | Op::Replace(_, v) => *v,
        Op::Remove(_) => return Err(status::BAD_ARGUMENT),
    };
    let text = std::str::from_utf8(v).map_err(|_| status::BAD_ARGUMENT)?;
    Ok(match (which, key) {
        (map::REQUEST_HEADERS, b":path") => {
            if !text.starts_with('/') || text.parse::<http::Uri>().is_err() {
                return Err(status::BAD_ARGUMENT);
            }
            PseudoWrite::Path(text.to_string())
        }
        (map::REQUEST_HEADERS, b":method") => {
            PseudoWrite::Method(Method::from_bytes(v).map_err(|_| status::BAD_ARGUMENT)?)
        }
        (map::REQUEST_HEADERS, b":authority") => {
            if text.parse::<http::uri::Authority>().is_err() {
                return Err(status::BAD_ARGUMENT);
            }
            PseudoWrite::Authority(text.to_string())
        }
        (map::REQUEST_HEADERS, b":scheme") => PseudoWrite::Ignored,
        (map::RESPONSE_HEADERS, b":status") => {
            let code: u16 = text.parse().map_err(|_| status::BAD_ARGUMENT)?;
            if !(200..=599).contains(&code) {
                return Err(status::BAD_ARGUMENT);
            }
            PseudoWrite::Status(StatusCode::from_u16(code).map_err(|_| status::BAD_ARGUMENT)?)
        }
        _ => return Err(status::BAD_ARGUMENT),
    })
}

/// Applies a checked pseudo-header write: it changes the head itself.
fn apply_pseudo(x: &mut Exchange, w: PseudoWrite) {
    match w {
        PseudoWrite::Path(p) => x.path = p,
        PseudoWrite::Method(m) => x.method = m,
        PseudoWrite::Authority(a) => x.authority = a,
        PseudoWrite::Status(s) => {
            x.status = Some(s);
            return;
        }
        PseudoWrite::Ignored => return,
    }
    x.head_changed();
}

/// A write to a pseudo-header changes the head itself; removing one is refused.
fn pseudo(x: &mut Exchange, which: i32, key: &[u8], op: &Op<'_>) -> Result<(), i32> {
    apply_pseudo(x, check_pseudo(which, key, op)?);
    Ok(())
}

/// Whether new pairs name `content-length`.
fn fresh_names_length(new: &[(Vec<u8>, Vec<u8>)]) -> bool {
    new.iter()
        .any(|(k, _)| k.eq_ignore_ascii_case(b"content-length"))
}

/// Replaces map `which` with `pairs` (host-owned fields keep their values).
pub fn set_all(s: &mut PwState, which: i32, new: &[(Vec<u8>, Vec<u8>)]) -> Result<(), i32> {
    let Some(x) = writable(s, which)? else {
        return Ok(());
    };
    let headers = fields(x, which)?;
    // Check everything first, pseudo-headers included, so a bad pair leaves the
    // map and the head as they were.
    let mut fresh = http::HeaderMap::new();
    let mut pseudos = Vec::new();
    for (k, v) in new {
        let k = k.to_ascii_lowercase();
        if k.first() == Some(&b':') {
            pseudos.push(check_pseudo(which, &k, &Op::Replace(&k, v))?);
            continue;
        }
        let name = HeaderName::from_bytes(&k).map_err(|_| status::BAD_ARGUMENT)?;
        if denied(name.as_str()) {
            continue;
        }
        let v = HeaderValue::from_bytes(v).map_err(|_| status::BAD_ARGUMENT)?;
        put_field(&mut fresh, name, v, false).map_err(|_| status::BAD_ARGUMENT)?;
    }
    // Host-owned fields keep their values; `content-length` only if the new map
    // still names it (replacing the map without it removes it, as in Envoy).
    let keeps_length = fresh_names_length(new);
    for (k, v) in headers.iter() {
        if denied(k.as_str()) && (k != http::header::CONTENT_LENGTH || keeps_length) {
            fresh.append(k.clone(), v.clone());
        }
    }
    *headers = fresh;
    for w in pseudos {
        apply_pseudo(x, w);
    }
    if which == map::REQUEST_HEADERS {
        x.head_changed();
    }
    Ok(())
}

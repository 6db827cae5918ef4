//! `proxy_get_property` / `proxy_set_property`: Envoy's attribute names and value
//! encodings (strings raw, integers 8-byte little-endian, timestamps int64 ns,
//! booleans one byte, maps in the pairs format; a path segment after a map picks
//! one key, e.g. `request.headers.x-foo`; the request header map holds the
//! pseudo-headers, as Envoy's does). `response.grpc_status` follows Envoy's
//! order (trailers, head, then the HTTP status mapped), so a gRPC stats
//! filter's `on_log` reads what it reads in Envoy.
//!
//! Values the guest sets are Envoy's filter state (key `wasm.<path>`): kept on
//! the [`Exchange`] ([`ExchangeData::wasm_props`]), not in the VM, so every
//! proxy-wasm filter of the chain — another plugin, another VM — reads what an
//! earlier one set (Istio's metadata exchange → stats pattern), for the
//! exchange's life (a TCP connection's for network filters), `on_log`
//! included. [`Props`] caps them per exchange. As in Envoy, the built-in
//! attributes come first: a set value under a built-in name (`request`, ...)
//! is stored but reads give the built-in; `filter_state.wasm.<path>` reads a
//! set value too. A context called without its exchange (a root context; an
//! HTTP or TCP context made effective by another callback) keeps what it sets
//! in its VM, for itself, until its next property call with its exchange
//! moves it there.
//!
//! [`ExchangeData::wasm_props`]: crate::filter::ExchangeData::wasm_props

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{StatusCode, Version};

use super::abi::{serialize_pairs, status, Pairs};
use super::state::PwState;
use crate::filter::{Direction, Exchange};

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn header_pairs(h: &http::HeaderMap) -> Pairs {
    h.iter()
        .map(|(k, v)| (k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

/// A header map value: the whole map, or one key of it (repeated fields
/// joined with `,`).
fn map_value(h: &Pairs, rest: &[&[u8]]) -> Option<Vec<u8>> {
    match rest {
        [] => Some(serialize_pairs(h)),
        [key] => {
            let key = key.to_ascii_lowercase();
            let vals: Vec<&[u8]> = h
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.as_slice())
                .collect();
            (!vals.is_empty()).then(|| vals.join(&b","[..]))
        }
        _ => None,
    }
}

/// The request header map as Envoy's: the pseudo-headers (`:authority`,
/// `:path`, `:method`, `:scheme`) first, then the fields, as
/// `proxy_get_header_map_pairs` gives them.
fn request_pairs(x: &mut Exchange) -> Pairs {
    let scheme: &[u8] = if x.https { b"https" } else { b"http" };
    let mut out: Pairs = vec![
        (b":authority".to_vec(), x.authority.as_bytes().to_vec()),
        (b":path".to_vec(), x.path.as_bytes().to_vec()),
        (b":method".to_vec(), x.method.as_str().as_bytes().to_vec()),
        (b":scheme".to_vec(), scheme.to_vec()),
    ];
    out.extend(header_pairs(x.request_headers()));
    out
}

fn request(x: &mut Exchange, attr: &[u8], rest: &[&[u8]]) -> Option<Vec<u8>> {
    if attr == b"headers" {
        // `host` (the client's, now `:authority`) is answered alone too.
        if let [key] = rest {
            if key.eq_ignore_ascii_case(b"host") {
                return Some(x.authority.as_bytes().to_vec());
            }
        }
        return map_value(&request_pairs(x), rest);
    }
    if !rest.is_empty() {
        return None;
    }
    Some(match attr {
        b"path" => x.path.as_bytes().to_vec(),
        b"url_path" => x.path.split('?').next().unwrap_or("").as_bytes().to_vec(),
        // As Envoy's: after the `?`, up to a `#`; empty without a query.
        b"query" => x
            .path
            .split_once('?')
            .map_or("", |(_, q)| q.split('#').next().unwrap_or(""))
            .as_bytes()
            .to_vec(),
        b"host" => x.authority.as_bytes().to_vec(),
        b"scheme" => if x.https { "https" } else { "http" }.as_bytes().to_vec(),
        b"method" => x.method.as_str().as_bytes().to_vec(),
        b"id" => x.request_id_str().as_bytes().to_vec(),
        b"protocol" => protocol(x.version).as_bytes().to_vec(),
        b"time" => int(nanos(x.start)),
        b"duration" => int(SystemTime::now()
            .duration_since(x.start)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0)),
        b"referer" => x.request_headers().get("referer")?.as_bytes().to_vec(),
        b"useragent" => x.request_headers().get("user-agent")?.as_bytes().to_vec(),
        // As Envoy's: the declared length, else the body bytes received so
        // far (this callback's chunk included), in every callback.
        b"size" => {
            int(declared_length(x.request_headers())
                .unwrap_or_else(|| count(x.body_bytes.received())))
        }
        // As Envoy's: the body bytes received so far and the head's
        // (pseudo-headers included) names and values.
        b"total_size" => int(count(
            x.body_bytes.received() + byte_size(&request_pairs(x)),
        )),
        _ => return None,
    })
}

/// `response.*`. The code and its details come from the exchange's outcome, so
/// `on_log` has them for a reply the response callbacks did not see (a host
/// reply that ended the exchange while a filter held the request); the
/// headers and size need the response head.
fn response(x: &mut Exchange, attr: &[u8], rest: &[&[u8]]) -> Option<Vec<u8>> {
    let trailers = x.trailers[Direction::Response.idx()].as_ref();
    if attr == b"headers" {
        // With `:status`, as Envoy's response header map.
        let status = x.status?;
        let mut h: Pairs = vec![(b":status".to_vec(), status.as_str().as_bytes().to_vec())];
        h.extend(header_pairs(x.response_headers.as_deref()?));
        return map_value(&h, rest);
    }
    if attr == b"trailers" {
        // Empty until they arrive (or when the response has none), as Envoy's.
        x.status?;
        let t = trailers.map(header_pairs).unwrap_or_default();
        return map_value(&t, rest);
    }
    if !rest.is_empty() {
        return None;
    }
    Some(match attr {
        b"code" => int(i64::from(x.status?.as_u16())),
        b"flags" => int(response_flags(x.cause.as_deref())),
        b"grpc_status" => int(i64::from(grpc_status(
            trailers,
            x.response_headers.as_deref(),
            x.status?,
        ))),
        b"code_details" => match (&x.cause, x.status) {
            (Some(c), _) => c.clone().into_bytes(),
            (None, Some(_)) => b"via_upstream".to_vec(),
            (None, None) => return None,
        },
        // As Envoy's: the declared length, else the body bytes sent so far
        // (a body callback's chunk is not: it has not left yet), in every
        // callback (0 before the response).
        b"size" => int(x
            .response_headers
            .as_deref()
            .and_then(declared_length)
            .unwrap_or_else(|| count(x.body_bytes.sent()))),
        // As Envoy's: the body bytes sent so far, the head's and the
        // trailers' names and values (`:status` included).
        b"total_size" => {
            let head = x.response_headers.as_deref().map_or(0, |h| {
                byte_size(&header_pairs(h)) + x.status.map_or(0, |_| b":status".len() as u64 + 3)
            });
            let trailers = trailers.map_or(0, |t| byte_size(&header_pairs(t)));
            int(count(x.body_bytes.sent() + head + trailers))
        }
        _ => return None,
    })
}

/// `response.flags`: Envoy's legacy response flag bits (`UH`, `UF`, ... as
/// Istio's stats filter decodes them) for the exchange's cause; `0` for an
/// exchange nothing went wrong with, or whose cause has no flag in Envoy (a
/// filter's local response, a direct response, a plugin failure).
fn response_flags(cause: Option<&str>) -> i64 {
    match cause.unwrap_or_default() {
        "no_healthy_upstream" => 0x2,                           // UH
        "upstream_timeout" | "upstream_per_try_timeout" => 0x4, // UT
        "upstream_reset" => 0x10,                               // UR
        "upstream_connect_failure" => 0x20,                     // UF
        "overloaded" => 0x80,                                   // UO
        "no_route" => 0x100,                                    // NR
        "downstream_disconnect" | "downstream_reset" => 0x4000, // DC
        "stream_idle_timeout" => 0x1_0000,                      // SI
        "bad_request" | "request_headers_too_large" | "uri_too_long" => 0x4_0000, // DPE
        "upstream_protocol_error" => 0x80_0000,                 // UPE
        _ => 0,
    }
}

/// A head's `content-length`, if it has a valid one.
fn declared_length(h: &http::HeaderMap) -> Option<i64> {
    h.get("content-length")?.to_str().ok()?.parse().ok()
}

/// A header map's size as Envoy's `HeaderMap::byteSize()`: its names and
/// values.
fn byte_size(p: &Pairs) -> u64 {
    p.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
}

/// A byte count as a property's int.
fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `response.grpc_status` as Envoy's (`Grpc::Common::getGrpcStatus`): the
/// trailers' `grpc-status`, else the head's (a trailers-only answer), else
/// the one gRPC maps the HTTP status to (`UNKNOWN` for a `200` without one).
fn grpc_status(
    trailers: Option<&http::HeaderMap>,
    head: Option<&http::HeaderMap>,
    code: StatusCode,
) -> u32 {
    let field =
        |h: Option<&http::HeaderMap>| h?.get("grpc-status")?.to_str().ok()?.parse::<u32>().ok();
    field(trailers)
        .or_else(|| field(head))
        .unwrap_or_else(|| legate_abi_rules::grpc::status_of_http(code.as_u16()))
}

fn exchange_property(x: &mut Exchange, path: &[&[u8]]) -> Option<Vec<u8>> {
    let conn = x.conn.clone();
    // A TCP connection has no request, response or route.
    let tcp = crate::network_filter::is_connection(x.context);
    match path {
        [b"request" | b"response", ..] | [b"route_name"] | [b"xds", b"route_name"] if tcp => None,
        [b"cluster_name"] | [b"xds", b"cluster_name"] if tcp => Some(x.path.clone().into_bytes()),
        [b"request", attr, rest @ ..] => request(x, attr, rest),
        [b"response", attr, rest @ ..] => response(x, attr, rest),
        [b"source", b"address"] => Some(conn.source.to_string().into_bytes()),
        [b"source", b"port"] => Some(int(i64::from(conn.source.port()))),
        [b"destination", b"address"] => Some(conn.destination.to_string().into_bytes()),
        [b"destination", b"port"] => Some(int(i64::from(conn.destination.port()))),
        [b"connection", b"mtls"] => Some(vec![u8::from(conn.peer_cert_present())]),
        // Envoy's downstream connection id, under both of its names.
        [b"connection", b"id"] | [b"connection_id"] => {
            Some(int(i64::try_from(conn.id).unwrap_or(i64::MAX)))
        }
        [b"connection", b"tls_version"] => conn
            .tls13()
            .map(|v| if v { "TLSv1.3" } else { "TLSv1.2" }.into()),
        [b"connection", b"requested_server_name"] => conn.sni().map(String::into_bytes),
        [b"connection", b"subject_peer_certificate"] => conn.peer_subject().map(String::into_bytes),
        // The first of each, as Envoy's attributes.
        [b"connection", b"uri_san_peer_certificate"] => conn
            .peer_cert()
            .and_then(|p| p.uri_sans.first())
            .map(|s| s.clone().into_bytes()),
        [b"connection", b"dns_san_peer_certificate"] => conn
            .peer_cert()
            .and_then(|p| p.dns_sans.first())
            .map(|s| s.clone().into_bytes()),
        [b"upstream", b"address"] => x.upstream.map(|a| a.to_string().into_bytes()),
        [b"upstream", b"port"] => x.upstream.map(|a| int(i64::from(a.port()))),
        // Envoy 1.28 names them under `xds` too (`xds.route_name`, ...).
        [b"route_name"] | [b"xds", b"route_name"] => x.route_name().map(|r| r.as_bytes().to_vec()),
        [b"cluster_name"] | [b"xds", b"cluster_name"] => x.cluster().map(String::into_bytes),
        _ => None,
    }
}

/// Most properties one exchange (or one context without its exchange) may
/// hold, all its proxy-wasm filters together.
pub const MAX_PROPS: usize = 64;
/// Most bytes of paths and values one exchange may hold.
pub const MAX_PROPS_BYTES: usize = 1 << 20;
/// The longest path and value `proxy_set_property` takes.
const MAX_PATH: usize = 1024;
const MAX_VALUE: usize = 64 << 10;

/// The first segments Envoy answers itself (its attributes and the Wasm
/// ones): a value set under one of them is never what a read returns.
const BUILT_IN: [&[u8]; 22] = [
    b"request",
    b"response",
    b"connection",
    b"upstream",
    b"source",
    b"destination",
    b"metadata",
    b"filter_state",
    b"upstream_filter_state",
    b"xds",
    b"node",
    b"cluster_name",
    b"cluster_metadata",
    b"route_name",
    b"route_metadata",
    b"listener_direction",
    b"listener_metadata",
    b"upstream_host_metadata",
    b"plugin_name",
    b"plugin_root_id",
    b"plugin_vm_id",
    b"connection_id",
];

/// The values set with `proxy_set_property` on one exchange (Envoy's filter
/// state): host memory outside the plugins' caps, so bounded per exchange
/// ([`MAX_PROPS`], [`MAX_PROPS_BYTES`]) and dropped with it.
#[derive(Default, Debug)]
pub struct Props {
    values: HashMap<Vec<u8>, Vec<u8>>,
    /// Bytes of the paths and values in `values`.
    bytes: usize,
}

impl Props {
    /// Sets `path`; replacing a value counts it once, so an exchange at the
    /// caps can always update what is set (unless the new value is larger
    /// than the room left).
    fn set(&mut self, path: &[u8], value: &[u8], caps: (usize, usize)) -> Result<(), i32> {
        if path.is_empty() || path.len() > MAX_PATH || value.len() > MAX_VALUE {
            return Err(status::BAD_ARGUMENT);
        }
        let old = self.values.get(path).map(|v| path.len() + v.len());
        let bytes = self.bytes - old.unwrap_or(0) + path.len() + value.len();
        if (old.is_none() && self.values.len() >= caps.0) || bytes > caps.1 {
            return Err(status::BAD_ARGUMENT);
        }
        self.bytes = bytes;
        self.values.insert(path.to_vec(), value.to_vec());
        Ok(())
    }
}

/// Whether the effective context's exchange is the one in the store.
fn live(s: &PwState) -> bool {
    s.x_context != 0 && s.effective == s.x_context
}

/// Moves to the exchange in the store what its context set while called
/// without it (past the exchange's caps, dropped as a set would fail).
fn adopt(s: &mut PwState) {
    if s.props.is_empty() || !live(s) {
        return;
    }
    if let Some(own) = s.props.remove(&s.x_context) {
        for (k, v) in own.values {
            let _ =
                s.x.wasm_props
                    .get_or_insert_default()
                    .set(&k, &v, (MAX_PROPS, MAX_PROPS_BYTES));
        }
    }
}

/// The value set at `path` that the effective context sees: its exchange's
/// when the exchange is in the store, else its own in the VM.
fn stored(s: &mut PwState, path: &[u8]) -> Option<Vec<u8>> {
    adopt(s);
    let p = if live(s) {
        s.x.wasm_props.as_deref()?
    } else {
        s.props.get(&s.effective)?
    };
    p.values.get(path).cloned()
}

/// The value of property `path` (segments joined by NUL) as seen by the effective
/// context, or the status to return.
pub fn get(s: &mut PwState, path: &[u8]) -> Result<Vec<u8>, i32> {
    // (A trailing NUL, as some SDKs send, ends the last segment.)
    let path = path.strip_suffix(&[0]).unwrap_or(path);
    let segs: Vec<&[u8]> = path.split(|b| *b == 0).collect();
    let first = segs.first().copied().unwrap_or_default();
    if !BUILT_IN.contains(&first) {
        // A set value, by its whole path.
        return stored(s, path).ok_or(status::NOT_FOUND);
    }
    let meta = s.meta.clone();
    let v = match segs.as_slice() {
        [b"plugin_name"] => Some(meta.name.as_bytes().to_vec()),
        [b"plugin_root_id"] => Some(meta.root_id.as_bytes().to_vec()),
        [b"plugin_vm_id"] => Some(meta.vm_id.as_bytes().to_vec()),
        // Envoy's filter state by key: the values set are `wasm.<path>`.
        [b"filter_state", key] => key.strip_prefix(b"wasm.").and_then(|k| stored(s, k)),
        other => s.exchange().and_then(|x| exchange_property(x, other)),
    };
    v.ok_or(status::NOT_FOUND)
}

/// Stores a value set by the guest (Envoy's filter state): on the effective
/// context's exchange, else for that context in the VM. A path under a
/// built-in name is stored too (readable as `filter_state.wasm.<path>`), as
/// Envoy stores it; reads of the built-in are unaffected.
pub fn set(s: &mut PwState, path: &[u8], value: &[u8]) -> Result<(), i32> {
    let path = path.strip_suffix(&[0]).unwrap_or(path);
    adopt(s);
    let caps = (MAX_PROPS, MAX_PROPS_BYTES);
    if live(s) {
        return s
            .x
            .wasm_props
            .get_or_insert_default()
            .set(path, value, caps);
    }
    s.props
        .entry(s.effective)
        .or_default()
        .set(path, value, caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_capped_per_context_and_replaceable_at_the_cap() {
        let caps = (3, 40);
        let mut p = Props::default();
        for k in [&b"a"[..], b"b", b"c"] {
            p.set(k, b"0123456789", caps).unwrap();
        }
        assert_eq!(p.bytes, 33);
        assert_eq!(
            p.set(b"d", b"", caps),
            Err(status::BAD_ARGUMENT),
            "over the count"
        );
        // Replacing at the count cap is allowed, and counted once.
        p.set(b"a", b"xy", caps).unwrap();
        assert_eq!(p.bytes, 25);
        assert_eq!(p.values.get(&b"a"[..]).map(Vec::as_slice), Some(&b"xy"[..]));
        assert_eq!(
            p.set(b"b", &[0; 27], caps),
            Err(status::BAD_ARGUMENT),
            "over the bytes"
        );
        p.set(b"b", &[0; 25], caps).unwrap();
        assert_eq!(p.bytes, 40);
        assert_eq!(p.set(b"", b"x", caps), Err(status::BAD_ARGUMENT));
    }

    /// A VM's store with exchange `x` live for its context `pw`.
    fn live(x: Exchange, pw: u32) -> PwState {
        let mut s = PwState::new(super::super::state::tests::meta(), 1 << 20);
        s.x = x;
        s.x_context = pw;
        s.effective = pw;
        s
    }

    #[test]
    fn values_set_are_the_exchanges_and_built_ins_come_first() {
        let mut x = Exchange::placeholder();
        x.context = 9;
        // The writer's VM (its context 2) sets; the reader's (context 5)
        // reads, once the exchange moved on to it.
        let mut w = live(x, 2);
        assert_eq!(set(&mut w, b"peer", b"a"), Ok(()));
        assert_eq!(set(&mut w, b"request\0method", b"SHADOW"), Ok(()));
        let x = std::mem::replace(&mut w.x, Exchange::placeholder());
        let mut r = live(x, 5);
        assert_eq!(get(&mut r, b"peer"), Ok(b"a".to_vec()));
        assert_eq!(get(&mut r, b"filter_state\0wasm.peer"), Ok(b"a".to_vec()));
        assert_eq!(get(&mut r, b"request\0method"), Ok(b"GET".to_vec()));
        assert_eq!(
            get(&mut r, b"filter_state\0wasm.request\0method"),
            Err(status::NOT_FOUND)
        );
        // Not in the writer's VM any more.
        assert_eq!(get(&mut w, b"peer"), Err(status::NOT_FOUND));
        // A context called without its exchange keeps its own, moved to the
        // exchange at its next property call with it.
        r.x_context = 0;
        assert_eq!(set(&mut r, b"late", b"1"), Ok(()));
        assert_eq!(get(&mut r, b"late"), Ok(b"1".to_vec()));
        r.x_context = 5;
        assert_eq!(get(&mut r, b"late"), Ok(b"1".to_vec()));
        assert!(r.props.is_empty());
        assert_eq!(r.x.wasm_props.as_ref().unwrap().values.len(), 3);
    }

    #[test]
    fn many_concurrent_contexts_each_set_their_properties() {
        // Contexts called without their exchange keep their own: 4
        // properties for each of 400 of them, 1600 in the VM, more than a
        // VM-wide cap of 1024 would let through.
        let mut s = PwState::new(super::super::state::tests::meta(), 1 << 20);
        for ctx in 2..402 {
            s.effective = ctx;
            for k in [&b"a"[..], b"b", b"c", b"d"] {
                assert_eq!(set(&mut s, k, b"v"), Ok(()), "context {ctx}");
            }
        }
        s.effective = 401;
        assert_eq!(get(&mut s, b"d"), Ok(b"v".to_vec()));
        // At its count cap, a context may still replace what it set.
        s.effective = 1;
        for i in 0..MAX_PROPS {
            set(&mut s, format!("p{i}").as_bytes(), b"1").unwrap();
        }
        assert_eq!(set(&mut s, b"one-more", b"1"), Err(status::BAD_ARGUMENT));
        assert_eq!(set(&mut s, b"p0", b"2"), Ok(()));
        assert_eq!(get(&mut s, b"p0"), Ok(b"2".to_vec()));
    }
}

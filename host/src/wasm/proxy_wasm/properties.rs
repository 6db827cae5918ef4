//! `proxy_get_property` / `proxy_set_property`: Envoy's attribute names and value
//! encodings (strings raw, integers 8-byte little-endian, timestamps int64 ns,
//! booleans one byte, maps in the pairs format; a path segment after a map picks
//! one key, e.g. `request.headers.x-foo`).
//!
//! Properties the guest sets are kept per context (stream) and read back before
//! the built-in ones, as Envoy's filter state is ([`Props`]: capped per
//! context, so concurrent exchanges never crowd each other out).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use http::Version;

use super::abi::{serialize_pairs, status};
use super::state::PwState;
use crate::filter::Exchange;

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

fn header_pairs(h: &http::HeaderMap) -> Vec<(Vec<u8>, Vec<u8>)> {
    h.iter()
        .map(|(k, v)| (k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

/// A header map value: the whole map, or one key of it.
fn map_value(h: &http::HeaderMap, rest: &[&[u8]]) -> Option<Vec<u8>> {
    match rest {
        [] => Some(serialize_pairs(&header_pairs(h))),
        [key] => {
            let key = std::str::from_utf8(key).ok()?.to_ascii_lowercase();
            let vals: Vec<&[u8]> = h
                .get_all(key.as_str())
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            (!vals.is_empty()).then(|| vals.join(&b","[..]))
        }
        _ => None,
    }
}

fn request(x: &mut Exchange, attr: &[u8], rest: &[&[u8]]) -> Option<Vec<u8>> {
    if attr == b"headers" {
        let mut h = x.request_headers().clone();
        if let Ok(v) = http::HeaderValue::from_str(&x.authority) {
            h.insert(http::header::HOST, v);
        }
        return map_value(&h, rest);
    }
    if !rest.is_empty() {
        return None;
    }
    Some(match attr {
        b"path" => x.path.as_bytes().to_vec(),
        b"url_path" => x.path.split('?').next().unwrap_or("").as_bytes().to_vec(),
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
        // The body size as declared (the host does not count streamed bodies).
        b"size" => int(x
            .request_headers()
            .get("content-length")?
            .to_str()
            .ok()?
            .parse()
            .ok()?),
        _ => return None,
    })
}

/// `response.*`. The code and its details come from the exchange's outcome, so
/// `on_log` has them for a reply the response callbacks did not see (a host
/// reply that ended the exchange while a filter held the request); the
/// headers and size need the response head.
fn response(x: &mut Exchange, attr: &[u8], rest: &[&[u8]]) -> Option<Vec<u8>> {
    if attr == b"headers" {
        return map_value(x.response_headers.as_deref()?, rest);
    }
    if !rest.is_empty() {
        return None;
    }
    Some(match attr {
        b"code" => int(i64::from(x.status?.as_u16())),
        b"code_details" => match (&x.cause, x.status) {
            (Some(c), _) => c.clone().into_bytes(),
            (None, Some(_)) => b"via_upstream".to_vec(),
            (None, None) => return None,
        },
        b"size" => int(x
            .response_headers
            .as_ref()?
            .get("content-length")?
            .to_str()
            .ok()?
            .parse()
            .ok()?),
        _ => return None,
    })
}

fn exchange_property(x: &mut Exchange, path: &[&[u8]]) -> Option<Vec<u8>> {
    let conn = x.conn.clone();
    // A TCP connection has no request, response or route.
    let tcp = crate::network_filter::is_connection(x.context);
    match path {
        [b"request" | b"response", ..] | [b"route_name"] if tcp => None,
        [b"cluster_name"] if tcp => Some(x.path.clone().into_bytes()),
        [b"request", attr, rest @ ..] => request(x, attr, rest),
        [b"response", attr, rest @ ..] => response(x, attr, rest),
        [b"source", b"address"] => Some(conn.source.to_string().into_bytes()),
        [b"source", b"port"] => Some(int(i64::from(conn.source.port()))),
        [b"destination", b"address"] => Some(conn.destination.to_string().into_bytes()),
        [b"destination", b"port"] => Some(int(i64::from(conn.destination.port()))),
        [b"connection", b"mtls"] => Some(vec![u8::from(conn.peer_cert_present())]),
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
        [b"route_name"] => x.route_name().map(|r| r.as_bytes().to_vec()),
        [b"cluster_name"] => x.cluster().map(String::into_bytes),
        _ => None,
    }
}

/// Most properties one context may set.
pub const MAX_PROPS: usize = 64;
/// Most bytes of paths and values one context may hold.
pub const MAX_PROPS_BYTES: usize = 1 << 20;
/// The longest path and value `proxy_set_property` takes.
const MAX_PATH: usize = 1024;
const MAX_VALUE: usize = 64 << 10;

/// The properties one context set: host memory outside the plugin's cap, so
/// bounded per context ([`MAX_PROPS`], [`MAX_PROPS_BYTES`]) and dropped with it.
#[derive(Default)]
pub struct Props {
    values: HashMap<Vec<u8>, Vec<u8>>,
    /// Bytes of the paths and values in `values`.
    bytes: usize,
}

impl Props {
    /// Sets `path`; replacing a value counts it once, so a context at the
    /// caps can always update what it set (unless the new value is larger
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

/// The value of property `path` (segments joined by NUL) as seen by the effective
/// context, or the status to return.
pub fn get(s: &mut PwState, path: &[u8]) -> Result<Vec<u8>, i32> {
    if let Some(v) = s.props.get(&s.effective).and_then(|p| p.values.get(path)) {
        return Ok(v.clone());
    }
    let segs: Vec<&[u8]> = path
        .strip_suffix(&[0])
        .unwrap_or(path)
        .split(|b| *b == 0)
        .collect();
    let meta = s.meta.clone();
    let v = match segs.as_slice() {
        [b"plugin_name"] => Some(meta.name.as_bytes().to_vec()),
        [b"plugin_root_id"] => Some(meta.root_id.as_bytes().to_vec()),
        [b"plugin_vm_id"] => Some(meta.vm_id.as_bytes().to_vec()),
        other => s.exchange().and_then(|x| exchange_property(x, other)),
    };
    v.ok_or(status::NOT_FOUND)
}

/// Stores a guest property for the effective context (the built-in attributes are
/// read-only: setting one stores a shadow the guest reads back, as in Envoy's
/// filter state).
pub fn set(s: &mut PwState, path: &[u8], value: &[u8]) -> Result<(), i32> {
    s.props
        .entry(s.effective)
        .or_default()
        .set(path, value, (MAX_PROPS, MAX_PROPS_BYTES))
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

    #[test]
    fn many_concurrent_contexts_each_set_their_properties() {
        // 4 properties for each of 400 live contexts: 1600 in the VM, more
        // than a VM-wide cap of 1024 would let through.
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

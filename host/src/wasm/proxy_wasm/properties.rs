//! `proxy_get_property` / `proxy_set_property`: Envoy's attribute names and value
//! encodings (strings raw, integers 8-byte little-endian, timestamps int64 ns,
//! booleans one byte, maps in the pairs format; a path segment after a map picks
//! one key, e.g. `request.headers.x-foo`).
//!
//! Properties the guest sets are kept per context (stream) and read back before
//! the built-in ones, as Envoy's filter state is.

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
        let mut h = x.request_headers.clone();
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
        b"id" => x.request_id.as_bytes().to_vec(),
        b"protocol" => protocol(x.version).as_bytes().to_vec(),
        b"time" => int(nanos(x.start)),
        b"duration" => int(SystemTime::now()
            .duration_since(x.start)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0)),
        b"referer" => x.request_headers.get("referer")?.as_bytes().to_vec(),
        b"useragent" => x.request_headers.get("user-agent")?.as_bytes().to_vec(),
        // The body size as declared (the host does not count streamed bodies).
        b"size" => int(x
            .request_headers
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
        [b"upstream", b"address"] => x.upstream.map(|a| a.to_string().into_bytes()),
        [b"upstream", b"port"] => x.upstream.map(|a| int(i64::from(a.port()))),
        [b"route_name"] => x.route_name().map(|r| r.as_bytes().to_vec()),
        [b"cluster_name"] => x.cluster().map(String::into_bytes),
        _ => None,
    }
}

/// The value of property `path` (segments joined by NUL) as seen by the effective
/// context, or the status to return.
pub fn get(s: &mut PwState, path: &[u8]) -> Result<Vec<u8>, i32> {
    if let Some(v) = s.props.get(&(s.effective, path.to_vec())) {
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
    if path.is_empty() || path.len() > 1024 || value.len() > (64 << 10) || s.props.len() > 1024 {
        return Err(status::BAD_ARGUMENT);
    }
    s.props.insert((s.effective, path.to_vec()), value.to_vec());
    Ok(())
}

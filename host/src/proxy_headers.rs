//! Standard proxy header handling: what every HTTP proxy must do to a message's
//! headers on the way through, independent of routes. Pure functions on a
//! [`HeaderMap`], so they apply the same way to requests and responses and to
//! HTTP/1.1 and HTTP/2.
//!
//! The request path calls them in this order, before the route's header
//! operations: [`strip_hop_by_hop`] (first, so that headers the proxy adds next
//! cannot be removed by a client naming them in `Connection`), [`set_forwarded`],
//! [`forward_client_cert`], [`request_id`], [`add_via`]. Responses get
//! [`strip_hop_by_hop`] and [`add_via`].
//!
//! Trust: at the edge a client can send any header. `x-forwarded-*`,
//! `forwarded` and `x-request-id` from an untrusted downstream are therefore
//! replaced or removed, never extended; only a listener configured with `trust_downstream` (behind another
//! proxy Legate trusts) keeps and appends to them. `x-forwarded-client-cert`
//! names an identity, so trust alone does not keep it: the listener's
//! `forward_client_cert` decides, and by default it is removed (as Envoy).

use std::fmt::Write as _;
use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, TE, VIA};
use legate_abi_rules::headers as rules;
use legate_abi_rules::headers::{list_items, offers_trailers, trim_ows};

use crate::config::{ClientCertDetails, ForwardClientCert};
use crate::tls::TlsInfo;

/// `keep-alive` (RFC 9112 appendix C.2.2; no constant in `http`).
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `proxy-connection`, a non-standard `Connection` some old clients send.
pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// `x-forwarded-for`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `x-request-id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest incoming `x-request-id` kept from a trusted downstream.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Headers always removed: connection-specific (RFC 9110 §7.6.1, RFC 9112) or, for
/// `proxy-authorization`, credentials meant for this proxy and not the origin. `te`
/// is handled on its own (see [`strip_hop_by_hop`]). The list is
/// `legate_abi_rules::headers::HOP_BY_HOP`, which the SDK's test harness strips
/// callout responses with too; here as `HeaderName`s (standard ones compare by
/// their tag). As a `static`, or as `http`'s own constants, the proxied
/// request cost the same (callgrind, within 100 instructions).
pub const HOP_BY_HOP: [HeaderName; rules::HOP_BY_HOP.len()] = [
    HeaderName::from_static(rules::HOP_BY_HOP[0]),
    HeaderName::from_static(rules::HOP_BY_HOP[1]),
    HeaderName::from_static(rules::HOP_BY_HOP[2]),
    HeaderName::from_static(rules::HOP_BY_HOP[3]),
    HeaderName::from_static(rules::HOP_BY_HOP[4]),
    HeaderName::from_static(rules::HOP_BY_HOP[5]),
];

/// Headers a `Connection` option cannot remove
/// (`legate_abi_rules::headers::NOT_NOMINATABLE`): `host` and `content-length`
/// carry the message's target and framing; `te` follows its own rule.
const NOT_NOMINATABLE: [HeaderName; rules::NOT_NOMINATABLE.len()] = [
    HeaderName::from_static(rules::NOT_NOMINATABLE[0]),
    HeaderName::from_static(rules::NOT_NOMINATABLE[1]),
    HeaderName::from_static(rules::NOT_NOMINATABLE[2]),
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it
/// lists, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`,
/// `Proxy-Authorization`, and `TE` unless it offers `trailers`, in which case it is
/// reduced to exactly `TE: trailers` (gRPC needs it; other codings are a property of
/// this hop only). `Trailer` and `Proxy-Authenticate` are kept: they describe the
/// message itself and are end-to-end in practice.
///
/// A caller proxying a protocol upgrade (WebSocket) reads `Upgrade` and `Connection`
/// before calling this and sets them again for the upstream hop.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    strip_hop_by_hop_but(h, None);
}

/// [`strip_hop_by_hop`] keeping `keep` (and a `Connection` naming only it is
/// still removed).
pub fn strip_hop_by_hop_but(h: &mut HeaderMap, keep: Option<&HeaderName>) {
    // Most messages carry none of these: one pass over the names (compared by
    // their standard-header tag) costs a tenth of seven hashed removals of absent
    // names, which were ~1.5k instructions per proxied request.
    if !h.keys().any(|k| k == TE || HOP_BY_HOP.contains(k)) {
        return;
    }
    let nominated: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| list_items(v.as_bytes()))
        .filter_map(|token| HeaderName::from_bytes(token).ok())
        .filter(|n| !NOT_NOMINATABLE.contains(n))
        .collect();
    for n in nominated.iter().chain(HOP_BY_HOP.iter()) {
        if Some(n) != keep {
            h.remove(n);
        }
    }

    let offers_trailers = h.get_all(TE).iter().any(|v| offers_trailers(v.as_bytes()));
    if offers_trailers {
        // `insert` replaces every TE line with the one value that may pass.
        let _ = h.try_insert(TE, HeaderValue::from_static("trailers"));
    } else {
        h.remove(TE);
    }
}

/// A client IP as `x-forwarded-for` writes it: made once per connection, as
/// formatting an address costs more than the rest of [`set_forwarded`].
/// IPv4-mapped IPv6 addresses (from a dual-stack listener) are written as
/// IPv4, IPv6 without brackets, as other proxies do.
#[derive(Clone, Debug)]
pub struct ForwardedFor(HeaderValue);

impl ForwardedFor {
    /// The value for client `ip`.
    pub fn new(ip: IpAddr) -> Self {
        // An IP literal is always a valid header value.
        ForwardedFor(
            HeaderValue::from_str(&ip.to_canonical().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        )
    }
}

/// Sets `x-forwarded-for`, `x-forwarded-proto` and `x-forwarded-host`.
///
/// Untrusted downstream: whatever came in is replaced with the client IP, the
/// scheme of the downstream connection and `host` (the request's authority), so a
/// client cannot spoof them. Trusted downstream: the client IP is appended to
/// `x-forwarded-for` (all incoming lines are joined into one comma-separated value)
/// and incoming `-proto`/`-host` are kept, set only when absent.
///
/// The client IP is written as [`ForwardedFor`] says. A `host` that is not a
/// valid header value is not forwarded.
pub fn set_forwarded(
    h: &mut HeaderMap,
    client: &ForwardedFor,
    https: bool,
    host: &str,
    trusted: bool,
) {
    let xff = if trusted {
        let mut joined: Vec<u8> = Vec::new();
        for v in h.get_all(&X_FORWARDED_FOR) {
            let v = trim_ows(v.as_bytes());
            if !v.is_empty() {
                joined.extend_from_slice(v);
                joined.extend_from_slice(b", ");
            }
        }
        joined.extend_from_slice(client.0.as_bytes());
        HeaderValue::from_bytes(&joined)
    } else {
        Ok(client.0.clone())
    };
    match xff {
        Ok(v) => {
            let _ = h.try_insert(X_FORWARDED_FOR, v);
        }
        // Unreachable: joined valid values and an IP literal form a valid value.
        Err(_) => {
            h.remove(&X_FORWARDED_FOR);
        }
    }

    if !trusted || !h.contains_key(&X_FORWARDED_PROTO) {
        let proto = HeaderValue::from_static(if https { "https" } else { "http" });
        let _ = h.try_insert(X_FORWARDED_PROTO, proto);
    }
    if !trusted || !h.contains_key(&X_FORWARDED_HOST) {
        match shared_value(host.as_bytes()) {
            Ok(v) if !host.is_empty() => {
                let _ = h.try_insert(X_FORWARDED_HOST, v);
            }
            _ => {
                h.remove(&X_FORWARDED_HOST);
            }
        }
    }
    if !trusted {
        strip_untrusted(h);
    }
}

/// The client address a trusted chain of `hops` proxies reported, as Envoy's
/// connection manager reads it with `xff_num_trusted_hops` (and
/// `use_remote_address`): the `hops`-th `x-forwarded-for` entry from the right,
/// before this hop appends the peer (each of those proxies appended the address
/// it was reached from, so that entry is the one the outermost wrote; entries to
/// its left are the client's to write). `None`, meaning the peer, when `hops` is
/// 0, when there are fewer entries, or when that entry is no IP address (an
/// `ip:port` one counts as its IP).
/// Several `x-forwarded-for` lines count as one list, in order; empty entries
/// are skipped, as [`set_forwarded`] drops them.
pub fn trusted_client(h: &HeaderMap, hops: u32) -> Option<IpAddr> {
    let hops = usize::try_from(hops).ok()?.checked_sub(1)?;
    let entry = h
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .rev()
        .flat_map(|v| v.as_bytes().rsplit(|&b| b == b','))
        .map(trim_ows)
        .filter(|e| !e.is_empty())
        .nth(hops)?;
    let entry = std::str::from_utf8(entry).ok()?;
    // Some balancers (Azure Application Gateway) write `ip:port`.
    let ip = entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<std::net::SocketAddr>().map(|a| a.ip()))
        .ok()?;
    Some(ip.to_canonical())
}

/// `x-forwarded-client-cert`.
pub const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// `forwarded` (RFC 7239).
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Removes what an untrusted client must not say to upstreams that trust an
/// Envoy in front of them: `x-forwarded-client-cert` (upstreams authorize on
/// its subject or SPIFFE id; [`forward_client_cert`] may then write this
/// hop's) and `x-envoy-*`
/// (`x-envoy-internal`, `x-envoy-external-address`...), as Envoy sanitizes
/// them from external requests; and the forwarding facts this hop does not
/// write: the other `x-forwarded-*` (`x-forwarded-port`, `x-forwarded-prefix`,
/// `x-forwarded-server`...) and RFC 7239's `forwarded`. Frameworks that build
/// absolute URLs (redirects, reset links) read them beside, or before, the
/// three [`set_forwarded`] replaces, so a client's would poison those URLs.
fn strip_untrusted(h: &mut HeaderMap) {
    let envoy = |k: &HeaderName| {
        let n = k.as_str();
        n.starts_with("x-envoy-")
            || *k == FORWARDED
            || (n.starts_with("x-forwarded-")
                && *k != X_FORWARDED_FOR
                && *k != X_FORWARDED_PROTO
                && *k != X_FORWARDED_HOST)
    };
    // One pass over the names; removal only when there is something to remove.
    if !h.keys().any(envoy) {
        return;
    }
    let names: Vec<HeaderName> = h.keys().filter(|k| envoy(k)).cloned().collect();
    for name in names {
        h.remove(&name);
    }
}

/// Applies a listener's `forward_client_cert` to a request's
/// `x-forwarded-client-cert`, as Envoy's connection manager does with
/// `forward_client_cert_details`: `always_forward_only` leaves it alone;
/// `sanitize`, and any other mode on a connection without a verified client
/// certificate, removes it; `forward_only` leaves it; `append_forward` appends
/// `element` to it after a `,` (joining several incoming lines into one
/// value), `sanitize_set` replaces it with `element`.
///
/// `element` makes this hop's element ([`xfcc_element`]); it is called only
/// when one is written. `None` from it (a value no header can carry) removes
/// the header: what the upstream gets is then never more than the truth.
pub fn forward_client_cert(
    h: &mut HeaderMap,
    mode: ForwardClientCert,
    mtls: bool,
    element: impl FnOnce() -> Option<HeaderValue>,
) {
    match mode {
        ForwardClientCert::AlwaysForwardOnly => return,
        ForwardClientCert::ForwardOnly if mtls => return,
        ForwardClientCert::AppendForward | ForwardClientCert::SanitizeSet if mtls => {}
        _ => {
            h.remove(&X_FORWARDED_CLIENT_CERT);
            return;
        }
    }
    let Some(element) = element() else {
        h.remove(&X_FORWARDED_CLIENT_CERT);
        return;
    };
    if mode == ForwardClientCert::SanitizeSet || !h.contains_key(&X_FORWARDED_CLIENT_CERT) {
        h.insert(X_FORWARDED_CLIENT_CERT, element);
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for v in h.get_all(&X_FORWARDED_CLIENT_CERT) {
        let v = trim_ows(v.as_bytes());
        if !v.is_empty() {
            joined.extend_from_slice(v);
            joined.push(b',');
        }
    }
    joined.extend_from_slice(element.as_bytes());
    match HeaderValue::from_bytes(&joined) {
        Ok(v) => {
            h.insert(X_FORWARDED_CLIENT_CERT, v);
        }
        // Unreachable: joined valid values form a valid value.
        Err(_) => {
            h.remove(&X_FORWARDED_CLIENT_CERT);
        }
    }
}

/// This hop's `x-forwarded-client-cert` element for a connection with a
/// client certificate, in Envoy's format and order: `By=` each URI SAN of the
/// listener's certificate, `Hash=` the SHA-256 of the client certificate (hex),
/// then as `details` asks `Cert="…"` and `Chain="…"` (URL-encoded PEM),
/// `Subject="…"` (RFC 4514; written even when empty), `URI=` each URI SAN
/// (`URI=` when none) and `DNS=` each DNS SAN, joined by `;`. `Subject`,
/// `Cert` and `Chain` are always quoted; another value is quoted when it holds
/// `,`, `;`, `=`, `"`, `\` or a space, with `"` and `\` escaped by `\`.
/// `None` without a client certificate, or when a value cannot go in a header
/// (a control character in a SAN).
pub fn xfcc_element(tls: &TlsInfo, details: Option<&ClientCertDetails>) -> Option<HeaderValue> {
    use sha2::{Digest, Sha256};
    let leaf = tls.peer_certs.first()?;
    let mut out = String::new();
    fn field(out: &mut String, key: &str) {
        if !out.is_empty() {
            out.push(';');
        }
        out.push_str(key);
        out.push('=');
    }
    for by in tls.local_uri_sans.iter() {
        field(&mut out, "By");
        push_xfcc_value(&mut out, by);
    }
    field(&mut out, "Hash");
    for byte in Sha256::digest(leaf.as_ref()) {
        let _ = write!(out, "{byte:02x}");
    }
    let d = details.copied().unwrap_or_default();
    if d.cert {
        field(&mut out, "Cert");
        out.push('"');
        push_url_encoded_pem(&mut out, leaf.as_ref());
        out.push('"');
    }
    if d.chain {
        field(&mut out, "Chain");
        out.push('"');
        for cert in &tls.peer_certs {
            push_url_encoded_pem(&mut out, cert.as_ref());
        }
        out.push('"');
    }
    if d.subject {
        // RFC 4514 already escapes `"` and `\` with `\`, as XFCC wants.
        field(&mut out, "Subject");
        out.push('"');
        out.push_str(tls.peer_subject().unwrap_or(""));
        out.push('"');
    }
    if d.uri || d.dns {
        let (uris, dns) = crate::tls::alt_names(leaf);
        if d.uri {
            if uris.is_empty() {
                field(&mut out, "URI");
            }
            for uri in &uris {
                field(&mut out, "URI");
                push_xfcc_value(&mut out, uri);
            }
        }
        if d.dns {
            for name in &dns {
                field(&mut out, "DNS");
                push_xfcc_value(&mut out, name);
            }
        }
    }
    // UTF-8 in a subject passes as obs-text, as Envoy sends it.
    HeaderValue::from_bytes(out.as_bytes()).ok()
}

/// A `By`, `URI` or `DNS` value, quoted when it holds a character that would
/// end it or the element early.
fn push_xfcc_value(out: &mut String, v: &str) {
    if !v
        .bytes()
        .any(|b| matches!(b, b',' | b';' | b'=' | b'"' | b'\\' | b' '))
    {
        out.push_str(v);
        return;
    }
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// A certificate as PEM, percent-encoded except RFC 3986's unreserved
/// characters (as Envoy's `Cert` and `Chain`).
fn push_url_encoded_pem(out: &mut String, der: &[u8]) {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    let mut line = 0;
    for chunk in der.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            let c = if i <= chunk.len() {
                char::from(B64[((n >> (18 - 6 * i)) & 63) as usize])
            } else {
                '='
            };
            pem.push(c);
        }
        line += 4;
        if line == 64 {
            pem.push('\n');
            line = 0;
        }
    }
    if line > 0 {
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    for b in pem.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Ensures `x-request-id` and returns the id in effect, if any.
///
/// An incoming id is kept only from a trusted downstream and only if valid
/// ([`is_valid_request_id`]); extra incoming lines are dropped. Otherwise, when
/// `generate` is true, a random UUIDv4-format id replaces it; when `generate` is
/// false, the header is removed (an untrusted or malformed id must not reach the
/// upstream or the logs).
pub fn request_id(h: &mut HeaderMap, trusted: bool, generate: bool) -> Option<HeaderValue> {
    let kept = if trusted {
        h.get(&X_REQUEST_ID)
            .filter(|v| is_valid_request_id(v.as_bytes()))
            .cloned()
    } else {
        None
    };
    let id = kept.or_else(|| generate.then(new_request_id));
    match &id {
        Some(v) => {
            let _ = h.try_insert(X_REQUEST_ID, v.clone());
        }
        None => {
            h.remove(&X_REQUEST_ID);
        }
    }
    id
}

/// Whether an incoming request id may be kept: 1 to [`MAX_REQUEST_ID_LEN`] bytes of
/// visible ASCII (no spaces, no control or non-ASCII bytes), so it is safe to log
/// and to pass on.
pub fn is_valid_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_REQUEST_ID_LEN && v.iter().all(|b| b.is_ascii_graphic())
}

/// A new random request id in UUIDv4 format (`xxxxxxxx-xxxx-4xxx-Vxxx-xxxxxxxxxxxx`,
/// lower-case hex), from the thread-local CSPRNG so ids cannot be predicted.
pub fn new_request_id() -> HeaderValue {
    let mut b = rand::random::<u128>().to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 9562 variant
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 36];
    let mut o = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[o] = b'-';
            o += 1;
        }
        out[o] = HEX[usize::from(byte >> 4)];
        out[o + 1] = HEX[usize::from(byte & 0x0f)];
        o += 2;
    }
    // Every byte is a hex digit or `-`, all valid in a header value.
    shared_value(&out)
        .unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-4000-8000-000000000000"))
}

/// A header value made per request that is then copied (the request id goes
/// into the head and the exchange; a filter that reads the head later keeps a
/// copy of it): its bytes live in one reference-counted allocation, so a copy
/// is a count increment. (`HeaderValue::from_bytes` makes a value whose first
/// copy allocates again to share it, ~0.1k instructions.) Short values only;
/// longer ones are made as usual.
fn shared_value(v: &[u8]) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    /// The value, inline in the owner the shared allocation holds.
    struct Inline {
        len: usize,
        buf: [u8; 64],
    }
    impl AsRef<[u8]> for Inline {
        fn as_ref(&self) -> &[u8] {
            self.buf.get(..self.len).unwrap_or_default()
        }
    }
    let mut inline = Inline {
        len: v.len(),
        buf: [0; 64],
    };
    match inline.buf.get_mut(..v.len()) {
        Some(b) => {
            b.copy_from_slice(v);
            HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(inline))
        }
        None => HeaderValue::from_bytes(v),
    }
}

/// Appends `via` to the `Via` header: one value, comma-joined after the values
/// already present (RFC 9110 §7.6.3 lists intermediaries in order).
pub fn add_via(h: &mut HeaderMap, via: &HeaderValue) {
    if !h.contains_key(VIA) {
        let _ = h.try_insert(VIA, via.clone());
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for v in h.get_all(VIA) {
        let v = trim_ows(v.as_bytes());
        if !v.is_empty() {
            joined.extend_from_slice(v);
            joined.extend_from_slice(b", ");
        }
    }
    joined.extend_from_slice(via.as_bytes());
    match HeaderValue::from_bytes(&joined) {
        Ok(v) => {
            let _ = h.try_insert(VIA, v);
        }
        // Unreachable (valid values joined by ", "); a second line means the same.
        Err(_) => {
            let _ = h.try_append(VIA, via.clone());
        }
    }
}

/// The trailer fields gRPC ends a response with (`grpc-status`, `grpc-message`,
/// `grpc-status-details-bin`): what [`declare_trailers`] names for a gRPC
/// response whose head names none.
pub static GRPC_TRAILERS: [HeaderName; 3] = [
    HeaderName::from_static("grpc-status"),
    HeaderName::from_static("grpc-message"),
    HeaderName::from_static("grpc-status-details-bin"),
];

/// Whether an HTTP/1 request lets the response carry trailers by hyper's rule
/// (its server's `te_is_trailers`): a `TE` line has the item `trailers` (split
/// at commas, trimmed, any case). Without it hyper's HTTP/1.1 server sends no
/// trailer section at all.
pub fn te_allows_trailers(h: &HeaderMap) -> bool {
    h.get_all(TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    })
}

/// Fields hyper's HTTP/1 encoder never writes as trailers (its
/// `is_valid_trailer_field`, after RFC 9110 §6.5.1): not declared either.
fn trailer_allowed(name: &HeaderName) -> bool {
    use http::header::{
        AUTHORIZATION, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE,
        CONTENT_TYPE, HOST, MAX_FORWARDS, SET_COOKIE, TRAILER, TRANSFER_ENCODING,
    };
    !matches!(
        *name,
        AUTHORIZATION
            | CACHE_CONTROL
            | CONTENT_ENCODING
            | CONTENT_LENGTH
            | CONTENT_RANGE
            | CONTENT_TYPE
            | HOST
            | MAX_FORWARDS
            | SET_COOKIE
            | TRAILER
            | TRANSFER_ENCODING
            | TE
    )
}

/// Declares in `Trailer` the trailer fields a chunked HTTP/1.1 response may end
/// with, since hyper's HTTP/1 server writes only the fields its head's
/// `Trailer` names (and drops the rest; an HTTP/2 upstream never sends
/// `Trailer`). `known`: the trailers of a body a filter buffered whole, all
/// known now: each name the head does not declare yet is added. Otherwise, a
/// gRPC response (`grpc`) whose head declares nothing gets [`GRPC_TRAILERS`];
/// any other head is left as it is (the names of trailers still to come
/// cannot be known). The caller decides that the response goes chunked to a
/// client that allows trailers ([`te_allows_trailers`]).
pub fn declare_trailers(h: &mut HeaderMap, known: Option<&HeaderMap>, grpc: bool) {
    let declared: Vec<HeaderName> = h
        .get_all(http::header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let names: Vec<&HeaderName> = match known {
        Some(t) => t.keys().collect(),
        None if grpc && declared.is_empty() => GRPC_TRAILERS.iter().collect(),
        None => return,
    };
    let mut value = String::new();
    for n in names {
        if trailer_allowed(n) && !declared.contains(n) {
            if !value.is_empty() {
                value.push_str(", ");
            }
            value.push_str(n.as_str());
        }
    }
    if value.is_empty() {
        return;
    }
    // (Field names are valid values.)
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.append(http::header::TRAILER, v);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::header::{PROXY_AUTHENTICATE, TRAILER};

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn all(h: &HeaderMap, k: &str) -> Vec<String> {
        h.get_all(k)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn strips_standard_and_connection_listed_headers() {
        let mut h = map(&[
            ("connection", "close, X-Custom"),
            ("connection", " x-other ,, "),
            ("x-custom", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("trailer", "grpc-status"),
            ("proxy-authenticate", "Basic"),
            ("x-keep", "3"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["proxy-authenticate", "trailer", "x-keep"]);
        assert!(h.contains_key(TRAILER) && h.contains_key(PROXY_AUTHENTICATE));
    }

    #[test]
    fn connection_cannot_remove_framing_or_target() {
        let mut h = map(&[
            ("connection", "host, content-length, te, bogus header"),
            ("host", "a.com"),
            ("content-length", "5"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(all(&h, "host"), ["a.com"]);
        assert_eq!(all(&h, "content-length"), ["5"]);
        assert_eq!(all(&h, "te"), ["trailers"]);
        assert!(!h.contains_key(CONNECTION));
    }

    #[test]
    fn te_allows_trailers_as_hyper_reads_it() {
        assert!(te_allows_trailers(&map(&[("te", "trailers")])));
        assert!(te_allows_trailers(&map(&[("te", "gzip, Trailers ")])));
        assert!(te_allows_trailers(&map(&[
            ("te", "gzip"),
            ("te", "trailers")
        ])));
        assert!(!te_allows_trailers(&map(&[("te", "gzip")])));
        assert!(!te_allows_trailers(&map(&[("te", "trailersx")])));
        assert!(!te_allows_trailers(&HeaderMap::new()));
    }

    #[test]
    fn grpc_trailers_declared_when_none_are() {
        let mut h = map(&[("content-type", "application/grpc")]);
        declare_trailers(&mut h, None, true);
        assert_eq!(
            all(&h, "trailer"),
            ["grpc-status, grpc-message, grpc-status-details-bin"]
        );
        // A head that declares its own is left alone, as is a non-gRPC one.
        let mut h = map(&[("trailer", "grpc-status")]);
        declare_trailers(&mut h, None, true);
        assert_eq!(all(&h, "trailer"), ["grpc-status"]);
        let mut h = HeaderMap::new();
        declare_trailers(&mut h, None, false);
        assert!(!h.contains_key(TRAILER));
    }

    #[test]
    fn known_trailers_declared_but_forbidden_ones() {
        let known = map(&[
            ("x-checksum", "1"),
            ("grpc-status", "0"),
            ("content-length", "3"),
            ("set-cookie", "a=1"),
        ]);
        let mut h = map(&[("trailer", "X-Checksum")]);
        declare_trailers(&mut h, Some(&known), false);
        assert_eq!(all(&h, "trailer"), ["X-Checksum", "grpc-status"]);
        // Nothing left to declare: no empty field.
        let mut h = map(&[("trailer", "x-checksum, grpc-status")]);
        declare_trailers(&mut h, Some(&known), true);
        assert_eq!(all(&h, "trailer"), ["x-checksum, grpc-status"]);
    }

    #[test]
    fn te_trailers_kept_other_codings_dropped() {
        let te_after = |vals: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in vals {
                h.append(TE, HeaderValue::from_static(v));
            }
            strip_hop_by_hop(&mut h);
            all(&h, "te")
        };
        assert_eq!(te_after(&["trailers"]), ["trailers"]);
        assert_eq!(te_after(&["Trailers"]), ["trailers"]);
        assert!(te_after(&["gzip"]).is_empty());
        assert!(te_after(&["gzip;q=0.5, deflate"]).is_empty());
        assert_eq!(te_after(&["gzip, trailers"]), ["trailers"]);
        assert_eq!(te_after(&["deflate", " trailers "]), ["trailers"]);
        assert!(te_after(&["trailersx"]).is_empty());
    }

    #[test]
    fn trusted_client_counts_hops_from_the_right() {
        let h = map(&[
            ("x-forwarded-for", "6.6.6.6, 1.2.3.4"),
            ("x-forwarded-for", " 10.0.0.9 ,, 10.0.0.8"),
        ]);
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(trusted_client(&h, 0), None);
        assert_eq!(trusted_client(&h, 1), ip("10.0.0.8"));
        assert_eq!(trusted_client(&h, 2), ip("10.0.0.9"));
        assert_eq!(trusted_client(&h, 3), ip("1.2.3.4"));
        assert_eq!(trusted_client(&h, 4), ip("6.6.6.6"));
        assert_eq!(trusted_client(&h, 5), None);
        assert_eq!(trusted_client(&HeaderMap::new(), 1), None);
        // An address with a port (Azure Application Gateway writes them): its IP.
        for (v, want) in [
            ("192.0.2.1:5678", "192.0.2.1"),
            ("[2001:db8::2]:443", "2001:db8::2"),
        ] {
            assert_eq!(trusted_client(&map(&[("x-forwarded-for", v)]), 1), ip(want));
        }
        // Not an address (a name, `unknown`, a bracketed IPv6 without port): the peer.
        for v in ["client.example", "unknown", "[2001:db8::2]", "1.2.3.4:x"] {
            assert_eq!(
                trusted_client(&map(&[("x-forwarded-for", v)]), 1),
                None,
                "{v}"
            );
        }
        // IPv6 as written, IPv4-mapped as IPv4.
        let h = map(&[("x-forwarded-for", "2001:db8::1, ::ffff:192.0.2.7")]);
        assert_eq!(trusted_client(&h, 1), ip("192.0.2.7"));
        assert_eq!(trusted_client(&h, 2), ip("2001:db8::1"));
    }

    #[test]
    fn untrusted_forwarded_headers_are_overwritten() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "7.7.7.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "bank.example"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-prefix", "/evil"),
            ("forwarded", "for=6.6.6.6;host=bank.example;proto=https"),
            ("x-forwarded-client-cert", "By=spiffe://x"),
            ("x-envoy-internal", "true"),
            ("x-forwardedness", "kept: not a forwarding fact"),
        ]);
        set_forwarded(
            &mut h,
            &ForwardedFor::new("10.0.0.1".parse().unwrap()),
            false,
            "a.com:8080",
            false,
        );
        assert_eq!(all(&h, "x-forwarded-for"), ["10.0.0.1"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["http"]);
        assert_eq!(all(&h, "x-forwarded-host"), ["a.com:8080"]);
        for gone in [
            "x-forwarded-port",
            "x-forwarded-prefix",
            "forwarded",
            "x-forwarded-client-cert",
            "x-envoy-internal",
        ] {
            assert!(all(&h, gone).is_empty(), "{gone} kept");
        }
        assert_eq!(all(&h, "x-forwardedness").len(), 1);
    }

    #[test]
    fn trusted_forwarded_headers_are_appended_and_kept() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8 "),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "public.example"),
        ]);
        set_forwarded(
            &mut h,
            &ForwardedFor::new("10.0.0.1".parse().unwrap()),
            false,
            "internal:8080",
            true,
        );
        assert_eq!(all(&h, "x-forwarded-for"), ["1.2.3.4, 5.6.7.8, 10.0.0.1"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["https"]);
        assert_eq!(all(&h, "x-forwarded-host"), ["public.example"]);

        let mut fresh = HeaderMap::new();
        set_forwarded(
            &mut fresh,
            &ForwardedFor::new("2001:db8::1".parse().unwrap()),
            true,
            "a.com",
            true,
        );
        assert_eq!(all(&fresh, "x-forwarded-for"), ["2001:db8::1"]);
        assert_eq!(all(&fresh, "x-forwarded-proto"), ["https"]);
        assert_eq!(all(&fresh, "x-forwarded-host"), ["a.com"]);
    }

    #[test]
    fn an_untrusted_client_cannot_send_envoys_identity_headers() {
        let sent = [
            (
                "x-forwarded-client-cert",
                "By=spiffe://x;Subject=\"CN=admin\"",
            ),
            ("x-envoy-internal", "true"),
            ("x-envoy-external-address", "10.0.0.9"),
            ("x-other", "kept"),
        ];
        let ff = ForwardedFor::new("192.0.2.1".parse().unwrap());
        let mut h = map(&sent);
        set_forwarded(&mut h, &ff, true, "a", false);
        assert!(!h.contains_key("x-forwarded-client-cert"));
        assert!(!h.contains_key("x-envoy-internal"));
        assert!(!h.contains_key("x-envoy-external-address"));
        assert_eq!(all(&h, "x-other"), ["kept"]);
        // A trusted downstream (an Envoy in front) keeps them here;
        // `forward_client_cert` decides about the XFCC next.
        let mut h = map(&sent);
        set_forwarded(&mut h, &ff, true, "a", true);
        assert!(h.contains_key("x-forwarded-client-cert"));
        assert!(h.contains_key("x-envoy-internal"));
    }

    #[test]
    fn forwarded_for_uses_canonical_ip_and_skips_bad_host() {
        let mut h = map(&[("x-forwarded-host", "spoofed")]);
        set_forwarded(
            &mut h,
            &ForwardedFor::new("::ffff:192.0.2.7".parse().unwrap()),
            false,
            "",
            false,
        );
        assert_eq!(all(&h, "x-forwarded-for"), ["192.0.2.7"]);
        assert!(!h.contains_key(&X_FORWARDED_HOST));
    }

    fn is_uuid_v4(v: &HeaderValue) -> bool {
        let s = v.to_str().unwrap();
        let parts: Vec<&str> = s.split('-').collect();
        parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
            && s.bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && parts[2].starts_with('4')
            && matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b')
    }

    #[test]
    fn generated_request_ids_are_uuid_v4_and_distinct() {
        let a = new_request_id();
        let b = new_request_id();
        assert!(is_uuid_v4(&a), "{a:?}");
        assert!(is_uuid_v4(&b), "{b:?}");
        assert_ne!(a, b);
    }

    #[test]
    fn shared_values_hold_their_bytes_and_share_copies() {
        let v = shared_value(b"example.com:8080").unwrap();
        assert_eq!(v, "example.com:8080");
        let copy = v.clone();
        assert_eq!(copy.as_bytes().as_ptr(), v.as_bytes().as_ptr());
        let long = "a".repeat(200);
        assert_eq!(shared_value(long.as_bytes()).unwrap(), long.as_str());
        assert_eq!(shared_value(b"").unwrap(), "");
        assert!(shared_value(b"bad\nvalue").is_err());
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert!(is_valid_request_id(id.as_bytes()));
    }

    #[test]
    fn request_id_trust_and_validity() {
        // Trusted and valid: kept, duplicates dropped.
        let mut h = map(&[("x-request-id", "abc-123"), ("x-request-id", "other")]);
        assert_eq!(request_id(&mut h, true, true).unwrap(), "abc-123");
        assert_eq!(all(&h, "x-request-id"), ["abc-123"]);
        let mut h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&mut h, true, false).unwrap(), "abc-123");

        // Untrusted: replaced by a fresh id.
        let mut h = map(&[("x-request-id", "abc-123")]);
        let id = request_id(&mut h, false, true).unwrap();
        assert!(is_uuid_v4(&id));
        assert_eq!(h.get(&X_REQUEST_ID), Some(&id));

        // Trusted but invalid: replaced.
        let long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        for bad in ["has space", "", long.as_str()] {
            let mut h = HeaderMap::new();
            h.insert(&X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = request_id(&mut h, true, true).unwrap();
            assert!(is_uuid_v4(&id), "{bad:?}");
        }
        assert!(is_valid_request_id(
            "a".repeat(MAX_REQUEST_ID_LEN).as_bytes()
        ));
        assert!(!is_valid_request_id("caf\u{e9}".as_bytes()));

        // Not generating: untrusted or invalid ids are removed.
        let mut h = map(&[("x-request-id", "abc-123")]);
        assert!(request_id(&mut h, false, false).is_none());
        assert!(!h.contains_key(&X_REQUEST_ID));
        let mut h = map(&[("x-request-id", "bad id")]);
        assert!(request_id(&mut h, true, false).is_none());
        assert!(!h.contains_key(&X_REQUEST_ID));

        // Nothing incoming.
        let mut h = HeaderMap::new();
        assert!(request_id(&mut h, true, true).is_some_and(|v| is_uuid_v4(&v)));
        let mut h = HeaderMap::new();
        assert!(request_id(&mut h, true, false).is_none());
    }

    #[test]
    fn via_is_comma_joined() {
        let ours = HeaderValue::from_static("1.1 legate");
        let mut h = HeaderMap::new();
        add_via(&mut h, &ours);
        assert_eq!(all(&h, "via"), ["1.1 legate"]);
        add_via(&mut h, &ours);
        assert_eq!(all(&h, "via"), ["1.1 legate, 1.1 legate"]);

        let mut h = map(&[("via", "1.0 fred"), ("via", "1.1 p.example.net ")]);
        add_via(&mut h, &ours);
        assert_eq!(all(&h, "via"), ["1.0 fred, 1.1 p.example.net, 1.1 legate"]);
    }

    fn mtls_info(leaf: &rcgen::Certificate) -> TlsInfo {
        TlsInfo {
            sni: None,
            alpn: None,
            version: "TLSv1.3",
            cipher: "TLS_AES_128_GCM_SHA256",
            peer: Some(std::sync::Arc::new(crate::tls::PeerCert {
                subject: Some("CN=a\\,b \\\"q\\\"".into()),
                ..crate::tls::PeerCert::of(leaf.der())
            })),
            peer_certs: vec![leaf.der().clone()],
            local_uri_sans: std::sync::Arc::from(["spiffe://m/ns/e/sa/legate".to_owned()]),
        }
    }

    fn make_leaf(sans: Vec<rcgen::SanType>) -> rcgen::Certificate {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap()
    }

    fn url_decode(v: &str) -> String {
        let b = v.as_bytes();
        let (mut out, mut i) = (Vec::new(), 0);
        while i < b.len() {
            if b[i] == b'%' {
                out.push(
                    u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap(), 16).unwrap(),
                );
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn xfcc_modes_as_envoy() {
        use ForwardClientCert::*;
        let sent = "By=x;URI=spiffe://forged";
        let run = |mode, mtls| {
            let mut h = map(&[("x-forwarded-client-cert", "By=x;URI=spiffe://forged")]);
            forward_client_cert(&mut h, mode, mtls, || {
                Some(HeaderValue::from_static("Hash=ab"))
            });
            all(&h, "x-forwarded-client-cert")
        };
        let none: Vec<String> = Vec::new();
        assert_eq!(run(Sanitize, true), none);
        assert_eq!(run(Sanitize, false), none);
        assert_eq!(run(ForwardOnly, true), [sent]);
        assert_eq!(run(ForwardOnly, false), none);
        assert_eq!(run(AppendForward, true), [format!("{sent},Hash=ab")]);
        assert_eq!(run(AppendForward, false), none);
        assert_eq!(run(SanitizeSet, true), ["Hash=ab"]);
        assert_eq!(run(SanitizeSet, false), none);
        assert_eq!(run(AlwaysForwardOnly, true), [sent]);
        assert_eq!(run(AlwaysForwardOnly, false), [sent]);
        // Several incoming lines are one list; an element that cannot be made
        // removes the header rather than pass the unverified part on alone.
        let mut h = map(&[
            ("x-forwarded-client-cert", "Hash=1"),
            ("x-forwarded-client-cert", "Hash=2"),
        ]);
        forward_client_cert(&mut h, AppendForward, true, || {
            Some(HeaderValue::from_static("Hash=3"))
        });
        assert_eq!(all(&h, "x-forwarded-client-cert"), ["Hash=1,Hash=2,Hash=3"]);
        let mut h = map(&[("x-forwarded-client-cert", "Hash=1")]);
        forward_client_cert(&mut h, AppendForward, true, || None);
        assert_eq!(all(&h, "x-forwarded-client-cert"), none);
    }

    #[test]
    fn xfcc_element_fields_order_and_quoting() {
        use sha2::{Digest, Sha256};
        let leaf = make_leaf(vec![
            rcgen::SanType::URI("spiffe://m/ns/a/sa/c".try_into().unwrap()),
            rcgen::SanType::URI("https://x.test/a;b=c".try_into().unwrap()),
            rcgen::SanType::DnsName("c.test".try_into().unwrap()),
        ]);
        let info = mtls_info(&leaf);
        let hash: String = Sha256::digest(leaf.der().as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let bare = xfcc_element(&info, None).unwrap();
        assert_eq!(
            bare,
            format!("By=spiffe://m/ns/e/sa/legate;Hash={hash}").as_str()
        );
        let all_details = ClientCertDetails {
            subject: true,
            uri: true,
            dns: true,
            cert: true,
            chain: true,
        };
        let v = xfcc_element(&info, Some(&all_details)).unwrap();
        let v = v.to_str().unwrap();
        let pem = leaf.pem();
        let (_, rest) = v.split_once(";Cert=\"").unwrap();
        let (cert, rest) = rest.split_once("\";Chain=\"").unwrap();
        assert_eq!(url_decode(cert), pem);
        let (chain, rest) = rest.split_once('"').unwrap();
        assert_eq!(url_decode(chain), pem);
        assert!(
            cert.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)),
            "{cert}"
        );
        assert_eq!(
            rest,
            ";Subject=\"CN=a\\,b \\\"q\\\"\";URI=spiffe://m/ns/a/sa/c;\
             URI=\"https://x.test/a;b=c\";DNS=c.test"
        );
        // No URI SAN: `URI=` all the same (Envoy); no DNS SAN: no `DNS`.
        let bare_leaf = make_leaf(vec![]);
        let mut info = mtls_info(&bare_leaf);
        info.peer = Some(std::sync::Arc::new(crate::tls::PeerCert::default()));
        info.local_uri_sans = std::sync::Arc::from([]);
        let v = xfcc_element(&info, Some(&all_details)).unwrap();
        let v = v.to_str().unwrap();
        assert!(v.starts_with("Hash="), "{v}");
        assert!(v.ends_with(";Subject=\"\";URI="), "{v}");
        // Without a client certificate there is no element.
        info.peer_certs.clear();
        assert_eq!(xfcc_element(&info, None), None);
    }
}

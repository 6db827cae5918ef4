//! Header fields the host keeps to itself. Hop-by-hop fields (RFC 9110
//! §7.6.1): what the host strips from every message it proxies, a callout
//! response included (abi/README.md §5.8), and so what a filter never sees
//! in one. Host-owned fields ([`host_owned`]): what a filter may not write.
//! Names are lowercase. Which names and values a filter may write at all
//! ([`name_ok`], [`value_ok`]): the host's `http` crate's rule.

/// Fields always removed: connection-specific (RFC 9110 §7.6.1, RFC 9112)
/// or, for `proxy-authorization`, credentials meant for this proxy and not
/// the origin. `te` has its own rule: it is kept as exactly `te: trailers`
/// if one of its values offers `trailers`, else removed. Every field a
/// `connection` value names is removed too, but [`NOT_NOMINATABLE`].
/// `trailer` and `proxy-authenticate` are kept: they describe the message
/// itself and are end-to-end in practice.
pub const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Fields a `connection` option cannot remove: `host` and `content-length`
/// carry the message's target and framing, which a client must not be able
/// to strip from under the proxy; `te` follows its own rule (`TE: trailers`
/// is announced with `Connection: TE` per RFC 9110 §10.1.4, and must survive
/// for gRPC).
pub const NOT_NOMINATABLE: [&str; 3] = ["host", "content-length", "te"];

/// Whether the host owns field `name` (lowercase), for framing or connection
/// management (abi/README.md §4): a filter may not write it (`denied`),
/// except removing `content-length` from a head, setting or removing
/// exactly `te: trailers` on the request head, and writing `trailer` on the
/// response head; a callout request naming it is refused
/// (`invalid-argument`).
pub fn host_owned(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "upgrade"
            | "trailer"
            | "host"
            | "content-length"
    )
}

/// The non-empty items of a comma-separated field value (a `connection` or
/// `te` line), trimmed of optional whitespace: the names a `connection` value
/// nominates for removal.
#[inline]
pub fn list_items(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(trim_ows)
        .filter(|s| !s.is_empty())
}

/// Whether a `te` value offers `trailers`, the one coding that passes the
/// hop (as exactly `te: trailers`). An item's parameters are ignored
/// (`trailers;q=1` is not valid, but what precedes the `;` decides).
#[inline]
pub fn offers_trailers(te: &[u8]) -> bool {
    list_items(te).any(|item| {
        let coding = item.split(|&b| b == b';').next().unwrap_or(item);
        trim_ows(coding).eq_ignore_ascii_case(b"trailers")
    })
}

/// Trims optional whitespace (space and tab, RFC 9110 §5.6.3).
#[inline]
pub fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Whether `b` is a token character (RFC 9110 §5.6.2): what a field name,
/// a method and a `te` value are made of.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `name` is a field name a filter may write: a token of 1 to
/// 65 535 bytes, in any case (the host's `http::HeaderName::from_bytes`
/// takes exactly these, lowercased). Another is `invalid-argument`.
pub fn name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= 0xFFFF && name.bytes().all(is_tchar)
}

/// Whether `value` is a field value a filter may write: no control byte but
/// HTAB (so no CR, LF or NUL), no DEL; obs-text (0x80-0xFF) is fine (the
/// host's `http::HeaderValue::from_bytes` takes exactly these). Another is
/// `invalid-argument`.
pub fn value_ok(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| (b >= 0x20 && b != 0x7F) || b == b'\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_items_and_te() {
        assert_eq!(trim_ows(b" \ta b\t "), b"a b");
        assert_eq!(trim_ows(b"   "), b"");
        let items: Vec<&[u8]> = list_items(b" a, ,b ,").collect();
        assert_eq!(items, [b"a".as_slice(), b"b".as_slice()]);
        for yes in [
            &b"trailers"[..],
            b"gzip, Trailers",
            b" trailers ;q=1 ",
            b",trailers,",
        ] {
            assert!(offers_trailers(yes), "{yes:?}");
        }
        for no in [
            &b""[..],
            b"gzip",
            b"trailer",
            b"x-trailers",
            b"gzip;trailers",
        ] {
            assert!(!offers_trailers(no), "{no:?}");
        }
    }

    #[test]
    fn names_and_values() {
        assert!(name_ok("x-custom") && name_ok("X-Custom") && name_ok("!#$%&'*+-.^_`|~"));
        assert!(name_ok(&"a".repeat(0xFFFF)));
        for bad in ["", "a b", "a:b", "a\tb", "é", "(x)", "a/b"] {
            assert!(!name_ok(bad), "{bad:?}");
        }
        assert!(!name_ok(&"a".repeat(0x10000)));
        assert!(value_ok(b"") && value_ok(b"a\tb \x80\xff ~"));
        for bad in [&b"a\rb"[..], b"a\nb", b"\0", b"\x7f", b"\x1f"] {
            assert!(!value_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn names_are_lowercase_and_distinct() {
        let all: Vec<&str> = HOP_BY_HOP.iter().chain(&NOT_NOMINATABLE).copied().collect();
        for (i, n) in all.iter().enumerate() {
            assert_eq!(*n, n.to_ascii_lowercase());
            assert!(!all[..i].contains(n), "{n} twice");
        }
    }

    #[test]
    fn host_owned_fields() {
        for n in ["connection", "te", "trailer", "host", "content-length"] {
            assert!(host_owned(n), "{n}");
        }
        // Dropped from messages, but not the host's: a filter may add one.
        assert!(!host_owned("proxy-authorization"));
        assert!(!host_owned("x-custom"));
        assert!(!host_owned("Connection"), "names are lowercase");
    }
}

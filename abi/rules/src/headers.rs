//! Header fields the host keeps to itself. Hop-by-hop fields (RFC 9110
//! §7.6.1): what the host strips from every message it proxies, a callout
//! response included (abi/README.md §5.8), and so what a filter never sees
//! in one. Host-owned fields ([`host_owned`]): what a filter may not write.
//! Names are lowercase.

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
/// except removing `content-length` from a head and setting or removing
/// exactly `te: trailers` on the request head; a callout request naming it
/// is refused (`invalid-argument`).
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

#[cfg(test)]
mod tests {
    use super::*;

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

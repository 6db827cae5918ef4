//! Request path normalization: the one form of the path that routes, every
//! filter and the upstream see (listener `http.normalize_path`,
//! `http.merge_slashes`, `http.path_with_escaped_slashes`; Envoy's connection
//! manager options of those names).
//!
//! Without it, `/public/../admin` matches `prefix: /public` while an upstream that
//! resolves dot segments serves `/admin`, and `/%61dmin` misses `path: /admin`
//! while an upstream that decodes escapes serves it. The steps, in Envoy's
//! order: escaped slashes (`%2F`, `%5C`) are kept, refused or decoded; with
//! `normalize_path`, RFC 3986 §6.2.2 normalization: escapes of unreserved
//! characters are decoded (`%7e` → `~`, `%2E` → `.`), the others kept with
//! upper-case hex (`%3f` → `%3F`), a malformed escape (`%zz`) or `%00` refused;
//! a `\` (as sent, or decoded from `%5C` under `unescape`) is a `/`, as Envoy's
//! normalization (Chromium's URL canonicalizer) and many upstreams (IIS, WHATWG
//! URL parsers) take it: `/public\..\admin` is `/admin` to routes too; then
//! with `merge_slashes`, runs of `/` become one; with `normalize_path`, dot
//! segments are removed (§5.2.4), never climbing above `/`. The query string is
//! not the path's and is left alone.
//!
//! Cost: most paths need nothing; one scan over the path's bytes finds that
//! out ([`needs_work`]) and the request goes on without an allocation.

use std::fmt;

use crate::config::EscapedSlashes;

/// What to do to a path: the listener's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// RFC 3986 normalization: decode unreserved escapes, remove dot segments.
    pub normalize: bool,
    /// Merge runs of `/` into one.
    pub merge_slashes: bool,
    /// What `%2F` and `%5C` become.
    pub escaped_slashes: EscapedSlashes,
}

impl Options {
    /// The options of an HTTP listener's config.
    pub fn of(http: &crate::config::HttpListener) -> Self {
        Options {
            normalize: http.normalize_path,
            merge_slashes: http.merge_slashes,
            escaped_slashes: http.path_with_escaped_slashes,
        }
    }

    fn any(self) -> bool {
        self.normalize || self.merge_slashes || self.escaped_slashes != EscapedSlashes::Keep
    }
}

/// Why a path is refused (a 400).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    InvalidEscape,
    /// `%00`: no path names a NUL, and C upstreams stop reading at it.
    EncodedNul,
    /// `%2F` or `%5C` under `path_with_escaped_slashes: reject`.
    EscapedSlash,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::InvalidEscape => "invalid percent-encoding in the path",
            PathError::EncodedNul => "percent-encoded NUL in the path",
            PathError::EscapedSlash => "escaped slash (%2F or %5C) in the path",
        })
    }
}

/// The normal form of `path` (the path alone, without `?query`): `None` when it
/// already is (the common case, no allocation). Paths that do not start with
/// `/` (`*` of `OPTIONS *`, an empty CONNECT path) have no segments to
/// normalize and are left alone.
pub fn normalize(path: &str, o: Options) -> Result<Option<String>, PathError> {
    if !o.any() || !path.starts_with('/') || !needs_work(path.as_bytes(), o) {
        return Ok(None);
    }
    let out = rewrite(path.as_bytes(), o)?;
    // Only ASCII bytes were decoded or inserted into valid UTF-8: still valid.
    let out = String::from_utf8(out).map_err(|_| PathError::InvalidEscape)?;
    Ok((out != path).then_some(out))
}

/// Whether the path may change: it has an escape, a `\` or a segment that
/// starts with `.` (normalizing) or a `//` (merging). One pass, no allocation.
fn needs_work(p: &[u8], o: Options) -> bool {
    let mut prev = 0u8;
    for &b in p {
        match b {
            b'%' => return true,
            b'\\' if o.normalize => return true,
            b'.' if prev == b'/' && o.normalize => return true,
            b'/' if prev == b'/' && o.merge_slashes => return true,
            _ => {}
        }
        prev = b;
    }
    false
}

/// The slow path: escapes, then slashes, then dot segments.
fn rewrite(p: &[u8], o: Options) -> Result<Vec<u8>, PathError> {
    let mut s: Vec<u8> = Vec::with_capacity(p.len());
    let mut i = 0;
    while let Some(&c) = p.get(i) {
        if c != b'%' {
            s.push(c);
            i += 1;
            continue;
        }
        let escape = p.get(i..i + 3);
        let value = escape.and_then(|e| Some((hex(e[1])? << 4) | hex(e[2])?));
        let (Some(escape), Some(v)) = (escape, value) else {
            if o.normalize {
                return Err(PathError::InvalidEscape);
            }
            // Not normalizing: a stray `%` is passed on as it came.
            s.push(c);
            i += 1;
            continue;
        };
        match v {
            b'/' | b'\\' => match o.escaped_slashes {
                EscapedSlashes::Keep => keep_escape(&mut s, escape, v, o.normalize),
                EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                EscapedSlashes::Unescape => s.push(v),
            },
            0 if o.normalize => return Err(PathError::EncodedNul),
            v if o.normalize && is_unreserved(v) => s.push(v),
            _ => keep_escape(&mut s, escape, v, o.normalize),
        }
        i += 3;
    }
    if o.normalize {
        for b in s.iter_mut().filter(|b| **b == b'\\') {
            *b = b'/';
        }
    }
    if o.merge_slashes {
        s.dedup_by(|a, b| *a == b'/' && *b == b'/');
    }
    if o.normalize {
        s = remove_dot_segments(&s);
    }
    Ok(s)
}

/// Writes an escape that stays: upper-case hex when normalizing (RFC 3986
/// §6.2.2.1: `%2f` and `%2F` are the same), else as it came.
fn keep_escape(s: &mut Vec<u8>, escape: &[u8], v: u8, normalize: bool) {
    if normalize {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        s.extend_from_slice(&[b'%', HEX[usize::from(v >> 4)], HEX[usize::from(v & 0x0f)]]);
    } else {
        s.extend_from_slice(escape);
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3: escapes of these mean the character itself.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §5.2.4 on an absolute path (it starts with `/`): `.` segments go,
/// `..` removes the segment before it (none above the root), and a path that
/// ended in one of them ends in `/`. Empty segments (`//`) are segments.
fn remove_dot_segments(p: &[u8]) -> Vec<u8> {
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    for seg in p.get(1..).unwrap_or_default().split(|&b| b == b'/') {
        trailing = true;
        match seg {
            b"." => {}
            b".." => {
                kept.pop();
            }
            s => {
                kept.push(s);
                trailing = false;
            }
        }
    }
    let mut out = Vec::with_capacity(p.len());
    for seg in &kept {
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    if trailing || kept.is_empty() {
        out.push(b'/');
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NORMALIZE: Options = Options {
        normalize: true,
        merge_slashes: false,
        escaped_slashes: EscapedSlashes::Keep,
    };

    fn norm(p: &str, o: Options) -> Result<String, PathError> {
        normalize(p, o).map(|n| n.unwrap_or_else(|| p.to_string()))
    }

    #[test]
    fn rfc3986_normalization() {
        let table = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/./b/../c", "/a/c"),
            ("/..", "/"),
            ("/../..", "/"),
            ("/.", "/"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/../../b", "/b"),
            ("/public/../admin", "/admin"),
            ("/a/%2e%2E/b", "/b"),
            ("/a/%2e/b", "/a/b"),
            ("/%61", "/a"),
            ("/%61dmin", "/admin"),
            ("/%7e", "/~"),
            ("/%7Euser", "/~user"),
            ("/a%3Fb", "/a%3Fb"),
            ("/a%3fb", "/a%3Fb"),
            ("/a%20b", "/a%20b"),
            ("/a%25b", "/a%25b"),
            ("/a%252e%252e/b", "/a%252e%252e/b"),
            ("/a/.../b", "/a/.../b"),
            ("/a/.b/..c/", "/a/.b/..c/"),
            ("/index.html", "/index.html"),
            ("/.well-known/x", "/.well-known/x"),
            ("//a///b", "//a///b"),
            ("//..", "/"),
            ("/a//../b", "/a/b"),
            ("*", "*"),
            ("/public\\..\\admin", "/admin"),
            ("/a\\b", "/a/b"),
            ("/a%5Cb", "/a%5Cb"),
        ];
        for (input, want) in table {
            assert_eq!(norm(input, NORMALIZE).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn bad_paths_are_refused() {
        for p in ["/%zz", "/a%", "/a%2", "/a%g0/b", "/%00", "/a%00.png"] {
            assert!(norm(p, NORMALIZE).is_err(), "{p}");
        }
        assert_eq!(norm("/%zz", NORMALIZE), Err(PathError::InvalidEscape));
        assert_eq!(norm("/%00", NORMALIZE), Err(PathError::EncodedNul));
        // Not normalizing: passed on as they came.
        let off = Options {
            normalize: false,
            ..NORMALIZE
        };
        assert_eq!(normalize("/%zz/%00/../%61", off), Ok(None));
    }

    #[test]
    fn escaped_slashes_in_each_mode() {
        let with = |escaped_slashes, normalize| Options {
            normalize,
            merge_slashes: false,
            escaped_slashes,
        };
        use EscapedSlashes::*;
        assert_eq!(norm("/a%2Fb", with(Keep, true)).unwrap(), "/a%2Fb");
        assert_eq!(norm("/a%2fb", with(Keep, true)).unwrap(), "/a%2Fb");
        assert_eq!(norm("/a%2fb", with(Keep, false)).unwrap(), "/a%2fb");
        assert_eq!(norm("/a%5cb", with(Keep, true)).unwrap(), "/a%5Cb");
        for p in ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a%5cb"] {
            assert_eq!(norm(p, with(Reject, true)), Err(PathError::EscapedSlash));
            assert_eq!(norm(p, with(Reject, false)), Err(PathError::EscapedSlash));
        }
        assert_eq!(norm("/a%2Fb", with(Unescape, true)).unwrap(), "/a/b");
        assert_eq!(norm("/a%2fb", with(Unescape, false)).unwrap(), "/a/b");
        // A decoded `\` is a separator when normalizing (Envoy's order:
        // unescape, then canonicalize), kept as it is when not.
        assert_eq!(norm("/a%5Cb", with(Unescape, true)).unwrap(), "/a/b");
        assert_eq!(norm("/a%5Cb", with(Unescape, false)).unwrap(), "/a\\b");
        assert_eq!(norm("/a\\b", with(Keep, false)).unwrap(), "/a\\b");
        assert_eq!(
            norm("/public%5C..%5Cadmin", with(Unescape, true)).unwrap(),
            "/admin"
        );
        // Decoded slashes take part in dot-segment removal.
        assert_eq!(
            norm("/public%2F..%2Fadmin", with(Unescape, true)).unwrap(),
            "/admin"
        );
        assert_eq!(
            norm("/public%2F..%2Fadmin", with(Keep, true)).unwrap(),
            "/public%2F..%2Fadmin"
        );
    }

    #[test]
    fn merge_slashes_on_and_off() {
        let merge = Options {
            merge_slashes: true,
            ..NORMALIZE
        };
        assert_eq!(norm("//a///b", merge).unwrap(), "/a/b");
        assert_eq!(norm("//a///b", NORMALIZE).unwrap(), "//a///b");
        assert_eq!(norm("/a//../b", merge).unwrap(), "/b");
        assert_eq!(norm("/a/b//", merge).unwrap(), "/a/b/");
        let only_merge = Options {
            normalize: false,
            ..merge
        };
        assert_eq!(norm("//api/./x", only_merge).unwrap(), "/api/./x");
    }

    #[test]
    fn normal_paths_need_no_work() {
        for p in ["/", "/a/b", "/index.html", "/v1.2/x", "/a//b", "/~user"] {
            assert!(!needs_work(p.as_bytes(), NORMALIZE), "{p}");
            assert_eq!(normalize(p, NORMALIZE), Ok(None), "{p}");
        }
        let merge = Options {
            merge_slashes: true,
            ..NORMALIZE
        };
        assert!(needs_work(b"/a//b", merge));
        for p in ["/./a", "/a/../b", "/%41"] {
            assert!(needs_work(p.as_bytes(), NORMALIZE), "{p}");
        }
        // Looked at but already normal: no new path.
        assert_eq!(normalize("/.well-known/x", NORMALIZE), Ok(None));
        assert_eq!(normalize("/a%3F", NORMALIZE), Ok(None));
    }
}

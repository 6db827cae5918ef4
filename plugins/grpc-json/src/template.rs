//! HTTP path templates of `google.api.http` rules (google/api/http.proto,
//! "Path template syntax"): parsing, matching a request path, and the
//! specificity order used to pick one rule when several match.
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```

use std::cmp::Ordering;

/// One segment of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Matches exactly this text (compared with the raw, still percent-encoded, path).
    Literal(String),
    /// `*`: exactly one non-empty segment.
    Any,
    /// `**`: the rest of the path, zero or more segments (only last).
    Rest,
}

/// A `{field.path=...}` variable: the segments `start..end` it captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// The request message field it binds, e.g. `["inner", "id"]`.
    pub field_path: Vec<String>,
    /// First template segment captured.
    pub start: usize,
    /// One past the last captured segment; `None` when it ends with `**`
    /// (captures to the end of the path).
    pub end: Option<usize>,
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The template as written, for messages.
    pub source: String,
    /// Its segments, variables flattened in.
    pub segments: Vec<Segment>,
    /// Its variables, in order.
    pub variables: Vec<Variable>,
    /// The `:verb` suffix, without the colon.
    pub verb: Option<String>,
}

/// A variable's captured text: still percent-encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// The field it binds.
    pub field_path: Vec<String>,
    /// The raw captured path text (segments joined with `/`).
    pub raw: String,
    /// Captured more than one segment (or `**`): `%2F` is then kept encoded,
    /// as the http.proto rules say for multi-segment variables.
    pub multi_segment: bool,
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    segments: Vec<Segment>,
    variables: Vec<Variable>,
}

impl Template {
    /// Parses `source`; `Err` says what is wrong and where.
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut p = Parser {
            s: source.as_bytes(),
            pos: 0,
            segments: Vec::new(),
            variables: Vec::new(),
        };
        if p.peek() != Some(b'/') {
            return Err("must start with '/'".into());
        }
        p.pos += 1;
        p.segments_until(true)?;
        let verb = if p.peek() == Some(b':') {
            p.pos += 1;
            let verb = p.literal();
            if verb.is_empty() {
                return Err(format!("empty verb after ':' at byte {}", p.pos));
            }
            Some(verb)
        } else {
            None
        };
        if p.pos != p.s.len() {
            return Err(format!(
                "unexpected '{}' at byte {}",
                char::from(p.s[p.pos]),
                p.pos
            ));
        }
        // `**` captures the rest of the path: anything after it could never match.
        if let Some(i) = p.segments.iter().position(|s| *s == Segment::Rest) {
            if i + 1 != p.segments.len() {
                return Err("'**' must be the last segment".into());
            }
        }
        let mut seen: Vec<&Vec<String>> = Vec::new();
        for v in &p.variables {
            if seen.contains(&&v.field_path) {
                return Err(format!(
                    "variable {{{}}} appears twice",
                    v.field_path.join(".")
                ));
            }
            seen.push(&v.field_path);
        }
        Ok(Template {
            source: source.to_owned(),
            segments: p.segments,
            variables: p.variables,
            verb,
        })
    }

    /// Matches the path part of a request (no query); on a match, the
    /// variables' captures.
    pub fn matches(&self, path: &str) -> Option<Vec<Capture>> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => path.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => path,
        };
        let parts: Vec<&str> = path.split('/').collect();
        let rest = self.segments.last() == Some(&Segment::Rest);
        let fixed = if rest {
            self.segments.len() - 1
        } else {
            self.segments.len()
        };
        if parts.len() < fixed || (!rest && parts.len() != fixed) {
            return None;
        }
        for (seg, part) in self.segments.iter().zip(&parts) {
            match seg {
                Segment::Literal(l) if l != part => return None,
                Segment::Any if part.is_empty() => return None,
                _ => {}
            }
        }
        let captures = self
            .variables
            .iter()
            .map(|v| {
                let end = v.end.unwrap_or(parts.len());
                let taken = parts.get(v.start..end).unwrap_or_default();
                Capture {
                    field_path: v.field_path.clone(),
                    raw: taken.join("/"),
                    multi_segment: v.end.is_none() || end - v.start > 1,
                }
            })
            .collect();
        Some(captures)
    }

    /// Orders two templates that both matched a path of `parts` segments,
    /// from least to most specific, by what consumed each segment: segment by
    /// segment a literal beats `*`, which beats `**`. On a tie (a `**` that
    /// matched nothing), the template without `**` wins, then one with a verb:
    /// `/v1/files` beats `/v1/files/{path=**}` for `/v1/files`, as Envoy's
    /// path matcher takes an exact match before a `**` one.
    pub fn specificity_cmp(&self, other: &Template, parts: usize) -> Ordering {
        let rank = |t: &Template| {
            let mut r = Vec::with_capacity(parts);
            for s in &t.segments {
                match s {
                    Segment::Literal(_) => r.push(3u8),
                    Segment::Any => r.push(2),
                    Segment::Rest => r.resize(parts.max(r.len()), 1),
                }
            }
            r
        };
        let rest = |t: &Template| t.segments.last() == Some(&Segment::Rest);
        rank(self)
            .cmp(&rank(other))
            .then(rest(other).cmp(&rest(self)))
            .then(self.verb.is_some().cmp(&other.verb.is_some()))
    }

    /// How many segments `path` (the path part of a request) has, as
    /// [`Template::matches`] splits it.
    pub fn parts_of(path: &str) -> usize {
        path.strip_prefix('/').unwrap_or(path).split('/').count()
    }
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    /// Literal text up to the next delimiter.
    fn literal(&mut self) -> String {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if matches!(c, b'/' | b':' | b'{' | b'}' | b'=' | b'*' | b'?' | b'#') {
                break;
            }
            self.pos += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.pos]).into_owned()
    }

    /// `Segment { "/" Segment }`, stopping before ':', '}' or the end.
    fn segments_until(&mut self, variables_allowed: bool) -> Result<(), String> {
        loop {
            self.segment(variables_allowed)?;
            if self.peek() == Some(b'/') {
                self.pos += 1;
            } else {
                return Ok(());
            }
        }
    }

    fn segment(&mut self, variables_allowed: bool) -> Result<(), String> {
        let at = self.pos;
        match self.peek() {
            Some(b'*') => {
                self.pos += 1;
                if self.peek() == Some(b'*') {
                    self.pos += 1;
                    self.segments.push(Segment::Rest);
                } else {
                    self.segments.push(Segment::Any);
                }
            }
            Some(b'{') if variables_allowed => {
                self.pos += 1;
                let start_name = self.pos;
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                let name = String::from_utf8_lossy(&self.s[start_name..self.pos]).into_owned();
                let field_path: Vec<String> = name.split('.').map(str::to_owned).collect();
                if field_path.iter().any(|p| p.is_empty()) {
                    return Err(format!("bad variable name {name:?} at byte {start_name}"));
                }
                let start = self.segments.len();
                match self.peek() {
                    Some(b'=') => {
                        self.pos += 1;
                        self.segments_until(false)?;
                    }
                    _ => self.segments.push(Segment::Any),
                }
                if self.peek() != Some(b'}') {
                    return Err(format!(
                        "variable {{{name}...}} is not closed with '}}' at byte {}",
                        self.pos
                    ));
                }
                self.pos += 1;
                let end = if self.segments.last() == Some(&Segment::Rest) {
                    None
                } else {
                    Some(self.segments.len())
                };
                self.variables.push(Variable {
                    field_path,
                    start,
                    end,
                });
            }
            Some(b'{') => return Err(format!("nested variable at byte {at}")),
            _ => {
                let lit = self.literal();
                if lit.is_empty() {
                    return Err(format!("empty segment at byte {at}"));
                }
                self.segments.push(Segment::Literal(lit));
            }
        }
        Ok(())
    }
}

/// Percent-decodes `s`; with `keep_slash`, `%2F` stays encoded (multi-segment
/// variables). `plus_is_space`: query strings (form encoding). `Err` for a
/// `%` not followed by two hex digits (`%ZZ`, a trailing `%4`), as Envoy's
/// transcoder answers such a request 400 rather than guess what it meant, and
/// for a result that is not UTF-8.
pub fn percent_decode(s: &str, keep_slash: bool, plus_is_space: bool) -> Result<String, String> {
    decode(s, keep_slash, plus_is_space, true)
}

/// Percent-decodes a `grpc-message`: a `%` not followed by two hex digits is
/// kept as it is (gRPC over HTTP/2 asks receivers to), non-UTF-8 is an `Err`.
pub fn percent_decode_lenient(s: &str) -> Result<String, String> {
    decode(s, false, false, false)
}

fn decode(s: &str, keep_slash: bool, plus_is_space: bool, strict: bool) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let hex = |x: Option<&u8>| x.and_then(|x| char::from(*x).to_digit(16));
            if let (Some(h), Some(l)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) {
                // Two hex digits: always below 256.
                let v = u8::try_from(h * 16 + l).unwrap_or(b'?');
                if keep_slash && v == b'/' {
                    out.extend_from_slice(&b[i..i + 3]);
                } else {
                    out.push(v);
                }
                i += 3;
                continue;
            }
            if strict {
                let bad: String = s[i..].chars().take(3).collect();
                return Err(format!(
                    "{s:?} has a malformed percent escape {bad:?}: `%` must be followed by two hex digits (a `%` itself is `%25`)"
                ));
            }
        }
        out.push(if plus_is_space && c == b'+' { b' ' } else { c });
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn caps(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        Template::parse(t).unwrap().matches(path).map(|c| {
            c.into_iter()
                .map(|c| (c.field_path.join("."), c.raw))
                .collect()
        })
    }

    #[test]
    fn parses_and_matches() {
        assert_eq!(caps("/v1/echo", "/v1/echo"), Some(vec![]));
        assert_eq!(caps("/v1/echo", "/v1/echo/x"), None);
        assert_eq!(
            caps("/v1/echo/{message}", "/v1/echo/hi%20there"),
            Some(vec![("message".into(), "hi%20there".into())])
        );
        assert_eq!(caps("/v1/echo/{message}", "/v1/echo/"), None);
        assert_eq!(
            caps("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/books/2"),
            Some(vec![("name".into(), "shelves/1/books/2".into())])
        );
        assert_eq!(
            caps("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/x/2"),
            None
        );
        assert_eq!(
            caps("/v1/{a.b}/files/{path=**}", "/v1/7/files/a/b/c"),
            Some(vec![
                ("a.b".into(), "7".into()),
                ("path".into(), "a/b/c".into())
            ])
        );
        assert_eq!(
            caps("/v1/{a.b}/files/{path=**}", "/v1/7/files"),
            Some(vec![
                ("a.b".into(), "7".into()),
                ("path".into(), String::new())
            ])
        );
        assert_eq!(
            caps("/v1/x/{id}:run", "/v1/x/42:run"),
            Some(vec![("id".into(), "42".into())])
        );
        assert_eq!(caps("/v1/x/{id}:run", "/v1/x/42"), None);
        assert_eq!(caps("/v1/*/y", "/v1/anything/y"), Some(vec![]));
    }

    #[test]
    fn rejects_bad_templates_saying_why() {
        for (t, why) in [
            ("v1/x", "must start with '/'"),
            ("/v1//x", "empty segment"),
            ("/v1/{x", "not closed"),
            ("/v1/{a={b}}", "nested variable"),
            ("/v1/**/x", "'**' must be the last segment"),
            ("/v1/x:", "empty verb"),
            ("/v1/{a}/{a}", "appears twice"),
            ("/v1/{a..b}", "bad variable name"),
            ("/v1/x}", "unexpected '}'"),
        ] {
            let e = Template::parse(t).unwrap_err();
            assert!(e.contains(why), "{t}: {e}");
        }
    }

    #[test]
    fn specificity_prefers_literals_then_exact_matches() {
        let t = |s| Template::parse(s).unwrap();
        let cmp = |a, b, path| {
            let (a, b) = (t(a), t(b));
            assert!(a.matches(path).is_some() && b.matches(path).is_some());
            a.specificity_cmp(&b, Template::parts_of(path))
        };
        assert!(cmp("/v1/echo/special", "/v1/echo/{m}", "/v1/echo/special").is_gt());
        assert!(cmp("/v1/echo/{m}", "/v1/{p=**}", "/v1/echo/x").is_gt());
        assert!(cmp("/v1/echo/{m}:go", "/v1/echo/{m}", "/v1/echo/x:go").is_gt());
        // A `**` that matched nothing loses to the exact template...
        assert!(cmp("/v1/files", "/v1/files/{p=**}", "/v1/files").is_gt());
        assert!(cmp("/v1/files/{p=**}", "/v1/files", "/v1/files").is_lt());
        assert!(cmp("/v1/i/{id}", "/v1/i/{id}/{rest=**}", "/v1/i/7").is_gt());
        // ...and a literal still beats it where both consume segments.
        assert!(cmp("/v1/files/a/{x}", "/v1/files/{p=**}", "/v1/files/a/b").is_gt());
        assert!(cmp("/v1/{x}/{y=**}", "/v1/{p=**}", "/v1/a/b").is_gt());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c", false, false).unwrap(), "a b+c");
        assert_eq!(percent_decode("a%20b+c", false, true).unwrap(), "a b c");
        assert_eq!(percent_decode("a%2Fb", true, false).unwrap(), "a%2Fb");
        assert_eq!(percent_decode("a%2fb", false, false).unwrap(), "a/b");
        assert_eq!(percent_decode_lenient("%zz%4").unwrap(), "%zz%4");
        for bad in ["%zz", "a%4", "%", "%%41", "a%G0b"] {
            let e = percent_decode(bad, false, false).unwrap_err();
            assert!(e.contains("malformed percent escape"), "{bad}: {e}");
        }
        assert_eq!(percent_decode("%C3%BC", false, false).unwrap(), "ü");
        assert!(percent_decode("%FF", false, false).is_err());
    }
}

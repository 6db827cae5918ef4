//! CORS policies (a virtual host's or a route's `cors`), as Envoy's CORS filter
//! applies its route's `CorsPolicy`: a preflight (`OPTIONS` with `origin` and
//! `access-control-request-method`) from an allowed origin is answered by Legate,
//! before the filter chain (where Envoy's CORS filter sits first, ahead of
//! authentication); any other request from an allowed origin goes on, and its
//! response gets `access-control-allow-origin` (the request's origin), the
//! credentials and exposed-headers headers, and `vary: origin`. A request from an
//! origin not allowed passes untouched (the browser then refuses the answer),
//! as in Envoy, with `vary: origin` added.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

use crate::config;
use crate::router::StrTest;

/// A compiled CORS policy.
#[derive(Debug)]
pub struct Policy {
    origins: Box<[StrTest]>,
    methods: Option<HeaderValue>,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    credentials: bool,
}

/// What a request's response gets: the policy that allowed its origin, and the
/// origin.
pub type Allowed = (Arc<Policy>, HeaderValue);

/// A list joined with `, ` as one header value; `None` when empty.
fn joined(list: &[String]) -> anyhow::Result<Option<HeaderValue>> {
    if list.is_empty() {
        return Ok(None);
    }
    Ok(Some(HeaderValue::from_str(&list.join(", "))?))
}

impl Policy {
    /// Compiles a validated policy.
    pub fn new(c: &config::Cors) -> anyhow::Result<Arc<Policy>> {
        let origins = c
            .allow_origins
            .iter()
            .map(StrTest::new)
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Arc::new(Policy {
            origins: origins.into(),
            methods: joined(&c.allow_methods)?,
            headers: joined(&c.allow_headers)?,
            expose: joined(&c.expose_headers)?,
            max_age: c.max_age.map(|d| HeaderValue::from(d.get().as_secs())),
            credentials: c.allow_credentials,
        }))
    }

    /// Whether `origin` may call: one of `allow_origins` matches it (an exact
    /// `*` matches any).
    fn allows(&self, origin: &HeaderValue) -> bool {
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        // `*` is any web origin; not `null` (sandboxed frames, `file:` pages,
        // redirects), which only an explicit `{ exact: "null" }` allows.
        self.origins.iter().any(|t| match t {
            StrTest::Exact(e) if &**e == "*" => origin != "null",
            t => t.test(origin),
        })
    }

    /// The request's origin, if this policy allows it.
    pub fn check<B>(self: &Arc<Self>, req: &Request<B>) -> Option<Allowed> {
        let origin = req.headers().get(header::ORIGIN)?;
        self.allows(origin)
            .then(|| (Arc::clone(self), origin.clone()))
    }

    /// The answer to a preflight from `origin` (allowed): 200, no body.
    pub fn preflight(&self, origin: &HeaderValue) -> Response<bytes::Bytes> {
        let mut r = Response::new(bytes::Bytes::new());
        *r.status_mut() = StatusCode::OK;
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        for (name, value) in [
            (header::ACCESS_CONTROL_ALLOW_METHODS, &self.methods),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, &self.headers),
            (header::ACCESS_CONTROL_MAX_AGE, &self.max_age),
        ] {
            if let Some(v) = value {
                h.insert(name, v.clone());
            }
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        vary_origin(h);
        r
    }

    /// Adds to the response of a request from `origin` (allowed) what tells the
    /// browser it may read it.
    pub fn respond(&self, origin: &HeaderValue, h: &mut HeaderMap) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
        vary_origin(h);
    }
}

/// Whether the request is a CORS preflight.
pub fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer names the request's origin: caches must key on it. Also on a
/// route with a policy whose request had no allowed origin, whose answer lacks
/// what an allowed one's has.
pub fn vary_origin(h: &mut HeaderMap) {
    let varies = h.get_all(header::VARY).iter().any(|v| {
        legate_abi_rules::headers::list_items(v.as_bytes())
            .any(|t| t == b"*" || t.eq_ignore_ascii_case(b"origin"))
    });
    if !varies {
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Arc<Policy> {
        let c: config::Cors = serde_saphyr::from_str(yaml).unwrap();
        Policy::new(&c).unwrap()
    }

    fn from(origin: &str) -> Request<()> {
        Request::builder()
            .header("origin", origin)
            .body(())
            .unwrap()
    }

    #[test]
    fn origins_are_matched_by_their_conditions() {
        let p = policy(
            "allow_origins: [{ exact: \"https://app.example\" }, { regex: \"https://[a-z]+\\\\.example\\\\.org\" }]",
        );
        assert!(p.check(&from("https://app.example")).is_some());
        assert!(p.check(&from("https://x.example.org")).is_some());
        assert!(p.check(&from("https://x.example.org.evil")).is_none());
        assert!(p.check(&from("http://app.example")).is_none());
        assert!(p.check(&Request::new(())).is_none());
        let any = policy("allow_origins: [{ exact: \"*\" }]");
        assert!(any.check(&from("https://anything.test")).is_some());
        assert!(any.check(&from("null")).is_none());
    }

    #[test]
    fn a_preflight_answer_says_what_is_allowed() {
        let p = policy(
            "allow_origins: [{ prefix: \"https://\" }]\nallow_methods: [PUT, DELETE]\nallow_headers: [authorization]\nexpose_headers: [x-request-id]\nmax_age: 10m\nallow_credentials: true",
        );
        let origin = HeaderValue::from_static("https://app.example");
        let r = p.preflight(&origin);
        let h = r.headers();
        assert_eq!(r.status(), 200);
        assert_eq!(h["access-control-allow-origin"], "https://app.example");
        assert_eq!(h["access-control-allow-methods"], "PUT, DELETE");
        assert_eq!(h["access-control-allow-headers"], "authorization");
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["vary"], "origin");
        assert!(!h.contains_key("access-control-expose-headers"));
        let mut h = HeaderMap::new();
        h.insert("vary", HeaderValue::from_static("accept-encoding"));
        p.respond(&origin, &mut h);
        assert_eq!(h["access-control-expose-headers"], "x-request-id");
        let vary: Vec<_> = h.get_all("vary").iter().collect();
        assert_eq!(vary, ["accept-encoding", "origin"]);
    }
}

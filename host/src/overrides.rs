//! Per-request overrides and debugging set by request headers, like Envoy's
//! `x-envoy-*` headers, honoured only from a trusted downstream (the listener's
//! `http.trust_downstream: true`) and always removed before the request goes upstream:
//!
//! - `x-legate-upstream-rq-timeout-ms: N` replaces the route's `timeout` (`0` = none);
//! - `x-legate-max-retries: N` replaces the route's `retry.num_retries` (only on a
//!   route with a `retry` policy: the header tunes retries, it does not enable them);
//! - `x-legate-debug: 1` makes the response carry where the request went and how
//!   long it took ([`debug_headers`]).
//!
//! A value that is not a plain decimal number is ignored.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// `x-legate-upstream-rq-timeout-ms`.
pub const TIMEOUT: &str = "x-legate-upstream-rq-timeout-ms";
/// `x-legate-max-retries`.
pub const MAX_RETRIES: &str = "x-legate-max-retries";
/// `x-legate-debug`.
pub const DEBUG: &str = "x-legate-debug";

/// What a request asked for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Overrides {
    /// The route timeout to use instead of the route's (`Some(None)`: no timeout).
    pub timeout: Option<Option<Duration>>,
    /// The number of retries to allow instead of the route's.
    pub max_retries: Option<u32>,
    /// Whether to add the debug headers to the response.
    pub debug: bool,
}

/// Removes the override headers from `h`, returning what they asked for when the
/// downstream is `trusted` (nothing otherwise).
pub fn take(h: &mut HeaderMap, trusted: bool) -> Overrides {
    let number = |v: Option<HeaderValue>| -> Option<u64> {
        let v = v?;
        let s = v.to_str().ok()?.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let timeout = number(h.remove(TIMEOUT));
    let retries = number(h.remove(MAX_RETRIES));
    let debug = h
        .remove(DEBUG)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"1");
    if !trusted {
        return Overrides::default();
    }
    Overrides {
        timeout: timeout.map(|ms| (ms > 0).then(|| Duration::from_millis(ms))),
        max_retries: retries.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        debug,
    }
}

/// What the debug headers report.
#[derive(Debug, Default)]
pub struct Debug<'a> {
    /// The route's name.
    pub route: Option<&'a str>,
    /// The cluster.
    pub cluster: Option<&'a str>,
    /// The endpoint of the last attempt.
    pub endpoint: Option<std::net::SocketAddr>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// From the request's arrival to the upstream response headers.
    pub first_byte: Option<Duration>,
}

/// Adds `x-legate-debug-{route,cluster,endpoint,attempts,first-byte-ms}` to a
/// response.
pub fn debug_headers(h: &mut HeaderMap, d: &Debug<'_>) {
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    if let Some(r) = d.route {
        put("x-legate-debug-route", r.to_string());
    }
    if let Some(c) = d.cluster {
        put("x-legate-debug-cluster", c.to_string());
    }
    if let Some(e) = d.endpoint {
        put("x-legate-debug-endpoint", e.to_string());
    }
    put("x-legate-debug-attempts", d.attempts.to_string());
    if let Some(t) = d.first_byte {
        put(
            "x-legate-debug-first-byte-ms",
            format!("{:.3}", t.as_secs_f64() * 1000.0),
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn trusted_overrides_are_read_and_always_stripped() {
        let all = [
            (TIMEOUT, "250"),
            (MAX_RETRIES, "4"),
            (DEBUG, "1"),
            ("x-other", "y"),
        ];
        let mut h = headers(&all);
        let o = take(&mut h, true);
        assert_eq!(o.timeout, Some(Some(Duration::from_millis(250))));
        assert_eq!(o.max_retries, Some(4));
        assert!(o.debug);
        assert_eq!(h.len(), 1);

        let mut h = headers(&all);
        assert_eq!(take(&mut h, false), Overrides::default());
        assert_eq!(h.len(), 1);

        let mut h = headers(&[(TIMEOUT, "0"), (MAX_RETRIES, "-1"), (DEBUG, "yes")]);
        let o = take(&mut h, true);
        assert_eq!(o.timeout, Some(None));
        assert_eq!(o.max_retries, None);
        assert!(!o.debug);
    }
}

//! Per-request overrides and debugging set by request headers, like Envoy's
//! `x-envoy-*` headers, honoured only from a trusted downstream (the listener's
//! `http.trust_downstream: true`) and always removed before the request goes upstream:
//!
//! - `x-legate-upstream-rq-timeout-ms: N` replaces the route's `timeout` (`0` = none);
//! - `x-legate-max-retries: N` replaces the route's `retry.num_retries` (only on a
//!   route with a `retry` policy: the header tunes retries, it does not enable them),
//!   capped at 10 as a route's own setting is;
//! - `x-legate-debug: 1` makes the response carry where the request went and how
//!   long its stages took ([`debug_headers`]), also for local answers and errors.
//!
//! A value that is not a plain decimal number is ignored.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::upstream::ConnectionUse;

/// `x-legate-upstream-rq-timeout-ms`.
pub const TIMEOUT: &str = "x-legate-upstream-rq-timeout-ms";
/// `x-legate-max-retries`.
pub const MAX_RETRIES: &str = "x-legate-max-retries";
/// `x-legate-debug`.
pub const DEBUG: &str = "x-legate-debug";
/// The most retries `x-legate-max-retries` may ask for: the bound config
/// validation puts on a route's `retry.num_retries`.
pub const MAX_RETRIES_ALLOWED: u64 = 10;

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
    // One pass over the names instead of three removals by `&str` (each parses the
    // name before hashing it: ~1.4k instructions per request without overrides).
    if !h.keys().any(|k| k.as_str().starts_with("x-legate-")) {
        return Overrides::default();
    }
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
        // At most what a route may configure (config validation's bound):
        // a trusted client tunes retries, it cannot make a retry storm.
        max_retries: retries.map(|n| u32::try_from(n.min(MAX_RETRIES_ALLOWED)).unwrap_or(0)),
        debug,
    }
}

/// What the debug headers report. Durations are from the request's arrival.
#[derive(Debug, Default)]
pub struct Debug<'a> {
    /// The route's name, if one matched.
    pub route: Option<&'a str>,
    /// The cluster, if the route sends to one.
    pub cluster: Option<&'a str>,
    /// The endpoint of the last attempt: the one that answered, or the last that
    /// failed.
    pub endpoint: Option<std::net::SocketAddr>,
    /// Upstream attempts made, retries included.
    pub attempts: u32,
    /// How the answering attempt got its connection (`None`: no upstream answer).
    pub connection: Option<ConnectionUse>,
    /// Time spent in the request-headers phase of the filter chain.
    pub request_filters: Option<Duration>,
    /// When the upstream's response headers arrived.
    pub first_byte: Option<Duration>,
    /// Time spent in the response-headers phase of the filter chain.
    pub response_filters: Option<Duration>,
    /// When the response headers were ready to go downstream.
    pub total: Duration,
    /// The error's cause, for an error response.
    pub cause: Option<&'a str>,
}

/// Adds the debug headers to a response (see docs/config.md, "Override and debug
/// headers"): `x-legate-debug-{route,cluster,endpoint,attempts,connection,cause}`
/// where known, and `x-legate-debug-timing: request-filters=N, connect=N,
/// first-byte=N, response-filters=N, total=N` in microseconds, each part present
/// only when it happened.
pub fn debug_headers(h: &mut HeaderMap, d: &Debug<'_>) {
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    if let Some(r) = d.route {
        put("x-legate-debug-route", r);
    }
    if let Some(c) = d.cluster {
        put("x-legate-debug-cluster", c);
    }
    if let Some(e) = d.endpoint {
        put("x-legate-debug-endpoint", &e.to_string());
    }
    put("x-legate-debug-attempts", &d.attempts.to_string());
    if let Some(c) = d.connection {
        let kind = match c {
            ConnectionUse::Reused => "reused",
            ConnectionUse::New { .. } => "new",
        };
        put("x-legate-debug-connection", kind);
    }
    if let Some(c) = d.cause {
        put("x-legate-debug-cause", c);
    }
    put("x-legate-debug-timing", &timing(d));
}

/// The `x-legate-debug-timing` value.
fn timing(d: &Debug<'_>) -> String {
    let connect = match d.connection {
        Some(ConnectionUse::New { connect }) => Some(connect),
        _ => None,
    };
    let parts = [
        ("request-filters", d.request_filters),
        ("connect", connect),
        ("first-byte", d.first_byte),
        ("response-filters", d.response_filters),
        ("total", Some(d.total)),
    ];
    let mut out = String::new();
    for (name, t) in parts {
        if let Some(t) = t {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(&format!("{name}={}", t.as_micros()));
        }
    }
    out
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

        let mut h = headers(&[(MAX_RETRIES, "4294967295")]);
        assert_eq!(
            take(&mut h, true).max_retries,
            Some(10),
            "capped as in config"
        );

        let mut h = headers(&[(TIMEOUT, "0"), (MAX_RETRIES, "-1"), (DEBUG, "yes")]);
        let o = take(&mut h, true);
        assert_eq!(o.timeout, Some(None));
        assert_eq!(o.max_retries, None);
        assert!(!o.debug);
    }

    #[test]
    fn timing_lists_only_what_happened_in_order() {
        let us = Duration::from_micros;
        let mut d = Debug {
            first_byte: Some(us(900)),
            total: us(1000),
            connection: Some(ConnectionUse::Reused),
            ..Debug::default()
        };
        assert_eq!(timing(&d), "first-byte=900, total=1000");
        d.connection = Some(ConnectionUse::New { connect: us(300) });
        d.request_filters = Some(us(20));
        d.response_filters = Some(us(5));
        assert_eq!(
            timing(&d),
            "request-filters=20, connect=300, first-byte=900, response-filters=5, total=1000"
        );
        let mut h = HeaderMap::new();
        debug_headers(&mut h, &d);
        assert_eq!(h["x-legate-debug-connection"], "new");
        assert_eq!(h["x-legate-debug-attempts"], "0");
        assert!(!h.contains_key("x-legate-debug-route"));
    }
}

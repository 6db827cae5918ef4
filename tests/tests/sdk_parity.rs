//! The SDK's native test harness (`legate_sdk::testing`) against the host,
//! where the SDK applies a host rule with code of its own because it cannot
//! depend on the host: the two must behave the same. (Rules that are data or
//! a pure function, such as the hop-by-hop list, are shared instead: crate
//! `legate-abi-rules`, abi/rules.)
//!
//! - Hop-by-hop fields of a callout response: the host strips them
//!   (host/src/proxy.rs `callout`, `proxy_headers::strip_hop_by_hop`) before
//!   the filter gets the response, and so must the harness: the same heads
//!   out of the same heads in (the listed fields, `connection`-named fields,
//!   `te`).

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use legate_host::proxy_headers;
use legate_sdk::callout::{self, CalloutId, CalloutResponse};
use legate_sdk::testing::{self, Request, TestHost};
use legate_sdk::{Action, Error, Exchange, Headers, HttpFilter, Setup};

/// Sends a callout from the request headers and records the head of the
/// response it gets.
#[derive(Default)]
struct Heads {
    heads: Vec<Vec<(String, Vec<u8>)>>,
}

impl HttpFilter for Heads {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Heads::default())
    }
    fn setup(&self) -> Setup {
        Setup::new().on_request_headers()
    }
    fn on_request_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        callout::send(&callout::CalloutRequest::new("c", "GET", "/")).unwrap();
        Action::Pause
    }
    fn on_callout_response(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: CalloutId,
        r: Result<CalloutResponse, Error>,
    ) -> Action {
        self.heads.push(r.unwrap().headers);
        Action::Continue
    }
}

fn sorted(mut h: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    h.sort();
    h
}

#[test]
fn a_callout_response_loses_the_same_fields_in_the_harness_as_on_the_host() {
    // Every listed name, fields `connection` may and may not name, and `te`
    // in the shapes the host tells apart.
    let listed: BTreeSet<String> = testing::HOP_BY_HOP
        .iter()
        .map(|n| (*n).to_owned())
        .collect();
    let connections: [&[&str]; 4] = [
        &[],
        &["close"],
        &["x-hop, Content-Length, host, TE", "X-Other"],
        &["x-hop;q=1, @bad, ,x-keep2"],
    ];
    let tes: [&[&str]; 6] = [
        &[],
        &["trailers"],
        &["gzip"],
        &["gzip, Trailers;q=0.5"],
        &["deflate", "trailers"],
        &[" trailers "],
    ];
    let host = TestHost::new().grant_cluster("c");
    let mut t = host.configure::<Heads>("null").unwrap();
    let mut expected = Vec::new();
    for connection in connections {
        for te in tes {
            let mut fields: Vec<(String, String)> = listed
                .iter()
                .filter(|n| *n != "connection")
                .map(|n| (n.clone(), "v".to_owned()))
                .collect();
            for v in connection {
                fields.push(("connection".into(), (*v).into()));
            }
            for v in te {
                fields.push(("te".into(), (*v).into()));
            }
            for (n, v) in [
                ("x-hop", "1"),
                ("x-other", "2"),
                ("host", "h"),
                ("content-length", "2"),
                ("x-keep", "3"),
                ("x-keep2", "4"),
            ] {
                fields.push((n.into(), v.into()));
            }

            // The host.
            let mut map = HeaderMap::new();
            for (n, v) in &fields {
                map.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            proxy_headers::strip_hop_by_hop(&mut map);
            let on_host: Vec<(String, Vec<u8>)> = map
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect();
            expected.push(sorted(on_host));

            // The harness.
            let mut resp = CalloutResponse::new(200, "ok");
            for (n, v) in &fields {
                resp = resp.header(n.as_str(), v.as_bytes());
            }
            let mut x = t.exchange(Request::get("/"));
            assert_eq!(x.request_headers(), Action::Pause);
            host.queue_callout_response("c", Ok(resp));
            assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
        }
    }
    let in_harness: Vec<_> = t.filter().heads.iter().cloned().map(sorted).collect();
    assert_eq!(in_harness.len(), expected.len());
    for (i, (got, want)) in in_harness.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "case {i}");
    }
    // And the cases tell something apart: a `te` kept, one dropped, a
    // nominated field dropped, the fixed list dropped.
    assert!(expected.iter().any(|h| h.iter().any(|(n, _)| n == "te")));
    assert!(expected.iter().any(|h| !h.iter().any(|(n, _)| n == "te")));
    assert!(expected
        .iter()
        .any(|h| !h.iter().any(|(n, _)| n == "x-hop")));
    assert!(expected
        .iter()
        .all(|h| !h.iter().any(|(n, _)| listed.contains(n))));
}

//! Request mirroring (shadowing): a route's `mirror` sends a copy of a share of its
//! requests to another cluster, fire and forget.
//!
//! The copy is a separate task on the worker: the primary request never waits for
//! it, and its outcome (an error, a timeout, a slow answer) never reaches the client.
//! The copy carries the primary's method, path and headers (after the route's header
//! operations), with the Host/`:authority` suffixed `-shadow` (`api.example:8080` →
//! `api.example-shadow:8080`), so the shadow service can tell copies apart. Only a
//! request whose body is known in full (read before the primary is sent, at most
//! `max_body` bytes, no trailers) is mirrored; the proxy reads such a body before
//! forwarding when the route mirrors. The shadow's answer is read and discarded
//! as it comes, up to [`DRAIN_LIMIT`] (then dropped, with its connection).
//!
//! Counters, on the shadow cluster: `mirror_requests`, `mirror_failures` (plus its
//! ordinary upstream counters).

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::BodyExt;

use crate::body;
use crate::config::Mirror;
use crate::server::Snapshot;
use crate::upstream::Target;
use crate::worker::Worker;

/// How much of a shadow's answer is read (and thrown away) to keep its
/// connection: a big download is cut there rather than pulled in whole.
const DRAIN_LIMIT: usize = 1 << 20;

/// Whether this request is to be mirrored under `m` (the `percent` draw).
pub fn chosen(m: &Mirror) -> bool {
    m.percent.draw()
}

/// `authority` with `-shadow` appended to its host part, as Envoy's shadow
/// host (`api.example:8080` becomes `api.example-shadow:8080`), with two
/// departures where Envoy's result is no valid host: a fully qualified name's
/// trailing dot goes first (`api.example.` becomes `api.example-shadow`, not
/// `api.example.-shadow`), and an IPv6 literal stays as it is (`[::1]-shadow`
/// is no authority, RFC 3986 §3.2.2).
pub fn shadow_authority(authority: &str) -> String {
    if authority.starts_with('[') {
        return authority.to_string();
    }
    let (host, port) = match authority.rfind(':') {
        Some(i) => authority.split_at(i),
        None => (authority, ""),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    format!("{host}-shadow{port}")
}

/// What the copy is made of.
pub struct Copy {
    /// Method.
    pub method: Method,
    /// Origin-form path and query.
    pub path: String,
    /// Request headers as sent to the primary (Host excluded).
    pub headers: HeaderMap,
    /// The Host/`:authority` the primary gets.
    pub authority: String,
    /// The whole body.
    pub body: Bytes,
}

/// Starts the copy of a request on this worker and returns at once.
pub fn send(worker: &Rc<Worker>, snapshot: &Snapshot, m: &Mirror, copy: Copy) {
    let Some(entry) = snapshot.clusters.get(&m.cluster.value).cloned() else {
        return;
    };
    let worker = worker.clone();
    let timeout = m.timeout.get();
    tokio::task::spawn_local(async move {
        let cluster = entry.cluster();
        cluster.stats.mirror_requests.fetch_add(1, Relaxed);
        if !shadow(&worker, &entry, copy, timeout).await {
            cluster.stats.mirror_failures.fetch_add(1, Relaxed);
        }
    });
}

/// Sends the copy; whether it got a non-5xx answer within `timeout` (a timeout
/// is a failure, the endpoint's too: `upstream_rq_timeout`, outlier detection,
/// as Envoy's shadow timeouts). The answer's body is then read and thrown away
/// within another `timeout`, which decides nothing: a slow body after a good
/// head is no failure.
async fn shadow(
    worker: &Worker,
    entry: &Arc<crate::server::ClusterEntry>,
    copy: Copy,
    timeout: std::time::Duration,
) -> bool {
    let cluster = entry.cluster();
    let Some(i) = worker.balancer(&cluster).pick(None, &[]) else {
        return false;
    };
    let Some(ep) = cluster.endpoints.get(i).cloned() else {
        return false;
    };
    let Ok(active) = cluster.try_start_request(Some(i)) else {
        return false;
    };
    let (Ok(uri), Ok(host)) = (
        copy.path.parse::<Uri>(),
        HeaderValue::from_str(&shadow_authority(&copy.authority)),
    ) else {
        return false;
    };
    // Framed by the head, as the primary's: a copy whose `content-length` a
    // filter removed goes without one (hyper would write the length of a
    // body it knows whole).
    let mut req = Request::new(body::framed_by_head(&copy.headers, body::full(copy.body)));
    *req.method_mut() = copy.method;
    *req.uri_mut() = uri;
    *req.headers_mut() = copy.headers;
    req.headers_mut().insert(header::HOST, host);
    let target = Target {
        addr: ep.address,
        host: &ep.host,
        cluster: &cluster,
        endpoint: Some(i),
        proxied: None,
    };
    let sent = tokio::time::timeout(timeout, worker.pool.send(&entry.upstream, target, req)).await;
    match sent {
        Err(_) => {
            active.record_timeout();
            false
        }
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            active.record_status(status);
            // Read the answer and throw it away as it comes, so the connection
            // can be reused; past DRAIN_LIMIT or the time allowed the body is
            // dropped instead (the connection with it), not pulled in for
            // nothing. The copy stays active (`upstream_rq_active`) meanwhile.
            let mut body = resp.into_body();
            let drain = async {
                let mut read = 0usize;
                while read <= DRAIN_LIMIT {
                    match body.frame().await {
                        Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
                        _ => break,
                    }
                }
            };
            let _ = tokio::time::timeout(timeout, drain).await;
            status < 500
        }
        Ok(Err(e)) => {
            tracing::debug!(cluster = %cluster.name, "mirror: {}", e.detail);
            // As the main path: the endpoint's failure only when it is the
            // upstream's, not this cluster's own circuit breaker refusing the
            // connection (`max_connections`, `max_pending_requests`).
            if e.side() == crate::error::Side::Upstream {
                active.record_failure();
                if e.kind == crate::error::Kind::UpstreamReset {
                    active.record_reset();
                }
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_host() {
        assert_eq!(shadow_authority("api.example"), "api.example-shadow");
        assert_eq!(
            shadow_authority("api.example:8080"),
            "api.example-shadow:8080"
        );
        assert_eq!(shadow_authority("api.example."), "api.example-shadow");
        assert_eq!(
            shadow_authority("api.example.:8080"),
            "api.example-shadow:8080"
        );
        assert_eq!(shadow_authority("10.0.0.1:80"), "10.0.0.1-shadow:80");
        assert_eq!(shadow_authority("[::1]:80"), "[::1]:80");
        assert_eq!(shadow_authority("[::1]"), "[::1]");
    }
}

//! Endpoint health: the flags every worker's balancer reads, and the active health
//! checker that sets one of them.
//!
//! **Where checks run.** One thread for the whole process (`legate-health`, started
//! by [`spawn`]) runs every cluster's checks — one task per endpoint — and the
//! outlier-detection interval of every cluster. Checks are not repeated per worker:
//! an endpoint sees one check per interval whatever `--concurrency` is.
//!
//! **How state is shared.** Each endpoint has one `AtomicU8` of flags
//! ([`FAILED_ACTIVE_HC`], [`EJECTED`]); an endpoint is available when no flag is set.
//! The checker and the workers (outlier ejection) flip flags with `fetch_or` /
//! `fetch_and`, and whoever changes an endpoint between available and unavailable
//! adjusts the cluster's `membership_healthy` gauge, which balancers read first so an
//! all-healthy cluster costs one load per pick. No locks anywhere on the request path;
//! a flag set by the checker is seen by the next pick of every worker.
//!
//! **Initial state.** Endpoints start *healthy*, and the first check's result is
//! applied at once, ignoring the thresholds. Envoy starts them unhealthy and holds the
//! cluster back ("warming") until the first round of checks; Legate warms only for
//! a `dns` cluster's first answer (see `discovery`), not for health checks, so
//! starting unhealthy would fail (or, through panic mode, ignore) the first
//! requests after every start. Starting healthy and checking immediately bounds the
//! window in which a dead endpoint gets traffic to the first check's timeout, and
//! retries and outlier detection cover that window. Only an endpoint new to the
//! cluster gets that first-check shortcut: its pass/fail run lives on the endpoint
//! ([`EndpointHealth`]), so checks restarted by a reload, and discovery's copy of a
//! reweighted endpoint, go on with the thresholds.
//!
//! **Generations.** Discovery replaces a cluster's endpoint list with a new
//! [`Cluster`] value (a generation) while attempts on the old one finish. A flag
//! change on an endpoint the newest generation no longer lists is ignored
//! ([`Cluster::set_flag`]): the cluster's gauges (`membership_healthy`,
//! `outlier_detection_ejections_active`) count the newest generation's endpoints
//! only, and are recounted from the flags whenever a generation is built.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::Empty;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{Cluster, Endpoint};
use crate::config::{GrpcHealthCheck, HealthCheck, HttpHealthCheck, TcpHealthCheck};
use crate::io::Conn;
use crate::server::ClusterEntry;
use crate::upstream::{self, Target};
use crate::worker::LocalExec;

/// The endpoint failed its active health checks.
pub const FAILED_ACTIVE_HC: u8 = 1;
/// Outlier detection ejected the endpoint.
pub const EJECTED: u8 = 2;

/// The most bytes a TCP check reads while looking for its `expect` bytes.
const MAX_TCP_READ: usize = 64 * 1024;

/// One endpoint's health, shared by the checker and all workers.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    flags: AtomicU8,
    /// Why the last failed check failed (for `/clusters`).
    last_failure: ArcSwapOption<String>,
    /// Why the last failed connect of a request failed (for `/clusters`).
    last_connect_failure: ArcSwapOption<String>,
    /// The newest generation of its cluster that lists the endpoint (see the
    /// module doc): an id from [`next_generation`].
    generation: AtomicU64,
    /// Whether a check result was applied yet: only the very first one skips the
    /// thresholds. On the endpoint, not in the check task, so that a checker
    /// restarted by a reload keeps the run.
    checked: AtomicBool,
    /// Consecutive passed and failed checks.
    passes: AtomicU32,
    fails: AtomicU32,
}

impl EndpointHealth {
    /// Whether new requests may go here: no health flag set.
    pub fn is_available(&self) -> bool {
        self.flags.load(Relaxed) == 0
    }

    /// Gives an endpoint no cluster uses yet (discovery's copy of a reweighted
    /// endpoint) the active-check state of `old`: a failed check and the pass/fail
    /// run, so its thresholds still apply. Not an ejection: the copy starts in.
    pub(super) fn carry_from(&self, old: &EndpointHealth) {
        self.flags.store(old.flags() & FAILED_ACTIVE_HC, Relaxed);
        self.checked.store(old.checked.load(Relaxed), Relaxed);
        self.passes.store(old.passes.load(Relaxed), Relaxed);
        self.fails.store(old.fails.load(Relaxed), Relaxed);
        self.last_failure.store(old.last_failure.load_full());
        self.last_connect_failure
            .store(old.last_connect_failure.load_full());
    }

    /// Notes why a request's connect to the endpoint failed (for `/clusters`).
    pub fn set_connect_failure(&self, error: &str) {
        let same = self
            .last_connect_failure
            .load()
            .as_deref()
            .is_some_and(|e| e == error);
        if !same {
            self.last_connect_failure
                .store(Some(Arc::new(error.to_string())));
        }
    }

    /// The flags ([`FAILED_ACTIVE_HC`], [`EJECTED`]).
    pub fn flags(&self) -> u8 {
        self.flags.load(Relaxed)
    }
}

/// A new generation id, unique in the process (so endpoints moved between two
/// clusters' lineages can never match a stale one).
fn next_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Relaxed)
}

/// Makes `endpoints` the newest generation of the lineage whose newest id is kept
/// in `newest`: endpoints left out of it stop being current at once.
pub(super) fn enter_generation(endpoints: &[Arc<Endpoint>], newest: &AtomicU64) -> u64 {
    let id = next_generation();
    for ep in endpoints {
        ep.health.generation.store(id, Relaxed);
    }
    newest.store(id, Relaxed);
    id
}

impl Cluster {
    /// Whether `ep` is listed by the newest generation of this cluster (this value
    /// may be an older one that an attempt still uses).
    pub(crate) fn is_current(&self, ep: &Endpoint) -> bool {
        ep.health.generation.load(Relaxed) == self.breakers.generation.load(Relaxed)
    }

    /// Whether this value is the newest generation of its cluster (the one the
    /// `membership_*` gauges count).
    pub(crate) fn is_newest(&self) -> bool {
        self.generation == self.breakers.generation.load(Relaxed)
    }

    /// Sets (`on`) or clears `flag` on endpoint `i`, keeping `membership_healthy` in
    /// step; whether the flag changed. An endpoint the newest generation no longer
    /// lists is left alone (false): the gauges count the newest generation only.
    pub(crate) fn set_flag(&self, i: usize, flag: u8, on: bool) -> bool {
        let Some(ep) = self.endpoints.get(i) else {
            return false;
        };
        if !self.is_current(ep) {
            return false;
        }
        let flags = &ep.health.flags;
        let prev = if on {
            flags.fetch_or(flag, Relaxed)
        } else {
            flags.fetch_and(!flag, Relaxed)
        };
        let next = if on { prev | flag } else { prev & !flag };
        let members = &self.stats.membership_healthy;
        if prev == 0 && next != 0 {
            // Saturating: a new generation recounting the gauge between the
            // check above and this update could make it one short, and a wrap
            // to u64::MAX would turn health off until the next generation.
            let _ = members.fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
        } else if prev != 0 && next == 0 {
            members.fetch_add(1, Relaxed);
        }
        prev != next
    }

    /// Whether the cluster is in panic mode with `healthy` endpoints available: below
    /// `panic_threshold` of them, health is ignored.
    pub(crate) fn in_panic(&self, healthy: usize) -> bool {
        let total = self.endpoints.len() as f64;
        (healthy as f64) * 100.0 < self.config.panic_threshold.0 * total
    }

    /// An endpoint's health for `/clusters`.
    pub(super) fn endpoint_health_json(&self, ep: &Endpoint) -> Value {
        let flags = ep.health.flags();
        serde_json::json!({
            "status": if flags == 0 { "healthy" } else { "unhealthy" },
            "failed_active_health_check": flags & FAILED_ACTIVE_HC != 0,
            "last_health_check_failure": ep.health.last_failure.load().as_deref().map(String::as_str),
            "last_connect_failure": ep.health.last_connect_failure.load().as_deref().map(String::as_str),
            "outlier": self.outlier_json(&ep.outlier, flags & EJECTED != 0),
        })
    }
}

/// Starts the `legate-health` thread if any cluster has health checks, outlier
/// detection or discovery; it stops when `drain` turns true. It first waits for
/// `previous` (the thread of the cluster set it replaces, told to stop) to end:
/// that thread's discovery may add an endpoint to a cluster both share until it
/// stops, and the checks it would start there die with it, so the new thread
/// lists the endpoints only after it.
pub fn spawn(
    clusters: Vec<Arc<ClusterEntry>>,
    mut drain: watch::Receiver<bool>,
    previous: Option<std::thread::JoinHandle<()>>,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    let wanted: Vec<Arc<ClusterEntry>> = clusters
        .into_iter()
        .filter(|e| {
            let c = &e.cluster().config;
            c.health_check.is_some()
                || c.outlier_detection.is_some()
                || c.discovery.kind != crate::config::DiscoveryType::Static
        })
        .collect();
    if wanted.is_empty() {
        return Ok(None);
    }
    std::thread::Builder::new()
        .name("legate-health".into())
        .spawn(move || {
            if let Some(previous) = previous {
                // It was told to stop when this thread was made; a panic
                // there is its own (logged by the panic hook).
                let _ = previous.join();
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("health-check runtime: {e}");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                for entry in wanted {
                    let cluster = entry.cluster();
                    for ep in &cluster.endpoints {
                        start_checks(&entry, ep);
                    }
                    if let Some(every) = cluster.outlier_interval() {
                        let entry = entry.clone();
                        tokio::task::spawn_local(async move {
                            let mut tick = tokio::time::interval(every);
                            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            tick.tick().await;
                            loop {
                                tick.tick().await;
                                entry.cluster().outlier_tick();
                            }
                        });
                    }
                    if cluster.config.discovery.kind != crate::config::DiscoveryType::Static {
                        tokio::task::spawn_local(super::discovery::run(entry.clone()));
                    }
                }
                let _ = drain.wait_for(|d| *d).await;
            });
        })
        .map(Some)
}

/// Why a check failed.
enum Failure {
    /// No answer: connect failure, reset, timeout. Counts toward the threshold.
    Network(String),
    /// An answer that means unhealthy (HTTP status, missing TCP bytes). An HTTP
    /// status outside `expected_statuses` fails the endpoint at once, as Envoy.
    Answer { reason: String, immediate: bool },
}

/// Starts the active health checks of `ep` (an endpoint of `entry`'s current
/// cluster), if the cluster has any; they stop once discovery drops the endpoint.
/// Must run on the health thread's `LocalSet`.
pub(super) fn start_checks(entry: &Arc<ClusterEntry>, ep: &Arc<Endpoint>) {
    if let Some(hc) = &entry.cluster().config.health_check {
        tokio::task::spawn_local(check_loop(entry.clone(), Arc::new(hc.clone()), ep.clone()));
    }
}

/// Checks endpoint `ep` every interval (plus jitter) for as long as it belongs to the
/// cluster's current generation (always, without discovery).
async fn check_loop(entry: Arc<ClusterEntry>, hc: Arc<HealthCheck>, ep: Arc<Endpoint>) {
    let h = &ep.health;
    loop {
        let Some((cluster, i)) = current(&entry, &ep) else {
            return;
        };
        cluster.stats.health_check_attempt.fetch_add(1, Relaxed);
        let result = match tokio::time::timeout(
            hc.timeout.get(),
            check_once(&entry, &cluster, &hc, i),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Failure::Network(format!("timed out after {}", hc.timeout))),
        };
        // Discovery may have built a new generation meanwhile: flag it there.
        let Some((cluster, i)) = current(&entry, &ep) else {
            return;
        };
        let st = &cluster.stats;
        let failed = h.flags() & FAILED_ACTIVE_HC != 0;
        // The endpoint's first result ever is believed at once (module doc).
        let first = !h.checked.swap(true, Relaxed);
        match result {
            Ok(()) => {
                st.health_check_success.fetch_add(1, Relaxed);
                h.fails.store(0, Relaxed);
                let passes = h.passes.load(Relaxed).saturating_add(1);
                h.passes.store(passes, Relaxed);
                if failed && (first || passes >= hc.healthy_threshold) {
                    cluster.set_flag(i, FAILED_ACTIVE_HC, false);
                    // Health restored by active checks also ends an ejection, as
                    // Envoy's `successful_active_health_check_uneject_host`.
                    cluster.uneject(i);
                    tracing::info!(cluster = %cluster.name, endpoint = %ep.address, "endpoint passes its health checks");
                }
            }
            Err(f) => {
                st.health_check_failure.fetch_add(1, Relaxed);
                h.passes.store(0, Relaxed);
                let fails = h.fails.load(Relaxed).saturating_add(1);
                h.fails.store(fails, Relaxed);
                let (reason, immediate) = match f {
                    Failure::Network(r) => {
                        st.health_check_network_failure.fetch_add(1, Relaxed);
                        (r, false)
                    }
                    Failure::Answer { reason, immediate } => (reason, immediate),
                };
                if !failed && (first || immediate || fails >= hc.unhealthy_threshold) {
                    cluster.set_flag(i, FAILED_ACTIVE_HC, true);
                    tracing::warn!(cluster = %cluster.name, endpoint = %ep.address, "endpoint fails its health checks: {reason}");
                }
                h.last_failure.store(Some(Arc::new(reason)));
            }
        }
        let jitter = hc.interval_jitter.get();
        let extra = if jitter.is_zero() {
            Duration::ZERO
        } else {
            jitter.mul_f64(rand::rng().random::<f64>())
        };
        tokio::time::sleep(hc.interval.get() + extra).await;
    }
}

/// The cluster's current generation and `ep`'s index in it, if it is still there.
fn current(entry: &ClusterEntry, ep: &Arc<Endpoint>) -> Option<(Arc<Cluster>, usize)> {
    let cluster = entry.cluster();
    let i = cluster.index_of(ep)?;
    Some((cluster, i))
}

/// One check of endpoint `i` on a fresh connection (not pooled, not counted in the
/// cluster's connection stats, not subject to its circuit breakers).
async fn check_once(
    entry: &ClusterEntry,
    cluster: &Arc<Cluster>,
    hc: &HealthCheck,
    i: usize,
) -> Result<(), Failure> {
    let ep = cluster
        .endpoints
        .get(i)
        .ok_or_else(|| Failure::Network("no such endpoint".into()))?;
    let own = ep.health_check.as_ref();
    // Envoy's `port_value`: the same address, another port (the same TLS name).
    let mut addr = ep.address;
    if let Some(port) = own.and_then(|o| o.port) {
        addr.set_port(port);
    }
    let target = Target {
        addr,
        host: &ep.host,
        cluster,
        endpoint: Some(i),
        proxied: None,
    };
    let (conn, h2) = upstream::open_unpooled(&entry.upstream, &target)
        .await
        .map_err(|e| Failure::Network(e.detail))?;
    if let Some(grpc) = &hc.grpc {
        let authority = own
            .and_then(|o| o.host.as_deref())
            .or(grpc.authority.as_deref())
            .unwrap_or(cluster.config.name.as_str());
        let tls = cluster.config.tls.is_some();
        return grpc_check(conn, h2, tls, authority, grpc).await;
    }
    match (&hc.http, &hc.tcp) {
        (Some(http), _) => {
            let tls = cluster.config.tls.is_some();
            // Envoy's order: the endpoint's own host, the check's `host`, the
            // cluster's name (a virtual-host-routed upstream, or one behind another
            // proxy, gets one stable name rather than one address of many).
            let authority = own
                .and_then(|o| o.host.as_deref())
                .or(http.host.as_deref())
                .unwrap_or(cluster.config.name.as_str());
            http_check(conn, h2, tls, authority, http).await
        }
        (None, Some(tcp)) => tcp_check(conn, tcp).await,
        (None, None) => Ok(()),
    }
}

async fn http_check(
    conn: Conn,
    h2: bool,
    tls: bool,
    authority: &str,
    cfg: &HttpHealthCheck,
) -> Result<(), Failure> {
    let io = TokioIo::new(conn);
    let net = |e: hyper::Error| Failure::Network(refused_or(&e, with_causes(&e)));
    let bad = |e: http::Error| Failure::Network(format!("cannot build the request: {e}"));
    let user_agent = header::HeaderValue::from_static("legate-health-check");
    let status = if h2 {
        let (mut sender, conn) = http2::Builder::new(LocalExec)
            .handshake::<_, Empty<Bytes>>(io)
            .await
            .map_err(net)?;
        let driver = tokio::task::spawn_local(conn);
        let uri = Uri::builder()
            .scheme(if tls { "https" } else { "http" })
            .authority(authority)
            .path_and_query(cfg.path.as_str())
            .build()
            .map_err(bad)?;
        let req = Request::get(uri)
            .version(http::Version::HTTP_2)
            .header(header::USER_AGENT, user_agent)
            .body(Empty::new())
            .map_err(bad)?;
        let status = sender.send_request(req).await.map_err(net)?.status();
        driver.abort();
        status
    } else {
        let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(io).await.map_err(net)?;
        let driver = tokio::task::spawn_local(conn);
        let req = Request::get(cfg.path.as_str())
            .header(header::HOST, authority)
            .header(header::USER_AGENT, user_agent)
            .header(header::CONNECTION, "close")
            .body(Empty::new())
            .map_err(bad)?;
        let status = sender.send_request(req).await.map_err(net)?.status();
        driver.abort();
        status
    };
    if cfg
        .expected_statuses
        .iter()
        .any(|r| r.contains(status.as_u16()))
    {
        Ok(())
    } else {
        Err(Failure::Answer {
            reason: format!("HTTP status {}", status.as_u16()),
            immediate: true,
        })
    }
}

/// `grpc.health.v1.Health/Check` for `cfg.service_name`: healthy when the call
/// succeeds (`grpc-status: 0`) with status `SERVING`, as Envoy's gRPC checker.
/// Failures count toward `unhealthy_threshold` (unlike an HTTP check's
/// unexpected status, which Envoy takes as final).
async fn grpc_check(
    conn: Conn,
    h2: bool,
    tls: bool,
    authority: &str,
    cfg: &GrpcHealthCheck,
) -> Result<(), Failure> {
    use http_body_util::{BodyExt as _, Full};
    if !h2 {
        return Err(Failure::Network(
            "the connection is not HTTP/2 (ALPN chose HTTP/1.1), which gRPC needs".into(),
        ));
    }
    let net = |e: hyper::Error| Failure::Network(refused_or(&e, with_causes(&e)));
    let bad = |e: http::Error| Failure::Network(format!("cannot build the request: {e}"));
    let answer = |reason: String| Failure::Answer {
        reason,
        immediate: false,
    };
    let (mut sender, driver) = http2::Builder::new(LocalExec)
        .handshake::<_, Full<Bytes>>(TokioIo::new(conn))
        .await
        .map_err(net)?;
    let driver = tokio::task::spawn_local(driver);
    let uri = Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(authority)
        .path_and_query("/grpc.health.v1.Health/Check")
        .build()
        .map_err(bad)?;
    let req = Request::post(uri)
        .version(http::Version::HTTP_2)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, "legate-health-check")
        .body(Full::new(grpc_health_request(&cfg.service_name)))
        .map_err(bad)?;
    let result = async {
        let resp = sender.send_request(req).await.map_err(net)?;
        if resp.status() != http::StatusCode::OK {
            return Err(answer(format!("HTTP status {}", resp.status().as_u16())));
        }
        // A trailers-only answer has its status in the head.
        let head_status = resp.headers().get("grpc-status").cloned();
        // A health answer is a few bytes; the cap keeps a broken server from
        // making the check hold its whole body.
        let collected = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| answer(format!("reading the answer: {e}")))?;
        let trailers = collected.trailers().cloned();
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status").cloned())
            .or(head_status);
        match status.as_ref().map(http::HeaderValue::as_bytes) {
            Some(b"0") => {}
            Some(code) => {
                let message = trailers
                    .as_ref()
                    .and_then(|t| t.get("grpc-message"))
                    .and_then(|m| m.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                return Err(answer(format!(
                    "gRPC status {}{}",
                    String::from_utf8_lossy(code),
                    if message.is_empty() {
                        String::new()
                    } else {
                        format!(" ({message})")
                    }
                )));
            }
            None => return Err(answer("gRPC answer without grpc-status".into())),
        }
        match grpc_serving_status(&collected.to_bytes()) {
            Some(1) => Ok(()),
            Some(n) => Err(answer(format!(
                "serving status {}",
                match n {
                    0 => "UNKNOWN",
                    2 => "NOT_SERVING",
                    3 => "SERVICE_UNKNOWN",
                    _ => "unknown to Legate",
                }
            ))),
            None => Err(answer("malformed HealthCheckResponse".into())),
        }
    }
    .await;
    driver.abort();
    result
}

/// A gRPC message frame of `HealthCheckRequest { service }`.
fn grpc_health_request(service: &str) -> Bytes {
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    Bytes::from(frame)
}

/// `HealthCheckResponse.status` (field 1, an enum) of the one message in a
/// gRPC body; 0 (`UNKNOWN`) when the field is absent, as proto3 reads it;
/// `None` when the body is not one well-formed uncompressed message.
fn grpc_serving_status(body: &[u8]) -> Option<u64> {
    let (&flag, rest) = body.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let msg = rest.get(4..4 + len)?;
    if flag != 0 || rest.len() != 4 + len {
        return None;
    }
    let varint = |b: &[u8], at: &mut usize| -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at)?;
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    let mut at = 0;
    let mut status = 0;
    while at < msg.len() {
        let key = varint(msg, &mut at)?;
        match key & 7 {
            0 => {
                let v = varint(msg, &mut at)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            1 => at += 8,
            2 => {
                let n = usize::try_from(varint(msg, &mut at)?).ok()?;
                at = at.checked_add(n)?;
            }
            5 => at += 4,
            _ => return None,
        }
    }
    (at == msg.len()).then_some(status)
}

/// A TLS alert on the check's first read is the upstream refusing the TLS
/// handshake after Legate's side completed it (with TLS 1.3, the client
/// certificate): said as the handshake failure it is; else `text`.
fn refused_or(e: &(dyn std::error::Error + 'static), text: String) -> String {
    match upstream::tls_alert(e) {
        Some(alert) => format!("TLS handshake: {alert}"),
        None => text,
    }
}

/// `e` and its causes, `: `-separated (each once): hyper's own text alone
/// is `http2 error` or `connection error` whatever went wrong, the h2 or I/O
/// error below says what.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        src = s.source();
    }
    text
}

async fn tcp_check(mut conn: Conn, cfg: &TcpHealthCheck) -> Result<(), Failure> {
    let io = |e: std::io::Error| Failure::Network(refused_or(&e, e.to_string()));
    if let Some(send) = cfg.send.as_ref().and_then(|p| p.bytes()) {
        conn.write_all(&send).await.map_err(io)?;
        conn.flush().await.map_err(io)?;
    }
    let Some(expect) = cfg.expect.as_ref().and_then(|p| p.bytes()) else {
        return Ok(());
    };
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if got.windows(expect.len()).any(|w| w == expect.as_slice()) {
            return Ok(());
        }
        if got.len() >= MAX_TCP_READ {
            break;
        }
        let n = conn.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    Err(Failure::Answer {
        reason: format!(
            "the answer ({} bytes) does not contain the expected bytes",
            got.len()
        ),
        immediate: false,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::cluster::tests::weighted;

    #[test]
    fn grpc_health_messages() {
        // HealthCheckRequest { service: "api" }, framed.
        assert_eq!(
            &grpc_health_request("api")[..],
            &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'p', b'i']
        );
        assert_eq!(&grpc_health_request("")[..], &[0, 0, 0, 0, 0]);
        let long = "s".repeat(200);
        assert_eq!(&grpc_health_request(&long)[5..8], &[0x0a, 0xc8, 0x01]);
        // HealthCheckResponse { status: SERVING }, NOT_SERVING, empty (UNKNOWN).
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 0]), Some(0));
        // An unknown field before it is skipped.
        assert_eq!(
            grpc_serving_status(&[0, 0, 0, 0, 5, 0x12, 1, b'x', 0x08, 1]),
            Some(1)
        );
        // Compressed, cut short, trailing bytes, a truncated varint.
        assert_eq!(grpc_serving_status(&[1, 0, 0, 0, 2, 0x08, 1]), None);
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 3, 0x08, 1]), None);
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 1, 9]), None);
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 0x81]), None);
    }

    #[test]
    fn flags_keep_membership_in_step() {
        let c = weighted("round_robin", &[1, 1, 1], "");
        let members = || c.stats.membership_healthy.load(Relaxed);
        assert_eq!((members(), c.stats.membership_total.load(Relaxed)), (3, 3));
        assert!(c.set_flag(0, FAILED_ACTIVE_HC, true));
        assert!(!c.set_flag(0, FAILED_ACTIVE_HC, true), "already set");
        assert!(c.set_flag(0, EJECTED, true));
        assert_eq!(members(), 2, "two flags, one unavailable endpoint");
        assert!(c.set_flag(0, FAILED_ACTIVE_HC, false));
        assert_eq!(members(), 2, "still ejected");
        assert!(c.set_flag(0, EJECTED, false));
        assert_eq!(members(), 3);
        assert!(!c.set_flag(9, EJECTED, true), "no such endpoint");
    }

    #[test]
    fn panic_threshold() {
        let c = weighted("round_robin", &[1, 1, 1, 1], "");
        assert!(!c.in_panic(2), "50% is not below 50%");
        assert!(c.in_panic(1));
        let never = weighted("round_robin", &[1, 1], "panic_threshold: 0%\n");
        assert!(!never.in_panic(0));
    }
}

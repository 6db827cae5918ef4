//! Distributed tracing, as Envoy's Zipkin tracer (docs/config.md, `tracing`).
//!
//! This module owns all of it:
//! - **propagation** ([`begin`]): the trace context a request arrives with (W3C
//!   `traceparent`, else B3 single `b3`, else B3 multi `x-b3-*`; malformed ones
//!   are ignored and a new trace starts), the sampling decision (the incoming
//!   one, else `random_sampling`), Legate's own span id, and the headers that
//!   go upstream in place of the client's (`traceparent` and B3 multi, with
//!   Legate's span as the parent), sampled or not;
//! - **spans** ([`finish`]): one Zipkin v2 `SERVER` span of each sampled
//!   request, formatted as JSON on the worker when the request is over (where
//!   its access-log line is written) and handed to the [`Tracer`]'s bounded
//!   buffer, which never blocks: a full buffer drops the span and counts it;
//! - **reporting** ([`report`]): one task, on worker 0, POSTs the waiting spans
//!   as one JSON array to `collector_cluster` every `flush_interval` (sooner
//!   once [`BATCH`] wait), as a callout does (the cluster's balancer, breaker
//!   and the worker's pool). A collector that is down or answers other than
//!   2xx costs the batch (dropped, counted), never a request; the process log
//!   says so once per spell of failures.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;

use crate::config;
use crate::stats::{Counter, Stats};

/// Waiting spans past this many wake the reporter before its interval ends.
pub const BATCH: usize = 100;

/// The most spans in one POST (about 600KiB): a buffer that grew while the
/// collector was slow goes out in several, not in one huge body.
const MAX_BATCH: usize = 1000;

/// How long one batch's POST may take (connect, send, the answer).
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The most of a collector's answer read (Zipkin answers `202` without a body).
const MAX_ANSWER: usize = 64 * 1024;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// A trace id, with the width it arrived in: B3 allows 64-bit ids, which are
/// reported and passed on in B3 as they came (a Zipkin UI finds the trace by
/// it), and left-padded with zeros in `traceparent` (W3C's 128 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId {
    pub id: u128,
    pub wide: bool,
}

impl TraceId {
    fn hex(self) -> String {
        if self.wide {
            format!("{:032x}", self.id)
        } else {
            format!("{:016x}", self.id)
        }
    }
}

/// The trace context a request arrived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Incoming {
    /// The trace and the client's span in it, if the request carried both.
    pub ids: Option<(TraceId, u64)>,
    /// The client's sampling decision, if it made one.
    pub sampled: Option<bool>,
    /// The ids came from a valid `traceparent`: its `tracestate` goes on with it.
    pub w3c: bool,
    /// B3 debug (`b3: …-d`, `x-b3-flags: 1`): sampled, passed on as
    /// `x-b3-flags: 1`, and the span marked `debug` so the collector keeps it.
    pub debug: bool,
}

/// Reads the incoming trace context: `traceparent` first, then `b3`, then the
/// `x-b3-*` fields, the first one that parses. A malformed header is ignored
/// (as if absent), so a broken client starts a new trace rather than failing.
pub fn incoming(h: &HeaderMap) -> Incoming {
    if let Some(c) = h.get(&TRACEPARENT).and_then(|v| traceparent(v.as_bytes())) {
        return c;
    }
    if let Some(c) = h.get(&B3).and_then(|v| b3_single(v.as_bytes())) {
        return c;
    }
    b3_multi(h)
}

/// A W3C `traceparent` (Trace Context level 1, §3.2): `00-` 32 hex trace id
/// `-` 16 hex parent id `-` 2 hex flags, lowercase, neither id all zeros;
/// version `ff` is invalid, and a later version may append `-` and more.
pub fn traceparent(v: &[u8]) -> Option<Incoming> {
    let s = std::str::from_utf8(v).ok()?.trim_matches([' ', '\t']);
    let mut parts = s.splitn(5, '-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    if version.len() != 2 || version == "ff" || (version == "00" && rest.is_some()) {
        return None;
    }
    let _ = hex_u128(version)?;
    let trace = hex_exact(trace, 32)?;
    let parent = hex_exact(parent, 16)?;
    let flags = hex_exact(flags, 2)?;
    let (trace, parent) = (trace, u64::try_from(parent).ok()?);
    if trace == 0 || parent == 0 {
        return None;
    }
    Some(Incoming {
        ids: Some((
            TraceId {
                id: trace,
                wide: true,
            },
            parent,
        )),
        sampled: Some(flags & 1 == 1),
        w3c: true,
        debug: false,
    })
}

/// B3 single (`b3`): `{traceid}-{spanid}[-{sampling}[-{parentspanid}]]`, or
/// a sampling decision alone (`0`, `1`, `d` for debug, which samples).
pub fn b3_single(v: &[u8]) -> Option<Incoming> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let parts: Vec<&str> = s.split('-').collect();
    match parts[..] {
        [decision] => Some(Incoming {
            ids: None,
            sampled: Some(b3_decision(decision)?),
            w3c: false,
            debug: decision == "d",
        }),
        [trace, span, ref more @ ..] if more.len() <= 2 => {
            let sampled = match more.first() {
                Some(d) => Some(b3_decision(d)?),
                None => None,
            };
            if let Some(parent) = more.get(1) {
                // Not used (Legate's span's parent is the client's span), but
                // a malformed one makes the header malformed.
                hex_exact(parent, 16)?;
            }
            Some(Incoming {
                ids: Some((b3_trace_id(trace)?, b3_span_id(span)?)),
                sampled,
                w3c: false,
                debug: more.first() == Some(&"d"),
            })
        }
        _ => None,
    }
}

/// B3 multi (`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, `x-b3-flags`):
/// both ids or neither (a malformed id, or one alone, drops the ids), and a
/// decision with or without them. `x-b3-flags: 1` (debug) samples.
pub fn b3_multi(h: &HeaderMap) -> Incoming {
    let text = |n: &HeaderName| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let ids = match (text(&B3_TRACE_ID), text(&B3_SPAN_ID)) {
        (Some(t), Some(s)) => b3_trace_id(t).zip(b3_span_id(s)),
        _ => None,
    };
    let debug = text(&B3_FLAGS) == Some("1");
    let sampled = if debug {
        Some(true)
    } else {
        // Envoy and older Zipkin clients write `true` and `false`.
        match text(&B3_SAMPLED) {
            Some("1" | "true") => Some(true),
            Some("0" | "false") => Some(false),
            _ => None,
        }
    };
    Incoming {
        ids,
        sampled,
        w3c: false,
        debug,
    }
}

fn b3_decision(d: &str) -> Option<bool> {
    match d {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

fn b3_trace_id(s: &str) -> Option<TraceId> {
    let wide = s.len() == 32;
    let id = if wide {
        hex_exact(s, 32)?
    } else {
        hex_exact(s, 16)?
    };
    (id != 0).then_some(TraceId { id, wide })
}

fn b3_span_id(s: &str) -> Option<u64> {
    let id = u64::try_from(hex_exact(s, 16)?).ok()?;
    (id != 0).then_some(id)
}

/// `s` as exactly `len` lowercase hex digits (both W3C and B3 require them).
fn hex_exact(s: &str, len: usize) -> Option<u128> {
    (s.len() == len).then_some(())?;
    hex_u128(s)
}

fn hex_u128(s: &str) -> Option<u128> {
    if s.is_empty() || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

/// A fresh non-zero id (zero means "no id" in both formats).
fn new_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

/// The span of a sampled request, from its start to [`finish`].
#[derive(Debug)]
pub struct Active {
    pub trace: TraceId,
    /// Legate's span.
    pub span: u64,
    /// The client's span, if the request continued a trace.
    pub parent: Option<u64>,
    /// `scheme://authority`, for `http.url`.
    pub origin: String,
    pub service_name: String,
    /// B3 debug: the span says `"debug": true`.
    pub debug: bool,
}

/// The trace context of a request on its way upstream: reads the client's
/// ([`incoming`]), decides sampling, and writes Legate's in its place (the
/// client's `traceparent`, `b3` and `x-b3-*` go; `tracestate` stays only with
/// the valid `traceparent` it belongs to). The span to finish if sampled.
pub fn begin(
    h: &mut HeaderMap,
    cfg: Option<&config::Tracing>,
    tracer: &Tracer,
    https: bool,
    authority: &str,
) -> Option<Box<Active>> {
    let cfg = cfg?;
    let inc = incoming(h);
    let sampled = inc.sampled.unwrap_or_else(|| cfg.random_sampling.draw());
    let (trace, parent) = match inc.ids {
        Some((t, s)) => (t, Some(s)),
        None => (
            TraceId {
                id: (u128::from(new_id()) << 64) | u128::from(new_id()),
                wide: true,
            },
            None,
        ),
    };
    let span = new_id();
    for n in [
        &B3,
        &B3_TRACE_ID,
        &B3_SPAN_ID,
        &B3_PARENT,
        &B3_SAMPLED,
        &B3_FLAGS,
    ] {
        h.remove(n);
    }
    if !inc.w3c {
        h.remove(&TRACESTATE);
    }
    let flag = if sampled { "01" } else { "00" };
    let mut set = |n: HeaderName, v: String| {
        if let Ok(v) = HeaderValue::try_from(v) {
            h.insert(n, v);
        }
    };
    set(
        TRACEPARENT,
        format!("00-{:032x}-{span:016x}-{flag}", trace.id),
    );
    set(B3_TRACE_ID, trace.hex());
    set(B3_SPAN_ID, format!("{span:016x}"));
    if let Some(p) = parent {
        set(B3_PARENT, format!("{p:016x}"));
    }
    if inc.debug {
        // B3: debug implies sampled, and is sent instead of `x-b3-sampled`.
        h.insert(B3_FLAGS, HeaderValue::from_static("1"));
    } else {
        h.insert(
            B3_SAMPLED,
            HeaderValue::from_static(if sampled { "1" } else { "0" }),
        );
    }
    if !sampled {
        return None;
    }
    tracer.counters().sampled.inc();
    Some(Box::new(Active {
        trace,
        span,
        parent,
        origin: format!("{}://{authority}", if https { "https" } else { "http" }),
        service_name: cfg.service_name.clone(),
        debug: inc.debug,
    }))
}

/// What a request's span records when it is over (the access log's facts).
pub struct Facts<'a> {
    /// The route's name, if routed.
    pub route: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: String,
    pub status: u16,
    pub elapsed: Duration,
    /// Where the request arrived (the span's `localEndpoint`).
    pub local: std::net::SocketAddr,
    /// The client: its address, and its port when it is the peer.
    pub client: (std::net::IpAddr, Option<u16>),
    pub cluster: Option<&'a str>,
    pub upstream: Option<std::net::SocketAddr>,
    pub request_size: u64,
    pub response_size: u64,
    pub request_id: Option<&'a str>,
    /// The access log's `cause`.
    pub cause: Option<&'a str>,
}

/// Formats the span of a finished sampled request and hands it to `tracer`.
pub fn finish(tracer: &Tracer, span: &Active, f: &Facts<'_>) {
    tracer.push(span_json(span, f, SystemTime::now()));
}

/// The longest `http.url` tag, in bytes (Envoy's `max_path_tag_length`).
const MAX_URL_TAG: usize = 256;

/// The Zipkin v2 JSON object of a span (`now` is when it ended).
fn span_json(span: &Active, f: &Facts<'_>, now: SystemTime) -> String {
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let end = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let start = end.saturating_sub(f.elapsed);
    let mut tags = serde_json::Map::new();
    let mut tag = |k: &str, v: String| {
        tags.insert(k.to_string(), serde_json::Value::String(v));
    };
    tag("http.method", f.method.to_string());
    tag("http.url", {
        // Cut as Envoy's `max_path_tag_length` (256) cuts it: a span stays
        // small whatever the request's path and query.
        let mut url = format!("{}{}", span.origin, f.path);
        if url.len() > MAX_URL_TAG {
            let mut cut = MAX_URL_TAG;
            while !url.is_char_boundary(cut) {
                cut -= 1;
            }
            url.truncate(cut);
        }
        url
    });
    tag("http.protocol", f.protocol.clone());
    tag("http.status_code", f.status.to_string());
    if let Some(c) = f.cluster {
        tag("upstream_cluster", c.to_string());
    }
    if let Some(a) = f.upstream {
        tag("upstream_address", a.to_string());
    }
    tag("request_size", f.request_size.to_string());
    tag("response_size", f.response_size.to_string());
    if let Some(id) = f.request_id {
        tag("guid:x-request-id", id.to_string());
    }
    // Envoy's tag where its access log has a flag for the outcome; the
    // cause itself always (a filter's answer has no flag).
    let flag = f
        .cause
        .and_then(|c| crate::access_log::format::response_flag(c, false));
    if let Some(flag) = flag {
        tag("response_flags", flag.to_string());
    }
    if let Some(c) = f.cause {
        tag("legate.cause", c.to_string());
    }
    // As Envoy's: a 5xx, or no response at all (Legate logs 499 where
    // Envoy's response code is 0); a route's own answer, a CORS preflight or
    // a filter's 401 is no error of the proxy's.
    if f.status >= 500 || f.status == 499 {
        tag("error", "true".to_string());
    }
    let endpoint = |ip: std::net::IpAddr, port: Option<u16>| {
        let mut e = serde_json::Map::new();
        let key = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
        e.insert(key.into(), ip.to_string().into());
        if let Some(p) = port {
            e.insert("port".into(), p.into());
        }
        e
    };
    let mut local = endpoint(f.local.ip(), Some(f.local.port()));
    local.insert("serviceName".into(), span.service_name.clone().into());
    let mut o = serde_json::Map::new();
    o.insert("traceId".into(), span.trace.hex().into());
    o.insert("id".into(), format!("{:016x}", span.span).into());
    if let Some(p) = span.parent {
        o.insert("parentId".into(), format!("{p:016x}").into());
    }
    o.insert("name".into(), f.route.unwrap_or(f.method).into());
    o.insert("kind".into(), "SERVER".into());
    if span.debug {
        o.insert("debug".into(), true.into());
    }
    o.insert("timestamp".into(), micros(start).into());
    // Zipkin reads a duration of 0 as "unknown": a request takes at least 1µs.
    o.insert("duration".into(), micros(f.elapsed).max(1).into());
    o.insert("localEndpoint".into(), local.into());
    o.insert(
        "remoteEndpoint".into(),
        endpoint(f.client.0, f.client.1).into(),
    );
    o.insert("tags".into(), tags.into());
    serde_json::Value::Object(o).to_string()
}

/// The counters of tracing, registered when tracing is first used, so a
/// process without it shows none.
struct Counters {
    sampled: Counter,
    reported: Counter,
    dropped: Counter,
    failures: Counter,
}

/// The process's finished spans waiting for the reporter, and its counters.
pub struct Tracer {
    stats: Arc<Stats>,
    counters: OnceLock<Counters>,
    /// Each span as its JSON object.
    waiting: Mutex<Vec<String>>,
    /// Set from `max_buffered_spans` by the reporter (the config in force).
    limit: std::sync::atomic::AtomicUsize,
    /// Wakes the reporter when a batch is full.
    wake: tokio::sync::Notify,
    /// In a spell of failed reports (logged once at its start).
    failing: AtomicBool,
}

impl Tracer {
    /// A tracer counting in `stats`.
    pub fn new(stats: Arc<Stats>) -> Self {
        Tracer {
            stats,
            counters: OnceLock::new(),
            waiting: Mutex::new(Vec::new()),
            limit: config::defaults::tracing_max_buffered_spans()
                .try_into()
                .unwrap_or(usize::MAX)
                .into(),
            wake: tokio::sync::Notify::new(),
            failing: AtomicBool::new(false),
        }
    }

    fn counters(&self) -> &Counters {
        self.counters.get_or_init(|| Counters {
            sampled: self.stats.counter(
                "legate_tracing_spans_sampled_total",
                "Requests sampled for tracing (each makes one span).",
                &[],
            ),
            reported: self.stats.counter(
                "legate_tracing_spans_reported_total",
                "Spans the collector accepted (answered 2xx).",
                &[],
            ),
            dropped: self.stats.counter(
                "legate_tracing_spans_dropped_total",
                "Spans not reported: the buffer was full (max_buffered_spans), or their \
                 batch failed.",
                &[],
            ),
            failures: self.stats.counter(
                "legate_tracing_report_failures_total",
                "Span batches the collector did not accept: no answer, or not 2xx.",
                &[],
            ),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a finished span, or drops and counts it when the buffer is full.
    fn push(&self, span: String) {
        let limit = self.limit.load(Ordering::Relaxed);
        let len = {
            let mut w = self.lock();
            if w.len() >= limit {
                drop(w);
                self.counters().dropped.inc();
                return;
            }
            w.push(span);
            w.len()
        };
        if len == BATCH {
            self.wake.notify_one();
        }
    }

    /// The oldest `max` spans waiting (all of them, usually).
    fn take(&self, max: usize) -> Vec<String> {
        let mut w = self.lock();
        if w.len() <= max {
            return std::mem::take(&mut *w);
        }
        w.drain(..max).collect()
    }

    /// How many spans wait.
    fn waiting(&self) -> usize {
        self.lock().len()
    }
}

/// The reporter: runs on worker 0 for the life of the process, following the
/// config in force (a reload may add, change or remove `tracing`).
pub async fn report(worker: std::rc::Rc<crate::worker::Worker>) {
    let tracer = &worker.shared.tracer;
    let mut published = worker.shared.published.subscribe();
    loop {
        // Seen before the load: a config published from here on wakes us.
        published.borrow_and_update();
        let interval = {
            let snapshot = worker.shared.snapshot.load();
            match &snapshot.config.tracing {
                Some(t) => {
                    // Registered with the config, so the series read 0 from
                    // the start rather than appear with the first span.
                    tracer.counters();
                    let limit = usize::try_from(t.max_buffered_spans).unwrap_or(usize::MAX);
                    tracer.limit.store(limit, Ordering::Relaxed);
                    Some(t.flush_interval.get())
                }
                None => None,
            }
        };
        let Some(interval) = interval else {
            // Spans of requests that began under a config with tracing: no
            // collector to send them to now.
            let gone = tracer.take(usize::MAX).len();
            if gone > 0 {
                tracer.counters().dropped.add(gone as u64);
            }
            // A reload that adds `tracing` is followed at once; the timer
            // drops what requests of the old config still finish.
            tokio::select! {
                r = published.changed() => if r.is_err() { return },
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        // A full batch (or more, left from the last round) goes at once.
        if tracer.waiting() < BATCH {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = tracer.wake.notified() => {}
            }
        }
        let batch = tracer.take(MAX_BATCH);
        if batch.is_empty() {
            continue;
        }
        send(&worker, tracer, batch).await;
    }
}

/// How long the last flush of a stopping process may take in all.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// The last flush, when the process stops (worker 0, once its own connections
/// have drained and the reporter is stopped): what waits goes out now, within
/// [`FINAL_FLUSH`], rather than being lost with the process. What does not go
/// in time is counted as dropped. Spans of requests other workers still
/// finish after this are not sent.
pub async fn flush(worker: std::rc::Rc<crate::worker::Worker>) {
    let tracer = &worker.shared.tracer;
    if worker.shared.snapshot.load().config.tracing.is_none() {
        return;
    }
    let deadline = tokio::time::Instant::now() + FINAL_FLUSH;
    loop {
        let batch = tracer.take(MAX_BATCH);
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        if tokio::time::timeout_at(deadline, send(&worker, tracer, batch))
            .await
            .is_err()
        {
            tracer.counters().dropped.add(n);
            let rest = tracer.take(usize::MAX).len() as u64;
            tracer.counters().dropped.add(rest);
            return;
        }
    }
}

/// POSTs one batch to the collector of the config in force; counts the result.
async fn send(worker: &std::rc::Rc<crate::worker::Worker>, tracer: &Tracer, batch: Vec<String>) {
    let snapshot = worker.shared.snapshot.load_full();
    let Some(cfg) = snapshot.config.tracing.as_ref() else {
        tracer.counters().dropped.add(batch.len() as u64);
        return;
    };
    let n = batch.len() as u64;
    let mut body = String::with_capacity(batch.iter().map(|s| s.len() + 1).sum::<usize>() + 1);
    body.push('[');
    for (i, span) in batch.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(span);
    }
    body.push(']');
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let req = crate::filter::CalloutRequest {
        id: 0,
        cluster: cfg.collector_cluster.value.to_string(),
        method: Method::POST,
        path: cfg.collector_path.clone(),
        authority: None,
        headers,
        body: Bytes::from(body),
        timeout: REPORT_TIMEOUT,
        max_response_body: MAX_ANSWER,
    };
    let cluster = req.cluster.clone();
    let sender = crate::proxy::callout_sender(worker, &snapshot);
    drop(snapshot);
    let failure = match sender.send(req).await {
        Ok(r) if r.status.is_success() => None,
        Ok(r) => Some(format!("answered {}", r.status.as_u16())),
        Err(crate::filter::CalloutError::Timeout) => {
            Some(format!("no answer in {REPORT_TIMEOUT:?}"))
        }
        Err(crate::filter::CalloutError::Unavailable) => {
            Some("no endpoint, or it refused or reset the connection".to_string())
        }
        Err(crate::filter::CalloutError::LimitExceeded) => {
            Some(format!("an answer over {MAX_ANSWER} bytes"))
        }
    };
    tracer.settle(n, failure, &cluster);
}

impl Tracer {
    /// Counts a batch of `n` spans sent to `cluster` (`failure`: why it was
    /// not taken), and logs the first failure of a spell and its end, not
    /// each batch: a collector down for an hour is two lines. Whether it logged.
    fn settle(&self, n: u64, failure: Option<String>, cluster: &str) -> bool {
        let c = self.counters();
        match failure {
            None => {
                c.reported.add(n);
                let ended = self.failing.swap(false, Ordering::Relaxed);
                if ended {
                    tracing::info!(cluster = %cluster, "tracing: the collector accepts spans again");
                }
                ended
            }
            Some(why) => {
                c.failures.inc();
                c.dropped.add(n);
                let began = !self.failing.swap(true, Ordering::Relaxed);
                if began {
                    tracing::warn!(
                        cluster = %cluster,
                        "tracing: the collector did not take a batch of {n} spans ({why}); \
                         batches are dropped (legate_tracing_report_failures_total) until it does"
                    );
                }
                began
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn wide(id: u128) -> TraceId {
        TraceId { id, wide: true }
    }

    #[test]
    fn a_valid_traceparent_is_read() {
        let c = traceparent(TP.as_bytes()).unwrap();
        assert_eq!(
            c.ids,
            Some((wide(0x4bf92f3577b34da6a3ce929d0e0e4736), 0x00f067aa0ba902b7))
        );
        assert_eq!(c.sampled, Some(true));
        assert!(c.w3c);
        let off = traceparent(
            &TP.as_bytes()[..53]
                .iter()
                .chain(b"00")
                .copied()
                .collect::<Vec<_>>(),
        );
        assert_eq!(off.unwrap().sampled, Some(false));
        // A later version may carry more fields.
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-more";
        assert_eq!(traceparent(v1.as_bytes()).unwrap().sampled, Some(true));
    }

    #[test]
    fn a_malformed_traceparent_is_ignored() {
        for bad in [
            "",
            "00",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902g7-01",
        ] {
            assert_eq!(traceparent(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn b3_single_forms() {
        let c = b3_single(b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")
            .unwrap();
        assert_eq!(
            c.ids,
            Some((wide(0x80f198ee56343ba864fe8b2a57d3eff7), 0xe457b5a2e4d86bd1))
        );
        assert_eq!(c.sampled, Some(true));
        assert!(!c.w3c);
        let short = b3_single(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1").unwrap();
        assert_eq!(
            short.ids,
            Some((
                TraceId {
                    id: 0x64fe8b2a57d3eff7,
                    wide: false
                },
                0xe457b5a2e4d86bd1
            ))
        );
        assert_eq!(short.sampled, None);
        assert_eq!(b3_single(b"0").unwrap().sampled, Some(false));
        assert_eq!(b3_single(b"d").unwrap().sampled, Some(true));
        for bad in [
            "",
            "2",
            "64fe8b2a57d3eff7",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd1-x",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd-1",
            "64fe8b2a57d3eff-e457b5a2e4d86bd1",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90-9",
            "0000000000000000-e457b5a2e4d86bd1",
        ] {
            assert_eq!(b3_single(bad.as_bytes()), None, "{bad}");
        }
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn b3_multi_forms() {
        let c = b3_multi(&map(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(
            c.ids,
            Some((wide(0x463ac35c9f6413ad48485a3953bb6124), 0xa2fb4a1d1a96d312))
        );
        assert_eq!(c.sampled, Some(true));
        // A decision alone is honoured; debug samples.
        assert_eq!(
            b3_multi(&map(&[("x-b3-sampled", "0")])).sampled,
            Some(false)
        );
        assert_eq!(b3_multi(&map(&[("x-b3-flags", "1")])).sampled, Some(true));
        // An id alone, or a malformed one, is no context.
        let half = b3_multi(&map(&[("x-b3-traceid", "463ac35c9f6413ad")]));
        assert_eq!(half.ids, None);
        let bad = b3_multi(&map(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d31"),
        ]));
        assert_eq!(bad.ids, None);
        assert_eq!(b3_multi(&map(&[("x-b3-sampled", "yes")])).sampled, None);
    }

    #[test]
    fn traceparent_comes_first_and_a_bad_one_falls_back_to_b3() {
        let h = map(&[
            ("traceparent", TP),
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]);
        assert!(incoming(&h).w3c);
        let h = map(&[
            ("traceparent", "garbage"),
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
        ]);
        let c = incoming(&h);
        assert!(!c.w3c);
        assert_eq!(c.sampled, Some(false));
        assert_eq!(c.ids.map(|(t, _)| t.wide), Some(false));
    }

    fn cfg(sampling: f64) -> config::Tracing {
        let c = config::parse_str(
            "t.yaml",
            &format!(
                "version: 1\nclusters:\n  - name: zipkin\n    endpoints: [{{ address: \
                 \"127.0.0.1:9411\" }}]\ntracing:\n  collector_cluster: zipkin\n  \
                 random_sampling: {sampling}\n"
            ),
            std::path::Path::new("."),
        )
        .unwrap();
        c.tracing.unwrap()
    }

    #[test]
    fn legate_writes_its_span_as_the_parent_and_replaces_the_clients_headers() {
        let tracer = Tracer::new(Stats::new());
        let mut h = map(&[
            ("traceparent", TP),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("b3", "0"),
            ("x-b3-flags", "1"),
        ]);
        let a = begin(&mut h, Some(&cfg(0.0)), &tracer, false, "a.example").unwrap();
        assert_eq!(a.parent, Some(0x00f067aa0ba902b7));
        assert_eq!(a.trace, wide(0x4bf92f3577b34da6a3ce929d0e0e4736));
        let span = format!("{:016x}", a.span);
        assert_eq!(
            h["traceparent"],
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01")
        );
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
        assert_eq!(h["x-b3-traceid"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(h["x-b3-spanid"], span.as_str());
        assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("b3") && !h.contains_key("x-b3-flags"));
    }

    #[test]
    fn a_new_trace_is_sampled_by_random_sampling() {
        let tracer = Tracer::new(Stats::new());
        let mut h = map(&[("tracestate", "orphan=1")]);
        assert!(begin(&mut h, Some(&cfg(0.0)), &tracer, false, "a").is_none());
        let tp = h["traceparent"].to_str().unwrap().to_string();
        assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
        assert_eq!(h["x-b3-sampled"], "0");
        assert!(!h.contains_key("x-b3-parentspanid"));
        // A tracestate without its traceparent belongs to no trace.
        assert!(!h.contains_key("tracestate"));
        let mut h = HeaderMap::new();
        let a = begin(&mut h, Some(&cfg(100.0)), &tracer, true, "a").unwrap();
        assert_eq!(a.parent, None);
        assert_eq!(a.origin, "https://a");
        // Without `tracing`, nothing is read or written.
        let mut h = map(&[("b3", "0")]);
        assert!(begin(&mut h, None, &tracer, false, "a").is_none());
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn a_span_is_zipkin_v2_json() {
        let a = Active {
            trace: TraceId {
                id: 0x64fe8b2a57d3eff7,
                wide: false,
            },
            span: 0xa,
            parent: Some(0xb),
            origin: "http://a.example".into(),
            service_name: "edge".into(),
            debug: false,
        };
        let f = Facts {
            route: None,
            method: "GET",
            path: "/x?y=1",
            protocol: "HTTP/1.1".into(),
            status: 503,
            elapsed: Duration::from_micros(1500),
            local: "127.0.0.1:8080".parse().unwrap(),
            client: ("::1".parse().unwrap(), None),
            cluster: Some("app"),
            upstream: None,
            request_size: 3,
            response_size: 19,
            request_id: Some("r1"),
            cause: Some("no_healthy_upstream"),
        };
        let now = UNIX_EPOCH + Duration::from_secs(10);
        let v: serde_json::Value = serde_json::from_str(&span_json(&a, &f, now)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "traceId": "64fe8b2a57d3eff7",
                "id": "000000000000000a",
                "parentId": "000000000000000b",
                "name": "GET",
                "kind": "SERVER",
                "timestamp": 10_000_000 - 1500,
                "duration": 1500,
                "localEndpoint": {"serviceName": "edge", "ipv4": "127.0.0.1", "port": 8080},
                "remoteEndpoint": {"ipv6": "::1"},
                "tags": {
                    "http.method": "GET",
                    "http.url": "http://a.example/x?y=1",
                    "http.protocol": "HTTP/1.1",
                    "http.status_code": "503",
                    "upstream_cluster": "app",
                    "request_size": "3",
                    "response_size": "19",
                    "guid:x-request-id": "r1",
                    "response_flags": "UH",
                    "legate.cause": "no_healthy_upstream",
                    "error": "true"
                }
            })
        );
    }

    #[test]
    fn a_cause_without_a_flag_is_no_error() {
        let a = Active {
            trace: TraceId { id: 1, wide: true },
            span: 2,
            parent: None,
            origin: "http://a".into(),
            service_name: "legate".into(),
            debug: false,
        };
        let f = Facts {
            route: Some("health"),
            path: "/healthz",
            status: 200,
            cause: Some("direct_response"),
            ..local_facts()
        };
        let v: serde_json::Value =
            serde_json::from_str(&span_json(&a, &f, SystemTime::now())).unwrap();
        let tags = &v["tags"];
        assert_eq!(tags["legate.cause"], "direct_response");
        assert!(tags.get("error").is_none(), "{tags}");
        assert!(tags.get("response_flags").is_none(), "{tags}");
        assert_eq!(v["name"], "health");
        assert_eq!(
            v["remoteEndpoint"],
            serde_json::json!({"ipv4": "127.0.0.1", "port": 5000})
        );
    }

    /// A quick local GET from 127.0.0.1:5000, without cluster or upstream:
    /// what the tests below vary.
    fn local_facts() -> Facts<'static> {
        Facts {
            route: None,
            method: "GET",
            path: "/",
            protocol: "HTTP/1.1".into(),
            status: 200,
            elapsed: Duration::from_micros(3),
            local: "127.0.0.1:8080".parse().unwrap(),
            client: ("127.0.0.1".parse().unwrap(), Some(5000)),
            cluster: None,
            upstream: None,
            request_size: 0,
            response_size: 2,
            request_id: None,
            cause: None,
        }
    }

    #[test]
    fn debug_is_passed_on_long_urls_are_cut_and_only_failures_are_errors() {
        let tracer = Tracer::new(Stats::new());
        let mut h = map(&[("b3", "463ac35c9f6413ad-a2fb4a1d1a96d312-d")]);
        let a = begin(&mut h, Some(&cfg(0.0)), &tracer, false, "a.example").unwrap();
        assert!(a.debug);
        assert_eq!(h.get("x-b3-flags").unwrap(), "1");
        assert!(!h.contains_key("x-b3-sampled"));
        let mut f = Facts {
            route: None,
            path: "/",
            status: 404,
            cause: Some("no_route"),
            ..local_facts()
        };
        let long = format!("/{}", "é".repeat(300));
        f.path = &long;
        let v: serde_json::Value =
            serde_json::from_str(&span_json(&a, &f, SystemTime::now())).unwrap();
        assert_eq!(v["debug"], true);
        let url = v["tags"]["http.url"].as_str().unwrap();
        assert!(
            url.len() <= 256 && url.starts_with("http://a.example/é"),
            "{url}"
        );
        // A 404 of Legate's own is no error; no response at all is.
        assert!(v["tags"].get("error").is_none(), "{v}");
        f.status = 499;
        f.cause = Some("downstream_disconnect");
        let v: serde_json::Value =
            serde_json::from_str(&span_json(&a, &f, SystemTime::now())).unwrap();
        assert_eq!(v["tags"]["error"], "true");
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        let stats = Stats::new();
        let tracer = Tracer::new(stats.clone());
        tracer.limit.store(2, Ordering::Relaxed);
        for _ in 0..3 {
            tracer.push("{}".into());
        }
        assert_eq!(tracer.take(1), ["{}"]);
        assert_eq!(tracer.waiting(), 1);
        assert_eq!(tracer.take(usize::MAX).len(), 1);
        assert_eq!(
            stats.counter_value("legate_tracing_spans_dropped_total", &[]),
            Some(1)
        );
    }

    #[test]
    fn a_spell_of_failures_is_logged_once() {
        let stats = Stats::new();
        let tracer = Tracer::new(stats.clone());
        let fail = || Some("answered 503".to_string());
        assert!(!tracer.settle(2, None, "zipkin"));
        assert!(tracer.settle(3, fail(), "zipkin"));
        assert!(!tracer.settle(4, fail(), "zipkin"));
        assert!(tracer.settle(5, None, "zipkin"));
        assert!(!tracer.settle(1, None, "zipkin"));
        let value = |n| stats.counter_value(n, &[]);
        assert_eq!(value("legate_tracing_spans_reported_total"), Some(8));
        assert_eq!(value("legate_tracing_spans_dropped_total"), Some(7));
        assert_eq!(value("legate_tracing_report_failures_total"), Some(2));
    }
}

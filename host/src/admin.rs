//! The admin listener (default 127.0.0.1:9901): readiness, Prometheus stats,
//! cluster state, the effective config, and drain.
//!
//! | path | method | answer |
//! |---|---|---|
//! | `/ready` | GET | 200 `LIVE`; 503 `INITIALIZING` while the process starts (compiling plugins: [`serve_starting`]); 503 `WARMING` (with the clusters) while a `dns` cluster waits for its first answer at start (up to its `initial_fetch_timeout`), 503 `DRAINING` once a drain started |
//! | `/stats`, `/stats/prometheus` | GET | every metric, Prometheus text format 0.0.4; `?filter=REGEX` keeps the families whose name matches, `?usedonly` the series counted at all ([`stats_query`], [`used_only`]) |
//! | `/server_info` | GET | version, state (`LIVE`, `WARMING`, `DRAINING`), start time and uptime, config file and generation, each listener's bound address, as JSON ([`server_info`]; Envoy's `/server_info` and `/listeners`) |
//! | `/clusters` | GET | clusters, endpoints, weights, health (checks, ejections) and counters as JSON (`format=json` accepted, other parameters refused: [`clusters_query`]) |
//! | `/certs` | GET | every TLS certificate in force (listeners' served chains and client CAs, clusters' client chains and CAs): path, subject, serial, SANs, validity and days left, as JSON ([`certs_json`]; Envoy's `/certs`) |
//! | `/config_dump` | GET | the effective config (defaults filled in) as JSON, secrets redacted (`config_dump`) |
//! | `/logging` | GET, POST | the log filter in force; `POST ?level=LEVEL` or `?filter=DIRECTIVES` changes it ([`logging_answer`]) |
//! | `/drain` | POST | starts a graceful drain, as SIGTERM does |
//! | `/healthcheck/fail`, `/healthcheck/ok` | POST | fails health checks on purpose (`/ready` 503 `DRAINING`, connections closed after their next response, listeners still serving), or stops failing them: Envoy's endpoints, for taking a process out of a load balancer before stopping it |
//! | `/reload` | POST | reloads the config file (as SIGHUP): 200 JSON of what changed, 400 with the error (file:line:col) and nothing changed |
//! | `/reload` | GET | the config file, generation and the last reload's outcome as JSON |
//! | `/plugins` | GET | every plugin: module, sha256, ABI, load time, instances, errors, last reload |
//! | `/plugins/NAME/reload` | POST | recompiles and reconfigures one plugin: 200 JSON, 400 error (the old version keeps serving), 404 unknown |
//! | `/`, `/help` | GET | the list of endpoints ([`INDEX`]) |
//!
//! Reloads run on a blocking thread, so the admin API keeps answering meanwhile
//! (see [`crate::reload`]).
//!
//! Web pages are kept out (`refused`): a browser on the host can send requests
//! to `127.0.0.1:9901`, and a page on a name its owner re-points at 127.0.0.1
//! (DNS rebinding) can also read the answers. So a request whose `Host` is not
//! an IP address, `localhost` or a name of `admin.allowed_hosts` (names the
//! operator controls, not a page's) is refused with 403, and so is a request other
//! than GET or HEAD that carries `Origin` or a cross-site `Sec-Fetch-Site`
//! (what browsers add, `mode: "no-cors"` included). Clients such as curl and
//! Prometheus send neither. A client has [`HEADER_READ_TIMEOUT`] to send each
//! request head (idle keep-alive connections are closed after as long), and at
//! most [`MAX_CONNECTIONS`] connections are served at once: more are closed at
//! accept.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::cluster::Cluster;
use crate::config::{Config, HeaderOps, Spanned};
use crate::server::Shared;

/// How long a client has to send a request head, and the longest an idle
/// keep-alive connection stays open (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Most admin connections served at once; more are closed at accept. Probes
/// and scrapers need a handful.
pub const MAX_CONNECTIONS: usize = 64;

/// When this process started serving its admin API (first the starting one):
/// `legate_server_start_time_seconds`.
static STARTED: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();

/// Serves the admin API until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    STARTED.get_or_init(std::time::SystemTime::now);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("admin: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move {
                    let refusal = {
                        let snapshot = shared.snapshot.load();
                        refused(&req, &snapshot.config.admin.allowed_hosts)
                    };
                    if let Some(r) = refusal {
                        return Ok::<_, Infallible>(r);
                    }
                    if let Some(r) = reload_answer(&shared, &req).await {
                        return Ok::<_, Infallible>(r);
                    }
                    Ok::<_, Infallible>(answer(&shared, &req))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The admin API while the process starts, before its config is in force
/// (the plugins compile: half a minute for a cold Python filter). Every path
/// gets 503, `/ready` with `INITIALIZING` (as Envoy's admin answers while it
/// initializes), so a probe sees a live process that is not ready instead of
/// a refused connection, which a liveness probe takes for a dead one (a
/// restart loop). Serves on `socket` (a duplicate of the admin socket: the
/// same socket) until the [`Starting`] is dropped, which returns once it no
/// longer accepts there; connections it accepted before finish on their own,
/// each with its one answer (no keep-alive).
pub fn serve_starting(
    socket: std::net::TcpListener,
    config: Arc<Config>,
) -> anyhow::Result<Starting> {
    STARTED.get_or_init(std::time::SystemTime::now);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (closed_tx, closed) = std::sync::mpsc::channel::<()>();
    on_own_runtime("legate-admin-starting", move || async move {
        let mut connections = tokio::task::JoinSet::new();
        let accepting = async {
            let listener = match socket
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(socket))
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("admin listener while starting: {e}");
                    return;
                }
            };
            let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let config = config.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    let svc = service_fn(move |req| {
                        let r = refused(&req, &config.admin.allowed_hosts)
                            .unwrap_or_else(|| starting_answer(&req));
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        };
        tokio::select! {
            () = accepting => {}
            _ = stopped => {}
        }
        // The listener (this duplicate) is closed: the socket is the
        // admin API's now. The answers under way end.
        drop(closed_tx);
        while connections.join_next().await.is_some() {}
    })
    .context("starting the admin thread")?;
    Ok(Starting {
        stop: Some(stop),
        closed,
    })
}

/// Runs the future `f` makes on a current-thread runtime of its own, on a new
/// thread named `name` (the admin API's: apart from the workers, so that it
/// answers whatever they do).
pub(crate) fn on_own_runtime<F, Fut>(
    name: &str,
    f: F,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let thread = name.to_owned();
    std::thread::Builder::new()
        .name(thread.clone())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(f()),
                Err(e) => tracing::error!("runtime of thread {thread}: {e}"),
            }
        })
}

/// The admin API of a starting process ([`serve_starting`]): dropping it stops
/// accepting there, for the admin API proper to take over the socket.
pub struct Starting {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    closed: std::sync::mpsc::Receiver<()>,
}

impl Drop for Starting {
    /// Returns once no connection is accepted there any more: one made after
    /// is the admin API proper's (a `/ready` after the start gets `LIVE`).
    fn drop(&mut self) {
        drop(self.stop.take());
        // `Err` when the sender is gone: the listener was closed.
        let _ = self.closed.recv();
    }
}

/// The answer to `req` while the process starts.
fn starting_answer<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    match (get_or_head(req), req.uri().path()) {
        (&Method::GET, "/ready") => text(StatusCode::SERVICE_UNAVAILABLE, "INITIALIZING\n"),
        _ => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "INITIALIZING: Legate is starting (loading its plugins); the admin API answers \
             once the config is in force\n",
        ),
    }
}

/// A 403 for what a web page may have sent (see the module docs): a `Host` (or
/// absolute URI) that is not an IP address, `localhost` or one of `allowed`
/// (`admin.allowed_hosts`), or a request other than GET or HEAD that carries
/// `Origin` or a cross-site `Sec-Fetch-Site`.
fn refused<B>(req: &Request<B>, allowed: &[Spanned<String>]) -> Option<Response<Full<Bytes>>> {
    let host = req.headers().get(header::HOST);
    let hosts = host
        .map(|h| h.to_str().unwrap_or(""))
        .into_iter()
        .chain(req.uri().authority().map(|a| a.as_str()));
    for h in hosts {
        if !is_allowed_authority(h, allowed) {
            return Some(text(
                StatusCode::FORBIDDEN,
                format!(
                    "the admin API answers only requests to an IP address, localhost or a name \
                     in `admin.allowed_hosts`, not {h:?} (a guard against DNS rebinding)\n"
                ),
            ));
        }
    }
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    let cross_site = req
        .headers()
        .get("sec-fetch-site")
        .is_some_and(|v| !matches!(v.as_bytes(), b"none" | b"same-origin"));
    if req.headers().contains_key(header::ORIGIN) || cross_site {
        return Some(text(
            StatusCode::FORBIDDEN,
            "the admin API refuses changes from web pages (the request has Origin or \
             Sec-Fetch-Site)\n",
        ));
    }
    None
}

/// Whether `authority` (`host[:port]`) names an IP address, `localhost` or a
/// name of `allowed` (without case; a trailing dot on either side ignored).
fn is_allowed_authority(authority: &str, allowed: &[Spanned<String>]) -> bool {
    let Ok(a) = authority.parse::<http::uri::Authority>() else {
        return false;
    };
    let host = a.host();
    let ip = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    fn bare(n: &str) -> &str {
        n.strip_suffix('.').unwrap_or(n)
    }
    host.eq_ignore_ascii_case("localhost")
        || ip.parse::<IpAddr>().is_ok()
        || allowed
            .iter()
            .any(|n| bare(&n.value).eq_ignore_ascii_case(bare(host)))
}

/// A reload, run on a blocking thread.
type ReloadWork =
    dyn FnOnce(&Arc<Shared>) -> Result<serde_json::Value, crate::reload::ReloadError> + Send;

/// The reload endpoints (they block while compiling, so off this runtime).
async fn reload_answer(
    shared: &Arc<Shared>,
    req: &Request<Incoming>,
) -> Option<Response<Full<Bytes>>> {
    use crate::reload::{self, ReloadError, Trigger};
    let path = req.uri().path();
    let plugin = path
        .strip_prefix("/plugins/")
        .and_then(|p| p.strip_suffix("/reload"))
        .filter(|p| !p.is_empty() && !p.contains('/'))
        .map(str::to_string);
    if req.method() == Method::POST
        && (path == "/reload" || plugin.is_some())
        && req.uri().query().is_some_and(|q| !q.is_empty())
    {
        // As /stats refuses what it does not take: `POST /reload?plugin=x`
        // must not reload the whole config while its caller thinks otherwise.
        return Some(text(
            StatusCode::BAD_REQUEST,
            "a reload takes no parameters: POST /reload reloads the config file (and \
             what it names), POST /plugins/NAME/reload one plugin\n",
        ));
    }
    let work: Box<ReloadWork> = match (get_or_head(req), path, plugin) {
        (&Method::POST, "/reload", _) => {
            Box::new(|s: &Arc<Shared>| reload::reload_config(s, Trigger::Admin))
        }
        (&Method::GET, "/reload", _) => return Some(json(&shared.reloader.last())),
        (_, "/reload", _) => {
            return Some(with_allow(
                text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "use POST /reload (GET shows the last one)\n",
                ),
                "GET, POST",
            ))
        }
        (&Method::GET, "/plugins", _) => return Some(json(&shared.reloader.plugins_json(shared))),
        (_, "/plugins", _) => {
            return Some(with_allow(
                text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
                "GET",
            ))
        }
        (&Method::POST, _, Some(name)) => {
            Box::new(move |s: &Arc<Shared>| reload::reload_plugin(s, &name, Trigger::Admin))
        }
        (_, _, Some(_)) => {
            return Some(with_allow(
                text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "use POST /plugins/NAME/reload\n",
                ),
                "POST",
            ))
        }
        _ => return None,
    };
    if shared.is_draining() {
        // Not the request's fault: the process is stopping (try the next one).
        return Some(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "Legate is draining; not reloading\n",
        ));
    }
    let shared = shared.clone();
    let done = tokio::task::spawn_blocking(move || work(&shared)).await;
    Some(match done {
        Ok(Ok(v)) => json(&v),
        Ok(Err(e @ ReloadError::UnknownPlugin(_))) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
        Ok(Err(e)) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reload task failed: {e}\n"),
        ),
    })
}

/// The request's method, `HEAD` answered as `GET` (a load balancer's health
/// check of `/ready` often uses it; hyper sends the head without the body).
fn get_or_head<B>(req: &Request<B>) -> &Method {
    if req.method() == Method::HEAD {
        &Method::GET
    } else {
        req.method()
    }
}

fn answer(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (get_or_head(req), path) {
        (&Method::GET, "/ready") => match state(shared) {
            State::Live => text(StatusCode::OK, "LIVE\n"),
            State::Draining => text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n"),
            State::Warming(cold) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("WARMING\n{}", cold.concat()),
            ),
        },
        (&Method::GET, "/server_info") => json(&server_info(shared)),
        (&Method::GET, "/stats" | "/stats/prometheus") => {
            let StatsQuery { filter, used } = match stats_query(req.uri().query()) {
                Ok(q) => q,
                Err(e) => return text(StatusCode::BAD_REQUEST, e),
            };
            let mut body = shared.stats.render();
            let snapshot = shared.snapshot.load();
            let mut names: Vec<_> = snapshot.clusters.keys().collect();
            names.sort();
            let current: Vec<_> = names
                .iter()
                .filter_map(|n| snapshot.clusters.get(*n))
                .map(|e| e.cluster())
                .collect();
            render_cluster_stats(current.iter().map(|c| &**c), &mut body);
            render_server_stats(
                shared.is_draining() || shared.is_health_check_failed(),
                &mut body,
            );
            render_cert_stats(&certificates_in_force(shared), &mut body);
            if let Some(re) = filter {
                body = only_families(&body, &re);
            }
            if used {
                body = used_only(&body);
            }
            with_type(
                text(StatusCode::OK, body),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        (&Method::GET, "/clusters") => {
            if let Err(e) = clusters_query(req.uri().query()) {
                return text(StatusCode::BAD_REQUEST, e);
            }
            let snapshot = shared.snapshot.load();
            let mut names: Vec<_> = snapshot.clusters.keys().collect();
            names.sort();
            let list: Vec<serde_json::Value> = names
                .iter()
                .filter_map(|n| snapshot.clusters.get(*n))
                .map(|e| e.cluster().to_json())
                .collect();
            json(&serde_json::json!({ "clusters": list }))
        }
        (&Method::GET, "/certs") => json(&certs_json(&certificates_in_force(shared))),
        (&Method::GET, "/config_dump") => {
            let snapshot = shared.snapshot.load();
            match config_dump(&snapshot.config) {
                Ok(v) => json(&v),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot serialize config: {e}\n"),
                ),
            }
        }
        (&Method::POST, "/drain") => {
            shared.start_drain();
            text(StatusCode::OK, "draining\n")
        }
        (&Method::POST, "/healthcheck/fail" | "/healthcheck/ok")
            if req.uri().query().is_some_and(|q| !q.is_empty()) =>
        {
            text(
                StatusCode::BAD_REQUEST,
                "/healthcheck/fail and /healthcheck/ok take no parameters\n",
            )
        }
        (&Method::POST, "/healthcheck/fail") => {
            if !shared.health_check_failed.send_replace(true) {
                tracing::info!(
                    "health checks fail on purpose (POST /healthcheck/fail): /ready says \
                     DRAINING and connections close after their next response; POST \
                     /healthcheck/ok to stop"
                );
            }
            text(StatusCode::OK, "OK\n")
        }
        (&Method::POST, "/healthcheck/ok") => {
            if shared.health_check_failed.send_replace(false) {
                tracing::info!("health checks pass again (POST /healthcheck/ok)");
            }
            text(StatusCode::OK, "OK\n")
        }
        (_, "/healthcheck/fail" | "/healthcheck/ok") => with_allow(
            text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST /healthcheck/fail or POST /healthcheck/ok\n",
            ),
            "POST",
        ),
        (_, "/drain") => with_allow(
            text(StatusCode::METHOD_NOT_ALLOWED, "use POST /drain\n"),
            "POST",
        ),
        (&Method::POST, "/reopen_logs") => {
            // As Envoy's endpoint of that name (and SIGUSR1): after logrotate
            // moved the access log away.
            match shared.log_writers.reopen() {
                0 => text(StatusCode::OK, "no access log\n"),
                _ => text(StatusCode::OK, "reopening the access log\n"),
            }
        }
        (_, "/reopen_logs") => with_allow(
            text(StatusCode::METHOD_NOT_ALLOWED, "use POST /reopen_logs\n"),
            "POST",
        ),
        (_, "/logging") => logging_answer(req, LOG_FILTER.get()),
        // `/help` too: Envoy's admin lists its endpoints there.
        (&Method::GET, "/" | "/help") => text(StatusCode::OK, INDEX),
        (
            _,
            "/ready" | "/stats" | "/stats/prometheus" | "/clusters" | "/certs" | "/config_dump"
            | "/server_info" | "/" | "/help",
        ) => with_allow(text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"), "GET"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; GET / lists the admin endpoints\n",
        ),
    }
}

/// What `GET /` and `GET /help` answer: every endpoint.
const INDEX: &str = "Legate admin
  GET  /ready
  GET  /server_info
  GET  /stats[?filter=REGEX][&usedonly] (also /stats/prometheus)
  GET  /clusters
  GET  /certs
  GET  /config_dump
  GET  /logging
  POST /logging?level=LEVEL|filter=DIRECTIVES
  POST /drain
  POST /healthcheck/fail
  POST /healthcheck/ok
  POST /reopen_logs
  GET  /reload
  POST /reload
  GET  /plugins
  POST /plugins/NAME/reload
";

/// Whether the process serves: what `/ready` and `/server_info` say.
enum State {
    Live,
    /// `dns` clusters still waiting for their first answer at start: a line
    /// for each.
    Warming(Vec<String>),
    Draining,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Live => "LIVE",
            State::Warming(_) => "WARMING",
            State::Draining => "DRAINING",
        }
    }
}

fn state(shared: &Shared) -> State {
    // A health check failed on purpose says what Envoy's `/ready` says then.
    if shared.is_draining() || shared.is_health_check_failed() {
        return State::Draining;
    }
    let snapshot = shared.snapshot.load();
    let mut cold: Vec<String> = snapshot
        .warming()
        .map(|(name, left)| {
            format!(
                "cluster `{name}`: waiting for its first DNS answer ({:.1}s more at most)\n",
                left.as_secs_f64()
            )
        })
        .collect();
    if shared
        .upgrade_socket_pending
        .load(std::sync::atomic::Ordering::Acquire)
    {
        cold.push("the hot-restart upgrade socket: about to be served\n".to_string());
    }
    if cold.is_empty() {
        State::Live
    } else {
        cold.sort();
        State::Warming(cold)
    }
}

/// `GET /server_info`, as Envoy's: which version runs, in which state, since
/// when (a hot restart is a new start: its counters carry over, its uptime
/// does not), on which config, and where each listener is bound (Envoy's
/// `/listeners`; the address a port-0 listener got). What operators and
/// their scripts ask an Envoy for, which was a 404 here.
fn server_info(shared: &Shared) -> serde_json::Value {
    let started = STARTED.get().copied();
    let since_epoch = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let uptime = started
        .and_then(|t| t.elapsed().ok())
        .map_or(0, |d| d.as_secs());
    let mut listeners: Vec<serde_json::Value> = shared
        .listener_set()
        .iter()
        .map(|b| {
            serde_json::json!({
                "name": b.ctx.name.as_str(),
                "address": b.ctx.local_addr.to_string(),
            })
        })
        .collect();
    listeners.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let reload = shared.reloader.last();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "state": state(shared).name(),
        "health_check_failed": shared.is_health_check_failed(),
        "start_time": started.map(since_epoch),
        "uptime_s": uptime,
        "config": reload["config"],
        "generation": reload["generation"],
        "listeners": listeners,
    })
}

/// What `GET /stats` was asked for ([`stats_query`]).
#[derive(Debug, Default)]
struct StatsQuery {
    /// `filter=REGEX`: the families whose name matches.
    filter: Option<regex::Regex>,
    /// `usedonly`: the series counted at all ([`used_only`]).
    used: bool,
}

/// The query of `GET /stats`: `filter=REGEX` keeps the families whose name
/// the regex finds (unanchored, as Envoy's `filter`), `usedonly` the series
/// that counted anything (Envoy's), and `format=prometheus` (what `/stats`
/// is anyway) is accepted. Anything else is refused (`Err`: the 400's text)
/// rather than ignored: a scrape that asked for a filter or a format it does
/// not get would show the whole page, or another format, as if that were the
/// answer.
fn stats_query(query: Option<&str>) -> Result<StatsQuery, String> {
    let mut q = StatsQuery::default();
    for (key, value) in query_pairs(query) {
        match key {
            // A flag, as Envoy's (`?usedonly`); `usedonly=true` too.
            "usedonly" if value.is_empty() || value == "true" => q.used = true,
            "usedonly" => {
                return Err(format!(
                    "`usedonly={value}`: `usedonly` is a flag (`/stats?usedonly`)\n"
                ))
            }
            "filter" if !value.is_empty() => {
                let re = regex::Regex::new(&value)
                    .map_err(|e| format!("`filter` is not a regular expression: {e}\n"))?;
                q.filter = Some(re);
            }
            "filter" => {}
            "format" if value == "prometheus" => {}
            "format" => {
                return Err(format!(
                    "`format={value}` is not served: /stats is the Prometheus text format \
                     (`format=prometheus`); /clusters has the cluster counters as JSON\n"
                ))
            }
            _ => {
                return Err(format!(
                    "unknown /stats parameter `{key}`; /stats takes `filter=REGEX` (the \
                     metric families whose name matches), `usedonly` (the series that \
                     counted anything) and `format=prometheus`\n"
                ))
            }
        }
    }
    Ok(q)
}

/// The query of `GET /clusters`: `format=json` (what it is anyway, Envoy's
/// JSON form) is accepted; anything else is refused, as `/stats` refuses
/// what it does not do: Envoy's `/clusters` is text unless asked for JSON,
/// and a script asking for `format=text` must not parse JSON unawares.
fn clusters_query(query: Option<&str>) -> Result<(), String> {
    for (key, value) in query_pairs(query) {
        match key {
            "format" if value == "json" => {}
            "format" => {
                return Err(format!(
                    "`format={value}` is not served: /clusters is JSON (`format=json`)\n"
                ))
            }
            _ => {
                return Err(format!(
                    "unknown /clusters parameter `{key}`; /clusters takes `format=json`\n"
                ))
            }
        }
    }
    Ok(())
}

/// `?usedonly`: the series that counted anything, as Envoy's `usedonly`
/// leaves out the stats nothing wrote. Legate does not track writes, so a
/// series is used when its value is not 0 (a histogram's, when its `_count`
/// is not); a family left with no series goes whole (`# HELP`, `# TYPE`). A
/// gauge back at 0 (no connection open now) goes too: scrape without the
/// flag for a series that must always be there.
fn used_only(page: &str) -> String {
    let mut out = String::with_capacity(page.len() / 2);
    // The current family: its comment lines, whether it is a histogram, and
    // its sample lines (a histogram's grouped by series).
    let mut head = String::new();
    let mut histogram = false;
    let mut samples: Vec<&str> = Vec::new();
    let flush = |head: &mut String, histogram: bool, samples: &mut Vec<&str>, out: &mut String| {
        let kept = if histogram {
            used_histogram_lines(samples)
        } else {
            samples
                .iter()
                .copied()
                .filter(|l| sample_value(l).is_some_and(|v| v != 0.0))
                .collect()
        };
        if !kept.is_empty() {
            out.push_str(head);
            kept.iter().for_each(|l| out.push_str(l));
        }
        head.clear();
        samples.clear();
    };
    for line in page.split_inclusive('\n') {
        if line.starts_with("# HELP ") {
            flush(&mut head, histogram, &mut samples, &mut out);
            histogram = false;
        }
        if line.starts_with('#') {
            if line.starts_with("# TYPE ") {
                histogram = line.trim_end().ends_with(" histogram");
            }
            head.push_str(line);
        } else if !line.trim().is_empty() {
            samples.push(line);
        }
    }
    flush(&mut head, histogram, &mut samples, &mut out);
    out
}

/// The value of a sample line (`name{labels} value`).
fn sample_value(line: &str) -> Option<f64> {
    line.trim_end().rsplit(' ').next()?.parse().ok()
}

/// The lines of a histogram family's series whose `_count` is not 0. A
/// series is its labels but `le`.
fn used_histogram_lines<'a>(samples: &[&'a str]) -> Vec<&'a str> {
    let series = |l: &str| -> String {
        let name_end = l.find(['{', ' ']).unwrap_or(l.len());
        let inner = l[name_end..]
            .strip_prefix('{')
            .and_then(|r| r.rsplit_once('}'))
            .map_or("", |(inner, _)| inner);
        // Without its `le="..."` (a quote in a value is escaped: `\"`).
        match inner
            .match_indices("le=\"")
            .map(|(at, _)| at)
            .find(|&at| at == 0 || inner[..at].ends_with(','))
        {
            Some(at) => {
                let after = &inner[at + 4..];
                let end = after.find('"').map_or(after.len(), |e| e + 1);
                let (before, rest) = (
                    inner[..at].trim_end_matches(','),
                    after[end..].trim_start_matches(','),
                );
                let comma = if before.is_empty() || rest.is_empty() {
                    ""
                } else {
                    ","
                };
                format!("{before}{comma}{rest}")
            }
            None => inner.to_string(),
        }
    };
    let used: std::collections::HashSet<String> = samples
        .iter()
        .filter(|l| {
            let name_end = l.find(['{', ' ']).unwrap_or(l.len());
            l[..name_end].ends_with("_count") && sample_value(l).is_some_and(|v| v != 0.0)
        })
        .map(|l| series(l))
        .collect();
    samples
        .iter()
        .copied()
        .filter(|l| used.contains(&series(l)))
        .collect()
}

/// The `key=value` pairs of an admin query, values percent-decoded (a `+`
/// stays a `+`: filters are regexes).
fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = crate::router::percent_decode_with(value, false);
            (key, String::from_utf8_lossy(&value).into_owned())
        })
}

/// The families of `page` (Prometheus text, each family starting at its
/// `# HELP` line) whose name `re` finds, with their `# HELP` and `# TYPE`
/// lines.
fn only_families(page: &str, re: &regex::Regex) -> String {
    let mut out = String::with_capacity(page.len() / 4);
    let mut keep = false;
    for line in page.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("").trim_end();
            keep = re.is_match(name);
        }
        if keep {
            out.push_str(line);
        }
    }
    out
}

/// The process's log filter, changeable at run time (`/logging`): set once by
/// `legate run` ([`install_log_filter`]); absent in a process that installed
/// no reloadable filter (tests running the proxy in-process).
static LOG_FILTER: std::sync::OnceLock<LogFilter> = std::sync::OnceLock::new();

/// A handle on the reloadable log filter of the process's subscriber.
pub type LogFilter =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Lets `/logging` change the log filter through `handle` (the reload handle
/// of the subscriber's `EnvFilter`). Only the first call counts.
pub fn install_log_filter(handle: LogFilter) {
    let _ = LOG_FILTER.set(handle);
}

/// `GET /logging` (the filter in force) and `POST /logging?level=LEVEL` or
/// `?filter=DIRECTIVES` (a new one, in `LEGATE_LOG`'s syntax), as Envoy's
/// `/logging?level=`: debug logs of a running proxy without a restart.
fn logging_answer<B>(req: &Request<B>, handle: Option<&LogFilter>) -> Response<Full<Bytes>> {
    let Some(handle) = handle else {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "this process's log filter cannot be changed (only `legate run` installs one \
             that can)\n",
        );
    };
    let current = |h: &LogFilter| h.with_current(|f| f.to_string()).unwrap_or_default();
    if get_or_head(req) == Method::GET {
        return text(StatusCode::OK, format!("{}\n", current(handle)));
    }
    if req.method() != Method::POST {
        return with_allow(
            text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST /logging?level=LEVEL (GET shows the filter in force)\n",
            ),
            "GET, POST",
        );
    }
    let mut wanted = None;
    for (key, value) in query_pairs(req.uri().query()) {
        match key {
            "level" => {
                const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
                if !LEVELS.contains(&value.to_ascii_lowercase().as_str()) {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "`level={value}` is not a level: use one of {} (or \
                             `filter=DIRECTIVES` for per-module levels)\n",
                            LEVELS.join(", ")
                        ),
                    );
                }
                // As the default filter (`main.rs`): at `info` and `warn`
                // rustls would log a warning per handshake with an IP address
                // as SNI; below them its own debug lines are wanted.
                wanted = Some(match value.to_ascii_lowercase().as_str() {
                    "info" | "warn" => format!("{value},rustls=error"),
                    _ => value,
                });
            }
            "filter" => wanted = Some(value),
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown /logging parameter `{key}`; use `level=LEVEL` or \
                         `filter=DIRECTIVES` (as LEGATE_LOG)\n"
                    ),
                )
            }
        }
    }
    let Some(wanted) = wanted else {
        return text(
            StatusCode::BAD_REQUEST,
            "say what to log: POST /logging?level=debug, or \
             ?filter=info,legate_host::proxy=debug (as LEGATE_LOG)\n",
        );
    };
    let filter = match tracing_subscriber::EnvFilter::builder().parse(&wanted) {
        Ok(f) => f,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("`{wanted}` is not a log filter: {e}\n"),
            )
        }
    };
    let was = current(handle);
    if let Err(e) = handle.reload(filter) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the log filter was not changed: {e}\n"),
        );
    }
    let now = current(handle);
    tracing::warn!("admin: log filter changed from `{was}` to `{now}`");
    text(StatusCode::OK, format!("{now}\n"))
}

/// The config as `GET /config_dump` shows it. Secrets are left out, as Envoy
/// redacts the sensitive fields of its config dump: the Redis URL's user and
/// password always; plugin configs (which hold JWT keys, API credentials) and
/// the values of header operations (an `authorization` a route adds) unless
/// `admin.config_dump_secrets`. A redacted config shows its sha256, so two
/// processes' configs can be compared.
fn config_dump(config: &Config) -> serde_json::Result<serde_json::Value> {
    let mut v = if config.admin.config_dump_secrets {
        serde_json::to_value(config)?
    } else {
        let mut shown = config.clone();
        redact_secrets(&mut shown);
        serde_json::to_value(&shown)?
    };
    if let Some(url) = v.pointer_mut("/kv/url") {
        if let Some(s) = url.as_str() {
            *url = crate::wasm::kv::redact_url(s).into();
        }
    }
    Ok(v)
}

/// Replaces every plugin config (a plugin's, a proxy-wasm module's, a route's
/// override) by a marker with its sha256, and every header operation's value by
/// a marker.
fn redact_secrets(config: &mut Config) {
    for p in &mut config.plugins {
        let p = &mut p.value;
        redact_config(&mut p.config);
        if let Some(pw) = &mut p.proxy_wasm {
            redact_config(&mut pw.vm_config);
            redact_config(&mut pw.plugin_config);
        }
    }
    for table in &mut config.routes {
        for vh in &mut table.value.virtual_hosts {
            let vh = &mut vh.value;
            redact_headers(&mut vh.request_headers);
            redact_headers(&mut vh.response_headers);
            for r in &mut vh.routes {
                let r = &mut r.value;
                redact_headers(&mut r.request_headers);
                redact_headers(&mut r.response_headers);
                for f in r.filters.values_mut() {
                    redact_config(&mut f.config);
                }
            }
        }
    }
}

fn redact_config(config: &mut Option<serde_json::Value>) {
    if let Some(v) = config {
        let hash = crate::reload::sha256_hex(v.to_string().as_bytes());
        *v = format!("[redacted] sha256:{hash}").into();
    }
}

fn redact_headers(ops: &mut HeaderOps) {
    for value in ops.add.value.values_mut().chain(ops.set.value.values_mut()) {
        *value = "[redacted]".to_string();
    }
}

/// One endpoint address's counters, by name.
type EndpointSeries = (SocketAddr, Vec<(&'static str, u64)>);

/// Cluster and endpoint counters in Prometheus format: `legate_cluster_<counter>`
/// labelled by cluster, `legate_endpoint_<counter>` by cluster and endpoint. Names
/// ending in `_active` (and `membership_*`) are gauges.
fn render_cluster_stats<'a>(clusters: impl Iterator<Item = &'a Cluster> + Clone, out: &mut String) {
    use std::fmt::Write as _;
    let kind = |name: &str| {
        if crate::cluster::is_gauge(name) {
            "gauge"
        } else {
            "counter"
        }
    };
    let Some(first) = clusters.clone().next() else {
        return;
    };
    for (i, (name, _)) in first.stats.snapshot().into_iter().enumerate() {
        let help = crate::cluster::ClusterStats::help(name);
        let _ = writeln!(out, "# HELP legate_cluster_{name} {help}");
        let _ = writeln!(out, "# TYPE legate_cluster_{name} {}", kind(name));
        for c in clusters.clone() {
            if let Some((_, v)) = c.stats.snapshot().get(i) {
                let _ = writeln!(out, "legate_cluster_{name}{{cluster=\"{}\"}} {v}", c.name);
            }
        }
    }
    let breakers: Vec<(&str, [u64; 8])> = clusters
        .clone()
        .map(|c| (c.name.as_str(), c.breaker_gauges()))
        .collect();
    for (i, (name, help)) in crate::cluster::breaker::BREAKER_GAUGES.iter().enumerate() {
        let _ = writeln!(out, "# HELP legate_cluster_circuit_breakers_{name} {help}");
        let _ = writeln!(out, "# TYPE legate_cluster_circuit_breakers_{name} gauge");
        for (cluster, values) in &breakers {
            let _ = writeln!(
                out,
                "legate_cluster_circuit_breakers_{name}{{cluster=\"{cluster}\"}} {}",
                values[i]
            );
        }
    }
    // One series per cluster and address: endpoints listed twice, or two host
    // names resolving to one address, are summed (Prometheus rejects a scrape
    // with duplicate series).
    let merged: Vec<(&str, Vec<EndpointSeries>)> = clusters
        .map(|c| {
            let mut eps: Vec<EndpointSeries> = Vec::new();
            for e in &c.endpoints {
                let snap = e.stats.snapshot();
                match eps.iter_mut().find(|(a, _)| *a == e.address) {
                    Some((_, sum)) => {
                        for ((_, total), (_, v)) in sum.iter_mut().zip(snap) {
                            *total = total.saturating_add(v);
                        }
                    }
                    None => eps.push((e.address, snap)),
                }
            }
            (c.name.as_str(), eps)
        })
        .collect();
    let Some((_, first)) = merged.iter().flat_map(|(_, eps)| eps).next() else {
        return;
    };
    for (i, (name, _)) in first.iter().enumerate() {
        let help = crate::cluster::EndpointStats::help(name);
        let _ = writeln!(out, "# HELP legate_endpoint_{name} {help}");
        let _ = writeln!(out, "# TYPE legate_endpoint_{name} {}", kind(name));
        for (cluster, eps) in &merged {
            for (address, snap) in eps {
                if let Some((_, v)) = snap.get(i) {
                    let _ = writeln!(
                        out,
                        "legate_endpoint_{name}{{cluster=\"{cluster}\",endpoint=\"{address}\"}} {v}"
                    );
                }
            }
        }
    }
}

/// Whose TLS files: `("listener", name)` or `("cluster", name)`, and what
/// they hold.
type CertOwner = (&'static str, String, Arc<[crate::tls::LoadedCerts]>);

/// The TLS certificates in force: each listener's (as it serves them now, a
/// renewal included), then each cluster's, by name. Owners without any are
/// left out.
fn certificates_in_force(shared: &Shared) -> Vec<CertOwner> {
    let mut owners: Vec<CertOwner> = shared
        .listener_set()
        .iter()
        .filter_map(|b| {
            let tls = b.ctx.tls.load_full()?;
            Some(("listener", b.ctx.name.to_string(), tls.certificates.clone()))
        })
        .collect();
    owners.sort_by(|a, b| a.1.cmp(&b.1));
    let snapshot = shared.snapshot.load();
    let mut names: Vec<_> = snapshot.clusters.keys().collect();
    names.sort();
    for name in names {
        if let Some(entry) = snapshot.clusters.get(name) {
            if let Some(certs) = entry.upstream.tls_certificates().filter(|c| !c.is_empty()) {
                owners.push(("cluster", name.to_string(), certs));
            }
        }
    }
    owners
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `GET /certs`: Envoy's layout (`certificates`, each with `cert_chain` and
/// `ca_cert` lists of certificate details), each entry naming its listener
/// or cluster. Every certificate of a file is listed (a chain's
/// intermediates expire too), each with the file's path.
fn certs_json(owners: &[CertOwner]) -> serde_json::Value {
    let now = unix_now();
    let list: Vec<serde_json::Value> = owners
        .iter()
        .map(|(kind, name, loaded)| {
            let mut entry = serde_json::json!({ *kind: name, "cert_chain": [], "ca_cert": [] });
            for l in loaded.iter() {
                if let Some(list) = entry[l.role_name()].as_array_mut() {
                    list.extend(l.certs.iter().map(|c| c.to_json(&l.path, now)));
                }
            }
            entry
        })
        .collect();
    serde_json::json!({ "certificates": list })
}

/// When each certificate in force expires, and the days until the first
/// does (Envoy's `server.days_until_first_cert_expiring`): what an expiry
/// alert watches. Nothing without TLS.
fn render_cert_stats(owners: &[CertOwner], out: &mut String) {
    use std::fmt::Write as _;
    let series: Vec<_> = owners
        .iter()
        .flat_map(|(kind, name, loaded)| {
            loaded
                .iter()
                .flat_map(move |l| l.certs.iter().map(move |c| (*kind, name, l, c)))
        })
        .collect();
    let Some(first) = series.iter().map(|(.., c)| c.not_after).min() else {
        return;
    };
    out.push_str(
        "# HELP legate_tls_certificate_expiration_timestamp_seconds When each certificate in \
         force expires (notAfter), in seconds since the Unix epoch: each certificate of each TLS \
         file a listener serves or trusts, or a cluster presents or trusts.\n\
         # TYPE legate_tls_certificate_expiration_timestamp_seconds gauge\n",
    );
    for (kind, name, l, c) in &series {
        let _ = writeln!(
            out,
            "legate_tls_certificate_expiration_timestamp_seconds{{{kind}=\"{name}\",role=\"{}\",\
             path=\"{}\",serial_number=\"{}\"}} {}",
            l.role_name(),
            label_value(&l.path.display().to_string()),
            c.serial_number,
            c.not_after
        );
    }
    let days = crate::tls::CertDetails::days_between(unix_now(), first);
    let _ = write!(
        out,
        "# HELP legate_server_days_until_first_cert_expiring Whole days until the first \
         certificate in force expires, 0 once one has (Envoy's \
         server.days_until_first_cert_expiring).\n\
         # TYPE legate_server_days_until_first_cert_expiring gauge\n\
         legate_server_days_until_first_cert_expiring {days}\n"
    );
}

/// A Prometheus label value: `\`, `"` and newlines escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The process's own series, as Envoy's `server.version`, `server.live` and
/// uptime: which version runs, whether it serves or drains (or fails its
/// health checks on purpose, which Envoy counts as not live too), and when it
/// started (a new value is a restart, a hot restart included, whose counters
/// carry over and so show none).
fn render_server_stats(not_live: bool, out: &mut String) {
    use std::fmt::Write as _;
    let started = STARTED
        .get()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    let _ = write!(
        out,
        "# HELP legate_build_info The version of this Legate (the value is 1).\n\
         # TYPE legate_build_info gauge\n\
         legate_build_info{{version=\"{}\"}} 1\n\
         # HELP legate_server_live 1 while the process serves, 0 once it drains or while POST /healthcheck/fail is in force (Envoy's server.live).\n\
         # TYPE legate_server_live gauge\n\
         legate_server_live {}\n\
         # HELP legate_server_start_time_seconds When this process started, in seconds since the Unix epoch.\n\
         # TYPE legate_server_start_time_seconds gauge\n\
         legate_server_start_time_seconds {started:.3}\n",
        env!("CARGO_PKG_VERSION"),
        u8::from(!not_live),
    );
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    with_type(r, "text/plain; charset=utf-8")
}

fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    with_type(text(StatusCode::OK, body), "application/json")
}

fn with_type(mut r: Response<Full<Bytes>>, ct: &'static str) -> Response<Full<Bytes>> {
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    r
}

fn with_allow(mut r: Response<Full<Bytes>>, allow: &'static str) -> Response<Full<Bytes>> {
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP legate_a_total A.\n# TYPE legate_a_total counter\n\
                        legate_a_total{x=\"# HELP y\"} 1\n\
                        # HELP legate_cluster_upstream_rq_total B.\n\
                        # TYPE legate_cluster_upstream_rq_total counter\n\
                        legate_cluster_upstream_rq_total{cluster=\"c\"} 2\n";

    #[test]
    fn stats_filter_keeps_whole_families_by_name() {
        let re = stats_query(Some("filter=cluster_upstream_rq%5Ftotal"))
            .unwrap()
            .filter
            .unwrap();
        assert_eq!(
            only_families(PAGE, &re),
            "# HELP legate_cluster_upstream_rq_total B.\n\
             # TYPE legate_cluster_upstream_rq_total counter\n\
             legate_cluster_upstream_rq_total{cluster=\"c\"} 2\n"
        );
        // Unanchored, `+` kept as a regex operator; no match: nothing.
        let re = stats_query(Some("filter=^legate_a+_total$"))
            .unwrap()
            .filter
            .unwrap();
        assert!(only_families(PAGE, &re).starts_with("# HELP legate_a_total"));
        let re = stats_query(Some("filter=nothing")).unwrap().filter.unwrap();
        assert_eq!(only_families(PAGE, &re), "");
    }

    #[test]
    fn clusters_query_takes_json_only() {
        assert!(clusters_query(None).is_ok());
        assert!(clusters_query(Some("format=json")).is_ok());
        let e = clusters_query(Some("format=text")).unwrap_err();
        assert!(e.contains("`format=text` is not served"), "{e}");
        let e = clusters_query(Some("usedonly")).unwrap_err();
        assert!(e.contains("unknown /clusters parameter `usedonly`"), "{e}");
    }

    /// `usedonly` keeps the series that counted, a histogram's whole when
    /// its `_count` is not 0, and drops the families left empty.
    #[test]
    fn used_only_keeps_the_series_that_counted() {
        let page = "# HELP legate_a_total A.\n\
                    # TYPE legate_a_total counter\n\
                    legate_a_total{x=\"1\"} 0\n\
                    legate_a_total{x=\"2\"} 3\n\
                    # HELP legate_b_total B.\n\
                    # TYPE legate_b_total counter\n\
                    legate_b_total 0\n\
                    # HELP legate_h_seconds H.\n\
                    # TYPE legate_h_seconds histogram\n\
                    legate_h_seconds_bucket{r=\"a\",le=\"0.1\"} 0\n\
                    legate_h_seconds_bucket{r=\"a\",le=\"+Inf\"} 2\n\
                    legate_h_seconds_sum{r=\"a\"} 0.5\n\
                    legate_h_seconds_count{r=\"a\"} 2\n\
                    legate_h_seconds_bucket{r=\"b\",le=\"0.1\"} 0\n\
                    legate_h_seconds_bucket{r=\"b\",le=\"+Inf\"} 0\n\
                    legate_h_seconds_sum{r=\"b\"} 0\n\
                    legate_h_seconds_count{r=\"b\"} 0\n\
                    # HELP legate_g G.\n\
                    # TYPE legate_g gauge\n\
                    legate_g{path=\"/a b\"} 1.5\n";
        assert_eq!(
            used_only(page),
            "# HELP legate_a_total A.\n\
             # TYPE legate_a_total counter\n\
             legate_a_total{x=\"2\"} 3\n\
             # HELP legate_h_seconds H.\n\
             # TYPE legate_h_seconds histogram\n\
             legate_h_seconds_bucket{r=\"a\",le=\"0.1\"} 0\n\
             legate_h_seconds_bucket{r=\"a\",le=\"+Inf\"} 2\n\
             legate_h_seconds_sum{r=\"a\"} 0.5\n\
             legate_h_seconds_count{r=\"a\"} 2\n\
             # HELP legate_g G.\n\
             # TYPE legate_g gauge\n\
             legate_g{path=\"/a b\"} 1.5\n"
        );
    }

    fn body(r: Response<Full<Bytes>>) -> (u16, String) {
        use http_body_util::BodyExt as _;
        let status = r.status().as_u16();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt.block_on(r.into_body().collect()).unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn logging(method: &str, uri: &str, handle: Option<&LogFilter>) -> (u16, String) {
        let req = Request::builder().method(method).uri(uri).body(()).unwrap();
        body(logging_answer(&req, handle))
    }

    /// `/logging` shows and changes the reloadable filter; a level or filter
    /// that does not parse changes nothing and says why.
    #[test]
    fn logging_shows_and_changes_the_filter() {
        let (_layer, handle) =
            tracing_subscriber::reload::Layer::<
                tracing_subscriber::EnvFilter,
                tracing_subscriber::Registry,
            >::new(tracing_subscriber::EnvFilter::new("info,rustls=error"));
        let h = Some(&handle);
        let (status, text) = logging("GET", "/logging", h);
        assert_eq!(status, 200);
        assert!(
            text.contains("info") && text.contains("rustls=error"),
            "{text}"
        );
        assert_eq!(
            logging("POST", "/logging?level=debug", h),
            (200, "debug\n".into())
        );
        assert_eq!(logging("GET", "/logging", h), (200, "debug\n".into()));
        // Back to info: rustls's per-handshake warnings stay off.
        let (status, text) = logging("POST", "/logging?level=INFO", h);
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("rustls=error"), "{text}");
        let (_, text) = logging("POST", "/logging?level=trace", h);
        assert_eq!(text, "trace\n");
        let (status, text) = logging(
            "POST",
            "/logging?filter=warn,legate_host%3A%3Aproxy=trace",
            h,
        );
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("legate_host::proxy=trace"), "{text}");
        for (uri, says) in [
            ("/logging?level=debugg", "`level=debugg` is not a level"),
            ("/logging?filter=a=b=c", "is not a log filter"),
            ("/logging?levle=debug", "unknown /logging parameter `levle`"),
            ("/logging", "say what to log"),
        ] {
            let (status, text) = logging("POST", uri, h);
            assert_eq!(status, 400, "{uri}");
            assert!(text.contains(says), "{uri}: {text}");
        }
        assert!(logging("GET", "/logging", h)
            .1
            .contains("legate_host::proxy=trace"));
        assert_eq!(logging("PUT", "/logging", h).0, 405);
        assert_eq!(logging("GET", "/logging", None).0, 501);
    }

    #[test]
    fn stats_query_refuses_what_it_does_not_do() {
        assert!(stats_query(None).unwrap().filter.is_none());
        assert!(stats_query(Some("format=prometheus&filter="))
            .unwrap()
            .filter
            .is_none());
        assert!(stats_query(Some("usedonly")).unwrap().used);
        assert!(!stats_query(None).unwrap().used);
        for (q, says) in [
            ("format=json", "`format=json` is not served"),
            ("usedonly=no", "`usedonly` is a flag"),
            ("used", "unknown /stats parameter `used`"),
            ("filter=(", "`filter` is not a regular expression"),
        ] {
            let e = stats_query(Some(q)).unwrap_err();
            assert!(e.contains(says), "{q}: {e}");
        }
    }
}

//! The process: builds the runtime state from a validated config, binds every
//! listener, starts the workers and the admin listener, and drains on shutdown.
//!
//! Accepts are spread by sharing: each listener is bound once and every worker
//! accepts from (a duplicate of) the same socket. See ARCHITECTURE.md for why this
//! and not one `SO_REUSEPORT` socket per worker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::access_log::AccessLog;
use crate::cluster::Cluster;
use crate::config::{Config, Name};
use crate::listener::{self, ListenerCtx};
use crate::router::RouteTable;
use crate::stats::Stats;
use crate::upstream::UpstreamSettings;
use crate::worker::Worker;

/// How to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Worker threads.
    pub concurrency: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// A cluster and how to reach it.
pub struct ClusterEntry {
    /// Endpoints, balancing, counters: the current generation. Discovery swaps in a
    /// new one when the endpoint set changes; a request keeps the one it picked from.
    live: ArcSwap<Cluster>,
    /// Protocol, TLS, timeouts, pool limits.
    pub upstream: UpstreamSettings,
}

impl ClusterEntry {
    /// An entry starting with `cluster`.
    pub fn new(cluster: Arc<Cluster>, upstream: UpstreamSettings) -> ClusterEntry {
        ClusterEntry {
            live: ArcSwap::new(cluster),
            upstream,
        }
    }

    /// The cluster's current generation.
    pub fn cluster(&self) -> Arc<Cluster> {
        self.live.load_full()
    }

    /// Makes `cluster` the current generation (discovery only).
    pub(crate) fn replace(&self, cluster: Arc<Cluster>) {
        self.live.store(cluster);
    }
}

/// Everything the request path reads from config, built once per config version and
/// swapped atomically (a request keeps the snapshot it started with).
pub struct Snapshot {
    /// The config it was built from (for `/config_dump`).
    pub config: Arc<Config>,
    /// Route tables by name.
    pub route_tables: HashMap<Name, Arc<RouteTable>>,
    /// Clusters by name.
    pub clusters: HashMap<Name, Arc<ClusterEntry>>,
    /// The longest pool idle timeout of any cluster (for the sweeper).
    pub max_pool_idle: Duration,
    /// The HTTP filter chains (Wasm plugins) per listener.
    pub filters: crate::filter::Filters,
}

impl Snapshot {
    /// Builds the runtime state: compiles routes, resolves endpoints, loads TLS.
    pub fn build(config: Arc<Config>) -> anyhow::Result<Self> {
        Self::build_with(config, &Stats::new())
    }

    /// As [`Snapshot::build`], registering plugin stats in `stats`.
    pub fn build_with(config: Arc<Config>, stats: &Arc<Stats>) -> anyhow::Result<Self> {
        let mut route_tables = HashMap::new();
        for t in &config.routes {
            let table = RouteTable::new(&t.value)
                .with_context(|| format!("route table `{}`", t.value.name))?;
            route_tables.insert(t.value.name.clone(), Arc::new(table));
        }
        let mut clusters = HashMap::new();
        let mut max_pool_idle = Duration::from_secs(1);
        for c in &config.clusters {
            let c = &c.value;
            let cluster =
                Cluster::from_config(c).with_context(|| format!("cluster `{}`", c.name))?;
            let upstream =
                UpstreamSettings::new(c).with_context(|| format!("cluster `{}`", c.name))?;
            max_pool_idle = max_pool_idle.max(c.idle_timeout.get());
            clusters.insert(
                c.name.clone(),
                Arc::new(ClusterEntry::new(cluster, upstream)),
            );
        }
        let filters = crate::filter::Filters::build(&config, stats, crate::wasm::load)?;
        Ok(Snapshot {
            config,
            route_tables,
            clusters,
            max_pool_idle,
            filters,
        })
    }
}

/// Process-wide state shared by workers and the admin listener.
pub struct Shared {
    /// All metrics.
    pub stats: Arc<Stats>,
    /// The config in force.
    pub snapshot: ArcSwap<Snapshot>,
    /// Flips to true when draining starts.
    pub draining: watch::Sender<bool>,
    /// The access log, if configured.
    pub access_log: Option<AccessLog>,
}

impl Shared {
    /// A receiver that resolves when draining starts.
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Starts a graceful drain (idempotent).
    pub fn start_drain(&self) {
        self.draining.send_replace(true);
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }
}

/// A running Legate.
pub struct Handle {
    shared: Arc<Shared>,
    listeners: HashMap<String, SocketAddr>,
    admin: SocketAddr,
    workers: Vec<JoinHandle<()>>,
    admin_thread: Option<JoinHandle<()>>,
    admin_stop: Arc<tokio::sync::Notify>,
    stopped: Arc<AtomicBool>,
}

/// Starts Legate: every listener is bound before this returns (so port conflicts
/// are reported here), then workers begin accepting.
pub fn start(config: Config, opts: Options) -> anyhow::Result<Handle> {
    if opts.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let config = Arc::new(config);
    let stats = Stats::new();
    let snapshot = Snapshot::build_with(config.clone(), &stats)?;
    let access_log = match &config.access_log {
        Some(a) => Some(AccessLog::open(&a.path)?),
        None => None,
    };
    let (draining, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        stats: stats.clone(),
        snapshot: ArcSwap::from_pointee(snapshot),
        draining,
        access_log,
    });

    // Active health checks and outlier-detection intervals: one thread for the
    // process, not one per worker.
    crate::cluster::health::spawn(
        shared.snapshot.load().clusters.values().cloned().collect(),
        shared.drain_signal(),
    )
    .context("starting the health-check thread")?;

    let mut bound = Vec::new();
    let mut addrs = HashMap::new();
    for l in &config.listeners {
        let l = &l.value;
        let (ctx, socket) = ListenerCtx::bind(l, &stats)
            .with_context(|| format!("listener `{}` on {}", l.name, l.address.value))?;
        addrs.insert(l.name.to_string(), ctx.local_addr);
        bound.push((Arc::new(ctx), socket));
    }

    let admin_addr: SocketAddr = config
        .admin
        .address
        .value
        .parse()
        .context("admin address")?;
    let admin_socket = std::net::TcpListener::bind(admin_addr)
        .with_context(|| format!("admin listener on {admin_addr}"))?;
    admin_socket.set_nonblocking(true)?;
    let admin = admin_socket.local_addr()?;

    let mut workers = Vec::new();
    for id in 0..opts.concurrency {
        let mut sockets = Vec::new();
        for (ctx, sock) in &bound {
            sockets.push((
                ctx.clone(),
                sock.try_clone().context("duplicating a listening socket")?,
            ));
        }
        let shared = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("legate-worker-{id}"))
            .spawn(move || run_worker(id, shared, sockets))
            .context("starting a worker thread")?;
        workers.push(t);
    }
    // The original sockets stay open in the workers' duplicates only.
    drop(bound);

    let admin_stop = Arc::new(tokio::sync::Notify::new());
    let admin_thread = {
        let shared = shared.clone();
        let stop = admin_stop.clone();
        std::thread::Builder::new()
            .name("legate-admin".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("admin runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(admin_socket) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("admin listener: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        () = crate::admin::serve(listener, shared) => {}
                        () = stop.notified() => {}
                    }
                });
            })
            .context("starting the admin thread")?
    };

    tracing::info!(
        workers = opts.concurrency,
        admin = %admin,
        "legate started; listeners: {}",
        addrs.iter().map(|(n, a)| format!("{n}={a}")).collect::<Vec<_>>().join(", ")
    );
    Ok(Handle {
        shared,
        listeners: addrs,
        admin,
        workers,
        admin_thread: Some(admin_thread),
        admin_stop,
        stopped: Arc::new(AtomicBool::new(false)),
    })
}

fn run_worker(
    id: usize,
    shared: Arc<Shared>,
    sockets: Vec<(Arc<ListenerCtx>, std::net::TcpListener)>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("worker {id}: cannot build its runtime: {e}");
            shared.start_drain();
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let worker = Worker::new(id, shared.clone());
        let tracker = listener::ConnTracker::default();
        for (ctx, sock) in sockets {
            match tokio::net::TcpListener::from_std(sock) {
                Ok(l) => {
                    tokio::task::spawn_local(listener::accept_loop(
                        worker.clone(),
                        ctx,
                        l,
                        tracker.clone(),
                    ));
                }
                Err(e) => tracing::error!("worker {id}: listener: {e}"),
            }
        }
        let housekeeping = tokio::task::spawn_local(worker.clone().housekeeping());
        let mut drain = shared.drain_signal();
        let _ = drain.wait_for(|d| *d).await;
        let timeout = shared.snapshot.load().config.drain_timeout.get();
        // Accept loops stop on the same signal; connections finish their in-flight
        // requests and close. Whatever is left at the deadline is cut.
        if tokio::time::timeout(timeout, tracker.idle()).await.is_err() {
            tracing::warn!(
                "worker {id}: drain timeout ({timeout:?}) passed with {} connections open; closing them",
                tracker.count()
            );
        }
        housekeeping.abort();
    });
}

impl Handle {
    /// The bound address of a listener (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.get(name).copied()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The metrics registry.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// Starts a graceful drain, as SIGTERM does: listeners stop accepting, in-flight
    /// requests finish, idle connections close.
    pub fn shutdown(&self) {
        self.shared.start_drain();
    }

    /// A receiver that turns true when a drain starts (from a signal, the admin
    /// `/drain` endpoint or [`Handle::shutdown`]).
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.shared.drain_signal()
    }

    /// Blocks until every worker has drained and stopped.
    pub fn wait(mut self) -> anyhow::Result<()> {
        self.join()
    }

    fn join(&mut self) -> anyhow::Result<()> {
        let mut panicked = 0;
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                panicked += 1;
            }
        }
        self.admin_stop.notify_one();
        if let Some(a) = self.admin_thread.take() {
            let _ = a.join();
        }
        self.stopped.store(true, Ordering::Relaxed);
        if panicked > 0 {
            bail!("{panicked} worker thread(s) panicked");
        }
        Ok(())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if !self.stopped.load(Ordering::Relaxed) {
            self.shared.start_drain();
            let _ = self.join();
        }
    }
}

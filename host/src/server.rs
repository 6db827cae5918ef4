//! The process: builds the runtime state from a validated config, binds every
//! listener, starts the workers and the admin listener, and drains on shutdown.
//!
//! Accepts are spread by sharing: each listener is bound once and every worker
//! accepts from (a duplicate of) the same socket. See ARCHITECTURE.md for why this
//! and not one `SO_REUSEPORT` socket per worker.
//!
//! The listener set and the config snapshot can change while running (see
//! [`crate::reload`]): both are published through [`Shared`], and workers follow
//! the listener set ([`crate::worker::supervise_listeners`]) and start the
//! plugins of each new snapshot that tick ([`crate::worker::start_plugins`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use rustc_hash::FxHashMap;
use tokio::sync::watch;

use crate::access_log;
use crate::cluster::Cluster;
use crate::config::{Config, Name};
use crate::filter::{FilterKey, HttpFilter};
use crate::listener::{self, ListenerCtx};
use crate::router::RouteTable;
use crate::stats::Stats;
use crate::upstream::UpstreamSettings;
use crate::worker::Worker;

/// Stack of a worker thread. Plugin calls run on it (no fiber per call): a
/// guest may use up to wasmtime's `max_wasm_stack` (512 KiB) of it and traps
/// past that, so the thread needs that much beyond the request path's own
/// frames and the host calls'. 8 MiB, the main thread's usual size, leaves
/// ample room (Rust's default for spawned threads is 2 MiB); it is address
/// space, touched only as far as it is used.
const WORKER_STACK: usize = 8 << 20;

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
    /// Whether the cluster has its first endpoints ("warm", as Envoy says): always
    /// for `static` and `file`; for `dns` once a first resolution answered (or a
    /// reload gave it endpoints or gave up waiting, see [`crate::reload`]).
    warm: AtomicBool,
    /// Until when `/ready` waits for a cold cluster (`initial_fetch_timeout`).
    warm_by: Instant,
}

impl ClusterEntry {
    /// An entry starting with `cluster`.
    pub fn new(cluster: Arc<Cluster>, upstream: UpstreamSettings) -> ClusterEntry {
        let d = &cluster.config.discovery;
        ClusterEntry {
            warm: AtomicBool::new(d.kind != crate::config::DiscoveryType::Dns),
            warm_by: Instant::now() + d.initial_fetch_timeout.get(),
            live: ArcSwap::new(cluster),
            upstream,
        }
    }

    /// Marks the cluster warm: it has (or gave up waiting for) its first endpoints.
    pub(crate) fn set_warm(&self) {
        self.warm.store(true, Ordering::Relaxed);
    }

    /// How much longer `/ready` waits for this cluster's first endpoints; `None`
    /// once it is warm or its `initial_fetch_timeout` passed.
    pub fn warming(&self) -> Option<Duration> {
        if self.warm.load(Ordering::Relaxed) {
            return None;
        }
        let left = self.warm_by.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// This entry's cluster — the same generation, so its endpoints, health,
    /// ejections, balancers and counters go on — with `upstream`: its TLS
    /// files renewed at the same paths, as Envoy's SDS rotates a cluster's
    /// secret without rebuilding it. New connections use the new files (the
    /// settings' own pools); open ones finish on the old.
    pub fn renewed(&self, upstream: UpstreamSettings) -> ClusterEntry {
        ClusterEntry {
            live: ArcSwap::new(self.live.load_full()),
            upstream,
            warm: AtomicBool::new(self.warm.load(Ordering::Relaxed)),
            warm_by: self.warm_by,
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

/// Every loaded filter instance set of a config version, by plugin and override.
pub type Loaded = HashMap<FilterKey, Arc<dyn HttpFilter>>;

/// Everything the request path reads from config, built once per config version and
/// swapped atomically (a request keeps the snapshot it started with).
pub struct Snapshot {
    /// The config it was built from (for `/config_dump`).
    pub config: Arc<Config>,
    /// Route tables by name (Fx-hashed, as every map the request path reads
    /// by a config-made key: each request looks one of each up).
    pub route_tables: FxHashMap<Name, Arc<RouteTable>>,
    /// Clusters by name.
    pub clusters: FxHashMap<Name, Arc<ClusterEntry>>,
    /// The longest pool idle timeout of any cluster (for the sweeper).
    pub max_pool_idle: Duration,
    /// The HTTP filter chains (Wasm plugins) per listener.
    pub filters: crate::filter::Filters,
    /// The network (L4) filter chains per TCP listener.
    pub network: crate::network_filter::NetworkFilters,
    /// The loaded filters the chains were assembled from, so one plugin can be
    /// reloaded without loading the others again.
    pub plugins: Loaded,
    /// Each plugin's module as loaded (digest, ABI).
    pub modules: Arc<crate::wasm::Modules>,
}

thread_local! {
    /// Filters already loaded, handed to [`crate::filter::Filters::build`] through
    /// [`preloaded`]: its loader is a plain `fn`, so it cannot capture them.
    static PRELOADED: std::cell::RefCell<Option<Loaded>> = const { std::cell::RefCell::new(None) };
}

fn preloaded(_: &Config, _: &Arc<Stats>) -> anyhow::Result<Loaded> {
    PRELOADED
        .with(|p| p.borrow_mut().take())
        .ok_or_else(|| anyhow::anyhow!("internal error: no loaded filters to assemble"))
}

/// The chains of `config` from filters already loaded.
fn assemble_filters(
    config: &Config,
    stats: &Arc<Stats>,
    loaded: &Loaded,
) -> anyhow::Result<crate::filter::Filters> {
    PRELOADED.with(|p| *p.borrow_mut() = Some(loaded.clone()));
    let built = crate::filter::Filters::build(config, stats, preloaded);
    PRELOADED.with(|p| *p.borrow_mut() = None);
    built
}

impl Snapshot {
    /// Builds the runtime state: compiles routes, resolves endpoints, loads TLS.
    pub fn build(config: Arc<Config>) -> anyhow::Result<Self> {
        Self::build_with(config, &Stats::new())
    }

    /// As [`Snapshot::build`], registering plugin stats in `stats`.
    pub fn build_with(config: Arc<Config>, stats: &Arc<Stats>) -> anyhow::Result<Self> {
        Self::build_keeping(config, stats, &|_| None)
    }

    /// As [`Snapshot::build_with`], with the clusters `keep` returns an entry for
    /// taken as they are instead of built (a reload's unchanged clusters): their
    /// host names are not resolved again and their endpoint files not read again,
    /// so a name server or file that fails for a moment cannot fail a reload that
    /// does not touch them. One whose TLS files changed since its entry was
    /// built keeps its cluster with the renewed files ([`ClusterEntry::renewed`]).
    pub fn build_keeping(
        config: Arc<Config>,
        stats: &Arc<Stats>,
        keep: &dyn Fn(&crate::config::Cluster) -> Option<Arc<ClusterEntry>>,
    ) -> anyhow::Result<Self> {
        Self::build_keeping_counters(config, stats, keep, &|_| None)
    }

    /// [`Snapshot::build_keeping`], and a new or changed cluster counts into
    /// `counters(cluster)` when that gives the counters of the cluster it
    /// replaces.
    pub fn build_keeping_counters(
        config: Arc<Config>,
        stats: &Arc<Stats>,
        keep: &dyn Fn(&crate::config::Cluster) -> Option<Arc<ClusterEntry>>,
        counters: &dyn Fn(&crate::config::Cluster) -> Option<Arc<crate::cluster::ClusterStats>>,
    ) -> anyhow::Result<Self> {
        Self::build_carrying(
            config,
            stats,
            keep,
            counters,
            (Loaded::new(), crate::wasm::Modules::new()),
        )
    }

    /// [`Snapshot::build_keeping_counters`], with the plugins `carried` holds
    /// (a reload's unchanged plugins: their loaded filters, every route
    /// override of each, and their modules) taken as they are instead of
    /// loaded again: their instances, VMs and tick tasks go on, and a
    /// connection of a kept TCP listener holding them holds the live ones.
    /// The other plugins of `config` are loaded.
    pub fn build_carrying(
        config: Arc<Config>,
        stats: &Arc<Stats>,
        keep: &dyn Fn(&crate::config::Cluster) -> Option<Arc<ClusterEntry>>,
        counters: &dyn Fn(&crate::config::Cluster) -> Option<Arc<crate::cluster::ClusterStats>>,
        carried: (Loaded, crate::wasm::Modules),
    ) -> anyhow::Result<Self> {
        let (mut loaded, mut modules) = carried;
        let rest: Vec<_> = config
            .plugins
            .iter()
            .filter(|p| !modules.contains_key(p.value.name.as_str()))
            .cloned()
            .collect();
        if rest.len() == config.plugins.len() {
            if !rest.is_empty() {
                (loaded, modules) = crate::wasm::load(&config, stats)?;
            }
        } else if !rest.is_empty() {
            let mut only = (*config).clone();
            only.plugins = rest;
            let (fresh, fresh_modules) = crate::wasm::load(&only, stats)?;
            loaded.extend(fresh);
            modules.extend(fresh_modules);
        }
        Self::assemble_keeping(config, stats, (loaded, modules), keep, counters)
    }

    fn assemble_keeping(
        config: Arc<Config>,
        stats: &Arc<Stats>,
        (loaded, modules): (Loaded, crate::wasm::Modules),
        keep: &dyn Fn(&crate::config::Cluster) -> Option<Arc<ClusterEntry>>,
        counters: &dyn Fn(&crate::config::Cluster) -> Option<Arc<crate::cluster::ClusterStats>>,
    ) -> anyhow::Result<Self> {
        let mut route_tables = FxHashMap::default();
        for t in &config.routes {
            let table = RouteTable::new(&t.value)
                .with_context(|| format!("route table `{}`", t.value.name))?;
            route_tables.insert(t.value.name.clone(), Arc::new(table));
        }
        let mut clusters = FxHashMap::default();
        let mut max_pool_idle = Duration::from_secs(1);
        for spanned in &config.clusters {
            let c = &spanned.value;
            max_pool_idle = max_pool_idle.max(c.idle_timeout.get());
            if let Some(entry) = keep(c) {
                let entry = if entry.upstream.same_tls_files(c) {
                    entry
                } else {
                    let upstream = UpstreamSettings::new(c)
                        .with_context(|| format!("cluster `{}`", c.name))
                        .map_err(|e| Located::wrap(&spanned.referenced, e))?;
                    Arc::new(entry.renewed(upstream))
                };
                clusters.insert(c.name.clone(), entry);
                continue;
            }
            // Its errors name the cluster already.
            let cluster = Cluster::from_config_counting(c, counters(c).unwrap_or_default())
                .map_err(|e| Located::wrap(&spanned.referenced, e))?;
            let upstream = UpstreamSettings::new(c)
                .with_context(|| format!("cluster `{}`", c.name))
                .map_err(|e| Located::wrap(&spanned.referenced, e))?;
            clusters.insert(
                c.name.clone(),
                Arc::new(ClusterEntry::new(cluster, upstream)),
            );
        }
        let filters = assemble_filters(&config, stats, &loaded)?;
        let network = crate::network_filter::NetworkFilters::build(&config, &loaded)?;
        Ok(Snapshot {
            config,
            route_tables,
            clusters,
            max_pool_idle,
            filters,
            network,
            plugins: loaded,
            modules: Arc::new(modules),
        })
    }

    /// The clusters still warming (a `dns` cluster waiting for its first answer),
    /// each with the most time it may still wait: `GET /ready` names them, and a
    /// hot restart's new process waits for them before it accepts.
    pub fn warming(&self) -> impl Iterator<Item = (&Name, Duration)> {
        self.clusters
            .iter()
            .filter_map(|(name, e)| e.warming().map(|left| (name, left)))
    }

    /// This snapshot with other plugin instances (a plugin reload): routes and
    /// clusters are shared, the chains are assembled from `loaded`.
    pub fn with_plugins(
        &self,
        stats: &Arc<Stats>,
        loaded: Loaded,
        modules: crate::wasm::Modules,
    ) -> anyhow::Result<Self> {
        Ok(Snapshot {
            config: self.config.clone(),
            route_tables: self.route_tables.clone(),
            clusters: self.clusters.clone(),
            max_pool_idle: self.max_pool_idle,
            filters: assemble_filters(&self.config, stats, &loaded)?,
            network: crate::network_filter::NetworkFilters::build(&self.config, &loaded)?,
            plugins: loaded,
            modules: Arc::new(modules),
        })
    }
}

/// A build error of one config item (a cluster whose host names do not
/// resolve, say), with the item's place in the file: a reload renders it at
/// its `file:line:col` ([`placed`]), as it does the errors `legate check`
/// finds in the file. Displayed as the error itself.
#[derive(Debug)]
pub struct Located {
    /// Where the item (a `clusters[]` entry) starts.
    pub at: crate::config::Location,
    /// The error, which names the item.
    pub error: anyhow::Error,
}

impl Located {
    fn wrap(at: &crate::config::Location, error: anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(Located { at: *at, error })
    }
}

impl std::fmt::Display for Located {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Located {}

/// `e`, an error building `config`, at its item's `file:line:col` when it is
/// one's ([`Located`]: a cluster whose host names do not resolve, say) and
/// the config was read from a file, as the errors `legate check` finds in the
/// file are; else as it is (it names its plugin or route table).
pub(crate) fn placed(config: &Config, e: anyhow::Error) -> anyhow::Error {
    match (e.downcast_ref::<Located>(), &config.origin) {
        (Some(l), Some(origin)) => anyhow::Error::new(crate::config::error_at(
            &origin.file,
            &origin.source,
            &l.at,
            &["name"],
            format!("{:#}", l.error),
            None,
        )),
        _ => e,
    }
}

/// A listening socket and the listener serving on it. Workers accept on duplicates
/// of `socket`; the socket itself stays here so a reload can keep it for the next
/// version of the listener and a hot restart can pass it to the next process.
pub struct Bound {
    /// The listener.
    pub ctx: Arc<ListenerCtx>,
    /// Its socket.
    pub socket: std::net::TcpListener,
}

/// The listeners in force.
pub type ListenerSet = Arc<[Arc<Bound>]>;

/// Process-wide state shared by workers and the admin listener.
pub struct Shared {
    /// All metrics.
    pub stats: Arc<Stats>,
    /// The config in force.
    pub snapshot: ArcSwap<Snapshot>,
    /// Bumped after each new snapshot is published: workers follow it to
    /// start the plugins of a new config that tick
    /// ([`crate::worker::start_plugins`]).
    pub published: watch::Sender<u64>,
    /// Flips to true when draining starts.
    pub draining: watch::Sender<bool>,
    /// True while the admin API's `POST /healthcheck/fail` is in force (until
    /// `POST /healthcheck/ok`), as Envoy's: `/ready` says 503 `DRAINING` so a
    /// load balancer sends no new connections, and connections close after
    /// their next response (HTTP/2: a GOAWAY), while the listeners keep
    /// accepting and serving whoever still comes.
    pub health_check_failed: watch::Sender<bool>,
    /// The hot-restart upgrade socket is not served yet
    /// ([`ProcessOptions::serves_upgrade_socket`]); cleared by whoever serves
    /// it once it is served or failed to be.
    pub upgrade_socket_pending: std::sync::atomic::AtomicBool,
    /// The top-level access logs, if configured: what a listener without its
    /// own `access_log` writes (not reloadable).
    pub access_log: Option<Arc<access_log::Logs>>,
    /// Every access-log writer, by destination (top level's and listeners',
    /// shared by logs of one path): reopened by SIGUSR1, closed at exit.
    pub log_writers: access_log::Writers,
    /// Finished spans waiting for the collector, and the tracing counters
    /// (`crate::trace`); idle without a `tracing` section.
    pub tracer: crate::trace::Tracer,
    /// The listeners in force; every worker accepts on each (see
    /// [`crate::worker::supervise_listeners`]).
    pub listeners: watch::Sender<ListenerSet>,
    /// Config and plugin reloads: what to reload from, status and counters.
    pub reloader: crate::reload::Reloader,
    /// Held while a reload publishes its listeners and while a drain starts, so a
    /// reload never publishes a listener after the drain closed the others.
    commit: Mutex<()>,
    /// Stops the health-check thread of the current cluster set; the thread.
    health_stop: Mutex<(watch::Sender<bool>, Option<std::thread::JoinHandle<()>>)>,
    /// Turns true when a new process took over (hot restart): the admin listener
    /// stops accepting too, since the new process serves on the same socket.
    pub handed_over: watch::Sender<bool>,
    /// The listening sockets the process that took over serves on (by
    /// [`crate::hot_restart::socket_id`]), set before `handed_over` turns true;
    /// `None`: every one (a successor that predates telling which). The drain
    /// stops listening on the others.
    pub adopted: Mutex<Option<Vec<crate::hot_restart::SocketId>>>,
    /// The upgrade connection of the process that took over, for this process's
    /// final counts ([`crate::hot_restart::send_final_stats`]).
    pub successor: Mutex<Option<std::os::unix::net::UnixStream>>,
}

impl Shared {
    /// A receiver that resolves when draining starts.
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Starts a graceful drain (idempotent): every listener stops accepting, their
    /// connections close gracefully, health checks stop.
    pub fn start_drain(&self) {
        let _commit = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let handed_over = *self.handed_over.borrow();
        let adopted = self.adopted.lock().unwrap_or_else(PoisonError::into_inner);
        for b in self.listeners.borrow().iter() {
            b.ctx.close();
            // After a hot restart's handover the successor serves on the
            // sockets it adopted: those are kept. Not the others (a listener
            // its config dropped or moved, or one a reload added meanwhile).
            let successor_serves = handed_over
                && adopted.as_ref().is_none_or(|ids| {
                    crate::hot_restart::socket_id(&b.socket).is_some_and(|id| ids.contains(&id))
                });
            if !successor_serves {
                // Stop listening too (Linux: a listening socket shut down for
                // reading leaves the listening state): the kernel would go on
                // completing handshakes into a backlog nobody accepts from, and
                // clients would connect, then hang until the process exits.
                // Refused, they fail over at once, as when nginx's graceful
                // stop closes its listening sockets.
                let _ = socket2::SockRef::from(&b.socket).shutdown(std::net::Shutdown::Read);
            }
        }
        drop(adopted);
        self.draining.send_replace(true);
        self.health_stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .send_replace(true);
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Whether health checks are failed on purpose ([`Self::health_check_failed`]).
    pub fn is_health_check_failed(&self) -> bool {
        *self.health_check_failed.borrow()
    }

    /// The listeners in force.
    pub fn listener_set(&self) -> ListenerSet {
        self.listeners.borrow().clone()
    }

    /// Publishes a new snapshot and listener set together; listeners of the old
    /// set that are not in the new one are closed (they stop accepting, and their
    /// connections drain). Fails, changing nothing, once a drain has started.
    pub(crate) fn commit(
        &self,
        snapshot: Arc<Snapshot>,
        listeners: Option<ListenerSet>,
    ) -> Result<(), String> {
        let _commit = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_draining() {
            return Err("Legate is draining; nothing was changed".into());
        }
        let Some(next) = listeners else {
            self.snapshot.store(snapshot);
            self.published.send_modify(|n| *n += 1);
            return Ok(());
        };
        // Listeners going away keep the config they served with, set before
        // the new one is live: none of their requests sees the new config.
        let last = self.snapshot.load_full();
        let old = self.listeners.borrow().clone();
        let gone: Vec<_> = old
            .iter()
            .filter(|b| !next.iter().any(|n| Arc::ptr_eq(n, b)))
            .collect();
        for b in &gone {
            b.ctx.retire(last.clone());
        }
        self.snapshot.store(snapshot);
        self.published.send_modify(|n| *n += 1);
        self.listeners.send_replace(next);
        Ok(())
    }

    /// Starts health checks, outlier detection and discovery for the clusters of
    /// the current snapshot on a new thread, and stops the previous thread.
    pub(crate) fn restart_health(&self) -> anyhow::Result<()> {
        let mut stop = self
            .health_stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.is_draining() {
            return Ok(());
        }
        let (tx, rx) = watch::channel(false);
        // The new thread waits for the old one, told to stop once the new one
        // exists (if it cannot be made, the old one goes on checking).
        let thread = crate::cluster::health::spawn(
            self.snapshot.load().clusters.values().cloned().collect(),
            rx,
            stop.1.take(),
        )
        .context("starting the health-check thread")?;
        let (old, _) = std::mem::replace(&mut *stop, (tx, thread));
        old.send_replace(true);
        Ok(())
    }
}

/// What the process runs from, beyond the config: where to reload it from and
/// what the previous process handed over. Not part of [`Options`] so that a
/// caller building `Options` literally keeps compiling.
#[derive(Default)]
pub struct ProcessOptions {
    /// The config file, for reloads (`POST /reload`, SIGHUP, the file watch).
    /// Without it the config cannot be reloaded, only plugins.
    pub config_path: Option<PathBuf>,
    /// `--local-zone`, applied to every reloaded config too.
    pub local_zone: Option<String>,
    /// Poll the config file and plugin modules this often and reload on change;
    /// `None` disables the watch.
    pub watch_interval: Option<Duration>,
    /// Listening sockets inherited from the previous process (hot restart), by
    /// listener name, with their addresses; used instead of binding when the
    /// address is the same (by name, or by address for a renamed listener).
    pub inherited: HashMap<String, (String, std::net::TcpListener)>,
    /// The admin socket inherited from the previous process (hot restart); used
    /// only if it is bound where `admin.address` says, else that is bound.
    pub inherited_admin: Option<std::net::TcpListener>,
    /// The previous process's counters and histograms (hot restart): this
    /// process's start from them.
    pub inherited_stats: Option<crate::stats::Carried>,
    /// The process serves a hot-restart upgrade socket once started (`legate
    /// run`): `/ready` says `WARMING` until it does or gave up
    /// ([`Shared::upgrade_socket_pending`]), so a deploy that hot-restarts
    /// as soon as `/ready` answers finds the socket.
    pub serves_upgrade_socket: bool,
}

/// The inherited socket listener `l` serves on, taken out of `inherited`: the
/// one of the same name if its address is the same, else one on the same address
/// that no listener of that name and address claims (the listener was renamed,
/// or its name moved elsewhere), so the address is never bound a second time
/// (`EADDRINUSE` while the old process holds it).
/// Never by address alone for port 0: each `:0` is a different socket.
fn take_inherited(
    inherited: &mut HashMap<String, (String, std::net::TcpListener)>,
    config: &Config,
    l: &crate::config::Listener,
) -> Option<std::net::TcpListener> {
    let address = &l.address.value;
    let by_name = inherited
        .get(l.name.as_str())
        .is_some_and(|(a, _)| a == address);
    let name = if by_name {
        l.name.to_string()
    } else if address.ends_with(":0") {
        return None;
    } else {
        inherited
            .iter()
            .find(|(name, (a, _))| {
                a == address
                    && !config.listeners.iter().any(|n| {
                        n.value.name.as_str() == name.as_str() && &n.value.address.value == a
                    })
            })
            .map(|(name, _)| name.clone())?
    };
    inherited.remove(&name).map(|(_, socket)| socket)
}

/// Whether the inherited admin socket `s` is bound where `admin.address` says:
/// the same address, or the same IP for port 0 (any port). A hot restart adopts
/// it only then, so a changed `admin.address` (moving the admin API off a
/// public address, say) takes effect.
fn serves_admin_address(s: &std::net::TcpListener, configured: SocketAddr) -> bool {
    s.local_addr().is_ok_and(|bound| {
        bound == configured || (configured.port() == 0 && bound.ip() == configured.ip())
    })
}

/// A running Legate.
pub struct Handle {
    shared: Arc<Shared>,
    admin: SocketAddr,
    /// A duplicate of the admin socket, to pass on at a hot restart.
    admin_socket: std::net::TcpListener,
    workers: Vec<JoinHandle<()>>,
    admin_thread: Option<JoinHandle<()>>,
    admin_stop: Arc<tokio::sync::Notify>,
    stopped: Arc<AtomicBool>,
    /// The sockets of a hot restart's old process this one serves on.
    adopted: crate::hot_restart::Adopted,
}

/// What `legate check` runs: everything `legate run` builds from `config`
/// before it binds and serves — plugins loaded and configured, route tables,
/// clusters (static host names resolved, endpoint files read, TLS material
/// loaded), every listener's certificates and keys, the access log's file — so
/// a config that passes would not fail at start for its contents. Binding
/// (addresses in use, permissions for low ports) is not tried.
pub fn check(config: Arc<Config>) -> anyhow::Result<()> {
    for l in &config.listeners {
        let l = &l.value;
        ListenerCtx::load_tls(l, None).with_context(|| format!("listener `{}`", l.name))?;
    }
    let listener_logs = config
        .listeners
        .iter()
        .filter_map(|l| l.value.access_log.as_ref());
    for logs in config.access_log.iter().chain(listener_logs) {
        for log in logs.logs() {
            access_log::check(log)?;
        }
    }
    Snapshot::build(config.clone())
        .map(|_| ())
        .map_err(|e| placed(&config, e))
}

/// Starts Legate: every listener is bound before this returns (so port conflicts
/// are reported here), then workers begin accepting.
pub fn start(config: Config, opts: Options) -> anyhow::Result<Handle> {
    start_with(config, opts, ProcessOptions::default())
}

/// As [`start`], with reload sources and inherited sockets.
pub fn start_with(
    config: Config,
    opts: Options,
    process: ProcessOptions,
) -> anyhow::Result<Handle> {
    if opts.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let config = Arc::new(config);
    // Before the plugins using the KV store read them (the file watch compares).
    let kv_tls = config
        .kv
        .tls
        .as_ref()
        .map(|t| crate::tls::kv_files_digest(&t.value));
    // Before the first plugin load reserves the pool.
    crate::wasm::size_pool(&config, opts.concurrency);
    let stats = Stats::new();
    if let Some(carried) = &process.inherited_stats {
        stats.absorb(carried, None);
    }
    let admin_addr: SocketAddr = config
        .admin
        .address
        .value
        .parse()
        .context("admin address")?;
    // The admin socket is bound before the plugins compile, and answers
    // `/ready` with 503 `INITIALIZING` meanwhile (as Envoy's admin does while
    // it initializes): a liveness probe would take a refused connection for a
    // dead process. (At a hot restart the old process answers on the socket
    // it passed until this one serves.) Dropping `starting` (when the admin
    // API proper takes over, or this start fails) stops it.
    let (early_admin, starting) = match process.inherited_admin {
        Some(_) => (None, None),
        None => {
            let s = std::net::TcpListener::bind(admin_addr)
                .with_context(|| format!("admin listener on {admin_addr}"))?;
            let dup = s.try_clone().context("duplicating the admin socket")?;
            let starting = crate::admin::serve_starting(dup, config.clone())?;
            (Some(s), Some(starting))
        }
    };
    let snapshot = Snapshot::build_with(config.clone(), &stats).map_err(|e| placed(&config, e))?;
    if let Some(carried) = &process.inherited_stats {
        crate::hot_restart::absorb_clusters(&snapshot, carried, None);
    }
    let log_writers = access_log::Writers::default();
    let top_logs = config.access_log.as_ref().map_or(&[][..], |a| a.logs());
    let access_log = access_log::Logs::open(top_logs, &log_writers, &stats)?;

    let hot_restart = !process.inherited.is_empty() || process.inherited_admin.is_some();
    let mut inherited = process.inherited;
    let offered: Vec<String> = inherited.keys().cloned().collect();
    let mut bound = Vec::new();
    for l in &config.listeners {
        let l = &l.value;
        let logs = access_log::for_listener(l, access_log.as_ref(), &log_writers, &stats)?;
        let b = match take_inherited(&mut inherited, &config, l) {
            Some(socket) => {
                let ctx = ListenerCtx::adopt(l, &stats, &socket, logs).with_context(|| {
                    format!("listener `{}` on {} (inherited)", l.name, l.address.value)
                })?;
                Bound {
                    ctx: Arc::new(ctx),
                    socket,
                }
            }
            _ => {
                let (ctx, socket) = ListenerCtx::bind(l, &stats, logs).with_context(|| {
                    let own = l.address.value.parse::<SocketAddr>().ok().and_then(|want| {
                        inherited.iter().find_map(|(name, (_, s))| {
                            let at = s.local_addr().ok()?;
                            crate::config::addresses_overlap(at, want).then_some((name, at))
                        })
                    });
                    match own {
                        // `EADDRINUSE` from the process this one takes over from.
                        Some((name, at)) => format!(
                            "listener `{}` on {} (the running Legate's listener `{name}` \
                             listens on {at}, the same port with the same IP or a wildcard, \
                             and keeps it until it has drained, so a hot restart cannot bind \
                             this address; the running Legate keeps serving. Upgrade in two \
                             steps (first move the listener to another port, then to {}), or \
                             stop and start)",
                            l.name, l.address.value, l.address.value
                        ),
                        None => format!("listener `{}` on {}", l.name, l.address.value),
                    }
                })?;
                Bound {
                    ctx: Arc::new(ctx),
                    socket,
                }
            }
        };
        bound.push(Arc::new(b));
    }
    let mut adopted = crate::hot_restart::Adopted {
        listeners: offered
            .into_iter()
            .filter(|n| !inherited.contains_key(n))
            .collect(),
        admin: false,
    };
    if !inherited.is_empty() {
        let names: Vec<_> = inherited.keys().cloned().collect();
        tracing::info!(
            "inherited sockets no listener of this config took (closed here): {}",
            names.join(", ")
        );
    }

    let admin_socket = match process.inherited_admin {
        Some(s) if serves_admin_address(&s, admin_addr) => {
            adopted.admin = true;
            s
        }
        Some(old) => {
            // `admin.address` changed: the old socket is closed here (the old
            // process keeps its own until it drains) and the new address bound.
            let was = old
                .local_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string());
            drop(old);
            let s = std::net::TcpListener::bind(admin_addr).with_context(|| {
                format!(
                    "admin listener on {admin_addr} (admin.address changed from {was}; the \
                     running Legate keeps serving. A port the old process still holds, as \
                     from 0.0.0.0:9901 to 127.0.0.1:9901, cannot be bound meanwhile: change \
                     the port too, or stop and start)"
                )
            })?;
            tracing::info!("hot restart: the admin listener moves from {was} to {admin_addr}");
            s
        }
        None => match early_admin {
            Some(s) => s,
            None => std::net::TcpListener::bind(admin_addr)
                .with_context(|| format!("admin listener on {admin_addr}"))?,
        },
    };
    let admin_dup = admin_socket
        .try_clone()
        .context("duplicating the admin socket")?;
    admin_socket.set_nonblocking(true)?;
    let admin = admin_socket.local_addr()?;

    let (draining, _) = watch::channel(false);
    let (listeners, _) = watch::channel(ListenerSet::from(bound));
    let reloader = crate::reload::Reloader::new(
        process.config_path.clone(),
        // The text the config in force came from, not the file now: an edit
        // made while this process started is then reloaded by the watch.
        config.source_sha256.clone(),
        process.local_zone.clone(),
        &stats,
    );
    reloader.set_kv_tls(kv_tls);
    // The start's logs are open (a FIFO's waited for its reader); a reload's
    // must not wait.
    log_writers.serving();
    let shared = Arc::new(Shared {
        stats: stats.clone(),
        snapshot: ArcSwap::from_pointee(snapshot),
        published: watch::channel(0).0,
        draining,
        health_check_failed: watch::channel(false).0,
        upgrade_socket_pending: process.serves_upgrade_socket.into(),
        access_log,
        log_writers,
        tracer: crate::trace::Tracer::new(stats.clone()),
        listeners,
        reloader,
        commit: Mutex::new(()),
        health_stop: Mutex::new((watch::channel(false).0, None)),
        handed_over: watch::channel(false).0,
        adopted: Mutex::new(None),
        successor: Mutex::new(None),
    });
    shared.reloader.record_initial(&shared);

    // Active health checks, outlier-detection intervals and discovery: one thread
    // for the process, not one per worker; restarted when a reload changes clusters.
    shared.restart_health()?;
    if hot_restart {
        wait_warm(&shared);
    }

    let mut workers = Vec::new();
    for id in 0..opts.concurrency {
        let shared = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("legate-worker-{id}"))
            .stack_size(WORKER_STACK)
            .spawn(move || run_worker(id, shared))
            .context("starting a worker thread")?;
        workers.push(t);
    }

    // The admin API proper takes the socket over from the starting one.
    drop(starting);
    let admin_stop = Arc::new(tokio::sync::Notify::new());
    let admin_thread = {
        let shared = shared.clone();
        let stop = admin_stop.clone();
        crate::admin::on_own_runtime("legate-admin", move || async move {
            let listener = match tokio::net::TcpListener::from_std(admin_socket) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("admin listener: {e}");
                    return;
                }
            };
            let mut handed_over = shared.handed_over.subscribe();
            tokio::select! {
                () = crate::admin::serve(listener, shared) => {}
                () = stop.notified() => {}
                _ = handed_over.wait_for(|h| *h) => {}
            }
        })
        .context("starting the admin thread")?
    };

    if let Some(every) = process.watch_interval {
        crate::reload::spawn_watch(&shared, every).context("starting the config watch")?;
    }

    tracing::info!(
        workers = opts.concurrency,
        admin = %admin,
        "legate started; listeners: {}",
        shared
            .listener_set()
            .iter()
            .map(|b| format!("{}={}", b.ctx.name, b.ctx.local_addr))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Handle {
        shared,
        admin,
        admin_socket: admin_dup,
        workers,
        admin_thread: Some(admin_thread),
        admin_stop,
        stopped: Arc::new(AtomicBool::new(false)),
        adopted,
    })
}

/// Blocks until every `dns` cluster is warm (has its first answer, or its
/// `initial_fetch_timeout` passed). A hot restart's new process calls it before it
/// accepts anything: it shares its listening sockets with the old process, which
/// serves meanwhile, so a connection it took before then could only get 503 from a
/// cluster with no endpoints yet. Envoy's new process likewise initializes its
/// clusters before its listeners.
fn wait_warm(shared: &Shared) {
    let snapshot = shared.snapshot.load();
    let mut logged = false;
    while let Some(left) = snapshot.warming().map(|(_, left)| left).max() {
        if !logged {
            tracing::info!(
                "hot restart: waiting for the first DNS answers of this process's clusters \
                 ({:.1}s at most) before taking connections; the old process serves meanwhile",
                left.as_secs_f64()
            );
            logged = true;
        }
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
}

fn run_worker(id: usize, shared: Arc<Shared>) {
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
        let supervisor = tokio::task::spawn_local(crate::worker::supervise_listeners(
            worker.clone(),
            tracker.clone(),
        ));
        let housekeeping = tokio::task::spawn_local(worker.clone().housekeeping());
        let plugins = tokio::task::spawn_local(crate::worker::start_plugins(worker.clone()));
        // One reporter per process: spans of every worker go out in one batch.
        let reporter = (id == 0).then(|| tokio::task::spawn_local(crate::trace::report(worker.clone())));
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
            worker.cut.set(true);
        }
        supervisor.abort();
        housekeeping.abort();
        plugins.abort();
        if let Some(t) = reporter {
            t.abort();
            // What waits is sent once more instead of lost with the process.
            crate::trace::flush(worker.clone()).await;
        }
    });
}

impl Handle {
    /// The bound address of a listener (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared
            .listener_set()
            .iter()
            .find(|b| b.ctx.name.as_str() == name)
            .map(|b| b.ctx.local_addr)
    }

    /// Process-wide state (reloads, listeners, the snapshot in force).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// A duplicate of the admin socket (for a hot restart's handover).
    pub fn admin_socket(&self) -> std::io::Result<std::net::TcpListener> {
        self.admin_socket.try_clone()
    }

    /// The sockets handed over by a hot restart's old process that this one
    /// serves on (for [`crate::hot_restart::Inherited::finish`]).
    pub fn adopted(&self) -> &crate::hot_restart::Adopted {
        &self.adopted
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
        // Workers write the last lines as their connections end (cut ones
        // included); with them gone, the log's buffer is complete: write it out
        // before the process exits.
        self.shared.log_writers.close();
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    /// A cluster's build error (one only building finds: a host name that
    /// does not resolve) is told at the cluster's `file:line:col` by `legate
    /// check` and `legate run` too, not only by a reload.
    #[test]
    fn a_clusters_build_error_is_placed_at_the_cluster() {
        let src =
            "version: 1\nclusters:\n  - name: backend\n    endpoints: [{ address: 127.0.0.1:1 }]\n";
        let config = crate::config::parse_str("c.yaml", src, std::path::Path::new(".")).unwrap();
        let at = config.clusters[0].referenced;
        let e = Located::wrap(
            &at,
            anyhow::anyhow!("cluster `backend`: cannot resolve host"),
        );
        let there = placed(&config, e);
        assert!(there
            .downcast_ref::<crate::config::ConfigErrors>()
            .is_some());
        assert!(
            there
                .to_string()
                .starts_with("c.yaml:3:5: error: cluster `backend`: cannot resolve host\n"),
            "{there}"
        );
        // Any other error is left as it is.
        let other = placed(&config, anyhow::anyhow!("plugin `p`: no"));
        assert_eq!(format!("{other:#}"), "plugin `p`: no");
    }
}

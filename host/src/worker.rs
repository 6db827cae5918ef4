//! Workers: Envoy's threading model. Each worker is one OS thread running a
//! single-threaded tokio runtime; it accepts connections from the shared listening
//! sockets and owns them, their requests and its upstream pool for their whole life.
//! Nothing on the request path is shared across workers except read-only config
//! snapshots and atomic counters; each worker owns its Wasm instances too, and
//! starts those of plugins that tick when a config goes live ([`start_plugins`]).

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::{Balancer, Balancers, Cluster};
use crate::listener::ConnTracker;
use crate::router::RouteId;
use crate::server::{Bound, Shared};
use crate::stats::{Counter, Histogram};
use crate::upstream::Pool;

/// A hyper executor that spawns on the current worker (`spawn_local`), so request
/// futures and bodies need not be `Send`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// Per-route stats handles, cached per worker so the registry's lock is taken once
/// per route per worker, never per request.
#[derive(Clone)]
pub struct RouteStats {
    /// Requests by status class: 1xx..5xx.
    pub by_class: [Counter; 5],
    /// Whole-request latency.
    pub latency: Histogram,
}

/// What a worker owns.
pub struct Worker {
    /// Worker index, for logs.
    pub id: usize,
    /// Process-wide state.
    pub shared: Arc<Shared>,
    /// Upstream connections of this worker.
    pub pool: Pool,
    /// Per-cluster balancer state.
    balancers: Balancers,
    route_stats: RefCell<FxHashMap<Arc<RouteId>, RouteStats>>,
    /// The drain timeout passed: the connections still open are being cut by
    /// the proxy (their requests are not ended by their clients).
    pub cut: std::cell::Cell<bool>,
}

impl Worker {
    /// A worker's state.
    pub fn new(id: usize, shared: Arc<Shared>) -> Rc<Self> {
        Rc::new(Worker {
            id,
            shared,
            pool: Pool::new(),
            balancers: Balancers::default(),
            route_stats: RefCell::default(),
            cut: std::cell::Cell::new(false),
        })
    }

    /// This worker's balancer for `cluster`.
    pub fn balancer(&self, cluster: &Arc<Cluster>) -> Rc<Balancer> {
        self.balancers.get(cluster)
    }

    /// This worker's stats handles for `route`.
    pub fn route_stats(&self, route: &Arc<RouteId>) -> RouteStats {
        if let Some(s) = self.route_stats.borrow().get(route) {
            return s.clone();
        }
        let stats = &self.shared.stats;
        let id = [
            ("route_table", &*route.table),
            ("virtual_host", &*route.virtual_host),
            ("route", &*route.name),
        ];
        let labels = |class| [id[0], id[1], id[2], ("class", class)];
        let help = "Downstream requests per route, by response status class.";
        let s = RouteStats {
            by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|c| stats.counter("legate_route_requests_total", help, &labels(c))),
            latency: stats.histogram(
                "legate_route_request_duration_seconds",
                "Time from request headers to the end of the response, per route.",
                &id,
            ),
        };
        self.route_stats
            .borrow_mut()
            .insert(route.clone(), s.clone());
        s
    }

    /// Periodic housekeeping: idle upstream connections past their timeout. Every
    /// second, so that an HTTP/2 connection closes soon after its idle timeout
    /// (sweeping a worker's pool is a walk over its few entries).
    pub async fn housekeeping(self: Rc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let max_age = self.shared.snapshot.load().max_pool_idle;
            self.pool.sweep(max_age);
        }
    }
}

/// Follows the published config snapshots: each one that goes live (the first
/// at start, in a hot restart's new process too, then each reload's) has every
/// loaded filter told it is live on this worker, so a plugin that ticks gets its
/// instance here now and ticks without traffic, as Envoy starts each worker's
/// VM with the config. A plugin without ticks waits for its first exchange.
/// A failed start is the filter's (logged, retried by the next exchange). The
/// worker's sender for plugin-level callouts is set first, so ticks can call
/// out before any exchange.
pub async fn start_plugins(worker: Rc<Worker>) {
    let mut rx = worker.shared.published.subscribe();
    loop {
        // Seen before the load: a snapshot published from here on wakes us.
        rx.borrow_and_update();
        let snapshot = worker.shared.snapshot.load_full();
        // Plugin-level callouts (from `on-tick`) need the worker's sender,
        // which exchanges set too: a plugin started here may tick before any.
        crate::filter::set_worker_callouts(crate::proxy::callout_sender(&worker, &snapshot));
        for f in snapshot.plugins.values() {
            f.start_on_worker(worker.id);
        }
        // Not held while waiting: a reload's old config must be free to go.
        drop(snapshot);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Follows the process's listener set: starts an accept loop on a duplicate of each
/// new listener's socket; a listener that leaves the set was closed by the reload
/// that removed it, which stops its accept loops ([`crate::listener::accept_loop`]).
pub async fn supervise_listeners(worker: Rc<Worker>, tracker: ConnTracker) {
    let mut rx = worker.shared.listeners.subscribe();
    // The listeners this worker accepts on, by identity; holding the `Arc` keeps
    // the address from being reused by another listener while it is here.
    let mut running: HashMap<usize, Arc<Bound>> = HashMap::new();
    loop {
        let set = rx.borrow_and_update().clone();
        for b in set.iter() {
            let key = Arc::as_ptr(b) as usize;
            if running.contains_key(&key) || b.ctx.is_closing() {
                continue;
            }
            running.insert(key, b.clone());
            let listener = b
                .socket
                .try_clone()
                .and_then(tokio::net::TcpListener::from_std);
            match listener {
                Ok(l) => {
                    tokio::task::spawn_local(crate::listener::accept_loop(
                        worker.clone(),
                        b.ctx.clone(),
                        l,
                        tracker.clone(),
                    ));
                }
                Err(e) => tracing::error!(
                    worker = worker.id,
                    listener = %b.ctx.name,
                    "cannot accept on the listener: {e}"
                ),
            }
        }
        running.retain(|_, b| set.iter().any(|n| Arc::ptr_eq(n, b)));
        if rx.changed().await.is_err() {
            return;
        }
    }
}

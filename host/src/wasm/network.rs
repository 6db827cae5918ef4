//! [`WasmNetworkFilter`]: a component of the `legate:filter/network-filter`
//! world (abi/README.md §11) as a [`NetworkFilter`] on TCP listeners. One
//! instance per worker, created when the config goes live there if the filter
//! ticks (else at the worker's first connection), and replaced after a failure
//! with the same backoff as HTTP plugins; each connection gets a guest
//! `network-context` resource, constructed at `on-new-connection` and dropped
//! at `on_done`. The connection's facts and data are the [`Exchange`] the
//! chain swaps into the store for a call (the `connection` handle names it).
//! Deadlines, the memory cap, the failure policy and the per-plugin stats are
//! the HTTP plugins' ([`super::plugin`]), and so are ticks: with a non-zero
//! `tick-interval-ms`, each instance gets a tick task on its worker's
//! `LocalSet` (started with the instance, ended with it), whose `on-tick`
//! calls and the callouts they send are handled as for HTTP plugins.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use rustc_hash::FxHashMap;
use wasmtime::component::{Component, Linker, ResourceAny};
use wasmtime::Store;

use super::bindings::network::exports::legate::filter::network_handler::NetworkSetup;
use super::bindings::network::legate::filter::network as wnet;
use super::bindings::network::{NetworkFilter as World, NetworkFilterPre};
use super::engine;
use super::host::{HostState, Phase, PluginShared, PLUGIN_CONTEXT};
use super::plugin::{denial_hint, describe, guest_result, PluginStats, Settings, MIN_TICK};
use super::slots::{InstanceCount, LiveIds, MemoryUse};
use crate::filter::{
    CalloutRequest, CalloutResult, Direction, Exchange, HttpFilter, Phases, Verdict,
};
use crate::network_filter::{NetVerdict, NetworkFilter, Peer};
use crate::stats::{Counter, Stats};

/// Deadline of `configure`.
const CONFIGURE_DEADLINE: Duration = Duration::from_secs(1);

/// One live instance on a worker.
struct Live {
    store: Store<HostState>,
    bindings: World,
    /// The guest's `network-context` per connection context.
    contexts: FxHashMap<u64, ResourceAny>,
}

/// A worker's slot for one plugin.
type Slot = super::slots::Slot<Live>;

thread_local! {
    /// This worker's instances, by `WasmNetworkFilter::id`.
    static INSTANCES: RefCell<FxHashMap<u64, Slot>> = RefCell::default();
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Ids of filters not dropped yet: a worker frees its instances of dropped
/// filters (a reload replaced them) before it instantiates a new one, so
/// reloads do not exhaust the instance pool (as `plugin.rs` does for HTTP).
static LIVE: LiveIds = LiveIds::new();

/// Whether `component` exports the L4 handler (and so is a network filter).
pub fn is_network_filter(component: &Component) -> bool {
    let Ok(engine) = engine::engine() else {
        return false;
    };
    component
        .component_type()
        .exports(engine)
        .any(|(name, _)| name.starts_with("legate:filter/network-handler@0.1."))
}

/// A loaded network-filter component.
pub struct WasmNetworkFilter {
    id: u64,
    shared: Arc<PluginShared>,
    pre: NetworkFilterPre<HostState>,
    settings: Settings,
    stats: PluginStats,
    setup: NetworkSetup,
    /// `legate_plugin_body_limit_exceeded_total` by direction.
    limit_exceeded: [Counter; 2],
    /// Instances of this filter live on workers.
    instances: InstanceCount,
    /// `tick-interval-ms` from the setup, if non-zero.
    tick: Option<Duration>,
    /// This filter, for the per-instance tick tasks (set by
    /// [`WasmNetworkFilter::arm`]); weak so a removed plugin's ticks stop.
    me: OnceLock<Weak<WasmNetworkFilter>>,
}

impl Drop for WasmNetworkFilter {
    fn drop(&mut self) {
        LIVE.remove(self.id);
    }
}

fn linker() -> anyhow::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine::engine()?);
    super::wasi::add_to_linker(&mut linker).map_err(|e| anyhow::anyhow!("linking WASI: {e}"))?;
    World::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
        .map_err(|e| anyhow::anyhow!("linking the plugin ABI: {e}"))?;
    Ok(linker)
}

fn action(a: wnet::NetworkAction) -> NetVerdict {
    match a {
        wnet::NetworkAction::Continue => NetVerdict::Continue,
        wnet::NetworkAction::Pause => NetVerdict::Pause,
        wnet::NetworkAction::Close => NetVerdict::Close,
    }
}

impl WasmNetworkFilter {
    /// Links and configures the component once on this thread to check it.
    pub fn load(
        name: &str,
        component: &Component,
        settings: Settings,
        stats: &Arc<Stats>,
    ) -> anyhow::Result<Self> {
        let linker = linker()?;
        let pre = super::plugin::link(name, component, |c| linker.instantiate_pre(c))?;
        let pre = NetworkFilterPre::new(pre)
            .map_err(|e| super::plugin::unexported(name, component, "network-handler", &e))?;
        let mut shared = PluginShared::new(name, stats.clone(), &settings.kv, &settings.clusters);
        shared.body_limit = settings.body_limit;
        shared.files = settings.files.clone();
        let limit_exceeded = ["request", "response"].map(|d| {
            stats.counter(
                "legate_plugin_body_limit_exceeded_total",
                "Bodies over a plugin's buffered body cap (`limits.body`), by direction.",
                &[("plugin", name), ("direction", d)],
            )
        });
        let id = NEXT_ID.fetch_add(1, Relaxed);
        LIVE.insert(id);
        let plugin_stats = PluginStats::new(stats, name);
        let instances = InstanceCount::new(plugin_stats.instances.clone());
        let mut f = WasmNetworkFilter {
            id,
            shared: Arc::new(shared),
            pre,
            settings,
            stats: plugin_stats,
            setup: NetworkSetup {
                events: wnet::NetworkEvents::empty(),
                tick_interval_ms: 0,
            },
            limit_exceeded,
            instances,
            tick: None,
            me: OnceLock::new(),
        };
        let (_, setup) = f
            .instantiate(u32::MAX)
            .map_err(|e| anyhow::anyhow!("plugin `{name}`: {e}"))?;
        // The same rule as for HTTP plugins (abi/README.md §2).
        let tick = Duration::from_millis(u64::from(setup.tick_interval_ms));
        if !tick.is_zero() && tick < MIN_TICK {
            anyhow::bail!(
                "plugin `{name}`: tick-interval-ms {} is below the minimum of {} ms; \
                 ask for 0 (no ticks) or at least {}",
                setup.tick_interval_ms,
                MIN_TICK.as_millis(),
                MIN_TICK.as_millis()
            );
        }
        f.tick = (!tick.is_zero()).then_some(tick);
        f.setup = setup;
        Ok(f)
    }

    /// Lets the filter start tick tasks for its instances (it needs an `Arc`
    /// of itself); call once after wrapping it in an `Arc`.
    pub fn arm(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Calls `on-tick` on this worker's instance every interval while that
    /// instance (generation `generation`) is live and the filter is loaded.
    /// Runs on the worker's `LocalSet`, so a tick never overlaps another call
    /// into the instance.
    async fn tick_loop(
        me: Weak<WasmNetworkFilter>,
        worker: usize,
        every: Duration,
        generation: u64,
    ) {
        let mut iv = super::slots::tick_interval(every).await;
        loop {
            iv.tick().await;
            let Some(f) = me.upgrade() else {
                // A reload dropped the filter: free its instance now rather than
                // at this worker's next new slot.
                INSTANCES.with(|cell| LIVE.sweep(&mut cell.borrow_mut()));
                return;
            };
            f.stats.calls["tick"].inc();
            let r = f.with_plugin_call(generation, |live| {
                let r = live
                    .bindings
                    .legate_filter_network_handler()
                    .call_on_tick(&mut live.store);
                r.map(|()| {
                    live.store.data_mut().start_tick_callouts(|req| {
                        Self::tick_callout(me.clone(), worker, generation, req)
                    });
                })
            });
            match r {
                Ok(()) => {}
                // The instance is gone (a trap in a connection call, a newer
                // one replaced it, or the filter was dropped).
                Err(None) => break,
                // A trap dropped the instance.
                Err(Some(e)) => {
                    tracing::warn!(plugin = &*f.shared.name, "on-tick failed: {e}");
                    break;
                }
            }
        }
        Self::replace_dead(&me, worker).await;
    }

    /// Starts a new instance (and tick task) on this worker for the ticking
    /// filter whose instance died, once the restart backoff allows.
    async fn replace_dead(me: &Weak<WasmNetworkFilter>, worker: usize) {
        let Some(id) = me.upgrade().map(|f| f.id) else {
            return;
        };
        super::slots::restart_ticking(&INSTANCES, id, || {
            if let Some(f) = me.upgrade() {
                f.start_on_worker(worker);
            }
        })
        .await;
    }

    /// Sends one callout queued by `on-tick` and delivers its result to
    /// `on-tick-callout-response`, if the instance that sent it is still live.
    async fn tick_callout(
        me: Weak<WasmNetworkFilter>,
        worker: usize,
        generation: u64,
        req: CalloutRequest,
    ) {
        let id = req.id;
        let result = crate::filter::send_from_worker(req).await;
        let Some(f) = me.upgrade() else { return };
        f.stats.count_callout(&result);
        let current = INSTANCES.with(|cell| {
            cell.borrow_mut()
                .get_mut(&f.id)
                .filter(|s| s.generation == generation)
                .and_then(|s| s.live.as_mut())
                .is_some_and(|live| live.store.data_mut().take_outstanding(PLUGIN_CONTEXT, id))
        });
        if !current {
            return;
        }
        f.stats.calls["tick_callout_response"].inc();
        let result = guest_result(result);
        let r = f.with_plugin_call(generation, |live| {
            let r = live
                .bindings
                .legate_filter_network_handler()
                .call_on_tick_callout_response(
                    &mut live.store,
                    id,
                    result.as_ref().map_err(|e| *e),
                );
            // Callouts sent from here belong to the plugin too.
            r.map(|()| {
                live.store.data_mut().start_tick_callouts(|req| {
                    Self::tick_callout(me.clone(), worker, generation, req)
                });
            })
        });
        match r {
            Ok(()) => {}
            Err(None) => {}
            Err(Some(e)) => tracing::warn!(
                plugin = &*f.shared.name,
                "on-tick-callout-response failed: {e}"
            ),
        }
    }

    /// Runs a plugin-level call (`on-tick` and its callout responses: no
    /// connection) on this worker's instance of generation `generation`, under
    /// the CPU deadline. `Err(None)`: that instance is not live any more;
    /// `Err(Some(why))`: the call failed (a trap drops the instance, as for
    /// connection calls).
    fn with_plugin_call<R>(
        &self,
        generation: u64,
        call: impl FnOnce(&mut Live) -> wasmtime::Result<R>,
    ) -> Result<R, Option<String>> {
        INSTANCES.with(|cell| {
            let mut map = cell.borrow_mut();
            let Some(slot) = map.get_mut(&self.id).filter(|s| s.generation == generation) else {
                return Err(None);
            };
            let Some(live) = slot.live.as_mut() else {
                return Err(None);
            };
            let started = engine::arm(&mut live.store, self.settings.cpu);
            let data = live.store.data_mut();
            data.phase = Phase::Tick;
            data.in_exchange = false;
            let result = call(live);
            self.stats.duration.observe(started.elapsed());
            match result {
                Ok(r) => Ok(r),
                Err(e) => {
                    let text = self.stats.count_fatal(&e, self.settings.cpu);
                    // The instance is dead; its connections get the failure
                    // policy on their next call.
                    slot.live = None;
                    self.instances.ended();
                    slot.restarts.failed();
                    Err(Some(text))
                }
            }
        })
    }

    /// A new configured instance for `worker` (`u32::MAX`: the load-time check,
    /// not counted in the memory gauge).
    fn instantiate(&self, worker: u32) -> Result<(Live, NetworkSetup), String> {
        let mut state = HostState::new(self.shared.clone(), worker, self.settings.memory);
        if worker != u32::MAX {
            state.memory = MemoryUse::tracked(&self.shared.stats, &self.shared.name, worker);
        }
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
        engine::install(&mut store, CONFIGURE_DEADLINE);
        // Off the request path: a guest may wait in WASI here (see
        // `engine::with_timers`).
        let (bindings, r) = engine::with_timers(|| {
            let bindings = self
                .pre
                .instantiate(&mut store)
                .map_err(|e| engine::instantiate_error(&e, store.data().refused_memory))?;
            self.stats.calls["configure"].inc();
            store.data_mut().phase = Phase::Configure;
            let r = bindings
                .legate_filter_network_handler()
                .call_configure(&mut store, &self.settings.config_json);
            Ok::<_, String>((bindings, r))
        })?;
        match r {
            Ok(Ok(setup)) => {
                store.data_mut().configured();
                Ok((
                    Live {
                        store,
                        bindings,
                        contexts: FxHashMap::default(),
                    },
                    setup,
                ))
            }
            Ok(Err(msg)) => Err(format!(
                "configure failed: {msg}{}",
                denial_hint(store.data_mut().denial.take())
            )),
            Err(e) => Err(format!(
                "configure failed: {}{}",
                describe(&e, CONFIGURE_DEADLINE).1,
                denial_hint(store.data_mut().denial.take())
            )),
        }
    }

    /// Creates this worker's instance in `slot`, with its tick task if the
    /// plugin ticks; a failure starts the slot's restart backoff.
    fn start_instance(&self, slot: &mut Slot, worker: usize) -> Result<(), String> {
        let made = self
            .instantiate(u32::try_from(worker).unwrap_or(u32::MAX))
            .map(|(live, _)| live);
        slot.start(made, &self.stats.restarts, &self.instances, |generation| {
            if let (Some(every), Some(me)) = (self.tick, self.me.get()) {
                tokio::task::spawn_local(Self::tick_loop(me.clone(), worker, every, generation));
            }
        })
    }

    /// Runs `call` on this worker's instance with connection `c` swapped into
    /// the store; `new` creates the instance if needed and the connection's
    /// guest context. A trap drops the instance (as for HTTP plugins).
    fn with_instance<R>(
        &self,
        worker: usize,
        phase: Phase,
        c: &mut Exchange,
        new: bool,
        call: impl FnOnce(&mut Live, ResourceAny) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, String> {
        INSTANCES.with(|cell| {
            let mut map = cell.borrow_mut();
            if !map.contains_key(&self.id) {
                LIVE.sweep(&mut map);
            }
            let slot = map.entry(self.id).or_default();
            if slot.live.is_none() {
                if !new {
                    return Err("the instance this connection started on failed".to_string());
                }
                // No instance for it: the call fails (the policy applies), as
                // a trapped one does, and counts as one.
                if slot.restarts.waiting() {
                    self.stats.failures.inc();
                    return Err("no instance (restarting after a failure)".to_string());
                }
                if let Err(e) = self.start_instance(slot, worker) {
                    self.stats.failures.inc();
                    return Err(e);
                }
            }
            let Some(live) = slot.live.as_mut() else {
                return Err("no instance".to_string());
            };
            let context = c.context;
            let started = engine::arm(&mut live.store, self.settings.cpu);
            let data = live.store.data_mut();
            data.phase = phase;
            data.in_exchange = true;
            std::mem::swap(c, &mut data.x);
            let result = match live.contexts.get(&context).copied() {
                Some(ctx) => call(live, ctx),
                None if new => {
                    let h = live.bindings.legate_filter_network_handler();
                    match h.network_context().call_constructor(&mut live.store) {
                        Ok(ctx) => {
                            live.contexts.insert(context, ctx);
                            call(live, ctx)
                        }
                        Err(e) => Err(e),
                    }
                }
                None => Ok(Err(
                    "the instance this connection started on failed".to_string()
                )),
            };
            self.stats.duration.observe(started.elapsed());
            let data = live.store.data_mut();
            std::mem::swap(c, &mut data.x);
            data.in_exchange = false;
            match result {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(invalid)) => {
                    self.stats.failures.inc();
                    Err(invalid)
                }
                Err(e) => {
                    let text = self.stats.count_fatal(&e, self.settings.cpu);
                    // The instance is dead: wasmtime does not re-enter it.
                    slot.live = None;
                    self.instances.ended();
                    slot.restarts.failed();
                    Err(text)
                }
            }
        })
    }

    fn wants(&self, event: wnet::NetworkEvents) -> bool {
        self.setup.events.contains(event)
    }
}

impl NetworkFilter for WasmNetworkFilter {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn fail_open(&self) -> bool {
        self.settings.fail_open
    }

    fn buffer_limit(&self) -> usize {
        self.settings.body_limit
    }

    fn host_failure(&self) {
        self.stats.failures.inc();
    }

    fn buffer_limit_exceeded(&self, from: Peer) {
        self.limit_exceeded[from.idx()].inc();
    }

    fn on_new_connection(&self, worker: usize, c: &mut Exchange) -> Result<NetVerdict, String> {
        let wants = self.wants(wnet::NetworkEvents::NEW_CONNECTION);
        if wants {
            self.stats.calls["new_connection"].inc();
        }
        // The guest context is created here whether or not the event is declared.
        self.with_instance(worker, Phase::Net, c, true, |live, ctx| {
            if !wants {
                return Ok(Ok(NetVerdict::Continue));
            }
            let context = live.store.data().x.context;
            let cr = live.store.data_mut().lend_connection(context)?;
            let h = live.bindings.legate_filter_network_handler();
            let a = h
                .network_context()
                .call_on_new_connection(&mut live.store, ctx, cr);
            Ok(Ok(action(a?)))
        })
    }

    fn on_data(
        &self,
        worker: usize,
        c: &mut Exchange,
        from: Peer,
        end_of_stream: bool,
    ) -> Result<NetVerdict, String> {
        let (event, label, d) = match from {
            Peer::Downstream => (
                wnet::NetworkEvents::DOWNSTREAM_DATA,
                "downstream_data",
                Direction::Request,
            ),
            Peer::Upstream => (
                wnet::NetworkEvents::UPSTREAM_DATA,
                "upstream_data",
                Direction::Response,
            ),
        };
        if !self.wants(event) {
            return Ok(NetVerdict::Continue);
        }
        self.stats.calls[label].inc();
        self.with_instance(worker, Phase::NetData(d), c, false, |live, ctx| {
            let context = live.store.data().x.context;
            let data = live.store.data_mut();
            let cr = data.lend_connection(context)?;
            let br = data.lend_buffer(context, d)?;
            let h = live.bindings.legate_filter_network_handler();
            let nc = h.network_context();
            let a = match from {
                Peer::Downstream => {
                    nc.call_on_downstream_data(&mut live.store, ctx, cr, br, end_of_stream)
                }
                Peer::Upstream => {
                    nc.call_on_upstream_data(&mut live.store, ctx, cr, br, end_of_stream)
                }
            };
            Ok(Ok(action(a?)))
        })
    }

    fn on_callout_response(
        &self,
        worker: usize,
        c: &mut Exchange,
        id: u64,
        result: CalloutResult,
    ) -> Result<NetVerdict, String> {
        self.stats.count_callout(&result);
        let context = c.context;
        let outstanding = INSTANCES.with(|cell| {
            cell.borrow_mut()
                .get_mut(&self.id)
                .and_then(|s| s.live.as_mut())
                .is_some_and(|live| live.store.data_mut().take_outstanding(context, id))
        });
        if !outstanding {
            return Ok(NetVerdict::Pause);
        }
        self.stats.calls["callout_response"].inc();
        self.with_instance(worker, Phase::Net, c, false, |live, ctx| {
            let cr = live.store.data_mut().lend_connection(context)?;
            let result = guest_result(result);
            let h = live.bindings.legate_filter_network_handler();
            let a = h.network_context().call_on_callout_response(
                &mut live.store,
                ctx,
                cr,
                id,
                result.as_ref().map_err(|e| *e),
            );
            Ok(Ok(action(a?)))
        })
    }

    fn on_close(&self, worker: usize, c: &mut Exchange, peer: Peer, remote: bool) {
        let _ = remote;
        if !self.wants(wnet::NetworkEvents::CLOSE) {
            return;
        }
        let label = match peer {
            Peer::Downstream => "downstream_close",
            Peer::Upstream => "upstream_close",
        };
        self.stats.calls[label].inc();
        let p = match peer {
            Peer::Downstream => wnet::Peer::Downstream,
            Peer::Upstream => wnet::Peer::Upstream,
        };
        let r = self.with_instance(worker, Phase::ReadOnly, c, false, |live, ctx| {
            let context = live.store.data().x.context;
            let cr = live.store.data_mut().lend_connection(context)?;
            let h = live.bindings.legate_filter_network_handler();
            h.network_context()
                .call_on_close(&mut live.store, ctx, cr, p)?;
            Ok(Ok(()))
        });
        if let Err(e) = r {
            tracing::warn!(plugin = &*self.shared.name, "on-close failed: {e}");
        }
    }

    fn on_done(&self, _worker: usize, c: &mut Exchange) {
        let context = c.context;
        // The guest context is dropped (its destructor runs in the guest) and
        // the connection's outstanding callouts forgotten.
        let r = INSTANCES.with(|cell| {
            let mut map = cell.borrow_mut();
            let Some(slot) = map.get_mut(&self.id) else {
                return Ok(());
            };
            let Some(live) = slot.live.as_mut() else {
                return Ok(());
            };
            live.store.data_mut().forget_outstanding(context);
            let Some(ctx) = live.contexts.remove(&context) else {
                return Ok(());
            };
            engine::arm(&mut live.store, self.settings.cpu);
            let r = ctx.resource_drop(&mut live.store);
            if let Err(e) = r {
                let text = self.stats.count_fatal(&e, self.settings.cpu);
                // A destructor that trapped or was stopped mid-call leaves an
                // instance wasmtime will not re-enter: replace it, as after
                // any failed call.
                slot.live = None;
                self.instances.ended();
                slot.restarts.failed();
                return Err(text);
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!(
                plugin = &*self.shared.name,
                "dropping a network-context failed: {e}"
            );
        }
    }
}

/// A network filter is loaded with the HTTP plugins; it has no HTTP phases, and
/// `crate::network_filter::NetworkFilters::build` refuses it on an HTTP listener.
impl HttpFilter for WasmNetworkFilter {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn phases(&self) -> Phases {
        Phases(0)
    }

    fn fail_open(&self) -> bool {
        self.settings.fail_open
    }

    fn on_request_headers(&self, _: usize, _: &mut Exchange, _: bool) -> Result<Verdict, String> {
        Ok(Verdict::Continue)
    }

    fn on_response_headers(&self, _: usize, _: &mut Exchange, _: bool) -> Result<Verdict, String> {
        Ok(Verdict::Continue)
    }

    fn network(self: Arc<Self>) -> Option<Arc<dyn NetworkFilter>> {
        Some(self)
    }

    fn on_log(&self, _: usize, _: &mut Exchange) {}

    fn on_done(&self, _: usize, _: u64, _: bool) {}

    /// A filter that ticks gets its instance (and tick task) now, so it ticks
    /// before any connection; one without ticks waits for its first connection.
    fn start_on_worker(&self, worker: usize) {
        if self.tick.is_none() {
            return;
        }
        super::slots::start_early(&INSTANCES, &LIVE, self.id, &self.shared.name, |slot| {
            self.start_instance(slot, worker)
        });
    }
}

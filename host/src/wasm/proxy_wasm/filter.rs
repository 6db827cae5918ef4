//! [`ProxyWasmFilter`]: a proxy-wasm module as an [`HttpFilter`]. One VM
//! (instance) per worker, created on the worker's thread (when the config goes
//! live there for a plugin whose root context works from the start: a tick, a
//! shared queue, a call or stream from its configure; else at the worker's
//! first exchange) and started as Envoy does (`_initialize`/`_start`, root
//! context, `proxy_on_vm_start`, `proxy_on_configure`); each exchange gets an
//! HTTP context
//! (`proxy_on_context_create` → request headers → request body/trailers →
//! response headers → response body/trailers → `on_log` → `on_done` →
//! `on_delete`, Envoy's order: the stream is logged, then its filters
//! destroyed; a TCP context's is done → log → delete). Deadlines, the memory cap, the failure policy and the per-plugin
//! stats are the component plugins' ([`super::super::plugin`]). A worker
//! drops the VMs of plugins a reload removed after ending their root
//! contexts (`on_done`, `on_delete`: [`Live::retire`]), as Envoy tears a
//! plugin down.
//!
//! VM sharing: plugins of one loaded set with the same non-empty `vm_id`,
//! module and `vm_config` ([`Shares`]) share the worker's VM slot, each on its
//! own root context (ids 1, 2, … in load order); every call sets the store's
//! plugin (`meta`, `root`) to the called one. A VM of one plugin is the same
//! with a single root context 1.
//!
//! Bodies: a module that exports a body callback gets the host's `streamed` mode
//! for that direction, and Envoy's `StopIterationAndBuffer` (`Pause` from a body
//! callback) is done here: the data is held in the context (forwarding nothing)
//! and the next call sees everything held plus the new chunk, under the plugin's
//! body cap (request over it: 413; response: the exchange is reset, its head
//! being out). `Continue` forwards what is held. `Pause` from a headers
//! callback is, by default, Envoy's: proxy-wasm-cpp-host turns it into
//! `StopAllIterationAndWatermark`, so the whole message waits for the filter
//! to resume (the chain's pause, below), with no body callback before. Only
//! with `allow_on_headers_stop_iteration` (Envoy 1.35's option) is it Envoy's
//! `StopIteration` when no call is out and a body is to come: the head is
//! held while the body callback gets each chunk (`BodyCtl::holds_head`), goes
//! on with the first chunk it continues, writable until then, and the chain
//! stops there (`Chain::run_stopped` gives the filters after it the head,
//! then the body, once it lets go). `Pause` at
//! the end of the stream or from a trailers callback (or from a headers
//! callback, but for that hold), with or without a call outstanding,
//! is the chain's pause: the host holds the rest of the message, with its head
//! (still held, or another filter buffers the whole message) or after it
//! (streamed: the body stream waits, see `crate::body::Filtered`); the call's
//! callback then runs in that body or trailers phase ([`held_phase`]), so it
//! can rewrite what is held.
//!
//! A chain's pause ends when a callback resumes, answers or resets it: a
//! callout's, a gRPC stream's of the context, or any other callback of the VM
//! after `proxy_set_effective_context` to the paused context (a tick's, as
//! Envoy allows): every such pause arms a wake-up ([`super::grpc::arm_wait`])
//! that those callbacks fire, and `limits.pause` bounds it.
//!
//! Callouts: HTTP and unary gRPC calls go through the chain (or, from the root
//! context, are sent here with the worker's sender) and come back to
//! `proxy_on_http_call_response` / `proxy_on_grpc_receive|close`. gRPC streams
//! ([`super::grpc`]) run as tasks of this worker's VM, one VM call per event.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::rc::Rc;

// Keyed by host-made ids (plugin loads, exchange contexts): no hashing DoS to
// defend against, and these maps are touched on every call.
use rustc_hash::{FxHashMap, FxHashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use wasmtime::{Extern, InstancePre, Linker, Module, Store, TypedFunc};

use super::abi::{action, peer, stream};
use super::imports;
use super::state::{Meta, Phase, PwState, ROOT_CONTEXT};
use crate::filter::{
    BodyMode, CalloutRequest, CalloutResult, Direction, Exchange, HttpFilter, InstanceAlive,
    InstanceGone, LocalResponse, Phases, Verdict,
};
use crate::network_filter::{NetVerdict, NetworkFilter, Peer};
use crate::stats::Counter;
use crate::stats::Stats;
use crate::wasm::engine;
use crate::wasm::plugin::{describe, PluginStats, MIN_TICK};
use crate::wasm::slots::{InstanceCount, LiveIds, MemoryUse, Restarts};

/// How a proxy-wasm plugin is run.
pub struct Settings {
    /// Per-call deadline.
    pub cpu: Duration,
    /// Memory cap per instance.
    pub memory: usize,
    /// `fail: open`.
    pub fail_open: bool,
    /// `limits.body`: the cap of a body the filter holds.
    pub body_limit: usize,
    /// `limits.pause`: how long one pause may hold an exchange (`None`: no bound).
    pub pause_limit: Option<Duration>,
    /// `proxy_wasm.allow_on_headers_stop_iteration`: `Pause` from a headers
    /// callback with no call out and a body to come holds only the head, the
    /// body callbacks getting each chunk (Envoy's `StopIteration`); without it
    /// the whole message waits for the filter to resume, as in Envoy.
    pub headers_stop_iteration: bool,
    /// `proxy_wasm.start_cpu`: the CPU time a VM's start (module start,
    /// `proxy_on_vm_start`, `proxy_on_configure`) may take; a shared VM's
    /// has the largest of its plugins'.
    pub start_cpu: Duration,
}

/// `proxy_on_http_call_response(root, token, headers, body_size, trailers)`.
type CallResponseFn = Rc<TypedFunc<(i32, i32, i32, i32, i32), ()>>;

/// `proxy_on_{request,response}_body(context, body_buffer_length, end_of_stream)`.
type BodyFn = Rc<TypedFunc<(i32, i32, i32), i32>>;

/// `proxy_on_{request,response}_trailers(context, num_trailers)`.
type TrailersFn = Rc<TypedFunc<(i32, i32), i32>>;

/// An export of the guest this host may call: absent, or behind an `Rc`.
type Export<P, R> = Option<Rc<TypedFunc<P, R>>>;

/// The body and trailer callbacks, by direction ([`Direction::idx`]).
const BODY_EXPORTS: [&str; 2] = ["proxy_on_request_body", "proxy_on_response_body"];
const TRAILERS_EXPORTS: [&str; 2] = ["proxy_on_request_trailers", "proxy_on_response_trailers"];

/// The guest's exports this host calls (absent ones are skipped, as Envoy does).
/// Each is behind an `Rc`: a call clones its export out of the VM (the store is
/// borrowed mutably for the call), and a `TypedFunc` clone costs ~200
/// instructions (its type's registry entry) against an `Rc`'s one increment.
#[derive(Clone)]
struct Exports {
    context_create: Export<(i32, i32), ()>,
    vm_start: Export<(i32, i32), i32>,
    configure: Export<(i32, i32), i32>,
    tick: Export<i32, ()>,
    queue_ready: Export<(i32, i32), ()>,
    request_headers: Export<(i32, i32, i32), i32>,
    response_headers: Export<(i32, i32, i32), i32>,
    body: [Option<BodyFn>; 2],
    trailers: [Option<TrailersFn>; 2],
    http_call_response: Option<CallResponseFn>,
    /// `proxy_on_grpc_receive(root, token, message_size)`.
    grpc_receive: Export<(i32, i32, i32), ()>,
    /// `proxy_on_grpc_close(root, token, status_code)`.
    grpc_close: Export<(i32, i32, i32), ()>,
    /// `proxy_on_grpc_receive_initial_metadata(root, token, headers)`.
    grpc_initial: Export<(i32, i32, i32), ()>,
    /// `proxy_on_grpc_receive_trailing_metadata(root, token, trailers)`.
    grpc_trailing: Export<(i32, i32, i32), ()>,
    done: Export<i32, i32>,
    log: Export<i32, ()>,
    delete: Export<i32, ()>,
    /// `proxy_on_new_connection(context)`.
    new_connection: Export<i32, i32>,
    /// `proxy_on_downstream_data` / `proxy_on_upstream_data(context, size,
    /// end_of_stream)`, by direction ([`Direction::idx`]).
    data: [Option<BodyFn>; 2],
    /// `proxy_on_downstream_connection_close` /
    /// `proxy_on_upstream_connection_close(context, peer_type)`, by side.
    connection_close: [Export<(i32, i32), ()>; 2],
}

/// What a callout response asked for.
enum Answer {
    /// As for an HTTP exchange.
    Verdict(Verdict),
    /// `proxy_close_stream`: close (a TCP connection) or reset (an exchange).
    Close,
    /// `proxy_continue_stream` from a TCP connection's callout response: the
    /// stream types it named (bit `1 << type`).
    Streams(u8),
}

/// The failure text of `proxy_close_stream` on an HTTP exchange.
const RESET: &str = "the plugin reset the stream (proxy_close_stream)";

/// One live VM on a worker.
struct Live {
    store: Store<PwState>,
    exports: Exports,
    /// (Exchange context, plugin's root context) → proxy-wasm context id, for
    /// exchanges that started here (two plugins of a shared VM in one chain
    /// each have a context for the same exchange).
    contexts: FxHashMap<(u64, u32), u32>,
    next_context: u32,
    /// Queues this VM registered, with their wake-ups (dropping one unsubscribes).
    queues: HashMap<u32, Arc<super::shared::QueueWake>>,
    /// Dropped with the VM: wakes the exchanges paused in it
    /// ([`HttpFilter::instance_gone`]).
    alive: InstanceAlive,
    /// The root contexts of a worker's VM, with their plugins (ids, meta,
    /// `limits.cpu`), that [`Live::retire`] ends when a reload removes or
    /// replaces those plugins; empty for the VM that checks a plugin at load.
    roots: Vec<(u32, Arc<Meta>, Duration)>,
}

impl Live {
    /// Ends a VM whose plugins a reload removed or replaced, as Envoy tears a
    /// plugin down (proxy-wasm-cpp-host's `startShutdown`): `proxy_on_done`
    /// then `proxy_on_delete` on each root context, each call under its
    /// plugin's `limits.cpu`, before the VM is dropped. A root context that
    /// answers `false` (it would finish later and call `proxy_done`) is
    /// deleted all the same: its VM is going. A trap or a deadline ends the
    /// calls (the VM is dropped as it is), logged; it fails nothing, the
    /// plugin being gone. Runs on the worker, which alone holds the VM, so a
    /// slow guest delays that worker by its deadline, never the reload.
    fn retire(mut self) {
        let roots = std::mem::take(&mut self.roots);
        let exports = self.exports.clone();
        for (root, meta, cpu) in roots {
            {
                let data = self.store.data_mut();
                data.meta = meta.clone();
                data.root = root;
                data.effective = root;
                data.phase = Phase::Root;
            }
            let failed = |what: &str, e: &wasmtime::Error| {
                tracing::warn!(
                    plugin = &*meta.name,
                    "{what} (root context, the plugin being removed) failed: {}",
                    describe(e, cpu).1
                );
            };
            if let Some(f) = &exports.done {
                engine::arm(&mut self.store, cpu);
                if let Err(e) = f.call(&mut self.store, root as i32) {
                    return failed("proxy_on_done", &e);
                }
            }
            if let Some(f) = &exports.delete {
                engine::arm(&mut self.store, cpu);
                if let Err(e) = f.call(&mut self.store, root as i32) {
                    return failed("proxy_on_delete", &e);
                }
            }
        }
    }
}

/// Drops this worker's VMs of plugins (or shared VMs) no longer loaded
/// ([`LIVE`]), ending each one's root contexts first ([`Live::retire`]).
fn sweep(map: &mut FxHashMap<u64, Slot>) {
    let mut loaded: FxHashMap<u64, ()> = map.keys().map(|k| (*k, ())).collect();
    LIVE.sweep(&mut loaded);
    if loaded.len() == map.len() {
        return;
    }
    let gone: Vec<u64> = map
        .keys()
        .filter(|k| !loaded.contains_key(*k))
        .copied()
        .collect();
    for k in gone {
        if let Some(vm) = map.remove(&k).and_then(|s| s.live) {
            vm.retire();
        }
    }
}

/// A worker's slot for one plugin.
#[derive(Default)]
struct Slot {
    live: Option<Live>,
    restarts: Restarts,
    generation: u64,
    /// Body data a body callback held back with `Pause`, by exchange, root
    /// context and direction: handed back (before the new data) on the next
    /// body call.
    held: FxHashMap<(u64, u32, usize), Vec<u8>>,
}

thread_local! {
    /// This worker's VMs, by `ProxyWasmFilter::vm` (a plugin's own id, or its
    /// shared VM's).
    static VMS: RefCell<FxHashMap<u64, Slot>> = RefCell::default();
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// VM slot keys (`ProxyWasmFilter::vm`) still in use: a worker drops its VMs of
/// plugins (or shared VMs) that a reload replaced when it makes a new slot.
static LIVE: LiveIds = LiveIds::new();

/// The plugins of one loaded plugin set that share a VM per worker (Envoy's VM
/// sharing: same non-empty `vm_id`, same module, same `vm_config`).
pub struct VmShare {
    /// The key of the workers' slots (`VMS`).
    vm: u64,
    /// The plugins, in load order; plugin `i` has root context `i + 1`.
    members: std::sync::Mutex<Vec<Weak<ProxyWasmFilter>>>,
    /// The VM's metrics (Envoy keeps them per VM), labelled with its first
    /// plugin.
    metrics: Arc<super::state::Metrics>,
}

impl Drop for VmShare {
    fn drop(&mut self) {
        LIVE.remove(self.vm);
    }
}

impl VmShare {
    fn members(&self) -> Vec<Arc<ProxyWasmFilter>> {
        self.members
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The VM's metrics table, which every plugin of it uses.
    pub fn metrics(&self) -> Arc<super::state::Metrics> {
        self.metrics.clone()
    }
}

/// The shared VMs of one plugin set being loaded, by (`vm_id`, module sha256,
/// `vm_config`): a reload makes a new one, so a new set gets new VMs.
#[derive(Default)]
pub struct Shares(HashMap<(String, String, Vec<u8>), Arc<VmShare>>);

impl Shares {
    /// The shared VM for this key and the root context id of the plugin about
    /// to join it (which [`Shares::join`] then registers); `plugin` names the
    /// VM's metrics if it is the first.
    pub fn reserve(
        &mut self,
        vm_id: &str,
        sha256: &str,
        vm_config: &[u8],
        plugin: &str,
    ) -> (Arc<VmShare>, u32) {
        let share = self
            .0
            .entry((vm_id.to_string(), sha256.to_string(), vm_config.to_vec()))
            .or_insert_with(|| {
                let vm = NEXT_ID.fetch_add(1, Relaxed);
                LIVE.insert(vm);
                Arc::new(VmShare {
                    vm,
                    members: std::sync::Mutex::default(),
                    metrics: super::state::Metrics::new(plugin),
                })
            })
            .clone();
        let n = share
            .members
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        let root = ROOT_CONTEXT + u32::try_from(n).unwrap_or(u32::MAX - 1);
        (share, root)
    }

    /// Registers a loaded plugin with its shared VM.
    pub fn join(f: &Arc<ProxyWasmFilter>) {
        if let Some(share) = &f.share {
            share
                .members
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(Arc::downgrade(f));
        }
    }
}

/// A loaded proxy-wasm plugin.
pub struct ProxyWasmFilter {
    id: u64,
    /// The key of this plugin's VM slot on each worker: `id`, or its shared VM's.
    vm: u64,
    /// This plugin's root context id in its VM.
    root: u32,
    /// The plugins this one shares a VM with (itself included), if any.
    share: Option<Arc<VmShare>>,
    meta: Arc<Meta>,
    pre: InstancePre<PwState>,
    settings: Settings,
    stats: PluginStats,
    /// The phases declared to the chain: headers, log and done always; a body or
    /// trailers phase only if the module exports its callback.
    phases: Phases,
    /// `legate_plugin_body_limit_exceeded_total` by direction.
    body_limit_exceeded: [Counter; 2],
    me: OnceLock<Weak<ProxyWasmFilter>>,
    /// This plugin's VMs on the workers (a shared VM counts for each plugin).
    instances: InstanceCount,
    /// Its root context, at the load check (`proxy_on_vm_start`,
    /// `proxy_on_configure`), set a tick period (and the module exports
    /// `proxy_on_tick`), registered a shared queue (and exports
    /// `proxy_on_queue_ready`), dispatched an HTTP or gRPC call or opened a
    /// gRPC stream: each worker starts its VM when the config goes live, as
    /// Envoy starts every worker's VM at config time, so that work goes on
    /// without traffic on the plugin's own listeners.
    starts_eagerly: bool,
}

impl Drop for ProxyWasmFilter {
    fn drop(&mut self) {
        // A shared VM's slot lives as long as its `VmShare`.
        if self.share.is_none() {
            LIVE.remove(self.vm);
        }
    }
}

fn typed<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
    store: &mut Store<PwState>,
    instance: &wasmtime::Instance,
    name: &str,
) -> Result<Export<P, R>, String> {
    match instance.get_export(&mut *store, name) {
        None => Ok(None),
        Some(Extern::Func(f)) => f
            .typed::<P, R>(&*store)
            .map(|f| Some(Rc::new(f)))
            .map_err(|e| format!("export `{name}` has the wrong signature for ABI 0.2.1: {e}")),
        Some(_) => Err(format!("export `{name}` is not a function")),
    }
}

fn b(v: bool) -> i32 {
    i32::from(v)
}

impl ProxyWasmFilter {
    /// Links a compiled module and starts one VM on this thread to check it: a
    /// missing export, a trap in start-up or `proxy_on_configure` returning false
    /// is an error naming the plugin.
    pub fn load(
        module: &Module,
        meta: Meta,
        settings: Settings,
        stats: &Arc<Stats>,
        share: Option<(Arc<VmShare>, u32)>,
    ) -> anyhow::Result<Self> {
        let name = meta.name.clone();
        let mut linker: Linker<PwState> = Linker::new(engine::engine()?);
        imports::add_to_linker(&mut linker)
            .map_err(|e| anyhow::anyhow!("plugin `{name}`: linking the proxy-wasm ABI: {e}"))?;
        let unknown = imports::stub_the_rest(&mut linker, module);
        if !unknown.is_empty() {
            tracing::warn!(
                plugin = &*name,
                "the module imports functions this host does not provide (calling one traps): {}",
                unknown.join(", ")
            );
        }
        let pre = linker.instantiate_pre(module).map_err(|e| {
            anyhow::anyhow!("plugin `{name}`: the module does not fit this host: {e:#}")
        })?;
        let body_limit_exceeded = [Direction::Request, Direction::Response].map(|d| {
            stats.counter(
                "legate_plugin_body_limit_exceeded_total",
                "Bodies over a plugin's buffered body cap (`limits.body`), by direction.",
                &[("plugin", &name), ("direction", d.as_str())],
            )
        });
        let id = NEXT_ID.fetch_add(1, Relaxed);
        let (vm, root, share) = match share {
            Some((s, root)) => (s.vm, root, Some(s)),
            None => {
                LIVE.insert(id);
                (id, ROOT_CONTEXT, None)
            }
        };
        let plugin_stats = PluginStats::new(stats, &name);
        let instances = InstanceCount::new(plugin_stats.instances.clone());
        let mut f = ProxyWasmFilter {
            id,
            vm,
            root,
            share,
            meta: Arc::new(meta),
            pre,
            settings,
            stats: plugin_stats,
            phases: phases_of(module),
            body_limit_exceeded,
            me: OnceLock::new(),
            instances,
            starts_eagerly: false,
        };
        // Checked in a VM of its own (as the only plugin of it, on its root
        // context): a failure is this plugin's.
        let check = f
            .start_vm(&[], None)
            .map_err(|e| anyhow::anyhow!("plugin `{name}`: {e}"))?;
        let data = check.store.data();
        let root = f.root;
        let ticks = data.ticks.contains_key(&root) && check.exports.tick.is_some();
        let queues =
            data.new_queues.iter().any(|(r, _)| *r == root) && check.exports.queue_ready.is_some();
        let calls = data.root_callouts.iter().any(|(r, _)| *r == root)
            || data.new_streams.iter().any(|p| p.root == root);
        f.starts_eagerly = ticks || queues || calls;
        Ok(f)
    }

    /// Whether this worker's VM is still the one of `generation` (a task started
    /// for an older VM must not call into its successor).
    fn is_current(&self, generation: u64) -> bool {
        VMS.with(|cell| {
            cell.borrow()
                .get(&self.vm)
                .is_some_and(|s| s.live.is_some() && s.generation == generation)
        })
    }

    /// Lets the filter start tick tasks (it needs an `Arc` of itself).
    pub fn arm(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// The plugins a new VM of this one's runs: every live plugin of its shared
    /// VM (in load order), or this one alone (no `vm_id`, or at load, before it
    /// joined).
    fn members(&self) -> Vec<Arc<ProxyWasmFilter>> {
        let Some(share) = &self.share else {
            return Vec::new();
        };
        let all = share.members();
        if all.iter().any(|m| m.id == self.id) {
            all
        } else {
            Vec::new()
        }
    }

    /// A new VM, started and configured: `_initialize`/`_start` and
    /// `proxy_on_vm_start` once (on the first plugin's root context, as Envoy
    /// does), then a root context and `proxy_on_configure` for each plugin of
    /// `members` (this plugin alone if empty). A worker's VM counts in the
    /// first plugin's `legate_plugin_memory_bytes` (its cap is that plugin's
    /// too); the load-time check's (`worker` `None`) does not.
    fn start_vm(
        &self,
        members: &[Arc<ProxyWasmFilter>],
        worker: Option<u32>,
    ) -> Result<Live, String> {
        let mut list: Vec<&ProxyWasmFilter> = members.iter().map(|m| &**m).collect();
        if list.is_empty() {
            list.push(self);
        }
        let first = list[0];
        let mut state = PwState::new(first.meta.clone(), first.settings.memory);
        // Root contexts are 1..=n; HTTP and TCP contexts come after (known
        // before any root is configured).
        state.first_context = list.iter().map(|m| m.root).max().unwrap_or(ROOT_CONTEXT) + 1;
        if let Some(w) = worker {
            state.memory_use = MemoryUse::tracked(&first.meta.stats, &first.meta.name, w);
        }
        let mut store = Store::new(first.pre.module().engine(), state);
        store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
        let deadline = list
            .iter()
            .map(|m| m.settings.start_cpu)
            .max()
            .unwrap_or(self.settings.start_cpu);
        engine::install(&mut store, deadline);
        let fail =
            |what: &str, e: wasmtime::Error| format!("{what} failed: {}", describe(&e, deadline).1);
        let instance = first
            .pre
            .instantiate(&mut store)
            .map_err(|e| engine::instantiate_error(&e, store.data().refused_memory))?;
        // A reactor's `_initialize` (then `main` if exported, as Envoy does), or a
        // command's `_start`.
        if let Some(init) = typed::<(), ()>(&mut store, &instance, "_initialize")? {
            init.call(&mut store, ())
                .map_err(|e| fail("_initialize", e))?;
            if let Some(main) = typed::<(i32, i32), i32>(&mut store, &instance, "main")? {
                main.call(&mut store, (0, 0)).map_err(|e| fail("main", e))?;
            }
        } else if let Some(start) = typed::<(), ()>(&mut store, &instance, "_start")? {
            start.call(&mut store, ()).map_err(|e| fail("_start", e))?;
        }
        let exports = Exports {
            context_create: typed(&mut store, &instance, "proxy_on_context_create")?,
            vm_start: typed(&mut store, &instance, "proxy_on_vm_start")?,
            configure: typed(&mut store, &instance, "proxy_on_configure")?,
            tick: typed(&mut store, &instance, "proxy_on_tick")?,
            queue_ready: typed(&mut store, &instance, "proxy_on_queue_ready")?,
            request_headers: typed(&mut store, &instance, "proxy_on_request_headers")?,
            response_headers: typed(&mut store, &instance, "proxy_on_response_headers")?,
            body: [
                typed(&mut store, &instance, BODY_EXPORTS[0])?,
                typed(&mut store, &instance, BODY_EXPORTS[1])?,
            ],
            trailers: [
                typed(&mut store, &instance, TRAILERS_EXPORTS[0])?,
                typed(&mut store, &instance, TRAILERS_EXPORTS[1])?,
            ],
            http_call_response: typed(&mut store, &instance, "proxy_on_http_call_response")?,
            grpc_receive: typed(&mut store, &instance, "proxy_on_grpc_receive")?,
            grpc_close: typed(&mut store, &instance, "proxy_on_grpc_close")?,
            grpc_initial: typed(
                &mut store,
                &instance,
                "proxy_on_grpc_receive_initial_metadata",
            )?,
            grpc_trailing: typed(
                &mut store,
                &instance,
                "proxy_on_grpc_receive_trailing_metadata",
            )?,
            done: typed(&mut store, &instance, "proxy_on_done")?,
            log: typed(&mut store, &instance, "proxy_on_log")?,
            delete: typed(&mut store, &instance, "proxy_on_delete")?,
            new_connection: typed(&mut store, &instance, "proxy_on_new_connection")?,
            data: [
                typed(&mut store, &instance, "proxy_on_downstream_data")?,
                typed(&mut store, &instance, "proxy_on_upstream_data")?,
            ],
            connection_close: [
                typed(
                    &mut store,
                    &instance,
                    "proxy_on_downstream_connection_close",
                )?,
                typed(&mut store, &instance, "proxy_on_upstream_connection_close")?,
            ],
        };
        if exports.context_create.is_none() {
            return Err("the module does not export `proxy_on_context_create`".into());
        }
        let root = first.root as i32;
        {
            let data = store.data_mut();
            data.root = first.root;
            data.effective = first.root;
            data.contexts.clear();
            data.contexts.insert(first.root);
        }
        if let Some(f) = &exports.context_create {
            f.call(&mut store, (root, 0))
                .map_err(|e| fail("proxy_on_context_create (root)", e))?;
        }
        if let Some(f) = &exports.vm_start {
            let n = first.meta.vm_config.len() as i32;
            let ok = f
                .call(&mut store, (root, n))
                .map_err(|e| fail("proxy_on_vm_start", e))?;
            if ok == 0 {
                return Err(
                    "proxy_on_vm_start returned false (check `proxy_wasm.vm_config` \
                     and the plugin's log)"
                        .into(),
                );
            }
        }
        for (i, m) in list.iter().enumerate() {
            // Another plugin's failure names it: this VM is shared.
            let whose = |e: String| {
                if m.id == self.id {
                    e
                } else {
                    format!("plugin `{}` (sharing this VM): {e}", m.meta.name)
                }
            };
            {
                let data = store.data_mut();
                data.meta = m.meta.clone();
                data.root = m.root;
                data.effective = m.root;
                data.contexts.insert(m.root);
            }
            if i > 0 {
                if let Some(f) = &exports.context_create {
                    f.call(&mut store, (m.root as i32, 0))
                        .map_err(|e| whose(fail("proxy_on_context_create (root)", e)))?;
                }
            }
            m.stats.calls["configure"].inc();
            if let Some(f) = &exports.configure {
                let n = m.meta.plugin_config.len() as i32;
                let ok = f
                    .call(&mut store, (m.root as i32, n))
                    .map_err(|e| whose(fail("proxy_on_configure", e)))?;
                if ok == 0 {
                    return Err(whose(
                        "proxy_on_configure returned false: the plugin rejected its \
                         configuration (check `config`/`proxy_wasm.plugin_config` and the \
                         plugin's log)"
                            .into(),
                    ));
                }
            }
        }
        let next_context = store.data().first_context;
        let roots = match worker {
            Some(_) => list
                .iter()
                .map(|m| (m.root, m.meta.clone(), m.settings.cpu))
                .collect(),
            None => Vec::new(),
        };
        Ok(Live {
            store,
            exports,
            contexts: FxHashMap::default(),
            next_context,
            queues: HashMap::new(),
            alive: InstanceAlive::new(),
            roots,
        })
    }

    /// Calls `proxy_on_tick` on this worker's VM while its period is set and that VM
    /// (generation `generation`) lives. Runs on the worker's `LocalSet`, so a tick
    /// never overlaps another call into the VM. The period is read again after each
    /// tick, and at once when the module changes it (Envoy's `setTickPeriod`
    /// re-arms the timer: the next tick comes a new period after the change;
    /// 0 stops the ticks); periods under 10ms are raised to 10ms.
    async fn tick_loop(me: Weak<ProxyWasmFilter>, worker: usize, generation: u64) {
        loop {
            let state = {
                let Some(f) = me.upgrade() else {
                    return Self::plugin_gone();
                };
                VMS.with(|cell| {
                    let mut map = cell.borrow_mut();
                    let slot = map.get_mut(&f.vm)?;
                    let live = slot
                        .live
                        .as_mut()
                        .filter(|_| slot.generation == generation)?;
                    let data = live.store.data_mut();
                    let changed = data.tick_changed.entry(f.root).or_default().clone();
                    Some((data.ticks.get(&f.root).copied(), changed))
                })
            };
            // This VM died (a trap, in a tick or in an exchange), or a newer
            // one (with its own tick task) replaced it.
            let Some((period, changed)) = state else {
                break;
            };
            // Registered before the wait (nothing else runs on this worker in
            // between): a change of the period ends the wait, and the loop
            // reads it again.
            let notified = changed.notified();
            let Some(period) = period else {
                // Not ticking now; the module may ask later (the change
                // wakes this, the timeout only re-checks that the VM lives).
                let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep(period.max(MIN_TICK)) => {}
                () = notified => continue,
            }
            let Some(f) = me.upgrade() else {
                return Self::plugin_gone();
            };
            f.stats.calls["tick"].inc();
            let r = f.with_vm(worker, Phase::Root, None, false, |live, _| {
                match live.exports.tick.as_ref() {
                    Some(t) => t.call(&mut live.store, f.root as i32).map(Ok),
                    None => Ok(Ok(())),
                }
            });
            if let Err(e) = r {
                tracing::warn!(plugin = &*f.meta.name, "proxy_on_tick failed: {e}");
            }
        }
        // A VM that ticked from its start is replaced, so that it goes on
        // ticking on a worker without traffic.
        let Some(vm) = me.upgrade().map(|f| f.vm) else {
            return;
        };
        let down_until = || {
            VMS.with(|cell| {
                cell.borrow()
                    .get(&vm)
                    .filter(|s| s.live.is_none())
                    .map(|s| s.restarts.not_before())
            })
        };
        crate::wasm::slots::restart_when(down_until, || {
            if let Some(f) = me.upgrade() {
                f.start_on_worker(worker);
            }
        })
        .await;
    }

    /// A tick task found its plugin dropped (a reload removed or replaced it):
    /// this worker frees the VMs of dropped plugins now rather than at its next
    /// new slot.
    fn plugin_gone() {
        VMS.with(|cell| sweep(&mut cell.borrow_mut()));
    }

    /// Calls `proxy_on_queue_ready(root, queue)` on this worker's VM once per
    /// enqueue (as proxy-wasm-cpp-host posts one call per enqueue; see
    /// [`super::shared::QueueWake`] for the bound), while that VM (generation
    /// `generation`) lives.
    async fn queue_loop(
        me: Weak<ProxyWasmFilter>,
        worker: usize,
        generation: u64,
        queue: u32,
        ready: Weak<super::shared::QueueWake>,
    ) {
        loop {
            let Some(n) = ready.upgrade() else { return };
            n.next().await;
            drop(n);
            let Some(f) = me.upgrade() else { return };
            if !f.is_current(generation) {
                return;
            }
            let r = f.with_vm(worker, Phase::Root, None, false, |live, _| {
                match live.exports.queue_ready.as_ref() {
                    Some(q) => q
                        .call(&mut live.store, (f.root as i32, queue as i32))
                        .map(Ok),
                    None => Ok(Ok(())),
                }
            });
            if let Err(e) = r {
                tracing::warn!(plugin = &*f.meta.name, "proxy_on_queue_ready failed: {e}");
            }
        }
    }

    /// Subscribes the VM to the queues it registered since the last look, each
    /// with a task on the worker's `LocalSet`.
    fn watch_queues(&self, live: &mut Live, worker: usize, generation: u64) {
        let new = std::mem::take(&mut live.store.data_mut().new_queues);
        let Some(me) = self.me.get() else { return };
        if live.exports.queue_ready.is_none() {
            return;
        }
        for (_, q) in new {
            if live.queues.contains_key(&q) {
                continue;
            }
            if let Some(n) = super::shared::subscribe(q) {
                tokio::task::spawn_local(Self::queue_loop(
                    me.clone(),
                    worker,
                    generation,
                    q,
                    Arc::downgrade(&n),
                ));
                live.queues.insert(q, n);
            }
        }
    }

    /// Starts what the last guest call asked of the host beyond its return:
    /// the queues it registered, the root context's callouts and gRPC streams,
    /// each with the plugin whose root context asked (so its callbacks go to
    /// that root, under that plugin's grants): in a shared VM, the start runs
    /// every plugin's `proxy_on_configure` under the plugin that started it.
    fn start_root_work(&self, live: &mut Live, worker: usize, generation: u64) {
        let data = live.store.data();
        let root = self.root;
        let foreign = data.new_queues.iter().any(|(r, _)| *r != root)
            || data.root_callouts.iter().any(|(r, _)| *r != root)
            || data.new_streams.iter().any(|p| p.root != root);
        if !foreign {
            return self.start_own_root_work(live, worker, generation);
        }
        let data = live.store.data_mut();
        let mut queues = std::mem::take(&mut data.new_queues);
        let mut callouts = std::mem::take(&mut data.root_callouts);
        let mut streams = std::mem::take(&mut data.new_streams);
        for m in self.members() {
            let data = live.store.data_mut();
            let r = m.root;
            (data.new_queues, queues) = queues.into_iter().partition(|(o, _)| *o == r);
            (data.root_callouts, callouts) = callouts.into_iter().partition(|(c, _)| *c == r);
            (data.new_streams, streams) = streams.into_iter().partition(|p| p.root == r);
            m.start_own_root_work(live, worker, generation);
        }
        // A root of no live plugin (not expected): this plugin's.
        let data = live.store.data_mut();
        data.new_queues = queues;
        data.root_callouts = callouts;
        data.new_streams = streams;
        self.start_own_root_work(live, worker, generation);
    }

    /// [`Self::start_root_work`] for what this plugin's root context asked.
    fn start_own_root_work(&self, live: &mut Live, worker: usize, generation: u64) {
        if !live.store.data().new_queues.is_empty() {
            self.watch_queues(live, worker, generation);
        }
        if !live.store.data().root_callouts.is_empty() {
            self.send_root_callouts(live, worker, generation);
        }
        if !live.store.data().new_streams.is_empty() {
            self.start_streams(live, worker, generation);
        }
    }

    /// Starts this worker's VM in `slot` (with every plugin sharing it, each
    /// with its tick task); a failure starts the slot's restart backoff.
    fn start_slot(&self, slot: &mut Slot, worker: usize) -> Result<(), String> {
        let members = self.members();
        match self.start_vm(&members, u32::try_from(worker).ok()) {
            Ok(live) => {
                slot.live = Some(live);
                slot.generation += 1;
                let me = self.me.get().and_then(Weak::upgrade);
                let list = if members.is_empty() {
                    me.into_iter().collect()
                } else {
                    members
                };
                // Every plugin of the VM runs in it now, and ticks on
                // its own root context.
                for m in &list {
                    if slot.restarts.failed_before() {
                        m.stats.restarts.inc();
                    }
                    m.instances.started();
                    tokio::task::spawn_local(Self::tick_loop(
                        Arc::downgrade(m),
                        worker,
                        slot.generation,
                    ));
                }
                Ok(())
            }
            Err(e) => {
                slot.restarts.failed();
                Err(e)
            }
        }
    }

    /// `f` on this worker's live VM of this plugin, outside any guest call;
    /// `None` if there is none (never started, or failed).
    fn live_vm<R>(&self, f: impl FnOnce(&mut Live) -> Option<R>) -> Option<R> {
        VMS.with(|cell| f(cell.borrow_mut().get_mut(&self.vm)?.live.as_mut()?))
    }

    /// Runs `call` on this worker's VM (starting it if needed) with `x` swapped into
    /// the store. `new_context` creates the exchange's HTTP context first. A trap
    /// drops the VM.
    fn with_vm<R>(
        &self,
        worker: usize,
        phase: Phase,
        x: Option<&mut Exchange>,
        new_context: bool,
        call: impl FnOnce(&mut Live, u32) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, String> {
        VMS.with(|cell| {
            let mut map = cell.borrow_mut();
            if !map.contains_key(&self.vm) {
                sweep(&mut map);
            }
            let slot = map.entry(self.vm).or_default();
            if slot.live.is_none() {
                if !new_context {
                    return Err("the VM this exchange started on failed".to_string());
                }
                // No VM for it: the call fails (the policy applies), as a
                // trapped one does, and counts as one.
                if slot.restarts.waiting() {
                    self.stats.failures.inc();
                    return Err("no VM (restarting after a failure)".to_string());
                }
                if let Err(e) = self.start_slot(slot, worker) {
                    self.stats.failures.inc();
                    return Err(e);
                }
            }
            let Some(live) = slot.live.as_mut() else {
                return Err("no VM".to_string());
            };
            let exchange = x.as_ref().map(|x| x.context);
            let started = engine::arm(&mut live.store, self.settings.cpu);
            let root = self.root;
            {
                // The plugin being called (its configuration, name, root id): a
                // pointer compare in a VM of one plugin.
                let data = live.store.data_mut();
                if !Arc::ptr_eq(&data.meta, &self.meta) {
                    data.meta = self.meta.clone();
                }
                data.root = root;
            }
            let mut result = Ok(Ok(root));
            let mut pw = root;
            if let Some(c) = exchange {
                match live.contexts.get(&(c, root)) {
                    Some(id) => pw = *id,
                    None if new_context => {
                        let data = live.store.data_mut();
                        pw = allocate_context(
                            &mut live.next_context,
                            data.first_context,
                            &mut data.contexts,
                        );
                        live.contexts.insert((c, root), pw);
                        if phase == Phase::Connection {
                            data.tcp_contexts.insert(pw);
                        }
                        if let Some(f) = live.exports.context_create.as_ref() {
                            result = f
                                .call(&mut live.store, (pw as i32, root as i32))
                                .map(|()| Ok(pw));
                        }
                    }
                    None => return Err("the VM this exchange started on failed".to_string()),
                }
            }
            let data = live.store.data_mut();
            data.phase = phase;
            data.effective = pw;
            data.local = None;
            data.close = false;
            let mut x = x;
            if let Some(x) = x.as_deref_mut() {
                std::mem::swap(x, &mut data.x);
                data.x_context = pw;
            }
            let result = match result {
                Ok(Ok(_)) => call(live, pw),
                Ok(Err(e)) => Ok(Err(e)),
                Err(e) => Err(e),
            };
            self.stats.duration.observe(started.elapsed());
            self.start_root_work(live, worker, slot.generation);
            let data = live.store.data_mut();
            let mut reset = false;
            if let Some(x) = x {
                if !data.streams.is_empty() || !data.kept_maps.is_empty() {
                    data.keep_maps();
                }
                std::mem::swap(x, &mut data.x);
                reset = x.reset;
            }
            data.x_context = 0;
            data.effective = root;
            match result {
                Ok(Ok(r)) => Ok(r),
                // `proxy_close_stream`: the exchange is reset, not failed.
                Ok(Err(e)) if reset => Err(e),
                Ok(Err(invalid)) => {
                    self.stats.failures.inc();
                    Err(invalid)
                }
                Err(e) => {
                    let text = self.stats.count_fatal(&e, self.settings.cpu);
                    // The VM is dead: its state may be inconsistent after a trap.
                    // A shared VM dies for every plugin in it.
                    slot.live = None;
                    self.instances.ended();
                    for m in self.members() {
                        if m.id != self.id {
                            m.stats.failures.inc();
                            m.instances.ended();
                        }
                    }
                    slot.restarts.failed();
                    Err(text)
                }
            }
        })
    }

    fn headers_phase(
        &self,
        worker: usize,
        x: &mut Exchange,
        request: bool,
        end_of_stream: bool,
    ) -> Result<Verdict, String> {
        let (phase, label) = if request {
            (Phase::RequestHeaders, "request_headers")
        } else {
            (Phase::ResponseHeaders, "response_headers")
        };
        self.stats.calls[label].inc();
        let count = if request {
            x.request_header_count() + 4
        } else {
            x.response_headers.as_ref().map_or(0, |h| h.len() + 1)
        };
        let count = i32::try_from(count).unwrap_or(i32::MAX);
        self.with_vm(worker, phase, Some(x), request, |live, ctx| {
            if let Some(v) = take_pending(live.store.data_mut(), ctx) {
                return Ok(v);
            }
            let f = if request {
                live.exports.request_headers.as_ref()
            } else {
                live.exports.response_headers.as_ref()
            };
            let Some(f) = f else {
                return Ok(Ok(Verdict::Continue));
            };
            let data = live.store.data_mut();
            data.resume = false;
            data.resumed_streams = 0;
            let a = f.call(&mut live.store, (ctx as i32, count, b(end_of_stream)))?;
            let data = live.store.data_mut();
            if let Some(lr) = data.local.take() {
                return Ok(Ok(Verdict::Respond(lr)));
            }
            if data.close {
                // Envoy's `resetStream`: not a failure (see `Chain::fail`).
                data.x.reset = true;
                return Ok(Err(RESET.into()));
            }
            let calls = data.outstanding.values().any(|c| *c == ctx);
            let d = if request {
                Direction::Request
            } else {
                Direction::Response
            };
            if a == action::PAUSE && resumed(data, d) {
                // Resumed in the callback that pauses: Envoy defers a
                // continue to the end of the call that makes it, so the
                // message goes on at once (it waited for `limits.pause`).
                return Ok(Ok(Verdict::Continue));
            }
            // Envoy's StopIteration with a body to come, only with
            // `allow_on_headers_stop_iteration`: the head is held (writable)
            // while the body callback gets each chunk, until it continues one
            // (or the body ends). Without it (Envoy's default: proxy-wasm-cpp-host
            // turns StopIteration into StopAllIterationAndWatermark) the
            // whole message waits for the filter to resume, no body callback
            // before that: the chain's pause below.
            let ctl = &data.x.body_ctl;
            let can_hold = self.settings.headers_stop_iteration
                && !end_of_stream
                && live.exports.body[d.idx()].is_some()
                && ctl.declared[d.idx()]
                && !ctl.started[d.idx()];
            // A pause with a call out is the chain's: the exchange waits
            // for the call's callback, its streams' events or another
            // callback's `proxy_continue_stream` (a tick's, after
            // `proxy_set_effective_context`). With no call out, the chain
            // holds the exchange the same way, as Envoy does, within the
            // plugin's `limits.pause`; a body to come is not read meanwhile
            // (it waits in the connection, under its flow control, as behind
            // Envoy's watermark). Only with
            // `allow_on_headers_stop_iteration` is the body waited for
            // instead, if there is one to buffer.
            Ok(match a {
                action::CONTINUE => Ok(Verdict::Continue),
                action::PAUSE if calls || !can_hold => {
                    super::grpc::arm_wait(data, ctx);
                    Ok(Verdict::Pause)
                }
                action::PAUSE => {
                    data.x.body_ctl.holds_head[d.idx()] = true;
                    Ok(Verdict::Continue)
                }
                _ => Err(format!(
                    "returned action {a} from proxy_on_{}_headers; this host supports \
                     Continue (0) and Pause (1, StopIteration)",
                    d.as_str()
                )),
            })
        })
    }

    /// A body callback over `x.bodies[d]` (the new chunk), Envoy's way: data held
    /// back by an earlier `Pause` comes first, so the guest sees the whole body
    /// so far (`body_buffer_length` grows). `Continue` forwards all of it as the
    /// guest left it; `Pause` before the end holds it (forwarding nothing now);
    /// over the body cap the request is answered 413 and the response (whose
    /// head is out) reset — the chain cannot send a clean 502 then. `Pause` at
    /// the end with a callout outstanding (`x.hold_body`: the host holds the
    /// whole message; `x.hold_end`: the end of a streamed one) is the chain's
    /// pause: the body stays on the
    /// exchange, readable and writable from the callout's callback, until
    /// `proxy_continue_stream` or a local response.
    fn body_phase(
        &self,
        worker: usize,
        x: &mut Exchange,
        d: Direction,
        end_of_stream: bool,
    ) -> Result<Verdict, String> {
        let label = match d {
            Direction::Request => "request_body",
            Direction::Response => "response_body",
        };
        self.stats.calls[label].inc();
        let cap = self.meta.body_limit;
        let key = (x.context, self.root, d.idx());
        // Data held back by an earlier Pause comes first. The worker's slot keeps
        // it (not the VM), so a VM that fails with `fail: open` still forwards it.
        let held = VMS.with(|cell| {
            cell.borrow_mut()
                .get_mut(&self.vm)
                .filter(|s| !s.held.is_empty())
                .and_then(|s| s.held.remove(&key))
        });
        let body = x.bodies[d.idx()].get_or_insert_with(Default::default);
        if let Some(mut h) = held {
            h.extend_from_slice(body);
            *body = h.into();
        }
        if body.len() > cap {
            return Ok(self.over_cap(d, cap));
        }
        let len = i32::try_from(body.len()).unwrap_or(i32::MAX);
        let hold = self.with_vm(worker, Phase::Body(d), Some(&mut *x), false, |live, ctx| {
            if let Some(v) = take_pending(live.store.data_mut(), ctx) {
                return Ok(v.map(Some));
            }
            let Some(f) = live.exports.body[d.idx()].as_ref() else {
                return Ok(Ok(None));
            };
            let data = live.store.data_mut();
            data.resume = false;
            data.resumed_streams = 0;
            let a = f.call(&mut live.store, (ctx as i32, len, b(end_of_stream)))?;
            let data = live.store.data_mut();
            if let Some(lr) = data.local.take() {
                return Ok(Ok(Some(Verdict::Respond(lr))));
            }
            if data.close {
                // Envoy's `resetStream`: not a failure (see `Chain::fail`).
                data.x.reset = true;
                return Ok(Err(RESET.into()));
            }
            Ok(match a {
                action::CONTINUE => {
                    // Envoy's continue after StopIteration: the head goes on
                    // with this data.
                    data.x.body_ctl.holds_head[d.idx()] = false;
                    Ok(None)
                }
                action::PAUSE if !end_of_stream => Ok(Some(Verdict::Pause)),
                // Resumed in this callback: as from its headers callback.
                action::PAUSE if resumed(data, d) => {
                    data.x.body_ctl.holds_head[d.idx()] = false;
                    Ok(None)
                }
                action::PAUSE => paused_at_end(data, ctx, d, "body").map(Some),
                other => Err(format!(
                    "returned action {other} from proxy_on_{}_body; this host supports \
                     Continue (0) and Pause (1, StopIterationAndBuffer)",
                    d.as_str()
                )),
            })
        })?;
        Ok(match hold {
            None => Verdict::Continue,
            // Hold everything (as the guest left it); forward nothing now. At
            // the end of stream a pause is the chain's (see `paused_at_end`).
            Some(Verdict::Pause) if !end_of_stream => {
                let body = x.bodies[d.idx()]
                    .replace(Default::default())
                    .unwrap_or_default()
                    .into_vec();
                VMS.with(|cell| {
                    cell.borrow_mut()
                        .entry(self.vm)
                        .or_default()
                        .held
                        .insert(key, body);
                });
                Verdict::Continue
            }
            Some(v) => v,
        })
    }

    /// A body held for a `Pause` went over the cap: counted, and answered as the
    /// host answers a buffered body over the cap (for the response, whose head is
    /// out, the chain resets the exchange instead).
    fn over_cap(&self, d: Direction, cap: usize) -> Verdict {
        self.body_limit_exceeded(d);
        tracing::warn!(
            plugin = &*self.meta.name,
            "the {} body this filter held (Pause) is over its cap of {cap} bytes",
            d.as_str()
        );
        let status = match d {
            Direction::Request => http::StatusCode::PAYLOAD_TOO_LARGE,
            Direction::Response => http::StatusCode::BAD_GATEWAY,
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        Verdict::Respond(LocalResponse {
            status,
            headers,
            body: bytes::Bytes::from_static(b"plugin_buffer_limit\n"),
            details: crate::filter::BUFFER_LIMIT_DETAILS.to_string(),
            grpc_status: None,
        })
    }

    /// A trailers callback over `x.trailers[d]` (writable through map 1 or 3).
    /// `Pause` holds the trailers as the end-of-stream body `Pause` holds the
    /// body (see `paused_at_end`).
    fn trailers_phase(
        &self,
        worker: usize,
        x: &mut Exchange,
        d: Direction,
    ) -> Result<Verdict, String> {
        let label = match d {
            Direction::Request => "request_trailers",
            Direction::Response => "response_trailers",
        };
        self.stats.calls[label].inc();
        let count = x.trailers[d.idx()].as_ref().map_or(0, http::HeaderMap::len);
        let count = i32::try_from(count).unwrap_or(i32::MAX);
        self.with_vm(worker, Phase::Trailers(d), Some(x), false, |live, ctx| {
            if let Some(v) = take_pending(live.store.data_mut(), ctx) {
                return Ok(v);
            }
            let Some(f) = live.exports.trailers[d.idx()].as_ref() else {
                return Ok(Ok(Verdict::Continue));
            };
            let data = live.store.data_mut();
            data.resume = false;
            data.resumed_streams = 0;
            let a = f.call(&mut live.store, (ctx as i32, count))?;
            let data = live.store.data_mut();
            if let Some(lr) = data.local.take() {
                return Ok(Ok(Verdict::Respond(lr)));
            }
            if data.close {
                // Envoy's `resetStream`: not a failure (see `Chain::fail`).
                data.x.reset = true;
                return Ok(Err(RESET.into()));
            }
            Ok(match a {
                action::CONTINUE => Ok(Verdict::Continue),
                // Resumed in this callback: as from its headers callback.
                action::PAUSE if resumed(data, d) => Ok(Verdict::Continue),
                action::PAUSE => paused_at_end(data, ctx, d, "trailers"),
                other => Err(format!(
                    "returned action {other} from proxy_on_{}_trailers; this host supports \
                     Continue (0) and Pause (1)",
                    d.as_str()
                )),
            })
        })
    }

    /// Delivers callout `token`'s result to `proxy_on_http_call_response` (with
    /// the root context's id, as the spec says; the SDKs find the calling context
    /// by token). Failures are delivered as zero headers, as Envoy does. A gRPC
    /// call's result goes to `proxy_on_grpc_receive` (the message) or
    /// `proxy_on_grpc_close` (any other status), as Envoy's unary calls do.
    /// `exchange` is the exchange the callout belongs to (`None` for the root
    /// context's); `held_in`, the body or trailers phase its context is paused
    /// in, whose buffer or map the callback may read and write as that phase
    /// could. The verdict: a local response, a resume (`proxy_continue_stream`),
    /// or still paused.
    fn call_response(
        &self,
        worker: usize,
        x: Option<&mut Exchange>,
        token: u32,
        result: CalloutResult,
        held_in: Option<Phase>,
        paused: bool,
    ) -> Result<Answer, String> {
        self.stats.count_callout(&result);
        let label = if x.is_some() {
            "callout_response"
        } else {
            "tick_callout_response"
        };
        let tcp = x
            .as_ref()
            .is_some_and(|x| crate::network_filter::is_connection(x.context));
        let phase = match (&x, held_in) {
            (Some(_), Some(held)) => held,
            (Some(_), None) => Phase::CalloutResponse,
            (None, _) => Phase::Root,
        };
        let paused_in = x.as_deref().map(|x| paused_direction(x, held_in));
        self.with_vm(worker, phase, x, false, |live, ctx| {
            let data = live.store.data_mut();
            if data.outstanding.remove(&token).is_none() {
                // Cancelled (`proxy_grpc_cancel`), or its context is gone: no
                // callback, and nothing changes (a pause holds).
                data.grpc_calls.remove(&token);
                return Ok(Ok(Answer::Verdict(Verdict::Pause)));
            }
            self.stats.calls[label].inc();
            let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
            data.resume = false;
            data.resumed_streams = 0;
            data.effective = self.root;
            if data.grpc_calls.remove(&token) {
                // Envoy's unary gRPC callbacks: the message on success, else the
                // status (readable with proxy_get_status).
                let root = self.root as i32;
                let called = match grpc_outcome(&result) {
                    Ok(message) => {
                        let Some(f) = live.exports.grpc_receive.as_ref() else {
                            return Ok(Err(
                                "sent a gRPC call but does not export proxy_on_grpc_receive".into(),
                            ));
                        };
                        let len = n(message.len());
                        data.grpc_message = Some(message);
                        f.call(&mut live.store, (root, token as i32, len))
                    }
                    Err((code, message)) => {
                        let Some(f) = live.exports.grpc_close.as_ref() else {
                            return Ok(Err(
                                "sent a gRPC call but does not export proxy_on_grpc_close".into(),
                            ));
                        };
                        data.grpc_status = Some((code, message));
                        f.call(&mut live.store, (root, token as i32, code as i32))
                    }
                };
                let data = live.store.data_mut();
                data.grpc_message = None;
                data.grpc_status = None;
                called?;
            } else {
                let Some(f) = live.exports.http_call_response.as_ref() else {
                    return Ok(Err(
                        "sent an HTTP callout but does not export proxy_on_http_call_response"
                            .into(),
                    ));
                };
                let (headers, body, trailers) = match &result {
                    Ok(r) => (r.headers.len() + 1, r.body.len(), r.trailers.len()),
                    Err(_) => (0, 0, 0),
                };
                data.call_response = Some(result);
                let called = f.call(
                    &mut live.store,
                    (
                        self.root as i32,
                        token as i32,
                        n(headers),
                        n(body),
                        n(trailers),
                    ),
                );
                live.store.data_mut().call_response = None;
                called?;
            }
            let data = live.store.data_mut();
            if let Some(lr) = data.local.take() {
                return Ok(Ok(Answer::Verdict(Verdict::Respond(lr))));
            }
            if data.close {
                return Ok(Ok(Answer::Close));
            }
            if data.resume && tcp {
                return Ok(Ok(Answer::Streams(data.resumed_streams)));
            }
            if paused_in.is_some_and(|d| resumed(data, d)) {
                return Ok(Ok(Answer::Verdict(Verdict::Continue)));
            }
            // Still paused: it waits on (for its other calls, its streams,
            // or another callback's resume).
            if paused && !data.stream_waits.contains_key(&ctx) {
                super::grpc::arm_wait(data, ctx);
            }
            Ok(Ok(Answer::Verdict(Verdict::Pause)))
        })
    }

    /// Sends the callouts the root context queued in the last call (ticks, queue
    /// events) on the worker's sender, each delivered back to the VM that sent it.
    fn send_root_callouts(&self, live: &mut Live, worker: usize, generation: u64) {
        let data = live.store.data_mut();
        let queued = std::mem::take(&mut data.root_callouts);
        let Some(me) = self.me.get() else { return };
        for (_, req) in queued {
            let token = u32::try_from(req.id).unwrap_or(0);
            let task =
                tokio::task::spawn_local(Self::root_callout(me.clone(), worker, generation, req));
            data.root_tasks.push(token, task.abort_handle());
        }
    }

    async fn root_callout(
        me: Weak<ProxyWasmFilter>,
        worker: usize,
        generation: u64,
        req: CalloutRequest,
    ) {
        let token = u32::try_from(req.id).unwrap_or(0);
        let result = crate::filter::send_from_worker(req).await;
        let Some(f) = me.upgrade() else { return };
        if !f.is_current(generation) {
            return;
        }
        if let Err(e) = f.call_response(worker, None, token, result, None, false) {
            tracing::warn!(
                plugin = &*f.meta.name,
                "proxy_on_http_call_response failed: {e}"
            );
        }
    }

    /// Starts the gRPC streams opened in the last call, each a task on the
    /// worker's `LocalSet` whose abort handle the stream's handle keeps.
    fn start_streams(&self, live: &mut Live, worker: usize, generation: u64) {
        let data = live.store.data_mut();
        let pending = std::mem::take(&mut data.new_streams);
        let Some(me) = self.me.get() else { return };
        for p in pending {
            let token = p.token;
            let task =
                tokio::task::spawn_local(Self::stream_task(me.clone(), worker, generation, p));
            match data.streams.get_mut(&token) {
                Some(st) => st.task = Some(task.abort_handle()),
                // Cancelled in the call that opened it.
                None => task.abort(),
            }
        }
    }

    /// Runs one gRPC stream, delivering each event to this worker's VM of
    /// `generation`. It ends with the stream, when the stream is cancelled (its
    /// handle aborts this task), or soon after the plugin is replaced or its VM
    /// fails (checked every second while the stream is idle).
    async fn stream_task(
        me: Weak<ProxyWasmFilter>,
        worker: usize,
        generation: u64,
        p: super::grpc::Pending,
    ) {
        let token = p.token;
        let sender = crate::filter::worker_callouts();
        let alive = || me.upgrade().is_some_and(|f| f.is_current(generation));
        let run = super::grpc::drive(sender, p, |event| match me.upgrade() {
            Some(f) => f.stream_event(worker, generation, token, event),
            None => false,
        });
        let watch = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if !alive() {
                    return;
                }
            }
        };
        tokio::select! {
            () = run => {}
            () = watch => {}
        }
    }

    /// Delivers one event of stream `token` to the VM: held for the exchange
    /// of the context that opened it while that context waits on its streams
    /// ([`Self::hold_for_exchange`]), else at once, to the root context id (the
    /// SDKs find the opening context by token) without an exchange. Whether
    /// the stream goes on (not closed, cancelled, or its VM gone).
    fn stream_event(
        &self,
        worker: usize,
        generation: u64,
        token: u32,
        event: super::grpc::Event,
    ) -> bool {
        if !self.is_current(generation) {
            return false;
        }
        let event = match self.hold_for_exchange(token, event) {
            Ok(more) => return more,
            Err(event) => event,
        };
        let r = self.with_vm(worker, Phase::Root, None, false, |live, _| {
            self.stream_callback(live, token, event).map(Ok)
        });
        match r {
            Ok(more) => more,
            Err(e) => {
                tracing::warn!(
                    plugin = &*self.meta.name,
                    "a gRPC stream callback failed: {e}"
                );
                false
            }
        }
    }

    /// Holds an event of stream `token` when the context that opened it waits
    /// on its streams ([`super::grpc::StreamWait`]) and wakes the chain, which
    /// delivers it with the exchange; whether more events may follow. `Err`
    /// gives the event back: nobody waits.
    fn hold_for_exchange(
        &self,
        token: u32,
        event: super::grpc::Event,
    ) -> Result<bool, super::grpc::Event> {
        let last = matches!(event, super::grpc::Event::Close(..));
        // Taken only if a wait holds it.
        let mut event = Some(event);
        self.live_vm(|live| {
            let data = live.store.data_mut();
            let st = data.streams.get(&token).filter(|st| !st.remote_closed)?;
            let wait = data.stream_waits.get_mut(&st.context)?;
            wait.held.push_back((token, event.take()?));
            wait.fire();
            Some(())
        });
        match event {
            Some(event) => Err(event),
            None => Ok(!last),
        }
    }

    /// Calls the guest for one event of stream `token` as Envoy does:
    /// `proxy_on_grpc_receive_initial_metadata` (map 4),
    /// `proxy_on_grpc_receive` (buffer 5), `_receive_trailing_metadata` (map 5),
    /// `proxy_on_grpc_close` (`proxy_get_status`), each to the root context id
    /// and skipped when not exported, or when the stream was cancelled (or
    /// closed) meanwhile. Whether more events may follow.
    fn stream_callback(
        &self,
        live: &mut Live,
        token: u32,
        event: super::grpc::Event,
    ) -> wasmtime::Result<bool> {
        use super::grpc::Event;
        let data = live.store.data_mut();
        if data.streams.get(&token).is_none_or(|st| st.remote_closed) {
            return Ok(false);
        }
        let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
        let args = |v: usize| (self.root as i32, token as i32, n(v));
        let last = matches!(event, Event::Close(..));
        let called = match event {
            Event::InitialMetadata(status, h) => {
                // Envoy's response head has `:status` first.
                let pairs: super::abi::Pairs = status
                    .map(|st| (b":status".to_vec(), st.as_str().as_bytes().to_vec()))
                    .into_iter()
                    .chain(
                        h.iter()
                            .map(|(k, v)| (k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec())),
                    )
                    .collect();
                let args = args(pairs.len());
                data.grpc_initial = Some(pairs);
                match live.exports.grpc_initial.as_ref() {
                    Some(f) => f.call(&mut live.store, args),
                    None => Ok(()),
                }
            }
            Event::Message(m) => {
                self.meta.grpc_stream_messages.inc();
                let args = args(m.len());
                data.grpc_message = Some(m);
                match live.exports.grpc_receive.as_ref() {
                    Some(f) => f.call(&mut live.store, args),
                    None => Ok(()),
                }
            }
            Event::TrailingMetadata(h) => {
                let args = args(h.len());
                data.grpc_trailing = Some(h);
                match live.exports.grpc_trailing.as_ref() {
                    Some(f) => f.call(&mut live.store, args),
                    None => Ok(()),
                }
            }
            Event::Close(code, message) => {
                if code != 0 {
                    self.meta.grpc_stream_failures.inc();
                }
                super::grpc::remote_closed(data, token);
                data.grpc_status = Some((code, message));
                match live.exports.grpc_close.as_ref() {
                    Some(f) => f.call(
                        &mut live.store,
                        (self.root as i32, token as i32, code as i32),
                    ),
                    None => Ok(()),
                }
            }
        };
        let data = live.store.data_mut();
        data.grpc_initial = None;
        data.grpc_trailing = None;
        data.grpc_message = None;
        data.grpc_status = None;
        called?;
        let open = data.streams.get(&token).is_some_and(|st| !st.remote_closed);
        Ok(!last && open)
    }

    /// Wake-up `wake` of `x`'s paused context fired: the held events of its
    /// streams are delivered in order with the exchange, readable and
    /// writable as in a callout's callback (`held_in`: the body or trailers
    /// phase the exchange is paused in), until one resumes it
    /// (`proxy_continue_stream`), answers it or resets it; then what other
    /// callbacks asked of the context outside its exchange (a tick's
    /// `proxy_continue_stream`, `proxy_send_local_response` or
    /// `proxy_close_stream` after `proxy_set_effective_context`) is done.
    /// Still paused, it waits on. Not paused (the pause ended otherwise
    /// before the wake-up was delivered), the verdict means nothing.
    fn stream_wake(
        &self,
        worker: usize,
        x: &mut Exchange,
        wake: u32,
        held_in: Option<Phase>,
        paused: bool,
    ) -> Result<Answer, String> {
        let phase = held_in.unwrap_or(Phase::CalloutResponse);
        let paused_in = paused_direction(x, held_in);
        self.with_vm(worker, phase, Some(x), false, |live, ctx| {
            let data = live.store.data_mut();
            let wait = match data.stream_waits.entry(ctx) {
                Entry::Occupied(w) if w.get().id == wake => w.remove(),
                // Replaced by a later wait, or given up: nothing to deliver.
                _ => return Ok(Ok(Answer::Verdict(Verdict::Pause))),
            };
            data.resume = false;
            data.resumed_streams = 0;
            for (token, event) in wait.held {
                // Each callback to the root context id, as on the root path
                // (the SDKs switch to the opening context themselves).
                live.store.data_mut().effective = self.root;
                self.stream_callback(live, token, event)?;
                let data = live.store.data_mut();
                if data.close {
                    return Ok(Ok(Answer::Close));
                }
                let Some(lr) = data.local.take() else {
                    continue;
                };
                if paused {
                    // Anything held after the answer is moot: the context's
                    // streams are reset with it.
                    return Ok(Ok(Answer::Verdict(Verdict::Respond(lr))));
                }
                tracing::debug!(
                    plugin = &*self.meta.name,
                    "a local response from a gRPC stream callback of a context that is \
                     not paused is ignored by this host"
                );
            }
            let data = live.store.data_mut();
            if resumed(data, paused_in) {
                return Ok(Ok(Answer::Verdict(Verdict::Continue)));
            }
            // Asked from outside the exchange: a continue of the paused
            // direction resumes it (of the other one, nothing: Envoy's
            // `continueDecoding` of a filter that is not stopped); an answer
            // or a reset ends it.
            let elsewhere = if data.pending_resume.is_empty() {
                0
            } else {
                data.pending_resume.remove(&ctx).unwrap_or(0)
            };
            if paused {
                if let Some(v) = take_pending(data, ctx) {
                    return Ok(Ok(match v {
                        Ok(v) => Answer::Verdict(v),
                        Err(_) => Answer::Close,
                    }));
                }
                if elsewhere & (1 << paused_in.idx()) != 0 {
                    return Ok(Ok(Answer::Verdict(Verdict::Continue)));
                }
                super::grpc::arm_wait(data, ctx);
            }
            Ok(Ok(Answer::Verdict(Verdict::Pause)))
        })
    }

    /// The pause of `x`'s context ended otherwise (a call's callback resumed
    /// or answered it, or the filter failed): its streams' events go to the VM
    /// on their own again, and the chain drops the wake-up. With `deliver`,
    /// events already held are delivered first, with the exchange (their
    /// verdicts mean nothing now); else they are dropped with the wait.
    fn end_stream_wait(&self, worker: usize, x: &mut Exchange, deliver: bool) {
        let wait = self.live_vm(|live| {
            let ctx = *live.contexts.get(&(x.context, self.root))?;
            let data = live.store.data_mut();
            // A resume asked for the pause that ended resumes nothing later.
            if !data.pending_resume.is_empty() {
                data.pending_resume.remove(&ctx);
            }
            let w = data.stream_waits.get(&ctx)?;
            let id = w.id;
            if deliver && !w.held.is_empty() {
                // `stream_wake` removes it as it delivers.
                Some((id, true))
            } else {
                data.stream_waits.remove(&ctx);
                Some((id, false))
            }
        });
        let Some((id, held)) = wait else {
            return;
        };
        x.cancelled.push(super::grpc::WAKE | u64::from(id));
        if held {
            if let Err(e) = self.stream_wake(worker, x, id, None, false) {
                tracing::warn!(
                    plugin = &*self.meta.name,
                    "a gRPC stream callback failed: {e}"
                );
            }
        }
    }

    /// The end of an exchange's context in Envoy's order, with the exchange
    /// readable if it is given: for an HTTP stream (`log_first`) `on_log` →
    /// `on_done` → `on_delete` (Envoy logs the stream, then destroys its
    /// filters: `Context::log`, then `onDestroy`'s done and delete); for a TCP
    /// connection `on_done` → `on_log` → `on_delete` (Envoy's `onCloseTCP`).
    fn finish(&self, worker: usize, context: u64, x: Option<&mut Exchange>, log_first: bool) {
        let pw = VMS.with(|cell| {
            let mut map = cell.borrow_mut();
            let slot = map.get_mut(&self.vm)?;
            let root = self.root;
            if !slot.held.is_empty() {
                slot.held.retain(|(c, r, _), _| (*c, *r) != (context, root));
            }
            slot.live
                .as_mut()
                .and_then(|live| live.contexts.get(&(context, root)).copied())
        });
        if pw.is_none() {
            return;
        }
        self.stats.calls["done"].inc();
        self.stats.calls["log"].inc();
        let r = self.with_vm(worker, Phase::ReadOnly, x, false, |live, _| {
            let Some(ctx) = pw else { return Ok(Ok(())) };
            live.store.data_mut().effective = ctx;
            let ctx = ctx as i32;
            let log = live.exports.log.clone();
            if log_first {
                if let Some(f) = log.as_ref() {
                    f.call(&mut live.store, ctx)?;
                }
            }
            if let Some(f) = live.exports.done.as_ref() {
                f.call(&mut live.store, ctx)?;
            }
            if !log_first {
                if let Some(f) = log.as_ref() {
                    f.call(&mut live.store, ctx)?;
                }
            }
            if let Some(f) = live.exports.delete.as_ref() {
                f.call(&mut live.store, ctx)?;
            }
            Ok(Ok(()))
        });
        // The context is gone whatever happened.
        self.live_vm(|live| {
            let pw = live.contexts.remove(&(context, self.root))?;
            let data = live.store.data_mut();
            data.contexts.remove(&pw);
            // (Each sweep only when there is something to sweep: most
            // contexts leave nothing behind.)
            if !data.tcp_contexts.is_empty() {
                data.tcp_contexts.remove(&pw);
            }
            if !data.pending_local.is_empty() && data.pending_local.remove(&pw).is_some() {
                tracing::debug!(
                    plugin = &*self.meta.name,
                    "a local response sent outside the exchange came after its last callback; \
                     dropped"
                );
            }
            if !data.pending_close.is_empty() {
                data.pending_close.remove(&pw);
            }
            if !data.pending_resume.is_empty() {
                data.pending_resume.remove(&pw);
            }
            if !data.net_waits.is_empty() {
                data.net_waits.remove(&pw);
            }
            if !data.props.is_empty() {
                data.props.remove(&pw);
            }
            // Its callouts are aborted with the chain; never delivered.
            data.drop_calls_of(pw);
            // Its gRPC streams are reset (as Envoy does when a context is
            // destroyed).
            if !data.streams.is_empty() {
                super::grpc::drop_context(&mut data.streams, pw);
            }
            if !data.stream_waits.is_empty() {
                data.stream_waits.remove(&pw);
            }
            if !data.kept_maps.is_empty() {
                data.kept_maps.remove(&pw);
            }
            Some(())
        });
        if let Err(e) = r {
            tracing::warn!(
                plugin = &*self.meta.name,
                "proxy_on_done/on_log failed: {e}"
            );
        }
    }
}

/// The local response context `ctx` sent from a callback outside its exchange
/// (see [`PwState::pending_local`]), now that the exchange is here.
fn take_pending_local(data: &mut PwState, ctx: u32) -> Option<LocalResponse> {
    if data.pending_local.is_empty() {
        return None;
    }
    data.pending_local.remove(&ctx)
}

/// What a callback outside context `ctx`'s exchange asked of it, now that
/// the exchange is here (at its next phase call): a local response
/// ([`PwState::pending_local`]; it wins over a reset also asked) or a reset
/// ([`PwState::pending_close`]).
fn take_pending(data: &mut PwState, ctx: u32) -> Option<Result<Verdict, String>> {
    if let Some(lr) = take_pending_local(data, ctx) {
        data.pending_close.remove(&ctx);
        return Some(Ok(Verdict::Respond(lr)));
    }
    if !data.pending_close.is_empty() && data.pending_close.remove(&ctx) {
        // Envoy's `resetStream`: not a failure (see `Chain::fail`).
        data.x.reset = true;
        return Some(Err(RESET.into()));
    }
    None
}

/// `Pause` from the end-of-stream body callback or a trailers callback of
/// direction `d` (`what`): Envoy holds the message until
/// `proxy_continue_stream`. The chain waits at the end of a message
/// (another filter buffers the whole message: it waits in place; streamed,
/// the head held or out: the body stream holds the rest) for a callout or
/// gRPC stream of this context, or another callback of the VM (a tick's,
/// after `proxy_set_effective_context`), to resume it; with nothing
/// outstanding too, as Envoy does (which waits until a timeout ends the
/// stream): the plugin's `limits.pause` bounds the wait.
fn paused_at_end(
    data: &mut PwState,
    ctx: u32,
    d: Direction,
    what: &str,
) -> Result<Verdict, String> {
    if !data.x.hold_body && !data.x.hold_end {
        // Not the end of a message (the chain calls trailers and the last body
        // call with one of them set): a host bug, refused as a failure.
        return Err(format!(
            "returned Pause from proxy_on_{}_{what} where the host cannot hold the {} \
             message",
            d.as_str(),
            d.as_str()
        ));
    }
    super::grpc::arm_wait(data, ctx);
    Ok(Verdict::Pause)
}

/// The direction an HTTP exchange is paused in: that of `held_in` (a body or
/// trailers phase it is held in), else that of its headers phase (the
/// response's once a response head exists).
fn paused_direction(x: &Exchange, held_in: Option<Phase>) -> Direction {
    match held_in {
        Some(Phase::Body(d) | Phase::Trailers(d)) => d,
        _ if x.status.is_some() => Direction::Response,
        _ => Direction::Request,
    }
}

/// Whether the current call resumed direction `d` of an HTTP exchange:
/// `proxy_continue_stream` named it (`HTTP_REQUEST` 0 for the request,
/// `HTTP_RESPONSE` 1 for the response), as Envoy's `continueStream` calls
/// `continueDecoding` or `continueEncoding`. A continue of the other
/// direction, or of a TCP stream type, resumes nothing here.
fn resumed(data: &PwState, d: Direction) -> bool {
    data.resume && data.resumed_streams & (1 << d.idx()) != 0
}

/// The body or trailers phase an exchange held by the host (buffered, or the
/// end of a streamed message) is paused in, from what the chain keeps on it during the pause: the body of
/// a paused body phase (bodies are on the exchange only during their phase),
/// else the trailers of the direction that has them (the response's, once
/// they exist).
fn held_phase(x: &Exchange) -> Option<Phase> {
    if x.bodies[Direction::Request.idx()].is_some() {
        Some(Phase::Body(Direction::Request))
    } else if x.bodies[Direction::Response.idx()].is_some() {
        Some(Phase::Body(Direction::Response))
    } else if x.trailers[Direction::Response.idx()].is_some() {
        Some(Phase::Trailers(Direction::Response))
    } else if x.trailers[Direction::Request.idx()].is_some() {
        Some(Phase::Trailers(Direction::Request))
    } else {
        None
    }
}

/// The phases a module declares: headers, log and done always (Envoy calls them
/// whether exported or not, and absent ones are skipped); a body or trailers
/// phase only if its callback is exported, so a filter without them adds no work
/// to bodies.
fn phases_of(module: &Module) -> Phases {
    let exported = |name: &str| module.exports().any(|e| e.name() == name);
    let mut p =
        Phases::REQUEST_HEADERS.0 | Phases::RESPONSE_HEADERS.0 | Phases::LOG.0 | Phases::DONE.0;
    for (i, (body, trailers)) in [
        (Phases::REQUEST_BODY, Phases::REQUEST_TRAILERS),
        (Phases::RESPONSE_BODY, Phases::RESPONSE_TRAILERS),
    ]
    .into_iter()
    .enumerate()
    {
        if exported(BODY_EXPORTS[i]) {
            p |= body.0;
        }
        if exported(TRAILERS_EXPORTS[i]) {
            p |= trailers.0;
        }
    }
    Phases(p)
}

impl HttpFilter for ProxyWasmFilter {
    fn name(&self) -> &str {
        &self.meta.name
    }

    fn phases(&self) -> Phases {
        self.phases
    }

    fn body_mode(&self, d: Direction) -> BodyMode {
        // Chunk by chunk; `Pause` (buffering) is done by the filter itself.
        let _ = d;
        BodyMode::Streamed
    }

    fn body_limit(&self) -> usize {
        self.meta.body_limit
    }

    fn pause_limit(&self) -> Option<Duration> {
        self.settings.pause_limit
    }

    fn host_failure(&self) {
        self.stats.failures.inc();
    }

    fn body_limit_exceeded(&self, d: Direction) {
        self.body_limit_exceeded[d.idx()].inc();
    }

    fn on_body(
        &self,
        worker: usize,
        x: &mut Exchange,
        d: Direction,
        end_of_stream: bool,
    ) -> Result<Verdict, String> {
        self.body_phase(worker, x, d, end_of_stream)
    }

    fn on_trailers(
        &self,
        worker: usize,
        x: &mut Exchange,
        d: Direction,
    ) -> Result<Verdict, String> {
        self.trailers_phase(worker, x, d)
    }

    fn fail_open(&self) -> bool {
        self.settings.fail_open
    }

    fn on_request_headers(
        &self,
        worker: usize,
        x: &mut Exchange,
        end_of_stream: bool,
    ) -> Result<Verdict, String> {
        self.headers_phase(worker, x, true, end_of_stream)
    }

    fn on_response_headers(
        &self,
        worker: usize,
        x: &mut Exchange,
        end_of_stream: bool,
    ) -> Result<Verdict, String> {
        self.headers_phase(worker, x, false, end_of_stream)
    }

    fn delivers_on_arrival(&self) -> bool {
        // Envoy runs the callbacks when the response arrives.
        true
    }

    fn sees_own_local_response(&self) -> bool {
        // Envoy encodes a local reply through the filter chain: the answering
        // context's `proxy_on_response_headers` (and body, trailers) run on it.
        true
    }

    fn on_callout_response(
        &self,
        worker: usize,
        x: &mut Exchange,
        id: u64,
        result: CalloutResult,
        paused: bool,
    ) -> Result<Verdict, String> {
        let held_in = if paused && (x.hold_body || x.hold_end) {
            held_phase(x)
        } else {
            None
        };
        let answer = if id & super::grpc::WAKE != 0 {
            let wake = u32::try_from(id & !super::grpc::WAKE)
                .map_err(|_| format!("callout id {id} is not a wake-up"))?;
            self.stream_wake(worker, x, wake, held_in, paused)
        } else {
            let token = u32::try_from(id).map_err(|_| format!("callout id {id} is not a token"))?;
            let answer = self.call_response(worker, Some(x), token, result, held_in, paused);
            let over = matches!(
                answer,
                Ok(Answer::Verdict(Verdict::Continue | Verdict::Respond(_)))
            );
            if paused && over {
                // Resumed or answered by the call: what the context's streams
                // sent meanwhile is delivered now, and they go on unheld.
                self.end_stream_wait(worker, x, true);
            }
            answer
        };
        let v = match answer {
            Ok(Answer::Verdict(v)) => v,
            // Only for a TCP connection's context.
            Ok(Answer::Streams(_)) => Verdict::Continue,
            Ok(Answer::Close) => {
                // Envoy's `resetStream`, whatever the failure policy: not a
                // failure (see `Chain::fail`).
                self.end_stream_wait(worker, x, false);
                x.reset = true;
                return Err(RESET.into());
            }
            Err(e) => {
                // Failed (the policy skips or fails the filter): no wait may
                // outlive it in the chain.
                self.end_stream_wait(worker, x, false);
                return Err(e);
            }
        };
        // Not paused: a resume or a pause means nothing (the chain logs a local
        // response it cannot use).
        Ok(match v {
            Verdict::Pause if !paused => Verdict::Continue,
            v => v,
        })
    }

    fn network(self: Arc<Self>) -> Option<Arc<dyn NetworkFilter>> {
        // Any proxy-wasm module may be one (as in Envoy, the module's root
        // context decides; a module without stream callbacks passes data on).
        Some(self)
    }

    fn on_log(&self, worker: usize, x: &mut Exchange) {
        let context = x.context;
        if x.first_call {
            // The exchange never reached this filter (one before it answered
            // from its request headers): its context is made now, as Envoy's
            // `Context::log` runs `onCreate` for a context whose headers never
            // came, then logs it. A failure there leaves no context to log.
            let _ = self.with_vm(worker, Phase::ReadOnly, Some(x), true, |_, _| Ok(Ok(())));
        }
        self.finish(worker, context, Some(x), true);
    }

    fn reads_body_sizes(&self) -> bool {
        // `request.size` and `response.size` without a `content-length`.
        true
    }

    fn instance_gone(&self, _worker: usize, context: u64) -> Option<InstanceGone> {
        VMS.with(|cell| {
            let live = cell
                .borrow()
                .get(&self.vm)
                .and_then(|s| s.live.as_ref())
                .filter(|live| live.contexts.contains_key(&(context, self.root)))
                .map(|live| live.alive.watch());
            Some(live.unwrap_or_else(InstanceGone::now))
        })
    }

    fn pause_abandoned(&self, worker: usize, x: &mut Exchange) {
        // As when a failure ends the pause: events held for it are dropped
        // (no guest code runs for a filter that just failed); the streams
        // stay open until the context ends, their later events reaching the
        // guest as for a context not paused.
        self.end_stream_wait(worker, x, false);
    }

    /// A plugin whose root context works from the start (a tick period, a
    /// shared queue, a callout or gRPC stream, from
    /// `proxy_on_vm_start`/`proxy_on_configure`: [`Self::starts_eagerly`])
    /// gets this worker's VM now, so that work goes on without traffic; the
    /// others wait for their first exchange (a VM costs its memory on every
    /// worker, and nothing would run in it before).
    fn start_on_worker(&self, worker: usize) {
        if !self.starts_eagerly {
            return;
        }
        let r = VMS.with(|cell| {
            let mut map = cell.borrow_mut();
            if !map.contains_key(&self.vm) {
                sweep(&mut map);
            }
            let slot = map.entry(self.vm).or_default();
            // Live already (an exchange, or a plugin sharing the VM, came
            // first), or backing off after a failure: the next exchange
            // retries then, as without this start.
            if slot.live.is_some() || slot.restarts.waiting() {
                return Ok(());
            }
            self.start_slot(slot, worker)?;
            // What `proxy_on_vm_start`/`proxy_on_configure` asked for (a
            // queue, a callout, a stream) starts now, not at the first call.
            let generation = slot.generation;
            if let Some(live) = slot.live.as_mut() {
                self.start_root_work(live, worker, generation);
            }
            Ok::<_, String>(())
        });
        if let Err(why) = r {
            tracing::warn!(
                plugin = &*self.meta.name,
                phase = "start",
                "plugin failure: {why}"
            );
        }
    }

    fn on_done(&self, worker: usize, context: u64, _detached: bool) {
        // Already finished by `on_log` unless the chain skipped it (a failure).
        // (proxy-wasm has no detach: `_detached` is always false.)
        self.finish(worker, context, None, true);
    }
}

/// A network callback's action: Continue and Pause as Envoy's
/// `Network::FilterStatus`; a `proxy_close_stream` during the call closes.
fn net_action(data: &mut PwState, a: i32, callback: &str) -> Result<NetVerdict, String> {
    if data.local.take().is_some() {
        return Err(format!(
            "called proxy_send_local_response from {callback}: a TCP connection has no HTTP \
             response to send"
        ));
    }
    if data.close {
        return Ok(NetVerdict::Close);
    }
    match a {
        action::CONTINUE => Ok(NetVerdict::Continue),
        action::PAUSE => Ok(NetVerdict::Pause),
        other => Err(format!(
            "returned action {other} from {callback}; this host supports Continue (0) and \
             Pause (1)"
        )),
    }
}

/// A TCP context `ctx` pauses (`Pause` from a connection or data callback,
/// or a call's callback that resumes nothing): as Envoy, another callback of
/// the VM may resume or close its connection (`proxy_continue_stream`,
/// `proxy_close_stream` after `proxy_set_effective_context`), so the chain
/// gets a wake-up for it ([`PwState::net_waits`]), to give to the chain
/// (`Exchange::wakes`). One serves every pause of the connection until it
/// fires: `None` if one is armed already.
fn net_pause(
    data: &mut PwState,
    ctx: u32,
) -> Option<(u64, tokio::sync::oneshot::Receiver<CalloutResult>)> {
    if data.net_waits.contains_key(&ctx) {
        return None;
    }
    let id = data.new_token();
    let (tx, rx) = tokio::sync::oneshot::channel();
    data.net_waits.insert(
        ctx,
        super::grpc::StreamWait {
            id,
            wake: Some(tx),
            held: std::collections::VecDeque::new(),
        },
    );
    Some((super::grpc::WAKE | u64::from(id), rx))
}

/// Whether a callback outside TCP context `ctx`'s connection closed it
/// (`proxy_close_stream` after `proxy_set_effective_context`) while it was
/// not paused: its connection closes at its next callback.
fn take_net_close(data: &mut PwState, ctx: u32) -> bool {
    !data.pending_close.is_empty() && data.pending_close.remove(&ctx)
}

/// The action of a TCP context's callback (`a`, from `callback`), with its
/// wake-up armed on a pause ([`net_pause`]).
fn net_called(data: &mut PwState, ctx: u32, a: i32, callback: &str) -> Result<NetVerdict, String> {
    let v = net_action(data, a, callback);
    if matches!(v, Ok(NetVerdict::Pause)) {
        if let Some(w) = net_pause(data, ctx) {
            data.x.wakes.push(w);
        }
    }
    v
}

impl ProxyWasmFilter {
    /// Wake-up `id` of connection `c`'s TCP context fired: what another
    /// callback asked of it outside its connection. `proxy_close_stream`
    /// closes; `proxy_continue_stream` resumes the directions it named
    /// (`DOWNSTREAM`: the new connection and downstream data; `UPSTREAM`:
    /// upstream data), the wake-up re-armed for the other one. No guest call:
    /// the asking callback has run. A wake-up given up (a later one replaced
    /// it) resumes nothing; one whose VM or context is gone fails the pause.
    fn net_wake(&self, c: &mut Exchange, id: u64) -> Result<NetVerdict, String> {
        let wake = u32::try_from(id & !super::grpc::WAKE)
            .map_err(|_| format!("callout id {id} is not a wake-up"))?;
        let got = self.live_vm(|live| {
            let ctx = *live.contexts.get(&(c.context, self.root))?;
            let data = live.store.data_mut();
            if data.net_waits.get(&ctx).is_none_or(|w| w.id != wake) {
                return Some(None);
            }
            data.net_waits.remove(&ctx);
            let close = take_net_close(data, ctx);
            let named = if data.pending_resume.is_empty() {
                0
            } else {
                data.pending_resume.remove(&ctx).unwrap_or(0)
            };
            let down = named & (1 << stream::DOWNSTREAM) != 0;
            let up = named & (1 << stream::UPSTREAM) != 0;
            let v = match (close, down, up) {
                (true, _, _) => NetVerdict::Close,
                (false, true, true) => NetVerdict::Continue,
                (false, true, false) => NetVerdict::Resume(Peer::Downstream),
                (false, false, true) => NetVerdict::Resume(Peer::Upstream),
                (false, false, false) => NetVerdict::Pause,
            };
            // The other direction may still be paused.
            let again = match v {
                NetVerdict::Pause | NetVerdict::Resume(_) => net_pause(data, ctx),
                _ => None,
            };
            Some(Some((v, again)))
        });
        match got {
            None => Err("the VM this connection's context was in failed".to_string()),
            Some(None) => Ok(NetVerdict::Pause),
            Some(Some((v, again))) => {
                c.wakes.extend(again);
                Ok(v)
            }
        }
    }
}

/// On TCP proxy listeners (docs/proxy-wasm.md, "TCP"): a stream context per
/// connection, created at `proxy_on_new_connection`; data in buffers 2 and 3.
/// Every `Pause` arms the connection's wake-up ([`net_pause`]), so another
/// callback of the VM may end it ([`ProxyWasmFilter::net_wake`]); the chain
/// bounds each pause by `limits.pause`.
impl NetworkFilter for ProxyWasmFilter {
    fn name(&self) -> &str {
        &self.meta.name
    }

    fn fail_open(&self) -> bool {
        self.settings.fail_open
    }

    fn buffer_limit(&self) -> usize {
        self.meta.body_limit
    }

    fn host_failure(&self) {
        self.stats.failures.inc();
    }

    fn held_in_callouts(&self) -> bool {
        true
    }

    fn buffer_limit_exceeded(&self, from: Peer) {
        let d = match from {
            Peer::Downstream => Direction::Request,
            Peer::Upstream => Direction::Response,
        };
        self.body_limit_exceeded[d.idx()].inc();
    }

    fn on_new_connection(&self, worker: usize, c: &mut Exchange) -> Result<NetVerdict, String> {
        self.stats.calls["new_connection"].inc();
        self.with_vm(worker, Phase::Connection, Some(c), true, |live, ctx| {
            let Some(f) = live.exports.new_connection.as_ref() else {
                return Ok(Ok(NetVerdict::Continue));
            };
            let a = f.call(&mut live.store, ctx as i32)?;
            Ok(net_called(
                live.store.data_mut(),
                ctx,
                a,
                "proxy_on_new_connection",
            ))
        })
    }

    fn on_data(
        &self,
        worker: usize,
        c: &mut Exchange,
        from: Peer,
        end_of_stream: bool,
    ) -> Result<NetVerdict, String> {
        let (d, label, callback) = match from {
            Peer::Downstream => (
                Direction::Request,
                "downstream_data",
                "proxy_on_downstream_data",
            ),
            Peer::Upstream => (
                Direction::Response,
                "upstream_data",
                "proxy_on_upstream_data",
            ),
        };
        self.stats.calls[label].inc();
        let len = c.bodies[d.idx()].as_ref().map_or(0, |b| b.len());
        let len = i32::try_from(len).unwrap_or(i32::MAX);
        self.with_vm(worker, Phase::Data(d), Some(c), false, |live, ctx| {
            if take_net_close(live.store.data_mut(), ctx) {
                return Ok(Ok(NetVerdict::Close));
            }
            let Some(f) = live.exports.data[d.idx()].as_ref() else {
                return Ok(Ok(NetVerdict::Continue));
            };
            let a = f.call(&mut live.store, (ctx as i32, len, b(end_of_stream)))?;
            Ok(net_called(live.store.data_mut(), ctx, a, callback))
        })
    }

    fn on_callout_response(
        &self,
        worker: usize,
        c: &mut Exchange,
        id: u64,
        result: CalloutResult,
    ) -> Result<NetVerdict, String> {
        if id & super::grpc::WAKE != 0 {
            return self.net_wake(c, id);
        }
        let token = u32::try_from(id).map_err(|_| format!("callout id {id} is not a token"))?;
        let closed = self.live_vm(|live| {
            let ctx = *live.contexts.get(&(c.context, self.root))?;
            take_net_close(live.store.data_mut(), ctx).then_some(())
        });
        if closed.is_some() {
            return Ok(NetVerdict::Close);
        }
        let v = self.net_call_response(worker, c, token, result)?;
        if v == NetVerdict::Pause {
            // Still paused: another callback may resume it.
            let armed = self.live_vm(|live| {
                let ctx = *live.contexts.get(&(c.context, self.root))?;
                net_pause(live.store.data_mut(), ctx)
            });
            c.wakes.extend(armed);
        }
        Ok(v)
    }

    fn pause_limit(&self) -> Option<Duration> {
        self.settings.pause_limit
    }

    fn pause_abandoned(&self, _worker: usize, c: &mut Exchange) {
        self.live_vm(|live| {
            let ctx = *live.contexts.get(&(c.context, self.root))?;
            let data = live.store.data_mut();
            data.net_waits.remove(&ctx);
            if !data.pending_resume.is_empty() {
                data.pending_resume.remove(&ctx);
            }
            Some(())
        });
    }

    fn on_close(&self, worker: usize, c: &mut Exchange, peer: Peer, remote: bool) {
        let label = match peer {
            Peer::Downstream => "downstream_close",
            Peer::Upstream => "upstream_close",
        };
        self.stats.calls[label].inc();
        let kind = if remote { peer::REMOTE } else { peer::LOCAL };
        let r = self.with_vm(worker, Phase::Connection, Some(c), false, |live, ctx| {
            if let Some(f) = live.exports.connection_close[peer.idx()].as_ref() {
                f.call(&mut live.store, (ctx as i32, kind))?;
            }
            Ok(Ok(()))
        });
        if let Err(e) = r {
            tracing::warn!(
                plugin = self.meta.name.as_ref(),
                "proxy_on_{label} failed: {e}"
            );
        }
    }

    fn on_done(&self, worker: usize, c: &mut Exchange) {
        let context = c.context;
        self.finish(worker, context, Some(c), false);
    }
}

impl ProxyWasmFilter {
    /// A call's callback for connection `c` (`proxy_on_http_call_response`,
    /// the gRPC callbacks) and what it resumes.
    fn net_call_response(
        &self,
        worker: usize,
        c: &mut Exchange,
        token: u32,
        result: CalloutResult,
    ) -> Result<NetVerdict, String> {
        match self.call_response(worker, Some(c), token, result, None, false)? {
            Answer::Close => Ok(NetVerdict::Close),
            Answer::Streams(named) => {
                // As Envoy's TCP context: DOWNSTREAM continues reading (the
                // new connection, downstream data) and the HTTP types do
                // nothing. UPSTREAM, which Envoy leaves unimplemented (it
                // cannot hold upstream data on a call), resumes upstream data.
                let down = named & (1 << stream::DOWNSTREAM) != 0;
                let up = named & (1 << stream::UPSTREAM) != 0;
                Ok(match (down, up) {
                    (true, true) => NetVerdict::Continue,
                    (true, false) => NetVerdict::Resume(Peer::Downstream),
                    (false, true) => NetVerdict::Resume(Peer::Upstream),
                    (false, false) => NetVerdict::Pause,
                })
            }
            Answer::Verdict(Verdict::Continue) => Ok(NetVerdict::Continue),
            Answer::Verdict(Verdict::Pause) => Ok(NetVerdict::Pause),
            Answer::Verdict(Verdict::Respond(_)) => Err(
                "called proxy_send_local_response from proxy_on_http_call_response: a TCP \
                 connection has no HTTP response to send"
                    .into(),
            ),
        }
    }
}

/// A unary gRPC call's result as Envoy reports it to a proxy-wasm filter: the
/// response message, or a status code and message (gRPC's HTTP-to-status
/// mapping for a non-200 answer; `DEADLINE_EXCEEDED`, `UNAVAILABLE` or
/// `RESOURCE_EXHAUSTED` for a callout that failed; `INTERNAL` for a malformed
/// answer).
fn grpc_outcome(result: &CalloutResult) -> Result<bytes::Bytes, (u32, String)> {
    use super::grpc::{callout_error_status, http_status, trailer_status};
    const INTERNAL: u32 = 13;
    let r = result.as_ref().map_err(|e| callout_error_status(*e))?;
    if r.status != http::StatusCode::OK {
        return Err(http_status(r.status));
    }
    // Trailers, or the headers of a trailers-only answer.
    let (code, message) = trailer_status(&r.trailers, Some(&r.headers));
    if code != 0 {
        return Err((code, message));
    }
    match r.body.as_ref() {
        [0, a, b, c, d, rest @ ..]
            if usize::try_from(u32::from_be_bytes([*a, *b, *c, *d])).ok() == Some(rest.len()) =>
        {
            Ok(r.body.slice(5..))
        }
        [1, ..] => Err((
            INTERNAL,
            "compressed gRPC responses are not supported".into(),
        )),
        _ => Err((
            INTERNAL,
            "the answer is not exactly one gRPC message".into(),
        )),
    }
}

/// The next free context id from `next` (which then points past it), marked
/// in use in `live`. Ids wrap after `u32::MAX` back to `first` (the first id
/// after the root contexts') and skip the ones still in use, so a context that
/// outlives four billion others (a long TCP connection, a paused exchange)
/// never shares its id with a new one.
fn allocate_context(next: &mut u32, first: u32, live: &mut FxHashSet<u32>) -> u32 {
    loop {
        let id = *next;
        *next = next.wrapping_add(1).max(first);
        // `insert` is the in-use check: one lookup on the common path.
        if live.insert(id) {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn context_ids_wrap_past_the_roots_and_skip_ids_in_use() {
        // Roots 1 and 2; contexts 3 and 5 are still live when the ids wrap.
        let mut live: FxHashSet<u32> = [1, 2, 3, 5].into_iter().collect();
        let mut next = u32::MAX - 1;
        let got: Vec<u32> = (0..4)
            .map(|_| allocate_context(&mut next, 3, &mut live))
            .collect();
        assert_eq!(got, [u32::MAX - 1, u32::MAX, 4, 6]);
        assert_eq!(next, 7);
        assert!(live.contains(&4) && live.contains(&6));
    }

    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn section(id: u8, body: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        leb(body.len(), out);
        out.extend_from_slice(body);
    }

    /// A core module exporting an empty `() -> ()` function under each name
    /// (the signatures do not matter to which phases are declared).
    fn module_exporting(names: &[&str]) -> Module {
        Module::new(engine::engine().unwrap(), module_bytes_exporting(names)).unwrap()
    }

    /// The bytes of [`module_exporting`]'s module.
    fn module_bytes_exporting(names: &[&str]) -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        section(1, &[1, 0x60, 0, 0], &mut m);
        let mut funcs = Vec::new();
        leb(names.len(), &mut funcs);
        funcs.extend(std::iter::repeat_n(0u8, names.len()));
        section(3, &funcs, &mut m);
        let mut exports = Vec::new();
        leb(names.len(), &mut exports);
        for (i, n) in names.iter().enumerate() {
            leb(n.len(), &mut exports);
            exports.extend_from_slice(n.as_bytes());
            exports.push(0);
            leb(i, &mut exports);
        }
        section(7, &exports, &mut m);
        let mut code = Vec::new();
        leb(names.len(), &mut code);
        for _ in names {
            code.extend_from_slice(&[2, 0, 0x0b]);
        }
        section(10, &code, &mut m);
        m
    }

    #[test]
    fn a_module_whose_memory_starts_over_limits_memory_is_told_which_limit() {
        // Was wasmtime's bare "cannot instantiate: memory minimum size of 300
        // pages exceeds memory limits", which names neither `limits.memory`
        // nor its value (every zig-linked filter: its 16 MiB stack starts it
        // at 257 pages, over the default 16 MiB).
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        section(1, &[1, 0x60, 0, 0], &mut m);
        section(3, &[1, 0], &mut m);
        // One memory, minimum 300 pages (18.75 MiB), no maximum.
        section(5, &[1, 0, 0xac, 0x02], &mut m);
        let marker = "proxy_abi_version_0_2_1";
        let mut exports = vec![1, u8::try_from(marker.len()).unwrap()];
        exports.extend_from_slice(marker.as_bytes());
        exports.extend([0, 0]);
        section(7, &exports, &mut m);
        section(10, &[1, 2, 0, 0x0b], &mut m);
        let path = std::path::Path::new("big.wasm");
        let module = crate::wasm::proxy_wasm::compile("big", path, &m).unwrap();
        let settings = |memory| Settings {
            cpu: Duration::from_secs(1),
            memory,
            fail_open: false,
            body_limit: 1 << 20,
            pause_limit: None,
            headers_stop_iteration: false,
            start_cpu: Duration::from_secs(1),
        };
        let load = |memory| {
            crate::wasm::proxy_wasm::load(
                &module,
                crate::wasm::proxy_wasm::Load {
                    name: "big",
                    root_id: "",
                    vm_id: "",
                    vm_config: Vec::new(),
                    plugin_config: Vec::new(),
                    clusters: Vec::new(),
                    module_sha256: "",
                },
                settings(memory),
                &crate::stats::Stats::new(),
                &mut Shares::default(),
            )
        };
        let e = load(16 << 20).err().unwrap().to_string();
        assert!(
            e.contains(
                "cannot instantiate: its linear memory starts at 18.8 MiB (300 pages of 64 \
                 KiB), over the plugin's `limits.memory` of 16MiB: raise `limits.memory` (at \
                 most 256MiB), or build the module to start smaller (its stack counts: \
                 zig's default is 16 MiB, `-Wl,-z,stack-size=65536` makes it 64 KiB)"
            ),
            "{e}"
        );
        // Under a cap it fits, instantiation goes on (to the missing
        // `proxy_on_context_create`): the memory is not blamed.
        let e = load(32 << 20).err().unwrap().to_string();
        assert!(!e.contains("limits.memory"), "{e}");
    }

    #[test]
    fn a_proxy_wasm_0_1_0_module_is_refused_naming_the_abi_and_the_fix() {
        // Was "not a proxy-wasm module (it exports neither …0_2_1 nor …0_2_0)".
        let m = module_bytes_exporting(&["proxy_abi_version_0_1_0", "proxy_on_request_headers"]);
        let e = crate::wasm::proxy_wasm::compile("old", std::path::Path::new("old.wasm"), &m)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "plugin `old`: old.wasm is built for proxy-wasm ABI 0.1.0, which is not supported \
             (this host implements 0.2.1 and 0.2.0); rebuild it with a proxy-wasm SDK \
             targeting 0.2.x"
        );
        // Neither marker: still "not a proxy-wasm module".
        let m = module_bytes_exporting(&["_start"]);
        let e = crate::wasm::proxy_wasm::compile("x", std::path::Path::new("x.wasm"), &m)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is a core Wasm module but not a proxy-wasm module"),
            "{e}"
        );
    }

    #[test]
    fn body_and_trailer_phases_only_when_exported() {
        let headers_only = Phases(
            Phases::REQUEST_HEADERS.0 | Phases::RESPONSE_HEADERS.0 | Phases::LOG.0 | Phases::DONE.0,
        );
        let m = module_exporting(&["proxy_abi_version_0_2_1", "proxy_on_request_headers"]);
        assert_eq!(phases_of(&m), headers_only);
        let m = module_exporting(&[
            "proxy_abi_version_0_2_1",
            "proxy_on_request_body",
            "proxy_on_response_trailers",
        ]);
        let p = phases_of(&m);
        assert!(p.contains(headers_only));
        assert!(p.contains(Phases::REQUEST_BODY));
        assert!(p.contains(Phases::RESPONSE_TRAILERS));
        assert!(!p.contains(Phases::RESPONSE_BODY));
        assert!(!p.contains(Phases::REQUEST_TRAILERS));
    }
}

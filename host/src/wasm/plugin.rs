//! A loaded Wasm plugin ([`WasmFilter`], an [`HttpFilter`]) and its instances:
//! one per worker (Envoy's VM-per-worker), created on the worker's thread —
//! when the config goes live there for a plugin that ticks, else at the
//! worker's first exchange — configured, and replaced after a failure with
//! backoff.
//!
//! Calls are synchronous (plain calls on the worker's stack, WASI included:
//! [`super::wasi`]) and bounded by the epoch deadline; a call that waits in a
//! WASI pollable is stopped at its wall-time bound instead
//! ([`super::wasi::poll_inline`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, StatusCode};
use legate_abi_rules::wasi;
// Keyed by host-made ids (plugin loads, exchange contexts): no hashing DoS to
// defend against, and these maps are touched on every call.
use rustc_hash::{FxHashMap, FxHashSet};
use wasmtime::component::{Component, Linker};
use wasmtime::{Store, Trap};

use super::bindings::exports::legate::filter::http_handler::HttpSetup;
use super::bindings::legate::filter::http as whttp;
use super::bindings::{Filter as Exports, FilterPre, HttpFilterKv as World};
use super::engine;
use super::host::{HostState, Part, Phase, PluginShared, PLUGIN_CONTEXT};
use super::slots::{InstanceCount, LiveIds, MemoryUse};
use crate::filter::{
    BodyMode, CalloutRequest, Direction, Exchange, HttpFilter, InstanceAlive, InstanceGone,
    LocalResponse, Phases, Verdict,
};
use crate::stats::{Counter, Gauge, Histogram, Stats};

/// The shortest tick interval a plugin may ask for (abi/README.md §7,
/// `legate_abi_rules::limits::MIN_TICK_MS`).
pub(crate) const MIN_TICK: Duration =
    Duration::from_millis(legate_abi_rules::limits::MIN_TICK_MS as u64);

/// Deadline of `configure` (abi/README.md §2).
pub(crate) const CONFIGURE_DEADLINE: Duration = Duration::from_secs(1);

/// How a plugin is run.
pub struct Settings {
    /// `configure`'s argument.
    pub config_json: String,
    /// Per-call deadline.
    pub cpu: Duration,
    /// Memory cap per instance.
    pub memory: usize,
    /// `fail: open`.
    pub fail_open: bool,
    /// KV namespaces granted (`capabilities.kv`).
    pub kv: Vec<String>,
    /// Clusters granted for callouts (`capabilities.clusters`).
    pub clusters: Vec<String>,
    /// The buffered body cap (`limits.body`).
    pub body_limit: usize,
    /// How long one pause may hold an exchange (`limits.pause`; `None`: no bound).
    pub pause_limit: Option<Duration>,
    /// The data files granted (`files:`), read at load.
    pub files: Arc<Files>,
}

/// A plugin's data files by name (`files:` in the config), as read at load.
pub type Files = HashMap<String, Arc<[u8]>>;

/// `legate_plugin_calls_total` by phase, in [`PluginStats::PHASES`] order,
/// indexed by the phase's label.
pub(crate) struct PhaseCounters(Vec<Counter>);

impl std::ops::Index<&str> for PhaseCounters {
    type Output = Counter;

    /// The counter of `phase`, which must be one of [`PluginStats::PHASES`] (a
    /// host bug otherwise, as with a map). The search runs over the constant
    /// list, so for a literal label the compiler folds it into the index (a
    /// label picked at run time is a search of at most 17 names).
    #[inline]
    fn index(&self, phase: &str) -> &Counter {
        match PluginStats::PHASES.iter().position(|p| *p == phase) {
            Some(i) => &self.0[i],
            None => panic!("no call counter for phase `{phase}`"),
        }
    }
}

/// Per-plugin counters on `/stats` (shared with proxy-wasm plugins).
pub(crate) struct PluginStats {
    pub(crate) calls: PhaseCounters,
    pub(crate) failures: Counter,
    pub(crate) traps: Counter,
    pub(crate) timeouts: Counter,
    pub(crate) memory_exceeded: Counter,
    pub(crate) restarts: Counter,
    pub(crate) callout_failures: Counter,
    pub(crate) callout_timeouts: Counter,
    pub(crate) duration: Histogram,
    pub(crate) instances: Gauge,
}

impl PluginStats {
    /// Counts a callout's outcome (failures, timeouts among them).
    pub(crate) fn count_callout(&self, result: &crate::filter::CalloutResult) {
        if let Err(e) = result {
            self.callout_failures.inc();
            if *e == crate::filter::CalloutError::Timeout {
                self.callout_timeouts.inc();
            }
        }
    }

    /// Counts a call that killed its instance (a trap, the CPU deadline or
    /// the memory cap) as a failure of its kind; returns what happened.
    pub(crate) fn count_fatal(&self, e: &wasmtime::Error, cpu: Duration) -> String {
        let (class, text) = describe(e, cpu);
        match class {
            "timeout" => self.timeouts.inc(),
            "memory" => self.memory_exceeded.inc(),
            _ => self.traps.inc(),
        }
        self.failures.inc();
        text
    }

    /// The phases calls are counted by, the per-request ones first.
    const PHASES: [&'static str; 18] = [
        "request_headers",
        "response_headers",
        "request_body",
        "response_body",
        "request_trailers",
        "response_trailers",
        "log",
        "done",
        "callout_response",
        "kv_response",
        "configure",
        "tick",
        "tick_callout_response",
        // Network (L4) filters on TCP listeners.
        "new_connection",
        "downstream_data",
        "upstream_data",
        "downstream_close",
        "upstream_close",
    ];

    pub(crate) fn new(stats: &Stats, name: &str) -> Self {
        let l = [("plugin", name)];
        let calls = Self::PHASES
            .into_iter()
            .map(|p| {
                stats.counter(
                    "legate_plugin_calls_total",
                    "Calls into a plugin, by phase.",
                    &[("plugin", name), ("phase", p)],
                )
            })
            .collect();
        PluginStats {
            calls: PhaseCounters(calls),
            failures: stats.counter(
                "legate_plugin_failures_total",
                "Failed plugin calls (traps, deadlines, memory cap, invalid results, no instance to run on).",
                &l,
            ),
            traps: stats.counter(
                "legate_plugin_traps_total",
                "Plugin calls that trapped (a guest panic or other trap), excluding deadlines and the memory cap.",
                &l,
            ),
            timeouts: stats.counter(
                "legate_plugin_timeouts_total",
                "Plugin calls stopped at their CPU deadline.",
                &l,
            ),
            memory_exceeded: stats.counter(
                "legate_plugin_memory_exceeded_total",
                "Plugin calls that failed at the memory cap (a trap after a refused memory growth).",
                &l,
            ),
            restarts: stats.counter(
                "legate_plugin_instance_restarts_total",
                "Instances created to replace one that failed.",
                &l,
            ),
            callout_failures: stats.counter(
                "legate_plugin_callout_failures_total",
                "Callouts of a plugin that got no response (timeouts included).",
                &l,
            ),
            callout_timeouts: stats.counter(
                "legate_plugin_callout_timeouts_total",
                "Callouts of a plugin that timed out.",
                &l,
            ),
            duration: stats.histogram(
                "legate_plugin_call_duration_seconds",
                "Time spent in plugin calls.",
                &l,
            ),
            instances: stats.gauge(
                "legate_plugin_instances",
                "Live plugin instances (one per worker: from the config's start for plugins that tick, else once used).",
                &l,
            )
        }
    }
}

/// A plugin loaded and configured: what every worker instantiates from.
pub struct WasmFilter {
    /// Unique per load, so per-worker instances of an older config are never reused.
    id: u64,
    /// The declared default body modes ([`Direction::idx`]).
    body_modes: [BodyMode; 2],
    /// `legate_plugin_body_limit_exceeded_total` by direction.
    body_limit_exceeded: [Counter; 2],
    shared: Arc<PluginShared>,
    pre: FilterPre<HostState>,
    settings: Settings,
    phases: Phases,
    stats: PluginStats,
    /// `tick-interval-ms` from the setup, if non-zero.
    tick: Option<Duration>,
    /// This filter, for the per-instance tick tasks (set by [`WasmFilter::arm`]);
    /// weak so a removed plugin's ticks stop.
    me: OnceLock<Weak<WasmFilter>>,
    /// Instances of this filter live on workers.
    instances: InstanceCount,
    /// The request headers `configure` declared with
    /// `sanitize-request-headers`.
    sanitize: Box<[http::HeaderName]>,
}

/// Ids of filters not dropped yet. A reload replaces filters while workers hold
/// their instances in [`INSTANCES`]; a worker frees the instances of dropped
/// filters before it instantiates a new one, so reloads do not exhaust the pool.
static LIVE: LiveIds = LiveIds::new();

impl Drop for WasmFilter {
    fn drop(&mut self) {
        LIVE.remove(self.id);
    }
}

/// One live instance on a worker.
struct Live {
    store: Store<HostState>,
    bindings: Exports,
    /// Contexts whose request started on this instance (a context from a replaced
    /// instance gets the failure policy without a call).
    contexts: FxHashSet<u64>,
    /// Contexts paused, with the phase they paused in and whether it was an
    /// end-of-stream body call (its write window, trailers included, stays open
    /// for their `on-callout-response`).
    paused: FxHashMap<u64, (Phase, bool)>,
    /// Dropped with the instance: wakes the exchanges paused in it
    /// ([`HttpFilter::instance_gone`]).
    alive: InstanceAlive,
}

/// A worker's slot for one plugin.
type Slot = super::slots::Slot<Live>;

thread_local! {
    /// This worker's instances, by `WasmFilter::id`.
    static INSTANCES: RefCell<FxHashMap<u64, Slot>> = RefCell::default();
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The linker: WASI (nothing granted) and the plugin ABI.
fn linker() -> anyhow::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine::engine()?);
    super::wasi::add_to_linker(&mut linker).map_err(|e| anyhow::anyhow!("linking WASI: {e}"))?;
    World::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
        .map_err(|e| anyhow::anyhow!("linking the plugin ABI: {e}"))?;
    Ok(linker)
}

fn phases_of(setup: &HttpSetup) -> Phases {
    use whttp::Phases as P;
    let p = setup.phases;
    let mut out = 0u8;
    for (flag, bit) in [
        (P::REQUEST_HEADERS, Phases::REQUEST_HEADERS),
        (P::REQUEST_BODY, Phases::REQUEST_BODY),
        (P::REQUEST_TRAILERS, Phases::REQUEST_TRAILERS),
        (P::RESPONSE_HEADERS, Phases::RESPONSE_HEADERS),
        (P::RESPONSE_BODY, Phases::RESPONSE_BODY),
        (P::RESPONSE_TRAILERS, Phases::RESPONSE_TRAILERS),
        (P::LOG, Phases::LOG),
        (P::DONE, Phases::DONE),
    ] {
        if p.contains(flag) {
            out |= bit.0;
        }
    }
    Phases(out)
}

/// The verdict for a phase's (or a callout response's) action: `pause` needs an
/// outstanding callout (abi/README.md §3.3) and, from a body or trailers phase, a
/// message the host holds (buffered mode); it pins the phase's write window.
fn verdict(
    live: &mut Live,
    context: u64,
    phase: Phase,
    action: whttp::Action,
) -> Result<Verdict, String> {
    match action {
        whttp::Action::Continue => {
            live.paused.remove(&context);
            Ok(Verdict::Continue)
        }
        whttp::Action::Pause => {
            if !live.store.data().has_outstanding(context) {
                live.paused.remove(&context);
                return Err("returned `pause` with no outstanding callout".to_string());
            }
            // A body or trailers call may pause only where the chain can hold
            // the message: buffered, or a streamed body it stops reading.
            let body_phase = matches!(
                phase,
                Phase::RequestBody
                    | Phase::RequestTrailers
                    | Phase::ResponseBody
                    | Phase::ResponseTrailers
            );
            let x = &live.store.data().x;
            if body_phase && !x.hold_body && !x.hold_stream {
                live.paused.remove(&context);
                return Err(crate::filter::UNHELD_PAUSE.to_string());
            }
            let body_end = live.store.data().body_end;
            live.paused.insert(context, (phase, body_end));
            Ok(Verdict::Pause)
        }
        whttp::Action::Respond(lr) => {
            live.paused.remove(&context);
            local_response(lr).map(Verdict::Respond)
        }
    }
}

/// A callout result as the guest sees it.
pub(crate) fn guest_result(
    r: crate::filter::CalloutResult,
) -> Result<
    super::bindings::legate::filter::callout::CalloutResponse,
    super::bindings::legate::filter::types::Error,
> {
    use super::bindings::legate::filter::types::Error as E;
    use crate::filter::CalloutError;
    match r {
        Ok(resp) => Ok(super::bindings::legate::filter::callout::CalloutResponse {
            status: resp.status.as_u16(),
            headers: resp
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
            body: resp.body.to_vec(),
        }),
        Err(CalloutError::Timeout) => Err(E::Timeout),
        Err(CalloutError::Unavailable) => Err(E::Unavailable),
        Err(CalloutError::LimitExceeded) => Err(E::LimitExceeded),
    }
}

/// The cap on live component handles of each new store; 0 = wasmtime's default
/// (100 000).
static MAX_HANDLES: AtomicUsize = AtomicUsize::new(0);

/// Lowers the cap on live component handles of every instance created from now
/// on in this process (wasmtime's default is 100 000), so a test can show in a
/// few hundred requests that phase calls do not leak handles — a leak that used
/// to trap an instance only every few ten thousand requests.
#[doc(hidden)]
pub fn set_max_component_handles_for_tests(limit: usize) {
    MAX_HANDLES.store(limit, Relaxed);
}

fn body_mode(m: super::bindings::legate::filter::types::BodyMode) -> BodyMode {
    use super::bindings::legate::filter::types::BodyMode as B;
    match m {
        B::Streamed => BodyMode::Streamed,
        B::Buffered => BodyMode::Buffered,
        B::Skipped => BodyMode::Skipped,
    }
}

pub(crate) fn describe(e: &wasmtime::Error, cpu: Duration) -> (&'static str, String) {
    if let Some(t) = e.downcast_ref::<Trap>() {
        if *t == Trap::Interrupt {
            if super::engine::was_wall_bound_hit() {
                // Not the CPU it used: the call waited, or its thread was
                // kept off a core (a loaded machine), past the backstop.
                let wall = cpu.saturating_mul(super::engine::WALL_FACTOR);
                return (
                    "timeout",
                    format!(
                        "call exceeded its wall-clock bound ({wall:?}, {}x its CPU deadline of \
                         {cpu:?}): it waited, or its thread did not get a core",
                        super::engine::WALL_FACTOR
                    ),
                );
            }
            return (
                "timeout",
                format!("call exceeded its CPU deadline ({cpu:?})"),
            );
        }
    }
    // The backtrace (a line per frame, mostly `<unknown>!<wasm function N>`
    // for a release guest) is for debugging, not for the one line of the
    // failure.
    tracing::debug!("a plugin call failed, in full: {e:#}");
    let mut text = error_text(e);
    // What the guest said before it trapped (a Rust panic's message).
    if let Some(reason) = super::stdio::call_failure_reason() {
        text = format!("{reason} ({text})");
    }
    if super::engine::was_memory_refused() {
        return (
            "memory",
            format!("memory cap exceeded (a memory growth was refused, then): {text}"),
        );
    }
    if text.contains("memory") && text.contains("limit") {
        return ("memory", format!("memory cap exceeded: {text}"));
    }
    ("trap", format!("trap: {text}"))
}

/// The `legate:filter` version this host implements (abi/wit): components
/// built against `0.1.0` up to it link; see abi/README.md §12.
pub(crate) const ABI_VERSION: [u64; 3] = [0, 1, 3];

/// The version of a `legate:filter` interface name (`legate:filter/types@0.2.0`
/// gives `[0, 2, 0]`); `None` for other names and unversioned ones.
fn abi_version_of(item: &str) -> Option<[u64; 3]> {
    let (_, version) = item.strip_prefix("legate:filter/")?.split_once('@')?;
    let mut parts = version.split(['.', '-', '+']).map(str::parse::<u64>);
    Some([
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    ])
}

/// The `legate:filter` interfaces `component` imports and exports, each with
/// whether it is an import and its version.
fn abi_items(component: &Component) -> Vec<(bool, String, [u64; 3])> {
    let engine = component.engine();
    let ty = component.component_type();
    let imports = ty.imports(engine).map(|(n, _)| (true, n));
    let exports = ty.exports(engine).map(|(n, _)| (false, n));
    imports
        .chain(exports)
        .filter_map(|(import, n)| Some((import, n.to_string(), abi_version_of(n)?)))
        .collect()
}

fn host_abi() -> String {
    let [major, minor, patch] = ABI_VERSION;
    format!("{major}.{minor}.x ({major}.{minor}.0–{major}.{minor}.{patch})")
}

/// The first WASI interface `component` imports that this host does not link
/// (abi/README.md §10: `legate_abi_rules::wasi::PROVIDED`), e.g.
/// `wasi:http/types@0.2.10`, which componentize-js and other toolchains import
/// by default.
fn unprovided_wasi(component: &Component) -> Option<String> {
    let engine = component.engine();
    component
        .component_type()
        .imports(engine)
        .map(|(n, _)| n)
        .find(|n| wasi::is_wasi(n) && !wasi::is_provided(n))
        .map(str::to_string)
}

/// What a failed link says, after `plugin \`NAME\`: `: why, in a plugin
/// author's terms, then the linker's own text (`linker`). `unprovided` is
/// the WASI interface the component imports and the host does not provide
/// ([`unprovided_wasi`]); `newer` is the note for a component built against
/// a later 0.1 than this host.
fn link_failure(linker: &str, unprovided: Option<&str>, newer: &str) -> String {
    let Some(item) = unprovided else {
        return format!("the component does not fit this host: {linker}{newer}");
    };
    let hint = if item.starts_with("wasi:http/") {
        "filters reach upstreams with `callout`; for componentize-js build with \
         `-d http -d fetch-event`"
    } else {
        "a filter reaches the outside through the `legate:filter` imports (`callout`, \
         `kv`, `log`, …)"
    };
    format!(
        "the component imports `{item}`, which Legate does not provide (abi/README.md \
         §10): {hint} (the linker: {linker}){newer}"
    )
}

/// Links `component` with `link` (the `instantiate_pre` of the world's
/// linker), first checking it is built against this host's `legate:filter`
/// major version (for `0.x`, the minor one): a component of another one
/// (`0.2.0`) is one line naming both versions and the fix, instead of the
/// linker's first unmatched interface. A link failure of a component built
/// against a later 0.1 than this host names the host's version (it may use
/// a function added since); one of a component importing a WASI interface
/// the host does not provide (`wasi:http`) names it first.
pub(crate) fn link<T>(
    name: &str,
    component: &Component,
    link: impl FnOnce(&Component) -> wasmtime::Result<T>,
) -> anyhow::Result<T> {
    let items = abi_items(component);
    let [major, minor, patch] = ABI_VERSION;
    if let Some((import, item, [a, b, c])) = items
        .iter()
        .find(|(_, _, v)| v[0] != major || v[1] != minor)
    {
        let how = if *import { "imports" } else { "exports" };
        anyhow::bail!(
            "plugin `{name}`: the component is built against legate:filter@{a}.{b}.{c} (it \
             {how} `{item}`); this host implements {}: regenerate its bindings from abi/wit \
             (legate:filter@{major}.{minor}.x), or rebuild it with a legate-sdk for \
             {major}.{minor}",
            host_abi()
        );
    }
    link(component).map_err(|e| {
        let newest = items.iter().map(|(_, _, v)| v[2]).max().unwrap_or(0);
        let newer = if newest > patch {
            format!(
                " (it is built against legate:filter@{major}.{minor}.{newest}, and uses \
                 something added after {major}.{minor}.{patch}, which this host implements: \
                 upgrade Legate, or rebuild it against legate:filter@{major}.{minor}.{patch} \
                 (its abi/wit, or a legate-sdk for {major}.{minor}.{patch}))"
            )
        } else {
            String::new()
        };
        let why = link_failure(
            &format!("{e:#}"),
            unprovided_wasi(component).as_deref(),
            &newer,
        );
        anyhow::anyhow!("plugin `{name}`: {why}")
    })
}

/// The error for a component that does not export `interface` (the handler
/// of its world, `http-handler` or `network-handler`): what it exports
/// instead and how to build it as a filter. One that exports the interface
/// in another shape gets the linker's reason.
pub(crate) fn unexported(
    name: &str,
    component: &Component,
    interface: &str,
    e: &wasmtime::Error,
) -> anyhow::Error {
    let want = format!("legate:filter/{interface}@0.1.x");
    let exports: Vec<String> = component
        .component_type()
        .exports(component.engine())
        .map(|(n, _)| format!("`{n}`"))
        .collect();
    let ours = format!("legate:filter/{interface}");
    if exports.iter().any(|n| n.contains(&ours)) {
        return anyhow::anyhow!("plugin `{name}`: the component does not export `{want}`: {e:#}");
    }
    let has = if exports.is_empty() {
        "it exports nothing".to_string()
    } else {
        format!("it exports {}", exports.join(", "))
    };
    // The likeliest mix-up: a component built for a wasi:http runtime.
    let what = if exports
        .iter()
        .any(|n| n.contains("wasi:http/incoming-handler"))
    {
        " (a wasi:http component, as Spin or wasmCloud run, not a filter)"
    } else {
        ""
    };
    let world = interface.replace("-handler", "-filter");
    anyhow::anyhow!(
        "plugin `{name}`: the component does not export `{want}`: {has}{what}; build it for \
         world `{world}` of abi/wit/worlds.wit (a Rust crate on legate-sdk calls \
         `legate_sdk::export!(YourFilter)`)"
    )
}

/// ` (KV namespace `x` is not granted …: add it to …)` after a failed
/// `configure` that was denied a KV namespace or cluster: the guest's error
/// may only say `denied`.
pub(crate) fn denial_hint(hint: Option<String>) -> String {
    hint.map(|h| format!(" ({h})")).unwrap_or_default()
}

/// A failed call's error as one line, without the wasm backtrace wasmtime
/// adds as its context: the trap's kind (`wasm \`unreachable\` instruction
/// executed`), or a host error's own chain.
fn error_text(e: &wasmtime::Error) -> String {
    let text = if let Some(t) = e.downcast_ref::<Trap>() {
        let t = t.to_string();
        t.strip_prefix("wasm trap: ").unwrap_or(&t).to_string()
    } else {
        let chain: Vec<String> = e
            .chain()
            .map(ToString::to_string)
            .filter(|c| !c.starts_with("error while executing at wasm backtrace"))
            .collect();
        chain.join(": ")
    };
    legate_abi_rules::log::one_line(&text, 4096)
}

impl WasmFilter {
    /// Compiles, links and configures a plugin once (on the calling thread) to check
    /// it: a bad module, a missing import, a `configure` error or an unsupported
    /// feature is an error naming the plugin.
    pub fn load(
        name: &str,
        component: &Component,
        settings: Settings,
        stats: &Arc<Stats>,
    ) -> anyhow::Result<Self> {
        let linker = linker()?;
        let pre = link(name, component, |c| linker.instantiate_pre(c))?;
        let pre =
            FilterPre::new(pre).map_err(|e| unexported(name, component, "http-handler", &e))?;
        let mut shared = PluginShared::new(name, stats.clone(), &settings.kv, &settings.clusters);
        shared.body_limit = settings.body_limit;
        shared.files = settings.files.clone();
        let shared = Arc::new(shared);
        let body_limit_exceeded = ["request", "response"].map(|d| {
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
        let mut f = WasmFilter {
            id,
            body_modes: [BodyMode::Skipped; 2],
            body_limit_exceeded,
            shared,
            pre,
            settings,
            phases: Phases::default(),
            stats: plugin_stats,
            tick: None,
            me: OnceLock::new(),
            instances,
            sanitize: Box::default(),
        };
        let (mut live, setup) = f
            .instantiate(u32::MAX, false)
            .map_err(|e| anyhow::anyhow!("plugin `{name}`: {e}"))?;
        // The checking instance's declaration stands for every worker's: each
        // is configured with the same config.
        f.sanitize = std::mem::take(&mut live.store.data_mut().sanitize).into();
        drop(live);
        f.phases = phases_of(&setup);
        f.body_modes = [
            body_mode(setup.request_body_mode),
            body_mode(setup.response_body_mode),
        ];
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
        Ok(f)
    }

    /// Lets the filter start tick tasks for its instances (it needs an `Arc` of
    /// itself); call once after wrapping it in an `Arc`.
    pub fn arm(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Calls `on-tick` on this worker's instance every interval while that instance
    /// (generation `generation`) is live and the filter is loaded. Runs on the
    /// worker's `LocalSet`, so a tick never overlaps another call into the instance.
    async fn tick_loop(me: Weak<WasmFilter>, worker: usize, every: Duration, generation: u64) {
        let mut iv = super::slots::tick_interval(every).await;
        loop {
            iv.tick().await;
            let Some(f) = me.upgrade() else {
                // A reload dropped the filter: free its instance now rather than
                // at this worker's next new slot.
                INSTANCES.with(|cell| LIVE.sweep(&mut cell.borrow_mut()));
                return;
            };
            if !f.is_current(generation) {
                break;
            }
            f.stats.calls["tick"].inc();
            let r = f.with_instance(worker, Phase::Tick, None, false, |live| {
                let r = live
                    .bindings
                    .legate_filter_http_handler()
                    .call_on_tick(&mut live.store);
                r.map(|()| {
                    live.store.data_mut().start_tick_callouts(|req| {
                        Self::tick_callout(me.clone(), worker, generation, req)
                    });
                    Ok(())
                })
            });
            if let Err(e) = r {
                tracing::warn!(plugin = f.name(), "on-tick failed: {e}");
                if !f.is_current(generation) {
                    break;
                }
            }
        }
        // The instance died (a trap, in a tick or in an exchange).
        Self::replace_dead(&me, worker).await;
    }

    /// Whether this worker's instance is the live one of `generation` (a task
    /// started for an older instance must not call into its successor).
    fn is_current(&self, generation: u64) -> bool {
        INSTANCES.with(|cell| {
            cell.borrow()
                .get(&self.id)
                .is_some_and(|s| s.live.is_some() && s.generation == generation)
        })
    }

    /// Starts a new instance (and tick task) on this worker for the ticking
    /// filter whose instance died, once the restart backoff allows.
    async fn replace_dead(me: &Weak<WasmFilter>, worker: usize) {
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
        me: Weak<WasmFilter>,
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
        let r = f.with_instance(worker, Phase::Tick, None, false, |live| {
            let r = live
                .bindings
                .legate_filter_http_handler()
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
                Ok(())
            })
        });
        if let Err(e) = r {
            tracing::warn!(plugin = f.name(), "on-tick-callout-response failed: {e}");
        }
    }

    /// Delivers callout or KV call `id`'s reply to the guest (`call`, counted
    /// under `stat`) unless it was cancelled. Paused, the paused phase's write
    /// window stays open and the action resumes, answers or keeps waiting; not
    /// paused, only a local response means something.
    fn reply(
        &self,
        worker: usize,
        x: &mut Exchange,
        id: u64,
        paused: bool,
        stat: &str,
        call: impl FnOnce(
            &mut Live,
            u64,
            wasmtime::component::Resource<super::host::ExchangeRes>,
        ) -> wasmtime::Result<whttp::Action>,
    ) -> Result<Verdict, String> {
        let context = x.context;
        let idle = if paused {
            Verdict::Pause
        } else {
            Verdict::Continue
        };
        // Cancelled (or freed with its context): not delivered, no call.
        let live_outstanding = INSTANCES.with(|cell| {
            cell.borrow_mut()
                .get_mut(&self.id)
                .and_then(|s| s.live.as_mut())
                .is_some_and(|live| live.store.data_mut().take_outstanding(context, id))
        });
        if !live_outstanding {
            return Ok(idle);
        }
        self.stats.calls[stat].inc();
        self.with_instance(worker, Phase::Callout, Some(x), false, |live| {
            let (phase, body_end) = if paused {
                live.paused
                    .get(&context)
                    .copied()
                    .unwrap_or((Phase::Callout, false))
            } else {
                (Phase::Callout, false)
            };
            live.store.data_mut().phase = phase;
            live.store.data_mut().body_end = body_end;
            let xr = live.store.data_mut().lend_exchange(context)?;
            let action = call(live, context, xr);
            let v = action.map(|action| {
                if paused {
                    verdict(live, context, phase, action)
                } else {
                    // Not paused: `continue`/`pause` mean nothing to do.
                    match action {
                        whttp::Action::Respond(lr) => local_response(lr).map(Verdict::Respond),
                        _ => Ok(Verdict::Continue),
                    }
                }
            });
            live.store.data_mut().body_end = false;
            v
        })
    }

    /// A new configured instance. `Err` carries the plugin's own message for a
    /// `configure` error.
    fn instantiate(&self, worker: u32, track: bool) -> Result<(Live, HttpSetup), String> {
        let mut state = HostState::new(self.shared.clone(), worker, self.settings.memory);
        if track {
            state.memory = MemoryUse::tracked(&self.shared.stats, &self.shared.name, worker);
        }
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
        match MAX_HANDLES.load(Relaxed) {
            0 => {}
            n => store.set_max_component_handles(n),
        }
        engine::install(&mut store, CONFIGURE_DEADLINE);
        // Off the request path: a guest may wait in WASI here (see
        // `engine::with_timers`).
        let (bindings, r) = engine::with_timers(|| {
            let bindings = self
                .pre
                .instantiate(&mut store)
                .map_err(|e| engine::instantiate_error(&e, store.data().refused_memory))?;
            store.data_mut().kv_replies = bindings.legate_filter_kv_handler().is_some();
            self.stats.calls["configure"].inc();
            store.data_mut().phase = Phase::Configure;
            let r = bindings
                .legate_filter_http_handler()
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
                        contexts: FxHashSet::default(),
                        paused: FxHashMap::default(),
                        alive: InstanceAlive::new(),
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

    /// Creates this worker's instance in `slot`, with its tick task if the plugin
    /// ticks; a failure starts the slot's restart backoff.
    fn start_instance(&self, slot: &mut Slot, worker: usize) -> Result<(), String> {
        let w = u32::try_from(worker).unwrap_or(u32::MAX);
        let made = self.instantiate(w, true).map(|(live, _)| live);
        slot.start(made, &self.stats.restarts, &self.instances, |generation| {
            if let (Some(every), Some(me)) = (self.tick, self.me.get()) {
                tokio::task::spawn_local(Self::tick_loop(me.clone(), worker, every, generation));
            }
        })
    }

    /// Runs `call` on this worker's instance (creating it if needed) with `x` swapped
    /// into the store. A trap drops the instance.
    fn with_instance<R>(
        &self,
        worker: usize,
        phase: Phase,
        x: Option<&mut Exchange>,
        new_context: bool,
        call: impl FnOnce(&mut Live) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, String> {
        INSTANCES.with(|cell| {
            let mut map = cell.borrow_mut();
            if !map.contains_key(&self.id) {
                LIVE.sweep(&mut map);
            }
            let slot = map.entry(self.id).or_default();
            let context = x.as_ref().map(|x| x.context);
            if slot.live.is_none() {
                if !new_context {
                    return Err("the instance this exchange started on failed".to_string());
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
            if let Some(c) = context {
                if new_context {
                    live.contexts.insert(c);
                } else if !live.contexts.contains(&c) {
                    return Err("the instance this exchange started on failed".to_string());
                }
            }
            let data = live.store.data_mut();
            data.phase = phase;
            data.in_exchange = x.is_some();
            let mut x = x;
            if let Some(x) = x.as_deref_mut() {
                std::mem::swap(x, &mut data.x);
            }
            let started = engine::arm(&mut live.store, self.settings.cpu);
            let result = call(live);
            self.stats.duration.observe(started.elapsed());
            let data = live.store.data_mut();
            if let Some(x) = x {
                std::mem::swap(x, &mut data.x);
            }
            data.in_exchange = false;
            match result {
                Ok(Ok(r)) => Ok(r),
                // The guest returned something invalid: the instance is kept.
                Ok(Err(invalid)) => {
                    self.stats.failures.inc();
                    Err(invalid)
                }
                Err(e) => {
                    let why = self.stats.count_fatal(&e, self.settings.cpu);
                    // The instance is dead: wasmtime does not re-enter a trapped
                    // component instance, and its state may be inconsistent anyway.
                    slot.live = None;
                    self.instances.ended();
                    slot.restarts.failed();
                    Err(why)
                }
            }
        })
    }

    fn phase_call(
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
        let context = x.context;
        let first = x.first_call;
        self.with_instance(worker, phase, Some(x), first, |live| {
            let data = live.store.data_mut();
            let xr = data.lend_exchange(context)?;
            let part = if request {
                Part::Request
            } else {
                Part::Response
            };
            let hr = data.lend_headers(context, part)?;
            let h = live.bindings.legate_filter_http_handler();
            let action = if request {
                h.call_on_request_headers(&mut live.store, context, xr, hr, end_of_stream)
            } else {
                h.call_on_response_headers(&mut live.store, context, xr, hr, end_of_stream)
            }?;
            Ok(verdict(live, context, phase, action))
        })
    }

    /// `on-request-body` / `on-response-body` over `x.bodies[d]`.
    fn body_call(
        &self,
        worker: usize,
        x: &mut Exchange,
        d: Direction,
        end_of_stream: bool,
    ) -> Result<Verdict, String> {
        let (phase, label) = match d {
            Direction::Request => (Phase::RequestBody, "request_body"),
            Direction::Response => (Phase::ResponseBody, "response_body"),
        };
        self.stats.calls[label].inc();
        let (context, first) = (x.context, x.first_call);
        self.with_instance(worker, phase, Some(x), first, |live| {
            let data = live.store.data_mut();
            data.body_end = end_of_stream;
            let xr = data.lend_exchange(context)?;
            let br = data.lend_buffer(context, d)?;
            let h = live.bindings.legate_filter_http_handler();
            let action = match d {
                Direction::Request => {
                    h.call_on_request_body(&mut live.store, context, xr, br, end_of_stream)
                }
                Direction::Response => {
                    h.call_on_response_body(&mut live.store, context, xr, br, end_of_stream)
                }
            };
            let v = action.map(|a| verdict(live, context, phase, a));
            live.store.data_mut().body_end = false;
            v
        })
    }

    /// `on-request-trailers` / `on-response-trailers` over `x.trailers[d]`.
    fn trailers_call(
        &self,
        worker: usize,
        x: &mut Exchange,
        d: Direction,
    ) -> Result<Verdict, String> {
        let (phase, label, part) = match d {
            Direction::Request => (
                Phase::RequestTrailers,
                "request_trailers",
                Part::RequestTrailers,
            ),
            Direction::Response => (
                Phase::ResponseTrailers,
                "response_trailers",
                Part::ResponseTrailers,
            ),
        };
        self.stats.calls[label].inc();
        let (context, first) = (x.context, x.first_call);
        self.with_instance(worker, phase, Some(x), first, |live| {
            let data = live.store.data_mut();
            let xr = data.lend_exchange(context)?;
            let tr = data.lend_headers(context, part)?;
            let h = live.bindings.legate_filter_http_handler();
            let action = match d {
                Direction::Request => h.call_on_request_trailers(&mut live.store, context, xr, tr),
                Direction::Response => {
                    h.call_on_response_trailers(&mut live.store, context, xr, tr)
                }
            }?;
            Ok(verdict(live, context, phase, action))
        })
    }
}

/// Checks and converts a guest's local response (an invalid one is a failure of
/// the call, abi/README.md §3.5).
fn local_response(lr: whttp::LocalResponse) -> Result<LocalResponse, String> {
    let range = legate_abi_rules::limits::RESPONSE_STATUS;
    if !range.contains(&lr.status) {
        return Err(format!(
            "local response status {} is outside {range:?}",
            lr.status
        ));
    }
    let status =
        StatusCode::from_u16(lr.status).map_err(|_| format!("bad status {}", lr.status))?;
    let mut headers = HeaderMap::new();
    for (name, value) in lr.headers {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("local response header name `{name}` is invalid"))?;
        let v = super::host::field_value(value)
            .map_err(|_| format!("local response header `{name}` has an invalid value"))?;
        super::host::put_field(&mut headers, n, v, false).map_err(|_| {
            format!(
                "local response headers over the host's caps ({} fields, {} KiB a value)",
                super::host::MAX_FILTER_FIELDS,
                super::host::MAX_FILTER_FIELD_VALUE / 1024
            )
        })?;
    }
    Ok(LocalResponse {
        status,
        headers,
        body: Bytes::from(lr.body),
        details: crate::local_reply::details(&lr.details),
        grpc_status: None,
    })
}

impl HttpFilter for WasmFilter {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn sanitized_request_headers(&self) -> &[http::HeaderName] {
        &self.sanitize
    }

    fn phases(&self) -> Phases {
        self.phases
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
        self.phase_call(worker, x, true, end_of_stream)
    }

    fn on_response_headers(
        &self,
        worker: usize,
        x: &mut Exchange,
        end_of_stream: bool,
    ) -> Result<Verdict, String> {
        self.phase_call(worker, x, false, end_of_stream)
    }

    fn body_mode(&self, d: Direction) -> BodyMode {
        self.body_modes[d.idx()]
    }

    fn body_limit(&self) -> usize {
        self.settings.body_limit
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
        self.body_call(worker, x, d, end_of_stream)
    }

    fn on_trailers(
        &self,
        worker: usize,
        x: &mut Exchange,
        d: Direction,
    ) -> Result<Verdict, String> {
        self.trailers_call(worker, x, d)
    }

    fn on_callout_response(
        &self,
        worker: usize,
        x: &mut Exchange,
        id: u64,
        result: crate::filter::CalloutResult,
        paused: bool,
    ) -> Result<Verdict, String> {
        self.stats.count_callout(&result);
        let result = guest_result(result);
        self.reply(
            worker,
            x,
            id,
            paused,
            "callout_response",
            |live, context, xr| {
                live.bindings
                    .legate_filter_http_handler()
                    .call_on_callout_response(
                        &mut live.store,
                        context,
                        xr,
                        id,
                        result.as_ref().map_err(|e| *e),
                    )
            },
        )
    }

    fn on_kv_response(
        &self,
        worker: usize,
        x: &mut Exchange,
        id: u64,
        result: crate::wasm::kv::KvResult,
        paused: bool,
    ) -> Result<Verdict, String> {
        let result = super::host::kv_result(result);
        self.reply(worker, x, id, paused, "kv_response", |live, context, xr| {
            // Only started by an instance that exports `kv-handler`; one that
            // replaced it meanwhile is the same component.
            let Some(h) = live.bindings.legate_filter_kv_handler() else {
                wasmtime::bail!("a KV reply for a component without `kv-handler`");
            };
            h.call_on_kv_response(
                &mut live.store,
                context,
                xr,
                id,
                result.as_ref().map_err(|e| *e),
            )
        })
    }

    fn on_log(&self, worker: usize, x: &mut Exchange) {
        self.stats.calls["log"].inc();
        let (context, first) = (x.context, x.first_call);
        let r = self.with_instance(worker, Phase::ReadOnly, Some(x), first, |live| {
            let xr = live.store.data_mut().lend_exchange(context)?;
            live.bindings
                .legate_filter_http_handler()
                .call_on_log(&mut live.store, context, xr)
                .map(Ok)
        });
        if let Err(e) = r {
            tracing::warn!(plugin = self.name(), "on-log failed: {e}");
        }
    }

    /// A plugin that ticks gets its instance (and tick task) now, so it ticks
    /// without traffic; one without ticks waits for its first exchange (an
    /// instance costs ~1 MiB per worker, and nothing would run in it before).
    fn start_on_worker(&self, worker: usize) {
        if self.tick.is_none() {
            return;
        }
        super::slots::start_early(&INSTANCES, &LIVE, self.id, self.name(), |slot| {
            self.start_instance(slot, worker)
        });
    }

    fn instance_gone(&self, _worker: usize, context: u64) -> Option<InstanceGone> {
        INSTANCES.with(|cell| {
            let live = cell
                .borrow()
                .get(&self.id)
                .and_then(|s| s.live.as_ref())
                .filter(|live| live.contexts.contains(&context))
                .map(|live| live.alive.watch());
            Some(live.unwrap_or_else(InstanceGone::now))
        })
    }

    fn pause_abandoned(&self, _worker: usize, x: &mut Exchange) {
        // The chain aborted this exchange's calls: none will be delivered, so
        // none is outstanding any more (a later `pause` with nothing in flight
        // fails at once, `cancel` of an old id is `not-found`, `detach` works,
        // and the ids stop counting against the limits), and it is not paused.
        let context = x.context;
        INSTANCES.with(|cell| {
            if let Some(live) = cell
                .borrow_mut()
                .get_mut(&self.id)
                .and_then(|s| s.live.as_mut())
            {
                live.paused.remove(&context);
                live.store.data_mut().forget_outstanding(context);
            }
        });
    }

    fn on_done(&self, worker: usize, context: u64, detached: bool) {
        let was_live = INSTANCES.with(|cell| {
            cell.borrow_mut()
                .get_mut(&self.id)
                .and_then(|s| s.live.as_mut())
                .is_some_and(|live| {
                    // Outstanding callouts are cancelled with the exchange.
                    live.paused.remove(&context);
                    live.store.data_mut().forget_outstanding(context);
                    live.contexts.remove(&context)
                })
        });
        // Not called for a context whose instance failed, nor for one that
        // detached (abi/README.md §3.2): the guest freed its state then.
        if !was_live || detached || !self.phases.contains(Phases::DONE) {
            return;
        }
        self.stats.calls["done"].inc();
        // The context was just removed from the live set; `on-done` is a plugin-level
        // call that names it.
        let r = self.with_instance(worker, Phase::ReadOnly, None, false, |live| {
            live.bindings
                .legate_filter_http_handler()
                .call_on_done(&mut live.store, context)
                .map(Ok)
        });
        if let Err(e) = r {
            tracing::warn!(plugin = self.name(), "on-done failed: {e}");
        }
    }
}

/// What one instance of a plugin costs (`legate plugin measure`): the figures
/// behind the instance shape (ARCHITECTURE.md, "Wasm filters").
#[derive(Debug, Clone, Copy)]
pub struct InstanceCost {
    /// Mean time to create, configure and drop one instance.
    pub instantiate: Duration,
    /// Linear memory of one configured instance, in bytes.
    pub memory: usize,
}

impl WasmFilter {
    /// Creates, configures and drops `n` instances on this thread: what an
    /// instance-per-request shape would add to every request, and the memory a
    /// per-worker instance holds.
    pub fn measure_instances(&self, n: u32) -> Result<InstanceCost, String> {
        let n = n.max(1);
        let mut memory = 0;
        let start = Instant::now();
        for _ in 0..n {
            let (live, _) = self.instantiate(u32::MAX, false)?;
            memory = live.store.data().memory.bytes();
        }
        Ok(InstanceCost {
            instantiate: start.elapsed() / n,
            memory,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component importing one instance named `name`, which exports a
    /// function `f: func()`.
    fn component_importing(name: &str) -> Component {
        let mut c = b"\0asm\x0d\0\x01\0".to_vec();
        // Type section: one instance type declaring `type 0 = func()` and
        // `export f: func(type 0)`.
        let ty = [
            1, 0x42, 2, 0x01, 0x40, 0, 0x01, 0, 0x04, 0, 1, b'f', 0x01, 0,
        ];
        c.push(7);
        c.push(u8::try_from(ty.len()).unwrap());
        c.extend(ty);
        // Import section: `name` as an instance of type 0.
        let mut body = vec![1, 0, u8::try_from(name.len()).unwrap()];
        body.extend(name.as_bytes());
        body.extend([0x05, 0]);
        c.push(10);
        c.push(u8::try_from(body.len()).unwrap());
        c.extend(body);
        Component::new(engine::engine().unwrap(), &c).unwrap()
    }

    #[test]
    fn a_component_of_another_abi_version_is_one_line_naming_both_versions() {
        // Was the linker's "component imports instance
        // `legate:filter/types@0.2.0`, but a matching implementation was not
        // found in the linker: …".
        let c = component_importing("legate:filter/types@0.2.0");
        let linker = linker().unwrap();
        let e = link("p", &c, |c| linker.instantiate_pre(c))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            "plugin `p`: the component is built against legate:filter@0.2.0 (it imports \
             `legate:filter/types@0.2.0`); this host implements 0.1.x (0.1.0–0.1.3): \
             regenerate its bindings from abi/wit (legate:filter@0.1.x), or rebuild it \
             with a legate-sdk for 0.1"
        );
        // One built against a later 0.1 whose link fails names this host's 0.1.
        let c = component_importing("legate:filter/nonesuch@0.1.9");
        let e = link("p", &c, |c| linker.instantiate_pre(c))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("plugin `p`: the component does not fit this host: ")
                && e.ends_with(
                    "(it is built against legate:filter@0.1.9, and uses something added \
                     after 0.1.3, which this host implements: upgrade Legate, or rebuild it \
                     against legate:filter@0.1.3 (its abi/wit, or a legate-sdk for 0.1.3))"
                ),
            "{e}"
        );
    }

    #[test]
    fn a_component_without_the_handler_is_told_what_it_exports_and_how_to_build_one() {
        // Was only the linker's "no exported instance named
        // `legate:filter/http-handler@0.1.3`".
        let e = wasmtime::Error::msg("linker");
        let nothing = Component::new(engine::engine().unwrap(), b"\0asm\x0d\0\x01\0").unwrap();
        assert_eq!(
            unexported("p", &nothing, "http-handler", &e).to_string(),
            "plugin `p`: the component does not export `legate:filter/http-handler@0.1.x`: it \
             exports nothing; build it for world `http-filter` of abi/wit/worlds.wit (a Rust \
             crate on legate-sdk calls `legate_sdk::export!(YourFilter)`)"
        );
        // A wasi:http proxy: an (empty) instance imported and passed on as
        // its export.
        let name = "wasi:http/incoming-handler@0.2.0";
        let mut raw = b"\0asm\x0d\0\x01\0".to_vec();
        raw.extend([7, 3, 1, 0x42, 0]);
        for (section, tail) in [(10u8, &[0x05, 0][..]), (11, &[0x05, 0, 0][..])] {
            let mut body = vec![1, 0, u8::try_from(name.len()).unwrap()];
            body.extend(name.as_bytes());
            body.extend(tail);
            raw.extend([section, u8::try_from(body.len()).unwrap()]);
            raw.extend(body);
        }
        let c = Component::new(engine::engine().unwrap(), &raw).unwrap();
        let got = unexported("p", &c, "http-handler", &e).to_string();
        assert!(
            got.contains(
                "it exports `wasi:http/incoming-handler@0.2.0` (a wasi:http component, as \
                 Spin or wasmCloud run, not a filter); build it for world `http-filter`"
            ),
            "{got}"
        );
    }

    #[test]
    fn a_component_importing_wasi_http_is_told_legate_does_not_provide_it() {
        // Was only wasmtime's "component imports instance
        // `wasi:http/types@0.2.10`, but a matching implementation was not
        // found in the linker: …" (what componentize-js builds by default).
        let c = component_importing("wasi:http/types@0.2.10");
        let linker = linker().unwrap();
        let e = link("p", &c, |c| linker.instantiate_pre(c))
            .err()
            .unwrap()
            .to_string();
        let head = "plugin `p`: the component imports `wasi:http/types@0.2.10`, which Legate \
                    does not provide (abi/README.md §10): filters reach upstreams with \
                    `callout`; for componentize-js build with `-d http -d fetch-event` (the \
                    linker: component imports instance `wasi:http/types@0.2.10`";
        assert!(e.starts_with(head), "{e}");
        // Another WASI interface the host lacks: named, with a general hint.
        assert_eq!(
            link_failure("X", Some("wasi:keyvalue/store@0.2.0-draft"), ""),
            "the component imports `wasi:keyvalue/store@0.2.0-draft`, which Legate does not \
             provide (abi/README.md §10): a filter reaches the outside through the \
             `legate:filter` imports (`callout`, `kv`, `log`, …) (the linker: X)"
        );
        // A provided WASI interface, or none, is not blamed.
        assert_eq!(
            link_failure("X", None, ""),
            "the component does not fit this host: X"
        );
        let c = component_importing("wasi:io/nonesuch@0.2.0");
        assert_eq!(
            unprovided_wasi(&c).as_deref(),
            Some("wasi:io/nonesuch@0.2.0")
        );
        let c = component_importing("wasi:io/streams@0.2.10");
        assert_eq!(unprovided_wasi(&c), None);
    }

    #[test]
    fn a_core_module_that_is_not_proxy_wasm_is_told_how_to_make_a_component() {
        // Was "build a Legate plugin for `wasm32-wasip2`, or a proxy-wasm
        // filter": Rust-only advice to a C author who skipped the
        // componentize step.
        let e = super::super::proxy_wasm::compile(
            "c",
            std::path::Path::new("c_filter.core.wasm"),
            b"\0asm\x01\0\0\0",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.ends_with(
                "encode it as a component (`legate-componentize component`, or `wasm-tools \
                 component new` with the WASI adapter), or build a Rust plugin for \
                 `wasm32-wasip2`; or build a proxy-wasm filter with a proxy-wasm SDK"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_local_response_s_details_are_one_bounded_token() {
        // Were kept verbatim: CR/LF into the access log's `cause` and
        // `exchange.cause()`, 200 000 bytes into one log line.
        let lr = |details: String| whttp::LocalResponse {
            status: 403,
            headers: Vec::new(),
            body: Vec::new(),
            details,
        };
        let r = local_response(lr("denied by\r\npolicy x".into())).unwrap();
        assert_eq!(r.details, "denied_by__policy_x");
        let r = local_response(lr("d".repeat(200_000))).unwrap();
        assert_eq!(r.details, "d".repeat(crate::local_reply::MAX_DETAILS));
    }

    /// The error of calling a core function that executes `unreachable`
    /// (what a Rust guest's panic ends in), after `stderr` was written.
    fn trap_after(stderr: &[&str]) -> wasmtime::Error {
        let m = b"\0asm\x01\0\0\0\
                  \x01\x04\x01\x60\0\0\
                  \x03\x02\x01\0\
                  \x07\x05\x01\x01f\0\0\
                  \x0a\x05\x01\x03\0\0\x0b";
        let engine = engine::engine().unwrap();
        let module = wasmtime::Module::new(engine, m).unwrap();
        let mut store = Store::new(engine, ());
        store.set_epoch_deadline(u64::MAX / 2);
        super::super::stdio::call_started();
        for line in stderr {
            super::super::stdio::record(line);
        }
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let f = instance.get_typed_func::<(), ()>(&mut store, "f").unwrap();
        f.call(&mut store, ()).unwrap_err()
    }

    #[test]
    fn a_trap_is_one_line_with_the_guest_s_panic_and_the_trap_kind() {
        // Was "trap: error while executing at wasm backtrace:" and a line per
        // frame, the panic only in separate stderr log lines.
        let e = trap_after(&[
            "thread '<unnamed>' panicked at src/lib.rs:51:13:",
            "boom in configure",
            "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace",
        ]);
        assert_eq!(
            describe(&e, Duration::from_millis(5)),
            (
                "trap",
                "trap: panicked at src/lib.rs:51:13: boom in configure (wasm \
                 `unreachable` instruction executed)"
                    .to_string()
            )
        );
        // No error output: the trap's kind alone, still one line.
        let e = trap_after(&[]);
        assert_eq!(
            describe(&e, Duration::from_millis(5)).1,
            "trap: wasm `unreachable` instruction executed"
        );
    }

    #[test]
    fn a_timeout_says_which_bound_stopped_the_call() {
        let interrupt: wasmtime::Error = Trap::Interrupt.into();
        let cpu = Duration::from_millis(5);
        super::super::engine::arm_for_test();
        assert_eq!(
            describe(&interrupt, cpu),
            (
                "timeout",
                "call exceeded its CPU deadline (5ms)".to_string()
            )
        );
        // Stopped by the wall-time backstop (a call that waited, a thread
        // kept off a core): not "CPU deadline", which it did not reach.
        super::super::engine::wall_bound_hit();
        assert_eq!(
            describe(&interrupt, cpu),
            (
                "timeout",
                "call exceeded its wall-clock bound (50ms, 10x its CPU deadline of 5ms): it \
                 waited, or its thread did not get a core"
                    .to_string()
            )
        );
    }

    #[test]
    fn the_abi_version_is_the_wit_package_s() {
        let wit = include_str!("../../../abi/wit/filter.wit");
        let [a, b, c] = ABI_VERSION;
        assert!(
            wit.starts_with(&format!("package legate:filter@{a}.{b}.{c};")),
            "abi/wit/filter.wit: {}",
            wit.lines().next().unwrap_or("")
        );
        assert_eq!(abi_version_of("legate:filter/types@0.2.0"), Some([0, 2, 0]));
        assert_eq!(
            abi_version_of("legate:filter/http@0.1.0-rc.1"),
            Some([0, 1, 0])
        );
        assert_eq!(abi_version_of("wasi:io/streams@0.2.0"), None);
        assert_eq!(abi_version_of("legate:filter/types"), None);
    }
}

//! The host side of every interface a plugin imports: the store's data
//! ([`HostState`]), the resource types `bindings.rs` maps the WIT resources to, and
//! the `Host` trait impls (`http`, `types`, `log`, `clock`, `random`, `metrics`,
//! `kv`, `callout`, `plugin`), plus WASI linked with nothing granted.
//!
//! Handles are entries in the store's `ResourceTable` naming the exchange (`context`)
//! and the message part they point at; the data itself stays in the [`Exchange`] the
//! proxy moved into the store for the duration of a call. A handle used when its
//! exchange is not the one in the store is dangling and traps (abi/README.md §8).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderName, HeaderValue};
use http::HeaderMap;
// The rules the SDK's harness applies too: log lines, metric names, labels and
// caps (abi/README.md §5.1, §5.6, §7).
use legate_abi_rules::log::{one_line, MAX_LOG};
use legate_abi_rules::metrics::{
    label_ok, name_free, name_ok, MAX_BUCKETS, MAX_HELP, MAX_METRICS, MAX_SERIES,
};
use rand::RngCore;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::stdio::{GuestOutput, Which};

use super::bindings::legate::filter::{
    callout, clock, http as whttp, kv, log, metrics, plugin, random, types,
};
use super::kv::{Condition, KvBackend, KvCall, KvError, KvResult, Op, Reply as KvReply};
use crate::filter::{BodyMode, CalloutRequest, Direction, Exchange};
use crate::stats::{Counter, Gauge, Histogram, Stats};

type Error = types::Error;

/// A `buffer` handle: the body data of one direction of one exchange, as the host
/// holds it for the filter being called ([`ExchangeData::bodies`]).
pub struct BufferRes {
    context: u64,
    dir: Direction,
}

/// A `connection` handle (L4 filters): the TCP connection of `context`.
pub struct ConnectionRes {
    context: u64,
}

/// Which map a `headers` handle points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Request headers.
    Request,
    /// Response headers.
    Response,
    /// Request trailers.
    RequestTrailers,
    /// Response trailers.
    ResponseTrailers,
}

/// A `headers` handle: one map of one exchange.
pub struct HeadersRes {
    context: u64,
    part: Part,
}

/// An `exchange` handle.
pub struct ExchangeRes {
    context: u64,
}

/// A metric handle (counter, gauge or histogram series).
pub struct MetricRes {
    def: Arc<MetricDef>,
    /// `None` until first recorded into: the all-empty-labels series of a labelled
    /// metric (what a `define-*` handle records into) is only made, and shown in
    /// /stats, once used; a plugin that only records labelled series never shows a
    /// `{result=""}` line.
    series: Option<Series>,
}

/// A `kv.namespace` handle: a namespace granted to the plugin.
pub struct NamespaceRes {
    name: Arc<str>,
}

#[derive(Clone)]
enum Series {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    /// As the text format's `# TYPE` names it.
    fn type_name(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// A metric a plugin defined (shared by all its instances).
pub struct MetricDef {
    name: &'static str,
    help: &'static str,
    kind: MetricKind,
    labels: Vec<String>,
    /// A histogram's bucket bounds (the host's when it gave none).
    bounds: &'static [f64],
}

/// What every instance of one plugin shares: its name, stats, metrics and
/// capabilities.
pub struct PluginShared {
    /// Plugin name.
    pub name: Arc<str>,
    /// The process's metrics registry.
    pub stats: Arc<Stats>,
    /// KV namespaces granted (`capabilities.kv`).
    pub kv_granted: Vec<Arc<str>>,
    /// The KV backend.
    pub kv: Arc<dyn KvBackend>,
    /// Clusters granted for callouts (`capabilities.clusters`).
    pub clusters: Vec<Arc<str>>,
    /// `legate_plugin_callouts_total`.
    pub callouts_sent: Counter,
    /// The buffered body cap (`limits.body`): `buffer` writes past it are
    /// `limit-exceeded`.
    pub body_limit: usize,
    /// The data files granted (`files:`), read at load.
    pub files: Arc<super::plugin::Files>,
    metrics: Mutex<HashMap<String, Arc<MetricDef>>>,
    /// The series made so far (metric, label values): only a new one counts
    /// against the cap, so instances re-defining their metrics and per-request
    /// `with-labels` calls do not use it up. The plugin name's, kept over
    /// reloads (as `/stats` keeps the series).
    series: Arc<crate::stats::SeriesClaims>,
    /// The denials warned about (capability, name): each once per plugin.
    warned: Mutex<std::collections::HashSet<(&'static str, String)>>,
}

impl PluginShared {
    /// The shared state of plugin `name`.
    pub fn new(name: &str, stats: Arc<Stats>, kv_granted: &[String], clusters: &[String]) -> Self {
        let callouts_sent = callouts_counter(&stats, name);
        PluginShared {
            name: name.into(),
            kv_granted: kv_granted.iter().map(|n| Arc::from(n.as_str())).collect(),
            kv: super::kv::store(),
            clusters: clusters.iter().map(|n| Arc::from(n.as_str())).collect(),
            callouts_sent,
            body_limit: crate::filter::DEFAULT_BODY_LIMIT,
            files: Arc::default(),
            metrics: Mutex::default(),
            series: stats.claims(name),
            stats,
            warned: Mutex::default(),
        }
    }

    /// What to add to the config for a use of `name` that `capability`
    /// (`kv` or `clusters`) does not grant.
    fn grant_hint(&self, capability: &'static str, name: &str) -> String {
        let what = match capability {
            "kv" => "KV namespace",
            _ => "cluster",
        };
        format!(
            "{what} `{name}` is not granted to plugin `{}`: add it to the plugin's \
             `capabilities.{capability}`",
            self.name
        )
    }

    /// The hint for a use of `name` that `capability` (`kv` or `clusters`)
    /// does not grant: what to add to the config. Logged as a warning the
    /// first time per plugin and name, since the guest may only see `denied`
    /// (and may not say which name).
    pub fn denied(&self, capability: &'static str, name: &str) -> String {
        let hint = self.grant_hint(capability, name);
        let first = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((capability, name.to_string()));
        if first {
            tracing::warn!(plugin = &*self.name, "{hint}");
        }
        hint
    }
}

/// `legate_plugin_callouts_total` of plugin `name` (both ABIs).
pub(crate) fn callouts_counter(stats: &Stats, name: &str) -> Counter {
    stats.counter(
        "legate_plugin_callouts_total",
        "Callouts a plugin sent.",
        &[("plugin", name)],
    )
}

/// Callout limits (abi/README.md §7); but the default timeout, the
/// guest's side applies them too (`legate_abi_rules::limits`).
pub const CALLOUT_DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub(crate) use legate_abi_rules::limits::{
    CALLOUTS_PER_CONTEXT, CALLOUTS_PER_INSTANCE, CALLOUT_MAX_RESPONSE, CALLOUT_MAX_TIMEOUT_MS,
};

/// What a call is allowed to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `configure`.
    Configure,
    /// `on-request-headers`: the request head is writable.
    RequestHeaders,
    /// `on-response-headers`: the response head is writable.
    ResponseHeaders,
    /// `on-request-body`: the data is writable, and the request head too in
    /// `buffered` mode.
    RequestBody,
    /// `on-response-body`: as `RequestBody`, for the response.
    ResponseBody,
    /// `on-request-trailers`: the request trailers are writable.
    RequestTrailers,
    /// `on-response-trailers`: the response trailers are writable.
    ResponseTrailers,
    /// `on-callout-response` of a context that is not paused: read-only, but
    /// callouts may be sent.
    Callout,
    /// `on-log`, `on-done`: read-only.
    ReadOnly,
    /// `on-tick` and `on-tick-callout-response`: no exchange; callouts belong to
    /// the plugin.
    Tick,
    /// L4 `on-downstream-data` (`Request`) / `on-upstream-data` (`Response`):
    /// that direction's data is writable.
    NetData(Direction),
    /// L4 `on-new-connection`, `on-close`, `on-callout-response`: nothing is
    /// writable; callouts may be sent (not from `on-close`, which is `ReadOnly`).
    Net,
}

/// The data of one instance's store.
pub struct HostState {
    /// The current call's deadline clock ([`crate::wasm::engine::arm`]).
    pub clock: crate::wasm::engine::CallClock,
    wasi: WasiCtx,
    table: ResourceTable,
    /// The memory cap.
    pub limits: StoreLimits,
    /// The memory cap, for the instance's linear memories together (`limits`
    /// applies it to each alone).
    memory_cap: usize,
    /// The last memory growth the limiter refused: at instantiation, a module
    /// whose memory starts over the cap ([`crate::wasm::engine::instantiate_error`]).
    pub refused_memory: Option<crate::wasm::engine::RefusedMemory>,
    /// The plugin.
    pub plugin: Arc<PluginShared>,
    /// The worker index.
    pub worker: u32,
    /// The current call's phase.
    pub phase: Phase,
    /// The current body call has `end-of-stream = true`: that direction's
    /// trailers, if they arrived, are writable with the body (abi/README.md §4,
    /// folding trailers into the body).
    pub body_end: bool,
    /// The exchange of the current call, swapped in by the caller and back out after
    /// (a placeholder between calls).
    pub x: Exchange,
    /// Whether a per-exchange call is running (`x` is live).
    pub in_exchange: bool,
    /// Linear memory this instance holds (in the per-worker gauge, except for
    /// load-time check instances).
    pub memory: crate::wasm::slots::MemoryUse,
    /// The last callout id handed out.
    next_callout: u64,
    /// Outstanding (sent, neither delivered nor cancelled) callouts and KV
    /// calls by context ([`PLUGIN_CONTEXT`] for the plugin's own, from `on-tick`).
    outstanding: rustc_hash::FxHashMap<u64, HashSet<u64>>,
    /// How many ids `outstanding` holds in all: the per-instance limit is
    /// checked on every call, and summing the sets cost one step per paused
    /// exchange.
    outstanding_total: usize,
    /// Callouts queued by an `on-tick` call (exchange calls queue on the exchange).
    pub tick_callouts: Vec<CalloutRequest>,
    /// The tasks of plugin-level callouts in flight, by id, so that `cancel`
    /// can abort them (pruned of finished ones as new ones start).
    tick_tasks: crate::filter::Aborts<u64>,
    /// The table entries lent to the guest as a call's `borrow` parameters.
    lent: Lent,
    /// The component exports `kv-handler`: `start-*` calls have somewhere to
    /// deliver their replies.
    pub kv_replies: bool,
    /// The hint of the first use of an ungranted KV namespace or cluster in
    /// this instance ([`PluginShared::denied`]), for a failing `configure`.
    pub denial: Option<String>,
    /// The request headers `configure` declared with
    /// `sanitize-request-headers`, lowercase and each once.
    pub sanitize: Vec<HeaderName>,
    /// Uses `configure` made of what the plugin is not granted (capability,
    /// name): warned about only if it succeeds ([`HostState::configured`]);
    /// a failing one's error carries the hint.
    configure_denials: Vec<(&'static str, String)>,
}

/// Table entries (by rep) for the `borrow` parameters of phase calls, made on
/// first use and kept for the store's life, each call re-pointing them at its
/// exchange ([`HostState::lend_exchange`] and the like). A table push boxes its
/// entry, so making and deleting two handles per call cost two allocations
/// and frees (~0.4k instructions of a no-op filter's ~11k). Nothing changes
/// for the guest: a borrow ends with the call that lent it (wasmtime enforces
/// it), a dropped borrow does not delete the entry, and handles the guest
/// owns (from host functions) are entries of their own.
#[derive(Default)]
struct Lent {
    exchange: Option<u32>,
    headers: Option<u32>,
    buffer: Option<u32>,
    connection: Option<u32>,
}

/// A `borrow` of the table entry in `slot` (made on first use), now `value`.
/// Lent as a borrow: an own `Resource` given to a `borrow<…>` parameter would
/// move into wasmtime's host handle table and never be released (a leak
/// against the store's cap of live handles).
fn lend<T: Send + 'static>(
    table: &mut ResourceTable,
    slot: &mut Option<u32>,
    value: T,
) -> wasmtime::Result<Resource<T>> {
    let rep = match *slot {
        Some(rep) => {
            *table.get_mut(&Resource::<T>::new_borrow(rep))? = value;
            rep
        }
        None => {
            let rep = table.push(value)?.rep();
            *slot = Some(rep);
            rep
        }
    };
    Ok(Resource::new_borrow(rep))
}

impl crate::wasm::engine::Clocked for HostState {
    fn call_clock(&mut self) -> &mut crate::wasm::engine::CallClock {
        &mut self.clock
    }
}

/// The context plugin-level callouts are kept under (exchange contexts start at 1).
pub const PLUGIN_CONTEXT: u64 = 0;

impl HostState {
    /// A store's data for an instance of `plugin` on worker `worker`.
    pub fn new(plugin: Arc<PluginShared>, worker: u32, memory_cap: usize) -> Self {
        // WASI with nothing granted: no preopens, env, args, sockets or name lookup;
        // stdin is empty; stdout and stderr become log lines (wasm/stdio.rs).
        let mut b = WasiCtxBuilder::new();
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .stdout(GuestOutput::new(plugin.name.clone(), Which::Stdout))
            .stderr(GuestOutput::new(plugin.name.clone(), Which::Stderr));
        HostState {
            clock: crate::wasm::engine::CallClock::default(),
            wasi: b.build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_cap)
                .trap_on_grow_failure(false)
                .build(),
            memory_cap,
            refused_memory: None,
            plugin,
            worker,
            phase: Phase::Configure,
            body_end: false,
            x: Exchange::placeholder(),
            in_exchange: false,
            memory: crate::wasm::slots::MemoryUse::default(),
            next_callout: 0,
            outstanding: rustc_hash::FxHashMap::default(),
            outstanding_total: 0,
            tick_callouts: Vec::new(),
            tick_tasks: crate::filter::Aborts::new(),
            lent: Lent::default(),
            kv_replies: false,
            denial: None,
            sanitize: Vec::new(),
            configure_denials: Vec::new(),
        }
    }

    /// A handle for the current exchange, to pass to a phase.
    pub fn exchange_handle(&mut self, context: u64) -> wasmtime::Result<Resource<ExchangeRes>> {
        Ok(self.table.push(ExchangeRes { context })?)
    }

    /// A handle for a header map of the current exchange.
    pub fn headers_handle(
        &mut self,
        context: u64,
        part: Part,
    ) -> wasmtime::Result<Resource<HeadersRes>> {
        Ok(self.table.push(HeadersRes { context, part })?)
    }

    /// A handle for the body data of `dir` of the current exchange.
    pub fn buffer_handle(
        &mut self,
        context: u64,
        dir: Direction,
    ) -> wasmtime::Result<Resource<BufferRes>> {
        Ok(self.table.push(BufferRes { context, dir })?)
    }

    /// Whether the head of `dir` is writable now: in its headers phase, or in its
    /// body phase in `buffered` mode (the head is held with the body, §3.4).
    fn head_writable(&self, dir: Direction) -> bool {
        let buffered = self.x.body_ctl.modes[dir.idx()] == BodyMode::Buffered;
        match dir {
            Direction::Request => {
                self.phase == Phase::RequestHeaders
                    || (self.phase == Phase::RequestBody && buffered)
            }
            Direction::Response => {
                self.phase == Phase::ResponseHeaders
                    || (self.phase == Phase::ResponseBody && buffered)
            }
        }
    }

    /// The `exchange` borrow of a phase call on exchange `context` ([`Lent`]).
    pub fn lend_exchange(&mut self, context: u64) -> wasmtime::Result<Resource<ExchangeRes>> {
        lend(
            &mut self.table,
            &mut self.lent.exchange,
            ExchangeRes { context },
        )
    }

    /// The `headers` borrow of a phase call ([`Lent`]).
    pub fn lend_headers(
        &mut self,
        context: u64,
        part: Part,
    ) -> wasmtime::Result<Resource<HeadersRes>> {
        lend(
            &mut self.table,
            &mut self.lent.headers,
            HeadersRes { context, part },
        )
    }

    /// The `buffer` borrow of a body call ([`Lent`]).
    pub fn lend_buffer(
        &mut self,
        context: u64,
        dir: Direction,
    ) -> wasmtime::Result<Resource<BufferRes>> {
        lend(
            &mut self.table,
            &mut self.lent.buffer,
            BufferRes { context, dir },
        )
    }

    /// The `connection` borrow of an L4 call ([`Lent`]).
    pub fn lend_connection(&mut self, context: u64) -> wasmtime::Result<Resource<ConnectionRes>> {
        lend(
            &mut self.table,
            &mut self.lent.connection,
            ConnectionRes { context },
        )
    }

    fn exchange(&mut self, context: u64) -> wasmtime::Result<&mut Exchange> {
        match &mut self.x {
            x if self.in_exchange && x.context == context => Ok(x),
            _ => Err(wasmtime::format_err!(
                "dangling handle: exchange {context} is not live in this call"
            )),
        }
    }

    fn exchange_of(&mut self, r: &Resource<ExchangeRes>) -> wasmtime::Result<&mut Exchange> {
        let context = self.table.get(r)?.context;
        self.exchange(context)
    }

    /// The map behind a headers handle, whether it may be written now, and
    /// whether it may hold a `host` the guest must not see (the request's,
    /// left in place: see `ExchangeData::request_headers_with_host`; guests
    /// cannot write `host`, `denied_field`).
    fn headers_of(
        &mut self,
        r: &Resource<HeadersRes>,
    ) -> wasmtime::Result<(Option<&mut HeaderMap>, bool, Part, bool)> {
        let h = self.table.get(r)?;
        let (context, part) = (h.context, h.part);
        let phase = self.phase;
        let writable = match part {
            Part::Request => self.head_writable(Direction::Request),
            Part::Response => self.head_writable(Direction::Response),
            Part::RequestTrailers => {
                phase == Phase::RequestTrailers || (phase == Phase::RequestBody && self.body_end)
            }
            Part::ResponseTrailers => {
                phase == Phase::ResponseTrailers || (phase == Phase::ResponseBody && self.body_end)
            }
        };
        let x = self.exchange(context)?;
        let (map, hides_host) = match part {
            Part::Request => {
                let (head, hides_host) = x.request_headers_with_host();
                (Some(&mut **head), hides_host)
            }
            Part::Response => (x.response_headers.as_deref_mut(), false),
            Part::RequestTrailers => (x.trailers[0].as_mut(), false),
            Part::ResponseTrailers => (x.trailers[1].as_mut(), false),
        };
        Ok((map, writable, part, hides_host))
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime::ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let delta = desired.saturating_sub(current);
        // Past the cap, `memory.grow` fails (-1); it does not trap (abi §7).
        let ok = self.memory.admit(delta, self.memory_cap)
            && self.limits.memory_growing(current, desired, maximum)?;
        if ok {
            self.memory.grew(delta);
        } else {
            self.refused_memory = Some(crate::wasm::engine::RefusedMemory {
                desired,
                cap: self.memory_cap,
            });
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }
}

// ---- http ----

/// Fields the host owns (framing, connection management:
/// `legate_abi_rules::headers::host_owned`): never writable by a filter
/// (proxy-wasm callouts drop them from the request they are given).
pub(crate) fn denied_field(name: &HeaderName) -> bool {
    legate_abi_rules::headers::host_owned(name.as_str())
}

/// Whether `name` is `host` and hidden (see `HostState::headers_of`).
fn is_host(hides_host: bool, name: &str) -> bool {
    hides_host && name.eq_ignore_ascii_case("host")
}

/// The most fields a filter may put in one header map (a head, trailers, a
/// local response, a callout request): `HeaderMap` panics past 24 576 names,
/// and a guest must not grow host memory without bound; and the longest field
/// value a filter may write (`legate_abi_rules::limits`).
pub(crate) use legate_abi_rules::limits::{MAX_FILTER_FIELDS, MAX_FILTER_FIELD_VALUE};

/// Adds `name: value` to `map` within the caps above (`limit-exceeded`
/// otherwise), replacing the field's values when `replace`.
pub(crate) fn put_field(
    map: &mut HeaderMap,
    name: HeaderName,
    value: HeaderValue,
    replace: bool,
) -> Result<(), Error> {
    // The name's lookup only when the map is full (a replace of a field it
    // holds does not grow it): a header write costs no extra hash otherwise.
    if value.len() > MAX_FILTER_FIELD_VALUE
        || (map.len() >= MAX_FILTER_FIELDS && (!replace || !map.contains_key(&name)))
    {
        return Err(Error::LimitExceeded);
    }
    let stored = if replace {
        map.try_insert(name, value).map(drop)
    } else {
        map.try_append(name, value).map(drop)
    };
    stored.map_err(|_| Error::LimitExceeded)
}

fn field_name(name: &str) -> Result<HeaderName, Error> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| Error::InvalidArgument)
}

impl whttp::Host for HostState {
    fn sanitize_request_headers(
        &mut self,
        names: Vec<String>,
    ) -> wasmtime::Result<Result<(), Error>> {
        if self.phase != Phase::Configure {
            return Ok(Err(Error::InvalidState));
        }
        // All or nothing: a refused list declares none of its names.
        let mut add: Vec<HeaderName> = Vec::new();
        for n in &names {
            let name = match field_name(n) {
                Ok(name) => name,
                Err(e) => return Ok(Err(e)),
            };
            if denied_field(&name) {
                return Ok(Err(Error::Denied));
            }
            if !self.sanitize.contains(&name) && !add.contains(&name) {
                add.push(name);
            }
        }
        if self.sanitize.len() + add.len() > legate_abi_rules::limits::MAX_SANITIZED_HEADERS {
            return Ok(Err(Error::LimitExceeded));
        }
        self.sanitize.extend(add);
        Ok(Ok(()))
    }
}

impl whttp::HostHeaders for HostState {
    fn get(&mut self, r: Resource<HeadersRes>, name: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let (map, _, _, hides_host) = self.headers_of(&r)?;
        Ok(map
            .filter(|_| !is_host(hides_host, &name))
            .and_then(|m| m.get(name.as_str()))
            .map(|v| v.as_bytes().to_vec()))
    }

    fn get_all(&mut self, r: Resource<HeadersRes>, name: String) -> wasmtime::Result<Vec<Vec<u8>>> {
        let (map, _, _, hides_host) = self.headers_of(&r)?;
        Ok(map
            .filter(|_| !is_host(hides_host, &name))
            .map(|m| {
                m.get_all(name.as_str())
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn has(&mut self, r: Resource<HeadersRes>, name: String) -> wasmtime::Result<bool> {
        let (map, _, _, hides_host) = self.headers_of(&r)?;
        Ok(!is_host(hides_host, &name) && map.is_some_and(|m| m.contains_key(name.as_str())))
    }

    fn len(&mut self, r: Resource<HeadersRes>) -> wasmtime::Result<u32> {
        let (map, _, _, hides_host) = self.headers_of(&r)?;
        Ok(map.map_or(0, |m| {
            u32::try_from(crate::filter::visible_len(m, hides_host)).unwrap_or(u32::MAX)
        }))
    }

    fn set(
        &mut self,
        r: Resource<HeadersRes>,
        name: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.write_field(r, &name, Some(value), true)
    }

    fn add(
        &mut self,
        r: Resource<HeadersRes>,
        name: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.write_field(r, &name, Some(value), false)
    }

    fn remove(
        &mut self,
        r: Resource<HeadersRes>,
        name: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.write_field(r, &name, None, true)
    }

    fn entries(&mut self, r: Resource<HeadersRes>) -> wasmtime::Result<Vec<(String, Vec<u8>)>> {
        let (map, _, _, hides_host) = self.headers_of(&r)?;
        Ok(map
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| !(hides_host && *k == header::HOST))
                    .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn drop(&mut self, r: Resource<HeadersRes>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

impl HostState {
    /// `set` (replace), `add` (append) or `remove` (value `None`) one field.
    fn write_field(
        &mut self,
        r: Resource<HeadersRes>,
        name: &str,
        value: Option<Vec<u8>>,
        replace: bool,
    ) -> wasmtime::Result<Result<(), Error>> {
        let name = match field_name(name) {
            Ok(n) => n,
            Err(e) => return Ok(Err(e)),
        };
        let removing_length = value.is_none() && name == header::CONTENT_LENGTH;
        // `te: trailers` is the one `te` that crosses a proxy, and gRPC needs it
        // upstream: a request filter converting to gRPC may set (or remove) it.
        let te_trailers = name == header::TE
            && (replace || value.is_none())
            && value.as_deref().is_none_or(|v| v == b"trailers");
        // `trailer` on the response head: a filter that rewrote a response
        // (gRPC to JSON) names the trailers still to come, which hyper's
        // HTTP/1.1 server writes only when the head declares them.
        let response_trailer = name == header::TRAILER;
        if denied_field(&name) && !removing_length && !te_trailers && !response_trailer {
            return Ok(Err(Error::Denied));
        }
        let value = match value.map(field_value).transpose() {
            Ok(v) => v,
            Err(_) => return Ok(Err(Error::InvalidArgument)),
        };
        // `host` was refused above (`denied_field`): a hidden one stays hidden.
        let (map, writable, part, _) = self.headers_of(&r)?;
        let Some(map) = map else {
            return Ok(Err(Error::InvalidState));
        };
        if !writable {
            return Ok(Err(Error::InvalidState));
        }
        if (te_trailers && part != Part::Request) || (response_trailer && part != Part::Response) {
            return Ok(Err(Error::Denied));
        }
        match value {
            None => {
                map.remove(&name);
            }
            Some(v) => {
                if let Err(e) = put_field(map, name, v, replace) {
                    return Ok(Err(e));
                }
            }
        }
        if part == Part::Request {
            let context = self.table.get(&r)?.context;
            self.exchange(context)?.head_changed();
        }
        Ok(Ok(()))
    }
}

/// A field value the guest handed over as an owned list: checked and kept in
/// place (`HeaderValue::from_bytes` would copy it into a new allocation).
pub(super) fn field_value(v: Vec<u8>) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v))
}

/// The WIT `tls-version` of a connection (`none`: plaintext).
fn tls_version(c: &crate::filter::ConnFacts) -> Option<types::TlsVersion> {
    c.tls13().map(|v| {
        if v {
            types::TlsVersion::Tls13
        } else {
            types::TlsVersion::Tls12
        }
    })
}

fn socket_address(a: std::net::SocketAddr) -> types::SocketAddress {
    let ip = match a.ip() {
        std::net::IpAddr::V4(v) => {
            let o = v.octets();
            types::IpAddress::Ipv4((o[0], o[1], o[2], o[3]))
        }
        std::net::IpAddr::V6(v) => {
            let s = v.segments();
            types::IpAddress::Ipv6((s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]))
        }
    };
    types::SocketAddress { ip, port: a.port() }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A request-line value: no CR, LF, NUL, space or `#`.
fn clean_target(s: &str) -> bool {
    !s.bytes()
        .any(|b| matches!(b, b'\r' | b'\n' | 0 | b' ' | b'#') || b < 0x20 || b == 0x7f)
}

impl whttp::HostExchange for HostState {
    fn method(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<String> {
        Ok(self.exchange_of(&r)?.method.as_str().to_string())
    }

    fn set_method(
        &mut self,
        r: Resource<ExchangeRes>,
        method: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        let writable = self.head_writable(Direction::Request);
        let x = self.exchange_of(&r)?;
        let Ok(m) = http::Method::from_bytes(method.as_bytes()) else {
            return Ok(Err(Error::InvalidArgument));
        };
        if !writable {
            return Ok(Err(Error::InvalidState));
        }
        x.method = m;
        x.head_changed();
        Ok(Ok(()))
    }

    fn path(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<String> {
        Ok(self.exchange_of(&r)?.path.clone())
    }

    fn set_path(
        &mut self,
        r: Resource<ExchangeRes>,
        path: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        let writable = self.head_writable(Direction::Request);
        let x = self.exchange_of(&r)?;
        if !path.starts_with('/') || !clean_target(&path) || path.parse::<http::Uri>().is_err() {
            return Ok(Err(Error::InvalidArgument));
        }
        if !writable {
            return Ok(Err(Error::InvalidState));
        }
        x.path = path;
        x.head_changed();
        Ok(Ok(()))
    }

    fn scheme(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<String> {
        let https = self.exchange_of(&r)?.https;
        Ok(if https { "https" } else { "http" }.to_string())
    }

    fn authority(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<String> {
        Ok(self.exchange_of(&r)?.authority.clone())
    }

    fn set_authority(
        &mut self,
        r: Resource<ExchangeRes>,
        authority: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        let writable = self.head_writable(Direction::Request);
        let x = self.exchange_of(&r)?;
        if authority.is_empty()
            || authority.parse::<http::uri::Authority>().is_err()
            || authority.contains('@')
        {
            return Ok(Err(Error::InvalidArgument));
        }
        if !writable {
            return Ok(Err(Error::InvalidState));
        }
        x.authority = authority;
        x.head_changed();
        Ok(Ok(()))
    }

    fn http_version(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<whttp::HttpVersion> {
        Ok(match self.exchange_of(&r)?.version {
            http::Version::HTTP_2 => whttp::HttpVersion::Http2,
            http::Version::HTTP_10 | http::Version::HTTP_09 => whttp::HttpVersion::Http10,
            _ => whttp::HttpVersion::Http11,
        })
    }

    fn status(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<Option<u16>> {
        Ok(self.exchange_of(&r)?.status.map(|s| s.as_u16()))
    }

    fn set_status(
        &mut self,
        r: Resource<ExchangeRes>,
        status: u16,
    ) -> wasmtime::Result<Result<(), Error>> {
        let writable = self.head_writable(Direction::Response);
        let x = self.exchange_of(&r)?;
        if !legate_abi_rules::limits::RESPONSE_STATUS.contains(&status) {
            return Ok(Err(Error::InvalidArgument));
        }
        if !writable || x.status.is_none() {
            return Ok(Err(Error::InvalidState));
        }
        x.status = http::StatusCode::from_u16(status).ok();
        Ok(Ok(()))
    }

    fn headers(
        &mut self,
        r: Resource<ExchangeRes>,
        direction: types::Direction,
    ) -> wasmtime::Result<Option<Resource<HeadersRes>>> {
        let x = self.exchange_of(&r)?;
        let context = x.context;
        let part = match direction {
            types::Direction::Request => Part::Request,
            types::Direction::Response if x.response_headers.is_some() => Part::Response,
            types::Direction::Response => return Ok(None),
        };
        Ok(Some(self.headers_handle(context, part)?))
    }

    fn body(
        &mut self,
        r: Resource<ExchangeRes>,
        direction: types::Direction,
    ) -> wasmtime::Result<Option<Resource<BufferRes>>> {
        let d = dir(direction);
        let x = self.exchange_of(&r)?;
        let context = x.context;
        if x.bodies[d.idx()].is_none() {
            return Ok(None);
        }
        Ok(Some(self.buffer_handle(context, d)?))
    }

    fn trailers(
        &mut self,
        r: Resource<ExchangeRes>,
        direction: types::Direction,
    ) -> wasmtime::Result<Option<Resource<HeadersRes>>> {
        let d = dir(direction);
        let x = self.exchange_of(&r)?;
        let context = x.context;
        if x.trailers[d.idx()].is_none() {
            return Ok(None);
        }
        let part = match d {
            Direction::Request => Part::RequestTrailers,
            Direction::Response => Part::ResponseTrailers,
        };
        Ok(Some(self.headers_handle(context, part)?))
    }

    fn set_body_mode(
        &mut self,
        r: Resource<ExchangeRes>,
        direction: types::Direction,
        mode: types::BodyMode,
    ) -> wasmtime::Result<Result<(), Error>> {
        let d = dir(direction);
        let x = self.exchange_of(&r)?;
        let ctl = &mut x.body_ctl;
        if !ctl.declared[d.idx()] || ctl.started[d.idx()] {
            return Ok(Err(Error::InvalidState));
        }
        ctl.modes[d.idx()] = match mode {
            types::BodyMode::Streamed => BodyMode::Streamed,
            types::BodyMode::Buffered => BodyMode::Buffered,
            types::BodyMode::Skipped => BodyMode::Skipped,
        };
        Ok(Ok(()))
    }

    fn detach(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<Result<(), Error>> {
        let context = self.table.get(&r)?.context;
        // A callout still out would have no one to deliver to; `on-log` and
        // `on-done` are past the point where it saves anything.
        if !self.in_exchange || self.phase == Phase::ReadOnly || self.has_outstanding(context) {
            return Ok(Err(Error::InvalidState));
        }
        self.exchange_of(&r)?.body_ctl.detached = true;
        Ok(Ok(()))
    }

    fn source_address(
        &mut self,
        r: Resource<ExchangeRes>,
    ) -> wasmtime::Result<types::SocketAddress> {
        Ok(socket_address(self.exchange_of(&r)?.conn.source))
    }

    fn destination_address(
        &mut self,
        r: Resource<ExchangeRes>,
    ) -> wasmtime::Result<types::SocketAddress> {
        Ok(socket_address(self.exchange_of(&r)?.conn.destination))
    }

    fn tls_version(
        &mut self,
        r: Resource<ExchangeRes>,
    ) -> wasmtime::Result<Option<types::TlsVersion>> {
        Ok(tls_version(&self.exchange_of(&r)?.conn))
    }

    fn tls_sni(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<Option<String>> {
        Ok(self.exchange_of(&r)?.conn.sni())
    }

    fn tls_peer_certificate_presented(
        &mut self,
        r: Resource<ExchangeRes>,
    ) -> wasmtime::Result<bool> {
        Ok(self.exchange_of(&r)?.conn.peer_cert_present())
    }

    fn tls_peer_subject(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<Option<String>> {
        Ok(self.exchange_of(&r)?.conn.peer_subject())
    }

    fn route_name(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<Option<String>> {
        Ok(self.exchange_of(&r)?.route_name().map(|n| n.to_string()))
    }

    fn cluster(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<Option<String>> {
        Ok(self.exchange_of(&r)?.cluster())
    }

    fn upstream_address(
        &mut self,
        r: Resource<ExchangeRes>,
    ) -> wasmtime::Result<Option<types::SocketAddress>> {
        Ok(self.exchange_of(&r)?.upstream.map(socket_address))
    }

    fn request_id(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<String> {
        Ok(self.exchange_of(&r)?.request_id_str().to_string())
    }

    fn start_time(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<u64> {
        Ok(unix_nanos(self.exchange_of(&r)?.start))
    }

    fn cause(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<Option<String>> {
        Ok(self.exchange_of(&r)?.cause.clone())
    }

    fn drop(&mut self, r: Resource<ExchangeRes>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

// ---- types: buffer ----

fn dir(d: types::Direction) -> Direction {
    match d {
        types::Direction::Request => Direction::Request,
        types::Direction::Response => Direction::Response,
    }
}

impl HostState {
    /// The data behind a buffer handle and whether it may be written now (only in
    /// the body phase of its direction, §3.4); `None` once that data went on
    /// (forwarded): the handle is still valid, with nothing behind it
    /// (abi/README.md §3.1). A handle of an exchange not in this call is
    /// dangling and traps.
    fn buffer_of(
        &mut self,
        r: &Resource<BufferRes>,
    ) -> wasmtime::Result<Option<(&mut crate::filter::BodyBuf, bool)>> {
        let b = self.table.get(r)?;
        let (context, d) = (b.context, b.dir);
        let writable = self.phase == Phase::NetData(d)
            || match d {
                Direction::Request => self.phase == Phase::RequestBody,
                Direction::Response => self.phase == Phase::ResponseBody,
            };
        let x = self.exchange(context)?;
        Ok(x.bodies[d.idx()].as_mut().map(|data| (data, writable)))
    }

    /// Replaces `remove` bytes at `offset` with `data`, under the plugin's cap.
    fn splice_buffer(
        &mut self,
        r: &Resource<BufferRes>,
        offset: Option<u64>,
        remove: u64,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        let cap = self.plugin.body_limit;
        let Some((buf, true)) = self.buffer_of(r)? else {
            // Outside the write window, or the data already went on.
            return Ok(Err(Error::InvalidState));
        };
        let (start, end) = match offset {
            None => (0, buf.len()),
            Some(o) => {
                let Some(end) = o.checked_add(remove) else {
                    return Ok(Err(Error::InvalidArgument));
                };
                match (usize::try_from(o), usize::try_from(end)) {
                    (Ok(s), Ok(e)) if e <= buf.len() => (s, e),
                    _ => return Ok(Err(Error::InvalidArgument)),
                }
            }
        };
        if buf.len() - (end - start) + data.len() > cap {
            return Ok(Err(Error::LimitExceeded));
        }
        buf.to_mut().splice(start..end, data);
        Ok(Ok(()))
    }
}

impl types::Host for HostState {}

impl types::HostBuffer for HostState {
    fn len(&mut self, r: Resource<BufferRes>) -> wasmtime::Result<u64> {
        Ok(self.buffer_of(&r)?.map_or(0, |(buf, _)| buf.len() as u64))
    }
    fn read(&mut self, r: Resource<BufferRes>, offset: u64, max: u64) -> wasmtime::Result<Vec<u8>> {
        let Some((buf, _)) = self.buffer_of(&r)? else {
            return Ok(Vec::new());
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(buf.len());
        let len = usize::try_from(max).unwrap_or(usize::MAX);
        let end = start.saturating_add(len).min(buf.len());
        Ok(buf[start..end].to_vec())
    }
    fn replace(
        &mut self,
        r: Resource<BufferRes>,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.splice_buffer(&r, None, 0, data)
    }
    fn splice(
        &mut self,
        r: Resource<BufferRes>,
        offset: u64,
        remove: u64,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.splice_buffer(&r, Some(offset), remove, data)
    }
    fn drop(&mut self, r: Resource<BufferRes>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

// ---- log, clock, random, plugin ----

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        // One message is one log line: a guest's newlines (or other control
        // characters) must not make lines that read as the host's own.
        let msg = one_line(&message, MAX_LOG);
        let plugin = &*self.plugin.name;
        // Inside an exchange, its request id ties the line to the access log's.
        let request_id = if self.in_exchange {
            self.x.request_id_str()
        } else {
            ""
        };
        match level {
            log::Level::Trace => tracing::trace!(plugin, request_id, "{msg}"),
            log::Level::Debug => tracing::debug!(plugin, request_id, "{msg}"),
            log::Level::Info => tracing::info!(plugin, request_id, "{msg}"),
            log::Level::Warn => tracing::warn!(plugin, request_id, "{msg}"),
            log::Level::Error => tracing::error!(plugin, request_id, "{msg}"),
        }
        Ok(())
    }

    fn enabled(&mut self, level: log::Level) -> wasmtime::Result<bool> {
        Ok(match level {
            log::Level::Trace => tracing::enabled!(tracing::Level::TRACE),
            log::Level::Debug => tracing::enabled!(tracing::Level::DEBUG),
            log::Level::Info => tracing::enabled!(tracing::Level::INFO),
            log::Level::Warn => tracing::enabled!(tracing::Level::WARN),
            log::Level::Error => tracing::enabled!(tracing::Level::ERROR),
        })
    }
}

/// The monotonic clock's origin: fixed for the process.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl clock::Host for HostState {
    fn wall_now(&mut self) -> wasmtime::Result<u64> {
        Ok(unix_nanos(SystemTime::now()))
    }
    fn monotonic_now(&mut self) -> wasmtime::Result<u64> {
        Ok(u64::try_from(origin().elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

impl random::Host for HostState {
    fn get_bytes(&mut self, len: u32) -> wasmtime::Result<Result<Vec<u8>, Error>> {
        if len > 65536 {
            return Ok(Err(Error::LimitExceeded));
        }
        let mut v = vec![0u8; len as usize];
        rand::rng().fill_bytes(&mut v);
        Ok(Ok(v))
    }
    fn get_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(rand::rng().next_u64())
    }
}

impl plugin::Host for HostState {
    fn name(&mut self) -> wasmtime::Result<String> {
        Ok(self.plugin.name.to_string())
    }
    fn instance_index(&mut self) -> wasmtime::Result<u32> {
        Ok(self.worker)
    }
    fn file(&mut self, name: String) -> wasmtime::Result<Result<Vec<u8>, Error>> {
        Ok(match self.plugin.files.get(&name) {
            Some(bytes) => Ok(bytes.to_vec()),
            None => Err(Error::NotFound),
        })
    }
}

// ---- metrics ----

impl HostState {
    fn define(
        &mut self,
        kind: MetricKind,
        name: String,
        help: String,
        labels: Vec<String>,
    ) -> wasmtime::Result<Result<Resource<MetricRes>, Error>> {
        self.define_over(kind, name, help, labels, &[])
    }

    /// [`HostState::define`], a histogram over `buckets` (none: the host's).
    fn define_over(
        &mut self,
        kind: MetricKind,
        name: String,
        help: String,
        labels: Vec<String>,
        buckets: &[f64],
    ) -> wasmtime::Result<Result<Resource<MetricRes>, Error>> {
        if self.phase != Phase::Configure {
            return Ok(Err(Error::InvalidState));
        }
        // Strictly increasing finite bounds, at most MAX_BUCKETS of them.
        let bounds_ok = buckets.len() <= MAX_BUCKETS
            && buckets.iter().all(|b| b.is_finite())
            && buckets.windows(2).all(|w| w[0] < w[1]);
        if !bounds_ok {
            return Ok(Err(Error::InvalidArgument));
        }
        let bounds = if buckets.is_empty() {
            &crate::stats::BUCKETS[..]
        } else {
            crate::stats::intern_bounds(buckets)
        };
        if !name_ok(&name)
            || !name_free(&name)
            // Interned for the process's life: bounded.
            || help.len() > MAX_HELP
            || labels.iter().any(|l| !label_ok(l))
            // A label twice, or a histogram's own `le`, is a series Prometheus
            // refuses, and it fails the whole scrape.
            || labels.iter().enumerate().any(|(i, l)| labels[..i].contains(l))
            || (kind == MetricKind::Histogram && labels.iter().any(|l| l == "le"))
        {
            return Ok(Err(Error::InvalidArgument));
        }
        // Another plugin's metric of this name and another kind (declared,
        // with or without a series yet): one family cannot hold both (the text
        // format gives a family one type). Nor, for a histogram, other buckets:
        // its series would show two layouts under one family.
        let full = crate::stats::intern(format!("legate_plugin_{name}"));
        let help = crate::stats::intern(help);
        let declared = match kind {
            MetricKind::Histogram => self.plugin.stats.declare_histogram(full, help, bounds),
            _ => self.plugin.stats.declare(full, help, kind.type_name()),
        };
        if !declared {
            return Ok(Err(Error::InvalidArgument));
        }
        let def = {
            let mut defs = self
                .plugin
                .metrics
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match defs.get(&name) {
                Some(d) if d.kind == kind && d.labels == labels && d.bounds == bounds => d.clone(),
                Some(_) => return Ok(Err(Error::InvalidArgument)),
                None if defs.len() >= MAX_METRICS => return Ok(Err(Error::LimitExceeded)),
                None => {
                    let d = Arc::new(MetricDef {
                        name: full,
                        help,
                        kind,
                        labels,
                        bounds,
                    });
                    defs.insert(name, d.clone());
                    d
                }
            }
        };
        let series = if def.labels.is_empty() {
            match self.series(&def, &[]) {
                Ok(series) => Some(series),
                Err(e) => return Ok(Err(e)),
            }
        } else {
            None
        };
        Ok(Ok(self.table.push(MetricRes { def, series })?))
    }

    fn series(&self, def: &MetricDef, values: &[String]) -> Result<Series, Error> {
        if values.len() != def.labels.len() || values.iter().any(|v| v.len() > 128) {
            return Err(Error::InvalidArgument);
        }
        let mut labels: Vec<(&str, &str)> = vec![("plugin", &*self.plugin.name)];
        labels.extend(
            def.labels
                .iter()
                .map(String::as_str)
                .zip(values.iter().map(String::as_str)),
        );
        {
            let mut made = self
                .plugin
                .series
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let key = (def.name, values.to_vec());
            if !made.contains(&key) {
                if made.len() >= MAX_SERIES {
                    return Err(Error::LimitExceeded);
                }
                made.insert(key);
            }
        }
        let stats = &self.plugin.stats;
        Ok(match def.kind {
            MetricKind::Counter => Series::Counter(stats.counter(def.name, def.help, &labels)),
            MetricKind::Gauge => Series::Gauge(stats.gauge(def.name, def.help, &labels)),
            MetricKind::Histogram => {
                Series::Histogram(stats.histogram_over(def.name, def.help, &labels, def.bounds))
            }
        })
    }

    fn with_labels(
        &mut self,
        r: &Resource<MetricRes>,
        values: Vec<String>,
    ) -> wasmtime::Result<Result<Resource<MetricRes>, Error>> {
        let def = self.table.get(r)?.def.clone();
        match self.series(&def, &values) {
            Ok(series) => Ok(Ok(self.table.push(MetricRes {
                def,
                series: Some(series),
            })?)),
            Err(e) => Ok(Err(e)),
        }
    }

    /// The series `r` records into, made on first use (see [`MetricRes`]); `None`
    /// when the plugin's series cap is reached (the value is dropped, as for any
    /// series over the cap).
    fn metric(&mut self, r: &Resource<MetricRes>) -> wasmtime::Result<Option<Series>> {
        let m = self.table.get(r)?;
        if let Some(series) = &m.series {
            return Ok(Some(series.clone()));
        }
        let def = m.def.clone();
        let empty = vec![String::new(); def.labels.len()];
        let Ok(series) = self.series(&def, &empty) else {
            return Ok(None);
        };
        self.table.get_mut(r)?.series = Some(series.clone());
        Ok(Some(series))
    }
}

impl metrics::Host for HostState {
    fn define_counter(
        &mut self,
        name: String,
        help: String,
        labels: Vec<String>,
    ) -> wasmtime::Result<Result<Resource<MetricRes>, Error>> {
        self.define(MetricKind::Counter, name, help, labels)
    }
    fn define_gauge(
        &mut self,
        name: String,
        help: String,
        labels: Vec<String>,
    ) -> wasmtime::Result<Result<Resource<MetricRes>, Error>> {
        self.define(MetricKind::Gauge, name, help, labels)
    }
    fn define_histogram(
        &mut self,
        name: String,
        help: String,
        labels: Vec<String>,
        buckets: Vec<f64>,
    ) -> wasmtime::Result<Result<Resource<MetricRes>, Error>> {
        self.define_over(MetricKind::Histogram, name, help, labels, &buckets)
    }
}

impl metrics::HostCounter for HostState {
    fn add(&mut self, r: Resource<MetricRes>, delta: u64) -> wasmtime::Result<()> {
        if let Some(Series::Counter(c)) = self.metric(&r)? {
            c.add(delta);
        }
        Ok(())
    }
    fn with_labels(
        &mut self,
        r: Resource<MetricRes>,
        values: Vec<String>,
    ) -> wasmtime::Result<Result<Resource<MetricRes>, Error>> {
        HostState::with_labels(self, &r, values)
    }
    fn drop(&mut self, r: Resource<MetricRes>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

impl metrics::HostGauge for HostState {
    fn set(&mut self, r: Resource<MetricRes>, value: i64) -> wasmtime::Result<()> {
        if let Some(Series::Gauge(g)) = self.metric(&r)? {
            g.set(value);
        }
        Ok(())
    }
    fn add(&mut self, r: Resource<MetricRes>, delta: i64) -> wasmtime::Result<()> {
        if let Some(Series::Gauge(g)) = self.metric(&r)? {
            g.set(g.get().saturating_add(delta));
        }
        Ok(())
    }
    fn with_labels(
        &mut self,
        r: Resource<MetricRes>,
        values: Vec<String>,
    ) -> wasmtime::Result<Result<Resource<MetricRes>, Error>> {
        HostState::with_labels(self, &r, values)
    }
    fn drop(&mut self, r: Resource<MetricRes>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

impl metrics::HostHistogram for HostState {
    fn observe(&mut self, r: Resource<MetricRes>, value: f64) -> wasmtime::Result<()> {
        if let Some(Series::Histogram(h)) = self.metric(&r)? {
            h.observe_value(value);
        }
        Ok(())
    }
    fn with_labels(
        &mut self,
        r: Resource<MetricRes>,
        values: Vec<String>,
    ) -> wasmtime::Result<Result<Resource<MetricRes>, Error>> {
        HostState::with_labels(self, &r, values)
    }
    fn drop(&mut self, r: Resource<MetricRes>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

// ---- kv ----

fn kv_error(e: KvError) -> Error {
    match e {
        KvError::CasMismatch => Error::CasMismatch,
        KvError::InvalidArgument => Error::InvalidArgument,
        KvError::LimitExceeded => Error::LimitExceeded,
        KvError::Unavailable => Error::Unavailable,
    }
}

fn condition(c: kv::WriteCondition) -> Condition {
    match c {
        kv::WriteCondition::Always => Condition::Always,
        kv::WriteCondition::IfAbsent => Condition::IfAbsent,
        kv::WriteCondition::IfVersion(v) => Condition::IfVersion(v),
    }
}

impl HostState {
    fn namespace(&self, r: &Resource<NamespaceRes>) -> wasmtime::Result<Arc<str>> {
        Ok(self.table.get(r)?.name.clone())
    }

    /// `start-*`: checks the call may start `op` now, then queues it on the
    /// exchange for the chain to run after this call returns.
    fn start_kv(
        &mut self,
        r: &Resource<NamespaceRes>,
        op: Op,
    ) -> wasmtime::Result<Result<u64, Error>> {
        let ns = self.namespace(r)?;
        // An exchange's call that may pause (the reply goes to its context).
        let may_pause = matches!(
            self.phase,
            Phase::RequestHeaders
                | Phase::ResponseHeaders
                | Phase::RequestBody
                | Phase::ResponseBody
                | Phase::RequestTrailers
                | Phase::ResponseTrailers
                | Phase::Callout
        );
        if !self.in_exchange || !may_pause || self.x.body_ctl.detached {
            return Ok(Err(Error::InvalidState));
        }
        if !self.kv_replies {
            return Ok(Err(Error::Unsupported));
        }
        if let Err(e) = op.check() {
            return Ok(Err(kv_error(e)));
        }
        let id = match self.reserve_id(self.x.context) {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        let future = self.plugin.kv.clone().start(&ns, op);
        self.x.kv_calls.push(KvCall { id, future });
        Ok(Ok(id))
    }
}

/// A stored entry as the guest sees it.
fn entry(e: super::kv::Entry) -> kv::Entry {
    kv::Entry {
        value: e.value,
        version: e.version,
    }
}

fn reply(r: KvReply) -> kv::Reply {
    match r {
        KvReply::Get(e) => kv::Reply::Get(e.map(entry)),
        KvReply::Set(v) => kv::Reply::Set(v),
        KvReply::Delete(d) => kv::Reply::Delete(d),
        KvReply::Increment(n) => kv::Reply::Increment(n),
    }
}

/// A KV call's outcome as the guest sees it.
pub fn kv_result(r: KvResult) -> Result<kv::Reply, Error> {
    r.map(reply).map_err(kv_error)
}

impl kv::Host for HostState {
    fn open(&mut self, name: String) -> wasmtime::Result<Result<Resource<NamespaceRes>, Error>> {
        // Every granted namespace exists (the in-memory store creates it on first
        // use), so `not-found` is never returned.
        let Some(name) = self
            .plugin
            .kv_granted
            .iter()
            .find(|n| ***n == *name)
            .cloned()
        else {
            self.deny("kv", &name);
            return Ok(Err(Error::Denied));
        };
        Ok(Ok(self.table.push(NamespaceRes { name })?))
    }
}

impl kv::HostNamespace for HostState {
    fn get(
        &mut self,
        r: Resource<NamespaceRes>,
        key: String,
    ) -> wasmtime::Result<Result<Option<kv::Entry>, Error>> {
        let ns = self.namespace(&r)?;
        Ok(self
            .plugin
            .kv
            .get(&ns, &key)
            .map(|e| e.map(entry))
            .map_err(kv_error))
    }
    fn set(
        &mut self,
        r: Resource<NamespaceRes>,
        key: String,
        value: Vec<u8>,
        cond: kv::WriteCondition,
        ttl: Option<u64>,
    ) -> wasmtime::Result<Result<u64, Error>> {
        let ns = self.namespace(&r)?;
        Ok(self
            .plugin
            .kv
            .set(
                &ns,
                &key,
                value,
                condition(cond),
                ttl.map(Duration::from_millis),
            )
            .map_err(kv_error))
    }
    fn delete(
        &mut self,
        r: Resource<NamespaceRes>,
        key: String,
        cond: kv::WriteCondition,
    ) -> wasmtime::Result<Result<bool, Error>> {
        let ns = self.namespace(&r)?;
        Ok(self
            .plugin
            .kv
            .delete(&ns, &key, condition(cond))
            .map_err(kv_error))
    }
    fn increment(
        &mut self,
        r: Resource<NamespaceRes>,
        key: String,
        delta: i64,
        ttl: Option<u64>,
    ) -> wasmtime::Result<Result<i64, Error>> {
        let ns = self.namespace(&r)?;
        Ok(self
            .plugin
            .kv
            .increment(&ns, &key, delta, ttl.map(Duration::from_millis))
            .map_err(kv_error))
    }
    fn backend(&mut self, _: Resource<NamespaceRes>) -> wasmtime::Result<kv::Backend> {
        Ok(if self.plugin.kv.remote() {
            kv::Backend::Redis
        } else {
            kv::Backend::Memory
        })
    }
    fn start_get(
        &mut self,
        r: Resource<NamespaceRes>,
        key: String,
    ) -> wasmtime::Result<Result<u64, Error>> {
        self.start_kv(&r, Op::Get { key })
    }
    fn start_set(
        &mut self,
        r: Resource<NamespaceRes>,
        key: String,
        value: Vec<u8>,
        cond: kv::WriteCondition,
        ttl: Option<u64>,
    ) -> wasmtime::Result<Result<u64, Error>> {
        let op = Op::Set {
            key,
            value,
            cond: condition(cond),
            ttl: ttl.map(Duration::from_millis),
        };
        self.start_kv(&r, op)
    }
    fn start_delete(
        &mut self,
        r: Resource<NamespaceRes>,
        key: String,
        cond: kv::WriteCondition,
    ) -> wasmtime::Result<Result<u64, Error>> {
        let op = Op::Delete {
            key,
            cond: condition(cond),
        };
        self.start_kv(&r, op)
    }
    fn start_increment(
        &mut self,
        r: Resource<NamespaceRes>,
        key: String,
        delta: i64,
        ttl: Option<u64>,
    ) -> wasmtime::Result<Result<u64, Error>> {
        let op = Op::Increment {
            key,
            delta,
            ttl: ttl.map(Duration::from_millis),
        };
        self.start_kv(&r, op)
    }
    fn drop(&mut self, r: Resource<NamespaceRes>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

// ---- callout: capability-gated; queued on the exchange, sent by the chain ----

impl HostState {
    /// Whether `context` has a callout outstanding.
    pub fn has_outstanding(&self, context: u64) -> bool {
        self.outstanding
            .get(&context)
            .is_some_and(|s| !s.is_empty())
    }

    /// Starts the callouts the last plugin-level call (`on-tick`, its callout
    /// responses) queued, each as the task `task` makes, on the worker's
    /// `LocalSet`, keeping their abort handles for `cancel`.
    pub fn start_tick_callouts<F: std::future::Future<Output = ()> + 'static>(
        &mut self,
        task: impl Fn(CalloutRequest) -> F,
    ) {
        if self.tick_callouts.is_empty() {
            return;
        }
        for req in std::mem::take(&mut self.tick_callouts) {
            let id = req.id;
            let h = tokio::task::spawn_local(task(req));
            self.tick_tasks.push(id, h.abort_handle());
        }
    }

    /// Marks callout `id` of `context` delivered; `false` if it was not outstanding
    /// (cancelled), in which case it must not be delivered.
    pub fn take_outstanding(&mut self, context: u64, id: u64) -> bool {
        let Some(set) = self.outstanding.get_mut(&context) else {
            return false;
        };
        let was = set.remove(&id);
        if set.is_empty() {
            self.outstanding.remove(&context);
        }
        self.outstanding_total = self.outstanding_total.saturating_sub(usize::from(was));
        was
    }

    /// Forgets every outstanding call of `context` (its exchange or
    /// connection is over: they are cancelled with it).
    pub fn forget_outstanding(&mut self, context: u64) {
        if let Some(set) = self.outstanding.remove(&context) {
            self.outstanding_total = self.outstanding_total.saturating_sub(set.len());
        }
    }

    /// A new id for a callout or KV call of `context`, counted as outstanding;
    /// `limit-exceeded` past the per-context or per-instance limit.
    fn reserve_id(&mut self, context: u64) -> Result<u64, Error> {
        let mine = self.outstanding.get(&context).map_or(0, HashSet::len);
        if mine >= CALLOUTS_PER_CONTEXT || self.outstanding_total >= CALLOUTS_PER_INSTANCE {
            return Err(Error::LimitExceeded);
        }
        self.next_callout += 1;
        let id = self.next_callout;
        self.outstanding.entry(context).or_default().insert(id);
        self.outstanding_total += 1;
        Ok(id)
    }

    fn build_callout(&self, r: callout::CalloutRequest) -> Result<CalloutRequest, Error> {
        let method =
            http::Method::from_bytes(r.method.as_bytes()).map_err(|_| Error::InvalidArgument)?;
        if !r.path.starts_with('/') || r.path.parse::<http::Uri>().is_err() {
            return Err(Error::InvalidArgument);
        }
        if r.timeout_ms > CALLOUT_MAX_TIMEOUT_MS {
            return Err(Error::InvalidArgument);
        }
        if let Some(a) = &r.authority {
            if a.parse::<http::uri::Authority>().is_err() {
                return Err(Error::InvalidArgument);
            }
        }
        let mut headers = HeaderMap::new();
        for (name, value) in r.headers {
            let n = field_name(&name)?;
            if denied_field(&n) {
                return Err(Error::InvalidArgument);
            }
            let v = field_value(value).map_err(|_| Error::InvalidArgument)?;
            put_field(&mut headers, n, v, false)?;
        }
        let timeout = if r.timeout_ms == 0 {
            CALLOUT_DEFAULT_TIMEOUT
        } else {
            Duration::from_millis(u64::from(r.timeout_ms))
        };
        Ok(CalloutRequest {
            id: 0,
            cluster: r.cluster,
            method,
            path: r.path,
            authority: r.authority,
            headers,
            body: r.body.into(),
            timeout,
            max_response_body: CALLOUT_MAX_RESPONSE,
        })
    }
}

// ---- network: the L4 `connection` (its facts are an `Exchange`, see
// `crate::network_filter::connection`) ----

impl super::bindings::network::legate::filter::network::Host for HostState {}

impl super::bindings::network::legate::filter::network::HostConnection for HostState {
    fn id(&mut self, r: Resource<ConnectionRes>) -> wasmtime::Result<u64> {
        Ok(self.connection_of(&r)?.context)
    }

    fn listener_name(&mut self, r: Resource<ConnectionRes>) -> wasmtime::Result<String> {
        Ok(self.connection_of(&r)?.authority.clone())
    }

    fn source_address(
        &mut self,
        r: Resource<ConnectionRes>,
    ) -> wasmtime::Result<types::SocketAddress> {
        Ok(socket_address(self.connection_of(&r)?.conn.source))
    }

    fn destination_address(
        &mut self,
        r: Resource<ConnectionRes>,
    ) -> wasmtime::Result<types::SocketAddress> {
        Ok(socket_address(self.connection_of(&r)?.conn.destination))
    }

    fn tls_version(
        &mut self,
        r: Resource<ConnectionRes>,
    ) -> wasmtime::Result<Option<types::TlsVersion>> {
        Ok(tls_version(&self.connection_of(&r)?.conn))
    }

    fn tls_sni(&mut self, r: Resource<ConnectionRes>) -> wasmtime::Result<Option<String>> {
        Ok(self.connection_of(&r)?.conn.sni())
    }

    fn tls_peer_certificate_presented(
        &mut self,
        r: Resource<ConnectionRes>,
    ) -> wasmtime::Result<bool> {
        Ok(self.connection_of(&r)?.conn.peer_cert_present())
    }

    fn tls_peer_subject(&mut self, r: Resource<ConnectionRes>) -> wasmtime::Result<Option<String>> {
        Ok(self.connection_of(&r)?.conn.peer_subject())
    }

    fn cluster(&mut self, r: Resource<ConnectionRes>) -> wasmtime::Result<Option<String>> {
        let path = &self.connection_of(&r)?.path;
        Ok((!path.is_empty()).then(|| path.clone()))
    }

    fn upstream_address(
        &mut self,
        r: Resource<ConnectionRes>,
    ) -> wasmtime::Result<Option<types::SocketAddress>> {
        Ok(self.connection_of(&r)?.upstream.map(socket_address))
    }

    fn start_time(&mut self, r: Resource<ConnectionRes>) -> wasmtime::Result<u64> {
        Ok(unix_nanos(self.connection_of(&r)?.start))
    }

    fn data(
        &mut self,
        r: Resource<ConnectionRes>,
        direction: types::Direction,
    ) -> wasmtime::Result<Option<Resource<BufferRes>>> {
        let d = dir(direction);
        let x = self.connection_of(&r)?;
        let context = x.context;
        if x.bodies[d.idx()].is_none() {
            return Ok(None);
        }
        Ok(Some(self.buffer_handle(context, d)?))
    }

    fn drop(&mut self, r: Resource<ConnectionRes>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

impl HostState {
    fn connection_of(&mut self, r: &Resource<ConnectionRes>) -> wasmtime::Result<&mut Exchange> {
        let context = self.table.get(r)?.context;
        self.exchange(context)
    }
}

impl HostState {
    /// Records a use of `name` that `capability` does not grant: its hint is
    /// kept for a failing `configure`'s error ([`HostState::denial`]). Outside
    /// `configure` it is also warned about, once per plugin and name; in it,
    /// the error says it (a WARN line before it would say it twice).
    fn deny(&mut self, capability: &'static str, name: &str) {
        let hint = if self.phase == Phase::Configure {
            self.configure_denials.push((capability, name.to_string()));
            self.plugin.grant_hint(capability, name)
        } else {
            self.plugin.denied(capability, name)
        };
        self.denial = self.denial.take().or(Some(hint));
    }

    /// `configure` succeeded: the denials it met, which no error reports, are
    /// warned about (once per plugin and name).
    pub fn configured(&mut self) {
        for (capability, name) in std::mem::take(&mut self.configure_denials) {
            self.plugin.denied(capability, &name);
        }
    }
}

impl callout::Host for HostState {
    fn check_cluster(&mut self, cluster: String) -> wasmtime::Result<Result<(), Error>> {
        if self.plugin.clusters.iter().any(|c| **c == *cluster) {
            return Ok(Ok(()));
        }
        self.deny("clusters", &cluster);
        Ok(Err(Error::Denied))
    }

    fn send(&mut self, request: callout::CalloutRequest) -> wasmtime::Result<Result<u64, Error>> {
        // Calls for an exchange and `on-tick` can send; `configure`, `on-log` and
        // `on-done` cannot.
        let tick = self.phase == Phase::Tick;
        if !(self.in_exchange || tick)
            || self.phase == Phase::Configure
            || self.phase == Phase::ReadOnly
        {
            return Ok(Err(Error::InvalidState));
        }
        if !tick && self.x.body_ctl.detached {
            // Its response would have no one to go to.
            return Ok(Err(Error::InvalidState));
        }
        if !self.plugin.clusters.iter().any(|c| **c == *request.cluster) {
            self.deny("clusters", &request.cluster);
            return Ok(Err(Error::Denied));
        }
        let mut req = match self.build_callout(request) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let context = if tick { PLUGIN_CONTEXT } else { self.x.context };
        let id = match self.reserve_id(context) {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        req.id = id;
        if tick {
            self.tick_callouts.push(req);
        } else {
            self.x.callouts.push(req);
        }
        self.plugin.callouts_sent.inc();
        Ok(Ok(id))
    }

    fn cancel(&mut self, id: u64) -> wasmtime::Result<Result<(), Error>> {
        let context = if self.phase == Phase::Tick {
            PLUGIN_CONTEXT
        } else {
            self.x.context
        };
        if (self.in_exchange || self.phase == Phase::Tick) && self.take_outstanding(context, id) {
            if context != PLUGIN_CONTEXT {
                // The chain aborts its request after this call.
                self.x.cancelled.push(id);
            } else if self.tick_tasks.abort(&id).is_none() {
                // Queued in this call, not started yet.
                self.tick_callouts.retain(|r| r.id != id);
            }
            Ok(Ok(()))
        } else {
            Ok(Err(Error::NotFound))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_names_the_capability_to_add_and_is_warned_once_per_name() {
        let p = PluginShared::new("p", Stats::new(), &[], &[]);
        let hint = "KV namespace `myns` is not granted to plugin `p`: add it to the plugin's \
                    `capabilities.kv`";
        assert_eq!(p.denied("kv", "myns"), hint);
        assert_eq!(p.denied("kv", "myns"), hint);
        assert_eq!(
            p.denied("clusters", "authz"),
            "cluster `authz` is not granted to plugin `p`: add it to the plugin's \
             `capabilities.clusters`"
        );
        assert_eq!(p.warned.lock().unwrap().len(), 2);
    }

    /// The host takes a filter's field names and values through the `http`
    /// crate; the SDK's harness checks them with `legate_abi_rules::headers`
    /// (`name_ok`, `value_ok`): the two must agree, byte for byte.
    #[test]
    fn http_takes_the_fields_the_rules_take() {
        for b in 0..=u8::MAX {
            let one = [b];
            if let Ok(name) = std::str::from_utf8(&one) {
                assert_eq!(
                    field_name(name).is_ok(),
                    legate_abi_rules::headers::name_ok(name),
                    "name {b:#04x}"
                );
            }
            let value = vec![b'a', b, b'z'];
            assert_eq!(
                field_value(value.clone()).is_ok(),
                legate_abi_rules::headers::value_ok(&value),
                "value {b:#04x}"
            );
        }
        for name in [
            "",
            "é",
            "X-Mixed-Case",
            &"a".repeat(0xFFFF),
            &"a".repeat(0x10000),
        ] {
            assert_eq!(
                field_name(name).is_ok(),
                legate_abi_rules::headers::name_ok(name),
                "name of {} bytes",
                name.len()
            );
        }
        assert!(field_value(Vec::new()).is_ok() && legate_abi_rules::headers::value_ok(b""));
    }

    /// Plugin `name`'s store data, in `configure`, counting into `stats`.
    fn configuring(name: &str, stats: &Arc<Stats>) -> HostState {
        HostState::new(
            Arc::new(PluginShared::new(name, stats.clone(), &[], &[])),
            0,
            1 << 20,
        )
    }

    #[test]
    fn a_metric_of_another_plugins_name_must_be_of_its_kind() {
        let stats = Stats::new();
        let mut a = configuring("a", &stats);
        let mut b = configuring("b", &stats);
        let define = |h: &mut HostState, kind| {
            h.define(kind, "hits".into(), "Hits.".into(), Vec::new())
                .unwrap()
                .map(|_| ())
        };
        assert!(define(&mut a, MetricKind::Counter).is_ok());
        // One family cannot hold a counter and a gauge (or histogram): refused,
        // and the family keeps its type.
        assert!(matches!(
            define(&mut b, MetricKind::Gauge),
            Err(Error::InvalidArgument)
        ));
        assert!(matches!(
            define(&mut b, MetricKind::Histogram),
            Err(Error::InvalidArgument)
        ));
        assert_eq!(stats.kind_of("legate_plugin_hits"), Some("counter"));
        assert!(stats.render().contains("# TYPE legate_plugin_hits counter"));
        assert!(!stats.render().contains("legate_plugin_hits{plugin=\"b\"}"));
        // The same kind is one family with a series per plugin.
        assert!(define(&mut b, MetricKind::Counter).is_ok());
        assert!(stats
            .render()
            .contains("legate_plugin_hits{plugin=\"b\"} 0"));
    }

    #[test]
    fn labels_that_would_break_a_scrape_are_refused() {
        let stats = Stats::new();
        let mut a = configuring("a", &stats);
        let mut define = |kind, name: &str, labels: &[&str]| {
            a.define(
                kind,
                name.into(),
                String::new(),
                labels.iter().map(|l| l.to_string()).collect(),
            )
            .unwrap()
            .map(|_| ())
        };
        // `x{r="1",r="2"}` and `lat_bucket{le="a",le="0.5"}` are series
        // Prometheus refuses, failing the whole scrape.
        for (kind, name, labels) in [
            (MetricKind::Counter, "x", &["r", "r"][..]),
            (MetricKind::Histogram, "lat", &["le"][..]),
        ] {
            assert!(
                matches!(define(kind, name, labels), Err(Error::InvalidArgument)),
                "{name} {labels:?}"
            );
        }
        assert!(define(MetricKind::Counter, "le_total", &["le"]).is_ok());
        assert!(define(MetricKind::Histogram, "lat", &["route"]).is_ok());
    }

    #[test]
    fn a_histogram_gets_the_buckets_it_defines() {
        let stats = Stats::new();
        let mut a = configuring("a", &stats);
        let mut define = |name: &str, buckets: &[f64]| {
            a.define_over(
                MetricKind::Histogram,
                name.into(),
                String::new(),
                Vec::new(),
                buckets,
            )
            .unwrap()
            .map(|_| ())
        };
        for bad in [
            &[10.0, 1.0][..],
            &[1.0, 1.0],
            &[f64::NAN],
            &[1.0, f64::INFINITY],
            &[0.5; 65],
        ] {
            assert!(
                matches!(define("bad", bad), Err(Error::InvalidArgument)),
                "{bad:?}"
            );
        }
        assert!(define("sizes", &[100.0, 1000.0]).is_ok());
        // The same name over other buckets is another definition.
        assert!(matches!(
            define("sizes", &[100.0]),
            Err(Error::InvalidArgument)
        ));
        let text = stats.render();
        assert!(
            text.contains("legate_plugin_sizes_bucket{plugin=\"a\",le=\"1000\"} 0"),
            "{text}"
        );
        assert!(!text.contains("le=\"0.0005\""), "{text}");
    }

    #[test]
    fn a_labelled_metric_holds_its_kind_before_its_first_series() {
        let stats = Stats::new();
        let mut a = configuring("a", &stats);
        let mut b = configuring("b", &stats);
        let labels = || vec!["route".to_string()];
        assert!(a
            .define(MetricKind::Histogram, "lat".into(), String::new(), labels())
            .unwrap()
            .is_ok());
        // No series yet (labelled): the kind was still declared.
        assert_eq!(stats.kind_of("legate_plugin_lat"), Some("histogram"));
        assert!(matches!(
            b.define(MetricKind::Counter, "lat".into(), String::new(), labels())
                .unwrap(),
            Err(Error::InvalidArgument)
        ));
    }

    #[test]
    fn the_instance_limit_counts_every_contexts_calls_until_they_end() {
        let shared = Arc::new(PluginShared::new("t", Arc::default(), &[], &[]));
        let mut h = HostState::new(shared, 0, 1 << 20);
        let contexts = (CALLOUTS_PER_INSTANCE / CALLOUTS_PER_CONTEXT) as u64;
        let mut first = Vec::new();
        for c in 0..contexts {
            for i in 0..CALLOUTS_PER_CONTEXT {
                let id = h.reserve_id(c).expect("under both limits");
                if i == 0 {
                    first.push(id);
                }
            }
            assert!(matches!(h.reserve_id(c), Err(Error::LimitExceeded)));
        }
        let other = contexts + 1;
        assert!(matches!(h.reserve_id(other), Err(Error::LimitExceeded)));
        // A delivered call frees its slot, once.
        assert!(h.take_outstanding(0, first[0]));
        assert!(!h.take_outstanding(0, first[0]));
        assert!(h.reserve_id(other).is_ok());
        assert!(matches!(h.reserve_id(other), Err(Error::LimitExceeded)));
        // An exchange that ends frees all of its slots.
        h.forget_outstanding(1);
        for _ in 0..CALLOUTS_PER_CONTEXT - 1 {
            assert!(h.reserve_id(other).is_ok());
        }
        // `other` is at its own limit; one slot of the instance is left.
        assert!(matches!(h.reserve_id(other), Err(Error::LimitExceeded)));
        assert!(h.reserve_id(other + 1).is_ok());
        assert!(matches!(h.reserve_id(other + 2), Err(Error::LimitExceeded)));
    }
}

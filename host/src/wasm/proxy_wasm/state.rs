//! The data of one proxy-wasm instance's store ([`PwState`]) and what every
//! instance of one plugin shares ([`Meta`]): identity, configuration buffers and
//! the metrics the module defined. The store also holds the VM's gRPC streams
//! (their handles: dropping the store ends them).

use std::collections::VecDeque;

// Context ids and tokens are the host's: Fx hashing, touched on every call.
use rustc_hash::{FxHashMap, FxHashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::HeaderMap;
use wasmtime::{Memory, StoreLimits, StoreLimitsBuilder, TypedFunc};

use super::abi::Pairs;
use super::grpc::{Pending, Stream, StreamWait};
use crate::filter::{CalloutRequest, CalloutResult, Direction, Exchange, LocalResponse};
use crate::stats::{Counter, Gauge, Histogram, Stats};

/// The root context's id in a VM of one plugin (ids come from one counter per
/// VM; 0 is reserved). A shared VM's plugins have roots 1, 2, ….
pub const ROOT_CONTEXT: u32 = 1;

/// What a call may touch now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A root-context call (start, configure, tick): no exchange.
    Root,
    /// `proxy_on_request_headers`: the request head is writable.
    RequestHeaders,
    /// `proxy_on_response_headers`: the response head is writable.
    ResponseHeaders,
    /// `proxy_on_request_body` / `proxy_on_response_body` (by direction): that
    /// body buffer is readable and writable.
    Body(Direction),
    /// `proxy_on_request_trailers` / `proxy_on_response_trailers` (by
    /// direction): those trailers are writable.
    Trailers(Direction),
    /// `proxy_on_http_call_response`: the head the exchange is held at (request
    /// before a response exists, else response) is writable.
    CalloutResponse,
    /// `on_done`, `on_log`, `on_delete`: read-only.
    ReadOnly,
    /// `proxy_on_downstream_data` (`Request`) / `proxy_on_upstream_data`
    /// (`Response`) on a TCP connection: that data buffer (2 or 3) is readable
    /// and writable.
    Data(Direction),
    /// `proxy_on_new_connection` and the close callbacks of a TCP connection.
    Connection,
}

/// The bucket bounds of a proxy-wasm histogram: Envoy's default buckets
/// (`HistogramSettingsImpl::defaultBuckets`) in the unit the plugin records
/// in. Envoy defines a plugin's histogram with `Unit::Unspecified` and
/// records the value as given, so its Prometheus buckets are these numbers
/// as they are (for a plugin recording milliseconds, 0.5 ms to 1 h).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// A metric the module defined: its kind and series.
#[derive(Clone)]
pub enum Metric {
    /// `COUNTER`.
    Counter(Counter),
    /// `GAUGE`.
    Gauge(Gauge),
    /// `HISTOGRAM`: values recorded as given, over [`BUCKETS`].
    Histogram(Histogram),
}

/// What all instances (workers) of one loaded plugin share.
pub struct Meta {
    /// Plugin name (`plugin_name`).
    pub name: Arc<str>,
    /// `plugin_root_id`.
    pub root_id: String,
    /// `plugin_vm_id`: scope of shared data and queues.
    pub vm_id: String,
    /// The VM configuration buffer.
    pub vm_config: Vec<u8>,
    /// The plugin configuration buffer.
    pub plugin_config: Vec<u8>,
    /// The process's metrics registry.
    pub stats: Arc<Stats>,
    /// The metrics of the plugin's VM (its own, or the shared VM's), shared
    /// by every worker's instance so that ids agree.
    pub metrics: Arc<Metrics>,
    /// Clusters granted for `proxy_http_call` (`capabilities.clusters`).
    pub clusters: Vec<String>,
    /// `legate_plugin_callouts_total`.
    pub callouts_sent: Counter,
    /// `legate_plugin_grpc_streams_total`: gRPC streams opened.
    pub grpc_streams: Counter,
    /// `legate_plugin_grpc_streams_open`: gRPC streams not closed yet.
    pub grpc_streams_open: Gauge,
    /// `legate_plugin_grpc_stream_messages_total`: messages streams received.
    pub grpc_stream_messages: Counter,
    /// `legate_plugin_grpc_stream_failures_total`: streams closed with a
    /// status other than 0.
    pub grpc_stream_failures: Counter,
    /// The cap of a body the filter holds (`Pause` from a body callback) and of
    /// body buffer writes, per direction per exchange.
    pub body_limit: usize,
}

/// Most metrics one VM may define (as for component plugins).
pub const MAX_METRICS: usize = 100;

/// The id of the metric of kind `k` (0–2) that `proxy_define_metric` gives
/// for a name this host does not export ([`Meta::sink`]): the last three ids.
const SINK_IDS: u32 = u32::MAX - 2;

/// The metrics one VM defined, by id, as Envoy keeps them per VM (its
/// `Wasm`): in a VM shared by several plugins (`vm_id`), a metric one
/// plugin's root context defined (say in `proxy_on_vm_start`) has the same id
/// for the others, and their ids never collide. A VM of one plugin has its
/// own table. The series are labelled `plugin` with the VM's first plugin
/// (`owner`), the one its memory counts for too.
pub struct Metrics {
    /// The `plugin` label of the series.
    owner: Arc<str>,
    /// Metrics by id (index + 1).
    defs: Mutex<Vec<(String, Metric)>>,
    /// A name past [`MAX_METRICS`], and one refused for another reason (a
    /// type clash, an empty or too long name), were logged.
    warned: [std::sync::atomic::AtomicBool; 2],
}

impl Metrics {
    /// An empty table whose series are labelled `plugin="<owner>"`.
    pub fn new(owner: &str) -> Arc<Self> {
        Arc::new(Metrics {
            owner: owner.into(),
            defs: Mutex::default(),
            warned: Default::default(),
        })
    }
}

impl Meta {
    /// Defines (or finds) metric `name` of `kind` (0 counter, 1 gauge, 2 histogram)
    /// in the VM's table; `None` for a bad kind, a kind clash or too many metrics.
    pub fn define_metric(&self, kind: i32, name: &str) -> Option<u32> {
        let owner = &*self.metrics.owner;
        let mut defs = self
            .metrics
            .defs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = defs.iter().position(|(n, _)| n == name) {
            let same = matches!(
                (kind, &defs[i].1),
                (0, Metric::Counter(_)) | (1, Metric::Gauge(_)) | (2, Metric::Histogram(_))
            );
            return same.then(|| u32::try_from(i + 1).ok()).flatten();
        }
        if defs.len() >= MAX_METRICS || name.is_empty() || name.len() > 200 {
            return None;
        }
        let prom = format!("legate_proxywasm_{}", sanitize(name));
        {
            // The cap holds over reloads too: the series stay on `/stats`.
            let claims = self.stats.claims(&format!("proxy-wasm/{owner}"));
            let mut made = claims.lock().unwrap_or_else(PoisonError::into_inner);
            if !made.iter().any(|(n, _)| *n == prom) {
                if made.len() >= MAX_METRICS {
                    return None;
                }
                made.insert((crate::stats::intern(prom.clone()), Vec::new()));
            }
        }
        let prom = crate::stats::intern(prom);
        let labels = [("plugin", owner)];
        let help = "A metric defined by a proxy-wasm plugin (proxy_define_metric).";
        // One type per family, across plugins and across names that sanitize
        // to the same one; and no family writing a histogram's sample names.
        let type_name = match kind {
            0 => "counter",
            1 => "gauge",
            2 => "histogram",
            _ => return None,
        };
        if !self.stats.declare(prom, help, type_name) {
            return None;
        }
        let m = match kind {
            0 => Metric::Counter(self.stats.counter(prom, help, &labels)),
            1 => Metric::Gauge(self.stats.gauge(prom, help, &labels)),
            2 => Metric::Histogram(self.stats.histogram_over(prom, help, &labels, &BUCKETS)),
            _ => return None,
        };
        defs.push((name.to_string(), m));
        u32::try_from(defs.len()).ok()
    }

    /// The id `proxy_define_metric` gives for metric `name` of `kind` (0–2),
    /// which [`Self::define_metric`] refused (past [`MAX_METRICS`], a type
    /// clash, an empty or too long name): one that records into nothing, as
    /// a warning says once per VM and reason. Envoy defines all of them, and
    /// the Rust SDK's `define_metric` panics on any status but `OK`: a
    /// filter whose metric names carry values (a status code, a peer, as
    /// Istio's and OSM's do) trapped on its 101st name, failing the request.
    pub fn sink(&self, kind: i32, name: &str) -> Option<u32> {
        let kind = u32::try_from(kind).ok().filter(|k| *k <= 2)?;
        let over = self
            .metrics
            .defs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            >= MAX_METRICS;
        let warned = &self.metrics.warned[usize::from(!over)];
        if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let why = if over {
                format!("the VM defined {MAX_METRICS} metrics already, the most it may")
            } else {
                "another metric has that name with another type, or the name is empty, \
                 over 200 bytes, or a histogram's sample name"
                    .to_string()
            };
            tracing::warn!(
                plugin = &*self.name,
                "metric `{name}` (and any later one refused so) records into nothing and is not \
                 on /stats: {why}"
            );
        }
        Some(SINK_IDS + kind)
    }

    /// The metric with id `id`.
    pub fn metric(&self, id: u32) -> Option<Metric> {
        if id >= SINK_IDS {
            // A metric not exported: detached, fresh each time.
            return Some(match id - SINK_IDS {
                0 => Metric::Counter(Counter::default()),
                1 => Metric::Gauge(Gauge::default()),
                _ => Metric::Histogram(Histogram::default()),
            });
        }
        let defs = self
            .metrics
            .defs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let i = usize::try_from(id).ok()?.checked_sub(1)?;
        defs.get(i).map(|(_, m)| m.clone())
    }
}

/// A Prometheus-safe metric name: Envoy-style `a.b-c` becomes `a_b_c`.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The data of one instance's store.
pub struct PwState {
    /// The current call's deadline clock ([`crate::wasm::engine::arm`]).
    pub clock: crate::wasm::engine::CallClock,
    /// The memory cap.
    pub limits: StoreLimits,
    /// What the guest wrote to stdout (0) and stderr (1) after its last
    /// newline: logged once the line ends ([`Self::stdio_lines`]), or when
    /// the VM is dropped.
    stdio_partial: [Vec<u8>; 2],
    /// The memory cap, for the instance's linear memories together (`limits`
    /// applies it to each alone).
    memory_cap: usize,
    /// The last memory growth the limiter refused: at instantiation, a module
    /// whose memory starts over the cap ([`crate::wasm::engine::instantiate_error`]).
    pub refused_memory: Option<crate::wasm::engine::RefusedMemory>,
    /// Linear memory the VM holds (in the per-worker gauge, except for the
    /// load-time check's VM).
    pub memory_use: crate::wasm::slots::MemoryUse,
    /// The plugin.
    pub meta: Arc<Meta>,
    /// The guest's exported memory (looked up on first use).
    pub memory: Option<Memory>,
    /// The guest's allocator (`malloc` or `proxy_on_memory_allocate`).
    /// Behind an `Arc`: cloned out for every allocation (a `TypedFunc` clone is
    /// ~170 instructions; the store data must be `Send`).
    pub alloc: Option<Arc<TypedFunc<i32, i32>>>,
    /// The current call's phase.
    pub phase: Phase,
    /// The exchange of the current call, swapped in for the call (a placeholder
    /// otherwise).
    pub x: Exchange,
    /// The proxy-wasm context id of `x` (0 when no exchange is live).
    pub x_context: u32,
    /// The context `proxy_set_effective_context` chose (the called one by default).
    pub effective: u32,
    /// Live context ids of this VM (root, HTTP and TCP).
    pub contexts: FxHashSet<u32>,
    /// The first id after the root contexts (HTTP and TCP contexts are above).
    pub first_context: u32,
    /// The live TCP contexts among `contexts`.
    pub tcp_contexts: FxHashSet<u32>,
    /// Local responses sent by HTTP contexts from a callback outside their
    /// exchange (a gRPC stream event while not paused, a root context's tick
    /// or callout response after `proxy_set_effective_context`): answered
    /// when their pause wakes, else at the exchange's next phase call, as
    /// Envoy answers at once.
    pub pending_local: FxHashMap<u32, LocalResponse>,
    /// HTTP contexts reset (`proxy_close_stream`) from a callback outside
    /// their exchange (a root context's tick or callout response, a stream
    /// event, another context's callback, after `proxy_set_effective_context`):
    /// reset when their pause wakes, else at the exchange's next phase call.
    /// TCP contexts closed so: closed when their pause wakes, else at their
    /// connection's next callback.
    pub pending_close: FxHashSet<u32>,
    /// Paused HTTP and TCP contexts resumed (`proxy_continue_stream`) from a
    /// callback outside their exchange or connection, with the stream types
    /// named (bit `1 << type`): taken when their pause wakes
    /// ([`Self::stream_waits`], [`Self::net_waits`]). A continue for a
    /// context that is not paused is not kept (as in Envoy, it does nothing).
    pub pending_resume: FxHashMap<u32, u8>,
    /// TCP contexts with a pause the chain holds (`Pause` from a connection
    /// or data callback, or from a call's callback that leaves one): the
    /// wake-up that another callback's `proxy_continue_stream` or
    /// `proxy_close_stream` after `proxy_set_effective_context` fires
    /// (`ProxyWasmFilter::net_wake` takes what it asked). Armed at the first
    /// such pause and kept until it fires; its `held` is always empty (a TCP
    /// context's gRPC stream events are not held).
    pub net_waits: FxHashMap<u32, super::grpc::StreamWait>,
    /// The message maps (request and response heads and trailers, map types
    /// 0–3) of HTTP contexts with a gRPC stream open, as their last callback
    /// left them: what their stream callbacks outside the exchange read
    /// (Envoy keeps a stream's maps for its life; this host's exchange is
    /// elsewhere then).
    pub kept_maps: FxHashMap<u32, Box<[Pairs; 4]>>,
    /// A local response sent during the current call.
    pub local: Option<LocalResponse>,
    /// The guest asked to reset the stream (`proxy_close_stream`).
    pub close: bool,
    /// The root context of the plugin being called (each plugin of a shared
    /// VM has its own; [`ROOT_CONTEXT`] in a VM of one plugin).
    pub root: u32,
    /// Tick periods, by root context (`proxy_set_tick_period_milliseconds`).
    pub ticks: FxHashMap<u32, Duration>,
    /// By root context, woken when `proxy_set_tick_period_milliseconds`
    /// changes its period: that root's tick task re-arms at once with the new
    /// one (Envoy's `setTickPeriod`), rather than after the old period ran
    /// out. Made by the tick task.
    pub tick_changed: FxHashMap<u32, Arc<tokio::sync::Notify>>,
    /// Properties set by contexts called without their exchange (root
    /// contexts; HTTP and TCP contexts made effective by another callback),
    /// by context: moved to the exchange at the context's next property call
    /// with it (values set with the exchange are the exchange's,
    /// `ExchangeData::wasm_props`). Capped per context, dropped with it.
    pub props: FxHashMap<u32, super::properties::Props>,
    /// Queues registered since the host last looked (for `proxy_on_queue_ready`),
    /// with the root context of the plugin that registered each (in a shared
    /// VM started by one plugin, each plugin's `proxy_on_configure` registers
    /// its own).
    pub new_queues: Vec<(u32, u32)>,
    /// The callout result being delivered (`proxy_on_http_call_response`): read
    /// through map 6 and buffer 4.
    pub call_response: Option<CalloutResult>,
    /// `proxy_continue_stream` was called during the current call.
    pub resume: bool,
    /// The stream types it named (bit `1 << type`, types 0–3): a TCP
    /// connection resumes only the directions named.
    pub resumed_streams: u8,
    /// The last callout token handed out.
    pub next_token: u32,
    /// Callouts sent and not yet delivered: token → the context that sent it.
    pub outstanding: FxHashMap<u32, u32>,
    /// The tokens of `outstanding` that are gRPC calls (`proxy_grpc_call`).
    pub grpc_calls: FxHashSet<u32>,
    /// The gRPC response message being delivered (`proxy_on_grpc_receive`),
    /// read through buffer 5.
    pub grpc_message: Option<bytes::Bytes>,
    /// The gRPC status being delivered (`proxy_on_grpc_close`), read with
    /// `proxy_get_status`: code and message.
    pub grpc_status: Option<(u32, String)>,
    /// Callouts sent from a root context (ticks, queue events, configure),
    /// sent by that root's plugin after the call: (root context, request).
    pub root_callouts: Vec<(u32, CalloutRequest)>,
    /// The tasks of root-context callouts in flight, by token, so that
    /// `proxy_grpc_cancel` can abort them (pruned of finished ones as new
    /// ones start).
    pub root_tasks: crate::filter::Aborts<u32>,
    /// gRPC streams by token (open, or closed by the server and remembered).
    pub streams: FxHashMap<u32, Stream>,
    /// Streams opened during the current call, started by the filter after it.
    pub new_streams: Vec<Pending>,
    /// Tokens of `streams` the server closed, oldest first (bounded).
    pub remote_closed: VecDeque<u32>,
    /// The stream's initial metadata being delivered (map 4,
    /// `proxy_on_grpc_receive_initial_metadata`), with `:status` as Envoy's
    /// response head has it.
    pub grpc_initial: Option<Pairs>,
    /// The stream's trailing metadata being delivered (map 5,
    /// `proxy_on_grpc_receive_trailing_metadata`).
    pub grpc_trailing: Option<HeaderMap>,
    /// HTTP contexts paused (any `Pause` the chain holds the exchange for),
    /// by context: the wake-up that delivers, with the exchange, the events
    /// of their gRPC streams held meanwhile and what callbacks outside the
    /// exchange asked of them (`pending_*`). Present exactly while the
    /// context is paused.
    pub stream_waits: FxHashMap<u32, StreamWait>,
}

impl crate::wasm::engine::Clocked for PwState {
    fn call_clock(&mut self) -> &mut crate::wasm::engine::CallClock {
        &mut self.clock
    }
}

impl Drop for PwState {
    /// The VM is gone: what it wrote without a final newline is logged.
    fn drop(&mut self) {
        for (which, level) in [(0, 2), (1, 4)] {
            let rest = std::mem::take(&mut self.stdio_partial[which]);
            if !rest.is_empty() {
                super::imports::log_as(&self.meta.name, level, &rest);
            }
        }
    }
}

impl PwState {
    /// A store's data for an instance of `meta`.
    pub fn new(meta: Arc<Meta>, memory_cap: usize) -> Self {
        PwState {
            clock: crate::wasm::engine::CallClock::default(),
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_cap)
                .trap_on_grow_failure(false)
                .build(),
            memory_cap,
            stdio_partial: Default::default(),
            refused_memory: None,
            memory_use: crate::wasm::slots::MemoryUse::default(),
            meta,
            memory: None,
            alloc: None,
            phase: Phase::Root,
            x: Exchange::placeholder(),
            x_context: 0,
            effective: ROOT_CONTEXT,
            contexts: FxHashSet::from_iter([ROOT_CONTEXT]),
            first_context: ROOT_CONTEXT + 1,
            tcp_contexts: FxHashSet::default(),
            pending_local: FxHashMap::default(),
            pending_close: FxHashSet::default(),
            pending_resume: FxHashMap::default(),
            net_waits: FxHashMap::default(),
            kept_maps: FxHashMap::default(),
            local: None,
            close: false,
            root: ROOT_CONTEXT,
            ticks: FxHashMap::default(),
            tick_changed: FxHashMap::default(),
            props: FxHashMap::default(),
            new_queues: Vec::new(),
            call_response: None,
            grpc_calls: FxHashSet::default(),
            grpc_message: None,
            grpc_status: None,
            resume: false,
            resumed_streams: 0,
            next_token: 0,
            outstanding: FxHashMap::default(),
            root_callouts: Vec::new(),
            root_tasks: crate::filter::Aborts::new(),
            streams: FxHashMap::default(),
            new_streams: Vec::new(),
            remote_closed: VecDeque::new(),
            grpc_initial: None,
            grpc_trailing: None,
            stream_waits: FxHashMap::default(),
        }
    }

    /// The whole lines `data`, written to stdout (`which` 0) or stderr (1),
    /// completes, without their newlines; the rest waits for the next write.
    /// Rust's `eprintln!` and std's panic and allocation-failure messages
    /// write one line in several calls, each of which was logged as a line
    /// of its own (and the failure's reason was then the last fragment). A
    /// line longer than [`crate::wasm::stdio::MAX_LINE`] is given in pieces,
    /// as the component host does.
    pub fn stdio_lines(&mut self, which: usize, mut data: &[u8]) -> Vec<Vec<u8>> {
        use crate::wasm::stdio::MAX_LINE;
        let partial = &mut self.stdio_partial[which.min(1)];
        let mut lines = Vec::new();
        loop {
            let nl = data.iter().position(|&b| b == b'\n');
            let take = nl.unwrap_or(data.len());
            partial.extend_from_slice(&data[..take]);
            while partial.len() > MAX_LINE {
                let rest = partial.split_off(MAX_LINE);
                lines.push(std::mem::replace(partial, rest));
            }
            let Some(nl) = nl else {
                break;
            };
            lines.push(std::mem::take(partial));
            data = &data[nl + 1..];
        }
        lines.retain(|l| !l.is_empty());
        lines
    }

    /// Forgets the callouts of context `pw`, which is gone: their tasks are
    /// aborted with its exchange and nothing is delivered, so their tokens
    /// leave `outstanding` and `grpc_calls` (a gRPC token left behind would
    /// stay for the VM's life, and make a later HTTP callout that reuses the
    /// token after the counter wraps look like a gRPC call).
    pub fn drop_calls_of(&mut self, pw: u32) {
        // (Each sweep only when there is something to sweep.)
        if !self.outstanding.is_empty() {
            self.outstanding.retain(|_, c| *c != pw);
        }
        if !self.grpc_calls.is_empty() {
            let outstanding = &self.outstanding;
            self.grpc_calls.retain(|t| outstanding.contains_key(t));
        }
    }

    /// A new callout or stream token (never 0).
    pub fn new_token(&mut self) -> u32 {
        self.next_token = self.next_token.wrapping_add(1).max(1);
        self.next_token
    }

    /// The effective context if it is an HTTP context called outside its
    /// exchange (a gRPC stream callback while it is not paused, or a context
    /// another callback made effective).
    pub fn detached_http(&self) -> Option<u32> {
        let c = self.effective;
        // Not while the context itself ends (`on_done` without the exchange,
        // after a failure) nor from a TCP callback.
        let phase_ok = !matches!(
            self.phase,
            Phase::ReadOnly | Phase::Data(_) | Phase::Connection
        );
        (phase_ok
            && c >= self.first_context
            && !(self.x_context != 0 && c == self.x_context)
            && self.contexts.contains(&c)
            && !self.tcp_contexts.contains(&c))
        .then_some(c)
    }

    /// The effective context if it is a TCP context called outside its
    /// connection's callbacks (made effective by a tick, a queue event, a
    /// root or other context's callback, or a gRPC stream callback).
    pub fn detached_tcp(&self) -> Option<u32> {
        let c = self.effective;
        (!matches!(self.phase, Phase::ReadOnly)
            && c >= self.first_context
            && !(self.x_context != 0 && c == self.x_context)
            && self.tcp_contexts.contains(&c))
        .then_some(c)
    }

    /// Keeps the message maps of `x_context`'s exchange for its stream
    /// callbacks outside the exchange ([`Self::kept_maps`]) if it has a gRPC
    /// stream open; forgets them once it has none. Called at the end of each
    /// call with an exchange, so only a context with streams pays.
    pub fn keep_maps(&mut self) {
        let c = self.x_context;
        let streaming = self
            .streams
            .values()
            .any(|st| st.context == c && !st.remote_closed);
        if !streaming || self.tcp_contexts.contains(&c) {
            if !self.kept_maps.is_empty() {
                self.kept_maps.remove(&c);
            }
            return;
        }
        let effective = std::mem::replace(&mut self.effective, c);
        let maps = [0, 1, 2, 3].map(|which| super::headers::pairs(self, which).unwrap_or_default());
        self.effective = effective;
        self.kept_maps.insert(c, Box::new(maps));
    }

    /// The live exchange, if the effective context is the one whose exchange is in
    /// the store.
    pub fn exchange(&mut self) -> Option<&mut Exchange> {
        (self.x_context != 0 && self.effective == self.x_context).then_some(&mut self.x)
    }
}

impl wasmtime::ResourceLimiter for PwState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let delta = desired.saturating_sub(current);
        // Past the cap, `memory.grow` fails (-1); it does not trap (abi §7).
        let ok = self.memory_use.admit(delta, self.memory_cap)
            && self.limits.memory_growing(current, desired, maximum)?;
        if ok {
            self.memory_use.grew(delta);
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

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A plugin's shared data for host unit tests, granted cluster `authz`.
    pub fn meta() -> Arc<Meta> {
        meta_in(Stats::new())
    }

    /// [`meta`] registering its metrics in `stats`.
    fn meta_in(stats: Arc<Stats>) -> Arc<Meta> {
        let c = |n: &'static str| stats.counter(n, "test", &[("plugin", "t")]);
        Arc::new(Meta {
            name: "t".into(),
            root_id: String::new(),
            vm_id: String::new(),
            vm_config: Vec::new(),
            plugin_config: Vec::new(),
            stats: stats.clone(),
            metrics: Metrics::new("t"),
            clusters: vec!["authz".to_string()],
            callouts_sent: c("t_callouts"),
            grpc_streams: c("t_streams"),
            grpc_streams_open: stats.gauge("t_open", "test", &[("plugin", "t")]),
            grpc_stream_messages: c("t_messages"),
            grpc_stream_failures: c("t_failures"),
            body_limit: 1 << 20,
        })
    }

    #[test]
    fn stdio_is_logged_by_line_whatever_the_writes() {
        let mut s = PwState::new(meta(), 1 << 20);
        // std's allocation-failure message, as Rust writes it: in pieces.
        assert!(s.stdio_lines(1, b"memory allocation of ").is_empty());
        assert!(s.stdio_lines(1, b"33554432").is_empty());
        assert_eq!(
            s.stdio_lines(1, b" bytes failed\n"),
            vec![b"memory allocation of 33554432 bytes failed".to_vec()]
        );
        // Several lines in one write, empty ones skipped; stdout apart.
        assert!(s.stdio_lines(0, b"out ").is_empty());
        assert_eq!(
            s.stdio_lines(1, b"a\n\nb\nc"),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert_eq!(s.stdio_lines(0, b"line\n"), vec![b"out line".to_vec()]);
        // A line over the cap comes in pieces of it.
        let long = vec![b'x'; crate::wasm::stdio::MAX_LINE + 10];
        let lines = s.stdio_lines(0, &long);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), crate::wasm::stdio::MAX_LINE);
        assert_eq!(s.stdio_lines(0, b"\n"), vec![vec![b'x'; 10]]);
        assert_eq!(s.stdio_partial[1], b"c");
    }

    #[test]
    fn a_metric_refused_gets_an_id_that_records_into_nothing() {
        let m = meta();
        for i in 0..MAX_METRICS {
            assert!(m.define_metric(0, &format!("m{i}")).is_some());
        }
        assert_eq!(m.define_metric(0, "over"), None);
        let id = m.sink(0, "over").unwrap();
        assert!(matches!(m.metric(id), Some(Metric::Counter(_))));
        assert!(matches!(
            m.metric(m.sink(1, "g").unwrap()),
            Some(Metric::Gauge(_))
        ));
        assert!(matches!(
            m.metric(m.sink(2, "h").unwrap()),
            Some(Metric::Histogram(_))
        ));
        // An unknown kind is still refused, as in Envoy.
        assert_eq!(m.sink(3, "x"), None);
        // Defined ones keep their ids.
        assert_eq!(m.define_metric(0, "m0"), Some(1));
    }

    #[test]
    fn the_metric_cap_holds_over_reloads() {
        let stats = Stats::new();
        let first = meta_in(stats.clone());
        for i in 0..MAX_METRICS {
            assert!(first.define_metric(0, &format!("m{i}")).is_some());
        }
        assert_eq!(first.define_metric(0, "new"), None);
        // The plugin loaded again: its metrics again, but nothing new (the
        // old series are still on /stats).
        let again = meta_in(stats);
        assert!(again.define_metric(0, "m7").is_some());
        assert_eq!(again.define_metric(0, "new"), None);
    }

    #[test]
    fn a_metric_family_keeps_one_type_and_its_own_sample_names() {
        let stats = Stats::new();
        let (a, b) = (meta_in(stats.clone()), meta_in(stats.clone()));
        assert!(a.define_metric(2, "lat").is_some());
        // Another type under the same family, also through a name that
        // sanitizes to it: refused (it was a metric detached from /stats).
        assert_eq!(b.define_metric(0, "lat"), None);
        assert!(a.define_metric(0, "x_y").is_some());
        assert_eq!(b.define_metric(1, "x.y"), None);
        // A family writing the histogram's own sample names: refused (its
        // series were duplicates of `legate_proxywasm_lat_count`).
        assert_eq!(b.define_metric(0, "lat_count"), None);
        assert_eq!(b.define_metric(0, "lat.sum"), None);
        // Other `_count` names are fine: Envoy filters use them.
        assert!(b.define_metric(0, "requests_count").is_some());
        let text = stats.render();
        assert_eq!(
            text.matches("# TYPE legate_proxywasm_lat ").count(),
            1,
            "{text}"
        );
        assert!(
            !text.contains("# TYPE legate_proxywasm_lat_count"),
            "{text}"
        );
    }

    #[test]
    fn a_context_leaves_no_grpc_token_behind() {
        let mut s = PwState::new(meta(), 1 << 20);
        // Context 7's calls (1 gRPC, 2 HTTP) and context 8's gRPC call 3.
        s.outstanding.extend([(1, 7), (2, 7), (3, 8)]);
        s.grpc_calls.extend([1, 3]);
        s.drop_calls_of(7);
        assert_eq!(s.outstanding.keys().copied().collect::<Vec<_>>(), [3]);
        assert_eq!(s.grpc_calls.iter().copied().collect::<Vec<_>>(), [3]);
        s.drop_calls_of(8);
        assert!(s.outstanding.is_empty() && s.grpc_calls.is_empty());
    }
}

//! The native backend: an in-memory host that follows the ABI's rules (write
//! windows, header validation, capabilities, metric definition in `configure`,
//! KV versions and TTLs on a settable clock, callout bookkeeping). The public
//! face is [`testing`](crate::testing); the thread's current fake host is
//! installed by the harness around each call into the filter.

#![allow(missing_docs)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::rc::Rc;

use crate::callout::{CalloutRequest, CalloutResponse};
use crate::kv::{Backend, Entry, Op, Reply, WriteCondition};
use crate::log::Level;
use crate::types::{BodyMode, Direction, HttpVersion, TlsVersion};
use crate::Error;
// What the host refuses (writes to its own fields; metric names, labels, caps),
// by the same rules.
use legate_abi_rules::headers::{host_owned, is_tchar};
use legate_abi_rules::limits::{
    CALLOUTS_PER_CONTEXT, CALLOUTS_PER_INSTANCE, CALLOUT_MAX_TIMEOUT_MS, MAX_FILTER_FIELDS,
    MAX_FILTER_FIELD_VALUE, RESPONSE_STATUS,
};
use legate_abi_rules::metrics::{self, MAX_HELP, MAX_METRICS, MAX_SERIES};

pub(crate) type FieldList = Vec<(String, Vec<u8>)>;

/// What the running call is, for the calls whose validity depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Idle,
    Configure,
    Exchange(u64),
    Log(u64),
    /// `on-done`: no exchange (as on the host, which runs it read-only).
    Done,
    Tick,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SeriesValue {
    Counter(u64),
    Gauge(i64),
    Histogram(Vec<f64>),
}

/// A metric family on the proxy's `/stats` (host/src/stats.rs `Family`):
/// every plugin that defines `legate_plugin_<name>` shares it, so it has one
/// kind and, for a histogram, one bucket layout.
pub(crate) struct Family {
    pub(crate) kind: MetricKind,
    /// A histogram's bounds, the host's ([`HOST_BUCKETS`]) if defined with none.
    pub(crate) bounds: Vec<f64>,
}

/// The proxy's metric families by metric name, shared by the [`HostState`]s
/// of the plugins on one proxy ([`crate::testing::TestHost::another_plugin`]).
pub(crate) type Families = Rc<RefCell<BTreeMap<String, Family>>>;

/// The host's default histogram buckets (host/src/stats.rs `BUCKETS`): what a
/// histogram defined with no buckets has.
pub(crate) use legate_abi_rules::metrics::DEFAULT_BUCKETS as HOST_BUCKETS;

pub(crate) struct Metric {
    pub(crate) kind: MetricKind,
    pub(crate) label_names: Vec<String>,
    pub(crate) buckets: Vec<f64>,
    pub(crate) series: BTreeMap<Vec<String>, SeriesValue>,
}

impl Metric {
    /// The series for `labels`, created at zero: a series exists (and is
    /// exported) from the moment the host makes it (an unlabelled metric's at
    /// `define`, a labelled one's at `with_labels`, or its all-empty one on
    /// the first record through the `define` handle).
    fn series_mut(&mut self, labels: &[String]) -> &mut SeriesValue {
        let initial = match self.kind {
            MetricKind::Counter => SeriesValue::Counter(0),
            MetricKind::Gauge => SeriesValue::Gauge(0),
            MetricKind::Histogram => SeriesValue::Histogram(Vec::new()),
        };
        self.series.entry(labels.to_vec()).or_insert(initial)
    }
}

pub(crate) struct KvValue {
    pub(crate) value: Vec<u8>,
    pub(crate) version: u64,
    /// Monotonic ns at which the key expires.
    pub(crate) expires_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CalloutState {
    Outstanding,
    Delivered,
    Cancelled,
}

/// What an outstanding id stands for.
pub(crate) enum Sent {
    /// A callout.
    Http(CalloutRequest),
    /// An asynchronous KV call, run when the test delivers it.
    Kv {
        namespace: String,
        key: String,
        op: Op,
    },
}

pub(crate) struct SentCallout {
    pub(crate) id: u64,
    /// The instance (`FilterTest`) that sent it: limits and `cancel` are per
    /// instance, as on the host.
    pub(crate) instance: u64,
    /// `None`: sent from `on_tick`.
    pub(crate) context: Option<u64>,
    pub(crate) what: Sent,
    pub(crate) state: CalloutState,
}

impl SentCallout {
    /// Whether this is an outstanding call of `context` (`None`: sent from
    /// `on_tick`) in instance `instance`. On the host each instance keeps its
    /// own outstanding calls by context id, so an exchange of one instance
    /// never sees (is never paused by, never delivered) another's.
    pub(crate) fn outstanding_in(&self, instance: u64, context: Option<u64>) -> bool {
        self.instance == instance
            && self.context == context
            && self.state == CalloutState::Outstanding
    }
}

pub(crate) struct HostState {
    pub(crate) plugin_name: String,
    pub(crate) instance_index: u32,
    pub(crate) files: HashMap<String, Vec<u8>>,
    pub(crate) granted_kv: HashSet<String>,
    pub(crate) granted_clusters: HashSet<String>,
    pub(crate) wall_ns: u64,
    pub(crate) mono_ns: u64,
    pub(crate) rng: u64,
    pub(crate) log_level: Level,
    pub(crate) logs: Vec<(Level, String)>,
    pub(crate) metrics: BTreeMap<String, Metric>,
    /// The proxy's metric families, shared with the other plugins on it.
    pub(crate) families: Families,
    /// The series made so far, (metric, label values), against the plugin's
    /// series cap: as on the host, an unlabelled metric's at `define`, a
    /// labelled one's with `with_labels` (or its empty-labels series on the
    /// first record through the `define` handle).
    pub(crate) series_claims: HashSet<(String, Vec<String>)>,
    pub(crate) kv: HashMap<String, HashMap<String, KvValue>>,
    pub(crate) kv_version: u64,
    /// Writes another worker makes just before a conditional write of the
    /// plugin's, by (namespace, key): each conditional `set` takes the next one
    /// ([`crate::testing::TestHost::kv_race`]).
    pub(crate) kv_races: HashMap<(String, String), VecDeque<Vec<u8>>>,
    /// Callouts and asynchronous KV calls, in the order sent (ids are
    /// positions + 1: one sequence for both, as on the host).
    pub(crate) callouts: Vec<SentCallout>,
    /// What `Namespace::backend` reports ([`crate::testing::TestHost::kv_backend`]).
    pub(crate) kv_backend: Backend,
    /// Every KV call fails with `Unavailable`
    /// ([`crate::testing::TestHost::kv_unavailable`]).
    pub(crate) kv_down: bool,
    pub(crate) queued: HashMap<String, VecDeque<Result<CalloutResponse, Error>>>,
    pub(crate) call: Call,
    /// The instance the running call is in (0: none); each `FilterTest` on
    /// this host is one instance of the plugin.
    pub(crate) instance: u64,
    /// The last instance id given out.
    pub(crate) instances: u64,
    /// The running call's exchange detached (`Exchange::detach`): a callout
    /// sent after it is refused. Reset for every call.
    pub(crate) detached_in_call: bool,
    /// What each instance's `configure` declared with
    /// `sanitize_request_headers` (lowercase, each once), by instance.
    pub(crate) sanitized: HashMap<u64, Vec<String>>,
}

impl HostState {
    pub(crate) fn new() -> Self {
        HostState {
            plugin_name: "test".to_owned(),
            instance_index: 0,
            files: HashMap::new(),
            granted_kv: HashSet::new(),
            granted_clusters: HashSet::new(),
            // 2026-01-01T00:00:00Z: a fixed, recognizable start.
            wall_ns: 1_767_225_600_000_000_000,
            mono_ns: 1_000_000_000,
            rng: 0x9E37_79B9_7F4A_7C15,
            log_level: Level::Trace,
            logs: Vec::new(),
            metrics: BTreeMap::new(),
            families: Rc::new(RefCell::new(BTreeMap::new())),
            series_claims: HashSet::new(),
            kv: HashMap::new(),
            kv_version: 0,
            kv_races: HashMap::new(),
            callouts: Vec::new(),
            kv_backend: Backend::Memory,
            kv_down: false,
            queued: HashMap::new(),
            call: Call::Idle,
            instance: 0,
            instances: 0,
            detached_in_call: false,
            sanitized: HashMap::new(),
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic, so tests are reproducible.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Records a callout or asynchronous KV call of `context` (`None`: the
    /// plugin's, from `on_tick`) in the running instance as outstanding: its
    /// id, or `LimitExceeded` past the per-context or per-instance limit.
    pub(crate) fn send(&mut self, context: Option<u64>, what: Sent) -> Result<u64, Error> {
        let instance = self.instance;
        let (mut mine, mut all) = (0, 0);
        for c in &self.callouts {
            if c.instance == instance && c.state == CalloutState::Outstanding {
                all += 1;
                mine += usize::from(c.context == context);
            }
        }
        if mine >= CALLOUTS_PER_CONTEXT || all >= CALLOUTS_PER_INSTANCE {
            return Err(Error::LimitExceeded);
        }
        let id = self.callouts.len() as u64 + 1;
        self.callouts.push(SentCallout {
            id,
            instance,
            context,
            what,
            state: CalloutState::Outstanding,
        });
        Ok(id)
    }

    fn live_kv(&mut self, ns: &str, key: &str) -> Option<&mut KvValue> {
        let now = self.mono_ns;
        let map = self.kv.get_mut(ns)?;
        if map
            .get(key)
            .is_some_and(|v| v.expires_at.is_some_and(|t| t <= now))
        {
            map.remove(key);
        }
        map.get_mut(key)
    }
}

pub(crate) type Host = Rc<RefCell<HostState>>;

thread_local! {
    static CURRENT: RefCell<Option<Host>> = const { RefCell::new(None) };
}

/// Installs `host` as the thread's current fake host (and `call` as the running
/// call) until dropped; restores what was there before.
pub(crate) struct Installed {
    previous: Option<Host>,
    previous_call: Call,
    previous_instance: u64,
    host: Host,
}

/// Installs `host` for a call `call` into instance `instance`.
pub(crate) fn install(host: &Host, instance: u64, call: Call) -> Installed {
    let previous = CURRENT.with(|c| c.replace(Some(host.clone())));
    let mut h = host.borrow_mut();
    let previous_call = std::mem::replace(&mut h.call, call);
    let previous_instance = std::mem::replace(&mut h.instance, instance);
    h.detached_in_call = false;
    drop(h);
    Installed {
        previous,
        previous_call,
        previous_instance,
        host: host.clone(),
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let mut h = self.host.borrow_mut();
        h.call = self.previous_call;
        h.instance = self.previous_instance;
        drop(h);
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// Run `f` on the current fake host; without one (SDK code called outside the
/// harness), return `default`.
fn with_host<R>(default: R, f: impl FnOnce(&mut HostState) -> R) -> R {
    let host = CURRENT.with(|c| c.borrow().clone());
    match host {
        Some(h) => f(&mut h.borrow_mut()),
        None => default,
    }
}

fn current_host() -> Option<Host> {
    CURRENT.with(|c| c.borrow().clone())
}

// ---- exchange state ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Head(Direction),
    Body(Direction),
    Trailers(Direction),
}

pub(crate) fn idx(d: Direction) -> usize {
    match d {
        Direction::Request => 0,
        Direction::Response => 1,
    }
}

pub(crate) struct ExchangeState {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) scheme: String,
    pub(crate) authority: String,
    pub(crate) version: HttpVersion,
    pub(crate) status: Option<u16>,
    pub(crate) heads: [Option<FieldList>; 2],
    pub(crate) bodies: [Option<Vec<u8>>; 2],
    pub(crate) trailers: [Option<FieldList>; 2],
    pub(crate) source: SocketAddr,
    pub(crate) destination: SocketAddr,
    pub(crate) tls_version: Option<TlsVersion>,
    pub(crate) tls_sni: Option<String>,
    pub(crate) tls_peer_subject: Option<String>,
    pub(crate) route_name: Option<String>,
    pub(crate) cluster: Option<String>,
    pub(crate) upstream_address: Option<SocketAddr>,
    pub(crate) request_id: String,
    pub(crate) start_time: u64,
    pub(crate) cause: Option<String>,
    /// The parts the filter may write during the running call.
    pub(crate) window: Vec<Part>,
    pub(crate) body_modes: [BodyMode; 2],
    pub(crate) body_declared: [bool; 2],
    pub(crate) body_started: [bool; 2],
    /// The filter detached from the exchange: the host makes no more calls.
    pub(crate) detached: bool,
    /// The plugin's `limits.body`: a buffer write may not make a body
    /// longer (host/src/wasm/host.rs `splice_buffer`).
    pub(crate) body_limit: usize,
}

pub(crate) type Ex = Rc<RefCell<ExchangeState>>;

impl ExchangeState {
    fn writable(&self, part: Part) -> Result<(), Error> {
        if self.window.contains(&part) {
            Ok(())
        } else {
            Err(Error::InvalidState)
        }
    }

    fn map(&self, part: Part) -> Option<&FieldList> {
        match part {
            Part::Head(d) => self.heads[idx(d)].as_ref(),
            Part::Trailers(d) => self.trailers[idx(d)].as_ref(),
            Part::Body(_) => None,
        }
    }

    fn map_mut(&mut self, part: Part) -> Option<&mut FieldList> {
        match part {
            Part::Head(d) => self.heads[idx(d)].as_mut(),
            Part::Trailers(d) => self.trailers[idx(d)].as_mut(),
            Part::Body(_) => None,
        }
    }
}

/// A field name as the host's `http::HeaderName` takes it
/// (`legate_abi_rules::headers::name_ok`), handed back in lower case.
pub(crate) fn check_name(name: &str) -> Result<String, Error> {
    if !legate_abi_rules::headers::name_ok(name) {
        return Err(Error::InvalidArgument);
    }
    Ok(name.to_ascii_lowercase())
}

/// A field value as the host's `http::HeaderValue` takes it
/// (`legate_abi_rules::headers::value_ok`).
pub(crate) fn check_value(value: &[u8]) -> Result<(), Error> {
    if legate_abi_rules::headers::value_ok(value) {
        Ok(())
    } else {
        Err(Error::InvalidArgument)
    }
}

/// Adds `name: value` to `map` within the host's caps on what a filter
/// writes into one header map (`legate_abi_rules::limits`:
/// `MAX_FILTER_FIELDS` fields, `MAX_FILTER_FIELD_VALUE` bytes a value) (`LimitExceeded`
/// otherwise), replacing the field's values when `replace`, as the host's
/// `put_field`: a replace of a field the map holds may go past a full map.
pub(crate) fn put_field(
    map: &mut FieldList,
    name: String,
    value: &[u8],
    replace: bool,
) -> Result<(), Error> {
    if value.len() > MAX_FILTER_FIELD_VALUE
        || (map.len() >= MAX_FILTER_FIELDS && (!replace || !map.iter().any(|(n, _)| *n == name)))
    {
        return Err(Error::LimitExceeded);
    }
    if replace {
        map.retain(|(n, _)| *n != name);
    }
    map.push((name, value.to_vec()));
    Ok(())
}

/// Checks a filter's local response as the host does (host/src/wasm/plugin.rs
/// `local_response`): `Err` is the reason the host fails the call.
pub(crate) fn check_local_response(lr: &crate::LocalResponse) -> Result<(), String> {
    if !RESPONSE_STATUS.contains(&lr.status) {
        return Err(format!(
            "local response status {} is outside {RESPONSE_STATUS:?}",
            lr.status
        ));
    }
    let mut map = FieldList::new();
    for (name, value) in &lr.headers {
        let n = check_name(name)
            .map_err(|_| format!("local response header name `{name}` is invalid"))?;
        check_value(value)
            .map_err(|_| format!("local response header `{name}` has an invalid value"))?;
        put_field(&mut map, n, value, false).map_err(|_| {
            format!(
                "local response headers over the host's caps ({MAX_FILTER_FIELDS} fields, {} KiB a value)",
                MAX_FILTER_FIELD_VALUE / 1024
            )
        })?;
    }
    Ok(())
}

// ---- headers ----

pub(crate) struct HeadersHandle<'a> {
    pub(crate) ex: Ex,
    pub(crate) part: Part,
    pub(crate) _borrow: PhantomData<&'a ()>,
}

impl HeadersHandle<'_> {
    pub(crate) fn new(ex: Ex, part: Part) -> Self {
        HeadersHandle {
            ex,
            part,
            _borrow: PhantomData,
        }
    }

    fn read<R>(&self, default: R, f: impl FnOnce(&FieldList) -> R) -> R {
        let ex = self.ex.borrow();
        ex.map(self.part).map_or(default, f)
    }

    pub(crate) fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.read(None, |m| {
            m.iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        })
    }
    pub(crate) fn get_all(&self, name: &str) -> Vec<Vec<u8>> {
        self.read(Vec::new(), |m| {
            m.iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .collect()
        })
    }
    pub(crate) fn has(&self, name: &str) -> bool {
        self.read(false, |m| {
            m.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
        })
    }
    pub(crate) fn len(&self) -> u32 {
        self.read(0, |m| u32::try_from(m.len()).unwrap_or(u32::MAX))
    }
    pub(crate) fn entries(&self) -> FieldList {
        self.read(Vec::new(), Clone::clone)
    }

    /// In the host's order (host/src/wasm/host.rs `write_field`): the name,
    /// the fields the host owns, the value, the write window, the caps.
    fn write(&self, name: &str, value: Option<&[u8]>, append: bool) -> Result<(), Error> {
        let name = check_name(name)?;
        // As on the host: `te: trailers` (only) may be set on, or removed from,
        // the request head, for filters converting requests to gRPC.
        let te_trailers = name == "te" && !append && value.is_none_or(|v| v == b"trailers");
        // `content-length` may be removed, never set.
        let removing_length = name == "content-length" && value.is_none();
        // `trailer` may be written on the response head only (declaring the
        // trailers to come, for HTTP/1.1 clients).
        let response_trailer = name == "trailer";
        if host_owned(&name) && !te_trailers && !removing_length && !response_trailer {
            return Err(Error::Denied);
        }
        if let Some(v) = value {
            check_value(v)?;
        }
        let mut ex = self.ex.borrow_mut();
        if ex.map(self.part).is_none() {
            return Err(Error::InvalidState);
        }
        ex.writable(self.part)?;
        if (te_trailers && self.part != Part::Head(Direction::Request))
            || (response_trailer && self.part != Part::Head(Direction::Response))
        {
            return Err(Error::Denied);
        }
        let map = ex.map_mut(self.part).ok_or(Error::InvalidState)?;
        match value {
            Some(v) => put_field(map, name, v, !append),
            None => {
                map.retain(|(n, _)| *n != name);
                Ok(())
            }
        }
    }

    pub(crate) fn set(&self, name: &str, value: &[u8]) -> Result<(), Error> {
        self.write(name, Some(value), false)
    }
    pub(crate) fn add(&self, name: &str, value: &[u8]) -> Result<(), Error> {
        self.write(name, Some(value), true)
    }
    pub(crate) fn remove(&self, name: &str) -> Result<(), Error> {
        self.write(name, None, false)
    }
}

// ---- buffer ----

pub(crate) struct BufferHandle<'a> {
    pub(crate) ex: Ex,
    pub(crate) dir: Direction,
    pub(crate) _borrow: PhantomData<&'a ()>,
}

impl BufferHandle<'_> {
    pub(crate) fn new(ex: Ex, dir: Direction) -> Self {
        BufferHandle {
            ex,
            dir,
            _borrow: PhantomData,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.ex.borrow().bodies[idx(self.dir)]
            .as_ref()
            .map_or(0, |b| b.len() as u64)
    }
    pub(crate) fn read(&self, offset: u64, max_len: u64) -> Vec<u8> {
        let ex = self.ex.borrow();
        let Some(b) = ex.bodies[idx(self.dir)].as_ref() else {
            return Vec::new();
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
        let end = start
            .saturating_add(usize::try_from(max_len).unwrap_or(usize::MAX))
            .min(b.len());
        b[start..end].to_vec()
    }
    pub(crate) fn replace(&self, data: &[u8]) -> Result<(), Error> {
        let mut ex = self.ex.borrow_mut();
        ex.writable(Part::Body(self.dir))?;
        if data.len() > ex.body_limit {
            return Err(Error::LimitExceeded);
        }
        ex.bodies[idx(self.dir)] = Some(data.to_vec());
        Ok(())
    }
    pub(crate) fn splice(&self, offset: u64, remove_len: u64, data: &[u8]) -> Result<(), Error> {
        let mut ex = self.ex.borrow_mut();
        ex.writable(Part::Body(self.dir))?;
        let cap = ex.body_limit;
        let body = ex.bodies[idx(self.dir)].get_or_insert_with(Vec::new);
        let start = usize::try_from(offset).map_err(|_| Error::InvalidArgument)?;
        let len = usize::try_from(remove_len).map_err(|_| Error::InvalidArgument)?;
        let end = start.checked_add(len).ok_or(Error::InvalidArgument)?;
        if end > body.len() {
            return Err(Error::InvalidArgument);
        }
        // As the host: over the plugin's cap, nothing is written.
        if body.len() - len + data.len() > cap {
            return Err(Error::LimitExceeded);
        }
        body.splice(start..end, data.iter().copied());
        Ok(())
    }
}

// ---- connection (network filters) ----

/// A TCP connection as a network filter sees it. The harness keeps its facts
/// and data in an [`ExchangeState`] (as the host keeps a connection in an
/// `Exchange`): `bodies[0]` is the data from downstream, `bodies[1]` from
/// upstream, writable while `Part::Body` of that direction is in the window.
pub(crate) struct ConnectionHandle<'a> {
    pub(crate) ex: Ex,
    pub(crate) id: u64,
    pub(crate) listener: String,
    pub(crate) _borrow: PhantomData<&'a ()>,
}

impl ConnectionHandle<'_> {
    pub(crate) fn new(ex: Ex, id: u64, listener: String) -> Self {
        ConnectionHandle {
            ex,
            id,
            listener,
            _borrow: PhantomData,
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }
    pub(crate) fn listener_name(&self) -> String {
        self.listener.clone()
    }
    pub(crate) fn source_address(&self) -> SocketAddr {
        self.ex.borrow().source
    }
    pub(crate) fn destination_address(&self) -> SocketAddr {
        self.ex.borrow().destination
    }
    pub(crate) fn tls_version(&self) -> Option<TlsVersion> {
        self.ex.borrow().tls_version
    }
    pub(crate) fn tls_sni(&self) -> Option<String> {
        self.ex.borrow().tls_sni.clone()
    }
    pub(crate) fn tls_peer_certificate_presented(&self) -> bool {
        self.ex.borrow().tls_peer_subject.is_some()
    }
    pub(crate) fn tls_peer_subject(&self) -> Option<String> {
        self.ex.borrow().tls_peer_subject.clone()
    }
    pub(crate) fn cluster(&self) -> Option<String> {
        self.ex.borrow().cluster.clone()
    }
    pub(crate) fn upstream_address(&self) -> Option<SocketAddr> {
        self.ex.borrow().upstream_address
    }
    pub(crate) fn start_time(&self) -> u64 {
        self.ex.borrow().start_time
    }
    pub(crate) fn data(&self, d: Direction) -> Option<BufferHandle<'static>> {
        let ex = self.ex.borrow();
        // As on the host: only the current data call's direction has data.
        (ex.bodies[idx(d)].is_some() && ex.window.contains(&Part::Body(d)))
            .then(|| BufferHandle::new(self.ex.clone(), d))
    }
}

// ---- exchange ----

pub(crate) struct ExchangeHandle<'a> {
    pub(crate) ex: Ex,
    pub(crate) _borrow: PhantomData<&'a ()>,
}

impl ExchangeHandle<'_> {
    pub(crate) fn new(ex: Ex) -> Self {
        ExchangeHandle {
            ex,
            _borrow: PhantomData,
        }
    }

    fn get<R>(&self, f: impl FnOnce(&ExchangeState) -> R) -> R {
        f(&self.ex.borrow())
    }

    fn set_head(&self, d: Direction, f: impl FnOnce(&mut ExchangeState)) -> Result<(), Error> {
        let mut ex = self.ex.borrow_mut();
        ex.writable(Part::Head(d))?;
        f(&mut ex);
        Ok(())
    }

    pub(crate) fn method(&self) -> String {
        self.get(|x| x.method.clone())
    }
    pub(crate) fn set_method(&self, v: &str) -> Result<(), Error> {
        if v.is_empty() || !v.bytes().all(is_tchar) {
            return Err(Error::InvalidArgument);
        }
        self.set_head(Direction::Request, |x| x.method = v.to_owned())
    }
    pub(crate) fn path(&self) -> String {
        self.get(|x| x.path.clone())
    }
    pub(crate) fn set_path(&self, v: &str) -> Result<(), Error> {
        if !v.starts_with('/')
            || v.bytes()
                .any(|b| matches!(b, b'\r' | b'\n' | 0 | b' ' | b'#'))
        {
            return Err(Error::InvalidArgument);
        }
        self.set_head(Direction::Request, |x| x.path = v.to_owned())
    }
    pub(crate) fn scheme(&self) -> String {
        self.get(|x| x.scheme.clone())
    }
    pub(crate) fn authority(&self) -> String {
        self.get(|x| x.authority.clone())
    }
    pub(crate) fn set_authority(&self, v: &str) -> Result<(), Error> {
        if v.is_empty()
            || v.bytes()
                .any(|b| b <= b' ' || matches!(b, b'/' | b'?' | b'#' | 0x7f))
        {
            return Err(Error::InvalidArgument);
        }
        self.set_head(Direction::Request, |x| x.authority = v.to_owned())
    }
    pub(crate) fn http_version(&self) -> HttpVersion {
        self.get(|x| x.version)
    }
    pub(crate) fn status(&self) -> Option<u16> {
        self.get(|x| x.status)
    }
    pub(crate) fn set_status(&self, v: u16) -> Result<(), Error> {
        if !RESPONSE_STATUS.contains(&v) {
            return Err(Error::InvalidArgument);
        }
        if self.status().is_none() {
            return Err(Error::InvalidState);
        }
        self.set_head(Direction::Response, |x| x.status = Some(v))
    }
    pub(crate) fn headers(&self, d: Direction) -> Option<HeadersHandle<'static>> {
        let exists = self.get(|x| x.heads[idx(d)].is_some());
        exists.then(|| HeadersHandle::new(self.ex.clone(), Part::Head(d)))
    }
    pub(crate) fn body(&self, d: Direction) -> Option<BufferHandle<'static>> {
        let exists = self.get(|x| x.bodies[idx(d)].is_some());
        exists.then(|| BufferHandle::new(self.ex.clone(), d))
    }
    pub(crate) fn trailers(&self, d: Direction) -> Option<HeadersHandle<'static>> {
        let exists = self.get(|x| x.trailers[idx(d)].is_some());
        exists.then(|| HeadersHandle::new(self.ex.clone(), Part::Trailers(d)))
    }
    pub(crate) fn set_body_mode(&self, d: Direction, m: BodyMode) -> Result<(), Error> {
        let mut ex = self.ex.borrow_mut();
        if !ex.body_declared[idx(d)] || ex.body_started[idx(d)] {
            return Err(Error::InvalidState);
        }
        ex.body_modes[idx(d)] = m;
        Ok(())
    }
    pub(crate) fn detach(&self) -> Result<(), Error> {
        let host = current_host().ok_or(Error::Unsupported)?;
        let mut h = host.borrow_mut();
        // As the host: only from a call for the exchange, with no callout out.
        let Call::Exchange(c) = h.call else {
            return Err(Error::InvalidState);
        };
        let instance = h.instance;
        let outstanding = h
            .callouts
            .iter()
            .any(|x| x.outstanding_in(instance, Some(c)));
        if outstanding {
            return Err(Error::InvalidState);
        }
        h.detached_in_call = true;
        drop(h);
        self.ex.borrow_mut().detached = true;
        Ok(())
    }
    pub(crate) fn source_address(&self) -> SocketAddr {
        self.get(|x| x.source)
    }
    pub(crate) fn destination_address(&self) -> SocketAddr {
        self.get(|x| x.destination)
    }
    pub(crate) fn tls_version(&self) -> Option<TlsVersion> {
        self.get(|x| x.tls_version)
    }
    pub(crate) fn tls_sni(&self) -> Option<String> {
        self.get(|x| x.tls_sni.clone())
    }
    pub(crate) fn tls_peer_certificate_presented(&self) -> bool {
        self.get(|x| x.tls_peer_subject.is_some())
    }
    pub(crate) fn tls_peer_subject(&self) -> Option<String> {
        self.get(|x| x.tls_peer_subject.clone())
    }
    pub(crate) fn route_name(&self) -> Option<String> {
        self.get(|x| x.route_name.clone())
    }
    pub(crate) fn cluster(&self) -> Option<String> {
        self.get(|x| x.cluster.clone())
    }
    pub(crate) fn upstream_address(&self) -> Option<SocketAddr> {
        self.get(|x| x.upstream_address)
    }
    pub(crate) fn request_id(&self) -> String {
        self.get(|x| x.request_id.clone())
    }
    pub(crate) fn start_time(&self) -> u64 {
        self.get(|x| x.start_time)
    }
    pub(crate) fn cause(&self) -> Option<String> {
        self.get(|x| x.cause.clone())
    }
}

// ---- log, clock, random, plugin ----

pub(crate) fn log(level: Level, message: &str) {
    use legate_abi_rules::log::{one_line, MAX_LOG};
    with_host((), |h| {
        if level >= h.log_level {
            // As the host writes it: one line, at most MAX_LOG bytes.
            h.logs.push((level, one_line(message, MAX_LOG)));
        }
    })
}
pub(crate) fn log_enabled(level: Level) -> bool {
    with_host(false, |h| level >= h.log_level)
}
pub(crate) fn wall_now() -> u64 {
    with_host(0, |h| h.wall_ns)
}
pub(crate) fn monotonic_now() -> u64 {
    with_host(0, |h| h.mono_ns)
}
pub(crate) fn random_bytes(len: u32) -> Result<Vec<u8>, Error> {
    if len > 65_536 {
        return Err(Error::LimitExceeded);
    }
    with_host(Err(Error::Unsupported), |h| {
        let mut out = Vec::with_capacity(len as usize);
        while out.len() < len as usize {
            out.extend_from_slice(&h.next_random().to_le_bytes());
        }
        out.truncate(len as usize);
        Ok(out)
    })
}
pub(crate) fn random_u64() -> u64 {
    with_host(0, |h| h.next_random())
}
pub(crate) fn plugin_name() -> String {
    with_host(String::new(), |h| h.plugin_name.clone())
}
pub(crate) fn instance_index() -> u32 {
    with_host(0, |h| h.instance_index)
}
pub(crate) fn sanitize_request_headers(names: &[&str]) -> Result<(), Error> {
    let host = current_host().ok_or(Error::Unsupported)?;
    let mut h = host.borrow_mut();
    if h.call != Call::Configure {
        return Err(Error::InvalidState);
    }
    // As the host: all or nothing, a bad name `InvalidArgument`, a field the
    // host owns `Denied`, past the cap `LimitExceeded`.
    let instance = h.instance;
    let had = h.sanitized.get(&instance).map_or(&[][..], Vec::as_slice);
    let mut add: Vec<String> = Vec::new();
    for n in names {
        let n = check_name(n)?;
        if host_owned(&n) {
            return Err(Error::Denied);
        }
        if !had.contains(&n) && !add.contains(&n) {
            add.push(n);
        }
    }
    if had.len() + add.len() > legate_abi_rules::limits::MAX_SANITIZED_HEADERS {
        return Err(Error::LimitExceeded);
    }
    h.sanitized.entry(instance).or_default().extend(add);
    Ok(())
}

pub(crate) fn plugin_file(name: &str) -> Result<Vec<u8>, Error> {
    with_host(Err(Error::Unsupported), |h| {
        h.files.get(name).cloned().ok_or(Error::NotFound)
    })
}

// ---- metrics ----

impl HostState {
    /// Counts series (`name`, `labels`) against the series cap; `false` if it
    /// is new and the cap is reached.
    fn claim_series(&mut self, name: &str, labels: &[String]) -> bool {
        let key = (name.to_owned(), labels.to_vec());
        if self.series_claims.contains(&key) {
            return true;
        }
        if self.series_claims.len() >= MAX_SERIES {
            return false;
        }
        self.series_claims.insert(key);
        true
    }
}

pub(crate) struct SeriesHandle {
    host: Option<Host>,
    name: String,
    labels: Vec<String>,
}

impl SeriesHandle {
    fn record(&self, f: impl FnOnce(&mut SeriesValue)) {
        let Some(host) = &self.host else { return };
        let mut h = host.borrow_mut();
        // Over the series cap the value is dropped, as on the host.
        if !h.claim_series(&self.name, &self.labels) {
            return;
        }
        let Some(metric) = h.metrics.get_mut(&self.name) else {
            return;
        };
        f(metric.series_mut(&self.labels));
    }

    fn with_labels(&self, values: &[&str]) -> Result<Self, Error> {
        let host = self.host.as_ref().ok_or(Error::Unsupported)?;
        let mut h = host.borrow_mut();
        let wanted = h
            .metrics
            .get(&self.name)
            .ok_or(Error::Internal)?
            .label_names
            .len();
        if values.len() != wanted || values.iter().any(|v| v.len() > 128) {
            return Err(Error::InvalidArgument);
        }
        let labels: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        if !h.claim_series(&self.name, &labels) {
            return Err(Error::LimitExceeded);
        }
        let metric = h.metrics.get_mut(&self.name).ok_or(Error::Internal)?;
        metric.series_mut(&labels);
        Ok(SeriesHandle {
            host: Some(host.clone()),
            name: self.name.clone(),
            labels,
        })
    }
}

fn define(
    name: &str,
    help: &str,
    labels: &[&str],
    kind: MetricKind,
    buckets: &[f64],
) -> Result<SeriesHandle, Error> {
    let host = current_host().ok_or(Error::Unsupported)?;
    let mut h = host.borrow_mut();
    if h.call != Call::Configure {
        return Err(Error::InvalidState);
    }
    // As the host (abi/README.md §5.6): a reserved name, help over 1 KiB, a
    // label twice, `le` on a histogram, or bounds not finite and strictly
    // increasing (at most 64) are refused.
    if !metrics::name_ok(name)
        || !metrics::name_free(name)
        || help.len() > MAX_HELP
        || labels.iter().any(|l| !metrics::label_ok(l))
        || labels
            .iter()
            .enumerate()
            .any(|(i, l)| labels[..i].contains(l))
        || (kind == MetricKind::Histogram && labels.contains(&"le"))
        || buckets.len() > metrics::MAX_BUCKETS
        || buckets.iter().any(|b| !b.is_finite())
        || buckets.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(Error::InvalidArgument);
    }
    // A histogram defined with no buckets has the host's (host.rs
    // `define_over`): the same layout as one naming them.
    let buckets = match kind {
        MetricKind::Histogram if buckets.is_empty() => &HOST_BUCKETS[..],
        MetricKind::Histogram => buckets,
        _ => &[],
    };
    // The proxy's family first, as the host's `Stats::declare_histogram`:
    // another plugin (or an earlier version of this one) that defined the
    // name with another kind or, for a histogram, other buckets holds it.
    {
        let mut families = h.families.borrow_mut();
        match families.get(name) {
            Some(f) if f.kind != kind || f.bounds != buckets => return Err(Error::InvalidArgument),
            Some(_) => {}
            None => {
                families.insert(
                    name.to_owned(),
                    Family {
                        kind,
                        bounds: buckets.to_vec(),
                    },
                );
            }
        }
    }
    let label_names: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
    match h.metrics.get(name) {
        Some(m) if m.kind != kind || m.label_names != label_names || m.buckets != buckets => {
            return Err(Error::InvalidArgument)
        }
        Some(_) => {}
        None if h.metrics.len() >= MAX_METRICS => return Err(Error::LimitExceeded),
        None => {
            h.metrics.insert(
                name.to_owned(),
                Metric {
                    kind,
                    label_names,
                    buckets: buckets.to_vec(),
                    series: BTreeMap::new(),
                },
            );
        }
    }
    // As on the host (host/src/wasm/host.rs `define_over`, `metric`): an
    // unlabelled metric's one series is made, shown and counted against the
    // series cap at once; a labelled one's all-empty series, which the
    // `define-*` handle records into, only when first recorded into
    // (`SeriesHandle::record`), so a plugin that records only through
    // `with_labels` never has it.
    let empty = vec![String::new(); labels.len()];
    if labels.is_empty() {
        if !h.claim_series(name, &empty) {
            return Err(Error::LimitExceeded);
        }
        if let Some(m) = h.metrics.get_mut(name) {
            m.series_mut(&empty);
        }
    }
    drop(h);
    Ok(SeriesHandle {
        host: Some(host),
        name: name.to_owned(),
        labels: empty,
    })
}

pub(crate) struct CounterHandle(SeriesHandle);
impl CounterHandle {
    pub(crate) fn add(&self, delta: u64) {
        self.0.record(|v| {
            if let SeriesValue::Counter(c) = v {
                *c = c.saturating_add(delta);
            }
        })
    }
    pub(crate) fn with_labels(&self, values: &[&str]) -> Result<Self, Error> {
        self.0.with_labels(values).map(CounterHandle)
    }
}

pub(crate) struct GaugeHandle(SeriesHandle);
impl GaugeHandle {
    pub(crate) fn set(&self, value: i64) {
        self.0.record(|v| {
            if let SeriesValue::Gauge(g) = v {
                *g = value;
            }
        })
    }
    pub(crate) fn add(&self, delta: i64) {
        self.0.record(|v| {
            if let SeriesValue::Gauge(g) = v {
                *g = g.saturating_add(delta);
            }
        })
    }
    pub(crate) fn with_labels(&self, values: &[&str]) -> Result<Self, Error> {
        self.0.with_labels(values).map(GaugeHandle)
    }
}

pub(crate) struct HistogramHandle(SeriesHandle);
impl HistogramHandle {
    pub(crate) fn observe(&self, value: f64) {
        self.0.record(|v| {
            if let SeriesValue::Histogram(h) = v {
                h.push(value);
            }
        })
    }
    pub(crate) fn with_labels(&self, values: &[&str]) -> Result<Self, Error> {
        self.0.with_labels(values).map(HistogramHandle)
    }
}

pub(crate) fn define_counter(
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<CounterHandle, Error> {
    define(name, help, labels, MetricKind::Counter, &[]).map(CounterHandle)
}
pub(crate) fn define_gauge(name: &str, help: &str, labels: &[&str]) -> Result<GaugeHandle, Error> {
    define(name, help, labels, MetricKind::Gauge, &[]).map(GaugeHandle)
}
pub(crate) fn define_histogram(
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<HistogramHandle, Error> {
    define(name, help, labels, MetricKind::Histogram, buckets).map(HistogramHandle)
}

// ---- kv ----

pub(crate) struct NamespaceHandle {
    host: Host,
    name: String,
}

fn ttl_deadline(now: u64, ttl_ms: Option<u64>) -> Result<Option<u64>, Error> {
    match ttl_ms {
        None => Ok(None),
        Some(0) => Err(Error::InvalidArgument),
        Some(ms) => Ok(Some(now.saturating_add(ms.saturating_mul(1_000_000)))),
    }
}

impl NamespaceHandle {
    fn check_key(key: &str) -> Result<(), Error> {
        if key.len() > 512 {
            Err(Error::InvalidArgument)
        } else {
            Ok(())
        }
    }

    fn check_condition(current: Option<u64>, c: WriteCondition) -> Result<(), Error> {
        match (c, current) {
            (WriteCondition::Always, _) => Ok(()),
            (WriteCondition::IfAbsent, None) => Ok(()),
            (WriteCondition::IfVersion(v), Some(cur)) if v == cur => Ok(()),
            _ => Err(Error::CasMismatch),
        }
    }

    fn check_up(&self) -> Result<(), Error> {
        if self.host.borrow().kv_down {
            return Err(Error::Unavailable);
        }
        Ok(())
    }

    pub(crate) fn backend(&self) -> Backend {
        self.host.borrow().kv_backend
    }

    /// `start_*`: checked and recorded as the host does; run on delivery
    /// ([`run_kv`]).
    pub(crate) fn start(&self, key: &str, op: Op) -> Result<u64, Error> {
        // As the host: the state first (only from an exchange's call that
        // may pause), then the arguments.
        let context = {
            let h = self.host.borrow();
            match h.call {
                Call::Exchange(c) if !h.detached_in_call => c,
                _ => return Err(Error::InvalidState),
            }
        };
        Self::check_key(key)?;
        match &op {
            Op::Set(value, _, ttl) => {
                if value.len() > 64 * 1024 {
                    return Err(Error::LimitExceeded);
                }
                ttl_deadline(0, *ttl)?;
            }
            Op::Increment(_, ttl) => {
                ttl_deadline(0, *ttl)?;
            }
            Op::Delete(WriteCondition::IfAbsent) => return Err(Error::InvalidArgument),
            Op::Get | Op::Delete(_) => {}
        }
        let what = Sent::Kv {
            namespace: self.name.clone(),
            key: key.to_owned(),
            op,
        };
        self.host.borrow_mut().send(Some(context), what)
    }

    pub(crate) fn get(&self, key: &str) -> Result<Option<Entry>, Error> {
        Self::check_key(key)?;
        self.check_up()?;
        let mut h = self.host.borrow_mut();
        Ok(h.live_kv(&self.name, key).map(|v| Entry {
            value: v.value.clone(),
            version: v.version,
        }))
    }

    pub(crate) fn set(
        &self,
        key: &str,
        value: &[u8],
        c: WriteCondition,
        ttl_ms: Option<u64>,
    ) -> Result<u64, Error> {
        Self::check_key(key)?;
        if value.len() > 64 * 1024 {
            return Err(Error::LimitExceeded);
        }
        // As the host's stores: a TTL of 0 is refused before the backend is asked.
        ttl_deadline(0, ttl_ms)?;
        self.check_up()?;
        let mut h = self.host.borrow_mut();
        let expires_at = ttl_deadline(h.mono_ns, ttl_ms)?;
        if c != WriteCondition::Always {
            let raced = h
                .kv_races
                .get_mut(&(self.name.clone(), key.to_owned()))
                .and_then(VecDeque::pop_front);
            if let Some(other) = raced {
                h.kv_version += 1;
                let version = h.kv_version;
                h.kv.entry(self.name.clone()).or_default().insert(
                    key.to_owned(),
                    KvValue {
                        value: other,
                        version,
                        expires_at: None,
                    },
                );
            }
        }
        let current = h.live_kv(&self.name, key).map(|v| v.version);
        Self::check_condition(current, c)?;
        h.kv_version += 1;
        let version = h.kv_version;
        h.kv.entry(self.name.clone()).or_default().insert(
            key.to_owned(),
            KvValue {
                value: value.to_vec(),
                version,
                expires_at,
            },
        );
        Ok(version)
    }

    pub(crate) fn delete(&self, key: &str, c: WriteCondition) -> Result<bool, Error> {
        Self::check_key(key)?;
        if c == WriteCondition::IfAbsent {
            return Err(Error::InvalidArgument);
        }
        self.check_up()?;
        let mut h = self.host.borrow_mut();
        let current = h.live_kv(&self.name, key).map(|v| v.version);
        if current.is_none() && c == WriteCondition::Always {
            return Ok(false);
        }
        Self::check_condition(current, c)?;
        Ok(h.kv
            .get_mut(&self.name)
            .and_then(|m| m.remove(key))
            .is_some())
    }

    pub(crate) fn increment(
        &self,
        key: &str,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<i64, Error> {
        Self::check_key(key)?;
        // As host/src/wasm/kv.rs (both stores): a TTL of 0 is refused whether
        // or not the key exists (an existing key keeps its expiry).
        ttl_deadline(0, ttl_ms)?;
        self.check_up()?;
        let mut h = self.host.borrow_mut();
        let now = h.mono_ns;
        let (old, expires_at) = match h.live_kv(&self.name, key) {
            Some(v) => {
                // Only the form the host (and Redis) increments.
                let n =
                    legate_abi_rules::kv::canonical_int(&v.value).ok_or(Error::InvalidArgument)?;
                (n, v.expires_at)
            }
            None => (0, ttl_deadline(now, ttl_ms)?),
        };
        let new = old.checked_add(delta).ok_or(Error::InvalidArgument)?;
        h.kv_version += 1;
        let version = h.kv_version;
        h.kv.entry(self.name.clone()).or_default().insert(
            key.to_owned(),
            KvValue {
                value: new.to_string().into_bytes(),
                version,
                expires_at,
            },
        );
        Ok(new)
    }
}

/// Runs an asynchronous KV call on `host`'s store, as the host would when its
/// reply comes back.
pub(crate) fn run_kv(host: &Host, namespace: &str, key: &str, op: Op) -> Result<Reply, Error> {
    let ns = NamespaceHandle {
        host: host.clone(),
        name: namespace.to_owned(),
    };
    match op {
        Op::Get => ns.get(key).map(Reply::Get),
        Op::Set(value, c, ttl) => ns.set(key, &value, c, ttl).map(Reply::Set),
        Op::Delete(c) => ns.delete(key, c).map(Reply::Delete),
        Op::Increment(delta, ttl) => ns.increment(key, delta, ttl).map(Reply::Increment),
    }
}

pub(crate) fn kv_open(name: &str) -> Result<NamespaceHandle, Error> {
    let host = current_host().ok_or(Error::Unsupported)?;
    if !host.borrow().granted_kv.contains(name) {
        return Err(Error::Denied);
    }
    Ok(NamespaceHandle {
        host,
        name: name.to_owned(),
    })
}

// ---- callout ----

pub(crate) fn callout_check_cluster(cluster: &str) -> Result<(), Error> {
    with_host(Err(Error::Unsupported), |h| {
        if h.granted_clusters.contains(cluster) {
            Ok(())
        } else {
            Err(Error::Denied)
        }
    })
}

pub(crate) fn callout_send(r: &CalloutRequest) -> Result<u64, Error> {
    let host = current_host().ok_or(Error::Unsupported)?;
    let mut h = host.borrow_mut();
    let context = match h.call {
        Call::Exchange(c) => Some(c),
        Call::Tick => None,
        Call::Idle | Call::Configure | Call::Log(_) | Call::Done => {
            return Err(Error::InvalidState)
        }
    };
    if context.is_some() && h.detached_in_call {
        return Err(Error::InvalidState);
    }
    if !h.granted_clusters.contains(&r.cluster) {
        return Err(Error::Denied);
    }
    // As host/src/wasm/host.rs `build_callout`: the method a token, the path
    // an `http::Uri` starting with `/`, the authority an `http::uri::Authority`.
    if r.method.is_empty()
        || !r.method.bytes().all(is_tchar)
        || !callout_path_ok(&r.path)
        || r.timeout_ms > CALLOUT_MAX_TIMEOUT_MS
        || r.authority.as_deref().is_some_and(|a| !authority_ok(a))
    {
        return Err(Error::InvalidArgument);
    }
    let mut map = FieldList::new();
    for (n, v) in &r.headers {
        let n = check_name(n)?;
        // Framing and the authority are the host's, as on the real host.
        if host_owned(&n) {
            return Err(Error::InvalidArgument);
        }
        check_value(v)?;
        put_field(&mut map, n, v, false)?;
    }
    h.send(context, Sent::Http(r.clone()))
}

/// Whether `path` parses as the host parses a callout's path (an `http::Uri`
/// that starts with `/`, so its path-and-query): at most 65 534 bytes, path
/// bytes from the URL path set (plus `"`, `{`, `}`), query bytes from the URL
/// query set; nothing after a `#` is looked at (the `http` crate drops the
/// fragment).
fn callout_path_ok(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') || b.len() > 65_534 {
        return false;
    }
    let mut query = false;
    for &c in b {
        let ok = match c {
            b'#' => return true,
            b'?' if !query => {
                query = true;
                true
            }
            0x80..=0xFF | 0x21 | 0x24..=0x3B | 0x3D => true,
            _ if query => matches!(c, 0x3F..=0x7E),
            _ => matches!(
                c,
                0x40..=0x5F | 0x61..=0x7A | 0x7C | 0x7E | b'"' | b'{' | b'}'
            ),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Whether `a` parses as an `http::uri::Authority`, as the host requires of
/// a callout's authority: not empty, URI characters only (`%` only in the
/// userinfo or an IPv6 zone), brackets paired once, at most one port colon
/// (eight inside brackets), something after an `@`.
fn authority_ok(a: &str) -> bool {
    fn uri_char(b: u8) -> bool {
        matches!(b, b'!' | b'#' | b'$' | b'&'..=b';' | b'=' | b'?'..=b'[' | b']' | b'_' | b'a'..=b'z' | b'~')
    }
    let s = a.as_bytes();
    if s.is_empty() {
        return false;
    }
    let (mut colons, mut open, mut close, mut percent) = (0u32, false, false, false);
    let mut at = s.len();
    let mut end = s.len();
    for (i, &b) in s.iter().enumerate() {
        if matches!(b, b'/' | b'?' | b'#') {
            end = i;
            break;
        }
        if !uri_char(b) {
            if b == b'%' {
                percent = true;
                continue;
            }
            return false;
        }
        match b {
            b':' => {
                if colons >= 8 {
                    return false;
                }
                colons += 1;
            }
            b'[' => {
                if percent || open {
                    return false;
                }
                open = true;
            }
            b']' => {
                if !open || close {
                    return false;
                }
                close = true;
                colons = 0;
                percent = false;
            }
            b'@' => {
                at = i;
                colons = 0;
                percent = false;
            }
            _ => {}
        }
    }
    // The whole string must be the authority: a `/`, `?` or `#` ends it early.
    open == close && colons <= 1 && !(end > 0 && at == end - 1) && !percent && end == s.len()
}

/// `cancel(id)`: only an outstanding call of the running call's own context
/// (or, from `on_tick`, a plugin-level one) in this instance; anything else
/// is `NotFound`, as on the host (host/src/wasm/host.rs `cancel`).
pub(crate) fn callout_cancel(id: u64) -> Result<(), Error> {
    with_host(Err(Error::Unsupported), |h| {
        let context = match h.call {
            Call::Exchange(c) | Call::Log(c) => Some(c),
            Call::Tick => None,
            Call::Idle | Call::Configure | Call::Done => return Err(Error::NotFound),
        };
        let instance = h.instance;
        match h
            .callouts
            .iter_mut()
            .find(|c| c.id == id && c.outstanding_in(instance, context))
        {
            Some(c) => {
                c.state = CalloutState::Cancelled;
                Ok(())
            }
            None => Err(Error::NotFound),
        }
    })
}

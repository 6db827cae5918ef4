//! Metrics: counters, gauges and histograms with labels, rendered in the Prometheus
//! text format on the admin `/stats` page.
//!
//! Metrics are registered when config is applied (never on the request path); a
//! registration returns a cheap handle (an `Arc` of atomics) that workers update
//! without locks. Registering the same name and labels twice returns the same handle,
//! so a config reload keeps counting where it was. A hot restart's new process
//! takes the old one's counters and histograms over ([`Carried`]), as Envoy's
//! does, so they keep counting across it too.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds of histogram buckets, in seconds (Envoy's default buckets, 0.5ms–30min):
/// `legate_abi_rules::metrics::DEFAULT_BUCKETS`, what a plugin's histogram defined
/// with none has too (on the host and in the SDK's harness).
pub const BUCKETS: [f64; legate_abi_rules::metrics::DEFAULT_BUCKETS.len()] =
    legate_abi_rules::metrics::DEFAULT_BUCKETS;

/// A monotonically increasing count.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
    /// Increments now and decrements when the guard drops.
    pub fn track(&self) -> GaugeGuard {
        self.inc();
        GaugeGuard(self.clone())
    }
}

/// Decrements its gauge on drop.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds of the buckets ([`BUCKETS`], or a plugin's own).
    bounds: &'static [f64],
    /// Per bound, not cumulative.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// The sum of the values, in millionths (of a second, for durations).
    sum_micros: AtomicU64,
}

impl HistogramInner {
    fn new(bounds: &'static [f64]) -> Self {
        HistogramInner {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Default for HistogramInner {
    fn default() -> Self {
        HistogramInner::new(&BUCKETS)
    }
}

/// A distribution over fixed buckets: [`BUCKETS`] (seconds), or the bounds a
/// plugin defined its histogram with ([`Histogram::with_bounds`]).
#[derive(Clone, Debug, Default)]
pub struct Histogram(Arc<HistogramInner>);

impl Histogram {
    /// A histogram over `bounds` (strictly increasing, finite).
    pub fn with_bounds(bounds: &'static [f64]) -> Self {
        Histogram(Arc::new(HistogramInner::new(bounds)))
    }

    /// Records one duration (in seconds, against the bounds).
    pub fn observe(&self, d: Duration) {
        self.record(
            d.as_secs_f64(),
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
        );
    }

    /// Records one value (a plugin's, in its own unit): finite, not negative.
    pub fn observe_value(&self, v: f64) {
        if v.is_finite() && v >= 0.0 {
            // `as` saturates: a value past u64's millionths counts as the most.
            self.record(v, (v * 1e6) as u64);
        }
    }

    fn record(&self, v: f64, micros: u64) {
        // Non-cumulative storage: only the first bucket that fits is incremented;
        // rendering accumulates.
        if let Some(i) = self.0.bounds.iter().position(|b| v <= *b) {
            self.0.buckets[i].fetch_add(1, Relaxed);
        }
        self.0.count.fetch_add(1, Relaxed);
        self.0.sum_micros.fetch_add(micros, Relaxed);
    }
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.0.count.load(Relaxed)
    }
}

#[derive(Clone, Debug)]
enum Metric {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

impl Metric {
    fn type_name(&self) -> &'static str {
        match self {
            Metric::Counter(_) => "counter",
            Metric::Gauge(_) => "gauge",
            Metric::Histogram(_) => "histogram",
        }
    }

    /// Whether a handle to it is held outside the registry.
    fn in_use(&self) -> bool {
        match self {
            Metric::Counter(c) => Arc::strong_count(&c.0) > 1,
            Metric::Gauge(g) => Arc::strong_count(&g.0) > 1,
            Metric::Histogram(h) => Arc::strong_count(&h.0) > 1,
        }
    }

    /// The same type (and, for histograms, the same buckets).
    fn same_shape(&self, other: &Metric) -> bool {
        match (self, other) {
            (Metric::Histogram(a), Metric::Histogram(b)) => a.0.bounds == b.0.bounds,
            _ => self.type_name() == other.type_name(),
        }
    }
}

#[derive(Debug, Default)]
struct Family {
    help: &'static str,
    /// The type a plugin declared the family with ([`Stats::declare`]), before
    /// (or without) a series: a labelled metric makes its series on first use.
    declared: Option<&'static str>,
    /// The buckets of a declared histogram family: every plugin defining it
    /// must define these ([`Stats::declare_histogram`]).
    bounds: Option<&'static [f64]>,
    series: BTreeMap<String, Metric>,
    /// Series created by [`Stats::absorb`] that this process has not registered
    /// yet: the first registration claims one, and replaces it if its type
    /// differs (a metric whose type changed between versions).
    carried: BTreeSet<String>,
}

impl Family {
    /// The family's type: declared, or its series'.
    fn kind(&self) -> Option<&'static str> {
        self.declared
            .or_else(|| self.series.values().next().map(Metric::type_name))
    }
}

/// One series made on an owner's behalf: its family and label values.
pub type SeriesClaim = (&'static str, Vec<String>);

/// The series made on an owner's behalf, for a cap.
pub type SeriesClaims = Mutex<HashSet<SeriesClaim>>;

/// The registry of all metrics of the process.
#[derive(Debug, Default)]
pub struct Stats {
    families: Mutex<BTreeMap<&'static str, Family>>,
    /// The series each plugin made, by plugin name: kept for the process's
    /// life, as the series are, so a plugin loaded again (a reload) counts
    /// against the same cap instead of getting a fresh one per load.
    claims: Mutex<HashMap<String, Arc<SeriesClaims>>>,
}

impl Stats {
    /// A new, empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Stats::default())
    }

    fn register(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        make: impl FnOnce() -> Metric,
    ) -> Metric {
        let key = render_labels(labels);
        let mut fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let fam = self.family(&mut fams, name, help);
        if fam.carried.remove(&key) {
            self.staged(|log| log.uncarried.push((name, key.clone())));
            let wanted = make();
            return match fam.series.get(&key) {
                Some(m) if m.same_shape(&wanted) => m.clone(),
                _ => {
                    fam.series.insert(key, wanted.clone());
                    wanted
                }
            };
        }
        match fam.series.entry(key) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => {
                self.staged(|log| log.series.push((name, e.key().clone())));
                e.insert(make()).clone()
            }
        }
    }

    /// Family `name` of `fams`, made (with `help`, and staged) if new.
    fn family<'f>(
        &self,
        fams: &'f mut BTreeMap<&'static str, Family>,
        name: &'static str,
        help: &'static str,
    ) -> &'f mut Family {
        match fams.entry(name) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                self.staged(|log| log.families.push(name));
                e.insert(Family {
                    help,
                    ..Family::default()
                })
            }
        }
    }

    /// The series plugin `owner` has made (see [`SeriesClaims`]), for its cap.
    pub fn claims(&self, owner: &str) -> Arc<SeriesClaims> {
        let set = {
            let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
            claims.entry(owner.to_string()).or_default().clone()
        };
        self.staged(|log| {
            if !log.claims.iter().any(|(c, _)| Arc::ptr_eq(c, &set)) {
                let before = set.lock().unwrap_or_else(PoisonError::into_inner).clone();
                log.claims.push((set.clone(), before));
            }
        });
        set
    }

    /// Starts recording what this thread adds to the registry (series,
    /// families, declarations, claims against a plugin's cap) until the
    /// returned [`Stage`] is committed or dropped. Dropped uncommitted (a
    /// rejected reload), it takes those additions back, so a config that
    /// never went live leaves `/stats` and the caps as they were, as Envoy
    /// leaves no trace of a rejected config. Only this thread's additions are
    /// recorded: a reload builds everything on its caller's thread, and
    /// workers keep registering the live config's series meanwhile. A stage
    /// started while one is open on this thread is part of the outer one.
    pub fn stage(&self) -> Stage<'_> {
        let id = self.id();
        let open = STAGE.with(|s| {
            let mut s = s.borrow_mut();
            if s.is_some() {
                return false;
            }
            *s = Some(StageLog {
                registry: id,
                ..StageLog::default()
            });
            true
        });
        Stage { stats: self, open }
    }

    fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// Runs `f` on this thread's open stage of this registry, if any.
    fn staged(&self, f: impl FnOnce(&mut StageLog)) {
        let id = self.id();
        STAGE.with(|s| {
            if let Some(log) = s.borrow_mut().as_mut().filter(|l| l.registry == id) {
                f(log);
            }
        });
    }

    /// Takes back what a stage recorded ([`Stats::stage`]). A series is
    /// removed only if nothing but the registry holds it: one that a live
    /// worker started using meanwhile (the same name and labels, made first
    /// by the stage) stays, and so does its family's type and its claim.
    fn roll_back(&self, log: StageLog) {
        let mut kept: HashSet<&'static str> = HashSet::new();
        {
            let mut fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
            for (name, key) in &log.series {
                let Some(fam) = fams.get_mut(name) else {
                    continue;
                };
                if fam.series.get(key).is_some_and(|m| !m.in_use()) {
                    fam.series.remove(key);
                } else {
                    kept.insert(name);
                }
            }
            for (name, key) in log.uncarried {
                // A carried series the stage claimed goes back to waiting for
                // its first registration, unless something uses it now.
                if let Some(fam) = fams.get_mut(name) {
                    if fam.series.get(&key).is_some_and(|m| !m.in_use()) {
                        fam.carried.insert(key);
                    }
                }
            }
            for name in &log.declared {
                if let Some(fam) = fams.get_mut(name) {
                    if fam.series.is_empty() {
                        fam.declared = None;
                        fam.bounds = None;
                    } else {
                        kept.insert(name);
                    }
                }
            }
            for name in &log.families {
                let empty = fams.get(name).is_some_and(|f| {
                    f.series.is_empty() && f.declared.is_none() && f.carried.is_empty()
                });
                if empty {
                    fams.remove(name);
                }
            }
        }
        for (set, before) in log.claims {
            let mut set = set.lock().unwrap_or_else(PoisonError::into_inner);
            set.retain(|claim| before.contains(claim) || kept.contains(claim.0));
        }
    }

    /// The counter `name{labels}`, created on first use.
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Counter {
        match self.register(name, help, labels, || Metric::Counter(Counter::default())) {
            Metric::Counter(c) => c,
            // A name registered with another type is a programming error; a detached
            // metric keeps the proxy running and the mistake visible in tests.
            _ => Counter::default(),
        }
    }

    /// The gauge `name{labels}`, created on first use.
    pub fn gauge(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Gauge {
        match self.register(name, help, labels, || Metric::Gauge(Gauge::default())) {
            Metric::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    /// The histogram `name{labels}`, created on first use.
    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Histogram {
        self.histogram_over(name, help, labels, &BUCKETS)
    }

    /// The histogram `name{labels}` over `bounds` (a plugin's buckets), created
    /// on first use.
    pub fn histogram_over(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        bounds: &'static [f64],
    ) -> Histogram {
        match self.register(name, help, labels, || {
            Metric::Histogram(Histogram::with_bounds(bounds))
        }) {
            Metric::Histogram(h) => h,
            _ => Histogram::with_bounds(bounds),
        }
    }

    /// The value of counter `name{labels}`, if it exists; unlike
    /// [`Stats::counter`] it never makes the series (or its family), so a
    /// reader (the admin `/plugins` page) leaves `/stats` as it was.
    pub fn counter_value(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        match self.existing(name, labels)? {
            Metric::Counter(c) => Some(c.get()),
            _ => None,
        }
    }

    /// The value of gauge `name{labels}`, if it exists; see
    /// [`Stats::counter_value`].
    pub fn gauge_value(&self, name: &str, labels: &[(&str, &str)]) -> Option<i64> {
        match self.existing(name, labels)? {
            Metric::Gauge(g) => Some(g.get()),
            _ => None,
        }
    }

    /// The series `name{labels}`, if registered.
    fn existing(&self, name: &str, labels: &[(&str, &str)]) -> Option<Metric> {
        let key = render_labels(labels);
        let fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        fams.get(name)?.series.get(&key).cloned()
    }

    /// A copy of every counter and histogram, for a hot restart's new process
    /// ([`Stats::absorb`]). Gauges are left out: they describe this process
    /// (its open connections, its instances), which the new one does not inherit.
    pub fn carry(&self) -> Carried {
        let fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let mut series = Vec::new();
        for (name, fam) in fams.iter() {
            for (labels, m) in &fam.series {
                let value = match m {
                    Metric::Counter(c) => CarriedValue::Counter(c.get()),
                    Metric::Histogram(h) => CarriedValue::Histogram {
                        bounds: h.0.bounds.to_vec(),
                        buckets: h.0.buckets.iter().map(|b| b.load(Relaxed)).collect(),
                        count: h.0.count.load(Relaxed),
                        sum_micros: h.0.sum_micros.load(Relaxed),
                    },
                    Metric::Gauge(_) => continue,
                };
                series.push(CarriedSeries {
                    name: (*name).to_string(),
                    help: fam.help.to_string(),
                    labels: labels.clone(),
                    value,
                });
            }
        }
        Carried {
            series,
            clusters: Vec::new(),
        }
    }

    /// Adds to this registry what `now` (a copy from a hot restart's old process)
    /// counted since `before` (the previous copy from the same process, if any):
    /// each counter and histogram goes on from the old process's value. A series
    /// this process has not registered is created, so it is there when it is.
    /// A series registered here with another type, or malformed, is skipped.
    pub fn absorb(&self, now: &Carried, before: Option<&Carried>) {
        let before: HashMap<(&str, &str), &CarriedValue> = before
            .map(|b| {
                b.series
                    .iter()
                    .map(|s| ((s.name.as_str(), s.labels.as_str()), &s.value))
                    .collect()
            })
            .unwrap_or_default();
        let mut fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        for s in &now.series {
            let labels_ok =
                s.labels.is_empty() || (s.labels.starts_with('{') && s.labels.ends_with('}'));
            let buckets_ok = match &s.value {
                CarriedValue::Histogram {
                    bounds, buckets, ..
                } => buckets.len() == carried_bounds(bounds).len(),
                CarriedValue::Counter(_) => true,
            };
            if !labels_ok || !buckets_ok {
                tracing::debug!(
                    "hot restart: skipping malformed series {}{}",
                    s.name,
                    s.labels
                );
                continue;
            }
            let prev = before.get(&(s.name.as_str(), s.labels.as_str()));
            let fam = fams
                .entry(intern(s.name.clone()))
                .or_insert_with(|| Family {
                    help: intern(s.help.clone()),
                    ..Family::default()
                });
            let m = match fam.series.entry(s.labels.clone()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    fam.carried.insert(s.labels.clone());
                    e.insert(match &s.value {
                        CarriedValue::Counter(_) => Metric::Counter(Counter::default()),
                        CarriedValue::Histogram { bounds, .. } => {
                            Metric::Histogram(Histogram::with_bounds(carried_bounds(bounds)))
                        }
                    })
                }
            };
            match (m, &s.value) {
                (Metric::Counter(c), CarriedValue::Counter(v)) => {
                    let was = match prev {
                        Some(CarriedValue::Counter(p)) => *p,
                        _ => 0,
                    };
                    c.add(v.saturating_sub(was));
                }
                (
                    Metric::Histogram(h),
                    CarriedValue::Histogram {
                        bounds,
                        buckets,
                        count,
                        sum_micros,
                    },
                ) if h.0.bounds == carried_bounds(bounds) => {
                    let (was_buckets, was_count, was_sum) = match prev {
                        Some(CarriedValue::Histogram {
                            buckets,
                            count,
                            sum_micros,
                            ..
                        }) if buckets.len() == h.0.bounds.len() => {
                            (buckets.as_slice(), *count, *sum_micros)
                        }
                        _ => (&[][..], 0, 0),
                    };
                    for (i, b) in buckets.iter().enumerate() {
                        let was = was_buckets.get(i).copied().unwrap_or(0);
                        h.0.buckets[i].fetch_add(b.saturating_sub(was), Relaxed);
                    }
                    h.0.count
                        .fetch_add(count.saturating_sub(was_count), Relaxed);
                    h.0.sum_micros
                        .fetch_add(sum_micros.saturating_sub(was_sum), Relaxed);
                }
                _ => tracing::debug!(
                    "hot restart: {}{} has another type here; not carried over",
                    s.name,
                    s.labels
                ),
            }
        }
    }

    /// The type (`counter`, `gauge`, `histogram`) of family `name`, if it has
    /// a series or was declared ([`Stats::declare`]).
    pub fn kind_of(&self, name: &str) -> Option<&'static str> {
        let fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        fams.get(name).and_then(Family::kind)
    }

    /// Declares family `name` (a plugin's metric) to be of type `kind`
    /// (`counter`, `gauge`, `histogram`), whether or not it has a series yet.
    /// False, declaring nothing, if that would put two types in one family (the
    /// text format gives a family one type) or make two families write the same
    /// sample name: a histogram `x` writes `x_bucket`, `x_sum` and `x_count`.
    /// A histogram declared so has the host's buckets ([`BUCKETS`]).
    pub fn declare(&self, name: &'static str, help: &'static str, kind: &'static str) -> bool {
        let bounds = (kind == "histogram").then_some(&BUCKETS[..]);
        self.declare_shape(name, help, kind, bounds)
    }

    /// [`Stats::declare`] for a histogram over `bounds`. False, declaring
    /// nothing, also if the family was declared over other bounds, or has a
    /// series over others (a family's series share one layout, else `/stats`
    /// shows one family with two): one plugin's `define-histogram` must not
    /// give a family that another plugin (or an earlier version of itself)
    /// defined other buckets.
    pub fn declare_histogram(
        &self,
        name: &'static str,
        help: &'static str,
        bounds: &'static [f64],
    ) -> bool {
        self.declare_shape(name, help, "histogram", Some(bounds))
    }

    fn declare_shape(
        &self,
        name: &'static str,
        help: &'static str,
        kind: &'static str,
        bounds: Option<&'static [f64]>,
    ) -> bool {
        const PARTS: [&str; 3] = ["_bucket", "_sum", "_count"];
        let mut fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let kind_of = |n: &str| fams.get(n).and_then(Family::kind);
        if kind_of(name).is_some_and(|k| k != kind) {
            return false;
        }
        // This name is a part of a histogram's, or that histogram's parts are
        // families of their own.
        let part_of_histogram = PARTS.iter().any(|p| {
            name.strip_suffix(p)
                .is_some_and(|base| kind_of(base) == Some("histogram"))
        });
        let parts_taken = kind == "histogram"
            && PARTS
                .iter()
                .any(|p| kind_of(&format!("{name}{p}")).is_some());
        if part_of_histogram || parts_taken {
            return false;
        }
        // The family's buckets: declared, or those of a series this process
        // registered (a series carried over a hot restart may have a previous
        // version's, and is replaced on first use).
        let have = fams.get(name).and_then(|f| {
            f.bounds.or_else(|| {
                f.series
                    .iter()
                    .filter(|(key, _)| !f.carried.contains(*key))
                    .find_map(|(_, m)| match m {
                        Metric::Histogram(h) => Some(h.0.bounds),
                        _ => None,
                    })
            })
        });
        if let (Some(have), Some(want)) = (have, bounds) {
            if have != want {
                return false;
            }
        }
        let fam = self.family(&mut fams, name, help);
        if fam.declared.is_none() {
            self.staged(|log| log.declared.push(name));
        }
        fam.declared = Some(kind);
        fam.bounds = bounds.or(fam.bounds);
        true
    }

    /// All metrics in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        // The series are copied (handles, not values) under the lock and
        // formatted after it: a worker registering a series (a plugin's first
        // use of a label set) waits for the copy, not for the whole scrape.
        type Series = Vec<(String, Metric)>;
        let fams: Vec<(&'static str, &'static str, Series)> = {
            let fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
            fams.iter()
                .filter(|(_, f)| !f.series.is_empty())
                .map(|(name, f)| {
                    let series = f.series.iter().map(|(l, m)| (l.clone(), m.clone()));
                    (*name, f.help, series.collect())
                })
                .collect()
        };
        let mut out = String::with_capacity(4096);
        for (name, help, series) in &fams {
            let Some((_, first)) = series.first() else {
                continue;
            };
            let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
            let _ = writeln!(out, "# TYPE {name} {}", first.type_name());
            for (labels, m) in series {
                match m {
                    Metric::Counter(c) => {
                        let _ = writeln!(out, "{name}{labels} {}", c.get());
                    }
                    Metric::Gauge(g) => {
                        let _ = writeln!(out, "{name}{labels} {}", g.get());
                    }
                    Metric::Histogram(h) => render_histogram(&mut out, name, labels, h),
                }
            }
        }
        out
    }
}

/// What one thread added to a registry while a [`Stage`] was open.
#[derive(Debug, Default)]
struct StageLog {
    /// The registry staged ([`Stats::id`]).
    registry: usize,
    /// Series made: (family, labels as rendered).
    series: Vec<(&'static str, String)>,
    /// Families made.
    families: Vec<&'static str>,
    /// Families declared ([`Stats::declare`]) that were not before.
    declared: Vec<&'static str>,
    /// Series carried over a hot restart that the stage claimed.
    uncarried: Vec<(&'static str, String)>,
    /// The claim sets touched ([`Stats::claims`]), with their contents before.
    claims: Vec<(Arc<SeriesClaims>, HashSet<SeriesClaim>)>,
}

thread_local! {
    /// This thread's open stage ([`Stats::stage`]), if any.
    static STAGE: std::cell::RefCell<Option<StageLog>> = const { std::cell::RefCell::new(None) };
}

/// What a reload adds to the registry, kept only if it commits
/// ([`Stats::stage`]).
#[must_use = "dropped, a stage takes back what it recorded"]
pub struct Stage<'a> {
    stats: &'a Stats,
    /// This guard opened the thread's stage (not part of an outer one).
    open: bool,
}

impl Stage<'_> {
    /// Keeps what was recorded: the config it was made for went live.
    pub fn commit(mut self) {
        if std::mem::take(&mut self.open) {
            STAGE.with(|s| s.borrow_mut().take());
        }
    }
}

impl Drop for Stage<'_> {
    fn drop(&mut self) {
        if self.open {
            if let Some(log) = STAGE.with(|s| s.borrow_mut().take()) {
                self.stats.roll_back(log);
            }
        }
    }
}

/// Counters and histograms passed from a hot restart's old process to the new
/// one ([`Stats::carry`], [`Stats::absorb`]), as one JSON line.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Carried {
    series: Vec<CarriedSeries>,
    /// Each cluster's counters (`legate_cluster_*`, kept by the clusters, not
    /// this registry), by cluster name; absent from a Legate that predates
    /// carrying them.
    #[serde(default)]
    pub clusters: Vec<(String, Vec<(String, u64)>)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CarriedSeries {
    name: String,
    help: String,
    /// As rendered: `{a="x"}`, or empty.
    labels: String,
    value: CarriedValue,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CarriedValue {
    Counter(u64),
    Histogram {
        /// The buckets' upper bounds; empty: [`BUCKETS`] (as an older
        /// process, which sends none, has them).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        bounds: Vec<f64>,
        /// Per bucket, not cumulative.
        buckets: Vec<u64>,
        count: u64,
        sum_micros: u64,
    },
}

/// A carried histogram's bounds, as the `&'static` slice a [`Histogram`]
/// keeps ([`intern_bounds`]); none sent: [`BUCKETS`].
fn carried_bounds(bounds: &[f64]) -> &'static [f64] {
    if bounds.is_empty() || bounds == BUCKETS {
        &BUCKETS
    } else {
        intern_bounds(bounds)
    }
}

/// `bounds` as a `&'static` slice (a plugin's histogram buckets), leaked once
/// per distinct layout: their number is bounded by the metrics plugins may
/// define.
pub fn intern_bounds(bounds: &[f64]) -> &'static [f64] {
    static INTERNED: OnceLock<Mutex<Vec<&'static [f64]>>> = OnceLock::new();
    let mut all = INTERNED
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(b) = all.iter().find(|b| **b == bounds) {
        return b;
    }
    let leaked: &'static [f64] = Box::leak(bounds.to_vec().into_boxed_slice());
    all.push(leaked);
    leaked
}

/// `s` as a `&'static str`, for a metric name or help text not known when the
/// binary was built (a plugin's metrics, a carried series): the registry keys
/// families by `&'static str`. Each distinct string is leaked once; their number
/// is bounded by the metrics plugins may define and those a hot restart carries.
pub fn intern(s: String) -> &'static str {
    static INTERNED: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let mut map = INTERNED
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(s) = map.get(&s) {
        return s;
    }
    let leaked: &'static str = Box::leak(s.clone().into_boxed_str());
    map.insert(s, leaked);
    leaked
}

fn render_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let inner = labels.trim_start_matches('{').trim_end_matches('}');
    let sep = if inner.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, le) in h.0.bounds.iter().enumerate() {
        cumulative += h.0.buckets[i].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{inner}{sep}le=\"{le}\"}} {cumulative}");
    }
    // Read after the buckets: an observation between the reads (it bumps its
    // bucket, then the count) could leave +Inf below the last bucket, which
    // Prometheus rejects as non-monotonic.
    let count = h.0.count.load(Relaxed).max(cumulative);
    let _ = writeln!(out, "{name}_bucket{{{inner}{sep}le=\"+Inf\"}} {count}");
    let sum = h.0.sum_micros.load(Relaxed) as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum{labels} {sum}");
    let _ = writeln!(out, "{name}_count{labels} {count}");
}

/// HELP text as the text format wants it: `\` and newlines escaped, so a
/// plugin's help cannot end the line and break the whole scrape.
fn escape_help(help: &str) -> std::borrow::Cow<'_, str> {
    if !help.contains(['\\', '\n']) {
        return std::borrow::Cow::Borrowed(help);
    }
    std::borrow::Cow::Owned(help.replace('\\', "\\\\").replace('\n', "\\n"))
}

/// `{a="x",b="y"}` with Prometheus escaping; empty string for no labels.
fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut s = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s.push('}');
    s
}

/// The label value for a status class: `2xx`, `5xx`, ...
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_over_its_own_bounds_renders_and_carries_them() {
        let s = Stats::new();
        let bounds = intern_bounds(&[1.0, 10.0, 100.0]);
        let h = s.histogram_over("legate_sizes", "Sizes.", &[], bounds);
        for v in [0.5, 50.0, 50.0, 5000.0] {
            h.observe_value(v);
        }
        h.observe_value(f64::NAN);
        let text = s.render();
        for line in [
            "legate_sizes_bucket{le=\"1\"} 1",
            "legate_sizes_bucket{le=\"10\"} 1",
            "legate_sizes_bucket{le=\"100\"} 3",
            "legate_sizes_bucket{le=\"+Inf\"} 4",
            "legate_sizes_sum 5100.5",
            "legate_sizes_count 4",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        assert!(!text.contains("le=\"0.0005\""), "{text}");
        // Over a hot restart: the new process gets the same buckets.
        let next = Stats::new();
        next.absorb(&s.carry(), None);
        let h = next.histogram_over("legate_sizes", "Sizes.", &[], bounds);
        h.observe_value(5.0);
        let text = next.render();
        assert!(text.contains("legate_sizes_bucket{le=\"10\"} 2"), "{text}");
        assert!(text.contains("legate_sizes_count 5"), "{text}");
    }

    /// A stage dropped uncommitted takes back what its thread added (series,
    /// families, declarations, claims), not what was there before nor what is
    /// in use; a committed one keeps it all.
    #[test]
    fn a_stage_dropped_takes_back_its_additions() {
        let s = Stats::new();
        let live = s.counter("legate_plugin_hits", "Hits.", &[("plugin", "p")]);
        live.add(5);
        let claims = s.claims("p");
        claims
            .lock()
            .unwrap()
            .insert(("legate_plugin_hits", Vec::new()));
        let before = s.render();
        {
            let _stage = s.stage();
            // The live series again, a new one in its family, a new family,
            // a declared one, their claims, and a nested stage's additions.
            s.counter("legate_plugin_hits", "Hits.", &[("plugin", "p")])
                .inc();
            s.counter("legate_plugin_hits", "Hits.", &[("plugin", "q")]);
            s.gauge("legate_plugin_fresh", "Fresh.", &[("plugin", "p")]);
            assert!(s.declare("legate_plugin_typed", "Typed.", "gauge"));
            s.claims("p")
                .lock()
                .unwrap()
                .insert(("legate_plugin_fresh", Vec::new()));
            s.stage().commit();
            s.counter("legate_nested_total", "Nested.", &[]);
            // Made by the stage, but used by someone else meanwhile: kept.
            let used = s.counter("legate_plugin_used", "Used.", &[]);
            std::mem::forget(used);
        }
        let after = s.render();
        assert_eq!(
            after,
            format!(
                "{}# HELP legate_plugin_used Used.\n# TYPE legate_plugin_used counter\n\
                 legate_plugin_used 0\n",
                before.replace("hits{plugin=\"p\"} 5", "hits{plugin=\"p\"} 6")
            )
        );
        assert_eq!(s.kind_of("legate_plugin_typed"), None);
        assert!(s.declare("legate_plugin_typed", "Typed.", "counter"));
        assert_eq!(
            *s.claims("p").lock().unwrap(),
            HashSet::from([("legate_plugin_hits", Vec::new())])
        );
        {
            let stage = s.stage();
            s.counter("legate_kept_total", "Kept.", &[]);
            stage.commit();
        }
        assert!(s.render().contains("legate_kept_total 0\n"));
        // Another thread's registrations are not the stage's.
        let stage = s.stage();
        let t = s.clone();
        std::thread::spawn(move || t.counter("legate_other_total", "Other.", &[]))
            .join()
            .unwrap();
        drop(stage);
        assert!(s.render().contains("legate_other_total 0\n"));
    }

    #[test]
    fn help_text_cannot_break_the_format() {
        let s = Stats::new();
        s.counter("legate_x", "a\nb\\c", &[]).inc();
        let text = s.render();
        assert!(text.contains("# HELP legate_x a\\nb\\\\c\n"), "{text}");
        for line in text.lines() {
            assert!(
                line.starts_with('#') || line.starts_with("legate_x"),
                "{line:?}"
            );
        }
    }

    #[test]
    fn render_and_reuse() {
        let s = Stats::new();
        let c = s.counter("legate_x_total", "X.", &[("listener", "web")]);
        c.add(3);
        // Same name and labels: same series.
        s.counter("legate_x_total", "X.", &[("listener", "web")])
            .inc();
        let g = s.gauge("legate_active", "Active.", &[]);
        let guard = g.track();
        let h = s.histogram("legate_lat_seconds", "Latency.", &[("route", "a\"b")]);
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(2));
        let text = s.render();
        assert!(
            text.contains("# TYPE legate_x_total counter\nlegate_x_total{listener=\"web\"} 4\n")
        );
        assert!(text.contains("legate_active 1\n"));
        assert!(text.contains("legate_lat_seconds_bucket{route=\"a\\\"b\",le=\"0.005\"} 1\n"));
        assert!(text.contains("legate_lat_seconds_bucket{route=\"a\\\"b\",le=\"+Inf\"} 2\n"));
        assert!(text.contains("legate_lat_seconds_count{route=\"a\\\"b\"} 2\n"));
        drop(guard);
        assert_eq!(g.get(), 0);
    }

    /// What a hot restart does: the new registry starts from the old one's copy,
    /// then adds what the old counted until it exited; gauges stay per process.
    #[test]
    fn counts_carry_over_a_hot_restart() {
        let old = Stats::new();
        let c = old.counter("legate_x_total", "X.", &[("listener", "web")]);
        let h = old.histogram("legate_lat_seconds", "Latency.", &[]);
        let only_old = old.counter("legate_gone_total", "Gone.", &[("route", "r")]);
        old.gauge("legate_active", "Active.", &[]).set(7);
        old.counter("legate_kind", "Kind.", &[]).add(5);
        c.add(10);
        h.observe(Duration::from_millis(3));
        only_old.add(2);
        // Through JSON, as on the upgrade socket.
        let wire = |c: &Carried| -> Carried {
            serde_json::from_str(&serde_json::to_string(c).unwrap()).unwrap()
        };
        let first = wire(&old.carry());

        let new = Stats::new();
        new.absorb(&first, None);
        // Registered after (by the new config), the series goes on from there.
        let c2 = new.counter("legate_x_total", "X.", &[("listener", "web")]);
        assert_eq!(c2.get(), 10);
        c2.inc();
        // A metric that is a gauge in this process replaces the carried counter;
        // the old process's later counts for it are not added to the gauge.
        let kind = new.gauge("legate_kind", "Kind.", &[]);

        // The old process drains: 4 more, one more observation; then its last copy.
        c.add(4);
        h.observe(Duration::from_secs(2));
        new.absorb(&wire(&old.carry()), Some(&first));
        assert_eq!(c2.get(), 15);
        assert_eq!(kind.get(), 0);
        let text = new.render();
        assert!(
            text.contains("legate_gone_total{route=\"r\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("# HELP legate_gone_total Gone.\n"), "{text}");
        assert!(text.contains("legate_lat_seconds_count 2\n"), "{text}");
        assert!(
            text.contains("legate_lat_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("legate_lat_seconds_bucket{le=\"2.5\"} 2\n"),
            "{text}"
        );
        assert!(!text.contains("legate_active"), "{text}");
        assert!(
            text.contains("# TYPE legate_kind gauge\nlegate_kind 0\n"),
            "{text}"
        );

        // Malformed series are skipped, the rest still absorbed.
        let bad: Carried = serde_json::from_str(
            r#"{"series":[
                {"name":"legate_a_total","help":"A.","labels":"listener=\"x\"","value":{"counter":3}},
                {"name":"legate_b_seconds","help":"B.","labels":"","value":{"histogram":{"buckets":[1],"count":1,"sum_micros":1}}},
                {"name":"legate_c_total","help":"C.","labels":"","value":{"counter":3}}
            ]}"#,
        )
        .unwrap();
        new.absorb(&bad, None);
        let text = new.render();
        assert!(!text.contains("legate_a_total"), "{text}");
        assert!(!text.contains("legate_b_seconds"), "{text}");
        assert!(text.contains("legate_c_total 3\n"), "{text}");
    }
}

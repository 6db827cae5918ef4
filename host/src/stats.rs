//! Metrics: counters, gauges and histograms with labels, rendered in the Prometheus
//! text format on the admin `/stats` page.
//!
//! Metrics are registered when config is applied (never on the request path); a
//! registration returns a cheap handle (an `Arc` of atomics) that workers update
//! without locks. Registering the same name and labels twice returns the same handle,
//! so a config reload keeps counting where it was.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Upper bounds of histogram buckets, in seconds (Envoy's default buckets, 0.5ms–30min).
pub const BUCKETS: [f64; 19] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 600.0, 1800.0,
];

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

#[derive(Debug, Default)]
struct HistogramInner {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// A latency distribution with fixed buckets.
#[derive(Clone, Debug, Default)]
pub struct Histogram(Arc<HistogramInner>);

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // Non-cumulative storage: only the first bucket that fits is incremented;
        // rendering accumulates.
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.0.buckets[i].fetch_add(1, Relaxed);
        }
        self.0.count.fetch_add(1, Relaxed);
        self.0
            .sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
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
}

#[derive(Debug, Default)]
struct Family {
    help: &'static str,
    series: BTreeMap<String, Metric>,
}

/// The registry of all metrics of the process.
#[derive(Debug, Default)]
pub struct Stats {
    families: Mutex<BTreeMap<&'static str, Family>>,
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
        let fam = fams.entry(name).or_insert_with(|| Family {
            help,
            series: BTreeMap::new(),
        });
        fam.series.entry(key).or_insert_with(make).clone()
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
        match self.register(name, help, labels, || {
            Metric::Histogram(Histogram::default())
        }) {
            Metric::Histogram(h) => h,
            _ => Histogram::default(),
        }
    }

    /// All metrics in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::with_capacity(4096);
        for (name, fam) in fams.iter() {
            let Some(first) = fam.series.values().next() else {
                continue;
            };
            let _ = writeln!(out, "# HELP {name} {}", fam.help);
            let _ = writeln!(out, "# TYPE {name} {}", first.type_name());
            for (labels, m) in &fam.series {
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

fn render_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let inner = labels.trim_start_matches('{').trim_end_matches('}');
    let sep = if inner.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, le) in BUCKETS.iter().enumerate() {
        cumulative += h.0.buckets[i].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{inner}{sep}le=\"{le}\"}} {cumulative}");
    }
    let count = h.0.count.load(Relaxed);
    let _ = writeln!(out, "{name}_bucket{{{inner}{sep}le=\"+Inf\"}} {count}");
    let sum = h.0.sum_micros.load(Relaxed) as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum{labels} {sum}");
    let _ = writeln!(out, "{name}_count{labels} {count}");
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
}

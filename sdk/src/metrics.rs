//! Metrics the host exports on its admin endpoint
//! (`legate_plugin_<name>{plugin="…",…}`): define them in
//! [`HttpFilter::configure`](crate::HttpFilter::configure), keep the handles,
//! record through them. Recording never fails.

use crate::backend;
use crate::Error;

/// A monotonically increasing counter series.
pub struct Counter(backend::CounterHandle);

impl Counter {
    /// Define a counter. `name` and label names match `[a-z][a-z0-9_]*` (at
    /// most 64 bytes; `plugin` is reserved as a label). Errors:
    /// `InvalidArgument` (also for the host's own per-plugin names such as
    /// `calls_total`, names ending in `_bucket`, `_sum` or `_count`, and help
    /// over 1 KiB: abi/README.md §5.6), `InvalidState` (outside `configure`),
    /// `LimitExceeded` (over 100 metrics or 1000 series per plugin).
    pub fn define(name: &str, help: &str, label_names: &[&str]) -> Result<Self, Error> {
        backend::define_counter(name, help, label_names).map(Counter)
    }
    /// Add `delta`.
    pub fn add(&self, delta: u64) {
        self.0.add(delta)
    }
    /// Add 1.
    pub fn inc(&self) {
        self.0.add(1)
    }
    /// The series for `values` (one per label name, in definition order). Keep
    /// the handle for hot paths. Errors: `InvalidArgument` (wrong count, value
    /// over 128 bytes), `LimitExceeded` (series cap).
    pub fn with_labels(&self, values: &[&str]) -> Result<Self, Error> {
        self.0.with_labels(values).map(Counter)
    }
}

/// A gauge series.
pub struct Gauge(backend::GaugeHandle);

impl Gauge {
    /// Define a gauge. As [`Counter::define`].
    pub fn define(name: &str, help: &str, label_names: &[&str]) -> Result<Self, Error> {
        backend::define_gauge(name, help, label_names).map(Gauge)
    }
    /// Set the value.
    pub fn set(&self, value: i64) {
        self.0.set(value)
    }
    /// Add `delta` (may be negative).
    pub fn add(&self, delta: i64) {
        self.0.add(delta)
    }
    /// As [`Counter::with_labels`].
    pub fn with_labels(&self, values: &[&str]) -> Result<Self, Error> {
        self.0.with_labels(values).map(Gauge)
    }
}

/// A histogram series.
pub struct Histogram(backend::HistogramHandle);

impl Histogram {
    /// Define a histogram with upper bucket bounds, in the unit you observe
    /// (finite, strictly increasing, at most 64; empty: the host's defaults,
    /// seconds from 0.0005 to 1800). Otherwise as [`Counter::define`].
    pub fn define(
        name: &str,
        help: &str,
        label_names: &[&str],
        buckets: &[f64],
    ) -> Result<Self, Error> {
        backend::define_histogram(name, help, label_names, buckets).map(Histogram)
    }
    /// Record one observation.
    pub fn observe(&self, value: f64) {
        self.0.observe(value)
    }
    /// As [`Counter::with_labels`].
    pub fn with_labels(&self, values: &[&str]) -> Result<Self, Error> {
        self.0.with_labels(values).map(Histogram)
    }
}

//! Metrics (abi/README.md §5.6, §7): which metric names and label names a
//! plugin may define, the caps, and a histogram's default buckets. The host
//! exports a plugin's metric `name` as `legate_plugin_<name>` with a
//! `plugin` label of its own.

/// Metrics one plugin may define.
pub const MAX_METRICS: usize = 100;

/// Series (label value sets, over all its metrics) one plugin may have.
pub const MAX_SERIES: usize = 1000;

/// The longest help text, in bytes (interned by the host for the process's
/// life: bounded).
pub const MAX_HELP: usize = 1024;

/// Most bucket bounds a plugin's histogram may have (each is a series line
/// per label set on every scrape).
pub const MAX_BUCKETS: usize = 64;

/// Upper bounds of a histogram's buckets when it is defined with none, in
/// seconds (Envoy's default buckets, 0.5 ms to 30 min); the host's own
/// histograms use them too.
pub const DEFAULT_BUCKETS: [f64; 19] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 600.0, 1800.0,
];

/// The host's own `legate_plugin_*` families (without the prefix): a
/// plugin's metric of one of these names would be the host's series for that
/// plugin (its failures, instances...), added to or overwritten by the
/// plugin. Keep in step with the names the host defines (host/src/wasm:
/// `plugin.rs`, `reload.rs`, `proxy_wasm`).
pub const HOST_PLUGIN_METRICS: [&str; 19] = [
    "body_limit_exceeded_total",
    "call_duration_seconds",
    "callout_failures_total",
    "callout_timeouts_total",
    "callouts_total",
    "calls_total",
    "failures_total",
    "grpc_stream_failures_total",
    "grpc_stream_messages_total",
    "grpc_streams_open",
    "grpc_streams_total",
    "instance_restarts_total",
    "instances",
    "memory_bytes",
    "memory_exceeded_total",
    "reload_duration_seconds",
    "reloads_total",
    "timeouts_total",
    "traps_total",
];

/// The label the host adds to every series of a plugin's metric (the
/// plugin's name): a plugin may not name a label so.
pub const PLUGIN_LABEL: &str = "plugin";

/// Whether `s` is well-formed as a metric or label name: 1 to 64 bytes of
/// `[a-z0-9_]`, starting with a lowercase letter.
pub fn name_ok(s: &str) -> bool {
    let mut b = s.bytes();
    s.len() <= 64
        && b.next().is_some_and(|c| c.is_ascii_lowercase())
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

/// Whether a plugin may name a metric `name`: not a host family
/// ([`HOST_PLUGIN_METRICS`]), and not a name a histogram's own sample lines
/// use (`_bucket`, `_sum`, `_count`). Its form is [`name_ok`]'s.
pub fn name_free(name: &str) -> bool {
    !HOST_PLUGIN_METRICS.contains(&name)
        && !["_bucket", "_sum", "_count"]
            .iter()
            .any(|s| name.ends_with(s))
}

/// Whether a plugin may name a label `label`: well-formed ([`name_ok`]) and
/// not the host's own [`PLUGIN_LABEL`]. (A label twice, or a histogram's
/// `le`, is refused too, by the caller: it depends on the other labels and
/// the kind.)
pub fn label_ok(label: &str) -> bool {
    name_ok(label) && label != PLUGIN_LABEL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "requests_total", "a1_b2", &"x".repeat(64)] {
            assert!(name_ok(good), "{good:?}");
        }
        for bad in ["", "1a", "_a", "A", "a-b", "a.b", "aé", &"x".repeat(65)] {
            assert!(!name_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn reserved_names() {
        assert!(name_free("requests_total"));
        for reserved in HOST_PLUGIN_METRICS {
            assert!(name_ok(reserved) && !name_free(reserved), "{reserved}");
        }
        for suffix in ["a_bucket", "a_sum", "a_count"] {
            assert!(!name_free(suffix), "{suffix}");
        }
        assert!(name_free("a_counts"));
    }

    #[test]
    fn labels() {
        assert!(label_ok("method"));
        assert!(label_ok("plugins"));
        assert!(!label_ok("plugin"));
        assert!(!label_ok("Method"));
        assert!(!label_ok(""));
    }

    #[test]
    fn default_buckets_increase() {
        assert!(DEFAULT_BUCKETS.len() <= MAX_BUCKETS);
        assert!(DEFAULT_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}

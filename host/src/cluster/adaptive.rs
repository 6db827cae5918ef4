//! Adaptive concurrency: a per-cluster limit on upstream attempts in flight that
//! follows the latency, Netflix's gradient algorithm as in Envoy's
//! `adaptive_concurrency` filter (simplified; see docs/config.md).
//!
//! - Every `sample_window`, the p90 of the attempt latencies sampled in the window
//!   (`sampleRTT`) gives `gradient = clamp((minRTT × (1 + buffer)) / sampleRTT, 0.5,
//!   2)`, and `limit = clamp(limit × gradient + √limit, min_concurrency,
//!   max_concurrency)`.
//! - Every `min_rtt_interval`, the limit is pinned to `min_concurrency` until
//!   `min_rtt_samples` attempts completed; their p90 is the new `minRTT`.
//! - An attempt over the limit gets 503 `overloaded` and counts
//!   `adaptive_concurrency_rq_blocked`.
//!
//! State: the in-flight count is an atomic; the samples sit behind a mutex taken once
//! per completed attempt (a push), and the recomputation runs inline in whichever
//! attempt ends a window — no timer thread.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::AdaptiveConcurrency;

/// One cluster's controller, shared by every worker and every generation.
#[derive(Debug)]
pub struct Controller {
    cfg: AdaptiveConcurrency,
    /// Attempts in flight under the controller.
    in_flight: AtomicU64,
    /// The current limit.
    limit: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Latencies of the window (or of the minRTT measurement), in microseconds.
    samples: Vec<u64>,
    window_start: Instant,
    /// The measured minimum RTT; `None` until the first measurement.
    min_rtt: Option<Duration>,
    /// Measuring minRTT (limit pinned) since then.
    measuring: bool,
    next_min_rtt: Instant,
    /// The limit to restore after a minRTT measurement.
    saved_limit: u64,
}

/// p90 of `samples` (sorted in place).
fn p90(samples: &mut [u64]) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let i = ((samples.len() as f64) * 0.9).ceil() as usize;
    samples
        .get(i.saturating_sub(1).min(samples.len() - 1))
        .copied()
}

impl Controller {
    /// A controller that starts by measuring minRTT.
    pub fn new(cfg: &AdaptiveConcurrency) -> Controller {
        let now = Instant::now();
        let min = u64::from(cfg.min_concurrency.max(1));
        Controller {
            cfg: cfg.clone(),
            in_flight: AtomicU64::new(0),
            limit: AtomicU64::new(min),
            state: Mutex::new(State {
                samples: Vec::new(),
                window_start: now,
                min_rtt: None,
                measuring: true,
                next_min_rtt: now,
                saved_limit: u64::from(cfg.initial_concurrency.max(cfg.min_concurrency).max(1)),
            }),
        }
    }

    /// `min_rtt_interval` plus a random share of it up to `jitter`.
    fn next_interval(&self) -> Duration {
        let base = self.cfg.min_rtt_interval.get();
        let share = (self.cfg.jitter.0 / 100.0).clamp(0.0, 1.0);
        base + base.mul_f64(share * rand::random::<f64>())
    }

    /// The current limit.
    pub fn limit(&self) -> u64 {
        self.limit.load(Relaxed)
    }

    /// The last measured minRTT.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.state.lock().ok().and_then(|s| s.min_rtt)
    }

    /// Takes a slot if fewer than the limit are in flight.
    pub fn try_acquire(&self) -> bool {
        let limit = self.limit.load(Relaxed);
        self.in_flight
            .fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1))
            .is_ok()
    }

    /// Gives a slot back with the attempt's latency.
    pub fn release(&self, rtt: Duration) {
        self.in_flight.fetch_sub(1, Relaxed);
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        let now = Instant::now();
        s.samples
            .push(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX));
        let min = u64::from(self.cfg.min_concurrency.max(1));
        let max = u64::from(
            self.cfg
                .max_concurrency
                .max(self.cfg.min_concurrency)
                .max(1),
        );
        if s.measuring {
            if s.samples.len() >= self.cfg.min_rtt_samples.max(1) as usize {
                let m = p90(&mut s.samples).unwrap_or(0);
                s.min_rtt = Some(Duration::from_micros(m.max(1)));
                s.samples.clear();
                s.measuring = false;
                s.next_min_rtt = now + self.next_interval();
                s.window_start = now;
                self.limit.store(s.saved_limit.clamp(min, max), Relaxed);
            }
            return;
        }
        if now.duration_since(s.window_start) < self.cfg.sample_window.get() {
            return;
        }
        if now >= s.next_min_rtt {
            s.saved_limit = self.limit.load(Relaxed);
            s.measuring = true;
            s.samples.clear();
            self.limit.store(min, Relaxed);
            return;
        }
        let (Some(sample), Some(min_rtt)) = (p90(&mut s.samples), s.min_rtt) else {
            return;
        };
        s.samples.clear();
        s.window_start = now;
        let min_rtt = min_rtt.as_micros() as f64;
        let buffered = min_rtt * (1.0 + self.cfg.buffer.0 / 100.0);
        let gradient = (buffered / (sample.max(1) as f64)).clamp(0.5, 2.0);
        // Envoy's calculateNewLimit: the headroom is the root of the new limit
        // (limit × gradient), not of the old one.
        let scaled = self.limit.load(Relaxed) as f64 * gradient;
        let next = scaled + scaled.sqrt();
        // Float to int saturates.
        self.limit.store((next as u64).clamp(min, max), Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn controller() -> Controller {
        let cfg: AdaptiveConcurrency = serde_saphyr::from_str(
            "{ sample_window: 0ms, min_rtt_interval: 1h, min_rtt_samples: 3, min_concurrency: 2, initial_concurrency: 50, max_concurrency: 100 }",
        )
        .unwrap();
        Controller::new(&cfg)
    }

    #[test]
    fn min_rtt_interval_has_jitter_within_bounds() {
        let cfg = |j: &str| -> AdaptiveConcurrency {
            serde_saphyr::from_str(&format!("{{ min_rtt_interval: 10s, jitter: {j} }}")).unwrap()
        };
        let base = Duration::from_secs(10);
        assert_eq!(Controller::new(&cfg("0%")).next_interval(), base);
        let c = Controller::new(&cfg("50%"));
        let draws: Vec<Duration> = (0..200).map(|_| c.next_interval()).collect();
        assert!(
            draws.iter().all(|d| *d >= base && *d <= base * 3 / 2),
            "{draws:?}"
        );
        // Random, not a constant offset.
        assert!(draws.iter().any(|d| *d != draws[0]));
        // The default is Envoy's 15%.
        let d: AdaptiveConcurrency = serde_saphyr::from_str("{}").unwrap();
        assert_eq!(d.jitter.0, 15.0);
    }

    #[test]
    fn measures_min_rtt_pinned_then_follows_the_gradient() {
        let c = controller();
        // Pinned to min_concurrency while measuring.
        assert_eq!(c.limit(), 2);
        assert!(c.try_acquire() && c.try_acquire());
        assert!(!c.try_acquire());
        c.release(Duration::from_millis(10));
        c.release(Duration::from_millis(10));
        assert!(c.try_acquire());
        c.release(Duration::from_millis(10));
        assert_eq!(c.min_rtt(), Some(Duration::from_millis(10)));
        assert_eq!(c.limit(), 50);
        // Latency at 4× minRTT: the gradient bottoms out at 0.5, the limit shrinks:
        // 50 × 0.5 = 25, plus √25 of headroom (Envoy's; √50 before).
        assert!(c.try_acquire());
        c.release(Duration::from_millis(40));
        assert_eq!(c.limit(), 30);
        let mut last = c.limit();
        for _ in 0..10 {
            assert!(c.try_acquire());
            c.release(Duration::from_millis(40));
            assert!(c.limit() <= last);
            last = c.limit();
        }
        assert!(last < 10, "{last}");
        assert!(last >= 2);
        // Latency back to minRTT: it grows again (gradient 1.25 plus headroom).
        for _ in 0..10 {
            assert!(c.try_acquire());
            c.release(Duration::from_millis(10));
        }
        assert!(c.limit() > last, "{}", c.limit());
    }

    #[test]
    fn p90_of_samples() {
        let mut v: Vec<u64> = (1..=10).rev().collect();
        assert_eq!(p90(&mut v), Some(9));
        assert_eq!(p90(&mut []), None);
    }
}

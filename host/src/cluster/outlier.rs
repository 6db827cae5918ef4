//! Passive outlier detection, as Envoy's: every upstream outcome seen by any worker
//! updates per-endpoint atomics; enough consecutive 5xx (or gateway failures: 502,
//! 503, 504, connect failures, resets, timeouts) eject the endpoint at once, from the
//! worker that saw the last one. An ejection lasts `base_ejection_time × times
//! ejected` (capped by `max_ejection_time`); at most `max_ejection_percent` of the
//! endpoints (but always at least one) are ejected together.
//!
//! Un-ejection and the success-rate detector run every `interval` in
//! [`Cluster::outlier_tick`], called from the health thread (one place for the
//! process), which also lowers the ejection multiplier of endpoints that stayed in.
//!
//! `outlier_detection_ejections_active` is the reservation count behind
//! `max_ejection_percent`, shared by every generation of the cluster. It counts the
//! ejected endpoints of the newest generation only: an attempt on an older one
//! cannot eject an endpoint discovery dropped, and the count is recounted from the
//! endpoints' flags when a generation is built and at every tick, so a dropped or
//! replaced ejected endpoint gives its slot back.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::health::EJECTED;
use super::{Cluster, Endpoint};

/// The default cap of one ejection (Envoy's); a longer `base_ejection_time` wins.
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// What one attempt's outcome means for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// 500, or 505 and up.
    ServerError,
    /// 502, 503 or 504.
    GatewayError,
    /// No response: connect failure, reset, timeout, protocol error.
    LocalFailure,
}

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// `consecutive_5xx`.
    Consecutive5xx = 1,
    /// `consecutive_gateway_failure`.
    ConsecutiveGatewayFailure = 2,
    /// `success_rate`.
    SuccessRate = 3,
}

impl Reason {
    fn name(code: u8) -> Option<&'static str> {
        match code {
            1 => Some("consecutive_5xx"),
            2 => Some("consecutive_gateway_failure"),
            3 => Some("success_rate"),
            _ => None,
        }
    }
}

/// One endpoint's outlier-detection state; every field is written by any worker.
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Attempts and successes in the current interval (for the success rate).
    window_total: AtomicU64,
    window_success: AtomicU64,
    /// The ejection-time multiplier (Envoy's): ejections, lowered by one per
    /// interval spent in.
    multiplier: AtomicU32,
    /// Ejections so far (for `/clusters`; the multiplier decays).
    ejections: AtomicU32,
    /// When the current ejection ends, in [`now_ms`] time.
    ejected_until_ms: AtomicU64,
    /// The last ejection's [`Reason`] (0: never ejected).
    last_reason: AtomicU8,
}

/// How many of `endpoints` are ejected.
pub(super) fn ejected(endpoints: &[Arc<Endpoint>]) -> u64 {
    endpoints
        .iter()
        .filter(|e| e.health.flags() & EJECTED != 0)
        .count() as u64
}

/// Milliseconds on a process-wide monotonic clock.
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Cluster {
    /// Feeds one attempt's outcome on endpoint `i` to outlier detection (a no-op
    /// without `outlier_detection`); may eject the endpoint.
    pub(crate) fn outlier_record(&self, i: usize, outcome: Outcome) {
        let Some(od) = &self.config.outlier_detection else {
            return;
        };
        let Some(ep) = self.endpoints.get(i) else {
            return;
        };
        let s = &ep.outlier;
        s.window_total.fetch_add(1, Relaxed);
        match outcome {
            Outcome::Success => {
                s.window_success.fetch_add(1, Relaxed);
                // Loads first: the common case writes nothing shared.
                if s.consecutive_5xx.load(Relaxed) != 0 {
                    s.consecutive_5xx.store(0, Relaxed);
                }
                if s.consecutive_gateway.load(Relaxed) != 0 {
                    s.consecutive_gateway.store(0, Relaxed);
                }
            }
            Outcome::ServerError | Outcome::GatewayError | Outcome::LocalFailure => {
                let n5xx = s.consecutive_5xx.fetch_add(1, Relaxed) + 1;
                let ngw = if outcome == Outcome::ServerError {
                    s.consecutive_gateway.store(0, Relaxed);
                    0
                } else {
                    s.consecutive_gateway.fetch_add(1, Relaxed) + 1
                };
                if od.consecutive_gateway_failure > 0 && ngw >= od.consecutive_gateway_failure {
                    self.eject(i, Reason::ConsecutiveGatewayFailure);
                } else if od.consecutive_5xx > 0 && n5xx >= od.consecutive_5xx {
                    self.eject(i, Reason::Consecutive5xx);
                }
            }
        }
    }

    /// Ejects endpoint `i` unless it already is, the newest generation no longer
    /// lists it (see the module doc), or `max_ejection_percent` is reached.
    fn eject(&self, i: usize, reason: Reason) {
        let (Some(od), Some(ep)) = (&self.config.outlier_detection, self.endpoints.get(i)) else {
            return;
        };
        // Already ejected (attempts still in flight on it fail too): nothing
        // to reserve, and no overflow to count, as Envoy checks the flag first.
        if !self.is_current(ep) || ep.health.flags() & EJECTED != 0 {
            return;
        }
        let s = &ep.outlier;
        s.consecutive_5xx.store(0, Relaxed);
        s.consecutive_gateway.store(0, Relaxed);
        // The newest generation's size: this one may be older.
        let n = self.stats.membership_total.load(Relaxed) as f64;
        let max = ((n * od.max_ejection_percent.0 / 100.0) as u64).max(1);
        let active = &self.stats.outlier_detection_ejections_active;
        if !super::breaker::reserve(active, max) {
            self.stats
                .outlier_detection_ejections_overflow
                .fetch_add(1, Relaxed);
            return;
        }
        if !self.set_flag(i, EJECTED, true) {
            // Another worker ejected it first, or discovery just dropped it.
            release(active);
            return;
        }
        s.ejections.fetch_add(1, Relaxed);
        let times = s.multiplier.fetch_add(1, Relaxed) + 1;
        let base = od.base_ejection_time.get();
        let cap = od
            .max_ejection_time
            .map_or(MAX_EJECTION_TIME, |m| m.get())
            .max(base);
        let time = base.saturating_mul(times).min(cap);
        let until = now_ms().saturating_add(u64::try_from(time.as_millis()).unwrap_or(u64::MAX));
        s.ejected_until_ms.store(until, Relaxed);
        s.last_reason.store(reason as u8, Relaxed);
        let st = &self.stats;
        st.outlier_detection_ejections_total.fetch_add(1, Relaxed);
        match reason {
            Reason::Consecutive5xx => &st.outlier_detection_ejections_consecutive_5xx,
            Reason::ConsecutiveGatewayFailure => {
                &st.outlier_detection_ejections_consecutive_gateway_failure
            }
            Reason::SuccessRate => &st.outlier_detection_ejections_success_rate,
        }
        .fetch_add(1, Relaxed);
        tracing::warn!(
            cluster = %self.name,
            endpoint = %ep.address,
            reason = Reason::name(reason as u8).unwrap_or_default(),
            "outlier detection ejected an endpoint for {time:?}"
        );
    }

    /// The periodic part of outlier detection, every `outlier_detection.interval`:
    /// un-ejects endpoints whose time is up, lowers the multiplier of those that
    /// stayed in, and runs the success-rate detector over the interval's outcomes.
    pub fn outlier_tick(&self) {
        let Some(od) = &self.config.outlier_detection else {
            return;
        };
        let now = now_ms();
        let mut rates = Vec::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            let s = &ep.outlier;
            let total = s.window_total.swap(0, Relaxed);
            let success = s.window_success.swap(0, Relaxed).min(total);
            if ep.health.flags() & EJECTED != 0 {
                if now >= s.ejected_until_ms.load(Relaxed) {
                    self.uneject(i);
                }
                continue;
            }
            let _ = s
                .multiplier
                .fetch_update(Relaxed, Relaxed, |t| t.checked_sub(1));
            if let Some(sr) = &od.success_rate {
                if total >= u64::from(sr.request_volume) {
                    rates.push((i, success as f64 / total as f64));
                }
            }
        }
        // Recount, so a slot lost to a race with discovery (an ejection on an
        // endpoint just dropped) comes back within one interval. Only from the
        // newest generation: an older one's list is not what the gauge counts.
        let newest = self.stats.membership_total.load(Relaxed) == self.endpoints.len() as u64
            && self.endpoints.iter().all(|e| self.is_current(e));
        if newest {
            self.stats
                .outlier_detection_ejections_active
                .store(ejected(&self.endpoints), Relaxed);
            // `membership_healthy` too: an ejection (a worker's `set_flag`)
            // between a new generation's count and its store leaves the gauge
            // one high, which turns health off in `pick` (`healthy < n` never
            // holds) until the next generation.
            let available = self
                .endpoints
                .iter()
                .filter(|e| e.health.is_available())
                .count();
            self.stats
                .membership_healthy
                .store(available as u64, Relaxed);
        }
        let Some(sr) = &od.success_rate else { return };
        if rates.len() < sr.minimum_hosts as usize || rates.is_empty() {
            return;
        }
        let n = rates.len() as f64;
        let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
        let var = rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
        let threshold = mean - sr.stdev_factor * var.sqrt();
        for (i, rate) in rates {
            if rate < threshold {
                self.eject(i, Reason::SuccessRate);
            }
        }
    }

    /// Ends endpoint `i`'s ejection, if it is ejected. Also called when active health
    /// checks find an endpoint healthy again (Envoy's default
    /// `successful_active_health_check_uneject_host`).
    pub(crate) fn uneject(&self, i: usize) {
        if self.set_flag(i, EJECTED, false) {
            release(&self.stats.outlier_detection_ejections_active);
            if let Some(ep) = self.endpoints.get(i) {
                tracing::info!(cluster = %self.name, endpoint = %ep.address, "outlier detection returned an endpoint");
            }
        }
    }

    /// How often [`Cluster::outlier_tick`] runs; `None` without outlier detection.
    pub fn outlier_interval(&self) -> Option<Duration> {
        self.config
            .outlier_detection
            .as_ref()
            .map(|od| od.interval.get())
    }

    /// Endpoint `ep`'s outlier state for `/clusters`.
    pub(super) fn outlier_json(&self, s: &OutlierState, ejected: bool) -> Value {
        let left = s.ejected_until_ms.load(Relaxed).saturating_sub(now_ms());
        serde_json::json!({
            "ejected": ejected,
            "ejection_ends_in_ms": if ejected { Value::from(left) } else { Value::Null },
            "times_ejected": s.ejections.load(Relaxed),
            "ejection_multiplier": s.multiplier.load(Relaxed),
            "last_ejection_reason": Reason::name(s.last_reason.load(Relaxed)),
            "consecutive_5xx": s.consecutive_5xx.load(Relaxed),
            "consecutive_gateway_failure": s.consecutive_gateway.load(Relaxed),
        })
    }
}

/// Gives back one ejection slot; never below zero (a recount may have run between
/// an ejection and its end), which would refuse every later ejection.
fn release(active: &std::sync::atomic::AtomicU64) {
    let _ = active.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::cluster::tests::weighted;

    const OD: &str = "outlier_detection: { consecutive_5xx: 3, consecutive_gateway_failure: 2, \
                      base_ejection_time: 1h, max_ejection_time: 3h, max_ejection_percent: 50% }\n";

    fn available(c: &Cluster) -> Vec<bool> {
        c.endpoints
            .iter()
            .map(|e| e.health.is_available())
            .collect()
    }

    #[test]
    fn consecutive_5xx_ejects_and_a_success_resets() {
        let c = weighted("round_robin", &[1, 1, 1, 1], OD);
        for _ in 0..2 {
            c.outlier_record(0, Outcome::ServerError);
        }
        c.outlier_record(0, Outcome::Success);
        c.outlier_record(0, Outcome::ServerError);
        c.outlier_record(0, Outcome::ServerError);
        assert_eq!(available(&c), [true; 4]);
        c.outlier_record(0, Outcome::ServerError);
        assert_eq!(available(&c), [false, true, true, true]);
        let st = &c.stats;
        assert_eq!(
            st.outlier_detection_ejections_consecutive_5xx.load(Relaxed),
            1
        );
        assert_eq!(st.outlier_detection_ejections_active.load(Relaxed), 1);
        assert_eq!(st.membership_healthy.load(Relaxed), 3);
    }

    #[test]
    fn gateway_failures_eject_sooner_and_a_500_breaks_their_run() {
        let c = weighted("round_robin", &[1, 1, 1, 1], OD);
        c.outlier_record(1, Outcome::LocalFailure);
        c.outlier_record(1, Outcome::ServerError);
        assert_eq!(available(&c), [true; 4], "the 500 broke the gateway run");
        c.outlier_record(1, Outcome::Success);
        c.outlier_record(1, Outcome::GatewayError);
        assert_eq!(available(&c), [true; 4]);
        c.outlier_record(1, Outcome::GatewayError);
        assert_eq!(available(&c), [true, false, true, true]);
        assert_eq!(
            c.stats
                .outlier_detection_ejections_consecutive_gateway_failure
                .load(Relaxed),
            1
        );
    }

    #[test]
    fn gateway_failures_eject_only_when_asked() {
        // As Envoy (enforcing_consecutive_gateway_failure 0% by default): a
        // raised consecutive_5xx is not undercut by the gateway detector.
        let c = weighted(
            "round_robin",
            &[1, 1],
            "outlier_detection: { consecutive_5xx: 8, base_ejection_time: 1h }\n",
        );
        for _ in 0..7 {
            c.outlier_record(0, Outcome::GatewayError);
        }
        assert_eq!(available(&c), [true, true]);
        c.outlier_record(0, Outcome::LocalFailure);
        assert_eq!(available(&c), [false, true]);
        assert_eq!(
            c.stats
                .outlier_detection_ejections_consecutive_5xx
                .load(Relaxed),
            1
        );
    }

    #[test]
    fn the_tick_recounts_membership_healthy() {
        let c = weighted("round_robin", &[1, 1, 1, 1], OD);
        for _ in 0..2 {
            c.outlier_record(0, Outcome::GatewayError);
        }
        assert_eq!(c.stats.membership_healthy.load(Relaxed), 3);
        // A new generation's count that raced the ejection.
        c.stats.membership_healthy.store(4, Relaxed);
        c.outlier_tick();
        assert_eq!(c.stats.membership_healthy.load(Relaxed), 3);
    }

    #[test]
    fn max_ejection_percent_but_at_least_one() {
        let c = weighted("round_robin", &[1, 1, 1, 1], OD);
        for i in 0..3 {
            for _ in 0..2 {
                c.outlier_record(i, Outcome::LocalFailure);
            }
        }
        assert_eq!(available(&c), [false, false, true, true], "50% of 4");
        assert_eq!(
            c.stats.outlier_detection_ejections_overflow.load(Relaxed),
            1
        );

        let few = weighted("round_robin", &[1, 1, 1], &OD.replace("50%", "10%"));
        for i in 0..2 {
            for _ in 0..2 {
                few.outlier_record(i, Outcome::LocalFailure);
            }
        }
        assert_eq!(
            available(&few),
            [false, true, true],
            "10% of 3 still allows one"
        );
    }

    /// Failures on an endpoint already ejected (attempts that were in flight)
    /// are no ejection refused by `max_ejection_percent`: the overflow counted
    /// them when the cap was reached.
    #[test]
    fn failures_on_an_ejected_endpoint_are_no_overflow() {
        let c = weighted("round_robin", &[1, 1], OD);
        for _ in 0..2 {
            c.outlier_record(0, Outcome::LocalFailure);
        }
        assert_eq!(available(&c), [false, true]);
        for _ in 0..4 {
            c.outlier_record(0, Outcome::LocalFailure);
        }
        let st = &c.stats;
        assert_eq!(st.outlier_detection_ejections_overflow.load(Relaxed), 0);
        assert_eq!(st.outlier_detection_ejections_active.load(Relaxed), 1);
        assert_eq!(st.outlier_detection_ejections_total.load(Relaxed), 1);
        // The cap still refuses the other endpoint (50% of 2 is one).
        for _ in 0..2 {
            c.outlier_record(1, Outcome::LocalFailure);
        }
        assert_eq!(available(&c), [false, true]);
        assert_eq!(st.outlier_detection_ejections_overflow.load(Relaxed), 1);
    }

    #[test]
    fn only_the_newest_generation_holds_ejections() {
        let c = weighted("round_robin", &[1, 1, 1, 1], OD);
        let (st, eps) = (&c.stats, &c.endpoints);
        let active = || st.outlier_detection_ejections_active.load(Relaxed);
        for _ in 0..2 {
            c.outlier_record(0, Outcome::LocalFailure);
        }
        assert_eq!(active(), 1);
        // Discovery drops the ejected endpoint: its slot is free.
        let next = c
            .with_endpoints(vec![eps[1].clone(), eps[2].clone(), eps[3].clone()])
            .unwrap();
        assert_eq!((active(), st.membership_healthy.load(Relaxed)), (0, 3));
        // An attempt still on the first generation ejects a kept endpoint...
        for _ in 0..2 {
            c.outlier_record(3, Outcome::LocalFailure);
        }
        assert_eq!((active(), st.membership_healthy.load(Relaxed)), (1, 2));
        // ... which the next generation drops in turn.
        let last = next
            .with_endpoints(vec![eps[1].clone(), eps[2].clone()])
            .unwrap();
        assert_eq!((active(), st.membership_healthy.load(Relaxed)), (0, 2));
        // Old attempts on dropped endpoints eject nothing and move no gauge.
        let total = st.outlier_detection_ejections_total.load(Relaxed);
        for _ in 0..2 {
            c.outlier_record(0, Outcome::LocalFailure);
            next.outlier_record(2, Outcome::LocalFailure);
        }
        assert_eq!((active(), st.membership_healthy.load(Relaxed)), (0, 2));
        assert_eq!(st.outlier_detection_ejections_total.load(Relaxed), total);
        c.uneject(3);
        assert_eq!(active(), 0);
        // The newest generation still ejects.
        for _ in 0..2 {
            last.outlier_record(0, Outcome::LocalFailure);
        }
        assert_eq!((active(), st.membership_healthy.load(Relaxed)), (1, 1));
    }

    #[test]
    fn ejection_time_grows_and_ends() {
        let c = weighted(
            "round_robin",
            &[1, 1],
            "outlier_detection: { consecutive_gateway_failure: 1, base_ejection_time: 1h, max_ejection_time: 90m }\n",
        );
        let s = &c.endpoints[0].outlier;
        c.outlier_record(0, Outcome::LocalFailure);
        let first = s.ejected_until_ms.load(Relaxed) - now_ms();
        assert!((3_500_000..=3_600_000).contains(&first), "{first}");
        c.outlier_tick();
        assert_eq!(available(&c), [false, true], "time is not up");
        // End the ejection now.
        s.ejected_until_ms.store(now_ms(), Relaxed);
        c.outlier_tick();
        assert_eq!(available(&c), [true, true]);
        assert_eq!(c.stats.outlier_detection_ejections_active.load(Relaxed), 0);
        c.outlier_record(0, Outcome::LocalFailure);
        let second = s.ejected_until_ms.load(Relaxed) - now_ms();
        assert!(
            (5_300_000..=5_400_000).contains(&second),
            "capped at 90m: {second}"
        );
        assert_eq!(s.multiplier.load(Relaxed), 2);
        assert_eq!(s.ejections.load(Relaxed), 2);
        // Back in, the multiplier decays by one per interval; `/clusters`'
        // `times_ejected` stays the count (it showed the multiplier: 0 after
        // two ejections).
        s.ejected_until_ms.store(now_ms(), Relaxed);
        for _ in 0..4 {
            c.outlier_tick();
        }
        assert_eq!(s.multiplier.load(Relaxed), 0);
        let shown = c.outlier_json(s, false);
        assert_eq!(shown["times_ejected"], 2, "{shown}");
        assert_eq!(shown["ejection_multiplier"], 0, "{shown}");
    }

    #[test]
    fn success_rate_ejects_the_outlier() {
        let c = weighted(
            "round_robin",
            &[1, 1, 1, 1, 1, 1],
            "outlier_detection: { consecutive_5xx: 0, consecutive_gateway_failure: 0, max_ejection_percent: 50%, \
             success_rate: { minimum_hosts: 5, request_volume: 10, stdev_factor: 1.0 } }\n",
        );
        for i in 0..6 {
            for k in 0..20 {
                let fail = if i == 4 { k % 2 == 0 } else { k == 0 };
                c.outlier_record(
                    i,
                    if fail {
                        Outcome::ServerError
                    } else {
                        Outcome::Success
                    },
                );
            }
        }
        assert_eq!(available(&c), [true; 6], "consecutive detectors are off");
        c.outlier_tick();
        assert_eq!(available(&c), [true, true, true, true, false, true]);
        assert_eq!(
            c.stats
                .outlier_detection_ejections_success_rate
                .load(Relaxed),
            1
        );
        // Too few requests in the next interval: no judgement.
        c.outlier_record(0, Outcome::ServerError);
        c.outlier_tick();
        assert_eq!(c.stats.outlier_detection_ejections_total.load(Relaxed), 1);
    }
}

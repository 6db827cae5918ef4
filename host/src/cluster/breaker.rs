//! Circuit breakers: per-cluster limits on connections, attempts waiting for a
//! connection, attempts in flight and retries in flight (Envoy's defaults: 1024,
//! 1024, 1024, 3), optionally a retry budget instead of the fixed retry limit.
//!
//! Every limit is an atomic count shared by all workers, reserved with a
//! compare-and-swap loop before the thing it counts starts, so two workers cannot
//! both take the last slot. A reservation is a [`Slot`] (or the request guard
//! itself for `max_requests`) and is given back when dropped.
//!
//! An attempt that would exceed a limit fails at once with 503 and
//! `x-legate-overloaded: true`, and a retry that would exceed one is not made (the
//! previous answer goes back to the client). "Pending" attempts are those waiting
//! for a new connection to be established, or (HTTP/1.1, over `max_connections`,
//! [`Cluster::try_connect_permit`]) for one of their worker's connections to come
//! free: the pool waits, this module only counts. One exception, Envoy's: a
//! worker's first connection to an endpoint is opened over `max_connections`
//! ([`Cluster::connect_permit_for`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::{ActiveConnection, Cluster};
use crate::error::{Kind, ProxyError};

/// Reservation counts that are not themselves stats.
#[derive(Debug, Default)]
pub(super) struct Breakers {
    /// Upstream connections open or being opened.
    connections: AtomicU64,
    /// Retries in flight.
    retries: AtomicU64,
    /// The id of the newest generation of the cluster (see [`super::health`]).
    pub(super) generation: AtomicU64,
    /// The adaptive-concurrency controller, made on first use (the struct is
    /// `Default` so that every cluster generation can share one).
    pub(super) adaptive: std::sync::OnceLock<super::adaptive::Controller>,
}

/// Adds one to `counter` if it is below `max`; whether it did.
pub(super) fn reserve(counter: &AtomicU64, max: u64) -> bool {
    counter
        .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
        .is_ok()
}

/// One reserved unit of a cluster's counter, given back on drop.
pub struct Slot {
    cluster: Arc<Cluster>,
    counter: fn(&Cluster) -> &AtomicU64,
}

impl Slot {
    fn take(cluster: &Arc<Cluster>, counter: fn(&Cluster) -> &AtomicU64, max: u64) -> Option<Slot> {
        reserve(counter(cluster), max).then(|| Slot {
            cluster: Arc::clone(cluster),
            counter,
        })
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("cluster", &self.cluster.name)
            .finish_non_exhaustive()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        (self.counter)(&self.cluster).fetch_sub(1, Relaxed);
    }
}

/// Permission to open one upstream connection: a `max_connections` slot (kept by the
/// connection) and a `max_pending_requests` slot (given back once it is open).
#[derive(Debug)]
pub struct ConnectPermit {
    connection: Slot,
    _pending: Slot,
}

impl ConnectPermit {
    /// The connection is open: count it (until the returned guard drops) on the
    /// cluster and endpoint `endpoint`; the attempt is no longer pending.
    pub fn established(self, endpoint: Option<usize>) -> ActiveConnection {
        let mut guard = self.connection.cluster.start_connection(endpoint);
        guard._slot = Some(self.connection);
        guard
    }
}

/// A retry in flight, counted against `max_retries` or the retry budget until dropped.
pub type RetrySlot = Slot;

impl Cluster {
    /// Reserves a new connection under `max_connections` and `max_pending_requests`;
    /// over either, a 503 `overloaded` error and `upstream_cx_overflow` or
    /// `upstream_rq_pending_overflow` counts it.
    pub fn connect_permit(self: &Arc<Self>) -> Result<ConnectPermit, ProxyError> {
        self.connect_permit_for(false)
    }

    /// As [`Cluster::connect_permit`], but `first` (the worker asking has no
    /// connection to the endpoint, open or opening) opens one over
    /// `max_connections` too, still counted in `upstream_cx_overflow`, as
    /// Envoy's per-worker pool does: the limit is shared by every worker and
    /// endpoint, so without this, connections kept idle by one worker (or to
    /// another endpoint) would refuse every request of the others with 503,
    /// however few were in flight. Such a connection still holds a slot (the
    /// count goes over the limit) until it closes.
    pub fn connect_permit_for(self: &Arc<Self>, first: bool) -> Result<ConnectPermit, ProxyError> {
        let cb = &self.config.circuit_breakers;
        self.try_connect_permit(first, true)?
            .ok_or_else(|| overloaded(self, "max_connections", cb.max_connections))
    }

    /// As [`Cluster::connect_permit_for`], but over `max_connections` `Ok(None)`,
    /// counted in `upstream_cx_overflow` if `count` (an attempt that waits for a
    /// connection and asks again counts once); over `max_pending_requests` the
    /// error.
    pub fn try_connect_permit(
        self: &Arc<Self>,
        first: bool,
        count: bool,
    ) -> Result<Option<ConnectPermit>, ProxyError> {
        let cb = &self.config.circuit_breakers;
        let connections: fn(&Cluster) -> &AtomicU64 = |c| &c.breakers.connections;
        let connection = match Slot::take(self, connections, u64::from(cb.max_connections)) {
            Some(slot) => slot,
            None => {
                if count {
                    self.stats.upstream_cx_overflow.fetch_add(1, Relaxed);
                }
                match first
                    .then(|| Slot::take(self, connections, u64::MAX))
                    .flatten()
                {
                    Some(slot) => slot,
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(ConnectPermit {
            connection,
            _pending: self.pending_permit()?,
        }))
    }

    /// The 503 `overloaded` error of `max_connections` (counted already).
    pub fn max_connections_reached(&self) -> ProxyError {
        overloaded(
            self,
            "max_connections",
            self.config.circuit_breakers.max_connections,
        )
    }

    /// Reserves a `max_pending_requests` slot for an attempt waiting for a
    /// connection (its own, or an HTTP/2 one another attempt is opening); over the
    /// limit, a 503 `overloaded` error and `upstream_rq_pending_overflow` counts it.
    pub fn pending_permit(self: &Arc<Self>) -> Result<Slot, ProxyError> {
        let cb = &self.config.circuit_breakers;
        Slot::take(
            self,
            |c| &c.stats.upstream_rq_pending_active,
            u64::from(cb.max_pending_requests),
        )
        .ok_or_else(|| {
            self.stats
                .upstream_rq_pending_overflow
                .fetch_add(1, Relaxed);
            overloaded(self, "max_pending_requests", cb.max_pending_requests)
        })
    }

    /// Whether a retry may be made now: replaces `slot` (the request's previous retry,
    /// if any, is over) with a new reservation under `max_retries` or, when
    /// configured, the retry budget. When refused, `upstream_rq_retry_overflow`
    /// counts it and `slot` stays empty.
    pub fn retry_permit(self: &Arc<Self>, slot: &mut Option<RetrySlot>) -> bool {
        *slot = None;
        *slot = Slot::take(self, |c| &c.breakers.retries, self.retries_max());
        if slot.is_none() {
            self.stats.upstream_rq_retry_overflow.fetch_add(1, Relaxed);
        }
        slot.is_some()
    }
}

/// The names of [`Cluster::breaker_gauges`], with their help.
pub const BREAKER_GAUGES: [(&str, &str); 8] = [
    (
        "cx_open",
        "1 while max_connections is reached (Envoy's circuit_breakers.default.cx_open), else 0.",
    ),
    (
        "rq_pending_open",
        "1 while max_pending_requests is reached, else 0.",
    ),
    ("rq_open", "1 while max_requests is reached, else 0."),
    (
        "rq_retry_open",
        "1 while max_retries (or the retry budget) is reached, else 0.",
    ),
    ("remaining_cx", "Connections max_connections still admits."),
    (
        "remaining_pending",
        "Attempts waiting for a connection max_pending_requests still admits.",
    ),
    (
        "remaining_rq",
        "Attempts in flight max_requests still admits.",
    ),
    (
        "remaining_retries",
        "Retries in flight max_retries (or the retry budget) still admits.",
    ),
];

impl Cluster {
    /// The retries in flight the cluster admits now: `max_retries`, or the
    /// retry budget's share of the attempts in flight.
    fn retries_max(&self) -> u64 {
        let cb = &self.config.circuit_breakers;
        match &cb.retry_budget {
            // Envoy: a share of the requests in flight, but never below the floor.
            Some(b) => {
                let active = self.stats.upstream_rq_active.load(Relaxed) as f64;
                ((active * b.percent.0 / 100.0) as u64).max(u64::from(b.min_concurrency))
            }
            None => u64::from(cb.max_retries),
        }
    }

    /// The circuit breakers' state now, as Envoy's
    /// `circuit_breakers.default.*` gauges, in [`BREAKER_GAUGES`]' order: for
    /// each limit whether it is reached and how many more it admits. Read at
    /// a scrape from the counts the breakers reserve against (a worker's first
    /// connection to an endpoint may take the connections past the limit).
    pub fn breaker_gauges(&self) -> [u64; 8] {
        let cb = &self.config.circuit_breakers;
        let limits = [
            (
                self.breakers.connections.load(Relaxed),
                u64::from(cb.max_connections),
            ),
            (
                self.stats.upstream_rq_pending_active.load(Relaxed),
                u64::from(cb.max_pending_requests),
            ),
            (
                self.stats.upstream_rq_active.load(Relaxed),
                u64::from(cb.max_requests),
            ),
            (self.breakers.retries.load(Relaxed), self.retries_max()),
        ];
        let mut out = [0; 8];
        for (i, (n, max)) in limits.into_iter().enumerate() {
            out[i] = u64::from(n >= max);
            out[i + 4] = max.saturating_sub(n);
        }
        out
    }
}

fn overloaded(cluster: &Cluster, limit: &str, max: u32) -> ProxyError {
    ProxyError::new(
        Kind::Overloaded,
        format!(
            "cluster `{}`: circuit_breakers.{limit} ({max}) reached",
            cluster.name
        ),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::cluster::tests::weighted;

    #[test]
    fn the_gauges_say_which_breaker_is_open_and_what_is_left() {
        let c = weighted(
            "round_robin",
            &[1],
            "circuit_breakers: { max_requests: 2, max_retries: 1 }\n",
        );
        // cx_open, rq_pending_open, rq_open, rq_retry_open, then remaining.
        assert_eq!(c.breaker_gauges(), [0, 0, 0, 0, 1024, 1024, 2, 1]);
        let _a = c.try_start_request(Some(0)).unwrap();
        let _b = c.try_start_request(Some(0)).unwrap();
        let mut retry = None;
        assert!(c.retry_permit(&mut retry));
        assert_eq!(c.breaker_gauges(), [0, 0, 1, 1, 1024, 1024, 0, 0]);
        drop(retry);
        assert_eq!(c.breaker_gauges()[3], 0);
    }

    #[test]
    fn max_requests_refuses_and_counts() {
        let c = weighted(
            "round_robin",
            &[1],
            "circuit_breakers: { max_requests: 2 }\n",
        );
        let a = c.try_start_request(Some(0)).unwrap();
        let _b = c.try_start_request(Some(0)).unwrap();
        let err = c.try_start_request(Some(0)).unwrap_err();
        assert_eq!(err.kind, Kind::Overloaded);
        assert!(err.detail.contains("max_requests (2)"), "{}", err.detail);
        assert_eq!(c.stats.upstream_rq_pending_overflow.load(Relaxed), 1);
        assert_eq!(c.stats.upstream_rq_total.load(Relaxed), 2);
        drop(a);
        assert!(c.try_start_request(Some(0)).is_ok());
        assert_eq!(c.stats.upstream_rq_active.load(Relaxed), 1);
    }

    #[test]
    fn connections_and_pending() {
        let c = weighted(
            "round_robin",
            &[1],
            "circuit_breakers: { max_connections: 2, max_pending_requests: 1 }\n",
        );
        let p1 = c.connect_permit().unwrap();
        // One attempt is already waiting for its connection.
        let err = c.connect_permit().unwrap_err();
        assert!(
            err.detail.contains("max_pending_requests"),
            "{}",
            err.detail
        );
        assert_eq!(c.stats.upstream_rq_pending_overflow.load(Relaxed), 1);
        let cx1 = p1.established(Some(0));
        assert_eq!(c.stats.upstream_rq_pending_active.load(Relaxed), 0);
        let cx2 = c.connect_permit().unwrap().established(Some(0));
        let err = c.connect_permit().unwrap_err();
        assert!(err.detail.contains("max_connections (2)"), "{}", err.detail);
        assert_eq!(c.stats.upstream_cx_overflow.load(Relaxed), 1);
        drop(cx1);
        let failed = c.connect_permit().unwrap();
        drop(failed); // a connect that failed gives both slots back
        assert!(c.connect_permit().is_ok());
        drop(cx2);
        assert_eq!(c.breakers.connections.load(Relaxed), 0);
    }

    #[test]
    fn retries_limit_and_budget() {
        let c = weighted(
            "round_robin",
            &[1],
            "circuit_breakers: { max_retries: 1 }\n",
        );
        let (mut a, mut b) = (None, None);
        assert!(c.retry_permit(&mut a));
        assert!(!c.retry_permit(&mut b));
        assert_eq!(c.stats.upstream_rq_retry_overflow.load(Relaxed), 1);
        // The same request retrying again gives its previous slot back first.
        assert!(c.retry_permit(&mut a));
        drop(a);
        assert!(c.retry_permit(&mut b));

        let c = weighted(
            "round_robin",
            &[1],
            "circuit_breakers: { retry_budget: { percent: 50%, min_concurrency: 1 } }\n",
        );
        let _active: Vec<_> = (0..4).map(|_| c.start_request(Some(0))).collect();
        let mut slots: Vec<Option<RetrySlot>> = (0..3).map(|_| None).collect();
        let granted = slots
            .iter_mut()
            .map(|s| c.retry_permit(s))
            .filter(|&ok| ok)
            .count();
        assert_eq!(granted, 2, "50% of 4 requests in flight");
    }
}

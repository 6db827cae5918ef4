//! Load balancing: which endpoint of a cluster serves the next upstream attempt.
//!
//! [`Shared`] is what a policy precomputes once per cluster — the weights' prefix
//! sums, the `ring_hash` ring — and is immutable, so all workers read it freely.
//! [`Balancer`] is one worker's state: its random generator and, for `round_robin`,
//! its position in the rotation. Every policy honours the retry exclusion list the
//! same way: endpoints already tried are skipped while another one remains.

use std::cell::{Cell, RefCell};
use std::fmt::{self, Write as _};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{hash, Cluster, Endpoint};
use crate::config::LbPolicy;

/// Ketama's 160 points for an endpoint of the smallest weight.
const POINTS_PER_MIN_WEIGHT: f64 = 160.0;
/// Fewer points than this give a visibly uneven split (Envoy's minimum ring size).
const MIN_RING_POINTS: f64 = 1024.0;
/// Bounds the ring's memory (16 bytes a point) when weights differ wildly.
const MAX_RING_POINTS: f64 = (1u64 << 20) as f64;
/// Bounds the work of giving a new worker a random smooth-round-robin phase.
const MAX_PHASE_WORK: u64 = 1 << 16;

/// Per-cluster, immutable load-balancing data.
pub(super) struct Shared {
    policy: LbPolicy,
    /// Endpoint weights, in endpoint order.
    weights: Vec<u64>,
    /// Inclusive prefix sums of `weights`: endpoint `i` owns `[cumulative[i] -
    /// weights[i], cumulative[i])` of the range a weighted random draw picks from.
    cumulative: Vec<u64>,
    /// `weights` divided by their gcd: the same rotation with the shortest period.
    rr_weights: Vec<i64>,
    /// The consistent-hash ring (empty unless the policy is `ring_hash`).
    ring: Ring,
}

impl Shared {
    pub(super) fn new(policy: LbPolicy, endpoints: &[Arc<Endpoint>]) -> Shared {
        let weights: Vec<u64> = endpoints
            .iter()
            .map(|e| u64::from(e.weight.max(1)))
            .collect();
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, w| {
                *sum += w;
                Some(*sum)
            })
            .collect();
        let g = weights.iter().copied().fold(0, gcd).max(1);
        let rr_weights = weights.iter().map(|w| (w / g) as i64).collect();
        let ring = match policy {
            LbPolicy::RingHash => Ring::build(endpoints),
            _ => Ring::default(),
        };
        Shared {
            policy,
            weights,
            cumulative,
            rr_weights,
            ring,
        }
    }

    /// A weighted random endpoint that is not in `excluded` (sorted, distinct, in
    /// range, and leaving at least one endpoint).
    ///
    /// Draws from the total weight of the allowed endpoints and maps the draw back
    /// onto the full range by stepping over each excluded endpoint's interval, so the
    /// cost stays O(|excluded| + log n).
    fn weighted_pick(&self, rng: &mut SmallRng, excluded: &[usize]) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        let excluded_weight: u64 = excluded.iter().filter_map(|&e| self.weights.get(e)).sum();
        let allowed = total.saturating_sub(excluded_weight);
        if allowed == 0 {
            return 0;
        }
        let mut r = rng.random_range(0..allowed);
        for &e in excluded {
            let (Some(&end), Some(&w)) = (self.cumulative.get(e), self.weights.get(e)) else {
                break;
            };
            if r < end - w {
                break;
            }
            r += w;
        }
        self.cumulative
            .partition_point(|&c| c <= r)
            .min(self.weights.len().saturating_sub(1))
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("policy", &self.policy)
            .field("weights", &self.weights)
            .field("ring_points", &self.ring.hashes.len())
            .finish()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A Ketama-style consistent-hash ring: each endpoint owns points proportional to
/// its weight; a key belongs to the endpoint of the first point at or after it.
/// Removing an endpoint removes only its points, so only its keys move — unless
/// the ring is scaled (below `MIN_RING_POINTS`, as Envoy's) or the lightest
/// weight changes: then every endpoint's point count changes too, and some keys
/// move between endpoints that stay.
#[derive(Default)]
struct Ring {
    /// Point hashes, ascending; searched apart from `owners` to keep it dense.
    hashes: Vec<u64>,
    /// The endpoint index of each point.
    owners: Vec<u32>,
}

impl Ring {
    fn build(endpoints: &[Arc<Endpoint>]) -> Ring {
        let Some(min_weight) = endpoints.iter().map(|e| e.weight.max(1)).min() else {
            return Ring::default();
        };
        let per_weight = POINTS_PER_MIN_WEIGHT / f64::from(min_weight);
        let natural: f64 = endpoints
            .iter()
            .map(|e| f64::from(e.weight.max(1)) * per_weight)
            .sum();
        let scale = if natural < MIN_RING_POINTS {
            MIN_RING_POINTS / natural
        } else if natural > MAX_RING_POINTS {
            MAX_RING_POINTS / natural
        } else {
            1.0
        };

        // Endpoints that share a configured address (the IPs one `strict` DNS
        // name resolves to) are told apart by their IP too: with the name
        // alone their points would hash alike, and the first would own all.
        let mut named: rustc_hash::FxHashMap<&str, usize> = rustc_hash::FxHashMap::default();
        for ep in endpoints {
            *named.entry(&*ep.authority).or_default() += 1;
        }
        let mut points: Vec<(u64, u32)> = Vec::new();
        let mut name = String::new();
        for (index, ep) in endpoints.iter().enumerate() {
            let Ok(owner) = u32::try_from(index) else {
                break;
            };
            // Float to int saturates; the product is bounded by MAX_RING_POINTS.
            let count = ((f64::from(ep.weight.max(1)) * per_weight * scale).round() as u64).max(1);
            for i in 0..count {
                // The configured address, not the resolved IP, names the points:
                // the ring stays the same when a host name resolves differently.
                name.clear();
                // Writing to a String cannot fail.
                let _ = if named.get(&*ep.authority).is_some_and(|&n| n > 1) {
                    write!(name, "{}/{}_{i}", ep.authority, ep.address)
                } else {
                    write!(name, "{}_{i}", ep.authority)
                };
                points.push((hash::xxh64(name.as_bytes()), owner));
            }
        }
        // Ties (same hash) are ordered by endpoint so every process builds the
        // same ring.
        points.sort_unstable();
        let (hashes, owners) = points.into_iter().unzip();
        Ring { hashes, owners }
    }

    /// The endpoint owning `key`, walking on past points of excluded endpoints —
    /// which is where the key would go were those endpoints removed.
    fn lookup(&self, key: u64, excluded: &[usize]) -> Option<usize> {
        let len = self.hashes.len();
        let start = self.hashes.partition_point(|&h| h < key);
        (0..len)
            .filter_map(|step| self.owners.get((start + step) % len))
            .map(|&owner| owner as usize)
            .find(|owner| excluded.binary_search(owner).is_err())
    }
}

/// One worker's balancers, by cluster (generation): a reload, a discovery
/// update or a weight change makes a new cluster, which gets a new balancer.
#[derive(Default)]
pub struct Balancers {
    // Keyed by the cluster's address, which cannot be reused while the
    // balancer here holds the cluster. Fx: looked up once per request, keys
    // made by Legate.
    by_cluster: RefCell<rustc_hash::FxHashMap<usize, Rc<Balancer>>>,
}

impl Balancers {
    /// The balancer for `cluster`, made on first use.
    pub fn get(&self, cluster: &Arc<Cluster>) -> Rc<Balancer> {
        let key = Arc::as_ptr(cluster) as usize;
        let mut map = self.by_cluster.borrow_mut();
        if let Some(b) = map.get(&key) {
            return b.clone();
        }
        // Balancers of clusters nothing else holds any more (no config, no
        // request: the balancer's own reference is the last) go; a request
        // still holding one keeps it alive without the map. Without this,
        // every generation a worker served stayed for the process's life
        // (its endpoints, its hash ring): a new one per DNS change.
        map.retain(|_, b| Arc::strong_count(b.cluster()) > 1);
        let b = Rc::new(cluster.balancer());
        map.insert(key, b.clone());
        b
    }

    /// How many balancers are kept.
    pub fn len(&self) -> usize {
        self.by_cluster.borrow().len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One worker's load balancer for one cluster. Not `Sync`: each worker owns its
/// own, so picking takes no lock and touches no shared cache line except, for
/// `least_request`, the endpoints' `rq_active` counters.
pub struct Balancer {
    cluster: Arc<Cluster>,
    rng: RefCell<SmallRng>,
    rotation: Rotation,
}

/// `round_robin` state.
enum Rotation {
    /// Not `round_robin`.
    None,
    /// Equal weights: plain rotation, `next` index to pick, for picks that
    /// exclude nothing. A pick that excludes some endpoints takes the one
    /// picked least recently (`last`, in `clock` ticks; ties in rotation order
    /// from `start`), so that each side of a changing exclusion takes turns
    /// within itself. The cursor alone (the first endpoint at or after it not
    /// excluded) favoured the endpoint after an excluded run whenever the
    /// excluded set changed from pick to pick: zone-aware picks alternating
    /// between the local zone and the others gave the first endpoint of the
    /// other zone twice the second's share.
    Cursor {
        next: Cell<usize>,
        start: usize,
        last: RefCell<Vec<u64>>,
        clock: Cell<u64>,
    },
    /// Unequal weights: nginx's smooth weighted round robin, the current weights.
    Smooth(RefCell<Vec<i64>>),
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("cluster", &self.cluster.name)
            .finish_non_exhaustive()
    }
}

impl Balancer {
    pub(super) fn new(cluster: Arc<Cluster>) -> Balancer {
        Balancer::with_rng(cluster, SmallRng::from_rng(&mut rand::rng()))
    }

    /// A balancer that starts its rotation at a random phase drawn from `rng`, so
    /// that N workers do not all send their first request to the same endpoint.
    fn with_rng(cluster: Arc<Cluster>, mut rng: SmallRng) -> Balancer {
        let shared = &cluster.lb;
        let n = cluster.endpoints.len();
        let rotation = if shared.policy != LbPolicy::RoundRobin || n == 0 {
            Rotation::None
        } else if shared.rr_weights.iter().all(|&w| w == 1) {
            let start = rng.random_range(0..n);
            Rotation::Cursor {
                next: Cell::new(start),
                start,
                last: RefCell::new(vec![0; n]),
                clock: Cell::new(0),
            }
        } else {
            let rotation = RefCell::new(vec![0; n]);
            // Advance a random number of steps into the period (bounded, since a
            // step costs O(n)) so the worker starts in a genuine rotation state.
            let period: u64 = shared.rr_weights.iter().map(|&w| w as u64).sum();
            let limit = period.min((MAX_PHASE_WORK / n as u64).max(1));
            for _ in 0..rng.random_range(0..limit) {
                smooth_step(&rotation, &shared.rr_weights, &[]);
            }
            Rotation::Smooth(rotation)
        };
        Balancer {
            cluster,
            rng: RefCell::new(rng),
            rotation,
        }
    }

    /// The cluster this balancer picks from.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Index into `cluster.endpoints` of the endpoint for the next attempt.
    ///
    /// `hash` is the request's [`Cluster::hash_key`]; `ring_hash` without one picks
    /// at random (by weight). `exclude` lists endpoints this request's earlier
    /// attempts used: they are skipped while any other endpoint exists, and used
    /// again when every endpoint is excluded, so a one-endpoint cluster still
    /// retries. `None` when the cluster has no endpoints (`original_dst`, or a `dns`
    /// cluster before its first answer).
    ///
    /// Endpoints that are unavailable (failed health checks, ejected) are skipped like
    /// excluded ones — unless fewer than `panic_threshold` of the endpoints are
    /// available, then all are used and `lb_healthy_panic` counts the pick. With
    /// none available and panic mode off (`panic_threshold: 0%`), `None`.
    /// `None` counts in `upstream_cx_none_healthy`: the attempt is not made.
    pub fn pick(&self, hash: Option<u64>, exclude: &[usize]) -> Option<usize> {
        let picked = self.choose(hash, exclude);
        if picked.is_none() {
            self.cluster
                .stats
                .upstream_cx_none_healthy
                .fetch_add(1, Relaxed);
        }
        picked
    }

    /// [`Balancer::pick`]'s choice, uncounted.
    fn choose(&self, hash: Option<u64>, exclude: &[usize]) -> Option<usize> {
        let n = self.cluster.endpoints.len();
        if n == 0 {
            return None;
        }
        let mut excluded = normalize_exclusion(exclude, n);
        // Zone-aware routing keeps to the highest priority level, as Envoy's.
        let mut zoned = true;
        if self.cluster.levels.is_single() {
            // The gauge counts the newest generation; an attempt (a retry) still
            // on an older one counts its own endpoints (rare, so counted here).
            let healthy = if self.cluster.is_newest() {
                usize::try_from(self.cluster.stats.membership_healthy.load(Relaxed))
                    .unwrap_or(usize::MAX)
            } else {
                self.cluster
                    .endpoints
                    .iter()
                    .filter(|e| e.health.is_available())
                    .count()
            };
            if healthy < n {
                excluded = self.health_exclusion(excluded, healthy)?;
            }
        } else {
            // A hash policy draws the level from the request's key, as Envoy's
            // (`choosePriority(hash)`): one key stays on one level while the
            // priority load stands.
            let draw = match hash {
                Some(h) if self.cluster.lb.policy == LbPolicy::RingHash => (h % 100) as u32,
                _ => self.rng.borrow_mut().random_range(0..100),
            };
            (excluded, zoned) = self.cluster.priority_exclusion(&excluded, draw)?;
        }
        if zoned && self.cluster.zone_aware() {
            excluded = self.cluster.zone_exclusion(
                excluded,
                self.cluster.levels.first(),
                self.rng.borrow_mut().random(),
            );
        }
        let shared = &self.cluster.lb;
        Some(match shared.policy {
            LbPolicy::RoundRobin => self.round_robin(&excluded),
            LbPolicy::LeastRequest => self.least_request(&excluded),
            LbPolicy::Random => shared.weighted_pick(&mut self.rng.borrow_mut(), &excluded),
            LbPolicy::RingHash => match hash.and_then(|key| shared.ring.lookup(key, &excluded)) {
                Some(i) => i,
                None => shared.weighted_pick(&mut self.rng.borrow_mut(), &excluded),
            },
        })
    }

    /// `excluded` plus the unavailable endpoints, when `healthy` of them are
    /// available; see [`Balancer::pick`].
    fn health_exclusion(&self, excluded: Vec<usize>, healthy: usize) -> Option<Vec<usize>> {
        let cluster = &self.cluster;
        if cluster.in_panic(healthy) {
            cluster.stats.lb_healthy_panic.fetch_add(1, Relaxed);
            return Some(excluded);
        }
        let unavailable: Vec<usize> = (0..cluster.endpoints.len())
            .filter(|&i| {
                cluster
                    .endpoints
                    .get(i)
                    .is_some_and(|e| !e.health.is_available())
            })
            .collect();
        if unavailable.len() >= cluster.endpoints.len() {
            // None left (the count raced a flag change, or panic mode is off).
            return (healthy > 0 || cluster.in_panic(0)).then_some(excluded);
        }
        let mut both = excluded;
        both.extend_from_slice(&unavailable);
        both.sort_unstable();
        both.dedup();
        // Every available endpoint already tried: retry one of them.
        Some(if both.len() >= cluster.endpoints.len() {
            unavailable
        } else {
            both
        })
    }

    fn round_robin(&self, excluded: &[usize]) -> usize {
        let n = self.cluster.endpoints.len();
        match &self.rotation {
            Rotation::Cursor {
                next,
                start,
                last,
                clock,
            } => {
                let mut last = last.borrow_mut();
                let pick = if excluded.is_empty() {
                    let pick = next.get() % n;
                    next.set((pick + 1) % n);
                    pick
                } else {
                    // The least recently picked; ties in rotation order.
                    (0..n)
                        .map(|step| (start + step) % n)
                        .filter(|i| excluded.binary_search(i).is_err())
                        .min_by_key(|&i| last.get(i).copied().unwrap_or(0))
                        .unwrap_or(next.get() % n)
                };
                clock.set(clock.get() + 1);
                if let Some(t) = last.get_mut(pick) {
                    *t = clock.get();
                }
                pick
            }
            Rotation::Smooth(current) => {
                smooth_step(current, &self.cluster.lb.rr_weights, excluded)
            }
            // Unreachable: the rotation exists whenever the policy is round_robin.
            Rotation::None => self
                .cluster
                .lb
                .weighted_pick(&mut self.rng.borrow_mut(), excluded),
        }
    }

    /// Power of two choices: two distinct candidates drawn by weight, the one with
    /// fewer active requests per unit of weight wins (Envoy's `active / weight`
    /// comparison). With equal load (an idle cluster) the first draw wins, so light
    /// traffic is still spread in proportion to the weights.
    fn least_request(&self, excluded: &[usize]) -> usize {
        let shared = &self.cluster.lb;
        let mut rng = self.rng.borrow_mut();
        let first = shared.weighted_pick(&mut rng, excluded);
        if self.cluster.endpoints.len().saturating_sub(excluded.len()) < 2 {
            return first;
        }
        let second = if excluded.is_empty() {
            shared.weighted_pick(&mut rng, &[first])
        } else {
            let mut both = excluded.to_vec();
            let at = both.binary_search(&first).unwrap_or_else(|at| at);
            both.insert(at, first);
            shared.weighted_pick(&mut rng, &both)
        };
        let load = |i: usize| {
            self.cluster.endpoints.get(i).map_or((0, 1), |e| {
                (e.stats.rq_active.load(Relaxed), e.weight.max(1))
            })
        };
        let ((a, wa), (b, wb)) = (load(first), load(second));
        // b / wb < a / wa, without division.
        if u128::from(b) * u128::from(wa) < u128::from(a) * u128::from(wb) {
            second
        } else {
            first
        }
    }
}

/// One step of nginx's smooth weighted round robin over the endpoints not in
/// `excluded`: each gains its weight, the largest wins and pays back the total.
/// Over a period each endpoint wins exactly its weight's worth, interleaved
/// (weights 5,1,1 give a a b a c a a).
fn smooth_step(current: &RefCell<Vec<i64>>, weights: &[i64], excluded: &[usize]) -> usize {
    let mut current = current.borrow_mut();
    let mut total = 0;
    // (index, current weight) of the leader; ties go to the lower index, as nginx.
    let mut best: Option<(usize, i64)> = None;
    for (i, (cur, &w)) in current.iter_mut().zip(weights).enumerate() {
        if excluded.binary_search(&i).is_ok() {
            continue;
        }
        *cur += w;
        total += w;
        if best.is_none_or(|(_, lead)| *cur > lead) {
            best = Some((i, *cur));
        }
    }
    let best = best.map_or(0, |(i, _)| i);
    if let Some(cur) = current.get_mut(best) {
        *cur -= total;
    }
    best
}

/// The exclusion list as the policies want it: sorted, distinct, in range — and
/// empty when it covers every endpoint (then anything may be retried).
fn normalize_exclusion(exclude: &[usize], n: usize) -> Vec<usize> {
    if exclude.is_empty() {
        return Vec::new();
    }
    let mut excluded: Vec<usize> = exclude.iter().copied().filter(|&i| i < n).collect();
    excluded.sort_unstable();
    excluded.dedup();
    if excluded.len() == n {
        excluded.clear();
    }
    excluded
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::cluster::tests::{cluster, weighted};

    #[test]
    fn an_older_generation_still_skips_its_unhealthy_endpoints() {
        use crate::cluster::health::FAILED_ACTIVE_HC;
        let c1 = weighted("round_robin", &[1, 1, 1], "");
        c1.set_flag(2, FAILED_ACTIVE_HC, true);
        // Discovery adds two endpoints: the newest generation's gauge counts
        // 4 healthy of 5, more than the 3 endpoints of c1.
        let mut next: Vec<Arc<Endpoint>> = c1.endpoints.clone();
        for i in 4..=5 {
            next.push(Endpoint::new(
                format!("10.0.0.{i}:80").parse().unwrap(),
                "h".into(),
                format!("10.0.0.{i}:80"),
                crate::cluster::Attributes::default(),
            ));
        }
        let _c2 = c1.with_endpoints(next).unwrap();
        let b = c1.balancer();
        for _ in 0..20 {
            assert_ne!(
                b.pick(None, &[0, 1]),
                Some(2),
                "a retry went to a failed endpoint"
            );
        }
    }

    #[test]
    fn balancers_of_clusters_no_longer_held_are_dropped() {
        let cache = Balancers::default();
        let first = weighted("round_robin", &[1, 1], "");
        let b1 = cache.get(&first);
        assert!(Rc::ptr_eq(&b1, &cache.get(&first)));
        drop(b1);
        // A new generation (a DNS change, a reload); the old one is dropped
        // by its config and its requests.
        let weak = Arc::downgrade(&first);
        drop(first);
        let second = weighted("round_robin", &[1, 1, 1], "");
        cache.get(&second);
        assert_eq!(cache.len(), 1);
        assert!(weak.upgrade().is_none(), "the old cluster is still held");
        // A cluster still held elsewhere keeps its balancer; one held only
        // through a balancer a request has is dropped from the map, not freed.
        let in_flight = cache.get(&second);
        drop(second);
        let third = weighted("round_robin", &[2, 1], "");
        let kept = cache.get(&third);
        assert_eq!(cache.len(), 1);
        assert_eq!(in_flight.cluster().endpoints.len(), 3);
        assert!(Rc::ptr_eq(&kept, &cache.get(&third)));
    }

    fn seeded(cluster: &Arc<Cluster>, seed: u64) -> Balancer {
        Balancer::with_rng(Arc::clone(cluster), SmallRng::seed_from_u64(seed))
    }

    fn counts(b: &Balancer, picks: usize, hash: Option<u64>, exclude: &[usize]) -> Vec<usize> {
        let mut counts = vec![0; b.cluster().endpoints.len()];
        for _ in 0..picks {
            counts[b.pick(hash, exclude).unwrap()] += 1;
        }
        counts
    }

    /// Each count within ±`tolerance` (relative) of its share of the weights.
    fn assert_proportional(counts: &[usize], weights: &[u32], tolerance: f64) {
        let total: usize = counts.iter().sum();
        let weight_sum: u32 = weights.iter().sum();
        for (c, w) in counts.iter().zip(weights) {
            let want = total as f64 * f64::from(*w) / f64::from(weight_sum);
            assert!(
                (*c as f64 - want).abs() <= want * tolerance,
                "counts {counts:?} not within {tolerance} of weights {weights:?}"
            );
        }
    }

    fn keys(n: u64) -> impl Iterator<Item = u64> {
        (0..n).map(|i| hash::xxh64(format!("user-{i}").as_bytes()))
    }

    #[test]
    fn no_endpoints_no_pick() {
        let c = crate::cluster::tests::cluster("name: sidecar\noriginal_dst: true");
        assert_eq!(c.balancer().pick(None, &[]), None);
        assert_eq!(c.balancer().pick(Some(1), &[0]), None);
    }

    #[test]
    fn round_robin_equal_weights_rotates_from_a_random_start() {
        let c = weighted("round_robin", &[1, 1, 1], "");
        let mut starts = std::collections::HashSet::new();
        for seed in 0..16 {
            let b = seeded(&c, seed);
            let seq: Vec<usize> = (0..300).map(|_| b.pick(None, &[]).unwrap()).collect();
            starts.insert(seq[0]);
            for pair in seq.windows(2) {
                assert_eq!(pair[1], (pair[0] + 1) % 3, "{seq:?}");
            }
        }
        assert_eq!(
            starts.len(),
            3,
            "workers should not all start at one endpoint"
        );
        // Equal weights that are not 1 take the same path (weights are divided by gcd).
        let b = seeded(&weighted("round_robin", &[7, 7], ""), 1);
        assert_eq!(counts(&b, 100, None, &[]), [50, 50]);
    }

    #[test]
    fn round_robin_weights_are_exact_over_each_period() {
        let c = weighted("round_robin", &[1, 2, 3], "");
        let mut firsts = std::collections::HashSet::new();
        for seed in 0..16 {
            let b = seeded(&c, seed);
            let seq: Vec<usize> = (0..6000).map(|_| b.pick(None, &[]).unwrap()).collect();
            firsts.insert(seq[..6].to_vec());
            // Any window of one period (6 picks) holds each endpoint weight times.
            for window in seq.windows(6) {
                let mut n = [0; 3];
                window.iter().for_each(|&i| n[i] += 1);
                assert_eq!(n, [1, 2, 3], "{window:?}");
            }
        }
        assert!(firsts.len() > 1, "every worker started at the same phase");
    }

    #[test]
    fn smooth_round_robin_interleaves() {
        let c = weighted("round_robin", &[5, 1, 1], "");
        // From the zero state, exactly nginx's sequence.
        let b = Balancer {
            cluster: Arc::clone(&c),
            rng: RefCell::new(SmallRng::seed_from_u64(0)),
            rotation: Rotation::Smooth(RefCell::new(vec![0; 3])),
        };
        let seq: String = (0..14)
            .map(|_| ["a", "b", "c"][b.pick(None, &[]).unwrap()])
            .collect();
        assert_eq!(seq, "aabacaaaabacaa");
        // From a random phase, a rotation of the same sequence.
        for seed in 0..8 {
            let b = seeded(&c, seed);
            let seq: String = (0..70)
                .map(|_| ["a", "b", "c"][b.pick(None, &[]).unwrap()])
                .collect();
            assert!("aabacaa".repeat(11).contains(&seq), "{seq}");
        }
    }

    #[test]
    fn round_robin_exclusion() {
        for weights in [&[1, 1, 1][..], &[1, 2, 3]] {
            let c = weighted("round_robin", weights, "");
            let b = seeded(&c, 3);
            assert_eq!(counts(&b, 600, None, &[1])[1], 0);
            let only = counts(&b, 60, None, &[0, 2, 2, 99]);
            assert_eq!(only, [0, 60, 0]);
            // Everything excluded: retry anywhere.
            assert!(counts(&b, 60, None, &[0, 1, 2]).iter().all(|&n| n > 0));
        }
        let single = weighted("round_robin", &[1], "");
        assert_eq!(single.balancer().pick(None, &[0]), Some(0));
    }

    /// Exclusions that change from pick to pick (zone-aware picks alternating
    /// between the local zone and the others, retries) leave the endpoints of
    /// each side their equal turns. The plain cursor gave the endpoint after the
    /// excluded run (here 2) twice the share of the next one.
    #[test]
    fn round_robin_stays_even_under_changing_exclusions() {
        for weights in [&[1, 1, 1, 1][..], &[2, 2, 2, 2], &[1, 1, 1, 2]] {
            let c = weighted("round_robin", weights, "");
            for seed in 0..8 {
                let b = seeded(&c, seed);
                let mut n = [0usize; 4];
                for _ in 0..600 {
                    n[b.pick(None, &[0, 2, 3]).unwrap()] += 1;
                    n[b.pick(None, &[0, 1]).unwrap()] += 1;
                }
                assert_eq!(n[..2], [0, 600], "{weights:?}");
                let want = 600 * weights[2] as usize / (weights[2] + weights[3]) as usize;
                assert!(n[2].abs_diff(want) <= 1, "{weights:?} seed {seed}: {n:?}");
            }
        }
    }

    #[test]
    fn random_follows_weights() {
        let c = weighted("random", &[1, 2, 3], "");
        assert_proportional(&counts(&seeded(&c, 7), 60_000, None, &[]), &[1, 2, 3], 0.05);
    }

    #[test]
    fn random_exclusion_keeps_the_other_weights() {
        let c = weighted("random", &[1, 2, 3, 4], "");
        let b = seeded(&c, 11);
        let n = counts(&b, 40_000, None, &[2]);
        assert_eq!(n[2], 0);
        assert_proportional(&[n[0], n[1], n[3]], &[1, 2, 4], 0.05);
        let n = counts(&b, 40_000, None, &[3, 0]);
        assert_eq!((n[0], n[3]), (0, 0));
        assert_proportional(&[n[1], n[2]], &[2, 3], 0.05);
        assert_eq!(counts(&b, 100, None, &[0, 1, 3]), [0, 0, 100, 0]);
        assert_proportional(
            &counts(&b, 40_000, None, &[0, 1, 2, 3]),
            &[1, 2, 3, 4],
            0.05,
        );
        let single = weighted("random", &[5], "");
        assert_eq!(single.balancer().pick(None, &[0]), Some(0));
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let c = weighted("least_request", &[1, 1], "");
        let b = seeded(&c, 1);
        let busy: Vec<_> = (0..3).map(|_| c.start_request(Some(0))).collect();
        assert_eq!(counts(&b, 1000, None, &[]), [0, 1000]);
        drop(busy);
        let n = counts(&b, 1000, None, &[]);
        assert!(n[0] > 400 && n[1] > 400, "{n:?}");

        let c = weighted("least_request", &[1, 1, 1], "");
        let b = seeded(&c, 2);
        let _busy = c.start_request(Some(1));
        let n = counts(&b, 3000, None, &[]);
        assert_eq!(n[1], 0, "{n:?}");
        assert!(n[0] > 1300 && n[2] > 1300, "{n:?}");
    }

    #[test]
    fn least_request_compares_load_per_weight() {
        let c = weighted("least_request", &[1, 4], "");
        let b = seeded(&c, 5);
        let _light = c.start_request(Some(0));
        let mut heavy: Vec<_> = (0..2).map(|_| c.start_request(Some(1))).collect();
        // 2 active / weight 4 is less loaded than 1 active / weight 1.
        assert_eq!(counts(&b, 500, None, &[]), [0, 500]);
        heavy.extend((0..6).map(|_| c.start_request(Some(1))));
        // 8 / 4 is more loaded than 1 / 1.
        assert_eq!(counts(&b, 500, None, &[]), [500, 0]);
    }

    #[test]
    fn least_request_idle_cluster_follows_weights() {
        let c = weighted("least_request", &[1, 2, 3], "");
        assert_proportional(&counts(&seeded(&c, 9), 60_000, None, &[]), &[1, 2, 3], 0.05);
    }

    #[test]
    fn least_request_exclusion() {
        let c = weighted("least_request", &[1, 1, 1], "");
        let b = seeded(&c, 4);
        let _busy: Vec<_> = (0..5).map(|_| c.start_request(Some(0))).collect();
        // The busy endpoint is the only one not yet tried: it is the pick.
        assert_eq!(counts(&b, 100, None, &[1, 2]), [100, 0, 0]);
        let n = counts(&b, 1000, None, &[2]);
        assert_eq!(n, [0, 1000, 0]);
        let single = weighted("least_request", &[1], "");
        assert_eq!(single.balancer().pick(None, &[0]), Some(0));
    }

    #[test]
    fn ring_hash_is_consistent() {
        let c = weighted("ring_hash", &[1, 1, 1, 1], "hash_on: { header: x-user }\n");
        let (a, b) = (seeded(&c, 1), seeded(&c, 2));
        // Another process building the same config gets the same ring.
        let other = weighted("ring_hash", &[1, 1, 1, 1], "hash_on: { header: x-user }\n");
        let o = seeded(&other, 3);
        for key in keys(2000) {
            let want = a.pick(Some(key), &[]);
            assert_eq!(a.pick(Some(key), &[]), want);
            assert_eq!(b.pick(Some(key), &[]), want);
            assert_eq!(o.pick(Some(key), &[]), want);
        }
    }

    #[test]
    fn ring_hash_spreads_keys_by_weight() {
        let c = weighted("ring_hash", &[1, 1, 1, 1], "hash_on: { source_ip: true }\n");
        assert_eq!(
            c.lb.ring.hashes.len(),
            1024,
            "4 endpoints are scaled up to the minimum ring"
        );
        let b = c.balancer();
        let mut n = [0; 4];
        keys(40_000).for_each(|k| n[b.pick(Some(k), &[]).unwrap()] += 1);
        assert_proportional(&n, &[1, 1, 1, 1], 0.10);

        let c = weighted("ring_hash", &[1, 2, 3], "hash_on: { source_ip: true }\n");
        // 160 × (1 + 2 + 3) = 960 points, scaled up to the minimum ring.
        assert_eq!(c.lb.ring.hashes.len(), 1024);
        let b = c.balancer();
        let mut n = [0; 3];
        keys(60_000).for_each(|k| n[b.pick(Some(k), &[]).unwrap()] += 1);
        assert_proportional(&n, &[1, 2, 3], 0.10);

        // No key: weighted random.
        assert_proportional(&counts(&seeded(&c, 8), 60_000, None, &[]), &[1, 2, 3], 0.05);
    }

    #[test]
    fn ring_hash_splits_a_names_keys_over_its_addresses() {
        // The IPs one `strict` DNS name resolves to: one authority each.
        let base = weighted("ring_hash", &[1], "hash_on: { source_ip: true }\n");
        let eps = (1..=3)
            .map(|i| {
                Endpoint::new(
                    format!("10.0.1.{i}:80").parse().unwrap(),
                    "svc".into(),
                    "svc:80".to_string(),
                    crate::cluster::Attributes::default(),
                )
            })
            .collect();
        let c = base.with_endpoints(eps).unwrap();
        let b = c.balancer();
        let mut n = [0; 3];
        keys(30_000).for_each(|k| n[b.pick(Some(k), &[]).unwrap()] += 1);
        assert_proportional(&n, &[1, 1, 1], 0.15);
    }

    #[test]
    fn ring_hash_removal_moves_only_the_removed_endpoints_keys() {
        const N: u32 = 10;
        let all = weighted(
            "ring_hash",
            &[1; N as usize],
            "hash_on: { source_ip: true }\n",
        );
        let removed = 3;
        let addresses: String = (1..=N)
            .filter(|&i| i != removed + 1)
            .map(|i| format!("  - {{ address: \"10.0.0.{i}:80\" }}\n"))
            .collect();
        let fewer = crate::cluster::tests::cluster(&format!(
            "name: c\nlb_policy: ring_hash\nhash_on: {{ source_ip: true }}\nendpoints:\n{addresses}"
        ));
        let (before, after) = (all.balancer(), fewer.balancer());
        let addr =
            |b: &Balancer, key| b.cluster().endpoints[b.pick(Some(key), &[]).unwrap()].address;
        let mut moved = 0;
        let total = 20_000;
        for key in keys(total) {
            let (was, is) = (addr(&before, key), addr(&after, key));
            if was != is {
                moved += 1;
                assert_eq!(
                    was, all.endpoints[removed as usize].address,
                    "a key of a kept endpoint moved"
                );
            }
        }
        let fraction = f64::from(moved) / total as f64;
        assert!(
            (0.05..0.15).contains(&fraction),
            "{fraction} of keys moved, expected about 1/{N}"
        );
    }

    /// Below the minimum ring (fewer than 7 endpoints of equal weight) every
    /// endpoint's points are scaled up to fill it, as in Envoy, so removing one
    /// gives the others more points: some keys also move between endpoints that
    /// stay (docs/config.md says so).
    #[test]
    fn ring_hash_removal_from_a_small_ring_moves_some_kept_keys_too() {
        let ring = |n: u32| {
            let addresses: String = (1..=n)
                .map(|i| format!("  - {{ address: \"10.0.0.{i}:80\" }}\n"))
                .collect();
            crate::cluster::tests::cluster(&format!(
                "name: c\nlb_policy: ring_hash\nhash_on: {{ source_ip: true }}\nendpoints:\n{addresses}"
            ))
        };
        let (three, two) = (ring(3), ring(2));
        let (before, after) = (three.balancer(), two.balancer());
        let addr =
            |b: &Balancer, key| b.cluster().endpoints[b.pick(Some(key), &[]).unwrap()].address;
        let (mut kept, mut moved) = (0, 0);
        for key in keys(20_000) {
            let was = addr(&before, key);
            if was != three.endpoints[2].address {
                kept += 1;
                if addr(&after, key) != was {
                    moved += 1;
                }
            }
        }
        let fraction = f64::from(moved) / f64::from(kept);
        assert!(
            (0.02..0.3).contains(&fraction),
            "{fraction} of the kept endpoints' keys moved"
        );
    }

    #[test]
    fn ring_hash_exclusion_walks_to_the_next_endpoint() {
        let c = weighted(
            "ring_hash",
            &[1, 1, 1, 1, 1],
            "hash_on: { source_ip: true }\n",
        );
        let b = c.balancer();
        for key in keys(500) {
            let first = b.pick(Some(key), &[]).unwrap();
            let second = b.pick(Some(key), &[first]).unwrap();
            assert_ne!(first, second);
            // Stable too: the same retry goes to the same endpoint.
            assert_eq!(b.pick(Some(key), &[first]), Some(second));
            let third = b.pick(Some(key), &[second, first]).unwrap();
            assert!(third != first && third != second);
            assert_eq!(
                b.pick(Some(key), &[0, 1, 2, 3, 4]),
                Some(first),
                "all excluded"
            );
        }
        let single = weighted("ring_hash", &[1], "hash_on: { source_ip: true }\n");
        assert_eq!(single.balancer().pick(Some(42), &[0]), Some(0));
    }

    #[test]
    fn ring_is_bounded_for_extreme_weights() {
        let c = weighted(
            "ring_hash",
            &[1, 1_000_000_000],
            "hash_on: { source_ip: true }\n",
        );
        let points = c.lb.ring.hashes.len();
        assert!(points <= (1 << 20) + 2, "{points}");
        assert!(
            c.lb.ring.owners.contains(&0),
            "every endpoint keeps a point"
        );
    }

    #[test]
    fn unavailable_endpoints_are_skipped_by_every_policy() {
        use crate::cluster::health::{EJECTED, FAILED_ACTIVE_HC};
        for (policy, extra) in [
            ("round_robin", ""),
            ("round_robin", "weights"),
            ("least_request", ""),
            ("random", ""),
            ("ring_hash", "hash_on: { source_ip: true }\n"),
        ] {
            let weights: &[u32] = if extra == "weights" {
                &[1, 2, 3, 4]
            } else {
                &[1; 4]
            };
            let extra = if extra == "weights" { "" } else { extra };
            let c = weighted(policy, weights, extra);
            c.set_flag(1, FAILED_ACTIVE_HC, true);
            c.set_flag(3, EJECTED, true);
            let b = seeded(&c, 5);
            let hash = (policy == "ring_hash").then_some(42);
            let n = counts(&b, 400, hash, &[]);
            assert_eq!((n[1], n[3]), (0, 0), "{policy}: {n:?}");
            // A retry after the available ones were tried goes to an available one.
            for _ in 0..50 {
                let first = b.pick(hash, &[]).unwrap();
                let second = b.pick(hash, &[first]).unwrap();
                assert!([0, 2].contains(&second) && second != first, "{policy}");
                let third = b.pick(hash, &[0, 2]).unwrap();
                assert!([0, 2].contains(&third), "{policy}: {third}");
            }
            assert_eq!(c.stats.lb_healthy_panic.load(Relaxed), 0, "{policy}");
        }
    }

    #[test]
    fn panic_mode_uses_all_endpoints_and_is_counted() {
        use crate::cluster::health::FAILED_ACTIVE_HC;
        let c = weighted("round_robin", &[1, 1, 1], "");
        c.set_flag(0, FAILED_ACTIVE_HC, true);
        c.set_flag(1, FAILED_ACTIVE_HC, true);
        let b = seeded(&c, 1);
        assert_eq!(counts(&b, 30, None, &[]), [10, 10, 10]);
        assert_eq!(c.stats.lb_healthy_panic.load(Relaxed), 30);

        let strict = weighted("round_robin", &[1, 1, 1], "panic_threshold: 0%\n");
        strict.set_flag(0, FAILED_ACTIVE_HC, true);
        strict.set_flag(1, FAILED_ACTIVE_HC, true);
        let b = seeded(&strict, 1);
        assert_eq!(counts(&b, 30, None, &[]), [0, 0, 30]);
        strict.set_flag(2, FAILED_ACTIVE_HC, true);
        assert_eq!(b.pick(None, &[]), None, "nothing available, no panic");
        assert_eq!(strict.stats.lb_healthy_panic.load(Relaxed), 0);
    }

    /// Endpoints `10.0.0.{1,2,..}:80` at the given priorities, weight 1.
    fn prioritized(policy: &str, priorities: &[u32], extra: &str) -> Arc<Cluster> {
        let endpoints: String = priorities
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "  - {{ address: \"10.0.0.{}:80\", priority: {p} }}\n",
                    i + 1
                )
            })
            .collect();
        cluster(&format!(
            "name: c\nlb_policy: {policy}\n{extra}endpoints:\n{endpoints}"
        ))
    }

    #[test]
    fn a_lower_priority_takes_what_the_higher_one_cannot() {
        use crate::cluster::health::FAILED_ACTIVE_HC;
        for policy in ["round_robin", "least_request", "random", "ring_hash"] {
            // P=0: 0, 1; P=1: 2 (the backup), P=2: 3.
            let c = prioritized(policy, &[0, 0, 1, 2], "");
            let b = seeded(&c, 7);
            let hash = (policy == "ring_hash").then_some(99);
            let n = counts(&b, 1000, None, &[]);
            assert_eq!((n[2], n[3]), (0, 0), "{policy}: {n:?}");
            assert!(n[0] > 300 && n[1] > 300, "{policy}: {n:?}");
            // Half of P=0 left: 70% there, 30% to P=1.
            c.set_flag(0, FAILED_ACTIVE_HC, true);
            let n = counts(&b, 10_000, None, &[]);
            assert_eq!((n[0], n[3]), (0, 0), "{policy}: {n:?}");
            assert!((6700..7300).contains(&n[1]), "{policy}: {n:?}");
            // All of P=0 gone: P=1 takes everything.
            c.set_flag(1, FAILED_ACTIVE_HC, true);
            assert_eq!(counts(&b, 100, hash, &[]), [0, 0, 100, 0], "{policy}");
            // Retries: a tried P=1 endpoint sends the retry to P=2.
            assert_eq!(b.pick(hash, &[2]), Some(3), "{policy}");
            // Back: all on P=0 again.
            c.set_flag(0, FAILED_ACTIVE_HC, false);
            c.set_flag(1, FAILED_ACTIVE_HC, false);
            let n = counts(&b, 200, None, &[]);
            assert_eq!((n[2], n[3]), (0, 0), "{policy}: {n:?}");
            // A retry after both P=0 endpoints were tried goes to P=1.
            assert_eq!(b.pick(hash, &[0, 1]), Some(2), "{policy}");
            assert_eq!(c.stats.lb_healthy_panic.load(Relaxed), 0, "{policy}");
        }
    }

    #[test]
    fn a_hash_key_keeps_to_one_priority_level() {
        use crate::cluster::health::FAILED_ACTIVE_HC;
        // Half of P=0 down: 70% of the keys on P=0, 30% on P=1, each key
        // always on the same one.
        let c = prioritized("ring_hash", &[0, 0, 1], "hash_on: { source_ip: true }\n");
        c.set_flag(0, FAILED_ACTIVE_HC, true);
        let b = seeded(&c, 9);
        let mut on_backup = 0;
        for key in keys(1000) {
            let first = b.pick(Some(key), &[]).unwrap();
            for _ in 0..5 {
                assert_eq!(b.pick(Some(key), &[]), Some(first), "key {key}");
            }
            on_backup += usize::from(first == 2);
        }
        assert!((230..370).contains(&on_backup), "{on_backup}");
    }

    #[test]
    fn priority_panic_is_per_level_and_total_panic_spreads_by_size() {
        use crate::cluster::health::FAILED_ACTIVE_HC;
        // No overprovisioning. P=0: 0..=3 with only 3 available (score 25, below
        // the 50% threshold: in panic); P=1: 4 available, 5 not (score 50, not in
        // panic). The scores add up to 75: P=0 takes 34%, P=1 66%; P=0 uses all
        // its endpoints, P=1 only its available one.
        let c = prioritized(
            "random",
            &[0, 0, 0, 0, 1, 1],
            "overprovisioning_factor: 100\n",
        );
        for i in [0, 1, 2, 5] {
            c.set_flag(i, FAILED_ACTIVE_HC, true);
        }
        let b = seeded(&c, 3);
        let n = counts(&b, 10_000, None, &[]);
        assert_eq!(n[5], 0, "{n:?}");
        assert!((6300..6900).contains(&n[4]), "{n:?}");
        assert!(n[..4].iter().all(|&k| (700..1000).contains(&k)), "{n:?}");
        let panics = c.stats.lb_healthy_panic.load(Relaxed);
        assert_eq!(panics, n[..4].iter().sum::<usize>() as u64);
        // Nothing available: every level in panic, the load by size (67% / 33%).
        c.set_flag(3, FAILED_ACTIVE_HC, true);
        c.set_flag(4, FAILED_ACTIVE_HC, true);
        let n = counts(&b, 10_000, None, &[]);
        let p0: usize = n[..4].iter().sum();
        assert!((6400..7000).contains(&p0), "{n:?}");
        assert!(n.iter().all(|&k| k > 1000), "{n:?}");
        // With panic mode off, nothing at all.
        let strict = prioritized("round_robin", &[0, 1], "panic_threshold: 0%\n");
        strict.set_flag(0, FAILED_ACTIVE_HC, true);
        let b = seeded(&strict, 3);
        assert_eq!(counts(&b, 10, None, &[]), [0, 10]);
        strict.set_flag(1, FAILED_ACTIVE_HC, true);
        assert_eq!(b.pick(None, &[]), None);
        assert_eq!(strict.stats.upstream_cx_none_healthy.load(Relaxed), 1);
        assert_eq!(strict.stats.lb_healthy_panic.load(Relaxed), 0);
    }

    #[test]
    fn the_overprovisioning_factor_sets_when_traffic_spills() {
        use crate::cluster::health::FAILED_ACTIVE_HC;
        // 4 of 5 P=0 endpoints: whole at 140%, 80% at 100%.
        for (factor, least, most) in [("140", 0, 0), ("100", 1700, 2300)] {
            let c = prioritized(
                "random",
                &[0, 0, 0, 0, 0, 1],
                &format!("overprovisioning_factor: {factor}\n"),
            );
            c.set_flag(0, FAILED_ACTIVE_HC, true);
            let n = counts(&seeded(&c, 11), 10_000, None, &[]);
            assert!((least..=most).contains(&n[5]), "{factor}: {n:?}");
        }
    }

    #[test]
    fn zones_apply_within_the_highest_priority_level() {
        // P=0: 0 (zone a), 1 (zone b); P=1: 2 (zone a). Local zone a.
        let mut cfg: crate::config::Cluster = serde_saphyr::from_str(
            "name: c\nzone_aware: { min_cluster_size: 1 }\nendpoints:\n  - { address: \"10.0.0.1:80\", zone: a }\n  - { address: \"10.0.0.2:80\", zone: b }\n  - { address: \"10.0.0.3:80\", zone: a, priority: 1 }\n",
        )
        .unwrap();
        cfg.local_zone = Some("a".into());
        let c = Cluster::from_config(&cfg).unwrap();
        let b = seeded(&c, 5);
        assert_eq!(counts(&b, 50, None, &[]), [50, 0, 0]);
        // The local P=0 endpoint tried: the other zone of P=0, not P=1's local one.
        assert_eq!(b.pick(None, &[0]), Some(1));
    }

    #[test]
    fn weighted_pick_maps_around_excluded_intervals() {
        let c = weighted("random", &[3, 1, 4, 1, 5], "");
        let mut rng = SmallRng::seed_from_u64(0);
        for excluded in [&[0usize][..], &[4], &[0, 2], &[1, 3], &[0, 1, 2, 3]] {
            for _ in 0..2000 {
                let i = c.lb.weighted_pick(&mut rng, excluded);
                assert!(i < 5 && !excluded.contains(&i), "{i} with {excluded:?}");
            }
        }
    }
}

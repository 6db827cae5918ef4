//! Zone-aware routing: keep traffic in the process's zone (`local_zone`) while that
//! zone can take it, spill to the other zones in proportion to what it lost.
//!
//! Envoy's algorithm, simplified: Envoy compares the share of *proxies* in the local
//! zone with the share of *endpoints* there; Legate does not know its fleet, so it
//! assumes the proxies are spread like the endpoints, in which case Envoy routes
//! everything locally ("all directly") while the local zone is whole. When part of
//! the local zone is unavailable (failed health checks, ejected, or already tried by
//! this request), a pick stays local with probability `available / total` of the local
//! endpoints and goes to the other zones otherwise, so each lost local endpoint's share
//! moves out of the zone. Below `min_cluster_size` endpoints, or with no endpoint in
//! the local zone, zones are ignored.

use std::sync::atomic::Ordering::Relaxed;

use super::Cluster;

impl Cluster {
    /// Whether picks consider zones (`zone_aware` configured and a local zone known).
    pub(super) fn zone_aware(&self) -> bool {
        self.config.zone_aware.is_some() && self.config.local_zone.is_some()
    }

    /// `excluded` (sorted, distinct, leaving at least one endpoint) narrowed to the
    /// local zone or to the other zones of `level` (the endpoints of the highest
    /// priority level; `None`: all, there being one level); `draw` in [0, 1) decides
    /// when the local zone is partly unavailable. Never excludes every endpoint.
    pub(super) fn zone_exclusion(
        &self,
        excluded: Vec<usize>,
        level: Option<&[usize]>,
        draw: f64,
    ) -> Vec<usize> {
        let (Some(za), Some(local)) = (&self.config.zone_aware, &self.config.local_zone) else {
            return excluded;
        };
        let n = self.endpoints.len();
        let in_level = |i: usize| level.is_none_or(|l| l.binary_search(&i).is_ok());
        // Endpoints outside the level count as neither side: excluded already.
        let is_local: Vec<bool> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| in_level(i) && e.zone.as_deref() == Some(local.as_str()))
            .collect();
        let size = level.map_or(n, <[usize]>::len);
        let local_total = is_local.iter().filter(|&&l| l).count();
        if size < za.min_cluster_size as usize || local_total == 0 {
            self.stats.lb_zone_cluster_too_small.fetch_add(1, Relaxed);
            return excluded;
        }
        let local_usable = (0..n)
            .filter(|&i| is_local[i] && excluded.binary_search(&i).is_err())
            .count();
        let stay = if local_usable == local_total {
            self.stats
                .lb_zone_routing_all_directly
                .fetch_add(1, Relaxed);
            true
        } else if local_usable > 0 && draw * (local_total as f64) < local_usable as f64 {
            self.stats.lb_zone_routing_sampled.fetch_add(1, Relaxed);
            true
        } else {
            false
        };
        let mut narrowed = excluded.clone();
        narrowed.extend((0..n).filter(|&i| in_level(i) && is_local[i] != stay));
        narrowed.sort_unstable();
        narrowed.dedup();
        if narrowed.len() >= n {
            // Nothing usable on that side (e.g. every other zone is down): keep to
            // what health allows.
            return excluded;
        }
        if !stay {
            self.stats.lb_zone_routing_cross_zone.fetch_add(1, Relaxed);
        }
        narrowed
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::config;
    use std::sync::Arc;

    fn zoned(min: u32) -> Arc<Cluster> {
        let mut cfg: config::Cluster = serde_saphyr::from_str(&format!(
            "name: c\nzone_aware: {{ min_cluster_size: {min} }}\nendpoints:\n  - {{ address: \"10.0.0.1:80\", zone: a }}\n  - {{ address: \"10.0.0.2:80\", zone: a }}\n  - {{ address: \"10.0.0.3:80\", zone: b }}\n  - {{ address: \"10.0.0.4:80\" }}\n"
        ))
        .unwrap();
        cfg.local_zone = Some("a".into());
        Cluster::from_config(&cfg).unwrap()
    }

    #[test]
    fn local_zone_first_then_proportional_spill() {
        let c = zoned(1);
        assert!(c.zone_aware());
        // Whole local zone: only it.
        assert_eq!(c.zone_exclusion(vec![], None, 0.99), [2, 3]);
        // Half of it tried or down: local below the draw's half, else the others.
        assert_eq!(c.zone_exclusion(vec![0], None, 0.49), [0, 2, 3]);
        assert_eq!(c.zone_exclusion(vec![0], None, 0.5), [0, 1]);
        // All local gone: the others.
        assert_eq!(c.zone_exclusion(vec![0, 1], None, 0.0), [0, 1]);
        // Other zones all gone too: health's choice stands.
        assert_eq!(c.zone_exclusion(vec![0, 2, 3], None, 0.9), [0, 2, 3]);
        let s = &c.stats;
        assert_eq!(s.lb_zone_routing_all_directly.load(Relaxed), 1);
        assert_eq!(s.lb_zone_routing_sampled.load(Relaxed), 1);
        assert_eq!(s.lb_zone_routing_cross_zone.load(Relaxed), 2);
    }

    #[test]
    fn small_clusters_ignore_zones() {
        let c = zoned(5);
        assert_eq!(c.zone_exclusion(vec![], None, 0.0), Vec::<usize>::new());
        assert_eq!(c.stats.lb_zone_cluster_too_small.load(Relaxed), 1);
    }
}

//! Priority levels: which level of a cluster's endpoints an attempt goes to.
//!
//! Envoy's algorithm. Endpoints carry a `priority` (0, the default, is the highest).
//! Each level gets a health score, `min(100, available% × overprovisioning_factor)`:
//! with the default factor of 140% a level counts as whole until fewer than ~72% of
//! its endpoints are available. The levels take the traffic in order, each its score
//! (the *priority load*): 50% of level 0 available gives it 70% of the requests and
//! level 1 the other 30%. When the scores add up to less than 100 they are scaled up
//! to 100 (scores 20 and 30 give 40% and 60%), and the rounding remainder goes to the
//! first level with a score. Panic mode is per level, and only when the scores add up
//! to less than 100: a chosen level with fewer than `panic_threshold` of its endpoints
//! available uses all of them. When every level is in panic, the load follows the
//! levels' sizes. With `panic_threshold: 0%` and no endpoint available anywhere, no
//! endpoint is picked. Nginx's `backup` servers are a second level.
//!
//! Legate adds one thing for its retries: an attempt whose chosen level has no
//! available endpoint left that the request has not tried goes to the first level,
//! in priority order, that has one (Envoy leaves that to a retry priority plugin).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::{Cluster, Endpoint};

/// A cluster's endpoints grouped by priority, highest (lowest number) first.
#[derive(Debug, Default)]
pub(super) struct Levels {
    /// Endpoint indices of each level, ascending. Empty when every endpoint has the
    /// same priority: then there is nothing to choose and picks skip this module.
    members: Vec<Vec<usize>>,
}

impl Levels {
    pub(super) fn new(endpoints: &[Arc<Endpoint>]) -> Levels {
        let mut priorities: Vec<u32> = endpoints.iter().map(|e| e.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        if priorities.len() < 2 {
            return Levels::default();
        }
        let members = priorities
            .iter()
            .map(|&p| {
                (0..endpoints.len())
                    .filter(|&i| endpoints.get(i).is_some_and(|e| e.priority == p))
                    .collect()
            })
            .collect();
        Levels { members }
    }

    /// Whether the endpoints are all of one level.
    pub(super) fn is_single(&self) -> bool {
        self.members.is_empty()
    }

    /// The highest level's endpoints (every endpoint when there is one level).
    pub(super) fn first(&self) -> Option<&[usize]> {
        self.members.first().map(Vec::as_slice)
    }
}

/// A level's health score: its available share of endpoints times `factor`
/// (percent), at most 100, in whole percent as Envoy's.
fn health_score(available: usize, total: usize, factor: u32) -> u32 {
    if total == 0 {
        return 0;
    }
    let score = u64::from(factor) * available as u64 / total as u64;
    score.min(100) as u32
}

/// The priority load: the percent of attempts each level takes, from the levels'
/// health scores, adding up to 100 (all on the first level when every score is 0).
pub(super) fn priority_load(health: &[u32]) -> Vec<u32> {
    let total = health.iter().sum::<u32>().min(100);
    let mut load = vec![0; health.len()];
    if total == 0 {
        if let Some(first) = load.first_mut() {
            *first = 100;
        }
        return load;
    }
    let mut left = 100u32;
    for (l, &h) in load.iter_mut().zip(health) {
        let share = (h * 100 / total).min(left);
        *l = share;
        left -= share;
    }
    // Rounding: to the first level with a score.
    if let Some(i) = health.iter().position(|&h| h > 0) {
        if let Some(l) = load.get_mut(i) {
            *l += left;
        }
    }
    load
}

/// The load when every level is in panic: by the levels' sizes.
fn load_by_size(sizes: &[usize]) -> Vec<u32> {
    let total: usize = sizes.iter().sum();
    let mut load: Vec<u32> = sizes
        .iter()
        .map(|&s| (s * 100).checked_div(total).unwrap_or(0) as u32)
        .collect();
    let left = 100 - load.iter().sum::<u32>();
    if let Some(i) = sizes.iter().position(|&s| s > 0) {
        if let Some(l) = load.get_mut(i) {
            *l += left;
        }
    }
    load
}

impl Cluster {
    /// `tried` (sorted, distinct, leaving at least one endpoint: what
    /// `lb::normalize_exclusion` makes) widened to every endpoint but those of the
    /// level chosen by `draw` (0–99) that may take the attempt, and whether that level
    /// is the highest one (where zone-aware routing applies, as in Envoy). `None`
    /// when no endpoint may be picked (none available, `panic_threshold: 0%`).
    /// Never excludes every endpoint.
    pub(super) fn priority_exclusion(
        &self,
        tried: &[usize],
        draw: u32,
    ) -> Option<(Vec<usize>, bool)> {
        let members = &self.levels.members;
        let is_available = |i: usize| {
            self.endpoints
                .get(i)
                .is_some_and(|e| e.health.is_available())
        };
        let available: Vec<usize> = members
            .iter()
            .map(|m| m.iter().filter(|&&i| is_available(i)).count())
            .collect();
        let factor = self.config.overprovisioning_factor;
        let health: Vec<u32> = members
            .iter()
            .zip(&available)
            .map(|(m, &a)| health_score(a, m.len(), factor))
            .collect();
        let total = health.iter().sum::<u32>().min(100);
        let threshold = self.config.panic_threshold.0;
        if total == 0 && threshold <= 0.0 {
            return None;
        }
        let panic: Vec<bool> = members
            .iter()
            .zip(&available)
            .map(|(m, &a)| total < 100 && (a as f64) * 100.0 < threshold * m.len() as f64)
            .collect();
        let load = if panic.iter().all(|&p| p) {
            load_by_size(&members.iter().map(Vec::len).collect::<Vec<_>>())
        } else {
            priority_load(&health)
        };
        let mut below = 0;
        let level = load
            .iter()
            .position(|&l| {
                below += l;
                draw < below
            })
            .unwrap_or(0);
        let in_panic = panic.get(level).copied().unwrap_or(false);
        if in_panic {
            self.stats.lb_healthy_panic.fetch_add(1, Relaxed);
        }
        let untried = |i: &usize| tried.binary_search(i).is_err();
        let chosen_level = members.get(level).map(Vec::as_slice).unwrap_or_default();
        let usable: Vec<usize> = chosen_level
            .iter()
            .copied()
            .filter(|&i| in_panic || is_available(i))
            .collect();
        let fresh: Vec<usize> = usable.iter().copied().filter(untried).collect();
        let (chosen, first) = if !fresh.is_empty() {
            (fresh, level == 0)
        } else if let Some((at, other)) = members
            .iter()
            .map(|m| {
                m.iter()
                    .copied()
                    .filter(|&i| is_available(i) && untried(&i))
                    .collect::<Vec<usize>>()
            })
            .enumerate()
            .find(|(_, m)| !m.is_empty())
        {
            (other, at == 0)
        } else if !usable.is_empty() {
            // Every usable endpoint already tried: retry one of the level's.
            (usable, level == 0)
        } else {
            // The health flags changed since they were counted.
            (chosen_level.to_vec(), level == 0)
        };
        let mut chosen = chosen;
        chosen.sort_unstable();
        let excluded = (0..self.endpoints.len())
            .filter(|i| chosen.binary_search(i).is_err())
            .collect();
        Some((excluded, first))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    /// The tables of Envoy's "Priority levels" page.
    #[test]
    fn the_load_follows_envoys_tables() {
        let load = |available: &[(usize, usize)]| {
            let health: Vec<u32> = available
                .iter()
                .map(|&(a, t)| health_score(a, t, 140))
                .collect();
            priority_load(&health)
        };
        // Two levels, P=1 whole.
        assert_eq!(load(&[(100, 100), (100, 100)]), [100, 0]);
        assert_eq!(load(&[(72, 100), (100, 100)]), [100, 0]);
        assert_eq!(load(&[(71, 100), (100, 100)]), [99, 1]);
        assert_eq!(load(&[(50, 100), (100, 100)]), [70, 30]);
        assert_eq!(load(&[(25, 100), (100, 100)]), [35, 65]);
        assert_eq!(load(&[(0, 100), (100, 100)]), [0, 100]);
        // Both degraded: scaled up to 100.
        assert_eq!(load(&[(71, 100), (71, 100)]), [99, 1]);
        assert_eq!(load(&[(50, 100), (50, 100)]), [70, 30]);
        assert_eq!(load(&[(25, 100), (25, 100)]), [50, 50]);
        // Three levels.
        assert_eq!(load(&[(25, 100), (25, 100), (100, 100)]), [35, 35, 30]);
        // Scores 35, 35, 28 (98 in all): 35, 35, 28 of 98, the 2 left to P=0.
        assert_eq!(load(&[(25, 100), (25, 100), (20, 100)]), [37, 35, 28]);
        // Nothing anywhere: all on P=0 (where panic mode decides).
        assert_eq!(load(&[(0, 3), (0, 1)]), [100, 0]);
    }

    #[test]
    fn a_total_panic_spreads_by_size() {
        assert_eq!(load_by_size(&[3, 1]), [75, 25]);
        assert_eq!(load_by_size(&[1, 1, 1]), [34, 33, 33]);
        assert_eq!(load_by_size(&[0, 2]), [0, 100]);
    }

    #[test]
    fn the_factor_sets_when_a_level_spills() {
        assert_eq!(health_score(4, 5, 140), 100);
        assert_eq!(health_score(4, 5, 100), 80);
        assert_eq!(health_score(1, 3, 140), 46);
        assert_eq!(health_score(0, 0, 140), 0);
    }
}

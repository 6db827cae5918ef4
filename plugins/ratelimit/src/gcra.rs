//! The token bucket as GCRA (generic cell rate algorithm): the whole bucket
//! state is one number, the theoretical arrival time (TAT), so it fits one KV
//! value and one compare-and-swap. Pure arithmetic on Unix nanoseconds; no I/O.
//!
//! With emission interval `T = period / count` and capacity `burst`, a request
//! at `now` is allowed iff `max(tat, now) + T - now <= burst * T`; the bucket
//! then holds `(burst * T - (new_tat - now)) / T` tokens. A TAT at or before
//! `now` is a full bucket, exactly like an absent key, so the KV entry can
//! expire once the bucket would be full again.

/// A rate: `count` requests per `period_ns`, with at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Nanoseconds per token (emission interval), at least 1.
    pub interval_ns: u64,
    /// Capacity in tokens, at least 1.
    pub burst: u32,
}

/// The verdict for one request against one bucket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request fits.
    pub allowed: bool,
    /// The TAT to store if allowed (unchanged state otherwise).
    pub new_tat: u64,
    /// Tokens left after this request (0 when denied).
    pub remaining: u32,
    /// Nanoseconds until the bucket is full again.
    pub reset_ns: u64,
    /// Nanoseconds until this request would be allowed (0 when allowed).
    pub retry_after_ns: u64,
}

impl Bucket {
    /// The bucket's capacity in nanoseconds of credit.
    fn tolerance_ns(&self) -> u64 {
        self.interval_ns.saturating_mul(u64::from(self.burst))
    }

    /// Decide one request of cost 1 at `now` given the stored `tat` (`None`:
    /// no entry, a full bucket).
    pub fn decide(&self, tat: Option<u64>, now: u64) -> Decision {
        let base = tat.map_or(now, |t| t.max(now));
        let new_tat = base.saturating_add(self.interval_ns);
        let used = new_tat - now;
        let cap = self.tolerance_ns();
        if used <= cap {
            Decision {
                allowed: true,
                new_tat,
                // Lossless: (cap - used) / interval <= burst.
                remaining: u32::try_from((cap - used) / self.interval_ns).unwrap_or(self.burst),
                reset_ns: used,
                retry_after_ns: 0,
            }
        } else {
            Decision {
                allowed: false,
                new_tat: base,
                remaining: 0,
                reset_ns: base - now,
                retry_after_ns: used - cap,
            }
        }
    }
}

/// Nanoseconds to whole seconds, rounded up (a client told "0" would retry at once).
pub fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

/// Nanoseconds to whole milliseconds, rounded up, at least 1 (a KV TTL of 0 is invalid).
pub fn ceil_ms(ns: u64) -> u64 {
    ns.div_ceil(1_000_000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_full_bucket_allows_burst_then_refills_one_token_per_interval() {
        let b = Bucket {
            interval_ns: SEC,
            burst: 3,
        };
        let now = 1_000 * SEC;
        let mut tat = None;
        for left in [2, 1, 0] {
            let d = b.decide(tat, now);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
            tat = Some(d.new_tat);
        }
        let d = b.decide(tat, now);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ns, SEC);
        assert_eq!(
            d.new_tat,
            now + 3 * SEC,
            "a denial leaves the state unchanged"
        );
        // Half an interval later: still nothing; a full interval: one token.
        assert!(!b.decide(tat, now + SEC / 2).allowed);
        let d = b.decide(tat, now + SEC);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
    }

    #[test]
    fn an_old_tat_is_a_full_bucket() {
        let b = Bucket {
            interval_ns: 10,
            burst: 5,
        };
        assert_eq!(b.decide(Some(3), 1_000), b.decide(None, 1_000));
        assert_eq!(b.decide(None, 1_000).remaining, 4);
        assert_eq!(b.decide(None, 1_000).reset_ns, 10);
    }

    #[test]
    fn rounding_up() {
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(SEC), 1);
        assert_eq!(ceil_secs(SEC + 1), 2);
        assert_eq!(ceil_ms(0), 1);
        assert_eq!(ceil_ms(1_500_000), 2);
    }
}

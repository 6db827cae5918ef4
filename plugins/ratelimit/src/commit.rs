//! Group commit: how the requests of one instance (one worker) write a bucket
//! on a remote (Redis) namespace without racing each other.
//!
//! Left to themselves, concurrent requests on one bucket read the same
//! version and race their compare-and-swaps: one wins per round, the others
//! re-read and retry, and on a hot key most ran out of attempts. Running out
//! is a KV error, which `failure_mode: allow` lets through unchecked: 64
//! concurrent connections of one client through one worker got 77% of their
//! requests past a limit that way. So an instance writes a bucket once at a
//! time. The first request ready to write starts a *flight*: one
//! compare-and-swap carrying the decisions of every request of the instance
//! waiting on that bucket, each decided in turn on the TAT the one before it
//! left (exactly what one-by-one writes would have stored). Requests that
//! become ready meanwhile wait for the next flight. Conflicts remain only
//! between instances (other workers, other processes), as before.
//!
//! A waiting request keeps an asynchronous read of the bucket out: the ABI
//! resumes a paused exchange only with a reply to one of its own calls. Legate
//! sends a worker's calls down one Redis connection in order, so the read is
//! answered after the flight's write, and the request finds its outcome then
//! (that is this host's behaviour, not an ABI promise: a request that finds no
//! outcome reads again, and correctness rests on the compare-and-swap only).
//! The reads also tell the instance the bucket's newest state. This module is
//! the bookkeeping only; `lib.rs` makes the KV calls. Times here are the
//! monotonic clock's (a wall-clock step must not make a live flight look
//! lost); decisions use the request's wall clock, as the TAT does.

use std::collections::HashMap;

use rustc_hash::FxHashMap;

use legate_sdk::kv::WriteCondition;
use legate_sdk::Error;

use crate::gcra::{ceil_ms, Bucket, Decision};

/// Compare-and-swaps a flight may lose before its admitted members count as a
/// KV error (which `failure_mode: allow` lets through). Only other instances'
/// flights make it lose, each time because one of them wrote (progress for
/// the fleet), so with W instances writing one bucket a flight loses a round
/// with odds of about (W−1)/W: with 4 workers, 8 attempts ran out for 7% of
/// the requests at full load, 32 leave (3/4)^32 ≈ 0.01%. The price is latency
/// for the unlucky (two round trips per attempt), not work for the fleet.
pub const FLIGHT_ATTEMPTS: u32 = 32;

/// How long a flight's call may stay unanswered before a waiting request
/// gives it up as lost and starts another. A live carrier's call ends within
/// the host's `kv.timeout` (at most 1 s per network step), and a carrier
/// whose exchange ends gives its flight up at once
/// ([`Commits::abandon`]), so this only bounds what nothing else catches.
/// Giving up a flight that did land counts its requests twice: stricter,
/// never looser.
pub const LOST_FLIGHT_NS: u64 = 10_000_000_000;

/// Wait replies a flight may see per request it concerns while its current
/// call is out. In order (above) each waiting request sees about one per
/// call; a flight far past this is one whose carrier's call was cancelled
/// without its exchange ending (its pause outlived `limits.pause`), and the
/// waiters would otherwise read in a loop until [`LOST_FLIGHT_NS`].
const POLLS_PER_WAITER: usize = 8;

/// A request's place in a flight: its check's token and the limit's position
/// in the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Member {
    /// The check (unique per instance).
    pub token: u64,
    /// The limit's position in the check.
    pub pos: usize,
}

/// A request ready to write a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    /// Who.
    pub member: Member,
    /// The limit's bucket.
    pub bucket: Bucket,
    /// The request's clock (its decision's `now`).
    pub now: u64,
}

/// A bucket as read: its version (`None`: absent) and stored TAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The entry's version; `None` if there was no entry.
    pub version: Option<u64>,
    /// The stored TAT; `None` if there was no entry.
    pub tat: Option<u64>,
}

impl Seen {
    /// No entry: a full bucket.
    pub const ABSENT: Seen = Seen {
        version: None,
        tat: None,
    };
}

/// What the caller does next for a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Carry the flight: write `tat` under `cond`, expiring in `ttl_ms`, and
    /// hand the reply to [`Commits::written`].
    Write {
        /// The version the flight's decisions were made on.
        cond: WriteCondition,
        /// The TAT after every admitted member.
        tat: u64,
        /// Until the bucket is full again.
        ttl_ms: u64,
    },
    /// Carry the flight: read the bucket (the flight's write lost a race) and
    /// hand the reply to [`Commits::reread`].
    Reread,
    /// Read the bucket and hand the reply to [`Commits::waited`].
    Wait,
    /// The member's outcome: its decision as written (or, not allowed, as
    /// refused on the bucket's newest state), or the KV error that stopped it.
    Settled(Result<Decision, Error>),
}

/// The write in progress for one bucket.
#[derive(Debug)]
struct Flight {
    /// The member whose exchange makes the flight's calls.
    carrier: Member,
    /// Every member it writes for, in order (the carrier among them).
    members: Vec<Waiter>,
    /// Their decisions for the write in progress.
    decisions: Vec<Decision>,
    /// Compare-and-swaps lost so far.
    lost: u32,
    /// When its current call was made (monotonic clock, ns).
    since: u64,
    /// Wait replies seen since its current call was made.
    polls: usize,
    /// Members whose request ended before the flight did: their decisions
    /// stay (the TAT written includes them: dropping one could write a lower
    /// TAT than a decision already taken), but they get no outcome and do not
    /// go back in line.
    gone: Vec<Member>,
}

/// One bucket's flight, waiting requests and newest known state.
#[derive(Debug, Default)]
struct Key {
    seen: Option<Seen>,
    flight: Option<Flight>,
    queue: Vec<Waiter>,
}

impl Key {
    /// Keeps the newest of what is known and `s`. Versions come from one
    /// counter per namespace, so a higher one is newer; an absent bucket
    /// replaces nothing known (it may be a read older than a write).
    fn note(&mut self, s: Seen) {
        let newer = match (self.seen, s.version) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(old), Some(v)) => old.version.is_none_or(|o| v > o),
        };
        if newer {
            self.seen = Some(s);
        }
    }
}

/// Every bucket with a flight or waiting requests, and the outcomes settled
/// for members that have not taken them yet.
#[derive(Debug, Default)]
pub struct Commits {
    /// By bucket key (request data: the default, keyed hash).
    keys: HashMap<String, Key>,
    /// By member: ids this instance makes.
    outcomes: FxHashMap<Member, (Result<Decision, Error>, u64)>,
    /// When unclaimed outcomes were last swept.
    swept: u64,
}

impl Commits {
    /// `w` is ready to write bucket `key`, having read it as `seen`. It
    /// carries a new flight if none is out, else it waits.
    pub fn join(&mut self, key: &str, w: Waiter, seen: Seen, now: u64) -> Next {
        // A bucket already waited on is found without copying its key.
        let k = match self.keys.get_mut(key) {
            Some(k) => k,
            None => self.keys.entry(key.to_owned()).or_default(),
        };
        k.note(seen);
        k.queue.push(w);
        if k.flight.is_some() {
            return Next::Wait;
        }
        self.launch(key, w.member, now)
    }

    /// `w` is ready to write `key` without having read it: it joins if this
    /// instance is writing that bucket already (a flight decides on the
    /// newest state the instance knows, or reads it first, and a refusal
    /// there is an answer like one after a read); `None` if not (read first).
    pub fn join_unread(&mut self, key: &str, w: Waiter, now: u64) -> Option<Next> {
        let k = self.keys.get_mut(key)?;
        k.queue.push(w);
        if k.flight.is_some() {
            return Some(Next::Wait);
        }
        Some(self.launch(key, w.member, now))
    }

    /// The reply to a carrier's write (`Ok`: the new version).
    pub fn written(&mut self, key: &str, carrier: Member, r: Result<u64, Error>, now: u64) -> Next {
        let Some(k) = self.keys.get_mut(key) else {
            return self.take(carrier);
        };
        let Some(f) = k.flight.as_mut().filter(|f| f.carrier == carrier) else {
            // Given up as lost meanwhile: whatever it wrote counts, and the
            // member's outcome comes from the flight that replaced it.
            return self.take_or_wait(carrier);
        };
        match r {
            Ok(version) => {
                let tat = f
                    .decisions
                    .iter()
                    .filter(|d| d.allowed)
                    .map(|d| d.new_tat)
                    .max();
                let tat = tat.or(k.seen.and_then(|s| s.tat));
                // A waiter may have read a newer write of another instance.
                k.note(Seen {
                    version: Some(version),
                    tat,
                });
                self.settle_flight(key, Ok(()), now);
                self.take(carrier)
            }
            Err(Error::CasMismatch) => {
                // Another instance wrote: what is known is stale.
                f.lost += 1;
                f.since = now;
                f.polls = 0;
                k.seen = None;
                Next::Reread
            }
            Err(e) => {
                self.settle_flight(key, Err(e), now);
                self.take(carrier)
            }
        }
    }

    /// The reply to a carrier's re-read.
    pub fn reread(&mut self, key: &str, carrier: Member, r: Result<Seen, Error>, now: u64) -> Next {
        let carrying = self
            .keys
            .get(key)
            .and_then(|k| k.flight.as_ref())
            .is_some_and(|f| f.carrier == carrier);
        if !carrying {
            return self.take_or_wait(carrier);
        }
        match r {
            Ok(s) => {
                if let Some(k) = self.keys.get_mut(key) {
                    k.note(s);
                }
                self.decide(key, now)
            }
            Err(e) => {
                self.settle_flight(key, Err(e), now);
                self.take(carrier)
            }
        }
    }

    /// The reply to a waiting member's read. A failed read is the member's
    /// KV error: it stops waiting (reading again at once would spin while
    /// the store is down).
    pub fn waited(&mut self, key: &str, m: Member, r: Result<Seen, Error>, now: u64) -> Next {
        if let Some(out) = self.outcomes.remove(&m) {
            return Next::Settled(out.0);
        }
        let seen = match r {
            Ok(s) => s,
            Err(e) => {
                self.leave(key, m);
                return Next::Settled(Err(e));
            }
        };
        let Some(k) = self.keys.get_mut(key) else {
            return Next::Settled(Err(Error::Internal));
        };
        k.note(seen);
        let waiters = k.queue.len();
        if let Some(f) = &mut k.flight {
            f.polls += 1;
            let polled_out = f.polls > POLLS_PER_WAITER * (f.members.len() + waiters);
            if now.saturating_sub(f.since) < LOST_FLIGHT_NS && !polled_out {
                return Next::Wait;
            }
            self.requeue(key);
        }
        let Some(k) = self.keys.get(key) else {
            return Next::Settled(Err(Error::Internal));
        };
        if k.flight.is_some() {
            return Next::Wait;
        }
        if !k.queue.iter().any(|w| w.member == m) {
            return Next::Settled(Err(Error::Internal));
        }
        self.launch(key, m, now)
    }

    /// Member `m`'s request ends before its outcome (its exchange is gone):
    /// a flight it carries is given up (its members wait for the next one);
    /// it leaves the queue, and a flight another member carries writes its
    /// decision (already taken) but keeps no outcome for it.
    pub fn abandon(&mut self, key: &str, m: Member) {
        let carrying = self
            .keys
            .get(key)
            .and_then(|k| k.flight.as_ref())
            .is_some_and(|f| f.carrier == m);
        if carrying {
            self.requeue(key);
        }
        self.leave(key, m);
    }

    /// Gives `key`'s flight up: its members go back to the front of the
    /// queue, in their order, for the next flight to decide first.
    fn requeue(&mut self, key: &str) {
        let Some(k) = self.keys.get_mut(key) else {
            return;
        };
        if let Some(f) = k.flight.take() {
            let mut queue = f.members;
            queue.retain(|w| !f.gone.contains(&w.member));
            queue.append(&mut k.queue);
            k.queue = queue;
        }
        // Its write may have landed: only a read tells.
        k.seen = None;
    }

    /// Member `m` stops waiting (it failed, or commits on its own): out of
    /// the queue. In a flight, its decision is written anyway (which only
    /// counts it twice if it commits on its own) and it gets no outcome.
    pub fn leave(&mut self, key: &str, m: Member) {
        self.outcomes.remove(&m);
        if let Some(k) = self.keys.get_mut(key) {
            k.queue.retain(|w| w.member != m);
            if let Some(f) = &mut k.flight {
                if f.members.iter().any(|w| w.member == m) {
                    f.gone.push(m);
                }
            }
        }
        self.forget_if_idle(key);
    }

    /// Starts a flight carried by `carrier` for everyone queued on `key`.
    fn launch(&mut self, key: &str, carrier: Member, now: u64) -> Next {
        let Some(k) = self.keys.get_mut(key) else {
            return Next::Settled(Err(Error::Internal));
        };
        k.flight = Some(Flight {
            carrier,
            members: std::mem::take(&mut k.queue),
            decisions: Vec::new(),
            lost: 0,
            since: now,
            polls: 0,
            gone: Vec::new(),
        });
        if k.seen.is_none() {
            return Next::Reread;
        }
        self.decide(key, now)
    }

    /// Decides the flight's members on the newest known state and writes,
    /// or settles them all if none is admitted (or it is out of attempts).
    fn decide(&mut self, key: &str, now: u64) -> Next {
        let Some(k) = self.keys.get_mut(key) else {
            return Next::Settled(Err(Error::Internal));
        };
        let (Some(f), Some(seen)) = (k.flight.as_mut(), k.seen) else {
            return Next::Settled(Err(Error::Internal));
        };
        let carrier = f.carrier;
        let mut tat = seen.tat;
        let mut ttl_ns = 0;
        f.decisions.clear();
        for w in &f.members {
            let d = w.bucket.decide(tat, w.now);
            if d.allowed {
                tat = Some(d.new_tat);
                ttl_ns = ttl_ns.max(d.reset_ns);
            }
            f.decisions.push(d);
        }
        f.since = now;
        f.polls = 0;
        let admitted = f.decisions.iter().any(|d| d.allowed);
        if !admitted {
            // Refused on the newest state: answers, nothing to write.
            self.settle_flight(key, Ok(()), now);
            return self.take(carrier);
        }
        if f.lost >= FLIGHT_ATTEMPTS {
            // Out of attempts: a key hammered from many instances. Refusals
            // on this re-read are still answers. `cas-mismatch` (the last
            // attempt's), not a KV error of the store: the caller words it
            // as contention.
            self.settle_flight(key, Err(Error::CasMismatch), now);
            return self.take(carrier);
        }
        let cond = match seen.version {
            Some(v) => WriteCondition::IfVersion(v),
            None => WriteCondition::IfAbsent,
        };
        Next::Write {
            cond,
            tat: tat.unwrap_or_default(),
            ttl_ms: ceil_ms(ttl_ns),
        }
    }

    /// Ends `key`'s flight: each member's outcome is its decision (`Ok`) or,
    /// if admitted, the error (refusals stand either way).
    fn settle_flight(&mut self, key: &str, r: Result<(), Error>, now: u64) {
        let Some(f) = self.keys.get_mut(key).and_then(|k| k.flight.take()) else {
            return;
        };
        if now.saturating_sub(self.swept) >= LOST_FLIGHT_NS {
            // Outcomes a member never took (its exchange ended without
            // `on_done`): none is waited for this long.
            self.outcomes
                .retain(|_, (_, at)| now.saturating_sub(*at) < LOST_FLIGHT_NS);
            self.swept = now;
        }
        for (i, w) in f.members.iter().enumerate() {
            if f.gone.contains(&w.member) {
                continue;
            }
            let out = match (r, f.decisions.get(i)) {
                (Err(e), Some(d)) if d.allowed => Err(e),
                (_, Some(d)) => Ok(*d),
                // Never decided: the flight failed before its first write.
                (Err(e), None) => Err(e),
                (Ok(()), None) => Err(Error::Internal),
            };
            self.outcomes.insert(w.member, (out, now));
        }
        self.forget_if_idle(key);
    }

    /// `m`'s settled outcome; a carrier always has one when its flight ends.
    fn take(&mut self, m: Member) -> Next {
        match self.outcomes.remove(&m) {
            Some((out, _)) => Next::Settled(out),
            None => Next::Settled(Err(Error::Internal)),
        }
    }

    /// `m`'s outcome if settled, else it waits.
    fn take_or_wait(&mut self, m: Member) -> Next {
        match self.outcomes.remove(&m) {
            Some((out, _)) => Next::Settled(out),
            None => Next::Wait,
        }
    }

    /// Drops `key` once nothing is in flight or waiting (what is known of it
    /// is only a shortcut; the next request reads it anyway).
    fn forget_if_idle(&mut self, key: &str) {
        if self
            .keys
            .get(key)
            .is_some_and(|k| k.flight.is_none() && k.queue.is_empty())
        {
            self.keys.remove(key);
        }
    }

    /// Buckets with a flight or waiting requests (for tests).
    pub fn busy(&self) -> usize {
        self.keys.len()
    }

    /// Outcomes settled and not taken yet (for tests).
    pub fn unclaimed(&self) -> usize {
        self.outcomes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_000; // ns per token
    const NOW: u64 = 1_000_000;
    const KEY: &str = "a|192.0.2.1";

    fn waiter(token: u64, burst: u32) -> Waiter {
        Waiter {
            member: Member { token, pos: 0 },
            bucket: Bucket {
                interval_ns: T,
                burst,
            },
            now: NOW,
        }
    }

    fn m(token: u64) -> Member {
        Member { token, pos: 0 }
    }

    fn at(version: u64, tat: u64) -> Seen {
        Seen {
            version: Some(version),
            tat: Some(tat),
        }
    }

    fn settled(n: Next) -> Decision {
        match n {
            Next::Settled(Ok(d)) => d,
            other => panic!("not settled: {other:?}"),
        }
    }

    /// Request 1's flight landed (version 1); request 2 carries the next
    /// flight, for itself and request 3.
    fn second_flight() -> Commits {
        let mut c = Commits::default();
        c.join(KEY, waiter(1, 10), Seen::ABSENT, NOW);
        c.join(KEY, waiter(2, 10), Seen::ABSENT, NOW);
        c.join(KEY, waiter(3, 10), Seen::ABSENT, NOW);
        settled(c.written(KEY, m(1), Ok(1), NOW));
        assert!(matches!(
            c.waited(KEY, m(2), Ok(at(1, NOW + T)), NOW),
            Next::Write { .. }
        ));
        c
    }

    #[test]
    fn requests_ready_during_a_write_share_the_next_one() {
        let mut c = Commits::default();
        // The first writes alone, on what it read.
        assert_eq!(
            c.join(KEY, waiter(1, 10), Seen::ABSENT, NOW),
            Next::Write {
                cond: WriteCondition::IfAbsent,
                tat: NOW + T,
                ttl_ms: 1,
            }
        );
        // Three more read the same (old) state meanwhile: they wait.
        for t in 2..=4 {
            assert_eq!(c.join(KEY, waiter(t, 10), Seen::ABSENT, NOW), Next::Wait);
        }
        // A wait answered before the write: still waiting.
        assert_eq!(c.waited(KEY, m(2), Ok(Seen::ABSENT), NOW), Next::Wait);
        // The write lands: the carrier has its outcome.
        let d = settled(c.written(KEY, m(1), Ok(7), NOW));
        assert!(d.allowed);
        assert_eq!(d.new_tat, NOW + T);
        // The next waiter to hear carries all three, decided one after the
        // other on the TAT the first write left (not on what they read).
        assert_eq!(
            c.waited(KEY, m(3), Ok(at(7, NOW + T)), NOW),
            Next::Write {
                cond: WriteCondition::IfVersion(7),
                tat: NOW + 4 * T,
                ttl_ms: 1,
            }
        );
        assert_eq!(c.waited(KEY, m(2), Ok(at(7, NOW + T)), NOW), Next::Wait);
        let d3 = settled(c.written(KEY, m(3), Ok(8), NOW));
        let d2 = settled(c.waited(KEY, m(2), Ok(at(8, NOW + 4 * T)), NOW));
        let d4 = settled(c.waited(KEY, m(4), Ok(at(8, NOW + 4 * T)), NOW));
        assert_eq!(
            [d2.new_tat, d3.new_tat, d4.new_tat],
            [NOW + 2 * T, NOW + 3 * T, NOW + 4 * T]
        );
        assert_eq!([d2.remaining, d3.remaining, d4.remaining], [8, 7, 6]);
        assert_eq!((c.busy(), c.unclaimed()), (0, 0), "nothing left behind");
    }

    #[test]
    fn members_past_the_burst_are_refused_and_spend_nothing() {
        let mut c = Commits::default();
        assert!(matches!(
            c.join(KEY, waiter(1, 2), Seen::ABSENT, NOW),
            Next::Write { .. }
        ));
        for t in 2..=4 {
            assert_eq!(c.join(KEY, waiter(t, 2), Seen::ABSENT, NOW), Next::Wait);
        }
        settled(c.written(KEY, m(1), Ok(1), NOW));
        // One token left: the first in line gets it, the others are refused.
        assert_eq!(
            c.waited(KEY, m(2), Ok(at(1, NOW + T)), NOW),
            Next::Write {
                cond: WriteCondition::IfVersion(1),
                tat: NOW + 2 * T,
                ttl_ms: 1,
            }
        );
        assert!(settled(c.written(KEY, m(2), Ok(2), NOW)).allowed);
        let d3 = settled(c.waited(KEY, m(3), Ok(at(2, NOW + 2 * T)), NOW));
        let d4 = settled(c.waited(KEY, m(4), Ok(at(2, NOW + 2 * T)), NOW));
        assert!(!d3.allowed && !d4.allowed);
        assert_eq!(d3.retry_after_ns, T);
    }

    #[test]
    fn a_flight_refused_whole_writes_nothing() {
        let mut c = Commits::default();
        // The bucket is empty already (another instance).
        let full = at(3, NOW + 2 * T);
        let d = settled(c.join(KEY, waiter(1, 2), full, NOW));
        assert!(!d.allowed);
        assert_eq!(c.busy(), 0);
    }

    #[test]
    fn a_lost_race_rereads_and_decides_the_flight_again() {
        let mut c = Commits::default();
        assert!(matches!(
            c.join(KEY, waiter(1, 2), at(1, NOW), NOW),
            Next::Write { .. }
        ));
        assert_eq!(c.join(KEY, waiter(2, 2), at(1, NOW), NOW), Next::Wait);
        assert_eq!(
            c.written(KEY, m(1), Err(Error::CasMismatch), NOW),
            Next::Reread
        );
        // Another instance took a token meanwhile.
        assert_eq!(
            c.reread(KEY, m(1), Ok(at(5, NOW + T)), NOW),
            Next::Write {
                cond: WriteCondition::IfVersion(5),
                tat: NOW + 2 * T,
                ttl_ms: 1,
            }
        );
        let d = settled(c.written(KEY, m(1), Ok(6), NOW));
        assert_eq!(d.remaining, 0);
        // The second waited for the next flight (it joined while this one
        // was out), which finds the bucket empty.
        assert!(!settled(c.waited(KEY, m(2), Ok(at(6, NOW + 2 * T)), NOW)).allowed);
    }

    #[test]
    fn out_of_attempts_is_an_error_for_the_admitted_only() {
        let mut c = Commits::default();
        let mut next = c.join(KEY, waiter(1, 10), at(1, NOW), NOW);
        for v in 2..=u64::from(FLIGHT_ATTEMPTS) + 1 {
            assert!(matches!(next, Next::Write { .. }), "{next:?}");
            assert_eq!(
                c.written(KEY, m(1), Err(Error::CasMismatch), NOW),
                Next::Reread
            );
            next = c.reread(KEY, m(1), Ok(at(v, NOW)), NOW);
        }
        assert_eq!(next, Next::Settled(Err(Error::CasMismatch)));
        assert_eq!(c.busy(), 0);
    }

    #[test]
    fn a_failed_write_fails_every_member() {
        let mut c = Commits::default();
        c.join(KEY, waiter(1, 10), Seen::ABSENT, NOW);
        c.join(KEY, waiter(2, 10), Seen::ABSENT, NOW);
        settled(c.written(KEY, m(1), Ok(1), NOW));
        assert!(matches!(
            c.waited(KEY, m(2), Ok(at(1, NOW + T)), NOW),
            Next::Write { .. }
        ));
        assert_eq!(
            c.written(KEY, m(2), Err(Error::Unavailable), NOW),
            Next::Settled(Err(Error::Unavailable))
        );
        assert_eq!((c.busy(), c.unclaimed()), (0, 0));
    }

    #[test]
    fn a_failed_wait_is_the_members_error_and_it_leaves() {
        let mut c = Commits::default();
        c.join(KEY, waiter(1, 10), Seen::ABSENT, NOW);
        c.join(KEY, waiter(2, 10), Seen::ABSENT, NOW);
        assert_eq!(
            c.waited(KEY, m(2), Err(Error::Unavailable), NOW),
            Next::Settled(Err(Error::Unavailable))
        );
        settled(c.written(KEY, m(1), Ok(1), NOW));
        assert_eq!((c.busy(), c.unclaimed()), (0, 0));
    }

    #[test]
    fn a_carrier_that_goes_away_hands_its_flight_on() {
        let mut c = second_flight();
        // Its client is gone before the write's reply, which may have
        // landed or not: the next flight goes on what the next read says,
        // and its compare-and-swap finds out.
        c.abandon(KEY, m(2));
        assert_eq!(
            c.waited(KEY, m(3), Ok(at(1, NOW + T)), NOW),
            Next::Write {
                cond: WriteCondition::IfVersion(1),
                tat: NOW + 2 * T,
                ttl_ms: 1,
            }
        );
        // It had landed.
        assert_eq!(
            c.written(KEY, m(3), Err(Error::CasMismatch), NOW),
            Next::Reread
        );
        assert_eq!(
            c.reread(KEY, m(3), Ok(at(2, NOW + 2 * T)), NOW),
            Next::Write {
                cond: WriteCondition::IfVersion(2),
                tat: NOW + 3 * T,
                ttl_ms: 1,
            }
        );
        assert!(settled(c.written(KEY, m(3), Ok(3), NOW)).allowed);
        assert_eq!((c.busy(), c.unclaimed()), (0, 0));
    }

    #[test]
    fn a_flight_unanswered_for_too_long_is_given_up() {
        let mut c = Commits::default();
        c.join(KEY, waiter(1, 10), Seen::ABSENT, NOW);
        c.join(KEY, waiter(2, 10), Seen::ABSENT, NOW);
        assert_eq!(c.waited(KEY, m(2), Ok(Seen::ABSENT), NOW + 1), Next::Wait);
        let late = NOW + LOST_FLIGHT_NS;
        // The first's flight (with it in it) goes back in line; the waiter
        // carries the next, after a read.
        assert_eq!(c.waited(KEY, m(2), Ok(Seen::ABSENT), late), Next::Reread);
        assert!(matches!(
            c.reread(KEY, m(2), Ok(Seen::ABSENT), late),
            Next::Write { tat, .. } if tat == NOW + 2 * T
        ));
        // The first's reply, if it ever comes, belongs to a flight given up:
        // it waits for the one that replaced it.
        assert_eq!(c.written(KEY, m(1), Ok(1), late), Next::Wait);
        assert!(settled(c.written(KEY, m(2), Ok(2), late)).allowed);
        assert!(settled(c.waited(KEY, m(1), Ok(at(2, NOW + 2 * T)), late)).allowed);
        assert_eq!((c.busy(), c.unclaimed()), (0, 0));
    }

    #[test]
    fn members_gone_from_a_flight_neither_come_back_nor_leave_state() {
        let mut c = second_flight();
        // Both requests of the flight end (e.g. one HTTP/2 connection reset),
        // the one it carries for first.
        c.abandon(KEY, m(3));
        c.abandon(KEY, m(2));
        assert_eq!((c.busy(), c.unclaimed()), (0, 0));
        // Likewise when the carrier's write lands after the other left.
        c.join(KEY, waiter(4, 10), at(1, NOW + T), NOW);
        c.join(KEY, waiter(5, 10), at(1, NOW + T), NOW);
        settled(c.written(KEY, m(4), Ok(2), NOW));
        assert!(matches!(
            c.waited(KEY, m(5), Ok(at(2, NOW + 2 * T)), NOW),
            Next::Write { .. }
        ));
        c.join(KEY, waiter(6, 10), at(2, NOW + 2 * T), NOW);
        c.abandon(KEY, m(6));
        assert!(settled(c.written(KEY, m(5), Ok(3), NOW)).allowed);
        assert_eq!((c.busy(), c.unclaimed()), (0, 0));
    }

    #[test]
    fn waiters_stop_reading_a_flight_whose_call_never_ends() {
        let mut c = Commits::default();
        c.join(KEY, waiter(1, 10), Seen::ABSENT, NOW);
        c.join(KEY, waiter(2, 10), Seen::ABSENT, NOW);
        // The carrier's call was cancelled (its pause timed out) and its
        // exchange goes on: no reply, no `on_done` yet.
        let mut reads = 0;
        let next = loop {
            reads += 1;
            match c.waited(KEY, m(2), Ok(Seen::ABSENT), NOW) {
                Next::Wait => assert!(reads < 100, "still reading"),
                other => break other,
            }
        };
        assert!(matches!(next, Next::Reread), "{next:?}");
        assert!(reads <= POLLS_PER_WAITER * 2 + 1, "{reads} reads");
    }

    #[test]
    fn a_request_joins_a_bucket_being_written_without_reading_it() {
        let mut c = Commits::default();
        // Nobody writes the bucket: read it first.
        assert_eq!(c.join_unread(KEY, waiter(1, 10), NOW), None);
        assert!(matches!(
            c.join(KEY, waiter(1, 10), Seen::ABSENT, NOW),
            Next::Write { .. }
        ));
        // While it is written, another request joins at once and waits.
        assert_eq!(c.join_unread(KEY, waiter(2, 10), NOW), Some(Next::Wait));
        settled(c.written(KEY, m(1), Ok(1), NOW));
        // Between two flights, one joining unread carries the next, decided
        // on what the last write left.
        assert_eq!(
            c.join_unread(KEY, waiter(3, 10), NOW),
            Some(Next::Write {
                cond: WriteCondition::IfVersion(1),
                tat: NOW + 3 * T,
                ttl_ms: 1,
            })
        );
        assert!(settled(c.written(KEY, m(3), Ok(2), NOW)).allowed);
        assert_eq!(
            settled(c.waited(KEY, m(2), Ok(at(2, NOW + 3 * T)), NOW)).new_tat,
            NOW + 2 * T
        );
        assert_eq!((c.busy(), c.unclaimed()), (0, 0));
    }

    #[test]
    fn newer_versions_win_and_absent_replaces_nothing() {
        let mut k = Key::default();
        k.note(at(5, 50));
        k.note(at(4, 40));
        assert_eq!(k.seen, Some(at(5, 50)));
        k.note(Seen::ABSENT);
        assert_eq!(k.seen, Some(at(5, 50)));
        k.note(at(6, 60));
        assert_eq!(k.seen, Some(at(6, 60)));
    }
}

//! `ratelimit`: Legate's first-party rate-limit filter, a Wasm plugin built
//! with `legate-sdk`.
//!
//! Each configured limit is a token bucket (GCRA, [`gcra`]) per key, where the
//! key is built from request attributes ([`config::Descriptor`]). Buckets live
//! in a host KV namespace, so every worker (and, when the host backs the
//! namespace with Redis, every process) shares them. Updates are
//! compare-and-swap on the bucket's version with bounded retries (on Redis,
//! one write at a time per bucket and instance, shared by the requests ready
//! meanwhile: [`commit`]); a denied request writes nothing. Over a limit: `429` with a JSON body,
//! `Retry-After` and `RateLimit-*` headers. See `README.md` for the schema.

pub mod commit;
pub mod config;
pub mod gcra;

use std::cell::{Cell, RefCell};

use legate_sdk::kv::{Backend, CallId, Entry, Namespace, Reply, WriteCondition};
use legate_sdk::metrics::Counter;
use legate_sdk::{clock, Action, Error, Exchange, Headers, HttpFilter, LocalResponse, Setup};
use sha2::{Digest, Sha256};

use crate::commit::{Commits, Member, Next, Seen, Waiter};
use crate::config::{Config, Descriptor, FailureMode, HeaderNames, Limit};
use crate::gcra::{ceil_ms, ceil_secs, Decision};

/// Attempts at a compare-and-swap before the limit counts as a KV error. Each
/// conflict means another request was admitted (lock-free progress), so
/// running out takes a key hammered from many workers within microseconds.
pub const MAX_CAS_ATTEMPTS: u32 = 8;

/// Keys longer than this are replaced by a digest (the ABI caps keys at 512 B).
const MAX_KEY_LEN: usize = 512;

/// While KV calls keep failing, the log summarizes them at most this often
/// (after the first, logged in full).
pub const ERROR_SUMMARY_NS: u64 = 10_000_000_000;

/// Why a limit's check could not be made.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// The KV call failed (`unavailable`, `limit-exceeded` in memory...).
    Kv(Error),
    /// The bucket's compare-and-swap was lost this many times in a row.
    Contention(u32),
}

/// The KV errors of this instance, for the log: an episode is the errors
/// since the last successful KV call, but the warnings are paced by time
/// alone, at most one per [`ERROR_SUMMARY_NS`], whatever the episodes. When
/// failures and successes alternate (a full in-memory namespace: each new
/// bucket's read succeeds and its write fails; a flapping Redis), every
/// request is an episode of its own, and a line per episode was a line per
/// request.
#[derive(Debug, Default)]
struct ErrorEpisode {
    /// Monotonic time of the open episode's first error; `None`: no episode.
    since: Option<u64>,
    /// Whether the open episode has had a warning (then its end is logged).
    announced: bool,
    /// When the log last warned, of any episode.
    last_warn: Option<u64>,
    /// Errors since then not in a line yet (of any episode).
    unreported: u64,
    /// Errors of the open episode.
    total: u64,
}

/// The metric: `ratelimit_requests_total{limit, outcome}`.
pub const METRIC: &str = "ratelimit_requests_total";

/// Per-limit metric series, created in `configure`.
struct Series {
    allowed: Counter,
    limited: Counter,
    shadow_limited: Counter,
    error: Counter,
}

/// The filter: one per plugin instance (worker).
pub struct RateLimit {
    kv: Namespace,
    /// The namespace is remote (Redis): checks use asynchronous KV calls and
    /// pause the exchange, instead of holding up the worker.
    remote: bool,
    limits: Vec<Limit>,
    series: Vec<Series>,
    emit_headers: bool,
    header_names: HeaderNames,
    failure_mode: FailureMode,
    /// Which request attributes some limit uses: each is a host call per
    /// request, made only if needed.
    needs: Needs,
    /// Remote namespace: the buckets being written by this instance's
    /// requests, one write at a time per bucket ([`commit`]).
    commits: RefCell<Commits>,
    /// The last check's token (a check's identity in [`Commits`]).
    tokens: Cell<u64>,
    /// KV errors, logged once per episode.
    errors: RefCell<ErrorEpisode>,
}

/// The request attributes the limits use (in a match or a key).
#[derive(Debug, Default, Clone, Copy)]
struct Needs {
    method: bool,
    path: bool,
    route: bool,
}

impl Needs {
    fn of(limits: &[Limit]) -> Needs {
        let mut n = Needs::default();
        for l in limits {
            n.method |= !l.methods.is_empty();
            n.path |= l.prefix.is_some();
            n.route |= !l.routes.is_empty();
            for d in &l.key {
                match d {
                    Descriptor::Method => n.method = true,
                    Descriptor::Path => n.path = true,
                    Descriptor::Route => n.route = true,
                    _ => {}
                }
            }
        }
        n
    }
}

/// The `RateLimit-*` values of the most restrictive limit, kept from the
/// request phase for the response (only with `emit_headers`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    limit: u32,
    remaining: u32,
    reset_s: u64,
}

/// Per-exchange state.
#[derive(Debug, Default)]
pub struct Context {
    quota: Option<Quota>,
    /// A check waiting for asynchronous KV replies (a remote namespace).
    check: Option<Box<Check>>,
}

/// One limit's evaluation for the current request.
#[derive(Debug)]
struct Eval {
    idx: usize,
    key: String,
    /// The bucket's version as read (`None`: absent).
    version: Option<u64>,
    /// The decision for the state read (before the read: a default).
    decision: Decision,
    /// Its read failed (counted; the failure policy applied).
    dropped: bool,
    /// The TAT as read (`None`: absent).
    tat: Option<u64>,
}

/// The write phase 2 makes for `e`: its new TAT if the version read still
/// holds, expiring once the bucket would be full again (absent == full).
fn write_need(e: &Eval) -> Need {
    let cond = match e.version {
        Some(v) => WriteCondition::IfVersion(v),
        None => WriteCondition::IfAbsent,
    };
    Need::Write(cond, ceil_ms(e.decision.reset_ns))
}

impl HttpFilter for RateLimit {
    type Config = Config;
    type Context = Context;

    fn configure(config: Config) -> Result<Self, String> {
        let limits = config.validate()?;
        let kv = Namespace::open(&config.namespace).map_err(|e| {
            format!(
                "invalid config: field `namespace`: cannot open KV namespace {:?}: {e} \
                 (grant it in the plugin's capabilities.kv and configure it on the host)",
                config.namespace
            )
        })?;
        let total = Counter::define(
            METRIC,
            "Rate-limit verdicts per limit: allowed, limited, shadow_limited, error",
            &["limit", "outcome"],
        )
        .map_err(|e| format!("defining {METRIC}: {e}"))?;
        let mut series = Vec::with_capacity(limits.len());
        for l in &limits {
            let s = |outcome: &str| {
                total
                    .with_labels(&[&l.name, outcome])
                    .map_err(|e| format!("metric series {METRIC}{{{},{outcome}}}: {e}", l.name))
            };
            series.push(Series {
                allowed: s("allowed")?,
                limited: s("limited")?,
                shadow_limited: s("shadow_limited")?,
                error: s("error")?,
            });
        }
        Ok(RateLimit {
            remote: kv.backend() == Backend::Redis,
            kv,
            needs: Needs::of(&limits),
            limits,
            series,
            emit_headers: config.emit_headers,
            header_names: config.header_names,
            failure_mode: config.failure_mode,
            commits: RefCell::default(),
            tokens: Cell::new(0),
            errors: RefCell::default(),
        })
    }

    fn setup(&self) -> Setup {
        let s = Setup::new().on_request_headers();
        if self.emit_headers {
            s.on_response_headers()
        } else {
            s
        }
    }

    fn on_request_headers(
        &mut self,
        ctx: &mut Context,
        exchange: &Exchange<'_>,
        headers: &Headers<'_>,
        _end_of_stream: bool,
    ) -> Action {
        let (mut check, needs) = self.begin(exchange, headers);
        if self.remote {
            self.start_remote(&mut check, needs);
            if !check.waiting.is_empty() {
                ctx.check = Some(Box::new(check));
                return Action::Pause;
            }
        } else {
            self.run_blocking(&mut check, needs);
        }
        self.verdict(ctx, exchange, check)
    }

    fn on_kv_response(
        &mut self,
        ctx: &mut Context,
        exchange: &Exchange<'_>,
        id: CallId,
        reply: Result<Reply, Error>,
    ) -> Action {
        let Some(mut check) = ctx.check.take() else {
            return Action::Continue;
        };
        let Some(at) = check.waiting.iter().position(|(i, ..)| *i == id) else {
            ctx.check = Some(check);
            return Action::Pause;
        };
        let (_, pos, call) = check.waiting.swap_remove(at);
        let more = match call {
            Call::Read => self.on_read(&mut check, pos, got(reply)),
            Call::Flight | Call::Reread | Call::Wait => {
                let key = check.evals[pos].key.as_str();
                let m = check.member(pos);
                let now = clock::monotonic_now();
                let mut commits = self.commits.borrow_mut();
                let next = match (call, reply) {
                    (Call::Flight, Ok(Reply::Set(v))) => commits.written(key, m, Ok(v), now),
                    (Call::Flight, r) => commits.written(key, m, r.and(Err(Error::Internal)), now),
                    (_, r) => {
                        let s = got(r).and_then(|e| seen(e.as_ref()));
                        if call == Call::Reread {
                            commits.reread(key, m, s, now)
                        } else {
                            commits.waited(key, m, s, now)
                        }
                    }
                };
                drop(commits);
                self.proceed(&mut check, pos, next)
            }
        };
        self.start_async(&mut check, more);
        if !check.waiting.is_empty() {
            ctx.check = Some(check);
            return Action::Pause;
        }
        self.verdict(ctx, exchange, *check)
    }

    fn on_done(&mut self, ctx: Context) {
        // An exchange that ends while waiting on a bucket's write (the
        // client went away): a flight it carries must not hold up the rest.
        let Some(check) = ctx.check else {
            return;
        };
        let mut commits = self.commits.borrow_mut();
        for &(_, pos, call) in &check.waiting {
            if call != Call::Read {
                let m = check.member(pos);
                commits.abandon(&check.evals[pos].key, m);
            }
        }
    }

    fn on_response_headers(
        &mut self,
        ctx: &mut Context,
        exchange: &Exchange<'_>,
        headers: &Headers<'_>,
        _end_of_stream: bool,
    ) -> Action {
        if let Some(q) = ctx.quota.take() {
            for (name, value) in quota_headers(&q, self.header_names) {
                if let Err(e) = headers.set(name, value) {
                    legate_sdk::debug!("cannot set {name}: {e}");
                }
            }
        }
        // The last thing this filter does for the exchange: spares the host
        // the `on-done` call.
        let _ = exchange.detach();
        Action::Continue
    }
}

fn quota_headers(q: &Quota, names: HeaderNames) -> [(&'static str, String); 3] {
    let [limit, remaining, reset] = names.names();
    [
        (limit, q.limit.to_string()),
        (remaining, q.remaining.to_string()),
        (reset, q.reset_s.to_string()),
    ]
}

/// A KV call a [`Check`] needs next, for the evaluation at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Read the bucket (phase 1, or again after a lost compare-and-swap).
    Read,
    /// Write the admitted decision's TAT under this condition, with this TTL (ms).
    Write(WriteCondition, u64),
}

/// An asynchronous KV call a [`Check`] has out, for the evaluation at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// Phase 1's read of the bucket.
    Read,
    /// The write of a flight this check carries ([`commit`]).
    Flight,
    /// The re-read of a flight this check carries (its write lost a race).
    Reread,
    /// A read while this check waits for a flight's outcome.
    Wait,
}

/// One request's check in progress: phase 1 reads every matching limit's
/// bucket and decides; unless a limit refuses, phase 2 writes the admitted
/// decisions one limit at a time (compare-and-swap on the version read,
/// re-reading and re-deciding on conflict). A state machine over KV replies,
/// so the same steps run on synchronous KV calls (an in-memory namespace,
/// [`RateLimit::run_blocking`]) and on asynchronous ones, which a remote
/// namespace needs so that a Redis round trip does not hold up the worker
/// (the exchange pauses instead; [`RateLimit::on_kv_response`]).
#[derive(Debug, Default)]
pub struct Check {
    now: u64,
    evals: Vec<Eval>,
    /// Phase 1 reads not answered yet.
    reads_left: usize,
    /// A limit whose KV failure denies the request (`failure_mode: deny`).
    failed: Option<usize>,
    /// Phase 2: the position being written and its compare-and-swap attempts.
    writing: Option<(usize, u32)>,
    /// The most restrictive admitted limit's quota, with its reset.
    quota: Option<(Quota, u64)>,
    /// A limit another request emptied between our read and write.
    raced: Option<(usize, Decision)>,
    /// The verdict, once decided.
    done: Option<Action>,
    /// Identifies the check in the instance's [`Commits`].
    token: u64,
    /// Outstanding asynchronous calls: (id, position, what it asked).
    waiting: Vec<(CallId, usize, Call)>,
    /// Calls not started yet: the host allows 8 outstanding per exchange, and
    /// more limits than that may match a request.
    queued: std::collections::VecDeque<(usize, Need)>,
}

impl Check {
    /// Position `pos` of this check in the instance's [`Commits`].
    fn member(&self, pos: usize) -> Member {
        Member {
            token: self.token,
            pos,
        }
    }
}

impl RateLimit {
    /// Starts the check of a request: the matching limits with their bucket
    /// keys; every one needs a read.
    fn begin(&self, x: &Exchange<'_>, headers: &Headers<'_>) -> (Check, Vec<(usize, Need)>) {
        let now = clock::wall_now();
        // Unused attributes are left empty: no limit reads them.
        let method = if self.needs.method {
            x.method()
        } else {
            String::new()
        };
        let full_path = if self.needs.path {
            x.path()
        } else {
            String::new()
        };
        let path = full_path.split('?').next().unwrap_or_default();
        let route = if self.needs.route {
            x.route_name()
        } else {
            None
        };
        // Sized up front: a first push into an empty `Vec` takes the slower
        // growth path.
        let mut evals = Vec::with_capacity(self.limits.len());
        for (idx, l) in self.limits.iter().enumerate() {
            if !matches(l, &method, path, route.as_deref()) {
                continue;
            }
            let Some(key) = bucket_key(l, x, headers, &method, path, route.as_deref()) else {
                continue; // a descriptor is missing: the limit does not apply
            };
            evals.push(Eval {
                idx,
                key,
                version: None,
                decision: Decision::default(),
                dropped: false,
                tat: None,
            });
        }
        let needs = (0..evals.len()).map(|pos| (pos, Need::Read)).collect();
        let token = self.tokens.get().wrapping_add(1);
        self.tokens.set(token);
        let check = Check {
            now,
            token,
            reads_left: evals.len(),
            evals,
            ..Check::default()
        };
        (check, needs)
    }

    /// Runs `needs` (and the ones they lead to) with the synchronous KV calls.
    fn run_blocking(&self, c: &mut Check, needs: Vec<(usize, Need)>) {
        let mut queue = std::collections::VecDeque::from(needs);
        while let Some((pos, need)) = queue.pop_front() {
            let more = self.step_blocking(c, pos, need);
            queue.extend(more);
        }
    }

    /// One KV call with the synchronous API, and what it leads to.
    fn step_blocking(&self, c: &mut Check, pos: usize, need: Need) -> Vec<(usize, Need)> {
        let e = &c.evals[pos];
        match need {
            Need::Read => {
                let r = self.kv.get(&e.key);
                self.on_read(c, pos, r)
            }
            Need::Write(cond, ttl) => {
                let r = self
                    .kv
                    .set(&e.key, Digits::of(e.decision.new_tat), cond, Some(ttl));
                self.on_write(c, pos, r.map(|_| ()))
            }
        }
    }

    /// Starts `needs` (and, for those that cannot start, the ones they lead
    /// to) as asynchronous KV calls; past the host's limit of outstanding
    /// calls they wait in `queued` for a reply to free a slot. A write joins
    /// the bucket's group commit ([`commit`]).
    fn start_async(&self, c: &mut Check, needs: Vec<(usize, Need)>) {
        let mut queue = std::mem::take(&mut c.queued);
        queue.extend(needs);
        while let Some((pos, need)) = queue.pop_front() {
            let more = match need {
                Need::Read => match self.kv.start_get(&c.evals[pos].key) {
                    Ok(id) => {
                        c.waiting.push((id, pos, Call::Read));
                        Vec::new()
                    }
                    Err(Error::LimitExceeded) if !c.waiting.is_empty() => {
                        queue.push_front((pos, need));
                        c.queued = queue;
                        return;
                    }
                    Err(Error::LimitExceeded) => {
                        // The instance has as many calls out as the host
                        // allows (other exchanges' calls) and none of ours
                        // would free a slot: this one waits for Redis on the
                        // worker rather than going unchecked.
                        self.step_blocking(c, pos, need)
                    }
                    Err(err) => self.on_read(c, pos, Err(err)),
                },
                Need::Write(..) => {
                    let e = &c.evals[pos];
                    let w = self.waiter(c, pos);
                    let s = Seen {
                        version: e.version,
                        tat: e.tat,
                    };
                    let next = self
                        .commits
                        .borrow_mut()
                        .join(&e.key, w, s, clock::monotonic_now());
                    self.proceed(c, pos, next)
                }
            };
            queue.extend(more);
        }
    }

    /// Starts a check on a remote namespace. A request with one limit whose
    /// bucket this instance is writing already joins that group at once
    /// instead of reading first: on a hot bucket, one round trip fewer.
    fn start_remote(&self, c: &mut Check, needs: Vec<(usize, Need)>) {
        if let [e] = c.evals.as_slice() {
            let w = self.waiter(c, 0);
            let joined = self
                .commits
                .borrow_mut()
                .join_unread(&e.key, w, clock::monotonic_now());
            if let Some(next) = joined {
                c.reads_left = 0;
                c.writing = Some((0, 0));
                let more = self.proceed(c, 0, next);
                self.start_async(c, more);
                return;
            }
        }
        self.start_async(c, needs);
    }

    /// Position `pos` of check `c` as a request ready to write its bucket.
    fn waiter(&self, c: &Check, pos: usize) -> Waiter {
        Waiter {
            member: c.member(pos),
            bucket: self.limits[c.evals[pos].idx].bucket,
            now: c.now,
        }
    }

    /// Acts on what the group commit says of position `pos`: makes the call
    /// (the needs that follow from a call that cannot be made), or takes the
    /// outcome (the needs that follow from it).
    fn proceed(&self, c: &mut Check, pos: usize, mut next: Next) -> Vec<(usize, Need)> {
        loop {
            let key = c.evals[pos].key.as_str();
            let m = c.member(pos);
            let (call, started) = match next {
                Next::Settled(Ok(d)) => {
                    c.evals[pos].decision = d;
                    self.written(c, pos);
                    return self.write_next(c);
                }
                Next::Settled(Err(err)) => return self.write_failed(c, pos, err),
                Next::Write { cond, tat, ttl_ms } => (
                    Call::Flight,
                    self.kv.start_set(key, Digits::of(tat), cond, Some(ttl_ms)),
                ),
                Next::Reread => (Call::Reread, self.kv.start_get(key)),
                Next::Wait => (Call::Wait, self.kv.start_get(key)),
            };
            let err = match started {
                Ok(id) => {
                    c.waiting.push((id, pos, call));
                    return Vec::new();
                }
                Err(err) => err,
            };
            // The call cannot go out. A flight's call is made synchronously
            // instead when the host has no slot (others wait on it), and
            // fails the flight otherwise; a waiting check that cannot wait
            // leaves and writes on its own, synchronously.
            let now = clock::monotonic_now();
            let mut commits = self.commits.borrow_mut();
            next = match (call, err) {
                (Call::Flight, Error::LimitExceeded) => {
                    let Next::Write { cond, tat, ttl_ms } = next else {
                        return Vec::new();
                    };
                    let r = self.kv.set(key, Digits::of(tat), cond, Some(ttl_ms));
                    commits.written(key, m, r, now)
                }
                (Call::Flight, err) => commits.written(key, m, Err(err), now),
                (Call::Reread, Error::LimitExceeded) => {
                    let r = self.kv.get(key);
                    commits.reread(key, m, r.and_then(|e| seen(e.as_ref())), now)
                }
                (Call::Reread, err) => commits.reread(key, m, Err(err), now),
                (Call::Wait, Error::LimitExceeded) => {
                    // The rest of the check runs on the worker, as above.
                    commits.leave(key, m);
                    drop(commits);
                    c.writing = Some((pos, 0));
                    self.run_blocking(c, vec![(pos, Need::Read)]);
                    return Vec::new();
                }
                (Call::Wait | Call::Read, err) => commits.waited(key, m, Err(err), now),
            };
        }
    }

    /// A bucket read (phase 1, or a re-read after a lost compare-and-swap).
    fn on_read(
        &self,
        c: &mut Check,
        pos: usize,
        r: Result<Option<Entry>, Error>,
    ) -> Vec<(usize, Need)> {
        let l = &self.limits[c.evals[pos].idx];
        let read = r
            .and_then(|entry| seen(entry.as_ref()))
            .map(|s| (s.version, s.tat, l.bucket.decide(s.tat, c.now)));
        if c.writing.is_some() {
            return match read {
                Ok((version, tat, decision)) => {
                    let e = &mut c.evals[pos];
                    e.version = version;
                    e.tat = tat;
                    e.decision = decision;
                    if decision.allowed && c.writing.is_some_and(|(_, a)| a >= MAX_CAS_ATTEMPTS) {
                        // Out of attempts: a key hammered from many workers.
                        // The last attempt's `cas-mismatch` is the error
                        // (`kv_error` words it as contention).
                        self.write_failed(c, pos, Error::CasMismatch)
                    } else if decision.allowed {
                        vec![(pos, write_need(e))]
                    } else {
                        // Another request took the last token: an answer.
                        self.written(c, pos);
                        self.write_next(c)
                    }
                }
                Err(err) => self.write_failed(c, pos, err),
            };
        }
        match read {
            Ok((version, tat, decision)) => {
                self.kv_ok();
                let e = &mut c.evals[pos];
                e.version = version;
                e.tat = tat;
                e.decision = decision;
            }
            Err(err) => {
                let e = &mut c.evals[pos];
                e.dropped = true;
                c.failed = self.kv_error(e.idx, &e.key, Failure::Kv(err)).or(c.failed);
            }
        }
        c.reads_left -= 1;
        if c.reads_left > 0 {
            return Vec::new();
        }
        self.after_reads(c)
    }

    /// Phase 1 is complete: refuse, or start writing.
    fn after_reads(&self, c: &mut Check) -> Vec<(usize, Need)> {
        if let Some(idx) = c.failed {
            c.done = Some(self.unavailable(idx));
            return Vec::new();
        }
        let live = || c.evals.iter().filter(|e| !e.dropped);
        let blocked = live()
            .filter(|e| !e.decision.allowed && !self.limits[e.idx].shadow)
            .max_by_key(|e| e.decision.retry_after_ns)
            .map(|e| (e.idx, e.decision));
        if let Some((idx, decision)) = blocked {
            // Nothing is consumed: a rejected request costs no other limit a token.
            for e in live() {
                self.count_verdict(e.idx, e.decision.allowed);
            }
            c.done = Some(self.too_many(idx, &decision));
            return Vec::new();
        }
        c.writing = Some((0, 0));
        self.write_next(c)
    }

    /// Phase 2: the next write, from the current position on (`writing`);
    /// none when every admitted limit is written.
    fn write_next(&self, c: &mut Check) -> Vec<(usize, Need)> {
        let Some((mut pos, attempts)) = c.writing else {
            return Vec::new();
        };
        while let Some(e) = c.evals.get(pos) {
            let shadow = self.limits[e.idx].shadow;
            if e.dropped {
            } else if !e.decision.allowed {
                self.count_verdict(e.idx, false); // shadow only, see `after_reads`
            } else if c.raced.is_some() && !shadow {
                // Refused by a race already: the rest spend no token.
                self.count_verdict(e.idx, true);
            } else {
                c.writing = Some((pos, attempts));
                return vec![(pos, write_need(e))];
            }
            pos += 1;
        }
        c.writing = None;
        Vec::new()
    }

    /// A write's reply.
    fn on_write(&self, c: &mut Check, pos: usize, r: Result<(), Error>) -> Vec<(usize, Need)> {
        match r {
            Ok(()) => {
                self.written(c, pos);
                self.write_next(c)
            }
            Err(Error::CasMismatch) => {
                // Re-read and re-decide: the last attempt's re-read may still
                // find a refusal, which is an answer, not an error (that
                // `failure_mode: allow` would let through).
                let attempts = c.writing.map_or(0, |(_, a)| a) + 1;
                c.writing = Some((pos, attempts));
                vec![(pos, Need::Read)]
            }
            Err(err) => self.write_failed(c, pos, err),
        }
    }

    /// A write (or its re-read) failed: the failure policy decides.
    /// `cas-mismatch` here is a compare-and-swap lost on every attempt: the
    /// check's own ([`MAX_CAS_ATTEMPTS`], counted in `writing`) or its
    /// group's ([`commit::FLIGHT_ATTEMPTS`]).
    fn write_failed(&self, c: &mut Check, pos: usize, err: Error) -> Vec<(usize, Need)> {
        let e = &c.evals[pos];
        let failure = match (err, c.writing) {
            (Error::CasMismatch, Some((_, attempts))) if attempts > 0 => {
                Failure::Contention(attempts)
            }
            (Error::CasMismatch, _) => Failure::Contention(commit::FLIGHT_ATTEMPTS),
            (err, _) => Failure::Kv(err),
        };
        if let Some(idx) = self.kv_error(e.idx, &e.key, failure) {
            c.done = Some(self.unavailable(idx));
            c.writing = None;
            return Vec::new();
        }
        c.writing = Some((pos + 1, 0));
        self.write_next(c)
    }

    /// Limit `pos` has its final decision (written, or refused by a race):
    /// counted, and the quota or the race kept; the next position is next.
    fn written(&self, c: &mut Check, pos: usize) {
        self.kv_ok();
        c.writing = Some((pos + 1, 0));
        let e = &c.evals[pos];
        let l = &self.limits[e.idx];
        self.count_verdict(e.idx, e.decision.allowed);
        if l.shadow {
            return;
        }
        if !e.decision.allowed {
            if c.raced
                .is_none_or(|(_, d)| d.retry_after_ns < e.decision.retry_after_ns)
            {
                c.raced = Some((e.idx, e.decision));
            }
            return;
        }
        let q = Quota {
            limit: l.bucket.burst,
            remaining: e.decision.remaining,
            reset_s: ceil_secs(e.decision.reset_ns),
        };
        let more_restrictive = match c.quota {
            None => true,
            Some((best, reset)) => {
                (q.remaining, std::cmp::Reverse(e.decision.reset_ns))
                    < (best.remaining, std::cmp::Reverse(reset))
            }
        };
        if more_restrictive {
            c.quota = Some((q, e.decision.reset_ns));
        }
    }

    /// The verdict of a finished check. Without response headers to add,
    /// the filter has nothing more to do for the exchange and detaches.
    fn verdict(&self, ctx: &mut Context, x: &Exchange<'_>, c: Check) -> Action {
        let action = if let Some(done) = c.done {
            done
        } else if let Some((idx, d)) = c.raced {
            self.too_many(idx, &d)
        } else {
            if self.emit_headers {
                ctx.quota = c.quota.map(|(q, _)| q);
            }
            Action::Continue
        };
        if ctx.quota.is_none() {
            // Nothing is outstanding now, so this cannot fail.
            let _ = x.detach();
        }
        action
    }

    fn count_verdict(&self, idx: usize, allowed: bool) {
        let s = &self.series[idx];
        match (allowed, self.limits[idx].shadow) {
            (true, _) => s.allowed.inc(),
            (false, true) => s.shadow_limited.inc(),
            (false, false) => s.limited.inc(),
        }
    }

    /// Count and log a KV failure; `Some(idx)` if it must deny the request.
    /// Every failure is counted (`outcome="error"`); the log has at most one
    /// warning per [`ERROR_SUMMARY_NS`]: the first error of an episode, or a
    /// summary of the errors since the last warning; and a line when a KV
    /// call succeeds again after an episode that was warned of. With Redis
    /// down, each request fails, and a line each made tens of thousands a
    /// second; with a full namespace, reads succeed and writes fail, and a
    /// line per episode was two lines per request.
    fn kv_error(&self, idx: usize, key: &str, failure: Failure) -> Option<usize> {
        let l = &self.limits[idx];
        self.series[idx].error.inc();
        let what = match failure {
            Failure::Kv(e) => format!("KV error on bucket {key:?}: {e}"),
            Failure::Contention(n) => format!(
                "compare-and-swap lost {n} times in a row (contention on bucket {key:?}: \
                 other workers or processes kept writing it)"
            ),
        };
        let now = clock::monotonic_now();
        let mut ep = self.errors.borrow_mut();
        if ep.since.is_none() {
            ep.since = Some(now);
            ep.announced = false;
            ep.total = 0;
        }
        ep.total += 1;
        let quiet = ep
            .last_warn
            .is_some_and(|w| now.saturating_sub(w) < ERROR_SUMMARY_NS);
        if quiet {
            ep.unreported += 1;
        } else if ep.announced {
            legate_sdk::warn!(
                "{} more KV errors in the last {}s; the latest: limit {:?}: {what}; \
                 failure_mode {}",
                ep.unreported + 1,
                now.saturating_sub(ep.last_warn.unwrap_or(now)) / 1_000_000_000,
                l.name,
                self.failure_mode.as_str()
            );
            ep.last_warn = Some(now);
            ep.unreported = 0;
        } else {
            // The first line of an episode; errors of earlier episodes too
            // short to be logged (the pace held them back) are told with it.
            let earlier = match (ep.unreported, ep.last_warn) {
                (0, _) | (_, None) => String::new(),
                (n, Some(w)) => format!(
                    "; {n} more KV errors in the last {}s, between KV calls that succeeded",
                    now.saturating_sub(w) / 1_000_000_000
                ),
            };
            legate_sdk::warn!(
                "limit {:?}: {what}; failure_mode {} (further KV errors are counted \
                 in legate_plugin_{METRIC}{{outcome=\"error\"}} and logged at most \
                 every {}s){earlier}",
                l.name,
                self.failure_mode.as_str(),
                ERROR_SUMMARY_NS / 1_000_000_000
            );
            ep.announced = true;
            ep.last_warn = Some(now);
            ep.unreported = 0;
        }
        (self.failure_mode == FailureMode::Deny && !l.shadow).then_some(idx)
    }

    /// A KV call succeeded: an episode of errors, if any, is over; logged if
    /// its start was (an episode the pace kept quiet ends quietly, its
    /// errors told by the next warning).
    fn kv_ok(&self) {
        let mut ep = self.errors.borrow_mut();
        if let Some(since) = ep.since.take() {
            if ep.announced {
                legate_sdk::info!(
                    "KV calls succeed again, after {} KV errors in {}s",
                    ep.total,
                    clock::monotonic_now().saturating_sub(since) / 1_000_000_000
                );
                // Its errors were in lines (the first, the summaries) or are
                // in this one.
                ep.unreported = 0;
            }
            ep.announced = false;
            ep.total = 0;
        }
    }

    fn unavailable(&self, idx: usize) -> Action {
        let body = serde_json::json!({
            "error": "rate_limit_unavailable",
            "limit": self.limits[idx].name,
        });
        Action::Respond(
            LocalResponse::new(503)
                .header("content-type", "application/json")
                .header("retry-after", "1")
                .body(format!("{body}\n"))
                .details("rate_limit_unavailable"),
        )
    }

    fn too_many(&self, idx: usize, d: &Decision) -> Action {
        let l = &self.limits[idx];
        let retry = ceil_secs(d.retry_after_ns).max(1);
        let body = serde_json::json!({
            "error": "rate_limited",
            "limit": l.name,
            "retry_after_s": retry,
        });
        let q = Quota {
            limit: l.bucket.burst,
            remaining: 0,
            reset_s: ceil_secs(d.reset_ns),
        };
        let mut r = LocalResponse::new(429)
            .header("content-type", "application/json")
            .header("retry-after", retry.to_string());
        for (name, value) in quota_headers(&q, self.header_names) {
            r = r.header(name, value);
        }
        Action::Respond(r.body(format!("{body}\n")).details("rate_limited"))
    }
}

fn matches(l: &Limit, method: &str, path: &str, route: Option<&str>) -> bool {
    l.prefix.as_deref().is_none_or(|p| path.starts_with(p))
        && (l.methods.is_empty() || l.methods.iter().any(|m| m == method))
        && (l.routes.is_empty() || route.is_some_and(|r| l.routes.iter().any(|x| x == r)))
}

/// `name@INTERVALxBURST|v1|v2…` with each value escaped so values cannot forge
/// separators (nor the `#` of a digest key); `None` if a descriptor has no
/// value for this request.
fn bucket_key(
    l: &Limit,
    x: &Exchange<'_>,
    headers: &Headers<'_>,
    method: &str,
    path: &str,
    route: Option<&str>,
) -> Option<String> {
    // Room for the usual descriptors (an IPv6 address, a short header):
    // growing the key as it is built reallocated it two or three times.
    let mut key = String::with_capacity(l.key_prefix.len() + 64);
    key.push_str(&l.key_prefix);
    for d in &l.key {
        key.push('|');
        match d {
            // An IPv4 client on a dual-stack socket is one bucket either way.
            Descriptor::ClientIp { v4, v6 } => {
                push_network(&mut key, x.source_address().ip().to_canonical(), *v4, *v6)
            }
            Descriptor::Method => escape_into(&mut key, method.as_bytes()),
            Descriptor::Path => escape_into(&mut key, path.as_bytes()),
            Descriptor::Route => escape_into(&mut key, route?.as_bytes()),
            Descriptor::Authority => push_host(&mut key, &x.authority()),
            Descriptor::Header(h) => escape_into(&mut key, &headers.get(h)?),
        }
    }
    if key.len() > MAX_KEY_LEN {
        let digest = Sha256::digest(key.as_bytes());
        let mut short = l.key_prefix.clone();
        short.push_str("|#");
        for b in digest {
            short.push_str(&format!("{b:02x}"));
        }
        return Some(short);
    }
    Some(key)
}

/// `ip`'s network of `v4` (IPv4) or `v6` (IPv6) prefix bits: the network
/// address and `/LEN`, or the address alone when all its bits are kept (the
/// key `client_ip` has always had).
fn push_network(out: &mut String, ip: std::net::IpAddr, v4: u8, v6: u8) {
    use std::fmt::Write;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match ip {
        IpAddr::V4(a) if v4 < 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(v4)).unwrap_or(0);
            push_ip(out, IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)));
            let _ = write!(out, "/{v4}");
        }
        IpAddr::V6(a) if v6 < 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(v6)).unwrap_or(0);
            push_ip(out, IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)));
            let _ = write!(out, "/{v6}");
        }
        ip => push_ip(out, ip),
    }
}

/// `ip` as its `Display` writes it, IPv4 digit by digit: the formatting
/// machinery costs more than the rest of the key.
fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// The host of an authority as routing sees it (virtual hosts match without
/// case and with or without the port), so `A.example:80` and `a.example` are
/// one bucket, as they are one virtual host: lower case, the port and one
/// trailing dot dropped.
fn push_host(out: &mut String, authority: &str) {
    let host = match authority.strip_prefix('[') {
        // An IPv6 literal: up to its `]`.
        Some(rest) => rest
            .find(']')
            .map_or(authority, |end| &authority[..end + 2]),
        None => authority
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(authority, |(host, _)| host),
    };
    // One trailing dot (a fully qualified name) is the same host, as routing
    // treats it.
    let host = match host.strip_suffix('.') {
        Some(h) if !h.is_empty() && !h.ends_with('.') => h,
        _ => host,
    };
    escape_into(out, host.to_ascii_lowercase().as_bytes());
}

/// Printable ASCII except `%`, `|` and `#` as is; everything else as `%XX`.
fn escape_into(out: &mut String, v: &[u8]) {
    for &b in v {
        if (0x21..0x7f).contains(&b) && b != b'%' && b != b'|' && b != b'#' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// A read's reply: the entry, or the error (a reply of another kind is a
/// host bug, `internal`).
fn got(reply: Result<Reply, Error>) -> Result<Option<Entry>, Error> {
    match reply? {
        Reply::Get(entry) => Ok(entry),
        _ => Err(Error::Internal),
    }
}

/// A bucket's entry as read: its version and TAT (a value that is no TAT:
/// `invalid-argument`, a KV error for the limit).
fn seen(entry: Option<&Entry>) -> Result<Seen, Error> {
    match entry {
        None => Ok(Seen::ABSENT),
        Some(e) => Ok(Seen {
            version: Some(e.version),
            tat: Some(decode(&e.value)?),
        }),
    }
}

/// A stored TAT: ASCII decimal Unix nanoseconds. Read digit by digit when it
/// has at most 19 (every TAT until the year 2286), which cannot overflow a
/// `u64`: `str::parse` checks each digit's multiplication for overflow, and on
/// wasm32 that check is a 128-bit multiplication call per digit (~1.4k
/// instructions per read). Anything else goes through `str::parse`.
fn decode(v: &[u8]) -> Result<u64, Error> {
    if !v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit) {
        return Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
    }
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Error::InvalidArgument)
}

/// A `u64` in decimal, on the stack: what [`decode`] reads back, without
/// `to_string`'s formatting machinery and allocation.
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn of(mut n: u64) -> Self {
        let mut buf = [0u8; 20];
        let mut start = buf.len();
        loop {
            start -= 1;
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Digits { buf, start }
    }
}

impl AsRef<[u8]> for Digits {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

legate_sdk::export!(RateLimit);

#[cfg(test)]
mod tests {
    use super::{decode, push_ip, Digits};

    #[test]
    fn digits_write_what_to_string_writes() {
        for n in [0, 7, 10, 99, 100, 1_733_350_000_123_456_789, u64::MAX] {
            assert_eq!(Digits::of(n).as_ref(), n.to_string().as_bytes(), "{n}");
            assert_eq!(decode(Digits::of(n).as_ref()).ok(), Some(n));
        }
    }

    #[test]
    fn stored_tats_decode_as_str_parse_reads_them() {
        for v in [
            "0",
            "7",
            "1733350000123456789",
            "9999999999999999999",
            "18446744073709551615",
            "+42",
            "007",
        ] {
            assert_eq!(decode(v.as_bytes()).ok(), v.parse::<u64>().ok(), "{v}");
        }
        for v in ["", "-1", "1.5", " 1", "18446744073709551616", "12a"] {
            assert!(decode(v.as_bytes()).is_err(), "{v:?}");
        }
    }

    #[test]
    fn client_ip_keys_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "1.20.255.7",
            "255.255.255.255",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut key = String::from("k|");
            push_ip(&mut key, ip);
            assert_eq!(key, format!("k|{ip}"));
        }
    }
}

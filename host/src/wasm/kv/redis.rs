//! [`RedisKv`]: the KV backend shared by Legate processes through one Redis
//! (`kv: {backend: redis, url: ...}`), so N proxies enforce one rate limit.
//!
//! Two ways in, one set of commands ([`Call`]):
//! - The synchronous KV hostcalls run inside a guest call on a worker thread, so
//!   they use the `redis` crate's blocking connections with every network step
//!   bounded: connect (handshake included), send and receive each wait at most
//!   `kv.timeout`, after which the guest gets `unavailable` and applies its own
//!   failure policy. A call never waits longer than that, whatever Redis does,
//!   but the worker waits with it.
//! - The asynchronous ones (`start-*`, abi/README.md §5.7) run on the worker's
//!   runtime over one multiplexed connection per worker thread, each call as a
//!   whole (connect included) bounded by the same `kv.timeout`; the worker
//!   serves other exchanges meanwhile.
//!
//! - Atomicity: every conditional write is one Lua script run server-side
//!   (compare version, write, bump version, set TTL), and increments use
//!   `HINCRBY` in a script that also sets the TTL of a new counter, so N processes
//!   never interleave inside one call. Scripts are sent by SHA (`EVALSHA`) and
//!   reloaded after a Redis restart lost them.
//! - Layout: an entry is a hash `PREFIX:NS:KEY` with fields `v` (value) and `n`
//!   (version); versions come from one counter per namespace, `PREFIX:NS#version`,
//!   so a version is never reused for a key (no ABA), as in memory. A write
//!   never gives an entry a version at or below the one it has, so even a lost
//!   counter (evicted, or not persisted across a restart or failover) cannot
//!   reissue a live entry's version; a deleted or expired key's old versions
//!   are safe only while the counter survives (persistence, and a
//!   `maxmemory-policy` of `noeviction` or `volatile-*`).
//! - Connections: an idle pool, one connection per concurrently calling worker.
//!   A connection that failed mid-call is dropped, and the idle ones with it
//!   (they share its fate). One that sat idle for [`STALE_AFTER`] is checked
//!   with a `PING` before use, so one Redis closed meanwhile (its `timeout`
//!   setting, a restart, a proxy in between) is replaced instead of failing a
//!   call. A failed connect and a read-only server (`READONLY`/`MASTERDOWN`: a
//!   demoted master keeps its clients; its connections are dropped so the next
//!   connect finds the new one) start an exponential backoff (100ms doubling
//!   to 2s) during which calls fail at once instead of each waiting for (or
//!   reconnecting to) a server that just failed; a successful call ends it.
//! - Timeouts are per call, as Envoy's are per request: a call that timed out
//!   fails alone. Its connection is replaced (it owes a reply that may still
//!   arrive; a blocking connection would hand it to the next call), the idle
//!   ones are kept, and there is no backoff: one slow reply must not switch
//!   KV off for the whole process (the ratelimit plugin would let every request
//!   through meanwhile). Timeouts and other error replies (OOM, NOPERM...) are
//!   logged once per episode (until a call succeeds).
//! - Stats (label `backend="redis"`): `legate_kv_operations_total{op}`,
//!   `legate_kv_errors_total` (calls that returned `unavailable`, timeouts
//!   included), `legate_kv_timeouts_total`, `legate_kv_reconnects_total`
//!   (connections made after one was lost or refused) and `legate_kv_up` (0
//!   from a failed connect or call, whatever the failure, to a successful call).
//!
//! Not enforced here, unlike in memory: the per-namespace entry and byte caps
//! (Redis's own `maxmemory` governs); key and value sizes are.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use ::redis::{ClientTlsConfig, TlsCertificates};
use std::collections::HashMap;

use ::redis::aio::MultiplexedConnection;
use ::redis::{from_redis_value, Connection, RedisError, RedisResult, Script, Value};

use super::{Condition, Entry, KvBackend, KvError, KvFuture, KvResult, Op, Reply};
use crate::stats::{Counter, Gauge, Stats};

/// First reconnect delay after a failed connect.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay: a recovered Redis is used again within 2s.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Idle connections kept; more concurrent callers than this connect anew.
const MAX_IDLE: usize = 64;
/// A pooled connection idle this long is checked (`PING`) before use. Redis's
/// `timeout` is whole seconds and closes only clients idle for more than that, so
/// one idle for less cannot have been closed by it; busy connections are never
/// checked (no extra round trip under load).
const STALE_AFTER: Duration = Duration::from_secs(1);

/// The next version for an entry whose current version is `cur` (`false`: a
/// new entry): the namespace's counter bumped, and never at or below `cur`,
/// so a counter lost while its entries stayed (evicted, or a restart or
/// failover without it) cannot hand out a version an entry already had.
const NEXT_VERSION: &str = r"
local function next_version(counter, cur)
  local ver = redis.call('INCR', counter)
  if cur and tonumber(cur) >= ver then
    ver = tonumber(cur) + 1
    redis.call('SET', counter, ver)
  end
  return ver
end
";

/// `set`: KEYS entry, version counter; ARGV value, mode (`a` always, `n` if
/// absent, `v` if version), expected version, TTL in ms (`0` = none).
const SET: &str = r"
local cur = redis.call('HGET', KEYS[1], 'n')
if ARGV[2] == 'n' and cur then return -1 end
if ARGV[2] == 'v' and cur ~= ARGV[3] then return -1 end
local ver = next_version(KEYS[2], cur)
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'n', ver)
if ARGV[4] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('PERSIST', KEYS[1])
end
return ver
";

/// `delete`: KEYS entry; ARGV mode (`a` always, `v` if version), expected version.
/// -1 = version mismatch, else how many keys were deleted.
const DELETE: &str = r"
if ARGV[1] == 'v' and redis.call('HGET', KEYS[1], 'n') ~= ARGV[2] then return -1 end
return redis.call('DEL', KEYS[1])
";

/// `increment`: KEYS entry, version counter; ARGV delta, TTL in ms for a new
/// counter (`0` = none). `{1, sum}`, or `{0}` if the value is not an integer or
/// the sum overflows (HINCRBY refuses both and changes nothing); any other
/// error (OOM, READONLY...) is Redis's error reply, `unavailable` to the guest.
/// The sum is read back as Redis stored it: HINCRBY's reply is a Lua number
/// (a double), exact only below 2^53.
const INCREMENT: &str = r"
local existed = redis.call('EXISTS', KEYS[1])
local sum = redis.pcall('HINCRBY', KEYS[1], 'v', ARGV[1])
if type(sum) == 'table' and sum.err then
  local e = sum.err
  if string.find(e, 'not an integer', 1, true) or string.find(e, 'overflow', 1, true)
     or string.find(e, 'WRONGTYPE', 1, true) then
    return {0}
  end
  return sum
end
if existed == 0 and ARGV[2] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
local ver = next_version(KEYS[2], redis.call('HGET', KEYS[1], 'n'))
redis.call('HSET', KEYS[1], 'n', ver)
return {1, redis.call('HGET', KEYS[1], 'v')}
";

/// Checks a `kv.url` without connecting; the reason if it is unusable.
pub fn check_url(url: &str) -> Result<(), String> {
    ::redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| format!("`{}` is not a usable Redis URL ({e})", redact(url)))
}

/// The URL with any user and password replaced, for messages and the admin
/// config dump: secrets are never logged or served. Both places the redis
/// crate reads them from are masked: the userinfo (`redis://user:pass@host`)
/// and, for `redis+unix://`, the `user`/`pass` query parameters.
pub(crate) fn redact(url: &str) -> String {
    // One masking for the config's error excerpts and these messages.
    crate::config::mask_url(url)
}

/// The gauge of Redis's state, 1 while the last call succeeded.
const UP: &str = "legate_kv_up";

struct KvStats {
    get: Counter,
    set: Counter,
    delete: Counter,
    increment: Counter,
    errors: Counter,
    timeouts: Counter,
    reconnects: Counter,
    up: Gauge,
}

impl KvStats {
    fn new(stats: &Stats) -> Self {
        let ops = |op: &str| {
            stats.counter(
                "legate_kv_operations_total",
                "Plugin KV calls sent to the backend.",
                &[("backend", "redis"), ("op", op)],
            )
        };
        let b = &[("backend", "redis")];
        KvStats {
            get: ops("get"),
            set: ops("set"),
            delete: ops("delete"),
            increment: ops("increment"),
            errors: stats.counter(
                "legate_kv_errors_total",
                "Plugin KV calls answered `unavailable` (backend down, timed out or failing).",
                b,
            ),
            timeouts: stats.counter(
                "legate_kv_timeouts_total",
                "Plugin KV calls that hit kv.timeout.",
                b,
            ),
            reconnects: stats.counter(
                "legate_kv_reconnects_total",
                "Connections to the KV backend made after one was lost or refused.",
                b,
            ),
            up: stats.gauge(
                UP,
                "1 while the last call to the KV backend succeeded (0 after a failed connect or call).",
                b,
            ),
        }
    }
}

/// Reconnect state.
#[derive(Default)]
struct Link {
    /// Consecutive failures that back off (connects refused or timed out, a
    /// read-only server) since the last successful call.
    failures: u32,
    /// No connect attempt before this.
    retry_at: Option<Instant>,
    /// A connection was lost or refused since the last one made.
    lost: bool,
    /// A server error reply was logged since the last successful call (one
    /// warning per episode, not one per call).
    erred: bool,
    /// A timed-out call was logged since the last successful call.
    timed_out: bool,
}

impl Link {
    /// Backs off after a failure: calls fail at once until `retry_at`.
    fn back_off(&mut self) {
        let delay = BACKOFF_MIN
            .saturating_mul(1 << self.failures.min(8))
            .min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + delay);
    }
}

/// Why a call did not reach Redis.
enum Down {
    Timeout,
    Unreachable,
}

/// The Redis backend. Cheap to share: one per loaded config.
pub struct RedisKv {
    client: ::redis::Client,
    timeout: Duration,
    prefix: String,
    /// Idle connections, with when each was last used.
    idle: Mutex<Vec<(Connection, Instant)>>,
    /// The async connections (`start-*` calls), one per worker thread.
    async_conns: Mutex<HashMap<std::thread::ThreadId, AsyncSlot>>,
    /// Async connections made so far: the next one's id.
    async_made: std::sync::atomic::AtomicU64,
    link: Mutex<Link>,
    /// Nothing in `link` for a successful call to reset: read without the
    /// lock on every call.
    settled: AtomicBool,
    set: Script,
    delete: Script,
    increment: Script,
    stats: KvStats,
}

impl RedisKv {
    /// A backend for `url` (checked, not connected: the first call connects).
    /// `tls`: the CA and client certificate of a `rediss://` URL, when not the
    /// defaults (system and Mozilla roots, no client certificate).
    pub fn new(
        url: &str,
        tls: Option<TlsCertificates>,
        timeout: Duration,
        prefix: &str,
        stats: &Arc<Stats>,
    ) -> anyhow::Result<Self> {
        check_url(url).map_err(|e| anyhow::anyhow!("kv.url: {e}"))?;
        // TCP_NODELAY, as most Redis clients set it: the async calls pipeline
        // small commands on one connection, which Nagle's algorithm may hold
        // back until the previous ones are acknowledged. (On loopback it made
        // no measurable difference: bench/README.md, "KV calls".)
        let info = ::redis::IntoConnectionInfo::into_connection_info(url).map(|i| {
            i.set_tcp_settings(::redis::io::tcp::TcpSettings::default().set_nodelay(true))
        });
        let client = match (info, tls) {
            (Ok(info), Some(tls)) => ::redis::Client::build_with_tls(info, tls),
            (Ok(info), None) => ::redis::Client::open(info),
            (Err(e), _) => Err(e),
        }
        .map_err(|e| anyhow::anyhow!("kv: cannot use {}: {e}", redact(url)))?;
        // A reload's backend replaces one whose calls know Redis's state:
        // the gauge keeps it (set to 1 here, a reload while Redis was down
        // reported it up until the next call). The process's first backend
        // sets 1: unknown until the first call, and 0 would claim it is down.
        let known = stats.gauge_value(UP, &[("backend", "redis")]).is_some();
        let stats = KvStats::new(stats);
        if !known {
            stats.up.set(1);
        }
        Ok(RedisKv {
            client,
            timeout,
            prefix: prefix.to_string(),
            idle: Mutex::default(),
            async_conns: Mutex::default(),
            async_made: std::sync::atomic::AtomicU64::new(0),
            link: Mutex::default(),
            settled: AtomicBool::new(true),
            set: Script::new(&format!("{NEXT_VERSION}{SET}")),
            delete: Script::new(DELETE),
            increment: Script::new(&format!("{NEXT_VERSION}{INCREMENT}")),
            stats,
        })
    }

    fn entry_key(&self, ns: &str, key: &str) -> String {
        // Namespace names cannot contain `:`, so `PREFIX:NS:KEY` is unambiguous
        // and never equals a version counter `PREFIX:NS#version`.
        format!("{}:{ns}:{key}", self.prefix)
    }

    fn version_key(&self, ns: &str) -> String {
        format!("{}:{ns}#version", self.prefix)
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection, or a new one unless backing off.
    fn connection(&self) -> Result<Connection, Down> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        if let Some((mut c, since)) = pooled {
            if since.elapsed() < STALE_AFTER {
                return Ok(c);
            }
            match ::redis::cmd("PING").query::<String>(&mut c) {
                Ok(_) => return Ok(c),
                Err(e) if e.is_timeout() => {
                    // Connected but silent: this call has waited its time. The
                    // connection owes the PING's reply, so it is dropped; the
                    // call fails alone (counted by the caller).
                    self.slow();
                    return Err(Down::Timeout);
                }
                Err(e) => {
                    // Closed while idle; so, likely, are the other idle ones
                    // (made to the same server): all dropped, one made anew.
                    tracing::debug!("kv: an idle Redis connection was closed ({e}); reconnecting");
                    self.idle
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clear();
                }
            }
        }
        if self.link().retry_at.is_some_and(|t| Instant::now() < t) {
            return Err(Down::Unreachable);
        }
        let made = self
            .client
            .get_connection_with_timeout(self.timeout)
            .and_then(|c| {
                c.set_read_timeout(Some(self.timeout))?;
                c.set_write_timeout(Some(self.timeout))?;
                Ok(c)
            });
        self.connected(made)
    }

    /// Records the outcome of a connect (blocking or async): a failure starts
    /// or extends the backoff and sets `legate_kv_up` to 0. A connect that
    /// succeeds does not end the backoff, nor set `legate_kv_up` to 1: a
    /// server that accepts connections but answers calls with errors (NOAUTH
    /// after a password change, NOPERM) is not up; a successful call ends
    /// both ([`RedisKv::succeeded`]).
    fn connected<C>(&self, made: RedisResult<C>) -> Result<C, Down> {
        let mut link = self.link();
        match made {
            Ok(c) => {
                if link.lost {
                    self.stats.reconnects.inc();
                    tracing::info!("kv: reconnected to Redis");
                }
                link.lost = false;
                link.retry_at = None;
                Ok(c)
            }
            Err(e) => {
                if link.failures == 0 {
                    tracing::warn!(
                        "kv: cannot connect to Redis ({e}); KV calls fail with `unavailable` \
                         while retrying with backoff"
                    );
                }
                link.back_off();
                self.settled.store(false, Ordering::Relaxed);
                link.lost = true;
                self.stats.up.set(0);
                Err(if e.is_timeout() {
                    Down::Timeout
                } else {
                    Down::Unreachable
                })
            }
        }
    }

    /// Runs `f` on a connection, counting it under `op`; every failure is
    /// `unavailable` to the guest.
    fn call<T>(
        &self,
        op: &Counter,
        f: impl FnOnce(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, KvError> {
        op.inc();
        let mut conn = match self.connection() {
            Ok(c) => c,
            Err(down) => return Err(self.down(down)),
        };
        match f(&mut conn) {
            Ok(v) => {
                self.succeeded();
                self.put_back(conn);
                Ok(v)
            }
            Err(e) => {
                self.failed(&e);
                if !broken(&e) {
                    // A server error reply (OOM, LOADING...): the connection is fine.
                    self.put_back(conn);
                }
                Err(KvError::Unavailable)
            }
        }
    }

    /// A call got its reply: Redis is up (again even without a reconnect:
    /// another worker's failure may have set it down while this connection
    /// still worked), and a backoff or logged error episode is over.
    fn succeeded(&self) {
        self.stats.up.set(1);
        if !self.settled.load(Ordering::Relaxed) {
            let mut link = self.link();
            link.failures = 0;
            link.erred = false;
            link.timed_out = false;
            self.settled.store(true, Ordering::Relaxed);
        }
    }

    /// Counts a call that found no connection.
    fn down(&self, down: Down) -> KvError {
        self.stats.errors.inc();
        self.stats.up.set(0);
        if matches!(down, Down::Timeout) {
            self.stats.timeouts.inc();
        }
        KvError::Unavailable
    }

    /// Returns a working connection to the idle pool.
    fn put_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    /// Records a call that got no usable reply: `legate_kv_up` goes to 0
    /// whatever the failure (a timeout, a lost connection or an error reply).
    /// The caller drops the connection if [`broken`].
    fn failed(&self, e: &RedisError) {
        self.stats.errors.inc();
        self.stats.up.set(0);
        if e.is_timeout() {
            self.stats.timeouts.inc();
            self.slow();
        } else if broken(e) {
            self.lost(e);
        } else {
            let mut link = self.link();
            if !link.erred {
                // Once per episode (until a call succeeds): an OOM or a
                // permission error answers every call the same way.
                tracing::warn!(
                    "kv: Redis answered an error: {e}; KV calls fail with `unavailable`"
                );
                link.erred = true;
                self.settled.store(false, Ordering::Relaxed);
            }
        }
    }

    /// A call timed out: it fails alone (its connection, which owes a reply,
    /// is dropped by the caller). No backoff and the other connections are
    /// kept: Redis answering one call late says nothing about the next, and
    /// failing every call at once for up to 2s would switch off what the
    /// plugins use KV for (rate limits fail open). Logged once per episode.
    fn slow(&self) {
        self.stats.up.set(0);
        let mut link = self.link();
        if !link.timed_out {
            tracing::warn!(
                "kv: a Redis call timed out after {:?}; such calls fail with `unavailable` \
                 (logged once until a call succeeds)",
                self.timeout
            );
            link.timed_out = true;
            self.settled.store(false, Ordering::Relaxed);
        }
    }

    /// A connection broke (`e`): Redis is marked down until a call succeeds.
    /// A read-only server also starts (or extends) the backoff: reconnecting
    /// at once would cost each call a connect to the same replica (a new
    /// connection resolves the name again after the backoff, finding a
    /// promoted master).
    fn lost(&self, e: &RedisError) {
        // The others were made to the same server: drop them too, so the
        // next call reconnects (or backs off) rather than failing on each.
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.async_conns().clear();
        let mut link = self.link();
        if !link.lost {
            tracing::warn!("kv: lost the Redis connection ({e}); reconnecting");
        }
        link.lost = true;
        if read_only(e) {
            link.back_off();
            self.settled.store(false, Ordering::Relaxed);
        }
        self.stats.up.set(0);
    }
}

/// Whether `e` leaves the connection unusable (it may hold a late reply, or be
/// closed), or its server unusable for writes: a replica (`READONLY`, after a
/// failover that moved the address to another server but kept this
/// connection) or a replica without its master (`MASTERDOWN`). Redis does not
/// close clients when it is demoted, and a `PING` still answers, so the
/// connection must be dropped for the next one to find the new master.
fn broken(e: &RedisError) -> bool {
    e.is_timeout()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || read_only(e)
}

/// `READONLY` or `MASTERDOWN`: this server cannot take writes.
fn read_only(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ::redis::ErrorKind::Server(
            ::redis::ServerErrorKind::ReadOnly | ::redis::ServerErrorKind::MasterDown
        )
    )
}

/// TTLs from this many milliseconds (~2 230 years) on never expire, as in
/// the memory store (whose deadline overflows there): Redis refuses an expiry
/// time it cannot hold, and would do so after a script's first writes.
const FOREVER_MS: u64 = 1 << 46;

/// A TTL in whole milliseconds for Redis (`0` = none), rounding a sub-ms TTL up.
fn ttl_ms(ttl: Option<Duration>) -> Result<u64, KvError> {
    match ttl {
        None => Ok(0),
        Some(d) if d.is_zero() => Err(KvError::InvalidArgument),
        Some(d) => match u64::try_from(d.as_millis()).unwrap_or(u64::MAX) {
            ms if ms >= FOREVER_MS => Ok(0),
            ms => Ok(ms.max(1)),
        },
    }
}

/// A prepared Redis call: a plain command or a script invocation, sent on a
/// blocking or an async connection alike.
enum Call<'a> {
    Cmd(::redis::Cmd),
    Script(::redis::ScriptInvocation<'a>),
}

impl Call<'_> {
    fn query(&self, c: &mut Connection) -> RedisResult<Value> {
        match self {
            Call::Cmd(cmd) => cmd.query(c),
            Call::Script(s) => s.invoke(c),
        }
    }

    async fn query_async(&self, c: &mut MultiplexedConnection) -> RedisResult<Value> {
        match self {
            Call::Cmd(cmd) => cmd.query_async(c).await,
            Call::Script(s) => s.invoke_async(c).await,
        }
    }
}

/// Which call a reply answers, to read it.
#[derive(Clone, Copy)]
enum Kind {
    Get,
    Set,
    Delete,
    Increment,
}

impl Kind {
    /// Reads Redis's reply the way the scripts and commands above shape it.
    fn parse(self, v: Value, stats: &KvStats) -> KvResult {
        let bad = |e: ::redis::ParsingError| {
            tracing::warn!("kv: unexpected reply from Redis: {e}");
            stats.errors.inc();
            KvError::Unavailable
        };
        match self {
            Kind::Get => {
                let (value, version): (Option<Vec<u8>>, Option<u64>) =
                    from_redis_value(v).map_err(bad)?;
                Ok(Reply::Get(match (value, version) {
                    (Some(value), Some(version)) => Some(Entry { value, version }),
                    _ => None,
                }))
            }
            Kind::Set => {
                let r: i64 = from_redis_value(v).map_err(bad)?;
                u64::try_from(r)
                    .map(Reply::Set)
                    .map_err(|_| KvError::CasMismatch)
            }
            Kind::Delete => match from_redis_value::<i64>(v).map_err(bad)? {
                -1 => Err(KvError::CasMismatch),
                n => Ok(Reply::Delete(n > 0)),
            },
            Kind::Increment => match from_redis_value::<Vec<i64>>(v).map_err(bad)?.as_slice() {
                [1, sum] => Ok(Reply::Increment(*sum)),
                _ => Err(KvError::InvalidArgument),
            },
        }
    }
}

impl RedisKv {
    /// Checks `op` and builds its Redis call, with the counter it is counted under.
    fn prepare(&self, ns: &str, op: Op) -> Result<(Call<'_>, Kind, &Counter), KvError> {
        op.check()?;
        Ok(match op {
            Op::Get { key } => {
                let mut cmd = ::redis::cmd("HMGET");
                cmd.arg(self.entry_key(ns, &key)).arg("v").arg("n");
                (Call::Cmd(cmd), Kind::Get, &self.stats.get)
            }
            Op::Set {
                key,
                value,
                cond,
                ttl,
            } => {
                let ttl = ttl_ms(ttl)?;
                let (mode, expected) = match cond {
                    Condition::Always => ("a", 0),
                    Condition::IfAbsent => ("n", 0),
                    Condition::IfVersion(v) => ("v", v),
                };
                let mut inv = self.set.prepare_invoke();
                inv.key(self.entry_key(ns, &key))
                    .key(self.version_key(ns))
                    .arg(value)
                    .arg(mode)
                    .arg(expected)
                    .arg(ttl);
                (Call::Script(inv), Kind::Set, &self.stats.set)
            }
            Op::Delete { key, cond } => {
                let (mode, expected) = match cond {
                    Condition::IfVersion(v) => ("v", v),
                    _ => ("a", 0),
                };
                let mut inv = self.delete.prepare_invoke();
                inv.key(self.entry_key(ns, &key)).arg(mode).arg(expected);
                (Call::Script(inv), Kind::Delete, &self.stats.delete)
            }
            Op::Increment { key, delta, ttl } => {
                let ttl = ttl_ms(ttl)?;
                let mut inv = self.increment.prepare_invoke();
                inv.key(self.entry_key(ns, &key))
                    .key(self.version_key(ns))
                    .arg(delta)
                    .arg(ttl);
                (Call::Script(inv), Kind::Increment, &self.stats.increment)
            }
        })
    }

    /// Runs `op` on a blocking connection.
    fn run_blocking(&self, ns: &str, op: Op) -> KvResult {
        let (call, kind, counter) = self.prepare(ns, op)?;
        kind.parse(self.call(counter, |c| call.query(c))?, &self.stats)
    }

    /// This worker thread's async connection, made if there is none (unless
    /// backing off). A multiplexed connection's driver runs on the runtime
    /// that made it, so each worker has its own. One idle for [`STALE_AFTER`]
    /// is checked with a `PING` first, as the blocking pool's are: Redis (or
    /// a proxy before it) may have closed it meanwhile, and a multiplexed
    /// connection does not reconnect by itself. The slot's lock is held while
    /// connecting, so one worker makes one connection at a time, however many
    /// of its exchanges ask.
    async fn async_connection(&self) -> Result<(MultiplexedConnection, u64), Down> {
        let slot = self
            .async_conns()
            .entry(std::thread::current().id())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(AsyncConn { conn, last, id }) = slot.as_mut() {
            if last.elapsed() < STALE_AFTER {
                *last = Instant::now();
                return Ok((conn.clone(), *id));
            }
            let ping = ::redis::cmd("PING");
            match tokio::time::timeout(self.timeout, ping.query_async::<String>(conn)).await {
                Ok(Ok(_)) => {
                    *last = Instant::now();
                    return Ok((conn.clone(), *id));
                }
                Ok(Err(e)) if !e.is_timeout() => {
                    tracing::debug!("kv: an idle Redis connection was closed ({e}); reconnecting");
                    *slot = None;
                }
                // Connected but silent: this call has waited its time; the
                // next one gets a new connection (this one may be half-open).
                _ => {
                    *slot = None;
                    self.slow();
                    return Err(Down::Timeout);
                }
            }
        }
        if self.link().retry_at.is_some_and(|t| Instant::now() < t) {
            return Err(Down::Unreachable);
        }
        let config = ::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let made = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        let conn = self.connected(made)?;
        let id = self.async_made.fetch_add(1, Ordering::Relaxed);
        *slot = Some(AsyncConn {
            conn: conn.clone(),
            last: Instant::now(),
            id,
        });
        Ok((conn, id))
    }

    /// Drops this worker thread's async connection `id` after a call on it
    /// timed out, so the next call makes a new one: the late reply itself is
    /// harmless (the multiplexed connection matches replies to calls in
    /// order and drops those of calls given up), but a connection that lets
    /// a call time out may be half-open, and would then fail every call. Not
    /// waited for: a slot locked by another call is being checked or made.
    fn retire_async(&self, id: u64) {
        let slot = self
            .async_conns()
            .get(&std::thread::current().id())
            .cloned();
        if let Some(slot) = slot {
            if let Ok(mut slot) = slot.try_lock() {
                if slot.as_ref().is_some_and(|c| c.id == id) {
                    *slot = None;
                }
            }
        }
    }

    fn async_conns(&self) -> std::sync::MutexGuard<'_, HashMap<std::thread::ThreadId, AsyncSlot>> {
        self.async_conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `op` on this worker's async connection, counted as the blocking
    /// calls are. The whole call waits at most `kv.timeout` (abi/README.md
    /// §5.7): the wait for this worker's connect, the check of an idle
    /// connection, the connect and the round trip together.
    async fn run_async(self: Arc<Self>, ns: Arc<str>, op: Op) -> KvResult {
        let (call, kind, counter) = self.prepare(&ns, op)?;
        counter.inc();
        // The connection the call went out on, to replace it if it times out.
        let used = std::sync::atomic::AtomicU64::new(u64::MAX);
        let attempt = async {
            let (mut conn, id) = self.async_connection().await?;
            used.store(id, Ordering::Relaxed);
            Ok::<_, Down>(call.query_async(&mut conn).await)
        };
        let r = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(r)) => r,
            Ok(Err(down)) => return Err(self.down(down)),
            Err(_) => Err(timed_out()),
        };
        match r {
            Ok(v) => {
                self.succeeded();
                kind.parse(v, &self.stats)
            }
            Err(e) => {
                if e.is_timeout() {
                    let id = used.load(Ordering::Relaxed);
                    if id != u64::MAX {
                        self.retire_async(id);
                    }
                }
                self.failed(&e);
                Err(KvError::Unavailable)
            }
        }
    }
}

/// A worker thread's async connection; the lock makes that thread's
/// connects one at a time.
type AsyncSlot = Arc<tokio::sync::Mutex<Option<AsyncConn>>>;

/// An async connection, when it was last used, and which one it is (to
/// replace it only if it is still the one a timed-out call used).
struct AsyncConn {
    conn: MultiplexedConnection,
    last: Instant,
    id: u64,
}

/// The error of a call that ran out of `kv.timeout`.
fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

impl KvBackend for RedisKv {
    fn remote(&self) -> bool {
        true
    }

    fn start(self: Arc<Self>, ns: &str, op: Op) -> KvFuture {
        let ns: Arc<str> = ns.into();
        Box::pin(self.run_async(ns, op))
    }

    fn get(&self, ns: &str, key: &str) -> Result<Option<Entry>, KvError> {
        match self.run_blocking(ns, Op::Get { key: key.into() })? {
            Reply::Get(e) => Ok(e),
            _ => Err(KvError::Unavailable),
        }
    }

    fn set(
        &self,
        ns: &str,
        key: &str,
        value: Vec<u8>,
        cond: Condition,
        ttl: Option<Duration>,
    ) -> Result<u64, KvError> {
        let op = Op::Set {
            key: key.into(),
            value,
            cond,
            ttl,
        };
        match self.run_blocking(ns, op)? {
            Reply::Set(v) => Ok(v),
            _ => Err(KvError::Unavailable),
        }
    }

    fn delete(&self, ns: &str, key: &str, cond: Condition) -> Result<bool, KvError> {
        let op = Op::Delete {
            key: key.into(),
            cond,
        };
        match self.run_blocking(ns, op)? {
            Reply::Delete(d) => Ok(d),
            _ => Err(KvError::Unavailable),
        }
    }

    fn increment(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, KvError> {
        let op = Op::Increment {
            key: key.into(),
            delta,
            ttl,
        };
        match self.run_blocking(ns, op)? {
            Reply::Increment(n) => Ok(n),
            _ => Err(KvError::Unavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_keep_no_credentials() {
        assert_eq!(
            redact("redis://app:s3cret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact("redis+unix:///run/redis.sock?db=0&user=app&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=0&user=***&pass=***"
        );
        assert_eq!(
            redact("rediss://:pw@h:6380/1?protocol=resp3&Password=x"),
            "rediss://***@h:6380/1?protocol=resp3&Password=***"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn ttls_redis_cannot_hold_mean_no_expiry() {
        assert_eq!(ttl_ms(None), Ok(0));
        assert_eq!(ttl_ms(Some(Duration::ZERO)), Err(KvError::InvalidArgument));
        assert_eq!(ttl_ms(Some(Duration::from_micros(10))), Ok(1));
        assert_eq!(ttl_ms(Some(Duration::from_secs(60))), Ok(60_000));
        assert_eq!(ttl_ms(Some(Duration::from_millis(u64::MAX))), Ok(0));
        assert_eq!(ttl_ms(Some(Duration::from_millis(FOREVER_MS))), Ok(0));
        assert_eq!(
            ttl_ms(Some(Duration::from_millis(FOREVER_MS - 1))),
            Ok(FOREVER_MS - 1)
        );
    }
}

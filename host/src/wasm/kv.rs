//! The plugin KV store (abi/README.md §5.7): the [`KvBackend`] trait the host's
//! `kv` imports call, and [`MemoryKv`], the in-process backend — one per process
//! ([`store`]), shared by every worker and every plugin granted a namespace.
//!
//! The trait is the seam for the remote backend, [`RedisKv`] (`kv: {backend:
//! redis}`, in [`redis`]): it speaks in namespaces, keys, write conditions and
//! TTLs, and reports `unavailable` for a backend it cannot reach. Capability checks
//! stay in the host (`host.rs`), not here.
//!
//! Which backend plugins get: [`backend`] builds the one a config asks for, and
//! [`enter`] makes it the one [`store`] returns on this thread while a config's
//! plugins are loaded; outside that, [`store`] is the process's memory store.
//!
//! Expiry is checked lazily on every access (an expired key is absent for every
//! call) and expired entries are reclaimed by a bounded sweep on each write, driven
//! by a per-namespace expiry queue, so no background task is needed.

mod redis;

pub(crate) use redis::redact as redact_url;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

pub use self::redis::{check_url as check_redis_url, ClientTlsConfig, RedisKv, TlsCertificates};
use crate::config::{KvBackendKind, KvConfig};
use crate::stats::Stats;

/// Longest key, in bytes (abi/README.md §7).
pub const MAX_KEY: usize = 512;
/// Largest value, in bytes (abi/README.md §7).
pub const MAX_VALUE: usize = 64 << 10;
/// Most live entries per namespace (host default).
pub const MAX_ENTRIES: usize = 100_000;
/// Most key + value bytes per namespace (host default).
pub const MAX_BYTES: usize = 64 << 20;
/// Expired entries reclaimed at most per write: keeps every call O(1) amortized.
const SWEEP: usize = 32;

/// A stored value and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// The key's version (never 0, never reused).
    pub version: u64,
}

/// When a write may happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Unconditionally.
    Always,
    /// Only if the key does not exist.
    IfAbsent,
    /// Only if the key exists with exactly this version.
    IfVersion(u64),
}

/// Why a KV call failed (the WIT `error` cases it can return).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvError {
    /// The write condition did not hold.
    CasMismatch,
    /// Key too long, TTL 0, not an integer, overflow, `if-absent` on delete.
    InvalidArgument,
    /// Value, entry or byte cap.
    LimitExceeded,
    /// The backend cannot be reached (never for the in-memory one).
    Unavailable,
}

/// One KV call, for the asynchronous `start-*` calls (abi/README.md §5.7):
/// what the synchronous call of the same name takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `get`.
    Get {
        /// The key.
        key: String,
    },
    /// `set`.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// When to write.
        cond: Condition,
        /// Expiry from now; `None`: never.
        ttl: Option<Duration>,
    },
    /// `delete`.
    Delete {
        /// The key.
        key: String,
        /// When to delete.
        cond: Condition,
    },
    /// `increment`.
    Increment {
        /// The key.
        key: String,
        /// Added to the stored integer.
        delta: i64,
        /// Expiry of a new counter; `None`: never.
        ttl: Option<Duration>,
    },
}

impl Op {
    /// The argument checks every backend makes before touching data, so that a
    /// `start-*` call reports them at once, as the synchronous call does.
    pub fn check(&self) -> Result<(), KvError> {
        let (key, ttl) = match self {
            Op::Get { key } => (key, None),
            Op::Set {
                key, value, ttl, ..
            } => {
                if value.len() > MAX_VALUE {
                    return Err(KvError::LimitExceeded);
                }
                (key, *ttl)
            }
            Op::Delete { key, cond } => {
                if *cond == Condition::IfAbsent {
                    return Err(KvError::InvalidArgument);
                }
                (key, None)
            }
            Op::Increment { key, ttl, .. } => (key, *ttl),
        };
        check_key(key)?;
        if ttl.is_some_and(|d| d.is_zero()) {
            return Err(KvError::InvalidArgument);
        }
        Ok(())
    }
}

/// What an [`Op`] returned: the synchronous call's `ok` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `get`: the live entry.
    Get(Option<Entry>),
    /// `set`: the new version.
    Set(u64),
    /// `delete`: whether the key existed.
    Delete(bool),
    /// `increment`: the new value.
    Increment(i64),
}

/// An [`Op`]'s outcome.
pub type KvResult = Result<Reply, KvError>;

/// An [`Op`] in flight, run by the chain on the worker's `LocalSet`. `Send`
/// because it waits in the exchange, which a Wasm store holds.
pub type KvFuture = std::pin::Pin<Box<dyn std::future::Future<Output = KvResult> + Send>>;

/// An asynchronous KV call a filter started, queued on the exchange until the
/// chain runs it.
pub struct KvCall {
    /// The call's id (from the filter's callout ids).
    pub id: u64,
    /// The call.
    pub future: KvFuture,
}

impl std::fmt::Debug for KvCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCall")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Runs `op` with `backend`'s synchronous calls.
pub fn run<B: KvBackend + ?Sized>(backend: &B, ns: &str, op: Op) -> KvResult {
    match op {
        Op::Get { key } => backend.get(ns, &key).map(Reply::Get),
        Op::Set {
            key,
            value,
            cond,
            ttl,
        } => backend.set(ns, &key, value, cond, ttl).map(Reply::Set),
        Op::Delete { key, cond } => backend.delete(ns, &key, cond).map(Reply::Delete),
        Op::Increment { key, delta, ttl } => backend
            .increment(ns, &key, delta, ttl)
            .map(Reply::Increment),
    }
}

/// A KV backend. Every call is atomic per key; all instances of all plugins see
/// one consistent store.
pub trait KvBackend: Send + Sync {
    /// Whether calls go over the network (`redis`): the guest's
    /// `namespace.backend`, which tells a filter to use the `start-*` calls.
    fn remote(&self) -> bool {
        false
    }
    /// Runs `op` without blocking the calling worker: the future resolves on the
    /// worker's runtime. The in-memory store (the default) has finished when
    /// this returns; the future only hands over the result.
    fn start(self: Arc<Self>, ns: &str, op: Op) -> KvFuture {
        let r = run(&*self, ns, op);
        Box::pin(std::future::ready(r))
    }
    /// The live entry at `key`.
    fn get(&self, ns: &str, key: &str) -> Result<Option<Entry>, KvError>;
    /// Writes `value` if `cond` holds, expiring `ttl` from now; the new version.
    fn set(
        &self,
        ns: &str,
        key: &str,
        value: Vec<u8>,
        cond: Condition,
        ttl: Option<Duration>,
    ) -> Result<u64, KvError>;
    /// Deletes `key` if `cond` holds; whether it existed.
    fn delete(&self, ns: &str, key: &str, cond: Condition) -> Result<bool, KvError>;
    /// Adds `delta` to the decimal integer at `key` (absent = 0, created with `ttl`).
    fn increment(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, KvError>;
}

/// The process's in-memory store, shared by every config that uses `memory`.
fn memory() -> Arc<dyn KvBackend> {
    static STORE: OnceLock<Arc<MemoryKv>> = OnceLock::new();
    STORE.get_or_init(|| Arc::new(MemoryKv::default())).clone()
}

thread_local! {
    /// The backend of the config being loaded on this thread ([`enter`]).
    static CURRENT: RefCell<Option<Arc<dyn KvBackend>>> = const { RefCell::new(None) };
}

/// The KV store plugins created now get: the backend [`enter`]ed on this thread,
/// else the process's memory store.
pub fn store() -> Arc<dyn KvBackend> {
    CURRENT.with(|c| c.borrow().clone()).unwrap_or_else(memory)
}

/// The backend `config` asks for: the process's memory store, or a new Redis
/// backend (which connects on first use, so this never waits on the network).
pub fn backend(config: &KvConfig, stats: &Arc<Stats>) -> anyhow::Result<Arc<dyn KvBackend>> {
    match (config.backend, &config.url) {
        (KvBackendKind::Memory, _) => Ok(memory()),
        (KvBackendKind::Redis, Some(url)) => Ok(Arc::new(RedisKv::new(
            &url.value,
            redis_tls(config)?,
            config.timeout.value.get(),
            &config.prefix,
            stats,
        )?)),
        (KvBackendKind::Redis, None) => {
            anyhow::bail!("`kv.backend: redis` needs `kv.url` (e.g. redis://127.0.0.1:6379/0)")
        }
    }
}

/// The certificates `kv.tls` names, read now so a missing file fails the load.
fn redis_tls(config: &KvConfig) -> anyhow::Result<Option<TlsCertificates>> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let tls = &tls.value;
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p)
            .map_err(|e| anyhow::anyhow!("kv.tls.{what}: cannot read {}: {e}", p.display()))
    };
    let client_tls = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read("client_cert", cert)?,
            client_key: crate::tls::kv_client_key_pem(key, tls.key_password_file.as_deref())
                .map_err(|e| anyhow::anyhow!("kv.tls.client_key: {e}"))?,
        }),
        _ => None,
    };
    let root_cert = tls.ca.as_deref().map(|ca| read("ca", ca)).transpose()?;
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// Makes `backend` what [`store`] returns on this thread until the guard drops
/// (the previous one is restored then).
pub fn enter(backend: Arc<dyn KvBackend>) -> Entered {
    Entered(CURRENT.with(|c| c.replace(Some(backend))))
}

/// Restores the previous [`store`] of this thread on drop.
pub struct Entered(Option<Arc<dyn KvBackend>>);

impl Drop for Entered {
    fn drop(&mut self) {
        let prev = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

struct Item {
    value: Vec<u8>,
    version: u64,
    expires: Option<Instant>,
}

impl Item {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| now < t)
    }
}

#[derive(Default)]
struct Namespace {
    /// The items with their keys, found by [`Namespace::hash`]: each call hashes
    /// its key once (a `HashMap` would hash it again for every lookup, insert
    /// and removal of a write) and a rewritten key keeps its stored `String`.
    items: HashTable<(String, Item)>,
    /// SipHash with a random key per namespace: keys come from requests
    /// (client addresses, header values), so they must not be able to force
    /// collisions (HashDoS).
    hasher: RandomState,
    /// (expiry, version) → the item's hash, for the sweep: one entry per item
    /// with an expiry (removed with the item, so replacing a key with a long
    /// TTL again and again leaves one entry, not one per write). Versions are
    /// unique in the namespace, so hash and version find the item without a
    /// copy of its key.
    expiries: BTreeMap<(Instant, u64), u64>,
    bytes: usize,
    /// The last version handed out in this namespace: versions are unique across
    /// all keys of the namespace, so never reused for a key (no ABA).
    last_version: u64,
}

impl Namespace {
    fn next_version(&mut self) -> u64 {
        self.last_version += 1;
        self.last_version
    }

    /// The hash `key` is found by in this namespace.
    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The live item at `key` (hashed `h`), removing it first if it expired.
    fn live(&mut self, h: u64, key: &str, now: Instant) -> Option<&mut Item> {
        let entry = self.items.find_entry(h, |(k, _)| k == key).ok()?;
        if entry.get().1.live(now) {
            return Some(&mut entry.into_mut().1);
        }
        let ((key, item), _) = entry.remove();
        forget(&mut self.bytes, &mut self.expiries, &key, &item);
        None
    }

    /// Removes the item at `key` (hashed `h`).
    fn remove(&mut self, h: u64, key: &str) -> Option<Item> {
        let entry = self.items.find_entry(h, |(k, _)| k == key).ok()?;
        let ((key, item), _) = entry.remove();
        forget(&mut self.bytes, &mut self.expiries, &key, &item);
        Some(item)
    }

    /// Reclaims up to `max` expired entries, oldest expiry first.
    fn sweep(&mut self, now: Instant, max: usize) {
        for _ in 0..max {
            let Some(entry) = self.expiries.first_entry() else {
                return;
            };
            let (at, version) = *entry.key();
            if at > now {
                return;
            }
            let h = entry.remove();
            if let Ok(e) = self.items.find_entry(h, |(_, i)| i.version == version) {
                if !e.get().1.live(now) {
                    let ((key, item), _) = e.remove();
                    forget(&mut self.bytes, &mut self.expiries, &key, &item);
                }
            }
        }
    }

    /// Whether `key` (hashed `h`) with `new` bytes (key + value) fits the
    /// namespace caps.
    fn fits(&self, h: u64, key: &str, new: usize) -> bool {
        let old = self
            .items
            .find(h, |(k, _)| k == key)
            .map(|(k, i)| k.len() + i.value.len());
        self.bytes - old.unwrap_or(0) + new <= MAX_BYTES
            && (old.is_some() || self.items.len() < MAX_ENTRIES)
    }

    /// Stores `value` at `key` (hashed `h`), replacing any item, with a new
    /// version.
    fn put(
        &mut self,
        h: u64,
        key: &str,
        value: Vec<u8>,
        expires: Option<Instant>,
        now: Instant,
    ) -> Result<u64, KvError> {
        let new = key.len() + value.len();
        if !self.fits(h, key, new) {
            // Make room from expired entries before refusing.
            self.sweep(now, usize::MAX);
            if !self.fits(h, key, new) {
                return Err(KvError::LimitExceeded);
            }
        }
        let version = self.next_version();
        if let Some(t) = expires {
            self.expiries.insert((t, version), h);
        }
        let item = Item {
            value,
            version,
            expires,
        };
        self.bytes += new;
        match self.items.find_mut(h, |(k, _)| k == key) {
            // Rewritten in place: the stored key stays.
            Some((k, old)) => {
                forget(&mut self.bytes, &mut self.expiries, k, old);
                *old = item;
            }
            None => {
                let hasher = &self.hasher;
                self.items
                    .insert_unique(h, (key.to_string(), item), |(k, _)| hasher.hash_one(k));
            }
        }
        Ok(version)
    }
}

/// Accounts for `item` (at `key`) leaving its namespace: its bytes, and its
/// entry in the expiry queue. A function of the two fields, not a method:
/// callers hold a borrow of `items` while they call it.
fn forget(bytes: &mut usize, expiries: &mut BTreeMap<(Instant, u64), u64>, key: &str, item: &Item) {
    *bytes -= key.len() + item.value.len();
    if let Some(t) = item.expires {
        expiries.remove(&(t, item.version));
    }
}

/// The in-process backend: namespaces created on first use, one lock each.
#[derive(Default)]
pub struct MemoryKv {
    /// By name. FxHash: the names are the config's (a plugin opens only the
    /// namespaces granted to it), so nothing a request sends can collide them.
    namespaces: RwLock<FxHashMap<String, Arc<Mutex<Namespace>>>>,
}

impl MemoryKv {
    fn ns(&self, name: &str) -> Arc<Mutex<Namespace>> {
        if let Some(ns) = self
            .namespaces
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
        {
            return ns.clone();
        }
        self.namespaces
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    fn with<R>(&self, name: &str, f: impl FnOnce(&mut Namespace) -> R) -> R {
        let ns = self.ns(name);
        let mut ns = ns.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut ns)
    }
}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.len() > MAX_KEY {
        return Err(KvError::InvalidArgument);
    }
    Ok(())
}

fn expiry(now: Instant, ttl: Option<Duration>) -> Result<Option<Instant>, KvError> {
    match ttl {
        None => Ok(None),
        Some(d) if d.is_zero() => Err(KvError::InvalidArgument),
        Some(d) => Ok(now.checked_add(d)),
    }
}

impl KvBackend for MemoryKv {
    fn get(&self, ns: &str, key: &str) -> Result<Option<Entry>, KvError> {
        check_key(key)?;
        let now = Instant::now();
        self.with(ns, |n| {
            let h = n.hash(key);
            Ok(n.live(h, key, now).map(|i| Entry {
                value: i.value.clone(),
                version: i.version,
            }))
        })
    }

    fn set(
        &self,
        ns: &str,
        key: &str,
        value: Vec<u8>,
        cond: Condition,
        ttl: Option<Duration>,
    ) -> Result<u64, KvError> {
        check_key(key)?;
        if value.len() > MAX_VALUE {
            return Err(KvError::LimitExceeded);
        }
        let now = Instant::now();
        let expires = expiry(now, ttl)?;
        self.with(ns, |n| {
            n.sweep(now, SWEEP);
            let h = n.hash(key);
            let current = n.live(h, key, now).map(|i| i.version);
            match (cond, current) {
                (Condition::Always, _) | (Condition::IfAbsent, None) => {}
                (Condition::IfVersion(v), Some(c)) if v == c => {}
                _ => return Err(KvError::CasMismatch),
            }
            n.put(h, key, value, expires, now)
        })
    }

    fn delete(&self, ns: &str, key: &str, cond: Condition) -> Result<bool, KvError> {
        check_key(key)?;
        let now = Instant::now();
        self.with(ns, |n| {
            n.sweep(now, SWEEP);
            let h = n.hash(key);
            let current = n.live(h, key, now).map(|i| i.version);
            match (cond, current) {
                (Condition::IfAbsent, _) => Err(KvError::InvalidArgument),
                (Condition::Always, None) => Ok(false),
                (Condition::IfVersion(v), Some(c)) if v == c => Ok(n.remove(h, key).is_some()),
                (Condition::Always, Some(_)) => Ok(n.remove(h, key).is_some()),
                (Condition::IfVersion(_), _) => Err(KvError::CasMismatch),
            }
        })
    }

    fn increment(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, KvError> {
        check_key(key)?;
        let now = Instant::now();
        let new_expiry = expiry(now, ttl)?;
        self.with(ns, |n| {
            n.sweep(now, SWEEP);
            let h = n.hash(key);
            let (old, expires) = match n.live(h, key, now) {
                None => (0, new_expiry),
                // Only the form Redis's `HINCRBY` takes, so the two backends
                // refuse the same values.
                Some(i) => (
                    legate_abi_rules::kv::canonical_int(&i.value)
                        .ok_or(KvError::InvalidArgument)?,
                    i.expires,
                ),
            };
            let sum = old.checked_add(delta).ok_or(KvError::InvalidArgument)?;
            n.put(h, key, sum.to_string().into_bytes(), expires, now)?;
            Ok(sum)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_canonical_integers_are_incremented() {
        let kv = MemoryKv::default();
        for bad in ["+5", "05", "-0", "-05", "", " 5", "5 ", "1e3", "--1"] {
            kv.set("n", "c", bad.into(), Condition::Always, None)
                .unwrap();
            assert_eq!(
                kv.increment("n", "c", 1, None),
                Err(KvError::InvalidArgument),
                "{bad:?}"
            );
        }
        for (good, sum) in [
            ("0", 1),
            ("-1", 0),
            ("41", 42),
            ("-9223372036854775808", i64::MIN + 1),
        ] {
            kv.set("n", "c", good.into(), Condition::Always, None)
                .unwrap();
            assert_eq!(kv.increment("n", "c", 1, None), Ok(sum), "{good:?}");
        }
    }

    #[test]
    fn expiry_entries_go_with_their_items() {
        let kv = MemoryKv::default();
        let hour = Some(Duration::from_secs(3600));
        for i in 0..1000u32 {
            kv.set(
                "n",
                "k",
                i.to_string().into_bytes(),
                Condition::Always,
                hour,
            )
            .unwrap();
            kv.increment("n", "c", 1, hour).unwrap();
        }
        kv.set("n", "forever", b"x".to_vec(), Condition::Always, None)
            .unwrap();
        let sizes = |kv: &MemoryKv| kv.with("n", |ns| (ns.items.len(), ns.expiries.len()));
        assert_eq!(sizes(&kv), (3, 2));
        // A write without a TTL drops the key's expiry, and its entry.
        kv.set("n", "k", b"y".to_vec(), Condition::Always, None)
            .unwrap();
        assert_eq!(sizes(&kv), (3, 1));
        assert!(kv.delete("n", "c", Condition::Always).unwrap());
        assert_eq!(sizes(&kv), (2, 0));
    }

    #[test]
    fn bytes_follow_rewrites_in_place() {
        let kv = MemoryKv::default();
        let bytes = |kv: &MemoryKv| kv.with("n", |ns| (ns.items.len(), ns.bytes));
        let hour = Some(Duration::from_secs(3600));
        kv.set("n", "k", vec![0; 10], Condition::Always, hour)
            .unwrap();
        assert_eq!(bytes(&kv), (1, 11));
        // Rewritten: same entry, the value's new size, one expiry entry.
        kv.set("n", "k", vec![0; 3], Condition::Always, hour)
            .unwrap();
        assert_eq!(bytes(&kv), (1, 4));
        assert_eq!(kv.with("n", |ns| ns.expiries.len()), 1);
        kv.increment("n", "c", 12, None).unwrap();
        assert_eq!(bytes(&kv), (2, 4 + 3));
        assert!(kv.delete("n", "k", Condition::Always).unwrap());
        assert_eq!(bytes(&kv), (1, 3));
        assert_eq!(kv.with("n", |ns| ns.expiries.len()), 0);
    }

    #[test]
    fn conditions_and_versions() {
        let kv = MemoryKv::default();
        let v1 = kv
            .set("n", "k", b"a".to_vec(), Condition::IfAbsent, None)
            .unwrap();
        assert_eq!(
            kv.set("n", "k", b"b".to_vec(), Condition::IfAbsent, None),
            Err(KvError::CasMismatch)
        );
        let v2 = kv
            .set("n", "k", b"b".to_vec(), Condition::IfVersion(v1), None)
            .unwrap();
        assert!(v2 > v1);
        assert_eq!(
            kv.set("n", "k", b"c".to_vec(), Condition::IfVersion(v1), None),
            Err(KvError::CasMismatch)
        );
        assert_eq!(
            kv.get("n", "k").unwrap(),
            Some(Entry {
                value: b"b".to_vec(),
                version: v2
            })
        );
        // Namespaces are separate.
        assert_eq!(kv.get("other", "k").unwrap(), None);
        assert_eq!(
            kv.delete("n", "k", Condition::IfAbsent),
            Err(KvError::InvalidArgument)
        );
        assert_eq!(
            kv.delete("n", "k", Condition::IfVersion(v1)),
            Err(KvError::CasMismatch)
        );
        assert!(kv.delete("n", "k", Condition::IfVersion(v2)).unwrap());
        assert!(!kv.delete("n", "k", Condition::Always).unwrap());
        // Re-created: a new version, so the old one never matches again (no ABA).
        let v3 = kv
            .set("n", "k", b"d".to_vec(), Condition::Always, None)
            .unwrap();
        assert!(v3 > v2);
    }

    #[test]
    fn increment_and_limits() {
        let kv = MemoryKv::default();
        assert_eq!(kv.increment("n", "c", 5, None).unwrap(), 5);
        assert_eq!(kv.increment("n", "c", -2, None).unwrap(), 3);
        assert_eq!(kv.get("n", "c").unwrap().unwrap().value, b"3");
        kv.set("n", "s", b"x".to_vec(), Condition::Always, None)
            .unwrap();
        assert_eq!(
            kv.increment("n", "s", 1, None),
            Err(KvError::InvalidArgument)
        );
        kv.set(
            "n",
            "m",
            i64::MAX.to_string().into_bytes(),
            Condition::Always,
            None,
        )
        .unwrap();
        assert_eq!(
            kv.increment("n", "m", 1, None),
            Err(KvError::InvalidArgument)
        );
        let long = "k".repeat(MAX_KEY + 1);
        assert_eq!(kv.get("n", &long), Err(KvError::InvalidArgument));
        assert_eq!(
            kv.set("n", "big", vec![0; MAX_VALUE + 1], Condition::Always, None),
            Err(KvError::LimitExceeded)
        );
        assert_eq!(
            kv.set("n", "z", vec![], Condition::Always, Some(Duration::ZERO)),
            Err(KvError::InvalidArgument)
        );
    }

    #[test]
    fn entered_backend_is_the_store_until_the_guard_drops() {
        let stats = Stats::new();
        let redis = KvConfig {
            backend: KvBackendKind::Redis,
            url: Some(crate::config::unspanned(
                "redis://127.0.0.1:1/0".to_string(),
            )),
            ..KvConfig::default()
        };
        // Built without connecting: nothing listens on port 1.
        let b = backend(&redis, &stats).unwrap();
        assert!(Arc::ptr_eq(&store(), &memory()));
        {
            let _g = enter(b.clone());
            assert!(Arc::ptr_eq(&store(), &b));
            // Only on this thread.
            let other = std::thread::spawn(|| Arc::ptr_eq(&store(), &memory()))
                .join()
                .unwrap();
            assert!(other);
        }
        assert!(Arc::ptr_eq(&store(), &memory()));
        // The memory config is the process's one store.
        let m = backend(&KvConfig::default(), &stats).unwrap();
        assert!(Arc::ptr_eq(&m, &memory()));
    }

    #[test]
    fn expired_keys_are_absent_and_swept() {
        let kv = MemoryKv::default();
        let ttl = Some(Duration::from_millis(1));
        kv.set("n", "t", b"v".to_vec(), Condition::Always, ttl)
            .unwrap();
        kv.increment("n", "c", 1, ttl).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(kv.get("n", "t").unwrap(), None);
        // An expired counter restarts at 0 with the new TTL.
        assert_eq!(kv.increment("n", "c", 1, None).unwrap(), 1);
        kv.set("n", "u", b"v".to_vec(), Condition::IfAbsent, ttl)
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        // A write sweeps expired entries, even ones never read again.
        kv.set("n", "w", b"v".to_vec(), Condition::Always, None)
            .unwrap();
        kv.with("n", |n| {
            assert!(n.items.find(n.hash("u"), |(k, _)| k == "u").is_none());
            assert_eq!(n.bytes, "c".len() + 1 + "w".len() + 1);
        });
    }
}

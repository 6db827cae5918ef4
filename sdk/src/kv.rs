//! The shared key-value store: namespaces granted to the plugin, shared by all
//! instances in one host process, with versions (compare-and-swap), TTLs and
//! atomic counters. Open namespaces in `configure` and keep the handle.

use crate::backend;
use crate::Error;

/// A per-key version, bumped by every write; never 0 and never reused for a key.
pub type Version = u64;

/// A stored value and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// Its version, for [`WriteCondition::IfVersion`].
    pub version: Version,
}

/// When a write may happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCondition {
    /// Unconditionally.
    Always,
    /// Only if the key does not exist.
    IfAbsent,
    /// Only if the key exists with exactly this version.
    IfVersion(Version),
}

/// A namespace the plugin was granted.
pub struct Namespace(backend::NamespaceHandle);

impl Namespace {
    /// Open namespace `name`. Errors: `Denied` (not granted to this plugin),
    /// `NotFound` (granted but not configured on this host).
    pub fn open(name: &str) -> Result<Self, Error> {
        backend::kv_open(name).map(Namespace)
    }

    /// The entry at `key`, if present (expired keys are absent).
    pub fn get(&self, key: &str) -> Result<Option<Entry>, Error> {
        self.0.get(key)
    }

    /// Write `value` if `condition` holds, expiring `ttl_ms` from now (`None`:
    /// never). Returns the new version. Errors: `CasMismatch`,
    /// `InvalidArgument` (key over 512 bytes, ttl 0), `LimitExceeded`.
    pub fn set(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        condition: WriteCondition,
        ttl_ms: Option<u64>,
    ) -> Result<Version, Error> {
        self.0.set(key, value.as_ref(), condition, ttl_ms)
    }

    /// Delete `key` if `condition` holds; whether it existed.
    /// `IfAbsent` is `InvalidArgument`; otherwise errors as [`Namespace::set`].
    pub fn delete(&self, key: &str, condition: WriteCondition) -> Result<bool, Error> {
        self.0.delete(key, condition)
    }

    /// Atomically add `delta` to the integer at `key` and return the new value.
    /// An absent key counts as 0 and is created expiring `ttl_ms` from now; an
    /// existing key keeps its expiry (a fixed-window rate counter). Errors:
    /// `InvalidArgument` (not an integer, or overflow).
    pub fn increment(&self, key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, Error> {
        self.0.increment(key, delta, ttl_ms)
    }
}

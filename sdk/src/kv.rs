//! The shared key-value store: namespaces granted to the plugin, shared by all
//! instances in one host process (or, with the host's `kv.backend: redis`, by
//! every process using that Redis), with versions (compare-and-swap), TTLs and
//! atomic counters. Open namespaces in `configure` and keep the handle.
//!
//! Every call comes in two forms. The synchronous one ([`Namespace::get`]...)
//! returns the result at once, but on a remote backend ([`Backend::Redis`]) it
//! holds up the plugin's worker, and every exchange on it, for a network round
//! trip. The asynchronous one ([`Namespace::start_get`]...) returns a
//! [`CallId`] at once; the filter returns [`Action::Pause`](crate::Action::Pause)
//! and the reply arrives in
//! [`HttpFilter::on_kv_response`](crate::HttpFilter::on_kv_response), as a
//! callout's response does. Ask [`Namespace::backend`] which to use.

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

/// Where a namespace's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// In the host process: every call completes at once.
    Memory,
    /// A Redis server: every call is a network round trip; use the
    /// `start_*` calls on the request path.
    Redis,
}

/// Identifies a call started with a `start_*` method. Drawn from the same
/// sequence as [`CalloutId`](crate::callout::CalloutId)s, so
/// [`callout::cancel`](crate::callout::cancel) cancels either.
pub type CallId = u64;

/// The reply to an asynchronous call: what the synchronous call returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// From [`Namespace::start_get`].
    Get(Option<Entry>),
    /// From [`Namespace::start_set`]: the new version.
    Set(Version),
    /// From [`Namespace::start_delete`]: whether the key existed.
    Delete(bool),
    /// From [`Namespace::start_increment`]: the new value.
    Increment(i64),
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

    /// Where this namespace's data lives (the host's `kv.backend`).
    pub fn backend(&self) -> Backend {
        self.0.backend()
    }

    /// Start [`Namespace::get`]; the reply is [`Reply::Get`]. Only from an
    /// exchange's call that may pause (a request or response phase, or a
    /// callout or KV reply); then return [`Action::Pause`](crate::Action::Pause)
    /// to wait for it. Errors: `InvalidArgument` (key over 512 bytes),
    /// `InvalidState` (from `configure`, `on_tick`, `on_log`, a network
    /// filter, or after [`Exchange::detach`](crate::Exchange::detach)),
    /// `LimitExceeded` (too many callouts and KV calls outstanding). Errors of
    /// the call itself (`CasMismatch`, `Unavailable`...) arrive as the reply.
    pub fn start_get(&self, key: &str) -> Result<CallId, Error> {
        self.0.start(key, Op::Get)
    }

    /// Start [`Namespace::set`]; the reply is [`Reply::Set`]. As
    /// [`Namespace::start_get`]; also `InvalidArgument` for a TTL of 0 and
    /// `LimitExceeded` for a value over 64 KiB.
    pub fn start_set(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        condition: WriteCondition,
        ttl_ms: Option<u64>,
    ) -> Result<CallId, Error> {
        self.0
            .start(key, Op::Set(value.as_ref().to_vec(), condition, ttl_ms))
    }

    /// Start [`Namespace::delete`]; the reply is [`Reply::Delete`]. As
    /// [`Namespace::start_get`]; `IfAbsent` is `InvalidArgument`.
    pub fn start_delete(&self, key: &str, condition: WriteCondition) -> Result<CallId, Error> {
        self.0.start(key, Op::Delete(condition))
    }

    /// Start [`Namespace::increment`]; the reply is [`Reply::Increment`]. As
    /// [`Namespace::start_set`].
    pub fn start_increment(
        &self,
        key: &str,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<CallId, Error> {
        self.0.start(key, Op::Increment(delta, ttl_ms))
    }
}

/// An asynchronous call's operation, without its key (for the backends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Get,
    Set(Vec<u8>, WriteCondition, Option<u64>),
    Delete(WriteCondition),
    Increment(i64, Option<u64>),
}

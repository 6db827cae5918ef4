//! The verified-token cache: per JWT provider and per plugin instance, what the
//! caller keeps of tokens whose signature (and claims) that provider accepted
//! (their claims and validity window), keyed
//! by the exact token string (as Envoy's `jwt_cache_config`), bounded in
//! entries and in token length, least recently used evicted first. It owns no
//! policy: the caller decides what goes in (only tokens that passed every
//! check), rechecks time-dependent claims on a hit, and flushes it when the
//! provider's keys change.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

#[derive(Debug)]
struct Entry<V> {
    token: Box<[u8]>,
    value: V,
    /// Position in `order` (higher: used more recently).
    used: u64,
}

/// A bounded LRU map of verified tokens to what the caller keeps of them (`V`,
/// cheap to clone: handed out on every hit).
///
/// Keyed by the token itself, compared whole: two tokens never share an
/// entry. (A hash of the token as the key would need a cryptographic one, so
/// that no collision authenticates the wrong token; SHA-256 of a typical
/// 600-byte token costs more in Wasm than the rest of the plugin's work on a
/// hit.) Tokens are found by std's keyed SipHash of their last
/// [`HASHED`] bytes ([`hash`]), and only verified tokens get in, so requests
/// cannot lengthen a lookup. The map's own hasher passes that hash through
/// ([`Prehashed`]) rather than hashing it again.
#[derive(Debug, Default)]
pub struct TokenCache<V> {
    capacity: usize,
    max_token: usize,
    hasher: RandomState,
    /// Hash of the token → the entries with that hash (nearly always one).
    entries: HashMap<u64, Vec<Entry<V>>, BuildHasherDefault<Prehashed>>,
    len: usize,
    /// `used` → the token's hash, oldest first: eviction and touch in O(log n).
    order: BTreeMap<u64, u64>,
    next_use: u64,
}

/// How many of a token's last bytes pick its bucket: a JWT ends with its
/// signature (at least 32 bytes, 43 base64url characters, for every accepted
/// algorithm), as good as random, so its last 8 characters (48 random bits)
/// spread tokens as well as more would. Hashing all of a 600-byte token cost
/// ~3k Wasm instructions per lookup, its last 32 bytes ~0.6k, one word ~0.1k.
/// Equality is still checked on the whole token.
const HASHED: usize = 8;

/// The bucket of `token`: its last [`HASHED`] bytes as one word, hashed with
/// the cache's key.
fn hash(hasher: &RandomState, b: &[u8]) -> u64 {
    let tail = &b[b.len().saturating_sub(HASHED)..];
    let mut word = [0u8; HASHED];
    word[..tail.len()].copy_from_slice(tail);
    hasher.hash_one(u64::from_le_bytes(word))
}

/// The hasher of [`TokenCache`]'s map, whose keys are [`hash`]es already
/// (keyed, uniform): a key is its own hash.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; any other input still hashes.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Whether `a` and `b` are the same bytes, compared eight at a time. `==` on
/// byte slices calls `memcmp`, which on wasm32 is compiler-builtins' byte
/// loop: ~15k instructions for a 600-byte token, more than a whole cache hit.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (x, y) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = x.remainder().iter().eq(y.remainder());
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().unwrap_or_default());
    tail && x.zip(y).all(|(p, q)| word(p) == word(q))
}

impl<V: Clone + Default> TokenCache<V> {
    /// A cache of at most `capacity` tokens of at most `max_token` bytes each
    /// (longer ones are not cached); capacity 0 disables it.
    pub fn new(capacity: usize, max_token: usize) -> Self {
        TokenCache {
            capacity,
            max_token,
            ..TokenCache::default()
        }
    }

    /// Whether `token` can be cached (the cache is on and the token short
    /// enough): worth looking up.
    pub fn admits(&self, token: impl AsRef<[u8]>) -> bool {
        let token = token.as_ref();
        self.capacity > 0 && token.len() <= self.max_token
    }

    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bump(&mut self) -> u64 {
        self.next_use += 1;
        self.next_use
    }

    /// The entry of `token` and its hash.
    fn find(&mut self, token: &[u8]) -> (u64, Option<&mut Entry<V>>) {
        let h = hash(&self.hasher, token);
        let e = self
            .entries
            .get_mut(&h)
            .and_then(|b| b.iter_mut().find(|e| same(&e.token, token)));
        (h, e)
    }

    /// What is kept of a cached token, marking it most recently used.
    pub fn get(&mut self, token: impl AsRef<[u8]>) -> Option<V> {
        let token = token.as_ref();
        let used = self.bump();
        let (h, e) = self.find(token);
        let e = e?;
        let (old, value) = (e.used, e.value.clone());
        e.used = used;
        self.order.remove(&old);
        self.order.insert(used, h);
        Some(value)
    }

    /// Remember a verified token, evicting the least recently used at
    /// capacity; a token the cache does not admit is not kept.
    pub fn insert(&mut self, token: impl AsRef<[u8]>, value: V) {
        let token = token.as_ref();
        if !self.admits(token) {
            return;
        }
        self.remove(token);
        while self.len >= self.capacity {
            let Some((used, h)) = self.order.pop_first() else {
                break;
            };
            self.take(h, |e| e.used == used);
        }
        let used = self.bump();
        let h = hash(&self.hasher, token);
        self.order.insert(used, h);
        self.entries.entry(h).or_default().push(Entry {
            token: token.into(),
            value,
            used,
        });
        self.len += 1;
    }

    /// Removes the entry of bucket `h` that `which` picks; its `used`.
    fn take(&mut self, h: u64, which: impl Fn(&Entry<V>) -> bool) -> Option<u64> {
        let bucket = self.entries.get_mut(&h)?;
        let i = bucket.iter().position(which)?;
        let e = bucket.swap_remove(i);
        if bucket.is_empty() {
            self.entries.remove(&h);
        }
        self.len -= 1;
        Some(e.used)
    }

    /// Forget one token (e.g. it expired).
    pub fn remove(&mut self, token: impl AsRef<[u8]>) {
        let token = token.as_ref();
        let h = hash(&self.hasher, token);
        if let Some(used) = self.take(h, |e| same(&e.token, token)) {
            self.order.remove(&used);
        }
    }

    /// Forget every token (the provider's keys changed).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::rc::Rc;

    use serde_json::{Map, Value};

    fn claims(n: u64) -> Rc<Map<String, Value>> {
        let mut m = Map::new();
        m.insert("n".to_owned(), Value::from(n));
        Rc::new(m)
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let mut c = TokenCache::new(2, 64);
        c.insert("a", claims(1));
        c.insert("b", claims(2));
        assert!(c.get("a").is_some()); // a is now the most recent
        c.insert("d", claims(3));
        assert_eq!(c.len(), 2);
        assert!(c.get("b").is_none());
        assert!(c.get("a").is_some());
        assert!(c.get("d").is_some());
    }

    #[test]
    fn zero_capacity_stores_nothing_and_clear_empties() {
        let mut c = TokenCache::new(0, 64);
        c.insert("a", claims(1));
        assert!(c.is_empty());
        let mut c = TokenCache::new(3, 64);
        c.insert("a", claims(1));
        c.insert("a", claims(2));
        assert_eq!(c.len(), 1);
        assert_eq!(c.get("a").unwrap()["n"], 2);
        c.clear();
        assert!(c.get("a").is_none());
    }

    #[test]
    fn tokens_sharing_their_hashed_tail_keep_their_own_entries() {
        let tail = "s".repeat(HASHED);
        let (a, b) = (format!("a.{tail}"), format!("b.{tail}"));
        let mut c = TokenCache::new(3, 64);
        c.insert(&a, claims(1));
        c.insert(&b, claims(2));
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&a).unwrap()["n"], 1);
        assert_eq!(c.get(&b).unwrap()["n"], 2);
        assert!(c.get(format!("c.{tail}")).is_none());
        c.remove(&a);
        assert!(c.get(&a).is_none());
        assert_eq!(c.get(&b).unwrap()["n"], 2);
        // Eviction finds the oldest within a shared bucket too.
        c.insert(&a, claims(3));
        c.insert("x", claims(4));
        c.insert("y", claims(5));
        assert_eq!(c.len(), 3);
        assert!(c.get(&b).is_none(), "b was the least recently used");
        assert_eq!(c.get(&a).unwrap()["n"], 3);
    }

    #[test]
    fn same_compares_every_byte() {
        let a: Vec<u8> = (0..37).collect();
        assert!(same(&a, &a.clone()));
        for i in 0..a.len() {
            let mut b = a.clone();
            b[i] ^= 1;
            assert!(!same(&a, &b), "byte {i}");
        }
        assert!(!same(&a, &a[..36]));
        assert!(same(b"", b""));
    }

    #[test]
    fn tokens_compare_whole_and_long_ones_are_not_kept() {
        let mut c = TokenCache::new(3, 4);
        c.insert("abcd", claims(1));
        assert!(c.get("abcd").is_some());
        // A prefix, an extension and a one-byte change are other tokens.
        for other in ["abc", "abcde", "abce"] {
            assert!(c.get(other).is_none(), "{other}");
        }
        assert!(!c.admits("abcde"));
        c.insert("abcde", claims(2));
        assert_eq!(c.len(), 1);
        c.remove("abcd");
        assert!(c.is_empty());
    }
}

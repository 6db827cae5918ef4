//! The verified-token cache: per JWT provider and per plugin instance, the
//! claims of tokens whose signature (and claims) that provider accepted, keyed
//! by the SHA-256 of the exact token string, bounded, least recently used
//! evicted first. It owns no policy: the caller decides what goes in (only
//! tokens that passed every check), rechecks time-dependent claims on a hit,
//! and flushes it when the provider's keys change.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use serde_json::{Map, Value};
use sha2::Digest as _;

/// The cache key: SHA-256 of the token. A cryptographic hash, so two tokens
/// cannot share an entry (a 64-bit hash collision would authenticate the
/// wrong token), and the cache holds no token.
pub type TokenKey = [u8; 32];

/// The key of `token`.
pub fn token_key(token: &str) -> TokenKey {
    sha2::Sha256::digest(token.as_bytes()).into()
}

#[derive(Debug)]
struct Entry {
    claims: Rc<Map<String, Value>>,
    /// Position in `order` (higher: used more recently).
    used: u64,
}

/// A bounded LRU map of verified tokens to their claims.
#[derive(Debug, Default)]
pub struct TokenCache {
    capacity: usize,
    entries: HashMap<TokenKey, Entry>,
    /// `used` → key, oldest first: eviction and touch in O(log n).
    order: BTreeMap<u64, TokenKey>,
    next_use: u64,
}

impl TokenCache {
    /// A cache of at most `capacity` tokens; 0 disables it.
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            capacity,
            ..TokenCache::default()
        }
    }

    /// Whether the cache stores anything.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn bump(&mut self) -> u64 {
        self.next_use += 1;
        self.next_use
    }

    /// The claims of a cached token, marking it most recently used.
    pub fn get(&mut self, key: &TokenKey) -> Option<Rc<Map<String, Value>>> {
        let used = self.bump();
        let e = self.entries.get_mut(key)?;
        self.order.remove(&e.used);
        e.used = used;
        self.order.insert(used, *key);
        Some(Rc::clone(&e.claims))
    }

    /// Remember a verified token, evicting the least recently used at capacity.
    pub fn insert(&mut self, key: TokenKey, claims: Rc<Map<String, Value>>) {
        if !self.enabled() {
            return;
        }
        self.remove(&key);
        while self.entries.len() >= self.capacity {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&old);
        }
        let used = self.bump();
        self.order.insert(used, key);
        self.entries.insert(key, Entry { claims, used });
    }

    /// Forget one token (e.g. it expired).
    pub fn remove(&mut self, key: &TokenKey) {
        if let Some(e) = self.entries.remove(key) {
            self.order.remove(&e.used);
        }
    }

    /// Forget every token (the provider's keys changed).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(n: u64) -> Rc<Map<String, Value>> {
        let mut m = Map::new();
        m.insert("n".to_owned(), Value::from(n));
        Rc::new(m)
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let mut c = TokenCache::new(2);
        let (a, b, d) = (token_key("a"), token_key("b"), token_key("d"));
        c.insert(a, claims(1));
        c.insert(b, claims(2));
        assert!(c.get(&a).is_some()); // a is now the most recent
        c.insert(d, claims(3));
        assert_eq!(c.len(), 2);
        assert!(c.get(&b).is_none());
        assert!(c.get(&a).is_some());
        assert!(c.get(&d).is_some());
    }

    #[test]
    fn zero_capacity_stores_nothing_and_clear_empties() {
        let mut c = TokenCache::new(0);
        c.insert(token_key("a"), claims(1));
        assert!(c.is_empty());
        let mut c = TokenCache::new(3);
        c.insert(token_key("a"), claims(1));
        c.insert(token_key("a"), claims(2));
        assert_eq!(c.len(), 1);
        c.clear();
        assert!(c.get(&token_key("a")).is_none());
    }
}

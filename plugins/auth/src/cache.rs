//! The verified-token cache: per JWT provider and per plugin instance, the
//! claims of tokens whose signature (and claims) that provider accepted, keyed
//! by the exact token string (as Envoy's `jwt_cache_config`), bounded in
//! entries and in token length, least recently used evicted first. It owns no
//! policy: the caller decides what goes in (only tokens that passed every
//! check), rechecks time-dependent claims on a hit, and flushes it when the
//! provider's keys change.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use serde_json::{Map, Value};

#[derive(Debug)]
struct Entry {
    /// The token (the map's key too; kept here for `order`).
    token: Rc<str>,
    claims: Rc<Map<String, Value>>,
    /// Position in `order` (higher: used more recently).
    used: u64,
}

/// A bounded LRU map of verified tokens to their claims.
///
/// Keyed by the token itself, compared whole: two tokens never share an
/// entry. (A hash of the token as the key would need a cryptographic one, so
/// that no collision authenticates the wrong token; SHA-256 of a typical
/// 600-byte token costs more in Wasm than the rest of the plugin's work on a
/// hit.) The map's hasher is std's keyed SipHash, and only verified tokens
/// get in, so requests cannot lengthen its lookups.
#[derive(Debug, Default)]
pub struct TokenCache {
    capacity: usize,
    max_token: usize,
    entries: HashMap<Rc<str>, Entry>,
    /// `used` → token, oldest first: eviction and touch in O(log n).
    order: BTreeMap<u64, Rc<str>>,
    next_use: u64,
}

impl TokenCache {
    /// A cache of at most `capacity` tokens of at most `max_token` bytes each
    /// (longer ones are not cached); capacity 0 disables it.
    pub fn new(capacity: usize, max_token: usize) -> TokenCache {
        TokenCache {
            capacity,
            max_token,
            ..TokenCache::default()
        }
    }

    /// Whether `token` can be cached (the cache is on and the token short
    /// enough): worth looking up.
    pub fn admits(&self, token: &str) -> bool {
        self.capacity > 0 && token.len() <= self.max_token
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
    pub fn get(&mut self, token: &str) -> Option<Rc<Map<String, Value>>> {
        let used = self.bump();
        let e = self.entries.get_mut(token)?;
        self.order.remove(&e.used);
        e.used = used;
        self.order.insert(used, Rc::clone(&e.token));
        Some(Rc::clone(&e.claims))
    }

    /// Remember a verified token, evicting the least recently used at
    /// capacity; a token the cache does not admit is not kept.
    pub fn insert(&mut self, token: &str, claims: Rc<Map<String, Value>>) {
        if !self.admits(token) {
            return;
        }
        self.remove(token);
        while self.entries.len() >= self.capacity {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&old);
        }
        let used = self.bump();
        let token: Rc<str> = Rc::from(token);
        self.order.insert(used, Rc::clone(&token));
        self.entries.insert(
            Rc::clone(&token),
            Entry {
                token,
                claims,
                used,
            },
        );
    }

    /// Forget one token (e.g. it expired).
    pub fn remove(&mut self, token: &str) {
        if let Some(e) = self.entries.remove(token) {
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

//! Shared data (key → value with a CAS token) and shared queues, per process and
//! scoped by `vm_id` as in Envoy: every worker's instance of every plugin with the
//! same `vm_id` sees the same entries.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use tokio::sync::Notify;

use super::abi::status;

struct Entry {
    value: Vec<u8>,
    cas: u32,
}

#[derive(Default)]
struct Store {
    data: HashMap<(String, Vec<u8>), Entry>,
    /// Bytes of keys and values in `data`, kept as entries change (summing
    /// them on every set made each set cost O(entries) under the one lock).
    bytes: usize,
    next_cas: u32,
    queue_ids: HashMap<(String, Vec<u8>), u32>,
    queues: HashMap<u32, Queue>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Vec<u8>>,
    /// The VMs that registered the queue, woken on each enqueue (a stored permit,
    /// so an enqueue during their callback is not lost).
    subscribers: Vec<Weak<Notify>>,
}

/// Caps: one entry's value, all keys and values, entries, one queue's items.
const MAX_VALUE: usize = 1 << 20;
const MAX_TOTAL: usize = 64 << 20;
const MAX_ENTRIES: usize = 100_000;
const MAX_QUEUE: usize = 10_000;

fn store() -> std::sync::MutexGuard<'static, Store> {
    static STORE: OnceLock<Mutex<Store>> = OnceLock::new();
    STORE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// The value of `key` and its CAS token.
pub fn get(vm: &str, key: &[u8]) -> Option<(Vec<u8>, u32)> {
    let s = store();
    s.data
        .get(&(vm.to_string(), key.to_vec()))
        .map(|e| (e.value.clone(), e.cas))
}

/// Sets `key`; `cas` 0 sets unconditionally, else it must match the current token.
pub fn set(vm: &str, key: &[u8], value: &[u8], cas: u32) -> Result<(), i32> {
    if value.len() > MAX_VALUE {
        return Err(status::BAD_ARGUMENT);
    }
    store().set(vm, key, value, cas, (MAX_TOTAL, MAX_ENTRIES))
}

impl Store {
    /// [`set`] under `caps` (bytes of keys and values, entries); a value
    /// replaced counts only once, so a store near its cap can still update.
    fn set(
        &mut self,
        vm: &str,
        key: &[u8],
        value: &[u8],
        cas: u32,
        caps: (usize, usize),
    ) -> Result<(), i32> {
        let k = (vm.to_string(), key.to_vec());
        let current = self.data.get(&k);
        if cas != 0 && current.is_some_and(|e| e.cas != cas) {
            return Err(status::CAS_MISMATCH);
        }
        let old = current.map_or(0, |e| k.0.len() + k.1.len() + e.value.len());
        let new = k.0.len() + k.1.len() + value.len();
        if self.bytes - old + new > caps.0 || (current.is_none() && self.data.len() >= caps.1) {
            return Err(status::BAD_ARGUMENT);
        }
        self.bytes = self.bytes - old + new;
        self.next_cas = self.next_cas.wrapping_add(1).max(1);
        let cas = self.next_cas;
        self.data.insert(
            k,
            Entry {
                value: value.to_vec(),
                cas,
            },
        );
        Ok(())
    }
}

/// Registers (or finds) queue `name` of `vm`.
pub fn register_queue(vm: &str, name: &[u8]) -> u32 {
    let mut s = store();
    let k = (vm.to_string(), name.to_vec());
    if let Some(id) = s.queue_ids.get(&k) {
        return *id;
    }
    let id = u32::try_from(s.queue_ids.len() + 1).unwrap_or(u32::MAX);
    s.queue_ids.insert(k, id);
    s.queues.insert(id, Queue::default());
    id
}

/// The id of an existing queue.
pub fn resolve_queue(vm: &str, name: &[u8]) -> Option<u32> {
    store()
        .queue_ids
        .get(&(vm.to_string(), name.to_vec()))
        .copied()
}

/// Appends to a queue.
pub fn enqueue(id: u32, value: &[u8]) -> Result<(), i32> {
    let mut s = store();
    let q = s.queues.get_mut(&id).ok_or(status::NOT_FOUND)?;
    if q.items.len() >= MAX_QUEUE || value.len() > MAX_VALUE {
        return Err(status::BAD_ARGUMENT);
    }
    q.items.push_back(value.to_vec());
    q.subscribers.retain(|w| match w.upgrade() {
        Some(n) => {
            n.notify_one();
            true
        }
        None => false,
    });
    Ok(())
}

/// Takes the oldest item of a queue.
pub fn dequeue(id: u32) -> Result<Vec<u8>, i32> {
    let mut s = store();
    let q = s.queues.get_mut(&id).ok_or(status::NOT_FOUND)?;
    q.items.pop_front().ok_or(status::EMPTY)
}

/// Subscribes a VM to queue `id`: the returned `Notify` is signalled on each
/// enqueue while the caller holds it.
pub fn subscribe(id: u32) -> Option<Arc<Notify>> {
    let mut s = store();
    let q = s.queues.get_mut(&id)?;
    let n = Arc::new(Notify::new());
    q.subscribers.push(Arc::downgrade(&n));
    // Items enqueued before the subscription (e.g. by the very call that
    // registered the queue, as the VM subscribes after it) wake it at once.
    if !q.items.is_empty() {
        n.notify_one();
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_each_entry_once() {
        let mut s = Store::default();
        // "vm" + "k" + 10 bytes = 13 per entry; room for 30 bytes, 3 entries.
        let caps = (30, 3);
        s.set("vm", b"k", &[0; 10], 0, caps).unwrap();
        // Replacing counts the new value only, not both.
        for _ in 0..5 {
            s.set("vm", b"k", &[1; 10], 0, caps).unwrap();
        }
        assert_eq!(s.bytes, 13);
        s.set("vm", b"j", &[0; 10], 0, caps).unwrap();
        assert_eq!(
            s.set("vm", b"i", &[0; 10], 0, caps),
            Err(status::BAD_ARGUMENT),
            "over the byte cap"
        );
        s.set("vm", b"i", &[], 0, caps).unwrap();
        assert_eq!(
            s.set("vm", b"h", &[], 0, caps),
            Err(status::BAD_ARGUMENT),
            "over the entry cap"
        );
        // A smaller value frees room.
        s.set("vm", b"k", &[], 0, caps).unwrap();
        assert_eq!(s.bytes, 3 + 13 + 3);
    }

    #[test]
    fn cas_guards_concurrent_updates() {
        let vm = "test-cas";
        assert!(get(vm, b"k").is_none());
        assert_eq!(set(vm, b"k", b"1", 0), Ok(()));
        let (v, cas) = get(vm, b"k").expect("set");
        assert_eq!(v, b"1");
        assert_eq!(set(vm, b"k", b"2", cas), Ok(()));
        assert_eq!(set(vm, b"k", b"3", cas), Err(status::CAS_MISMATCH));
        assert_eq!(get(vm, b"k").map(|e| e.0), Some(b"2".to_vec()));
        assert!(get("other-vm", b"k").is_none());
    }

    #[test]
    fn queues_are_fifo_and_scoped() {
        let id = register_queue("test-q", b"q");
        assert_eq!(register_queue("test-q", b"q"), id);
        assert_eq!(resolve_queue("test-q", b"q"), Some(id));
        assert_eq!(resolve_queue("test-q2", b"q"), None);
        assert_eq!(dequeue(id), Err(status::EMPTY));
        enqueue(id, b"a").expect("enqueue");
        enqueue(id, b"b").expect("enqueue");
        assert_eq!(dequeue(id), Ok(b"a".to_vec()));
        assert_eq!(dequeue(id), Ok(b"b".to_vec()));
        assert_eq!(enqueue(999_999, b"x"), Err(status::NOT_FOUND));
    }
}

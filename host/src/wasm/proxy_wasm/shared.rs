//! Shared data (key → value with a CAS token) and shared queues, per process and
//! scoped by `vm_id` as in Envoy: every worker's instance of every plugin with the
//! same `vm_id` sees the same entries.
//!
//! Everything here is host memory outside any plugin's `limits.memory`, so one
//! byte budget ([`MAX_TOTAL`]) covers data keys and values, queue names and
//! queued items together, and queues per `vm_id` are capped. Envoy
//! (proxy-wasm-cpp-host) caps none of it and never refuses an enqueue; a full
//! queue here answers `NOT_FOUND`, the one failure the Rust SDK's
//! `enqueue_shared_queue` returns as an error rather than a panic, and a data
//! write past the caps is answered `OK` without being stored ([`set`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Bytes of keys and values in `data`, of queue names and of queued items,
    /// kept as they change (summing them on every set made each set cost
    /// O(entries) under the one lock).
    bytes: usize,
    next_cas: u32,
    queue_ids: HashMap<(String, Vec<u8>), u32>,
    queues: HashMap<u32, Queue>,
    /// A data write was refused since the last one stored (one warning per
    /// spell).
    data_full: bool,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Vec<u8>>,
    /// Bytes of `items`.
    bytes: usize,
    /// An enqueue was refused since the last one that fitted (one warning
    /// per episode).
    full: bool,
    /// The VMs that registered the queue, woken once per enqueue (counted, so
    /// an enqueue during their callback is not lost, nor merged with others).
    subscribers: Vec<Weak<QueueWake>>,
}

/// A VM's wake-ups for one queue it registered: one `proxy_on_queue_ready` is
/// owed per enqueue (as proxy-wasm-cpp-host posts one per enqueue), counted
/// here and taken one at a time by the VM's queue task.
#[derive(Default)]
pub struct QueueWake {
    notify: Notify,
    /// Wake-ups not yet taken, at most the queue's length when the last was
    /// added: a call beyond the items queued would only find the queue empty,
    /// so a flood of enqueues cannot grow this past the queue's own cap.
    pending: AtomicUsize,
}

impl QueueWake {
    /// One more wake-up, bounded by `queued` (the queue's items now).
    fn add(&self, queued: usize) {
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some((n + 1).min(queued.max(1)))
            });
        self.notify.notify_one();
    }

    /// Waits for a wake-up and takes it.
    pub async fn next(&self) {
        loop {
            let taken = self
                .pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
            if taken {
                return;
            }
            // A stored permit (from an `add` after the check above) wakes
            // this at once; a spurious one finds nothing and waits again.
            self.notify.notified().await;
        }
    }

    /// Wake-ups not yet taken.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

/// Caps: one entry's value (and one queued item), all keys, values, queue
/// names and queued items, entries, one queue's items, queues per `vm_id`,
/// one queue name.
const MAX_VALUE: usize = 1 << 20;
const MAX_TOTAL: usize = 64 << 20;
const MAX_ENTRIES: usize = 100_000;
const MAX_QUEUE: usize = 10_000;
const MAX_QUEUES_PER_VM: usize = 1024;
const MAX_QUEUE_NAME: usize = 1024;

/// The caps [`Store`] enforces (smaller in tests).
#[derive(Clone, Copy)]
struct Caps {
    total: usize,
    entries: usize,
    queue_items: usize,
    queues_per_vm: usize,
    queue_name: usize,
}

const CAPS: Caps = Caps {
    total: MAX_TOTAL,
    entries: MAX_ENTRIES,
    queue_items: MAX_QUEUE,
    queues_per_vm: MAX_QUEUES_PER_VM,
    queue_name: MAX_QUEUE_NAME,
};

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

/// Sets `key`; `cas` 0 sets unconditionally, else it must match the current
/// token. A write past the caps (a value over [`MAX_VALUE`], the store over
/// [`MAX_TOTAL`] or [`MAX_ENTRIES`]) is not stored but answered `OK`: the
/// Rust SDK's `set_shared_data` panics on any status but `OK` and
/// `CAS_MISMATCH` (and a mismatch would spin a filter's CAS loop), while
/// Envoy caps nothing, so a filter written for it keeps running; the key
/// keeps its value (or stays absent), and a warning is logged once per
/// spell of refused writes.
pub fn set(vm: &str, key: &[u8], value: &[u8], cas: u32) -> Result<(), i32> {
    let mut s = store();
    let stored = s.set(vm, key, value, cas, (CAPS.total, CAPS.entries))?;
    if stored {
        s.data_full = false;
    } else if !s.data_full {
        s.data_full = true;
        tracing::warn!(
            vm_id = vm,
            "proxy-wasm shared data is full ({} keys, {} bytes with the queues; the caps are \
             {MAX_ENTRIES} keys, {MAX_TOTAL} bytes, a value {MAX_VALUE} bytes): writes that do \
             not fit are not stored (answered OK, as the SDKs expect) until room is freed",
            s.data.len(),
            s.bytes
        );
    }
    Ok(())
}

impl Store {
    /// [`set`] under `caps` (bytes of keys and values, entries): whether it
    /// was stored (`false`: over a cap); a value replaced counts only once,
    /// so a store near its cap can still update.
    fn set(
        &mut self,
        vm: &str,
        key: &[u8],
        value: &[u8],
        cas: u32,
        caps: (usize, usize),
    ) -> Result<bool, i32> {
        let k = (vm.to_string(), key.to_vec());
        let current = self.data.get(&k);
        if cas != 0 && current.is_some_and(|e| e.cas != cas) {
            return Err(status::CAS_MISMATCH);
        }
        let old = current.map_or(0, |e| k.0.len() + k.1.len() + e.value.len());
        let new = k.0.len() + k.1.len() + value.len();
        if value.len() > MAX_VALUE
            || self.bytes - old + new > caps.0
            || (current.is_none() && self.data.len() >= caps.1)
        {
            return Ok(false);
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
        Ok(true)
    }
}

/// Registers (or finds) queue `name` of `vm`; `BAD_ARGUMENT` for a name over
/// [`MAX_QUEUE_NAME`], a `vm_id` with [`MAX_QUEUES_PER_VM`] queues already, or
/// no room left in [`MAX_TOTAL`] for the name.
pub fn register_queue(vm: &str, name: &[u8]) -> Result<u32, i32> {
    store().register_queue(vm, name, CAPS)
}

/// The id of an existing queue.
pub fn resolve_queue(vm: &str, name: &[u8]) -> Option<u32> {
    store()
        .queue_ids
        .get(&(vm.to_string(), name.to_vec()))
        .copied()
}

/// Appends to a queue; `NOT_FOUND` for an unknown queue, and for an item that
/// does not fit (see the module docs).
pub fn enqueue(id: u32, value: &[u8]) -> Result<(), i32> {
    store().enqueue(id, value, CAPS)
}

/// Takes the oldest item of a queue.
pub fn dequeue(id: u32) -> Result<Vec<u8>, i32> {
    store().dequeue(id)
}

impl Store {
    /// [`register_queue`] under `caps`.
    fn register_queue(&mut self, vm: &str, name: &[u8], caps: Caps) -> Result<u32, i32> {
        let k = (vm.to_string(), name.to_vec());
        if let Some(id) = self.queue_ids.get(&k) {
            return Ok(*id);
        }
        let size = vm.len() + name.len();
        // A new name is rare (a filter registers a few fixed names; finding
        // one returned above), so counting this vm_id's queues by a scan is
        // fine.
        if name.len() > caps.queue_name
            || self.queue_ids.keys().filter(|(v, _)| v == vm).count() >= caps.queues_per_vm
            || self.bytes + size > caps.total
        {
            return Err(status::BAD_ARGUMENT);
        }
        let id = u32::try_from(self.queue_ids.len() + 1).map_err(|_| status::BAD_ARGUMENT)?;
        self.bytes += size;
        self.queue_ids.insert(k, id);
        self.queues.insert(id, Queue::default());
        Ok(id)
    }

    /// [`enqueue`] under `caps`.
    fn enqueue(&mut self, id: u32, value: &[u8], caps: Caps) -> Result<(), i32> {
        let total = self.bytes;
        let q = self.queues.get_mut(&id).ok_or(status::NOT_FOUND)?;
        if q.items.len() >= caps.queue_items
            || value.len() > MAX_VALUE
            || total + value.len() > caps.total
        {
            if !q.full {
                q.full = true;
                tracing::warn!(
                    queue = id,
                    "a proxy-wasm shared queue is full ({} items, {} bytes); items are \
                     refused (NOT_FOUND) until it is drained",
                    q.items.len(),
                    q.bytes
                );
            }
            return Err(status::NOT_FOUND);
        }
        q.full = false;
        q.items.push_back(value.to_vec());
        q.bytes += value.len();
        self.bytes += value.len();
        let queued = q.items.len();
        q.subscribers.retain(|w| match w.upgrade() {
            Some(n) => {
                n.add(queued);
                true
            }
            None => false,
        });
        Ok(())
    }

    /// [`dequeue`].
    fn dequeue(&mut self, id: u32) -> Result<Vec<u8>, i32> {
        let q = self.queues.get_mut(&id).ok_or(status::NOT_FOUND)?;
        let item = q.items.pop_front().ok_or(status::EMPTY)?;
        q.bytes -= item.len();
        self.bytes -= item.len();
        Ok(item)
    }
}

/// Subscribes a VM to queue `id`: the returned [`QueueWake`] gets one
/// wake-up per enqueue while the caller holds it.
pub fn subscribe(id: u32) -> Option<Arc<QueueWake>> {
    let mut s = store();
    let q = s.queues.get_mut(&id)?;
    let n = Arc::new(QueueWake::default());
    q.subscribers.push(Arc::downgrade(&n));
    // Items enqueued before the subscription (e.g. by the very call that
    // registered the queue, as the VM subscribes after it) wake it at once,
    // once per item.
    for _ in 0..q.items.len() {
        n.add(q.items.len());
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
            Ok(false),
            "over the byte cap: not stored"
        );
        assert!(!s.data.contains_key(&("vm".to_string(), b"i".to_vec())));
        s.set("vm", b"i", &[], 0, caps).unwrap();
        assert_eq!(
            s.set("vm", b"h", &[], 0, caps),
            Ok(false),
            "over the entry cap: not stored"
        );
        assert_eq!(
            s.set("vm", b"k", &vec![0; MAX_VALUE + 1], 0, (usize::MAX, 10)),
            Ok(false),
            "over the value cap: not stored"
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
        let id = register_queue("test-q", b"q").unwrap();
        assert_eq!(register_queue("test-q", b"q"), Ok(id));
        assert_eq!(resolve_queue("test-q", b"q"), Some(id));
        assert_eq!(resolve_queue("test-q2", b"q"), None);
        assert_eq!(dequeue(id), Err(status::EMPTY));
        enqueue(id, b"a").expect("enqueue");
        enqueue(id, b"b").expect("enqueue");
        assert_eq!(dequeue(id), Ok(b"a".to_vec()));
        assert_eq!(dequeue(id), Ok(b"b".to_vec()));
        assert_eq!(enqueue(999_999, b"x"), Err(status::NOT_FOUND));
    }

    #[test]
    fn queues_count_in_the_shared_budget() {
        let mut s = Store::default();
        let caps = Caps {
            total: 40,
            entries: 10,
            queue_items: 3,
            queues_per_vm: 2,
            queue_name: 4,
        };
        // Names count: "vm" + "q" = 3 bytes.
        let q = s.register_queue("vm", b"q", caps).unwrap();
        assert_eq!(s.bytes, 3);
        assert_eq!(
            s.register_queue("vm", b"q", caps),
            Ok(q),
            "found, not counted again"
        );
        assert_eq!(s.bytes, 3);
        assert_eq!(
            s.register_queue("vm", b"toolong", caps),
            Err(status::BAD_ARGUMENT),
            "over the name cap"
        );
        s.register_queue("vm", b"r", caps).unwrap();
        assert_eq!(
            s.register_queue("vm", b"s", caps),
            Err(status::BAD_ARGUMENT),
            "over the queues per vm_id"
        );
        s.register_queue("other", b"s", caps).unwrap();
        assert_eq!(s.bytes, 3 + 3 + 6);
        // Items count in the same total as data: 12 + 20 = 32 of 40.
        s.enqueue(q, &[0; 20], caps).unwrap();
        assert_eq!(s.bytes, 32);
        assert_eq!(
            s.set("vm", b"k", &[0; 10], 0, (caps.total, caps.entries)),
            Ok(false)
        );
        // A full queue answers NOT_FOUND (the SDK returns it as an error).
        assert_eq!(
            s.enqueue(q, &[0; 9], caps),
            Err(status::NOT_FOUND),
            "over the bytes"
        );
        s.enqueue(q, &[0; 4], caps).unwrap();
        s.enqueue(q, &[], caps).unwrap();
        assert_eq!(
            s.enqueue(q, &[], caps),
            Err(status::NOT_FOUND),
            "over the items"
        );
        // Dequeuing frees the room.
        assert_eq!(s.dequeue(q).map(|v| v.len()), Ok(20));
        assert_eq!(s.bytes, 16);
        s.set("vm", b"k", &[0; 10], 0, (caps.total, caps.entries))
            .unwrap();
        s.enqueue(q, &[0; 1], caps).unwrap();
        assert_eq!(s.enqueue(999, b"x", caps), Err(status::NOT_FOUND));
    }

    #[test]
    fn one_wake_up_per_enqueue_bounded_by_the_queue() {
        let mut s = Store::default();
        let caps = Caps {
            queue_items: 3,
            ..CAPS
        };
        let q = s.register_queue("vm", b"w", caps).unwrap();
        let wake = Arc::new(QueueWake::default());
        s.queues
            .get_mut(&q)
            .unwrap()
            .subscribers
            .push(Arc::downgrade(&wake));
        s.enqueue(q, b"a", caps).unwrap();
        s.enqueue(q, b"b", caps).unwrap();
        assert_eq!(wake.pending(), 2, "one per enqueue, not merged");
        // Taken one at a time.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(wake.next());
        assert_eq!(wake.pending(), 1);
        // Never more than the items queued: the queue holds 3 at most, and
        // refused enqueues wake nobody.
        s.enqueue(q, b"c", caps).unwrap();
        s.enqueue(q, b"d", caps).unwrap_err();
        assert_eq!(wake.pending(), 2);
        s.dequeue(q).unwrap();
        s.dequeue(q).unwrap();
        s.enqueue(q, b"e", caps).unwrap();
        assert_eq!(wake.pending(), 2, "bounded by the 2 items queued");
    }
}

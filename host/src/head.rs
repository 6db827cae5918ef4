//! What an exchange keeps of a message for its filters without paying for a
//! copy nobody reads: [`Head`], a header map that is either live or a flat
//! read-only snapshot of a head that went on (rebuilt only if a filter reads
//! it later), and [`BodyBuf`], a body chunk lent as the `Bytes` it arrived in
//! until a filter writes it.
//!
//! Both exist for proxy-wasm filters, which may read the request head in every
//! later callback (Envoy keeps both heads for the stream's life) while the
//! originals are consumed by hyper when it writes them, and whose body
//! callbacks see every chunk even when they never look at it.

use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

/// A header map on the exchange: live (read and written as a `HeaderMap`), or
/// a snapshot of a head that went on. A snapshot is one flat buffer (one
/// allocation, a few copies of short byte strings: cheaper to make and to drop
/// than a `HeaderMap` clone with its per-field reference counts); it becomes a
/// `HeaderMap` again on the first read (kept for later reads) or write.
#[derive(Debug, Default)]
pub struct Head {
    map: HeaderMap,
    snapshot: Option<Snapshot>,
}

#[derive(Debug)]
struct Snapshot {
    /// Per field: name length and value length (`u32` little-endian; the value
    /// length's top bit is the value's sensitivity), then the name and the value.
    flat: Vec<u8>,
    /// The map rebuilt from `flat`, once something read it. Boxed: most
    /// snapshots are never read, and an inline map would make every `Head`
    /// 88 bytes bigger (and the exchange that holds two of them too big for
    /// the allocator's small size classes).
    map: OnceLock<Box<HeaderMap>>,
}

const SENSITIVE: u32 = 1 << 31;

impl Head {
    /// A read-only snapshot of `map` as it is now (see [`Head`]).
    pub fn snapshot(map: &HeaderMap) -> Self {
        Self::snapshot_without(map, None)
    }

    /// A read-only snapshot of `map` as it is now, without the fields named
    /// `hidden` (the request's `host`, which filters do not see).
    pub fn snapshot_without(map: &HeaderMap, hidden: Option<&HeaderName>) -> Self {
        // Most fields take well under 64 bytes: usually one allocation.
        let mut flat = Vec::with_capacity(map.len() * 64);
        for (k, v) in map {
            if hidden == Some(k) {
                continue;
            }
            let (k, vb) = (k.as_str().as_bytes(), v.as_bytes());
            // A field is bounded by the connection's head limits, far below 2^31.
            let mut lens = (k.len() as u64) | ((vb.len() as u64 & !u64::from(SENSITIVE)) << 32);
            if v.is_sensitive() {
                lens |= u64::from(SENSITIVE) << 32;
            }
            flat.extend_from_slice(&lens.to_le_bytes());
            flat.extend_from_slice(k);
            flat.extend_from_slice(vb);
        }
        Head {
            map: HeaderMap::new(),
            snapshot: Some(Snapshot {
                flat,
                map: OnceLock::new(),
            }),
        }
    }

    /// The map, moved out (rebuilt first if this is a snapshot); empty after.
    pub fn take(&mut self) -> HeaderMap {
        std::mem::take(&mut **self)
    }

    /// Whether this is a snapshot not rebuilt yet (for tests and debugging).
    pub fn is_flat(&self) -> bool {
        self.snapshot
            .as_ref()
            .is_some_and(|s| s.map.get().is_none())
    }
}

/// The `HeaderMap` a snapshot's `flat` buffer was taken of: same fields, values
/// and order (names and values were valid when taken, so none is dropped).
fn rebuild(flat: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    let mut rest = flat;
    while let Some((lens, tail)) = rest.split_first_chunk::<8>() {
        let [a, b, c, d, e, f, g, h] = *lens;
        let kl = u32::from_le_bytes([a, b, c, d]) as usize;
        let vl = u32::from_le_bytes([e, f, g, h]);
        let sensitive = vl & SENSITIVE != 0;
        let vl = (vl & !SENSITIVE) as usize;
        let Some((k, tail)) = tail.split_at_checked(kl) else {
            break;
        };
        let Some((v, tail)) = tail.split_at_checked(vl) else {
            break;
        };
        rest = tail;
        if let (Ok(k), Ok(mut v)) = (
            HeaderName::from_bytes(k),
            HeaderValue::from_maybe_shared(Bytes::copy_from_slice(v)),
        ) {
            v.set_sensitive(sensitive);
            map.append(k, v);
        }
    }
    map
}

impl From<HeaderMap> for Head {
    fn from(map: HeaderMap) -> Self {
        Head {
            map,
            snapshot: None,
        }
    }
}

impl Deref for Head {
    type Target = HeaderMap;
    fn deref(&self) -> &HeaderMap {
        match &self.snapshot {
            Some(s) => s.map.get_or_init(|| Box::new(rebuild(&s.flat))),
            None => &self.map,
        }
    }
}

impl DerefMut for Head {
    fn deref_mut(&mut self) -> &mut HeaderMap {
        if let Some(Snapshot { flat, map }) = self.snapshot.take() {
            self.map = map.into_inner().map_or_else(|| rebuild(&flat), |m| *m);
        }
        &mut self.map
    }
}

/// A body chunk on the exchange: the `Bytes` it arrived in, lent to the
/// filters until one writes it (then copied once into a `Vec`), so a filter
/// that never touches the body costs no copy of it.
#[derive(Debug, Default)]
pub struct BodyBuf {
    lent: Bytes,
    owned: Option<Vec<u8>>,
}

impl BodyBuf {
    /// The data, writable (copied out of the lent `Bytes` the first time).
    pub fn to_mut(&mut self) -> &mut Vec<u8> {
        self.owned
            .get_or_insert_with(|| Vec::from(std::mem::take(&mut self.lent)))
    }

    /// The data as `Bytes` (no copy if it was never written).
    pub fn into_bytes(self) -> Bytes {
        match self.owned {
            Some(v) => Bytes::from(v),
            None => self.lent,
        }
    }

    /// The data as a `Vec` (copied if it was lent).
    pub fn into_vec(self) -> Vec<u8> {
        match self.owned {
            Some(v) => v,
            None => Vec::from(self.lent),
        }
    }
}

impl From<Bytes> for BodyBuf {
    fn from(lent: Bytes) -> Self {
        BodyBuf { lent, owned: None }
    }
}

impl From<Vec<u8>> for BodyBuf {
    fn from(v: Vec<u8>) -> Self {
        BodyBuf {
            lent: Bytes::new(),
            owned: Some(v),
        }
    }
}

impl Deref for BodyBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.owned {
            Some(v) => v,
            None => &self.lent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert("user-agent", HeaderValue::from_static("ua"));
        m.append("x-a", HeaderValue::from_static("1"));
        m.insert("accept", HeaderValue::from_static("*/*"));
        m.append("x-a", HeaderValue::from_static("2"));
        let mut secret = HeaderValue::from_static("k");
        secret.set_sensitive(true);
        m.insert("x-api-key", secret);
        m.insert("x-empty", HeaderValue::from_static(""));
        m
    }

    fn pairs(m: &HeaderMap) -> Vec<(String, Vec<u8>, bool)> {
        m.iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect()
    }

    #[test]
    fn a_snapshot_reads_as_the_map_it_was_taken_of() {
        let m = sample();
        let h = Head::snapshot(&m);
        assert!(h.is_flat());
        assert_eq!(pairs(&h), pairs(&m));
        assert!(!h.is_flat());
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        assert!(Head::snapshot(&HeaderMap::new()).is_empty());
        let without = Head::snapshot_without(&m, Some(&HeaderName::from_static("x-a")));
        let want: Vec<_> = pairs(&m).into_iter().filter(|p| p.0 != "x-a").collect();
        assert_eq!(pairs(&without), want);
    }

    #[test]
    fn a_snapshot_is_writable_and_takes_as_a_map() {
        let m = sample();
        let mut h = Head::snapshot(&m);
        h.insert("x-new", HeaderValue::from_static("v"));
        assert_eq!(h.len(), m.len() + 1);
        let mut h = Head::snapshot(&m);
        assert_eq!(pairs(&h.take()), pairs(&m));
        assert!(h.is_empty());
        let mut live = Head::from(m.clone());
        assert_eq!(pairs(&live.take()), pairs(&m));
    }

    #[test]
    fn a_body_is_copied_only_when_written() {
        let data = Bytes::from_static(b"chunk");
        let b = BodyBuf::from(data.clone());
        assert_eq!(&*b, b"chunk");
        let out = b.into_bytes();
        assert_eq!(out.as_ptr(), data.as_ptr());
        let mut b = BodyBuf::from(data.clone());
        b.to_mut().extend_from_slice(b"!");
        assert_eq!(&*b, b"chunk!");
        assert_eq!(b.into_vec(), b"chunk!");
        assert_eq!(BodyBuf::from(b"v".to_vec()).into_bytes(), "v");
    }
}

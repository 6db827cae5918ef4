//! Header and trailer maps ([`Headers`]) and body buffers ([`Body`]), both held
//! by the host: every method pulls or pushes exactly what it names.

use crate::backend::{BufferHandle, HeadersHandle};
use crate::Error;

/// A header or trailer map held by the host. Names are case-insensitive and
/// handed out in lower case; values are bytes (HTTP allows non-ASCII octets).
/// Repeated fields (`set-cookie`) stay separate entries and are never joined.
pub struct Headers<'a>(pub(crate) HeadersHandle<'a>);

impl Headers<'_> {
    /// The first value of `name`, if any.
    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.0.get(name)
    }

    /// The first value of `name` as text; `None` if absent or not UTF-8.
    /// The UTF-8 check runs in Wasm over the whole value: prefer
    /// [`Headers::get`] for a value only compared or hashed.
    pub fn get_str(&self, name: &str) -> Option<String> {
        self.get(name).and_then(|v| String::from_utf8(v).ok())
    }

    /// Every value of `name`, in order; empty if none.
    pub fn get_all(&self, name: &str) -> Vec<Vec<u8>> {
        self.0.get_all(name)
    }

    /// Whether `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.0.has(name)
    }

    /// The number of entries (a repeated field counts once per value).
    pub fn len(&self) -> usize {
        self.0.len() as usize
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replace every value of `name` with `value`.
    ///
    /// Errors: `InvalidArgument` (bad name, pseudo-header, or a value with a
    /// control byte other than HTAB, or DEL), `Denied` (hop-by-hop fields and
    /// `content-length`), `InvalidState` (outside the write window),
    /// `LimitExceeded` (over 1024 fields in the map or 64 KiB in the value).
    pub fn set(&self, name: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
        self.0.set(name, value.as_ref())
    }

    /// Append one more value of `name`. Errors: as [`Headers::set`].
    pub fn add(&self, name: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
        self.0.add(name, value.as_ref())
    }

    /// Remove every value of `name`; `Ok` if it was absent. Errors: as
    /// [`Headers::set`] (removing `content-length` is allowed).
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        self.0.remove(name)
    }

    /// A copy of the whole map, in order. The only call that copies more than
    /// one field: use it only when you need every field.
    pub fn entries(&self) -> Vec<(String, Vec<u8>)> {
        self.0.entries()
    }
}

/// A body chunk or a whole buffered body, held by the host. Reads copy only the
/// range asked for.
pub struct Body<'a>(pub(crate) BufferHandle<'a>);

impl Body<'_> {
    /// The current length in bytes.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max_len` bytes from `offset`; empty at or past the end.
    pub fn read(&self, offset: u64, max_len: u64) -> Vec<u8> {
        self.0.read(offset, max_len)
    }

    /// The whole contents (one copy).
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.read(0, self.0.len())
    }

    /// Replace the whole contents. Errors: `InvalidState` (already forwarded),
    /// `LimitExceeded` (past the plugin's buffer cap).
    pub fn replace(&self, data: impl AsRef<[u8]>) -> Result<(), Error> {
        self.0.replace(data.as_ref())
    }

    /// Replace `remove_len` bytes at `offset` with `data` (insert with
    /// `remove_len = 0`, truncate with empty `data`). Errors: as
    /// [`Body::replace`], and `InvalidArgument` for a range past the end.
    pub fn splice(
        &self,
        offset: u64,
        remove_len: u64,
        data: impl AsRef<[u8]>,
    ) -> Result<(), Error> {
        self.0.splice(offset, remove_len, data.as_ref())
    }

    /// Append `data` at the end. Errors: as [`Body::replace`].
    pub fn append(&self, data: impl AsRef<[u8]>) -> Result<(), Error> {
        self.0.splice(self.0.len(), 0, data.as_ref())
    }
}

//! The compiled-component disk cache: Cranelift output for a module, keyed by the
//! module's SHA-256 and the engine (wasmtime version and compilation settings), so
//! a restart or `legate check` does not compile the same plugin again.
//!
//! Where: `$LEGATE_WASM_CACHE` if set (`off` or empty disables the cache), else
//! `$XDG_CACHE_HOME/legate/wasm`, else `$HOME/.cache/legate/wasm`. The directory is
//! created with mode 0700 and used only if it is owned by this user and not
//! writable by anyone else: loading an entry runs its machine code, so the cache is
//! exactly as trusted as the files Legate executes. Entries are written to a
//! temporary file and renamed into place, so a reader never sees half an entry; a
//! corrupt or incompatible entry is recompiled and overwritten, never fatal.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::Engine;

use crate::stats::Stats;

/// The cache's counters. All three are created (at 0) with the first lookup,
/// whatever its outcome, as Envoy creates its stats up front: a series that
/// appeared only with its first event would hide that event from Prometheus'
/// `increase()` and `rate()`.
struct CacheCounters {
    hits: crate::stats::Counter,
    misses: crate::stats::Counter,
    invalid: crate::stats::Counter,
}

impl CacheCounters {
    fn new(stats: &Stats) -> CacheCounters {
        CacheCounters {
            hits: stats.counter(
                "legate_wasm_cache_hits_total",
                "Plugin compilations loaded from the disk cache.",
                &[],
            ),
            misses: stats.counter(
                "legate_wasm_cache_misses_total",
                "Plugin compilations not found in the disk cache.",
                &[],
            ),
            invalid: stats.counter(
                "legate_wasm_cache_invalid_total",
                "Disk cache entries that could not be loaded and were recompiled.",
                &[],
            ),
        }
    }
}

/// A usable cache directory and this engine's key.
pub struct Cache {
    dir: PathBuf,
    engine_key: String,
}

fn default_dir() -> Option<PathBuf> {
    match std::env::var_os("LEGATE_WASM_CACHE") {
        Some(v) if v.is_empty() || v == "off" => return None,
        Some(v) => return Some(PathBuf::from(v)),
        None => {}
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("legate/wasm"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/legate/wasm"))
}

/// Creates `dir` (0700) if needed and checks it is private to this user.
fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Our effective uid owns /proc/self.
    let uid = std::fs::metadata("/proc/self")
        .map_err(|e| format!("cannot read /proc/self: {e}"))?
        .uid();
    if meta.uid() != uid || meta.permissions().mode() & 0o022 != 0 {
        return Err(format!(
            "{} is not owned by this user or is writable by others",
            dir.display()
        ));
    }
    Ok(())
}

/// The reason the cache was last said to be disabled ([`Cache::at`]).
type Warned = std::sync::Mutex<Option<String>>;

impl Cache {
    /// The cache the environment configures, if it is usable.
    pub fn from_env(engine: &Engine) -> Option<Cache> {
        // Each plugin's compile asks; the warning is said once while the
        // cause lasts, not once per plugin (a demo config logged it 4 times).
        static WARNED: Warned = std::sync::Mutex::new(None);
        Self::at(engine, default_dir()?, &WARNED)
    }

    /// The cache in `dir` if it is usable; if not, `None`, with a warning
    /// unless `warned` holds the same reason (it holds the last one said,
    /// until the directory is usable again).
    fn at(engine: &Engine, dir: PathBuf, warned: &Warned) -> Option<Cache> {
        let usable = private_dir(&dir);
        let mut warned = warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(why) = usable {
            if warned.as_deref() != Some(why.as_str()) {
                tracing::warn!("Wasm compile cache disabled: {why}");
                *warned = Some(why);
            }
            return None;
        }
        *warned = None;
        drop(warned);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Some(Cache {
            dir,
            // The hash covers wasmtime's version and every setting that affects code.
            engine_key: format!("wasmtime48-{:016x}", h.finish()),
        })
    }

    fn entry(&self, module_sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{module_sha256}-{}.cwasm", self.engine_key))
    }

    /// The cached component for a module digest, if there is a valid one.
    pub fn load(&self, engine: &Engine, module_sha256: &str, stats: &Stats) -> Option<Component> {
        let counters = CacheCounters::new(stats);
        let path = self.entry(module_sha256);
        if !path.is_file() {
            counters.misses.inc();
            return None;
        }
        // Read into memory rather than `deserialize_file`, which maps the file: a
        // mapped entry truncated by someone else would kill the process with SIGBUS.
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("cannot read {}: {e}; recompiling", path.display());
                return None;
            }
        };
        #[allow(unsafe_code)]
        // SAFETY: `deserialize` trusts its input to be wasmtime's own output (it
        // runs its machine code later). It is: the cache directory is private to
        // this user (checked in `from_env`: owned by us, not writable by others, so
        // only this user — who can also replace the legate binary — can write it),
        // and entries are written by `store` below from `Component::serialize` via a
        // rename, so they are never partial. wasmtime checks the header, version and
        // engine settings and returns an error (handled: recompile) for anything
        // else, such as a corrupt or foreign file.
        let loaded = unsafe { Component::deserialize(engine, &bytes) };
        match loaded {
            Ok(c) => {
                counters.hits.inc();
                Some(c)
            }
            Err(e) => {
                tracing::warn!(
                    "Wasm compile cache entry {} is unusable ({e}); recompiling",
                    path.display()
                );
                counters.invalid.inc();
                None
            }
        }
    }

    /// Writes a compiled component (best effort: a failure only logs).
    pub fn store(&self, module_sha256: &str, component: &Component) {
        let path = self.entry(module_sha256);
        let tmp = self.dir.join(format!(
            ".{module_sha256}.{}.{:?}.tmp",
            std::process::id(),
            std::thread::current().id()
        ));
        let result = component
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|bytes| std::fs::write(&tmp, bytes).map_err(|e| e.to_string()))
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| e.to_string()));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(
                "cannot write Wasm compile cache entry {}: {e}",
                path.display()
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn an_unusable_cache_is_warned_once_while_it_lasts() {
        let engine = super::super::engine::engine().unwrap();
        let base = std::env::temp_dir().join(format!("legate-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        // A directory below a file cannot be made.
        let file = base.join("file");
        std::fs::write(&file, b"").unwrap();
        let broken = file.join("wasm");
        let good = base.join("wasm");
        let warned = Warned::new(None);
        let said = crate::testing::warnings(|| {
            for _ in 0..4 {
                assert!(Cache::at(engine, broken.clone(), &warned).is_none());
            }
        });
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with("Wasm compile cache disabled: "),
            "{said:?}"
        );
        // Usable again, then broken again: said again.
        let said = crate::testing::warnings(|| {
            assert!(Cache::at(engine, good.clone(), &warned).is_some());
            assert!(Cache::at(engine, broken.clone(), &warned).is_none());
        });
        assert_eq!(said.len(), 1, "{said:?}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}

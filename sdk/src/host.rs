//! Small host services: clocks ([`clock`]), randomness ([`random`]) and facts
//! about the running plugin ([`plugin`]).

/// Clocks, cheaper and typed compared to WASI's.
pub mod clock {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// Wall-clock time as Unix nanoseconds (may step).
    pub fn wall_now() -> u64 {
        crate::backend::wall_now()
    }

    /// Wall-clock time as a [`SystemTime`].
    pub fn system_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(wall_now())
    }

    /// Monotonic nanoseconds since an origin fixed for the host process (the
    /// same on every instance); never decreases.
    pub fn monotonic_now() -> u64 {
        crate::backend::monotonic_now()
    }
}

/// Cryptographically secure random data.
pub mod random {
    use crate::Error;

    /// `len` random bytes. Errors: `LimitExceeded` if `len` > 65536.
    pub fn bytes(len: u32) -> Result<Vec<u8>, Error> {
        crate::backend::random_bytes(len)
    }

    /// One random `u64`.
    pub fn u64() -> u64 {
        crate::backend::random_u64()
    }
}

/// Facts about the running plugin.
pub mod plugin {
    /// The plugin's name in the host configuration.
    pub fn name() -> String {
        crate::backend::plugin_name()
    }

    /// Which instance this is: the worker index, 0-based.
    pub fn instance_index() -> u32 {
        crate::backend::instance_index()
    }

    /// The contents of data file `name`, granted to the plugin in the host
    /// configuration (`files: {NAME: PATH}`, read by the host at load). Read it
    /// once in `configure`. Errors: `NotFound` if no such file was granted.
    ///
    /// ```no_run
    /// # fn f() -> Result<(), legate_sdk::Error> {
    /// let descriptors = legate_sdk::plugin::file("descriptors")?;
    /// # Ok(()) }
    /// ```
    pub fn file(name: &str) -> Result<Vec<u8>, crate::Error> {
        crate::backend::plugin_file(name)
    }
}

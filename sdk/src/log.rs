//! Logging into the host's log, tagged with the plugin name (and, inside an
//! exchange, its request id). Use the macros: [`info!`](crate::info) and friends
//! skip formatting when the host would drop the message.

use crate::backend;

/// A log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected but handled.
    Warn,
    /// A failure.
    Error,
}

/// Log `message` at `level`. Never fails; long messages are truncated by the host.
pub fn log(level: Level, message: &str) {
    backend::log(level, message)
}

/// Whether a message at `level` would be written.
pub fn enabled(level: Level) -> bool {
    backend::log_enabled(level)
}

/// Log a formatted message at a [`Level`]: `log!(Level::Info, "x = {}", x)`.
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {{
        let level = $level;
        if $crate::log::enabled(level) {
            $crate::log::log(level, &::std::format!($($arg)+));
        }
    }};
}

/// Log a formatted message at `trace`.
#[macro_export]
macro_rules! trace { ($($arg:tt)+) => { $crate::log!($crate::log::Level::Trace, $($arg)+) }; }
/// Log a formatted message at `debug`.
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::log!($crate::log::Level::Debug, $($arg)+) }; }
/// Log a formatted message at `info`.
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::log!($crate::log::Level::Info, $($arg)+) }; }
/// Log a formatted message at `warn`.
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::log!($crate::log::Level::Warn, $($arg)+) }; }
/// Log a formatted message at `error`.
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::log!($crate::log::Level::Error, $($arg)+) }; }

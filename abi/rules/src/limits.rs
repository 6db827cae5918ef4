//! Limits (abi/README.md §7, §3.5): the caps the host puts on what a filter
//! writes, sends and asks for, and the statuses it may give a response.
//! The host enforces them; the SDK's native harness refuses the same calls
//! with the same errors.

use std::ops::RangeInclusive;

/// The most fields a filter may put in one header map (a head, trailers, a
/// local response, a callout request); a write past it is `limit-exceeded`
/// (replacing a field the map holds is not a new field). The host's
/// `HeaderMap` panics past 24 576 names, and a guest must not grow host
/// memory without bound.
pub const MAX_FILTER_FIELDS: usize = 1024;

/// The longest field value a filter may write, in bytes (`limit-exceeded`
/// past it).
pub const MAX_FILTER_FIELD_VALUE: usize = 64 * 1024;

/// The statuses a filter may give a response: its local response's (another
/// fails the call, abi/README.md §3.5) and `exchange.set-status`'s (another
/// is `invalid-argument`).
pub const RESPONSE_STATUS: RangeInclusive<u16> = 200..=599;

/// The longest callout timeout a filter may ask for, in milliseconds; a
/// callout asking for more is refused (`invalid-argument`). 0 is the host's
/// default timeout.
pub const CALLOUT_MAX_TIMEOUT_MS: u32 = 30_000;

/// The largest callout response body the host reads, in bytes: a larger one
/// is delivered as `limit-exceeded`.
pub const CALLOUT_MAX_RESPONSE: usize = 1 << 20;

/// Callouts and asynchronous KV calls one context (an exchange, a
/// connection, or the plugin's ticks) may have outstanding
/// (`limit-exceeded` past it).
pub const CALLOUTS_PER_CONTEXT: usize = 8;

/// Callouts and asynchronous KV calls one instance may have outstanding, over
/// all its contexts (`limit-exceeded` past it).
pub const CALLOUTS_PER_INSTANCE: usize = 1024;

/// The shortest tick interval a plugin may ask for, in milliseconds (0 asks
/// for no ticks); a shorter one fails `configure`.
pub const MIN_TICK_MS: u32 = 10;

/// The default per-plugin cap of a buffered body, and of what a network
/// filter may hold per direction (the configuration's `limits.body`).
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// The values the configuration's `limits.body` may take, in bytes: 1 KiB to
/// 64 MiB (a buffered body is held in host memory per exchange).
pub const BODY_LIMIT: RangeInclusive<usize> = (1 << 10)..=(64 << 20);

/// The most request header names one plugin config may declare with
/// `http.sanitize-request-headers` (`limit-exceeded` past it): each costs
/// every request of its listener one map removal.
pub const MAX_SANITIZED_HEADERS: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_statuses() {
        for ok in [200, 204, 301, 404, 599] {
            assert!(RESPONSE_STATUS.contains(&ok), "{ok}");
        }
        for bad in [0, 100, 101, 199, 600, 999, u16::MAX] {
            assert!(!RESPONSE_STATUS.contains(&bad), "{bad}");
        }
        assert_eq!(format!("{RESPONSE_STATUS:?}"), "200..=599");
    }

    #[test]
    fn body_limits() {
        assert!(BODY_LIMIT.contains(&DEFAULT_BODY_LIMIT));
        assert_eq!(
            (*BODY_LIMIT.start(), *BODY_LIMIT.end()),
            (1024, 64 * 1024 * 1024)
        );
    }
}

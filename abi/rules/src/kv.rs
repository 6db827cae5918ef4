//! KV (abi/README.md §5.7): the values `increment` counts.

/// A stored integer in the only form Redis's `HINCRBY` takes (its
/// `string2ll`): ASCII decimal, no `+`, no leading zero, no `-0`, so every
/// backend (the host's memory and Redis stores, the SDK's fake) refuses the
/// same values. `None` for any other value: `increment` fails with
/// `invalid-argument`.
pub fn canonical_int(value: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(value).ok()?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.starts_with('+') || (digits.starts_with('0') && s != "0") {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_integers() {
        for bad in ["+5", "05", "-0", "-05", "", " 5", "5 ", "1e3", "--1", "-"] {
            assert_eq!(canonical_int(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(canonical_int(b"\xff"), None);
        for (good, n) in [
            ("0", 0),
            ("-1", -1),
            ("41", 41),
            ("-9223372036854775808", i64::MIN),
            ("9223372036854775807", i64::MAX),
        ] {
            assert_eq!(canonical_int(good.as_bytes()), Some(n), "{good:?}");
        }
        assert_eq!(canonical_int(b"9223372036854775808"), None);
    }
}

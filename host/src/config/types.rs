//! Scalar types of the config language: names, durations, byte sizes.
//!
//! Each parses from the form a person writes (`250ms`, `64KiB`) and serializes back
//! to the same form, so `/config_dump` shows what the file said.

use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A name of a listener, route table, route, virtual host or cluster.
///
/// Names appear in stats and logs, so they are restricted to `[A-Za-z0-9_.-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Builds a name, checking the allowed characters.
    pub fn new(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("a name must not be empty".into());
        }
        if s.len() > 128 {
            return Err(format!("name `{s}` is longer than 128 characters"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(format!(
                "name `{s}` contains `{c}`; names may use only letters, digits, `_`, `-` and `.`"
            ));
        }
        Ok(Name(s.to_string()))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::new(&s).map_err(de::Error::custom)
    }
}

/// A duration written as `<number><unit>` with unit `ms`, `s`, `m` or `h` (`250ms`, `5s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl Dur {
    /// Seconds.
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    /// Milliseconds.
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
    /// The std duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// Parses `250ms`, `5s`, `1.5s`, `2m`, `1h`, exactly: the decimal digits are
    /// read as written, not through a float (`0.1s` is 100ms, not 99.999999ms), to
    /// the nanosecond; a fraction finer than that is dropped.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("the duration is empty; write it like `250ms` or `5s`".into());
        }
        let Some(split) = s.find(|c: char| !(c.is_ascii_digit() || c == '.')) else {
            // Suggest the number in seconds only when that is a valid duration.
            let example = match Dur::parse(&format!("{s}s")) {
                Ok(_) => format!("{s}s"),
                Err(_) => "5s".to_string(),
            };
            return Err(format!(
                "duration `{s}` has no unit; write it like `{example}` (units: `ms`, `s`, `m`, `h`)"
            ));
        };
        let (num, unit) = s.split_at(split);
        let number_error = || {
            format!("duration `{s}` does not start with a number; write it like `250ms` or `5s`")
        };
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(number_error());
        }
        let Some(unit_ns) = unit_nanos(unit) else {
            if unit.starts_with(char::is_whitespace) && unit_nanos(unit.trim_start()).is_some() {
                return Err(format!(
                    "duration `{s}` has a space between the number and its unit; write it \
                     without spaces: `{num}{}`",
                    unit.trim_start()
                ));
            }
            if let Some(total) = compound(s) {
                return Err(format!(
                    "duration `{s}` has more than one unit; write it in one unit: `{}`",
                    total.largest_unit()
                ));
            }
            return Err(format!(
                "duration `{s}` has unknown unit `{}`; use `ms`, `s`, `m` or `h` right after \
                 the number, e.g. `{num}s`",
                unit.trim()
            ));
        };
        let out_of_range = || format!("duration `{s}` is out of range (at most a year)");
        let nanos = exact_nanos(num, unit_ns).ok_or_else(out_of_range)?;
        if nanos > u128::from(MAX_SECS) * NANOS_PER_SEC {
            return Err(out_of_range());
        }
        if nanos == 0 && num.contains(|c: char| ('1'..='9').contains(&c)) {
            return Err(format!(
                "duration `{s}` is shorter than a nanosecond, which would be zero; the \
                 shortest is `0.000001ms`"
            ));
        }
        let nanos = u64::try_from(nanos).map_err(|_| out_of_range())?;
        Ok(Dur(Duration::from_nanos(nanos)))
    }

    /// The duration in the largest unit that writes it as a whole number (`90m`,
    /// `1h`), else as [`Display`](fmt::Display) writes it.
    fn largest_unit(self) -> String {
        let ns = self.0.as_nanos();
        let (h, m) = (3600 * NANOS_PER_SEC, 60 * NANOS_PER_SEC);
        if ns != 0 && ns.is_multiple_of(h) {
            format!("{}h", ns / h)
        } else if ns != 0 && ns.is_multiple_of(m) {
            format!("{}m", ns / m)
        } else {
            self.to_string()
        }
    }
}

const NANOS_PER_SEC: u128 = 1_000_000_000;
/// The longest duration the config takes: a year.
const MAX_SECS: u64 = 365 * 24 * 3600;

/// Nanoseconds in one `unit`; `None` for an unknown unit.
fn unit_nanos(unit: &str) -> Option<u128> {
    match unit {
        "ms" => Some(NANOS_PER_SEC / 1000),
        "s" => Some(NANOS_PER_SEC),
        "m" => Some(60 * NANOS_PER_SEC),
        "h" => Some(3600 * NANOS_PER_SEC),
        _ => None,
    }
}

/// `num` (digits with at most one `.`) times `unit_ns`, in whole nanoseconds
/// (truncated); `None` when it does not fit.
fn exact_nanos(num: &str, unit_ns: u128) -> Option<u128> {
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    // Digits past the 18th are below a nanosecond of an hour.
    let frac = &frac[..frac.len().min(18)];
    let scale = 10u128.pow(u32::try_from(frac.len()).ok()?);
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    int.checked_mul(unit_ns)?
        .checked_add(frac.checked_mul(unit_ns)? / scale)
}

/// `1h30m` as one duration, when it is whole numbers each with a unit, in
/// decreasing units (what Go's `time.ParseDuration` reads): for the hint.
fn compound(s: &str) -> Option<Dur> {
    let mut rest = s;
    let mut total: u128 = 0;
    let mut last = u128::MAX;
    let mut parts = 0;
    while !rest.is_empty() {
        let n = rest.find(|c: char| !c.is_ascii_digit())?;
        let (num, tail) = rest.split_at(n);
        let unit = ["ms", "h", "m", "s"]
            .into_iter()
            .find(|u| tail.starts_with(u))?;
        let unit_ns = unit_nanos(unit)?;
        if num.is_empty() || unit_ns >= last {
            return None;
        }
        last = unit_ns;
        total = total.checked_add(exact_nanos(num, unit_ns)?)?;
        rest = &tail[unit.len()..];
        parts += 1;
    }
    if parts < 2 || total > u128::from(MAX_SECS) * NANOS_PER_SEC {
        return None;
    }
    Some(Dur(Duration::from_nanos(u64::try_from(total).ok()?)))
}

/// Whole seconds as `5s`, whole milliseconds as `250ms`, anything finer as a
/// decimal number of milliseconds (`1.5ms`, `0.0001ms` for 100ns): exactly the
/// duration in force, in a form [`Dur::parse`] reads back to the same value.
impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0.as_nanos();
        let per_ms = NANOS_PER_SEC / 1000;
        if ns != 0 && ns.is_multiple_of(NANOS_PER_SEC) {
            write!(f, "{}s", ns / NANOS_PER_SEC)
        } else if ns.is_multiple_of(per_ms) {
            write!(f, "{}ms", ns / per_ms)
        } else {
            let frac = format!("{:06}", ns % per_ms);
            write!(f, "{}.{}ms", ns / per_ms, frac.trim_end_matches('0'))
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(de::Error::custom)
    }
}

/// A size in bytes, written as a plain number or with a unit: `512`, `64KiB`, `1MiB`,
/// `1GiB` (also `KB`/`MB`/`GB` meaning the same powers of 1024, as nginx reads them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `512`, `64KiB`, `1MiB`, `1GiB`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.starts_with('-') {
            return Err(format!("size `{s}` must not be negative"));
        }
        let too_large = || format!("size `{s}` is too large; the largest is 16EiB minus a byte");
        // A number without a unit that is not a whole number of bytes: `1.5e9`,
        // `1e6`, `0.5` (YAML reads these as floats).
        if let Ok(v) = s.parse::<f64>() {
            if s.starts_with(|c: char| c.is_ascii_digit() || c == '.')
                && !s.bytes().all(|b| b.is_ascii_digit())
            {
                if v.fract() != 0.0 {
                    return Err(format!(
                        "size `{s}` is not a whole number of bytes; write whole bytes or use a \
                         smaller unit (`1536KiB`, not `1.5MiB`)"
                    ));
                }
                // 2^64 is exactly representable: below it, the value is a u64.
                if v >= 18_446_744_073_709_551_616.0 {
                    return Err(too_large());
                }
                return Err(format!(
                    "size `{s}` must be written as a whole number, with digits only: `{}`",
                    v as u64
                ));
            }
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(format!(
                "size `{s}` does not start with a whole number; write it like `64KiB` or `1MiB`"
            ));
        }
        // Digits only, so the parse fails only when the number overflows.
        let n: u64 = num.parse().map_err(|_| too_large())?;
        if unit.starts_with(['.', ',']) {
            return Err(format!(
                "size `{s}` is not a whole number; use a smaller unit (`1536KiB`, not `1.5MiB`)"
            ));
        }
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "KB" | "K" | "k" => 1 << 10,
            "MiB" | "MB" | "M" | "m" => 1 << 20,
            "GiB" | "GB" | "G" | "g" => 1 << 30,
            u => {
                return Err(format!(
                    "size `{s}` has unknown unit `{u}`; use `KiB`, `MiB` or `GiB`"
                ))
            }
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(too_large)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n != 0 && n.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", n >> 30)
        } else if n != 0 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n != 0 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read as the text written, like [`Dur`]: a number YAML would read as a float
/// (`1.5e9`) or that does not fit 64 bits is then reported as written, at the value.
impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ByteSize::parse(&s).map_err(de::Error::custom)
    }
}

/// An IP address range, written `10.0.0.0/8`, `2001:db8::/32`, or an address
/// alone (`192.0.2.7`: that one address). Bits past the prefix must be zero, so
/// that `10.1.2.3/8` (a typo for `/32`, or for `10.0.0.0/8`?) is an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub addr: std::net::IpAddr,
    /// The prefix length: up to 32 (IPv4) or 128 (IPv6).
    pub prefix: u8,
}

impl Cidr {
    /// Parses the written form; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = ip
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address range; write it like `10.0.0.0/8`, `2001:db8::/32` or `192.0.2.7`"))?;
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
        };
        // `::ffff:10.0.0.0/104` is `10.0.0.0/8`: clients are compared as IPv4.
        let (addr, prefix) = match addr {
            std::net::IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (std::net::IpAddr::V4(v4), prefix - 96),
                None => (addr, prefix),
            },
            _ => (addr, prefix),
        };
        let cidr = Cidr { addr, prefix };
        if cidr.network() != addr {
            return Err(format!(
                "`{s}` has bits set past its /{prefix} prefix; write the network, `{}/{prefix}`",
                cidr.network()
            ));
        }
        Ok(cidr)
    }

    /// The address with the bits past the prefix cleared.
    fn network(&self) -> std::net::IpAddr {
        match self.addr {
            std::net::IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                std::net::IpAddr::V4((u32::from(a) & mask).into())
            }
            std::net::IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                std::net::IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as its
    /// IPv4 address).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (std::net::IpAddr::V4(net), std::net::IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(net)
            }
            (std::net::IpAddr::V6(net), std::net::IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(s.trim()).map_err(de::Error::custom)
    }
}

/// A percentage, written `50%` (or a bare number, `50`), from 0 to 100.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Percent(pub f64);

impl Percent {
    /// A draw at random per request: true for this share of draws (always
    /// at 100% and more, without drawing).
    pub fn draw(self) -> bool {
        use rand::Rng as _;
        self.0 >= 100.0 || rand::rng().random::<f64>() * 100.0 < self.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Percent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage such as `50%`")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Percent, E> {
                Ok(Percent(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Percent, E> {
                Ok(Percent(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Percent, E> {
                Ok(Percent(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Percent, E> {
                let num = v.trim().strip_suffix('%').unwrap_or(v).trim();
                num.parse::<f64>()
                    .ok()
                    .filter(|p| p.is_finite())
                    .map(Percent)
                    .ok_or_else(|| {
                        E::custom(format!("`{v}` is not a percentage; write it like `50%`"))
                    })
            }
        }
        d.deserialize_any(V)
    }
}

/// An HTTP status or an inclusive range of them: `200`, or `"200-299"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRange {
    /// First status of the range.
    pub lo: u16,
    /// Last status of the range (equal to `lo` for a single status).
    pub hi: u16,
}

impl StatusRange {
    /// Whether it is a status or a rising range of them, within 100–599.
    pub fn is_valid(&self) -> bool {
        (100..=599).contains(&self.lo) && (100..=599).contains(&self.hi) && self.lo <= self.hi
    }

    /// Whether `status` is in the range.
    pub fn contains(&self, status: u16) -> bool {
        (self.lo..=self.hi).contains(&status)
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl Serialize for StatusRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.lo == self.hi {
            s.serialize_u16(self.lo)
        } else {
            s.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = StatusRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status such as `200` or a range such as `\"200-299\"`")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StatusRange, E> {
                let s = u16::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not an HTTP status")))?;
                Ok(StatusRange { lo: s, hi: s })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StatusRange, E> {
                let v = u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not an HTTP status")))?;
                self.visit_u64(v)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StatusRange, E> {
                let bad = || {
                    E::custom(format!(
                        "`{v}` is not a status or a status range; write `200` or `\"200-299\"`"
                    ))
                };
                let (lo, hi) = match v.split_once('-') {
                    Some((lo, hi)) => (lo.trim(), hi.trim()),
                    None => (v.trim(), v.trim()),
                };
                Ok(StatusRange {
                    lo: lo.parse().map_err(|_| bad())?,
                    hi: hi.parse().map_err(|_| bad())?,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(Dur::parse("1.5s").unwrap().0, Duration::from_millis(1500));
        assert_eq!(Dur::parse("2m").unwrap().0, Duration::from_secs(120));
        assert!(Dur::parse("5").unwrap_err().contains("no unit"));
        assert!(Dur::parse("5d").unwrap_err().contains("unknown unit `d`"));
        assert!(Dur::parse("30 seconds")
            .unwrap_err()
            .contains("unknown unit `seconds`"));
        for (spaced, fixed) in [
            ("5 s", "`5s`"),
            ("250  ms", "`250ms`"),
            ("1.5\th", "`1.5h`"),
        ] {
            let err = Dur::parse(spaced).unwrap_err();
            assert!(
                err.contains("has a space between the number and its unit")
                    && err.ends_with(&format!("write it without spaces: {fixed}")),
                "{spaced}: {err}"
            );
        }
        assert!(Dur::parse("-5s")
            .unwrap_err()
            .contains("start with a number"));
        assert_eq!(Dur::secs(5).to_string(), "5s");
        assert_eq!(Dur::millis(1500).to_string(), "1500ms");
    }

    #[test]
    fn durations_are_exact_and_display_reads_back() {
        for (text, nanos, shown) in [
            ("0.0001ms", 100, "0.0001ms"),
            ("1.5ms", 1_500_000, "1.5ms"),
            ("0.1s", 100_000_000, "100ms"),
            ("0.000001ms", 1, "0.000001ms"),
            ("1.0000005s", 1_000_000_500, "1000.0005ms"),
            ("0ms", 0, "0ms"),
            ("0s", 0, "0ms"),
            ("2m", 120_000_000_000, "120s"),
            ("8760h", 31_536_000_000_000_000, "31536000s"),
        ] {
            let d = Dur::parse(text).unwrap();
            assert_eq!(d.0.as_nanos(), nanos, "{text}");
            assert_eq!(d.to_string(), shown, "{text}");
            assert_eq!(Dur::parse(&d.to_string()).unwrap(), d, "{text}");
        }
        assert!(Dur::parse("0.0000001ms")
            .unwrap_err()
            .contains("shorter than a nanosecond"));
        assert!(Dur::parse("8761h").unwrap_err().contains("out of range"));
        assert!(Dur::parse("1.2.3s")
            .unwrap_err()
            .contains("does not start with a number"));
    }

    #[test]
    fn duration_hints_are_valid_durations() {
        for (text, fixed) in [
            ("1h30m", "`90m`"),
            ("1m30s", "`90s`"),
            ("1s500ms", "`1500ms`"),
        ] {
            let err = Dur::parse(text).unwrap_err();
            assert!(
                err.contains("more than one unit") && err.ends_with(fixed),
                "{text}: {err}"
            );
        }
        let err = Dur::parse("99999999999999999999").unwrap_err();
        assert!(err.contains("has no unit") && err.contains("`5s`"), "{err}");
        assert!(Dur::parse("30").unwrap_err().contains("`30s`"));
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("64KiB").unwrap().0, 65536);
        assert_eq!(ByteSize::parse("1MB").unwrap().0, 1 << 20);
        assert_eq!(ByteSize::parse("100").unwrap().0, 100);
        assert!(ByteSize::parse("1TiB")
            .unwrap_err()
            .contains("unknown unit `TiB`"));
        assert!(ByteSize::parse("1.5MiB")
            .unwrap_err()
            .contains("not a whole number"));
        assert_eq!(ByteSize::parse("10 MiB").unwrap().0, 10 << 20);
        assert!(ByteSize::parse("99999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert!(ByteSize::parse("17179869184GiB")
            .unwrap_err()
            .contains("too large"));
        assert!(ByteSize::parse("1e6").unwrap_err().ends_with("`1000000`"));
        assert!(ByteSize::parse("1.5")
            .unwrap_err()
            .contains("not a whole number"));
        assert!(ByteSize::parse("1e30").unwrap_err().contains("too large"));
        assert!(ByteSize::parse("-1").unwrap_err().contains("negative"));
        assert_eq!(ByteSize(1 << 20).to_string(), "1MiB");
    }

    #[test]
    fn names() {
        assert!(Name::new("api-v1.canary_2").is_ok());
        assert!(Name::new("bad name").unwrap_err().contains("` `"));
        assert!(Name::new("").is_err());
    }
}

/// Where plugins' shared KV store lives: the top-level `kv:` section.
///
/// Absent = `backend: memory`: one in-process store shared by the workers of this
/// Legate, nothing to run or reach, so nothing can fail. `backend: redis` shares the
/// store between Legate processes (fleet-wide rate limits) through one Redis.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KvConfig {
    /// `memory` (default) or `redis`.
    #[serde(default)]
    pub backend: KvBackendKind,
    /// `redis://[user:password@]host:port/db` (or `redis+unix:///path`); required for,
    /// and only for, `backend: redis`. Connections are made lazily, so `legate check`
    /// and startup do not need Redis to be up.
    #[serde(default)]
    pub url: Option<super::Spanned<String>>,
    /// The longest a KV call may wait on Redis, per network step (connect, send,
    /// receive). Default 50ms: two orders of magnitude above a LAN round trip, yet
    /// short enough that a stalled Redis costs a request little; the guest then gets
    /// `unavailable` and applies its own failure policy. At most 1s: a call blocks
    /// its worker thread while it waits.
    #[serde(default = "kv_timeout")]
    pub timeout: super::Spanned<Dur>,
    /// Prefix of every Redis key Legate writes (`PREFIX:NAMESPACE:KEY`), so one
    /// Redis can be shared with other users. Default `legate`.
    #[serde(default = "kv_prefix")]
    pub prefix: String,
    /// TLS settings of a `rediss://` URL (a private CA, a client certificate).
    /// Absent with `rediss://`: the server is verified against the system's and
    /// the Mozilla roots.
    #[serde(default)]
    pub tls: Option<super::Spanned<KvTls>>,
}

/// `kv.tls`: how Legate verifies a `rediss://` server and proves itself to it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KvTls {
    /// PEM CA file(s) to trust instead of the system's and the Mozilla roots.
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a Redis with `tls-auth-clients yes`; needs
    /// `client_key`.
    #[serde(default)]
    pub client_cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    #[serde(default)]
    pub client_key: Option<std::path::PathBuf>,
    /// A file whose first line is the password of an encrypted `client_key`;
    /// needs `client_key`.
    #[serde(default)]
    pub key_password_file: Option<std::path::PathBuf>,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            backend: KvBackendKind::Memory,
            url: None,
            timeout: kv_timeout(),
            prefix: kv_prefix(),
            tls: None,
        }
    }
}

fn kv_timeout() -> super::Spanned<Dur> {
    super::unspanned(Dur::millis(50))
}

fn kv_prefix() -> String {
    "legate".to_string()
}

/// The KV backend kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvBackendKind {
    /// In-process memory, per Legate process.
    #[default]
    Memory,
    /// A Redis server shared by every Legate pointed at it.
    Redis,
}

//! Sizes and durations as written in `coffer.toml`.
//!
//! Sizes are strings with a unit — `"25MiB"`, `"1GiB"`, `"512KiB"`, `"10MB"`, `"100"` or
//! `"100B"` (bytes) — or a bare TOML integer (bytes). Binary units (`KiB`, `MiB`, `GiB`,
//! `TiB`) are powers of 1024, decimal units (`KB`, `MB`, `GB`, `TB`) powers of 1000.
//!
//! Durations are strings with a unit: `"250ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`, or a
//! sum of them (`"1h30m"`). A bare number is refused: `timeout = 30` could mean seconds
//! or milliseconds, and a config file should not make the reader guess.
//!
//! [`Size`] and [`Dur`] deserialize directly, so a bad value is reported by the TOML
//! layer with the file's line and column.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// Why a size or a duration could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(String);

/// Byte multipliers by unit name, matched case-insensitively (`"mib"` = `"MiB"`).
const SIZE_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
];

/// Duration units in nanoseconds; matched exactly (`"m"` is minutes, `"ms"` milliseconds).
const DURATION_UNITS: &[(&str, u64)] = &[
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
    ("d", 86_400 * 1_000_000_000),
];

/// Parses a size such as `"25MiB"`, `"10MB"`, `"100"` into bytes.
///
/// # Errors
/// Not a whole number followed by an optional known unit, or more than `u64::MAX` bytes.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    let bad = || {
        UnitError(format!(
            "invalid size {text:?}: expected a whole number with an optional unit \
             (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB), e.g. \"25MiB\""
        ))
    };
    if digits.is_empty() {
        return Err(bad());
    }
    let unit = unit.trim_start().to_ascii_lowercase();
    let multiplier = SIZE_UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, m)| *m)
        .ok_or_else(bad)?;
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| UnitError(format!("size {text:?} is too large")))
}

/// Parses a duration such as `"30s"`, `"250ms"`, `"1h30m"`.
///
/// # Errors
/// Empty, a number without a unit, an unknown unit, or too long to represent.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let bad = |why: &str| {
        UnitError(format!(
            "invalid duration {text:?}: {why}; expected a number with a unit \
             (ms, s, m, h, d), e.g. \"30s\""
        ))
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits_end == 0 {
            return Err(bad("a unit must follow a number"));
        }
        let (digits, tail) = rest.split_at(digits_end);
        let unit_end = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        if unit.is_empty() {
            return Err(bad("missing unit"));
        }
        let nanos_per = DURATION_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, n)| *n)
            .ok_or_else(|| bad(&format!("unknown unit {unit:?}")))?;
        total = digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(nanos_per))
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| UnitError(format!("duration {text:?} is too long")))?;
        rest = tail;
    }
    Ok(Duration::from_nanos(total))
}

/// Formats bytes the way a config file would say it: the largest binary unit that
/// divides exactly (`52428800` → `"50MiB"`).
pub fn format_size(bytes: u64) -> String {
    for (unit, m) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes != 0 && bytes.is_multiple_of(m) {
            return format!("{}{unit}", bytes / m);
        }
    }
    format!("{bytes}B")
}

/// Formats a duration the way a config file would say it (`"300s"`, `"250ms"`).
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A size in bytes, read from a string with a unit or a bare integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

/// A duration, read from a string with a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"25MiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurVisitor;
        impl Visitor<'_> for DurVisitor {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string with a unit, such as \"30s\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "invalid duration {v}: a duration needs a unit, e.g. \"{v}s\""
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "invalid duration {v}: a duration needs a unit, e.g. \"{v}s\""
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(DurVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let cases: &[(&str, Option<u64>)] = &[
            ("100", Some(100)),
            ("0", Some(0)),
            ("100B", Some(100)),
            ("512KiB", Some(512 * 1024)),
            ("25MiB", Some(25 << 20)),
            ("1GiB", Some(1 << 30)),
            ("2TiB", Some(2 << 40)),
            ("10MB", Some(10_000_000)),
            ("3KB", Some(3_000)),
            ("4GB", Some(4_000_000_000)),
            ("1TB", Some(1_000_000_000_000)),
            ("25mib", Some(25 << 20)),
            ("25 MiB", Some(25 << 20)),
            (" 7MiB ", Some(7 << 20)),
            ("", None),
            ("MiB", None),
            ("-1", None),
            ("1.5GiB", None),
            ("25MiBs", None),
            ("25Mi", None),
            ("25 M", None),
            ("0x10", None),
            ("99999999999999999999", None),
            ("20000000TiB", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text).ok(), *want, "{text:?}");
        }
    }

    #[test]
    fn size_errors_name_the_value() {
        let err = parse_size("12 parsecs").unwrap_err().to_string();
        assert!(err.contains("\"12 parsecs\""), "{err}");
        assert!(err.contains("MiB"), "{err}");
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        let cases: &[(&str, Option<Duration>)] = &[
            ("250ms", Some(ms(250))),
            ("30s", Some(s(30))),
            ("5m", Some(s(300))),
            ("2h", Some(s(7200))),
            ("1d", Some(s(86_400))),
            ("1h30m", Some(s(5400))),
            ("1s500ms", Some(ms(1500))),
            ("0s", Some(s(0))),
            (" 300s ", Some(s(300))),
            ("", None),
            ("30", None),
            ("s", None),
            ("30 s", None),
            ("30sec", None),
            ("1.5s", None),
            ("30S", None),
            ("-5s", None),
            ("1w", None),
            ("99999999999999999999d", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text).ok(), *want, "{text:?}");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(50 << 20), "50MiB");
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_duration(Duration::from_secs(300)), "300s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }

    #[derive(serde::Deserialize, Debug)]
    struct Probe {
        size: Option<Size>,
        dur: Option<Dur>,
    }

    #[test]
    fn deserialize_from_toml() {
        let p: Probe = toml::from_str("size = \"2KiB\"\ndur = \"5m\"").unwrap();
        assert_eq!(p.size, Some(Size(2048)));
        assert_eq!(p.dur, Some(Dur(Duration::from_secs(300))));
        let p: Probe = toml::from_str("size = 4096").unwrap();
        assert_eq!(p.size, Some(Size(4096)));
        for bad in [
            "size = -4",
            "size = \"4 apples\"",
            "dur = 30",
            "dur = \"30x\"",
            "size = 1.5",
        ] {
            assert!(toml::from_str::<Probe>(bad).is_err(), "{bad}");
        }
    }
}

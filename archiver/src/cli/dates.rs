//! Dates on the command line: `--since` and `--until`.
//!
//! Both take RFC 3339 (`2026-01-02T15:04:05Z`, `2026-01-02T16:04:05+01:00`) or a bare
//! date (`2026-01-02`, UTC). The search range is `since <= t < until`; a bare date for
//! `--since` means the start of that day, a bare date for `--until` includes that whole
//! day (it means the start of the next one).

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};

/// Which end of a range a date is for: it decides what a bare date means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Since,
    Until,
}

/// Parses a `--since`/`--until` value into microseconds since the Unix epoch, UTC.
///
/// # Errors
/// A message for the user when `s` is neither RFC 3339 nor `YYYY-MM-DD`.
pub fn parse_date(s: &str, bound: Bound) -> Result<i64, String> {
    let s = s.trim();
    let bad =
        || format!("{s:?} is not a date: use RFC 3339 (2026-01-02T15:04:05Z) or YYYY-MM-DD (UTC)");
    if is_bare_date(s) {
        let day = NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| bad())?;
        let day = match bound {
            Bound::Since => day,
            Bound::Until => day.succ_opt().ok_or_else(bad)?,
        };
        let start = day.and_hms_opt(0, 0, 0).ok_or_else(bad)?.and_utc();
        return Ok(start.timestamp_micros());
    }
    let t = DateTime::parse_from_rfc3339(s).map_err(|_| bad())?;
    Ok(t.timestamp_micros())
}

/// `YYYY-MM-DD` exactly: four, two and two digits.
fn is_bare_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// clap value parser for `--since`.
pub fn parse_since(s: &str) -> Result<i64, String> {
    parse_date(s, Bound::Since)
}

/// clap value parser for `--until`.
pub fn parse_until(s: &str) -> Result<i64, String> {
    parse_date(s, Bound::Until)
}

/// An arrival time (RFC 3339) as the terminal shows it: `2026-01-02 15:04:05`, UTC.
/// Anything unparsable is shown as it is.
pub fn display_time(rfc3339: &str) -> String {
    match DateTime::parse_from_rfc3339(rfc3339) {
        Ok(t) => t
            .with_timezone(&Utc)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
        Err(_) => rfc3339.to_owned(),
    }
}

/// Microseconds since the epoch as RFC 3339 UTC (for messages about ranges).
pub fn format_us(us: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(us).map_or_else(
        || us.to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_US: i64 = 86_400 * 1_000_000;
    /// 2026-01-02T00:00:00Z
    const JAN2: i64 = 1_767_312_000 * 1_000_000;

    #[test]
    fn bare_date_since_is_start_of_day_utc() {
        assert_eq!(parse_date("2026-01-02", Bound::Since).unwrap(), JAN2);
    }

    #[test]
    fn bare_date_until_includes_the_whole_day() {
        assert_eq!(
            parse_date("2026-01-02", Bound::Until).unwrap(),
            JAN2 + DAY_US
        );
        // Month and year ends roll over.
        assert_eq!(
            parse_date("2025-12-31", Bound::Until).unwrap(),
            parse_date("2026-01-01", Bound::Since).unwrap()
        );
        assert_eq!(
            parse_date("2024-02-28", Bound::Until).unwrap(),
            parse_date("2024-02-29", Bound::Since).unwrap()
        );
    }

    #[test]
    fn rfc3339_is_exact_for_both_bounds_and_honours_offsets() {
        for b in [Bound::Since, Bound::Until] {
            assert_eq!(parse_date("2026-01-02T00:00:00Z", b).unwrap(), JAN2);
            assert_eq!(parse_date("2026-01-02T01:00:00+01:00", b).unwrap(), JAN2);
            assert_eq!(parse_date("2026-01-01T19:00:00-05:00", b).unwrap(), JAN2);
            assert_eq!(parse_date("2026-01-02t00:00:00z", b).unwrap(), JAN2);
            assert_eq!(
                parse_date("2026-01-02T00:00:00.000250Z", b).unwrap(),
                JAN2 + 250
            );
        }
    }

    #[test]
    fn garbage_is_an_error() {
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-02-30",
            "2026-1-2",
            "2026/01/02",
            "02.01.2026",
            "2026-01-02T25:00:00Z",
            "2026-01-02T10:00:00", // no offset: ambiguous, refused
            "9999999999",
        ] {
            for b in [Bound::Since, Bound::Until] {
                let err = parse_date(bad, b).unwrap_err();
                assert!(err.contains("RFC 3339"), "{bad}: {err}");
            }
        }
    }

    #[test]
    fn display_time_is_utc_and_tolerant() {
        assert_eq!(
            display_time("2026-01-02T16:04:05+01:00"),
            "2026-01-02 15:04:05"
        );
        assert_eq!(display_time("not a time"), "not a time");
        assert_eq!(format_us(JAN2), "2026-01-02T00:00:00Z");
    }
}

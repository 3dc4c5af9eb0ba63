//! Durations as operators type and read them: `30s`, `5m`, `1h30m`
//! (humantime syntax), and their conversion to the API's whole-millisecond and
//! whole-second fields.

use std::time::Duration;

/// Parses a duration such as `30s`, `5m`, `1h30m` or `1500ms`.
pub(crate) fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}); use e.g. 30s, 5m, 1h30m"))
}

/// Formats a duration compactly, largest unit first: `2m`, `1h30m`, `1s500ms`,
/// `0s`. The result parses back to the same value with [`parse`].
pub(crate) fn format(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    const UNITS: [(u128, &str); 5] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
        (1, "ms"),
    ];
    let mut out = String::new();
    for (size, unit) in UNITS {
        let n = ms / size;
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
            ms %= size;
        }
    }
    out
}

/// Formats a millisecond field of the API.
pub(crate) fn format_ms(ms: u64) -> String {
    format(Duration::from_millis(ms))
}

/// Formats a second field of the API.
pub(crate) fn format_secs(secs: u64) -> String {
    format(Duration::from_secs(secs))
}

/// Converts to whole milliseconds; finer precision is rejected rather than
/// silently rounded.
pub(crate) fn to_millis(d: Duration) -> Result<u64, String> {
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(format!(
            "{} is finer than the millisecond precision of this setting",
            humantime::format_duration(d)
        ));
    }
    u64::try_from(d.as_millis()).map_err(|_| "is too long".to_string())
}

/// Converts to whole seconds; finer precision is rejected rather than
/// silently rounded.
pub(crate) fn to_secs(d: Duration) -> Result<u64, String> {
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "{} is not a whole number of seconds",
            humantime::format_duration(d)
        ));
    }
    Ok(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_humantime_forms() {
        assert_eq!(parse("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert!(parse("soon").is_err());
        assert!(parse("").is_err());
        assert!(parse("10").is_err_and(|e| e.contains("e.g. 30s")));
    }

    #[test]
    fn formats_compactly_and_round_trips() {
        for (ms, text) in [
            (0, "0s"),
            (30_000, "30s"),
            (120_000, "2m"),
            (5_400_000, "1h30m"),
            (1_500, "1s500ms"),
            (604_800_000, "7d"),
            (600_000, "10m"),
        ] {
            assert_eq!(format_ms(ms), text);
            assert_eq!(parse(text).map(to_millis), Ok(Ok(ms)), "{text}");
        }
    }

    #[test]
    fn rejects_precision_the_field_cannot_hold() {
        assert_eq!(to_secs(Duration::from_secs(90)), Ok(90));
        assert!(to_secs(Duration::from_millis(1500)).is_err());
        assert_eq!(to_millis(Duration::from_millis(1500)), Ok(1500));
        assert!(to_millis(Duration::from_micros(1500)).is_err());
    }
}

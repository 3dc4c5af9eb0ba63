//! The active window of an agent: `HH:MM-HH:MM` in the agent's local wall
//! time. Start is inclusive, end exclusive; `24:00` is allowed as an end; a
//! start after the end wraps over midnight; start == end is rejected because
//! it is ambiguous (never or always).

use std::fmt;
use std::str::FromStr;

/// Minutes in a day; `24:00` parses to this value.
const DAY_MINUTES: u16 = 24 * 60;

/// A parsed active window, in minutes after local midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveHours {
    /// Inclusive start, `0..1440`.
    pub start: u16,
    /// Exclusive end, `1..=1440`.
    pub end: u16,
}

/// Why an active-hours string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActiveHoursError {
    /// Not two times joined by `-` (the whole input).
    #[error("expected HH:MM-HH:MM, got {0:?}")]
    Format(String),
    /// One side is not a valid `HH:MM` (that side).
    #[error("{0:?} is not a time of day (00:00 to 23:59, or 24:00 as an end)")]
    Time(String),
    /// Start equals end, which would mean either never or always (the time).
    #[error(
        "start and end are both {0}: the window would be empty or the whole day; leave it empty for always"
    )]
    Empty(String),
}

impl ActiveHours {
    /// True when the window spans midnight (e.g. `22:00-06:00`).
    pub fn wraps(&self) -> bool {
        self.start > self.end
    }

    /// Whether a local time (minutes after midnight, `0..1440`) is inside.
    pub fn contains_minute(&self, minute: u16) -> bool {
        if self.wraps() {
            minute >= self.start || minute < self.end
        } else {
            minute >= self.start && minute < self.end
        }
    }

    /// Whether a local wall-clock time is inside the window.
    pub fn contains(&self, time: jiff::civil::Time) -> bool {
        let minute = time.hour() as u16 * 60 + time.minute() as u16;
        self.contains_minute(minute)
    }
}

fn parse_time(s: &str, allow_24: bool) -> Result<u16, ActiveHoursError> {
    let bad = || ActiveHoursError::Time(s.to_string());
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if m >= 60 {
        return Err(bad());
    }
    let total = h * 60 + m;
    if total < DAY_MINUTES || (allow_24 && total == DAY_MINUTES) {
        Ok(total)
    } else {
        Err(bad())
    }
}

impl FromStr for ActiveHours {
    type Err = ActiveHoursError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| ActiveHoursError::Format(s.to_string()))?;
        let start = parse_time(a.trim(), false)?;
        let end = parse_time(b.trim(), true)?;
        if start == end {
            return Err(ActiveHoursError::Empty(a.trim().to_string()));
        }
        Ok(ActiveHours { start, end })
    }
}

impl fmt::Display for ActiveHours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ah(s: &str) -> ActiveHours {
        s.parse().expect("valid window")
    }

    #[test]
    fn day_window_is_start_inclusive_end_exclusive() {
        let w = ah("09:00-18:00");
        assert!(!w.contains_minute(8 * 60 + 59));
        assert!(w.contains_minute(9 * 60));
        assert!(w.contains_minute(17 * 60 + 59));
        assert!(!w.contains_minute(18 * 60));
    }

    #[test]
    fn overnight_window_wraps() {
        let w = ah("22:00-06:00");
        assert!(w.wraps());
        assert!(w.contains_minute(23 * 60));
        assert!(w.contains_minute(0));
        assert!(w.contains_minute(5 * 60 + 59));
        assert!(!w.contains_minute(6 * 60));
        assert!(!w.contains_minute(12 * 60));
    }

    #[test]
    fn end_of_day_is_24_00() {
        let w = ah("18:00-24:00");
        assert!(w.contains_minute(23 * 60 + 59));
        assert!(!w.contains_minute(0));
        assert_eq!(w.to_string(), "18:00-24:00");
        assert!(ah("00:00-24:00").contains_minute(0));
    }

    #[test]
    fn rejects_bad_windows() {
        assert!(matches!(
            "09:00-09:00".parse::<ActiveHours>(),
            Err(ActiveHoursError::Empty(_))
        ));
        assert!(matches!(
            "25:00-26:00".parse::<ActiveHours>(),
            Err(ActiveHoursError::Time(_))
        ));
        assert!(matches!(
            "24:00-06:00".parse::<ActiveHours>(),
            Err(ActiveHoursError::Time(_))
        ));
        assert!(matches!(
            "09:60-10:00".parse::<ActiveHours>(),
            Err(ActiveHoursError::Time(_))
        ));
        assert!(matches!(
            "9:00-10:00".parse::<ActiveHours>(),
            Err(ActiveHoursError::Time(_))
        ));
        assert!(matches!(
            "0900".parse::<ActiveHours>(),
            Err(ActiveHoursError::Format(_))
        ));
    }
}

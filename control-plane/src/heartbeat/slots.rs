//! Wall-clock anchored heartbeat slots: the grid, the active window, the
//! search for the next slot and the catch-up decision after downtime.
//!
//! # The grid
//!
//! An agent's slots are the instants `epoch + k·interval + phase` (whole
//! seconds, `k` any integer), where `epoch` is the Unix epoch and `phase` is
//! a stable hash of the agent id modulo the interval ([`stagger_phase`]).
//! The grid is a pure function of (interval, phase): it does not depend on
//! when the process started, so a restart can neither shift nor reset it.
//! Staggering every slot (not only the first) spreads a fleet with equal
//! intervals across the whole interval, all the time.
//!
//! # The window
//!
//! A slot is used only when it falls inside the agent's active window
//! ([`ActiveHours`], `HH:MM-HH:MM` in the agent's IANA zone). For each local
//! calendar day `d` the window is the half-open instant range
//! `[boundary(d, start), boundary(d or d+1, end))` (`d+1` when the window
//! wraps over midnight or ends at `24:00`), where
//!
//! > `boundary(x)` = the earliest instant whose local civil time is `>= x`.
//!
//! Away from DST transitions that is simply "local time inside the window".
//! At transitions it gives:
//!
//! * **Spring-forward gaps resolve later.** A boundary whose local time does
//!   not exist (02:30 when clocks jump 02:00→03:00) resolves to the first
//!   instant after the gap (03:00 new time). A window `02:30-05:00` opens at
//!   03:00 that day; a window entirely inside the gap (`02:10-02:50`) is empty
//!   that day. Note this is deliberately *not* jiff's
//!   `Disambiguation::Later`, which maps 02:30 to 03:30 (it shifts by the gap
//!   length) and would drop the instants 03:00–03:30 whose local time is
//!   plainly inside `02:30-05:00`, or even put the opening after the close.
//! * **Repeated hours resolve earlier.** A boundary whose local time occurs
//!   twice (01:30 when clocks fall back 02:00→01:00) resolves to its first
//!   occurrence (jiff's `Disambiguation::Earlier`). A window `01:30-05:00`
//!   opens at the first 01:30 and stays open through the repeated hour; a
//!   window `22:00-01:30` closes at the first 01:30 and does not reopen in
//!   the repeated hour. Only these fold instants can differ from the plain
//!   "local time inside the window" reading; everything else (e.g. a
//!   `09:00-17:00` window on a transition day) contains exactly the instants
//!   whose local time is inside.
//!
//! Slots themselves are instants, so they never fall "into" a gap or fold;
//! only window boundaries need resolving.
//!
//! # The search
//!
//! [`Schedule::next_slot_after`] walks window occurrences, not grid points:
//! inside an occurrence the answer is the grid point at or after
//! `max(t, open)`; if that is not before `close`, it jumps to the next
//! occurrence. The cost is a few time-zone lookups per local day searched,
//! whatever the interval (a 1 s interval with a 16-hour closed window is one
//! jump). The search gives up after [`SEARCH_HORIZON`] plus one interval and
//! returns `None`: the grid and the window then (practically) never meet,
//! e.g. a daily interval whose slot sits outside a one-hour window.

use std::fmt;
use std::time::Duration;

use claw_proto::active_hours::ActiveHours;
use jiff::Timestamp;
use jiff::civil::{Date, Time};
use jiff::tz::{AmbiguousOffset, TimeZone};
use sha2::{Digest, Sha256};

/// The shortest allowed interval (short so tests can run fast).
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The longest allowed interval. A bound keeps all grid arithmetic far from
/// `i64` overflow; a heartbeat rarer than yearly is not a heartbeat.
pub const MAX_INTERVAL: Duration = Duration::from_secs(366 * SECS_PER_DAY as u64);

/// How far past the query point [`Schedule::next_slot_after`] looks (plus one
/// interval) before concluding that no slot hits the window. A year rather
/// than a week because DST moves a fixed-UTC grid by an hour in local time:
/// a daily slot may fit a short window only in summer.
pub const SEARCH_HORIZON: Duration = Duration::from_secs(366 * SECS_PER_DAY as u64);

/// At most this many missed slots are listed individually by [`due`]; older
/// ones are only counted, so a long outage with a short interval cannot
/// produce an unbounded list.
pub const MAX_MISSED_LISTED: usize = 1000;

const SECS_PER_DAY: i64 = 86_400;
const MINUTES_PER_DAY: u16 = 24 * 60;

/// Why a schedule could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The interval is shorter than 1 s or longer than 366 days.
    #[error("heartbeat interval must be between 1s and 366 days, got {0:?}")]
    IntervalOutOfRange(Duration),
    /// The interval has a fraction of a second.
    #[error("heartbeat interval must be a whole number of seconds, got {0:?}")]
    IntervalNotWholeSeconds(Duration),
}

/// An agent's heartbeat cadence: the slot grid and the window it must hit.
///
/// Invariants (checked by [`Schedule::new`]): `1 <= interval <= 366 days`,
/// whole seconds; `0 <= phase < interval`.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Seconds between slots.
    interval: i64,
    /// Offset of the grid from the epoch, in seconds, `0..interval`.
    phase: i64,
    /// `None` means always active.
    window: Option<ActiveHours>,
    /// The zone the window is read in.
    tz: TimeZone,
}

/// Why a slot was chosen, for `clawctl agent next AGENT -n 5`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The next point of the grid; the window (if any) was already open at
    /// the previous grid point.
    Cadence {
        /// Time between slots.
        interval: Duration,
        /// Offset of the slot grid from the epoch.
        phase: Duration,
    },
    /// The first slot of a window occurrence: the previous grid point was
    /// outside this occurrence. `opens_at` is the local time the window
    /// actually opened (after a spring-forward gap, the gap's end).
    WindowOpens {
        /// The local time the window opened.
        opens_at: Time,
        /// The zone the window is read in.
        zone: String,
    },
}

/// What to do with the slots that came due, given the persisted cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The one slot to run now (its nominal time), if any: the most recent
    /// due slot, when it is at most `catch_up` old.
    pub run: Option<Timestamp>,
    /// Due slots that will not run, to record as `missed`: the most recent
    /// [`MAX_MISSED_LISTED`] of them, oldest first, all before `run`.
    pub missed: Vec<Timestamp>,
    /// Missed slots older than `missed[0]` that are not listed.
    pub missed_unlisted: u64,
    /// The first slot strictly after `now` (the new persisted cursor); `None`
    /// when no slot hits the window within the search horizon.
    pub next: Option<Timestamp>,
}

/// A window occurrence, `[open, close)` in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Occurrence {
    open: i64,
    close: i64,
}

/// The stagger phase of an agent: the first 8 bytes of SHA-256(agent id),
/// big-endian, modulo the interval, in whole seconds.
///
/// A cryptographic hash rather than `std`'s `DefaultHasher`, because the
/// value must be identical across processes, restarts, versions and
/// platforms (std's hasher is randomly seeded and its algorithm may change),
/// and well spread even for ids that differ in one character. Changing this
/// function moves every agent's grid: don't.
pub fn stagger_phase(agent_id: &str, interval: Duration) -> Duration {
    let secs = interval.as_secs();
    if secs == 0 {
        return Duration::ZERO;
    }
    let digest = Sha256::digest(agent_id.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    Duration::from_secs(u64::from_be_bytes(head) % secs)
}

impl Schedule {
    /// Builds an agent's schedule. With `stagger` off the phase is 0 and the
    /// slots sit on round multiples of the interval since the epoch (e.g. on
    /// the hour and half hour for 30 minutes, in UTC).
    pub fn new(
        agent_id: &str,
        interval: Duration,
        window: Option<ActiveHours>,
        tz: TimeZone,
        stagger: bool,
    ) -> Result<Self, ScheduleError> {
        if interval < MIN_INTERVAL || interval > MAX_INTERVAL {
            return Err(ScheduleError::IntervalOutOfRange(interval));
        }
        if interval.subsec_nanos() != 0 {
            return Err(ScheduleError::IntervalNotWholeSeconds(interval));
        }
        let phase = if stagger {
            stagger_phase(agent_id, interval)
        } else {
            Duration::ZERO
        };
        // Both casts are lossless: interval <= MAX_INTERVAL (~3.2e7 s) and
        // phase < interval.
        Ok(Schedule {
            interval: interval.as_secs() as i64,
            phase: phase.as_secs() as i64,
            window,
            tz,
        })
    }

    /// Time between slots.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval as u64)
    }

    /// Offset of the grid from the epoch, `< interval`.
    pub fn phase(&self) -> Duration {
        Duration::from_secs(self.phase as u64)
    }

    /// The active window; `None` means always active.
    pub fn window(&self) -> Option<ActiveHours> {
        self.window
    }

    /// The zone the window is read in.
    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }

    /// The first slot strictly after `t` that is inside the window, or `None`
    /// when there is none within [`SEARCH_HORIZON`] plus one interval.
    pub fn next_slot_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.first_slot_from(floor_secs(t).checked_add(1)?)
            .and_then(to_ts)
    }

    /// The first slot at or after `t` that is inside the window (see
    /// [`Schedule::next_slot_after`] for `None`).
    pub fn first_slot_at_or_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.first_slot_from(ceil_secs(t)).and_then(to_ts)
    }

    /// Whether `t` is inside the active window (always true without one).
    /// See the module doc for instants near DST transitions.
    pub fn is_in_window(&self, t: Timestamp) -> bool {
        let s = floor_secs(t);
        self.occurrences_from(s).next().is_some_and(|o| o.open <= s)
    }

    /// Whether `t` is a slot: on the grid and inside the window.
    pub fn is_slot(&self, t: Timestamp) -> bool {
        t.subsec_nanosecond() == 0
            && (t.as_second() - self.phase).rem_euclid(self.interval) == 0
            && self.is_in_window(t)
    }

    /// The next `n` slots strictly after `t`, each with why it was chosen
    /// (fewer if the search horizon runs out).
    pub fn next_slots(&self, t: Timestamp, n: usize) -> Vec<(Timestamp, Reason)> {
        let mut out = Vec::with_capacity(n.min(1024));
        let mut cursor = t;
        while out.len() < n {
            let Some(slot) = self.next_slot_after(cursor) else {
                break;
            };
            out.push((slot, self.reason(slot)));
            cursor = slot;
        }
        out
    }

    /// Why `slot` (assumed to be a slot) is one: the first of its window
    /// occurrence, or just the next grid point.
    pub fn reason(&self, slot: Timestamp) -> Reason {
        let cadence = Reason::Cadence {
            interval: self.interval(),
            phase: self.phase(),
        };
        if self.window.is_none() {
            return cadence;
        }
        let s = floor_secs(slot);
        match self.occurrences_from(s).next() {
            Some(occ) if occ.open <= s && s - self.interval < occ.open => match to_ts(occ.open) {
                Some(open) => Reason::WindowOpens {
                    opens_at: self.tz.to_datetime(open).time(),
                    zone: self.zone_name(open),
                },
                None => cadence,
            },
            _ => cadence,
        }
    }

    fn zone_name(&self, at: Timestamp) -> String {
        match self.tz.iana_name() {
            Some(name) => name.to_string(),
            None => format!("UTC{}", self.tz.to_offset(at)),
        }
    }

    /// The smallest grid point `>= x`.
    fn ceil_to_grid(&self, x: i64) -> i64 {
        x + (self.phase - x).rem_euclid(self.interval)
    }

    /// The largest grid point `<= x`.
    fn floor_to_grid(&self, x: i64) -> i64 {
        x - (x - self.phase).rem_euclid(self.interval)
    }

    /// Number of grid points in `[a, b]`.
    fn grid_count(&self, a: i64, b: i64) -> u64 {
        if a > b {
            return 0;
        }
        let (first, last) = (self.ceil_to_grid(a), self.floor_to_grid(b));
        if first > last {
            0
        } else {
            ((last - first) / self.interval) as u64 + 1
        }
    }

    /// First in-window slot `>= lo`, within the search horizon.
    fn first_slot_from(&self, lo: i64) -> Option<i64> {
        let limit = lo
            .saturating_add(SEARCH_HORIZON.as_secs() as i64)
            .saturating_add(self.interval);
        for occ in self.occurrences_from(lo) {
            if occ.open > limit {
                return None;
            }
            let candidate = self.ceil_to_grid(occ.open.max(lo));
            if candidate < occ.close {
                return (candidate <= limit).then_some(candidate);
            }
        }
        None
    }

    /// Window occurrences in order, starting with the first whose close is
    /// after `from` (which may already be open at `from`). Without a window:
    /// one occurrence covering all representable time.
    fn occurrences_from(&self, from: i64) -> Occurrences<'_> {
        let day = match (self.window, to_ts(from)) {
            (Some(_), Some(t)) => {
                let date = self.tz.to_datetime(t).date();
                // The occurrence of the previous day can still be open at
                // `from` (overnight windows); none older can: its close is at
                // most boundary(local midnight of `from`'s day) <= from.
                Some(date.yesterday().unwrap_or(date))
            }
            _ => None,
        };
        Occurrences {
            schedule: self,
            from,
            day,
            always_done: false,
        }
    }

    /// The window occurrence that opens on local day `day`.
    fn occurrence_on(&self, hours: ActiveHours, day: Date) -> Option<Occurrence> {
        let open = self.boundary(day, hours.start)?;
        let close_day = if hours.wraps() {
            day.tomorrow().ok()?
        } else {
            day
        };
        let close = self.boundary(close_day, hours.end)?;
        Some(Occurrence { open, close })
    }

    /// The earliest instant whose local civil time is at or after `minute`
    /// minutes past midnight of `day` (`minute` may be 1440 = next midnight).
    /// Gaps resolve to the gap's end, folds to the first occurrence.
    fn boundary(&self, day: Date, minute: u16) -> Option<i64> {
        let (day, minute) = if minute >= MINUTES_PER_DAY {
            (day.tomorrow().ok()?, minute - MINUTES_PER_DAY)
        } else {
            (day, minute)
        };
        let time = Time::new((minute / 60) as i8, (minute % 60) as i8, 0, 0).ok()?;
        let ambiguous = self.tz.to_ambiguous_timestamp(day.to_datetime(time));
        let ts = match ambiguous.offset() {
            AmbiguousOffset::Gap { .. } => {
                // `earlier()` reads the missing time with the post-gap offset,
                // which lands strictly before the transition; the first
                // transition after it is the gap's end.
                let before_gap = ambiguous.earlier().ok()?;
                self.tz.following(before_gap).next()?.timestamp()
            }
            AmbiguousOffset::Unambiguous { .. } | AmbiguousOffset::Fold { .. } => {
                ambiguous.earlier().ok()?
            }
        };
        Some(ts.as_second())
    }
}

/// Iterator over window occurrences; see [`Schedule::occurrences_from`].
struct Occurrences<'a> {
    schedule: &'a Schedule,
    from: i64,
    /// Next local day to consider (window case).
    day: Option<Date>,
    /// Whether the single "always" occurrence was yielded (no-window case).
    always_done: bool,
}

impl Iterator for Occurrences<'_> {
    type Item = Occurrence;

    fn next(&mut self) -> Option<Occurrence> {
        let Some(hours) = self.schedule.window else {
            if self.always_done {
                return None;
            }
            self.always_done = true;
            return Some(Occurrence {
                open: Timestamp::MIN.as_second(),
                close: Timestamp::MAX.as_second(),
            });
        };
        // Skips at most the previous day plus the rare day whose window is
        // empty because it lies inside a spring-forward gap.
        for _ in 0..8 {
            let day = self.day?;
            self.day = day.tomorrow().ok();
            let occ = self.schedule.occurrence_on(hours, day)?;
            if occ.close > self.from && occ.open < occ.close {
                return Some(occ);
            }
        }
        None
    }
}

/// Decides what to do with the slots that came due between the persisted
/// cursor and `now`.
///
/// The due slots are the in-window slots in `[persisted_next, now]` (a slot
/// exactly at `now` is due and not late). At most one of them runs: the most
/// recent, and only if `now - slot <= catch_up`; every other due slot is
/// missed. `next` is the first slot strictly after `now`. When
/// `persisted_next > now` (a backwards clock step, or nothing due yet) nothing
/// is due and the cursor does not move backwards: `next` is the first slot at
/// or after `persisted_next`, so slots already claimed cannot come due again.
///
/// `persisted_next` need not be on the current grid (the interval may have
/// changed since it was persisted): the due range starts there regardless.
/// The work is proportional to the number of local days in the due range,
/// not the number of slots.
pub fn due(
    persisted_next: Timestamp,
    now: Timestamp,
    catch_up: Duration,
    schedule: &Schedule,
) -> Due {
    let lo = ceil_secs(persisted_next);
    let hi = floor_secs(now);
    let next_from = lo.max(hi.saturating_add(1));
    let next = schedule.first_slot_from(next_from).and_then(to_ts);
    let nothing = Due {
        run: None,
        missed: Vec::new(),
        missed_unlisted: 0,
        next,
    };
    if lo > hi {
        return nothing;
    }
    let total = schedule.count_slots(lo, hi);
    if total == 0 {
        return nothing;
    }
    // Keep the most recent MAX_MISSED_LISTED + 1 (the run candidate).
    let keep = MAX_MISSED_LISTED as u64 + 1;
    let skipped = total.saturating_sub(keep);
    let mut recent: Vec<Timestamp> = schedule
        .slots_in(lo, hi, skipped, keep as usize)
        .into_iter()
        .filter_map(to_ts)
        .collect();
    let Some(&last) = recent.last() else {
        return nothing;
    };
    let lateness = now.as_nanosecond() - last.as_nanosecond();
    if lateness <= catch_up.as_nanos() as i128 {
        recent.pop();
        Due {
            run: Some(last),
            missed: recent,
            missed_unlisted: skipped,
            next,
        }
    } else {
        let unlisted = if recent.len() > MAX_MISSED_LISTED {
            recent.remove(0);
            skipped + 1
        } else {
            skipped
        };
        Due {
            run: None,
            missed: recent,
            missed_unlisted: unlisted,
            next,
        }
    }
}

impl Schedule {
    /// Number of in-window slots in `[lo, hi]`.
    fn count_slots(&self, lo: i64, hi: i64) -> u64 {
        let mut total = 0;
        for occ in self.occurrences_from(lo) {
            if occ.open > hi {
                break;
            }
            total += self.grid_count(occ.open.max(lo), (occ.close - 1).min(hi));
        }
        total
    }

    /// The in-window slots in `[lo, hi]`, after skipping the first `skip`,
    /// at most `take` of them. Skipping is arithmetic per occurrence.
    fn slots_in(&self, lo: i64, hi: i64, mut skip: u64, take: usize) -> Vec<i64> {
        let mut out = Vec::new();
        for occ in self.occurrences_from(lo) {
            if occ.open > hi || out.len() >= take {
                break;
            }
            let (a, b) = (occ.open.max(lo), (occ.close - 1).min(hi));
            let n = self.grid_count(a, b);
            if skip >= n {
                skip -= n;
                continue;
            }
            // skip < n <= (b - a) / interval + 1, so this stays inside [a, b].
            let mut slot = self.ceil_to_grid(a) + skip as i64 * self.interval;
            skip = 0;
            while slot <= b && out.len() < take {
                out.push(slot);
                slot += self.interval;
            }
        }
        out
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Cadence { interval, phase } => write!(
                f,
                "every {}, phase {}",
                CompactDuration(*interval),
                CompactDuration(*phase)
            ),
            Reason::WindowOpens { opens_at, zone } => write!(
                f,
                "first slot after the active window opens at {:02}:{:02} {zone}",
                opens_at.hour(),
                opens_at.minute()
            ),
        }
    }
}

/// Renders whole seconds as `1d2h3m4s`, omitting zero units (`0s` for zero).
struct CompactDuration(Duration);

impl fmt::Display for CompactDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        if secs == 0 {
            return f.write_str("0s");
        }
        let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
        let mut rest = secs;
        for (size, unit) in units {
            if rest >= size {
                write!(f, "{}{unit}", rest / size)?;
                rest %= size;
            }
        }
        Ok(())
    }
}

/// Whole seconds at or before `t`.
fn floor_secs(t: Timestamp) -> i64 {
    // Timestamp's range (±~4e11 s) fits i64 seconds, so the cast is lossless.
    t.as_nanosecond().div_euclid(1_000_000_000) as i64
}

/// Whole seconds at or after `t`.
fn ceil_secs(t: Timestamp) -> i64 {
    let floor = floor_secs(t);
    if t.as_nanosecond().rem_euclid(1_000_000_000) == 0 {
        floor
    } else {
        floor + 1
    }
}

fn to_ts(secs: i64) -> Option<Timestamp> {
    Timestamp::from_second(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::DateTime;

    const MIN: i64 = 60;
    const HOUR: i64 = 3600;

    fn zone(name: &str) -> TimeZone {
        jiff::tz::db()
            .get(name)
            .expect("the bundled tzdb has every zone used in tests")
    }

    fn hours(s: &str) -> ActiveHours {
        s.parse().expect("test windows are valid")
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("test timestamps are valid RFC 3339")
    }

    /// A schedule with an explicit phase (tests pin the grid directly).
    fn sched(interval: i64, phase: i64, window: Option<&str>, tz: &str) -> Schedule {
        assert!(interval >= 1 && (0..interval).contains(&phase));
        Schedule {
            interval,
            phase,
            window: window.map(hours),
            tz: zone(tz),
        }
    }

    /// `n` consecutive slots after `from`.
    fn chain(s: &Schedule, from: Timestamp, n: usize) -> Vec<Timestamp> {
        s.next_slots(from, n).into_iter().map(|(t, _)| t).collect()
    }

    /// All slots in `(from, until]` by chaining `next_slot_after`.
    fn chain_until(s: &Schedule, from: Timestamp, until: Timestamp) -> Vec<Timestamp> {
        let mut out = Vec::new();
        let mut cursor = from;
        while let Some(next) = s.next_slot_after(cursor) {
            if next > until {
                break;
            }
            out.push(next);
            cursor = next;
        }
        out
    }

    fn local(s: &Schedule, t: Timestamp) -> String {
        t.to_zoned(s.tz.clone()).strftime("%F %T %:z").to_string()
    }

    fn is_fold(tz: &TimeZone, t: Timestamp) -> bool {
        matches!(
            tz.to_ambiguous_timestamp(tz.to_datetime(t)).offset(),
            AmbiguousOffset::Fold { .. }
        )
    }

    // ---- an independent, brute-force oracle for the window ----

    /// The earliest instant whose local civil time is `>= x`, by scanning
    /// every minute (all zones used have whole-minute offsets and
    /// transitions). Independent of `Schedule::boundary`.
    fn brute_boundary(tz: &TimeZone, x: DateTime) -> i64 {
        let x_as_utc = TimeZone::UTC
            .to_ambiguous_timestamp(x)
            .earlier()
            .expect("test dates are in range")
            .as_second();
        // Offsets are within ±15 h, so the answer is after this point.
        let mut t = x_as_utc - 15 * HOUR;
        for _ in 0..(40 * 60) {
            let civil = tz.to_datetime(Timestamp::from_second(t).expect("in range"));
            if civil >= x {
                return t;
            }
            t += MIN;
        }
        panic!("no instant reaches {x} in {tz:?}");
    }

    /// Window occurrences `[open, close)` for the local days `first..first+days`.
    fn brute_occurrences(s: &Schedule, first: Date, days: i64) -> Vec<(i64, i64)> {
        let w = s.window.expect("oracle needs a window");
        let at = |d: Date, minute: u16| {
            let (d, minute) = if minute == 1440 {
                (d.tomorrow().expect("in range"), 0)
            } else {
                (d, minute)
            };
            let time = Time::new((minute / 60) as i8, (minute % 60) as i8, 0, 0).expect("valid");
            brute_boundary(&s.tz, d.to_datetime(time))
        };
        (0..days)
            .map(|i| {
                let d = first
                    .checked_add(jiff::Span::new().days(i))
                    .expect("in range");
                let end_day = if w.wraps() {
                    d.tomorrow().expect("in range")
                } else {
                    d
                };
                (at(d, w.start), at(end_day, w.end))
            })
            .collect()
    }

    /// Every grid point in `(from, until]` inside a brute-force occurrence.
    fn brute_slots(s: &Schedule, from: Timestamp, until: Timestamp) -> Vec<Timestamp> {
        let first_day = s.tz.to_datetime(from).date().yesterday().expect("in range");
        let days = (until.as_second() - from.as_second()) / (24 * HOUR) + 4;
        let occ = brute_occurrences(s, first_day, days);
        let mut out = Vec::new();
        let mut g = s.ceil_to_grid(from.as_second() + 1);
        while g <= until.as_second() {
            if occ.iter().any(|&(o, c)| o <= g && g < c) {
                out.push(Timestamp::from_second(g).expect("in range"));
            }
            g += s.interval;
        }
        out
    }

    /// The full check used by the DST matrix: the chained slots equal the
    /// brute-force ones (nothing skipped, nothing extra), are on the grid,
    /// strictly increasing, and inside the window in local time (for fold
    /// instants, inside by the earlier-occurrence rule the oracle encodes).
    fn check_against_oracle(s: &Schedule, from: Timestamp, until: Timestamp) -> Vec<Timestamp> {
        let got = chain_until(s, from, until);
        let want = brute_slots(s, from, until);
        let show = |v: &[Timestamp]| v.iter().map(|&t| local(s, t)).collect::<Vec<_>>();
        assert_eq!(show(&got), show(&want), "slots of {s:?}");
        let w = s.window.expect("oracle needs a window");
        for pair in got.windows(2) {
            assert!(pair[0] < pair[1]);
        }
        for &t in &got {
            assert_eq!((t.as_second() - s.phase).rem_euclid(s.interval), 0);
            assert_eq!(t.subsec_nanosecond(), 0);
            assert!(s.is_in_window(t) && s.is_slot(t));
            if !is_fold(&s.tz, t) {
                let time = s.tz.to_datetime(t).time();
                assert!(w.contains(time), "{} outside {w}", local(s, t));
            }
        }
        got
    }

    // ---- construction and phase ----

    #[test]
    fn new_validates_the_interval() {
        let utc = TimeZone::UTC;
        let new = |d| Schedule::new("a", d, None, utc.clone(), true);
        assert!(matches!(
            new(Duration::ZERO),
            Err(ScheduleError::IntervalOutOfRange(_))
        ));
        assert!(matches!(
            new(Duration::from_millis(1500)),
            Err(ScheduleError::IntervalNotWholeSeconds(_))
        ));
        assert!(matches!(
            new(MAX_INTERVAL + Duration::from_secs(1)),
            Err(ScheduleError::IntervalOutOfRange(_))
        ));
        assert!(new(MIN_INTERVAL).is_ok());
        assert!(new(MAX_INTERVAL).is_ok());
    }

    #[test]
    fn phase_is_pinned_stable_and_off_without_stagger() {
        let m30 = Duration::from_secs(1800);
        // Pinned: changing the hash would move every agent's grid.
        assert_eq!(stagger_phase("agent-a", m30), Duration::from_secs(160));
        assert_eq!(stagger_phase("ops-bot", m30), Duration::from_secs(1219));
        assert_eq!(
            stagger_phase("ops-bot", Duration::from_secs(3600)),
            Duration::from_secs(3019)
        );
        for _ in 0..3 {
            let s = Schedule::new("ops-bot", m30, None, TimeZone::UTC, true).expect("valid");
            assert_eq!(s.phase(), Duration::from_secs(1219));
        }
        let s = Schedule::new("ops-bot", m30, None, TimeZone::UTC, false).expect("valid");
        assert_eq!(s.phase(), Duration::ZERO);
        assert_eq!(stagger_phase("x", Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn phases_spread_evenly_across_the_interval() {
        let interval = Duration::from_secs(1800);
        let mut buckets = [0u32; 10];
        for i in 0..10_000 {
            let phase = stagger_phase(&format!("agent-{i}"), interval).as_secs();
            assert!(phase < 1800);
            buckets[(phase / 180) as usize] += 1;
        }
        for (i, &n) in buckets.iter().enumerate() {
            assert!((850..=1150).contains(&n), "bucket {i} has {n} of 10000");
        }
    }

    // ---- the grid ----

    #[test]
    fn slots_are_anchored_to_the_epoch_not_to_the_query() {
        let s = sched(1800, 433, None, "UTC");
        let from = ts("2026-05-01T10:00:00Z");
        assert_eq!(
            chain(&s, from, 3),
            vec![
                ts("2026-05-01T10:07:13Z"),
                ts("2026-05-01T10:37:13Z"),
                ts("2026-05-01T11:07:13Z")
            ]
        );
        // Strictly after: a query exactly on a slot returns the next one; a
        // query a nanosecond before returns the slot itself.
        let on = ts("2026-05-01T10:07:13Z");
        assert_eq!(s.next_slot_after(on), Some(ts("2026-05-01T10:37:13Z")));
        let just_before = ts("2026-05-01T10:07:12.999999999Z");
        assert_eq!(s.next_slot_after(just_before), Some(on));
        assert_eq!(s.first_slot_at_or_after(on), Some(on));
        assert_eq!(
            s.first_slot_at_or_after(ts("2026-05-01T10:07:13.5Z")),
            Some(ts("2026-05-01T10:37:13Z"))
        );
    }

    #[test]
    fn reasons_name_the_cadence_or_the_window_opening() {
        let s = sched(1800, 433, Some("09:00-17:00"), "Europe/Berlin");
        let got = s.next_slots(ts("2026-05-01T16:00:00+02:00"), 3);
        let text: Vec<String> = got
            .iter()
            .map(|(t, r)| format!("{} {r}", local(&s, *t)))
            .collect();
        assert_eq!(
            text,
            vec![
                "2026-05-01 16:07:13 +02:00 every 30m, phase 7m13s",
                "2026-05-01 16:37:13 +02:00 every 30m, phase 7m13s",
                "2026-05-02 09:07:13 +02:00 first slot after the active window opens at 09:00 Europe/Berlin",
            ]
        );
        let always = sched(90_061, 0, None, "UTC");
        let (_, reason) = always.next_slots(ts("2026-01-01T00:00:00Z"), 1)[0].clone();
        assert_eq!(reason.to_string(), "every 1d1h1m1s, phase 0s");
    }

    // ---- windows: overnight, 24:00, day edges ----

    #[test]
    fn overnight_window_wraps_midnight() {
        let s = sched(HOUR, 0, Some("22:00-06:00"), "Asia/Shanghai");
        let got = chain(&s, ts("2026-06-01T12:00:00+08:00"), 9);
        let want: Vec<Timestamp> = [
            "2026-06-01T22:00:00+08:00",
            "2026-06-01T23:00:00+08:00",
            "2026-06-02T00:00:00+08:00",
            "2026-06-02T01:00:00+08:00",
            "2026-06-02T02:00:00+08:00",
            "2026-06-02T03:00:00+08:00",
            "2026-06-02T04:00:00+08:00",
            "2026-06-02T05:00:00+08:00",
            "2026-06-02T22:00:00+08:00",
        ]
        .into_iter()
        .map(ts)
        .collect();
        assert_eq!(got, want);
        assert!(s.is_in_window(ts("2026-06-02T05:59:59+08:00")));
        assert!(!s.is_in_window(ts("2026-06-02T06:00:00+08:00")));
        assert!(s.is_in_window(ts("2026-06-02T00:00:00+08:00")));
        check_against_oracle(&s, ts("2026-06-01T00:00:00Z"), ts("2026-06-05T00:00:00Z"));
    }

    #[test]
    fn a_24_00_end_closes_at_midnight() {
        let s = sched(HOUR, 0, Some("18:00-24:00"), "UTC");
        let got = chain(&s, ts("2026-01-01T12:00:00Z"), 7);
        assert_eq!(got[0], ts("2026-01-01T18:00:00Z"));
        assert_eq!(got[5], ts("2026-01-01T23:00:00Z"));
        assert_eq!(got[6], ts("2026-01-02T18:00:00Z"));
        assert!(!s.is_in_window(ts("2026-01-02T00:00:00Z")));
        assert!(s.is_in_window(ts("2026-01-01T23:59:59.9Z")));

        let all_day = sched(HOUR, 0, Some("00:00-24:00"), "Europe/Berlin");
        let from = ts("2026-03-28T00:00:00Z");
        let until = ts("2026-03-31T00:00:00Z");
        // Every grid point, including across the spring-forward night.
        assert_eq!(chain_until(&all_day, from, until).len(), 72);
        check_against_oracle(&all_day, from, until);
    }

    #[test]
    fn windows_at_the_day_edge() {
        // One minute each side of midnight, every 60 s.
        let s = sched(MIN, 0, Some("23:59-00:01"), "UTC");
        let got = chain(&s, ts("2026-01-01T12:00:00Z"), 3);
        assert_eq!(
            got,
            vec![
                ts("2026-01-01T23:59:00Z"),
                ts("2026-01-02T00:00:00Z"),
                ts("2026-01-02T23:59:00Z")
            ]
        );
        // A window that starts at midnight, and one that ends one minute after.
        let s = sched(MIN, 30, Some("00:00-00:01"), "America/New_York");
        assert_eq!(
            s.next_slot_after(ts("2026-01-01T00:00:31-05:00")),
            Some(ts("2026-01-02T00:00:30-05:00"))
        );
        check_against_oracle(&s, ts("2026-01-01T00:00:00Z"), ts("2026-01-04T00:00:00Z"));
    }

    #[test]
    fn a_short_interval_jumps_over_a_long_closed_window() {
        // 1 s interval, one-minute window: the answer is one jump, not
        // 86,340 steps (and exact to the second).
        let s = sched(1, 0, Some("09:00-09:01"), "Europe/Berlin");
        assert_eq!(
            s.next_slot_after(ts("2026-05-01T09:00:59+02:00")),
            Some(ts("2026-05-02T09:00:00+02:00"))
        );
        assert_eq!(
            s.next_slot_after(ts("2026-05-01T09:00:30.25+02:00")),
            Some(ts("2026-05-01T09:00:31+02:00"))
        );
    }

    #[test]
    fn a_grid_that_never_meets_the_window_gives_none() {
        // Daily slots at 12:00 UTC, window 09:00-10:00 UTC: never.
        let s = sched(24 * HOUR, 12 * HOUR, Some("09:00-10:00"), "UTC");
        assert_eq!(s.next_slot_after(ts("2026-01-01T00:00:00Z")), None);
        assert!(s.next_slots(ts("2026-01-01T00:00:00Z"), 5).is_empty());
        // Daily slots at 07:30 UTC = 08:30 CET in winter, 09:30 CEST in
        // summer: they meet 09:00-10:00 Berlin only in summer, months away.
        let s = sched(
            24 * HOUR,
            7 * HOUR + 30 * MIN,
            Some("09:00-10:00"),
            "Europe/Berlin",
        );
        assert_eq!(
            s.next_slot_after(ts("2026-01-10T00:00:00Z")),
            Some(ts("2026-03-29T09:30:00+02:00"))
        );
    }

    // ---- the DST matrix ----

    #[test]
    fn new_york_spring_forward_opening_in_the_gap_opens_at_the_gap_end() {
        // 2026-03-08 02:00 EST -> 03:00 EDT (07:00Z).
        let s = sched(30 * MIN, 0, Some("02:30-05:00"), "America/New_York");
        let got = chain(&s, ts("2026-03-08T00:00:00-05:00"), 5);
        let want: Vec<Timestamp> = [
            "2026-03-08T03:00:00-04:00",
            "2026-03-08T03:30:00-04:00",
            "2026-03-08T04:00:00-04:00",
            "2026-03-08T04:30:00-04:00",
            "2026-03-09T02:30:00-04:00",
        ]
        .into_iter()
        .map(ts)
        .collect();
        assert_eq!(got, want);
        assert_eq!(
            s.reason(got[0]).to_string(),
            "first slot after the active window opens at 03:00 America/New_York"
        );
        check_against_oracle(&s, ts("2026-03-06T00:00:00Z"), ts("2026-03-11T00:00:00Z"));
    }

    #[test]
    fn new_york_spring_forward_window_inside_the_gap_is_empty_that_day() {
        let s = sched(30 * MIN, 0, Some("02:10-02:50"), "America/New_York");
        // From 03-08 00:00: that day has no 02:xx at all.
        assert_eq!(
            chain(&s, ts("2026-03-08T00:00:00-05:00"), 2),
            vec![
                ts("2026-03-09T02:30:00-04:00"),
                ts("2026-03-10T02:30:00-04:00")
            ]
        );
        check_against_oracle(&s, ts("2026-03-06T00:00:00Z"), ts("2026-03-11T00:00:00Z"));
    }

    #[test]
    fn new_york_spring_forward_close_in_the_gap_closes_at_the_gap_end() {
        let s = sched(30 * MIN, 0, Some("01:30-02:30"), "America/New_York");
        assert_eq!(
            chain(&s, ts("2026-03-08T00:00:00-05:00"), 2),
            vec![
                ts("2026-03-08T01:30:00-05:00"),
                ts("2026-03-09T01:30:00-04:00")
            ]
        );
        assert!(s.is_in_window(ts("2026-03-08T01:59:59-05:00")));
        assert!(!s.is_in_window(ts("2026-03-08T03:00:00-04:00")));
        check_against_oracle(&s, ts("2026-03-06T00:00:00Z"), ts("2026-03-11T00:00:00Z"));
    }

    #[test]
    fn new_york_fall_back_opening_in_the_repeated_hour_uses_the_first() {
        // 2026-11-01 02:00 EDT -> 01:00 EST (06:00Z); 01:00-02:00 repeats.
        let s = sched(30 * MIN, 0, Some("01:30-05:00"), "America/New_York");
        let got = chain_until(
            &s,
            ts("2026-11-01T00:00:00-04:00"),
            ts("2026-11-01T12:00:00Z"),
        );
        let want: Vec<Timestamp> = (0..9)
            .map(|i| Timestamp::from_second(ts("2026-11-01T05:30:00Z").as_second() + i * 30 * MIN))
            .collect::<Result<_, _>>()
            .expect("in range");
        assert_eq!(got, want);
        assert_eq!(local(&s, got[0]), "2026-11-01 01:30:00 -04:00");
        // The repeated 01:00 EST is inside: the window opened at the first 01:30.
        assert_eq!(local(&s, got[1]), "2026-11-01 01:00:00 -05:00");
        assert_eq!(local(&s, got[8]), "2026-11-01 04:30:00 -05:00");
        check_against_oracle(&s, ts("2026-10-30T00:00:00Z"), ts("2026-11-04T00:00:00Z"));
    }

    #[test]
    fn new_york_fall_back_close_in_the_repeated_hour_uses_the_first() {
        let s = sched(30 * MIN, 0, Some("22:00-01:30"), "America/New_York");
        let got = chain_until(
            &s,
            ts("2026-10-31T12:00:00-04:00"),
            ts("2026-11-01T12:00:00Z"),
        );
        assert_eq!(got.len(), 7, "22:00, 22:30, ..., 01:00 EDT");
        assert_eq!(local(&s, got[0]), "2026-10-31 22:00:00 -04:00");
        assert_eq!(local(&s, got[6]), "2026-11-01 01:00:00 -04:00");
        // It does not reopen for the second 01:00-01:30 (EST).
        assert!(!s.is_in_window(ts("2026-11-01T01:00:00-05:00")));
        assert_eq!(
            s.next_slot_after(got[6]),
            Some(ts("2026-11-01T22:00:00-05:00"))
        );
        check_against_oracle(&s, ts("2026-10-30T00:00:00Z"), ts("2026-11-04T00:00:00Z"));
    }

    #[test]
    fn berlin_spring_forward_and_fall_back() {
        // 2026-03-29 02:00 CET -> 03:00 CEST (01:00Z).
        let s = sched(HOUR, 0, Some("02:30-06:00"), "Europe/Berlin");
        let got = chain(&s, ts("2026-03-29T00:00:00+01:00"), 4);
        let shown: Vec<String> = got.iter().map(|&t| local(&s, t)).collect();
        assert_eq!(
            shown,
            vec![
                "2026-03-29 03:00:00 +02:00",
                "2026-03-29 04:00:00 +02:00",
                "2026-03-29 05:00:00 +02:00",
                "2026-03-30 03:00:00 +02:00",
            ]
        );
        // 2026-10-25 03:00 CEST -> 02:00 CET (01:00Z); 02:00-03:00 repeats.
        let s = sched(7 * MIN, 0, Some("02:30-04:00"), "Europe/Berlin");
        let got = check_against_oracle(&s, ts("2026-10-24T00:00:00Z"), ts("2026-10-26T00:00:00Z"));
        let day: Vec<&Timestamp> = got
            .iter()
            .filter(|t| **t >= ts("2026-10-25T00:00:00Z") && **t < ts("2026-10-25T04:00:00Z"))
            .collect();
        // Opens at the first 02:30 CEST (00:30Z), stays open through the
        // repeated hour, closes at 04:00 CET (03:00Z): 150 minutes, 21 grid
        // points (multiples of 420 s from 00:34Z to 02:54Z).
        assert_eq!(local(&s, *day[0]), "2026-10-25 02:34:00 +02:00");
        assert_eq!(local(&s, *day[day.len() - 1]), "2026-10-25 03:54:00 +01:00");
        assert_eq!(day.len(), 21);
    }

    #[test]
    fn a_working_day_window_on_transition_days_is_exactly_local_hours() {
        for (zone, day, offset) in [
            ("America/New_York", "2026-03-08", "-04:00"),
            ("America/New_York", "2026-11-01", "-05:00"),
            ("Europe/Berlin", "2026-03-29", "+02:00"),
            ("Europe/Berlin", "2026-10-25", "+01:00"),
            ("Asia/Shanghai", "2026-03-08", "+08:00"),
        ] {
            let s = sched(30 * MIN, 0, Some("09:00-17:00"), zone);
            let from = ts(&format!("{day}T00:00:00{offset}"));
            let until = ts(&format!("{day}T23:59:59{offset}"));
            let got = chain_until(&s, from, until);
            let shown: Vec<String> = got
                .iter()
                .map(|&t| t.to_zoned(s.tz.clone()).strftime("%H:%M").to_string())
                .collect();
            let want: Vec<String> = (18..34)
                .map(|half_hours| format!("{:02}:{:02}", half_hours / 2, half_hours % 2 * 30))
                .collect();
            assert_eq!(shown, want, "{zone} {day}");
        }
    }

    #[test]
    fn dst_matrix_against_the_brute_force_oracle() {
        let days = [
            ("America/New_York", "2026-03-06T00:00:00Z"),
            ("America/New_York", "2026-10-30T00:00:00Z"),
            ("Europe/Berlin", "2026-03-27T00:00:00Z"),
            ("Europe/Berlin", "2026-10-23T00:00:00Z"),
            ("Asia/Shanghai", "2026-03-27T00:00:00Z"),
            // Spring forward at midnight: 24:00 / 00:00 boundaries in a gap.
            ("America/Santiago", "2026-09-04T00:00:00Z"),
            // Half-hour DST.
            ("Australia/Lord_Howe", "2026-10-02T00:00:00Z"),
            ("Australia/Lord_Howe", "2026-04-03T00:00:00Z"),
        ];
        let windows = [
            "02:30-05:00",
            "01:30-02:30",
            "02:10-02:50",
            "01:00-02:00",
            "02:00-03:00",
            "22:00-02:30",
            "22:00-01:30",
            "01:30-01:15",
            "00:00-24:00",
            "20:00-24:00",
            "00:00-01:00",
            "23:30-00:30",
            "09:00-17:00",
        ];
        for (zone, from) in days {
            let from = ts(from);
            let until = Timestamp::from_second(from.as_second() + 4 * 24 * HOUR).expect("in range");
            for window in windows {
                for (interval, phase) in [
                    (30 * MIN, 0),
                    (HOUR, 0),
                    (7 * MIN, 0),
                    (7 * MIN, 193),
                    (HOUR, 1219),
                ] {
                    let s = sched(interval, phase, Some(window), zone);
                    check_against_oracle(&s, from, until);
                }
            }
        }
    }

    // ---- property tests with a deterministic PRNG ----

    /// SplitMix64: tiny, deterministic, good enough to drive cases.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn range(&mut self, lo: i64, hi: i64) -> i64 {
            lo + self.below((hi - lo + 1) as u64) as i64
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize]
        }
    }

    const ZONES: [&str; 9] = [
        "UTC",
        "America/New_York",
        "Europe/Berlin",
        "Asia/Shanghai",
        "America/Santiago",
        "Australia/Lord_Howe",
        "Asia/Kathmandu",
        "Pacific/Chatham",
        "America/St_Johns",
    ];

    /// Instants near this year's transitions in the zones above, where the
    /// interesting cases live; half the cases start near one of them.
    const HOT_SPOTS: [&str; 8] = [
        "2026-03-08T07:00:00Z",
        "2026-11-01T06:00:00Z",
        "2026-03-29T01:00:00Z",
        "2026-10-25T01:00:00Z",
        "2026-09-06T04:00:00Z",
        "2026-04-04T15:00:00Z",
        "2026-10-03T15:30:00Z",
        "2026-04-05T02:00:00Z",
    ];

    fn random_schedule(rng: &mut Rng) -> Schedule {
        let interval = match rng.below(4) {
            0 => rng.pick(&[
                1, 7, 59, 60, 300, 420, 1800, 3600, 5400, 7200, 86_400, 90_000,
            ]),
            1 => rng.range(1, 120),
            _ => rng.range(60, 4 * HOUR),
        };
        let window = match rng.below(5) {
            0 => None,
            _ => {
                let start = rng.below(1440) as u16;
                let mut end = rng.range(1, 1440) as u16;
                if end == start {
                    end = if start == 1439 { 1440 } else { start + 1 };
                }
                Some(ActiveHours { start, end })
            }
        };
        let id = format!("agent-{}", rng.next());
        Schedule::new(
            &id,
            Duration::from_secs(interval as u64),
            window,
            zone(rng.pick(&ZONES)),
            rng.below(4) != 0,
        )
        .expect("random intervals are in range")
    }

    fn random_start(rng: &mut Rng) -> Timestamp {
        let base = if rng.below(2) == 0 {
            ts(rng.pick(&HOT_SPOTS)).as_second() - rng.range(0, 2 * 24 * HOUR)
        } else {
            ts("2026-01-01T00:00:00Z").as_second() + rng.range(0, 365 * 24 * HOUR)
        };
        Timestamp::new(base, rng.below(1_000_000_000) as i32).expect("in range")
    }

    fn secs(t: Timestamp) -> i64 {
        t.as_second()
    }

    #[test]
    fn property_search_matches_a_naive_grid_walk() {
        let mut rng = Rng(0x5EED_0001);
        for case in 0..150 {
            let s = random_schedule(&mut rng);
            let from = random_start(&mut rng);
            let got = chain(&s, from, 40);
            // Walk every grid point up to the last slot found (bounded).
            let limit = got
                .last()
                .map_or(secs(from) + 2000 * s.interval, |t| secs(*t))
                .min(secs(from) + 2000 * s.interval);
            let mut naive = Vec::new();
            let mut g = s.ceil_to_grid(floor_secs(from) + 1);
            while g <= limit {
                let t = Timestamp::from_second(g).expect("in range");
                if s.is_in_window(t) {
                    naive.push(t);
                }
                g += s.interval;
            }
            let prefix: Vec<Timestamp> =
                got.iter().copied().filter(|t| secs(*t) <= limit).collect();
            assert_eq!(prefix, naive, "case {case}: {s:?} from {from}");
            for pair in got.windows(2) {
                assert!(pair[0] < pair[1]);
            }
            for &t in &got {
                assert!(t > from && s.is_slot(t), "case {case}");
            }
        }
    }

    #[test]
    fn property_window_membership_is_local_wall_time_outside_folds() {
        let mut rng = Rng(0x5EED_0002);
        for case in 0..200 {
            let s = random_schedule(&mut rng);
            let Some(w) = s.window else { continue };
            let mut t = secs(random_start(&mut rng));
            for _ in 0..300 {
                let at = Timestamp::from_second(t).expect("in range");
                if !is_fold(&s.tz, at) {
                    let local_time = s.tz.to_datetime(at).time();
                    assert_eq!(
                        s.is_in_window(at),
                        w.contains(local_time),
                        "case {case}: {} in {w}",
                        local(&s, at)
                    );
                }
                t += rng.range(1, 20 * MIN);
            }
        }
    }

    #[test]
    fn property_restart_anywhere_yields_the_same_future_slots() {
        let mut rng = Rng(0x5EED_0003);
        for case in 0..300 {
            let s = random_schedule(&mut rng);
            let from = random_start(&mut rng);
            let uninterrupted = chain(&s, from, 30);
            let Some(&last) = uninterrupted.last() else {
                continue;
            };
            for _ in 0..20 {
                // A restart at an arbitrary instant (with nanoseconds) in the run.
                let span = (secs(last) - secs(from)).max(1);
                let restart = Timestamp::new(
                    secs(from) + rng.range(0, span - 1),
                    rng.below(1_000_000_000) as i32,
                )
                .expect("in range");
                let expected: Vec<Timestamp> = uninterrupted
                    .iter()
                    .copied()
                    .filter(|&t| t > restart)
                    .collect();
                let resumed = chain(&s, restart, expected.len());
                assert_eq!(resumed, expected, "case {case}: restart at {restart}");
                // Restarting exactly on a slot resumes after it.
                let on = rng.pick(&uninterrupted);
                let after: Vec<Timestamp> =
                    uninterrupted.iter().copied().filter(|&t| t > on).collect();
                assert_eq!(chain(&s, on, after.len()), after, "case {case}");
            }
        }
    }

    /// Slots in `[from, until]` by chaining.
    fn slots_between(s: &Schedule, from: Timestamp, until: Timestamp) -> Vec<Timestamp> {
        match s.first_slot_at_or_after(from) {
            Some(first) if first <= until => {
                let mut out = vec![first];
                out.extend(chain_until(s, first, until));
                out
            }
            _ => Vec::new(),
        }
    }

    fn check_due(s: &Schedule, persisted: Timestamp, now: Timestamp, catch_up: Duration) -> Due {
        let d = due(persisted, now, catch_up, s);
        let all = slots_between(s, persisted, now);
        // At most one run, the most recent due slot, never older than catch_up.
        if let Some(run) = d.run {
            assert_eq!(Some(&run), all.last());
            assert!(run <= now);
            let late = now.as_nanosecond() - run.as_nanosecond();
            assert!(late <= catch_up.as_nanos() as i128);
        } else if let Some(&last) = all.last() {
            let late = now.as_nanosecond() - last.as_nanosecond();
            assert!(
                late > catch_up.as_nanos() as i128,
                "a runnable slot was not run"
            );
        }
        // missed_unlisted + missed + run partition the due slots, in order.
        assert!(d.missed.len() <= MAX_MISSED_LISTED);
        let listed = d.missed.len() + usize::from(d.run.is_some());
        assert_eq!(d.missed_unlisted as usize + listed, all.len());
        let tail: Vec<Timestamp> = d.missed.iter().copied().chain(d.run).collect();
        assert_eq!(tail, all[all.len() - listed..]);
        // The future starts with `next`, strictly after now, nothing skipped.
        if persisted <= now {
            assert_eq!(d.next, s.next_slot_after(now));
        } else {
            assert_eq!(d.next, s.first_slot_at_or_after(persisted));
        }
        d
    }

    #[test]
    fn due_runs_a_slot_exactly_at_now_even_with_zero_catch_up() {
        let s = sched(30 * MIN, 0, None, "UTC");
        let now = ts("2026-05-01T10:00:00Z");
        let d = check_due(&s, now, now, Duration::ZERO);
        assert_eq!(d.run, Some(now));
        assert!(d.missed.is_empty());
        assert_eq!(d.next, Some(ts("2026-05-01T10:30:00Z")));
    }

    #[test]
    fn due_after_downtime_runs_only_the_latest_slot_in_the_catch_up_window() {
        let s = sched(30 * MIN, 0, None, "UTC");
        let persisted = ts("2026-05-01T10:00:00Z");
        // Down until 12:10: 10:00 .. 12:00 came due (5 slots).
        let now = ts("2026-05-01T12:10:00Z");
        let d = check_due(&s, persisted, now, Duration::from_secs(1800));
        assert_eq!(d.run, Some(ts("2026-05-01T12:00:00Z")));
        assert_eq!(d.missed.len(), 4);
        assert_eq!(d.missed[0], persisted);
        assert_eq!(d.next, Some(ts("2026-05-01T12:30:00Z")));
        // With a 5-minute catch-up window even the latest is too late.
        let d = check_due(&s, persisted, now, Duration::from_secs(300));
        assert_eq!(d.run, None);
        assert_eq!(d.missed.len(), 5);
    }

    #[test]
    fn due_does_not_move_the_cursor_back_after_a_clock_step() {
        let s = sched(30 * MIN, 0, None, "UTC");
        let persisted = ts("2026-05-01T10:30:00Z");
        let d = check_due(
            &s,
            persisted,
            ts("2026-05-01T09:00:00Z"),
            Duration::from_secs(1800),
        );
        assert_eq!(d.run, None);
        assert!(d.missed.is_empty());
        assert_eq!(d.next, Some(persisted));
    }

    #[test]
    fn due_after_a_long_outage_lists_a_bounded_number_of_missed_slots() {
        // 1 s interval, 30 days down, in a window: counted, not enumerated.
        let s = sched(1, 0, Some("09:00-17:00"), "Europe/Berlin");
        let persisted = ts("2026-03-01T09:00:00+01:00");
        let now = ts("2026-03-31T12:00:00+02:00");
        let d = due(persisted, now, Duration::from_secs(60), &s);
        assert_eq!(d.run, Some(now));
        assert_eq!(d.missed.len(), MAX_MISSED_LISTED);
        // 30 full days of 8 h, plus 3 h on the last day, minus the run.
        let total = 30 * 8 * 3600 + 3 * 3600 + 1;
        assert_eq!(d.missed_unlisted as usize + d.missed.len() + 1, total);
        assert_eq!(
            *d.missed.last().expect("1000 listed"),
            ts("2026-03-31T11:59:59+02:00")
        );
        assert_eq!(d.next, Some(ts("2026-03-31T12:00:01+02:00")));
    }

    #[test]
    fn property_due_partitions_the_slots_after_arbitrary_downtime() {
        let mut rng = Rng(0x5EED_0004);
        for case in 0..300 {
            let s = random_schedule(&mut rng);
            let start = random_start(&mut rng);
            let persisted = match rng.below(3) {
                // The usual case: the cursor is a slot.
                0 | 1 => match s.next_slot_after(start) {
                    Some(t) => t,
                    None => continue,
                },
                // A cursor off the grid (e.g. the interval changed).
                _ => start,
            };
            let max_down = (1500 * s.interval).min(10 * 24 * HOUR);
            let now = Timestamp::new(
                secs(persisted) + rng.range(-HOUR, max_down),
                rng.below(1_000_000_000) as i32,
            )
            .expect("in range");
            let catch_up = Duration::from_secs(match rng.below(4) {
                0 => 0,
                1 => s.interval as u64,
                2 => rng.range(0, 3 * s.interval) as u64,
                _ => 10 * 24 * HOUR as u64,
            });
            let d = check_due(&s, persisted, now, catch_up);
            assert!(d.next.is_none_or(|n| n > now), "case {case}");
        }
    }

    #[test]
    fn property_a_scheduler_loop_with_crashes_never_loses_or_duplicates_a_slot() {
        let mut rng = Rng(0x5EED_0005);
        for case in 0..60 {
            let s = random_schedule(&mut rng);
            let start = random_start(&mut rng);
            let Some(first) = s.next_slot_after(start) else {
                continue;
            };
            let catch_up = Duration::from_secs(rng.range(0, 2 * s.interval) as u64);
            let mut cursor = first;
            let mut now = first;
            let mut seen: Vec<Timestamp> = Vec::new();
            let mut unlisted = 0u64;
            let mut ran = 0usize;
            for _ in 0..40 {
                // Mostly on time (tick at the cursor plus a little lag), now
                // and then a crash with downtime of up to 50 intervals.
                let lag = match rng.below(5) {
                    0 => rng.range(0, 50 * s.interval),
                    _ => rng.range(0, 2),
                };
                now = Timestamp::from_second(secs(cursor).max(secs(now)) + lag).expect("in range");
                let d = check_due(&s, cursor, now, catch_up);
                seen.extend(d.missed.iter().copied());
                if let Some(run) = d.run {
                    seen.push(run);
                    ran += 1;
                }
                unlisted += d.missed_unlisted;
                match d.next {
                    Some(next) => cursor = next,
                    None => break,
                }
            }
            let all = slots_between(&s, first, now);
            assert_eq!(
                seen.len() as u64 + unlisted,
                all.len() as u64,
                "case {case}"
            );
            let mut sorted = seen.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(
                sorted.len(),
                seen.len(),
                "case {case}: a slot was handled twice"
            );
            assert!(sorted.iter().all(|t| all.contains(t)), "case {case}");
            assert!(ran <= 40);
        }
    }
}

//! Failure streaks: when the owner hears that an agent's heartbeats fail,
//! and when they recover.
//!
//! A streak is a run of consecutive `failed` runs of one agent. Its first
//! failed run (after a success, or ever) sends one `failed` event; later
//! failures of the same streak send nothing; the first successful run after
//! it (`ok`, `suppressed`, `delivering`/`delivered`, `undeliverable`,
//! `dead_letter` — the run itself worked, whatever became of its alert)
//! sends one `recovered` event. Skipped, missed, deferred and running runs
//! neither extend nor end a streak.
//!
//! The state is a pure function of the run log (see [`Streak::from_log`]),
//! so it survives restarts without a tree of its own: the scheduler derives
//! it once per agent from the newest runs, then keeps it in memory.

use claw_proto::v1::RunStatus;

use super::runs::RunKey;

/// How far back [`Streak::from_log`] looks (a longer streak is counted as
/// this long; it still sends no second `failed` event).
pub const LOG_DEPTH: usize = 1000;

/// What a run's end means for its agent's streak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The run failed.
    Failure,
    /// The run worked.
    Success,
    /// Neither (skipped, missed, still open).
    Neutral,
}

/// The streak effect of a run status.
pub fn effect(status: RunStatus) -> Effect {
    match status {
        RunStatus::Failed => Effect::Failure,
        RunStatus::Ok
        | RunStatus::Suppressed
        | RunStatus::Delivering
        | RunStatus::Delivered
        | RunStatus::DeadLetter
        | RunStatus::Undeliverable => Effect::Success,
        _ => Effect::Neutral,
    }
}

/// An event to send to the agent's webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The first failure of a streak.
    Failed {
        /// Failed runs in a row, this one included.
        consecutive_failures: u32,
    },
    /// The first success after a streak.
    Recovered {
        /// How many runs failed in a row.
        failed_runs: u32,
        /// Nominal time (unix ms) of the streak's first failed run.
        since_ms: i64,
    },
}

/// One agent's streak.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Streak {
    /// Failed runs in a row (0 = healthy or unknown).
    pub failures: u32,
    /// Nominal time of the first failure of the current streak.
    pub since_ms: i64,
    /// The last run counted (a run's end is seen once even if its record
    /// is written again).
    last: Option<RunKey>,
}

impl Streak {
    /// The streak that `runs` (nominal ms and status, newest first) ends
    /// with.
    pub fn from_log(runs: impl IntoIterator<Item = (i64, RunStatus)>) -> Streak {
        let mut s = Streak::default();
        for (nominal_ms, status) in runs {
            match effect(status) {
                Effect::Neutral => {}
                Effect::Success => break,
                Effect::Failure => {
                    s.failures = s.failures.saturating_add(1);
                    s.since_ms = nominal_ms;
                }
            }
        }
        s
    }

    /// Counts the end of run `key` with `status`; the event to send, if any.
    pub fn observe(&mut self, key: &RunKey, status: RunStatus) -> Option<Transition> {
        if self.last.as_ref() == Some(key) {
            return None;
        }
        let effect = effect(status);
        if effect == Effect::Neutral {
            return None;
        }
        self.last = Some(key.clone());
        match effect {
            Effect::Failure => {
                self.failures = self.failures.saturating_add(1);
                if self.failures == 1 {
                    self.since_ms = key.nominal_ms;
                    return Some(Transition::Failed {
                        consecutive_failures: 1,
                    });
                }
                None
            }
            _ if self.failures > 0 => {
                let t = Transition::Recovered {
                    failed_runs: self.failures,
                    since_ms: self.since_ms,
                };
                self.failures = 0;
                self.since_ms = 0;
                Some(t)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunStatus::*;

    fn key(ms: i64) -> RunKey {
        RunKey::new("a1", ms)
    }

    #[test]
    fn one_failed_event_per_streak_and_one_recovered() {
        let mut s = Streak::default();
        let mut events = Vec::new();
        for (ms, st) in [
            (1, Suppressed),
            (2, Failed),
            (3, Failed),
            (4, Skipped),
            (5, Failed),
            (6, Ok),
            (7, Suppressed),
            (8, Failed),
            (9, Delivering),
        ] {
            events.push((ms, s.observe(&key(ms), st)));
        }
        let events: Vec<_> = events.into_iter().filter(|(_, e)| e.is_some()).collect();
        assert_eq!(
            events,
            [
                (
                    2,
                    Some(Transition::Failed {
                        consecutive_failures: 1
                    })
                ),
                (
                    6,
                    Some(Transition::Recovered {
                        failed_runs: 3,
                        since_ms: 2
                    })
                ),
                (
                    8,
                    Some(Transition::Failed {
                        consecutive_failures: 1
                    })
                ),
                (
                    9,
                    Some(Transition::Recovered {
                        failed_runs: 1,
                        since_ms: 8
                    })
                ),
            ]
        );
    }

    #[test]
    fn the_same_run_is_counted_once() {
        let mut s = Streak::default();
        assert!(s.observe(&key(1), Failed).is_some());
        assert_eq!(s.observe(&key(1), Failed), None);
        assert_eq!(s.failures, 1);
        assert!(s.observe(&key(2), Delivering).is_some());
        // Its delivery ending later changes nothing.
        assert_eq!(s.observe(&key(2), Delivered), None);
        assert_eq!(s.failures, 0);
    }

    #[test]
    fn a_first_ever_failure_starts_a_streak_and_neutral_runs_do_not_end_it() {
        let mut s = Streak::default();
        assert_eq!(s.observe(&key(1), Missed), None);
        assert!(matches!(
            s.observe(&key(2), Failed),
            Some(Transition::Failed { .. })
        ));
        assert_eq!(s.observe(&key(3), Skipped), None);
        assert_eq!(s.observe(&key(4), Deferred), None);
        assert_eq!(s.failures, 1);
        assert!(matches!(
            s.observe(&key(5), Undeliverable),
            Some(Transition::Recovered { failed_runs: 1, .. })
        ));
    }

    #[test]
    fn the_log_gives_back_the_streak_after_a_restart() {
        // Newest first: two failures (and a skip) after a success.
        let s = Streak::from_log([
            (50, Failed),
            (40, Skipped),
            (30, Failed),
            (20, Ok),
            (10, Failed),
        ]);
        assert_eq!((s.failures, s.since_ms), (2, 30));
        let mut s = s;
        // A further failure continues the streak: no second event.
        assert_eq!(s.observe(&key(60), Failed), None);
        assert_eq!(
            s.observe(&key(70), Suppressed),
            Some(Transition::Recovered {
                failed_runs: 3,
                since_ms: 30
            })
        );
        assert_eq!(Streak::from_log([(1, Ok), (0, Failed)]).failures, 0);
        assert_eq!(Streak::from_log([]).failures, 0);
    }
}

//! An agent's heartbeat status as operators see it (`clawctl agent list`,
//! `Agent.heartbeat_status`, the stale gauge): whether it is paused,
//! outside its active hours, never ran, failing, ok, or **stale** — enabled,
//! inside its active hours, and without a terminal run for longer than
//! [`stale_after`] (two intervals plus the deferral cap), counted from its
//! last terminal run or, without one, from when it was enabled.
//!
//! The scheduler's periodic sweep ([`super::Scheduler`]) and the agent API
//! share [`status`], so the gauge and the listing agree.

use std::time::Duration;

use claw_proto::v1::{Agent, RunStatus};
use claw_proto::validate;
use jiff::Timestamp;

use crate::heartbeat::slots::Schedule;

/// How long an agent inside its active hours may go without a terminal run
/// before it is stale: two intervals plus its deferral cap.
pub fn stale_after(agent: &Agent) -> Duration {
    let interval = Duration::from_secs(agent.interval_seconds.max(1));
    interval * 2 + Duration::from_secs(validate::effective_busy_defer_max_seconds(agent))
}

/// Whether a run status ends a slot for the stale check (the run is over,
/// whatever its outcome).
pub fn is_terminal(status: RunStatus) -> bool {
    matches!(
        status,
        RunStatus::Ok
            | RunStatus::Suppressed
            | RunStatus::Delivered
            | RunStatus::Failed
            | RunStatus::Skipped
            | RunStatus::Missed
            | RunStatus::DeadLetter
            | RunStatus::Undeliverable
    )
}

/// Whether a terminal status counts as failing.
pub fn is_failing(status: RunStatus) -> bool {
    matches!(
        status,
        RunStatus::Failed | RunStatus::Missed | RunStatus::DeadLetter | RunStatus::Undeliverable
    )
}

/// The status of `agent` at `now_ms`: `paused`, `outside_active_hours`,
/// `stale`, `never`, `failing` or `ok`. `last` is its last terminal run
/// (status, finish ms); `since_ms` when the count starts without one (or
/// when it restarted: enabled, changed, last seen outside its hours).
pub fn status(
    agent: &Agent,
    schedule: Option<&Schedule>,
    last: Option<(RunStatus, i64)>,
    since_ms: i64,
    now_ms: i64,
) -> &'static str {
    if !agent.enabled {
        return "paused";
    }
    let in_window = |ms: i64| {
        schedule.is_none_or(|s| Timestamp::from_millisecond(ms).is_ok_and(|t| s.is_in_window(t)))
    };
    if !in_window(now_ms) {
        return "outside_active_hours";
    }
    let threshold = stale_after(agent).as_millis() as i64;
    let reference = last.map_or(since_ms, |(_, at)| at.max(since_ms));
    // A window that opened less than the threshold ago has had no chance
    // to produce a run yet.
    if now_ms - reference > threshold && in_window(now_ms - threshold) {
        return "stale";
    }
    match last {
        None => "never",
        Some((s, _)) if is_failing(s) => "failing",
        Some(_) => "ok",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(active_hours: &str) -> Agent {
        Agent {
            id: "a1".into(),
            interval_seconds: 60,
            busy_defer_max_seconds: 30,
            active_hours: active_hours.into(),
            timezone: "UTC".into(),
            enabled: true,
            ..Default::default()
        }
    }

    /// 2023-11-14T22:14:00Z.
    const NOW: i64 = 1_700_000_040_000;

    #[test]
    fn an_agent_without_terminal_runs_for_two_intervals_and_the_cap_is_stale() {
        let a = agent("");
        let s = super::super::schedule_of(&a).expect("schedule");
        assert_eq!(stale_after(&a), Duration::from_secs(150));
        let st = |last, since| status(&a, Some(&s), last, since, NOW);
        assert_eq!(st(None, NOW - 10_000), "never");
        assert_eq!(st(None, NOW - 151_000), "stale");
        assert_eq!(st(Some((RunStatus::Suppressed, NOW - 100_000)), 0), "ok");
        assert_eq!(st(Some((RunStatus::Failed, NOW - 100_000)), 0), "failing");
        assert_eq!(st(Some((RunStatus::Suppressed, NOW - 151_000)), 0), "stale");
        assert_eq!(
            st(Some((RunStatus::Suppressed, NOW - 151_000)), NOW - 1_000),
            "ok",
            "counted from the later of the two"
        );
        let paused = Agent {
            enabled: false,
            ..a.clone()
        };
        assert_eq!(status(&paused, Some(&s), None, 0, NOW), "paused");
    }

    #[test]
    fn outside_its_active_hours_an_agent_is_never_stale() {
        // NOW is 22:14 UTC.
        let a = agent("08:00-18:00");
        let s = super::super::schedule_of(&a).expect("schedule");
        assert_eq!(status(&a, Some(&s), None, 0, NOW), "outside_active_hours");
        // A window opened a minute ago: not stale yet.
        let b = agent("22:13-23:00");
        let s = super::super::schedule_of(&b).expect("schedule");
        assert_eq!(status(&b, Some(&s), None, 0, NOW), "never");
    }
}

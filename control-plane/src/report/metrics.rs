//! Report-stream metrics of the control plane (registered in
//! [`crate::metrics`]'s recorder). The cooldown and rate-share metrics are in
//! [`crate::fleet::metrics`].
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `claw_cp_report_batches_total` | counter | `result` (`stored`, `duplicate`) |
//! | `claw_cp_report_events_total` | counter | `kind` (`usage`, `rate_limited`, `failure`, `success`, `activity`) |
//! | `claw_cp_report_lag_seconds` | histogram | (now − oldest event of a stored batch) |
//! | `claw_cp_report_dropped_events` | gauge | (sum over connected report streams of what proxies dropped) |
//! | `claw_cp_report_streams` | gauge | |
//! | `claw_cp_report_unknown_agent_total` | counter | `kind` (`activity`, `usage`) |

/// Report batches by outcome.
pub(crate) const REPORT_BATCHES_TOTAL: &str = "claw_cp_report_batches_total";
/// Events in stored batches by kind.
pub(crate) const REPORT_EVENTS_TOTAL: &str = "claw_cp_report_events_total";
/// How old the oldest event of a stored batch was when it was stored.
pub(crate) const REPORT_LAG_SECONDS: &str = "claw_cp_report_lag_seconds";
/// Events proxies reported dropping (their buffer overflowed).
pub(crate) const REPORT_DROPPED_EVENTS: &str = "claw_cp_report_dropped_events";
/// Reported agent ids that name no configured agent (dropped).
pub(crate) const REPORT_UNKNOWN_AGENT_TOTAL: &str = "claw_cp_report_unknown_agent_total";
/// Open report streams.
pub(crate) const REPORT_STREAMS: &str = "claw_cp_report_streams";

/// Buckets of the report lag histogram, in seconds.
pub(crate) const LAG_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Describes the metrics and initializes them at zero.
pub(crate) fn describe() {
    metrics::describe_counter!(REPORT_BATCHES_TOTAL, "Report batches by outcome");
    metrics::describe_counter!(REPORT_EVENTS_TOTAL, "Events in stored report batches");
    metrics::describe_histogram!(
        REPORT_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Age of the oldest event of a report batch when it was stored"
    );
    metrics::describe_gauge!(
        REPORT_DROPPED_EVENTS,
        "Events the connected proxies dropped because their report buffer overflowed"
    );
    metrics::describe_gauge!(REPORT_STREAMS, "Open report streams");
    metrics::describe_counter!(
        REPORT_UNKNOWN_AGENT_TOTAL,
        "Reported activity and usage events whose agent id names no configured agent: not tracked (usage stays under its key with no agent)"
    );
    for kind in ["activity", "usage"] {
        metrics::counter!(REPORT_UNKNOWN_AGENT_TOTAL, "kind" => kind).increment(0);
    }
    for result in ["stored", "duplicate"] {
        metrics::counter!(REPORT_BATCHES_TOTAL, "result" => result).increment(0);
    }
    metrics::gauge!(REPORT_STREAMS).increment(0.0);
    metrics::gauge!(REPORT_DROPPED_EVENTS).increment(0.0);
}

/// Counts a batch (`stored` or `duplicate`).
pub(crate) fn batch(result: &'static str) {
    metrics::counter!(REPORT_BATCHES_TOTAL, "result" => result).increment(1);
}

/// Counts events of a stored batch.
pub(crate) fn events(kind: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!(REPORT_EVENTS_TOTAL, "kind" => kind).increment(n);
    }
}

/// Counts an event whose agent id names no configured agent.
pub(crate) fn unknown_agent(kind: &'static str) {
    metrics::counter!(REPORT_UNKNOWN_AGENT_TOTAL, "kind" => kind).increment(1);
}

/// Records the lag of a stored batch.
pub(crate) fn lag(seconds: f64) {
    metrics::histogram!(REPORT_LAG_SECONDS).record(seconds.max(0.0));
}

/// Adjusts the open report streams.
pub(crate) fn streams(delta: f64) {
    metrics::gauge!(REPORT_STREAMS).increment(delta);
}

/// Adjusts the dropped-events gauge.
pub(crate) fn dropped(delta: f64) {
    metrics::gauge!(REPORT_DROPPED_EVENTS).increment(delta);
}

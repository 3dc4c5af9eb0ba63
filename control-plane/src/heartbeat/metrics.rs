//! Heartbeat metrics (registered in `crate::metrics`'s recorder).
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `claw_heartbeat_runs_total` | counter | `outcome`, `skip_reason` |
//! | `claw_heartbeat_dispatch_lag_seconds` | histogram | |
//! | `claw_heartbeat_agent_status` | gauge | `agent` (1 = last slot ok/suppressed/delivered) |
//! | `claw_heartbeat_agent_stale` | gauge | `agent` (1 = no terminal run for 2 intervals + the deferral cap) |
//! | `claw_heartbeat_consecutive_failures` | gauge | `agent` |
//! | `claw_heartbeat_missed_total` | counter | |
//! | `claw_heartbeat_dead_letters_total` | counter | |
//! | `claw_heartbeat_outbox_depth` | gauge | |
//! | `claw_heartbeat_undeliverable_total` | counter | |
//! | `claw_heartbeat_webhook_events_total` | counter | `kind` (`failed`, `recovered`) |
//! | `claw_heartbeat_event_dead_letters_total` | counter | |
//! | `claw_heartbeat_results_waiting_for_space` | gauge | (runs whose results wait for space, see `scheduler`'s commit) |
//! | `claw_heartbeat_results_dropped_total` | counter | |

use claw_proto::v1::RunStatus;

/// Terminal run outcomes by status and skip reason.
pub const RUNS_TOTAL: &str = "claw_heartbeat_runs_total";
/// Actual start − nominal slot time.
pub const DISPATCH_LAG_SECONDS: &str = "claw_heartbeat_dispatch_lag_seconds";
/// 1 when the agent's last slot ended ok/suppressed/delivered, else 0.
pub const AGENT_STATUS: &str = "claw_heartbeat_agent_status";
/// 1 while the agent is stale (see `scheduler::status`), else 0.
pub const AGENT_STALE: &str = "claw_heartbeat_agent_stale";
/// Failed, missed or dead-lettered slots in a row.
pub const CONSECUTIVE_FAILURES: &str = "claw_heartbeat_consecutive_failures";
/// Slots that passed while the control plane was down.
pub const MISSED_TOTAL: &str = "claw_heartbeat_missed_total";
/// Alerts that exhausted their delivery attempts.
pub const DEAD_LETTERS_TOTAL: &str = "claw_heartbeat_dead_letters_total";
/// Deliveries waiting in the outbox.
pub const OUTBOX_DEPTH: &str = "claw_heartbeat_outbox_depth";

/// Buckets of the dispatch lag histogram, in seconds.
pub const LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Describes the metrics and initializes the unlabeled ones at zero.
pub fn describe() {
    metrics::describe_counter!(RUNS_TOTAL, "Heartbeat slots by terminal outcome");
    metrics::describe_histogram!(
        DISPATCH_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Heartbeat run start minus the slot's nominal time"
    );
    metrics::describe_gauge!(
        AGENT_STATUS,
        "1 when the agent's last heartbeat ended ok/suppressed/delivered, 0 when failing"
    );
    metrics::describe_gauge!(
        AGENT_STALE,
        "1 when the agent, inside its active hours, had no terminal heartbeat run for two intervals plus its deferral cap"
    );
    metrics::describe_gauge!(
        CONSECUTIVE_FAILURES,
        "Heartbeat slots failed, missed or dead-lettered in a row"
    );
    metrics::describe_counter!(MISSED_TOTAL, "Heartbeat slots missed during downtime");
    metrics::describe_counter!(
        DEAD_LETTERS_TOTAL,
        "Heartbeat alerts dead-lettered after every delivery attempt"
    );
    metrics::describe_gauge!(OUTBOX_DEPTH, "Heartbeat alerts waiting for delivery");
    metrics::counter!(MISSED_TOTAL).increment(0);
    metrics::counter!(DEAD_LETTERS_TOTAL).increment(0);
    describe_hearing_back();
    describe_pending();
}

/// Heartbeat run results kept in memory because the data volume is full
/// (see the scheduler's `commit`).
pub const RESULTS_WAITING: &str = "claw_heartbeat_results_waiting_for_space";
/// Results dropped because too many waited for space.
pub const RESULTS_DROPPED_TOTAL: &str = "claw_heartbeat_results_dropped_total";

/// Describes the metrics of results kept for space.
fn describe_pending() {
    metrics::describe_gauge!(
        RESULTS_WAITING,
        "Heartbeat runs whose results are kept in memory until the data volume has space to store them"
    );
    metrics::describe_counter!(
        RESULTS_DROPPED_TOTAL,
        "Heartbeat run results dropped because too many waited for space (their runs end interrupted at the next start)"
    );
    metrics::gauge!(RESULTS_WAITING).set(0.0);
    metrics::counter!(RESULTS_DROPPED_TOTAL).increment(0);
}

/// The lowercase name of a status (`dead_letter`).
pub fn status_name(s: RunStatus) -> String {
    claw_proto::serde_fmt::short_name(s.as_str_name(), "RUN_STATUS_")
}

/// Counts a terminal outcome.
pub fn outcome(status: RunStatus, skip_reason: &str) {
    metrics::counter!(RUNS_TOTAL, "outcome" => status_name(status), "skip_reason" => skip_reason.to_string())
        .increment(1);
    match status {
        RunStatus::Missed => metrics::counter!(MISSED_TOTAL).increment(1),
        RunStatus::DeadLetter => metrics::counter!(DEAD_LETTERS_TOTAL).increment(1),
        _ => {}
    }
}

/// Sets an agent's health gauges.
pub fn agent_health(agent: &str, healthy: bool, consecutive_failures: u32) {
    metrics::gauge!(AGENT_STATUS, "agent" => agent.to_string()).set(if healthy {
        1.0
    } else {
        0.0
    });
    metrics::gauge!(CONSECUTIVE_FAILURES, "agent" => agent.to_string())
        .set(f64::from(consecutive_failures));
}

/// Marks an agent stale (its status gauge goes 0 with it) or no longer
/// stale (its status gauge back to what its last runs say).
pub fn agent_stale(agent: &str, stale: bool, consecutive_failures: u32) {
    metrics::gauge!(AGENT_STALE, "agent" => agent.to_string()).set(if stale { 1.0 } else { 0.0 });
    if stale {
        metrics::gauge!(AGENT_STATUS, "agent" => agent.to_string()).set(0.0);
    } else {
        agent_health(agent, consecutive_failures == 0, consecutive_failures);
    }
}

/// Sets an agent's stale gauge to 0 (it just had a terminal run).
pub fn agent_fresh(agent: &str) {
    metrics::gauge!(AGENT_STALE, "agent" => agent.to_string()).set(0.0);
}

/// Records a dispatch lag.
pub fn dispatch_lag(seconds: f64) {
    metrics::histogram!(DISPATCH_LAG_SECONDS).record(seconds.max(0.0));
}

/// Sets the outbox depth.
pub fn outbox_depth(n: usize) {
    metrics::gauge!(OUTBOX_DEPTH).set(n as f64);
}

// ---- the owner hears back: undeliverable alerts, failure/recovered events

/// Alerts of agents without a webhook (`undeliverable` runs).
pub const UNDELIVERABLE_TOTAL: &str = "claw_heartbeat_undeliverable_total";
/// `failed` / `recovered` events queued for agents' webhooks.
pub const WEBHOOK_EVENTS_TOTAL: &str = "claw_heartbeat_webhook_events_total";
/// `failed` / `recovered` events dead-lettered after every attempt.
pub const EVENT_DEAD_LETTERS_TOTAL: &str = "claw_heartbeat_event_dead_letters_total";

fn describe_hearing_back() {
    metrics::describe_counter!(
        UNDELIVERABLE_TOTAL,
        "Heartbeat alerts recorded undeliverable: the agent has no webhook"
    );
    metrics::describe_counter!(
        WEBHOOK_EVENTS_TOTAL,
        "Heartbeat failed/recovered events queued for the agent's webhook"
    );
    metrics::describe_counter!(
        EVENT_DEAD_LETTERS_TOTAL,
        "Heartbeat failed/recovered events dead-lettered after every delivery attempt"
    );
    metrics::counter!(UNDELIVERABLE_TOTAL).increment(0);
    metrics::counter!(EVENT_DEAD_LETTERS_TOTAL).increment(0);
}

/// Counts an undeliverable alert.
pub fn undeliverable() {
    metrics::counter!(UNDELIVERABLE_TOTAL).increment(1);
}

/// Counts a queued `failed` / `recovered` event.
pub fn webhook_event(kind: &str) {
    metrics::counter!(WEBHOOK_EVENTS_TOTAL, "kind" => kind.to_string()).increment(1);
}

/// Counts a dead-lettered event.
pub fn event_dead_letter() {
    metrics::counter!(EVENT_DEAD_LETTERS_TOTAL).increment(1);
}

//! Agent heartbeats. The pure core (no I/O, no clock) and the machinery
//! built around it.
//!
//! * [`slots`] — the cadence: the wall-clock anchored, staggered slot grid,
//!   active windows in the agent's time zone (overnight, `24:00`, DST), the
//!   next-slot search and the catch-up decision after downtime ([`slots::due`]).
//! * [`checklist`] — whether the agent's `HEARTBEAT.md` has anything to check
//!   (an effectively empty one is `skipped(empty_checklist)`, no LLM call).
//! * [`reply`] — whether a reply is `HEARTBEAT_OK` (suppressed) or an alert to
//!   deliver, and the bounded excerpt kept in the run log.
//!
//! * [`scheduler`] — the task that owns every agent's cadence: timer,
//!   claims, skips and deferrals, manual runs, restart recovery, retention.
//! * [`runs`] — the durable run log (one record per slot), cursors, and
//!   the single-transaction commit the scheduler writes through.
//! * [`dispatch`] — the run itself: one request through a proxy, in the
//!   protocol serving the agent's model (Chat Completions, or Messages when
//!   only `anthropic` backends serve it).
//! * [`delivery`] — the webhook outbox: signed, retried with full jitter,
//!   dead-lettered, at least once.
//! * [`wake`] — wake mode: the signed wake request to an agent's own
//!   runtime and the per-run callback that reports the result.
//! * [`metrics`] — the `claw_heartbeat_*` metrics.
//! * [`runtime`] — starts it all inside the server (internal client key,
//!   settings).
//!
//! The pure modules take the current time as an argument (never read a
//! clock), so tests drive them with fixed timestamps.

pub mod checklist;
pub mod delivery;
pub mod dispatch;
pub mod metrics;
pub mod reply;
pub mod runs;
pub mod runtime;
pub mod scheduler;
pub mod slots;
pub mod wake;

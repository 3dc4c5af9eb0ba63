//! Pure logic of agent heartbeats: no I/O, no storage, no async. The
//! scheduler (claims, runs, delivery, run logs) is built around these.
//!
//! * [`slots`] — the cadence: the wall-clock anchored, staggered slot grid,
//!   active windows in the agent's time zone (overnight, `24:00`, DST), the
//!   next-slot search and the catch-up decision after downtime ([`slots::due`]).
//! * [`checklist`] — whether the agent's `HEARTBEAT.md` has anything to check
//!   (an effectively empty one is `skipped(empty_checklist)`, no LLM call).
//! * [`reply`] — whether a reply is `HEARTBEAT_OK` (suppressed) or an alert to
//!   deliver, and the bounded excerpt kept in the run log.
//!
//! Everything takes the current time as an argument (never reads a clock),
//! so tests drive it with fixed timestamps.

pub mod checklist;
pub mod reply;
pub mod slots;

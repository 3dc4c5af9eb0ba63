//! Fleet-wide backend health as this proxy holds it.
//!
//! The control plane probes every backend and sums the proxies' passive
//! signals; it pushes the verdicts as `HealthUpdate`s on the discovery
//! stream ([`crate::discovery`] applies them). A backend is then
//! *unhealthy* (until a `HEALTHY` update) or *ejected* (for the pushed
//! `remaining_ms`, counted from receipt). [`Health`] is that mark in a
//! backend's runtime state, so it survives snapshot swaps like cooldowns do;
//! [`HealthMark`] is the same mark kept by backend id in the discovery
//! dispatcher, the table the runtime marks are synced from.
//!
//! Selection ([`crate::select`]) excludes backends marked here or locally
//! ejected ([`crate::outlier`]), at most half of a model's candidates at
//! once: the ones marked earliest (`since`, then id) stay out
//! (`select::health_excluded`); `select::render_excluded` writes
//! `claw_backend_health_excluded` from the same rule at scrape time, so the
//! gauge never goes stale when an ejection ends.
//!
//! A leaf the snapshot embeds: nothing here names the snapshot.

use parking_lot::Mutex;
use tokio::time::Instant;

/// What the fleet says about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Out until a `HEALTHY` update.
    Unhealthy,
    /// Out until `until`.
    Ejected {
        /// End of the ejection.
        until: Instant,
    },
}

/// A fleet health mark: the verdict, since when this proxy holds it, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthMark {
    /// Unhealthy or ejected.
    pub verdict: Verdict,
    /// When this proxy first saw the backend marked (kept while the mark
    /// holds, whatever its verdict): the cap's order.
    pub since: Instant,
    /// The control plane's reason, for logs.
    pub reason: String,
}

impl HealthMark {
    /// Whether the mark still holds at `now`.
    pub(crate) fn holds(&self, now: Instant) -> bool {
        match self.verdict {
            Verdict::Unhealthy => true,
            Verdict::Ejected { until } => until > now,
        }
    }
}

/// The fleet health mark of one backend (runtime state).
#[derive(Debug, Default)]
pub struct Health {
    mark: Mutex<Option<HealthMark>>,
}

impl Health {
    /// Since when the backend is marked, if the mark holds at `now`.
    pub fn marked_since(&self, now: Instant) -> Option<Instant> {
        self.mark
            .lock()
            .as_ref()
            .filter(|m| m.holds(now))
            .map(|m| m.since)
    }

    /// Whether the fleet marked the backend unhealthy (not just ejected).
    pub fn unhealthy(&self, now: Instant) -> bool {
        self.mark
            .lock()
            .as_ref()
            .is_some_and(|m| m.holds(now) && m.verdict == Verdict::Unhealthy)
    }

    /// The mark, if it holds at `now`.
    pub(crate) fn mark(&self, now: Instant) -> Option<HealthMark> {
        self.mark.lock().clone().filter(|m| m.holds(now))
    }

    /// Replaces the mark (`None` clears it).
    pub(crate) fn set(&self, mark: Option<HealthMark>) {
        *self.mark.lock() = mark;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn an_ejection_mark_ends_and_an_unhealthy_one_holds() {
        let h = Health::default();
        let now = Instant::now();
        assert_eq!(h.marked_since(now), None);
        h.set(Some(HealthMark {
            verdict: Verdict::Ejected {
                until: now + Duration::from_secs(5),
            },
            since: now,
            reason: String::new(),
        }));
        assert_eq!(h.marked_since(now), Some(now));
        assert_eq!(h.marked_since(now + Duration::from_secs(5)), None);
        h.set(Some(HealthMark {
            verdict: Verdict::Unhealthy,
            since: now,
            reason: String::new(),
        }));
        assert!(h.mark(now + Duration::from_secs(86_400)).is_some());
        h.set(None);
        assert_eq!(h.marked_since(now), None);
    }
}

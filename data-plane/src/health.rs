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
//! once: the ones marked earliest (`since`, then id) stay out.
//! [`render_excluded`] writes `claw_backend_health_excluded` from the same
//! rule at scrape time, so the gauge never goes stale when an ejection ends.
//!
//! A leaf the snapshot embeds: nothing here names the snapshot but
//! [`render_excluded`].

use std::fmt::Write as _;

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

/// Since when candidate `c` is excluded for health at `now`, before the
/// cap: the earlier of its fleet mark and its local ejection.
pub(crate) fn excluded_since(c: &crate::snapshot::Backend, now: Instant) -> Option<Instant> {
    let fleet = c.runtime.health.marked_since(now);
    let local = c.runtime.outlier.ejection(now).map(|(since, _)| since);
    match (fleet, local) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Appends `claw_backend_health_excluded`: per backend of the snapshot, 1
/// while selection on this proxy keeps it out for health (marked, and not
/// let back in by the cap) on some route, else 0.
pub(crate) fn render_excluded(store: &crate::snapshot::SnapshotStore, out: &mut String) {
    use crate::snapshot::Api;
    let Some(s) = store.load() else {
        return;
    };
    let now = Instant::now();
    let mut excluded: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for model in s.models() {
        for api in [Api::OpenAi, Api::Anthropic] {
            for route in [s.route_for(model, api), s.translating_route_for(model, api)]
                .into_iter()
                .flatten()
            {
                let set = crate::select::health_excluded(&route.candidates, now);
                for (i, c) in route.candidates.iter().enumerate() {
                    if set.contains(i) {
                        excluded.insert(&c.backend.id);
                    }
                }
            }
        }
    }
    let name = crate::metrics::BACKEND_HEALTH_EXCLUDED;
    let _ = write!(
        out,
        "# HELP {name} 1 while this proxy excludes the backend for health (fleet unhealthy or ejected, or ejected here), within the cap\n# TYPE {name} gauge\n"
    );
    for b in s.backends() {
        let _ = writeln!(
            out,
            "{name}{{backend=\"{}\"}} {}",
            crate::metrics::label_value(&b.id),
            u8::from(excluded.contains(&*b.id))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_excluded_gauge_follows_the_cap() {
        use crate::test_util::{backend, key};
        use claw_proto::{Pool, v1};
        let store = crate::snapshot::SnapshotStore::default();
        let snap = v1::Snapshot {
            version: 1,
            backends: ["a", "b", "c"]
                .iter()
                .map(|id| backend(id, Pool::Primary, &[("m", "m")]))
                .collect(),
            client_keys: vec![key("ck", "s")],
            ..Default::default()
        };
        store.apply(1, &snap).unwrap();
        let now = Instant::now();
        let s = store.load().unwrap();
        for (k, id) in ["b", "a"].iter().enumerate() {
            s.backend(id).unwrap().runtime.health.set(Some(HealthMark {
                verdict: Verdict::Unhealthy,
                since: now + Duration::from_secs(k as u64),
                reason: String::new(),
            }));
        }
        let mut out = String::new();
        render_excluded(&store, &mut out);
        // One of three may be out: b, marked first.
        assert!(
            out.starts_with("# HELP claw_backend_health_excluded "),
            "{out}"
        );
        assert!(out.contains("# TYPE claw_backend_health_excluded gauge\n"));
        for (id, v) in [("a", 0), ("b", 1), ("c", 0)] {
            let line = format!("claw_backend_health_excluded{{backend=\"{id}\"}} {v}\n");
            assert!(out.contains(&line), "{line} in {out}");
        }
    }

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

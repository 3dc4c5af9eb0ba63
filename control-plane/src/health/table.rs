//! The fleet-wide health table: one row per backend, moved by the
//! control plane's probes ([`HealthTable::probed`]) and by the proxies'
//! passive signals ([`HealthTable::passive_failure`],
//! [`HealthTable::ejected_by_proxy`], [`HealthTable::success`]).
//!
//! A row has a probe verdict (not probed yet, healthy, unhealthy after
//! `failures` failed probes in a row, or not probed at all) and, on top of
//! it, an ejection with an end: a proxy's own ejection (`ejected_ms` in its
//! failure report), or `eject_failures` passive failures in a row summed
//! over every proxy, for 30 s doubling per repeat up to 300 s (the proxies'
//! outlier defaults). The effective state is UNHEALTHY while the probes
//! say so, else EJECTED while an ejection lasts, else the probe verdict.
//!
//! Every method returns the [`Transition`] it caused, if the effective
//! state (or an ejection's end) changed, so the caller logs it once and
//! pushes it to every proxy. The table itself does no I/O.

use std::collections::HashMap;
use std::time::Duration;

use claw_proto::v1::{BackendHealth, HealthState, HealthUpdate};
use parking_lot::RwLock;

use crate::catalog::records::timestamp;

/// How passive failures eject a backend fleet-wide (mirrors the proxies'
/// outlier defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectPolicy {
    /// Passive failures in a row, over every proxy, that eject a backend.
    pub failures: u32,
    /// First ejection.
    pub base: Duration,
    /// Longest ejection.
    pub max: Duration,
}

impl Default for EjectPolicy {
    fn default() -> Self {
        EjectPolicy {
            failures: 5,
            base: Duration::from_secs(30),
            max: Duration::from_secs(300),
        }
    }
}

impl EjectPolicy {
    /// The length of the `n`th ejection in a row (1-based).
    fn duration_ms(&self, n: u32) -> i64 {
        let base = self.base.as_millis() as i64;
        let max = self.max.as_millis() as i64;
        let shift = n.saturating_sub(1).min(20);
        base.saturating_mul(1 << shift).min(max).max(0)
    }
}

/// One backend's row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Row {
    name: String,
    /// The probe verdict: UNSPECIFIED (not probed yet), HEALTHY,
    /// UNHEALTHY or NOT_PROBED.
    probe: i32,
    /// When the effective state last changed, unix ms.
    since_ms: i64,
    last_probe_ms: i64,
    last_result: String,
    consecutive_failures: u32,
    reason: String,
    /// End of the current ejection, unix ms (0 or past: none).
    ejected_until_ms: i64,
    /// Passive failures in a row over every proxy.
    passive_failures: u32,
    /// Ejections in a row (the doubling); reset by a success after one ended.
    ejections: u32,
}

impl Row {
    fn state(&self, now_ms: i64) -> HealthState {
        let probe = HealthState::try_from(self.probe).unwrap_or(HealthState::Unspecified);
        if probe == HealthState::Unhealthy {
            HealthState::Unhealthy
        } else if self.ejected_until_ms > now_ms {
            HealthState::Ejected
        } else {
            probe
        }
    }
}

/// Whether a state keeps a backend out of routing (within the proxies' cap).
pub fn excluded(state: HealthState) -> bool {
    matches!(state, HealthState::Unhealthy | HealthState::Ejected)
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// The server answered well enough (2xx, or a 4xx other than 401/403).
    pub ok: bool,
    /// For the table and the log: "ok: 200 in 84 ms", "status 503 in 12 ms".
    pub summary: String,
}

/// A change of a backend's effective health (or of an ejection's end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The backend.
    pub backend_id: String,
    /// Its name (for logs).
    pub name: String,
    /// Before.
    pub from: HealthState,
    /// After.
    pub to: HealthState,
    /// Why.
    pub reason: String,
    /// Ejection left (EJECTED only).
    pub remaining_ms: u64,
    /// A new ejection started (counted and logged once).
    pub new_ejection: bool,
    /// When the backend entered `to`.
    pub since_ms: i64,
}

impl Transition {
    /// The message for proxies. States that do not exclude travel as
    /// HEALTHY: to a proxy, "not probed" and "not yet probed" are routable.
    pub fn to_update(&self) -> HealthUpdate {
        let state = if excluded(self.to) {
            self.to
        } else {
            HealthState::Healthy
        };
        HealthUpdate {
            backend_id: self.backend_id.clone(),
            state: state as i32,
            remaining_ms: if state == HealthState::Ejected {
                self.remaining_ms
            } else {
                0
            },
            reason: self.reason.clone(),
            since_unix_ms: self.since_ms,
        }
    }

    /// Whether proxies need to hear about it: a move into or out of an
    /// excluded state, or a longer ejection.
    pub fn worth_pushing(&self) -> bool {
        excluded(self.from) || excluded(self.to)
    }
}

/// The shared table (read by the API, the dashboard and the discovery
/// streams; written by the prober and report ingestion).
#[derive(Debug, Default)]
pub struct HealthTable {
    rows: RwLock<HashMap<String, Row>>,
    policy: EjectPolicy,
}

impl HealthTable {
    /// An empty table ejecting by `policy`.
    pub fn new(policy: EjectPolicy) -> Self {
        HealthTable {
            rows: RwLock::new(HashMap::new()),
            policy,
        }
    }

    /// The row of `backend_id` for the API, as of `now_ms`.
    pub fn row(&self, backend_id: &str, now_ms: i64) -> Option<BackendHealth> {
        let rows = self.rows.read();
        let r = rows.get(backend_id)?;
        let state = r.state(now_ms);
        let ms = |v: i64| if v > 0 { timestamp(v) } else { None };
        Some(BackendHealth {
            state: state as i32,
            since: ms(r.since_ms),
            last_probe: ms(r.last_probe_ms),
            last_probe_result: r.last_result.clone(),
            consecutive_failures: r.consecutive_failures,
            reason: if excluded(state) {
                r.reason.clone()
            } else {
                String::new()
            },
            ejected_until: if state == HealthState::Ejected {
                ms(r.ejected_until_ms)
            } else {
                None
            },
        })
    }

    /// The effective state of `backend_id` (UNSPECIFIED when unknown).
    pub fn state(&self, backend_id: &str, now_ms: i64) -> HealthState {
        self.rows
            .read()
            .get(backend_id)
            .map_or(HealthState::Unspecified, |r| r.state(now_ms))
    }

    /// Every excluded backend, as messages for a proxy that just connected
    /// (the complete table: backends it does not name are healthy).
    pub fn complete(&self, now_ms: i64) -> Vec<HealthUpdate> {
        let rows = self.rows.read();
        let mut v: Vec<_> = rows
            .iter()
            .filter_map(|(id, r)| {
                let state = r.state(now_ms);
                excluded(state).then(|| HealthUpdate {
                    backend_id: id.clone(),
                    state: state as i32,
                    remaining_ms: if state == HealthState::Ejected {
                        u64::try_from(r.ejected_until_ms - now_ms).unwrap_or(0)
                    } else {
                        0
                    },
                    reason: r.reason.clone(),
                    since_unix_ms: r.since_ms,
                })
            })
            .collect();
        v.sort_by(|a, b| a.backend_id.cmp(&b.backend_id));
        v
    }

    /// Every backend's id and effective state (for the gauges).
    pub fn states(&self, now_ms: i64) -> Vec<(String, HealthState)> {
        self.rows
            .read()
            .iter()
            .map(|(id, r)| (id.clone(), r.state(now_ms)))
            .collect()
    }

    /// Follows the configuration: `backends` are the configured backends
    /// (id, name, probed); rows of others are dropped, unprobed ones become
    /// NOT_PROBED (an UNHEALTHY verdict is released).
    pub fn configure(&self, backends: &[(String, String, bool)], now_ms: i64) -> Vec<Transition> {
        let mut rows = self.rows.write();
        rows.retain(|id, _| backends.iter().any(|(b, _, _)| b == id));
        let mut out = Vec::new();
        for (id, name, probed) in backends {
            let row = rows.entry(id.clone()).or_insert_with(|| Row {
                since_ms: now_ms,
                ..Default::default()
            });
            row.name.clone_from(name);
            let not_probed = HealthState::NotProbed as i32;
            let change = if *probed {
                (row.probe == not_probed).then_some(HealthState::Unspecified)
            } else {
                (row.probe != not_probed).then_some(HealthState::NotProbed)
            };
            if let Some(verdict) = change {
                let from = row.state(now_ms);
                row.probe = verdict as i32;
                row.consecutive_failures = 0;
                out.extend(settle(id, row, from, now_ms, "probing changed"));
            }
        }
        out
    }

    /// Records a probe of `backend_id`; `failures` is its threshold.
    pub fn probed(
        &self,
        backend_id: &str,
        result: &ProbeResult,
        failures: u32,
        now_ms: i64,
    ) -> Option<Transition> {
        let mut rows = self.rows.write();
        let row = rows.get_mut(backend_id)?;
        if row.probe == HealthState::NotProbed as i32 {
            return None;
        }
        let from = row.state(now_ms);
        row.last_probe_ms = now_ms;
        row.last_result.clone_from(&result.summary);
        if result.ok {
            row.consecutive_failures = 0;
            row.probe = HealthState::Healthy as i32;
            end_ejection(row, now_ms);
        } else {
            row.consecutive_failures = row.consecutive_failures.saturating_add(1);
            if row.consecutive_failures >= failures.max(1) {
                row.probe = HealthState::Unhealthy as i32;
                row.reason = format!("probe: {}", result.summary);
            }
            // Below the threshold the verdict stands (not probed yet or
            // healthy): the backend keeps its place meanwhile.
        }
        settle(
            backend_id,
            row,
            from,
            now_ms,
            &format!("probe: {}", result.summary),
        )
    }

    /// A proxy ejected `backend_id` for `ejected_ms` (its failure report):
    /// every proxy ejects it for the rest of that time.
    pub fn ejected_by_proxy(
        &self,
        backend_id: &str,
        node_id: &str,
        ejected_ms: u64,
        summary: &str,
        now_ms: i64,
    ) -> Option<Transition> {
        let mut rows = self.rows.write();
        let row = rows.get_mut(backend_id)?;
        row.passive_failures = 0;
        let reason = if summary.is_empty() {
            format!("ejected by {node_id}")
        } else {
            format!("ejected by {node_id}: {summary}")
        };
        let until = now_ms.saturating_add(i64::try_from(ejected_ms).unwrap_or(i64::MAX));
        eject(row, backend_id, until, reason, now_ms)
    }

    /// A passive failure (connect error, timeout, 5xx, broken stream) one
    /// proxy saw: `eject_failures` in a row over the fleet eject it.
    pub fn passive_failure(
        &self,
        backend_id: &str,
        summary: &str,
        now_ms: i64,
    ) -> Option<Transition> {
        let policy = self.policy;
        let mut rows = self.rows.write();
        let row = rows.get_mut(backend_id)?;
        if row.ejected_until_ms > now_ms {
            // Failures while ejected (requests already in flight) do not
            // extend it.
            return None;
        }
        row.passive_failures = row.passive_failures.saturating_add(1);
        if row.passive_failures < policy.failures.max(1) {
            return None;
        }
        row.passive_failures = 0;
        row.ejections = row.ejections.saturating_add(1);
        let until = now_ms.saturating_add(policy.duration_ms(row.ejections));
        let failures = policy.failures;
        let reason = if summary.is_empty() {
            format!("{failures} failures in a row across the fleet")
        } else {
            format!("{failures} failures in a row across the fleet (last: {summary})")
        };
        eject(row, backend_id, until, reason, now_ms)
    }

    /// A proxy's request succeeded on `backend_id`: the passive count
    /// resets and an ejection ends.
    pub fn success(&self, backend_id: &str, now_ms: i64) -> Option<Transition> {
        let mut rows = self.rows.write();
        let row = rows.get_mut(backend_id)?;
        row.passive_failures = 0;
        let from = row.state(now_ms);
        end_ejection(row, now_ms);
        settle(backend_id, row, from, now_ms, "a request succeeded")
    }
}

/// Ends an ejection; a success after one ended resets the doubling.
fn end_ejection(row: &mut Row, now_ms: i64) {
    if row.ejected_until_ms > now_ms {
        row.ejected_until_ms = 0;
    } else if row.ejected_until_ms > 0 {
        row.ejected_until_ms = 0;
        row.ejections = 0;
    } else {
        row.ejections = 0;
    }
}

fn eject(
    row: &mut Row,
    backend_id: &str,
    until: i64,
    reason: String,
    now_ms: i64,
) -> Option<Transition> {
    let from = row.state(now_ms);
    if until <= row.ejected_until_ms || until <= now_ms {
        return None;
    }
    let new_ejection = row.ejected_until_ms <= now_ms;
    row.ejected_until_ms = until;
    if from != HealthState::Unhealthy {
        row.reason.clone_from(&reason);
    }
    let to = row.state(now_ms);
    if from != to {
        row.since_ms = now_ms;
    }
    if to != HealthState::Ejected {
        // Unhealthy already: the verdict stands, nothing to push.
        return None;
    }
    Some(Transition {
        backend_id: backend_id.to_string(),
        name: row.name.clone(),
        from,
        to,
        reason,
        remaining_ms: u64::try_from(until - now_ms).unwrap_or(0),
        new_ejection,
        since_ms: row.since_ms,
    })
}

/// The transition from `from` to the row's state now, if any.
fn settle(
    backend_id: &str,
    row: &mut Row,
    from: HealthState,
    now_ms: i64,
    why: &str,
) -> Option<Transition> {
    let to = row.state(now_ms);
    if to == from {
        return None;
    }
    row.since_ms = now_ms;
    let reason = if excluded(to) {
        row.reason.clone()
    } else {
        why.to_string()
    };
    Some(Transition {
        backend_id: backend_id.to_string(),
        name: row.name.clone(),
        from,
        to,
        reason,
        remaining_ms: u64::try_from(row.ejected_until_ms - now_ms).unwrap_or(0),
        new_ejection: false,
        since_ms: row.since_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn table() -> HealthTable {
        let t = HealthTable::new(EjectPolicy::default());
        t.configure(&[("b1".into(), "one".into(), true)], NOW);
        t
    }

    fn ok() -> ProbeResult {
        ProbeResult {
            ok: true,
            summary: "ok: 200 in 5 ms".into(),
        }
    }

    fn failed() -> ProbeResult {
        ProbeResult {
            ok: false,
            summary: "status 503 in 3 ms".into(),
        }
    }

    #[test]
    fn failures_in_a_row_make_a_backend_unhealthy_and_one_success_heals_it() {
        let t = table();
        assert_eq!(t.state("b1", NOW), HealthState::Unspecified);
        assert_eq!(t.probed("b1", &failed(), 3, NOW), None);
        assert_eq!(t.probed("b1", &failed(), 3, NOW + 1), None);
        let tr = t.probed("b1", &failed(), 3, NOW + 2).expect("unhealthy");
        assert_eq!(
            (tr.from, tr.to),
            (HealthState::Unspecified, HealthState::Unhealthy)
        );
        assert_eq!(tr.reason, "probe: status 503 in 3 ms");
        assert_eq!(tr.to_update().state, HealthState::Unhealthy as i32);
        let row = t.row("b1", NOW + 2).expect("row");
        assert_eq!(row.consecutive_failures, 3);
        assert_eq!(row.last_probe_result, "status 503 in 3 ms");
        assert!(row.since.is_some() && row.last_probe.is_some());
        assert_eq!(t.complete(NOW + 2).len(), 1);
        // Further failures: no new transition.
        assert_eq!(t.probed("b1", &failed(), 3, NOW + 3), None);
        let tr = t.probed("b1", &ok(), 3, NOW + 4).expect("healthy");
        assert_eq!(
            (tr.from, tr.to),
            (HealthState::Unhealthy, HealthState::Healthy)
        );
        assert!(tr.worth_pushing());
        assert_eq!(tr.to_update().state, HealthState::Healthy as i32);
        assert_eq!(t.row("b1", NOW + 4).expect("row").consecutive_failures, 0);
        assert!(t.complete(NOW + 4).is_empty());
    }

    #[test]
    fn a_failure_streak_broken_by_a_success_starts_over() {
        let t = table();
        t.probed("b1", &failed(), 2, NOW);
        t.probed("b1", &ok(), 2, NOW + 1);
        assert_eq!(t.probed("b1", &failed(), 2, NOW + 2), None);
        assert!(t.probed("b1", &failed(), 2, NOW + 3).is_some());
    }

    #[test]
    fn a_first_healthy_probe_is_a_transition_proxies_need_not_hear() {
        let t = table();
        let tr = t.probed("b1", &ok(), 3, NOW).expect("healthy");
        assert_eq!(tr.from, HealthState::Unspecified);
        assert!(!tr.worth_pushing());
    }

    #[test]
    fn unprobed_backends_are_not_probed_and_released() {
        let t = table();
        for i in 0..3 {
            t.probed("b1", &failed(), 3, NOW + i);
        }
        let tr = t.configure(&[("b1".into(), "one".into(), false)], NOW + 10);
        assert_eq!(tr.len(), 1);
        assert_eq!(tr[0].to, HealthState::NotProbed);
        assert_eq!(tr[0].to_update().state, HealthState::Healthy as i32);
        assert_eq!(t.state("b1", NOW + 10), HealthState::NotProbed);
        // Probes in flight when it was disabled change nothing.
        assert_eq!(t.probed("b1", &failed(), 1, NOW + 11), None);
        // Removed backends are dropped.
        t.configure(&[], NOW + 12);
        assert!(t.row("b1", NOW + 12).is_none());
    }

    #[test]
    fn passive_failures_across_the_fleet_eject_doubling_up_to_the_cap() {
        let t = table();
        for i in 0..4 {
            assert_eq!(t.passive_failure("b1", "connect", NOW + i), None);
        }
        let tr = t
            .passive_failure("b1", "connect", NOW + 4)
            .expect("ejected");
        assert_eq!(tr.to, HealthState::Ejected);
        assert!(tr.new_ejection);
        assert_eq!(tr.remaining_ms, 30_000);
        assert_eq!(tr.to_update().remaining_ms, 30_000);
        let row = t.row("b1", NOW + 4).expect("row");
        assert!(row.ejected_until.is_some());
        // While ejected, failures do not count.
        assert_eq!(t.passive_failure("b1", "connect", NOW + 5), None);
        // After it ends by itself, the next streak ejects for twice as long.
        let later = NOW + 40_000;
        assert_eq!(t.state("b1", later), HealthState::Unspecified);
        let mut last = None;
        for i in 0..5 {
            last = t.passive_failure("b1", "timeout", later + i);
        }
        assert_eq!(last.expect("ejected again").remaining_ms, 60_000);
        assert_eq!(EjectPolicy::default().duration_ms(10), 300_000);
    }

    #[test]
    fn a_success_resets_the_count_and_ends_an_ejection() {
        let t = table();
        for i in 0..4 {
            t.passive_failure("b1", "", NOW + i);
        }
        assert_eq!(t.success("b1", NOW + 5), None);
        for i in 0..4 {
            assert_eq!(t.passive_failure("b1", "", NOW + 6 + i), None);
        }
        let tr = t
            .ejected_by_proxy("b1", "proxy-a", 10_000, "connect", NOW + 20)
            .expect("ejected");
        assert_eq!(tr.reason, "ejected by proxy-a: connect");
        let tr = t.success("b1", NOW + 30).expect("back");
        assert_eq!(
            (tr.from, tr.to),
            (HealthState::Ejected, HealthState::Unspecified)
        );
        assert_eq!(tr.to_update().state, HealthState::Healthy as i32);
    }

    #[test]
    fn a_proxy_ejection_only_ever_extends() {
        let t = table();
        assert!(t.ejected_by_proxy("b1", "p", 10_000, "", NOW).is_some());
        assert_eq!(t.ejected_by_proxy("b1", "q", 5_000, "", NOW + 1), None);
        let tr = t
            .ejected_by_proxy("b1", "q", 20_000, "", NOW + 2)
            .expect("longer");
        assert!(!tr.new_ejection);
        assert_eq!(tr.remaining_ms, 20_000);
    }

    #[test]
    fn unhealthy_wins_over_an_ejection() {
        let t = table();
        for i in 0..3 {
            t.probed("b1", &failed(), 3, NOW + i);
        }
        assert_eq!(t.ejected_by_proxy("b1", "p", 10_000, "", NOW + 5), None);
        assert_eq!(t.state("b1", NOW + 5), HealthState::Unhealthy);
        // A good probe ends both.
        let tr = t.probed("b1", &ok(), 3, NOW + 6).expect("healthy");
        assert_eq!(tr.to, HealthState::Healthy);
        assert_eq!(t.state("b1", NOW + 7), HealthState::Healthy);
    }

    #[test]
    fn unknown_backends_are_ignored() {
        let t = table();
        assert_eq!(t.passive_failure("nope", "", NOW), None);
        assert_eq!(t.probed("nope", &ok(), 1, NOW), None);
        assert!(t.row("nope", NOW).is_none());
    }
}

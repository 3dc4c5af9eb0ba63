//! Active health: the control plane probes every enabled backend and keeps
//! the fleet-wide health table the proxies route by.
//!
//! - [`table`]: the health table (probe verdicts, passive ejections) and
//!   its transitions; pure, shared through the [`Fleet`].
//! - [`probe`]: one protocol-aware probe (`GET {base_url}/models` with the
//!   backend's key) and the classification of its answer.
//! - [`metrics`]: the health metrics.
//!
//! [`Prober::run`] follows the catalog's version (backends added, removed,
//! disabled, their probe settings changed) and probes each probed backend
//! every interval, at most [`CONCURRENCY`] at once, each at its own offset
//! (jitter) so the probes spread over the interval. Results move the table;
//! each change is logged once and pushed to every proxy by the [`Fleet`]
//! ([`Fleet::health_changed`]). A 401/403 also marks the backend
//! `auth_failed` fleet-wide the way a proxy's report does; a good probe
//! clears that mark.

pub mod metrics;
pub mod probe;
pub mod table;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::catalog::Catalog;
use crate::catalog::records::now_ms;
use crate::fleet::Fleet;
use crate::heartbeat::dispatch::HttpClient;
use crate::shutdown::Shutdown;
use probe::{Outcome, Target, Verdict};

/// Probes in flight at once, at most.
pub const CONCURRENCY: usize = 32;

/// How often the health gauges are refreshed (ejections end by themselves).
const GAUGE_TICK: Duration = Duration::from_secs(1);

/// The global probe settings (`--probe-interval`, `--probe-timeout`,
/// `--probe-failures`); a backend's own `probe` settings override them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeDefaults {
    /// Time between probes of a backend; zero probes only the backends
    /// with their own interval.
    pub interval: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Failed probes in a row that make a backend unhealthy.
    pub failures: u32,
}

impl Default for ProbeDefaults {
    fn default() -> Self {
        ProbeDefaults {
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            failures: 3,
        }
    }
}

/// One probed backend's schedule.
#[derive(Debug)]
struct Scheduled {
    target: Arc<Target>,
    interval: Duration,
    timeout: Duration,
    failures: u32,
    next: Instant,
    in_flight: bool,
}

/// The probe loop.
pub struct Prober {
    catalog: Arc<Catalog>,
    fleet: Arc<Fleet>,
    defaults: ProbeDefaults,
    client: HttpClient,
    /// The backends excluded at the last gauge refresh.
    excluded: parking_lot::Mutex<Vec<String>>,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl Prober {
    /// A prober of `catalog`'s backends moving `fleet`'s health table.
    pub fn new(
        catalog: Arc<Catalog>,
        fleet: Arc<Fleet>,
        defaults: ProbeDefaults,
        client: HttpClient,
    ) -> Self {
        metrics::describe();
        Prober {
            catalog,
            fleet,
            defaults,
            client,
            excluded: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// Probes until `stop`.
    pub async fn run(self, mut stop: Shutdown) {
        let mut versions = self.catalog.subscribe();
        let mut targets: HashMap<String, Scheduled> = HashMap::new();
        self.reload(&mut targets);
        let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        let mut running: JoinSet<(String, Outcome)> = JoinSet::new();
        let mut gauges = tokio::time::interval(GAUGE_TICK);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = targets
                .values()
                .filter(|s| !s.in_flight)
                .map(|s| s.next)
                .min();
            tokio::select! {
                () = stop.stopped() => {
                    running.abort_all();
                    return;
                }
                changed = versions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.reload(&mut targets);
                }
                () = sleep_until_some(next) => {
                    let now = Instant::now();
                    for s in targets.values_mut().filter(|s| !s.in_flight && s.next <= now) {
                        s.in_flight = true;
                        let (client, target, timeout) = (self.client.clone(), s.target.clone(), s.timeout);
                        let permits = permits.clone();
                        running.spawn(async move {
                            let _permit = permits.acquire_owned().await;
                            let outcome = probe::run(&client, &target, timeout).await;
                            (target.id.clone(), outcome)
                        });
                    }
                }
                Some(joined) = running.join_next() => {
                    let Ok((id, outcome)) = joined else { continue };
                    let failures = match targets.get_mut(&id) {
                        Some(s) => {
                            s.in_flight = false;
                            let now = Instant::now();
                            s.next += s.interval;
                            if s.next <= now {
                                s.next = now + s.interval;
                            }
                            s.failures
                        }
                        None => self.defaults.failures,
                    };
                    self.apply(&id, &outcome, failures).await;
                }
                _ = gauges.tick() => self.record_gauges(),
            }
        }
    }

    /// Re-reads the backends after a configuration change.
    fn reload(&self, targets: &mut HashMap<String, Scheduled>) {
        let records = match self.catalog.backend_records() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "health probes: cannot read the backends; keeping the previous list");
                return;
            }
        };
        let now = Instant::now();
        let mut configured = Vec::with_capacity(records.len());
        let mut seen = Vec::with_capacity(records.len());
        for rec in &records {
            let Some(b) = rec.spec.as_ref() else { continue };
            let settings = b.probe.unwrap_or_default();
            let interval = ms_or(settings.interval_ms, self.defaults.interval);
            // A zero global interval turns probing off for the backends
            // without their own.
            let probed = b.enabled && !settings.disabled && !interval.is_zero();
            configured.push((b.id.clone(), b.name.clone(), probed));
            if !probed {
                continue;
            }
            let key = match self.catalog.backend_api_key(rec) {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(backend = %b.name, backend_id = %b.id, error = %e, "health probes: cannot open the backend's key; not probed");
                    continue;
                }
            };
            let target = Target {
                id: b.id.clone(),
                name: b.name.clone(),
                base_url: b.base_url.clone(),
                api: claw_proto::v1::Api::try_from(b.api).unwrap_or_default(),
                key,
            };
            let timeout = ms_or(settings.timeout_ms, self.defaults.timeout);
            let failures = if settings.failures > 0 {
                settings.failures
            } else {
                self.defaults.failures
            };
            seen.push(b.id.clone());
            match targets.get_mut(&b.id) {
                Some(s) => {
                    if *s.target != target {
                        s.target = Arc::new(target);
                    }
                    if s.interval != interval {
                        s.interval = interval;
                        s.next = now + jitter(interval);
                    }
                    s.timeout = timeout;
                    s.failures = failures;
                }
                None => {
                    targets.insert(
                        b.id.clone(),
                        Scheduled {
                            target: Arc::new(target),
                            interval,
                            timeout,
                            failures,
                            next: now + jitter(interval),
                            in_flight: false,
                        },
                    );
                }
            }
        }
        targets.retain(|id, _| seen.contains(id));
        let transitions = self.fleet.health().configure(&configured, now_ms());
        self.fleet.health_changed(&transitions);
        self.record_gauges();
    }

    /// Takes in one probe's outcome.
    async fn apply(&self, id: &str, outcome: &Outcome, failures: u32) {
        metrics::probed(id, outcome.label(), outcome.elapsed.as_secs_f64());
        let now = now_ms();
        let transition = self
            .fleet
            .health()
            .probed(id, &outcome.result(), failures, now);
        tracing::debug!(backend_id = %id, result = %outcome.summary, "health probe");
        let marked = self
            .fleet
            .cooldowns()
            .get(id)
            .is_some_and(|c| c.auth_failed);
        match outcome.verdict {
            Verdict::AuthFailed(status) if !marked => {
                let sent = now - i64::try_from(outcome.elapsed.as_millis()).unwrap_or(0);
                let recorded = self
                    .fleet
                    .probe_auth_failed(id, status, &outcome.summary, sent)
                    .await;
                if let Err(e) = recorded {
                    tracing::warn!(backend_id = %id, error = %e, "could not record the rejected key");
                }
            }
            Verdict::Ok if marked => {
                self.fleet
                    .probe_auth_ok(id, &outcome.summary, transition.is_some());
            }
            _ => {}
        }
        if let Some(t) = transition {
            self.fleet.health_changed(std::slice::from_ref(&t));
        }
        self.record_gauges();
    }

    /// Refreshes the health gauges; tells the dashboard when an ejection
    /// ended by itself since the last call (nothing else marks that end).
    fn record_gauges(&self) {
        let mut excluded = Vec::new();
        for (id, state) in self.fleet.health().states(now_ms()) {
            let out = table::excluded(state);
            metrics::health(&id, !out);
            if out {
                excluded.push(id);
            }
        }
        excluded.sort();
        let mut last = self.excluded.lock();
        if *last != excluded {
            self.fleet.events().notify(crate::events::Topic::Backends);
            *last = excluded;
        }
    }
}

/// `ms` milliseconds, or `default` for 0.
fn ms_or(ms: u64, default: Duration) -> Duration {
    if ms == 0 {
        default
    } else {
        Duration::from_millis(ms)
    }
}

/// A random offset in `[0, interval)`, so probes spread over the interval.
fn jitter(interval: Duration) -> Duration {
    let ms = interval.as_millis().min(u128::from(u64::MAX)) as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::random::<u64>() % ms)
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_inside_the_interval() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_millis(200)) < Duration::from_millis(200));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
        assert_eq!(ms_or(0, Duration::from_secs(3)), Duration::from_secs(3));
        assert_eq!(
            ms_or(250, Duration::from_secs(3)),
            Duration::from_millis(250)
        );
    }
}

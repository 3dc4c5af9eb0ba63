//! Live fleet state: what the control plane knows about the proxies'
//! traffic right now, and the loop that keeps every proxy's view of it
//! current.
//!
//! - [`activity`]: agent activity and backend capacity, read by the
//!   heartbeat scheduler's busy and capacity checks.
//! - [`cooldowns`]: fleet-wide cooldowns after 429s, spent quotas (until the
//!   provider's reported end) and 529 overloads (absolute time, persisted)
//!   and their history.
//! - [`shares`]: each proxy's share of every backend's rpm/tpm, so the fleet
//!   never admits more than the limit.
//! - [`directory`]: the backends' names, pools, limits and cooldown
//!   policies, cached per configuration version.
//! - [`metrics`]: the cooldown and rate-share metrics.
//!
//! The fleet also holds the health table ([`crate::health::table`]): the
//! prober's verdicts and the proxies' passive signals summed over the
//! fleet (their ejections; connect errors, timeouts, 5xx and broken streams
//! counted per backend across every proxy, reset by a success), each change
//! logged once and pushed to every proxy ([`Fleet::health_changed`]).
//!
//! [`Fleet`] ties them together with the proxy registry. Report ingestion
//! (`crate::report`) hands it each batch once the batch is durable and
//! acknowledged ([`Fleet::observe`]): cooldowns move and are pushed to the
//! other proxies, activity and demand are recorded. [`Fleet::run`] follows
//! proxies connecting and leaving (catch-up of active cooldowns, re-assigned
//! rate shares) and re-evaluates shares every tick. Everything here except
//! the cooldowns is in memory and rebuilt from the proxies' reports after a
//! restart.

pub mod activity;
pub mod cooldowns;
pub mod directory;
pub mod metrics;
pub mod recent;
pub mod shares;

use std::sync::Arc;

use claw_proto::v1::{
    FailureKind, HealthState, HealthUpdate, StreamConfigResponse, StreamReportsRequest,
    UpstreamFailure,
};
use tokio::sync::mpsc;

use crate::catalog::Catalog;
use crate::catalog::records::now_ms;
use crate::events::{Events, Topic};
use crate::health::table::{EjectPolicy, HealthTable, Transition};
use crate::proxies::{ProxyRegistry, Push};
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};
use activity::{AgentActivity, Capacity};
use cooldowns::{Change, FleetCooldowns};
use directory::Directory;
use shares::{ShareSettings, Shares};

/// The fleet loop's state: fleet cooldowns, rate shares, agent activity
/// and the proxy registry they are pushed through.
pub struct Fleet {
    catalog: Arc<Catalog>,
    registry: Arc<ProxyRegistry>,
    directory: Arc<Directory>,
    cooldowns: FleetCooldowns,
    shares: Shares,
    activity: Arc<AgentActivity>,
    /// Each backend's requests and tokens in the last minute.
    recent: recent::RecentUse,
    /// Told when a cooldown starts or ends (the dashboard).
    events: Events,
    /// The fleet-wide health table.
    health: Arc<HealthTable>,
}

/// The source node of what the control plane's own probes report (never a
/// proxy's node id: those have no spaces in practice, and a proxy skips
/// only updates naming itself).
pub const PROBE_NODE: &str = "control-plane probe";

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

impl Fleet {
    /// Loads the persisted cooldowns from `store` and wires the registries
    /// the heartbeat scheduler reads.
    pub fn open(
        store: &dyn Store,
        catalog: Arc<Catalog>,
        registry: Arc<ProxyRegistry>,
        activity: Arc<AgentActivity>,
        capacity: Arc<Capacity>,
        settings: ShareSettings,
    ) -> Result<Fleet, StoreError> {
        metrics::describe();
        let directory = Arc::new(Directory::new(catalog.clone()));
        let cooldowns = FleetCooldowns::load(store, capacity)?;
        let version_of = catalog.clone();
        let shares = Shares::new(settings, directory.clone(), move || {
            version_of.config_version()
        });
        Ok(Fleet {
            catalog,
            registry,
            directory,
            cooldowns,
            shares,
            activity,
            recent: recent::RecentUse::default(),
            events: Events::new(),
            health: Arc::new(HealthTable::new(EjectPolicy::default())),
        })
    }

    /// The fleet ejecting backends after passive failures by `policy`.
    pub fn with_eject_policy(mut self, policy: EjectPolicy) -> Self {
        self.health = Arc::new(HealthTable::new(policy));
        self
    }

    /// The fleet-wide health table.
    pub fn health(&self) -> &Arc<HealthTable> {
        &self.health
    }

    /// The fleet announcing cooldowns starting and ending on `events`.
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// Where the fleet (and report ingestion) announce changes.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// The fleet cooldowns.
    pub fn cooldowns(&self) -> &FleetCooldowns {
        &self.cooldowns
    }

    /// The rate-share assigner.
    pub fn shares(&self) -> &Shares {
        &self.shares
    }

    /// Each backend's use in the last minute, from the stored reports.
    pub fn recent_use(&self) -> &recent::RecentUse {
        &self.recent
    }

    /// The backend directory.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Moves the in-memory state after a batch was stored and acknowledged:
    /// fleet cooldowns (its `changes`, pushed to every other proxy), agent
    /// activity, demand.
    pub fn observe(&self, batch: &StreamReportsRequest, changes: &[Change]) {
        let now = now_ms();
        self.registry.reported(&batch.node_id);
        self.recent.record(batch, now);
        self.cooldowns.commit(changes, now);
        self.announce_cooldowns(changes, &batch.node_id, now);
        self.observe_health(batch, now);
        let agents = self.directory.agents();
        for a in &batch.activity {
            if a.agent_id.is_empty() {
                continue;
            }
            let at = a
                .last_seen
                .as_ref()
                .map(crate::stats::ms_of)
                .unwrap_or(now)
                .min(now);
            let Ok(t) = jiff::Timestamp::from_millisecond(at) else {
                continue;
            };
            // Agents that exist are tracked; other ids only in a small
            // bounded table (an agent added while its conversation is
            // going on), so invented ids cost next to nothing.
            if agents.contains(&a.agent_id) {
                self.activity.record(&a.agent_id, t);
            } else {
                crate::report::metrics::unknown_agent("activity");
                self.activity.record_unknown(&a.agent_id, t);
            }
        }
        self.shares.observe(batch);
    }

    /// Pushes the cooldowns `changes` started or extended to every proxy
    /// but `source` (which applied them itself) and logs them once.
    fn announce_cooldowns(&self, changes: &[cooldowns::Change], source: &str, now: i64) {
        let updates: Vec<_> = changes
            .iter()
            .filter(|c| c.cooled && (c.until_ms > now || c.auth_failed))
            .map(|c| c.to_update(now))
            .collect();
        if updates.is_empty() {
            return;
        }
        self.events.notify(Topic::Backends);
        let message = StreamConfigResponse {
            version: self.catalog.config_version(),
            cooldowns: updates,
            ..Default::default()
        };
        let mut pushed = 0;
        for (node, tx) in self.registry.senders() {
            if node != source {
                push(&tx, message.clone());
                pushed += 1;
            }
        }
        metrics::cooldown_pushed(pushed);
        for c in changes.iter().filter(|c| c.cooled) {
            if c.auth_failed {
                let backends = self.directory.backends();
                let name = backends.get(&c.backend_id).map_or("", |b| b.name.as_str());
                tracing::warn!(
                    backend = %name,
                    backend_id = %c.backend_id,
                    node_id = %source,
                    proxies = pushed,
                    "provider rejected the backend's key: excluded fleet-wide until its key or URL is updated (or a probe succeeds)"
                );
                continue;
            }
            tracing::info!(
                backend = %c.backend_id,
                node_id = %source,
                consecutive = c.consecutive,
                quota_exhausted = c.quota_exhausted(now),
                remaining_ms = c.until_ms - now,
                proxies = pushed,
                "backend cooling fleet-wide"
            );
        }
    }

    /// Sums a batch's passive signals into the health table: a proxy's
    /// ejection ejects fleet-wide, outlier failures count across proxies,
    /// successes reset the count and end an ejection.
    fn observe_health(&self, batch: &StreamReportsRequest, now: i64) {
        enum Signal<'a> {
            Failure(&'a UpstreamFailure),
            Success,
        }
        let mut signals: Vec<(i64, u8, &str, Signal<'_>)> = Vec::new();
        for f in &batch.failures {
            if f.backend_id.is_empty() {
                continue;
            }
            let outlier = f.ejected_ms > 0
                || matches!(
                    FailureKind::try_from(f.kind),
                    Ok(FailureKind::Connect
                        | FailureKind::Timeout
                        | FailureKind::ServerError
                        | FailureKind::StreamBroken)
                );
            if outlier {
                let at = f
                    .time
                    .as_ref()
                    .map(crate::stats::ms_of)
                    .unwrap_or(now)
                    .min(now);
                signals.push((at, 0, &f.backend_id, Signal::Failure(f)));
            }
        }
        for s in &batch.successes {
            if !s.backend_id.is_empty() {
                let at = s
                    .time
                    .as_ref()
                    .map(crate::stats::ms_of)
                    .unwrap_or(now)
                    .min(now);
                signals.push((at, 1, &s.backend_id, Signal::Success));
            }
        }
        if signals.is_empty() {
            return;
        }
        signals.sort_by_key(|(at, order, _, _)| (*at, *order));
        let mut transitions = Vec::new();
        for (_, _, backend, signal) in signals {
            let t = match signal {
                Signal::Failure(f) if f.ejected_ms > 0 => self.health.ejected_by_proxy(
                    backend,
                    &batch.node_id,
                    f.ejected_ms,
                    &f.summary,
                    now,
                ),
                Signal::Failure(f) => self.health.passive_failure(backend, &f.summary, now),
                Signal::Success => self.health.success(backend, now),
            };
            transitions.extend(t);
        }
        self.health_changed(&transitions);
    }

    /// Logs each health change once and pushes those that matter to every
    /// proxy (an ejection to the proxy that reported it too: the fleet's
    /// end may be later than its own).
    pub fn health_changed(&self, transitions: &[Transition]) {
        if transitions.is_empty() {
            return;
        }
        let mut updates = Vec::new();
        for t in transitions {
            log_transition(t);
            if t.new_ejection {
                crate::health::metrics::ejected(&t.backend_id);
            }
            crate::health::metrics::health(&t.backend_id, !crate::health::table::excluded(t.to));
            if t.worth_pushing() {
                updates.push(t.to_update());
            }
        }
        self.events.notify(Topic::Backends);
        self.push_health(updates);
    }

    /// Sends `updates` to every connected proxy.
    fn push_health(&self, updates: Vec<HealthUpdate>) {
        if updates.is_empty() {
            return;
        }
        let message = StreamConfigResponse {
            version: self.catalog.config_version(),
            health: updates,
            ..Default::default()
        };
        for (_, tx) in self.registry.senders() {
            push(&tx, message.clone());
        }
    }

    /// A probe sent at `sent_ms` was answered 401/403: marks the backend
    /// `auth_failed` fleet-wide through the path a proxy's `AUTH_FAILED`
    /// report takes (durable cooldown state and history, pushed to every
    /// proxy). A probe sent before the key's last update carried the old
    /// key and marks nothing.
    pub async fn probe_auth_failed(
        &self,
        backend_id: &str,
        status: u16,
        summary: &str,
        sent_ms: i64,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let batch = StreamReportsRequest {
            node_id: PROBE_NODE.to_string(),
            failures: vec![UpstreamFailure {
                time: crate::catalog::records::timestamp(sent_ms.min(now)),
                backend_id: backend_id.to_string(),
                kind: FailureKind::AuthFailed as i32,
                status: u32::from(status),
                summary: format!("health probe: {summary}"),
                ..Default::default()
            }],
            ..Default::default()
        };
        let store = self.catalog.backend_state_store();
        let backends = self.directory.backends();
        let changes = store.transact(
            &[
                crate::store::Tree::CooldownState,
                crate::store::Tree::CooldownEvents,
            ],
            |txn| cooldowns::apply_in_txn(txn, &batch, &backends, now),
        )?;
        store.flush().await?;
        self.cooldowns.commit(&changes, now);
        self.announce_cooldowns(&changes, PROBE_NODE, now);
        Ok(())
    }

    /// A probe succeeded on a backend marked `auth_failed`: the key works
    /// again, so the mark ends fleet-wide (a HEALTHY update tells the
    /// proxies, unless `already_pushed` by a health change).
    pub fn probe_auth_ok(&self, backend_id: &str, summary: &str, already_pushed: bool) {
        let store = self.catalog.backend_state_store();
        match self.cooldowns.clear_auth(store, backend_id, now_ms()) {
            Ok(true) => {
                let backends = self.directory.backends();
                let name = backends.get(backend_id).map_or("", |b| b.name.as_str());
                tracing::info!(backend = %name, backend_id = %backend_id, result = %summary, "probe succeeded: auth failure cleared fleet-wide");
                self.events.notify(Topic::Backends);
                if !already_pushed {
                    self.push_health(vec![HealthUpdate {
                        backend_id: backend_id.to_string(),
                        state: HealthState::Healthy as i32,
                        remaining_ms: 0,
                        reason: format!("probe: {summary}"),
                        since_unix_ms: now_ms(),
                    }]);
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(backend_id = %backend_id, error = %e, "could not clear the auth failure")
            }
        }
    }

    /// `node_id` said on its report stream that it is shutting down and
    /// applies a share of 0 everywhere: its rate shares are released at
    /// once (granted to the others on the next tick, see
    /// [`Shares::leave`]).
    pub fn leave(&self, node_id: &str) {
        if self.shares.leave(node_id) {
            tracing::info!(node_id = %node_id, "proxy left; its shares are released");
        }
    }

    /// Follows the registry (proxies connecting and leaving) and re-evaluates
    /// rate shares every tick, until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: Shutdown) {
        let mut members = self.registry.subscribe();
        let mut tick = tokio::time::interval(self.shares.settings().tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut known: Vec<(String, Push)> = Vec::new();
        // Backends cooling at the last tick: one that is no longer is a
        // cooldown that ended (nothing else marks the end).
        let mut cooling = self.cooling_backends();
        loop {
            tokio::select! {
                () = stop.stopped() => return,
                changed = members.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    known = self.on_membership(known);
                }
                _ = tick.tick() => {
                    self.cooldowns.record_gauge(now_ms());
                    let now = self.cooling_backends();
                    if cooling.iter().any(|b| !now.contains(b)) {
                        self.events.notify(Topic::Backends);
                    }
                    cooling = now;
                }
            }
            self.push_shares();
        }
    }

    /// The ids of the backends cooling now.
    fn cooling_backends(&self) -> Vec<String> {
        self.cooldowns
            .active(now_ms())
            .into_iter()
            .map(|u| u.backend_id)
            .collect()
    }

    /// Sends active cooldowns to proxies that just connected and updates
    /// the share assigner's membership.
    fn on_membership(&self, known: Vec<(String, Push)>) -> Vec<(String, Push)> {
        let now = self.registry.senders();
        let active = self.cooldowns.active(now_ms());
        for (node, tx) in &now {
            let new = !known
                .iter()
                .any(|(k, old)| k == node && old.same_channel(tx));
            if new && !active.is_empty() {
                push(
                    tx,
                    StreamConfigResponse {
                        version: self.catalog.config_version(),
                        cooldowns: active.clone(),
                        ..Default::default()
                    },
                );
                metrics::cooldown_pushed(1);
            }
        }
        self.shares.set_members(now.clone());
        now
    }

    fn push_shares(&self) {
        let messages = self.shares.evaluate();
        metrics::shares_pushed(messages.len());
        for (tx, message) in messages {
            push(&tx, message);
        }
    }
}

/// Logs a health change once: a warning when a backend leaves routing, info
/// when it returns.
fn log_transition(t: &Transition) {
    use crate::health::table::excluded;
    match (excluded(t.from), t.to) {
        (_, HealthState::Unhealthy) => tracing::warn!(
            backend = %t.name,
            backend_id = %t.backend_id,
            reason = %t.reason,
            "backend unhealthy: excluded fleet-wide until a probe succeeds"
        ),
        (_, HealthState::Ejected) if t.new_ejection => {
            tracing::warn!(
                backend = %t.name,
                backend_id = %t.backend_id,
                reason = %t.reason,
                ejected_ms = t.remaining_ms,
                "backend ejected fleet-wide"
            )
        }
        (_, HealthState::Ejected) => tracing::debug!(
            backend = %t.name,
            backend_id = %t.backend_id,
            ejected_ms = t.remaining_ms,
            "fleet-wide ejection extended"
        ),
        (true, to) => tracing::info!(
            backend = %t.name,
            backend_id = %t.backend_id,
            state = ?to,
            reason = %t.reason,
            "backend recovered: routable fleet-wide again"
        ),
        (false, to) => tracing::debug!(
            backend = %t.name,
            backend_id = %t.backend_id,
            state = ?to,
            reason = %t.reason,
            "backend health"
        ),
    }
}

/// Queues a message on a proxy's stream without waiting; when its queue is
/// full, a task waits for room (messages are small and rare).
fn push(tx: &Push, message: StreamConfigResponse) {
    match tx.try_send(message) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(m)) => {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(m).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use claw_proto::v1::BackendSuccess;

    async fn fleet() -> (tempfile::TempDir, Arc<Fleet>, Arc<ProxyRegistry>) {
        let (dir, store, catalog) = crate::catalog::testing::store_and_catalog().await;
        let registry = Arc::new(ProxyRegistry::new());
        let fleet = Fleet::open(
            store.as_ref(),
            Arc::new(catalog),
            registry.clone(),
            Arc::new(AgentActivity::new()),
            Arc::new(Capacity::new()),
            ShareSettings::default(),
        )
        .expect("fleet opens");
        fleet
            .health()
            .configure(&[("be_1".into(), "one".into(), true)], now_ms());
        (dir, Arc::new(fleet), registry)
    }

    fn failures(node: &str, n: usize, ejected_ms: u64) -> StreamReportsRequest {
        StreamReportsRequest {
            node_id: node.into(),
            failures: (0..n)
                .map(|_| UpstreamFailure {
                    backend_id: "be_1".into(),
                    kind: FailureKind::Connect as i32,
                    summary: "connection refused".into(),
                    ejected_ms,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn health_of(rx: &mut mpsc::Receiver<StreamConfigResponse>) -> Vec<HealthUpdate> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.extend(m.health);
        }
        out
    }

    #[tokio::test]
    async fn passive_failures_summed_over_proxies_eject_everywhere_and_a_success_ends_it() {
        let (_dir, fleet, registry) = fleet().await;
        let (tx_a, mut rx_a) = mpsc::channel(8);
        let (tx_b, mut rx_b) = mpsc::channel(8);
        registry.connect("a", "peer-a", tx_a);
        registry.connect("b", "peer-b", tx_b);
        // 3 on one proxy and 2 on the other: 5 in a row fleet-wide.
        fleet.observe(&failures("a", 3, 0), &[]);
        assert!(health_of(&mut rx_a).is_empty());
        fleet.observe(&failures("b", 2, 0), &[]);
        for rx in [&mut rx_a, &mut rx_b] {
            let h = health_of(rx);
            assert_eq!(h.len(), 1, "{h:?}");
            assert_eq!(h[0].state, HealthState::Ejected as i32);
            assert_eq!(h[0].remaining_ms, 30_000);
            assert!(h[0].reason.contains("connection refused"), "{h:?}");
        }
        let row = fleet.health().row("be_1", now_ms()).expect("row");
        assert_eq!(row.state, HealthState::Ejected as i32);
        assert!(row.ejected_until.is_some());
        // A success on any proxy ends it; HEALTHY goes to everyone.
        let success = StreamReportsRequest {
            node_id: "a".into(),
            successes: vec![BackendSuccess {
                backend_id: "be_1".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        fleet.observe(&success, &[]);
        for rx in [&mut rx_a, &mut rx_b] {
            let h = health_of(rx);
            assert_eq!(h.len(), 1, "{h:?}");
            assert_eq!(h[0].state, HealthState::Healthy as i32);
        }
    }

    #[tokio::test]
    async fn a_proxys_own_ejection_is_applied_fleet_wide_for_its_length() {
        let (_dir, fleet, registry) = fleet().await;
        let (tx_b, mut rx_b) = mpsc::channel(8);
        registry.connect("b", "peer-b", tx_b);
        fleet.observe(&failures("a", 1, 45_000), &[]);
        let h = health_of(&mut rx_b);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[0].state, HealthState::Ejected as i32);
        assert_eq!(h[0].remaining_ms, 45_000);
        assert!(h[0].reason.starts_with("ejected by a"), "{h:?}");
        // The complete table a newly connected proxy gets names it.
        let complete = fleet.health().complete(now_ms());
        assert_eq!(complete.len(), 1);
        assert_eq!(complete[0].backend_id, "be_1");
    }

    #[tokio::test]
    async fn a_probe_401_marks_the_backend_auth_failed_and_a_good_probe_clears_it() {
        let (_dir, fleet, registry) = fleet().await;
        let (tx, mut rx) = mpsc::channel(8);
        registry.connect("a", "peer-a", tx);
        fleet
            .probe_auth_failed("be_1", 401, "status 401 in 3 ms", now_ms())
            .await
            .expect("recorded");
        assert!(fleet.cooldowns().get("be_1").is_some_and(|c| c.auth_failed));
        let m = rx.try_recv().expect("pushed");
        assert!(
            m.cooldowns
                .iter()
                .any(|c| c.auth_failed && c.backend_id == "be_1")
        );
        fleet.probe_auth_ok("be_1", "ok: 200 in 2 ms", false);
        assert!(!fleet.cooldowns().get("be_1").is_some_and(|c| c.auth_failed));
        let h = health_of(&mut rx);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].state, HealthState::Healthy as i32);
    }
}

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

use claw_proto::v1::{StreamConfigResponse, StreamReportsRequest};
use tokio::sync::mpsc;

use crate::catalog::Catalog;
use crate::catalog::records::now_ms;
use crate::events::{Events, Topic};
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
}

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
        })
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
        self.recent.record(batch, now);
        self.cooldowns.commit(changes, now);
        let updates: Vec<_> = changes
            .iter()
            .filter(|c| c.cooled && (c.until_ms > now || c.auth_failed))
            .map(|c| c.to_update(now))
            .collect();
        if !updates.is_empty() {
            self.events.notify(Topic::Backends);
            let message = StreamConfigResponse {
                version: self.catalog.config_version(),
                cooldowns: updates,
                ..Default::default()
            };
            let mut pushed = 0;
            for (node, tx) in self.registry.senders() {
                if node != batch.node_id {
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
                        node_id = %batch.node_id,
                        proxies = pushed,
                        "provider rejected the backend's key: excluded fleet-wide until its key or URL is updated"
                    );
                    continue;
                }
                tracing::info!(
                    backend = %c.backend_id,
                    node_id = %batch.node_id,
                    consecutive = c.consecutive,
                    quota_exhausted = c.quota_exhausted(now),
                    remaining_ms = c.until_ms - now,
                    proxies = pushed,
                    "backend cooling fleet-wide"
                );
            }
        }
        let agents = self.directory.agents();
        for a in &batch.activity {
            if a.agent_id.is_empty() {
                continue;
            }
            // Only agents that exist are tracked: invented ids cost nothing.
            if !agents.contains(&a.agent_id) {
                crate::report::metrics::unknown_agent("activity");
                continue;
            }
            let at = a
                .last_seen
                .as_ref()
                .map(crate::stats::ms_of)
                .unwrap_or(now)
                .min(now);
            if let Ok(t) = jiff::Timestamp::from_millisecond(at) {
                self.activity.record(&a.agent_id, t);
            }
        }
        self.shares.observe(batch);
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

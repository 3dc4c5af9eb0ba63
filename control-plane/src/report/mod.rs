//! Report ingestion: what proxies observe (usage, upstream failures,
//! agent activity, demand) arrives in numbered batches on
//! `ReportService.StreamReports` (served by [`crate::api::report`]) and is
//! stored **exactly once**.
//!
//! - [`dedup`]: which batches of a proxy process were stored.
//! - [`directory`]: the backends' names, pools, limits and cooldown
//!   policies, cached per configuration version.
//! - [`metrics`]: the fleet metrics (batches, events, lag, cooldowns,
//!   shares).
//!
//! A batch is one store transaction over the idempotency record, the
//! cooldown state and history, and the usage buckets: a batch already
//! recorded changes nothing; otherwise its 429s and successes are applied
//! first (see [`crate::cooldowns`]), then its usage is pre-aggregated per
//! bucket and added, and the record is updated. The store is flushed
//! before the batch is acknowledged, so a control plane killed between
//! the write and the ACK sees the resent batch as a duplicate after its
//! restart. Only after the ACK does in-memory state move (fleet cooldowns,
//! agent activity, demand for rate shares) and are cooldowns pushed to the
//! other proxies.
//!
//! [`Fleet`] ties it together with the proxy registry: it follows proxies
//! connecting and leaving (catch-up of active cooldowns, re-assigned rate
//! shares) and re-evaluates shares every tick.

pub mod dedup;
pub mod directory;
pub mod metrics;

use std::collections::HashMap;
use std::sync::Arc;

use claw_proto::v1::{FailureKind, StreamConfigResponse, StreamReportsRequest, UsageTotals};
use tokio::sync::mpsc;

use crate::catalog::Catalog;
use crate::catalog::records::now_ms;
use crate::cooldowns::{self, Change, FleetCooldowns};
use crate::fleet::{AgentActivity, Capacity};
use crate::proxies::{ProxyRegistry, Push};
use crate::shares::{ShareSettings, Shares};
use crate::shutdown::Shutdown;
use crate::stats::keys::{self, Dims};
use crate::stats::totals;
use crate::store::{Store, StoreError, Tree};
use directory::{Directory, NO_POOL};

/// The trees one batch's transaction spans.
const BATCH_TREES: [Tree; 5] = [
    Tree::ReportBatches,
    Tree::CooldownState,
    Tree::CooldownEvents,
    Tree::UsageHourly,
    Tree::UsageDaily,
];

/// What storing a batch did.
#[derive(Debug)]
pub enum Stored {
    /// The batch was new; these are its cooldown changes.
    Applied(Vec<Change>),
    /// The batch had been stored before.
    Duplicate,
}

/// The fleet loop's state: report ingestion, fleet cooldowns, rate shares
/// and the heartbeat scheduler's registries.
pub struct Fleet {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    registry: Arc<ProxyRegistry>,
    directory: Arc<Directory>,
    cooldowns: FleetCooldowns,
    shares: Shares,
    activity: Arc<AgentActivity>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

impl Fleet {
    /// Loads the persisted cooldowns and wires the registries the heartbeat
    /// scheduler reads.
    pub fn open(
        catalog: Arc<Catalog>,
        registry: Arc<ProxyRegistry>,
        activity: Arc<AgentActivity>,
        capacity: Arc<Capacity>,
        settings: ShareSettings,
    ) -> Result<Fleet, StoreError> {
        metrics::describe();
        let store = catalog.heartbeat_store();
        let directory = Arc::new(Directory::new(catalog.clone()));
        let cooldowns = FleetCooldowns::load(store.as_ref(), capacity)?;
        let version_of = catalog.clone();
        let shares = Shares::new(settings, directory.clone(), move || {
            version_of.config_version()
        });
        Ok(Fleet {
            store,
            catalog,
            registry,
            directory,
            cooldowns,
            shares,
            activity,
        })
    }

    /// The fleet cooldowns.
    pub fn cooldowns(&self) -> &FleetCooldowns {
        &self.cooldowns
    }

    /// The rate-share assigner.
    pub fn shares(&self) -> &Shares {
        &self.shares
    }

    /// The backend directory.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Stores a batch once, durably (the caller acknowledges it after
    /// this returns, then calls [`Fleet::after_ack`]).
    pub async fn store(&self, batch: &StreamReportsRequest) -> Result<Stored, StoreError> {
        let now = now_ms();
        let backends = self.directory.backends();
        let (hourly, daily) = aggregate(batch, &backends, now);
        let seen_key = dedup::key(&batch.node_id, &batch.stream_epoch);
        let stored = self.store.transact(&BATCH_TREES, |txn| {
            let mut seen = dedup::Seen::decode(txn.get(Tree::ReportBatches, &seen_key)?.as_deref());
            if seen.contains(batch.seq) {
                return Ok::<_, StoreError>(Stored::Duplicate);
            }
            let changes = cooldowns::apply_in_txn(txn, batch, &backends, now)?;
            for (tree, buckets) in [(Tree::UsageHourly, &hourly), (Tree::UsageDaily, &daily)] {
                for (key, delta) in buckets {
                    let mut t = txn
                        .get(tree, key)?
                        .map(|raw| totals::decode(&raw))
                        .unwrap_or_default();
                    t += delta;
                    txn.insert(tree, key, &totals::encode(&t))?;
                }
            }
            seen.insert(batch.seq, now);
            txn.insert(Tree::ReportBatches, &seen_key, &seen.encode())?;
            Ok(Stored::Applied(changes))
        })?;
        if matches!(stored, Stored::Applied(_)) {
            self.store.flush().await?;
        }
        Ok(stored)
    }

    /// Moves the in-memory state after a batch was stored and acknowledged:
    /// metrics, fleet cooldowns (pushed to every other proxy), agent
    /// activity, demand.
    pub fn after_ack(&self, batch: &StreamReportsRequest, stored: &Stored) {
        let Stored::Applied(changes) = stored else {
            metrics::batch("duplicate");
            return;
        };
        let now = now_ms();
        metrics::batch("stored");
        record_event_metrics(batch, now);
        self.cooldowns.commit(changes, now);
        let updates: Vec<_> = changes
            .iter()
            .filter(|c| c.cooled && c.until_ms > now)
            .map(|c| c.to_update(now))
            .collect();
        if !updates.is_empty() {
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
                tracing::info!(
                    backend = %c.backend_id,
                    node_id = %batch.node_id,
                    consecutive = c.consecutive,
                    remaining_ms = c.until_ms - now,
                    proxies = pushed,
                    "backend cooling fleet-wide"
                );
            }
        }
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
                }
            }
            self.push_shares();
        }
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

type Buckets = HashMap<Vec<u8>, UsageTotals>;

/// The batch's usage summed per hourly and per daily bucket, so the
/// transaction touches each bucket once.
fn aggregate(
    batch: &StreamReportsRequest,
    backends: &directory::Backends,
    now: i64,
) -> (Buckets, Buckets) {
    let mut hourly: Buckets = HashMap::new();
    let mut daily: Buckets = HashMap::new();
    let mut add = |at: i64, dims: Dims, t: &UsageTotals| {
        let pool = if dims.backend.is_empty() {
            NO_POOL
        } else {
            backends.get(&dims.backend).map_or("unknown", |b| b.pool)
        };
        let day = keys::daily(keys::day_of(at), pool, &dims);
        *hourly
            .entry(keys::hourly(keys::hour_of(at), &dims))
            .or_default() += t;
        *daily.entry(day).or_default() += t;
    };
    for e in &batch.usage {
        let at = e.time.as_ref().map(crate::stats::ms_of).unwrap_or(now);
        let dims = Dims {
            backend: e.backend_id.clone(),
            model: e.model.clone(),
            client_key: e.client_key_id.clone(),
            agent: e.agent_id.clone(),
        };
        add(at, dims, &totals::of_event(e));
    }
    for a in &batch.usage_aggregates {
        let Some(t) = &a.totals else { continue };
        let at = a
            .first_time
            .as_ref()
            .or(a.last_time.as_ref())
            .map(crate::stats::ms_of)
            .unwrap_or(now);
        let dims = Dims {
            backend: a.backend_id.clone(),
            model: a.model.clone(),
            client_key: a.client_key_id.clone(),
            agent: a.agent_id.clone(),
        };
        add(at, dims, &totals::sanitized(t));
    }
    (hourly, daily)
}

fn record_event_metrics(batch: &StreamReportsRequest, now: i64) {
    let limited = batch
        .failures
        .iter()
        .filter(|f| f.kind == FailureKind::RateLimited as i32)
        .count();
    let summed: u64 = batch
        .usage_aggregates
        .iter()
        .filter_map(|a| a.totals.as_ref())
        .map(|t| t.requests)
        .sum();
    metrics::events("usage", (batch.usage.len() as u64).saturating_add(summed));
    metrics::events("rate_limited", limited as u64);
    metrics::events("failure", (batch.failures.len() - limited) as u64);
    metrics::events("success", batch.successes.len() as u64);
    metrics::events("activity", batch.activity.len() as u64);
    let times = batch
        .usage
        .iter()
        .filter_map(|e| e.time.as_ref())
        .chain(
            batch
                .usage_aggregates
                .iter()
                .filter_map(|a| a.first_time.as_ref()),
        )
        .chain(batch.failures.iter().filter_map(|f| f.time.as_ref()))
        .chain(batch.successes.iter().filter_map(|s| s.time.as_ref()))
        .chain(batch.activity.iter().filter_map(|a| a.last_seen.as_ref()));
    if let Some(oldest) = times.map(crate::stats::ms_of).min() {
        metrics::lag((now - oldest) as f64 / 1000.0);
    }
}

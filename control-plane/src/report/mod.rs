//! Report ingestion: what proxies observe (usage, upstream failures,
//! agent activity, demand) arrives in numbered batches on
//! `ReportService.StreamReports` (served by [`crate::api::report`]) and is
//! stored **exactly once**.
//!
//! - [`dedup`]: which batches of a proxy process were stored.
//! - [`metrics`]: the report-stream metrics (batches, events, lag, streams,
//!   dropped events).
//!
//! A batch is one store transaction over the idempotency record, the
//! cooldown state and history, and the usage buckets: a batch already
//! recorded changes nothing; otherwise its 429s and successes are applied
//! first (see [`crate::fleet::cooldowns`]), then its usage is pre-aggregated
//! per bucket and added, and the record is updated. The store is flushed
//! before the batch is acknowledged, so a control plane killed between
//! the write and the ACK sees the resent batch as a duplicate after its
//! restart. Only after the ACK does in-memory state move: [`Ingest`] hands
//! the batch to the [`Fleet`] (fleet cooldowns pushed to the other proxies,
//! agent activity, demand for rate shares).

pub(crate) mod dedup;
pub(crate) mod metrics;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use claw_proto::v1::{FailureKind, StreamReportsRequest, UsageTotals};

use crate::catalog::records::now_ms;
use crate::fleet::Fleet;
use crate::fleet::cooldowns::{self, Change};
use crate::fleet::directory::{self, NO_POOL};
use crate::stats::keys::{self, Dims};
use crate::stats::totals;
use crate::store::{Store, StoreError, Tree};

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
pub(crate) enum Stored {
    /// The batch was new; these are its cooldown changes.
    Applied(Vec<Change>),
    /// The batch had been stored before.
    Duplicate,
}

/// Report ingestion: stores each batch once, in one transaction, then
/// hands it to the [`Fleet`].
pub(crate) struct Ingest {
    store: Arc<dyn Store>,
    fleet: Arc<Fleet>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").finish_non_exhaustive()
    }
}

impl Ingest {
    /// Ingestion into `store`, moving `fleet` after each stored batch.
    pub(crate) fn new(store: Arc<dyn Store>, fleet: Arc<Fleet>) -> Ingest {
        metrics::describe();
        Ingest { store, fleet }
    }

    /// Stores a batch once, durably (the caller acknowledges it after
    /// this returns, then calls [`Ingest::after_ack`]).
    pub(crate) async fn store(&self, batch: &StreamReportsRequest) -> Result<Stored, StoreError> {
        let now = now_ms();
        let backends = self.fleet.directory().backends();
        let agents = self.fleet.directory().agents();
        let (hourly, daily) = aggregate(batch, &backends, &agents, now);
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

    /// The proxy `node_id` is leaving (`StreamReportsRequest.leaving`): its
    /// rate shares are released ([`Fleet::leave`]).
    pub(crate) fn leaving(&self, node_id: &str) {
        self.fleet.leave(node_id);
    }

    /// After a batch was stored and acknowledged: its metrics, then the
    /// fleet's in-memory state ([`Fleet::observe`]).
    pub(crate) fn after_ack(&self, batch: &StreamReportsRequest, stored: &Stored) {
        let Stored::Applied(changes) = stored else {
            metrics::batch("duplicate");
            return;
        };
        metrics::batch("stored");
        record_event_metrics(batch, now_ms());
        self.fleet.observe(batch, changes);
        if !batch.usage.is_empty() || !batch.usage_aggregates.is_empty() {
            self.fleet.events().notify(crate::events::Topic::Usage);
        }
    }
}

type Buckets = HashMap<Vec<u8>, UsageTotals>;

/// The batch's usage summed per hourly and per daily bucket, so the
/// transaction touches each bucket once.
fn aggregate(
    batch: &StreamReportsRequest,
    backends: &directory::Backends,
    agents: &HashSet<String>,
    now: i64,
) -> (Buckets, Buckets) {
    // Usage of an agent id that is not configured stays under its key with
    // an empty agent: invented ids do not grow the usage tables.
    let agent = |id: &str| -> String {
        if id.is_empty() || agents.contains(id) {
            id.to_string()
        } else {
            metrics::unknown_agent("usage");
            String::new()
        }
    };
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
            agent: agent(&e.agent_id),
            run_kind: keys::run_kind(&e.run_kind),
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
            agent: agent(&a.agent_id),
            run_kind: keys::run_kind(&a.run_kind),
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

#[cfg(test)]
mod tests {
    use claw_proto::v1::{UsageAggregate, UsageEvent};

    use super::*;

    /// One agent's heartbeat usage (an aggregate and an event, the two
    /// shapes proxies send) lands in heartbeat buckets; its own traffic,
    /// and a kind no proxy should send, in the interactive ones, whose keys
    /// are the keys of before run kinds.
    #[test]
    fn usage_is_bucketed_by_run_kind() {
        let totals = UsageTotals {
            requests: 1,
            prompt_tokens: 10,
            ..Default::default()
        };
        let at = Some(prost_types::Timestamp {
            seconds: 7200,
            nanos: 0,
        });
        let aggregate = |run_kind: &str| UsageAggregate {
            first_time: at,
            agent_id: "ag".into(),
            model: "m".into(),
            totals: Some(totals),
            run_kind: run_kind.into(),
            ..Default::default()
        };
        let batch = StreamReportsRequest {
            usage_aggregates: vec![aggregate("heartbeat"), aggregate(""), aggregate("cron")],
            usage: vec![UsageEvent {
                time: at,
                agent_id: "ag".into(),
                model: "m".into(),
                prompt_tokens: 10,
                run_kind: "heartbeat".into(),
                run_id: "r1".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (hourly, daily) = aggregate_batch(&batch);
        let dims = |run_kind: &str| Dims {
            model: "m".into(),
            agent: "ag".into(),
            run_kind: run_kind.into(),
            ..Dims::default()
        };
        let requests = |key: Vec<u8>| hourly.get(&key).map(|t| t.requests);
        assert_eq!(
            requests(keys::hourly(7_200_000, &dims("heartbeat"))),
            Some(2)
        );
        assert_eq!(requests(keys::hourly(7_200_000, &dims(""))), Some(2));
        assert_eq!(hourly.len(), 2);
        assert_eq!(daily.len(), 2);
    }

    fn aggregate_batch(batch: &StreamReportsRequest) -> (Buckets, Buckets) {
        let agents = HashSet::from(["ag".to_string()]);
        aggregate(batch, &directory::Backends::default(), &agents, 0)
    }

    #[test]
    fn usage_of_an_unknown_agent_stays_under_its_key() {
        let batch = StreamReportsRequest {
            usage: vec![UsageEvent {
                agent_id: "invented".into(),
                client_key_id: "ck_1".into(),
                model: "m".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (hourly, _) = aggregate_batch(&batch);
        let dims = Dims {
            model: "m".into(),
            client_key: "ck_1".into(),
            ..Dims::default()
        };
        assert_eq!(hourly.len(), 1);
        assert!(hourly.contains_key(&keys::hourly(0, &dims)));
    }
}

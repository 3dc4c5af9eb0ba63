//! The history's maintenance task: how long each kind of history is kept,
//! and the task that prunes it: usage buckets ([`crate::stats`]), cooldown
//! events ([`crate::fleet::cooldowns`]), the audit log ([`crate::audit`])
//! and the report stream's idempotency records ([`crate::report::dedup`]). It sits above all three and only
//! deletes; none of them knows it exists.
//!
//! Every history tree is time-major (usage buckets, cooldown events, audit
//! records), so
//! pruning deletes a key prefix in small transactions and never scans what
//! it keeps. The report stream's idempotency records are few (one per proxy
//! process) and are pruned by their last use.

use std::sync::Arc;
use std::time::Duration;

use crate::catalog::records::now_ms;
use crate::shutdown::Shutdown;
use crate::stats::keys;
use crate::store::{Store, StoreError, Tree};

/// Keys removed per transaction while pruning (keeps each one short).
const PRUNE_CHUNK: usize = 512;

/// Retention of the history (flags in `main`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Hourly usage buckets (`CLAW_RETENTION_HOURLY`, default 14 days).
    pub hourly: Duration,
    /// Daily usage buckets (`CLAW_RETENTION_DAILY`, default 400 days).
    pub daily: Duration,
    /// Cooldown events (`CLAW_RETENTION_COOLDOWNS`, default 30 days).
    pub cooldown_events: Duration,
    /// Audit records (`CLAW_RETENTION_AUDIT`, default 400 days).
    pub audit: Duration,
    /// Report batch idempotency records, by last use (default 24 hours).
    /// A proxy resending a batch older than this would count it twice, so
    /// it must exceed any proxy's outage plus its buffer's age.
    pub report_batches: Duration,
    /// How often the pruning task runs (default 10 minutes).
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Retention {
            hourly: Duration::from_secs(14 * DAY),
            daily: Duration::from_secs(400 * DAY),
            cooldown_events: Duration::from_secs(30 * DAY),
            audit: Duration::from_secs(400 * DAY),
            report_batches: Duration::from_secs(DAY),
            interval: Duration::from_secs(600),
        }
    }
}

/// What one pruning pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pruned {
    /// Hourly buckets.
    pub hourly: usize,
    /// Daily buckets.
    pub daily: usize,
    /// Cooldown events.
    pub cooldown_events: usize,
    /// Audit records.
    pub audit: usize,
    /// Report idempotency records.
    pub report_batches: usize,
}

fn cutoff(now: i64, keep: Duration) -> i64 {
    now.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX))
}

/// Removes every key of a time-major `tree` older than `before_ms`.
fn prune_prefix(store: &dyn Store, tree: Tree, before_ms: i64) -> Result<usize, StoreError> {
    let end = keys::time_prefix(before_ms);
    let mut removed = 0;
    loop {
        let old = store.range(tree, &[], Some(&end), false, PRUNE_CHUNK)?;
        if old.is_empty() {
            return Ok(removed);
        }
        remove_keys(store, tree, old.iter().map(|(k, _)| k.as_slice()))?;
        removed += old.len();
    }
}

fn remove_keys<'a>(
    store: &dyn Store,
    tree: Tree,
    keys: impl Iterator<Item = &'a [u8]> + Clone,
) -> Result<(), StoreError> {
    store.transact(&[tree], |txn| {
        for k in keys.clone() {
            txn.remove(tree, k)?;
        }
        Ok::<_, StoreError>(())
    })
}

/// One pruning pass at `now`.
pub(crate) fn prune(store: &dyn Store, r: &Retention, now: i64) -> Result<Pruned, StoreError> {
    let mut p = Pruned {
        hourly: prune_prefix(store, Tree::UsageHourly, cutoff(now, r.hourly))?,
        daily: prune_prefix(store, Tree::UsageDaily, cutoff(now, r.daily))?,
        cooldown_events: prune_prefix(store, Tree::CooldownEvents, cutoff(now, r.cooldown_events))?,
        audit: prune_prefix(store, Tree::Audit, cutoff(now, r.audit))?,
        report_batches: 0,
    };
    let horizon = cutoff(now, r.report_batches);
    let stale: Vec<Vec<u8>> = store
        .scan(Tree::ReportBatches)?
        .into_iter()
        .filter(|(_, v)| crate::report::dedup::last_used_ms(v) < horizon)
        .map(|(k, _)| k)
        .collect();
    for chunk in stale.chunks(PRUNE_CHUNK) {
        remove_keys(store, Tree::ReportBatches, chunk.iter().map(Vec::as_slice))?;
    }
    p.report_batches = stale.len();
    Ok(p)
}

/// Prunes every `retention.interval` until `stop`.
pub(crate) async fn run(store: Arc<dyn Store>, retention: Retention, mut stop: Shutdown) {
    let mut tick = tokio::time::interval(retention.interval.max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.stopped() => return,
        }
        let s = store.clone();
        let pass =
            tokio::task::spawn_blocking(move || prune(s.as_ref(), &retention, now_ms())).await;
        match pass {
            Ok(Ok(p)) if p != Pruned::default() => tracing::info!(
                hourly = p.hourly,
                daily = p.daily,
                cooldown_events = p.cooldown_events,
                audit = p.audit,
                report_batches = p.report_batches,
                "pruned history past its retention"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "pruning the history failed"),
            Err(e) => tracing::warn!(error = %e, "pruning task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;
    use keys::{DAY_MS, Dims, HOUR_MS};

    #[test]
    fn pruning_removes_only_what_is_past_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("d")).expect("open");
        let s: &dyn Store = &store;
        let now = 100 * DAY_MS;
        let r: Result<(), StoreError> = s.transact(&[Tree::UsageHourly, Tree::UsageDaily], |t| {
            for h in 0..(20 * 24) {
                let hour = now - h * HOUR_MS;
                t.insert(
                    Tree::UsageHourly,
                    &keys::hourly(hour, &Dims::default()),
                    b"",
                )?;
            }
            t.insert(
                Tree::UsageDaily,
                &keys::daily(0, "primary", &Dims::default()),
                b"",
            )?;
            Ok(())
        });
        r.expect("write");
        let p = prune(s, &Retention::default(), now).expect("prune");
        assert_eq!(p.hourly, 20 * 24 - 14 * 24 - 1);
        assert_eq!(p.audit, 0);
        assert_eq!(p.daily, 0);
        assert_eq!(s.len(Tree::UsageHourly).expect("len"), 14 * 24 + 1);
    }

    #[test]
    fn audit_records_past_retention_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("d")).expect("open");
        let s: &dyn Store = &store;
        let now = 1000 * DAY_MS;
        let r: Result<(), StoreError> = s.transact(&[Tree::Audit], |t| {
            for (age_days, tag) in [(500, 1u8), (401, 2), (399, 3), (0, 4)] {
                let mut key = keys::time_prefix(now - age_days * DAY_MS).to_vec();
                key.extend_from_slice(&[tag; 8]);
                t.insert(Tree::Audit, &key, b"")?;
            }
            Ok(())
        });
        r.expect("write");
        let p = prune(s, &Retention::default(), now).expect("prune");
        assert_eq!(p.audit, 2);
        assert_eq!(s.len(Tree::Audit).expect("len"), 2);
    }
}

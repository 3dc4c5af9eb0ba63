//! Fleet-wide cooldowns: a 429 one proxy saw cools the backend on every
//! proxy.
//!
//! Report ingestion applies a batch's rate-limit failures and successes to
//! the `cooldown_state` tree inside the batch's transaction
//! ([`apply_in_txn`]): per backend, the consecutive count across the fleet
//! (reset by a success) and the cooldown's **absolute** end, which only ever
//! moves later: `until = max(until, now + remaining)` where `remaining` is
//! the cooldown the proxy applied (or the upstream's `Retry-After`, or the
//! pool's `base·2^(n-1)` when the proxy gave neither) minus the age of the
//! 429. Each 429 also leaves a `cooldown_events` history record.
//!
//! Two failure kinds cool like a 429 without being one:
//! - `QUOTA_EXHAUSTED` (the provider said the account's quota is spent, until
//!   `cooldown_ms` from the failure): the backend is out until then, and the
//!   state remembers that end (`quota_until_ms`) so the push says
//!   `quota_exhausted` and `backend list/get` show the status while it lasts.
//!   A quota is not a rate limit: the consecutive count (which drives the
//!   pools' exponential backoff) is left alone, and a later success does
//!   not end it (the provider named the time).
//! - `OVERLOADED` (a 529): a short cooldown of what the proxy applied (else
//!   its Retry-After, else the pool's base), also without counting.
//!
//! And one that holds without a time:
//! - `AUTH_FAILED` (a 401/403: the provider rejected the gateway's key): the
//!   state remembers it (`auth_failed`), every push and catch-up says so, and
//!   proxies exclude the backend until its key or URL is updated —
//!   [`FleetCooldowns::clear_auth`], called by `UpdateBackend`, ends it (the
//!   proxies end theirs on the snapshot with the new key). `backend
//!   list/get` show `status: auth_failed` meanwhile.
//!
//! Their history records say which it was in the summary.
//!
//! Once the batch is durable, [`FleetCooldowns::commit`] updates the
//! in-memory view (loaded from the tree at start, so it survives restarts)
//! and the heartbeat scheduler's [`Capacity`], and the caller pushes a
//! [`CooldownUpdate`] to every other connected proxy. A proxy that connects
//! gets every active cooldown ([`FleetCooldowns::active`]).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use claw_proto::v1::{self, CooldownUpdate, FailureKind, UpstreamFailure};

use super::activity::Capacity;
use super::directory::Backends;
use crate::catalog::records::timestamp;
use crate::stats::keys::time_prefix;
use crate::store::{Store, StoreError, Tree, Txn};

/// A report older than this (proxy clock vs ours) counts its age against
/// the cooldown; within it, clocks are taken to agree.
const CLOCK_GRACE_MS: i64 = 2_000;

/// The longest a spent quota holds a backend, whatever a proxy reports
/// (the proxies' own rule, `QUOTA_HOLD_MAX` in the data plane): a proxy of
/// an older version, or a hostile upstream's `Retry-After` it passed on,
/// cannot hold a backend fleet-wide for a day.
const QUOTA_HOLD_MAX_MS: u64 = 3_600_000;

/// Longest summary kept in a history record.
const MAX_SUMMARY: usize = 256;

#[derive(Clone, PartialEq, prost::Message)]
struct StateRecord {
    #[prost(uint32, tag = "1")]
    consecutive: u32,
    #[prost(int64, tag = "2")]
    until_ms: i64,
    #[prost(string, tag = "3")]
    source_node: String,
    #[prost(int64, tag = "4")]
    updated_ms: i64,
    /// End of the provider-reported quota exhaustion, unix ms (0: none).
    #[prost(int64, tag = "5")]
    quota_until_ms: i64,
    /// The provider rejected the backend's key (401/403) and it was not
    /// updated since.
    #[prost(bool, tag = "6")]
    auth_failed: bool,
    /// When the backend's key or URL was last updated, unix ms: a rejected
    /// key reported from before then was the old key's (0: never).
    #[prost(int64, tag = "7")]
    auth_cleared_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EventRecord {
    #[prost(string, tag = "1")]
    backend_id: String,
    #[prost(string, tag = "2")]
    node_id: String,
    #[prost(int64, tag = "3")]
    started_ms: i64,
    #[prost(int64, tag = "4")]
    until_ms: i64,
    #[prost(uint64, tag = "5")]
    duration_ms: u64,
    #[prost(uint32, tag = "6")]
    consecutive: u32,
    #[prost(string, tag = "7")]
    summary: String,
}

/// A backend's fleet-wide cooldown state after a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The backend.
    pub backend_id: String,
    /// Absolute end of its cooldown, unix ms (in the past when not cooling).
    pub until_ms: i64,
    /// Consecutive 429s fleet-wide.
    pub consecutive: u32,
    /// Proxy whose 429 last extended the cooldown.
    pub source_node: String,
    /// Whether this batch started or extended a cooldown (worth a push).
    pub cooled: bool,
    /// End of the backend's quota exhaustion, unix ms (0 or past: none).
    pub quota_until_ms: i64,
    /// The provider rejected the backend's key; until it is updated.
    pub auth_failed: bool,
}

impl Change {
    /// The incremental message for proxies, as of `now_ms`.
    pub fn to_update(&self, now_ms: i64) -> CooldownUpdate {
        CooldownUpdate {
            backend_id: self.backend_id.clone(),
            until_unix_ms: self.until_ms,
            remaining_ms: u64::try_from(self.until_ms.saturating_sub(now_ms)).unwrap_or(0),
            consecutive: self.consecutive,
            source_node_id: self.source_node.clone(),
            quota_exhausted: self.quota_exhausted(now_ms),
            auth_failed: self.auth_failed,
        }
    }

    /// Whether the provider's quota is spent at `now_ms`.
    pub fn quota_exhausted(&self, now_ms: i64) -> bool {
        self.quota_until_ms > now_ms
    }
}

fn event_time_ms(t: Option<&prost_types::Timestamp>, now_ms: i64) -> i64 {
    // Unknown or future times (skew) are "now".
    t.map(crate::stats::ms_of).unwrap_or(now_ms).min(now_ms)
}

enum Step<'a> {
    RateLimited(&'a UpstreamFailure),
    QuotaExhausted(&'a UpstreamFailure),
    Overloaded(&'a UpstreamFailure),
    AuthFailed(&'a UpstreamFailure),
    Success,
}

/// The step of a failure that cools its backend; `None` for the others.
fn cooling_step(f: &UpstreamFailure) -> Option<Step<'_>> {
    match FailureKind::try_from(f.kind) {
        Ok(FailureKind::RateLimited) => Some(Step::RateLimited(f)),
        Ok(FailureKind::QuotaExhausted) => Some(Step::QuotaExhausted(f)),
        Ok(FailureKind::Overloaded) => Some(Step::Overloaded(f)),
        Ok(FailureKind::AuthFailed) => Some(Step::AuthFailed(f)),
        _ => None,
    }
}

/// A history summary that says what kind of cooldown it was.
fn summary_of(prefix: &str, summary: &str) -> String {
    if summary.to_ascii_lowercase().contains(prefix) {
        summary.to_string()
    } else if summary.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}: {summary}")
    }
}

/// Applies a batch's 429s and successes to the cooldown state and history,
/// inside the batch's transaction (trees `CooldownState`, `CooldownEvents`).
/// Pure apart from the transaction: it may run more than once.
pub fn apply_in_txn(
    txn: &dyn Txn,
    batch: &v1::StreamReportsRequest,
    backends: &Backends,
    now_ms: i64,
) -> Result<Vec<Change>, StoreError> {
    // Per backend, the steps in time order (a success at the same instant
    // as a 429 comes after it).
    let mut steps: HashMap<&str, Vec<(i64, u8, Step<'_>)>> = HashMap::new();
    for f in &batch.failures {
        if f.backend_id.is_empty() {
            continue;
        }
        if let Some(step) = cooling_step(f) {
            let t = event_time_ms(f.time.as_ref(), now_ms);
            steps.entry(&f.backend_id).or_default().push((t, 0, step));
        }
    }
    for s in &batch.successes {
        if !s.backend_id.is_empty() {
            let t = event_time_ms(s.time.as_ref(), now_ms);
            steps
                .entry(&s.backend_id)
                .or_default()
                .push((t, 1, Step::Success));
        }
    }
    let mut changes = Vec::with_capacity(steps.len());
    let mut index = 0u32;
    for (backend_id, mut list) in steps {
        list.sort_by_key(|(t, order, _)| (*t, *order));
        let raw = txn.get(Tree::CooldownState, backend_id.as_bytes())?;
        let mut state = raw
            .as_deref()
            .and_then(|r| <StateRecord as prost::Message>::decode(r).ok())
            .unwrap_or_default();
        let policy = backends
            .get(backend_id)
            .map(|b| b.cooldown)
            .unwrap_or_default();
        // Every reported cooldown is capped at the pool's cooldown_max (at
        // least its base), a quota hold at QUOTA_HOLD_MAX_MS: what is
        // recorded, and so pushed to every proxy, is what a current proxy
        // would have applied.
        let cap_ms = policy.max_ms.max(policy.base_ms);
        let mut cooled = false;
        for (at, _, step) in list {
            let (duration, summary, quota) = match step {
                Step::Success => {
                    state.consecutive = 0;
                    continue;
                }
                Step::RateLimited(f) => {
                    state.consecutive = state.consecutive.saturating_add(1);
                    let duration = if f.cooldown_ms > 0 {
                        f.cooldown_ms
                    } else if f.retry_after_ms > 0 {
                        f.retry_after_ms
                    } else {
                        policy.duration_ms(state.consecutive)
                    };
                    (duration.min(cap_ms), f.summary.clone(), false)
                }
                Step::QuotaExhausted(f) => {
                    // The proxy says until when; without it, the longest
                    // cooldown the pool allows (the provider said "spent").
                    let duration = if f.cooldown_ms > 0 {
                        f.cooldown_ms
                    } else if f.retry_after_ms > 0 {
                        f.retry_after_ms
                    } else {
                        policy.max_ms.max(policy.base_ms)
                    };
                    (
                        duration.min(QUOTA_HOLD_MAX_MS),
                        summary_of("quota exhausted", &f.summary),
                        true,
                    )
                }
                Step::Overloaded(f) => {
                    let duration = if f.cooldown_ms > 0 {
                        f.cooldown_ms
                    } else if f.retry_after_ms > 0 {
                        f.retry_after_ms
                    } else {
                        policy.base_ms
                    };
                    (
                        duration.min(cap_ms),
                        summary_of("overloaded", &f.summary),
                        false,
                    )
                }
                Step::AuthFailed(f) => {
                    // No time: it holds until the key or URL is updated.
                    // A rejection from before the last update was the old key's.
                    if !state.auth_failed && at >= state.auth_cleared_ms {
                        state.auth_failed = true;
                        state.source_node = batch.node_id.clone();
                        cooled = true;
                    }
                    (0, summary_of("provider key rejected", &f.summary), false)
                }
            };
            let age = now_ms - at;
            let age = if age <= CLOCK_GRACE_MS { 0 } else { age };
            let remaining = i64::try_from(duration).unwrap_or(i64::MAX) - age;
            let end = now_ms.saturating_add(remaining);
            if remaining > 0 && end > state.until_ms {
                state.until_ms = end;
                state.source_node = batch.node_id.clone();
                cooled = true;
            }
            if quota && remaining > 0 && end > state.quota_until_ms {
                state.quota_until_ms = end;
                cooled = true;
            }
            let event = EventRecord {
                backend_id: backend_id.to_string(),
                node_id: batch.node_id.clone(),
                started_ms: at,
                until_ms: state.until_ms.max(at),
                duration_ms: duration,
                consecutive: state.consecutive,
                summary: bounded(&summary),
            };
            txn.insert(
                Tree::CooldownEvents,
                &event_key(at, backend_id, &batch.node_id, batch.seq, index),
                &prost::Message::encode_to_vec(&event),
            )?;
            index += 1;
        }
        state.updated_ms = now_ms;
        txn.insert(
            Tree::CooldownState,
            backend_id.as_bytes(),
            &prost::Message::encode_to_vec(&state),
        )?;
        changes.push(Change {
            backend_id: backend_id.to_string(),
            until_ms: state.until_ms,
            consecutive: state.consecutive,
            source_node: state.source_node,
            cooled,
            quota_until_ms: state.quota_until_ms,
            auth_failed: state.auth_failed,
        });
    }
    Ok(changes)
}

fn bounded(s: &str) -> String {
    if s.len() <= MAX_SUMMARY {
        return s.to_string();
    }
    let mut end = MAX_SUMMARY;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// History key: time-major, unique per batch and position.
fn event_key(started_ms: i64, backend: &str, node: &str, seq: u64, index: u32) -> Vec<u8> {
    let mut k = time_prefix(started_ms).to_vec();
    k.extend_from_slice(backend.as_bytes());
    k.push(0);
    k.extend_from_slice(node.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The in-memory view of every backend's fleet cooldown.
pub struct FleetCooldowns {
    state: RwLock<HashMap<String, Change>>,
    capacity: Arc<Capacity>,
}

impl std::fmt::Debug for FleetCooldowns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCooldowns").finish_non_exhaustive()
    }
}

impl FleetCooldowns {
    /// Loads the persisted state (absolute times: a cooldown that ended
    /// while the control plane was down is simply no longer active).
    pub fn load(store: &dyn Store, capacity: Arc<Capacity>) -> Result<Self, StoreError> {
        let mut state = HashMap::new();
        for (k, v) in store.scan(Tree::CooldownState)? {
            let Ok(r) = <StateRecord as prost::Message>::decode(v.as_slice()) else {
                tracing::warn!("corrupt cooldown state ignored");
                continue;
            };
            let backend_id = String::from_utf8_lossy(&k).into_owned();
            if let Ok(until) = jiff::Timestamp::from_millisecond(r.until_ms) {
                capacity.cool(&backend_id, until);
            }
            state.insert(
                backend_id.clone(),
                Change {
                    backend_id,
                    until_ms: r.until_ms,
                    consecutive: r.consecutive,
                    source_node: r.source_node,
                    cooled: false,
                    quota_until_ms: r.quota_until_ms,
                    auth_failed: r.auth_failed,
                },
            );
        }
        let this = FleetCooldowns {
            state: RwLock::new(state),
            capacity,
        };
        this.record_gauge(crate::catalog::records::now_ms());
        Ok(this)
    }

    /// Takes in the changes of a durable batch.
    pub fn commit(&self, changes: &[Change], now_ms: i64) {
        {
            let mut s = self.state.write();
            for c in changes {
                let entry = s.entry(c.backend_id.clone()).or_insert_with(|| c.clone());
                // Concurrent batches may commit out of order: the end only
                // moves later.
                let until = entry.until_ms.max(c.until_ms);
                let quota_until = entry.quota_until_ms.max(c.quota_until_ms);
                let auth_failed = entry.auth_failed || c.auth_failed;
                *entry = Change {
                    until_ms: until,
                    quota_until_ms: quota_until,
                    auth_failed,
                    ..c.clone()
                };
                if let Ok(t) = jiff::Timestamp::from_millisecond(until) {
                    self.capacity.cool(&c.backend_id, t);
                }
            }
        }
        self.record_gauge(now_ms);
    }

    /// Every cooldown active at `now_ms`, as messages for a proxy.
    pub fn active(&self, now_ms: i64) -> Vec<CooldownUpdate> {
        let s = self.state.read();
        let mut v: Vec<_> = s
            .values()
            .filter(|c| c.until_ms > now_ms || c.auth_failed)
            .map(|c| c.to_update(now_ms))
            .collect();
        v.sort_by(|a, b| a.backend_id.cmp(&b.backend_id));
        v
    }

    /// Ends `backend_id`'s auth failure, durably then here: its key or URL
    /// was updated at `now_ms`. Rejections reported from before then are
    /// ignored from now on (the old key's, still in flight). Returns
    /// whether it was marked.
    pub fn clear_auth(
        &self,
        store: &dyn Store,
        backend_id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let marked = self.get(backend_id).is_some_and(|c| c.auth_failed);
        store.transact(&[Tree::CooldownState], |txn| {
            let raw = txn.get(Tree::CooldownState, backend_id.as_bytes())?;
            let mut state = raw
                .as_deref()
                .and_then(|r| <StateRecord as prost::Message>::decode(r).ok())
                .unwrap_or_default();
            state.auth_failed = false;
            state.auth_cleared_ms = state.auth_cleared_ms.max(now_ms);
            txn.insert(
                Tree::CooldownState,
                backend_id.as_bytes(),
                &prost::Message::encode_to_vec(&state),
            )
        })?;
        if let Some(c) = self.state.write().get_mut(backend_id) {
            c.auth_failed = false;
        }
        self.record_gauge(now_ms);
        Ok(marked)
    }

    /// The state of one backend.
    pub fn get(&self, backend_id: &str) -> Option<Change> {
        let s = self.state.read();
        s.get(backend_id).cloned()
    }

    /// Refreshes `claw_cp_cooldowns_active`.
    pub fn record_gauge(&self, now_ms: i64) {
        let n = {
            let s = self.state.read();
            // Every backend with fleet state (ever cooled or rejected).
            for c in s.values() {
                super::metrics::backend_auth_failed(&c.backend_id, c.auth_failed);
            }
            s.values().filter(|c| c.until_ms > now_ms).count()
        };
        super::metrics::cooldowns_active(n);
    }
}

/// The cooldown history, newest first: events of `backend_id` (all when
/// `None`) that started in `[start_ms, end_ms)`, at most `limit`.
pub fn list_events(
    store: &dyn Store,
    backends: &Backends,
    backend_id: Option<&str>,
    start_ms: Option<i64>,
    end_ms: Option<i64>,
    limit: usize,
) -> Result<Vec<v1::CooldownEvent>, StoreError> {
    let lower = time_prefix(start_ms.unwrap_or(0));
    let upper = end_ms.map(time_prefix);
    let mut out = Vec::new();
    // Scan newest first in pages, filtering by backend.
    let mut upper_key: Option<Vec<u8>> = upper.map(|u| u.to_vec());
    loop {
        let page = store.range(
            Tree::CooldownEvents,
            &lower,
            upper_key.as_deref(),
            true,
            256,
        )?;
        let Some((last_key, _)) = page.last() else {
            break;
        };
        let next_upper = last_key.clone();
        for (_, v) in &page {
            let Ok(e) = <EventRecord as prost::Message>::decode(v.as_slice()) else {
                continue;
            };
            if backend_id.is_some_and(|b| b != e.backend_id) {
                continue;
            }
            out.push(v1::CooldownEvent {
                backend_name: backends
                    .get(&e.backend_id)
                    .map(|b| b.name.clone())
                    .unwrap_or_default(),
                backend_id: e.backend_id,
                node_id: e.node_id,
                started_at: timestamp(e.started_ms),
                until: timestamp(e.until_ms),
                duration_ms: e.duration_ms,
                consecutive: e.consecutive,
                summary: e.summary,
            });
            if out.len() >= limit {
                return Ok(out);
            }
        }
        if page.len() < 256 {
            break;
        }
        upper_key = Some(next_upper);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;

    fn batch(node: &str, seq: u64, failures: Vec<UpstreamFailure>) -> v1::StreamReportsRequest {
        v1::StreamReportsRequest {
            node_id: node.into(),
            stream_epoch: "e".into(),
            seq,
            failures,
            ..Default::default()
        }
    }

    fn limited(backend: &str, cooldown_ms: u64, at_ms: i64) -> UpstreamFailure {
        UpstreamFailure {
            time: timestamp(at_ms),
            backend_id: backend.into(),
            kind: FailureKind::RateLimited as i32,
            status: 429,
            cooldown_ms,
            summary: "429 Too Many Requests".into(),
            ..Default::default()
        }
    }

    fn apply(s: &dyn Store, b: &v1::StreamReportsRequest, now: i64) -> Vec<Change> {
        s.transact(&[Tree::CooldownState, Tree::CooldownEvents], |t| {
            apply_in_txn(t, b, &Backends::new(), now)
        })
        .expect("txn")
    }

    fn failure(kind: FailureKind, backend: &str, cooldown_ms: u64, at_ms: i64) -> UpstreamFailure {
        UpstreamFailure {
            kind: kind as i32,
            ..limited(backend, cooldown_ms, at_ms)
        }
    }

    #[test]
    fn a_reported_cooldown_is_capped_at_the_pools_cooldown_max() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("d")).expect("open");
        let s: &dyn Store = &store;
        let now = 1_000_000;
        let cap = {
            let p = super::super::directory::CooldownPolicy::default();
            p.max_ms.max(p.base_ms)
        };
        // An older proxy passing on `Retry-After: 1000000000`.
        for (kind, seq) in [(FailureKind::RateLimited, 1), (FailureKind::Overloaded, 2)] {
            let f = failure(kind, "b1", 1_000_000_000_000, now);
            let c = apply(s, &batch("a", seq, vec![f]), now);
            assert_eq!(c[0].until_ms, now + cap as i64, "{kind:?}");
            assert_eq!(c[0].to_update(now).remaining_ms, cap);
        }
    }

    #[test]
    fn quota_exhaustion_cools_until_the_reported_end_and_is_flagged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("d")).expect("open");
        let s: &dyn Store = &store;
        let now = 1_000_000;
        // The proxy reported a day; a quota holds an hour at most.
        let day: i64 = QUOTA_HOLD_MAX_MS as i64;
        let mut f = failure(FailureKind::QuotaExhausted, "b1", 86_400_000, now);
        f.summary = "429 insufficient_quota".into();
        let c = apply(s, &batch("a", 1, vec![f]), now);
        assert_eq!((c[0].until_ms, c[0].quota_until_ms), (now + day, now + day));
        assert!(c[0].cooled && c[0].quota_exhausted(now));
        assert_eq!(c[0].consecutive, 0, "a quota is not a rate limit");
        let u = c[0].to_update(now);
        assert!(u.quota_exhausted, "{u:?}");
        assert_eq!(u.remaining_ms, day as u64);
        // A success does not end it; the end passing does.
        let mut ok = batch("a", 2, vec![]);
        ok.successes.push(v1::BackendSuccess {
            backend_id: "b1".into(),
            time: timestamp(now + 1),
        });
        let c = apply(s, &ok, now + 1);
        assert!(c[0].quota_exhausted(now + 1));
        assert!(!c[0].quota_exhausted(now + day));
        let events = list_events(s, &Backends::new(), Some("b1"), None, None, 10).expect("list");
        assert_eq!(events.len(), 1);
        assert!(
            events[0].summary.contains("quota"),
            "{:?}",
            events[0].summary
        );
        assert_eq!(events[0].duration_ms, day as u64);

        let fleet = FleetCooldowns::load(s, Arc::new(Capacity::new())).expect("load");
        assert_eq!(fleet.get("b1").map(|c| c.quota_until_ms), Some(now + day));
        assert!(fleet.active(now + 10).iter().all(|u| u.quota_exhausted));
    }

    #[test]
    fn an_auth_failure_holds_without_a_time_until_cleared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("d")).expect("open");
        let s: &dyn Store = &store;
        let now = 1_000_000;
        let mut f = failure(FailureKind::AuthFailed, "b1", 0, now);
        f.status = 401;
        let c = apply(s, &batch("a", 1, vec![f.clone()]), now);
        assert!(c[0].auth_failed && c[0].cooled, "{c:?}");
        assert!(c[0].to_update(now).auth_failed);
        // A second report is no news (no push).
        let again = apply(s, &batch("b", 1, vec![f]), now + 1);
        assert!(again[0].auth_failed && !again[0].cooled, "{again:?}");

        let fleet = FleetCooldowns::load(s, Arc::new(Capacity::new())).expect("load");
        let year = 365 * 86_400_000;
        let active = fleet.active(now + year);
        assert_eq!(active.len(), 1, "a proxy connecting later learns it");
        assert!(active[0].auth_failed && active[0].remaining_ms == 0);
        assert!(fleet.clear_auth(s, "b1", now + 100).expect("clear"));
        assert!(
            !fleet.clear_auth(s, "b1", now + 100).expect("clear"),
            "once"
        );
        assert!(fleet.active(now + 110).is_empty());
        let reloaded = FleetCooldowns::load(s, Arc::new(Capacity::new())).expect("load");
        assert!(
            reloaded.get("b1").is_some_and(|c| !c.auth_failed),
            "durable"
        );
        // The old key's 401, reported late, does not mark it again; a new one does.
        let mut late = failure(FailureKind::AuthFailed, "b1", 0, now + 50);
        late.status = 401;
        let c = apply(s, &batch("a", 2, vec![late.clone()]), now + 200);
        assert!(!c[0].auth_failed, "{c:?}");
        late.time = timestamp(now + 150);
        let c = apply(s, &batch("a", 3, vec![late]), now + 200);
        assert!(c[0].auth_failed, "{c:?}");
    }

    #[test]
    fn overload_cools_briefly_without_counting_and_a_429_is_not_a_quota() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("d")).expect("open");
        let s: &dyn Store = &store;
        let now = 1_000_000;
        let mut f = failure(FailureKind::Overloaded, "b1", 2_000, now);
        f.status = 529;
        f.summary = "529 from upstream".into();
        let c = apply(s, &batch("a", 1, vec![f]), now);
        assert_eq!((c[0].until_ms, c[0].consecutive), (now + 2_000, 0));
        assert!(c[0].cooled && !c[0].quota_exhausted(now));
        assert!(!c[0].to_update(now).quota_exhausted);
        let events = list_events(s, &Backends::new(), None, None, None, 10).expect("list");
        assert_eq!(events[0].summary, "overloaded: 529 from upstream");
        // Without a cooldown from the proxy: the pool's base.
        let c = apply(
            s,
            &batch("a", 2, vec![failure(FailureKind::Overloaded, "b2", 0, now)]),
            now,
        );
        assert_eq!(
            c[0].until_ms,
            now + crate::fleet::directory::CooldownPolicy::default().base_ms as i64
        );
        let c = apply(s, &batch("a", 3, vec![limited("b3", 5_000, now)]), now);
        assert!(!c[0].quota_exhausted(now) && !c[0].to_update(now).quota_exhausted);
        // Other failures do not cool.
        let c = apply(
            s,
            &batch(
                "a",
                4,
                vec![failure(FailureKind::ServerError, "b4", 5_000, now)],
            ),
            now,
        );
        assert!(c.is_empty());
    }

    #[test]
    fn consecutive_counts_across_proxies_and_resets_on_success() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("d")).expect("open");
        let s: &dyn Store = &store;
        let now = 1_000_000;
        let c = apply(s, &batch("a", 1, vec![limited("b1", 5_000, now)]), now);
        assert_eq!(
            (c[0].consecutive, c[0].until_ms, c[0].cooled),
            (1, now + 5_000, true)
        );
        let c = apply(s, &batch("b", 1, vec![limited("b1", 1_000, now)]), now);
        assert_eq!(c[0].consecutive, 2);
        assert_eq!(c[0].until_ms, now + 5_000, "never shortened");
        assert!(!c[0].cooled);
        let mut ok = batch("a", 2, vec![]);
        ok.successes.push(v1::BackendSuccess {
            backend_id: "b1".into(),
            time: timestamp(now),
        });
        let c = apply(s, &ok, now);
        assert_eq!(c[0].consecutive, 0);
        assert_eq!(c[0].until_ms, now + 5_000);
        // An old 429 (resent after an outage) only cools for what is left.
        let c = apply(
            s,
            &batch("a", 3, vec![limited("b2", 10_000, now - 8_000)]),
            now,
        );
        assert_eq!(c[0].until_ms, now + 2_000);
        let events = list_events(s, &Backends::new(), None, None, None, 10).expect("list");
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].backend_id, "b1", "newest first");
        let only = list_events(s, &Backends::new(), Some("b2"), None, None, 10).expect("list");
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].duration_ms, 10_000);

        let cap = Arc::new(Capacity::new());
        let fleet = FleetCooldowns::load(s, cap).expect("load");
        assert_eq!(fleet.active(now).len(), 2);
        assert_eq!(fleet.active(now + 3_000).len(), 1);
    }
}

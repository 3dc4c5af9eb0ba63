//! The durable run log: one record per slot, keyed by agent and nominal
//! time, plus the trees that index it.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `heartbeat_runs` | `agent \0 be-u64 nominal ms` | [`RunRecord`] |
//! | `heartbeat_runs_by_time` | `be-u64 nominal ms \0 agent` | empty |
//! | `heartbeat_open` | run key | empty, while running or deferred |
//! | `heartbeat_cursors` | agent id | [`Cursor`] |
//! | `heartbeat_outbox` | run key | a delivery ([`super::delivery`]) |
//!
//! The key is the claim: writing a run record whose key exists is a no-op
//! ([`Write::Claim`]), so one slot can never be run twice — across
//! restarts, manual triggers and configuration reloads. Every write of the
//! scheduler goes through [`RunStore::commit`]: one transaction over all
//! trees, then a flush, before any side effect it enables.

use std::sync::Arc;

use claw_proto::v1::{HeartbeatRun, RunStatus};

use crate::catalog::records;
use crate::events::{Events, Topic};
use crate::store::{Store, StoreError, Tree, Txn};

/// The trees a scheduler transaction spans.
const TREES: [Tree; 5] = [
    Tree::HeartbeatRuns,
    Tree::HeartbeatRunsByTime,
    Tree::HeartbeatOpen,
    Tree::HeartbeatCursors,
    Tree::HeartbeatOutbox,
];

/// The identity of a slot: agent id and nominal time (unix ms).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunKey {
    /// The agent.
    pub agent_id: String,
    /// The slot's nominal time, unix milliseconds.
    pub nominal_ms: i64,
}

impl RunKey {
    /// A key for `agent_id`'s slot at `nominal_ms`.
    pub fn new(agent_id: impl Into<String>, nominal_ms: i64) -> Self {
        RunKey {
            agent_id: agent_id.into(),
            nominal_ms,
        }
    }

    /// `agent \0 be-u64 ms`: an agent's runs are contiguous and in time
    /// order (ids never contain NUL; validation allows `[a-z0-9._-]`).
    pub fn encode(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.agent_id.len() + 9);
        k.extend_from_slice(self.agent_id.as_bytes());
        k.push(0);
        k.extend_from_slice(&(self.nominal_ms.max(0) as u64).to_be_bytes());
        k
    }

    /// `be-u64 ms \0 agent`, the by-time index key.
    fn encode_by_time(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.agent_id.len() + 9);
        k.extend_from_slice(&(self.nominal_ms.max(0) as u64).to_be_bytes());
        k.push(0);
        k.extend_from_slice(self.agent_id.as_bytes());
        k
    }

    /// Parses [`RunKey::encode`].
    pub fn decode(raw: &[u8]) -> Option<RunKey> {
        if raw.len() < 9 || raw[raw.len() - 9] != 0 {
            return None;
        }
        let (id, rest) = raw.split_at(raw.len() - 9);
        let ms: [u8; 8] = rest[1..].try_into().ok()?;
        Some(RunKey {
            agent_id: String::from_utf8(id.to_vec()).ok()?,
            nominal_ms: u64::from_be_bytes(ms) as i64,
        })
    }

    /// Parses the by-time index key.
    fn decode_by_time(raw: &[u8]) -> Option<RunKey> {
        if raw.len() < 9 || raw[8] != 0 {
            return None;
        }
        let ms: [u8; 8] = raw[..8].try_into().ok()?;
        Some(RunKey {
            agent_id: String::from_utf8(raw[9..].to_vec()).ok()?,
            nominal_ms: u64::from_be_bytes(ms) as i64,
        })
    }
}

/// A stored run: the API message plus what only the scheduler needs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RunRecord {
    /// The run as `ListHeartbeatRuns` shows it.
    #[prost(message, optional, tag = "1")]
    pub run: Option<HeartbeatRun>,
    /// While deferred: when the deferral gives up (unix ms).
    #[prost(int64, tag = "2")]
    pub defer_until_ms: i64,
    /// While deferred: `busy` or `no_capacity`.
    #[prost(string, tag = "3")]
    pub defer_reason: String,
    /// While running: when the run times out (unix ms).
    #[prost(int64, tag = "4")]
    pub deadline_ms: i64,
    /// Wake runs: SHA-256 of the run's callback token (the token itself is
    /// only ever in the wake request).
    #[prost(bytes = "vec", tag = "5")]
    pub callback_token_hash: Vec<u8>,
    /// Wake runs: SHA-256 of the accepted callback body (a repeat of the
    /// same body is answered 200, another one 409).
    #[prost(bytes = "vec", tag = "6")]
    pub callback_body_hash: Vec<u8>,
}

impl RunRecord {
    /// The run's status.
    pub fn status(&self) -> RunStatus {
        self.run
            .as_ref()
            .and_then(|r| RunStatus::try_from(r.status).ok())
            .unwrap_or(RunStatus::Unspecified)
    }
}

/// Whether a status is final for the run log (delivery may still be
/// pending for `delivering`, which the outbox owns).
pub fn is_open(status: RunStatus) -> bool {
    matches!(
        status,
        RunStatus::Running | RunStatus::Deferred | RunStatus::Dispatched
    )
}

/// Whether a status is terminal: nothing will change it any more.
pub fn is_terminal(status: RunStatus) -> bool {
    !matches!(
        status,
        RunStatus::Running
            | RunStatus::Deferred
            | RunStatus::Delivering
            | RunStatus::Dispatched
            | RunStatus::Unspecified
    )
}

/// The persisted cadence state of an agent.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Cursor {
    /// The next slot to fire (unix ms); 0 = none within the horizon.
    #[prost(int64, tag = "1")]
    pub next_ms: i64,
    /// Fingerprint of the schedule fields the cursor was computed from.
    #[prost(uint64, tag = "2")]
    pub fingerprint: u64,
}

/// One write of a scheduler transaction.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert a run record unless its key exists (then nothing happens and
    /// the claim reports the existing record).
    Claim(RunKey, RunRecord),
    /// Replace an existing run record.
    Update(RunKey, RunRecord),
    /// Store an agent's cursor.
    Cursor(String, Cursor),
    /// Forget a deleted agent's cursor.
    DropCursor(String),
    /// Add a delivery to the outbox.
    OutboxPut(RunKey, Vec<u8>),
    /// Remove a finished delivery.
    OutboxRemove(RunKey),
    /// Remove a run (retention).
    Prune(RunKey),
}

/// What became of a [`Write::Claim`].
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// The record was written: this process owns the slot.
    Claimed,
    /// The slot was claimed before; here is its record.
    Existing(Box<RunRecord>),
}

/// Typed access to the run trees.
#[derive(Clone)]
pub struct RunStore {
    store: Arc<dyn Store>,
    /// Told when a run is recorded or changes (the dashboard).
    events: Option<Events>,
}

impl std::fmt::Debug for RunStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunStore").finish_non_exhaustive()
    }
}

/// Errors of the run store.
#[derive(Debug, thiserror::Error)]
pub enum RunStoreError {
    /// The engine failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record did not decode.
    #[error("corrupt heartbeat data: {0}")]
    Corrupt(String),
}

type Result<T, E = RunStoreError> = std::result::Result<T, E>;

fn decode<M: prost::Message + Default>(tree: Tree, raw: &[u8]) -> Result<M> {
    M::decode(raw).map_err(|e| RunStoreError::Corrupt(format!("{}: {e}", tree.name())))
}

fn write_run(txn: &dyn Txn, key: &RunKey, rec: &RunRecord) -> Result<(), StoreError> {
    let k = key.encode();
    txn.insert(Tree::HeartbeatRuns, &k, &records::encode(rec))?;
    txn.insert(Tree::HeartbeatRunsByTime, &key.encode_by_time(), &[])?;
    if is_open(rec.status()) {
        txn.insert(Tree::HeartbeatOpen, &k, &[])?;
    } else {
        txn.remove(Tree::HeartbeatOpen, &k)?;
    }
    Ok(())
}

impl RunStore {
    /// The run store over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        RunStore {
            store,
            events: None,
        }
    }

    /// The run store announcing recorded and updated runs on `events`.
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = Some(events);
        self
    }

    /// Applies `writes` in one transaction and flushes, so everything they
    /// describe is durable when this returns. Returns one outcome per
    /// [`Write::Claim`], in order.
    pub async fn commit(&self, writes: &[Write]) -> Result<Vec<ClaimOutcome>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let outcomes = self.store.transact(&TREES, |txn| -> Result<_> {
            let mut outcomes = Vec::new();
            for w in writes {
                match w {
                    Write::Claim(key, rec) => match txn.get(Tree::HeartbeatRuns, &key.encode())? {
                        Some(raw) => outcomes.push(ClaimOutcome::Existing(Box::new(decode(
                            Tree::HeartbeatRuns,
                            &raw,
                        )?))),
                        None => {
                            write_run(txn, key, rec)?;
                            outcomes.push(ClaimOutcome::Claimed);
                        }
                    },
                    Write::Update(key, rec) => write_run(txn, key, rec)?,
                    Write::Cursor(agent, c) => {
                        txn.insert(
                            Tree::HeartbeatCursors,
                            agent.as_bytes(),
                            &records::encode(c),
                        )?;
                    }
                    Write::DropCursor(agent) => {
                        txn.remove(Tree::HeartbeatCursors, agent.as_bytes())?;
                    }
                    Write::OutboxPut(key, entry) => {
                        txn.insert(Tree::HeartbeatOutbox, &key.encode(), entry)?;
                    }
                    Write::OutboxRemove(key) => {
                        txn.remove(Tree::HeartbeatOutbox, &key.encode())?;
                    }
                    Write::Prune(key) => {
                        let k = key.encode();
                        txn.remove(Tree::HeartbeatRuns, &k)?;
                        txn.remove(Tree::HeartbeatRunsByTime, &key.encode_by_time())?;
                        txn.remove(Tree::HeartbeatOpen, &k)?;
                    }
                }
            }
            Ok(outcomes)
        })?;
        self.store.flush().await?;
        if let Some(events) = &self.events
            && writes
                .iter()
                .any(|w| matches!(w, Write::Claim(..) | Write::Update(..)))
        {
            events.notify(Topic::Heartbeats);
        }
        Ok(outcomes)
    }

    /// One run record.
    pub fn get(&self, key: &RunKey) -> Result<Option<RunRecord>> {
        match self.store.get(Tree::HeartbeatRuns, &key.encode())? {
            Some(raw) => Ok(Some(decode(Tree::HeartbeatRuns, &raw)?)),
            None => Ok(None),
        }
    }

    /// Every cursor.
    pub fn cursors(&self) -> Result<Vec<(String, Cursor)>> {
        self.store
            .scan(Tree::HeartbeatCursors)?
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    decode(Tree::HeartbeatCursors, &v)?,
                ))
            })
            .collect()
    }

    /// Runs left running or deferred (by a crash or a shutdown).
    pub fn open_runs(&self) -> Result<Vec<(RunKey, RunRecord)>> {
        let mut out = Vec::new();
        for (k, _) in self.store.scan(Tree::HeartbeatOpen)? {
            let Some(key) = RunKey::decode(&k) else {
                continue;
            };
            if let Some(rec) = self.get(&key)? {
                out.push((key, rec));
            }
        }
        Ok(out)
    }

    /// Raw outbox entries.
    pub fn outbox(&self) -> Result<Vec<(RunKey, Vec<u8>)>> {
        Ok(self
            .store
            .scan(Tree::HeartbeatOutbox)?
            .into_iter()
            .filter_map(|(k, v)| RunKey::decode(&k).map(|key| (key, v)))
            .collect())
    }

    /// Number of outbox entries.
    pub fn outbox_len(&self) -> Result<usize> {
        Ok(self.store.len(Tree::HeartbeatOutbox)?)
    }

    /// Updates an outbox entry in place, only if it still exists (a
    /// finished delivery is never resurrected).
    pub fn outbox_update(&self, key: &RunKey, entry: &[u8]) -> Result<()> {
        let k = key.encode();
        self.store
            .transact(&[Tree::HeartbeatOutbox], |txn| -> Result<()> {
                if txn.get(Tree::HeartbeatOutbox, &k)?.is_some() {
                    txn.insert(Tree::HeartbeatOutbox, &k, entry)?;
                }
                Ok(())
            })
    }

    /// An agent's runs, newest first.
    pub fn list_agent(&self, agent_id: &str, limit: usize) -> Result<Vec<HeartbeatRun>> {
        let mut start = agent_id.as_bytes().to_vec();
        start.push(0);
        let mut end = agent_id.as_bytes().to_vec();
        end.push(1);
        self.store
            .range(Tree::HeartbeatRuns, &start, Some(&end), true, limit)?
            .into_iter()
            .map(|(_, v)| Ok(decode::<RunRecord>(Tree::HeartbeatRuns, &v)?.run))
            .filter_map(|r| r.transpose())
            .collect()
    }

    /// Every agent's runs, newest (by nominal time) first.
    pub fn list_all(&self, limit: usize) -> Result<Vec<HeartbeatRun>> {
        let mut out = Vec::new();
        for (k, _) in self
            .store
            .range(Tree::HeartbeatRunsByTime, &[], None, true, limit)?
        {
            let Some(key) = RunKey::decode_by_time(&k) else {
                continue;
            };
            if let Some(run) = self.get(&key)?.and_then(|r| r.run) {
                out.push(run);
            }
        }
        Ok(out)
    }

    /// Up to `limit` finished runs with a nominal time before `cutoff_ms`,
    /// oldest first (for retention).
    pub fn prunable(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<RunKey>> {
        let end = (cutoff_ms.max(0) as u64).to_be_bytes();
        let mut out = Vec::new();
        for (k, _) in self
            .store
            .range(Tree::HeartbeatRunsByTime, &[], Some(&end), false, limit)?
        {
            let Some(key) = RunKey::decode_by_time(&k) else {
                continue;
            };
            match self.get(&key)? {
                Some(rec) if !is_terminal(rec.status()) => {}
                _ => out.push(key),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;

    pub(crate) fn store() -> (tempfile::TempDir, RunStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("d")).expect("open"));
        (dir, RunStore::new(s))
    }

    fn rec(status: RunStatus, id: &str) -> RunRecord {
        RunRecord {
            run: Some(HeartbeatRun {
                run_id: id.into(),
                status: status as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn keys_round_trip_and_sort_by_agent_then_time() {
        let a = RunKey::new("a", 5_000);
        let b = RunKey::new("a", 10_000);
        let c = RunKey::new("a-b", 1);
        assert_eq!(RunKey::decode(&a.encode()), Some(a.clone()));
        assert_eq!(RunKey::decode_by_time(&a.encode_by_time()), Some(a.clone()));
        assert!(a.encode() < b.encode() && b.encode() < c.encode());
    }

    #[tokio::test]
    async fn a_claim_of_an_existing_slot_is_a_no_op() {
        let (_d, s) = store();
        let key = RunKey::new("a1", 60_000);
        let first = s
            .commit(&[Write::Claim(key.clone(), rec(RunStatus::Running, "r1"))])
            .await
            .expect("claim");
        assert_eq!(first, vec![ClaimOutcome::Claimed]);
        let second = s
            .commit(&[Write::Claim(key.clone(), rec(RunStatus::Running, "r2"))])
            .await
            .expect("claim again");
        assert!(
            matches!(&second[..], [ClaimOutcome::Existing(r)] if r.run.as_ref().map(|r| r.run_id.as_str()) == Some("r1"))
        );
        assert_eq!(s.list_agent("a1", 10).expect("list").len(), 1);
        assert_eq!(s.open_runs().expect("open").len(), 1);
        s.commit(&[Write::Update(key.clone(), rec(RunStatus::Ok, "r1"))])
            .await
            .expect("finish");
        assert!(s.open_runs().expect("open").is_empty());
    }

    #[tokio::test]
    async fn listing_is_newest_first_and_pruning_keeps_open_runs() {
        let (_d, s) = store();
        let mut writes = Vec::new();
        for (agent, ms, st) in [
            ("a", 1_000, RunStatus::Ok),
            ("a", 3_000, RunStatus::Suppressed),
            ("b", 2_000, RunStatus::Running),
            ("ab", 4_000, RunStatus::Failed),
        ] {
            writes.push(Write::Claim(
                RunKey::new(agent, ms),
                rec(st, &format!("{agent}{ms}")),
            ));
        }
        s.commit(&writes).await.expect("commit");
        let ids = |runs: Vec<HeartbeatRun>| runs.into_iter().map(|r| r.run_id).collect::<Vec<_>>();
        assert_eq!(ids(s.list_agent("a", 10).expect("a")), ["a3000", "a1000"]);
        assert_eq!(
            ids(s.list_all(3).expect("all")),
            ["ab4000", "a3000", "b2000"]
        );
        let prunable = s.prunable(3_500, 100).expect("prunable");
        assert_eq!(
            prunable,
            vec![RunKey::new("a", 1_000), RunKey::new("a", 3_000)]
        );
        s.commit(&prunable.into_iter().map(Write::Prune).collect::<Vec<_>>())
            .await
            .expect("prune");
        assert_eq!(ids(s.list_all(10).expect("all")), ["ab4000", "b2000"]);
    }
}

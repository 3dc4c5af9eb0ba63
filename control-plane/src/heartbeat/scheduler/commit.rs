//! The batch machinery: one wake-up's writes committed in one transaction
//! and one flush, then their side effects (runs sent, outbox handed to the
//! delivery worker, callers answered), and the recovery when a commit fails
//! (claims dropped, cursors re-fired, manual callers told).
//!
//! It is also where the owner hears back ([`super::super::streak`]): before
//! a batch commits, every write that ends a run — whichever path wrote it
//! (a reply, a timeout, a restart, a wake callback) — is counted in its
//! agent's failure streak, and a `failed` or `recovered` event joins the
//! same transaction as an outbox entry. An alert that also ends a streak is
//! one `alert` marked `recovered`, not two deliveries. Events for an agent
//! without a webhook are not enqueued (logged at info); an alert for one
//! ends `undeliverable`. Delivery outcomes and `RedeliverRuns` are booked
//! here too.
//!
//! **Results kept while the volume is full.** A commit refused for space
//! ([`crate::store::StoreError::is_no_space`]: the disk-full guard, or the
//! engine's ENOSPC) loses nothing that already happened outside the store:
//! the writes that record it — a run's end (reply, failure, wake answer,
//! callback, timeout, restart), its alert's outbox entry, its `failed` /
//! `recovered` event, a delivery's outcome — are kept in memory, grouped
//! per run, and put first in every later commit (retried on their own
//! after 1 s, 2 s, 4 s, then every [`PENDING_RETRY_MAX`]) until one
//! commits once space returns; their side effects (the outbox entry handed
//! to the delivery worker, waiters woken, outcome metrics) follow that
//! commit, once. Claims and cursor moves are not kept: nothing was sent
//! for them, and the slots fire again. At most [`MAX_PENDING_RESULTS`]
//! runs wait; beyond that the oldest is dropped (warned, counted in
//! `claw_heartbeat_results_dropped_total`). The number waiting is the
//! gauge `claw_heartbeat_results_waiting_for_space`. A process that stops
//! while results wait loses them: their runs are still open in the store
//! and the next start records them `failed` ("control plane restarted
//! during the run"), as for any run a restart interrupted — never sent
//! twice. Other commit failures keep nothing (a write that cannot be
//! stored for another reason must not block every later commit).

use std::collections::VecDeque;

use ::metrics as metrics_rs;

use super::super::metrics::{RESULTS_DROPPED_TOTAL, RESULTS_WAITING};

use super::super::streak::{self, Streak, Transition};
use super::*;

/// Runs read first when deriving a streak from the log.
const SHALLOW: usize = 16;

/// Most runs whose results wait in memory for space (see the module doc).
pub(super) const MAX_PENDING_RESULTS: usize = 10_000;
/// First wait before results kept for space are committed again.
const PENDING_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two commits of results kept for space.
pub(super) const PENDING_RETRY_MAX: Duration = Duration::from_secs(5);

/// The writes of one run kept for space, in the order they were made.
struct PendingResult {
    key: RunKey,
    writes: Vec<(Write, Action)>,
}

/// Results waiting for space (see the module doc).
#[derive(Default)]
pub(super) struct Pending {
    results: VecDeque<PendingResult>,
    /// When to commit them again, unix ms (0 while none wait).
    retry_at_ms: i64,
    /// The wait before the next retry.
    step: Duration,
}

impl Pending {
    /// Runs whose results wait.
    pub(super) fn len(&self) -> usize {
        self.results.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// When the scheduler should wake to commit them again.
    pub(super) fn retry_at(&self) -> Option<i64> {
        (!self.results.is_empty()).then_some(self.retry_at_ms)
    }

    /// Every kept write, oldest first; nothing waits afterwards.
    fn take(&mut self) -> Vec<(Write, Action)> {
        let writes = self.results.drain(..).flat_map(|r| r.writes).collect();
        self.publish();
        writes
    }

    /// Keeps `writes` (results of a commit refused for space), grouped per
    /// run in the order of their first write; the oldest runs beyond
    /// [`MAX_PENDING_RESULTS`] are returned, dropped.
    fn keep(&mut self, writes: Vec<(Write, Action)>, now: i64) -> Vec<PendingResult> {
        let mut at: HashMap<RunKey, usize> = self
            .results
            .iter()
            .enumerate()
            .map(|(i, r)| (r.key.clone(), i))
            .collect();
        for (write, action) in writes {
            let Some(key) = run_key(&write).cloned() else {
                continue;
            };
            match at.get(&key) {
                Some(&i) => self.results[i].writes.push((write, action)),
                None => {
                    at.insert(key.clone(), self.results.len());
                    self.results.push_back(PendingResult {
                        key,
                        writes: vec![(write, action)],
                    });
                }
            }
        }
        let excess = self.results.len().saturating_sub(MAX_PENDING_RESULTS);
        let dropped: Vec<PendingResult> = self.results.drain(..excess).collect();
        self.step = if self.step.is_zero() {
            PENDING_RETRY_FIRST
        } else {
            (self.step * 2).min(PENDING_RETRY_MAX)
        };
        self.retry_at_ms = now + self.step.as_millis() as i64;
        self.publish();
        dropped
    }

    /// After a commit: nothing waits, the next wait starts short again.
    fn committed(&mut self) {
        self.step = Duration::ZERO;
        self.retry_at_ms = 0;
        self.publish();
    }

    fn publish(&self) {
        metrics_rs::gauge!(RESULTS_WAITING).set(self.results.len() as f64);
    }
}

/// The run a write belongs to.
fn run_key(write: &Write) -> Option<&RunKey> {
    match write {
        Write::Claim(key, _)
        | Write::Update(key, _)
        | Write::OutboxPut(key, _)
        | Write::OutboxRemove(key)
        | Write::Prune(key) => Some(key),
        Write::Cursor(..) | Write::DropCursor(_) => None,
    }
}

/// Whether a write records something that already happened outside the
/// store (a run's end, its outbox entry or event, a delivery's outcome):
/// kept when its commit is refused for space. Claims, cursors and pruning
/// are decided again; a redelivery and a manual run's claim answer their
/// caller with the failure instead.
fn is_result(write: &Write, action: &Action) -> bool {
    match action {
        Action::Finished(_) => true,
        Action::None => matches!(
            write,
            Write::Update(..) | Write::OutboxPut(..) | Write::OutboxRemove(_)
        ),
        Action::Dispatch(_)
        | Action::Manual(..)
        | Action::Bookkeeping
        | Action::Redelivered(..) => false,
    }
}

/// Answers a `RedeliverRuns` request: the run ids put back in the outbox.
pub(crate) type RedeliverReply = oneshot::Sender<Result<Vec<String>, HeartbeatError>>;

impl SchedulerHandle {
    /// Puts the dead letters at `keys` back in the outbox; the run ids of
    /// those that still were dead letters.
    pub async fn redeliver(&self, keys: Vec<RunKey>) -> Result<Vec<String>, HeartbeatError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Redeliver { keys, reply })
            .map_err(|_| HeartbeatError::Unavailable)?;
        rx.await.map_err(|_| HeartbeatError::Unavailable)?
    }
}

impl Scheduler {
    /// Commits the batch (one transaction, one flush), then performs its
    /// side effects.
    pub(super) async fn flush_batch(&mut self) {
        if self.batch.is_empty() && self.waiters.is_empty() && self.pending.is_empty() {
            return;
        }
        if self.batch.is_empty() && self.pending.retry_at().is_some_and(|t| self.now_ms() < t) {
            // Results wait for space: the next try is on its backoff (and
            // their waiters are woken once they are stored).
            return;
        }
        // Events for the new writes only: kept results have theirs.
        self.streak_events();
        let mut batch = self.pending.take();
        batch.append(&mut self.batch);
        let writes: Vec<Write> = batch.iter().map(|(w, _)| w.clone()).collect();
        let outcomes = match self.deps.runs.commit(&writes).await {
            Ok(o) => o,
            Err(e) => {
                // Nothing of this batch is durable: release claimed state so
                // that nothing is sent. The slots are retried by the cursor
                // (which did not move either) on the next wake-up; results
                // refused for space are kept for the next commit.
                let space = matches!(&e, RunStoreError::Store(s) if s.is_no_space());
                if space {
                    // The space watcher logged the low space once; this
                    // would repeat every retry until space is freed.
                    tracing::debug!(error = %e, "heartbeat store commit refused for space; retrying");
                } else {
                    tracing::error!(error = %e, "heartbeat store commit failed; retrying");
                }
                self.recover_from_failed_commit(batch, space);
                return;
            }
        };
        self.pending.committed();
        let mut outcomes = outcomes.into_iter();
        let now = self.now_ms();
        for (write, action) in batch {
            let claimed = match &write {
                Write::Claim(..) => outcomes.next().unwrap_or(ClaimOutcome::Claimed),
                _ => ClaimOutcome::Claimed,
            };
            if !matches!(action, Action::Bookkeeping) {
                self.account(&write, &claimed);
            }
            match (action, claimed) {
                (Action::None, ClaimOutcome::Existing(_)) => {
                    if let Write::Claim(key, _) = &write {
                        tracing::info!(agent = %key.agent_id, nominal_ms = key.nominal_ms, "slot already claimed; not run again");
                        self.drop_in_flight(key);
                    }
                }
                (Action::None, _) => {}
                (Action::Dispatch(req), ClaimOutcome::Claimed) => {
                    if let Write::Claim(key, _) | Write::Update(key, _) = &write {
                        metrics::dispatch_lag((now - key.nominal_ms) as f64 / 1000.0);
                        self.spawn(key.clone(), req);
                    }
                }
                (Action::Dispatch(_), ClaimOutcome::Existing(_)) => {
                    if let Write::Claim(key, _) = &write {
                        self.drop_in_flight(key);
                    }
                }
                (Action::Manual(reply, req), claimed) => {
                    let Write::Claim(key, rec) = &write else {
                        continue;
                    };
                    match claimed {
                        ClaimOutcome::Claimed => {
                            let done = match self.in_flight.get(&key.agent_id) {
                                Some(f) if &f.key == key => f.done.subscribe(),
                                _ => {
                                    let (tx, rx) = watch::channel(rec.run.clone());
                                    drop(tx);
                                    rx
                                }
                            };
                            if let Some(req) = req {
                                self.spawn(key.clone(), req);
                            }
                            let _ = reply.send(Ok(ManualRun {
                                run: rec.run.clone().unwrap_or_default(),
                                merged: false,
                                done,
                            }));
                        }
                        ClaimOutcome::Existing(existing) => {
                            self.drop_in_flight(key);
                            let (tx, rx) = watch::channel(existing.run.clone());
                            drop(tx);
                            let _ = reply.send(Ok(ManualRun {
                                run: existing.run.unwrap_or_default(),
                                merged: true,
                                done: rx,
                            }));
                        }
                    }
                }
                (Action::Finished(outbox), _) => {
                    if let Some(entry) = outbox {
                        let _ = self.deps.outbox.send(entry);
                    }
                }
                (Action::Bookkeeping, _) => {}
                (Action::Redelivered(entry, reply), _) => {
                    let _ = self.deps.outbox.send(*entry);
                    if let Some((reply, ids)) = reply {
                        let _ = reply.send(Ok(ids));
                    }
                }
            }
        }
        for (done, run) in std::mem::take(&mut self.waiters) {
            done.send_replace(run);
        }
    }

    pub(super) fn drop_in_flight(&mut self, key: &RunKey) {
        if self
            .in_flight
            .get(&key.agent_id)
            .is_some_and(|f| &f.key == key)
        {
            self.in_flight.remove(&key.agent_id);
        }
    }

    /// Commits what is left at a stop, even inside the results' backoff;
    /// results that still cannot be stored are logged as lost (their runs
    /// end interrupted at the next start).
    pub(super) async fn flush_at_stop(&mut self) {
        self.pending.retry_at_ms = 0;
        self.flush_batch().await;
        if !self.pending.is_empty() {
            tracing::warn!(
                runs = self.pending.len(),
                "stopping with heartbeat results not stored for lack of space; those runs are recorded failed (interrupted) at the next start"
            );
        }
    }

    /// After a failed commit nothing happened: forget in-flight entries of
    /// this batch, answer manual callers with an error, and put the slots
    /// back so the next wake-up tries again. With `keep_results` (refused
    /// for space), the results in it wait for the next commit.
    pub(super) fn recover_from_failed_commit(
        &mut self,
        batch: Vec<(Write, Action)>,
        keep_results: bool,
    ) {
        let now = self.now_ms();
        let mut kept = Vec::new();
        // Agents whose streak counted a write that is not kept.
        let mut recount: HashSet<String> = HashSet::new();
        let mut lost = 0usize;
        for (write, action) in batch {
            if is_result(&write, &action) {
                if keep_results {
                    kept.push((write, action));
                    continue;
                }
                if matches!(action, Action::Finished(_)) && matches!(write, Write::Update(..)) {
                    lost += 1;
                }
            }
            if let (Write::Claim(key, rec) | Write::Update(key, rec), false) =
                (&write, matches!(action, Action::Bookkeeping))
                && streak::effect(rec.status()) != streak::Effect::Neutral
            {
                recount.insert(key.agent_id.clone());
            }
            if let Write::Claim(key, _) | Write::Update(key, _) = &write {
                self.drop_in_flight(key);
            }
            if let Write::Cursor(id, _) = &write
                && let Some(state) = self.agents.get_mut(id)
            {
                // Re-fire from the old position: due() sorts it out.
                if let Some(t) = state.next_ms.take() {
                    self.queue.remove(&(t, id.clone()));
                }
                state.next_ms = Some(now + 1000);
                self.queue.insert((now + 1000, id.clone()));
            }
            match action {
                Action::Manual(reply, _) => {
                    let _ = reply.send(Err(HeartbeatError::CommitFailed));
                }
                Action::Redelivered(_, Some((reply, _))) => {
                    let _ = reply.send(Err(HeartbeatError::CommitFailed));
                }
                _ => {}
            }
        }
        if lost > 0 {
            tracing::warn!(
                runs = lost,
                "heartbeat results not stored (the commit failed); those runs are recorded failed (interrupted) at the next start"
            );
        }
        if !kept.is_empty() {
            let dropped = self.pending.keep(kept, now);
            if !dropped.is_empty() {
                tracing::warn!(
                    dropped = dropped.len(),
                    waiting = self.pending.len(),
                    max = MAX_PENDING_RESULTS,
                    "too many heartbeat results wait for space; dropped the oldest (those runs are recorded failed at the next start)"
                );
                metrics_rs::counter!(RESULTS_DROPPED_TOTAL).increment(dropped.len() as u64);
                recount.extend(dropped.into_iter().map(|r| r.key.agent_id));
            }
        }
        // Streaks counted runs that are not durable and not kept: derive
        // them again.
        if keep_results {
            self.streaks.retain(|agent, _| !recount.contains(agent));
        } else {
            self.streaks.clear();
        }
    }

    /// Metrics of a committed write.
    pub(super) fn account(&mut self, write: &Write, claimed: &ClaimOutcome) {
        let (Write::Claim(_, rec) | Write::Update(_, rec)) = write else {
            return;
        };
        if matches!(claimed, ClaimOutcome::Existing(_)) {
            return;
        }
        let status = rec.status();
        if !crate::heartbeat::runs::is_terminal(status) {
            return;
        }
        let run = rec.run.as_ref();
        let agent = run.map(|r| r.agent_id.as_str()).unwrap_or_default();
        if super::status::is_terminal(status) {
            let now = self.now_ms();
            self.terminal_run(agent, now);
        }
        metrics::outcome(
            status,
            run.map(|r| r.skip_reason.as_str()).unwrap_or_default(),
        );
        if status == RunStatus::Undeliverable {
            metrics::undeliverable();
        }
        let healthy = match status {
            RunStatus::Ok
            | RunStatus::Suppressed
            | RunStatus::Delivered
            | RunStatus::Undeliverable => Some(true),
            RunStatus::Failed | RunStatus::Missed | RunStatus::DeadLetter => Some(false),
            _ => None,
        };
        if let Some(healthy) = healthy {
            let n = self.failures.entry(agent.to_string()).or_default();
            *n = if healthy { 0 } else { n.saturating_add(1) };
            metrics::agent_health(agent, healthy, *n);
        }
    }
}

impl Scheduler {
    /// An alert reply: into the outbox when the agent has a webhook
    /// (`delivering`), else `undeliverable`. An alert that ends a failure
    /// streak carries `recovered` (and counts the run, so no separate
    /// event is sent).
    pub(super) fn alert(
        &mut self,
        key: &RunKey,
        rec: &mut RunRecord,
        why: &reply::AlertReason,
        content: &str,
        now: i64,
    ) -> Option<(RunKey, OutboxEntry)> {
        let url = self
            .load_agent(&key.agent_id)
            .map(|a| a.webhook_url)
            .unwrap_or_default();
        let run_id = rec
            .run
            .as_ref()
            .map(|r| r.run_id.clone())
            .unwrap_or_default();
        if url.is_empty() {
            tracing::warn!(agent = %key.agent_id, run_id = %run_id, reason = %why, excerpt = %reply::excerpt(content, 200), "heartbeat alert undeliverable: the agent has no webhook");
            set_status(rec, RunStatus::Undeliverable, "", "", now);
            return None;
        }
        set_status(rec, RunStatus::Delivering, "", "", now);
        let recovered = match self.streak(key).observe(key, RunStatus::Delivering) {
            Some(Transition::Recovered {
                failed_runs,
                since_ms,
            }) => Some((failed_runs, since_ms)),
            _ => None,
        };
        let run = rec.run.clone().unwrap_or_default();
        let entry = OutboxEntry {
            agent_id: key.agent_id.clone(),
            run_id: run.run_id.clone(),
            url,
            body: delivery::alert_body(&run, content, recovered),
            attempts: 0,
            next_attempt_ms: now,
            created_ms: now,
            last_error: String::new(),
            kind: delivery::KIND_ALERT.to_string(),
            dead: false,
        };
        if let Some((failed_runs, _)) = recovered {
            metrics::webhook_event(delivery::KIND_RECOVERED);
            tracing::info!(agent = %key.agent_id, run_id = %run.run_id, failed_runs, "heartbeat recovered (told with the alert)");
        }
        self.batch.push((
            Write::OutboxPut(key.clone(), prost::Message::encode_to_vec(&entry)),
            Action::None,
        ));
        Some((key.clone(), entry))
    }

    /// The agent's streak, derived from the run log (without `key`, the run
    /// being counted) the first time it is needed.
    fn streak(&mut self, key: &RunKey) -> &mut Streak {
        if !self.streaks.contains_key(&key.agent_id) {
            // Most agents' newest runs hold a success: read a few runs, and
            // the deep log only for an agent that has been failing.
            let runs = &self.deps.runs;
            let recent = runs.list_agent(&key.agent_id, SHALLOW).and_then(|r| {
                let success = r.iter().any(|run| {
                    streak::effect(RunStatus::try_from(run.status).unwrap_or_default())
                        == streak::Effect::Success
                });
                if r.len() < SHALLOW || success {
                    Ok(r)
                } else {
                    runs.list_agent(&key.agent_id, streak::LOG_DEPTH + 1)
                }
            });
            let derived = match recent {
                Ok(runs) => Streak::from_log(runs.into_iter().filter_map(|r| {
                    let nominal = r
                        .nominal_time
                        .as_ref()
                        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)?;
                    (nominal != key.nominal_ms).then(|| {
                        (
                            nominal,
                            RunStatus::try_from(r.status).unwrap_or(RunStatus::Unspecified),
                        )
                    })
                })),
                Err(e) => {
                    tracing::error!(agent = %key.agent_id, error = %e, "cannot read the run log for the failure streak");
                    Streak::default()
                }
            };
            self.streaks.insert(key.agent_id.clone(), derived);
        }
        self.streaks.entry(key.agent_id.clone()).or_default()
    }

    /// Counts every run the batch ends in its agent's streak and adds the
    /// `failed` / `recovered` events to the batch (same transaction).
    fn streak_events(&mut self) {
        let mut ends = Vec::new();
        for (write, action) in &self.batch {
            if matches!(action, Action::Bookkeeping) {
                continue;
            }
            let (key, rec, claim) = match write {
                Write::Update(key, rec) => (key, rec, false),
                Write::Claim(key, rec) => (key, rec, true),
                _ => continue,
            };
            let status = rec.status();
            if streak::effect(status) == streak::Effect::Neutral {
                continue;
            }
            ends.push((key.clone(), rec.clone(), claim));
        }
        for (key, rec, claim) in ends {
            let status = rec.status();
            // Only the write that ends a run counts: one from an open state
            // (not, e.g., `delivering` → `delivered`).
            if !claim {
                match self.deps.runs.get(&key) {
                    Ok(Some(prev))
                        if !matches!(
                            prev.status(),
                            RunStatus::Running
                                | RunStatus::Deferred
                                | RunStatus::Dispatched
                                | RunStatus::Unspecified
                        ) =>
                    {
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read a run for its failure streak");
                        continue;
                    }
                }
            }
            let Some(transition) = self.streak(&key).observe(&key, status) else {
                continue;
            };
            let run = rec.run.clone().unwrap_or_default();
            let (kind, body) = match transition {
                Transition::Failed {
                    consecutive_failures,
                } => (
                    delivery::KIND_FAILED,
                    delivery::failed_body(&run, consecutive_failures),
                ),
                Transition::Recovered {
                    failed_runs,
                    since_ms,
                } => (
                    delivery::KIND_RECOVERED,
                    delivery::recovered_body(&run, failed_runs, since_ms),
                ),
            };
            let url = self
                .load_agent(&key.agent_id)
                .map(|a| a.webhook_url)
                .unwrap_or_default();
            if url.is_empty() {
                tracing::info!(agent = %key.agent_id, run_id = %run.run_id, kind, "heartbeat event not sent: the agent has no webhook");
                continue;
            }
            tracing::info!(agent = %key.agent_id, run_id = %run.run_id, kind, "heartbeat event queued for the webhook");
            metrics::webhook_event(kind);
            let now = self.now_ms();
            let entry = OutboxEntry {
                agent_id: key.agent_id.clone(),
                run_id: run.run_id.clone(),
                url,
                body,
                attempts: 0,
                next_attempt_ms: now,
                created_ms: now,
                last_error: String::new(),
                kind: kind.to_string(),
                dead: false,
            };
            self.batch.push((
                Write::OutboxPut(key.clone(), prost::Message::encode_to_vec(&entry)),
                Action::Finished(Some((key, entry))),
            ));
        }
    }

    /// A delivery ended. An alert's run becomes `delivered` / `dead_letter`;
    /// an event's run keeps its status (a `failed` run stays `failed`) and
    /// records the attempts. A dead letter stays in the outbox, marked, for
    /// `RedeliverRuns`.
    pub(super) fn delivered(&mut self, o: DeliveryOutcome) {
        let now = self.now_ms();
        let mut rec = match self.deps.runs.get(&o.key) {
            Ok(Some(r)) => r,
            Ok(None) => RunRecord::default(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read a delivered run");
                return;
            }
        };
        let entry = match self.deps.runs.outbox_get(&o.key) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot read a finished delivery");
                None
            }
        };
        match entry {
            Some(mut entry) if !o.delivered && rec.run.is_some() => {
                entry.dead = true;
                entry.attempts = o.attempts;
                entry.last_error = o.error.clone();
                if entry.kind() != delivery::KIND_ALERT {
                    metrics::event_dead_letter();
                }
                self.batch.push((
                    Write::OutboxPut(o.key.clone(), prost::Message::encode_to_vec(&entry)),
                    Action::None,
                ));
            }
            _ => self
                .batch
                .push((Write::OutboxRemove(o.key.clone()), Action::None)),
        }
        let Some(run) = rec.run.as_mut() else {
            return;
        };
        run.delivery_attempts = o.attempts;
        if run.status == RunStatus::Delivering as i32 {
            let keep_finish = run.finished_at;
            run.status = if o.delivered {
                RunStatus::Delivered as i32
            } else {
                RunStatus::DeadLetter as i32
            };
            run.error = o.error.clone();
            run.finished_at = keep_finish.or(records::timestamp(now));
            self.batch.push((Write::Update(o.key, rec), Action::None));
        } else {
            if o.delivered {
                tracing::info!(agent = %o.key.agent_id, run_id = %run.run_id, attempts = o.attempts, "heartbeat event delivered");
            } else {
                tracing::warn!(agent = %o.key.agent_id, run_id = %run.run_id, attempts = o.attempts, error = %o.error, "heartbeat event dead-lettered");
            }
            self.batch
                .push((Write::Update(o.key, rec), Action::Bookkeeping));
        }
    }

    /// `RedeliverRuns`: each key that still holds a dead letter goes back
    /// in the outbox (same body and key, fresh attempts); an alert's run
    /// goes back to `delivering`. Answered after the commit.
    pub(super) fn redeliver(&mut self, keys: Vec<RunKey>, reply: RedeliverReply) {
        let now = self.now_ms();
        let mut entries = Vec::new();
        for key in keys {
            let entry = match self.deps.runs.outbox_get(&key) {
                Ok(Some(e)) if e.dead => e.redelivered(now),
                Ok(_) => continue,
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
            };
            match self.deps.runs.get(&key) {
                Ok(Some(mut rec)) => {
                    if rec.status() == RunStatus::DeadLetter
                        && let Some(run) = rec.run.as_mut()
                    {
                        run.status = RunStatus::Delivering as i32;
                        run.error.clear();
                        self.batch
                            .push((Write::Update(key.clone(), rec), Action::Bookkeeping));
                    }
                }
                Ok(None) => continue,
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
            }
            entries.push((key, entry));
        }
        let ids: Vec<String> = entries.iter().map(|(_, e)| e.run_id.clone()).collect();
        let n = entries.len();
        if n == 0 {
            let _ = reply.send(Ok(ids));
            return;
        }
        let mut reply = Some((reply, ids));
        for (i, (key, entry)) in entries.into_iter().enumerate() {
            tracing::info!(agent = %key.agent_id, run_id = %entry.run_id, kind = entry.kind(), "heartbeat dead letter put back in the outbox");
            let bytes = prost::Message::encode_to_vec(&entry);
            let answer = if i + 1 == n { reply.take() } else { None };
            self.batch.push((
                Write::OutboxPut(key.clone(), bytes),
                Action::Redelivered(Box::new((key, entry)), answer),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    //! Hearing back through the real scheduler, store and batch machinery,
    //! with a scripted dispatcher and a manual clock.
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicI64, Ordering};

    use parking_lot::Mutex;

    use super::*;
    use crate::catalog::testing;

    const T0: i64 = 1_700_000_040_000;

    struct Clock0(AtomicI64);

    impl Clock for Arc<Clock0> {
        fn now(&self) -> Timestamp {
            ts(self.0.load(Ordering::SeqCst))
        }
    }

    /// Answers runs from a script: `Err` fails the run, `Ok` is the reply.
    struct Script(Mutex<VecDeque<Result<String, String>>>);

    impl Dispatcher for Arc<Script> {
        fn run(
            &self,
            _req: RunRequest,
        ) -> futures::future::BoxFuture<'static, Result<RunReply, String>> {
            let next = self
                .0
                .lock()
                .pop_front()
                .unwrap_or(Ok("HEARTBEAT_OK".into()));
            Box::pin(async move {
                next.map(|content| RunReply {
                    content,
                    model: "gpt-4o".into(),
                    prompt_tokens: 1,
                    completion_tokens: 1,
                    total_tokens: 2,
                })
            })
        }
    }

    struct Rig {
        _dir: tempfile::TempDir,
        store: Arc<dyn crate::store::Store>,
        catalog: Arc<Catalog>,
        clock: Arc<Clock0>,
        script: Arc<Script>,
    }

    async fn rig(webhook: &str, script: &[Result<&str, &str>]) -> Rig {
        let (dir, store, catalog) = testing::store_and_catalog().await;
        let catalog = Arc::new(catalog);
        catalog
            .create_agent(
                &crate::audit::Actor::system(),
                Agent {
                    id: "a1".into(),
                    model: "gpt-4o".into(),
                    interval_seconds: 60,
                    stagger: Some(false),
                    checklist: "- [ ] check the inbox".into(),
                    enabled: true,
                    webhook_url: webhook.into(),
                    ..Default::default()
                },
            )
            .await
            .expect("agent");
        let script = script
            .iter()
            .map(|r| r.map(str::to_string).map_err(str::to_string))
            .collect();
        Rig {
            _dir: dir,
            store,
            catalog,
            clock: Arc::new(Clock0(AtomicI64::new(T0 - 30_000))),
            script: Arc::new(Script(Mutex::new(script))),
        }
    }

    impl Rig {
        fn scheduler(&self) -> (Scheduler, mpsc::UnboundedReceiver<(RunKey, OutboxEntry)>) {
            self.scheduler_on(self.store.clone())
        }

        /// A scheduler whose run log is on `store`.
        fn scheduler_on(
            &self,
            store: Arc<dyn crate::store::Store>,
        ) -> (Scheduler, mpsc::UnboundedReceiver<(RunKey, OutboxEntry)>) {
            let (outbox, rx) = mpsc::unbounded_channel();
            let (s, _h) = Scheduler::new(
                Deps {
                    catalog: self.catalog.clone(),
                    runs: RunStore::new(store),
                    dispatcher: Arc::new(self.script.clone()),
                    activity: Arc::new(AgentActivity::new()),
                    capacity: Arc::new(Capacity::new()),
                    clock: Arc::new(self.clock.clone()),
                    outbox,
                    fleet: Arc::new(NoFleet),
                },
                SchedulerConfig::default(),
            );
            (s, rx)
        }

        fn runs(&self) -> RunStore {
            RunStore::new(self.store.clone())
        }

        /// The slot `n` minutes after T0 fires and its run ends.
        async fn slot(&self, s: &mut Scheduler, n: i64) {
            self.clock.0.store(T0 + n * 60_000 + 5, Ordering::SeqCst);
            s.tick();
            s.flush_batch().await;
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            while let Ok(cmd) = s.rx.try_recv() {
                s.command(cmd);
            }
            s.flush_batch().await;
        }
    }

    fn kinds(rx: &mut mpsc::UnboundedReceiver<(RunKey, OutboxEntry)>) -> Vec<(i64, String)> {
        let mut v = Vec::new();
        while let Ok((k, e)) = rx.try_recv() {
            v.push(((k.nominal_ms - T0) / 60_000, e.kind));
        }
        v
    }

    fn json(e: &OutboxEntry) -> serde_json::Value {
        serde_json::from_slice(&e.body).expect("json body")
    }

    /// The rig's store behind the disk-full guard, with free space the
    /// test sets (a 10 MiB reserve).
    fn guarded(
        r: &Rig,
    ) -> (
        Arc<dyn crate::store::Store>,
        Arc<crate::store::space::SpaceWatch>,
        Arc<std::sync::atomic::AtomicU64>,
    ) {
        use crate::store::space::{GuardedStore, MinFreeSpace, SpaceWatch, Usage};
        const MIB: u64 = 1024 * 1024;
        let free = Arc::new(std::sync::atomic::AtomicU64::new(50 * MIB));
        let probe = free.clone();
        let watch = SpaceWatch::with_probe(
            r._dir.path(),
            MinFreeSpace::Bytes(10 * MIB),
            Box::new(move |_| {
                Ok(Usage {
                    available: probe.load(Ordering::SeqCst),
                    total: 100 * MIB,
                })
            }),
        );
        let store: Arc<dyn crate::store::Store> =
            Arc::new(GuardedStore::new(r.store.clone(), watch.clone()));
        (store, watch, free)
    }

    #[tokio::test]
    async fn a_result_refused_for_space_waits_in_memory_and_commits_once_when_space_returns() {
        let r = rig("http://127.0.0.1:9/hook", &[Ok("The disk is full")]).await;
        let (store, watch, free) = guarded(&r);
        let (mut s, mut rx) = r.scheduler_on(store);
        s.start().await.expect("start");
        // The slot is claimed and sent while there is space.
        r.clock.0.store(T0 + 5, Ordering::SeqCst);
        s.tick();
        s.flush_batch().await;
        // The volume fills before the reply comes back.
        free.store(1024, Ordering::SeqCst);
        assert!(watch.refresh(), "low");
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        while let Ok(cmd) = s.rx.try_recv() {
            s.command(cmd);
        }
        s.flush_batch().await;
        let key = RunKey::new("a1", T0);
        let status = |r: &Rig| {
            r.runs()
                .get(&key)
                .expect("get")
                .and_then(|r| r.run)
                .map(|r| r.status)
        };
        assert_eq!(s.pending.len(), 1, "the result waits");
        assert_eq!(status(&r), Some(RunStatus::Running as i32));
        assert!(kinds(&mut rx).is_empty(), "nothing handed to delivery");
        // Retries on the backoff while still full: still waiting.
        for step in 1..4 {
            r.clock.0.store(T0 + 5 + step * 5_000, Ordering::SeqCst);
            s.flush_batch().await;
            assert_eq!(s.pending.len(), 1);
        }
        assert_eq!(status(&r), Some(RunStatus::Running as i32));
        // Space returns: the next retry commits it, with its alert, once.
        free.store(50 * 1024 * 1024, Ordering::SeqCst);
        assert!(!watch.refresh());
        let retry = s.pending.retry_at().expect("a retry is due");
        assert!(retry <= T0 + 5 + 15_000 + PENDING_RETRY_MAX.as_millis() as i64);
        r.clock.0.store(retry, Ordering::SeqCst);
        s.flush_batch().await;
        assert!(s.pending.is_empty());
        assert_eq!(s.pending.retry_at(), None);
        assert_eq!(status(&r), Some(RunStatus::Delivering as i32));
        assert_eq!(kinds(&mut rx), [(0, "alert".into())]);
        assert_eq!(r.runs().outbox_len().expect("len"), 1);
        s.flush_batch().await;
        assert!(kinds(&mut rx).is_empty(), "handed over once");
        assert!(r.runs().open_runs().expect("open").is_empty());
    }

    #[tokio::test]
    async fn results_still_waiting_at_a_stop_end_interrupted_at_the_next_start() {
        let r = rig("http://127.0.0.1:9/hook", &[Ok("HEARTBEAT_OK")]).await;
        let (store, watch, free) = guarded(&r);
        let key = RunKey::new("a1", T0);
        {
            let (mut s, _rx) = r.scheduler_on(store.clone());
            s.start().await.expect("start");
            r.clock.0.store(T0 + 5, Ordering::SeqCst);
            s.tick();
            s.flush_batch().await;
            free.store(1024, Ordering::SeqCst);
            assert!(watch.refresh(), "low");
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            while let Ok(cmd) = s.rx.try_recv() {
                s.command(cmd);
            }
            s.flush_batch().await;
            assert_eq!(s.pending.len(), 1);
            // Stopping while still full: tried once more, then lost.
            s.flush_at_stop().await;
            assert_eq!(s.pending.len(), 1);
        }
        free.store(50 * 1024 * 1024, Ordering::SeqCst);
        assert!(!watch.refresh());
        let (mut s, _rx) = r.scheduler_on(store);
        s.start().await.expect("restart");
        let run = r
            .runs()
            .get(&key)
            .expect("get")
            .and_then(|r| r.run)
            .expect("the run");
        assert_eq!(
            (run.status, run.error.as_str()),
            (
                RunStatus::Failed as i32,
                "control plane restarted during the run"
            )
        );
    }

    #[tokio::test]
    async fn at_most_the_bound_of_results_wait_and_the_oldest_go_first() {
        let mut p = Pending::default();
        let writes = |from: i64, n: i64| -> Vec<(Write, Action)> {
            (from..from + n)
                .map(|i| {
                    (
                        Write::Update(RunKey::new("a1", i), RunRecord::default()),
                        Action::None,
                    )
                })
                .collect()
        };
        let n = MAX_PENDING_RESULTS as i64;
        assert!(p.keep(writes(0, n - 1), 0).is_empty());
        // Two writes of one run count once.
        assert!(p.keep(writes(n - 2, 1), 0).is_empty());
        assert_eq!(p.len(), MAX_PENDING_RESULTS - 1);
        let dropped = p.keep(writes(n, 3), 0);
        assert_eq!(
            dropped.iter().map(|r| r.key.nominal_ms).collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(p.len(), MAX_PENDING_RESULTS);
        // The backoff grows to its cap and starts again after a commit.
        let waits: Vec<i64> = (0..5)
            .map(|_| {
                p.keep(Vec::new(), 0);
                p.retry_at().unwrap_or_default()
            })
            .collect();
        assert_eq!(waits, [5000; 5], "1 s, 2 s, 4 s, then the cap");
        let all = p.take();
        assert_eq!(all.len(), MAX_PENDING_RESULTS + 1);
        p.committed();
        assert_eq!(p.retry_at(), None);
        p.keep(writes(0, 1), 100);
        assert_eq!(p.retry_at(), Some(1100));
    }

    #[tokio::test]
    async fn a_streak_sends_one_failed_and_one_recovered_event_and_runs_stay_failed() {
        let r = rig(
            "http://127.0.0.1:9/hook",
            &[
                Err("upstream 500"),
                Err("upstream 500"),
                Err("upstream 500"),
                Ok("HEARTBEAT_OK"),
                Ok("HEARTBEAT_OK"),
            ],
        )
        .await;
        let (mut s, mut rx) = r.scheduler();
        s.start().await.expect("start");
        for n in 0..5 {
            r.slot(&mut s, n).await;
        }
        assert_eq!(
            kinds(&mut rx),
            [(0, "failed".into()), (3, "recovered".into())]
        );
        let outbox: Vec<OutboxEntry> = r
            .runs()
            .outbox()
            .expect("outbox")
            .into_iter()
            .map(|(_, raw)| prost::Message::decode(raw.as_slice()).expect("entry"))
            .collect();
        let failed = json(&outbox[0]);
        assert_eq!(failed["kind"], "failed");
        assert_eq!(failed["error"], "upstream 500");
        assert_eq!(failed["consecutive_failures"], 1);
        assert_eq!(failed["run_id"], outbox[0].run_id.as_str());
        let recovered = json(&outbox[1]);
        assert_eq!(
            (
                recovered["kind"].as_str(),
                recovered["failed_runs"].as_u64()
            ),
            (Some("recovered"), Some(3))
        );
        assert_eq!(recovered["since"], failed["slot"]);
        // The event's delivery, even dead-lettered, leaves the run failed.
        let key = RunKey::new("a1", T0);
        s.delivered(DeliveryOutcome {
            key: key.clone(),
            delivered: false,
            attempts: 4,
            error: "webhook answered 503".into(),
        });
        s.flush_batch().await;
        let rec = r.runs().get(&key).expect("get").expect("run");
        let run = rec.run.expect("run");
        assert_eq!(
            (run.status, run.error.as_str(), run.delivery_attempts),
            (RunStatus::Failed as i32, "upstream 500", 4)
        );
        let dead = r.runs().dead_letters(None, 10).expect("dead letters");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].1.kind, "failed");
    }

    #[tokio::test]
    async fn the_streak_survives_a_restart() {
        let r = rig(
            "http://127.0.0.1:9/hook",
            &[Err("boom"), Err("boom"), Ok("HEARTBEAT_OK")],
        )
        .await;
        {
            let (mut s, mut rx) = r.scheduler();
            s.start().await.expect("start");
            r.slot(&mut s, 0).await;
            assert_eq!(kinds(&mut rx), [(0, "failed".into())]);
        }
        let (mut s, mut rx) = r.scheduler();
        r.clock.0.store(T0 + 30_000, Ordering::SeqCst);
        s.start().await.expect("restart");
        r.slot(&mut s, 1).await;
        r.slot(&mut s, 2).await;
        assert_eq!(kinds(&mut rx), [(2, "recovered".into())]);
    }

    #[tokio::test]
    async fn a_long_streak_is_read_back_from_the_deep_log_after_a_restart() {
        let script: Vec<Result<&str, &str>> = (0..20).map(|_| Err("boom")).collect();
        let r = rig("http://127.0.0.1:9/hook", &script).await;
        {
            let (mut s, mut rx) = r.scheduler();
            s.start().await.expect("start");
            for n in 0..19 {
                r.slot(&mut s, n).await;
            }
            assert_eq!(kinds(&mut rx), [(0, "failed".into())]);
        }
        let (mut s, mut rx) = r.scheduler();
        r.clock.0.store(T0 + 19 * 60_000 - 1000, Ordering::SeqCst);
        s.start().await.expect("restart");
        r.slot(&mut s, 19).await;
        r.slot(&mut s, 20).await;
        let sent: Vec<(RunKey, OutboxEntry)> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(sent.len(), 1, "no second failed event, one recovered");
        let body = json(&sent[0].1);
        assert_eq!(
            (body["kind"].as_str(), body["failed_runs"].as_u64()),
            (Some("recovered"), Some(20))
        );
    }

    #[tokio::test]
    async fn an_alert_that_ends_a_streak_is_one_alert_marked_recovered() {
        let r = rig(
            "http://127.0.0.1:9/hook",
            &[Err("boom"), Ok("The disk is full")],
        )
        .await;
        let (mut s, mut rx) = r.scheduler();
        s.start().await.expect("start");
        r.slot(&mut s, 0).await;
        r.slot(&mut s, 1).await;
        let sent: Vec<(RunKey, OutboxEntry)> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(sent.len(), 2, "the failed event and one alert");
        let alert = json(&sent[1].1);
        assert_eq!(alert["kind"], "alert");
        assert_eq!(alert["recovered"], true);
        assert_eq!(alert["failed_runs"], 1);
        assert_eq!(alert["reply"], "The disk is full");
    }

    #[tokio::test]
    async fn no_webhook_means_undeliverable_alerts_and_no_events() {
        let r = rig("", &[Err("boom"), Ok("The disk is full")]).await;
        let (mut s, mut rx) = r.scheduler();
        s.start().await.expect("start");
        r.slot(&mut s, 0).await;
        r.slot(&mut s, 1).await;
        assert!(kinds(&mut rx).is_empty());
        assert_eq!(r.runs().outbox_len().expect("len"), 0);
        let runs = r.runs().list_agent("a1", 10).expect("list");
        assert_eq!(runs[0].status, RunStatus::Undeliverable as i32);
        assert_eq!(runs[1].status, RunStatus::Failed as i32);
    }

    #[tokio::test]
    async fn a_dead_letter_is_kept_redelivered_with_the_same_body_and_pruned_with_its_run() {
        let r = rig("http://127.0.0.1:9/hook", &[Ok("The disk is full")]).await;
        let (mut s, mut rx) = r.scheduler();
        s.start().await.expect("start");
        r.slot(&mut s, 0).await;
        let (key, first) = rx.try_recv().expect("alert queued");
        s.delivered(DeliveryOutcome {
            key: key.clone(),
            delivered: false,
            attempts: 8,
            error: "webhook answered 500".into(),
        });
        s.flush_batch().await;
        let run = |r: &Rig| {
            r.runs()
                .get(&key)
                .expect("get")
                .and_then(|r| r.run)
                .expect("run")
        };
        assert_eq!(run(&r).status, RunStatus::DeadLetter as i32);
        let (reply, answer) = oneshot::channel();
        s.redeliver(vec![key.clone()], reply);
        s.flush_batch().await;
        assert_eq!(
            answer.await.expect("answer").expect("ok"),
            vec![first.run_id.clone()]
        );
        let (_, again) = rx.try_recv().expect("requeued");
        assert_eq!(
            (&again.body, again.attempts, again.dead),
            (&first.body, 0, false)
        );
        assert_eq!(run(&r).status, RunStatus::Delivering as i32);
        // Not a dead letter any more: a second redelivery does nothing.
        let (reply, answer) = oneshot::channel();
        s.redeliver(vec![key.clone()], reply);
        assert!(answer.await.expect("answer").expect("ok").is_empty());
        s.delivered(DeliveryOutcome {
            key: key.clone(),
            delivered: true,
            attempts: 1,
            error: String::new(),
        });
        s.flush_batch().await;
        assert_eq!(run(&r).status, RunStatus::Delivered as i32);
        assert_eq!(r.runs().outbox_len().expect("len"), 0);

        // A dead letter goes with its run (retention).
        let dead = OutboxEntry {
            dead: true,
            ..again.clone()
        };
        r.runs()
            .commit(&[Write::OutboxPut(
                key.clone(),
                prost::Message::encode_to_vec(&dead),
            )])
            .await
            .expect("dead letter");
        assert_eq!(
            r.runs().dead_letters(Some("a1"), 10).expect("dead").len(),
            1
        );
        r.runs()
            .commit(&[Write::Prune(key.clone())])
            .await
            .expect("prune");
        assert_eq!(r.runs().outbox_len().expect("len"), 0);
    }
}

//! The heartbeat scheduler: one task that owns every agent's cadence and is
//! the single writer of the run log.
//!
//! **Timer.** Agents wait in a `BTreeSet<(next fire ms, agent)>`; the task
//! sleeps until the earliest entry, a command, or a configuration change
//! (the catalog's version watch). A wake-up touches only the agents that
//! are due, never all of them, so 100,000 agents cost memory, not CPU.
//!
//! **Claim before side effects.** Everything one wake-up decides (claims,
//! cursor moves, status changes, outbox entries) is one [`RunStore::commit`]:
//! a single transaction and a single flush, *before* any run is sent,
//! webhook posted or caller answered. A slot's run record is keyed by agent
//! and nominal time and a claim of an existing key is a no-op, so a slot
//! runs at most once, whatever restarts, manual triggers or reloads happen.
//!
//! **Cursor.** Each agent's next fire time is persisted with a fingerprint
//! of its schedule fields. After a restart an unchanged agent resumes from
//! its cursor through [`slots::due`]: at most one late slot (inside the
//! catch-up window) runs, older ones are recorded `missed`. A created,
//! re-enabled or rescheduled agent starts from the next slot after now.
//!
//! **Per slot**, in order: a run still in flight for the agent →
//! `skipped(in_flight)`; an effectively empty checklist →
//! `skipped(empty_checklist)`; interactive traffic within the busy window →
//! `deferred`, retried (every `min(60 s, interval/2)`) until the deferral
//! cap, then `skipped(busy)`; every backend of the model cooling → the
//! same with `no_capacity`; else the run. A deferred slot keeps its one
//! record; when the next slot comes due first, the deferred one ends
//! `skipped` with its reason.
//!
//! **Restart.** Runs found `running` at startup are finished `failed`
//! ("control plane restarted during the run") at once: the request died
//! with the process, and retrying could call the model twice for one slot.
//! Deferred slots resume their deferral (or are skipped when its cap has
//! passed). Deliveries resume from the outbox.
//!
//! **Manual runs** bypass active hours and deferral (a busy agent or a
//! model without capacity is `skipped` at once), are keyed at the current
//! millisecond with trigger `manual`, and merge with a run in flight.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use claw_proto::v1::{Agent, HeartbeatRun, RunStatus, RunTrigger};
use claw_proto::validate;
use jiff::Timestamp;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use super::delivery::{self, DeliveryOutcome, OutboxEntry};
use super::dispatch::{self, Dispatcher, RunReply, RunRequest};
use super::runs::{ClaimOutcome, Cursor, RunKey, RunRecord, RunStore, RunStoreError, Write};
use super::{checklist, metrics, reply, slots};
use crate::catalog::records;
use crate::catalog::{Catalog, CatalogError};
use crate::fleet::activity::{AgentActivity, Capacity};
use crate::shutdown::Shutdown;

/// Longest reply excerpt kept in a run record, in characters.
pub const EXCERPT_CHARS: usize = 500;
/// Most claims one wake-up commits (bounds a transaction after downtime).
const MAX_BATCH: usize = 5000;
/// Retention pruning deletes at most this many runs per wake-up.
const PRUNE_CHUNK: usize = 1000;
/// Longest retry step of a deferred slot.
const MAX_RETRY_STEP: Duration = Duration::from_secs(60);

/// Settings of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Runs older than this (by nominal time) are pruned.
    pub retention: Duration,
    /// How often pruning runs.
    pub prune_every: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            retention: Duration::from_secs(30 * 24 * 3600),
            prune_every: Duration::from_secs(3600),
        }
    }
}

/// The wall clock the scheduler reads (injected in tests).
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Why a heartbeat request failed.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The agent does not exist (any more).
    #[error("agent {0:?} not found")]
    NotFound(String),
    /// The scheduler is not running (shutting down).
    #[error("the heartbeat scheduler is not running")]
    Unavailable,
    /// The run log failed.
    #[error("heartbeat store: {0}")]
    Store(#[from] RunStoreError),
    /// Reading the agents from the catalog failed.
    #[error("heartbeat store: {0}")]
    Catalog(#[from] CatalogError),
    /// The batch holding this request's write did not commit (the commit's
    /// own error is logged where it failed).
    #[error("heartbeat store: commit failed")]
    CommitFailed,
}

/// The answer to a manual run.
#[derive(Debug)]
pub struct ManualRun {
    /// The run as claimed (or as found in flight).
    pub run: HeartbeatRun,
    /// True when an in-flight run was returned instead of a new one.
    pub merged: bool,
    /// Turns `Some` when the run's LLM part is over (terminal or delivering).
    pub done: watch::Receiver<Option<HeartbeatRun>>,
}

enum Command {
    RunNow {
        agent_id: String,
        reply: oneshot::Sender<Result<ManualRun, HeartbeatError>>,
    },
    Finished {
        key: RunKey,
        result: Result<RunReply, String>,
    },
}

/// Talks to a running scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl SchedulerHandle {
    /// Fires `agent_id`'s heartbeat now (see the module doc).
    pub async fn run_now(&self, agent_id: &str) -> Result<ManualRun, HeartbeatError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::RunNow {
                agent_id: agent_id.to_string(),
                reply,
            })
            .map_err(|_| HeartbeatError::Unavailable)?;
        rx.await.map_err(|_| HeartbeatError::Unavailable)?
    }
}

/// What the scheduler needs from the rest of the control plane.
pub struct Deps {
    /// Agents and their configuration version.
    pub catalog: Arc<Catalog>,
    /// The run log.
    pub runs: RunStore,
    /// Sends runs.
    pub dispatcher: Arc<dyn Dispatcher>,
    /// Interactive traffic per agent.
    pub activity: Arc<AgentActivity>,
    /// Cooling backends per model.
    pub capacity: Arc<Capacity>,
    /// The wall clock.
    pub clock: Arc<dyn Clock>,
    /// Where new outbox entries go (the delivery worker).
    pub outbox: mpsc::UnboundedSender<(RunKey, OutboxEntry)>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps").finish_non_exhaustive()
    }
}

/// Builds an agent's [`slots::Schedule`] from its configuration.
pub fn schedule_of(a: &Agent) -> Result<slots::Schedule, String> {
    let window =
        validate::active_hours("active_hours", &a.active_hours).map_err(|e| e.to_string())?;
    let tz = validate::timezone("timezone", &a.timezone).map_err(|e| e.to_string())?;
    slots::Schedule::new(
        &a.id,
        Duration::from_secs(a.interval_seconds),
        window,
        tz,
        a.stagger.unwrap_or(true),
    )
    .map_err(|e| e.to_string())
}

/// A stable fingerprint of the fields the cursor depends on.
fn fingerprint(a: &Agent) -> u64 {
    let text = format!(
        "{}|{}|{}|{}|{}",
        a.interval_seconds,
        a.active_hours,
        a.timezone,
        a.stagger.unwrap_or(true),
        a.enabled
    );
    let d = Sha256::digest(text.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&d[..8]);
    u64::from_be_bytes(head)
}

/// What the scheduler keeps per enabled agent.
struct AgentState {
    schedule: slots::Schedule,
    fingerprint: u64,
    catch_up: Duration,
    busy_window: Duration,
    defer_max: Duration,
    retry_step: Duration,
    /// The queued fire time, if any.
    next_ms: Option<i64>,
}

impl AgentState {
    fn new(a: &Agent) -> Result<Self, String> {
        let interval = Duration::from_secs(a.interval_seconds.max(1));
        Ok(AgentState {
            schedule: schedule_of(a)?,
            fingerprint: fingerprint(a),
            catch_up: Duration::from_secs(validate::effective_catch_up_seconds(a)),
            busy_window: Duration::from_secs(validate::effective_busy_window_seconds(a)),
            defer_max: Duration::from_secs(validate::effective_busy_defer_max_seconds(a)),
            retry_step: (interval / 2).clamp(Duration::from_secs(1), MAX_RETRY_STEP),
            next_ms: None,
        })
    }
}

/// A slot waiting for the agent's conversation to end or for capacity.
struct Deferred {
    key: RunKey,
    record: RunRecord,
    retry_at_ms: i64,
}

/// A run whose LLM call is under way.
struct InFlight {
    key: RunKey,
    record: RunRecord,
    done: watch::Sender<Option<HeartbeatRun>>,
}

/// What to do once a write is durable.
enum Action {
    None,
    /// Send the run (and register it in flight).
    Dispatch(RunRequest),
    /// Answer a manual trigger.
    Manual(
        oneshot::Sender<Result<ManualRun, HeartbeatError>>,
        Option<RunRequest>,
    ),
    /// The LLM part is over: wake waiters, hand an alert to the outbox.
    Finished(Option<(RunKey, OutboxEntry)>),
}

/// The outcome of the per-slot checks.
enum Decision {
    Run,
    Skip(&'static str),
    Defer(&'static str),
}

/// The scheduler task's state.
pub struct Scheduler {
    deps: Deps,
    config: SchedulerConfig,
    agents: HashMap<String, AgentState>,
    queue: BTreeSet<(i64, String)>,
    retries: BTreeSet<(i64, String)>,
    deferred: HashMap<String, Deferred>,
    in_flight: HashMap<String, InFlight>,
    failures: HashMap<String, u32>,
    batch: Vec<(Write, Action)>,
    /// Runs whose LLM part ended in this batch: woken after the commit.
    waiters: Vec<(watch::Sender<Option<HeartbeatRun>>, Option<HeartbeatRun>)>,
    tx: mpsc::UnboundedSender<Command>,
    rx: mpsc::UnboundedReceiver<Command>,
    next_prune_ms: i64,
    pruning: bool,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("agents", &self.agents.len())
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

fn ms(t: Timestamp) -> i64 {
    t.as_millisecond()
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn new_run_id() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    format!("hbr_{}", hex::encode(b))
}

fn run_record(key: &RunKey, trigger: RunTrigger, status: RunStatus, now_ms: i64) -> RunRecord {
    RunRecord {
        run: Some(HeartbeatRun {
            run_id: new_run_id(),
            agent_id: key.agent_id.clone(),
            nominal_time: records::timestamp(key.nominal_ms),
            trigger: trigger as i32,
            status: status as i32,
            started_at: records::timestamp(now_ms),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Sets a record's status (and ends it when terminal).
fn set_status(rec: &mut RunRecord, status: RunStatus, skip_reason: &str, error: &str, now_ms: i64) {
    let run = rec.run.get_or_insert_with(HeartbeatRun::default);
    run.status = status as i32;
    run.skip_reason = skip_reason.to_string();
    run.error = error.to_string();
    if super::runs::is_terminal(status) || status == RunStatus::Delivering {
        run.finished_at = records::timestamp(now_ms);
        let started = run
            .started_at
            .as_ref()
            .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
            .unwrap_or(now_ms);
        run.duration_ms = (now_ms - started).max(0) as u64;
    }
}

impl Scheduler {
    /// A scheduler over `deps`; start it with [`Scheduler::run`].
    pub fn new(deps: Deps, config: SchedulerConfig) -> (Scheduler, SchedulerHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = SchedulerHandle { tx: tx.clone() };
        (
            Scheduler {
                deps,
                config,
                agents: HashMap::new(),
                queue: BTreeSet::new(),
                retries: BTreeSet::new(),
                deferred: HashMap::new(),
                in_flight: HashMap::new(),
                failures: HashMap::new(),
                batch: Vec::new(),
                waiters: Vec::new(),
                tx,
                rx,
                next_prune_ms: 0,
                pruning: false,
            },
            handle,
        )
    }

    fn now_ms(&self) -> i64 {
        ms(self.deps.clock.now())
    }

    /// Runs until `stop`: recovers, loads every agent, then serves the
    /// timer, commands, delivery outcomes and configuration changes.
    pub async fn run(
        mut self,
        mut deliveries: mpsc::UnboundedReceiver<DeliveryOutcome>,
        mut stop: Shutdown,
    ) {
        let mut versions = self.deps.catalog.subscribe();
        versions.mark_unchanged();
        if let Err(e) = self.start().await {
            tracing::error!(error = %e, "heartbeat scheduler cannot start");
            return;
        }
        loop {
            let wake = self.wake_in();
            let mut reload = false;
            tokio::select! {
                () = tokio::time::sleep(wake) => {}
                cmd = self.rx.recv() => {
                    if let Some(cmd) = cmd {
                        self.command(cmd);
                    }
                    while let Ok(cmd) = self.rx.try_recv() {
                        self.command(cmd);
                    }
                }
                Some(outcome) = deliveries.recv() => {
                    self.delivered(outcome);
                    while let Ok(o) = deliveries.try_recv() {
                        self.delivered(o);
                    }
                }
                changed = versions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    reload = true;
                }
                () = stop.stopped() => {
                    self.flush_batch().await;
                    return;
                }
            }
            if reload && let Err(e) = self.sync_agents(None) {
                tracing::error!(error = %e, "heartbeat scheduler cannot reload agents");
            }
            self.tick();
            self.prune_step();
            self.flush_batch().await;
        }
    }

    /// How long to sleep: until the earliest fire, retry or prune.
    fn wake_in(&self) -> Duration {
        let now = self.now_ms();
        let mut at = self.next_prune_ms;
        if self.pruning {
            at = now;
        }
        if let Some((t, _)) = self.queue.first() {
            at = at.min(*t);
        }
        if let Some((t, _)) = self.retries.first() {
            at = at.min(*t);
        }
        Duration::from_millis((at - now).clamp(0, 3_600_000) as u64)
    }

    /// Startup: finish what a previous process left open, load agents.
    async fn start(&mut self) -> Result<(), HeartbeatError> {
        let now = self.now_ms();
        let open = self.deps.runs.open_runs()?;
        for (key, mut rec) in open {
            match rec.status() {
                RunStatus::Deferred => {
                    let retry_at_ms = now.min(rec.defer_until_ms);
                    self.retries.insert((retry_at_ms, key.agent_id.clone()));
                    self.deferred.insert(
                        key.agent_id.clone(),
                        Deferred {
                            key,
                            record: rec,
                            retry_at_ms,
                        },
                    );
                }
                _ => {
                    tracing::warn!(agent = %key.agent_id, nominal_ms = key.nominal_ms, "heartbeat run interrupted by a restart; recording it failed");
                    set_status(
                        &mut rec,
                        RunStatus::Failed,
                        "",
                        "control plane restarted during the run",
                        now,
                    );
                    self.batch.push((Write::Update(key, rec), Action::None));
                }
            }
        }
        let cursors: HashMap<String, Cursor> = self.deps.runs.cursors()?.into_iter().collect();
        self.sync_agents(Some(cursors))?;
        self.next_prune_ms = now;
        self.flush_batch().await;
        tracing::info!(
            agents = self.agents.len(),
            queued = self.queue.len(),
            "heartbeat scheduler started"
        );
        Ok(())
    }

    /// Brings the in-memory agents in line with the catalog. `stored`
    /// holds the persisted cursors at startup (`None` on reloads, when the
    /// in-memory state is the reference).
    fn sync_agents(&mut self, stored: Option<HashMap<String, Cursor>>) -> Result<(), CatalogError> {
        let now = self.deps.clock.now();
        let records = self.deps.catalog.agent_records()?;
        self.refresh_capacity();
        let mut seen = std::collections::HashSet::with_capacity(records.len());
        for rec in records {
            let Some(a) = rec.spec else { continue };
            seen.insert(a.id.clone());
            let fp = fingerprint(&a);
            let known = match &stored {
                Some(cursors) => cursors.get(&a.id).copied(),
                None => self.agents.get(&a.id).map(|s| Cursor {
                    next_ms: s.next_ms.unwrap_or(0),
                    fingerprint: s.fingerprint,
                }),
            };
            if !a.enabled {
                self.unqueue(&a.id);
                self.agents.remove(&a.id);
                if known.is_none_or(|c| c.fingerprint != fp) {
                    let c = Cursor {
                        next_ms: 0,
                        fingerprint: fp,
                    };
                    self.batch
                        .push((Write::Cursor(a.id.clone(), c), Action::None));
                }
                continue;
            }
            let mut state = match AgentState::new(&a) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(agent = %a.id, error = %e, "agent has an unusable schedule; not scheduled");
                    continue;
                }
            };
            let next_ms = match known {
                Some(c) if c.fingerprint == fp => (c.next_ms != 0).then_some(c.next_ms),
                _ => {
                    let next = state.schedule.next_slot_after(now).map(ms);
                    let c = Cursor {
                        next_ms: next.unwrap_or(0),
                        fingerprint: fp,
                    };
                    self.batch
                        .push((Write::Cursor(a.id.clone(), c), Action::None));
                    next
                }
            };
            self.unqueue(&a.id);
            state.next_ms = next_ms;
            if let Some(t) = next_ms {
                self.queue.insert((t, a.id.clone()));
            }
            self.agents.insert(a.id, state);
        }
        let gone: Vec<String> = match &stored {
            Some(cursors) => cursors
                .keys()
                .filter(|id| !seen.contains(*id))
                .cloned()
                .collect(),
            None => self
                .agents
                .keys()
                .filter(|id| !seen.contains(*id))
                .cloned()
                .collect(),
        };
        for id in gone {
            self.unqueue(&id);
            self.agents.remove(&id);
            self.batch.push((Write::DropCursor(id), Action::None));
        }
        Ok(())
    }

    fn unqueue(&mut self, id: &str) {
        if let Some(state) = self.agents.get_mut(id)
            && let Some(t) = state.next_ms.take()
        {
            self.queue.remove(&(t, id.to_string()));
        }
    }

    /// Rebuilds the model → backends map from the configuration.
    fn refresh_capacity(&self) {
        let Ok(backends) = self.deps.catalog.backend_records() else {
            return;
        };
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for b in backends.into_iter().filter_map(|r| r.spec) {
            if !b.enabled {
                continue;
            }
            for m in &b.models {
                map.entry(m.canonical.clone())
                    .or_default()
                    .push(b.id.clone());
            }
        }
        self.deps.capacity.set_model_backends(map);
    }

    /// Fires every due slot and retry, up to [`MAX_BATCH`] writes.
    fn tick(&mut self) {
        let now = self.now_ms();
        while self.batch.len() < MAX_BATCH {
            let Some((t, _)) = self.queue.first() else {
                break;
            };
            if *t > now {
                break;
            }
            let Some((t, id)) = self.queue.pop_first() else {
                break;
            };
            self.fire_due(&id, t, now);
        }
        while self.batch.len() < MAX_BATCH {
            let Some((t, _)) = self.retries.first() else {
                break;
            };
            if *t > now {
                break;
            }
            let Some((_, id)) = self.retries.pop_first() else {
                break;
            };
            self.retry(&id, now);
        }
    }

    /// The agent's cursor `t` came due.
    fn fire_due(&mut self, id: &str, t: i64, now: i64) {
        let Some(state) = self.agents.get_mut(id) else {
            return;
        };
        state.next_ms = None;
        let due = slots::due(ts(t), ts(now), state.catch_up, &state.schedule);
        let next = due.next.map(ms);
        state.next_ms = next;
        let fp = state.fingerprint;
        if let Some(n) = next {
            self.queue.insert((n, id.to_string()));
        }
        self.batch.push((
            Write::Cursor(
                id.to_string(),
                Cursor {
                    next_ms: next.unwrap_or(0),
                    fingerprint: fp,
                },
            ),
            Action::None,
        ));
        if due.missed_unlisted > 0 {
            tracing::warn!(agent = %id, count = due.missed_unlisted, "heartbeat slots missed during downtime (not listed)");
            for _ in 0..due.missed_unlisted.min(1_000_000) {
                metrics::outcome(RunStatus::Missed, "");
            }
        }
        for slot in &due.missed {
            let key = RunKey::new(id, ms(*slot));
            let mut rec = run_record(&key, RunTrigger::Schedule, RunStatus::Missed, now);
            set_status(&mut rec, RunStatus::Missed, "", "", now);
            self.batch.push((Write::Claim(key, rec), Action::None));
        }
        if !due.missed.is_empty() {
            tracing::warn!(agent = %id, count = due.missed.len(), "heartbeat slots missed during downtime");
        }
        if let Some(slot) = due.run {
            self.fire_slot(id, ms(slot), now);
        }
    }

    /// The per-slot checks (see the module doc).
    fn decide(&self, id: &str, agent: &Agent, state: Option<&AgentState>, now: i64) -> Decision {
        if self.in_flight.contains_key(id) {
            return Decision::Skip("in_flight");
        }
        if checklist::is_effectively_empty(&agent.checklist) {
            return Decision::Skip("empty_checklist");
        }
        let window = state.map(|s| s.busy_window).unwrap_or(Duration::from_secs(
            validate::effective_busy_window_seconds(agent),
        ));
        if self.deps.activity.is_busy(id, ts(now), window) {
            return Decision::Defer("busy");
        }
        if self.deps.capacity.is_model_cooling(&agent.model, ts(now)) {
            return Decision::Defer("no_capacity");
        }
        Decision::Run
    }

    fn load_agent(&self, id: &str) -> Option<Agent> {
        match self.deps.catalog.agent_record(id) {
            Ok(rec) => rec.and_then(|r| r.spec),
            Err(e) => {
                tracing::error!(agent = %id, error = %e, "cannot read agent");
                None
            }
        }
    }

    /// A scheduled slot fires.
    fn fire_slot(&mut self, id: &str, slot_ms: i64, now: i64) {
        // A slot still deferred gives way to the new one.
        if let Some(d) = self.deferred.remove(id) {
            self.retries.remove(&(d.retry_at_ms, id.to_string()));
            let mut rec = d.record;
            let reason = rec.defer_reason.clone();
            set_status(&mut rec, RunStatus::Skipped, &reason, "", now);
            self.batch.push((Write::Update(d.key, rec), Action::None));
        }
        let Some(agent) = self.load_agent(id).filter(|a| a.enabled) else {
            return;
        };
        let key = RunKey::new(id, slot_ms);
        let decision = self.decide(id, &agent, self.agents.get(id), now);
        match decision {
            Decision::Run => {
                self.start_run(key, &agent, RunTrigger::Schedule, now, None);
            }
            Decision::Skip(reason) => {
                let mut rec = run_record(&key, RunTrigger::Schedule, RunStatus::Skipped, now);
                set_status(&mut rec, RunStatus::Skipped, reason, "", now);
                self.batch.push((Write::Claim(key, rec), Action::None));
            }
            Decision::Defer(reason) => {
                let Some(state) = self.agents.get(id) else {
                    return;
                };
                let mut rec = run_record(&key, RunTrigger::Schedule, RunStatus::Deferred, now);
                rec.defer_reason = reason.to_string();
                rec.defer_until_ms = now + state.defer_max.as_millis() as i64;
                let retry_at_ms =
                    (now + state.retry_step.as_millis() as i64).min(rec.defer_until_ms);
                tracing::info!(agent = %id, reason, "heartbeat deferred");
                self.retries.insert((retry_at_ms, id.to_string()));
                self.deferred.insert(
                    id.to_string(),
                    Deferred {
                        key: key.clone(),
                        record: rec.clone(),
                        retry_at_ms,
                    },
                );
                self.batch.push((Write::Claim(key, rec), Action::None));
            }
        }
    }

    /// A deferred slot's retry is due.
    fn retry(&mut self, id: &str, now: i64) {
        let Some(d) = self.deferred.remove(id) else {
            return;
        };
        let Deferred {
            key, mut record, ..
        } = d;
        let agent = self.load_agent(id).filter(|a| a.enabled);
        let Some(agent) = agent else {
            set_status(&mut record, RunStatus::Skipped, "paused", "", now);
            self.batch.push((Write::Update(key, record), Action::None));
            return;
        };
        match self.decide(id, &agent, self.agents.get(id), now) {
            Decision::Run => {
                record.defer_reason.clear();
                record.defer_until_ms = 0;
                self.start_run(key, &agent, RunTrigger::Schedule, now, Some(record));
            }
            Decision::Skip(reason) => {
                set_status(&mut record, RunStatus::Skipped, reason, "", now);
                self.batch.push((Write::Update(key, record), Action::None));
            }
            Decision::Defer(reason) if now >= record.defer_until_ms => {
                tracing::info!(agent = %id, reason, "heartbeat skipped after deferring");
                set_status(&mut record, RunStatus::Skipped, reason, "", now);
                self.batch.push((Write::Update(key, record), Action::None));
            }
            Decision::Defer(reason) => {
                let step = self
                    .agents
                    .get(id)
                    .map(|s| s.retry_step)
                    .unwrap_or(MAX_RETRY_STEP);
                let retry_at_ms = (now + step.as_millis() as i64).min(record.defer_until_ms);
                let write = record.defer_reason != reason;
                record.defer_reason = reason.to_string();
                if write {
                    self.batch
                        .push((Write::Update(key.clone(), record.clone()), Action::None));
                }
                self.retries.insert((retry_at_ms, id.to_string()));
                self.deferred.insert(
                    id.to_string(),
                    Deferred {
                        key,
                        record,
                        retry_at_ms,
                    },
                );
            }
        }
    }

    /// Claims (or moves to running) a run and queues its dispatch.
    fn start_run(
        &mut self,
        key: RunKey,
        agent: &Agent,
        trigger: RunTrigger,
        now: i64,
        deferred: Option<RunRecord>,
    ) -> Option<RunRequest> {
        let timeout = Duration::from_secs(validate::effective_run_timeout_seconds(agent));
        let (write_claim, mut rec) = match deferred {
            Some(mut rec) => {
                if let Some(run) = rec.run.as_mut() {
                    run.started_at = records::timestamp(now);
                }
                (false, rec)
            }
            None => (true, run_record(&key, trigger, RunStatus::Running, now)),
        };
        set_status(&mut rec, RunStatus::Running, "", "", now);
        rec.deadline_ms = now + timeout.as_millis() as i64;
        if let Some(run) = rec.run.as_mut() {
            run.model = agent.model.clone();
        }
        let req = RunRequest {
            agent_id: key.agent_id.clone(),
            run_id: rec
                .run
                .as_ref()
                .map(|r| r.run_id.clone())
                .unwrap_or_default(),
            trigger: if trigger == RunTrigger::Manual {
                "manual"
            } else {
                "schedule"
            },
            model: agent.model.clone(),
            prompt: if agent.prompt.trim().is_empty() {
                dispatch::DEFAULT_PROMPT.to_string()
            } else {
                agent.prompt.clone()
            },
            checklist: agent.checklist.clone(),
            session_key: dispatch::session_key(&key.agent_id, agent.isolated_session, now),
            timeout,
        };
        let (done, _) = watch::channel(None);
        self.in_flight.insert(
            key.agent_id.clone(),
            InFlight {
                key: key.clone(),
                record: rec.clone(),
                done,
            },
        );
        if trigger == RunTrigger::Manual {
            // The caller's reply carries the dispatch.
            self.batch.push((Write::Claim(key, rec), Action::None));
            return Some(req);
        }
        let write = if write_claim {
            Write::Claim(key, rec)
        } else {
            Write::Update(key, rec)
        };
        self.batch.push((write, Action::Dispatch(req)));
        None
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::RunNow { agent_id, reply } => self.run_now(agent_id, reply),
            Command::Finished { key, result } => self.finished(key, result),
        }
    }

    fn run_now(&mut self, id: String, reply: oneshot::Sender<Result<ManualRun, HeartbeatError>>) {
        if let Some(f) = self.in_flight.get(&id) {
            let run = f.record.run.clone().unwrap_or_default();
            let _ = reply.send(Ok(ManualRun {
                run,
                merged: true,
                done: f.done.subscribe(),
            }));
            return;
        }
        let Some(agent) = self.load_agent(&id) else {
            let _ = reply.send(Err(HeartbeatError::NotFound(id)));
            return;
        };
        let now = self.now_ms();
        let key = RunKey::new(&id, now);
        match self.decide(&id, &agent, self.agents.get(&id), now) {
            Decision::Run => {
                let req = self.start_run(key, &agent, RunTrigger::Manual, now, None);
                if let Some((Write::Claim(..), action)) = self.batch.last_mut() {
                    *action = Action::Manual(reply, req);
                }
            }
            Decision::Skip(reason) | Decision::Defer(reason) => {
                let mut rec = run_record(&key, RunTrigger::Manual, RunStatus::Skipped, now);
                set_status(&mut rec, RunStatus::Skipped, reason, "", now);
                self.batch
                    .push((Write::Claim(key, rec), Action::Manual(reply, None)));
            }
        }
    }

    /// A dispatched run came back.
    fn finished(&mut self, key: RunKey, result: Result<RunReply, String>) {
        let Some(f) = self.in_flight.remove(&key.agent_id) else {
            return;
        };
        if f.key != key {
            self.in_flight.insert(key.agent_id.clone(), f);
            return;
        }
        let now = self.now_ms();
        let mut rec = f.record;
        let mut outbox = None;
        match result {
            Err(error) => {
                tracing::warn!(agent = %key.agent_id, error = %error, "heartbeat run failed");
                set_status(&mut rec, RunStatus::Failed, "", &error, now);
            }
            Ok(r) => {
                if let Some(run) = rec.run.as_mut() {
                    run.prompt_tokens = r.prompt_tokens;
                    run.completion_tokens = r.completion_tokens;
                    run.tokens = r.total_tokens;
                    run.reply_excerpt = reply::excerpt(&r.content, EXCERPT_CHARS);
                    if !r.model.is_empty() {
                        run.model = r.model.clone();
                    }
                }
                match reply::classify(&r.content) {
                    reply::ReplyKind::Suppressed => {
                        set_status(&mut rec, RunStatus::Suppressed, "", "", now);
                    }
                    reply::ReplyKind::Alert(why) => {
                        let url = self
                            .load_agent(&key.agent_id)
                            .map(|a| a.webhook_url)
                            .unwrap_or_default();
                        if url.is_empty() {
                            tracing::warn!(agent = %key.agent_id, reason = %why, excerpt = %reply::excerpt(&r.content, 200), "heartbeat alert (no webhook configured)");
                            set_status(&mut rec, RunStatus::Ok, "", "", now);
                        } else {
                            set_status(&mut rec, RunStatus::Delivering, "", "", now);
                            let run = rec.run.clone().unwrap_or_default();
                            let entry = OutboxEntry {
                                agent_id: key.agent_id.clone(),
                                run_id: run.run_id.clone(),
                                url,
                                body: delivery::body(&run, &r.content),
                                attempts: 0,
                                next_attempt_ms: now,
                                created_ms: now,
                                last_error: String::new(),
                            };
                            self.batch.push((
                                Write::OutboxPut(
                                    key.clone(),
                                    prost::Message::encode_to_vec(&entry),
                                ),
                                Action::None,
                            ));
                            outbox = Some((key.clone(), entry));
                        }
                    }
                }
            }
        }
        let run = rec.run.clone();
        self.batch
            .push((Write::Update(key, rec), Action::Finished(outbox)));
        // Waiters are woken after the commit (see flush_batch).
        self.waiters.push((f.done, run));
    }

    /// A delivery ended.
    fn delivered(&mut self, o: DeliveryOutcome) {
        let now = self.now_ms();
        let mut rec = match self.deps.runs.get(&o.key) {
            Ok(Some(r)) => r,
            Ok(None) => RunRecord::default(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read a delivered run");
                return;
            }
        };
        if let Some(run) = rec.run.as_mut() {
            run.delivery_attempts = o.attempts;
            let keep_finish = run.finished_at;
            run.status = if o.delivered {
                RunStatus::Delivered as i32
            } else {
                RunStatus::DeadLetter as i32
            };
            run.error = o.error.clone();
            run.finished_at = keep_finish.or(records::timestamp(now));
        }
        self.batch
            .push((Write::OutboxRemove(o.key.clone()), Action::None));
        if rec.run.is_some() {
            self.batch.push((Write::Update(o.key, rec), Action::None));
        }
    }

    /// Retention: deletes a chunk of old runs per wake-up until done.
    fn prune_step(&mut self) {
        let now = self.now_ms();
        if !self.pruning && now < self.next_prune_ms {
            return;
        }
        let cutoff = now - self.config.retention.as_millis() as i64;
        match self.deps.runs.prunable(cutoff, PRUNE_CHUNK) {
            Ok(keys) => {
                self.pruning = keys.len() == PRUNE_CHUNK;
                if !keys.is_empty() {
                    tracing::info!(runs = keys.len(), "pruning old heartbeat runs");
                }
                for k in keys {
                    self.batch.push((Write::Prune(k), Action::None));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot prune heartbeat runs");
                self.pruning = false;
            }
        }
        if !self.pruning {
            self.next_prune_ms = now + self.config.prune_every.as_millis() as i64;
        }
    }

    /// Commits the batch (one transaction, one flush), then performs its
    /// side effects.
    async fn flush_batch(&mut self) {
        if self.batch.is_empty() && self.waiters.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let writes: Vec<Write> = batch.iter().map(|(w, _)| w.clone()).collect();
        let outcomes = match self.deps.runs.commit(&writes).await {
            Ok(o) => o,
            Err(e) => {
                // Nothing of this batch is durable: release claimed state so
                // that nothing is sent. The slots are retried by the cursor
                // (which did not move either) on the next wake-up.
                tracing::error!(error = %e, "heartbeat store commit failed; retrying");
                self.recover_from_failed_commit(batch);
                return;
            }
        };
        let mut outcomes = outcomes.into_iter();
        let now = self.now_ms();
        for (write, action) in batch {
            let claimed = match &write {
                Write::Claim(..) => outcomes.next().unwrap_or(ClaimOutcome::Claimed),
                _ => ClaimOutcome::Claimed,
            };
            self.account(&write, &claimed);
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
            }
        }
        for (done, run) in std::mem::take(&mut self.waiters) {
            done.send_replace(run);
        }
    }

    fn drop_in_flight(&mut self, key: &RunKey) {
        if self
            .in_flight
            .get(&key.agent_id)
            .is_some_and(|f| &f.key == key)
        {
            self.in_flight.remove(&key.agent_id);
        }
    }

    /// After a failed commit nothing happened: forget in-flight entries of
    /// this batch, answer manual callers with an error, and put the slots
    /// back so the next wake-up tries again.
    fn recover_from_failed_commit(&mut self, batch: Vec<(Write, Action)>) {
        let now = self.now_ms();
        for (write, action) in batch {
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
            if let Action::Manual(reply, _) = action {
                let _ = reply.send(Err(HeartbeatError::CommitFailed));
            }
        }
    }

    /// Metrics of a committed write.
    fn account(&mut self, write: &Write, claimed: &ClaimOutcome) {
        let (Write::Claim(_, rec) | Write::Update(_, rec)) = write else {
            return;
        };
        if matches!(claimed, ClaimOutcome::Existing(_)) {
            return;
        }
        let status = rec.status();
        if !super::runs::is_terminal(status) {
            return;
        }
        let run = rec.run.as_ref();
        let agent = run.map(|r| r.agent_id.as_str()).unwrap_or_default();
        metrics::outcome(
            status,
            run.map(|r| r.skip_reason.as_str()).unwrap_or_default(),
        );
        let healthy = match status {
            RunStatus::Ok | RunStatus::Suppressed | RunStatus::Delivered => Some(true),
            RunStatus::Failed | RunStatus::Missed | RunStatus::DeadLetter => Some(false),
            _ => None,
        };
        if let Some(healthy) = healthy {
            let n = self.failures.entry(agent.to_string()).or_default();
            *n = if healthy { 0 } else { n.saturating_add(1) };
            metrics::agent_health(agent, healthy, *n);
        }
    }

    /// Sends a run; its result comes back as a command.
    fn spawn(&self, key: RunKey, req: RunRequest) {
        let fut = self.deps.dispatcher.run(req);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = fut.await;
            let _ = tx.send(Command::Finished { key, result });
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    use claw_proto::v1::UpdateAgentRequest;

    use super::*;
    use crate::catalog::testing;

    struct ManualClock(AtomicI64);

    impl Clock for Arc<ManualClock> {
        fn now(&self) -> Timestamp {
            ts(self.0.load(Ordering::SeqCst))
        }
    }

    impl ManualClock {
        fn set(&self, ms: i64) {
            self.0.store(ms, Ordering::SeqCst);
        }
    }

    /// Answers every run with `reply`, or hangs while `hang` is set.
    struct Stub {
        calls: AtomicUsize,
        reply: String,
        hang: bool,
    }

    impl Dispatcher for Arc<Stub> {
        fn run(
            &self,
            _req: RunRequest,
        ) -> futures::future::BoxFuture<'static, Result<RunReply, String>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let reply = self.reply.clone();
            let hang = self.hang;
            Box::pin(async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok(RunReply {
                    content: reply,
                    prompt_tokens: 3,
                    completion_tokens: 1,
                    total_tokens: 4,
                    ..Default::default()
                })
            })
        }
    }

    /// Base time: a round minute, so a 60 s unstaggered agent's slots are
    /// at `T0 + k·60 s`.
    const T0: i64 = 1_700_000_040_000;

    struct Rig {
        store: Arc<dyn crate::store::Store>,
        catalog: Arc<Catalog>,
        clock: Arc<ManualClock>,
        stub: Arc<Stub>,
    }

    async fn rig(reply: &str, hang: bool) -> (tempfile::TempDir, Rig) {
        let (dir, store, catalog) = testing::store_and_catalog().await;
        let catalog = Arc::new(catalog);
        catalog
            .create_agent(Agent {
                id: "a1".into(),
                model: "gpt-4o".into(),
                interval_seconds: 60,
                stagger: Some(false),
                checklist: "- [ ] check the inbox".into(),
                enabled: true,
                busy_defer_max_seconds: 120,
                ..Default::default()
            })
            .await
            .expect("agent");
        let rig = Rig {
            store,
            catalog,
            clock: Arc::new(ManualClock(AtomicI64::new(T0 - 30_000))),
            stub: Arc::new(Stub {
                calls: AtomicUsize::new(0),
                reply: reply.into(),
                hang,
            }),
        };
        (dir, rig)
    }

    impl Rig {
        fn scheduler(&self) -> (Scheduler, SchedulerHandle, Arc<AgentActivity>) {
            let activity = Arc::new(AgentActivity::new());
            let (outbox, _) = mpsc::unbounded_channel();
            let (s, h) = Scheduler::new(
                Deps {
                    catalog: self.catalog.clone(),
                    runs: RunStore::new(self.store.clone()),
                    dispatcher: Arc::new(self.stub.clone()),
                    activity: activity.clone(),
                    capacity: Arc::new(Capacity::new()),
                    clock: Arc::new(self.clock.clone()),
                    outbox,
                },
                SchedulerConfig::default(),
            );
            (s, h, activity)
        }

        fn runs(&self) -> Vec<HeartbeatRun> {
            RunStore::new(self.store.clone())
                .list_agent("a1", 1000)
                .expect("list")
        }
    }

    /// One wake-up at `now`, then the results of spawned runs.
    async fn step(s: &mut Scheduler, clock: &ManualClock, now: i64) {
        clock.set(now);
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

    fn statuses(runs: &[HeartbeatRun]) -> Vec<(i64, String, String)> {
        let mut v: Vec<_> = runs
            .iter()
            .map(|r| {
                (
                    r.nominal_time
                        .as_ref()
                        .map(|t| t.seconds * 1000)
                        .unwrap_or(0)
                        - T0,
                    metrics::status_name(RunStatus::try_from(r.status).unwrap_or_default()),
                    r.skip_reason.clone(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn slots_fire_once_and_suppress_ok_replies() {
        let (_d, r) = rig("HEARTBEAT_OK", false).await;
        let (mut s, _h, _) = r.scheduler();
        s.start().await.expect("start");
        step(&mut s, &r.clock, T0 - 1).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 0, "nothing due yet");
        step(&mut s, &r.clock, T0 + 5).await;
        step(&mut s, &r.clock, T0 + 10).await;
        step(&mut s, &r.clock, T0 + 60_010).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 2);
        let runs = r.runs();
        assert_eq!(
            statuses(&runs),
            [
                (0, "suppressed".into(), "".into()),
                (60_000, "suppressed".into(), "".into())
            ]
        );
        assert_eq!(
            (runs[0].tokens, runs[0].trigger),
            (4, RunTrigger::Schedule as i32)
        );
    }

    #[tokio::test]
    async fn a_restart_finishes_the_dangling_run_and_never_reruns_its_slot() {
        let (_d, r) = rig("HEARTBEAT_OK", true).await;
        {
            let (mut s, _h, _) = r.scheduler();
            s.start().await.expect("start");
            step(&mut s, &r.clock, T0 + 5).await;
            assert_eq!(r.stub.calls.load(Ordering::SeqCst), 1);
            // "kill -9": the scheduler is dropped with the run in flight.
        }
        assert_eq!(statuses(&r.runs()), [(0, "running".into(), "".into())]);
        let (mut s, _h, _) = r.scheduler();
        r.clock.set(T0 + 20_000);
        s.start().await.expect("restart");
        step(&mut s, &r.clock, T0 + 20_000).await;
        let runs = r.runs();
        assert_eq!(statuses(&runs), [(0, "failed".into(), "".into())]);
        assert_eq!(runs[0].error, "control plane restarted during the run");
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 1, "slot 0 not re-run");
        // The cadence resumes at the next slot.
        step(&mut s, &r.clock, T0 + 60_001).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn downtime_runs_one_late_slot_and_records_the_rest_missed() {
        let (_d, r) = rig("HEARTBEAT_OK", false).await;
        {
            let (mut s, _h, _) = r.scheduler();
            s.start().await.expect("start");
        }
        // Down from T0-30s until T0+200s: slots 0, 60, 120, 180 came due;
        // the catch-up window is one interval, so only 180 runs.
        r.clock.set(T0 + 200_000);
        let (mut s, _h, _) = r.scheduler();
        s.start().await.expect("restart");
        step(&mut s, &r.clock, T0 + 200_000).await;
        assert_eq!(
            statuses(&r.runs()),
            [
                (0, "missed".into(), "".into()),
                (60_000, "missed".into(), "".into()),
                (120_000, "missed".into(), "".into()),
                (180_000, "suppressed".into(), "".into()),
            ]
        );
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_busy_agent_is_deferred_then_skipped_with_one_record_and_no_call() {
        let (_d, r) = rig("HEARTBEAT_OK", false).await;
        let (mut s, _h, activity) = r.scheduler();
        s.start().await.expect("start");
        activity.record("a1", ts(T0));
        step(&mut s, &r.clock, T0 + 5).await;
        assert_eq!(statuses(&r.runs()), [(0, "deferred".into(), "".into())]);
        // Conversation goes on; retries every 30 s (interval / 2) until the
        // 120 s cap; the next slot (60 s) supersedes the deferred one.
        for t in [30_005, 45_000] {
            activity.record("a1", ts(T0 + t));
            step(&mut s, &r.clock, T0 + t).await;
        }
        step(&mut s, &r.clock, T0 + 60_000).await;
        let runs = r.runs();
        assert_eq!(
            statuses(&runs),
            [
                (0, "skipped".into(), "busy".into()),
                (60_000, "deferred".into(), "".into())
            ]
        );
        // Still busy at the cap (60 s + 120 s): skipped(busy).
        for t in [90_000, 120_000, 150_000, 180_000] {
            activity.record("a1", ts(T0 + t - 1000));
            step(&mut s, &r.clock, T0 + t).await;
        }
        // (slot 120 s and 180 s superseded in turn)
        assert!(
            statuses(&r.runs())
                .iter()
                .all(|(_, st, why)| st == "deferred" || (st == "skipped" && why == "busy")),
            "{:?}",
            statuses(&r.runs())
        );
        assert_eq!(
            r.stub.calls.load(Ordering::SeqCst),
            0,
            "never sent while busy"
        );
        // The conversation ends: the deferred slot runs on its next retry.
        step(&mut s, &r.clock, T0 + 400_000).await;
        assert!(r.stub.calls.load(Ordering::SeqCst) >= 1);
    }

    #[tokio::test]
    async fn deferral_gives_up_at_the_cap() {
        let (_d, r) = rig("HEARTBEAT_OK", false).await;
        r.catalog
            .update_agent(UpdateAgentRequest {
                agent: "a1".into(),
                interval_seconds: Some(3600),
                busy_defer_max_seconds: Some(90),
                ..Default::default()
            })
            .await
            .expect("update");
        let (mut s, _h, activity) = r.scheduler();
        s.start().await.expect("start");
        let first = s.agents["a1"].next_ms.expect("queued");
        activity.record("a1", ts(first));
        step(&mut s, &r.clock, first).await;
        for dt in [60_000, 90_000] {
            activity.record("a1", ts(first + dt));
            step(&mut s, &r.clock, first + dt).await;
        }
        let runs = r.runs();
        assert_eq!(runs.len(), 1, "one record per slot");
        assert_eq!(
            (runs[0].status, runs[0].skip_reason.as_str()),
            (RunStatus::Skipped as i32, "busy")
        );
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_empty_checklist_is_skipped_without_a_call() {
        let (_d, r) = rig("HEARTBEAT_OK", false).await;
        r.catalog
            .set_agent_checklist("a1", "# HEARTBEAT\n\n- [ ]\n")
            .await
            .expect("checklist");
        let (mut s, _h, _) = r.scheduler();
        s.start().await.expect("start");
        step(&mut s, &r.clock, T0 + 5).await;
        assert_eq!(
            statuses(&r.runs()),
            [(0, "skipped".into(), "empty_checklist".into())]
        );
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_manual_run_merges_with_the_run_in_flight() {
        let (_d, r) = rig("HEARTBEAT_OK", true).await;
        let (mut s, h, _) = r.scheduler();
        s.start().await.expect("start");
        r.clock.set(T0 - 20_000);
        let first = tokio::spawn({
            let h = h.clone();
            async move { h.run_now("a1").await }
        });
        tokio::task::yield_now().await;
        let cmd = s.rx.recv().await.expect("command");
        s.command(cmd);
        s.flush_batch().await;
        let first = first.await.expect("join").expect("first");
        assert!(!first.merged);
        assert_eq!(first.run.trigger, RunTrigger::Manual as i32);
        let second = tokio::spawn({
            let h = h.clone();
            async move { h.run_now("a1").await }
        });
        tokio::task::yield_now().await;
        let cmd = s.rx.recv().await.expect("command");
        s.command(cmd);
        s.flush_batch().await;
        let second = second.await.expect("join").expect("second");
        assert!(second.merged);
        assert_eq!(second.run.run_id, first.run.run_id);
        assert_eq!(r.runs().len(), 1);
        // The scheduled slot while the manual run hangs: skipped(in_flight).
        step(&mut s, &r.clock, T0 + 5).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 1);
        assert!(statuses(&r.runs()).contains(&(0, "skipped".into(), "in_flight".into())));
    }

    #[tokio::test]
    async fn alerts_without_a_webhook_are_ok_and_with_one_go_to_the_outbox() {
        let (_d, r) = rig("The disk is full", false).await;
        let (mut s, _h, _) = r.scheduler();
        s.start().await.expect("start");
        step(&mut s, &r.clock, T0 + 5).await;
        assert_eq!(statuses(&r.runs()), [(0, "ok".into(), "".into())]);
        r.catalog
            .update_agent(UpdateAgentRequest {
                agent: "a1".into(),
                webhook_url: Some("http://127.0.0.1:9/hook".into()),
                ..Default::default()
            })
            .await
            .expect("webhook");
        s.sync_agents(None).expect("reload");
        step(&mut s, &r.clock, T0 + 60_005).await;
        let runs = r.runs();
        assert_eq!(runs[0].status, RunStatus::Delivering as i32);
        let store = RunStore::new(r.store.clone());
        let outbox = store.outbox().expect("outbox");
        assert_eq!(outbox.len(), 1);
        // The worker reports the end; the run and the outbox move together.
        s.delivered(DeliveryOutcome {
            key: outbox[0].0.clone(),
            delivered: true,
            attempts: 3,
            error: String::new(),
        });
        s.flush_batch().await;
        let runs = r.runs();
        assert_eq!(
            (runs[0].status, runs[0].delivery_attempts),
            (RunStatus::Delivered as i32, 3)
        );
        assert_eq!(store.outbox_len().expect("len"), 0);
    }
}

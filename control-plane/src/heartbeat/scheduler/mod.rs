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
//! At startup, agents without a cursor (a fresh or imported store) get
//! theirs written [`CURSOR_CHUNK`] per wake-up, not in one transaction
//! that would hold up the first slots.
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
//! **Startup grace.** A restarted control plane knows nothing of the
//! agents' live conversations until the proxies report again. So after
//! startup, scheduled slots and deferred retries are *held* (not claimed,
//! nothing recorded) until every proxy that reported before the restart
//! ([`FleetView::known_before_start`]) has delivered its first report batch,
//! or [`SchedulerConfig::startup_grace`] has passed; then the due slots fire
//! through the usual checks, busy agents deferred. A first-ever start (no
//! known proxies) holds nothing. Manual runs are never held.
//!
//! **Stale proxies.** An agent the scheduler sees appear (created,
//! re-enabled) or change model waits for the proxies: its slots are
//! `deferred(config_pending)` until every connected proxy has ACKed the
//! configuration version current when the change was seen (kept current
//! while the agent waits, so the heartbeat client key minted right after a
//! first agent counts too).
//!
//! **Transient failures.** A scheduled run whose proxy is unreachable
//! (connect error) or answers that the model is unknown
//! ([`dispatch::Transient`]) goes back to `deferred` (`proxy_unreachable`,
//! `model_unknown`, the error kept) and is retried after 1 s, 2 s, 4 s …
//! (at most 30 s), each attempt counted in `retries`, while the next
//! attempt falls inside the deferral cap (counted from the slot) and before
//! the next slot; then it ends `failed` with the last error. Other failures
//! are final at once; manual runs never retry.
//!
//! **Manual runs** bypass active hours and deferral (a busy agent or a
//! model without capacity is `skipped` at once), are keyed at the current
//! millisecond with trigger `manual`, and merge with a run in flight.
//!
//! One actor, three files: this one holds its types, the task loop, the
//! agents' sync with the catalog and the commands; `decide` the per-slot
//! policy above; `commit` the batch machinery (one transaction, then the
//! side effects, and the recovery when a commit fails).

use std::collections::{BTreeSet, HashMap, HashSet};
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

mod commit;
mod decide;
pub mod status;
mod wake;

/// Longest reply excerpt kept in a run record, in characters.
pub const EXCERPT_CHARS: usize = 500;
/// Most claims one wake-up commits (bounds a transaction after downtime).
const MAX_BATCH: usize = 5000;
/// Retention pruning deletes at most this many runs per wake-up.
const PRUNE_CHUNK: usize = 1000;
/// Longest retry step of a deferred slot.
const MAX_RETRY_STEP: Duration = Duration::from_secs(60);
/// Longest wait between two attempts of a run whose proxy was unreachable.
const MAX_DISPATCH_BACKOFF: Duration = Duration::from_secs(30);
/// Retry step of a slot waiting for the proxies' configuration ACKs.
const CONFIG_RETRY_STEP: Duration = Duration::from_millis(250);
/// First cursors written per wake-up after startup.
const CURSOR_CHUNK: usize = 2000;
/// How often the stale sweep runs.
const STALE_SWEEP: Duration = Duration::from_secs(1);
/// How often a held startup re-checks the proxies' reports.
const HOLD_POLL: Duration = Duration::from_millis(100);
/// The default [`SchedulerConfig::startup_grace`]: a proxy reports every
/// second (`CLAW_DP_REPORT_INTERVAL`) but reconnects with a backoff of
/// 1 s, 1.6 s, 2.6 s, 4.1 s …, so a few of its attempts fit in.
pub const DEFAULT_STARTUP_GRACE: Duration = Duration::from_secs(15);

/// Settings of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Runs older than this (by nominal time) are pruned.
    pub retention: Duration,
    /// How often pruning runs.
    pub prune_every: Duration,
    /// Wake mode: the callback base URL and the request poster.
    pub wake: crate::heartbeat::wake::WakeConfig,
    /// Longest hold of due slots after startup (see the module doc).
    pub startup_grace: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            retention: Duration::from_secs(30 * 24 * 3600),
            prune_every: Duration::from_secs(3600),
            wake: Default::default(),
            startup_grace: DEFAULT_STARTUP_GRACE,
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

/// What the scheduler needs to know about the proxies.
pub trait FleetView: Send + Sync + 'static {
    /// Node ids of the proxies that reported before this process started.
    fn known_before_start(&self) -> Vec<String>;
    /// Whether `node_id` delivered a report batch since this process started.
    fn has_reported(&self, node_id: &str) -> bool;
    /// The lowest configuration version ACKed by a connected proxy; `None`
    /// when no proxy is connected.
    fn min_acked_version(&self) -> Option<u64>;
}

/// A fleet with nothing to wait for (tests, benchmarks, embedding).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFleet;

impl FleetView for NoFleet {
    fn known_before_start(&self) -> Vec<String> {
        Vec::new()
    }

    fn has_reported(&self, _node_id: &str) -> bool {
        true
    }

    fn min_acked_version(&self) -> Option<u64> {
        Some(u64::MAX)
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
    /// A wake request was answered.
    Woken {
        key: RunKey,
        result: Result<(), String>,
    },
    /// A runtime reported a wake run's result.
    Callback {
        run_id: String,
        token: Option<String>,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<wake::CallbackAnswer, crate::heartbeat::wake::CallbackError>>,
    },
    /// Put dead letters back in the outbox (see `commit`).
    Redeliver {
        keys: Vec<RunKey>,
        reply: commit::RedeliverReply,
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
    /// The proxies: who reported since startup, which version they ACKed.
    pub fleet: Arc<dyn FleetView>,
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
    model: String,
    fingerprint: u64,
    catch_up: Duration,
    busy_window: Duration,
    defer_max: Duration,
    retry_step: Duration,
    stale_after_ms: i64,
    /// The queued fire time, if any.
    next_ms: Option<i64>,
}

impl AgentState {
    fn new(a: &Agent) -> Result<Self, String> {
        let interval = Duration::from_secs(a.interval_seconds.max(1));
        Ok(AgentState {
            schedule: schedule_of(a)?,
            model: a.model.clone(),
            fingerprint: fingerprint(a),
            catch_up: Duration::from_secs(validate::effective_catch_up_seconds(a)),
            busy_window: Duration::from_secs(validate::effective_busy_window_seconds(a)),
            defer_max: Duration::from_secs(validate::effective_busy_defer_max_seconds(a)),
            retry_step: (interval / 2).clamp(Duration::from_secs(1), MAX_RETRY_STEP),
            stale_after_ms: status::stale_after(a).as_millis() as i64,
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
    /// A record rewritten without ending the run (an event's delivery,
    /// a redelivery): no outcome metrics, no streak.
    Bookkeeping,
    /// A dead letter back in the outbox: hand it to the worker; the last
    /// one of a request answers its caller.
    #[allow(clippy::type_complexity)]
    Redelivered(
        Box<(RunKey, OutboxEntry)>,
        Option<(commit::RedeliverReply, Vec<String>)>,
    ),
}

/// The outcome of the per-slot checks.
enum Decision {
    Run,
    Skip(&'static str),
    Defer(&'static str),
}

/// Due slots held after startup until these proxies reported.
struct StartupHold {
    waiting: Vec<String>,
    until_ms: i64,
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
    /// Failure streaks per agent, derived from the run log on first use
    /// (see `commit` and [`super::streak`]).
    streaks: HashMap<String, super::streak::Streak>,
    batch: Vec<(Write, Action)>,
    /// Runs whose LLM part ended in this batch: woken after the commit.
    waiters: Vec<(watch::Sender<Option<HeartbeatRun>>, Option<HeartbeatRun>)>,
    tx: mpsc::UnboundedSender<Command>,
    rx: mpsc::UnboundedReceiver<Command>,
    next_prune_ms: i64,
    pruning: bool,
    /// Canonical models whose enabled backends are all `anthropic`: their
    /// runs are sent as Messages (rebuilt with the capacity map).
    messages_models: HashSet<String>,
    /// Wake runs: pending requests, callbacks, deadlines.
    wake: wake::WakeRuns,
    /// Set after startup while due slots are held (see the module doc).
    hold: Option<StartupHold>,
    /// Agents waiting for the proxies to ACK this configuration version
    /// before their first run (after a create, re-enable or model change).
    pending_config: HashMap<String, u64>,
    /// Per enabled agent: its last terminal run's end, or when the stale
    /// count (re)started (enabled, loaded at startup, seen outside its
    /// active hours), unix ms.
    since: HashMap<String, i64>,
    /// Agents currently stale (gauge set).
    stale: HashSet<String>,
    next_sweep_ms: i64,
    /// Agents whose first cursor is still to be written (startup).
    pending_cursors: Vec<String>,
    /// Run results waiting for space on the data volume (see `commit`).
    pending: commit::Pending,
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
                streaks: HashMap::new(),
                batch: Vec::new(),
                waiters: Vec::new(),
                tx,
                rx,
                next_prune_ms: 0,
                pruning: false,
                messages_models: HashSet::new(),
                wake: Default::default(),
                hold: None,
                pending_config: HashMap::new(),
                since: HashMap::new(),
                stale: HashSet::new(),
                next_sweep_ms: 0,
                pending_cursors: Vec::new(),
                pending: Default::default(),
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
                    self.flush_at_stop().await;
                    return;
                }
            }
            if reload && let Err(e) = self.sync_agents(None) {
                tracing::error!(error = %e, "heartbeat scheduler cannot reload agents");
            }
            self.tick();
            self.prune_step();
            self.write_pending_cursors(CURSOR_CHUNK);
            self.flush_batch().await;
            self.sweep_stale();
        }
    }

    /// Adds up to `n` first cursors (agents that had none at startup) to the
    /// batch, from the agents' current state (a slot that fired meanwhile
    /// already moved it).
    fn write_pending_cursors(&mut self, n: usize) {
        let from = self.pending_cursors.len().saturating_sub(n);
        for id in self.pending_cursors.split_off(from) {
            if let Some(state) = self.agents.get(&id) {
                let c = Cursor {
                    next_ms: state.next_ms.unwrap_or(0),
                    fingerprint: state.fingerprint,
                };
                self.batch.push((Write::Cursor(id, c), Action::None));
            }
        }
    }

    /// Marks agents stale (or no longer) on a timer, so that an agent that
    /// simply stops getting terminal runs is seen (see [`status`]). Cheap
    /// per agent: an agent is looked at closely only once its count ran out.
    fn sweep_stale(&mut self) {
        let now = self.now_ms();
        if now < self.next_sweep_ms {
            return;
        }
        self.next_sweep_ms = now + STALE_SWEEP.as_millis() as i64;
        let mut newly = Vec::new();
        for (id, state) in &self.agents {
            let since = self.since.entry(id.clone()).or_insert(now);
            if self.stale.contains(id) {
                if !state.schedule.is_in_window(ts(now)) {
                    *since = now;
                    newly.push((id.clone(), false));
                }
                continue;
            }
            if now - *since <= state.stale_after_ms {
                continue;
            }
            if !state.schedule.is_in_window(ts(now)) {
                // Outside its hours: the count restarts when they do.
                *since = now;
                continue;
            }
            newly.push((id.clone(), true));
        }
        for (id, stale) in newly {
            let failures = self.failures.get(&id).copied().unwrap_or(0);
            if stale {
                tracing::warn!(agent = %id, "heartbeat stale: no terminal run for two intervals plus the deferral cap");
                self.stale.insert(id.clone());
            } else {
                self.stale.remove(&id);
            }
            metrics::agent_stale(&id, stale, failures);
        }
    }

    /// Notes an agent's terminal run (the stale count restarts).
    pub(super) fn terminal_run(&mut self, agent: &str, now: i64) {
        if let Some(since) = self.since.get_mut(agent) {
            *since = now;
        }
        if self.stale.remove(agent) {
            let failures = self.failures.get(agent).copied().unwrap_or(0);
            metrics::agent_stale(agent, false, failures);
        } else {
            metrics::agent_fresh(agent);
        }
    }

    /// Forgets the stale count of an agent no longer scheduled.
    fn forget_stale(&mut self, id: &str) {
        self.since.remove(id);
        if self.stale.remove(id) {
            metrics::agent_stale(id, false, self.failures.get(id).copied().unwrap_or(0));
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
        if let Some(t) = self.next_wake_deadline() {
            at = at.min(t);
        }
        if self.hold.is_some() {
            at = at.min(now + HOLD_POLL.as_millis() as i64);
        }
        at = at.min(self.next_sweep_ms);
        if let Some(t) = self.pending.retry_at() {
            at = at.min(t);
        }
        if !self.pending_cursors.is_empty() {
            at = now;
        }
        Duration::from_millis((at - now).clamp(0, 3_600_000) as u64)
    }

    /// Startup: finish what a previous process left open, load agents.
    async fn start(&mut self) -> Result<(), HeartbeatError> {
        let now = self.now_ms();
        let open = self.deps.runs.open_runs()?;
        for (key, mut rec) in open {
            match rec.status() {
                // Wake mode: the runtime still reports back; never re-POST.
                RunStatus::Dispatched => self.resume_dispatched(key, &rec),
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
        let known = self.deps.fleet.known_before_start();
        if !known.is_empty() && !self.config.startup_grace.is_zero() {
            tracing::info!(
                proxies = known.len(),
                grace_ms = self.config.startup_grace.as_millis() as u64,
                "holding due heartbeats until the known proxies report"
            );
            self.hold = Some(StartupHold {
                waiting: known,
                until_ms: now + self.config.startup_grace.as_millis() as i64,
            });
        }
        let cursors: HashMap<String, Cursor> = self.deps.runs.cursors()?.into_iter().collect();
        self.sync_agents(Some(cursors))?;
        self.write_pending_cursors(CURSOR_CHUNK);
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
        let version = self.deps.catalog.config_version();
        // Agents still waiting follow the newest version (see the module doc).
        for v in self.pending_config.values_mut() {
            *v = version;
        }
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
                self.pending_config.remove(&a.id);
                self.forget_stale(&a.id);
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
                    // At startup the first cursors of agents that have none
                    // are written in chunks between wake-ups
                    // (`write_pending_cursors`), so that 100,000 new agents
                    // are not one transaction delaying the first slots.
                    if stored.is_none() || known.is_some() {
                        let c = Cursor {
                            next_ms: next.unwrap_or(0),
                            fingerprint: fp,
                        };
                        self.batch
                            .push((Write::Cursor(a.id.clone(), c), Action::None));
                    } else {
                        self.pending_cursors.push(a.id.clone());
                    }
                    next
                }
            };
            // On reloads, an agent new to the scheduler (created,
            // re-enabled) or with another model waits for the proxies.
            if stored.is_none()
                && self
                    .agents
                    .get(&a.id)
                    .is_none_or(|old| old.model != state.model)
            {
                self.pending_config.insert(a.id.clone(), version);
            }
            self.since
                .entry(a.id.clone())
                .or_insert_with(|| now.as_millisecond());
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
            self.pending_config.remove(&id);
            self.forget_stale(&id);
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

    /// Rebuilds the model → backends map and the models served only in
    /// Messages from the configuration (enabled backends only).
    fn refresh_capacity(&mut self) {
        let Ok(backends) = self.deps.catalog.backend_records() else {
            return;
        };
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        // Per model: (any openai backend, any anthropic backend).
        let mut apis: HashMap<String, (bool, bool)> = HashMap::new();
        for b in backends.into_iter().filter_map(|r| r.spec) {
            if !b.enabled {
                continue;
            }
            let anthropic = b.api == claw_proto::v1::Api::Anthropic as i32;
            for m in &b.models {
                map.entry(m.canonical.clone())
                    .or_default()
                    .push(b.id.clone());
                let seen = apis.entry(m.canonical.clone()).or_default();
                if anthropic {
                    seen.1 = true;
                } else {
                    seen.0 = true;
                }
            }
        }
        self.messages_models = apis
            .into_iter()
            .filter(|(_, (openai, anthropic))| *anthropic && !*openai)
            .map(|(model, _)| model)
            .collect();
        self.deps.capacity.set_model_backends(map);
    }

    /// The protocol a run of `model` is sent in.
    pub(super) fn protocol_for(&self, model: &str) -> dispatch::Protocol {
        if self.messages_models.contains(model) {
            dispatch::Protocol::Messages
        } else {
            dispatch::Protocol::ChatCompletions
        }
    }

    /// Fires every due slot and retry, up to [`MAX_BATCH`] writes.
    fn tick(&mut self) {
        let now = self.now_ms();
        if self.held(now) {
            return;
        }
        while self.batch.len() < MAX_BATCH {
            let Some((t, id)) = pop_due(&mut self.queue, now) else {
                break;
            };
            self.fire_due(&id, t, now);
        }
        while self.batch.len() < MAX_BATCH {
            let Some((_, id)) = pop_due(&mut self.retries, now) else {
                break;
            };
            self.retry(&id, now);
        }
        self.expire_wakes(now);
    }

    /// Whether due slots are still held after startup; releases the hold
    /// once every known proxy reported or the grace has passed.
    fn held(&mut self, now: i64) -> bool {
        let Some(hold) = self.hold.as_mut() else {
            return false;
        };
        let fleet = &self.deps.fleet;
        hold.waiting.retain(|n| !fleet.has_reported(n));
        if hold.waiting.is_empty() {
            tracing::info!("every known proxy reported; heartbeats resume");
        } else if now >= hold.until_ms {
            tracing::warn!(missing = ?hold.waiting, "startup grace over before every known proxy reported; heartbeats resume");
        } else {
            return true;
        }
        self.hold = None;
        false
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::RunNow { agent_id, reply } => self.run_now(agent_id, reply),
            Command::Finished { key, result } => self.finished(key, result),
            Command::Woken { key, result } => self.woken(key, result),
            Command::Callback {
                run_id,
                token,
                body,
                reply,
            } => {
                let _ = reply.send(self.callback(&run_id, token.as_deref(), &body));
            }
            Command::Redeliver { keys, reply } => self.redeliver(keys, reply),
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
        match self.decide(&id, &agent, self.agents.get(&id), now, false) {
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
                // Deferred again (written below like any end) or failed.
                let retried = dispatch::transient(&error)
                    .is_some_and(|kind| self.redefer(&key, &mut rec, kind, &error, now));
                if !retried {
                    tracing::warn!(agent = %key.agent_id, error = %error, "heartbeat run failed");
                    set_status(&mut rec, RunStatus::Failed, "", &error, now);
                }
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
                        outbox = self.alert(&key, &mut rec, &why, &r.content, now);
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

    /// A scheduled run failed in a way a later attempt may not (proxy
    /// unreachable, model unknown to it): defers the slot again, to be
    /// retried after 1 s, 2 s, 4 s … (at most [`MAX_DISPATCH_BACKOFF`]) while
    /// that stays within the slot's deferral cap and before the next slot.
    /// Returns false when the run must fail now.
    fn redefer(
        &mut self,
        key: &RunKey,
        rec: &mut RunRecord,
        kind: dispatch::Transient,
        error: &str,
        now: i64,
    ) -> bool {
        let Some(run) = rec.run.as_ref() else {
            return false;
        };
        if run.trigger != RunTrigger::Schedule as i32 {
            return false;
        }
        let Some(state) = self.agents.get(&key.agent_id) else {
            return false;
        };
        let until = key.nominal_ms + state.defer_max.as_millis() as i64;
        let backoff = (1000i64 << run.retries.min(8)).min(MAX_DISPATCH_BACKOFF.as_millis() as i64);
        let retry_at_ms = now + backoff;
        if retry_at_ms > until || state.next_ms.is_some_and(|n| retry_at_ms >= n) {
            return false;
        }
        tracing::info!(agent = %key.agent_id, error, retries = run.retries, backoff_ms = backoff, "heartbeat run deferred; retrying");
        set_status(rec, RunStatus::Deferred, "", error, now);
        rec.defer_reason = kind.reason().to_string();
        rec.defer_until_ms = until;
        self.retries.insert((retry_at_ms, key.agent_id.clone()));
        self.deferred.insert(
            key.agent_id.clone(),
            Deferred {
                key: key.clone(),
                record: rec.clone(),
                retry_at_ms,
            },
        );
        true
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

    /// Sends a run (or its wake request); its result comes back as a command.
    fn spawn(&mut self, key: RunKey, req: RunRequest) {
        if self.spawn_wake(&key) {
            return;
        }
        let fut = self.deps.dispatcher.run(req);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = fut.await;
            let _ = tx.send(Command::Finished { key, result });
        });
    }
}

/// Takes the earliest entry of a time-ordered set if it is due at `now`.
fn pop_due(set: &mut BTreeSet<(i64, String)>, now: i64) -> Option<(i64, String)> {
    match set.first() {
        Some((t, _)) if *t <= now => set.pop_first(),
        _ => None,
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
        /// Errors answered first, one per call.
        errors: parking_lot::Mutex<Vec<String>>,
    }

    impl Dispatcher for Arc<Stub> {
        fn run(
            &self,
            _req: RunRequest,
        ) -> futures::future::BoxFuture<'static, Result<RunReply, String>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let reply = self.reply.clone();
            let hang = self.hang;
            let error = {
                let mut errors = self.errors.lock();
                (!errors.is_empty()).then(|| errors.remove(0))
            };
            Box::pin(async move {
                if let Some(e) = error {
                    return Err(e);
                }
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
        fleet: Arc<dyn FleetView>,
    }

    async fn rig(reply: &str, hang: bool) -> (tempfile::TempDir, Rig) {
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
                    busy_defer_max_seconds: 120,
                    ..Default::default()
                },
            )
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
                errors: parking_lot::Mutex::new(Vec::new()),
            }),
            fleet: Arc::new(NoFleet),
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
                    fleet: self.fleet.clone(),
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
    async fn runs_use_messages_only_for_models_served_only_by_anthropic_backends() {
        let (_d, r) = rig("HEARTBEAT_OK", false).await;
        let backend = |name: &str, api: claw_proto::v1::Api, models: &[&str], enabled: bool| {
            claw_proto::v1::Backend {
                name: name.into(),
                base_url: "https://api.example.com/v1".into(),
                api_key: "sk-test-0123456789".into(),
                rpm: 60,
                enabled,
                api: api as i32,
                models: models
                    .iter()
                    .map(|m| claw_proto::v1::ModelMapping {
                        canonical: (*m).into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }
        };
        use claw_proto::v1::Api::{Anthropic, Openai};
        for b in [
            backend("claude-1", Anthropic, &["claude", "mixed", "off"], true),
            backend("claude-2", Anthropic, &["claude"], true),
            backend("gpt", Openai, &["gpt-4o", "mixed"], true),
            backend("gpt-off", Openai, &["off"], false),
        ] {
            r.catalog
                .create_backend(&crate::audit::Actor::system(), b)
                .await
                .expect("backend");
        }
        let (mut s, _h, _) = r.scheduler();
        s.sync_agents(None).expect("sync");
        use dispatch::Protocol::{ChatCompletions, Messages};
        assert_eq!(s.protocol_for("claude"), Messages);
        assert_eq!(
            s.protocol_for("off"),
            Messages,
            "disabled backends do not count"
        );
        assert_eq!(s.protocol_for("gpt-4o"), ChatCompletions);
        assert_eq!(
            s.protocol_for("mixed"),
            ChatCompletions,
            "openai still serves it"
        );
        assert_eq!(s.protocol_for("unknown"), ChatCompletions);

        // A configuration change is picked up on the next reload.
        r.catalog
            .update_backend(
                &crate::audit::Actor::system(),
                claw_proto::v1::UpdateBackendRequest {
                    backend: "claude-1".into(),
                    api: Openai as i32,
                    ..Default::default()
                },
            )
            .await
            .expect("switch");
        s.sync_agents(None).expect("reload");
        assert_eq!(s.protocol_for("claude"), ChatCompletions);
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
            .update_agent(
                &crate::audit::Actor::system(),
                UpdateAgentRequest {
                    agent: "a1".into(),
                    interval_seconds: Some(3600),
                    busy_defer_max_seconds: Some(90),
                    ..Default::default()
                },
            )
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
            .set_agent_checklist(
                &crate::audit::Actor::system(),
                "a1",
                "# HEARTBEAT\n\n- [ ]\n",
            )
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
    async fn alerts_without_a_webhook_are_undeliverable_and_with_one_go_to_the_outbox() {
        let (_d, r) = rig("The disk is full", false).await;
        let (mut s, _h, _) = r.scheduler();
        s.start().await.expect("start");
        step(&mut s, &r.clock, T0 + 5).await;
        assert_eq!(
            statuses(&r.runs()),
            [(0, "undeliverable".into(), "".into())]
        );
        r.catalog
            .update_agent(
                &crate::audit::Actor::system(),
                UpdateAgentRequest {
                    agent: "a1".into(),
                    webhook_url: Some("http://127.0.0.1:9/hook".into()),
                    ..Default::default()
                },
            )
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

    /// A fleet of one proxy `p1` whose report and ACKed version tests set.
    #[derive(Default)]
    struct TestFleet {
        reported: std::sync::atomic::AtomicBool,
        acked: std::sync::atomic::AtomicU64,
    }

    impl FleetView for Arc<TestFleet> {
        fn known_before_start(&self) -> Vec<String> {
            vec!["p1".into()]
        }

        fn has_reported(&self, _node_id: &str) -> bool {
            self.reported.load(Ordering::SeqCst)
        }

        fn min_acked_version(&self) -> Option<u64> {
            Some(self.acked.load(Ordering::SeqCst))
        }
    }

    #[tokio::test]
    async fn after_a_restart_due_slots_wait_for_the_known_proxies_first_report() {
        let (_d, mut r) = rig("HEARTBEAT_OK", false).await;
        let fleet = Arc::new(TestFleet::default());
        r.fleet = Arc::new(fleet.clone());
        {
            // A first life at T0 - 30 s stores the cursor (slot 0).
            let (mut s, _h, _) = r.scheduler();
            s.start().await.expect("start");
        }
        let (mut s, _h, activity) = r.scheduler();
        r.clock.set(T0 + 5);
        s.start().await.expect("start");
        step(&mut s, &r.clock, T0 + 5).await;
        step(&mut s, &r.clock, T0 + 3_000).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 0, "held");
        assert!(r.runs().is_empty(), "a held slot is not claimed");
        // The proxy reports: the agent is in a conversation.
        activity.record("a1", ts(T0 + 2_900));
        fleet.reported.store(true, Ordering::SeqCst);
        step(&mut s, &r.clock, T0 + 3_100).await;
        assert_eq!(statuses(&r.runs()), [(0, "deferred".into(), "".into())]);
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_startup_hold_ends_with_the_grace() {
        let (_d, mut r) = rig("HEARTBEAT_OK", false).await;
        r.fleet = Arc::new(Arc::new(TestFleet::default()));
        {
            let (mut s, _h, _) = r.scheduler();
            s.start().await.expect("start");
        }
        let (mut s, _h, _) = r.scheduler();
        r.clock.set(T0 + 5);
        s.start().await.expect("start");
        step(&mut s, &r.clock, T0 + 14_000).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 0, "held");
        step(&mut s, &r.clock, T0 + 15_010).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 1, "released");
        assert_eq!(statuses(&r.runs()), [(0, "suppressed".into(), "".into())]);
    }

    #[tokio::test]
    async fn a_new_agent_waits_until_the_proxies_acked_its_configuration() {
        let (_d, mut r) = rig("HEARTBEAT_OK", false).await;
        let fleet = Arc::new(TestFleet::default());
        fleet.reported.store(true, Ordering::SeqCst);
        r.fleet = Arc::new(fleet.clone());
        let (mut s, _h, _) = r.scheduler();
        s.start().await.expect("start");
        r.catalog
            .create_agent(
                &crate::audit::Actor::system(),
                Agent {
                    id: "a2".into(),
                    model: "gpt-4o".into(),
                    interval_seconds: 60,
                    stagger: Some(false),
                    checklist: "- [ ] check the inbox".into(),
                    enabled: true,
                    ..Default::default()
                },
            )
            .await
            .expect("agent");
        let version = r.catalog.config_version();
        s.sync_agents(None).expect("reload");
        fleet.acked.store(version - 1, Ordering::SeqCst);
        step(&mut s, &r.clock, T0 + 5).await;
        let runs = RunStore::new(r.store.clone());
        let a2 = |runs: &RunStore| runs.list_agent("a2", 10).expect("list");
        assert_eq!(a2(&runs)[0].status, RunStatus::Deferred as i32);
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 1, "a1 was known: ran");
        step(&mut s, &r.clock, T0 + 300).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 1, "a2 still waits");
        fleet.acked.store(version, Ordering::SeqCst);
        step(&mut s, &r.clock, T0 + 600).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 2);
        assert_eq!(a2(&runs)[0].status, RunStatus::Suppressed as i32);
    }

    #[tokio::test]
    async fn an_unreachable_proxy_defers_the_run_and_retries_it_with_backoff() {
        let (_d, r) = rig("HEARTBEAT_OK", false).await;
        *r.stub.errors.lock() = vec![
            "proxy unreachable: connection refused".into(),
            "model gpt-4o unknown to the proxy".into(),
        ];
        let (mut s, _h, _) = r.scheduler();
        s.start().await.expect("start");
        step(&mut s, &r.clock, T0 + 5).await;
        let runs = r.runs();
        assert_eq!(statuses(&runs), [(0, "deferred".into(), "".into())]);
        assert_eq!(runs[0].error, "proxy unreachable: connection refused");
        step(&mut s, &r.clock, T0 + 900).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 1, "1 s backoff");
        step(&mut s, &r.clock, T0 + 1_010).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 2);
        assert_eq!(r.runs()[0].retries, 1);
        // Then 2 s.
        step(&mut s, &r.clock, T0 + 2_500).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 2);
        step(&mut s, &r.clock, T0 + 3_020).await;
        let runs = r.runs();
        assert_eq!(statuses(&runs), [(0, "suppressed".into(), "".into())]);
        assert_eq!((runs[0].retries, runs[0].error.as_str()), (2, ""));
    }

    #[tokio::test]
    async fn a_proxy_that_stays_unreachable_fails_the_run_with_the_real_reason() {
        let (_d, r) = rig("HEARTBEAT_OK", false).await;
        *r.stub.errors.lock() = vec!["proxy unreachable: connection refused".into(); 100];
        let (mut s, _h, _) = r.scheduler();
        s.start().await.expect("start");
        let mut t = T0 + 5;
        while t < T0 + 59_000 {
            step(&mut s, &r.clock, t).await;
            t += 500;
        }
        // Retries 1, 2, 4, 8, 16 s; the next (30 s) would pass the next slot.
        let runs = r.runs();
        assert_eq!(statuses(&runs), [(0, "failed".into(), "".into())]);
        assert_eq!(runs[0].error, "proxy unreachable: connection refused");
        assert_eq!(runs[0].retries, 5);
        // Other failures stay immediate.
        *r.stub.errors.lock() = vec!["proxy answered 500: boom".into()];
        step(&mut s, &r.clock, T0 + 60_005).await;
        let runs = r.runs();
        assert_eq!(runs[0].status, RunStatus::Failed as i32);
        assert_eq!(
            (runs[0].retries, runs[0].error.as_str()),
            (0, "proxy answered 500: boom")
        );
    }

    #[tokio::test]
    async fn an_agent_without_terminal_runs_goes_stale_on_the_sweep_and_recovers() {
        let (_d, mut r) = rig("HEARTBEAT_OK", false).await;
        let fleet = Arc::new(TestFleet::default());
        r.fleet = Arc::new(fleet.clone());
        {
            let (mut s, _h, _) = r.scheduler();
            s.start().await.expect("start");
        }
        // Restarted with the known proxy gone for good and a long grace:
        // no slot fires, so no terminal run comes.
        let (mut s, _h, _) = r.scheduler();
        s.config.startup_grace = Duration::from_secs(3600);
        r.clock.set(T0 + 5);
        s.start().await.expect("start");
        for t in [10_000, 200_000, 240_000] {
            step(&mut s, &r.clock, T0 + t).await;
            s.sweep_stale();
            assert!(s.stale.is_empty(), "not yet at {t}");
        }
        // 2 × 60 s + the 120 s cap after the start.
        step(&mut s, &r.clock, T0 + 241_000).await;
        s.sweep_stale();
        assert!(s.stale.contains("a1"));
        // The proxy is back: a terminal run ends the staleness.
        fleet.reported.store(true, Ordering::SeqCst);
        step(&mut s, &r.clock, T0 + 247_000).await;
        assert_eq!(r.stub.calls.load(Ordering::SeqCst), 1);
        assert!(s.stale.is_empty());
    }
}

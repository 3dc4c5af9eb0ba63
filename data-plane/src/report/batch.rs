//! Turning request outcomes and signals into report batches.
//!
//! [`Collector`] owns the batch being filled and the [`ReportBuffer`] of cut
//! ones. Usage is summed per usage bucket (`UsageBuckets`: UTC hour, client
//! key, agent, model, backend, run kind), one `UsageAggregate` per bucket rather than
//! one event per request, so a batch's size and the control plane's work to
//! store it do not grow with the request rate. Upstream failures, recoveries
//! after 429s, agent activity (summed per agent) and per-backend demand go
//! into the same batch.
//!
//! When a batch is cut is the stream loop's decision ([`super::run`]); the
//! collector says when one is due: when it holds `max_batch_events`, at once
//! after a 429 (cooldowns must spread within milliseconds) and when an agent
//! quiet for [`ACTIVITY_QUIET`] starts a conversation. [`Collector::keepalive`]
//! cuts an empty batch after [`IDLE_BATCH_EVERY`] of silence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use claw_proto::v1::{
    AgentActivity, BackendDemand, BackendSuccess, ClientKeyDemand, FailureKind as WireFailureKind,
    StreamReportsRequest, UpstreamFailure, UsageAggregate, UsageTotals,
};
use tokio::time::Instant;

use super::buffer::ReportBuffer;
use super::journal::{self, Journal};
use crate::config::ReportSettings;
use crate::events::{Failure, FailureKind, RequestOutcome, RunKind, Signal};
use crate::snapshot::SnapshotStore;

/// The usage bucket a request is summed into: what the control plane keys
/// its hourly usage by.
#[derive(Clone, Hash, PartialEq, Eq)]
struct UsageKey {
    /// UTC hours since the Unix epoch, of the request's start.
    hour: u64,
    client_key_id: Arc<str>,
    agent_id: Option<String>,
    model: Arc<str>,
    backend_id: Option<Arc<str>>,
    /// Heartbeat runs are summed apart from the agent's own traffic.
    run_kind: RunKind,
}

/// The requests of one bucket since the last cut.
struct UsageSum {
    first: SystemTime,
    last: SystemTime,
    totals: UsageTotals,
}

impl UsageKey {
    /// Whether `o`, started in `hour`, belongs to this bucket.
    fn holds(&self, hour: u64, o: &RequestOutcome) -> bool {
        self.hour == hour
            && self.client_key_id == o.client_key_id
            && self.model == o.model
            && self.backend_id == o.backend_id
            && self.agent_id == o.agent_id
            && self.run_kind == o.run_kind
    }
}

/// Usage sums by bucket, in the order the buckets appeared. Consecutive
/// requests mostly share a bucket (one agent's calls through one backend),
/// so the bucket of the previous request is compared first: a few
/// comparisons instead of building and hashing a key for each request.
#[derive(Default)]
struct UsageBuckets {
    index: HashMap<UsageKey, usize>,
    sums: Vec<(UsageKey, UsageSum)>,
    /// Index in `sums` of the previous request's bucket.
    last: usize,
}

impl UsageBuckets {
    fn len(&self) -> usize {
        self.sums.len()
    }

    fn add(&mut self, o: &mut RequestOutcome, hour: u64, started: SystemTime) {
        let i = match self.sums.get(self.last) {
            Some((k, _)) if k.holds(hour, o) => self.last,
            _ => {
                let key = UsageKey {
                    hour,
                    client_key_id: o.client_key_id.clone(),
                    agent_id: o.agent_id.take(),
                    model: o.model.clone(),
                    backend_id: o.backend_id.clone(),
                    run_kind: o.run_kind,
                };
                match self.index.get(&key) {
                    Some(&i) => i,
                    None => {
                        self.index.insert(key.clone(), self.sums.len());
                        self.sums.push((
                            key,
                            UsageSum {
                                first: started,
                                last: started,
                                totals: UsageTotals::default(),
                            },
                        ));
                        self.sums.len() - 1
                    }
                }
            }
        };
        self.last = i;
        let sum = &mut self.sums[i].1;
        sum.first = sum.first.min(started);
        sum.last = sum.last.max(started);
        sum.totals += &request_totals(o);
    }
}

/// The batch being filled.
#[derive(Default)]
struct Pending {
    usage: UsageBuckets,
    failures: Vec<UpstreamFailure>,
    successes: Vec<BackendSuccess>,
    activity: HashMap<String, (SystemTime, u32)>,
    /// A 429 is waiting: cut now.
    urgent: bool,
}

impl Pending {
    fn len(&self) -> usize {
        self.usage.len() + self.failures.len() + self.successes.len() + self.activity.len()
    }
}

/// Turns events into batches.
pub(crate) struct Collector {
    node_id: String,
    epoch: String,
    store: SnapshotStore,
    max_batch: usize,
    pending: Pending,
    buffer: ReportBuffer,
    /// When the last batch was cut.
    last_cut: Instant,
    /// Silence after which an empty batch is cut: [`IDLE_BATCH_EVERY`] less
    /// one flush tick, so that checked every tick batches leave at least
    /// every [`IDLE_BATCH_EVERY`].
    idle_after: Duration,
    /// When each agent's activity last left in a batch (pruned after
    /// [`ACTIVITY_QUIET`]).
    agents_reported: HashMap<String, Instant>,
    /// The usage journal, if any ([`Collector::resume`]).
    journal: Option<Journal>,
    /// Outcomes taken so far (the journal's outcome records a cut covers).
    consumed: u64,
}

/// The request path's journal hook ([`crate::events::EventSink::emit`]):
/// the outcome's usage row is appended as it is queued.
impl crate::events::OutcomeJournal for journal::OutcomeLog {
    fn send(&self, tx: &tokio::sync::mpsc::Sender<RequestOutcome>, o: RequestOutcome) -> bool {
        if self.is_paused() {
            return tx.try_send(o).is_ok();
        }
        let frame = journal::outcome_frame(&outcome_row(&o));
        self.append_queued(&frame, || tx.try_send(o).is_ok())
    }
}

/// A new random stream epoch (one per process).
pub(crate) fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// One request's usage as a usage row of its own: the journal's outcome
/// record (summed like [`Collector::outcome`] sums it).
pub(crate) fn outcome_row(o: &RequestOutcome) -> journal::OutcomeRow<'_> {
    let now = SystemTime::now();
    journal::OutcomeRow {
        started: now.checked_sub(o.latency).unwrap_or(now),
        client_key_id: &o.client_key_id,
        agent_id: o.agent_id.as_deref().unwrap_or_default(),
        model: &o.model,
        backend_id: o.backend_id.as_deref().unwrap_or_default(),
        run_kind: o.run_kind.wire(),
        totals: request_totals(o),
    }
}

/// An agent not reported active for this long starts a conversation with
/// its next request: that activity is cut at once, not on the tick, so the
/// control plane can skip a heartbeat due in the next second. Activity of a
/// conversation already reported rides on the tick.
pub(crate) const ACTIVITY_QUIET: Duration = Duration::from_secs(10);

/// How long a connected, idle proxy stays silent before it sends an empty
/// batch. The control plane reads a proxy's silence as "may have used its
/// whole rate share" and holds that share against the others for a minute,
/// so an idle proxy says, every second, that it used nothing.
pub(crate) const IDLE_BATCH_EVERY: Duration = Duration::from_secs(1);

impl Collector {
    /// A collector for `node_id`, reading demand from `store`'s backends.
    pub(crate) fn new(node_id: String, store: SnapshotStore, settings: &ReportSettings) -> Self {
        Collector {
            node_id,
            epoch: new_epoch(),
            store,
            max_batch: settings.max_batch_events.max(1),
            pending: Pending::default(),
            buffer: ReportBuffer::new(settings.max_buffered_events),
            last_cut: Instant::now(),
            idle_after: IDLE_BATCH_EVERY.saturating_sub(settings.flush_interval),
            agents_reported: HashMap::new(),
            journal: None,
            consumed: 0,
        }
    }

    /// Continues from a usage journal: its epoch, the batches it recovered
    /// (replayed first), and the journal for every later batch.
    pub(crate) fn resume(&mut self, opened: journal::Opened) {
        self.epoch = opened.epoch;
        self.buffer.resume(&self.epoch, opened.batches);
        self.journal = Some(opened.journal);
    }

    /// Releases batches by an ACK (see [`ReportBuffer::ack`]) and journals it.
    pub(crate) fn ack(&mut self, acked_seq: u64) -> usize {
        let n = self.buffer.ack(acked_seq);
        self.journal_released();
        n
    }

    /// Called before a batch is handed to the report stream: what the
    /// journal holds reaches the disk first.
    pub(crate) async fn before_send(&mut self) {
        if let Some(j) = self.journal.as_mut() {
            j.sync().await;
        }
    }

    /// Whether the journal should be rewritten ([`Collector::rewrite_journal`]).
    pub(crate) fn journal_wants_rewrite(&self) -> bool {
        self.journal.as_ref().is_some_and(Journal::wants_rewrite)
    }

    /// Rewrites the journal to the batches held: `take` runs first, under
    /// the journal's append lock, and must take every queued outcome and
    /// cut, so every outcome record is covered. Drops the oldest batches
    /// while they do not fit the journal's bound.
    pub(crate) fn rewrite_journal(&mut self, take: impl FnOnce(&mut Self)) {
        let Some(mut j) = self.journal.take() else {
            return;
        };
        let room = j.batch_room();
        j.rewrite_with(|| {
            take(self);
            let mut bytes: u64 = self
                .buffer
                .held()
                .map(|(m, _)| journal::batch_bytes(m))
                .sum();
            let mut dropped = 0u64;
            while bytes > room {
                let Some((m, _)) = self.buffer.held().next() else {
                    break;
                };
                let size = journal::batch_bytes(m);
                match self.buffer.drop_oldest() {
                    Some(events) => dropped += events as u64,
                    None => break,
                }
                bytes -= size.min(bytes);
            }
            if dropped > 0 {
                crate::metrics::report_events_dropped(dropped);
                tracing::warn!(
                    dropped,
                    dropped_total = self.buffer.dropped(),
                    "usage journal full: dropped the oldest unacknowledged events"
                );
            }
            // The rewrite holds exactly what is left.
            self.buffer.take_released();
            let held = self.buffer.held().map(|(m, e)| (m.clone(), e)).collect();
            ((), self.consumed, held)
        });
        self.journal = Some(j);
    }

    fn journal_released(&mut self) {
        let released = self.buffer.take_released();
        if let Some(j) = self.journal.as_mut() {
            for (epoch, seq) in released {
                j.released(&epoch, seq);
            }
        }
    }

    /// This process's stream epoch.
    pub(crate) fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The unacknowledged batches.
    pub(crate) fn buffer(&mut self) -> &mut ReportBuffer {
        &mut self.buffer
    }

    /// Events in the batch being filled.
    pub(crate) fn pending_events(&self) -> usize {
        self.pending.len()
    }

    /// The bare hello that opens a stream.
    pub(crate) fn hello(&self) -> StreamReportsRequest {
        StreamReportsRequest {
            node_id: self.node_id.clone(),
            stream_epoch: self.epoch.clone(),
            dropped_events: self.buffer.dropped(),
            ..Default::default()
        }
    }

    /// Adds a request outcome to its usage bucket.
    pub(crate) fn outcome(&mut self, mut o: RequestOutcome) {
        self.consumed += 1;
        let now = SystemTime::now();
        let started = now.checked_sub(o.latency).unwrap_or(now);
        let hour = started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 3600);
        self.pending.usage.add(&mut o, hour, started);
    }

    /// Adds a failure, recovery or activity signal.
    pub(crate) fn signal(&mut self, s: Signal) {
        match s {
            Signal::Failure(f) => {
                // Cooldowns must spread within milliseconds.
                self.pending.urgent |= matches!(
                    f.kind,
                    FailureKind::RateLimited
                        | FailureKind::Overloaded
                        | FailureKind::QuotaExhausted
                        | FailureKind::AuthFailed
                ) || f.ejected.is_some(); // so are ejections
                self.pending.failures.push(failure(f));
            }
            Signal::Recovered { backend_id, at } => self.pending.successes.push(BackendSuccess {
                backend_id: backend_id.to_string(),
                time: Some(at.into()),
            }),
            Signal::Activity { agent_id, at } => {
                self.pending.urgent |= self
                    .agents_reported
                    .get(&agent_id)
                    .is_none_or(|t| t.elapsed() >= ACTIVITY_QUIET);
                let e = self.pending.activity.entry(agent_id).or_insert((at, 0));
                e.0 = e.0.max(at);
                e.1 += 1;
            }
        }
    }

    /// True when the pending batch must be cut now (full, or a 429 waits).
    pub(crate) fn due(&self) -> bool {
        self.pending.urgent || self.pending.len() >= self.max_batch
    }

    /// Cuts the pending batch (with the demand since the last cut) into the
    /// buffer. Returns false when there was nothing to cut.
    pub(crate) fn cut(&mut self) -> bool {
        self.cut_batch(false)
    }

    /// Cuts the pending batch, even empty (a proxy leaving: a batch to be
    /// acknowledged). Returns whether a batch was cut.
    pub(crate) fn cut_even_empty(&mut self) -> bool {
        self.cut_batch(true)
    }

    /// Cuts an empty batch when nothing was cut for [`IDLE_BATCH_EVERY`]
    /// (less a flush tick) and
    /// every batch was acknowledged (a batch with events when there are
    /// any). Returns whether a batch was cut.
    pub(crate) fn keepalive(&mut self) -> bool {
        if !self.buffer.is_empty() || self.last_cut.elapsed() < self.idle_after {
            return false;
        }
        self.cut_batch(true)
    }

    fn cut_batch(&mut self, even_empty: bool) -> bool {
        let demand = self.take_demand();
        let key_demand = self.take_key_demand();
        let p = std::mem::take(&mut self.pending);
        let events = p.len() + demand.len() + key_demand.len();
        if events == 0 && !even_empty {
            return false;
        }
        let now = Instant::now();
        self.last_cut = now;
        self.agents_reported
            .retain(|_, t| now.saturating_duration_since(*t) < ACTIVITY_QUIET);
        for agent in p.activity.keys() {
            self.agents_reported.insert(agent.clone(), now);
        }
        let msg = StreamReportsRequest {
            node_id: self.node_id.clone(),
            stream_epoch: self.epoch.clone(),
            seq: 0,
            // Set on the message sent (`report::run`), never here: a
            // journaled batch replayed by the next process must not say it.
            leaving: false,
            usage: Vec::new(),
            key_demand,
            usage_aggregates: p
                .usage
                .sums
                .into_iter()
                .map(|(k, s)| UsageAggregate {
                    first_time: Some(s.first.into()),
                    last_time: Some(s.last.into()),
                    client_key_id: k.client_key_id.to_string(),
                    agent_id: k.agent_id.unwrap_or_default(),
                    model: k.model.to_string(),
                    backend_id: k.backend_id.map(|b| b.to_string()).unwrap_or_default(),
                    totals: Some(s.totals),
                    run_kind: k.run_kind.wire().to_string(),
                })
                .collect(),
            failures: p.failures,
            activity: p
                .activity
                .into_iter()
                .map(|(agent_id, (at, n))| AgentActivity {
                    agent_id,
                    last_seen: Some(at.into()),
                    requests: n,
                })
                .collect(),
            successes: p.successes,
            dropped_events: 0,
            demand,
        };
        let dropped = self.buffer.push(msg, events);
        self.journal_released();
        if let Some(j) = self.journal.as_mut()
            && let Some((m, e)) = self.buffer.newest()
        {
            j.batch(m, e, self.consumed);
        }
        if dropped > 0 {
            crate::metrics::report_events_dropped(dropped);
            tracing::warn!(
                dropped,
                dropped_total = self.buffer.dropped(),
                buffered = self.buffer.events(),
                "report buffer full: dropped the oldest unacknowledged events"
            );
        }
        crate::metrics::set_report_buffered(self.buffer.events());
        true
    }

    /// Requests per rpm-limited client key since the last cut (keys with
    /// none are left out).
    fn take_key_demand(&self) -> Vec<ClientKeyDemand> {
        let Some(snap) = self.store.load() else {
            return Vec::new();
        };
        snap.client_keys()
            .filter_map(|k| {
                let (requests, _) = k.rpm.as_ref()?.demand.take();
                (requests > 0).then(|| ClientKeyDemand {
                    key_id: k.id.to_string(),
                    requests,
                })
            })
            .collect()
    }

    fn take_demand(&self) -> Vec<BackendDemand> {
        let Some(snap) = self.store.load() else {
            return Vec::new();
        };
        snap.backends()
            .filter_map(|b| {
                let (requests, tokens) = b.runtime.demand.take();
                (requests > 0).then(|| BackendDemand {
                    backend_id: b.id.to_string(),
                    requests,
                    tokens,
                })
            })
            .collect()
    }
}

/// One request's usage, counted as the control plane counts a stored
/// `UsageEvent`: an error is a status of 400 or more; total = prompt +
/// completion; a cost that is not a number counts as 0.
fn request_totals(o: &RequestOutcome) -> UsageTotals {
    let u = o.usage.unwrap_or_default();
    UsageTotals {
        requests: 1,
        errors: u64::from(o.status >= 400),
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        cache_read_tokens: u.cache_read_tokens,
        cache_write_tokens: u.cache_write_tokens(),
        total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
        cost: o.cost.filter(|c| c.is_finite()).unwrap_or(0.0),
        streamed: u64::from(o.streamed),
        latency_ms_sum: millis(o.latency),
        translated: u64::from(o.translated),
    }
}

fn failure(f: Failure) -> UpstreamFailure {
    UpstreamFailure {
        time: Some(f.at.into()),
        backend_id: f.backend_id.to_string(),
        kind: match f.kind {
            FailureKind::RateLimited => WireFailureKind::RateLimited,
            FailureKind::ServerError => WireFailureKind::ServerError,
            FailureKind::Connect => WireFailureKind::Connect,
            FailureKind::Timeout => WireFailureKind::Timeout,
            FailureKind::StreamBroken => WireFailureKind::StreamBroken,
            FailureKind::Overloaded => WireFailureKind::Overloaded,
            FailureKind::QuotaExhausted => WireFailureKind::QuotaExhausted,
            FailureKind::AuthFailed => WireFailureKind::AuthFailed,
        } as i32,
        status: f.status.map_or(0, u32::from),
        retry_after_ms: f.retry_after.map_or(0, millis),
        consecutive: f.consecutive,
        ejected_ms: f.ejected.map_or(0, millis),
        cooldown_ms: f.cooldown.map_or(0, millis),
        summary: f.summary.to_string(),
    }
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Priority;
    use crate::stream::End;

    fn outcome(agent: Option<&str>) -> RequestOutcome {
        RequestOutcome {
            client_key_id: Arc::from("ck"),
            agent_id: agent.map(String::from),
            run_kind: RunKind::Interactive,
            model: Arc::from("m"),
            backend_id: Some(Arc::from("b")),
            status: 200,
            streamed: true,
            priority: Priority::Interactive,
            latency: Duration::from_millis(250),
            ttft: Some(Duration::from_millis(20)),
            attempts: 1,
            usage: Some(crate::usage::Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                total_tokens: 7,
                cache_read_tokens: 1,
                ..Default::default()
            }),
            usage_estimated: false,
            end: Some(End::ClientGone),
            cost: Some(0.5),
            translated: false,
        }
    }

    #[tokio::test]
    async fn batches_carry_usage_activity_failures_and_demand() {
        let store = SnapshotStore::default();
        store
            .apply(
                1,
                &claw_proto::v1::Snapshot {
                    version: 1,
                    backends: vec![crate::test_util::backend(
                        "b",
                        claw_proto::Pool::Primary,
                        &[("m", "m")],
                    )],
                    ..Default::default()
                },
            )
            .unwrap();
        let settings = ReportSettings {
            max_batch_events: 3,
            ..Default::default()
        };
        let mut c = Collector::new("n1".into(), store.clone(), &settings);
        assert!(!c.cut(), "empty batches are not cut");
        let rt = store.load().unwrap().backend("b").unwrap().runtime.clone();
        rt.demand.record(10.0);
        rt.demand.record(5.0);
        c.outcome(outcome(Some("ag")));
        let now = SystemTime::now();
        for _ in 0..3 {
            c.signal(Signal::Activity {
                agent_id: "ag".into(),
                at: now,
            });
        }
        assert!(c.due(), "the start of a conversation is cut at once");
        c.signal(Signal::Failure(Failure {
            at: now,
            backend_id: Arc::from("b"),
            kind: FailureKind::RateLimited,
            status: Some(429),
            retry_after: Some(Duration::from_secs(2)),
            consecutive: 2,
            cooldown: Some(Duration::from_secs(2)),
            ejected: None,
            summary: "rate limited",
        }));
        assert!(c.due(), "a 429 is sent at once");
        assert!(c.cut());
        let m = c.buffer().next_to_send().unwrap();
        assert_eq!((m.seq, m.node_id.as_str()), (1, "n1"));
        assert_eq!(m.stream_epoch.len(), 16);
        assert!(m.usage.is_empty(), "usage goes summed per bucket");
        let u = &m.usage_aggregates[0];
        let t = u.totals.as_ref().unwrap();
        assert_eq!(
            (
                t.requests,
                t.prompt_tokens,
                t.completion_tokens,
                t.cache_read_tokens
            ),
            (1, 3, 4, 1)
        );
        assert_eq!((t.streamed, t.latency_ms_sum, t.cost), (1, 250, 0.5));
        assert_eq!(
            (u.agent_id.as_str(), u.model.as_str(), u.backend_id.as_str()),
            ("ag", "m", "b")
        );
        assert_eq!(m.activity.len(), 1);
        assert_eq!(m.activity[0].requests, 3);
        let f = &m.failures[0];
        assert_eq!(f.kind, WireFailureKind::RateLimited as i32);
        assert_eq!(
            (f.retry_after_ms, f.consecutive, f.cooldown_ms, f.status),
            (2000, 2, 2000, 429)
        );
        assert_eq!(m.demand.len(), 1);
        assert_eq!((m.demand[0].requests, m.demand[0].tokens), (2, 15));
        assert!(!c.due());
        assert!(!c.cut(), "demand was taken");
    }

    /// A request that lands in the previous request's bucket (the shortcut)
    /// and one that returns to an earlier bucket (the map) sum alike.
    #[test]
    fn runs_of_one_bucket_and_returns_to_an_earlier_one_sum_alike() {
        let mut c = Collector::new(
            "n1".into(),
            SnapshotStore::default(),
            &ReportSettings::default(),
        );
        // Agents in runs, coming back to earlier buckets: a, a, a, b, b, a, c, a.
        let order = ["a", "a", "a", "b", "b", "a", "c", "a"];
        for (i, agent) in order.iter().enumerate() {
            let mut o = outcome(Some(agent));
            o.usage = Some(crate::usage::Usage {
                prompt_tokens: 1 << i,
                completion_tokens: 0,
                total_tokens: 1 << i,
                ..Default::default()
            });
            c.outcome(o);
        }
        assert!(c.cut());
        let m = c.buffer().next_to_send().unwrap();
        let mut rows: Vec<(String, u64, u64)> = m
            .usage_aggregates
            .iter()
            .map(|a| {
                let t = a.totals.unwrap();
                (a.agent_id.clone(), t.requests, t.prompt_tokens)
            })
            .collect();
        rows.sort();
        let expected = |agent: &str| -> (String, u64, u64) {
            let mine = order.iter().enumerate().filter(|(_, a)| **a == agent);
            let (n, tokens) = mine.fold((0, 0), |(n, t), (i, _)| (n + 1, t + (1u64 << i)));
            (agent.to_string(), n, tokens)
        };
        assert_eq!(rows, vec![expected("a"), expected("b"), expected("c")]);
    }

    /// One agent's heartbeat runs and its own conversation share every
    /// other dimension yet land in two buckets, the heartbeat one marked.
    #[test]
    fn heartbeat_runs_are_summed_apart_from_the_agents_own_traffic() {
        let mut c = Collector::new(
            "n1".into(),
            SnapshotStore::default(),
            &ReportSettings::default(),
        );
        for kind in [
            RunKind::Interactive,
            RunKind::Heartbeat,
            RunKind::Interactive,
            RunKind::Heartbeat,
            RunKind::Heartbeat,
        ] {
            let mut o = outcome(Some("ag"));
            o.run_kind = kind;
            c.outcome(o);
        }
        assert!(c.cut());
        let m = c.buffer().next_to_send().unwrap();
        let mut rows: Vec<(String, String, u64)> = m
            .usage_aggregates
            .iter()
            .map(|a| {
                (
                    a.agent_id.clone(),
                    a.run_kind.clone(),
                    a.totals.unwrap().requests,
                )
            })
            .collect();
        rows.sort();
        assert_eq!(
            rows,
            vec![
                ("ag".to_string(), String::new(), 2),
                ("ag".to_string(), "heartbeat".to_string(), 3),
            ]
        );
    }

    /// Requests are summed per (hour, key, agent, model, backend): a batch
    /// carries one row per bucket whatever the request count, and the rows
    /// add up to exactly what the requests were.
    #[test]
    fn usage_is_summed_per_bucket() {
        let mut c = Collector::new(
            "n1".into(),
            SnapshotStore::default(),
            &ReportSettings::default(),
        );
        for i in 0..1000u64 {
            let mut o = outcome(if i % 2 == 0 { Some("even") } else { None });
            o.status = if i % 10 == 0 { 500 } else { 200 };
            o.streamed = i % 4 == 0;
            o.usage = Some(crate::usage::Usage {
                prompt_tokens: i,
                completion_tokens: 1,
                total_tokens: i + 1,
                ..Default::default()
            });
            c.outcome(o);
        }
        let mut other = outcome(None);
        other.backend_id = None;
        other.status = 503;
        other.usage = None;
        other.cost = None;
        c.outcome(other);
        assert!(!c.due(), "1001 requests are 3 rows, not a full batch");
        assert!(c.cut());
        let m = c.buffer().next_to_send().unwrap();
        let mut rows: Vec<_> = m
            .usage_aggregates
            .iter()
            .map(|a| {
                let t = a.totals.unwrap();
                let (first, last) = (a.first_time.unwrap(), a.last_time.unwrap());
                assert!(first.seconds <= last.seconds);
                assert_eq!(
                    first.seconds / 3600,
                    last.seconds / 3600,
                    "one hour per row"
                );
                (a.agent_id.clone(), a.backend_id.clone(), t)
            })
            .collect();
        rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        assert_eq!(rows.len(), 3, "{rows:?}");
        let (none_nobackend, none, even) = (&rows[0].2, &rows[1].2, &rows[2].2);
        assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("", ""));
        assert_eq!((none_nobackend.requests, none_nobackend.errors), (1, 1));
        assert_eq!(none_nobackend.total_tokens, 0);
        assert_eq!((none.requests, even.requests), (500, 500));
        assert_eq!((none.errors, even.errors), (0, 100));
        assert_eq!(even.streamed, 250);
        let prompt: u64 = (0..1000).sum();
        assert_eq!(none.prompt_tokens + even.prompt_tokens, prompt);
        assert_eq!(none.total_tokens + even.total_tokens, prompt + 1000);
        assert_eq!(none.latency_ms_sum + even.latency_ms_sum, 250 * 1000);
        assert!((none.cost + even.cost - 500.0).abs() < 1e-9);
    }

    /// Requests that started in different UTC hours land in different rows.
    #[test]
    fn usage_rows_do_not_span_hours() {
        let mut c = Collector::new(
            "n1".into(),
            SnapshotStore::default(),
            &ReportSettings::default(),
        );
        c.outcome(outcome(None));
        let mut old = outcome(None);
        old.latency = Duration::from_secs(2 * 3600);
        c.outcome(old);
        assert!(c.cut());
        let m = c.buffer().next_to_send().unwrap();
        assert_eq!(m.usage_aggregates.len(), 2);
        let mut hours: Vec<i64> = m
            .usage_aggregates
            .iter()
            .map(|a| a.first_time.unwrap().seconds / 3600)
            .collect();
        hours.sort_unstable();
        assert!(hours[1] - hours[0] >= 1, "{hours:?}");
    }

    /// Regression: an idle proxy never reported, so the control plane held
    /// its whole past share against the others for a minute (a proxy that
    /// joined after it got a rate share of 0).
    #[tokio::test(start_paused = true)]
    async fn the_start_of_a_conversation_is_reported_at_once() {
        let mut c = Collector::new(
            "n1".into(),
            SnapshotStore::default(),
            &ReportSettings::default(),
        );
        let seen = |agent: &str| Signal::Activity {
            agent_id: agent.into(),
            at: SystemTime::now(),
        };
        c.signal(seen("a"));
        assert!(c.due(), "a new conversation does not wait for the tick");
        assert!(c.cut());
        // The same conversation goes on: on the tick.
        tokio::time::advance(Duration::from_secs(2)).await;
        c.signal(seen("a"));
        assert!(!c.due());
        // Another agent starts one.
        c.signal(seen("b"));
        assert!(c.due());
        assert!(c.cut());
        // `a` quiet for longer than ACTIVITY_QUIET: a new conversation again.
        tokio::time::advance(ACTIVITY_QUIET).await;
        c.signal(seen("a"));
        assert!(c.due());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connected_proxy_sends_an_empty_batch_every_second() {
        // Ticks shorter than the idle second.
        let settings = ReportSettings {
            flush_interval: Duration::from_millis(100),
            ..ReportSettings::default()
        };
        let mut c = Collector::new("n1".into(), SnapshotStore::default(), &settings);
        assert!(!c.keepalive(), "not idle long enough");
        tokio::time::advance(IDLE_BATCH_EVERY).await;
        assert!(c.keepalive());
        assert_eq!(c.buffer().len(), 1);
        tokio::time::advance(IDLE_BATCH_EVERY).await;
        assert!(!c.keepalive(), "the last one is not acknowledged yet");
        c.buffer().ack(1);
        assert!(c.keepalive());
        assert!(!c.keepalive(), "one per idle second");
    }

    /// Every protocol's answers, parsed and priced as the proxy does and
    /// summed into batches (over two buckets and two cuts): the totals equal,
    /// to the token, the sums of what the payloads' usage blocks said, and
    /// the cost the formula on those numbers.
    #[test]
    fn totals_equal_to_the_token_the_sums_the_providers_reported() {
        use crate::usage::samples::ALL;
        use crate::usage::{Prices, SseUsage, Usage};
        let prices = Prices {
            input: 3e-6,
            output: 15e-6,
            cache_read: 0.3e-6,
            cache_write: 3.75e-6,
            cache_write_1h: 6e-6,
        };
        let mut c = Collector::new(
            "n1".into(),
            SnapshotStore::default(),
            &ReportSettings::default(),
        );
        let (mut prompt, mut read, mut write, mut out, mut cost) = (0u64, 0u64, 0u64, 0u64, 0.0);
        let mut totals = UsageTotals::default();
        for round in 0..3 {
            for (i, s) in ALL.iter().enumerate() {
                let usage = if s.sse {
                    let mut scanner = SseUsage::reading(s.dialect);
                    scanner.observe(s.body.as_bytes());
                    scanner.finish();
                    scanner.tally().usage
                } else {
                    Usage::from_answer(s.dialect, s.body.as_bytes())
                };
                let usage = usage.unwrap_or_else(|| panic!("{}: no usage", s.name));
                let mut o = outcome(Some(if i % 2 == 0 { "even" } else { "odd" }));
                o.usage = Some(usage);
                o.cost = Some(usage.cost(&prices));
                c.outcome(o);
                let writes = s.cache_write_5m + s.cache_write_1h;
                prompt += s.prompt();
                read += s.cache_read;
                write += writes;
                out += s.output;
                let uncached = s.prompt() - s.cache_read - writes;
                cost += uncached as f64 * 3e-6
                    + s.cache_read as f64 * 0.3e-6
                    + s.cache_write_5m as f64 * 3.75e-6
                    + s.cache_write_1h as f64 * 6e-6
                    + s.output as f64 * 15e-6;
            }
            if round != 1 {
                assert!(c.cut());
                while let Some(m) = c.buffer().next_to_send() {
                    let seq = m.seq;
                    for a in &m.usage_aggregates {
                        totals += a.totals.as_ref().unwrap();
                    }
                    c.buffer().ack(seq);
                }
            }
        }
        let n = 3 * ALL.len() as u64;
        assert_eq!(totals.requests, n);
        assert_eq!(
            (
                totals.prompt_tokens,
                totals.cache_read_tokens,
                totals.cache_write_tokens,
                totals.completion_tokens,
                totals.total_tokens
            ),
            (prompt, read, write, out, prompt + out)
        );
        assert!(write > 0 && read > 0, "the samples hold cache traffic");
        assert!(
            (totals.cost - cost).abs() < 1e-12,
            "{} vs {cost}",
            totals.cost
        );
    }

    #[test]
    fn overload_and_spent_quota_go_out_at_once_as_their_own_kinds() {
        for (kind, wire) in [
            (FailureKind::Overloaded, WireFailureKind::Overloaded),
            (FailureKind::QuotaExhausted, WireFailureKind::QuotaExhausted),
            (FailureKind::AuthFailed, WireFailureKind::AuthFailed),
        ] {
            let mut c = Collector::new(
                "n1".into(),
                SnapshotStore::default(),
                &ReportSettings::default(),
            );
            c.signal(Signal::Failure(Failure {
                at: SystemTime::now(),
                backend_id: Arc::from("b"),
                kind,
                status: Some(if kind == FailureKind::Overloaded {
                    529
                } else {
                    429
                }),
                retry_after: Some(Duration::from_secs(7200)),
                consecutive: 1,
                cooldown: Some(Duration::from_secs(7200)),
                ejected: None,
                summary: "out",
            }));
            assert!(c.due(), "{kind:?} is sent at once");
            assert!(c.cut());
            let m = c.buffer().next_to_send().unwrap();
            assert_eq!(m.failures[0].kind, wire as i32);
            assert_eq!(m.failures[0].retry_after_ms, 7_200_000);
        }
    }

    #[test]
    fn an_ejecting_failure_goes_out_at_once_with_its_ejection() {
        let mut c = Collector::new(
            "n1".into(),
            SnapshotStore::default(),
            &ReportSettings::default(),
        );
        let b: Arc<str> = Arc::from("b");
        c.signal(Signal::failure(
            &b,
            FailureKind::Connect,
            None,
            "connect error",
        ));
        assert!(!c.due(), "a plain connect failure waits for the batch");
        c.signal(
            Signal::failure(
                &b,
                FailureKind::ServerError,
                Some(503),
                "upstream server error",
            )
            .with_ejection(Some(Duration::from_secs(30))),
        );
        assert!(c.due(), "an ejection is sent at once");
        assert!(c.cut());
        let m = c.buffer().next_to_send().unwrap();
        let ejected: Vec<u64> = m.failures.iter().map(|f| f.ejected_ms).collect();
        assert_eq!(ejected, [0, 30_000]);
    }

    /// The journal's exactly-once bookkeeping across a crash: outcomes
    /// queued through the journal, some cut into a batch, some still
    /// pending, the proxy gone: the batch comes back under its identity and
    /// the pending outcomes once, under the new epoch; a rewrite past the
    /// bound drops the oldest batches, counted as dropped events.
    #[test]
    fn a_journal_replays_cut_batches_and_pending_outcomes_once() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::config::UsageJournal {
            path: dir.path().join("usage.journal"),
            max_bytes: 64 * 1024,
        };
        let requests = |m: &StreamReportsRequest| -> u64 {
            m.usage_aggregates
                .iter()
                .map(|a| a.totals.unwrap().requests)
                .sum()
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        {
            let opened = Journal::open(&settings, "n1", "e1".into(), 500).unwrap();
            let log = opened.journal.outcome_log();
            let mut c = Collector::new(
                "n1".into(),
                SnapshotStore::default(),
                &ReportSettings::default(),
            );
            c.resume(opened);
            for _ in 0..5 {
                use crate::events::OutcomeJournal as _;
                assert!(log.send(&tx, outcome(Some("a"))));
            }
            for _ in 0..3 {
                c.outcome(rx.try_recv().unwrap());
            }
            assert!(c.cut());
            for _ in 0..2 {
                c.outcome(rx.try_recv().unwrap());
            }
            // Crash: the pending two were never cut.
        }
        let opened = Journal::open(&settings, "n1", "e2".into(), 500).unwrap();
        let got: Vec<(String, u64, u64)> = opened
            .batches
            .iter()
            .map(|(m, _)| (m.stream_epoch.clone(), m.seq, requests(m)))
            .collect();
        assert_eq!(got, vec![("e1".into(), 1, 3), ("e2".into(), 1, 2)]);
        let mut c = Collector::new(
            "n1".into(),
            SnapshotStore::default(),
            &ReportSettings::default(),
        );
        c.resume(opened);
        let sent: Vec<(String, u64)> = std::iter::from_fn(|| c.buffer().next_to_send())
            .map(|m| (m.stream_epoch, m.seq))
            .collect();
        assert_eq!(sent, vec![("e1".into(), 1), ("e2".into(), 1)]);
        // Both acknowledged: nothing is replayed after another crash.
        assert_eq!(c.ack(1), 1);
        assert_eq!(c.ack(1), 1);
        assert!(c.buffer().is_empty());
        // Many large batches never acknowledged: the rewrite keeps the newest.
        for i in 0..40 {
            let mut o = outcome(Some(&format!(
                "agent-with-a-long-name-{i:04}-{}",
                "x".repeat(2000)
            )));
            o.model = Arc::from("m");
            c.outcome(o);
            c.cut();
        }
        c.rewrite_journal(|c| {
            c.cut();
        });
        assert!(c.buffer().dropped() > 0, "nothing dropped");
        let size = c.journal.as_ref().unwrap().records_len();
        assert!(size <= settings.max_bytes / 2, "{size} bytes");
        drop(c);
        let opened = Journal::open(&settings, "n1", "e3".into(), 500).unwrap();
        assert!(!opened.batches.is_empty());
        assert!(opened.batches.iter().all(|(m, _)| m.stream_epoch == "e2"));
    }
}

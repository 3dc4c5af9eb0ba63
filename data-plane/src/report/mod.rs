//! The report client: one bidirectional `ReportService.StreamReports`
//! stream to the control plane, carrying what this proxy observed.
//!
//! A single task owns everything: the request path only `try_send`s into its
//! channels ([`crate::events`]) and bumps per-backend demand counters, so it
//! never waits on reporting. The task folds what arrives into the pending
//! batch ([`batch`]), cuts batches into the resend buffer ([`buffer`]) and
//! moves them over the stream:
//!
//! - **Cutting.** A batch is cut on every tick of `flush_interval` while
//!   connected ([`ReportSettings::flush_interval`]), as soon as the collector
//!   says one is due ([`Collector::due`]), and as an empty keep-alive after
//!   [`IDLE_BATCH_EVERY`] of silence while connected and fully acknowledged.
//!   While disconnected a batch grows until it is full (its usage keeps
//!   summing into the buckets it already holds).
//! - **Outcomes** are drained from their channel on the tick (or when the
//!   channel reports a backlog), not received one by one; signals (429s,
//!   recoveries, activity) wake the task at once.
//! - **Numbering.** `stream_epoch` is random per process; `seq` counts from
//!   1. The control plane stores a batch once per (node, epoch, seq).
//! - **Connection.** The control-plane channel and proxy token of
//!   [`crate::cp_channel`]; a bare hello (`seq` 0) opens the stream; every
//!   unacknowledged batch is resent after a reconnect, which waits the shared
//!   [`crate::cp_channel::Backoff`] (reset after a healthy stream: one that
//!   got an ACK and lived [`crate::cp_channel::HEALTHY_AFTER`]).
//! - **Leaving.** When the shutting-down proxy stops accepting, every
//!   fleet-shared limiter applies a share of 0 ([`crate::Fleet::leave`])
//!   and *then* `leaving` resolves: the task sends a bare hello marked
//!   `leaving` (and marks every later stream's hello so), cuts a batch
//!   (even empty) and marks every batch it sends from then on, so that at
//!   least one acknowledged message says it within the shutdown grace; the
//!   control plane releases this proxy's rate shares at once. The mark is
//!   set on the message sent, never in the buffer or the journal (a journal
//!   replayed by the next process must not say it).
//! - **Shutdown.** The pending batch is cut and the task waits up to
//!   `shutdown_grace` for the buffer to be acknowledged.
//! - **Journal** (optional, [`journal`]): every outcome and every batch is
//!   also appended to a file, synced before a batch goes out, so a proxy
//!   killed mid-load replays what was not acknowledged when it restarts.
//!   Without it, a crash loses what was not acknowledged yet: at most one
//!   report interval of usage while connected.

pub(crate) mod batch;
pub(crate) mod buffer;
pub(crate) mod journal;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use claw_proto::v1::report_service_client::ReportServiceClient;
use claw_proto::v1::{StreamReportsRequest, StreamReportsResponse};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

pub(crate) use batch::{Collector, new_epoch};

use crate::config::ReportSettings;
use crate::cp_channel::{Backoff, ProxyToken};
use crate::events::{RequestOutcome, Signal};
use crate::snapshot::SnapshotStore;
use batch::millis;

/// Where to report and how to batch.
#[derive(Clone)]
pub(crate) struct ReportConfig {
    /// Control plane URL (and CA).
    pub url: crate::cp_channel::ControlPlaneUrl,
    /// Proxy token.
    pub proxy_token: ProxyToken,
    /// This proxy's node id.
    pub node_id: String,
    /// Batching.
    pub settings: ReportSettings,
}

type Link = (
    mpsc::Sender<StreamReportsRequest>,
    Streaming<StreamReportsResponse>,
);
type Connecting = Pin<Box<dyn Future<Output = anyhow::Result<Link>> + Send>>;

async fn connect(config: ReportConfig, hello: StreamReportsRequest) -> anyhow::Result<Link> {
    let channel = crate::cp_channel::connect_authorized(&config.url, &config.proxy_token).await?;
    let mut client = ReportServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(64);
    tx.send(hello).await?;
    let request = tonic::Request::new(ReceiverStream::new(rx));
    let inbound = client.stream_reports(request).await?.into_inner();
    Ok((tx, inbound))
}

async fn next_ack(
    inbound: &mut Option<Streaming<StreamReportsResponse>>,
) -> Option<Result<StreamReportsResponse, tonic::Status>> {
    match inbound {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn reserve(
    tx: Option<&mpsc::Sender<StreamReportsRequest>>,
    ready: bool,
) -> Result<mpsc::OwnedPermit<StreamReportsRequest>, mpsc::error::SendError<()>> {
    match tx {
        Some(tx) if ready => tx.clone().reserve_owned().await,
        _ => std::future::pending().await,
    }
}

async fn connected(c: &mut Option<Connecting>) -> anyhow::Result<Link> {
    match c {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Folds every queued outcome into the pending batch (cutting it whenever
/// it is full).
fn drain(c: &mut Collector, outcomes: &mut mpsc::Receiver<RequestOutcome>, open: &mut bool) {
    while *open {
        match outcomes.try_recv() {
            Ok(o) => {
                c.outcome(o);
                if c.due() {
                    c.cut();
                }
            }
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => *open = false,
        }
    }
}

/// The hello that opens a stream, marked `leaving` once the proxy left.
fn hello(c: &Collector, leaving: bool) -> StreamReportsRequest {
    StreamReportsRequest {
        leaving,
        ..c.hello()
    }
}

/// Says that this proxy is leaving: at once on a bare hello on the open
/// stream (if any; not stored, not acknowledged, repeated on the hello of
/// any later stream), and on every batch sent from now on, which are
/// acknowledged — one is cut now, even empty, so that the shutdown grace
/// waits for at least one. None arriving leaves the control plane's usual
/// hold.
fn say_leaving(tx: Option<&mpsc::Sender<StreamReportsRequest>>, c: &mut Collector) {
    if let Some(tx) = tx
        && tx.try_send(hello(c, true)).is_err()
    {
        let (tx, msg) = (tx.clone(), hello(c, true));
        tokio::spawn(async move {
            let _ = tx.send(msg).await;
        });
    }
    c.cut_even_empty();
    tracing::info!(
        connected = tx.is_some(),
        "leaving: rate shares handed back to the control plane"
    );
}

/// Runs the collector and the report stream until `shutdown` resolves, then
/// flushes (bounded by the shutdown grace) and returns. Once `leaving`
/// resolves (every fleet-shared limiter applies 0), the control plane is
/// told so.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    config: ReportConfig,
    store: SnapshotStore,
    mut outcomes: mpsc::Receiver<RequestOutcome>,
    backlog: Arc<tokio::sync::Notify>,
    mut signals: mpsc::Receiver<Signal>,
    journal: Option<journal::Opened>,
    leaving: impl Future<Output = ()>,
    shutdown: impl Future<Output = ()>,
) {
    let mut c = Collector::new(config.node_id.clone(), store, &config.settings);
    if let Some(opened) = journal {
        journal::describe();
        c.resume(opened);
    }
    let mut tick = tokio::time::interval(config.settings.flush_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut backoff = Backoff::default();
    let mut tx: Option<mpsc::Sender<StreamReportsRequest>> = None;
    let mut inbound: Option<Streaming<StreamReportsResponse>> = None;
    let mut left = false;
    let mut connecting: Option<Connecting> =
        Some(Box::pin(connect(config.clone(), hello(&c, left))));
    let mut retry_at: Option<Instant> = None;
    let mut stream_started = Instant::now();
    let mut acked_on_stream = false;
    let (mut outcomes_open, mut signals_open) = (true, true);
    let mut grace: Option<Instant> = None;
    crate::metrics::set_report_connected(false);
    tokio::pin!(shutdown);
    tokio::pin!(leaving);

    loop {
        if grace.is_some() && c.buffer().is_empty() && c.pending_events() == 0 {
            break;
        }
        let ready = c.buffer().has_unsent();
        let mut lost: Option<String> = None;
        tokio::select! {
            s = signals.recv(), if signals_open => match s {
                Some(s) => {
                    c.signal(s);
                    if c.due() {
                        c.cut();
                    }
                }
                None => signals_open = false,
            },
            _ = tick.tick() => {
                // Outcomes are drained on the tick, not received one by one:
                // waking this task for every request cost the request path a
                // cross-thread wake-up (futex, eventfd) per request, about a
                // third of the proxy's CPU per request at concurrency 1.
                drain(&mut c, &mut outcomes, &mut outcomes_open);
                if c.journal_wants_rewrite() {
                    c.rewrite_journal(|c| {
                        drain(c, &mut outcomes, &mut outcomes_open);
                        c.cut();
                    });
                }
                // While disconnected a batch grows until it is full.
                if (tx.is_some() || c.due()) && !c.cut() && tx.is_some() {
                    c.keepalive();
                }
                crate::metrics::set_report_buffered(c.buffer().events() + c.pending_events());
            }
            // A busy proxy: drained before the channel fills, cut on the tick.
            _ = backlog.notified(), if outcomes_open => drain(&mut c, &mut outcomes, &mut outcomes_open),
            ack = next_ack(&mut inbound) => match ack {
                Some(Ok(resp)) => {
                    let n = c.ack(resp.acked_seq);
                    if n > 0 {
                        acked_on_stream = true;
                        crate::metrics::report_batches_acked(n);
                        crate::metrics::set_report_buffered(c.buffer().events());
                    }
                }
                Some(Err(e)) => lost = Some(e.to_string()),
                None => lost = Some("closed by the control plane".into()),
            },
            permit = reserve(tx.as_ref(), ready) => match permit {
                Ok(permit) => {
                    if let Some(mut msg) = c.buffer().next_to_send() {
                        // Marked when sent, never in the buffer or the journal.
                        msg.leaving = left;
                        c.before_send().await;
                        permit.send(msg);
                        crate::metrics::report_batch_sent();
                    }
                }
                Err(_) => lost = Some("request stream closed".into()),
            },
            link = connected(&mut connecting) => {
                connecting = None;
                match link {
                    Ok((t, i)) => {
                        tx = Some(t);
                        inbound = Some(i);
                        c.buffer().rewind();
                        stream_started = Instant::now();
                        acked_on_stream = false;
                        crate::metrics::set_report_connected(true);
                        let unacked = c.buffer().len();
                        tracing::info!(url = %config.url, epoch = %c.epoch(), unacked, "report stream open");
                    }
                    Err(e) => lost = Some(format!("{e:#}")),
                }
            }
            _ = until(retry_at) => {
                retry_at = None;
                connecting = Some(Box::pin(connect(config.clone(), hello(&c, left))));
            }
            () = &mut leaving, if !left => {
                left = true;
                say_leaving(tx.as_ref(), &mut c);
            }
            _ = until(grace) => break,
            _ = &mut shutdown, if grace.is_none() => {
                // The leave comes before the shutdown; both may be ready
                // here, and the loop may end before polling it again.
                if !left && futures::FutureExt::now_or_never(&mut leaving).is_some() {
                    left = true;
                    say_leaving(tx.as_ref(), &mut c);
                }
                // What the last requests left in the channels goes too.
                while let Ok(o) = outcomes.try_recv() {
                    c.outcome(o);
                }
                while let Ok(s) = signals.try_recv() {
                    c.signal(s);
                }
                c.cut();
                grace = Some(Instant::now() + config.settings.shutdown_grace);
            }
        }
        if let Some(reason) = lost {
            tx = None;
            inbound = None;
            crate::metrics::set_report_connected(false);
            let delay = backoff.after_stream(acked_on_stream, stream_started.elapsed());
            tracing::warn!(error = %reason, delay_ms = millis(delay), unacked = c.buffer().len(), "report stream lost; reconnecting");
            retry_at = Some(Instant::now() + delay);
        }
    }
    if !c.buffer().is_empty() {
        tracing::warn!(
            unacked_batches = c.buffer().len(),
            events = c.buffer().events(),
            "shutting down with unacknowledged reports"
        );
    }
    crate::metrics::set_report_connected(false);
}

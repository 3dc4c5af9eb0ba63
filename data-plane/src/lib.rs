//! `claw-data-plane`: the Claw Gateway proxy — the OpenAI-compatible and
//! Anthropic Messages HTTP API that routes, rate-limits, cools down, retries
//! and streams. Each endpoint goes only to backends of its own protocol
//! (`openai`: chat, completions, embeddings, responses; `anthropic`:
//! messages, count_tokens), bodies byte-faithful but for `model`.
//!
//! The request path is a stack of tower layers, outermost first:
//!
//! 1. `auth` — `Authorization: Bearer <client key>` or `x-api-key` → SHA-256
//!    → key (401).
//! 2. `limits` — the key's rpm (429).
//! 3. `route` — resolves the endpoint (404 listing them, 405), reads and
//!    parses the body once (400/408/413), resolves the canonical model in
//!    the endpoint's protocol (404) and checks the key may use it (403);
//!    serves `/v1/models[/{id}]` from the snapshot.
//! 4. `retry` — per attempt: admission in routing order (`select`:
//!    candidates, queueing, emergency), the upstream call, classification of
//!    the answer and the reaction (429 cooldowns, quota exhaustion, 529
//!    holds, outlier ejection, stored-response probing), retries before the
//!    first byte.
//! 5. `upstream` — the pooled HTTP(S) client and header hygiene.
//!
//! The layers hand inward the typed requests of `target`; every request
//! ends in one outcome, accounted by `accounting`.
//!
//! Around it:
//!
//! - `config` — typed configuration ([`Config`]); `main.rs` owns flags and env.
//! - [`cp_channel`] — the control-plane client plumbing shared by discovery
//!   and report: the gRPC channel (plain or TLS, public roots or
//!   `--control-plane-ca`), the proxy-token interceptor, the reconnect
//!   backoff and its healthy-stream rule.
//! - [`tls`] — the TLS server config of the HTTP listener (reloading cert).
//! - `snapshot` — the compiled configuration in an `ArcSwap` (compiled and
//!   validated in `snapshot/compile.rs`), with the runtime state (rate
//!   limiters, cooldowns, queues) carried across snapshots.
//! - `discovery` — the `StreamConfig` stream to the control plane (ACK/NACK
//!   of snapshots, incremental cooldowns and rate shares).
//! - `snapshot_cache` — the optional encrypted last-known-good snapshot on
//!   disk, loaded before the first connection.
//! - `fleet` — this proxy's shares of cluster-wide limits, the fleet size,
//!   degraded mode when the control plane is gone for a minute.
//! - `report` — the `StreamReports` stream: the stream loop, the batch
//!   collector with its usage buckets (`report::batch`) and the bounded
//!   resend buffer (`report::buffer`).
//! - `json` — allocation-free JSON scanning (request fields, answer usage).
//! - `usage` — usage from JSON bodies and SSE streams; asking the upstream
//!   for stream usage and hiding it from clients that did not.
//! - `ratelimit` — GCRA rate limiters: at most `share × limit` plus a
//!   small burst in any trailing minute (backend rpm/tpm, emergency, key rpm).
//! - `cooldown` — 429 cooldowns: the per-backend state machine, the
//!   backoff and `Retry-After` (`cooldown::state`, a leaf), and the handle
//!   that starts local cooldowns, applies remote ones and announces them.
//! - `outlier` — passive ejection of failing backends.
//! - `health` — the fleet-wide health marks the control plane pushes (cap and
//!   fail open in `select`).
//! - `queue` — the bounded priority queue for rate-limited requests.
//! - [`stream`] — pass-through response bodies, SSE error event on mid-stream
//!   failure, background drain of answers whose client left.
//! - `target` — the typed requests the layers hand inward
//!   (`Authenticated`, `Routed`, `RequestBody`).
//! - `accounting` — per-request accounting: the response tracker, in-flight
//!   counts, abandoned requests, one `RequestOutcome` per request.
//! - `run_kind` — `x-claw-run-kind`: heartbeat runs accounted apart from
//!   interactive traffic, and never agent activity.
//! - `body` — the response body type.
//! - `error` — the one renderer of the proxy's own errors, in the client's
//!   shape (OpenAI, or Anthropic for `/v1/messages*`).
//! - `responses` — which backend holds a stored OpenAI response.
//! - `events` — per-request [`events::RequestOutcome`]s and failure/activity
//!   `events::Signal`s into bounded channels.
//! - `metrics` — Prometheus metrics (`/metrics`): every `claw_dp_*` name
//!   and the recorders of the code outside the request path.
//! - `server` — connections, timeouts, health/readiness, panics, draining.
//! - `io` — the client connection's IO wrappers: read activity, the 408 for
//!   a late head, the write timeout, JSON for hyper's own 400/414/431.
//! - `test_util` — snapshot fixtures for tests (the `test-util` feature).
//!
//! [`run`] serves a bound listener until a shutdown future resolves;
//! [`Proxy`] does the same and exposes the hooks (cooldowns, rate shares,
//! outcomes) the reporting side plugs into.

mod accounting;
mod affinity;
mod auth;
mod body;
mod config;
mod cooldown;
pub mod cp_channel;
mod discovery;
mod error;
mod events;
mod fleet;
mod health;
mod io;
mod json;
pub mod key_limits;
mod limits;
mod metrics;
mod outlier;
mod queue;
mod ratelimit;
mod report;
mod responses;
mod retry;
mod route;
mod run_kind;
mod select;
mod server;
pub use claw_tls::listener::bind as bind_listener;
mod snapshot;
mod snapshot_cache;
pub mod stream;
mod target;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod tls;
mod translate;
mod upstream;
mod usage;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot};

pub use config::{
    Config, ConfigSource, DEFAULT_USAGE_JOURNAL_BYTES, ReportSettings, ServerLimits, UsageJournal,
};
pub use cooldown::{CooldownEvent, Cooldowns};
pub use events::RequestOutcome;
pub use fleet::Fleet;
pub use snapshot::SnapshotStore;

/// A proxy, before it serves: its hooks can be taken first.
pub struct Proxy {
    config: Config,
    store: SnapshotStore,
    cooldowns: Cooldowns,
    fleet: Fleet,
    events: events::EventSink,
    outcomes: Option<mpsc::Receiver<RequestOutcome>>,
    /// Notified when the outcome channel fills up ([`events::EventStreams::backlog`]).
    backlog: Arc<tokio::sync::Notify>,
    signals: Option<mpsc::Receiver<events::Signal>>,
    /// The usage journal, opened and recovered (`--usage-journal`).
    journal: Option<report::journal::Opened>,
}

impl Proxy {
    /// Builds a proxy; a static snapshot is applied at once.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let store = SnapshotStore::default();
        if let ConfigSource::Static(snap) = &config.source {
            store
                .apply(snap.version.max(1), &with_version(snap))
                .context("invalid static snapshot")?;
        }
        let cooldowns = Cooldowns::new(store.clone());
        let journal = match (&config.usage_journal, &config.source) {
            (Some(j), ConfigSource::ControlPlane { .. }) => Some(report::journal::Journal::open(
                j,
                &config.node_id,
                report::new_epoch(),
                config.report.max_batch_events,
            )?),
            _ => None,
        };
        let (mut events, streams) = events::channel(config.events_capacity);
        if let Some(j) = &journal {
            events.set_journal(j.journal.outcome_log());
        }
        let fleet = Fleet::new(store.clone());
        Ok(Proxy {
            journal,
            config,
            store,
            cooldowns,
            fleet,
            events,
            outcomes: Some(streams.outcomes),
            signals: Some(streams.signals),
            backlog: streams.backlog,
        })
    }

    /// The snapshot store (current configuration).
    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    /// The cooldown handle: apply remote cooldowns, subscribe to local ones.
    pub fn cooldowns(&self) -> &Cooldowns {
        &self.cooldowns
    }

    /// Rate shares, fleet size and degraded mode.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// Local cooldown events (shorthand for `cooldowns().subscribe()`).
    pub fn subscribe_cooldowns(&self) -> broadcast::Receiver<CooldownEvent> {
        self.cooldowns.subscribe()
    }

    /// Takes the request-outcome receiver. If nobody takes it, outcomes are
    /// drained and discarded.
    pub fn take_outcomes(&mut self) -> Option<mpsc::Receiver<RequestOutcome>> {
        self.outcomes.take()
    }

    /// Sets this proxy's share of a backend's cluster-wide rpm/tpm (as if
    /// the control plane had assigned it). Returns false when the backend is
    /// not in the current snapshot.
    pub fn set_rate_share(&self, backend_id: &str, share: f64) -> bool {
        self.fleet.set_share(backend_id, share, share)
    }

    /// Serves `listener` until `shutdown` resolves, then drains.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        self.serve_with_metrics(listener, None, shutdown).await
    }

    /// Like [`Proxy::serve`]; with `metrics`, `/metrics` (and `/healthz`)
    /// are served on that listener, plain HTTP, and `/metrics` is no longer
    /// on `listener` (404).
    pub async fn serve_with_metrics(
        mut self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        metrics::install();
        // Outcomes someone took are not reported: the reporter gets a closed channel.
        let outcomes = self.outcomes.take().unwrap_or_else(|| mpsc::channel(1).1);
        let signals = self.signals.take().unwrap_or_else(|| mpsc::channel(1).1);
        let mut background = Vec::new();
        let (report_stop, report_stopped) = oneshot::channel::<()>();
        // Sent once every fleet-shared limiter applies 0 (shutdown, at the
        // end of the drain delay): the reporter then says `leaving`.
        let (left, report_leaving) = oneshot::channel::<()>();
        let mut reporter = None;
        match &self.config.source {
            ConfigSource::ControlPlane { url, proxy_token } => {
                let dispatcher = discovery::Dispatcher::new(
                    self.config.node_id.clone(),
                    self.store.clone(),
                    self.cooldowns.clone(),
                    self.fleet.clone(),
                )
                .with_snapshot_cache(self.config.snapshot_cache.as_deref(), proxy_token);
                let cfg = discovery::DiscoveryConfig {
                    url: url.clone(),
                    proxy_token: proxy_token.clone(),
                };
                background.push(tokio::spawn(discovery::run(cfg, dispatcher)));
                background.push(tokio::spawn(
                    self.fleet
                        .clone()
                        .watch_degraded(self.config.degraded_after),
                ));
                let rcfg = report::ReportConfig {
                    url: url.clone(),
                    proxy_token: proxy_token.clone(),
                    node_id: self.config.node_id.clone(),
                    settings: self.config.report.clone(),
                };
                reporter = Some(tokio::spawn(report::run(
                    rcfg,
                    self.store.clone(),
                    outcomes,
                    self.backlog.clone(),
                    signals,
                    self.journal.take(),
                    async move {
                        // A dropped sender (no orderly leave) is no leave.
                        if report_leaving.await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    },
                    async move {
                        let _ = report_stopped.await;
                    },
                )));
            }
            ConfigSource::Static(_) => {
                background.push(tokio::spawn(events::discard(outcomes)));
                background.push(tokio::spawn(events::discard(signals)));
            }
        }
        let retry = retry::RetryLayer::new(
            self.cooldowns.clone(),
            outlier::OutlierPolicy::default(),
            self.events.clone(),
        );
        let (store, limits) = (self.store.clone(), self.config.limits.clone());
        let workers = server::Workers {
            threads: self.config.serving_threads(),
            make_stack: Box::new(move || {
                Ok(server::stack(
                    store.clone(),
                    &limits,
                    retry.clone(),
                    upstream::Upstream::new(upstream::connector()?),
                ))
            }),
            tls: self.config.tls.clone(),
        };
        let state = Arc::new(server::AppState {
            store: self.store.clone(),
            cooldowns: self.cooldowns.clone(),
            draining: AtomicBool::new(false),
            limits: self.config.limits.clone(),
        });
        let with_cp = matches!(self.config.source, ConfigSource::ControlPlane { .. });
        let fleet = self.fleet.clone();
        let stopped_accepting = move || {
            // Order matters: the limiters apply 0 before the control plane
            // is told it may hand this proxy's shares to the others.
            if with_cp {
                fleet.leave();
                tracing::info!(
                    "left the fleet's rate shares: fleet-shared limits admit nothing now"
                );
                let _ = left.send(());
            }
        };
        let served = server::serve(
            listener,
            metrics,
            state,
            workers,
            shutdown,
            stopped_accepting,
        )
        .await;
        // The last reports get a short grace to be acknowledged.
        let _ = report_stop.send(());
        if let Some(r) = reporter {
            let grace = self.config.report.shutdown_grace + std::time::Duration::from_secs(1);
            if tokio::time::timeout(grace, r).await.is_err() {
                tracing::warn!("report stream did not finish in time");
            }
        }
        for task in background {
            task.abort();
        }
        served
    }
}

fn with_version(s: &claw_proto::v1::Snapshot) -> claw_proto::v1::Snapshot {
    let mut s = s.clone();
    s.version = s.version.max(1);
    s
}

/// Serves the proxy on `listener` until `shutdown` resolves, then drains
/// in-flight requests (up to the drain timeout) and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Proxy::new(config)?.serve(listener, shutdown).await
}

/// Like [`run`], with `/metrics` on its own listener when `metrics` is set
/// ([`Proxy::serve_with_metrics`]).
pub async fn run_with_metrics(
    config: Config,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Proxy::new(config)?
        .serve_with_metrics(listener, metrics, shutdown)
        .await
}

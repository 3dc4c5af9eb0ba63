//! Typed configuration of the proxy library. `main.rs` parses flags and
//! environment into it; nothing below reads the environment.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use claw_proto::v1;

/// Where the configuration snapshot comes from.
#[derive(Clone)]
pub enum ConfigSource {
    /// A control plane's `DiscoveryService.StreamConfig`.
    ControlPlane {
        /// gRPC endpoint, e.g. `http://127.0.0.1:50051`, and for
        /// `https://` the CA its certificate must chain to.
        url: crate::cp_channel::ControlPlaneUrl,
        /// Proxy token, sent as `authorization: Bearer …` (redacted in `Debug`).
        proxy_token: crate::cp_channel::ProxyToken,
    },
    /// A fixed snapshot (tests, benchmarks); no control plane.
    Static(Box<v1::Snapshot>),
}

impl fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::ControlPlane { url, proxy_token } => f
                .debug_struct("ControlPlane")
                .field("url", url)
                .field("proxy_token", proxy_token)
                .finish(),
            ConfigSource::Static(s) => f
                .debug_struct("Static")
                .field("version", &s.version)
                .field("backends", &s.backends.len())
                .finish(),
        }
    }
}

/// Limits that protect the server from bad or slow clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest accepted request body (413 above).
    pub max_body_bytes: usize,
    /// Time from the first byte of a request to the end of its headers.
    pub header_timeout: Duration,
    /// Time to receive a whole request body (408 after).
    pub body_timeout: Duration,
    /// Idle keep-alive connections are closed after this.
    pub idle_timeout: Duration,
    /// Open client connections on the API listener (see
    /// `crate::server`'s connection cap). Above it an idle connection is
    /// closed to make room; with none idle, a small reserve of connections
    /// is served only `/healthz`, `/readyz` and `/metrics` (503 for the rest).
    pub max_connections: usize,
    /// A streamed response whose upstream sends nothing for this long is
    /// ended with an error event in the stream's protocol.
    pub stream_idle_timeout: Duration,
    /// How long in-flight requests may finish once the listener is closed.
    pub drain_timeout: Duration,
    /// After shutdown starts, how long the proxy keeps accepting and serving
    /// new connections while `/readyz` already answers 503, so load
    /// balancers take it out of rotation before it stops accepting. Zero
    /// (the library's default; the binary's `--drain-delay` defaults to 5 s)
    /// stops accepting at once.
    pub drain_delay: Duration,
    /// The request body bytes all requests may hold at once
    /// (`--max-inflight-body-bytes`, shared by every clone; 503 with
    /// `Retry-After` beyond it).
    pub body_budget: crate::key_limits::BodyBudget,
    /// A client that stops reading an upstream response for this long has
    /// the upstream released (`--write-timeout`; zero: never).
    pub write_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_body_bytes: 16 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            // Above the usual load-balancer idle timeout (60 s on AWS ALB
            // and GCP): the balancer, not the proxy, should close an idle
            // pooled connection, or it may send a request on a connection
            // the proxy is closing.
            idle_timeout: Duration::from_secs(90),
            // An idle connection costs one descriptor and ~10 KB; a stream
            // two descriptors (client and upstream). 10,000 keeps a proxy
            // within 64 Ki descriptors and a few hundred MB with room to
            // spare, well above what one proxy serves in practice.
            max_connections: 10_000,
            // Reasoning models can think for a minute or more between
            // events; two minutes of silence is a stalled upstream.
            stream_idle_timeout: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            body_budget: crate::key_limits::BodyBudget::default(),
            write_timeout: Duration::from_secs(60),
        }
    }
}

/// How usage and failure reports are batched (`crate::report`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSettings {
    /// A batch is cut at least this often while connected (and at once
    /// after a 429, so cooldowns spread fast). Default 1 s
    /// (`--report-interval`): the control plane flushes every batch to disk
    /// before acknowledging it, and ten batches a second per proxy showed in
    /// the request path's latency tail.
    pub flush_interval: std::time::Duration,
    /// A batch is cut as soon as it holds this many events (default 500; a
    /// usage bucket counts as one).
    pub max_batch_events: usize,
    /// Unacknowledged events kept for resending (default 10,000); beyond it
    /// the oldest batches are dropped whole, counted in
    /// `claw_dp_report_dropped_events_total`.
    pub max_buffered_events: usize,
    /// On shutdown, how long to wait for the last batches to be acknowledged.
    pub shutdown_grace: std::time::Duration,
}

impl Default for ReportSettings {
    fn default() -> Self {
        ReportSettings {
            flush_interval: std::time::Duration::from_secs(1),
            max_batch_events: 500,
            max_buffered_events: 10_000,
            shutdown_grace: std::time::Duration::from_secs(3),
        }
    }
}

/// Default size bound of the usage journal (`--usage-journal-max-bytes`).
pub const DEFAULT_USAGE_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

/// The usage journal (`--usage-journal`, `crate::report::journal`): what
/// the proxy answered, kept on disk until the control plane acknowledged
/// it, replayed after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageJournal {
    /// The journal file (on the pod's `emptyDir` in the shipped manifests).
    pub path: PathBuf,
    /// Its size bound, in bytes: beyond it the oldest unacknowledged
    /// batches are dropped, counted in `dropped_events`.
    pub max_bytes: u64,
}

/// Configuration of a proxy.
#[derive(Debug, Clone)]
pub struct Config {
    /// Stable id of this proxy (sent on the discovery stream).
    pub node_id: String,
    /// Where the snapshot comes from.
    pub source: ConfigSource,
    /// Server limits.
    pub limits: ServerLimits,
    /// Capacity of the request-outcome channel.
    pub events_capacity: usize,
    /// Report batching (used with a control plane).
    pub report: ReportSettings,
    /// The usage journal; `None` keeps unreported usage in memory only
    /// (a crash loses up to one report interval of it).
    pub usage_journal: Option<UsageJournal>,
    /// How long the control plane may be unreachable before the proxy
    /// falls back to equal rate shares (`crate::fleet::DEGRADED_AFTER`).
    pub degraded_after: std::time::Duration,
    /// Where to keep the encrypted last-known-good snapshot (the
    /// `snapshot_cache` module); `None` keeps nothing on disk.
    pub snapshot_cache: Option<PathBuf>,
    /// Threads serving HTTP, each with its own connections and upstream
    /// pool; 0 = one per available core.
    pub serve_threads: usize,
    /// TLS for the HTTP listener ([`crate::tls::server_config`]); `None`
    /// serves plain HTTP.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl Config {
    /// The number of serving threads: `serve_threads`, or one per
    /// available core when it is 0.
    pub fn serving_threads(&self) -> usize {
        match self.serve_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// A proxy fed by a control plane.
    pub fn control_plane(
        node_id: impl Into<String>,
        url: impl Into<crate::cp_channel::ControlPlaneUrl>,
        proxy_token: impl Into<crate::cp_channel::ProxyToken>,
    ) -> Self {
        Self::with_defaults(
            node_id.into(),
            ConfigSource::ControlPlane {
                url: url.into(),
                proxy_token: proxy_token.into(),
            },
        )
    }

    /// A proxy serving a fixed snapshot, with no control plane (tests,
    /// benchmarks). The snapshot is applied as version `max(snapshot.version, 1)`.
    pub fn static_snapshot(snapshot: v1::Snapshot) -> Self {
        Self::with_defaults("static".into(), ConfigSource::Static(Box::new(snapshot)))
    }

    /// `node_id` fed from `source`, every other setting at its default.
    fn with_defaults(node_id: String, source: ConfigSource) -> Self {
        Config {
            node_id,
            source,
            limits: ServerLimits::default(),
            events_capacity: 65_536,
            report: ReportSettings::default(),
            usage_journal: None,
            degraded_after: crate::fleet::DEGRADED_AFTER,
            snapshot_cache: None,
            serve_threads: 0,
            tls: None,
        }
    }
}

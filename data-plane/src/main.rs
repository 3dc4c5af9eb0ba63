//! `claw-data-plane`: flags, environment, logging and signals; the proxy
//! itself is the library.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use claw_data_plane::{Config, ServerLimits};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The Claw Gateway data-plane proxy: an OpenAI-compatible HTTP API.
#[derive(Parser)]
#[command(name = "claw-data-plane", version, about)]
struct Args {
    /// HTTP listen address (port 0 picks a free port).
    #[arg(long, env = "CLAW_DP_ADDR", default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Control plane gRPC endpoint.
    #[arg(
        long,
        env = "CLAW_CONTROL_PLANE",
        default_value = "http://127.0.0.1:50051"
    )]
    control_plane: String,
    /// CA bundle (PEM) an https:// control plane's certificate must chain
    /// to, instead of the public (webpki) roots.
    #[arg(long, env = "CLAW_CONTROL_PLANE_CA", value_name = "PATH")]
    control_plane_ca: Option<std::path::PathBuf>,
    /// Node id of this proxy (default: host name).
    #[arg(long, env = "CLAW_NODE_ID")]
    node_id: Option<String>,
    /// Token authenticating this proxy to the control plane.
    #[arg(long, env = "CLAW_PROXY_TOKEN", hide_env_values = true)]
    proxy_token: String,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "CLAW_DP_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Time allowed to receive a request's headers, counted from the
    /// connection's start for its first request (a connection that sends
    /// nothing is answered 408 and closed after it) and from the first byte
    /// of each later one.
    #[arg(long, visible_alias = "header-read-timeout", env = "CLAW_DP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// Request body bytes all requests of this proxy may hold at once
    /// (0 = unlimited); a body that does not fit within 2 s gets 503 with
    /// Retry-After. The default, 256 MiB, is sixteen maximum-size bodies.
    #[arg(long, env = "CLAW_DP_MAX_INFLIGHT_BODY_BYTES", default_value_t = claw_data_plane::key_limits::DEFAULT_MAX_INFLIGHT_BODY_BYTES)]
    max_inflight_body_bytes: usize,
    /// A client that stops reading a response for this long has its
    /// upstream released and the response ended (0 = never). 60 s is far
    /// beyond any reader's pause, short enough that stalled readers do not
    /// pile up upstream connections.
    #[arg(long, env = "CLAW_DP_WRITE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    write_timeout: Duration,
    /// Time allowed to receive a whole request body.
    #[arg(long, env = "CLAW_DP_BODY_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// Idle keep-alive connections are closed after this.
    #[arg(long, env = "CLAW_DP_IDLE_TIMEOUT", default_value = "90s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Open client connections on the API port. Above it the connection
    /// idle longest is closed to make room; with none idle a small reserve
    /// serves only /healthz, /readyz and /metrics (503 for the rest), and
    /// beyond that new connections are closed at once. Each connection
    /// costs a file descriptor (a stream two): 10,000 fits a 64 Ki limit.
    #[arg(
        long,
        env = "CLAW_DP_MAX_CONNECTIONS",
        default_value_t = 10_000,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
    )]
    max_connections: usize,
    /// A streamed answer whose upstream sends nothing for this long is
    /// ended with an error event in the stream's protocol (the request
    /// deadline, the pool's request_timeout, bounds the whole stream).
    #[arg(long, env = "CLAW_DP_STREAM_IDLE_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    stream_idle_timeout: Duration,
    /// On SIGTERM, how long to keep accepting and serving new connections
    /// while /readyz already answers 503, so load balancers stop sending
    /// traffic before the listener closes (0 = stop accepting at once).
    /// When it ends the proxy admits nothing more under fleet-wide rate
    /// limits and hands its rate shares back to the other proxies at once.
    #[arg(long, env = "CLAW_DP_DRAIN_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    drain_delay: Duration,
    /// After the drain delay, how long in-flight requests and streams may
    /// finish once the listener is closed.
    #[arg(long, env = "CLAW_DP_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Serve /metrics (and /healthz) on this address instead of the API
    /// port, which then answers /metrics with 404. Always plain HTTP, also
    /// when the API port serves TLS (default: /metrics on the API port).
    #[arg(long, env = "CLAW_DP_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// How long the control plane may be unreachable before degraded mode
    /// (equal rate shares); shorter values are for tests.
    #[arg(long, env = "CLAW_DP_DEGRADED_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    degraded_after: Duration,
    /// How often usage, failures and demand go to the control plane in a
    /// batch (10ms to 1s). A 429, and the first request of an agent quiet
    /// for 10 s, are reported at once regardless; a longer interval means
    /// fewer batches for the control plane to store (each is flushed to
    /// disk before it is acknowledged), a shorter one fresher usage figures
    /// and rate-share demand.
    #[arg(long, env = "CLAW_DP_REPORT_INTERVAL", default_value = "1s", value_parser = report_interval)]
    report_interval: Duration,
    /// Threads serving HTTP (0 = one per available core). Each owns its
    /// client connections and upstream connection pool, so a request never
    /// hops between threads.
    #[arg(
        long,
        env = "CLAW_DP_SERVE_THREADS",
        default_value_t = 0,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1024)
    )]
    serve_threads: usize,
    /// Serve HTTPS: certificate chain (PEM, leaf first). Needs --tls-key.
    /// Both files are re-read when they change (cert-manager rotation).
    #[arg(
        long,
        env = "CLAW_DP_TLS_CERT",
        value_name = "PATH",
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// Serve HTTPS: private key (PEM). Needs --tls-cert.
    #[arg(
        long,
        env = "CLAW_DP_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
    /// Keep an encrypted last-known-good snapshot at this path (written
    /// after every applied snapshot, loaded at start-up so the proxy serves
    /// while the control plane is down). Sealed with a key derived from the
    /// proxy token. Off by default.
    #[arg(long, env = "CLAW_DP_SNAPSHOT_CACHE")]
    snapshot_cache: Option<std::path::PathBuf>,
    /// Keep a usage journal at this path (on the pod's emptyDir): every
    /// answered request's usage is appended before it leaves for the
    /// control plane, and a restarted proxy replays what was not
    /// acknowledged, so a crash (kill -9, OOM) loses none. Without it a
    /// crash loses up to one report interval of usage. One proxy per file
    /// (PATH.lock is held while it runs); best on ext4, XFS or tmpfs, where
    /// records go through a memory map of the preallocated file.
    #[arg(long, env = "CLAW_DP_USAGE_JOURNAL", value_name = "PATH")]
    usage_journal: Option<std::path::PathBuf>,
    /// Size bound of the usage journal, in bytes (at least 1 MiB); beyond
    /// it the oldest unacknowledged batches are dropped (counted as
    /// dropped events). The file is preallocated to 1.25 times the bound.
    #[arg(
        long,
        env = "CLAW_DP_USAGE_JOURNAL_MAX_BYTES",
        default_value_t = claw_data_plane::DEFAULT_USAGE_JOURNAL_BYTES,
        value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1024 * 1024..)
    )]
    usage_journal_max_bytes: u64,
    /// Log format on stderr.
    #[arg(long, env = "CLAW_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn report_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if !(Duration::from_millis(10)..=Duration::from_secs(1)).contains(&d) {
        return Err(format!("must be between 10ms and 1s, got {s}"));
    }
    Ok(d)
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "claw-data-plane".to_string())
}

/// Logs to stderr (`RUST_LOG`, default info) and, when an OTLP endpoint is
/// set, traces over OpenTelemetry. Runs inside the runtime, which exports them.
fn init_logging(format: LogFormat) -> anyhow::Result<claw_telemetry::Telemetry> {
    let format = match format {
        LogFormat::Text => claw_telemetry::LogFormat::Text,
        LogFormat::Json => claw_telemetry::LogFormat::Json,
    };
    // Colour only when stderr is a terminal: a log file or a collector gets
    // plain text.
    let options = claw_telemetry::Options::new("claw-data-plane", format);
    Ok(claw_telemetry::init(&options)?)
}

/// Resolves on SIGTERM or ctrl-c. The handlers are installed before the
/// listening line is printed, so a supervisor's SIGTERM is never missed.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    Ok(async move {
        #[cfg(unix)]
        let term = term.recv();
        #[cfg(not(unix))]
        let term = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutdown signal received");
    })
}

// This runtime only accepts connections and runs the control-plane streams;
// requests are served by `serve_threads` threads of their own.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = init_logging(args.log_format)?;
    if args.proxy_token.trim().is_empty() {
        anyhow::bail!("--proxy-token (CLAW_PROXY_TOKEN) must not be empty");
    }
    let control_plane = claw_data_plane::cp_channel::ControlPlaneUrl {
        url: args.control_plane.clone(),
        ca: args.control_plane_ca.clone(),
    };
    control_plane.check()?;
    let mut config = Config::control_plane(
        args.node_id.clone().unwrap_or_else(host_name),
        control_plane,
        args.proxy_token.clone(),
    );
    config.limits = ServerLimits {
        max_body_bytes: args.max_body_bytes,
        header_timeout: args.header_timeout,
        body_timeout: args.body_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections,
        stream_idle_timeout: args.stream_idle_timeout,
        drain_timeout: args.drain_timeout,
        drain_delay: args.drain_delay,
        body_budget: claw_data_plane::key_limits::BodyBudget::new(args.max_inflight_body_bytes),
        write_timeout: args.write_timeout,
    };
    config.degraded_after = args.degraded_after;
    config.snapshot_cache = args.snapshot_cache.clone();
    config.serve_threads = args.serve_threads;
    config.report.flush_interval = args.report_interval;
    config.usage_journal = args
        .usage_journal
        .clone()
        .map(|path| claw_data_plane::UsageJournal {
            path,
            max_bytes: args.usage_journal_max_bytes,
        });
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(claw_data_plane::tls::server_config(cert, key)?);
    }
    // Every stream holds two sockets (client and upstream): raise the soft
    // open-files limit to the hard one so thousands of streams fit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let shutdown = shutdown_signal()?;
    let listener = claw_data_plane::bind_listener(args.addr)
        .with_context(|| format!("binding {}", args.addr))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let (metrics_listener, metrics_local) = match args.metrics_addr {
        None => (None, None),
        Some(addr) => {
            let l = claw_data_plane::bind_listener(addr)
                .with_context(|| format!("binding --metrics-addr {addr}"))?;
            let a = l
                .local_addr()
                .context("reading the metrics listener's address")?;
            (Some(l), Some(a))
        }
    };
    // Built before the listening line: a usage journal that cannot be
    // opened stops the start with its error, not after `listening`.
    let node_id = config.node_id.clone();
    let proxy = claw_data_plane::Proxy::new(config)?;
    {
        let mut out = std::io::stdout().lock();
        match metrics_local {
            None => writeln!(out, "listening http={local}")?,
            Some(m) => writeln!(out, "listening http={local} metrics={m}")?,
        }
        out.flush()?;
    }
    tracing::info!(
        addr = %local,
        metrics_addr = metrics_local.map(|m| m.to_string()).as_deref().unwrap_or("(API port)"),
        node_id = %node_id,
        control_plane = %args.control_plane,
        "claw-data-plane started"
    );
    proxy
        .serve_with_metrics(listener, metrics_listener, shutdown)
        .await?;
    tracing::info!("claw-data-plane stopped");
    telemetry.shutdown_async().await;
    Ok(())
}

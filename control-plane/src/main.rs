//! `claw-control-plane`: flags and environment, logging, signals. Everything
//! else lives in the library (`claw_control_plane::server`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use claw_control_plane::config::{self, Config};
use claw_control_plane::crypto;
use claw_control_plane::server::{Server, StartupCheck};
use claw_control_plane::store::space::MinFreeSpace;

/// The Claw Gateway control plane: stores backends (API keys encrypted),
/// pools, client keys and agents, and serves the claw.v1 gRPC admin API.
#[derive(Debug, Parser)]
#[command(
    name = "claw-control-plane",
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Every flag can also be set through the environment variable shown. \
Logs go to stderr; RUST_LOG filters them (default: info). Traces are exported over \
OpenTelemetry when OTEL_EXPORTER_OTLP_ENDPOINT is set (see the README). Once both listeners are bound, \
one line `listening grpc=<addr> http=<addr>` is printed to stdout. SIGTERM or ctrl-c \
stops the server gracefully.\n\n\
First start:\n  export CLAW_MASTER_KEY=$(claw-control-plane keygen)\n  \
export CLAW_ADMIN_TOKEN=$(claw-control-plane token)\n  \
export CLAW_PROXY_TOKEN=$(claw-control-plane token)\n  claw-control-plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a fresh random master key (64 hex characters) and exit.
    Keygen,
    /// Print a fresh random token (for CLAW_ADMIN_TOKEN or CLAW_PROXY_TOKEN) and exit.
    Token,
    /// Restore a backup file (`clawctl backup create`) into an empty data
    /// directory, then exit. Start the control plane on it as usual.
    Restore(RestoreArgs),
    /// Check a data directory offline (the control plane must not be running
    /// on it): every record decodes, every sealed key opens with the master
    /// key, every index agrees. Exits non-zero naming what is wrong.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// The backup file.
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// The data directory to create (it must not exist, or be empty).
    #[arg(long, env = "CLAW_DATA_DIR", value_name = "DIR")]
    data_dir: PathBuf,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The data directory to check.
    #[arg(
        long,
        env = "CLAW_DATA_DIR",
        default_value = "./data",
        value_name = "DIR"
    )]
    data_dir: PathBuf,
    #[command(flatten)]
    key: MasterKeyArgs,
}

/// Where the master key comes from (serving and `check`).
#[derive(Debug, Args)]
struct MasterKeyArgs {
    /// Master key, 64 hex characters (`claw-control-plane keygen`). Prefer
    /// the environment variable or --master-key-file: command lines are
    /// visible to other users.
    #[arg(
        long,
        env = "CLAW_MASTER_KEY",
        hide_env_values = true,
        value_name = "HEX"
    )]
    master_key: Option<String>,

    /// File holding the master key (64 hex characters; whitespace ignored).
    #[arg(long, env = "CLAW_MASTER_KEY_FILE", value_name = "PATH")]
    master_key_file: Option<PathBuf>,
}

impl MasterKeyArgs {
    fn load(&self) -> Result<crypto::MasterKey, config::ConfigError> {
        config::load_master_key(self.master_key.as_deref(), self.master_key_file.as_deref())
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address of the gRPC API (clawctl, proxies). Port 0 picks a free port.
    #[arg(long, env = "CLAW_CP_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,

    /// Address of the HTTP listener serving /healthz and /metrics.
    #[arg(long, env = "CLAW_CP_HTTP_ADDR", default_value = "127.0.0.1:9091")]
    http_addr: SocketAddr,

    /// Directory of the database; created with mode 0700 if missing.
    #[arg(long, env = "CLAW_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,

    #[command(flatten)]
    key: MasterKeyArgs,

    /// Token clawctl must present (`authorization: Bearer <token>`); at least 16 characters.
    #[arg(
        long,
        env = "CLAW_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    admin_token: Option<String>,

    /// Token data-plane proxies must present; at least 16 characters, different from the admin token.
    #[arg(
        long,
        env = "CLAW_PROXY_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    proxy_token: Option<String>,

    /// Proxy the heartbeat runs are sent through.
    #[arg(
        long,
        env = "CLAW_HEARTBEAT_PROXY",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    heartbeat_proxy: String,

    /// CA bundle (PEM) the heartbeat proxy's certificate must chain to, for an
    /// https:// CLAW_HEARTBEAT_PROXY with a private certificate; without it the
    /// public (webpki) roots are used.
    #[arg(long, env = "CLAW_HEARTBEAT_PROXY_CA", value_name = "PATH")]
    heartbeat_proxy_ca: Option<PathBuf>,

    /// Certificate chain (PEM, leaf first) for TLS on both listeners (gRPC
    /// and HTTP health/metrics); needs --tls-key. Re-read when the file
    /// changes, so a rotated certificate is served without a restart.
    #[arg(long, env = "CLAW_CP_TLS_CERT", value_name = "PATH")]
    tls_cert: Option<PathBuf>,

    /// Private key (PEM: PKCS#8, RSA or EC) of --tls-cert.
    #[arg(long, env = "CLAW_CP_TLS_KEY", value_name = "PATH")]
    tls_key: Option<PathBuf>,

    /// HMAC-SHA256 key signing heartbeat webhooks of agents without their own secret.
    #[arg(
        long,
        env = "CLAW_WEBHOOK_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    webhook_secret: Option<String>,

    /// Base URL agent runtimes reach this control plane's HTTP listener at, for
    /// wake-mode callbacks ({URL}/v1/heartbeat/runs/RUN_ID/result); default: the
    /// HTTP listener's address.
    #[arg(long, env = "CLAW_CP_PUBLIC_URL", value_name = "URL")]
    public_url: Option<String>,

    /// Heartbeat run logs older than this are pruned.
    #[arg(long, env = "CLAW_HEARTBEAT_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    heartbeat_retention: std::time::Duration,

    /// After a restart, scheduled heartbeats wait (at most this long) until
    /// every proxy known before has reconnected and sent its first report,
    /// so agents in a live conversation are seen busy; 0 disables the wait.
    #[arg(long, env = "CLAW_HEARTBEAT_STARTUP_GRACE", default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat_startup_grace: std::time::Duration,

    /// Hourly usage buckets older than this are pruned.
    #[arg(long, env = "CLAW_RETENTION_HOURLY", default_value = "14d", value_parser = humantime::parse_duration)]
    retention_hourly: std::time::Duration,

    /// Daily usage buckets older than this are pruned.
    #[arg(long, env = "CLAW_RETENTION_DAILY", default_value = "400d", value_parser = humantime::parse_duration)]
    retention_daily: std::time::Duration,

    /// Cooldown events older than this are pruned.
    #[arg(long, env = "CLAW_RETENTION_COOLDOWNS", default_value = "30d", value_parser = humantime::parse_duration)]
    retention_cooldowns: std::time::Duration,

    /// Audit records older than this are pruned.
    #[arg(long, env = "CLAW_RETENTION_AUDIT", default_value = "400d", value_parser = humantime::parse_duration)]
    retention_audit: std::time::Duration,

    /// Webhook delivery attempts before an alert is dead-lettered.
    #[arg(long, env = "CLAW_WEBHOOK_MAX_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    webhook_max_attempts: u32,

    /// Age after which a failing webhook delivery is dead-lettered.
    #[arg(long, env = "CLAW_WEBHOOK_MAX_AGE", default_value = "24h", value_parser = humantime::parse_duration)]
    webhook_max_age: std::time::Duration,

    /// First webhook retry backoff cap (doubles per attempt, full jitter).
    #[arg(long, env = "CLAW_WEBHOOK_BACKOFF_BASE", default_value = "1s", value_parser = humantime::parse_duration)]
    webhook_backoff_base: std::time::Duration,

    /// Largest webhook retry backoff cap.
    #[arg(long, env = "CLAW_WEBHOOK_BACKOFF_MAX", default_value = "5m", value_parser = humantime::parse_duration)]
    webhook_backoff_max: std::time::Duration,

    /// Open connections per listener (gRPC and HTTP). At the cap a new
    /// connection closes the oldest one that never sent a byte (on HTTP
    /// also the one idle longest), so probes keep answering; otherwise it
    /// is closed at once.
    #[arg(
        long,
        env = "CLAW_CP_MAX_CONNECTIONS",
        default_value_t = 10_000,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
    )]
    max_connections: usize,

    /// A connection that sends nothing for this long is closed; on HTTP
    /// also the time allowed for a request head.
    #[arg(long, env = "CLAW_CP_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    header_read_timeout: std::time::Duration,

    /// A connection with no traffic for this long is closed. Keep it above
    /// 40 s: gRPC keepalive pings every 30 s keep healthy proxy streams busy.
    #[arg(long, env = "CLAW_CP_IDLE_TIMEOUT", default_value = "120s", value_parser = positive_duration)]
    idle_timeout: std::time::Duration,

    /// Directory for scheduled backups (one at startup, then every
    /// --backup-every); off without it.
    #[arg(long, env = "CLAW_BACKUP_DIR", value_name = "DIR")]
    backup_dir: Option<PathBuf>,

    /// Time between scheduled backups.
    #[arg(long, env = "CLAW_BACKUP_EVERY", default_value = "24h", value_parser = humantime::parse_duration)]
    backup_every: std::time::Duration,

    /// Scheduled backup files kept in --backup-dir (older ones are removed).
    #[arg(long, env = "CLAW_BACKUP_KEEP", default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    backup_keep: u32,

    /// Time between health probes of each backend (a backend's own `probe`
    /// settings override it); 0 probes only backends with their own interval.
    #[arg(long, env = "CLAW_PROBE_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    probe_interval: std::time::Duration,

    /// Health probe timeout.
    #[arg(long, env = "CLAW_PROBE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    probe_timeout: std::time::Duration,

    /// Failed probes in a row that make a backend unhealthy.
    #[arg(long, env = "CLAW_PROBE_FAILURES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    probe_failures: u32,

    /// Passive failures in a row (connect errors, timeouts, 5xx, broken
    /// streams), summed over every proxy, that eject a backend fleet-wide
    /// (30 s, doubling per repeat up to 300 s).
    #[arg(long, env = "CLAW_EJECT_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    eject_failures: u32,

    /// Free space kept on the data volume. Below it every write (configuration
    /// changes, proxy usage reports, heartbeat runs, audit records) is refused
    /// with RESOURCE_EXHAUSTED naming the volume, while reads, /healthz and
    /// /metrics keep answering; writes resume by themselves once space is
    /// freed. Bytes with a unit (256MiB, 64MB, 1G), a share of the volume
    /// (5%), 0 to turn the guard off, or `default`: 256 MiB or 5% of the
    /// volume, whichever is smaller.
    #[arg(long, env = "CLAW_MIN_FREE_SPACE", default_value = "default", value_name = "SIZE|PERCENT", value_parser = parse_min_free_space)]
    min_free_space: MinFreeSpace,

    /// After SIGTERM (or ctrl-c) the server stops gracefully; when that has
    /// not finished after this long (a hung store call, a stuck client) it
    /// exits at once with status 3, logging an error. A second signal exits
    /// at once too. Keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "CLAW_SHUTDOWN_TIMEOUT", default_value = "25s", value_parser = positive_duration)]
    shutdown_timeout: std::time::Duration,
    /// Allow heartbeat webhook and wake URLs on loopback (127.0.0.0/8, ::1,
    /// localhost), for a receiver on this host. Link-local/cloud metadata
    /// addresses and this control plane's own listeners stay refused.
    #[arg(long, env = "CLAW_ALLOW_LOOPBACK_WEBHOOKS")]
    allow_loopback_webhooks: bool,

    /// Log format on stderr.
    #[arg(long, env = "CLAW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Bound on opening the store and checking every record before
    /// listening; past it the control plane exits non-zero instead of
    /// serving a store that makes the engine spin. 0: no bound.
    #[arg(long, env = "CLAW_STARTUP_CHECK_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    startup_check_timeout: std::time::Duration,

    /// Emergencies only: skip the startup integrity check (every record
    /// read, as `claw-control-plane check` does) and serve the store as it
    /// is. The high-water mark is still enforced.
    #[arg(
        long,
        env = "CLAW_SKIP_STARTUP_CHECK",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    skip_startup_check: bool,
}

fn parse_min_free_space(s: &str) -> Result<MinFreeSpace, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Keygen) => return print_line(&crypto::generate_master_key_hex()),
        Some(Command::Token) => return print_line(&crypto::generate_token()),
        Some(Command::Restore(args)) => return restore(&args),
        Some(Command::Check(args)) => return check(&args),
        None => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("claw-control-plane: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match init_logging(&runtime, cli.serve.log_format) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("claw-control-plane: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve(cli.serve));
    // Outside async code, with the runtime still alive: the last spans go out.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("claw-control-plane: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn restore(args: &RestoreArgs) -> ExitCode {
    match claw_control_plane::backup::restore(&args.from, &args.data_dir) {
        Ok(report) => print_line(&format!(
            "restored {} entries into {} (config version {}); start it with master key {}",
            report.entries,
            args.data_dir.display(),
            report.config_version,
            report.master_key_id
        )),
        Err(e) => {
            eprintln!("claw-control-plane: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    let result = args
        .key
        .load()
        .map_err(anyhow::Error::from)
        .and_then(|key| claw_control_plane::check::run(&args.data_dir, &key));
    match result {
        Ok(report) if report.problems.is_empty() => {
            let total: u64 = report.records.iter().map(|(_, n)| n).sum();
            print_line(&format!(
                "{}: ok ({total} records)",
                args.data_dir.display()
            ))
        }
        Ok(report) => {
            for p in &report.problems {
                eprintln!("claw-control-plane: check: {p}");
            }
            eprintln!(
                "claw-control-plane: error: {} problem(s) in {}",
                report.problems.len(),
                args.data_dir.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("claw-control-plane: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_line(line: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Logs to stderr (`RUST_LOG`, default info) and, when an OTLP endpoint is
/// set, traces over OpenTelemetry (built inside `runtime`, which exports them).
fn init_logging(
    runtime: &tokio::runtime::Runtime,
    format: LogFormat,
) -> Result<claw_telemetry::Telemetry, claw_telemetry::InitError> {
    let format = match format {
        LogFormat::Text => claw_telemetry::LogFormat::Text,
        LogFormat::Json => claw_telemetry::LogFormat::Json,
    };
    let _runtime = runtime.enter();
    claw_telemetry::init(&claw_telemetry::Options::new("claw-control-plane", format))
}

/// The flags, checked and typed: everything but the listen addresses.
impl TryFrom<ServeArgs> for Config {
    type Error = anyhow::Error;

    fn try_from(args: ServeArgs) -> anyhow::Result<Config> {
        if args.webhook_backoff_max < args.webhook_backoff_base {
            anyhow::bail!(
                "--webhook-backoff-max ({}) must be at least --webhook-backoff-base ({})",
                humantime::format_duration(args.webhook_backoff_max),
                humantime::format_duration(args.webhook_backoff_base),
            );
        }
        let tls = config::tls_paths(args.tls_cert, args.tls_key)?;
        let master_key = args.key.load()?;
        let mut config = Config::new(
            args.data_dir,
            master_key,
            args.admin_token,
            args.proxy_token,
        )?;
        let hb = &mut config.heartbeat;
        hb.proxy_url = args.heartbeat_proxy;
        hb.proxy_ca = args.heartbeat_proxy_ca;
        hb.scheduler.retention = args.heartbeat_retention;
        if let Some(url) = &args.public_url {
            claw_proto::validate::http_url("--public-url", url)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            hb.scheduler.wake.public_url = url.trim_end_matches('/').to_string();
        }
        hb.scheduler.startup_grace = args.heartbeat_startup_grace;
        hb.delivery.max_attempts = args.webhook_max_attempts;
        hb.delivery.max_age = args.webhook_max_age;
        hb.delivery.base_backoff = args.webhook_backoff_base;
        hb.delivery.max_backoff = args.webhook_backoff_max;
        hb.delivery.global_secret = args.webhook_secret.filter(|s| !s.trim().is_empty());
        config.retention.hourly = args.retention_hourly;
        config.retention.daily = args.retention_daily;
        config.retention.cooldown_events = args.retention_cooldowns;
        config.retention.audit = args.retention_audit;
        config.tls = tls;
        if args.probe_timeout.is_zero() {
            anyhow::bail!("--probe-timeout must be more than 0");
        }
        config.probe = claw_control_plane::health::ProbeDefaults {
            interval: args.probe_interval,
            timeout: args.probe_timeout,
            failures: args.probe_failures,
        };
        config.eject.failures = args.eject_failures;
        config.min_free_space = args.min_free_space;
        config.connections = claw_control_plane::config::ConnSettings {
            max_connections: args.max_connections,
            header_timeout: args.header_read_timeout,
            idle_timeout: args.idle_timeout,
        };
        if args.backup_every.is_zero() {
            anyhow::bail!("--backup-every must be more than 0");
        }
        config.backup = args
            .backup_dir
            .map(|dir| claw_control_plane::config::BackupSchedule {
                dir,
                every: args.backup_every,
                keep: args.backup_keep as usize,
            });
        Ok(config)
    }
}

/// The startup check the flags ask for.
fn startup_check(args: &ServeArgs) -> StartupCheck {
    StartupCheck {
        timeout: Some(args.startup_check_timeout).filter(|t| !t.is_zero()),
        deep: !args.skip_startup_check,
    }
}

fn positive_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (grpc_addr, http_addr) = (args.grpc_addr, args.http_addr);
    let shutdown_timeout = args.shutdown_timeout;
    let allow_loopback = args.allow_loopback_webhooks;
    let check = startup_check(&args);
    let config = Config::try_from(args)?;
    let public_url = config.heartbeat.scheduler.wake.public_url.clone();
    let server = Server::open_with(config, check).await?;
    let shutdown = shutdown_signal(shutdown_timeout)?;
    let grpc = claw_control_plane::server::bind_listener(grpc_addr)
        .with_context(|| format!("binding the gRPC address {grpc_addr}"))?;
    let http = claw_control_plane::server::bind_listener(http_addr)
        .with_context(|| format!("binding the HTTP address {http_addr}"))?;
    let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
    // Before anything is served: webhook and wake URLs are checked against
    // the bound listeners (the HTTP one serves /metrics too).
    claw_control_plane::net_guard::install(
        claw_control_plane::net_guard::Policy {
            allow_loopback,
            listeners: vec![grpc_addr, http_addr],
            own_names: Vec::new(),
        }
        .with_public_url(&public_url),
    );
    {
        // The contract with supervisors and tests: exactly this one line.
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening grpc={grpc_addr} http={http_addr}")?;
        out.flush()?;
    }
    server.serve(grpc, http, shutdown).await
}

/// Completes on SIGTERM or ctrl-c (SIGINT); from then on the process exits
/// after `deadline` whatever it is doing (see
/// [`claw_control_plane::shutdown::on_signals`]). The handlers are installed
/// here, eagerly, so a signal sent right after the `listening` line is never
/// met by the default action (which would kill the process uncleanly).
#[cfg(unix)]
fn shutdown_signal(
    deadline: std::time::Duration,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    claw_control_plane::shutdown::on_signals(deadline).context("listening for SIGTERM and SIGINT")
}

/// Completes on ctrl-c.
#[cfg(not(unix))]
fn shutdown_signal(
    _deadline: std::time::Duration,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => tracing::info!("received ctrl-c"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for ctrl-c");
                std::future::pending::<()>().await;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    fn serve_args(extra: &[&str]) -> ServeArgs {
        let base = [
            "claw-control-plane",
            "--master-key",
            KEY,
            "--admin-token",
            "admin-token-0123456789",
            "--proxy-token",
            "proxy-token-0123456789",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(extra)).expect("flags parse");
        cli.serve
    }

    #[test]
    fn a_webhook_backoff_max_below_the_base_is_refused_naming_both_flags() {
        let err = Config::try_from(serve_args(&[
            "--webhook-backoff-base",
            "10s",
            "--webhook-backoff-max",
            "5s",
        ]))
        .expect_err("max < base is refused");
        let msg = err.to_string();
        assert!(msg.contains("--webhook-backoff-max (5s)"), "{msg}");
        assert!(msg.contains("--webhook-backoff-base (10s)"), "{msg}");
    }

    #[test]
    fn webhook_backoff_flags_reach_the_config_unchanged() {
        let config = Config::try_from(serve_args(&[
            "--webhook-backoff-base",
            "2s",
            "--webhook-backoff-max",
            "2s",
        ]))
        .expect("max == base is fine");
        assert_eq!(
            config.heartbeat.delivery.base_backoff,
            Duration::from_secs(2)
        );
        assert_eq!(
            config.heartbeat.delivery.max_backoff,
            Duration::from_secs(2)
        );
    }

    #[test]
    fn min_free_space_takes_sizes_and_percentages_and_names_itself_when_bad() {
        assert_eq!(
            Config::try_from(serve_args(&[]))
                .expect("ok")
                .min_free_space,
            MinFreeSpace::Default
        );
        let config = Config::try_from(serve_args(&["--min-free-space", "6MiB"])).expect("ok");
        assert_eq!(config.min_free_space, MinFreeSpace::Bytes(6 << 20));
        let config = Config::try_from(serve_args(&["--min-free-space", "5%"])).expect("ok");
        assert_eq!(config.min_free_space, MinFreeSpace::Percent(5.0));
        let base = ["claw-control-plane", "--min-free-space", "12 parsecs"];
        let err = Cli::try_parse_from(base).expect_err("refused").to_string();
        assert!(err.contains("--min-free-space"), "{err}");
        assert!(err.contains("is not a size"), "{err}");
        let base = ["claw-control-plane", "--shutdown-timeout", "0s"];
        let err = Cli::try_parse_from(base).expect_err("refused").to_string();
        assert!(err.contains("--shutdown-timeout"), "{err}");
    }

    #[test]
    fn loopback_webhooks_are_off_by_default_and_on_with_the_flag() {
        assert!(!serve_args(&[]).allow_loopback_webhooks);
        assert!(serve_args(&["--allow-loopback-webhooks"]).allow_loopback_webhooks);
    }

    #[test]
    fn the_startup_check_is_bounded_and_deep_by_default() {
        assert_eq!(startup_check(&serve_args(&[])), StartupCheck::default());
        assert_eq!(
            startup_check(&serve_args(&[
                "--startup-check-timeout",
                "0",
                "--skip-startup-check"
            ])),
            StartupCheck {
                timeout: None,
                deep: false
            }
        );
        assert_eq!(
            startup_check(&serve_args(&["--startup-check-timeout", "5m"])).timeout,
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn backups_are_off_without_a_dir_and_keep_must_be_at_least_one() {
        assert_eq!(Config::try_from(serve_args(&[])).expect("ok").backup, None);
        let config = Config::try_from(serve_args(&[
            "--backup-dir",
            "/var/backups/claw",
            "--backup-every",
            "6h",
            "--backup-keep",
            "3",
        ]))
        .expect("ok");
        assert_eq!(
            config.backup,
            Some(claw_control_plane::config::BackupSchedule {
                dir: "/var/backups/claw".into(),
                every: Duration::from_secs(6 * 3600),
                keep: 3,
            })
        );
        let base = [
            "claw-control-plane",
            "--backup-dir",
            "d",
            "--backup-keep",
            "0",
        ];
        assert!(Cli::try_parse_from(base).is_err(), "keep 0 is refused");
        let err = Config::try_from(serve_args(&["--backup-dir", "d", "--backup-every", "0s"]))
            .expect_err("0s is refused");
        assert!(err.to_string().contains("--backup-every"), "{err}");
    }
}

//! `claw-mock-upstream`: the mock provider (OpenAI and Anthropic APIs, see
//! `claw_tests::mock`) as a process, for the quickstart and benchmarks. Prints `listening http=<ip:port>` once
//! bound, logs to stderr, drains and exits on SIGTERM or ctrl-c.

use anyhow::Context as _;
use clap::Parser;
use claw_tests::mock::{self, MockConfig};
use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

/// A mock OpenAI-compatible LLM provider with a scriptable control API under
/// `/_mock/`.
#[derive(Debug, Parser)]
#[command(name = "claw-mock-upstream", version)]
struct Args {
    /// Listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Delay before the response head / first byte.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Pause between two SSE chunks.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    chunk_delay: Duration,
    /// Completion tokens per answer (a smaller `max_tokens` wins).
    #[arg(long, default_value_t = 16)]
    completion_tokens: u32,
    /// Require the key on /v1 requests (`Authorization: Bearer KEY`; for
    /// Anthropic Messages `x-api-key: KEY`).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Default reply text (split on whitespace into tokens).
    #[arg(long, value_name = "TEXT")]
    reply: Option<String>,
    /// Keep no per-request record (totals are still counted).
    #[arg(long)]
    no_record: bool,
    /// Name sent in the `x-mock-name` response header.
    #[arg(long)]
    name: Option<String>,
    /// A model listed by GET /v1/models (repeatable).
    #[arg(long = "model", value_name = "ID")]
    models: Vec<String>,
    /// The smallest prefix (tokens) the simulated prompt cache stores.
    #[arg(long, default_value_t = 4)]
    cache_min_tokens: u64,
    /// How long open connections may finish after SIGTERM.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut config = MockConfig {
        addr: args.addr,
        latency: args.latency,
        chunk_delay: args.chunk_delay,
        completion_tokens: args.completion_tokens,
        api_key: args.api_key,
        reply: args.reply,
        record: !args.no_record,
        name: args.name,
        cache_min_tokens: args.cache_min_tokens,
        ..MockConfig::default()
    };
    if !args.models.is_empty() {
        config.models = args.models;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        // Handlers go in before the `listening` line: a harness may send
        // SIGTERM the moment it reads it, and must get a graceful stop.
        let shutdown = shutdown_signal()?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening http={addr}").context("writing to stdout")?;
        stdout.flush().context("flushing stdout")?;
        drop(stdout);
        tracing::info!(%addr, name = config.name.as_deref(), "mock upstream listening");
        mock::run(listener, config, shutdown, args.drain).await;
        tracing::info!("mock upstream stopped");
        Ok(())
    })
}

/// Installs the SIGTERM and SIGINT (ctrl-c) handlers now; the future
/// resolves on either signal.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
    })
}

//! `claw-bench`: the load generator of `tests/bench/proxy_bench.sh`, the same
//! for every target (mock direct, our proxy, nginx, LiteLLM), so that only
//! the thing in the middle changes.
//!
//! - `http`: closed-loop POSTs on `--concurrency` keep-alive HTTP/1.1
//!   connections (one in flight each) for `--duration` after a warm-up;
//!   prints requests per second and latency percentiles, and with
//!   `--cpu-pid` the CPU time (user + system) those processes spent per
//!   request answered while measuring: far steadier on a shared machine
//!   than a latency tail.
//! - `ttft`: sequential streaming requests on one connection; prints the
//!   time to the first body byte (the first SSE event) percentiles.
//! - `streams`: opens `--streams` streaming requests, one connection each,
//!   ramped at `--ramp` per second, reads them to the end; prints the peak
//!   number of streams open at once and how many ended with `[DONE]`.
//!
//! Every subcommand prints one JSON object on stdout.

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(name = "claw-bench", about = "Load generator for the proxy benchmark")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Closed-loop POSTs: RPS and latency percentiles.
    Http(HttpArgs),
    /// Time to the first byte of streamed answers.
    Ttft(TtftArgs),
    /// Many concurrent SSE streams.
    Streams(StreamsArgs),
}

#[derive(Args, Clone)]
struct Target {
    /// Full URL, e.g. http://127.0.0.1:8080/v1/chat/completions.
    #[arg(long)]
    url: String,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, default_value = "none")]
    key: String,
    /// The model in the request body.
    #[arg(long, default_value = "bench")]
    model: String,
    /// `chat` (OpenAI chat completions, `Authorization: Bearer`) or
    /// `messages` (Anthropic Messages: `x-api-key`, `anthropic-version`).
    #[arg(long, default_value = "chat", value_parser = ["chat", "messages"])]
    protocol: String,
}

#[derive(Args)]
struct HttpArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Send at most this many requests per second in all (paced from one
    /// shared schedule; 0 = closed loop, as fast as answers come). At a
    /// fixed rate below both targets' capacity, two targets' CPU per
    /// request compare the same load.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// A process whose CPU time (user + system, all threads) is measured over
    /// the measuring window; repeat for several (nginx's workers).
    #[arg(long = "cpu-pid")]
    cpu_pids: Vec<u32>,
}

/// User + system CPU time of these processes so far (all their threads).
fn cpu_time(pids: &[u32]) -> anyhow::Result<Duration> {
    let tick = rustix::param::clock_ticks_per_second();
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // `pid (comm) state ppid …`: comm may hold spaces, so count from
        // the last ')'. utime and stime are fields 14 and 15 (1-based).
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("malformed /proc stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        for i in [11, 12] {
            ticks += fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .context("malformed /proc stat")?;
        }
    }
    Ok(Duration::from_secs_f64(ticks as f64 / tick as f64))
}

#[derive(Args)]
struct TtftArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 500)]
    requests: usize,
}

#[derive(Args)]
struct StreamsArgs {
    #[command(flatten)]
    target: Target,
    /// How many streams to open.
    #[arg(long, default_value_t = 5000)]
    streams: usize,
    /// New streams per second.
    #[arg(long, default_value_t = 1000)]
    ramp: usize,
}

/// Where to connect and what to send.
struct Request {
    addr: SocketAddr,
    uri: http::Uri,
    host: String,
    auth: http::HeaderValue,
    /// Anthropic Messages: the key goes in `x-api-key`, with `anthropic-version`.
    messages: bool,
    body: Bytes,
}

impl Request {
    fn new(t: &Target, stream: bool) -> anyhow::Result<Arc<Self>> {
        let uri: http::Uri = t.url.parse().context("--url")?;
        let authority = uri.authority().context("--url needs host:port")?.clone();
        let addr: SocketAddr = authority
            .as_str()
            .parse()
            .context("--url must use an IP address and port")?;
        let body = serde_json::json!({
            "model": t.model,
            "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
            "max_tokens": 16,
            "stream": stream,
        });
        let messages = t.protocol == "messages";
        Ok(Arc::new(Request {
            messages,
            addr,
            host: authority.to_string(),
            uri: uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .parse()
                .context("path")?,
            auth: if messages {
                t.key.parse().context("--key")?
            } else {
                format!("Bearer {}", t.key).parse().context("--key")?
            },
            body: Bytes::from(serde_json::to_vec(&body)?),
        }))
    }

    fn build(&self) -> http::Request<Full<Bytes>> {
        let mut req = http::Request::new(Full::new(self.body.clone()));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        h.insert(http::header::HOST, self.host.parse().expect("checked"));
        if self.messages {
            h.insert("x-api-key", self.auth.clone());
            h.insert(
                "anthropic-version",
                http::HeaderValue::from_static("2023-06-01"),
            );
        } else {
            h.insert(http::header::AUTHORIZATION, self.auth.clone());
        }
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        req
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = TcpStream::connect(addr).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request/response on `sender`; the time to the first body byte and
/// to the end, and whether the status was 2xx.
async fn exchange(
    sender: &mut Sender,
    req: &Request,
) -> anyhow::Result<(Duration, Duration, bool, Vec<u8>)> {
    let started = Instant::now();
    sender.ready().await?;
    let res = sender.send_request(req.build()).await?;
    let ok = res.status().is_success();
    let mut body = res.into_body();
    let mut first = None;
    let mut tail = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(data) = frame.data_ref() {
            if first.is_none() && !data.is_empty() {
                first = Some(started.elapsed());
            }
            tail.extend_from_slice(data);
            if tail.len() > 64 {
                tail.drain(..tail.len() - 64);
            }
        }
    }
    let total = started.elapsed();
    Ok((first.unwrap_or(total), total, ok, tail))
}

fn percentiles(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort_unstable();
    let at = |p: f64| {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v[i].as_secs_f64() * 1e6
    };
    serde_json::json!({
        "samples": v.len(),
        "p50_us": at(0.50),
        "p75_us": at(0.75),
        "p90_us": at(0.90),
        "p95_us": at(0.95),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": at(1.0),
    })
}

async fn http_load(a: HttpArgs) -> anyhow::Result<serde_json::Value> {
    let req = Request::new(&a.target, false)?;
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    // The pacing schedule: request i is due at `t0 + i / rate`.
    let schedule = Arc::new(AtomicU64::new(0));
    let t0 = tokio::time::Instant::now();
    let period = (a.rate > 0).then(|| Duration::from_secs_f64(1.0 / a.rate as f64));
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let (req, measuring, stop, errors, schedule) = (
            req.clone(),
            measuring.clone(),
            stop.clone(),
            errors.clone(),
            schedule.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut sender = None;
            while !stop.load(Ordering::Relaxed) {
                if let Some(period) = period {
                    let i = schedule.fetch_add(1, Ordering::Relaxed);
                    let due = t0 + period.mul_f64(i as f64);
                    tokio::time::sleep_until(due).await;
                }
                if sender.is_none() {
                    sender = connect(req.addr).await.ok();
                }
                let Some(s) = sender.as_mut() else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // A keep-alive connection the server closed between two
                // requests is not an error: reconnect.
                if s.ready().await.is_err() {
                    sender = None;
                    continue;
                }
                match exchange(s, &req).await {
                    Ok((_, total, ok, _)) => {
                        if measuring.load(Ordering::Relaxed) {
                            if ok {
                                lat.push(total);
                            } else {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        sender = None;
                    }
                }
            }
            lat
        }));
    }
    tokio::time::sleep(a.warmup).await;
    let cpu_before = cpu_time(&a.cpu_pids)?;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(a.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let cpu = cpu_time(&a.cpu_pids)?.saturating_sub(cpu_before);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let ok = all.len();
    let mut out = percentiles(all);
    out["concurrency"] = a.concurrency.into();
    out["rate"] = a.rate.into();
    out["rps"] = (ok as f64 / elapsed.as_secs_f64()).into();
    out["errors"] = errors.load(Ordering::Relaxed).into();
    if !a.cpu_pids.is_empty() && ok > 0 {
        out["cpu_us_per_req"] = (cpu.as_secs_f64() * 1e6 / ok as f64).into();
    }
    Ok(out)
}

async fn ttft(a: TtftArgs) -> anyhow::Result<serde_json::Value> {
    let req = Request::new(&a.target, true)?;
    let mut sender = connect(req.addr).await?;
    // Warm-up: connections, caches, the upstream pool.
    for _ in 0..20 {
        exchange(&mut sender, &req).await?;
    }
    let mut firsts = Vec::with_capacity(a.requests);
    for _ in 0..a.requests {
        let (first, _, ok, tail) = exchange(&mut sender, &req).await?;
        if !ok || !tail.ends_with(b"data: [DONE]\n\n") {
            bail!("a stream did not end with [DONE]");
        }
        firsts.push(first);
    }
    Ok(percentiles(firsts))
}

async fn streams(a: StreamsArgs) -> anyhow::Result<serde_json::Value> {
    let req = Request::new(&a.target, true)?;
    let open = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / a.ramp.max(1) as f64);
    let mut tasks = Vec::with_capacity(a.streams);
    for i in 0..a.streams {
        tokio::time::sleep_until((started + interval * i as u32).into()).await;
        let (req, open, peak, done, failed) = (
            req.clone(),
            open.clone(),
            peak.clone(),
            done.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let result = async {
                let mut sender = connect(req.addr).await?;
                sender.ready().await?;
                let res = sender.send_request(req.build()).await?;
                if !res.status().is_success() {
                    bail!("status {}", res.status());
                }
                let now = open.fetch_add(1, Ordering::Relaxed) + 1;
                peak.fetch_max(now, Ordering::Relaxed);
                let mut body = res.into_body();
                let mut tail = Vec::new();
                let read = async {
                    while let Some(frame) = body.frame().await {
                        if let Some(d) = frame?.data_ref() {
                            tail.extend_from_slice(d);
                            if tail.len() > 64 {
                                tail.drain(..tail.len() - 64);
                            }
                        }
                    }
                    anyhow::Ok(())
                }
                .await;
                open.fetch_sub(1, Ordering::Relaxed);
                read?;
                if !tail.ends_with(b"data: [DONE]\n\n") {
                    bail!("no [DONE]");
                }
                anyhow::Ok(())
            }
            .await;
            match result {
                Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("stream failed: {e:#}");
                    }
                    0
                }
            };
        }));
    }
    let ramped = started.elapsed();
    for t in tasks {
        t.await?;
    }
    Ok(serde_json::json!({
        "streams": a.streams,
        "peak_open": peak.load(Ordering::Relaxed),
        "completed": done.load(Ordering::Relaxed),
        "failed": failed.load(Ordering::Relaxed),
        "ramp_s": ramped.as_secs_f64(),
        "total_s": started.elapsed().as_secs_f64(),
    }))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = std::env::var("CLAW_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        match cli.cmd {
            Cmd::Http(a) => http_load(a).await,
            Cmd::Ttft(a) => ttft(a).await,
            Cmd::Streams(a) => streams(a).await,
        }
    })?;
    println!("{out}");
    Ok(())
}

//! Scale benchmark of the heartbeat scheduler (not a timed test; ignored by
//! default). Loads N agents with staggered intervals into a real sled store,
//! runs the scheduler for a while with runs answered by an in-process stub,
//! and reports the dispatch lag (stub call time − nominal slot time) and the
//! process's CPU time and memory.
//!
//! ```text
//! cargo test --release -p claw-control-plane --test integration heartbeat_scale -- --ignored --nocapture
//! HB_BENCH_AGENTS=100000 HB_BENCH_INTERVAL_S=60 HB_BENCH_SECONDS=120 (defaults)
//! ```
//!
//! Intervals are compressed (60 s instead of 30 min) so that every agent
//! fires within the run: 100,000 agents at 60 s is ~1,667 runs/s, thirty
//! times the rate of the same fleet at 30 minutes.

use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use claw_control_plane::catalog::{ApplyRequest, Catalog};
use claw_control_plane::crypto::MasterKey;
use claw_control_plane::heartbeat::delivery::Webhook;
use claw_control_plane::heartbeat::dispatch::{Dispatcher, RunReply, RunRequest};
use claw_control_plane::heartbeat::runs::RunStore;
use claw_control_plane::heartbeat::runtime::{self, HeartbeatSettings};
use claw_control_plane::heartbeat::slots::stagger_phase;
use claw_control_plane::store::Store;
use claw_control_plane::store::sled::SledStore;
use claw_proto::v1::{Agent, ClusterConfig};
use futures::future::BoxFuture;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Records (agent, call time) and answers HEARTBEAT_OK at once.
#[derive(Clone)]
struct Stub(Arc<Mutex<Vec<(String, i64)>>>);

impl Dispatcher for Stub {
    fn run(&self, req: RunRequest) -> BoxFuture<'static, Result<RunReply, String>> {
        let at = now_ms();
        self.0.lock().push((req.agent_id, at));
        Box::pin(async {
            Ok(RunReply {
                content: "HEARTBEAT_OK".into(),
                ..Default::default()
            })
        })
    }
}

struct NoWebhook;

impl Webhook for NoWebhook {
    fn post(
        &self,
        _url: String,
        _headers: Vec<(&'static str, String)>,
        _body: Vec<u8>,
    ) -> BoxFuture<'static, Result<u16, String>> {
        Box::pin(async { Ok(204) })
    }
}

/// (VmRSS kB, VmHWM kB) of this process.
fn memory_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User + system CPU seconds of this process (clock ticks at 100 Hz).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesized command name; utime and stime are
    // fields 14 and 15 (1-based), i.e. 11 and 12 after the ')'.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored --nocapture (see the file doc)"]
async fn heartbeat_scheduler_at_scale() {
    let agents = env("HB_BENCH_AGENTS", 100_000);
    let interval = env("HB_BENCH_INTERVAL_S", 60);
    let seconds = env("HB_BENCH_SECONDS", 120);
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(SledStore::open(&dir.path().join("data")).expect("store opens"));
    let key = MasterKey::from_hex(&"3".repeat(64)).expect("key");
    let catalog = Arc::new(Catalog::open(store.clone(), key).await.expect("catalog"));
    let (rss0, _) = memory_kb();

    let load = Instant::now();
    let config = ClusterConfig {
        agents: (0..agents)
            .map(|i| Agent {
                id: format!("agent-{i:06}"),
                model: "gpt-4o".into(),
                interval_seconds: interval,
                checklist: "- [ ] check the inbox".into(),
                enabled: true,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    catalog
        .apply(
            &claw_control_plane::audit::Actor::system(),
            ApplyRequest {
                config,
                dry_run: false,
                prune: false,
            },
        )
        .await
        .expect("apply");
    let load_s = load.elapsed().as_secs_f64();

    let stub = Stub(Arc::new(Mutex::new(Vec::new())));
    let start_ms = now_ms();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let (_hb, tasks) = runtime::start_with(
        catalog.clone(),
        RunStore::new(store),
        HeartbeatSettings::default(),
        Arc::new(claw_control_plane::heartbeat::scheduler::NoFleet),
        Arc::new(stub.clone()),
        Arc::new(NoWebhook),
        claw_control_plane::shutdown::Shutdown::new(stop_rx),
    )
    .expect("start");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let cpu = cpu_seconds() - cpu0;
    let wall = started.elapsed().as_secs_f64();
    let (rss, hwm) = memory_kb();

    let calls = stub.0.lock().clone();
    let interval_ms = interval as i64 * 1000;
    let lag_of = |(agent, at): &(String, i64)| {
        let phase = stagger_phase(agent, Duration::from_secs(interval)).as_millis() as i64;
        let nominal = (at - phase).div_euclid(interval_ms) * interval_ms + phase;
        (nominal, at - nominal)
    };
    let mut lags: Vec<i64> = calls.iter().map(|c| lag_of(c).1).collect();
    lags.sort_unstable();
    // Steady state: slots from 10 s after start (startup loads every agent
    // and writes every cursor first; slots due meanwhile start late).
    let mut steady: Vec<i64> = calls
        .iter()
        .map(lag_of)
        .filter(|(nominal, _)| *nominal >= start_ms + 10_000)
        .map(|(_, lag)| lag)
        .collect();
    steady.sort_unstable();
    println!(
        "agents={agents} interval={interval}s run={seconds}s load(apply)={load_s:.1}s\n\
         runs={} ({:.0}/s)\n\
         dispatch lag ms (all): p50={} p90={} p99={} p99.9={} max={}\n\
         dispatch lag ms (steady, slots from start+10s): n={} p50={} p99={} max={}\n\
         cpu={cpu:.1}s over {wall:.1}s wall ({:.1}% of one core)\n\
         rss: before agents={} MB, end={} MB, peak={} MB",
        calls.len(),
        calls.len() as f64 / wall,
        percentile(&lags, 0.5),
        percentile(&lags, 0.9),
        percentile(&lags, 0.99),
        percentile(&lags, 0.999),
        lags.last().copied().unwrap_or(0),
        steady.len(),
        percentile(&steady, 0.5),
        percentile(&steady, 0.99),
        steady.last().copied().unwrap_or(0),
        cpu / wall * 100.0,
        rss0 / 1024,
        rss / 1024,
        hwm / 1024,
    );
    assert!(!calls.is_empty(), "the scheduler fired nothing");
}

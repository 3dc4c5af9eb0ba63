//! Issue 18: a proxy's answered requests are billed. A non-streaming answer
//! of any size has its usage read (the body scan stopped at 4 MiB and
//! recorded 0 tokens); with `--usage-journal`, a proxy killed with `kill -9`
//! mid-load and restarted on the same journal bills every answered request
//! exactly once; without it, the loss stays within one report interval.

use crate::data_plane_support::*;
use claw_tests::harness::wait_until;
use claw_tests::mock::MockConfig;
use serde_json::{Value, json};
use std::time::Duration;

/// `(requests, prompt_tokens, completion_tokens)` of `stats total`.
fn cp_totals(c: &Cluster) -> Option<(u64, u64, u64)> {
    cp_totals_of(c, &[])
}

/// The same, filtered (`--key marker`).
fn cp_totals_of(c: &Cluster, filter: &[&str]) -> Option<(u64, u64, u64)> {
    let mut args = vec!["stats", "total", "-o", "json"];
    args.extend_from_slice(filter);
    let out = c.cp.clawctl(&args);
    if !out.success() {
        return None;
    }
    let v = out.json();
    let n = |k: &str| {
        v[k].as_u64()
            .or_else(|| v[k].as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(0)
    };
    Some((n("requests"), n("prompt_tokens"), n("completion_tokens")))
}

/// Regression (issue 18): a non-streaming answer over 4 MiB was recorded
/// as 0 tokens. A ~6.5 MB chat completion's usage is billed to the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_6_mb_non_streaming_answer_has_its_usage_recorded() {
    const TOKENS: u32 = 700_000;
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        mock: MockConfig::default().completion_tokens(TOKENS),
        ..ClusterOptions::default()
    });
    let body = json!({
        "model": CHAT,
        "messages": [{"role": "user", "content": "a long answer please"}],
        "max_tokens": TOKENS,
    });
    let res = c.post(c.proxy(), "chat/completions", &body).await;
    assert_eq!(res.status(), 200, "{}", c.proxy().logs());
    let bytes = res.bytes().await.expect("the whole answer");
    assert!(bytes.len() > 6_000_000, "answer of {} bytes", bytes.len());
    let answer: Value = serde_json::from_slice(&bytes).expect("a JSON answer");
    let usage = &answer["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
        usage["completion_tokens"]
            .as_u64()
            .expect("completion_tokens"),
    );
    assert_eq!(completion, u64::from(TOKENS));
    let mut last = None;
    let exact = wait_until(Duration::from_secs(30), || {
        last = cp_totals(&c);
        last == Some((1, prompt, completion))
    });
    assert!(
        exact,
        "stats total shows {last:?}, the answer said (1, {prompt}, {completion})\n{}",
        c.proxy().logs()
    );
}

/// What a load run's clients saw.
struct Load {
    /// When each answer that came back 200 (whole) arrived.
    ok_at: Vec<std::time::Instant>,
    /// Requests that failed (the kill).
    failed: u64,
}

/// `clients` concurrent clients sending small chat requests to `url` until
/// `stop` turns true.
fn start_load(
    c: &Cluster,
    clients: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Load>> {
    (0..clients)
        .map(|_| {
            let (http, key, url) = (c.http.clone(), c.key.clone(), c.proxy().url());
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut load = Load {
                    ok_at: Vec::new(),
                    failed: 0,
                };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let res = http
                        .post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(&key)
                        .json(&chat_body(CHAT, false))
                        .send()
                        .await;
                    let whole = match res {
                        Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    if whole {
                        load.ok_at.push(std::time::Instant::now());
                    } else {
                        load.failed += 1;
                        // The proxy is gone: stop hammering a closed port.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                load
            })
        })
        .collect()
}

/// Runs 4 clients for a few seconds, `kill -9`s the proxy mid-load, stops
/// the clients and restarts the proxy (same flags, node id, journal).
/// Returns what the clients saw and when the kill was.
async fn kill_mid_load(c: &mut Cluster) -> (Load, std::time::Instant) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = start_load(c, 4, stop.clone());
    // Long enough for several report intervals, not a multiple of one.
    tokio::time::sleep(Duration::from_millis(3_400)).await;
    c.proxies[0].kill9();
    let killed = std::time::Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut load = Load {
        ok_at: Vec::new(),
        failed: 0,
    };
    for h in clients {
        let l = h.await.expect("a client task");
        load.ok_at.extend(l.ok_at);
        load.failed += l.failed;
    }
    c.proxies[0].restart();
    c.proxies[0].wait_ready();
    (load, killed)
}

/// What the control plane billed once everything the restarted proxy
/// holds was stored: a marker request of a second client key goes after
/// every replayed batch on the ordered report stream, so once it is billed
/// the count is final. Returns the requests billed, the marker's excluded.
async fn settled_billing(c: &Cluster) -> u64 {
    let marker =
        c.cp.clawctl(&["key", "add", "marker", "-o", "json"])
            .assert_ok()
            .json()["secret"]
            .as_str()
            .expect("`key add -o json` prints the secret")
            .to_owned();
    c.wait_synced();
    let res = c
        .http
        .post(format!("{}/v1/chat/completions", c.proxy().url()))
        .bearer_auth(&marker)
        .json(&chat_body(CHAT, false))
        .send()
        .await
        .expect("the marker request");
    assert_eq!(res.status(), 200, "{}", c.proxy().logs());
    res.bytes().await.expect("the marker's answer");
    let marked = wait_until(Duration::from_secs(60), || {
        cp_totals_of(c, &["--key", "marker"]).is_some_and(|t| t.0 == 1)
    });
    assert!(marked, "the marker was never billed\n{}", c.proxy().logs());
    cp_totals(c).map_or(0, |t| t.0) - 1
}

/// `--usage-journal PATH` in `dir`, with the longest report interval.
fn journal_args(dir: &tempfile::TempDir) -> Vec<String> {
    vec![
        "--usage-journal".into(),
        dir.path().join("usage.journal").display().to_string(),
        "--report-interval".into(),
        "1s".into(),
    ]
}

/// Issue 18: `kill -9` lost 68 of 2,928 requests' usage. With the journal,
/// the restarted proxy replays what was not acknowledged under its original
/// identity: every request a client got a 200 for is billed, and none
/// twice (the billed count never exceeds what the upstream answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_load_with_a_journal_bills_every_answered_request_once() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut c = Cluster::with(ClusterOptions {
        proxies: 1,
        proxy_args: journal_args(&dir),
        ..ClusterOptions::default()
    });
    let (load, _) = kill_mid_load(&mut c).await;
    let ok = load.ok_at.len() as u64;
    assert!(ok > 50, "only {ok} answers before the kill");
    let billed = settled_billing(&c).await;
    let answered = c.primary.totals().ok + c.fallback.totals().ok - 1;
    assert!(
        billed >= ok,
        "billed {billed} of {ok} answered requests: lost {}\n{}",
        ok - billed,
        c.proxy().logs()
    );
    // A request answered upstream while the kill cut its client off may be
    // billed (at most one per client); none may be billed twice.
    assert!(
        billed <= answered && billed <= ok + load.failed.min(4),
        "billed {billed}: {ok} answered to clients, {answered} by the upstream, {} client failures — doubled\n{}",
        load.failed,
        c.proxy().logs()
    );
    println!("with a journal: billed {billed} of {ok} answered to clients ({answered} upstream)");
    assert!(
        c.proxy().logs().contains("usage journal: replaying"),
        "the restart replayed nothing:\n{}",
        c.proxy().logs()
    );
}

/// Without the journal a crash loses what was not acknowledged: at most
/// the requests of about one report interval before the kill (bounded here
/// by those answered in the last two intervals), never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_journal_a_kill_loses_at_most_one_report_interval() {
    let mut c = Cluster::with(ClusterOptions {
        proxies: 1,
        proxy_args: vec!["--report-interval".into(), "1s".into()],
        ..ClusterOptions::default()
    });
    let (load, killed) = kill_mid_load(&mut c).await;
    let ok = load.ok_at.len() as u64;
    assert!(ok > 50, "only {ok} answers before the kill");
    let window = Duration::from_secs(2);
    let recent = load
        .ok_at
        .iter()
        .filter(|t| killed.duration_since(**t) <= window)
        .count() as u64;
    let billed = settled_billing(&c).await;
    let answered = c.primary.totals().ok + c.fallback.totals().ok - 1;
    assert!(
        billed + recent >= ok,
        "billed {billed} of {ok}: lost more than the {recent} answered in the last {window:?}\n{}",
        c.proxy().logs()
    );
    assert!(billed <= answered, "billed {billed} of {answered}: doubled");
    println!(
        "without a journal: billed {billed} of {ok} answered ({} lost)",
        ok.saturating_sub(billed)
    );
}

/// A journal whose last record was torn by the crash (half written) still
/// replays every record before it. Here the control plane is down while
/// the requests are answered, so nothing was acknowledged (nor cut into a
/// batch: the outcome records alone carry the usage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_with_a_torn_tail_still_replays_the_rest() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("usage.journal");
    let mut c = Cluster::with(ClusterOptions {
        proxies: 1,
        proxy_args: journal_args(&dir),
        ..ClusterOptions::default()
    });
    c.cp.stop();
    const N: u64 = 25;
    for _ in 0..N {
        let res = c.chat(c.proxy(), CHAT).await;
        assert_eq!(res.status(), 200, "{}", c.proxy().logs());
        res.bytes().await.expect("the answer");
    }
    c.proxies[0].kill9();
    // A crash mid-write: right after the last record, a record header
    // promising more than follows.
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("the journal exists");
        f.write_all_at(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9], records_end(&path))
            .expect("wrote a torn record");
    }
    c.cp.restart();
    c.proxies[0].restart();
    c.proxies[0].wait_ready();
    let mut last = None;
    let billed = wait_until(Duration::from_secs(60), || {
        last = cp_totals(&c).map(|t| t.0);
        last == Some(N)
    });
    assert!(billed, "billed {last:?} of {N}\n{}", c.proxy().logs());
    let logs = c.proxy().logs();
    assert!(
        logs.contains("torn or corrupt record"),
        "no log line for the torn record:\n{logs}"
    );
}

/// Where the records of the journal at `path` end: its format is an 8-byte
/// magic, then `[u32 length][u32 CRC][body]` records (little-endian); the
/// file is preallocated past them with zeros.
fn records_end(path: &std::path::Path) -> u64 {
    let raw = std::fs::read(path).expect("the journal");
    let mut at = 8;
    while let Some(len) = raw.get(at..at + 4) {
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len == 0 || at + 8 + len > raw.len() {
            break;
        }
        at += 8 + len;
    }
    at as u64
}

/// A `--usage-journal` path holding something else stops the start with an
/// error naming the flag, before `listening`; nothing is overwritten.
#[test]
fn a_file_that_is_not_a_journal_stops_the_start() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("usage.journal");
    std::fs::write(&path, b"precious data").expect("wrote the file");
    let cp = claw_tests::harness::ControlPlane::start();
    let started = claw_tests::harness::Proxy::builder(&cp)
        .arg("--usage-journal")
        .arg(path.as_os_str())
        .try_start();
    let Err(err) = started else {
        panic!("the proxy started on a file that is not a journal");
    };
    assert!(err.status.is_some_and(|s| !s.success()), "{err}");
    assert!(
        err.output.contains("--usage-journal") && err.output.contains("not a usage journal"),
        "{err}"
    );
    assert!(!err.output.contains("listening"), "{err}");
    assert_eq!(std::fs::read(&path).expect("the file"), b"precious data");
}

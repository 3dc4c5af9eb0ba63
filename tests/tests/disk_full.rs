//! A full data volume (issue 18): the control plane's data directory on a
//! small tmpfs of its own, filled by writes. Below the reserve
//! (`--min-free-space`) writes are refused with `RESOURCE_EXHAUSTED` naming
//! the volume, reads, `/healthz` and `/metrics` answer, SIGTERM stops it
//! within the shutdown deadline, freeing space resumes writes without a
//! restart, and the directory opens again with every acknowledged write —
//! in a loop of fresh filesystems. One more run drives sled itself into
//! ENOSPC (no reserve): the failed writes are RESOURCE_EXHAUSTED naming the
//! volume, and the directory still opens with every acknowledged write. A
//! heartbeat run whose reply comes back while the volume is full keeps its
//! result in memory and stores it (with its alert, delivered once) when
//! space returns.
//!
//! These tests mount filesystems, so they need root (or CAP_SYS_ADMIN);
//! without it they fail saying so.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use claw_tests::harness::{ControlPlane, SmallFs, http, wait_until};

const MIB: u64 = 1024 * 1024;
/// The filesystem of one run.
const FS_SIZE: u64 = 24 * MIB;
/// `--min-free-space` of the guarded runs.
const RESERVE: &str = "6MiB";
const RESERVE_BYTES: u64 = 6 * MIB;
/// Room left above the reserve before the writes start, so a run fills it
/// with a few dozen writes.
const HEADROOM: u64 = 2 * MIB;
/// `--shutdown-timeout`: below the harness's 10 s SIGKILL, so a process
/// that had to be killed is told apart from one that stopped by itself.
const SHUTDOWN_TIMEOUT: &str = "5s";
/// Runs of the guarded loop.
const RUNS: usize = 10;
/// Prompt bytes per agent: big writes fill the headroom fast.
const PROMPT_BYTES: usize = 60 * 1024;
/// A generous bound on writes before the reserve is reached.
const MAX_WRITES: usize = 400;
/// The exit status of a control plane cut short by its shutdown deadline.
const EXIT_DEADLINE: i32 = 3;

fn small_fs() -> SmallFs {
    SmallFs::mount(FS_SIZE)
        .unwrap_or_else(|e| panic!("disk-full tests need a small filesystem: {e}"))
}

/// A prompt file of [`PROMPT_BYTES`] (outside the small filesystem).
fn prompt_file(dir: &Path) -> PathBuf {
    let path = dir.join("prompt.txt");
    let line = "Check the queue, the error budget and the on-call notes; report anything odd.\n";
    let text: String = line.repeat(PROMPT_BYTES / line.len());
    std::fs::write(&path, text).expect("write the prompt file");
    path
}

fn start(data_dir: &Path, reserve: &str) -> ControlPlane {
    ControlPlane::builder()
        .data_dir(data_dir)
        .args(["--min-free-space", reserve])
        .args(["--shutdown-timeout", SHUTDOWN_TIMEOUT])
        .start()
}

/// What one write attempt did.
enum Write {
    Acked,
    /// Refused (stderr).
    Refused(String),
}

fn add_agent(cp: &ControlPlane, id: &str, prompt: &Path) -> Write {
    let out = cp
        .ctl(&[
            "--timeout",
            "10s",
            "agent",
            "add",
            id,
            "--model",
            "gpt-4o",
            "--disabled",
            "--prompt-file",
            prompt.to_str().expect("utf-8 path"),
        ])
        .run();
    if out.success() {
        Write::Acked
    } else {
        Write::Refused(out.stderr)
    }
}

fn agents(cp: &ControlPlane) -> BTreeSet<String> {
    let listed = cp
        .clawctl(&["agent", "list", "-o", "json"])
        .assert_ok()
        .json();
    listed
        .as_array()
        .unwrap_or_else(|| panic!("agent list is not an array: {listed}"))
        .iter()
        .map(|a| a["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn get(cp: &ControlPlane, path: &str) -> http::HttpReply {
    http::request(cp.http_addr(), "GET", path, None, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("GET {path}: {e}; log:\n{}", cp.logs()))
}

fn metric(cp: &ControlPlane, name: &str) -> Option<f64> {
    get(cp, "/metrics")
        .text()
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// SIGTERM: it must exit by itself (an exit status, not the harness's
/// SIGKILL after 10 s), within [`SHUTDOWN_TIMEOUT`].
#[track_caller]
fn stop_by_itself(cp: &mut ControlPlane) -> ExitStatus {
    let status = cp.stop().expect("it was running");
    let logs = cp.logs();
    assert!(
        !logs.contains("ignored SIGTERM") && status.code().is_some(),
        "SIGTERM did not stop it within {SHUTDOWN_TIMEOUT} ({status:?}); log:\n{logs}"
    );
    status
}

/// [`stop_by_itself`], and the stop was clean: status 0 (a graceful stop)
/// or the deadline's status.
#[track_caller]
fn stop_cleanly(cp: &mut ControlPlane) {
    let status = stop_by_itself(cp);
    assert!(
        matches!(status.code(), Some(0) | Some(EXIT_DEADLINE)),
        "exit status {status:?}; log:\n{}",
        cp.logs()
    );
}

/// Writes agents `{prefix}-N` until one is refused; returns the
/// acknowledged ids and the refusal.
fn fill_with_writes(
    cp: &ControlPlane,
    prefix: &str,
    prompt: &Path,
    acked: &mut BTreeSet<String>,
) -> String {
    for i in 0..MAX_WRITES {
        let id = format!("{prefix}-{i}");
        match add_agent(cp, &id, prompt) {
            Write::Acked => {
                acked.insert(id);
            }
            Write::Refused(stderr) => return stderr,
        }
    }
    panic!(
        "{MAX_WRITES} writes of {PROMPT_BYTES} bytes were all acknowledged above a {RESERVE} reserve; log:\n{}",
        cp.logs()
    );
}

#[test]
fn a_full_volume_refuses_writes_serves_reads_stops_on_sigterm_and_resumes_with_every_acked_write() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let prompt = prompt_file(scratch.path());
    for run in 0..RUNS {
        let fs = small_fs();
        let data_dir = fs.path().join("data");
        let mut cp = start(&data_dir, RESERVE);
        let mut acked = BTreeSet::new();
        let filler = fs
            .fill("filler", RESERVE_BYTES + HEADROOM)
            .unwrap_or_else(|e| panic!("run {run}: {e}"));

        // Writes until the reserve is reached: refused, one line naming the volume.
        let refusal = fill_with_writes(&cp, &format!("r{run}"), &prompt, &mut acked);
        let volume = data_dir.display().to_string();
        assert!(
            refusal.contains("resource exhausted: the data volume")
                && refusal.contains(&volume)
                && refusal.contains("below the reserve 6 MiB")
                && refusal.contains("writes are refused until space is freed"),
            "run {run}: refusal {refusal:?}"
        );
        assert_eq!(
            refusal.trim().lines().count(),
            1,
            "run {run}: one line: {refusal:?}"
        );
        assert!(
            !acked.is_empty(),
            "run {run}: no write fitted in the headroom"
        );
        // Still refused (not a one-off), and nothing of it is stored.
        assert!(matches!(
            add_agent(&cp, &format!("r{run}-again"), &prompt),
            Write::Refused(_)
        ));

        // Reads, health and metrics answer.
        assert_eq!(agents(&cp), acked, "run {run}: reads while full");
        let health = get(&cp, "/healthz");
        assert_eq!(health.status, 200, "run {run}: /healthz {}", health.text());
        assert_eq!(
            metric(&cp, "claw_cp_store_low_space"),
            Some(1.0),
            "run {run}"
        );
        assert!(
            metric(&cp, "claw_cp_store_writes_refused_total").is_some_and(|n| n >= 2.0),
            "run {run}: refused writes counted"
        );
        assert!(
            cp.logs().contains("below the reserve"),
            "run {run}: the low space is logged"
        );

        // SIGTERM while full: it stops by itself within the deadline.
        stop_cleanly(&mut cp);
        // It starts again on the full volume and serves what it had.
        cp.restart();
        assert_eq!(agents(&cp), acked, "run {run}: after a restart while full");
        assert!(matches!(
            add_agent(&cp, &format!("r{run}-still"), &prompt),
            Write::Refused(_)
        ));

        // Space returns: writes resume without a restart (alternate the
        // ways: delete the filler, or grow the filesystem).
        if run % 2 == 0 {
            std::fs::remove_file(&filler).expect("remove the filler");
        } else {
            fs.resize(FS_SIZE * 2).expect("grow the filesystem");
        }
        let resumed = format!("r{run}-resumed");
        assert!(
            wait_until(Duration::from_secs(30), || matches!(
                add_agent(&cp, &resumed, &prompt),
                Write::Acked
            )),
            "run {run}: writes did not resume after space was freed; log:\n{}",
            cp.logs()
        );
        acked.insert(resumed);
        for i in 0..3 {
            let id = format!("r{run}-after-{i}");
            assert!(
                matches!(add_agent(&cp, &id, &prompt), Write::Acked),
                "run {run}"
            );
            acked.insert(id);
        }
        assert_eq!(
            metric(&cp, "claw_cp_store_low_space"),
            Some(0.0),
            "run {run}"
        );
        assert!(
            cp.logs().contains("writes resume"),
            "run {run}: leaving low space is logged"
        );

        // After a restart every acknowledged write is there, nothing else.
        stop_cleanly(&mut cp);
        cp.restart();
        assert_eq!(agents(&cp), acked, "run {run}: after the final restart");
        stop_cleanly(&mut cp);
        drop(cp);
        drop(fs);
    }
}

/// No reserve (`--min-free-space 0`) and a filler taking the rest: sled
/// itself meets ENOSPC. The writes it cannot make must fail (never be
/// acknowledged) with RESOURCE_EXHAUSTED naming the volume (one line from
/// clawctl, not INTERNAL), SIGTERM must stop it within the deadline, and
/// once space is back the directory must open with every acknowledged
/// write.
#[test]
fn sled_meeting_enospc_fails_writes_cleanly_and_the_directory_opens_again() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let prompt = prompt_file(scratch.path());
    for run in 0..3 {
        let fs = small_fs();
        let data_dir = fs.path().join("data");
        let mut cp = start(&data_dir, "0");
        let mut acked = BTreeSet::new();
        // A little room: sled's next log segments do not fit.
        let filler = fs
            .fill("filler", 256 * 1024)
            .unwrap_or_else(|e| panic!("run {run}: {e}"));
        let mut failures = Vec::new();
        for i in 0..60 {
            let id = format!("e{run}-{i}");
            match add_agent(&cp, &id, &prompt) {
                Write::Acked => {
                    acked.insert(id);
                }
                Write::Refused(stderr) => {
                    failures.push(stderr);
                    if failures.len() >= 3 {
                        break;
                    }
                }
            }
        }
        assert!(
            !failures.is_empty(),
            "run {run}: every write fitted on a full filesystem; log:\n{}",
            cp.logs()
        );
        // Without the guard the engine's ENOSPC is still a clear refusal:
        // RESOURCE_EXHAUSTED naming the volume, one line (not INTERNAL).
        let volume = data_dir.display().to_string();
        for failure in &failures {
            assert!(
                failure.contains(&format!(
                    "resource exhausted: the data volume {volume} is full ("
                )) && failure.contains("Free space on it"),
                "run {run}: a write sled failed for space: {failure:?}; log:\n{}",
                cp.logs()
            );
            assert_eq!(
                failure.trim().lines().count(),
                1,
                "run {run}: one line: {failure:?}"
            );
        }
        eprintln!(
            "run {run}: {} acknowledged, then: {:?}",
            acked.len(),
            failures.first()
        );
        // sled does not write again after a failed write, even with space
        // back: the message says to restart, and so it is.
        std::fs::remove_file(&filler).expect("remove the filler");
        match add_agent(&cp, &format!("e{run}-freed"), &prompt) {
            Write::Refused(e) => assert!(
                e.contains(&volume) && e.contains("then restart the control plane"),
                "run {run}: {e:?}"
            ),
            Write::Acked => {
                panic!("run {run}: sled wrote again without a restart; fix the message")
            }
        }
        let status = stop_by_itself(&mut cp);
        eprintln!("run {run}: stopped with {status:?}");
        cp.try_restart().unwrap_or_else(|e| {
            panic!("run {run}: the directory does not open again after ENOSPC: {e}")
        });
        let listed = agents(&cp);
        let lost: Vec<_> = acked.difference(&listed).collect();
        assert!(
            lost.is_empty(),
            "run {run}: acknowledged writes lost after ENOSPC: {lost:?}"
        );
        // Writes work again.
        assert!(matches!(
            add_agent(&cp, &format!("e{run}-after"), &prompt),
            Write::Acked
        ));
        stop_cleanly(&mut cp);
        drop(cp);
        drop(fs);
    }
}

/// A heartbeat run whose reply comes back while the volume is full: its
/// result is kept in memory (`claw_heartbeat_results_waiting_for_space`)
/// instead of lost, and once space returns the run ends with its real
/// status — an alert, delivered once to the webhook — not "interrupted";
/// the slot called the upstream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_result_that_comes_back_while_full_is_stored_once_space_returns() {
    use claw_tests::harness::{Forwarder, Proxy};
    use claw_tests::mock::{Action, MockConfig, MockUpstream};
    use claw_tests::webhook::WebhookReceiver;

    const KEY: &str = "sk-test-key-0123456789";
    /// How long the upstream holds the run's reply: the test fills the
    /// volume meanwhile (checked below, so a slow fill fails loudly
    /// rather than passing for the wrong reason).
    const REPLY_DELAY: Duration = Duration::from_secs(12);
    let fs = small_fs();
    let data_dir = fs.path().join("data");
    let upstream = MockUpstream::start(MockConfig::default().name("hb").api_key(KEY)).await;
    upstream.set_always(Some(Action::reply("HEARTBEAT_OK")));
    let hook = WebhookReceiver::start().await;
    let fwd = Forwarder::start().await;
    let mut cp = ControlPlane::builder()
        .data_dir(&data_dir)
        .args(["--min-free-space", RESERVE])
        .args(["--shutdown-timeout", SHUTDOWN_TIMEOUT])
        .heartbeat_proxy(format!("http://{}", fwd.addr()))
        .env("CLAW_WEBHOOK_SECRET", "whsec-diskfull-0123456789")
        .env("CLAW_WEBHOOK_BACKOFF_BASE", "100ms")
        .start();
    cp.clawctl_with_env(
        &[
            "backend",
            "add",
            "hb",
            "--url",
            &upstream.url(),
            "--api-key-env",
            "K",
            "--rpm",
            "6000",
            "--model",
            "m-hb",
        ],
        &[("K", KEY)],
    )
    .assert_ok();
    // Only manual runs fire: its window is twelve hours away.
    let h = (jiff::Timestamp::now().as_second() / 3600 + 12) % 24;
    let hours = format!("{h:02}:00-{h:02}:01");
    cp.clawctl_stdin(
        &[
            "agent",
            "add",
            "hb",
            "--model",
            "m-hb",
            "--interval",
            "1h",
            "--active-hours",
            &hours,
            "--webhook",
            &hook.url(),
            "--checklist-file",
            "-",
        ],
        "- [ ] check the disk\n",
    )
    .assert_ok();
    let proxy = Proxy::start(&cp);
    proxy.wait_ready();
    fwd.point_to(proxy.addr());
    let run_of = |cp: &ControlPlane, id: &str| -> serde_json::Value {
        cp.clawctl(&["heartbeat", "logs", "hb", "--limit", "100", "-o", "json"])
            .assert_ok()
            .json()
            .as_array()
            .and_then(|runs| runs.iter().find(|r| r["run_id"] == id).cloned())
            .unwrap_or_default()
    };
    let status = |run: &serde_json::Value| run["status"].as_str().unwrap_or_default().to_owned();
    // A first run, until the proxy has the configuration (an early one
    // may fail for that; it is not the run under test).
    assert!(
        wait_until(Duration::from_secs(30), || {
            let run = cp
                .clawctl(&["heartbeat", "run", "hb", "--wait", "-o", "json"])
                .assert_ok()
                .json();
            status(&run) == "suppressed"
        }),
        "no warm-up run succeeded; log:\n{}",
        cp.logs()
    );
    let calls_before = upstream.requests().len();

    // The run under test: its reply is held while the volume fills.
    upstream.push(Action::reply("ALERT: the queue is stuck").with_delay(REPLY_DELAY));
    let run = cp
        .clawctl(&["heartbeat", "run", "hb", "-o", "json"])
        .assert_ok()
        .json();
    let run_id = run["run_id"].as_str().expect("the run's id").to_owned();
    assert!(
        wait_until(Duration::from_secs(10), || upstream.pending() == 0),
        "the run never reached the upstream; log:\n{}",
        cp.logs()
    );
    let filler = fs.fill("filler", RESERVE_BYTES / 2).expect("fill");
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            &cp,
            "claw_cp_store_low_space"
        ) == Some(1.0)),
        "the control plane did not see the volume below the reserve; log:\n{}",
        cp.logs()
    );
    assert_eq!(
        status(&run_of(&cp, &run_id)),
        "running",
        "the reply came back before the volume was full (raise REPLY_DELAY)"
    );
    // The reply comes back while full: its result waits in memory.
    let waited = wait_until(Duration::from_secs(30), || {
        metric(&cp, "claw_heartbeat_results_waiting_for_space") == Some(1.0)
    });
    assert_eq!(
        status(&run_of(&cp, &run_id)),
        "running",
        "stored while full?"
    );
    assert!(hook.calls().is_empty(), "nothing delivered while full");

    // Space returns: the run ends with its real status, its alert
    // delivered once.
    std::fs::remove_file(&filler).expect("remove the filler");
    let mut last = serde_json::Value::Null;
    let delivered = wait_until(Duration::from_secs(30), || {
        last = run_of(&cp, &run_id);
        status(&last) == "delivered"
    });
    assert!(
        delivered,
        "the run did not end delivered once space returned: {last}; log:\n{}",
        cp.logs()
    );
    assert!(
        waited,
        "the result never showed as waiting for space; log:\n{}",
        cp.logs()
    );
    assert_eq!(last["reply_excerpt"], "ALERT: the queue is stuck", "{last}");
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            &cp,
            "claw_heartbeat_results_waiting_for_space"
        ) == Some(0.0)),
        "the gauge did not go back to 0"
    );
    let text = get(&cp, "/metrics").text();
    for line in [
        "# HELP claw_heartbeat_results_waiting_for_space ",
        "# TYPE claw_heartbeat_results_waiting_for_space gauge",
        "# TYPE claw_heartbeat_results_dropped_total counter",
    ] {
        assert!(text.contains(line), "/metrics lacks {line:?}");
    }
    let for_run = |hook: &WebhookReceiver| {
        hook.accepted()
            .into_iter()
            .filter(|c| c.key == run_id)
            .count()
    };
    assert_eq!(for_run(&hook), 1, "the alert is delivered once");
    assert_eq!(
        upstream.requests().len(),
        calls_before + 1,
        "one upstream call for the slot"
    );

    // Durable: after a restart it is still delivered, nothing sent again.
    stop_cleanly(&mut cp);
    cp.restart();
    assert_eq!(status(&run_of(&cp, &run_id)), "delivered");
    assert!(
        !cp.logs().contains("interrupted by a restart"),
        "a run was left open; log:\n{}",
        cp.logs()
    );
    assert_eq!(upstream.requests().len(), calls_before + 1);
    assert_eq!(for_run(&hook), 1);
    stop_cleanly(&mut cp);
    drop(proxy);
    drop(cp);
    drop(fs);
}

/// The proxies' usage reports while the volume is full: a batch that cannot
/// be stored is not acknowledged (the stream ends with RESOURCE_EXHAUSTED
/// naming the volume), the proxy keeps it and resends it, and once space
/// returns every request's usage is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reported_while_full_is_kept_by_the_proxy_and_stored_once_space_returns() {
    use claw_tests::harness::Proxy;
    use claw_tests::mock::{MockConfig, MockUpstream};

    const UPSTREAM_KEY: &str = "sk-up-diskfull-0123456789";
    const REQUESTS: u64 = 12;
    let scratch = tempfile::tempdir().expect("temp dir");
    let prompt = prompt_file(scratch.path());
    let fs = small_fs();
    let data_dir = fs.path().join("data");
    let mut cp = start(&data_dir, RESERVE);
    let mock = MockUpstream::start_blocking(
        MockConfig::default()
            .name("up")
            .api_key(UPSTREAM_KEY)
            .models(["native-chat"]),
    );
    cp.clawctl_with_env(
        &[
            "backend",
            "add",
            "up",
            "--url",
            &mock.url(),
            "--api-key-env",
            "UP_KEY",
            "--model",
            "chat=native-chat",
        ],
        &[("UP_KEY", UPSTREAM_KEY)],
    )
    .assert_ok();
    let key = cp
        .clawctl(&["key", "add", "app", "-o", "json"])
        .assert_ok()
        .json()["secret"]
        .as_str()
        .expect("the key's secret")
        .to_owned();
    let mut proxy = Proxy::builder(&cp).node_id("dp-diskfull").start();
    proxy.wait_ready();

    // Full.
    let filler = fs.fill("filler", RESERVE_BYTES + HEADROOM).expect("fill");
    let mut acked = BTreeSet::new();
    fill_with_writes(&cp, "u", &prompt, &mut acked);

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a reqwest client");
    for i in 0..REQUESTS {
        let resp = client
            .post(format!("{}/v1/chat/completions", proxy.url()))
            .bearer_auth(&key)
            .json(&serde_json::json!({
                "model": "chat",
                "messages": [{"role": "user", "content": format!("request {i} while the disk is full")}],
                "max_tokens": 8,
            }))
            .send()
            .await
            .expect("the proxy answers");
        assert!(resp.status().is_success(), "request {i}: {}", resp.status());
    }
    let requests = |cp: &ControlPlane| -> Option<u64> {
        let out = cp.clawctl(&["stats", "total", "-o", "json"]);
        if !out.success() {
            return None;
        }
        let v = out.json();
        v["requests"]
            .as_u64()
            .or_else(|| v["requests"].as_str().and_then(|s| s.parse().ok()))
    };
    // The proxy's batches are refused, not acknowledged: nothing stored.
    assert!(
        wait_until(Duration::from_secs(30), || proxy
            .logs()
            .contains("below the reserve")),
        "the proxy never saw its report refused for space; proxy log:\n{}",
        proxy.logs()
    );
    assert_eq!(requests(&cp), Some(0), "usage stored while full");

    // Space returns: the proxy resends and the usage is stored, exactly.
    std::fs::remove_file(&filler).expect("remove the filler");
    let mut last = None;
    let stored = wait_until(Duration::from_secs(60), || {
        last = requests(&cp);
        last == Some(REQUESTS)
    });
    assert!(
        stored,
        "usage of {REQUESTS} requests not stored after space returned (got {last:?}); proxy log:\n{}",
        proxy.logs()
    );
    // Durable, and not counted twice.
    proxy.stop();
    stop_cleanly(&mut cp);
    cp.restart();
    assert_eq!(requests(&cp), Some(REQUESTS), "after a restart");
    stop_cleanly(&mut cp);
    drop(cp);
    drop(fs);
}

/// SIGTERM stops the control plane within `--shutdown-timeout` even when
/// the graceful stop cannot finish: a backup stream whose client stopped
/// reading holds its connection open (the server waits on flow control),
/// so only the deadline ends the process — with status 3 and an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_at_the_deadline_when_the_graceful_stop_hangs() {
    use claw_proto::v1::CreateBackupRequest;
    use claw_proto::v1::backup_service_client::BackupServiceClient;
    use claw_tests::harness::random_hex;

    let scratch = tempfile::tempdir().expect("temp dir");
    // Incompressible prompts: the backup is megabytes, far above what the
    // client's flow-control window and the server's buffer hold.
    let prompt = scratch.path().join("random-prompt.txt");
    std::fs::write(&prompt, random_hex(PROMPT_BYTES / 2)).expect("write the prompt");
    let mut cp = ControlPlane::builder()
        .args(["--shutdown-timeout", SHUTDOWN_TIMEOUT])
        .start();
    for i in 0..60 {
        assert!(
            matches!(add_agent(&cp, &format!("big-{i}"), &prompt), Write::Acked),
            "agent {i}"
        );
    }
    let channel = tonic::transport::Endpoint::from_shared(cp.grpc_url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut request = tonic::Request::new(CreateBackupRequest {});
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", cp.admin_token())
            .parse()
            .expect("ascii token"),
    );
    let mut stream = BackupServiceClient::new(channel)
        .create_backup(request)
        .await
        .expect("backup starts")
        .into_inner();
    // One chunk, then the client stops reading (and keeps the stream).
    stream
        .message()
        .await
        .expect("first chunk")
        .expect("a chunk");
    let (status, logs) = tokio::task::spawn_blocking(move || {
        let status = stop_by_itself(&mut cp);
        (status, cp.logs())
    })
    .await
    .expect("stop");
    assert_eq!(
        status.code(),
        Some(EXIT_DEADLINE),
        "the deadline ended it; log:\n{logs}"
    );
    assert!(
        logs.contains("shutdown did not finish within the shutdown timeout"),
        "{logs}"
    );
    drop(stream);
}

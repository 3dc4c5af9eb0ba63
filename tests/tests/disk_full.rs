//! A full data volume (issue 18): the control plane's data directory on a
//! small tmpfs of its own, filled by writes. Below the reserve
//! (`--min-free-space`) writes are refused with `RESOURCE_EXHAUSTED` naming
//! the volume, reads, `/healthz` and `/metrics` answer, SIGTERM stops it
//! within the shutdown deadline, freeing space resumes writes without a
//! restart, and the directory opens again with every acknowledged write —
//! in a loop of fresh filesystems. One more run drives sled itself into
//! ENOSPC (no reserve) and checks the directory still opens with every
//! acknowledged write.
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
/// acknowledged), SIGTERM must stop it within the deadline, and once space
/// is back the directory must open with every acknowledged write.
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
        eprintln!(
            "run {run}: {} acknowledged, then: {:?}",
            acked.len(),
            failures.first()
        );
        let status = stop_by_itself(&mut cp);
        eprintln!("run {run}: stopped with {status:?}");
        std::fs::remove_file(&filler).expect("remove the filler");
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

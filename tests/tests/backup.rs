//! Backups and restore end to end (issue 14), with the real binaries:
//!
//! - `clawctl backup create` while a proxy serves traffic, reports usage and
//!   heartbeats run; more changes on the original afterwards (its version
//!   moves past the backup's); `claw-control-plane restore` into a fresh
//!   directory; a new control plane on it (same master key and tokens): the
//!   live proxy, reconnected to it, converges to the restored configuration
//!   although its version is lower than what the proxy held; the same
//!   client key authenticates; usage and run logs are there.
//! - A truncated file and a file with one byte flipped are refused with
//!   clear errors and leave no directory; a non-empty directory is refused.
//! - Scheduled backups: files appear, at most `--backup-keep` are kept, each
//!   restores; the backup metrics are exported with their help.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use claw_proto::v1::AuditRecord;
use claw_tests::harness::{
    ControlPlane, CtlOutput, Forwarder, ProxyBuilder, binary_path, http, wait_until,
    wait_until_async,
};
use claw_tests::mock::{Action, MockConfig, MockUpstream};
use prost::Message as _;
use serde_json::Value;

use crate::data_plane_support::{acked_versions, add_backend, chat_body, config_version};

const UPSTREAM_KEY: &str = "sk-up-backup-0123456789";
const WAIT: Duration = Duration::from_secs(45);

/// `claw-control-plane restore --from FILE --data-dir DIR`.
fn restore(from: &Path, dir: &Path) -> CtlOutput {
    let out = Command::new(binary_path("claw-control-plane"))
        .args(["restore", "--from"])
        .arg(from)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run claw-control-plane restore");
    CtlOutput {
        args: vec!["restore".into(), from.display().to_string()],
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A number in `-o json` output (u64 fields may be strings).
fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .or_else(|| v[k].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

fn requests(cp: &ControlPlane) -> u64 {
    let out = cp.clawctl(&["stats", "total", "-o", "json"]);
    if out.success() {
        num(&out.json(), "requests")
    } else {
        0
    }
}

fn runs(cp: &ControlPlane, agent: &str) -> Vec<Value> {
    cp.clawctl(&["heartbeat", "logs", agent, "--limit", "1000", "-o", "json"])
        .assert_ok()
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn acked(cp: &ControlPlane, node: &str) -> Option<u64> {
    acked_versions(cp).get(node).copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_traffic_restores_and_the_proxy_converges_to_it() {
    let mock = MockUpstream::start(
        MockConfig::default()
            .name("up")
            .api_key(UPSTREAM_KEY)
            .models(["native-chat"]),
    )
    .await;
    mock.set_always(Some(Action::reply("HEARTBEAT_OK")));
    // The proxy reaches "the control plane" through a forwarder, so it can
    // be moved to the restored one without restarting the proxy.
    let to_cp = Forwarder::start().await;
    let to_proxy = Forwarder::start().await;
    let mut cp1 = ControlPlane::builder()
        .heartbeat_proxy(format!("http://{}", to_proxy.addr()))
        .start();
    to_cp.point_to(cp1.grpc_addr());
    add_backend(
        &cp1,
        "b1",
        &mock.url(),
        UPSTREAM_KEY,
        &["--rpm", "100000", "--model", "chat=native-chat"],
    );
    let key = cp1
        .clawctl(&["key", "add", "app", "-o", "json"])
        .assert_ok()
        .json()["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    cp1.clawctl_stdin(
        &[
            "agent",
            "add",
            "a1",
            "--model",
            "chat",
            "--interval",
            "1s",
            "--checklist-file",
            "-",
        ],
        "- [ ] check the disk\n",
    )
    .assert_ok();
    let node = format!("dp-backup-{}", std::process::id());
    let proxy = ProxyBuilder::new(format!("http://{}", to_cp.addr()), cp1.proxy_token())
        .node_id(node.clone())
        .start();
    proxy.wait_ready();
    to_proxy.point_to(proxy.addr());
    let v = config_version(&cp1);
    assert!(
        wait_until(WAIT, || acked(&cp1, &node) == Some(v)),
        "the proxy never ACKed {v}"
    );

    // Traffic until told to stop.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (http, stop, ok, url, key) = (
            http.clone(),
            stop.clone(),
            ok.clone(),
            proxy.openai_url(),
            key.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .post(format!("{url}/chat/completions"))
                    .bearer_auth(&key)
                    .json(&chat_body("chat", false))
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status().is_success()) {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Usage reported and a heartbeat run finished before the backup.
    assert!(
        wait_until_async(WAIT, || async {
            requests(&cp1) > 0 && runs(&cp1, "a1").iter().any(|r| r["status"] == "suppressed")
        })
        .await,
        "no usage or heartbeat run reached the control plane\n{}",
        cp1.logs()
    );
    let usage_before = requests(&cp1);
    let runs_before = runs(&cp1, "a1").len();

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("claw.clawbak");
    let file_s = file.display().to_string();
    // While traffic flows.
    let out = cp1
        .ctl(&["backup", "create", &file_s])
        .run_async()
        .await
        .assert_ok();
    assert!(
        out.stdout.starts_with(&format!("wrote {file_s} (")) && out.stdout.contains("sha256 "),
        "{}",
        out.stdout
    );
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert!(!Path::new(&format!("{file_s}.tmp")).exists());
    // Refuses to overwrite without --force.
    cp1.ctl(&["backup", "create", &file_s])
        .run_async()
        .await
        .assert_err_contains("exists");
    stop.store(true, Ordering::Relaxed);
    traffic.await.expect("traffic task");
    assert_backup_audited_and_secret_free(&cp1, &file, &[UPSTREAM_KEY, &key, cp1.admin_token()])
        .await;
    let backup_version = config_version(&cp1);

    // The original moves on: a new backend and key, an update.
    add_backend(
        &cp1,
        "b2",
        &mock.url(),
        UPSTREAM_KEY,
        &["--model", "after-backup=native-chat"],
    );
    let late_key = cp1
        .clawctl(&["key", "add", "late", "-o", "json"])
        .assert_ok()
        .json()["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    cp1.clawctl(&["backend", "update", "b1", "--rpm", "90000"])
        .assert_ok();
    let later = config_version(&cp1);
    assert!(later > backup_version);
    assert!(
        wait_until(WAIT, || acked(&cp1, &node) == Some(later)),
        "the proxy never ACKed {later}"
    );
    cp1.stop_clean();

    // Damaged files are refused and leave nothing behind.
    let bytes = std::fs::read(&file).expect("read backup");
    let truncated = dir.path().join("truncated.clawbak");
    std::fs::write(&truncated, &bytes[..bytes.len() - 10]).expect("write");
    let target = dir.path().join("t1");
    let out = restore(&truncated, &target);
    assert!(!out.success());
    assert!(
        out.stderr.contains(&format!(
            "backup file {} is truncated: no trailer after",
            truncated.display()
        )),
        "{}",
        out.stderr
    );
    assert!(!target.exists());
    let (_, summary) =
        claw_proto::backup::verify(bytes.as_slice(), None).expect("the backup verifies");
    let mut flipped = bytes.clone();
    flipped[summary.trailer_offset as usize - 1] ^= 0x20;
    let altered = dir.path().join("altered.clawbak");
    std::fs::write(&altered, &flipped).expect("write");
    let out = restore(&altered, &target);
    assert!(!out.success());
    assert!(
        out.stderr
            .contains("checksum mismatch: the file was altered or damaged"),
        "{}",
        out.stderr
    );
    assert!(!target.exists());
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).expect("mkdir");
    std::fs::write(busy.join("x"), b"x").expect("write");
    let out = restore(&file, &busy);
    assert!(!out.success());
    assert!(out.stderr.contains("is not empty"), "{}", out.stderr);

    // Restore and start a new control plane on it.
    let restored = dir.path().join("restored");
    let out = restore(&file, &restored);
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("config version {backup_version}"))
            && out.stdout.contains("start it with master key "),
        "{}",
        out.stdout
    );
    let mut cp2 = ControlPlane::builder()
        .data_dir(&restored)
        .master_key(cp1.master_key())
        .admin_token(cp1.admin_token())
        .proxy_token(cp1.proxy_token())
        .heartbeat_proxy(format!("http://{}", to_proxy.addr()))
        .start();
    assert_eq!(config_version(&cp2), backup_version);
    to_cp.point_to(cp2.grpc_addr());
    // The proxy held `later` (> backup_version) of the old lineage; it takes
    // the restored snapshot anyway.
    assert!(
        wait_until(WAIT, || acked(&cp2, &node) == Some(backup_version)),
        "the proxy did not converge to the restored version {backup_version}: {:?}\n{}",
        acked_versions(&cp2),
        proxy.logs()
    );
    let chat = |key: String, model: &'static str| {
        let (http, url) = (http.clone(), proxy.openai_url());
        async move {
            http.post(format!("{url}/chat/completions"))
                .bearer_auth(&key)
                .json(&chat_body(model, false))
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        chat(key.clone(), "chat").await,
        200,
        "the same client key works"
    );
    assert_eq!(
        chat(late_key, "chat").await,
        401,
        "a key created after the backup is gone"
    );
    assert_ne!(
        chat(key.clone(), "after-backup").await,
        200,
        "a backend added after the backup is gone"
    );
    assert!(requests(&cp2) >= usage_before, "usage survived the restore");
    assert!(
        runs(&cp2, "a1").len() >= runs_before,
        "heartbeat runs survived the restore"
    );
    let backends: Vec<String> = cp2
        .clawctl(&["backend", "list", "-o", "json"])
        .assert_ok()
        .json()
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|b| b["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(backends, ["b1"]);

    // Equal versions, different lineages: the same backup restored a second
    // time, both stores moved to the same version with different changes.
    // A proxy coming from one gets the other's snapshot.
    let restored2 = dir.path().join("restored2");
    assert!(restore(&file, &restored2).success());
    let mut cp3 = ControlPlane::builder()
        .data_dir(&restored2)
        .master_key(cp1.master_key())
        .admin_token(cp1.admin_token())
        .proxy_token(cp1.proxy_token())
        .start();
    add_backend(
        &cp3,
        "b3",
        &mock.url(),
        UPSTREAM_KEY,
        &["--model", "only-in-cp3=native-chat"],
    );
    let target = config_version(&cp3);
    for rpm in 1000.. {
        if config_version(&cp2) >= target {
            break;
        }
        cp2.clawctl(&["backend", "update", "b1", "--rpm", &rpm.to_string()])
            .assert_ok();
    }
    assert_eq!(config_version(&cp2), target);
    assert!(
        wait_until(WAIT, || acked(&cp2, &node) == Some(target)),
        "the proxy never ACKed {target} from the first restored store"
    );
    cp2.stop_clean();
    to_cp.point_to(cp3.grpc_addr());
    let served = wait_until_async(WAIT, || {
        let call = chat(key.clone(), "only-in-cp3");
        async move { call.await == 200 }
    })
    .await;
    assert!(
        served,
        "the proxy kept the other lineage's snapshot at equal version {target}\n{}",
        proxy.logs()
    );
    // The proxy applies a snapshot before its ACK reaches the control plane.
    assert!(
        wait_until(WAIT, || acked(&cp3, &node) == Some(target)),
        "the proxy never ACKed {target} from the second restored store: {:?}",
        acked_versions(&cp3)
    );
    cp3.stop_clean();
}

/// The audit records in a backup file.
fn audit_records(file: &Path) -> Vec<AuditRecord> {
    let input = std::io::BufReader::new(std::fs::File::open(file).expect("open"));
    let mut records = Vec::new();
    claw_proto::backup::Reader::new(input, None)
        .expect("header")
        .read_all(|e| {
            if e.tree == "audit" {
                records.push(AuditRecord::decode(e.value.as_slice()).expect("an audit record"));
            }
            Ok(())
        })
        .expect("the backup verifies");
    records
}

/// The backup in `file` is audited (seen in the next backup, since a
/// backup's own record is written after its export) and holds none of
/// `secrets` in plaintext.
async fn assert_backup_audited_and_secret_free(cp: &ControlPlane, file: &Path, secrets: &[&str]) {
    let bytes = std::fs::read(file).expect("read backup");
    for s in secrets {
        assert!(
            !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
            "a secret is in the backup file in plaintext"
        );
    }
    let (_, first) = claw_proto::backup::verify(bytes.as_slice(), None).expect("verifies");
    let next = file.with_extension("next");
    let next_s = next.display().to_string();
    cp.ctl(&["backup", "create", &next_s])
        .run_async()
        .await
        .assert_ok();
    let records = audit_records(&next);
    let mine: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.resource_kind == "backup" && r.resource_id == first.sha256_hex())
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "one audit record of the backup: {records:#?}"
    );
    let r = mine[0];
    assert_eq!(
        (r.action.as_str(), r.operation.as_str()),
        ("created", "CreateBackup")
    );
    assert_eq!(r.token_name, "bootstrap");
    assert!(!r.peer.is_empty(), "{r:?}");
    let field = |name: &str| {
        r.changes
            .iter()
            .find(|c| c.field == name)
            .map(|c| c.new_value.clone())
            .unwrap_or_default()
    };
    assert_eq!(field("entries"), first.entries.to_string());
    assert_eq!(field("bytes"), first.size.to_string());
    assert_eq!(field("sha256"), first.sha256_hex());
}

/// Files of the scheduled backups in `dir`.
fn backup_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("claw-backup-") && n.ends_with(".clawbak"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn scheduled_backups_are_pruned_to_keep_and_each_restores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backups = dir.path().join("backups");
    std::fs::create_dir(&backups).expect("mkdir");
    std::fs::write(backups.join("notes.txt"), b"not a backup").expect("write");
    let mut cp = ControlPlane::builder()
        .arg("--backup-dir")
        .arg(&backups)
        .args(["--backup-every", "1s", "--backup-keep", "2"])
        .start();
    cp.clawctl(&["key", "add", "k1"]).assert_ok();
    // Three written means pruning has run at least once.
    assert!(
        wait_until(WAIT, || {
            cp.flush_logs();
            cp.logs().matches("wrote scheduled backup").count() >= 3
        }),
        "{}",
        cp.logs()
    );
    let files = backup_files(&backups);
    assert!((1..=2).contains(&files.len()), "at most 2 kept: {files:?}");
    assert!(
        backups.join("notes.txt").exists(),
        "other files are left alone"
    );
    let metrics = http::request(
        cp.http_addr(),
        "GET",
        "/metrics",
        None,
        Duration::from_secs(10),
    )
    .expect("GET /metrics")
    .text();
    for name in [
        "claw_cp_backup_last_success_timestamp_seconds",
        "claw_cp_backup_last_size_bytes",
        "claw_cp_backup_failures_total",
    ] {
        assert!(
            metrics.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{metrics}"
        );
    }
    let size = metrics
        .lines()
        .find_map(|l| l.strip_prefix("claw_cp_backup_last_size_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(size > 0.0, "{metrics}");
    cp.stop_clean();
    for (i, f) in backup_files(&backups).iter().enumerate() {
        let target = dir.path().join(format!("r{i}"));
        let out = restore(f, &target);
        assert!(out.success(), "{}: {}", f.display(), out.stderr);
        let again = ControlPlane::builder()
            .data_dir(&target)
            .master_key(cp.master_key())
            .admin_token(cp.admin_token())
            .proxy_token(cp.proxy_token())
            .start();
        let keys = again
            .clawctl(&["key", "list", "-o", "json"])
            .assert_ok()
            .stdout;
        assert!(keys.contains("k1"), "{keys}");
    }
}

#[test]
fn a_failed_download_leaves_no_file() {
    let cp = ControlPlane::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("denied.clawbak");
    let file_s = file.display().to_string();
    cp.clawctl_with_token("wrong-token-0123456789", &["backup", "create", &file_s])
        .assert_err();
    assert!(!file.exists());
    assert!(!Path::new(&format!("{file_s}.tmp")).exists());
    // A directory that does not exist: refused before anything is sent.
    let missing = dir.path().join("no-such-dir").join("b.clawbak");
    cp.clawctl(&["backup", "create", &missing.display().to_string()])
        .assert_err_contains("cannot create");
}

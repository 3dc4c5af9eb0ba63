//! `claw-control-plane check --data-dir DIR` (issue 14): an offline
//! integrity check that passes on a healthy directory and exits non-zero
//! naming what is wrong: a wrong master key, a missing or dangling index
//! entry, a record that does not decode; and refuses a directory a running
//! control plane holds.

use std::path::Path;
use std::process::{Command, Output};

use claw_control_plane::store::sled::SledStore;
use claw_control_plane::store::{Rollback, Store as _, Tree};
use claw_tests::harness::{ControlPlane, binary_path, random_hex};

/// Runs `claw-control-plane check --data-dir DIR` with `master_key`.
fn check(dir: &Path, master_key: &str) -> Output {
    Command::new(binary_path("claw-control-plane"))
        .arg("check")
        .arg("--data-dir")
        .arg(dir)
        .env("CLAW_MASTER_KEY", master_key)
        .env_remove("CLAW_MASTER_KEY_FILE")
        .env_remove("CLAW_DATA_DIR")
        .output()
        .expect("claw-control-plane runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A control plane with one of each resource, stopped cleanly.
fn populated() -> ControlPlane {
    let mut cp = ControlPlane::start();
    cp.clawctl_with_env(
        &[
            "backend",
            "add",
            "b1",
            "--url",
            "https://api.example.com/v1",
            "--api-key-env",
            "K",
            "--model",
            "gpt-4o",
        ],
        &[("K", "sk-test-0123456789abcdef")],
    )
    .assert_ok();
    cp.clawctl(&["key", "add", "app"]).assert_ok();
    cp.clawctl(&["token", "add", "ops", "--role", "viewer"])
        .assert_ok();
    cp.clawctl(&["agent", "add", "a1", "--model", "gpt-4o"])
        .assert_ok();
    cp.stop_clean();
    cp
}

/// Applies `body` to the stopped control plane's store directly.
fn damage(
    dir: &Path,
    trees: &[Tree],
    body: impl Fn(&dyn claw_control_plane::store::Txn) -> Result<(), Rollback>,
) {
    let store = SledStore::open(dir).expect("store opens");
    assert!(store.transaction(trees, &body).expect("transaction"));
    futures::executor::block_on(store.flush()).expect("flush");
}

#[test]
fn a_healthy_directory_passes() {
    let cp = populated();
    let out = check(cp.data_dir(), cp.master_key());
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(": ok ("), "{stdout}");
}

#[test]
fn a_wrong_master_key_is_named() {
    let cp = populated();
    let out = check(cp.data_dir(), &random_hex(32));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("meta: key \"master_key_id\""), "{err}");
    assert!(err.contains("not the given key"), "{err}");
    // The sealed provider key fails to open too, and says so.
    assert!(err.contains("backends: key \"be_"), "{err}");
}

#[test]
fn a_deleted_index_entry_and_a_dangling_one_are_named() {
    let cp = populated();
    damage(
        cp.data_dir(),
        &[Tree::BackendNames, Tree::ClientKeyHashes],
        |txn| {
            txn.remove(Tree::BackendNames, b"b1")
                .map_err(|_| Rollback)?;
            txn.insert(Tree::ClientKeyHashes, b"00ff", b"ck_0000000000000000")
                .map_err(|_| Rollback)?;
            Ok(())
        },
    );
    let out = check(cp.data_dir(), cp.master_key());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("backends: key \"be_")
            && err.contains("not in index backend_names (entry \"b1\")"),
        "{err}"
    );
    assert!(
        err.contains("client_key_hashes: key \"00ff\": points at \"ck_0000000000000000\""),
        "{err}"
    );
    assert!(err.contains("2 problem(s)"), "{err}");
}

#[test]
fn an_undecodable_record_and_a_dangling_token_index_are_named() {
    let cp = populated();
    damage(
        cp.data_dir(),
        &[Tree::Agents, Tree::AdminTokenNames],
        |txn| {
            txn.insert(Tree::Agents, b"a1", &[0xff, 0xff, 0xff])
                .map_err(|_| Rollback)?;
            txn.remove(Tree::AdminTokenNames, b"ops")
                .map_err(|_| Rollback)?;
            Ok(())
        },
    );
    let err = stderr(&check(cp.data_dir(), cp.master_key()));
    assert!(
        err.contains("agents: key \"a1\": record does not decode"),
        "{err}"
    );
    assert!(err.contains("admin_tokens: key \"tk_"), "{err}");
    assert!(err.contains("not in index admin_token_names"), "{err}");
}

#[test]
fn a_directory_in_use_is_refused() {
    let cp = ControlPlane::start();
    let out = check(cp.data_dir(), cp.master_key());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("is a control plane running on it?"), "{err}");
    let missing = tempfile::tempdir().expect("tempdir");
    let out = check(&missing.path().join("nope"), cp.master_key());
    assert!(
        stderr(&out).contains("is not a directory"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_restored_backup_passes_the_check() {
    let mut cp = ControlPlane::start();
    cp.clawctl_with_env(
        &[
            "backend",
            "add",
            "b1",
            "--url",
            "https://api.example.com/v1",
            "--api-key-env",
            "K",
            "--model",
            "gpt-4o",
        ],
        &[("K", "sk-test-0123456789abcdef")],
    )
    .assert_ok();
    cp.clawctl(&["key", "add", "app"]).assert_ok();
    cp.clawctl(&["token", "add", "ops", "--role", "viewer"])
        .assert_ok();
    let work = tempfile::tempdir().expect("tempdir");
    let file = work.path().join("claw.bak");
    cp.clawctl(&["backup", "create", &file.display().to_string()])
        .assert_ok();
    cp.stop_clean();
    let restored = work.path().join("restored");
    let out = Command::new(binary_path("claw-control-plane"))
        .args(["restore", "--from"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&restored)
        .output()
        .expect("restore runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = check(&restored, cp.master_key());
    assert!(out.status.success(), "{}", stderr(&out));
}

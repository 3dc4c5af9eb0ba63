//! The audit log across processes: every kind of admin write, made with the
//! real `clawctl` against the real control plane, leaves exactly one record
//! (an apply: one per resource) with the operation, the resource, the
//! version it produced and a field diff; a no-op leaves none; the filters
//! of `clawctl audit` work; and no secret reaches a record or the disk.

use claw_tests::harness::{ControlPlane, grep_dir, random_hex};
use serde_json::Value;

fn version(cp: &ControlPlane) -> u64 {
    cp.clawctl(&["snapshot", "-o", "json"]).assert_ok().json()["config_version"]
        .as_u64()
        .expect("config_version is a number")
}

/// The records made with the bootstrap token, newest first, narrowed by
/// `filter` (extra `clawctl audit` flags).
fn audit(cp: &ControlPlane, filter: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "--limit", "10000", "-o", "json"];
    args.extend_from_slice(filter);
    cp.clawctl(&args)
        .assert_ok()
        .json()
        .as_array()
        .expect("a JSON array")
        .clone()
}

fn mine(cp: &ControlPlane) -> Vec<Value> {
    audit(cp, &["--token", "bootstrap"])
}

/// `(field, old, new)` of a record's diff.
fn changes(r: &Value) -> Vec<(String, String, String)> {
    r["changes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("field"), s("old_value"), s("new_value"))
        })
        .collect()
}

fn change(field: &str, old: &str, new: &str) -> (String, String, String) {
    (field.into(), old.into(), new.into())
}

/// Tracks the log: each step must add exactly `n` records.
struct Log {
    seen: usize,
}

impl Log {
    /// The records the last write added (newest first), checked for their
    /// caller, operation, resource kind (any when empty) and version.
    fn added(
        &mut self,
        cp: &ControlPlane,
        n: usize,
        operation: &str,
        kind: &str,
        version: u64,
    ) -> Vec<Value> {
        let all = mine(cp);
        assert_eq!(
            all.len(),
            self.seen + n,
            "{operation}: expected {n} new record(s): {all:#?}"
        );
        self.seen = all.len();
        let new = all[..n].to_vec();
        for r in &new {
            assert_eq!(r["operation"], operation, "{r:#}");
            if !kind.is_empty() {
                assert_eq!(r["resource_kind"], kind, "{r:#}");
            }
            assert_eq!(r["token_name"], "bootstrap", "{r:#}");
            assert!(
                r["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("127.0.0.1:")),
                "peer is the caller's address: {r:#}"
            );
            assert_eq!(r["config_version"].as_u64(), Some(version), "{r:#}");
        }
        new
    }

    fn one(
        &mut self,
        cp: &ControlPlane,
        operation: &str,
        kind: &str,
        name: &str,
        version: u64,
    ) -> Value {
        let r = self.added(cp, 1, operation, kind, version).remove(0);
        assert_eq!(r["resource_name"], name, "{r:#}");
        r
    }
}

fn add_backend(cp: &ControlPlane, name: &str, key: &str) {
    cp.clawctl_with_env(
        &[
            "backend",
            "add",
            name,
            "--url",
            "https://api.example.com/v1",
            "--api-key-env",
            "KEY_VAR",
            "--rpm",
            "10",
            "--model",
            "gpt-4o",
        ],
        &[("KEY_VAR", key)],
    )
    .assert_ok();
}

#[tokio::test]
async fn every_admin_write_leaves_one_audit_record_with_its_diff_and_no_secret() {
    let cp = ControlPlane::start();
    let mut log = Log { seen: 0 };
    assert!(mine(&cp).is_empty(), "no record before the first write");
    let key1 = format!("sk-live-{}", random_hex(24));
    let key2 = format!("sk-live-{}", random_hex(24));
    let key3 = format!("sk-live-{}", random_hex(24));
    let hook_secret = format!("whsec-{}", random_hex(24));

    // Backends.
    add_backend(&cp, "b1", &key1);
    let r = log.one(&cp, "CreateBackend", "backend", "b1", version(&cp));
    assert_eq!(r["action"], "created");
    let c = changes(&r);
    assert!(c.contains(&change("rpm", "", "10")), "{c:?}");
    assert!(c.contains(&change("api_key", "", "(set)")), "{c:?}");
    let b1_id = r["resource_id"].as_str().expect("id").to_string();

    cp.clawctl(&["backend", "update", "b1", "--rpm", "20"])
        .assert_ok();
    let r = log.one(&cp, "UpdateBackend", "backend", "b1", version(&cp));
    assert_eq!(
        changes(&r),
        [change("rpm", "10", "20")],
        "only what changed"
    );

    let v = version(&cp);
    cp.clawctl(&["backend", "update", "b1", "--rpm", "20"])
        .assert_ok();
    assert_eq!(version(&cp), v);
    assert_eq!(mine(&cp).len(), log.seen, "a no-op update leaves no record");

    cp.clawctl_with_env(
        &["backend", "update", "b1", "--api-key-env", "KEY_VAR"],
        &[("KEY_VAR", key2.as_str())],
    )
    .assert_ok();
    let r = log.one(&cp, "UpdateBackend", "backend", "b1", version(&cp));
    assert_eq!(changes(&r), [change("api_key", "(sealed)", "(changed)")]);

    cp.clawctl(&["backend", "disable", "b1"]).assert_ok();
    let r = log.one(&cp, "SetBackendEnabled", "backend", "b1", version(&cp));
    assert_eq!(changes(&r), [change("enabled", "true", "false")]);
    cp.clawctl(&["backend", "enable", "b1"]).assert_ok();
    let r = log.one(&cp, "SetBackendEnabled", "backend", "b1", version(&cp));
    assert_eq!(changes(&r), [change("enabled", "false", "true")]);

    // Pools.
    cp.clawctl(&["pool", "set", "fallback", "--max-retries", "7"])
        .assert_ok();
    let r = log.one(&cp, "UpdatePoolSettings", "pool", "fallback", version(&cp));
    let c = changes(&r);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!((c[0].0.as_str(), c[0].2.as_str()), ("max_retries", "7"));

    // Client keys.
    let k = cp
        .clawctl(&["key", "add", "app", "--rpm", "5", "-o", "json"])
        .assert_ok()
        .json();
    let client_secret = k["secret"].as_str().expect("secret").to_string();
    let r = log.one(&cp, "CreateClientKey", "client_key", "app", version(&cp));
    assert!(changes(&r).contains(&change("rpm", "", "5")), "{r:#}");
    cp.clawctl(&["key", "rm", "app"]).assert_ok();
    let r = log.one(&cp, "DeleteClientKey", "client_key", "app", version(&cp));
    assert_eq!(r["action"], "deleted");
    assert!(changes(&r).contains(&change("rpm", "5", "")), "{r:#}");

    // Agents, checklists, a manual run.
    let before_agent = version(&cp);
    cp.clawctl(&[
        "agent",
        "add",
        "a1",
        "--model",
        "gpt-4o",
        "--interval",
        "30m",
    ])
    .assert_ok();
    // The first agent makes the control plane mint its internal client key
    // (a change of its own, audited as `system`): wait for it, so that the
    // versions below are the operator's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !audit(&cp, &["--token", "system"])
        .iter()
        .any(|r| r["operation"] == "EnsureInternalClientKey")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the internal key is never minted"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    log.one(&cp, "CreateAgent", "agent", "a1", before_agent + 1);
    cp.clawctl(&["agent", "update", "a1", "--interval", "1h"])
        .assert_ok();
    let r = log.one(&cp, "UpdateAgent", "agent", "a1", version(&cp));
    assert_eq!(changes(&r), [change("interval_seconds", "1800", "3600")]);
    cp.clawctl(&["agent", "disable", "a1"]).assert_ok();
    let r = log.one(&cp, "SetAgentEnabled", "agent", "a1", version(&cp));
    assert_eq!(changes(&r), [change("enabled", "true", "false")]);
    cp.clawctl(&["agent", "enable", "a1"]).assert_ok();
    log.one(&cp, "SetAgentEnabled", "agent", "a1", version(&cp));
    cp.clawctl_stdin(
        &["heartbeat", "checklist", "set", "a1"],
        "- [ ] check the disk\n",
    )
    .assert_ok();
    let r = log.one(&cp, "SetChecklist", "agent", "a1", version(&cp));
    let c = changes(&r);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0].0, "checklist");
    assert!(c[0].2.contains("check the disk"), "{c:?}");
    let v = version(&cp);
    cp.clawctl(&["heartbeat", "run", "a1"]).assert_ok();
    let r = log.one(&cp, "RunHeartbeat", "agent", "a1", v);
    assert_eq!(r["action"], "run");
    assert_eq!(version(&cp), v, "a run is not a configuration change");
    cp.clawctl(&["agent", "rm", "a1"]).assert_ok();
    log.one(&cp, "DeleteAgent", "agent", "a1", version(&cp));

    // Apply creating two resources: one record each, one version.
    let dir = tempfile::tempdir().expect("temp dir");
    let doc = dir.path().join("claw.yaml");
    std::fs::write(
        &doc,
        "backends:\n  - name: b2\n    base_url: https://api.example.com/v1\n    api_key_env: KEY_VAR\n    rpm: 30\n    models:\n      - canonical: gpt-4o\n\
         agents:\n  - id: a2\n    model: gpt-4o\n    webhook_url: http://127.0.0.1:9/hook\n    webhook_secret_env: WH_VAR\n",
    )
    .expect("write the document");
    let doc = doc.to_str().expect("utf-8 path");
    let env = [("KEY_VAR", key3.as_str()), ("WH_VAR", hook_secret.as_str())];
    cp.clawctl_with_env(&["apply", "-f", doc, "--dry-run"], &env)
        .assert_ok();
    assert_eq!(mine(&cp).len(), log.seen, "a dry run leaves no record");
    cp.clawctl_with_env(&["apply", "-f", doc], &env).assert_ok();
    let v = version(&cp);
    let new = log.added(&cp, 2, "ApplyConfig", "", v);
    let mut kinds: Vec<(String, String)> = new
        .iter()
        .map(|r| {
            assert_eq!(r["action"], "created", "{r:#}");
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (s("resource_kind"), s("resource_id"))
        })
        .collect();
    kinds.sort();
    assert_eq!(kinds[0], ("agent".into(), "a2".into()));
    assert_eq!(kinds[1].0, "backend");
    assert!(new.iter().any(|r| r["resource_name"] == "b2"), "{new:#?}");
    let agent = new
        .iter()
        .find(|r| r["resource_kind"] == "agent")
        .expect("the agent's record");
    assert_eq!(agent["resource_id"], "a2");
    assert!(
        changes(agent).contains(&change("webhook_secret", "", "(set)")),
        "{agent:#}"
    );
    cp.clawctl_with_env(&["apply", "-f", doc], &env).assert_ok();
    assert_eq!(
        mine(&cp).len(),
        log.seen,
        "an unchanged apply leaves no record"
    );

    // Master key rotation: recorded, at the unchanged version.
    let before = cp.clawctl(&["snapshot", "-o", "json"]).assert_ok().json();
    let key_file = dir.path().join("new.key");
    std::fs::write(&key_file, format!("{}\n", random_hex(32))).expect("write key file");
    let rotated = cp
        .clawctl(&[
            "master-key",
            "rotate",
            "--new-key-file",
            key_file.to_str().expect("utf-8"),
            "-o",
            "json",
        ])
        .assert_ok()
        .json();
    let v = version(&cp);
    assert_eq!(before["config_version"].as_u64(), Some(v));
    let r = log
        .added(&cp, 1, "RotateMasterKey", "master_key", v)
        .remove(0);
    assert_eq!(r["action"], "rotated");
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    assert_eq!(
        changes(&r),
        [(
            "key_id".to_string(),
            s(&rotated["old_key_id"]),
            s(&rotated["new_key_id"])
        )]
    );

    cp.clawctl(&["backend", "rm", "b1"]).assert_ok();
    let r = log.one(&cp, "DeleteBackend", "backend", "b1", version(&cp));
    assert!(
        changes(&r).contains(&change("api_key", "(sealed)", "")),
        "{r:#}"
    );

    // Filters.
    let b1 = audit(&cp, &["--resource", "backend/b1"]);
    assert_eq!(
        b1.len(),
        6,
        "create, 2 updates, disable, enable, rm: {b1:#?}"
    );
    assert!(b1.iter().all(|r| r["resource_name"] == "b1"));
    assert_eq!(
        audit(&cp, &["--resource", &format!("backend/{b1_id}")]).len(),
        6
    );
    assert_eq!(audit(&cp, &["--resource", "key/app"]).len(), 2);
    assert_eq!(audit(&cp, &["--resource", "agent/a1"]).len(), 7);
    assert!(audit(&cp, &["--token", "nobody"]).is_empty());
    // Times print to the second, and the writes above may all fall in one:
    // --since keeps exactly the records at or after the time given.
    let all = mine(&cp);
    let newest = all[0]["time"].as_str().expect("time").to_string();
    let since = audit(&cp, &["--since", &newest, "--token", "bootstrap"]);
    let expected = all
        .iter()
        .filter(|r| r["time"].as_str().is_some_and(|t| t >= newest.as_str()))
        .count();
    assert!(!since.is_empty(), "{since:#?}");
    assert_eq!(since.len(), expected, "{since:#?}");
    assert!(
        since
            .iter()
            .all(|r| r["time"].as_str().is_some_and(|t| t >= newest.as_str())),
        "{since:#?}"
    );
    assert!(audit(&cp, &["--since", "2100-01-01T00:00:00Z"]).is_empty());
    assert_eq!(
        audit(
            &cp,
            &["--since", "2000-01-01T00:00:00Z", "--token", "bootstrap"]
        )
        .len(),
        log.seen
    );
    assert_eq!(mine(&cp).len(), log.seen);
    cp.clawctl(&["audit", "--resource", "widget/x"])
        .assert_err_contains("resource");
    cp.clawctl(&["audit", "--limit", "10001"])
        .assert_err_contains("limit");

    // The table.
    let table = cp
        .clawctl(&["audit", "--resource", "backend/b1"])
        .assert_ok()
        .stdout;
    assert!(table.contains("rpm: 10 → 20"), "{table}");
    assert!(
        table.contains("UpdateBackend") && table.contains("bootstrap"),
        "{table}"
    );

    // No secret in any record, in any format, nor on disk.
    let mut shown = String::new();
    for args in [
        vec!["audit", "--limit", "10000", "-o", "json"],
        vec!["audit", "--limit", "10000", "-o", "yaml"],
        vec!["audit", "--limit", "10000"],
    ] {
        shown.push_str(&cp.clawctl(&args).assert_ok().stdout);
    }
    cp.flush_logs();
    for secret in [&key1, &key2, &key3, &client_secret, &hook_secret] {
        assert!(
            !shown.contains(secret.as_str()),
            "a secret in the audit log"
        );
        let hits = grep_dir(cp.data_dir(), secret.as_bytes());
        assert!(hits.is_empty(), "a secret in the data files: {hits:?}");
    }
}

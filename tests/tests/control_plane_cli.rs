//! Cross-process tests of the foundation: the real `claw-control-plane`
//! binary on ephemeral ports with a temporary data directory, driven by the
//! real `clawctl` binary.

use claw_tests::harness::{ControlPlane, random_hex};
use serde_json::Value;

fn version(cp: &ControlPlane) -> u64 {
    let v = cp.clawctl(&["snapshot", "-o", "json"]).assert_ok().json();
    v["config_version"]
        .as_u64()
        .expect("config_version is a number")
}

fn names(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|x| x[field].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Adds a backend reading its key from `KEY_VAR`.
fn add_backend(cp: &ControlPlane, name: &str, key: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "backend",
        "add",
        name,
        "--url",
        "https://api.example.com/v1",
        "--api-key-env",
        "KEY_VAR",
        "--rpm",
        "60",
        "--model",
        "gpt-4o=gpt-4o-2024-08-06,in=0.0000025,out=0.00001",
        "-o",
        "json",
    ];
    args.extend_from_slice(extra);
    cp.clawctl_with_env(&args, &[("KEY_VAR", key)])
        .assert_ok()
        .json()
}

#[tokio::test]
async fn every_resource_round_trips_through_clawctl_and_survives_restart() {
    let mut cp = ControlPlane::start();
    let v0 = version(&cp);

    // Backends: add, get by name and id, update, disable/enable.
    let b = add_backend(
        &cp,
        "openai-1",
        "sk-test-aaaaaaaaaaaaaaaa1234",
        &["--tpm", "90000"],
    );
    let id = b["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("be_"), "server-assigned id: {id}");
    assert_eq!(b["pool"], "primary");
    assert_eq!(b["status"], "enabled");
    assert_eq!(b["models"][0]["native"], "gpt-4o-2024-08-06");
    add_backend(
        &cp,
        "backup-1",
        "sk-test-bbbbbbbbbbbbbbbb5678",
        &["--pool", "fallback"],
    );
    let by_id = cp
        .clawctl(&["backend", "get", &id, "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(by_id["name"], "openai-1");
    let upd = cp
        .clawctl(&[
            "backend", "update", "openai-1", "--rpm", "120", "--label", "main", "-o", "json",
        ])
        .assert_ok()
        .json();
    assert_eq!(upd["rpm"], 120);
    assert_eq!(upd["label"], "main");
    assert_eq!(upd["tpm"], 90000, "fields not named in the update are kept");
    let dis = cp
        .clawctl(&["backend", "disable", "backup-1", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(dis["status"], "disabled");
    cp.clawctl(&["backend", "enable", "backup-1"]).assert_ok();
    let list = cp
        .clawctl(&["backend", "list", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(names(&list, "name"), ["backup-1", "openai-1"]);

    // Pools.
    let p = cp
        .clawctl(&[
            "pool",
            "set",
            "fallback",
            "--cooldown-base",
            "2s",
            "--max-retries",
            "4",
            "-o",
            "json",
        ])
        .assert_ok()
        .json();
    assert_eq!(p["cooldown_base_ms"], 2000);
    assert_eq!(p["max_retries"], 4);
    let pools = cp
        .clawctl(&["pool", "show", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(pools.as_array().map(Vec::len), Some(2));

    // Client keys: the secret is shown once and never again.
    let k = cp
        .clawctl(&[
            "key", "add", "app", "--models", "gpt-4o", "--rpm", "30", "-o", "json",
        ])
        .assert_ok()
        .json();
    let secret = k["secret"].as_str().expect("secret shown once").to_string();
    assert!(secret.len() >= 32);
    cp.clawctl(&["key", "add", "batch", "-o", "json"])
        .assert_ok();
    let keys = cp.clawctl(&["key", "list", "-o", "json"]).assert_ok();
    assert!(!keys.stdout.contains(&secret), "secret must not be listed");
    assert_eq!(names(&keys.json(), "name"), ["app", "batch"]);
    cp.clawctl(&["key", "rm", "batch"]).assert_ok();

    // Agents.
    let a = cp
        .clawctl(&[
            "agent",
            "add",
            "support-bot",
            "--model",
            "gpt-4o",
            "--interval",
            "15m",
            "--active-hours",
            "22:00-06:00",
            "--tz",
            "Asia/Shanghai",
            "-o",
            "json",
        ])
        .assert_ok()
        .json();
    assert_eq!(a["interval_seconds"], 900);
    assert_eq!(a["timezone"], "Asia/Shanghai");
    assert_eq!(a["enabled"], true);
    cp.clawctl(&["agent", "add", "temp-bot", "--model", "gpt-4o"])
        .assert_ok();
    let a = cp
        .clawctl(&[
            "agent",
            "update",
            "support-bot",
            "--active-hours",
            "09:00-24:00",
            "-o",
            "json",
        ])
        .assert_ok()
        .json();
    assert_eq!(a["active_hours"], "09:00-24:00");
    let a = cp
        .clawctl(&[
            "agent",
            "disable",
            "support-bot",
            "--note",
            "maintenance",
            "-o",
            "json",
        ])
        .assert_ok()
        .json();
    assert_eq!(a["enabled"], false);
    cp.clawctl(&["agent", "rm", "temp-bot"]).assert_ok();
    cp.clawctl(&["agent", "get", "temp-bot"])
        .assert_err_contains("not found");

    // Delete a backend.
    cp.clawctl(&["backend", "rm", "backup-1"]).assert_ok();
    cp.clawctl(&["backend", "get", "backup-1"])
        .assert_err_contains("not found");

    let v1 = version(&cp);
    assert!(v1 > v0, "changes bump the config version ({v0} -> {v1})");

    // Everything survives a restart, including the version.
    let before = cp.clawctl(&["export"]).assert_ok().stdout;
    cp.restart();
    assert_eq!(version(&cp), v1, "config version is persisted");
    assert_eq!(cp.clawctl(&["export"]).assert_ok().stdout, before);
    let b = cp
        .clawctl(&["backend", "get", "openai-1", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(b["id"], id);
    assert_eq!(b["rpm"], 120);
    let a = cp
        .clawctl(&["agent", "get", "support-bot", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(a["enabled"], false);
    assert_eq!(a["pause_note"], "maintenance");
    let p = cp
        .clawctl(&["pool", "show", "fallback", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(p["max_retries"], 4);
}

#[tokio::test]
async fn config_version_moves_once_per_change_and_never_on_failure() {
    let cp = ControlPlane::start();
    let v0 = version(&cp);
    add_backend(&cp, "b1", "sk-test-cccccccccccccccc0000", &[]);
    assert_eq!(version(&cp), v0 + 1);
    cp.clawctl(&["backend", "update", "b1", "--rpm", "0"])
        .assert_err_contains("rpm");
    assert_eq!(
        version(&cp),
        v0 + 1,
        "a rejected change does not bump the version"
    );
    cp.clawctl(&["backend", "update", "b1", "--rpm", "61"])
        .assert_ok();
    assert_eq!(version(&cp), v0 + 2);
    let exported = cp.clawctl(&["export"]).assert_ok().stdout;
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), exported).expect("write export");
    let path = file.path().to_str().expect("utf-8 path");
    cp.clawctl_with_env(
        &["apply", "-f", path],
        &[("KEY_VAR", "sk-test-cccccccccccccccc0000")],
    )
    .assert_ok();
    assert_eq!(
        version(&cp),
        v0 + 2,
        "applying the current config changes nothing"
    );
}

#[tokio::test]
async fn acknowledged_changes_survive_kill_9() {
    let mut cp = ControlPlane::start();
    add_backend(&cp, "durable", "sk-test-dddddddddddddddd0000", &[]);
    cp.clawctl(&["key", "add", "k1"]).assert_ok();
    cp.clawctl(&["agent", "add", "a1", "--model", "gpt-4o"])
        .assert_ok();
    let v = version(&cp);
    cp.kill9();
    cp.restart();
    assert_eq!(version(&cp), v);
    cp.clawctl(&["backend", "get", "durable"]).assert_ok();
    cp.clawctl(&["key", "get", "k1"]).assert_ok();
    cp.clawctl(&["agent", "get", "a1"]).assert_ok();
}

#[tokio::test]
async fn provider_keys_never_appear_in_plaintext_on_disk_in_logs_or_output() {
    let cp = ControlPlane::start();
    let plaintext = format!("sk-live-{}", random_hex(24));
    let b = add_backend(&cp, "secret-holder", &plaintext, &[]);
    let masked = b["api_key"].as_str().expect("api_key");
    assert_eq!(
        masked,
        format!("{}…{}", &plaintext[..6], &plaintext[plaintext.len() - 4..])
    );
    // Issue 17: at most a third of a key shows (a 12-character key showed 10).
    let short = add_backend(&cp, "short-key", "sk-abcdefwxy", &[]);
    assert_eq!(short["api_key"], "sk…xy", "{short}");
    // Exercise every read path, all formats.
    let mut outputs = Vec::new();
    for args in [
        vec!["backend", "get", "secret-holder"],
        vec!["backend", "get", "secret-holder", "-o", "json"],
        vec!["backend", "get", "secret-holder", "-o", "yaml"],
        vec!["backend", "list"],
        vec!["backend", "list", "-o", "json"],
        vec!["export"],
    ] {
        let out = cp.clawctl(&args).assert_ok();
        outputs.push(out.stdout + &out.stderr);
    }
    // Rotate the key too, and update the backend's key, so those paths are covered.
    let second = format!("sk-live-{}", random_hex(24));
    cp.clawctl_with_env(
        &[
            "backend",
            "update",
            "secret-holder",
            "--api-key-env",
            "KEY_VAR",
        ],
        &[("KEY_VAR", second.as_str())],
    )
    .assert_ok();
    for out in &outputs {
        assert!(
            !out.contains(&plaintext),
            "plaintext key in clawctl output: {out}"
        );
        assert!(out.contains(masked) || out.contains("api_key_env"), "{out}");
    }
    cp.flush_logs();
    for secret in [&plaintext, &second] {
        let hits = claw_tests::harness::grep_dir(cp.data_dir(), secret.as_bytes());
        assert!(
            hits.is_empty(),
            "plaintext key found in data files: {hits:?}"
        );
        assert!(
            !cp.logs().contains(secret.as_str()),
            "plaintext key in the logs"
        );
    }
}

#[tokio::test]
async fn master_key_rotation_online_then_restart_with_the_new_key() {
    let mut cp = ControlPlane::start();
    let key = format!("sk-live-{}", random_hex(24));
    add_backend(&cp, "rotated", &key, &[]);
    let before = cp.clawctl(&["snapshot", "-o", "json"]).assert_ok().json();

    let new_key = random_hex(32);
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("new.key");
    std::fs::write(&key_file, format!("{new_key}\n")).expect("write key file");
    let out = cp
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
    assert_eq!(out["old_key_id"], before["master_key_id"]);
    assert_ne!(out["new_key_id"], before["master_key_id"]);
    assert_eq!(out["reencrypted"], 1);

    // Still serving after the rotation.
    cp.clawctl(&["backend", "get", "rotated"]).assert_ok();
    assert_same_stored_key(&cp, &key);

    // The old key no longer opens the data directory; the new one does.
    cp.stop();
    let same_key = cp.master_key().to_owned();
    let refused = cp.try_start_with_master_key(&same_key);
    assert!(
        refused.contains("key id") || refused.contains("master key"),
        "the old key is refused with a clear message: {refused}"
    );
    cp.restart_with_master_key(&new_key);
    let after = cp.clawctl(&["snapshot", "-o", "json"]).assert_ok().json();
    assert_eq!(after["master_key_id"], out["new_key_id"]);
    assert_same_stored_key(&cp, &key);
}

/// Proves the stored key still decrypts to `key`: applying the exported
/// config with the same key is "unchanged", and with another key is an
/// api_key update (the server compares by decrypting).
fn assert_same_stored_key(cp: &ControlPlane, key: &str) {
    let exported = cp.clawctl(&["export"]).assert_ok().stdout;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("claw.yaml");
    let yaml = exported.replace(
        &exported
            .lines()
            .find(|l| l.contains("api_key_env"))
            .expect("export names the key by reference")
            .to_string(),
        "    api_key_env: ROTATION_KEY",
    );
    std::fs::write(&file, yaml).expect("write");
    let path = file.to_str().expect("utf-8");
    let same = cp
        .clawctl_with_env(
            &["apply", "-f", path, "--dry-run", "-o", "json"],
            &[("ROTATION_KEY", key)],
        )
        .assert_ok()
        .json();
    let backend = same["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .find(|c| c["kind"] == "backend")
        .expect("backend change")
        .clone();
    // Only the reference's name changed (ROTATION_KEY), not the key itself.
    assert_eq!(
        backend["fields"],
        serde_json::json!(["api_key_ref"]),
        "stored key decrypts to the original: {same}"
    );
    let other = cp
        .clawctl_with_env(
            &["apply", "-f", path, "--dry-run", "-o", "json"],
            &[("ROTATION_KEY", "sk-some-other-key-000000")],
        )
        .assert_ok()
        .json();
    let backend = other["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .find(|c| c["kind"] == "backend")
        .expect("backend change")
        .clone();
    assert_eq!(backend["action"], "update", "{other}");
    let fields = backend["fields"].as_array().expect("fields");
    assert!(
        fields.contains(&serde_json::json!("api_key")),
        "a different key is an update: {other}"
    );
}

#[tokio::test]
async fn invalid_input_names_the_field_and_stores_nothing() {
    let cp = ControlPlane::start();
    let v0 = version(&cp);
    let key = [("KEY_VAR", "sk-test-eeeeeeeeeeeeeeee0000")];
    let backend_cases: &[(&[&str], &str)] = &[
        (&["--rpm", "0"], "rpm"),
        (&["--url-override", "ftp://files.example.com"], "base_url"),
    ];
    for (extra, field) in backend_cases {
        let mut args = vec!["backend", "add", "bad-backend", "--api-key-env", "KEY_VAR"];
        if extra[0] == "--url-override" {
            args.extend(["--url", extra[1]]);
        } else {
            args.extend(["--url", "https://api.example.com/v1"]);
            args.extend_from_slice(extra);
        }
        let out = cp.clawctl_with_env(&args, &key).assert_err_contains(field);
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "one line: {}",
            out.stderr
        );
    }
    let list = cp
        .clawctl(&["backend", "list", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(list, Value::Array(vec![]), "nothing stored");

    // Duplicate backend name: the first is kept, the second rejected.
    add_backend(&cp, "dup", "sk-test-ffffffffffffffff0000", &[]);
    let v1 = version(&cp);
    cp.clawctl_with_env(
        &[
            "backend",
            "add",
            "dup",
            "--url",
            "https://other.example.com/v1",
            "--api-key-env",
            "KEY_VAR",
        ],
        &key,
    )
    .assert_err_contains("name");
    let list = cp
        .clawctl(&["backend", "list", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(names(&list, "name"), ["dup"]);
    assert_eq!(list[0]["base_url"], "https://api.example.com/v1");
    assert_eq!(version(&cp), v1);

    // Agents: unknown zone, empty window, impossible times.
    let agent_cases: &[(&[&str], &str)] = &[
        (&["--tz", "Mars/Olympus_Mons"], "timezone"),
        (&["--active-hours", "09:00-09:00"], "active_hours"),
        (&["--active-hours", "25:00-26:00"], "active_hours"),
        (&["--webhook", "ftp://hooks.example.com"], "webhook_url"),
    ];
    for (extra, field) in agent_cases {
        let mut args = vec!["agent", "add", "bad-agent", "--model", "gpt-4o"];
        args.extend_from_slice(extra);
        cp.clawctl(&args).assert_err_contains(field);
    }
    let agents = cp
        .clawctl(&["agent", "list", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(agents, Value::Array(vec![]), "no agent stored");

    // Pool settings out of range.
    cp.clawctl(&["pool", "set", "primary", "--emergency-fraction", "1.5"])
        .assert_err_contains("emergency_fraction");

    // Malformed YAML in apply -f: one line naming the file position, nothing changed.
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "backends:\n  - name: x\n    rpm: [oops\n").expect("write");
    let out = cp
        .clawctl(&["apply", "-f", bad.to_str().expect("utf-8")])
        .assert_err_contains("bad.yaml");
    assert_eq!(
        out.stderr.trim().lines().count(),
        1,
        "one line: {}",
        out.stderr
    );
    // A well-formed file with one invalid item stores none of the valid ones.
    let half = dir.path().join("half.yaml");
    std::fs::write(
        &half,
        "backends:\n  - name: good\n    base_url: https://a.example.com/v1\n    api_key_env: KEY_VAR\n    rpm: 10\n  - name: bad\n    base_url: https://b.example.com/v1\n    api_key_env: KEY_VAR\n    rpm: 0\n",
    )
    .expect("write");
    cp.clawctl_with_env(&["apply", "-f", half.to_str().expect("utf-8")], &key)
        .assert_err_contains("backends[1].rpm");
    let list = cp
        .clawctl(&["backend", "list", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(names(&list, "name"), ["dup"], "apply is all or nothing");
    assert_eq!(version(&cp), v1);
    assert!(v1 == v0 + 1);
}

#[tokio::test]
async fn admin_api_rejects_missing_wrong_and_proxy_tokens() {
    let cp = ControlPlane::start();
    let proxy_token = cp.proxy_token().to_string();
    for token in ["", "wrong-token-0123456789", proxy_token.as_str()] {
        let out = cp.clawctl_with_token(token, &["backend", "list"]);
        assert!(!out.status.success(), "token {token:?} must be rejected");
        assert!(out.stderr.contains("unauthenticated"), "{}", out.stderr);
    }
    // The same with a raw gRPC client, for every service.
    use claw_proto::v1::{
        GetSnapshotInfoRequest, ListAgentsRequest, ListBackendsRequest, ListClientKeysRequest,
        ListPoolSettingsRequest, agent_service_client::AgentServiceClient,
        backend_service_client::BackendServiceClient,
        client_key_service_client::ClientKeyServiceClient,
        cluster_service_client::ClusterServiceClient, pool_service_client::PoolServiceClient,
    };
    let channel = tonic::transport::Endpoint::from_shared(cp.grpc_url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    for token in [
        None,
        Some("wrong-token-0123456789"),
        Some(proxy_token.as_str()),
    ] {
        let codes = [
            BackendServiceClient::new(channel.clone())
                .list_backends(authed(ListBackendsRequest::default(), token))
                .await
                .err(),
            PoolServiceClient::new(channel.clone())
                .list_pool_settings(authed(ListPoolSettingsRequest {}, token))
                .await
                .err(),
            ClientKeyServiceClient::new(channel.clone())
                .list_client_keys(authed(ListClientKeysRequest::default(), token))
                .await
                .err(),
            AgentServiceClient::new(channel.clone())
                .list_agents(authed(ListAgentsRequest::default(), token))
                .await
                .err(),
            ClusterServiceClient::new(channel.clone())
                .get_snapshot_info(authed(GetSnapshotInfoRequest {}, token))
                .await
                .err(),
        ];
        for c in codes {
            assert_eq!(
                c.map(|s| s.code()),
                Some(tonic::Code::Unauthenticated),
                "token {token:?}"
            );
        }
    }
    // The admin token works.
    let mut r = tonic::Request::new(ListBackendsRequest::default());
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", cp.admin_token())
            .parse()
            .expect("ascii"),
    );
    BackendServiceClient::new(channel)
        .list_backends(r)
        .await
        .expect("admin token accepted");
}

#[tokio::test]
async fn export_then_apply_on_an_empty_server_reproduces_the_config() {
    let a = ControlPlane::start();
    let env = [
        ("KEY_A", "sk-test-aaaaaaaaaaaaaaaa9999"),
        ("KEY_B", "sk-test-bbbbbbbbbbbbbbbb9999"),
    ];
    a.clawctl_with_env(
        &[
            "backend",
            "add",
            "primary-1",
            "--url",
            "https://p.example.com/v1",
            "--api-key-env",
            "KEY_A",
            "--rpm",
            "500",
            "--tpm",
            "200000",
            "--upstream-timeout",
            "90s",
            "--weight",
            "3",
            "--label",
            "main",
            "--model",
            "gpt-4o=gpt-4o-2024-08-06,in=0.0000025,out=0.00001",
            "--model",
            "gpt-4o-mini",
        ],
        &env,
    )
    .assert_ok();
    a.clawctl_with_env(
        &[
            "backend",
            "add",
            "fallback-1",
            "--url",
            "http://f.example.com:8000/v1",
            "--api-key-env",
            "KEY_B",
            "--pool",
            "fallback",
            "--api",
            "anthropic",
            "--model",
            "gpt-4o",
            "--model",
            "claude=claude-sonnet-4-5,in_per_mtok=3,cache_write_per_mtok=3.75,cache_write_1h_per_mtok=6",
            "--disabled",
        ],
        &env,
    )
    .assert_ok();
    a.clawctl(&[
        "pool",
        "set",
        "primary",
        "--cooldown-base",
        "3s",
        "--exponential",
        "false",
    ])
    .assert_ok();
    a.clawctl(&[
        "key",
        "add",
        "app",
        "--models",
        "gpt-4o,gpt-4o-mini",
        "--rpm",
        "100",
    ])
    .assert_ok();
    let dir = tempfile::tempdir().expect("temp dir");
    let checklist = dir.path().join("HEARTBEAT.md");
    std::fs::write(
        &checklist,
        "# Checks\n- [ ] inbox zero\n- [ ] \"quotes\" and: colons\n",
    )
    .expect("write");
    a.clawctl(&[
        "agent",
        "add",
        "bot-1",
        "--model",
        "gpt-4o",
        "--interval",
        "45m",
        "--active-hours",
        "22:00-06:00",
        "--tz",
        "America/New_York",
        "--checklist-file",
        checklist.to_str().expect("utf-8"),
        "--webhook",
        "https://hooks.example.com/claw",
    ])
    .assert_ok();
    let exported = a.clawctl(&["export"]).assert_ok().stdout;
    for expected in [
        "    api: openai\n",
        "    api: anthropic\n",
        "        cache_write_1h_cost_per_token: 0.000006\n",
    ] {
        assert!(exported.contains(expected), "{expected:?} in\n{exported}");
    }
    let file = dir.path().join("claw.yaml");
    std::fs::write(&file, &exported).expect("write");
    let path = file.to_str().expect("utf-8");

    let b = ControlPlane::start();
    let dry = b
        .clawctl_with_env(&["apply", "-f", path, "--dry-run"], &env)
        .assert_ok();
    assert!(dry.stdout.contains("backend/primary-1"), "{}", dry.stdout);
    assert_eq!(
        b.clawctl(&["backend", "list", "-o", "json"])
            .assert_ok()
            .json(),
        Value::Array(vec![]),
        "dry run stores nothing"
    );
    b.clawctl_with_env(&["apply", "-f", path], &env).assert_ok();
    assert_eq!(
        b.clawctl(&["export"]).assert_ok().stdout,
        exported,
        "round trip"
    );
    let applied = b
        .clawctl(&["backend", "get", "fallback-1", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(applied["api"], "anthropic");
}

#[tokio::test]
async fn backend_api_and_the_1h_cache_price_show_in_list_get_and_json() {
    let cp = ControlPlane::start();
    let env = [("K", "sk-ant-test-0123456789abcd")];
    let added = cp
        .clawctl_with_env(
            &[
                "backend",
                "add",
                "claude-1",
                "--api",
                "anthropic",
                "--url",
                "https://api.anthropic.com/v1",
                "--api-key-env",
                "K",
                "--model",
                "claude=claude-sonnet-4-5,in_per_mtok=3,out_per_mtok=15,cache_read_per_mtok=0.3,cache_write_per_mtok=3.75,cache_write_1h=0.000006",
                "-o",
                "json",
            ],
            &env,
        )
        .assert_ok()
        .json();
    assert_eq!(added["api"], "anthropic");
    let m = &added["models"][0];
    assert_eq!(m["cache_write_1h_cost_per_token"].as_f64(), Some(0.000006));
    assert_eq!(m["cache_write_cost_per_token"].as_f64(), Some(0.00000375));
    add_backend(&cp, "gpt-1", "sk-test-0123456789abcdef", &[]);

    let list = cp.clawctl(&["backend", "list"]).assert_ok().stdout;
    let header = list.lines().next().unwrap_or_default();
    assert!(header.contains(" API "), "{list}");
    let row = |name: &str| {
        list.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("claude-1").get(2).map(String::as_str),
        Some("anthropic"),
        "{list}"
    );
    assert_eq!(
        row("gpt-1").get(2).map(String::as_str),
        Some("openai"),
        "{list}"
    );
    let json = cp
        .clawctl(&["backend", "list", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(names(&json, "api"), ["anthropic", "openai"]);
    let yaml = cp
        .clawctl(&["backend", "get", "claude-1", "-o", "yaml"])
        .assert_ok()
        .stdout;
    assert!(yaml.contains("api: anthropic"), "{yaml}");

    let get = cp
        .clawctl(&["backend", "get", "claude-1"])
        .assert_ok()
        .stdout;
    assert!(get.contains("API:") && get.contains("anthropic"), "{get}");
    assert!(get.contains("CACHE WRITE 1H $/MTOK"), "{get}");
    let prices: Vec<&str> = get
        .lines()
        .find(|l| l.contains("claude-sonnet-4-5"))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        prices.get(2..7),
        Some(&["3", "15", "0.3", "3.75", "6"][..]),
        "{get}"
    );

    // Unspecified on update leaves the protocol; --api changes it.
    let updated = cp
        .clawctl(&["backend", "update", "claude-1", "--rpm", "90", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(updated["api"], "anthropic");
    let updated = cp
        .clawctl(&[
            "backend", "update", "claude-1", "--api", "openai", "-o", "json",
        ])
        .assert_ok()
        .json();
    assert_eq!(updated["api"], "openai");

    // A bad value is one clear line and a non-zero exit; nothing is sent.
    let before = version(&cp);
    let out = cp.clawctl(&["backend", "update", "claude-1", "--api", "claude"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("claude") && out.stderr.contains("anthropic"),
        "{}",
        out.stderr
    );
    let out = cp.clawctl(&[
        "backend",
        "update",
        "claude-1",
        "--model",
        "claude,cache_write_1h=-1",
    ]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("cache_write_1h"), "{}", out.stderr);
    assert_eq!(version(&cp), before);
}

/// A gRPC request carrying `authorization: Bearer <token>` when a token is given.
fn authed<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii token"),
        );
    }
    r
}

/// `--native-only` (issue 13): set on add, shown by get/list (table and
/// JSON), left alone by an update that does not mention it, cleared by
/// `--native-only=false`, carried by export/apply (apply of the export
/// changes nothing; apply of an edited document sets it again).
#[tokio::test]
async fn native_only_round_trips_through_add_update_get_list_export_and_apply() {
    let cp = ControlPlane::start();
    let key = "sk-test-eeeeeeeeeeeeeeee0000";
    let b = add_backend(
        &cp,
        "claude-1",
        key,
        &["--api", "anthropic", "--native-only"],
    );
    assert_eq!(b["native_only"], true, "{b}");
    let get = |name: &str| {
        cp.clawctl(&["backend", "get", name, "-o", "json"])
            .assert_ok()
            .json()
    };
    let listed = cp
        .clawctl(&["backend", "list", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(listed[0]["native_only"], true, "{listed}");
    let table = cp.clawctl(&["backend", "list"]).assert_ok().stdout;
    assert!(table.contains("NATIVE ONLY"), "{table}");
    let details = cp
        .clawctl(&["backend", "get", "claude-1"])
        .assert_ok()
        .stdout;
    assert!(
        details
            .lines()
            .any(|l| l.starts_with("Native only") && l.ends_with("yes")),
        "{details}"
    );

    let v = version(&cp);
    cp.clawctl(&["backend", "update", "claude-1", "--rpm", "61"])
        .assert_ok();
    assert_eq!(get("claude-1")["native_only"], true, "unset = unchanged");
    cp.clawctl(&["backend", "update", "claude-1", "--native-only"])
        .assert_ok();
    assert_eq!(version(&cp), v + 1, "setting it again is no change");

    let exported = cp.clawctl(&["export"]).assert_ok().stdout;
    assert!(exported.contains("    native_only: true\n"), "{exported}");
    cp.clawctl(&["backend", "update", "claude-1", "--native-only=false"])
        .assert_ok();
    assert_ne!(get("claude-1")["native_only"], true, "cleared");
    let cleared = cp.clawctl(&["export"]).assert_ok().stdout;
    assert!(cleared.contains("    native_only: false\n"), "{cleared}");

    // Applying the export taken while it was set sets it again.
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), &exported).expect("write export");
    let path = file.path().to_str().expect("utf-8 path");
    cp.clawctl_with_env(&["apply", "-f", path], &[("KEY_VAR", key)])
        .assert_ok();
    assert_eq!(get("claude-1")["native_only"], true, "applied");
    let v = version(&cp);
    cp.clawctl_with_env(&["apply", "-f", path], &[("KEY_VAR", key)])
        .assert_ok();
    assert_eq!(
        version(&cp),
        v,
        "applying the current config changes nothing"
    );
    assert_eq!(cp.clawctl(&["export"]).assert_ok().stdout, exported);
}

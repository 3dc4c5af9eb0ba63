//! Issue 15, per-backend probe settings and health in `clawctl`: the flags
//! of `backend add|update`, the HEALTH column and health rows, and one YAML
//! shape for backends (`backend get|list -o yaml` prints the `export` entry,
//! which `apply` takes back as a no-op). The real control plane driven by
//! the real `clawctl` (and a raw gRPC client where the rule is the server's).

use claw_proto::v1::{
    Backend, CreateBackendRequest, ProbeSettings, backend_service_client::BackendServiceClient,
};
use claw_tests::harness::ControlPlane;
use serde_json::Value;

const KEY: &str = "sk-test-probe-0123456789abcdef";

fn add(cp: &ControlPlane, name: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "backend",
        "add",
        name,
        "--url",
        "https://api.example.com/v1",
        "--api-key-env",
        "KEY_VAR",
        "--model",
        "gpt-4o",
        "-o",
        "json",
    ];
    args.extend_from_slice(extra);
    cp.clawctl_with_env(&args, &[("KEY_VAR", KEY)])
        .assert_ok()
        .json()
}

fn get(cp: &ControlPlane, name: &str) -> Value {
    cp.clawctl(&["backend", "get", name, "-o", "json"])
        .assert_ok()
        .json()
}

fn version(cp: &ControlPlane) -> u64 {
    cp.clawctl(&["snapshot", "-o", "json"]).assert_ok().json()["config_version"]
        .as_u64()
        .expect("config_version is a number")
}

fn backend_count(cp: &ControlPlane) -> usize {
    cp.clawctl(&["backend", "list", "-o", "json"])
        .assert_ok()
        .json()
        .as_array()
        .map_or(0, Vec::len)
}

fn temp_file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write the file");
    path.to_str().expect("utf-8 path").to_string()
}

#[tokio::test]
async fn probe_flags_on_add_show_in_json_details_and_the_health_column() {
    let cp = ControlPlane::start();
    let b = add(
        &cp,
        "probed",
        &[
            "--probe-interval",
            "30s",
            "--probe-timeout",
            "5s",
            "--probe-failures",
            "3",
        ],
    );
    assert_eq!(b["probe"]["interval_ms"], 30_000, "{b}");
    let json = get(&cp, "probed");
    assert_eq!(json["probe"]["interval_ms"], 30_000, "{json}");
    assert_eq!(json["probe"]["timeout_ms"], 5_000, "{json}");
    assert_eq!(json["probe"]["failures"], 3, "{json}");
    assert_eq!(json["status"], "enabled", "status keeps its own values");
    add(&cp, "plain", &[]);
    assert!(
        get(&cp, "plain")["probe"].is_null(),
        "no flags = the defaults"
    );

    let details = cp.clawctl(&["backend", "get", "probed"]).assert_ok().stdout;
    assert!(
        details
            .lines()
            .any(|l| l.starts_with("Probe:") && l.ends_with("interval 30s, timeout 5s, failures 3")),
        "{details}"
    );
    assert!(
        details.lines().any(|l| l.starts_with("Health:")),
        "{details}"
    );
    let plain = cp.clawctl(&["backend", "get", "plain"]).assert_ok().stdout;
    assert!(
        plain.contains("interval default, timeout default, failures default"),
        "{plain}"
    );

    // HEALTH next to STATUS, one of the state names.
    let table = cp.clawctl(&["backend", "list"]).assert_ok().stdout;
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let col = header
        .iter()
        .position(|h| *h == "HEALTH")
        .unwrap_or_else(|| panic!("a HEALTH column: {table}"));
    assert_eq!(header.get(col - 1), Some(&"STATUS"), "{table}");
    // NATIVE ONLY is two words in the header, one cell in the rows.
    let row_col = col - 1;
    for row in lines {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert!(
            matches!(
                cells.get(row_col).copied(),
                Some("healthy" | "unhealthy" | "ejected" | "not_probed" | "unknown")
            ),
            "{table}"
        );
    }
}

#[tokio::test]
async fn bad_probe_values_name_the_flag_exit_non_zero_and_store_nothing() {
    let cp = ControlPlane::start();
    let v = version(&cp);
    for (flags, needle) in [
        (&["--probe-interval", "500ms"][..], "--probe-interval: "),
        (&["--probe-interval", "25h"][..], "--probe-interval: "),
        (&["--probe-timeout", "50ms"][..], "--probe-timeout: "),
        (&["--probe-timeout", "301s"][..], "--probe-timeout: "),
        (
            &["--probe-interval", "5s", "--probe-timeout", "5s"][..],
            "--probe-timeout: ",
        ),
        (&["--probe-failures", "101"][..], "--probe-failures: "),
        (&["--probe-interval", "1500us"][..], "--probe-interval: "),
    ] {
        let mut args = vec![
            "backend",
            "add",
            "bad",
            "--url",
            "https://api.example.com/v1",
            "--api-key-env",
            "KEY_VAR",
        ];
        args.extend_from_slice(flags);
        let out = cp
            .clawctl_with_env(&args, &[("KEY_VAR", KEY)])
            .assert_err_contains(needle);
        assert_eq!(out.stderr.lines().count(), 1, "one line: {out}");
    }
    assert_eq!(backend_count(&cp), 0, "nothing stored");
    assert_eq!(version(&cp), v);

    // On update, against the stored settings too: a 40s timeout is not
    // shorter than the stored 30s interval.
    add(&cp, "b1", &["--probe-interval", "30s"]);
    let v = version(&cp);
    for (flags, needle) in [
        (&["--probe-timeout", "40s"][..], "--probe-timeout: "),
        (&["--probe-failures", "1000"][..], "--probe-failures: "),
    ] {
        let mut args = vec!["backend", "update", "b1"];
        args.extend_from_slice(flags);
        let out = cp.clawctl(&args).assert_err_contains(needle);
        assert_eq!(out.stderr.lines().count(), 1, "one line: {out}");
    }
    assert_eq!(version(&cp), v, "nothing stored");
    assert_eq!(get(&cp, "b1")["probe"]["interval_ms"], 30_000);

    // The server enforces the same rule, naming the proto field.
    let channel = tonic::transport::Endpoint::from_shared(cp.grpc_url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut req = tonic::Request::new(CreateBackendRequest {
        backend: Some(Backend {
            name: "raw".into(),
            base_url: "https://api.example.com/v1".into(),
            api_key: KEY.into(),
            rpm: 60,
            enabled: true,
            probe: Some(ProbeSettings {
                interval_ms: 500,
                ..Default::default()
            }),
            ..Default::default()
        }),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", cp.admin_token())
            .parse()
            .expect("ascii token"),
    );
    let err = BackendServiceClient::new(channel)
        .create_backend(req)
        .await
        .expect_err("the control plane refuses it");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("probe.interval_ms: "), "{err:?}");
    assert_eq!(version(&cp), v);
}

#[tokio::test]
async fn no_probe_on_update_and_probe_again_keep_the_other_settings() {
    let cp = ControlPlane::start();
    add(&cp, "b1", &["--probe-interval", "30s"]);
    cp.clawctl(&["backend", "update", "b1", "--no-probe"])
        .assert_ok();
    let json = get(&cp, "b1");
    assert_eq!(json["probe"]["disabled"], true, "{json}");
    assert_eq!(json["probe"]["interval_ms"], 30_000, "kept: {json}");
    let details = cp.clawctl(&["backend", "get", "b1"]).assert_ok().stdout;
    assert!(
        details.contains("disabled (passive health only)"),
        "{details}"
    );

    let v = version(&cp);
    cp.clawctl(&["backend", "update", "b1", "--no-probe"])
        .assert_ok();
    assert_eq!(version(&cp), v, "the same settings again change nothing");

    cp.clawctl(&[
        "backend",
        "update",
        "b1",
        "--probe",
        "--probe-failures",
        "5",
    ])
    .assert_ok();
    let json = get(&cp, "b1");
    assert_ne!(json["probe"]["disabled"], true, "{json}");
    assert_eq!(json["probe"]["interval_ms"], 30_000, "{json}");
    assert_eq!(json["probe"]["failures"], 5, "{json}");
    // Other updates leave the probe settings alone.
    cp.clawctl(&["backend", "update", "b1", "--rpm", "61"])
        .assert_ok();
    assert_eq!(get(&cp, "b1")["probe"]["failures"], 5);

    cp.clawctl(&["backend", "update", "b1", "--probe", "--no-probe"])
        .assert_err();
    // --no-probe on add.
    let b = add(&cp, "quiet", &["--no-probe"]);
    assert_eq!(b["probe"]["disabled"], true, "{b}");

    // The audit log shows the change.
    let audit = cp
        .clawctl(&["audit", "--limit", "100", "-o", "json"])
        .assert_ok()
        .stdout;
    assert!(audit.contains("\"probe\""), "{audit}");
}

/// `backend get -o yaml` printed proto fields (`timeout_ms: 120000`) while
/// `export` wrote `timeout: 2m`: it now prints the backend's `export` entry,
/// and applying it changes nothing.
#[tokio::test]
async fn backend_yaml_is_the_export_entry_and_applies_as_a_no_op() {
    let cp = ControlPlane::start();
    add(
        &cp,
        "b1",
        &[
            "--probe-interval",
            "30s",
            "--probe-timeout",
            "5s",
            "--probe-failures",
            "3",
        ],
    );
    add(&cp, "b2", &["--no-probe", "--upstream-timeout", "90s"]);
    add(&cp, "b3", &[]);
    let yaml = cp
        .clawctl(&["backend", "get", "b1", "-o", "yaml"])
        .assert_ok()
        .stdout;
    assert!(yaml.contains("timeout: 2m"), "{yaml}");
    assert!(!yaml.contains("_ms"), "{yaml}");
    assert!(
        !yaml.contains("status"),
        "output-only fields stay out: {yaml}"
    );
    assert!(!yaml.contains(KEY), "{yaml}");
    let one: Value = serde_norway::from_str(&yaml).expect("yaml");
    assert_eq!(
        one["probe"],
        serde_json::json!({"interval": "30s", "timeout": "5s", "failures": 3}),
        "{yaml}"
    );
    let b2: Value = serde_norway::from_str(
        &cp.clawctl(&["backend", "get", "b2", "-o", "yaml"])
            .assert_ok()
            .stdout,
    )
    .expect("yaml");
    assert_eq!(b2["probe"], serde_json::json!({"disabled": true}));
    let b3 = cp
        .clawctl(&["backend", "get", "b3", "-o", "yaml"])
        .assert_ok()
        .stdout;
    assert!(!b3.contains("probe"), "omitted when all default: {b3}");

    let list_yaml = cp
        .clawctl(&["backend", "list", "-o", "yaml"])
        .assert_ok()
        .stdout;
    let list: Value = serde_norway::from_str(&list_yaml).expect("yaml");
    let export: Value =
        serde_norway::from_str(&cp.clawctl(&["export"]).assert_ok().stdout).expect("yaml");
    assert_eq!(list, export["backends"], "the same shape as export");
    assert_eq!(list[0], one);

    // get -o yaml > f; apply -f f: nothing changes (nor for the list).
    let dir = tempfile::tempdir().expect("tempdir");
    let v = version(&cp);
    for (name, text) in [("one.yaml", &yaml), ("list.yaml", &list_yaml)] {
        let path = temp_file(&dir, name, text);
        let plan = cp
            .clawctl_with_env(
                &["apply", "-f", &path, "--dry-run", "-o", "json"],
                &[("KEY_VAR", KEY)],
            )
            .assert_ok()
            .json();
        let changes = plan["changes"].as_array().expect("changes");
        assert!(!changes.is_empty(), "{plan}");
        assert!(changes.iter().all(|c| c["action"] == "unchanged"), "{plan}");
        cp.clawctl_with_env(&["apply", "-f", &path], &[("KEY_VAR", KEY)])
            .assert_ok();
        assert_eq!(version(&cp), v, "{name}: applying it changes nothing");
    }
    assert_eq!(backend_count(&cp), 3, "a partial document prunes nothing");

    // An agent's entry applies alone the same way.
    cp.clawctl(&["agent", "add", "a1", "--model", "gpt-4o"])
        .assert_ok();
    let agent = cp
        .clawctl(&["agent", "get", "a1", "-o", "yaml"])
        .assert_ok()
        .stdout;
    let path = temp_file(&dir, "agent.yaml", &agent);
    let v = version(&cp);
    let plan = cp
        .clawctl(&["apply", "-f", &path, "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(plan["changes"][0]["kind"], "agent", "{plan}");
    assert_eq!(plan["changes"][0]["action"], "unchanged", "{plan}");
    assert_eq!(version(&cp), v);

    // JSON stays the API's message, for scripts.
    assert_eq!(get(&cp, "b2")["timeout_ms"], 90_000);
}

#[tokio::test]
async fn probe_settings_round_trip_through_export_and_apply() {
    let cp = ControlPlane::start();
    add(
        &cp,
        "b1",
        &["--probe-interval", "2m", "--probe-failures", "4"],
    );
    add(&cp, "b2", &["--no-probe"]);
    let exported = cp.clawctl(&["export"]).assert_ok().stdout;
    assert!(
        exported.contains("    probe:\n      interval: 2m\n      failures: 4\n"),
        "{exported}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = temp_file(&dir, "claw.yaml", &exported);

    // Changed behind the document's back; a dry run shows it, apply restores it.
    cp.clawctl(&["backend", "update", "b1", "--probe-interval", "45s"])
        .assert_ok();
    cp.clawctl(&["backend", "update", "b2", "--probe"])
        .assert_ok();
    let dry = cp
        .clawctl_with_env(
            &["apply", "-f", &path, "--dry-run", "-o", "json"],
            &[("KEY_VAR", KEY)],
        )
        .assert_ok()
        .json();
    let fields = |name: &str| {
        dry["changes"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .map(|c| c["fields"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(fields("b1"), serde_json::json!(["probe"]), "{dry}");
    assert_eq!(fields("b2"), serde_json::json!(["probe"]), "{dry}");
    cp.clawctl_with_env(&["apply", "-f", &path], &[("KEY_VAR", KEY)])
        .assert_ok();
    assert_eq!(get(&cp, "b1")["probe"]["interval_ms"], 120_000);
    assert_eq!(get(&cp, "b2")["probe"]["disabled"], true);
    assert_eq!(cp.clawctl(&["export"]).assert_ok().stdout, exported);

    // Onto an empty control plane: the same settings.
    let fresh = ControlPlane::start();
    fresh
        .clawctl_with_env(&["apply", "-f", &path], &[("KEY_VAR", KEY)])
        .assert_ok();
    assert_eq!(fresh.clawctl(&["export"]).assert_ok().stdout, exported);

    // A bad value in a document names its field there; nothing is sent.
    let bad = exported.replace("interval: 2m", "interval: 500ms");
    let bad = temp_file(&dir, "bad.yaml", &bad);
    let v = version(&cp);
    cp.clawctl_with_env(&["apply", "-f", &bad], &[("KEY_VAR", KEY)])
        .assert_err_contains("backends[0].probe.interval: ");
    let unknown = exported.replace("failures: 4", "failures: 4\n      retries: 2");
    let unknown = temp_file(&dir, "unknown.yaml", &unknown);
    cp.clawctl_with_env(&["apply", "-f", &unknown], &[("KEY_VAR", KEY)])
        .assert_err_contains("retries");
    assert_eq!(version(&cp), v);
}

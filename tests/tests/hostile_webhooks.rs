//! The SSRF guard of webhook and wake URLs (issue 17 item 9), with the real
//! control plane, proxy and `clawctl`:
//!
//! - save time: `agent add`/`update`/`apply` refuse a `webhook_url` or
//!   `wake_url` on the cloud metadata address (also as `[::ffff:a9fe:a9fe]`
//!   and the decimal `2852039166`), `0.0.0.0` and the control plane's own
//!   gRPC and HTTP ports: one line naming the field, non-zero exit, nothing
//!   stored; loopback and `localhost` only with `--allow-loopback-webhooks`
//!   (flag or `CLAW_ALLOW_LOOPBACK_WEBHOOKS`); the `--public-url` host and
//!   port are the control plane's own too;
//! - connect time: `http://localhost:<cp-http-port>/metrics` passes the
//!   save-time check (names are not resolved then) but resolves to the
//!   control plane's own listener: every delivery attempt is refused before
//!   connecting, the run ends `dead_letter` with the refusal as its error,
//!   counted in `claw_cp_webhook_refused_total{reason="own_listener"}`;
//!   a wake to the own gRPC port fails the run the same way.

use std::time::Duration;

use claw_tests::harness::heartbeat::{
    add_agent, cp_metrics, far_active_hours, heartbeat_fleet, manual_run, metric_value, run_by_id,
    wait_for,
};
use claw_tests::harness::{ControlPlane, Forwarder, Proxy};
use claw_tests::mock::{Action, MockConfig, MockUpstream};
use serde_json::Value;

const KEY: &str = "sk-test-key-0123456789";

fn agents(cp: &ControlPlane) -> Value {
    cp.clawctl(&["agent", "list", "-o", "json"])
        .assert_ok()
        .json()
}

fn metric(cp: &ControlPlane, series: &str) -> f64 {
    metric_value(&cp_metrics(cp), series)
}

/// `clawctl agent add ID --model m EXTRA…` must fail with one line naming
/// `field` and saying why.
#[track_caller]
fn refused(cp: &ControlPlane, extra: &[&str], field: &str, why: &str) {
    let mut args = vec!["agent", "add", "hostile", "--model", "m"];
    args.extend_from_slice(extra);
    let out = cp
        .clawctl(&args)
        .assert_err_contains(&format!("{field}: address "));
    assert!(out.stderr.contains(why), "{why:?} in {out}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "one line: {out}");
}

#[test]
fn metadata_unspecified_and_own_listener_urls_are_refused_at_save_time() {
    // Loopback allowed (the harness default): the own listeners are refused
    // all the same.
    let cp = ControlPlane::start();
    let grpc = cp.grpc_addr().port();
    let http = cp.http_addr().port();
    let metadata = "link-local/cloud metadata";
    let own = "the control plane's own listener";
    for (url, why) in [
        ("http://169.254.169.254/latest/meta-data/", metadata),
        ("http://[::ffff:a9fe:a9fe]/", metadata),
        ("http://2852039166/", metadata),
        ("http://0.0.0.0:8080/hook", "unspecified"),
        (&format!("http://127.0.0.1:{grpc}/"), own),
        (&format!("http://127.0.0.1:{http}/metrics"), own),
        (&format!("http://[::1]:{http}/metrics"), own),
    ] {
        refused(&cp, &["--webhook", url], "webhook_url", why);
        refused(
            &cp,
            &["--target", "wake", "--wake-url", url],
            "wake_url",
            why,
        );
    }
    assert_eq!(agents(&cp), Value::Array(vec![]), "nothing stored");

    // An update is refused the same way and leaves the agent as it was.
    cp.clawctl(&[
        "agent",
        "add",
        "good",
        "--model",
        "m",
        "--webhook",
        "http://10.20.30.40:8080/hook",
    ])
    .assert_ok();
    cp.clawctl(&["agent", "update", "good", "--webhook", "http://2852039166/"])
        .assert_err_contains("webhook_url: address 169.254.169.254 refused");
    let list = agents(&cp);
    assert_eq!(
        list[0]["webhook_url"], "http://10.20.30.40:8080/hook",
        "{list}"
    );

    // apply: the whole document is refused, nothing changes.
    let dir = tempfile::tempdir().expect("temp dir");
    let doc = dir.path().join("agents.yaml");
    std::fs::write(
        &doc,
        "agents:\n  - {id: applied, model: m, webhook_url: \"http://[::ffff:a9fe:a9fe]/x\"}\n",
    )
    .expect("write");
    let out = cp
        .clawctl(&["apply", "-f", doc.to_str().expect("utf-8")])
        .assert_err_contains("webhook_url");
    assert!(out.stderr.contains(metadata), "{out}");
    let list = agents(&cp);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
}

#[test]
fn loopback_needs_the_flag_or_its_env_variable() {
    let strict = ControlPlane::builder()
        .allow_loopback_webhooks(false)
        .args(["--public-url", "https://claw-cp.internal.example:9443"])
        .start();
    // Its public URL is its own listener too, by name.
    refused(
        &strict,
        &["--webhook", "https://CLAW-CP.internal.example:9443/metrics"],
        "webhook_url",
        "the control plane's own listener",
    );
    let flag = "--allow-loopback-webhooks";
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://127.9.9.9/hook",
        "http://[::1]:8080/hook",
        "http://localhost:8080/hook",
        "http://agent.localhost/hook",
    ] {
        refused(&strict, &["--webhook", url], "webhook_url", flag);
    }
    assert_eq!(agents(&strict), Value::Array(vec![]), "nothing stored");
    // Private addresses stay allowed: runtimes live in the cluster.
    strict
        .clawctl(&[
            "agent",
            "add",
            "in-cluster",
            "--model",
            "m",
            "--webhook",
            "http://192.168.10.5:8080/hook",
        ])
        .assert_ok();

    let by_env = ControlPlane::builder()
        .allow_loopback_webhooks(false)
        .env("CLAW_ALLOW_LOOPBACK_WEBHOOKS", "true")
        .start();
    by_env
        .clawctl(&[
            "agent",
            "add",
            "local",
            "--model",
            "m",
            "--webhook",
            "http://localhost:8080/hook",
        ])
        .assert_ok();
}

/// A control plane with fast webhook retries (two attempts), a mock
/// upstream answering every run with an alert, and a proxy in between.
async fn alerting_fleet() -> (ControlPlane, Proxy, MockUpstream, Forwarder) {
    let upstream = MockUpstream::start(MockConfig::default().name("up").api_key(KEY)).await;
    upstream.set_always(Some(Action::reply("ALERT: the disk is 97% full")));
    let builder = ControlPlane::builder()
        .env("CLAW_WEBHOOK_MAX_ATTEMPTS", "2")
        .webhook_backoff("100ms", Some("200ms"));
    let (cp, proxy, fwd) = heartbeat_fleet(builder, "up", &upstream.url(), KEY, "m-alert").await;
    (cp, proxy, upstream, fwd)
}

/// How long the run waits below may take.
const WAIT: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_the_control_planes_own_port_is_never_posted_to() {
    let (cp, _proxy, _upstream, _fwd) = alerting_fleet().await;
    let http = cp.http_addr().port();
    let grpc = cp.grpc_addr().port();
    let hours = far_active_hours();
    // A name passes the save-time check: it is not resolved then.
    let hook = format!("http://localhost:{http}/metrics");
    add_agent(
        &cp,
        "self-hook",
        "m-alert",
        &[
            "--interval",
            "1h",
            "--active-hours",
            &hours,
            "--webhook",
            &hook,
        ],
        "- [ ] check the disk\n",
    );
    let before = metric(
        &cp,
        "claw_cp_webhook_refused_total{reason=\"own_listener\"}",
    );

    // The run's LLM part succeeds (an alert); its delivery is refused at
    // every attempt and dead-lettered with the refusal as its error.
    let id = manual_run(&cp, "self-hook", WAIT)["run_id"]
        .as_str()
        .expect("run id")
        .to_string();
    wait_for("the dead letter", &cp, WAIT, || {
        run_by_id(&cp, "self-hook", &id).is_some_and(|r| r["status"] == "dead_letter")
    });
    let run = run_by_id(&cp, "self-hook", &id).expect("the run");
    let error = run["error"].as_str().unwrap_or_default();
    // 127.0.0.1 or [::1], whichever localhost resolves to first.
    assert!(
        error.starts_with("webhook address ")
            && error.ends_with(&format!(
                ":{http} refused: the control plane's own listener"
            )),
        "{run}"
    );
    let after = metric(
        &cp,
        "claw_cp_webhook_refused_total{reason=\"own_listener\"}",
    );
    assert!(
        after >= before + 2.0,
        "both attempts counted: {before} -> {after}"
    );
    cp.flush_logs();
    let logs = cp.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("webhook address refused") && l.contains("own listener")),
        "{logs}"
    );

    // A wake to the own gRPC port by name: the run fails with the refusal,
    // nothing is POSTed.
    add_agent(
        &cp,
        "self-wake",
        "m-alert",
        &[
            "--interval",
            "1h",
            "--active-hours",
            &hours,
            "--target",
            "wake",
            "--wake-url",
            &format!("http://localhost:{grpc}/hooks/wake"),
        ],
        "- [ ] check the disk\n",
    );
    let run = cp
        .clawctl(&["heartbeat", "run", "self-wake", "--wait", "-o", "json"])
        .assert_ok()
        .json();
    let id = run["run_id"].as_str().expect("run id").to_string();
    wait_for("the failed wake", &cp, WAIT, || {
        run_by_id(&cp, "self-wake", &id).is_some_and(|r| r["status"] == "failed")
    });
    let run = run_by_id(&cp, "self-wake", &id).expect("the run");
    let error = run["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("wake address ")
            && error.ends_with(&format!(
                ":{grpc} refused: the control plane's own listener"
            )),
        "{run}"
    );
}

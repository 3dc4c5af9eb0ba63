//! The owner always hears back (issue 16), with real processes: the real
//! control plane and proxy, in-process mock upstreams and the fake webhook
//! receiver ([`claw_tests::webhook`]).
//!
//! - an upstream that fails (500 for the agent's model) → exactly one
//!   `failed` event for a streak of ≥ 3 failed runs, then the mock recovers
//!   → exactly one `recovered` event; the failed runs stay `failed`;
//! - an alert for an agent without a webhook → `undeliverable` in
//!   `heartbeat logs` and `claw_heartbeat_undeliverable_total`;
//! - a webhook down past the attempt limit → `dead_letter`; `clawctl
//!   heartbeat redeliver RUN_ID` with the webhook up → delivered exactly once
//!   more, same body, same Idempotency-Key, valid signature; redelivering a
//!   run that is not a dead letter (or an unknown one) is an error.

use std::collections::BTreeSet;
use std::time::Duration;

use claw_tests::harness::heartbeat::{
    add_agent, cp_metrics, far_active_hours, heartbeat_fleet, manual_run, metric_value,
    run_status as status, runs, wait_for, webhook_signature,
};
use claw_tests::harness::{ControlPlane, Forwarder, Proxy};
use claw_tests::mock::{Action, MockConfig, MockUpstream};
use claw_tests::webhook::{WebhookCall, WebhookReceiver};

const SECRET: &str = "whsec-delivery-0123456789";
const KEY: &str = "sk-test-key-0123456789";

fn signed(call: &WebhookCall) -> bool {
    call.signature == webhook_signature(SECRET, &call.body)
}

/// A control plane (signing with [`SECRET`], fast webhook retries plus
/// `env`), a mock upstream serving `model`, and a proxy the heartbeats go
/// through.
async fn fleet(
    model: &str,
    env: &[(&str, &str)],
) -> (ControlPlane, Proxy, MockUpstream, Forwarder) {
    let upstream = MockUpstream::start(MockConfig::default().name("up").api_key(KEY)).await;
    let mut builder = ControlPlane::builder()
        .webhook_secret(SECRET)
        .webhook_backoff("100ms", Some("500ms"));
    for (k, v) in env {
        builder = builder.env(k, v);
    }
    let (cp, proxy, fwd) = heartbeat_fleet(builder, "up", &upstream.url(), KEY, model).await;
    (cp, proxy, upstream, fwd)
}

/// Adds an agent whose slots never come due during the test (a one-minute
/// active window twelve hours away): only manual runs fire.
fn add_manual_agent(cp: &ControlPlane, id: &str, model: &str, webhook: Option<&str>) {
    let hours = far_active_hours();
    let mut extra = vec!["--interval", "1h", "--active-hours", &hours];
    if let Some(url) = webhook {
        extra.extend(["--webhook", url]);
    }
    add_agent(cp, id, model, &extra, "- [ ] check the disk\n");
}

/// How long a manual run may keep failing while the proxy does not have
/// the new configuration yet.
const MANUAL_RUN: Duration = Duration::from_secs(30);

fn keys_of(calls: &[WebhookCall], kind: &str) -> BTreeSet<String> {
    calls
        .iter()
        .filter(|c| c.kind() == kind)
        .map(|c| c.key.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upstream_sends_one_failed_event_per_streak_and_one_recovered() {
    let (cp, _proxy, upstream, _fwd) = fleet("m-fail", &[]).await;
    upstream.set_always(Some(Action::status(500).for_model("m-fail")));
    let hook = WebhookReceiver::start().await;
    add_agent(
        &cp,
        "agent-f",
        "m-fail",
        &["--interval", "2s", "--webhook", &hook.url()],
        "- [ ] check the disk\n",
    );

    let failed_runs = |cp: &ControlPlane| {
        runs(cp, "agent-f")
            .into_iter()
            .filter(|r| status(r) == "failed")
            .count()
    };
    wait_for(
        "three failed runs and the failed event",
        &cp,
        Duration::from_secs(60),
        || failed_runs(&cp) >= 3 && !keys_of(&hook.accepted(), "failed").is_empty(),
    );
    upstream.set_always(Some(Action::reply("HEARTBEAT_OK")));
    wait_for("the recovered event", &cp, Duration::from_secs(60), || {
        !keys_of(&hook.accepted(), "recovered").is_empty()
    });
    // Two more good slots: no further event.
    let good = |cp: &ControlPlane| {
        runs(cp, "agent-f")
            .into_iter()
            .filter(|r| status(r) == "suppressed")
            .count()
    };
    let seen = good(&cp);
    wait_for(
        "two more suppressed runs",
        &cp,
        Duration::from_secs(30),
        || good(&cp) >= seen + 2,
    );

    let calls = hook.calls();
    assert!(calls.iter().all(signed), "every call is signed: {calls:#?}");
    let failed = keys_of(&calls, "failed");
    let recovered = keys_of(&calls, "recovered");
    assert_eq!(failed.len(), 1, "one failed event per streak: {calls:#?}");
    assert_eq!(recovered.len(), 1, "one recovered event: {calls:#?}");
    assert!(keys_of(&calls, "alert").is_empty());

    let all = runs(&cp, "agent-f");
    let by_id = |id: &str| {
        all.iter()
            .find(|r| r["run_id"] == id)
            .unwrap_or_else(|| panic!("run {id} in the log: {all:#?}"))
            .clone()
    };
    let f = calls
        .iter()
        .find(|c| c.kind() == "failed")
        .expect("failed call")
        .json();
    let failed_run = by_id(f["run_id"].as_str().unwrap_or_default());
    assert_eq!(
        status(&failed_run),
        "failed",
        "the run stays failed: {failed_run}"
    );
    assert_eq!(f["agent_id"], "agent-f");
    assert_eq!(f["slot"], failed_run["nominal_time"]);
    assert_eq!(f["error"], failed_run["error"]);
    assert!(!f["error"].as_str().unwrap_or_default().is_empty(), "{f}");
    assert_eq!(f["consecutive_failures"], 1);
    let r = calls
        .iter()
        .find(|c| c.kind() == "recovered")
        .expect("recovered call")
        .json();
    let recovered_run = by_id(r["run_id"].as_str().unwrap_or_default());
    assert_eq!(status(&recovered_run), "suppressed");
    assert_eq!(r["since"], f["slot"]);
    assert!(r["failed_runs"].as_u64() >= Some(3), "{r}");
    // The key is the run id: one event per run.
    assert!(failed.contains(f["run_id"].as_str().unwrap_or_default()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_for_an_agent_without_a_webhook_is_undeliverable() {
    let (cp, _proxy, upstream, _fwd) = fleet("m-alert", &[]).await;
    upstream.set_always(Some(Action::reply("ALERT: the disk is 97% full")));
    add_manual_agent(&cp, "agent-n", "m-alert", None);
    let run = manual_run(&cp, "agent-n", MANUAL_RUN);
    let id = run["run_id"].as_str().expect("run id").to_string();
    assert_eq!(status(&run), "undeliverable", "{run}");
    let logged = runs(&cp, "agent-n");
    let rec = logged
        .iter()
        .find(|r| r["run_id"] == id.as_str())
        .expect("run in the log");
    assert_eq!(status(rec), "undeliverable");
    let table = cp
        .clawctl(&["heartbeat", "logs", "agent-n"])
        .assert_ok()
        .stdout;
    assert!(table.contains("undeliverable"), "{table}");
    let metrics = cp_metrics(&cp);
    let count = metric_value(&metrics, "claw_heartbeat_undeliverable_total");
    assert!(count >= 1.0, "{metrics}");
    wait_for(
        "the warning with the run id",
        &cp,
        Duration::from_secs(10),
        || {
            cp.logs()
                .lines()
                .any(|l| l.contains("undeliverable") && l.contains(&id))
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_redelivered_once_with_the_same_key_and_signature() {
    let (cp, _proxy, upstream, _fwd) =
        fleet("m-alert", &[("CLAW_WEBHOOK_MAX_ATTEMPTS", "2")]).await;
    upstream.set_always(Some(Action::reply("ALERT: the queue is stuck")));
    let hook = WebhookReceiver::start().await;
    hook.set_up(false);
    add_manual_agent(&cp, "agent-d", "m-alert", Some(&hook.url()));
    let run = manual_run(&cp, "agent-d", MANUAL_RUN);
    let id = run["run_id"].as_str().expect("run id").to_string();
    let run_status = |cp: &ControlPlane| {
        runs(cp, "agent-d")
            .into_iter()
            .find(|r| r["run_id"] == id.as_str())
            .map(|r| status(&r).to_string())
            .unwrap_or_default()
    };
    wait_for("the dead letter", &cp, Duration::from_secs(30), || {
        run_status(&cp) == "dead_letter"
    });
    let before: Vec<WebhookCall> = hook.calls().into_iter().filter(|c| c.key == id).collect();
    assert_eq!(before.len(), 2, "the attempt limit: {before:#?}");

    // Bad requests: a clear error, nothing requeued.
    cp.clawctl(&["heartbeat", "redeliver", "hbr_doesnotexist"])
        .assert_err_contains("not found");
    let bad = cp.clawctl(&["heartbeat", "redeliver", &id, "--dead-letters"]);
    assert_eq!(bad.status.code(), Some(2), "{bad}");
    let bad = cp.clawctl(&["heartbeat", "redeliver", &id, "--agent", "agent-d"]);
    assert_eq!(bad.status.code(), Some(2), "{bad}");

    hook.set_up(true);
    let out = cp
        .clawctl(&["heartbeat", "redeliver", &id])
        .assert_ok()
        .stdout;
    assert!(out.contains(&id), "{out}");
    wait_for("the redelivery", &cp, Duration::from_secs(30), || {
        run_status(&cp) == "delivered"
    });
    let after: Vec<WebhookCall> = hook
        .calls()
        .into_iter()
        .filter(|c| c.key == id)
        .skip(before.len())
        .collect();
    assert_eq!(after.len(), 1, "delivered exactly once: {after:#?}");
    assert!(after[0].accepted());
    assert!(signed(&after[0]), "a valid signature");
    assert_eq!(after[0].body, before[0].body, "the same body bytes");
    assert_eq!(after[0].attempt, "1", "a fresh attempt count");
    assert_eq!(after[0].kind(), "alert");

    // Not a dead letter any more.
    cp.clawctl(&["heartbeat", "redeliver", &id])
        .assert_err_contains("is delivered, not dead-lettered");
    let none = cp
        .clawctl(&[
            "heartbeat",
            "redeliver",
            "--dead-letters",
            "--agent",
            "agent-d",
            "-o",
            "json",
        ])
        .assert_ok()
        .json();
    assert!(
        none.as_array()
            .is_some_and(|ids| !ids.iter().any(|v| v == id.as_str())),
        "{none}"
    );
    let audit = cp.clawctl(&["audit", "-o", "json"]).assert_ok().stdout;
    assert!(audit.contains("RedeliverRuns"), "{audit}");
}

//! Wake mode and the fallback model, end to end with real processes.
//!
//! - a wake-mode agent against a fake agent runtime (an in-test HTTP
//!   server): one signed wake per slot (HMAC checked), also across a
//!   control-plane `kill -9` right after a wake; callbacks end the runs
//!   (`suppressed`, `ok`, an alert `delivered` to the webhook); a wrong token
//!   is 401, a repeated callback 200 with the same body and 409 with another;
//!   a runtime that never reports back leaves the run `failed` at its
//!   deadline;
//! - an LLM agent whose primary model's only backend is cooling (the mock
//!   answers 429 with a long Retry-After) runs on its fallback model.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use claw_tests::harness::heartbeat::{
    TEST_UPSTREAM_KEY, add_agent, add_backend_with_key, run_status as status, runs, serve_hooks,
    start_heartbeat_proxy, wait_runs, webhook_signature,
};
use claw_tests::harness::{ControlPlane, Forwarder};
use claw_tests::mock::{Action, MockConfig, MockUpstream};
use parking_lot::Mutex;
use serde_json::Value;

const SECRET: &str = "whsec-wake-0123456789";

/// One request an in-test HTTP server received.
#[derive(Debug, Clone)]
struct Seen {
    body: Value,
    idempotency_key: String,
    signature_ok: bool,
}

/// An HTTP server that records every POST (signature checked against
/// [`SECRET`]) and answers `status`.
async fn recorder(status: u16) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let st = seen.clone();
    let (addr, _) = serve_hooks(move |req| {
        st.lock().push(Seen {
            body: req.json(),
            signature_ok: req.signature == webhook_signature(SECRET, &req.body),
            idempotency_key: req.idempotency_key,
        });
        status
    })
    .await;
    (addr, seen)
}

/// Polls until `pred` holds for `agent`'s run `run_id`.
async fn wait_run(
    cp: &ControlPlane,
    agent: &str,
    run_id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_runs(
        cp,
        agent,
        &format!("{what} ({run_id})"),
        Duration::from_secs(40),
        Duration::from_millis(200),
        |all| {
            let r = all
                .into_iter()
                .find(|r| r["run_id"] == run_id)
                .unwrap_or_default();
            pred(&r).then_some(r)
        },
    )
    .await
}

/// Polls until the runtime has seen more than `n` wakes of `agent`; returns
/// the newest.
async fn next_wake(cp: &ControlPlane, seen: &Mutex<Vec<Seen>>, agent: &str, n: usize) -> Seen {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let wakes: Vec<Seen> = seen
            .lock()
            .iter()
            .filter(|s| s.body["agent_id"] == agent)
            .cloned()
            .collect();
        if wakes.len() > n {
            return wakes[wakes.len() - 1].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no wake #{} for {agent}\n{}",
            n + 1,
            cp.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn callback(wake: &Seen, token: &str, body: Value) -> (u16, Value) {
    let url = wake.body["callback_url"].as_str().expect("callback_url");
    let res = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("callback");
    let code = res.status().as_u16();
    (code, res.json().await.unwrap_or_default())
}

fn token(wake: &Seen) -> String {
    wake.body["callback_token"]
        .as_str()
        .expect("token")
        .to_string()
}

fn wakes_of(seen: &Mutex<Vec<Seen>>, agent: &str) -> usize {
    seen.lock()
        .iter()
        .filter(|s| s.body["agent_id"] == agent)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_agents_get_one_signed_wake_per_slot_across_kill_9_and_callbacks_end_their_runs() {
    let (runtime, seen) = recorder(202).await;
    let (hook, delivered) = recorder(204).await;
    let mut cp = ControlPlane::builder().webhook_secret(SECRET).start();
    add_agent(
        &cp,
        "w1",
        "m-any",
        &[
            "--interval",
            "3s",
            "--run-timeout",
            "60s",
            "--target",
            "wake",
            "--wake-url",
            &format!("http://{runtime}/hooks/wake"),
            "--webhook",
            &format!("http://{hook}/hook"),
        ],
        "- [ ] check the WorkBoard cards assigned to me\n",
    );
    // A runtime that never reports back, with a short deadline.
    add_agent(
        &cp,
        "w2",
        "m-any",
        &[
            "--interval",
            "1h",
            "--no-stagger",
            "--run-timeout",
            "2s",
            "--target",
            "wake",
            "--wake-url",
            &format!("http://{runtime}/hooks/wake"),
        ],
        "- [ ] check TODO.md\n",
    );
    cp.clawctl(&["heartbeat", "run", "w2"]).assert_ok();
    let get = cp
        .clawctl(&["agent", "get", "w1", "-o", "yaml"])
        .assert_ok();
    assert!(
        get.stdout.contains("target: wake"),
        "export shape: {}",
        get.stdout
    );

    // Slot 1: the wake request is signed and complete.
    let w = next_wake(&cp, &seen, "w1", 0).await;
    assert!(w.signature_ok, "{w:?}");
    let run_id = w.body["run_id"].as_str().expect("run_id").to_string();
    assert_eq!(w.idempotency_key, run_id);
    assert_eq!(w.body["session_key"], "agent:w1:heartbeat");
    assert!(
        w.body["checklist"]
            .as_str()
            .unwrap_or_default()
            .contains("WorkBoard")
    );
    assert!(w.body["slot"].as_str().is_some_and(|s| s.ends_with('Z')));
    let r = wait_run(&cp, "w1", &run_id, "dispatched", |r| {
        status(r) == "dispatched"
    })
    .await;
    assert_eq!(r["target"], "wake");

    // A wrong token is refused; the right one ends the run; a repeat of the
    // same body is 200, another body 409.
    let (code, err) = callback(&w, "hbt_wrong", serde_json::json!({"status": "ok"})).await;
    assert_eq!(code, 401, "{err}");
    assert!(err["error"]["message"].is_string(), "{err}");
    let ok_body = serde_json::json!({"reply": "HEARTBEAT_OK"});
    let (code, body) = callback(&w, &token(&w), ok_body.clone()).await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("suppressed")),
        "{body}"
    );
    let (code, _) = callback(&w, &token(&w), ok_body).await;
    assert_eq!(code, 200, "same body again");
    let (code, _) = callback(&w, &token(&w), serde_json::json!({"status": "ok"})).await;
    assert_eq!(code, 409, "another body");
    wait_run(&cp, "w1", &run_id, "suppressed", |r| {
        status(r) == "suppressed"
    })
    .await;

    // Slot 2: an alert goes to the webhook.
    let n = wakes_of(&seen, "w1");
    let w = next_wake(&cp, &seen, "w1", n).await;
    let alert_id = w.body["run_id"].as_str().expect("run_id").to_string();
    wait_run(&cp, "w1", &alert_id, "dispatched", |r| {
        status(r) == "dispatched"
    })
    .await;
    let (code, body) = callback(
        &w,
        &token(&w),
        serde_json::json!({"status": "alert", "reply": "card 12 is overdue"}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    wait_run(&cp, "w1", &alert_id, "delivered", |r| {
        status(r) == "delivered"
    })
    .await;
    {
        let d = delivered.lock();
        let hit = d
            .iter()
            .find(|s| s.idempotency_key == alert_id)
            .expect("the alert reached the webhook");
        assert!(hit.signature_ok);
        assert_eq!(hit.body["reply"], "card 12 is overdue");
    }

    // Slot 3: "ok".
    let n = wakes_of(&seen, "w1");
    let w = next_wake(&cp, &seen, "w1", n).await;
    let ok_id = w.body["run_id"].as_str().expect("run_id").to_string();
    wait_run(&cp, "w1", &ok_id, "dispatched", |r| {
        status(r) == "dispatched"
    })
    .await;
    let (code, _) = callback(&w, &token(&w), serde_json::json!({"status": "ok"})).await;
    assert_eq!(code, 200);
    wait_run(&cp, "w1", &ok_id, "ok", |r| status(r) == "ok").await;

    // The runtime that never reports back: failed at the deadline.
    let w2 = next_wake(&cp, &seen, "w2", 0).await;
    let w2_id = w2.body["run_id"].as_str().expect("run_id").to_string();
    let r = wait_run(&cp, "w2", &w2_id, "failed at deadline", |r| {
        status(r) == "failed"
    })
    .await;
    assert_eq!(r["error"], "the runtime never reported back");
    let (code, _) = callback(&w2, &token(&w2), serde_json::json!({"status": "ok"})).await;
    assert_eq!(code, 403, "expired token");

    // kill -9 right after a wake, then restart: no wake is sent twice.
    let n = wakes_of(&seen, "w1");
    let w = next_wake(&cp, &seen, "w1", n).await;
    cp.kill9();
    cp.restart();
    let crash_id = w.body["run_id"].as_str().expect("run_id").to_string();
    let r = wait_run(&cp, "w1", &crash_id, "terminal or dispatched", |r| {
        matches!(status(r), "dispatched" | "failed")
    })
    .await;
    if status(&r) == "dispatched" {
        // Still waiting for its runtime across the restart.
        let (code, body) = callback(&w, &token(&w), serde_json::json!({"status": "ok"})).await;
        assert_eq!(code, 200, "{body}");
        wait_run(&cp, "w1", &crash_id, "ok after restart", |r| {
            status(r) == "ok"
        })
        .await;
    } else {
        assert_eq!(r["error"], "control plane restarted during the run");
    }
    // A few more slots after the restart.
    let n = wakes_of(&seen, "w1");
    next_wake(&cp, &seen, "w1", n + 1).await;

    let wakes = seen.lock().clone();
    let mut per_run: HashMap<String, u32> = HashMap::new();
    let mut per_slot: BTreeMap<String, u32> = BTreeMap::new();
    for s in wakes.iter().filter(|s| s.body["agent_id"] == "w1") {
        assert!(s.signature_ok);
        *per_run.entry(s.idempotency_key.clone()).or_default() += 1;
        *per_slot
            .entry(s.body["slot"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    assert!(
        per_run.values().all(|n| *n == 1),
        "a wake was re-sent: {per_run:?}"
    );
    assert!(
        per_slot.values().all(|n| *n == 1),
        "a slot woke twice: {per_slot:?}"
    );
    let mut records: HashMap<String, u32> = HashMap::new();
    for r in runs(&cp, "w1") {
        *records
            .entry(r["nominal_time"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    assert!(records.values().all(|n| *n == 1), "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_uses_the_fallback_model_while_the_primary_backend_is_cooling() {
    let key = TEST_UPSTREAM_KEY;
    let primary = MockUpstream::start(MockConfig::default().name("primary").api_key(key)).await;
    primary.set_always(Some(Action::rate_limited(Some(3600))));
    let fallback = MockUpstream::start(MockConfig::default().name("fallback").api_key(key)).await;
    fallback.set_always(Some(Action::reply("HEARTBEAT_OK")));
    let fwd = Forwarder::start().await;
    let cp = ControlPlane::builder().heartbeats_through(&fwd).start();
    for (name, url, model) in [
        ("p", primary.url(), "m-primary"),
        ("f", fallback.url(), "m-fallback"),
    ] {
        add_backend_with_key(&cp, name, &url, key, model, &[]);
    }
    let _proxy = start_heartbeat_proxy(&cp, &fwd);
    add_agent(
        &cp,
        "f1",
        "m-primary",
        &["--fallback-model", "m-fallback", "--interval", "2s"],
        "- [ ] check the inbox\n",
    );
    cp.clawctl(&["agent", "update", "f1", "--fallback-model", "m-primary"])
        .assert_err_contains("fallback_model");

    // The first runs hit the 429; once the cooldown reaches the control
    // plane, runs go to the fallback.
    let run = wait_runs(
        &cp,
        "f1",
        "a suppressed run on the fallback",
        Duration::from_secs(40),
        Duration::from_millis(300),
        |all| {
            all.into_iter()
                .find(|r| r["used_fallback"] == true && status(r) == "suppressed")
        },
    )
    .await;
    assert_eq!(run["model"], "m-fallback", "{run}");
    assert!(
        fallback
            .requests()
            .iter()
            .any(|r| r.header("x-claw-session-key") == Some("agent:f1:heartbeat")),
        "the fallback backend served the heartbeat"
    );
}

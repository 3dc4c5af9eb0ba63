//! Heartbeats end to end with real processes: the real control plane (the
//! scheduler), a real proxy, in-process mock upstreams and an in-test
//! webhook receiver. Intervals of a few seconds.
//!
//! - agent A's model always answers `HEARTBEAT_OK` → suppressed runs, no
//!   webhook call;
//! - agent B's model always alerts → each run delivered exactly once per
//!   run id through a webhook that fails its first two calls (the receiver
//!   sees the retries with the same Idempotency-Key and a valid signature);
//! - agent C is outside its active hours → no run;
//! - `kill -9` of the control plane mid-run and a restart → no slot has two
//!   runs, every slot that came due has a terminal record.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use claw_tests::harness::heartbeat::{
    TEST_UPSTREAM_KEY, add_agent, add_backend_with_key, far_active_hours, heartbeat_requests,
    proxy_with_conversation, run_status as status, runs, serve_hooks, start_heartbeat_proxy,
    wait_runs, wait_runs_of, webhook_signature,
};
use claw_tests::harness::{ControlPlane, Forwarder};
use claw_tests::mock::{Action, MockConfig, MockUpstream};
use parking_lot::Mutex;
use serde_json::Value;

const SECRET: &str = "whsec-integration-0123456789";

/// What the webhook receiver saw: calls per idempotency key, and whether
/// each carried a valid signature.
#[derive(Default)]
struct Received {
    calls: u32,
    by_key: BTreeMap<String, u32>,
    delivered: BTreeMap<String, Value>,
    bad_signatures: u32,
}

/// A webhook that answers 500 to its first two calls, then 204.
async fn webhook() -> (SocketAddr, Arc<Mutex<Received>>) {
    let state = Arc::new(Mutex::new(Received::default()));
    let st = state.clone();
    let (addr, _) = serve_hooks(move |req| {
        let key = req.idempotency_key.clone();
        let mut s = st.lock();
        s.calls += 1;
        if req.signature != webhook_signature(SECRET, &req.body) {
            s.bad_signatures += 1;
        }
        *s.by_key.entry(key.clone()).or_default() += 1;
        let status = if s.calls <= 2 { 500 } else { 204 };
        if status == 204 && !s.delivered.contains_key(&key) {
            s.delivered.insert(key, req.json());
        }
        status
    })
    .await;
    (addr, state)
}

fn add_backend(cp: &ControlPlane, name: &str, url: &str, model: &str) {
    add_backend_with_key(cp, name, url, TEST_UPSTREAM_KEY, model, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_suppress_deliver_respect_hours_and_survive_kill_9() {
    let ok = MockUpstream::start(MockConfig::default().name("ok").api_key(TEST_UPSTREAM_KEY)).await;
    ok.set_always(Some(Action::reply("HEARTBEAT_OK")));
    let alert = MockUpstream::start(
        MockConfig::default()
            .name("alert")
            .api_key(TEST_UPSTREAM_KEY),
    )
    .await;
    alert.set_always(Some(Action::reply("ALERT: the disk is 97% full")));
    let (hook, received) = webhook().await;
    let fwd = Forwarder::start().await;

    let mut cp = ControlPlane::builder()
        .heartbeats_through(&fwd)
        .webhook_secret(SECRET)
        .webhook_backoff("200ms", None)
        .start();
    add_backend(&cp, "ok", &ok.url(), "m-ok");
    add_backend(&cp, "alert", &alert.url(), "m-alert");
    for (id, model, extra) in [
        ("agent-a", "m-ok", vec!["--interval", "2s"]),
        (
            "agent-b",
            "m-alert",
            vec![
                "--interval",
                "3s",
                "--webhook",
                &format!("http://{hook}/hook"),
            ],
        ),
        ("agent-c", "m-ok", vec!["--interval", "1s"]),
    ] {
        add_agent(&cp, id, model, &extra, "- [ ] check the disk\n");
    }
    // C's window: a one-minute window twelve hours away from now (UTC).
    cp.clawctl(&[
        "agent",
        "update",
        "agent-c",
        "--active-hours",
        &far_active_hours(),
    ])
    .assert_ok();

    let _proxy = start_heartbeat_proxy(&cp, &fwd);

    // Let a few slots pass (the first may race the internal key reaching
    // the proxy's snapshot; it then fails visibly, which is fine).
    wait_runs_of(
        &cp,
        &["agent-a", "agent-b"],
        "3 suppressed runs of A and 2 delivered of B",
        Duration::from_secs(40),
        Duration::from_millis(500),
        |r| {
            let suppressed = r[0].iter().filter(|r| status(r) == "suppressed").count();
            let delivered = r[1].iter().filter(|r| status(r) == "delivered").count();
            (suppressed >= 3 && delivered >= 2).then_some(())
        },
    )
    .await;
    assert!(
        runs(&cp, "agent-c").is_empty(),
        "C is outside its active hours"
    );

    // A never reached the webhook; every delivered B run reached it exactly
    // once as a success, with retries under the same key.
    let b = runs(&cp, "agent-b");
    {
        let r = received.lock();
        assert_eq!(r.bad_signatures, 0);
        for run in b.iter().filter(|r| status(r) == "delivered") {
            let id = run["run_id"].as_str().expect("run id");
            let d = r
                .delivered
                .get(id)
                .expect("delivered run reached the receiver");
            assert_eq!(d["agent_id"], "agent-b");
            assert_eq!(d["reply"], "ALERT: the disk is 97% full");
        }
        assert!(
            r.by_key.values().any(|n| *n >= 3),
            "the first run was retried: {:?}",
            r.by_key
        );
        assert!(r.delivered.values().all(|v| v["agent_id"] == "agent-b"));
    }
    let a = runs(&cp, "agent-a");
    let first = a
        .iter()
        .find(|r| status(r) == "suppressed")
        .expect("a suppressed run");
    assert_eq!(first["trigger"], "schedule");
    assert!(first["tokens"].as_u64() > Some(0), "{first}");

    // kill -9 mid-run: hold A's replies so a run is in flight, then kill.
    ok.set_always(Some(
        Action::reply("HEARTBEAT_OK").with_delay(Duration::from_secs(30)),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !runs(&cp, "agent-a").iter().any(|r| status(r) == "running") {
        assert!(Instant::now() < deadline, "no run in flight");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cp.kill9();
    ok.set_always(Some(Action::reply("HEARTBEAT_OK")));
    tokio::time::sleep(Duration::from_secs(3)).await;
    cp.restart();
    tokio::time::sleep(Duration::from_secs(6)).await;

    for agent in ["agent-a", "agent-b"] {
        let all = runs(&cp, agent);
        let mut per_slot: HashMap<String, u32> = HashMap::new();
        for r in &all {
            *per_slot
                .entry(r["nominal_time"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
        assert!(
            per_slot.values().all(|n| *n == 1),
            "{agent}: a slot ran twice: {all:#?}"
        );
        // Every slot older than a few seconds is terminal.
        let now = jiff::Timestamp::now();
        for r in &all {
            let nominal: jiff::Timestamp = r["nominal_time"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .expect("time");
            if now.duration_since(nominal).as_secs() > 5 {
                assert!(
                    !matches!(status(r), "running" | "deferred"),
                    "{agent}: not terminal: {r}"
                );
            }
        }
    }
    let interrupted = runs(&cp, "agent-a")
        .into_iter()
        .filter(|r| r["error"] == "control plane restarted during the run")
        .count();
    assert_eq!(interrupted, 1, "the run killed mid-flight is failed, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_agent_is_skipped_busy_without_an_llm_call() {
    let upstream =
        MockUpstream::start(MockConfig::default().name("d").api_key(TEST_UPSTREAM_KEY)).await;
    upstream.set_always(Some(Action::reply("HEARTBEAT_OK")));
    let fwd = Forwarder::start().await;
    let cp = ControlPlane::builder().heartbeats_through(&fwd).start();
    add_backend(&cp, "d", &upstream.url(), "m-d");
    // The agent is in a live conversation before its first slot and stays
    // in it for longer than the busy window + deferral cap of several slots.
    let (_proxy, conversation) =
        proxy_with_conversation(&cp, &fwd, "agent-d", "m-d", Duration::from_millis(250)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    add_agent(
        &cp,
        "agent-d",
        "m-d",
        &[
            "--interval",
            "2s",
            "--busy-window",
            "5s",
            "--busy-defer-max",
            "3s",
        ],
        "- [ ] check the queue\n",
    );

    wait_runs(
        &cp,
        "agent-d",
        "two busy skips",
        Duration::from_secs(25),
        Duration::from_millis(300),
        |d| {
            let busy = d
                .iter()
                .filter(|r| status(r) == "skipped" && r["skip_reason"] == "busy")
                .count();
            (busy >= 2).then_some(())
        },
    )
    .await;
    conversation.stop().await;

    let d = runs(&cp, "agent-d");
    assert!(
        d.iter()
            .all(|r| matches!(status(r), "skipped" | "deferred")),
        "no heartbeat ran while the agent was busy: {d:#?}"
    );
    let heartbeat_calls = heartbeat_requests(&upstream, "agent-d").len();
    assert_eq!(heartbeat_calls, 0, "no LLM call for a busy agent");
    // Every busy skip has its own slot: one record per slot.
    let mut slots: Vec<&str> = d
        .iter()
        .filter_map(|r| r["nominal_time"].as_str())
        .collect();
    let n = slots.len();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), n, "one record per slot: {d:#?}");
}

/// A heartbeat is sent in the protocol that serves the agent's model: Messages
/// (`/v1/messages`, `x-api-key`, `anthropic-version`) when its backends are
/// `anthropic`, Chat Completions otherwise; the run's tokens are the mock's
/// input (cache included) plus output. On an `anthropic` model a
/// `HEARTBEAT_OK` reply is suppressed and any other is delivered to the
/// webhook, as on chat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_speaks_messages_to_a_model_served_by_anthropic_backends() {
    const KEY: &str = "sk-ant-test-key-0123456789";
    let claude = MockUpstream::start(MockConfig::default().name("claude").api_key(KEY)).await;
    claude.set_always(Some(Action::reply("HEARTBEAT_OK")));
    let gpt = MockUpstream::start(MockConfig::default().name("gpt").api_key(KEY)).await;
    gpt.set_always(Some(Action::reply("HEARTBEAT_OK")));
    let alert = MockUpstream::start(MockConfig::default().name("claude-alert").api_key(KEY)).await;
    alert.set_always(Some(Action::reply("ALERT: the build is red")));
    let (hook, received) = webhook().await;
    let fwd = Forwarder::start().await;
    let cp = ControlPlane::builder()
        .heartbeats_through(&fwd)
        .webhook_secret(SECRET)
        .webhook_backoff("200ms", None)
        .start();
    for (name, api, url, model) in [
        (
            "claude",
            "anthropic",
            claude.url(),
            "m-claude=claude-native",
        ),
        ("gpt", "openai", gpt.url(), "m-gpt"),
        (
            "claude-alert",
            "anthropic",
            alert.url(),
            "m-alert=claude-native",
        ),
    ] {
        add_backend_with_key(&cp, name, &url, KEY, model, &["--api", api]);
    }
    let listed = cp
        .clawctl(&["backend", "list", "-o", "json"])
        .assert_ok()
        .json();
    let apis: Vec<_> = listed
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or_default().to_string(),
                b["api"].clone(),
            )
        })
        .collect();
    assert_eq!(
        apis,
        vec![
            ("claude".to_string(), Value::from("anthropic")),
            ("claude-alert".to_string(), Value::from("anthropic")),
            ("gpt".to_string(), Value::from("openai")),
        ]
    );
    for (id, model) in [("agent-m", "m-claude"), ("agent-o", "m-gpt")] {
        add_agent(
            &cp,
            id,
            model,
            &["--interval", "2s"],
            "- [ ] check the build\n",
        );
    }
    add_agent(
        &cp,
        "agent-a",
        "m-alert",
        &[
            "--interval",
            "2s",
            "--webhook",
            &format!("http://{hook}/hook"),
        ],
        "- [ ] check the build\n",
    );
    let _proxy = start_heartbeat_proxy(&cp, &fwd);

    let (m, o, a) = wait_runs_of(
        &cp,
        &["agent-m", "agent-o", "agent-a"],
        "suppressed runs of M and O, a delivered one of A",
        Duration::from_secs(30),
        Duration::from_millis(300),
        |r| {
            let done = |rs: &[Value]| rs.iter().any(|r| status(r) == "suppressed");
            let [m, o, a] = <[Vec<Value>; 3]>::try_from(r).ok()?;
            (done(&m) && done(&o) && a.iter().any(|r| status(r) == "delivered"))
                .then_some((m, o, a))
        },
    )
    .await;

    let sent = heartbeat_requests(&claude, "agent-m");
    let first = sent
        .first()
        .expect("agent-m's heartbeat reached the anthropic backend");
    assert_eq!(first.path, "/v1/messages", "{first:#?}");
    assert_eq!(first.header("x-api-key"), Some(KEY));
    assert!(first.header("authorization").is_none(), "{first:#?}");
    assert_eq!(first.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(first.body["model"], "claude-native");
    assert!(first.body["max_tokens"].as_u64().is_some_and(|n| n > 0));
    assert_eq!(first.body["messages"][0]["role"], "user");
    assert_eq!(
        first.body["messages"][0]["content"],
        "- [ ] check the build\n"
    );
    assert!(heartbeat_requests(&gpt, "agent-m").is_empty());
    let sent = heartbeat_requests(&gpt, "agent-o");
    let first = sent
        .first()
        .expect("agent-o's heartbeat reached the openai backend");
    assert_eq!(first.path, "/v1/chat/completions");
    assert!(heartbeat_requests(&claude, "agent-o").is_empty());

    // The run's tokens are what the mock reported, cache included.
    let run = m
        .iter()
        .find(|r| status(r) == "suppressed")
        .expect("a suppressed run");
    let tokens = run["tokens"].as_u64().unwrap_or(0);
    assert!(tokens > 0, "{run:#?}");
    assert!(
        o.iter()
            .any(|r| status(r) == "suppressed" && r["tokens"].as_u64().unwrap_or(0) > 0),
        "{o:#?}"
    );

    // The alerting agent's runs went as Messages and their reply reached the
    // webhook, keyed by run id, with the reply text parsed from the blocks.
    let sent = heartbeat_requests(&alert, "agent-a");
    assert!(
        sent.first().is_some_and(|r| r.path == "/v1/messages"),
        "{sent:#?}"
    );
    let run = a
        .iter()
        .find(|r| status(r) == "delivered")
        .expect("a delivered run");
    let run_id = run["run_id"].as_str().unwrap_or_default().to_string();
    let r = received.lock();
    let payload = r
        .delivered
        .get(&run_id)
        .expect("the delivered run reached the webhook");
    assert_eq!(payload["agent_id"], "agent-a", "{payload:#}");
    assert!(
        payload.to_string().contains("ALERT: the build is red"),
        "{payload:#}"
    );
    assert_eq!(r.bad_signatures, 0);
}

//! Heartbeats at the edges (issue 16), with real processes: the control
//! plane, a proxy, the mock upstream.
//!
//! - an agent in a live conversation, control plane `kill -9` and restart →
//!   no heartbeat reaches the upstream until the conversation stops (the
//!   scheduler holds due slots until the known proxy reported);
//! - `agent add` followed at once by its slot → the run succeeds (it waits
//!   for the proxy to ACK the configuration that holds the agent);
//! - the proxy down at a slot and back 3 s later → the run is deferred and
//!   retried, then succeeds (`retries` ≥ 1);
//! - an agent whose runs stop (restarted with its only proxy gone for good)
//!   → `heartbeat_status` stale, `claw_heartbeat_agent_stale` 1 and
//!   `claw_heartbeat_agent_status` 0.

use std::time::{Duration, Instant};

use claw_tests::harness::heartbeat::{
    add_backend_with_key, heartbeat_fleet, heartbeat_requests, proxy_with_conversation,
    run_status as status, runs, wait_runs,
};
use claw_tests::harness::{ControlPlane, ControlPlaneBuilder, Forwarder, Proxy};
use claw_tests::mock::{Action, MockConfig, MockUpstream};

const KEY: &str = "sk-test-key-0123456789";

/// How often the run log is polled.
const EVERY: Duration = Duration::from_millis(300);

async fn upstream(name: &str) -> MockUpstream {
    let m = MockUpstream::start(MockConfig::default().name(name).api_key(KEY)).await;
    m.set_always(Some(Action::reply("HEARTBEAT_OK")));
    m
}

/// A control plane from `builder` with backend `b1` for `up` serving `m1`,
/// and a proxy the heartbeats go through.
async fn fleet(
    builder: ControlPlaneBuilder,
    up: &MockUpstream,
) -> (ControlPlane, Proxy, Forwarder) {
    heartbeat_fleet(builder, "b1", &up.url(), KEY, "m1").await
}

fn add_agent(cp: &ControlPlane, id: &str, model: &str, extra: &[&str]) {
    let mut args = vec!["--no-stagger"];
    args.extend_from_slice(extra);
    claw_tests::harness::heartbeat::add_agent(cp, id, model, &args, "- [ ] check the queue\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_sends_no_heartbeat_into_a_live_conversation() {
    let up = upstream("u1").await;
    let fwd = Forwarder::start().await;
    let mut cp = ControlPlane::builder().heartbeats_through(&fwd).start();
    add_backend_with_key(&cp, "b1", &up.url(), KEY, "m1", &[]);
    // A conversation: a request every 0.5 s.
    let (_proxy, conversation) =
        proxy_with_conversation(&cp, &fwd, "agent-a", "m1", Duration::from_millis(500)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    add_agent(
        &cp,
        "agent-a",
        "m1",
        &[
            "--interval",
            "3s",
            "--busy-window",
            "3s",
            "--busy-defer-max",
            "60s",
        ],
    );
    // Its slots are deferred (busy) while the conversation goes on.
    wait_runs(
        &cp,
        "agent-a",
        "a deferred (busy) run",
        Duration::from_secs(20),
        EVERY,
        |r| r.iter().any(|r| status(r) == "deferred").then_some(()),
    )
    .await;
    cp.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cp.restart();
    // The catch-up slot is due at once; the conversation goes on for
    // several slots after the restart.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        heartbeat_requests(&up, "agent-a").len(),
        0,
        "a heartbeat reached the upstream during the conversation: {:#?}\n{}",
        runs(&cp, "agent-a"),
        cp.logs()
    );
    conversation.stop().await;
    // Quiet now: the heartbeat runs.
    wait_runs(
        &cp,
        "agent-a",
        "a suppressed run once quiet",
        Duration::from_secs(30),
        EVERY,
        |r| r.iter().any(|r| status(r) == "suppressed").then_some(()),
    )
    .await;
    assert!(!heartbeat_requests(&up, "agent-a").is_empty());
    assert!(
        cp.logs().contains("every known proxy reported"),
        "the restart waited for the proxy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_run_right_after_agent_add_succeeds() {
    let up = upstream("u2").await;
    let (cp, _proxy, _fwd) = fleet(ControlPlane::builder(), &up).await;
    // A 1 s slot fires right after the add, before the proxies could have
    // the new configuration (and the heartbeat client key minted with it).
    add_agent(&cp, "agent-b", "m1", &["--interval", "1s"]);
    let all = wait_runs(
        &cp,
        "agent-b",
        "a suppressed run",
        Duration::from_secs(20),
        EVERY,
        |r| r.iter().any(|r| status(r) == "suppressed").then_some(r),
    )
    .await;
    assert!(
        all.iter().all(|r| status(r) != "failed"),
        "no run failed: {all:#?}"
    );
    assert!(
        !cp.logs().contains("does not exist"),
        "no 'model does not exist': {}",
        cp.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_down_at_the_slot_and_back_3s_later_defers_then_succeeds() {
    let up = upstream("u3").await;
    let (cp, mut proxy, _fwd) = fleet(ControlPlane::builder(), &up).await;
    add_agent(&cp, "agent-c", "m1", &["--interval", "10s"]);
    // The first slot runs; then the proxy goes down before the next one.
    let first = wait_runs(
        &cp,
        "agent-c",
        "the first suppressed run",
        Duration::from_secs(30),
        EVERY,
        |r| {
            r.iter()
                .find(|r| status(r) == "suppressed")
                .map(|r| r["nominal_time"].as_str().unwrap_or_default().to_string())
        },
    )
    .await;
    proxy.stop();
    let deferred = wait_runs(
        &cp,
        "agent-c",
        "a deferred slot after the proxy stopped",
        Duration::from_secs(20),
        EVERY,
        |r| {
            r.into_iter()
                .find(|r| status(r) == "deferred" && r["nominal_time"] != first.as_str())
        },
    )
    .await;
    let slot = deferred["nominal_time"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        deferred["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("proxy unreachable")),
        "{deferred}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restart();
    proxy.wait_ready();
    let done = wait_runs(
        &cp,
        "agent-c",
        "the deferred slot suppressed",
        Duration::from_secs(30),
        EVERY,
        |r| {
            r.into_iter()
                .find(|r| r["nominal_time"] == slot.as_str() && status(r) == "suppressed")
        },
    )
    .await;
    assert!(done["retries"].as_u64() >= Some(1), "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_runs_stop_is_reported_stale() {
    let up = upstream("u4").await;
    let (mut cp, mut proxy, _fwd) = fleet(
        ControlPlane::builder().env("CLAW_HEARTBEAT_STARTUP_GRACE", "10m"),
        &up,
    )
    .await;
    add_agent(
        &cp,
        "agent-d",
        "m1",
        &["--interval", "1s", "--busy-defer-max", "1s"],
    );
    wait_runs(
        &cp,
        "agent-d",
        "a suppressed run",
        Duration::from_secs(20),
        EVERY,
        |r| r.iter().any(|r| status(r) == "suppressed").then_some(()),
    )
    .await;
    let agent = cp
        .clawctl(&["agent", "get", "agent-d", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(agent["heartbeat_status"], "ok", "{agent}");
    assert!(agent["last_terminal_run"].is_string(), "{agent}");
    let listed = cp.clawctl(&["agent", "list"]).assert_ok().stdout;
    assert!(listed.contains("HEARTBEAT"), "{listed}");

    // Its only proxy goes for good and the control plane restarts: it
    // waits (up to the 10 min grace) for that proxy, so no run comes.
    proxy.stop();
    cp.kill9();
    cp.restart();
    let metrics = format!("{}/metrics", cp.http_url());
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let agent = cp
            .clawctl(&["agent", "get", "agent-d", "-o", "json"])
            .assert_ok()
            .json();
        let body = match reqwest::get(&metrics).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if agent["heartbeat_status"] == "stale"
            && body.contains("claw_heartbeat_agent_stale{agent=\"agent-d\"} 1")
        {
            break body;
        }
        assert!(Instant::now() < deadline, "{agent}\n{body}\n{}", cp.logs());
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        body.contains("claw_heartbeat_agent_status{agent=\"agent-d\"} 0"),
        "{body}"
    );
    let listed = cp.clawctl(&["agent", "list"]).assert_ok().stdout;
    assert!(listed.contains("stale"), "{listed}");
}

//! Session affinity through real proxies: two proxies holding the same
//! snapshot send a session to the same one of three mock upstreams
//! (weighted rendezvous hashing in `select`), whichever of them serves it,
//! and count it in `claw_dp_affinity_total`.

use std::collections::{BTreeMap, BTreeSet};

use crate::support::*;
use claw_proto::Pool;
use claw_tests::mock::{MockConfig, MockUpstream};

async fn mock(name: &str) -> MockUpstream {
    MockUpstream::start(
        MockConfig::default()
            .name(name)
            .api_key(format!("sk-up-{name}")),
    )
    .await
}

async fn chat(p: &TestProxy, header: (&str, &str)) {
    let res = reqwest::Client::new()
        .post(p.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header(header.0, header.1)
        .json(&serde_json::json!({"model": "gpt", "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lands_on_one_backend_of_three_through_both_proxies() {
    let ups = [mock("a").await, mock("b").await, mock("c").await];
    let names = ["a", "b", "c"];
    let snap = || {
        snapshot(
            ups.iter()
                .zip(names)
                .map(|(u, n)| {
                    let mut b = backend(n, &u.url(), Pool::Primary, &[("gpt", "m")]);
                    b.rpm = 100_000;
                    b
                })
                .collect(),
        )
    };
    let proxies = [
        TestProxy::start(snap()).await,
        TestProxy::start(snap()).await,
    ];
    let sessions = 24;
    for round in 0..4 {
        for k in 0..sessions {
            let p = &proxies[(k + round) % 2];
            chat(p, ("x-claw-session-key", &format!("session-{k}"))).await;
        }
    }
    // Heartbeat and agent traffic of one agent: one place too.
    chat(&proxies[0], ("x-claw-agent-id", "agent-9")).await;
    chat(
        &proxies[1],
        ("x-claw-session-key", "agent:agent-9:heartbeat"),
    )
    .await;
    chat(&proxies[1], ("x-claw-agent-id", "agent-9")).await;

    let mut homes: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for (u, n) in ups.iter().zip(names) {
        for r in u.requests() {
            // The agent's own requests and its heartbeat: one key.
            let key = match r.header("x-claw-session-key") {
                None | Some("agent:agent-9:heartbeat") => "agent-9".to_string(),
                Some(k) => k.to_string(),
            };
            homes.entry(key).or_default().insert(n);
        }
    }
    assert_eq!(homes.len(), sessions + 1);
    for (key, on) in &homes {
        assert_eq!(on.len(), 1, "{key} was served by {on:?}");
    }
    let used: BTreeSet<&str> = homes.values().flatten().copied().collect();
    assert_eq!(used.len(), 3, "24 sessions over 3 backends: {homes:?}");

    let m = reqwest::Client::new()
        .get(proxies[0].url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("# HELP claw_dp_affinity_total"), "{m}");
    let kept = m
        .lines()
        .find(|l| {
            l.starts_with("claw_dp_affinity_total{")
                && l.contains(r#"outcome="kept""#)
                && l.contains(r#"source="header""#)
        })
        .unwrap_or_else(|| panic!("no kept/header series in {m}"));
    let n: f64 = kept.rsplit(' ').next().unwrap().parse().unwrap();
    // At least this proxy's share (the recorder is the test process's).
    assert!(n >= (sessions * 2) as f64, "{kept}");
    for p in proxies {
        p.shutdown().await.unwrap();
    }
}

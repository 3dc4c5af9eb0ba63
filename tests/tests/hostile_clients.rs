//! Hostile clients against the real binaries (issue 17, items 4 and 6):
//! a flood of large bodies is bounded by `--max-inflight-body-bytes`, a
//! client key's streams by its `max_parallel`, and `x-claw-agent-id` is
//! honoured only for the agents a key is bound to (`clawctl key add
//! --agents`), while the control plane tracks only agents that exist.

use crate::data_plane_support::*;
use claw_tests::harness::heartbeat::{
    TEST_UPSTREAM_KEY, add_agent, add_client_key, start_heartbeat_proxy, wait_runs,
};
use claw_tests::harness::{ControlPlane, Forwarder, Proxy, wait_until};
use claw_tests::mock::{Action, MockConfig, MockUpstream};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(45);

/// A field of a process's `/proc/PID/status`, in KiB.
fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .trim_start_matches(':')
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// The value of an unlabelled (or fully labelled) sample on `/metrics`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn proxy_metrics(p: &Proxy) -> String {
    reqwest::get(format!("{}/metrics", p.url()))
        .await
        .expect("proxy /metrics")
        .text()
        .await
        .expect("metrics body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_large_bodies_is_bounded_by_the_in_flight_body_budget() {
    const BUDGET: usize = 64 * 1024 * 1024;
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        proxy_args: vec![
            "--max-inflight-body-bytes".into(),
            BUDGET.to_string(),
            "--body-timeout".into(),
            "30s".into(),
        ],
        // Bodies are held while the upstream thinks.
        mock: MockConfig::default().latency(Duration::from_millis(1500)),
        ..ClusterOptions::default()
    });
    let pid = c.proxy().pid().expect("proxy pid");
    let content = "x".repeat(15_000_000);
    let body = bytes::Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "model": CHAT,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
        }))
        .expect("json"),
    );
    drop(content);
    let url = format!("{}/v1/chat/completions", c.proxy().url());
    let started = Instant::now();
    let flood: Vec<_> = (0..30)
        .map(|_| {
            let (http, url, key, body) = (c.http.clone(), url.clone(), c.key.clone(), body.clone());
            tokio::spawn(async move {
                match http
                    .post(url)
                    .bearer_auth(key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let retry = r
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let text = r.text().await.unwrap_or_default();
                        (status, retry, text)
                    }
                    Err(e) => (0, None, e.to_string()),
                }
            })
        })
        .collect();
    let mut peak_rss = 0;
    while !flood.iter().all(|t| t.is_finished()) && started.elapsed() < WAIT {
        peak_rss = peak_rss.max(proc_kib(pid, "VmRSS").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut answers = Vec::new();
    for t in flood {
        answers.push(t.await.expect("joined"));
    }
    let hwm = proc_kib(pid, "VmHWM").unwrap_or(peak_rss).max(peak_rss);
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    eprintln!(
        "body flood: {ok} × 200, {} × 503, peak RSS {} MiB",
        refused.len(),
        hwm / 1024
    );
    assert!(
        ok >= 1,
        "some bodies fit the budget: {:?}",
        summary(&answers)
    );
    assert!(
        !refused.is_empty(),
        "30 × 15 MB cannot all fit 64 MiB at once: {:?}",
        summary(&answers)
    );
    for (_, retry, text) in &refused {
        assert_eq!(retry.as_deref(), Some("1"), "503 with Retry-After: {text}");
        let v = assert_openai_error(text);
        assert_eq!(v["error"]["code"], "body_budget_exhausted", "{v}");
    }
    assert_eq!(
        ok + refused.len(),
        answers.len(),
        "every request got 200 or 503: {:?}",
        summary(&answers)
    );
    // 30 × 15 MB held at once was ~900 MB; the budget (64 MiB) plus the
    // proxy's working copies stays far below this generous bound.
    assert!(
        hwm < 400 * 1024,
        "proxy peak RSS {} MiB with a 64 MiB body budget",
        hwm / 1024
    );
    let m = proxy_metrics(c.proxy()).await;
    assert!(
        metric(&m, "claw_dp_body_budget_rejected_total").is_some_and(|n| n >= refused.len() as f64),
        "{m}"
    );
    // The budget was given back: later requests succeed.
    assert_eq!(c.chat(c.proxy(), CHAT).await.status(), 200);
    let one = c
        .http
        .post(&url)
        .bearer_auth(&c.key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("answer");
    assert_eq!(
        one.status(),
        200,
        "a large body fits once the flood is over"
    );
}

fn summary(answers: &[(u16, Option<String>, String)]) -> Vec<(u16, String)> {
    answers
        .iter()
        .map(|(s, _, t)| (*s, t.chars().take(120).collect()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_parallel_caps_a_keys_requests_in_flight_on_a_proxy() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        // 12 chunks, 250 ms apart: each stream lasts ~3 s.
        mock: MockConfig::default().chunk_delay(Duration::from_millis(250)),
        ..ClusterOptions::default()
    });
    let secret = add_client_key(&c.cp, "par", &["--max-parallel", "2"]);
    let shown =
        c.cp.clawctl(&["key", "get", "par", "-o", "json"])
            .assert_ok()
            .json();
    assert_eq!(shown["max_parallel"], 2, "{shown}");
    c.wait_synced();
    let url = format!("{}/v1/chat/completions", c.proxy().url());
    let body = serde_json::json!({
        "model": CHAT,
        "messages": [{"role": "user", "content": "count slowly"}],
        "max_tokens": 12,
        "stream": true,
    });
    let send = || c.http.post(&url).bearer_auth(&secret).json(&body).send();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let r = send().await.expect("stream");
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    let third = send().await.expect("answer");
    assert_eq!(third.status(), 429, "a third request of the key in flight");
    assert_eq!(
        third
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let v = assert_openai_error(&third.text().await.expect("body"));
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("\"par\"")
            && msg.contains("2 requests in flight")
            && msg.contains("max-parallel"),
        "{v}"
    );
    // Another key is not limited by this one.
    assert_eq!(c.chat(c.proxy(), CHAT).await.status(), 200);
    // Once the streams end, the key's requests are admitted again.
    for s in streams {
        let text = s.text().await.expect("the stream ends");
        assert!(text.contains("[DONE]"), "{text}");
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let r = send().await.expect("answer");
        if r.status() == 200 {
            let _ = r.text().await;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the permits were never given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The limit is changed and cleared in place.
    c.cp.clawctl(&["key", "update", "par", "--max-parallel", "0"])
        .assert_ok();
    let m = proxy_metrics(c.proxy()).await;
    assert!(
        metric(&m, "claw_dp_key_parallel_rejected_total").is_some_and(|n| n >= 1.0),
        "{m}"
    );
}

/// Interactive requests attributed to `agent` (`stats total --agent`).
fn interactive_requests(cp: &ControlPlane, agent: &str) -> u64 {
    let v = cp
        .clawctl(&[
            "stats",
            "total",
            "--agent",
            agent,
            "--kind",
            "interactive",
            "-o",
            "json",
        ])
        .assert_ok()
        .json();
    v["requests"]
        .as_u64()
        .or_else(|| v["requests"].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

async fn chat_as(p: &Proxy, secret: &str, agent: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", p.openai_url()))
        .bearer_auth(secret)
        .header("x-claw-agent-id", agent)
        .json(&serde_json::json!({
            "model": "m-g",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4
        }))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_ids_are_honoured_only_for_the_keys_own_agents_and_known_agents() {
    let upstream =
        MockUpstream::start(MockConfig::default().name("g").api_key(TEST_UPSTREAM_KEY)).await;
    upstream.set_always(Some(Action::reply("HEARTBEAT_OK")));
    let fwd = Forwarder::start().await;
    let cp = ControlPlane::builder().heartbeats_through(&fwd).start();
    add_backend(
        &cp,
        "g",
        &upstream.url(),
        TEST_UPSTREAM_KEY,
        &["--rpm", "100000", "--model", "m-g"],
    );
    // Bad agent ids are refused naming the field, with nothing created.
    cp.clawctl(&["key", "add", "bad", "--agents", "Agent_X"])
        .assert_err_contains("agents[0]");
    cp.clawctl(&["key", "get", "bad"]).assert_err();
    let stranger = add_client_key(&cp, "stranger", &[]);
    let owner = add_client_key(&cp, "owner", &["--agents", "agent-g"]);
    let invented: Vec<String> = (0..300).map(|i| format!("invented-{i}")).collect();
    let inventor = add_client_key(&cp, "inventor", &["--agents", &invented.join(",")]);
    let proxy = start_heartbeat_proxy(&cp, &fwd);
    let deadline = Instant::now() + WAIT;
    while chat_as(&proxy, &inventor, "invented-0").await != 200 {
        assert!(
            Instant::now() < deadline,
            "the proxy never accepted the keys"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    add_agent(
        &cp,
        "agent-g",
        "m-g",
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

    // A key without --agents talks "as" agent-g all along: the agent is not
    // busy, its heartbeats run, and the usage is not moved onto it.
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        assert_eq!(chat_as(&proxy, &stranger, "agent-g").await, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_runs(
        &cp,
        "agent-g",
        "two heartbeats",
        WAIT,
        Duration::from_millis(300),
        |r| {
            assert!(
                !r.iter().any(|x| x["skip_reason"] == "busy"),
                "a stranger's header made agent-g busy: {r:#?}"
            );
            let done = r.iter().filter(|x| x["status"] == "suppressed").count();
            (done >= 2).then_some(())
        },
    )
    .await;
    assert_eq!(
        interactive_requests(&cp, "agent-g"),
        0,
        "no usage moved onto agent-g"
    );
    let m = proxy_metrics(&proxy).await;
    assert!(
        metric(&m, "claw_dp_agent_id_rejected_total").is_some_and(|n| n >= 10.0),
        "{m}"
    );

    // The bound key is honoured.
    assert_eq!(chat_as(&proxy, &owner, "agent-g").await, 200);
    assert!(
        wait_until(WAIT, || interactive_requests(&cp, "agent-g") >= 1),
        "the owner's usage is attributed to agent-g"
    );

    // Ids that name no agent (300 bound to a key, 2,000 sent by a stranger)
    // are not tracked by the control plane.
    let before = cp_unknown(&cp, "usage").await;
    for chunk in invented.chunks(50) {
        let sends = chunk.iter().map(|a| chat_as(&proxy, &inventor, a));
        for s in futures::future::join_all(sends).await {
            assert_eq!(s, 200);
        }
    }
    for chunk in 0..40 {
        let sends = (0..50).map(|i| {
            let id = format!("made-up-{}", chunk * 50 + i);
            let (proxy, stranger) = (&proxy, &stranger);
            async move { chat_as(proxy, stranger, &id).await }
        });
        for s in futures::future::join_all(sends).await {
            assert_eq!(s, 200);
        }
    }
    let deadline = Instant::now() + WAIT;
    while cp_unknown(&cp, "usage").await < before + 300.0 {
        assert!(Instant::now() < deadline, "unknown agents were not counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for a in ["invented-0", "invented-299", "made-up-7"] {
        assert_eq!(interactive_requests(&cp, a), 0, "{a} has no usage row");
    }
    let m = proxy_metrics(&proxy).await;
    assert!(
        metric(&m, "claw_dp_agent_id_rejected_total").is_some_and(|n| n >= 2000.0),
        "{m}"
    );
    // The key's usage is still stored under the key.
    let v = cp
        .clawctl(&["stats", "total", "--key", "inventor", "-o", "json"])
        .json();
    let n = v["requests"]
        .as_u64()
        .or_else(|| v["requests"].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0);
    assert!(n >= 300, "usage stays under the key: {v}");

    // Export/apply carry the binding; `--agents ''` clears it.
    let doc = cp.clawctl(&["export"]).assert_ok().stdout;
    assert!(doc.contains("agent-g"), "{doc}");
    cp.clawctl(&["key", "update", "owner", "--agents", ""])
        .assert_ok();
    let k = cp
        .clawctl(&["key", "get", "owner", "-o", "json"])
        .assert_ok()
        .json();
    assert!(k["agents"].as_array().is_none_or(|a| a.is_empty()), "{k}");
}

/// `claw_cp_report_unknown_agent_total{kind=KIND}` on the control plane.
async fn cp_unknown(cp: &ControlPlane, kind: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", cp.http_url()))
        .await
        .expect("cp /metrics")
        .text()
        .await
        .expect("metrics body");
    metric(
        &text,
        &format!("claw_cp_report_unknown_agent_total{{kind=\"{kind}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_the_write_timeout() {
    const TOKENS: u32 = 2_000_000;
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        proxy_args: vec!["--write-timeout".into(), "2s".into()],
        // A long stream, sent as fast as the connection takes it.
        mock: MockConfig::default().completion_tokens(TOKENS),
        ..ClusterOptions::default()
    });
    let body = serde_json::to_string(&serde_json::json!({
        "model": CHAT,
        "messages": [{"role": "user", "content": "talk forever"}],
        "max_tokens": TOKENS,
        "stream": true,
    }))
    .expect("json");
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        c.key,
        body.len()
    );
    // The client sends its request and never reads a byte of the answer.
    let mut client = std::net::TcpStream::connect(c.proxy().addr()).expect("connect");
    std::io::Write::write_all(&mut client, raw.as_bytes()).expect("send");
    let started = Instant::now();
    let deadline = started + WAIT;
    loop {
        let m = proxy_metrics(c.proxy()).await;
        if metric(&m, "claw_dp_write_timeouts_total").is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled response was never cut off: {:?}",
            c.primary.totals()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "cut off only after the write timeout"
    );
    // The proxy serves on.
    assert_eq!(c.chat(c.proxy(), CHAT).await.status(), 200);
    drop(client);
}

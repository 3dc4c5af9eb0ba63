//! Acceptance tests of the data plane with real processes: the real
//! `claw-control-plane`, two real `claw-data-plane` proxies and in-process
//! mock upstreams (a primary and a fallback, each demanding its own provider
//! key), configured with the real `clawctl`.
//!
//! Configuration distribution and control-plane failures are in
//! `data_plane_config.rs`; bad input in `data_plane_input.rs`.

use crate::data_plane_support::*;
use claw_tests::harness::{ControlPlane, Proxy};
use claw_tests::mock::{Action, Outcome};
use futures::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Splits an SSE body into its `data:` payloads, checking the framing.
#[track_caller]
fn sse_data(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "an SSE body ends with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {event:?}"))
                .to_owned()
        })
        .collect()
}

/// Reads a streamed body chunk by chunk: what arrived, and whether it ended
/// cleanly.
async fn read_stream(res: reqwest::Response) -> (String, bool) {
    let mut body = Vec::new();
    let mut stream = res.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(_) => return (String::from_utf8_lossy(&body).into_owned(), false),
        }
    }
    (String::from_utf8_lossy(&body).into_owned(), true)
}

fn mock_name(res: &reqwest::Response) -> String {
    res.headers()
        .get("x-mock-name")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streaming_embeddings_and_models_work_through_both_proxies() {
    let c = Cluster::start();
    for (i, proxy) in c.proxies.iter().enumerate() {
        // Non-streaming chat.
        let res = c.chat(proxy, CHAT).await;
        assert_eq!(res.status(), 200, "proxy {i}");
        assert_eq!(mock_name(&res), "primary");
        let v: Value = res.json().await.expect("a JSON completion");
        assert_eq!(v["object"], "chat.completion");
        assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
        assert!(v["usage"]["total_tokens"].as_u64() > Some(0), "{v}");

        // Streaming chat: the SSE framing is passed through intact.
        let res = c
            .post(proxy, "chat/completions", &chat_body(CHAT, true))
            .await;
        assert_eq!(res.status(), 200);
        assert!(
            res.headers()["content-type"]
                .to_str()
                .is_ok_and(|t| t.starts_with("text/event-stream")),
            "{:?}",
            res.headers()
        );
        let (body, clean) = read_stream(res).await;
        assert!(clean, "the stream ended with an error: {body}");
        let events = sse_data(&body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
        let content: String = events[..events.len() - 1]
            .iter()
            .map(|e| {
                let chunk: Value = serde_json::from_str(e).expect("each event is JSON");
                assert_eq!(chunk["object"], "chat.completion.chunk");
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert!(!content.is_empty(), "{body}");

        // Embeddings.
        let res = c
            .post(
                proxy,
                "embeddings",
                &json!({"model": EMBED, "input": "embed me"}),
            )
            .await;
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.expect("JSON");
        assert!(
            v["data"][0]["embedding"]
                .as_array()
                .is_some_and(|e| !e.is_empty()),
            "{v}"
        );

        // Models, from the snapshot, in OpenAI list format.
        let res = c
            .http
            .get(format!("{}/v1/models", proxy.url()))
            .bearer_auth(&c.key)
            .send()
            .await
            .expect("GET /v1/models");
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.expect("JSON");
        assert_eq!(v["object"], "list");
        let mut ids: Vec<&str> = v["data"]
            .as_array()
            .expect("data is a list")
            .iter()
            .map(|m| m["id"].as_str().unwrap_or_default())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, [CHAT, EMBED], "{v}");
    }

    // What the upstream saw: the native model id and the backend's key,
    // never the client's.
    let seen = c
        .primary
        .wait_for_requests(6, Duration::from_secs(10))
        .await;
    assert_eq!(seen.len(), 6);
    for r in &seen {
        let want = if r.path.ends_with("/embeddings") {
            EMBED_NATIVE
        } else {
            CHAT_NATIVE_PRIMARY
        };
        assert_eq!(r.model.as_deref(), Some(want), "{r:?}");
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {PRIMARY_KEY}").as_str())
        );
        assert!(
            !r.headers.values().any(|v| v.contains(&c.key)),
            "client key leaked: {r:?}"
        );
        assert_eq!(r.outcome, Outcome::Ok);
    }
    assert_eq!(c.fallback.totals().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_the_primary_is_answered_by_the_fallback_and_cools_the_primary() {
    let c = Cluster::start();
    let proxy = c.proxy();
    c.primary.push(Action::rate_limited(None));

    let res = c
        .http
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .bearer_auth(&c.key)
        .header("x-request-tag", "retried-7")
        .json(&chat_body(CHAT, false))
        .send()
        .await
        .expect("POST through the proxy");
    assert_eq!(res.status(), 200);
    assert_eq!(mock_name(&res), "fallback");
    let fb = c
        .fallback
        .wait_for_requests(1, Duration::from_secs(5))
        .await;
    assert_eq!(fb[0].model.as_deref(), Some(CHAT_NATIVE_FALLBACK));
    assert_eq!(
        fb[0].header("authorization"),
        Some(format!("Bearer {FALLBACK_KEY}").as_str())
    );
    // Both attempts carry the client's own headers and their upstream's
    // `Host`.
    let first = c.primary.wait_for_requests(1, Duration::from_secs(5)).await;
    for (seen, mock) in [(&first[0], &c.primary), (&fb[0], &c.fallback)] {
        assert_eq!(seen.header("x-request-tag"), Some("retried-7"), "{seen:?}");
        assert_eq!(seen.header("host"), Some(mock.addr().to_string().as_str()));
    }
    assert_eq!(c.primary.totals().http_errors, 1);

    // The primary cools (5 s by default): the next requests go straight to
    // the fallback without touching it.
    for _ in 0..3 {
        let res = c.chat(proxy, CHAT).await;
        assert_eq!(res.status(), 200);
        assert_eq!(mock_name(&res), "fallback");
    }
    assert_eq!(
        c.primary.totals().requests,
        1,
        "the cooling primary was not tried"
    );
    let metrics = c
        .http
        .get(format!("{}/metrics", proxy.url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("claw_dp_cooldowns_active") && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_retry_after_sets_the_cooldown_length() {
    let c = Cluster::start();
    // A cooldown base far longer than the Retry-After, so that the primary
    // coming back early proves the header was followed.
    c.cp.clawctl(&["pool", "set", "primary", "--cooldown-base", "60s"])
        .assert_ok();
    c.wait_synced();
    let proxy = c.proxy();
    c.primary.push(Action::rate_limited(Some(2)));
    let cooled_at = Instant::now();
    let res = c.chat(proxy, CHAT).await;
    assert_eq!(mock_name(&res), "fallback");

    let mut back_after = None;
    while cooled_at.elapsed() < Duration::from_secs(10) {
        let res = c.chat(proxy, CHAT).await;
        assert_eq!(res.status(), 200);
        if mock_name(&res) == "primary" {
            back_after = Some(cooled_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back_after = back_after.expect("the primary was used again within 10 s");
    assert!(
        back_after >= Duration::from_millis(1900) && back_after < Duration::from_secs(6),
        "Retry-After: 2 but the primary came back after {back_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_backend_cooling_the_emergency_bucket_admits_a_few_then_503_with_retry_after() {
    // rpm 60 × emergency fraction 0.05 = 3 emergency requests per minute
    // (fewer when the control plane gives this proxy a share of the rpm).
    let c = Cluster::with(ClusterOptions {
        rpm: 60,
        ..ClusterOptions::default()
    });
    let proxy = c.proxy();
    c.primary.push(Action::rate_limited(Some(30)));
    c.fallback.push(Action::rate_limited(Some(30)));

    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..8 {
        let res = c.chat(proxy, CHAT).await;
        let status = res.status().as_u16();
        statuses.push(status);
        if status == 503 {
            last = Some(res);
            break;
        }
    }
    let res = last.unwrap_or_else(|| panic!("no 503 after the emergency bucket: {statuses:?}"));
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After in seconds");
    assert!(
        (20..=31).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    let err = assert_openai_error(&res.text().await.expect("body"));
    assert_eq!(err["error"]["code"], "no_backend_available");

    // Both backends answered 429 once; everything after that reached an
    // upstream only through the emergency bucket, and answered 200.
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        (1..=3).contains(&admitted),
        "expected 1-3 emergency admissions, got {statuses:?}"
    );
    let (p, f) = (c.primary.totals(), c.fallback.totals());
    assert_eq!((p.http_errors, f.http_errors), (1, 1));
    assert_eq!(p.ok + f.ok, admitted as u64, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_backend_rate_wait_in_the_queue_and_then_succeed() {
    // 30 rpm on each backend, paced: an idle limiter admits one request at
    // once, then one every 2 s. A lone proxy gets the whole rate. The
    // first request takes the primary, the second the fallback; from the
    // third on, requests wait in the queue for the next conforming instant.
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        rpm: 30,
        ..ClusterOptions::default()
    });
    let proxy = c.proxy();
    let mut queued = Vec::new();
    let mut sent = 0u64;
    while sent < 20 && queued.len() < 2 {
        let started = Instant::now();
        let res = c.chat(proxy, CHAT).await;
        let took = started.elapsed();
        sent += 1;
        assert_eq!(
            res.status(),
            200,
            "a rate-limited request is queued, not refused"
        );
        // Only once both backends took a request can one wait; a slow
        // answer before that is just a busy machine.
        if sent > 2 && took > Duration::from_millis(300) {
            queued.push(took);
        }
    }
    assert_eq!(
        queued.len(),
        2,
        "no request waited for a token in {sent} requests"
    );
    assert!(
        queued.iter().all(|t| *t < Duration::from_secs(10)),
        "{queued:?}"
    );
    let (p, f) = (c.primary.totals(), c.fallback.totals());
    assert_eq!(p.http_errors + f.http_errors, 0);
    assert_eq!(
        p.ok + f.ok,
        sent,
        "every request reached an upstream exactly once"
    );
    assert!(
        p.ok >= 1 && f.ok >= 1,
        "primary first, then fallback: {p:?} {f:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_way_ends_with_an_sse_error_event_and_no_done() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    c.primary.push(Action::reset_mid_stream(3));
    let res = c
        .post(c.proxy(), "chat/completions", &chat_body(CHAT, true))
        .await;
    assert_eq!(res.status(), 200);
    let (body, clean) = read_stream(res).await;
    assert!(!clean, "a cut stream must not end cleanly: {body}");
    assert!(!body.contains("[DONE]"), "{body}");
    let events = sse_data(&body);
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("JSON event");
    assert_eq!(last["error"]["code"], "upstream_disconnected", "{body}");
    let content = events
        .iter()
        .filter(|e| e.contains("chat.completion.chunk"))
        .count();
    assert!(content >= 3, "the chunks before the cut arrived: {body}");
    // Once bytes went to the client, nothing is retried.
    assert_eq!(c.fallback.totals().requests, 0);

    // The proxy is fine afterwards.
    assert_eq!(c.chat(c.proxy(), CHAT).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_5xx_falls_over_to_the_fallback_and_repeated_failures_eject_the_primary() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    c.primary.set_always(Some(Action::status(500)));
    for i in 0..8 {
        let res = c.chat(c.proxy(), CHAT).await;
        assert_eq!(res.status(), 200, "request {i}");
        assert_eq!(mock_name(&res), "fallback", "request {i}");
    }
    // Five consecutive failures eject the primary (for 30 s): the last
    // requests did not try it at all.
    assert_eq!(c.primary.totals().requests, 5, "{:?}", c.primary.totals());
    assert_eq!(c.fallback.totals().ok, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_primary_is_skipped_for_the_fallback() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    // A port nobody listens on: bind one, note it, close it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    c.cp.clawctl(&[
        "backend",
        "update",
        "primary",
        "--url",
        &format!("http://{dead}/v1"),
    ])
    .assert_ok();
    c.wait_synced();
    for stream in [false, true] {
        let res = c
            .post(c.proxy(), "chat/completions", &chat_body(CHAT, stream))
            .await;
        assert_eq!(res.status(), 200);
        assert_eq!(mock_name(&res), "fallback");
        let (body, clean) = read_stream(res).await;
        assert!(clean, "{body}");
    }
    assert_eq!(c.fallback.totals().ok, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keys_rpm_and_model_allow_list_are_enforced() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    let secret = |args: &[&str]| {
        c.cp.clawctl(args).assert_ok().json()["secret"]
            .as_str()
            .expect("secret")
            .to_owned()
    };
    let limited = secret(&["key", "add", "limited", "--rpm", "2", "-o", "json"]);
    let chat_only = secret(&["key", "add", "chat-only", "--models", CHAT, "-o", "json"]);
    c.wait_synced();
    let url = format!("{}/v1/chat/completions", c.proxy().url());
    let send = |key: &str, model: &str| {
        c.http
            .post(&url)
            .bearer_auth(key)
            .json(&chat_body(model, false))
            .send()
    };

    // 2 rpm, paced: one request passes at once, the next gets 429 with
    // Retry-After (it is owed 30 s later; more with a share of the rpm).
    assert_eq!(
        send(&limited, CHAT)
            .await
            .expect("answered")
            .status()
            .as_u16(),
        200
    );
    let res = send(&limited, CHAT).await.expect("answered");
    assert_eq!(res.status(), 429);
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let err = assert_openai_error(&res.text().await.expect("body"));
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        c.primary.totals().requests,
        1,
        "the refused request never left the proxy"
    );

    // An allow-list: other models are 403 and not listed.
    let res = send(&chat_only, EMBED).await.expect("answered");
    assert_eq!(res.status(), 403);
    assert_openai_error(&res.text().await.expect("body"));
    assert_eq!(
        send(&chat_only, CHAT).await.expect("answered").status(),
        200
    );
    let models: Value = c
        .http
        .get(format!("{}/v1/models", c.proxy().url()))
        .bearer_auth(&chat_only)
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {models}"))
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, [CHAT], "a key sees only its models");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_stream_finish_then_exits_cleanly() {
    let mut c = Cluster::with(ClusterOptions {
        proxies: 1,
        mock: claw_tests::mock::MockConfig::default()
            .completion_tokens(15)
            .chunk_delay(Duration::from_millis(100)),
        ..ClusterOptions::default()
    });
    let mut proxy = c.proxies.remove(0);
    let addr = proxy.addr();
    let res = c
        .http
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .bearer_auth(&c.key)
        .json(&chat_body(CHAT, true))
        .send()
        .await
        .expect("stream started");
    assert_eq!(res.status(), 200);
    let mut stream = res.bytes_stream();
    let first = stream.next().await.expect("a first chunk").expect("bytes");
    let mut body = first.to_vec();

    let stopping = tokio::task::spawn_blocking(move || {
        let status = proxy.stop();
        (status, proxy)
    });
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.expect("the stream is not cut by the drain"));
    }
    let text = String::from_utf8_lossy(&body);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let (status, proxy) = stopping.await.expect("joined");
    let status = status.expect("it was running");
    assert!(status.success(), "{status}; log:\n{}", proxy.logs());
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the listener is closed after the drain"
    );
}

/// Regression (issue 15): the proxy's log was full of ANSI colour codes when
/// written to a file; both servers colour only a terminal. (The harness sets
/// `NO_COLOR` for every child; these two run without it.)
#[tokio::test]
async fn logs_written_to_a_file_have_no_colour_codes() {
    let cp = ControlPlane::builder().env_remove("NO_COLOR").start();
    let proxy = Proxy::builder(&cp).env_remove("NO_COLOR").start();
    proxy.wait_ready();
    // An unauthenticated request: the proxy logs nothing for it, but by now
    // both have logged their start and the snapshot.
    let res = reqwest::Client::new()
        .get(format!("{}/readyz", proxy.url()))
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), 200);
    for (who, log) in [("proxy", proxy.logs()), ("control plane", cp.logs())] {
        assert!(!log.trim().is_empty(), "the {who} logged nothing");
        assert!(
            !log.contains('\x1b'),
            "the {who}'s log has ANSI escapes:\n{log}"
        );
    }
}

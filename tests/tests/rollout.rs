//! Graceful rollout (issue 15): on SIGTERM the proxy answers `/readyz` 503
//! at once but keeps accepting and serving for `--drain-delay`, then stops
//! accepting and drains; `--metrics-addr` moves `/metrics` off the API port.

use crate::data_plane_support::*;
use claw_tests::harness::{Proxy, http, wait_until};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Long enough that the checks made during the delay do not race its end
/// on a loaded machine; the stream below outlasts it.
const DRAIN_DELAY: Duration = Duration::from_secs(4);
const WAIT: Duration = Duration::from_secs(30);
const STREAM_TOKENS: u32 = 40;

fn status(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    http::request(addr, "GET", path, None, Duration::from_secs(5))
        .ok()
        .map(|r| r.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readyz_503_keeps_serving_for_the_drain_delay_then_drains() {
    let mut c = Cluster::with(ClusterOptions {
        proxies: 1,
        proxy_args: vec![
            "--drain-delay".into(),
            format!("{}s", DRAIN_DELAY.as_secs()),
        ],
        // 40 chunks 250 ms apart: the stream is still open when the delay ends.
        mock: claw_tests::mock::MockConfig::default()
            .completion_tokens(STREAM_TOKENS)
            .chunk_delay(Duration::from_millis(250)),
        ..ClusterOptions::default()
    });
    let mut proxy = c.proxies.remove(0);
    let addr = proxy.addr();
    assert_eq!(status(addr, "/readyz"), Some(200));

    // A stream started before SIGTERM, read as it arrives; it notes whether
    // it ended after the listener was seen closed.
    let mut long = chat_body(CHAT, true);
    long["max_tokens"] = STREAM_TOKENS.into();
    let res = c
        .http
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .bearer_auth(&c.key)
        .json(&long)
        .send()
        .await
        .expect("stream started");
    assert_eq!(res.status(), 200);
    let mut stream = res.bytes_stream();
    let first = stream.next().await.expect("a first chunk").expect("bytes");
    let refused_seen = Arc::new(AtomicBool::new(false));
    let reader = {
        let refused_seen = refused_seen.clone();
        let mut body = first.to_vec();
        tokio::spawn(async move {
            while let Some(chunk) = stream.next().await {
                body.extend_from_slice(&chunk.expect("the stream is not cut by the drain"));
            }
            (body, refused_seen.load(Ordering::SeqCst))
        })
    };

    let stopping = tokio::task::spawn_blocking(move || {
        let status = proxy.stop_within(WAIT);
        (status, proxy)
    });

    // /readyz turns 503 (the listener still answers it).
    let turned = tokio::task::spawn_blocking(move || {
        wait_until(WAIT, || status(addr, "/readyz") == Some(503))
    })
    .await
    .expect("joined");
    assert!(turned, "/readyz did not turn 503 after SIGTERM");

    // During the delay a new connection (its own client, no pool) and a
    // request on it are served.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let res = fresh
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(&c.key)
        .json(&chat_body(CHAT, false))
        .send()
        .await
        .expect("a new connection during the drain delay is accepted");
    assert_eq!(
        res.headers()
            .get("connection")
            .and_then(|v| v.to_str().ok()),
        Some("close"),
        "a response during the drain closes its connection"
    );
    assert_eq!(res.status(), 200, "{:?}", res.text().await);

    // After the delay the listener is closed, while the stream still runs.
    let refused = tokio::task::spawn_blocking(move || {
        wait_until(WAIT, || std::net::TcpStream::connect(addr).is_err())
    })
    .await
    .expect("joined");
    assert!(refused, "the listener is still open after the drain delay");
    refused_seen.store(true, Ordering::SeqCst);

    // The stream started before SIGTERM completes, after the listener closed.
    let (body, ended_after_close) = reader.await.expect("joined");
    let text = String::from_utf8_lossy(&body);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        ended_after_close,
        "the stream ended before the listener closed: make it longer"
    );

    let (status, proxy) = stopping.await.expect("joined");
    let status = status.expect("it was running");
    let logs = proxy.logs();
    assert!(status.success(), "{status}; log:\n{logs}");
    for phase in [
        "still accepting connections for the drain delay",
        "stopped accepting connections; draining in-flight requests",
        ": drained",
    ] {
        let n = logs.lines().filter(|l| l.contains(phase)).count();
        assert_eq!(n, 1, "phase {phase:?} is logged once; log:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_addr_serves_metrics_on_its_own_listener_and_not_on_the_api_port() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    // Default: /metrics on the API port.
    let plain = &c.proxies[0];
    assert_eq!(status(plain.addr(), "/metrics"), Some(200));

    let split = Proxy::builder(&c.cp).metrics_listener().start();
    split.wait_ready();
    let metrics = split.metrics_addr().expect("a metrics listener");
    assert_ne!(metrics, split.addr());
    let reply = http::request(metrics, "GET", "/metrics", None, Duration::from_secs(5))
        .expect("metrics answered");
    assert_eq!(reply.status, 200);
    let text = String::from_utf8_lossy(&reply.body);
    assert!(text.contains("# HELP claw_"), "{text}");
    assert_eq!(status(metrics, "/healthz"), Some(200));
    assert_eq!(status(metrics, "/v1/models"), Some(404));
    // The API port no longer serves it, and still serves the API.
    assert_eq!(status(split.addr(), "/metrics"), Some(404));
    assert_eq!(status(split.addr(), "/readyz"), Some(200));
    let res = c
        .http
        .post(format!("{}/v1/chat/completions", split.url()))
        .bearer_auth(&c.key)
        .json(&chat_body(CHAT, false))
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), 200);
}

#[test]
fn a_bad_metrics_addr_or_drain_delay_is_a_clear_error() {
    let cp = claw_tests::harness::ControlPlane::start();
    for (args, names) in [
        (["--metrics-addr", "nowhere"], "--metrics-addr"),
        (["--drain-delay", "soon"], "--drain-delay"),
    ] {
        let err = Proxy::builder(&cp)
            .args(args)
            .try_start()
            .expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains(names), "{msg}");
    }
}

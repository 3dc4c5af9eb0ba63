//! A rough overhead check (ignored by default; run it in release):
//! `cargo test --release -p claw-data-plane --test integration -- perf:: --ignored --nocapture`
//! Compares requests per second and p99 latency straight to a mock upstream
//! and through the proxy. The real benchmark against nginx lives in `tests/`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use claw_proto::Pool;
use claw_tests::mock::{MockConfig, MockUpstream};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

async fn load(url: String, auth: bool, workers: usize, dur: Duration) -> (f64, Duration) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(workers)
        .build_http();
    let stop = Arc::new(AtomicBool::new(false));
    let body = Bytes::from_static(
        br#"{"model":"gpt","messages":[{"role":"user","content":"hello"}],"max_tokens":4}"#,
    );
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, stop, url, body) = (client.clone(), stop.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut req = http::Request::post(&url).header("content-type", "application/json");
                if auth {
                    req = req.header("authorization", format!("Bearer {CLIENT_KEY}"));
                }
                let req = req.body(Full::new(body.clone())).unwrap();
                let t = Instant::now();
                let res = client.request(req).await.unwrap();
                assert!(res.status().is_success(), "{}", res.status());
                res.into_body().collect().await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let p99 = all[all.len() * 99 / 100];
    (all.len() as f64 / dur.as_secs_f64(), p99)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "load test; run in release with --ignored"]
async fn proxy_overhead() {
    let up = MockUpstream::start(MockConfig::default().no_record()).await;
    let mut be = backend("a", &up.url(), Pool::Primary, &[("gpt", "mock-model")]);
    be.rpm = 100_000_000;
    let p = TestProxy::start(snapshot(vec![be])).await;
    let dur = Duration::from_secs(3);
    // Warm up both paths.
    load(
        format!("{}/chat/completions", up.url()),
        false,
        8,
        Duration::from_millis(300),
    )
    .await;
    load(
        p.url("/v1/chat/completions"),
        true,
        8,
        Duration::from_millis(300),
    )
    .await;
    let (direct_rps, direct_p99) =
        load(format!("{}/chat/completions", up.url()), false, 32, dur).await;
    let (proxy_rps, proxy_p99) = load(p.url("/v1/chat/completions"), true, 32, dur).await;
    println!("direct: {direct_rps:.0} rps, p99 {direct_p99:?}");
    println!("proxy:  {proxy_rps:.0} rps, p99 {proxy_p99:?}");
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "load test; run in release with --ignored (CLAW_STREAMS=N, default 2000)"]
async fn many_concurrent_streams() {
    let n: usize = std::env::var("CLAW_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let up = MockUpstream::start(
        MockConfig::default()
            .no_record()
            .completion_tokens(20)
            .chunk_delay(Duration::from_millis(100)),
    )
    .await;
    let mut be = backend("a", &up.url(), Pool::Primary, &[("gpt", "mock-model")]);
    be.rpm = 100_000_000;
    let p = TestProxy::start(snapshot(vec![be])).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = Bytes::from_static(
        br#"{"model":"gpt","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, url, body) = (client.clone(), p.url("/v1/chat/completions"), body.clone());
        tasks.push(tokio::spawn(async move {
            let req = http::Request::post(&url)
                .header("authorization", format!("Bearer {CLIENT_KEY}"))
                .body(Full::new(body))
                .unwrap();
            let res = client.request(req).await.unwrap();
            assert!(res.status().is_success());
            let bytes = res.into_body().collect().await.unwrap().to_bytes();
            assert!(bytes.ends_with(b"data: [DONE]\n\n"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "{n} concurrent streams of ~2 s finished in {:?}",
        t.elapsed()
    );
    p.shutdown().await.unwrap();
}

//! Hostile limits (issue 17 items 1 and 7), through the real binaries: a
//! request's tpm reservation is always reconciled — a `max_tokens` above the
//! mapping's maximum is refused, failed attempts (500, timeout) give their
//! tokens back, a 200 without readable usage keeps only a bounded estimate —
//! so a tpm-limited backend keeps serving; usage an upstream reports is
//! clamped (`u64::MAX` neither saturates the totals nor wedges the limiter)
//! and counted; an upstream's `Retry-After: 1000000000` neither holds a
//! backend for a day nor tells a client to come back tomorrow.
//!
//! Each attack is bounded: 20 requests of each kind, a queue timeout of 2 s
//! (a leaked reservation would make the next request wait ~10 s and get 429).

use crate::data_plane_support::*;
use claw_tests::harness::wait_until;
use claw_tests::mock::Action;
use serde_json::{Value, json};
use std::time::{Duration, Instant, SystemTime};

/// How many hostile requests of each kind.
const ROUNDS: usize = 20;

/// One backend `lim` serving `gpt` with the mapping's `max_tokens=1000`,
/// `context=4096`, a tpm of `tpm`, an upstream timeout of 300 ms; the pool
/// answers 429 after a 2 s queue wait and never retries.
fn limited_fleet(tpm: &str) -> Fleet {
    let mut spec = BackendSpec::new("lim", "openai", "gpt", "").with_args(&[
        "--tpm",
        tpm,
        "--upstream-timeout",
        "300ms",
    ]);
    spec.models = vec!["gpt=gpt-lim,max_tokens=1000,context=4096".to_owned()];
    let f = Fleet::start(vec![spec], 1);
    f.cp.clawctl(&[
        "pool",
        "set",
        "primary",
        "--queue-timeout",
        "2s",
        "--max-retries",
        "0",
    ])
    .assert_ok();
    f.wait_synced();
    f
}

/// `POST /v1/chat/completions` for `gpt` with `field: max_tokens`: the
/// status, the body and the `retry-after` header.
async fn chat(f: &Fleet, field: &str, max_tokens: u64) -> (u16, Value, Option<String>) {
    let mut body = json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]});
    body[field] = json!(max_tokens);
    let res = f.post_openai(0, "chat/completions", &body, &[]).await;
    let status = res.status().as_u16();
    let retry = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = res.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v, retry)
}

/// A normal request is answered (not queued out with a 429).
async fn assert_served(f: &Fleet, after: &str) {
    let (status, v, _) = chat(f, "max_tokens", 16).await;
    assert_eq!(
        status,
        200,
        "a normal request after {after} must be served: {v}\n{}",
        f.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_and_unreadable_usage_give_their_tokens_back() {
    // 100 tokens a second: a leaked reservation of ~1000 tokens holds the
    // backend ~10 s, beyond the 2 s queue timeout.
    let f = limited_fleet("6000");
    assert_served(&f, "start").await;

    // Above the mapping's max_tokens: refused in the client's shape, naming
    // the field and the limit, without reaching the upstream.
    let sent = f.mocks[0].totals().requests;
    for field in ["max_tokens", "max_completion_tokens"] {
        let (status, v, _) = chat(&f, field, 1_000_000_000_000).await;
        assert_eq!(status, 400, "{field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("1000"), "the limit is named: {msg}");
    }
    assert_eq!(
        f.mocks[0].totals().requests,
        sent,
        "nothing reached the upstream"
    );
    assert_served(&f, "refused requests").await;

    // The upstream fails: every reservation goes back.
    f.mocks[0].set_always(Some(Action::status(500)));
    for i in 0..ROUNDS {
        let (status, v, _) = chat(&f, "max_tokens", 1000).await;
        assert!(
            status != 429 && status != 200,
            "attempt {i} against a failing upstream: {status} {v}\n{}",
            f.logs()
        );
    }
    f.mocks[0].set_always(None);
    assert_served(&f, "20 upstream 500s").await;

    // The upstream does not answer in time.
    f.mocks[0].set_always(Some(Action::delay(Duration::from_secs(2))));
    for i in 0..ROUNDS {
        let (status, v, _) = chat(&f, "max_tokens", 1000).await;
        assert_eq!(
            status,
            504,
            "attempt {i} against a slow upstream: {v}\n{}",
            f.logs()
        );
    }
    f.mocks[0].set_always(None);
    assert_served(&f, "20 upstream timeouts").await;

    // 200 without usage: settled at a bounded estimate (prompt + answer
    // size), not at the 1000 tokens reserved.
    let no_usage = Action::status(200).with_body(json!({
        "id": "chatcmpl-nousage",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-lim",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "ok"}}],
    }));
    f.mocks[0].set_always(Some(no_usage));
    for i in 0..ROUNDS {
        let (status, v, _) = chat(&f, "max_tokens", 1000).await;
        assert_eq!(status, 200, "answer {i} without usage: {v}\n{}", f.logs());
    }
    f.mocks[0].set_always(None);
    assert_served(&f, "20 answers without usage").await;
}

/// `claw_usage_clamped_total` of backend `id` on the proxy's `/metrics`.
async fn clamped_metric(f: &Fleet, id: &str) -> u64 {
    let text = f
        .http
        .get(format!("{}/metrics", f.proxies[0].url()))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        text.contains("# TYPE claw_usage_clamped_total counter")
            && text.contains("# HELP claw_usage_clamped_total"),
        "HELP/TYPE of claw_usage_clamped_total"
    );
    let prefix = format!("claw_usage_clamped_total{{backend=\"{id}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .map_or(0, |n| n as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_usage_is_clamped_counted_and_does_not_wedge_the_limiter() {
    // 10k tokens a second: the clamp (twice the 4096 window) holds the
    // backend under a second; u64::MAX would hold it for ever.
    let f = limited_fleet("600000");
    let id =
        f.cp.clawctl(&["backend", "get", "lim", "-o", "json"])
            .assert_ok()
            .json()["id"]
            .as_str()
            .expect("backend id")
            .to_owned();
    let max = u64::MAX;
    f.mocks[0].set_always(Some(Action::status(200).with_body(json!({
        "id": "chatcmpl-huge",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-lim",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": max, "completion_tokens": max, "total_tokens": max},
    }))));
    for i in 0..3 {
        let (status, v, _) = chat(&f, "max_tokens", 16).await;
        assert_eq!(status, 200, "hostile usage answer {i}: {v}\n{}", f.logs());
    }
    f.mocks[0].set_always(None);
    for _ in 0..3 {
        assert_served(&f, "answers claiming u64::MAX tokens").await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = clamped_metric(&f, &id).await;
        if seen >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "claw_usage_clamped_total{{backend={id}}} = {seen}, want 3"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The control plane's totals are sane: 6 requests, no saturation.
    let mut last = Value::Null;
    let sane = wait_until(Duration::from_secs(30), || {
        let out = f.cp.clawctl(&["stats", "total", "-o", "json"]);
        if !out.success() {
            return false;
        }
        last = out.json();
        let n = |k: &str| {
            last[k]
                .as_u64()
                .or_else(|| last[k].as_str().and_then(|s| s.parse().ok()))
                .unwrap_or(0)
        };
        n("requests") >= 6
    });
    assert!(sane, "stats never counted the 6 requests: {last}");
    let total = last["total_tokens"]
        .as_u64()
        .or_else(|| last["total_tokens"].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(u64::MAX);
    // Each hostile answer counts at most the clamp (twice the window) of
    // prompt and of completion tokens; the normal ones a few tokens.
    assert!(
        total <= 3 * 2 * (2 * 4096) + 3 * 1000,
        "totals bounded by the clamp: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_retry_after_is_capped_at_the_pools_cooldown_max() {
    let f = Fleet::start(
        vec![
            BackendSpec::new("quota", "openai", "gq", ""),
            BackendSpec::new("rate", "openai", "gr", ""),
        ],
        1,
    );
    f.cp.clawctl(&[
        "pool",
        "set",
        "primary",
        "--cooldown-base",
        "1s",
        "--cooldown-max",
        "30s",
        "--max-retries",
        "0",
    ])
    .assert_ok();
    f.wait_synced();
    let ask = |model: &'static str| {
        let f = &f;
        async move {
            let body = json!({"model": model, "max_tokens": 4,
                              "messages": [{"role": "user", "content": "hi"}]});
            let res = f.post_openai(0, "chat/completions", &body, &[]).await;
            let status = res.status().as_u16();
            let retry = res
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            (status, retry, res.text().await.unwrap_or_default())
        }
    };

    // A rate limit "for 50 minutes": cooled for cooldown_max at most, and
    // the client is told no more.
    f.mocks[1].set_always(Some(Action::rate_limited(Some(3000))));
    let (status, retry, text) = ask("gr").await;
    assert_eq!(status, 429, "{text}");
    assert!(
        retry.is_some_and(|s| (1..=30).contains(&s)),
        "retry-after {retry:?} must be at most cooldown_max (30 s)"
    );

    // "Come back in 31 years": the quota-exhausted case, shown as such, held
    // an hour at most; the client is told no more than cooldown_max.
    f.mocks[0].set_always(Some(Action::rate_limited(Some(1_000_000_000))));
    let (status, retry, text) = ask("gq").await;
    assert_eq!(status, 429, "{text}");
    assert!(
        retry.is_some_and(|s| (1..=30).contains(&s)),
        "retry-after {retry:?} must be at most cooldown_max (30 s)"
    );
    let hour_from_now = SystemTime::now() + Duration::from_secs(3600 + 60);
    let mut last = Value::Null;
    let shown = wait_until(Duration::from_secs(30), || {
        last =
            f.cp.clawctl(&["backend", "get", "quota", "-o", "json"])
                .assert_ok()
                .json();
        last["status"] == "quota_exhausted"
    });
    assert!(shown, "the backend never showed quota_exhausted: {last}");
    let until = last["quota_exhausted_until"]
        .as_str()
        .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
        .unwrap_or_else(|| panic!("quota_exhausted_until in {last}"));
    assert!(
        until <= hour_from_now,
        "the hold must be at most an hour, not a day: {last}"
    );
}

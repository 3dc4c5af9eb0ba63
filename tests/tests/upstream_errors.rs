//! Upstream errors on `api: anthropic` backends, through the real proxy
//! (issue 12): an overloaded (529) first choice is retried on the other
//! backend; a 429 that says the quota is spent (a `Retry-After` beyond an
//! hour) marks the backend `quota_exhausted` in `clawctl backend list`
//! rather than a transient cooldown; with nothing left, the client gets an
//! Anthropic-shaped error its SDK classifies.

use crate::data_plane_support::*;
use claw_tests::mock::Action;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn body() -> String {
    json!({"model": "claude", "max_tokens": 4,
           "messages": [{"role": "user", "content": "hello"}]})
    .to_string()
}

async fn send(f: &Fleet, proxy: usize) -> (u16, Value, Option<String>) {
    let res = f
        .messages(proxy, &body(), &[("x-claw-session-key", "pinned")])
        .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_retries_elsewhere_and_a_spent_quota_shows_in_backend_list() {
    let f = Fleet::start(
        vec![
            BackendSpec::new("ant-a", "anthropic", "claude", ""),
            BackendSpec::new("ant-b", "anthropic", "claude", ""),
        ],
        1,
    );
    let before = f.ok_counts();
    let (status, v, _) = send(&f, 0).await;
    assert_eq!(status, 200, "{v}\n{}", f.logs());
    let home = f.served_by(&before);
    let other = 1 - home;

    // 529 overloaded: retried on the other backend, the client sees a 200.
    f.mocks[home].set_always(Some(Action::status(529)));
    let before = f.ok_counts();
    let (status, v, _) = send(&f, 0).await;
    assert_eq!(
        status,
        200,
        "an overloaded backend must be retried elsewhere: {v}\n{}",
        f.logs()
    );
    assert_eq!(f.served_by(&before), other);
    assert!(
        f.mocks[home].totals().http_errors >= 1,
        "the first choice was tried"
    );
    f.mocks[home].set_always(None);

    // A spent quota: 429 with a Retry-After of two hours.
    let spent = Action::rate_limited(Some(7200)).with_body(json!({
        "type": "error",
        "error": {"type": "rate_limit_error",
                  "message": "You have reached your monthly spend limit."},
    }));
    f.mocks[other].set_always(Some(spent.clone()));
    f.mocks[home].set_always(Some(spent));
    let (status, v, retry) = send(&f, 0).await;
    assert!(status == 429 || status == 529, "{status} {v}");
    assert_eq!(v["type"], "error", "an Anthropic-shaped error: {v}");
    assert!(
        matches!(
            v["error"]["type"].as_str(),
            Some("rate_limit_error" | "overloaded_error")
        ),
        "{v}"
    );
    assert!(retry.is_some(), "a retry-after for the SDK");
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let out = f.cp.clawctl(&["backend", "list"]).assert_ok();
        let text = out.stdout;
        if text.matches("quota_exhausted").count() >= 2 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "`clawctl backend list` never showed both backends quota_exhausted:\n{text}\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("{listed}");
}

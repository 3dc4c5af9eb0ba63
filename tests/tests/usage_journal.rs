//! Issue 18: a proxy's answered requests are billed. A non-streaming answer
//! of any size has its usage read (the body scan stopped at 4 MiB and
//! recorded 0 tokens); with `--usage-journal`, a proxy killed with `kill -9`
//! mid-load and restarted on the same journal bills every answered request
//! exactly once; without it, the loss stays within one report interval.

use crate::data_plane_support::*;
use claw_tests::harness::wait_until;
use claw_tests::mock::MockConfig;
use serde_json::{Value, json};
use std::time::Duration;

/// `(requests, prompt_tokens, completion_tokens)` of `stats total`.
fn cp_totals(c: &Cluster) -> Option<(u64, u64, u64)> {
    let out = c.cp.clawctl(&["stats", "total", "-o", "json"]);
    if !out.success() {
        return None;
    }
    let v = out.json();
    let n = |k: &str| {
        v[k].as_u64()
            .or_else(|| v[k].as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(0)
    };
    Some((n("requests"), n("prompt_tokens"), n("completion_tokens")))
}

/// Regression (issue 18): a non-streaming answer over 4 MiB was recorded
/// as 0 tokens. A ~6.5 MB chat completion's usage is billed to the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_6_mb_non_streaming_answer_has_its_usage_recorded() {
    const TOKENS: u32 = 700_000;
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        mock: MockConfig::default().completion_tokens(TOKENS),
        ..ClusterOptions::default()
    });
    let body = json!({
        "model": CHAT,
        "messages": [{"role": "user", "content": "a long answer please"}],
        "max_tokens": TOKENS,
    });
    let res = c.post(c.proxy(), "chat/completions", &body).await;
    assert_eq!(res.status(), 200, "{}", c.proxy().logs());
    let bytes = res.bytes().await.expect("the whole answer");
    assert!(bytes.len() > 6_000_000, "answer of {} bytes", bytes.len());
    let answer: Value = serde_json::from_slice(&bytes).expect("a JSON answer");
    let usage = &answer["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
        usage["completion_tokens"]
            .as_u64()
            .expect("completion_tokens"),
    );
    assert_eq!(completion, u64::from(TOKENS));
    let mut last = None;
    let exact = wait_until(Duration::from_secs(30), || {
        last = cp_totals(&c);
        last == Some((1, prompt, completion))
    });
    assert!(
        exact,
        "stats total shows {last:?}, the answer said (1, {prompt}, {completion})\n{}",
        c.proxy().logs()
    );
}

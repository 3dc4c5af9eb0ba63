//! Usage and cost, exact for every protocol (issue 12): Anthropic Messages
//! and OpenAI chat and Responses, streamed and not, with prompt-cache reads
//! and 5-minute and 1-hour writes, through two proxies. `clawctl stats total
//! -o json` must equal, to the token, what the mocks reported (input with
//! cache, cache reads, cache writes, output), and its cost the issue's
//! formula computed here from the mocks' numbers and the configured prices:
//! uncached input × in + reads × cache_read + 5m writes × cache_write +
//! 1h writes × cache_write_1h + output × out.

use crate::data_plane_support::*;
use claw_tests::mock::Totals;
use serde_json::{Value, json};
use std::time::Duration;

/// Per-token prices of one model mapping.
#[derive(Debug, Clone, Copy)]
struct Prices {
    input: f64,
    output: f64,
    cache_read: f64,
    cache_write: f64,
    cache_write_1h: f64,
}

impl Prices {
    fn spec(&self) -> String {
        format!(
            ",in={},out={},cache_read={},cache_write={},cache_write_1h={}",
            self.input, self.output, self.cache_read, self.cache_write, self.cache_write_1h
        )
    }

    /// The formula over what one mock reported.
    fn cost(&self, t: &Totals) -> f64 {
        let uncached = t.prompt_tokens - t.cache_read_tokens - t.cache_write_tokens();
        uncached as f64 * self.input
            + t.cache_read_tokens as f64 * self.cache_read
            + t.cache_write_5m_tokens as f64 * self.cache_write
            + t.cache_write_1h_tokens as f64 * self.cache_write_1h
            + t.completion_tokens_sent as f64 * self.output
    }
}

const ANTHROPIC: Prices = Prices {
    input: 0.000003,
    output: 0.000015,
    cache_read: 0.0000003,
    cache_write: 0.00000375,
    cache_write_1h: 0.000006,
};
const OPENAI: Prices = Prices {
    input: 0.0000025,
    output: 0.00001,
    cache_read: 0.00000125,
    cache_write: 0.0,
    cache_write_1h: 0.0,
};

/// `(prompt, completion, cache_read, cache_write, cost)` from `stats total`.
fn cp_usage(f: &Fleet) -> Option<(u64, u64, u64, u64, f64)> {
    let out = f.cp.clawctl(&["stats", "total", "-o", "json"]);
    if !out.success() {
        return None;
    }
    let v = out.json();
    let n = |k: &str| {
        v[k].as_u64()
            .or_else(|| v[k].as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(0)
    };
    let cost = v["cost"]
        .as_f64()
        .or_else(|| v["cost"].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(f64::NAN);
    Some((
        n("prompt_tokens"),
        n("completion_tokens"),
        n("cache_read_tokens"),
        n("cache_write_tokens"),
        cost,
    ))
}

fn anthropic_body(last: &str, stream: bool) -> String {
    let words = |prefix: &str, n: usize| {
        (0..n)
            .map(|i| format!("{prefix}{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    json!({
        "model": "claude", "max_tokens": 6, "stream": stream,
        "system": [{"type": "text", "text": words("sys", 20),
                    "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": words("doc", 10),
                                          "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": "noted"},
            {"role": "user", "content": last},
        ],
    })
    .to_string()
}

fn chat_body(last: &str, stream: bool) -> Value {
    json!({
        "model": "gpt", "max_tokens": 5, "stream": stream,
        "messages": [
            {"role": "system", "content": "a system prompt of eight words right here"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": last},
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_total_equals_the_mocks_usage_and_the_cost_formula() {
    let f = Fleet::start(
        vec![
            BackendSpec::new("ant", "anthropic", "claude", &ANTHROPIC.spec()),
            BackendSpec::new("oai", "openai", "gpt", &OPENAI.spec()),
        ],
        2,
    );
    // Anthropic: write (1h + 5m), read, streamed read, streamed partial write.
    for (i, (last, stream)) in [
        ("go", false),
        ("go on", false),
        ("stream it", true),
        ("stream more please", true),
    ]
    .into_iter()
    .enumerate()
    {
        let res = f.messages(i % 2, &anthropic_body(last, stream), &[]).await;
        let status = res.status();
        let text = res.text().await.expect("body");
        assert_eq!(status, 200, "{text}\n{}", f.logs());
    }
    // OpenAI chat: plain (prefix written), streamed without asking for usage
    // (the proxy must still count it), streamed with usage.
    for (i, (last, stream, include)) in [
        ("second question", false, false),
        ("third question", true, false),
        ("fourth question", true, true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut body = chat_body(last, stream);
        if include {
            body["stream_options"] = json!({"include_usage": true});
        }
        let res = f.post_openai(i % 2, "chat/completions", &body, &[]).await;
        let status = res.status();
        let text = res.text().await.expect("body");
        assert_eq!(status, 200, "{text}\n{}", f.logs());
        if stream && !include {
            assert!(
                !text.contains("\"usage\":{"),
                "the injected usage chunk must stay invisible: {text}"
            );
        }
    }
    // Responses: plain, streamed, and a continuation (cached conversation).
    let res = f
        .post_openai(
            0,
            "responses",
            &json!({"model": "gpt", "input": "what is new"}),
            &[],
        )
        .await;
    assert_eq!(res.status(), 200, "{}", f.logs());
    let first: Value = res.json().await.expect("JSON");
    let res = f
        .post_openai(
            1,
            "responses",
            &json!({"model": "gpt", "instructions": "be brief", "input": "stream this", "stream": true}),
            &[],
        )
        .await;
    assert_eq!(res.status(), 200, "{}", f.logs());
    let _ = res.text().await.expect("stream body");
    let res = f
        .post_openai(
            1,
            "responses",
            &json!({"model": "gpt", "input": "and then", "previous_response_id": first["id"]}),
            &[],
        )
        .await;
    assert_eq!(res.status(), 200, "{}", f.logs());
    let cont: Value = res.json().await.expect("JSON");
    assert!(cont["usage"]["input_tokens_details"]["cached_tokens"].as_u64() > Some(0));

    let (ant, oai) = (f.mocks[0].totals(), f.mocks[1].totals());
    assert!(
        ant.cache_read_tokens > 0 && ant.cache_write_5m_tokens > 0 && ant.cache_write_1h_tokens > 0,
        "{ant:?}"
    );
    assert!(oai.cache_read_tokens > 0, "{oai:?}");
    let want = (
        ant.prompt_tokens + oai.prompt_tokens,
        ant.completion_tokens_sent + oai.completion_tokens_sent,
        ant.cache_read_tokens + oai.cache_read_tokens,
        ant.cache_write_tokens() + oai.cache_write_tokens(),
    );
    let want_cost = ANTHROPIC.cost(&ant) + OPENAI.cost(&oai);
    // Usage reaches the control plane in batches: poll (gently, clawctl is
    // a process) until it matches or times out.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut last;
    let matched = loop {
        last = cp_usage(&f);
        if last.is_some_and(|(p, c, r, w, _)| (p, c, r, w) == want) {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        matched,
        "stats total (prompt, completion, cache_read, cache_write, cost) = {last:?}, \
         the mocks reported {want:?} (anthropic {ant:?}, openai {oai:?})"
    );
    let cost = last.map_or(f64::NAN, |l| l.4);
    assert!(
        (cost - want_cost).abs() <= want_cost * 1e-9,
        "cost {cost} != formula {want_cost} (anthropic {ant:?}, openai {oai:?})"
    );
}

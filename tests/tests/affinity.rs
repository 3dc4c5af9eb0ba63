//! Session affinity across the fleet (issue 12), through two proxies and
//! three `api: anthropic` backends, each its own mock provider account with
//! its own simulated prompt cache:
//! - one session (`x-claw-session-key`) lands on one backend whichever proxy
//!   serves it, and its cache reads follow (every request after the first
//!   reads the cached system prompt);
//! - twenty sessions spread over at least two backends, each one staying put
//!   across proxies;
//! - a cooling first choice (it answers 429) moves the session to the same
//!   second choice on both proxies, and both count it in
//!   `claw_dp_affinity_total` (moved, by reason).

use crate::data_plane_support::*;
use claw_tests::mock::Action;
use serde_json::{Value, json};

fn fleet() -> Fleet {
    Fleet::start(
        (0..3)
            .map(|i| BackendSpec::new(&format!("ant-{i}"), "anthropic", "claude", ""))
            .collect(),
        2,
    )
}

/// A Messages body whose 30-word system prompt is a cache breakpoint.
fn body(turn: usize) -> String {
    let system: Vec<String> = (0..30).map(|i| format!("rule{i}")).collect();
    json!({
        "model": "claude",
        "max_tokens": 4,
        "system": [{"type": "text", "text": system.join(" "),
                    "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": format!("turn {turn}")}],
    })
    .to_string()
}

/// Sends one turn of `session` through `proxy`; returns the backend that
/// answered and the response's usage.
async fn turn(f: &Fleet, proxy: usize, session: &str, n: usize) -> (usize, Value) {
    let before = f.ok_counts();
    let res = f
        .messages(proxy, &body(n), &[("x-claw-session-key", session)])
        .await;
    let status = res.status();
    let text = res.text().await.expect("body");
    assert_eq!(status, 200, "{text}\n{}", f.logs());
    let v: Value = serde_json::from_str(&text).expect("JSON");
    (f.served_by(&before), v["usage"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_one_backend_across_proxies_and_its_cache_reads_follow() {
    let f = fleet();
    let (home, first) = turn(&f, 0, "session-a", 0).await;
    assert_eq!(first["cache_creation_input_tokens"], 30, "{first}");
    for n in 1..6 {
        let (b, usage) = turn(&f, n % 2, "session-a", n).await;
        assert_eq!(b, home, "turn {n} via proxy {} moved the session", n % 2);
        assert_eq!(usage["cache_read_input_tokens"], 30, "turn {n}: {usage}");
        assert_eq!(usage["cache_creation_input_tokens"], 0, "turn {n}: {usage}");
    }

    // Different sessions spread, and each stays put across proxies.
    let mut used = std::collections::BTreeSet::new();
    for s in 0..20 {
        let session = format!("spread-{s}");
        let (a, _) = turn(&f, 0, &session, 0).await;
        let (b, _) = turn(&f, 1, &session, 1).await;
        assert_eq!(a, b, "{session}: proxy 0 chose {a}, proxy 1 chose {b}");
        used.insert(a);
    }
    assert!(
        used.len() >= 2,
        "20 sessions all landed on backend(s) {used:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooling_first_choice_moves_the_session_to_the_same_second_choice_everywhere() {
    let f = fleet();
    let (first, _) = turn(&f, 0, "session-c", 0).await;
    let (again, _) = turn(&f, 1, "session-c", 1).await;
    assert_eq!(first, again);

    // The first choice now answers 429 (a transient limit, not a spent quota).
    f.mocks[first].set_always(Some(Action::rate_limited(Some(30))));
    let (second_a, _) = turn(&f, 0, "session-c", 2).await;
    let (second_b, _) = turn(&f, 1, "session-c", 3).await;
    assert_ne!(second_a, first);
    assert_eq!(
        second_a, second_b,
        "both proxies must fall to the same second choice"
    );
    // And it stays there while the first choice cools; its cache follows.
    for n in 4..8 {
        let (b, usage) = turn(&f, n % 2, "session-c", n).await;
        assert_eq!(b, second_a, "turn {n}");
        assert_eq!(usage["cache_read_input_tokens"], 30, "turn {n}: {usage}");
    }
    f.mocks[first].set_always(None);

    // Both proxies count the move, by reason, beside the kept attempts.
    for p in &f.proxies {
        let metrics = f
            .http
            .get(format!("{}/metrics", p.url()))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text");
        let series: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("claw_dp_affinity_total{"))
            .collect();
        assert!(
            series.iter().any(|l| l.contains("outcome=\"kept\"")),
            "{}: no kept affinity in {series:#?}",
            p.node_id()
        );
        assert!(
            series.iter().any(|l| l.contains("outcome=\"moved\"")
                && ["cooling", "rate_limited"]
                    .iter()
                    .any(|r| l.contains(&format!("reason=\"{r}\"")))),
            "{}: the move off the cooling backend is not counted by reason in {series:#?}",
            p.node_id()
        );
    }
}

//! The shipped monitoring (deploy/monitoring/) uses only metrics our
//! binaries serve: every metric name in an alert expression of `rules.yaml`
//! and in a query of `grafana-dashboard.json` appears on the `/metrics` of a
//! running proxy or control plane, after traffic that makes the event-driven
//! series exist (a 429 and its retry, a streamed answer, heartbeat runs,
//! report batches).
//!
//! `deploy/monitoring/check.sh` checks the same names against the sources
//! and runs promtool on the rules.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::data_plane_support::*;
use claw_tests::mock::Action;

/// The repository's `deploy/monitoring/`.
fn monitoring_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

/// Metric names in PromQL: label matchers (`{…}`) and `by`/`without`/`on`/
/// `ignoring` label lists removed first, so label names (`le`,
/// `gen_ai_request_model`) are not taken for metrics.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Braces, innermost first (annotations' `{{ … }}` templates too).
    let mut s = expr.to_string();
    while let Some(close) = s.find('}') {
        let Some(open) = s[..close].rfind('{') else {
            s.replace_range(..=close, " ");
            continue;
        };
        s.replace_range(open..=close, " ");
    }
    let mut out = BTreeSet::new();
    let mut skip_list = false;
    let mut rest = s.as_str();
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '(') {
        rest = &rest[start..];
        if let Some(after) = rest.strip_prefix('(') {
            if skip_list {
                // A label list: skip to its `)`.
                let end = after.find(')').map_or(after.len(), |i| i + 1);
                rest = &after[end..];
                skip_list = false;
            } else {
                rest = after;
            }
            continue;
        }
        let end = rest.find(|c: char| !word_char(c)).unwrap_or(rest.len());
        let word = &rest[..end];
        rest = &rest[end..];
        skip_list = matches!(
            word,
            "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
        );
        if word.starts_with("claw_") || word.starts_with("gen_ai_") {
            out.insert(word.to_string());
        }
    }
    out
}

/// Every metric name the rules and the dashboard use, with where.
fn used_metrics() -> BTreeMap<String, &'static str> {
    let dir = monitoring_dir();
    let rules = std::fs::read_to_string(dir.join("rules.yaml")).expect("read rules.yaml");
    let rules: String = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut used: BTreeMap<String, &'static str> = metric_names(&rules)
        .into_iter()
        .map(|n| (n, "rules.yaml"))
        .collect();
    let dash = std::fs::read_to_string(dir.join("grafana-dashboard.json"))
        .expect("read grafana-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&dash).expect("the dashboard is JSON");
    let mut stack = vec![&dash];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Object(m) => {
                for key in ["expr", "definition"] {
                    if let Some(q) = m.get(key).and_then(|q| q.as_str()) {
                        for n in metric_names(q) {
                            used.entry(n).or_insert("grafana-dashboard.json");
                        }
                    }
                }
                stack.extend(m.values());
            }
            serde_json::Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    used
}

/// The metric names of a Prometheus text page (`name{…} v` / `name v`).
fn served(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn metric_names_skip_labels_and_templates() {
    let got = metric_names(
        r#"histogram_quantile(0.9, sum by (le, gen_ai_request_model) (rate(claw_x_bucket{a="b",c=~"claw_no"}[5m]))) > 1 and on (job) claw_y unless max(claw_z) {{ $labels.claw_w }}"#,
    );
    let want: BTreeSet<String> = ["claw_x_bucket", "claw_y", "claw_z"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_dashboard_use_is_served() {
    let used = used_metrics();
    assert!(
        used.len() > 20,
        "too few metric names found in deploy/monitoring: {used:?}"
    );

    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    let proxy = c.proxy();
    // An agent whose heartbeats run every second (they fail: the control
    // plane has no heartbeat proxy here, which is enough for the series).
    c.cp.clawctl_stdin(
        &[
            "agent",
            "add",
            "monitoring-agent",
            "--model",
            CHAT,
            "--interval",
            "1s",
            "--checklist-file",
            "-",
        ],
        "- [ ] check the disk\n",
    )
    .assert_ok();
    // A 429 from the primary (it cools, the retry goes to the fallback),
    // a plain and a streamed answer.
    c.primary.push(Action::rate_limited(Some(30)));
    for stream in [false, false, true] {
        let res = c
            .post(proxy, "chat/completions", &chat_body(CHAT, stream))
            .await;
        assert_eq!(res.status(), 200);
        let _ = res.bytes().await;
    }

    let urls = [
        format!("{}/metrics", proxy.url()),
        format!("{}/metrics", c.cp.http_url()),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut have = BTreeSet::new();
        let mut pages = String::new();
        for url in &urls {
            let res = c
                .http
                .get(url)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            assert_eq!(res.status(), 200, "GET {url}");
            let text = res.text().await.expect("a text body");
            have.extend(served(&text));
            pages.push_str(&format!("--- {url} ---\n{text}\n"));
        }
        let missing: Vec<String> = used
            .iter()
            .filter(|(n, _)| !have.contains(*n))
            .map(|(n, w)| format!("{n} ({w})"))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deploy/monitoring uses metrics neither server serves: {missing:?}\n{pages}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

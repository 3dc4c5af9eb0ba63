//! Both servers' `/metrics` pass `promtool check metrics` (HELP and TYPE on
//! every metric) and carry `claw_build_info` and the process metrics; the
//! proxy's joins backend ids to names in `claw_backend_info`.
//!
//! Needs `promtool` on `PATH` (Debian: `apt-get install prometheus`); without
//! it the test fails rather than skipping.

use crate::data_plane_support::*;
use claw_tests::mock::Action;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `promtool check metrics` on `text` (stdin); returns its exit success
/// and everything it printed.
pub(crate) fn promtool_check(text: &str) -> (bool, String) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`promtool` is not on PATH: install it (Debian: `apt-get install prometheus`, \
             which provides /usr/bin/promtool)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

/// What is wrong with one server's `/metrics`: what `promtool check
/// metrics` printed (or its failing exit) and a missing
/// `claw_build_info{version="…"} 1`; empty when nothing is.
fn problems(server: &str, text: &str) -> String {
    let mut found = String::new();
    let (ok, printed) = promtool_check(text);
    if !ok || !printed.trim().is_empty() {
        found.push_str(&format!(
            "`promtool check metrics` on the {server}'s /metrics (exit ok: {ok}):\n{printed}\n"
        ));
    }
    let version = format!(
        "claw_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    if !text.lines().any(|l| l == version) {
        found.push_str(&format!("no `{version}` on the {server}'s /metrics\n"));
    }
    for name in PROCESS_METRICS {
        let sample = text.lines().any(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
                // CPU time may still be 0 ticks in a process this young.
                .is_some_and(|v| v > 0.0 || (v == 0.0 && name == "process_cpu_seconds_total"))
        });
        if !sample || !text.contains(&format!("# HELP {name} ")) {
            found.push_str(&format!(
                "no `{name}` (with HELP and a value) on the {server}'s /metrics\n"
            ));
        }
    }
    if !found.is_empty() {
        found.push_str(&format!("--- the {server}'s /metrics ---\n{text}\n"));
    }
    found
}

/// The process metrics both servers export.
const PROCESS_METRICS: [&str; 4] = [
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
];

async fn get_text(c: &Cluster, url: &str) -> String {
    let res = c
        .http
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(res.status(), 200, "GET {url}");
    res.text().await.expect("a text body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_servers_metrics_pass_promtool_check_metrics() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    let proxy = c.proxy();
    // A 429 from the primary (it cools, the fallback answers), then a plain
    // chat completion: the request, attempt, retry, cooldown and gen_ai
    // series exist.
    c.primary.push(Action::rate_limited(Some(30)));
    for _ in 0..2 {
        let res = c.chat(proxy, CHAT).await;
        assert_eq!(res.status(), 200);
    }
    assert_eq!(c.primary.totals().http_errors, 1);

    let proxy_url = format!("{}/metrics", proxy.url());
    let cp_url = format!("{}/metrics", c.cp.http_url());
    // The control plane has the reported events once the report stream
    // delivered them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let cp_text = loop {
        let text = get_text(&c, &cp_url).await;
        if text.contains("claw_cp_report_events_total{kind=\"rate_limited\"}") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the control plane never counted the 429:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dp_text = get_text(&c, &proxy_url).await;
    for name in [
        "claw_dp_requests_total",
        "claw_dp_upstream_attempts_total",
        "claw_dp_cooldowns_active",
        "gen_ai_server_request_duration_seconds",
    ] {
        assert!(dp_text.contains(name), "no {name} on the proxy:\n{dp_text}");
    }
    // Both backends, by id and name; a removed backend's series goes.
    let info = |text: &str, name: &str, pool: &str| {
        text.lines().any(|l| {
            l.starts_with("claw_backend_info{backend_id=\"be_")
                && l.contains(&format!("backend=\"{name}\""))
                && l.contains(&format!("pool=\"{pool}\""))
                && l.contains("api=\"openai\"")
                && l.ends_with("} 1")
        })
    };
    assert!(info(&dp_text, "primary", "primary"), "{dp_text}");
    assert!(info(&dp_text, "fallback", "fallback"), "{dp_text}");
    c.cp.clawctl(&["backend", "rm", "fallback"]).assert_ok();
    c.wait_synced();
    let after = get_text(&c, &proxy_url).await;
    assert!(info(&after, "primary", "primary"), "{after}");
    assert!(
        !after.contains("backend=\"fallback\""),
        "a removed backend's claw_backend_info stays:\n{after}"
    );
    let found = problems("proxy", &dp_text) + &problems("control plane", &cp_text);
    assert!(found.is_empty(), "{found}");
}

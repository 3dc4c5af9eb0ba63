//! Issue 16, attribution: what heartbeats cost, told apart from the
//! agent's own conversations. The real control plane schedules an agent's
//! heartbeats through a real proxy (`x-claw-run-kind: heartbeat`,
//! `x-claw-run-id`); the same agent id also talks through the proxy on its
//! own. `clawctl stats total --kind heartbeat` must equal, to the request
//! and the token, what the mock upstream saw of the heartbeat runs;
//! `--kind interactive` the rest (an unknown `x-claw-run-kind` included);
//! no `--kind` the sum. The buckets survive a backup, a restore and the
//! offline check.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use claw_proto::v1::stats_service_client::StatsServiceClient;
use claw_proto::v1::{GetUsageTotalsRequest, UsageFilter};
use claw_tests::harness::heartbeat::{
    add_agent, add_backend_with_key, add_client_key, runs, start_heartbeat_proxy, wait_runs,
};
use claw_tests::harness::{ControlPlane, Forwarder, binary_path, offline_check};
use claw_tests::mock::{Action, MockConfig, MockUpstream, RecordedRequest};
use serde_json::Value;

const UPSTREAM_KEY: &str = "sk-test-key-0123456789";
const WAIT: Duration = Duration::from_secs(45);

/// A number in `-o json` output (u64 fields may be strings).
fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .or_else(|| v[k].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// `(requests, prompt, completion, total)` of a usage row.
fn usage(v: &Value) -> (u64, u64, u64, u64) {
    (
        num(v, "requests"),
        num(v, "prompt_tokens"),
        num(v, "completion_tokens"),
        num(v, "total_tokens"),
    )
}

/// The same four over what the mock saw.
fn seen<'a>(reqs: impl IntoIterator<Item = &'a RecordedRequest>) -> (u64, u64, u64, u64) {
    reqs.into_iter().fold((0, 0, 0, 0), |(n, p, c, t), r| {
        (
            n + 1,
            p + r.prompt_tokens,
            c + r.completion_tokens_sent,
            t + r.prompt_tokens + r.completion_tokens_sent,
        )
    })
}

fn is_heartbeat(r: &RecordedRequest) -> bool {
    r.header("x-claw-run-kind") == Some("heartbeat")
}

/// `stats VERB [--kind KIND] -o json`, summed when it lists rows.
fn stats(cp: &ControlPlane, verb: &str, kind: Option<&str>) -> Option<(u64, u64, u64, u64)> {
    let mut args = vec!["stats", verb, "-o", "json"];
    if let Some(k) = kind {
        args.extend(["--kind", k]);
    }
    let out = cp.clawctl(&args);
    if !out.success() {
        return None;
    }
    let v = out.json();
    Some(match v.as_array() {
        None => usage(&v),
        Some(rows) => rows.iter().fold((0, 0, 0, 0), |(n, p, c, t), r| {
            let (n2, p2, c2, t2) = usage(&r["totals"]);
            (n + n2, p + p2, c + c2, t + t2)
        }),
    })
}

/// Polls until `stats total` by kind equals the mock's record (read anew
/// each time, so a run finishing meanwhile is waited for, not raced).
fn wait_for_attribution(cp: &ControlPlane, upstream: &MockUpstream) -> (u64, u64, u64, u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let reqs = upstream.requests();
        let hb = seen(reqs.iter().filter(|r| is_heartbeat(r)));
        let inter = seen(reqs.iter().filter(|r| !is_heartbeat(r)));
        let all = seen(&reqs);
        let got = (
            stats(cp, "total", Some("heartbeat")),
            stats(cp, "total", Some("interactive")),
            stats(cp, "total", None),
        );
        if got == (Some(hb), Some(inter), Some(all)) {
            return hb;
        }
        assert!(
            Instant::now() < deadline,
            "stats by kind (heartbeat, interactive, all) {got:?} != the mock's {:?}\n{}",
            (hb, inter, all),
            cp.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_by_kind_tell_heartbeat_runs_from_the_agents_own_traffic() {
    let upstream = MockUpstream::start(MockConfig::default().name("m").api_key(UPSTREAM_KEY)).await;
    upstream.set_always(Some(Action::reply("HEARTBEAT_OK")));
    let fwd = Forwarder::start().await;
    let mut cp = ControlPlane::builder().heartbeats_through(&fwd).start();
    add_backend_with_key(&cp, "m", &upstream.url(), UPSTREAM_KEY, "m-hb", &[]);
    let secret = add_client_key(&cp, "chat-app", &["--agents", "agent-h"]);
    let proxy = start_heartbeat_proxy(&cp, &fwd);

    // Heartbeats first (a conversation would make the agent busy), then
    // stopped, then the same agent id on its own.
    add_agent(
        &cp,
        "agent-h",
        "m-hb",
        &["--interval", "2s"],
        "- [ ] check the queue\n",
    );
    wait_runs(
        &cp,
        "agent-h",
        "two heartbeats",
        WAIT,
        Duration::from_millis(200),
        |r| (r.iter().filter(|r| r["status"] == "suppressed").count() >= 2).then_some(()),
    )
    .await;
    cp.clawctl(&["agent", "disable", "agent-h"]).assert_ok();

    let client = reqwest::Client::new();
    for kind in [None, Some("interactive"), Some("nightly-batch")] {
        let mut req = client
            .post(format!("{}/chat/completions", proxy.openai_url()))
            .bearer_auth(&secret)
            .header("x-claw-agent-id", "agent-h")
            .json(&serde_json::json!({
                "model": "m-hb",
                "messages": [{"role": "user", "content": "what is on my board today?"}]
            }));
        if let Some(k) = kind {
            req = req.header("x-claw-run-kind", k);
        }
        let status = req.send().await.expect("proxy answers").status();
        assert_eq!(status, 200, "run kind {kind:?}");
    }

    let hb = wait_for_attribution(&cp, &upstream);
    assert!(hb.0 >= 2, "the heartbeat runs were counted: {hb:?}");
    assert!(hb.1 > 0 && hb.2 > 0, "with their tokens: {hb:?}");
    let reqs = upstream.requests();
    assert_eq!(
        reqs.iter().filter(|r| !is_heartbeat(r)).count(),
        3,
        "an unknown run kind is interactive"
    );
    // Every heartbeat request names its run, and only runs of the log.
    let logged: BTreeSet<String> = runs(&cp, "agent-h")
        .iter()
        .filter_map(|r| r["run_id"].as_str().map(str::to_string))
        .collect();
    for r in reqs.iter().filter(|r| is_heartbeat(r)) {
        let id = r.header("x-claw-run-id").unwrap_or_default();
        assert!(logged.contains(id), "run id {id:?} not in {logged:?}");
        assert_eq!(r.header("x-claw-agent-id"), Some("agent-h"));
    }
    // The hourly and daily lists honour the kind as the totals do.
    for verb in ["hourly", "daily"] {
        assert_eq!(stats(&cp, verb, Some("heartbeat")), Some(hb), "{verb}");
    }
    let agent_hb = cp
        .clawctl(&[
            "stats",
            "total",
            "--agent",
            "agent-h",
            "--kind",
            "heartbeat",
            "-o",
            "json",
        ])
        .assert_ok()
        .json();
    assert_eq!(usage(&agent_hb), hb, "kind and agent filters combine");

    // The proxy counts requests by kind, and the unknown kind once.
    let metrics = reqwest::get(format!("{}/metrics", proxy.url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("claw_dp_run_kind_requests_total{kind=\"heartbeat\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(
        counted.is_some_and(|n| n >= hb.0),
        "{counted:?} < {hb:?}\n{metrics}"
    );
    assert!(
        metrics.contains("claw_dp_run_kind_unrecognized_total 1"),
        "{metrics}"
    );

    // A bogus kind: one line from clawctl, InvalidArgument from the server.
    for verb in ["total", "hourly", "daily"] {
        let out = cp
            .clawctl(&["stats", verb, "--kind", "cron"])
            .assert_err_contains("--kind: must be heartbeat or interactive");
        assert_eq!(out.stderr.trim().lines().count(), 1, "{out}");
    }
    let channel = tonic::transport::Endpoint::from_shared(cp.grpc_url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut req = tonic::Request::new(GetUsageTotalsRequest {
        filter: Some(UsageFilter {
            kind: "cron".into(),
            ..Default::default()
        }),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", cp.admin_token())
            .parse()
            .expect("ascii token"),
    );
    let err = StatsServiceClient::new(channel)
        .get_usage_totals(req)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("filter.kind"), "{err:?}");

    // The dashboard's usage series take the same kind.
    let dashboard = |query: &'static str| {
        let url = format!("{}/api/v1/usage?{query}", cp.http_url());
        let token = cp.admin_token().to_string();
        async move {
            let res = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("dashboard answers");
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap_or_default())
        }
    };
    let (status, body) = dashboard("group_by=agent&kind=heartbeat").await;
    assert_eq!(status, 200, "{body}");
    let requests: u64 = body["series"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["group"] == "agent-h")
        .flat_map(|s| s["points"].as_array().cloned().unwrap_or_default())
        .map(|p| p["requests"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(requests, hb.0, "{body}");
    let (status, body) = dashboard("kind=cron").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("filter.kind:")),
        "{body}"
    );

    // Backup, restore and the offline check accept the new buckets, and the
    // restored history answers by kind alike.
    let work = tempfile::tempdir().expect("tempdir");
    let file = work.path().join("claw.bak");
    cp.clawctl(&["backup", "create", &file.display().to_string()])
        .assert_ok();
    drop(proxy);
    cp.stop_clean();
    let check = |dir: &std::path::Path| {
        let out = offline_check(dir, cp.master_key());
        assert!(
            out.status.success(),
            "check {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    check(cp.data_dir());
    let restored = work.path().join("restored");
    let out = Command::new(binary_path("claw-control-plane"))
        .args(["restore", "--from"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&restored)
        .output()
        .expect("restore runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check(&restored);
    let cp2 = ControlPlane::builder()
        .master_key(cp.master_key())
        .data_dir(&restored)
        .start();
    assert_eq!(stats(&cp2, "total", Some("heartbeat")), Some(hb));
    let all = seen(&reqs);
    assert_eq!(stats(&cp2, "total", None), Some(all));
}

/// Buckets written before run kinds existed (keys ending after the agent)
/// are read as interactive, untouched: `--kind interactive` counts them,
/// `--kind heartbeat` does not, and the offline check still passes.
#[test]
fn buckets_stored_before_run_kinds_read_as_interactive() {
    use claw_control_plane::store::sled::SledStore;
    use claw_control_plane::store::{Rollback, Store as _, Tree};
    use prost::Message as _;

    let mut cp = ControlPlane::start();
    cp.stop_clean();
    let field = |k: &mut Vec<u8>, f: &str| {
        k.extend_from_slice(&(f.len() as u16).to_be_bytes());
        k.extend_from_slice(f.as_bytes());
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as u64;
    let (hour, day) = (
        now_ms / 3_600_000 * 3_600_000,
        now_ms / 86_400_000 * 86_400_000,
    );
    let dims = |k: &mut Vec<u8>| {
        for f in ["be_old", "m-old", "ck_old", "agent-old"] {
            field(k, f);
        }
    };
    let mut hourly = hour.to_be_bytes().to_vec();
    dims(&mut hourly);
    let mut daily = day.to_be_bytes().to_vec();
    field(&mut daily, "primary");
    dims(&mut daily);
    let value = claw_proto::v1::UsageTotals {
        requests: 5,
        prompt_tokens: 50,
        completion_tokens: 7,
        total_tokens: 57,
        ..Default::default()
    }
    .encode_to_vec();
    {
        let store = SledStore::open(cp.data_dir()).expect("store opens");
        let written = store
            .transaction(&[Tree::UsageHourly, Tree::UsageDaily], &|txn| {
                txn.insert(Tree::UsageHourly, &hourly, &value)
                    .map_err(|_| Rollback)?;
                txn.insert(Tree::UsageDaily, &daily, &value)
                    .map_err(|_| Rollback)?;
                Ok(())
            })
            .expect("transaction");
        assert!(written);
        futures::executor::block_on(store.flush()).expect("flush");
    }
    cp.restart();
    let old = Some((5, 50, 7, 57));
    for verb in ["total", "hourly", "daily"] {
        assert_eq!(stats(&cp, verb, None), old, "{verb}");
        assert_eq!(stats(&cp, verb, Some("interactive")), old, "{verb}");
        assert_eq!(
            stats(&cp, verb, Some("heartbeat")),
            Some((0, 0, 0, 0)),
            "{verb}"
        );
    }
    cp.stop_clean();
    let out = offline_check(cp.data_dir(), cp.master_key());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

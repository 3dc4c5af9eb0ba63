//! Configuration distribution with real processes: a change made with
//! `clawctl` reaches both proxies and is ACKed; proxies outlive a crashed
//! control plane on their last snapshot and catch up when it returns.

use crate::data_plane_support::*;
use claw_tests::harness::wait_until_async;
use claw_tests::mock::{MockConfig, MockUpstream};
use std::time::Duration;

/// Waits until every proxy lists `model`.
async fn wait_for_model(c: &Cluster, model: &str) {
    for p in &c.proxies {
        assert!(
            wait_until_async(SYNC_TIMEOUT, || async {
                model_ids(c, p).await.iter().any(|m| m == model)
            })
            .await,
            "proxy {} never listed {model}; it lists {:?}",
            p.node_id(),
            model_ids(c, p).await
        );
    }
}

/// Adds a backend on a new mock serving canonical `model`.
fn add_model(c: &Cluster, name: &str, model: &str) -> MockUpstream {
    let up = MockUpstream::start_blocking(MockConfig::default().name(name).api_key("sk-new"));
    add_backend(
        &c.cp,
        name,
        &up.url(),
        "sk-new",
        &[
            "--rpm",
            "100000",
            "--model",
            &format!("{model}=native-{model}"),
        ],
    );
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_reaches_both_proxies_and_is_acked() {
    let c = Cluster::start();
    let before = c.config_version();
    let up = add_model(&c, "new-backend", "fresh-model");
    let version = c.config_version();
    assert!(version > before);

    wait_for_model(&c, "fresh-model").await;
    // `clawctl proxies` shows both node ids at the current version.
    assert_eq!(c.wait_synced(), version);
    let proxies = c.cp.clawctl(&["proxies", "-o", "json"]).assert_ok().json();
    for p in &c.proxies {
        let row = proxies
            .as_array()
            .and_then(|l| l.iter().find(|r| r["node_id"] == p.node_id()))
            .unwrap_or_else(|| panic!("{} missing from {proxies}", p.node_id()));
        assert_eq!(row["acked_version"].as_u64(), Some(version), "{row}");
        assert!(
            row["last_nack_reason"].as_str().unwrap_or("").is_empty(),
            "{row}"
        );
    }
    let table = c.cp.clawctl(&["proxies"]).assert_ok().stdout;
    for p in &c.proxies {
        assert!(table.contains(p.node_id()), "{table}");
    }

    for p in &c.proxies {
        let res = c.chat(p, "fresh-model").await;
        assert_eq!(res.status(), 200);
    }
    let seen = up.wait_for_requests(2, Duration::from_secs(5)).await;
    assert!(
        seen.iter()
            .all(|r| r.model.as_deref() == Some("native-fresh-model"))
    );

    // A removal travels the same way: the model is gone everywhere.
    c.cp.clawctl(&["backend", "rm", "new-backend"]).assert_ok();
    c.wait_synced();
    for p in &c.proxies {
        assert_eq!(c.chat(p, "fresh-model").await.status(), 404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_outlive_a_killed_control_plane_and_catch_up_when_it_returns() {
    let mut c = Cluster::start();
    // Both serve before the crash (a proxy holds its requests until the
    // control plane has sent its first rate shares).
    for p in &c.proxies {
        assert_eq!(c.chat(p, CHAT).await.status(), 200, "via {}", p.node_id());
    }
    c.cp.kill9();

    // Both keep answering from their last snapshot (and stay ready), also
    // once they have noticed the stream is gone.
    for round in 0..2 {
        for p in &c.proxies {
            assert!(
                p.is_ready(),
                "{} not ready without a control plane",
                p.node_id()
            );
            let res = c.chat(p, CHAT).await;
            assert_eq!(res.status(), 200, "round {round} via {}", p.node_id());
        }
        if round == 0 {
            for p in &c.proxies {
                assert!(
                    wait_until_async(Duration::from_secs(15), || async {
                        let logs = p.logs();
                        logs.contains("discovery stream failed")
                            || logs.contains("discovery stream closed")
                    })
                    .await,
                    "{} never noticed the control plane was gone:\n{}",
                    p.node_id(),
                    p.logs()
                );
            }
        }
    }

    // Back on the same ports with the same data; a change made now reaches
    // both proxies once they have reconnected.
    c.cp.restart();
    let _up = add_model(&c, "after-restart", "late-model");
    wait_for_model(&c, "late-model").await;
    c.wait_synced();
    for p in &c.proxies {
        assert_eq!(c.chat(p, "late-model").await.status(), 200);
        assert_eq!(c.chat(p, CHAT).await.status(), 200);
    }
}

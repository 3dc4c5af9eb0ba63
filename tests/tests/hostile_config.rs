//! Hostile configuration (issue 17 items 2 and 10), with the real binaries:
//!
//! - Every bad base URL of the issue (a space, CR/LF, `http:///v1`, a
//!   100 KB path) is refused by `clawctl backend add` and by `apply`, naming
//!   `base_url`, and nothing is stored.
//! - A bad backend that is in the store anyway (written straight into a
//!   stopped control plane's store, as an older build could have let in) no
//!   longer freezes the fleet: every proxy leaves it out, applies the rest (a
//!   revoked key stops working, a new key works) and ACKs, and `clawctl
//!   proxies` shows what was left out, enabled or disabled.
//! - A 15 KB name gets a clean, bounded error (not a broken gRPC trailer);
//!   a label with ESC/CR/LF is refused naming `label`.
//! - A NACK reason shown by `clawctl proxies` is cleared by the next ACK.

use std::time::Duration;

use claw_control_plane::catalog::records::{self, BackendRecord};
use claw_control_plane::store::sled::SledStore;
use claw_control_plane::store::{Rollback, Store as _, Tree};
use claw_tests::harness::{
    ControlPlane, Forwarder, Proxy, ProxyBuilder, wait_until, wait_until_async,
};
use claw_tests::mock::{MockConfig, MockUpstream};
use prost::Message as _;
use serde_json::Value;

use crate::data_plane_support::{acked_versions, add_backend, chat_body, config_version};

const UPSTREAM_KEY: &str = "sk-up-hostile-0123456789";
const WAIT: Duration = Duration::from_secs(30);

/// The base URLs of issue 17 item 2 that every proxy used to reject.
fn bad_urls() -> Vec<(&'static str, String)> {
    vec![
        ("a space", "http://api.example.com/v 1".to_string()),
        (
            "CR/LF",
            "http://api.example.com/v1\r\nX-Injected: 1".to_string(),
        ),
        ("no host", "http:///v1".to_string()),
        (
            "a 100 KB path",
            format!("http://api.example.com/{}", "a".repeat(100 * 1024)),
        ),
    ]
}

fn backend_names(cp: &ControlPlane) -> Vec<String> {
    cp.clawctl(&["backend", "list", "-o", "json"])
        .assert_ok()
        .json()
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|b| b["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn bad_base_urls_are_refused_by_backend_add_and_apply_naming_the_field() {
    let cp = ControlPlane::start();
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, url) in bad_urls() {
        let out = cp.clawctl_with_env(
            &[
                "backend",
                "add",
                "bad",
                "--url",
                url.as_str(),
                "--api-key-env",
                "K",
                "--model",
                "m",
            ],
            &[("K", UPSTREAM_KEY)],
        );
        let out = out.assert_err_contains("base_url");
        assert!(
            out.stderr.len() < 1024 && out.stderr.trim().lines().count() == 1,
            "{what}: one short line, got {:?}",
            out.stderr
        );
        // The same through a document (YAML double quotes carry CR/LF).
        let escaped = url.replace('\r', "\\r").replace('\n', "\\n");
        let doc = format!(
            "backends:\n  - name: bad\n    base_url: \"{escaped}\"\n    api_key_env: K\n    models: [{{canonical: m}}]\n"
        );
        let path = dir.path().join("doc.yaml");
        std::fs::write(&path, doc).expect("write doc");
        let path = path.display().to_string();
        cp.clawctl_with_env(&["apply", "-f", path.as_str()], &[("K", UPSTREAM_KEY)])
            .assert_err_contains("base_url");
        assert!(backend_names(&cp).is_empty(), "{what}: nothing stored");
    }
    // A valid one still goes in.
    add_backend(&cp, "good", "http://127.0.0.1:9/v1", UPSTREAM_KEY, &[]);
    assert_eq!(backend_names(&cp), ["good"]);
}

#[test]
fn a_15_kb_name_and_control_characters_in_labels_get_clean_errors() {
    let cp = ControlPlane::start();
    let long = "n".repeat(15 * 1024);
    let out = cp
        .clawctl_with_env(
            &[
                "backend",
                "add",
                long.as_str(),
                "--url",
                "http://127.0.0.1:9/v1",
                "--api-key-env",
                "K",
            ],
            &[("K", UPSTREAM_KEY)],
        )
        .assert_err_contains("name");
    assert!(
        out.stderr.len() < 1024,
        "bounded: {} bytes",
        out.stderr.len()
    );
    assert!(!out.stderr.contains("h2 protocol error"), "{}", out.stderr);
    for args in [
        vec!["backend", "get", long.as_str()],
        vec!["key", "rm", long.as_str()],
        vec!["agent", "get", long.as_str()],
    ] {
        let out = cp.clawctl(&args).assert_err();
        assert!(
            out.stderr.len() < 1024 && out.stderr.contains("not found")
                || out.stderr.contains("name"),
            "{:?}: {}",
            &args[..2],
            &out.stderr[..out.stderr.len().min(600)]
        );
    }
    // ESC/CR/LF in a label: refused, naming the field; nothing stored.
    for label in [
        "\u{1b}[2J\u{1b}[31mred",
        "line\r\nInjected: yes",
        "bell\u{7}",
    ] {
        cp.clawctl_with_env(
            &[
                "backend",
                "add",
                "b1",
                "--url",
                "http://127.0.0.1:9/v1",
                "--api-key-env",
                "K",
                "--label",
                label,
            ],
            &[("K", UPSTREAM_KEY)],
        )
        .assert_err_contains("label");
    }
    assert!(backend_names(&cp).is_empty());
    add_backend(&cp, "b1", "http://127.0.0.1:9/v1", UPSTREAM_KEY, &[]);
    cp.clawctl(&["backend", "update", "b1", "--label", "x\u{1b}]0;pwned\u{7}"])
        .assert_err_contains("label");
    cp.clawctl(&["agent", "add", "a1", "--model", "m", "--name", "evil\nname"])
        .assert_err_contains("name");
}

/// Rewrites the stored backend `name` of a stopped control plane: the
/// route an older build (or a hand-edited store) gives an invalid one.
fn poison_backend(cp: &ControlPlane, name: &str, base_url: &str, enabled: bool) {
    let store = SledStore::open(cp.data_dir()).expect("store opens");
    let id = store
        .get(Tree::BackendNames, name.as_bytes())
        .expect("read index")
        .expect("backend is indexed");
    let raw = store
        .get(Tree::Backends, &id)
        .expect("read")
        .expect("record");
    let mut rec = BackendRecord::decode(raw.as_slice()).expect("decodes");
    let spec = rec.spec.as_mut().expect("spec");
    spec.base_url = base_url.to_string();
    spec.enabled = enabled;
    let bytes = records::encode(&rec);
    assert!(
        store
            .transaction(&[Tree::Backends], &|txn| {
                txn.insert(Tree::Backends, &id, &bytes)
                    .map_err(|_| Rollback)
            })
            .expect("transaction")
    );
    futures::executor::block_on(store.flush()).expect("flush");
}

fn new_key(cp: &ControlPlane, name: &str) -> String {
    cp.clawctl(&["key", "add", name, "-o", "json"])
        .assert_ok()
        .json()["secret"]
        .as_str()
        .expect("secret")
        .to_owned()
}

async fn status(http: &reqwest::Client, proxy: &Proxy, key: &str) -> u16 {
    http.post(format!("{}/v1/chat/completions", proxy.url()))
        .bearer_auth(key)
        .json(&chat_body("chat", false))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_backend_in_the_store_is_left_out_and_revocations_still_reach_every_proxy() {
    let mock = MockUpstream::start(
        MockConfig::default()
            .name("up")
            .api_key(UPSTREAM_KEY)
            .models(["native-chat"]),
    )
    .await;
    let mut cp = ControlPlane::start();
    add_backend(
        &cp,
        "good",
        &mock.url(),
        UPSTREAM_KEY,
        &["--model", "chat=native-chat"],
    );
    for name in ["bad-on", "bad-off"] {
        add_backend(
            &cp,
            name,
            &mock.url(),
            UPSTREAM_KEY,
            &["--model", "chat=native-chat"],
        );
    }
    let old = new_key(&cp, "old");
    let proxies = [Proxy::start(&cp), Proxy::start(&cp)];
    for p in &proxies {
        p.wait_ready();
    }
    let v = config_version(&cp);
    assert!(wait_until(WAIT, || {
        let acked = acked_versions(&cp);
        proxies.iter().all(|p| acked.get(p.node_id()) == Some(&v))
    }));
    let http = reqwest::Client::new();
    for p in &proxies {
        assert_eq!(status(&http, p, &old).await, 200);
    }

    // Invalid resources enter the store behind the validator's back.
    cp.stop_clean();
    poison_backend(&cp, "bad-on", "http://api.example.com/v 1", true);
    poison_backend(&cp, "bad-off", "http:///v1", false);
    cp.restart();

    // The next changes: a revocation and a new key.
    cp.clawctl(&["key", "rm", "old"]).assert_ok();
    let fresh = new_key(&cp, "fresh");
    let want = config_version(&cp);
    assert!(want > v);
    let mut last = Value::Null;
    let synced = wait_until(WAIT, || {
        let out = cp.clawctl(&["proxies", "-o", "json"]);
        if !out.success() {
            return false;
        }
        last = out.json();
        proxies.iter().all(|p| {
            last.as_array().into_iter().flatten().any(|e| {
                e["node_id"] == p.node_id()
                    && e["connected"].as_bool() == Some(true)
                    && e["acked_version"].as_u64() == Some(want)
            })
        })
    });
    assert!(synced, "proxies never ACKed {want}: {last:#}");
    for p in &proxies {
        let ok = wait_until_async(WAIT, || async {
            status(&http, p, &old).await == 401 && status(&http, p, &fresh).await == 200
        })
        .await;
        assert!(ok, "{}: revoked key refused, new key served", p.node_id());
        // The good backend still serves through the other routes.
    }

    // `clawctl proxies` shows what was left out, and why.
    for e in last.as_array().expect("list") {
        if e["connected"].as_bool() != Some(true) {
            continue;
        }
        let excluded = e["excluded"].as_array().expect("excluded listed");
        assert_eq!(excluded.len(), 2, "{e:#}");
        for x in excluded {
            assert_eq!(x["kind"], "backend");
            assert!(x["id"].as_str().is_some_and(|id| id.starts_with("be_")));
            assert!(
                x["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("base_url: ")),
                "{x}"
            );
        }
        assert_eq!(e["last_nack_reason"].as_str().unwrap_or(""), "");
    }
    let table = cp.clawctl(&["proxies"]).assert_ok().stdout;
    assert!(table.contains("EXCLUDED"), "{table}");
    assert!(
        table.contains("warning: proxy ") && table.contains("left out 2 invalid resource(s)"),
        "{table}"
    );

    // Deleting the bad backends clears the exclusions on the next ACK.
    cp.clawctl(&["backend", "delete", "bad-on"]).assert_ok();
    cp.clawctl(&["backend", "delete", "bad-off"]).assert_ok();
    let clean = wait_until(WAIT, || {
        let out = cp.clawctl(&["proxies", "-o", "json"]);
        out.success()
            && out.json().as_array().is_some_and(|l| {
                l.iter()
                    .filter(|e| e["connected"].as_bool() == Some(true))
                    .all(|e| e["excluded"].as_array().is_none_or(Vec::is_empty))
            })
    });
    assert!(clean, "exclusions cleared after the fix");
}

/// The `last_nack_reason` `clawctl proxies -o json` shows for `node`.
fn nack_reason(cp: &ControlPlane, node: &str) -> Option<String> {
    let out = cp.clawctl(&["proxies", "-o", "json"]);
    if !out.success() {
        return None;
    }
    out.json().as_array()?.iter().find_map(|e| {
        (e["node_id"] == node && e["connected"].as_bool() == Some(true)).then(|| {
            e["last_nack_reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
    })
}

/// Issue 17 item 10: `clawctl proxies` kept a NACK reason after the proxy
/// recovered. A control plane on a copy of an older store (same lineage,
/// lower version) gets a NACK; its next snapshot past the proxy's version
/// is ACKed, and the reason is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_nack_reason_is_cleared_by_the_next_ack() {
    let to_cp = Forwarder::start().await;
    let mut cp1 = ControlPlane::start();
    add_backend(&cp1, "b1", "http://127.0.0.1:9/v1", UPSTREAM_KEY, &[]);
    cp1.stop_clean();
    let older = tempfile::tempdir().expect("tempdir");
    let copy = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", cp1.data_dir().display()))
        .arg(older.path())
        .status()
        .expect("cp runs");
    assert!(copy.success());
    cp1.restart();
    to_cp.point_to(cp1.grpc_addr());
    cp1.clawctl(&["key", "add", "k1"]).assert_ok();
    let ahead = config_version(&cp1);
    let node = format!("dp-stale-{}", std::process::id());
    let mut proxy = ProxyBuilder::new(format!("http://{}", to_cp.addr()), cp1.proxy_token())
        .node_id(node.clone())
        .start();
    proxy.wait_ready();
    assert!(wait_until(WAIT, || acked_versions(&cp1).get(&node) == Some(&ahead)));

    // The older copy: same lineage, a lower version → NACK.
    let cp2 = ControlPlane::builder()
        .master_key(cp1.master_key())
        .admin_token(cp1.admin_token())
        .proxy_token(cp1.proxy_token())
        .data_dir(older.path())
        .start();
    to_cp.point_to(cp2.grpc_addr());
    cp1.stop();
    let mut last = None;
    let nacked = wait_until(WAIT, || {
        last = nack_reason(&cp2, &node);
        last.as_deref().is_some_and(|r| r.contains("older"))
    });
    assert!(nacked, "a NACK is shown: {last:?}");
    // Past the proxy's version: ACKed, and the reason is cleared.
    while config_version(&cp2) <= ahead {
        let name = format!("k{}", config_version(&cp2));
        cp2.clawctl(&["key", "add", name.as_str()]).assert_ok();
    }
    let want = config_version(&cp2);
    assert!(
        wait_until(WAIT, || {
            acked_versions(&cp2).get(&node) == Some(&want)
                && nack_reason(&cp2, &node).as_deref() == Some("")
        }),
        "the ACK of {want} clears the NACK reason: {:?}",
        nack_reason(&cp2, &node)
    );
    let table = cp2.clawctl(&["proxies"]).assert_ok().stdout;
    assert!(!table.contains("older"), "{table}");
    proxy.stop();
}

//! Issue 17 item 5: configurations larger than gRPC's default 4 MiB.
//!
//! One `apply` creates enough client keys that the snapshot (and the
//! `apply` answer, `key list`, `export`) exceeds the old 4 MiB limit: before
//! the fix the proxies looped on "decoded message length too large" and
//! never ACKed, revocations stopped reaching them, and clawctl failed on
//! the answers. Now every proxy ACKs, every one-time secret is printed and
//! authenticates, a revoked key stops working, and the lists show them all.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use crate::data_plane_support::{Cluster, ClusterOptions};

/// tonic's default message limit, which the old code used everywhere.
const OLD_LIMIT: usize = 4 << 20;

/// The smallest encoding of one snapshot client key: its name, its model,
/// the 64-hex SHA-256 of its secret, and an id (≥ 20 bytes), with tags.
fn min_key_bytes(name: &str, model: &str) -> usize {
    name.len() + model.len() + 64 + 20 + 8
}

/// The model every key may use: names are at most 63 bytes, so a long
/// model name makes the snapshot big with fewer keys (a faster test).
fn model(long: bool) -> String {
    if long {
        format!("big-config-model-{}", "m".repeat(200))
    } else {
        "chat".to_string()
    }
}

/// Key `i`'s name.
fn key_name(i: usize) -> String {
    format!("big-config-client-key-{i:06}")
}

/// `n` keys (with a long model name when `long`): the snapshot exceeds
/// [`OLD_LIMIT`] (asserted).
fn document(n: usize, long: bool) -> String {
    let m = model(long);
    let bytes: usize = (0..n).map(|i| min_key_bytes(&key_name(i), &m)).sum();
    assert!(
        bytes > OLD_LIMIT,
        "{n} keys make only {bytes} bytes: not above the old limit"
    );
    let mut doc = String::from("client_keys:\n");
    for i in 0..n {
        doc.push_str(&format!("  - {{name: {}, models: [{m}]}}\n", key_name(i)));
    }
    doc
}

/// GET /v1/models with `secret` on `proxy_url`: the status.
async fn status(http: &reqwest::Client, proxy_url: &str, secret: &str) -> u16 {
    http.get(format!("{proxy_url}/v1/models"))
        .bearer_auth(secret)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Every secret's status on `proxy_url`, 32 at a time: the secrets that
/// did not get `want`.
async fn not_answering(
    http: &reqwest::Client,
    proxy_url: &str,
    secrets: &[String],
    want: u16,
) -> Vec<String> {
    futures::stream::iter(secrets.iter().cloned())
        .map(|s| async move {
            let got = status(http, proxy_url, &s).await;
            (s, got)
        })
        .buffer_unordered(32)
        .filter_map(|(s, got)| async move { (got != want).then_some(s) })
        .collect()
        .await
}

async fn big_apply_reaches_every_proxy(n: usize, long: bool) {
    let c = Cluster::with(ClusterOptions::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("keys.yaml");
    std::fs::write(&file, document(n, long)).expect("write the document");
    let path = file.to_str().expect("utf-8 path");

    // One apply creates them all; its answer carries every secret and a
    // bounded list of changes with the totals.
    let out =
        c.cp.clawctl(&["apply", "-f", path, "-o", "json"])
            .assert_ok();
    let resp: Value = out.json();
    let secrets: Vec<(String, String)> = resp["created_secrets"]
        .as_array()
        .expect("created_secrets")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_owned(),
                s["secret"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(secrets.len(), n, "every one-time secret is in the answer");
    let names: HashSet<&str> = secrets.iter().map(|(n, _)| n.as_str()).collect();
    assert!((0..n).all(|i| names.contains(key_name(i).as_str())));
    assert_eq!(
        secrets.iter().map(|(_, s)| s).collect::<HashSet<_>>().len(),
        n,
        "secrets are distinct"
    );
    assert_eq!(resp["changes_truncated"], true, "{}", &out.stdout[..200]);
    assert_eq!(resp["created_total"].as_u64(), Some(n as u64));
    assert!(resp["changes"].as_array().is_some_and(|c| c.len() <= 1000));

    // Every proxy ACKs the version (the old proxies never did).
    let version = c.wait_synced();
    assert!(version > 0);
    let logs: String = c.proxies.iter().map(|p| p.logs()).collect();
    assert!(
        !logs.contains("message length too large"),
        "no proxy refused the snapshot"
    );

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client");
    // A revocation reaches every proxy.
    let (revoked_name, revoked) = secrets[n / 2].clone();
    c.cp.clawctl(&["key", "rm", &revoked_name]).assert_ok();
    c.wait_synced();
    for p in &c.proxies {
        assert_eq!(status(&http, &p.url(), &revoked).await, 401, "revoked key");
        assert_eq!(status(&http, &p.url(), &secrets[0].1).await, 200);
    }

    // Every other secret authenticates on a proxy; a sample on the other.
    let all: Vec<String> = secrets
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != n / 2)
        .map(|(_, (_, s))| s.clone())
        .collect();
    let failed = not_answering(&http, &c.proxies[0].url(), &all, 200).await;
    assert!(failed.is_empty(), "{} secrets rejected", failed.len());
    let sample: Vec<String> = all.iter().step_by(997).cloned().collect();
    let failed = not_answering(&http, &c.proxies[1].url(), &sample, 200).await;
    assert!(failed.is_empty(), "{} secrets rejected", failed.len());

    // `key list` (paged under the hood) and `export` show every key.
    let listed: Value =
        c.cp.clawctl(&["key", "list", "-o", "json"])
            .assert_ok()
            .json();
    let listed: HashSet<String> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|k| k["name"].as_str().map(str::to_owned))
        .collect();
    for (i, (name, _)) in secrets.iter().enumerate() {
        assert_eq!(
            listed.contains(name),
            i != n / 2,
            "key list shows {name} unless revoked"
        );
    }
    let exported = c.cp.clawctl(&["export"]).assert_ok().stdout;
    let export_names: HashSet<&str> = exported
        .split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}')
        .filter(|w| w.starts_with("big-config-client-key-"))
        .collect();
    let in_export = (0..n)
        .filter(|i| export_names.contains(key_name(*i).as_str()))
        .count();
    assert_eq!(
        in_export,
        n - 1,
        "export shows every key but the revoked one"
    );
}

/// 15k keys with a 217-byte model name each: ≥ 5.5 MB of snapshot client
/// keys, above the old 4 MiB limit, with fewer keys than the scale
/// (an apply costs ~1 ms a key in a debug build).
#[tokio::test(flavor = "multi_thread")]
async fn keys_beyond_the_old_4mib_limit_reach_every_proxy_and_list_in_full() {
    big_apply_reaches_every_proxy(15_000, true).await;
}

/// The scale: 40k keys with short names and model (≈ 120 bytes
/// each in the snapshot). Ignored: ~2 minutes in a debug build.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "about 2 minutes in a debug build; run with --ignored"]
async fn forty_thousand_keys_reach_every_proxy_and_list_in_full() {
    big_apply_reaches_every_proxy(40_000, false).await;
}

/// The names of every page of one list RPC, `size` at a time, and the
/// number of pages; `between(page_index)` runs after each page (changes
/// made while a client pages). Every page is at most `size` long and only
/// the last has an empty token.
async fn page_through<F, Fut>(
    size: u32,
    mut fetch: F,
    mut between: impl FnMut(usize),
) -> (Vec<String>, usize)
where
    F: FnMut(u32, String) -> Fut,
    Fut: std::future::Future<Output = (Vec<String>, String)>,
{
    let (mut out, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let (names, next) = fetch(size, token.clone()).await;
        assert!(names.len() <= size as usize, "page of {}", names.len());
        pages += 1;
        out.extend(names);
        between(pages);
        if next.is_empty() {
            return (out, pages);
        }
        assert!(pages < 1000, "paging does not end");
        token = next;
    }
}

/// Paging is a range read from the token (issue 17 item 5 follow-up: each
/// page used to be cut from the whole list): pages come in name order (id
/// order for agents), cover every resource once, skip a resource deleted
/// before its page and include one created after the token; no page size
/// means everything up to the cap; an oversized token is refused naming
/// `page_token`; clawctl's lists agree with the RPCs.
#[tokio::test(flavor = "multi_thread")]
async fn list_pages_are_ordered_ranges_from_the_token() {
    use claw_proto::v1::{
        ListAgentsRequest, ListBackendsRequest, ListClientKeysRequest,
        agent_service_client::AgentServiceClient, backend_service_client::BackendServiceClient,
        client_key_service_client::ClientKeyServiceClient,
    };
    let cp = claw_tests::harness::ControlPlane::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.yaml");
    // Listed out of name order on purpose: pages follow names, not ids.
    let mut doc = String::from("backends:\n");
    for i in (0..23).rev() {
        doc.push_str(&format!(
            "  - {{name: be-{i:02}, base_url: 'https://b{i}.example.com/v1', api_key_env: KEY_VAR, models: [{{canonical: gpt-4o, native: gpt-4o}}]}}\n"
        ));
    }
    doc.push_str("client_keys:\n");
    for i in (0..57).rev() {
        doc.push_str(&format!("  - {{name: key-{i:02}, models: [gpt-4o]}}\n"));
    }
    doc.push_str("agents:\n");
    for i in (0..11).rev() {
        doc.push_str(&format!("  - {{id: agent-{i:02}, model: gpt-4o}}\n"));
    }
    std::fs::write(&file, doc).expect("write the document");
    cp.clawctl_with_env(
        &["apply", "-f", file.to_str().expect("utf-8 path")],
        &[("KEY_VAR", "sk-page-test-0123456789")],
    )
    .assert_ok();

    let channel = tonic::transport::Endpoint::from_shared(cp.grpc_url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let token = cp.admin_token().to_string();
    fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii token"),
        );
        r
    }
    let authed = |msg| with_token(msg, &token);
    let keys = ClientKeyServiceClient::new(channel.clone());
    let list_keys = |page_size: u32, page_token: String| {
        let mut keys = keys.clone();
        let req = authed(ListClientKeysRequest {
            page_size,
            page_token,
        });
        async move {
            let r = keys
                .list_client_keys(req)
                .await
                .expect("list keys")
                .into_inner();
            (
                r.keys.into_iter().map(|k| k.name).collect::<Vec<_>>(),
                r.next_page_token,
            )
        }
    };

    // The control plane creates its own heartbeat key once agents exist
    // (it sorts first); wait for it so that it does not appear mid-paging.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cp
        .clawctl(&["key", "get", "claw-heartbeat"])
        .status
        .success()
    {
        assert!(std::time::Instant::now() < deadline, "no heartbeat key");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Keys, 5 a page; after the first page one key already listed and one
    // not yet listed are deleted and one sorting after the token is created.
    let (names, pages) = page_through(5, &list_keys, |page| {
        if page == 1 {
            for name in ["key-01", "key-30"] {
                cp.clawctl(&["key", "rm", name]).assert_ok();
            }
            cp.clawctl(&["key", "add", "key-30a"]).assert_ok();
        }
    })
    .await;
    let mut want: Vec<String> = (0..57)
        .filter(|i| *i != 30)
        .map(|i| format!("key-{i:02}"))
        .collect();
    want.push("key-30a".into());
    want.push("claw-heartbeat".into());
    want.sort();
    assert_eq!(names, want, "name order, each once, changes seen");
    assert_eq!(pages, want.len().div_ceil(5));

    // No page size: everything (below the cap) in one answer.
    // (key-01, deleted after its page, is gone now).
    let (all, next) = list_keys(0, String::new()).await;
    want.retain(|n| n != "key-01");
    assert_eq!((all, next.as_str()), (want, ""));
    // A token between two names starts after it; past the end is empty.
    let (after, _) = list_keys(3, "key-29z".into()).await;
    assert_eq!(after, ["key-30a", "key-31", "key-32"]);
    let (none, next) = list_keys(3, "zzz".into()).await;
    assert!(none.is_empty() && next.is_empty());
    // An oversized token is refused naming the field.
    let err = keys
        .clone()
        .list_client_keys(authed(ListClientKeysRequest {
            page_size: 5,
            page_token: "k".repeat(2000),
        }))
        .await
        .expect_err("an oversized token");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("page_token:"),
        "{}",
        err.message()
    );

    // Backends (by name) and agents (by id), 4 a page.
    let backends = BackendServiceClient::new(channel.clone());
    let (names, _) = page_through(
        4,
        |page_size, page_token| {
            let mut b = backends.clone();
            let req = with_token(
                ListBackendsRequest {
                    page_size,
                    page_token,
                },
                &token,
            );
            async move {
                let r = b
                    .list_backends(req)
                    .await
                    .expect("list backends")
                    .into_inner();
                (
                    r.backends.into_iter().map(|b| b.name).collect::<Vec<_>>(),
                    r.next_page_token,
                )
            }
        },
        |_| {},
    )
    .await;
    let want: Vec<String> = (0..23).map(|i| format!("be-{i:02}")).collect();
    assert_eq!(names, want);
    let agents = AgentServiceClient::new(channel.clone());
    let (ids, _) = page_through(
        4,
        |page_size, page_token| {
            let mut a = agents.clone();
            let req = with_token(
                ListAgentsRequest {
                    page_size,
                    page_token,
                },
                &token,
            );
            async move {
                let r = a.list_agents(req).await.expect("list agents").into_inner();
                (
                    r.agents.into_iter().map(|a| a.id).collect::<Vec<_>>(),
                    r.next_page_token,
                )
            }
        },
        |_| {},
    )
    .await;
    let want: Vec<String> = (0..11).map(|i| format!("agent-{i:02}")).collect();
    assert_eq!(ids, want);

    // clawctl pages the same lists (500 a page) and shows the same.
    let listed: Value = cp
        .clawctl(&["agent", "list", "-o", "json"])
        .assert_ok()
        .json();
    let listed: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert_eq!(listed, want);
}

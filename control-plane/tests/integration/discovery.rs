//! The discovery stream end to end, in process: the real server on port 0
//! and a tonic client playing the proxy.

use std::time::Duration;

use crate::common::*;
use claw_control_plane::crypto::sha256_hex;
use claw_proto::v1::backend_service_client::BackendServiceClient;
use claw_proto::v1::client_key_service_client::ClientKeyServiceClient;
use claw_proto::v1::cluster_service_client::ClusterServiceClient;
use claw_proto::v1::discovery_service_client::DiscoveryServiceClient;
use claw_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

/// Long enough for a debounced push (at most 200 ms) to have arrived.
const QUIET: Duration = Duration::from_millis(600);

impl Harness {
    fn backends(&self) -> BackendServiceClient<Authed> {
        BackendServiceClient::new(self.authed(Some(ADMIN)))
    }

    fn cluster(&self) -> ClusterServiceClient<Authed> {
        ClusterServiceClient::new(self.authed(Some(ADMIN)))
    }

    async fn add_backend(&self, name: &str, key: &str, models: &[&str]) -> u64 {
        let b = Backend {
            name: name.into(),
            base_url: "https://api.example.com/v1".into(),
            api_key: key.into(),
            rpm: 60,
            enabled: true,
            models: models
                .iter()
                .map(|m| ModelMapping {
                    canonical: (*m).into(),
                    native: format!("{m}-2024"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        self.backends()
            .create_backend(CreateBackendRequest { backend: Some(b) })
            .await
            .expect("create backend")
            .into_inner()
            .config_version
    }

    async fn version(&self) -> u64 {
        self.cluster()
            .get_snapshot_info(GetSnapshotInfoRequest {})
            .await
            .expect("info")
            .into_inner()
            .config_version
    }

    async fn proxies(&self) -> Vec<Proxy> {
        self.cluster()
            .list_proxies(ListProxiesRequest {})
            .await
            .expect("list proxies")
            .into_inner()
            .proxies
    }

    /// Polls `ListProxies` until `node` satisfies `ok`.
    async fn wait_for_proxy(&self, node: &str, ok: impl Fn(&Proxy) -> bool) -> Proxy {
        for _ in 0..100 {
            if let Some(p) = self.proxies().await.into_iter().find(|p| p.node_id == node)
                && ok(&p)
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "proxy {node} never reached the expected state: {:?}",
            self.proxies().await
        );
    }

    /// Opens a stream as `node` holding `version`.
    async fn open(&self, node: &str, version: u64) -> ProxyStream {
        self.try_open(Some(PROXY), node, version)
            .await
            .expect("stream opens")
    }

    async fn try_open(
        &self,
        token: Option<&'static str>,
        node: &str,
        version: u64,
    ) -> Result<ProxyStream, Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(StreamConfigRequest {
            node_id: node.into(),
            version,
            ..Default::default()
        })
        .await
        .expect("queue hello");
        let mut client = DiscoveryServiceClient::new(self.authed(token));
        let inbound = client
            .stream_config(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(ProxyStream {
            node: node.into(),
            tx,
            inbound,
        })
    }
}

/// Rate shares and cooldowns: no snapshot, no nonce, no answer expected.
fn is_incremental(r: &StreamConfigResponse) -> bool {
    r.snapshot.is_none() && r.nonce.is_empty()
}

/// The proxy's side of one stream.
struct ProxyStream {
    node: String,
    tx: mpsc::Sender<StreamConfigRequest>,
    inbound: Streaming<StreamConfigResponse>,
}

impl ProxyStream {
    /// The next response that needs an answer, skipping incremental
    /// messages (rate shares, cooldowns) (fails the test after 5 s).
    async fn next(&mut self) -> StreamConfigResponse {
        loop {
            let r = tokio::time::timeout(Duration::from_secs(5), self.inbound.message())
                .await
                .expect("a response within 5 s")
                .expect("stream healthy")
                .expect("stream open");
            if !is_incremental(&r) {
                return r;
            }
        }
    }

    /// Asserts that nothing but incremental messages arrives for [`QUIET`].
    async fn expect_silence(&mut self) {
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Ok(msg) = tokio::time::timeout_at(deadline, self.inbound.message()).await {
            if let Ok(Some(r)) = &msg
                && is_incremental(r)
            {
                continue;
            }
            panic!("expected no response, got {msg:?}");
        }
    }

    async fn ack(&self, r: &StreamConfigResponse) {
        self.reply(r.version, &r.nonce, "").await;
    }

    async fn reply(&self, version: u64, nonce: &str, error: &str) {
        self.tx
            .send(StreamConfigRequest {
                node_id: self.node.clone(),
                version,
                response_nonce: nonce.into(),
                error_detail: error.into(),
                ..Default::default()
            })
            .await
            .expect("reply queued");
    }
}

#[tokio::test]
async fn only_the_proxy_token_opens_discovery_and_it_opens_nothing_else() {
    let h = Harness::start().await;
    for token in [None, Some(ADMIN), Some("proxy-token-wrong-value")] {
        let err = match h.try_open(token, "p1", 0).await {
            Ok(mut s) => s.inbound.message().await.expect_err("rejected"),
            Err(e) => e,
        };
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
        assert_eq!(err.message(), "missing or invalid proxy token");
    }
    let mut s = h.open("p1", 0).await;
    assert!(s.next().await.snapshot.is_some());

    let mut admin_with_proxy_token = BackendServiceClient::new(h.authed(Some(PROXY)));
    let err = admin_with_proxy_token
        .list_backends(ListBackendsRequest::default())
        .await
        .expect_err("rejected");
    assert_eq!(err.code(), Code::Unauthenticated);
    drop(s);
    h.stop().await;
}

#[tokio::test]
async fn the_first_message_must_name_the_node() {
    let h = Harness::start().await;
    let mut s = h.open("", 0).await;
    let err = s.inbound.message().await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "node_id: is required");
    assert!(h.proxies().await.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn hello_gets_the_current_snapshot_with_plaintext_backend_keys_and_hashed_client_keys() {
    let h = Harness::start().await;
    h.add_backend("b1", "sk-live-0123456789abcdef", &["gpt-4o", "o3"])
        .await;
    let created = ClientKeyServiceClient::new(h.authed(Some(ADMIN)))
        .create_client_key(CreateClientKeyRequest {
            key: Some(ClientKey {
                name: "team".into(),
                models: vec!["gpt-4o".into()],
                rpm: 30,
                ..Default::default()
            }),
        })
        .await
        .expect("create key")
        .into_inner();
    let version = h.version().await;
    assert_eq!(created.config_version, version);

    let mut s = h.open("p1", 0).await;
    let r = s.next().await;
    assert_eq!(r.version, version);
    assert!(!r.nonce.is_empty());
    let snap = r.snapshot.expect("snapshot");
    assert_eq!(snap.version, version);
    assert_eq!(snap.backends.len(), 1);
    assert_eq!(snap.backends[0].api_key, "sk-live-0123456789abcdef");
    assert_eq!(snap.backends[0].models[0].native, "gpt-4o-2024");
    assert_eq!(snap.models, ["gpt-4o", "o3"]);
    assert_eq!(snap.pools.len(), 2);
    assert_eq!(snap.client_keys.len(), 1);
    let k = &snap.client_keys[0];
    assert_eq!(k.name, "team");
    assert_eq!(k.secret_sha256, sha256_hex(created.secret.as_bytes()));
    assert_eq!(
        (k.models.as_slice(), k.rpm),
        (["gpt-4o".to_string()].as_slice(), 30)
    );
    drop(s);
    h.stop().await;
}

#[tokio::test]
async fn a_burst_of_writes_is_pushed_as_a_few_snapshots_ending_at_the_final_version() {
    let h = Harness::start().await;
    let mut s = h.open("p1", 0).await;
    let first = s.next().await;
    s.ack(&first).await;

    let mut last = 0;
    for i in 0..20 {
        last = h
            .add_backend(&format!("b{i:02}"), "sk-burst-0123456789", &["m"])
            .await;
    }
    let mut pushes = Vec::new();
    loop {
        let r = s.next().await;
        s.ack(&r).await;
        pushes.push(r.version);
        if r.version == last {
            break;
        }
    }
    s.expect_silence().await;
    assert!(
        pushes.windows(2).all(|w| w[0] < w[1]),
        "versions only move forward: {pushes:?}"
    );
    assert!(
        pushes.len() <= 6,
        "20 writes should be debounced into a few pushes: {pushes:?}"
    );
    let p = h.wait_for_proxy("p1", |p| p.acked_version == last).await;
    assert!(p.connected);
    drop(s);
    h.stop().await;
}

#[tokio::test]
async fn acks_and_nacks_are_recorded_and_a_nacked_version_is_not_resent() {
    let h = Harness::start().await;
    let mut s = h.open("p1", 0).await;
    let first = s.next().await;
    s.ack(&first).await;
    let p = h
        .wait_for_proxy("p1", |p| p.acked_version == first.version)
        .await;
    assert!(p.connected);
    assert!(
        p.peer_address.starts_with("127.0.0.1:"),
        "{}",
        p.peer_address
    );
    assert!(!p.peer_address.ends_with(":0"));
    assert!(p.connected_since.is_some() && p.last_seen.is_some());
    assert_eq!(p.last_nack_reason, "");
    let info = h
        .cluster()
        .get_snapshot_info(GetSnapshotInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.proxies_connected, 1);

    let v2 = h.add_backend("b1", "sk-nack-0123456789", &["m"]).await;
    let second = s.next().await;
    assert_eq!(second.version, v2);
    // An answer with an unknown nonce changes nothing.
    s.reply(v2, "not-a-nonce", "").await;
    s.reply(first.version, &second.nonce, "backend `x`: base_url: bad")
        .await;
    let p = h
        .wait_for_proxy("p1", |p| !p.last_nack_reason.is_empty())
        .await;
    assert_eq!(p.last_nack_reason, "backend `x`: base_url: bad");
    assert_eq!(p.acked_version, first.version, "a NACK is not an ACK");
    s.expect_silence().await;

    // The next version is offered again, and its ACK recorded.
    let v3 = h.add_backend("b2", "sk-next-0123456789", &["m"]).await;
    let third = s.next().await;
    assert_eq!(third.version, v3);
    assert_ne!(third.nonce, second.nonce);
    s.ack(&third).await;
    h.wait_for_proxy("p1", |p| p.acked_version == v3).await;

    // The stream ends: the proxy stays listed, disconnected.
    drop(s);
    let p = h.wait_for_proxy("p1", |p| !p.connected).await;
    assert_eq!(p.acked_version, v3);
    assert!(p.last_seen.is_some());
    h.stop().await;
}

#[tokio::test]
async fn a_proxy_that_reconnects_with_the_current_version_gets_nothing_until_it_moves() {
    let h = Harness::start().await;
    let v1 = h.add_backend("b1", "sk-rec-0123456789", &["m"]).await;
    let mut s = h.open("p1", v1).await;
    s.expect_silence().await;
    let v2 = h.add_backend("b2", "sk-rec-0123456789", &["m"]).await;
    let r = s.next().await;
    assert_eq!(r.version, v2);
    drop(s);
    h.stop().await;
}

#[tokio::test]
async fn a_newer_stream_of_the_same_node_replaces_the_older() {
    let h = Harness::start().await;
    let mut old = h.open("p1", 0).await;
    let r = old.next().await;
    old.ack(&r).await;
    h.wait_for_proxy("p1", |p| p.acked_version == r.version)
        .await;

    let mut new = h.open("p1", r.version).await;
    // Incremental messages (rate shares, cooldowns) may still arrive first.
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(5), old.inbound.message())
            .await
            .expect("the older stream ends")
        {
            Ok(Some(m)) if is_incremental(&m) => continue,
            other => break other.expect_err("with a status"),
        }
    };
    assert_eq!(err.code(), Code::Aborted);
    // The older stream's cleanup has run; the node is still connected.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let p = h.wait_for_proxy("p1", |p| p.connected).await;
    assert_eq!(p.acked_version, r.version);
    assert_eq!(h.proxies().await.len(), 1);

    let v = h.add_backend("b1", "sk-new-0123456789", &["m"]).await;
    assert_eq!(new.next().await.version, v);
    drop(new);
    h.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_the_server_stops_promptly() {
    let h = Harness::start().await;
    let mut s = h.open("p1", 0).await;
    let r = s.next().await;
    s.ack(&r).await;
    let started = std::time::Instant::now();
    // Keep the stream (and its request side) open while the server stops.
    let stream = tokio::spawn(async move {
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.inbound.message().await {
                    Ok(Some(m)) if is_incremental(&m) => continue,
                    other => break other,
                }
            }
        })
        .await;
        (end, s.tx)
    });
    h.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let (end, _tx) = stream.await.expect("joins");
    match end.expect("the stream ends with the server") {
        Ok(None) => {}
        other => panic!("expected a clean end of stream, got {other:?}"),
    }
}

#[tokio::test]
async fn every_stream_opens_with_the_complete_health_table() {
    let h = Harness::start().await;
    let v1 = h.add_backend("b1", "sk-hc-0123456789", &["m"]).await;
    // A fresh proxy: the first snapshot carries it.
    let mut fresh = h.open("p1", 0).await;
    let first = tokio::time::timeout(Duration::from_secs(5), fresh.inbound.message())
        .await
        .expect("a response within 5 s")
        .expect("stream healthy")
        .expect("stream open");
    assert!(first.snapshot.is_some(), "{first:?}");
    assert!(first.health_complete, "{first:?}");
    assert!(first.health.is_empty(), "nothing excluded: {first:?}");
    // A proxy that holds the current version: a message of its own.
    let mut current = h.open("p2", v1).await;
    let first = tokio::time::timeout(Duration::from_secs(5), current.inbound.message())
        .await
        .expect("a response within 5 s")
        .expect("stream healthy")
        .expect("stream open");
    assert!(is_incremental(&first), "{first:?}");
    assert!(first.health_complete, "{first:?}");
    assert_eq!(first.version, v1);
    drop((fresh, current));
    h.stop().await;
}

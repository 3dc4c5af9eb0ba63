//! Starting a proxy with a static snapshot against mock upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use claw_data_plane::{Config, CooldownEvent, Proxy, RequestOutcome, ServerLimits, SnapshotStore};
use claw_proto::Pool;
use claw_proto::v1;
use sha2::Digest;
use tokio::sync::{broadcast, mpsc, oneshot};

pub const CLIENT_KEY: &str = "sk-client-secret";

pub fn backend(id: &str, url: &str, pool: Pool, models: &[(&str, &str)]) -> v1::SnapshotBackend {
    v1::SnapshotBackend {
        id: id.into(),
        name: id.into(),
        base_url: url.into(),
        api_key: format!("sk-up-{id}"),
        pool: pool as i32,
        rpm: 6000,
        tpm: None,
        timeout_ms: 5_000,
        weight: 1,
        enabled: true,
        models: models
            .iter()
            .map(|(c, n)| v1::ModelMapping {
                canonical: (*c).into(),
                native: (*n).into(),
                ..Default::default()
            })
            .collect(),
    }
}

pub fn client_key(id: &str, secret: &str) -> v1::SnapshotClientKey {
    v1::SnapshotClientKey {
        id: id.into(),
        name: id.into(),
        secret_sha256: hex::encode(sha2::Sha256::digest(secret.as_bytes())),
        models: vec![],
        rpm: 0,
    }
}

pub fn snapshot(backends: Vec<v1::SnapshotBackend>) -> v1::Snapshot {
    v1::Snapshot {
        version: 1,
        backends,
        pools: vec![],
        client_keys: vec![client_key("ck_test", CLIENT_KEY)],
        models: vec![],
    }
}

pub struct TestProxy {
    pub addr: SocketAddr,
    pub store: SnapshotStore,
    pub outcomes: mpsc::Receiver<RequestOutcome>,
    pub cooldowns: broadcast::Receiver<CooldownEvent>,
    pub proxy_handle: claw_data_plane::Cooldowns,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestProxy {
    pub async fn start(snap: v1::Snapshot) -> Self {
        Self::start_with(snap, ServerLimits::default()).await
    }

    pub async fn start_with(snap: v1::Snapshot, limits: ServerLimits) -> Self {
        let mut config = Config::static_snapshot(snap);
        config.limits = limits;
        let mut proxy = Proxy::new(config).unwrap();
        let outcomes = proxy.take_outcomes().unwrap();
        let cooldowns = proxy.subscribe_cooldowns();
        let store = proxy.store().clone();
        let proxy_handle = proxy.cooldowns().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy.serve(listener, async move {
            let _ = rx.await;
        }));
        TestProxy {
            addr,
            store,
            outcomes,
            cooldowns,
            proxy_handle,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(path))
            .bearer_auth(CLIENT_KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn chat(&self, model: &str) -> reqwest::Response {
        self.post(
            "/v1/chat/completions",
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]}),
        )
        .await
    }

    pub async fn next_outcome(&mut self) -> RequestOutcome {
        tokio::time::timeout(Duration::from_secs(5), self.outcomes.recv())
            .await
            .expect("an outcome in time")
            .expect("outcome channel open")
    }

    /// Starts draining and waits for the server to return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join(mut self) -> anyhow::Result<()> {
        self.task.take().unwrap().await.unwrap()
    }
}

pub async fn error_of(res: reqwest::Response) -> (u16, serde_json::Value) {
    let status = res.status().as_u16();
    let v: serde_json::Value = res.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "OpenAI error shape: {v}");
    assert!(v["error"]["type"].is_string(), "OpenAI error shape: {v}");
    (status, v)
}

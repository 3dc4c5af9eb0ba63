//! Starting a proxy with a static snapshot against mock upstreams. The
//! snapshot fixtures build on `claw_data_plane::test_util`.

use std::net::SocketAddr;
use std::time::Duration;

use claw_data_plane::test_util;
use claw_data_plane::{Config, CooldownEvent, Proxy, RequestOutcome, ServerLimits, SnapshotStore};
use claw_proto::Pool;
use claw_proto::v1;
use tokio::sync::{broadcast, mpsc, oneshot};

pub(crate) const CLIENT_KEY: &str = "sk-client-secret";

/// [`test_util::backend`] at `url`: rpm 6000, a 5 s upstream timeout and
/// provider key `sk-up-{id}`.
pub(crate) fn backend(
    id: &str,
    url: &str,
    pool: Pool,
    models: &[(&str, &str)],
) -> v1::SnapshotBackend {
    v1::SnapshotBackend {
        base_url: url.into(),
        api_key: format!("sk-up-{id}"),
        rpm: 6000,
        timeout_ms: 5_000,
        ..test_util::backend(id, pool, models)
    }
}

pub(crate) use test_util::key as client_key;

pub(crate) fn snapshot(backends: Vec<v1::SnapshotBackend>) -> v1::Snapshot {
    v1::Snapshot {
        version: 1,
        backends,
        pools: vec![],
        // The agent ids the tests send (x-claw-agent-id is honoured only
        // for a key's own agents).
        client_keys: vec![v1::SnapshotClientKey {
            agents: ["agent-7", "agent-9", "ag-1"].map(String::from).to_vec(),
            ..client_key("ck_test", CLIENT_KEY)
        }],
        models: vec![],
        ..Default::default()
    }
}

pub(crate) struct TestProxy {
    pub(crate) addr: SocketAddr,
    pub(crate) store: SnapshotStore,
    pub(crate) outcomes: mpsc::Receiver<RequestOutcome>,
    pub(crate) cooldowns: broadcast::Receiver<CooldownEvent>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestProxy {
    pub(crate) async fn start(snap: v1::Snapshot) -> Self {
        Self::start_with(snap, ServerLimits::default()).await
    }

    pub(crate) async fn start_with(snap: v1::Snapshot, limits: ServerLimits) -> Self {
        let mut config = Config::static_snapshot(snap);
        config.limits = limits;
        let mut proxy = Proxy::new(config).unwrap();
        let outcomes = proxy.take_outcomes().unwrap();
        let cooldowns = proxy.subscribe_cooldowns();
        let store = proxy.store().clone();
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
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub(crate) async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(path))
            .bearer_auth(CLIENT_KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn chat(&self, model: &str) -> reqwest::Response {
        self.post(
            "/v1/chat/completions",
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]}),
        )
        .await
    }

    pub(crate) async fn next_outcome(&mut self) -> RequestOutcome {
        tokio::time::timeout(Duration::from_secs(5), self.outcomes.recv())
            .await
            .expect("an outcome in time")
            .expect("outcome channel open")
    }

    /// Starts draining and waits for the server to return.
    pub(crate) async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }

    pub(crate) fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub(crate) async fn join(mut self) -> anyhow::Result<()> {
        self.task.take().unwrap().await.unwrap()
    }
}

pub(crate) async fn error_of(res: reqwest::Response) -> (u16, serde_json::Value) {
    let status = res.status().as_u16();
    let v: serde_json::Value = res.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "OpenAI error shape: {v}");
    assert!(v["error"]["type"].is_string(), "OpenAI error shape: {v}");
    (status, v)
}

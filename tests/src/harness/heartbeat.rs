//! Fixtures the heartbeat tests share (`heartbeat*.rs`, `hostile_webhooks`,
//! `hostile_clients`, `attribution`): a control plane whose heartbeat runs
//! go through a [`Forwarder`] to a proxy started later, backends whose
//! upstream key comes from `clawctl`'s environment, agents with a checklist
//! on stdin, the run log, manual runs, polling with the control plane's log
//! on failure, client keys, chats as an agent (also a conversation that
//! keeps the agent busy), an in-test server for webhook deliveries and
//! wakes ([`serve_hooks`]) and webhook signatures.
//!
//! Everything here drives the real binaries (`clawctl`, the proxy's HTTP
//! API); nothing reaches into their state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac as _};
use http_body_util::BodyExt as _;
use serde_json::Value;
use sha2::Sha256;

use super::{ControlPlane, ControlPlaneBuilder, Forwarder, Proxy};
use crate::mock::{MockUpstream, RecordedRequest};

/// The upstream API key most heartbeat tests give their mock upstream (its
/// `MockConfig::api_key`) and its backend.
pub const TEST_UPSTREAM_KEY: &str = "sk-test-key-0123456789";

/// How often the polling helpers here look again.
const POLL: Duration = Duration::from_millis(300);

impl ControlPlaneBuilder {
    /// Sends heartbeat runs to `fwd` (`CLAW_HEARTBEAT_PROXY=http://ADDR`):
    /// its port is known before any proxy runs; [`start_heartbeat_proxy`]
    /// points it at one.
    pub fn heartbeats_through(self, fwd: &Forwarder) -> Self {
        self.heartbeat_proxy(format!("http://{}", fwd.addr()))
    }

    /// Signs webhook deliveries and wakes with `secret`
    /// (`CLAW_WEBHOOK_SECRET`); check them with [`webhook_signature`].
    pub fn webhook_secret(self, secret: &str) -> Self {
        self.env("CLAW_WEBHOOK_SECRET", secret)
    }

    /// Fast webhook retries: `CLAW_WEBHOOK_BACKOFF_BASE=base` and, when
    /// given, `CLAW_WEBHOOK_BACKOFF_MAX=max` (durations such as `"100ms"`).
    pub fn webhook_backoff(self, base: &str, max: Option<&str>) -> Self {
        let b = self.env("CLAW_WEBHOOK_BACKOFF_BASE", base);
        match max {
            Some(max) => b.env("CLAW_WEBHOOK_BACKOFF_MAX", max),
            None => b,
        }
    }
}

/// Starts a proxy attached to `cp`, waits until it is ready (`/readyz`) and
/// points `fwd` — the control plane's heartbeat proxy address, see
/// [`ControlPlaneBuilder::heartbeats_through`] — at it.
///
/// # Panics
/// When the proxy does not come up.
#[track_caller]
pub fn start_heartbeat_proxy(cp: &ControlPlane, fwd: &Forwarder) -> Proxy {
    let proxy = Proxy::start(cp);
    proxy.wait_ready();
    fwd.point_to(proxy.addr());
    proxy
}

/// `clawctl backend add NAME --url URL --api-key-env K --rpm 6000 --model
/// MODEL EXTRA…` with `K=key` in `clawctl`'s environment only (a key is
/// never on a command line). `model` is a `--model` value (`m` or
/// `m=native`); `extra` e.g. `["--api", "anthropic"]`.
///
/// # Panics
/// When `clawctl` fails.
#[track_caller]
pub fn add_backend_with_key(
    cp: &ControlPlane,
    name: &str,
    url: &str,
    key: &str,
    model: &str,
    extra: &[&str],
) {
    let mut args = vec![
        "backend",
        "add",
        name,
        "--url",
        url,
        "--api-key-env",
        "K",
        "--rpm",
        "6000",
        "--model",
        model,
    ];
    args.extend_from_slice(extra);
    cp.clawctl_with_env(&args, &[("K", key)]).assert_ok();
}

/// The usual heartbeat setup: a [`Forwarder`], a control plane started from
/// `builder` with its heartbeats through it, backend `backend` for the
/// upstream at `upstream_url` (key `key`, serving `model`, see
/// [`add_backend_with_key`]), and a ready proxy the forwarder points at.
/// Keep the returned forwarder alive as long as the control plane.
///
/// # Panics
/// When a process does not come up or `clawctl` fails.
pub async fn heartbeat_fleet(
    builder: ControlPlaneBuilder,
    backend: &str,
    upstream_url: &str,
    key: &str,
    model: &str,
) -> (ControlPlane, Proxy, Forwarder) {
    let fwd = Forwarder::start().await;
    let cp = builder.heartbeats_through(&fwd).start();
    add_backend_with_key(&cp, backend, upstream_url, key, model, &[]);
    let proxy = start_heartbeat_proxy(&cp, &fwd);
    (cp, proxy, fwd)
}

/// `clawctl agent add ID --model MODEL EXTRA… --checklist-file -` with
/// `checklist` on stdin.
///
/// # Panics
/// When `clawctl` fails.
#[track_caller]
pub fn add_agent(cp: &ControlPlane, id: &str, model: &str, extra: &[&str], checklist: &str) {
    let mut args = vec!["agent", "add", id, "--model", model];
    args.extend_from_slice(extra);
    args.extend(["--checklist-file", "-"]);
    cp.clawctl_stdin(&args, checklist).assert_ok();
}

/// A one-minute active window twelve hours away from now (UTC),
/// `HH:00-HH:01` for `--active-hours`: such an agent's slots never come due
/// during a test, only manual runs fire.
pub fn far_active_hours() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let h = (now / 3600 + 12) % 24;
    format!("{h:02}:00-{h:02}:01")
}

/// `clawctl heartbeat logs AGENT --limit 1000 -o json`: the agent's run
/// records (empty when there are none).
///
/// # Panics
/// When `clawctl` fails.
#[track_caller]
pub fn runs(cp: &ControlPlane, agent: &str) -> Vec<Value> {
    cp.clawctl(&["heartbeat", "logs", agent, "--limit", "1000", "-o", "json"])
        .assert_ok()
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The record of `agent`'s run `run_id` in [`runs`], if it is there.
#[track_caller]
pub fn run_by_id(cp: &ControlPlane, agent: &str, run_id: &str) -> Option<Value> {
    runs(cp, agent).into_iter().find(|r| r["run_id"] == run_id)
}

/// A run record's `status` (`""` when it has none).
pub fn run_status(run: &Value) -> &str {
    run["status"].as_str().unwrap_or_default()
}

/// Fires a manual run (`clawctl heartbeat run ID --wait -o json`) until one
/// does not end `failed` — the first may fail while the proxy does not have
/// the new configuration yet — and returns that run's record.
///
/// # Panics
/// When every run failed for `timeout`, with the last run and the control
/// plane's log.
#[track_caller]
pub fn manual_run(cp: &ControlPlane, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let run = cp
            .clawctl(&["heartbeat", "run", id, "--wait", "-o", "json"])
            .assert_ok()
            .json();
        if run_status(&run) != "failed" {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "every manual run failed: {run}\n{}",
            cp.logs()
        );
        std::thread::sleep(POLL);
    }
}

/// Polls `done` every 300 ms, blocking the thread, until it holds.
///
/// # Panics
/// After `timeout`, naming `what`, with the control plane's log.
#[track_caller]
pub fn wait_for(what: &str, cp: &ControlPlane, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            cp.logs()
        );
        std::thread::sleep(POLL);
    }
}

/// Polls the run logs of `agents` ([`runs`], one list per agent, in
/// order) every `every`, sleeping on the runtime, until `done` returns
/// `Some`, and returns that.
///
/// # Panics
/// After `timeout`, naming `what`, with the last lists and the control
/// plane's log.
pub async fn wait_runs_of<T>(
    cp: &ControlPlane,
    agents: &[&str],
    what: &str,
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut(Vec<Vec<Value>>) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let all: Vec<Vec<Value>> = agents.iter().map(|a| runs(cp, a)).collect();
        if let Some(v) = done(all.clone()) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; the runs of {agents:?}: {all:#?}\n{}",
            cp.logs()
        );
        tokio::time::sleep(every).await;
    }
}

/// [`wait_runs_of`] for one agent: `done` gets its run log.
pub async fn wait_runs<T>(
    cp: &ControlPlane,
    agent: &str,
    what: &str,
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut(Vec<Value>) -> Option<T>,
) -> T {
    wait_runs_of(cp, &[agent], what, timeout, every, |mut all| {
        done(all.pop().unwrap_or_default())
    })
    .await
}

/// `clawctl key add NAME EXTRA… -o json` (e.g. `["--agents", "agent-a"]`)
/// → the new client key's secret.
///
/// # Panics
/// When `clawctl` fails or prints no secret.
#[track_caller]
pub fn add_client_key(cp: &ControlPlane, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["key", "add", name];
    args.extend_from_slice(extra);
    args.extend(["-o", "json"]);
    cp.clawctl(&args).assert_ok().json()["secret"]
        .as_str()
        .expect("`key add -o json` prints the secret")
        .to_owned()
}

/// The requests `mock` received with `agent`'s heartbeat session key
/// (`x-claw-session-key: agent:AGENT:heartbeat…`), in arrival order.
pub fn heartbeat_requests(mock: &MockUpstream, agent: &str) -> Vec<RecordedRequest> {
    let prefix = format!("agent:{agent}:heartbeat");
    mock.requests()
        .into_iter()
        .filter(|r| {
            r.header("x-claw-session-key")
                .is_some_and(|k| k.starts_with(&prefix))
        })
        .collect()
}

/// POSTs `{model, messages: [{user: "are you there?"}]}` to
/// `OPENAI_URL/chat/completions` (a proxy's [`Proxy::openai_url`]) with the
/// client key `secret`, as `agent` (`x-claw-agent-id`); the status, 0 when
/// there was no answer.
pub async fn chat_as_agent(
    client: &reqwest::Client,
    openai_url: &str,
    secret: &str,
    agent: &str,
    model: &str,
) -> u16 {
    client
        .post(format!("{openai_url}/chat/completions"))
        .bearer_auth(secret)
        .header("x-claw-agent-id", agent)
        .json(&serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "are you there?"}]
        }))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Sends [`chat_as_agent`] every 100 ms until one is answered 200: the
/// proxy has the client key (and the backend) by then.
///
/// # Panics
/// After `timeout`.
pub async fn wait_key_accepted(
    client: &reqwest::Client,
    openai_url: &str,
    secret: &str,
    agent: &str,
    model: &str,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    while chat_as_agent(client, openai_url, secret, agent, model).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the proxy never accepted the client key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An agent in a live conversation: a task sending [`chat_as_agent`], then
/// sleeping `every`, until [`Conversation::stop`].
#[derive(Debug)]
pub struct Conversation {
    talking: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Conversation {
    /// Starts talking (on the current tokio runtime).
    pub fn start(
        client: reqwest::Client,
        openai_url: String,
        secret: String,
        agent: &str,
        model: &str,
        every: Duration,
    ) -> Conversation {
        let talking = Arc::new(AtomicBool::new(true));
        let (t, agent, model) = (talking.clone(), agent.to_owned(), model.to_owned());
        let task = tokio::spawn(async move {
            while t.load(Ordering::Relaxed) {
                chat_as_agent(&client, &openai_url, &secret, &agent, &model).await;
                tokio::time::sleep(every).await;
            }
        });
        Conversation { talking, task }
    }

    /// Stops after the chat in flight and waits for the task to end.
    pub async fn stop(self) {
        self.talking.store(false, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

/// The control plane's `/metrics` text (`GET` on its HTTP listener).
///
/// # Panics
/// When it does not answer within 10 s.
#[track_caller]
pub fn cp_metrics(cp: &ControlPlane) -> String {
    super::http::request(
        cp.http_addr(),
        "GET",
        "/metrics",
        None,
        Duration::from_secs(10),
    )
    .expect("the control plane's /metrics")
    .text()
}

/// The value of the first line of a `/metrics` text that starts with
/// `series` (a name, or a name with its labels); 0 when there is none.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

/// An agent in a live conversation through a new proxy: adds the client key
/// `chat-app` bound to `agent` (`--agents`), starts the heartbeat proxy
/// ([`start_heartbeat_proxy`]), waits up to 10 s until it accepts the key
/// ([`wait_key_accepted`]) and starts a [`Conversation`] of `agent` on
/// `model`, a chat every `every`.
///
/// # Panics
/// When `clawctl` fails, the proxy does not come up or never takes the key.
pub async fn proxy_with_conversation(
    cp: &ControlPlane,
    fwd: &Forwarder,
    agent: &str,
    model: &str,
    every: Duration,
) -> (Proxy, Conversation) {
    let secret = add_client_key(cp, "chat-app", &["--agents", agent]);
    let proxy = start_heartbeat_proxy(cp, fwd);
    let client = reqwest::Client::new();
    let url = proxy.openai_url();
    wait_key_accepted(
        &client,
        &url,
        &secret,
        agent,
        model,
        Duration::from_secs(10),
    )
    .await;
    let conversation = Conversation::start(client, url, secret, agent, model, every);
    (proxy, conversation)
}

/// The `X-Claw-Signature` the control plane sends with `body` when it signs
/// with `secret`: `sha256=` and the hex HMAC-SHA256 of the body bytes.
pub fn webhook_signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// One request a [`serve_hooks`] server received.
#[derive(Debug, Clone)]
pub struct HookRequest {
    /// The `Idempotency-Key` header (empty when absent).
    pub idempotency_key: String,
    /// The `X-Claw-Signature` header (empty when absent); compare with
    /// [`webhook_signature`].
    pub signature: String,
    /// The `X-Claw-Delivery-Attempt` header (empty when absent).
    pub attempt: String,
    /// The body bytes as received.
    pub body: Vec<u8>,
}

impl HookRequest {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// An in-test HTTP/1.1 server on a loopback port, standing in for a webhook
/// receiver or an agent runtime: each request is read whole and handed to
/// `answer`, whose return value is the status it gets (empty body). Returns
/// the address and the accept task (abort it to stop; dropped, it serves
/// until the runtime ends). Give agents `http://ADDR/…` URLs (the harness
/// control plane allows loopback webhooks).
///
/// # Panics
/// When no loopback port can be bound.
pub async fn serve_hooks(
    answer: impl Fn(HookRequest) -> u16 + Send + Sync + 'static,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the hook server");
    let addr = listener.local_addr().expect("hook server address");
    let answer = Arc::new(answer);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let answer = answer.clone();
                        async move {
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            let (idempotency_key, signature, attempt) = (
                                header("idempotency-key"),
                                header("x-claw-signature"),
                                header("x-claw-delivery-attempt"),
                            );
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let status = answer(HookRequest {
                                idempotency_key,
                                signature,
                                attempt,
                                body,
                            });
                            hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(bytes::Bytes::new()))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

//! A fake webhook receiver: what an agent owner's endpoint sees of the
//! control plane's heartbeat deliveries (alerts, `failed` / `recovered`
//! events). It records every call — idempotency key, signature header, the
//! body bytes and what it answered — and can be switched down (every call
//! answered 503) and up again (2xx).
//!
//! Signatures are checked by the tests (they hold the secret); the receiver
//! keeps the header and the exact bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::BodyExt as _;
use parking_lot::Mutex;
use tokio::net::TcpListener;

/// One call the receiver got.
#[derive(Debug, Clone)]
pub struct WebhookCall {
    /// The `Idempotency-Key` header.
    pub key: String,
    /// The `X-Claw-Signature` header (empty when absent).
    pub signature: String,
    /// The `X-Claw-Delivery-Attempt` header.
    pub attempt: String,
    /// The body bytes as received.
    pub body: Vec<u8>,
    /// The status the receiver answered.
    pub answered: u16,
}

impl WebhookCall {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    /// The body's `kind` field.
    pub fn kind(&self) -> String {
        self.json()["kind"].as_str().unwrap_or_default().to_string()
    }

    /// Whether the receiver accepted it (2xx).
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.answered)
    }
}

/// A running receiver on a loopback port; stops when dropped.
#[derive(Debug)]
pub struct WebhookReceiver {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<WebhookCall>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WebhookReceiver {
    /// Starts a receiver that is up (answers 204).
    pub async fn start() -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
        let addr = listener.local_addr().expect("receiver address");
        let up = Arc::new(AtomicBool::new(true));
        let calls: Arc<Mutex<Vec<WebhookCall>>> = Arc::default();
        let (u, c) = (up.clone(), calls.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (u, c) = (u.clone(), c.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (u, c) = (u.clone(), c.clone());
                            async move {
                                let header = |name: &str| {
                                    req.headers()
                                        .get(name)
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or_default()
                                        .to_string()
                                };
                                let key = header("idempotency-key");
                                let signature = header("x-claw-signature");
                                let attempt = header("x-claw-delivery-attempt");
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes().to_vec())
                                    .unwrap_or_default();
                                let answered = if u.load(Ordering::SeqCst) { 204 } else { 503 };
                                c.lock().push(WebhookCall {
                                    key,
                                    signature,
                                    attempt,
                                    body,
                                    answered,
                                });
                                hyper::Response::builder()
                                    .status(answered)
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
        WebhookReceiver {
            addr,
            up,
            calls,
            task,
        }
    }

    /// The URL to give an agent as `--webhook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Answer 2xx (`true`) or 503 (`false`) from now on.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<WebhookCall> {
        self.calls.lock().clone()
    }

    /// The calls it accepted (2xx).
    pub fn accepted(&self) -> Vec<WebhookCall> {
        self.calls().into_iter().filter(|c| c.accepted()).collect()
    }
}

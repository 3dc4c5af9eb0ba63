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

use parking_lot::Mutex;

use crate::harness::heartbeat::serve_hooks;

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
        let up = Arc::new(AtomicBool::new(true));
        let calls: Arc<Mutex<Vec<WebhookCall>>> = Arc::default();
        let (u, c) = (up.clone(), calls.clone());
        let (addr, task) = serve_hooks(move |req| {
            let answered = if u.load(Ordering::SeqCst) { 204 } else { 503 };
            c.lock().push(WebhookCall {
                key: req.idempotency_key,
                signature: req.signature,
                attempt: req.attempt,
                body: req.body,
                answered,
            });
            answered
        })
        .await;
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

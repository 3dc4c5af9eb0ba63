//! Alert delivery to the agent's webhook: a durable outbox, at least once.
//!
//! An alert becomes an outbox entry in the same transaction that moves its
//! run to `delivering` (see [`super::scheduler`]). This worker POSTs it:
//!
//! - body: JSON with a `kind` (fixed at enqueue, so every retry sends the
//!   same bytes):
//!
//!   | kind | when | fields |
//!   |---|---|---|
//!   | `alert` | a reply that is not `HEARTBEAT_OK` | `agent_id, run_id, nominal_time, trigger, model, reply, tokens, ...`; plus `recovered: true, failed_runs, since` when the run also ends a failure streak |
//!   | `failed` | the first failed run of a streak ([`super::streak`]) | `agent_id, run_id, slot, error, consecutive_failures, ...` |
//!   | `recovered` | the first successful run after a streak | `agent_id, run_id, slot, status, failed_runs, since` |
//!
//! - `Idempotency-Key: <run_id>`: the receiver de-duplicates retries (each
//!   run has at most one entry: its alert or its event);
//! - `X-Claw-Signature: sha256=<hex HMAC-SHA256(secret, body)>` with the
//!   agent's webhook secret or the control plane's global one
//!   (`CLAW_WEBHOOK_SECRET`); no header when neither is set. The secret is
//!   read at each attempt and never stored in the outbox;
//! - `X-Claw-Delivery-Attempt: <n>`.
//!
//! Every attempt connects through the SSRF guard ([`crate::net_guard`]):
//! an address refused by the policy (link-local/cloud metadata, the control
//! plane's own listeners, loopback without `--allow-loopback-webhooks`, …)
//! is never connected to, and the attempt fails with `webhook address …
//! refused: …`. Redirects are not followed (a `3xx` is a failed attempt).
//!
//! A 2xx marks it delivered; anything else is retried after a capped
//! exponential backoff with full jitter (`uniform(0, min(max, base·2^(n-1)))`)
//! until `max_attempts` attempts or `max_age` since enqueue, then it is
//! dead-lettered. The run's status (`delivered` / `dead_letter`, alerts
//! only: a `failed` run stays `failed`) and the end of the entry are written
//! by the scheduler in one transaction; until then the entry survives
//! restarts and is retried. A dead letter stays in the outbox, marked
//! [`OutboxEntry::dead`], until `RedeliverRuns` puts it back or retention
//! prunes its run.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac as _};
use http_body_util::{BodyExt as _, Full};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::dispatch::WebhookClient;
use super::runs::{RunKey, RunStore};
use crate::catalog::records;
use crate::shutdown::Shutdown;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-claw-signature";
/// The idempotency header (the run id).
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Concurrent delivery attempts.
const MAX_CONCURRENT: usize = 64;
/// Per-attempt timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

pub use super::outbox::{KIND_ALERT, KIND_FAILED, KIND_RECOVERED, OutboxEntry};

/// Retry policy and secrets.
#[derive(Clone)]
pub struct DeliveryConfig {
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// Age (since enqueue) after which a failing delivery is dead-lettered.
    pub max_age: Duration,
    /// First backoff cap.
    pub base_backoff: Duration,
    /// Largest backoff cap.
    pub max_backoff: Duration,
    /// `CLAW_WEBHOOK_SECRET`, used when the agent has none.
    pub global_secret: Option<String>,
}

impl std::fmt::Debug for DeliveryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryConfig")
            .field("max_attempts", &self.max_attempts)
            .field("max_age", &self.max_age)
            .field("base_backoff", &self.base_backoff)
            .field("max_backoff", &self.max_backoff)
            .field(
                "global_secret",
                &self.global_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_attempts: 8,
            max_age: Duration::from_secs(24 * 3600),
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            global_secret: None,
        }
    }
}

/// The backoff cap before attempt `attempts + 1`, after `attempts >= 1`
/// failures: `min(max, base · 2^(attempts-1))`.
pub fn backoff_cap(attempts: u32, base: Duration, max: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << exp).min(max)
}

/// Full jitter: a uniformly random delay in `[0, cap]`.
pub fn full_jitter(cap: Duration, rng: &mut impl rand::Rng) -> Duration {
    let ms = cap.as_millis().min(u64::MAX as u128) as u64;
    Duration::from_millis(rng.random_range(0..=ms))
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .map(claw_proto::serde_fmt::format_timestamp)
        .unwrap_or_default()
}

fn ts_ms(ms: i64) -> String {
    ts(&records::timestamp(ms))
}

fn trigger_name(run: &claw_proto::v1::HeartbeatRun) -> String {
    claw_proto::v1::RunTrigger::try_from(run.trigger)
        .map(|t| claw_proto::serde_fmt::short_name(t.as_str_name(), "RUN_TRIGGER_"))
        .unwrap_or_default()
}

/// The webhook body of an alert.
pub fn body(run: &claw_proto::v1::HeartbeatRun, reply: &str) -> Vec<u8> {
    alert_body(run, reply, None)
}

/// The webhook body of an alert; `recovered` = (failed runs, first failure
/// ms) when this run also ends a failure streak: one alert, marked
/// `"recovered": true`, instead of a separate `recovered` event.
pub fn alert_body(
    run: &claw_proto::v1::HeartbeatRun,
    reply: &str,
    recovered: Option<(u32, i64)>,
) -> Vec<u8> {
    let mut v = serde_json::json!({
        "kind": KIND_ALERT,
        "agent_id": run.agent_id,
        "run_id": run.run_id,
        "nominal_time": ts(&run.nominal_time),
        "started_at": ts(&run.started_at),
        "finished_at": ts(&run.finished_at),
        "trigger": trigger_name(run),
        "model": run.model,
        "reply": reply,
        "prompt_tokens": run.prompt_tokens,
        "completion_tokens": run.completion_tokens,
        "tokens": run.tokens,
    });
    if let Some((failed_runs, since_ms)) = recovered {
        v["recovered"] = true.into();
        v["failed_runs"] = failed_runs.into();
        v["since"] = ts_ms(since_ms).into();
    }
    v.to_string().into_bytes()
}

/// The webhook body of a `failed` event (the first failed run of a streak).
pub fn failed_body(run: &claw_proto::v1::HeartbeatRun, consecutive_failures: u32) -> Vec<u8> {
    serde_json::json!({
        "kind": KIND_FAILED,
        "agent_id": run.agent_id,
        "run_id": run.run_id,
        "slot": ts(&run.nominal_time),
        "nominal_time": ts(&run.nominal_time),
        "started_at": ts(&run.started_at),
        "finished_at": ts(&run.finished_at),
        "trigger": trigger_name(run),
        "model": run.model,
        "error": run.error,
        "consecutive_failures": consecutive_failures,
    })
    .to_string()
    .into_bytes()
}

/// The webhook body of a `recovered` event (the first successful run after
/// a streak of `failed_runs` failures that began at `since_ms`).
pub fn recovered_body(
    run: &claw_proto::v1::HeartbeatRun,
    failed_runs: u32,
    since_ms: i64,
) -> Vec<u8> {
    let status = claw_proto::v1::RunStatus::try_from(run.status)
        .map(|s| claw_proto::serde_fmt::short_name(s.as_str_name(), "RUN_STATUS_"))
        .unwrap_or_default();
    serde_json::json!({
        "kind": KIND_RECOVERED,
        "agent_id": run.agent_id,
        "run_id": run.run_id,
        "slot": ts(&run.nominal_time),
        "nominal_time": ts(&run.nominal_time),
        "finished_at": ts(&run.finished_at),
        "trigger": trigger_name(run),
        "model": run.model,
        "status": status,
        "failed_runs": failed_runs,
        "since": ts_ms(since_ms),
    })
    .to_string()
    .into_bytes()
}

/// Posts one webhook request; `Ok(status)` when an HTTP answer came back.
pub trait Webhook: Send + Sync + 'static {
    /// One attempt.
    fn post(
        &self,
        url: String,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<u16, String>>;
}

/// The real webhook client (also the wake poster), over the SSRF guard
/// ([`crate::net_guard`]): a refused address fails the attempt with
/// `address … refused: …`.
#[derive(Clone)]
pub struct HttpWebhook(pub WebhookClient);

impl std::fmt::Debug for HttpWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpWebhook")
    }
}

impl Webhook for HttpWebhook {
    fn post(
        &self,
        url: String,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<u16, String>> {
        let client = self.0.clone();
        Box::pin(async move {
            let mut req = http::Request::post(&url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::USER_AGENT, "claw-heartbeat");
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let req = req
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| format!("building the request: {e}"))?;
            let attempt = async {
                let resp =
                    client.request(req).await.map_err(|e| {
                        match crate::net_guard::refusal_in(&e) {
                            Some(refused) => refused.to_string(),
                            None => e.to_string(),
                        }
                    })?;
                let status = resp.status().as_u16();
                // Drain (bounded by the timeout) so the connection is reused.
                let _ = resp.into_body().collect().await;
                Ok(status)
            };
            match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                Ok(r) => r,
                Err(_) => Err(format!("timed out after {}s", ATTEMPT_TIMEOUT.as_secs())),
            }
        })
    }
}

/// Finds the signing secret of an agent (its own, else the global one).
pub trait SecretSource: Send + Sync + 'static {
    /// The secret, if any. Never log it.
    fn secret(&self, agent_id: &str) -> Option<String>;
}

/// How a delivery ended, for the scheduler to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryOutcome {
    /// The run.
    pub key: RunKey,
    /// Delivered (2xx) or dead-lettered.
    pub delivered: bool,
    /// Attempts made.
    pub attempts: u32,
    /// The last error, for dead letters.
    pub error: String,
}

/// The outbox worker.
pub struct DeliveryWorker {
    runs: RunStore,
    webhook: Arc<dyn Webhook>,
    secrets: Arc<dyn SecretSource>,
    config: DeliveryConfig,
    now: Arc<dyn Fn() -> i64 + Send + Sync>,
}

impl std::fmt::Debug for DeliveryWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryWorker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl DeliveryWorker {
    /// A worker over the outbox in `runs`.
    pub fn new(
        runs: RunStore,
        webhook: Arc<dyn Webhook>,
        secrets: Arc<dyn SecretSource>,
        config: DeliveryConfig,
    ) -> Self {
        DeliveryWorker {
            runs,
            webhook,
            secrets,
            config,
            now: Arc::new(records::now_ms),
        }
    }

    /// Delivers every stored entry and every entry sent on `new`, reporting
    /// each final outcome on `done`, until `stop`.
    pub async fn run(
        self,
        mut new: mpsc::UnboundedReceiver<(RunKey, OutboxEntry)>,
        done: mpsc::UnboundedSender<DeliveryOutcome>,
        mut stop: Shutdown,
    ) {
        let mut entries: HashMap<RunKey, OutboxEntry> = HashMap::new();
        let mut queue: BTreeSet<(i64, RunKey)> = BTreeSet::new();
        match self.runs.outbox() {
            Ok(stored) => {
                for (key, raw) in stored {
                    match <OutboxEntry as prost::Message>::decode(raw.as_slice()) {
                        // Dead letters wait for RedeliverRuns.
                        Ok(e) if e.dead => {}
                        Ok(e) => {
                            queue.insert((e.next_attempt_ms, key.clone()));
                            entries.insert(key, e);
                        }
                        Err(e) => tracing::error!(error = %e, "corrupt outbox entry skipped"),
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the heartbeat outbox"),
        }
        crate::heartbeat::metrics::outbox_depth(entries.len());
        let mut attempts: JoinSet<(RunKey, Result<u16, String>)> = JoinSet::new();
        loop {
            let now = (self.now)();
            while attempts.len() < MAX_CONCURRENT {
                let Some((at, _)) = queue.first() else { break };
                if *at > now {
                    break;
                }
                let Some((_, key)) = queue.pop_first() else {
                    break;
                };
                let Some(entry) = entries.get(&key) else {
                    continue;
                };
                attempts.spawn(self.attempt(key, entry));
            }
            let wake = queue
                .first()
                .filter(|_| attempts.len() < MAX_CONCURRENT)
                .map(|(at, _)| Duration::from_millis((at - now).max(0) as u64))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                () = tokio::time::sleep(wake) => {}
                msg = new.recv() => match msg {
                    Some((key, entry)) => {
                        queue.insert((entry.next_attempt_ms, key.clone()));
                        entries.insert(key, entry);
                        crate::heartbeat::metrics::outbox_depth(entries.len());
                    }
                    None => return,
                },
                Some(joined) = attempts.join_next(), if !attempts.is_empty() => {
                    let Ok((key, result)) = joined else { continue };
                    let Some(entry) = entries.get_mut(&key) else { continue };
                    if let Some(outcome) = self.settle(&key, entry, result) {
                        entries.remove(&key);
                        crate::heartbeat::metrics::outbox_depth(entries.len());
                        if done.send(outcome).is_err() {
                            return;
                        }
                    } else {
                        queue.insert((entry.next_attempt_ms, key));
                    }
                }
                () = stop.stopped() => return,
            }
        }
    }

    /// One attempt as a task.
    fn attempt(
        &self,
        key: RunKey,
        entry: &OutboxEntry,
    ) -> impl std::future::Future<Output = (RunKey, Result<u16, String>)> + Send + 'static {
        let mut headers = vec![
            (IDEMPOTENCY_HEADER, entry.run_id.clone()),
            ("x-claw-delivery-attempt", (entry.attempts + 1).to_string()),
        ];
        if let Some(secret) = self
            .secrets
            .secret(&entry.agent_id)
            .or_else(|| self.config.global_secret.clone())
        {
            headers.push((SIGNATURE_HEADER, signature(secret.as_bytes(), &entry.body)));
        }
        let post = self
            .webhook
            .post(entry.url.clone(), headers, entry.body.clone());
        async move { (key, post.await) }
    }

    /// Books an attempt's result: `Some(outcome)` when the delivery is over.
    fn settle(
        &self,
        key: &RunKey,
        entry: &mut OutboxEntry,
        result: Result<u16, String>,
    ) -> Option<DeliveryOutcome> {
        entry.attempts += 1;
        let now = (self.now)();
        let error = match result {
            Ok(s) if (200..300).contains(&s) => {
                tracing::info!(agent = %entry.agent_id, run_id = %entry.run_id, kind = entry.kind(), attempts = entry.attempts, "heartbeat webhook delivered");
                return Some(DeliveryOutcome {
                    key: key.clone(),
                    delivered: true,
                    attempts: entry.attempts,
                    error: String::new(),
                });
            }
            Ok(s) => format!("webhook answered {s}"),
            // "webhook address 169.254.169.254 refused: link-local/cloud metadata"
            Err(e) if crate::net_guard::is_refusal(&e) => format!("webhook {e}"),
            Err(e) => format!("webhook unreachable: {e}"),
        };
        let age = Duration::from_millis((now - entry.created_ms).max(0) as u64);
        if entry.attempts >= self.config.max_attempts || age >= self.config.max_age {
            tracing::warn!(agent = %entry.agent_id, run_id = %entry.run_id, kind = entry.kind(), attempts = entry.attempts, error = %error, "heartbeat webhook dead-lettered");
            return Some(DeliveryOutcome {
                key: key.clone(),
                delivered: false,
                attempts: entry.attempts,
                error,
            });
        }
        let cap = backoff_cap(
            entry.attempts,
            self.config.base_backoff,
            self.config.max_backoff,
        );
        let delay = full_jitter(cap, &mut rand::rng());
        tracing::info!(agent = %entry.agent_id, run_id = %entry.run_id, kind = entry.kind(), attempts = entry.attempts, retry_in_ms = delay.as_millis() as u64, error = %error, "heartbeat delivery failed; will retry");
        entry.next_attempt_ms = now + delay.as_millis() as i64;
        entry.last_error = error;
        if let Err(e) = self
            .runs
            .outbox_update(key, &prost::Message::encode_to_vec(&*entry))
        {
            tracing::warn!(error = %e, "cannot persist a delivery attempt");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (b, m) = (Duration::from_secs(1), Duration::from_secs(60));
        let caps: Vec<u64> = (1..=9).map(|n| backoff_cap(n, b, m).as_secs()).collect();
        assert_eq!(caps, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff_cap(u32::MAX, b, m), m);
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_cap_and_spreads() {
        let mut rng = rand::rng();
        let cap = Duration::from_millis(1000);
        let samples: Vec<Duration> = (0..2000).map(|_| full_jitter(cap, &mut rng)).collect();
        assert!(samples.iter().all(|d| *d <= cap));
        // Full jitter, not "cap ± a bit": both halves of the range are hit.
        assert!(samples.iter().any(|d| d.as_millis() < 250));
        assert!(samples.iter().any(|d| d.as_millis() > 750));
        assert_eq!(full_jitter(Duration::ZERO, &mut rng), Duration::ZERO);
    }

    /// A one-shot HTTP/1.1 server on loopback answering `response`; counts
    /// the connections it accepted.
    async fn answering(
        response: &'static str,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        (addr, hits)
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let (target, target_hits) = answering("HTTP/1.1 204 No Content\r\n\r\n").await;
        let redirect: &'static str = Box::leak(
            format!(
                "HTTP/1.1 302 Found\r\nLocation: http://{target}/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .into_boxed_str(),
        );
        let (hook, hook_hits) = answering(redirect).await;
        let webhook = HttpWebhook(super::super::dispatch::webhook_client().expect("client"));
        let status = webhook
            .post(format!("http://{hook}/hook"), Vec::new(), b"{}".to_vec())
            .await;
        assert_eq!(status, Ok(302), "a redirect is an answer, not followed");
        assert_eq!(hook_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(target_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_refused_address_fails_the_attempt_with_the_refusal() {
        let webhook = HttpWebhook(super::super::dispatch::webhook_client().expect("client"));
        let err = webhook
            .post(
                "http://169.254.169.254/latest/meta-data/".into(),
                Vec::new(),
                b"{}".to_vec(),
            )
            .await
            .expect_err("refused");
        assert_eq!(
            err,
            "address 169.254.169.254 refused: link-local/cloud metadata"
        );
        assert!(crate::net_guard::is_refusal(&err));
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

//! Wake mode: instead of calling a model, a slot of an agent with target
//! `wake` asks the agent's own runtime (an OpenClaw gateway's hooks
//! endpoint, goclaw, Clawith) to run its checklist with its own tools.
//!
//! **The wake request.** `POST {wake_url}` with the JSON body
//! `{agent_id, run_id, slot, checklist, session_key, callback_url,
//! callback_token}` (`slot` in RFC 3339), `X-Claw-Signature:
//! sha256=<hex HMAC-SHA256(secret, body)>` with the same secret and scheme as
//! webhook deliveries ([`super::delivery`]), `Idempotency-Key: <run_id>`,
//! bounded by the run's timeout. A 2xx makes the run `dispatched`; any other
//! answer or a connect error makes it `failed`. The claim (with the token's
//! hash) is committed before the POST, and a restarted control plane never
//! re-POSTs: a `running` wake is failed like any interrupted run, a
//! `dispatched` one keeps waiting for its callback.
//!
//! **The callback.** `POST {public url}/v1/heartbeat/runs/{run_id}/result`
//! with `Authorization: Bearer <callback_token>` and
//! `{"status": "ok"|"alert"|"failed", "reply": "...", "error": "..."}`, or just
//! `{"reply": "..."}` judged by the `HEARTBEAT_OK` rule of [`super::reply`].
//! The token is random per run, stored only as a SHA-256 hash and valid until
//! the run's deadline. Answers: 200 with the run, 401 (no or wrong token),
//! 403 (expired), 404 (unknown run), 409 (already reported with another
//! body; the same body again is 200), 400 (bad body). A run still
//! `dispatched` at its deadline ends `failed` ("the runtime never reported
//! back").
//!
//! This module holds the wire parts (request body, signature, token,
//! callback parsing, the HTTP answer); the scheduler owns the run records
//! (`scheduler/wake.rs`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use sha2::{Digest as _, Sha256};

use super::delivery::{IDEMPOTENCY_HEADER, SIGNATURE_HEADER, SecretSource, Webhook, signature};

/// Largest callback body accepted.
pub const MAX_CALLBACK_BYTES: usize = 256 * 1024;

/// The callback path prefix (`{prefix}{run_id}/result`).
pub const CALLBACK_PREFIX: &str = "/v1/heartbeat/runs/";

/// What the scheduler needs to send wake requests (set by the runtime;
/// without a poster, wake runs fail with a clear error).
#[derive(Clone, Default)]
pub struct WakeConfig {
    /// Base URL of callbacks: `--public-url` / `CLAW_CP_PUBLIC_URL`, or the
    /// HTTP listener's address.
    pub public_url: String,
    /// Posts the wake requests.
    pub poster: Option<Arc<dyn Webhook>>,
    /// Agents' webhook secrets (they sign wake requests too).
    pub secrets: Option<Arc<dyn SecretSource>>,
    /// `CLAW_WEBHOOK_SECRET`, for agents without their own.
    pub global_secret: Option<String>,
}

impl std::fmt::Debug for WakeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeConfig")
            .field("public_url", &self.public_url)
            .field("poster", &self.poster.is_some())
            .finish_non_exhaustive()
    }
}

/// One wake request to send.
#[derive(Clone)]
pub struct WakeRequest {
    /// The runtime's endpoint.
    pub url: String,
    /// The agent.
    pub agent_id: String,
    /// The run (idempotency key).
    pub run_id: String,
    /// The slot's nominal time, unix ms.
    pub slot_ms: i64,
    /// The checklist (HEARTBEAT.md).
    pub checklist: String,
    /// The heartbeat session key.
    pub session_key: String,
    /// Where the runtime reports back.
    pub callback_url: String,
    /// The bearer token of the callback (plaintext, only here).
    pub callback_token: String,
    /// Bound on the POST.
    pub timeout: Duration,
}

impl std::fmt::Debug for WakeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeRequest")
            .field("url", &self.url)
            .field("agent_id", &self.agent_id)
            .field("run_id", &self.run_id)
            .field("callback_token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The callback URL of a run.
pub fn callback_url(public_url: &str, run_id: &str) -> String {
    format!(
        "{}{CALLBACK_PREFIX}{run_id}/result",
        public_url.trim_end_matches('/')
    )
}

/// A fresh callback token for the run at `key`, and its stored hash. The
/// token is `hbt_<64 random hex>_<slot ms>_<agent id>`: the random part is
/// the secret; the slot and agent (which the runtime knows anyway) let a
/// restarted control plane find the run's record for a late or repeated
/// callback.
pub fn new_token(key: &super::runs::RunKey) -> (String, Vec<u8>) {
    use rand::RngCore as _;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    let token = format!("hbt_{}_{}_{}", hex::encode(b), key.nominal_ms, key.agent_id);
    let hash = token_hash(&token);
    (token, hash)
}

/// The run key a token names (see [`new_token`]); not a proof of anything
/// until the token's hash matches the record's.
pub fn key_of_token(token: &str) -> Option<super::runs::RunKey> {
    let mut parts = token.splitn(4, '_');
    if parts.next()? != "hbt" || parts.next()?.len() != 64 {
        return None;
    }
    let ms: i64 = parts.next()?.parse().ok()?;
    let agent = parts.next().filter(|a| !a.is_empty())?;
    Some(super::runs::RunKey::new(agent, ms))
}

/// SHA-256 of a token (or a body).
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Whether `token` matches the stored `hash` (constant time).
pub fn token_matches(token: &str, hash: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    !hash.is_empty() && bool::from(token_hash(token).as_slice().ct_eq(hash))
}

/// The JSON body of a wake request.
pub fn body(req: &WakeRequest) -> Vec<u8> {
    let slot = jiff::Timestamp::from_millisecond(req.slot_ms)
        .map(|t| t.to_string())
        .unwrap_or_default();
    serde_json::json!({
        "agent_id": req.agent_id,
        "run_id": req.run_id,
        "slot": slot,
        "checklist": req.checklist,
        "session_key": req.session_key,
        "callback_url": req.callback_url,
        "callback_token": req.callback_token,
    })
    .to_string()
    .into_bytes()
}

/// How the error of a wake that reached no runtime starts (the scheduler
/// retries those).
pub const UNREACHABLE_PREFIX: &str = "the agent runtime is unreachable";

/// Sends one wake request: `Ok(())` on a 2xx, else the run's error (`wake
/// address … refused: …` when the SSRF guard refused every address of the
/// runtime, see [`crate::net_guard`]).
pub fn send(config: &WakeConfig, req: WakeRequest) -> BoxFuture<'static, Result<(), String>> {
    let Some(poster) = config.poster.clone() else {
        return Box::pin(async { Err("wake requests are not configured".to_string()) });
    };
    let body = body(&req);
    let mut headers = vec![(IDEMPOTENCY_HEADER, req.run_id.clone())];
    if let Some(secret) = config
        .secrets
        .as_ref()
        .and_then(|s| s.secret(&req.agent_id))
        .or_else(|| config.global_secret.clone())
    {
        headers.push((SIGNATURE_HEADER, signature(secret.as_bytes(), &body)));
    }
    let post = poster.post(req.url.clone(), headers, body);
    let timeout = req.timeout;
    Box::pin(async move {
        match tokio::time::timeout(timeout, post).await {
            Ok(Ok(status)) if (200..300).contains(&status) => Ok(()),
            Ok(Ok(status)) => Err(format!("the agent runtime answered {status}")),
            // Refused by the SSRF guard: fails at once (no retry).
            Ok(Err(e)) if crate::net_guard::is_refusal(&e) => Err(format!("wake {e}")),
            Ok(Err(e)) => Err(format!("{UNREACHABLE_PREFIX}: {e}")),
            Err(_) => Err(format!(
                "the agent runtime did not answer within {}s",
                timeout.as_secs_f64()
            )),
        }
    })
}

/// What a runtime reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Done, nothing to tell the owner (`"status": "ok"`).
    Ok,
    /// A `HEARTBEAT_OK` reply.
    Suppressed(String),
    /// Something needs attention: deliver `reply` to the webhook.
    Alert(String),
    /// The runtime could not run the checklist.
    Failed(String),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CallbackBody {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    reply: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// Parses a callback body (see the module doc).
pub fn parse_report(raw: &[u8]) -> Result<Report, String> {
    let b: CallbackBody =
        serde_json::from_slice(raw).map_err(|e| format!("body is not a valid result: {e}"))?;
    let reply = b.reply.unwrap_or_default();
    match b.status.as_deref().map(str::trim) {
        Some("ok") => Ok(match super::reply::classify(&reply) {
            super::reply::ReplyKind::Suppressed => Report::Suppressed(reply),
            _ => Report::Ok,
        }),
        Some("alert") => Ok(Report::Alert(reply)),
        Some("failed") => Ok(Report::Failed(
            b.error
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| "the agent runtime reported a failure".into()),
        )),
        Some(other) => Err(format!(
            "status {other:?} is not one of \"ok\", \"alert\", \"failed\""
        )),
        None if b.error.is_some() && reply.is_empty() => {
            Err("status is required with error (\"failed\")".to_string())
        }
        None => Ok(match super::reply::classify(&reply) {
            super::reply::ReplyKind::Suppressed => Report::Suppressed(reply),
            super::reply::ReplyKind::Alert(_) => Report::Alert(reply),
        }),
    }
}

/// Why a callback was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    /// No such (wake) run.
    #[error("run {0:?} not found")]
    NotFound(String),
    /// Missing or wrong token.
    #[error("missing or invalid callback token")]
    Unauthorized,
    /// The run's deadline passed.
    #[error("the callback token expired at the run's deadline")]
    Expired,
    /// Already reported, with another body.
    #[error("run {0:?} already reported its result")]
    Conflict(String),
    /// A body that is not a result.
    #[error("{0}")]
    BadRequest(String),
    /// The scheduler could not take it now.
    #[error("the heartbeat scheduler is unavailable; retry")]
    Unavailable,
}

impl CallbackError {
    fn status(&self) -> StatusCode {
        match self {
            CallbackError::NotFound(_) => StatusCode::NOT_FOUND,
            CallbackError::Unauthorized => StatusCode::UNAUTHORIZED,
            CallbackError::Expired => StatusCode::FORBIDDEN,
            CallbackError::Conflict(_) => StatusCode::CONFLICT,
            CallbackError::BadRequest(_) => StatusCode::BAD_REQUEST,
            CallbackError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            CallbackError::NotFound(_) => "not_found",
            CallbackError::Unauthorized => "unauthorized",
            CallbackError::Expired => "token_expired",
            CallbackError::Conflict(_) => "already_reported",
            CallbackError::BadRequest(_) => "invalid_request",
            CallbackError::Unavailable => "unavailable",
        }
    }
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// The HTTP answer to a refused callback: `{"error": {"message", "type"}}`.
pub fn error_response(e: &CallbackError) -> Response<Full<Bytes>> {
    json(
        e.status(),
        &serde_json::json!({"error": {"message": e.to_string(), "type": e.kind()}}),
    )
}

/// The HTTP answer to an accepted callback: the run's id and status.
pub fn ok_response(run: &claw_proto::v1::HeartbeatRun) -> Response<Full<Bytes>> {
    let status = claw_proto::v1::RunStatus::try_from(run.status)
        .map(super::metrics::status_name)
        .unwrap_or_default();
    json(
        StatusCode::OK,
        &serde_json::json!({"run_id": run.run_id, "status": status}),
    )
}

/// The run id of a callback path (`/v1/heartbeat/runs/{id}/result`).
pub fn run_id_of(path: &str) -> Option<&str> {
    let id = path
        .strip_prefix(CALLBACK_PREFIX)?
        .strip_suffix("/result")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(value: Option<&http::HeaderValue>) -> Option<String> {
    let v = value?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_bodies() {
        assert_eq!(parse_report(br#"{"status":"ok"}"#), Ok(Report::Ok));
        assert_eq!(
            parse_report(br#"{"reply":"HEARTBEAT_OK"}"#),
            Ok(Report::Suppressed("HEARTBEAT_OK".into()))
        );
        assert_eq!(
            parse_report(br#"{"reply":"disk full"}"#),
            Ok(Report::Alert("disk full".into()))
        );
        assert_eq!(
            parse_report(br#"{"status":"alert","reply":"card 12 overdue"}"#),
            Ok(Report::Alert("card 12 overdue".into()))
        );
        assert_eq!(
            parse_report(br#"{"status":"failed","error":"tool crashed"}"#),
            Ok(Report::Failed("tool crashed".into()))
        );
        assert!(parse_report(br#"{"status":"maybe"}"#).is_err());
        assert!(parse_report(br#"{"statu":"ok"}"#).is_err());
        assert!(parse_report(b"nope").is_err());
    }

    #[test]
    fn tokens_are_checked_by_hash() {
        let key = super::super::runs::RunKey::new("agent_1.x", 1_700_000_040_000);
        let (token, hash) = new_token(&key);
        assert!(token_matches(&token, &hash));
        assert_eq!(key_of_token(&token), Some(key));
        assert_eq!(key_of_token("hbt_short_1_a"), None);
        assert_eq!(key_of_token("nope"), None);
        assert!(!token_matches("hbt_other", &hash));
        assert!(!token_matches(&token, &[]));
        assert_eq!(run_id_of("/v1/heartbeat/runs/hbr_1/result"), Some("hbr_1"));
        assert_eq!(run_id_of("/v1/heartbeat/runs//result"), None);
        assert_eq!(run_id_of("/v1/heartbeat/runs/a/b/result"), None);
        let h = http::HeaderValue::from_static("Bearer abc");
        assert_eq!(bearer(Some(&h)).as_deref(), Some("abc"));
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn the_wake_body_carries_the_callback() {
        let req = WakeRequest {
            url: "http://rt/hooks".into(),
            agent_id: "a1".into(),
            run_id: "hbr_1".into(),
            slot_ms: 1_700_000_040_000,
            checklist: "- [ ] inbox".into(),
            session_key: "agent:a1:heartbeat".into(),
            callback_url: callback_url("http://cp:9090/", "hbr_1"),
            callback_token: "hbt_x".into(),
            timeout: Duration::from_secs(5),
        };
        let v: serde_json::Value = serde_json::from_slice(&body(&req)).expect("json");
        assert_eq!(v["slot"], "2023-11-14T22:14:00Z");
        assert_eq!(
            v["callback_url"],
            "http://cp:9090/v1/heartbeat/runs/hbr_1/result"
        );
        assert_eq!(v["callback_token"], "hbt_x");
        assert!(!format!("{req:?}").contains("hbt_x"));
    }
}

//! One health probe: a cheap, protocol-aware request with the backend's
//! own key (`GET {base_url}/models`: `Authorization: Bearer` for OpenAI,
//! `x-api-key` and `anthropic-version` for Anthropic), and the
//! classification of its answer.
//!
//! | answer | verdict |
//! |---|---|
//! | 2xx | ok |
//! | connect error, timeout, 5xx (529 included) | failed |
//! | 401 / 403 | failed, and the provider rejected the key (`auth_failed`) |
//! | anything else (404, 405, 429 …) | ok: the server is alive |

use std::time::{Duration, Instant};

use bytes::Bytes;
use claw_proto::v1::Api;
use http_body_util::{BodyExt, Full};

use super::table::ProbeResult;
use crate::heartbeat::dispatch::{ANTHROPIC_VERSION, HttpClient};

/// Bytes of a probe's answer read (and dropped) so the connection is reused.
const MAX_BODY: usize = 64 * 1024;

/// What a probe needs of a backend. `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// The backend's id.
    pub id: String,
    /// Its name (for logs).
    pub name: String,
    /// Its base URL (`…/v1`).
    pub base_url: String,
    /// Its protocol.
    pub api: Api,
    /// The provider key, plaintext. Never logged.
    pub key: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

/// A probe's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The server is alive.
    Ok,
    /// It failed (connect, timeout, 5xx).
    Failed,
    /// The provider rejected the key (401/403).
    AuthFailed(u16),
}

/// A probe's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Ok, failed or auth failed.
    pub verdict: Verdict,
    /// "ok: 200 in 84 ms", "connect: connection refused", "status 503 in
    /// 12 ms", "timeout after 10s".
    pub summary: String,
    /// How long it took.
    pub elapsed: Duration,
}

impl Outcome {
    /// The table's view of it.
    pub fn result(&self) -> ProbeResult {
        ProbeResult {
            ok: self.verdict == Verdict::Ok,
            summary: self.summary.clone(),
        }
    }

    /// The `result` label of `claw_cp_backend_probes_total`.
    pub fn label(&self) -> &'static str {
        match self.verdict {
            Verdict::Ok => "ok",
            Verdict::Failed => "failed",
            Verdict::AuthFailed(_) => "auth_failed",
        }
    }
}

/// The probe request of `target`.
pub fn request(target: &Target) -> Result<http::Request<Full<Bytes>>, String> {
    let url = format!("{}/models", target.base_url.trim_end_matches('/'));
    let builder =
        http::Request::get(&url).header(http::header::USER_AGENT, "claw-control-plane-probe");
    let builder = match target.api {
        Api::Anthropic => builder
            .header("x-api-key", &target.key)
            .header("anthropic-version", ANTHROPIC_VERSION),
        Api::Openai | Api::Unspecified => builder.header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", target.key),
        ),
    };
    // The error names neither the URL's credentials nor the key.
    builder
        .body(Full::new(Bytes::new()))
        .map_err(|_| "request: invalid base URL or key".to_string())
}

/// The verdict of an HTTP status.
pub fn classify(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Ok,
        401 | 403 => Verdict::AuthFailed(status),
        500..=599 => Verdict::Failed,
        _ => Verdict::Ok,
    }
}

/// Probes `target` once, within `timeout`.
pub async fn run(client: &HttpClient, target: &Target, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let request = match request(target) {
        Ok(r) => r,
        Err(summary) => {
            return Outcome {
                verdict: Verdict::Failed,
                summary,
                elapsed: started.elapsed(),
            };
        }
    };
    let call = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| connect_error(&e))?;
        let status = response.status().as_u16();
        // Drain a little of the body so the connection can be reused.
        let _ = http_body_util::Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await;
        Ok::<u16, String>(status)
    };
    let answer = tokio::time::timeout(timeout, call).await;
    let elapsed = started.elapsed();
    let ms = elapsed.as_millis();
    match answer {
        Err(_) => Outcome {
            verdict: Verdict::Failed,
            summary: format!("timeout after {}", humantime::format_duration(timeout)),
            elapsed,
        },
        Ok(Err(e)) => Outcome {
            verdict: Verdict::Failed,
            summary: format!("connect: {e}"),
            elapsed,
        },
        Ok(Ok(status)) => {
            let verdict = classify(status);
            let summary = match verdict {
                Verdict::Ok if (200..300).contains(&status) => format!("ok: {status} in {ms} ms"),
                Verdict::Ok => format!("ok: status {status} in {ms} ms (server alive)"),
                Verdict::AuthFailed(_) => format!("status {status} in {ms} ms (key rejected)"),
                Verdict::Failed => format!("status {status} in {ms} ms"),
            };
            Outcome {
                verdict,
                summary,
                elapsed,
            }
        }
    }
}

/// The innermost cause of a client error ("connection refused"), which
/// hyper's own message ("client error (Connect)") hides.
fn connect_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner: &(dyn std::error::Error + 'static) = e;
    while let Some(source) = inner.source() {
        inner = source;
    }
    let text = inner.to_string();
    // "Connection refused (os error 111)" → "connection refused".
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(api: Api) -> Target {
        Target {
            id: "be_1".into(),
            name: "one".into(),
            base_url: "http://127.0.0.1:9/v1/".into(),
            api,
            key: "sk-secret-0123456789".into(),
        }
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(classify(200), Verdict::Ok);
        assert_eq!(classify(204), Verdict::Ok);
        assert_eq!(classify(401), Verdict::AuthFailed(401));
        assert_eq!(classify(403), Verdict::AuthFailed(403));
        assert_eq!(classify(500), Verdict::Failed);
        assert_eq!(classify(503), Verdict::Failed);
        assert_eq!(classify(529), Verdict::Failed);
        for alive in [301, 400, 404, 405, 429] {
            assert_eq!(classify(alive), Verdict::Ok, "{alive}");
        }
    }

    #[test]
    fn requests_carry_the_key_the_protocol_expects() {
        let r = request(&target(Api::Openai)).expect("request");
        assert_eq!(r.uri().to_string(), "http://127.0.0.1:9/v1/models");
        assert_eq!(r.method(), http::Method::GET);
        assert_eq!(
            r.headers()[http::header::AUTHORIZATION],
            "Bearer sk-secret-0123456789"
        );
        assert!(!r.headers().contains_key("x-api-key"));
        let r = request(&target(Api::Anthropic)).expect("request");
        assert_eq!(r.headers()["x-api-key"], "sk-secret-0123456789");
        assert_eq!(r.headers()["anthropic-version"], "2023-06-01");
        assert!(!r.headers().contains_key(http::header::AUTHORIZATION));
    }

    #[test]
    fn debug_hides_the_key() {
        assert!(!format!("{:?}", target(Api::Openai)).contains("sk-secret"));
    }

    #[tokio::test]
    async fn a_refused_connection_fails_and_says_so() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let mut t = target(Api::Openai);
        t.base_url = format!("http://127.0.0.1:{port}/v1");
        let client = crate::heartbeat::dispatch::http_client().expect("client");
        let o = run(&client, &t, Duration::from_secs(5)).await;
        assert_eq!(o.verdict, Verdict::Failed);
        assert_eq!(o.label(), "failed");
        assert!(o.summary.starts_with("connect: "), "{}", o.summary);
        assert!(o.summary.contains("refused"), "{}", o.summary);
        assert!(!o.summary.contains("sk-secret"));
    }
}

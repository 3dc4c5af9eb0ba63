//! The typed requests the layers hand inward, each a layer's contract with
//! the next (as linkerd's `Param` targets are):
//!
//! - [`Authenticated`]: set by [`crate::auth`] as a request extension, read
//!   by [`crate::limits`] and [`crate::route`];
//! - [`Routed`]: what [`crate::route`] hands [`crate::retry`] once the body
//!   is read and the model resolved, with its [`RequestBody`];
//! - [`RequestId`]: set by the server on every request (an extension), sent
//!   back as `x-request-id`, forwarded upstream and on every log line.
//!
//! A leaf: it names only configuration ([`crate::snapshot`]) and plain data.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header::HeaderName};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::affinity::Affinity;
use crate::queue::Priority;
use crate::snapshot::{Api, ClientKey, Route, Snapshot};
use crate::usage::StreamUsage;

/// Set by [`crate::auth::Auth`] on every request it lets through (a
/// request extension): the snapshot and key the whole request is served under.
#[derive(Clone)]
pub(crate) struct Authenticated {
    /// The snapshot this request is served under.
    pub snapshot: Arc<Snapshot>,
    /// The client's key.
    pub key: Arc<ClientKey>,
}

/// A request's id: the client's own `x-request-id` when it is sane (1–128
/// of `[A-Za-z0-9._:-]`, so it is safe in a header and a log line), else 16
/// random hex digits. Returned to the client as `x-request-id`, forwarded
/// upstream in its place, and a field of every log line about the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RequestId(Arc<str>);

impl RequestId {
    /// The header that carries it, both ways.
    pub(crate) const HEADER: HeaderName = HeaderName::from_static("x-request-id");
    /// The longest client id kept.
    const MAX_LEN: usize = 128;

    /// The client's id from `headers` if it is sane, else a new one.
    pub(crate) fn of(headers: &HeaderMap) -> RequestId {
        headers
            .get(&Self::HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|s| Self::sane(s))
            .map(|s| RequestId(s.into()))
            .unwrap_or_else(RequestId::generate)
    }

    /// A new random id.
    pub(crate) fn generate() -> RequestId {
        RequestId(format!("{:016x}", rand::random::<u64>()).into())
    }

    fn sane(s: &str) -> bool {
        (1..=Self::MAX_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    }

    /// The id as a header value.
    pub(crate) fn header_value(&self) -> HeaderValue {
        // Only visible ASCII (checked or generated) gets here.
        HeaderValue::from_str(&self.0).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The error shape a client expects, by the endpoint it called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Wire {
    /// `{"error":{"message","type","param","code"}}`.
    #[default]
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`.
    Anthropic,
}

impl Wire {
    /// Anthropic for `/v1/messages` and below, else OpenAI.
    pub(crate) fn for_path(path: &str) -> Wire {
        match path.strip_prefix("/v1/messages") {
            Some("") => Wire::Anthropic,
            Some(rest) if rest.starts_with('/') => Wire::Anthropic,
            _ => Wire::OpenAi,
        }
    }
}

/// A client endpoint the proxy serves upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/responses`.
    Responses,
    /// `GET /v1/responses/{id}`.
    ResponsesGet,
    /// `DELETE /v1/responses/{id}`.
    ResponsesDelete,
    /// `POST /v1/messages`.
    Messages,
    /// `POST /v1/messages/count_tokens`.
    CountTokens,
}

impl Endpoint {
    /// The protocol the endpoint belongs to (and its backends speak).
    pub(crate) fn api(self) -> Api {
        match self {
            Endpoint::Messages | Endpoint::CountTokens => Api::Anthropic,
            _ => Api::OpenAi,
        }
    }

    /// The client's wire for errors: Anthropic-shaped for Messages.
    pub(crate) fn is_anthropic(self) -> bool {
        self.api() == Api::Anthropic
    }

    /// The error shape the endpoint's clients expect.
    pub(crate) fn wire(self) -> Wire {
        if self.is_anthropic() {
            Wire::Anthropic
        } else {
            Wire::OpenAi
        }
    }

    /// The upstream method.
    pub(crate) fn method(self) -> http::Method {
        match self {
            Endpoint::ResponsesGet => http::Method::GET,
            Endpoint::ResponsesDelete => http::Method::DELETE,
            _ => http::Method::POST,
        }
    }

    /// The upstream path after the base URL (for `ResponsesGet`/`Delete`,
    /// the id follows it).
    pub(crate) fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses | Endpoint::ResponsesGet | Endpoint::ResponsesDelete => {
                "/responses"
            }
            Endpoint::Messages => "/messages",
            Endpoint::CountTokens => "/messages/count_tokens",
        }
    }

    /// Whether a backend of the other protocol may serve the endpoint,
    /// translated ([`crate::translate`]): Chat Completions and Messages.
    pub(crate) fn translates(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Messages)
    }

    /// Whether the endpoint names a stored response by path
    /// (`GET`/`DELETE /v1/responses/{id}`).
    pub(crate) fn by_response_id(self) -> bool {
        matches!(self, Endpoint::ResponsesGet | Endpoint::ResponsesDelete)
    }
}

/// A parsed, routed request on its way to the retry layer.
pub(crate) struct Routed {
    /// The snapshot the request is served under.
    pub snapshot: Arc<Snapshot>,
    /// The client key.
    pub key: Arc<ClientKey>,
    /// The model's route.
    pub route: Arc<Route>,
    /// The client endpoint.
    pub endpoint: Endpoint,
    /// Upstream path after the base URL (`/chat/completions`; `/responses`
    /// for `GET`/`DELETE /v1/responses/{id}`, whose id is `response_id`).
    pub path: &'static str,
    /// The client's query string, if any.
    pub query: Option<String>,
    /// Headers to forward (already filtered).
    pub headers: HeaderMap,
    /// The JSON body; `model` is rewritten per attempt.
    pub body: RequestBody,
    /// The client's body parsed, for translated attempts
    /// ([`crate::translate`]): filled on the first one, never on the
    /// native path (which forwards the bytes as they came).
    pub parsed: Option<Map<String, Value>>,
    /// `stream: true`.
    pub stream: bool,
    /// Scheduling class.
    pub priority: Priority,
    /// `x-claw-agent-id`.
    pub agent_id: Option<String>,
    /// `x-claw-run-kind`: heartbeat runs are accounted apart and are never
    /// agent activity.
    pub run_kind: crate::run_kind::RunKind,
    /// Estimated tokens (max output + prompt estimate), reserved on tpm.
    pub est_tokens: f64,
    /// Estimated prompt tokens (the fallback when a stream reports no usage).
    pub est_prompt_tokens: u64,
    /// For streaming completions: whether the client asked for usage or the
    /// proxy did on its behalf ([`crate::usage::request_stream_usage`]).
    pub stream_usage: Option<StreamUsage>,
    /// The session's affinity ([`crate::affinity`]), if it has a key.
    pub affinity: Option<Affinity>,
    /// The stored response this request continues or names
    /// (`previous_response_id`, or the id of `GET`/`DELETE
    /// /v1/responses/{id}`), which only its owner backend knows.
    pub response_id: Option<String>,
    /// The backend known to hold `response_id` ([`crate::responses::owner`]):
    /// tried first while it is eligible.
    pub owner: Option<Arc<str>>,
    /// The request's id ([`RequestId`]).
    pub request_id: RequestId,
    /// Arrival time.
    pub started: Instant,
    /// The request's trace span ([`tracing::Span::none`] unless traces are
    /// exported, see [`claw_telemetry::genai`]).
    pub span: tracing::Span,
}

/// A request body on its way upstream, with `model` rewritten per attempt.
#[derive(Debug)]
pub(crate) enum RequestBody {
    /// The client's bytes, forwarded as they are except for the `model`
    /// value at `model` (its JSON string, quotes included), which is
    /// replaced by the native id.
    Raw {
        /// The body as received.
        bytes: Bytes,
        /// Byte range of the `model` value.
        model: std::ops::Range<usize>,
    },
    /// A body that changes structurally (a stream asking for usage):
    /// parsed whole and serialised per attempt.
    Json(Map<String, Value>),
    /// No body (`GET`/`DELETE /v1/responses/{id}`).
    Empty,
}

impl Routed {
    /// The client's body as a JSON object, for a translated attempt: the
    /// parsed body when the route parsed it, else the client's bytes
    /// parsed now, once per request. `None` when it is not a JSON object.
    pub(crate) fn parsed_body(&mut self) -> Option<&Map<String, Value>> {
        match &self.body {
            RequestBody::Json(map) => Some(map),
            RequestBody::Raw { bytes, .. } => {
                if self.parsed.is_none() {
                    self.parsed = serde_json::from_slice(bytes).ok();
                }
                self.parsed.as_ref()
            }
            RequestBody::Empty => None,
        }
    }
}

impl RequestBody {
    /// The body to send with `model` set to `native`.
    pub(crate) fn with_model(&mut self, native: &str) -> Option<Bytes> {
        match self {
            RequestBody::Raw { bytes, model } => {
                let mut out = Vec::with_capacity(bytes.len() - model.len() + native.len() + 2 + 8);
                out.extend_from_slice(&bytes[..model.start]);
                serde_json::to_writer(&mut out, native).ok()?;
                out.extend_from_slice(&bytes[model.end..]);
                Some(Bytes::from(out))
            }
            RequestBody::Json(map) => {
                map.insert("model".into(), Value::String(native.to_string()));
                serde_json::to_vec(map).ok().map(Bytes::from)
            }
            RequestBody::Empty => Some(Bytes::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_for(client: Option<&str>) -> RequestId {
        let mut h = HeaderMap::new();
        if let Some(c) = client {
            h.insert("x-request-id", HeaderValue::from_str(c).unwrap());
        }
        RequestId::of(&h)
    }

    #[test]
    fn a_sane_client_request_id_is_kept() {
        for ok in ["abc", "req_01:x.y-z", &"a".repeat(128)] {
            assert_eq!(id_for(Some(ok)).to_string(), ok);
        }
    }

    #[test]
    fn a_missing_or_junk_request_id_is_replaced_by_16_hex() {
        for junk in [
            None,
            Some(""),
            Some("a b"),
            Some("x/y"),
            Some(&*"a".repeat(129)),
        ] {
            let id = id_for(junk).to_string();
            assert_eq!(id.len(), 16, "{junk:?}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }
}

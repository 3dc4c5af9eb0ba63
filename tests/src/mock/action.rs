//! Scripted behaviours: what the mock does instead of (or on top of) a normal
//! answer. Their JSON form is the one the control API accepts, e.g.
//! `{"status":429,"retry_after":2}` or `{"reset":"mid_stream","after_chunks":3}`.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One scripted behaviour. Fields combine: `{"delay_ms":500,"status":500}`
/// waits, then fails. An empty action answers normally.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// Only requests for this model consume (or match) the action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Answer with this HTTP status instead of a completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Seconds put in a `Retry-After` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// Response body: a JSON value, or raw text when it is a JSON string.
    /// Without it, an error status gets an OpenAI-format error body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// Drop the connection instead of answering (see [`ResetPoint`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<ResetPoint>,
    /// For `reset: mid_stream`: content chunks sent before the abort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_chunks: Option<u32>,
    /// Reply text for this request (split on whitespace into tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// Extra delay before the response head, on top of the configured latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

/// When a scripted reset drops the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetPoint {
    /// Close the connection without sending any response.
    Before,
    /// Send the head and some of the body, then abort: no `[DONE]`, no
    /// chunked terminator. Non-streaming answers are cut halfway.
    MidStream,
    /// Stream `after_chunks` content chunks, then send nothing more while
    /// keeping the connection open (a stalled upstream). Non-streaming
    /// answers are cut as with `mid_stream`.
    Stall,
}

impl Action {
    /// Answers with `status` and an OpenAI-format error body.
    pub fn status(status: u16) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }

    /// A 429, with `Retry-After: secs` when given.
    pub fn rate_limited(retry_after: Option<u64>) -> Self {
        Self {
            retry_after,
            ..Self::status(429)
        }
    }

    /// Closes the connection without a response.
    pub fn reset_before() -> Self {
        Self {
            reset: Some(ResetPoint::Before),
            ..Self::default()
        }
    }

    /// Streams `after_chunks` content chunks, then aborts the connection.
    pub fn reset_mid_stream(after_chunks: u32) -> Self {
        Self {
            reset: Some(ResetPoint::MidStream),
            after_chunks: Some(after_chunks),
            ..Self::default()
        }
    }

    /// Streams `after_chunks` content chunks, then stalls (see
    /// [`ResetPoint::Stall`]).
    pub fn stall_after(after_chunks: u32) -> Self {
        Self {
            reset: Some(ResetPoint::Stall),
            after_chunks: Some(after_chunks),
            ..Self::default()
        }
    }

    /// Answers normally with this reply text.
    pub fn reply(text: impl Into<String>) -> Self {
        Self {
            reply: Some(text.into()),
            ..Self::default()
        }
    }

    /// Answers normally after an extra delay.
    pub fn delay(delay: Duration) -> Self {
        Self {
            delay_ms: Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
            ..Self::default()
        }
    }

    /// Restricts the action to requests for `model`.
    pub fn for_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Sets the response body (JSON, or raw text for a JSON string).
    pub fn with_body(mut self, body: serde_json::Value) -> Self {
        self.body = Some(body);
        self
    }

    /// Sets the `Retry-After` header.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// Adds an extra delay before the response.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay_ms = Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        self
    }

    pub(crate) fn applies_to(&self, model: Option<&str>) -> bool {
        match &self.model {
            None => true,
            Some(wanted) => model == Some(wanted.as_str()),
        }
    }
}

/// A persistent action applied to every request carrying a header value,
/// e.g. `{"match_header":["x-claw-agent-id","agent-b"],"reply":"ALERT: disk full"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RuleRepr", into = "RuleRepr")]
pub struct Rule {
    /// Header name (lowercase) and exact value to match.
    pub match_header: (String, String),
    /// What to do with a matching request.
    pub action: Action,
}

impl Rule {
    /// Applies `action` to requests whose header `name` equals `value`.
    pub fn header(name: impl Into<String>, value: impl Into<String>, action: Action) -> Self {
        Self {
            match_header: (name.into().to_ascii_lowercase(), value.into()),
            action,
        }
    }
}

/// The flat JSON form of a [`Rule`]. Done by hand rather than with
/// `#[serde(flatten)]` so that [`Action`] keeps rejecting unknown fields.
#[derive(Serialize, Deserialize)]
struct RuleRepr(serde_json::Map<String, serde_json::Value>);

impl TryFrom<RuleRepr> for Rule {
    type Error = String;

    fn try_from(RuleRepr(mut map): RuleRepr) -> Result<Self, Self::Error> {
        let matcher = map
            .remove("match_header")
            .ok_or("a rule needs \"match_header\": [name, value]")?;
        let (name, value): (String, String) =
            serde_json::from_value(matcher).map_err(|e| format!("match_header: {e}"))?;
        let action = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| format!("rule action: {e}"))?;
        Ok(Rule::header(name, value, action))
    }
}

impl From<Rule> for RuleRepr {
    fn from(rule: Rule) -> Self {
        let mut map = match serde_json::to_value(rule.action) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        map.insert(
            "match_header".to_owned(),
            serde_json::json!([rule.match_header.0, rule.match_header.1]),
        );
        RuleRepr(map)
    }
}

/// How `GET /v1/models` (and `/v1/models/{id}`) fails, for health-probe
/// tests: set with [`MockUpstream::set_models_fault`](super::MockUpstream::set_models_fault)
/// or `POST /_mock/models` (`{"status":503}`, `"hang"`, `"close"`, or
/// `null` to answer normally). Other routes are not affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelsFault {
    /// Answer this status with an error body in the caller's protocol
    /// (401 with a wrong-key message: the key is rejected).
    Status(u16),
    /// Never answer (until the client gives up).
    Hang,
    /// Close the connection without an answer.
    Close,
}

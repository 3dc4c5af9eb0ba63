//! Per-request outcomes, for usage reports and activity tracking.
//!
//! After each proxied request the proxy builds a [`RequestOutcome`] and
//! `try_send`s it into a bounded channel: the hot path never waits on the
//! consumer, and a full channel drops (and counts) the outcome instead. The
//! consumer is a no-op drain until usage reporting lands.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::queue::Priority;
use crate::stream::End;

/// Token usage reported by the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// Total tokens.
    pub total_tokens: u64,
}

impl Usage {
    /// Reads an OpenAI `usage` object.
    pub fn from_json(v: &serde_json::Value) -> Option<Usage> {
        let u = v.get("usage")?;
        let get = |k: &str| u.get(k).and_then(serde_json::Value::as_u64);
        let prompt_tokens = get("prompt_tokens").unwrap_or(0);
        let completion_tokens = get("completion_tokens").unwrap_or(0);
        let total_tokens = get("total_tokens").unwrap_or(prompt_tokens + completion_tokens);
        Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens,
        })
    }
}

/// What happened to one proxied request.
#[derive(Debug, Clone)]
pub struct RequestOutcome {
    /// Client key id.
    pub client_key_id: Arc<str>,
    /// `x-claw-agent-id`, if sent.
    pub agent_id: Option<String>,
    /// Canonical model.
    pub model: Arc<str>,
    /// Backend that produced the final response, if any did.
    pub backend_id: Option<Arc<str>>,
    /// HTTP status sent to the client.
    pub status: u16,
    /// True for `stream: true` requests.
    pub streamed: bool,
    /// Scheduling class.
    pub priority: Priority,
    /// From request arrival to the end of the response body.
    pub latency: Duration,
    /// From request arrival to the first response body byte.
    pub ttft: Option<Duration>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Usage, when a non-streaming JSON response carried it.
    pub usage: Option<Usage>,
    /// How the body ended (`None` for answers the proxy produced itself).
    pub end: Option<End>,
    /// USD cost from the model mapping, when usage is known.
    pub cost: Option<f64>,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<RequestOutcome>,
}

impl EventSink {
    /// Sends without waiting; drops the outcome when the channel is full.
    pub fn emit(&self, outcome: RequestOutcome) {
        if self.tx.try_send(outcome).is_err() {
            metrics::counter!("claw_dp_events_dropped_total").increment(1);
        }
    }
}

/// A bounded outcome channel.
pub fn channel(capacity: usize) -> (EventSink, mpsc::Receiver<RequestOutcome>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (EventSink { tx }, rx)
}

/// The consumer until usage reporting exists: drains and discards.
pub async fn discard(mut rx: mpsc::Receiver<RequestOutcome>) {
    while rx.recv().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_openai_json() {
        let v = serde_json::json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4}});
        assert_eq!(
            Usage::from_json(&v),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                total_tokens: 7
            })
        );
        assert_eq!(Usage::from_json(&serde_json::json!({})), None);
    }
}

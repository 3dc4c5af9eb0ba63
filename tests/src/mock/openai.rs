//! The OpenAI wire format as the mock speaks it: reading the few request
//! fields it needs, deterministic token accounting, and rendering bodies and
//! SSE chunks byte for byte.

use super::cache::Block;
use bytes::Bytes;
use serde_json::{Value, json};
use std::sync::Arc;

/// The `/v1` endpoints that produce tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

/// What the mock reads from a request body.
#[derive(Debug, Default)]
pub(crate) struct RequestInfo {
    pub(crate) model: Option<String>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) prompt_tokens: u64,
    pub(crate) max_tokens: Option<u64>,
    /// Embedding inputs as text (token arrays rendered as numbers).
    pub(crate) inputs: Vec<String>,
    pub(crate) dimensions: Option<usize>,
    /// The tool call to answer with (chat only; see `tools`).
    pub(crate) tool_call: Option<super::tools::ToolCall>,
}

impl RequestInfo {
    pub(crate) fn parse(endpoint: Endpoint, body: &Value) -> Self {
        let prompt_tokens = match endpoint {
            Endpoint::Chat => body
                .get("messages")
                .and_then(Value::as_array)
                .map_or(0, |msgs| {
                    msgs.iter()
                        .map(|m| m.get("content").map_or(0, count_tokens))
                        .sum()
                }),
            Endpoint::Completions => body.get("prompt").map_or(0, count_tokens),
            Endpoint::Embeddings => body.get("input").map_or(0, count_tokens),
        };
        let stream = endpoint != Endpoint::Embeddings
            && body.get("stream").and_then(Value::as_bool) == Some(true);
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let max_tokens = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| body.get(*k).and_then(Value::as_u64));
        let inputs = if endpoint == Endpoint::Embeddings {
            embedding_inputs(body.get("input"))
        } else {
            Vec::new()
        };
        Self {
            model: body.get("model").and_then(Value::as_str).map(str::to_owned),
            stream,
            include_usage,
            prompt_tokens: prompt_tokens.max(1),
            max_tokens,
            inputs,
            dimensions: body
                .get("dimensions")
                .and_then(Value::as_u64)
                .and_then(|d| usize::try_from(d).ok())
                .filter(|d| (1..=4096).contains(d)),
            tool_call: if endpoint == Endpoint::Chat {
                super::tools::chat_call(body)
            } else {
                None
            },
        }
    }
}

/// Whitespace-separated words of a string, of text parts of a content array,
/// or of every string of an array; a token id (number) counts as one.
pub(crate) fn count_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Number(_) => 1,
        Value::Array(items) => items.iter().map(count_tokens).sum(),
        Value::Object(part) => part.get("text").map_or(0, count_tokens),
        _ => 0,
    }
}

fn embedding_inputs(input: Option<&Value>) -> Vec<String> {
    match input {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![Value::Array(items.clone()).to_string()]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect(),
        _ => vec![String::new()],
    }
}

/// The tokens of one answer.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    words: Arc<[Box<str>]>,
    len: usize,
}

impl Reply {
    /// `tok0 … tok{n-1}`, built once per server.
    pub(crate) fn generated(n: u32) -> Self {
        let words: Arc<[Box<str>]> = (0..n).map(|i| format!("tok{i}").into()).collect();
        Self {
            len: words.len(),
            words,
        }
    }

    /// A scripted text, one token per whitespace-separated word.
    pub(crate) fn text(text: &str) -> Self {
        let words: Arc<[Box<str>]> = text.split_whitespace().map(Into::into).collect();
        Self {
            len: words.len(),
            words,
        }
    }

    /// At most `max` tokens of this reply.
    pub(crate) fn capped(mut self, max: Option<u64>) -> Self {
        if let Some(max) = max {
            self.len = self.len.min(usize::try_from(max).unwrap_or(usize::MAX));
        }
        self
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether a token cap cut this reply short.
    pub(crate) fn truncated(&self) -> bool {
        self.len < self.words.len()
    }

    /// Token `i` as streamed: words after the first carry their leading space,
    /// so the concatenated deltas equal [`Reply::joined`].
    pub(crate) fn delta(&self, i: usize) -> String {
        if i == 0 {
            self.words[0].to_string()
        } else {
            format!(" {}", self.words[i])
        }
    }

    pub(crate) fn joined(&self) -> String {
        self.words[..self.len].join(" ")
    }
}

/// Chat usage; `cached` (part of `prompt`) shows in `prompt_tokens_details`
/// when the simulated cache served any.
pub(crate) fn usage(prompt: u64, completion: u64, cached: u64) -> Value {
    let mut usage = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    });
    if cached > 0 {
        usage["prompt_tokens_details"] = json!({"cached_tokens": cached, "audio_tokens": 0});
    }
    usage
}

/// The automatically cacheable prefix of a chat request: every message but
/// the last, one block each.
pub(crate) fn chat_prefix(body: &Value) -> Vec<Block> {
    let messages = body.get("messages").and_then(Value::as_array);
    let Some((_, prefix)) = messages.and_then(|m| m.split_last()) else {
        return Vec::new();
    };
    prefix
        .iter()
        .map(|m| Block::from_json(m, m.get("content").map_or(0, count_tokens)))
        .collect()
}

/// A whole (non-streamed) chat or text completion.
pub(crate) fn completion_body(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    reply: &Reply,
    prompt_tokens: u64,
    cached: u64,
) -> Bytes {
    let text = reply.joined();
    // As OpenAI: `length` when the token cap cut the answer short.
    let finish = if reply.truncated() { "length" } else { "stop" };
    let (object, choice) = match endpoint {
        Endpoint::Completions => (
            "text_completion",
            json!({"text": text, "index": 0, "logprobs": null, "finish_reason": finish}),
        ),
        _ => (
            "chat.completion",
            json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
        ),
    };
    to_bytes(&json!({
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, reply.len() as u64, cached),
    }))
}

/// An embeddings answer: one deterministic unit vector per input.
pub(crate) fn embeddings_body(model: &str, inputs: &[String], dims: usize, prompt: u64) -> Bytes {
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": embedding(text, dims)}))
        .collect();
    to_bytes(&json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }))
}

/// FNV-1a seeded xorshift: the same text always maps to the same vector.
pub(crate) fn embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut state = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let raw: Vec<f32> = (0..dims)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    raw.into_iter().map(|x| x / norm).collect()
}

/// `GET /v1/models`.
pub(crate) fn models_body(models: &[String]) -> Bytes {
    let data: Vec<Value> = models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "claw-mock"}))
        .collect();
    to_bytes(&json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`.
pub(crate) fn model_body(id: &str) -> Bytes {
    to_bytes(&json!({"id": id, "object": "model", "created": 0, "owned_by": "claw-mock"}))
}

/// An error in OpenAI's format, typed after the status.
pub(crate) fn error_body(status: u16, message: &str) -> Bytes {
    let (kind, code) = match status {
        401 => ("invalid_request_error", Value::from("invalid_api_key")),
        404 => ("invalid_request_error", Value::from("unknown_url")),
        429 => ("requests", Value::from("rate_limit_exceeded")),
        400..=499 => ("invalid_request_error", Value::Null),
        _ => ("server_error", Value::Null),
    };
    to_bytes(&json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    }))
}

fn to_bytes(v: &Value) -> Bytes {
    // Serializing a `Value` cannot fail: its keys are strings.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// Renders the SSE events of one streamed answer. The common prefix of every
/// chunk is built once, so each token costs one small allocation.
#[derive(Debug)]
pub(crate) struct ChunkWriter {
    chat: bool,
    /// `data: {"id":…,"object":…,"created":…,"model":…,"choices":[`
    prefix: String,
    /// `]}` or `],"usage":null}` when usage was asked for.
    suffix: &'static str,
}

/// The stream terminator.
pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

impl ChunkWriter {
    pub(crate) fn new(
        endpoint: Endpoint,
        id: &str,
        created: u64,
        model: &str,
        usage: bool,
    ) -> Self {
        let chat = endpoint == Endpoint::Chat;
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let prefix = format!(
            "data: {{\"id\":{},\"object\":\"{object}\",\"created\":{created},\"model\":{},\"choices\":[",
            json_str(id),
            json_str(model),
        );
        let suffix = if usage {
            "],\"usage\":null}\n\n"
        } else {
            "]}\n\n"
        };
        Self {
            chat,
            prefix,
            suffix,
        }
    }

    fn event(&self, choice: &str) -> Bytes {
        let mut s = String::with_capacity(self.prefix.len() + choice.len() + self.suffix.len());
        s.push_str(&self.prefix);
        s.push_str(choice);
        s.push_str(self.suffix);
        Bytes::from(s)
    }

    /// The first chat chunk, carrying the role (chat only).
    pub(crate) fn role(&self) -> Option<Bytes> {
        self.chat.then(|| {
            self.event(
                r#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}"#,
            )
        })
    }

    pub(crate) fn token(&self, text: &str) -> Bytes {
        let text = json_str(text);
        if self.chat {
            self.event(&format!(
                r#"{{"index":0,"delta":{{"content":{text}}},"logprobs":null,"finish_reason":null}}"#
            ))
        } else {
            self.event(&format!(
                r#"{{"text":{text},"index":0,"logprobs":null,"finish_reason":null}}"#
            ))
        }
    }

    /// The chunk with the finish reason: `length` when the token cap cut
    /// the answer short (`truncated`), else `stop`, as OpenAI sends.
    pub(crate) fn finish(&self, truncated: bool) -> Bytes {
        match (self.chat, truncated) {
            (true, false) => {
                self.event(r#"{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}"#)
            }
            (true, true) => {
                self.event(r#"{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}"#)
            }
            (false, false) => {
                self.event(r#"{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}"#)
            }
            (false, true) => {
                self.event(r#"{"text":"","index":0,"logprobs":null,"finish_reason":"length"}"#)
            }
        }
    }

    /// The usage chunk: no choices, only `usage`.
    pub(crate) fn usage(&self, prompt: u64, completion: u64, cached: u64) -> Bytes {
        let usage = usage(prompt, completion, cached);
        Bytes::from(format!("{}],\"usage\":{usage}}}\n\n", self.prefix))
    }
}

fn json_str(s: &str) -> String {
    Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_count_words_over_all_messages() {
        let body = json!({"model": "m", "messages": [
            {"role": "system", "content": "be  brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there world"}]},
        ]});
        let info = RequestInfo::parse(Endpoint::Chat, &body);
        assert_eq!(info.prompt_tokens, 5);
        assert_eq!(info.model.as_deref(), Some("m"));
        assert!(!info.stream);
    }

    #[test]
    fn prompt_tokens_are_at_least_one() {
        let info = RequestInfo::parse(Endpoint::Completions, &json!({"prompt": ""}));
        assert_eq!(info.prompt_tokens, 1);
    }

    #[test]
    fn deltas_concatenate_to_the_whole_text() {
        let reply = Reply::text("ALERT:  disk full").capped(Some(2));
        assert_eq!(reply.len(), 2);
        assert_eq!(
            format!("{}{}", reply.delta(0), reply.delta(1)),
            reply.joined()
        );
        assert_eq!(reply.joined(), "ALERT: disk");
    }

    #[test]
    fn chunks_are_valid_json_events() {
        let w = ChunkWriter::new(Endpoint::Chat, "c-1", 7, "m\"x", true);
        for event in [
            w.role().expect("chat has a role chunk"),
            w.token(" a"),
            w.finish(false),
            w.finish(true),
            w.usage(3, 1, 2),
        ] {
            let text = std::str::from_utf8(&event).expect("utf-8");
            let json = text
                .strip_prefix("data: ")
                .and_then(|t| t.strip_suffix("\n\n"))
                .expect("framed as an SSE data event");
            let v: Value = serde_json::from_str(json).expect("valid JSON");
            assert_eq!(v["model"], "m\"x");
            assert!(v.get("usage").is_some());
        }
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding("hello", 8);
        assert_eq!(a, embedding("hello", 8));
        assert_ne!(a, embedding("hullo", 8));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}

//! The Anthropic Messages wire format as the mock speaks it: request fields,
//! prompt blocks for the simulated cache, message bodies, the SSE event
//! sequence and Anthropic-shaped errors.
//!
//! Shapes follow the official SDK's types (`anthropic/types/message.py`,
//! `usage.py`, `raw_message_stream_event.py`): `usage.input_tokens` counts the
//! UNCACHED input only; cache reads and writes come in
//! `cache_read_input_tokens` / `cache_creation_input_tokens` (split by ttl in
//! `cache_creation`). A stream opens with `message_start` carrying the input
//! usage, and its `message_delta` carries the cumulative usage.

use super::cache::{Block, CacheUse, chain};
use super::openai::{Reply, count_tokens};
use bytes::Bytes;
use serde_json::{Value, json};

/// What the mock reads from a Messages (or count_tokens) body.
#[derive(Debug, Default)]
pub(crate) struct MessagesInfo {
    pub(crate) model: Option<String>,
    pub(crate) stream: bool,
    pub(crate) max_tokens: Option<u64>,
    /// Tools, system blocks, message content blocks, in prompt order.
    pub(crate) blocks: Vec<Block>,
    /// All input tokens (cache included), at least 1.
    pub(crate) prompt_tokens: u64,
    /// The first required field missing, as the real API words it.
    pub(crate) invalid: Option<String>,
    /// The tool call to answer with (see `tools`).
    pub(crate) tool_call: Option<super::tools::ToolCall>,
}

impl MessagesInfo {
    /// `count_tokens` needs no `max_tokens`.
    pub(crate) fn parse(body: &Value, count_only: bool) -> Self {
        let mut blocks = Vec::new();
        if let Some(tools) = body.get("tools").and_then(Value::as_array) {
            for tool in tools {
                let tokens = ["name", "description"]
                    .iter()
                    .filter_map(|k| tool.get(*k))
                    .map(count_tokens)
                    .sum();
                blocks.push(Block::from_json(tool, tokens));
            }
        }
        match body.get("system") {
            Some(Value::Array(parts)) => {
                blocks.extend(parts.iter().map(|p| Block::from_json(p, count_tokens(p))));
            }
            Some(system @ Value::String(_)) => {
                blocks.push(Block::from_json(system, count_tokens(system)));
            }
            _ => {}
        }
        let messages = body.get("messages").and_then(Value::as_array);
        for message in messages.into_iter().flatten() {
            let role = message.get("role").and_then(Value::as_str).unwrap_or("");
            let mut push = |v: &Value| {
                let mut b = Block::from_json(v, count_tokens(v));
                b.hash = chain(b.hash, role.as_bytes());
                blocks.push(b);
            };
            match message.get("content") {
                Some(Value::Array(parts)) => parts.iter().for_each(&mut push),
                Some(content) => push(content),
                None => {}
            }
        }
        let invalid = if body.get("model").and_then(Value::as_str).is_none() {
            Some("model: Field required".to_owned())
        } else if messages.is_none() {
            Some("messages: Field required".to_owned())
        } else if !count_only && body.get("max_tokens").and_then(Value::as_u64).is_none() {
            Some("max_tokens: Field required".to_owned())
        } else {
            None
        };
        let prompt_tokens = blocks.iter().map(|b| b.tokens).sum::<u64>().max(1);
        Self {
            model: body.get("model").and_then(Value::as_str).map(str::to_owned),
            stream: body.get("stream").and_then(Value::as_bool) == Some(true),
            max_tokens: body.get("max_tokens").and_then(Value::as_u64),
            blocks,
            prompt_tokens,
            invalid,
            tool_call: if count_only {
                None
            } else {
                super::tools::messages_call(body)
            },
        }
    }
}

/// The usage block of an answer with `prompt` input tokens in all, of which
/// `cache` were read or written.
pub(crate) fn usage(prompt: u64, cache: CacheUse, output: u64) -> Value {
    json!({
        "input_tokens": prompt.saturating_sub(cache.read + cache.write()),
        "cache_creation_input_tokens": cache.write(),
        "cache_read_input_tokens": cache.read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": cache.write_5m,
            "ephemeral_1h_input_tokens": cache.write_1h,
        },
        "output_tokens": output,
        "service_tier": "standard",
    })
}

fn stop_reason(reply: &Reply) -> &'static str {
    if reply.truncated() {
        "max_tokens"
    } else {
        "end_turn"
    }
}

/// A whole (non-streamed) message.
pub(crate) fn message_body(
    id: &str,
    model: &str,
    reply: &Reply,
    prompt: u64,
    cache: CacheUse,
) -> Bytes {
    to_bytes(&json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply.joined()}],
        "stop_reason": stop_reason(reply),
        "stop_sequence": null,
        "usage": usage(prompt, cache, reply.len() as u64),
    }))
}

/// One SSE event as Anthropic frames it: `event:` then `data:`.
pub(crate) fn event(kind: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// The `message_start` event of a streamed message: empty content, the
/// input usage (output 1, as Anthropic reports it at the start).
pub(crate) fn message_start(id: &str, model: &str, prompt: u64, cache: CacheUse) -> Bytes {
    let mut start_usage = usage(prompt, cache, 1);
    if let Some(u) = start_usage.as_object_mut() {
        u.remove("service_tier");
    }
    event(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": start_usage,
        }}),
    )
}

/// The SSE events of a streamed message, each flagged when it carries one
/// content token.
pub(crate) fn stream_events(
    id: &str,
    model: &str,
    reply: &Reply,
    prompt: u64,
    cache: CacheUse,
) -> Vec<(Bytes, bool)> {
    let mut events = vec![
        (message_start(id, model, prompt, cache), false),
        (
            event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
            ),
            false,
        ),
        (event("ping", &json!({"type": "ping"})), false),
    ];
    for i in 0..reply.len() {
        events.push((
            event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": reply.delta(i)}}),
            ),
            true,
        ));
    }
    let full = usage(prompt, cache, reply.len() as u64);
    let delta_usage = json!({
        "input_tokens": full["input_tokens"],
        "cache_creation_input_tokens": full["cache_creation_input_tokens"],
        "cache_read_input_tokens": full["cache_read_input_tokens"],
        "output_tokens": full["output_tokens"],
    });
    events.extend([
        (
            event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": 0}),
            ),
            false,
        ),
        (
            event(
                "message_delta",
                &json!({"type": "message_delta",
                        "delta": {"stop_reason": stop_reason(reply), "stop_sequence": null},
                        "usage": delta_usage}),
            ),
            false,
        ),
        (
            event("message_stop", &json!({"type": "message_stop"})),
            false,
        ),
    ]);
    events
}

/// `POST /v1/messages/count_tokens`.
pub(crate) fn count_tokens_body(tokens: u64) -> Bytes {
    to_bytes(&json!({"input_tokens": tokens}))
}

/// `GET /v1/models` in Anthropic's shape.
pub(crate) fn models_body(models: &[String]) -> Bytes {
    let data: Vec<Value> = models.iter().map(|id| model_json(id)).collect();
    to_bytes(&json!({
        "data": data,
        "has_more": false,
        "first_id": models.first(),
        "last_id": models.last(),
    }))
}

/// `GET /v1/models/{id}` in Anthropic's shape.
pub(crate) fn model_body(id: &str) -> Bytes {
    to_bytes(&model_json(id))
}

fn model_json(id: &str) -> Value {
    json!({"type": "model", "id": id, "display_name": id, "created_at": "2025-01-01T00:00:00Z"})
}

/// The Anthropic error type for an HTTP status.
pub(crate) fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An error in Anthropic's format, typed after the status.
pub(crate) fn error_body(status: u16, message: &str) -> Bytes {
    to_bytes(&json!({
        "type": "error",
        "error": {"type": error_type(status), "message": message},
    }))
}

fn to_bytes(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_blocks_cover_tools_system_and_messages() {
        let body = json!({
            "model": "m", "max_tokens": 5,
            "tools": [{"name": "get_weather", "description": "the weather now", "input_schema": {}}],
            "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            "messages": [{"role": "user", "content": "hello there"},
                         {"role": "user", "content": [{"type": "text", "text": "a b c"}]}],
        });
        let info = MessagesInfo::parse(&body, false);
        assert_eq!(info.blocks.len(), 4);
        assert_eq!(info.prompt_tokens, 4 + 2 + 2 + 3);
        assert_eq!(info.blocks[1].breakpoint, Some(true));
        assert!(info.invalid.is_none());
        let missing = MessagesInfo::parse(&json!({"model": "m", "messages": []}), false);
        assert_eq!(
            missing.invalid.as_deref(),
            Some("max_tokens: Field required")
        );
        assert!(
            MessagesInfo::parse(&json!({"model": "m", "messages": []}), true)
                .invalid
                .is_none()
        );
    }

    #[test]
    fn input_tokens_exclude_the_cache() {
        let cache = CacheUse {
            read: 5,
            write_5m: 2,
            write_1h: 1,
        };
        let u = usage(10, cache, 3);
        assert_eq!(u["input_tokens"], 2);
        assert_eq!(u["cache_creation_input_tokens"], 3);
        assert_eq!(u["cache_creation"]["ephemeral_1h_input_tokens"], 1);
    }

    #[test]
    fn the_stream_is_the_real_event_sequence() {
        let reply = Reply::text("a b");
        let events = stream_events("msg_1", "m", &reply, 4, CacheUse::default());
        let kinds: Vec<String> = events
            .iter()
            .map(|(e, _)| {
                let text = std::str::from_utf8(e).expect("utf-8");
                let data = text.split("\ndata: ").nth(1).expect("a data line");
                let v: Value = serde_json::from_str(data.trim_end()).expect("JSON data");
                v["type"].as_str().expect("typed").to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events.iter().filter(|(_, t)| *t).count(), 2);
    }
}

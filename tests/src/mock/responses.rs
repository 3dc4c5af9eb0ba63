//! The OpenAI Responses wire format as the mock speaks it, with the mock's
//! own response store.
//!
//! Invariant: a response id is known only to the mock (provider account)
//! that produced it. `GET`/`DELETE /v1/responses/{id}` and
//! `previous_response_id` elsewhere get the real API's 404 / 400
//! `previous_response_not_found`, so a gateway that sends a continuation to
//! the wrong backend fails loudly in tests.
//!
//! A continuation's input includes the stored conversation (its input and
//! output tokens), which is also the cached prefix, as with the real API.
//! Shapes follow `openai/types/responses/response.py`, `response_usage.py`
//! and `response_stream_event.py`.

use super::cache::{Block, PromptCache, fnv};
use super::openai::{Reply, count_tokens};
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::HashMap;

/// What the mock reads from a `POST /v1/responses` body.
#[derive(Debug, Default)]
pub(crate) struct ResponsesInfo {
    pub(crate) model: Option<String>,
    pub(crate) stream: bool,
    pub(crate) store: bool,
    pub(crate) max_output_tokens: Option<u64>,
    pub(crate) instructions: Option<Value>,
    pub(crate) previous_response_id: Option<String>,
    /// Instructions, then each input item.
    pub(crate) blocks: Vec<Block>,
    /// Tokens of this request's own input (the stored conversation excluded).
    pub(crate) own_tokens: u64,
}

impl ResponsesInfo {
    pub(crate) fn parse(body: &Value) -> Self {
        let mut blocks = Vec::new();
        let instructions = body.get("instructions").filter(|v| !v.is_null()).cloned();
        if let Some(i) = &instructions {
            blocks.push(Block::from_json(i, count_tokens(i)));
        }
        match body.get("input") {
            Some(Value::Array(items)) => {
                for item in items {
                    let tokens = item
                        .get("content")
                        .or_else(|| item.get("output"))
                        .or_else(|| item.get("arguments"))
                        .map_or(0, count_tokens);
                    blocks.push(Block::from_json(item, tokens));
                }
            }
            Some(input) => blocks.push(Block::from_json(input, count_tokens(input))),
            None => {}
        }
        let own_tokens = blocks.iter().map(|b| b.tokens).sum();
        Self {
            model: body.get("model").and_then(Value::as_str).map(str::to_owned),
            stream: body.get("stream").and_then(Value::as_bool) == Some(true),
            store: body.get("store").and_then(Value::as_bool) != Some(false),
            max_output_tokens: body.get("max_output_tokens").and_then(Value::as_u64),
            instructions,
            previous_response_id: body
                .get("previous_response_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
            blocks,
            own_tokens,
        }
    }
}

#[derive(Debug, Clone)]
struct Stored {
    response: Value,
    /// The conversation so far as one prompt block (hash and tokens).
    context: Block,
}

/// The responses one mock stored.
#[derive(Debug, Default)]
pub(crate) struct Store {
    map: Mutex<HashMap<String, Stored>>,
}

/// The usage of one answer.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Accounting {
    pub(crate) input: u64,
    pub(crate) cached: u64,
    pub(crate) output: u64,
}

/// A `previous_response_id` this mock does not know.
#[derive(Debug)]
pub(crate) struct UnknownPrevious;

impl Store {
    pub(crate) fn get(&self, id: &str) -> Option<Value> {
        self.map.lock().get(id).map(|s| s.response.clone())
    }

    pub(crate) fn delete(&self, id: &str) -> bool {
        self.map.lock().remove(id).is_some()
    }

    pub(crate) fn clear(&self) {
        self.map.lock().clear();
    }

    /// Input and cache accounting of a request; its prompt blocks with the
    /// stored conversation first.
    pub(crate) fn prompt(
        &self,
        info: &ResponsesInfo,
        cache: &PromptCache,
        min_tokens: u64,
    ) -> Result<(Vec<Block>, Accounting), UnknownPrevious> {
        let mut blocks = Vec::with_capacity(info.blocks.len() + 1);
        if let Some(prev) = &info.previous_response_id {
            let context = self
                .map
                .lock()
                .get(prev)
                .map(|s| s.context.clone())
                .ok_or(UnknownPrevious)?;
            blocks.push(context);
        }
        blocks.extend(info.blocks.iter().cloned());
        let input = blocks.iter().map(|b| b.tokens).sum::<u64>().max(1);
        let prefix = &blocks[..blocks.len().saturating_sub(1)];
        let cached = cache.automatic(prefix, min_tokens);
        Ok((
            blocks,
            Accounting {
                input,
                cached,
                output: 0,
            },
        ))
    }

    /// Stores a finished response; its whole conversation becomes a cached
    /// prefix for a continuation.
    pub(crate) fn put(
        &self,
        id: &str,
        response: Value,
        blocks: &[Block],
        reply: &Reply,
        cache: &PromptCache,
        min_tokens: u64,
    ) {
        let mut h = 0x9e37_79b9_u64;
        for b in blocks {
            h = super::cache::chain(h, &b.hash.to_le_bytes());
        }
        h = super::cache::chain(h, &fnv(reply.joined().as_bytes()).to_le_bytes());
        let context = Block {
            hash: h,
            tokens: blocks.iter().map(|b| b.tokens).sum::<u64>() + reply.len() as u64,
            breakpoint: None,
        };
        cache.automatic(std::slice::from_ref(&context), min_tokens);
        self.map
            .lock()
            .insert(id.to_owned(), Stored { response, context });
    }
}

/// The `usage` object.
pub(crate) fn usage(a: Accounting) -> Value {
    json!({
        "input_tokens": a.input,
        "input_tokens_details": {"cached_tokens": a.cached, "cache_write_tokens": 0},
        "output_tokens": a.output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": a.input + a.output,
    })
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
}

fn message_item(item_id: &str, status: &str, content: Vec<Value>) -> Value {
    json!({"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content})
}

/// The response object; `done` = completed (with output and usage) rather
/// than in progress.
pub(crate) fn response_json(
    ids: (&str, &str),
    created: u64,
    model: &str,
    info: &ResponsesInfo,
    reply: &Reply,
    accounting: Option<Accounting>,
) -> Value {
    let (id, item_id) = ids;
    let (status, output, incomplete) = match accounting {
        None => ("in_progress", Vec::new(), Value::Null),
        Some(_) if reply.truncated() => (
            "incomplete",
            vec![message_item(
                item_id,
                "incomplete",
                vec![text_part(&reply.joined())],
            )],
            json!({"reason": "max_output_tokens"}),
        ),
        Some(_) => (
            "completed",
            vec![message_item(
                item_id,
                "completed",
                vec![text_part(&reply.joined())],
            )],
            Value::Null,
        ),
    };
    json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": false,
        "error": null,
        "incomplete_details": incomplete,
        "instructions": info.instructions,
        "max_output_tokens": info.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": info.previous_response_id,
        "reasoning": {"effort": null, "summary": null},
        "store": info.store,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": accounting.map(usage),
        "user": null,
        "metadata": {},
    })
}

/// The SSE events of a streamed response (`sequence_number` on each), each
/// flagged when it carries one content token. `done` is the final response.
pub(crate) fn stream_events(
    ids: (&str, &str),
    in_progress: &Value,
    done: &Value,
    reply: &Reply,
) -> Vec<(Bytes, bool)> {
    let item_id = ids.1;
    let mut seq = 0u64;
    let mut events = Vec::with_capacity(reply.len() + 8);
    let mut push = |kind: &str, mut data: Value, token: bool| {
        data["type"] = Value::from(kind);
        data["sequence_number"] = Value::from(seq);
        seq += 1;
        events.push((
            Bytes::from(format!("event: {kind}\ndata: {data}\n\n")),
            token,
        ));
    };
    push("response.created", json!({"response": in_progress}), false);
    push(
        "response.in_progress",
        json!({"response": in_progress}),
        false,
    );
    push(
        "response.output_item.added",
        json!({"output_index": 0, "item": message_item(item_id, "in_progress", Vec::new())}),
        false,
    );
    let at = |extra: Value| {
        let mut v = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
        if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        v
    };
    push(
        "response.content_part.added",
        at(json!({"part": text_part("")})),
        false,
    );
    for i in 0..reply.len() {
        push(
            "response.output_text.delta",
            at(json!({"delta": reply.delta(i), "logprobs": []})),
            true,
        );
    }
    let text = reply.joined();
    push(
        "response.output_text.done",
        at(json!({"text": text, "logprobs": []})),
        false,
    );
    push(
        "response.content_part.done",
        at(json!({"part": text_part(&text)})),
        false,
    );
    let item = done["output"].get(0).cloned().unwrap_or(Value::Null);
    push(
        "response.output_item.done",
        json!({"output_index": 0, "item": item}),
        false,
    );
    let last = if done["status"] == "incomplete" {
        "response.incomplete"
    } else {
        "response.completed"
    };
    push(last, json!({"response": done}), false);
    events
}

/// 404 for an id this mock never stored (or deleted), as the real API says it.
pub(crate) fn not_found_body(id: &str) -> Bytes {
    to_bytes(&json!({"error": {
        "message": format!("Response with id '{id}' not found."),
        "type": "invalid_request_error", "param": null, "code": null,
    }}))
}

/// 400 for a `previous_response_id` this mock does not know.
pub(crate) fn previous_not_found_body(id: &str) -> Bytes {
    to_bytes(&json!({"error": {
        "message": format!("Previous response with id '{id}' not found."),
        "type": "invalid_request_error", "param": "previous_response_id",
        "code": "previous_response_not_found",
    }}))
}

/// `DELETE /v1/responses/{id}`.
pub(crate) fn deleted_body(id: &str) -> Bytes {
    to_bytes(&json!({"id": id, "object": "response", "deleted": true}))
}

pub(crate) fn to_bytes(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_continuation_counts_and_caches_the_stored_conversation() {
        let store = Store::default();
        let cache = PromptCache::default();
        let first = ResponsesInfo::parse(&json!({"model": "m", "input": "one two three"}));
        let (blocks, a) = store.prompt(&first, &cache, 1).expect("no previous");
        assert_eq!((a.input, a.cached), (3, 0));
        let reply = Reply::text("four five");
        store.put("resp_1", json!({}), &blocks, &reply, &cache, 1);
        let next = ResponsesInfo::parse(&json!({
            "model": "m", "previous_response_id": "resp_1",
            "input": [{"role": "user", "content": "six"}],
        }));
        let (_, a) = store.prompt(&next, &cache, 1).expect("known previous");
        assert_eq!((a.input, a.cached), (6, 5));
        let unknown =
            ResponsesInfo::parse(&json!({"previous_response_id": "resp_x", "input": "x"}));
        assert!(store.prompt(&unknown, &cache, 1).is_err());
        assert!(store.delete("resp_1"));
        assert!(store.get("resp_1").is_none());
    }

    #[test]
    fn stream_events_are_numbered_in_order() {
        let info = ResponsesInfo::parse(&json!({"model": "m", "input": "hi"}));
        let reply = Reply::text("a b");
        let acc = Accounting {
            input: 1,
            cached: 0,
            output: 2,
        };
        let ids = ("resp_1", "msg_1");
        let started = response_json(ids, 0, "m", &info, &reply, None);
        let done = response_json(ids, 0, "m", &info, &reply, Some(acc));
        let events = stream_events(ids, &started, &done, &reply);
        let parsed: Vec<Value> = events
            .iter()
            .map(|(e, _)| {
                let text = std::str::from_utf8(e).expect("utf-8");
                let data = text.split("\ndata: ").nth(1).expect("data line");
                serde_json::from_str(data.trim_end()).expect("JSON")
            })
            .collect();
        for (i, v) in parsed.iter().enumerate() {
            assert_eq!(v["sequence_number"], i as u64);
        }
        assert_eq!(parsed[0]["type"], "response.created");
        let last = parsed.last().expect("events");
        assert_eq!(last["type"], "response.completed");
        assert_eq!(last["response"]["usage"]["total_tokens"], 3);
    }
}

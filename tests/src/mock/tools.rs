//! Tool calls as the mock makes them, in both protocols, so a whole tool
//! round trip (tools offered → a call → the tool's result → the final text)
//! can run through the gateway.
//!
//! When a chat or Messages request offers tools and its last message is not
//! a tool result, the mock calls one tool instead of answering with text:
//! the one `tool_choice` names, else the first. Its input holds the schema's
//! `required` properties with a placeholder per type (strings `"x"`, numbers
//! `1`, booleans `true`, arrays `[]`, objects `{}`). `tool_choice` `none`
//! gets text.
//!
//! Shapes follow the official SDKs' types: Anthropic `tool_use` content
//! blocks (`anthropic/types/tool_use_block.py`), streamed as a
//! `content_block_start` with an empty `input` then `input_json_delta`
//! fragments (`input_json_delta.py`), `stop_reason: "tool_use"`; OpenAI
//! `message.tool_calls` with `arguments` as a JSON string
//! (`chat_completion_message_tool_call.py`), streamed as tool-call deltas
//! (`chat_completion_chunk.py`: `ChoiceDeltaToolCall`, the first carrying
//! `id`, `type` and the name), `finish_reason: "tool_calls"`.
//!
//! The arguments are streamed in fragments of at most [`FRAGMENT`] bytes;
//! each fragment counts as one output token (JSON and stream alike).

use super::anthropic;
use super::cache::CacheUse;
use super::openai;
use bytes::Bytes;
use serde_json::{Map, Value, json};

/// Longest argument fragment of a streamed call, in bytes.
pub(crate) const FRAGMENT: usize = 8;

/// The call the mock makes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolCall {
    pub(crate) name: String,
    /// Always a JSON object.
    pub(crate) input: Value,
}

impl ToolCall {
    /// The input as OpenAI's `arguments` string (compact JSON).
    pub(crate) fn arguments(&self) -> String {
        self.input.to_string()
    }

    /// [`ToolCall::arguments`] cut at character boundaries into fragments of
    /// at most [`FRAGMENT`] bytes (a longer character stays whole).
    pub(crate) fn fragments(&self) -> Vec<String> {
        let args = self.arguments();
        let mut out = Vec::new();
        let mut current = String::new();
        for c in args.chars() {
            if !current.is_empty() && current.len() + c.len_utf8() > FRAGMENT {
                out.push(std::mem::take(&mut current));
            }
            current.push(c);
        }
        if !current.is_empty() {
            out.push(current);
        }
        out
    }

    /// Output tokens of the call: one per fragment.
    pub(crate) fn tokens(&self) -> u64 {
        self.fragments().len() as u64
    }
}

/// The call for a Chat Completions body, if it offers tools and does not end
/// with a `role: tool` message.
pub(crate) fn chat_call(body: &Value) -> Option<ToolCall> {
    let tools = body.get("tools")?.as_array()?;
    let last_role = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str);
    if last_role == Some("tool") {
        return None;
    }
    let wanted = match body.get("tool_choice") {
        Some(Value::String(s)) if s == "none" => return None,
        Some(choice) => choice.pointer("/function/name").and_then(Value::as_str),
        None => None,
    };
    let functions = tools.iter().filter_map(|t| t.get("function"));
    let chosen = pick(functions, wanted)?;
    Some(ToolCall {
        name: chosen.get("name")?.as_str()?.to_owned(),
        input: input_for(chosen.get("parameters")),
    })
}

/// The call for a Messages body, if it offers tools and its last message
/// carries no `tool_result` block.
pub(crate) fn messages_call(body: &Value) -> Option<ToolCall> {
    let tools = body.get("tools")?.as_array()?;
    let last = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last());
    let answers_a_tool = last
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array)
        .is_some_and(|blocks| {
            blocks
                .iter()
                .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
        });
    if answers_a_tool {
        return None;
    }
    let wanted = match body.get("tool_choice") {
        Some(c) if c.get("type").and_then(Value::as_str) == Some("none") => return None,
        Some(c) => c.get("name").and_then(Value::as_str),
        None => None,
    };
    let chosen = pick(tools.iter(), wanted)?;
    Some(ToolCall {
        name: chosen.get("name")?.as_str()?.to_owned(),
        input: input_for(chosen.get("input_schema")),
    })
}

/// The tool named `wanted` if there is one, else the first with a name.
fn pick<'a>(
    tools: impl Iterator<Item = &'a Value> + Clone,
    wanted: Option<&str>,
) -> Option<&'a Value> {
    let named = |t: &&Value| t.get("name").and_then(Value::as_str).is_some();
    wanted
        .and_then(|w| {
            tools
                .clone()
                .find(|t| t.get("name").and_then(Value::as_str) == Some(w))
        })
        .or_else(|| tools.clone().find(named))
}

/// An input object with a placeholder for every required property.
fn input_for(schema: Option<&Value>) -> Value {
    let mut input = Map::new();
    let Some(schema) = schema else {
        return Value::Object(input);
    };
    let required = schema.get("required").and_then(Value::as_array);
    for name in required.into_iter().flatten().filter_map(Value::as_str) {
        let kind = schema
            .pointer(&format!("/properties/{}/type", pointer_escape(name)))
            .and_then(Value::as_str);
        let placeholder = match kind {
            Some("integer" | "number") => json!(1),
            Some("boolean") => json!(true),
            Some("array") => json!([]),
            Some("object") => json!({}),
            _ => json!("x"),
        };
        input.insert(name.to_owned(), placeholder);
    }
    Value::Object(input)
}

fn pointer_escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn to_bytes(v: &Value) -> Bytes {
    // Serializing a `Value` cannot fail: its keys are strings.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

// ------------------------------------------------------------------ OpenAI

/// The chat completion calling `call` (id `call_id`).
pub(crate) fn chat_body(
    id: &str,
    created: u64,
    model: &str,
    call_id: &str,
    call: &ToolCall,
    prompt: u64,
    cached: u64,
) -> Bytes {
    to_bytes(&json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": null,
                "refusal": null,
                "tool_calls": [{
                    "id": call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments()},
                }],
            },
            "logprobs": null,
            "finish_reason": "tool_calls",
        }],
        "usage": openai::usage(prompt, call.tokens(), cached),
    }))
}

/// The chunks of a streamed chat completion calling `call`, `[DONE]`
/// included, each flagged when it carries an argument fragment.
#[allow(clippy::too_many_arguments)] // the chunk envelope's fields, named
pub(crate) fn chat_stream_events(
    id: &str,
    created: u64,
    model: &str,
    call_id: &str,
    call: &ToolCall,
    prompt: u64,
    cached: u64,
    include_usage: bool,
) -> Vec<(Bytes, bool)> {
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut v = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        });
        if include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        Bytes::from(format!("data: {v}\n\n"))
    };
    let choice = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut events = vec![(
        chunk(
            choice(
                json!({
                    "role": "assistant",
                    "content": null,
                    "tool_calls": [{
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }],
                }),
                Value::Null,
            ),
            None,
        ),
        false,
    )];
    for fragment in call.fragments() {
        events.push((
            chunk(
                choice(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}),
                    Value::Null,
                ),
                None,
            ),
            true,
        ));
    }
    events.push((chunk(choice(json!({}), json!("tool_calls")), None), false));
    if include_usage {
        let usage = openai::usage(prompt, call.tokens(), cached);
        events.push((chunk(json!([]), Some(usage)), false));
    }
    events.push((Bytes::from_static(openai::DONE), false));
    events
}

// --------------------------------------------------------------- Anthropic

/// The message calling `call` (block id `call_id`).
pub(crate) fn message_body(
    id: &str,
    model: &str,
    call_id: &str,
    call: &ToolCall,
    prompt: u64,
    cache: CacheUse,
) -> Bytes {
    to_bytes(&json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "tool_use", "id": call_id, "name": call.name, "input": call.input}],
        "stop_reason": "tool_use",
        "stop_sequence": null,
        "usage": anthropic::usage(prompt, cache, call.tokens()),
    }))
}

/// The SSE events of a streamed message calling `call`, each flagged when
/// it carries an argument fragment.
pub(crate) fn message_stream_events(
    id: &str,
    model: &str,
    call_id: &str,
    call: &ToolCall,
    prompt: u64,
    cache: CacheUse,
) -> Vec<(Bytes, bool)> {
    let mut events = vec![
        (anthropic::message_start(id, model, prompt, cache), false),
        (
            anthropic::event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "tool_use", "id": call_id,
                                          "name": call.name, "input": {}}}),
            ),
            false,
        ),
        (anthropic::event("ping", &json!({"type": "ping"})), false),
    ];
    for fragment in call.fragments() {
        events.push((
            anthropic::event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": fragment}}),
            ),
            true,
        ));
    }
    let full = anthropic::usage(prompt, cache, call.tokens());
    let delta_usage = json!({
        "input_tokens": full["input_tokens"],
        "cache_creation_input_tokens": full["cache_creation_input_tokens"],
        "cache_read_input_tokens": full["cache_read_input_tokens"],
        "output_tokens": full["output_tokens"],
    });
    events.extend([
        (
            anthropic::event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": 0}),
            ),
            false,
        ),
        (
            anthropic::event(
                "message_delta",
                &json!({"type": "message_delta",
                        "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                        "usage": delta_usage}),
            ),
            false,
        ),
        (
            anthropic::event("message_stop", &json!({"type": "message_stop"})),
            false,
        ),
    ]);
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather_schema() -> Value {
        json!({"type": "object",
               "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                              "metric": {"type": "boolean"}, "note": {"type": "string"}},
               "required": ["city", "days", "metric"]})
    }

    fn data_of(event: &Bytes) -> Value {
        let text = std::str::from_utf8(event).expect("utf-8");
        let data = text.split("data: ").nth(1).expect("a data line").trim_end();
        serde_json::from_str(data).expect("JSON data")
    }

    #[test]
    fn a_chat_request_with_tools_gets_a_call_of_the_first_until_a_tool_answers() {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                       "parameters": weather_schema()}},
                      {"type": "function", "function": {"name": "other"}}]});
        let call = chat_call(&body).expect("a call");
        assert_eq!(call.name, "get_weather");
        assert_eq!(call.input, json!({"city": "x", "days": 1, "metric": true}));
        body["tool_choice"] = json!({"type": "function", "function": {"name": "other"}});
        assert_eq!(chat_call(&body).map(|c| c.input), Some(json!({})));
        body["tool_choice"] = json!("none");
        assert_eq!(chat_call(&body), None);
        body["tool_choice"] = json!("auto");
        if let Some(m) = body["messages"].as_array_mut() {
            m.push(json!({"role": "tool", "tool_call_id": "call_1", "content": "sunny"}));
        }
        assert_eq!(chat_call(&body), None, "a tool result gets text");
        assert_eq!(chat_call(&json!({"messages": []})), None, "no tools");
    }

    #[test]
    fn a_messages_request_with_tools_gets_a_call_until_a_tool_result() {
        let mut body = json!({"model": "m", "max_tokens": 9,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "get_weather", "input_schema": weather_schema()}]});
        let call = messages_call(&body).expect("a call");
        assert_eq!(call.input, json!({"city": "x", "days": 1, "metric": true}));
        if let Some(m) = body["messages"].as_array_mut() {
            m.push(json!({"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]}));
            m.push(json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}));
        }
        assert_eq!(messages_call(&body), None);
    }

    #[test]
    fn fragments_concatenate_to_the_arguments() {
        let call = ToolCall {
            name: "f".into(),
            input: json!({"city": "Zürich, a long way", "days": 1}),
        };
        let fragments = call.fragments();
        assert!(fragments.len() > 2);
        assert!(fragments.iter().all(|f| f.len() <= FRAGMENT));
        assert_eq!(fragments.concat(), call.arguments());
        assert_eq!(call.tokens(), fragments.len() as u64);
    }

    #[test]
    fn the_chat_stream_carries_the_call_then_tool_calls_then_usage() {
        let call = ToolCall {
            name: "get_weather".into(),
            input: json!({"city": "x"}),
        };
        let events = chat_stream_events("c1", 7, "m", "call_1", &call, 5, 0, true);
        assert_eq!(events.last().map(|(e, _)| &e[..]), Some(openai::DONE));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|(e, _)| data_of(e))
            .collect();
        let first = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(
            (&first["id"], &first["function"]["name"]),
            (&json!("call_1"), &json!("get_weather"))
        );
        let args: String = chunks
            .iter()
            .filter_map(|c| c.pointer("/choices/0/delta/tool_calls/0/function/arguments"))
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(args, call.arguments());
        let n = chunks.len();
        assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(chunks[n - 1]["usage"]["completion_tokens"], call.tokens());
        assert!(chunks[0]["usage"].is_null());
    }

    #[test]
    fn the_messages_stream_is_the_real_tool_use_sequence() {
        let call = ToolCall {
            name: "get_weather".into(),
            input: json!({"city": "x", "days": 1}),
        };
        let events = message_stream_events("msg_1", "m", "toolu_1", &call, 4, CacheUse::default());
        let data: Vec<Value> = events.iter().map(|(e, _)| data_of(e)).collect();
        let kinds: Vec<&str> = data.iter().filter_map(|d| d["type"].as_str()).collect();
        let deltas = call.fragments().len();
        let mut expected = vec!["message_start", "content_block_start", "ping"];
        expected.extend(std::iter::repeat_n("content_block_delta", deltas));
        expected.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(kinds, expected);
        assert_eq!(data[1]["content_block"]["type"], "tool_use");
        let json: String = data
            .iter()
            .filter_map(|d| d.pointer("/delta/partial_json"))
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&json).expect("JSON"),
            call.input
        );
        assert_eq!(data[data.len() - 2]["delta"]["stop_reason"], "tool_use");
        let body = message_body("msg_1", "m", "toolu_1", &call, 4, CacheUse::default());
        let v: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(v["content"][0]["input"], call.input);
        assert_eq!(v["stop_reason"], "tool_use");
    }
}

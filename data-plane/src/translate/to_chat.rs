//! A Messages client served by an OpenAI Chat Completions backend:
//! [`request`] (Messages → chat, a stream asking for usage), [`response`]
//! (chat completion JSON → Messages), [`Stream`] (`chat.completion.chunk`s
//! → the Messages event sequence) and [`error`] (an OpenAI error → the
//! Anthropic error shape).
//!
//! What translates: `system` (a string or text blocks, joined by a blank
//! line) → a first `system` message; text and image blocks (base64 → a
//! `data:` URL, url source → the URL; a text-only turn is a plain string,
//! its blocks joined by a newline, which every OpenAI-compatible provider
//! accepts); assistant `tool_use` → `tool_calls`
//! (ids kept, `arguments` = the compact JSON of `input`); user `tool_result`
//! → `role: "tool"` messages placed before that user turn's other content;
//! custom tools → function tools; `tool_choice` and
//! `disable_parallel_tool_use`; `stop_sequences`, `max_tokens`,
//! `temperature`, `top_p`, `stream` (with `stream_options.include_usage`),
//! `metadata.user_id` → `user`.
//!
//! Removed and counted: every `cache_control` (OpenAI caches prefixes on its
//! own). Refused by name: `thinking` other than `disabled`, `top_k`,
//! `container`, `mcp_servers`, `output_config`, document/PDF and other
//! non-text/non-image blocks, images inside a `tool_result`, server tools
//! (tool types other than `custom`).
//!
//! Ignored on purpose: `service_tier`, `speed`, `inference_geo` and other
//! Anthropic routing hints (no chat counterpart; the backend is already
//! chosen), `citations` on text blocks, `is_error` on a tool result (the
//! text says what went wrong; chat has no flag), and `thinking` /
//! `redacted_thinking` blocks in the history (signed Anthropic reasoning a
//! chat backend cannot verify or use). On the way back a chat answer cannot
//! say which stop sequence matched, so `stop` is always `end_turn`, and
//! provider reasoning (`reasoning_content`) is not returned: the client did
//! not ask for thinking. Other Messages fields with no chat counterpart are
//! not sent; `max_tokens` is not defaulted (chat does not require it).

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{Refused, RequestOptions, StreamTranslator, TranslatedRequest};

/// The chat completion request for a Messages request `msg` (already
/// parsed; its `model` is replaced by `opts.native_model`). A streaming
/// request asks for `stream_options.include_usage`.
pub(crate) fn request(
    msg: &Map<String, Value>,
    opts: &RequestOptions<'_>,
) -> Result<TranslatedRequest, Refused> {
    refuse_unsupported(msg)?;
    let mut dropped = 0u32;
    if msg.contains_key("cache_control") {
        dropped += 1;
    }
    let mut out = Map::new();
    out.insert("model".into(), Value::from(opts.native_model));

    let mut messages = Vec::new();
    if let Some(system) = msg.get("system")
        && let Some(text) = system_text(system, &mut dropped)?
    {
        messages.push(json!({"role": "system", "content": text}));
    }
    let Some(turns) = msg.get("messages").and_then(Value::as_array) else {
        return Err(refused("messages", "`messages` must be an array"));
    };
    for (i, turn) in turns.iter().enumerate() {
        convert_turn(i, turn, &mut messages, &mut dropped)?;
    }
    out.insert("messages".into(), Value::Array(messages));

    if let Some(tools) = msg.get("tools") {
        out.insert("tools".into(), convert_tools(tools, &mut dropped)?);
    }
    if let Some(choice) = msg.get("tool_choice") {
        let (choice, parallel) = convert_tool_choice(choice)?;
        if let Some(choice) = choice {
            out.insert("tool_choice".into(), choice);
        }
        if !parallel {
            out.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    if let Some(stop) = msg.get("stop_sequences") {
        match stop.as_array() {
            Some(seqs) if seqs.is_empty() => {}
            Some(seqs) if seqs.iter().all(Value::is_string) => {
                out.insert("stop".into(), stop.clone());
            }
            _ => return Err(refused("stop_sequences", "must be an array of strings")),
        }
    }
    // `max_tokens`, not `max_completion_tokens`: more OpenAI-compatible
    // providers accept it, and OpenAI still does for non-reasoning models.
    for key in ["max_tokens", "temperature", "top_p"] {
        if let Some(v) = msg.get(key).filter(|v| !v.is_null()) {
            out.insert(key.into(), v.clone());
        }
    }
    if msg.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(user) = msg
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
    {
        out.insert("user".into(), Value::from(user));
    }
    Ok(TranslatedRequest {
        body: Value::Object(out).to_string().into_bytes(),
        dropped_cache_control: dropped,
    })
}

fn refused(field: impl Into<String>, message: impl Into<String>) -> Refused {
    Refused {
        field: field.into(),
        message: message.into(),
    }
}

/// Top-level fields a chat backend cannot honour.
fn refuse_unsupported(msg: &Map<String, Value>) -> Result<(), Refused> {
    if let Some(thinking) = msg.get("thinking") {
        let disabled =
            thinking.is_null() || thinking.get("type").and_then(Value::as_str) == Some("disabled");
        if !disabled {
            return Err(refused(
                "thinking",
                "extended thinking cannot be served by this backend (OpenAI Chat Completions)",
            ));
        }
    }
    for key in ["top_k", "container", "mcp_servers", "output_config"] {
        if msg.get(key).is_some_and(|v| !v.is_null()) {
            return Err(refused(
                key,
                format!("`{key}` cannot be served by this backend (OpenAI Chat Completions)"),
            ));
        }
    }
    Ok(())
}

/// Removes (counts) a block's `cache_control`.
fn count_cache_control(block: &Value, dropped: &mut u32) {
    if block.get("cache_control").is_some() {
        *dropped += 1;
    }
}

/// `system` as one string (text blocks joined by a blank line); `None` when empty.
fn system_text(system: &Value, dropped: &mut u32) -> Result<Option<String>, Refused> {
    match system {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (j, block) in blocks.iter().enumerate() {
                count_cache_control(block, dropped);
                match (block_type(block), block.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(text)) => parts.push(text),
                    _ => {
                        return Err(refused(
                            format!("system[{j}].type"),
                            "only text blocks can be sent as a system prompt",
                        ));
                    }
                }
            }
            Ok((!parts.is_empty()).then(|| parts.join("\n\n")))
        }
        _ => Err(refused("system", "must be a string or text blocks")),
    }
}

fn block_type(block: &Value) -> Option<&str> {
    block.get("type").and_then(Value::as_str)
}

/// One Messages turn → its chat messages (tool results first).
fn convert_turn(
    i: usize,
    turn: &Value,
    out: &mut Vec<Value>,
    dropped: &mut u32,
) -> Result<(), Refused> {
    let role = turn.get("role").and_then(Value::as_str);
    let content = turn.get("content");
    match (role, content) {
        (Some(role @ ("user" | "assistant")), Some(Value::String(s))) => {
            out.push(json!({"role": role, "content": s}));
            Ok(())
        }
        (Some("user"), Some(Value::Array(blocks))) => user_blocks(i, blocks, out, dropped),
        (Some("assistant"), Some(Value::Array(blocks))) => {
            assistant_blocks(i, blocks, out, dropped)
        }
        (Some("user" | "assistant"), _) => Err(refused(
            format!("messages[{i}].content"),
            "must be a string or an array of content blocks",
        )),
        _ => Err(refused(
            format!("messages[{i}].role"),
            "must be `user` or `assistant`",
        )),
    }
}

fn user_blocks(
    i: usize,
    blocks: &[Value],
    out: &mut Vec<Value>,
    dropped: &mut u32,
) -> Result<(), Refused> {
    let mut parts = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        count_cache_control(block, dropped);
        match block_type(block) {
            Some("text") => parts.push(text_part(i, j, block)?),
            Some("image") => parts.push(image_part(i, j, block)?),
            Some("tool_result") => out.push(tool_message(i, j, block, dropped)?),
            _ => return Err(unsupported_block(i, j)),
        }
    }
    if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts_content(parts)}));
    }
    Ok(())
}

fn assistant_blocks(
    i: usize,
    blocks: &[Value],
    out: &mut Vec<Value>,
    dropped: &mut u32,
) -> Result<(), Refused> {
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        count_cache_control(block, dropped);
        match block_type(block) {
            Some("text") => {
                if let Some(text) = text_part(i, j, block)?.get("text").and_then(Value::as_str) {
                    texts.push(text.to_string());
                }
            }
            Some("tool_use") => calls.push(tool_call(i, j, block)?),
            // Signed Anthropic reasoning: a chat backend can neither verify
            // nor use it (module doc).
            Some("thinking" | "redacted_thinking") => {}
            _ => return Err(unsupported_block(i, j)),
        }
    }
    let mut m = Map::new();
    m.insert("role".into(), Value::from("assistant"));
    let content = if texts.is_empty() {
        Value::Null
    } else {
        Value::from(texts.join("\n"))
    };
    if content.is_null() && calls.is_empty() {
        m.insert("content".into(), Value::from(""));
    } else {
        m.insert("content".into(), content);
    }
    if !calls.is_empty() {
        m.insert("tool_calls".into(), Value::Array(calls));
    }
    out.push(Value::Object(m));
    Ok(())
}

fn unsupported_block(i: usize, j: usize) -> Refused {
    refused(
        format!("messages[{i}].content[{j}].type"),
        "this content block cannot be served by this backend (OpenAI Chat Completions)",
    )
}

/// A plain string when every part is text (joined by newlines), else the parts.
fn parts_content(parts: Vec<Value>) -> Value {
    if parts.iter().all(|p| p["type"] == "text") {
        let texts: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
        Value::from(texts.join("\n"))
    } else {
        Value::Array(parts)
    }
}

fn text_part(i: usize, j: usize, block: &Value) -> Result<Value, Refused> {
    match block.get("text").and_then(Value::as_str) {
        Some(text) => Ok(json!({"type": "text", "text": text})),
        None => Err(refused(
            format!("messages[{i}].content[{j}].text"),
            "must be a string",
        )),
    }
}

fn image_part(i: usize, j: usize, block: &Value) -> Result<Value, Refused> {
    let source = block.get("source");
    let kind = source.and_then(block_type);
    let url = match (kind, source) {
        (Some("base64"), Some(src)) => {
            match (
                src.get("media_type").and_then(Value::as_str),
                src.get("data").and_then(Value::as_str),
            ) {
                (Some(media), Some(data)) => format!("data:{media};base64,{data}"),
                _ => {
                    return Err(refused(
                        format!("messages[{i}].content[{j}].source"),
                        "a base64 image needs `media_type` and `data`",
                    ));
                }
            }
        }
        (Some("url"), Some(src)) => match src.get("url").and_then(Value::as_str) {
            Some(url) => url.to_string(),
            None => {
                return Err(refused(
                    format!("messages[{i}].content[{j}].source.url"),
                    "must be a string",
                ));
            }
        },
        _ => {
            return Err(refused(
                format!("messages[{i}].content[{j}].source.type"),
                "only base64 and url images can be served by this backend",
            ));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn tool_call(i: usize, j: usize, block: &Value) -> Result<Value, Refused> {
    let id = block.get("id").and_then(Value::as_str);
    let name = block.get("name").and_then(Value::as_str);
    let (Some(id), Some(name)) = (id, name) else {
        return Err(refused(
            format!("messages[{i}].content[{j}]"),
            "a tool_use block needs `id` and `name`",
        ));
    };
    let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
    Ok(json!({
        "id": id,
        "type": "function",
        "function": {"name": name, "arguments": input.to_string()},
    }))
}

fn tool_message(i: usize, j: usize, block: &Value, dropped: &mut u32) -> Result<Value, Refused> {
    let Some(id) = block.get("tool_use_id").and_then(Value::as_str) else {
        return Err(refused(
            format!("messages[{i}].content[{j}].tool_use_id"),
            "must be a string",
        ));
    };
    let text = match block.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(inner)) => {
            let mut texts = Vec::with_capacity(inner.len());
            for (k, b) in inner.iter().enumerate() {
                count_cache_control(b, dropped);
                match (block_type(b), b.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => texts.push(t),
                    _ => {
                        return Err(refused(
                            format!("messages[{i}].content[{j}].content[{k}].type"),
                            "only text tool results can be served by this backend",
                        ));
                    }
                }
            }
            texts.join("\n")
        }
        Some(_) => {
            return Err(refused(
                format!("messages[{i}].content[{j}].content"),
                "must be a string or text blocks",
            ));
        }
    };
    Ok(json!({"role": "tool", "tool_call_id": id, "content": text}))
}

fn convert_tools(tools: &Value, dropped: &mut u32) -> Result<Value, Refused> {
    let Some(tools) = tools.as_array() else {
        return Err(refused("tools", "must be an array"));
    };
    let mut out = Vec::with_capacity(tools.len());
    for (k, tool) in tools.iter().enumerate() {
        count_cache_control(tool, dropped);
        match tool.get("type") {
            None | Some(Value::Null) => {}
            Some(t) if t == "custom" => {}
            Some(_) => {
                return Err(refused(
                    format!("tools[{k}].type"),
                    "server tools cannot be served by this backend (OpenAI Chat Completions)",
                ));
            }
        }
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            return Err(refused(format!("tools[{k}].name"), "must be a string"));
        };
        let mut function = Map::new();
        function.insert("name".into(), Value::from(name));
        if let Some(d) = tool.get("description").and_then(Value::as_str) {
            function.insert("description".into(), Value::from(d));
        }
        let schema = tool
            .get("input_schema")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object"}));
        function.insert("parameters".into(), schema);
        if let Some(strict) = tool.get("strict").and_then(Value::as_bool) {
            function.insert("strict".into(), Value::Bool(strict));
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

/// `tool_choice` → (chat `tool_choice`, parallel tool calls allowed).
fn convert_tool_choice(choice: &Value) -> Result<(Option<Value>, bool), Refused> {
    let parallel = choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        != Some(true);
    let chat = match block_type(choice) {
        Some("auto") => Value::from("auto"),
        Some("any") => Value::from("required"),
        Some("none") => Value::from("none"),
        Some("tool") => match choice.get("name").and_then(Value::as_str) {
            Some(name) => json!({"type": "function", "function": {"name": name}}),
            None => return Err(refused("tool_choice.name", "must be a string")),
        },
        _ => {
            return Err(refused(
                "tool_choice.type",
                "must be `auto`, `any`, `tool` or `none`",
            ));
        }
    };
    Ok((Some(chat), parallel))
}

/// The Messages `stop_reason` for a chat `finish_reason`.
fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Token counts of a chat `usage` object: (input without cache reads,
/// output, cache reads). Chat's `prompt_tokens` includes cached tokens;
/// Anthropic's `input_tokens` does not.
fn usage_counts(usage: &Value) -> (u64, u64, u64) {
    let prompt = usage
        .get("prompt_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let output = usage
        .get("completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let cached = usage
        .get("prompt_tokens_details")
        .and_then(|d| d.get("cached_tokens"))
        .and_then(Value::as_u64)
        // DeepSeek reports cache hits at the top level.
        .or_else(|| usage.get("prompt_cache_hit_tokens").and_then(Value::as_u64))
        .unwrap_or(0)
        .min(prompt);
    (prompt - cached, output, cached)
}

/// A tool call's id, kept; for a provider that sends none (or an empty
/// one), a stable one from the completion id and the call's index, since
/// Messages requires it and the client sends it back with the result.
fn tool_id(call: &Value, chat_id: Option<&str>, index: usize) -> String {
    match call.get("id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => format!("toolu_{}_{index}", chat_id.unwrap_or("translated")),
    }
}

fn message_id(chat_id: Option<&str>) -> String {
    format!("msg_{}", chat_id.unwrap_or("translated"))
}

/// A tool call's `arguments` as a Messages `input` object. Arguments that
/// are not a JSON object become `{}` (and a warning; the arguments
/// themselves are not logged, they may carry user data).
fn tool_input(name: &str, arguments: Option<&Value>) -> Value {
    let parsed = match arguments {
        None | Some(Value::Null) => return json!({}),
        Some(Value::String(s)) if s.trim().is_empty() => return json!({}),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok(),
        // A few providers send the arguments as an object already.
        Some(v) => Some(v.clone()),
    };
    match parsed {
        Some(v @ Value::Object(_)) => v,
        _ => {
            tracing::warn!(
                tool = name,
                "tool call arguments are not a JSON object; sent to the client as {{}}"
            );
            json!({})
        }
    }
}

/// The Messages answer for a chat completion `body`; `model` is the name
/// the client asked for. `None` when `body` is not a chat completion.
pub(crate) fn response(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let chat: Value = serde_json::from_slice(body).ok()?;
    let choice = chat.get("choices")?.as_array()?.first()?;
    let message = choice.get("message")?;
    let mut content = Vec::new();
    let text = message
        .get("content")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .or_else(|| message.get("refusal").and_then(Value::as_str));
    if let Some(text) = text {
        content.push(json!({"type": "text", "text": text}));
    }
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        for (index, call) in calls.iter().enumerate() {
            let f = call.get("function");
            let name = f
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let args = f.and_then(|f| f.get("arguments"));
            let id = tool_id(call, chat.get("id").and_then(Value::as_str), index);
            content.push(json!({
                "type": "tool_use",
                "id": id,
                "name": name,
                "input": tool_input(name, args),
            }));
        }
    }
    let finish = choice.get("finish_reason").and_then(Value::as_str);
    let (input, output, cached) = chat.get("usage").map(usage_counts).unwrap_or((0, 0, 0));
    let answer = json!({
        "id": message_id(chat.get("id").and_then(Value::as_str)),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finish),
        "stop_sequence": null,
        "usage": {
            "input_tokens": input,
            "output_tokens": output,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
        },
    });
    Some(answer.to_string().into_bytes())
}

/// The Anthropic error type for an HTTP status.
fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

/// The message of an OpenAI-style error value (`{"error":{"message"}}`,
/// `{"error":"…"}` or `{"message":"…"}`).
fn error_message(v: &Value) -> Option<&str> {
    match v.get("error") {
        Some(Value::String(s)) => Some(s),
        Some(e) => e.get("message").and_then(Value::as_str),
        None => v.get("message").and_then(Value::as_str),
    }
}

fn error_value(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// The Anthropic-shaped error body for an OpenAI error answer (`status`,
/// `body`); a body that is not an OpenAI error gets a generic message.
pub(crate) fn error(status: u16, body: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let generic = format!("upstream error (HTTP {status})");
    let message = parsed.as_ref().and_then(error_message).unwrap_or(&generic);
    error_value(error_type(status), message)
        .to_string()
        .into_bytes()
}

/// The Anthropic error type for an error met inside an OpenAI stream.
fn stream_error_type(err: &Value) -> &'static str {
    let field = |k: &str| {
        err.get("error")
            .and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    let (kind, code) = (field("type"), field("code"));
    if kind.contains("rate_limit") || code.contains("rate_limit") {
        "rate_limit_error"
    } else if kind.contains("overloaded") || code.contains("overloaded") {
        "overloaded_error"
    } else if kind == "invalid_request_error" {
        "invalid_request_error"
    } else {
        "api_error"
    }
}

/// The content block open in the client's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Text,
    /// A tool call's `tool_use` block.
    Tool,
}

/// `chat.completion.chunk` SSE → the Messages event sequence
/// (`message_start` … `message_stop`, usage in `message_delta`).
///
/// Only complete lines are interpreted (the rest waits in `line`), so the
/// output does not depend on how the upstream's bytes were split. The end
/// (`message_delta`, `message_stop`) is written at `[DONE]`, since the usage
/// chunk follows the `finish_reason` chunk, or at [`finish`] without one.
///
/// [`finish`]: StreamTranslator::finish
pub(crate) struct Stream {
    /// The model name the client asked for.
    model: String,
    /// Bytes of an incomplete line.
    pub(super) line: Vec<u8>,
    /// The `data:` lines of the event being read.
    data: String,
    /// Whether a `data:` line was seen in the event being read.
    has_data: bool,
    /// `message_start` written.
    started: bool,
    /// The upstream's completion id (for tool calls without an id).
    chat_id: Option<String>,
    /// `message_stop` (or an `error` event) written: nothing follows.
    ended: bool,
    open: Open,
    /// Index of the next content block.
    next_block: u64,
    /// (upstream `tool_calls[].index`, id, client block index) of each call seen.
    tools: Vec<(u64, String, u64)>,
    finish_reason: Option<String>,
    /// (input without cache reads, output, cache reads).
    usage: Option<(u64, u64, u64)>,
}

impl Stream {
    /// A translator for a client that asked for `model`.
    pub(crate) fn new(model: &str) -> Stream {
        Stream {
            model: model.to_string(),
            line: Vec::new(),
            data: String::new(),
            has_data: false,
            started: false,
            chat_id: None,
            ended: false,
            open: Open::None,
            next_block: 0,
            tools: Vec::new(),
            finish_reason: None,
            usage: None,
        }
    }

    /// Interprets one complete line (without its terminator).
    fn line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(&String::from_utf8_lossy(rest));
            self.has_data = true;
        }
        // Comments (`: keep-alive`), `event:`, `id:` and `retry:` lines have
        // no Messages counterpart.
    }

    /// The event read so far is complete.
    fn dispatch(&mut self, out: &mut Vec<u8>) {
        if !self.has_data {
            return;
        }
        let data = std::mem::take(&mut self.data);
        self.has_data = false;
        if self.ended {
            return;
        }
        let data = data.trim();
        if data == "[DONE]" {
            self.end(out);
            return;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if chunk.get("error").is_some() {
            let message = error_message(&chunk).unwrap_or("upstream stream error");
            emit(
                out,
                "error",
                &error_value(stream_error_type(&chunk), message),
            );
            self.ended = true;
            return;
        }
        self.chunk(&chunk, out);
    }

    fn start(&mut self, chat_id: Option<&str>, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        self.chat_id = chat_id.map(str::to_string);
        let message = json!({
            "type": "message_start",
            "message": {
                "id": message_id(chat_id),
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            },
        });
        emit(out, "message_start", &message);
    }

    fn chunk(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        self.start(chunk.get("id").and_then(Value::as_str), out);
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage_counts(usage));
        }
        let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            return;
        };
        if let Some(delta) = choice.get("delta") {
            // OpenAI streams a refusal beside `content`; either is text.
            for key in ["content", "refusal"] {
                if let Some(text) = delta.get(key).and_then(Value::as_str)
                    && !text.is_empty()
                {
                    self.text(text, out);
                }
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for call in calls {
                    self.tool_delta(call, out);
                }
            }
        }
        if let Some(finish) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(finish.to_string());
            self.close(out);
        }
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        if self.open != Open::Text {
            self.close(out);
            self.open_block(json!({"type": "text", "text": ""}), Open::Text, out);
        }
        let index = self.next_block - 1;
        let delta = json!({
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "text_delta", "text": text},
        });
        emit(out, "content_block_delta", &delta);
    }

    fn tool_delta(&mut self, call: &Value, out: &mut Vec<u8>) {
        let upstream = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let function = call.get("function");
        let args = match function.and_then(|f| f.get("arguments")) {
            Some(Value::String(s)) => s.clone(),
            // A few providers send whole arguments as an object.
            Some(v @ Value::Object(_)) => v.to_string(),
            _ => String::new(),
        };
        // A call is known by its id when it has one (some providers give
        // every parallel call index 0), else by its index (OpenAI sends the
        // id with the first fragment only).
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty());
        let known = match id {
            Some(id) => self.tools.iter().rev().find(|t| t.1 == id),
            None => self.tools.iter().rev().find(|t| t.0 == upstream),
        };
        let index = match known {
            Some(t) => t.2,
            None => {
                self.close(out);
                let id = tool_id(call, self.chat_id.as_deref(), self.tools.len());
                let name = function
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let block = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
                self.open_block(block, Open::Tool, out);
                let index = self.next_block - 1;
                self.tools.push((upstream, id, index));
                index
            }
        };
        // Fragments of a call already closed (an upstream interleaving
        // parallel calls) keep their block's index; the SDKs accumulate by
        // index.
        if !args.is_empty() {
            let delta = json!({
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": &args},
            });
            emit(out, "content_block_delta", &delta);
        }
    }

    fn open_block(&mut self, block: Value, open: Open, out: &mut Vec<u8>) {
        let start = json!({
            "type": "content_block_start",
            "index": self.next_block,
            "content_block": block,
        });
        emit(out, "content_block_start", &start);
        self.next_block += 1;
        self.open = open;
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if self.open == Open::None {
            return;
        }
        self.open = Open::None;
        let stop = json!({"type": "content_block_stop", "index": self.next_block - 1});
        emit(out, "content_block_stop", &stop);
    }

    /// `message_delta` and `message_stop`.
    fn end(&mut self, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.start(None, out);
        self.close(out);
        self.ended = true;
        let (input, output, cached) = self.usage.unwrap_or((0, 0, 0));
        let delta = json!({
            "type": "message_delta",
            "delta": {
                "stop_reason": stop_reason(self.finish_reason.as_deref()),
                "stop_sequence": null,
            },
            "usage": {
                "input_tokens": input,
                "output_tokens": output,
                "cache_read_input_tokens": cached,
                "cache_creation_input_tokens": 0,
            },
        });
        emit(out, "message_delta", &delta);
        emit(out, "message_stop", &json!({"type": "message_stop"}));
    }
}

/// One SSE event as Anthropic writes it: `event:` then `data:`.
fn emit(out: &mut Vec<u8>, event: &str, data: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

impl StreamTranslator for Stream {
    fn feed(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = Vec::new();
        let mut rest = chunk;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            let (head, tail) = (&rest[..nl], &rest[nl + 1..]);
            if self.line.is_empty() {
                self.line(head, &mut out);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                self.line(&line, &mut out);
            }
            rest = tail;
        }
        super::hold_partial(&mut self.line, rest);
        Bytes::from(out)
    }

    fn finish(&mut self) -> Bytes {
        let mut out = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line(&line, &mut out);
        }
        self.dispatch(&mut out);
        self.end(&mut out);
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: RequestOptions<'static> = RequestOptions {
        native_model: "glm-4.6",
        default_max_tokens: 4096,
    };

    fn translate(msg: Value) -> Result<(Value, u32), Refused> {
        let Value::Object(msg) = msg else {
            panic!("test input is an object")
        };
        let t = request(&msg, &OPTS)?;
        let body = serde_json::from_slice(&t.body).expect("translated body is JSON");
        Ok((body, t.dropped_cache_control))
    }

    fn refused_field(msg: Value) -> String {
        match translate(msg) {
            Err(r) => r.field,
            Ok(body) => panic!("expected a refusal, got {body:?}"),
        }
    }

    #[test]
    fn a_simple_streaming_request_maps_system_sampling_stop_and_user() {
        let (body, dropped) = translate(json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": "You are terse.",
            "messages": [{"role": "user", "content": "Hello"}],
            "stop_sequences": ["\n\nHuman:"],
            "temperature": 0.2,
            "top_p": 0.9,
            "stream": true,
            "metadata": {"user_id": "user-42"},
            "service_tier": "auto",
        }))
        .expect("translates");
        assert_eq!(
            body,
            json!({
                "model": "glm-4.6",
                "max_tokens": 1024,
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Hello"},
                ],
                "stop": ["\n\nHuman:"],
                "temperature": 0.2,
                "top_p": 0.9,
                "stream": true,
                "stream_options": {"include_usage": true},
                "user": "user-42",
            })
        );
        assert_eq!(dropped, 0);
    }

    /// A Claude Code–shaped multi-turn tool conversation: system blocks and
    /// tools with `cache_control`, parallel tool calls, tool results (one an
    /// error, one in blocks) followed by the user's text.
    fn multi_turn_tool_use() -> Value {
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 4096,
            "system": [
                {"type": "text", "text": "You are a coding agent."},
                {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral"}},
            ],
            "tools": [
                {
                    "name": "read_file",
                    "description": "Read a file",
                    "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
                },
                {
                    "type": "custom",
                    "name": "run",
                    "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}},
                    "cache_control": {"type": "ephemeral"},
                },
            ],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Read a.rs and run ls", "cache_control": {"type": "ephemeral"}}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "plan", "signature": "sig"},
                    {"type": "text", "text": "Doing both."},
                    {"type": "tool_use", "id": "toolu_01A", "name": "read_file", "input": {"path": "a.rs"}},
                    {"type": "tool_use", "id": "toolu_01B", "name": "run", "input": {"cmd": "ls -la"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "fn main() {}"},
                    {"type": "tool_result", "tool_use_id": "toolu_01B", "is_error": true,
                     "content": [{"type": "text", "text": "ls: permission denied"}]},
                    {"type": "text", "text": "Now fix it."},
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_01C", "name": "run", "input": {}},
                ]},
            ],
        })
    }

    #[test]
    fn multi_turn_tool_use_keeps_ids_orders_tool_results_first_and_counts_cache_control() {
        let (body, dropped) = translate(multi_turn_tool_use()).expect("translates");
        assert_eq!(
            body,
            json!({
                "model": "glm-4.6",
                "max_tokens": 4096,
                "messages": [
                    {"role": "system", "content": "You are a coding agent.\n\nBe careful."},
                    {"role": "user", "content": "Read a.rs and run ls"},
                    {"role": "assistant", "content": "Doing both.", "tool_calls": [
                        {"id": "toolu_01A", "type": "function",
                         "function": {"name": "read_file", "arguments": "{\"path\":\"a.rs\"}"}},
                        {"id": "toolu_01B", "type": "function",
                         "function": {"name": "run", "arguments": "{\"cmd\":\"ls -la\"}"}},
                    ]},
                    {"role": "tool", "tool_call_id": "toolu_01A", "content": "fn main() {}"},
                    {"role": "tool", "tool_call_id": "toolu_01B", "content": "ls: permission denied"},
                    {"role": "user", "content": "Now fix it."},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "toolu_01C", "type": "function",
                         "function": {"name": "run", "arguments": "{}"}},
                    ]},
                ],
                "tools": [
                    {"type": "function", "function": {
                        "name": "read_file", "description": "Read a file",
                        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
                    }},
                    {"type": "function", "function": {
                        "name": "run",
                        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
                    }},
                ],
                "tool_choice": "required",
                "parallel_tool_calls": false,
            })
        );
        assert_eq!(dropped, 3);
    }

    #[test]
    fn the_same_request_gives_the_same_bytes() {
        let Value::Object(msg) = multi_turn_tool_use() else {
            unreachable!()
        };
        let a = request(&msg, &OPTS).expect("translates");
        let b = request(&msg, &OPTS).expect("translates");
        assert_eq!(a.body, b.body);
    }

    #[test]
    fn images_become_image_url_parts_beside_text() {
        let (body, _) = translate(json!({
            "model": "m", "max_tokens": 10,
            "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {"type": "text", "text": "What are these?"},
            ]}],
        }))
        .expect("translates");
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                {"type": "text", "text": "What are these?"},
            ]}])
        );
    }

    #[test]
    fn tool_choice_variants_map_to_chat() {
        let choice = |c: Value| {
            translate(json!({"model": "m", "max_tokens": 1, "messages": [], "tool_choice": c}))
                .expect("translates")
                .0
        };
        assert_eq!(choice(json!({"type": "auto"}))["tool_choice"], "auto");
        assert_eq!(choice(json!({"type": "none"}))["tool_choice"], "none");
        let named = choice(json!({"type": "tool", "name": "read_file"}));
        assert_eq!(
            named["tool_choice"],
            json!({"type": "function", "function": {"name": "read_file"}})
        );
        assert!(named.get("parallel_tool_calls").is_none());
    }

    #[test]
    fn what_chat_cannot_express_is_refused_by_name() {
        let base = |extra: (&str, Value)| {
            let mut m = json!({"model": "m", "max_tokens": 1,
                               "messages": [{"role": "user", "content": "hi"}]});
            m[extra.0] = extra.1;
            m
        };
        assert_eq!(
            refused_field(base((
                "thinking",
                json!({"type": "enabled", "budget_tokens": 2048})
            ))),
            "thinking"
        );
        assert_eq!(refused_field(base(("top_k", json!(5)))), "top_k");
        assert_eq!(
            refused_field(base((
                "tools",
                json!([{"type": "web_search_20250305", "name": "web_search"}])
            ))),
            "tools[0].type"
        );
        assert_eq!(
            refused_field(base((
                "messages",
                json!([{"role": "user", "content": [
                    {"type": "text", "text": "summarise"},
                    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
                ]}])
            ))),
            "messages[0].content[1].type"
        );
        assert_eq!(
            refused_field(base((
                "messages",
                json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                    "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}])
            ))),
            "messages[0].content[0].content[0].type"
        );
        assert_eq!(
            refused_field(base((
                "messages",
                json!([{"role": "system", "content": "x"}])
            ))),
            "messages[0].role"
        );
        // Disabled thinking asks for nothing.
        assert!(translate(base(("thinking", json!({"type": "disabled"})))).is_ok());
    }

    fn answer(chat: Value) -> Value {
        let out =
            response(chat.to_string().as_bytes(), "claude-sonnet-4-5").expect("a chat completion");
        serde_json::from_slice(&out).expect("JSON")
    }

    #[test]
    fn a_text_completion_becomes_a_message() {
        let msg = answer(json!({
            "id": "chatcmpl-abc123", "object": "chat.completion", "created": 1, "model": "glm-4.6",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hi there!"}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
        }));
        assert_eq!(
            msg,
            json!({
                "id": "msg_chatcmpl-abc123", "type": "message", "role": "assistant",
                "model": "claude-sonnet-4-5",
                "content": [{"type": "text", "text": "Hi there!"}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 20, "output_tokens": 3,
                          "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            })
        );
    }

    #[test]
    fn parallel_tool_calls_become_tool_use_blocks_with_cached_usage() {
        let msg = answer(json!({
            "id": "chatcmpl-t1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "Let me check.",
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}},
                    {"id": "call_3", "type": "function", "function": {"name": "now", "arguments": "not json"}},
                ]}}],
            "usage": {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240,
                      "prompt_tokens_details": {"cached_tokens": 1024}},
        }));
        assert_eq!(
            msg["content"],
            json!([
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
                {"type": "tool_use", "id": "call_3", "name": "now", "input": {}},
            ])
        );
        assert_eq!(msg["stop_reason"], "tool_use");
        assert_eq!(
            msg["usage"],
            json!({"input_tokens": 176, "output_tokens": 40,
                   "cache_read_input_tokens": 1024, "cache_creation_input_tokens": 0})
        );
    }

    #[test]
    fn finish_reasons_map_to_stop_reasons() {
        for (finish, stop) in [
            ("stop", "end_turn"),
            ("length", "max_tokens"),
            ("tool_calls", "tool_use"),
            ("function_call", "tool_use"),
            ("content_filter", "refusal"),
        ] {
            let msg = answer(json!({"id": "c", "choices": [{"finish_reason": finish,
                "message": {"role": "assistant", "content": "x"}}]}));
            assert_eq!(msg["stop_reason"], stop, "{finish}");
        }
    }

    #[test]
    fn deepseek_cache_hits_count_as_cache_reads() {
        let msg = answer(json!({"id": "c", "choices": [{"finish_reason": "stop",
            "message": {"role": "assistant", "content": "x"}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 5,
                      "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}}));
        assert_eq!(msg["usage"]["input_tokens"], 36);
        assert_eq!(msg["usage"]["cache_read_input_tokens"], 64);
    }

    #[test]
    fn a_body_that_is_not_a_chat_completion_is_none() {
        assert!(response(b"not json", "m").is_none());
        assert!(response(b"{\"object\":\"list\",\"data\":[]}", "m").is_none());
    }

    fn error_json(status: u16, body: &[u8]) -> Value {
        serde_json::from_slice(&error(status, body)).expect("JSON")
    }

    #[test]
    fn openai_errors_take_the_anthropic_shape_and_type_for_the_status() {
        let body = br#"{"error":{"message":"Rate limit reached for gpt-4o","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            error_json(429, body),
            json!({"type": "error", "error": {"type": "rate_limit_error",
                   "message": "Rate limit reached for gpt-4o"}})
        );
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (500, "api_error"),
            (503, "api_error"),
            (529, "overloaded_error"),
        ] {
            assert_eq!(
                error_json(status, b"{\"error\":{\"message\":\"m\"}}")["error"]["type"],
                kind
            );
        }
        assert_eq!(
            error_json(502, b"<html>Bad Gateway</html>")["error"]["message"],
            "upstream error (HTTP 502)"
        );
        assert_eq!(
            error_json(400, b"{\"error\":\"bad model\"}")["error"]["message"],
            "bad model"
        );
    }

    /// The client's bytes for `upstream` fed in `pieces`, then `finish`.
    fn run(pieces: &[&[u8]]) -> String {
        let mut s = Stream::new("claude-sonnet-4-5");
        let mut out = Vec::new();
        for p in pieces {
            out.extend_from_slice(&s.feed(p));
        }
        out.extend_from_slice(&s.finish());
        String::from_utf8(out).expect("UTF-8")
    }

    fn chunk(data: Value) -> String {
        format!("data: {data}\n\n")
    }

    const TEXT_STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-s1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"glm-4.6\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        ": keep-alive\n\n",
        "data: {\"id\":\"chatcmpl-s1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"glm-4.6\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-s1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"glm-4.6\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo ✓\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-s1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"glm-4.6\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-s1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"glm-4.6\",\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":4,\"total_tokens\":34,\"prompt_tokens_details\":{\"cached_tokens\":10}}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn a_text_stream_becomes_the_messages_event_sequence() {
        let expected = concat!(
            "event: message_start\n",
            "data: {\"message\":{\"content\":[],\"id\":\"msg_chatcmpl-s1\",\"model\":\"claude-sonnet-4-5\",\"role\":\"assistant\",\"stop_reason\":null,\"stop_sequence\":null,\"type\":\"message\",\"usage\":{\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"input_tokens\":0,\"output_tokens\":0}},\"type\":\"message_start\"}\n\n",
            "event: content_block_start\n",
            "data: {\"content_block\":{\"text\":\"\",\"type\":\"text\"},\"index\":0,\"type\":\"content_block_start\"}\n\n",
            "event: content_block_delta\n",
            "data: {\"delta\":{\"text\":\"Hel\",\"type\":\"text_delta\"},\"index\":0,\"type\":\"content_block_delta\"}\n\n",
            "event: content_block_delta\n",
            "data: {\"delta\":{\"text\":\"lo ✓\",\"type\":\"text_delta\"},\"index\":0,\"type\":\"content_block_delta\"}\n\n",
            "event: content_block_stop\n",
            "data: {\"index\":0,\"type\":\"content_block_stop\"}\n\n",
            "event: message_delta\n",
            "data: {\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"type\":\"message_delta\",\"usage\":{\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":10,\"input_tokens\":20,\"output_tokens\":4}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        assert_eq!(run(&[TEXT_STREAM.as_bytes()]), expected);
    }

    /// Text, then two parallel tool calls whose arguments arrive in
    /// fragments (OpenAI's shape: id and name first, then `arguments`).
    fn tool_stream() -> String {
        let c = |delta: Value, finish: Value| {
            chunk(
                json!({"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1,
                         "model": "gpt-4o", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
            )
        };
        let call = |index: u64, id: Option<&str>, name: Option<&str>, args: &str| {
            let mut f = json!({"arguments": args});
            if let Some(n) = name {
                f["name"] = json!(n);
            }
            let mut tc = json!({"index": index, "function": f});
            if let Some(id) = id {
                tc["id"] = json!(id);
                tc["type"] = json!("function");
            }
            json!({"tool_calls": [tc]})
        };
        [
            c(json!({"role": "assistant", "content": "Checking."}), Value::Null),
            c(call(0, Some("call_A"), Some("get_weather"), ""), Value::Null),
            c(call(0, None, None, "{\"city\":"), Value::Null),
            c(call(0, None, None, "\"Paris\"}"), Value::Null),
            c(call(1, Some("call_B"), Some("get_weather"), "{\"city\":\"Rome\"}"), Value::Null),
            c(json!({}), json!("tool_calls")),
            chunk(json!({"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1,
                         "model": "gpt-4o", "choices": [],
                         "usage": {"prompt_tokens": 50, "completion_tokens": 30, "total_tokens": 80}})),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat()
    }

    /// The events of a client stream as (event name, data JSON).
    fn events(out: &str) -> Vec<(String, Value)> {
        out.split_terminator("\n\n")
            .map(|e| {
                let (ev, data) = e.split_once('\n').expect("two lines");
                let ev = ev.strip_prefix("event: ").expect("event line");
                let data = data.strip_prefix("data: ").expect("data line");
                (ev.to_string(), serde_json::from_str(data).expect("JSON"))
            })
            .collect()
    }

    #[test]
    fn parallel_tool_calls_stream_as_tool_use_blocks_with_input_json_deltas() {
        let got = events(&run(&[tool_stream().as_bytes()]));
        let names: Vec<&str> = got.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        for (event, data) in &got {
            assert_eq!(data["type"], event.as_str());
        }
        assert_eq!(
            got[4].1["content_block"],
            json!({"type": "tool_use", "id": "call_A", "name": "get_weather", "input": {}})
        );
        assert_eq!(got[4].1["index"], 1);
        assert_eq!(
            got[5].1["delta"],
            json!({"type": "input_json_delta", "partial_json": "{\"city\":"})
        );
        assert_eq!(got[6].1["delta"]["partial_json"], "\"Paris\"}");
        assert_eq!(got[8].1["content_block"]["id"], "call_B");
        assert_eq!(got[8].1["index"], 2);
        assert_eq!(got[9].1["index"], 2);
        assert_eq!(got[10].1["index"], 2);
        assert_eq!(
            got[11].1,
            json!({"type": "message_delta",
                   "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                   "usage": {"input_tokens": 50, "output_tokens": 30,
                             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}})
        );
    }

    #[test]
    fn an_error_event_becomes_an_anthropic_error_event_and_ends_the_stream() {
        let upstream = [
            TEXT_STREAM.split("\n\n").next().unwrap_or_default(),
            "\n\n",
            "data: {\"error\":{\"message\":\"Rate limit exceeded\",\"type\":\"rate_limit_error\",\"code\":\"rate_limit_exceeded\"}}\n\n",
        ]
        .concat();
        let got = events(&run(&[upstream.as_bytes()]));
        let last = got.last().expect("events");
        assert_eq!(last.0, "error");
        assert_eq!(
            last.1,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit exceeded"}})
        );
        assert_eq!(got.len(), 2, "message_start, error; nothing after");
    }

    #[test]
    fn a_stream_without_done_ends_at_finish() {
        let upstream = TEXT_STREAM.replace("data: [DONE]\n\n", "");
        assert_eq!(run(&[upstream.as_bytes()]), run(&[TEXT_STREAM.as_bytes()]));
        // A last event without its blank line is still read.
        let cut = TEXT_STREAM.trim_end();
        assert_eq!(run(&[cut.as_bytes()]), run(&[TEXT_STREAM.as_bytes()]));
    }

    #[test]
    fn an_empty_stream_still_gives_a_complete_message() {
        let got = events(&run(&[b"data: [DONE]\n\n"]));
        let names: Vec<&str> = got.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(names, ["message_start", "message_delta", "message_stop"]);
    }

    #[test]
    fn any_split_gives_the_same_output() {
        let crlf = tool_stream().replace('\n', "\r\n");
        for upstream in [TEXT_STREAM.to_string(), tool_stream(), crlf] {
            let bytes = upstream.as_bytes();
            let whole = run(&[bytes]);
            for at in 0..=bytes.len() {
                assert_eq!(run(&[&bytes[..at], &bytes[at..]]), whole, "split at {at}");
            }
            let singles: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(run(&singles), whole, "byte by byte");
            // Three pieces at a few coprime strides.
            for stride in [3, 7, 13] {
                let pieces: Vec<&[u8]> = bytes.chunks(stride).collect();
                assert_eq!(run(&pieces), whole, "stride {stride}");
            }
        }
    }

    #[test]
    fn tool_calls_without_ids_get_stable_ones() {
        let msg = answer(
            json!({"id": "chatcmpl-x", "choices": [{"finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": null, "tool_calls": [
                {"type": "function", "function": {"name": "a", "arguments": "{}"}},
                {"id": "", "type": "function", "function": {"name": "b", "arguments": "{}"}},
            ]}}]}),
        );
        assert_eq!(msg["content"][0]["id"], "toolu_chatcmpl-x_0");
        assert_eq!(msg["content"][1]["id"], "toolu_chatcmpl-x_1");
        assert_eq!(
            msg["content"].as_array().map(Vec::len),
            Some(2),
            "no text block"
        );
    }

    #[test]
    fn parallel_calls_sharing_index_zero_are_told_apart_by_id() {
        // Gemini's OpenAI endpoint sends each whole call at index 0.
        let c = |tc: Value| {
            chunk(
                json!({"id": "g", "choices": [{"index": 0, "delta": {"tool_calls": [tc]}, "finish_reason": null}]}),
            )
        };
        let upstream = [
            c(json!({"index": 0, "id": "c1", "type": "function", "function": {"name": "a", "arguments": "{\"x\":1}"}})),
            c(json!({"index": 0, "id": "c2", "type": "function", "function": {"name": "b", "arguments": "{\"y\":2}"}})),
            chunk(json!({"id": "g", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})),
        ]
        .concat();
        let got = events(&run(&[upstream.as_bytes()]));
        let starts: Vec<(Value, Value)> = got
            .iter()
            .filter(|(e, _)| e == "content_block_start")
            .map(|(_, d)| (d["index"].clone(), d["content_block"]["id"].clone()))
            .collect();
        assert_eq!(starts, [(json!(0), json!("c1")), (json!(1), json!("c2"))]);
        assert_eq!(got.last().map(|e| e.0.as_str()), Some("message_stop"));
    }

    #[test]
    fn a_streamed_refusal_is_text() {
        let upstream = chunk(json!({"id": "r", "choices": [{"index": 0,
            "delta": {"content": null, "refusal": "I can't help with that."}, "finish_reason": null}]}));
        let got = events(&run(&[upstream.as_bytes()]));
        assert_eq!(got[2].1["delta"]["text"], "I can't help with that.");
    }

    #[test]
    fn arguments_sent_as_an_object_are_taken_as_is() {
        let msg = answer(
            json!({"id": "o", "choices": [{"finish_reason": "tool_calls",
            "message": {"role": "assistant", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "a", "arguments": {"k": [1, 2]}}},
            ]}}]}),
        );
        assert_eq!(msg["content"][0]["input"], json!({"k": [1, 2]}));
    }

    #[test]
    fn a_small_request_is_pinned_to_the_byte() {
        let Value::Object(msg) = json!({
            "model": "claude-haiku-4-5", "max_tokens": 64, "stream": true,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "ping"}]}],
        }) else {
            unreachable!()
        };
        let body = request(&msg, &OPTS).expect("translates").body;
        assert_eq!(
            String::from_utf8_lossy(&body),
            r#"{"max_tokens":64,"messages":[{"content":"ping","role":"user"}],"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true}}"#
        );
    }
}

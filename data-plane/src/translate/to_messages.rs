//! A Chat Completions client served by an Anthropic Messages backend:
//! [`request`] (chat → Messages), [`response`] (Messages JSON → chat
//! completion), [`Stream`] (Messages SSE → `chat.completion.chunk`s) and
//! [`error`] (an Anthropic error → the OpenAI error shape).
//!
//! What the request mapping does with each chat field:
//!
//! - Translated: `model` (→ the backend's), `messages` (system/developer →
//!   top-level `system`, wherever they appear; text, images, assistant
//!   `tool_calls` → `tool_use`, `role: tool` → `tool_result` blocks in a
//!   user message; consecutive same-role messages merged, since Anthropic
//!   requires alternation), `tools`, `tool_choice`, `parallel_tool_calls`,
//!   `stop`, `max_completion_tokens`/`max_tokens` (else the mapping's
//!   default: Anthropic requires it), `temperature` (0–1 only), `top_p`,
//!   `top_k` (a common extension), `stream`, `user` (→ `metadata.user_id`).
//!   A text part's `cache_control` (sent by some clients for Claude) is kept.
//! - Refused by name (a 400 in the client's shape): `n` > 1, `logprobs`,
//!   `top_logprobs`, `response_format` other than `text`, `audio` and
//!   `modalities` with audio, `logit_bias`, non-zero `frequency_penalty` /
//!   `presence_penalty`, `prediction`, `web_search_options`,
//!   `reasoning_effort`, the legacy `functions`/`function_call` and
//!   `role: function`, `temperature` > 1, audio and file content parts,
//!   tools other than `function`.
//! - Ignored on purpose, because they change nothing the client can observe
//!   in the answer's content: `seed` (a best-effort determinism hint even on
//!   OpenAI), `stream_options` (honoured by [`Stream`] itself), `store`,
//!   `metadata` (OpenAI's stored-completion tags), `service_tier`,
//!   `prompt_cache_key` and `safety_identifier` (read by routing), a
//!   message's `name`, an image's `detail`, a tool's `strict`; and fields
//!   this module does not know (vendor extensions meant for other backends).
//! - Messages left without any content (an empty assistant turn) are left
//!   out: Anthropic rejects empty content and they carry nothing.
//!
//! Output is deterministic: `serde_json`'s `Map` is ordered by key, so the
//! same request gives the same bytes and provider prefix caches still hit.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{Refused, RequestOptions, StreamTranslator, TranslatedRequest};

/// A refusal of `field`.
fn refuse(field: impl Into<String>, message: impl Into<String>) -> Refused {
    Refused {
        field: field.into(),
        message: message.into(),
    }
}

/// The Messages request for a chat completion request `chat` (already
/// parsed; its `model` is replaced by `opts.native_model`).
pub(crate) fn request(
    chat: &Map<String, Value>,
    opts: &RequestOptions<'_>,
) -> Result<TranslatedRequest, Refused> {
    check_unsupported(chat)?;
    let mut out = Map::new();
    out.insert("model".into(), Value::from(opts.native_model));
    let (system, messages) = messages(chat.get("messages"))?;
    if let Some(system) = system {
        out.insert("system".into(), system);
    }
    out.insert("messages".into(), Value::Array(messages));
    out.insert("max_tokens".into(), max_tokens(chat, opts)?);
    tools(chat, &mut out)?;
    sampling(chat, &mut out)?;
    let body = serde_json::to_vec(&Value::Object(out))
        .map_err(|_| refuse("messages", "the request could not be encoded"))?;
    Ok(TranslatedRequest {
        body,
        dropped_cache_control: 0,
    })
}

/// Whether `v` is absent or JSON `null`.
fn unset(v: Option<&Value>) -> bool {
    v.is_none_or(Value::is_null)
}

/// Whether a set chat field asks for something Anthropic cannot do.
type Unexpressible = fn(&Value) -> bool;

/// The chat fields refused when set (not `null`) to a value for which the
/// predicate holds, with the reason given to the client.
const REFUSED: [(&str, Unexpressible, &str); 13] = [
    (
        "n",
        |v| v.as_u64() != Some(1),
        "Anthropic backends return one choice: `n` must be 1",
    ),
    (
        "logprobs",
        |v| v.as_bool() != Some(false),
        "Anthropic backends return no logprobs",
    ),
    (
        "top_logprobs",
        |_| true,
        "Anthropic backends return no logprobs",
    ),
    (
        "response_format",
        |v| v.get("type").and_then(Value::as_str) != Some("text"),
        "Anthropic backends support only the `text` response format",
    ),
    ("audio", |_| true, "Anthropic backends produce no audio"),
    (
        "modalities",
        |v| {
            v.as_array()
                .is_none_or(|m| m.iter().any(|m| m.as_str() != Some("text")))
        },
        "Anthropic backends produce text only",
    ),
    (
        "logit_bias",
        |v| v.as_object().is_none_or(|m| !m.is_empty()),
        "Anthropic backends take no logit bias",
    ),
    (
        "frequency_penalty",
        |v| v.as_f64() != Some(0.0),
        "Anthropic backends take no penalties",
    ),
    (
        "presence_penalty",
        |v| v.as_f64() != Some(0.0),
        "Anthropic backends take no penalties",
    ),
    (
        "prediction",
        |_| true,
        "Anthropic backends take no predicted output",
    ),
    (
        "web_search_options",
        |_| true,
        "web search is not available on this backend",
    ),
    (
        "reasoning_effort",
        |_| true,
        "reasoning effort cannot be expressed for this backend",
    ),
    (
        "functions",
        |_| true,
        "legacy `functions` are not translated: use `tools`",
    ),
];

/// Refuses the fields Anthropic Messages cannot express.
fn check_unsupported(chat: &Map<String, Value>) -> Result<(), Refused> {
    for (field, refused, why) in REFUSED {
        if chat.get(field).is_some_and(|v| !v.is_null() && refused(v)) {
            return Err(refuse(field, why));
        }
    }
    if !unset(chat.get("function_call")) {
        return Err(refuse(
            "function_call",
            "legacy `function_call` is not translated: use `tool_choice`",
        ));
    }
    Ok(())
}

/// `max_tokens` for the backend: the client's, else the mapping's default.
fn max_tokens(chat: &Map<String, Value>, opts: &RequestOptions<'_>) -> Result<Value, Refused> {
    for field in ["max_completion_tokens", "max_tokens"] {
        if let Some(v) = chat.get(field).filter(|v| !v.is_null()) {
            return match v.as_u64() {
                Some(n) if n > 0 => Ok(Value::from(n)),
                _ => Err(refuse(field, "must be a positive integer")),
            };
        }
    }
    Ok(Value::from(opts.default_max_tokens))
}

/// `temperature`, `top_p`, `top_k`, `stop`, `stream` and `user`.
fn sampling(chat: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), Refused> {
    if let Some(t) = chat.get("temperature").filter(|v| !v.is_null()) {
        match t.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => {
                out.insert("temperature".into(), t.clone());
            }
            _ => {
                return Err(refuse(
                    "temperature",
                    "Anthropic backends take a temperature between 0 and 1",
                ));
            }
        }
    }
    for field in ["top_p", "top_k"] {
        if let Some(v) = chat.get(field).filter(|v| !v.is_null()) {
            out.insert(field.into(), v.clone());
        }
    }
    match chat.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            if !a.is_empty() {
                out.insert("stop_sequences".into(), Value::Array(a.clone()));
            }
        }
        Some(_) => return Err(refuse("stop", "must be a string or a list of strings")),
    }
    if chat.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
    }
    match chat.get("user") {
        None | Some(Value::Null) => {}
        Some(Value::String(u)) => {
            out.insert("metadata".into(), json!({ "user_id": u }));
        }
        Some(_) => return Err(refuse("user", "must be a string")),
    }
    Ok(())
}

/// `tools`, `tool_choice` and `parallel_tool_calls`.
fn tools(chat: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), Refused> {
    let list = match chat.get("tools") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(refuse("tools", "must be a list")),
    };
    let mut tools = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(refuse(
                format!("tools[{i}].type"),
                "only `function` tools can be translated",
            ));
        }
        let f = t.get("function").and_then(Value::as_object);
        let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
        let (Some(f), Some(name)) = (f, name) else {
            return Err(refuse(format!("tools[{i}].function.name"), "is required"));
        };
        let mut tool = Map::new();
        tool.insert("name".into(), Value::from(name));
        if let Some(d) = f.get("description").filter(|d| d.is_string()) {
            tool.insert("description".into(), d.clone());
        }
        let schema = match f.get("parameters") {
            Some(p @ Value::Object(_)) => p.clone(),
            _ => json!({"type": "object", "properties": {}}),
        };
        tool.insert("input_schema".into(), schema);
        tools.push(Value::Object(tool));
    }
    if tools.is_empty() {
        return Ok(());
    }
    out.insert("tools".into(), Value::Array(tools));
    let serial = chat.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false);
    let mut choice = match chat.get("tool_choice") {
        None | Some(Value::Null) => json!({"type": "auto"}),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            "none" => json!({"type": "none"}),
            _ => {
                return Err(refuse(
                    "tool_choice",
                    "must be auto, required, none or a function",
                ));
            }
        },
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
                json!({"type": "tool", "name": name})
            }
            _ => {
                return Err(refuse(
                    "tool_choice",
                    "must be auto, required, none or a function",
                ));
            }
        },
    };
    let explicit = !unset(chat.get("tool_choice"));
    if serial && choice["type"] != "none" {
        choice["disable_parallel_tool_use"] = Value::Bool(true);
    }
    if explicit || serial {
        out.insert("tool_choice".into(), choice);
    }
    Ok(())
}

/// The `system` value and the alternating `messages` for the chat
/// `messages`.
fn messages(messages: Option<&Value>) -> Result<(Option<Value>, Vec<Value>), Refused> {
    let Some(list) = messages.and_then(Value::as_array) else {
        return Err(refuse("messages", "must be a list"));
    };
    let mut system: Vec<Value> = Vec::new();
    // (role, blocks), consecutive same roles merged.
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        let (role, blocks) = match role {
            "system" | "developer" => {
                system.extend(text_blocks(
                    m.get("content"),
                    &format!("messages[{i}].content"),
                )?);
                continue;
            }
            "user" => ("user", content_blocks(m.get("content"), i)?),
            "assistant" => ("assistant", assistant_blocks(m, i)?),
            "tool" => ("user", vec![tool_result(m, i)?]),
            "function" => {
                return Err(refuse(
                    format!("messages[{i}].role"),
                    "legacy `function` messages are not translated: use `tool`",
                ));
            }
            _ => {
                return Err(refuse(
                    format!("messages[{i}].role"),
                    "must be system, developer, user, assistant or tool",
                ));
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, b)) if *last == role => b.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let system = match system.len() {
        0 => None,
        1 if system[0].get("cache_control").is_none() => system[0].get("text").cloned(),
        _ => Some(Value::Array(system)),
    };
    if turns.is_empty() {
        return Err(refuse(
            "messages",
            "Anthropic backends need at least one non-empty user or assistant message",
        ));
    }
    let messages = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    Ok((system, messages))
}

/// A text block, keeping a client's `cache_control`; `None` for empty text
/// (Anthropic rejects empty text blocks).
fn text_block(text: &str, part: Option<&Value>) -> Option<Value> {
    if text.is_empty() {
        return None;
    }
    let mut b = json!({"type": "text", "text": text});
    if let Some(cc) = part
        .and_then(|p| p.get("cache_control"))
        .filter(|c| !c.is_null())
    {
        b["cache_control"] = cc.clone();
    }
    Some(b)
}

/// Text-only content (system, tool results): a string or `text` parts.
fn text_blocks(content: Option<&Value>, field: &str) -> Result<Vec<Value>, Refused> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(text_block(s, None).into_iter().collect()),
        Some(Value::Array(parts)) => {
            let mut out = Vec::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => out.extend(text_block(t, Some(p))),
                    _ => {
                        return Err(refuse(
                            format!("{field}[{j}].type"),
                            "only text parts can be translated here",
                        ));
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(refuse(field, "must be a string or a list of parts")),
    }
}

/// A user message's content: text and image parts.
fn content_blocks(content: Option<&Value>, i: usize) -> Result<Vec<Value>, Refused> {
    let field = format!("messages[{i}].content");
    let parts = match content {
        Some(Value::Array(parts)) => parts,
        other => return text_blocks(other, &field),
    };
    let mut out = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let kind = p.get("type").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "text" | "refusal" => {
                let Some(t) = p.get(kind).and_then(Value::as_str) else {
                    return Err(refuse(format!("{field}[{j}].{kind}"), "must be a string"));
                };
                out.extend(text_block(t, Some(p)));
            }
            "image_url" => out.push(image(p, &format!("{field}[{j}].image_url.url"))?),
            _ => {
                return Err(refuse(
                    format!("{field}[{j}].type"),
                    "only text and image parts can be translated for this backend",
                ));
            }
        }
    }
    Ok(out)
}

/// An `image_url` part as an Anthropic image block: a `data:` URL becomes a
/// base64 source, an http(s) URL a url source.
fn image(part: &Value, field: &str) -> Result<Value, Refused> {
    let url = part
        .get("image_url")
        .and_then(|u| u.get("url").or(Some(u)))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let source = if let Some(rest) = url.strip_prefix("data:") {
        let Some((media_type, data)) = rest.split_once(";base64,") else {
            return Err(refuse(
                field,
                "a data: URL must be base64 (`data:<type>;base64,…`)",
            ));
        };
        json!({"type": "base64", "media_type": media_type, "data": data})
    } else if url.starts_with("https://") || url.starts_with("http://") {
        json!({"type": "url", "url": url})
    } else {
        return Err(refuse(field, "must be an http(s) or base64 data: URL"));
    };
    let mut b = json!({"type": "image", "source": source});
    if let Some(cc) = part.get("cache_control").filter(|c| !c.is_null()) {
        b["cache_control"] = cc.clone();
    }
    Ok(b)
}

/// An assistant message's content and `tool_calls` as blocks.
fn assistant_blocks(m: &Value, i: usize) -> Result<Vec<Value>, Refused> {
    let mut out = content_blocks(m.get("content"), i)?;
    let calls = match m.get("tool_calls") {
        None | Some(Value::Null) => return Ok(out),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(refuse(
                format!("messages[{i}].tool_calls"),
                "must be a list",
            ));
        }
    };
    for (j, c) in calls.iter().enumerate() {
        let field = format!("messages[{i}].tool_calls[{j}]");
        let id = c.get("id").and_then(Value::as_str);
        let name = c.pointer("/function/name").and_then(Value::as_str);
        let (Some(id), Some(name)) = (id, name) else {
            return Err(refuse(field, "a tool call needs an id and a function name"));
        };
        let args = c
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let input = if args.trim().is_empty() {
            Value::Object(Map::new())
        } else {
            match serde_json::from_str::<Value>(args) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return Err(refuse(
                        format!("{field}.function.arguments"),
                        "must be a JSON object encoded as a string",
                    ));
                }
            }
        };
        out.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    Ok(out)
}

/// A `role: tool` message as a `tool_result` block.
fn tool_result(m: &Value, i: usize) -> Result<Value, Refused> {
    let Some(id) = m.get("tool_call_id").and_then(Value::as_str) else {
        return Err(refuse(format!("messages[{i}].tool_call_id"), "is required"));
    };
    let content = match m.get("content") {
        Some(Value::String(s)) => Value::from(s.as_str()),
        other => Value::Array(text_blocks(other, &format!("messages[{i}].content"))?),
    };
    Ok(json!({"type": "tool_result", "tool_use_id": id, "content": content}))
}

/// The current time in seconds, for `created`.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The chat `finish_reason` for an Anthropic `stop_reason`.
fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// Token counts of an Anthropic answer, merged over a stream's events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tokens {
    input: u64,
    cache_read: u64,
    cache_creation: u64,
    output: u64,
}

impl Tokens {
    /// Takes the counts present (non-null) in an Anthropic `usage` object.
    fn merge(&mut self, usage: Option<&Value>) {
        let Some(u) = usage else { return };
        let fields = [
            ("input_tokens", &mut self.input),
            ("cache_read_input_tokens", &mut self.cache_read),
            ("cache_creation_input_tokens", &mut self.cache_creation),
            ("output_tokens", &mut self.output),
        ];
        for (name, slot) in fields {
            if let Some(n) = u.get(name).and_then(Value::as_u64) {
                *slot = n;
            }
        }
    }

    /// The chat `usage` object: prompt tokens include cache reads and writes.
    fn chat(&self) -> Value {
        let prompt = self
            .input
            .saturating_add(self.cache_read)
            .saturating_add(self.cache_creation);
        let mut details = json!({"cached_tokens": self.cache_read});
        if self.cache_creation > 0 {
            details["cache_write_tokens"] = Value::from(self.cache_creation);
        }
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.output,
            "total_tokens": prompt.saturating_add(self.output),
            "prompt_tokens_details": details,
        })
    }
}

/// The chat completion for a Messages answer `body`; `model` is the name the
/// client asked for. `None` when `body` is not a Messages answer.
pub(crate) fn response(body: &[u8], model: &str) -> Option<Vec<u8>> {
    response_at(body, model, now())
}

/// [`response`] with `created` given (deterministic in tests).
fn response_at(body: &[u8], model: &str, created: u64) -> Option<Vec<u8>> {
    let msg: Value = serde_json::from_slice(body).ok()?;
    if msg.get("type").and_then(Value::as_str) != Some("message") {
        return None;
    }
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in msg.get("content").and_then(Value::as_array)?.iter() {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str)?),
            Some("tool_use") => {
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(json!({
                    "id": block.get("id")?,
                    "type": "function",
                    "function": {"name": block.get("name")?, "arguments": input.to_string()},
                }));
            }
            // thinking, redacted_thinking, server tool blocks: none has a
            // chat counterpart, and none is asked for by a translated request.
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": Value::Null, "refusal": Value::Null});
    if !text.is_empty() || calls.is_empty() {
        message["content"] = Value::String(text);
    }
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let stop = msg.get("stop_reason").and_then(Value::as_str);
    let mut tokens = Tokens::default();
    tokens.merge(msg.get("usage"));
    let out = json!({
        "id": msg.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": Value::Null,
            "finish_reason": finish_reason(stop),
        }],
        "usage": tokens.chat(),
    });
    serde_json::to_vec(&out).ok()
}

/// The OpenAI error `type` for an HTTP status, as the OpenAI SDK and
/// [`crate::error`] use them.
fn openai_type_for_status(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        s if (400..500).contains(&s) => "invalid_request_error",
        _ => "server_error",
    }
}

/// The OpenAI error `type` for an Anthropic error `type` (stream errors
/// carry no status).
fn openai_type_for_anthropic(kind: &str) -> &'static str {
    match kind {
        "authentication_error" => "authentication_error",
        "permission_error" => "permission_error",
        "rate_limit_error" => "rate_limit_error",
        "invalid_request_error" | "not_found_error" | "request_too_large" => {
            "invalid_request_error"
        }
        _ => "server_error",
    }
}

/// `{"error":{"message","type","param":null,"code":null}}`.
fn openai_error(message: &str, kind: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": Value::Null, "code": Value::Null}})
}

/// The Anthropic error's message, if `body` is one.
fn anthropic_error_message(body: &Value) -> Option<&str> {
    body.pointer("/error/message").and_then(Value::as_str)
}

/// The OpenAI-shaped error body for an Anthropic error answer (`status`,
/// `body`); a body that is not an Anthropic error gets a generic message.
pub(crate) fn error(status: u16, body: &[u8]) -> Vec<u8> {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let generic = format!("the upstream answered HTTP {status}");
    let message = anthropic_error_message(&parsed).unwrap_or(&generic);
    let out = openai_error(message, openai_type_for_status(status));
    serde_json::to_vec(&out).unwrap_or_default()
}

/// What an Anthropic content block is, for the chunks of its deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    /// A `tool_use` block: the chat tool-call index.
    Tool(u32),
    /// Thinking and server-tool blocks: no chat counterpart.
    Other,
}

/// Messages SSE → `chat.completion.chunk` SSE (ending with `data: [DONE]`).
pub(crate) struct Stream {
    /// The model name the client asked for.
    model: String,
    /// Whether the client asked for `stream_options.include_usage`.
    include_usage: bool,
    /// `created` of every chunk (one value per stream, as OpenAI does).
    created: u64,
    /// The message id (from `message_start`).
    id: String,
    /// Bytes of an incomplete line.
    pub(super) line: Vec<u8>,
    /// `data:` lines of the event being read.
    data: Vec<u8>,
    /// Whether the `data:` of the current event has a line yet.
    has_data: bool,
    /// Content blocks by Anthropic index.
    blocks: Vec<(u64, Block)>,
    /// Tool calls seen so far.
    tools: u32,
    /// The role chunk went out.
    started: bool,
    /// The stream is over for the client (done or error).
    ended: bool,
    stop_reason: Option<String>,
    tokens: Tokens,
}

impl Stream {
    /// A translator for a client that asked for `model`.
    pub(crate) fn new(model: &str, include_usage: bool) -> Stream {
        Stream {
            model: model.to_string(),
            include_usage,
            created: now(),
            id: String::new(),
            line: Vec::new(),
            data: Vec::new(),
            has_data: false,
            blocks: Vec::new(),
            tools: 0,
            started: false,
            ended: false,
            stop_reason: None,
            tokens: Tokens::default(),
        }
    }

    /// Reads `chunk` line by line; complete events are translated into `out`.
    fn read(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut rest = chunk;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            let (head, tail) = rest.split_at(nl);
            rest = &tail[1..];
            if self.line.is_empty() {
                self.on_line(head, out);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                self.on_line(&line, out);
            }
        }
        super::hold_partial(&mut self.line, rest);
    }

    /// One SSE line (without its `\n`).
    fn on_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(out);
        } else if let Some(d) = line.strip_prefix(b"data:") {
            let d = d.strip_prefix(b" ").unwrap_or(d);
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(d);
            self.has_data = true;
        }
        // `event:` names repeat the data's `type`; comments and other
        // fields carry nothing to translate.
    }

    /// The end of an event: translate its data.
    fn dispatch(&mut self, out: &mut Vec<u8>) {
        if !self.has_data {
            return;
        }
        self.has_data = false;
        let data = std::mem::take(&mut self.data);
        if self.ended {
            return;
        }
        // An event that is not JSON is not a Messages event: nothing to say.
        if let Ok(event) = serde_json::from_slice::<Value>(&data) {
            self.on_event(&event, out);
        }
    }

    fn on_event(&mut self, ev: &Value, out: &mut Vec<u8>) {
        match ev.get("type").and_then(Value::as_str).unwrap_or_default() {
            "message_start" => {
                let msg = ev.get("message");
                if let Some(id) = msg.and_then(|m| m.get("id")).and_then(Value::as_str) {
                    self.id = id.to_string();
                }
                self.tokens.merge(msg.and_then(|m| m.get("usage")));
                self.start(out);
            }
            "content_block_start" => self.block_start(ev, out),
            "content_block_delta" => self.block_delta(ev, out),
            "message_delta" => {
                if let Some(r) = ev.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(r.to_string());
                }
                self.tokens.merge(ev.get("usage"));
            }
            "message_stop" => self.end(out),
            "error" => {
                let kind = ev.pointer("/error/type").and_then(Value::as_str);
                let message = anthropic_error_message(ev).unwrap_or("the upstream stream failed");
                let err = openai_error(message, openai_type_for_anthropic(kind.unwrap_or("")));
                emit(out, &err);
                self.ended = true;
            }
            // ping, content_block_stop, and unknown events: nothing to say.
            _ => {}
        }
    }

    /// The first chunk, with the role, once.
    fn start(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            self.started = true;
            self.chunk(out, json!({"role": "assistant", "content": ""}), None);
        }
    }

    fn block_start(&mut self, ev: &Value, out: &mut Vec<u8>) {
        self.start(out);
        let index = ev.get("index").and_then(Value::as_u64).unwrap_or_default();
        let cb = ev.get("content_block");
        let block = match cb.and_then(|b| b.get("type")).and_then(Value::as_str) {
            Some("text") => {
                let text = cb.and_then(|b| b.get("text")).and_then(Value::as_str);
                if let Some(t) = text.filter(|t| !t.is_empty()) {
                    self.chunk(out, json!({ "content": t }), None);
                }
                Block::Text
            }
            Some("tool_use") => {
                let n = self.tools;
                self.tools += 1;
                let id = cb.and_then(|b| b.get("id")).cloned().unwrap_or(Value::Null);
                let name = cb
                    .and_then(|b| b.get("name"))
                    .cloned()
                    .unwrap_or(Value::Null);
                let call = json!({
                    "index": n, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""},
                });
                self.chunk(out, json!({ "tool_calls": [call] }), None);
                // Streams carry the input as `input_json_delta`s after an
                // empty `input`; one that came whole is its only fragment.
                let input = cb.and_then(|b| b.get("input")).and_then(Value::as_object);
                if let Some(input) = input.filter(|i| !i.is_empty()) {
                    let args = Value::Object(input.clone()).to_string();
                    let call = json!({"index": n, "function": {"arguments": args}});
                    self.chunk(out, json!({ "tool_calls": [call] }), None);
                }
                Block::Tool(n)
            }
            _ => Block::Other,
        };
        self.blocks.push((index, block));
    }

    fn block_delta(&mut self, ev: &Value, out: &mut Vec<u8>) {
        let index = ev.get("index").and_then(Value::as_u64).unwrap_or_default();
        let block = self
            .blocks
            .iter()
            .rev()
            .find(|(i, _)| *i == index)
            .map_or(Block::Other, |(_, b)| *b);
        let delta = ev.get("delta");
        let kind = delta.and_then(|d| d.get("type")).and_then(Value::as_str);
        match (block, kind) {
            (Block::Text, Some("text_delta")) => {
                let text = delta.and_then(|d| d.get("text")).and_then(Value::as_str);
                if let Some(t) = text.filter(|t| !t.is_empty()) {
                    self.chunk(out, json!({ "content": t }), None);
                }
            }
            (Block::Tool(n), Some("input_json_delta")) => {
                let part = delta
                    .and_then(|d| d.get("partial_json"))
                    .and_then(Value::as_str);
                if let Some(p) = part.filter(|p| !p.is_empty()) {
                    let call = json!({"index": n, "function": {"arguments": p}});
                    self.chunk(out, json!({ "tool_calls": [call] }), None);
                }
            }
            // thinking, signature and citation deltas: no chat counterpart.
            _ => {}
        }
    }

    /// The final chunk, the usage chunk if asked for, and `[DONE]`.
    fn end(&mut self, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.start(out);
        let reason = finish_reason(self.stop_reason.as_deref());
        self.chunk(out, json!({}), Some(reason));
        if self.include_usage {
            let usage = json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": self.tokens.chat(),
            });
            emit(out, &usage);
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        self.ended = true;
    }

    /// A `chat.completion.chunk` with one choice.
    fn chunk(&self, out: &mut Vec<u8>, delta: Value, finish: Option<&str>) {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": Value::Null,
                         "finish_reason": finish}],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        emit(out, &c);
    }
}

/// One SSE `data:` event.
fn emit(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"data: ");
    // Writing a `Value` into a Vec cannot fail (no I/O, string keys).
    let _ = serde_json::to_writer(&mut *out, v);
    out.extend_from_slice(b"\n\n");
}

impl StreamTranslator for Stream {
    fn feed(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = Vec::new();
        self.read(chunk, &mut out);
        Bytes::from(out)
    }

    fn finish(&mut self) -> Bytes {
        let mut out = Vec::new();
        // A last line or event without its terminator still counts.
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.on_line(&line, &mut out);
        }
        self.dispatch(&mut out);
        self.end(&mut out);
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// The fixture directory.
    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/translate/testdata/to_messages")
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
    }

    /// Compares `actual` with the golden file `name` (`CLAW_BLESS=1`
    /// rewrites it).
    fn golden(name: &str, actual: &[u8]) {
        let path = dir().join(name);
        if std::env::var_os("CLAW_BLESS").is_some() {
            std::fs::write(&path, actual).unwrap();
            return;
        }
        let want = std::fs::read(&path).unwrap_or_else(|e| panic!("golden {name}: {e}"));
        assert_eq!(
            String::from_utf8_lossy(actual),
            String::from_utf8_lossy(&want),
            "golden {name} differs (CLAW_BLESS=1 to rewrite)"
        );
    }

    /// Pretty JSON plus a newline, for readable golden files.
    fn pretty(body: &[u8]) -> Vec<u8> {
        let v: Value = serde_json::from_slice(body).unwrap();
        let mut out = serde_json::to_vec_pretty(&v).unwrap();
        out.push(b'\n');
        out
    }

    const OPTS: RequestOptions<'static> = RequestOptions {
        native_model: "claude-sonnet-4-5-20250929",
        default_max_tokens: 4096,
    };

    fn translate(chat: Value) -> Result<Value, Refused> {
        let Value::Object(chat) = chat else {
            panic!("not an object")
        };
        let t = request(&chat, &OPTS)?;
        assert_eq!(t.dropped_cache_control, 0);
        Ok(serde_json::from_slice(&t.body).unwrap())
    }

    #[test]
    fn requests_match_their_golden_files() {
        for case in ["simple", "tools_round_trip", "images", "named_tool_serial"] {
            let chat: Map<String, Value> =
                serde_json::from_slice(&fixture(&format!("req_{case}.json"))).unwrap();
            let t = request(&chat, &OPTS).unwrap_or_else(|r| panic!("{case}: {r:?}"));
            // Deterministic: the same request gives the same bytes.
            assert_eq!(t.body, request(&chat, &OPTS).unwrap().body, "{case}");
            golden(&format!("req_{case}.golden.json"), &pretty(&t.body));
        }
    }

    #[test]
    fn tool_messages_merge_into_one_user_turn_and_roles_alternate() {
        let chat: Map<String, Value> =
            serde_json::from_slice(&fixture("req_tools_round_trip.json")).unwrap();
        let v: Value = serde_json::from_slice(&request(&chat, &OPTS).unwrap().body).unwrap();
        let msgs = v["messages"].as_array().unwrap();
        let roles: Vec<&str> = msgs.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["user", "assistant", "user", "assistant", "user"]);
        let results = msgs[2]["content"].as_array().unwrap();
        assert_eq!(results[0]["tool_use_id"], "call_abc123");
        assert_eq!(results[1]["tool_use_id"], "call_def456");
        assert_eq!(results[2]["type"], "text");
        assert_eq!(
            msgs[1]["content"][0]["input"],
            json!({"city": "Paris", "unit": "celsius"})
        );
        assert_eq!(msgs[3]["content"][1]["input"], json!({}));
        assert_eq!(v["system"][1]["text"], "Always use metric units.");
        assert_eq!(v["tool_choice"], json!({"type": "any"}));
        assert_eq!(v["max_tokens"], 1024);
        assert_eq!(v["model"], OPTS.native_model);
    }

    #[test]
    fn defaults_and_simple_mappings() {
        let v = translate(json!({"model": "x", "messages": [{"role": "user", "content": "hi"}]}))
            .unwrap();
        assert_eq!(
            v,
            json!({"model": OPTS.native_model, "max_tokens": 4096,
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
        );
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let choice = |tc: Value, parallel: Value| {
            let v = translate(json!({"messages": [{"role": "user", "content": "hi"}],
                "tools": tools, "tool_choice": tc, "parallel_tool_calls": parallel}))
            .unwrap();
            v.get("tool_choice").cloned()
        };
        assert_eq!(
            choice(json!("auto"), Value::Null),
            Some(json!({"type": "auto"}))
        );
        assert_eq!(
            choice(json!("none"), json!(false)),
            Some(json!({"type": "none"}))
        );
        assert_eq!(choice(Value::Null, Value::Null), None);
        assert_eq!(
            choice(Value::Null, json!(false)),
            Some(json!({"type": "auto", "disable_parallel_tool_use": true}))
        );
        assert_eq!(
            choice(json!("required"), json!(false)),
            Some(json!({"type": "any", "disable_parallel_tool_use": true}))
        );
        let v = translate(json!({"messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}))
        .unwrap();
        assert_eq!(
            v["tools"],
            json!([{"name": "f", "input_schema": {"type": "object", "properties": {}}}])
        );
    }

    #[test]
    fn unexpressible_fields_are_refused_by_name() {
        let user = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            ("n", json!(2), "n"),
            ("logprobs", json!(true), "logprobs"),
            ("top_logprobs", json!(3), "top_logprobs"),
            (
                "response_format",
                json!({"type": "json_object"}),
                "response_format",
            ),
            ("audio", json!({"voice": "alloy", "format": "wav"}), "audio"),
            ("modalities", json!(["text", "audio"]), "modalities"),
            ("logit_bias", json!({"50256": -100}), "logit_bias"),
            ("presence_penalty", json!(0.5), "presence_penalty"),
            ("temperature", json!(1.5), "temperature"),
            ("max_tokens", json!(-1), "max_tokens"),
            ("stop", json!(7), "stop"),
            ("functions", json!([{"name": "f"}]), "functions"),
            ("reasoning_effort", json!("high"), "reasoning_effort"),
            (
                "tools",
                json!([{"type": "custom", "custom": {"name": "x"}}]),
                "tools[0].type",
            ),
        ];
        for (field, value, named) in cases {
            let mut chat = json!({"model": "m", "messages": user});
            chat[field] = value;
            let r = translate(chat).expect_err(field);
            assert_eq!(r.field, named, "{field}: {r:?}");
            assert!(!r.message.is_empty());
        }
        let msgs = [
            (
                json!({"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                       "function": {"name": "f", "arguments": "{not json"}}]}),
                "messages[1].tool_calls[0].function.arguments",
            ),
            (
                json!({"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                       "function": {"name": "f", "arguments": "[1]"}}]}),
                "messages[1].tool_calls[0].function.arguments",
            ),
            (
                json!({"role": "user", "content": [{"type": "input_audio",
                       "input_audio": {"data": "AAAA", "format": "wav"}}]}),
                "messages[1].content[0].type",
            ),
            (
                json!({"role": "user", "content": [{"type": "image_url",
                       "image_url": {"url": "data:image/png,rawbytes"}}]}),
                "messages[1].content[0].image_url.url",
            ),
            (
                json!({"role": "tool", "content": "x"}),
                "messages[1].tool_call_id",
            ),
            (
                json!({"role": "function", "name": "f", "content": "x"}),
                "messages[1].role",
            ),
        ];
        for (m, named) in msgs {
            let r = translate(json!({"messages": [{"role": "user", "content": "hi"}, m]}))
                .expect_err(named);
            assert_eq!(r.field, named);
        }
        assert_eq!(
            translate(json!({"model": "m"})).unwrap_err().field,
            "messages"
        );
    }

    #[test]
    fn responses_match_their_golden_files() {
        for case in ["text", "tool_use", "max_tokens"] {
            let body = fixture(&format!("resp_{case}.json"));
            let out = response_at(&body, "claude-latest", 1_700_000_000)
                .unwrap_or_else(|| panic!("{case}"));
            golden(&format!("resp_{case}.golden.json"), &pretty(&out));
        }
    }

    #[test]
    fn response_mapping() {
        let out = response_at(&fixture("resp_text.json"), "claude-latest", 1).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello, world!");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["model"], "claude-latest");
        assert_eq!(v["id"], "msg_01XFDUDYJgAACzvnptvVoYEL");
        assert_eq!(v["usage"]["prompt_tokens"], 12 + 100 + 2048);
        assert_eq!(v["usage"]["completion_tokens"], 6);
        assert_eq!(v["usage"]["total_tokens"], 12 + 100 + 2048 + 6);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2048);
        let out = response_at(&fixture("resp_tool_use.json"), "c", 1).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let calls = &v["choices"][0]["message"]["tool_calls"];
        assert_eq!(calls[0]["id"], "toolu_01A09q90qw90lq917835lq9");
        assert_eq!(
            calls[0]["function"]["arguments"],
            r#"{"city":"Paris","unit":"celsius"}"#
        );
        assert_eq!(calls[1]["function"]["name"], "get_weather");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        let out = response_at(&fixture("resp_max_tokens.json"), "c", 1).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(response(b"{\"type\":\"error\"}", "c"), None);
        assert_eq!(response(b"not json", "c"), None);
        assert_eq!(response(b"{\"type\":\"message\",\"content\":7}", "c"), None);
    }

    #[test]
    fn errors_take_the_openai_shape() {
        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#;
        let v: Value = serde_json::from_slice(&error(429, body)).unwrap();
        assert_eq!(
            v,
            json!({"error": {"message": "Number of request tokens has exceeded your per-minute rate limit",
                "type": "rate_limit_error", "param": null, "code": null}})
        );
        let kinds = [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "invalid_request_error"),
            (413, "invalid_request_error"),
            (500, "server_error"),
            (529, "server_error"),
        ];
        for (status, kind) in kinds {
            let v: Value =
                serde_json::from_slice(&error(status, b"<html>bad gateway</html>")).unwrap();
            assert_eq!(v["error"]["type"], kind, "{status}");
            assert_eq!(
                v["error"]["message"],
                format!("the upstream answered HTTP {status}")
            );
        }
    }

    const STREAMS: [(&str, bool); 4] = [
        ("text", true),
        ("tools", false),
        ("error", true),
        ("crlf_unterminated", true),
    ];

    fn translate_stream(input: &[u8], include_usage: bool, cuts: &[usize]) -> Vec<u8> {
        let mut s = Stream::new("gpt-4o-mini", include_usage);
        s.created = 1_700_000_000;
        let mut out = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            out.extend_from_slice(&s.feed(&input[at..cut]));
            at = cut;
        }
        out.extend_from_slice(&s.finish());
        out
    }

    #[test]
    fn streams_match_their_golden_files() {
        for (case, usage) in STREAMS {
            let input = fixture(&format!("stream_{case}.sse"));
            golden(
                &format!("stream_{case}.golden.sse"),
                &translate_stream(&input, usage, &[]),
            );
        }
    }

    #[test]
    fn a_stream_split_anywhere_translates_the_same() {
        for (case, usage) in STREAMS {
            let input = fixture(&format!("stream_{case}.sse"));
            let whole = translate_stream(&input, usage, &[]);
            for cut in 0..=input.len() {
                assert_eq!(
                    translate_stream(&input, usage, &[cut]),
                    whole,
                    "{case} cut at {cut}"
                );
            }
            let bytes: Vec<usize> = (1..input.len()).collect();
            assert_eq!(
                translate_stream(&input, usage, &bytes),
                whole,
                "{case} byte by byte"
            );
            // Two cuts, on a stride (all pairs would be quadratic in CI).
            for a in (0..input.len()).step_by(31) {
                for b in (a..input.len()).step_by(37) {
                    assert_eq!(
                        translate_stream(&input, usage, &[a, b]),
                        whole,
                        "{case} {a},{b}"
                    );
                }
            }
        }
    }

    /// The chunks of a translated stream, parsed (`[DONE]` as a string).
    fn events(out: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(out).unwrap();
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let d = e.strip_prefix("data: ").unwrap();
                serde_json::from_str(d).unwrap_or_else(|_| Value::from(d))
            })
            .collect()
    }

    #[test]
    fn stream_event_sequence() {
        let out = translate_stream(&fixture("stream_tools.sse"), false, &[]);
        let ev = events(&out);
        assert_eq!(
            ev[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(ev[0]["id"], "msg_014p7gG3wDgGV9EUtLvnow3U");
        assert_eq!(ev[0]["object"], "chat.completion.chunk");
        assert_eq!(ev[1]["choices"][0]["delta"]["content"], "Checking both.");
        let call0 = &ev[2]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(call0["index"], 0);
        assert_eq!(call0["id"], "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
        assert_eq!(call0["function"]["name"], "get_weather");
        let args: String = ev
            .iter()
            .filter_map(|e| e.pointer("/choices/0/delta/tool_calls/0"))
            .filter(|c| c["index"] == 0)
            .filter_map(|c| c.pointer("/function/arguments").and_then(Value::as_str))
            .collect();
        assert_eq!(args, r#"{"city": "Paris"}"#);
        let call1 = ev.iter().find_map(|e| {
            e.pointer("/choices/0/delta/tool_calls/0")
                .filter(|c| c["index"] == 1 && c.get("id").is_some())
        });
        assert_eq!(call1.unwrap()["id"], "toolu_02");
        let n = ev.len();
        assert_eq!(ev[n - 2]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(ev[n - 1], "[DONE]");
        assert!(ev.iter().all(|e| e.get("usage").is_none()));

        let out = translate_stream(&fixture("stream_text.sse"), true, &[]);
        let ev = events(&out);
        let n = ev.len();
        assert_eq!(ev[n - 3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(ev[n - 2]["choices"], json!([]));
        assert_eq!(
            ev[n - 2]["usage"],
            json!({"prompt_tokens": 1825, "completion_tokens": 15, "total_tokens": 1840,
                   "prompt_tokens_details": {"cached_tokens": 1800}})
        );
        assert_eq!(ev[n - 1], "[DONE]");

        let out = translate_stream(&fixture("stream_error.sse"), true, &[]);
        let ev = events(&out);
        let last = ev.last().unwrap();
        assert_eq!(last["error"]["type"], "server_error");
        assert_eq!(last["error"]["message"], "Overloaded");
        assert!(!ev.iter().any(|e| e == "[DONE]"));
    }

    #[test]
    fn a_tool_input_given_whole_at_block_start_is_its_arguments() {
        let sse = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_w\",\"usage\":{\"input_tokens\":1}}}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":",
            "{\"type\":\"tool_use\",\"id\":\"toolu_w\",\"name\":\"f\",\"input\":{\"b\":2,\"a\":1}}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":4}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        let ev = events(&translate_stream(sse.as_bytes(), false, &[]));
        assert_eq!(
            ev[1]["choices"][0]["delta"]["tool_calls"][0]["id"],
            "toolu_w"
        );
        let args = &ev[2]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"];
        assert_eq!(args, r#"{"a":1,"b":2}"#);
        assert_eq!(ev[3]["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn a_heartbeat_run_translates() {
        // The control plane's heartbeat request (heartbeat/dispatch.rs).
        let v = translate(
            json!({"model": "agent-model", "stream": false, "messages": [
                {"role": "system", "content": "You are the agent's heartbeat."},
                {"role": "user", "content": "- [ ] inbox\n- [ ] calendar"},
            ]}),
        )
        .unwrap();
        assert_eq!(v["system"], "You are the agent's heartbeat.");
        assert_eq!(
            v["messages"][0]["content"][0]["text"],
            "- [ ] inbox\n- [ ] calendar"
        );
        assert_eq!(v.get("stream"), None);
        let only_system = translate(json!({"messages": [{"role": "system", "content": "x"}]}));
        assert_eq!(only_system.unwrap_err().field, "messages");
    }

    #[test]
    fn default_valued_fields_are_not_refused() {
        let v = translate(json!({"messages": [{"role": "user", "content": "hi"}],
            "n": 1, "logprobs": false, "top_logprobs": null, "modalities": ["text"],
            "logit_bias": {}, "presence_penalty": 0.0, "frequency_penalty": 0,
            "response_format": {"type": "text"}, "seed": 42, "store": false,
            "stream_options": {"include_usage": true}, "audio": null}));
        assert!(v.is_ok(), "{v:?}");
    }

    #[test]
    fn an_empty_upstream_stream_still_ends_the_client_stream() {
        let out = translate_stream(b"", false, &[]);
        let ev = events(&out);
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(ev[2], "[DONE]");
    }
}

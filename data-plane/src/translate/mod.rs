//! Translation between OpenAI Chat Completions and Anthropic Messages, for
//! a request whose chosen backend speaks the other protocol (DESIGN
//! "Protocols"): the request, the JSON answer, the SSE stream and errors.
//!
//! - [`to_messages`]: a chat client served by an `anthropic` backend.
//! - [`to_chat`]: a Messages client served by an `openai` backend.
//!
//! Translation is pure (bytes in, bytes out) and deterministic: the same
//! input gives the same bytes, so provider prefix caches still hit. What has
//! no counterpart is refused by name ([`Refused`]) or removed on purpose and
//! counted (`cache_control` towards OpenAI), never dropped silently.

pub(crate) mod to_chat;
pub(crate) mod to_messages;

use bytes::Bytes;

/// A request field the other protocol cannot express: the client gets a
/// 400 in its own shape naming `field` (unless a native candidate can serve
/// it instead, see `crate::retry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    /// The client's field, as a JSON path (`n`, `thinking`, `messages[2].content[0].type`).
    pub field: String,
    /// Why, for the client.
    pub message: String,
}

/// What translating a request produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TranslatedRequest {
    /// The body for the backend (its native model already set).
    pub body: Vec<u8>,
    /// `cache_control` markers removed on the way (an OpenAI backend caches
    /// prefixes by itself); counted in a metric.
    pub dropped_cache_control: u32,
}

/// Options of a request translation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestOptions<'a> {
    /// The backend's model id.
    pub native_model: &'a str,
    /// `max_tokens` to send to an Anthropic backend when the client set
    /// none (Anthropic requires it): the mapping's `max_tokens`, else 4096.
    pub default_max_tokens: u32,
}

/// Translates an SSE stream chunk by chunk. The upstream's events may be
/// split across chunks anywhere; the output is the same however they are
/// split.
pub(crate) trait StreamTranslator: Send + 'static {
    /// The client's bytes for the next chunk of the upstream's bytes
    /// (possibly empty while an event is incomplete).
    fn feed(&mut self, chunk: &[u8]) -> Bytes;
    /// The upstream stream ended cleanly: the client's remaining bytes.
    fn finish(&mut self) -> Bytes;
}

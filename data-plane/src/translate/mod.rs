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

/// The longest SSE line a stream translator holds while waiting for its end:
/// far above any real event line (chunks and deltas are small), so only an
/// upstream that never sends a newline reaches it.
pub(crate) const MAX_LINE: usize = 8 * 1024 * 1024;

/// Keeps `rest`, the start of a line not ended yet, after what `line`
/// holds; a line past [`MAX_LINE`] is thrown away (logged) rather than
/// held without bound.
pub(crate) fn hold_partial(line: &mut Vec<u8>, rest: &[u8]) {
    if line.len() + rest.len() > MAX_LINE {
        tracing::warn!(
            bytes = line.len() + rest.len(),
            "upstream SSE line longer than {MAX_LINE} bytes without a newline; dropped"
        );
        line.clear();
        return;
    }
    line.extend_from_slice(rest);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_without_end_is_held_only_up_to_the_cap() {
        let mut line = Vec::new();
        hold_partial(&mut line, b"data: {");
        assert_eq!(line, b"data: {");
        let big = vec![b'x'; MAX_LINE];
        hold_partial(&mut line, &big);
        assert!(line.is_empty(), "past the cap the line is dropped");
        // Both translators hold through it: feeding more than the cap
        // without a newline keeps their memory bounded and they go on.
        let mut s = to_chat::Stream::new("m");
        for _ in 0..3 {
            assert!(s.feed(&big).is_empty());
        }
        assert!(s.line.len() <= MAX_LINE);
        let mut s = to_messages::Stream::new("m", false);
        for _ in 0..3 {
            assert!(s.feed(&big).is_empty());
        }
        assert!(s.line.len() <= MAX_LINE);
    }
}

//! A Messages client served by an OpenAI Chat Completions backend:
//! [`request`] (Messages → chat, a stream asking for usage), [`response`]
//! (chat completion JSON → Messages), [`Stream`] (`chat.completion.chunk`s
//! → the Messages event sequence) and [`error`] (an OpenAI error → the
//! Anthropic error shape).

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{Refused, RequestOptions, StreamTranslator, TranslatedRequest};

/// The chat completion request for a Messages request `msg` (already
/// parsed; its `model` is replaced by `opts.native_model`). A streaming
/// request asks for `stream_options.include_usage`.
pub(crate) fn request(
    msg: &Map<String, Value>,
    opts: &RequestOptions<'_>,
) -> Result<TranslatedRequest, Refused> {
    let _ = (msg, opts);
    Err(Refused {
        field: "model".into(),
        message: "translation to Chat Completions is not implemented yet".into(),
    })
}

/// The Messages answer for a chat completion `body`; `model` is the name
/// the client asked for. `None` when `body` is not a chat completion.
pub(crate) fn response(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let _ = (body, model);
    None
}

/// The Anthropic-shaped error body for an OpenAI error answer (`status`,
/// `body`); a body that is not an OpenAI error gets a generic message.
pub(crate) fn error(status: u16, body: &[u8]) -> Vec<u8> {
    let _ = (status, body);
    Vec::new()
}

/// `chat.completion.chunk` SSE → the Messages event sequence
/// (`message_start` … `message_stop`, usage in `message_delta`).
pub(crate) struct Stream {
    /// The model name the client asked for.
    model: String,
}

impl Stream {
    /// A translator for a client that asked for `model`.
    pub(crate) fn new(model: &str) -> Stream {
        Stream {
            model: model.to_string(),
        }
    }
}

impl StreamTranslator for Stream {
    fn feed(&mut self, chunk: &[u8]) -> Bytes {
        let _ = (chunk, &self.model);
        Bytes::new()
    }

    fn finish(&mut self) -> Bytes {
        Bytes::new()
    }
}

//! A Chat Completions client served by an Anthropic Messages backend:
//! [`request`] (chat → Messages), [`response`] (Messages JSON → chat
//! completion), [`Stream`] (Messages SSE → `chat.completion.chunk`s) and
//! [`error`] (an Anthropic error → the OpenAI error shape).

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{Refused, RequestOptions, StreamTranslator, TranslatedRequest};

/// The Messages request for a chat completion request `chat` (already
/// parsed; its `model` is replaced by `opts.native_model`).
pub(crate) fn request(
    chat: &Map<String, Value>,
    opts: &RequestOptions<'_>,
) -> Result<TranslatedRequest, Refused> {
    let _ = (chat, opts);
    Err(Refused {
        field: "model".into(),
        message: "translation to Anthropic Messages is not implemented yet".into(),
    })
}

/// The chat completion for a Messages answer `body`; `model` is the name the
/// client asked for. `None` when `body` is not a Messages answer.
pub(crate) fn response(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let _ = (body, model);
    None
}

/// The OpenAI-shaped error body for an Anthropic error answer (`status`,
/// `body`); a body that is not an Anthropic error gets a generic message.
pub(crate) fn error(status: u16, body: &[u8]) -> Vec<u8> {
    let _ = (status, body);
    Vec::new()
}

/// Messages SSE → `chat.completion.chunk` SSE (ending with `data: [DONE]`).
pub(crate) struct Stream {
    /// The model name the client asked for.
    model: String,
    /// Whether the client asked for `stream_options.include_usage`.
    include_usage: bool,
}

impl Stream {
    /// A translator for a client that asked for `model`.
    pub(crate) fn new(model: &str, include_usage: bool) -> Stream {
        Stream {
            model: model.to_string(),
            include_usage,
        }
    }
}

impl StreamTranslator for Stream {
    fn feed(&mut self, chunk: &[u8]) -> Bytes {
        let _ = (chunk, &self.model, self.include_usage);
        Bytes::new()
    }

    fn finish(&mut self) -> Bytes {
        Bytes::new()
    }
}

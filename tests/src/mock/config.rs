//! Configuration of a mock upstream: one struct shared by the library and the
//! `claw-mock-upstream` binary's flags.

use std::net::SocketAddr;
use std::time::Duration;

/// How a [`MockUpstream`](super::MockUpstream) behaves when no script action
/// says otherwise.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Where to listen; port 0 picks an ephemeral port.
    pub addr: SocketAddr,
    /// Delay before the response head (and so before the first byte).
    pub latency: Duration,
    /// Pause between two SSE chunks of a streamed response.
    pub chunk_delay: Duration,
    /// Completion tokens per answer (a smaller `max_tokens` wins).
    pub completion_tokens: u32,
    /// When set, `/v1/*` requests must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Default reply text, split on whitespace into tokens; `None` produces
    /// `tok0 tok1 …`.
    pub reply: Option<String>,
    /// Keep a per-request record (`false` for benchmarks: totals still count).
    pub record: bool,
    /// Sent back in the `x-mock-name` header of every response.
    pub name: Option<String>,
    /// Model ids listed by `GET /v1/models`.
    pub models: Vec<String>,
    /// Length of the vectors returned by `/v1/embeddings` when the request
    /// does not ask for `dimensions`.
    pub embedding_dimensions: usize,
    /// Worker threads of the mock's own runtime (in-process use only).
    pub worker_threads: usize,
    /// The smallest prefix (tokens) the simulated prompt cache stores (real
    /// providers: 1024; small here so that tests stay small).
    pub cache_min_tokens: u64,
    /// Send the headers real providers add about the account behind the
    /// key on every `/v1` answer: a CDN session `set-cookie` (two, as
    /// Cloudflare sends them), OpenAI's `openai-organization` and
    /// `openai-project`, Anthropic's `anthropic-organization-id`, beside
    /// rate-limit headers of both (`x-ratelimit-remaining-requests`,
    /// `anthropic-ratelimit-requests-remaining`).
    pub account_headers: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            latency: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            completion_tokens: 16,
            api_key: None,
            reply: None,
            record: true,
            name: None,
            models: vec!["mock-model".to_owned()],
            embedding_dimensions: 8,
            worker_threads: 2,
            cache_min_tokens: 4,
            account_headers: false,
        }
    }
}

impl MockConfig {
    /// Requires `Authorization: Bearer <key>` on every `/v1/*` request.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Names this upstream (the `x-mock-name` response header).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the default reply text.
    pub fn reply(mut self, text: impl Into<String>) -> Self {
        self.reply = Some(text.into());
        self
    }

    /// Sets the number of completion tokens per answer.
    pub fn completion_tokens(mut self, n: u32) -> Self {
        self.completion_tokens = n;
        self
    }

    /// Sets the delay before the first byte.
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }

    /// Sets the pause between SSE chunks.
    pub fn chunk_delay(mut self, d: Duration) -> Self {
        self.chunk_delay = d;
        self
    }

    /// Sets the smallest cacheable prefix, in tokens.
    pub fn cache_min_tokens(mut self, n: u64) -> Self {
        self.cache_min_tokens = n;
        self
    }

    /// Sends the account headers (see [`MockConfig::account_headers`]).
    pub fn account_headers(mut self) -> Self {
        self.account_headers = true;
        self
    }

    /// Disables the per-request record.
    pub fn no_record(mut self) -> Self {
        self.record = false;
        self
    }

    /// Sets the models listed by `GET /v1/models`.
    pub fn models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.models = models.into_iter().map(Into::into).collect();
        self
    }
}

//! Token usage of upstream answers, streamed or not, whether or not the
//! client asked for it, in every protocol the proxy speaks ([`Dialect`]).
//!
//! One normalised record, [`Usage`], whatever the provider said: its
//! `prompt_tokens` are ALL input tokens, cache reads and writes included.
//! OpenAI's `prompt_tokens`/`input_tokens` already include cached tokens;
//! Anthropic's `input_tokens` does not, so a Messages answer's prompt is
//! `input + cache_read + cache_creation`. Getting this wrong double-counts
//! (or drops) the cache, which dominates agent bills; [`Usage::cost`] then
//! prices the uncached, read, 5-minute-written and 1-hour-written parts apart.
//!
//! - Non-streaming answers: [`Usage::from_answer`] reads the JSON body's
//!   top-level `usage` (chat, Messages or Responses shape).
//! - Chat and text completion streams: the route layer calls
//!   [`request_stream_usage`], which sets `stream_options.include_usage =
//!   true` on the upstream request when the client did not. [`SseUsage`]
//!   then follows the SSE stream event by event (events split across network
//!   chunks included), keeps the usage of the final usage chunk and counts
//!   content events as a fallback. When the client did not ask for usage it
//!   also removes what asking added — the usage-only event and the
//!   `"usage":null` member of every other event — so the client receives
//!   exactly the bytes of a call without `include_usage`.
//! - Messages streams: `message_start` carries `message.usage`, the
//!   cumulative `message_delta` its `usage`; the last value of each field
//!   wins. Responses streams: the `response.completed` (or `.incomplete`,
//!   `.failed`) event's `response.usage`, and the response id (for
//!   [`crate::responses`]). Both are only read, never changed: their usage
//!   is part of the protocol the client asked for.
//!
//! Scanning is incremental and allocation-free on the common path: an event
//! that arrives whole in one chunk is inspected in place; only an event split
//! across chunks is copied (into a small carry buffer), only an event that
//! carries usage is parsed, and only an event that must change is rewritten.

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::json::{self, Member};

/// Token usage reported by the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// Total tokens.
    pub total_tokens: u64,
    /// Prompt tokens read from the provider's prompt cache
    /// (`prompt_tokens_details.cached_tokens`, Anthropic's
    /// `cache_read_input_tokens`). Part of `prompt_tokens`.
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the 5-minute cache. Part of `prompt_tokens`.
    pub cache_write_5m_tokens: u64,
    /// Prompt tokens written to the 1-hour cache. Part of `prompt_tokens`.
    pub cache_write_1h_tokens: u64,
}

/// USD prices of one model mapping.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prices {
    /// Per uncached prompt token.
    pub input: f64,
    /// Per completion token.
    pub output: f64,
    /// Per prompt token read from the cache; 0 means "not set": cache reads
    /// then cost as much as other prompt tokens.
    pub cache_read: f64,
    /// Per prompt token written to the 5-minute cache; 0 means `input`.
    pub cache_write: f64,
    /// Per prompt token written to the 1-hour cache; 0 means `cache_write`
    /// (and so `input` when that is unset too).
    pub cache_write_1h: f64,
}

/// The shape of an answer: which `usage` block its JSON carries and which
/// events its stream sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI chat and text completions, embeddings.
    Chat,
    /// Anthropic Messages.
    Messages,
    /// OpenAI Responses.
    Responses,
}

/// The most tokens of any one kind an answer is believed to have used.
/// No model's context window comes near (the largest are a few million),
/// so a count above it is an upstream lying or broken: it is clamped here
/// rather than charged to the tpm limiter and the stats totals, where
/// `u64::MAX` would wedge the limiter and saturate every total.
pub(crate) const MAX_USAGE_TOKENS: u64 = 10_000_000;

impl Usage {
    /// The usage with every count at most `max`, and whether any was above
    /// it. The total is kept at least the clamped prompt + completion (and
    /// at most `max`), cache counts at most the clamped prompt.
    pub fn clamped(self, max: u64) -> (Usage, bool) {
        let over = [
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.cache_read_tokens,
            self.cache_write_5m_tokens,
            self.cache_write_1h_tokens,
        ]
        .iter()
        .any(|n| *n > max);
        if !over {
            return (self, false);
        }
        let prompt = self.prompt_tokens.min(max);
        let completion = self.completion_tokens.min(max);
        let u = Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: self
                .total_tokens
                .min(max)
                .max(prompt.saturating_add(completion).min(max)),
            cache_read_tokens: self.cache_read_tokens.min(prompt),
            cache_write_5m_tokens: self.cache_write_5m_tokens.min(prompt),
            cache_write_1h_tokens: self.cache_write_1h_tokens.min(prompt),
        };
        (u, true)
    }

    /// Prompt tokens written to the cache, 5-minute and 1-hour.
    pub fn cache_write_tokens(&self) -> u64 {
        self.cache_write_5m_tokens
            .saturating_add(self.cache_write_1h_tokens)
    }

    /// Reads an OpenAI `usage` object from a parsed answer.
    pub fn from_json(v: &Value) -> Option<Usage> {
        let u = v.get("usage")?;
        UsageJson::deserialize(u).ok().map(Usage::from)
    }

    /// Reads the OpenAI chat `usage` member of a whole JSON answer
    /// ([`Usage::from_answer`] for [`Dialect::Chat`]).
    pub fn from_body(body: &[u8]) -> Option<Usage> {
        Self::from_answer(Dialect::Chat, body)
    }

    /// Reads the `usage` member of a whole JSON answer in `dialect` without
    /// building a DOM of the rest.
    ///
    /// A byte scan ([`json::top_level_member`]) finds the top-level `usage` value
    /// and only that value is deserialized: the answer's other members
    /// (the completion text, mostly) are stepped over, not parsed. Whatever
    /// the scan does not expect — escapes in a key, a repeated `usage`,
    /// unbalanced brackets, trailing bytes — goes to serde for the whole
    /// body, which decides.
    pub fn from_answer(dialect: Dialect, body: &[u8]) -> Option<Usage> {
        match dialect {
            Dialect::Chat => member::<UsageJson>(body).map(Usage::from),
            Dialect::Messages => member::<AnthropicUsage>(body).map(|u| u.normalised()),
            Dialect::Responses => member::<ResponsesUsage>(body).map(Usage::from),
        }
    }

    /// [`Usage::from_body`] by serde alone.
    #[cfg(test)]
    fn from_body_parsed(body: &[u8]) -> Option<Usage> {
        serde_json::from_slice::<Answer<UsageJson>>(body)
            .ok()?
            .usage
            .map(Usage::from)
    }

    /// USD cost at `prices`: uncached input × `input` + cache reads ×
    /// `cache_read` + 5-minute writes × `cache_write` + 1-hour writes ×
    /// `cache_write_1h` + output × `output`, each unset (0) cache price
    /// falling back as [`Prices`] says. The cache parts are taken out of
    /// `prompt_tokens` (never more than it holds), so no token is priced twice.
    pub fn cost(&self, prices: &Prices) -> f64 {
        let or = |p: f64, fallback: f64| if p > 0.0 { p } else { fallback };
        let read_price = or(prices.cache_read, prices.input);
        let write_price = or(prices.cache_write, prices.input);
        let write_1h_price = or(prices.cache_write_1h, write_price);
        let mut left = self.prompt_tokens;
        let mut take = |n: u64| {
            let n = n.min(left);
            left -= n;
            n
        };
        let read = take(self.cache_read_tokens);
        let w5 = take(self.cache_write_5m_tokens);
        let w1 = take(self.cache_write_1h_tokens);
        left as f64 * prices.input
            + read as f64 * read_price
            + w5 as f64 * write_price
            + w1 as f64 * write_1h_price
            + self.completion_tokens as f64 * prices.output
    }
}

/// The top-level `id` of a whole JSON answer (a stored response's id), by
/// the same scan as [`Usage::from_answer`].
pub(crate) fn answer_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct WithId {
        id: Option<String>,
    }
    match json::top_level_member(body, b"id") {
        Member::Found(value) => serde_json::from_slice::<Option<String>>(&body[value]).ok()?,
        Member::Absent => None,
        Member::Unsure => serde_json::from_slice::<WithId>(body).ok()?.id,
    }
}

/// An answer's `usage`, for the serde fallback.
#[derive(Deserialize)]
struct Answer<T> {
    usage: Option<T>,
}

/// The top-level `usage` member of `body` as `T` (see [`Usage::from_answer`]).
fn member<T: DeserializeOwned>(body: &[u8]) -> Option<T> {
    match json::top_level_member(body, b"usage") {
        Member::Found(value) => serde_json::from_slice::<Option<T>>(&body[value]).ok()?,
        Member::Absent => None,
        Member::Unsure => serde_json::from_slice::<Answer<T>>(body).ok()?.usage,
    }
}

/// OpenAI chat `usage`: `prompt_tokens` includes the cached ones.
#[derive(Deserialize, Default)]
#[serde(default)]
struct UsageJson {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PromptDetails {
    cached_tokens: u64,
}

impl From<UsageJson> for Usage {
    fn from(u: UsageJson) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u
                .total_tokens
                .unwrap_or(u.prompt_tokens.saturating_add(u.completion_tokens)),
            cache_read_tokens: u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            ..Usage::default()
        }
    }
}

/// OpenAI Responses `usage`: `input_tokens` includes the cached ones
/// (`input_tokens_details.cached_tokens`); reasoning tokens are part of
/// `output_tokens`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponsesUsage {
    input_tokens: u64,
    input_tokens_details: Option<PromptDetails>,
    output_tokens: u64,
    total_tokens: Option<u64>,
}

impl From<ResponsesUsage> for Usage {
    fn from(u: ResponsesUsage) -> Self {
        Usage {
            prompt_tokens: u.input_tokens,
            completion_tokens: u.output_tokens,
            total_tokens: u
                .total_tokens
                .unwrap_or(u.input_tokens.saturating_add(u.output_tokens)),
            cache_read_tokens: u.input_tokens_details.map_or(0, |d| d.cached_tokens),
            ..Usage::default()
        }
    }
}

/// A count that may be absent or `null` (Anthropic sends both), or of an
/// unexpected type (then absent rather than failing the whole block).
fn lenient_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<Value>::deserialize(d)?.and_then(|v| v.as_u64()))
}

/// Anthropic Messages `usage` (JSON answer, `message_start`'s
/// `message.usage`, `message_delta`'s cumulative `usage`). Its
/// `input_tokens` EXCLUDES cache reads and writes. Every field is optional
/// so that stream events merge field by field ([`AnthropicUsage::merge`]).
#[derive(Deserialize, Default, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(default)]
pub(crate) struct AnthropicUsage {
    #[serde(deserialize_with = "lenient_count")]
    input_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_count")]
    output_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_count")]
    cache_creation_input_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_count")]
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
}

/// The 5-minute / 1-hour split of Anthropic's cache writes.
#[derive(Deserialize, Default, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(default)]
struct CacheCreation {
    #[serde(deserialize_with = "lenient_count")]
    ephemeral_5m_input_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_count")]
    ephemeral_1h_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Takes every field `later` carries (the last value wins per field).
    fn merge(&mut self, later: AnthropicUsage) {
        fn set(a: &mut Option<u64>, b: Option<u64>) {
            if b.is_some() {
                *a = b;
            }
        }
        set(&mut self.input_tokens, later.input_tokens);
        set(&mut self.output_tokens, later.output_tokens);
        set(
            &mut self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
        set(
            &mut self.cache_read_input_tokens,
            later.cache_read_input_tokens,
        );
        if let Some(l) = later.cache_creation {
            let c = self
                .cache_creation
                .get_or_insert_with(CacheCreation::default);
            set(
                &mut c.ephemeral_5m_input_tokens,
                l.ephemeral_5m_input_tokens,
            );
            set(
                &mut c.ephemeral_1h_input_tokens,
                l.ephemeral_1h_input_tokens,
            );
        }
    }

    /// The normalised record: prompt = input + cache reads + cache writes.
    /// Writes are `cache_creation_input_tokens` (else the split's sum); the
    /// 1-hour part comes from `cache_creation` and the rest is 5-minute
    /// (all of it when there is no split).
    fn normalised(self) -> Usage {
        let input = self.input_tokens.unwrap_or(0);
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let split = self.cache_creation.unwrap_or_default();
        let h1 = split.ephemeral_1h_input_tokens.unwrap_or(0);
        let writes = self.cache_creation_input_tokens.unwrap_or_else(|| {
            split
                .ephemeral_5m_input_tokens
                .unwrap_or(0)
                .saturating_add(h1)
        });
        let h1 = h1.min(writes);
        let prompt = input.saturating_add(read).saturating_add(writes);
        let output = self.output_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: output,
            total_tokens: prompt.saturating_add(output),
            cache_read_tokens: read,
            cache_write_5m_tokens: writes - h1,
            cache_write_1h_tokens: h1,
        }
    }
}

/// What [`request_stream_usage`] did to a streaming request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamUsage {
    /// The client asked for usage itself: pass the stream through untouched.
    ClientAsked,
    /// The proxy asked for it: strip the usage from what the client receives.
    Injected,
    /// `stream_options` is not an object: leave the request alone (the
    /// upstream will answer 400) and the stream untouched.
    Untouched,
}

impl StreamUsage {
    /// True when the client must not see the usage the proxy asked for.
    pub(crate) fn strip(self) -> bool {
        self == StreamUsage::Injected
    }
}

/// Makes a streaming chat or text completion request ask for usage.
pub(crate) fn request_stream_usage(body: &mut Map<String, Value>) -> StreamUsage {
    match body.get_mut("stream_options") {
        None | Some(Value::Null) => {
            let mut opts = Map::new();
            opts.insert("include_usage".into(), Value::Bool(true));
            body.insert("stream_options".into(), Value::Object(opts));
            StreamUsage::Injected
        }
        Some(Value::Object(opts)) => {
            if opts.get("include_usage") == Some(&Value::Bool(true)) {
                StreamUsage::ClientAsked
            } else {
                opts.insert("include_usage".into(), Value::Bool(true));
                StreamUsage::Injected
            }
        }
        Some(_) => StreamUsage::Untouched,
    }
}

/// What a stream told about its usage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseTally {
    /// From the stream's usage chunk (chat), `message_start` and
    /// `message_delta` (Messages) or final response event (Responses), if
    /// one was seen.
    pub usage: Option<Usage>,
    /// Events that carried generated text (a fallback count of completion
    /// tokens: one content event is about one token).
    pub content_events: u64,
    /// Responses: the id of the response the stream produced.
    pub response_id: Option<Box<str>>,
    /// Responses: the highest `sequence_number` seen (the next event, the
    /// proxy's own `error` included, takes the one after).
    pub sequence_number: Option<u64>,
}

/// An event larger than this stops the scanning: the stream is passed
/// through untouched from there on and the content count is the fallback.
const MAX_EVENT: usize = 1024 * 1024;

/// Incremental SSE scanner: usage, content events, and (when `strip`) the
/// removal of the usage the proxy asked for. See the module docs.
#[derive(Debug)]
pub struct SseUsage {
    dialect: Dialect,
    strip: bool,
    /// Bytes of an event not complete yet. When stripping, these were not
    /// handed to the client yet; otherwise they were and are kept for parsing.
    carry: BytesMut,
    tally: SseTally,
    /// Messages: the usage fields seen so far, merged event by event.
    anthropic: Option<AnthropicUsage>,
    /// Messages: a `message_delta` usage (the final output count) was seen.
    anthropic_final: bool,
    gave_up: bool,
}

/// What to do with one event when stripping.
enum Edit {
    Keep,
    Drop,
    /// Remove this byte range of the event.
    Cut(usize, usize),
}

impl SseUsage {
    /// A chat stream scanner; `strip` removes the usage the client did not
    /// ask for.
    pub fn new(strip: bool) -> Self {
        SseUsage {
            dialect: Dialect::Chat,
            strip,
            carry: BytesMut::new(),
            tally: SseTally::default(),
            anthropic: None,
            anthropic_final: false,
            gave_up: false,
        }
    }

    /// A scanner that only reads a stream of `dialect` (never changes it).
    pub fn reading(dialect: Dialect) -> Self {
        SseUsage {
            dialect,
            ..SseUsage::new(false)
        }
    }

    /// The dialect scanned.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// What was seen so far. A Messages stream that broke off before its
    /// `message_delta` only has `message_start`'s placeholder output count
    /// (typically 1): the content events seen are counted instead when more.
    pub fn tally(&self) -> SseTally {
        let mut t = self.tally.clone();
        if self.dialect == Dialect::Messages
            && !self.anthropic_final
            && let Some(u) = t.usage.as_mut()
        {
            u.completion_tokens = u.completion_tokens.max(t.content_events);
            u.total_tokens = u.prompt_tokens.saturating_add(u.completion_tokens);
        }
        t
    }

    /// Scans a chunk and returns what the client receives of it (possibly
    /// empty while an event is incomplete).
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.gave_up {
            return chunk;
        }
        if !self.strip {
            self.observe(&chunk);
            return chunk;
        }
        let buf = if self.carry.is_empty() {
            chunk
        } else {
            self.carry.extend_from_slice(&chunk);
            self.carry.split().freeze()
        };
        // `out` is only built once an event must change; until then the
        // answer is a zero-copy prefix of `buf`.
        let mut out: Option<BytesMut> = None;
        let mut start = 0;
        while let Some(end) = event_end(&buf, start) {
            let ev = &buf[start..end];
            match self.event(ev) {
                Edit::Keep => {
                    if let Some(o) = out.as_mut() {
                        o.extend_from_slice(ev);
                    }
                }
                Edit::Drop => {
                    out.get_or_insert_with(|| BytesMut::from(&buf[..start]));
                }
                Edit::Cut(a, b) => {
                    let o = out.get_or_insert_with(|| BytesMut::from(&buf[..start]));
                    o.extend_from_slice(&ev[..a]);
                    o.extend_from_slice(&ev[b..]);
                }
            }
            start = end;
        }
        let rest = &buf[start..];
        let mut complete_end = start;
        if rest.len() > MAX_EVENT {
            self.gave_up = true;
            complete_end = buf.len();
            if let Some(o) = out.as_mut() {
                o.extend_from_slice(rest);
            }
        } else if !rest.is_empty() {
            self.carry.extend_from_slice(rest);
        }
        match out {
            Some(o) => o.freeze(),
            None => buf.slice(..complete_end),
        }
    }

    /// Scans a chunk that is not forwarded (already forwarded, or drained
    /// after the client left).
    pub fn observe(&mut self, chunk: &[u8]) {
        if self.gave_up {
            return;
        }
        if self.carry.is_empty() {
            let start = self.scan(chunk);
            self.keep_rest(&chunk[start..]);
        } else {
            self.carry.extend_from_slice(chunk);
            let joined = self.carry.split();
            let start = self.scan(&joined);
            self.keep_rest(&joined[start..]);
        }
    }

    /// The end of the stream: returns held-back bytes of an unterminated
    /// last event (they go to the client as they are, after being scanned).
    pub fn finish(&mut self) -> Bytes {
        if self.carry.is_empty() {
            return Bytes::new();
        }
        let rest = self.carry.split().freeze();
        let edit = self.event(&rest);
        if !self.strip {
            return Bytes::new();
        }
        match edit {
            Edit::Keep => rest,
            Edit::Drop => Bytes::new(),
            Edit::Cut(a, b) => {
                let mut o = BytesMut::with_capacity(rest.len());
                o.extend_from_slice(&rest[..a]);
                o.extend_from_slice(&rest[b..]);
                o.freeze()
            }
        }
    }

    fn scan(&mut self, buf: &[u8]) -> usize {
        let mut start = 0;
        while let Some(end) = event_end(buf, start) {
            let _ = self.event(&buf[start..end]);
            start = end;
        }
        start
    }

    fn keep_rest(&mut self, rest: &[u8]) {
        if rest.len() > MAX_EVENT {
            self.gave_up = true;
            self.carry = BytesMut::new();
        } else {
            self.carry.extend_from_slice(rest);
        }
    }

    /// Inspects one complete event (blank line included).
    fn event(&mut self, ev: &[u8]) -> Edit {
        let Some((data_start, data)) = data_field(ev) else {
            return Edit::Keep;
        };
        match self.dialect {
            Dialect::Chat => self.chat_event(data_start, data),
            Dialect::Messages => {
                self.messages_event(data);
                Edit::Keep
            }
            Dialect::Responses => {
                self.responses_event(data);
                Edit::Keep
            }
        }
    }

    /// A Messages event. Text, thinking and tool-input deltas are all
    /// `content_block_delta` events (the content fallback); only an event
    /// naming `"usage"` is parsed (`message_start`, `message_delta`). A
    /// quoted name cannot occur inside a JSON string (its quotes would be
    /// escaped), so generated text never fakes either.
    fn messages_event(&mut self, data: &[u8]) {
        if memmem::find(data, b"\"content_block_delta\"").is_some() {
            self.tally.content_events += 1;
            return;
        }
        if memmem::find(data, b"\"usage\"").is_none() {
            return;
        }
        #[derive(Deserialize)]
        struct Message {
            usage: Option<AnthropicUsage>,
        }
        #[derive(Deserialize)]
        struct Event {
            message: Option<Message>,
            usage: Option<AnthropicUsage>,
        }
        let Ok(e) = serde_json::from_slice::<Event>(data) else {
            return;
        };
        self.anthropic_final |= e.usage.is_some();
        for u in [e.message.and_then(|m| m.usage), e.usage]
            .into_iter()
            .flatten()
        {
            let acc = self.anthropic.get_or_insert_with(AnthropicUsage::default);
            acc.merge(u);
            self.tally.usage = Some(acc.normalised());
        }
    }

    /// A Responses event: text deltas are the content fallback; the
    /// lifecycle events (`response.created`, …, `response.completed`) carry
    /// the response's id and, at the end, its usage.
    fn responses_event(&mut self, data: &[u8]) {
        if let Some(n) = sequence_number(data) {
            self.tally.sequence_number = Some(self.tally.sequence_number.map_or(n, |s| s.max(n)));
        }
        const DELTAS: [&[u8]; 4] = [
            b"\"response.output_text.delta\"",
            b"\"response.refusal.delta\"",
            b"\"response.function_call_arguments.delta\"",
            b"\"response.reasoning_summary_text.delta\"",
        ];
        if DELTAS.iter().any(|d| memmem::find(data, d).is_some()) {
            self.tally.content_events += 1;
            return;
        }
        const LIFECYCLE: [&[u8]; 5] = [
            b"\"response.created\"",
            b"\"response.in_progress\"",
            b"\"response.completed\"",
            b"\"response.incomplete\"",
            b"\"response.failed\"",
        ];
        if !LIFECYCLE.iter().any(|d| memmem::find(data, d).is_some()) {
            return;
        }
        #[derive(Deserialize)]
        struct Response {
            id: Option<String>,
            usage: Option<ResponsesUsage>,
        }
        #[derive(Deserialize)]
        struct Event {
            response: Option<Response>,
        }
        let Ok(Event { response: Some(r) }) = serde_json::from_slice::<Event>(data) else {
            return;
        };
        if let Some(id) = r.id
            && self.tally.response_id.is_none()
        {
            self.tally.response_id = Some(id.into());
        }
        if let Some(u) = r.usage {
            self.tally.usage = Some(u.into());
        }
    }

    /// A chat or text completion event.
    fn chat_event(&mut self, data_start: usize, data: &[u8]) -> Edit {
        let m = Marks::of(data);
        if m.usage_object {
            #[derive(Deserialize)]
            struct Chunk {
                choices: Option<Vec<IgnoredAny>>,
                usage: Option<UsageJson>,
            }
            if let Ok(c) = serde_json::from_slice::<Chunk>(data)
                && let Some(u) = c.usage
            {
                self.tally.usage = Some(u.into());
                if c.choices.is_none_or(|c| c.is_empty()) {
                    return if self.strip { Edit::Drop } else { Edit::Keep };
                }
            }
        }
        if m.text {
            self.tally.content_events += 1;
        }
        if self.strip
            && let Some((a, b)) = m.usage_null.and_then(|at| usage_null(data, at))
        {
            return Edit::Cut(data_start + a, data_start + b);
        }
        Edit::Keep
    }
}

/// The value of a top-level `"sequence_number":N` member (Responses
/// events put it last, so the search runs from the end).
fn sequence_number(data: &[u8]) -> Option<u64> {
    let key = b"\"sequence_number\"";
    let at = memmem::rfind(data, key)?;
    let v = value_of(&data[at..], key)?;
    let digits = &data[at + v..];
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..n]).ok()?.parse().ok()
}

/// The end (exclusive) of the first complete event at or after `from`: the
/// index after its blank line (`\n\n` or `\r\n\r\n`).
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(p) = buf.get(i..)?.iter().position(|b| *b == b'\n') {
        let nl = i + p;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// The value of the event's `data:` field and its offset in the event.
fn data_field(ev: &[u8]) -> Option<(usize, &[u8])> {
    let mut offset = 0;
    for line in ev.split(|b| *b == b'\n') {
        let line_len = line.len() + 1;
        if let Some(v) = line.strip_prefix(b"data:") {
            let (skip, v) = match v.strip_prefix(b" ") {
                Some(v) => (6, v),
                None => (5, v),
            };
            let v = v.strip_suffix(b"\r").unwrap_or(v);
            return Some((offset + skip, v));
        }
        offset += line_len;
    }
    None
}

/// What one pass over an event's JSON finds. Keys are recognised at each
/// `"`: inside JSON strings quotes are escaped (`\"`), so generated text
/// can never fake them.
#[derive(Debug, Default)]
struct Marks {
    /// A `"usage":{…}` member (parse the event).
    usage_object: bool,
    /// Offset of a `"usage":null` member.
    usage_null: Option<usize>,
    /// Generated text: a non-empty `content`, `text` or tool-call `arguments` string.
    text: bool,
}

impl Marks {
    fn of(data: &[u8]) -> Marks {
        let mut m = Marks::default();
        let nonempty_string =
            |v: &[u8]| v.first() == Some(&b'"') && v.get(1).is_some_and(|b| *b != b'"');
        let mut i = 0;
        while let Some(p) = data
            .get(i..)
            .and_then(|d| d.iter().position(|b| *b == b'"'))
        {
            let at = i + p;
            let rest = &data[at..];
            match rest.get(1) {
                Some(b'u') => {
                    if let Some(v) = value_of(rest, b"\"usage\"") {
                        if rest[v..].starts_with(b"{") {
                            m.usage_object = true;
                        } else if rest[v..].starts_with(b"null") {
                            m.usage_null.get_or_insert(at);
                        }
                    }
                }
                Some(b'c') => {
                    m.text |=
                        value_of(rest, b"\"content\"").is_some_and(|v| nonempty_string(&rest[v..]));
                }
                Some(b't') => {
                    m.text |=
                        value_of(rest, b"\"text\"").is_some_and(|v| nonempty_string(&rest[v..]));
                }
                Some(b'a') => {
                    m.text |= value_of(rest, b"\"arguments\"")
                        .is_some_and(|v| nonempty_string(&rest[v..]));
                }
                _ => {}
            }
            i = at + 1;
        }
        m
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t')
}

/// When `rest` starts with the member name `key`: the offset of its value
/// (after the colon and any blanks around it).
fn value_of(rest: &[u8], key: &[u8]) -> Option<usize> {
    if !rest.starts_with(key) {
        return None;
    }
    let mut i = key.len();
    while rest.get(i).is_some_and(|b| is_ws(*b)) {
        i += 1;
    }
    if rest.get(i) != Some(&b':') {
        return None;
    }
    i += 1;
    while rest.get(i).is_some_and(|b| is_ws(*b)) {
        i += 1;
    }
    Some(i)
}

/// The `"usage":null` member at `at` with its separating comma: the range
/// to cut (the upstream adds it to every event when usage was asked for).
fn usage_null(data: &[u8], at: usize) -> Option<(usize, usize)> {
    let end = at + value_of(&data[at..], b"\"usage\"")? + b"null".len();
    let mut before = at;
    while before > 0 && is_ws(data[before - 1]) {
        before -= 1;
    }
    let mut after = end;
    while data.get(after).is_some_and(|b| is_ws(*b)) {
        after += 1;
    }
    match (before.checked_sub(1).map(|i| data[i]), data.get(after)) {
        // `…, "usage": null}` or `…, "usage": null, …`: cut from the comma.
        (Some(b','), Some(b'}' | b',')) => Some((before - 1, end)),
        // `{"usage": null, …`: cut through the next comma and blanks.
        (Some(b'{'), Some(b',')) => {
            let mut next = after + 1;
            while data.get(next).is_some_and(|b| is_ws(*b)) {
                next += 1;
            }
            Some((at, next))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::top_level_member;

    /// A chat stream as an OpenAI-compatible upstream sends it, with or
    /// without `include_usage`.
    fn stream(usage: bool) -> Vec<u8> {
        let suffix = if usage { ",\"usage\":null}" } else { "}" };
        let mut s = String::new();
        let head = r#"data: {"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":["#;
        s.push_str(&format!(
            "{head}{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]{suffix}\n\n"
        ));
        for t in ["Hello", " wor\\\"usage\\\":{ld", " !"] {
            s.push_str(&format!(
                "{head}{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":null}}]{suffix}\n\n"
            ));
        }
        s.push_str(&format!(
            "{head}{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]{suffix}\n\n"
        ));
        if usage {
            s.push_str(&format!(
                "{head}],\"usage\":{{\"prompt_tokens\":11,\"completion_tokens\":3,\"total_tokens\":14,\"prompt_tokens_details\":{{\"cached_tokens\":4}}}}}}\n\n"
            ));
        }
        s.push_str("data: [DONE]\n\n");
        s.into_bytes()
    }

    const EXPECTED: Usage = Usage {
        prompt_tokens: 11,
        completion_tokens: 3,
        total_tokens: 14,
        cache_read_tokens: 4,
        cache_write_5m_tokens: 0,
        cache_write_1h_tokens: 0,
    };

    /// Feeds `input` cut at `cuts` and returns what the client got.
    fn run(scanner: &mut SseUsage, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            let c = c.clamp(prev, input.len());
            out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(&input[prev..c])));
            prev = c;
        }
        out.extend_from_slice(&scanner.finish());
        out
    }

    #[test]
    fn stripping_gives_the_bytes_of_a_call_without_usage_at_every_split() {
        let with = stream(true);
        let without = stream(false);
        // Every single cut point, and pairs of cut points around each event border.
        for a in 0..=with.len() {
            let mut s = SseUsage::new(true);
            assert_eq!(run(&mut s, &with, &[a]), without, "cut at {a}");
            assert_eq!(s.tally().usage, Some(EXPECTED), "cut at {a}");
            assert_eq!(s.tally().content_events, 3);
        }
        for a in (0..with.len()).step_by(7) {
            for b in (a..with.len()).step_by(13) {
                let mut s = SseUsage::new(true);
                assert_eq!(run(&mut s, &with, &[a, b, b + 1]), without, "{a} {b}");
                assert_eq!(s.tally().usage, Some(EXPECTED));
            }
        }
        // One byte at a time.
        let cuts: Vec<usize> = (1..with.len()).collect();
        let mut s = SseUsage::new(true);
        assert_eq!(run(&mut s, &with, &cuts), without);
        assert_eq!(s.tally().usage, Some(EXPECTED));
    }

    #[test]
    fn passthrough_reads_usage_at_every_split_and_changes_nothing() {
        let with = stream(true);
        for a in 0..=with.len() {
            let mut s = SseUsage::new(false);
            assert_eq!(run(&mut s, &with, &[a, a + 3]), with, "cut at {a}");
            assert_eq!(s.tally().usage, Some(EXPECTED));
            assert_eq!(s.tally().content_events, 3);
        }
        let mut s = SseUsage::new(false);
        s.observe(&with[..100]);
        s.observe(&with[100..]);
        assert_eq!(s.tally().usage, Some(EXPECTED));
    }

    #[test]
    fn whole_events_pass_without_copies() {
        let without = stream(false);
        let chunk = Bytes::from(without.clone());
        let mut s = SseUsage::new(true);
        let out = s.feed(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(out.len(), chunk.len());
        assert_eq!(s.tally().content_events, 3);
        assert_eq!(s.tally().usage, None);
    }

    #[test]
    fn crlf_events_and_unterminated_tails() {
        let input = b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\r\n\r\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\r\n\r\ndata: [DONE]";
        for a in 0..input.len() {
            let mut s = SseUsage::new(true);
            let out = run(&mut s, input, &[a]);
            assert_eq!(
                out, b"data: {\"choices\":[{\"text\":\"a\"}]}\r\n\r\ndata: [DONE]",
                "cut at {a}"
            );
            assert_eq!(
                s.tally().usage,
                Some(Usage {
                    prompt_tokens: 2,
                    completion_tokens: 1,
                    total_tokens: 3,
                    ..Usage::default()
                })
            );
        }
    }

    #[test]
    fn blanks_around_colons_are_understood() {
        let input = b"data: {\"choices\": [{\"delta\": {\"content\": \"x\"}}], \"usage\": null}\n\ndata: {\"usage\": null, \"choices\": [{\"text\": \"y\"}]}\n\ndata: {\"choices\": [], \"usage\": {\"prompt_tokens\": 5, \"completion_tokens\": 2}}\n\n";
        let mut s = SseUsage::new(true);
        assert_eq!(
            std::str::from_utf8(&run(&mut s, input, &[30])).unwrap(),
            "data: {\"choices\": [{\"delta\": {\"content\": \"x\"}}]}\n\ndata: {\"choices\": [{\"text\": \"y\"}]}\n\n"
        );
        assert_eq!(s.tally().content_events, 2);
        assert_eq!(s.tally().usage.map(|u| u.total_tokens), Some(7));
    }

    #[test]
    fn usage_inside_the_last_content_chunk_is_kept() {
        let input = b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n";
        let mut s = SseUsage::new(true);
        assert_eq!(run(&mut s, input, &[]), input.to_vec());
        assert_eq!(s.tally().usage.map(|u| u.prompt_tokens), Some(5));
    }

    #[test]
    fn oversized_events_stop_the_scan_but_not_the_stream() {
        let mut big = b"data: {\"x\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_EVENT + 10));
        let mut s = SseUsage::new(true);
        let mut out = s.feed(Bytes::copy_from_slice(&big)).to_vec();
        out.extend_from_slice(&s.feed(Bytes::from_static(b"\"}\n\n")));
        out.extend_from_slice(&s.finish());
        big.extend_from_slice(b"\"}\n\n");
        assert_eq!(out, big);
    }

    #[test]
    fn request_side_asks_for_usage_once() {
        let mut b: Map<String, Value> =
            serde_json::from_str(r#"{"model":"m","stream":true}"#).unwrap();
        assert_eq!(request_stream_usage(&mut b), StreamUsage::Injected);
        assert_eq!(b["stream_options"]["include_usage"], true);
        let mut b: Map<String, Value> = serde_json::from_str(
            r#"{"stream_options":{"include_usage":false,"continuous_usage_stats":true}}"#,
        )
        .unwrap();
        assert_eq!(request_stream_usage(&mut b), StreamUsage::Injected);
        assert_eq!(b["stream_options"]["continuous_usage_stats"], true);
        let mut b: Map<String, Value> =
            serde_json::from_str(r#"{"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(request_stream_usage(&mut b), StreamUsage::ClientAsked);
        let mut b: Map<String, Value> = serde_json::from_str(r#"{"stream_options":"x"}"#).unwrap();
        assert_eq!(request_stream_usage(&mut b), StreamUsage::Untouched);
    }

    /// Answers a provider may send, odd ones included, with what the scan
    /// makes of them.
    const ANSWERS: &[(&str, &str)] = &[
        (
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            "found",
        ),
        (
            r#" { "id" : "a\"b\\" , "choices" : [ {"m":{"c":"}]{[\u0041"}} , [] , {} ] , "usage" : {"prompt_tokens":3,"completion_tokens":4,"total_tokens":9} } "#,
            "found",
        ),
        (
            r#"{"n":-1.5e+3,"t":true,"f":false,"z":null,"usage":{"prompt_tokens":5},"after":{"usage":{"prompt_tokens":99}}}"#,
            "found",
        ),
        (
            r#"{"nested":{"usage":{"prompt_tokens":99}},"x":1}"#,
            "absent",
        ),
        (r#"{}"#, "absent"),
        (r#"{"usage":null}"#, "found"),
        (r#"{"usage":"lots"}"#, "found"),
        (r#"{"usage":{"prompt_tokens":"x"}}"#, "found"),
        (r#"{"usag\u0065":{"prompt_tokens":7}}"#, "unsure"),
        (
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            "unsure",
        ),
        (r#"{"a":[1,2}],"usage":{"prompt_tokens":1}}"#, "unsure"),
        (r#"{"usage":{"prompt_tokens":1}} trailing"#, "unsure"),
        (r#"{"usage":{"prompt_tokens":1}"#, "unsure"),
        (r#"{"a":"unterminated"#, "unsure"),
        (r#"[{"usage":{"prompt_tokens":1}}]"#, "unsure"),
        (r#"{"a" 1}"#, "unsure"),
        (r#"{"a":1 2}"#, "unsure"),
        (r#"{"a":}"#, "unsure"),
        ("", "unsure"),
    ];

    #[test]
    fn the_usage_scan_agrees_with_serde() {
        for (body, expected) in ANSWERS {
            let scanned = top_level_member(body.as_bytes(), b"usage");
            let kind = match scanned {
                Member::Found(_) => "found",
                Member::Absent => "absent",
                Member::Unsure => "unsure",
            };
            assert_eq!(kind, *expected, "{body}");
            assert_eq!(
                Usage::from_body(body.as_bytes()),
                Usage::from_body_parsed(body.as_bytes()),
                "{body}"
            );
        }
        // The value's exact bytes.
        let body = br#"{"a":[{"b":"]"}],"usage" : {"prompt_tokens":1} ,"c":2}"#;
        let Member::Found(r) = top_level_member(body, b"usage") else {
            panic!("usage not found");
        };
        assert_eq!(&body[r], br#"{"prompt_tokens":1}"#);
        // Brackets nested past what the scan tracks: serde decides.
        let deep = format!(
            r#"{{"a":{}{},"usage":{{"prompt_tokens":1}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(top_level_member(deep.as_bytes(), b"usage"), Member::Unsure);
        assert_eq!(
            Usage::from_body(deep.as_bytes()),
            Usage::from_body_parsed(deep.as_bytes())
        );
    }

    use super::samples::{self, Sample};

    /// The normalised record of what `s`'s provider said.
    fn normalised(s: &Sample) -> Usage {
        let prompt = s.prompt();
        Usage {
            prompt_tokens: prompt,
            completion_tokens: s.output,
            total_tokens: prompt + s.output,
            cache_read_tokens: s.cache_read,
            cache_write_5m_tokens: s.cache_write_5m,
            cache_write_1h_tokens: s.cache_write_1h,
        }
    }

    #[test]
    fn every_protocols_answers_normalise_whole_and_split_at_every_byte() {
        for s in samples::ALL {
            let body = s.body.as_bytes();
            if !s.sse {
                assert_eq!(
                    Usage::from_answer(s.dialect, body),
                    Some(normalised(s)),
                    "{}",
                    s.name
                );
                continue;
            }
            let check = |scanner: &SseUsage, how: &str| {
                let t = scanner.tally();
                assert_eq!(t.usage, Some(normalised(s)), "{} {how}", s.name);
                assert_eq!(t.content_events, s.content_events, "{} {how}", s.name);
            };
            for a in 0..=body.len() {
                let mut scanner = SseUsage::reading(s.dialect);
                assert_eq!(run(&mut scanner, body, &[a]), body, "{} cut at {a}", s.name);
                check(&scanner, &format!("cut at {a}"));
            }
            let cuts: Vec<usize> = (1..body.len()).collect();
            let mut scanner = SseUsage::reading(s.dialect);
            assert_eq!(run(&mut scanner, body, &cuts), body, "{}", s.name);
            check(&scanner, "byte by byte");
            // Drained after the client left: observed, not forwarded.
            let mut scanner = SseUsage::reading(s.dialect);
            scanner.observe(&body[..body.len() / 3]);
            scanner.observe(&body[body.len() / 3..]);
            scanner.finish();
            check(&scanner, "observed");
        }
    }

    #[test]
    fn anthropic_input_excludes_the_cache_so_the_prompt_adds_it_back() {
        // 21 uncached + 3076 read + 2051 written (51 for 5 minutes, 2000 for an hour).
        let u = Usage::from_answer(Dialect::Messages, samples::MESSAGES_JSON.as_bytes()).unwrap();
        assert_eq!(
            (u.prompt_tokens, u.cache_read_tokens, u.cache_write_tokens()),
            (5148, 3076, 2051)
        );
        assert_eq!(
            (u.cache_write_5m_tokens, u.cache_write_1h_tokens),
            (51, 2000)
        );
        assert_eq!((u.completion_tokens, u.total_tokens), (503, 5651));
        // Read as OpenAI usage the same answer would lose every token.
        assert_eq!(
            Usage::from_answer(Dialect::Chat, samples::MESSAGES_JSON.as_bytes())
                .map(|u| u.prompt_tokens),
            Some(0)
        );
        let body = |usage: &str| format!(r#"{{"id":"msg_1","type":"message","usage":{usage}}}"#);
        let u = |usage: &str| Usage::from_answer(Dialect::Messages, body(usage).as_bytes());
        // No split: every write is a 5-minute write.
        let plain =
            u(r#"{"input_tokens":4,"cache_creation_input_tokens":10,"output_tokens":2}"#).unwrap();
        assert_eq!(
            (
                plain.prompt_tokens,
                plain.cache_write_5m_tokens,
                plain.cache_write_1h_tokens
            ),
            (14, 10, 0)
        );
        // Nulls and absent counts are zeros.
        let nulls = u(r#"{"input_tokens":5,"cache_creation_input_tokens":null,"cache_read_input_tokens":null,"cache_creation":null,"output_tokens":3}"#).unwrap();
        assert_eq!(
            (
                nulls.prompt_tokens,
                nulls.cache_write_tokens(),
                nulls.total_tokens
            ),
            (5, 0, 8)
        );
        // A split without the total: the writes are its sum.
        let split = u(r#"{"input_tokens":1,"cache_creation":{"ephemeral_5m_input_tokens":2,"ephemeral_1h_input_tokens":3},"output_tokens":0}"#).unwrap();
        assert_eq!(
            (
                split.prompt_tokens,
                split.cache_write_5m_tokens,
                split.cache_write_1h_tokens
            ),
            (6, 2, 3)
        );
        assert_eq!(u("null"), None);
    }

    #[test]
    fn a_messages_stream_takes_the_last_value_of_each_field() {
        let mut s = SseUsage::reading(Dialect::Messages);
        s.observe(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":30,\"cache_read_input_tokens\":70,\"output_tokens\":1}}}\n\n");
        assert_eq!(
            s.tally()
                .usage
                .map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((100, 1))
        );
        s.observe(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":40}}\n\n");
        s.observe(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":41,\"cache_read_input_tokens\":72}}\n\n");
        let u = s.tally().usage.unwrap();
        assert_eq!(
            (
                u.prompt_tokens,
                u.cache_read_tokens,
                u.completion_tokens,
                u.total_tokens
            ),
            (102, 72, 41, 143)
        );
    }

    #[test]
    fn a_messages_stream_cut_before_message_delta_counts_the_content_seen() {
        let body = samples::MESSAGES_SSE.as_bytes();
        let cut = memmem::find(body, b"event: message_delta").unwrap();
        let mut s = SseUsage::reading(Dialect::Messages);
        s.observe(&body[..cut]);
        let u = s.tally().usage.unwrap();
        // message_start said input 25 + 1200 written, output 1; 3 deltas followed.
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (1225, 3, 1228)
        );
        s.observe(&body[cut..]);
        assert_eq!(s.tally().usage.map(|u| u.completion_tokens), Some(89));
    }

    #[test]
    fn responses_answers_name_their_id_and_streams_their_last_sequence_number() {
        assert_eq!(
            answer_id(samples::RESPONSES_JSON.as_bytes()).as_deref(),
            Some("resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41")
        );
        assert_eq!(answer_id(br#"{"object":"response"}"#), None);
        assert_eq!(answer_id(br#"{"id":7}"#), None);
        let body = samples::RESPONSES_SSE.as_bytes();
        for a in (0..body.len()).step_by(5) {
            let mut s = SseUsage::reading(Dialect::Responses);
            run(&mut s, body, &[a]);
            let t = s.tally();
            assert_eq!(
                t.response_id.as_deref(),
                Some("resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654"),
                "cut at {a}"
            );
            assert_eq!(t.sequence_number, Some(9));
        }
        // An answer cut short by its output cap still reports its usage.
        let mut s = SseUsage::reading(Dialect::Responses);
        s.observe(br#"data: {"type":"response.incomplete","response":{"id":"resp_2","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},"output_tokens":16,"output_tokens_details":{"reasoning_tokens":16},"total_tokens":25}},"sequence_number":3}

"#);
        let t = s.tally();
        assert_eq!(
            t.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((9, 16))
        );
        assert_eq!(t.response_id.as_deref(), Some("resp_2"));
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn cost_prices_uncached_read_and_written_input_apart() {
        let u = Usage {
            prompt_tokens: 1000,
            completion_tokens: 50,
            total_tokens: 1050,
            cache_read_tokens: 600,
            cache_write_5m_tokens: 100,
            cache_write_1h_tokens: 200,
        };
        let p = Prices {
            input: 1.0,
            output: 10.0,
            cache_read: 0.1,
            cache_write: 1.25,
            cache_write_1h: 2.0,
        };
        // 100 uncached + 600 read + 100 written for 5 minutes + 200 for an hour + 50 out.
        assert!(close(u.cost(&p), 100.0 + 60.0 + 125.0 + 400.0 + 500.0));
        // No 1-hour price: the 5-minute write price.
        let no_1h = Prices {
            cache_write_1h: 0.0,
            ..p
        };
        assert!(close(u.cost(&no_1h), 100.0 + 60.0 + 125.0 + 250.0 + 500.0));
        // No write prices at all: writes cost as input.
        let no_writes = Prices {
            cache_write: 0.0,
            cache_write_1h: 0.0,
            ..p
        };
        assert!(close(
            u.cost(&no_writes),
            100.0 + 60.0 + 100.0 + 200.0 + 500.0
        ));
        // Only a 1-hour price: 5-minute writes at input.
        let only_1h = Prices {
            cache_write: 0.0,
            ..p
        };
        assert!(close(
            u.cost(&only_1h),
            100.0 + 60.0 + 100.0 + 400.0 + 500.0
        ));
        // No cache prices: every prompt token at input.
        let flat = Prices {
            input: 1.0,
            output: 10.0,
            ..Prices::default()
        };
        assert!(close(u.cost(&flat), 1000.0 + 500.0));
        // Cache counts beyond the prompt are capped by it, never priced twice.
        let over = Usage {
            prompt_tokens: 100,
            cache_read_tokens: 80,
            cache_write_5m_tokens: 50,
            cache_write_1h_tokens: 50,
            ..Usage::default()
        };
        assert!(close(over.cost(&p), 80.0 * 0.1 + 20.0 * 1.25));
        // The Messages sample at Claude Sonnet prices (USD per token).
        let sonnet = Prices {
            input: 3e-6,
            output: 15e-6,
            cache_read: 0.3e-6,
            cache_write: 3.75e-6,
            cache_write_1h: 6e-6,
        };
        let m = Usage::from_answer(Dialect::Messages, samples::MESSAGES_JSON.as_bytes()).unwrap();
        assert!(close(
            m.cost(&sonnet),
            21.0 * 3e-6 + 3076.0 * 0.3e-6 + 51.0 * 3.75e-6 + 2000.0 * 6e-6 + 503.0 * 15e-6
        ));
    }

    #[test]
    fn bodies_and_cost() {
        let u = Usage::from_body(
            br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4}}}"#,
        )
        .unwrap();
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                total_tokens: 15,
                cache_read_tokens: 4,
                ..Usage::default()
            }
        );
        let embeddings =
            Usage::from_body(br#"{"data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#)
                .unwrap();
        assert_eq!(
            (embeddings.prompt_tokens, embeddings.completion_tokens),
            (8, 0)
        );
        assert_eq!(Usage::from_body(b"{\"usage\":"), None);
        let p = Prices {
            input: 1.0,
            output: 10.0,
            cache_read: 0.25,
            ..Prices::default()
        };
        assert_eq!(u.cost(&p), 6.0 + 1.0 + 50.0);
        let no_cache_price = Prices {
            cache_read: 0.0,
            ..p
        };
        assert_eq!(u.cost(&no_cache_price), 10.0 + 50.0);
    }

    #[test]
    fn hostile_usage_is_clamped_and_flagged() {
        let honest = Usage {
            prompt_tokens: 10,
            completion_tokens: 5,
            total_tokens: 15,
            ..Usage::default()
        };
        assert_eq!(honest.clamped(MAX_USAGE_TOKENS), (honest, false));
        let hostile = Usage {
            prompt_tokens: u64::MAX,
            completion_tokens: u64::MAX,
            total_tokens: u64::MAX,
            cache_read_tokens: u64::MAX,
            ..Usage::default()
        };
        let (u, clamped) = hostile.clamped(MAX_USAGE_TOKENS);
        assert!(clamped);
        assert_eq!(u.prompt_tokens, MAX_USAGE_TOKENS);
        assert_eq!(u.completion_tokens, MAX_USAGE_TOKENS);
        assert_eq!(u.total_tokens, MAX_USAGE_TOKENS);
        assert_eq!(u.cache_read_tokens, MAX_USAGE_TOKENS);
        assert!(u.cost(&Prices::default()).is_finite());
    }
}

/// Provider answers as the providers' API references show them (Anthropic
/// "Messages" and "Streaming Messages", OpenAI "Responses" and "Streaming
/// responses"), with cache traffic, for the parsers' tests here and the
/// batching tests in [`crate::report`]. Each comes with what the provider
/// said in its own terms, so tests check the normalisation, not a copy of it.
#[cfg(test)]
pub(crate) mod samples {
    use super::Dialect;

    /// One answer and the counts its usage block states.
    pub(crate) struct Sample {
        pub name: &'static str,
        pub dialect: Dialect,
        pub sse: bool,
        pub body: &'static str,
        /// The provider's input count (Anthropic: excluding the cache).
        pub input: u64,
        pub cache_read: u64,
        pub cache_write_5m: u64,
        pub cache_write_1h: u64,
        pub output: u64,
        /// Content events in a stream.
        pub content_events: u64,
    }

    impl Sample {
        /// All input tokens, as the normalised record counts them.
        pub(crate) fn prompt(&self) -> u64 {
            match self.dialect {
                Dialect::Messages => {
                    self.input + self.cache_read + self.cache_write_5m + self.cache_write_1h
                }
                Dialect::Chat | Dialect::Responses => self.input,
            }
        }
    }

    pub(crate) const MESSAGES_JSON: &str = r#"{
  "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
  "type": "message",
  "role": "assistant",
  "model": "claude-sonnet-4-5-20250929",
  "content": [
    {"type": "text", "text": "Hi! My name is Claude. \"usage\": {\"input_tokens\": 999}"}
  ],
  "stop_reason": "end_turn",
  "stop_sequence": null,
  "usage": {
    "input_tokens": 21,
    "cache_creation_input_tokens": 2051,
    "cache_read_input_tokens": 3076,
    "cache_creation": {"ephemeral_5m_input_tokens": 51, "ephemeral_1h_input_tokens": 2000},
    "output_tokens": 503,
    "server_tool_use": null,
    "service_tier": "standard"
  }
}"#;

    /// A stream whose `message_delta` carries only `output_tokens` (the
    /// original API): the input counts come from `message_start`.
    pub(crate) const MESSAGES_SSE: &str = concat!(
        "event: message_start\n",
        r#"data: {"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-opus-4-6", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "cache_creation_input_tokens": 1200, "cache_read_input_tokens": 0, "output_tokens": 1}}}"#,
        "\n\n",
        "event: content_block_start\n",
        r#"data: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}"#,
        "\n\n",
        "event: ping\n",
        r#"data: {"type": "ping"}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " \"usage\": {\"output_tokens\": 7}"}}"#,
        "\n\n",
        "event: content_block_stop\n",
        r#"data: {"type": "content_block_stop", "index": 0}"#,
        "\n\n",
        "event: content_block_start\n",
        r#"data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"San Fra"}}"#,
        "\n\n",
        "event: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":1}"#,
        "\n\n",
        "event: message_delta\n",
        r#"data: {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence":null}, "usage": {"output_tokens": 89}}"#,
        "\n\n",
        "event: message_stop\n",
        r#"data: {"type": "message_stop"}"#,
        "\n\n",
    );

    /// A stream from a newer API: `message_delta` repeats the input and
    /// cache counts (cumulative, the last value wins), with a 1-hour write.
    pub(crate) const MESSAGES_SSE_CUMULATIVE: &str = concat!(
        "event: message_start\r\n",
        r#"data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":4100,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":2,"service_tier":"standard"}}}"#,
        "\r\n\r\n",
        "event: content_block_start\r\n",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}"#,
        "\r\n\r\n",
        "event: content_block_delta\r\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Let me think"}}"#,
        "\r\n\r\n",
        "event: content_block_delta\r\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}"#,
        "\r\n\r\n",
        "event: content_block_stop\r\n",
        r#"data: {"type":"content_block_stop","index":0}"#,
        "\r\n\r\n",
        "event: content_block_start\r\n",
        r#"data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}"#,
        "\r\n\r\n",
        "event: content_block_delta\r\n",
        r#"data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Paris."}}"#,
        "\r\n\r\n",
        "event: content_block_stop\r\n",
        r#"data: {"type":"content_block_stop","index":1}"#,
        "\r\n\r\n",
        "event: message_delta\r\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":12,"cache_creation_input_tokens":300,"cache_read_input_tokens":4100,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":300},"output_tokens":57}}"#,
        "\r\n\r\n",
        "event: message_stop\r\n",
        r#"data: {"type":"message_stop"}"#,
        "\r\n\r\n",
    );

    pub(crate) const RESPONSES_JSON: &str = r#"{
  "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
  "object": "response",
  "created_at": 1741476777,
  "status": "completed",
  "error": null,
  "incomplete_details": null,
  "instructions": null,
  "max_output_tokens": null,
  "model": "gpt-4o-2024-08-06",
  "output": [
    {
      "type": "message",
      "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
      "status": "completed",
      "role": "assistant",
      "content": [
        {"type": "output_text", "text": "The image depicts a scenic landscape.", "annotations": []}
      ]
    }
  ],
  "parallel_tool_calls": true,
  "previous_response_id": "resp_0123",
  "reasoning": {"effort": null, "summary": null},
  "store": true,
  "temperature": 1.0,
  "text": {"format": {"type": "text"}},
  "tool_choice": "auto",
  "tools": [],
  "top_p": 1.0,
  "truncation": "disabled",
  "usage": {
    "input_tokens": 1328,
    "input_tokens_details": {"cached_tokens": 1152},
    "output_tokens": 52,
    "output_tokens_details": {"reasoning_tokens": 12},
    "total_tokens": 1380
  },
  "user": null,
  "metadata": {}
}"#;

    pub(crate) const RESPONSES_SSE: &str = concat!(
        "event: response.created\n",
        r#"data: {"type":"response.created","response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":null,"user":null,"metadata":{}},"sequence_number":0}"#,
        "\n\n",
        "event: response.in_progress\n",
        r#"data: {"type":"response.in_progress","response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","output":[],"usage":null,"metadata":{}},"sequence_number":1}"#,
        "\n\n",
        "event: response.output_item.added\n",
        r#"data: {"type":"response.output_item.added","output_index":0,"item":{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"in_progress","role":"assistant","content":[]},"sequence_number":2}"#,
        "\n\n",
        "event: response.content_part.added\n",
        r#"data: {"type":"response.content_part.added","item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"part":{"type":"output_text","text":"","annotations":[]},"sequence_number":3}"#,
        "\n\n",
        "event: response.output_text.delta\n",
        r#"data: {"type":"response.output_text.delta","item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"delta":"Hi","sequence_number":4}"#,
        "\n\n",
        "event: response.output_text.delta\n",
        r#"data: {"type":"response.output_text.delta","item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"delta":" \"response.completed\" \"usage\":{\"input_tokens\":1}","sequence_number":5}"#,
        "\n\n",
        "event: response.output_text.done\n",
        r#"data: {"type":"response.output_text.done","item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"text":"Hi \"response.completed\" \"usage\":{\"input_tokens\":1}","sequence_number":6}"#,
        "\n\n",
        "event: response.content_part.done\n",
        r#"data: {"type":"response.content_part.done","item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"part":{"type":"output_text","text":"Hi","annotations":[]},"sequence_number":7}"#,
        "\n\n",
        "event: response.output_item.done\n",
        r#"data: {"type":"response.output_item.done","output_index":0,"item":{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi","annotations":[]}]},"sequence_number":8}"#,
        "\n\n",
        "event: response.completed\n",
        r#"data: {"type":"response.completed","response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"completed","error":null,"model":"gpt-4.1-2025-04-14","output":[{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi","annotations":[]}]}],"store":true,"usage":{"input_tokens":2037,"input_tokens_details":{"cached_tokens":1920},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":2048},"user":null,"metadata":{}},"sequence_number":9}"#,
        "\n\n",
    );

    pub(crate) const CHAT_JSON: &str = r#"{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion","created":1741570283,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"The image shows a wooden boardwalk.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1117,"completion_tokens":46,"total_tokens":1163,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_fc9f1d7035"}"#;

    /// Every sample with what its usage block says.
    pub(crate) const ALL: &[Sample] = &[
        Sample {
            name: "messages json",
            dialect: Dialect::Messages,
            sse: false,
            body: MESSAGES_JSON,
            input: 21,
            cache_read: 3076,
            cache_write_5m: 51,
            cache_write_1h: 2000,
            output: 503,
            content_events: 0,
        },
        Sample {
            name: "messages sse",
            dialect: Dialect::Messages,
            sse: true,
            body: MESSAGES_SSE,
            input: 25,
            cache_read: 0,
            cache_write_5m: 1200,
            cache_write_1h: 0,
            output: 89,
            content_events: 3,
        },
        Sample {
            name: "messages sse, cumulative delta",
            dialect: Dialect::Messages,
            sse: true,
            body: MESSAGES_SSE_CUMULATIVE,
            input: 12,
            cache_read: 4100,
            cache_write_5m: 0,
            cache_write_1h: 300,
            output: 57,
            content_events: 3,
        },
        Sample {
            name: "responses json",
            dialect: Dialect::Responses,
            sse: false,
            body: RESPONSES_JSON,
            input: 1328,
            cache_read: 1152,
            cache_write_5m: 0,
            cache_write_1h: 0,
            output: 52,
            content_events: 0,
        },
        Sample {
            name: "responses sse",
            dialect: Dialect::Responses,
            sse: true,
            body: RESPONSES_SSE,
            input: 2037,
            cache_read: 1920,
            cache_write_5m: 0,
            cache_write_1h: 0,
            output: 11,
            content_events: 2,
        },
        Sample {
            name: "chat json",
            dialect: Dialect::Chat,
            sse: false,
            body: CHAT_JSON,
            input: 1117,
            cache_read: 1024,
            cache_write_5m: 0,
            cache_write_1h: 0,
            output: 46,
            content_events: 0,
        },
    ];
}

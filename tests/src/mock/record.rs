//! The mock's record of what it received and sent: the source of truth that
//! tests compare the gateway's own accounting against.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// How a request ended, from the mock's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Outcome {
    /// A 2xx answer, fully written (`"ok"`).
    Ok,
    /// A non-2xx answer, scripted or not (`"429"`, `"500"`, `"401"`…).
    Status(u16),
    /// The mock dropped the connection on purpose (`"reset"`).
    Reset,
    /// The peer went away before the answer was complete (`"client_gone"`).
    ClientGone,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::Status(s) => write!(f, "{s}"),
            Outcome::Reset => f.write_str("reset"),
            Outcome::ClientGone => f.write_str("client_gone"),
        }
    }
}

impl From<Outcome> for String {
    fn from(o: Outcome) -> Self {
        o.to_string()
    }
}

impl TryFrom<String> for Outcome {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.as_str() {
            "ok" => Ok(Outcome::Ok),
            "reset" => Ok(Outcome::Reset),
            "client_gone" => Ok(Outcome::ClientGone),
            other => other
                .parse()
                .map(Outcome::Status)
                .map_err(|_| format!("unknown outcome `{other}`")),
        }
    }
}

/// One request as the mock saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// Arrival order, from 1.
    pub seq: u64,
    /// The HTTP method.
    pub method: String,
    /// The request path, without the query.
    pub path: String,
    /// The request body's `model`, when it has one.
    pub model: Option<String>,
    /// Every header, names lowercased; repeated headers joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// Every header as received, in order, repeats kept (names lowercased).
    #[serde(default)]
    pub header_list: Vec<(String, String)>,
    /// The parsed JSON body (`null` when absent or not JSON).
    pub body: serde_json::Value,
    /// The body exactly as received (hex in the control API's JSON).
    #[serde(default, with = "hex_bytes")]
    pub body_bytes: Vec<u8>,
    /// Whether the body asked for `stream: true`.
    pub stream: bool,
    /// Whether `stream_options.include_usage` was `true`.
    pub include_usage: bool,
    /// Input tokens the mock counted in the body (see the module docs of
    /// [`crate::mock`]), cache reads and writes included, whatever the
    /// protocol reports; 0 off the token-producing endpoints.
    pub prompt_tokens: u64,
    /// Of `prompt_tokens`, those the simulated cache served.
    #[serde(default)]
    pub cache_read_tokens: u64,
    /// Of `prompt_tokens`, those written to the cache with the 5-minute ttl.
    #[serde(default)]
    pub cache_write_5m_tokens: u64,
    /// Of `prompt_tokens`, those written to the cache with the 1-hour ttl.
    #[serde(default)]
    pub cache_write_1h_tokens: u64,
    /// Completion tokens actually written: for a stream cut short, the content
    /// chunks sent before the cut.
    pub completion_tokens_sent: u64,
    /// The response body as the mock wrote it: whole bodies, and the events
    /// of Messages and Responses streams (hex in the control API's JSON).
    #[serde(default, with = "hex_bytes")]
    pub response_body: Vec<u8>,
    /// HTTP status of the response head, `None` when none was sent.
    pub status: Option<u16>,
    /// How the answer ended.
    pub outcome: Outcome,
    /// Arrival time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// From arrival to the end of the response (or of the connection).
    pub duration_ms: u64,
}

impl RecordedRequest {
    /// Cache writes of both ttls.
    pub fn cache_write_tokens(&self) -> u64 {
        self.cache_write_5m_tokens + self.cache_write_1h_tokens
    }

    /// A header's value by (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// Counters over all requests, kept even when the record is disabled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Requests received on `/v1/*`.
    pub requests: u64,
    /// Received but not finished yet (e.g. streams being written).
    pub in_flight: u64,
    /// Requests that asked for `stream: true`.
    pub streams: u64,
    /// 2xx answers written in full.
    pub ok: u64,
    /// Non-2xx answers.
    pub http_errors: u64,
    /// Connections the mock dropped on purpose.
    pub resets: u64,
    /// Answers the peer abandoned before they were complete.
    pub client_gone: u64,
    /// Input tokens (cache included) of requests that got a 2xx head (billable ones).
    pub prompt_tokens: u64,
    /// Of `prompt_tokens`, cache reads.
    #[serde(default)]
    pub cache_read_tokens: u64,
    /// Of `prompt_tokens`, 5-minute cache writes.
    #[serde(default)]
    pub cache_write_5m_tokens: u64,
    /// Of `prompt_tokens`, 1-hour cache writes.
    #[serde(default)]
    pub cache_write_1h_tokens: u64,
    /// Completion tokens written, over all requests (stream chunks sent before a cut included).
    pub completion_tokens_sent: u64,
    /// One-shot script actions not consumed yet.
    pub script_pending: u64,
}

impl Totals {
    /// Cache writes of both ttls.
    pub fn cache_write_tokens(&self) -> u64 {
        self.cache_write_5m_tokens + self.cache_write_1h_tokens
    }
}

/// Hex (de)serialisation of raw bytes.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    finished: AtomicU64,
    streams: AtomicU64,
    ok: AtomicU64,
    http_errors: AtomicU64,
    resets: AtomicU64,
    client_gone: AtomicU64,
    prompt_tokens: AtomicU64,
    cache_read_tokens: AtomicU64,
    cache_write_5m_tokens: AtomicU64,
    cache_write_1h_tokens: AtomicU64,
    completion_tokens_sent: AtomicU64,
}

/// Where finished requests go.
#[derive(Debug)]
pub(crate) struct Recorder {
    enabled: bool,
    counters: Counters,
    records: Mutex<Vec<RecordedRequest>>,
}

impl Recorder {
    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            counters: Counters::default(),
            records: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Counts an arrival and returns its sequence number.
    pub(crate) fn arrive(&self) -> u64 {
        self.counters.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn finish(&self, record: RecordedRequest) {
        let c = &self.counters;
        if record.stream {
            c.streams.fetch_add(1, Ordering::Relaxed);
        }
        let counter = match record.outcome {
            Outcome::Ok => &c.ok,
            Outcome::Status(_) => &c.http_errors,
            Outcome::Reset => &c.resets,
            Outcome::ClientGone => &c.client_gone,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if record.status.is_some_and(|s| (200..300).contains(&s)) {
            c.prompt_tokens
                .fetch_add(record.prompt_tokens, Ordering::Relaxed);
            c.cache_read_tokens
                .fetch_add(record.cache_read_tokens, Ordering::Relaxed);
            c.cache_write_5m_tokens
                .fetch_add(record.cache_write_5m_tokens, Ordering::Relaxed);
            c.cache_write_1h_tokens
                .fetch_add(record.cache_write_1h_tokens, Ordering::Relaxed);
        }
        c.completion_tokens_sent
            .fetch_add(record.completion_tokens_sent, Ordering::Relaxed);
        if self.enabled {
            self.records.lock().push(record);
        }
        // Last, so that a test seeing `in_flight == 0` also sees the record.
        c.finished.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        let mut records = self.records.lock().clone();
        records.sort_by_key(|r| r.seq);
        records
    }

    pub(crate) fn totals(&self) -> Totals {
        let c = &self.counters;
        let finished = c.finished.load(Ordering::Acquire);
        let requests = c.requests.load(Ordering::Relaxed);
        Totals {
            requests,
            in_flight: requests.saturating_sub(finished),
            streams: c.streams.load(Ordering::Relaxed),
            ok: c.ok.load(Ordering::Relaxed),
            http_errors: c.http_errors.load(Ordering::Relaxed),
            resets: c.resets.load(Ordering::Relaxed),
            client_gone: c.client_gone.load(Ordering::Relaxed),
            prompt_tokens: c.prompt_tokens.load(Ordering::Relaxed),
            cache_read_tokens: c.cache_read_tokens.load(Ordering::Relaxed),
            cache_write_5m_tokens: c.cache_write_5m_tokens.load(Ordering::Relaxed),
            cache_write_1h_tokens: c.cache_write_1h_tokens.load(Ordering::Relaxed),
            completion_tokens_sent: c.completion_tokens_sent.load(Ordering::Relaxed),
            script_pending: 0,
        }
    }

    /// Forgets the record and zeroes the counters (in-flight requests still
    /// finish into the fresh state).
    pub(crate) fn reset(&self) {
        self.records.lock().clear();
        let c = &self.counters;
        let in_flight = c
            .requests
            .load(Ordering::Relaxed)
            .saturating_sub(c.finished.load(Ordering::Acquire));
        for counter in [
            &c.streams,
            &c.ok,
            &c.http_errors,
            &c.resets,
            &c.client_gone,
            &c.prompt_tokens,
            &c.cache_read_tokens,
            &c.cache_write_5m_tokens,
            &c.cache_write_1h_tokens,
            &c.completion_tokens_sent,
            &c.finished,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        c.requests.store(in_flight, Ordering::Relaxed);
    }
}

/// A request being answered. Dropping it files the record, so whichever way
/// the answer ends (written, cut, or abandoned by the peer) it is counted once.
pub(crate) struct RecordGuard {
    recorder: std::sync::Arc<Recorder>,
    record: Option<RecordedRequest>,
    started: Instant,
}

impl RecordGuard {
    pub(crate) fn new(recorder: std::sync::Arc<Recorder>, mut record: RecordedRequest) -> Self {
        record.timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self {
            recorder,
            record: Some(record),
            started: Instant::now(),
        }
    }

    fn record(&mut self) -> &mut RecordedRequest {
        self.record
            .as_mut()
            .expect("the record is only taken in Drop")
    }

    pub(crate) fn seq(&self) -> u64 {
        self.record.as_ref().map_or(0, |r| r.seq)
    }

    pub(crate) fn set_status(&mut self, status: u16) {
        self.record().status = Some(status);
    }

    /// The input accounting the answer reports: all input tokens, and the
    /// cache reads and writes among them.
    pub(crate) fn set_usage(&mut self, prompt: u64, read: u64, write_5m: u64, write_1h: u64) {
        let r = self.record();
        r.prompt_tokens = prompt;
        r.cache_read_tokens = read;
        r.cache_write_5m_tokens = write_5m;
        r.cache_write_1h_tokens = write_1h;
    }

    /// Appends bytes handed to the connection to the recorded response body
    /// (nothing when the record is disabled).
    pub(crate) fn add_response_bytes(&mut self, bytes: &[u8]) {
        if self.recorder.enabled() {
            self.record().response_body.extend_from_slice(bytes);
        }
    }

    pub(crate) fn add_sent(&mut self, tokens: u64) {
        self.record().completion_tokens_sent += tokens;
    }

    pub(crate) fn set_outcome(&mut self, outcome: Outcome) {
        self.record().outcome = outcome;
    }
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.duration_ms =
                u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.recorder.finish(record);
        }
    }
}

//! Reading and understanding a request body.
//!
//! - [`read_body`]: the whole body, within a size limit and a deadline; an
//!   oversized one is read on ("lingering") so the client sees the 413.
//! - [`scan_body`]: the fast path, `model`, `stream`, the output cap and the
//!   affinity hints ([`BodyHints`]) read in one pass without building a
//!   `Value` (the body is then forwarded as received with `model` spliced
//!   in); [`parse_body`]: the general path, a whole `Value`. Both must read
//!   the same things out of the same body (`scanning_agrees_with_parsing`):
//!   a session must land on the same backend whichever path its body takes.
//! - [`estimate_tokens`], [`prompt_estimate`]: what a request reserves on tpm.

use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::affinity::BodyHints;
use crate::error::ApiError;
use crate::json::Shape;
use crate::key_limits::{BODY_BUDGET_WAIT, BodyReservation};
use crate::stream::BoxError;

/// How much of an oversized body is read and thrown away before answering
/// 413, and for how long: without this "lingering" read, a client still
/// uploading gets a connection reset instead of the 413 (the kernel resets a
/// socket closed with unread data), as nginx's `lingering_close` avoids.
pub(crate) const OVERSIZE_DRAIN_BYTES: usize = 8 * 1024 * 1024;
const OVERSIZE_DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads the whole body: 413 above `max` bytes (after the lingering read),
/// 408 when it takes longer than `timeout`, 400 when it fails, 503 when the
/// bytes do not fit the proxy's body budget (`reservation` grows with the
/// body; the caller holds it as long as the bytes live).
pub(crate) async fn read_body<B>(
    body: B,
    max: usize,
    timeout: Duration,
    declared: Option<u64>,
    reservation: &mut BodyReservation,
) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt as _;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut body = std::pin::pin!(body);
    // A declared length is reserved before a byte is read.
    if let Some(n) = declared.filter(|n| *n as usize <= max) {
        let wait =
            BODY_BUDGET_WAIT.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        if reservation.grow(n as usize, wait).await.is_err() {
            return Err(over_budget(body.as_mut(), max).await);
        }
    }
    let mut buf = bytes::BytesMut::new();
    let mut oversize: Option<(usize, tokio::time::Instant)> = None;
    loop {
        let until = match oversize {
            Some((_, drain_until)) => drain_until.min(deadline),
            None => deadline,
        };
        let frame = match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) if oversize.is_some() => return Err(ApiError::payload_too_large(max)),
            Err(_) => return Err(ApiError::request_timeout()),
            Ok(None) => break,
            Ok(Some(Err(_))) if oversize.is_some() => {
                return Err(ApiError::payload_too_large(max));
            }
            Ok(Some(Err(_))) => {
                return Err(ApiError::bad_request("Could not read the request body."));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        match &mut oversize {
            Some((drained, _)) => {
                *drained += data.len();
                if *drained > OVERSIZE_DRAIN_BYTES {
                    return Err(ApiError::payload_too_large(max));
                }
            }
            None if buf.len() + data.len() > max => {
                buf.clear();
                let drain_until = tokio::time::Instant::now() + OVERSIZE_DRAIN_TIME;
                oversize = Some((data.len(), drain_until));
            }
            None => {
                let total = buf.len() + data.len();
                if total > reservation.held() {
                    let wait = BODY_BUDGET_WAIT
                        .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                    // Grown in steps, so a chunked body does not wait per frame.
                    let step = (total + BUDGET_STEP).min(max);
                    if reservation.grow(step.max(total), wait).await.is_err() {
                        drop(buf);
                        return Err(over_budget(body.as_mut(), max).await);
                    }
                }
                buf.extend_from_slice(&data);
            }
        }
    }
    match oversize {
        Some(_) => Err(ApiError::payload_too_large(max)),
        None => Ok(buf.freeze()),
    }
}

/// How much a chunked body's reservation grows by beyond what has arrived.
const BUDGET_STEP: usize = 256 * 1024;

/// The 503 of a body that did not fit the budget, after reading (and
/// throwing away) what the client still sends for a short while, so it
/// sees the answer rather than a reset.
async fn over_budget<B>(mut body: std::pin::Pin<&mut B>, max: usize) -> ApiError
where
    B: Body<Data = Bytes>,
{
    use http_body_util::BodyExt as _;
    crate::metrics::body_budget_rejected();
    tracing::debug!("request body does not fit the proxy's in-flight body budget");
    let until = tokio::time::Instant::now() + OVERSIZE_DRAIN_TIME;
    let mut drained = 0usize;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(until, body.frame()).await {
        if let Some(d) = frame.data_ref() {
            drained += d.len();
        }
        if drained > max + OVERSIZE_DRAIN_BYTES {
            break;
        }
    }
    ApiError::body_budget_exhausted()
}

/// The keys of a request's output cap, the first present (an unsigned
/// integer) wins: Chat Completions' two, then the Responses API's.
const OUTPUT_CAPS: [&str; 3] = ["max_completion_tokens", "max_tokens", "max_output_tokens"];

/// A request's output cap: the field that set it and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutputCap {
    /// One of [`OUTPUT_CAPS`].
    pub field: &'static str,
    /// Its value.
    pub tokens: u64,
}

/// The output cap of a parsed body (the first of [`OUTPUT_CAPS`] that is an
/// unsigned integer).
pub(crate) fn output_cap(body: &Map<String, Value>) -> Option<OutputCap> {
    OUTPUT_CAPS.iter().find_map(|k| {
        body.get(*k)
            .and_then(Value::as_u64)
            .map(|tokens| OutputCap { field: k, tokens })
    })
}

/// The estimated tokens of a request before its route bounds them: its
/// output cap plus ~4 bytes per prompt token.
#[cfg(test)]
pub(crate) fn estimate_tokens(body: &Map<String, Value>, body_len: usize) -> f64 {
    let max_out = output_cap(body).map_or(0, |c| c.tokens);
    max_out as f64 + prompt_estimate(body_len) as f64
}

/// What a limit the model mapping leaves unknown (0) is taken to be when
/// bounding an estimate: 128k tokens, the context window of most current
/// models. It only bounds what one request reserves on tpm (the real usage
/// replaces it when the answer ends); it refuses nothing.
pub(crate) const UNKNOWN_LIMIT: u64 = 128 * 1024;

/// What a request to `cands` reserves on tpm: its output cap, at most the
/// largest `max_tokens` of the mappings (unknown: [`UNKNOWN_LIMIT`]), plus
/// its prompt estimate, the sum at most the largest `context_window`
/// (unknown: [`UNKNOWN_LIMIT`]) — a model cannot use more than its window,
/// so no request reserves more, whatever it asks for.
///
/// A cap above every mapping's known `max_tokens` is refused (400 naming the
/// field and the limit) rather than lowered: that is what the providers
/// answer, and lowering it would silently change the request (a client
/// relying on the length it asked for would get a truncated answer it did
/// not ask for). When any candidate's limit is unknown that candidate may
/// serve it: nothing is refused.
pub(crate) fn bounded_estimate(
    cap: Option<OutputCap>,
    prompt: u64,
    cands: &[crate::snapshot::Candidate],
) -> Result<f64, ApiError> {
    let known_max = cands
        .iter()
        .map(|c| c.max_tokens.map(u64::from))
        .try_fold(0u64, |acc, m| m.map(|m| acc.max(m)));
    if let (Some(cap), Some(max)) = (cap, known_max)
        && !cands.is_empty()
        && cap.tokens > max
    {
        let mut e = ApiError::bad_request(format!(
            "`{}` is {}, above the model's maximum of {max} output tokens.",
            cap.field, cap.tokens
        ));
        e.param = Some(cap.field.into());
        return Err(e);
    }
    let out_limit = cands
        .iter()
        .map(|c| c.max_tokens.map_or(UNKNOWN_LIMIT, u64::from))
        .max()
        .unwrap_or(UNKNOWN_LIMIT);
    let window = cands
        .iter()
        .map(|c| c.context_window.map_or(UNKNOWN_LIMIT, u64::from))
        .max()
        .unwrap_or(UNKNOWN_LIMIT);
    let out = cap.map_or(0, |c| c.tokens).min(out_limit);
    Ok(out.saturating_add(prompt).min(window) as f64)
}

/// About four bytes of request body per prompt token.
pub(crate) fn prompt_estimate(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

/// Parses a JSON request body into its top-level object and canonical model.
pub(crate) fn parse_body(bytes: &[u8]) -> Result<(Map<String, Value>, String), ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}.")))?;
    let Value::Object(map) = v else {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object.",
        ));
    };
    match map.get("model") {
        Some(Value::String(m)) if !m.is_empty() => {
            let m = m.clone();
            Ok((map, m))
        }
        _ => Err(ApiError::bad_model()),
    }
}

/// What routing needs from a body, read without building a `Value`.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// The canonical model.
    pub model: String,
    /// Byte range of the `model` value (a JSON string, quotes included).
    pub model_span: std::ops::Range<usize>,
    /// `stream: true`.
    pub stream: bool,
    /// `max_completion_tokens`, else `max_tokens`, else `max_output_tokens`,
    /// when an unsigned integer.
    pub max_out: Option<OutputCap>,
    /// What affinity and stored responses need: equal to
    /// [`BodyHints::from_map`] of the parsed body.
    pub hints: BodyHints,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Model,
    Stream,
    MaxCompletionTokens,
    MaxTokens,
    MaxOutputTokens,
    PromptCache,
    Metadata,
    PreviousResponseId,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, k: &str) -> Result<Key, E> {
                Ok(match k {
                    "model" => Key::Model,
                    "stream" => Key::Stream,
                    "max_completion_tokens" => Key::MaxCompletionTokens,
                    "max_tokens" => Key::MaxTokens,
                    "max_output_tokens" => Key::MaxOutputTokens,
                    "prompt_cache_key" => Key::PromptCache,
                    "metadata" => Key::Metadata,
                    "previous_response_id" => Key::PreviousResponseId,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A value read as `Value::as_str` would see it: the string, or `None` for
/// anything else (validated and stepped over like [`Shape`]). Allocates only
/// for a string.
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, s: &str) -> Result<Text, E> {
                Ok(Text(Some(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text, E> {
                Ok(Text(Some(s)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_unit<E>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_none<E>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Text, A::Error> {
                while a.next_element::<Shape>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Text, A::Error> {
                while a.next_key::<Shape>()?.is_some() {
                    a.next_value::<Shape>()?;
                }
                Ok(Text(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// `metadata` read for its `user_id` string, as
/// `body.get("metadata").and_then(|m| m.get("user_id"))` would: `None` when
/// `metadata` is not an object or has no string `user_id` (the last one of
/// repeated keys, as a parsed object keeps).
struct UserId(Option<String>);

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UserId;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<UserId, A::Error> {
                let mut user_id = None;
                while let Some(k) = a.next_key::<Field>()? {
                    if k.0 {
                        user_id = a.next_value::<Text>()?.0;
                    } else {
                        a.next_value::<Shape>()?;
                    }
                }
                Ok(UserId(user_id))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<UserId, A::Error> {
                while a.next_element::<Shape>()?.is_some() {}
                Ok(UserId(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<UserId, E> {
                Ok(UserId(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<UserId, E> {
                Ok(UserId(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<UserId, E> {
                Ok(UserId(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<UserId, E> {
                Ok(UserId(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<UserId, E> {
                Ok(UserId(None))
            }
            fn visit_unit<E>(self) -> Result<UserId, E> {
                Ok(UserId(None))
            }
            fn visit_none<E>(self) -> Result<UserId, E> {
                Ok(UserId(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A key of `metadata`: whether it is `user_id`.
struct Field(bool);

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, k: &str) -> Result<Field, E> {
                Ok(Field(k == "user_id"))
            }
        }
        d.deserialize_any(V)
    }
}

struct Top<'a> {
    model: &'a RawValue,
    stream: bool,
    max_out: Option<OutputCap>,
    hints: BodyHints,
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Top<'de>, A::Error> {
                let mut model: Option<&'de RawValue> = None;
                let (mut stream, mut mct, mut mt, mut mot) =
                    (Shape::Other, Shape::Other, Shape::Other, Shape::Other);
                // Repeated keys: the last one counts, as in a parsed object.
                let mut hints = BodyHints::default();
                while let Some(k) = a.next_key::<Key>()? {
                    match k {
                        Key::Model => {
                            // A repeated `model` takes the general path.
                            if model.replace(a.next_value()?).is_some() {
                                return Err(de::Error::custom("duplicate model"));
                            }
                        }
                        Key::Stream => stream = a.next_value()?,
                        Key::MaxCompletionTokens => mct = a.next_value()?,
                        Key::MaxTokens => mt = a.next_value()?,
                        Key::MaxOutputTokens => mot = a.next_value()?,
                        Key::PromptCache => {
                            hints.prompt_cache_key = a.next_value::<Text>()?.0;
                        }
                        Key::Metadata => hints.user_id = a.next_value::<UserId>()?.0,
                        Key::PreviousResponseId => {
                            hints.previous_response_id = a.next_value::<Text>()?.0;
                        }
                        Key::Other => {
                            a.next_value::<Shape>()?;
                        }
                    }
                }
                let max_out = [mct, mt, mot]
                    .into_iter()
                    .zip(OUTPUT_CAPS)
                    .find_map(|(s, field)| match s {
                        Shape::U64(tokens) => Some(OutputCap { field, tokens }),
                        _ => None,
                    });
                Ok(Top {
                    model: model.ok_or_else(|| de::Error::custom("no model"))?,
                    stream: stream == Shape::True,
                    max_out,
                    hints,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads `model`, `stream`, the output cap and the [`BodyHints`] of a body
/// without building a `Value` (allocating only for the hints present),
/// validating it as [`parse_body`] would. `None` whenever the body
/// is anything but a valid object with one non-empty string `model`: the
/// caller then takes [`parse_body`], which gives the general answer (the
/// same result, or the error to send).
pub(crate) fn scan_body(bytes: &[u8]) -> Option<Scanned> {
    let top: Top<'_> = serde_json::from_slice(bytes).ok()?;
    let raw = top.model.get();
    if !raw.starts_with('"') {
        return None;
    }
    // A plain string is its own content; escapes are decoded (and checked).
    let inner = &raw[1..raw.len() - 1];
    let model = if inner.contains('\\') {
        serde_json::from_str::<String>(raw).ok()?
    } else {
        inner.to_string()
    };
    if model.is_empty() {
        return None;
    }
    let start = raw.as_ptr() as usize - bytes.as_ptr() as usize;
    Some(Scanned {
        model,
        model_span: start..start + raw.len(),
        stream: top.stream,
        max_out: top.max_out,
        hints: top.hints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::RequestBody;

    #[test]
    fn estimates_are_bounded_by_the_mappings_and_caps_above_them_refused() {
        use crate::snapshot::SnapshotStore;
        use crate::test_util::backend;
        use claw_proto::{Pool, v1};
        let mut b = backend("be_1", Pool::Primary, &[("m", "m-native")]);
        b.models[0].max_tokens = 1000;
        b.models[0].context_window = 4096;
        let store = SnapshotStore::default();
        store
            .apply(
                1,
                &v1::Snapshot {
                    version: 1,
                    backends: vec![b],
                    ..Default::default()
                },
            )
            .unwrap();
        let snap = store.load().unwrap();
        let cands = &snap.route("m").unwrap().candidates;
        let cap = |tokens| {
            Some(OutputCap {
                field: "max_tokens",
                tokens,
            })
        };
        assert_eq!(bounded_estimate(cap(100), 20, cands).unwrap(), 120.0);
        assert_eq!(bounded_estimate(None, 20, cands).unwrap(), 20.0);
        // The window bounds a huge prompt.
        assert_eq!(bounded_estimate(cap(1000), 1 << 40, cands).unwrap(), 4096.0);
        let e = bounded_estimate(cap(1_000_000_000_000), 20, cands).unwrap_err();
        assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        // Unknown limits refuse nothing and bound at UNKNOWN_LIMIT.
        let mut b = backend("be_2", Pool::Primary, &[("m", "m-native")]);
        b.models[0].max_tokens = 0;
        store
            .apply(
                2,
                &v1::Snapshot {
                    version: 2,
                    backends: vec![b],
                    ..Default::default()
                },
            )
            .unwrap();
        let snap = store.load().unwrap();
        let cands = &snap.route("m").unwrap().candidates;
        assert_eq!(
            bounded_estimate(cap(u64::MAX), 20, cands).unwrap(),
            UNKNOWN_LIMIT as f64
        );
    }

    #[test]
    fn body_parsing_rejects_bad_input() {
        assert!(parse_body(b"{not json").is_err());
        assert!(parse_body(b"[1,2]").is_err());
        assert!(parse_body(b"{\"messages\":[]}").is_err());
        assert!(parse_body(b"{\"model\":42}").is_err());
        assert!(parse_body(b"{\"model\":\"\"}").is_err());
        assert!(parse_body(b"{\"model\":\"m\xff\"}").is_err());
        assert!(parse_body(b"").is_err());
        let (map, m) = parse_body(br#"{"model":"gpt","max_tokens":100}"#).unwrap();
        assert_eq!(m, "gpt");
        assert_eq!(estimate_tokens(&map, 400), 200.0);
    }

    #[test]
    fn scanning_agrees_with_parsing() {
        let bodies: &[&[u8]] = &[
            br#"{"model":"gpt","max_tokens":100}"#,
            br#" { "messages" : [ {"role":"user","content":"h\u00e9 \"x\""} ], "model" : "gpt" , "stream":false } "#,
            br#"{"model":"g\u0070t","max_completion_tokens":7,"max_tokens":9}"#,
            br#"{"model":"gpt","max_completion_tokens":1.5,"max_tokens":9}"#,
            br#"{"model":"gpt","max_tokens":-0}"#,
            br#"{"model":"gpt","max_tokens":-3}"#,
            br#"{"model":"gpt","max_tokens":1e2}"#,
            br#"{"model":"gpt","max_tokens":18446744073709551616}"#,
            br#"{"model":"gpt","stream":true}"#,
            br#"{"mod\u0065l":"gpt","stream":"true"}"#,
            br#"{"model":"a","model":"b"}"#,
            br#"{"model":"gpt","x":"\ud800"}"#,
            br#"{"model":"\ud800"}"#,
            br#"{"model":"gpt","x":[1,2,{"a":null}]} x"#,
            br#"{"model":"gpt","x":"a	b"}"#,
            b"{\"model\":\"gpt\",\"x\":\"\xff\"}",
            br#"{"model":null}"#,
            br#"{"model":["gpt"]}"#,
            br#"{"model":""}"#,
            br#"{"model":"gpt",}"#,
            br#"{"model":"gpt","n":01}"#,
            br#"[1,2]"#,
            b"",
            // Responses' output cap, alone and behind the chat ones.
            br#"{"model":"gpt","max_output_tokens":64}"#,
            br#"{"model":"gpt","max_output_tokens":64,"max_tokens":"x"}"#,
            br#"{"max_output_tokens":64,"max_tokens":5,"model":"gpt"}"#,
            br#"{"model":"gpt","max_output_tokens":-1}"#,
            // Affinity hints: strings, escapes, nesting, non-strings, repeats.
            br#"{"model":"gpt","prompt_cache_key":"agent-7","previous_response_id":"resp_1"}"#,
            br#"{"prompt_cache_key":"k\u00e9\n\"q\"","model":"gpt"}"#,
            br#"{"model":"gpt","prompt_cache_key":42,"previous_response_id":null}"#,
            br#"{"model":"gpt","prompt_cache_key":{"a":"b"},"previous_response_id":["resp_1"]}"#,
            br#"{"model":"gpt","prompt_cache_key":"a","prompt_cache_key":"b"}"#,
            br#"{"model":"gpt","prompt_cache_key":"a","prompt_cache_key":1}"#,
            br#"{"model":"gpt","prompt_cache_key":""}"#,
            br#"{"model":"claude","metadata":{"user_id":"u-1"},"max_tokens":1024}"#,
            br#"{"model":"claude","metadata":{"x":{"user_id":"deep"},"user\u005fid":"u\u0031","y":[1]}}"#,
            br#"{"model":"claude","metadata":{"user_id":7}}"#,
            br#"{"model":"claude","metadata":{"user_id":"a","user_id":null}}"#,
            br#"{"model":"claude","metadata":{"user_id":"a"},"metadata":{"other":"b"}}"#,
            br#"{"model":"claude","metadata":{"user_id":"a"},"metadata":"user_id"}"#,
            br#"{"model":"claude","metadata":["user_id","a"]}"#,
            br#"{"model":"claude","metadata":null,"user_id":"top"}"#,
            br#"{"model":"claude","messages":[{"metadata":{"user_id":"inner"},"prompt_cache_key":"inner"}]}"#,
            br#"{"model":"claude","metadata":{"user_id":"\ud800"}}"#,
            br#"{"model":"claude","metadata":{"user_id":"a"}"#,
            br#"{"model":"gpt","previous_response_id":"resp_\u0041","stream":true,"max_output_tokens":9}"#,
        ];
        for b in bodies {
            let parsed = parse_body(b);
            match scan_body(b) {
                Some(s) => {
                    let (map, m) = parsed
                        .unwrap_or_else(|_| panic!("scan accepted {}", String::from_utf8_lossy(b)));
                    assert_eq!(s.model, m);
                    assert_eq!(s.stream, map.get("stream") == Some(&Value::Bool(true)));
                    assert_eq!(
                        s.hints,
                        BodyHints::from_map(&map),
                        "{}",
                        String::from_utf8_lossy(b)
                    );
                    assert_eq!(
                        s.max_out.map_or(0, |c| c.tokens) as f64 + prompt_estimate(b.len()) as f64,
                        estimate_tokens(&map, b.len())
                    );
                    let mut raw = RequestBody::Raw {
                        bytes: Bytes::copy_from_slice(b),
                        model: s.model_span,
                    };
                    let sent: Value =
                        serde_json::from_slice(&raw.with_model("n\"é").unwrap()).unwrap();
                    let mut want = map.clone();
                    want.insert("model".into(), Value::String("n\"é".into()));
                    assert_eq!(sent, Value::Object(want));
                }
                None => {
                    // Only the general path's cases: errors, or a repeated model.
                    assert!(parsed.is_err() || b.starts_with(br#"{"model":"a","model""#));
                }
            }
        }
        // Deeply nested values: both reject past serde_json's recursion limit.
        for depth in [100, 126, 127, 128, 200] {
            let b = format!(
                "{{\"model\":\"m\",\"x\":{}{}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            );
            assert_eq!(
                scan_body(b.as_bytes()).is_some(),
                parse_body(b.as_bytes()).is_ok(),
                "depth {depth}"
            );
        }
    }
}

//! The HTTP server: accept loop, per-connection tasks and the `/v1` handlers.

use super::action::{Action, ResetPoint};
use super::body::MockBody;
use super::config::MockConfig;
use super::control;
use super::openai::{self, ChunkWriter, Endpoint, Reply, RequestInfo};
use super::record::{Outcome, RecordGuard, RecordedRequest, Recorder};
use super::script::Script;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the server should be doing; sent through a `watch` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Serving.
    Running,
    /// Stop accepting, let open connections finish their current responses.
    Graceful,
    /// Drop every connection at once.
    Now,
}

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: MockConfig,
    pub(crate) script: Script,
    pub(crate) recorder: Arc<Recorder>,
    default_reply: Reply,
    expected_auth: Option<HeaderValue>,
    name: Option<HeaderValue>,
}

impl Shared {
    pub(crate) fn new(config: MockConfig) -> Self {
        let expected_auth = config
            .api_key
            .as_ref()
            .and_then(|k| HeaderValue::from_str(&format!("Bearer {k}")).ok());
        let name = config
            .name
            .as_ref()
            .and_then(|n| HeaderValue::from_str(n).ok());
        let default_reply = match &config.reply {
            Some(text) => Reply::text(text),
            None => Reply::generated(config.completion_tokens),
        };
        Self {
            recorder: Arc::new(Recorder::new(config.record)),
            script: Script::default(),
            default_reply,
            expected_auth,
            name,
            config,
        }
    }
}

/// Serves until `stop` leaves [`Stop::Running`]; on [`Stop::Graceful`] it
/// returns once open connections are done (or on a later [`Stop::Now`]).
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Stop>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(100_000);
    let builder = Arc::new(builder);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() != Stop::Running {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(connection(stream, builder.clone(), shared.clone(), stop.clone()));
                }
                Err(error) => {
                    // Usually EMFILE under a benchmark: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    if *stop.borrow() == Stop::Graceful {
        loop {
            tokio::select! {
                next = conns.join_next() => if next.is_none() { break },
                changed = stop.changed() => if changed.is_err() || *stop.borrow() == Stop::Now { break },
            }
        }
    }
    conns.shutdown().await;
}

async fn connection(
    stream: TcpStream,
    builder: Arc<auto::Builder<TokioExecutor>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Stop>,
) {
    // Each SSE chunk should leave at once rather than wait for the next.
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            changed = stop.changed() => {
                let now = *stop.borrow();
                match now {
                    _ if changed.is_err() => return,
                    Stop::Now => return,
                    Stop::Graceful => conn.as_mut().graceful_shutdown(),
                    Stop::Running => {}
                }
            }
        }
    }
}

/// Returned by the service to make hyper close the connection without a
/// response (a scripted `reset: before`, or a request body that broke off).
#[derive(Debug)]
pub(crate) struct CloseConnection;

impl fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection closed by the mock")
    }
}

impl std::error::Error for CloseConnection {}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, CloseConnection> {
    if req.uri().path().starts_with("/_mock/") {
        return Ok(control::handle(&shared, req).await);
    }
    let seq = shared.recorder.arrive();
    let (parts, body) = req.into_parts();
    let endpoint = match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/v1/chat/completions") => Some(Endpoint::Chat),
        (&Method::POST, "/v1/completions") => Some(Endpoint::Completions),
        (&Method::POST, "/v1/embeddings") => Some(Endpoint::Embeddings),
        _ => None,
    };
    let record = shared.recorder.enabled();
    let mut rec = RecordedRequest {
        seq,
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        model: None,
        headers: if record {
            header_map(&parts.headers)
        } else {
            BTreeMap::new()
        },
        body: serde_json::Value::Null,
        stream: false,
        include_usage: false,
        prompt_tokens: 0,
        completion_tokens_sent: 0,
        status: None,
        outcome: Outcome::ClientGone,
        timestamp_ms: 0,
        duration_ms: 0,
    };
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            drop(RecordGuard::new(shared.recorder.clone(), rec));
            return Err(CloseConnection);
        }
    };
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let info = endpoint
        .map(|e| RequestInfo::parse(e, &json))
        .unwrap_or_default();
    rec.model.clone_from(&info.model);
    rec.stream = info.stream;
    rec.include_usage = info.include_usage;
    rec.prompt_tokens = if endpoint.is_some() {
        info.prompt_tokens
    } else {
        0
    };
    if record {
        rec.body = json;
    }
    let mut guard = RecordGuard::new(shared.recorder.clone(), rec);

    if let Some(expected) = &shared.expected_auth
        && parts.headers.get(header::AUTHORIZATION) != Some(expected)
    {
        let body = openai::error_body(401, "Incorrect API key provided (claw mock upstream).");
        return Ok(respond(&shared, guard, StatusCode::UNAUTHORIZED, body, 0));
    }

    let action = shared
        .script
        .next(info.model.as_deref(), &parts.headers)
        .unwrap_or_default();
    let delay = shared.config.latency + Duration::from_millis(action.delay_ms.unwrap_or(0));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if action.reset == Some(ResetPoint::Before) {
        guard.set_outcome(Outcome::Reset);
        return Err(CloseConnection);
    }
    if action.status.is_some() || action.body.is_some() {
        return Ok(scripted_status(&shared, guard, &action));
    }
    let Some(endpoint) = endpoint else {
        return Ok(match (&parts.method, parts.uri.path()) {
            (&Method::GET, "/v1/models") => {
                let body = openai::models_body(&shared.config.models);
                respond(&shared, guard, StatusCode::OK, body, 0)
            }
            (_, path) => {
                let body = openai::error_body(404, &format!("no route for {path} on the mock"));
                respond(&shared, guard, StatusCode::NOT_FOUND, body, 0)
            }
        });
    };
    Ok(answer(&shared, guard, endpoint, &info, &action))
}

/// A normal (possibly cut) completion or embeddings answer.
fn answer(
    shared: &Shared,
    mut guard: RecordGuard,
    endpoint: Endpoint,
    info: &RequestInfo,
    action: &Action,
) -> Response<MockBody> {
    let model = info
        .model
        .as_deref()
        .or(shared.config.models.first().map(String::as_str))
        .unwrap_or("mock-model");
    let cut = action.reset == Some(ResetPoint::MidStream);
    if endpoint == Endpoint::Embeddings {
        let dims = info
            .dimensions
            .unwrap_or(shared.config.embedding_dimensions);
        let body = openai::embeddings_body(model, &info.inputs, dims, info.prompt_tokens);
        if cut {
            return cut_response(shared, guard, body);
        }
        return respond(shared, guard, StatusCode::OK, body, 0);
    }
    let reply = match &action.reply {
        Some(text) => Reply::text(text),
        None => shared.default_reply.clone(),
    }
    .capped(info.max_tokens);
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-mock{}", guard.seq()),
        _ => format!("cmpl-mock{}", guard.seq()),
    };
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    guard.set_status(200);
    if info.stream {
        let writer = ChunkWriter::new(endpoint, &id, created, model, info.include_usage);
        let cut_after = cut.then(|| action.after_chunks.unwrap_or(0));
        let stream = super::body::SseStream::new(
            writer,
            reply,
            info.prompt_tokens,
            info.include_usage,
            cut_after,
            shared.config.chunk_delay,
        );
        let seq = guard.seq();
        let body = MockBody::stream(stream, guard);
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return decorate(shared, resp, seq);
    }
    let body = openai::completion_body(endpoint, &id, created, model, &reply, info.prompt_tokens);
    if cut {
        return cut_response(shared, guard, body);
    }
    respond(shared, guard, StatusCode::OK, body, reply.len() as u64)
}

/// An answer with a scripted status and/or body.
fn scripted_status(shared: &Shared, guard: RecordGuard, action: &Action) -> Response<MockBody> {
    let status = action
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let (body, content_type) = match &action.body {
        Some(serde_json::Value::String(text)) => (Bytes::from(text.clone()), TEXT),
        Some(json) => (Bytes::from(json.to_string()), JSON),
        None => {
            let message = format!(
                "{} (scripted by the claw mock upstream)",
                status.canonical_reason().unwrap_or("error")
            );
            (openai::error_body(status.as_u16(), &message), JSON)
        }
    };
    let mut resp = respond_typed(shared, guard, status, body, 0, content_type);
    if let Some(secs) = action.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

fn respond(
    shared: &Shared,
    guard: RecordGuard,
    status: StatusCode,
    body: Bytes,
    tokens: u64,
) -> Response<MockBody> {
    respond_typed(shared, guard, status, body, tokens, JSON)
}

fn respond_typed(
    shared: &Shared,
    mut guard: RecordGuard,
    status: StatusCode,
    body: Bytes,
    tokens: u64,
    content_type: &'static str,
) -> Response<MockBody> {
    guard.set_status(status.as_u16());
    let outcome = if status.is_success() {
        Outcome::Ok
    } else {
        Outcome::Status(status.as_u16())
    };
    let seq = guard.seq();
    let body = MockBody::full(body, guard, outcome, tokens);
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    decorate(shared, resp, seq)
}

/// A 200 whose JSON body breaks off halfway.
fn cut_response(shared: &Shared, mut guard: RecordGuard, body: Bytes) -> Response<MockBody> {
    guard.set_status(200);
    let seq = guard.seq();
    let mut resp = Response::new(MockBody::cut(body, guard));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    decorate(shared, resp, seq)
}

/// Headers every `/v1` answer carries: which mock answered, and the
/// request's sequence number in its record.
fn decorate(shared: &Shared, mut resp: Response<MockBody>, seq: u64) -> Response<MockBody> {
    let h = resp.headers_mut();
    if let Some(name) = &shared.name {
        h.insert("x-mock-name", name.clone());
    }
    h.insert("x-mock-seq", HeaderValue::from(seq));
    resp
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map
}

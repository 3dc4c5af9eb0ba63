//! The HTTP server: accept loop, per-connection tasks and the `/v1` handlers.

use super::action::{Action, ModelsFault, ResetPoint};
use super::anthropic::{self, MessagesInfo};
use super::body::EventStream;
use super::body::MockBody;
use super::cache::{Block, PromptCache};
use super::config::MockConfig;
use super::control;
use super::openai::{self, ChunkWriter, Endpoint, Reply, RequestInfo};
use super::record::{Outcome, RecordGuard, RecordedRequest, Recorder};
use super::responses::{self, ResponsesInfo, Store};
use super::script::Script;
use super::tools;
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
    /// The simulated prompt cache of this provider account.
    pub(crate) cache: PromptCache,
    /// The Responses this account stored.
    pub(crate) store: Store,
    /// How `GET /v1/models` fails, if it does.
    pub(crate) models_fault: parking_lot::Mutex<Option<ModelsFault>>,
    default_reply: Reply,
    expected_auth: Option<HeaderValue>,
    expected_key: Option<HeaderValue>,
    name: Option<HeaderValue>,
}

impl Shared {
    /// Clears the script, the record, the prompt cache and the stored responses.
    pub(crate) fn reset(&self) {
        self.script.clear();
        self.recorder.reset();
        self.cache.clear();
        self.store.clear();
    }

    pub(crate) fn new(config: MockConfig) -> Self {
        let expected_auth = config
            .api_key
            .as_ref()
            .and_then(|k| HeaderValue::from_str(&format!("Bearer {k}")).ok());
        let expected_key = config
            .api_key
            .as_ref()
            .and_then(|k| HeaderValue::from_str(k).ok());
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
            cache: PromptCache::default(),
            store: Store::default(),
            models_fault: parking_lot::Mutex::new(None),
            default_reply,
            expected_auth,
            expected_key,
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

/// Where a `/v1` request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// Chat, completions, embeddings.
    OpenAi(Endpoint),
    Messages,
    CountTokens,
    Responses,
    GetResponse(String),
    DeleteResponse(String),
    Models,
    Model(String),
    Unknown,
}

impl Route {
    fn of(method: &Method, path: &str) -> Self {
        match (method, path) {
            (&Method::POST, "/v1/chat/completions") => Route::OpenAi(Endpoint::Chat),
            (&Method::POST, "/v1/completions") => Route::OpenAi(Endpoint::Completions),
            (&Method::POST, "/v1/embeddings") => Route::OpenAi(Endpoint::Embeddings),
            (&Method::POST, "/v1/messages") => Route::Messages,
            (&Method::POST, "/v1/messages/count_tokens") => Route::CountTokens,
            (&Method::POST, "/v1/responses") => Route::Responses,
            (&Method::GET, "/v1/models") => Route::Models,
            (method, path) => {
                let id = |prefix: &str| {
                    path.strip_prefix(prefix)
                        .filter(|id| !id.is_empty() && !id.contains('/'))
                        .map(str::to_owned)
                };
                match (method, id("/v1/responses/"), id("/v1/models/")) {
                    (&Method::GET, Some(id), _) => Route::GetResponse(id),
                    (&Method::DELETE, Some(id), _) => Route::DeleteResponse(id),
                    (&Method::GET, _, Some(id)) => Route::Model(id),
                    _ => Route::Unknown,
                }
            }
        }
    }

    /// Answers (errors included) in Anthropic's shape.
    fn anthropic(&self) -> bool {
        matches!(self, Route::Messages | Route::CountTokens)
    }
}

/// The parsed body, by protocol.
enum Parsed {
    OpenAi(RequestInfo),
    Messages(MessagesInfo),
    Responses(ResponsesInfo),
    None,
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, CloseConnection> {
    if req.uri().path().starts_with("/_mock/") {
        return Ok(control::handle(&shared, req).await);
    }
    let seq = shared.recorder.arrive();
    let (parts, body) = req.into_parts();
    let route = Route::of(&parts.method, parts.uri.path());
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
        header_list: if record {
            header_list(&parts.headers)
        } else {
            Vec::new()
        },
        body: serde_json::Value::Null,
        body_bytes: Vec::new(),
        stream: false,
        include_usage: false,
        prompt_tokens: 0,
        cache_read_tokens: 0,
        cache_write_5m_tokens: 0,
        cache_write_1h_tokens: 0,
        completion_tokens_sent: 0,
        response_body: Vec::new(),
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
    let parsed = match &route {
        Route::OpenAi(e) => Parsed::OpenAi(RequestInfo::parse(*e, &json)),
        Route::Messages => Parsed::Messages(MessagesInfo::parse(&json, false)),
        Route::CountTokens => Parsed::Messages(MessagesInfo::parse(&json, true)),
        Route::Responses => Parsed::Responses(ResponsesInfo::parse(&json)),
        _ => Parsed::None,
    };
    let chat_prefix = if route == Route::OpenAi(Endpoint::Chat) {
        openai::chat_prefix(&json)
    } else {
        Vec::new()
    };
    let model = match &parsed {
        Parsed::OpenAi(i) => i.model.clone(),
        Parsed::Messages(i) => i.model.clone(),
        Parsed::Responses(i) => i.model.clone(),
        Parsed::None => None,
    };
    rec.model.clone_from(&model);
    match &parsed {
        Parsed::OpenAi(info) => {
            rec.stream = info.stream;
            rec.include_usage = info.include_usage;
            rec.prompt_tokens = info.prompt_tokens;
        }
        Parsed::Messages(info) if route == Route::Messages => {
            rec.stream = info.stream;
            rec.prompt_tokens = info.prompt_tokens;
        }
        Parsed::Responses(info) => {
            rec.stream = info.stream;
            rec.prompt_tokens = info.own_tokens.max(1);
        }
        _ => {}
    }
    if record {
        rec.body = json;
        rec.body_bytes = bytes.to_vec();
    }
    let mut guard = RecordGuard::new(shared.recorder.clone(), rec);

    let fault = *shared.models_fault.lock();
    if let (Route::Models | Route::Model(_), Some(fault)) = (&route, fault) {
        let anthropic_client = parts.headers.contains_key("anthropic-version");
        match fault {
            ModelsFault::Status(code) => {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                let message = match status.as_u16() {
                    401 if anthropic_client => "invalid x-api-key",
                    401 => "Incorrect API key provided",
                    403 => "permission denied",
                    _ => "the server is temporarily unavailable",
                };
                let body = if anthropic_client {
                    anthropic::error_body(status.as_u16(), message)
                } else {
                    openai::error_body(status.as_u16(), message)
                };
                return Ok(respond(&shared, guard, status, body, 0));
            }
            ModelsFault::Hang => {
                tokio::time::sleep(Duration::from_secs(3_600)).await;
                guard.set_outcome(Outcome::Reset);
                return Err(CloseConnection);
            }
            ModelsFault::Close => {
                guard.set_outcome(Outcome::Reset);
                return Err(CloseConnection);
            }
        }
    }

    if let Some(refusal) = check_auth(&shared, &route, &parts.headers) {
        let (status, message) = refusal;
        let body = if route.anthropic() {
            anthropic::error_body(status.as_u16(), message)
        } else {
            openai::error_body(status.as_u16(), message)
        };
        return Ok(respond(&shared, guard, status, body, 0));
    }

    let action = shared
        .script
        .next(model.as_deref(), &parts.headers)
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
        return Ok(scripted_status(&shared, guard, &action, route.anthropic()));
    }
    Ok(match (route, parsed) {
        (Route::OpenAi(endpoint), Parsed::OpenAi(info)) => {
            answer(&shared, guard, endpoint, &info, &chat_prefix, &action)
        }
        (Route::Messages, Parsed::Messages(info)) => {
            answer_messages(&shared, guard, &info, &action)
        }
        (Route::CountTokens, Parsed::Messages(info)) => match &info.invalid {
            Some(message) => {
                let body = anthropic::error_body(400, message);
                respond(&shared, guard, StatusCode::BAD_REQUEST, body, 0)
            }
            None => {
                let body = anthropic::count_tokens_body(info.prompt_tokens);
                respond(&shared, guard, StatusCode::OK, body, 0)
            }
        },
        (Route::Responses, Parsed::Responses(info)) => {
            answer_responses(&shared, guard, &info, &action)
        }
        (Route::GetResponse(id), _) => match shared.store.get(&id) {
            Some(stored) => {
                let body = responses::to_bytes(&stored);
                respond(&shared, guard, StatusCode::OK, body, 0)
            }
            None => {
                let body = responses::not_found_body(&id);
                respond(&shared, guard, StatusCode::NOT_FOUND, body, 0)
            }
        },
        (Route::DeleteResponse(id), _) => {
            if shared.store.delete(&id) {
                respond(
                    &shared,
                    guard,
                    StatusCode::OK,
                    responses::deleted_body(&id),
                    0,
                )
            } else {
                let body = responses::not_found_body(&id);
                respond(&shared, guard, StatusCode::NOT_FOUND, body, 0)
            }
        }
        (Route::Models, _) => {
            let body = if parts.headers.contains_key("anthropic-version") {
                anthropic::models_body(&shared.config.models)
            } else {
                openai::models_body(&shared.config.models)
            };
            respond(&shared, guard, StatusCode::OK, body, 0)
        }
        (Route::Model(id), _) => {
            let anthropic_client = parts.headers.contains_key("anthropic-version");
            let known = shared.config.models.contains(&id);
            match (known, anthropic_client) {
                (true, true) => respond(
                    &shared,
                    guard,
                    StatusCode::OK,
                    anthropic::model_body(&id),
                    0,
                ),
                (true, false) => {
                    respond(&shared, guard, StatusCode::OK, openai::model_body(&id), 0)
                }
                (false, true) => {
                    let body = anthropic::error_body(404, &format!("model: {id}"));
                    respond(&shared, guard, StatusCode::NOT_FOUND, body, 0)
                }
                (false, false) => {
                    let message = format!("The model '{id}' does not exist");
                    let body = openai::error_body(404, &message);
                    respond(&shared, guard, StatusCode::NOT_FOUND, body, 0)
                }
            }
        }
        _ => {
            let path = parts.uri.path();
            let body = openai::error_body(404, &format!("no route for {path} on the mock"));
            respond(&shared, guard, StatusCode::NOT_FOUND, body, 0)
        }
    })
}

/// Credentials the way each protocol wants them: `x-api-key` (or, as the
/// official SDK 2.x sends it, `Authorization: Bearer`) and
/// `anthropic-version` for Messages, `Authorization: Bearer` for OpenAI
/// endpoints, either for the model list.
fn check_auth(
    shared: &Shared,
    route: &Route,
    headers: &HeaderMap,
) -> Option<(StatusCode, &'static str)> {
    let bearer_ok = shared
        .expected_auth
        .as_ref()
        .is_none_or(|e| headers.get(header::AUTHORIZATION) == Some(e));
    let key_ok = shared
        .expected_key
        .as_ref()
        .is_none_or(|e| headers.get("x-api-key") == Some(e));
    if route.anthropic() {
        // The official SDK (2.x) sends its API key as `Authorization: Bearer`;
        // `x-api-key` is the documented header. Either must carry the key.
        let present =
            headers.contains_key("x-api-key") || headers.contains_key(header::AUTHORIZATION);
        if shared.expected_key.is_some() && !present {
            return Some((StatusCode::UNAUTHORIZED, "x-api-key header is required"));
        }
        let key_given = headers.contains_key("x-api-key");
        if (key_given && !key_ok) || (!key_given && !bearer_ok) {
            return Some((StatusCode::UNAUTHORIZED, "invalid x-api-key"));
        }
        if !headers.contains_key("anthropic-version") {
            return Some((
                StatusCode::BAD_REQUEST,
                "anthropic-version: header is required",
            ));
        }
        return None;
    }
    let ok = match route {
        Route::Models | Route::Model(_) => {
            bearer_ok || (headers.contains_key("x-api-key") && key_ok)
        }
        _ => bearer_ok,
    };
    (!ok).then_some((
        StatusCode::UNAUTHORIZED,
        "Incorrect API key provided (claw mock upstream).",
    ))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}{:024x}", rand::random::<u128>() >> 32)
}

fn reply_for(shared: &Shared, action: &Action, max: Option<u64>) -> Reply {
    match &action.reply {
        Some(text) => Reply::text(text),
        None => shared.default_reply.clone(),
    }
    .capped(max)
}

fn sse_response(shared: &Shared, guard: RecordGuard, stream: EventStream) -> Response<MockBody> {
    let seq = guard.seq();
    let mut resp = Response::new(MockBody::events(stream, guard));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    decorate(shared, resp, seq)
}

/// `POST /v1/messages`.
fn answer_messages(
    shared: &Shared,
    mut guard: RecordGuard,
    info: &MessagesInfo,
    action: &Action,
) -> Response<MockBody> {
    if let Some(message) = &info.invalid {
        let body = anthropic::error_body(400, message);
        return respond(shared, guard, StatusCode::BAD_REQUEST, body, 0);
    }
    let model = info.model.as_deref().unwrap_or("mock-model");
    let reply = reply_for(shared, action, info.max_tokens);
    let cache = shared
        .cache
        .anthropic(&info.blocks, shared.config.cache_min_tokens);
    guard.set_usage(
        info.prompt_tokens,
        cache.read,
        cache.write_5m,
        cache.write_1h,
    );
    let id = random_id("msg_mock");
    let cut = matches!(
        action.reset,
        Some(ResetPoint::MidStream | ResetPoint::Stall)
    );
    guard.set_status(200);
    if let Some(call) = &info.tool_call {
        let call_id = format!("toolu_mock{}", guard.seq());
        if info.stream {
            let events =
                tools::message_stream_events(&id, model, &call_id, call, info.prompt_tokens, cache);
            let cut_after = cut.then(|| action.after_chunks.unwrap_or(0));
            let stream = EventStream::new(events, cut_after, shared.config.chunk_delay)
                .stall(action.reset == Some(ResetPoint::Stall));
            return sse_response(shared, guard, stream);
        }
        let body = tools::message_body(&id, model, &call_id, call, info.prompt_tokens, cache);
        if cut {
            return cut_response(shared, guard, body);
        }
        return respond(shared, guard, StatusCode::OK, body, call.tokens());
    }
    if info.stream {
        let events = anthropic::stream_events(&id, model, &reply, info.prompt_tokens, cache);
        let cut_after = cut.then(|| action.after_chunks.unwrap_or(0));
        let stream = EventStream::new(events, cut_after, shared.config.chunk_delay)
            .stall(action.reset == Some(ResetPoint::Stall));
        return sse_response(shared, guard, stream);
    }
    let body = anthropic::message_body(&id, model, &reply, info.prompt_tokens, cache);
    if cut {
        return cut_response(shared, guard, body);
    }
    respond(shared, guard, StatusCode::OK, body, reply.len() as u64)
}

/// `POST /v1/responses`.
fn answer_responses(
    shared: &Shared,
    mut guard: RecordGuard,
    info: &ResponsesInfo,
    action: &Action,
) -> Response<MockBody> {
    let min = shared.config.cache_min_tokens;
    let Ok((blocks, mut accounting)) = shared.store.prompt(info, &shared.cache, min) else {
        let prev = info.previous_response_id.as_deref().unwrap_or_default();
        let body = responses::previous_not_found_body(prev);
        return respond(shared, guard, StatusCode::BAD_REQUEST, body, 0);
    };
    let model = info.model.as_deref().unwrap_or("mock-model");
    let reply = reply_for(shared, action, info.max_output_tokens);
    accounting.output = reply.len() as u64;
    guard.set_usage(accounting.input, accounting.cached, 0, 0);
    let id = random_id("resp_mock");
    let item_id = random_id("msg_mock");
    let ids = (id.as_str(), item_id.as_str());
    let created = now_secs();
    let done = responses::response_json(ids, created, model, info, &reply, Some(accounting));
    if info.store {
        shared
            .store
            .put(&id, done.clone(), &blocks, &reply, &shared.cache, min);
    }
    let cut = matches!(
        action.reset,
        Some(ResetPoint::MidStream | ResetPoint::Stall)
    );
    guard.set_status(200);
    if info.stream {
        let started = responses::response_json(ids, created, model, info, &reply, None);
        let events = responses::stream_events(ids, &started, &done, &reply);
        let cut_after = cut.then(|| action.after_chunks.unwrap_or(0));
        let stream = EventStream::new(events, cut_after, shared.config.chunk_delay)
            .stall(action.reset == Some(ResetPoint::Stall));
        return sse_response(shared, guard, stream);
    }
    let body = responses::to_bytes(&done);
    if cut {
        return cut_response(shared, guard, body);
    }
    respond(shared, guard, StatusCode::OK, body, reply.len() as u64)
}

/// A normal (possibly cut) completion or embeddings answer.
fn answer(
    shared: &Shared,
    mut guard: RecordGuard,
    endpoint: Endpoint,
    info: &RequestInfo,
    prefix: &[Block],
    action: &Action,
) -> Response<MockBody> {
    let model = info
        .model
        .as_deref()
        .or(shared.config.models.first().map(String::as_str))
        .unwrap_or("mock-model");
    let cut = matches!(
        action.reset,
        Some(ResetPoint::MidStream | ResetPoint::Stall)
    );
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
    let cached = shared
        .cache
        .automatic(prefix, shared.config.cache_min_tokens);
    guard.set_usage(info.prompt_tokens, cached, 0, 0);
    let reply = reply_for(shared, action, info.max_tokens);
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-mock{}", guard.seq()),
        _ => format!("cmpl-mock{}", guard.seq()),
    };
    let created = now_secs();
    guard.set_status(200);
    if let Some(call) = &info.tool_call {
        let call_id = format!("call_mock{}", guard.seq());
        let (prompt, cut_after) = (
            info.prompt_tokens,
            cut.then(|| action.after_chunks.unwrap_or(0)),
        );
        if info.stream {
            let events = tools::chat_stream_events(
                &id,
                created,
                model,
                &call_id,
                call,
                prompt,
                cached,
                info.include_usage,
            );
            let stream = EventStream::new(events, cut_after, shared.config.chunk_delay)
                .stall(action.reset == Some(ResetPoint::Stall));
            return sse_response(shared, guard, stream);
        }
        let body = tools::chat_body(&id, created, model, &call_id, call, prompt, cached);
        if cut {
            return cut_response(shared, guard, body);
        }
        return respond(shared, guard, StatusCode::OK, body, call.tokens());
    }
    if info.stream {
        let writer = ChunkWriter::new(endpoint, &id, created, model, info.include_usage);
        let cut_after = cut.then(|| action.after_chunks.unwrap_or(0));
        let stream = super::body::SseStream::new(
            writer,
            reply,
            info.prompt_tokens,
            cached,
            info.include_usage,
            cut_after,
            shared.config.chunk_delay,
        )
        .stall(action.reset == Some(ResetPoint::Stall));
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
    let body = openai::completion_body(
        endpoint,
        &id,
        created,
        model,
        &reply,
        info.prompt_tokens,
        cached,
    );
    if cut {
        return cut_response(shared, guard, body);
    }
    respond(shared, guard, StatusCode::OK, body, reply.len() as u64)
}

/// An answer with a scripted status and/or body.
fn scripted_status(
    shared: &Shared,
    guard: RecordGuard,
    action: &Action,
    anthropic_shape: bool,
) -> Response<MockBody> {
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
            let body = if anthropic_shape {
                anthropic::error_body(status.as_u16(), &message)
            } else {
                openai::error_body(status.as_u16(), &message)
            };
            (body, JSON)
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
    guard.add_response_bytes(&body);
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
    if shared.config.account_headers {
        for (name, value) in ACCOUNT_HEADERS {
            h.append(*name, HeaderValue::from_static(value));
        }
    }
    resp
}

/// What [`MockConfig::account_headers`](super::MockConfig::account_headers) adds.
pub const ACCOUNT_HEADERS: &[(&str, &str)] = &[
    (
        "set-cookie",
        "__cf_bm=mock-session; path=/; expires=Tue, 01-Dec-2026 23:59:59 GMT; domain=.api.openai.com; HttpOnly; Secure; SameSite=None",
    ),
    (
        "set-cookie",
        "_cfuvid=mock-visitor; path=/; domain=.api.openai.com; HttpOnly; Secure; SameSite=None",
    ),
    ("openai-organization", "org-mockaccount"),
    ("openai-project", "proj_mockproject"),
    ("openai-processing-ms", "12"),
    (
        "anthropic-organization-id",
        "11111111-2222-3333-4444-555555555555",
    ),
    ("x-ratelimit-remaining-requests", "4999"),
    ("anthropic-ratelimit-requests-remaining", "4999"),
];

fn header_list(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
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

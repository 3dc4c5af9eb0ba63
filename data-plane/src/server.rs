//! The HTTP server: accepts connections, serves health, readiness and
//! metrics, hands `/v1/*` to the tower stack, and protects itself from bad
//! clients and from its own bugs.
//!
//! - HTTP/1.1 with keep-alive and `TCP_NODELAY` (HTTP/1.1 only: there are
//!   no HTTP/2 client connections to ping or stream limits to set).
//! - A per-connection watchdog closes connections idle longer than the idle
//!   timeout and those that take longer than the header timeout to send a
//!   complete request head — counted from the connection's start for its
//!   first request (a connection that sends nothing) and from the first
//!   byte for later ones (slowloris). A plain-HTTP connection closed for
//!   its head is answered 408 in OpenAI format first. Body reads have their
//!   own timeout in the route layer (408).
//! - A connection cap ([`ConnTable`], `--max-connections`): at the cap a new
//!   connection closes the connection idle longest (one that never sent a
//!   request first) to make room, so idle connections cannot lock clients
//!   or probes out. With every connection busy, a reserve above the cap is
//!   served `/healthz`, `/readyz` and `/metrics` only (503 and
//!   `Connection: close` for the rest), and beyond the reserve a new
//!   connection is closed at once. `claw_dp_connections_open`,
//!   `claw_dp_connections_rejected_total`. The accept queue is as deep as
//!   the kernel allows ([`claw_tls::listener::ACCEPT_BACKLOG`]), so a burst waits there while
//!   the accept loop catches up.
//! - A panic in a handler becomes a 500 for that request only.
//! - On shutdown, in three phases each logged once: `/readyz` answers 503
//!   at once while new connections are still accepted and served for the
//!   drain delay (so load balancers notice before anything is refused);
//!   then the listener closes and in-flight requests and streams get up to
//!   the drain timeout; then the server returns. Responses once shutdown
//!   has started carry `Connection: close`, so keep-alive clients
//!   reconnect (elsewhere) for their next request.
//! - `/metrics` is served on the API port, or — given a separate metrics
//!   listener (`--metrics-addr`) — only there (plain HTTP, with `/healthz`),
//!   and the API port answers it 404.

use claw_tls::listener::deepen_backlog;
use std::convert::Infallible;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use claw_tls::tokio_rustls::TlsAcceptor;
use futures::FutureExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::auth::{Auth, AuthLayer};
use crate::body::{BoxError, ProxyBody};
use crate::config::ServerLimits;
use crate::cooldown::Cooldowns;
use crate::error::ApiError;
use crate::io::{ActiveGuard, ConnState, HyperAnswers, MAX_HEAD_BYTES, MAX_URI_BYTES, Watched};
use crate::limits::{Limits, LimitsLayer};
use crate::retry::{Retry, RetryLayer};
use crate::route::{RouteLayer, RouteService};
use crate::snapshot::SnapshotStore;
use crate::target::RequestId;
use crate::tls::HANDSHAKE_TIMEOUT;
use crate::upstream::Upstream;

/// The request path: auth → limits → route → retry → upstream.
pub(crate) type Stack = Auth<Limits<RouteService<Retry<Upstream>>>>;

/// Builds the tower stack.
pub(crate) fn stack(
    store: SnapshotStore,
    limits: &ServerLimits,
    retry: RetryLayer,
    upstream: Upstream,
) -> Stack {
    tower::ServiceBuilder::new()
        .layer(AuthLayer::new(store))
        .layer(LimitsLayer)
        .layer(
            RouteLayer::new(limits.max_body_bytes, limits.body_timeout)
                .with_budget(limits.body_budget.clone())
                .with_write_timeout(limits.write_timeout),
        )
        .layer(retry)
        .service(upstream)
}

/// What every connection shares, across all serving threads.
pub(crate) struct AppState {
    /// Current snapshot.
    pub store: SnapshotStore,
    /// Cooldown handle (for the active-cooldowns gauge).
    pub cooldowns: Cooldowns,
    /// Set once shutdown starts.
    pub draining: AtomicBool,
    /// Server limits.
    pub limits: ServerLimits,
}

/// What one serving thread owns: the shared state and its own request
/// stack (with its own upstream connection pool, so a request's upstream
/// connection is driven by the thread that serves its client).
struct Worker {
    app: Arc<AppState>,
    stack: Stack,
    /// Set when the listener speaks TLS.
    tls: Option<TlsAcceptor>,
    /// Whether `/metrics` is served here (false when it has its own listener).
    metrics_here: bool,
    /// Open connections, for the cap.
    conns: Arc<ConnTable>,
}

/// Open connections on the API listener.
const CONNECTIONS_OPEN: &str = "claw_dp_connections_open";
/// Connections refused at the cap: closed at accept, or answered 503 in
/// the reserve.
const CONNECTIONS_REJECTED: &str = "claw_dp_connections_rejected_total";
/// Idle connections closed to make room for a new one at the cap.
const CONNECTIONS_EVICTED: &str = "claw_dp_connections_evicted_total";

fn describe_connection_metrics() {
    metrics::describe_gauge!(
        CONNECTIONS_OPEN,
        "Open client connections on the API listener"
    );
    metrics::describe_counter!(
        CONNECTIONS_REJECTED,
        "Client connections refused at the connection cap (closed at accept or answered 503)"
    );
    metrics::describe_counter!(
        CONNECTIONS_EVICTED,
        "Idle client connections closed to make room for a new one at the connection cap"
    );
}

/// How an accepted connection is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Below the cap (or room was made).
    Normal,
    /// In the reserve above the cap: probes and metrics only.
    Reserve,
    /// Beyond the reserve: closed at once.
    Reject,
}

/// The API listener's open connections and the cap on them.
pub(crate) struct ConnTable {
    max: usize,
    reserve: usize,
    open: AtomicUsize,
    /// Open connections chosen to close, not closed yet.
    evicting: AtomicUsize,
    next_id: AtomicU64,
    /// Connections that may be closed to make room (not the reserve's).
    conns: parking_lot::Mutex<std::collections::HashMap<u64, Arc<ConnState>>>,
}

impl ConnTable {
    fn new(max: usize) -> Self {
        let max = max.max(1);
        ConnTable {
            max,
            // Enough for a few probes, scrapes and the connections being
            // closed to make room while a burst arrives.
            reserve: (max / 16).clamp(16, 256),
            open: AtomicUsize::new(0),
            evicting: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            conns: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Decides how a new connection is served, counting it as open unless
    /// it is rejected. Connections already chosen to close (closing within
    /// moments) do not count against the cap, so a burst does not refuse
    /// probes while they go; twice the cap bounds descriptors regardless.
    fn admit(&self) -> Admit {
        let open = self.open();
        let live = open.saturating_sub(self.evicting.load(Ordering::Relaxed));
        let admit = if open >= 2 * self.max + self.reserve {
            Admit::Reject
        } else if live < self.max || self.evict_one() {
            Admit::Normal
        } else if live < self.max + self.reserve {
            Admit::Reserve
        } else {
            Admit::Reject
        };
        match admit {
            Admit::Reject => metrics::counter!(CONNECTIONS_REJECTED).increment(1),
            _ => {
                self.open.fetch_add(1, Ordering::Relaxed);
            }
        }
        admit
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// A connection chosen to close (see [`ConnTable::evict_one`]) closed.
    fn evicted_closed(&self) {
        self.evicting.fetch_sub(1, Ordering::Relaxed);
    }

    fn register(&self, state: &Arc<ConnState>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().insert(id, state.clone());
        id
    }

    fn deregister(&self, id: u64) {
        self.conns.lock().remove(&id);
    }

    /// Closes the idle connection that is the best to lose — one that never
    /// sent a request, then the one idle longest. False when every
    /// connection is busy.
    fn evict_one(&self) -> bool {
        let conns = self.conns.lock();
        let victim = conns
            .values()
            .filter(|c| c.active.load(Ordering::Acquire) == 0 && !c.evicted.load(Ordering::Acquire))
            .min_by_key(|c| (c.served.load(Ordering::Acquire), c.idle_at()));
        match victim {
            Some(c) => {
                c.evicted.store(true, Ordering::Release);
                self.evicting.fetch_add(1, Ordering::Relaxed);
                c.evict.notify_one();
                metrics::counter!(CONNECTIONS_EVICTED).increment(1);
                true
            }
            None => false,
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn metrics_response(state: &AppState, conns: &ConnTable) -> Response<ProxyBody> {
    crate::metrics::set_cooldowns_active(state.cooldowns.active(Instant::now()));
    metrics::gauge!(CONNECTIONS_OPEN).set(conns.open() as f64);
    let mut r = Response::new(ProxyBody::full(crate::metrics::render()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// The separate metrics listener's routes: `/metrics` and `/healthz`.
fn handle_metrics(
    state: &AppState,
    conns: &ConnTable,
    req: &Request<Incoming>,
) -> Response<ProxyBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => metrics_response(state, conns),
        (_, "/healthz") => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves the metrics listener (plain HTTP/1.1) until the task is aborted.
/// Each connection is closed after the header or idle timeout like the API
/// port's, so a scraper cannot hold it open forever.
async fn serve_metrics(
    listener: TcpListener,
    state: Arc<AppState>,
    builder: Arc<http1::Builder>,
    conns: Arc<ConnTable>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _peer)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (state, builder, conns) = (state.clone(), builder.clone(), conns.clone());
        tokio::spawn(async move {
            let conn_state = Arc::new(ConnState::new());
            let io = Watched::new(stream, conn_state.clone(), true, state.limits.write_timeout);
            let io = HyperAnswers::new(io, conn_state.clone());
            let cs = conn_state.clone();
            let st = state.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let _guard = cs.begin();
                let res = handle_metrics(&st, &conns, &req);
                async move { Ok::<_, Infallible>(res) }
            });
            tokio::select! {
                r = builder.serve_connection(TokioIo::new(io), svc) => if let Err(e) = r {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                },
                _ = watchdog(conn_state, state.limits.clone()) => {}
            }
        });
    }
}

/// [`handle`] with the request's [`RequestId`] set as an extension and
/// returned as `x-request-id` on every answer.
async fn with_request_id(
    worker: Arc<Worker>,
    mut req: Request<Incoming>,
    reserve: bool,
) -> Response<ProxyBody> {
    let id = RequestId::of(req.headers());
    req.extensions_mut().insert(id.clone());
    let mut res = handle(worker, req, reserve).await;
    res.headers_mut()
        .insert(RequestId::HEADER, id.header_value());
    res
}

/// 503 for an API request on a reserve connection (the proxy is at its
/// connection cap with every connection busy).
fn at_connection_cap(path: &str) -> Response<ProxyBody> {
    metrics::counter!(CONNECTIONS_REJECTED).increment(1);
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "The proxy is at its connection limit; retry shortly.".into(),
        kind: "service_unavailable",
        param: None,
        code: Some("too_many_connections"),
        retry_after: Some(1),
    }
    .into_response_for(crate::error::Wire::for_path(path))
}

async fn handle(worker: Arc<Worker>, req: Request<Incoming>, reserve: bool) -> Response<ProxyBody> {
    let state = &worker.app;
    let path = req.uri().path();
    let target_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target_len > MAX_URI_BYTES {
        crate::metrics::request("", "", crate::metrics::status_label(414));
        return ApiError::uri_too_long(MAX_URI_BYTES)
            .into_response_for(crate::error::Wire::for_path(path));
    }
    match path {
        "/healthz" => return text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            return if state.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if state.store.load().is_none() {
                text(StatusCode::SERVICE_UNAVAILABLE, "no configuration yet\n")
            } else {
                text(StatusCode::OK, "ready\n")
            };
        }
        "/metrics" if worker.metrics_here && req.method() == Method::GET => {
            return metrics_response(state, &worker.conns);
        }
        p if reserve => return at_connection_cap(p),
        p if p.starts_with("/v1/") => {}
        _ => return ApiError::not_found().into_response(),
    }
    let wire = crate::error::Wire::for_path(path);
    let fut = worker.stack.clone().oneshot(req);
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(Ok(res)) => res,
        Ok(Err(never)) => match never {},
        Err(_) => {
            tracing::error!("request handler panicked");
            ApiError::internal().into_response_for(wire)
        }
    }
}

/// Resolves when the connection should be closed for idleness, a slow
/// head, or to make room at the connection cap.
async fn watchdog(state: Arc<ConnState>, limits: ServerLimits) {
    let header_ms = limits.header_timeout.as_millis() as u64;
    let idle_ms = limits.idle_timeout.as_millis() as u64;
    let tick = header_ms.min(idle_ms).max(10);
    loop {
        if state.evicted.load(Ordering::Acquire) && state.active.load(Ordering::Acquire) == 0 {
            tracing::debug!("closing an idle connection to make room at the connection cap");
            return;
        }
        let now = state.now_ms();
        let wake = if state.active.load(Ordering::Acquire) > 0 {
            now + tick
        } else {
            let pending = state.pending_since.load(Ordering::Acquire);
            let deadline = if pending != 0 {
                pending - 1 + header_ms
            } else {
                state.idle_since.load(Ordering::Acquire) + idle_ms
            };
            if now >= deadline {
                if pending != 0 {
                    // The head is late: the connection's reads end (after
                    // a 408, see `crate::io::Watched`). Yielding re-polls the
                    // connection at once; the sleep bounds how long it may
                    // take to close.
                    state.timed_out.store(true, Ordering::Release);
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                return;
            }
            deadline.min(now + tick)
        };
        tokio::select! {
            _ = tokio::time::sleep_until(state.base + Duration::from_millis(wake)) => {}
            _ = state.evict.notified() => {}
        }
    }
}

/// The body written to the client: the response plus the connection's
/// activity guard, released when the body is done.
struct Guarded {
    body: ProxyBody,
    _guard: ActiveGuard,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // Dropped because the client stopped reading: the upstream goes now
        // (not drained for the request deadline), counted once.
        if self._guard.0.write_timed_out() && self.body.abandon() {
            crate::metrics::write_timeout();
        }
    }
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How connections are spread over serving threads.
///
/// Each serving thread runs its own single-threaded tokio runtime with its
/// own request stack and upstream connection pool: a request — the client
/// connection, the stack, the upstream connection that answers it — stays
/// on one thread, with no cross-thread wake-ups (the multi-threaded
/// runtime's work stealing moved the upstream connection's task to the other
/// core and back, which showed in the latency tail). One accept loop hands
/// each new connection to the thread with the fewest open connections.
pub(crate) struct Workers {
    /// Number of serving threads (at least 1).
    pub threads: usize,
    /// Builds one thread's request stack.
    pub make_stack: Box<dyn Fn() -> anyhow::Result<Stack> + Send + Sync>,
    /// Serve TLS with this configuration (see [`crate::tls`]) instead of
    /// plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The accept loop's handle on one serving thread.
struct WorkerHandle {
    conns: mpsc::UnboundedSender<(std::net::TcpStream, Admit)>,
    open: Arc<AtomicUsize>,
    done: oneshot::Receiver<()>,
}

fn spawn_worker(
    index: usize,
    worker: Worker,
    builder: Arc<http1::Builder>,
) -> anyhow::Result<WorkerHandle> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (done_tx, done) = oneshot::channel();
    let open = Arc::new(AtomicUsize::new(0));
    let open_w = open.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a serving thread's runtime")?;
    std::thread::Builder::new()
        .name(format!("claw-dp-serve-{index}"))
        .spawn(move || {
            runtime.block_on(serve_worker(rx, Arc::new(worker), builder, open_w));
            // Dropping the runtime cancels what is left after the drain
            // deadline (abandoned-stream drains, idle pool connections).
            drop(runtime);
            let _ = done_tx.send(());
        })
        .context("starting a serving thread")?;
    Ok(WorkerHandle {
        conns: tx,
        open,
        done,
    })
}

/// One serving thread: serves the connections it is handed until the
/// accept loop closes the channel, then drains.
async fn serve_worker(
    mut conns: mpsc::UnboundedReceiver<(std::net::TcpStream, Admit)>,
    worker: Arc<Worker>,
    builder: Arc<http1::Builder>,
    open: Arc<AtomicUsize>,
) {
    let graceful = GracefulShutdown::new();
    while let Some((stream, admit)) = conns.recv().await {
        let stream = match TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                open.fetch_sub(1, Ordering::Relaxed);
                worker.conns.closed();
                tracing::warn!(error = %e, "could not register an accepted connection");
                continue;
            }
        };
        let conn_state = Arc::new(ConnState::new());
        let reserve = admit == Admit::Reserve;
        // Reserve connections are not closed to make room: they are few and
        // answer one request each.
        let id = (!reserve).then(|| worker.conns.register(&conn_state));
        let io = Watched::new(
            stream,
            conn_state.clone(),
            worker.tls.is_none(),
            worker.app.limits.write_timeout,
        );
        // Subscribed now, so a shutdown that starts during a TLS handshake
        // still reaches this connection.
        let watcher = graceful.watcher();
        let (worker, builder, open) = (worker.clone(), builder.clone(), open.clone());
        tokio::spawn(async move {
            let ended = conn_state.clone();
            match worker.tls.clone() {
                None => serve_connection(io, conn_state, &worker, &builder, watcher, reserve).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                        Ok(Ok(tls)) => {
                            serve_connection(tls, conn_state, &worker, &builder, watcher, reserve)
                                .await
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            if let Some(id) = id {
                worker.conns.deregister(id);
            }
            if ended.evicted.load(Ordering::Acquire) {
                worker.conns.evicted_closed();
            }
            worker.conns.closed();
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    if tokio::time::timeout(worker.app.limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed with requests still in flight");
    }
}

/// Serves HTTP/1.1 on one (plain or TLS) connection until it ends, is idle
/// or slow for too long, or is drained.
async fn serve_connection<I>(
    io: I,
    conn_state: Arc<ConnState>,
    worker: &Arc<Worker>,
    builder: &http1::Builder,
    watcher: Watcher,
    reserve: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let w = worker.clone();
    let cs = conn_state.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let guard = cs.begin();
        let w = w.clone();
        async move {
            let draining = w.app.draining.load(Ordering::Relaxed);
            let mut res = with_request_id(w, req, reserve).await;
            if draining || reserve {
                // Shutting down: this connection closes after the response,
                // so a keep-alive client reconnects (to another pod) for
                // its next request instead of racing the drain.
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(res.map(|body| Guarded {
                body,
                _guard: guard,
            }))
        }
    });
    let io = HyperAnswers::new(io, conn_state.clone());
    let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), svc));
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!(error = %e, "connection ended with an error");
        },
        _ = watchdog(conn_state, worker.app.limits.clone()) => {
            tracing::debug!("closing idle or slow connection");
        }
    }
}

/// The serving thread with the fewest open connections; ties go to the
/// first one at or after `next` (round-robin).
fn least_loaded(handles: &[WorkerHandle], next: usize) -> usize {
    let n = handles.len();
    let open = |i: usize| handles[i].open.load(Ordering::Relaxed);
    (0..n)
        .map(|k| (next + k) % n)
        .min_by_key(|&i| open(i))
        .unwrap_or(0)
}

/// Serves `listener` on `workers.threads` serving threads until `shutdown`
/// resolves; then answers `/readyz` with 503 at once, keeps accepting for
/// the drain delay, stops accepting and lets in-flight requests and streams
/// finish up to the drain timeout. With `metrics`, `/metrics` is served
/// there (until the drain ends) instead of on `listener`.
/// `stopped_accepting` runs once the listener is closed, before the drain
/// (the proxy leaves the fleet's rate shares there, [`crate::Fleet::leave`]).
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    state: Arc<AppState>,
    workers: Workers,
    shutdown: impl std::future::Future<Output = ()>,
    stopped_accepting: impl FnOnce(),
) -> anyhow::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(256 * 1024);
    let builder = Arc::new(builder);
    describe_connection_metrics();
    crate::stream::set_idle_timeout(state.limits.stream_idle_timeout);
    let conns = Arc::new(ConnTable::new(state.limits.max_connections));
    deepen_backlog(&listener, "api");
    if let Some(m) = &metrics {
        deepen_backlog(m, "metrics");
    }
    let mut handles = Vec::with_capacity(workers.threads.max(1));
    for i in 0..workers.threads.max(1) {
        let worker = Worker {
            app: state.clone(),
            stack: (workers.make_stack)()?,
            tls: workers.tls.clone().map(TlsAcceptor::from),
            metrics_here: metrics.is_none(),
            conns: conns.clone(),
        };
        handles.push(spawn_worker(i, worker, builder.clone())?);
    }
    tracing::debug!(threads = handles.len(), "serving threads started");
    let metrics_task = metrics.map(|l| {
        tokio::spawn(serve_metrics(
            l,
            state.clone(),
            builder.clone(),
            conns.clone(),
        ))
    });
    let mut next = 0usize;
    let mut failed = None;
    let drain_delay = state.limits.drain_delay;
    // Set when shutdown starts: the end of the drain delay.
    let mut stop_accepting: Option<Pin<Box<tokio::time::Sleep>>> = None;
    tokio::pin!(shutdown);
    loop {
        let shutting_down = stop_accepting.is_some();
        let delay_over = async {
            match stop_accepting.as_mut() {
                Some(sleep) => sleep.await,
                None => std::future::pending().await,
            }
        };
        let step = tokio::select! {
            _ = &mut shutdown, if !shutting_down => Step::Shutdown,
            _ = delay_over => Step::DelayOver,
            accepted = listener.accept() => Step::Accepted(accepted),
        };
        let (stream, _peer) = match step {
            Step::Shutdown => {
                state.draining.store(true, Ordering::Relaxed);
                if drain_delay.is_zero() {
                    break;
                }
                tracing::info!(
                    drain_delay = ?drain_delay,
                    "shutting down: /readyz answers 503, still accepting connections for the drain delay"
                );
                stop_accepting = Some(Box::pin(tokio::time::sleep(drain_delay)));
                continue;
            }
            Step::DelayOver => break,
            Step::Accepted(Ok(s)) => s,
            Step::Accepted(Err(e)) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admit = conns.admit();
        if admit == Admit::Reject {
            tracing::debug!("connection cap and its reserve reached: closing a new connection");
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                conns.closed();
                tracing::warn!(error = %e, "could not hand over an accepted connection");
                continue;
            }
        };
        match dispatch(&mut handles, &mut next, stream, admit) {
            Ok(()) => {}
            Err(gone) => {
                failed = Some(gone);
                break;
            }
        }
    }
    drop(listener);
    state.draining.store(true, Ordering::Relaxed);
    tracing::info!(
        drain_timeout = ?state.limits.drain_timeout,
        "stopped accepting connections; draining in-flight requests"
    );
    stopped_accepting();
    let mut done = Vec::with_capacity(handles.len());
    for h in handles {
        drop(h.conns);
        done.push(h.done);
    }
    for d in done {
        // The thread's drain has its own deadline; an error means it ended early.
        let _ = d.await;
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    tracing::info!("drained");
    match failed {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// What woke the accept loop.
enum Step {
    Shutdown,
    DelayOver,
    Accepted(io::Result<(TcpStream, std::net::SocketAddr)>),
}

/// Hands `stream` to the least-loaded serving thread. A thread that is gone
/// (it can only end by panicking) is dropped from `handles` and the next one
/// tried; with none left the error stops the server, so that its supervisor
/// restarts it instead of it accepting connections nobody serves.
fn dispatch(
    handles: &mut Vec<WorkerHandle>,
    next: &mut usize,
    mut stream: std::net::TcpStream,
    admit: Admit,
) -> anyhow::Result<()> {
    while !handles.is_empty() {
        let best = least_loaded(handles, *next);
        *next = best + 1;
        let h = &handles[best];
        h.open.fetch_add(1, Ordering::Relaxed);
        match h.conns.send((stream, admit)) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::SendError((back, _))) => {
                stream = back;
                tracing::error!(
                    thread = best,
                    left = handles.len() - 1,
                    "a serving thread is gone"
                );
                handles.remove(best);
            }
        }
    }
    anyhow::bail!("every serving thread is gone")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handles(open: &[usize]) -> Vec<WorkerHandle> {
        open.iter()
            .map(|&n| WorkerHandle {
                conns: mpsc::unbounded_channel().0,
                open: Arc::new(AtomicUsize::new(n)),
                done: oneshot::channel().1,
            })
            .collect()
    }

    #[test]
    fn connections_go_to_the_least_loaded_thread_ties_round_robin() {
        assert_eq!(least_loaded(&handles(&[3, 1, 2]), 0), 1);
        assert_eq!(least_loaded(&handles(&[3, 1, 2]), 2), 1);
        // Ties: the first at or after `next`.
        assert_eq!(least_loaded(&handles(&[0, 0, 0]), 0), 0);
        assert_eq!(least_loaded(&handles(&[0, 0, 0]), 1), 1);
        assert_eq!(least_loaded(&handles(&[0, 0, 0]), 5), 2);
        assert_eq!(least_loaded(&handles(&[1]), 7), 0);
    }

    #[test]
    fn a_burst_of_connections_is_spread_evenly() {
        let hs = handles(&[0, 0]);
        let mut next = 0;
        for _ in 0..64 {
            let i = least_loaded(&hs, next);
            hs[i].open.fetch_add(1, Ordering::Relaxed);
            next = i + 1;
        }
        assert_eq!(hs[0].open.load(Ordering::Relaxed), 32);
        assert_eq!(hs[1].open.load(Ordering::Relaxed), 32);
    }

    fn socket() -> std::net::TcpStream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect")
    }

    #[test]
    fn a_dead_serving_thread_is_skipped_and_none_left_is_an_error() {
        let (live_tx, mut live_rx) = mpsc::unbounded_channel();
        let (dead_tx, dead_rx) = mpsc::unbounded_channel();
        drop(dead_rx);
        let mut hs = vec![
            WorkerHandle {
                conns: dead_tx,
                open: Arc::new(AtomicUsize::new(0)),
                done: oneshot::channel().1,
            },
            WorkerHandle {
                conns: live_tx,
                open: Arc::new(AtomicUsize::new(5)),
                done: oneshot::channel().1,
            },
        ];
        let mut next = 0;
        // The dead thread has fewer connections, so it is tried first.
        dispatch(&mut hs, &mut next, socket(), Admit::Normal).expect("the live thread takes it");
        assert_eq!(hs.len(), 1);
        assert!(live_rx.try_recv().is_ok());
        assert_eq!(hs[0].open.load(Ordering::Relaxed), 6);
        drop(live_rx);
        let err = dispatch(&mut hs, &mut next, socket(), Admit::Normal).expect_err("nobody left");
        assert!(err.to_string().contains("every serving thread is gone"));
        assert!(hs.is_empty());
    }
}

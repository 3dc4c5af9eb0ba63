//! The HTTP server: accepts connections, serves health, readiness and
//! metrics, hands `/v1/*` to the tower stack, and protects itself from bad
//! clients and from its own bugs.
//!
//! - HTTP/1.1 with keep-alive and `TCP_NODELAY`.
//! - A per-connection watchdog closes connections idle longer than the idle
//!   timeout and those that take longer than the header timeout from the
//!   first byte of a request to its complete head (slowloris). Body reads
//!   have their own timeout in the route layer (408).
//! - A panic in a handler becomes a 500 for that request only.
//! - On shutdown: stop accepting, `/readyz` answers 503, in-flight requests
//!   and streams get up to the drain timeout, then the server returns.

use std::convert::Infallible;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::auth::{Auth, AuthLayer};
use crate::body::{BoxError, ProxyBody};
use crate::config::ServerLimits;
use crate::cooldown::Cooldowns;
use crate::error::ApiError;
use crate::limits::{Limits, LimitsLayer};
use crate::retry::{Retry, RetryLayer};
use crate::route::{RouteLayer, RouteService};
use crate::snapshot::SnapshotStore;
use crate::upstream::Upstream;

/// The request path: auth → limits → route → retry → upstream.
pub type Stack = Auth<Limits<RouteService<Retry<Upstream>>>>;

/// Builds the tower stack.
pub fn stack(
    store: SnapshotStore,
    limits: &ServerLimits,
    retry: RetryLayer,
    upstream: Upstream,
) -> Stack {
    tower::ServiceBuilder::new()
        .layer(AuthLayer::new(store))
        .layer(LimitsLayer)
        .layer(RouteLayer::new(limits.max_body_bytes, limits.body_timeout))
        .layer(retry)
        .service(upstream)
}

/// What every connection shares.
pub struct AppState {
    /// Current snapshot.
    pub store: SnapshotStore,
    /// Cooldown handle (for the active-cooldowns gauge).
    pub cooldowns: Cooldowns,
    /// Set once shutdown starts.
    pub draining: AtomicBool,
    /// The request path.
    pub stack: Stack,
    /// Server limits.
    pub limits: ServerLimits,
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path();
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
        "/metrics" if req.method() == Method::GET => {
            metrics::gauge!("claw_dp_cooldowns_active")
                .set(state.cooldowns.active(Instant::now()) as f64);
            let mut r = Response::new(ProxyBody::full(crate::metrics::render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return r;
        }
        p if p.starts_with("/v1/") => {}
        _ => return ApiError::not_found().into_response(),
    }
    let fut = state.stack.clone().oneshot(req);
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(Ok(res)) => res,
        Ok(Err(never)) => match never {},
        Err(_) => {
            tracing::error!("request handler panicked");
            ApiError::internal().into_response()
        }
    }
}

/// Per-connection activity, shared by the IO wrapper, the service and the watchdog.
struct ConnState {
    base: Instant,
    active: AtomicU32,
    /// Milliseconds since `base` when the connection last became idle.
    idle_since: AtomicU64,
    /// 1 + milliseconds since `base` of the first byte read while idle; 0 = none.
    pending_since: AtomicU64,
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            base: Instant::now(),
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            pending_since: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.pending_since.store(0, Ordering::Release);
        ActiveGuard(self.clone())
    }

    fn on_read(&self) {
        if self.active.load(Ordering::Acquire) == 0
            && self.pending_since.load(Ordering::Acquire) == 0
        {
            self.pending_since
                .store(self.now_ms() + 1, Ordering::Release);
        }
    }
}

/// Keeps a connection "active" until the response body is done.
struct ActiveGuard(Arc<ConnState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since.store(s.now_ms(), Ordering::Release);
        s.pending_since.store(0, Ordering::Release);
        s.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves when the connection should be closed for idleness or a slow head.
async fn watchdog(state: Arc<ConnState>, limits: ServerLimits) {
    let header_ms = limits.header_timeout.as_millis() as u64;
    let idle_ms = limits.idle_timeout.as_millis() as u64;
    let tick = header_ms.min(idle_ms).max(10);
    loop {
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
                return;
            }
            deadline.min(now + tick)
        };
        tokio::time::sleep_until(state.base + Duration::from_millis(wake)).await;
    }
}

/// A TCP stream that reports reads to its [`ConnState`].
struct Watched {
    io: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.on_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The body written to the client: the response plus the connection's
/// activity guard, released when the body is done.
struct Guarded {
    body: ProxyBody,
    _guard: ActiveGuard,
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

/// Serves `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(256 * 1024);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn_state = Arc::new(ConnState::new());
        let io = TokioIo::new(Watched {
            io: stream,
            state: conn_state.clone(),
        });
        let app = state.clone();
        let cs = conn_state.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let guard = cs.begin();
            let app = app.clone();
            async move {
                let res = handle(app, req).await;
                Ok::<_, Infallible>(res.map(|body| Guarded {
                    body,
                    _guard: guard,
                }))
            }
        });
        let conn = graceful.watch(builder.serve_connection(io, svc));
        let limits = state.limits.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                _ = watchdog(conn_state, limits) => {
                    tracing::debug!("closing idle or slow connection");
                }
            }
        });
    }
    drop(listener);
    state.draining.store(true, Ordering::Relaxed);
    tracing::info!("draining connections");
    if tokio::time::timeout(state.limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed with requests still in flight");
    }
}

//! The HTTP listener for operators and probes (hyper 1):
//!
//! - `GET /healthz`: `200 ok` while the store answers reads, `503` otherwise.
//! - `GET /metrics`: Prometheus text exposition (see [`crate::metrics`]).
//! - `POST /v1/heartbeat/runs/{run_id}/result`: a wake-mode agent runtime
//!   reports its run's result, authenticated by the run's callback token
//!   ([`crate::heartbeat::wake`]).
//! - everything else: the operator dashboard ([`crate::dashboard`]): the
//!   page at `/`, its JSON API and live events under `/api/v1/` (admin or
//!   viewer token required), `404` for unknown paths.
//!
//! Probes and metrics carry no secrets and need no token; bind the listener
//! to a private address all the same.
//! With TLS configured it speaks TLS only (probes: `scheme: HTTPS`).
//!
//! Connections are capped and timed out by [`crate::conn`]; a request head
//! must arrive within the header-read timeout (HTTP/1) and HTTP/2 clients
//! are pinged and limited in concurrent streams.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use claw_tls::tokio_rustls::TlsAcceptor;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use crate::catalog::Catalog;
use crate::conn::ConnTable;
use crate::dashboard::{self, Dashboard};
use crate::heartbeat::wake;
use crate::shutdown::Shutdown;

/// How long open connections get to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 pings: a vanished client is noticed within interval + timeout.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HTTP/2 streams per connection (a dashboard needs a few).
const H2_MAX_CONCURRENT_STREAMS: u32 = 64;

/// What the handlers need.
#[derive(Clone)]
pub(crate) struct HttpState {
    /// Checked by `/healthz`.
    pub catalog: Arc<Catalog>,
    /// Rendered by `/metrics`.
    pub metrics: PrometheusHandle,
    /// Everything else.
    pub dashboard: Dashboard,
    /// Takes wake-mode callbacks (`None`: they are answered 503).
    pub heartbeats: Option<crate::heartbeat::scheduler::SchedulerHandle>,
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// Routes one request.
pub(crate) fn respond<B>(state: &HttpState, request: &Request<B>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let method_ok = matches!(*request.method(), Method::GET | Method::HEAD);
    match request.uri().path() {
        "/healthz" | "/metrics" if !method_ok => text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "method not allowed\n",
        ),
        "/healthz" => match state.catalog.check() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ok\n"),
            Err(e) => {
                tracing::warn!(error = %e, "health check failed");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "store unavailable\n",
                )
            }
        },
        "/metrics" => {
            crate::metrics::record_catalog(&state.catalog);
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::render(&state.metrics),
            )
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    }
}

/// Routes one request: probes and metrics here, the rest to the dashboard.
async fn route(
    state: HttpState,
    request: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<dashboard::Body> {
    match request.uri().path() {
        "/healthz" | "/metrics" => respond(&state, &request).map(BodyExt::boxed_unsync),
        path if path.starts_with(wake::CALLBACK_PREFIX) => wake_callback(&state, request)
            .await
            .map(BodyExt::boxed_unsync),
        _ => state.dashboard.handle(request, peer).await,
    }
}

/// `POST /v1/heartbeat/runs/{run_id}/result` (see [`crate::heartbeat::wake`]).
async fn wake_callback(state: &HttpState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    use crate::heartbeat::wake::CallbackError;
    let Some(run_id) = wake::run_id_of(request.uri().path()).map(str::to_string) else {
        return wake::error_response(&CallbackError::NotFound(String::new()));
    };
    if request.method() != Method::POST {
        let mut r = wake::error_response(&CallbackError::BadRequest(
            "use POST for a run's result".into(),
        ));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return r;
    }
    let token = wake::bearer(request.headers().get(header::AUTHORIZATION));
    let body = match http_body_util::Limited::new(request.into_body(), wake::MAX_CALLBACK_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) => {
            return wake::error_response(&CallbackError::BadRequest(format!(
                "cannot read the body (at most {} bytes): {e}",
                wake::MAX_CALLBACK_BYTES
            )));
        }
    };
    let Some(heartbeats) = &state.heartbeats else {
        return wake::error_response(&CallbackError::Unavailable);
    };
    match heartbeats.report_wake(&run_id, token, body).await {
        Ok(run) => wake::ok_response(&run),
        Err(e) => {
            tracing::info!(run_id = %run_id, error = %e, "wake callback refused");
            wake::error_response(&e)
        }
    }
}

/// Serves HTTP (over TLS when `tls` is given) on `listener` until
/// `shutdown` turns true, then lets open connections finish (up to a
/// timeout).
pub(crate) async fn serve(
    listener: TcpListener,
    state: HttpState,
    tls: Option<Arc<rustls::ServerConfig>>,
    conns: Arc<ConnTable>,
    mut shutdown: Shutdown,
) {
    let header_timeout = conns.header_timeout();
    // Pings are traffic: at least three per idle timeout keep an idle but
    // healthy HTTP/2 connection from being closed as idle.
    let ping = H2_KEEPALIVE_INTERVAL.min(conns.idle_timeout() / 3);
    let graceful = GracefulShutdown::new();
    let mut incoming: Accepted = match tls.map(TlsAcceptor::from) {
        None => Box::pin(crate::conn::incoming(listener, conns, |s| {
            std::future::ready(Ok(Conn::Plain(s)))
        })),
        Some(acceptor) => Box::pin(crate::conn::incoming(listener, conns, move |s| {
            let accept = acceptor.accept(s);
            async move { accept.await.map(|t| Conn::Tls(Box::new(t))) }
        })),
    };
    loop {
        use tokio_stream::StreamExt as _;
        tokio::select! {
            accepted = incoming.next() => {
                let Some(Ok((conn, peer))) = accepted else { break };
                let (state, watcher) = (state.clone(), graceful.watcher());
                tokio::spawn(async move {
                    match conn {
                        Conn::Plain(s) => serve_connection(s, state, watcher, peer, header_timeout, ping).await,
                        Conn::Tls(s) => serve_connection(*s, state, watcher, peer, header_timeout, ping).await,
                    }
                });
            }
            () = shutdown.stopped() => break,
        }
    }
    // Dropping the stream stops accepting and closes the listener.
    drop(incoming);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("http connections did not close in time");
        }
    }
}

/// The accepted connections, plain or TLS.
type Accepted = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = std::io::Result<(Conn, std::net::SocketAddr)>> + Send>,
>;

/// An accepted HTTP connection, plain or TLS.
enum Conn {
    Plain(crate::conn::Limited<tokio::net::TcpStream>),
    Tls(
        Box<claw_tls::tokio_rustls::server::TlsStream<crate::conn::Limited<tokio::net::TcpStream>>>,
    ),
}

/// Serves one (plain or TLS) connection, ending it gracefully on shutdown.
async fn serve_connection<S>(
    stream: S,
    state: HttpState,
    watcher: Watcher,
    peer: std::net::SocketAddr,
    header_timeout: Duration,
    ping: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Request heads are timed by `Heads` (hyper's header-read timeout
    // would also close idle keep-alive connections between requests).
    let heads = crate::conn::HeadState::new();
    let stream = crate::conn::Heads::new(stream, heads.clone(), header_timeout);
    let service = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        let handling = heads.begin();
        async move {
            let res = route(state, req, peer).await;
            drop(handling);
            Ok::<_, Infallible>(res)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(ping)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT.min(ping))
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
}

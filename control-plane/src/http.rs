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

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use claw_tls::tokio_rustls::TlsAcceptor;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use crate::catalog::Catalog;
use crate::dashboard::{self, Dashboard};
use crate::heartbeat::wake;
use crate::shutdown::Shutdown;

/// How long open connections get to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

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
    mut shutdown: Shutdown,
) {
    let tls = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (state, tls, watcher) = (state.clone(), tls.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let Some(tls) = tls else {
                        return serve_connection(stream, state, watcher, peer).await;
                    };
                    let handshake = tls.accept(stream);
                    match tokio::time::timeout(claw_tls::server::HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => serve_connection(stream, state, watcher, peer).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
            () = shutdown.stopped() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("http connections did not close in time");
        }
    }
}

/// Serves one (plain or TLS) connection, ending it gracefully on shutdown.
async fn serve_connection<S>(
    stream: S,
    state: HttpState,
    watcher: Watcher,
    peer: std::net::SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(state, req, peer).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
}

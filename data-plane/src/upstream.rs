//! The upstream side: the pooled HTTP client, header hygiene and the
//! innermost tower service that sends one attempt to one backend.
//!
//! The client is hyper-util's pooled client (keep-alive, `TCP_NODELAY`) over
//! rustls with the webpki roots, so `https://` providers work out of the box.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;

/// The pooled upstream client.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the upstream client.
pub fn client() -> anyhow::Result<HttpClient> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(https))
}

/// Why an attempt produced no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The connection could not be established (nothing was sent).
    #[error("connect error")]
    Connect,
    /// No response headers within the timeout.
    #[error("timeout")]
    Timeout,
    /// The connection failed after the request was sent.
    #[error("upstream connection failed")]
    Failed,
}

impl UpstreamError {
    /// Label for `claw_dp_upstream_attempts_total{outcome}`.
    pub fn label(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect_error",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Failed => "failed",
        }
    }
}

/// One attempt: a fully built request and its timeout.
#[derive(Debug)]
pub struct Attempt {
    /// The request to send.
    pub request: Request<Full<Bytes>>,
    /// Time allowed until response headers.
    pub timeout: Duration,
}

/// The innermost service: sends an [`Attempt`].
#[derive(Clone)]
pub struct Upstream {
    client: HttpClient,
}

impl Upstream {
    /// A service over `client`.
    pub fn new(client: HttpClient) -> Self {
        Upstream { client }
    }
}

impl Service<Attempt> for Upstream {
    type Response = Response<Incoming>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, a: Attempt) -> Self::Future {
        let fut = self.client.request(a.request);
        Box::pin(async move {
            match tokio::time::timeout(a.timeout, fut).await {
                Err(_) => Err(UpstreamError::Timeout),
                Ok(Ok(res)) => Ok(res),
                Ok(Err(e)) if e.is_connect() => {
                    tracing::debug!(error = %e, "upstream connect failed");
                    Err(UpstreamError::Connect)
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "upstream request failed");
                    Err(UpstreamError::Failed)
                }
            }
        })
    }
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers: the standard ones, every `proxy-*` header and
/// those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
    if headers.keys().any(|k| k.as_str().starts_with("proxy-")) {
        let proxy: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for n in proxy {
            headers.remove(n);
        }
    }
}

/// The headers sent upstream, minus the backend's `Authorization`: the
/// client's headers without hop-by-hop ones, `host`, its credentials,
/// `content-length` (recomputed) and `accept-encoding` (so the proxy sees
/// plain bodies for SSE error events and usage).
pub fn upstream_headers(mut h: HeaderMap) -> HeaderMap {
    strip_hop_by_hop(&mut h);
    for n in [
        header::HOST,
        header::AUTHORIZATION,
        header::CONTENT_LENGTH,
        header::ACCEPT_ENCODING,
        HeaderName::from_static("api-key"),
        HeaderName::from_static("x-api-key"),
    ] {
        h.remove(n);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_and_credentials_are_stripped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-custom-hop"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("proxy-foo", "1"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-custom-hop", "1"),
            ("host", "proxy.local"),
            ("authorization", "Bearer client-secret"),
            ("x-api-key", "client-secret"),
            ("content-length", "12"),
            ("x-claw-agent-id", "agent-7"),
            ("x-claw-priority", "background"),
            ("content-type", "application/json"),
            ("user-agent", "test"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = upstream_headers(h.clone());
        let mut keys: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            vec![
                "content-type",
                "user-agent",
                "x-claw-agent-id",
                "x-claw-priority"
            ]
        );
    }

    #[test]
    fn client_builds() {
        assert!(client().is_ok());
    }
}

//! The upstream side: the connection pool, header hygiene and the
//! innermost tower service that sends one attempt to one backend.
//!
//! Connections are made by hyper-rustls's connector (`TCP_NODELAY`, TCP
//! keep-alive, rustls with the webpki roots, so `https://` providers work
//! out of the box) and driven by hyper's HTTP/1 client connection. Each
//! serving thread keeps its own pool of idle connections per upstream
//! (scheme and authority), so a request and the connection that carries it
//! stay on one thread:
//!
//! - checkout takes the most recently used idle connection that is still
//!   open and not older than [`IDLE_TIMEOUT`], else connects;
//! - a connection goes back once its response has been read to the end
//!   (and only if it can carry another request), at most
//!   [`MAX_IDLE_PER_UPSTREAM`] per upstream;
//! - a request that a reused connection gives back unsent (the upstream
//!   closed it while idle) goes out again on a new connection.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower::Service;

use crate::stream::BoxError;

/// An idle connection older than this is closed instead of reused.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle connections kept per upstream (and serving thread).
pub(crate) const MAX_IDLE_PER_UPSTREAM: usize = 1024;

/// Makes upstream connections (TCP, and TLS for `https://`).
pub(crate) type Connector = HttpsConnector<HttpConnector>;

type Sender = http1::SendRequest<Full<Bytes>>;

/// Builds the upstream connector.
pub(crate) fn connector() -> anyhow::Result<Connector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

/// Where a backend's requests go: its base URL split once, when the
/// snapshot is compiled, so that an attempt builds its URI and `Host`
/// without formatting and re-parsing the whole URL.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    /// `scheme://authority/`: what the connector dials.
    origin: Uri,
    /// `scheme://authority`: the pool's key.
    pool_key: Arc<str>,
    /// The base URL's path without a trailing slash (`/v1`; empty for `/`).
    base_path: String,
    /// The base URL's query, if any (kept before the client's).
    base_query: Option<String>,
    /// `Host`: the authority without a default port.
    host: HeaderValue,
}

impl UpstreamTarget {
    /// Splits an absolute `http(s)` base URL; `None` if it is not one.
    pub fn parse(base_url: &str) -> Option<UpstreamTarget> {
        let uri: Uri = base_url.parse().ok()?;
        let scheme = uri.scheme()?.clone();
        let authority = uri.authority()?.clone();
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(p) if p == default_port => authority.host(),
            _ => authority.as_str(),
        };
        let mut origin = http::uri::Parts::default();
        origin.scheme = Some(scheme.clone());
        origin.authority = Some(authority.clone());
        origin.path_and_query = Some(PathAndQuery::from_static("/"));
        Some(UpstreamTarget {
            host: HeaderValue::from_str(host).ok()?,
            base_path: uri.path().trim_end_matches('/').to_string(),
            base_query: uri.query().map(str::to_string),
            origin: Uri::from_parts(origin).ok()?,
            pool_key: Arc::from(format!("{scheme}://{authority}")),
        })
    }

    /// The request target (origin form: path and query, as an HTTP/1
    /// request line carries it) of `path` (an endpoint such as
    /// `/chat/completions`) with the client's `query` under this base.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Option<Uri> {
        let query_len =
            self.base_query.as_ref().map_or(0, |q| q.len() + 1) + query.map_or(0, |q| q.len() + 1);
        let mut pq = String::with_capacity(self.base_path.len() + path.len() + query_len);
        pq.push_str(&self.base_path);
        pq.push_str(path);
        let mut sep = '?';
        for q in [self.base_query.as_deref(), query].into_iter().flatten() {
            pq.push(sep);
            pq.push_str(q);
            sep = '&';
        }
        let pq = PathAndQuery::from_maybe_shared(Bytes::from(pq)).ok()?;
        Some(Uri::from(pq))
    }

    /// `scheme://authority` of this base.
    pub fn origin(&self) -> &str {
        &self.pool_key
    }

    /// The `Host` header for this backend.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }
}

/// Why an attempt produced no response, with the cause the connector or
/// hyper gave (for the logs; built only on the failure path).
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The connection could not be established (nothing was sent).
    #[error("connect error")]
    Connect(#[source] BoxError),
    /// No response headers within the timeout.
    #[error("timeout")]
    Timeout,
    /// The connection failed after the request was sent.
    #[error("upstream connection failed")]
    Failed(#[source] BoxError),
    /// The upstream answered with a status outside 100–599 (`None`: one
    /// that is not three digits, or below 100). Never passed to a client.
    #[error("upstream answered an invalid status{}", .0.map(|s| format!(" {s}")).unwrap_or_default())]
    InvalidStatus(Option<u16>),
}

impl UpstreamError {
    /// Label for `claw_dp_upstream_attempts_total{outcome}`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect_error",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Failed(_) => "failed",
            UpstreamError::InvalidStatus(_) => "invalid_status",
        }
    }
}

/// One attempt: a fully built request, where it goes and its timeout.
#[derive(Debug)]
pub(crate) struct Attempt {
    /// The request to send (its URI in origin form, see
    /// [`UpstreamTarget::uri`]).
    pub request: Request<Full<Bytes>>,
    /// The backend's upstream.
    pub target: Arc<UpstreamTarget>,
    /// Time allowed until response headers.
    pub timeout: Duration,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// Idle connections by upstream (`scheme://authority`).
struct Pool {
    idle: HashMap<Arc<str>, VecDeque<Idle>>,
    /// At most this many per upstream.
    max_idle: usize,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            idle: HashMap::new(),
            max_idle: MAX_IDLE_PER_UPSTREAM,
        }
    }
}

impl Pool {
    /// The most recently used idle connection to `key` that can take a
    /// request; closed and expired ones on the way are dropped.
    fn checkout(&mut self, key: &str, now: Instant) -> Option<Sender> {
        let list = self.idle.get_mut(key)?;
        while let Some(idle) = list.pop_back() {
            if idle.sender.is_ready() && now.saturating_duration_since(idle.since) < IDLE_TIMEOUT {
                return Some(idle.sender);
            }
        }
        None
    }

    fn put(&mut self, key: &Arc<str>, sender: Sender, now: Instant) {
        let list = match self.idle.get_mut(&**key) {
            Some(list) => list,
            None => self.idle.entry(key.clone()).or_default(),
        };
        // Oldest first: expired ones leave from the front.
        while list
            .front()
            .is_some_and(|i| now.saturating_duration_since(i.since) >= IDLE_TIMEOUT)
        {
            list.pop_front();
        }
        if list.len() >= self.max_idle {
            list.pop_front();
        }
        list.push_back(Idle { sender, since: now });
    }
}

/// The innermost service: sends an [`Attempt`] over a pooled connection.
/// Clones share the pool; each serving thread builds its own.
#[derive(Clone)]
pub(crate) struct Upstream {
    connector: Connector,
    pool: Arc<Mutex<Pool>>,
}

impl Upstream {
    /// A service with an empty pool, connecting through `connector`.
    pub(crate) fn new(connector: Connector) -> Self {
        Upstream {
            connector,
            pool: Arc::default(),
        }
    }

    fn checkout(&self, key: &str) -> Option<Sender> {
        let mut pool = self.pool.lock();
        pool.checkout(key, Instant::now())
    }

    /// A new connection to `target`, its connection task spawned.
    async fn connect(&self, target: &UpstreamTarget) -> Result<Sender, UpstreamError> {
        let mut connector = self.connector.clone();
        let io = connector.call(target.origin.clone()).await.map_err(|e| {
            tracing::debug!(upstream = %target.origin(), error = %e, "upstream connect failed");
            UpstreamError::Connect(e)
        })?;
        let (sender, conn) = http1::handshake(io).await.map_err(|e| {
            tracing::debug!(upstream = %target.origin(), error = %e, "upstream handshake failed");
            UpstreamError::Connect(e.into())
        })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Returns `sender` to the pool once its response has been read to the
    /// end, if the connection can take another request then.
    fn release(&self, key: Arc<str>, mut sender: Sender) {
        let pool = Arc::downgrade(&self.pool);
        tokio::spawn(async move {
            if std::future::poll_fn(|cx| sender.poll_ready(cx))
                .await
                .is_ok()
                && let Some(pool) = pool.upgrade()
            {
                let mut pool = pool.lock();
                pool.put(&key, sender, Instant::now());
            }
        });
    }

    async fn send(self, a: Attempt) -> Result<Response<Incoming>, UpstreamError> {
        let Attempt {
            mut request,
            target,
            ..
        } = a;
        loop {
            let (mut sender, reused) = match self.checkout(&target.pool_key) {
                Some(s) => (s, true),
                None => (self.connect(&target).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(mut res) => {
                    let status = res.status().as_u16();
                    if !(100..=599).contains(&status) {
                        // Not HTTP a client can act on. The connection is
                        // not reused: its body is left unread.
                        tracing::debug!(upstream = %target.origin(), status, "upstream answered an invalid status");
                        return Err(UpstreamError::InvalidStatus(Some(status)));
                    }
                    strip_response_headers(res.headers_mut());
                    self.release(target.pool_key.clone(), sender);
                    return Ok(res);
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the upstream closed an idle connection just
                    // as it was taken. Another one (a new one, in the end).
                    Some(unsent) if reused => {
                        tracing::debug!(upstream = %target.origin(), error = %e.error(), "reused connection was closed; trying another");
                        request = unsent;
                    }
                    // Not sent on a connection just made: nothing reached
                    // the upstream.
                    Some(_) => {
                        tracing::debug!(upstream = %target.origin(), error = %e.error(), "new connection closed before the request went out");
                        return Err(UpstreamError::Connect(e.into_error().into()));
                    }
                    None if e.error().is_parse_status() => {
                        tracing::debug!(upstream = %target.origin(), error = %e.error(), "upstream answered an unparseable status");
                        return Err(UpstreamError::InvalidStatus(None));
                    }
                    None => {
                        tracing::debug!(upstream = %target.origin(), error = %e.error(), "upstream request failed");
                        return Err(UpstreamError::Failed(e.into_error().into()));
                    }
                },
            }
        }
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
        let timeout = a.timeout;
        let send = self.clone().send(a);
        Box::pin(async move {
            tokio::time::timeout(timeout, send)
                .await
                .unwrap_or_else(|_| Err(UpstreamError::Timeout))
        })
    }
}

/// Whether `name` is a hop-by-hop header: one of the standard ones or any
/// `proxy-*` header.
fn hop_by_hop(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade"
    ) || n.starts_with("proxy-")
}

/// Upstream response headers that never reach a client, beyond the
/// hop-by-hop ones. They describe the gateway's account with the provider,
/// not the client's request: `set-cookie` (a provider's — or its CDN's —
/// session cookie for the gateway's key, which a client must not store and
/// send back), and the provider's organisation and project ids of the
/// gateway's key (`openai-organization`, `openai-project`,
/// `anthropic-organization-id`), which tell a client whose account pays.
/// Rate-limit headers (`x-ratelimit-*`, `anthropic-ratelimit-*`,
/// `retry-after`) and the provider's `request-id` pass; `x-request-id` is
/// replaced by the proxy's own request id.
const PRIVATE_RESPONSE_HEADERS: [&str; 5] = [
    "set-cookie",
    "set-cookie2",
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
];

/// Whether an upstream response header stays behind: hop-by-hop (and
/// `proxy-*`) or one of [`PRIVATE_RESPONSE_HEADERS`].
fn not_returned(name: &HeaderName) -> bool {
    hop_by_hop(name) || PRIVATE_RESPONSE_HEADERS.contains(&name.as_str())
}

/// Removes from an upstream response's headers what must not reach the
/// client: hop-by-hop headers (and those named in `Connection`) and
/// [`PRIVATE_RESPONSE_HEADERS`]. A map with none is only read.
pub(crate) fn strip_response_headers(headers: &mut HeaderMap) {
    let named = connection_named(headers);
    let doomed = |k: &HeaderName| not_returned(k) || named.contains(k);
    if !headers.keys().any(doomed) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|k| doomed(k)).cloned().collect();
    for n in names {
        headers.remove(n);
    }
}

/// Whether a client header stays behind: hop-by-hop ones, `host`, the
/// client's credentials, `content-length` (recomputed) and
/// `accept-encoding` (so that the proxy sees plain bodies for SSE error
/// events and usage).
fn not_forwarded(name: &HeaderName) -> bool {
    hop_by_hop(name)
        || matches!(
            name.as_str(),
            "host"
                | "authorization"
                | "content-length"
                | "accept-encoding"
                | "api-key"
                | "x-api-key"
        )
}

/// The header names a `Connection` header lists: hop-by-hop for this
/// connection only. Empty (and unallocated) without one.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// Removes hop-by-hop headers: the standard ones, every `proxy-*` header and
/// those named in `Connection`. A map with none (the usual answer) is only
/// read.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named = connection_named(headers);
    let doomed = |k: &HeaderName| hop_by_hop(k) || named.contains(k);
    if !headers.keys().any(doomed) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|k| doomed(k)).cloned().collect();
    for n in names {
        headers.remove(n);
    }
}

/// The headers sent upstream, minus the backend's credential (its
/// protocol's header, set per attempt by [`crate::retry`]) and `Host`: the
/// client's headers without those `not_forwarded` (the client's own
/// `authorization`, `x-api-key` and `api-key` among them) and those named in
/// `Connection`, with `content-type: application/json` (every body the proxy
/// sends is JSON; a bodiless `GET`/`DELETE` drops it). Provider headers
/// such as `anthropic-version` and `anthropic-beta` pass. One pass over the
/// client's headers.
pub(crate) fn upstream_headers(h: HeaderMap) -> HeaderMap {
    let named = connection_named(&h);
    let mut out = HeaderMap::with_capacity(h.len() + 3);
    // `HeaderMap`'s iterator names a header once, before its first value.
    let mut keep: Option<HeaderName> = None;
    for (name, value) in h {
        if let Some(name) = name {
            keep = (!not_forwarded(&name) && !named.contains(&name)).then_some(name);
        }
        if let Some(name) = &keep {
            out.append(name.clone(), value);
        }
    }
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ("content-type", "text/plain"),
            ("user-agent", "test"),
            ("x-multi", "a"),
            ("api-key", "client-secret"),
            ("x-multi", "b"),
            ("accept-encoding", "gzip"),
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
                "x-claw-priority",
                "x-multi"
            ]
        );
        // Every value of a kept header, in order; the body is always JSON.
        let multi: Vec<&[u8]> = out
            .get_all("x-multi")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(multi, vec![&b"a"[..], b"b"]);
        assert_eq!(out["content-type"], "application/json");
        assert_eq!(out.len(), 6);

        // The response side: hop-by-hop headers go, the rest stays.
        let mut res = h;
        strip_hop_by_hop(&mut res);
        let mut keys: Vec<&str> = res.keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            vec![
                "accept-encoding",
                "api-key",
                "authorization",
                "content-length",
                "content-type",
                "host",
                "user-agent",
                "x-api-key",
                "x-claw-agent-id",
                "x-claw-priority",
                "x-multi"
            ]
        );
        assert_eq!(res.get_all("x-multi").iter().count(), 2);
    }

    #[test]
    fn a_response_without_hop_by_hop_headers_is_left_alone() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn upstream_uris_join_the_base_and_the_endpoint() {
        let t = UpstreamTarget::parse("https://api.example.com/v1").expect("parses");
        assert_eq!(
            t.uri("/chat/completions", None).expect("uri").to_string(),
            "/v1/chat/completions"
        );
        assert_eq!(t.host(), "api.example.com");
        assert_eq!(t.origin(), "https://api.example.com");
        let t = UpstreamTarget::parse("http://127.0.0.1:8080").expect("parses");
        assert_eq!(
            t.uri("/embeddings", Some("a=1")).expect("uri").to_string(),
            "/embeddings?a=1"
        );
        assert_eq!(t.host(), "127.0.0.1:8080");
        assert_eq!(t.origin(), "http://127.0.0.1:8080");
        // A default port is left out of `Host`; the base's query comes first.
        let t =
            UpstreamTarget::parse("https://h.example:443/openai/?api-version=2").expect("parses");
        assert_eq!(t.host(), "h.example");
        assert_eq!(
            t.uri("/chat/completions", Some("x=y"))
                .expect("uri")
                .to_string(),
            "/openai/chat/completions?api-version=2&x=y"
        );
        let t = UpstreamTarget::parse("http://[::1]:9000/v1").expect("parses");
        assert_eq!(t.host(), "[::1]:9000");
        assert!(UpstreamTarget::parse("/v1").is_none());
    }

    /// A local HTTP/1 server answering `ok`; counts the connections it
    /// accepted. `close_after` makes it close each connection after one
    /// answer (`Connection: close` is not sent, so the client finds out
    /// only from the socket).
    async fn server(
        close_after: bool,
    ) -> (Arc<UpstreamTarget>, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    if close_after {
                        let mut conn = std::pin::pin!(conn);
                        // Serve one exchange, then drop the socket.
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), conn.as_mut()).await;
                    } else {
                        let _ = conn.await;
                    }
                });
            }
        });
        let target = UpstreamTarget::parse(&format!("http://{addr}/v1")).expect("target");
        (Arc::new(target), accepted)
    }

    fn attempt(target: &Arc<UpstreamTarget>, timeout: Duration) -> Attempt {
        let mut request = Request::new(Full::new(Bytes::from_static(b"{}")));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = target.uri("/chat/completions", None).expect("uri");
        request
            .headers_mut()
            .insert(header::HOST, target.host().clone());
        Attempt {
            request,
            target: target.clone(),
            timeout,
        }
    }

    async fn body(res: Response<Incoming>) -> Bytes {
        use http_body_util::BodyExt;
        res.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn connections_are_reused_once_their_answer_is_read() {
        let (target, accepted) = server(false).await;
        let mut up = Upstream::new(connector().expect("connector"));
        for _ in 0..5 {
            let res = up
                .call(attempt(&target, Duration::from_secs(5)))
                .await
                .expect("answer");
            assert_eq!(body(res).await, "ok");
            // The connection goes back to the pool from its own task.
            for _ in 0..1000 {
                let pooled = {
                    let pool = up.pool.lock();
                    pool.idle
                        .get(&*target.pool_key)
                        .is_some_and(|l| !l.is_empty())
                };
                if pooled {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_reused() {
        let (target, accepted) = server(true).await;
        let mut up = Upstream::new(connector().expect("connector"));
        for _ in 0..3 {
            let res = up
                .call(attempt(&target, Duration::from_secs(5)))
                .await
                .expect("answer");
            assert_eq!(body(res).await, "ok");
            // Past the server's close.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_and_silence_a_timeout() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        let target = Arc::new(UpstreamTarget::parse(&format!("http://{addr}")).expect("target"));
        let mut up = Upstream::new(connector().expect("connector"));
        let err = up
            .call(attempt(&target, Duration::from_secs(5)))
            .await
            .expect_err("refused");
        assert!(matches!(err, UpstreamError::Connect(_)), "{err:?}");

        // Accepts, never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = silent.local_addr().expect("addr");
        let target = Arc::new(UpstreamTarget::parse(&format!("http://{addr}")).expect("target"));
        let err = up
            .call(attempt(&target, Duration::from_millis(200)))
            .await
            .expect_err("silent");
        assert!(matches!(err, UpstreamError::Timeout), "{err:?}");
        drop(silent);
    }

    #[tokio::test]
    async fn idle_connections_expire_and_are_capped() {
        let (target, _) = server(false).await;
        let up = Upstream::new(connector().expect("connector"));
        let key = target.pool_key.clone();
        let now = Instant::now();
        let mut pool = Pool {
            max_idle: 4,
            ..Pool::default()
        };
        for _ in 0..3 {
            pool.put(&key, up.connect(&target).await.expect("connect"), now);
        }
        // Past the idle timeout: nothing to reuse.
        assert!(pool.checkout(&key, now + IDLE_TIMEOUT).is_none());
        assert!(pool.idle[&key].is_empty());
        // Over the cap: the oldest leave.
        for _ in 0..6 {
            pool.put(&key, up.connect(&target).await.expect("connect"), now);
        }
        assert_eq!(pool.idle[&key].len(), 4);
        assert!(pool.checkout(&key, now).is_some());
        assert!(pool.checkout("http://elsewhere", now).is_none());
    }

    #[test]
    fn private_response_headers_are_stripped_rate_limits_pass() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("set-cookie", "__cf_bm=abc; path=/"),
            ("set-cookie", "_cfuvid=def; path=/"),
            ("openai-organization", "org-secret"),
            ("openai-project", "proj_secret"),
            ("anthropic-organization-id", "0000-org"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("x-ratelimit-remaining-requests", "99"),
            ("anthropic-ratelimit-requests-remaining", "99"),
            ("retry-after", "1"),
            ("request-id", "req_upstream"),
            ("x-request-id", "req_upstream"),
            ("openai-processing-ms", "12"),
            ("content-type", "application/json"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_response_headers(&mut h);
        let mut keys: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            vec![
                "anthropic-ratelimit-requests-remaining",
                "content-type",
                "openai-processing-ms",
                "request-id",
                "retry-after",
                "x-ratelimit-remaining-requests",
                "x-request-id",
            ]
        );
        let mut clean = h.clone();
        strip_response_headers(&mut clean);
        assert_eq!(clean, h);
    }

    /// A raw TCP upstream answering every request with `head`.
    async fn raw_server(head: &'static [u8]) -> Arc<UpstreamTarget> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(head).await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                });
            }
        });
        Arc::new(UpstreamTarget::parse(&format!("http://{addr}/v1")).expect("target"))
    }

    #[tokio::test]
    async fn a_status_outside_100_to_599_is_an_error_not_an_answer() {
        let mut up = Upstream::new(connector().expect("connector"));
        for (head, want) in [
            (
                &b"HTTP/1.1 600 Weird\r\ncontent-length: 2\r\n\r\n{}"[..],
                Some(600),
            ),
            (
                b"HTTP/1.1 999 Weird\r\ncontent-length: 0\r\n\r\n",
                Some(999),
            ),
            (b"HTTP/1.1 099 Low\r\ncontent-length: 0\r\n\r\n", None),
            (b"HTTP/1.1 99 Low\r\ncontent-length: 0\r\n\r\n", None),
        ] {
            let target = raw_server(head).await;
            let err = up
                .call(attempt(&target, Duration::from_secs(5)))
                .await
                .expect_err("not an answer");
            match err {
                UpstreamError::InvalidStatus(got) => assert_eq!(got, want),
                other => panic!("{other:?}"),
            }
        }
        // 599 is a status like any other.
        let target = raw_server(b"HTTP/1.1 599 Odd\r\ncontent-length: 0\r\n\r\n").await;
        let res = up
            .call(attempt(&target, Duration::from_secs(5)))
            .await
            .expect("an answer");
        assert_eq!(res.status().as_u16(), 599);
    }

    #[test]
    fn connector_builds() {
        assert!(connector().is_ok());
    }
}

//! The IO wrappers of a client connection, between the socket and hyper:
//!
//! ```text
//! hyper ── HyperAnswers ── [TLS] ── Watched ── TcpStream
//! ```
//!
//! Both report to and read the connection's [`ConnState`], which the
//! service (requests in flight) and the server's watchdog share.
//!
//! - [`Watched`] (on the TCP stream, under TLS): reports reads to the
//!   connection's [`ConnState`] (the header and idle timeouts), answers a
//!   late request head 408 on plain HTTP, and enforces the write timeout: a
//!   write that makes no progress for `--write-timeout` (the client stopped
//!   reading) fails the connection, which is reset (`SO_LINGER` 0, so the
//!   bytes stuck in the send buffer are dropped rather than kept for a
//!   reader that never comes) — hyper drops the response, whose upstream
//!   connection is closed at once rather than drained for its usage
//!   (`server::Guarded`).
//! - [`HyperAnswers`] (directly under hyper, so it sees plain text): hyper
//!   answers a request it cannot parse itself — 400 (malformed request line
//!   or header), 414 (URI over 64 KiB), 431 (head over the size limit or
//!   too many headers) — with an empty body. This wrapper recognises that
//!   answer's head on the write side and writes a JSON error in the
//!   client's shape instead (Anthropic's when the head it was reading
//!   names a `/v1/messages` path, else OpenAI's).
//!
//! Why the write side and not pre-parsing the request head (with
//! `httparse`) on the read side: hyper already parses every head, and
//! parsing it twice would cost every request; recognising hyper's answer
//! costs the normal path one short prefix comparison per write (and a
//! look at the first bytes of each request head, for its path), with no
//! copy, and stays exactly in step with what hyper refuses. A head is
//! hyper's own answer when it is a 400, 414 or 431 with `content-length: 0`
//! and no `x-request-id`: every answer of the proxy's own carries a
//! request id and (for those statuses) a JSON body.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::error::{ApiError, Wire};
use crate::target::RequestId;

/// The longest request head (request line and headers) the proxy reads:
/// hyper answers 431 beyond it. Provider SDKs send about 1 KiB.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The longest request target (path and query) the proxy serves: 414
/// beyond it. The proxy's endpoints are short; a long target is abuse.
pub(crate) const MAX_URI_BYTES: usize = 8 * 1024;

/// Per-connection activity, shared by the IO wrappers, the service and the
/// server's watchdog.
pub(crate) struct ConnState {
    pub(crate) base: Instant,
    pub(crate) active: AtomicU32,
    /// Milliseconds since `base` when the connection last became idle.
    pub(crate) idle_since: AtomicU64,
    /// 1 + milliseconds since `base` of the first byte read while idle
    /// (or of the connection's start, until its first request); 0 = none.
    pub(crate) pending_since: AtomicU64,
    /// A request head was received on this connection.
    pub(crate) served: AtomicBool,
    /// Chosen to be closed to make room at the connection cap.
    pub(crate) evicted: AtomicBool,
    pub(crate) evict: tokio::sync::Notify,
    /// The head took too long: reads end (after a 408 on plain HTTP).
    pub(crate) timed_out: AtomicBool,
    /// Requests whose head was received (the service was called).
    pub(crate) requests: AtomicU64,
    /// A write made no progress for the write timeout: the connection is
    /// being reset.
    pub(crate) write_timed_out: AtomicBool,
}

impl ConnState {
    pub(crate) fn new() -> Self {
        ConnState {
            base: Instant::now(),
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            // The first request's head is due within the header timeout of
            // the connection's start: a connection that sends nothing is
            // not kept for the (longer) idle timeout.
            pending_since: AtomicU64::new(1),
            served: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            evict: tokio::sync::Notify::new(),
            timed_out: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            write_timed_out: AtomicBool::new(false),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// When the connection last became idle (its start if never used).
    pub(crate) fn idle_at(&self) -> Instant {
        self.base + Duration::from_millis(self.idle_since.load(Ordering::Acquire))
    }

    pub(crate) fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.pending_since.store(0, Ordering::Release);
        self.served.store(true, Ordering::Release);
        ActiveGuard(self.clone())
    }

    /// No request is in flight.
    pub(crate) fn idle(&self) -> bool {
        self.active.load(Ordering::Acquire) == 0
    }

    /// Requests whose head was received so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }

    /// The request head is late (and no request is in flight): reads end.
    pub(crate) fn head_late(&self) -> bool {
        self.timed_out.load(Ordering::Acquire) && self.idle()
    }

    /// The write timeout passed (see [`crate::io::Watched`]).
    pub(crate) fn on_write_timeout(&self) {
        self.write_timed_out.store(true, Ordering::Release);
    }

    pub(crate) fn write_timed_out(&self) -> bool {
        self.write_timed_out.load(Ordering::Acquire)
    }

    /// Bytes were read from the connection.
    pub(crate) fn on_read(&self) {
        if self.active.load(Ordering::Acquire) == 0
            && self.pending_since.load(Ordering::Acquire) == 0
        {
            self.pending_since
                .store(self.now_ms() + 1, Ordering::Release);
        }
    }
}

/// Keeps a connection "active" until the response body is done.
pub(crate) struct ActiveGuard(pub(crate) Arc<ConnState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since.store(s.now_ms(), Ordering::Release);
        s.pending_since.store(0, Ordering::Release);
        s.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a connection whose request head is late is told before it is
/// closed (plain HTTP; over TLS it is just closed).
const HEAD_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: 131\r\nconnection: close\r\n\r\n{\"error\":{\"message\":\"Timed out reading the request headers.\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"request_timeout\"}}";

/// A TCP stream that reports reads to its [`ConnState`], ends its reads
/// (after a 408 on plain HTTP) once the request head is late, and fails
/// writes that make no progress for the write timeout.
pub(crate) struct Watched {
    io: TcpStream,
    state: Arc<ConnState>,
    /// Plain HTTP (not under TLS): the 408 can be written directly.
    plain: bool,
    /// The 408 was written.
    answered: bool,
    /// `--write-timeout` (zero: none).
    write_timeout: Duration,
    /// The write-timeout timer, made at the first write that blocks.
    stall: Option<Pin<Box<Sleep>>>,
    /// The timer runs: writes have been blocked since it was set.
    stalled: bool,
    /// The write timeout passed: every write fails.
    dead: bool,
}

impl Watched {
    pub(crate) fn new(
        io: TcpStream,
        state: Arc<ConnState>,
        plain: bool,
        write_timeout: Duration,
    ) -> Self {
        Watched {
            io,
            state,
            plain,
            answered: false,
            write_timeout,
            stall: None,
            stalled: false,
            dead: false,
        }
    }

    fn timed_out() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "write timeout: the client stopped reading",
        )
    }

    /// A write's result through the write timeout: progress stops the
    /// timer, a blocked write starts it (or fails once it has run out).
    fn on_write<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if !r.is_pending() {
            self.stalled = false;
            return r;
        }
        if self.write_timeout.is_zero() {
            return Poll::Pending;
        }
        let deadline = Instant::now() + self.write_timeout;
        let sleep = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.stalled {
            sleep.as_mut().reset(deadline);
            self.stalled = true;
        }
        ready!(sleep.as_mut().poll(cx));
        self.dead = true;
        self.state.on_write_timeout();
        // Reset rather than close: the unsent bytes go, now.
        let _ = socket2::SockRef::from(&self.io).set_linger(Some(Duration::ZERO));
        tracing::debug!(
            timeout_ms = self.write_timeout.as_millis() as u64,
            "client stopped reading: connection reset after the write timeout"
        );
        Poll::Ready(Err(Self::timed_out()))
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.state.head_late() {
            if self.plain && !self.answered {
                // Best effort: nothing else is being written (no request is
                // in flight) and a fresh socket's send buffer takes it.
                self.answered = true;
                let _ = self.io.try_write(HEAD_TIMEOUT_RESPONSE);
            }
            // End of input: hyper closes the connection.
            return Poll::Ready(Ok(()));
        }
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
        if self.dead {
            return Poll::Ready(Err(Self::timed_out()));
        }
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.on_write(cx, r)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.dead {
            return Poll::Ready(Err(Self::timed_out()));
        }
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.on_write(cx, r)
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

/// The statuses hyper answers by itself, with the error the proxy sends
/// instead: the status line hyper writes (after `HTTP/1.1 `) and the error.
fn hyper_answer(after_version: &[u8]) -> Option<ApiError> {
    if after_version.starts_with(b"400 Bad Request\r\n") {
        Some(ApiError::malformed_request())
    } else if after_version.starts_with(b"414 URI Too Long\r\n") {
        Some(ApiError::uri_too_long(MAX_URI_BYTES))
    } else if after_version.starts_with(b"431 Request Header Fields Too Large\r\n") {
        Some(ApiError::headers_too_large(MAX_HEAD_BYTES))
    } else {
        None
    }
}

/// How far into a write a head of hyper's own answer is looked for: it is
/// the status line, `content-length: 0`, `date` and maybe `connection`.
const HYPER_HEAD_MAX: usize = 512;

/// If `buf` starts with the head of an answer hyper wrote by itself (see
/// the module doc), its length and the error to send instead.
fn hyper_error_head(buf: &[u8]) -> Option<(usize, ApiError)> {
    // The cheap test every write pays: a 4xx status line.
    if !(buf.starts_with(b"HTTP/1.1 4") || buf.starts_with(b"HTTP/1.0 4")) {
        return None;
    }
    let error = hyper_answer(&buf[9..])?;
    let window = &buf[..buf.len().min(HYPER_HEAD_MAX)];
    let end = memchr::memmem::find(window, b"\r\n\r\n")? + 4;
    let head = &buf[..end];
    let has = |needle: &[u8]| {
        head.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    (has(b"\r\ncontent-length: 0\r\n") && !has(b"\r\nx-request-id:")).then_some((end, error))
}

/// The wire a request head asks for, from its first bytes (`METHOD
/// /path…`): Anthropic's for a `/v1/messages` path. `None` when the bytes
/// do not show the path.
fn head_wire(first: &[u8]) -> Option<Wire> {
    let sp = first.iter().take(24).position(|&b| b == b' ')?;
    let target = &first[sp + 1..];
    let end = target
        .iter()
        .position(|&b| matches!(b, b' ' | b'?' | b'\r' | b'\n'))
        .unwrap_or(target.len());
    let path = std::str::from_utf8(&target[..end]).ok()?;
    Some(Wire::for_path(path))
}

/// The wrapper directly under hyper that turns hyper's own empty 400, 414
/// and 431 answers into JSON errors (see the module doc).
pub(crate) struct HyperAnswers<I> {
    io: I,
    state: Arc<ConnState>,
    /// The request (by [`ConnState::requests`]) whose head's first bytes
    /// gave `wire`.
    classified: Option<u64>,
    /// The error shape of the head being read.
    wire: Wire,
    /// The replacement answer being written, and how much of it is out.
    answer: Option<(Vec<u8>, usize)>,
}

impl<I> HyperAnswers<I> {
    pub(crate) fn new(io: I, state: Arc<ConnState>) -> Self {
        HyperAnswers {
            io,
            state,
            classified: None,
            wire: Wire::OpenAi,
            answer: None,
        }
    }
}

impl<I: AsyncWrite + Unpin> HyperAnswers<I> {
    /// Writes what is left of the replacement answer.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.answer {
            if *done >= bytes.len() {
                self.answer = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Takes hyper's own error head at the start of `buf` (answering it
    /// with JSON): the bytes taken, or `None` for a write to pass through.
    fn intercept(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<Poll<io::Result<usize>>> {
        let (len, error) = hyper_error_head(buf)?;
        let wire = if self.classified == Some(self.state.requests()) {
            self.wire
        } else {
            Wire::OpenAi
        };
        let id = RequestId::generate();
        tracing::debug!(
            status = error.status.as_u16(),
            request_id = %id,
            "unparseable request answered"
        );
        crate::metrics::request("", "", crate::metrics::status_label(error.status.as_u16()));
        self.answer = Some((error.raw_response(wire, &id.to_string()), 0));
        // Taken whether or not it is all out yet: flush writes the rest.
        Some(match self.poll_answer(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(len)),
        })
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HyperAnswers<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        // The first bytes read between requests start the next head: note
        // its path's error shape (two atomic loads per read otherwise).
        if buf.filled().len() > before && this.state.idle() {
            let requests = this.state.requests();
            if this.classified != Some(requests) {
                this.classified = Some(requests);
                this.wire = head_wire(&buf.filled()[before..]).unwrap_or_default();
            }
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for HyperAnswers<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_answer(cx))?;
        if let Some(r) = this.intercept(cx, buf) {
            return r;
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_answer(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(r) = this.intercept(cx, first)
        {
            return r;
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_answer(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_answer(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one connection with hyper (as the proxy configures it) under
    /// [`HyperAnswers`]; the service answers `status` with an empty body
    /// and an `x-request-id`, as the proxy's own answers carry. Returns
    /// everything written for `request`.
    async fn exchange(request: &[u8], status: u16) -> String {
        exchange_with(request, status, Some(MAX_HEAD_BYTES)).await
    }

    /// [`exchange`] with hyper's head size limit `max_head`.
    async fn exchange_with(request: &[u8], status: u16, max_head: Option<usize>) -> String {
        let (client, server) = tokio::io::duplex(1 << 20);
        let state = Arc::new(ConnState::new());
        let io = HyperAnswers::new(server, state);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| async move {
                let mut res = http::Response::new(Full::new(Bytes::new()));
                *res.status_mut() = http::StatusCode::from_u16(status).expect("status");
                res.headers_mut()
                    .insert("x-request-id", http::HeaderValue::from_static("ours"));
                Ok::<_, std::convert::Infallible>(res)
            });
            let mut builder = http1::Builder::new();
            builder.max_buf_size(256 * 1024);
            if let Some(max) = max_head {
                builder.max_header_size(max);
            }
            let _ = builder.serve_connection(TokioIo::new(io), svc).await;
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let request = request.to_vec();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&request).await;
            // Keep the write half open until the answer is read.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out)).await;
        writer.abort();
        String::from_utf8_lossy(&out).into_owned()
    }

    fn json_body(text: &str) -> serde_json::Value {
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(head.contains("x-request-id: "), "{head}");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    #[tokio::test]
    async fn hypers_own_answers_become_json_errors() {
        let text = exchange(b"GARBAGE\x01 / HTTP/1.1\r\nhost: x\r\n\r\n", 200).await;
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert_eq!(json_body(&text)["error"]["code"], "malformed_request");

        // Over hyper's own URI limit (64 KiB; the proxy's head limit
        // answers such a head 431 first, its URI limit 414 from 8 KiB).
        let long = format!(
            "GET /v1/{} HTTP/1.1\r\nhost: x\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let text = exchange_with(long.as_bytes(), 200, None).await;
        assert!(text.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{text}");
        assert_eq!(json_body(&text)["error"]["code"], "uri_too_long");

        let big = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "a".repeat(100 * 1024)
        );
        let text = exchange(big.as_bytes(), 200).await;
        assert!(
            text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{text}"
        );
        let v = json_body(&text);
        assert_eq!(v["error"]["code"], "headers_too_large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn an_anthropic_path_gets_the_anthropic_shape() {
        let big = format!(
            "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "a".repeat(100 * 1024)
        );
        let text = exchange(big.as_bytes(), 200).await;
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        let v = json_body(&text);
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        // Too many headers is hyper's 431 too.
        let mut many = String::from("POST /v1/messages/count_tokens HTTP/1.1\r\nhost: x\r\n");
        for i in 0..200 {
            many.push_str(&format!("x-h{i}: v\r\n"));
        }
        many.push_str("\r\n");
        let text = exchange(many.as_bytes(), 200).await;
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        assert_eq!(json_body(&text)["type"], "error");
    }

    #[tokio::test]
    async fn the_proxys_own_answers_pass_untouched() {
        // Empty 400/431 answers of the service carry a request id: not hyper's.
        for status in [400u16, 414, 431, 200] {
            let text = exchange(
                b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                status,
            )
            .await;
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
            assert!(text.contains("x-request-id: ours"), "{text}");
            assert!(text.ends_with("\r\n\r\n"), "no body was added: {text}");
        }
    }

    #[test]
    fn request_heads_name_their_wire() {
        assert_eq!(
            head_wire(b"POST /v1/messages HTTP/1.1\r\n"),
            Some(Wire::Anthropic)
        );
        assert_eq!(
            head_wire(b"POST /v1/messages?beta=true"),
            Some(Wire::Anthropic)
        );
        assert_eq!(
            head_wire(b"POST /v1/messages/count_tokens"),
            Some(Wire::Anthropic)
        );
        assert_eq!(
            head_wire(b"POST /v1/chat/completions HTTP/1.1"),
            Some(Wire::OpenAi)
        );
        assert_eq!(head_wire(b"POST /v1/mess"), Some(Wire::OpenAi));
        assert_eq!(head_wire(b"GARBAGE"), None);
    }

    #[tokio::test]
    async fn a_write_that_makes_no_progress_fails_after_the_write_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // The peer never reads.
        let peer = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let mut io = Watched::new(
            stream,
            Arc::new(ConnState::new()),
            true,
            Duration::from_millis(300),
        );
        let chunk = vec![b'x'; 64 * 1024];
        let err = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Err(e) = io.write_all(&chunk).await {
                    return e;
                }
            }
        })
        .await
        .expect("the stalled write failed");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Every later write fails too.
        let again = io.write(b"more").await.expect_err("dead");
        assert_eq!(again.kind(), io::ErrorKind::TimedOut);
        drop(io);
        // The peer sees the connection reset (or closed), not a stall.
        let mut peer = peer;
        let mut buf = vec![0u8; 1 << 20];
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match peer.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the peer's connection never ended");
    }
}

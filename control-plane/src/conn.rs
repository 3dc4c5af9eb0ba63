//! Connection limits of the control plane's two listeners (gRPC and HTTP),
//! so that no client — with or without credentials — can exhaust its file
//! descriptors or hold connections forever:
//!
//! - a cap on open connections per listener (`--max-connections`). At the
//!   cap a new connection closes an old one to make room: first the oldest
//!   that never sent a byte (an idle attacker's), then — on the HTTP
//!   listener only — the one idle longest. So `/healthz` keeps answering
//!   while thousands of idle sockets are held open. With nothing to close
//!   (every gRPC connection in use) the new connection is closed at once.
//! - a first-byte timeout (`--header-read-timeout`): a connection that sends
//!   nothing is closed; on the HTTP listener [`Heads`] also bounds a slow
//!   request head, from its first byte, while an idle keep-alive connection
//!   between requests is left to the idle timeout;
//! - an idle timeout (`--idle-timeout`): no byte read or written for that
//!   long closes the connection. It is longer than the gRPC keepalive ping
//!   interval and the dashboard's SSE ping, so a proxy's idle but healthy
//!   config or report stream — which answers the pings — is never cut;
//! - TCP keepalive on every accepted socket;
//! - an accept queue as deep as the kernel allows ([`claw_tls::listener::ACCEPT_BACKLOG`]), so
//!   a burst of connections waits in the kernel while the accept loop
//!   catches up instead of overflowing it.
//!
//! Counted in `claw_cp_connections_open`, `claw_cp_connections_rejected_total`
//! and `claw_cp_connections_evicted_total` (label `listener`).

pub(crate) use claw_tls::listener::deepen_backlog;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;

pub(crate) use crate::config::ConnSettings;

/// Open connections, by listener.
pub(crate) const CONNECTIONS_OPEN: &str = "claw_cp_connections_open";
/// New connections closed at once at the cap, by listener.
pub(crate) const CONNECTIONS_REJECTED: &str = "claw_cp_connections_rejected_total";
/// Old connections closed to make room at the cap, by listener.
pub(crate) const CONNECTIONS_EVICTED: &str = "claw_cp_connections_evicted_total";

/// `# HELP` of the connection metrics.
pub(crate) fn describe() {
    metrics::describe_gauge!(CONNECTIONS_OPEN, "Open connections, by listener");
    metrics::describe_counter!(
        CONNECTIONS_REJECTED,
        "New connections closed at once at the connection cap, by listener"
    );
    metrics::describe_counter!(
        CONNECTIONS_EVICTED,
        "Idle connections closed to make room for a new one at the connection cap, by listener"
    );
}

/// Connections above the cap admitted while the ones closed to make room
/// are still closing.
const OVERSHOOT: usize = 256;

/// TCP keepalive probes on accepted sockets: a peer that vanished is
/// noticed by the kernel even when no ping is due.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// One open connection, as the cap sees it.
struct Meta {
    accepted: Instant,
    /// Milliseconds after `accepted` of the last byte read or written.
    last_ms: AtomicU64,
    /// A byte was read.
    spoke: AtomicBool,
    /// Chosen to be closed to make room.
    evicted: AtomicBool,
    waker: AtomicWaker,
}

impl Meta {
    fn touch(&self) {
        let ms = u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.accepted + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The open connections of one listener.
pub(crate) struct ConnTable {
    listener: &'static str,
    settings: ConnSettings,
    /// Whether a connection that has spoken may be closed to make room
    /// (HTTP: yes, the idlest; gRPC: no, those are proxies' streams).
    evict_spoken: bool,
    open: AtomicUsize,
    /// Open connections chosen to close, not closed yet.
    evicting: AtomicUsize,
    next_id: AtomicU64,
    conns: parking_lot::Mutex<HashMap<u64, Arc<Meta>>>,
}

impl ConnTable {
    pub(crate) fn new(listener: &'static str, settings: ConnSettings, evict_spoken: bool) -> Self {
        ConnTable {
            listener,
            settings,
            evict_spoken,
            open: AtomicUsize::new(0),
            evicting: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            conns: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// The header-read timeout (for hyper's HTTP/1 builder).
    pub(crate) fn header_timeout(&self) -> Duration {
        self.settings.header_timeout
    }

    /// The idle timeout (keepalive pings must come more often).
    pub(crate) fn idle_timeout(&self) -> Duration {
        self.settings.idle_timeout
    }

    fn gauge(&self) {
        metrics::gauge!(CONNECTIONS_OPEN, "listener" => self.listener)
            .set(self.open.load(Ordering::Relaxed) as f64);
    }

    /// Admits `io` (making room at the cap) or gives it back to be closed.
    /// Connections chosen to close (closing within moments) do not count
    /// against the cap, so a burst does not refuse probes while they go;
    /// [`OVERSHOOT`] above the cap bounds descriptors regardless.
    fn admit<S>(self: &Arc<Self>, io: S) -> Result<Limited<S>, S> {
        let open = self.open.load(Ordering::Relaxed);
        let live = open.saturating_sub(self.evicting.load(Ordering::Relaxed));
        let max = self.settings.max_connections.max(1);
        if open >= max + OVERSHOOT || (live >= max && !self.evict_one()) {
            metrics::counter!(CONNECTIONS_REJECTED, "listener" => self.listener).increment(1);
            return Err(io);
        }
        let meta = Arc::new(Meta {
            accepted: Instant::now(),
            last_ms: AtomicU64::new(0),
            spoke: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().insert(id, meta.clone());
        self.open.fetch_add(1, Ordering::Relaxed);
        self.gauge();
        Ok(Limited {
            io,
            meta,
            table: self.clone(),
            id,
            timer: None,
        })
    }

    /// Closes the connection best lost: the oldest that never sent a byte,
    /// else (when allowed) the one idle longest.
    fn evict_one(&self) -> bool {
        let conns = self.conns.lock();
        let live = conns
            .values()
            .filter(|m| !m.evicted.load(Ordering::Relaxed));
        let victim = if self.evict_spoken {
            live.min_by_key(|m| (m.spoke.load(Ordering::Relaxed), m.last()))
        } else {
            live.filter(|m| !m.spoke.load(Ordering::Relaxed))
                .min_by_key(|m| m.accepted)
        };
        let Some(m) = victim else { return false };
        m.evicted.store(true, Ordering::Relaxed);
        self.evicting.fetch_add(1, Ordering::Relaxed);
        m.waker.wake();
        metrics::counter!(CONNECTIONS_EVICTED, "listener" => self.listener).increment(1);
        true
    }
}

/// An accepted connection under the limits: its reads fail once it is
/// silent past the first-byte or idle timeout or is closed to make room.
pub(crate) struct Limited<S> {
    io: S,
    meta: Arc<Meta>,
    table: Arc<ConnTable>,
    id: u64,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> Drop for Limited<S> {
    fn drop(&mut self) {
        self.table.conns.lock().remove(&self.id);
        if self.meta.evicted.load(Ordering::Relaxed) {
            self.table.evicting.fetch_sub(1, Ordering::Relaxed);
        }
        self.table.open.fetch_sub(1, Ordering::Relaxed);
        self.table.gauge();
    }
}

impl<S> Limited<S> {
    /// When the connection is due to be closed if nothing happens.
    fn due(&self) -> Instant {
        let s = &self.table.settings;
        if self.meta.spoke.load(Ordering::Relaxed) {
            self.meta.last() + s.idle_timeout
        } else {
            self.meta.accepted + s.header_timeout
        }
    }

    /// An error once the connection must close (checked while reads wait).
    fn poll_limits(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.meta.waker.register(cx.waker());
        if self.meta.evicted.load(Ordering::Relaxed) {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room at the connection cap",
            ));
        }
        loop {
            let due = self.due();
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            if Instant::now() >= self.due() {
                let what = if self.meta.spoke.load(Ordering::Relaxed) {
                    "idle timeout"
                } else {
                    "no request in time"
                };
                return Some(io::Error::new(io::ErrorKind::TimedOut, what));
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.meta.spoke.store(true, Ordering::Relaxed);
                    self.meta.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.poll_limits(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.meta.touch();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.meta.touch();
        }
        r
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

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Request-head timing of one HTTP connection, shared by its [`Heads`]
/// reader and its service (which calls [`HeadState::begin`] per request).
pub(crate) struct HeadState {
    base: Instant,
    /// 1 + milliseconds after `base` of the first byte of a head not yet
    /// received (of the connection's start for the first request); 0: none.
    pending: AtomicU64,
    /// Requests being handled.
    active: AtomicUsize,
    /// The connection speaks HTTP/2 (its whole preface came first): not
    /// timed.
    h2: AtomicBool,
    /// Bytes of the HTTP/2 preface matched so far, or [`NOT_H2`].
    matched: AtomicUsize,
}

/// The HTTP/2 client preface, whose start tells HTTP/2 from HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// [`HeadState::matched`] once the connection is known to be HTTP/1.
const NOT_H2: usize = usize::MAX;

/// A request being handled (see [`HeadState::begin`]).
pub(crate) struct HeadGuard(Arc<HeadState>);

impl Drop for HeadGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HeadState {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(HeadState {
            base: Instant::now(),
            pending: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            h2: AtomicBool::new(false),
            matched: AtomicUsize::new(0),
        })
    }

    /// A request head was received: held until its response is returned.
    pub(crate) fn begin(self: &Arc<Self>) -> HeadGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.pending.store(0, Ordering::Release);
        HeadGuard(self.clone())
    }

    fn read(&self, bytes: &[u8]) {
        // Until the whole preface has come (a preface sent a byte at a
        // time is timed like a head), the first request's head is due.
        let matched = self.matched.load(Ordering::Acquire);
        if matched != NOT_H2 {
            let want = H2_PREFACE.get(matched..).unwrap_or_default();
            let n = bytes.len().min(want.len());
            if bytes[..n] == want[..n] {
                self.matched.store(matched + n, Ordering::Release);
                if matched + n == H2_PREFACE.len() {
                    self.h2.store(true, Ordering::Release);
                }
                return;
            }
            self.matched.store(NOT_H2, Ordering::Release);
        }
        if self.active.load(Ordering::Acquire) == 0 && self.pending.load(Ordering::Acquire) == 0 {
            let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.pending.store(ms + 1, Ordering::Release);
        }
    }

    /// When the head being received is due, if one is.
    fn due(&self, timeout: Duration) -> Option<Instant> {
        if self.h2.load(Ordering::Acquire) || self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.pending.load(Ordering::Acquire) {
            0 => None,
            p => Some(self.base + Duration::from_millis(p - 1) + timeout),
        }
    }
}

/// The HTTP listener's request-head timeout, read above TLS: a head must
/// arrive within the header timeout of its first byte (of the connection's
/// start for the first request). An idle keep-alive connection waiting for
/// its next request is left to the idle timeout — unlike hyper's
/// header-read timeout, which also runs while nothing is being sent and so
/// closed idle keep-alive connections after the header timeout. HTTP/2
/// connections are not timed here (their pings keep them alive).
pub(crate) struct Heads<S> {
    io: S,
    state: Arc<HeadState>,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> Heads<S> {
    pub(crate) fn new(io: S, state: Arc<HeadState>, timeout: Duration) -> Self {
        Heads {
            io,
            state,
            timeout,
            timer: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Heads<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.state.read(&buf.filled()[before..]);
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let Some(due) = self.state.due(self.timeout) else {
                    return Poll::Pending;
                };
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                if timer.deadline() != due {
                    timer.as_mut().reset(due);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not received in time",
                    ))),
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Heads<S> {
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

/// Accepts on `listener` under `table`'s limits (with `TCP_NODELAY`, TCP
/// keepalive and a deep accept queue) and yields each admitted connection once `handshake` (TLS,
/// or nothing) is done. Handshakes run in their own tasks, so a slow client
/// never delays the others; a failed one is logged at debug and dropped.
/// Accepting stops, and the listener closes, when the stream is dropped.
pub(crate) fn incoming<T, F, Fut>(
    listener: TcpListener,
    table: Arc<ConnTable>,
    handshake: F,
) -> ReceiverStream<io::Result<(T, SocketAddr)>>
where
    T: Send + 'static,
    F: Fn(Limited<TcpStream>) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<T>> + Send + 'static,
{
    deepen_backlog(&listener, table.listener);
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(listener = table.listener, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let stream = match table.admit(stream) {
                Ok(s) => s,
                Err(refused) => {
                    tracing::debug!(listener = table.listener, %peer, "connection cap reached: closing a new connection");
                    drop(refused);
                    continue;
                }
            };
            if let Err(e) = stream.io.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
            if let Err(e) = socket2::SockRef::from(&stream.io).set_tcp_keepalive(&keepalive) {
                tracing::debug!(error = %e, "cannot set TCP keepalive");
            }
            let (tx, done) = (tx.clone(), handshake(stream));
            let listener_name = table.listener;
            tokio::spawn(async move {
                match tokio::time::timeout(claw_tls::server::HANDSHAKE_TIMEOUT, done).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok((conn, peer))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(listener = listener_name, %peer, error = %e, "handshake failed")
                    }
                    Err(_) => {
                        tracing::debug!(listener = listener_name, %peer, "handshake timed out")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn settings(max: usize) -> ConnSettings {
        ConnSettings {
            max_connections: max,
            header_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(400),
        }
    }

    #[test]
    fn heads_are_timed_from_their_first_byte_and_idle_keep_alive_or_http2_is_not() {
        let t = Duration::from_secs(10);
        let s = HeadState::new();
        // The first request's head is due from the connection's start.
        assert_eq!(s.due(t), Some(s.base + t));
        s.read(b"GET /healthz HTTP/1.1\r\n");
        assert_eq!(s.due(t), Some(s.base + t));
        let handling = s.begin();
        assert_eq!(s.due(t), None, "a request being handled");
        drop(handling);
        assert_eq!(s.due(t), None, "an idle keep-alive connection");
        s.read(b"GET");
        assert!(
            s.due(t).is_some(),
            "the next head is timed from its first byte"
        );

        // HTTP/2: timed until its whole preface has come, even a byte at a
        // time, then not (pings and frames are not heads).
        let h = HeadState::new();
        for byte in H2_PREFACE.chunks(1) {
            assert!(h.due(t).is_some());
            h.read(byte);
        }
        assert_eq!(h.due(t), None);
        h.read(b"\0\0\0\x04\0\0\0\0\0");
        assert_eq!(h.due(t), None);

        // A partial preface that turns out to be HTTP/1 stays timed.
        let p = HeadState::new();
        p.read(b"P");
        p.read(b"OST / HTTP/1.1\r\n");
        assert_eq!(p.due(t), Some(p.base + t));
    }

    #[tokio::test]
    async fn a_silent_connection_times_out_and_a_new_one_evicts_the_oldest_silent() {
        let table = Arc::new(ConnTable::new("test", settings(1), false));
        let (a, _a_peer) = tokio::io::duplex(64);
        let mut first = table.admit(a).expect("room for one");
        let (b, _b_peer) = tokio::io::duplex(64);
        // At the cap: the silent first connection makes room.
        let _second = table.admit(b).expect("room made");
        let mut buf = [0u8; 8];
        let err = first.read(&mut buf).await.expect_err("evicted");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        drop(first);
        assert_eq!(table.open.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn silence_past_the_first_byte_timeout_fails_the_read() {
        let table = Arc::new(ConnTable::new("test", settings(4), false));
        let (a, _peer) = tokio::io::duplex(64);
        let mut conn = table.admit(a).expect("admitted");
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_connection_that_spoke_is_not_evicted_on_grpc() {
        use tokio::io::AsyncWriteExt;
        let table = Arc::new(ConnTable::new("test", settings(1), false));
        let (a, mut a_peer) = tokio::io::duplex(64);
        let mut first = table.admit(a).expect("room for one");
        a_peer.write_all(b"x").await.expect("write");
        let mut buf = [0u8; 1];
        first.read_exact(&mut buf).await.expect("read");
        let (b, _b_peer) = tokio::io::duplex(64);
        assert!(
            table.admit(b).is_err(),
            "no room: the only connection is in use"
        );
    }
}

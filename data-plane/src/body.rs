//! The response body every handler returns: either bytes the proxy produced
//! itself or an upstream body passed through [`crate::stream`]. An enum, not a
//! boxed trait object, so the hot path does not allocate for it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::accounting::Tracker;
use crate::key_limits::KeyPermit;
// Re-exported: `BoxError` lives in `stream`, which must not name `body`.
pub(crate) use crate::stream::BoxError;
use crate::stream::UpstreamBody;

/// Response body of the proxy. The upstream variant is large but moved only
/// once into hyper; boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum ProxyBody {
    /// A complete body produced by the proxy (errors, `/v1/models`, health).
    Full(Option<Bytes>),
    /// An upstream response streamed through to the client.
    Upstream(UpstreamBody<Incoming, Tracker>),
    /// A body holding its client key's in-flight permit (`max_parallel`)
    /// until it ends or is dropped. Boxed: only limited keys pay for it.
    Guarded(Box<ProxyBody>, #[allow(dead_code)] KeyPermit), // held for its drop
    /// An upstream response watched for a client that stopped reading
    /// ([`ProxyBody::watch`]).
    Watched(Arc<Watch>),
}

/// An upstream body shared with its write-timeout watchdog.
pub(crate) struct Watch {
    body: Mutex<Option<UpstreamBody<Incoming, Tracker>>>,
    /// Milliseconds (since `start`) when the last frame was handed to the
    /// connection; `u64::MAX` while the body waits on the upstream (a slow
    /// upstream is not a slow reader).
    handed_at: AtomicU64,
    start: std::time::Instant,
}

impl Watch {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// Drops `w`'s upstream body once the connection has not asked for the
/// next frame for `timeout` after the last one (the client stopped
/// reading): the upstream connection and the buffered bytes are released,
/// and the next poll ends the response with an error. Ends when the body is
/// dropped.
async fn watchdog(w: std::sync::Weak<Watch>, timeout: Duration) {
    let t = timeout.as_millis() as u64;
    loop {
        let Some(s) = w.upgrade() else { return };
        let handed = s.handed_at.load(Ordering::Acquire);
        let now = s.now_ms();
        let wait = if handed == u64::MAX {
            t
        } else if now >= handed.saturating_add(t) {
            let mut dropped = s.body.lock().take();
            if let Some(body) = dropped.as_mut() {
                // Released now, not drained: the client reads no more.
                body.abandon();
                crate::metrics::write_timeout();
                tracing::debug!(
                    timeout_ms = t,
                    "client stopped reading its response: upstream released"
                );
            }
            drop(dropped);
            return;
        } else {
            handed.saturating_add(t) - now
        };
        drop(s);
        tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
    }
}

impl ProxyBody {
    /// A complete body.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let b: Bytes = bytes.into();
        ProxyBody::Full(if b.is_empty() { None } else { Some(b) })
    }

    /// An upstream body under a write timeout (`--write-timeout`; zero:
    /// none): a client that stops reading for that long has the upstream
    /// released. Other bodies are returned as they are.
    pub(crate) fn watch(self, timeout: Duration) -> Self {
        match self {
            ProxyBody::Upstream(u) if !timeout.is_zero() => {
                let w = Arc::new(Watch {
                    body: Mutex::new(Some(u)),
                    handed_at: AtomicU64::new(u64::MAX),
                    start: std::time::Instant::now(),
                });
                tokio::spawn(watchdog(Arc::downgrade(&w), timeout));
                ProxyBody::Watched(w)
            }
            other => other,
        }
    }

    /// The client was cut off by the write timeout: an upstream body still
    /// held is marked to close its upstream connection when dropped rather
    /// than be drained ([`UpstreamBody::abandon`]). False when the body's
    /// own write-timeout watchdog had released it already (and counted it).
    pub(crate) fn abandon(&mut self) -> bool {
        match self {
            ProxyBody::Full(_) => true,
            ProxyBody::Upstream(u) => {
                u.abandon();
                true
            }
            ProxyBody::Guarded(b, _) => b.abandon(),
            ProxyBody::Watched(w) => match w.body.lock().as_mut() {
                Some(b) => {
                    b.abandon();
                    true
                }
                None => false,
            },
        }
    }

    /// This body, holding `permit` until it is dropped.
    pub(crate) fn guarded(self, permit: KeyPermit) -> Self {
        ProxyBody::Guarded(Box::new(self), permit)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(s) => Pin::new(s).poll_frame(cx),
            ProxyBody::Guarded(b, _) => Pin::new(b.as_mut()).poll_frame(cx),
            ProxyBody::Watched(w) => {
                let mut slot = w.body.lock();
                let Some(b) = slot.as_mut() else {
                    return Poll::Ready(Some(Err(
                        "write timeout: the client stopped reading".into()
                    )));
                };
                let polled = Pin::new(b).poll_frame(cx);
                let at = match &polled {
                    Poll::Pending => u64::MAX,
                    Poll::Ready(_) => w.now_ms(),
                };
                w.handed_at.store(at, Ordering::Release);
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Upstream(s) => s.is_end_stream(),
            ProxyBody::Guarded(b, _) => b.is_end_stream(),
            // Released: not an end (the next poll fails the response).
            ProxyBody::Watched(w) => w.body.lock().as_ref().is_some_and(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream(s) => s.size_hint(),
            ProxyBody::Guarded(b, _) => b.size_hint(),
            ProxyBody::Watched(w) => w
                .body
                .lock()
                .as_ref()
                .map(|b| b.size_hint())
                .unwrap_or_default(),
        }
    }
}

//! The response body every handler returns: either bytes the proxy produced
//! itself or an upstream body passed through [`crate::stream`]. An enum, not a
//! boxed trait object, so the hot path does not allocate for it.

use std::pin::Pin;
use std::task::{Context, Poll};

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
}

impl ProxyBody {
    /// A complete body.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let b: Bytes = bytes.into();
        ProxyBody::Full(if b.is_empty() { None } else { Some(b) })
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Upstream(s) => s.is_end_stream(),
            ProxyBody::Guarded(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream(s) => s.size_hint(),
            ProxyBody::Guarded(b, _) => b.size_hint(),
        }
    }
}

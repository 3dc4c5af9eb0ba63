//! Streaming of upstream response bodies to the client.
//!
//! Frames are forwarded as they arrive (no buffering or re-chunking). An
//! [`Observer`] sees the first byte (time to first token), every data chunk
//! and how the body ended. If the upstream dies mid-stream on an SSE response
//! the client first receives an SSE `error` event, then the body ends with an
//! error, so the client never mistakes a truncated stream for a complete one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::body::BoxError;

/// The SSE event sent to the client when the upstream disconnects mid-stream.
pub const SSE_UPSTREAM_DISCONNECTED: &[u8] = b"data: {\"error\":{\"message\":\"The upstream backend disconnected mid-stream.\",\"type\":\"upstream_error\",\"code\":\"upstream_disconnected\"}}\n\n";

/// How an upstream body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The upstream finished the body cleanly.
    Complete,
    /// The upstream body failed (reset, timeout, protocol error).
    UpstreamError,
    /// The client went away before the body finished.
    ClientGone,
}

/// Watches a body on its way to the client.
pub trait Observer: Send + 'static {
    /// Called for each data chunk, before it is handed to the client.
    fn on_data(&mut self, chunk: &Bytes);
    /// Called exactly once when the body ends, however it ends.
    fn on_end(&mut self, end: End);
}

impl Observer for () {
    fn on_data(&mut self, _: &Bytes) {}
    fn on_end(&mut self, _: End) {}
}

/// Time the connection gets to flush the SSE error event before the body
/// fails: hyper drops unflushed bytes when a body errors.
const FLUSH_BEFORE_ERROR: Duration = Duration::from_millis(10);

enum State {
    Streaming,
    /// The SSE error event was handed over; after a short flush delay the
    /// body yields this error.
    Failing(BoxError, Pin<Box<Sleep>>),
    Done,
}

/// An upstream body passed through to the client.
pub struct UpstreamBody<B, O: Observer> {
    inner: B,
    sse: bool,
    state: State,
    observer: Option<O>,
}

impl<B, O: Observer> UpstreamBody<B, O> {
    /// Wraps `inner`; `sse` enables the error event on mid-stream failure.
    pub fn new(inner: B, sse: bool, observer: O) -> Self {
        UpstreamBody {
            inner,
            sse,
            state: State::Streaming,
            observer: Some(observer),
        }
    }

    fn finish(&mut self, end: End) {
        if let Some(mut o) = self.observer.take() {
            o.on_end(end);
        }
    }
}

impl<B, O> Body for UpstreamBody<B, O>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    O: Observer + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match std::mem::replace(&mut this.state, State::Done) {
            State::Done => return Poll::Ready(None),
            State::Failing(e, mut flush) => {
                if flush.as_mut().poll(cx).is_pending() {
                    this.state = State::Failing(e, flush);
                    return Poll::Pending;
                }
                return Poll::Ready(Some(Err(e)));
            }
            State::Streaming => this.state = State::Streaming,
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(o)) = (frame.data_ref(), this.observer.as_mut()) {
                    o.on_data(data);
                }
                // A body of known length is complete when its last byte is
                // read; hyper may drop it without polling for the end.
                if this.inner.is_end_stream() {
                    this.state = State::Done;
                    this.finish(End::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.state = State::Done;
                this.finish(End::Complete);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                tracing::debug!(error = %e, "upstream body failed mid-stream");
                this.finish(End::UpstreamError);
                if this.sse {
                    this.state =
                        State::Failing(e, Box::pin(tokio::time::sleep(FLUSH_BEFORE_ERROR)));
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        SSE_UPSTREAM_DISCONNECTED,
                    )))))
                } else {
                    this.state = State::Done;
                    Poll::Ready(Some(Err(e)))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.state {
            State::Streaming => self.inner.is_end_stream(),
            State::Failing(..) => false,
            State::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Streaming if !self.sse => self.inner.size_hint(),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl<B, O: Observer> Drop for UpstreamBody<B, O> {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or the server shut down).
        self.finish(End::ClientGone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<(usize, Option<End>)>>);
    impl Observer for Seen {
        fn on_data(&mut self, _: &Bytes) {
            if let Ok(mut g) = self.0.lock() {
                g.0 += 1;
            }
        }
        fn on_end(&mut self, end: End) {
            if let Ok(mut g) = self.0.lock() {
                g.1 = Some(end);
            }
        }
    }

    fn body_of(
        items: Vec<Result<&'static str, &'static str>>,
    ) -> impl Body<Data = Bytes, Error = BoxError> + Unpin {
        let frames = items.into_iter().map(|i| match i {
            Ok(s) => Ok(Frame::data(Bytes::from_static(s.as_bytes()))),
            Err(e) => Err(BoxError::from(e)),
        });
        StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn mid_stream_failure_injects_sse_error_then_errors() {
        let seen = Seen::default();
        let mut b = UpstreamBody::new(
            body_of(vec![Ok("data: {\"a\":1}\n\n"), Err("reset")]),
            true,
            seen.clone(),
        );
        let f1 = b.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&f1[..], b"data: {\"a\":1}\n\n");
        let f2 = b.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&f2[..], SSE_UPSTREAM_DISCONNECTED);
        assert!(b.frame().await.unwrap().is_err());
        assert!(b.frame().await.is_none());
        assert_eq!(seen.0.lock().unwrap().1, Some(End::UpstreamError));
        assert_eq!(seen.0.lock().unwrap().0, 1);
    }

    #[tokio::test]
    async fn non_sse_failure_is_a_plain_error() {
        let mut b = UpstreamBody::new(body_of(vec![Ok("{\"a\""), Err("reset")]), false, ());
        assert!(b.frame().await.unwrap().is_ok());
        assert!(b.frame().await.unwrap().is_err());
    }

    #[tokio::test]
    async fn clean_end_and_drop_are_reported_once() {
        let seen = Seen::default();
        let mut b = UpstreamBody::new(body_of(vec![Ok("x")]), true, seen.clone());
        while let Some(f) = b.frame().await {
            f.unwrap();
        }
        drop(b);
        assert_eq!(seen.0.lock().unwrap().1, Some(End::Complete));

        let seen = Seen::default();
        let b = UpstreamBody::new(body_of(vec![Ok("x")]), true, seen.clone());
        drop(b);
        assert_eq!(seen.0.lock().unwrap().1, Some(End::ClientGone));
    }
}

//! Streaming of upstream response bodies to the client.
//!
//! Frames are forwarded as they arrive (no buffering or re-chunking). An
//! [`Observer`] sees the first byte (time to first token), every data chunk
//! and how the body ended. If the upstream dies mid-stream on an SSE response
//! the client first receives an SSE `error` event in the stream's own
//! protocol ([`disconnected_event`]: what that protocol's SDKs raise as an
//! error), then the body ends with an error, so the client never mistakes a
//! truncated stream for a complete one.
//!
//! Optional extras:
//!
//! - an `SseUsage` scanner reads the stream's usage and removes the usage
//!   chunk the proxy asked for on the client's behalf (`crate::usage`);
//! - a drain deadline: when the client goes away mid-answer the rest of the
//!   upstream body is read in the background (until the request deadline),
//!   so the observer still learns what the upstream produced;
//! - time limits: with a request deadline ([`UpstreamBody::drain_until`])
//!   the body is cut when it passes, and every body is cut when the
//!   upstream sends nothing for the stream idle timeout
//!   ([`set_idle_timeout`], `--stream-idle-timeout`). A cut body ends like
//!   a broken one (the error event in the stream's protocol, then an
//!   error), the upstream connection is closed, and the observer gets the
//!   usage seen so far;
//! - a [`StreamTranslator`] for a stream served by a backend of the other
//!   protocol: the observer and the scanner see the upstream's bytes, the
//!   client the translator's. The error event is then in the client's
//!   protocol ([`UpstreamBody::with_dialect`]) and bypasses the translator.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::translate::StreamTranslator;
use crate::usage::{Dialect, SseTally, SseUsage};

/// Boxed error of a response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The SSE event sent to a chat or completions client when the upstream
/// disconnects mid-stream (the OpenAI SDK raises a stream chunk holding
/// `error`).
pub const SSE_UPSTREAM_DISCONNECTED: &[u8] = b"data: {\"error\":{\"message\":\"The upstream backend disconnected mid-stream.\",\"type\":\"upstream_error\",\"code\":\"upstream_disconnected\"}}\n\n";

/// The same for a Messages client: Anthropic's stream `error` event (the
/// SDK raises on `event: error`).
pub const MESSAGES_UPSTREAM_DISCONNECTED: &[u8] = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"The upstream backend disconnected mid-stream.\"}}\n\n";

/// The error event for a stream of `dialect`. A Responses stream gets the
/// Responses `error` event, numbered after the last event the scanner saw
/// (`sequence_number` is a required field of that event).
pub fn disconnected_event(dialect: Dialect, tally: Option<&SseTally>) -> Bytes {
    match dialect {
        Dialect::Chat => Bytes::from_static(SSE_UPSTREAM_DISCONNECTED),
        Dialect::Messages => Bytes::from_static(MESSAGES_UPSTREAM_DISCONNECTED),
        Dialect::Responses => error_event(dialect, tally, Cut::Disconnected),
    }
}

/// Why a stream was ended before the upstream finished it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The upstream body failed.
    Disconnected,
    /// The request deadline passed mid-stream.
    Deadline,
    /// The upstream sent nothing for the stream idle timeout.
    Idle,
}

impl Cut {
    fn code(self) -> &'static str {
        match self {
            Cut::Disconnected => "upstream_disconnected",
            Cut::Deadline => "request_timeout",
            Cut::Idle => "stream_idle_timeout",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Cut::Disconnected => "The upstream backend disconnected mid-stream.",
            Cut::Deadline => "The request deadline passed mid-stream.",
            Cut::Idle => "The upstream backend sent nothing for too long mid-stream.",
        }
    }
}

/// The error event ending a stream of `dialect` for `cut`: the OpenAI
/// error chunk (chat, completions), Anthropic's `event: error` (Messages)
/// or the Responses `error` event numbered after the last one seen.
pub fn error_event(dialect: Dialect, tally: Option<&SseTally>, cut: Cut) -> Bytes {
    let (code, message) = (cut.code(), cut.message());
    match dialect {
        Dialect::Chat if cut == Cut::Disconnected => Bytes::from_static(SSE_UPSTREAM_DISCONNECTED),
        Dialect::Messages if cut == Cut::Disconnected => {
            Bytes::from_static(MESSAGES_UPSTREAM_DISCONNECTED)
        }
        Dialect::Chat => Bytes::from(format!(
            "data: {{\"error\":{{\"message\":\"{message}\",\"type\":\"upstream_error\",\"code\":\"{code}\"}}}}\n\n"
        )),
        Dialect::Messages => Bytes::from(format!(
            "event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"api_error\",\"message\":\"{message}\"}}}}\n\n"
        )),
        Dialect::Responses => {
            let seq = tally
                .and_then(|t| t.sequence_number)
                .map_or(0, |n| n.saturating_add(1));
            Bytes::from(format!(
                "event: error\ndata: {{\"type\":\"error\",\"code\":\"{code}\",\"message\":\"{message}\",\"param\":null,\"sequence_number\":{seq}}}\n\n"
            ))
        }
    }
}

/// The stream idle timeout in milliseconds (0 = none); process-wide, set
/// by the server from `ServerLimits::stream_idle_timeout`.
static IDLE_TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);

/// Sets the stream idle timeout for bodies created from now on (zero
/// disables it).
pub fn set_idle_timeout(timeout: Duration) {
    IDLE_TIMEOUT_MS.store(
        u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

fn idle_timeout() -> Option<Duration> {
    match IDLE_TIMEOUT_MS.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// The request deadline and the idle timeout of one body.
struct Limits {
    deadline: Option<Pin<Box<Sleep>>>,
    idle: Option<Duration>,
    idle_sleep: Option<Pin<Box<Sleep>>>,
    /// When the upstream last sent data.
    last_data: Instant,
}

impl Limits {
    /// Whether a limit passed (to be checked when the body is pending).
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Option<Cut> {
        if let Some(d) = self.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            return Some(Cut::Deadline);
        }
        let idle = self.idle?;
        loop {
            let due = self.last_data + idle;
            let sleep = self
                .idle_sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if sleep.deadline() != due {
                // Data came since the timer was set: move it (lazily, so a
                // fast stream does not touch the timer for every chunk).
                sleep.as_mut().reset(due);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
            if Instant::now() >= self.last_data + idle {
                return Some(Cut::Idle);
            }
        }
    }
}

/// How an upstream body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The upstream finished the body cleanly.
    Complete,
    /// The upstream body failed (reset, timeout, protocol error).
    UpstreamError,
    /// The client went away before the body finished (the rest may still
    /// have been drained for accounting).
    ClientGone,
}

/// Watches a body on its way to the client.
pub trait Observer: Send + 'static {
    /// Called for each data chunk as the upstream sent it, before it is
    /// handed to the client.
    fn on_data(&mut self, chunk: &Bytes);
    /// Called exactly once when the body ends, however it ends, with what
    /// the SSE scanner saw (when there was one).
    fn on_end(&mut self, end: End, sse: Option<SseTally>);
}

impl Observer for () {
    fn on_data(&mut self, _: &Bytes) {}
    fn on_end(&mut self, _: End, _: Option<SseTally>) {}
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
pub struct UpstreamBody<B, O>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    O: Observer,
{
    /// `None` once handed to a background drain.
    inner: Option<B>,
    sse: bool,
    /// The protocol of the stream, for its error event.
    dialect: Dialect,
    scanner: Option<SseUsage>,
    /// Turns the upstream's events into the client's protocol.
    translator: Option<Box<dyn StreamTranslator>>,
    drain_until: Option<Instant>,
    limits: Limits,
    state: State,
    observer: Option<O>,
}

impl<B, O> UpstreamBody<B, O>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    O: Observer,
{
    /// Wraps `inner`; `sse` enables the error event on mid-stream failure.
    pub fn new(inner: B, sse: bool, observer: O) -> Self {
        UpstreamBody {
            inner: Some(inner),
            sse,
            dialect: Dialect::Chat,
            scanner: None,
            translator: None,
            drain_until: None,
            limits: Limits {
                deadline: None,
                idle: idle_timeout(),
                idle_sleep: None,
                last_data: Instant::now(),
            },
            state: State::Streaming,
            observer: Some(observer),
        }
    }

    /// The body's protocol (default `Dialect::Chat`): the shape of the
    /// error event sent when the upstream disconnects mid-stream.
    pub fn with_dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// Scans the body as SSE for usage (and strips the injected usage).
    pub fn with_scanner(mut self, scanner: SseUsage) -> Self {
        self.scanner = Some(scanner);
        self
    }

    /// Translates the stream for the client (after the observer and the
    /// scanner, which read the upstream's own bytes).
    pub(crate) fn with_translator(mut self, translator: Box<dyn StreamTranslator>) -> Self {
        self.translator = Some(translator);
        self
    }

    /// The client's bytes for `data` (the upstream's, past the scanner),
    /// with the translator's tail when the stream `ended`.
    fn for_client(&mut self, data: Bytes, ended: bool) -> Bytes {
        let Some(t) = self.translator.as_mut() else {
            return data;
        };
        let out = if data.is_empty() {
            Bytes::new()
        } else {
            t.feed(&data)
        };
        if !ended {
            return out;
        }
        let tail = t.finish();
        match (out.is_empty(), tail.is_empty()) {
            (_, true) => out,
            (true, false) => tail,
            (false, false) => [out, tail].concat().into(),
        }
    }

    /// The request deadline: the body is cut when it passes, and read on
    /// until then (for its usage) if the client goes away before its end.
    pub fn drain_until(mut self, deadline: Instant) -> Self {
        self.drain_until = Some(deadline);
        self.limits.deadline = Some(Box::pin(tokio::time::sleep_until(deadline)));
        self
    }

    /// Gives up the rest of the answer: dropped, the body closes its
    /// upstream connection at once instead of draining it in the background
    /// (for a client cut off by the write timeout: nobody reads on). The
    /// observer learns the usage seen so far.
    pub(crate) fn abandon(&mut self) {
        self.drain_until = None;
    }

    /// Ends the body early for `cut`: closes the upstream, tells the
    /// observer (with the usage seen so far), and on SSE sends the error
    /// event before the body fails.
    fn cut(&mut self, cut: Cut) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        tracing::warn!(reason = cut.code(), "ending a streamed answer early");
        self.inner = None;
        let tally = self.scanner.as_ref().map(SseUsage::tally);
        self.finish(End::UpstreamError);
        let e: BoxError = cut.message().into();
        if self.sse {
            self.state = State::Failing(e, Box::pin(tokio::time::sleep(FLUSH_BEFORE_ERROR)));
            return Poll::Ready(Some(Ok(Frame::data(error_event(
                self.dialect,
                tally.as_ref(),
                cut,
            )))));
        }
        self.state = State::Done;
        Poll::Ready(Some(Err(e)))
    }

    fn finish(&mut self, end: End) {
        if let Some(mut o) = self.observer.take() {
            o.on_end(end, self.scanner.as_ref().map(SseUsage::tally));
        }
    }
}

impl<B, O> Body for UpstreamBody<B, O>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
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
        loop {
            let Some(inner) = this.inner.as_mut() else {
                this.state = State::Done;
                return Poll::Ready(None);
            };
            match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Pending => {
                    return match this.limits.poll_cut(cx) {
                        Some(cut) => this.cut(cut),
                        None => Poll::Pending,
                    };
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let now = Instant::now();
                    this.limits.last_data = now;
                    if this.drain_until.is_some_and(|d| now >= d) {
                        // A stream that never pauses still ends on time.
                        return this.cut(Cut::Deadline);
                    }
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(other) => return Poll::Ready(Some(Ok(other))),
                    };
                    if let Some(o) = this.observer.as_mut() {
                        o.on_data(&data);
                    }
                    let mut out = match this.scanner.as_mut() {
                        Some(s) => s.feed(data),
                        None => data,
                    };
                    // A body of known length is complete when its last byte is
                    // read; hyper may drop it without polling for the end.
                    if inner.is_end_stream() {
                        if let Some(s) = this.scanner.as_mut() {
                            let rest = s.finish();
                            if !rest.is_empty() {
                                out = [out, rest].concat().into();
                            }
                        }
                        out = this.for_client(out, true);
                        this.state = State::Done;
                        this.finish(End::Complete);
                        if out.is_empty() {
                            return Poll::Ready(None);
                        }
                    } else {
                        out = this.for_client(out, false);
                        if out.is_empty() {
                            // An incomplete event held back: read on.
                            continue;
                        }
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(None) => {
                    this.state = State::Done;
                    let rest = this
                        .scanner
                        .as_mut()
                        .map_or_else(Bytes::new, SseUsage::finish);
                    let rest = this.for_client(rest, true);
                    this.finish(End::Complete);
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
                Poll::Ready(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    tracing::debug!(error = %e, "upstream body failed mid-stream");
                    let tally = this.scanner.as_ref().map(SseUsage::tally);
                    this.finish(End::UpstreamError);
                    if this.sse {
                        this.state =
                            State::Failing(e, Box::pin(tokio::time::sleep(FLUSH_BEFORE_ERROR)));
                        let event = disconnected_event(this.dialect, tally.as_ref());
                        return Poll::Ready(Some(Ok(Frame::data(event))));
                    }
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.state {
            State::Streaming => self.inner.as_ref().is_none_or(Body::is_end_stream),
            State::Failing(..) => false,
            State::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.state, &self.inner) {
            (State::Streaming, Some(inner))
                if !self.sse && self.scanner.is_none() && self.translator.is_none() =>
            {
                inner.size_hint()
            }
            (State::Done, _) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl<B, O> Drop for UpstreamBody<B, O>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    O: Observer,
{
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or the server shut down).
        let Some(observer) = self.observer.take() else {
            return;
        };
        if let (State::Streaming, Some(deadline), Ok(rt)) = (
            &self.state,
            self.drain_until,
            tokio::runtime::Handle::try_current(),
        ) && let Some(inner) = self.inner.take()
        {
            rt.spawn(drain(inner, self.scanner.take(), observer, deadline));
            return;
        }
        let mut observer = observer;
        observer.on_end(End::ClientGone, self.scanner.as_ref().map(SseUsage::tally));
    }
}

/// Reads what is left of an upstream body after the client left, so the
/// observer learns the real usage; bounded by the request deadline.
async fn drain<B, O>(
    mut inner: B,
    mut scanner: Option<SseUsage>,
    mut observer: O,
    deadline: Instant,
) where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    O: Observer,
{
    let read = async {
        while let Some(frame) = inner.frame().await {
            let Ok(frame) = frame else { return };
            if let Some(data) = frame.data_ref() {
                observer.on_data(data);
                if let Some(s) = scanner.as_mut() {
                    s.observe(data);
                }
            }
        }
        if let Some(s) = scanner.as_mut() {
            s.finish();
        }
    };
    if tokio::time::timeout_at(deadline, read).await.is_err() {
        tracing::debug!("request deadline passed while draining an abandoned answer");
    }
    observer.on_end(End::ClientGone, scanner.as_ref().map(SseUsage::tally));
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use parking_lot::Mutex;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<(usize, Option<End>)>>);
    impl Observer for Seen {
        fn on_data(&mut self, _: &Bytes) {
            self.0.lock().0 += 1;
        }
        fn on_end(&mut self, end: End, _: Option<SseTally>) {
            self.0.lock().1 = Some(end);
        }
    }

    fn body_of(
        items: Vec<Result<&'static str, &'static str>>,
    ) -> impl Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static {
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
        assert_eq!(seen.0.lock().1, Some(End::UpstreamError));
        assert_eq!(seen.0.lock().0, 1);
    }

    /// One chunk, then nothing ever again.
    fn stalled_after(
        first: &'static str,
    ) -> impl Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static {
        use futures::StreamExt as _;
        let frames = futures::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from_static(
            first.as_bytes(),
        )))])
        .chain(futures::stream::pending());
        StreamBody::new(frames)
    }

    /// A chunk every 100 ms, forever.
    fn endless() -> impl Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static {
        let frames = futures::stream::unfold(0u64, |n| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let event = format!(
                "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{n},\"delta\":\"x\"}}\n\n"
            );
            Some((Ok::<_, BoxError>(Frame::data(Bytes::from(event))), n + 1))
        });
        StreamBody::new(Box::pin(frames))
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_is_ended_by_the_idle_timeout() {
        let seen = Seen::default();
        let mut b = UpstreamBody::new(stalled_after("data: {\"a\":1}\n\n"), true, seen.clone());
        b.limits.idle = Some(Duration::from_secs(5));
        let started = Instant::now();
        let f1 = b.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&f1[..], b"data: {\"a\":1}\n\n");
        let f2 = b.frame().await.unwrap().unwrap().into_data().unwrap();
        let (_, data) = parse_event(&f2);
        assert_eq!(data["error"]["code"], "stream_idle_timeout");
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert!(b.frame().await.unwrap().is_err());
        assert!(b.frame().await.is_none());
        assert_eq!(*seen.0.lock(), (1, Some(End::UpstreamError)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_stream_is_ended_at_the_request_deadline() {
        let seen = Tallied::default();
        let mut b = UpstreamBody::new(endless(), true, seen.clone())
            .with_dialect(Dialect::Responses)
            .with_scanner(SseUsage::reading(Dialect::Responses))
            .drain_until(Instant::now() + Duration::from_secs(2));
        b.limits.idle = Some(Duration::from_secs(1));
        let mut last = Bytes::new();
        let mut frames = 0;
        while let Some(Ok(frame)) = b.frame().await {
            last = frame.into_data().unwrap();
            frames += 1;
            assert!(frames < 100, "the stream was not cut");
        }
        let (name, data) = parse_event(&last);
        assert_eq!(name.as_deref(), Some("error"));
        assert_eq!(data["code"], "request_timeout");
        // Numbered after the last delta the client saw.
        assert_eq!(data["sequence_number"], frames - 1);
        assert!(matches!(
            *seen.0.lock(),
            Some((End::UpstreamError, Some(_)))
        ));
    }

    type Ended = Option<(End, Option<SseTally>)>;
    #[derive(Clone, Default)]
    struct Tallied(Arc<Mutex<Ended>>);
    impl Observer for Tallied {
        fn on_data(&mut self, _: &Bytes) {}
        fn on_end(&mut self, end: End, sse: Option<SseTally>) {
            *self.0.lock() = Some((end, sse));
        }
    }

    const USAGE_EVENT: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n";

    #[tokio::test]
    async fn usage_chunk_is_stripped_and_counted() {
        let seen = Tallied::default();
        let mut b = UpstreamBody::new(
            body_of(vec![
                Ok("data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choi"),
                Ok("ces\":[],\"usage\":{\"prompt_tokens\":3,"),
                Ok("\"completion_tokens\":2}}\n\n"),
                Ok("data: [DONE]\n\n"),
            ]),
            true,
            seen.clone(),
        )
        .with_scanner(SseUsage::new(true));
        let mut got = Vec::new();
        while let Some(f) = b.frame().await {
            got.extend_from_slice(&f.unwrap().into_data().unwrap());
        }
        assert_eq!(
            std::str::from_utf8(&got).unwrap(),
            "data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: [DONE]\n\n"
        );
        let (end, tally) = seen.0.lock().clone().unwrap();
        assert_eq!(end, End::Complete);
        let tally = tally.unwrap();
        assert_eq!(tally.content_events, 1);
        assert_eq!(tally.usage.map(|u| u.total_tokens), Some(5));
    }

    #[tokio::test]
    async fn an_abandoned_body_is_drained_for_its_usage() {
        let seen = Tallied::default();
        let mut b = UpstreamBody::new(
            body_of(vec![
                Ok("data: {\"choices\":[{\"text\":\"a\"}]}\n\n"),
                Ok("data: {\"choices\":[{\"text\":\"b\"}]}\n\n"),
                Ok(USAGE_EVENT),
            ]),
            true,
            seen.clone(),
        )
        .with_scanner(SseUsage::new(true))
        .drain_until(Instant::now() + Duration::from_secs(5));
        b.frame().await.unwrap().unwrap();
        drop(b);
        for _ in 0..100 {
            if seen.0.lock().is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let (end, tally) = seen.0.lock().clone().unwrap();
        assert_eq!(end, End::ClientGone);
        let tally = tally.unwrap();
        assert_eq!(tally.content_events, 2);
        assert_eq!(tally.usage.map(|u| u.completion_tokens), Some(2));
    }

    /// What the client gets when the upstream breaks off after `first`.
    async fn broken_stream(dialect: Dialect, first: &'static str) -> (Bytes, Bytes) {
        let mut b = UpstreamBody::new(body_of(vec![Ok(first), Err("reset")]), true, ())
            .with_dialect(dialect);
        if dialect != Dialect::Chat {
            b = b.with_scanner(SseUsage::reading(dialect));
        }
        let f1 = b.frame().await.unwrap().unwrap().into_data().unwrap();
        let f2 = b.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(b.frame().await.unwrap().is_err());
        (f1, f2)
    }

    /// The `data:` JSON of an SSE event, and its `event:` name.
    fn parse_event(ev: &[u8]) -> (Option<String>, serde_json::Value) {
        let text = std::str::from_utf8(ev).unwrap();
        assert!(text.ends_with("\n\n"), "{text:?}");
        let mut name = None;
        let mut data = None;
        for line in text.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str(d).unwrap());
            }
        }
        (name, data.unwrap())
    }

    #[tokio::test]
    async fn a_broken_messages_stream_ends_with_an_anthropic_error_event() {
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n";
        let (f1, f2) = broken_stream(Dialect::Messages, start).await;
        assert_eq!(&f1[..], start.as_bytes());
        let (name, data) = parse_event(&f2);
        assert_eq!(name.as_deref(), Some("error"));
        assert_eq!(data["type"], "error");
        assert_eq!(data["error"]["type"], "api_error");
        assert!(
            data["error"]["message"]
                .as_str()
                .unwrap()
                .contains("disconnected")
        );
    }

    #[tokio::test]
    async fn a_broken_responses_stream_ends_with_a_numbered_responses_error_event() {
        let created = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"usage\":null},\"sequence_number\":0}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\",\"sequence_number\":1}\n\n";
        let (_, f2) = broken_stream(Dialect::Responses, created).await;
        let (name, data) = parse_event(&f2);
        assert_eq!(name.as_deref(), Some("error"));
        assert_eq!(
            data,
            serde_json::json!({
                "type": "error",
                "code": "upstream_disconnected",
                "message": "The upstream backend disconnected mid-stream.",
                "param": null,
                "sequence_number": 2,
            })
        );
        // Without a scanner (nothing seen), the first number.
        assert!(
            std::str::from_utf8(&disconnected_event(Dialect::Responses, None))
                .unwrap()
                .contains("\"sequence_number\":0}")
        );
    }

    #[tokio::test]
    async fn a_broken_chat_stream_keeps_the_openai_error_chunk() {
        let (_, f2) = broken_stream(Dialect::Chat, "data: {\"a\":1}\n\n").await;
        assert_eq!(&f2[..], SSE_UPSTREAM_DISCONNECTED);
        let (name, data) = parse_event(&f2);
        assert_eq!(name, None);
        assert_eq!(data["error"]["code"], "upstream_disconnected");
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
        assert_eq!(seen.0.lock().1, Some(End::Complete));

        let seen = Seen::default();
        let b = UpstreamBody::new(body_of(vec![Ok("x")]), true, seen.clone());
        drop(b);
        assert_eq!(seen.0.lock().1, Some(End::ClientGone));
    }
}

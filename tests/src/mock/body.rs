//! Response bodies: whole JSON answers, paced SSE streams, and answers cut
//! short on purpose. Each owns the request's [`RecordGuard`], so the record
//! says what was really handed to the connection.

use super::openai::{ChunkWriter, DONE, Reply};
use super::record::{Outcome, RecordGuard};
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::Sleep;

/// Time given to the connection to flush what was written before a scripted
/// abort. Without it, hyper may drop its write buffer along with the
/// connection and the client would see nothing at all.
const FLUSH_BEFORE_ABORT: Duration = Duration::from_millis(20);

/// The error a body returns to make hyper abort the connection.
#[derive(Debug)]
pub struct ScriptedAbort;

impl fmt::Display for ScriptedAbort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection aborted by the mock's script")
    }
}

impl std::error::Error for ScriptedAbort {}

/// The body of every mock response.
pub struct MockBody {
    kind: Kind,
    guard: Option<RecordGuard>,
}

enum Kind {
    /// One chunk; the outcome and completion tokens are filed once it is
    /// handed over.
    Full {
        data: Option<Bytes>,
        outcome: Outcome,
        tokens: u64,
    },
    Stream(Box<SseStream>),
    Events(Box<EventStream>),
    /// Sends `head`, then aborts.
    Cut {
        head: Option<Bytes>,
        abort: AbortState,
    },
}

impl MockBody {
    /// A whole body that is not part of the record (control API).
    pub(crate) fn unrecorded(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: Some(data),
                outcome: Outcome::Ok,
                tokens: 0,
            },
            guard: None,
        }
    }

    /// A whole body; `outcome` and `tokens` are recorded once it is sent.
    pub(crate) fn full(data: Bytes, guard: RecordGuard, outcome: Outcome, tokens: u64) -> Self {
        Self {
            kind: Kind::Full {
                data: Some(data),
                outcome,
                tokens,
            },
            guard: Some(guard),
        }
    }

    /// The first half of `data`, then an abort.
    pub(crate) fn cut(data: Bytes, guard: RecordGuard) -> Self {
        let head = data.slice(..data.len() / 2);
        Self {
            kind: Kind::Cut {
                head: Some(head),
                abort: AbortState::default(),
            },
            guard: Some(guard),
        }
    }

    /// A prebuilt SSE event sequence (Anthropic Messages, Responses).
    pub(crate) fn events(stream: EventStream, guard: RecordGuard) -> Self {
        Self {
            kind: Kind::Events(Box::new(stream)),
            guard: Some(guard),
        }
    }

    pub(crate) fn stream(stream: SseStream, guard: RecordGuard) -> Self {
        Self {
            kind: Kind::Stream(Box::new(stream)),
            guard: Some(guard),
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = ScriptedAbort;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ScriptedAbort>>> {
        let this = self.get_mut();
        let item = match &mut this.kind {
            Kind::Full {
                data,
                outcome,
                tokens,
            } => {
                let item = data.take();
                if item.is_some()
                    && let Some(guard) = this.guard.as_mut()
                {
                    guard.add_sent(*tokens);
                    guard.set_outcome(*outcome);
                }
                item.map(Ok)
            }
            Kind::Cut { head, abort } => match head.take() {
                Some(head) => Some(Ok(head)),
                None => Some(Err(ready!(abort.poll(cx, this.guard.as_mut())))),
            },
            Kind::Stream(stream) => ready!(stream.poll_next(cx, this.guard.as_mut())),
            Kind::Events(stream) => ready!(stream.poll_next(cx, this.guard.as_mut())),
        };
        Poll::Ready(item.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data, .. } => data.is_none(),
            Kind::Stream(s) => matches!(s.step, Step::End),
            Kind::Events(s) => s.next >= s.events.len(),
            Kind::Cut { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            _ => SizeHint::default(),
        }
    }
}

/// Lets the connection flush, then fails the body — or, stalling, never
/// ends it (the connection stays open with nothing more sent).
#[derive(Default)]
struct AbortState {
    flush: Option<Pin<Box<Sleep>>>,
    stall: bool,
}

impl AbortState {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        guard: Option<&mut RecordGuard>,
    ) -> Poll<ScriptedAbort> {
        if self.stall {
            // A stalled upstream: nothing more, ever (until the client
            // closes the connection and the body is dropped).
            return Poll::Pending;
        }
        let flush = self
            .flush
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(FLUSH_BEFORE_ABORT)));
        ready!(flush.as_mut().poll(cx));
        if let Some(guard) = guard {
            guard.set_outcome(Outcome::Reset);
        }
        Poll::Ready(ScriptedAbort)
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Role,
    Token(usize),
    Usage,
    Done,
    End,
}

/// One streamed answer: role chunk (chat), one chunk per token, the finish
/// chunk, the usage chunk when asked for, `[DONE]`.
pub(crate) struct SseStream {
    writer: ChunkWriter,
    reply: Reply,
    prompt_tokens: u64,
    cached_tokens: u64,
    include_usage: bool,
    /// Abort once this many content chunks were sent.
    cut_after: Option<usize>,
    chunk_delay: Duration,
    step: Step,
    started: bool,
    pacing: Option<Pin<Box<Sleep>>>,
    abort: AbortState,
}

impl SseStream {
    pub(crate) fn new(
        writer: ChunkWriter,
        reply: Reply,
        prompt_tokens: u64,
        cached_tokens: u64,
        include_usage: bool,
        cut_after: Option<u32>,
        chunk_delay: Duration,
    ) -> Self {
        let cut_after =
            cut_after.map(|n| usize::try_from(n).unwrap_or(usize::MAX).min(reply.len()));
        Self {
            writer,
            reply,
            prompt_tokens,
            cached_tokens,
            include_usage,
            cut_after,
            chunk_delay,
            step: Step::Role,
            started: false,
            pacing: None,
            abort: AbortState::default(),
        }
    }

    /// Stalls instead of aborting at `cut_after` (`reset: stall`).
    pub(crate) fn stall(mut self, on: bool) -> Self {
        self.abort.stall = on;
        self
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        mut guard: Option<&mut RecordGuard>,
    ) -> Poll<Option<Result<Bytes, ScriptedAbort>>> {
        loop {
            if let Step::Token(i) = self.step
                && self.cut_after == Some(i)
            {
                return Poll::Ready(Some(Err(ready!(self.abort.poll(cx, guard)))));
            }
            if matches!(self.step, Step::End) {
                return Poll::Ready(None);
            }
            // Pace every event after the first one.
            if self.started && !self.chunk_delay.is_zero() {
                let pacing = self
                    .pacing
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(self.chunk_delay)));
                ready!(pacing.as_mut().poll(cx));
                self.pacing = None;
            }
            let event = match self.step {
                Step::Role => {
                    self.step = Step::Token(0);
                    match self.writer.role() {
                        Some(event) => event,
                        None => continue,
                    }
                }
                Step::Token(i) if i < self.reply.len() => {
                    self.step = Step::Token(i + 1);
                    if let Some(g) = guard.as_deref_mut() {
                        g.add_sent(1);
                    }
                    self.writer.token(&self.reply.delta(i))
                }
                Step::Token(_) => {
                    self.step = if self.include_usage {
                        Step::Usage
                    } else {
                        Step::Done
                    };
                    self.writer.finish(self.reply.truncated())
                }
                Step::Usage => {
                    self.step = Step::Done;
                    self.writer.usage(
                        self.prompt_tokens,
                        self.reply.len() as u64,
                        self.cached_tokens,
                    )
                }
                Step::Done => {
                    self.step = Step::End;
                    if let Some(g) = guard.as_deref_mut() {
                        g.set_outcome(Outcome::Ok);
                    }
                    Bytes::from_static(DONE)
                }
                Step::End => return Poll::Ready(None),
            };
            self.started = true;
            return Poll::Ready(Some(Ok(event)));
        }
    }
}

/// A streamed answer whose events are all rendered up front: each is sent in
/// order (paced by the chunk delay), the token-carrying ones counted as sent.
/// With `cut_after`, the connection is aborted before the content token of
/// that index (or after the last one).
pub(crate) struct EventStream {
    events: Vec<(Bytes, bool)>,
    next: usize,
    tokens_total: usize,
    tokens_sent: usize,
    cut_after: Option<usize>,
    chunk_delay: Duration,
    pacing: Option<Pin<Box<Sleep>>>,
    abort: AbortState,
}

impl EventStream {
    pub(crate) fn new(
        events: Vec<(Bytes, bool)>,
        cut_after: Option<u32>,
        chunk_delay: Duration,
    ) -> Self {
        let tokens_total = events.iter().filter(|(_, t)| *t).count();
        Self {
            events,
            next: 0,
            tokens_total,
            tokens_sent: 0,
            cut_after: cut_after
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX).min(tokens_total)),
            chunk_delay,
            pacing: None,
            abort: AbortState::default(),
        }
    }

    /// Stalls instead of aborting at `cut_after` (`reset: stall`).
    pub(crate) fn stall(mut self, on: bool) -> Self {
        self.abort.stall = on;
        self
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        guard: Option<&mut RecordGuard>,
    ) -> Poll<Option<Result<Bytes, ScriptedAbort>>> {
        let Some((event, token)) = self.events.get(self.next).cloned() else {
            return Poll::Ready(None);
        };
        if self.cut_after == Some(self.tokens_sent)
            && (token || self.tokens_sent == self.tokens_total)
        {
            return Poll::Ready(Some(Err(ready!(self.abort.poll(cx, guard)))));
        }
        if self.next > 0 && !self.chunk_delay.is_zero() {
            let pacing = self
                .pacing
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(self.chunk_delay)));
            ready!(pacing.as_mut().poll(cx));
            self.pacing = None;
        }
        self.next += 1;
        if token {
            self.tokens_sent += 1;
        }
        if let Some(g) = guard {
            g.add_response_bytes(&event);
            if token {
                g.add_sent(1);
            }
            if self.next == self.events.len() {
                g.set_outcome(Outcome::Ok);
            }
        }
        Poll::Ready(Some(Ok(event)))
    }
}

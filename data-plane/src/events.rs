//! What the request path tells the reporting side.
//!
//! - After each proxied request the proxy builds a [`RequestOutcome`].
//! - As they happen: upstream failures (429s with the cooldown applied,
//!   server errors, connect errors, timeouts, broken streams; with the
//!   outlier ejection applied), the first success on a backend after 429s or
//!   after a streak of failures, and agents seen on interactive traffic
//!   ([`Signal`]).
//!
//! Both go through bounded channels with `try_send`: the hot path never waits
//! on the consumer (the report collector, [`crate::report`]); a full channel
//! drops (and counts) the item instead. The collector drains outcomes on its
//! own tick; once a quarter of the outcome channel is in use the sender also
//! wakes it ([`EventStreams::backlog`]), so a busy proxy's outcomes are
//! drained long before the channel could fill.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc};

use crate::queue::Priority;
pub(crate) use crate::run_kind::RunKind;
use crate::stream::End;
pub(crate) use crate::usage::Usage;

/// What happened to one proxied request.
#[derive(Debug, Clone)]
pub struct RequestOutcome {
    /// Client key id.
    pub client_key_id: Arc<str>,
    /// `x-claw-agent-id`, if sent.
    pub agent_id: Option<String>,
    /// `x-claw-run-kind` ([`RunKind`]).
    pub run_kind: RunKind,
    /// Canonical model.
    pub model: Arc<str>,
    /// Backend that produced the final response, if any did.
    pub backend_id: Option<Arc<str>>,
    /// HTTP status sent to the client.
    pub status: u16,
    /// True for `stream: true` requests.
    pub streamed: bool,
    /// Scheduling class.
    pub priority: Priority,
    /// From request arrival to the end of the response body.
    pub latency: Duration,
    /// From request arrival to the first response body byte.
    pub ttft: Option<Duration>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Usage: from the answer (JSON body or the stream's usage chunk), or
    /// estimated when the stream ended without one (see `usage_estimated`).
    pub usage: Option<Usage>,
    /// True when `usage` is an estimate (prompt from the request size,
    /// completion from the content events seen).
    pub usage_estimated: bool,
    /// How the body ended (`None` for answers the proxy produced itself).
    pub end: Option<End>,
    /// USD cost from the model mapping, when usage is known.
    pub cost: Option<f64>,
    /// Served by a backend of the other protocol (the request and its
    /// answer were translated).
    pub translated: bool,
}

/// What went wrong with an upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// 429.
    RateLimited,
    /// 5xx, or the connection failed after the request was sent.
    ServerError,
    /// The connection could not be established.
    Connect,
    /// No response head in time.
    Timeout,
    /// The answer's body broke off mid-stream.
    StreamBroken,
    /// The provider is overloaded (Anthropic's 529 `overloaded_error`): a
    /// short cooldown, then another backend.
    Overloaded,
    /// A 429 that says the account's quota or billing limit is spent (a
    /// `Retry-After` beyond an hour, or a quota error type): the backend is
    /// out until then, not transiently rate limited.
    QuotaExhausted,
    /// A 401/403: the provider rejected the gateway's key for the backend.
    AuthFailed,
}

/// One failed upstream attempt.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// When it happened.
    pub at: SystemTime,
    /// Backend id.
    pub backend_id: Arc<str>,
    /// What went wrong.
    pub kind: FailureKind,
    /// Upstream HTTP status, when there was one.
    pub status: Option<u16>,
    /// The upstream's `Retry-After` (429s).
    pub retry_after: Option<Duration>,
    /// Consecutive 429s this proxy has seen from the backend (429s).
    pub consecutive: u32,
    /// Cooldown this proxy applied (429s).
    pub cooldown: Option<Duration>,
    /// Outlier ejection this proxy applied after this failure, if it ejected.
    pub ejected: Option<Duration>,
    /// Short description, no secrets.
    pub summary: &'static str,
}

/// Something the control plane should hear about as it happens.
#[derive(Debug, Clone)]
pub(crate) enum Signal {
    /// An upstream attempt failed.
    Failure(Failure),
    /// A backend answered after one or more 429s, or after a streak of
    /// outlier failures (connect errors, timeouts, 5xx): resets the fleet's
    /// consecutive counts.
    Recovered {
        /// Backend id.
        backend_id: Arc<str>,
        /// When.
        at: SystemTime,
    },
    /// An agent was seen on interactive traffic.
    Activity {
        /// `x-claw-agent-id`.
        agent_id: String,
        /// When.
        at: SystemTime,
    },
}

impl Signal {
    /// A failure without a 429's cooldown details, now.
    #[inline]
    pub(crate) fn failure(
        backend_id: &Arc<str>,
        kind: FailureKind,
        status: Option<u16>,
        summary: &'static str,
    ) -> Signal {
        Signal::Failure(Failure {
            at: SystemTime::now(),
            backend_id: backend_id.clone(),
            kind,
            status,
            retry_after: None,
            consecutive: 0,
            cooldown: None,
            ejected: None,
            summary,
        })
    }

    /// This failure with the outlier ejection it caused (`None`: none).
    #[inline]
    pub(crate) fn with_ejection(mut self, ejected: Option<Duration>) -> Signal {
        if let Signal::Failure(f) = &mut self {
            f.ejected = ejected;
        }
        self
    }
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub(crate) struct EventSink {
    tx: mpsc::Sender<RequestOutcome>,
    signals: mpsc::Sender<Signal>,
    backlog: Arc<Notify>,
    /// Free outcome slots below which `backlog` is notified.
    low_water: usize,
    /// The usage journal's outcome log: each queued outcome is appended
    /// to it too (`crate::report::journal`).
    journal: Option<Arc<dyn OutcomeJournal>>,
}

/// Where a queued outcome is also journaled (the usage journal's outcome
/// log, `crate::report::journal`).
pub(crate) trait OutcomeJournal: Send + Sync {
    /// Queues `o` on `tx` and journals it if queued; false when the queue
    /// was full.
    fn send(&self, tx: &mpsc::Sender<RequestOutcome>, o: RequestOutcome) -> bool;
}

impl EventSink {
    /// Appends every later outcome to the usage journal as it is queued.
    pub(crate) fn set_journal(&mut self, log: Arc<dyn OutcomeJournal>) {
        self.journal = Some(log);
    }

    /// Sends without waiting; drops the outcome when the channel is full.
    pub(crate) fn emit(&self, outcome: RequestOutcome) {
        let sent = match &self.journal {
            Some(log) => log.send(&self.tx, outcome),
            None => self.tx.try_send(outcome).is_ok(),
        };
        if !sent {
            crate::metrics::event_dropped();
        } else if self.tx.capacity() < self.low_water {
            self.backlog.notify_one();
        }
    }

    /// Sends without waiting; drops the signal when the channel is full.
    pub(crate) fn signal(&self, signal: Signal) {
        if self.signals.try_send(signal).is_err() {
            crate::metrics::event_dropped();
        }
    }
}

/// The receiving sides.
pub(crate) struct EventStreams {
    /// Request outcomes.
    pub outcomes: mpsc::Receiver<RequestOutcome>,
    /// Failures, recoveries, activity.
    pub signals: mpsc::Receiver<Signal>,
    /// Notified when a quarter of the outcome channel is in use: drain it
    /// before the next tick.
    pub backlog: Arc<Notify>,
}

/// Bounded outcome and signal channels of `capacity` each.
pub(crate) fn channel(capacity: usize) -> (EventSink, EventStreams) {
    let capacity = capacity.max(1);
    let (tx, outcomes) = mpsc::channel(capacity);
    let (stx, signals) = mpsc::channel(capacity);
    let backlog = Arc::new(Notify::new());
    (
        EventSink {
            tx,
            signals: stx,
            backlog: backlog.clone(),
            low_water: capacity - capacity / 4,
            journal: None,
        },
        EventStreams {
            outcomes,
            signals,
            backlog,
        },
    )
}

/// The consumer when nothing reports: drains and discards.
pub(crate) async fn discard<T>(mut rx: mpsc::Receiver<T>) {
    while rx.recv().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_openai_json() {
        let v = serde_json::json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4}});
        assert_eq!(
            Usage::from_json(&v),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                total_tokens: 7,
                ..Usage::default()
            })
        );
        assert_eq!(Usage::from_json(&serde_json::json!({})), None);
    }

    #[tokio::test]
    async fn a_quarter_full_outcome_channel_wakes_the_collector() {
        let (sink, streams) = channel(8);
        let woken = streams.backlog.notified();
        tokio::pin!(woken);
        // Registered before the sends, as the collector's select is.
        assert!(futures::poll!(woken.as_mut()).is_pending());
        sink.emit(outcome());
        assert!(futures::poll!(woken.as_mut()).is_pending(), "1 of 8 in use");
        sink.emit(outcome());
        assert!(futures::poll!(woken.as_mut()).is_pending(), "2 of 8 in use");
        sink.emit(outcome());
        assert!(futures::poll!(woken.as_mut()).is_ready(), "3 of 8 in use");
    }

    fn outcome() -> RequestOutcome {
        RequestOutcome {
            client_key_id: Arc::from("ck"),
            agent_id: None,
            run_kind: RunKind::Interactive,
            model: Arc::from("m"),
            backend_id: None,
            status: 200,
            streamed: false,
            priority: Priority::Interactive,
            latency: Duration::from_millis(1),
            ttft: None,
            attempts: 1,
            usage: None,
            usage_estimated: false,
            end: None,
            cost: None,
            translated: false,
        }
    }

    #[tokio::test]
    async fn full_channels_drop_instead_of_waiting() {
        let (sink, mut streams) = channel(1);
        let s = || Signal::Recovered {
            backend_id: Arc::from("b"),
            at: SystemTime::now(),
        };
        sink.signal(s());
        sink.signal(s());
        assert!(streams.signals.try_recv().is_ok());
        assert!(streams.signals.try_recv().is_err());
    }
}

//! `GET /api/v1/events`: the page's live stream (server-sent events).
//!
//! First `event: hello` with the config version, then one `event: <topic>`
//! per [`Topic`] that moved, coalesced so each topic is sent at most once
//! per [`COALESCE`]: the first event of a burst goes out at once, the rest
//! of the burst is collected and sent when the window ends. Configuration
//! changes come from the catalog's version watch (as `config` and `audit`:
//! every audited change produces a version). A `: ping` comment every
//! [`PING`] keeps intermediaries from timing the stream out; a subscriber
//! that fell behind the bus gets `event: resync` (refetch everything). The
//! stream ends when the client goes away or shutdown begins, so it never
//! holds up graceful shutdown.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt as _;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use super::{Body, Dashboard};
use crate::events::Topic;

/// At most one event per topic per this window.
pub(super) const COALESCE: Duration = Duration::from_millis(250);
/// Interval of the keep-alive comment.
pub(super) const PING: Duration = Duration::from_secs(15);
/// Frames buffered for a slow client before the stream waits for it.
const BUFFER: usize = 64;

/// One SSE frame.
fn frame(event: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// The streaming response; the stream's task starts here.
pub(super) fn stream(dashboard: &Dashboard) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(BUFFER);
    tokio::spawn(run(dashboard.clone(), tx));
    let body = StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, std::convert::Infallible>(Frame::data(b))),
    );
    let mut r = Response::new(body.boxed_unsync());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Feeds one client until it leaves or shutdown begins.
async fn run(d: Dashboard, tx: mpsc::Sender<Bytes>) {
    let mut stop = d.shutdown.clone();
    let mut topics = d.events.subscribe();
    let mut versions = d.catalog.subscribe();
    versions.borrow_and_update();
    let version = |d: &Dashboard| d.catalog.config_version();
    let send = {
        let (tx, stop) = (tx.clone(), d.shutdown.clone());
        move |bytes: Bytes| {
            let tx = tx.clone();
            let mut stop = stop.clone();
            async move {
                tokio::select! {
                    sent = tx.send(bytes) => sent.is_ok(),
                    () = stop.stopped() => false,
                }
            }
        }
    };
    if !send(frame(
        "hello",
        &serde_json::json!({ "config_version": version(&d) }),
    ))
    .await
    {
        return;
    }
    let mut ping = tokio::time::interval_at(Instant::now() + PING, PING);
    let mut coalesce = Coalescer::new(COALESCE);
    let far = Duration::from_secs(86_400);
    loop {
        let deadline = coalesce.deadline();
        let flush_at = deadline.unwrap_or_else(|| Instant::now() + far);
        let mut arrived: Vec<&'static str> = Vec::new();
        tokio::select! {
            () = stop.stopped() => return,
            () = tx.closed() => return,
            _ = ping.tick() => {
                if !send(Bytes::from_static(b": ping\n\n")).await {
                    return;
                }
                continue;
            }
            got = topics.recv() => match got {
                Ok(t) => arrived.push(t.as_str()),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Whatever was pending is covered by the resync.
                    coalesce.clear();
                    let data = serde_json::json!({ "config_version": version(&d) });
                    if !send(frame("resync", &data)).await {
                        return;
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            changed = versions.changed() => {
                if changed.is_err() {
                    return;
                }
                arrived.extend([Topic::Config.as_str(), Topic::Audit.as_str()]);
            }
            () = tokio::time::sleep_until(flush_at), if deadline.is_some() => {
                let due = coalesce.flush(Instant::now());
                if !emit(&send, due, version(&d)).await {
                    return;
                }
                continue;
            }
        }
        let now = Instant::now();
        let mut due = BTreeSet::new();
        for topic in arrived {
            due.extend(coalesce.offer(topic, now));
        }
        if !emit(&send, due, version(&d)).await {
            return;
        }
    }
}

/// At most one event per topic per window: the first event of a burst goes
/// out at once and opens a window; what arrives inside it is sent, once per
/// topic, when it closes (opening the next window).
#[derive(Debug)]
struct Coalescer {
    window: Duration,
    pending: BTreeSet<&'static str>,
    /// End of the open window, if any.
    open_until: Option<Instant>,
}

impl Coalescer {
    fn new(window: Duration) -> Coalescer {
        Coalescer {
            window,
            pending: BTreeSet::new(),
            open_until: None,
        }
    }

    /// A topic arrived at `now`: what to send now.
    fn offer(&mut self, topic: &'static str, now: Instant) -> BTreeSet<&'static str> {
        self.pending.insert(topic);
        match self.open_until {
            Some(end) if now < end => BTreeSet::new(),
            _ => {
                self.open_until = Some(now + self.window);
                std::mem::take(&mut self.pending)
            }
        }
    }

    /// When [`Coalescer::flush`] is due (the open window's end).
    fn deadline(&self) -> Option<Instant> {
        self.open_until
    }

    /// The window ended at `now`: what to send (and a new window when that
    /// is anything).
    fn flush(&mut self, now: Instant) -> BTreeSet<&'static str> {
        let due = std::mem::take(&mut self.pending);
        self.open_until = (!due.is_empty()).then(|| now + self.window);
        due
    }

    /// Drops what is pending (a resync covers it).
    fn clear(&mut self) {
        self.pending.clear();
    }
}

/// Sends one event per topic in `due`; false once the client is gone.
async fn emit<F, Fut>(send: &F, due: BTreeSet<&'static str>, config_version: u64) -> bool
where
    F: Fn(Bytes) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for topic in due {
        let data = serde_json::json!({ "topic": topic, "config_version": config_version });
        if !send(frame(topic, &data)).await {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_send_each_topic_at_most_once_per_window() {
        let w = Duration::from_millis(250);
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let set = |v: &[&'static str]| v.iter().copied().collect::<BTreeSet<_>>();
        let mut c = Coalescer::new(w);
        assert_eq!(c.deadline(), None);
        assert_eq!(
            c.offer("backends", t0),
            set(&["backends"]),
            "first goes out at once"
        );
        assert_eq!(c.offer("backends", ms(10)), set(&[]));
        assert_eq!(c.offer("proxies", ms(20)), set(&[]));
        assert_eq!(c.offer("backends", ms(30)), set(&[]));
        assert_eq!(c.deadline(), Some(ms(250)));
        assert_eq!(c.flush(ms(250)), set(&["backends", "proxies"]), "once each");
        assert_eq!(c.deadline(), Some(ms(500)), "the next window");
        assert_eq!(c.flush(ms(500)), set(&[]));
        assert_eq!(c.deadline(), None, "quiet: no window");
        assert_eq!(c.offer("usage", ms(600)), set(&["usage"]));
        c.offer("usage", ms(610));
        c.clear();
        assert_eq!(c.flush(ms(850)), set(&[]));
    }

    #[test]
    fn frames_are_named_events_with_one_json_line() {
        let f = frame(
            "backends",
            &serde_json::json!({"topic": "backends", "config_version": 3}),
        );
        assert_eq!(
            &f[..],
            b"event: backends\ndata: {\"config_version\":3,\"topic\":\"backends\"}\n\n"
        );
    }
}

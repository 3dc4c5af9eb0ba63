//! Change notifications for the dashboard's live stream: modules call
//! [`Events::notify`] when something an operator watches moves; the
//! dashboard's server-sent-event endpoint forwards the topic and the page
//! refetches that view.

use tokio::sync::broadcast;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A proxy connected, disconnected, ACKed or NACKed.
    Proxies,
    /// Configuration changed (any resource).
    Config,
    /// A backend's state changed: cooldown started or ended, health, enabled.
    Backends,
    /// A heartbeat run finished or was recorded.
    Heartbeats,
    /// Usage was ingested.
    Usage,
    /// An audit record was written.
    Audit,
}

impl Topic {
    /// The SSE event name.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Proxies => "proxies",
            Topic::Config => "config",
            Topic::Backends => "backends",
            Topic::Heartbeats => "heartbeats",
            Topic::Usage => "usage",
            Topic::Audit => "audit",
        }
    }
}

/// A cheap, cloneable fan-out of [`Topic`]s. Sending never blocks; slow
/// subscribers miss events (and refetch everything on lag).
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<Topic>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl Events {
    /// A bus with room for a burst of events per subscriber.
    pub fn new() -> Events {
        let (tx, _) = broadcast::channel(256);
        Events { tx }
    }

    /// Announces a change (no-op without subscribers).
    pub fn notify(&self, topic: Topic) {
        let _ = self.tx.send(topic);
    }

    /// A receiver of every later topic.
    pub fn subscribe(&self) -> broadcast::Receiver<Topic> {
        self.tx.subscribe()
    }
}

//! The webhook outbox entry: one pending (or dead-lettered) delivery as the
//! `heartbeat_outbox` tree stores it, shared by the run store (which keeps
//! it) and the delivery worker (which sends it).

/// A pending delivery as stored in the outbox.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OutboxEntry {
    /// The agent.
    #[prost(string, tag = "1")]
    pub agent_id: String,
    /// The run (the idempotency key).
    #[prost(string, tag = "2")]
    pub run_id: String,
    /// The webhook URL at enqueue time.
    #[prost(string, tag = "3")]
    pub url: String,
    /// The exact JSON body every attempt sends.
    #[prost(bytes = "vec", tag = "4")]
    pub body: Vec<u8>,
    /// Attempts made so far.
    #[prost(uint32, tag = "5")]
    pub attempts: u32,
    /// Earliest next attempt, unix ms.
    #[prost(int64, tag = "6")]
    pub next_attempt_ms: i64,
    /// Enqueue time, unix ms.
    #[prost(int64, tag = "7")]
    pub created_ms: i64,
    /// What the last attempt got.
    #[prost(string, tag = "8")]
    pub last_error: String,
    /// `alert`, `failed` or `recovered` (empty in entries written before
    /// events existed: an alert).
    #[prost(string, tag = "9")]
    pub kind: String,
    /// Dead-lettered: kept (body and key) for `RedeliverRuns`, never
    /// attempted again on its own; pruned with its run.
    #[prost(bool, tag = "10")]
    pub dead: bool,
}

impl OutboxEntry {
    /// The event kind, for logs (`alert` for old entries).
    pub fn kind(&self) -> &str {
        if self.kind.is_empty() {
            KIND_ALERT
        } else {
            &self.kind
        }
    }

    /// The entry put back for another round of attempts: same body and
    /// key, fresh attempt count and age.
    pub fn redelivered(mut self, now_ms: i64) -> OutboxEntry {
        self.dead = false;
        self.attempts = 0;
        self.next_attempt_ms = now_ms;
        self.created_ms = now_ms;
        self.last_error.clear();
        self
    }
}

/// An alert: a reply that was not `HEARTBEAT_OK`.
pub const KIND_ALERT: &str = "alert";
/// The first failed run of a streak.
pub const KIND_FAILED: &str = "failed";
/// The first successful run after a streak.
pub const KIND_RECOVERED: &str = "recovered";

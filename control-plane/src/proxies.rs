//! The in-memory registry of data-plane proxies seen on the discovery
//! stream, keyed by node id. The discovery service writes it; `ListProxies`
//! and `GetSnapshotInfo` read it. Nothing here is persisted: a restarted
//! control plane learns its proxies again when they reconnect.
//!
//! Each open stream is a *connection* with its own [`ConnectionId`] and the
//! sending half of its [`Push`] channel, through which any module can reach
//! one proxy ([`ProxyRegistry::sender`]) or all of them
//! ([`ProxyRegistry::senders`]). A node id that connects again replaces its
//! older connection: the newer stream wins, the registry drops the older
//! stream's sender (which ends that stream), and the older stream's updates
//! and cleanup, carrying a stale connection id, are ignored.
//!
//! Proxies whose stream closed stay listed (`connected = false`, with their
//! last contact) for [`DEFAULT_RETENTION`], so `clawctl proxies` shows the
//! recently gone, then disappear.
//!
//! **Restart.** Which proxies reported before a restart is durable already:
//! the report-batch idempotency records (`Tree::ReportBatches`, one per node
//! and process, with their last use). [`known_nodes`] reads them at startup
//! and the registry notes each node's first report batch of this process
//! ([`ProxyRegistry::reported`]), so the heartbeat scheduler can hold due
//! slots until the proxies it knew have told it which agents are busy
//! ([`RegistryFleetView`]).

use parking_lot::RwLock;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use claw_proto::v1;
use tokio::sync::{mpsc, watch};

use crate::catalog::records::{now_ms, timestamp};
use crate::events::{Events, Topic};
use crate::heartbeat::scheduler::FleetView;
use crate::metrics;
use crate::store::{Store, StoreError, Tree};

/// The sending half of one proxy's discovery stream: a response sent here
/// goes out on that stream, which stamps its nonce. Dropping the last sender
/// ends the stream.
pub(crate) type Push = mpsc::Sender<v1::StreamConfigResponse>;

/// How long a disconnected proxy stays listed.
pub(crate) const DEFAULT_RETENTION: Duration = Duration::from_secs(10 * 60);

/// Longest NACK reason kept (in bytes); proxies' error details are theirs
/// to choose, the registry's memory is not.
pub(crate) const MAX_NACK_REASON: usize = 512;

/// Most excluded resources kept per proxy (its ACK may list more).
pub(crate) const MAX_EXCLUDED: usize = 100;
/// Longest excluded resource id kept (in bytes).
const MAX_EXCLUDED_ID: usize = 256;

/// What the control plane knows about one proxy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyState {
    /// Stable id the proxy announced.
    pub node_id: String,
    /// Remote address of its stream.
    pub peer_address: String,
    /// When its current (or last) stream opened, unix ms.
    pub connected_since_ms: i64,
    /// Last configuration version it acknowledged.
    pub acked_version: u64,
    /// Reason of its last rejected snapshot, if it rejected the last one
    /// it answered (an ACK clears it).
    pub last_nack_reason: String,
    /// Resources its last applied snapshot left out as invalid.
    pub excluded: Vec<v1::ExcludedResource>,
    /// Whether its stream is open now.
    pub connected: bool,
    /// Last message from it (or the end of its stream), unix ms.
    pub last_seen_ms: i64,
}

impl ProxyState {
    /// The API view.
    pub fn to_proto(&self) -> v1::Proxy {
        v1::Proxy {
            node_id: self.node_id.clone(),
            peer_address: self.peer_address.clone(),
            connected_since: timestamp(self.connected_since_ms),
            acked_version: self.acked_version,
            last_nack_reason: self.last_nack_reason.clone(),
            connected: self.connected,
            last_seen: timestamp(self.last_seen_ms),
            excluded: self.excluded.clone(),
        }
    }
}

/// Identifies one stream of a proxy, so that a replaced stream cannot touch
/// the state of the stream that replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(u64);

/// The open stream of a connected proxy.
#[derive(Debug)]
struct Live {
    id: ConnectionId,
    tx: Push,
}

#[derive(Debug)]
struct Entry {
    state: ProxyState,
    live: Option<Live>,
}

/// Proxies by node id. Cheap to read; written on stream events only.
#[derive(Debug)]
pub struct ProxyRegistry {
    entries: RwLock<BTreeMap<String, Entry>>,
    next_connection: AtomicU64,
    retention: Duration,
    /// Bumped whenever a stream opens or closes ([`ProxyRegistry::subscribe`]).
    membership: watch::Sender<u64>,
    /// Told about connects, disconnects, ACKs and NACKs (the dashboard).
    events: Events,
    /// Node ids that delivered a report batch since this process started.
    reported: RwLock<HashSet<String>>,
}

impl Default for ProxyRegistry {
    fn default() -> Self {
        Self::with_retention(DEFAULT_RETENTION)
    }
}

/// The outcome of [`ProxyRegistry::connect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    /// The new stream's id, for every later call about it.
    pub id: ConnectionId,
    /// Whether an older stream of the same node id was replaced.
    pub replaced: bool,
}

type Map = BTreeMap<String, Entry>;

impl ProxyRegistry {
    /// An empty registry keeping disconnected proxies for
    /// [`DEFAULT_RETENTION`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry keeping disconnected proxies for `retention`.
    pub fn with_retention(retention: Duration) -> Self {
        ProxyRegistry {
            entries: RwLock::new(BTreeMap::new()),
            next_connection: AtomicU64::new(1),
            retention,
            membership: watch::channel(0).0,
            events: Events::new(),
            reported: RwLock::new(HashSet::new()),
        }
    }

    /// The registry announcing its changes on `events`.
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// Prunes, runs `f` on the map, and refreshes the fleet gauges.
    fn mutate<T>(&self, f: impl FnOnce(&mut Map, i64) -> T) -> T {
        let now = now_ms();
        let mut map = self.entries.write();
        self.prune_locked(&mut map, now);
        let out = f(&mut map, now);
        record_gauges(&map);
        out
    }

    fn prune_locked(&self, map: &mut Map, now: i64) {
        let retention = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        map.retain(|_, e| {
            e.live.is_some() || now.saturating_sub(e.state.last_seen_ms) <= retention
        });
    }

    /// Records a proxy that opened a stream whose responses `tx` feeds.
    /// Replaces (and thereby ends) an older stream of the same node id;
    /// what was learnt about the node (acked version, last NACK) is kept.
    pub fn connect(&self, node_id: &str, peer_address: &str, tx: Push) -> Connected {
        let id = ConnectionId(self.next_connection.fetch_add(1, Ordering::Relaxed));
        let connected = self.mutate(|map, now| {
            let entry = map.entry(node_id.to_string()).or_insert_with(|| Entry {
                state: ProxyState {
                    node_id: node_id.to_string(),
                    ..ProxyState::default()
                },
                live: None,
            });
            let replaced = entry.live.replace(Live { id, tx }).is_some();
            let s = &mut entry.state;
            s.peer_address = peer_address.to_string();
            s.connected_since_ms = now;
            s.last_seen_ms = now;
            s.connected = true;
            Connected { id, replaced }
        });
        self.membership.send_modify(|n| *n += 1);
        self.events.notify(Topic::Proxies);
        connected
    }

    /// Applies `f` to the node's state if `conn` is still its stream, and
    /// marks it seen. Returns whether it was.
    fn update(&self, node_id: &str, conn: ConnectionId, f: impl FnOnce(&mut ProxyState)) -> bool {
        self.mutate(|map, now| match map.get_mut(node_id) {
            Some(e) if e.live.as_ref().is_some_and(|l| l.id == conn) => {
                f(&mut e.state);
                e.state.last_seen_ms = now;
                true
            }
            _ => false,
        })
    }

    /// Records a message from the proxy.
    pub fn seen(&self, node_id: &str, conn: ConnectionId) {
        self.update(node_id, conn, |_| {});
    }

    /// Records that the proxy applied `version`, leaving out `excluded`
    /// (bounded: [`MAX_EXCLUDED`] entries, reasons as NACK reasons). An ACK
    /// clears the reason of an earlier NACK: the proxy has recovered.
    pub fn acked(
        &self,
        node_id: &str,
        conn: ConnectionId,
        version: u64,
        excluded: &[v1::ExcludedResource],
    ) {
        let excluded: Vec<v1::ExcludedResource> = excluded
            .iter()
            .take(MAX_EXCLUDED)
            .map(|e| v1::ExcludedResource {
                kind: truncate(&e.kind, 32),
                id: truncate(&e.id, MAX_EXCLUDED_ID),
                reason: bound_reason(&e.reason),
            })
            .collect();
        if self.update(node_id, conn, |s| {
            s.acked_version = version;
            s.last_nack_reason.clear();
            s.excluded = excluded;
        }) {
            self.events.notify(Topic::Proxies);
        }
    }

    /// Records that the proxy rejected a snapshot, keeping at most
    /// [`MAX_NACK_REASON`] bytes of its reason.
    pub fn nacked(&self, node_id: &str, conn: ConnectionId, reason: &str) {
        let reason = bound_reason(reason);
        if self.update(node_id, conn, |s| s.last_nack_reason = reason) {
            self.events.notify(Topic::Proxies);
        }
    }

    /// Records that stream `conn` of the node ended. The node stays listed
    /// as disconnected unless a newer stream already replaced `conn`.
    /// Returns whether `conn` was the node's stream.
    pub fn disconnect(&self, node_id: &str, conn: ConnectionId) -> bool {
        let gone = self.mutate(|map, now| match map.get_mut(node_id) {
            Some(e) if e.live.as_ref().is_some_and(|l| l.id == conn) => {
                e.live = None;
                e.state.connected = false;
                e.state.last_seen_ms = now;
                true
            }
            _ => false,
        });
        if gone {
            self.membership.send_modify(|n| *n += 1);
            self.events.notify(Topic::Proxies);
        }
        gone
    }

    /// A receiver that changes whenever a proxy's stream opens or closes
    /// (rate shares and cooldown catch-up follow it).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.membership.subscribe()
    }

    /// The channel to a connected proxy's stream.
    pub fn sender(&self, node_id: &str) -> Option<Push> {
        self.entries
            .read()
            .get(node_id)
            .and_then(|e| e.live.as_ref())
            .map(|l| l.tx.clone())
    }

    /// The channels to every connected proxy's stream, by node id.
    pub fn senders(&self) -> Vec<(String, Push)> {
        self.entries
            .read()
            .iter()
            .filter_map(|(id, e)| e.live.as_ref().map(|l| (id.clone(), l.tx.clone())))
            .collect()
    }

    /// Every proxy listed (connected, or gone for less than the
    /// retention), ordered by node id.
    pub fn list(&self) -> Vec<ProxyState> {
        self.mutate(|map, _| map.values().map(|e| e.state.clone()).collect())
    }

    /// Notes that `node_id` delivered a report batch (stored and
    /// acknowledged): from now on the control plane knows its activity.
    pub fn reported(&self, node_id: &str) {
        if self.reported.read().contains(node_id) {
            return;
        }
        self.reported.write().insert(node_id.to_string());
    }

    /// Whether `node_id` delivered a report batch since this process started.
    pub fn has_reported(&self, node_id: &str) -> bool {
        self.reported.read().contains(node_id)
    }

    /// The lowest configuration version ACKed by a connected proxy (`None`
    /// when no proxy is connected).
    pub fn min_acked_connected(&self) -> Option<u64> {
        self.entries
            .read()
            .values()
            .filter(|e| e.live.is_some())
            .map(|e| e.state.acked_version)
            .min()
    }

    /// How many proxies have an open stream.
    pub fn connected_count(&self) -> usize {
        self.entries
            .read()
            .values()
            .filter(|e| e.live.is_some())
            .count()
    }
}

/// The node ids that delivered a report batch within `horizon` before
/// `now_ms` (read from the durable report-batch records): the proxies a
/// restarted control plane should hear from before it trusts its view of
/// the fleet's activity.
pub(crate) fn known_nodes(
    store: &dyn Store,
    now_ms: i64,
    horizon: Duration,
) -> Result<Vec<String>, StoreError> {
    let since = now_ms.saturating_sub(i64::try_from(horizon.as_millis()).unwrap_or(i64::MAX));
    let mut nodes = BTreeSet::new();
    for (key, value) in store.scan(Tree::ReportBatches)? {
        if crate::report::dedup::last_used_ms(&value) < since {
            continue;
        }
        let node = key.split(|b| *b == 0).next().unwrap_or_default();
        if let Ok(node) = std::str::from_utf8(node)
            && !node.is_empty()
        {
            nodes.insert(node.to_string());
        }
    }
    Ok(nodes.into_iter().collect())
}

/// The heartbeat scheduler's view of the fleet: the proxies known before
/// this process started, which of them reported since, and the lowest
/// ACKed configuration version.
#[derive(Debug)]
pub(crate) struct RegistryFleetView {
    registry: Arc<ProxyRegistry>,
    known: Vec<String>,
}

impl RegistryFleetView {
    /// A view over `registry` expecting reports from `known` (see
    /// [`known_nodes`]).
    pub(crate) fn new(registry: Arc<ProxyRegistry>, known: Vec<String>) -> Self {
        RegistryFleetView { registry, known }
    }
}

impl FleetView for RegistryFleetView {
    fn known_before_start(&self) -> Vec<String> {
        self.known.clone()
    }

    fn has_reported(&self, node_id: &str) -> bool {
        self.registry.has_reported(node_id)
    }

    fn min_acked_version(&self) -> Option<u64> {
        self.registry.min_acked_connected()
    }
}

/// Sets the fleet gauges from the registry's contents.
fn record_gauges(map: &Map) {
    let connected = map.values().filter(|e| e.live.is_some());
    let count = connected.clone().count();
    let min_acked = connected.map(|e| e.state.acked_version).min().unwrap_or(0);
    metrics::record_proxies(count, min_acked);
}

/// A proxy-supplied reason cut to [`MAX_NACK_REASON`] bytes, fit to keep
/// and to log.
pub(crate) fn bound_reason(reason: &str) -> String {
    truncate(reason, MAX_NACK_REASON)
}

/// At most `max` bytes of `s`, cut at a character boundary, marked with an
/// ellipsis when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> (Push, mpsc::Receiver<v1::StreamConfigResponse>) {
        mpsc::channel(1)
    }

    #[test]
    fn registry_tracks_connections_in_node_order() {
        let r = ProxyRegistry::new();
        assert!(r.list().is_empty());
        let (tx2, _rx2) = channel();
        let (tx1, _rx1) = channel();
        let p2 = r.connect("p2", "10.0.0.2:1", tx2);
        let p1 = r.connect("p1", "10.0.0.1:1", tx1);
        assert!(!p1.replaced);
        r.nacked("p1", p1.id, "bad url");
        let listed = r.list();
        assert_eq!(listed[0].last_nack_reason, "bad url");
        let bad = v1::ExcludedResource {
            kind: "backend".into(),
            id: "be_1".into(),
            reason: "base_url: must not contain a space".into(),
        };
        r.acked("p1", p1.id, 7, std::slice::from_ref(&bad));
        r.nacked("p1", p1.id, "bad url");
        assert!(r.disconnect("p2", p2.id));
        let list = r.list();
        assert_eq!(list[0].node_id, "p1");
        assert_eq!(list[0].acked_version, 7);
        assert_eq!(list[0].last_nack_reason, "bad url");
        assert_eq!(list[0].excluded, [bad]);
        // The next ACK clears the stale NACK reason and the exclusions.
        r.acked("p1", p1.id, 8, &[]);
        let after = r.list();
        assert_eq!(after[0].last_nack_reason, "");
        assert!(after[0].excluded.is_empty() && after[0].to_proto().excluded.is_empty());
        assert_eq!(list[0].peer_address, "10.0.0.1:1");
        assert!(list[0].connected);
        assert!(!list[1].connected, "gone proxies stay listed");
        assert_eq!(r.connected_count(), 1);
        assert!(list[0].to_proto().connected_since.is_some());
        assert_eq!(r.senders().len(), 1);
        assert!(r.sender("p1").is_some() && r.sender("p2").is_none());
    }

    #[test]
    fn a_newer_stream_wins_and_the_older_ones_cleanup_is_ignored() {
        let r = ProxyRegistry::new();
        let (old_tx, mut old_rx) = channel();
        let old = r.connect("p", "10.0.0.1:1", old_tx);
        r.acked("p", old.id, 3, &[]);
        let (new_tx, _new_rx) = channel();
        let new = r.connect("p", "10.0.0.1:2", new_tx);
        assert!(new.replaced);
        assert_ne!(old.id, new.id);
        // The registry let go of the older stream's channel: it is closed.
        assert!(old_rx.try_recv().is_err() && old_rx.is_closed());

        r.acked("p", old.id, 99, &[]);
        assert!(!r.disconnect("p", old.id));
        let p = &r.list()[0];
        assert!(p.connected);
        assert_eq!(
            p.acked_version, 3,
            "kept from the older stream, not overwritten by it"
        );
        assert_eq!(p.peer_address, "10.0.0.1:2");
        assert!(r.disconnect("p", new.id));
        assert!(!r.list()[0].connected);
    }

    #[test]
    fn disconnected_proxies_are_pruned_after_the_retention() {
        let r = ProxyRegistry::with_retention(Duration::ZERO);
        let (tx, _rx) = channel();
        let c = r.connect("p", "a", tx);
        assert_eq!(r.list().len(), 1, "connected proxies are never pruned");
        r.disconnect("p", c.id);
        // Give the clock a millisecond so the entry is strictly older.
        std::thread::sleep(Duration::from_millis(2));
        assert!(r.list().is_empty());
    }

    #[test]
    fn nack_reasons_are_bounded_at_a_char_boundary() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(400);
        let t = truncate(&long, MAX_NACK_REASON);
        assert!(t.len() <= MAX_NACK_REASON, "{}", t.len());
        assert!(t.ends_with('…'));
    }
}

//! The in-memory registry of data-plane proxies seen on the discovery
//! stream. It is empty until the discovery service (next milestone) fills
//! it; `ListProxies` and `GetSnapshotInfo` read it. Nothing here is
//! persisted: a restarted control plane learns its proxies again when they
//! reconnect.

use std::collections::BTreeMap;
use std::sync::RwLock;

use claw_proto::v1;

use crate::catalog::records::{now_ms, timestamp};

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
    /// Reason of its last rejected snapshot, if any.
    pub last_nack_reason: String,
    /// Whether its stream is open now.
    pub connected: bool,
    /// Last message from it, unix ms.
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
        }
    }
}

/// Proxies by node id. Cheap to read; written on stream events only.
#[derive(Debug, Default)]
pub struct ProxyRegistry {
    proxies: RwLock<BTreeMap<String, ProxyState>>,
}

impl ProxyRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ProxyState>> {
        // A poisoned lock means a panic mid-update of a plain map entry;
        // the map is still usable.
        self.proxies.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ProxyState>> {
        self.proxies.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a proxy that opened a stream.
    pub fn connected(&self, node_id: &str, peer_address: &str) {
        let now = now_ms();
        let mut map = self.write();
        let p = map.entry(node_id.to_string()).or_default();
        p.node_id = node_id.to_string();
        p.peer_address = peer_address.to_string();
        p.connected_since_ms = now;
        p.last_seen_ms = now;
        p.connected = true;
    }

    /// Applies `f` to a known proxy and marks it seen now.
    pub fn update(&self, node_id: &str, f: impl FnOnce(&mut ProxyState)) {
        if let Some(p) = self.write().get_mut(node_id) {
            f(p);
            p.last_seen_ms = now_ms();
        }
    }

    /// Records a proxy whose stream closed; it stays listed as disconnected.
    pub fn disconnected(&self, node_id: &str) {
        self.update(node_id, |p| p.connected = false);
    }

    /// Every proxy, ordered by node id.
    pub fn list(&self) -> Vec<ProxyState> {
        self.read().values().cloned().collect()
    }

    /// How many proxies have an open stream.
    pub fn connected_count(&self) -> usize {
        self.read().values().filter(|p| p.connected).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_tracks_connections_in_node_order() {
        let r = ProxyRegistry::new();
        assert!(r.list().is_empty());
        r.connected("p2", "10.0.0.2:1");
        r.connected("p1", "10.0.0.1:1");
        r.update("p1", |p| p.acked_version = 7);
        r.disconnected("p2");
        let list = r.list();
        assert_eq!(list[0].node_id, "p1");
        assert_eq!(list[0].acked_version, 7);
        assert!(!list[1].connected);
        assert_eq!(r.connected_count(), 1);
        assert!(list[0].to_proto().connected_since.is_some());
    }
}

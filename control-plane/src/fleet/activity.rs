//! What the proxies tell the control plane about the fleet's live traffic,
//! kept in memory for the heartbeat scheduler's busy and capacity checks.
//!
//! - [`AgentActivity`]: when interactive traffic for an agent (the
//!   `x-claw-agent-id` header) was last seen. An agent seen within its busy
//!   window is in a conversation, and its heartbeat waits.
//! - [`Capacity`]: which backends are cooling after 429s, and which
//!   backends serve which canonical model. A model whose every backend is
//!   cooling has no capacity, and heartbeats on it wait.
//!
//! The [`Fleet`](super::Fleet) feeds both from the proxies' report stream,
//! through [`AgentActivity::record`] and [`Capacity::cool`]; the scheduler
//! only reads. Both are cheap, lock-protected maps: reads and writes are O(1),
//! and the state is rebuilt by the proxies' reports after a restart (it is
//! at most minutes old by nature, so it is not persisted).

use parking_lot::RwLock;
use std::collections::HashMap;

use jiff::Timestamp;

/// How many ids the control plane does not know (yet) it remembers
/// activity for: an agent created while its conversation is already going
/// on is busy from its first slot, while invented ids cost at most this.
pub const UNKNOWN_AGENTS_KEPT: usize = 1024;

/// Last interactive traffic seen per agent.
#[derive(Debug, Default)]
pub struct AgentActivity {
    last: RwLock<HashMap<String, Timestamp>>,
    /// The same for ids no agent had when reported, bounded by
    /// [`UNKNOWN_AGENTS_KEPT`] (the oldest is dropped first).
    unknown: RwLock<HashMap<String, Timestamp>>,
}

impl AgentActivity {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records interactive traffic for `agent_id` at `at`. Older reports
    /// (out of order) never move the time backwards.
    pub fn record(&self, agent_id: &str, at: Timestamp) {
        let mut map = self.last.write();
        match map.get_mut(agent_id) {
            Some(t) if *t >= at => {}
            Some(t) => *t = at,
            None => {
                map.insert(agent_id.to_string(), at);
            }
        }
    }

    /// Records traffic for an id no agent has (yet): kept in a bounded
    /// side table, so an agent added moments later is known to be busy.
    pub fn record_unknown(&self, agent_id: &str, at: Timestamp) {
        let mut map = self.unknown.write();
        if let Some(t) = map.get_mut(agent_id) {
            *t = (*t).max(at);
            return;
        }
        if map.len() >= UNKNOWN_AGENTS_KEPT {
            let oldest = map
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                map.remove(&id);
            }
        }
        map.insert(agent_id.to_string(), at);
    }

    /// When interactive traffic for `agent_id` was last seen.
    pub fn last_seen(&self, agent_id: &str) -> Option<Timestamp> {
        let known = self.last.read().get(agent_id).copied();
        let unknown = self.unknown.read().get(agent_id).copied();
        known.max(unknown)
    }

    /// Whether `agent_id` had interactive traffic within `window` of `now`.
    pub fn is_busy(&self, agent_id: &str, now: Timestamp, window: std::time::Duration) -> bool {
        self.last_seen(agent_id).is_some_and(|t| {
            let age = now.as_millisecond() - t.as_millisecond();
            age < window.as_millis() as i64
        })
    }

    /// Drops entries older than `horizon` (called periodically so that the
    /// map does not grow with agents that stopped talking).
    pub fn forget_before(&self, horizon: Timestamp) {
        self.last.write().retain(|_, t| *t >= horizon);
        self.unknown.write().retain(|_, t| *t >= horizon);
    }
}

/// Backend cooldowns and the model → backends map.
#[derive(Debug, Default)]
pub struct Capacity {
    inner: RwLock<CapacityState>,
}

#[derive(Debug, Default)]
struct CapacityState {
    /// Backend id → cooling until.
    cooling: HashMap<String, Timestamp>,
    /// Canonical model → ids of the enabled backends serving it.
    models: HashMap<String, Vec<String>>,
}

impl Capacity {
    /// An empty registry: nothing cooling, no models known.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `backend_id` cools until `until` (a later report
    /// extends, an earlier one never shortens).
    pub fn cool(&self, backend_id: &str, until: Timestamp) {
        let mut s = self.inner.write();
        let entry = s.cooling.entry(backend_id.to_string()).or_insert(until);
        if *entry < until {
            *entry = until;
        }
    }

    /// Replaces the model → backends map (from the configuration).
    pub fn set_model_backends(&self, models: HashMap<String, Vec<String>>) {
        let mut s = self.inner.write();
        s.models = models;
    }

    /// Whether every backend serving `model` is cooling at `now`. A model
    /// no backend serves is not "cooling": the run is sent and fails
    /// visibly instead of waiting for capacity that will never come.
    pub fn is_model_cooling(&self, model: &str, now: Timestamp) -> bool {
        let s = self.inner.read();
        match s.models.get(model) {
            Some(backends) if !backends.is_empty() => backends
                .iter()
                .all(|b| s.cooling.get(b).is_some_and(|until| *until > now)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("valid")
    }

    #[test]
    fn unknown_ids_are_remembered_boundedly_for_an_agent_added_later() {
        let a = AgentActivity::new();
        a.record_unknown("later", ts(100));
        assert!(a.is_busy("later", ts(101), Duration::from_secs(3)));
        for i in 0..UNKNOWN_AGENTS_KEPT {
            a.record_unknown(&format!("invented-{i}"), ts(200 + i as i64));
        }
        assert_eq!(a.unknown.read().len(), UNKNOWN_AGENTS_KEPT);
        // The oldest went first.
        assert_eq!(a.last_seen("later"), None);
        assert!(a.last_seen("invented-5").is_some());
        a.forget_before(ts(10_000));
        assert!(a.unknown.read().is_empty());
    }

    #[test]
    fn activity_makes_an_agent_busy_within_its_window() {
        let a = AgentActivity::new();
        assert!(!a.is_busy("a", ts(100), Duration::from_secs(120)));
        a.record("a", ts(100));
        a.record("a", ts(50)); // out of order: ignored
        assert_eq!(a.last_seen("a"), Some(ts(100)));
        assert!(a.is_busy("a", ts(219), Duration::from_secs(120)));
        assert!(!a.is_busy("a", ts(220), Duration::from_secs(120)));
        a.forget_before(ts(101));
        assert_eq!(a.last_seen("a"), None);
    }

    #[test]
    fn a_model_has_no_capacity_only_when_every_backend_cools() {
        let c = Capacity::new();
        c.set_model_backends(HashMap::from([(
            "gpt-4o".to_string(),
            vec!["b1".to_string(), "b2".to_string()],
        )]));
        c.cool("b1", ts(200));
        assert!(!c.is_model_cooling("gpt-4o", ts(100)));
        c.cool("b2", ts(150));
        assert!(c.is_model_cooling("gpt-4o", ts(100)));
        assert!(!c.is_model_cooling("gpt-4o", ts(150)));
        assert!(!c.is_model_cooling("unknown", ts(100)));
    }
}

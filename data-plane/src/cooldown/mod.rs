//! Cooldowns after upstream 429s, across the fleet.
//!
//! The per-backend state machine and its inputs ([`Cooldown`],
//! [`CooldownPolicy`], [`parse_retry_after`]) live in [`state`], a leaf the
//! snapshot embeds. This module is the layer above the snapshot:
//! [`Cooldowns`] is the handle the retry layer uses to start a cooldown
//! (`Cooldowns::start_local`, which also emits a [`CooldownEvent`] for the
//! report stream), and the discovery stream uses to apply a cooldown learned
//! from another proxy ([`Cooldowns::apply_remote`]) and to hear about the ones
//! this proxy starts ([`Cooldowns::subscribe`]).

pub(crate) mod state;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::snapshot::SnapshotStore;

pub(crate) use state::{
    Cooldown, CooldownPolicy, MAX_RETRY_AFTER, QUOTA_HOLD_MAX, parse_retry_after,
};

/// A cooldown this proxy started after a 429, for reporting to the control plane.
#[derive(Debug, Clone)]
pub struct CooldownEvent {
    /// Backend id.
    pub backend_id: Arc<str>,
    /// End of the cooldown (monotonic clock).
    pub until: Instant,
    /// End of the cooldown (wall clock), for the wire.
    pub until_wall: SystemTime,
    /// Consecutive 429s so far.
    pub consecutive: u32,
    /// The upstream's `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
    /// The cooldown applied.
    pub cooldown: Duration,
    /// The upstream said its quota is spent: held until `until`.
    pub quota_exhausted: bool,
}

/// Handle on the cooldowns of every backend in the current snapshot.
#[derive(Clone)]
pub struct Cooldowns {
    store: SnapshotStore,
    events: broadcast::Sender<CooldownEvent>,
}

impl Cooldowns {
    /// A handle over `store`'s backends.
    pub fn new(store: SnapshotStore) -> Self {
        let (events, _) = broadcast::channel(1024);
        Cooldowns { store, events }
    }

    /// Applies a cooldown learned from another proxy (a quota exhaustion
    /// when `quota_exhausted`). Returns false when the backend is not in the
    /// current snapshot.
    pub fn apply_remote(
        &self,
        backend_id: &str,
        until: Instant,
        consecutive: u32,
        quota_exhausted: bool,
    ) -> bool {
        let Some(snap) = self.store.load() else {
            return false;
        };
        match snap.backend(backend_id) {
            Some(b) if quota_exhausted => {
                b.runtime.cooldown.exhaust(until);
                tracing::info!(backend = %backend_id, "applied remote quota exhaustion");
                true
            }
            Some(b) => {
                b.runtime.cooldown.apply(until, consecutive);
                tracing::info!(backend = %backend_id, consecutive, "applied remote cooldown");
                true
            }
            None => false,
        }
    }

    /// Applies an auth failure learned from the control plane (another
    /// proxy's 401/403). Returns false when the backend is not in the
    /// current snapshot.
    pub fn fail_auth_remote(&self, backend_id: &str, now: Instant) -> bool {
        let Some(snap) = self.store.load() else {
            return false;
        };
        match snap.backend(backend_id) {
            Some(b) => {
                if b.runtime.cooldown.fail_auth(0, now) {
                    tracing::warn!(backend = %b.name, backend_id, "backend's provider key rejected elsewhere in the fleet: excluded until its key or URL is updated");
                }
                true
            }
            None => false,
        }
    }

    /// Ends an auth failure because the control plane's probe got through
    /// with the backend's key (an explicit HEALTHY update). Returns true
    /// when a mark was cleared.
    pub fn clear_auth_remote(&self, backend_id: &str) -> bool {
        let Some(snap) = self.store.load() else {
            return false;
        };
        match snap.backend(backend_id) {
            Some(b) if b.runtime.cooldown.clear_auth() => {
                tracing::info!(backend = %b.name, backend_id, "backend's provider key accepted by the control plane's probe: back in rotation");
                true
            }
            _ => false,
        }
    }

    /// Marks `backend_id`'s quota exhausted for `d` (an upstream 429 saying
    /// so) and emits a [`CooldownEvent`]. Returns the end.
    pub(crate) fn exhaust_local(
        &self,
        backend_id: &Arc<str>,
        cooldown: &Cooldown,
        d: Duration,
        now: Instant,
    ) -> Instant {
        let d = d.min(QUOTA_HOLD_MAX);
        let until = now + d;
        cooldown.exhaust(until);
        tracing::warn!(backend = %backend_id, cooldown_ms = d.as_millis() as u64, "backend quota exhausted");
        let _ = self.events.send(CooldownEvent {
            backend_id: backend_id.clone(),
            until,
            until_wall: SystemTime::now() + d,
            consecutive: cooldown.consecutive(),
            retry_after: Some(d),
            cooldown: d,
            quota_exhausted: true,
        });
        until
    }

    /// Receives every cooldown this proxy starts.
    pub fn subscribe(&self) -> broadcast::Receiver<CooldownEvent> {
        self.events.subscribe()
    }

    /// Cools `backend_id` after a 429 and emits a [`CooldownEvent`].
    /// Returns the end of the cooldown and the consecutive count.
    pub(crate) fn start_local(
        &self,
        backend_id: &Arc<str>,
        cooldown: &Cooldown,
        policy: &CooldownPolicy,
        retry_after: Option<Duration>,
        now: Instant,
    ) -> (Instant, u32) {
        let (until, consecutive) = cooldown.on_rate_limited(policy, retry_after, now);
        let d = until.saturating_duration_since(now);
        tracing::info!(backend = %backend_id, cooldown_ms = d.as_millis() as u64, consecutive, "cooling backend after 429");
        let _ = self.events.send(CooldownEvent {
            backend_id: backend_id.clone(),
            until,
            until_wall: SystemTime::now() + d,
            consecutive,
            retry_after,
            cooldown: d,
            quota_exhausted: false,
        });
        (until, consecutive)
    }

    /// Backends of the current snapshot cooling at `now`.
    pub fn active(&self, now: Instant) -> usize {
        self.store.load().map_or(0, |s| {
            s.backends()
                .filter(|b| b.runtime.cooldown.cooling_until(now).is_some())
                .count()
        })
    }
}

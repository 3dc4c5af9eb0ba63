//! What this proxy knows about the fleet it belongs to: its share of every
//! backend's cluster-wide limits, the fleet size, and degraded mode.
//!
//! The control plane divides each backend's `rpm` and `tpm` between the
//! connected proxies and sends every proxy its shares on the discovery
//! stream ([`Fleet::apply_shares`]). A backend not listed in an update keeps
//! its share; a backend that never had one (new in a snapshot) starts at
//! `1 ÷ proxy count` — the fair share — until the control plane assigns it.
//! Shares are kept by backend id, so shares that arrive before the first
//! snapshot (or before the snapshot that adds a backend) apply with it.
//! Each backend's limiters ([`crate::ratelimit`]) take a new share at once.
//!
//! **Before the first shares.** A proxy with a control plane
//! ([`Fleet::await_shares`], set by the discovery dispatcher) starts every
//! backend at a share of **0**: the other proxies may already hold the
//! whole limit, and the control plane reserves nothing for a proxy it has
//! not granted anything (`control-plane/src/shares.rs`). Requests wait in
//! the queue meanwhile; the control plane pushes shares right after the
//! proxy connects, so that is milliseconds. If no `RateShares` arrives
//! within [`FIRST_SHARES_TIMEOUT`] of the first snapshot, the proxy falls
//! back to `1 ÷ max(1, last known proxy count)` rather than stay shut. A
//! proxy without a control plane (static snapshot) never waits: share 1.
//!
//! **Degraded mode.** A proxy that loses the discovery stream keeps its last
//! shares for [`DEGRADED_AFTER`] (one minute; `--degraded-after` changes
//! it): the control plane may just be restarting, and the other proxies'
//! shares are unchanged. After that it switches every backend to `1 ÷ last
//! known proxy count`, in both directions. A share that was *higher* (demand-weighted) shrinks: the
//! other proxies may still be up, cut off from the control plane in the same
//! way and each falling back to the same rule, and only equal shares are
//! guaranteed to sum to at most the limit when nobody can coordinate. A share
//! that was lower grows to the same fair share for the same reason. The
//! gauge `claw_dp_degraded_mode` is 1 meanwhile, and returns to 0 when shares
//! arrive again after a reconnect.
//!
//! **Client keys.** A key's `rpm` is fleet-wide too: its limiter
//! ([`crate::limits`]) admits `rpm × share`. Keys are many, so an update
//! lists only the keys whose share differs from `client_key_default_share`
//! — the keys with recent demand somewhere in the fleet — and the list is
//! *complete*: a key missing from an update goes back to the default share
//! (which the control plane assigns like any share, so it too sums to at
//! most 1 over the proxies; a control plane that sends none → `1 ÷ proxy
//! count`). The same rules as for backends hold: 0 before the first
//! shares, the fair share after [`FIRST_SHARES_TIMEOUT`] without any, the
//! last shares for [`DEGRADED_AFTER`] without a control plane, then
//! `1 ÷ last known proxy count` for every key; no control plane at all →
//! share 1. A new snapshot applies the shares to the keys it adds.
//!
//! **Leaving.** A proxy shutting down ([`Fleet::leave`], at the end of its
//! drain delay) applies a share of 0 to every backend and key from then on,
//! whatever it is sent; only after that does its report stream tell the
//! control plane it is `leaving`, which hands its shares to the others at
//! once instead of holding them for about a minute as for a proxy that
//! vanished. That order is the point: the control plane never frees a
//! share this proxy may still apply.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use claw_proto::v1::RateShares;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::snapshot::SnapshotStore;

/// How long the discovery stream may be down before degraded mode, by
/// default ([`crate::Config::degraded_after`]).
pub(crate) const DEGRADED_AFTER: Duration = Duration::from_secs(60);

/// How long after the first snapshot a proxy with a control plane waits
/// for its first rate shares (at share 0) before it falls back to the fair
/// share.
pub(crate) const FIRST_SHARES_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Inner {
    /// Connected proxies at the last update (0 = never told).
    proxy_count: u32,
    /// Last assigned `(rpm, tpm)` share per backend id.
    assigned: HashMap<String, (f64, f64)>,
    degraded: bool,
    /// A control plane is configured and has sent no shares yet: backends
    /// without an assignment get 0.
    awaiting: bool,
    /// The client keys' shares of the last update that listed them: every
    /// key whose share differs from `key_default` (the list is complete in
    /// each update).
    key_assigned: HashMap<String, f64>,
    /// The share of a key not in `key_assigned` (`None`: never told, or a
    /// control plane that sends none → the fair share).
    key_default: Option<f64>,
    /// Shutting down ([`Fleet::leave`]): every share is 0 for good.
    leaving: bool,
}

impl Inner {
    fn fair_share(&self) -> f64 {
        1.0 / f64::from(self.proxy_count.max(1))
    }

    fn share_of(&self, backend_id: &str) -> (f64, f64) {
        if self.leaving {
            return (0.0, 0.0);
        }
        if self.degraded {
            let f = self.fair_share();
            return (f, f);
        }
        self.assigned.get(backend_id).copied().unwrap_or_else(|| {
            if self.awaiting {
                return (0.0, 0.0);
            }
            let f = self.fair_share();
            (f, f)
        })
    }

    /// The share of a client key's rpm this proxy applies now.
    fn key_share_of(&self, key_id: &str) -> f64 {
        if self.leaving {
            return 0.0;
        }
        if self.degraded {
            return self.fair_share();
        }
        if self.awaiting {
            return 0.0;
        }
        self.key_assigned
            .get(key_id)
            .copied()
            .or(self.key_default)
            .unwrap_or_else(|| self.fair_share())
    }
}

/// Handle on the fleet state; cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    store: SnapshotStore,
    inner: Arc<Mutex<Inner>>,
    connected: Arc<watch::Sender<bool>>,
    /// Whether a snapshot has been applied.
    snapshot_seen: Arc<watch::Sender<bool>>,
}

impl Fleet {
    /// Fleet state applied to `store`'s backends.
    pub fn new(store: SnapshotStore) -> Self {
        Fleet {
            store,
            inner: Arc::default(),
            connected: Arc::new(watch::Sender::new(false)),
            snapshot_seen: Arc::new(watch::Sender::new(false)),
        }
    }

    /// A control plane assigns the shares: until its first `RateShares`
    /// (or `FIRST_SHARES_TIMEOUT` after the first snapshot, see
    /// [`Fleet::watch_degraded`]) backends get a share of 0.
    pub fn await_shares(&self) {
        let mut g = self.inner.lock();
        g.awaiting = true;
        self.apply_locked(&g);
    }

    /// True while waiting for the control plane's first shares.
    pub fn awaiting_shares(&self) -> bool {
        self.inner.lock().awaiting
    }

    /// Applies an update from the control plane; leaves degraded mode.
    pub fn apply_shares(&self, shares: &RateShares) {
        let mut g = self.inner.lock();
        if shares.proxy_count > 0 {
            g.proxy_count = shares.proxy_count;
        }
        g.awaiting = false;
        for b in &shares.backends {
            g.assigned
                .insert(b.backend_id.clone(), (b.rpm_share, b.tpm_share));
        }
        g.key_assigned = shares
            .client_keys
            .iter()
            .map(|k| (k.key_id.clone(), k.rpm_share))
            .collect();
        g.key_default = shares.client_key_default_share;
        if g.degraded {
            g.degraded = false;
            crate::metrics::set_degraded(false);
            tracing::info!(
                proxy_count = g.proxy_count,
                "rate shares received: leaving degraded mode"
            );
        }
        self.apply_locked(&g);
    }

    /// Assigns one backend's shares by hand (tests, tools); kept like an
    /// assignment from the control plane. False when the backend is not in
    /// the current snapshot.
    pub fn set_share(&self, backend_id: &str, rpm_share: f64, tpm_share: f64) -> bool {
        let known = self
            .store
            .load()
            .is_some_and(|s| s.backend(backend_id).is_some());
        if known {
            let mut g = self.inner.lock();
            g.assigned
                .insert(backend_id.to_string(), (rpm_share, tpm_share));
            self.apply_locked(&g);
        }
        known
    }

    /// Applies the shares to the backends of the current snapshot (after a
    /// new snapshot, for backends it adds).
    pub fn reapply(&self) {
        let g = self.inner.lock();
        self.apply_locked(&g);
    }

    fn apply_locked(&self, g: &Inner) {
        let Some(snap) = self.store.load() else {
            return;
        };
        self.snapshot_seen
            .send_if_modified(|seen| !std::mem::replace(seen, true));
        let now = Instant::now();
        for b in snap.backends() {
            let (rpm, tpm) = g.share_of(&b.id);
            b.runtime.set_shares(rpm, tpm, now);
            if g.leaving {
                b.runtime
                    .left_fleet
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        for k in snap.client_keys() {
            if let Some(rpm) = &k.rpm {
                rpm.limiter.set_share(g.key_share_of(&k.id), now);
            }
        }
        // "" is no key id: the share of keys without one of their own.
        let own = if g.degraded || g.awaiting || g.leaving {
            0
        } else {
            g.key_assigned.len()
        };
        crate::metrics::set_key_shares(g.key_share_of(""), own);
    }

    /// The share of a client key's rpm this proxy applies now.
    pub fn key_share_of(&self, key_id: &str) -> f64 {
        self.inner.lock().key_share_of(key_id)
    }

    /// How many client keys have a share of their own (not the default).
    pub fn keys_with_shares(&self) -> usize {
        self.inner.lock().key_assigned.len()
    }

    /// Switches every backend to `1 ÷ last known proxy count`.
    pub fn enter_degraded(&self) {
        let mut g = self.inner.lock();
        if !g.degraded {
            g.degraded = true;
            crate::metrics::set_degraded(true);
            tracing::warn!(
                proxy_count = g.proxy_count,
                share = g.fair_share(),
                "control plane unreachable for a minute: degraded mode, equal shares"
            );
        }
        self.apply_locked(&g);
    }

    /// Stops admitting anything under a fleet-shared limit, for good: every
    /// backend's rpm and tpm and every client key's rpm get a share of 0 —
    /// effective when this returns (each limiter takes it under its lock),
    /// and kept whatever the control plane sends later, in degraded mode
    /// and for snapshots applied after this. Called when a shutting-down
    /// proxy stops accepting (the end of `--drain-delay`), *before* it
    /// tells the control plane it is leaving, which then hands its shares
    /// to the other proxies at once (`control-plane/src/fleet/shares.rs`).
    /// Requests still arriving on open connections: a client key's rpm
    /// answers 429 with `Retry-After: 1` in the client's error shape (a
    /// retry reaches another proxy); a request a backend's limiter refuses,
    /// including one already waiting in the queue, gets 503 with
    /// `Retry-After` at once (`BackendRuntime::left_fleet`). Already
    /// admitted requests and streams finish normally.
    pub fn leave(&self) {
        let mut g = self.inner.lock();
        g.leaving = true;
        self.apply_locked(&g);
    }

    /// True once [`Fleet::leave`] was called.
    pub fn leaving(&self) -> bool {
        self.inner.lock().leaving
    }

    /// True in degraded mode.
    pub fn degraded(&self) -> bool {
        self.inner.lock().degraded
    }

    /// The last known number of proxies (0 = never told).
    pub fn proxy_count(&self) -> u32 {
        self.inner.lock().proxy_count
    }

    /// The `(rpm, tpm)` share a backend gets now.
    pub fn share_of(&self, backend_id: &str) -> (f64, f64) {
        self.inner.lock().share_of(backend_id)
    }

    /// Records whether the discovery stream is up.
    pub fn set_connected(&self, up: bool) {
        self.connected.send_replace(up);
    }

    /// Enters degraded mode once the discovery stream has been down for
    /// `after` (`DEGRADED_AFTER` by default), and falls back to the fair
    /// share when the first shares are late (`FIRST_SHARES_TIMEOUT`);
    /// runs until aborted.
    pub async fn watch_degraded(self, after: Duration) {
        tokio::join!(
            self.clone().first_shares_fallback(FIRST_SHARES_TIMEOUT),
            self.degraded_loop(after)
        );
    }

    /// Ends the wait for the first shares `after` the first snapshot.
    async fn first_shares_fallback(self, after: Duration) {
        let mut seen = self.snapshot_seen.subscribe();
        if seen.wait_for(|s| *s).await.is_err() {
            return;
        }
        tokio::time::sleep(after).await;
        let mut g = self.inner.lock();
        if g.awaiting {
            g.awaiting = false;
            tracing::warn!(
                proxy_count = g.proxy_count,
                share = g.fair_share(),
                "no rate shares from the control plane since the first snapshot: \
                 1 ÷ last known proxy count until they arrive"
            );
            self.apply_locked(&g);
        }
    }

    async fn degraded_loop(self, after: Duration) {
        crate::metrics::set_degraded(false);
        let mut rx = self.connected.subscribe();
        loop {
            if rx.wait_for(|up| !*up).await.is_err() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(after) => self.enter_degraded(),
                r = rx.wait_for(|up| *up) => {
                    if r.is_err() {
                        return;
                    }
                    continue;
                }
            }
            if rx.wait_for(|up| *up).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::backend;
    use claw_proto::Pool;
    use claw_proto::v1;

    fn store() -> SnapshotStore {
        let s = SnapshotStore::default();
        s.apply(
            1,
            &v1::Snapshot {
                version: 1,
                backends: vec![
                    backend("a", Pool::Primary, &[("m", "m")]),
                    backend("b", Pool::Primary, &[("m", "m")]),
                ],
                ..Default::default()
            },
        )
        .unwrap();
        s
    }

    fn rpm_share(s: &SnapshotStore, id: &str) -> f64 {
        s.load().unwrap().backend(id).unwrap().runtime.rpm.share()
    }

    fn shares(count: u32, list: &[(&str, f64)]) -> RateShares {
        RateShares {
            client_keys: Vec::new(),
            client_key_default_share: None,
            proxy_count: count,
            backends: list
                .iter()
                .map(|(id, s)| v1::BackendShare {
                    backend_id: (*id).into(),
                    rpm_share: *s,
                    tpm_share: *s / 2.0,
                })
                .collect(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unlisted_backends_keep_their_share() {
        let s = store();
        let f = Fleet::new(s.clone());
        f.apply_shares(&shares(4, &[("a", 0.7), ("b", 0.1)]));
        f.apply_shares(&shares(4, &[("a", 0.4)]));
        assert_eq!(rpm_share(&s, "a"), 0.4);
        assert_eq!(rpm_share(&s, "b"), 0.1);
        let tpm = s.load().unwrap().backend("a").unwrap().runtime.tpm.share();
        assert_eq!(tpm, 0.2);
        assert_eq!(f.proxy_count(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn degraded_after_a_minute_down_then_back_on_new_shares() {
        let s = store();
        let f = Fleet::new(s.clone());
        f.set_connected(true);
        f.apply_shares(&shares(4, &[("a", 0.7), ("b", 0.05)]));
        let watcher = tokio::spawn(f.clone().watch_degraded(DEGRADED_AFTER));
        tokio::task::yield_now().await;

        // Down for 59 s: the last shares hold.
        f.set_connected(false);
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!f.degraded());
        assert_eq!(rpm_share(&s, "a"), 0.7);
        // A reconnect before the minute re-arms the timer.
        f.set_connected(true);
        tokio::time::sleep(Duration::from_secs(5)).await;
        f.set_connected(false);
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!f.degraded());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(f.degraded());
        // Both directions: 0.7 shrinks, 0.05 grows, to 1 ÷ 4.
        assert_eq!(rpm_share(&s, "a"), 0.25);
        assert_eq!(rpm_share(&s, "b"), 0.25);

        // Reconnected: still degraded until shares arrive.
        f.set_connected(true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(f.degraded());
        f.apply_shares(&shares(2, &[("a", 0.5)]));
        assert!(!f.degraded());
        assert_eq!(rpm_share(&s, "a"), 0.5);
        assert_eq!(rpm_share(&s, "b"), 0.05);
        watcher.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_control_plane_backends_keep_the_whole_limit() {
        let s = store();
        let f = Fleet::new(s.clone());
        f.reapply();
        assert_eq!(rpm_share(&s, "a"), 1.0);
        assert!(!f.awaiting_shares());
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_control_plane_backends_wait_at_zero_for_the_first_shares() {
        let s = SnapshotStore::default();
        let f = Fleet::new(s.clone());
        f.await_shares();
        let watcher = tokio::spawn(f.clone().watch_degraded(DEGRADED_AFTER));
        s.apply(1, &two_backends()).unwrap();
        f.reapply();
        assert_eq!(rpm_share(&s, "a"), 0.0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rpm_share(&s, "a"), 0.0);
        // The first shares: assigned or, for unlisted backends, fair.
        f.apply_shares(&shares(2, &[("a", 0.7)]));
        assert!(!f.awaiting_shares());
        assert_eq!(rpm_share(&s, "a"), 0.7);
        assert_eq!(rpm_share(&s, "b"), 0.5);
        // No late fallback overrides them.
        tokio::time::sleep(FIRST_SHARES_TIMEOUT * 2).await;
        assert_eq!(rpm_share(&s, "a"), 0.7);
        watcher.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn without_shares_a_proxy_falls_back_to_the_fair_share_after_the_timeout() {
        let s = SnapshotStore::default();
        let f = Fleet::new(s.clone());
        f.await_shares();
        let watcher = tokio::spawn(f.clone().watch_degraded(DEGRADED_AFTER));
        // The clock starts at the first snapshot, not at startup.
        tokio::time::sleep(FIRST_SHARES_TIMEOUT * 3).await;
        s.apply(1, &two_backends()).unwrap();
        f.reapply();
        tokio::time::sleep(FIRST_SHARES_TIMEOUT - Duration::from_millis(100)).await;
        assert_eq!(rpm_share(&s, "a"), 0.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!f.awaiting_shares());
        // No proxy count known yet: 1 ÷ max(1, 0).
        assert_eq!(rpm_share(&s, "a"), 1.0);
        watcher.abort();
    }

    fn two_backends() -> v1::Snapshot {
        v1::Snapshot {
            version: 1,
            backends: vec![
                backend("a", Pool::Primary, &[("m", "m")]),
                backend("b", Pool::Primary, &[("m", "m")]),
            ],
            ..Default::default()
        }
    }

    fn keyed_store() -> SnapshotStore {
        let s = SnapshotStore::default();
        let key = |id: &str, rpm: u32| v1::SnapshotClientKey {
            rpm,
            ..crate::test_util::key(id, id)
        };
        s.apply(
            1,
            &v1::Snapshot {
                version: 1,
                backends: vec![backend("a", Pool::Primary, &[("m", "m")])],
                client_keys: vec![key("k1", 60), key("k2", 60), key("free", 0)],
                ..Default::default()
            },
        )
        .unwrap();
        s
    }

    fn key_share(s: &SnapshotStore, id: &str) -> f64 {
        let snap = s.load().unwrap();
        let k = snap.client_keys().find(|k| &*k.id == id).unwrap();
        k.rpm.as_ref().unwrap().limiter.share()
    }

    fn key_shares(count: u32, default: Option<f64>, list: &[(&str, f64)]) -> RateShares {
        RateShares {
            client_keys: list
                .iter()
                .map(|(id, s)| v1::ClientKeyShare {
                    key_id: (*id).into(),
                    rpm_share: *s,
                })
                .collect(),
            client_key_default_share: default,
            ..shares(count, &[])
        }
    }

    #[tokio::test(start_paused = true)]
    async fn client_keys_get_their_share_or_the_default() {
        let s = keyed_store();
        let f = Fleet::new(s.clone());
        // Without a control plane: the whole rpm.
        f.reapply();
        assert_eq!(key_share(&s, "k1"), 1.0);
        // With one: 0 until the first shares.
        f.await_shares();
        assert_eq!(key_share(&s, "k1"), 0.0);
        f.apply_shares(&key_shares(4, Some(0.2), &[("k1", 0.7)]));
        assert_eq!((key_share(&s, "k1"), key_share(&s, "k2")), (0.7, 0.2));
        assert_eq!(f.keys_with_shares(), 1);
        // The list is complete: a key left out goes back to the default.
        f.apply_shares(&key_shares(4, Some(0.25), &[("k2", 0.1)]));
        assert_eq!((key_share(&s, "k1"), key_share(&s, "k2")), (0.25, 0.1));
        // A control plane that sends no default: 1 ÷ proxy count.
        f.apply_shares(&key_shares(2, None, &[]));
        assert_eq!(key_share(&s, "k1"), 0.5);
        // Degraded: 1 ÷ last known proxy count for every key.
        f.apply_shares(&key_shares(4, Some(0.1), &[("k1", 0.9)]));
        f.enter_degraded();
        assert_eq!((key_share(&s, "k1"), key_share(&s, "k2")), (0.25, 0.25));
        f.apply_shares(&key_shares(4, Some(0.1), &[("k1", 0.9)]));
        assert_eq!((key_share(&s, "k1"), key_share(&s, "k2")), (0.9, 0.1));
        // A new snapshot's keys get their shares at once; limiters (and
        // their shares) carry over by key id.
        let mut snap = v1::Snapshot {
            version: 2,
            ..Default::default()
        };
        for (id, rpm) in [("k1", 30), ("k3", 60)] {
            snap.client_keys.push(v1::SnapshotClientKey {
                rpm,
                ..crate::test_util::key(id, id)
            });
        }
        s.apply(2, &snap).unwrap();
        f.reapply();
        assert_eq!((key_share(&s, "k1"), key_share(&s, "k3")), (0.9, 0.1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leaving_proxy_applies_zero_whatever_it_is_sent() {
        let s = keyed_store();
        let f = Fleet::new(s.clone());
        f.await_shares();
        f.apply_shares(&key_shares(2, Some(0.5), &[("k1", 0.7)]));
        assert_eq!(key_share(&s, "k1"), 0.7);
        f.leave();
        assert!(f.leaving());
        assert_eq!((key_share(&s, "k1"), key_share(&s, "k2")), (0.0, 0.0));
        let snap = s.load().unwrap();
        let k1 = snap.client_keys().find(|k| &*k.id == "k1").unwrap();
        let limiter = &k1.rpm.as_ref().unwrap().limiter;
        assert_eq!(
            limiter.try_acquire(1.0, Instant::now()),
            Err(Duration::MAX),
            "nothing is admitted at 0"
        );
        // Later shares, degraded mode and new snapshots change nothing.
        f.apply_shares(&key_shares(1, Some(1.0), &[]));
        f.enter_degraded();
        f.reapply();
        assert_eq!((key_share(&s, "k1"), key_share(&s, "k2")), (0.0, 0.0));
        assert_eq!(f.key_share_of("k1"), 0.0);
        // Backends are marked, so a refused request is not queued.
        let snap = s.load().unwrap();
        assert!(snap.backends().next().is_some());
        for b in snap.backends() {
            assert!(
                b.runtime
                    .left_fleet
                    .load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn new_backends_start_at_the_fair_share() {
        let s = SnapshotStore::default();
        let f = Fleet::new(s.clone());
        f.apply_shares(&shares(3, &[]));
        s.apply(
            1,
            &v1::Snapshot {
                version: 1,
                backends: vec![backend("new", Pool::Primary, &[("m", "m")])],
                ..Default::default()
            },
        )
        .unwrap();
        f.reapply();
        assert!((rpm_share(&s, "new") - 1.0 / 3.0).abs() < 1e-9);
    }
}

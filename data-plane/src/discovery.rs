//! The discovery client: one bidirectional `DiscoveryService.StreamConfig`
//! stream to the control plane (xDS-style).
//!
//! The first message names this proxy and the version it holds; every
//! response is applied and answered with an ACK (`response_nonce`, applied
//! version) or a NACK (`error_detail`, the version still held). When the
//! stream is lost the proxy keeps serving its last good snapshot and
//! reconnects with the jittered exponential backoff of
//! [`crate::cp_channel::Backoff`] (reset after a healthy stream).
//!
//! Responses are handled by [`Dispatcher`], which owns everything a message
//! may change. A response without a snapshot is incremental — cooldowns
//! other proxies started, this proxy's rate shares — and gets no answer:
//!
//! - a `CooldownUpdate` cools the backend until `now + remaining_ms` (the
//!   receipt time, so clock skew between machines does not matter); updates
//!   this proxy itself caused (`source_node_id`) are ignored;
//! - `RateShares` go to [`Fleet::apply_shares`];
//! - `HealthUpdate`s ([`crate::health`]): `UNHEALTHY` marks the backend
//!   until a `HEALTHY` update, `EJECTED` for `remaining_ms` from receipt,
//!   anything else clears the mark. With `health_complete` (the first
//!   message of every stream) the list is the whole table: a backend it does
//!   not name is healthy, so a reconnect leaves no stale mark.
//!
//! Incremental messages may arrive before the first snapshot (or name a
//! backend a later snapshot adds): rate shares are kept by [`Fleet`] per
//! backend id and applied with every snapshot; a cooldown for a backend not
//! in the snapshot is kept (until it would have ended) and applied as soon
//! as a snapshot brings the backend. Health marks are kept by backend id in
//! the dispatcher's table (the truth) and synced into the runtime of every
//! backend of each snapshot applied, so marks survive snapshot swaps and
//! reach backends a later snapshot adds.
//!
//! The stream's up/down state feeds [`Fleet`]'s degraded-mode timer.
//!
//! With a snapshot cache ([`Dispatcher::with_snapshot_cache`]), [`run`]
//! first loads the cached last-known-good snapshot (before it connects, so
//! the proxy serves at once even when the control plane is down) and every
//! snapshot applied afterwards is handed to the cache's background writer.
//! The hello then reports the cached version. The first snapshot from the
//! control plane after a cached start replaces the cached one even when its
//! version is lower: a control plane restored to an older version is still
//! the authority.
//!
//! Lineage: every snapshot names the lineage of the control plane's store,
//! and a restore from backup starts a new one. The hello and every answer
//! name the held lineage, so a control plane of another lineage sends its
//! snapshot even at an equal version; a snapshot of another (non-empty)
//! lineage is applied even when its version is lower than the held one
//! (see `snapshot::compile`). Within one lineage versions only go forward.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use claw_proto::v1::{HealthState, HealthUpdate, StreamConfigRequest, StreamConfigResponse};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::cooldown::{Cooldowns, MAX_RETRY_AFTER};
use crate::cp_channel::{Backoff, ProxyToken};
use crate::fleet::Fleet;
use crate::health::{HealthMark, Verdict};
use crate::snapshot::SnapshotStore;
use crate::snapshot_cache::{CacheWriter, SnapshotCache};

/// Where and how to connect.
#[derive(Clone)]
pub(crate) struct DiscoveryConfig {
    /// Control plane URL (and CA).
    pub url: crate::cp_channel::ControlPlaneUrl,
    /// Proxy token.
    pub proxy_token: ProxyToken,
}

/// A remote cooldown kept until its backend is in the snapshot: `(until,
/// consecutive, quota exhausted)`.
type EarlyCooldown = (Instant, u32, bool);

/// Applies what the control plane sends and builds the replies.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    node_id: String,
    store: SnapshotStore,
    cooldowns: Cooldowns,
    fleet: Fleet,
    /// Remote cooldowns for backends not in the snapshot yet: `(until,
    /// consecutive, quota exhausted)` per backend id.
    early: Arc<Mutex<HashMap<String, EarlyCooldown>>>,
    /// Auth failures for backends not in the snapshot yet (the catch-up a
    /// proxy gets on connecting may come before its first snapshot).
    early_auth: Arc<Mutex<HashSet<String>>>,
    /// The fleet health table as pushed: the marks by backend id (a backend
    /// not in it is healthy), whether the snapshot has the backend or not.
    health: Arc<Mutex<HashMap<String, HealthMark>>>,
    /// Where applied snapshots are persisted, if anywhere.
    cache: Option<CacheWriter>,
    /// The held snapshot came from the cache and the control plane has not
    /// replaced it yet: its next snapshot is taken whatever its version.
    from_cache: Arc<AtomicBool>,
}

impl Dispatcher {
    /// A dispatcher updating `store`, `cooldowns` and `fleet`.
    /// The fleet waits for the control plane's first rate shares
    /// ([`Fleet::await_shares`]).
    pub(crate) fn new(
        node_id: String,
        store: SnapshotStore,
        cooldowns: Cooldowns,
        fleet: Fleet,
    ) -> Self {
        fleet.await_shares();
        let scraped = store.clone();
        crate::metrics::render_at_scrape(move |out| crate::select::render_excluded(&scraped, out));
        Dispatcher {
            node_id,
            store,
            cooldowns,
            fleet,
            early: Arc::default(),
            early_auth: Arc::default(),
            health: Arc::default(),
            cache: None,
            from_cache: Arc::default(),
        }
    }

    /// Persists every applied snapshot to an encrypted cache file at `path`
    /// (keyed by `proxy_token`), and makes [`run`] start from it; `None`
    /// leaves the dispatcher as it is.
    pub(crate) fn with_snapshot_cache(
        mut self,
        path: Option<&Path>,
        proxy_token: &ProxyToken,
    ) -> Self {
        self.cache = path.map(|p| {
            CacheWriter::new(SnapshotCache::new(
                p,
                proxy_token.expose(),
                self.node_id.clone(),
            ))
        });
        self
    }

    /// Loads the snapshot cache, if one is configured and usable, into the
    /// store (blocking: it reads the file). Returns the version loaded.
    pub(crate) fn load_cache(&self) -> Option<u64> {
        let version = self.cache.as_ref()?.cache().load_into(&self.store)?;
        self.from_cache.store(true, Ordering::Release);
        self.fleet.reapply();
        Some(version)
    }

    /// The lineage of the held snapshot (empty when none is held).
    fn lineage(&self) -> String {
        self.store
            .load()
            .map(|s| s.lineage().to_string())
            .unwrap_or_default()
    }

    /// The first message of a stream.
    pub(crate) fn hello(&self) -> StreamConfigRequest {
        StreamConfigRequest {
            node_id: self.node_id.clone(),
            version: self.store.version(),
            response_nonce: String::new(),
            error_detail: String::new(),
            lineage: self.lineage(),
            excluded: Vec::new(),
        }
    }

    /// Applies one response: the snapshot first (so shares and cooldowns
    /// can name backends it adds), then rate shares, then cooldowns. Returns
    /// the ACK or NACK of a snapshot; `None` for an incremental message.
    pub(crate) fn handle(&self, mut msg: StreamConfigResponse) -> Option<StreamConfigRequest> {
        let reply = msg.snapshot.take().map(|s| {
            let result = if self.from_cache.load(Ordering::Acquire) {
                self.store.replace(msg.version, &s)
            } else {
                self.store.apply(msg.version, &s)
            };
            if result.is_ok() {
                self.from_cache.store(false, Ordering::Release);
                self.fleet.reapply();
                self.apply_early_cooldowns(Instant::now());
                self.sync_health(None, Instant::now());
                if let Some(cache) = &self.cache {
                    cache.submit(msg.version, Arc::new(s));
                }
            }
            result
        });
        if let Some(shares) = &msg.rate_shares {
            self.fleet.apply_shares(shares);
        }
        let now = Instant::now();
        for c in &msg.cooldowns {
            if c.source_node_id == self.node_id {
                continue;
            }
            if c.auth_failed {
                if !self.cooldowns.fail_auth_remote(&c.backend_id, now) {
                    tracing::debug!(backend = %c.backend_id, "auth failure for a backend not in the snapshot yet: kept");
                    self.early_auth.lock().insert(c.backend_id.clone());
                }
                continue;
            }
            let remaining = Duration::from_millis(c.remaining_ms).min(MAX_RETRY_AFTER);
            let until = now + remaining;
            if !self
                .cooldowns
                .apply_remote(&c.backend_id, until, c.consecutive, c.quota_exhausted)
            {
                tracing::debug!(backend = %c.backend_id, "cooldown for a backend not in the snapshot yet: kept");
                let mut early = self.early.lock();
                early.retain(|_, (u, _, _)| *u > now);
                let e = early.entry(c.backend_id.clone()).or_insert((
                    until,
                    c.consecutive,
                    c.quota_exhausted,
                ));
                *e = (
                    e.0.max(until),
                    e.1.max(c.consecutive),
                    e.2 || c.quota_exhausted,
                );
            }
        }
        if msg.health_complete || !msg.health.is_empty() {
            self.apply_health(&msg.health, msg.health_complete, now);
        }
        // An explicit HEALTHY means a probe got through with the backend's
        // key (or its failures ended): an auth failure learned earlier, here
        // or elsewhere, is over. Backends a complete table merely leaves out
        // keep theirs.
        for u in &msg.health {
            if u.state == HealthState::Healthy as i32 {
                self.early_auth.lock().remove(&u.backend_id);
                self.cooldowns.clear_auth_remote(&u.backend_id);
            }
        }
        let result = reply?;
        Some(match result {
            // An ACK, listing what the applied snapshot left out.
            Ok(()) => StreamConfigRequest {
                node_id: self.node_id.clone(),
                version: msg.version,
                response_nonce: msg.nonce,
                error_detail: String::new(),
                lineage: self.lineage(),
                excluded: self
                    .store
                    .load()
                    .map(|s| s.excluded().to_vec())
                    .unwrap_or_default(),
            },
            Err(e) => {
                tracing::warn!(version = msg.version, error = %e, "rejected configuration snapshot");
                StreamConfigRequest {
                    node_id: self.node_id.clone(),
                    version: self.store.version(),
                    response_nonce: msg.nonce,
                    error_detail: e.to_string(),
                    lineage: self.lineage(),
                    excluded: Vec::new(),
                }
            }
        })
    }
}

impl Dispatcher {
    /// Applies the kept cooldowns whose backend the snapshot now has;
    /// forgets those that ended.
    fn apply_early_cooldowns(&self, now: Instant) {
        self.early_auth
            .lock()
            .retain(|id| !self.cooldowns.fail_auth_remote(id, now));
        let mut early = self.early.lock();
        early.retain(|id, (until, consecutive, quota)| {
            *until > now
                && !self
                    .cooldowns
                    .apply_remote(id, *until, *consecutive, *quota)
        });
    }
}

/// The instant of `unix_ms` on the control plane's clock, on this proxy's
/// monotonic clock. Skew between the machines moves every mark alike, so
/// their order — all the cap needs — is kept.
fn instant_of_unix_ms(unix_ms: i64, now: Instant) -> Instant {
    let sys_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let diff = sys_now.saturating_sub(unix_ms);
    let d = Duration::from_millis(diff.unsigned_abs());
    if diff >= 0 {
        now.checked_sub(d).unwrap_or(now)
    } else {
        now.checked_add(d).unwrap_or(now)
    }
}

impl Dispatcher {
    /// Applies health updates to the table (the whole table when
    /// `complete`), then to the runtime of the snapshot's backends.
    fn apply_health(&self, updates: &[HealthUpdate], complete: bool, now: Instant) {
        let mut table = self.health.lock();
        let previous = if complete {
            std::mem::take(&mut *table)
        } else {
            HashMap::new()
        };
        table.retain(|_, m| m.holds(now));
        for u in updates {
            // The cap's order: when the control plane says the backend
            // entered the state (the same on every proxy), else — from an
            // older control plane — a mark that still holds keeps its start.
            let since = match u.since_unix_ms {
                0 => table
                    .get(&u.backend_id)
                    .or_else(|| previous.get(&u.backend_id))
                    .filter(|m| m.holds(now))
                    .map_or(now, |m| m.since),
                ms => instant_of_unix_ms(ms, now),
            };
            let verdict = match HealthState::try_from(u.state) {
                Ok(HealthState::Unhealthy) => Some(Verdict::Unhealthy),
                Ok(HealthState::Ejected) if u.remaining_ms > 0 => Some(Verdict::Ejected {
                    until: now + Duration::from_millis(u.remaining_ms).min(MAX_RETRY_AFTER),
                }),
                // Healthy, not probed, not probed yet, an ejection already
                // over, or a state this build does not know: not excluded.
                _ => None,
            };
            match verdict {
                Some(verdict) => {
                    table.insert(
                        u.backend_id.clone(),
                        HealthMark {
                            verdict,
                            since,
                            reason: u.reason.clone(),
                        },
                    );
                }
                None => {
                    table.remove(&u.backend_id);
                }
            }
        }
        if complete {
            self.sync_health_locked(&table, None, now);
        } else {
            let ids: HashSet<&str> = updates.iter().map(|u| u.backend_id.as_str()).collect();
            self.sync_health_locked(&table, Some(&ids), now);
        }
    }

    /// Sets the runtime health mark of the snapshot's backends (those of
    /// `only`, when given) from the table.
    fn sync_health(&self, only: Option<&HashSet<&str>>, now: Instant) {
        let table = self.health.lock();
        self.sync_health_locked(&table, only, now);
    }

    fn sync_health_locked(
        &self,
        table: &HashMap<String, HealthMark>,
        only: Option<&HashSet<&str>>,
        now: Instant,
    ) {
        let snap = self.store.load();
        if let Some(only) = only {
            for id in only {
                if snap.as_ref().and_then(|s| s.backend(id)).is_none() {
                    tracing::debug!(backend_id = %id, "health update for a backend not in the snapshot: kept");
                }
            }
        }
        let Some(snap) = snap else {
            return;
        };
        for b in snap.backends() {
            if only.is_some_and(|o| !o.contains(&*b.id)) {
                continue;
            }
            let new = table.get(&*b.id).filter(|m| m.holds(now)).cloned();
            let old = b.runtime.health.mark(now);
            log_health_change(b, old.as_ref(), new.as_ref(), now);
            b.runtime.health.set(new);
        }
    }
}

/// Logs a change of `b`'s fleet health mark once: a new verdict at warn,
/// the return to health at info; an ejection merely extended is no change.
fn log_health_change(
    b: &crate::snapshot::Backend,
    old: Option<&HealthMark>,
    new: Option<&HealthMark>,
    now: Instant,
) {
    let kind = |m: Option<&HealthMark>| m.map(|m| matches!(m.verdict, Verdict::Unhealthy));
    if kind(old) == kind(new) {
        return;
    }
    match new {
        Some(HealthMark {
            verdict: Verdict::Unhealthy,
            reason,
            ..
        }) => {
            tracing::warn!(backend = %b.name, backend_id = %b.id, reason = %reason, "backend unhealthy fleet-wide: excluded (at most half of a model's candidates are)");
        }
        Some(HealthMark {
            verdict: Verdict::Ejected { until },
            reason,
            ..
        }) => {
            let ejected_ms = until.saturating_duration_since(now).as_millis() as u64;
            tracing::warn!(backend = %b.name, backend_id = %b.id, ejected_ms, reason = %reason, "backend ejected fleet-wide: excluded (at most half of a model's candidates are)");
        }
        None => {
            tracing::info!(backend = %b.name, backend_id = %b.id, "backend healthy again fleet-wide");
        }
    }
}

/// Runs the discovery stream forever (abort the task to stop it). With a
/// snapshot cache, loads it first and writes applied snapshots to it.
pub(crate) async fn run(config: DiscoveryConfig, dispatcher: Dispatcher) {
    let writer = dispatcher.cache.clone();
    if writer.is_some() {
        // Before the first connect: serve the cached snapshot at once.
        let d = dispatcher.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || d.load_cache()).await {
            tracing::warn!(error = %e, "loading the snapshot cache failed");
        }
    }
    let write = async move {
        if let Some(w) = writer {
            w.run().await;
        }
    };
    tokio::join!(write, stream_forever(&config, &dispatcher));
}

async fn stream_forever(config: &DiscoveryConfig, dispatcher: &Dispatcher) {
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        let mut got_response = false;
        match stream_once(config, dispatcher, &mut got_response).await {
            Ok(()) => tracing::warn!("discovery stream closed by the control plane"),
            Err(e) => match e.downcast_ref::<tonic::Status>() {
                Some(status) if crate::cp_channel::is_too_large(status) => {
                    // Reconnecting at once would fetch the same snapshot:
                    // say so loudly (tonic names the size and the limit),
                    // count it, and back off like any failed stream.
                    crate::metrics::discovery_too_large();
                    tracing::error!(
                        error = %status.message(),
                        limit_bytes = crate::cp_channel::MAX_MESSAGE_BYTES,
                        "snapshot exceeds this proxy's message limit: keeping the last snapshot"
                    );
                }
                _ => tracing::warn!(error = %e, "discovery stream failed"),
            },
        }
        crate::metrics::set_discovery_connected(false);
        dispatcher.fleet.set_connected(false);
        let delay = backoff.after_stream(got_response, started.elapsed());
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting to the control plane"
        );
        tokio::time::sleep(delay).await;
    }
}

async fn stream_once(
    config: &DiscoveryConfig,
    dispatcher: &Dispatcher,
    got_response: &mut bool,
) -> anyhow::Result<()> {
    let channel = crate::cp_channel::connect_authorized(&config.url, &config.proxy_token).await?;
    let mut client = crate::cp_channel::discovery_client(channel);
    let (tx, rx) = mpsc::channel(16);
    tx.send(dispatcher.hello()).await?;
    let request = tonic::Request::new(ReceiverStream::new(rx));
    let mut inbound = client.stream_config(request).await?.into_inner();
    crate::metrics::set_discovery_connected(true);
    dispatcher.fleet.set_connected(true);
    tracing::info!(url = %config.url, "discovery stream open");
    while let Some(msg) = inbound.message().await? {
        *got_response = true;
        if let Some(reply) = dispatcher.handle(msg) {
            tx.send(reply).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use claw_proto::v1;

    /// A dispatcher of node `node_id` over `store`, with its own cooldowns
    /// and fleet handles.
    fn dispatcher(node_id: &str, store: &SnapshotStore) -> Dispatcher {
        Dispatcher::new(
            node_id.into(),
            store.clone(),
            Cooldowns::new(store.clone()),
            Fleet::new(store.clone()),
        )
    }

    #[tokio::test]
    async fn acks_applied_and_nacks_rejected_snapshots() {
        let store = SnapshotStore::default();
        let d = dispatcher("n1", &store);
        assert_eq!(d.hello().version, 0);
        let ok = d
            .handle(StreamConfigResponse {
                version: 4,
                nonce: "a".into(),
                snapshot: Some(v1::Snapshot {
                    version: 4,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            (
                ok.version,
                ok.response_nonce.as_str(),
                ok.error_detail.as_str()
            ),
            (4, "a", "")
        );
        let stale = d
            .handle(StreamConfigResponse {
                version: 3,
                nonce: "b".into(),
                snapshot: Some(v1::Snapshot::default()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!((stale.version, stale.response_nonce.as_str()), (4, "b"));
        assert!(stale.error_detail.contains("older"));
        // Without a snapshot: incremental, no answer.
        let incremental = d.handle(StreamConfigResponse {
            version: 4,
            ..Default::default()
        });
        assert!(incremental.is_none());
        assert_eq!(d.hello().version, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn incremental_cooldowns_and_shares_apply_without_an_answer() {
        use crate::test_util::backend;
        use claw_proto::Pool;
        let store = SnapshotStore::default();
        let d = dispatcher("me", &store);
        let snap = v1::Snapshot {
            version: 2,
            backends: vec![
                backend("a", Pool::Primary, &[("m", "m")]),
                backend("b", Pool::Primary, &[("m", "m")]),
            ],
            ..Default::default()
        };
        assert!(
            d.handle(StreamConfigResponse {
                version: 2,
                nonce: "n".into(),
                snapshot: Some(snap),
                ..Default::default()
            })
            .is_some()
        );
        let now = Instant::now();
        let update = |id: &str, source: &str, ms: u64| v1::CooldownUpdate {
            backend_id: id.into(),
            until_unix_ms: 0,
            remaining_ms: ms,
            consecutive: 3,
            quota_exhausted: false,
            auth_failed: false,
            source_node_id: source.into(),
        };
        let reply = d.handle(StreamConfigResponse {
            version: 2,
            cooldowns: vec![
                update("a", "other", 5_000),
                update("b", "me", 5_000),
                update("ghost", "other", 5_000),
            ],
            rate_shares: Some(v1::RateShares {
                client_keys: Vec::new(),
                client_key_default_share: None,
                proxy_count: 2,
                backends: vec![v1::BackendShare {
                    backend_id: "b".into(),
                    rpm_share: 0.3,
                    tpm_share: 0.6,
                }],
            }),
            ..Default::default()
        });
        assert!(reply.is_none());
        let s = store.load().unwrap();
        let a = &s.backend("a").unwrap().runtime;
        let b = &s.backend("b").unwrap().runtime;
        assert_eq!(
            a.cooldown.cooling_until(now),
            Some(now + Duration::from_secs(5))
        );
        assert_eq!(a.cooldown.consecutive(), 3);
        assert_eq!(
            b.cooldown.cooling_until(now),
            None,
            "our own 429 echoed back"
        );
        assert_eq!((b.rpm.share(), b.tpm.share()), (0.3, 0.6));
        // Unlisted: the fair share of two proxies.
        assert_eq!(a.rpm.share(), 0.5);
        assert_eq!(d.fleet.proxy_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quota_exhausted_update_marks_the_backend_exhausted() {
        use crate::test_util::backend;
        use claw_proto::Pool;
        let store = SnapshotStore::default();
        let d = dispatcher("me", &store);
        let snap = v1::Snapshot {
            version: 2,
            backends: vec![backend("a", Pool::Primary, &[("m", "m")])],
            ..Default::default()
        };
        d.handle(StreamConfigResponse {
            version: 2,
            nonce: "n".into(),
            snapshot: Some(snap),
            ..Default::default()
        });
        let now = Instant::now();
        d.handle(StreamConfigResponse {
            version: 2,
            cooldowns: vec![v1::CooldownUpdate {
                backend_id: "a".into(),
                until_unix_ms: 0,
                remaining_ms: 3_600_000,
                consecutive: 1,
                quota_exhausted: true,
                auth_failed: false,
                source_node_id: "other".into(),
            }],
            ..Default::default()
        });
        let s = store.load().unwrap();
        let a = &s.backend("a").unwrap().runtime;
        let hour = now + Duration::from_secs(3600);
        assert_eq!(a.cooldown.quota_exhausted_until(now), Some(hour));
        assert_eq!(a.cooldown.cooling_until(now), Some(hour));
    }

    #[tokio::test(start_paused = true)]
    async fn an_auth_failed_update_excludes_the_backend_until_a_new_key() {
        use crate::test_util::backend;
        use claw_proto::Pool;
        let store = SnapshotStore::default();
        let d = dispatcher("me", &store);
        let snap = |version, key: &str| {
            let mut b = backend("a", Pool::Primary, &[("m", "m")]);
            b.api_key = key.into();
            v1::Snapshot {
                version,
                backends: vec![b],
                ..Default::default()
            }
        };
        d.handle(StreamConfigResponse {
            version: 2,
            nonce: "n".into(),
            snapshot: Some(snap(2, "sk-old")),
            ..Default::default()
        });
        let now = Instant::now();
        d.handle(StreamConfigResponse {
            version: 2,
            cooldowns: vec![v1::CooldownUpdate {
                backend_id: "a".into(),
                auth_failed: true,
                source_node_id: "other".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let rt = store.load().unwrap().backend("a").unwrap().runtime.clone();
        assert_eq!(rt.cooldown.auth_failed(), Some(0));
        assert!(
            rt.cooldown
                .cooling_until(now + Duration::from_secs(86_400))
                .is_some()
        );
        // The same key again (another field changed) keeps it out.
        d.handle(StreamConfigResponse {
            version: 3,
            nonce: "n3".into(),
            snapshot: Some(snap(3, "sk-old")),
            ..Default::default()
        });
        assert_eq!(rt.cooldown.auth_failed(), Some(0));
        d.handle(StreamConfigResponse {
            version: 4,
            nonce: "n4".into(),
            snapshot: Some(snap(4, "sk-new")),
            ..Default::default()
        });
        assert_eq!(rt.cooldown.auth_failed(), None);
        assert_eq!(rt.cooldown.cooling_until(now), None);
    }

    /// Issue 15: a probe that gets through with the backend's key clears its
    /// auth failure fleet-wide; the control plane says so with an explicit
    /// HEALTHY. A complete table that merely leaves the backend out does not.
    #[tokio::test(start_paused = true)]
    async fn an_explicit_healthy_update_ends_an_auth_failure_and_a_complete_table_does_not() {
        use crate::test_util::backend;
        use claw_proto::Pool;
        let store = SnapshotStore::default();
        let d = dispatcher("me", &store);
        d.handle(StreamConfigResponse {
            version: 2,
            nonce: "n".into(),
            snapshot: Some(v1::Snapshot {
                version: 2,
                backends: vec![backend("a", Pool::Primary, &[("m", "m")])],
                ..Default::default()
            }),
            ..Default::default()
        });
        d.handle(StreamConfigResponse {
            version: 2,
            cooldowns: vec![v1::CooldownUpdate {
                backend_id: "a".into(),
                auth_failed: true,
                source_node_id: "other".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let rt = store.load().unwrap().backend("a").unwrap().runtime.clone();
        assert_eq!(rt.cooldown.auth_failed(), Some(0));
        d.handle(StreamConfigResponse {
            version: 2,
            health_complete: true,
            ..Default::default()
        });
        assert_eq!(
            rt.cooldown.auth_failed(),
            Some(0),
            "left out is not healthy news"
        );
        d.handle(StreamConfigResponse {
            version: 2,
            health: vec![HealthUpdate {
                backend_id: "a".into(),
                state: HealthState::Healthy as i32,
                remaining_ms: 0,
                reason: "probe: ok: 200 in 3 ms".into(),
                since_unix_ms: 0,
            }],
            ..Default::default()
        });
        assert_eq!(rt.cooldown.auth_failed(), None);
        assert_eq!(rt.cooldown.cooling_until(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_auth_failure_in_the_catch_up_before_the_first_snapshot_applies_once_it_arrives() {
        use crate::test_util::backend;
        use claw_proto::Pool;
        let store = SnapshotStore::default();
        let d = dispatcher("me", &store);
        d.handle(StreamConfigResponse {
            version: 0,
            cooldowns: vec![v1::CooldownUpdate {
                backend_id: "a".into(),
                auth_failed: true,
                source_node_id: "other".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        d.handle(StreamConfigResponse {
            version: 2,
            nonce: "n".into(),
            snapshot: Some(v1::Snapshot {
                version: 2,
                backends: vec![backend("a", Pool::Primary, &[("m", "m")])],
                ..Default::default()
            }),
            ..Default::default()
        });
        let s = store.load().unwrap();
        assert_eq!(
            s.backend("a").unwrap().runtime.cooldown.auth_failed(),
            Some(0)
        );
        assert!(d.early_auth.lock().is_empty());
    }

    /// Regression: a cooldown or rate share pushed before the first
    /// snapshot was dropped (the backend was unknown), so the proxy sent to
    /// a cooling backend and used the fair share instead of its own.
    #[tokio::test(start_paused = true)]
    async fn incremental_messages_before_the_first_snapshot_apply_once_it_arrives() {
        use crate::test_util::backend;
        use claw_proto::Pool;
        let store = SnapshotStore::default();
        let d = dispatcher("me", &store);
        let start = Instant::now();
        let update = |id: &str, ms: u64| v1::CooldownUpdate {
            backend_id: id.into(),
            until_unix_ms: 0,
            remaining_ms: ms,
            consecutive: 2,
            source_node_id: "other".into(),
            quota_exhausted: false,
            auth_failed: false,
        };
        let early = d.handle(StreamConfigResponse {
            version: 0,
            cooldowns: vec![update("a", 10_000), update("b", 1_000)],
            rate_shares: Some(v1::RateShares {
                client_keys: Vec::new(),
                client_key_default_share: None,
                proxy_count: 3,
                backends: vec![v1::BackendShare {
                    backend_id: "a".into(),
                    rpm_share: 0.7,
                    tpm_share: 0.2,
                }],
            }),
            ..Default::default()
        });
        assert!(early.is_none());
        assert!(store.load().is_none());
        // The snapshot comes 2 s later: b's cooldown has ended meanwhile.
        tokio::time::advance(Duration::from_secs(2)).await;
        let snap = v1::Snapshot {
            version: 1,
            backends: vec![
                backend("a", Pool::Primary, &[("m", "m")]),
                backend("b", Pool::Primary, &[("m", "m")]),
            ],
            ..Default::default()
        };
        assert!(
            d.handle(StreamConfigResponse {
                version: 1,
                nonce: "n".into(),
                snapshot: Some(snap),
                ..Default::default()
            })
            .is_some()
        );
        let s = store.load().unwrap();
        let (a, b) = (
            &s.backend("a").unwrap().runtime,
            &s.backend("b").unwrap().runtime,
        );
        let now = Instant::now();
        assert_eq!(
            a.cooldown.cooling_until(now),
            Some(start + Duration::from_secs(10))
        );
        assert_eq!(a.cooldown.consecutive(), 2);
        assert_eq!((a.rpm.share(), a.tpm.share()), (0.7, 0.2));
        assert_eq!(
            b.cooldown.cooling_until(now),
            None,
            "ended before the snapshot"
        );
        assert!((b.rpm.share() - 1.0 / 3.0).abs() < 1e-9);
        assert!(d.early.lock().is_empty());
    }

    fn health(id: &str, state: HealthState, remaining_ms: u64) -> HealthUpdate {
        HealthUpdate {
            backend_id: id.into(),
            state: state as i32,
            remaining_ms,
            reason: "probe: connect: connection refused".into(),
            since_unix_ms: 0,
        }
    }

    /// The cap keeps the earliest marked out; "earliest" is the control
    /// plane's `since_unix_ms`, so a proxy that receives the whole table in
    /// one message orders it like the proxies that saw each mark arrive.
    #[tokio::test(start_paused = true)]
    async fn marks_are_ordered_by_the_control_planes_since() {
        use crate::test_util::backend;
        use claw_proto::Pool;
        let store = SnapshotStore::default();
        let d = dispatcher("me", &store);
        d.handle(StreamConfigResponse {
            version: 2,
            nonce: "n".into(),
            snapshot: Some(v1::Snapshot {
                version: 2,
                backends: vec![
                    backend("a", Pool::Primary, &[("m", "m")]),
                    backend("b", Pool::Primary, &[("m", "m")]),
                ],
                ..Default::default()
            }),
            ..Default::default()
        });
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut a = health("a", HealthState::Unhealthy, 0);
        a.since_unix_ms = unix_now - 1_000;
        let mut b = health("b", HealthState::Unhealthy, 0);
        b.since_unix_ms = unix_now - 60_000;
        d.handle(health_push(vec![a, b], true));
        let now = Instant::now();
        let snap = store.load().unwrap();
        let since = |id: &str| snap.backend(id).unwrap().runtime.health.marked_since(now);
        let (sa, sb) = (since("a").unwrap(), since("b").unwrap());
        assert!(sb < sa, "b was marked a minute before a");
        let gap = sa - sb;
        assert!(
            gap > Duration::from_secs(58) && gap < Duration::from_secs(62),
            "{gap:?}"
        );
    }

    fn health_push(updates: Vec<HealthUpdate>, complete: bool) -> StreamConfigResponse {
        StreamConfigResponse {
            version: 2,
            health: updates,
            health_complete: complete,
            ..Default::default()
        }
    }

    fn two_backends(d: &Dispatcher, version: u64, ids: &[&str]) {
        use crate::test_util::backend;
        let snap = v1::Snapshot {
            version,
            backends: ids
                .iter()
                .map(|id| backend(id, claw_proto::Pool::Primary, &[("m", "m")]))
                .collect(),
            ..Default::default()
        };
        let ack = d.handle(push(version, snap)).unwrap();
        assert_eq!(ack.error_detail, "");
    }

    fn since(store: &SnapshotStore, id: &str) -> Option<Instant> {
        let s = store.load().unwrap();
        s.backend(id)
            .unwrap()
            .runtime
            .health
            .marked_since(Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn health_updates_mark_unhealthy_until_healthy_and_eject_for_a_while() {
        let store = SnapshotStore::default();
        let d = dispatcher("me", &store);
        two_backends(&d, 2, &["a", "b"]);
        let t0 = Instant::now();
        let reply = d.handle(health_push(
            vec![
                health("a", HealthState::Unhealthy, 0),
                health("b", HealthState::Ejected, 5_000),
            ],
            false,
        ));
        assert!(reply.is_none(), "incremental: no answer");
        assert_eq!(since(&store, "a"), Some(t0));
        assert_eq!(since(&store, "b"), Some(t0));
        let rt = |id: &str| store.load().unwrap().backend(id).unwrap().runtime.clone();
        assert!(rt("a").health.unhealthy(t0));
        // The ejection counts from receipt and ends on its own; unhealthy holds.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(since(&store, "b"), None);
        assert_eq!(since(&store, "a"), Some(t0));
        // A repeated mark keeps its start (the cap's order); HEALTHY clears.
        d.handle(health_push(
            vec![health("a", HealthState::Unhealthy, 0)],
            false,
        ));
        assert_eq!(since(&store, "a"), Some(t0));
        d.handle(health_push(
            vec![health("a", HealthState::Healthy, 0)],
            false,
        ));
        assert_eq!(since(&store, "a"), None);
        // Not probed (or not probed yet) is no exclusion either.
        d.handle(health_push(
            vec![health("a", HealthState::NotProbed, 0)],
            false,
        ));
        assert_eq!(since(&store, "a"), None);
        // A snapshot swap keeps the marks.
        d.handle(health_push(
            vec![health("b", HealthState::Ejected, 60_000)],
            false,
        ));
        two_backends(&d, 3, &["a", "b"]);
        assert!(since(&store, "b").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_health_table_replaces_every_mark() {
        let store = SnapshotStore::default();
        let d = dispatcher("me", &store);
        two_backends(&d, 2, &["a", "b", "c"]);
        let t0 = Instant::now();
        d.handle(health_push(
            vec![
                health("a", HealthState::Unhealthy, 0),
                health("b", HealthState::Unhealthy, 0),
            ],
            false,
        ));
        // A reconnect: the first message is the whole table, which no
        // longer names a; b is still out (since kept), c is new.
        tokio::time::advance(Duration::from_secs(3)).await;
        d.handle(health_push(
            vec![
                health("b", HealthState::Unhealthy, 0),
                health("c", HealthState::Ejected, 10_000),
            ],
            true,
        ));
        assert_eq!(since(&store, "a"), None, "no stale mark");
        assert_eq!(since(&store, "b"), Some(t0));
        assert_eq!(since(&store, "c"), Some(t0 + Duration::from_secs(3)));
        // An empty complete table: everything healthy.
        d.handle(health_push(vec![], true));
        for id in ["a", "b", "c"] {
            assert_eq!(since(&store, id), None, "{id}");
        }
        assert!(d.health.lock().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_message_with_a_snapshot_and_the_health_table_marks_the_backends_it_adds() {
        let store = SnapshotStore::default();
        let d = dispatcher("me", &store);
        let mut msg = push(2, one_backend(2, "m"));
        msg.health = vec![health("a", HealthState::Unhealthy, 0)];
        msg.health_complete = true;
        let ack = d.handle(msg).unwrap();
        assert_eq!((ack.version, ack.error_detail.as_str()), (2, ""));
        assert!(since(&store, "a").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn health_for_a_backend_not_in_the_snapshot_applies_once_a_snapshot_adds_it() {
        let store = SnapshotStore::default();
        let d = dispatcher("me", &store);
        // Before any snapshot (the catch-up comes first), then one without it.
        d.handle(health_push(
            vec![
                health("a", HealthState::Unhealthy, 0),
                health("b", HealthState::Ejected, 2_000),
            ],
            true,
        ));
        two_backends(&d, 2, &["a"]);
        assert!(since(&store, "a").is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        d.handle(health_push(
            vec![health("ghost", HealthState::Unhealthy, 0)],
            false,
        ));
        two_backends(&d, 3, &["a", "b", "ghost"]);
        assert!(since(&store, "b").is_some(), "1 s of its ejection left");
        assert!(since(&store, "ghost").is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(since(&store, "b"), None);
        // The next update drops the ended ejection from the table.
        d.handle(health_push(
            vec![health("a", HealthState::Healthy, 0)],
            false,
        ));
        assert_eq!(d.health.lock().keys().collect::<Vec<_>>(), ["ghost"]);
    }

    fn cached_dispatcher(path: &Path, store: &SnapshotStore) -> Dispatcher {
        dispatcher("n1", store).with_snapshot_cache(Some(path), &ProxyToken::new("proxy-token"))
    }

    fn one_backend(version: u64, model: &str) -> v1::Snapshot {
        use crate::test_util::backend;
        v1::Snapshot {
            version,
            backends: vec![backend("a", claw_proto::Pool::Primary, &[(model, model)])],
            ..Default::default()
        }
    }

    fn push(version: u64, snapshot: v1::Snapshot) -> StreamConfigResponse {
        StreamConfigResponse {
            version,
            nonce: format!("n{version}"),
            snapshot: Some(snapshot),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_cached_start_takes_the_control_planes_snapshot_even_when_older() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        SnapshotCache::new(&path, "proxy-token", "n1")
            .write(9, &one_backend(9, "cached"))
            .unwrap();
        let store = SnapshotStore::default();
        let d = cached_dispatcher(&path, &store);
        assert_eq!(d.load_cache(), Some(9));
        assert_eq!(d.hello().version, 9, "the hello reports the cached version");
        // A control plane restored to version 5 is still the authority.
        let ack = d.handle(push(5, one_backend(5, "restored"))).unwrap();
        assert_eq!((ack.version, ack.error_detail.as_str()), (5, ""));
        assert!(store.load().unwrap().route("restored").is_some());
        // From then on the usual rule: nothing older than what is held.
        let nack = d.handle(push(4, one_backend(4, "older"))).unwrap();
        assert_eq!(nack.version, 5);
        assert!(nack.error_detail.contains("older"));
    }

    #[tokio::test]
    async fn a_live_proxy_takes_a_restored_control_planes_new_lineage_at_a_lower_version() {
        let store = SnapshotStore::default();
        let d = dispatcher("n1", &store);
        let with = |version, model, lineage: &str| v1::Snapshot {
            lineage: lineage.into(),
            ..one_backend(version, model)
        };
        let ack = d.handle(push(9, with(9, "old", "ln_a"))).unwrap();
        assert_eq!((ack.version, ack.error_detail.as_str()), (9, ""));
        // The same history going back is stale...
        let nack = d.handle(push(5, with(5, "back", "ln_a"))).unwrap();
        assert_eq!(nack.version, 9);
        assert!(nack.error_detail.contains("older"));
        // ...a restored store (new lineage) is the authority.
        let ack = d.handle(push(5, with(5, "restored", "ln_b"))).unwrap();
        assert_eq!((ack.version, ack.error_detail.as_str()), (5, ""));
        assert!(store.load().unwrap().route("restored").is_some());
        assert_eq!(d.hello().version, 5);
        assert_eq!(
            d.hello().lineage,
            "ln_b",
            "the hello names the held lineage"
        );
        assert_eq!(ack.lineage, "ln_b");
    }

    #[tokio::test]
    async fn a_start_without_a_cache_still_rejects_older_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::default();
        let d = cached_dispatcher(&dir.path().join("absent"), &store);
        assert_eq!(d.load_cache(), None);
        assert!(
            d.handle(push(6, one_backend(6, "m")))
                .unwrap()
                .error_detail
                .is_empty()
        );
        assert!(
            !d.handle(push(5, one_backend(5, "m")))
                .unwrap()
                .error_detail
                .is_empty()
        );
    }

    #[tokio::test]
    async fn run_serves_the_cache_before_connecting_and_persists_applied_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let cache = SnapshotCache::new(&path, "proxy-token", "n1");
        cache.write(3, &one_backend(3, "cached")).unwrap();
        let store = SnapshotStore::default();
        let d = cached_dispatcher(&path, &store);
        let config = DiscoveryConfig {
            // Nothing listens there: the stream never opens.
            url: "http://127.0.0.1:9".into(),
            proxy_token: "proxy-token".into(),
        };
        let task = tokio::spawn(run(config, d.clone()));
        let mut loaded = false;
        for _ in 0..500 {
            if store.version() == 3 {
                loaded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(loaded, "the cached snapshot was not applied");
        // A snapshot applied afterwards reaches the file.
        assert!(
            d.handle(push(4, one_backend(4, "pushed")))
                .unwrap()
                .error_detail
                .is_empty()
        );
        let mut written = false;
        for _ in 0..500 {
            if cache.read().ok().flatten().is_some_and(|(v, _)| v == 4) {
                written = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        assert!(written, "the applied snapshot was not written to the cache");
    }
}

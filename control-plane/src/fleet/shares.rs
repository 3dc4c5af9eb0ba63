//! Cluster-wide rate limits: each connected proxy's share of every
//! backend's rpm and tpm, and of every client key's rpm.
//!
//! **Targets.** Per backend and per limit, the connected proxies' recent
//! demand (an EWMA of the `demand` in their report batches — what they
//! were asked for, admitted or not — capped at the whole limit, with a
//! time constant of 2 s or 12 requests of the rpm, whichever is longer) is
//! divided max-min fairly ([`targets`]): a proxy wanting less than an
//! equal part gets what it wants (with 10 % headroom), the rest is split
//! among the others; what nobody wants is split equally; every proxy keeps
//! a floor (10 % of the equal share) so an idle proxy can still admit its
//! first requests; shares are renormalized to sum to 1. Without demand the
//! split is equal. Targets are recomputed every tick (1 s) but only adopted
//! when one moved by more than 4 points or the set of proxies changed, so
//! shares do not flap. An 80/20 skew between two proxies converges in a
//! few seconds at rpm 600, in about twenty at rpm 60.
//!
//! **Why current shares suffice.** A proxy paces every backend with a GCRA
//! limiter (`data-plane/src/ratelimit.rs`): in any window it admits at most
//! `burst + limit ÷ 60 s × ∫ share(t) dt`, `share(t)` being the share it
//! applies at `t`. Summed over the proxies, the upstream sees at most
//! `N × burst + limit ÷ 60 s × ∫ Σ_p share_p(t) dt` in any window: at most
//! the limit (plus one small burst per proxy) as long as the shares the
//! proxies *apply* sum to at most 1 **at every instant**. Nothing a proxy
//! held a minute ago matters (that was a token bucket's need: after a
//! decrease it could still spend a full bucket of the old share).
//!
//! **Invariant: `Σ_p reserved_p ≤ 1` at every instant**, per backend and
//! limit, where `reserved_p` bounds the share proxy `p` may be applying:
//!
//! - a *connected* proxy: the highest share granted to it in the last
//!   `propagation` (2 s). A lowered share travels to the proxy on its
//!   discovery stream (milliseconds); until it arrives the proxy applies the
//!   old one, so the freed part is granted to others only `propagation`
//!   after the lowering was pushed — a raise on B can never overtake the
//!   lowering on A it was paid by;
//! - a *disconnected* proxy: the highest share it held in the `propagation`
//!   before its stream ended (a lowering pushed just before may never have
//!   arrived), for `disconnected_hold` (62 s) after it went. A proxy that
//!   loses the control plane keeps serving on its last share for a minute
//!   (`--degraded-after`) before degraded mode, so its share cannot be
//!   reclaimed quickly; only connected proxies' lowered shares can. After
//!   the hold it is forgotten (dead, or in degraded mode at `1 ÷ last known
//!   proxy count`, which nobody can coordinate — see the data plane's
//!   `fleet.rs`). If it reconnects meanwhile, its reservation carries over;
//! - a *leaving* proxy reserves nothing ([`Shares::leave`]): a proxy
//!   shutting down on purpose (SIGTERM, at the end of its drain delay)
//!   first makes every limiter apply a share of 0 and keeps it until it
//!   exits, whatever it is sent, and only then says `leaving` on its report
//!   stream. From that message on it applies 0, so its reservation is 0 at
//!   once — no `propagation` (there is no lowering in flight to wait for:
//!   it lowered itself before it spoke) and no `disconnected_hold`. It is no
//!   longer a member (not counted, sent nothing) while its discovery stream
//!   stays up for the drain; a new stream under its id later is a new proxy
//!   starting from 0. A proxy killed or cut off says nothing and keeps the
//!   hold above. This is what makes rolling restarts quick: the replacement
//!   gets the leaver's part on the next tick, not a minute later;
//! - a proxy never seen reserves nothing: a new proxy process applies a
//!   share of 0 until its first `RateShares` (`data-plane/src/fleet.rs`).
//!
//! Decreases are granted at once; increases only out of the headroom
//! `1 − Σ_p max(reserved_p, share_p)` ([`allocate`]), so the invariant holds
//! through every transition. A new proxy starts with what is free and gets
//! its fair share `propagation` (plus a tick) after the others were lowered.
//! Caveat: a restarted control plane knows no past grant; proxies keep
//! their previous shares until its first push (milliseconds after they
//! reconnect).
//!
//! Each proxy is sent `RateShares` only when its shares (or the proxy
//! count) changed.
//!
//! **Client keys.** A client key's `rpm` is fleet-wide too, divided by the
//! same functions ([`targets`], [`allocate`], the same histories and
//! reservations; requests only, from the batches' `key_demand`). Keys are
//! many (100k), so most are not assigned one by one:
//!
//! - the **default share** is a limit of its own with no demand (equal
//!   targets) run through the same machinery: every rpm-limited key a
//!   proxy has no share of its own for gets it (`RateShares.
//!   client_key_default_share`). So `Σ_p reserved_p ≤ 1` holds for it —
//!   and therefore for every key that follows it — through joins (a new
//!   proxy starts at 0), leaves (a disconnected proxy's default stays
//!   reserved for `disconnected_hold`, a leaving one's is released at
//!   once) and lowerings;
//! - a key some connected proxy has demand for (above 1 % of its rpm) is
//!   **tracked**: it starts from a copy of each proxy's default-share
//!   history (that is what they applied to it until then, so its
//!   invariant holds from the first instant) and from then on has targets
//!   and grants of its own, demand-weighted like a backend's;
//! - a tracked key whose demand died out is steered back to exactly the
//!   default targets, and stops being tracked once every proxy's grant
//!   equals its default and was no higher during the last `propagation`:
//!   whatever a proxy may still apply for it is then covered by its
//!   default reservation, so the invariant carries over;
//! - `RateShares.client_keys` lists, for one proxy, the tracked keys whose
//!   share differs from its default, and is complete: a key left out gets
//!   the default. Cost: O(tracked keys × proxies) per tick and per push,
//!   nothing for idle keys.
//!
//! A key's limiter on a proxy is paced like a backend's, with 5 % of a
//! minute's worth (at least one request) allowed back to back (`KEY_BURST`,
//! `data-plane/src/ratelimit.rs`), scaled by the share: in any window of
//! `T`, the fleet admits at most `rpm × T ÷ 60 s` plus `5 % × rpm` plus
//! one request per proxy while the shares are steady.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use claw_proto::v1::{
    BackendShare, ClientKeyShare, RateShares, StreamConfigResponse, StreamReportsRequest,
};
use tokio::time::Instant;

use super::directory::{BackendInfo, Backends, Directory, KeyRpms};
use crate::proxies::Push;

/// Tunables of the share assignment.
#[derive(Debug, Clone, Copy)]
pub struct ShareSettings {
    /// How long a connected proxy's lowered share still counts against the
    /// others: the time for the push to reach it, with margin.
    pub propagation: Duration,
    /// How long a disconnected proxy's share stays reserved: it keeps
    /// serving on it for a minute (the proxies' `--degraded-after`), plus
    /// margin.
    pub disconnected_hold: Duration,
    /// Re-evaluation period.
    pub tick: Duration,
    /// Floor per proxy, as a fraction of the equal share.
    pub floor: f64,
    /// Time constant of the demand EWMA (at least).
    pub ewma_tau: Duration,
    /// The demand EWMA of a backend spans at least this many requests of
    /// its rpm, so a low limit is not judged on a handful of requests
    /// (rpm 60: 12 s; rpm 600 and up: `ewma_tau`).
    pub ewma_requests: f64,
    /// Smallest target move (absolute share) that is adopted.
    pub retarget: f64,
    /// Headroom on a proxy's demand when it wants less than an equal part.
    pub headroom: f64,
}

impl Default for ShareSettings {
    fn default() -> Self {
        ShareSettings {
            propagation: Duration::from_secs(2),
            disconnected_hold: Duration::from_secs(62),
            tick: Duration::from_secs(1),
            floor: 0.1,
            ewma_tau: Duration::from_secs(2),
            ewma_requests: 12.0,
            retarget: 0.04,
            headroom: 1.1,
        }
    }
}

/// Max-min fair shares of a limit (per minute; 0 = none) between proxies
/// wanting `demand` (per minute) each; see the module docs.
pub fn targets(demand: &[f64], limit: f64, s: &ShareSettings) -> Vec<f64> {
    let n = demand.len();
    if n == 0 {
        return Vec::new();
    }
    let equal = 1.0 / n as f64;
    if limit <= 0.0 || demand.iter().all(|d| *d <= 0.0) {
        return vec![equal; n];
    }
    let want: Vec<f64> = demand
        .iter()
        .map(|d| (d.max(0.0) * s.headroom / limit).min(1.0))
        .collect();
    let mut share = vec![0.0; n];
    let mut open: Vec<usize> = (0..n).collect();
    let mut left = 1.0;
    // Water-filling: satisfy everyone wanting less than the fair part.
    loop {
        let fair = left / open.len() as f64;
        let (small, big): (Vec<usize>, Vec<usize>) = open.iter().partition(|&&i| want[i] <= fair);
        if small.is_empty() {
            for &i in &big {
                share[i] = fair;
            }
            left = 0.0;
            break;
        }
        for &i in &small {
            share[i] = want[i];
            left -= want[i];
        }
        open = big;
        if open.is_empty() {
            break;
        }
    }
    // Leftover (everyone satisfied) is split equally.
    let extra = left.max(0.0) / n as f64;
    let floor = s.floor * equal;
    for x in &mut share {
        *x = (*x + extra).max(floor);
    }
    let sum: f64 = share.iter().sum();
    share.iter().map(|x| x / sum).collect()
}

/// One proxy's input to [`allocate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot {
    /// Where its share should go.
    pub target: f64,
    /// Its share now.
    pub current: f64,
    /// The most it may be applying now (≥ 0): its reservation.
    pub held: f64,
}

/// New shares: decreases at once, increases out of the headroom
/// `1 − Σ max(held, share after decreases)`, split in proportion to what
/// each proxy still lacks. Keeps `Σ max(held, new) ≤ max(1, Σ max(held,
/// current))`.
pub fn allocate(slots: &[Slot]) -> Vec<f64> {
    let lowered: Vec<f64> = slots.iter().map(|s| s.current.min(s.target)).collect();
    let committed: Vec<f64> = slots
        .iter()
        .zip(&lowered)
        .map(|(s, g)| s.held.max(*g))
        .collect();
    let headroom = (1.0 - committed.iter().sum::<f64>()).max(0.0);
    let lack: Vec<f64> = slots
        .iter()
        .zip(&committed)
        .map(|(s, c)| (s.target - c).max(0.0))
        .collect();
    let total_lack: f64 = lack.iter().sum();
    let scale = if total_lack <= headroom {
        1.0
    } else {
        headroom / total_lack
    };
    slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if s.target <= committed[i] {
                // Up to what it already holds costs nothing.
                s.target.max(lowered[i])
            } else {
                committed[i] + lack[i] * scale
            }
        })
        .collect()
}

/// A share over time: the changes of the last `propagation`.
#[derive(Debug, Default, Clone)]
struct History {
    /// `(since, share)`, oldest first; the last is in effect now.
    changes: VecDeque<(Instant, f64)>,
}

impl History {
    fn current(&self) -> f64 {
        self.changes.back().map_or(0.0, |c| c.1)
    }

    fn set(&mut self, now: Instant, share: f64) {
        if (self.current() - share).abs() > 1e-12 || self.changes.is_empty() {
            self.changes.push_back((now, share));
        }
    }

    /// Highest share in effect at any time since `from`.
    fn max_since(&self, from: Instant) -> f64 {
        let mut max = 0.0f64;
        for (i, (t, v)) in self.changes.iter().enumerate() {
            let next = self.changes.get(i + 1).map(|c| c.0);
            // In effect during [t, next); counts if that overlaps [from, ∞).
            if next.is_none_or(|n| n > from) {
                max = max.max(*v);
            }
            let _ = t;
        }
        max
    }

    fn prune(&mut self, before: Instant) {
        while self.changes.len() > 1 && self.changes.get(1).is_some_and(|c| c.0 <= before) {
            self.changes.pop_front();
        }
    }
}

/// Demand per second, smoothed.
#[derive(Debug, Default, Clone, Copy)]
struct Rate {
    requests: f64,
    tokens: f64,
}

#[derive(Debug, Default, Clone)]
struct Grant {
    rpm: History,
    tpm: History,
    target_rpm: f64,
    target_tpm: f64,
}

#[derive(Debug, Default)]
struct Node {
    tx: Option<Push>,
    gone_at: Option<Instant>,
    demand: HashMap<String, Rate>,
    demand_at: Option<Instant>,
    grants: HashMap<String, Grant>,
    /// Client-key demand per second (`requests` only), by key id.
    key_demand: HashMap<String, Rate>,
    /// Grants of the tracked client keys (rpm only), by key id.
    key_grants: HashMap<String, Grant>,
    /// The grant of every client key not tracked (rpm only).
    key_default: Grant,
    pushed: Option<RateShares>,
    /// It said it is leaving ([`Shares::leave`]) on the stream in `tx`: it
    /// applies 0 everywhere, holds no grant, is no member and is sent
    /// nothing; a new stream under its id is a new proxy.
    left: bool,
}

impl Node {
    /// Every grant the node holds.
    fn all_grants_mut(&mut self) -> impl Iterator<Item = &mut Grant> {
        self.grants
            .values_mut()
            .chain(self.key_grants.values_mut())
            .chain(std::iter::once(&mut self.key_default))
    }

    fn grant(&self, of: Limited<'_>) -> Option<&Grant> {
        match of {
            Limited::Backend(id) => self.grants.get(id),
            Limited::Key(id) => self.key_grants.get(id),
            Limited::KeyDefault => Some(&self.key_default),
        }
    }

    fn grant_mut(&mut self, of: Limited<'_>) -> &mut Grant {
        let map = match of {
            Limited::Backend(_) => &mut self.grants,
            Limited::Key(_) => &mut self.key_grants,
            Limited::KeyDefault => return &mut self.key_default,
        };
        let id = of.id();
        if !map.contains_key(id) {
            map.insert(id.to_string(), Grant::default());
        }
        map.get_mut(id).expect("inserted above")
    }

    /// Recent demand per second for `of` in `dim`.
    fn demand_per_s(&self, of: Limited<'_>, dim: Dim) -> f64 {
        let r = match of {
            Limited::Backend(id) => self.demand.get(id),
            Limited::Key(id) => self.key_demand.get(id),
            Limited::KeyDefault => None,
        }
        .copied()
        .unwrap_or_default();
        if dim == Dim::Rpm {
            r.requests
        } else {
            r.tokens
        }
    }
}

/// What a share is of.
#[derive(Debug, Clone, Copy)]
enum Limited<'a> {
    /// A backend's rpm or tpm.
    Backend(&'a str),
    /// A tracked client key's rpm.
    Key(&'a str),
    /// The rpm of every client key not tracked.
    KeyDefault,
}

impl Limited<'_> {
    fn id(&self) -> &str {
        match self {
            Limited::Backend(id) | Limited::Key(id) => id,
            Limited::KeyDefault => "",
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    nodes: BTreeMap<String, Node>,
    /// Connected node ids at the last targeting, to detect changes.
    members: Vec<String>,
    /// Client keys with a grant of their own (recent demand, or a share
    /// not yet back at the default).
    tracked: std::collections::BTreeSet<String>,
}

/// A key whose demand on every proxy is below this fraction of its rpm (with
/// headroom) has no demand: its shares go back to the default, and it stops
/// being tracked once they are there.
const KEY_IDLE: f64 = 0.01;

/// The rate-share assigner. Fed by report ingestion ([`Shares::observe`])
/// and by the proxy registry ([`Shares::set_members`]); [`Fleet::run`](super::Fleet::run)
/// re-evaluates every tick.
pub struct Shares {
    inner: Mutex<Inner>,
    settings: ShareSettings,
    backends: Box<dyn Fn() -> Arc<Backends> + Send + Sync>,
    keys: Box<dyn Fn() -> Arc<KeyRpms> + Send + Sync>,
    config_version: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for Shares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shares")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A backend's limits, per minute (0 = none).
fn limits(b: &BackendInfo) -> (f64, f64) {
    (f64::from(b.rpm), b.tpm as f64)
}

impl Shares {
    /// An assigner for the backends of `directory`; pushed messages carry
    /// `config_version()`.
    pub fn new(
        settings: ShareSettings,
        directory: Arc<Directory>,
        config_version: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        let keys = directory.clone();
        Self::with_sources(
            settings,
            move || directory.backends(),
            move || keys.key_rpms(),
            config_version,
        )
    }

    /// An assigner for the backends `backends()` lists and no client keys
    /// (tests).
    pub fn with_backends(
        settings: ShareSettings,
        backends: impl Fn() -> Arc<Backends> + Send + Sync + 'static,
        config_version: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        Self::with_sources(settings, backends, Arc::default, config_version)
    }

    /// An assigner for the backends `backends()` and the rpm-limited client
    /// keys `keys()` list (tests).
    pub fn with_sources(
        settings: ShareSettings,
        backends: impl Fn() -> Arc<Backends> + Send + Sync + 'static,
        keys: impl Fn() -> Arc<KeyRpms> + Send + Sync + 'static,
        config_version: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        Shares {
            inner: Mutex::new(Inner::default()),
            settings,
            backends: Box::new(backends),
            keys: Box::new(keys),
            config_version: Box::new(config_version),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ShareSettings {
        &self.settings
    }

    /// Takes in a stored report batch of `node`: its demand, capped at the
    /// backend's whole limit (wanting more than all of it weighs no more,
    /// and a capped average falls below the fair part sooner when the
    /// demand moves to another proxy).
    pub fn observe(&self, batch: &StreamReportsRequest) {
        let now = Instant::now();
        let backends = (self.backends)();
        let keys = (self.keys)();
        let mut inner = self.inner.lock();
        let node = inner.nodes.entry(batch.node_id.clone()).or_default();
        if node.left {
            // Its demand no longer counts (what it drains is not admitted).
            return;
        }
        let dt = node
            .demand_at
            .map_or(1.0, |t| now.duration_since(t).as_secs_f64())
            .max(0.05);
        let mut seen: HashMap<&str, (f64, f64)> = HashMap::new();
        for d in &batch.demand {
            let e = seen.entry(&d.backend_id).or_default();
            e.0 += d.requests as f64;
            e.1 += d.tokens as f64;
        }
        self.smooth(&mut node.demand, seen, dt, |backend| {
            backends.get(backend).map_or((0.0, 0.0), limits)
        });
        // Client keys: requests only, and only rpm-limited keys.
        let mut seen: HashMap<&str, (f64, f64)> = HashMap::new();
        for d in &batch.key_demand {
            if keys.contains_key(&d.key_id) {
                seen.entry(&d.key_id).or_default().0 += d.requests as f64;
            }
        }
        self.smooth(&mut node.key_demand, seen, dt, |key| {
            (keys.get(key).map_or(0.0, |r| f64::from(*r)), 0.0)
        });
        // Keys are many: forget demand that has died out.
        node.key_demand.retain(|_, r| r.requests > 1e-9);
        node.demand_at = Some(now);
    }

    /// One EWMA step of a demand map over `dt` seconds: what `seen` (this
    /// batch's requests and tokens by id) has moves towards its rate, capped
    /// at the whole limit (`limits(id)`, per minute, 0 = none); the rest
    /// decays towards zero.
    fn smooth(
        &self,
        rates: &mut HashMap<String, Rate>,
        seen: HashMap<&str, (f64, f64)>,
        dt: f64,
        limits: impl Fn(&str) -> (f64, f64),
    ) {
        let tau = self.settings.ewma_tau.as_secs_f64();
        let alpha = |rpm: f64| {
            let tau = if rpm > 0.0 {
                tau.max(self.settings.ewma_requests * 60.0 / rpm)
            } else {
                tau
            };
            1.0 - (-dt / tau).exp()
        };
        // Entries without demand in this batch decay towards zero.
        for (id, r) in rates.iter_mut() {
            if !seen.contains_key(id.as_str()) {
                let a = alpha(limits(id).0);
                r.requests *= 1.0 - a;
                r.tokens *= 1.0 - a;
            }
        }
        for (id, (req, tok)) in seen {
            let (rpm, tpm) = limits(id);
            let cap = |per_s: f64, per_min: f64| {
                if per_min > 0.0 {
                    per_s.min(per_min / 60.0)
                } else {
                    per_s
                }
            };
            let a = alpha(rpm);
            let r = rates.entry(id.to_string()).or_default();
            r.requests += a * (cap(req / dt, rpm) - r.requests);
            r.tokens += a * (cap(tok / dt, tpm) - r.tokens);
        }
    }

    /// Sets the connected proxies (and their channels). Returns whether the
    /// set changed.
    pub fn set_members(&self, members: Vec<(String, Push)>) -> bool {
        let now = Instant::now();
        let recent = now.checked_sub(self.settings.propagation).unwrap_or(now);
        let mut inner = self.inner.lock();
        let mut changed = false;
        for (id, node) in inner.nodes.iter_mut() {
            let still = members.iter().find(|(m, _)| m == id);
            match (still, &node.tx) {
                (Some((_, tx)), Some(old)) if tx.same_channel(old) => {}
                (Some((_, tx)), _) if node.left => {
                    // The same id on a new stream (a new process): it starts
                    // from 0 like any newcomer.
                    *node = Node {
                        tx: Some(tx.clone()),
                        ..Node::default()
                    };
                    changed = true;
                }
                (None, Some(_)) if node.left => {
                    // Gone after leaving: nothing to hold.
                    node.tx = None;
                    changed = true;
                }
                (Some((_, tx)), _) => {
                    // A new stream: it has been sent nothing yet.
                    node.tx = Some(tx.clone());
                    node.gone_at = None;
                    node.pushed = None;
                    changed = true;
                }
                (None, Some(_)) => {
                    // It keeps serving on its last share (a lowering pushed
                    // in the last `propagation` may not have arrived): that
                    // stays reserved, frozen, until it reconnects or the
                    // hold ends.
                    node.tx = None;
                    node.gone_at = Some(now);
                    node.pushed = None;
                    for g in node.all_grants_mut() {
                        for dim in [Dim::Rpm, Dim::Tpm] {
                            let h = dim.history_mut(g);
                            let last = h.max_since(recent);
                            h.set(now, last);
                            *dim.target_mut(g) = last;
                        }
                    }
                    changed = true;
                }
                (None, None) => {}
            }
        }
        for (id, tx) in members {
            if let std::collections::btree_map::Entry::Vacant(slot) = inner.nodes.entry(id) {
                slot.insert(Node {
                    tx: Some(tx),
                    ..Node::default()
                });
                changed = true;
            }
        }
        changed
    }

    /// `node` is shutting down on purpose and already applies a share of 0
    /// to every fleet-shared limit (it said so only after applying it, and
    /// keeps it until it exits, whatever it is sent): its reservations —
    /// backends, the client-key default share, tracked keys — are dropped
    /// at once and the next [`Shares::evaluate`] grants them to the others.
    ///
    /// Why no `propagation` wait: that wait covers a lowering that may not
    /// have reached the proxy yet. Here nothing needs to reach it — the
    /// proxy lowered itself before it spoke, so from the moment this call
    /// runs it applies 0, and `reserved = 0` bounds it exactly. A raise on
    /// another proxy is pushed after this call, so it cannot overtake the
    /// leaver's own lowering; `Σ_p reserved_p ≤ 1` holds throughout.
    ///
    /// A proxy that merely disconnects (killed, partitioned) says nothing
    /// and keeps today's `disconnected_hold`. Returns whether `node` held
    /// anything (false for an unknown node or one that left already).
    pub fn leave(&self, node: &str) -> bool {
        let mut inner = self.inner.lock();
        let Some(n) = inner.nodes.get_mut(node) else {
            return false;
        };
        if n.left {
            return false;
        }
        // Kept (with its stream, to recognise it) while it is still
        // connected; a disconnected one is forgotten.
        let tx = n.tx.take();
        *n = Node {
            left: true,
            tx: tx.clone(),
            ..Node::default()
        };
        if tx.is_none() {
            inner.nodes.remove(node);
        }
        true
    }

    /// Re-evaluates every share and returns the messages to push, by
    /// proxy.
    pub fn evaluate(&self) -> Vec<(Push, StreamConfigResponse)> {
        let now = Instant::now();
        let s = self.settings;
        let backends = (self.backends)();
        let keys = (self.keys)();
        let mut inner = self.inner.lock();
        let recent = now.checked_sub(s.propagation).unwrap_or(now);
        // Forget proxies gone for longer than the hold.
        let hold_start = now.checked_sub(s.disconnected_hold).unwrap_or(now);
        inner.nodes.retain(|_, n| {
            (n.tx.is_some() || n.gone_at.is_some_and(|g| g > hold_start))
                && !(n.left && n.tx.is_none())
        });
        let members: Vec<String> = inner
            .nodes
            .iter()
            .filter(|(_, n)| n.tx.is_some() && !n.left)
            .map(|(id, _)| id.clone())
            .collect();
        let membership_changed = members != inner.members;
        inner.members = members.clone();
        // Every node that may hold a reservation: not the ones that left.
        let ids: Vec<String> = inner
            .nodes
            .iter()
            .filter(|(_, n)| !n.left)
            .map(|(id, _)| id.clone())
            .collect();
        let mut ordered: Vec<&BackendInfo> = backends
            .values()
            .filter(|b| b.enabled && (b.rpm > 0 || b.tpm > 0))
            .collect();
        ordered.sort_by(|a, b| a.id.cmp(&b.id));
        for b in &ordered {
            let (rpm, tpm) = limits(b);
            for dim in [Dim::Rpm, Dim::Tpm] {
                let limit = if dim == Dim::Rpm { rpm } else { tpm };
                self.evaluate_one(
                    &mut inner,
                    &ids,
                    &members,
                    Limited::Backend(&b.id),
                    dim,
                    limit,
                    membership_changed,
                    now,
                );
            }
        }
        self.evaluate_keys(&mut inner, &keys, &ids, &members, membership_changed, now);
        super::metrics::keys_with_shares(inner.tracked.len());
        // Messages for proxies whose shares changed.
        let mut out = Vec::new();
        let count = u32::try_from(members.len()).unwrap_or(u32::MAX);
        let version = (self.config_version)();
        let Inner { nodes, tracked, .. } = &mut *inner;
        for id in &members {
            let Some(node) = nodes.get_mut(id) else {
                continue;
            };
            let default = round(node.key_default.rpm.current());
            let shares = RateShares {
                proxy_count: count,
                backends: ordered
                    .iter()
                    .map(|b| {
                        let g = node.grants.get(&b.id);
                        BackendShare {
                            backend_id: b.id.clone(),
                            rpm_share: round(g.map_or(0.0, |g| g.rpm.current())),
                            tpm_share: round(g.map_or(0.0, |g| g.tpm.current())),
                        }
                    })
                    .collect(),
                // Only the keys whose share is not the default: the list is
                // complete, a key left out gets the default.
                client_keys: tracked
                    .iter()
                    .filter_map(|k| {
                        let share = round(node.key_grants.get(k)?.rpm.current());
                        (share != default).then(|| ClientKeyShare {
                            key_id: k.clone(),
                            rpm_share: share,
                        })
                    })
                    .collect(),
                // Always: a key created later finds its default known.
                client_key_default_share: Some(default),
            };
            // Every proxy is told at least once (the proxy count and the
            // key default), then on every change.
            if node.pushed.as_ref() != Some(&shares)
                && let Some(tx) = &node.tx
            {
                node.pushed = Some(shares.clone());
                out.push((
                    tx.clone(),
                    StreamConfigResponse {
                        version,
                        rate_shares: Some(shares),
                        ..Default::default()
                    },
                ));
            }
        }
        for node in inner.nodes.values_mut() {
            for g in node.all_grants_mut() {
                g.rpm.prune(recent);
                g.tpm.prune(recent);
            }
        }
        out
    }

    /// The client keys' rpm shares: the default share (of every key not
    /// tracked) first, then each tracked key; a key with demand starts
    /// being tracked, an idle one stops once its shares are back at the
    /// default on every proxy.
    fn evaluate_keys(
        &self,
        inner: &mut Inner,
        keys: &KeyRpms,
        ids: &[String],
        members: &[String],
        membership_changed: bool,
        now: Instant,
    ) {
        let recent = now.checked_sub(self.settings.propagation).unwrap_or(now);
        self.evaluate_one(
            inner,
            ids,
            members,
            Limited::KeyDefault,
            Dim::Rpm,
            0.0,
            membership_changed,
            now,
        );
        // Keys no longer limited (deleted, or rpm 0) are dropped: the
        // proxies drop their limiters with the snapshot.
        let gone: Vec<String> = inner
            .tracked
            .iter()
            .filter(|k| !keys.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            inner.tracked.remove(&k);
            for n in inner.nodes.values_mut() {
                n.key_grants.remove(&k);
            }
        }
        // Keys with demand start from the default share's history: until
        // now every proxy applied the default to them.
        let mut fresh: std::collections::BTreeSet<String> = Default::default();
        for id in members {
            let Some(n) = inner.nodes.get(id) else {
                continue;
            };
            for k in n.key_demand.keys() {
                if let Some(rpm) = keys.get(k)
                    && !inner.tracked.contains(k)
                    && !fresh.contains(k)
                    && !self.key_idle(inner, members, k, f64::from(*rpm), now)
                {
                    fresh.insert(k.clone());
                }
            }
        }
        for k in fresh {
            for n in inner.nodes.values_mut() {
                let d = n.key_default.clone();
                n.key_grants.insert(k.clone(), d);
            }
            inner.tracked.insert(k);
        }
        let tracked: Vec<String> = inner.tracked.iter().cloned().collect();
        for k in tracked {
            let rpm = keys.get(&k).map_or(0.0, |r| f64::from(*r));
            self.evaluate_one(
                inner,
                ids,
                members,
                Limited::Key(&k),
                Dim::Rpm,
                rpm,
                membership_changed,
                now,
            );
            // Back at the default on every proxy, and held no higher over
            // the last `propagation`: what each proxy may apply for the key
            // is then covered by its default reservation.
            let settled = inner.nodes.values().all(|n| {
                n.key_grants.get(&k).is_none_or(|g| {
                    let cur = g.rpm.current();
                    (cur - n.key_default.rpm.current()).abs() < 1e-12
                        && g.rpm.max_since(recent) <= cur + 1e-12
                })
            });
            if settled && self.key_idle(inner, members, &k, rpm, now) {
                inner.tracked.remove(&k);
                for n in inner.nodes.values_mut() {
                    n.key_grants.remove(&k);
                }
            }
        }
    }

    /// True when no connected proxy wants more than [`KEY_IDLE`] of `key`'s
    /// rpm.
    fn key_idle(
        &self,
        inner: &Inner,
        members: &[String],
        key: &str,
        rpm: f64,
        now: Instant,
    ) -> bool {
        members.iter().all(|id| {
            inner.nodes.get(id).is_none_or(|n| {
                self.recent_demand(n, Limited::Key(key), Dim::Rpm, now) * self.settings.headroom
                    < KEY_IDLE * rpm
            })
        })
    }

    /// `node`'s demand (per minute) for `of`, decayed while no report
    /// refreshed it.
    fn recent_demand(&self, n: &Node, of: Limited<'_>, dim: Dim, now: Instant) -> f64 {
        let per_s = n.demand_per_s(of, dim);
        let stale = n
            .demand_at
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64() - 2.0)
            .max(0.0);
        per_s * 60.0 * (-stale / self.settings.ewma_tau.as_secs_f64()).exp()
    }

    #[allow(clippy::too_many_arguments)]
    fn evaluate_one(
        &self,
        inner: &mut Inner,
        ids: &[String],
        members: &[String],
        of: Limited<'_>,
        dim: Dim,
        limit: f64,
        membership_changed: bool,
        now: Instant,
    ) {
        let s = &self.settings;
        let recent = now.checked_sub(s.propagation).unwrap_or(now);
        // An idle client key is steered back to the default share exactly
        // (so that it can stop being tracked).
        let idle_key =
            matches!(of, Limited::Key(k) if self.key_idle(inner, members, k, limit, now));
        // Fresh targets for the connected proxies.
        let fresh: Vec<f64> = if idle_key {
            members
                .iter()
                .map(|id| {
                    inner
                        .nodes
                        .get(id)
                        .map_or(0.0, |n| dim.target(&n.key_default))
                })
                .collect()
        } else {
            let demand: Vec<f64> = members
                .iter()
                .map(|id| {
                    inner
                        .nodes
                        .get(id)
                        .map_or(0.0, |n| self.recent_demand(n, of, dim, now))
                })
                .collect();
            targets(&demand, limit, s)
        };
        let moved = members.iter().zip(&fresh).any(|(id, t)| {
            let old = inner
                .nodes
                .get(id)
                .and_then(|n| n.grant(of))
                .map_or(0.0, |g| dim.target(g));
            (old - t).abs() > if idle_key { 0.0 } else { s.retarget }
        });
        let never = members
            .iter()
            .any(|id| inner.nodes.get(id).is_none_or(|n| n.grant(of).is_none()));
        if membership_changed || moved || never {
            for (id, t) in members.iter().zip(&fresh) {
                if let Some(n) = inner.nodes.get_mut(id) {
                    *dim.target_mut(n.grant_mut(of)) = *t;
                }
            }
        }
        // Grants, over every node still holding a reservation: a
        // connected one the most it was granted in the last `propagation`,
        // a disconnected one its frozen last share.
        let slots: Vec<Slot> = ids
            .iter()
            .map(|id| {
                let n = inner.nodes.get_mut(id).expect("ids come from the map");
                let connected = n.tx.is_some();
                let g = n.grant_mut(of);
                let h = dim.history(g);
                if connected {
                    Slot {
                        target: dim.target(g),
                        current: h.current(),
                        held: h.max_since(recent),
                    }
                } else {
                    Slot {
                        target: h.current(),
                        current: h.current(),
                        held: h.current(),
                    }
                }
            })
            .collect();
        let granted = allocate(&slots);
        for (id, g) in ids.iter().zip(granted) {
            if let Some(n) = inner.nodes.get_mut(id) {
                dim.history_mut(n.grant_mut(of)).set(now, g);
            }
        }
    }

    /// The shares currently granted to `node`: `(backend, rpm, tpm)`.
    pub fn granted(&self, node: &str) -> Vec<(String, f64, f64)> {
        let inner = self.inner.lock();
        let mut v: Vec<_> = inner
            .nodes
            .get(node)
            .map(|n| {
                n.grants
                    .iter()
                    .map(|(b, g)| (b.clone(), g.rpm.current(), g.tpm.current()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Shares are sent rounded down to 1e-6 (never up: the sum stays ≤ 1).
fn round(x: f64) -> f64 {
    (x.clamp(0.0, 1.0) * 1e6).floor() / 1e6
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dim {
    Rpm,
    Tpm,
}

impl Dim {
    fn target(self, g: &Grant) -> f64 {
        match self {
            Dim::Rpm => g.target_rpm,
            Dim::Tpm => g.target_tpm,
        }
    }
    fn target_mut(self, g: &mut Grant) -> &mut f64 {
        match self {
            Dim::Rpm => &mut g.target_rpm,
            Dim::Tpm => &mut g.target_tpm,
        }
    }
    fn history(self, g: &Grant) -> &History {
        match self {
            Dim::Rpm => &g.rpm,
            Dim::Tpm => &g.tpm,
        }
    }
    fn history_mut(self, g: &mut Grant) -> &mut History {
        match self {
            Dim::Rpm => &mut g.rpm,
            Dim::Tpm => &mut g.tpm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn s() -> ShareSettings {
        ShareSettings::default()
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn without_demand_the_split_is_equal() {
        assert!(close(&targets(&[0.0, 0.0], 60.0, &s()), &[0.5, 0.5]));
        assert!(close(&targets(&[0.0; 4], 60.0, &s()), &[0.25; 4]));
        assert!(close(&targets(&[5.0, 9.0], 0.0, &s()), &[0.5, 0.5]));
    }

    #[test]
    fn demand_weights_the_split_max_min_fairly_with_a_floor() {
        // Both saturate the limit: fair halves.
        assert!(close(&targets(&[480.0, 120.0], 60.0, &s()), &[0.5, 0.5]));
        // One wants 10 of 60: it gets 11 (headroom), the other the rest.
        let t = targets(&[10.0, 200.0], 60.0, &s());
        assert!((t[0] - 11.0 / 60.0).abs() < 1e-9, "{t:?}");
        assert!((t.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // An idle proxy keeps the floor (10 % of the equal share).
        let t = targets(&[0.0, 600.0], 60.0, &s());
        assert!((t[0] - 0.05 / 1.05).abs() < 1e-9, "{t:?}");
        // Everyone satisfied: the leftover is split equally.
        let t = targets(&[6.0, 12.0], 60.0, &s());
        assert!(t[1] > t[0] && (t.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn increases_wait_for_headroom_and_the_commitment_never_exceeds_one() {
        // Two proxies at 0.5 each, both used it; two more join.
        let slots = [
            Slot {
                target: 0.25,
                current: 0.5,
                held: 0.5,
            },
            Slot {
                target: 0.25,
                current: 0.5,
                held: 0.5,
            },
            Slot {
                target: 0.25,
                current: 0.0,
                held: 0.0,
            },
            Slot {
                target: 0.25,
                current: 0.0,
                held: 0.0,
            },
        ];
        let g = allocate(&slots);
        assert!(close(&g, &[0.25, 0.25, 0.0, 0.0]), "{g:?}");
        // Once the old reservations aged out, the newcomers get theirs.
        let aged: Vec<Slot> = slots
            .iter()
            .zip(&g)
            .map(|(s, g)| Slot {
                target: s.target,
                current: *g,
                held: *g,
            })
            .collect();
        assert!(close(&allocate(&aged), &[0.25; 4]));
        // Partial headroom is split by what each still lacks.
        let g = allocate(&[
            Slot {
                target: 0.5,
                current: 0.6,
                held: 0.7,
            },
            Slot {
                target: 0.5,
                current: 0.2,
                held: 0.2,
            },
        ]);
        assert!(close(&g, &[0.5, 0.3]), "{g:?}");
        let committed: f64 = [0.7f64.max(g[0]), 0.2f64.max(g[1])].iter().sum();
        assert!(committed <= 1.0 + 1e-12);
    }

    fn limited(rpm: u32) -> Arc<Backends> {
        let b = BackendInfo {
            id: "b1".into(),
            name: "b1".into(),
            pool: "primary",
            enabled: true,
            rpm,
            tpm: 0,
            cooldown: Default::default(),
        };
        Arc::new(HashMap::from([(b.id.clone(), b)]))
    }

    /// A fleet of simulated proxies in front of `Shares` (paused time):
    /// pushes reach each proxy after a delay below `propagation`.
    struct Sim {
        shares: Shares,
        proxies: Vec<SimProxy>,
        /// `(deliver at, proxy, rpm share)`.
        in_flight: Vec<(Instant, usize, f64)>,
        rng: u64,
    }

    struct SimProxy {
        id: String,
        tx: Push,
        _rx: mpsc::Receiver<StreamConfigResponse>,
        connected: bool,
        /// The rpm share it applies now.
        applied: f64,
        /// Requests offered per second.
        offered: f64,
        /// It left ([`Shares::leave`]): applies 0, whatever it is sent.
        leaving: bool,
        /// Messages pushed to it.
        pushed: usize,
    }

    impl Sim {
        fn new(n: usize, rpm: u32) -> Sim {
            let shares = Shares::with_backends(s(), move || limited(rpm), || 1);
            let proxies = (0..n)
                .map(|i| {
                    let (tx, rx) = mpsc::channel(8);
                    SimProxy {
                        id: format!("p{i}"),
                        tx,
                        _rx: rx,
                        connected: true,
                        applied: 0.0,
                        offered: 0.0,
                        leaving: false,
                        pushed: 0,
                    }
                })
                .collect();
            let mut sim = Sim {
                shares,
                proxies,
                in_flight: Vec::new(),
                rng: 7,
            };
            sim.members();
            sim
        }

        fn members(&mut self) {
            self.shares.set_members(
                self.proxies
                    .iter()
                    .filter(|p| p.connected)
                    .map(|p| (p.id.clone(), p.tx.clone()))
                    .collect(),
            );
        }

        fn delay(&mut self) -> Duration {
            self.rng = self
                .rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Up to 1.9 s: below `propagation`.
            Duration::from_millis((self.rng >> 33) % 1_900)
        }

        fn evaluate(&mut self) {
            let now = Instant::now();
            for (tx, m) in self.shares.evaluate() {
                let p = self
                    .proxies
                    .iter()
                    .position(|p| p.tx.same_channel(&tx))
                    .expect("a proxy");
                self.proxies[p].pushed += 1;
                let share = m.rate_shares.expect("shares").backends[0].rpm_share;
                // In order on the proxy's stream.
                let after = self
                    .in_flight
                    .iter()
                    .filter(|x| x.1 == p)
                    .map(|x| x.0)
                    .max()
                    .unwrap_or(now);
                let at = (now + self.delay()).max(after);
                self.in_flight.push((at, p, share));
            }
        }

        fn report(&self, p: usize, requests: u64) {
            self.shares.observe(&StreamReportsRequest {
                node_id: self.proxies[p].id.clone(),
                demand: vec![claw_proto::v1::BackendDemand {
                    backend_id: "b1".into(),
                    requests,
                    tokens: 0,
                }],
                ..Default::default()
            });
        }

        /// Runs for `secs` in 10 ms steps (pushes delivered in order per
        /// proxy, reports and ticks every second); checks that the applied
        /// shares never sum above 1 and returns the requests served per
        /// second of the limit (`Σ min(offered, share × rpm)`), averaged.
        async fn run(&mut self, secs: u64, rpm: f64) -> f64 {
            let step = Duration::from_millis(10);
            let mut served = 0.0;
            let steps = secs * 100;
            for i in 0..steps {
                tokio::time::advance(step).await;
                let now = Instant::now();
                self.in_flight.sort_by_key(|x| x.0);
                while self.in_flight.first().is_some_and(|x| x.0 <= now) {
                    let (_, p, share) = self.in_flight.remove(0);
                    if !self.proxies[p].leaving {
                        self.proxies[p].applied = share;
                    }
                }
                let sum: f64 = self.proxies.iter().map(|p| p.applied).sum();
                assert!(sum <= 1.0 + 1e-9, "applied shares sum to {sum}");
                served += self
                    .proxies
                    .iter()
                    .map(|p| p.offered.min(p.applied * rpm / 60.0) * 0.01)
                    .sum::<f64>();
                if i % 100 == 50 {
                    for p in 0..self.proxies.len() {
                        if self.proxies[p].connected {
                            self.report(p, self.proxies[p].offered.round() as u64);
                        }
                    }
                }
                if i % 100 == 0 {
                    self.evaluate();
                }
            }
            served / (rpm / 60.0 * secs as f64)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_80_20_skew_uses_the_limit_within_seconds_and_applied_shares_never_exceed_it() {
        let rpm = 600.0;
        let mut sim = Sim::new(2, 600);
        // Idle: equal halves.
        sim.run(5, rpm).await;
        assert!(close(
            &[sim.proxies[0].applied, sim.proxies[1].applied],
            &[0.5, 0.5]
        ));
        // 80/20 at 1.5 × the limit: p1 wants 0.3, p0 needs 0.67.
        sim.proxies[0].offered = 12.0;
        sim.proxies[1].offered = 3.0;
        let first = sim.run(6, rpm).await;
        assert!(sim.proxies[0].applied > 0.63, "{}", sim.proxies[0].applied);
        let then = sim.run(14, rpm).await;
        assert!(then > 0.95, "{then}");
        // Over 20 s, as in the fleet test: ≥ 90 % of the limit.
        let used = (first * 6.0 + then * 14.0) / 20.0;
        assert!(used >= 0.9, "{used}");
        // The skew flips: p1 gets most of it within ten seconds or so
        // (p0's demand has to decay first).
        sim.proxies[0].offered = 3.0;
        sim.proxies[1].offered = 12.0;
        sim.run(12, rpm).await;
        assert!(sim.proxies[1].applied > 0.6, "{}", sim.proxies[1].applied);
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_share_goes_to_others_only_after_propagation() {
        let sim = Sim::new(2, 600);
        sim.shares.evaluate();
        let t0 = Instant::now();
        // p0 busy, p1 idle: p1 is lowered at once, p0 raised 2 s later.
        let mut lowered = None;
        let mut raised = None;
        for i in 0..60u64 {
            if i % 10 == 0 {
                sim.report(0, 50);
                sim.report(1, 0);
            }
            sim.shares.evaluate();
            let now = Instant::now();
            let g0 = sim.shares.granted("p0")[0].1;
            let g1 = sim.shares.granted("p1")[0].1;
            if g1 < 0.5 && lowered.is_none() {
                lowered = Some(now);
            }
            if g0 > 0.5 && raised.is_none() {
                raised = Some(now);
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        let (lowered, raised) = (lowered.expect("lowered"), raised.expect("raised"));
        assert!(
            raised >= lowered + s().propagation,
            "{:?}",
            raised - lowered
        );
        assert!(raised - t0 < Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_disconnected_proxys_share_stays_reserved_for_the_hold() {
        let rpm = 600.0;
        let mut sim = Sim::new(2, 600);
        sim.proxies[0].offered = 12.0;
        sim.proxies[1].offered = 12.0;
        sim.run(5, rpm).await;
        // p1 loses the control plane: it keeps serving on its half.
        sim.proxies[1].connected = false;
        sim.members();
        sim.run(55, rpm).await;
        assert!(close(&[sim.shares.granted("p0")[0].1], &[0.5]));
        assert!(close(&[sim.shares.granted("p1")[0].1], &[0.5]));
        // (It was in fact gone; alive, it would now be in degraded mode.)
        sim.proxies[1].applied = 0.0;
        // After the hold it is forgotten and p0 gets all of it.
        sim.run(10, rpm).await;
        assert!(close(&[sim.proxies[0].applied], &[1.0]));
        assert!(sim.shares.granted("p1").is_empty());

        // A proxy that reconnects within the hold keeps its reservation until
        // it was told its new share.
        let mut sim = Sim::new(2, 600);
        sim.run(3, rpm).await;
        sim.proxies[1].connected = false;
        sim.members();
        sim.run(5, rpm).await;
        let (tx, rx) = mpsc::channel(8);
        sim.proxies[1].tx = tx;
        sim.proxies[1]._rx = rx;
        sim.proxies[1].connected = true;
        sim.members();
        // `run` checks the applied shares throughout.
        sim.run(5, rpm).await;
        assert!(close(
            &[sim.proxies[0].applied, sim.proxies[1].applied],
            &[0.5, 0.5]
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn newcomers_get_their_share_after_the_others_were_lowered() {
        let rpm = 600.0;
        let mut sim = Sim::new(4, 600);
        for p in &mut sim.proxies[2..] {
            p.connected = false;
        }
        sim.members();
        for p in &mut sim.proxies {
            p.offered = 12.0;
        }
        sim.run(5, rpm).await;
        assert!(close(&[sim.proxies[0].applied], &[0.5]));
        for p in &mut sim.proxies[2..] {
            p.connected = true;
        }
        sim.members();
        sim.run(5, rpm).await;
        for p in &sim.proxies {
            assert!((p.applied - 0.25).abs() < 1e-9, "{}", p.applied);
        }
    }

    /// What a proxy applies to `key` after `m`: its own share, or the
    /// default.
    fn key_share(m: &RateShares, key: &str) -> f64 {
        m.client_keys
            .iter()
            .find(|k| k.key_id == key)
            .map(|k| k.rpm_share)
            .or(m.client_key_default_share)
            .unwrap_or(0.0)
    }

    /// Simulated proxies in front of `Shares` for one client key `ck`
    /// (rpm 60): pushes arrive 1.5 s late, in order.
    struct KeySim {
        shares: Shares,
        ids: Vec<String>,
        txs: Vec<Push>,
        _rxs: Vec<mpsc::Receiver<StreamConfigResponse>>,
        connected: Vec<bool>,
        /// What each proxy applies now: (key share, default share).
        applied: Vec<(f64, f64)>,
        /// The last message each proxy got.
        last: Vec<Option<RateShares>>,
        in_flight: Vec<(Instant, usize, RateShares)>,
        /// Requests per second each proxy is asked for the key.
        offered: Vec<f64>,
        /// Fractions of a request not reported yet.
        carry: Vec<f64>,
        /// It left: applies 0, whatever it is sent.
        leaving: Vec<bool>,
    }

    impl KeySim {
        fn new(n: usize) -> KeySim {
            let shares = Shares::with_sources(
                s(),
                || Arc::new(HashMap::new()),
                || Arc::new(HashMap::from([("ck".to_string(), 60u32)])),
                || 1,
            );
            let mut sim = KeySim {
                shares,
                ids: Vec::new(),
                txs: Vec::new(),
                _rxs: Vec::new(),
                connected: Vec::new(),
                applied: Vec::new(),
                last: Vec::new(),
                in_flight: Vec::new(),
                offered: Vec::new(),
                carry: Vec::new(),
                leaving: Vec::new(),
            };
            for _ in 0..n {
                sim.add();
            }
            sim
        }

        fn add(&mut self) {
            let (tx, rx) = mpsc::channel(8);
            self.ids.push(format!("p{}", self.ids.len()));
            self.txs.push(tx);
            self._rxs.push(rx);
            self.connected.push(true);
            self.applied.push((0.0, 0.0));
            self.last.push(None);
            self.offered.push(0.0);
            self.carry.push(0.0);
            self.leaving.push(false);
            self.members();
        }

        fn members(&self) {
            self.shares.set_members(
                (0..self.ids.len())
                    .filter(|i| self.connected[*i])
                    .map(|i| (self.ids[i].clone(), self.txs[i].clone()))
                    .collect(),
            );
        }

        async fn run(&mut self, secs: u64) {
            for i in 0..secs * 10 {
                tokio::time::advance(Duration::from_millis(100)).await;
                let now = Instant::now();
                while self.in_flight.first().is_some_and(|x| x.0 <= now) {
                    let (_, p, m) = self.in_flight.remove(0);
                    if self.leaving[p] {
                        continue;
                    }
                    self.applied[p] = (
                        key_share(&m, "ck"),
                        m.client_key_default_share.unwrap_or(0.0),
                    );
                    self.last[p] = Some(m);
                }
                let key: f64 = self.applied.iter().map(|a| a.0).sum();
                let default: f64 = self.applied.iter().map(|a| a.1).sum();
                assert!(key <= 1.0 + 1e-9, "key shares sum to {key}");
                assert!(default <= 1.0 + 1e-9, "default shares sum to {default}");
                if i % 10 == 5 {
                    for p in 0..self.ids.len() {
                        self.carry[p] += self.offered[p];
                        let requests = self.carry[p].floor();
                        self.carry[p] -= requests;
                        if self.connected[p] {
                            self.shares.observe(&StreamReportsRequest {
                                node_id: self.ids[p].clone(),
                                key_demand: vec![claw_proto::v1::ClientKeyDemand {
                                    key_id: "ck".into(),
                                    requests: requests as u64,
                                }],
                                ..Default::default()
                            });
                        }
                    }
                }
                if i % 10 == 0 {
                    for (tx, m) in self.shares.evaluate() {
                        let p = self.txs.iter().position(|t| t.same_channel(&tx));
                        let p = p.expect("a proxy");
                        let m = m.rate_shares.expect("shares");
                        self.in_flight
                            .push((now + Duration::from_millis(1_500), p, m));
                    }
                }
            }
        }

        fn tracked(&self) -> usize {
            self.shares.inner.lock().tracked.len()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn client_key_shares_follow_demand_and_never_sum_above_one() {
        let mut sim = KeySim::new(2);
        // No demand: the default share, the key not listed.
        sim.run(5).await;
        assert_eq!(sim.applied, vec![(0.5, 0.5); 2]);
        assert_eq!(sim.tracked(), 0);
        assert!(
            sim.last[0]
                .as_ref()
                .is_some_and(|m| m.client_keys.is_empty())
        );
        // p0 saturates the key, p1 wants 15 of its 60 a minute.
        sim.offered = vec![3.0, 0.25];
        sim.run(40).await;
        assert_eq!(sim.tracked(), 1);
        assert!(sim.applied[0].0 > 0.65, "{:?}", sim.applied);
        assert!(sim.applied[1].0 > 0.2, "{:?}", sim.applied);
        // The default share is untouched by one key's demand.
        assert_eq!(sim.applied[0].1, 0.5);
        // A third proxy joins: it starts at 0 and gets its part once the
        // others were lowered (`run` checks the sums throughout).
        sim.add();
        sim.offered[2] = 3.0;
        sim.run(30).await;
        assert!(sim.applied[2].0 > 0.2, "{:?}", sim.applied);
        assert!(
            (sim.applied[2].1 - 1.0 / 3.0).abs() < 1e-5,
            "{:?}",
            sim.applied
        );
        // p1 disconnects and keeps serving on its shares: they stay
        // reserved for the hold, then the others get them.
        sim.connected[1] = false;
        sim.members();
        sim.run(50).await;
        let others: f64 = sim.applied[0].0 + sim.applied[2].0;
        assert!(others <= 1.0 - sim.applied[1].0 + 1e-9);
        sim.applied[1] = (0.0, 0.0); // (it was in fact gone)
        sim.run(20).await;
        assert!(
            (sim.applied[0].0 + sim.applied[2].0 - 1.0).abs() < 1e-5,
            "{:?}",
            sim.applied
        );
        assert!((sim.applied[0].1 - 0.5).abs() < 1e-5, "{:?}", sim.applied);
        // Demand ends: the key goes back to the default and is forgotten.
        sim.offered = vec![0.0; 3];
        sim.run(120).await;
        assert_eq!(sim.tracked(), 0);
        assert!(
            sim.last[0]
                .as_ref()
                .is_some_and(|m| m.client_keys.is_empty())
        );
        assert_eq!((sim.applied[0].0, sim.applied[2].0), (0.5, 0.5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leaving_proxys_shares_are_released_at_once() {
        let rpm = 600.0;
        let mut sim = Sim::new(2, 600);
        sim.proxies[0].offered = 12.0;
        sim.proxies[1].offered = 12.0;
        sim.run(5, rpm).await;
        assert!(close(
            &[sim.proxies[0].applied, sim.proxies[1].applied],
            &[0.5, 0.5]
        ));
        // p1 shuts down: it applies 0 first, then says so; its discovery
        // stream stays up while it drains.
        sim.proxies[1].leaving = true;
        sim.proxies[1].applied = 0.0;
        assert!(sim.shares.leave("p1"));
        assert!(!sim.shares.leave("p1"), "left already");
        assert!(!sim.shares.leave("nobody"));
        let pushed = sim.proxies[1].pushed;
        // p0 gets all of it within a tick and a push, not after the hold;
        // `run` checks the applied shares throughout.
        sim.run(3, rpm).await;
        assert!(close(&[sim.proxies[0].applied], &[1.0]));
        assert!(sim.shares.granted("p1").is_empty());
        assert_eq!(sim.proxies[1].pushed, pushed, "nothing sent to a leaver");
        // Its stream ends: nothing comes back into force.
        sim.proxies[1].connected = false;
        sim.members();
        sim.run(5, rpm).await;
        assert!(close(&[sim.proxies[0].applied], &[1.0]));
        // The same id on a new stream (a new process) starts from 0 like a
        // newcomer and gets its half once p0 was lowered.
        let (tx, rx) = mpsc::channel(8);
        sim.proxies[1].tx = tx;
        sim.proxies[1]._rx = rx;
        sim.proxies[1].connected = true;
        sim.proxies[1].leaving = false;
        sim.members();
        sim.run(8, rpm).await;
        assert!(close(
            &[sim.proxies[0].applied, sim.proxies[1].applied],
            &[0.5, 0.5]
        ));

        // A proxy whose discovery stream ended first (held) and whose
        // leaving notice comes after: the hold is dropped at once.
        let mut sim = Sim::new(2, 600);
        sim.run(5, rpm).await;
        sim.proxies[1].leaving = true;
        sim.proxies[1].applied = 0.0;
        sim.proxies[1].connected = false;
        sim.members();
        sim.run(5, rpm).await;
        assert!(close(&[sim.proxies[0].applied], &[0.5]), "held");
        assert!(sim.shares.leave("p1"));
        sim.run(3, rpm).await;
        assert!(close(&[sim.proxies[0].applied], &[1.0]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leaving_proxys_client_key_shares_are_released_at_once() {
        let mut sim = KeySim::new(2);
        sim.offered = vec![3.0, 3.0];
        sim.run(40).await;
        assert_eq!(sim.tracked(), 1);
        assert!(sim.applied[1].0 > 0.3, "{:?}", sim.applied);
        // p1 leaves while its stream is up (and still reports what it drains).
        sim.leaving[1] = true;
        sim.applied[1] = (0.0, 0.0);
        assert!(sim.shares.leave("p1"));
        // `run` checks that neither the key's nor the default shares sum
        // above 1 at any instant.
        sim.run(4).await;
        assert!((sim.applied[0].0 - 1.0).abs() < 1e-5, "{:?}", sim.applied);
        assert!((sim.applied[0].1 - 1.0).abs() < 1e-5, "{:?}", sim.applied);
        assert!(
            sim.last[0].as_ref().is_some_and(|m| m.proxy_count == 1),
            "a leaver is no longer counted"
        );
    }

    #[test]
    fn history_remembers_the_highest_share_of_the_window() {
        let t0 = Instant::now();
        let mut h = History::default();
        h.set(t0, 0.5);
        h.set(t0 + Duration::from_secs(10), 0.25);
        assert_eq!(h.max_since(t0 + Duration::from_secs(5)), 0.5);
        assert_eq!(h.max_since(t0 + Duration::from_secs(11)), 0.25);
        h.prune(t0 + Duration::from_secs(11));
        assert_eq!(h.changes.len(), 1);
        assert_eq!(h.current(), 0.25);
    }
}

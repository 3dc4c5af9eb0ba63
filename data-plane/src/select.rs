//! Backend selection and admission: the routing-order contract (DESIGN
//! "Routing order") in one place.
//!
//! [`select`] picks the candidate for one attempt. Candidates are the
//! enabled backends mapping the model that are neither cooling nor excluded
//! for health.
//!
//! Health ([`health_excluded`]): a backend the control plane marked
//! unhealthy or ejected fleet-wide ([`crate::health`]), or that this proxy
//! ejected as an outlier, is excluded — but at most `floor(n / 2)` of the
//! model's `n` candidates (both pools together, like Envoy's panic threshold
//! over priorities). When more are marked, the ones marked earliest (by
//! since, then by id, the same on every proxy holding the same marks) stay
//! out and the others are tried. And when nothing is left after the health
//! and cooldown filters, the health filter is ignored (fail open,
//! `claw_health_fail_open_total`): traffic still goes out. Cooldowns (429s,
//! 529 holds, spent quotas, rejected keys) are not health: no cap, no fail
//! open; they keep their own rules below.
//! The backend holding the request's stored response ([`Preference::owner`])
//! goes first: only it knows the response id. Then the primary pool before
//! the fallback pool; within a pool:
//!
//! - with an affinity key ([`crate::affinity`]), the session's order: the
//!   candidates ranked by weighted rendezvous hashing of (key hash, backend
//!   id), highest score first. The order depends on nothing but the key and
//!   the snapshot, so every proxy ranks alike without talking to the others;
//!   a backend's weight skews its share of sessions proportionally; removing
//!   a backend moves only the sessions it held (the others' top scores are
//!   unchanged); and a skipped first choice (cooling, ejected, rate-limited)
//!   falls to the same second choice on every proxy, so the session's cache
//!   is rebuilt in one place, not several. Bounded load ([`saturated`]): a
//!   candidate far above its pool's mean load goes behind the others, so one
//!   hot session cannot pile onto a saturated backend;
//! - without one, the least loaded (in-flight ÷ weight, ties rotated).
//!
//! A candidate whose rate limiter refuses is skipped; if all usable ones are
//! rate-limited the request queues; if all are cooling, the emergency limiter
//! of the soonest-recovering one may admit; otherwise the model is
//! unavailable until the soonest recovery. [`select`] is pure apart from the
//! limiters' tokens and allocates nothing.
//!
//! [`admit`] turns that into the decision for the retry layer: go, wait in
//! the model's queue ([`crate::queue`]) while every usable candidate is
//! rate-limited, or stop with 429 (queue full or timed out) or 503.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use claw_proto::Pool;
use tokio::time::Instant;

use crate::affinity::{hash64, mix64};
use crate::error::{ApiError, retry_after_secs};
use crate::queue::QueueExit;
use crate::snapshot::{Backend, Candidate, Route, SnapshotStore};
use crate::target::Routed;

/// Candidates beyond this many per model are ignored (the width of a
/// [`CandidateSet`]).
pub(crate) const MAX_CANDIDATES: usize = 128;

/// A set of candidate indices below [`MAX_CANDIDATES`] (the candidates an
/// attempt has tried, or selection has looked at): one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CandidateSet(u128);

impl CandidateSet {
    /// Adds candidate `i` (`i < MAX_CANDIDATES`).
    #[inline]
    pub(crate) fn insert(&mut self, i: usize) {
        self.0 |= 1u128 << i;
    }

    /// Whether candidate `i` is in the set (never for `i >= MAX_CANDIDATES`).
    #[inline]
    pub(crate) fn contains(self, i: usize) -> bool {
        i < MAX_CANDIDATES && self.0 & (1u128 << i) != 0
    }

    /// How many candidates are in the set.
    #[inline]
    pub(crate) fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The candidates in either set.
    #[inline]
    pub(crate) fn union(self, other: CandidateSet) -> CandidateSet {
        CandidateSet(self.0 | other.0)
    }

    /// Whether the set is empty.
    #[inline]
    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// What a request prefers beyond load, from its [`Routed`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Preference<'a> {
    /// The backend holding the stored response the request names: first
    /// while it is eligible.
    pub owner: Option<&'a str>,
    /// The hash of the session's affinity key.
    pub affinity: Option<u64>,
}

impl<'a> Preference<'a> {
    /// The preference of `r`.
    fn of(r: &'a Routed) -> Self {
        Preference {
            owner: r.owner.as_deref(),
            affinity: r.affinity.map(|a| a.hash),
        }
    }
}

/// How an admitted attempt relates to its session's first choice (the
/// top-ranked candidate of the first non-empty pool, whatever its state):
/// `claw_dp_affinity_total`'s `outcome` and `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stickiness {
    /// No affinity key: least-loaded.
    NoKey,
    /// The first choice takes the attempt.
    Kept,
    /// Another candidate does, because of the first choice's state.
    Moved(MoveReason),
}

/// Why a session's first choice did not take an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MoveReason {
    /// It is cooling down.
    Cooling,
    /// It is ejected (here as an outlier, or fleet-wide).
    Ejected,
    /// The control plane marked it unhealthy (failed probes).
    Unhealthy,
    /// Its rate limiter refused.
    RateLimited,
    /// It is above the load bound ([`saturated`]).
    Saturated,
    /// The backend holding the request's stored response went first.
    Owner,
    /// It already failed this request (a retry).
    Retried,
}

impl Stickiness {
    /// The metric's `outcome` label.
    pub(crate) fn outcome(self) -> &'static str {
        match self {
            Stickiness::NoKey => "none",
            Stickiness::Kept => "kept",
            Stickiness::Moved(_) => "moved",
        }
    }

    /// The metric's `reason` label, for a move.
    pub(crate) fn reason(self) -> Option<&'static str> {
        let Stickiness::Moved(r) = self else {
            return None;
        };
        Some(match r {
            MoveReason::Cooling => "cooling",
            MoveReason::Ejected => "ejected",
            MoveReason::Unhealthy => "unhealthy",
            MoveReason::RateLimited => "rate_limited",
            MoveReason::Saturated => "saturated",
            MoveReason::Owner => "owner",
            MoveReason::Retried => "retried",
        })
    }
}

/// What [`select`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Selection {
    /// Use `route.candidates[index]`; its tokens are taken.
    Admitted {
        /// Candidate index.
        index: usize,
        /// Admitted by the emergency limiter while cooling.
        emergency: bool,
        /// Against the session's first choice.
        stickiness: Stickiness,
    },
    /// Usable candidates exist but all are at their rate limit.
    RateLimited {
        /// Until the soonest conforming instant of a candidate.
        wait: Duration,
    },
    /// Nothing can take the request now.
    Unavailable {
        /// Until the soonest candidate is usable again.
        retry_after: Duration,
    },
}

fn less_loaded(a: &Candidate, b: &Candidate) -> bool {
    let la = u64::from(a.backend.runtime.in_flight.load(Ordering::Relaxed));
    let lb = u64::from(b.backend.runtime.in_flight.load(Ordering::Relaxed));
    la * u64::from(b.backend.weight) < lb * u64::from(a.backend.weight)
}

/// The weighted rendezvous score of a backend for a session: `-w / ln(u)`
/// with `u` uniform in (0, 1) from (session hash, backend id). The highest
/// score wins; the chance that a backend's is the highest is its weight over
/// the sum of weights, and it depends on no other backend, so adding or
/// removing one moves only the sessions it wins or held. Only stable
/// ingredients (the id, [`hash64`], IEEE arithmetic): proxies of different
/// builds must agree. (`ln` may differ by an ulp between math libraries,
/// which can only swap two backends whose scores agree to ~16 digits.)
fn score(session: u64, id: &str, weight: u32) -> f64 {
    let x = mix64(session ^ hash64(id.as_bytes()));
    // The top 53 bits, centred: exactly representable, strictly in (0, 1).
    let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight) / u.ln()
}

/// Whether `a` ranks before `b` in a session's order (equal scores, which
/// need a 53-bit collision, by id so that every proxy still agrees).
fn ranks_before(sa: f64, a: &Candidate, sb: f64, b: &Candidate) -> bool {
    sa > sb || (sa == sb && a.backend.id < b.backend.id)
}

/// One pool's load, for the bound: in-flight requests and weight summed over
/// its healthy candidates.
#[derive(Clone, Copy, Default)]
struct PoolLoad {
    in_flight: u64,
    weight: u64,
}

/// Bounded load: whether `c` carries more than twice its weight's share of
/// its pool's in-flight requests, plus 2 — "consistent hashing with bounded
/// loads" (Mirrokni et al.) with ε = 1. Twice the mean leaves rendezvous
/// alone under ordinary skew (a few sessions more on one backend is the
/// price of warm caches, and moving them costs a cache rebuild elsewhere),
/// yet stops one hot session from queueing a saturated backend while others
/// idle; the + 2 keeps tiny loads (0, 1, 2 in flight) from moving anything.
/// A saturated candidate is not skipped, only ranked after the unsaturated
/// ones, so it still serves when the others are rate-limited. The counts are
/// this proxy's own: the bound is local, the order is not.
fn saturated(c: &Candidate, pool: PoolLoad) -> bool {
    let mine = u128::from(c.backend.runtime.in_flight.load(Ordering::Relaxed));
    let w = u128::from(c.backend.weight);
    let (total, wsum) = (u128::from(pool.in_flight), u128::from(pool.weight.max(1)));
    mine * wsum > 2 * total * w + 2 * wsum
}

/// Takes a request's tokens from `c`'s limiters (rpm, then tpm), or says
/// how long until they conform.
fn take_tokens(c: &Candidate, tokens: f64, now: Instant) -> Result<(), Duration> {
    let rt = &c.backend.runtime;
    rt.rpm.try_acquire(1.0, now)?;
    if c.backend.tpm.is_some()
        && let Err(w) = rt.tpm.try_acquire(tokens, now)
    {
        rt.rpm.refund(1.0);
        return Err(w);
    }
    Ok(())
}

/// The candidates excluded for health at `now`: those marked (fleet-wide
/// unhealthy or ejected, or ejected here), at most `floor(n / 2)` of the
/// `n` candidates. When more are marked, the earliest marked (by since, then
/// by id) stay excluded: a choice every proxy holding the same marks makes
/// alike. Allocates nothing.
pub(crate) fn health_excluded(cands: &[Candidate], now: Instant) -> CandidateSet {
    let cands = &cands[..cands.len().min(MAX_CANDIDATES)];
    let mut since: [Option<Instant>; MAX_CANDIDATES] = [None; MAX_CANDIDATES];
    let mut marked = CandidateSet::default();
    for (i, c) in cands.iter().enumerate() {
        if let Some(at) = excluded_since(&c.backend, now) {
            since[i] = Some(at);
            marked.insert(i);
        }
    }
    let cap = cands.len() / 2;
    if marked.len() <= cap {
        return marked;
    }
    let mut out = CandidateSet::default();
    for _ in 0..cap {
        let mut best: Option<usize> = None;
        for i in 0..cands.len() {
            if !marked.contains(i) || out.contains(i) {
                continue;
            }
            if best.is_none_or(|b| {
                (since[i], &*cands[i].backend.id) < (since[b], &*cands[b].backend.id)
            }) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            out.insert(b);
        }
    }
    out
}

/// Since when candidate `c` is excluded for health at `now`, before the
/// cap: the earlier of its fleet mark and its local ejection.
fn excluded_since(c: &Backend, now: Instant) -> Option<Instant> {
    let fleet = c.runtime.health.marked_since(now);
    let local = c.runtime.outlier.ejection(now).map(|(since, _)| since);
    match (fleet, local) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Appends `claw_backend_health_excluded`: per backend of the snapshot, 1
/// while selection on this proxy keeps it out for health (marked, and not
/// let back in by the cap) on some route, else 0.
pub(crate) fn render_excluded(store: &SnapshotStore, out: &mut String) {
    use crate::snapshot::Api;
    let Some(s) = store.load() else {
        return;
    };
    let now = Instant::now();
    let mut excluded: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for model in s.models() {
        for api in [Api::OpenAi, Api::Anthropic] {
            for route in [s.route_for(model, api), s.translating_route_for(model, api)]
                .into_iter()
                .flatten()
            {
                let set = health_excluded(&route.candidates, now);
                for (i, c) in route.candidates.iter().enumerate() {
                    if set.contains(i) {
                        excluded.insert(&c.backend.id);
                    }
                }
            }
        }
    }
    let name = crate::metrics::BACKEND_HEALTH_EXCLUDED;
    let _ = write!(
        out,
        "# HELP {name} 1 while this proxy excludes the backend for health (fleet unhealthy or ejected, or ejected here), within the cap\n# TYPE {name} gauge\n"
    );
    for b in s.backends() {
        let _ = writeln!(
            out,
            "{name}{{backend=\"{}\"}} {}",
            crate::metrics::label_value(&b.id),
            u8::from(excluded.contains(&*b.id))
        );
    }
}

/// What one call of [`select`] knows about the candidates, on the stack.
struct View<'r> {
    cands: &'r [Candidate],
    now: Instant,
    /// Tried by this request already.
    tried: CandidateSet,
    /// Cooling (429s, 529 holds, spent quotas, rejected keys).
    cooling: CandidateSet,
    /// Excluded for health (after the cap; empty when failing open).
    health: CandidateSet,
    /// The health filter was dropped: nothing else was left.
    failed_open: bool,
    /// Refused by their rate limiter in this call.
    limited: CandidateSet,
    /// The session's scores, when it has an affinity key.
    scores: Option<[f64; MAX_CANDIDATES]>,
    /// The session's first choice.
    first: Option<usize>,
}

impl View<'_> {
    /// How admitting `i` relates to the session's first choice.
    fn stickiness(&self, i: usize) -> Stickiness {
        let Some(first) = self.first else {
            return Stickiness::NoKey;
        };
        if i == first {
            return Stickiness::Kept;
        }
        let c = &self.cands[first].backend.runtime;
        Stickiness::Moved(if self.tried.contains(first) {
            MoveReason::Retried
        } else if self.cooling.contains(first) {
            MoveReason::Cooling
        } else if self.health.contains(first) {
            if c.health.unhealthy(self.now) && c.outlier.ejected_until(self.now).is_none() {
                MoveReason::Unhealthy
            } else {
                MoveReason::Ejected
            }
        } else if self.limited.contains(first) {
            MoveReason::RateLimited
        } else {
            // Healthy, untried, unrefused and ranked first in the first
            // pool: only the bound puts it behind another.
            MoveReason::Saturated
        })
    }

    /// Admits `i` (normally or by the emergency limiter), counting a
    /// fail-open admission.
    fn admit(&self, i: usize, emergency: bool, model: &std::sync::Arc<str>) -> Selection {
        if self.failed_open {
            crate::metrics::health_fail_open(model);
        }
        Selection::Admitted {
            index: i,
            emergency,
            stickiness: self.stickiness(i),
        }
    }
}

/// Picks the candidate for the next attempt, skipping those in `tried`,
/// and takes its tokens.
pub(crate) fn select(
    route: &Route,
    tried: CandidateSet,
    tokens: f64,
    now: Instant,
    pref: Preference<'_>,
) -> Selection {
    let cands = &route.candidates[..route.candidates.len().min(MAX_CANDIDATES)];
    let n = cands.len();
    if n == 0 {
        return Selection::Unavailable {
            retry_after: Duration::from_secs(1),
        };
    }
    let mut view = View {
        cands,
        now,
        tried,
        cooling: CandidateSet::default(),
        health: health_excluded(cands, now),
        failed_open: false,
        limited: CandidateSet::default(),
        scores: None,
        first: None,
    };
    let mut soonest: Option<Instant> = None;
    let mut soonest_cooling: Option<(usize, Instant)> = None;
    let mut loads = [PoolLoad::default(); 2];
    for (i, c) in cands.iter().enumerate() {
        if let Some(until) = c.backend.runtime.cooldown.cooling_until(now) {
            view.cooling.insert(i);
            if tried.contains(i) {
                continue;
            }
            soonest = Some(soonest.map_or(until, |s| s.min(until)));
            // A spent quota is not a transient cooldown: no emergency trickle.
            if !view.health.contains(i)
                && soonest_cooling.is_none_or(|(_, s)| until < s)
                && cands[i]
                    .backend
                    .runtime
                    .cooldown
                    .quota_exhausted_until(now)
                    .is_none()
            {
                soonest_cooling = Some((i, until));
            }
        } else if view.health.contains(i) {
            // Out for health: neither load nor recovery time (a fail open
            // below takes it back when nothing else is left).
        } else if pref.affinity.is_some() {
            let load = &mut loads[usize::from(c.backend.pool == Pool::Fallback)];
            load.in_flight += u64::from(c.backend.runtime.in_flight.load(Ordering::Relaxed));
            load.weight += u64::from(c.backend.weight);
        }
    }
    if let Some(session) = pref.affinity {
        let mut scores = [0.0; MAX_CANDIDATES];
        let mut first: [Option<usize>; 2] = [None; 2];
        for (i, c) in cands.iter().enumerate() {
            scores[i] = score(session, &c.backend.id, c.backend.weight);
            let f = &mut first[usize::from(c.backend.pool == Pool::Fallback)];
            if f.is_none_or(|f| ranks_before(scores[i], c, scores[f], &cands[f])) {
                *f = Some(i);
            }
        }
        view.first = first[0].or(first[1]);
        view.scores = Some(scores);
    }
    let usable = tried.union(view.cooling);
    if !view.health.is_empty()
        && usable.union(view.health).len() == n
        && usable.union(view.health) != usable
    {
        // Fail open: every candidate left is out for health only.
        tracing::debug!(model = %route.model, "every candidate left is excluded for health: failing open");
        view.health = CandidateSet::default();
        view.failed_open = true;
    }
    let mut checked = usable.union(view.health);
    let mut min_wait: Option<Duration> = None;
    if let Some(owner) = pref.owner
        && let Some(i) = cands.iter().position(|c| *c.backend.id == *owner)
        && !checked.contains(i)
    {
        checked.insert(i);
        match take_tokens(&cands[i], tokens, now) {
            Ok(()) => {
                let stickiness = match view.first {
                    Some(f) if f != i => Stickiness::Moved(MoveReason::Owner),
                    Some(_) => Stickiness::Kept,
                    None => Stickiness::NoKey,
                };
                if view.failed_open {
                    crate::metrics::health_fail_open(&route.model);
                }
                return Selection::Admitted {
                    index: i,
                    emergency: false,
                    stickiness,
                };
            }
            Err(w) => {
                view.limited.insert(i);
                if !left_fleet(&cands[i]) {
                    min_wait = Some(w);
                }
            }
        }
    }
    let rot = if view.scores.is_some() {
        0
    } else {
        route.next_rotation() % n
    };
    for (p, pool) in [Pool::Primary, Pool::Fallback].into_iter().enumerate() {
        loop {
            // With affinity: (unsaturated first, then score); else least loaded.
            let mut best: Option<(usize, bool)> = None;
            for k in 0..n {
                let i = (rot + k) % n;
                let c = &cands[i];
                if checked.contains(i) || c.backend.pool != pool {
                    continue;
                }
                let sat = view.scores.is_some() && saturated(c, loads[p]);
                let better = match (&view.scores, best) {
                    (_, None) => true,
                    (Some(s), Some((b, b_sat))) => {
                        (!sat && b_sat) || (sat == b_sat && ranks_before(s[i], c, s[b], &cands[b]))
                    }
                    (None, Some((b, _))) => less_loaded(c, &cands[b]),
                };
                if better {
                    best = Some((i, sat));
                }
            }
            let Some((i, _)) = best else { break };
            checked.insert(i);
            match take_tokens(&cands[i], tokens, now) {
                Ok(()) => return view.admit(i, false, &route.model),
                Err(w) => {
                    view.limited.insert(i);
                    if !left_fleet(&cands[i]) {
                        min_wait = Some(min_wait.map_or(w, |m| m.min(w)));
                    }
                }
            }
        }
    }
    if let Some(wait) = min_wait {
        return Selection::RateLimited { wait };
    }
    if let Some((i, _)) = soonest_cooling
        && cands[i]
            .backend
            .runtime
            .emergency
            .try_acquire(1.0, now)
            .is_ok()
    {
        return view.admit(i, true, &route.model);
    }
    Selection::Unavailable {
        retry_after: soonest.map_or(Duration::from_secs(1), |u| u - now),
    }
}

/// Whether `c`'s limiters apply 0 for good (this proxy left the fleet's
/// rate shares): a refusal by them is no reason to wait in the queue.
fn left_fleet(c: &Candidate) -> bool {
    c.backend.runtime.left_fleet.load(Ordering::Relaxed)
}

/// What [`admit`] decided for the next attempt.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Attempt `route.candidates[index]`; its tokens are taken.
    Go {
        /// Candidate index.
        index: usize,
        /// Admitted by the emergency limiter while cooling.
        emergency: bool,
    },
    /// No attempt: answer with this error (429 or 503).
    Stop(ApiError),
}

/// Admits the next attempt of `r` in routing order: a candidate at once
/// ([`select`]); else, when every usable one is at its rate limit, a wait in
/// the model's queue (until `deadline` or the queue timeout); else 503 until
/// the soonest recovery.
pub(crate) async fn admit(r: &Routed, tried: CandidateSet, deadline: Instant) -> Admission {
    let settings = &r.route.settings;
    let pref = Preference::of(r);
    let direct = select(&r.route, tried, r.est_tokens, Instant::now(), pref);
    let wait = match direct {
        Selection::Admitted {
            index,
            emergency,
            stickiness,
        } => return go(r, index, emergency, stickiness),
        Selection::Unavailable { retry_after } => {
            return Admission::Stop(ApiError::no_capacity(retry_after_secs(retry_after)));
        }
        Selection::RateLimited { wait } => wait,
    };
    let queue_deadline = deadline.min(Instant::now() + settings.queue_timeout);
    let mut last_wait = wait;
    let waited = r
        .route
        .queue
        .wait(
            r.priority,
            settings.queue_depth as usize,
            queue_deadline,
            |now| match select(&r.route, tried, r.est_tokens, now, pref) {
                Selection::Admitted {
                    index,
                    emergency,
                    stickiness,
                } => Ok((index, emergency, stickiness)),
                Selection::RateLimited { wait } => {
                    last_wait = wait;
                    Err(Some(wait))
                }
                Selection::Unavailable { .. } => Err(None),
            },
        )
        .await;
    match waited {
        Ok((index, emergency, stickiness)) => go(r, index, emergency, stickiness),
        Err(QueueExit::Full | QueueExit::TimedOut) => {
            Admission::Stop(ApiError::capacity_rate_limited(retry_after_secs(last_wait)))
        }
        Err(QueueExit::GaveUp) => match select(&r.route, tried, r.est_tokens, Instant::now(), pref)
        {
            Selection::Admitted {
                index,
                emergency,
                stickiness,
            } => go(r, index, emergency, stickiness),
            Selection::RateLimited { wait } => {
                Admission::Stop(ApiError::capacity_rate_limited(retry_after_secs(wait)))
            }
            Selection::Unavailable { retry_after } => {
                Admission::Stop(ApiError::no_capacity(retry_after_secs(retry_after)))
            }
        },
    }
}

/// Admits `index`, counting the attempt in `claw_dp_affinity_total`.
fn go(r: &Routed, index: usize, emergency: bool, stickiness: Stickiness) -> Admission {
    crate::metrics::affinity(
        stickiness.outcome(),
        stickiness.reason(),
        r.affinity.map(|a| a.source.label()),
    );
    Admission::Go { index, emergency }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::affinity::hash64;
    use crate::snapshot::{Snapshot, compile};
    use crate::test_util::{backend, key};
    use claw_proto::v1;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    fn route_of(backends: Vec<v1::SnapshotBackend>) -> (Snapshot, Arc<Route>) {
        let s = v1::Snapshot {
            version: 1,
            backends,
            pools: vec![],
            client_keys: vec![key("ck", "s")],
            models: vec![],
            ..Default::default()
        };
        let c = compile(1, &s, None, Instant::now()).unwrap();
        let r = c.route("m").unwrap().clone();
        (c, r)
    }

    fn set(indices: &[usize]) -> CandidateSet {
        let mut s = CandidateSet::default();
        for &i in indices {
            s.insert(i);
        }
        s
    }

    /// Today's calls: no owner, no affinity key.
    fn select(route: &Route, tried: CandidateSet, tokens: f64, now: Instant) -> Selection {
        super::select(route, tried, tokens, now, Preference::default())
    }

    /// A selection for session `hash` (and `owner`).
    fn sticky(r: &Route, hash: u64, owner: Option<&str>, tried: CandidateSet) -> Selection {
        let pref = Preference {
            owner,
            affinity: Some(hash),
        };
        super::select(r, tried, 1.0, Instant::now(), pref)
    }

    fn session(k: usize) -> u64 {
        hash64(format!("session-{k}").as_bytes())
    }

    /// Enabled primaries with rates no test reaches (the burst is 50 ms of
    /// the rate), `weights[i]` for backend `ids[i]`.
    fn fleet(ids: &[&str], weights: &[u32]) -> Vec<v1::SnapshotBackend> {
        ids.iter()
            .zip(weights)
            .map(|(id, w)| {
                let mut b = backend(id, Pool::Primary, &[("m", "m")]);
                b.rpm = 1_000_000_000;
                b.weight = *w;
                b
            })
            .collect()
    }

    fn chosen(r: &Route, s: Selection) -> (String, Stickiness) {
        match s {
            Selection::Admitted {
                index, stickiness, ..
            } => (r.candidates[index].backend.id.to_string(), stickiness),
            other => panic!("not admitted: {other:?}"),
        }
    }

    fn first_choice(r: &Route, hash: u64) -> String {
        let (id, st) = chosen(r, sticky(r, hash, None, CandidateSet::default()));
        assert_eq!(st, Stickiness::Kept);
        id
    }

    fn index_of(r: &Route, id: &str) -> usize {
        r.candidates
            .iter()
            .position(|c| &*c.backend.id == id)
            .expect("backend in the route")
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_picks_the_same_backend_on_every_proxy() {
        // Two proxies: two snapshots compiled apart, candidates in another order.
        let (_s1, r1) = route_of(fleet(&["a", "b", "c"], &[1, 1, 1]));
        let (_s2, r2) = route_of(fleet(&["c", "a", "b"], &[1, 1, 1]));
        for k in 0..300 {
            let on1 = first_choice(&r1, session(k));
            assert_eq!(on1, first_choice(&r2, session(k)), "session {k}");
            // And again: the choice is the session's, not the moment's.
            assert_eq!(on1, first_choice(&r1, session(k)));
        }
    }

    fn spread(r: &Route, sessions: usize) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for k in 0..sessions {
            *counts.entry(first_choice(r, session(k))).or_default() += 1;
        }
        counts
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_spread_over_the_backends_in_proportion_to_weight() {
        let (_s, r) = route_of(fleet(&["a", "b", "c"], &[1, 1, 1]));
        let counts = spread(&r, 3000);
        // Expected 1000 each, σ ≈ 26: a 4σ band.
        for id in ["a", "b", "c"] {
            let n = counts.get(id).copied().unwrap_or(0);
            assert!((900..=1100).contains(&n), "{id}: {n} of 3000 ({counts:?})");
        }
        let (_s, r) = route_of(fleet(&["a", "b", "c"], &[1, 2, 3]));
        let counts = spread(&r, 6000);
        for (id, want) in [("a", 1000), ("b", 2000), ("c", 3000)] {
            let n = counts.get(id).copied().unwrap_or(0);
            assert!(n.abs_diff(want) <= 150, "{id}: {n} of 6000, want ~{want}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooling_first_choice_moves_its_sessions_to_the_same_second_choice_on_every_proxy() {
        let ids = ["a", "b", "c"];
        let (_s0, healthy) = route_of(fleet(&ids, &[1, 1, 1]));
        for cooled in ids {
            let (_s1, r1) = route_of(fleet(&ids, &[1, 1, 1]));
            let (_s2, r2) = route_of(fleet(&["b", "c", "a"], &[1, 1, 1]));
            let until = Instant::now() + Duration::from_secs(30);
            for r in [&r1, &r2] {
                r.candidates[index_of(r, cooled)]
                    .backend
                    .runtime
                    .cooldown
                    .apply(until, 1);
            }
            let mut moved = 0;
            for k in 0..300 {
                let first = first_choice(&healthy, session(k));
                let (on1, st1) =
                    chosen(&r1, sticky(&r1, session(k), None, CandidateSet::default()));
                let (on2, st2) =
                    chosen(&r2, sticky(&r2, session(k), None, CandidateSet::default()));
                assert_eq!((&on1, st1), (&on2, st2), "session {k}");
                if first == cooled {
                    moved += 1;
                    assert_ne!(on1, cooled);
                    assert_eq!(st1, Stickiness::Moved(MoveReason::Cooling));
                    // The session's second choice: what a retry after its
                    // first choice would take.
                    let tried = set(&[index_of(&healthy, cooled)]);
                    let (second, st) = chosen(&healthy, sticky(&healthy, session(k), None, tried));
                    assert_eq!(
                        (on1.as_str(), st),
                        (second.as_str(), Stickiness::Moved(MoveReason::Retried))
                    );
                } else {
                    // Sessions of the other backends stay where they are.
                    assert_eq!((on1.as_str(), st1), (first.as_str(), Stickiness::Kept));
                }
            }
            assert!(moved > 50, "{cooled} held {moved} of 300");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_and_rate_limited_first_choices_move_with_their_reason() {
        let (_s, r) = route_of(fleet(&["a", "b", "c"], &[1, 1, 1]));
        let k = session(7);
        let first = first_choice(&r, k);
        let i = index_of(&r, &first);
        let now = Instant::now();
        let p = crate::outlier::OutlierPolicy::default();
        for _ in 0..5 {
            r.candidates[i].backend.runtime.outlier.on_failure(&p, now);
        }
        let (to, st) = chosen(&r, sticky(&r, k, None, CandidateSet::default()));
        assert_ne!(to, first);
        assert_eq!(st, Stickiness::Moved(MoveReason::Ejected));

        let mut limited = fleet(&["a", "b", "c"], &[1, 1, 1]);
        for b in &mut limited {
            b.rpm = 1;
        }
        let (_s, r) = route_of(limited);
        assert_eq!(first_choice(&r, k), first);
        // Its one token is spent: the next in the session's order, same as a retry's.
        let (to, st) = chosen(&r, sticky(&r, k, None, CandidateSet::default()));
        assert_eq!(st, Stickiness::Moved(MoveReason::RateLimited));
        let (_s, fresh) = route_of(fleet(&["a", "b", "c"], &[1, 1, 1]));
        let retry = chosen(
            &fresh,
            sticky(&fresh, k, None, set(&[index_of(&fresh, &first)])),
        );
        assert_eq!(to, retry.0);
    }

    #[tokio::test(start_paused = true)]
    async fn removing_a_backend_moves_only_its_sessions_and_adding_one_takes_only_its_share() {
        let (_s3, abc) = route_of(fleet(&["a", "b", "c"], &[1, 1, 1]));
        let (_s2, ab) = route_of(fleet(&["a", "b"], &[1, 1]));
        let (_s4, abcd) = route_of(fleet(&["a", "b", "c", "d"], &[1, 1, 1, 1]));
        let (mut moved, mut gained) = (0, 0);
        for k in 0..1000 {
            let before = first_choice(&abc, session(k));
            let after = first_choice(&ab, session(k));
            if before == "c" {
                moved += 1;
            } else {
                assert_eq!(after, before, "session {k} moved off a backend still there");
            }
            let grown = first_choice(&abcd, session(k));
            if grown == "d" {
                gained += 1;
            } else {
                assert_eq!(grown, before, "session {k} moved between old backends");
            }
        }
        assert!((250..=420).contains(&moved), "c held {moved} of 1000");
        assert!((170..=330).contains(&gained), "d took {gained} of 1000");
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_load_moves_a_session_off_a_saturated_backend() {
        let (_s, r) = route_of(fleet(&["a", "b", "c"], &[1, 1, 1]));
        let k = session(3);
        let first = first_choice(&r, k);
        let i = index_of(&r, &first);
        let in_flight = |n| {
            r.candidates[i]
                .backend
                .runtime
                .in_flight
                .store(n, Ordering::Relaxed)
        };
        // 3 of 3 in flight: the bound is 2 × 1 + 2 = 4, kept.
        in_flight(3);
        assert_eq!(first_choice(&r, k), first);
        // 10 of 10: bound 2 × 10/3 + 2 ≈ 8.7, moved.
        in_flight(10);
        let (to, st) = chosen(&r, sticky(&r, k, None, CandidateSet::default()));
        assert_ne!(to, first);
        assert_eq!(st, Stickiness::Moved(MoveReason::Saturated));
        // Saturated is behind the others, not out: alone, it still serves.
        let others: Vec<usize> = (0..3).filter(|j| *j != i).collect();
        let (to, _) = chosen(&r, sticky(&r, k, None, set(&others)));
        assert_eq!(to, first);
        // Weight raises the bound: weight 4 of 6 makes 10 of 10 its share.
        let mut fl = fleet(&["a", "b", "c"], &[1, 1, 1]);
        for b in &mut fl {
            if b.id == first {
                b.weight = 4;
            }
        }
        let (_s, r) = route_of(fl);
        let i = index_of(&r, &first);
        r.candidates[i]
            .backend
            .runtime
            .in_flight
            .store(10, Ordering::Relaxed);
        // (The heavier backend may now be the first choice of other sessions
        // too; this one's first choice is the same or better.)
        let (to, st) = chosen(&r, sticky(&r, k, None, CandidateSet::default()));
        assert_eq!((to.as_str(), st), (first.as_str(), Stickiness::Kept));
    }

    #[tokio::test(start_paused = true)]
    async fn the_owner_of_a_stored_response_goes_first_while_eligible() {
        let mut fl = fleet(&["a", "b", "c"], &[1, 1, 1]);
        let mut fb = backend("fb", Pool::Fallback, &[("m", "m")]);
        fb.rpm = 1_000_000_000;
        fl.push(fb);
        let (_s, r) = route_of(fl);
        let k = session(11);
        let first = first_choice(&r, k);
        let other = ["a", "b", "c"]
            .into_iter()
            .find(|id| *id != first)
            .expect("two backends");
        let none = CandidateSet::default();
        let (to, st) = chosen(&r, sticky(&r, k, Some(other), none));
        assert_eq!(
            (to.as_str(), st),
            (other, Stickiness::Moved(MoveReason::Owner))
        );
        let (to, st) = chosen(&r, sticky(&r, k, Some(&first), none));
        assert_eq!((to.as_str(), st), (first.as_str(), Stickiness::Kept));
        // Before the primary pool, and without an affinity key.
        let (to, st) = chosen(&r, sticky(&r, k, Some("fb"), none));
        assert_eq!(
            (to.as_str(), st),
            ("fb", Stickiness::Moved(MoveReason::Owner))
        );
        let pref = Preference {
            owner: Some("fb"),
            affinity: None,
        };
        let (to, st) = chosen(&r, super::select(&r, none, 1.0, Instant::now(), pref));
        assert_eq!((to.as_str(), st), ("fb", Stickiness::NoKey));
        // A cooling owner, or one already tried, gives way to the session's order.
        let o = index_of(&r, other);
        let (to, _) = chosen(&r, sticky(&r, k, Some(other), set(&[o])));
        assert_eq!(to, first);
        r.candidates[o]
            .backend
            .runtime
            .cooldown
            .apply(Instant::now() + Duration::from_secs(30), 1);
        let (to, st) = chosen(&r, sticky(&r, k, Some(other), none));
        assert_eq!((to.as_str(), st), (first.as_str(), Stickiness::Kept));
        // An unknown owner (a backend since removed) changes nothing.
        assert_eq!(chosen(&r, sticky(&r, k, Some("gone"), none)).0, first);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_key_selection_is_least_loaded_and_says_so() {
        let (_s, r) = route_of(fleet(&["a", "b"], &[1, 1]));
        r.candidates[index_of(&r, "a")]
            .backend
            .runtime
            .in_flight
            .store(2, Ordering::Relaxed);
        for _ in 0..3 {
            let (to, st) = chosen(&r, select(&r, CandidateSet::default(), 1.0, Instant::now()));
            assert_eq!((to.as_str(), st), ("b", Stickiness::NoKey));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn scores_are_pinned() {
        // Proxies of different builds must rank alike: the score is a pure
        // function of (session, id, weight).
        let s = score(hash64(b"session-1"), "backend-a", 1);
        assert_eq!(s, score(hash64(b"session-1"), "backend-a", 1));
        assert!(s > 0.0 && s.is_finite());
        assert_eq!(score(hash64(b"session-1"), "backend-a", 3), 3.0 * s);
        assert_ne!(s, score(hash64(b"session-1"), "backend-b", 1));
        // Pinned against an independent implementation (Python floats):
        // changing the hash or the score re-deals every session of a fleet
        // running mixed versions.
        assert!((s - 0.760_295_338_461_136_2).abs() < 1e-12, "{s}");
        let (_s, r) = route_of(fleet(&["a", "b", "c"], &[1, 1, 1]));
        let firsts: Vec<String> = (0..6).map(|k| first_choice(&r, session(k))).collect();
        assert_eq!(firsts, ["b", "b", "b", "c", "b", "b"]);
        for x in [0, 1, u64::MAX, u64::MAX - 1, 1 << 63] {
            let v = score(x, "", 1);
            assert!(v > 0.0 && v.is_finite(), "{x}: {v}");
        }
    }

    #[test]
    fn candidate_sets_hold_indices_below_the_limit() {
        let mut s = CandidateSet::default();
        assert!(s.is_empty());
        s.insert(0);
        s.insert(127);
        s.insert(127);
        assert_eq!(s.len(), 2);
        assert!(s.contains(0) && s.contains(127));
        assert!(!s.contains(1) && !s.contains(128) && !s.contains(1000));
    }

    fn id(r: &Route, s: Selection) -> &str {
        match s {
            Selection::Admitted { index, .. } => &r.candidates[index].backend.id,
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn primary_before_fallback_and_least_loaded_within_a_pool() {
        let (_s, r) = route_of(vec![
            backend("fb", Pool::Fallback, &[("m", "m")]),
            backend("p1", Pool::Primary, &[("m", "m")]),
            backend("p2", Pool::Primary, &[("m", "m")]),
        ]);
        let now = Instant::now();
        r.candidates[0]
            .backend
            .runtime
            .in_flight
            .store(5, Ordering::Relaxed);
        assert_eq!(id(&r, select(&r, CandidateSet::default(), 1.0, now)), "p2");
        r.candidates[1]
            .backend
            .runtime
            .in_flight
            .store(9, Ordering::Relaxed);
        assert_eq!(id(&r, select(&r, CandidateSet::default(), 1.0, now)), "p1");
        // Both primaries tried: fallback.
        assert_eq!(id(&r, select(&r, set(&[0, 1]), 1.0, now)), "fb");
        assert!(matches!(
            select(&r, set(&[0, 1, 2]), 1.0, now),
            Selection::Unavailable { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn ties_rotate() {
        let (_s, r) = route_of(vec![
            backend("a", Pool::Primary, &[("m", "m")]),
            backend("b", Pool::Primary, &[("m", "m")]),
        ]);
        let now = Instant::now();
        let first = id(&r, select(&r, CandidateSet::default(), 1.0, now)).to_string();
        let second = id(&r, select(&r, CandidateSet::default(), 1.0, now)).to_string();
        assert_ne!(first, second);
    }

    #[tokio::test(start_paused = true)]
    async fn weight_divides_load() {
        let mut heavy = backend("heavy", Pool::Primary, &[("m", "m")]);
        heavy.weight = 4;
        let (_s, r) = route_of(vec![backend("light", Pool::Primary, &[("m", "m")]), heavy]);
        r.candidates[0]
            .backend
            .runtime
            .in_flight
            .store(1, Ordering::Relaxed);
        r.candidates[1]
            .backend
            .runtime
            .in_flight
            .store(3, Ordering::Relaxed);
        assert_eq!(
            id(&r, select(&r, CandidateSet::default(), 1.0, Instant::now())),
            "heavy"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cooling_skips_rate_limited_queues_all_cooling_uses_emergency() {
        let mut a = backend("a", Pool::Primary, &[("m", "m")]);
        a.rpm = 1;
        let mut b = backend("b", Pool::Fallback, &[("m", "m")]);
        b.rpm = 20; // emergency 0.05 × 20 = 1 per minute
        let (_s, r) = route_of(vec![a, b]);
        let now = Instant::now();
        assert_eq!(id(&r, select(&r, CandidateSet::default(), 1.0, now)), "a");
        // a is out of tokens: b.
        assert_eq!(id(&r, select(&r, CandidateSet::default(), 1.0, now)), "b");
        // Only a (rate-limited) left untried.
        assert!(matches!(
            select(&r, set(&[1]), 1.0, now),
            Selection::RateLimited { .. }
        ));
        // Cool both: emergency admits once on the soonest-recovering, then 503.
        r.candidates[0]
            .backend
            .runtime
            .cooldown
            .apply(now + Duration::from_secs(30), 1);
        r.candidates[1]
            .backend
            .runtime
            .cooldown
            .apply(now + Duration::from_secs(10), 1);
        assert_eq!(
            select(&r, CandidateSet::default(), 1.0, now),
            Selection::Admitted {
                index: 1,
                emergency: true,
                stickiness: Stickiness::NoKey,
            }
        );
        assert_eq!(
            select(&r, CandidateSet::default(), 1.0, now),
            Selection::Unavailable {
                retry_after: Duration::from_secs(10)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_quota_gets_no_emergency_admission() {
        let mut a = backend("a", Pool::Primary, &[("m", "m")]);
        a.rpm = 20; // emergency 0.05 × 20 = 1 per minute
        let (_s, r) = route_of(vec![a]);
        let now = Instant::now();
        let quota_end = now + Duration::from_secs(3600);
        r.candidates[0].backend.runtime.cooldown.exhaust(quota_end);
        assert_eq!(
            select(&r, CandidateSet::default(), 1.0, now),
            Selection::Unavailable {
                retry_after: Duration::from_secs(3600)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_backends_are_skipped() {
        let (_s, r) = route_of(vec![
            backend("a", Pool::Primary, &[("m", "m")]),
            backend("b", Pool::Primary, &[("m", "m")]),
        ]);
        let now = Instant::now();
        let p = crate::outlier::OutlierPolicy::default();
        for _ in 0..5 {
            r.candidates[0].backend.runtime.outlier.on_failure(&p, now);
        }
        // A second apart: the limiters pace requests at the rate (600 rpm),
        // they no longer admit a minute's worth at one instant.
        for i in 0..4 {
            let at = now + Duration::from_secs(i);
            assert_eq!(id(&r, select(&r, CandidateSet::default(), 1.0, at)), "b");
        }
    }
}

/// The health cap and fail open.
#[cfg(test)]
mod health_tests {
    use super::*;
    use crate::health::{HealthMark, Verdict};
    use crate::snapshot::{Snapshot, compile};
    use crate::test_util::{backend, key};
    use claw_proto::v1;
    use std::sync::Arc;

    fn route_of(backends: Vec<v1::SnapshotBackend>) -> (Snapshot, Arc<Route>) {
        let s = v1::Snapshot {
            version: 1,
            backends,
            client_keys: vec![key("ck", "s")],
            ..Default::default()
        };
        let c = compile(1, &s, None, Instant::now()).unwrap();
        let r = c.route("m").unwrap().clone();
        (c, r)
    }

    /// Backends `ids`, the first half primary and the rest fallback (the
    /// cap counts both pools together), with rates no test reaches.
    fn fleet(ids: &[&str]) -> Vec<v1::SnapshotBackend> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                let pool = if i < ids.len().div_ceil(2) {
                    Pool::Primary
                } else {
                    Pool::Fallback
                };
                let mut b = backend(id, pool, &[("m", "m")]);
                b.rpm = 1_000_000_000;
                b
            })
            .collect()
    }

    fn cand<'r>(r: &'r Route, id: &str) -> &'r Candidate {
        r.candidates
            .iter()
            .find(|c| &*c.backend.id == id)
            .expect("backend in the route")
    }

    /// Marks `id` unhealthy fleet-wide since `since`.
    fn unhealthy(r: &Route, id: &str, since: Instant) {
        cand(r, id).backend.runtime.health.set(Some(HealthMark {
            verdict: Verdict::Unhealthy,
            since,
            reason: "probe: connect: connection refused".into(),
        }));
    }

    /// The ids excluded for health at `now`, sorted.
    fn excluded(r: &Route, now: Instant) -> Vec<String> {
        let set = health_excluded(&r.candidates, now);
        let mut ids: Vec<String> = (0..r.candidates.len())
            .filter(|i| set.contains(*i))
            .map(|i| r.candidates[i].backend.id.to_string())
            .collect();
        ids.sort();
        ids
    }

    /// Every backend the route admits normally, by repeated selection
    /// skipping the ones already admitted: up to an emergency admission or
    /// a fail open (an admission of a backend excluded for health).
    fn admitted(r: &Route, now: Instant) -> Vec<String> {
        let health = health_excluded(&r.candidates, now);
        let mut tried = CandidateSet::default();
        let mut out = Vec::new();
        while let Selection::Admitted {
            index,
            emergency: false,
            ..
        } = select(r, tried, 1.0, now, Preference::default())
        {
            if health.contains(index) {
                break;
            }
            tried.insert(index);
            out.push(r.candidates[index].backend.id.to_string());
        }
        out.sort();
        out
    }

    /// The one selection after `tried`: (backend, emergency).
    fn next(r: &Route, tried: &[&str], now: Instant) -> (String, bool) {
        let mut set = CandidateSet::default();
        for id in tried {
            let i = r.candidates.iter().position(|c| &*c.backend.id == *id);
            set.insert(i.expect("backend in the route"));
        }
        match select(r, set, 1.0, now, Preference::default()) {
            Selection::Admitted {
                index, emergency, ..
            } => (r.candidates[index].backend.id.to_string(), emergency),
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_half_of_a_models_candidates_are_excluded_for_health() {
        let all = ["a", "b", "c", "d", "e"];
        for n in 1..=5 {
            let ids = &all[..n];
            for marked in [n, n / 2, 1] {
                let (_s, r) = route_of(fleet(ids));
                let t0 = Instant::now();
                // Marked in order a, b, c…, a second apart: a earliest.
                for (k, id) in ids[..marked].iter().enumerate() {
                    unhealthy(&r, id, t0 + Duration::from_secs(k as u64));
                }
                let now = t0 + Duration::from_secs(10);
                let kept_out = marked.min(n / 2);
                let want: Vec<String> = ids[..kept_out].iter().map(|s| s.to_string()).collect();
                assert_eq!(excluded(&r, now), want, "n={n}, {marked} marked");
                let want_in: Vec<String> = ids[kept_out..].iter().map(|s| s.to_string()).collect();
                assert_eq!(admitted(&r, now), want_in, "n={n}, {marked} marked");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_keeps_the_earliest_marked_out_then_the_lowest_ids_on_every_proxy() {
        // Two proxies: candidates in another order, the same marks.
        let (_s1, r1) = route_of(fleet(&["a", "b", "c", "d"]));
        let (_s2, r2) = route_of(fleet(&["d", "c", "b", "a"]));
        let t0 = Instant::now();
        for r in [&r1, &r2] {
            // c marked first, then b and d together (one message), then a.
            unhealthy(r, "c", t0);
            unhealthy(r, "d", t0 + Duration::from_secs(1));
            unhealthy(r, "b", t0 + Duration::from_secs(1));
            unhealthy(r, "a", t0 + Duration::from_secs(2));
        }
        let now = t0 + Duration::from_secs(3);
        assert_eq!(excluded(&r1, now), ["b", "c"]);
        assert_eq!(excluded(&r2, now), ["b", "c"]);
        // The choice is the marks', not the moment's.
        assert_eq!(excluded(&r1, now + Duration::from_secs(60)), ["b", "c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn local_and_fleet_ejections_count_as_health_and_end_on_time() {
        let (_s, r) = route_of(fleet(&["a", "b", "c", "d"]));
        let t0 = Instant::now();
        let p = crate::outlier::OutlierPolicy::default();
        for _ in 0..5 {
            cand(&r, "a").backend.runtime.outlier.on_failure(&p, t0);
        }
        cand(&r, "b").backend.runtime.health.set(Some(HealthMark {
            verdict: Verdict::Ejected {
                until: t0 + Duration::from_secs(10),
            },
            since: t0 + Duration::from_secs(1),
            reason: "ejected by proxy-a".into(),
        }));
        unhealthy(&r, "c", t0 + Duration::from_secs(2));
        let now = t0 + Duration::from_secs(3);
        // Three marked of four: a (earliest) and b stay out, c is tried.
        assert_eq!(excluded(&r, now), ["a", "b"]);
        assert_eq!(admitted(&r, now), ["c", "d"]);
        // b's ejection ends: now a and c.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(excluded(&r, later), ["a", "c"]);
        // a's (30 s) too: c alone.
        assert_eq!(excluded(&r, t0 + Duration::from_secs(30)), ["c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn when_only_health_excluded_candidates_are_left_selection_fails_open() {
        // a cooling after a 429, b unhealthy (one of two may be excluded).
        let (_s, r) = route_of(fleet(&["a", "b"]));
        let now = Instant::now();
        unhealthy(&r, "b", now);
        cand(&r, "a")
            .backend
            .runtime
            .cooldown
            .apply(now + Duration::from_secs(30), 1);
        assert_eq!(excluded(&r, now), ["b"]);
        assert_eq!(
            next(&r, &[], now),
            ("b".into(), false),
            "traffic still goes out, before any emergency admission of a"
        );
        // Likewise once the healthy ones were tried (a retry).
        let (_s, r) = route_of(fleet(&["a", "b", "c", "d"]));
        unhealthy(&r, "c", now);
        unhealthy(&r, "d", now);
        assert_eq!(admitted(&r, now), ["a", "b"]);
        let (third, _) = next(&r, &["a", "b"], now);
        assert!(third == "c" || third == "d", "{third}");
        // A lone unhealthy backend: the cap (0 of 1) lets it serve.
        let (_s, r) = route_of(fleet(&["a"]));
        unhealthy(&r, "a", now);
        assert_eq!(excluded(&r, now), Vec::<String>::new());
        assert_eq!(admitted(&r, now), ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_whose_first_choice_is_unhealthy_moves_with_that_reason() {
        let (_s, r) = route_of(fleet(&["a", "b", "c"]));
        let now = Instant::now();
        let pref = |h| Preference {
            owner: None,
            affinity: Some(h),
        };
        // A session whose first choice is a primary (a or b).
        let (h, first) = (0..100u64)
            .map(|k| crate::affinity::hash64(format!("s{k}").as_bytes()))
            .find_map(
                |h| match select(&r, CandidateSet::default(), 1.0, now, pref(h)) {
                    Selection::Admitted { index, .. } => Some((h, index)),
                    _ => None,
                },
            )
            .expect("a session");
        let id = r.candidates[first].backend.id.to_string();
        unhealthy(&r, &id, now);
        match select(&r, CandidateSet::default(), 1.0, now, pref(h)) {
            Selection::Admitted {
                index, stickiness, ..
            } => {
                assert_ne!(index, first);
                assert_eq!(stickiness, Stickiness::Moved(MoveReason::Unhealthy));
            }
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cooldowns_are_not_capped_and_do_not_fail_open() {
        let now = Instant::now();
        let until = now + Duration::from_secs(30);
        // Three of four cooling after 429s: only d serves (no cap).
        let (_s, r) = route_of(fleet(&["a", "b", "c", "d"]));
        for id in ["a", "b", "c"] {
            cand(&r, id).backend.runtime.cooldown.apply(until, 1);
        }
        assert_eq!(admitted(&r, now), ["d"]);
        // Every one spent (quota) or rejected (auth): nothing goes out,
        // even with health marks on top.
        let (_s, r) = route_of(fleet(&["a", "b"]));
        cand(&r, "a").backend.runtime.cooldown.exhaust(until);
        cand(&r, "b").backend.runtime.cooldown.fail_auth(401, now);
        unhealthy(&r, "b", now);
        assert!(matches!(
            select(&r, CandidateSet::default(), 1.0, now, Preference::default()),
            Selection::Unavailable { .. }
        ));
        // A cooling backend is not let back in by the cap, and counts as
        // marked only for health: b (unhealthy) stays out, c serves.
        let (_s, r) = route_of(fleet(&["a", "b", "c"]));
        cand(&r, "a").backend.runtime.cooldown.apply(until, 1);
        unhealthy(&r, "b", now);
        assert_eq!(excluded(&r, now), ["b"]);
        assert_eq!(admitted(&r, now), ["c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_excluded_gauge_follows_the_cap() {
        use crate::test_util::{backend, key};
        use claw_proto::{Pool, v1};
        let store = crate::snapshot::SnapshotStore::default();
        let snap = v1::Snapshot {
            version: 1,
            backends: ["a", "b", "c"]
                .iter()
                .map(|id| backend(id, Pool::Primary, &[("m", "m")]))
                .collect(),
            client_keys: vec![key("ck", "s")],
            ..Default::default()
        };
        store.apply(1, &snap).unwrap();
        let now = Instant::now();
        let s = store.load().unwrap();
        for (k, id) in ["b", "a"].iter().enumerate() {
            s.backend(id).unwrap().runtime.health.set(Some(HealthMark {
                verdict: Verdict::Unhealthy,
                since: now + Duration::from_secs(k as u64),
                reason: String::new(),
            }));
        }
        let mut out = String::new();
        super::render_excluded(&store, &mut out);
        // One of three may be out: b, marked first.
        assert!(
            out.starts_with("# HELP claw_backend_health_excluded "),
            "{out}"
        );
        assert!(out.contains("# TYPE claw_backend_health_excluded gauge\n"));
        for (id, v) in [("a", 0), ("b", 1), ("c", 0)] {
            let line = format!("claw_backend_health_excluded{{backend=\"{id}\"}} {v}\n");
            assert!(out.contains(&line), "{line} in {out}");
        }
    }

    /// A backend whose limiter applies 0 because the proxy left the fleet
    /// makes a request unavailable (answered at once, 503 with
    /// `Retry-After`), not rate-limited (queued): its share never returns.
    /// Before the leave, the same refusal queues.
    #[test]
    fn a_proxy_that_left_the_fleet_does_not_queue_what_its_limiters_refuse() {
        let mut b = backend("b1", Pool::Primary, &[("m", "m")]);
        b.rpm = 60;
        let (_s, r) = route_of(vec![b]);
        let now = Instant::now();
        let runtime = &r.candidates[0].backend.runtime;
        runtime.set_shares(0.0, 0.0, now);
        assert!(
            matches!(
                select(&r, CandidateSet::default(), 1.0, now, Preference::default()),
                Selection::RateLimited { .. }
            ),
            "share 0 before a leave (a new proxy awaiting its shares) queues"
        );
        runtime
            .left_fleet
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(
            select(&r, CandidateSet::default(), 1.0, now, Preference::default()),
            Selection::Unavailable { .. }
        ));
    }
}

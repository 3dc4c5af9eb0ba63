//! Backend selection and admission: the routing-order contract (DESIGN
//! "Routing order") in one place.
//!
//! [`select`] picks the candidate for one attempt. Candidates are the
//! enabled backends mapping the model that are neither cooling nor ejected;
//! the primary pool before the fallback pool; within a pool the least loaded
//! (in-flight ÷ weight, ties rotated). A candidate whose rate limiter refuses
//! is skipped; if all usable ones are rate-limited the request queues; if all
//! are cooling, the emergency limiter of the soonest-recovering one may
//! admit; otherwise the model is unavailable until the soonest recovery.
//!
//! [`admit`] turns that into the decision for the retry layer: go, wait in
//! the model's queue ([`crate::queue`]) while every usable candidate is
//! rate-limited, or stop with 429 (queue full or timed out) or 503.

use std::sync::atomic::Ordering;
use std::time::Duration;

use claw_proto::Pool;
use tokio::time::Instant;

use crate::error::{ApiError, retry_after_secs};
use crate::queue::QueueExit;
use crate::snapshot::{Candidate, Route};
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

    /// Whether the set is empty.
    #[cfg(test)]
    fn is_empty(self) -> bool {
        self.0 == 0
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

/// Picks the candidate for the next attempt, skipping those in `tried`,
/// and takes its tokens.
pub(crate) fn select(route: &Route, tried: CandidateSet, tokens: f64, now: Instant) -> Selection {
    let cands = &route.candidates[..route.candidates.len().min(MAX_CANDIDATES)];
    let n = cands.len();
    if n == 0 {
        return Selection::Unavailable {
            retry_after: Duration::from_secs(1),
        };
    }
    let rot = route.next_rotation() % n;
    let mut checked = tried;
    let mut soonest: Option<Instant> = None;
    let mut soonest_cooling: Option<(usize, Instant)> = None;
    for (i, c) in cands.iter().enumerate() {
        if tried.contains(i) {
            continue;
        }
        let cool = c.backend.runtime.cooldown.cooling_until(now);
        let ejected = c.backend.runtime.outlier.ejected_until(now);
        if let Some(until) = cool.max(ejected) {
            checked.insert(i);
            soonest = Some(soonest.map_or(until, |s| s.min(until)));
            if let (Some(c), None) = (cool, ejected)
                && soonest_cooling.is_none_or(|(_, s)| c < s)
            {
                soonest_cooling = Some((i, c));
            }
        }
    }
    let mut min_wait: Option<Duration> = None;
    for pool in [Pool::Primary, Pool::Fallback] {
        loop {
            let mut best: Option<usize> = None;
            for k in 0..n {
                let i = (rot + k) % n;
                if checked.contains(i) || cands[i].backend.pool != pool {
                    continue;
                }
                if best.is_none_or(|b| less_loaded(&cands[i], &cands[b])) {
                    best = Some(i);
                }
            }
            let Some(i) = best else { break };
            checked.insert(i);
            match take_tokens(&cands[i], tokens, now) {
                Ok(()) => {
                    return Selection::Admitted {
                        index: i,
                        emergency: false,
                    };
                }
                Err(w) => min_wait = Some(min_wait.map_or(w, |m| m.min(w))),
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
        return Selection::Admitted {
            index: i,
            emergency: true,
        };
    }
    Selection::Unavailable {
        retry_after: soonest.map_or(Duration::from_secs(1), |u| u - now),
    }
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
    let direct = select(&r.route, tried, r.est_tokens, Instant::now());
    let wait = match direct {
        Selection::Admitted { index, emergency } => return Admission::Go { index, emergency },
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
            |now| match select(&r.route, tried, r.est_tokens, now) {
                Selection::Admitted { index, emergency } => Ok((index, emergency)),
                Selection::RateLimited { wait } => {
                    last_wait = wait;
                    Err(Some(wait))
                }
                Selection::Unavailable { .. } => Err(None),
            },
        )
        .await;
    match waited {
        Ok((index, emergency)) => Admission::Go { index, emergency },
        Err(QueueExit::Full | QueueExit::TimedOut) => {
            Admission::Stop(ApiError::capacity_rate_limited(retry_after_secs(last_wait)))
        }
        Err(QueueExit::GaveUp) => match select(&r.route, tried, r.est_tokens, Instant::now()) {
            Selection::Admitted { index, emergency } => Admission::Go { index, emergency },
            Selection::RateLimited { wait } => {
                Admission::Stop(ApiError::capacity_rate_limited(retry_after_secs(wait)))
            }
            Selection::Unavailable { retry_after } => {
                Admission::Stop(ApiError::no_capacity(retry_after_secs(retry_after)))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                emergency: true
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

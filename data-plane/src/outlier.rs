//! Passive outlier detection: a backend that fails (5xx, connect error,
//! timeout) several times in a row is ejected for a while, doubling on each
//! repeat ejection, so retries stop wasting attempts on it. A success resets
//! the failure count; a success after an ejection also resets the doubling.
//! A success that ends a streak of failures says so ([`Outlier::on_success`]),
//! so the control plane's fleet-wide count of the backend's failures resets
//! too. An ejection is "excluded for health" in [`crate::select`]: subject
//! to the cap that keeps at least half of a model's candidates in play.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// When and for how long backends are ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Consecutive failures that eject a backend.
    pub consecutive_failures: u32,
    /// First ejection.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    /// When the current ejection started.
    ejected_at: Option<Instant>,
    /// A failure came after the last success.
    streak: bool,
}

/// Outlier state of one backend.
#[derive(Debug, Default)]
pub struct Outlier {
    inner: Mutex<Inner>,
}

impl Outlier {
    /// When the ejection ends, if the backend is ejected at `now`.
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        self.inner.lock().ejected_until.filter(|u| *u > now)
    }

    /// When the ejection started and when it ends, if the backend is
    /// ejected at `now`.
    pub fn ejection(&self, now: Instant) -> Option<(Instant, Instant)> {
        let g = self.inner.lock();
        let until = g.ejected_until.filter(|u| *u > now)?;
        Some((g.ejected_at.unwrap_or(now), until))
    }

    /// Records a failure; returns the end of a new ejection if this one ejects.
    pub fn on_failure(&self, policy: &OutlierPolicy, now: Instant) -> Option<Instant> {
        let mut g = self.inner.lock();
        g.streak = true;
        g.failures = g.failures.saturating_add(1);
        if g.failures < policy.consecutive_failures.max(1) {
            return None;
        }
        g.failures = 0;
        g.ejections = g.ejections.saturating_add(1);
        let shift = (g.ejections - 1).min(16);
        let d = policy
            .base_ejection
            .checked_mul(1 << shift)
            .unwrap_or(policy.max_ejection)
            .min(policy.max_ejection);
        let until = now + d;
        // A repeat ejection while still ejected keeps its start: the
        // backend has been out since then.
        if g.ejected_until.is_none_or(|u| u <= now) {
            g.ejected_at = Some(now);
        }
        g.ejected_until = Some(until);
        Some(until)
    }

    /// Records a success. Returns whether it ends a streak (a failure came
    /// since the previous success), once per streak.
    pub fn on_success(&self, now: Instant) -> bool {
        let mut g = self.inner.lock();
        let streak = std::mem::take(&mut g.streak);
        g.failures = 0;
        if g.ejected_until.is_none_or(|u| u <= now) {
            g.ejections = 0;
            g.ejected_until = None;
            g.ejected_at = None;
        }
        streak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn five_failures_eject_and_repeats_double() {
        let o = Outlier::default();
        let p = OutlierPolicy::default();
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(o.on_failure(&p, now), None);
        }
        let until = o.on_failure(&p, now).unwrap();
        assert_eq!(until - now, Duration::from_secs(30));
        assert_eq!(o.ejected_until(now), Some(until));
        assert_eq!(o.ejected_until(until), None);
        for _ in 0..4 {
            o.on_failure(&p, until);
        }
        let again = o.on_failure(&p, until).unwrap();
        assert_eq!(again - until, Duration::from_secs(60));
        for _ in 0..50 {
            o.on_failure(&p, until);
        }
        assert!(o.ejected_until(until).unwrap() - until <= Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_failures() {
        let o = Outlier::default();
        let p = OutlierPolicy::default();
        let now = Instant::now();
        for _ in 0..4 {
            o.on_failure(&p, now);
        }
        assert!(o.on_success(now), "the success ends a streak of four");
        assert!(!o.on_success(now), "and the next one none");
        for _ in 0..4 {
            assert_eq!(o.on_failure(&p, now), None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejection_knows_its_start_and_a_success_after_it_ends_a_streak() {
        let o = Outlier::default();
        let p = OutlierPolicy::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            o.on_failure(&p, t0);
        }
        let until = t0 + Duration::from_secs(30);
        assert_eq!(o.ejection(t0), Some((t0, until)));
        // Repeated while ejected: extended, same start.
        let t1 = t0 + Duration::from_secs(10);
        for _ in 0..5 {
            o.on_failure(&p, t1);
        }
        assert_eq!(o.ejection(t1).map(|(s, _)| s), Some(t0));
        let end = o.ejected_until(t1).unwrap();
        assert_eq!(o.ejection(end), None);
        assert!(o.on_success(end), "the first success after an ejection");
        assert!(!o.on_success(end));
    }
}

//! Passive outlier detection: a backend that fails (5xx, connect error,
//! timeout) several times in a row is ejected for a while, doubling on each
//! repeat ejection, so retries stop wasting attempts on it. A success resets
//! the failure count; a success after an ejection also resets the doubling.

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

    /// Records a failure; returns the end of a new ejection if this one ejects.
    pub fn on_failure(&self, policy: &OutlierPolicy, now: Instant) -> Option<Instant> {
        let mut g = self.inner.lock();
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
        g.ejected_until = Some(until);
        Some(until)
    }

    /// Records a success.
    pub fn on_success(&self, now: Instant) {
        let mut g = self.inner.lock();
        g.failures = 0;
        if g.ejected_until.is_none_or(|u| u <= now) {
            g.ejections = 0;
            g.ejected_until = None;
        }
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
        o.on_success(now);
        for _ in 0..4 {
            assert_eq!(o.on_failure(&p, now), None);
        }
    }
}

//! Token buckets for per-minute limits (backend rpm/tpm, client key rpm, the
//! emergency bucket).
//!
//! A bucket holds at most one minute's worth of its effective limit and
//! refills continuously. The effective limit is `limit × share`: `share` is
//! this proxy's part of a cluster-wide limit (1.0 until the control plane
//! assigns shares) and can be changed at run time. Each bucket has its own
//! small lock, so there is no global lock on the hot path; times are passed in
//! so tests drive them with paused tokio time.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
struct Inner {
    limit_per_min: f64,
    share: f64,
    tokens: f64,
    last: Instant,
}

impl Inner {
    fn effective(&self) -> f64 {
        self.limit_per_min * self.share
    }

    fn capacity(&self) -> f64 {
        let e = self.effective();
        if e <= 0.0 { 0.0 } else { e.max(1.0) }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        let cap = self.capacity();
        if self.tokens < cap {
            self.tokens = (self.tokens + elapsed * self.effective() / 60.0).min(cap);
        }
    }

    /// Tokens that must be present before `n` may be taken: a request larger
    /// than the whole bucket is admitted once the bucket is full.
    fn needed(&self, n: f64) -> f64 {
        n.min(self.capacity())
    }

    fn wait_for(&self, n: f64) -> Duration {
        let rate = self.effective() / 60.0;
        if rate <= 0.0 {
            return Duration::MAX;
        }
        let missing = (self.needed(n) - self.tokens).max(0.0);
        Duration::from_secs_f64(missing / rate)
    }
}

/// A token bucket with a per-minute limit.
#[derive(Debug)]
pub struct TokenBucket {
    inner: Mutex<Inner>,
}

impl TokenBucket {
    /// A full bucket admitting `limit_per_min` per minute.
    pub fn per_minute(limit_per_min: u32, now: Instant) -> Self {
        Self::with_rate(f64::from(limit_per_min), now)
    }

    /// A full bucket with a fractional per-minute rate (the emergency bucket).
    pub fn with_rate(limit_per_min: f64, now: Instant) -> Self {
        let mut inner = Inner {
            limit_per_min: limit_per_min.max(0.0),
            share: 1.0,
            tokens: 0.0,
            last: now,
        };
        inner.tokens = inner.capacity();
        TokenBucket {
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned bucket only means a panic elsewhere mid-update; its
        // numbers are still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `n` tokens, or tells how long until they would be available.
    pub fn try_acquire(&self, n: f64, now: Instant) -> Result<(), Duration> {
        let mut g = self.lock();
        g.refill(now);
        if g.capacity() > 0.0 && g.tokens + 1e-9 >= g.needed(n) {
            g.tokens -= n;
            Ok(())
        } else {
            Err(g.wait_for(n))
        }
    }

    /// How long until `n` tokens are available (zero if they are now).
    pub fn time_until(&self, n: f64, now: Instant) -> Duration {
        let mut g = self.lock();
        g.refill(now);
        g.wait_for(n)
    }

    /// Gives back `n` tokens (an attempt that never reached the upstream, or a
    /// reservation larger than the actual use).
    pub fn refund(&self, n: f64) {
        let mut g = self.lock();
        let cap = g.capacity();
        g.tokens = (g.tokens + n).min(cap);
    }

    /// Takes `n` more tokens even if that drives the bucket negative (actual
    /// use larger than the reservation).
    pub fn force_take(&self, n: f64) {
        self.lock().tokens -= n;
    }

    /// Changes the per-minute limit (a new snapshot), keeping the level.
    pub fn set_limit(&self, limit_per_min: f64, now: Instant) {
        let mut g = self.lock();
        g.refill(now);
        g.limit_per_min = limit_per_min.max(0.0);
        g.tokens = g.tokens.min(g.capacity());
    }

    /// Sets this proxy's share of the limit, in `[0, 1]`.
    pub fn set_share(&self, share: f64, now: Instant) {
        let mut g = self.lock();
        g.refill(now);
        g.share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            1.0
        };
        g.tokens = g.tokens.min(g.capacity());
    }

    /// The current share.
    pub fn share(&self) -> f64 {
        self.lock().share
    }

    /// Reconciles a reservation of `reserved` tokens with the `actual` use.
    pub fn reconcile(&self, reserved: f64, actual: f64) {
        if actual < reserved {
            self.refund(reserved - actual);
        } else if actual > reserved {
            self.force_take(actual - reserved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn starts_full_and_refills_over_a_minute() {
        let now = Instant::now();
        let b = TokenBucket::per_minute(60, now);
        for _ in 0..60 {
            assert!(b.try_acquire(1.0, now).is_ok());
        }
        let wait = b.try_acquire(1.0, now).unwrap_err();
        assert!(wait <= Duration::from_millis(1001) && wait >= Duration::from_millis(999));
        assert!(b.try_acquire(1.0, now + Duration::from_secs(1)).is_ok());
        assert!(b.try_acquire(1.0, now + Duration::from_secs(1)).is_err());
        // Never more than a minute's worth.
        let later = now + Duration::from_secs(3600);
        for _ in 0..60 {
            assert!(b.try_acquire(1.0, later).is_ok());
        }
        assert!(b.try_acquire(1.0, later).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn share_scales_the_limit() {
        let now = Instant::now();
        let b = TokenBucket::per_minute(100, now);
        b.set_share(0.1, now);
        for _ in 0..10 {
            assert!(b.try_acquire(1.0, now).is_ok());
        }
        assert!(b.try_acquire(1.0, now).is_err());
        assert_eq!(b.share(), 0.1);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_limit_admits_nothing_and_fractions_get_one_token() {
        let now = Instant::now();
        let z = TokenBucket::with_rate(0.0, now);
        assert_eq!(z.try_acquire(1.0, now), Err(Duration::MAX));
        let f = TokenBucket::with_rate(0.5, now);
        assert!(f.try_acquire(1.0, now).is_ok());
        assert!(f.try_acquire(1.0, now).is_err());
        assert!(f.try_acquire(1.0, now + Duration::from_secs(120)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_reservation_needs_a_full_bucket_and_reconcile_refunds() {
        let now = Instant::now();
        let b = TokenBucket::per_minute(1000, now);
        assert!(b.try_acquire(5000.0, now).is_ok());
        assert!(b.try_acquire(1.0, now).is_err());
        b.reconcile(5000.0, 100.0);
        assert!(b.try_acquire(900.0, now).is_ok());
    }
}

//! Limits that bound what one client (or all of them together) can pin on
//! a proxy:
//!
//! - [`KeyLimiter`]: a client key's `max_parallel`, the most requests of
//!   the key in flight at once **on this proxy** (streams count until they
//!   end). The permit ([`KeyPermit`]) travels with the response body and is
//!   given back when the body is dropped.
//! - [`BodyBudget`]: the request body bytes all requests of this proxy may
//!   hold at once (`--max-inflight-body-bytes`); a request whose body does
//!   not fit waits briefly, then gets 503 with `Retry-After`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

/// A client key's in-flight counter on this proxy.
#[derive(Debug)]
pub struct KeyLimiter {
    max: AtomicU32,
    inflight: AtomicU32,
}

impl KeyLimiter {
    /// A limiter allowing `max` (≥ 1) requests at once.
    pub fn new(max: u32) -> Self {
        KeyLimiter {
            max: AtomicU32::new(max.max(1)),
            inflight: AtomicU32::new(0),
        }
    }

    /// Changes the limit (a new snapshot); requests in flight keep their
    /// permits.
    pub fn set_max(&self, max: u32) {
        self.max.store(max.max(1), Ordering::Relaxed);
    }

    /// The limit.
    pub fn max(&self) -> u32 {
        self.max.load(Ordering::Relaxed)
    }

    /// Requests of the key in flight.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// A permit, or `None` when `max` requests are in flight.
    pub fn try_acquire(self: &Arc<Self>) -> Option<KeyPermit> {
        let max = self.max();
        self.inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| KeyPermit(self.clone()))
    }
}

/// One in-flight request of a key; released on drop.
#[derive(Debug)]
pub struct KeyPermit(Arc<KeyLimiter>);

impl Drop for KeyPermit {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Default `--max-inflight-body-bytes`: 256 MiB. Sixteen maximum-size
/// (16 MiB) bodies at once, well above what legitimate traffic holds (a
/// chat body is kilobytes), and small enough that a proxy in a 1 GiB
/// container survives a flood of large bodies.
pub const DEFAULT_MAX_INFLIGHT_BODY_BYTES: usize = 256 * 1024 * 1024;

/// How long a request waits for room in the body budget before its 503.
pub const BODY_BUDGET_WAIT: Duration = Duration::from_secs(2);

/// The proxy-wide budget of request body bytes in flight. Cheap to clone
/// (shared).
#[derive(Clone)]
pub struct BodyBudget {
    inner: Arc<BudgetInner>,
}

struct BudgetInner {
    limit: usize,
    used: AtomicUsize,
    freed: tokio::sync::Notify,
}

impl std::fmt::Debug for BodyBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyBudget")
            .field("limit", &self.inner.limit)
            .field("used", &self.used())
            .finish()
    }
}

impl PartialEq for BodyBudget {
    fn eq(&self, other: &Self) -> bool {
        self.inner.limit == other.inner.limit
    }
}

impl Eq for BodyBudget {}

impl Default for BodyBudget {
    fn default() -> Self {
        BodyBudget::new(DEFAULT_MAX_INFLIGHT_BODY_BYTES)
    }
}

impl BodyBudget {
    /// A budget of `limit` bytes (0 = unlimited).
    pub fn new(limit: usize) -> Self {
        BodyBudget {
            inner: Arc::new(BudgetInner {
                limit,
                used: AtomicUsize::new(0),
                freed: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The configured limit (0 = unlimited).
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// An empty reservation, grown by [`BodyReservation::grow`] as a body
    /// arrives.
    pub fn reservation(&self) -> BodyReservation {
        BodyReservation {
            budget: self.clone(),
            held: 0,
        }
    }

    fn try_take(&self, n: usize) -> bool {
        let limit = self.inner.limit;
        if limit == 0 {
            self.inner.used.fetch_add(n, Ordering::AcqRel);
            return true;
        }
        self.inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        if n > 0 {
            self.inner.used.fetch_sub(n, Ordering::AcqRel);
            self.inner.freed.notify_waiters();
        }
    }
}

/// Body bytes one request holds in the [`BodyBudget`]; given back on drop.
#[derive(Debug)]
pub struct BodyReservation {
    budget: BodyBudget,
    held: usize,
}

/// A body did not fit the proxy's budget in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetExhausted;

impl BodyReservation {
    /// Bytes held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Grows the reservation to at least `total` bytes, waiting up to
    /// `wait` for room.
    pub async fn grow(&mut self, total: usize, wait: Duration) -> Result<(), BudgetExhausted> {
        if total <= self.held {
            return Ok(());
        }
        let need = total - self.held;
        let limit = self.budget.inner.limit;
        if limit != 0 && total > limit {
            // Could never fit, even alone.
            return Err(BudgetExhausted);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.budget.inner.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a release in between wakes it.
            freed.as_mut().enable();
            if self.budget.try_take(need) {
                self.held = total;
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(BudgetExhausted);
            }
        }
    }
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_has_at_most_max_permits() {
        let l = Arc::new(KeyLimiter::new(2));
        let a = l.try_acquire().expect("first");
        let _b = l.try_acquire().expect("second");
        assert!(l.try_acquire().is_none());
        drop(a);
        assert!(l.try_acquire().is_some());
        l.set_max(3);
        assert_eq!(l.inflight(), 1);
        assert!(l.try_acquire().is_some());
    }

    #[tokio::test]
    async fn the_budget_is_given_back_on_drop() {
        let b = BodyBudget::new(100);
        let mut r1 = b.reservation();
        r1.grow(60, Duration::ZERO).await.expect("fits");
        let mut r2 = b.reservation();
        assert_eq!(
            r2.grow(50, Duration::from_millis(10)).await,
            Err(BudgetExhausted)
        );
        assert_eq!(r2.held(), 0);
        assert_eq!(r2.grow(101, Duration::ZERO).await, Err(BudgetExhausted));
        let waiter =
            tokio::spawn(async move { r2.grow(50, Duration::from_secs(30)).await.map(|()| r2) });
        tokio::task::yield_now().await;
        drop(r1);
        let r2 = waiter.await.expect("joined").expect("fits once freed");
        assert_eq!(b.used(), 50);
        drop(r2);
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn zero_is_unlimited() {
        let b = BodyBudget::new(0);
        let mut r = b.reservation();
        r.grow(usize::MAX / 2, Duration::ZERO).await.expect("fits");
        drop(r);
        assert_eq!(b.used(), 0);
    }
}

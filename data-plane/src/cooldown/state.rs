//! The cooldown state machine of one backend, and the inputs that drive it.
//!
//! A backend that answers 429 is cooled at once: for the upstream's
//! `Retry-After` when given (seconds or an HTTP date, [`parse_retry_after`]),
//! capped at the pool's `cooldown_max` ([`QUOTA_HOLD_MAX`] says exactly what
//! holds), else for [`claw_proto::cooldown::backoff`] — `base·2^(n-1)` capped at `max`,
//! or a flat `base` when the pool is not exponential — `n` being the number of
//! consecutive 429s (reset by a success).
//!
//! Two other holds share the same `until` (so routing skips the backend the
//! same way): a short hold after an upstream 529 ([`Cooldown::hold`], which
//! leaves the 429 count alone), and quota exhaustion ([`Cooldown::exhaust`]):
//! a 429 saying the account's quota or billing is spent, held until the
//! quota returns and reported as such (`quota_exhausted`), since retrying it
//! in seconds only burns attempts. A third, [`Cooldown::fail_auth`], is an
//! upstream 401/403: the provider rejected the gateway's key, so the backend
//! is held (as exhausted: no emergency trickle) until the key or URL changes
//! ([`Cooldown::clear_auth`], on a snapshot with a new key) — retrying it
//! can never succeed. A leaf: the snapshot embeds a
//! [`Cooldown`] in every backend's runtime state, so nothing here may name the
//! snapshot.

use std::time::{Duration, SystemTime};

use http::HeaderValue;
use parking_lot::Mutex;
use tokio::time::Instant;

/// The longest `Retry-After` parsed (anything above is this). What is then
/// applied is bounded far tighter: see [`QUOTA_HOLD_MAX`] and
/// [`CooldownPolicy::cap`].
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The longest a spent quota holds a backend.
///
/// What holds, exactly (issue 17 item 7): an upstream's `Retry-After` never
/// sets a hold longer than its pool allows.
/// - A 429 whose `Retry-After` is at most an hour is a rate limit: the
///   backend cools for that long **capped at the pool's `cooldown_max`**
///   ([`Cooldown::on_rate_limited`]); so does a 529 (its hold).
/// - A 429 whose `Retry-After` is beyond an hour (seconds or an HTTP date),
///   or whose body names quota/billing, is a spent quota: shown as such
///   (`quota_exhausted`, `CooldownUpdate.quota_exhausted`, status
///   `quota_exhausted`) and held for its `Retry-After` (an hour without one)
///   **capped at this hour**. An upstream saying "come back in 30 years"
///   costs one probing request an hour, never a day-long fleet-wide outage.
/// - A client is never told more than the real wait, and never more than
///   the pool's `cooldown_max`, whichever is shorter (a quota hold may
///   outlast it: the client that comes back then hears the real remaining
///   wait of the soonest candidate).
pub(crate) const QUOTA_HOLD_MAX: Duration = Duration::from_secs(3600);

/// How a pool cools its backends (from `PoolSettings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CooldownPolicy {
    /// First cooldown.
    pub base: Duration,
    /// Cap.
    pub max: Duration,
    /// Doubling per consecutive 429.
    pub exponential: bool,
}

impl CooldownPolicy {
    /// The cooldown after the `n`-th consecutive 429 (n ≥ 1): the one
    /// formula both planes share ([`claw_proto::cooldown::backoff`]).
    pub fn backoff(&self, n: u32) -> Duration {
        claw_proto::cooldown::backoff(self.base, self.max, self.exponential, n)
    }

    /// The longest cooldown of the pool (`cooldown_max`, at least `base`):
    /// what an upstream's `Retry-After` is capped at.
    pub fn cap(&self) -> Duration {
        self.max.max(self.base)
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (relative to `now`).
/// Returns `None` for anything unparsable; caps at [`MAX_RETRY_AFTER`].
pub(crate) fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let s = value.to_str().ok()?.trim();
    let d = if let Ok(secs) = s.parse::<u64>() {
        Duration::from_secs(secs)
    } else if let Ok(secs) = s.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64()))
    } else {
        let at = httpdate::parse_http_date(s).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

#[derive(Debug, Default)]
struct Inner {
    until: Option<Instant>,
    consecutive: u32,
    /// The end of a quota exhaustion (≤ `until`).
    quota_until: Option<Instant>,
    /// The provider rejected the key: the upstream status (0 when learned
    /// from the control plane).
    auth_failed: Option<u16>,
}

/// How long an auth failure holds a backend: "until told otherwise" (a new
/// key or URL clears it), bounded so the clock arithmetic cannot overflow.
pub(crate) const AUTH_FAILED_HOLD: Duration = Duration::from_secs(365 * 24 * 3600);

/// Cooldown state of one backend.
#[derive(Debug, Default)]
pub struct Cooldown {
    inner: Mutex<Inner>,
}

impl Cooldown {
    /// When the backend stops cooling, if it is cooling at `now`.
    pub fn cooling_until(&self, now: Instant) -> Option<Instant> {
        self.inner.lock().until.filter(|u| *u > now)
    }

    /// Records a 429 and starts (or extends) the cooldown. Returns the end
    /// of the cooldown and the consecutive count.
    pub fn on_rate_limited(
        &self,
        policy: &CooldownPolicy,
        retry_after: Option<Duration>,
        now: Instant,
    ) -> (Instant, u32) {
        let mut g = self.inner.lock();
        g.consecutive = g.consecutive.saturating_add(1);
        // The upstream's word, but never beyond the pool's cooldown_max.
        let d = retry_after.map_or_else(|| policy.backoff(g.consecutive), |d| d.min(policy.cap()));
        let until = now + d;
        g.until = Some(g.until.map_or(until, |u| u.max(until)));
        (until, g.consecutive)
    }

    /// A successful answer resets the consecutive count; returns the count
    /// it had (> 0: the backend recovered from 429s).
    pub fn on_success(&self) -> u32 {
        std::mem::take(&mut self.inner.lock().consecutive)
    }

    /// Applies a cooldown learned elsewhere; keeps the later end.
    pub fn apply(&self, until: Instant, consecutive: u32) {
        let mut g = self.inner.lock();
        g.until = Some(g.until.map_or(until, |u| u.max(until)));
        g.consecutive = g.consecutive.max(consecutive);
    }

    /// Holds the backend until `until` (an upstream 529) without counting
    /// a 429; keeps the later end.
    pub fn hold(&self, until: Instant) {
        let mut g = self.inner.lock();
        g.until = Some(g.until.map_or(until, |u| u.max(until)));
    }

    /// Marks the backend's quota exhausted until `until` (and cools it
    /// until then); keeps the later end.
    pub fn exhaust(&self, until: Instant) {
        let mut g = self.inner.lock();
        g.until = Some(g.until.map_or(until, |u| u.max(until)));
        g.quota_until = Some(g.quota_until.map_or(until, |u| u.max(until)));
    }

    /// Marks the backend's key rejected (upstream `status`, 401/403; 0 when
    /// not known) and holds it until [`Cooldown::clear_auth`]. Returns
    /// whether it was not marked already.
    pub fn fail_auth(&self, status: u16, now: Instant) -> bool {
        let until = now + AUTH_FAILED_HOLD;
        let mut g = self.inner.lock();
        g.until = Some(g.until.map_or(until, |u| u.max(until)));
        g.quota_until = Some(g.quota_until.map_or(until, |u| u.max(until)));
        let first = g.auth_failed.is_none();
        if first || status != 0 {
            g.auth_failed = Some(status);
        }
        first
    }

    /// The upstream status that rejected the key (0: unknown), while the
    /// backend is marked.
    pub fn auth_failed(&self) -> Option<u16> {
        self.inner.lock().auth_failed
    }

    /// Ends an auth failure (the backend's key or URL changed): the hold it
    /// put on ends now. Returns whether it was marked.
    pub fn clear_auth(&self) -> bool {
        let mut g = self.inner.lock();
        if g.auth_failed.take().is_none() {
            return false;
        }
        g.until = None;
        g.quota_until = None;
        true
    }

    /// When the backend's quota returns, if it is exhausted at `now`.
    pub fn quota_exhausted_until(&self, now: Instant) -> Option<Instant> {
        self.inner.lock().quota_until.filter(|u| *u > now)
    }

    /// The consecutive 429 count.
    pub fn consecutive(&self) -> u32 {
        self.inner.lock().consecutive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_auth_failure_holds_until_cleared() {
        let c = Cooldown::default();
        let now = Instant::now();
        assert!(c.fail_auth(401, now));
        assert!(!c.fail_auth(0, now), "a second mark is not new");
        assert_eq!(c.auth_failed(), Some(401));
        let later = now + Duration::from_secs(30 * 24 * 3600);
        assert!(c.cooling_until(later).is_some());
        assert!(
            c.quota_exhausted_until(later).is_some(),
            "no emergency trickle"
        );
        assert!(c.clear_auth());
        assert_eq!(c.auth_failed(), None);
        assert_eq!(c.cooling_until(now), None);
        assert!(!c.clear_auth());
    }

    fn policy(exponential: bool) -> CooldownPolicy {
        CooldownPolicy {
            base: Duration::from_secs(5),
            max: Duration::from_secs(300),
            exponential,
        }
    }

    #[test]
    fn an_upstream_retry_after_is_capped_at_cooldown_max() {
        let c = Cooldown::default();
        let now = Instant::now();
        let p = policy(true);
        let (until, _) = c.on_rate_limited(&p, Some(MAX_RETRY_AFTER), now);
        assert_eq!(until, now + p.max);
        let (until, _) = c.on_rate_limited(&p, Some(Duration::from_secs(2)), now);
        assert_eq!(until, now + Duration::from_secs(2), "a shorter one holds");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = policy(true);
        assert_eq!(p.backoff(1), Duration::from_secs(5));
        assert_eq!(p.backoff(2), Duration::from_secs(10));
        assert_eq!(p.backoff(3), Duration::from_secs(20));
        assert_eq!(p.backoff(7), Duration::from_secs(300));
        assert_eq!(p.backoff(1000), Duration::from_secs(300));
        assert_eq!(policy(false).backoff(9), Duration::from_secs(5));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            parse_retry_after(&h("7"), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after(&h(" 2 "), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after(&h("1.5"), now),
            Some(Duration::from_millis(1500))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let v = HeaderValue::from_str(&date).unwrap();
        assert_eq!(parse_retry_after(&v, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        let v = HeaderValue::from_str(&past).unwrap();
        assert_eq!(parse_retry_after(&v, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(&h("soon"), now), None);
        assert_eq!(parse_retry_after(&h("-3"), now), None);
        assert_eq!(
            parse_retry_after(&h("99999999999"), now),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_429s_back_off_and_success_resets() {
        let c = Cooldown::default();
        let p = policy(true);
        let now = Instant::now();
        let (u1, n1) = c.on_rate_limited(&p, None, now);
        assert_eq!((u1 - now, n1), (Duration::from_secs(5), 1));
        let (u2, n2) = c.on_rate_limited(&p, None, now);
        assert_eq!((u2 - now, n2), (Duration::from_secs(10), 2));
        assert_eq!(c.cooling_until(now), Some(u2));
        assert_eq!(c.cooling_until(u2), None);
        c.on_success();
        let (u3, n3) = c.on_rate_limited(&p, Some(Duration::from_secs(2)), u2);
        assert_eq!((u3 - u2, n3), (Duration::from_secs(2), 1));
    }

    #[tokio::test(start_paused = true)]
    async fn holds_and_quota_exhaustion_cool_without_counting() {
        let c = Cooldown::default();
        let now = Instant::now();
        c.hold(now + Duration::from_secs(3));
        assert_eq!(c.cooling_until(now), Some(now + Duration::from_secs(3)));
        assert_eq!(c.consecutive(), 0);
        assert_eq!(c.quota_exhausted_until(now), None);
        let hour = now + Duration::from_secs(3600);
        c.exhaust(hour);
        assert_eq!(c.cooling_until(now), Some(hour));
        assert_eq!(c.quota_exhausted_until(now), Some(hour));
        c.hold(now + Duration::from_secs(1));
        assert_eq!(c.cooling_until(now), Some(hour));
        assert_eq!(c.quota_exhausted_until(hour), None);
        assert_eq!(c.consecutive(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn remote_cooldowns_keep_the_later_end() {
        let c = Cooldown::default();
        let now = Instant::now();
        c.apply(now + Duration::from_secs(10), 2);
        c.apply(now + Duration::from_secs(5), 1);
        assert_eq!(c.cooling_until(now), Some(now + Duration::from_secs(10)));
        assert_eq!(c.consecutive(), 2);
    }
}

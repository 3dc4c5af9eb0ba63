//! Rate limiters for per-minute limits: backend rpm and tpm (× this proxy's
//! share of the cluster-wide limit), the emergency limiter, client key rpm.
//!
//! **Semantics: GCRA, written as a meter.** A [`RateLimiter`] admits at the
//! rate `r = limit × share ÷ 60 s`. It keeps a *level* `L` ≥ 0: units
//! (requests or tokens) admitted and not yet paid for by the passing of time.
//! `L` drains at `r`. A request of cost `c` *conforms* when `L ≤ S` (the
//! slack, below); it is then admitted and `L += c`. This is the generic cell
//! rate algorithm with its theoretical arrival time `TAT = now + L ÷ r`,
//! kept in units rather than time so that a rate change neither forgives nor
//! invents debt.
//!
//! **The bound.** Take any window of length `T` and the admissions in it,
//! the last one of cost `c_k` at `t_k`. Just before `t_k` the level was at
//! most `S`, and it had grown by every earlier admission of the window and
//! drained by at most `∫ r dt` over the window, so
//!
//! ```text
//! admitted in any window of length T  ≤  S + c_k + ∫ r dt  ≤  burst + r_max · T
//! ```
//!
//! with `burst = S + c_max` and `r_max` the highest rate held during the
//! window. For a backend ([`Burst::Tolerance`]) `S = r × TOLERANCE` (50 ms
//! of the rate), so its rpm limiter admits at most `share × rpm + 1 +
//! r × 50 ms` requests in any trailing minute, where `share` is the highest
//! share it held in that minute — the premise of the control plane's share
//! assignment (`control-plane/src/shares.rs`). Across `N` proxies whose
//! shares sum to at most 1 the upstream sees at most `rpm + N + rpm ÷ 1200`
//! in any minute. The slack only absorbs late wake-ups (a queued request
//! woken a millisecond after its instant does not lose that millisecond of
//! rate), so a greedy client gets the full rate.
//!
//! **Share and limit changes** take effect at once: the level is drained at
//! the old rate up to the change, then drains at the new one. A lowered
//! share keeps the whole debt (old admissions are never forgiven); a raised
//! share drains it faster — more rate, never a lump. An idle limiter has
//! `L = 0` and lets one request (plus the slack) through at once, whatever
//! its history.
//!
//! **Reservations.** The tpm limiter is charged the request's estimated
//! tokens at admission (bounded by the model mapping's `max_tokens` and
//! `context_window`, `route::body::bounded_estimate`), held by an
//! `accounting::Reservation` that refunds them in full when dropped unless
//! the answer settles it — so no failed attempt, timeout or vanished client
//! can leak them. [`RateLimiter::reconcile`] then moves the level by
//! `actual − reserved` (the actual use clamped to a plausible maximum),
//! never below empty, which leaves it at or above the
//! level it would have had if the admission had cost `actual` from the start,
//! so the bound holds for the tokens actually used. A request costlier than
//! the slack is admitted only by an empty limiter and then holds the others
//! back for `c ÷ r`.
//!
//! **Wait answers.** A refusal carries the time until the next conforming
//! instant, `(L − S) ÷ r`, which the queue sleeps for; at a rate of 0
//! nothing conforms (`Duration::MAX`).
//!
//! Each limiter has its own small lock (a few float operations under it), so
//! there is no global lock on the hot path; times are passed in so tests
//! drive them with paused tokio time.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// How late after its conforming instant a request may come and still find
/// the rate it was owed (the slack of backend limiters).
pub(crate) const TOLERANCE: Duration = Duration::from_millis(50);

/// How much a limiter admits back to back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Burst {
    /// Slack `S = r × τ`: pacing at the rate, with late wake-ups forgiven
    /// up to `τ`. Backends (rpm, tpm, emergency): the upstream's limit.
    Tolerance(Duration),
    /// Slack `S = KEY_BURST of a minute's worth − 1`: an idle limiter admits
    /// that many back to back (at least one), then paces. Client keys: a
    /// small allowance a client may spend in one go, small enough that the
    /// fleet admits at most `rpm × (1 + KEY_BURST)` plus one request per
    /// proxy in any minute (the key's rpm is a fleet-wide contract).
    KeyBurst,
}

/// The part of a minute's worth a client key's limiter admits back to back:
/// 5 %, so `rpm 60` admits 3 at once and then one a second, and any window
/// of a minute or more sees at most 5 % over the rpm (plus one request per
/// proxy). A whole minute's worth (the earlier contract) let `2 × rpm`
/// through in the first minute.
pub(crate) const KEY_BURST: f64 = 0.05;

#[derive(Debug)]
struct Inner {
    limit_per_min: f64,
    share: f64,
    burst: Burst,
    /// Units admitted and not yet drained, ≥ 0.
    level: f64,
    /// Time the level was last drained to.
    last: Instant,
}

impl Inner {
    /// Units per second.
    fn rate(&self) -> f64 {
        self.limit_per_min * self.share / 60.0
    }

    fn slack(&self) -> f64 {
        let r = self.rate();
        match self.burst {
            Burst::Tolerance(tau) => r * tau.as_secs_f64(),
            Burst::KeyBurst => (r * 60.0 * KEY_BURST - 1.0).max(0.0),
        }
    }

    fn drain(&mut self, now: Instant) {
        if now > self.last {
            let elapsed = (now - self.last).as_secs_f64();
            self.level = (self.level - elapsed * self.rate()).max(0.0);
            self.last = now;
        }
    }

    fn conforms(&self) -> bool {
        // The epsilon absorbs float rounding at the exact instant a wait
        // answer pointed to.
        self.rate() > 0.0 && self.level <= self.slack() + 1e-9 * (1.0 + self.level)
    }

    fn wait(&self) -> Duration {
        let r = self.rate();
        if r <= 0.0 {
            return Duration::MAX;
        }
        let missing = self.level - self.slack();
        if missing <= 0.0 {
            return Duration::ZERO;
        }
        // Rounded up to the nanosecond: at `now + wait` the request conforms.
        let nanos = (missing / r * 1e9).ceil();
        if nanos >= u64::MAX as f64 {
            Duration::MAX
        } else {
            Duration::from_nanos(nanos as u64)
        }
    }
}

/// A GCRA rate limiter with a per-minute limit × share; see the module docs.
#[derive(Debug)]
pub struct RateLimiter {
    inner: Mutex<Inner>,
}

impl RateLimiter {
    /// An idle limiter admitting `limit_per_min × share` per minute (share 1
    /// until [`RateLimiter::set_share`]).
    pub fn new(limit_per_min: f64, burst: Burst, now: Instant) -> Self {
        RateLimiter {
            inner: Mutex::new(Inner {
                limit_per_min: finite_non_negative(limit_per_min),
                share: 1.0,
                burst,
                level: 0.0,
                last: now,
            }),
        }
    }

    /// A backend limiter (rpm, tpm or emergency): paced, [`TOLERANCE`] slack.
    pub fn backend(limit_per_min: f64, now: Instant) -> Self {
        Self::new(limit_per_min, Burst::Tolerance(TOLERANCE), now)
    }

    /// A client key limiter: [`KEY_BURST`] of a minute back to back (at
    /// least one request), then paced.
    pub fn client(limit_per_min: f64, now: Instant) -> Self {
        Self::new(limit_per_min, Burst::KeyBurst, now)
    }

    /// Admits a request of cost `n` if it conforms now, or tells how long
    /// until the next conforming instant.
    pub fn try_acquire(&self, n: f64, now: Instant) -> Result<(), Duration> {
        let mut g = self.inner.lock();
        g.drain(now);
        if g.conforms() {
            g.level += n.max(0.0);
            Ok(())
        } else {
            Err(g.wait())
        }
    }

    /// How long until a request conforms (zero if one does now).
    pub fn time_until(&self, now: Instant) -> Duration {
        let mut g = self.inner.lock();
        g.drain(now);
        if g.conforms() {
            Duration::ZERO
        } else {
            g.wait()
        }
    }

    /// Takes back an admission of cost `n` (an attempt that never reached
    /// the upstream); never below empty.
    pub fn refund(&self, n: f64) {
        let mut g = self.inner.lock();
        g.level = (g.level - n.max(0.0)).max(0.0);
    }

    /// Charges `n` more (actual use above the reservation), conforming or not.
    pub fn force_take(&self, n: f64) {
        self.inner.lock().level += n.max(0.0);
    }

    /// Reconciles a reservation of `reserved` with the `actual` use: the
    /// level moves by the difference, never below empty.
    pub fn reconcile(&self, reserved: f64, actual: f64) {
        let mut g = self.inner.lock();
        g.level = (g.level + actual - reserved).max(0.0);
    }

    /// Changes the per-minute limit (a new snapshot), keeping the debt.
    pub fn set_limit(&self, limit_per_min: f64, now: Instant) {
        let mut g = self.inner.lock();
        g.drain(now);
        g.limit_per_min = finite_non_negative(limit_per_min);
    }

    /// Sets this proxy's share of the limit, in `[0, 1]`, effective at once
    /// and keeping the debt.
    pub fn set_share(&self, share: f64, now: Instant) {
        let mut g = self.inner.lock();
        g.drain(now);
        g.share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            1.0
        };
    }

    /// The current share.
    pub fn share(&self) -> f64 {
        self.inner.lock().share
    }

    /// Units per minute admitted now (`limit × share`).
    pub fn per_minute(&self) -> f64 {
        let g = self.inner.lock();
        g.limit_per_min * g.share
    }
}

fn finite_non_negative(x: f64) -> f64 {
    if x.is_finite() { x.max(0.0) } else { 0.0 }
}

#[cfg(test)]
mod tests;

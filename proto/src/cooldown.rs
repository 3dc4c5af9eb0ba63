//! The cooldown backoff both planes apply after consecutive 429s.
//!
//! DESIGN.md: a backend that answers 429 is cooled for `base·2^(n-1)` capped
//! at `max` (or a flat `base` when the pool is not exponential), `n` being
//! the number of consecutive 429s. The proxy cools at once with it; the
//! control plane computes the same figure when a proxy reported a 429 without
//! a duration. One function, so the two can never disagree.
//!
//! The cap is `max(max, base)`: validation rejects `max < base`, and should
//! such settings ever reach this function the base still wins, as a flat
//! cooldown would.

use std::time::Duration;

/// The cooldown after the `n`-th consecutive 429 (`n` = 0 counts as 1).
pub fn backoff(base: Duration, max: Duration, exponential: bool, n: u32) -> Duration {
    let cap = max.max(base);
    if !exponential {
        return base;
    }
    let shift = n.max(1) - 1;
    // 2^shift saturates long before u32 overflows: any shift past 31 is
    // already beyond every representable cap worth applying.
    match 1u32.checked_shl(shift).and_then(|f| base.checked_mul(f)) {
        Some(d) => d.min(cap),
        None => cap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn doubles_per_consecutive_429_up_to_the_cap() {
        let got: Vec<_> = (1..=8).map(|n| backoff(S(5), S(300), true, n)).collect();
        assert_eq!(
            got,
            [S(5), S(10), S(20), S(40), S(80), S(160), S(300), S(300)]
        );
    }

    #[test]
    fn zero_counts_as_the_first_429() {
        assert_eq!(backoff(S(5), S(300), true, 0), S(5));
    }

    #[test]
    fn flat_when_not_exponential() {
        assert_eq!(backoff(S(5), S(300), false, 7), S(5));
    }

    #[test]
    fn huge_counts_saturate_at_the_cap() {
        assert_eq!(backoff(S(5), S(300), true, u32::MAX), S(300));
        assert_eq!(
            backoff(Duration::MAX, Duration::MAX, true, 40),
            Duration::MAX
        );
    }

    #[test]
    fn a_cap_below_the_base_never_shortens_the_base() {
        assert_eq!(backoff(S(10), S(3), true, 4), S(10));
        assert_eq!(backoff(S(10), S(3), false, 1), S(10));
    }
}

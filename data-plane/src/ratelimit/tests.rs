//! Unit tests of [`RateLimiter`]: the sliding-window bound under greedy
//! clients (also with shares moving under it, and for a fleet whose shares
//! follow the control plane's reservation rule), utilization, reservations,
//! wait answers.

use super::*;

const MIN: Duration = Duration::from_secs(60);

/// A small deterministic generator (xorshift64*), so runs are repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The most `cost` admitted within any closed window of length `window`
/// ending at an admission, next to the bound `allowed(start, end)` of that
/// window; returns the worst excess over the bound (≤ 0 when it holds).
fn worst_excess(
    admitted: &[(Instant, f64)],
    window: Duration,
    mut allowed: impl FnMut(Instant, Instant) -> f64,
) -> f64 {
    let mut worst = f64::NEG_INFINITY;
    let mut lo = 0;
    let mut sum = 0.0;
    for hi in 0..admitted.len() {
        sum += admitted[hi].1;
        let end = admitted[hi].0;
        while admitted[lo].0 + window < end {
            sum -= admitted[lo].1;
            lo += 1;
        }
        worst = worst.max(sum - allowed(end - window, end));
    }
    worst
}

/// A greedy client: at every tick (`step` plus up to `jitter` of lateness)
/// it sends until refused.
fn greedy(
    l: &RateLimiter,
    start: Instant,
    run: Duration,
    step: Duration,
    jitter: Duration,
    rng: &mut Rng,
    mut each_tick: impl FnMut(Instant),
) -> Vec<(Instant, f64)> {
    let mut out = Vec::new();
    let mut t = start;
    while t < start + run {
        each_tick(t);
        while l.try_acquire(1.0, t).is_ok() {
            out.push((t, 1.0));
        }
        t += step + jitter.mul_f64(rng.unit());
    }
    out
}

#[test]
fn a_greedy_client_gets_the_share_and_never_more_than_share_plus_burst_per_minute() {
    for (rpm, share, step, jitter) in [
        // The acceptance setup: rpm 60 over 4 proxies.
        (
            60.0,
            0.25,
            Duration::from_millis(1),
            Duration::from_millis(1),
        ),
        (
            60.0,
            0.5,
            Duration::from_millis(1),
            Duration::from_millis(1),
        ),
        // A fast backend, with coarse, late ticks: the slack keeps the rate.
        (
            60_000.0,
            0.3,
            Duration::from_millis(1),
            Duration::from_millis(20),
        ),
        (
            7.0,
            1.0,
            Duration::from_millis(10),
            Duration::from_millis(5),
        ),
    ] {
        let start = Instant::now();
        let l = RateLimiter::backend(rpm, start);
        l.set_share(share, start);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let run = 10 * MIN;
        let got = greedy(&l, start, run, step, jitter, &mut rng, |_| {});
        let per_min = rpm * share;
        let burst = 1.0 + per_min / 60.0 * TOLERANCE.as_secs_f64();
        let excess = worst_excess(&got, MIN, |_, _| per_min + burst);
        assert!(excess <= 1e-9, "rpm {rpm} × {share}: {excess} over");
        // The old bucket let 2 × the share through in a minute; now the
        // worst minute is the share and at most one request of burst.
        let peak = worst_excess(&got, MIN, |_, _| 0.0);
        assert!(peak <= (per_min + burst).floor(), "peak minute {peak}");
        let expected = per_min * run.as_secs_f64() / 60.0;
        assert!(
            got.len() as f64 >= 0.95 * expected,
            "rpm {rpm} × {share}: {} of {expected}",
            got.len()
        );
        assert!(got.len() as f64 <= expected + burst);
    }
}

/// Admitted in `[a, b]` at most `S_max + c_max + ∫ r dt` (module docs),
/// whatever the share does meanwhile.
#[test]
fn shares_moving_up_and_down_at_arbitrary_times_keep_the_integral_bound() {
    let rpm = 600.0;
    let start = Instant::now();
    let l = RateLimiter::backend(rpm, start);
    let mut rng = Rng(42);
    // (from, share) steps, decided up front so the bound can integrate them.
    let mut schedule = vec![(start, 1.0)];
    let mut t = start;
    while t < start + 10 * MIN {
        t += Duration::from_millis(50 + rng.below(20_000));
        let share = if rng.below(4) == 0 { 0.0 } else { rng.unit() };
        schedule.push((t, share));
    }
    // The shares as applied (at the client's next tick).
    let mut applied = vec![(start, 1.0)];
    let mut next = 0;
    let got = greedy(
        &l,
        start,
        10 * MIN,
        Duration::from_millis(3),
        Duration::from_millis(7),
        &mut rng,
        |now| {
            while next < schedule.len() && schedule[next].0 <= now {
                l.set_share(schedule[next].1, now);
                applied.push((now, schedule[next].1));
                next += 1;
            }
        },
    );
    // ∫ r dt over [a, b], over the piecewise constant applied shares.
    let integral = |a: Instant, b: Instant| {
        let mut sum = 0.0;
        for (i, &(from, share)) in applied.iter().enumerate() {
            let to = applied.get(i + 1).map_or(b, |n| n.0);
            let (s, e) = (from.max(a), to.min(b));
            if e > s {
                sum += share * rpm / 60.0 * (e - s).as_secs_f64();
            }
        }
        sum
    };
    let slack_max = rpm / 60.0 * TOLERANCE.as_secs_f64();
    let excess = worst_excess(&got, MIN, |a, b| integral(a, b) + slack_max + 1.0);
    assert!(excess <= 1e-6, "{excess} over the bound");
}

#[test]
fn a_lowered_share_lets_no_old_credit_through_and_a_raised_one_grows_the_rate() {
    let now = Instant::now();
    let l = RateLimiter::backend(600.0, now);
    // 10 per second; 5 admitted back to back leave 0.5 s of debt.
    assert!(l.try_acquire(1.0, now).is_ok());
    for _ in 0..4 {
        l.force_take(1.0);
    }
    // Down to a tenth: the 5 units now take 5 s to drain, not 0.5 s.
    l.set_share(0.1, now);
    let wait = l.try_acquire(1.0, now).unwrap_err();
    assert!(wait > Duration::from_millis(4900), "{wait:?}");
    // Idle for a long time under a low share, then raised: no lump, one
    // request (the burst) and then the new rate.
    let later = now + 10 * MIN;
    l.set_share(1.0, later);
    assert!(l.try_acquire(1.0, later).is_ok());
    let wait = l.try_acquire(1.0, later).unwrap_err();
    assert!(
        wait >= Duration::from_millis(50) && wait <= Duration::from_millis(100),
        "{wait:?}"
    );
}

#[test]
fn wait_answers_point_at_the_next_conforming_instant() {
    let now = Instant::now();
    let l = RateLimiter::backend(60.0, now);
    assert_eq!(l.time_until(now), Duration::ZERO);
    assert!(l.try_acquire(1.0, now).is_ok());
    let wait = l.try_acquire(1.0, now).unwrap_err();
    // One per second, 50 ms of tolerance.
    assert_eq!(wait, Duration::from_millis(950));
    assert_eq!(l.time_until(now), wait);
    let almost = now + wait - Duration::from_micros(10);
    assert!(l.try_acquire(1.0, almost).is_err());
    assert!(l.try_acquire(1.0, now + wait).is_ok());
    // Admitted 50 ms early, so the next one is 1 s after that.
    assert_eq!(
        l.try_acquire(1.0, now + wait).unwrap_err(),
        Duration::from_secs(1)
    );
}

#[test]
fn zero_rate_admits_nothing_and_fractional_rates_pace() {
    let now = Instant::now();
    let z = RateLimiter::backend(0.0, now);
    assert_eq!(z.try_acquire(1.0, now), Err(Duration::MAX));
    assert_eq!(z.time_until(now), Duration::MAX);
    let shared_out = RateLimiter::backend(600.0, now);
    shared_out.set_share(0.0, now);
    assert_eq!(shared_out.try_acquire(1.0, now), Err(Duration::MAX));
    // Half a request per minute: one now, the next two minutes later.
    let f = RateLimiter::backend(0.5, now);
    assert!(f.try_acquire(1.0, now).is_ok());
    assert!(f.try_acquire(1.0, now + MIN).is_err());
    assert!(f.try_acquire(1.0, now + 2 * MIN).is_ok());
}

#[test]
fn a_client_limiter_admits_five_percent_of_a_minute_back_to_back_then_paces() {
    let now = Instant::now();
    // rpm 60: 3 at once, then one a second.
    let l = RateLimiter::client(60.0, now);
    for _ in 0..3 {
        assert!(l.try_acquire(1.0, now).is_ok());
    }
    let wait = l.try_acquire(1.0, now).unwrap_err();
    assert_eq!(wait, Duration::from_secs(1));
    assert!(l.try_acquire(1.0, now + wait).is_ok());
    // Any minute of a greedy client: at most 5 % over.
    let g = RateLimiter::client(600.0, now);
    let mut admitted = 0;
    let mut t = now;
    while t < now + MIN {
        while g.try_acquire(1.0, t).is_ok() {
            admitted += 1;
        }
        t += Duration::from_millis(10);
    }
    assert!((600..=630).contains(&admitted), "{admitted}");
    // A low rpm still admits one at once.
    let two = RateLimiter::client(2.0, now);
    assert!(two.try_acquire(1.0, now).is_ok());
    assert_eq!(two.try_acquire(1.0, now), Err(Duration::from_secs(30)));
    let one = RateLimiter::client(1.0, now);
    assert!(one.try_acquire(1.0, now).is_ok());
    assert_eq!(one.try_acquire(1.0, now), Err(MIN));
}

#[test]
fn reservations_reconcile_both_ways_and_never_below_empty() {
    let now = Instant::now();
    // 60,000 tpm: 1,000 tokens per second.
    let l = RateLimiter::backend(60_000.0, now);
    // A reservation bigger than the slack is admitted by an empty limiter.
    assert!(l.try_acquire(4_000.0, now).is_ok());
    assert_eq!(
        l.try_acquire(1.0, now).unwrap_err(),
        Duration::from_millis(3_950)
    );
    // It used 1,000: the level is as if it had cost 1,000.
    l.reconcile(4_000.0, 1_000.0);
    assert_eq!(l.time_until(now), Duration::from_millis(950));
    // Another used 500 more than it reserved.
    l.reconcile(100.0, 600.0);
    assert_eq!(l.time_until(now), Duration::from_millis(1_450));
    // A refund after the debt drained gives no credit.
    let later = now + Duration::from_secs(10);
    assert_eq!(l.time_until(later), Duration::ZERO);
    l.reconcile(4_000.0, 0.0);
    assert!(l.try_acquire(1_000.0, later).is_ok());
    assert_eq!(
        l.try_acquire(1.0, later).unwrap_err(),
        Duration::from_millis(950)
    );
    // A refused tpm reservation gives back its rpm admission.
    let r = RateLimiter::backend(60.0, now);
    assert!(r.try_acquire(1.0, now).is_ok());
    r.refund(1.0);
    r.refund(1.0);
    assert!(r.try_acquire(1.0, now).is_ok());
    assert!(r.try_acquire(1.0, now).is_err());
}

/// Greedy tpm traffic with random reservations, each reconciled with a
/// random actual use a few seconds later: the tokens actually used stay
/// within `share × tpm + slack + largest reservation` in any minute, and
/// most of the rate is used.
#[test]
fn reserved_tokens_reconciled_later_keep_the_bound_on_actual_use() {
    let tpm = 120_000.0;
    let share = 0.4;
    let start = Instant::now();
    let l = RateLimiter::backend(tpm, start);
    l.set_share(share, start);
    let mut rng = Rng(7);
    let mut open: Vec<(Instant, f64, f64)> = Vec::new();
    let mut used: Vec<(Instant, f64)> = Vec::new();
    let mut largest: f64 = 0.0;
    let mut t = start;
    while t < start + 10 * MIN {
        open.retain(|&(done, reserved, actual)| {
            if done <= t {
                l.reconcile(reserved, actual);
                false
            } else {
                true
            }
        });
        loop {
            let reserved = 200.0 + rng.below(3_000) as f64;
            if l.try_acquire(reserved, t).is_err() {
                break;
            }
            let actual = reserved * (0.1 + 0.9 * rng.unit());
            largest = largest.max(reserved);
            used.push((t, actual));
            open.push((
                t + Duration::from_millis(rng.below(5_000)),
                reserved,
                actual,
            ));
        }
        t += Duration::from_millis(5 + rng.below(10));
    }
    let per_min = tpm * share;
    let slack = per_min / 60.0 * TOLERANCE.as_secs_f64();
    let excess = worst_excess(&used, MIN, |_, _| per_min + slack + largest);
    assert!(excess <= 1e-6, "{excess} tokens over");
    let total: f64 = used.iter().map(|u| u.1).sum();
    // Reservations hold back their excess until reconciled (up to 5 s
    // here), so somewhat less than the rate is used.
    assert!(total >= 0.8 * per_min * 10.0, "{total}");
}

/// A fleet of proxies whose shares follow the control plane's rule (a
/// decrease is granted at once, an increase only out of the headroom
/// `1 − Σ max(held, share)`, where `held` is the highest share in the last
/// 62 s, tightened by what the proxy reported using when its reports are
/// fresh), applied up to a second late, under greedy and skewed load: the
/// upstream never sees more than the limit plus each proxy's burst in any
/// minute, and skewed demand still uses most of the limit.
#[test]
fn a_fleet_under_the_control_planes_reservation_rule_holds_the_limit() {
    const N: usize = 4;
    let rpm = 60.0;
    let window = Duration::from_secs(62);
    let margin = Duration::from_secs(1);
    let start = Instant::now();
    let mut rng = Rng(2024);
    let limiters: Vec<RateLimiter> = (0..N).map(|_| RateLimiter::backend(rpm, start)).collect();
    // Control plane state per proxy: grant history, reports (arrival, used).
    let mut grants: Vec<Vec<(Instant, f64)>> = vec![vec![(start, 1.0 / N as f64)]; N];
    let mut reports: Vec<Vec<(Instant, f64)>> = vec![Vec::new(); N];
    let mut last_report: Vec<Option<Instant>> = vec![None; N];
    // In flight to the proxies: (apply at, proxy, share).
    let mut pushes: Vec<(Instant, usize, f64)> = Vec::new();
    for l in &limiters {
        l.set_share(1.0 / N as f64, start);
    }
    let mut admitted: Vec<(Instant, f64)> = Vec::new();
    let mut since_report = [0.0; N];
    // Which proxies are busy, re-drawn now and then (skew: some idle).
    let mut busy = [true; N];
    let max_since = |g: &[(Instant, f64)], from: Instant| {
        let before = g
            .iter()
            .rev()
            .find(|(t, _)| *t <= from)
            .map_or(0.0, |x| x.1);
        g.iter()
            .filter(|(t, _)| *t > from)
            .fold(before, |m, x| m.max(x.1))
    };
    let mut t = start;
    let mut next_tick = start;
    let mut next_skew = start;
    let run = 8 * MIN;
    while t < start + run {
        if t >= next_skew {
            for b in &mut busy {
                *b = rng.below(3) != 0;
            }
            busy[rng.below(N as u64) as usize] = true;
            next_skew = t + Duration::from_millis(30_000 + rng.below(90_000));
        }
        if t >= next_tick {
            next_tick += Duration::from_secs(1);
            // Reports (the reporter's 1 s batches) arrive within 0.5 s.
            for p in 0..N {
                let at = t + Duration::from_millis(rng.below(500));
                reports[p].push((at, since_report[p]));
                last_report[p] = Some(at);
                since_report[p] = 0.0;
            }
            // Targets follow demand (busy proxies), with the floor.
            let wanting = busy.iter().filter(|b| **b).count().max(1) as f64;
            let target: Vec<f64> = busy
                .iter()
                .map(|b| {
                    let idle = N as f64 - wanting;
                    if *b {
                        (1.0 - idle * 0.025) / wanting
                    } else {
                        0.025
                    }
                })
                .collect();
            let from = t.checked_sub(window).unwrap_or(start);
            let held: Vec<f64> = (0..N)
                .map(|p| {
                    let mut h = max_since(&grants[p], from);
                    if let Some(lr) = last_report[p].filter(|lr| *lr <= t) {
                        let used: f64 = reports[p]
                            .iter()
                            .filter(|(at, _)| *at > from && *at <= t)
                            .map(|r| r.1)
                            .sum();
                        h = h.min(used / rpm + max_since(&grants[p], lr - margin));
                    }
                    h
                })
                .collect();
            let current: Vec<f64> = grants
                .iter()
                .map(|g| g.last().map_or(0.0, |x| x.1))
                .collect();
            let mut next: Vec<f64> = (0..N).map(|p| target[p].min(current[p])).collect();
            let taken: f64 = (0..N).map(|p| held[p].max(next[p])).sum();
            let mut headroom = (1.0 - taken).max(0.0);
            for p in 0..N {
                let want = target[p] - next[p];
                // Growing within its own reservation is free.
                let free = (held[p] - next[p]).clamp(0.0, want);
                let extra = (want - free).min(headroom);
                headroom -= extra;
                next[p] += free + extra;
            }
            for p in 0..N {
                if next[p] != current[p] {
                    grants[p].push((t, next[p]));
                    pushes.push((t + Duration::from_millis(rng.below(1_000)), p, next[p]));
                }
            }
            // The invariant the control plane keeps.
            let sum: f64 = (0..N).map(|p| held[p].max(next[p])).sum();
            assert!(sum <= 1.0 + 1e-9, "Σ max(held, share) = {sum}");
        }
        pushes.sort_by_key(|x| x.0);
        while pushes.first().is_some_and(|x| x.0 <= t) {
            let (_, p, share) = pushes.remove(0);
            limiters[p].set_share(share, t);
        }
        for p in 0..N {
            // A busy proxy is greedy; an idle one sends now and then.
            let tries = if busy[p] {
                100
            } else {
                usize::from(rng.below(2_000) == 0)
            };
            for _ in 0..tries {
                if limiters[p].try_acquire(1.0, t).is_err() {
                    break;
                }
                admitted.push((t, 1.0));
                since_report[p] += 1.0;
            }
        }
        t += Duration::from_millis(2 + rng.below(8));
    }
    let bursts = N as f64 * (1.0 + rpm / 60.0 * TOLERANCE.as_secs_f64());
    let excess = worst_excess(&admitted, MIN, |_, _| rpm + bursts);
    assert!(excess <= 1e-9, "{excess} over the limit plus bursts");
    let peak = worst_excess(&admitted, MIN, |_, _| 0.0);
    assert!(peak <= rpm + N as f64, "peak minute {peak}");
    let minutes = run.as_secs_f64() / 60.0;
    // Busy and idle proxies swap every 30-120 s here, and a proxy gone
    // idle keeps what it used reserved for up to a minute: a coarse floor.
    assert!(
        admitted.len() as f64 >= 0.7 * rpm * minutes,
        "{} of {}",
        admitted.len(),
        rpm * minutes
    );
}

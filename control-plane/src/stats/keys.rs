//! The layout of usage bucket keys.
//!
//! Keys are **time-major**: a big-endian bucket start (unix ms) first, so a
//! time range is one ordered range scan and pruning deletes a prefix of the
//! tree. The dimensions follow, each length-prefixed (so any byte may
//! appear in a name):
//!
//! - hourly: `hour | backend | model | client key | agent [| run kind]`
//! - daily: `day | pool | backend | model | client key | agent [| run kind]`
//!
//! The run kind is written only for heartbeat runs: an interactive bucket's
//! key is exactly the key every bucket had before run kinds existed, so
//! buckets stored before are read as interactive, new interactive usage
//! adds to them, and nothing on disk is rewritten. A key with a trailing
//! run kind field is a heartbeat bucket.
//!
//! One bucket per combination of every dimension is the finest grain any
//! filter asks for, so a filter on several dimensions at once (a key *and* a
//! backend) is exact. The per-dimension views the issue names (per backend
//! and model, per client key, per agent, per pool) are sums over it; the
//! number of combinations seen in an hour stays small in practice (an agent
//! talks through one key to one model on a few backends).

/// One hour, in milliseconds.
pub(crate) const HOUR_MS: i64 = 3_600_000;
/// One day, in milliseconds.
pub(crate) const DAY_MS: i64 = 24 * HOUR_MS;

/// What a usage bucket is about (empty strings where unknown).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub(crate) struct Dims {
    /// Backend id that answered.
    pub backend: String,
    /// Canonical model.
    pub model: String,
    /// Client key id.
    pub client_key: String,
    /// Agent id.
    pub agent: String,
    /// [`HEARTBEAT`] for heartbeat runs, empty for interactive traffic
    /// (see [`run_kind`]).
    pub run_kind: String,
}

/// The run kind of heartbeat buckets.
pub(crate) const HEARTBEAT: &str = "heartbeat";

/// The run kind a proxy reported, as stored: [`HEARTBEAT`] or empty
/// (interactive). Anything else is interactive, as the proxies treat it.
pub(crate) fn run_kind(reported: &str) -> String {
    if reported.trim().eq_ignore_ascii_case(HEARTBEAT) {
        HEARTBEAT.to_string()
    } else {
        String::new()
    }
}

/// Start of the hour holding `ms`.
pub(crate) fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// Start of the UTC day holding `ms`.
pub(crate) fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS) * DAY_MS
}

/// The key prefix of every bucket starting at `start_ms` (clamped at the
/// epoch: the order of the bytes is the order of the times).
pub(crate) fn time_prefix(start_ms: i64) -> [u8; 8] {
    (start_ms.max(0) as u64).to_be_bytes()
}

fn push_field(key: &mut Vec<u8>, field: &str) {
    // Names longer than 64 KiB are cut: they are ids and model names.
    let bytes = &field.as_bytes()[..field.len().min(u16::MAX as usize)];
    key.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    key.extend_from_slice(bytes);
}

fn take_field(rest: &mut &[u8]) -> Option<String> {
    let (len, tail) = rest.split_first_chunk::<2>()?;
    let len = u16::from_be_bytes(*len) as usize;
    let field = tail.get(..len)?;
    *rest = &tail[len..];
    Some(String::from_utf8_lossy(field).into_owned())
}

fn push_dims(key: &mut Vec<u8>, d: &Dims) {
    push_field(key, &d.backend);
    push_field(key, &d.model);
    push_field(key, &d.client_key);
    push_field(key, &d.agent);
    // Absent for interactive buckets: the layout before run kinds.
    if !d.run_kind.is_empty() {
        push_field(key, &d.run_kind);
    }
}

/// The dimensions, up to the end of the key: a key that ends after the
/// agent is interactive (the layout before run kinds); one more field is
/// the run kind, which is never empty.
fn take_dims(rest: &mut &[u8]) -> Option<Dims> {
    let mut d = Dims {
        backend: take_field(rest)?,
        model: take_field(rest)?,
        client_key: take_field(rest)?,
        agent: take_field(rest)?,
        run_kind: String::new(),
    };
    if !rest.is_empty() {
        d.run_kind = take_field(rest).filter(|k| !k.is_empty())?;
    }
    Some(d)
}

fn take_time(rest: &mut &[u8]) -> Option<i64> {
    let (t, tail) = rest.split_first_chunk::<8>()?;
    *rest = tail;
    i64::try_from(u64::from_be_bytes(*t)).ok()
}

/// Key of the hourly bucket starting at `hour_ms`.
pub(crate) fn hourly(hour_ms: i64, d: &Dims) -> Vec<u8> {
    let mut k = time_prefix(hour_ms).to_vec();
    push_dims(&mut k, d);
    k
}

/// Key of the daily bucket of `pool` starting at `day_ms`.
pub(crate) fn daily(day_ms: i64, pool: &str, d: &Dims) -> Vec<u8> {
    let mut k = time_prefix(day_ms).to_vec();
    push_field(&mut k, pool);
    push_dims(&mut k, d);
    k
}

/// Splits an hourly key (`None` when malformed).
pub(crate) fn parse_hourly(mut key: &[u8]) -> Option<(i64, Dims)> {
    let t = take_time(&mut key)?;
    let d = take_dims(&mut key)?;
    key.is_empty().then_some((t, d))
}

/// Splits a daily key (`None` when malformed).
pub(crate) fn parse_daily(mut key: &[u8]) -> Option<(i64, String, Dims)> {
    let t = take_time(&mut key)?;
    let pool = take_field(&mut key)?;
    let d = take_dims(&mut key)?;
    key.is_empty().then_some((t, pool, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> Dims {
        Dims {
            backend: "be_1".into(),
            model: "gpt\0-4o".into(),
            client_key: "ck_1".into(),
            agent: String::new(),
            run_kind: String::new(),
        }
    }

    fn heartbeat() -> Dims {
        Dims {
            agent: "ag_1".into(),
            run_kind: HEARTBEAT.into(),
            ..dims()
        }
    }

    /// A key as written before run kinds existed (no trailing field).
    fn old_hourly(hour_ms: i64, d: &Dims) -> Vec<u8> {
        let mut k = time_prefix(hour_ms).to_vec();
        for f in [&d.backend, &d.model, &d.client_key, &d.agent] {
            k.extend_from_slice(&(f.len() as u16).to_be_bytes());
            k.extend_from_slice(f.as_bytes());
        }
        k
    }

    #[test]
    fn interactive_keys_are_the_keys_stored_before_run_kinds() {
        let old = old_hourly(5 * HOUR_MS, &dims());
        assert_eq!(hourly(5 * HOUR_MS, &dims()), old, "no rewrite needed");
        assert_eq!(parse_hourly(&old), Some((5 * HOUR_MS, dims())));
        let mut old_daily = time_prefix(DAY_MS).to_vec();
        push_field(&mut old_daily, "primary");
        old_daily.extend_from_slice(&old[8..]);
        assert_eq!(daily(DAY_MS, "primary", &dims()), old_daily);
        assert_eq!(
            parse_daily(&old_daily).map(|(_, _, d)| d.run_kind),
            Some(String::new())
        );
    }

    #[test]
    fn heartbeat_keys_carry_the_run_kind_and_round_trip() {
        let h = hourly(5 * HOUR_MS, &heartbeat());
        assert_eq!(parse_hourly(&h), Some((5 * HOUR_MS, heartbeat())));
        assert_ne!(
            h,
            hourly(
                5 * HOUR_MS,
                &Dims {
                    run_kind: String::new(),
                    ..heartbeat()
                }
            )
        );
        let d = daily(DAY_MS, "fallback", &heartbeat());
        assert_eq!(
            parse_daily(&d),
            Some((DAY_MS, "fallback".to_string(), heartbeat()))
        );
        // Same hour and dimensions: both kinds fall inside the hour's scan.
        assert!(h < hourly(6 * HOUR_MS, &Dims::default()));
        // Malformed: a cut run kind, an empty one, or bytes after it.
        assert!(parse_hourly(&h[..h.len() - 1]).is_none());
        let mut empty = hourly(5 * HOUR_MS, &dims());
        empty.extend_from_slice(&[0, 0]);
        assert!(parse_hourly(&empty).is_none());
        let mut extra = h.clone();
        extra.push(0);
        assert!(parse_hourly(&extra).is_none());
    }

    #[test]
    fn reported_run_kinds_are_heartbeat_or_interactive() {
        assert_eq!(run_kind("heartbeat"), HEARTBEAT);
        assert_eq!(run_kind("Heartbeat"), HEARTBEAT);
        assert_eq!(run_kind(""), "");
        assert_eq!(run_kind("interactive"), "");
        assert_eq!(run_kind("cron"), "");
    }

    #[test]
    fn keys_round_trip_and_sort_by_time() {
        let h = hourly(7 * HOUR_MS, &dims());
        assert_eq!(parse_hourly(&h), Some((7 * HOUR_MS, dims())));
        let d = daily(3 * DAY_MS, "primary", &dims());
        assert_eq!(
            parse_daily(&d),
            Some((3 * DAY_MS, "primary".to_string(), dims()))
        );
        assert!(hourly(HOUR_MS, &dims()) < hourly(2 * HOUR_MS, &Dims::default()));
        assert!(parse_hourly(&h[..h.len() - 1]).is_none());
    }

    #[test]
    fn buckets_start_on_the_hour_and_the_utc_day() {
        assert_eq!(hour_of(HOUR_MS + 5), HOUR_MS);
        assert_eq!(day_of(DAY_MS * 2 + HOUR_MS * 23), DAY_MS * 2);
        assert_eq!(hour_of(-1), -HOUR_MS);
    }
}

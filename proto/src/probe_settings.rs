//! A backend's probe settings (`Backend.probe`): the built-in defaults,
//! the accepted bounds and their validation, shared by the control plane
//! (which enforces them) and `clawctl` (which checks flags and documents
//! before sending anything).
//!
//! A field left at 0 means "the control plane's default" (its
//! `--probe-interval`, `--probe-timeout`, `--probe-failures`, built-in
//! 60 s / 10 s / 3); settings that are all default are stored as absent.

use crate::v1::ProbeSettings;
use crate::validate::FieldError;

/// Built-in time between probes.
pub const DEFAULT_INTERVAL_MS: u64 = 60_000;
/// Built-in probe timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Built-in number of failed probes in a row that make a backend unhealthy.
pub const DEFAULT_FAILURES: u32 = 3;

/// Shortest accepted interval: 1 s.
pub const MIN_INTERVAL_MS: u64 = 1_000;
/// Longest accepted interval: 24 h.
pub const MAX_INTERVAL_MS: u64 = 24 * 3600 * 1000;
/// Shortest accepted timeout: 100 ms.
pub const MIN_TIMEOUT_MS: u64 = 100;
/// Longest accepted timeout: 300 s.
pub const MAX_TIMEOUT_MS: u64 = 300_000;
/// Largest accepted failure threshold.
pub const MAX_FAILURES: u32 = 100;

/// Whether every field is the default (nothing worth storing).
pub fn is_default(p: &ProbeSettings) -> bool {
    *p == ProbeSettings::default()
}

/// Drops settings that are all default, so "absent" and "all default" are
/// one stored state (and an update between them changes nothing).
pub fn normalize(probe: &mut Option<ProbeSettings>) {
    if probe.as_ref().is_some_and(is_default) {
        *probe = None;
    }
}

/// Checks the bounds: interval 1 s..24 h, timeout 100 ms..300 s and shorter
/// than the interval (when both are given), failures 1..100; 0 is the
/// default for each. Errors name `probe.interval_ms`, `probe.timeout_ms` or
/// `probe.failures`.
pub fn validate(p: &ProbeSettings) -> Result<(), FieldError> {
    if p.interval_ms != 0 && !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&p.interval_ms) {
        return Err(FieldError::new(
            "probe.interval_ms",
            format!(
                "{} ms is out of range; must be between 1s and 24h (0 = the default)",
                p.interval_ms
            ),
        ));
    }
    if p.timeout_ms != 0 && !(MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&p.timeout_ms) {
        return Err(FieldError::new(
            "probe.timeout_ms",
            format!(
                "{} ms is out of range; must be between 100ms and 300s (0 = the default)",
                p.timeout_ms
            ),
        ));
    }
    if p.interval_ms != 0 && p.timeout_ms != 0 && p.timeout_ms >= p.interval_ms {
        return Err(FieldError::new(
            "probe.timeout_ms",
            format!(
                "{} ms must be shorter than the interval ({} ms)",
                p.timeout_ms, p.interval_ms
            ),
        ));
    }
    if p.failures > MAX_FAILURES {
        return Err(FieldError::new(
            "probe.failures",
            format!(
                "{} is out of range; must be between 1 and {MAX_FAILURES} (0 = the default)",
                p.failures
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(interval_ms: u64, timeout_ms: u64, failures: u32) -> ProbeSettings {
        ProbeSettings {
            interval_ms,
            timeout_ms,
            failures,
            disabled: false,
        }
    }

    fn field(p: ProbeSettings) -> Option<String> {
        validate(&p).err().map(|e| e.field)
    }

    #[test]
    fn bounds_are_inclusive_and_zero_is_the_default() {
        assert_eq!(field(probe(0, 0, 0)), None);
        assert_eq!(field(probe(1_000, 100, 1)), None);
        assert_eq!(
            field(probe(MAX_INTERVAL_MS, MAX_TIMEOUT_MS, MAX_FAILURES)),
            None
        );
        assert_eq!(
            field(probe(999, 0, 0)).as_deref(),
            Some("probe.interval_ms")
        );
        assert_eq!(
            field(probe(MAX_INTERVAL_MS + 1, 0, 0)).as_deref(),
            Some("probe.interval_ms")
        );
        assert_eq!(field(probe(0, 99, 0)).as_deref(), Some("probe.timeout_ms"));
        assert_eq!(
            field(probe(0, 300_001, 0)).as_deref(),
            Some("probe.timeout_ms")
        );
        assert_eq!(field(probe(0, 0, 101)).as_deref(), Some("probe.failures"));
    }

    #[test]
    fn the_timeout_must_be_shorter_than_a_given_interval() {
        assert_eq!(
            field(probe(5_000, 5_000, 0)).as_deref(),
            Some("probe.timeout_ms")
        );
        assert_eq!(field(probe(5_000, 4_999, 0)), None);
        // Against a default it is the prober's to cap (the default is a flag).
        assert_eq!(field(probe(0, 200_000, 0)), None);
    }

    #[test]
    fn all_default_settings_normalize_to_absent() {
        let mut p = Some(ProbeSettings::default());
        normalize(&mut p);
        assert_eq!(p, None);
        let mut p = Some(ProbeSettings {
            disabled: true,
            ..Default::default()
        });
        normalize(&mut p);
        assert!(p.is_some());
    }
}

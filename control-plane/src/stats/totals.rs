//! Arithmetic on [`UsageTotals`], the value of every usage bucket (stored
//! protobuf-encoded, so new counters can be added later).

use claw_proto::v1::{UsageEvent, UsageTotals};

/// The totals of one usage event.
pub(crate) fn of_event(e: &UsageEvent) -> UsageTotals {
    UsageTotals {
        requests: 1,
        errors: u64::from(e.status >= 400),
        prompt_tokens: e.prompt_tokens,
        completion_tokens: e.completion_tokens,
        cache_read_tokens: e.cache_read_tokens,
        cache_write_tokens: e.cache_write_tokens,
        total_tokens: e.prompt_tokens.saturating_add(e.completion_tokens),
        cost: if e.cost.is_finite() { e.cost } else { 0.0 },
        streamed: u64::from(e.streamed),
        latency_ms_sum: e.latency_ms,
        translated: 0,
    }
}

/// A proxy's sums as stored: a cost that is not a finite number counts as 0
/// (as in [`of_event`]), so one bad row cannot poison a bucket.
pub(crate) fn sanitized(t: &UsageTotals) -> UsageTotals {
    UsageTotals {
        cost: if t.cost.is_finite() { t.cost } else { 0.0 },
        ..*t
    }
}

/// Decodes a stored bucket; a corrupt one counts as empty (and is logged)
/// rather than failing every query that touches it.
pub(crate) fn decode(raw: &[u8]) -> UsageTotals {
    use prost::Message as _;
    UsageTotals::decode(raw).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "corrupt usage bucket ignored");
        UsageTotals::default()
    })
}

/// Encodes a bucket.
pub(crate) fn encode(t: &UsageTotals) -> Vec<u8> {
    use prost::Message as _;
    t.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_add_up() {
        let e = UsageEvent {
            prompt_tokens: 10,
            completion_tokens: 5,
            cache_read_tokens: 2,
            cost: 0.5,
            status: 429,
            streamed: true,
            latency_ms: 30,
            ..Default::default()
        };
        let mut t = of_event(&e);
        t += &of_event(&UsageEvent::default());
        assert_eq!(t.requests, 2);
        assert_eq!(t.errors, 1);
        assert_eq!(t.total_tokens, 15);
        assert_eq!(t.streamed, 1);
        assert_eq!(decode(&encode(&t)), t);
    }
}

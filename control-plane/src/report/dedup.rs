//! Idempotency of the report stream: which batches of a proxy process were
//! stored.
//!
//! Batches are identified by `(node_id, stream_epoch, seq)`, with `seq`
//! counting from 1 per epoch (a proxy process). Instead of one key per
//! batch, the `report_batches` tree keeps one record per
//! `(node_id, stream_epoch)`: the highest sequence number below which
//! every batch was stored (`contiguous`), the few stored above it
//! (`above`, out of order), and when it was last used. The record is
//! rewritten in the same transaction as the batch's effects, so a batch is
//! either stored with its record or not at all, and a resent batch is
//! recognised after any restart.
//!
//! Gaps: a proxy whose buffer overflowed never sends the batches it dropped,
//! leaving a permanent gap below `above`. Once more than [`MAX_ABOVE`]
//! batches wait above a gap, the gap is declared lost and `contiguous`
//! jumps over it (a batch that arrives later still would be ignored: by
//! then it is hundreds of batches stale, far beyond any proxy's buffer).

use std::collections::BTreeSet;

/// Most out-of-order batches remembered above a gap.
pub(crate) const MAX_ABOVE: usize = 256;

#[derive(Clone, PartialEq, prost::Message)]
struct SeenRecord {
    #[prost(uint64, tag = "1")]
    contiguous: u64,
    #[prost(uint64, repeated, tag = "2")]
    above: Vec<u64>,
    #[prost(int64, tag = "3")]
    last_used_ms: i64,
}

/// The key of a proxy process's record.
pub(crate) fn key(node_id: &str, stream_epoch: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(node_id.len() + stream_epoch.len() + 1);
    k.extend_from_slice(node_id.as_bytes());
    k.push(0);
    k.extend_from_slice(stream_epoch.as_bytes());
    k
}

/// The batches of one proxy process that were stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    contiguous: u64,
    above: BTreeSet<u64>,
    last_used_ms: i64,
}

impl Seen {
    /// Decodes a stored record (a corrupt one reads as empty: better to
    /// count a resent batch twice than to drop every later one).
    pub(crate) fn decode(raw: Option<&[u8]>) -> Seen {
        use prost::Message as _;
        let Some(raw) = raw else {
            return Seen::default();
        };
        match SeenRecord::decode(raw) {
            Ok(r) => Seen {
                contiguous: r.contiguous,
                above: r.above.into_iter().collect(),
                last_used_ms: r.last_used_ms,
            },
            Err(e) => {
                tracing::error!(error = %e, "corrupt report batch record; starting afresh");
                Seen::default()
            }
        }
    }

    /// Encodes the record.
    pub(crate) fn encode(&self) -> Vec<u8> {
        use prost::Message as _;
        SeenRecord {
            contiguous: self.contiguous,
            above: self.above.iter().copied().collect(),
            last_used_ms: self.last_used_ms,
        }
        .encode_to_vec()
    }

    /// Whether batch `seq` was stored.
    pub(crate) fn contains(&self, seq: u64) -> bool {
        seq <= self.contiguous || self.above.contains(&seq)
    }

    /// Records batch `seq` as stored at `now_ms`.
    pub(crate) fn insert(&mut self, seq: u64, now_ms: i64) {
        self.last_used_ms = now_ms;
        if seq <= self.contiguous {
            return;
        }
        self.above.insert(seq);
        if self.above.len() > MAX_ABOVE
            && let Some(&lowest) = self.above.first()
        {
            // The gap below `lowest` is lost for good.
            self.contiguous = lowest - 1;
        }
        while self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
    }
}

/// When a stored record was last used (unix ms), for pruning.
pub(crate) fn last_used_ms(raw: &[u8]) -> i64 {
    Seen::decode(Some(raw)).last_used_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_seen_in_and_out_of_order() {
        let mut s = Seen::default();
        assert!(!s.contains(1));
        s.insert(1, 5);
        s.insert(3, 6);
        assert!(s.contains(1) && !s.contains(2) && s.contains(3));
        s.insert(2, 7);
        assert_eq!(s.contiguous, 3);
        assert!(s.above.is_empty());
        let back = Seen::decode(Some(&s.encode()));
        assert_eq!(back, s);
        assert_eq!(last_used_ms(&s.encode()), 7);
    }

    #[test]
    fn a_permanent_gap_is_closed_once_too_many_batches_wait_above_it() {
        let mut s = Seen::default();
        s.insert(1, 0);
        // Batches 2..=10 were dropped by the proxy.
        for seq in 11..(11 + MAX_ABOVE as u64) {
            s.insert(seq, 0);
        }
        assert_eq!(s.contiguous, 1);
        s.insert(11 + MAX_ABOVE as u64, 0);
        assert_eq!(s.contiguous, 11 + MAX_ABOVE as u64);
        assert!(s.above.is_empty());
        assert!(s.contains(5), "a batch from the lost gap counts as seen");
    }
}

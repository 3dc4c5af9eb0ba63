//! The resend buffer: batches cut but not acknowledged yet.
//!
//! Each batch is numbered when it is cut (`seq` from 1) and stays until an
//! ACK's `acked_seq` releases every batch up to it. After a reconnect every
//! unacknowledged batch is resent, in order ([`ReportBuffer::rewind`]); an
//! acknowledged batch is never resent. The buffer holds at most
//! `max_buffered_events` events (a usage bucket counts as one): when a new
//! batch would not fit, the oldest batches are dropped whole, and the
//! cumulative count rides on every later batch as `dropped_events`, so the
//! control plane knows what it never got.

use std::collections::VecDeque;

use claw_proto::v1::StreamReportsRequest;

struct Buffered {
    seq: u64,
    events: usize,
    msg: StreamReportsRequest,
}

/// Batches cut but not acknowledged yet, oldest first.
pub(crate) struct ReportBuffer {
    batches: VecDeque<Buffered>,
    events: usize,
    max_events: usize,
    next_seq: u64,
    /// Highest seq handed to the current stream (0 after a reconnect).
    sent_upto: u64,
    dropped: u64,
}

impl ReportBuffer {
    /// A buffer holding at most `max_events` events.
    pub(crate) fn new(max_events: usize) -> Self {
        ReportBuffer {
            batches: VecDeque::new(),
            events: 0,
            max_events: max_events.max(1),
            next_seq: 1,
            sent_upto: 0,
            dropped: 0,
        }
    }

    /// Numbers `msg` (`events` events) and keeps it; drops the oldest
    /// batches first when it would not fit. Returns the events dropped.
    pub(crate) fn push(&mut self, mut msg: StreamReportsRequest, events: usize) -> u64 {
        let mut dropped = 0;
        while self.events + events > self.max_events
            && let Some(old) = self.batches.pop_front()
        {
            self.events -= old.events;
            dropped += old.events as u64;
        }
        self.dropped += dropped;
        msg.seq = self.next_seq;
        msg.dropped_events = self.dropped;
        self.next_seq += 1;
        self.events += events;
        self.batches.push_back(Buffered {
            seq: msg.seq,
            events,
            msg,
        });
        dropped
    }

    /// Releases every batch up to `acked_seq`; returns how many.
    pub(crate) fn ack(&mut self, acked_seq: u64) -> usize {
        let mut n = 0;
        while self.batches.front().is_some_and(|b| b.seq <= acked_seq) {
            if let Some(b) = self.batches.pop_front() {
                self.events -= b.events;
                n += 1;
            }
        }
        n
    }

    /// True when a batch was not handed to the current stream yet.
    pub(crate) fn has_unsent(&self) -> bool {
        self.batches.back().is_some_and(|b| b.seq > self.sent_upto)
    }

    /// The next batch to hand to the current stream, in order.
    pub(crate) fn next_to_send(&mut self) -> Option<StreamReportsRequest> {
        let b = self.batches.iter().find(|b| b.seq > self.sent_upto)?;
        self.sent_upto = b.seq;
        Some(b.msg.clone())
    }

    /// A new stream: everything unacknowledged is sent again.
    pub(crate) fn rewind(&mut self) {
        self.sent_upto = 0;
    }

    /// Events held.
    pub(crate) fn events(&self) -> usize {
        self.events
    }

    /// Events dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Batches held.
    pub(crate) fn len(&self) -> usize {
        self.batches.len()
    }

    /// True when nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> StreamReportsRequest {
        StreamReportsRequest::default()
    }

    #[test]
    fn numbers_from_one_and_resends_unacked_in_order_after_a_reconnect() {
        let mut b = ReportBuffer::new(100);
        for _ in 0..4 {
            b.push(batch(), 5);
        }
        let sent: Vec<u64> = std::iter::from_fn(|| b.next_to_send().map(|m| m.seq)).collect();
        assert_eq!(sent, vec![1, 2, 3, 4]);
        assert!(!b.has_unsent());
        assert_eq!(b.ack(2), 2);
        assert_eq!(b.events(), 10);
        b.rewind();
        let resent: Vec<u64> = std::iter::from_fn(|| b.next_to_send().map(|m| m.seq)).collect();
        assert_eq!(resent, vec![3, 4], "acked batches are never resent");
        // A late or repeated ACK is harmless.
        assert_eq!(b.ack(1), 0);
        assert_eq!(b.ack(4), 2);
        assert!(b.is_empty());
        b.push(batch(), 1);
        assert_eq!(b.next_to_send().map(|m| m.seq), Some(5));
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts_cumulatively() {
        let mut b = ReportBuffer::new(10);
        assert_eq!(b.push(batch(), 4), 0);
        assert_eq!(b.push(batch(), 4), 0);
        assert_eq!(b.push(batch(), 4), 4, "batch 1 goes");
        assert_eq!(b.events(), 8);
        assert_eq!(b.push(batch(), 7), 8, "batches 2 and 3 go");
        let left: Vec<(u64, u64)> =
            std::iter::from_fn(|| b.next_to_send().map(|m| (m.seq, m.dropped_events))).collect();
        assert_eq!(left, vec![(4, 12)]);
        assert_eq!(b.dropped(), 12);
        assert_eq!(b.events(), 7);
    }
}

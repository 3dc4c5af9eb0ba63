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
//!
//! **Batches of an earlier process** (replayed from the usage journal,
//! [`super::journal`]) keep their own `(node, epoch, seq)` and go first on
//! every stream, before this process's batches. The control plane answers
//! every batch of a stream in order, so the ACK of a replayed batch is the
//! first ACK after it was sent; this process's batches are released by
//! `acked_seq` as before.

use std::collections::VecDeque;

use claw_proto::v1::StreamReportsRequest;

struct Buffered {
    seq: u64,
    events: usize,
    msg: StreamReportsRequest,
}

/// Batches cut but not acknowledged yet, oldest first.
pub(crate) struct ReportBuffer {
    /// Replayed batches of earlier processes, in their journal order.
    earlier: VecDeque<Buffered>,
    /// Of `earlier`, how many the current stream was handed.
    earlier_sent: usize,
    /// `(epoch, seq)` of the replayed batches sent on the current stream
    /// and not acknowledged yet, in send (= ACK) order.
    earlier_in_flight: VecDeque<(String, u64)>,
    batches: VecDeque<Buffered>,
    events: usize,
    max_events: usize,
    next_seq: u64,
    /// Highest seq handed to the current stream (0 after a reconnect).
    sent_upto: u64,
    dropped: u64,
    /// `(epoch, seq)` of batches acknowledged or dropped since the last
    /// [`ReportBuffer::take_released`], for the journal: everything of that
    /// epoch up to seq is gone.
    released: Vec<(String, u64)>,
}

impl ReportBuffer {
    /// A buffer holding at most `max_events` events.
    pub(crate) fn new(max_events: usize) -> Self {
        ReportBuffer {
            earlier: VecDeque::new(),
            earlier_sent: 0,
            earlier_in_flight: VecDeque::new(),
            batches: VecDeque::new(),
            events: 0,
            max_events: max_events.max(1),
            next_seq: 1,
            sent_upto: 0,
            dropped: 0,
            released: Vec::new(),
        }
    }

    /// Takes batches recovered from the journal: those of `epoch` (this
    /// process's, already numbered) continue its numbering; the others are
    /// replayed under their own identity, first.
    pub(crate) fn resume(&mut self, epoch: &str, recovered: Vec<(StreamReportsRequest, usize)>) {
        for (msg, events) in recovered {
            let b = Buffered {
                seq: msg.seq,
                events,
                msg,
            };
            self.events += events;
            if b.msg.stream_epoch == epoch {
                self.next_seq = self.next_seq.max(b.seq + 1);
                self.batches.push_back(b);
            } else {
                self.earlier.push_back(b);
            }
        }
    }

    /// The `(epoch, seq)` released since the last call (see `released`).
    pub(crate) fn take_released(&mut self) -> Vec<(String, u64)> {
        std::mem::take(&mut self.released)
    }

    /// Drops the oldest batch (a replayed one first); returns its events.
    pub(crate) fn drop_oldest(&mut self) -> Option<usize> {
        let old = match self.earlier.pop_front() {
            Some(b) => {
                self.earlier_sent = self.earlier_sent.saturating_sub(1);
                b
            }
            None => self.batches.pop_front()?,
        };
        self.events -= old.events;
        self.dropped += old.events as u64;
        self.released.push((old.msg.stream_epoch.clone(), old.seq));
        Some(old.events)
    }

    /// The batch pushed last (this process's newest).
    pub(crate) fn newest(&self) -> Option<(&StreamReportsRequest, usize)> {
        self.batches.back().map(|b| (&b.msg, b.events))
    }

    /// Every batch held, replayed ones first (for rewriting the journal).
    pub(crate) fn held(&self) -> impl Iterator<Item = (&StreamReportsRequest, usize)> {
        self.earlier
            .iter()
            .chain(self.batches.iter())
            .map(|b| (&b.msg, b.events))
    }

    /// Numbers `msg` (`events` events) and keeps it; drops the oldest
    /// batches first when it would not fit. Returns the events dropped.
    pub(crate) fn push(&mut self, mut msg: StreamReportsRequest, events: usize) -> u64 {
        let mut dropped = 0;
        while self.events + events > self.max_events
            && let Some(n) = self.drop_oldest()
        {
            dropped += n as u64;
        }
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
    /// (Or the replayed batch this ACK answers.)
    pub(crate) fn ack(&mut self, acked_seq: u64) -> usize {
        if self
            .earlier_in_flight
            .front()
            .is_some_and(|(_, seq)| *seq == acked_seq)
        {
            let Some((epoch, seq)) = self.earlier_in_flight.pop_front() else {
                return 0;
            };
            let front = self.earlier.front();
            if front.is_some_and(|b| b.seq == seq && b.msg.stream_epoch == epoch)
                && let Some(b) = self.earlier.pop_front()
            {
                self.earlier_sent = self.earlier_sent.saturating_sub(1);
                self.events -= b.events;
                self.released.push((epoch, seq));
                return 1;
            }
            // Dropped while in flight: already released.
            return 0;
        }
        let mut n = 0;
        while self.batches.front().is_some_and(|b| b.seq <= acked_seq) {
            if let Some(b) = self.batches.pop_front() {
                self.events -= b.events;
                self.released.push((b.msg.stream_epoch.clone(), b.seq));
                n += 1;
            }
        }
        n
    }

    /// True when a batch was not handed to the current stream yet.
    pub(crate) fn has_unsent(&self) -> bool {
        self.earlier_sent < self.earlier.len()
            || self.batches.back().is_some_and(|b| b.seq > self.sent_upto)
    }

    /// The next batch to hand to the current stream, in order (replayed
    /// batches first).
    pub(crate) fn next_to_send(&mut self) -> Option<StreamReportsRequest> {
        if let Some(b) = self.earlier.get(self.earlier_sent) {
            self.earlier_sent += 1;
            self.earlier_in_flight
                .push_back((b.msg.stream_epoch.clone(), b.seq));
            return Some(b.msg.clone());
        }
        let b = self.batches.iter().find(|b| b.seq > self.sent_upto)?;
        self.sent_upto = b.seq;
        Some(b.msg.clone())
    }

    /// A new stream: everything unacknowledged is sent again.
    pub(crate) fn rewind(&mut self) {
        self.sent_upto = 0;
        self.earlier_sent = 0;
        self.earlier_in_flight.clear();
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
        self.earlier.len() + self.batches.len()
    }

    /// True when nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.earlier.is_empty() && self.batches.is_empty()
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

    fn of(epoch: &str, seq: u64) -> (StreamReportsRequest, usize) {
        let msg = StreamReportsRequest {
            stream_epoch: epoch.into(),
            seq,
            ..Default::default()
        };
        (msg, 1)
    }

    /// Replayed batches of an earlier process go first under their own
    /// identity; the first ACK after one answers it, even when its seq
    /// equals one of this process's.
    #[test]
    fn replayed_batches_go_first_and_are_released_by_their_own_ack() {
        let mut b = ReportBuffer::new(100);
        b.resume("new", vec![of("old", 7), of("old", 8), of("new", 1)]);
        b.push(batch(), 1);
        let sent: Vec<(String, u64)> =
            std::iter::from_fn(|| b.next_to_send().map(|m| (m.stream_epoch, m.seq))).collect();
        assert_eq!(
            sent,
            [("old", 7), ("old", 8), ("new", 1), ("", 2)]
                .map(|(e, s)| (e.to_string(), s))
                .to_vec()
        );
        assert_eq!(b.ack(7), 1);
        // The stream breaks before old 8's ACK: both resent.
        b.rewind();
        assert_eq!(b.next_to_send().map(|m| m.seq), Some(8));
        assert_eq!(b.ack(8), 1);
        assert_eq!(b.len(), 2);
        assert_eq!(b.next_to_send().map(|m| m.seq), Some(1));
        assert_eq!(b.ack(1), 1);
        assert_eq!(
            b.take_released(),
            vec![("old".into(), 7), ("old".into(), 8), ("new".into(), 1)]
        );
        assert_eq!(b.events(), 1);
    }
}

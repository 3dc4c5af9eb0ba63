//! Nonces of discovery responses: unique per message, so an ACK or NACK
//! names exactly the message it answers.

use std::sync::atomic::{AtomicU64, Ordering};

/// Hands out nonces `<instance>-<n>`: `instance` is random per control-plane
/// process (so a restarted control plane never reuses a nonce a proxy may
/// still echo), `n` counts up within it (so no two messages share one).
#[derive(Debug)]
pub(super) struct Nonces {
    instance: String,
    next: AtomicU64,
}

impl Default for Nonces {
    fn default() -> Self {
        Nonces {
            instance: format!("{:08x}", rand::random::<u32>()),
            next: AtomicU64::new(1),
        }
    }
}

impl Nonces {
    /// A fresh nonce.
    pub(super) fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_unique_within_and_across_instances() {
        let a = Nonces::default();
        let b = Nonces::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            assert!(seen.insert(a.next()));
        }
        let first_a = Nonces {
            instance: a.instance.clone(),
            next: AtomicU64::new(1),
        }
        .next();
        assert!(seen.contains(&first_a));
        if a.instance != b.instance {
            assert!(!seen.contains(&b.next()));
        }
    }
}

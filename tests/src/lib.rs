//! Claw Gateway cross-process test harness (being built).

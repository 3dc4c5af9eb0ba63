//! Claw Gateway control plane (being built).

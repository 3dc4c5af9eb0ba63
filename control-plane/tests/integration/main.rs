//! The control plane's integration tests, one binary (`autotests = false`):
//! each module is one area, and [`common`] is the in-process harness they
//! share.
//!
//! - [`grpc`]: the admin API end to end, in process.
//! - [`discovery`]: the discovery stream, with a tonic client as the proxy.
//! - [`fleet`]: report ingestion, fleet cooldowns and rate shares, in process.
//! - [`binary`], [`binary_fleet`]: the real `claw-control-plane` binary.
//! - [`heartbeat_scale`]: the heartbeat scheduler's scale benchmark (ignored;
//!   `tests/bench/heartbeat_scale.sh`).

mod binary;
mod binary_fleet;
mod common;
mod discovery;
mod fleet;
mod grpc;
mod heartbeat_scale;

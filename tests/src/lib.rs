//! Test infrastructure for Claw Gateway: what cross-process tests and
//! benchmarks are built on.
//!
//! - [`mock`]: the mock OpenAI-compatible upstream (the only fake we allow:
//!   it stands in for LLM providers), in-process ([`mock::MockUpstream`]) or
//!   as the `claw-mock-upstream` binary, with a script of failures and a
//!   record of every request.
//! - [`harness`]: starts the real binaries (`claw-control-plane`,
//!   `claw-data-plane`, `clawctl`, `claw-mock-upstream`) as child processes on
//!   ephemeral loopback ports with temp dirs, and tears them down on drop.
//! - [`otlp`]: a fake OpenTelemetry collector (OTLP/HTTP and OTLP/gRPC) that
//!   records the spans the binaries export.
//! - [`webhook`]: a fake heartbeat webhook receiver (switchable down/up)
//!   that records every delivery.

pub mod harness;
pub mod mock;
pub mod otlp;
pub mod webhook;

//! The cross-process tests of Claw Gateway, as one test binary: the real
//! binaries (control plane, proxies, `clawctl`, the mock upstream) started on
//! ephemeral loopback ports with temporary directories (`claw_tests::harness`).
//!
//! One binary instead of one per file: the shared support is compiled once,
//! and CI links one test executable instead of a dozen. Run one area with a
//! filter, e.g. `cargo test -p claw-tests --test integration fleet::`.

mod data_plane_support;

mod affinity;
mod anthropic_sdk;
mod attribution;
mod audit;
mod auth_failures;
mod backend_probe_cli;
mod backup;
mod big_config;
mod check;
mod clawctl_edges;
mod control_plane_cli;
mod corrupt_store;
mod dashboard_api;
mod dashboard_ui;
mod data_plane;
mod data_plane_config;
mod data_plane_input;
mod disk_full;
mod fleet;
mod harness_smoke;
mod health;
mod heartbeat;
mod heartbeat_delivery;
mod heartbeat_edges;
mod heartbeat_wake;
mod hostile_clients;
mod hostile_config;
mod hostile_connections;
mod hostile_limits;
mod hostile_upstreams;
mod hostile_webhooks;
mod key_rpm_fleet;
mod metrics_format;
mod mock_protocols;
mod mock_upstream;
mod monitoring;
mod observability;
mod openai_sdk;
mod otel_tracing;
mod passthrough;
mod responses_routing;
mod roles;
mod rolling_restart;
mod rollout;
mod snapshot_cache;
mod stream_deadlines;
mod tls;
mod translation;
mod upstream_errors;
mod usage_exact;
mod usage_journal;

//! `claw-control-plane`: the Claw Gateway control plane. It owns the
//! configuration (backends, pools, client keys, agents) and its secrets, and
//! serves the `claw.v1` gRPC admin API that `clawctl` talks to.
//!
//! Modules, from the edge inwards:
//!
//! - [`config`]: the typed [`Config`] (data dir, master key, tokens), parsed
//!   once in `main`.
//! - [`server`]: [`server::run`] wires everything on already-bound gRPC and
//!   HTTP listeners and shuts down gracefully.
//! - [`api`]: one file per gRPC service, the bearer-token [`api::auth`]
//!   interceptor, and the single `CatalogError` → `tonic::Status` conversion.
//! - [`http`]: `/healthz` and `/metrics` on the HTTP listener.
//! - [`metrics`]: metric names, the Prometheus recorder and the gRPC
//!   request-metrics layer.
//! - [`discovery`]: `DiscoveryService.StreamConfig`, the proxies' stream:
//!   debounced snapshot publishing, per-stream sessions, ACK/NACK by nonce.
//! - [`proxies`]: the in-memory registry of data-plane proxies and the
//!   channels to their streams.
//! - [`catalog`]: typed, versioned, durable configuration: validation,
//!   uniqueness, config version bumps, apply/export, master key rotation,
//!   consistent snapshots for the proxies.
//! - [`crypto`]: the master key and AES-256-GCM-SIV sealing of secrets.
//! - [`store`]: the small engine-agnostic storage trait and its sled
//!   implementation.
//! - [`report`]: the fleet loop's ingestion: report batches stored exactly
//!   once, fleet state updated and pushed after the ACK.
//! - [`cooldowns`]: fleet-wide cooldowns after 429s (absolute time,
//!   persisted) and their history.
//! - [`shares`]: each proxy's share of every backend's rpm/tpm, so the fleet
//!   never admits more than the limit.
//! - [`stats`]: usage buckets (hourly, daily), their queries and retention.

pub mod api;
pub mod catalog;
pub mod config;
pub mod crypto;
pub mod discovery;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod proxies;
pub mod report;
pub mod retention;
pub mod server;
pub mod shutdown;
pub mod stats;
pub mod store;

pub use config::Config;
pub use server::run;
pub mod heartbeat;

//! `claw-control-plane`: the Claw Gateway control plane. It owns the
//! configuration (backends, pools, client keys, agents) and its secrets,
//! distributes it to the data-plane proxies, keeps the fleet's live state
//! and its usage history, runs the agents' heartbeats, and serves the
//! `claw.v1` gRPC API that `clawctl` and the proxies talk to.
//!
//! Modules, from the edge inwards:
//!
//! - [`server`]: the composition root. [`server::run`] opens the store once,
//!   wires every task and service on already-bound gRPC and HTTP listeners,
//!   and shuts down gracefully.
//! - [`config`]: the typed [`Config`] (data dir, master key, tokens, TLS,
//!   heartbeat, retention and share settings), parsed once in `main`.
//! - `api`: one file per gRPC service, the bearer-token `api::auth`
//!   interceptor and role layer, and the one place domain errors become
//!   `tonic::Status`.
//! - [`access`]: who may call what: the bootstrap admin token, named admin
//!   tokens with roles (stored as hashes), and the read/write table of
//!   every admin method that a viewer's writes are refused by.
//! - [`audit`]: the audit log: one record per admin change, written in the
//!   change's own transaction, with a field diff and secrets masked.
//! - [`backup`]: consistent backups (an export under the store's lock),
//!   scheduled backups, and the offline restore with a new lineage.
//! - [`check`]: the offline integrity check of a data directory.
//! - `discovery`: `DiscoveryService.StreamConfig`, the proxies' stream:
//!   debounced snapshot publishing, per-stream sessions, ACK/NACK by nonce.
//! - `http`: the HTTP listener: `/healthz`, `/metrics`, and the rest to
//!   `dashboard`, the operator dashboard (compiled-in page, `/api/v1/` JSON
//!   over the same gRPC services and roles, live server-sent events).
//! - [`events`]: the change-notification bus the dashboard's live stream
//!   follows (proxies, backends, heartbeats, usage; config via the catalog).
//! - `metrics`: the Prometheus recorder, the catalog gauges and the gRPC
//!   request-metrics layer.
//! - `retention`: the maintenance task that prunes usage buckets,
//!   cooldown events, report idempotency records and audit records past
//!   their retention.
//! - [`heartbeat`]: agent heartbeats: the pure slot, checklist and reply
//!   core, the scheduler, dispatch to a proxy, the run log and webhook
//!   delivery.
//! - `report`: report ingestion: each proxy batch stored exactly once, in
//!   one transaction, before it is acknowledged.
//! - [`fleet`]: live fleet state: agent activity and backend capacity,
//!   fleet-wide cooldowns after 429s, each proxy's rate shares, the backend
//!   directory, and the loop that pushes them to the proxies.
//! - [`net_guard`]: the SSRF guard of webhook and wake URLs: the address
//!   policy, the save-time URL check and the guarded connector.
//! - [`health`]: active health probes of every enabled backend and the
//!   fleet-wide health table pushed to every proxy.
//! - `stats`: usage buckets (hourly, daily), their key layout and the
//!   `StatsService` queries.
//! - `proxies`: the in-memory registry of connected proxies and the
//!   `proxies::Push` senders to their streams.
//! - [`catalog`]: typed, versioned, durable configuration: validation,
//!   uniqueness, config version bumps, apply/export, master key rotation,
//!   consistent snapshots for the proxies.
//! - [`crypto`]: the master key and AES-256-GCM-SIV sealing of secrets.
//! - [`store`]: the small engine-agnostic storage trait and its sled
//!   implementation.
//! - [`shutdown`]: the [`shutdown::Shutdown`] signal every long-running task
//!   waits on.

pub mod access;
mod api;
pub mod audit;
pub mod backup;
pub mod catalog;
pub mod check;
pub mod config;
mod conn;
pub mod crypto;
mod dashboard;
mod discovery;
pub mod events;
pub mod fleet;
pub mod health;
pub mod heartbeat;
mod http;
mod metrics;
pub mod net_guard;
mod proxies;
mod report;
mod retention;
pub mod server;
pub mod shutdown;
mod stats;
pub mod store;

pub use config::Config;
pub use server::run;

//! The `claw.v1` gRPC API: one file per service, each a thin translation
//! between protobuf messages and [`Catalog`] calls.
//!
//! - [`auth`]: the bearer-token interceptor (admin token here; the proxy
//!   token will open the discovery service the same way).
//! - [`backend`], [`pool`], [`client_key`], [`agent`], [`cluster`]: the
//!   services.
//!
//! Errors reach the wire through exactly one conversion,
//! `From<CatalogError> for tonic::Status`, below.

pub mod agent;
pub mod auth;
pub mod backend;
pub mod client_key;
pub mod cluster;
pub mod heartbeat;
pub mod pool;
pub mod report;
pub mod stats;

use tonic::Status;

use crate::catalog::{Catalog, CatalogError};

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Status {
        match &e {
            CatalogError::Invalid(f) => Status::invalid_argument(f.to_string()),
            CatalogError::AlreadyExists(f) => Status::already_exists(f.to_string()),
            CatalogError::NotFound { .. } => Status::not_found(e.to_string()),
            CatalogError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
            CatalogError::SchemaTooNew { .. } | CatalogError::KeyMismatch { .. } => {
                Status::failed_precondition(e.to_string())
            }
            CatalogError::Store(_) | CatalogError::Crypto(_) | CatalogError::Corrupt(_) => {
                // Details stay in the log: they may describe internals.
                tracing::error!(error = %e, "internal error serving a request");
                Status::internal("internal error; see the control plane log")
            }
        }
    }
}

/// Shorthand for service results.
type RpcResult<T> = Result<tonic::Response<T>, Status>;

/// Wraps a message in a response.
fn ok<T>(msg: T) -> RpcResult<T> {
    Ok(tonic::Response::new(msg))
}

/// Rejects a missing message field the way validation errors read.
fn required<T>(value: Option<T>, field: &str) -> Result<T, Status> {
    value.ok_or_else(|| Status::invalid_argument(format!("{field}: is required")))
}

/// The shared handle services hold.
type SharedCatalog = std::sync::Arc<Catalog>;

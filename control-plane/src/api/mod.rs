//! The `claw.v1` gRPC API: one file per service, each a thin translation
//! between protobuf messages and the modules that own the state.
//!
//! - [`auth`]: the bearer-token interceptor. The admin token opens the
//!   admin services below; the proxy token opens [`report`] and the
//!   discovery service ([`crate::discovery`]), and neither opens the other's.
//! - [`backend`], [`pool`], [`client_key`], [`agent`], [`cluster`]: the
//!   configuration services, over the [`Catalog`].
//! - [`heartbeat`]: manual runs, run logs, checklists and next slots, over
//!   the heartbeat scheduler.
//! - [`stats`]: usage history and cooldown events.
//! - [`report`]: the proxies' report stream, into [`crate::report`].
//!
//! Every domain error reaches the wire here, in this file:
//! `From<CatalogError>` and `From<HeartbeatError>` for `tonic::Status`, and
//! `internal` for failures whose details stay in the log (they may describe
//! internals). The services themselves answer only for the request: a
//! missing or malformed field, a missing token, a report batch to resend.

pub(crate) mod agent;
pub(crate) mod auth;
pub(crate) mod backend;
pub(crate) mod client_key;
pub(crate) mod cluster;
pub(crate) mod heartbeat;
pub(crate) mod pool;
pub(crate) mod report;
pub(crate) mod stats;

use tonic::Status;

use crate::catalog::{Catalog, CatalogError};
use crate::heartbeat::scheduler::HeartbeatError;

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
                internal(&e)
            }
        }
    }
}

impl From<HeartbeatError> for Status {
    fn from(e: HeartbeatError) -> Status {
        match &e {
            HeartbeatError::NotFound(_) => Status::not_found(e.to_string()),
            HeartbeatError::Unavailable => Status::unavailable(e.to_string()),
            HeartbeatError::Store(_)
            | HeartbeatError::Catalog(_)
            | HeartbeatError::CommitFailed => internal(&e),
        }
    }
}

/// The answer to a failure whose details may describe internals: the
/// details go to the log, the wire gets a fixed message.
fn internal(e: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error serving a request");
    Status::internal("internal error; see the control plane log")
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

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
//! `From<CatalogError>` and `From<HeartbeatError>` for `tonic::Status`
//! (a write refused for lack of space is `RESOURCE_EXHAUSTED` naming the
//! data volume, see [`no_space`]), and
//! `internal` for failures whose details stay in the log (they may describe
//! internals). The services themselves answer only for the request: a
//! missing or malformed field, a missing token, a report batch to resend.

pub(crate) mod agent;
pub(crate) mod audit;
pub(crate) mod auth;
pub(crate) mod backend;
pub(crate) mod backup;
pub(crate) mod client_key;
pub(crate) mod cluster;
pub(crate) mod heartbeat;
pub(crate) mod page;
pub(crate) mod pool;
pub(crate) mod report;
pub(crate) mod stats;
pub(crate) mod token;

use tonic::Status;

use crate::catalog::{Catalog, CatalogError};
use crate::heartbeat::runs::RunStoreError;
use crate::heartbeat::scheduler::HeartbeatError;
use crate::store::StoreError;

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Status {
        if let CatalogError::Store(s) = &e
            && let Some(status) = no_space(s)
        {
            return status;
        }
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
        let store = match &e {
            HeartbeatError::Store(RunStoreError::Store(s))
            | HeartbeatError::Catalog(CatalogError::Store(s)) => no_space(s),
            _ => None,
        };
        if let Some(status) = store {
            return status;
        }
        match &e {
            HeartbeatError::NotFound(_) => Status::not_found(e.to_string()),
            HeartbeatError::Unavailable => Status::unavailable(e.to_string()),
            HeartbeatError::Store(_)
            | HeartbeatError::Catalog(_)
            | HeartbeatError::CommitFailed => internal(&e),
        }
    }
}

/// `RESOURCE_EXHAUSTED` naming the data volume, for a write refused
/// because the volume is below its reserve (`--min-free-space`) or failed
/// because the volume is full (`ENOSPC`/`EDQUOT` met by the engine, e.g.
/// with the guard off): the operator can act on it, and the client may
/// retry once space is freed. Every store error reaches the wire through
/// here or [`internal`].
pub(crate) fn no_space(e: &StoreError) -> Option<Status> {
    e.is_no_space()
        .then(|| Status::resource_exhausted(e.to_string()))
}

/// The answer to a failure whose details may describe internals: the
/// details go to the log, the wire gets a fixed message.
fn internal(e: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error serving a request");
    Status::internal("internal error; see the control plane log")
}

/// The caller's address, set explicitly by in-process callers (the
/// dashboard) that have no transport connection to hand tonic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub std::net::SocketAddr);

/// Who made `request`: the [`crate::access::Principal`] the admin
/// authentication put in its extensions (or `system` when none did, for
/// in-process calls) and the peer address. A request the dashboard made
/// carries [`crate::audit::Actor::dashboard`] set.
pub(crate) fn actor<T>(request: &tonic::Request<T>) -> crate::audit::Actor {
    let peer = request
        .extensions()
        .get::<PeerAddr>()
        .map(|p| p.0)
        .or_else(|| request.remote_addr());
    let mut actor = match request.extensions().get::<crate::access::Principal>() {
        Some(p) => crate::audit::Actor {
            token: p.name.clone(),
            role: Some(p.role.to_proto()),
            peer,
            dashboard: false,
        },
        None => crate::audit::Actor {
            peer,
            ..crate::audit::Actor::system()
        },
    };
    actor.dashboard = request.extensions().get::<ViaDashboard>().is_some();
    actor
}

/// Marks a request the dashboard made on an operator's behalf.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ViaDashboard;

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

//! How the dashboard calls the gRPC services in-process: as the caller
//! (its [`Principal`] and address in the request's extensions, a write
//! marked [`ViaDashboard`]) once [`authorize`] admits the caller's role for
//! the method, exactly as the gRPC server would.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tonic::Status;

use crate::access::{Principal, authorize};
use crate::api::{PeerAddr, ViaDashboard};

/// The caller of one API request.
pub(super) struct Caller {
    principal: Principal,
    peer: SocketAddr,
}

impl Caller {
    /// `principal` calling from `peer`.
    pub(super) fn new(principal: Principal, peer: SocketAddr) -> Caller {
        Caller { principal, peer }
    }

    /// A request for `method` (a full gRPC path) carrying the caller, once
    /// the caller's role may call it; `write` marks it as a dashboard action.
    pub(super) fn request<T>(
        &self,
        method: &str,
        message: T,
        write: bool,
    ) -> Result<tonic::Request<T>, Status> {
        authorize(&self.principal, method)?;
        let mut r = tonic::Request::new(message);
        r.extensions_mut().insert(self.principal.clone());
        r.extensions_mut().insert(PeerAddr(self.peer));
        if write {
            r.extensions_mut().insert(ViaDashboard);
        }
        Ok(r)
    }
}

/// A message as JSON (proto field names).
pub(super) fn to_json<T: serde::Serialize>(message: &T) -> Result<Value, Status> {
    serde_json::to_value(message).map_err(|e| {
        tracing::error!(error = %e, "cannot encode a dashboard response");
        Status::internal("cannot encode the response")
    })
}

/// The timestamp `d` before now.
pub(super) fn ago(d: Duration) -> Option<prost_types::Timestamp> {
    let now = crate::catalog::records::now_ms();
    let d = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    crate::catalog::records::timestamp(now.saturating_sub(d).max(0))
}

//! The operator dashboard on the control plane's HTTP listener: static
//! assets compiled into the binary at `/`, a JSON API under `/api/v1/` that
//! calls the same gRPC services (same roles, same audit), and a
//! server-sent-event stream of [`crate::events::Topic`]s.
//!
//! - [`assets`]: `/`, `/index.html`, `/assets/{name}` (compiled in with
//!   `include_bytes!`), the redirects from `/dashboard` and `/ui`, and the
//!   security headers every dashboard response carries.
//! - [`api`]: `/api/v1/*`: bearer-token login (admin or viewer tokens of
//!   [`Access`]; the proxy token opens nothing), role checks by gRPC method
//!   name ([`crate::access::authorize`]), then the in-process service call.
//! - [`sse`]: `GET /api/v1/events`, coalesced topics, pings, resync on lag;
//!   ends on shutdown so it never holds graceful shutdown up.
//! - [`call`]: the in-process service call as the caller.
//! - [`backends`]: the backends view (live state, rates in use).
//! - [`usage`]: the usage series for the charts.
//! - [`query`]: the query-string decoding the endpoints share.

mod api;
mod assets;
mod backends;
mod call;
mod query;
mod sse;
mod usage;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use http_body_util::Full;
use http_body_util::combinators::UnsyncBoxBody;

use crate::access::Access;
use crate::api::agent::AgentApi;
use crate::api::audit::AuditApi;
use crate::api::backend::BackendApi;
use crate::api::cluster::ClusterApi;
use crate::api::heartbeat::HeartbeatApi;
use crate::api::pool::PoolApi;
use crate::api::stats::StatsApi;
use crate::api::token::TokenApi;
use crate::catalog::Catalog;
use crate::events::Events;
use crate::fleet::Fleet;
use crate::shutdown::Shutdown;

/// A response body: a whole buffer or the event stream.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A whole-buffer body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// The gRPC service implementations the dashboard calls in-process (the
/// same instances the gRPC server serves).
#[derive(Clone)]
pub(crate) struct Services {
    pub backend: BackendApi,
    pub cluster: ClusterApi,
    pub stats: StatsApi,
    pub agent: AgentApi,
    pub heartbeat: HeartbeatApi,
    pub pool: PoolApi,
    pub audit: AuditApi,
    pub token: TokenApi,
}

/// What the dashboard needs: token resolution, the services, the event bus
/// and the live state the backends view adds to the services' answers.
#[derive(Clone)]
pub(crate) struct Dashboard {
    pub access: Arc<Access>,
    pub services: Services,
    pub events: Events,
    pub catalog: Arc<Catalog>,
    pub fleet: Arc<Fleet>,
    pub shutdown: Shutdown,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard").finish_non_exhaustive()
    }
}

impl Dashboard {
    /// Answers every request the HTTP listener does not answer itself
    /// (`/healthz`, `/metrics`): the API, the assets, or 404.
    pub(crate) async fn handle<B>(&self, request: Request<B>, peer: SocketAddr) -> Response<Body> {
        let path = request.uri().path();
        let mut response = if path == "/api" || path.starts_with("/api/") {
            api::handle(self, &request, peer).await
        } else {
            assets::serve(request.method(), path)
        };
        assets::secure(response.headers_mut());
        response
    }
}

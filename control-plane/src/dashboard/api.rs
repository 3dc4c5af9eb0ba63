//! `/api/v1/*`: the dashboard's JSON API.
//!
//! Every request needs `authorization: Bearer <token>` of an admin or
//! viewer token ([`crate::access::Access::resolve_header`]; the proxy token
//! is unknown there). Each endpoint calls its gRPC service in-process
//! through [`Caller::request`], which checks the role for that method and
//! carries the caller and its address (and, for writes, the dashboard mark)
//! into the request, so roles and the audit log apply exactly as on gRPC. Bodies are the proto
//! response messages as JSON (proto field names). Errors are
//! `{"error":{"code","message"}}` with the HTTP status of the gRPC code.

use std::net::SocketAddr;
use std::time::Duration;

use claw_proto::v1::agent_service_server::AgentService as _;
use claw_proto::v1::audit_service_server::AuditService as _;
use claw_proto::v1::backend_service_server::BackendService as _;
use claw_proto::v1::cluster_service_server::ClusterService as _;
use claw_proto::v1::heartbeat_service_server::HeartbeatService as _;
use claw_proto::v1::pool_service_server::PoolService as _;
use claw_proto::v1::stats_service_server::StatsService as _;
use claw_proto::v1::token_service_server::TokenService as _;
use claw_proto::v1::*;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tonic::{Code, Status};

use super::call::{Caller, ago, to_json};
use super::query::Query;
use super::{Body, Dashboard, full, sse};

/// At most this many agents in `GET /agents` (each costs two reads).
const MAX_AGENTS: usize = 500;
/// Next slots per agent in `GET /agents`.
const NEXT_SLOTS: u32 = 5;

/// The HTTP status of a gRPC code.
fn status_of(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The snake_case name of a gRPC code (`permission_denied`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The JSON error for `status`.
pub(super) fn error(status: &Status) -> Response<Body> {
    json_response(
        status_of(status.code()),
        &json!({ "error": { "code": code_name(status.code()), "message": status.message() } }),
    )
}

/// Percent-decoded path segment (ids and names in paths).
fn segment(s: &str) -> String {
    let q = Query::parse(Some(&format!("v={}", s.replace('+', "%2B"))));
    q.get("v").to_string()
}

/// What a path asks for, before the method is checked.
enum Route {
    Read(Read),
    Write(Write),
    Events,
}

enum Read {
    WhoAmI,
    Overview,
    Backends,
    Cooldowns,
    Usage,
    Agents,
    Runs(String),
    Audit,
}

enum Write {
    SetBackendEnabled(String, bool),
    RunAgent(String),
}

fn route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/api/v1/")?;
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    Some(match parts.as_slice() {
        ["whoami"] => Route::Read(Read::WhoAmI),
        ["overview"] => Route::Read(Read::Overview),
        ["backends"] => Route::Read(Read::Backends),
        ["cooldowns"] => Route::Read(Read::Cooldowns),
        ["usage"] => Route::Read(Read::Usage),
        ["agents"] => Route::Read(Read::Agents),
        ["agents", id, "runs"] if !id.is_empty() => Route::Read(Read::Runs(segment(id))),
        ["audit"] => Route::Read(Read::Audit),
        ["events"] => Route::Events,
        ["backends", id, "enable"] if !id.is_empty() => {
            Route::Write(Write::SetBackendEnabled(segment(id), true))
        }
        ["backends", id, "disable"] if !id.is_empty() => {
            Route::Write(Write::SetBackendEnabled(segment(id), false))
        }
        ["agents", id, "run"] if !id.is_empty() => Route::Write(Write::RunAgent(segment(id))),
        _ => return None,
    })
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({ "error": { "code": "method_not_allowed", "message": format!("use {allow}") } }),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// Answers one `/api/...` request.
pub(super) async fn handle<B>(
    d: &Dashboard,
    request: &Request<B>,
    peer: SocketAddr,
) -> Response<Body> {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let principal = match d.access.resolve_header(header) {
        Ok(Some(p)) => p,
        Ok(None) => {
            let mut r = error(&Status::unauthenticated(
                "missing or invalid token: send `authorization: Bearer <admin or viewer token>`",
            ));
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot look up a dashboard token");
            return error(&Status::unavailable("cannot check the token; try again"));
        }
    };
    let Some(route) = route(request.uri().path()) else {
        return error(&Status::not_found(format!(
            "no such API endpoint: {}",
            request.uri().path()
        )));
    };
    let caller = Caller::new(principal, peer);
    let query = Query::parse(request.uri().query());
    let is_get = matches!(*request.method(), Method::GET | Method::HEAD);
    let result = match route {
        Route::Events if is_get => {
            return match caller.request("/claw.v1.ClusterService/GetSnapshotInfo", (), false) {
                Ok(_) => sse::stream(d),
                Err(s) => error(&s),
            };
        }
        Route::Read(read) if is_get => read_endpoint(d, &caller, &query, read).await,
        Route::Write(write) if *request.method() == Method::POST => {
            write_endpoint(d, &caller, write).await
        }
        Route::Events | Route::Read(_) => return method_not_allowed("GET"),
        Route::Write(_) => return method_not_allowed("POST"),
    };
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(s) => error(&s),
    }
}

async fn read_endpoint(d: &Dashboard, c: &Caller, q: &Query, read: Read) -> Result<Value, Status> {
    let s = &d.services;
    match read {
        Read::WhoAmI => {
            let r = c.request("/claw.v1.TokenService/WhoAmI", WhoAmIRequest {}, false)?;
            to_json(&s.token.who_am_i(r).await?.into_inner())
        }
        Read::Overview => overview(d, c).await,
        Read::Backends => {
            let backends = super::backends::live(d, c).await?;
            Ok(json!({ "backends": backends.into_iter().map(|b| b.json).collect::<Vec<_>>() }))
        }
        Read::Cooldowns => {
            let since = q.duration("since", Duration::from_secs(86_400))?;
            let msg = ListCooldownEventsRequest {
                backend: q.get("backend").to_string(),
                start: ago(since),
                end: None,
                limit: q.limit("limit", 100, 10_000)?,
            };
            let r = c.request("/claw.v1.StatsService/ListCooldownEvents", msg, false)?;
            to_json(&s.stats.list_cooldown_events(r).await?.into_inner())
        }
        Read::Usage => super::usage::series(d, c, q).await,
        Read::Agents => agents(d, c).await,
        Read::Runs(agent) => {
            let msg = ListHeartbeatRunsRequest {
                agent,
                limit: q.limit("limit", 50, 10_000)?,
            };
            let r = c.request("/claw.v1.HeartbeatService/ListHeartbeatRuns", msg, false)?;
            to_json(&s.heartbeat.list_heartbeat_runs(r).await?.into_inner())
        }
        Read::Audit => {
            let since = match q.get("since") {
                "" => None,
                _ => ago(q.duration("since", Duration::ZERO)?),
            };
            let msg = ListAuditRecordsRequest {
                since,
                resource: q.get("resource").to_string(),
                token_name: q.get("token").to_string(),
                limit: q.limit("limit", 100, 10_000)?,
            };
            let r = c.request("/claw.v1.AuditService/ListAuditRecords", msg, false)?;
            to_json(&s.audit.list_audit_records(r).await?.into_inner())
        }
    }
}

async fn write_endpoint(d: &Dashboard, c: &Caller, write: Write) -> Result<Value, Status> {
    let s = &d.services;
    match write {
        Write::SetBackendEnabled(backend, enabled) => {
            let msg = SetBackendEnabledRequest { backend, enabled };
            let r = c.request("/claw.v1.BackendService/SetBackendEnabled", msg, true)?;
            to_json(&s.backend.set_backend_enabled(r).await?.into_inner())
        }
        Write::RunAgent(agent) => {
            let msg = RunHeartbeatRequest { agent, wait: false };
            let r = c.request("/claw.v1.HeartbeatService/RunHeartbeat", msg, true)?;
            to_json(&s.heartbeat.run_heartbeat(r).await?.into_inner())
        }
    }
}

async fn totals(d: &Dashboard, c: &Caller, since: Duration) -> Result<Value, Status> {
    let msg = GetUsageTotalsRequest {
        filter: Some(UsageFilter {
            start: ago(since),
            ..Default::default()
        }),
    };
    let r = c.request("/claw.v1.StatsService/GetUsageTotals", msg, false)?;
    let totals = d.services.stats.get_usage_totals(r).await?.into_inner();
    to_json(&totals.totals.unwrap_or_default())
}

async fn overview(d: &Dashboard, c: &Caller) -> Result<Value, Status> {
    let s = &d.services;
    let r = c.request(
        "/claw.v1.ClusterService/GetSnapshotInfo",
        GetSnapshotInfoRequest {},
        false,
    )?;
    let snapshot = s.cluster.get_snapshot_info(r).await?.into_inner();
    let r = c.request(
        "/claw.v1.ClusterService/ListProxies",
        ListProxiesRequest {},
        false,
    )?;
    let proxies = s.cluster.list_proxies(r).await?.into_inner().proxies;
    let r = c.request(
        "/claw.v1.PoolService/ListPoolSettings",
        ListPoolSettingsRequest {},
        false,
    )?;
    let pools = s.pool.list_pool_settings(r).await?.into_inner().settings;
    let backends = super::backends::live(d, c).await?;
    let count = |state: &str| backends.iter().filter(|b| b.state == state).count();
    let r = c.request(
        "/claw.v1.AgentService/ListAgents",
        ListAgentsRequest::default(),
        false,
    )?;
    let agents = s.agent.list_agents(r).await?.into_inner().agents;
    Ok(json!({
        "snapshot": to_json(&snapshot)?,
        "proxies": to_json(&proxies)?,
        "pools": to_json(&pools)?,
        "last_hour": totals(d, c, Duration::from_secs(3_600)).await?,
        "last_day": totals(d, c, Duration::from_secs(86_400)).await?,
        "backends": {
            "total": backends.len(),
            "healthy": count("healthy"),
            "cooling": count("cooling"),
            "disabled": count("disabled"),
            "quota_exhausted": count("quota_exhausted"),
            "auth_failed": count("auth_failed"),
            "unhealthy": count("unhealthy"),
            "ejected": count("ejected"),
        },
        "agents": {
            "total": agents.len(),
            "enabled": agents.iter().filter(|a| a.enabled).count(),
        },
    }))
}

async fn agents(d: &Dashboard, c: &Caller) -> Result<Value, Status> {
    let s = &d.services;
    let r = c.request(
        "/claw.v1.AgentService/ListAgents",
        ListAgentsRequest::default(),
        false,
    )?;
    let agents = s.agent.list_agents(r).await?.into_inner().agents;
    let mut out = Vec::with_capacity(agents.len().min(MAX_AGENTS));
    for agent in agents.into_iter().take(MAX_AGENTS) {
        let msg = ListHeartbeatRunsRequest {
            agent: agent.id.clone(),
            limit: 1,
        };
        let r = c.request("/claw.v1.HeartbeatService/ListHeartbeatRuns", msg, false)?;
        let last_run = s
            .heartbeat
            .list_heartbeat_runs(r)
            .await?
            .into_inner()
            .runs
            .into_iter()
            .next();
        let msg = ListNextSlotsRequest {
            agent: agent.id.clone(),
            count: NEXT_SLOTS,
        };
        let r = c.request("/claw.v1.HeartbeatService/ListNextSlots", msg, false)?;
        // A disabled agent or one without a schedule has no next slots.
        let next_slots = match s.heartbeat.list_next_slots(r).await {
            Ok(r) => r.into_inner().slots,
            Err(e) if e.code() == Code::FailedPrecondition => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut v = to_json(&agent)?;
        if let Value::Object(m) = &mut v {
            m.insert("last_run".into(), to_json(&last_run)?);
            m.insert("next_slots".into(), to_json(&next_slots)?);
        }
        out.push(v);
    }
    Ok(json!({ "agents": out }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_to_endpoints_and_ids_are_decoded() {
        assert!(matches!(
            route("/api/v1/whoami"),
            Some(Route::Read(Read::WhoAmI))
        ));
        assert!(matches!(route("/api/v1/events"), Some(Route::Events)));
        assert!(matches!(
            route("/api/v1/backends/my%20b/disable"),
            Some(Route::Write(Write::SetBackendEnabled(ref id, false))) if id == "my b"
        ));
        assert!(matches!(
            route("/api/v1/agents/a+1/runs"),
            Some(Route::Read(Read::Runs(ref id))) if id == "a+1"
        ));
        for p in [
            "/api/v1/nope",
            "/api/v2/whoami",
            "/api/v1/backends//enable",
            "/api",
        ] {
            assert!(route(p).is_none(), "{p}");
        }
    }

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        assert_eq!(status_of(Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(
            status_of(Code::FailedPrecondition),
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(status_of(Code::Internal), StatusCode::INTERNAL_SERVER_ERROR);
        let r = error(&Status::permission_denied("viewer"));
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
}

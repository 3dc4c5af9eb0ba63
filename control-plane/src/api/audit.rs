//! `claw.v1.AuditService`: the audit log, newest first, filtered by time,
//! resource and token.

use std::sync::Arc;

use claw_proto::v1::audit_service_server::AuditService;
use claw_proto::v1::*;
use tonic::{Request, Status};

use super::{RpcResult, internal, ok};
use crate::catalog::records;
use crate::store::{Store, Tree};

/// Default and largest page of `ListAuditRecords`.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 10_000;
/// Records read from the store per step while filtering.
const CHUNK: usize = 512;

/// Serves the audit log from the store.
#[derive(Clone)]
pub(crate) struct AuditApi {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for AuditApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditApi").finish_non_exhaustive()
    }
}

impl AuditApi {
    /// A service over `store`.
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        AuditApi { store }
    }
}

/// What a request asks for, parsed.
#[derive(Debug, Default, PartialEq)]
struct Filter {
    /// Resource kind as recorded (`client_key` for `key`).
    kind: Option<&'static str>,
    /// Matches the resource's id or name.
    ident: Option<String>,
    token: Option<String>,
}

impl Filter {
    fn parse(req: &ListAuditRecordsRequest) -> Result<Filter, Status> {
        let mut f = Filter::default();
        let resource = req.resource.trim();
        if !resource.is_empty() {
            let (kind, ident) = match resource.split_once('/') {
                Some((k, i)) => (k.trim(), Some(i.trim())),
                None => (resource, None),
            };
            f.kind = Some(match kind {
                "backend" => "backend",
                "pool" => "pool",
                "key" | "client_key" => "client_key",
                "agent" => "agent",
                "token" => "token",
                "master_key" => "master_key",
                "backup" => "backup",
                other => {
                    return Err(Status::invalid_argument(format!(
                        "resource: unknown kind {other:?}; must be backend, pool, key, agent or token (as KIND/NAME)"
                    )));
                }
            });
            match ident {
                Some("") => {
                    return Err(Status::invalid_argument(
                        "resource: the name after the slash is empty; use KIND/NAME, e.g. backend/b1",
                    ));
                }
                Some(i) => f.ident = Some(i.to_string()),
                None => {}
            }
        }
        let token = req.token_name.trim();
        if !token.is_empty() {
            f.token = Some(token.to_string());
        }
        Ok(f)
    }

    fn matches(&self, r: &AuditRecord) -> bool {
        self.kind.is_none_or(|k| r.resource_kind == k)
            && self
                .ident
                .as_deref()
                .is_none_or(|i| r.resource_id == i || r.resource_name == i)
            && self.token.as_deref().is_none_or(|t| r.token_name == t)
    }
}

/// The first key at or after `since` (keys start with big-endian unix ms).
fn start_key(since: Option<&prost_types::Timestamp>) -> Result<Vec<u8>, Status> {
    let Some(ts) = since else {
        return Ok(Vec::new());
    };
    if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(Status::invalid_argument(
            "since: must be a time after 1970-01-01",
        ));
    }
    let ms = ts
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos / 1_000_000));
    Ok((ms as u64).to_be_bytes().to_vec())
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit_records(
        &self,
        request: Request<ListAuditRecordsRequest>,
    ) -> RpcResult<ListAuditRecordsResponse> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_LIMIT,
            n if n > MAX_LIMIT => {
                return Err(Status::invalid_argument(format!(
                    "limit: must be at most {MAX_LIMIT}"
                )));
            }
            n => n,
        } as usize;
        let filter = Filter::parse(&req)?;
        let start = start_key(req.since.as_ref())?;
        let mut records = Vec::new();
        let mut end: Option<Vec<u8>> = None;
        loop {
            let batch = self
                .store
                .range(Tree::Audit, &start, end.as_deref(), true, CHUNK)
                .map_err(|e| internal(&e))?;
            for (_, raw) in &batch {
                let r: AuditRecord = records::decode(Tree::Audit, raw)?;
                if filter.matches(&r) {
                    records.push(r);
                    if records.len() == limit {
                        return ok(ListAuditRecordsResponse { records });
                    }
                }
            }
            match batch.last() {
                Some((k, _)) if batch.len() == CHUNK => end = Some(k.clone()),
                _ => return ok(ListAuditRecordsResponse { records }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(resource: &str, token: &str) -> ListAuditRecordsRequest {
        ListAuditRecordsRequest {
            resource: resource.into(),
            token_name: token.into(),
            ..Default::default()
        }
    }

    #[test]
    fn resource_filters_parse_kinds_and_names() {
        let f = Filter::parse(&req("key/app", "")).expect("parses");
        assert_eq!(f.kind, Some("client_key"));
        assert_eq!(f.ident.as_deref(), Some("app"));
        let f = Filter::parse(&req("backend", "ops")).expect("kind only");
        assert_eq!(
            (f.kind, f.ident, f.token.as_deref()),
            (Some("backend"), None, Some("ops"))
        );
        let err = Filter::parse(&req("widget/x", "")).expect_err("unknown kind");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("resource:"), "{}", err.message());
        assert!(Filter::parse(&req("backend/", "")).is_err());
    }

    #[test]
    fn a_record_matches_by_id_or_name() {
        let f = Filter::parse(&req("backend/b1", "")).expect("parses");
        let mut r = AuditRecord {
            resource_kind: "backend".into(),
            resource_id: "be_1".into(),
            resource_name: "b1".into(),
            ..Default::default()
        };
        assert!(f.matches(&r));
        r.resource_name = "other".into();
        assert!(!f.matches(&r));
        let f = Filter::parse(&req("backend/be_1", "")).expect("parses");
        assert!(f.matches(&r));
    }
}

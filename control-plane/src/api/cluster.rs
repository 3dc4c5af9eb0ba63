//! `claw.v1.ClusterService`: snapshot info, proxies, master key rotation,
//! whole-config export and apply.

use std::sync::Arc;

use claw_proto::v1::cluster_service_server::ClusterService;
use claw_proto::v1::*;
use tonic::{Request, Status};

use super::{RpcResult, SharedCatalog, ok};
use crate::catalog::ApplyRequest;
use crate::crypto::MasterKey;
use crate::metrics;
use crate::proxies::ProxyRegistry;

/// Serves cluster-wide operations.
#[derive(Debug, Clone)]
pub(crate) struct ClusterApi {
    catalog: SharedCatalog,
    proxies: Arc<ProxyRegistry>,
    fleet: Arc<crate::fleet::Fleet>,
}

impl ClusterApi {
    /// A service over `catalog`, the proxy registry and the fleet (whose
    /// `auth_failed` marks an apply that changes a key or URL clears).
    pub(crate) fn new(
        catalog: SharedCatalog,
        proxies: Arc<ProxyRegistry>,
        fleet: Arc<crate::fleet::Fleet>,
    ) -> Self {
        ClusterApi {
            catalog,
            proxies,
            fleet,
        }
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn get_snapshot_info(
        &self,
        _request: Request<GetSnapshotInfoRequest>,
    ) -> RpcResult<GetSnapshotInfoResponse> {
        let info = self.catalog.info()?;
        ok(GetSnapshotInfoResponse {
            config_version: info.config_version,
            schema_version: info.schema_version,
            master_key_id: info.master_key_id.to_string(),
            backends: count(info.backends),
            client_keys: count(info.client_keys),
            agents: count(info.agents),
            proxies_connected: count(self.proxies.connected_count()),
            server_version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    async fn list_proxies(
        &self,
        _request: Request<ListProxiesRequest>,
    ) -> RpcResult<ListProxiesResponse> {
        ok(ListProxiesResponse {
            proxies: self.proxies.list().iter().map(|p| p.to_proto()).collect(),
            config_version: self.catalog.config_version(),
        })
    }

    async fn rotate_master_key(
        &self,
        request: Request<RotateMasterKeyRequest>,
    ) -> RpcResult<RotateMasterKeyResponse> {
        let actor = super::actor(&request);
        let new_key = MasterKey::from_hex(&request.into_inner().new_master_key).map_err(|_| {
            Status::invalid_argument("new_master_key: must be exactly 64 hex characters (32 bytes)")
        })?;
        let report = self.catalog.rotate_master_key(&actor, new_key).await?;
        metrics::master_key_rotated();
        tracing::info!(
            old_key_id = %report.old_key_id,
            new_key_id = %report.new_key_id,
            reencrypted = report.reencrypted,
            "master key rotated"
        );
        ok(RotateMasterKeyResponse {
            old_key_id: report.old_key_id.to_string(),
            new_key_id: report.new_key_id.to_string(),
            reencrypted: count(report.reencrypted),
        })
    }

    async fn export_config(
        &self,
        _request: Request<ExportConfigRequest>,
    ) -> RpcResult<ExportConfigResponse> {
        let (config, config_version) = self.catalog.export().await?;
        ok(ExportConfigResponse {
            config: Some(config),
            config_version,
        })
    }

    async fn apply_config(
        &self,
        request: Request<ApplyConfigRequest>,
    ) -> RpcResult<ApplyConfigResponse> {
        let actor = super::actor(&request);
        let req = request.into_inner();
        let (dry_run, prune) = (req.dry_run, req.prune);
        let outcome = self
            .catalog
            .apply(
                &actor,
                ApplyRequest {
                    config: req.config.unwrap_or_default(),
                    dry_run,
                    prune,
                },
            )
            .await?;
        let changed = outcome
            .changes
            .iter()
            .filter(|c| c.action != ChangeAction::Unchanged as i32)
            .count();
        if !dry_run {
            // Like UpdateBackend: a new key or URL clears a rejected key's mark.
            for c in outcome.changes.iter().filter(|c| {
                c.kind == "backend"
                    && c.action == ChangeAction::Update as i32
                    && c.fields.iter().any(|f| f == "api_key" || f == "base_url")
            }) {
                if let Ok(b) = self.catalog.get_backend(&c.name) {
                    super::backend::clear_auth_failure(&self.catalog, &self.fleet, &b.id, &b.name);
                }
            }
        }
        tracing::info!(
            dry_run,
            prune,
            changed,
            config_version = outcome.config_version,
            "configuration applied"
        );
        let mut resp = bounded_changes(outcome.changes);
        resp.config_version = outcome.config_version;
        // Every one-time secret, however many: they are shown only here.
        resp.created_secrets = outcome.created_secrets;
        ok(resp)
    }
}

/// At most this many changes are listed in an `ApplyConfig` answer.
pub(crate) const MAX_LISTED_CHANGES: usize = 1000;

/// The answer's `changes` bounded to [`MAX_LISTED_CHANGES`] (the changes
/// first, in document order; `unchanged` ones only while there is room),
/// with the per-action totals over all of them.
pub(crate) fn bounded_changes(changes: Vec<ConfigChange>) -> ApplyConfigResponse {
    let mut resp = ApplyConfigResponse::default();
    for c in &changes {
        match ChangeAction::try_from(c.action).unwrap_or(ChangeAction::Unspecified) {
            ChangeAction::Create => resp.created_total += 1,
            ChangeAction::Update => resp.updated_total += 1,
            ChangeAction::Delete => resp.deleted_total += 1,
            ChangeAction::Unchanged | ChangeAction::Unspecified => resp.unchanged_total += 1,
        }
    }
    if changes.len() <= MAX_LISTED_CHANGES {
        resp.changes = changes;
        return resp;
    }
    resp.changes_truncated = true;
    resp.changes = changes
        .into_iter()
        .filter(|c| c.action != ChangeAction::Unchanged as i32)
        .take(MAX_LISTED_CHANGES)
        .collect();
    resp
}

#[cfg(test)]
mod bounded_tests {
    use super::*;

    fn change(i: usize, action: ChangeAction) -> ConfigChange {
        ConfigChange {
            kind: "client_key".into(),
            name: format!("k{i}"),
            action: action as i32,
            fields: Vec::new(),
        }
    }

    #[test]
    fn small_applies_list_every_change() {
        let changes: Vec<_> = (0..10)
            .map(|i| change(i, ChangeAction::Unchanged))
            .collect();
        let r = bounded_changes(changes);
        assert_eq!(
            (r.changes.len(), r.changes_truncated, r.unchanged_total),
            (10, false, 10)
        );
    }

    #[test]
    fn big_applies_list_the_first_changes_and_count_all() {
        let mut changes: Vec<_> = (0..500)
            .map(|i| change(i, ChangeAction::Unchanged))
            .collect();
        changes.extend((500..3000).map(|i| change(i, ChangeAction::Create)));
        changes.push(change(3000, ChangeAction::Delete));
        let r = bounded_changes(changes);
        assert!(r.changes_truncated);
        assert_eq!(r.changes.len(), MAX_LISTED_CHANGES);
        assert_eq!(r.changes[0].name, "k500");
        assert!(
            r.changes
                .iter()
                .all(|c| c.action == ChangeAction::Create as i32)
        );
        assert_eq!(
            (
                r.created_total,
                r.updated_total,
                r.deleted_total,
                r.unchanged_total
            ),
            (2500, 0, 1, 500)
        );
    }
}

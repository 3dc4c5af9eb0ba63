//! `claw.v1.BackendService`.
//!
//! Backends come from the catalog; their live state from the fleet: while
//! the provider reports a backend's quota spent, its `status` reads
//! `quota_exhausted` and `quota_exhausted_until` says until when (a disabled
//! backend stays `disabled`, with the time still shown). While the provider
//! rejects its key (a 401/403 any proxy saw), it reads `auth_failed`, until
//! an update sets a new `api_key` or `base_url`, which clears it fleet-wide.

use std::sync::Arc;

use claw_proto::v1::backend_service_server::BackendService;
use claw_proto::v1::*;
use tonic::Request;

use super::{RpcResult, SharedCatalog, ok, required};
use crate::fleet::Fleet;

/// Serves backends from the catalog.
#[derive(Debug, Clone)]
pub(crate) struct BackendApi {
    catalog: SharedCatalog,
    fleet: Arc<Fleet>,
}

impl BackendApi {
    /// A service over `catalog`, with live state from `fleet`.
    pub(crate) fn new(catalog: SharedCatalog, fleet: Arc<Fleet>) -> Self {
        BackendApi { catalog, fleet }
    }

    /// Adds the fleet's view (auth failure, quota exhaustion) to a catalog
    /// backend.
    fn live(&self, mut b: Backend) -> Backend {
        let now = crate::catalog::records::now_ms();
        b.health = self.fleet.health().row(&b.id, now);
        let Some(c) = self.fleet.cooldowns().get(&b.id) else {
            return b;
        };
        if c.quota_exhausted(now) {
            b.quota_exhausted_until = crate::catalog::records::timestamp(c.quota_until_ms);
            if b.enabled {
                b.status = "quota_exhausted".to_string();
            }
        }
        if c.auth_failed && b.enabled {
            b.status = "auth_failed".to_string();
        }
        b
    }
}

#[tonic::async_trait]
impl BackendService for BackendApi {
    async fn create_backend(
        &self,
        request: Request<CreateBackendRequest>,
    ) -> RpcResult<CreateBackendResponse> {
        let actor = super::actor(&request);
        let backend = required(request.into_inner().backend, "backend")?;
        let (backend, config_version) = self.catalog.create_backend(&actor, backend).await?;
        tracing::info!(backend = %backend.id, name = %backend.name, config_version, "backend created");
        ok(CreateBackendResponse {
            backend: Some(self.live(backend)),
            config_version,
        })
    }

    async fn get_backend(
        &self,
        request: Request<GetBackendRequest>,
    ) -> RpcResult<GetBackendResponse> {
        let backend = self.catalog.get_backend(&request.into_inner().backend)?;
        ok(GetBackendResponse {
            backend: Some(self.live(backend)),
        })
    }

    async fn list_backends(
        &self,
        request: Request<ListBackendsRequest>,
    ) -> RpcResult<ListBackendsResponse> {
        let req = request.into_inner();
        let (page, next_page_token) = super::page::page(
            req.page_size,
            &req.page_token,
            |after, limit| self.catalog.backends_after(after, limit),
            |b| b.name.as_str(),
        )?;
        ok(ListBackendsResponse {
            backends: page.into_iter().map(|b| self.live(b)).collect(),
            next_page_token,
        })
    }

    async fn update_backend(
        &self,
        request: Request<UpdateBackendRequest>,
    ) -> RpcResult<UpdateBackendResponse> {
        let actor = super::actor(&request);
        let req = request.into_inner();
        // A key that differs from the stored one (setting the same key again
        // does not clear the mark: the proxies' credential would not change
        // either, and they would go on skipping the backend).
        let new_key = match req.api_key.as_deref() {
            Some(k) if !k.trim().is_empty() => !self.catalog.backend_key_is(&req.backend, k)?,
            _ => false,
        };
        let new_url = req.base_url.clone();
        let before = self.catalog.config_version();
        let old_url = self.catalog.get_backend(&req.backend)?.base_url;
        let (backend, config_version) = self.catalog.update_backend(&actor, req).await?;
        tracing::info!(backend = %backend.id, name = %backend.name, config_version, "backend updated");
        // A new key or URL is the operator's answer to a rejected key.
        let url_changed = new_url.is_some() && backend.base_url != old_url;
        if (new_key || url_changed) && config_version != before {
            clear_auth_failure(&self.catalog, &self.fleet, &backend.id, &backend.name);
        }
        ok(UpdateBackendResponse {
            backend: Some(self.live(backend)),
            config_version,
        })
    }

    async fn delete_backend(
        &self,
        request: Request<DeleteBackendRequest>,
    ) -> RpcResult<DeleteBackendResponse> {
        let actor = super::actor(&request);
        let ident = request.into_inner().backend;
        let config_version = self.catalog.delete_backend(&actor, &ident).await?;
        tracing::info!(backend = %ident, config_version, "backend deleted");
        ok(DeleteBackendResponse { config_version })
    }

    async fn set_backend_enabled(
        &self,
        request: Request<SetBackendEnabledRequest>,
    ) -> RpcResult<SetBackendEnabledResponse> {
        let actor = super::actor(&request);
        let req = request.into_inner();
        let (backend, config_version) = self
            .catalog
            .set_backend_enabled(&actor, &req.backend, req.enabled)
            .await?;
        tracing::info!(backend = %backend.id, enabled = req.enabled, config_version, "backend enabled changed");
        ok(SetBackendEnabledResponse {
            backend: Some(self.live(backend)),
            config_version,
        })
    }
}

/// Clears a backend's fleet-wide `auth_failed` mark after its key or URL
/// changed (by `UpdateBackend` or `ApplyConfig`): the operator's answer to
/// a rejected key.
pub(super) fn clear_auth_failure(
    catalog: &crate::catalog::Catalog,
    fleet: &Fleet,
    id: &str,
    name: &str,
) {
    let store = catalog.backend_state_store();
    let now = crate::catalog::records::now_ms();
    match fleet.cooldowns().clear_auth(store, id, now) {
        Ok(true) => {
            tracing::info!(backend = %id, name = %name, "key or URL updated: auth failure cleared fleet-wide");
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(backend = %id, error = %e, "could not clear the auth failure");
        }
    }
}

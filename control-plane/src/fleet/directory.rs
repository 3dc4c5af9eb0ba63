//! What report ingestion, cooldowns and rate shares need to know about the
//! configured backends (name, pool, limits, cooldown policy), cached per
//! configuration version so the hot path never decodes the catalog.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::Duration;

use claw_proto::v1::{Pool, PoolSettings};
use claw_proto::validate;

use crate::catalog::Catalog;

/// How a pool cools a backend after a 429 (when the proxy did not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CooldownPolicy {
    /// First cooldown.
    pub base_ms: u64,
    /// Cap.
    pub max_ms: u64,
    /// Doubling with each consecutive 429.
    pub exponential: bool,
}

impl Default for CooldownPolicy {
    /// The policy of a pool with default settings
    /// ([`validate::default_pool_settings`]).
    fn default() -> Self {
        CooldownPolicy::of(&validate::default_pool_settings(Pool::Primary))
    }
}

impl CooldownPolicy {
    /// `base·2^(n-1)` capped at `max` (or `base` when not exponential):
    /// [`claw_proto::cooldown::backoff`], the formula the proxies apply.
    pub fn duration_ms(&self, consecutive: u32) -> u64 {
        let d = claw_proto::cooldown::backoff(
            Duration::from_millis(self.base_ms),
            Duration::from_millis(self.max_ms),
            self.exponential,
            consecutive,
        );
        // At most max(base, max), both of which came from u64 milliseconds.
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    fn of(p: &PoolSettings) -> Self {
        CooldownPolicy {
            base_ms: p.cooldown_base_ms,
            max_ms: p.cooldown_max_ms,
            exponential: p.exponential,
        }
    }
}

/// One configured backend.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendInfo {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// `primary` or `fallback`.
    pub pool: &'static str,
    /// Whether it serves traffic.
    pub enabled: bool,
    /// Fleet-wide requests per minute (0 = unlimited).
    pub rpm: u32,
    /// Fleet-wide tokens per minute (0 = unlimited).
    pub tpm: u64,
    /// Its pool's cooldown policy.
    pub cooldown: CooldownPolicy,
}

/// Backends by id.
pub type Backends = HashMap<String, BackendInfo>;

/// The pool name used for usage no backend answered.
pub const NO_POOL: &str = "none";

/// Backends by id, rebuilt when the configuration version moves.
pub struct Directory {
    catalog: Arc<Catalog>,
    cache: RwLock<(u64, Arc<Backends>)>,
    /// The ids of the configured agents, by configuration version.
    agents: RwLock<(u64, Arc<std::collections::HashSet<String>>)>,
    /// The rpm of every rpm-limited client key by id, by configuration
    /// version.
    key_rpms: RwLock<(u64, Arc<KeyRpms>)>,
}

/// Client keys' rpm (> 0) by key id.
pub type KeyRpms = HashMap<String, u32>;

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory").finish_non_exhaustive()
    }
}

fn pool_name(pool: i32) -> &'static str {
    if pool == Pool::Fallback as i32 {
        "fallback"
    } else {
        "primary"
    }
}

impl Directory {
    /// An empty cache over `catalog` (filled on first use).
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Directory {
            catalog,
            cache: RwLock::new((0, Arc::new(HashMap::new()))),
            agents: RwLock::new((0, Arc::default())),
            key_rpms: RwLock::new((0, Arc::default())),
        }
    }

    /// The rpm of every rpm-limited client key, by id. On a catalog error
    /// the previous view is kept.
    pub fn key_rpms(&self) -> Arc<KeyRpms> {
        let version = self.catalog.config_version();
        {
            let c = self.key_rpms.read();
            if c.0 == version {
                return c.1.clone();
            }
        }
        match self.catalog.client_key_records() {
            Ok(list) => {
                let map: Arc<KeyRpms> = Arc::new(
                    list.into_iter()
                        .filter_map(|r| r.spec)
                        .filter(|k| k.rpm > 0)
                        .map(|k| (k.id, k.rpm))
                        .collect(),
                );
                *self.key_rpms.write() = (version, map.clone());
                map
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read client keys; using the previous view");
                self.key_rpms.read().1.clone()
            }
        }
    }

    /// The ids of the configured agents (reports about any other agent id
    /// are not tracked). On a catalog error the previous view is kept.
    pub fn agents(&self) -> Arc<std::collections::HashSet<String>> {
        let version = self.catalog.config_version();
        {
            let c = self.agents.read();
            if c.0 == version {
                return c.1.clone();
            }
        }
        match self.catalog.list_agents() {
            Ok(list) => {
                let set: Arc<std::collections::HashSet<String>> =
                    Arc::new(list.into_iter().map(|a| a.id).collect());
                *self.agents.write() = (version, set.clone());
                set
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read agents; using the previous view");
                self.agents.read().1.clone()
            }
        }
    }

    /// The backends of the current configuration. On a catalog error the
    /// previous view is kept (and the error logged).
    pub fn backends(&self) -> Arc<Backends> {
        let version = self.catalog.config_version();
        {
            let c = self.cache.read();
            if c.0 == version {
                return c.1.clone();
            }
        }
        match self.build() {
            Ok(map) => {
                let map = Arc::new(map);
                *self.cache.write() = (version, map.clone());
                map
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read backends; using the previous view");
                self.cache.read().1.clone()
            }
        }
    }

    fn build(&self) -> Result<Backends, crate::catalog::CatalogError> {
        let pools = self.catalog.list_pools()?;
        let policy = |pool: &str| {
            pools
                .iter()
                .find(|p| pool_name(p.pool) == pool)
                .map(CooldownPolicy::of)
                .unwrap_or_default()
        };
        Ok(self
            .catalog
            .backend_records()?
            .into_iter()
            .filter_map(|r| r.spec)
            .map(|b| {
                let pool = pool_name(b.pool);
                let info = BackendInfo {
                    id: b.id.clone(),
                    name: b.name,
                    pool,
                    enabled: b.enabled,
                    rpm: b.rpm,
                    tpm: b.tpm.map(u64::from).unwrap_or(0),
                    cooldown: policy(pool),
                };
                (b.id, info)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooldowns_double_up_to_the_cap() {
        let p = CooldownPolicy::default();
        assert_eq!(p.duration_ms(0), 5_000);
        assert_eq!(p.duration_ms(1), 5_000);
        assert_eq!(p.duration_ms(3), 20_000);
        assert_eq!(p.duration_ms(40), 300_000);
        let flat = CooldownPolicy {
            exponential: false,
            ..p
        };
        assert_eq!(flat.duration_ms(5), 5_000);
    }
}

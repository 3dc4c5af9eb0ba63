//! Pool settings. Both pools always exist: until set, a pool has
//! [`claw_proto::validate::default_pool_settings`].

use claw_proto::Pool;
use claw_proto::v1::{PoolSettings, UpdatePoolSettingsRequest};
use claw_proto::validate::{self, FieldError};

use super::records::{self, FieldDiff, PoolRecord};
use super::{Catalog, CatalogError, Result};
use crate::audit::{Actor, Change};
use crate::store::{Tree, Txn};

/// The pools, in the order they are listed.
pub(super) const POOLS: [Pool; 2] = [Pool::Primary, Pool::Fallback];

/// Parses the `pool` field of a request: primary or fallback.
pub(super) fn parse_pool(field: &str, value: i32) -> Result<Pool> {
    match Pool::try_from(value) {
        Ok(p @ (Pool::Primary | Pool::Fallback)) => Ok(p),
        _ => Err(CatalogError::invalid(FieldError::new(
            field,
            "must be primary or fallback",
        ))),
    }
}

/// The settings fields in which two pools differ.
pub(super) fn diff(old: &PoolSettings, new: &PoolSettings) -> FieldDiff {
    let mut d = FieldDiff::default();
    d.check(
        "cooldown_base_ms",
        &old.cooldown_base_ms,
        &new.cooldown_base_ms,
    );
    d.check(
        "cooldown_max_ms",
        &old.cooldown_max_ms,
        &new.cooldown_max_ms,
    );
    d.check("exponential", &old.exponential, &new.exponential);
    d.check(
        "emergency_fraction",
        &old.emergency_fraction,
        &new.emergency_fraction,
    );
    d.check("max_retries", &old.max_retries, &new.max_retries);
    d.check("queue_depth", &old.queue_depth, &new.queue_depth);
    d.check(
        "queue_timeout_ms",
        &old.queue_timeout_ms,
        &new.queue_timeout_ms,
    );
    d.check(
        "request_timeout_ms",
        &old.request_timeout_ms,
        &new.request_timeout_ms,
    );
    d
}

/// Stores a pool's settings inside a transaction.
pub(super) fn put(txn: &dyn Txn, settings: &PoolSettings, now: i64) -> Result<()> {
    let pool = parse_pool("pool", settings.pool)?;
    let rec = PoolRecord {
        spec: Some(*settings),
        updated_at_ms: now,
    };
    txn.insert(Tree::Pools, pool.name().as_bytes(), &records::encode(&rec))?;
    Ok(())
}

impl Catalog {
    /// The settings of one pool (defaults until set).
    pub fn get_pool(&self, pool: Pool) -> Result<PoolSettings> {
        let pool = parse_pool("pool", pool as i32)?;
        match self.store.get(Tree::Pools, pool.name().as_bytes())? {
            Some(raw) => {
                let rec: PoolRecord = records::decode(Tree::Pools, &raw)?;
                rec.spec
                    .ok_or_else(|| CatalogError::Corrupt("pool record without settings".into()))
            }
            None => Ok(validate::default_pool_settings(pool)),
        }
    }

    /// Primary then fallback.
    pub fn list_pools(&self) -> Result<Vec<PoolSettings>> {
        POOLS.iter().map(|p| self.get_pool(*p)).collect()
    }

    /// Patches a pool's settings with the fields set in `req`, then validates
    /// the result. A patch that changes nothing keeps the version.
    pub async fn update_pool(
        &self,
        actor: &Actor,
        req: UpdatePoolSettingsRequest,
    ) -> Result<(PoolSettings, u64)> {
        let pool = parse_pool("pool", req.pool)?;
        let guard = self.lock().await;
        let old = self.get_pool(pool)?;
        let mut p = old;
        if let Some(v) = req.cooldown_base_ms {
            p.cooldown_base_ms = v;
        }
        if let Some(v) = req.cooldown_max_ms {
            p.cooldown_max_ms = v;
        }
        if let Some(v) = req.exponential {
            p.exponential = v;
        }
        if let Some(v) = req.emergency_fraction {
            p.emergency_fraction = v;
        }
        if let Some(v) = req.max_retries {
            p.max_retries = v;
        }
        if let Some(v) = req.queue_depth {
            p.queue_depth = v;
        }
        if let Some(v) = req.queue_timeout_ms {
            p.queue_timeout_ms = v;
        }
        if let Some(v) = req.request_timeout_ms {
            p.request_timeout_ms = v;
        }
        validate::validate_pool_settings(&p).map_err(CatalogError::invalid)?;
        let d = diff(&old, &p);
        if d.is_empty() {
            return Ok((p, self.config_version()));
        }
        let change = Change::new(
            "pool",
            pool.name(),
            pool.name(),
            "updated",
            d.into_changes(),
        );
        let now = records::now_ms();
        let (_, version) = self
            .commit(&guard, actor, "UpdatePoolSettings", |txn| {
                put(txn, &p, now)?;
                Ok(((), vec![change.clone()]))
            })
            .await?;
        Ok((p, version))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[tokio::test]
    async fn both_pools_exist_and_patches_validate() {
        let (_dir, c) = catalog().await;
        let pools = c.list_pools().expect("list");
        assert_eq!(pools.len(), 2);
        assert_eq!(pools[0], validate::default_pool_settings(Pool::Primary));
        assert_eq!(pools[1].pool, Pool::Fallback as i32);

        let v = c.config_version();
        let (p, v1) = c
            .update_pool(
                &Actor::system(),
                UpdatePoolSettingsRequest {
                    pool: Pool::Fallback as i32,
                    max_retries: Some(5),
                    ..Default::default()
                },
            )
            .await
            .expect("update");
        assert_eq!((p.max_retries, v1), (5, v + 1));
        assert_eq!(c.get_pool(Pool::Fallback).expect("get").max_retries, 5);
        assert_eq!(c.get_pool(Pool::Primary).expect("get").max_retries, 2);

        let err = c
            .update_pool(
                &Actor::system(),
                UpdatePoolSettingsRequest {
                    pool: Pool::Primary as i32,
                    emergency_fraction: Some(2.0),
                    ..Default::default()
                },
            )
            .await
            .expect_err("invalid");
        assert!(err.to_string().starts_with("emergency_fraction: "));
        let err = c
            .update_pool(&Actor::system(), UpdatePoolSettingsRequest::default())
            .await
            .expect_err("unspecified pool");
        assert_eq!(err.to_string(), "pool: must be primary or fallback");
        assert_eq!(c.config_version(), v1);
    }
}

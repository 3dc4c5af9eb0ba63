//! `clawctl pool show|list|get|set`: cooldown, retry and queue settings of the primary
//! and fallback pools.

use std::time::Duration;

use anyhow::anyhow;
use claw_proto::Pool;
use claw_proto::v1::{
    GetPoolSettingsRequest, ListPoolSettingsRequest, PoolSettings, UpdatePoolSettingsRequest,
};

use crate::backend::pool_name;
use crate::cli::{PoolCmd, PoolSetArgs};
use crate::document::{PoolDoc, PoolsDoc};
use crate::duration;
use crate::output::{Table, yes_no};
use crate::session::Session;

/// Runs a `pool` verb.
pub(crate) async fn run(session: &Session, cmd: PoolCmd) -> anyhow::Result<()> {
    match cmd {
        PoolCmd::Show { pool: None } | PoolCmd::List => {
            let conn = session.connect().await?;
            let resp = conn
                .call(conn.pools().list_pool_settings(ListPoolSettingsRequest {}))
                .await?;
            session.emit_resource(
                &resp.settings,
                || document(&resp.settings),
                |out| table(&resp.settings).write(out),
            )
        }
        PoolCmd::Show { pool: Some(pool) } | PoolCmd::Get { pool } => {
            let conn = session.connect().await?;
            let resp = conn
                .call(conn.pools().get_pool_settings(GetPoolSettingsRequest {
                    pool: Pool::from(pool) as i32,
                }))
                .await?;
            print_one(session, &resp.settings.unwrap_or_default())
        }
        PoolCmd::Set(args) => {
            let req = update_request(args)?;
            let conn = session.connect().await?;
            let resp = conn.call(conn.pools().update_pool_settings(req)).await?;
            print_one(session, &resp.settings.unwrap_or_default())
        }
    }
}

fn print_one(session: &Session, p: &PoolSettings) -> anyhow::Result<()> {
    let one = std::slice::from_ref(p);
    session.emit_resource(p, || document(one), |out| table(one).write(out))
}

/// The `pools:` section of an `export` document holding `pools`: what
/// `-o yaml` prints (`cooldown_base: 5s`, keyed by pool name).
fn document(pools: &[PoolSettings]) -> PoolsDoc {
    let mut doc = PoolsDoc::default();
    for p in pools {
        match Pool::try_from(p.pool) {
            Ok(Pool::Primary) => doc.primary = Some(PoolDoc::from(p)),
            Ok(Pool::Fallback) => doc.fallback = Some(PoolDoc::from(p)),
            _ => {}
        }
    }
    doc
}

fn update_request(args: PoolSetArgs) -> anyhow::Result<UpdatePoolSettingsRequest> {
    let ms = |flag: &str, d: Option<Duration>| -> anyhow::Result<Option<u64>> {
        d.map(|d| duration::to_millis(d).map_err(|e| anyhow!("--{flag}: {e}")))
            .transpose()
    };
    Ok(UpdatePoolSettingsRequest {
        pool: Pool::from(args.pool) as i32,
        cooldown_base_ms: ms("cooldown-base", args.cooldown_base)?,
        cooldown_max_ms: ms("cooldown-max", args.cooldown_max)?,
        exponential: args.exponential,
        emergency_fraction: args.emergency_fraction,
        max_retries: args.max_retries,
        queue_depth: args.queue_depth,
        queue_timeout_ms: ms("queue-timeout", args.queue_timeout)?,
        request_timeout_ms: ms("request-timeout", args.request_timeout)?,
    })
}

/// One row per pool.
pub(crate) fn table(pools: &[PoolSettings]) -> Table {
    let mut t = Table::new(&[
        "POOL",
        "COOLDOWN BASE",
        "COOLDOWN MAX",
        "EXPONENTIAL",
        "EMERGENCY FRACTION",
        "MAX RETRIES",
        "QUEUE DEPTH",
        "QUEUE TIMEOUT",
        "REQUEST TIMEOUT",
    ]);
    for p in pools {
        t.row(vec![
            pool_name(p.pool).to_string(),
            duration::format_ms(p.cooldown_base_ms),
            duration::format_ms(p.cooldown_max_ms),
            yes_no(p.exponential),
            p.emergency_fraction.to_string(),
            p.max_retries.to_string(),
            p.queue_depth.to_string(),
            duration::format_ms(p.queue_timeout_ms),
            duration::format_ms(p.request_timeout_ms),
        ]);
    }
    t
}

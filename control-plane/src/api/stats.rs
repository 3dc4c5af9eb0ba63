//! `claw.v1.StatsService`: usage totals, hourly and daily usage, and the
//! cooldown history, read from the buckets report ingestion writes.

use std::sync::Arc;

use claw_proto::v1::stats_service_server::StatsService;
use claw_proto::v1::*;
use tonic::Request;

use super::{RpcResult, ok};
use crate::fleet::Fleet;
use crate::fleet::cooldowns;
use crate::stats::{Stats, ms_of};

/// Default and largest page of cooldown events.
const DEFAULT_EVENTS: usize = 100;
const MAX_EVENTS: usize = 10_000;

/// Serves usage and cooldown queries.
#[derive(Debug, Clone)]
pub(crate) struct StatsApi {
    stats: Stats,
    fleet: Arc<Fleet>,
}

impl StatsApi {
    /// A service over the history and the fleet's backends.
    pub(crate) fn new(stats: Stats, fleet: Arc<Fleet>) -> Self {
        StatsApi { stats, fleet }
    }
}

#[tonic::async_trait]
impl StatsService for StatsApi {
    async fn get_usage_totals(
        &self,
        request: Request<GetUsageTotalsRequest>,
    ) -> RpcResult<GetUsageTotalsResponse> {
        let f = self.stats.resolve(request.get_ref().filter.as_ref())?;
        ok(GetUsageTotalsResponse {
            totals: Some(self.stats.totals(&f)?),
        })
    }

    async fn list_hourly_usage(
        &self,
        request: Request<ListHourlyUsageRequest>,
    ) -> RpcResult<ListHourlyUsageResponse> {
        let f = self.stats.resolve(request.get_ref().filter.as_ref())?;
        ok(ListHourlyUsageResponse {
            hours: self.stats.hourly(&f)?,
        })
    }

    async fn list_daily_usage(
        &self,
        request: Request<ListDailyUsageRequest>,
    ) -> RpcResult<ListDailyUsageResponse> {
        let f = self.stats.resolve(request.get_ref().filter.as_ref())?;
        ok(ListDailyUsageResponse {
            days: self.stats.daily(&f)?,
        })
    }

    async fn list_cooldown_events(
        &self,
        request: Request<ListCooldownEventsRequest>,
    ) -> RpcResult<ListCooldownEventsResponse> {
        let r = request.into_inner();
        let backend = match r.backend.trim() {
            "" => None,
            b => Some(self.stats.resolve_backend(b)?),
        };
        let limit = match r.limit {
            0 => DEFAULT_EVENTS,
            n => (n as usize).min(MAX_EVENTS),
        };
        let events = cooldowns::list_events(
            self.stats.store().as_ref(),
            &self.fleet.directory().backends(),
            backend.as_deref(),
            r.start.as_ref().map(ms_of),
            r.end.as_ref().map(ms_of),
            limit,
        )
        .map_err(crate::catalog::CatalogError::from)?;
        ok(ListCooldownEventsResponse { events })
    }
}

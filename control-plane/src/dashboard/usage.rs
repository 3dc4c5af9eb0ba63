//! `GET /api/v1/usage`: usage series for the charts, built from
//! `ListHourlyUsage` / `ListDailyUsage`.
//!
//! `granularity=hourly|daily` (default hourly), `since=` a duration
//! (default 24h hourly, 7d daily), `group_by=model|backend|key|agent`
//! (default model), and filters `model=`, `backend=`, `key=`, `agent=`,
//! `kind=heartbeat|interactive` (run kind; empty = both).
//! Hourly rows carry backend and model, so those groupings are one query;
//! daily rows carry only the pool, and neither carries key or agent, so the
//! other groupings run one filtered query per group value (every canonical
//! model, backend, client key or agent in the configuration; usage of a
//! deleted one is not shown). Groups without usage are left out.

use std::collections::BTreeMap;
use std::time::Duration;

use claw_proto::v1::stats_service_server::StatsService as _;
use claw_proto::v1::*;
use serde_json::{Value, json};
use tonic::Status;

use super::Dashboard;
use super::call::{Caller, ago};
use super::query::Query;

/// At most this many groups per series request.
const MAX_GROUPS: usize = 200;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Granularity {
    Hourly,
    Daily,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum GroupBy {
    Model,
    Backend,
    Key,
    Agent,
}

/// Sums of one group, by time (RFC 3339).
type Points = BTreeMap<String, UsageTotals>;

fn add(into: &mut UsageTotals, t: &UsageTotals) {
    into.requests += t.requests;
    into.errors += t.errors;
    into.prompt_tokens += t.prompt_tokens;
    into.completion_tokens += t.completion_tokens;
    into.cache_read_tokens += t.cache_read_tokens;
    into.total_tokens += t.total_tokens;
    into.cost += t.cost;
}

fn hour_of(h: &HourlyUsage) -> String {
    h.hour
        .as_ref()
        .and_then(|t| jiff::Timestamp::new(t.seconds, 0).ok())
        .map_or_else(String::new, |t| t.to_string())
}

/// Rows of one query as `(time, backend id, model, totals)`.
async fn rows(
    d: &Dashboard,
    c: &Caller,
    g: Granularity,
    filter: UsageFilter,
) -> Result<Vec<(String, String, String, UsageTotals)>, Status> {
    let stats = &d.services.stats;
    Ok(match g {
        Granularity::Hourly => {
            let msg = ListHourlyUsageRequest {
                filter: Some(filter),
            };
            let r = c.request("/claw.v1.StatsService/ListHourlyUsage", msg, false)?;
            stats
                .list_hourly_usage(r)
                .await?
                .into_inner()
                .hours
                .into_iter()
                .map(|h| {
                    let time = hour_of(&h);
                    (time, h.backend_id, h.model, h.totals.unwrap_or_default())
                })
                .collect()
        }
        Granularity::Daily => {
            let msg = ListDailyUsageRequest {
                filter: Some(filter),
            };
            let r = c.request("/claw.v1.StatsService/ListDailyUsage", msg, false)?;
            stats
                .list_daily_usage(r)
                .await?
                .into_inner()
                .days
                .into_iter()
                .map(|day| {
                    let time = format!("{}T00:00:00Z", day.day);
                    (
                        time,
                        String::new(),
                        String::new(),
                        day.totals.unwrap_or_default(),
                    )
                })
                .collect()
        }
    })
}

/// The group values to query one by one: `(label, filter with it set)`.
fn groups(
    d: &Dashboard,
    c: &Caller,
    by: GroupBy,
    base: &UsageFilter,
) -> Result<Vec<(String, UsageFilter)>, Status> {
    let catalog = &d.catalog;
    let mut out: Vec<(String, UsageFilter)> = match by {
        GroupBy::Model => {
            c.request("/claw.v1.BackendService/ListBackends", (), false)?;
            let mut models: Vec<String> = catalog
                .list_backends()?
                .into_iter()
                .flat_map(|b| b.models.into_iter().map(|m| m.canonical))
                .collect();
            models.sort();
            models.dedup();
            models
                .into_iter()
                .map(|m| {
                    (
                        m.clone(),
                        UsageFilter {
                            model: m,
                            ..base.clone()
                        },
                    )
                })
                .collect()
        }
        GroupBy::Backend => {
            c.request("/claw.v1.BackendService/ListBackends", (), false)?;
            catalog
                .list_backends()?
                .into_iter()
                .map(|b| {
                    (
                        b.name,
                        UsageFilter {
                            backend: b.id,
                            ..base.clone()
                        },
                    )
                })
                .collect()
        }
        GroupBy::Key => {
            c.request("/claw.v1.ClientKeyService/ListClientKeys", (), false)?;
            catalog
                .list_client_keys()?
                .into_iter()
                .map(|k| {
                    (
                        k.name,
                        UsageFilter {
                            client_key: k.id,
                            ..base.clone()
                        },
                    )
                })
                .collect()
        }
        GroupBy::Agent => {
            c.request("/claw.v1.AgentService/ListAgents", (), false)?;
            catalog
                .list_agents()?
                .into_iter()
                .map(|a| {
                    (
                        a.id.clone(),
                        UsageFilter {
                            agent: a.id,
                            ..base.clone()
                        },
                    )
                })
                .collect()
        }
    };
    // A filter on the grouped dimension keeps only that group.
    let wanted = match by {
        GroupBy::Model => &base.model,
        GroupBy::Backend => &base.backend,
        GroupBy::Key => &base.client_key,
        GroupBy::Agent => &base.agent,
    };
    if !wanted.is_empty() {
        out.retain(|(label, f)| {
            let v = match by {
                GroupBy::Model => &f.model,
                GroupBy::Backend => &f.backend,
                GroupBy::Key => &f.client_key,
                GroupBy::Agent => &f.agent,
            };
            v == wanted || label == wanted
        });
        // Keep the caller's spelling (name or id): the service resolves it.
        for (_, f) in &mut out {
            match by {
                GroupBy::Model => f.model.clone_from(wanted),
                GroupBy::Backend => f.backend.clone_from(wanted),
                GroupBy::Key => f.client_key.clone_from(wanted),
                GroupBy::Agent => f.agent.clone_from(wanted),
            }
        }
    }
    out.truncate(MAX_GROUPS);
    Ok(out)
}

/// The series, as the page draws them.
pub(super) async fn series(d: &Dashboard, c: &Caller, q: &Query) -> Result<Value, Status> {
    let (granularity, g) = match q.get("granularity") {
        "" | "hourly" => ("hourly", Granularity::Hourly),
        "daily" => ("daily", Granularity::Daily),
        other => {
            return Err(Status::invalid_argument(format!(
                "granularity: must be hourly or daily, got `{other}`"
            )));
        }
    };
    let (group_by, by) = match q.get("group_by") {
        "" | "model" => ("model", GroupBy::Model),
        "backend" => ("backend", GroupBy::Backend),
        "key" => ("key", GroupBy::Key),
        "agent" => ("agent", GroupBy::Agent),
        other => {
            return Err(Status::invalid_argument(format!(
                "group_by: must be model, backend, key or agent, got `{other}`"
            )));
        }
    };
    let default_since = match g {
        Granularity::Hourly => Duration::from_secs(86_400),
        Granularity::Daily => Duration::from_secs(7 * 86_400),
    };
    let base = UsageFilter {
        backend: q.get("backend").to_string(),
        model: q.get("model").to_string(),
        client_key: q.get("key").to_string(),
        agent: q.get("agent").to_string(),
        start: ago(q.duration("since", default_since)?),
        end: None,
        kind: q.get("kind").to_string(),
    };
    let mut by_group: BTreeMap<String, Points> = BTreeMap::new();
    if g == Granularity::Hourly && matches!(by, GroupBy::Model | GroupBy::Backend) {
        let names: BTreeMap<String, String> = d
            .catalog
            .list_backends()?
            .into_iter()
            .map(|b| (b.id, b.name))
            .collect();
        for (time, backend, model, t) in rows(d, c, g, base).await? {
            let label = match by {
                GroupBy::Model => model,
                _ => names.get(&backend).cloned().unwrap_or(backend),
            };
            add(
                by_group.entry(label).or_default().entry(time).or_default(),
                &t,
            );
        }
    } else {
        for (label, filter) in groups(d, c, by, &base)? {
            for (time, _, _, t) in rows(d, c, g, filter).await? {
                add(
                    by_group
                        .entry(label.clone())
                        .or_default()
                        .entry(time)
                        .or_default(),
                    &t,
                );
            }
        }
    }
    let series: Vec<Value> = by_group
        .into_iter()
        .filter(|(_, points)| {
            points
                .values()
                .any(|t| t.requests > 0 || t.total_tokens > 0)
        })
        .map(|(group, points)| {
            let points: Vec<Value> = points
                .into_iter()
                .map(|(time, t)| {
                    json!({
                        "time": time,
                        "requests": t.requests,
                        "errors": t.errors,
                        "prompt_tokens": t.prompt_tokens,
                        "completion_tokens": t.completion_tokens,
                        "cache_read_tokens": t.cache_read_tokens,
                        "total_tokens": t.total_tokens,
                        "cost": t.cost,
                    })
                })
                .collect();
            json!({ "group": group, "points": points })
        })
        .collect();
    Ok(json!({ "granularity": granularity, "group_by": group_by, "series": series }))
}

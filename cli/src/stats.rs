//! `clawctl stats total|hourly|daily|cooldowns`: usage and cooldown history
//! from the control plane's `StatsService`.
//!
//! Time bounds take RFC 3339 (`2026-01-02T15:04:05Z`) or a duration back
//! from now (`24h`, `7d`, `90m`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use claw_proto::v1::{
    GetUsageTotalsRequest, ListCooldownEventsRequest, ListDailyUsageRequest,
    ListHourlyUsageRequest, UsageFilter, UsageTotals,
};

use crate::output::{self, Details, Table};
use crate::session::Session;

/// `clawctl stats ...`
#[derive(Debug, Subcommand)]
pub enum StatsCmd {
    /// Usage summed over the filter (one object with -o json).
    #[command(after_help = "Examples:\n  clawctl stats total\n  \
clawctl stats total --backend b1 --since 24h -o json\n  clawctl stats total --key team-a --agent ops-bot\n  \
how much heartbeats cost: clawctl stats total --kind heartbeat")]
    Total(FilterArgs),
    /// Usage per hour, backend and model, oldest first.
    Hourly(FilterArgs),
    /// Usage per UTC day and pool, oldest first.
    Daily(FilterArgs),
    /// Cooldowns caused by 429s, newest first.
    Cooldowns(CooldownArgs),
}

/// Filters of the usage verbs.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Backend name or id.
    #[arg(long, value_name = "NAME|ID")]
    pub backend: Option<String>,
    /// Canonical model name.
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// Client key name or id.
    #[arg(long, value_name = "NAME|ID")]
    pub key: Option<String>,
    /// Agent id.
    #[arg(long, value_name = "ID")]
    pub agent: Option<String>,
    /// Start (inclusive): RFC 3339 or a duration back from now (24h, 7d).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<SystemTime>,
    /// End (exclusive): RFC 3339 or a duration back from now.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<SystemTime>,
    /// Run kind: heartbeat (the control plane's heartbeat runs) or
    /// interactive (everything else); both when absent. How much
    /// heartbeats cost: clawctl stats total --kind heartbeat
    #[arg(long, value_name = "heartbeat|interactive")]
    pub kind: Option<String>,
}

/// Filters of `stats cooldowns`.
#[derive(Debug, Args)]
pub struct CooldownArgs {
    /// Backend name or id.
    #[arg(long, value_name = "NAME|ID")]
    pub backend: Option<String>,
    /// Start (inclusive): RFC 3339 or a duration back from now.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<SystemTime>,
    /// End (exclusive): RFC 3339 or a duration back from now.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<SystemTime>,
    /// At most this many events.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

/// Parses `2026-01-02T15:04:05Z` or `24h` (that long ago).
pub(crate) fn parse_time(s: &str) -> Result<SystemTime, String> {
    let s = s.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    match humantime::parse_duration(s) {
        Ok(d) => SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| format!("{s:?} reaches before the epoch")),
        Err(_) => Err(format!(
            "invalid time {s:?}; use RFC 3339 (2026-01-02T15:04:05Z) or a duration back from now (24h, 7d)"
        )),
    }
}

/// A time as a protobuf timestamp.
pub(crate) fn timestamp(t: Option<SystemTime>) -> Option<prost_types::Timestamp> {
    let d = t?.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Some(prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    })
}

/// `--kind` as the API spells it: `heartbeat`, `interactive`, or empty.
/// Checked here, before any call, so a typo is one line naming the flag
/// (the control plane refuses it too, naming `filter.kind`).
fn run_kind(kind: Option<&str>) -> anyhow::Result<String> {
    match kind.map(str::trim) {
        None => Ok(String::new()),
        Some(k) if k.eq_ignore_ascii_case("heartbeat") => Ok("heartbeat".into()),
        Some(k) if k.eq_ignore_ascii_case("interactive") => Ok("interactive".into()),
        Some(other) => anyhow::bail!("--kind: must be heartbeat or interactive, got {other:?}"),
    }
}

impl FilterArgs {
    fn filter(&self) -> anyhow::Result<UsageFilter> {
        Ok(UsageFilter {
            backend: self.backend.clone().unwrap_or_default(),
            model: self.model.clone().unwrap_or_default(),
            client_key: self.key.clone().unwrap_or_default(),
            agent: self.agent.clone().unwrap_or_default(),
            start: timestamp(self.since),
            end: timestamp(self.until),
            kind: run_kind(self.kind.as_deref())?,
        })
    }
}

fn totals_row(t: &UsageTotals) -> Vec<String> {
    vec![
        t.requests.to_string(),
        t.errors.to_string(),
        t.translated.to_string(),
        t.prompt_tokens.to_string(),
        t.completion_tokens.to_string(),
        t.cache_read_tokens.to_string(),
        t.cache_write_tokens.to_string(),
        t.total_tokens.to_string(),
        format!("{:.6}", t.cost),
    ]
}

const TOTAL_COLUMNS: [&str; 9] = [
    "REQUESTS",
    "ERRORS",
    "TRANSLATED",
    "PROMPT",
    "COMPLETION",
    "CACHE READ",
    "CACHE WRITE",
    "TOTAL",
    "COST (USD)",
];

fn header(first: &[&'static str]) -> Vec<&'static str> {
    first.iter().chain(TOTAL_COLUMNS.iter()).copied().collect()
}

/// Runs a `stats` verb.
pub(crate) async fn run(session: &Session, cmd: StatsCmd) -> anyhow::Result<()> {
    // A bad filter fails before connecting.
    let filter = match &cmd {
        StatsCmd::Total(a) | StatsCmd::Hourly(a) | StatsCmd::Daily(a) => Some(a.filter()?),
        StatsCmd::Cooldowns(_) => None,
    };
    let conn = session.connect().await?;
    let client = || conn.stats();
    match cmd {
        StatsCmd::Total(_) => {
            let resp = conn
                .call(client().get_usage_totals(GetUsageTotalsRequest { filter }))
                .await?;
            let t = resp.totals.unwrap_or_default();
            session.emit(&t, |out| {
                let mean = t.latency_ms_sum.checked_div(t.requests).unwrap_or(0);
                Details::new()
                    .field("requests", t.requests.to_string())
                    .field("errors", t.errors.to_string())
                    .field("prompt_tokens", t.prompt_tokens.to_string())
                    .field("completion_tokens", t.completion_tokens.to_string())
                    .field("cache_read_tokens", t.cache_read_tokens.to_string())
                    .field("cache_write_tokens", t.cache_write_tokens.to_string())
                    .field("total_tokens", t.total_tokens.to_string())
                    .field("cost", format!("{:.6}", t.cost))
                    .field("streamed", t.streamed.to_string())
                    .field("translated", t.translated.to_string())
                    .field("mean_latency_ms", mean.to_string())
                    .write(out)
            })
        }
        StatsCmd::Hourly(_) => {
            let resp = conn
                .call(client().list_hourly_usage(ListHourlyUsageRequest { filter }))
                .await?;
            session.emit(&resp.hours, |out| {
                let mut table = Table::new(&header(&["HOUR (UTC)", "BACKEND", "MODEL"]));
                for h in &resp.hours {
                    let mut row = vec![
                        output::timestamp(&h.hour),
                        h.backend_id.clone(),
                        h.model.clone(),
                    ];
                    row.extend(totals_row(&h.totals.unwrap_or_default()));
                    table.row(row);
                }
                table.write(out)
            })
        }
        StatsCmd::Daily(_) => {
            let resp = conn
                .call(client().list_daily_usage(ListDailyUsageRequest { filter }))
                .await?;
            session.emit(&resp.days, |out| {
                let mut table = Table::new(&header(&["DAY (UTC)", "POOL"]));
                for d in &resp.days {
                    let mut row = vec![d.day.clone(), d.pool.clone()];
                    row.extend(totals_row(&d.totals.unwrap_or_default()));
                    table.row(row);
                }
                table.write(out)
            })
        }
        StatsCmd::Cooldowns(args) => {
            let resp = conn
                .call(client().list_cooldown_events(ListCooldownEventsRequest {
                    backend: args.backend.unwrap_or_default(),
                    start: timestamp(args.since),
                    end: timestamp(args.until),
                    limit: args.limit,
                }))
                .await?;
            if resp.events.is_empty() && session.format == output::Format::Table {
                return session.emit(&resp.events, |out| writeln!(out, "no cooldowns"));
            }
            session.emit(&resp.events, |out| {
                let mut table = Table::new(&[
                    "STARTED (UTC)",
                    "BACKEND",
                    "PROXY",
                    "CONSECUTIVE",
                    "DURATION",
                    "UNTIL (UTC)",
                    "SUMMARY",
                ]);
                for e in &resp.events {
                    table.row(vec![
                        output::timestamp(&e.started_at),
                        if e.backend_name.is_empty() {
                            e.backend_id.clone()
                        } else {
                            e.backend_name.clone()
                        },
                        e.node_id.clone(),
                        e.consecutive.to_string(),
                        crate::duration::format(Duration::from_millis(e.duration_ms)),
                        output::timestamp(&e.until),
                        e.summary.clone(),
                    ]);
                }
                table.write(out)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let t = parse_time("2026-01-02T15:04:05Z").expect("rfc 3339");
        assert_eq!(
            t.duration_since(UNIX_EPOCH).expect("after epoch").as_secs(),
            1_767_366_245
        );
        let ago = parse_time("24h").expect("relative");
        let age = SystemTime::now().duration_since(ago).expect("in the past");
        assert!(age >= Duration::from_secs(86_399) && age < Duration::from_secs(86_500));
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn kinds_are_heartbeat_or_interactive_and_a_typo_names_the_flag() {
        assert_eq!(run_kind(None).ok().as_deref(), Some(""));
        assert_eq!(
            run_kind(Some("heartbeat")).ok().as_deref(),
            Some("heartbeat")
        );
        assert_eq!(
            run_kind(Some("Interactive")).ok().as_deref(),
            Some("interactive")
        );
        let e = run_kind(Some("hb")).expect_err("refused").to_string();
        assert_eq!(e, "--kind: must be heartbeat or interactive, got \"hb\"");
    }

    #[test]
    fn every_total_column_has_its_value_translated_included() {
        let t = UsageTotals {
            requests: 5,
            translated: 4,
            ..Default::default()
        };
        let row = totals_row(&t);
        assert_eq!(row.len(), TOTAL_COLUMNS.len());
        let at = TOTAL_COLUMNS
            .iter()
            .position(|c| *c == "TRANSLATED")
            .expect("a TRANSLATED column");
        assert_eq!(row[at], "4");
    }
}

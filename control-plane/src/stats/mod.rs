//! Usage history in sled: the buckets report ingestion writes, the queries
//! `StatsService` answers, pruned by [`crate::retention`].
//!
//! - [`keys`]: the time-major bucket key layout (hourly and daily).
//! - [`totals`]: arithmetic on `UsageTotals`, the value of every bucket.
//!
//! Buckets are written by [`crate::report`] inside the transaction that
//! stores a report batch, so a batch is counted exactly once. Queries here
//! only read: totals use the daily buckets for the whole UTC days inside the
//! range and the hourly buckets for the partial days at its edges; the
//! hourly list reads hourly buckets; the daily list reads daily buckets.
//! Time filters have the granularity of the buckets they read: a bucket
//! counts when its span overlaps `[start, end)`.

pub(crate) mod keys;
pub(crate) mod totals;

use std::collections::BTreeMap;
use std::sync::Arc;

use claw_proto::v1::{self, UsageTotals};

use crate::catalog::{Catalog, CatalogError};
use crate::store::{Store, Tree};
use keys::{DAY_MS, Dims, HOUR_MS};

/// Which run kind a filter keeps (`UsageFilter.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// Heartbeat runs only.
    Heartbeat,
    /// Everything but heartbeat runs (buckets stored before run kinds
    /// existed included).
    Interactive,
}

impl RunKind {
    /// `filter.kind`: `heartbeat`, `interactive`, or empty for both.
    pub(crate) fn parse(kind: &str) -> Result<Option<RunKind>, CatalogError> {
        match kind.trim() {
            "" => Ok(None),
            k if k.eq_ignore_ascii_case("heartbeat") => Ok(Some(RunKind::Heartbeat)),
            k if k.eq_ignore_ascii_case("interactive") => Ok(Some(RunKind::Interactive)),
            other => Err(CatalogError::Invalid(
                claw_proto::validate::FieldError::new(
                    "filter.kind",
                    format!("must be heartbeat or interactive (or empty for both), got `{other}`"),
                ),
            )),
        }
    }

    fn matches(self, run_kind: &str) -> bool {
        (run_kind == keys::HEARTBEAT) == (self == RunKind::Heartbeat)
    }
}

/// A resolved [`v1::UsageFilter`]: ids instead of names, times in unix ms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Filter {
    /// Backend id.
    pub backend: Option<String>,
    /// Canonical model.
    pub model: Option<String>,
    /// Client key id.
    pub client_key: Option<String>,
    /// Agent id.
    pub agent: Option<String>,
    /// Inclusive start.
    pub start_ms: Option<i64>,
    /// Exclusive end.
    pub end_ms: Option<i64>,
    /// Run kind; `None` = both.
    pub kind: Option<RunKind>,
}

impl Filter {
    fn matches(&self, d: &Dims) -> bool {
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        is(&self.backend, &d.backend)
            && is(&self.model, &d.model)
            && is(&self.client_key, &d.client_key)
            && is(&self.agent, &d.agent)
            && self.kind.is_none_or(|k| k.matches(&d.run_kind))
    }

    fn start(&self) -> i64 {
        self.start_ms.unwrap_or(i64::MIN)
    }

    fn end(&self) -> i64 {
        self.end_ms.unwrap_or(i64::MAX)
    }
}

/// Unix ms of a protobuf timestamp.
pub(crate) fn ms_of(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos / 1_000_000))
}

fn non_empty(s: &str) -> Option<&str> {
    let s = s.trim();
    (!s.is_empty()).then_some(s)
}

/// Reads the usage history.
#[derive(Clone)]
pub(crate) struct Stats {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

impl Stats {
    /// Queries over `store`, resolving names through `catalog`.
    pub(crate) fn new(store: Arc<dyn Store>, catalog: Arc<Catalog>) -> Self {
        Stats { store, catalog }
    }

    /// The store (for the cooldown history).
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The id of a backend named by id or name. A backend that no longer
    /// exists is matched by the id given, so its history stays queryable.
    pub(crate) fn resolve_backend(&self, ident: &str) -> Result<String, CatalogError> {
        match self.catalog.get_backend(ident) {
            Ok(b) => Ok(b.id),
            Err(CatalogError::NotFound { .. }) => Ok(ident.trim().to_string()),
            Err(e) => Err(e),
        }
    }

    /// Resolves names to ids and timestamps to milliseconds.
    pub(crate) fn resolve(&self, f: Option<&v1::UsageFilter>) -> Result<Filter, CatalogError> {
        let Some(f) = f else {
            return Ok(Filter::default());
        };
        // Checked first: a bad filter fails whatever else it names.
        let kind = RunKind::parse(&f.kind)?;
        let client_key = match non_empty(&f.client_key) {
            Some(k) => Some(match self.catalog.get_client_key(k) {
                Ok(key) => key.id,
                Err(CatalogError::NotFound { .. }) => k.to_string(),
                Err(e) => return Err(e),
            }),
            None => None,
        };
        Ok(Filter {
            backend: non_empty(&f.backend)
                .map(|b| self.resolve_backend(b))
                .transpose()?,
            model: non_empty(&f.model).map(str::to_string),
            client_key,
            agent: non_empty(&f.agent).map(str::to_string),
            start_ms: f.start.as_ref().map(ms_of),
            end_ms: f.end.as_ref().map(ms_of),
            kind,
        })
    }

    /// Buckets of `tree` whose span (`span_ms` long) overlaps the filter's
    /// time range, in key order, with their start time.
    fn scan(
        &self,
        tree: Tree,
        span_ms: i64,
        start: i64,
        end: i64,
    ) -> Result<Vec<crate::store::Entry>, CatalogError> {
        if start >= end {
            return Ok(Vec::new());
        }
        // A bucket overlaps when bucket_start > start - span and < end.
        let from = start.saturating_sub(span_ms).saturating_add(1).max(0);
        let lower = keys::time_prefix(from);
        let upper = (end != i64::MAX).then(|| keys::time_prefix(end));
        Ok(self.store.range(
            tree,
            &lower,
            upper.as_ref().map(|u| &u[..]),
            false,
            usize::MAX,
        )?)
    }

    fn hourly_into(
        &self,
        f: &Filter,
        start: i64,
        end: i64,
        mut sink: impl FnMut(i64, Dims, UsageTotals),
    ) -> Result<(), CatalogError> {
        for (k, v) in self.scan(Tree::UsageHourly, HOUR_MS, start, end)? {
            if let Some((hour, d)) = keys::parse_hourly(&k)
                && f.matches(&d)
            {
                sink(hour, d, totals::decode(&v));
            }
        }
        Ok(())
    }

    fn daily_into(
        &self,
        f: &Filter,
        start: i64,
        end: i64,
        mut sink: impl FnMut(i64, String, UsageTotals),
    ) -> Result<(), CatalogError> {
        for (k, v) in self.scan(Tree::UsageDaily, DAY_MS, start, end)? {
            if let Some((day, pool, d)) = keys::parse_daily(&k)
                && f.matches(&d)
            {
                sink(day, pool, totals::decode(&v));
            }
        }
        Ok(())
    }

    /// Usage summed over the filter: whole UTC days from the daily buckets
    /// (kept longest), the partial days at the edges from the hourly ones.
    pub(crate) fn totals(&self, f: &Filter) -> Result<UsageTotals, CatalogError> {
        let (start, end) = (f.start(), f.end());
        let mut sum = UsageTotals::default();
        // Whole days: [first, last) on day boundaries inside [start, end).
        let first = if start == i64::MIN {
            i64::MIN
        } else {
            keys::day_of(start.saturating_add(DAY_MS - 1))
        };
        let last = if end == i64::MAX {
            i64::MAX
        } else {
            keys::day_of(end)
        };
        if first < last {
            self.daily_into(f, first, last, |_, _, t| sum += &t)?;
            self.hourly_into(f, start, first, |_, _, t| sum += &t)?;
            self.hourly_into(f, last, end, |_, _, t| sum += &t)?;
        } else {
            self.hourly_into(f, start, end, |_, _, t| sum += &t)?;
        }
        Ok(sum)
    }

    /// Usage per hour, backend and model, oldest first.
    pub(crate) fn hourly(&self, f: &Filter) -> Result<Vec<v1::HourlyUsage>, CatalogError> {
        let mut rows: BTreeMap<(i64, String, String), UsageTotals> = BTreeMap::new();
        self.hourly_into(f, f.start(), f.end(), |hour, d, t| {
            *rows.entry((hour, d.backend, d.model)).or_default() += &t;
        })?;
        Ok(rows
            .into_iter()
            .map(|((hour, backend_id, model), totals)| v1::HourlyUsage {
                hour: crate::catalog::records::timestamp(hour),
                backend_id,
                model,
                totals: Some(totals),
            })
            .collect())
    }

    /// Usage per UTC day and pool, oldest first.
    pub(crate) fn daily(&self, f: &Filter) -> Result<Vec<v1::DailyUsage>, CatalogError> {
        let mut rows: BTreeMap<(i64, String), UsageTotals> = BTreeMap::new();
        self.daily_into(f, f.start(), f.end(), |day, pool, t| {
            *rows.entry((day, pool)).or_default() += &t;
        })?;
        Ok(rows
            .into_iter()
            .map(|((day, pool), totals)| v1::DailyUsage {
                day: day_name(day),
                pool,
                totals: Some(totals),
            })
            .collect())
    }
}

/// `YYYY-MM-DD` of the UTC day starting at `day_ms`.
pub(crate) fn day_name(day_ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(day_ms) {
        Ok(t) => t.strftime("%Y-%m-%d").to_string(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_names_are_utc_dates() {
        assert_eq!(day_name(0), "1970-01-01");
        assert_eq!(day_name(DAY_MS * 365), "1971-01-01");
    }

    #[test]
    fn filters_match_every_given_dimension() {
        let d = Dims {
            backend: "b".into(),
            model: "m".into(),
            client_key: "k".into(),
            agent: "a".into(),
            run_kind: String::new(),
        };
        assert!(Filter::default().matches(&d));
        let f = Filter {
            backend: Some("b".into()),
            agent: Some("a".into()),
            ..Default::default()
        };
        assert!(f.matches(&d));
        let f = Filter {
            model: Some("x".into()),
            ..Default::default()
        };
        assert!(!f.matches(&d));
    }

    #[test]
    fn kind_filters_split_heartbeat_buckets_from_the_rest() {
        let interactive = Dims::default();
        let heartbeat = Dims {
            run_kind: keys::HEARTBEAT.into(),
            ..Dims::default()
        };
        let only = |kind| Filter {
            kind: Some(kind),
            ..Default::default()
        };
        assert!(only(RunKind::Heartbeat).matches(&heartbeat));
        assert!(!only(RunKind::Heartbeat).matches(&interactive));
        assert!(only(RunKind::Interactive).matches(&interactive));
        assert!(!only(RunKind::Interactive).matches(&heartbeat));
        assert!(Filter::default().matches(&heartbeat));
    }

    #[test]
    fn filter_kinds_parse_and_a_bad_one_names_the_field() {
        assert_eq!(RunKind::parse("").ok(), Some(None));
        assert_eq!(
            RunKind::parse("heartbeat").ok(),
            Some(Some(RunKind::Heartbeat))
        );
        assert_eq!(
            RunKind::parse("interactive").ok(),
            Some(Some(RunKind::Interactive))
        );
        let e = RunKind::parse("cron").expect_err("refused").to_string();
        assert!(e.starts_with("filter.kind: "), "{e}");
        assert!(e.contains("`cron`"), "{e}");
    }
}

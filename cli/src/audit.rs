//! `clawctl audit`: the audit log, newest first, from the control plane's
//! `AuditService`.
//!
//! After the verb, `--token NAME` is the filter (who made the change); the
//! admin token to connect with goes before the verb or in
//! `CLAW_ADMIN_TOKEN` (see [`crate::cli::parse`]).

use std::time::SystemTime;

use clap::Args;
use claw_proto::v1::{AuditFieldChange, AuditRecord, ListAuditRecordsRequest};

use crate::output::{self, Table};
use crate::session::Session;

/// Longest value shown per field in the table (JSON shows everything).
const VALUE_WIDTH: usize = 40;
/// Longest CHANGES cell in the table.
const CHANGES_WIDTH: usize = 120;

/// `clawctl audit ...`
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only changes at or after this time: RFC 3339 or a duration back
    /// from now (24h, 7d).
    #[arg(long, value_name = "TIME", value_parser = crate::stats::parse_time)]
    pub since: Option<SystemTime>,
    /// Only changes of this resource: KIND/NAME or KIND/ID (kinds: backend,
    /// pool, key, agent, token), or a KIND alone.
    #[arg(long, value_name = "KIND/NAME")]
    pub resource: Option<String>,
    /// Only changes made with this admin token name (`bootstrap` is
    /// CLAW_ADMIN_TOKEN). Spelled `--token` after the verb.
    #[arg(long = "token-name", value_name = "NAME")]
    pub token_name: Option<String>,
    /// At most this many records (at most 10000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

/// Runs `clawctl audit`.
pub(crate) async fn run(session: &Session, args: AuditArgs) -> anyhow::Result<()> {
    let conn = session.connect().await?;
    let resp = conn
        .call(conn.audit().list_audit_records(ListAuditRecordsRequest {
            since: crate::stats::timestamp(args.since),
            resource: args.resource.unwrap_or_default(),
            token_name: args.token_name.unwrap_or_default(),
            limit: args.limit,
        }))
        .await?;
    if resp.records.is_empty() && session.format == output::Format::Table {
        return session.emit(&resp.records, |out| writeln!(out, "no audit records"));
    }
    session.emit(&resp.records, |out| {
        let mut table = Table::new(&[
            "TIME (UTC)",
            "TOKEN",
            "PEER",
            "OPERATION",
            "RESOURCE",
            "VERSION",
            "CHANGES",
        ]);
        for r in &resp.records {
            table.row(vec![
                output::timestamp(&r.time),
                r.token_name.clone(),
                r.peer.clone(),
                r.operation.clone(),
                resource(r),
                match r.config_version {
                    0 => String::new(),
                    v => v.to_string(),
                },
                changes(&r.changes),
            ]);
        }
        table.write(out)
    })
}

/// `kind/name` (the id when the resource has no name).
fn resource(r: &AuditRecord) -> String {
    let ident = if r.resource_name.is_empty() {
        &r.resource_id
    } else {
        &r.resource_name
    };
    if ident.is_empty() {
        r.resource_kind.clone()
    } else {
        format!("{}/{ident}", r.resource_kind)
    }
}

/// `field: old → new; ...`, an empty value as `-`, cut to fit a table.
pub(crate) fn changes(fields: &[AuditFieldChange]) -> String {
    let text = fields
        .iter()
        .map(|f| {
            format!(
                "{}: {} → {}",
                f.field,
                shown(&f.old_value),
                shown(&f.new_value)
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    cut(&text, CHANGES_WIDTH)
}

fn shown(value: &str) -> String {
    if value.is_empty() {
        "-".to_string()
    } else {
        cut(&value.replace(['\n', '\r'], " "), VALUE_WIDTH)
    }
}

fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(field: &str, old: &str, new: &str) -> AuditFieldChange {
        AuditFieldChange {
            field: field.into(),
            old_value: old.into(),
            new_value: new.into(),
        }
    }

    #[test]
    fn changes_read_as_field_old_arrow_new() {
        assert_eq!(changes(&[change("rpm", "10", "20")]), "rpm: 10 → 20");
        assert_eq!(
            changes(&[change("rpm", "", "20"), change("enabled", "true", "")]),
            "rpm: - → 20; enabled: true → -"
        );
        let long = "x".repeat(200);
        let shown = changes(&[change("checklist", "", &long)]);
        assert!(shown.chars().count() <= CHANGES_WIDTH, "{shown}");
        assert!(shown.ends_with('…'), "{shown}");
    }
}

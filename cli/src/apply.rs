//! `clawctl export` and `clawctl apply`: the whole configuration as one YAML
//! document (see [`crate::document`]).
//!
//! `apply` does everything it can before touching the server: it parses the
//! document (errors as `FILE:LINE:COL: what`), validates it with the server's
//! rules, reads each provider key from the variable or file the document
//! names, and only then sends a single `ApplyConfig` call.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use claw_proto::v1::{
    ApplyConfigRequest, ApplyConfigResponse, ChangeAction, ClusterConfig, ExportConfigRequest,
};
use claw_proto::validate;

use crate::api_key::KeySource;
use crate::cli::{ApplyArgs, ExportArgs};
use crate::client::Connection;
use crate::document;
use crate::output::Format;
use crate::session::{Session, warn};

/// `clawctl export [-f FILE]`.
pub(crate) async fn export(session: &Session, args: ExportArgs) -> anyhow::Result<()> {
    let conn = session.connect().await?;
    let resp = conn
        .call(conn.cluster().export_config(ExportConfigRequest {}))
        .await?;
    let exported = document::from_config(&resp.config.unwrap_or_default());
    if !exported.unreferenced.is_empty() {
        let vars: Vec<String> = exported
            .unreferenced
            .iter()
            .map(|n| format!("{n} -> {}", document::placeholder_env(n)))
            .collect();
        warn(format!(
            "no key reference is stored for {} backend(s); exported as api_key_env placeholders ({}): set them before applying",
            vars.len(),
            vars.join(", ")
        ));
    }
    let text = match session.format {
        Format::Json => serde_json::to_string_pretty(&exported.document)? + "\n",
        Format::Table | Format::Yaml => document::to_yaml(&exported.document)?,
    };
    match args.file {
        Some(path) => std::fs::write(&path, text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(())
}

/// `clawctl apply -f FILE [--dry-run] [--prune]`.
pub(crate) async fn apply(session: &Session, args: ApplyArgs) -> anyhow::Result<()> {
    let input = Input::read(&args.file)?;
    let doc = document::parse(&input.text).map_err(|e| anyhow!(e.in_file(&input.label)))?;
    let desired =
        document::to_config(&doc, &input.base_dir).map_err(|e| anyhow!("invalid argument: {e}"))?;
    let conn = session.connect().await?;
    let config = with_keys(&conn, desired).await?;
    let resp = conn
        .call(conn.cluster().apply_config(ApplyConfigRequest {
            config: Some(config),
            dry_run: args.dry_run,
            prune: args.prune,
        }))
        .await?;
    session.emit(&resp, |out| write_plan(out, &resp, args.dry_run))
}

/// The document's text, how to name it in errors, and the directory that
/// relative key file paths are relative to.
struct Input {
    label: String,
    text: String,
    base_dir: PathBuf,
}

impl Input {
    fn read(file: &str) -> anyhow::Result<Input> {
        let cwd = std::env::current_dir().context("cannot determine the current directory")?;
        if file == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the document from standard input")?;
            return Ok(Input {
                label: "<stdin>".to_string(),
                text,
                base_dir: cwd,
            });
        }
        let text = std::fs::read_to_string(file).map_err(|e| anyhow!("cannot read {file}: {e}"))?;
        let base_dir = Path::new(file).parent().map(|p| cwd.join(p)).unwrap_or(cwd);
        Ok(Input {
            label: file.to_string(),
            text,
            base_dir,
        })
    }
}

/// Reads every backend's key from its reference. A backend that already
/// exists keeps its stored key when its reference cannot be read (with a
/// warning); a new one cannot be created without a key.
async fn with_keys(conn: &Connection, desired: document::Desired) -> anyhow::Result<ClusterConfig> {
    let mut config = desired.config;
    let existing: HashSet<String> = if config.backends.is_empty() {
        HashSet::new()
    } else {
        conn.list_backends_all()
            .await?
            .backends
            .into_iter()
            .map(|b| b.name)
            .collect()
    };
    for (i, (backend, source)) in config.backends.iter_mut().zip(desired.keys).enumerate() {
        let exists = existing.contains(&backend.name);
        let Some(source) = source else {
            if exists {
                continue;
            }
            bail!(
                "backends[{i}].api_key_env: is required to create backend {:?} (or give api_key_file)",
                backend.name
            );
        };
        let field = match source {
            KeySource::File(_) => format!("backends[{i}].api_key_file"),
            _ => format!("backends[{i}].api_key_env"),
        };
        match source.read() {
            Ok(key) => {
                validate::api_key(&format!("backends[{i}].api_key"), &key)
                    .map_err(|e| anyhow!("invalid argument: {e}"))?;
                backend.api_key = key;
            }
            Err(e) if exists => warn(format!(
                "{field}: {e}; keeping the stored key of backend {:?}",
                backend.name
            )),
            Err(e) => bail!("{field}: {e}"),
        }
    }
    Ok(config)
}

/// One line per resource, then a summary; created client key secrets last.
fn write_plan(
    out: &mut dyn Write,
    resp: &ApplyConfigResponse,
    dry_run: bool,
) -> std::io::Result<()> {
    let mut counts = [0usize; 4];
    for change in &resp.changes {
        let action = ChangeAction::try_from(change.action).unwrap_or(ChangeAction::Unspecified);
        let (verb, slot) = match action {
            ChangeAction::Create => ("created", 0),
            ChangeAction::Update => ("updated", 1),
            ChangeAction::Delete => ("deleted", 2),
            ChangeAction::Unchanged | ChangeAction::Unspecified => ("unchanged", 3),
        };
        counts[slot] += 1;
        let mut line = format!("{}/{} ", change.kind, change.name);
        if dry_run && slot < 3 {
            line.push_str("would be ");
        }
        line.push_str(verb);
        if !change.fields.is_empty() {
            line.push_str(&format!(" ({})", change.fields.join(", ")));
        }
        writeln!(out, "{line}")?;
    }
    let [mut created, mut updated, mut deleted, mut unchanged] = counts;
    if resp.changes_truncated {
        // The control plane listed only the first changes; its totals
        // cover all of them.
        let totals = [
            resp.created_total,
            resp.updated_total,
            resp.deleted_total,
            resp.unchanged_total,
        ]
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        let listed = resp.changes.len();
        let changed = totals[0]
            .saturating_add(totals[1])
            .saturating_add(totals[2]);
        writeln!(
            out,
            "... {} more changes not listed (the control plane lists the first {listed})",
            changed.saturating_sub(listed)
        )?;
        [created, updated, deleted, unchanged] = totals;
    }
    if dry_run {
        writeln!(
            out,
            "dry run: nothing was changed ({created} to create, {updated} to update, {deleted} to delete, {unchanged} unchanged)"
        )?;
    } else {
        writeln!(
            out,
            "applied: {created} created, {updated} updated, {deleted} deleted, {unchanged} unchanged (config version {})",
            resp.config_version
        )?;
    }
    for s in &resp.created_secrets {
        writeln!(
            out,
            "client key {:?} secret: {} (shown only once: store it now)",
            s.name, s.secret
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use claw_proto::v1::{ConfigChange, CreatedSecret};

    use super::*;

    fn change(kind: &str, name: &str, action: ChangeAction, fields: &[&str]) -> ConfigChange {
        ConfigChange {
            kind: kind.into(),
            name: name.into(),
            action: action as i32,
            fields: fields.iter().map(|f| f.to_string()).collect(),
        }
    }

    fn plan(dry_run: bool) -> String {
        let resp = ApplyConfigResponse {
            changes: vec![
                change("backend", "openai-1", ChangeAction::Create, &[]),
                change("backend", "b2", ChangeAction::Update, &["rpm", "models"]),
                change("agent", "a1", ChangeAction::Delete, &[]),
                change("pool", "primary", ChangeAction::Unchanged, &[]),
            ],
            config_version: 7,
            created_secrets: vec![CreatedSecret {
                name: "app".into(),
                secret: "ck-secret".into(),
            }],
            ..Default::default()
        };
        let mut buf = Vec::new();
        write_plan(&mut buf, &resp, dry_run).expect("write to a Vec");
        String::from_utf8(buf).expect("utf-8")
    }

    #[test]
    fn plan_lists_one_line_per_resource() {
        assert_eq!(
            plan(false),
            "backend/openai-1 created\n\
             backend/b2 updated (rpm, models)\n\
             agent/a1 deleted\n\
             pool/primary unchanged\n\
             applied: 1 created, 1 updated, 1 deleted, 1 unchanged (config version 7)\n\
             client key \"app\" secret: ck-secret (shown only once: store it now)\n"
        );
    }

    #[test]
    fn dry_run_plan_says_nothing_changed() {
        let text = plan(true);
        assert!(text.starts_with(
            "backend/openai-1 would be created\n\
             backend/b2 would be updated (rpm, models)\n\
             agent/a1 would be deleted\n\
             pool/primary unchanged\n\
             dry run: nothing was changed"
        ));
    }

    #[test]
    fn truncated_plan_uses_the_totals_and_keeps_every_secret() {
        let resp = ApplyConfigResponse {
            changes: vec![change("client_key", "k0", ChangeAction::Create, &[])],
            config_version: 9,
            created_secrets: (0..3)
                .map(|i| CreatedSecret {
                    name: format!("k{i}"),
                    secret: format!("ck-{i}"),
                })
                .collect(),
            changes_truncated: true,
            created_total: 3,
            unchanged_total: 5,
            ..Default::default()
        };
        let mut buf = Vec::new();
        write_plan(&mut buf, &resp, false).expect("write to a Vec");
        let text = String::from_utf8(buf).expect("utf-8");
        assert!(text.contains("... 2 more changes not listed"), "{text}");
        assert!(
            text.contains(
                "applied: 3 created, 0 updated, 0 deleted, 5 unchanged (config version 9)"
            )
        );
        for i in 0..3 {
            assert!(text.contains(&format!("client key \"k{i}\" secret: ck-{i}")));
        }
    }
}

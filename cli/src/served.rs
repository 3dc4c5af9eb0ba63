//! The models the enabled backends serve, and the one-line warning printed
//! when a key, an agent or a disabled backend names a model outside them:
//! accepted (the backend may be added next), but worth a word on stderr.

use std::collections::BTreeSet;

use claw_proto::v1::Backend;

use crate::client::Connection;

/// The names in `models` that no enabled backend in `backends` maps.
pub(crate) fn unserved(backends: &[Backend], models: &[String]) -> Vec<String> {
    let served: BTreeSet<&str> = backends
        .iter()
        .filter(|b| b.enabled)
        .flat_map(|b| b.models.iter().map(|m| m.canonical.as_str()))
        .collect();
    let mut out: Vec<String> = models
        .iter()
        .filter(|m| !m.is_empty() && !served.contains(m.as_str()))
        .cloned()
        .collect();
    out.dedup();
    out
}

/// Prints `warning: WHAT names model(s) … that no enabled backend serves`
/// when some of `models` are unserved. Best effort: when the backends
/// cannot be listed (e.g. a token whose role may not read them), nothing is
/// printed and the command still succeeds.
pub(crate) async fn warn_unserved(conn: &Connection, what: &str, models: &[String]) {
    if models.iter().all(String::is_empty) {
        return;
    }
    let Ok(resp) = conn.list_backends_all().await else {
        return;
    };
    if let Some(line) = warning(what, &unserved(&resp.backends, models)) {
        eprintln!("{line}");
    }
}

/// After `backend add/update`: a disabled backend's mappings serve nothing,
/// so warn about those no enabled backend serves either.
pub(crate) async fn warn_disabled_backend(conn: &Connection, b: &Backend) {
    if b.enabled {
        return;
    }
    let models: Vec<String> = b.models.iter().map(|m| m.canonical.clone()).collect();
    let what = format!("disabled backend {:?}", b.name);
    warn_unserved(conn, &what, &models).await;
}

fn warning(what: &str, unserved: &[String]) -> Option<String> {
    let (first, rest) = unserved.split_first()?;
    let names = std::iter::once(first)
        .chain(rest)
        .map(|m| format!("{m:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let noun = if rest.is_empty() { "model" } else { "models" };
    Some(format!(
        "warning: {what} names {noun} {names} that no enabled backend serves; \
         requests for it fail until one does"
    ))
}

#[cfg(test)]
mod tests {
    use claw_proto::v1::ModelMapping;

    use super::*;

    fn backend(enabled: bool, models: &[&str]) -> Backend {
        Backend {
            enabled,
            models: models
                .iter()
                .map(|m| ModelMapping {
                    canonical: m.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_enabled_backends_count() {
        let backends = [backend(true, &["gpt-4o"]), backend(false, &["llama3"])];
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            unserved(&backends, &names(&["gpt-4o", "llama3", "nope"])),
            names(&["llama3", "nope"])
        );
        assert!(unserved(&backends, &names(&["gpt-4o", ""])).is_empty());
    }

    #[test]
    fn the_warning_is_one_line_naming_each_model() {
        assert_eq!(warning("key \"app\"", &[]), None);
        let one = warning("agent \"a1\"", &["x".into()]).expect("a warning");
        assert!(
            one.starts_with("warning: agent \"a1\" names model \"x\" that"),
            "{one}"
        );
        let two = warning("key \"app\"", &["x".into(), "y".into()]).expect("a warning");
        assert!(two.contains("models \"x\", \"y\""), "{two}");
        assert!(!two.contains('\n'));
    }
}

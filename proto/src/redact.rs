//! Secrets never reach logs: provider keys are shown masked, and every message
//! that can carry a plaintext secret has a hand-written `Debug` that redacts it.

use std::fmt;

use crate::v1;

/// Masks a provider key the way operators recognise it: `sk-abc…wxyz`.
/// At most a third of the key shows (its head, up to 6 characters, and its
/// tail, up to 4), so a short key never gives most of itself away; keys under
/// 12 characters are fully hidden.
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.is_empty() {
        return String::new();
    }
    if chars.len() < 12 {
        return "…".to_string();
    }
    let visible = chars.len() / 3;
    let tail = (visible / 2).min(4);
    let head = (visible - tail).min(6);
    let first: String = chars[..head].iter().collect();
    let last: String = chars[chars.len() - tail..].iter().collect();
    format!("{first}…{last}")
}

const REDACTED: &str = "<redacted>";

fn redacted(present: bool) -> &'static str {
    if present { REDACTED } else { "" }
}

impl fmt::Debug for v1::Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("label", &self.label)
            .field("base_url", &self.base_url)
            .field("api_key", &redacted(!self.api_key.is_empty()))
            .field("pool", &self.pool)
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .field("timeout_ms", &self.timeout_ms)
            .field("weight", &self.weight)
            .field("enabled", &self.enabled)
            .field("models", &self.models)
            .field("status", &self.status)
            .field("api_key_ref", &self.api_key_ref)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for v1::UpdateBackendRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateBackendRequest")
            .field("backend", &self.backend)
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| REDACTED))
            .field("pool", &self.pool)
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .field("enabled", &self.enabled)
            .field("replace_models", &self.replace_models)
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for v1::RotateMasterKeyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateMasterKeyRequest")
            .field("new_master_key", &redacted(!self.new_master_key.is_empty()))
            .finish()
    }
}

impl fmt::Debug for v1::CreateClientKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateClientKeyResponse")
            .field("key", &self.key)
            .field("secret", &redacted(!self.secret.is_empty()))
            .field("config_version", &self.config_version)
            .finish()
    }
}

impl fmt::Debug for v1::CreateTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateTokenResponse")
            .field("token", &self.token)
            .field("secret", &redacted(!self.secret.is_empty()))
            .finish()
    }
}

impl fmt::Debug for v1::CreatedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedSecret")
            .field("name", &self.name)
            .field("secret", &redacted(!self.secret.is_empty()))
            .finish()
    }
}

impl fmt::Debug for v1::SnapshotBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotBackend")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key", &redacted(!self.api_key.is_empty()))
            .field("pool", &self.pool)
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .field("timeout_ms", &self.timeout_ms)
            .field("weight", &self.weight)
            .field("enabled", &self.enabled)
            .field("models", &self.models)
            .finish()
    }
}

impl fmt::Debug for v1::Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("model", &self.model)
            .field("interval_seconds", &self.interval_seconds)
            .field("active_hours", &self.active_hours)
            .field("timezone", &self.timezone)
            .field("checklist_bytes", &self.checklist.len())
            .field("webhook_url", &self.webhook_url)
            .field("enabled", &self.enabled)
            .field("pause_note", &self.pause_note)
            .field("run_timeout_seconds", &self.run_timeout_seconds)
            .field("catch_up_seconds", &self.catch_up_seconds)
            .field("stagger", &self.stagger)
            .field("isolated_session", &self.isolated_session)
            .field("busy_window_seconds", &self.busy_window_seconds)
            .field("busy_defer_max_seconds", &self.busy_defer_max_seconds)
            .field("webhook_secret", &redacted(!self.webhook_secret.is_empty()))
            .field("webhook_secret_ref", &self.webhook_secret_ref)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for v1::UpdateAgentRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateAgentRequest")
            .field("agent", &self.agent)
            .field("name", &self.name)
            .field("model", &self.model)
            .field("interval_seconds", &self.interval_seconds)
            .field("active_hours", &self.active_hours)
            .field("timezone", &self.timezone)
            .field("webhook_url", &self.webhook_url)
            .field("enabled", &self.enabled)
            .field("stagger", &self.stagger)
            .field("isolated_session", &self.isolated_session)
            .field("busy_window_seconds", &self.busy_window_seconds)
            .field("busy_defer_max_seconds", &self.busy_defer_max_seconds)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| REDACTED),
            )
            .field("webhook_secret_ref", &self.webhook_secret_ref)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_shows_only_the_ends() {
        assert_eq!(mask_key("sk-live-abcdefghijklmnopqrwxyz"), "sk-liv…wxyz");
        assert_eq!(mask_key("short"), "…");
        assert_eq!(mask_key(""), "");
    }

    /// Issue 17: a 12-character key showed 10 of its characters.
    #[test]
    fn the_mask_never_shows_more_than_a_third_of_a_key() {
        assert_eq!(mask_key("sk-abcdefwxy"), "sk…xy");
        for n in 0..80 {
            let key: String = "sk-"
                .chars()
                .chain(std::iter::repeat('k'))
                .take(n)
                .collect();
            let shown = mask_key(&key).chars().filter(|c| *c != '…').count();
            assert!(shown <= n / 3, "{n} chars: {shown} shown");
        }
    }

    #[test]
    fn debug_never_prints_secrets() {
        let secret = "sk-live-verysecretvalue-1234";
        let b = v1::Backend {
            api_key: secret.into(),
            ..Default::default()
        };
        let s = v1::SnapshotBackend {
            api_key: secret.into(),
            ..Default::default()
        };
        let u = v1::UpdateBackendRequest {
            api_key: Some(secret.into()),
            ..Default::default()
        };
        let r = v1::RotateMasterKeyRequest {
            new_master_key: secret.into(),
        };
        let c = v1::CreateBackendRequest {
            backend: Some(b.clone()),
        };
        for out in [
            format!("{b:?}"),
            format!("{s:?}"),
            format!("{u:?}"),
            format!("{r:?}"),
            format!("{c:?}"),
            format!("{b:#?}"),
        ] {
            assert!(!out.contains("verysecret"), "leaked in {out}");
        }
    }
}

//! The backends view: `ListBackends` plus each backend's live state from
//! the fleet.
//!
//! - `state`: `disabled` when not enabled; else `auth_failed` while the
//!   provider rejects the backend's key (until it is updated); else
//!   `quota_exhausted` while the
//!   provider reports the quota spent; else `cooling` while a fleet
//!   cooldown (after a 429 or overload) lasts; else `healthy`. The control
//!   plane learns of nothing else (ejections and health checks are each
//!   proxy's own), so `ejected` and `unhealthy` are never reported here.
//! - `cooling_until`: the end of the cooldown (RFC 3339), or null.
//! - `rpm_in_use` / `tpm_in_use`: the requests and tokens (input + output)
//!   the backend served fleet-wide in the last minute, from the usage the
//!   proxies reported ([`crate::fleet::recent::RecentUse`]); 0 when it
//!   served none. (Not the rate-share assigner's demand: a proxy reports
//!   demand on every candidate a request could not be admitted to, which
//!   overstates what a backend actually serves.)

use claw_proto::v1::backend_service_server::BackendService as _;
use claw_proto::v1::{Backend, ListBackendsRequest};
use serde_json::Value;
use tonic::Status;

use super::Dashboard;
use super::call::{Caller, to_json};

/// One backend as the view shows it.
pub(super) struct LiveBackend {
    /// `healthy`, `cooling`, `quota_exhausted`, `auth_failed` or `disabled`.
    pub state: &'static str,
    /// The backend's JSON with the live fields added.
    pub json: Value,
}

/// The fleet-wide health state of `b` (filled by `ListBackends`).
fn health_of(b: &Backend) -> claw_proto::v1::HealthState {
    b.health
        .as_ref()
        .and_then(|h| claw_proto::v1::HealthState::try_from(h.state).ok())
        .unwrap_or_default()
}

/// The state of `b` at `now_ms` given its fleet cooldown and health.
fn state_of(
    b: &Backend,
    cooldown: Option<&crate::fleet::cooldowns::Change>,
    now_ms: i64,
) -> &'static str {
    if !b.enabled {
        "disabled"
    } else if cooldown.is_some_and(|c| c.auth_failed) {
        "auth_failed"
    } else if health_of(b) == claw_proto::v1::HealthState::Unhealthy {
        "unhealthy"
    } else if health_of(b) == claw_proto::v1::HealthState::Ejected {
        "ejected"
    } else if cooldown.is_some_and(|c| c.quota_exhausted(now_ms)) {
        "quota_exhausted"
    } else if cooldown.is_some_and(|c| c.until_ms > now_ms) {
        "cooling"
    } else {
        "healthy"
    }
}

fn rfc3339(ms: i64) -> Value {
    jiff::Timestamp::from_millisecond(ms).map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// Every backend with its live state.
pub(super) async fn live(d: &Dashboard, c: &Caller) -> Result<Vec<LiveBackend>, Status> {
    let r = c.request(
        "/claw.v1.BackendService/ListBackends",
        ListBackendsRequest::default(),
        false,
    )?;
    let backends = d
        .services
        .backend
        .list_backends(r)
        .await?
        .into_inner()
        .backends;
    let now = crate::catalog::records::now_ms();
    let in_use = d.fleet.recent_use().per_minute(now);
    let mut out = Vec::with_capacity(backends.len());
    for b in backends {
        let cooldown = d.fleet.cooldowns().get(&b.id);
        let state = state_of(&b, cooldown.as_ref(), now);
        let cooling_until = match &cooldown {
            Some(c) if c.until_ms > now => rfc3339(c.until_ms),
            _ => Value::Null,
        };
        let (rpm, tpm) = in_use.get(&b.id).copied().unwrap_or((0, 0));
        let (rpm, tpm) = (Value::from(rpm), Value::from(tpm));
        let mut json = to_json(&b)?;
        if let Value::Object(m) = &mut json {
            m.insert("state".into(), Value::from(state));
            m.insert("cooling_until".into(), cooling_until);
            m.insert("rpm_in_use".into(), rpm);
            m.insert("tpm_in_use".into(), tpm);
        }
        out.push(LiveBackend { state, json });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::cooldowns::Change;

    #[test]
    fn state_follows_enabled_quota_and_cooldown_in_that_order() {
        let now = 1_000_000;
        let b = |enabled| Backend {
            enabled,
            ..Default::default()
        };
        let c = |until_ms, quota_until_ms| Change {
            backend_id: "b".into(),
            until_ms,
            consecutive: 1,
            source_node: "p".into(),
            cooled: true,
            quota_until_ms,
            auth_failed: false,
        };
        assert_eq!(state_of(&b(true), None, now), "healthy");
        assert_eq!(state_of(&b(true), Some(&c(now - 1, 0)), now), "healthy");
        assert_eq!(state_of(&b(true), Some(&c(now + 5, 0)), now), "cooling");
        assert_eq!(
            state_of(&b(true), Some(&c(now + 5, now + 5)), now),
            "quota_exhausted"
        );
        assert_eq!(
            state_of(&b(false), Some(&c(now + 5, now + 5)), now),
            "disabled"
        );
        let rejected = Change {
            auth_failed: true,
            ..c(0, 0)
        };
        assert_eq!(state_of(&b(true), Some(&rejected), now), "auth_failed");
        assert_eq!(state_of(&b(false), Some(&rejected), now), "disabled");
        let health = |state: claw_proto::v1::HealthState| Backend {
            enabled: true,
            health: Some(claw_proto::v1::BackendHealth {
                state: state as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        use claw_proto::v1::HealthState;
        assert_eq!(
            state_of(&health(HealthState::Unhealthy), None, now),
            "unhealthy"
        );
        assert_eq!(
            state_of(&health(HealthState::Ejected), Some(&c(now + 5, 0)), now),
            "ejected"
        );
        assert_eq!(
            state_of(&health(HealthState::NotProbed), None, now),
            "healthy"
        );
        assert_eq!(
            state_of(&health(HealthState::Unhealthy), Some(&rejected), now),
            "auth_failed"
        );
    }
}

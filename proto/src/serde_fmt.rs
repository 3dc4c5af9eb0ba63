//! Serialization of the generated messages for `-o json|yaml`: proto field
//! names (snake_case), enums by lowercase name, timestamps as RFC 3339.

use serde::Serializer;

use crate::v1::{ChangeAction, Pool};

/// Serializes a `Pool` field (stored as `i32` by prost) as `primary`/`fallback`.
pub fn pool<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    match Pool::try_from(*value) {
        Ok(Pool::Unspecified) => s.serialize_str(""),
        Ok(p) => s.serialize_str(p.name()),
        Err(_) => s.serialize_i32(*value),
    }
}

/// Serializes a `ChangeAction` field by its lowercase name.
pub fn change_action<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    match ChangeAction::try_from(*value) {
        Ok(a) => s.serialize_str(a.name()),
        Err(_) => s.serialize_i32(*value),
    }
}

/// Generates a serializer that names a prost enum by its proto value name
/// without the enum prefix, lowercased (`RUN_STATUS_DEAD_LETTER` → `dead_letter`).
macro_rules! enum_by_short_name {
    ($fn_name:ident, $ty:ty, $prefix:literal) => {
        #[doc = concat!("Serializes a `", stringify!($ty), "` field by its short lowercase name.")]
        pub fn $fn_name<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
            match <$ty>::try_from(*value) {
                Ok(v) => s.serialize_str(&short_name(v.as_str_name(), $prefix)),
                Err(_) => s.serialize_i32(*value),
            }
        }
    };
}

/// `RUN_STATUS_DEAD_LETTER` with prefix `RUN_STATUS_` → `dead_letter`;
/// the `_UNSPECIFIED` value becomes the empty string.
pub fn short_name(full: &str, prefix: &str) -> String {
    let short = full.strip_prefix(prefix).unwrap_or(full);
    if short == "UNSPECIFIED" {
        String::new()
    } else {
        short.to_ascii_lowercase()
    }
}

/// Serializes an `Api` field: `openai` (also for unspecified) or `anthropic`.
pub fn api<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(crate::v1::Api::try_from(*value).map_or("openai", |a| a.name()))
}

enum_by_short_name!(priority, crate::v1::Priority, "PRIORITY_");
enum_by_short_name!(failure_kind, crate::v1::FailureKind, "FAILURE_KIND_");
enum_by_short_name!(run_trigger, crate::v1::RunTrigger, "RUN_TRIGGER_");
enum_by_short_name!(run_status, crate::v1::RunStatus, "RUN_STATUS_");
enum_by_short_name!(role, crate::v1::Role, "ROLE_");
enum_by_short_name!(health_state, crate::v1::HealthState, "HEALTH_STATE_");
enum_by_short_name!(
    heartbeat_target,
    crate::v1::HeartbeatTarget,
    "HEARTBEAT_TARGET_"
);

/// Serializes an optional timestamp as an RFC 3339 string (or null).
pub fn timestamp<S: Serializer>(
    value: &Option<prost_types::Timestamp>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(ts) => s.serialize_str(&format_timestamp(ts)),
        None => s.serialize_none(),
    }
}

/// Formats a timestamp as RFC 3339 in UTC with second precision.
pub fn format_timestamp(ts: &prost_types::Timestamp) -> String {
    match jiff::Timestamp::new(ts.seconds, 0) {
        Ok(t) => t.to_string(),
        Err(_) => format!("{}s", ts.seconds),
    }
}

#[cfg(test)]
mod tests {
    use crate::v1::Backend;

    #[test]
    fn json_uses_proto_names_and_readable_enums() {
        let b = Backend {
            name: "b1".into(),
            pool: crate::Pool::Fallback as i32,
            created_at: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        };
        let v = serde_json::to_value(&b).expect("serializable");
        assert_eq!(v["pool"], "fallback");
        assert_eq!(v["base_url"], "");
        assert_eq!(v["created_at"], "1970-01-01T00:00:00Z");
    }

    #[test]
    fn run_enums_use_short_lowercase_names() {
        let r = crate::v1::HeartbeatRun {
            status: crate::v1::RunStatus::DeadLetter as i32,
            trigger: crate::v1::RunTrigger::Manual as i32,
            ..Default::default()
        };
        let v = serde_json::to_value(&r).expect("serializable");
        assert_eq!(v["status"], "dead_letter");
        assert_eq!(v["trigger"], "manual");
        assert_eq!(v["nominal_time"], serde_json::Value::Null);
    }
}

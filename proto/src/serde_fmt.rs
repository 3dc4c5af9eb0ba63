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
}

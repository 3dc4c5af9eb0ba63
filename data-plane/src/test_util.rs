//! Snapshot fixtures shared by the unit tests and the integration tests
//! (`tests/integration`): built with `cfg(test)` or the `test-util`
//! feature, never into the proxy.

use claw_proto::Pool;
use claw_proto::v1;
use sha2::Digest;

/// An enabled backend `id` in `pool` serving `models` as `(canonical,
/// native)` pairs: rpm 600, the default timeout, a base URL nothing
/// listens on (`http://127.0.0.1:9/v1`) and provider key `sk-{id}`.
pub fn backend(id: &str, pool: Pool, models: &[(&str, &str)]) -> v1::SnapshotBackend {
    v1::SnapshotBackend {
        id: id.into(),
        name: id.into(),
        base_url: "http://127.0.0.1:9/v1".into(),
        api_key: format!("sk-{id}"),
        pool: pool as i32,
        rpm: 600,
        tpm: None,
        timeout_ms: 0,
        weight: 1,
        enabled: true,
        api: 0,
        native_only: false,
        models: models
            .iter()
            .map(|(c, n)| v1::ModelMapping {
                canonical: (*c).into(),
                native: (*n).into(),
                ..Default::default()
            })
            .collect(),
    }
}

/// A client key `id` (also its name) whose secret is `secret`, allowed every
/// model, without an rpm limit.
pub fn key(id: &str, secret: &str) -> v1::SnapshotClientKey {
    v1::SnapshotClientKey {
        id: id.into(),
        name: id.into(),
        secret_sha256: hex::encode(sha2::Sha256::digest(secret.as_bytes())),
        models: vec![],
        rpm: 0,
        ..Default::default()
    }
}

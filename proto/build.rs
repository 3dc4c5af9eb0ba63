//! Generates the `claw.v1` code with a vendored `protoc`, so a fresh machine
//! needs nothing installed by hand.

use std::path::PathBuf;

/// Messages that carry a plaintext secret: their `Debug` is written by hand
/// in `src/redact.rs` so secrets never reach logs.
const SECRET_BEARING: &[&str] = &[
    ".claw.v1.Backend",
    ".claw.v1.UpdateBackendRequest",
    ".claw.v1.RotateMasterKeyRequest",
    ".claw.v1.CreateClientKeyResponse",
    ".claw.v1.CreatedSecret",
    ".claw.v1.SnapshotBackend",
    ".claw.v1.Agent",
    ".claw.v1.UpdateAgentRequest",
    ".claw.v1.CreateTokenResponse",
];

/// Enum-typed fields, serialized by name ("primary") instead of number.
const POOL_FIELDS: &[&str] = &[
    ".claw.v1.Backend.pool",
    ".claw.v1.UpdateBackendRequest.pool",
    ".claw.v1.PoolSettings.pool",
    ".claw.v1.GetPoolSettingsRequest.pool",
    ".claw.v1.UpdatePoolSettingsRequest.pool",
    ".claw.v1.SnapshotBackend.pool",
];

/// Timestamp fields, serialized as RFC 3339 strings.
const TIMESTAMP_FIELDS: &[&str] = &[
    ".claw.v1.Backend.created_at",
    ".claw.v1.Backend.updated_at",
    ".claw.v1.Backend.quota_exhausted_until",
    ".claw.v1.ClientKey.created_at",
    ".claw.v1.Agent.created_at",
    ".claw.v1.Agent.updated_at",
    ".claw.v1.Proxy.connected_since",
    ".claw.v1.Proxy.last_seen",
    ".claw.v1.UsageEvent.time",
    ".claw.v1.UsageAggregate.first_time",
    ".claw.v1.UsageAggregate.last_time",
    ".claw.v1.UpstreamFailure.time",
    ".claw.v1.AgentActivity.last_seen",
    ".claw.v1.BackendSuccess.time",
    ".claw.v1.UsageFilter.start",
    ".claw.v1.UsageFilter.end",
    ".claw.v1.HourlyUsage.hour",
    ".claw.v1.CooldownEvent.started_at",
    ".claw.v1.CooldownEvent.until",
    ".claw.v1.ListCooldownEventsRequest.start",
    ".claw.v1.ListCooldownEventsRequest.end",
    ".claw.v1.HeartbeatRun.nominal_time",
    ".claw.v1.HeartbeatRun.started_at",
    ".claw.v1.HeartbeatRun.finished_at",
    ".claw.v1.NextSlot.time",
    ".claw.v1.AdminToken.created_at",
    ".claw.v1.AuditRecord.time",
    ".claw.v1.ListAuditRecordsRequest.since",
    ".claw.v1.BackupHeader.created_at",
    ".claw.v1.BackendHealth.since",
    ".claw.v1.BackendHealth.last_probe",
    ".claw.v1.BackendHealth.ejected_until",
    ".claw.v1.Agent.last_terminal_run",
];

/// Other enum-typed fields and the `serde_fmt` function that names them.
const ENUM_FIELDS: &[(&str, &str)] = &[
    (".claw.v1.ConfigChange.action", "change_action"),
    (".claw.v1.UsageEvent.priority", "priority"),
    (".claw.v1.UpstreamFailure.kind", "failure_kind"),
    (".claw.v1.HeartbeatRun.trigger", "run_trigger"),
    (".claw.v1.HeartbeatRun.status", "run_status"),
    (".claw.v1.Backend.api", "api"),
    (".claw.v1.UpdateBackendRequest.api", "api"),
    (".claw.v1.SnapshotBackend.api", "api"),
    (".claw.v1.AdminToken.role", "role"),
    (".claw.v1.CreateTokenRequest.role", "role"),
    (".claw.v1.WhoAmIResponse.role", "role"),
    (".claw.v1.BackendHealth.state", "health_state"),
    (".claw.v1.HealthUpdate.state", "health_state"),
    (".claw.v1.Agent.target", "heartbeat_target"),
    (".claw.v1.UpdateAgentRequest.target", "heartbeat_target"),
    (".claw.v1.HeartbeatRun.target", "heartbeat_target"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let include = protoc_bin_vendored::include_path()?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = std::fs::read_dir("claw/v1")?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let mut builder = tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("claw_descriptor.bin"))
        .type_attribute(".claw.v1", "#[derive(serde::Serialize)]")
        .skip_debug(SECRET_BEARING.iter().copied())
        .field_attribute(
            ".claw.v1.SnapshotBackend.api_key",
            "#[serde(skip_serializing)]",
        );
    for (field, func) in ENUM_FIELDS {
        builder = builder.field_attribute(
            field,
            format!("#[serde(serialize_with = \"crate::serde_fmt::{func}\")]"),
        );
    }
    for f in POOL_FIELDS {
        builder =
            builder.field_attribute(f, "#[serde(serialize_with = \"crate::serde_fmt::pool\")]");
    }
    for f in TIMESTAMP_FIELDS {
        builder = builder.field_attribute(
            f,
            "#[serde(serialize_with = \"crate::serde_fmt::timestamp\")]",
        );
    }
    builder.compile_with_config(config, &protos, &[PathBuf::from("."), include])?;
    Ok(())
}

//! Which admin gRPC methods read and which write.
//!
//! Every method of every admin service is listed here by its full path; a
//! unit test walks the proto descriptor set so that a new RPC cannot be
//! added without being classified. Anything not listed counts as a write,
//! so a viewer is denied what nobody has thought about.
//!
//! Decisions: `ExportConfig` is a read (secrets appear only by reference);
//! `CreateBackup` is a write (the file holds every sealed secret and hash);
//! `ApplyConfig` is a write even with `dry_run`, to keep the rule simple.
//! Reflection is a read: any admin token may discover the API.

/// What calling a method does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads state only: open to viewers.
    Read,
    /// Changes state (or exports every secret): admins only.
    Write,
}

/// Admin methods that only read.
const READS: &[&str] = &[
    "/claw.v1.AgentService/GetAgent",
    "/claw.v1.AgentService/ListAgents",
    "/claw.v1.AuditService/ListAuditRecords",
    "/claw.v1.BackendService/GetBackend",
    "/claw.v1.BackendService/ListBackends",
    "/claw.v1.ClientKeyService/GetClientKey",
    "/claw.v1.ClientKeyService/ListClientKeys",
    "/claw.v1.ClusterService/GetSnapshotInfo",
    "/claw.v1.ClusterService/ListProxies",
    "/claw.v1.ClusterService/ExportConfig",
    "/claw.v1.HeartbeatService/ListHeartbeatRuns",
    "/claw.v1.HeartbeatService/GetChecklist",
    "/claw.v1.HeartbeatService/ListNextSlots",
    "/claw.v1.PoolService/GetPoolSettings",
    "/claw.v1.PoolService/ListPoolSettings",
    "/claw.v1.StatsService/GetUsageTotals",
    "/claw.v1.StatsService/ListHourlyUsage",
    "/claw.v1.StatsService/ListDailyUsage",
    "/claw.v1.StatsService/ListCooldownEvents",
    "/claw.v1.TokenService/ListTokens",
    "/claw.v1.TokenService/WhoAmI",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Admin methods that change state; listed so that the descriptor test can
/// tell "classified as a write" from "forgotten".
const WRITES: &[&str] = &[
    "/claw.v1.AgentService/CreateAgent",
    "/claw.v1.AgentService/UpdateAgent",
    "/claw.v1.AgentService/DeleteAgent",
    "/claw.v1.AgentService/SetAgentEnabled",
    "/claw.v1.BackendService/CreateBackend",
    "/claw.v1.BackendService/UpdateBackend",
    "/claw.v1.BackendService/DeleteBackend",
    "/claw.v1.BackendService/SetBackendEnabled",
    "/claw.v1.BackupService/CreateBackup",
    "/claw.v1.ClientKeyService/CreateClientKey",
    "/claw.v1.ClientKeyService/DeleteClientKey",
    "/claw.v1.ClientKeyService/UpdateClientKey",
    "/claw.v1.ClusterService/RotateMasterKey",
    "/claw.v1.ClusterService/ApplyConfig",
    "/claw.v1.HeartbeatService/RunHeartbeat",
    "/claw.v1.HeartbeatService/SetChecklist",
    "/claw.v1.HeartbeatService/RedeliverRuns",
    "/claw.v1.PoolService/UpdatePoolSettings",
    "/claw.v1.TokenService/CreateToken",
    "/claw.v1.TokenService/DeleteToken",
];

/// Services the proxies call with the proxy token; no admin token opens them.
pub(crate) const PROXY_SERVICES: [&str; 2] = ["claw.v1.DiscoveryService", "claw.v1.ReportService"];

/// How `method` (a full path) is classified; unknown methods are writes.
pub fn classify(method: &str) -> Access {
    classified(method).unwrap_or(Access::Write)
}

/// The explicit classification of `method`, if it has one.
fn classified(method: &str) -> Option<Access> {
    if READS.contains(&method) {
        Some(Access::Read)
    } else if WRITES.contains(&method) {
        Some(Access::Write)
    } else {
        None
    }
}

/// The gRPC service of a full method path (`/pkg.Svc/Method` → `pkg.Svc`).
pub(crate) fn service_of(path: &str) -> &str {
    path.trim_start_matches('/')
        .split_once('/')
        .map_or("", |(svc, _)| svc)
}

/// Whether a request for `path` needs an admin token: everything but gRPC
/// health (probes send no headers) and the proxies' own services.
pub(crate) fn needs_admin(path: &str) -> bool {
    let service = service_of(path);
    service != "grpc.health.v1.Health" && !PROXY_SERVICES.contains(&service)
}

/// The full path of every method of every `claw.v1` admin service, from
/// the compiled proto descriptor set (the proxies' services excluded).
pub fn admin_methods() -> Vec<String> {
    use prost::Message as _;
    // The set is compiled into claw-proto by its build script; it cannot
    // fail to decode unless the build is broken, and then nothing is listed
    // (which the unit test below catches).
    let Ok(set) = prost_types::FileDescriptorSet::decode(claw_proto::v1::FILE_DESCRIPTOR_SET)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for file in &set.file {
        let package = file.package();
        for service in &file.service {
            let full = format!("{package}.{}", service.name());
            if PROXY_SERVICES.contains(&full.as_str()) {
                continue;
            }
            for m in &service.method {
                out.push(format!("/{full}/{}", m.name()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_admin_method_is_classified() {
        let methods = admin_methods();
        assert!(methods.len() > 30, "descriptor set has the services");
        for m in &methods {
            assert!(classified(m).is_some(), "{m} is neither a read nor a write");
            assert!(needs_admin(m), "{m} must need an admin token");
        }
        // And nothing listed is stale (reflection comes from tonic).
        for m in READS.iter().chain(WRITES) {
            assert!(
                m.starts_with("/grpc.reflection.") || methods.iter().any(|x| x == m),
                "{m} is classified but not in the protos"
            );
        }
    }

    #[test]
    fn reads_are_exactly_gets_lists_whoami_and_export() {
        for m in admin_methods() {
            let name = m.rsplit('/').next().unwrap_or_default();
            let read_shaped = name.starts_with("Get")
                || name.starts_with("List")
                || name == "WhoAmI"
                || name == "ExportConfig";
            assert_eq!(
                classify(&m) == Access::Read,
                read_shaped,
                "{m} is classified {:?}",
                classify(&m)
            );
        }
    }

    #[test]
    fn unknown_methods_are_writes_and_proxy_services_not_admin() {
        assert_eq!(
            classify("/claw.v1.BackendService/Frobnicate"),
            Access::Write
        );
        assert_eq!(classify(""), Access::Write);
        assert!(!needs_admin("/claw.v1.DiscoveryService/StreamConfig"));
        assert!(!needs_admin("/claw.v1.ReportService/StreamReports"));
        assert!(!needs_admin("/grpc.health.v1.Health/Check"));
        assert!(needs_admin("/claw.v1.Nope/X"));
        assert!(needs_admin(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
    }
}

//! The gRPC API end to end, in process: the real server on port 0 with
//! tonic clients.

use crate::common::*;
use claw_proto::v1::backend_service_client::BackendServiceClient;
use claw_proto::v1::cluster_service_client::ClusterServiceClient;
use claw_proto::v1::*;
use tonic::Code;

const KEY2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn backend(name: &str) -> Backend {
    Backend {
        name: name.into(),
        base_url: "https://api.example.com/v1".into(),
        api_key: "sk-test-abcdefghijklmnop".into(),
        rpm: 60,
        enabled: true,
        ..Default::default()
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("writes");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("reads");
    out
}

#[tokio::test]
async fn admin_rpcs_require_the_admin_token() {
    let h = Harness::start().await;
    for token in [None, Some(PROXY), Some("admin-token-wrong-value")] {
        let mut c = BackendServiceClient::new(h.authed(token));
        let err = c
            .list_backends(ListBackendsRequest::default())
            .await
            .expect_err("rejected");
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(err.message(), "missing or invalid admin token");
    }
    let mut c = BackendServiceClient::new(h.authed(Some(ADMIN)));
    assert!(
        c.list_backends(ListBackendsRequest::default())
            .await
            .is_ok()
    );

    // Health is open to probes without a token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(h.channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "claw.v1.BackendService".into(),
        })
        .await
        .expect("health answers");
    assert_eq!(
        r.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    h.stop().await;
}

#[tokio::test]
async fn backend_errors_map_to_status_codes_naming_the_field() {
    let h = Harness::start().await;
    let mut c = BackendServiceClient::new(h.authed(Some(ADMIN)));
    let created = c
        .create_backend(CreateBackendRequest {
            backend: Some(backend("b1")),
        })
        .await
        .expect("created")
        .into_inner();
    let b = created.backend.expect("backend");
    assert_eq!(b.api_key, "sk-t…mnop");
    assert!(created.config_version > 1);

    let err = c
        .create_backend(CreateBackendRequest {
            backend: Some(backend("b1")),
        })
        .await
        .expect_err("duplicate");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(err.message(), r#"name: backend "b1" already exists"#);

    let mut bad = backend("b2");
    bad.rpm = 0;
    let err = c
        .create_backend(CreateBackendRequest { backend: Some(bad) })
        .await
        .expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "rpm: must be > 0");

    let err = c
        .get_backend(GetBackendRequest {
            backend: "missing".into(),
        })
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), r#"backend "missing" not found"#);

    let got = c
        .get_backend(GetBackendRequest {
            backend: b.id.clone(),
        })
        .await
        .expect("by id")
        .into_inner();
    assert_eq!(got.backend.expect("backend").name, "b1");

    let metrics = http_get(h.http, "/metrics").await;
    assert!(
        metrics.contains("claw_cp_grpc_requests_total{method=\"claw.v1.BackendService/CreateBackend\",code=\"AlreadyExists\"}"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test]
async fn cluster_info_rotation_and_apply() {
    let h = Harness::start().await;
    let mut backends = BackendServiceClient::new(h.authed(Some(ADMIN)));
    backends
        .create_backend(CreateBackendRequest {
            backend: Some(backend("b1")),
        })
        .await
        .expect("created");
    let mut c = ClusterServiceClient::new(h.authed(Some(ADMIN)));
    let info = c
        .get_snapshot_info(GetSnapshotInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(
        (info.backends, info.proxies_connected, info.schema_version),
        (1, 0, 1)
    );
    let old_id = info.master_key_id;

    let err = c
        .rotate_master_key(RotateMasterKeyRequest {
            new_master_key: "nothex".into(),
        })
        .await
        .expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("new_master_key: "));
    assert!(!err.message().contains("nothex"));
    let r = c
        .rotate_master_key(RotateMasterKeyRequest {
            new_master_key: KEY2.into(),
        })
        .await
        .expect("rotated")
        .into_inner();
    assert_eq!((r.old_key_id, r.reencrypted), (old_id, 1));
    let got = backends
        .get_backend(GetBackendRequest {
            backend: "b1".into(),
        })
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(got.backend.expect("backend").api_key, "sk-t…mnop");

    let exported = c
        .export_config(ExportConfigRequest {})
        .await
        .expect("export")
        .into_inner();
    let applied = c
        .apply_config(ApplyConfigRequest {
            config: exported.config,
            dry_run: false,
            prune: true,
        })
        .await
        .expect("apply")
        .into_inner();
    assert_eq!(applied.config_version, exported.config_version);
    assert!(
        applied
            .changes
            .iter()
            .all(|c| c.action == ChangeAction::Unchanged as i32)
    );
    let proxies = c
        .list_proxies(ListProxiesRequest {})
        .await
        .expect("proxies")
        .into_inner();
    assert!(proxies.proxies.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn reflection_lists_services_for_the_admin_only() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let h = Harness::start().await;
    let list = || {
        tokio_stream::once(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
    };
    let mut anonymous = ServerReflectionClient::new(h.authed(None));
    let err = match anonymous.server_reflection_info(list()).await {
        Err(e) => e,
        Ok(r) => r.into_inner().message().await.expect_err("stream rejected"),
    };
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut admin = ServerReflectionClient::new(h.authed(Some(ADMIN)));
    let mut stream = admin
        .server_reflection_info(list())
        .await
        .expect("reflection answers")
        .into_inner();
    let response = stream.message().await.expect("message").expect("one");
    let Some(MessageResponse::ListServicesResponse(services)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<_> = services.service.into_iter().map(|s| s.name).collect();
    for want in [
        "claw.v1.BackendService",
        "claw.v1.ClusterService",
        "claw.v1.DiscoveryService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    h.stop().await;
}

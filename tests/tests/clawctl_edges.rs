//! Issue 15, clawctl's first-day rough edges, each as a new user meets it:
//! the real control plane driven by the real `clawctl` (and, where the rule
//! is the server's, a raw gRPC client).

use claw_proto::v1::{Agent, CreateAgentRequest, agent_service_client::AgentServiceClient};
use claw_tests::harness::ControlPlane;

fn admin<T>(cp: &ControlPlane, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", cp.admin_token())
            .parse()
            .expect("ascii token"),
    );
    r
}

async fn channel(cp: &ControlPlane) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(cp.grpc_url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// `clawctl agent add --help` says ids are lowercase; `Bad_ID` was accepted.
#[tokio::test]
async fn an_agent_id_the_help_calls_invalid_is_refused_by_clawctl_and_the_server() {
    let cp = ControlPlane::start();
    let out = cp
        .clawctl(&["agent", "add", "Bad_ID", "--model", "gpt-4o"])
        .assert_err_contains("id: \"Bad_ID\" must be lowercase");
    assert_eq!(out.stderr.lines().count(), 1, "{out}");

    let err = AgentServiceClient::new(channel(&cp).await)
        .create_agent(admin(
            &cp,
            CreateAgentRequest {
                agent: Some(Agent {
                    id: "Bad_ID".into(),
                    model: "gpt-4o".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect_err("the control plane refuses it");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("id: "), "{err:?}");

    cp.clawctl(&["agent", "add", "good_id-1.x", "--model", "gpt-4o"])
        .assert_ok();
}

#[tokio::test]
async fn version_shows_the_client_and_the_server() {
    let cp = ControlPlane::start();
    let v = cp.clawctl(&["version", "-o", "json"]).assert_ok().json();
    let client = v["client_version"].as_str().expect("client_version");
    assert!(!client.is_empty(), "{v}");
    // The workspace shares one version, so the two agree here.
    assert_eq!(v["server_version"].as_str(), Some(client), "{v}");
    let table = cp.clawctl(&["version"]).assert_ok().stdout;
    assert!(
        table.contains(&format!("Server version: {client}")),
        "{table}"
    );
    let snap = cp.clawctl(&["snapshot", "-o", "json"]).assert_ok().json();
    assert_eq!(snap["server_version"].as_str(), Some(client), "{snap}");
}

#[tokio::test]
async fn pool_list_and_get_are_show_for_all_and_one() {
    let cp = ControlPlane::start();
    for format in ["json", "yaml", "table"] {
        let list = cp.clawctl(&["pool", "list", "-o", format]).assert_ok();
        let show = cp.clawctl(&["pool", "show", "-o", format]).assert_ok();
        assert_eq!(list.stdout, show.stdout, "{format}");
        let get = cp
            .clawctl(&["pool", "get", "fallback", "-o", format])
            .assert_ok();
        let show = cp
            .clawctl(&["pool", "show", "fallback", "-o", format])
            .assert_ok();
        assert_eq!(get.stdout, show.stdout, "{format}");
    }
    let list = cp
        .clawctl(&["pool", "list", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    cp.clawctl(&["pool", "get"]).assert_err();
    // YAML in the `pools:` shape of `export`, keyed by pool name.
    let yaml = cp
        .clawctl(&["pool", "get", "primary", "-o", "yaml"])
        .assert_ok()
        .stdout;
    assert!(yaml.starts_with("primary:\n"), "{yaml}");
    assert!(!yaml.contains("_ms:"), "{yaml}");
}

/// `key update` changes what the proxies enforce, without a new secret.
#[tokio::test]
async fn key_update_changes_models_and_rpm_the_proxies_enforce() {
    use crate::data_plane_support::{CHAT, Cluster, ClusterOptions, EMBED};
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..Default::default()
    });
    let proxy = c.proxy();
    assert_eq!(c.chat(proxy, CHAT).await.status(), 200);

    let v0 = c.config_version();
    let k =
        c.cp.clawctl(&["key", "update", "tests", "--models", EMBED, "-o", "json"])
            .assert_ok()
            .json();
    assert_eq!(k["models"], serde_json::json!([EMBED]), "{k}");
    assert!(c.wait_synced() > v0);
    assert_eq!(
        c.chat(proxy, CHAT).await.status(),
        403,
        "chat is no longer allowed"
    );

    c.cp.clawctl(&["key", "update", "tests", "--models", "", "--rpm", "1"])
        .assert_ok();
    c.wait_synced();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(c.chat(proxy, CHAT).await.status().as_u16());
    }
    assert!(statuses.contains(&200), "every model again: {statuses:?}");
    assert!(statuses.contains(&429), "1 rpm: {statuses:?}");

    let audit = c.cp.clawctl(&["audit", "-o", "json"]).assert_ok().stdout;
    assert!(audit.contains("UpdateClientKey"), "{audit}");
    c.cp.clawctl(&["key", "update", "tests"])
        .assert_err_contains("nothing to change");
    c.cp.clawctl(&["key", "update", "nope", "--rpm", "3"])
        .assert_err_contains("not found");
}

/// A key, agent or (disabled) backend naming a model nothing serves is
/// accepted, with one warning line on stderr.
#[tokio::test]
async fn naming_a_model_no_enabled_backend_serves_warns_but_succeeds() {
    let cp = ControlPlane::start();
    let env = [("KEY_VAR", "sk-test-aaaaaaaaaaaaaaaa1234")];
    let base = [
        "backend",
        "add",
        "b1",
        "--url",
        "https://api.example.com/v1",
        "--api-key-env",
        "KEY_VAR",
        "--model",
        "gpt-4o",
    ];
    let out = cp.clawctl_with_env(&base, &env).assert_ok();
    assert_eq!(out.stderr, "", "an enabled backend serves its models");
    let mut disabled = base.to_vec();
    disabled[2] = "b2";
    disabled[8] = "llama3";
    disabled.push("--disabled");
    let out = cp.clawctl_with_env(&disabled, &env).assert_ok();
    assert!(out.stderr.contains("\"llama3\""), "{out}");

    let warned = |args: &[&str], model: &str| {
        let out = cp.clawctl(args).assert_ok();
        assert_eq!(out.stderr.lines().count(), 1, "{out}");
        assert!(
            out.stderr.starts_with("warning: ")
                && out.stderr.contains(&format!("{model:?}"))
                && out.stderr.contains("no enabled backend serves"),
            "{out}"
        );
    };
    let quiet = |args: &[&str]| {
        let out = cp.clawctl(args).assert_ok();
        assert_eq!(out.stderr, "", "{out}");
    };
    warned(&["key", "add", "k1", "--models", "gpt-4o,gtp-4o"], "gtp-4o");
    quiet(&["key", "add", "k2", "--models", "gpt-4o"]);
    warned(&["key", "update", "k2", "--models", "llama3"], "llama3");
    quiet(&["key", "update", "k2", "--rpm", "5"]);
    warned(&["agent", "add", "a1", "--model", "gpt4o"], "gpt4o");
    quiet(&["agent", "update", "a1", "--model", "gpt-4o"]);
    warned(&["agent", "update", "a1", "--model", "llama3"], "llama3");
}

/// Reflection listed `grpc.reflection.v1alpha.ServerReflection` without
/// serving its descriptor, so `buf curl --list-methods` failed. Both
/// versions must resolve every service they list (with its dependencies).
macro_rules! every_listed_service_resolves {
    ($pb:path, $cp:expr) => {{
        use pb::server_reflection_client::ServerReflectionClient;
        use pb::server_reflection_request::MessageRequest;
        use pb::server_reflection_response::MessageResponse;
        use prost::Message as _;
        use $pb as pb;

        let cp: &ControlPlane = $cp;
        let mut client = ServerReflectionClient::new(channel(cp).await);
        let ask = |req: MessageRequest| {
            let msg = pb::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(req),
            };
            admin(cp, futures::stream::iter([msg]))
        };
        let answer = |resp: Option<pb::ServerReflectionResponse>| {
            resp.and_then(|r| r.message_response)
                .expect("one reflection answer")
        };
        let mut stream = client
            .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
            .await
            .expect("list services")
            .into_inner();
        let services = match answer(stream.message().await.expect("a message")) {
            MessageResponse::ListServicesResponse(l) => l.service,
            other => panic!("not a service list: {other:?}"),
        };
        let names: Vec<String> = services.into_iter().map(|s| s.name).collect();
        for want in [
            "claw.v1.ClientKeyService",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        for name in &names {
            let mut stream = client
                .server_reflection_info(ask(MessageRequest::FileContainingSymbol(name.clone())))
                .await
                .expect("file containing symbol")
                .into_inner();
            let files = match answer(stream.message().await.expect("a message")) {
                MessageResponse::FileDescriptorResponse(f) => f.file_descriptor_proto,
                other => panic!("{name}: no descriptor: {other:?}"),
            };
            let decode = |raw: &[u8]| {
                prost_types::FileDescriptorProto::decode(raw).expect("a file descriptor")
            };
            let files: Vec<prost_types::FileDescriptorProto> =
                files.iter().map(|raw| decode(raw)).collect();
            let (package, service) = name.rsplit_once('.').expect("a qualified name");
            assert!(
                files.iter().any(
                    |f| f.package() == package && f.service.iter().any(|s| s.name() == service)
                ),
                "{name}: not declared in the files returned"
            );
            // Like a client: fetch every import by file name, transitively.
            let mut have: Vec<String> = files.iter().map(|f| f.name().to_string()).collect();
            let mut todo: Vec<String> = files.iter().flat_map(|f| f.dependency.clone()).collect();
            while let Some(dep) = todo.pop() {
                if have.contains(&dep) {
                    continue;
                }
                let mut stream = client
                    .server_reflection_info(ask(MessageRequest::FileByFilename(dep.clone())))
                    .await
                    .expect("file by filename")
                    .into_inner();
                let raw = match answer(stream.message().await.expect("a message")) {
                    MessageResponse::FileDescriptorResponse(f) => f.file_descriptor_proto,
                    other => panic!("{name}: import {dep} not served: {other:?}"),
                };
                for f in raw.iter().map(|r| decode(r)) {
                    todo.extend(f.dependency.clone());
                    have.push(f.name().to_string());
                }
                assert!(have.contains(&dep), "{name}: import {dep} not served");
            }
        }
        names
    }};
}

#[tokio::test]
async fn both_reflection_versions_serve_every_service_they_list() {
    let cp = ControlPlane::start();
    let v1 = every_listed_service_resolves!(tonic_reflection::pb::v1, &cp);
    let v1alpha = every_listed_service_resolves!(tonic_reflection::pb::v1alpha, &cp);
    assert_eq!(v1, v1alpha);
}

/// `agent get -o yaml` showed `interval_seconds: 1800` while `export` wrote
/// `interval: 30m`: YAML now has the document's shape, and what `get`
/// prints is the agent's entry in `export`.
#[tokio::test]
async fn agent_yaml_has_the_export_document_shape() {
    let cp = ControlPlane::start();
    cp.clawctl(&[
        "agent",
        "add",
        "a1",
        "--model",
        "gpt-4o",
        "--interval",
        "45m",
    ])
    .assert_ok();
    let yaml = cp
        .clawctl(&["agent", "get", "a1", "-o", "yaml"])
        .assert_ok()
        .stdout;
    assert!(yaml.contains("interval: 45m"), "{yaml}");
    assert!(!yaml.contains("interval_seconds"), "{yaml}");
    let one: serde_json::Value = serde_norway::from_str(&yaml).expect("yaml");
    let list = cp
        .clawctl(&["agent", "list", "-o", "yaml"])
        .assert_ok()
        .stdout;
    let list: serde_json::Value = serde_norway::from_str(&list).expect("yaml");
    assert_eq!(list, serde_json::json!([one.clone()]));

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("claw.yaml");
    let file = file.to_str().expect("utf-8 path");
    cp.clawctl(&["export", "-f", file]).assert_ok();
    let doc: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(file).expect("export file")).expect("yaml");
    assert_eq!(doc["agents"], serde_json::json!([one]));

    // JSON stays the API's message, for scripts.
    let json = cp
        .clawctl(&["agent", "get", "a1", "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(json["interval_seconds"], 2700);
}

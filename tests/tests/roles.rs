//! Named admin tokens with roles (issue 14): `clawctl token add|list|rm`,
//! a viewer may call every read RPC and no write, a removed token stops
//! working on the very next call, the proxy and admin tokens open only their
//! own services, and token secrets are never stored or logged.

use bytes::Buf as _;
use claw_control_plane::access::methods::admin_methods;
use claw_tests::harness::{ControlPlane, CtlCommand, grep_dir};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A codec for "any message, sent empty; any answer, ignored": an empty
/// protobuf message is zero bytes, and every proto3 request decodes from it,
/// so one generic call reaches every method.
#[derive(Debug, Clone, Copy, Default)]
struct EmptyCodec;

impl Codec for EmptyCodec {
    type Encode = ();
    type Decode = ();
    type Encoder = EmptyCodec;
    type Decoder = EmptyCodec;

    fn encoder(&mut self) -> Self::Encoder {
        EmptyCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        EmptyCodec
    }
}

impl Encoder for EmptyCodec {
    type Item = ();
    type Error = Status;

    fn encode(&mut self, (): (), _dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        Ok(())
    }
}

impl Decoder for EmptyCodec {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        let n = src.remaining();
        src.advance(n);
        Ok(Some(()))
    }
}

/// Calls `path` with an empty request and `token` (if any); the status
/// code the server answered (`Ok` on success).
async fn call(channel: &Channel, path: &str, token: Option<&str>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    if let Err(e) = grpc.ready().await {
        return Status::unavailable(e.to_string());
    }
    let mut request = tonic::Request::new(());
    if let Some(t) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii token"),
        );
    }
    let path: http::uri::PathAndQuery = path.parse().expect("a method path");
    match grpc.unary(request, path, EmptyCodec).await {
        Ok(_) => Status::ok(""),
        Err(s) => s,
    }
}

async fn channel(cp: &ControlPlane) -> Channel {
    tonic::transport::Endpoint::from_shared(cp.grpc_url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// Whether a method only reads, by the naming rule the API follows.
fn is_read(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or_default();
    name.starts_with("Get")
        || name.starts_with("List")
        || name == "WhoAmI"
        || name == "ExportConfig"
}

/// A `clawctl` command against `cp` with `token` (not the bootstrap one).
fn ctl_as(cp: &ControlPlane, token: &str, args: &[&str]) -> CtlCommand {
    CtlCommand::new(args).server(&cp.grpc_url()).token(token)
}

/// `clawctl token add NAME --role ROLE -o json`: the secret.
fn add_token(cp: &ControlPlane, name: &str, role: &str) -> String {
    let out = cp
        .clawctl(&["token", "add", name, "--role", role, "-o", "json"])
        .assert_ok()
        .json();
    assert_eq!(out["name"], name, "{out}");
    assert_eq!(out["role"], role, "{out}");
    assert!(
        out["id"].as_str().is_some_and(|id| id.starts_with("tk_")),
        "{out}"
    );
    out["secret"]
        .as_str()
        .expect("secret in -o json")
        .to_string()
}

#[tokio::test]
async fn a_viewer_may_call_every_read_and_no_write() {
    let cp = ControlPlane::start();
    let viewer = add_token(&cp, "ops", "viewer");
    let ch = channel(&cp).await;
    let methods = admin_methods();
    assert!(methods.len() > 30, "{methods:?}");
    let mut writes = 0;
    for m in &methods {
        let status = call(&ch, m, Some(&viewer)).await;
        let name = m.rsplit('/').next().unwrap_or_default();
        if is_read(m) {
            assert!(
                !matches!(
                    status.code(),
                    Code::PermissionDenied | Code::Unauthenticated
                ),
                "viewer refused a read {m}: {status:?}"
            );
        } else {
            writes += 1;
            assert_eq!(status.code(), Code::PermissionDenied, "{m}: {status:?}");
            assert_eq!(
                status.message(),
                format!("token \"ops\" has role viewer; {name} needs role admin"),
                "{m}"
            );
        }
    }
    assert!(writes >= 15, "only {writes} writes found");

    // clawctl: one line naming the role, non-zero exit, nothing written.
    let out = ctl_as(
        &cp,
        &viewer,
        &[
            "backend",
            "add",
            "b1",
            "--url",
            "http://127.0.0.1:9/v1",
            "--api-key-env",
            "K",
            "--model",
            "gpt-4o",
        ],
    )
    .env("K", "sk-test-0123456789")
    .run()
    .assert_err_contains("has role viewer");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("CreateBackend needs role admin"),
        "{}",
        out.stderr
    );
    let list = cp.clawctl_with_token(&viewer, &["backend", "list", "-o", "json"]);
    assert_eq!(list.assert_ok().json(), serde_json::json!([]));

    let who = cp
        .clawctl_with_token(&viewer, &["whoami"])
        .assert_ok()
        .stdout;
    assert!(
        who.contains("name: ops") && who.contains("role: viewer"),
        "{who}"
    );
    let who = cp.clawctl(&["whoami"]).assert_ok().stdout;
    assert!(
        who.contains("name: bootstrap") && who.contains("role: admin"),
        "{who}"
    );
}

#[tokio::test]
async fn a_named_admin_writes_and_a_removed_token_stops_at_once() {
    let cp = ControlPlane::start();
    let alice = add_token(&cp, "alice", "admin");
    let viewer = add_token(&cp, "ops", "viewer");
    ctl_as(
        &cp,
        &alice,
        &[
            "backend",
            "add",
            "b1",
            "--url",
            "http://127.0.0.1:9/v1",
            "--api-key-env",
            "K",
            "--model",
            "gpt-4o",
        ],
    )
    .env("K", "sk-test-0123456789")
    .run()
    .assert_ok();
    // alice creates a token: it records her as its creator.
    let out = cp
        .clawctl_with_token(
            &alice,
            &["token", "add", "ci", "--role", "viewer", "-o", "json"],
        )
        .assert_ok()
        .json();
    assert_eq!(out["created_by"], "alice", "{out}");

    let list = cp
        .clawctl(&["token", "list", "-o", "json"])
        .assert_ok()
        .json();
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["alice", "ci", "ops"]);
    let table = cp.clawctl(&["token", "list"]).assert_ok().stdout;
    for col in [
        "NAME",
        "ROLE",
        "PREFIX",
        "CREATED",
        "CREATED BY",
        "viewer",
        "bootstrap",
    ] {
        assert!(table.contains(col), "{col} missing:\n{table}");
    }
    for t in list.as_array().expect("array") {
        assert!(t.get("secret").is_none(), "{t}");
    }

    // Duplicates and reserved names are refused, naming the field.
    cp.clawctl(&["token", "add", "ops", "--role", "admin"])
        .assert_err_contains("already exists");
    cp.clawctl(&["token", "add", "bootstrap", "--role", "admin"])
        .assert_err_contains("name:");
    cp.clawctl(&["token", "add", "x", "--role", "root"])
        .assert_err();

    // Removal takes effect on the very next call, for clawctl and raw gRPC.
    cp.clawctl_with_token(&viewer, &["backend", "list"])
        .assert_ok();
    cp.clawctl_with_token(&alice, &["token", "rm", "ops"])
        .assert_ok();
    cp.clawctl_with_token(&viewer, &["backend", "list"])
        .assert_err_contains("unauthenticated");
    let ch = channel(&cp).await;
    let status = call(&ch, "/claw.v1.BackendService/ListBackends", Some(&viewer)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    cp.clawctl(&["token", "rm", "ops"])
        .assert_err_contains("not found");
    // Tokens survive a restart.
    let mut cp = cp;
    cp.restart();
    cp.clawctl_with_token(&alice, &["backend", "list"])
        .assert_ok();
}

#[tokio::test]
async fn proxy_and_admin_tokens_open_only_their_own_services() {
    let cp = ControlPlane::start();
    let named = add_token(&cp, "alice", "admin");
    let ch = channel(&cp).await;
    for m in admin_methods() {
        for token in [Some(cp.proxy_token()), None, Some("wrong-token-0123456789")] {
            let status = call(&ch, &m, token).await;
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{m} {token:?}: {status:?}"
            );
        }
    }
    for m in [
        "/claw.v1.DiscoveryService/StreamConfig",
        "/claw.v1.ReportService/StreamReports",
    ] {
        for token in [cp.admin_token(), named.as_str()] {
            let status = call(&ch, m, Some(token)).await;
            assert_eq!(status.code(), Code::Unauthenticated, "{m}: {status:?}");
        }
    }
    // Health stays open: probes send no headers.
    let status = call(&ch, "/grpc.health.v1.Health/Check", None).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
}

#[tokio::test]
async fn token_secrets_never_reach_the_data_directory_or_the_logs() {
    let cp = ControlPlane::start();
    let admin = add_token(&cp, "alice", "admin");
    let viewer = add_token(&cp, "ops", "viewer");
    let table = cp
        .clawctl(&["token", "add", "table", "--role", "viewer"])
        .assert_ok()
        .stdout;
    let shown = table
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .expect("the table view prints the secret once")
        .trim()
        .to_string();
    cp.clawctl_with_token(&admin, &["token", "list"])
        .assert_ok();
    cp.clawctl_with_token(&viewer, &["token", "list", "-o", "yaml"])
        .assert_ok();
    cp.clawctl_with_token(&viewer, &["backend", "add", "x", "--url", "http://h/v1"])
        .assert_err();
    cp.clawctl_with_token(&admin, &["token", "rm", "ops"])
        .assert_ok();
    cp.flush_logs();
    for secret in [&admin, &viewer, &shown] {
        let hits = grep_dir(cp.data_dir(), secret.as_bytes());
        assert!(hits.is_empty(), "token secret in data files: {hits:?}");
        assert!(
            !cp.logs().contains(secret.as_str()),
            "token secret in the logs"
        );
    }
}

#[tokio::test]
async fn token_writes_leave_one_audit_record_each_without_secrets() {
    use claw_control_plane::store::{Store as _, Tree};
    use prost::Message as _;

    let mut cp = ControlPlane::start();
    let alice = add_token(&cp, "alice", "admin");
    let ops = add_token(&cp, "ops", "viewer");
    cp.clawctl_with_token(&alice, &["token", "rm", "ops"])
        .assert_ok();
    // Refused writes leave nothing.
    cp.clawctl(&["token", "add", "alice", "--role", "viewer"])
        .assert_err();
    cp.stop_clean();

    let store = claw_control_plane::store::sled::SledStore::open(cp.data_dir()).expect("store");
    let records: Vec<claw_proto::v1::AuditRecord> = store
        .scan(Tree::Audit)
        .expect("scan")
        .iter()
        .map(|(_, v)| claw_proto::v1::AuditRecord::decode(v.as_slice()).expect("decodes"))
        .filter(|r| r.resource_kind == "token")
        .collect();
    let seen: Vec<(&str, &str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r.operation.as_str(),
                r.action.as_str(),
                r.resource_name.as_str(),
                r.token_name.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("CreateToken", "created", "alice", "bootstrap"),
            ("CreateToken", "created", "ops", "bootstrap"),
            ("DeleteToken", "deleted", "ops", "alice"),
        ]
    );
    let fields: Vec<(&str, &str, &str)> = records[1]
        .changes
        .iter()
        .map(|c| (c.field.as_str(), c.old_value.as_str(), c.new_value.as_str()))
        .collect();
    assert_eq!(fields, [("name", "", "ops"), ("role", "", "viewer")]);
    for r in &records {
        assert!(r.resource_id.starts_with("tk_"), "{r:?}");
        assert!(!r.peer.is_empty(), "{r:?}");
        let text = format!("{r:?}");
        assert!(
            !text.contains(&alice) && !text.contains(&ops),
            "secret in {text}"
        );
    }
}

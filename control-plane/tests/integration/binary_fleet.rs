//! The fleet loop through the real binaries: a report batch survives
//! `kill -9` of the control plane and is counted once when resent, and
//! `clawctl stats total -o json` prints one object with the documented
//! fields.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use claw_proto::v1::report_service_client::ReportServiceClient;
use claw_proto::v1::{StreamReportsRequest, UsageEvent};

const BIN: &str = env!("CARGO_BIN_EXE_claw-control-plane");
const ADMIN: &str = "admin-token-0123456789";
const PROXY: &str = "proxy-token-0123456789";
const KEY1: &str = "1111111111111111111111111111111111111111111111111111111111111111";

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the control plane on `data` and returns its gRPC address.
fn start(data: &std::path::Path) -> (Running, String) {
    let mut c = Command::new(BIN);
    for var in [
        "CLAW_MASTER_KEY_FILE",
        "CLAW_CP_GRPC_ADDR",
        "CLAW_CP_HTTP_ADDR",
    ] {
        c.env_remove(var);
    }
    let mut child = c
        .env("CLAW_DATA_DIR", data)
        .env("CLAW_CP_GRPC_ADDR", "127.0.0.1:0")
        .env("CLAW_CP_HTTP_ADDR", "127.0.0.1:0")
        .env("CLAW_ADMIN_TOKEN", ADMIN)
        .env("CLAW_PROXY_TOKEN", PROXY)
        .env("CLAW_MASTER_KEY", KEY1)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let grpc = line
        .trim()
        .strip_prefix("listening grpc=")
        .and_then(|r| r.split_once(" http="))
        .map(|(g, _)| g.to_string())
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    (Running(child), grpc)
}

/// Sends `batch` on a fresh report stream and waits for its ACK.
async fn report(grpc: &str, batch: StreamReportsRequest) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(batch).await.expect("queued");
    let mut client = ReportServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("connects");
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {PROXY}").parse().expect("ascii"),
    );
    let mut acks = client
        .stream_reports(request)
        .await
        .expect("stream")
        .into_inner();
    let ack = tokio::time::timeout(Duration::from_secs(10), acks.message())
        .await
        .expect("ack in time")
        .expect("healthy")
        .expect("ack");
    assert_eq!(ack.acked_seq, 1);
}

fn clawctl() -> Option<std::path::PathBuf> {
    let path = std::path::Path::new(BIN)
        .with_file_name(format!("clawctl{}", std::env::consts::EXE_SUFFIX));
    path.is_file().then_some(path)
}

fn number(v: &serde_json::Value) -> f64 {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn a_batch_acked_before_kill_9_is_counted_once_and_stats_total_is_one_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let batch = StreamReportsRequest {
        node_id: "edge-1".into(),
        stream_epoch: "epoch".into(),
        seq: 1,
        usage: vec![UsageEvent {
            request_id: "r1".into(),
            model: "gpt-4o".into(),
            prompt_tokens: 11,
            completion_tokens: 7,
            cost: 0.5,
            status: 200,
            ..Default::default()
        }],
        ..Default::default()
    };
    {
        let (mut running, grpc) = start(&data);
        rt.block_on(report(&grpc, batch.clone()));
        // kill -9 right after the ACK: the batch must be on disk already.
        running.0.kill().expect("kill -9");
        let _ = running.0.wait();
    }
    let (_running, grpc) = start(&data);
    // The proxy never saw the ACK (say) and resends.
    rt.block_on(report(&grpc, batch));

    let Some(clawctl) = clawctl() else {
        eprintln!("clawctl not built; skipping the `clawctl stats total` check");
        return;
    };
    let out = Command::new(clawctl)
        .args(["stats", "total", "-o", "json"])
        .env("CLAW_SERVER", format!("http://{grpc}"))
        .env("CLAW_ADMIN_TOKEN", ADMIN)
        .output()
        .expect("clawctl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(v.is_object(), "{v}");
    for field in [
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "total_tokens",
        "cost",
    ] {
        assert!(v.get(field).is_some(), "missing {field}: {v}");
    }
    assert_eq!(number(&v["requests"]), 1.0, "{v}");
    assert_eq!(number(&v["total_tokens"]), 18.0, "{v}");
    assert_eq!(number(&v["cost"]), 0.5, "{v}");
}

//! A fake OpenTelemetry collector: the one stand-in besides the LLM
//! provider. It accepts spans over OTLP/HTTP (`POST /v1/traces`, protobuf)
//! and OTLP/gRPC (`TraceService/Export`, h2c) on one loopback port, decodes
//! them with `opentelemetry-proto` and records them as [`ReceivedSpan`]s.
//!
//! Like the in-process mock upstream it runs on a runtime of its own, so a
//! test may block on the harness while a child exports to it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use parking_lot::Mutex;
use prost::Message as _;
use serde_json::Value;
use tokio::net::TcpListener;

const GRPC_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// One span as the collector received it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// `http/protobuf` or `grpc`.
    pub protocol: &'static str,
    /// The span name.
    pub name: String,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// 16 lowercase hex digits, empty for a root span.
    pub parent_span_id: String,
    /// OTLP `SpanKind` (2 server, 3 client).
    pub kind: i32,
    /// OTLP status code (0 unset, 1 ok, 2 error).
    pub status_code: i32,
    /// Attributes: strings, integers, doubles and booleans as JSON.
    pub attributes: BTreeMap<String, Value>,
    /// Attributes of the resource.
    pub resource: BTreeMap<String, Value>,
}

impl ReceivedSpan {
    /// An attribute, or `Value::Null`.
    pub fn attr(&self, key: &str) -> &Value {
        self.attributes.get(key).unwrap_or(&Value::Null)
    }
}

type Received = Arc<Mutex<Vec<ReceivedSpan>>>;

/// The running collector; stopped on drop.
#[derive(Debug)]
pub struct FakeCollector {
    addr: SocketAddr,
    spans: Received,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeCollector {
    /// Starts a collector on an ephemeral loopback port.
    ///
    /// # Panics
    /// When it cannot bind or start its runtime (a broken test machine).
    pub fn start() -> Self {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fake collector");
        std_listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = std_listener.local_addr().expect("the collector's address");
        let spans: Received = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let received = spans.clone();
        let thread = std::thread::Builder::new()
            .name("fake-otlp-collector".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the collector's runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                    tokio::select! {
                        _ = stopped => {}
                        () = serve(listener, received) => {}
                    }
                });
            })
            .expect("the collector's thread");
        FakeCollector {
            addr,
            spans,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:port`: the value for `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (either protocol).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().clone()
    }

    /// Waits until `pred` holds for the spans received, polling; the spans
    /// then, or `Err` with the spans seen after `timeout`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> Result<Vec<ReceivedSpan>, Vec<ReceivedSpan>> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if pred(&spans) {
                return Ok(spans);
            }
            if Instant::now() >= deadline {
                return Err(spans);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FakeCollector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(listener: TcpListener, received: Received) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let received = received.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, received.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type Body = StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn body(frames: Vec<Frame<Bytes>>) -> Body {
    StreamBody::new(futures::stream::iter(
        frames.into_iter().map(Ok).collect::<Vec<_>>(),
    ))
}

fn answer(
    status: StatusCode,
    content_type: &'static str,
    frames: Vec<Frame<Bytes>>,
) -> Response<Body> {
    let mut res = Response::new(body(frames));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    res
}

async fn handle(req: Request<Incoming>, received: Received) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(answer(StatusCode::BAD_REQUEST, "text/plain", vec![])),
    };
    let ok = ExportTraceServiceResponse::default().encode_to_vec();
    match path.as_str() {
        "/v1/traces" => match ExportTraceServiceRequest::decode(bytes) {
            Ok(export) => {
                record(&received, export, "http/protobuf");
                Ok(answer(
                    StatusCode::OK,
                    "application/x-protobuf",
                    vec![Frame::data(Bytes::from(ok))],
                ))
            }
            Err(_) => Ok(answer(StatusCode::BAD_REQUEST, "text/plain", vec![])),
        },
        GRPC_EXPORT_PATH => {
            let status = match grpc_message(bytes)
                .and_then(|m| ExportTraceServiceRequest::decode(m).map_err(|e| e.to_string()))
            {
                Ok(export) => {
                    record(&received, export, "grpc");
                    "0"
                }
                Err(_) => "3", // INVALID_ARGUMENT
            };
            let mut framed = vec![0u8];
            framed.extend_from_slice(&u32::try_from(ok.len()).unwrap_or(0).to_be_bytes());
            framed.extend_from_slice(&ok);
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static(status));
            Ok(answer(
                StatusCode::OK,
                "application/grpc",
                vec![Frame::data(Bytes::from(framed)), Frame::trailers(trailers)],
            ))
        }
        _ => Ok(answer(StatusCode::NOT_FOUND, "text/plain", vec![])),
    }
}

/// The one message of an uncompressed gRPC request body.
fn grpc_message(mut bytes: Bytes) -> Result<Bytes, String> {
    if bytes.len() < 5 {
        return Err("short gRPC frame".into());
    }
    let compressed = bytes.get_u8();
    let len = bytes.get_u32() as usize;
    if compressed != 0 || bytes.len() < len {
        return Err("compressed or truncated gRPC frame".into());
    }
    Ok(bytes.split_to(len))
}

fn record(received: &Received, export: ExportTraceServiceRequest, protocol: &'static str) {
    let mut out = Vec::new();
    for rs in export.resource_spans {
        let resource = rs
            .resource
            .map(|r| attrs(&r.attributes))
            .unwrap_or_default();
        let service = resource
            .get("service.name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    protocol,
                    name: s.name,
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent_span_id: hex::encode(&s.parent_span_id),
                    kind: s.kind,
                    status_code: s.status.map_or(0, |st| st.code),
                    attributes: attrs(&s.attributes),
                    resource: resource.clone(),
                });
            }
        }
    }
    received.lock().extend(out);
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), kv.value.as_ref().map_or(Value::Null, value)))
        .collect()
}

fn value(v: &AnyValue) -> Value {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => Value::from(s.clone()),
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::DoubleValue(d)) => Value::from(*d),
        Some(any_value::Value::BoolValue(b)) => Value::from(*b),
        Some(other) => Value::from(format!("{other:?}")),
        None => Value::Null,
    }
}

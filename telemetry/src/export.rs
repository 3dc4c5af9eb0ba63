//! The OTLP span exporter and the tracer provider with its batch span
//! processor.
//!
//! The SDK's batch processor exports from a thread of its own, outside the
//! Tokio runtime. The gRPC exporter copes (tonic's channel runs its I/O on the
//! runtime it was built in); for OTLP/HTTP, [`RuntimeHttpClient`] hands each
//! export to the runtime the exporter was built in, over hyper and rustls (so
//! `https://` collectors work) rather than a blocking client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

use crate::InitError;
use crate::settings::{Protocol, SamplerSetting, TraceSettings};

/// Builds the tracer provider. Must run inside a Tokio runtime, which has to
/// outlive the provider's shutdown.
pub(crate) fn tracer_provider(s: &TraceSettings) -> Result<SdkTracerProvider, InitError> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| InitError::NoRuntime)?;
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match s.protocol {
        Protocol::Grpc => builder
            .with_tonic()
            .with_protocol(opentelemetry_otlp::Protocol::Grpc)
            .with_timeout(s.timeout)
            .build(),
        Protocol::HttpProtobuf => builder
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(s.timeout)
            .with_http_client(RuntimeHttpClient::new(handle, s.timeout)?)
            .build(),
    }
    .map_err(InitError::Exporter)?;
    let mut resource = Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Some(name) = &s.service_name {
        resource = resource.with_service_name(name.clone());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler(s.sampler))
        .with_resource(resource.build())
        .build())
}

fn sampler(s: SamplerSetting) -> Sampler {
    match s {
        SamplerSetting::AlwaysOn => Sampler::AlwaysOn,
        SamplerSetting::AlwaysOff => Sampler::AlwaysOff,
        SamplerSetting::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
        SamplerSetting::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        SamplerSetting::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        SamplerSetting::ParentBasedTraceIdRatio(r) => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
        }
    }
}

/// An OTLP/HTTP client whose requests run on a Tokio runtime whatever thread
/// awaits them (the batch processor's own thread does).
#[derive(Debug, Clone)]
struct RuntimeHttpClient {
    inner: Arc<HyperClient<HttpsConnector<HttpConnector>>>,
    handle: tokio::runtime::Handle,
}

impl RuntimeHttpClient {
    fn new(handle: tokio::runtime::Handle, timeout: Duration) -> Result<Self, InitError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| InitError::Tls(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        // The client spawns its connection tasks: build it inside the runtime.
        let _enter = handle.enter();
        let inner = Arc::new(HyperClient::new(https, timeout, None));
        Ok(RuntimeHttpClient { inner, handle })
    }
}

impl HttpClient for RuntimeHttpClient {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let inner = self.inner.clone();
        let task = self
            .handle
            .spawn(async move { inner.send_bytes(request).await });
        Box::pin(async move {
            match task.await {
                Ok(result) => result,
                Err(e) => Err(format!("OTLP export task failed: {e}").into()),
            }
        })
    }
}

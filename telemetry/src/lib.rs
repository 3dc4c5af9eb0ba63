//! `claw-telemetry`: logging and OpenTelemetry tracing for the Claw Gateway
//! server binaries.
//!
//! [`init`] installs the global `tracing` subscriber: logs to stderr as text
//! or JSON, filtered by `RUST_LOG` (default `info`); and, only when an OTLP
//! endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, unless `OTEL_SDK_DISABLED=true`), a
//! `tracing-opentelemetry` layer exporting spans over OTLP through a batch
//! span processor. The returned [`Telemetry`] flushes pending spans when shut
//! down or dropped.
//!
//! - [`settings`] — the `OTEL_*` variables this crate decides on (on/off,
//!   protocol, sampler, service name, timeout); the OTLP exporter and SDK
//!   read the rest themselves.
//! - `export` — the OTLP exporter (gRPC or HTTP/protobuf) and tracer provider.
//! - [`propagation`] — W3C `traceparent` in and out of HTTP headers.
//! - [`genai`] — the proxy's request and attempt spans (GenAI conventions).
//! - [`process`] — the standard `process_*` metrics, read from `/proc/self`.
//!
//! Only spans with target [`TARGET`] are exported (plus warnings and errors
//! of the gateway's own crates inside them, as span events), so a
//! `RUST_LOG=debug` never turns the HTTP and gRPC libraries' own spans, or
//! the exporter's, into traces. `RUST_LOG` filters logs only.

pub mod genai;
pub mod process;
pub mod propagation;
pub mod settings;

mod export;

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

pub use settings::{Protocol, SamplerSetting, TraceSettings};

/// The `tracing` target of every span meant for export.
pub const TARGET: &str = "claw_trace";

/// Crates whose warnings and errors inside an exported span become span events.
const EVENT_CRATES: [&str; 3] = ["claw_control_plane", "claw_data_plane", "claw_telemetry"];

/// How long shutdown waits for the last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

static TRACES_ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported. A single relaxed atomic load: the proxy's
/// request path checks it before creating any span.
#[inline]
pub fn traces_enabled() -> bool {
    TRACES_ENABLED.load(Ordering::Relaxed)
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What [`init`] sets up.
#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` unless `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`
    /// set one: the binary name.
    pub service_name: &'static str,
    /// Log format.
    pub format: LogFormat,
    /// ANSI colours in text logs: `Some(true)` on, `Some(false)` off,
    /// `None` tracing-subscriber's default (on unless `NO_COLOR` is set).
    pub ansi: Option<bool>,
}

impl Options {
    /// Text or JSON logs for `service_name`, coloured when stderr is a terminal.
    pub fn new(service_name: &'static str, format: LogFormat) -> Self {
        Options {
            service_name,
            format,
            ansi: Some(std::io::stderr().is_terminal()),
        }
    }
}

/// Why [`init`] failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Tracing is configured but `init` ran outside a Tokio runtime.
    #[error("OpenTelemetry tracing needs a Tokio runtime: call claw_telemetry::init inside one")]
    NoRuntime,
    /// The OTLP exporter could not be built (e.g. an invalid endpoint URL).
    #[error("OpenTelemetry: cannot build the OTLP exporter: {0}")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// The TLS setup of the OTLP/HTTP client failed.
    #[error("OpenTelemetry: cannot set up TLS for the OTLP exporter: {0}")]
    Tls(String),
    /// A global subscriber was installed already.
    #[error("cannot install the logger: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Installed telemetry; shut it down (or drop it) on the way out so pending
/// spans are exported.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn traces_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes pending spans and stops the exporter (bounded by a few
    /// seconds). Blocks: call it outside async code, or through
    /// [`Telemetry::shutdown_async`]. The runtime `init` ran in must still
    /// be alive.
    pub fn shutdown(mut self) {
        self.flush_and_stop();
    }

    /// [`Telemetry::shutdown`] on a blocking thread of the current runtime.
    pub async fn shutdown_async(mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        let stopped = tokio::task::spawn_blocking(move || {
            let mut t = Telemetry {
                provider: Some(provider),
            };
            t.flush_and_stop();
        });
        if let Err(e) = stopped.await {
            tracing::warn!(error = %e, "OpenTelemetry shutdown did not finish");
        }
    }

    fn flush_and_stop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        TRACES_ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            tracing::warn!(error = %e, "OpenTelemetry: could not flush the last spans");
        }
    }
}

impl Drop for Telemetry {
    /// A guard dropped outside async code flushes like [`Telemetry::shutdown`].
    /// Inside a runtime (an early return from an async `main`) blocking could
    /// stall the very runtime that exports, so the flush is left to a thread
    /// of its own, best effort: prefer an explicit shutdown.
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_err() {
            self.flush_and_stop();
            return;
        }
        if let Some(provider) = self.provider.take() {
            let spawned = std::thread::Builder::new()
                .name("otel-shutdown".into())
                .spawn(move || {
                    let mut t = Telemetry {
                        provider: Some(provider),
                    };
                    t.flush_and_stop();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "OpenTelemetry: cannot flush the last spans");
            }
        }
    }
}

/// Installs logging, and tracing when configured (see the crate docs).
///
/// Tracing needs a Tokio runtime: call this inside one when an OTLP endpoint
/// may be set. Invalid `OTEL_*` values are logged as warnings and replaced by
/// their defaults; an exporter that cannot be built is an error.
pub fn init(options: &Options) -> Result<Telemetry, InitError> {
    let settings = TraceSettings::from_env(options.service_name);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match options.ansi {
        Some(ansi) => fmt.with_ansi(ansi),
        None => fmt,
    };
    let fmt = match options.format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let provider = if settings.enabled {
        Some(export::tracer_provider(&settings)?)
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        let mut exported = Targets::new().with_target(TARGET, LevelFilter::INFO);
        for c in EVENT_CRATES {
            exported = exported.with_target(c, LevelFilter::WARN);
        }
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(options.service_name))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_level(false)
            .with_tracked_inactivity(false)
            .with_filter(exported)
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()?;
    for w in &settings.warnings {
        tracing::warn!(warning = %w, "ignoring an invalid OpenTelemetry setting");
    }
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        TRACES_ENABLED.store(true, Ordering::Relaxed);
        tracing::info!(
            protocol = ?settings.protocol,
            sampler = ?settings.sampler,
            "exporting traces over OTLP"
        );
    }
    Ok(Telemetry { provider })
}

//! W3C Trace Context (`traceparent` / `tracestate`) in and out of HTTP
//! headers, for `tracing` spans.
//!
//! Both functions do nothing for a disabled span ([`tracing::Span::none`]),
//! which is what every span is while traces are off.

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Makes `span` continue the trace of an incoming `traceparent`, when the
/// headers carry a valid one; otherwise the span stays a root.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_none() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if let Err(e) = span.set_parent(cx) {
        tracing::debug!(error = %e, "cannot continue the incoming trace");
    }
}

/// Writes `span`'s context as `traceparent` (and `tracestate` when it has
/// one) into `headers`, replacing any there.
#[inline]
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if !span.is_none() {
        inject_context(span, headers);
    }
}

fn inject_context(span: &tracing::Span, headers: &mut HeaderMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

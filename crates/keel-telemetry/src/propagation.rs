//! W3C trace context across hops that are not HTTP requests: outbox rows, AMQP messages,
//! jobs (P35). The producer stores [`current_traceparent`]; the consumer calls
//! [`set_parent`] on its span, and both sides land in one trace.
//!
//! Without an OTLP endpoint no OpenTelemetry layer is installed, spans have no trace
//! context, and [`current_traceparent`] returns `None`: nothing is exported, nothing to join.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The current span's context as a `traceparent` header value, if it has a valid one.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote context in `traceparent` (ignored if malformed).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

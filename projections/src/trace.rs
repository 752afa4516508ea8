//! W3C trace context across the bus. A command's `traceparent` is stored with its events; the
//! relay's publish, each projector's update and the WebSocket send open a span that continues
//! that trace, so one trace runs from the HTTP request to the chat client. Without an
//! OpenTelemetry layer installed these are no-ops and the trace id is only logged.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::{OpenTelemetrySpanExt, SetParentError};

/// Makes `span` a child of the span `traceparent` names. Call before the span is first entered.
pub fn follow(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    if span.is_disabled() {
        // Filtered out: nothing to link, and parsing the header would be wasted per event.
        return;
    }
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if !parent.span().span_context().is_valid() {
        tracing::warn!(traceparent, "ignoring an invalid traceparent");
        return;
    }
    match span.set_parent(parent) {
        // No OpenTelemetry layer (export is off) or the span is filtered out: nothing to link.
        Ok(()) | Err(SetParentError::LayerNotFound | SetParentError::SpanDisabled) => {}
        Err(e) => tracing::warn!(error = %e, traceparent, "could not continue the trace"),
    }
}

/// The `traceparent` naming `span` itself, when spans are exported; `None` otherwise.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let otel = context.span();
    let ids = otel.span_context();
    ids.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            ids.trace_id(),
            ids.span_id(),
            ids.trace_flags().to_u8()
        )
    })
}

/// The trace id part of a `traceparent`, for log fields.
pub fn trace_id(traceparent: Option<&str>) -> Option<&str> {
    traceparent.and_then(|t| t.get(3..35))
}

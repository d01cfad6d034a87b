//! OTLP exporter set-up from the standard `OTEL_*` variables (P35).
//!
//! The rules a reader must not break:
//! - no endpoint, no exporter. An exporter that points at nothing makes every batch fail and
//!   log, which buries real errors;
//! - export on the Tokio runtime. The SDK's default batch processor exports from a plain OS
//!   thread, where both the tonic (gRPC) and async reqwest (HTTP) clients panic with "there
//!   is no reactor running" and every span after that is silently dropped
//!   (open-telemetry/opentelemetry-rust#3125). The async-runtime batch processor runs the
//!   export as a Tokio task instead; `init` must therefore be called inside the runtime.

use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::TelemetryError;

pub(crate) fn provider_from_env(
    service: &'static str,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let endpoint = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(e) if !e.trim().is_empty() => e,
        _ => return Ok(None),
    };
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|_| "grpc".into());
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());

    let exporter = match protocol.as_str() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
        "http/protobuf" => {
            // The HTTP exporter takes the base endpoint and appends the signal path itself
            // only when configured through the environment; we pass it explicitly.
            let traces = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(traces)
                .build()
        }
        other => {
            return Err(TelemetryError::Exporter(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL `{other}` is not `grpc` or `http/protobuf`"
            )));
        }
    }
    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;

    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(Resource::builder().with_service_name(name).build())
        .build();
    Ok(Some(provider))
}

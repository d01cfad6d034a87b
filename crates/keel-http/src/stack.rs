//! The server middleware stack, built in one place ([`build`]).
//!
//! Order matters and is the lesson of this file: layers listed first wrap everything listed
//! after them, so they see every response the inner layers produce (including the ones those
//! layers invent, like a timeout's 503 or a panic's 500).

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use opentelemetry::trace::{TraceContextExt, TraceId};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::HttpConfig;
use crate::health::{self, ReadinessProbe};
use crate::metrics;
use crate::problem::{self, Problem};

/// The request id header, accepted from callers and echoed back.
pub const REQUEST_ID: &str = "x-request-id";

/// Longest caller-supplied request id kept; longer or non-printable ones are replaced, so a
/// client cannot stuff megabytes or control characters into every log line.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Adds the health and metrics endpoints to a service's `routes` and wraps everything in the
/// Keel server stack. The result is what `axum::serve` runs.
///
/// The layers are listed outermost first: each wraps everything listed after it, so the
/// first one sees every request first and every response last. They go into one
/// `ServiceBuilder`, applied with a single `Router::layer`: axum boxes a route's service
/// again at every `Router::layer` call and clones the whole boxed chain below each boundary
/// on every request, so ten separate calls cost ~60 boxed clones and ~70 allocations per
/// request, a third of the stack's own cost (measured with callgrind, docs/benchmarks.md);
/// composed, the chain is one concrete type, cloned without allocating. Adapters convert a
/// response back to axum's `Response` where a layer's body type would not fit the next.
pub fn build(routes: Router, readiness: ReadinessProbe, config: &HttpConfig) -> Router {
    let metrics_handle = keel_telemetry::metrics_handle();
    let request_id = http::HeaderName::from_static(REQUEST_ID);
    let stack = ServiceBuilder::new()
        // 0 (outermost). Drop unusable caller request ids, so layer 1 generates a fresh one.
        .layer(middleware::from_fn(sanitize_request_id))
        // 1. Accept the caller's X-Request-Id or generate a UUID: outside everything else, so
        //    every log line and every response, errors included, carries it.
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        // 2. Echo the request id on the response, whichever layer produced that response.
        .layer(PropagateRequestIdLayer::new(request_id))
        // 3. One span per request (request id, trace id, route) and one log line per response
        //    with status and latency: the wide event of a request (P36).
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(make_span)
                .on_request(())
                .on_response(on_response)
                .on_failure(()),
        )
        // 4. RED metrics: outside the error layers so 413s, 503s and panics are counted.
        .layer(middleware::from_fn(metrics::record))
        // 5. Bare error statuses from the layers below (and axum's own 404/405 and extractor
        //    rejections) become problem+json.
        .layer(middleware::from_fn(problem_for_bare_errors))
        // 6. A panicking handler becomes a 500 problem, not a dropped connection.
        .layer(CatchPanicLayer::custom(panic_response))
        // 7. Whole-request deadline: the handler future is dropped (cancelling its queries)
        //    and the client gets 503. Inside the panic and problem layers so its 503 is
        //    rendered and counted like any other.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            config.request_timeout,
        ))
        // (adapter) The timeout's own 503 needs a body type with a default: axum's.
        .map_response(IntoResponse::into_response)
        // 7b. Body-read deadline (P15): the whole body within `limits.body_read_timeout` of
        //     the head, or 408 and the connection closed. Outside the body limit so a body cut
        //     short by either is told apart; inside the request timeout, which is the longer
        //     bound over the whole request.
        .layer(middleware::from_fn_with_state(
            config.limits.body_read_timeout,
            crate::body_deadline::enforce,
        ))
        // 8. Body limit: a Content-Length over the limit is refused before the handler runs;
        //    a chunked body fails with 413 when it crosses the limit.
        .layer(RequestBodyLimitLayer::new(config.body_limit_bytes))
        // 9 (innermost). axum's extractors have their own 2 MiB limit; align it with ours.
        .layer(DefaultBodyLimit::max(config.body_limit_bytes));
    routes
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz).with_state(readiness))
        .route("/metrics", get(metrics::render).with_state(metrics_handle))
        // Unknown paths get the same problem document as every other error.
        .fallback(not_found)
        .layer(stack)
}

async fn not_found() -> Response {
    Problem::for_status(StatusCode::NOT_FOUND).into_response()
}

async fn sanitize_request_id(mut request: Request, next: Next) -> Response {
    let bad = request.headers().get(REQUEST_ID).is_some_and(|v| {
        v.len() > MAX_REQUEST_ID_LEN || !v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    });
    if bad {
        request.headers_mut().remove(REQUEST_ID);
    }
    next.run(request).await
}

fn make_span(request: &Request<Body>) -> Span {
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str());
    // Continue the caller's trace (W3C `traceparent`) when there is one.
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(request.headers()))
    });
    let parent_trace = parent.span().span_context().clone();
    // The trace id is a field from the start: recording it afterwards makes the JSON log layer
    // parse and re-serialize the span's fields, 13,000 instructions per request (measured
    // with callgrind, docs/benchmarks.md). The caller's trace id, or a made-up one so logs of
    // this request can still be joined on it.
    let trace_id = if parent_trace.is_valid() {
        parent_trace.trace_id()
    } else {
        TraceId::from_bytes(rand::random::<[u8; 16]>())
    };
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        route,
        request_id,
        trace_id = %trace_id,
    );
    let _ = span.set_parent(parent);
    // With an exporter and no caller trace the span starts a trace of its own: log that id.
    let own = span.context().span().span_context().clone();
    if own.is_valid() && own.trace_id() != trace_id {
        span.record("trace_id", tracing::field::display(own.trace_id()));
    }
    span
}

fn on_response(response: &Response, latency: Duration, _span: &Span) {
    let status = response.status().as_u16();
    let latency_ms = latency.as_secs_f64() * 1000.0;
    if response.status().is_server_error() {
        tracing::warn!(status, latency_ms, "request finished");
    } else {
        tracing::info!(status, latency_ms, "request finished");
    }
}

/// Largest plain-text rejection body carried over as a problem's `detail`.
const MAX_DETAIL_BYTES: usize = 1024;

async fn problem_for_bare_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_problem(response.headers()) {
        return response;
    }
    let text_body = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/plain"));
    let (parts, body) = response.into_parts();
    let mut problem = Problem::for_status(status);
    // axum's extractor rejections explain client mistakes in plain text ("missing field
    // `sku`"): worth keeping. Server errors never carry their body to the client.
    if status.is_client_error()
        && text_body
        && let Ok(bytes) = axum::body::to_bytes(body, MAX_DETAIL_BYTES).await
    {
        let detail = String::from_utf8_lossy(&bytes).trim().to_owned();
        if !detail.is_empty() {
            problem = problem.with_detail(detail);
        }
    }
    let mut out = problem.into_response();
    // Keep headers that matter to clients (Allow on 405, Retry-After on 503, the request id).
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(problem::CONTENT_TYPE.as_bytes()))
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("<non-string panic>");
    // Logged here, once, with the request's span; the client sees only a generic 500.
    tracing::error!(panic = message, "handler panicked");
    let mut response = Problem::for_status(StatusCode::INTERNAL_SERVER_ERROR).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

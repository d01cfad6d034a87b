//! RED metrics per route: rate and errors (`http_requests_total{method,route,status}`) and
//! duration (`http_request_duration_seconds{method,route}`), plus `GET /metrics`.
//!
//! The `route` label is the *matched route template* (`/v1/orders/{id}`), never the raw path:
//! raw paths have unbounded cardinality and would take Prometheus down.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};
use metrics_exporter_prometheus::PrometheusHandle;

/// Request counter name.
pub const REQUESTS: &str = "http_requests_total";
/// Request latency histogram name.
pub const DURATION: &str = "http_request_duration_seconds";
/// In-flight gauge name.
pub const IN_FLIGHT: &str = "http_requests_in_flight";

/// Middleware recording one count and one latency sample per request.
pub async fn record(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let _in_flight = InFlight::enter();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(REQUESTS, "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(DURATION, "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}

/// Counts a request in flight until dropped — also when the client disconnects and the
/// request future is dropped mid-way, which a decrement after `.await` would miss.
struct InFlight;

impl InFlight {
    fn enter() -> Self {
        metrics::gauge!(IN_FLIGHT).increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(IN_FLIGHT).decrement(1.0);
    }
}

/// `GET /metrics` in the Prometheus text format.
pub async fn render(State(handle): State<PrometheusHandle>) -> Response {
    let mut response = handle.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

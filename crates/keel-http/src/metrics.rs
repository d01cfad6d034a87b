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
    let _in_flight = GaugeGuard::enter(IN_FLIGHT);
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(REQUESTS, "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(DURATION, "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}

/// Holds one unit of the gauge `name` until dropped: a request in flight, an open connection.
/// Dropping is what counts down, so a future dropped mid-way (a client that disconnects) is
/// counted out too, which a decrement after `.await` would miss.
pub(crate) struct GaugeGuard(&'static str);

impl GaugeGuard {
    pub(crate) fn enter(name: &'static str) -> Self {
        metrics::gauge!(name).increment(1.0);
        Self(name)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
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

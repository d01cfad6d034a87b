//! The server stack's promises, each checked through the real router: request ids, limits,
//! timeouts, panics, unknown routes and methods — all as problem+json — plus health and
//! metrics.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use keel_http::{HttpConfig, ReadinessProbe};
use tower::ServiceExt;

fn config() -> HttpConfig {
    HttpConfig {
        host: [127, 0, 0, 1].into(),
        port: 0,
        body_limit_bytes: 1024,
        request_timeout: Duration::from_millis(200),
        readiness_timeout: Duration::from_millis(200),
        limits: keel_http::ServerLimits::default(),
    }
}

fn app(readiness: ReadinessProbe) -> Router {
    let routes = Router::new()
        .route("/echo", post(|body: String| async move { body }))
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "too late"
            }),
        )
        .route(
            "/panic",
            get(|| async {
                let secret = std::hint::black_box("db password hunter2");
                if secret.len() > 1 {
                    panic!("internal detail: {secret}");
                }
                "unreachable"
            }),
        );
    keel_http::stack::build(routes, readiness, &config())
}

async fn send(router: Router, request: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let response = router.oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn get_req(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn assert_problem(headers: &http::HeaderMap, body: &str, status: StatusCode, slug: &str) {
    assert_eq!(
        headers[header::CONTENT_TYPE],
        "application/problem+json",
        "content type for {status}"
    );
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["status"], status.as_u16());
    assert_eq!(v["type"], format!("https://keel.dev/problems/{slug}"));
    assert!(v["title"].is_string());
}

#[tokio::test]
async fn request_id_is_generated_when_absent_and_echoed_when_given() {
    let router = app(ReadinessProbe::always_ready());
    let (status, headers, _) = send(router.clone(), get_req("/ok")).await;
    assert_eq!(status, StatusCode::OK);
    let generated = headers["x-request-id"].to_str().unwrap();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");

    let req = Request::get("/ok")
        .header("x-request-id", "abc-123")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = send(router.clone(), req).await;
    assert_eq!(headers["x-request-id"], "abc-123");

    // A caller cannot push an oversized id into every log line: it is replaced.
    let long = "x".repeat(500);
    let req = Request::get("/ok")
        .header("x-request-id", &long)
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = send(router, req).await;
    assert_ne!(headers["x-request-id"], long.as_str());
}

#[tokio::test]
async fn oversized_body_is_413_problem_before_the_handler_runs() {
    let router = app(ReadinessProbe::always_ready());
    let ok = Request::post("/echo")
        .body(Body::from("x".repeat(1024)))
        .unwrap();
    assert_eq!(send(router.clone(), ok).await.0, StatusCode::OK);

    let big = Request::post("/echo")
        .header(header::CONTENT_LENGTH, "1025")
        .body(Body::from("x".repeat(1025)))
        .unwrap();
    let (status, headers, body) = send(router.clone(), big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_problem(&headers, &body, status, "payload-too-large");
    assert!(
        headers.contains_key("x-request-id"),
        "errors carry the request id too"
    );

    // Without a Content-Length (chunked), the limit trips while the body is read.
    let stream = futures_stream(vec![vec![b'x'; 800], vec![b'x'; 800]]);
    let chunked = Request::post("/echo").body(stream).unwrap();
    let (status, headers, body) = send(router, chunked).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_problem(&headers, &body, status, "payload-too-large");
}

fn futures_stream(chunks: Vec<Vec<u8>>) -> Body {
    let frames = chunks
        .into_iter()
        .map(|c| Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from(c))));
    Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )))
}

#[tokio::test]
async fn slow_handler_is_cut_off_with_503_problem() {
    let router = app(ReadinessProbe::always_ready());
    let started = std::time::Instant::now();
    let (status, headers, body) = send(router, get_req("/slow")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_problem(&headers, &body, status, "unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cut at the 200 ms deadline"
    );
}

#[tokio::test]
async fn panic_is_500_problem_without_internal_details() {
    let router = app(ReadinessProbe::always_ready());
    let (status, headers, body) = send(router, get_req("/panic")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_problem(&headers, &body, status, "internal");
    assert!(
        !body.contains("hunter2") && !body.contains("internal detail"),
        "{body}"
    );
}

#[tokio::test]
async fn unknown_route_is_404_and_wrong_method_is_405_problem() {
    let router = app(ReadinessProbe::always_ready());
    let (status, headers, body) = send(router.clone(), get_req("/nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_problem(&headers, &body, status, "not-found");

    let req = Request::delete("/ok").body(Body::empty()).unwrap();
    let (status, headers, body) = send(router, req).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_problem(&headers, &body, status, "method-not-allowed");
    assert!(headers[header::ALLOW].to_str().unwrap().contains("GET"));
}

#[tokio::test]
async fn extractor_rejection_keeps_its_client_facing_detail() {
    let routes = Router::new().route(
        "/json",
        post(|axum::Json(v): axum::Json<serde_json::Value>| async move { v.to_string() }),
    );
    let router = keel_http::stack::build(routes, ReadinessProbe::always_ready(), &config());
    let req = Request::post("/json")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    let (status, headers, body) = send(router, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_problem(&headers, &body, status, "bad-request");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["detail"].as_str().unwrap().contains("JSON"), "{body}");
}

#[tokio::test]
async fn metrics_count_requests_per_route_template_and_status() {
    let router = app(ReadinessProbe::always_ready());
    send(router.clone(), get_req("/ok")).await;
    send(router.clone(), get_req("/nope/12345")).await;
    let (status, headers, body) = send(router, get_req("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(
        body.lines().any(|l| l.starts_with("http_requests_total")
            && l.contains("route=\"/ok\"")
            && l.contains("status=\"200\"")),
        "{body}"
    );
    // Raw unmatched paths never become label values (unbounded cardinality).
    assert!(!body.contains("/nope/12345"), "{body}");
    assert!(
        body.contains("http_request_duration_seconds_bucket"),
        "{body}"
    );
}

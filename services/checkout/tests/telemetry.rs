//! Telemetry on the real binary: JSON log lines carry the request id and the caller's W3C
//! trace id (P34); spans are exported over OTLP when an endpoint is set (P35), and nothing
//! is attempted — no error noise — when it is not.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use keel_testkit::{ServiceProcess, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_checkout");
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn base_env() -> Vec<(String, String)> {
    [
        ("KEEL_HTTP__PORT", "0"),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
        // The database is not needed to answer /livez.
        (
            "KEEL_DATABASE__URL",
            "postgres://checkout_app:x@127.0.0.1:1/keel_checkout",
        ),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

async fn traced_request(p: &ServiceProcess) {
    let r = reqwest::Client::new()
        .get(format!("{}/livez", p.base_url()))
        .header("x-request-id", "req-telemetry-1")
        .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn log_lines_carry_the_request_id_and_the_callers_trace_id() {
    let mut env = base_env();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), String::new()));
    let mut p = ServiceProcess::spawn(BIN, &[], &env).await;
    traced_request(&p).await;
    let line = eventually(Duration::from_secs(5), "the request's log line", || {
        let logs = p.logs();
        async move { logs.into_iter().find(|l| l.contains("req-telemetry-1")) }
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["span"]["request_id"], "req-telemetry-1", "{line}");
    assert_eq!(v["span"]["trace_id"], TRACE_ID, "{line}");
    assert_eq!(v["span"]["route"], "/livez", "{line}");
    p.signal("TERM");
    assert!(p.wait(Duration::from_secs(10)).await.success());
    // No endpoint: no exporter, so nothing about OpenTelemetry is logged at all.
    let noise: Vec<_> = p
        .logs()
        .into_iter()
        .filter(|l| l.to_lowercase().contains("opentelemetry") || l.contains("\"level\":\"ERROR\""))
        .collect();
    assert!(noise.is_empty(), "{noise:?}");
}

#[tokio::test]
async fn spans_are_exported_over_otlp_http_when_an_endpoint_is_set() {
    // A stand-in OTLP/HTTP collector that records what it receives.
    let received: Arc<Mutex<Vec<usize>>> = Arc::default();
    let collector = Router::new()
        .route(
            "/v1/traces",
            post(
                |State(r): State<Arc<Mutex<Vec<usize>>>>, body: Bytes| async move {
                    r.lock().unwrap().push(body.len());
                    ""
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let mut env = base_env();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint));
    env.push(("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()));
    env.push(("OTEL_SERVICE_NAME".into(), "checkout-under-test".into()));
    let mut p = ServiceProcess::spawn(BIN, &[], &env).await;
    traced_request(&p).await;
    // Graceful shutdown flushes the batch; the collector must have the spans by then.
    p.signal("TERM");
    assert!(p.wait(Duration::from_secs(15)).await.success());
    let batches = received.lock().unwrap().clone();
    assert!(
        !batches.is_empty() && batches.iter().all(|n| *n > 0),
        "{batches:?}; logs: {:?}",
        p.logs()
    );
    let panics: Vec<_> = p
        .logs()
        .into_iter()
        .filter(|l| l.contains("panicked"))
        .collect();
    assert!(panics.is_empty(), "{panics:?}");
}

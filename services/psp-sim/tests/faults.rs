//! The run-time fault knobs on `/admin/faults`: an error rate and added latency on every
//! `/v1` call, for "provider degraded" scenarios.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{authorize_body, start};
use serde_json::{Value, json};

async fn put_faults(sim: &common::Sim, knobs: Value) -> reqwest::Response {
    sim.client
        .put(sim.url("/admin/faults"))
        .json(&knobs)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn error_rate_one_makes_every_v1_call_503_and_zero_restores_service() {
    let sim = start(&[]).await;
    let auth = sim.authorized("tok_approve").await;
    let id = auth["id"].as_str().unwrap();

    let r = put_faults(&sim, json!({"error_rate": 1.0})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        sim.get_json("/admin/faults").await,
        json!({"latency_ms": 0, "error_rate": 1.0})
    );

    let body = authorize_body("tok_approve");
    for _ in 0..5 {
        let r = sim
            .post("/v1/authorizations", Some("knob-1"), Some(&body))
            .await;
        assert_eq!(r.status(), 503);
        let problem: Value = r.json().await.unwrap();
        assert_eq!(
            problem["type"],
            "https://keel.dev/problems/provider-unavailable"
        );
    }
    let r = sim
        .client
        .get(sim.url(&format!("/v1/authorizations/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "reads fail too");
    let r = sim.client.get(sim.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "health is not a /v1 call");

    let r = put_faults(&sim, json!({"error_rate": 0.0})).await;
    assert_eq!(r.status(), 200);
    // Injected failures ran nothing and stored nothing: the same key now authorizes.
    let r = sim
        .post("/v1/authorizations", Some("knob-1"), Some(&body))
        .await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("idempotent-replayed").is_none());
}

#[tokio::test]
async fn latency_knob_delays_every_v1_call() {
    let sim = start(&[]).await;
    let auth = sim.authorized("tok_approve").await;
    let path = format!("/v1/authorizations/{}", auth["id"].as_str().unwrap());

    assert_eq!(
        put_faults(&sim, json!({"latency_ms": 300})).await.status(),
        200
    );
    let started = Instant::now();
    sim.get_json(&path).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    assert_eq!(
        put_faults(&sim, json!({})).await.status(),
        200,
        "PUT replaces: all zero"
    );
    assert_eq!(
        sim.get_json("/admin/faults").await,
        json!({"latency_ms": 0, "error_rate": 0.0})
    );
}

#[tokio::test]
async fn fault_knobs_out_of_range_are_rejected_and_leave_the_knobs_unchanged() {
    let sim = start(&[("KEEL_FAULTS__MAX_LATENCY", "1s")]).await;
    let r = put_faults(&sim, json!({"error_rate": 1.5, "latency_ms": 1001})).await;
    assert_eq!(r.status(), 400);
    let problem: Value = r.json().await.unwrap();
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["error_rate", "latency_ms"]);

    let r = put_faults(&sim, json!({"error_rate": 0.5, "jitter": 3})).await;
    assert_eq!(r.status(), 422, "unknown knob");
    assert_eq!(
        sim.get_json("/admin/faults").await,
        json!({"latency_ms": 0, "error_rate": 0.0})
    );
}

//! Graceful shutdown (P20) with the simulator's long waits in flight: a `tok_timeout` request
//! held for 30s and a webhook waiting out a long backoff must not hold the process up.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Receiver, authorize_body, start};
use keel_service::Drained;
use keel_testkit::eventually;
use serde_json::Value;

#[tokio::test]
async fn shutdown_lets_go_of_held_requests_and_abandons_retrying_webhooks() {
    let receiver = Receiver::start(&[], 500).await;
    let sim = start(&[
        ("KEEL_WEBHOOK__URL", receiver.url.as_str()),
        ("KEEL_WEBHOOK__INITIAL_BACKOFF", "60s"),
        ("KEEL_WEBHOOK__MAX_BACKOFF", "60s"),
    ])
    .await;

    // A webhook in its 60s backoff after a failed first attempt.
    let auth = sim.authorized("tok_approve").await;
    let id = auth["id"].as_str().unwrap();
    let r = sim
        .post(
            &format!("/v1/authorizations/{id}/capture"),
            Some("cap-1"),
            None,
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually(Duration::from_secs(10), "first attempt failed", || async {
        (!receiver.received().is_empty()).then_some(())
    })
    .await;

    // A request held by tok_timeout (30s by default).
    let held = tokio::spawn(
        sim.client
            .post(sim.url("/v1/authorizations"))
            .header("idempotency-key", "held-1")
            .json(&authorize_body("tok_timeout"))
            .send(),
    );
    eventually(Duration::from_secs(10), "request is held", || async {
        let metrics = sim.client.get(sim.url("/metrics")).send().await.ok()?;
        let metrics = metrics.text().await.ok()?;
        metrics
            .lines()
            .any(|l| l == "psp_held_requests 1")
            .then_some(())
    })
    .await;

    let drained = tokio::time::timeout(Duration::from_secs(10), sim.stop())
        .await
        .expect("shutdown finishes well before the 30s hold or 60s backoff");
    assert_eq!(drained, Drained::Clean);

    let r = held.await.unwrap().unwrap();
    assert_eq!(r.status(), 503, "the held request is let go, retryable");
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["type"], "https://keel.dev/problems/shutting-down");
    assert_eq!(
        receiver.received().len(),
        1,
        "no further attempt after stop"
    );
}

//! Webhooks from the provider (the sending side of P32): signed the Standard Webhooks way,
//! retried until a 2xx, bounded by `webhook.max_attempts`, and redeliverable with the same id.
//! The receiver is a small server each test runs itself, playing billing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Receiver, Sim, signature_is_valid, start};
use keel_testkit::eventually;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn start_with(receiver: &Receiver, extra: &[(&str, &str)]) -> Sim {
    let mut vars = vec![
        ("KEEL_WEBHOOK__URL", receiver.url.as_str()),
        // Quick retries: the backoff policy is the same, only shorter.
        ("KEEL_WEBHOOK__INITIAL_BACKOFF", "10ms"),
        ("KEEL_WEBHOOK__MAX_BACKOFF", "50ms"),
    ];
    vars.extend_from_slice(extra);
    start(&vars).await
}

/// Authorizes and captures; returns the authorization id.
async fn capture(sim: &Sim) -> String {
    let auth = sim.authorized("tok_approve").await;
    let id = auth["id"].as_str().unwrap().to_owned();
    let key = format!("capture-{id}");
    let r = sim
        .post(
            &format!("/v1/authorizations/{id}/capture"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(r.status(), 202);
    id
}

/// Waits until the simulator reports the webhook of `auth_id` in `status`; returns its record.
async fn webhook_in(sim: &Sim, auth_id: &str, status: &str) -> Value {
    eventually(WAIT, &format!("webhook {status}"), || async {
        let hooks = sim.webhooks_of(auth_id).await;
        let hook = hooks.first()?.clone();
        (hook["status"] == status).then_some(hook)
    })
    .await
}

#[tokio::test]
async fn capture_sends_a_signed_payment_captured_webhook() {
    let receiver = Receiver::start(&[], 200).await;
    let sim = start_with(&receiver, &[]).await;
    let auth_id = capture(&sim).await;

    let got = eventually(WAIT, "webhook received", || async {
        receiver.received().first().cloned()
    })
    .await;
    assert!(got.header("webhook-id").starts_with("msg_"));
    assert_eq!(got.header("content-type"), "application/json");
    let timestamp: i64 = got.header("webhook-timestamp").parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 60);
    assert!(
        signature_is_valid(&got),
        "signature verifies with the dev secret"
    );
    let body: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(
        body,
        json!({"type": "payment.captured", "data": {
            "authorization_id": auth_id, "reference": "pay_test_1",
            "amount_minor": 4200, "currency": "EUR"}})
    );

    let hook = webhook_in(&sim, &auth_id, "delivered").await;
    assert_eq!(hook["id"], got.header("webhook-id"));
    // Sending the webhook is the simulated settlement: the capture is now done.
    let auth = sim.get_json(&format!("/v1/authorizations/{auth_id}")).await;
    assert_eq!(auth["status"], "captured");
}

#[tokio::test]
async fn a_webhook_answered_500_twice_is_retried_until_a_2xx() {
    let receiver = Receiver::start(&[500, 500], 200).await;
    let sim = start_with(&receiver, &[]).await;
    let auth_id = capture(&sim).await;

    let hook = webhook_in(&sim, &auth_id, "delivered").await;
    let codes: Vec<u64> = hook["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [500, 500, 200]);

    let got = receiver.received();
    assert_eq!(got.len(), 3);
    for r in &got {
        assert_eq!(r.header("webhook-id"), got[0].header("webhook-id"));
        assert_eq!(r.body, got[0].body, "the same bytes on every attempt");
        assert!(signature_is_valid(r));
    }
}

#[tokio::test]
async fn a_webhook_never_answered_2xx_is_given_up_after_max_attempts() {
    let receiver = Receiver::start(&[], 500).await;
    let sim = start_with(&receiver, &[("KEEL_WEBHOOK__MAX_ATTEMPTS", "3")]).await;
    let auth_id = capture(&sim).await;

    let hook = webhook_in(&sim, &auth_id, "failed").await;
    assert_eq!(hook["attempts"].as_array().unwrap().len(), 3);
    assert_eq!(receiver.received().len(), 3, "no attempt after the budget");
}

#[tokio::test]
async fn an_unreachable_receiver_is_retried_and_recorded_as_connect_errors() {
    // A port nobody listens on: bind one, note it, close it.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let sim = start(&[
        ("KEEL_WEBHOOK__URL", closed.as_str()),
        ("KEEL_WEBHOOK__INITIAL_BACKOFF", "10ms"),
        ("KEEL_WEBHOOK__MAX_BACKOFF", "20ms"),
        ("KEEL_WEBHOOK__MAX_ATTEMPTS", "2"),
    ])
    .await;
    let auth_id = capture(&sim).await;
    let hook = webhook_in(&sim, &auth_id, "failed").await;
    let errors: Vec<&str> = hook["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["error"].as_str().unwrap())
        .collect();
    assert_eq!(errors, ["connect", "connect"]);
}

#[tokio::test]
async fn redeliver_resends_the_same_webhook_id_and_body_with_a_valid_signature() {
    let receiver = Receiver::start(&[], 200).await;
    let sim = start_with(&receiver, &[]).await;
    let auth_id = capture(&sim).await;
    let hook = webhook_in(&sim, &auth_id, "delivered").await;
    let webhook_id = hook["id"].as_str().unwrap();

    let r = sim
        .post(
            &format!("/admin/webhooks/{webhook_id}/redeliver"),
            None,
            None,
        )
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["deliveries"], 2);

    let got = eventually(WAIT, "redelivery received", || async {
        let got = receiver.received();
        (got.len() == 2).then_some(got)
    })
    .await;
    assert_eq!(got[1].header("webhook-id"), webhook_id);
    assert_eq!(got[1].body, got[0].body);
    assert!(
        signature_is_valid(&got[1]),
        "signed afresh for its own timestamp"
    );

    let hook = webhook_in(&sim, &auth_id, "delivered").await;
    let deliveries: Vec<u64> = hook["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["delivery"].as_u64().unwrap())
        .collect();
    assert_eq!(deliveries, [1, 2]);
}

#[tokio::test]
async fn redelivering_an_unknown_webhook_is_404() {
    let sim = start(&[]).await;
    let r = sim
        .post("/admin/webhooks/msg_unknown/redeliver", None, None)
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn a_full_webhook_queue_refuses_captures_with_503_and_leaves_them_authorized() {
    // One delivery slot, one queue place, and a receiver that never answers 2xx: the first
    // capture occupies the slot, the second the queue, the third finds no room.
    let receiver = Receiver::start(&[], 500).await;
    let sim = start_with(
        &receiver,
        &[
            ("KEEL_WEBHOOK__QUEUE_CAPACITY", "1"),
            ("KEEL_WEBHOOK__MAX_CONCURRENT", "1"),
            ("KEEL_WEBHOOK__INITIAL_BACKOFF", "10s"),
            ("KEEL_WEBHOOK__MAX_BACKOFF", "10s"),
        ],
    )
    .await;
    let first = capture(&sim).await;
    // Wait until the sender has taken the first one off the queue.
    eventually(WAIT, "first delivery attempted", || async {
        (!receiver.received().is_empty()).then_some(())
    })
    .await;
    capture(&sim).await;

    let auth = sim.authorized("tok_approve").await;
    let id = auth["id"].as_str().unwrap();
    let r = sim
        .post(
            &format!("/v1/authorizations/{id}/capture"),
            Some("cap-full"),
            None,
        )
        .await;
    assert_eq!(r.status(), 503);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["type"], "https://keel.dev/problems/provider-busy");
    let auth = sim.get_json(&format!("/v1/authorizations/{id}")).await;
    assert_eq!(
        auth["status"], "authorized",
        "no capture without its webhook"
    );
    assert_eq!(sim.webhooks_of(&first).await.len(), 1);
}

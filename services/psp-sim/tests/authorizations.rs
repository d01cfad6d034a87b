//! The card API: idempotency keys (P13, provider side), the outcome of every token, and the
//! authorization state machine. Each test runs its own simulator in-process on port 0.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{authorize_body, start};
use keel_testkit::eventually;
use serde_json::{Value, json};

const AUTHORIZE: &str = "/v1/authorizations";

#[tokio::test]
async fn replaying_a_key_with_the_same_body_returns_the_stored_answer_without_a_second_authorization()
 {
    let sim = start(&[]).await;
    let body = authorize_body("tok_approve");

    let first = sim.post(AUTHORIZE, Some("key-1"), Some(&body)).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let first: Value = first.json().await.unwrap();
    assert!(
        first["id"].as_str().unwrap().starts_with("auth_"),
        "{first}"
    );
    assert_eq!(first["status"], "authorized");
    assert_eq!(
        location,
        format!("/v1/authorizations/{}", first["id"].as_str().unwrap())
    );

    let again = sim.post(AUTHORIZE, Some("key-1"), Some(&body)).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["location"].to_str().unwrap(), location);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, first, "the same authorization, not a second one");
}

#[tokio::test]
async fn reusing_a_key_with_a_different_body_or_endpoint_is_rejected_with_422() {
    let sim = start(&[]).await;
    let r = sim
        .post(
            AUTHORIZE,
            Some("key-2"),
            Some(&authorize_body("tok_approve")),
        )
        .await;
    assert_eq!(r.status(), 201);
    let auth: Value = r.json().await.unwrap();

    let mut other = authorize_body("tok_approve");
    other["amount_minor"] = json!(9999);
    let r = sim.post(AUTHORIZE, Some("key-2"), Some(&other)).await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let problem: Value = r.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "https://keel.dev/problems/idempotency-key-reused"
    );

    let capture = format!("{AUTHORIZE}/{}/capture", auth["id"].as_str().unwrap());
    let r = sim.post(&capture, Some("key-2"), None).await;
    assert_eq!(r.status(), 422, "a key belongs to one operation");
}

#[tokio::test]
async fn a_mutating_call_without_an_idempotency_key_is_rejected_with_400() {
    let sim = start(&[]).await;
    let r = sim
        .post(AUTHORIZE, None, Some(&authorize_body("tok_approve")))
        .await;
    assert_eq!(r.status(), 400);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "https://keel.dev/problems/idempotency-key-required"
    );

    let auth = sim.authorized("tok_approve").await;
    let void = format!("{AUTHORIZE}/{}/void", auth["id"].as_str().unwrap());
    assert_eq!(sim.post(&void, None, None).await.status(), 400);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_authorize_exactly_once() {
    // tok_slow keeps the first request running while the others arrive.
    let sim = start(&[("KEEL_FAULTS__SLOW_DELAY", "1s")]).await;
    let body = authorize_body("tok_slow");
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let request = sim
            .client
            .post(sim.url(AUTHORIZE))
            .header("idempotency-key", "key-3")
            .json(&body);
        calls.spawn(async move { request.send().await.unwrap().status().as_u16() });
    }
    let statuses = calls.join_all().await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        4,
        "{statuses:?}"
    );

    let r = sim.post(AUTHORIZE, Some("key-3"), Some(&body)).await;
    assert_eq!(r.status(), 201, "the one answer is stored");
    assert_eq!(r.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn approve_tokens_authorize() {
    let sim = start(&[]).await;
    for token in ["tok_approve", "tok_ok", "tok_ok_visa_4242"] {
        let auth = sim.authorized(token).await;
        assert_eq!(auth["status"], "authorized");
        assert_eq!(auth["amount_minor"], 4200);
        assert_eq!(auth["currency"], "EUR");
        assert_eq!(auth["reference"], "pay_test_1");
        let id = auth["id"].as_str().unwrap();
        assert_eq!(sim.get_json(&format!("{AUTHORIZE}/{id}")).await, auth);
    }
}

#[tokio::test]
async fn decline_tokens_answer_402_with_their_decline_code_and_replay_it() {
    let sim = start(&[]).await;
    for (token, code) in [
        ("tok_decline", "card_declined"),
        ("tok_insufficient_funds", "insufficient_funds"),
    ] {
        let key = format!("key-{token}");
        let body = authorize_body(token);
        let r = sim.post(AUTHORIZE, Some(&key), Some(&body)).await;
        assert_eq!(r.status(), 402);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["type"], "https://keel.dev/problems/card-declined");
        assert_eq!(problem["decline_code"], code);

        // A decline is a final answer: the retry gets it again, it is not re-run.
        let again = sim.post(AUTHORIZE, Some(&key), Some(&body)).await;
        assert_eq!(again.status(), 402);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(again.headers()["content-type"], "application/problem+json");
        assert_eq!(again.json::<Value>().await.unwrap(), problem);
    }
}

#[tokio::test]
async fn slow_token_approves_after_the_slow_delay() {
    let sim = start(&[("KEEL_FAULTS__SLOW_DELAY", "300ms")]).await;
    let started = Instant::now();
    let auth = sim.authorized("tok_slow").await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(auth["status"], "authorized");
}

#[tokio::test]
async fn flaky_token_fails_the_first_two_attempts_of_a_key_with_503_then_approves() {
    let sim = start(&[]).await;
    let body = authorize_body("tok_flaky");
    for attempt in 1..=2 {
        let r = sim.post(AUTHORIZE, Some("flaky-1"), Some(&body)).await;
        assert_eq!(r.status(), 503, "attempt {attempt}");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(
            problem["type"],
            "https://keel.dev/problems/provider-unavailable"
        );
    }
    let r = sim.post(AUTHORIZE, Some("flaky-1"), Some(&body)).await;
    assert_eq!(r.status(), 201, "third attempt of the key approves");
    let auth: Value = r.json().await.unwrap();

    let r = sim.post(AUTHORIZE, Some("flaky-1"), Some(&body)).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.json::<Value>().await.unwrap(), auth);

    // The count is per key: a new key starts failing again.
    let r = sim.post(AUTHORIZE, Some("flaky-2"), Some(&body)).await;
    assert_eq!(r.status(), 503);
}

#[tokio::test]
async fn timeout_token_answers_504_only_after_the_timeout_hold_and_is_not_stored() {
    let sim = start(&[("KEEL_FAULTS__TIMEOUT_HOLD", "300ms")]).await;
    let body = authorize_body("tok_timeout");
    for _ in 0..2 {
        let started = Instant::now();
        let r = sim.post(AUTHORIZE, Some("timeout-1"), Some(&body)).await;
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(r.status(), 504);
        assert!(
            r.headers().get("idempotent-replayed").is_none(),
            "5xx are not replayed"
        );
        let problem: Value = r.json().await.unwrap();
        assert_eq!(
            problem["type"],
            "https://keel.dev/problems/provider-timeout"
        );
    }
}

#[tokio::test]
async fn timeout_token_holds_until_the_client_gives_up_and_then_frees_the_key() {
    // Default hold (30s): far beyond the client's patience.
    let sim = start(&[]).await;
    let body = authorize_body("tok_timeout");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let send = || {
        client
            .post(sim.url(AUTHORIZE))
            .header("idempotency-key", "timeout-2")
            .json(&body)
            .send()
    };
    let first = send().await;
    assert!(
        first.unwrap_err().is_timeout(),
        "no answer within the client's timeout"
    );

    // The client hung up, so the server dropped the held request and released the key: a
    // retry is held again (client timeout) rather than refused as "in progress" (409).
    eventually(Duration::from_secs(5), "the key is released", || async {
        match send().await {
            Err(e) if e.is_timeout() => Some(()),
            Ok(r) if r.status() == 409 => None,
            other => panic!("unexpected: {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn unknown_tokens_and_bad_fields_are_rejected_with_400_per_field() {
    let sim = start(&[]).await;
    let body = json!({"amount_minor": 0, "currency": "eur", "token": "tok_magic", "reference": ""});
    let r = sim.post(AUTHORIZE, Some("bad-1"), Some(&body)).await;
    assert_eq!(r.status(), 400);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["type"], "https://keel.dev/problems/invalid-request");
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["amount_minor", "currency", "reference", "token"]);

    // Refused before the key was claimed: the same key still works for a good request.
    let r = sim
        .post(
            AUTHORIZE,
            Some("bad-1"),
            Some(&authorize_body("tok_approve")),
        )
        .await;
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn capture_and_void_are_allowed_only_from_authorized() {
    let sim = start(&[]).await;
    let auth = sim.authorized("tok_approve").await;
    let id = auth["id"].as_str().unwrap();

    let r = sim
        .post(&format!("{AUTHORIZE}/{id}/capture"), Some("cap-1"), None)
        .await;
    assert_eq!(r.status(), 202);
    let captured: Value = r.json().await.unwrap();
    assert_eq!(captured["status"], "capture_pending");
    assert_eq!(captured["id"], auth["id"]);

    let r = sim
        .post(&format!("{AUTHORIZE}/{id}/void"), Some("void-1"), None)
        .await;
    assert_eq!(r.status(), 409, "a captured authorization cannot be voided");
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["type"], "https://keel.dev/problems/invalid-state");
    assert!(
        ["capture_pending", "captured"].contains(&problem["status"].as_str().unwrap()),
        "{problem}"
    );

    let other = sim.authorized("tok_approve").await;
    let other_id = other["id"].as_str().unwrap();
    let r = sim
        .post(
            &format!("{AUTHORIZE}/{other_id}/void"),
            Some("void-2"),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "voided");
    let r = sim
        .post(
            &format!("{AUTHORIZE}/{other_id}/capture"),
            Some("cap-2"),
            None,
        )
        .await;
    assert_eq!(r.status(), 409, "a voided authorization cannot be captured");
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "voided");
    assert_eq!(
        sim.get_json(&format!("{AUTHORIZE}/{other_id}")).await["status"],
        "voided"
    );
}

#[tokio::test]
async fn unknown_authorizations_are_404() {
    let sim = start(&[]).await;
    let r = sim
        .client
        .get(sim.url("/v1/authorizations/auth_unknown"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = sim
        .post(
            "/v1/authorizations/auth_unknown/capture",
            Some("cap-x"),
            None,
        )
        .await;
    assert_eq!(r.status(), 404);
}

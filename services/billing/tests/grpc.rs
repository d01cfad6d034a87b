//! P13 and the error contract of `keel.billing.v1.PaymentService`: idempotency keys (one
//! provider call and one event per key, also under concurrency; a reused key with another
//! request refused) and the mapping of every failure to its gRPC code, within the caller's
//! deadline.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use keel_contracts::billing_v1 as pb;
use support::{Billing, authorize_request, key};
use tonic::Code;

const AUTHORIZED: i32 = pb::PaymentStatus::Authorized as i32;

#[tokio::test]
async fn authorize_twice_with_one_key_makes_one_provider_call_and_one_event() {
    let b = Billing::start().await;
    let request = authorize_request(&key("authorize"), "tok_approve");
    let first = b.authorize_request(request.clone()).await.unwrap();
    let second = b.authorize_request(request).await.unwrap();

    assert_eq!(first.status, AUTHORIZED);
    assert_eq!(first, second, "the retry gets the first answer");
    assert_eq!(b.psp.calls("authorize").len(), 1);
    assert_eq!(
        b.events(&first.payment_id).await,
        ["AuthorizationRequested", "PaymentAuthorized"]
    );
    assert_eq!(
        b.outbox(&first.payment_id).await,
        ["billing.payment.authorized"]
    );
}

#[tokio::test]
async fn concurrent_authorize_with_one_key_makes_one_provider_call_and_one_event() {
    let b = Billing::start().await;
    let request = authorize_request(&key("authorize"), "tok_approve");
    let calls = (0..16).map(|_| {
        let mut grpc = b.grpc.clone();
        let request = request.clone();
        async move { grpc.authorize(request).await.map(|r| r.into_inner()) }
    });
    let answers = futures_join_all(calls).await;

    let first = answers[0].as_ref().unwrap().clone();
    for a in &answers {
        assert_eq!(
            a.as_ref().unwrap(),
            &first,
            "every caller gets the one answer"
        );
    }
    assert_eq!(b.psp.calls("authorize").len(), 1);
    assert_eq!(
        b.events(&first.payment_id).await,
        ["AuthorizationRequested", "PaymentAuthorized"]
    );
    assert_eq!(b.outbox(&first.payment_id).await.len(), 1);
}

/// `join_all` without a futures dependency: spawn each call, then await them in order.
async fn futures_join_all<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn one_key_with_a_different_request_is_failed_precondition() {
    let b = Billing::start().await;
    let k = key("authorize");
    let first = b.authorize(&k, "tok_approve").await.unwrap();
    // Same key, another order: a client bug, refused without an effect.
    let err = b.authorize(&k, "tok_approve").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(b.psp.calls("authorize").len(), 1);
    assert_eq!(b.events(&first.payment_id).await.len(), 2);

    let captured = b.capture(&key("capture"), &first.payment_id).await.unwrap();
    let other = b
        .authorize(&key("authorize2"), "tok_approve")
        .await
        .unwrap();
    // A capture key reused for another payment.
    let err = b.capture(&k, &first.payment_id).await;
    assert!(err.is_ok(), "a different method is a different key scope");
    let reused = key("capture");
    b.capture(&reused, &first.payment_id).await.unwrap();
    let err = b.capture(&reused, &other.payment_id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(captured.status, pb::PaymentStatus::CapturePending as i32);
}

#[tokio::test]
async fn missing_key_or_bad_input_is_invalid_argument() {
    let b = Billing::start().await;
    let err = b.authorize("", "tok_approve").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("idempotency_key"), "{err:?}");
    let id = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        b.capture("", &id).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        b.void("", &id).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let mut r = authorize_request(&key("a"), "tok_approve");
    r.amount.as_mut().unwrap().amount_minor = 0;
    assert_eq!(
        b.authorize_request(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut r = authorize_request(&key("a"), "tok_approve");
    r.amount.as_mut().unwrap().currency = "euro".into();
    assert_eq!(
        b.authorize_request(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut r = authorize_request(&key("a"), "tok_approve");
    r.order_id = "not-a-uuid".into();
    assert_eq!(
        b.authorize_request(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        b.get("nope").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert!(b.psp.calls("authorize").is_empty());
}

#[tokio::test]
async fn provider_503_is_unavailable_and_a_retry_with_the_same_key_resumes_once() {
    let b = Billing::start().await;
    let request = authorize_request(&key("authorize"), "tok_approve");
    b.psp.set_down(true);
    let err = b.authorize_request(request.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let attempts = b.psp.calls("authorize");
    assert_eq!(attempts.len(), 3, "bounded by psp.max_attempts");

    // The payment waits, pending, for the retry.
    let payment_id = billing::ledger::payment_id_for_authorize_key(&request.idempotency_key);
    let pending = b.get(&payment_id.to_string()).await.unwrap();
    assert_eq!(pending.status, pb::PaymentStatus::Unspecified as i32);

    b.psp.set_down(false);
    let p = b.authorize_request(request).await.unwrap();
    assert_eq!(p.status, AUTHORIZED);
    assert_eq!(
        p.payment_id,
        payment_id.to_string(),
        "the same payment resumed"
    );
    let calls = b.psp.calls("authorize");
    assert_eq!(calls.len(), 4);
    assert!(
        calls
            .iter()
            .all(|c| c.idempotency_key == calls[0].idempotency_key),
        "every attempt carries the same provider key, so the provider dedupes: {calls:?}"
    );
    assert_eq!(
        b.events(&p.payment_id).await,
        ["AuthorizationRequested", "PaymentAuthorized"]
    );
}

#[tokio::test]
async fn slow_provider_past_the_callers_deadline_is_deadline_exceeded_in_time() {
    let b = Billing::start().await;
    let mut request = tonic::Request::new(authorize_request(&key("authorize"), "tok_slow"));
    request.set_timeout(Duration::from_millis(600));
    let started = Instant::now();
    let err = b.grpc.clone().authorize(request).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // Billing answered itself (before the caller's deadline), not the transport's timeout.
    assert!(took < Duration::from_millis(600), "answered after {took:?}");
    assert!(err.message().contains("payment provider"), "{err:?}");
    assert_eq!(
        b.psp.calls("authorize").len(),
        1,
        "a timeout is not retried"
    );
}

#[tokio::test]
async fn unknown_payment_is_not_found() {
    let b = Billing::start().await;
    let id = uuid::Uuid::new_v4().to_string();
    assert_eq!(b.get(&id).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        b.capture(&key("c"), &id).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        b.void(&key("v"), &id).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn capture_after_void_is_failed_precondition() {
    let b = Billing::start().await;
    let p = b.authorize(&key("authorize"), "tok_approve").await.unwrap();
    let voided = b.void(&key("void"), &p.payment_id).await.unwrap();
    assert_eq!(voided.status, pb::PaymentStatus::Voided as i32);
    let err = b.capture(&key("capture"), &p.payment_id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        b.psp.calls("capture").is_empty(),
        "refused before the provider"
    );
    assert_eq!(
        b.events(&p.payment_id).await,
        [
            "AuthorizationRequested",
            "PaymentAuthorized",
            "PaymentVoided"
        ]
    );
    assert_eq!(
        b.outbox(&p.payment_id).await,
        ["billing.payment.authorized", "billing.payment.voided"]
    );
}

#[tokio::test]
async fn a_decline_is_a_payment_and_voiding_it_is_a_no_op() {
    let b = Billing::start().await;
    let p = b
        .authorize(&key("authorize"), "tok_insufficient_funds")
        .await
        .unwrap();
    assert_eq!(p.status, pb::PaymentStatus::Declined as i32);
    assert_eq!(p.decline_reason, "insufficient_funds");
    // Compensation is idempotent: nothing to release, success, no event, no provider call.
    let after = b.void(&key("void"), &p.payment_id).await.unwrap();
    assert_eq!(after, p);
    assert!(b.psp.calls("void").is_empty());
    assert_eq!(
        b.events(&p.payment_id).await,
        ["AuthorizationRequested", "PaymentDeclined"]
    );
    assert_eq!(b.outbox(&p.payment_id).await, ["billing.payment.declined"]);
}

#[tokio::test]
async fn void_of_an_authorization_that_never_completed_abandons_it_for_good() {
    let b = Billing::start().await;
    let request = authorize_request(&key("authorize"), "tok_approve");
    b.psp.set_down(true);
    b.authorize_request(request.clone()).await.unwrap_err();
    let payment_id =
        billing::ledger::payment_id_for_authorize_key(&request.idempotency_key).to_string();
    let voided = b.void(&key("void"), &payment_id).await.unwrap();
    assert_eq!(voided.status, pb::PaymentStatus::Voided as i32);

    // A late retry of the original Authorize cannot bring the payment back.
    b.psp.set_down(false);
    let late = b.authorize_request(request).await.unwrap();
    assert_eq!(late.status, pb::PaymentStatus::Voided as i32);
    assert_eq!(b.psp.calls("authorize").len(), 3, "no call after the void");
}

#[tokio::test]
async fn void_by_order_releases_what_the_order_holds_and_voiding_nothing_succeeds() {
    let b = Billing::start().await;
    let p = b.authorize(&key("authorize"), "tok_approve").await.unwrap();
    let k = key("void");
    let voided = b.void_order(&k, &p.order_id).await.unwrap();
    assert_eq!(voided.status, pb::PaymentStatus::Voided as i32);
    assert_eq!(voided.payment_id, p.payment_id, "the order's only payment");
    assert_eq!(b.psp.calls("void").len(), 1);
    // Retried: the same answer, no second call.
    assert_eq!(b.void_order(&k, &p.order_id).await.unwrap(), voided);
    assert_eq!(b.psp.calls("void").len(), 1);

    // An order billing never saw: nothing to void, still a success.
    let unknown = uuid::Uuid::new_v4().to_string();
    let none = b.void_order(&key("void"), &unknown).await.unwrap();
    assert_eq!(none.status, pb::PaymentStatus::Voided as i32);
    assert_eq!(none.order_id, unknown);
    assert!(none.payment_id.is_empty());
    let err = b.void_order(&key("void"), "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn expired_idempotency_keys_are_purged_by_the_retention_run_and_live_ones_kept() {
    let b = Billing::start_with(&[
        ("KEEL_DATABASE__RETENTION__INTERVAL", "200ms"),
        ("KEEL_DATABASE__RETENTION__POLL_INTERVAL", "50ms"),
    ])
    .await;
    let live = b.authorize(&key("authorize"), "tok_approve").await.unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, request_hash, status_code, response, expires_at)
         VALUES ('billing.Authorize', 'old', '\\x00', 0, '{}', now() - interval '1 second')",
    )
    .execute(&b.pool)
    .await
    .unwrap();
    keel_testkit::eventually(Duration::from_secs(10), "expired key purged", || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE key = 'old'")
                .fetch_one(&b.pool)
                .await
                .ok()?;
        (left == 0).then_some(())
    })
    .await;
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&b.pool)
        .await
        .unwrap();
    assert_eq!(kept, 1, "the live key of {} stays", live.payment_id);
}

//! `POST /v1/orders` and `GET /v1/orders/{id}` over HTTP: idempotency keys (P13), validation
//! with per-field problems, and the all-or-nothing placing transaction. Every request carries
//! the `TestApp`'s API key; authentication and unknown fields are proven in `auth.rs`. The saga worker is off
//! in most of these tests (`saga.run_worker = false`), so orders stay as placed.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestApp, order};
use keel_testkit::eventually;
use serde_json::{Value, json};

const NO_WORKER: &[(&str, &str)] = &[("KEEL_SAGA__RUN_WORKER", "false")];

async fn app() -> TestApp {
    // Billing is never called with the worker off; a closed port makes that explicit.
    TestApp::start("http://127.0.0.1:1", NO_WORKER).await
}

/// Rows written by order placement, in every table it writes.
async fn written(app: &TestApp) -> Vec<(&'static str, i64)> {
    let mut counts = Vec::new();
    for table in [
        "orders",
        "order_lines",
        "order_history",
        "sagas",
        "outbox",
        "idempotency_keys",
    ] {
        counts.push((
            table,
            app.scalar(&format!("SELECT count(*) FROM {table}")).await,
        ));
    }
    counts.push((
        "saga jobs",
        app.scalar("SELECT count(*) FROM jobs WHERE queue = 'saga'")
            .await,
    ));
    counts
}

fn nothing() -> Vec<(&'static str, i64)> {
    [
        "orders",
        "order_lines",
        "order_history",
        "sagas",
        "outbox",
        "idempotency_keys",
        "saga jobs",
    ]
    .into_iter()
    .map(|t| (t, 0))
    .collect()
}

async fn problem(r: reqwest::Response, status: u16) -> Value {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    r.json().await.unwrap()
}

#[tokio::test]
async fn a_valid_order_is_accepted_with_location_and_written_in_one_transaction() {
    let app = app().await;
    let r = app
        .post_order(
            Some("key-1"),
            &order("tok_approve", &[("KEEL-MUG", 2), ("KEEL-BOOK", 1)]),
        )
        .await;
    assert_eq!(r.status(), 202);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    let id = body["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/orders/{id}"));
    assert_eq!(body["state"], "PENDING");
    assert_eq!(
        body["total"],
        json!({"minor": 2 * 1200 + 3900, "currency": "EUR"})
    );
    assert_eq!(body["lines"][0]["line_total"]["minor"], 2400);
    assert_eq!(body["history"][0]["state"], "PENDING");
    assert!(
        body.get("payment_token").is_none(),
        "the token is not echoed"
    );

    // Everything the order needs, written together.
    let counts = written(&app).await;
    assert_eq!(
        counts,
        [
            ("orders", 1),
            ("order_lines", 2),
            ("order_history", 1),
            ("sagas", 1),
            ("outbox", 1),
            ("idempotency_keys", 1),
            ("saga jobs", 1)
        ]
    );
    let (event_type, aggregate): (String, String) =
        sqlx::query_as("SELECT event_type, aggregate_id FROM outbox")
            .fetch_one(&app.admin)
            .await
            .unwrap();
    assert_eq!(
        (event_type.as_str(), aggregate.as_str()),
        ("checkout.order.placed", id)
    );
    // The saga's job is the saga's id: one job per saga.
    let same: bool = sqlx::query_scalar(
        "SELECT (SELECT id FROM sagas) = (SELECT id FROM jobs WHERE queue = 'saga')",
    )
    .fetch_one(&app.admin)
    .await
    .unwrap();
    assert!(same);

    // GET shows the same order.
    let got = app.get_order(id).await;
    assert_eq!(got["id"], body["id"]);
    assert_eq!(got["lines"], body["lines"]);
    app.stop().await;
}

#[tokio::test]
async fn posting_without_an_idempotency_key_is_a_400_problem_and_writes_nothing() {
    let app = app().await;
    let body = problem(
        app.post_order(None, &order("tok_approve", &[("KEEL-MUG", 1)]))
            .await,
        400,
    )
    .await;
    assert_eq!(
        body["type"],
        "https://keel.dev/problems/idempotency-key-required"
    );
    // An unusable key (too long) is refused the same way.
    let long = "k".repeat(256);
    problem(
        app.post_order(Some(&long), &order("tok_approve", &[("KEEL-MUG", 1)]))
            .await,
        400,
    )
    .await;
    assert_eq!(written(&app).await, nothing());
    app.stop().await;
}

#[tokio::test]
async fn replaying_a_key_with_the_same_body_returns_the_stored_answer_marked_as_replayed() {
    let app = app().await;
    let body = order("tok_approve", &[("KEEL-MUG", 1)]);
    let first = app.post_order(Some("same-key"), &body).await;
    assert_eq!(first.status(), 202);
    let first_location = first.headers()["location"].clone();
    let first: Value = first.json().await.unwrap();

    // The same request again, formatted differently: same meaning, same key.
    let reformatted = serde_json::to_string_pretty(&body).unwrap();
    let again = app
        .client
        .post(format!("{}/v1/orders", app.base))
        .bearer_auth(&app.api_key)
        .header("content-type", "application/json; charset=utf-8")
        .header("idempotency-key", "same-key")
        .body(reformatted)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["location"], first_location);
    let again: Value = again.json().await.unwrap();
    assert_eq!(
        again, first,
        "the stored body, byte for byte the same document"
    );
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn reusing_a_key_with_a_different_body_is_422_and_creates_nothing() {
    let app = app().await;
    let first = order("tok_approve", &[("KEEL-MUG", 1)]);
    let r = app.post_order(Some("k"), &first).await;
    assert_eq!(r.status(), 202);
    // Every known field changed in turn, the body otherwise the same.
    let changed = |path: &str, value: Value| {
        let mut b = first.clone();
        *b.pointer_mut(path).unwrap() = value;
        b
    };
    for body in [
        changed("/lines/0/quantity", json!(2)),
        changed("/lines/0/sku", json!("KEEL-BOOK")),
        changed("/payment_token", json!("tok_decline")),
        changed("/currency", json!("USD")),
    ] {
        let p = problem(app.post_order(Some("k"), &body).await, 422).await;
        assert_eq!(
            p["type"], "https://keel.dev/problems/idempotency-key-reused",
            "{body}"
        );
    }
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 1);
    assert_eq!(app.scalar("SELECT count(*) FROM outbox").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_requests_with_one_key_create_exactly_one_order() {
    let app = Arc::new(app().await);
    let body = order("tok_approve", &[("KEEL-HOODIE", 1)]);
    let start = Arc::new(tokio::sync::Barrier::new(20));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (app, body, start) = (app.clone(), body.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let r = app.post_order(Some("hammer"), &body).await;
            let status = r.status().as_u16();
            let replayed = r.headers().contains_key("idempotent-replayed");
            let body: Value = r.json().await.unwrap();
            (status, replayed, body)
        }));
    }
    let mut fresh = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (status, replayed, body) = t.await.unwrap();
        match status {
            202 => {
                if !replayed {
                    fresh += 1;
                }
                ids.insert(body["id"].as_str().unwrap().to_owned());
            }
            409 => assert_eq!(
                body["type"],
                "https://keel.dev/problems/idempotency-in-progress"
            ),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(fresh, 1, "exactly one request did the work");
    assert_eq!(ids.len(), 1, "every 202 names the same order");
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 1);
    assert_eq!(app.scalar("SELECT count(*) FROM sagas").await, 1);
    assert_eq!(app.scalar("SELECT count(*) FROM outbox").await, 1);
    Arc::try_unwrap(app).ok().unwrap().stop().await;
}

#[tokio::test]
async fn each_kind_of_invalid_order_gets_per_field_errors_and_writes_nothing() {
    let app = app().await;
    let valid = order("tok_approve", &[("KEEL-MUG", 1)]);
    let with = |path: &str, value: Value| {
        let mut b = valid.clone();
        b[path] = value;
        b
    };
    let many_lines: Vec<Value> = (0..51)
        .map(|i| json!({"sku": format!("SKU-{i}"), "quantity": 1}))
        .collect();
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "unknown SKU",
            with("lines", json!([{"sku": "NO-SUCH-THING", "quantity": 1}])),
            "lines[0].sku",
            "unknown SKU",
        ),
        (
            "quantity zero",
            with("lines", json!([{"sku": "KEEL-MUG", "quantity": 0}])),
            "lines[0].quantity",
            "must be between 1 and 100",
        ),
        (
            "quantity above the configured maximum",
            with("lines", json!([{"sku": "KEEL-MUG", "quantity": 101}])),
            "lines[0].quantity",
            "must be between 1 and 100",
        ),
        (
            "no lines",
            with("lines", json!([])),
            "lines",
            "must have at least one line",
        ),
        (
            "too many lines",
            with("lines", Value::Array(many_lines)),
            "lines",
            "must have at most 50 lines",
        ),
        (
            "currency other than the products'",
            with("currency", json!("USD")),
            "currency",
            "must match the products' currency (EUR)",
        ),
        (
            "empty payment token",
            with("payment_token", json!("")),
            "payment_token",
            "must not be empty",
        ),
        (
            "overlong payment token",
            with("payment_token", json!("t".repeat(201))),
            "payment_token",
            "must be at most 200 characters",
        ),
        (
            "missing field",
            {
                let mut b = valid.clone();
                b.as_object_mut().unwrap().remove("currency");
                b
            },
            "currency",
            "required",
        ),
    ];
    for (i, (what, body, field, message)) in cases.into_iter().enumerate() {
        let p = problem(
            app.post_order(Some(&format!("invalid-{i}")), &body).await,
            422,
        )
        .await;
        assert_eq!(
            p["type"], "https://keel.dev/problems/validation-failed",
            "{what}"
        );
        assert_eq!(
            p["errors"],
            json!([{"field": field, "message": message}]),
            "{what}"
        );
        assert_eq!(written(&app).await, nothing(), "{what}: nothing written");
    }
    // A key whose request failed validation is not burnt: fixed, the same key works.
    let r = app.post_order(Some("invalid-0"), &valid).await;
    assert_eq!(r.status(), 202);
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_400_problem() {
    let app = app().await;
    for body in ["{\"currency\": ", "[1, 2]", "not json"] {
        let r = app
            .client
            .post(format!("{}/v1/orders", app.base))
            .bearer_auth(&app.api_key)
            .header("content-type", "application/json")
            .header("idempotency-key", "k")
            .body(body)
            .send()
            .await
            .unwrap();
        let p = problem(r, 400).await;
        assert_eq!(
            p["type"], "https://keel.dev/problems/malformed-json",
            "{body}"
        );
    }
    assert_eq!(written(&app).await, nothing());
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_is_not_declared_as_json_is_415() {
    let app = app().await;
    let body = order("tok_approve", &[("KEEL-MUG", 1)]).to_string();
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut r = app
            .client
            .post(format!("{}/v1/orders", app.base))
            .bearer_auth(&app.api_key)
            .header("idempotency-key", "k")
            .body(body.clone());
        if let Some(ct) = content_type {
            r = r.header("content-type", ct);
        }
        let p = problem(r.send().await.unwrap(), 415).await;
        assert_eq!(
            p["type"],
            "https://keel.dev/problems/unsupported-media-type"
        );
    }
    assert_eq!(written(&app).await, nothing());
    app.stop().await;
}

#[tokio::test]
async fn an_oversized_body_is_413() {
    let app = app().await;
    let mut body = order("tok_approve", &[("KEEL-MUG", 1)]);
    body["payment_token"] = json!("x".repeat(70_000)); // over http.body_limit_bytes (64 KiB)
    let p = problem(app.post_order(Some("big"), &body).await, 413).await;
    assert_eq!(p["type"], "https://keel.dev/problems/payload-too-large");
    assert_eq!(written(&app).await, nothing());
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_order_is_a_404_problem() {
    let app = app().await;
    for id in [uuid::Uuid::new_v4().to_string(), "not-a-uuid".to_owned()] {
        let p = problem(app.get_order_as(Some(&app.api_key), &id).await, 404).await;
        assert_eq!(p["type"], "https://keel.dev/problems/order-not-found");
    }
    app.stop().await;
}

#[tokio::test]
async fn expired_idempotency_keys_are_purged_by_the_recurring_job() {
    let app = TestApp::start(
        "http://127.0.0.1:1",
        &[
            ("KEEL_SAGA__RUN_WORKER", "false"),
            ("KEEL_ORDERS__IDEMPOTENCY_TTL", "1s"),
            ("KEEL_DATABASE__RETENTION__INTERVAL", "200ms"),
            ("KEEL_DATABASE__RETENTION__BATCH", "2"),
        ],
    )
    .await;
    // Five keys: the purge needs several batches of two.
    for i in 0..5 {
        let r = app
            .post_order(
                Some(&format!("expiring-{i}")),
                &order("tok_approve", &[("KEEL-MUG", 1)]),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    assert_eq!(app.scalar("SELECT count(*) FROM idempotency_keys").await, 5);

    eventually(
        Duration::from_secs(15),
        "expired keys are purged",
        || async { (app.scalar("SELECT count(*) FROM idempotency_keys").await == 0).then_some(()) },
    )
    .await;
    // The orders stay; only the remembered answers go.
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 5);
    // The purge ran as jobs of the platform's retention queue, one per slot, and they succeeded.
    let succeeded = app
        .scalar("SELECT count(*) FROM jobs WHERE queue = 'keel.retention' AND state = 'succeeded'")
        .await;
    assert!(succeeded >= 1, "purge jobs succeeded: {succeeded}");
    let failed = app
        .scalar("SELECT count(*) FROM jobs WHERE queue = 'keel.retention' AND state = 'failed'")
        .await;
    assert_eq!(failed, 0);

    // An expired key is a new key: the same key now places a second order.
    let r = app
        .post_order(
            Some("expiring-0"),
            &order("tok_approve", &[("KEEL-MUG", 1)]),
        )
        .await;
    assert_eq!(r.status(), 202);
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 6);
    app.stop().await;
}

#[tokio::test]
async fn orders_are_accepted_while_billing_is_down() {
    // The saga worker runs; billing is a closed port. The order is still accepted, its
    // stock reserved, and its job waits to retry the payment.
    let app = TestApp::start("http://127.0.0.1:1", &[]).await;
    let id = app.place(&order("tok_approve", &[("KEEL-MUG", 1)])).await;
    eventually(Duration::from_secs(10), "the saga retries authorize", || async {
        let retries = app
            .scalar("SELECT count(*) FROM saga_steps WHERE step = 'authorize' AND outcome = 'retry'")
            .await;
        (retries >= 1).then_some(())
    })
    .await;
    let order = app.get_order(&id).await;
    assert_eq!(order["state"], "RESERVED");
    let (state, error): (String, Option<String>) =
        sqlx::query_as("SELECT state, last_error FROM jobs WHERE queue = 'saga'")
            .fetch_one(&app.admin)
            .await
            .unwrap();
    assert!(["queued", "running"].contains(&state.as_str()), "{state}");
    assert!(
        state == "running" || error.unwrap_or_default().contains("Unavailable"),
        "the job says why it waits"
    );
    app.stop().await;
}

//! P13 and P02 for the example resource, against a real database and vhost per test, with the
//! service started in-process on port 0: a retried `POST` creates one item and replays the
//! first answer, a reused key with another body is refused, and a created item travels through
//! the outbox, the broker and the consumer back into its own history.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use keel_testkit::{TestVhost, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Running, WAIT, count, database, env};

async fn post(base: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/items"))
        .json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn a_retried_post_creates_one_item_and_replays_the_first_answer() {
    let db = database().await;
    let vhost = TestVhost::create().await;
    let app = Running::start(&env(&db, &vhost)).await;
    let body = json!({"name": "bolt", "quantity": 3});

    let first = post(&app.base, Some("key-1"), &body).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/items/{}", first["id"].as_str().unwrap())
    );

    // The client timed out and retries with the same key: the same answer, nothing new.
    for _ in 0..3 {
        let again = post(&app.base, Some("key-1"), &body).await;
        assert_eq!(again.status(), StatusCode::CREATED);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(again.json::<Value>().await.unwrap(), first);
    }
    assert_eq!(count(&db, "SELECT count(*) FROM items").await, 1);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox WHERE event_type = 'skeleton.item.created'"
        )
        .await,
        1,
        "one item, one event"
    );

    let item: Value = reqwest::get(format!("{}{location}", app.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (item["name"].clone(), item["quantity"].clone()),
        (json!("bolt"), json!(3))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_key_reused_with_another_body_or_a_missing_key_is_refused() {
    let db = database().await;
    let vhost = TestVhost::create().await;
    let app = Running::start(&env(&db, &vhost)).await;

    let first = post(
        &app.base,
        Some("key-2"),
        &json!({"name": "nut", "quantity": 1}),
    )
    .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let reused = post(
        &app.base,
        Some("key-2"),
        &json!({"name": "nut", "quantity": 2}),
    )
    .await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = reused.json().await.unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("/idempotency-key-reused"),
        "{problem}"
    );

    let keyless = post(&app.base, None, &json!({"name": "nut", "quantity": 1})).await;
    assert_eq!(keyless.status(), StatusCode::BAD_REQUEST);
    let problem: Value = keyless.json().await.unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("/idempotency-key-required"),
        "{problem}"
    );

    let invalid = post(
        &app.base,
        Some("key-3"),
        &json!({"name": "", "quantity": -1}),
    )
    .await;
    assert_eq!(invalid.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = invalid.json().await.unwrap();
    assert_eq!(problem["errors"].as_array().unwrap().len(), 2, "{problem}");

    assert_eq!(count(&db, "SELECT count(*) FROM items").await, 1);
    let unknown = reqwest::get(format!("{}/v1/items/{}", app.base, uuid::Uuid::now_v7()))
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn a_created_item_reaches_its_history_through_outbox_broker_and_consumer() {
    let db = database().await;
    let vhost = TestVhost::create().await;
    let app = Running::start(&env(&db, &vhost)).await;

    let created: Value = post(
        &app.base,
        Some("key-4"),
        &json!({"name": "gear", "quantity": 7}),
    )
    .await
    .json()
    .await
    .unwrap();
    let url = format!("{}/v1/items/{}", app.base, created["id"].as_str().unwrap());
    let history = eventually(WAIT, "the item's created event in its history", || async {
        let item: Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
        let history = item["history"].as_array()?.clone();
        (!history.is_empty()).then_some(history)
    })
    .await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["event_type"], "skeleton.item.created");
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await,
        0,
        "the relay published it"
    );
    app.stop().await;
}

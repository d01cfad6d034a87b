//! Customer webhooks (P33) against the real stack: a database and a RabbitMQ vhost per test,
//! notification in-process on port 0, receivers on loopback.
//!
//! What is proved:
//! - the API is the customer's: no key, no access; the secret is shown once; another
//!   customer's endpoint is a 404; bad input is a problem naming the field;
//! - the SSRF guard refuses loopback, private, link-local and metadata destinations at
//!   registration (without the development allow-list) and again at delivery, on an endpoint
//!   that slipped past registration;
//! - a notification reaches each subscribed endpoint once, signed so that a Standard Webhooks
//!   verifier accepts it, and an endpoint not subscribed to its type gets nothing;
//! - a failing endpoint is retried on the schedule, and each attempt is queryable;
//! - an endpoint failing for `disable_after` is disabled, its owner emailed, and nothing more is
//!   sent to it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use keel_smtp_sink::{SinkConfig, SmtpSink};
use keel_testkit::{TestBroker, TestDb, TestVhost, eventually};
use keel_webhooks::{Signed, SigningKey, Verifier};
use serde_json::{Value, json};
use support::{
    Behaviour, QUEUE, Receiver, Running, WAIT, api_key, closed_port, publish_confirmed, register,
    service_config,
};
use uuid::Uuid;

/// Deliveries to loopback over plain HTTP, as in development.
const DEV_EGRESS: [(&str, &str); 2] = [
    ("KEEL_WEBHOOKS__ALLOW_HTTP", "true"),
    ("KEEL_WEBHOOKS__EGRESS__ALLOW", "127.0.0.0/8,::1/128"),
];

async fn start(db: &TestDb, vhost: &TestVhost, extra: &[(&str, &str)]) -> Running {
    let all: Vec<(&str, &str)> = DEV_EGRESS.iter().chain(extra).copied().collect();
    Running::start_with(service_config(db, vhost, closed_port(), &all)).await
}

async fn get(app: &Running, key: Option<&str>, path: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(app.url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(app: &Running, key: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(app.url("/v1/webhook-endpoints"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn deliveries(app: &Running, key: &str, endpoint: Uuid) -> Vec<Value> {
    let (status, body) = get(
        app,
        Some(key),
        &format!("/v1/webhook-endpoints/{endpoint}/deliveries"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["deliveries"].as_array().unwrap().clone()
}

#[tokio::test]
async fn the_endpoints_api_is_the_customers_own_and_shows_the_secret_once() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let app = start(&db, &vhost, &[]).await;
    let receiver = Receiver::start(Behaviour::Healthy).await;

    // No key: 401, a problem, the Bearer challenge.
    let response = reqwest::Client::new()
        .post(app.url("/v1/webhook-endpoints"))
        .json(&json!({"url": receiver.url(), "event_types": ["order.confirmed"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "https://keel.dev/problems/unauthenticated");

    let alice = api_key(&db, "alice").await;
    let (id, secret) = register(&app, &alice, &receiver.url(), &["order.confirmed"]).await;
    assert!(secret.starts_with("whsec_") && SigningKey::parse(&secret).is_ok());

    // Listed and shown without the secret.
    let (status, list) = get(&app, Some(&alice), "/v1/webhook-endpoints").await;
    assert_eq!(status, 200);
    assert_eq!(list["endpoints"][0]["id"], id.to_string());
    assert_eq!(
        list["endpoints"][0]["event_types"],
        json!(["order.confirmed"])
    );
    assert!(!list.to_string().contains("whsec_"), "{list}");
    let (status, one) = get(&app, Some(&alice), &format!("/v1/webhook-endpoints/{id}")).await;
    assert_eq!(status, 200);
    assert!(one.get("secret").is_none(), "{one}");

    // Another customer sees nothing of it and cannot delete it.
    let mallory = api_key(&db, "mallory").await;
    let (status, problem) = get(&app, Some(&mallory), &format!("/v1/webhook-endpoints/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(
        problem["type"],
        "https://keel.dev/problems/webhook-endpoint-not-found"
    );
    let (_, theirs) = get(&app, Some(&mallory), "/v1/webhook-endpoints").await;
    assert_eq!(theirs["endpoints"], json!([]));
    let (status, _) = get(
        &app,
        Some(&mallory),
        &format!("/v1/webhook-endpoints/{id}/deliveries"),
    )
    .await;
    assert_eq!(status, 404, "another customer's delivery log");
    let delete = |key: String| {
        let url = app.url(&format!("/v1/webhook-endpoints/{id}"));
        async move {
            reqwest::Client::new()
                .delete(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(delete(mallory.clone()).await, 404);
    assert_eq!(delete(alice.clone()).await, 204);
    assert_eq!(delete(alice.clone()).await, 404, "deleted once");

    // Bad input: the field and the reason, never a panic.
    let (status, problem) = post(
        &app,
        &alice,
        json!({"url": receiver.url(), "event_types": ["order.shipped"]}),
    )
    .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "event_types[0]");
    let (status, problem) = post(
        &app,
        &alice,
        json!({"url": receiver.url(), "event_types": ["order.confirmed"], "admin": true}),
    )
    .await;
    assert_eq!(status, 400, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("admin"),
        "{problem}"
    );
    app.stop().await;
}

#[tokio::test]
async fn forbidden_destinations_are_refused_at_registration_and_again_at_delivery() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    // Production's policy: no allow-list (plain HTTP allowed only to reach the receiver).
    let app = Running::start_with(service_config(
        &db,
        &vhost,
        closed_port(),
        &[("KEEL_WEBHOOKS__ALLOW_HTTP", "true")],
    ))
    .await;
    let receiver = Receiver::start(Behaviour::Healthy).await;
    let key = api_key(&db, "alice").await;
    for url in [
        receiver.url(),
        "http://localhost:9/hook".to_owned(),
        "http://10.0.0.5/hook".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[::1]:8082/".to_owned(),
        "http://[fd00::1]/".to_owned(),
    ] {
        let (status, problem) = post(
            &app,
            &key,
            json!({"url": url, "event_types": ["order.confirmed"]}),
        )
        .await;
        assert_eq!(status, 422, "{url}: {problem}");
        assert_eq!(problem["errors"][0]["field"], "url", "{url}");
        assert!(
            problem["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("not an allowed destination"),
            "{url}: {problem}"
        );
    }

    // Endpoints that got past registration (written straight into the table, as a name that
    // resolved elsewhere then would): each delivery is refused on its own connection, the IP
    // literal before sending, the name by the resolver the client connects with.
    let mut admin = support::admin(&db).await;
    let by_name = format!("http://localhost:{}/hook", receiver.addr.port());
    for url in [receiver.url(), by_name] {
        sqlx::query(
            "INSERT INTO webhook_endpoints (id, customer_id, url, event_types, secret)
             VALUES ($1, 'alice', $2, ARRAY['order.confirmed'], $3)",
        )
        .bind(Uuid::now_v7())
        .bind(url)
        .bind(keel_webhooks::new_secret().unwrap())
        .execute(&mut admin)
        .await
        .unwrap();
    }
    broker.wait_for_consumer(QUEUE, WAIT).await;
    publish_confirmed(&broker, "alice", 1).await;
    let errors: Vec<String> = eventually(WAIT, "both deliveries fail", || async {
        let errors = sqlx::query_scalar::<_, String>(
            "SELECT last_error FROM webhook_deliveries WHERE state = 'failed'",
        )
        .fetch_all(&mut support::admin(&db).await)
        .await
        .unwrap();
        (errors.len() == 2).then_some(errors)
    })
    .await;
    for error in &errors {
        assert!(error.contains("not an allowed destination"), "{error}");
    }
    assert!(receiver.received().is_empty(), "nothing was sent");
    app.stop().await;
}

#[tokio::test]
async fn a_notification_reaches_each_subscribed_endpoint_once_signed() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let app = start(&db, &vhost, &[]).await;
    let confirmed = Receiver::start(Behaviour::Healthy).await;
    let rejected_only = Receiver::start(Behaviour::Healthy).await;
    let key = api_key(&db, "alice").await;
    let (endpoint, secret) = register(&app, &key, &confirmed.url(), &["order.confirmed"]).await;
    register(&app, &key, &rejected_only.url(), &["order.rejected"]).await;
    // Another customer's endpoint hears nothing of alice's orders.
    let bobs = Receiver::start(Behaviour::Healthy).await;
    register(
        &app,
        &api_key(&db, "bob").await,
        &bobs.url(),
        &["order.confirmed"],
    )
    .await;
    broker.wait_for_consumer(QUEUE, WAIT).await;

    // The same event three times (redelivery): one notification, one delivery.
    let order = publish_confirmed(&broker, "alice", 3).await;
    let got = eventually(WAIT, "the webhook arrives", || async {
        confirmed.received().into_iter().next()
    })
    .await;
    let history = eventually(WAIT, "the delivery is recorded", || async {
        let d = deliveries(&app, &key, endpoint).await;
        (d.first()?["state"] == "succeeded").then_some(d)
    })
    .await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["attempts"], 1);
    assert_eq!(history[0]["attempt_log"][0]["status_code"], 200);

    // Signed the Standard Webhooks way, with the secret shown at registration.
    let verifier = Verifier::new(
        vec![SigningKey::parse(&secret).unwrap()],
        Duration::from_secs(300),
    );
    let (id, ts, sig) = (
        got.header("webhook-id"),
        got.header("webhook-timestamp"),
        got.header("webhook-signature"),
    );
    let signed = Signed {
        id: &id,
        timestamp: &ts,
        signature: &sig,
    };
    verifier
        .verify(&signed, &got.body, keel_webhooks::unix_now())
        .expect("the signature verifies");
    let wrong = Verifier::new(
        vec![SigningKey::parse(&keel_webhooks::new_secret().unwrap()).unwrap()],
        Duration::from_secs(300),
    );
    assert!(
        wrong
            .verify(&signed, &got.body, keel_webhooks::unix_now())
            .is_err()
    );
    assert_eq!(id, history[0]["id"], "webhook-id is the delivery id");
    let body: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["type"], "order.confirmed");
    assert_eq!(body["data"]["order_id"], order.to_string());
    assert_eq!(body["data"]["customer_id"], "alice");
    assert_eq!(got.header("content-type"), "application/json");

    // Settled: everything that would have been sent has been.
    eventually(WAIT, "every job done", || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE queue = 'webhook.deliver' AND state IN ('queued', 'running')",
        )
        .fetch_one(&mut support::admin(&db).await)
        .await
        .unwrap();
        (open == 0).then_some(())
    })
    .await;
    assert_eq!(
        confirmed.received().len(),
        1,
        "once, for three copies of the event"
    );
    assert!(
        rejected_only.received().is_empty(),
        "not subscribed to order.confirmed"
    );
    assert!(bobs.received().is_empty(), "another customer's endpoint");
    app.stop().await;
}

#[tokio::test]
async fn a_failing_endpoint_is_retried_on_the_schedule_and_each_attempt_is_queryable() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let app = start(
        &db,
        &vhost,
        &[("KEEL_WEBHOOKS__RETRY_SCHEDULE", "300ms,600ms,600ms")],
    )
    .await;
    let receiver = Receiver::start(Behaviour::Statuses(&[500, 503])).await;
    let key = api_key(&db, "alice").await;
    let (endpoint, _) = register(&app, &key, &receiver.url(), &["order.confirmed"]).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;
    publish_confirmed(&broker, "alice", 1).await;

    let delivery = eventually(WAIT, "delivered on the third attempt", || async {
        let d = deliveries(&app, &key, endpoint).await.into_iter().next()?;
        (d["state"] == "succeeded").then_some(d)
    })
    .await;
    let statuses: Vec<i64> = delivery["attempt_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, [500, 503, 200]);
    assert_eq!(delivery["attempts"], 3);
    // The pauses follow the schedule (each within ±20 %, plus the worker's poll).
    let got = receiver.received();
    let gap = |i: usize| (got[i + 1].at - got[i].at).to_std().unwrap();
    assert!(gap(0) >= Duration::from_millis(240), "{:?}", gap(0));
    assert!(gap(1) >= Duration::from_millis(480), "{:?}", gap(1));
    // All three carried the same webhook-id: the receiver can tell a retry from a new event.
    assert!(
        got.iter()
            .all(|r| r.header("webhook-id") == got[0].header("webhook-id"))
    );
    assert!(
        support::metric("webhook_deliveries_total{class=\"healthy\",outcome=\"failed\"} ") >= 1.0
    );
    assert!(
        support::metric("webhook_deliveries_total{class=\"failing\",outcome=\"succeeded\"} ")
            >= 1.0
    );
    app.stop().await;
}

#[tokio::test]
async fn a_flapping_endpoint_gets_every_event_in_bounded_retries() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    // Half its answers fail, so its breaker opens now and then: a short open period keeps the
    // test short (the default is 30 s).
    let app = start(
        &db,
        &vhost,
        &[
            ("KEEL_WEBHOOKS__RETRY_SCHEDULE", "100ms,200ms,400ms"),
            ("KEEL_WEBHOOKS__BREAKER__OPEN_FOR", "300ms"),
        ],
    )
    .await;
    let receiver = Receiver::start(Behaviour::Flapping).await;
    let key = api_key(&db, "alice").await;
    let (endpoint, _) = register(&app, &key, &receiver.url(), &["order.confirmed"]).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;
    for _ in 0..6 {
        publish_confirmed(&broker, "alice", 1).await;
    }
    let all = eventually(WAIT, "six deliveries succeeded", || async {
        let d = deliveries(&app, &key, endpoint).await;
        (d.len() == 6 && d.iter().all(|d| d["state"] == "succeeded")).then_some(d)
    })
    .await;
    for d in &all {
        assert_eq!(d["attempts"], 2, "refused once, then accepted: {d}");
    }
    // Twelve requests: six events, each refused once and accepted once.
    let got = receiver.received();
    let ids: std::collections::HashSet<String> =
        got.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!((got.len(), ids.len()), (12, 6));
    app.stop().await;
}

#[tokio::test]
async fn an_endpoint_failing_for_disable_after_is_disabled_and_its_owner_emailed() {
    let db = TestDb::create("notification", &notification::MIGRATOR).await;
    let vhost = TestVhost::create().await;
    let broker = TestBroker::connect(&vhost).await;
    let sink = SmtpSink::start(SinkConfig::ephemeral()).await.unwrap();
    let port = sink.smtp_addr().port().to_string();
    let app = start(
        &db,
        &vhost,
        &[
            ("KEEL_EMAIL__SMTP_PORT", port.as_str()),
            (
                "KEEL_WEBHOOKS__RETRY_SCHEDULE",
                "200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms",
            ),
            ("KEEL_WEBHOOKS__DISABLE_AFTER", "1s"),
            // The breaker would hold the attempts back; this test is about the failing run.
            ("KEEL_WEBHOOKS__BREAKER__MINIMUM_CALLS", "1000"),
        ],
    )
    .await;
    let receiver = Receiver::start(Behaviour::Statuses(&[500; 64])).await;
    let key = api_key(&db, "alice").await;
    let (endpoint, _) = register(&app, &key, &receiver.url(), &["order.confirmed"]).await;
    broker.wait_for_consumer(QUEUE, WAIT).await;
    publish_confirmed(&broker, "alice", 1).await;

    let shown = eventually(WAIT, "the endpoint is disabled", || async {
        let (_, e) = get(
            &app,
            Some(&key),
            &format!("/v1/webhook-endpoints/{endpoint}"),
        )
        .await;
        (!e["disabled_at"].is_null()).then_some(e)
    })
    .await;
    let reason = shown["disabled_reason"].as_str().unwrap();
    assert!(
        reason.contains("failed for 1 s") && reason.contains("HTTP 500"),
        "{reason}"
    );
    let mail = eventually(WAIT, "the owner is emailed", || async {
        sink.messages()
            .into_iter()
            .find(|m| m.subject() == "Your webhook endpoint was disabled")
    })
    .await;
    assert_eq!(mail.to(), ["alice@customers.keel.test"]);
    assert!(mail.text().contains(&receiver.url()), "{}", mail.text());
    let delivery = &deliveries(&app, &key, endpoint).await[0];
    assert_eq!(delivery["state"], "failed");
    let attempts = receiver.received().len();
    assert!(attempts >= 2, "{attempts}");

    // Nothing more goes to it: the next order's notification makes no delivery.
    publish_confirmed(&broker, "alice", 1).await;
    eventually(WAIT, "the second notification is recorded", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
            .fetch_one(&mut support::admin(&db).await)
            .await
            .unwrap();
        (n == 2).then_some(())
    })
    .await;
    assert_eq!(deliveries(&app, &key, endpoint).await.len(), 1);
    assert_eq!(receiver.received().len(), attempts);
    assert!(support::metric("webhook_endpoints_disabled_total ") >= 1.0);
    app.stop().await;
    sink.shutdown().await;
}

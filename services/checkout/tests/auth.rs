//! Authentication and object-level authorization of the orders API, and refusing unknown
//! fields: who may place and read orders, for whom, and what a body may say.
//!
//! What is proven here, each against the real database through pgbouncer:
//! - a request without a key, with another scheme, a malformed, unknown, wrong or revoked key
//!   is a 401 problem with `WWW-Authenticate: Bearer`, before anything else is looked at, and
//!   writes nothing;
//! - keys issued by `keel_pg::api_keys::issue` (what `keelctl api-keys create` runs)
//!   authenticate as their customer, and the order is that customer's whatever the body says
//!   (a `customer_id` member is an unknown field: 400);
//! - another customer's order is the same 404 as a nonexistent one, where an unscoped lookup
//!   (the naive handler) would hand it over;
//! - idempotency keys are per customer: a naive route-wide scope replays one customer's order
//!   to another who picked the same key and body; Keel's scope places the second order;
//! - unknown members are 400 naming each one, at the top level and inside lines, where a
//!   default serde parse ignores them;
//! - the key's secret never reaches the real binary's logs; its id does.
#![allow(clippy::unwrap_used)]

mod common;

use common::{TEST_CUSTOMER, TestApp, order};
use keel_pg::idempotency::{self, Begin, Timing};
use keel_testkit::{ServiceProcess, TestDb};
use serde_json::{Value, json};
use std::time::Duration;

const NO_WORKER: &[(&str, &str)] = &[("KEEL_SAGA__RUN_WORKER", "false")];
const UNAUTHENTICATED: &str = "https://keel.dev/problems/unauthenticated";

async fn app() -> TestApp {
    TestApp::start("http://127.0.0.1:1", NO_WORKER).await
}

async fn problem(r: reqwest::Response, status: u16) -> (reqwest::header::HeaderMap, Value) {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let headers = r.headers().clone();
    (headers, r.json().await.unwrap())
}

/// Rows that placing an order writes, summed over its tables.
async fn rows_written(app: &TestApp) -> i64 {
    app.scalar(
        "SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM idempotency_keys)
              + (SELECT count(*) FROM outbox) + (SELECT count(*) FROM jobs WHERE queue = 'saga')",
    )
    .await
}

/// `key` with its secret's last digit changed: a real id, a wrong secret.
fn wrong_secret(key: &str) -> String {
    let mut k = key.to_owned();
    let last = if k.ends_with('0') { "1" } else { "0" };
    k.replace_range(k.len() - 1.., last);
    k
}

#[tokio::test]
async fn a_request_without_a_usable_key_is_401_with_a_bearer_challenge_before_anything_else() {
    let app = app().await;
    let body = order("tok_approve", &[("KEEL-MUG", 1)]);
    // No key at all, on both routes: 401 even though the POST also lacks an idempotency key
    // (authentication is decided first, before the body is read).
    let (h, p) = problem(app.post_order_as(None, None, &body).await, 401).await;
    assert_eq!(p["type"], UNAUTHENTICATED);
    assert_eq!(h["www-authenticate"], r#"Bearer realm="keel""#);
    let id = uuid::Uuid::new_v4().to_string();
    let (h, p) = problem(app.get_order_as(None, &id).await, 401).await;
    assert_eq!(p["type"], UNAUTHENTICATED);
    assert_eq!(h["www-authenticate"], r#"Bearer realm="keel""#);

    // Another scheme is no key either.
    let r = app
        .client
        .post(format!("{}/v1/orders", app.base))
        .basic_auth("cus_test", Some("password"))
        .header("idempotency-key", "k")
        .json(&body)
        .send()
        .await
        .unwrap();
    let (h, _) = problem(r, 401).await;
    assert_eq!(h["www-authenticate"], r#"Bearer realm="keel""#);
    assert_eq!(rows_written(&app).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_unknown_or_wrong_key_is_401_invalid_token_and_writes_nothing() {
    let app = app().await;
    let body = order("tok_approve", &[("KEEL-MUG", 1)]);
    let unknown = format!("keel_0123456789ab_{}", "a".repeat(64));
    let cases = [
        ("not a Keel key", "sk_live_123".to_owned()),
        ("upper-case hex", app.api_key.to_uppercase()),
        ("truncated", app.api_key[..app.api_key.len() - 1].to_owned()),
        ("unknown id", unknown),
        ("wrong secret for a real id", wrong_secret(&app.api_key)),
    ];
    for (what, key) in &cases {
        let (h, p) = problem(app.post_order_as(Some(key), Some("k"), &body).await, 401).await;
        assert_eq!(p["type"], UNAUTHENTICATED, "{what}");
        assert_eq!(
            h["www-authenticate"], r#"Bearer realm="keel", error="invalid_token""#,
            "{what}"
        );
        // The client is not told which check failed, and nothing echoes the key.
        assert_eq!(
            p["detail"], "the API key is not valid: it is malformed, unknown or revoked",
            "{what}"
        );
        assert!(!p.to_string().contains(key.as_str()), "{what}");
        let (_, p) = problem(
            app.get_order_as(Some(key), &uuid::Uuid::new_v4().to_string())
                .await,
            401,
        )
        .await;
        assert_eq!(p["type"], UNAUTHENTICATED, "{what}");
    }
    assert_eq!(rows_written(&app).await, 0);
    // The real key still works: failures do not lock it out.
    assert_eq!(app.post_order(Some("k"), &body).await.status(), 202);
    app.stop().await;
}

#[tokio::test]
async fn a_revoked_key_is_refused_from_the_next_request() {
    let app = app().await;
    let key = app.issue_key("cus_revoked").await;
    let id = {
        let r = app
            .post_order_as(
                Some(&key),
                Some("k1"),
                &order("tok_approve", &[("KEEL-MUG", 1)]),
            )
            .await;
        assert_eq!(r.status(), 202);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(app.get_order_as(Some(&key), &id).await.status(), 200);

    let key_id = key.split('_').nth(1).unwrap();
    sqlx::query("UPDATE customer_api_keys SET revoked_at = now() WHERE id = $1")
        .bind(key_id)
        .execute(&app.admin)
        .await
        .unwrap();
    let (h, p) = problem(app.get_order_as(Some(&key), &id).await, 401).await;
    assert_eq!(p["type"], UNAUTHENTICATED);
    assert_eq!(
        h["www-authenticate"],
        r#"Bearer realm="keel", error="invalid_token""#
    );
    let r = app
        .post_order_as(
            Some(&key),
            Some("k2"),
            &order("tok_approve", &[("KEEL-MUG", 1)]),
        )
        .await;
    problem(r, 401).await;
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 1);
    // Another key of the same customer still reads the order: revoking is per key.
    let other = app.issue_key("cus_revoked").await;
    assert_eq!(app.get_order_as(Some(&other), &id).await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn the_order_belongs_to_the_key_s_customer_and_a_customer_in_the_body_is_refused() {
    let app = app().await;
    // A body naming a customer (the API's old shape, or an attempt to order as someone else)
    // is refused, naming the member, and nothing is written.
    let mut body = order("tok_approve", &[("KEEL-MUG", 1)]);
    body["customer_id"] = json!("cus_victim");
    let (_, p) = problem(app.post_order(Some("k"), &body).await, 400).await;
    assert_eq!(p["type"], "https://keel.dev/problems/unknown-field");
    assert_eq!(p["errors"][0]["field"], "customer_id");
    assert_eq!(rows_written(&app).await, 0);

    // Without it, the order is the key's customer's: in the answer, the row and the event.
    let key = app.issue_key("cus_alice").await;
    let r = app
        .post_order_as(
            Some(&key),
            Some("k"),
            &order("tok_approve", &[("KEEL-MUG", 1)]),
        )
        .await;
    assert_eq!(r.status(), 202);
    let placed: Value = r.json().await.unwrap();
    assert_eq!(placed["customer_id"], "cus_alice");
    let id = placed["id"].as_str().unwrap();
    let (row, event): (String, String) = sqlx::query_as(
        "SELECT o.customer_id, e.payload->'data'->>'customer_id' FROM orders o
           JOIN outbox e ON e.aggregate_id = o.id::text WHERE o.id = $1::uuid",
    )
    .bind(id)
    .fetch_one(&app.admin)
    .await
    .unwrap();
    assert_eq!((row.as_str(), event.as_str()), ("cus_alice", "cus_alice"));
    app.stop().await;
}

#[tokio::test]
async fn another_customer_s_order_is_the_same_404_as_a_nonexistent_one() {
    let app = app().await;
    let alice = app.issue_key("cus_alice").await;
    let mallory = app.issue_key("cus_mallory").await;
    let r = app
        .post_order_as(
            Some(&alice),
            Some("k"),
            &order("tok_approve", &[("KEEL-BOOK", 1)]),
        )
        .await;
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The naive handler: load by id alone. Anyone with any valid key would get Alice's order.
    let mut conn = app.admin.acquire().await.unwrap();
    let order_id = checkout::orders::OrderId(id.parse().unwrap());
    let naive = checkout::orders::store::load(&mut conn, order_id)
        .await
        .unwrap();
    assert_eq!(
        naive.map(|o| o.customer_id).as_deref(),
        Some("cus_alice"),
        "an unscoped lookup hands the order to whoever asks"
    );
    drop(conn);

    // Keel: Mallory gets exactly what a nonexistent order gets, so not even its existence
    // leaks; Alice reads it.
    let (_, theirs) = problem(app.get_order_as(Some(&mallory), &id).await, 404).await;
    let nonexistent = uuid::Uuid::new_v4().to_string();
    let (_, none) = problem(app.get_order_as(Some(&mallory), &nonexistent).await, 404).await;
    assert_eq!(theirs, none);
    assert_eq!(theirs["type"], "https://keel.dev/problems/order-not-found");
    let r = app.get_order_as(Some(&alice), &id).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["customer_id"], "cus_alice");
    app.stop().await;
}

#[tokio::test]
async fn idempotency_keys_are_per_customer_so_one_never_replays_another_s_order() {
    let app = app().await;
    let alice = app.issue_key("cus_alice").await;
    let bob = app.issue_key("cus_bob").await;
    // The body names no customer, so two customers can send byte-identical requests.
    let body = order("tok_approve", &[("KEEL-MUG", 1)]);
    let parsed: checkout::orders::request::PlaceOrder = checkout::orders::request::parse(
        body.to_string().as_bytes(),
        checkout::orders::request::Limits {
            max_lines: 50,
            max_quantity: 100,
        },
    )
    .unwrap();

    // The naive scope (the route alone): Alice's stored answer is Bob's replay.
    let timing = Timing {
        ttl: Duration::from_secs(60),
        wait: Duration::from_secs(1),
        stale_after: Duration::from_secs(60),
    };
    let naive = "naive: POST /v1/orders";
    let mut conn = app.admin.acquire().await.unwrap();
    let alice_answer = json!({"id": "alice's order", "customer_id": "cus_alice"});
    assert_eq!(
        idempotency::begin(
            &mut conn,
            naive,
            "shared",
            &parsed.fingerprint(naive),
            timing
        )
        .await
        .unwrap(),
        Begin::New
    );
    idempotency::complete(&mut conn, naive, "shared", 202, &alice_answer)
        .await
        .unwrap();
    let bob_sees = idempotency::begin(
        &mut conn,
        naive,
        "shared",
        &parsed.fingerprint(naive),
        timing,
    )
    .await
    .unwrap();
    assert_eq!(
        bob_sees,
        Begin::Replay {
            status_code: 202,
            response: alice_answer
        },
        "with a route-wide scope, Bob is answered with Alice's order"
    );
    drop(conn);

    // Keel: each customer's key is its own.
    let first = app.post_order_as(Some(&alice), Some("shared"), &body).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let second = app.post_order_as(Some(&bob), Some("shared"), &body).await;
    assert_eq!(second.status(), 202);
    assert!(second.headers().get("idempotent-replayed").is_none());
    let second: Value = second.json().await.unwrap();
    assert_ne!(first["id"], second["id"]);
    assert_eq!(second["customer_id"], "cus_bob");
    // A different body from Bob under a key Alice used is Bob's first use, not a mismatch.
    let alice_again = app.post_order_as(Some(&alice), Some("k2"), &body).await;
    assert_eq!(alice_again.status(), 202);
    let other = order("tok_approve", &[("KEEL-MUG", 2)]);
    let r = app.post_order_as(Some(&bob), Some("k2"), &other).await;
    assert_eq!(r.status(), 202);
    // A retry by Alice still replays her own answer.
    let again = app.post_order_as(Some(&alice), Some("shared"), &body).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 4);
    app.stop().await;
}

#[tokio::test]
async fn unknown_fields_are_400_naming_each_one_at_every_depth_and_write_nothing() {
    let app = app().await;
    let valid = order("tok_approve", &[("KEEL-MUG", 1)]);

    // The naive parse: serde's default ignores members it does not know, so a typo or an
    // injected property passes silently.
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct NaiveOrder {
        currency: String,
        payment_token: String,
        lines: Vec<NaiveLine>,
    }
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct NaiveLine {
        sku: String,
        quantity: i64,
    }
    let mut top = valid.clone();
    top["discount_percent"] = json!(100);
    let mut nested = valid.clone();
    nested["lines"][0]["unit_price"] = json!(0);
    for body in [&top, &nested] {
        assert!(
            serde_json::from_value::<NaiveOrder>(body.clone()).is_ok(),
            "the naive parse accepts {body}"
        );
    }

    // Keel: 400, each unknown member named with its path, in the detail and in `errors`.
    let cases = [(&top, "discount_percent"), (&nested, "lines[0].unit_price")];
    for (body, field) in cases {
        let (_, p) = problem(app.post_order(Some("k"), body).await, 400).await;
        assert_eq!(
            p["type"], "https://keel.dev/problems/unknown-field",
            "{field}"
        );
        assert_eq!(p["errors"][0]["field"], field);
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("`{field}`")),
            "{p}"
        );
    }
    // Several at once are all named.
    let mut both = top.clone();
    both["lines"][0]["colour"] = json!("red");
    let (_, p) = problem(app.post_order(Some("k"), &both).await, 400).await;
    let mut fields: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    fields.sort_unstable();
    assert_eq!(fields, ["discount_percent", "lines[0].colour"]);
    assert_eq!(rows_written(&app).await, 0);
    // The idempotency key was not burnt: the corrected body places the order under it.
    assert_eq!(app.post_order(Some("k"), &valid).await.status(), 202);
    app.stop().await;
}

#[tokio::test]
async fn the_real_binary_logs_the_key_id_and_never_its_secret() {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let admin = sqlx::PgPool::connect(&db.admin_url()).await.unwrap();
    let key = common::issue_key(&admin, TEST_CUSTOMER).await;
    let (key_id, secret) = key
        .strip_prefix("keel_")
        .and_then(|k| k.split_once('_'))
        .unwrap();
    let mut env = db.env();
    for (k, v) in [
        ("KEEL_HTTP__PORT", "0"),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
        ("KEEL_SAGA__RUN_WORKER", "false"),
        ("KEEL_AMQP__URL", "amqp://guest:guest@127.0.0.1:1/none"),
        // As much as the service will ever log.
        ("KEEL_TELEMETRY__LOG_LEVEL", "debug"),
    ] {
        env.push((k.to_owned(), v.to_owned()));
    }
    let p = ServiceProcess::spawn(env!("CARGO_BIN_EXE_checkout"), &[], &env).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/orders", p.base_url());
    let body = order("tok_approve", &[("KEEL-MUG", 1)]);
    let placed = client
        .post(&url)
        .bearer_auth(&key)
        .header("idempotency-key", "k")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 202);
    let id = placed.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let wrong = wrong_secret(&key);
    let refused = client
        .get(format!("{url}/{id}"))
        .bearer_auth(&wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let logs = keel_testkit::eventually(
        Duration::from_secs(10),
        "the order's log line is written",
        || async {
            let logs = p.logs();
            logs.iter()
                .any(|l| l.contains("order placed"))
                .then_some(logs)
        },
    )
    .await;
    let placed_line = logs.iter().find(|l| l.contains("order placed")).unwrap();
    assert!(placed_line.contains(key_id), "{placed_line}");
    // Neither key's secret half, nor any long piece of it.
    let wrong_secret_half = wrong.rsplit('_').next().unwrap();
    for line in &logs {
        for s in [secret, wrong_secret_half] {
            assert!(!line.contains(&s[..16]), "a secret in the logs: {line}");
        }
    }
    admin.close().await;
}

//! P13, failure first: a client that retries `POST /v1/orders`, against an order handler
//! that keeps no idempotency keys and then against checkout's, under the same retries.
//!
//! The naive handler (test code, served on 127.0.0.1:0) places an order exactly as checkout
//! does (checkout's own parsing, pricing, order, saga and saga job, in one transaction) but
//! keeps no key. Both handlers write to the same kind of database, and checkout's saga worker
//! takes every order it finds through payment at a fake billing that counts authorizations:
//! each order placed is a customer charged.
//!
//! The retries ([`a_client_retries`]): the same request twice in a row (the first answer was
//! lost), the same request ten times at once under one key (a double click, an impatient
//! retry loop), and a different request under a key already used (a client bug).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use checkout::config::SagaConfig;
use checkout::orders::OrderId;
use checkout::orders::request::{self, Limits};
use checkout::orders::store::{self, NewOrder};
use checkout::{catalogue, saga};
use common::{FakeBilling, TestApp, order};
use http::StatusCode;
use keel_testkit::eventually;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Barrier;

/// What the naive handler needs: the same pool and settings checkout's handler uses.
#[derive(Clone)]
struct Naive {
    pool: PgPool,
    limits: Limits,
    saga: SagaConfig,
}

/// The anti-pattern, for the proof only: checkout's placement without the key store. One
/// transaction, so nothing is half-written; but every request that arrives is a new order.
async fn naive_place(State(naive): State<Naive>, body: Bytes) -> Response {
    let placed = async {
        let order = request::parse(&body, naive.limits)?;
        let mut tx = naive.pool.begin().await?;
        let prices = catalogue::prices(&mut tx, &order.skus()).await?;
        let (lines, total) = request::price(&order, &prices)?;
        let id = OrderId::new();
        let view = store::insert(
            &mut tx,
            &NewOrder {
                id,
                customer_id: "cus_naive",
                total,
                lines: &lines,
            },
        )
        .await?;
        saga::store::create(&mut tx, id, &order.payment_token, &naive.saga).await?;
        tx.commit().await?;
        Ok::<_, checkout::error::ApiError>(view)
    }
    .await;
    match placed {
        Ok(view) => (StatusCode::ACCEPTED, axum::Json(view)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Serves [`naive_place`] on 127.0.0.1:0 over `app`'s database; returns its orders URL.
async fn serve_naive(app: &TestApp) -> String {
    let pool = PgPool::connect(&app.db.app_url()).await.unwrap();
    let naive = Naive {
        pool,
        limits: Limits {
            max_lines: app.config.orders.max_lines,
            max_quantity: app.config.orders.max_quantity,
        },
        saga: app.config.saga.clone(),
    };
    let routes = Router::new()
        .route("/v1/orders", post(naive_place))
        .with_state(naive);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/orders", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, routes).await });
    url
}

/// Where the client sends its orders: checkout's `POST /v1/orders` through the test
/// harness's helper, or [`naive_place`] at `naive` (which checks no key).
#[derive(Clone)]
struct Handler {
    app: Arc<TestApp>,
    naive: Option<String>,
}

impl Handler {
    async fn post(&self, key: &str, body: &Value) -> Answer {
        let r = match &self.naive {
            None => self.app.post_order(Some(key), body).await,
            Some(url) => self
                .app
                .client
                .post(url)
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(body.to_string())
                .send()
                .await
                .unwrap(),
        };
        let status = r.status().as_u16();
        let replayed = r.headers().contains_key("idempotent-replayed");
        let body: Value = r.json().await.unwrap();
        Answer {
            status,
            replayed,
            body,
        }
    }

    /// Stops checkout (the naive server ends with the test).
    async fn stop(self) {
        let Self { app, .. } = self;
        Arc::try_unwrap(app).ok().unwrap().stop().await;
    }
}

/// One HTTP answer, as the client sees it.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    replayed: bool,
    body: Value,
}

impl Answer {
    fn order_id(&self) -> &str {
        self.body["id"].as_str().unwrap_or_default()
    }
}

/// What the client's retries led to.
#[derive(Debug)]
struct Retries {
    /// The same request twice in a row under one key.
    twice: [Answer; 2],
    /// The same request ten times at once under another key.
    burst: Vec<Answer>,
    /// A different request under the first key.
    other_body: Answer,
    /// Orders, sagas and saga jobs written, once every saga has finished.
    orders: i64,
    sagas: i64,
    jobs: i64,
    /// Authorizations billing received payments for: customers charged.
    payments: usize,
}

/// The client's three kinds of retry against `handler`, then the saga worker takes every
/// order written to its end.
async fn a_client_retries(handler: &Handler, billing: &FakeBilling) -> Retries {
    let mug = order("tok_approve", &[("KEEL-MUG", 1)]);
    let twice = [
        handler.post("retry-1", &mug).await,
        handler.post("retry-1", &mug).await,
    ];
    let start = Arc::new(Barrier::new(10));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (handler, mug, start) = (handler.clone(), mug.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            handler.post("burst-1", &mug).await
        }));
    }
    let mut burst = Vec::new();
    for t in tasks {
        burst.push(t.await.unwrap());
    }
    let two_mugs = order("tok_approve", &[("KEEL-MUG", 2)]);
    let other_body = handler.post("retry-1", &two_mugs).await;

    let app = &handler.app;
    eventually(Duration::from_secs(60), "every order final", || async {
        let open = app
            .scalar(
                "SELECT count(*) FROM orders
                  WHERE state NOT IN ('CONFIRMED', 'REJECTED', 'PAYMENT_DECLINED', 'PAYMENT_FAILED')",
            )
            .await;
        (open == 0).then_some(())
    })
    .await;
    Retries {
        twice,
        burst,
        other_body,
        orders: app.scalar("SELECT count(*) FROM orders").await,
        sagas: app.scalar("SELECT count(*) FROM sagas").await,
        jobs: app
            .scalar("SELECT count(*) FROM jobs WHERE queue = 'saga'")
            .await,
        payments: billing.payments().len(),
    }
}

async fn checkout_with_billing() -> (Arc<TestApp>, FakeBilling) {
    let billing = FakeBilling::default();
    let url = billing.serve().await;
    (Arc::new(TestApp::start(&url, &[]).await), billing)
}

/// The failure: every retry is another order, another saga and another charge. Two posts of
/// one purchase are two orders; ten at once are ten; the changed body is one more, silently.
#[tokio::test]
async fn naive_handler_without_a_key_store_creates_an_order_per_retry() {
    let (app, billing) = checkout_with_billing().await;
    let naive = Handler {
        naive: Some(serve_naive(&app).await),
        app,
    };
    let retries = a_client_retries(&naive, &billing).await;
    eprintln!(
        "naive: 13 posts of 2 purchases -> {} orders, {} payments authorized",
        retries.orders, retries.payments
    );

    assert!(retries.twice.iter().all(|a| a.status == 202 && !a.replayed));
    assert_ne!(
        retries.twice[0].order_id(),
        retries.twice[1].order_id(),
        "the retry placed a second order"
    );
    assert!(retries.burst.iter().all(|a| a.status == 202));
    assert_eq!(retries.other_body.status, 202, "accepted as a new order");
    assert_eq!((retries.orders, retries.sagas, retries.jobs), (13, 13, 13));
    assert_eq!(retries.payments, 13, "a charge per post");
    naive.stop().await;
}

/// The pattern, same retries: one order per key. The retry in a row and the burst get the
/// stored answer (same order, `Idempotent-Replayed: true`); the changed body under a used key
/// is refused with 422 and writes nothing.
#[tokio::test]
async fn retried_posts_with_one_key_create_one_order_and_replay_its_answer() {
    let (app, billing) = checkout_with_billing().await;
    let checkout = Handler { app, naive: None };
    let retries = a_client_retries(&checkout, &billing).await;
    eprintln!(
        "checkout: 13 posts of 2 purchases -> {} orders, {} payments authorized",
        retries.orders, retries.payments
    );

    let [first, retry] = &retries.twice;
    assert_eq!((first.status, first.replayed), (202, false));
    assert_eq!((retry.status, retry.replayed), (202, true));
    assert_eq!(retry.body, first.body, "the stored answer, byte for byte");

    let fresh: Vec<&Answer> = retries.burst.iter().filter(|a| !a.replayed).collect();
    assert_eq!(fresh.len(), 1, "one request of the burst placed the order");
    assert_eq!(fresh[0].status, 202);
    for answer in &retries.burst {
        match answer.status {
            202 => assert_eq!(answer.order_id(), fresh[0].order_id(), "{answer:?}"),
            // Still waiting for the first past `orders.idempotency_wait`: retry later.
            409 => assert!(!answer.replayed),
            other => panic!("unexpected answer {other}: {answer:?}"),
        }
    }

    assert_eq!(retries.other_body.status, 422);
    assert!(
        retries.other_body.body["type"]
            .as_str()
            .unwrap()
            .ends_with("/idempotency-key-reused"),
        "{:?}",
        retries.other_body
    );
    assert_eq!((retries.orders, retries.sagas, retries.jobs), (2, 2, 2));
    assert_eq!(retries.payments, 2, "a charge per purchase");
    assert_eq!(
        checkout
            .app
            .scalar("SELECT count(*) FROM idempotency_keys")
            .await,
        2
    );
    checkout.stop().await;
}

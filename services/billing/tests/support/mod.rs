//! Shared harness for billing's tests: a fake payment provider inside the test process and a
//! billing `App` on port 0 with its own database (TestDb through pgbouncer).
//!
//! The fake provider speaks psp-sim's HTTP API (see notes/step2-spec.md) but lets a test
//! count calls and switch faults directly. Tokens pick outcomes like psp-sim's:
//! `tok_decline`, `tok_insufficient_funds`, `tok_slow` (answers after `SLOW`), anything else
//! approves. `set_down(true)` answers every call 503. Responses are remembered by
//! `Idempotency-Key`, as a real provider does.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use billing::{App, Config};
use keel_contracts::billing_v1 as pb;
use keel_contracts::billing_v1::payment_service_client::PaymentServiceClient;
use keel_testkit::{TestDb, eventually};
use serde_json::{Value, json};
use sqlx::PgPool;
use tonic::transport::Channel;

/// How long `tok_slow` takes.
pub const SLOW: Duration = Duration::from_secs(3);

/// One call the fake provider received.
#[derive(Debug, Clone)]
pub struct Call {
    pub op: &'static str,
    pub idempotency_key: String,
}

/// Answers remembered by (idempotency key, operation): (status, body).
type Answers = HashMap<(String, &'static str), (u16, Value)>;

#[derive(Default)]
struct Inner {
    calls: Mutex<Vec<Call>>,
    down: AtomicBool,
    answers: Mutex<Answers>,
    auths: Mutex<HashMap<String, &'static str>>,
}

/// A payment provider inside the test.
#[derive(Clone, Default)]
pub struct FakePsp {
    inner: Arc<Inner>,
    pub url: String,
}

impl FakePsp {
    pub async fn start() -> Self {
        let mut psp = Self::default();
        let app = Router::new()
            .route("/v1/authorizations", post(authorize))
            .route("/v1/authorizations/{id}/capture", post(capture))
            .route("/v1/authorizations/{id}/void", post(void))
            .with_state(psp.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        psp.url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        psp
    }

    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    pub fn calls(&self, op: &str) -> Vec<Call> {
        let calls = self.inner.calls.lock().unwrap();
        calls.iter().filter(|c| c.op == op).cloned().collect()
    }

    fn record(&self, op: &'static str, headers: &HeaderMap) -> Option<String> {
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.inner.calls.lock().unwrap().push(Call {
            op,
            idempotency_key: key.clone().unwrap_or_default(),
        });
        key
    }

    fn remembered(&self, key: &str, op: &'static str) -> Option<Response> {
        let answers = self.inner.answers.lock().unwrap();
        answers
            .get(&(key.to_owned(), op))
            .map(|(s, v)| reply(*s, v.clone()))
    }

    fn remember(&self, key: &str, op: &'static str, status: u16, body: Value) -> Response {
        self.inner
            .answers
            .lock()
            .unwrap()
            .insert((key.to_owned(), op), (status, body.clone()));
        reply(status, body)
    }
}

fn reply(status: u16, body: Value) -> Response {
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

fn unavailable() -> Response {
    reply(
        503,
        json!({"type": "about:blank", "title": "down", "status": 503}),
    )
}

async fn authorize(
    State(psp): State<FakePsp>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let key = psp.record("authorize", &headers);
    if psp.inner.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    let Some(key) = key else {
        return reply(400, json!({"title": "no key"}));
    };
    if let Some(r) = psp.remembered(&key, "authorize") {
        return r;
    }
    let token = body["token"].as_str().unwrap_or_default().to_owned();
    if token == "tok_slow" {
        tokio::time::sleep(SLOW).await;
    }
    let decline = match token.as_str() {
        "tok_decline" => Some("card_declined"),
        "tok_insufficient_funds" => Some("insufficient_funds"),
        _ => None,
    };
    if let Some(code) = decline {
        let problem = json!({"type": "https://psp.example/problems/card-declined",
            "title": "Card declined", "status": 402, "decline_code": code});
        return psp.remember(&key, "authorize", 402, problem);
    }
    let id = format!("auth_{}", uuid::Uuid::new_v4().simple());
    psp.inner
        .auths
        .lock()
        .unwrap()
        .insert(id.clone(), "authorized");
    let answer = json!({"id": id, "status": "authorized", "amount_minor": body["amount_minor"],
        "currency": body["currency"], "reference": body["reference"]});
    psp.remember(&key, "authorize", 201, answer)
}

async fn capture(
    State(psp): State<FakePsp>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    change(psp, "capture", id, headers, "capture_pending", 202).await
}

async fn void(State(psp): State<FakePsp>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    change(psp, "void", id, headers, "voided", 200).await
}

async fn change(
    psp: FakePsp,
    op: &'static str,
    id: String,
    headers: HeaderMap,
    to: &'static str,
    ok: u16,
) -> Response {
    let key = psp.record(op, &headers);
    if psp.inner.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    let key = key.unwrap_or_default();
    if let Some(r) = psp.remembered(&key, op) {
        return r;
    }
    let mut auths = psp.inner.auths.lock().unwrap();
    let Some(state) = auths.get(&id).copied() else {
        return reply(404, json!({"title": "unknown authorization"}));
    };
    if state != "authorized" {
        return reply(409, json!({"title": format!("authorization is {state}")}));
    }
    auths.insert(id.clone(), to);
    drop(auths);
    psp.remember(&key, op, ok, json!({"id": id, "status": to}))
}

/// A running billing with its own database and provider.
pub struct Billing {
    pub db: TestDb,
    /// Its own vhost: the outbox relay publishes here, never to a shared one.
    pub vhost: keel_testkit::TestVhost,
    pub psp: FakePsp,
    pub config: Config,
    pub http: String,
    /// `http://<grpc addr>`, for a client or connection of a test's own.
    pub grpc_url: String,
    pub grpc: PaymentServiceClient<Channel>,
    /// The app role's pool (through pgbouncer), for assertions.
    pub pool: PgPool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Billing {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(overrides: &[(&str, &str)]) -> Self {
        let db = TestDb::create("billing", &billing::MIGRATOR).await;
        let psp = FakePsp::start().await;
        let vhost = keel_testkit::TestVhost::create().await;
        let amqp_url = vhost.url();
        let app_url = db.app_url();
        let mut vars = vec![
            ("KEEL_HTTP__PORT", "0"),
            ("KEEL_GRPC__PORT", "0"),
            ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
            ("KEEL_DATABASE__URL", app_url.as_str()),
            ("KEEL_PSP__BASE_URL", psp.url.as_str()),
            ("KEEL_PSP__INITIAL_BACKOFF", "5ms"),
            ("KEEL_PSP__MAX_BACKOFF", "20ms"),
            ("KEEL_AMQP__URL", amqp_url.as_str()),
        ];
        vars.extend_from_slice(overrides);
        let config: Config = keel_testkit::config(billing::DEFAULT_CONFIG, &vars);
        let app = App::build(config.clone()).await.unwrap();
        let http = format!("http://{}", app.local_addr());
        let grpc_url = format!("http://{}", app.grpc_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::new();
        eventually(Duration::from_secs(10), "billing /readyz", || async {
            let r = client.get(format!("{http}/readyz")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        let grpc = PaymentServiceClient::connect(grpc_url.clone())
            .await
            .unwrap();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&db.app_url())
            .await
            .unwrap();
        Self {
            db,
            vhost,
            psp,
            config,
            http,
            grpc_url,
            grpc,
            pool,
            stop: Some(stop),
        }
    }

    /// Authorize with `key` for a fresh order.
    pub async fn authorize(&self, key: &str, token: &str) -> Result<pb::Payment, tonic::Status> {
        self.authorize_request(authorize_request(key, token)).await
    }

    pub async fn authorize_request(
        &self,
        r: pb::AuthorizeRequest,
    ) -> Result<pb::Payment, tonic::Status> {
        self.grpc.clone().authorize(r).await.map(|r| r.into_inner())
    }

    pub async fn capture(&self, key: &str, payment_id: &str) -> Result<pb::Payment, tonic::Status> {
        let r = pb::CaptureRequest {
            idempotency_key: key.to_owned(),
            payment_id: payment_id.to_owned(),
        };
        self.grpc.clone().capture(r).await.map(|r| r.into_inner())
    }

    pub async fn void(&self, key: &str, payment_id: &str) -> Result<pb::Payment, tonic::Status> {
        let r = pb::VoidRequest {
            idempotency_key: key.to_owned(),
            payment_id: payment_id.to_owned(),
            ..Default::default()
        };
        self.grpc.clone().void(r).await.map(|r| r.into_inner())
    }

    pub async fn void_order(
        &self,
        key: &str,
        order_id: &str,
    ) -> Result<pb::Payment, tonic::Status> {
        let r = pb::VoidRequest {
            idempotency_key: key.to_owned(),
            order_id: order_id.to_owned(),
            ..Default::default()
        };
        self.grpc.clone().void(r).await.map(|r| r.into_inner())
    }

    pub async fn get(&self, payment_id: &str) -> Result<pb::Payment, tonic::Status> {
        let r = pb::GetPaymentRequest {
            payment_id: payment_id.to_owned(),
        };
        self.grpc
            .clone()
            .get_payment(r)
            .await
            .map(|r| r.into_inner())
    }

    /// The event types of a payment's stream, in order.
    pub async fn events(&self, payment_id: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT event_type FROM payment_events WHERE stream_id = $1::uuid ORDER BY version",
        )
        .bind(payment_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// The outbox event types written for a payment, in order.
    pub async fn outbox(&self, payment_id: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT event_type FROM outbox WHERE aggregate_type = 'payment' AND aggregate_id = $1
              ORDER BY seq",
        )
        .bind(payment_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Posts a webhook body with the given headers.
    pub async fn post_webhook(&self, headers: &[(&str, String)], body: &str) -> reqwest::Response {
        let mut r = reqwest::Client::new()
            .post(format!("{}/v1/webhooks/psp", self.http))
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        r.send().await.unwrap()
    }
}

impl Drop for Billing {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An `Authorize` for a fresh order of 12.34 EUR.
pub fn authorize_request(key: &str, token: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        idempotency_key: key.to_owned(),
        order_id: uuid::Uuid::new_v4().to_string(),
        amount: Some(pb::Money {
            amount_minor: 1234,
            currency: "EUR".to_owned(),
        }),
        payment_token: token.to_owned(),
    }
}

/// A unique idempotency key.
pub fn key(step: &str) -> String {
    format!("saga-{}:{step}", uuid::Uuid::new_v4().simple())
}

/// The dev secrets: psp-sim signs with the first; the second is the rotated-in one.
pub const SECRET: &str = "whsec_S2vWrImrY1hJwx70XjbtZeu65l4ixwO6";
pub const ROTATED_SECRET: &str = "whsec_PAf8iVvpMPdIeZajLlzcZ/uiE0NDSRct";

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Standard Webhooks headers for `body`, signed with `secret` at `timestamp`.
pub fn signed(id: &str, timestamp: i64, body: &str, secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        (
            "webhook-signature",
            keel_webhooks::SigningKey::parse(secret)
                .unwrap()
                .sign(id, timestamp, body.as_bytes()),
        ),
    ]
}

/// The body psp-sim sends after a capture.
pub fn captured_body(p: &pb::Payment, authorization_id: &str) -> String {
    json!({"type": "payment.captured", "data": {
        "authorization_id": authorization_id,
        "reference": p.payment_id,
        "amount_minor": p.amount.as_ref().unwrap().amount_minor,
        "currency": p.amount.as_ref().unwrap().currency,
    }})
    .to_string()
}

impl Billing {
    /// The provider's authorization id billing recorded for a payment.
    pub async fn authorization_id(&self, payment_id: &str) -> String {
        sqlx::query_scalar("SELECT psp_authorization_id FROM payments WHERE payment_id = $1::uuid")
            .bind(payment_id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

//! Test harness shared by checkout's integration tests: an in-process `App` on port 0 with its
//! own database (cloned from the migrated template, reached through pgbouncer as
//! `checkout_app`), and a scriptable fake of billing's `PaymentService` served over real gRPC
//! on 127.0.0.1:0. The real cross-service journey is tested end to end elsewhere (e2e).
//!
//! Every `TestApp` issues an API key for [`TEST_CUSTOMER`] when it starts, through
//! `keel_pg::api_keys::issue` (what `keelctl api-keys create` runs), and its order helpers send
//! it: tests that are not about authentication never see it.
//!
//! Every response the request helpers receive is held to `openapi.yaml` ([`contract`]) before
//! the test sees it: a status, header or body field the document lacks fails the test.
#![allow(dead_code, clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod contract;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use checkout::{App, Config};
use keel_contracts::billing_v1::payment_service_server::{PaymentService, PaymentServiceServer};
use keel_contracts::billing_v1::{
    AuthorizeRequest, CaptureRequest, GetPaymentRequest, Payment, PaymentStatus, VoidRequest,
};
use keel_testkit::{TestDb, eventually};
use serde_json::{Value, json};
use sqlx::PgPool;
use tonic::{Code, Request, Response, Status};

/// The customer whose API key a `TestApp`'s order helpers send.
pub const TEST_CUSTOMER: &str = "cus_test";

/// Issues an API key for `customer` in the database behind `admin`, as an operator does.
pub async fn issue_key(admin: &PgPool, customer: &str) -> String {
    let mut conn = admin.acquire().await.unwrap();
    let issued = keel_pg::api_keys::issue(&mut conn, customer).await.unwrap();
    issued.expose().to_owned()
}

/// Settings that make sagas quick and tests fast; each test adds its own on top.
pub const FAST: &[(&str, &str)] = &[
    ("KEEL_HTTP__PORT", "0"),
    ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
    ("KEEL_SAGA__POLL_INTERVAL", "20ms"),
    ("KEEL_SAGA__RETRY_BASE", "20ms"),
    ("KEEL_SAGA__RETRY_MAX", "200ms"),
    ("KEEL_SAGA__LEASE", "5s"),
    ("KEEL_SAGA__DEADLINE", "20s"),
    ("KEEL_BILLING__CALL_TIMEOUT", "2s"),
    ("KEEL_DATABASE__RETENTION__POLL_INTERVAL", "50ms"),
    // No broker: these tests look at checkout's own tables (the outbox rows included); the
    // relay publishing them is proven in keel-amqp and end to end in e2e. Port 1 refuses at
    // once, so nothing is published to a vhost another test or `make dev` uses.
    ("KEEL_AMQP__URL", "amqp://guest:guest@127.0.0.1:1/none"),
];

/// A config for `db` and `billing_url`, with `FAST` and `extra` applied.
pub fn config(db: &TestDb, billing_url: &str, extra: &[(&str, &str)]) -> Config {
    let url = db.app_url();
    let mut vars: Vec<(&str, &str)> = FAST.to_vec();
    vars.push(("KEEL_DATABASE__URL", &url));
    vars.push(("KEEL_BILLING__GRPC_URL", billing_url));
    vars.extend_from_slice(extra);
    keel_testkit::config(checkout::DEFAULT_CONFIG, &vars)
}

/// A running checkout.
pub struct TestApp {
    pub base: String,
    pub db: TestDb,
    /// Superuser pool on the test database, for arranging and asserting.
    pub admin: PgPool,
    pub client: reqwest::Client,
    pub config: Config,
    /// An API key of [`TEST_CUSTOMER`], sent by the order helpers.
    pub api_key: String,
    /// Dropping it (with the `TestApp`) stops the app too.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    /// Starts checkout on its own database, talking to billing at `billing_url`.
    pub async fn start(billing_url: &str, extra: &[(&str, &str)]) -> Self {
        let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
        Self::start_on(db, billing_url, extra).await
    }

    /// Starts checkout on an existing database (a restart).
    pub async fn start_on(db: TestDb, billing_url: &str, extra: &[(&str, &str)]) -> Self {
        let config = config(&db, billing_url, extra);
        let app = App::build(config.clone()).await.unwrap();
        let base = format!("http://{}", app.local_addr());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            app.run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        let admin = PgPool::connect(&db.admin_url()).await.unwrap();
        let api_key = issue_key(&admin, TEST_CUSTOMER).await;
        Self {
            base,
            db,
            admin,
            client: reqwest::Client::new(),
            config,
            api_key,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Stops the app gracefully (drain, workers, pool) and waits for it.
    pub async fn stop(self) {
        drop(self.stop_keep_db().await);
    }

    /// Stops the app gracefully and hands back its database (to start it again).
    pub async fn stop_keep_db(self) -> TestDb {
        let Self {
            db,
            admin,
            stop,
            handle,
            ..
        } = self;
        if let Some(tx) = stop {
            let _ = tx.send(());
        }
        if let Some(h) = handle {
            tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .expect("checkout stops within 30s")
                .unwrap();
        }
        admin.close().await;
        db
    }

    /// Issues another API key, for `customer`, in this app's database.
    pub async fn issue_key(&self, customer: &str) -> String {
        issue_key(&self.admin, customer).await
    }

    /// `POST /v1/orders` with `body` as JSON and `key` as the Idempotency-Key, as
    /// [`TEST_CUSTOMER`].
    pub async fn post_order(&self, key: Option<&str>, body: &Value) -> reqwest::Response {
        self.post_order_as(Some(&self.api_key), key, body).await
    }

    /// `POST /v1/orders` with `api_key` as the bearer token (none if `None`).
    pub async fn post_order_as(
        &self,
        api_key: Option<&str>,
        key: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut r = self
            .client
            .post(format!("{}/v1/orders", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(api_key) = api_key {
            r = r.bearer_auth(api_key);
        }
        if let Some(key) = key {
            r = r.header("idempotency-key", key);
        }
        contract::checked("POST", "/v1/orders", r.send().await.unwrap()).await
    }

    /// `GET /v1/orders/{id}` with `api_key` as the bearer token (none if `None`).
    pub async fn get_order_as(&self, api_key: Option<&str>, id: &str) -> reqwest::Response {
        let mut r = self.client.get(format!("{}/v1/orders/{id}", self.base));
        if let Some(api_key) = api_key {
            r = r.bearer_auth(api_key);
        }
        contract::checked("GET", "/v1/orders/{id}", r.send().await.unwrap()).await
    }

    /// Places `body` with a fresh key; returns the order id.
    pub async fn place(&self, body: &Value) -> String {
        let key = uuid::Uuid::new_v4().to_string();
        let r = self.post_order(Some(&key), body).await;
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        let body: Value = r.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    /// `GET /v1/orders/{id}` as [`TEST_CUSTOMER`]; asserts 200.
    pub async fn get_order(&self, id: &str) -> Value {
        let r = self.get_order_as(Some(&self.api_key), id).await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Waits until order `id` is in a final state and returns it.
    pub async fn wait_final(&self, id: &str) -> Value {
        eventually(
            Duration::from_secs(30),
            "the order reaches a final state",
            || async {
                let order = self.get_order(id).await;
                let state = order["state"].as_str().unwrap_or_default().to_owned();
                [
                    "CONFIRMED",
                    "REJECTED",
                    "PAYMENT_DECLINED",
                    "PAYMENT_FAILED",
                ]
                .contains(&state.as_str())
                .then_some(order)
            },
        )
        .await
    }

    /// One number from SQL (`SELECT count(*) ...`).
    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.admin)
            .await
            .unwrap()
    }

    /// (available, reserved, sold) of `sku`.
    pub async fn stock(&self, sku: &str) -> (i32, i32, i32) {
        stock(&self.admin, sku).await
    }
}

/// (available, reserved, sold) of `sku`.
pub async fn stock(pool: &PgPool, sku: &str) -> (i32, i32, i32) {
    sqlx::query_as("SELECT available, reserved, sold FROM stock WHERE sku = $1")
        .bind(sku)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A valid order body for `lines` of (sku, quantity). It names no customer: the API key does.
pub fn order(token: &str, lines: &[(&str, i64)]) -> Value {
    json!({
        "currency": "EUR",
        "payment_token": token,
        "lines": lines.iter().map(|(sku, q)| json!({"sku": sku, "quantity": q})).collect::<Vec<_>>(),
    })
}

// ---- the fake billing -----------------------------------------------------------------

/// What the fake does with one call.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Succeed: Authorize → AUTHORIZED, Capture → CAPTURE_PENDING, Void → VOIDED.
    Ok,
    /// Authorize only: DECLINED with this reason.
    Decline(&'static str),
    /// Answer with this gRPC error (no effect).
    Fail(Code),
    /// Never answer (no effect).
    Hang,
    /// Take effect (the payment exists at "billing"), then never answer: a lost response.
    OkThenHang,
}

#[derive(Debug, Default)]
struct FakeState {
    scripts: HashMap<&'static str, VecDeque<Behaviour>>,
    defaults: HashMap<&'static str, Behaviour>,
    /// (method, idempotency key) of every call received, in order.
    calls: Vec<(&'static str, String)>,
    /// Authorize results by idempotency key: billing's idempotency, so a retried key gets
    /// the first result and no second payment.
    by_key: HashMap<String, Payment>,
    payments: HashMap<String, Payment>,
    voided_orders: Vec<String>,
}

/// A scriptable `PaymentService`: each method follows its script (a queue of behaviours),
/// then its default (Ok unless set).
#[derive(Debug, Clone, Default)]
pub struct FakeBilling {
    state: Arc<Mutex<FakeState>>,
}

impl FakeBilling {
    /// Next calls of `method` ("authorize", "capture", "void", "get") behave like this.
    pub fn script(&self, method: &'static str, behaviours: &[Behaviour]) -> &Self {
        let mut s = self.state.lock().unwrap();
        s.scripts
            .entry(method)
            .or_default()
            .extend(behaviours.iter().cloned());
        self
    }

    /// Every call of `method` after the script behaves like this.
    pub fn otherwise(&self, method: &'static str, behaviour: Behaviour) -> &Self {
        self.state
            .lock()
            .unwrap()
            .defaults
            .insert(method, behaviour);
        self
    }

    /// The keys of calls to `method` received so far.
    pub fn calls(&self, method: &str) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.calls
            .iter()
            .filter(|(m, _)| *m == method)
            .map(|(_, k)| k.clone())
            .collect()
    }

    /// Payments created (authorizations), however often Authorize was called.
    pub fn payments(&self) -> Vec<Payment> {
        self.state
            .lock()
            .unwrap()
            .payments
            .values()
            .cloned()
            .collect()
    }

    /// Order ids voided by order (no payment id given).
    pub fn voided_orders(&self) -> Vec<String> {
        self.state.lock().unwrap().voided_orders.clone()
    }

    /// Serves the fake on 127.0.0.1:0; returns its URL.
    pub async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let service = PaymentServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        format!("http://{addr}")
    }

    fn next(&self, method: &'static str, key: &str) -> Behaviour {
        let mut s = self.state.lock().unwrap();
        s.calls.push((method, key.to_owned()));
        if let Some(b) = s.scripts.get_mut(method).and_then(VecDeque::pop_front) {
            return b;
        }
        s.defaults.get(method).cloned().unwrap_or(Behaviour::Ok)
    }

    fn with_payment<T>(&self, id: &str, f: impl FnOnce(&mut Payment) -> T) -> Result<T, Status> {
        let mut s = self.state.lock().unwrap();
        let p = s
            .payments
            .get_mut(id)
            .ok_or_else(|| Status::not_found("payment not found"))?;
        Ok(f(p))
    }
}

async fn hang<T>() -> T {
    std::future::pending().await
}

#[tonic::async_trait]
impl PaymentService for FakeBilling {
    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<Payment>, Status> {
        let r = request.into_inner();
        let behaviour = self.next("authorize", &r.idempotency_key);
        let effect = |status: PaymentStatus, reason: &str| {
            let mut s = self.state.lock().unwrap();
            if let Some(p) = s.by_key.get(&r.idempotency_key) {
                return p.clone();
            }
            let p = Payment {
                payment_id: uuid::Uuid::new_v4().to_string(),
                order_id: r.order_id.clone(),
                amount: r.amount.clone(),
                status: status as i32,
                decline_reason: reason.to_owned(),
                version: 1,
            };
            s.by_key.insert(r.idempotency_key.clone(), p.clone());
            s.payments.insert(p.payment_id.clone(), p.clone());
            p
        };
        match behaviour {
            Behaviour::Ok => Ok(Response::new(effect(PaymentStatus::Authorized, ""))),
            Behaviour::Decline(reason) => {
                Ok(Response::new(effect(PaymentStatus::Declined, reason)))
            }
            Behaviour::Fail(code) => Err(Status::new(code, "scripted failure")),
            Behaviour::Hang => hang().await,
            Behaviour::OkThenHang => {
                effect(PaymentStatus::Authorized, "");
                hang().await
            }
        }
    }

    async fn capture(&self, request: Request<CaptureRequest>) -> Result<Response<Payment>, Status> {
        let r = request.into_inner();
        match self.next("capture", &r.idempotency_key) {
            Behaviour::Ok | Behaviour::Decline(_) => {
                let p = self.with_payment(&r.payment_id, |p| {
                    p.status = PaymentStatus::CapturePending as i32;
                    p.clone()
                })?;
                Ok(Response::new(p))
            }
            Behaviour::Fail(code) => Err(Status::new(code, "scripted failure")),
            Behaviour::Hang => hang().await,
            Behaviour::OkThenHang => {
                self.with_payment(&r.payment_id, |p| {
                    p.status = PaymentStatus::CapturePending as i32;
                })?;
                hang().await
            }
        }
    }

    async fn void(&self, request: Request<VoidRequest>) -> Result<Response<Payment>, Status> {
        let r = request.into_inner();
        match self.next("void", &r.idempotency_key) {
            Behaviour::Fail(code) => return Err(Status::new(code, "scripted failure")),
            Behaviour::Hang | Behaviour::OkThenHang => return hang().await,
            Behaviour::Ok | Behaviour::Decline(_) => {}
        }
        let void = |p: &mut Payment| -> Result<Payment, Status> {
            match PaymentStatus::try_from(p.status) {
                Ok(PaymentStatus::CapturePending | PaymentStatus::Captured) => Err(
                    Status::failed_precondition("cannot void a captured payment"),
                ),
                Ok(PaymentStatus::Declined) => Ok(p.clone()),
                _ => {
                    p.status = PaymentStatus::Voided as i32;
                    Ok(p.clone())
                }
            }
        };
        if r.payment_id.is_empty() {
            let mut s = self.state.lock().unwrap();
            s.voided_orders.push(r.order_id.clone());
            for p in s.payments.values_mut().filter(|p| p.order_id == r.order_id) {
                void(p)?;
            }
            return Ok(Response::new(Payment {
                order_id: r.order_id,
                status: PaymentStatus::Voided as i32,
                ..Default::default()
            }));
        }
        let p = self.with_payment(&r.payment_id, void)??;
        Ok(Response::new(p))
    }

    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<Payment>, Status> {
        let r = request.into_inner();
        self.next("get", &r.payment_id);
        let p = self.with_payment(&r.payment_id, |p| p.clone())?;
        Ok(Response::new(p))
    }
}

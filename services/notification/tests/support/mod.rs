//! What notification's integration tests share: the service started in-process on a test's
//! own database and vhost, journey events published as checkout does, API keys issued as an
//! operator does, and webhook receivers on loopback that behave as told.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use keel_testkit::{TestBroker, TestDb, TestVhost};
use notification::{App, Config};
use serde_json::json;
use sqlx::{Connection as _, PgConnection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub const WAIT: Duration = Duration::from_secs(20);
pub const QUEUE: &str = "notification.events";

/// The service, running in this test's runtime until [`Running::stop`].
pub struct Running {
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    pub addr: SocketAddr,
}

impl Running {
    /// notification with `config` (see [`service_config`]).
    pub async fn start_with(config: Config) -> Self {
        let app = App::build(config).await.unwrap();
        let addr = app.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            shutdown: Some(tx),
            task,
            addr,
        }
    }

    /// Graceful shutdown: the workers finish or hand back the jobs in flight.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("service stops in time")
            .unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// notification's configuration for one test: port 0, quick polls and backoffs, this test's
/// database, broker and SMTP port, then `extra` (`KEEL_*` overrides).
pub fn service_config(
    db: &TestDb,
    vhost: &TestVhost,
    smtp_port: u16,
    extra: &[(&str, &str)],
) -> Config {
    let (app, owner, amqp, port) = (
        db.app_url(),
        db.owner_url(),
        vhost.url(),
        smtp_port.to_string(),
    );
    let base = [
        ("KEEL_HTTP__PORT", "0"),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
        ("KEEL_DATABASE__URL", app.as_str()),
        ("KEEL_DATABASE__MIGRATE_URL", owner.as_str()),
        ("KEEL_AMQP__URL", amqp.as_str()),
        ("KEEL_AMQP__MAX_BACKOFF", "200ms"),
        ("KEEL_CONSUMER__RETRY_MAX_BACKOFF", "200ms"),
        ("KEEL_RELAY__POLL_INTERVAL", "20ms"),
        ("KEEL_EMAIL__SMTP_HOST", "127.0.0.1"),
        ("KEEL_EMAIL__SMTP_PORT", port.as_str()),
        ("KEEL_EMAIL__TIMEOUT", "5s"),
        ("KEEL_EMAIL__POLL_INTERVAL", "20ms"),
        ("KEEL_EMAIL__RETRY_BASE", "20ms"),
        ("KEEL_EMAIL__RETRY_MAX", "100ms"),
        ("KEEL_WEBHOOKS__POLL_INTERVAL", "20ms"),
    ];
    let all: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
    keel_testkit::config(notification::DEFAULT_CONFIG, &all)
}

/// A loopback port nothing listens on: bound by the OS, then closed.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    listener.local_addr().unwrap().port()
}

/// A final order event (`checkout.order.<state>`) for `customer_id`: (message id, body).
pub fn order_event(order_id: Uuid, customer_id: &str, state: &str) -> (String, Vec<u8>) {
    let id = Uuid::now_v7();
    let body = json!({
        "id": id,
        "type": format!("checkout.order.{}", state.to_ascii_lowercase()),
        "schema_version": 1,
        "aggregate_id": order_id.to_string(),
        "occurred_at": Utc::now().to_rfc3339(),
        "data": {
            "order_id": order_id,
            "customer_id": customer_id,
            "state": state,
            "total_minor": 4200,
            "currency": "EUR",
            "reason": null,
        }
    });
    (id.to_string(), serde_json::to_vec(&body).unwrap())
}

/// Publishes one confirmed order for `customer_id`, `copies` times; returns the order id.
pub async fn publish_confirmed(broker: &TestBroker, customer_id: &str, copies: usize) -> Uuid {
    let order = Uuid::new_v4();
    let (id, body) = order_event(order, customer_id, "CONFIRMED");
    for _ in 0..copies {
        broker.publish("checkout.order.confirmed", &id, &body).await;
    }
    order
}

pub async fn admin(db: &TestDb) -> PgConnection {
    PgConnection::connect(&db.admin_url()).await.unwrap()
}

/// An API key for `customer` on notification's API, issued as `keelctl api-keys create
/// --service notification` issues it (as the operator role).
pub async fn api_key(db: &TestDb, customer: &str) -> String {
    let mut operator = PgConnection::connect(&db.operator_url()).await.unwrap();
    let issued = keel_pg::api_keys::issue(&mut operator, customer)
        .await
        .unwrap();
    let _ = operator.close().await;
    issued.expose().to_owned()
}

/// A counter or histogram count of this process's metrics (nextest runs each test in its own
/// process, so they are this test's).
pub fn metric(line_prefix: &str) -> f64 {
    keel_telemetry::metrics_handle()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// How a test receiver answers.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// 200 at once.
    Healthy,
    /// 200 after this long.
    Slow(Duration),
    /// Accepts the connection and never answers (the sender's timeout ends it).
    Dead,
    /// These statuses in turn for the first requests, then 200.
    Statuses(&'static [u16]),
    /// Flapping: the first request of each `webhook-id` is answered 503, the next 200 (down
    /// for every new event, up for its retry).
    Flapping,
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: DateTime<Utc>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

/// A webhook receiver on `127.0.0.1:0`, stopped when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    task: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Arc<Mutex<Vec<Received>>> = Arc::new(Mutex::new(Vec::new()));
        let task = match behaviour {
            Behaviour::Dead => tokio::spawn(async move {
                // Hold every connection open, unanswered; the sockets close with the task.
                let mut held = Vec::new();
                while let Ok((socket, _)) = listener.accept().await {
                    if held.len() < 1000 {
                        held.push(socket);
                    }
                }
            }),
            _ => {
                let log = received.clone();
                let app = axum::Router::new().route(
                    "/hook",
                    axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                        let log = log.clone();
                        async move {
                            let at = Utc::now();
                            let id = headers.get("webhook-id").cloned();
                            let (n, seen) = {
                                let mut log = log.lock().unwrap();
                                let seen = log
                                    .iter()
                                    .filter(|r| r.headers.get("webhook-id") == id.as_ref())
                                    .count();
                                log.push(Received { at, headers, body });
                                (log.len(), seen)
                            };
                            match behaviour {
                                Behaviour::Slow(d) => tokio::time::sleep(d).await,
                                Behaviour::Statuses(list) => {
                                    if let Some(s) = list.get(n - 1) {
                                        return StatusCode::from_u16(*s).unwrap();
                                    }
                                }
                                Behaviour::Flapping if seen == 0 => {
                                    return StatusCode::SERVICE_UNAVAILABLE;
                                }
                                _ => {}
                            }
                            StatusCode::OK
                        }
                    }),
                );
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                })
            }
        };
        Self {
            addr,
            received,
            task,
        }
    }

    /// The URL deliveries go to.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// Registers an endpoint through the API with `key`; returns (id, secret).
pub async fn register(app: &Running, key: &str, url: &str, event_types: &[&str]) -> (Uuid, String) {
    let response = reqwest::Client::new()
        .post(app.url("/v1/webhook-endpoints"))
        .bearer_auth(key)
        .json(&json!({"url": url, "event_types": event_types}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    let body: serde_json::Value = response.json().await.unwrap();
    (
        body["id"].as_str().unwrap().parse().unwrap(),
        body["secret"].as_str().unwrap().to_owned(),
    )
}

//! notification: turns journey events into customer notifications.
//!
//! One process, four parts sharing one lifecycle:
//! - the idempotent consumer (P03, [`notifications::events`]) on its own durable quorum queue
//!   bound to `checkout.order.*` and `billing.payment.*`;
//! - the outbox relay (P02, `keel_amqp::relay`) publishing `notification.notification.recorded`;
//! - the HTTP API (`GET /v1/notifications?order_id=`, [`notifications::api`]) on the Keel
//!   stack (8082), with health and metrics;
//! - a supervised RabbitMQ connection whose state is part of readiness (P21).
//!
//! Shutdown order (P20): stop accepting HTTP and stop consuming, let in-flight messages
//! finish and settle, stop the relay, close the broker connection, close the pool.
//! Deliveries of real emails and signed customer webhooks (P33) come in step 3.

pub mod notifications;

use std::future::Future;
use std::net::SocketAddr;

use keel_amqp::{AmqpConfig, Broker, ConsumerConfig, RelayConfig};
use keel_config::{ConfigError, Validate, ensure_range};
use keel_http::shutdown::{Drained, close_within};
use keel_http::{Health, HttpConfig, Lifecycle};
use keel_pg::DatabaseConfig;
use keel_telemetry::{LagMonitor, TelemetryConfig};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::notifications::api::{self, ApiState};
use crate::notifications::events;

/// The checked-in defaults, embedded.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// Migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// notification's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub database: DatabaseConfig,
    pub amqp: AmqpConfig,
    pub consumer: ConsumerConfig,
    pub relay: RelayConfig,
    pub api: ApiConfig,
    pub telemetry: TelemetryConfig,
}

/// `[api]`: bounds of the HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Most notifications returned for one order.
    pub list_limit: u16,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.database.validate()?;
        self.amqp.validate()?;
        self.consumer.validate()?;
        self.relay.validate()?;
        ensure_range("api.list_limit", self.api.list_limit, 1, 1000)?;
        self.telemetry.validate()
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Database(#[from] keel_pg::PgError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Applies migrations as the owner role over a direct connection.
pub async fn migrate(config: &Config) -> Result<(), AppError> {
    keel_pg::migrate(&config.database, "notification-migrate", &MIGRATOR).await?;
    Ok(())
}

/// A bound, not yet running notification service.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    lifecycle: Lifecycle,
    pool: PgPool,
    broker: Broker,
    consumer: ConsumerConfig,
    relay: RelayConfig,
}

impl App {
    /// Binds the listener, creates the lazy pool and starts the broker supervisor.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let addr = config.http.addr();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { addr, source })?;
        let pool = keel_pg::runtime_pool(&config.database, "notification")?;
        let health = Health::new(config.http.readiness_timeout);
        let lifecycle = Lifecycle::new(health.clone(), &config.http);
        let lag = LagMonitor::spawn(config.telemetry.lag_probe_interval, lifecycle.stop_token());
        health.watch_runtime_lag(lag, config.telemetry.max_runtime_lag);
        let db = pool.clone();
        health.add_check("postgres", move || {
            let db = db.clone();
            async move { keel_pg::ping(&db).await }
        });
        // The broker connection has its own stop token: it must outlive the HTTP listener
        // (in-flight work may still publish or ack) and is closed last.
        let broker = Broker::spawn(config.amqp.clone(), "notification", Default::default());
        let b = broker.clone();
        health.add_check("rabbitmq", move || {
            let b = b.clone();
            async move {
                if b.is_connected().await {
                    Ok(())
                } else {
                    Err("not connected".to_owned())
                }
            }
        });
        let routes = api::routes(ApiState {
            pool: pool.clone(),
            list_limit: i64::from(config.api.list_limit),
        });
        let router = keel_http::stack::build(routes, health, &config.http);
        tracing::info!(addr = %listener.local_addr()?, "listening");
        Ok(Self {
            listener,
            router,
            lifecycle,
            pool,
            broker,
            consumer: config.consumer,
            relay: config.relay,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Starts the consumer and the relay, serves until `signal`, then shuts down in order:
    /// HTTP and consuming stop together, in-flight messages settle, the relay stops, the
    /// broker connection and the pool close.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, AppError> {
        // Consuming stops when the listeners stop accepting (after the drain delay).
        let stop = self.lifecycle.stop_token();
        let pool = self.pool.clone();
        let consumer = keel_amqp::consumer::spawn(
            self.broker.clone(),
            self.consumer,
            &events::BINDINGS,
            move |msg| events::handle(pool.clone(), msg),
            stop,
        );
        // The relay stops only after the consumer: in-flight messages still write outbox rows
        // (they would wait for the next start otherwise, which is safe but slower).
        let relay_stop = CancellationToken::new();
        let relay = keel_amqp::relay::spawn(
            self.pool.clone(),
            self.broker.clone(),
            self.relay,
            relay_stop.clone(),
        );

        let drained = self
            .lifecycle
            .run_http(self.listener, self.router, signal)
            .await;
        close_within("amqp consumer", async {
            let _ = consumer.await;
        })
        .await;
        relay_stop.cancel();
        close_within("outbox relay", async {
            let _ = relay.await;
        })
        .await;
        close_within("rabbitmq connection", self.broker.close()).await;
        close_within("postgres pool", self.pool.close()).await;
        tracing::info!(?drained, "stopped");
        Ok(drained)
    }
}

//! notification: turns journey events into customer notifications.
//!
//! In this step it is the skeleton every later capability hangs on: the Keel HTTP stack on
//! 8082, its own database (through pgbouncer), and a supervised RabbitMQ connection whose
//! state is part of readiness — the consumer, inbox (P03) and deliveries (P33) come next.

use std::future::Future;
use std::net::SocketAddr;

use keel_amqp::{AmqpConfig, Broker};
use keel_config::{ConfigError, Validate};
use keel_http::shutdown::Drained;
use keel_http::{Health, HttpConfig, Lifecycle};
use keel_pg::DatabaseConfig;
use keel_telemetry::{LagMonitor, TelemetryConfig};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::net::TcpListener;

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
    pub telemetry: TelemetryConfig,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.database.validate()?;
        self.amqp.validate()?;
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
        let router = keel_http::stack::build(axum::Router::new(), health, &config.http);
        tracing::info!(addr = %listener.local_addr()?, "listening");
        Ok(Self {
            listener,
            router,
            lifecycle,
            pool,
            broker,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `signal`, drains, then closes the broker connection and the pool.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, AppError> {
        let drained = self
            .lifecycle
            .run_http(self.listener, self.router, signal)
            .await;
        keel_http::shutdown::close_within("rabbitmq connection", self.broker.close()).await;
        keel_http::shutdown::close_within("postgres pool", self.pool.close()).await;
        tracing::info!(?drained, "stopped");
        Ok(drained)
    }
}

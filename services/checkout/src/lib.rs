//! checkout: the orders API, saga orchestrator, stock and catalogue.
//!
//! [`App::build`] binds the listener (port 0 in tests) and wires every capability;
//! [`App::run`] serves until the shutdown signal and then drains (P20). Tests start the `App`
//! in-process; process-level tests start the real binary.
//!
//! Capabilities, one module each:
//! - [`catalogue`]: `GET /v1/products`, read from Postgres through pgbouncer.
//! - [`stock`]: reservations without oversell or deadlocks (P11).

pub mod catalogue;
pub mod error;
pub mod money;
pub mod stock;

use std::future::Future;
use std::net::SocketAddr;

use keel_config::{ConfigError, Validate};
use keel_http::shutdown::Drained;
use keel_http::{Health, HttpConfig, Lifecycle};
use keel_pg::DatabaseConfig;
use keel_telemetry::{LagMonitor, TelemetryConfig};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::net::TcpListener;

/// The checked-in defaults (`config/default.toml`), embedded so the binary runs anywhere.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// Migrations, embedded; `checkout migrate` and the test kit's template database run them.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// checkout's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub database: DatabaseConfig,
    pub telemetry: TelemetryConfig,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.database.validate()?;
        self.telemetry.validate()
    }
}

/// Why the service could not start or stop cleanly.
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
    keel_pg::migrate(&config.database, "checkout-migrate", &MIGRATOR).await?;
    Ok(())
}

/// A built, bound, not yet running checkout.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    lifecycle: Lifecycle,
    pool: PgPool,
}

impl App {
    /// Binds the listener and wires the capabilities. Connects to nothing yet: dependencies
    /// are reached lazily and reported by `/readyz`, so the process starts (and `/livez`
    /// answers) while a dependency is down.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let addr = config.http.addr();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { addr, source })?;
        let pool = keel_pg::runtime_pool(&config.database, "checkout")?;

        let health = Health::new(config.http.readiness_timeout);
        let lifecycle = Lifecycle::new(health.clone(), &config.http);
        let lag = LagMonitor::spawn(config.telemetry.lag_probe_interval, lifecycle.stop_token());
        health.watch_runtime_lag(lag, config.telemetry.max_runtime_lag);
        let db = pool.clone();
        health.add_check("postgres", move || {
            let db = db.clone();
            async move { keel_pg::ping(&db).await }
        });

        let routes = catalogue::routes(pool.clone());
        let router = keel_http::stack::build(routes, health, &config.http);
        tracing::info!(addr = %listener.local_addr()?, "listening");
        Ok(Self {
            listener,
            router,
            lifecycle,
            pool,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `signal`, drains, then closes the pool.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, AppError> {
        let drained = self
            .lifecycle
            .run_http(self.listener, self.router, signal)
            .await;
        keel_http::shutdown::close_within("postgres pool", self.pool.close()).await;
        tracing::info!(?drained, "stopped");
        Ok(drained)
    }
}

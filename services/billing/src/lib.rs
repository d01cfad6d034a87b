//! billing: payments over gRPC, the event-sourced ledger, the payment-provider client.
//!
//! Two listeners, one lifecycle: gRPC on 50051 (the payments API, and `grpc.health.v1` so
//! Kubernetes gRPC probes work) and HTTP on 8081 (health, metrics, and later the payment
//! provider's webhook). Both stop accepting at the same moment of the shutdown sequence (P20).
//!
//! Capabilities, one module each:
//! - [`grpc_health`]: `grpc.health.v1`, answering from the same readiness state as `/readyz`.

pub mod grpc_health;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};

use keel_config::{ConfigError, Validate};
use keel_contracts::grpc_health_v1::health_server::HealthServer;
use keel_http::shutdown::Drained;
use keel_http::{Health, HttpConfig, Lifecycle};
use keel_pg::DatabaseConfig;
use keel_telemetry::{LagMonitor, TelemetryConfig};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// The checked-in defaults, embedded.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// Migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// `[grpc]`: where the gRPC API listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    pub host: IpAddr,
    /// 0 picks a free port (tests).
    pub port: u16,
}

/// billing's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
    pub database: DatabaseConfig,
    pub telemetry: TelemetryConfig,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        if self.grpc.port != 0
            && self.grpc.port == self.http.port
            && self.grpc.host == self.http.host
        {
            return Err(ConfigError::invalid(
                "grpc.port",
                "must differ from http.port",
            ));
        }
        self.database.validate()?;
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
    keel_pg::migrate(&config.database, "billing-migrate", &MIGRATOR).await?;
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { addr, source })
}

/// A bound, not yet running billing.
#[derive(Debug)]
pub struct App {
    http: TcpListener,
    grpc: TcpListener,
    router: axum::Router,
    health: Health,
    lifecycle: Lifecycle,
    pool: PgPool,
}

impl App {
    /// Binds both listeners and wires the capabilities.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let http = bind(config.http.addr()).await?;
        let grpc = bind((config.grpc.host, config.grpc.port).into()).await?;
        let pool = keel_pg::runtime_pool(&config.database, "billing")?;
        let health = Health::new(config.http.readiness_timeout);
        let lifecycle = Lifecycle::new(health.clone(), &config.http);
        let lag = LagMonitor::spawn(config.telemetry.lag_probe_interval, lifecycle.stop_token());
        health.watch_runtime_lag(lag, config.telemetry.max_runtime_lag);
        let db = pool.clone();
        health.add_check("postgres", move || {
            let db = db.clone();
            async move { keel_pg::ping(&db).await }
        });
        let router = keel_http::stack::build(axum::Router::new(), health.clone(), &config.http);
        tracing::info!(addr = %http.local_addr()?, grpc_addr = %grpc.local_addr()?, "listening");
        Ok(Self {
            http,
            grpc,
            router,
            health,
            lifecycle,
            pool,
        })
    }

    /// The bound HTTP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// Serves both listeners until `signal`, drains, then closes the pool.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, AppError> {
        let http = self.lifecycle.serve_http(self.http, self.router);
        let stop = self.lifecycle.stop_token();
        let grpc_health = grpc_health::GrpcHealth::new(self.health.clone());
        let grpc = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(HealthServer::new(grpc_health))
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(self.grpc),
                    stop.cancelled_owned(),
                )
                .await
                .map_err(std::io::Error::other)
        });
        self.lifecycle.drain_on(signal).await;
        let drained = self.lifecycle.finish(vec![http, grpc]).await;
        keel_http::shutdown::close_within("postgres pool", self.pool.close()).await;
        tracing::info!(?drained, "stopped");
        Ok(drained)
    }
}

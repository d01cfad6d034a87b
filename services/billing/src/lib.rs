//! billing: payments over gRPC, the event-sourced ledger, the payment-provider client and
//! its signed webhook.
//!
//! Two listeners, one lifecycle: gRPC on 50051 (`keel.billing.v1.PaymentService`, and
//! `grpc.health.v1` so Kubernetes gRPC probes work) and HTTP on 8081 (health, metrics, and
//! the payment provider's webhook). Both stop accepting at the same moment of the shutdown
//! sequence (P20).
//!
//! Capabilities, one module each:
//! - [`payments`]: Authorize, Capture, Void, GetPayment — idempotency keys (P13), deadlines,
//!   gRPC status codes ([`payments::grpc`]).
//! - [`ledger`]: the event-sourced ledger (P10): append-only `payment_events` with optimistic
//!   concurrency, the `payments` projection, the outbox rows (P02), `rebuild-projections`.
//! - [`psp`]: the payment provider's client: bounded retries within the caller's deadline.
//! - [`webhook`]: the provider's signed webhook, replay-safe (P32).
//! - [`grpc_health`]: `grpc.health.v1`, answering from the same readiness state as `/readyz`.
//!
//! Payment events leave through the outbox (P02): the ledger writes them in its transaction
//! and `keel_amqp::relay` publishes them to `keel.events`. RabbitMQ is deliberately *not* a
//! readiness check here: while it is down billing keeps taking payments and the events wait
//! in the outbox, which is the point of the pattern.

pub mod grpc_health;
pub mod ledger;
pub mod payments;
pub mod psp;
pub mod webhook;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use keel_amqp::{AmqpConfig, Broker, RelayConfig};
use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use keel_contracts::billing_v1::payment_service_server::PaymentServiceServer;
use keel_contracts::grpc_health_v1::health_server::HealthServer;
use keel_http::shutdown::Drained;
use keel_http::{Health, HttpConfig, Lifecycle};
use keel_pg::DatabaseConfig;
use keel_telemetry::{LagMonitor, TelemetryConfig};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::payments::grpc::PaymentApi;
use crate::payments::{IdempotencyConfig, Payments};
use crate::psp::{PspClient, PspConfig};
use crate::webhook::{Verifier, WebhookConfig};

/// The checked-in defaults, embedded.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// Migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// `[grpc]`: where the gRPC API listens and how it treats deadlines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    pub host: IpAddr,
    /// 0 picks a free port (tests).
    pub port: u16,
    /// The longest a call may run: caps the caller's `grpc-timeout`, and is the deadline of
    /// a call that sets none (an unbounded call would hold its idempotency key forever).
    #[serde(with = "keel_config::duration")]
    pub max_deadline: Duration,
    /// Kept back from the caller's deadline for billing's own database work and the answer,
    /// so billing answers DEADLINE_EXCEEDED itself before the caller gives up.
    #[serde(with = "keel_config::duration")]
    pub deadline_reserve: Duration,
}

impl Validate for GrpcConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range("grpc.max_deadline (ms)", ms(self.max_deadline), 1, 300_000)?;
        ensure_range(
            "grpc.deadline_reserve (ms)",
            ms(self.deadline_reserve),
            0,
            10_000,
        )?;
        if self.deadline_reserve >= self.max_deadline {
            return Err(ConfigError::invalid(
                "grpc.deadline_reserve",
                "must be less than grpc.max_deadline",
            ));
        }
        Ok(())
    }
}

/// billing's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
    pub database: DatabaseConfig,
    pub psp: PspConfig,
    pub webhook: WebhookConfig,
    pub idempotency: IdempotencyConfig,
    pub amqp: AmqpConfig,
    pub relay: RelayConfig,
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
        self.grpc.validate()?;
        self.database.validate()?;
        self.psp.validate()?;
        self.webhook.validate()?;
        self.idempotency.validate()?;
        self.amqp.validate()?;
        self.relay.validate()?;
        // A key left in progress by a live call must never look abandoned.
        if self.idempotency.stale_after <= self.grpc.max_deadline {
            return Err(ConfigError::invalid(
                "idempotency.stale_after",
                "must exceed grpc.max_deadline",
            ));
        }
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
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("payment provider client: {0}")]
    Psp(#[from] reqwest::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Applies migrations as the owner role over a direct connection.
pub async fn migrate(config: &Config) -> Result<(), AppError> {
    keel_pg::migrate(&config.database, "billing-migrate", &MIGRATOR).await?;
    Ok(())
}

/// Rebuilds the `payments` projection from `payment_events` (`billing rebuild-projections`),
/// as the runtime role through the runtime pool: it needs only DML (see
/// [`ledger::projection`] for why it is one locked transaction).
pub async fn rebuild_projections(config: &Config) -> Result<ledger::Rebuilt, AppError> {
    let pool = keel_pg::runtime_pool(&config.database, "billing-rebuild")?;
    let rebuilt = ledger::rebuild(&pool).await;
    pool.close().await;
    let rebuilt = rebuilt?;
    tracing::info!(
        streams = rebuilt.streams,
        events = rebuilt.events,
        "projections rebuilt"
    );
    Ok(rebuilt)
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
    payments: PaymentApi,
    purge_interval: Duration,
    broker: Broker,
    relay: RelayConfig,
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
        // The relay and the broker connection outlive the listeners: events written by the
        // last in-flight requests are still published before the process exits.
        let broker = Broker::spawn(config.amqp.clone(), "billing", Default::default());
        let psp = PspClient::new(&config.psp)?;
        let payments = PaymentApi::new(
            Payments::new(pool.clone(), psp, config.idempotency.clone()),
            config.grpc.max_deadline,
            config.grpc.deadline_reserve,
        );
        let routes = webhook::router(pool.clone(), Verifier::new(&config.webhook)?);
        let router = keel_http::stack::build(routes, health.clone(), &config.http);
        tracing::info!(addr = %http.local_addr()?, grpc_addr = %grpc.local_addr()?, "listening");
        Ok(Self {
            http,
            grpc,
            router,
            health,
            lifecycle,
            pool,
            payments,
            purge_interval: config.idempotency.purge_interval,
            broker,
            relay: config.relay.clone(),
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

    /// Serves both listeners and runs the outbox relay until `signal`, drains, then stops the
    /// relay and closes the broker connection and the pool.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, AppError> {
        let http = self.lifecycle.serve_http(self.http, self.router);
        let stop = self.lifecycle.stop_token();
        let grpc_health = grpc_health::GrpcHealth::new(self.health.clone());
        let payments = self.payments;
        let grpc = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(HealthServer::new(grpc_health))
                .add_service(PaymentServiceServer::new(payments))
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(self.grpc),
                    stop.cancelled_owned(),
                )
                .await
                .map_err(std::io::Error::other)
        });
        let purge = payments::spawn_purge(
            self.pool.clone(),
            self.purge_interval,
            self.lifecycle.stop_token(),
        );
        // Its own token: the relay stops after the work that writes outbox rows.
        let relay_stop = tokio_util::sync::CancellationToken::new();
        let relay = keel_amqp::relay::spawn(
            self.pool.clone(),
            self.broker.clone(),
            self.relay.clone(),
            relay_stop.clone(),
        );
        self.lifecycle.drain_on(signal).await;
        let drained = self.lifecycle.finish(vec![http, grpc, purge]).await;
        relay_stop.cancel();
        keel_http::shutdown::close_within("outbox relay", async {
            let _ = relay.await;
        })
        .await;
        keel_http::shutdown::close_within("rabbitmq connection", self.broker.close()).await;
        keel_http::shutdown::close_within("postgres pool", self.pool.close()).await;
        tracing::info!(?drained, "stopped");
        Ok(drained)
    }
}

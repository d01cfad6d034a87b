//! billing: payments over gRPC, the event-sourced ledger, the payment-provider client and
//! its signed webhook.
//!
//! Two listeners, one lifecycle: gRPC on 50051 (`keel.billing.v1.PaymentService`, and
//! `grpc.health.v1` so Kubernetes gRPC probes work) and HTTP on 8081 (health, metrics, and
//! the payment provider's webhook). Both stop accepting at the same moment of the shutdown
//! sequence (P20). The gRPC server, its limits (`[grpc]`: calls per connection, message
//! sizes, HTTP/2 keepalive, the longest call) and its health service are the platform's
//! ([`keel_service::GrpcConfig`]); billing adds its API and applies the message sizes to it.
//!
//! Capabilities, one module each:
//! - [`payments`]: Authorize, Capture, Void, GetPayment — idempotency keys (P13), deadlines,
//!   gRPC status codes ([`payments::grpc`]).
//! - [`ledger`]: the event-sourced ledger (P10): append-only `payment_events` with optimistic
//!   concurrency, the `payments` projection, the outbox rows (P02), `rebuild-projections`.
//! - [`psp`]: the payment provider's client: bounded retries within the caller's deadline,
//!   bounded response bodies, encoded paths, a closed set of decline codes, redacted tokens.
//! - [`webhook`]: the provider's signed webhook, replay-safe (P32).
//!
//! Payment events leave through the outbox (P02): the ledger writes them in its transaction
//! and `keel_amqp::relay` publishes them to `keel.events`. RabbitMQ is deliberately *not* a
//! readiness check here: while it is down billing keeps taking payments and the events wait
//! in the outbox, which is the point of the pattern.

pub mod ledger;
pub mod payments;
pub mod psp;
pub mod webhook;

use std::future::Future;
use std::net::SocketAddr;

use keel_amqp::{AmqpConfig, RelayConfig};
use keel_config::{ConfigError, Validate};
use keel_contracts::billing_v1::payment_service_server::PaymentServiceServer;
use keel_http::HttpConfig;
use keel_pg::DatabaseConfig;
use keel_pg::retention::Policy;
pub use keel_service::GrpcConfig;
use keel_service::{BrokerReadiness, Drained, Health, Service, ServiceError, ShutdownConfig};
use keel_telemetry::TelemetryConfig;
use serde::Deserialize;

use crate::payments::grpc::PaymentApi;
use crate::payments::{IdempotencyConfig, Payments};
use crate::psp::{PspClient, PspConfig};
use crate::webhook::{Verifier, WebhookConfig};

/// The checked-in configuration, embedded so the binary runs anywhere: `config/default.toml`
/// (no secret) and the development profile `config/dev.toml` (`KEEL_PROFILE=dev` only).
pub const DEFAULT_CONFIG: keel_config::Embedded = keel_config::embed!();

/// Migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// billing's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
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
        self.shutdown.validate()?;
        self.shutdown
            .ensure_grace_covers("http.request_timeout", self.http.request_timeout)?;
        // Not grpc.max_deadline (30 s, a slow provider's worst case): a call cut by the grace
        // period is retried by the saga with the same idempotency key, and resumes once.
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

/// Why billing could not start, or an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Database(#[from] keel_pg::PgError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("payment provider client: {0}")]
    Psp(#[from] reqwest::Error),
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

/// A bound, not yet running billing.
#[derive(Debug)]
pub struct App {
    service: Service,
    http: SocketAddr,
    grpc: SocketAddr,
}

impl App {
    /// Binds both listeners and wires the capabilities; starts nothing.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let mut service =
            Service::new("billing", &config.http, &config.shutdown, &config.telemetry);
        let pool = service.postgres(&config.database)?;
        // The platform purges its tables; billing adds its webhook receipts, through the one
        // function billing_app may call on them (migration 0004: never a recent receipt).
        service.retain(Policy::function(
            "webhook_receipts",
            "purge_webhook_receipts",
            config.webhook.receipts_kept,
        ))?;
        // Payment events go through the outbox, whose rows wait for the broker: billing keeps
        // taking payments while RabbitMQ is down, so it is no readiness check.
        let broker = service.broker(&config.amqp, BrokerReadiness::NotRequired);
        service.relay(&pool, &broker, &config.relay);

        let psp = PspClient::new(&config.psp)?;
        let payments = PaymentApi::new(
            Payments::new(pool.clone(), psp, config.idempotency.clone()),
            config.grpc.max_deadline,
            config.grpc.deadline_reserve,
        );
        let payments = config
            .grpc
            .limit(PaymentServiceServer::new(payments), |s, read, write| {
                s.max_decoding_message_size(read)
                    .max_encoding_message_size(write)
            });
        let grpc = service
            .grpc(&config.grpc, tonic::service::Routes::new(payments))
            .await?;
        let http = service
            .http(webhook::router(pool, Verifier::new(&config.webhook)?))
            .await?;
        Ok(Self {
            service,
            http,
            grpc,
        })
    }

    /// The bound HTTP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.http
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
    }

    /// The health registry behind `/readyz` and `grpc.health.v1` (add a check of your own).
    pub fn health(&self) -> &Health {
        self.service.health()
    }

    /// Runs until `signal`, then stops in stages (keel_service): HTTP and gRPC together, the
    /// retention worker, the relay (publishes the events in-flight calls wrote), broker, pool.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, ServiceError> {
        self.service.run(signal).await
    }
}

/// billing's command line (`billing serve|migrate|check-config|rebuild-projections`).
#[derive(Debug)]
pub struct Billing;

impl keel_service::ServiceMain for Billing {
    const NAME: &'static str = "billing";
    const ABOUT: &'static str = "Keel billing: payments over gRPC on an event-sourced ledger";
    const DEFAULT_CONFIG: keel_config::Embedded = DEFAULT_CONFIG;
    type Config = Config;

    fn telemetry(config: &Config) -> &TelemetryConfig {
        &config.telemetry
    }

    fn migrations(config: &Config) -> Option<(&DatabaseConfig, &'static sqlx::migrate::Migrator)> {
        Some((&config.database, &MIGRATOR))
    }

    async fn serve(
        config: Config,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        App::build(config).await?.run(signal).await?;
        Ok(())
    }

    fn commands() -> Vec<clap::Command> {
        vec![clap::Command::new("rebuild-projections").about(
            "Rebuild the payments projection from the ledger's events (P10), in one \
             transaction; safe while billing runs (writers wait, readers don't)",
        )]
    }

    async fn command(name: &str, _: &clap::ArgMatches, config: Config) -> anyhow::Result<()> {
        match name {
            "rebuild-projections" => rebuild_projections(&config).await.map(|_| ())?,
            other => anyhow::bail!("no such command: {other}"),
        }
        Ok(())
    }
}

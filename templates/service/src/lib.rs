//! skeleton: a Keel service made from the template (`make new-service`).
//!
//! Capabilities, one module each:
//! - [`items`]: the example resource: `POST /v1/items` (idempotent, P13), `GET /v1/items/{id}`;
//!   every new item is announced as `skeleton.item.created` through the outbox (P02);
//! - [`history`]: the idempotent consumer (P03) on its own durable quorum queue, recording
//!   every item event it hears (the inbox makes a redelivery harmless).
//!
//! [`config`] is the typed configuration, [`error`] the one HTTP error type. The process
//! itself (readiness, staged shutdown, command line) is `keel_service`'s: this file only says
//! what skeleton has and how its parts connect. Adding a capability is a module, its section
//! in [`config`], and one or two lines in [`App::build`] (see docs/new-service.md).

pub mod config;
pub mod error;
pub mod history;
pub mod items;

use std::future::Future;
use std::net::SocketAddr;

use keel_pg::DatabaseConfig;
use keel_service::{BrokerReadiness, Drained, Service, ServiceError};
use keel_telemetry::TelemetryConfig;

pub use crate::config::Config;
use crate::items::api::ItemsState;

/// The service's name: its binary, its connection and application name everywhere.
pub const NAME: &str = "skeleton";

/// The checked-in configuration, embedded so the binary runs anywhere: `config/default.toml`
/// (no secret) and the development profile `config/dev.toml` (`KEEL_PROFILE=dev` only).
pub const DEFAULT_CONFIG: keel_config::Embedded = keel_config::embed!();

/// skeleton's own migrations, embedded; `skeleton migrate` applies the platform's tables first
/// (`keel_pg::migrate`), then these.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A built, not yet running skeleton service.
#[derive(Debug)]
pub struct App {
    service: Service,
    addr: SocketAddr,
}

impl App {
    /// Wires the capabilities; binds the listener; starts nothing (see `keel_service`).
    pub async fn build(config: Config) -> Result<Self, ServiceError> {
        let mut service = Service::new(NAME, &config.http, &config.shutdown, &config.telemetry);
        let pool = service.postgres(&config.database)?;
        // It consumes, so it is useless without the broker: the connection gates readiness.
        let broker = service.broker(&config.amqp, BrokerReadiness::Required);
        let consumer_pool = pool.clone();
        service.amqp_consumer(
            "item history",
            &broker,
            &config.consumer,
            &history::BINDINGS,
            move |msg| history::handle(consumer_pool.clone(), msg),
        );
        service.relay(&pool, &broker, &config.relay);
        let addr = service
            .http(items::api::routes(ItemsState {
                pool,
                config: config.items.clone(),
            }))
            .await?;
        Ok(Self { service, addr })
    }

    /// The bound HTTP address (port 0 in tests picks a free one).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs until `signal`, then stops in stages: HTTP requests finish, the consumer settles
    /// its messages, the relay publishes what they wrote, the broker closes, the pool closes.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, ServiceError> {
        self.service.run(signal).await
    }
}

/// skeleton's command line (`skeleton serve|migrate|check-config`). Named with a suffix, not
/// the bare `Skeleton`: a service's camel-cased name could be one of this file's own names
/// (`App`, `Config`) or the prelude's (`Result`), which the generator cannot rename around.
#[derive(Debug)]
pub struct SkeletonService;

impl keel_service::ServiceMain for SkeletonService {
    const NAME: &'static str = NAME;
    const ABOUT: &'static str = "skeleton: items in, item events out (a Keel service)";
    const DEFAULT_CONFIG: keel_config::Embedded = DEFAULT_CONFIG;
    type Config = Config;

    fn telemetry(config: &Config) -> &TelemetryConfig {
        &config.telemetry
    }

    fn migrations(config: &Config) -> Option<(&DatabaseConfig, &'static sqlx::migrate::Migrator)> {
        Some((&config.database, &MIGRATOR))
    }

    /// Its queue, tiers and DLQ: what the RabbitMQ definitions file must hold for it.
    fn queues(config: &Config) -> Vec<keel_amqp::topology::QueueSpec> {
        vec![config.consumer.queue_spec(&history::BINDINGS)]
    }

    async fn serve(
        config: Config,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        App::build(config).await?.run(signal).await?;
        Ok(())
    }
}

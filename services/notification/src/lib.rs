//! notification: turns journey events into customer notifications.
//!
//! Capabilities, one module each:
//! - [`journey_events`]: the idempotent consumer (P03) on its own durable quorum queue, bound
//!   to `checkout.order.*` and `billing.payment.*`: which events become notifications;
//! - [`customer_notifications`]: what a customer is told, and the table it is kept in; each
//!   one is announced as `notification.notification.recorded` through the outbox (P02);
//! - [`email`]: each notification emailed to the customer over SMTP, through a job on the
//!   Postgres queue enqueued with it (P08, P33; at-least-once email);
//! - [`webhooks`]: customer webhooks: endpoints registered through the API, each notification
//!   delivered signed (Standard Webhooks) by a worker that isolates endpoints from each other
//!   (P33, P25);
//! - [`api`]: `GET /v1/notifications?order_id=` on the Keel HTTP stack (8082), with health
//!   and metrics; its failures are [`error::ApiError`] problem documents.
//!
//! [`config`] is the typed configuration. The process itself (readiness, staged shutdown,
//! command line) is `keel_service`'s: this file only says what notification has and how its
//! parts connect, so a service made from this one starts by reading [`App::build`].

pub mod api;
pub mod config;
pub mod customer_notifications;
pub mod email;
pub mod error;
pub mod journey_events;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;

use keel_pg::DatabaseConfig;
use keel_service::{BrokerReadiness, Drained, Service, ServiceError};
use keel_telemetry::TelemetryConfig;

use crate::api::ApiState;
pub use crate::config::Config;

/// The checked-in configuration, embedded so the binary runs anywhere: `config/default.toml`
/// (no secret) and the development profile `config/dev.toml` (`KEEL_PROFILE=dev` only).
pub const DEFAULT_CONFIG: keel_config::Embedded = keel_config::embed!();

/// notification's own migrations, embedded; `notification migrate` applies the platform's
/// tables first (`keel_pg::migrate`), then these.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The queues notification consumes, with their tiers and DLQs, as `config` declares them:
/// what `infra/rabbitmq/definitions.json` must hold for this service (checked by
/// `e2e/tests/rabbitmq_definitions.rs`).
pub fn queues(config: &Config) -> Vec<keel_amqp::topology::QueueSpec> {
    vec![config.consumer.queue_spec(&journey_events::BINDINGS)]
}

/// A built, not yet running notification service.
#[derive(Debug)]
pub struct App {
    service: Service,
    addr: SocketAddr,
}

impl App {
    /// Wires the capabilities; binds the listener; starts nothing (see `keel_service`).
    pub async fn build(config: Config) -> Result<Self, ServiceError> {
        let mut service = Service::new(
            "notification",
            &config.http,
            &config.shutdown,
            &config.telemetry,
        );
        let pool = service.postgres(&config.database)?;
        // A consumer is useless without the broker: it gates readiness.
        let broker = service.broker(&config.amqp, BrokerReadiness::Required);
        let consumer_pool = pool.clone();
        service.amqp_consumer(
            "journey events",
            &broker,
            &config.consumer,
            &journey_events::BINDINGS,
            move |msg| journey_events::handle(consumer_pool.clone(), msg),
        );
        // The email worker sends what the consumer enqueued. The mail server gates nothing: while
        // it is down, jobs wait with backoff. A job cut off at shutdown hands its lease back.
        let mailer = email::Mailer::new(pool.clone(), config.email.clone());
        service.worker("email worker", move |stop| {
            mailer.run_worker(email::worker_name(), stop)
        });
        // The webhook worker, beside it: the same jobs table, a queue of its own.
        let deliverer = webhooks::Deliverer::new(pool.clone(), config.webhooks.clone())
            .map_err(|e| ServiceError::Io(std::io::Error::other(format!("webhook client: {e}"))))?;
        service.worker("webhook worker", move |stop| {
            deliverer.run_worker(email::worker_name(), stop)
        });
        service.relay(&pool, &broker, &config.relay);
        let webhooks_api = webhooks::api::WebhooksApi {
            pool: pool.clone(),
            policy: config.webhooks.egress.clone(),
            allow_http: config.webhooks.allow_http,
            max_endpoints: config.webhooks.max_endpoints_per_customer,
        };
        let addr = service
            .http(
                api::routes(ApiState {
                    pool,
                    list_limit: i64::from(config.api.list_limit),
                })
                .merge(webhooks::api::routes(webhooks_api)),
            )
            .await?;
        Ok(Self { service, addr })
    }

    /// The bound HTTP address (port 0 in tests picks a free one).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs until `signal`, then stops in stages: HTTP, the consumer (in-flight messages
    /// settle), the email worker (sends in flight finish or hand their jobs back), the relay
    /// (publishes what they wrote), the broker, the pool.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, ServiceError> {
        self.service.run(signal).await
    }
}

/// notification's command line (`notification serve|migrate|check-config`).
#[derive(Debug)]
pub struct Notification;

impl keel_service::ServiceMain for Notification {
    const NAME: &'static str = "notification";
    const ABOUT: &'static str = "Keel notification: journey events in, customer notifications out";
    const DEFAULT_CONFIG: keel_config::Embedded = DEFAULT_CONFIG;
    type Config = Config;

    fn telemetry(config: &Config) -> &TelemetryConfig {
        &config.telemetry
    }

    fn migrations(config: &Config) -> Option<(&DatabaseConfig, &'static sqlx::migrate::Migrator)> {
        Some((&config.database, &MIGRATOR))
    }

    fn queues(config: &Config) -> Vec<keel_amqp::topology::QueueSpec> {
        queues(config)
    }

    async fn serve(
        config: Config,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        App::build(config).await?.run(signal).await?;
        Ok(())
    }
}

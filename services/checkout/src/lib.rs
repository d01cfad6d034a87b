//! checkout: the orders API, saga orchestrator, stock and catalogue.
//!
//! [`App::build`] binds the listener (port 0 in tests) and wires every capability onto a
//! `keel_service::Service`; [`App::run`] runs it until the shutdown signal and its staged
//! shutdown (P20). Tests start the `App` in-process; process-level tests start the binary.
//!
//! Capabilities, one module each:
//! - [`catalogue`]: `GET /v1/products`, read from Postgres through pgbouncer.
//! - [`orders`]: `POST /v1/orders` (idempotency keys, P13) and `GET /v1/orders/{id}`, both
//!   for the API key's customer.
//! - [`saga`]: the order saga (P04) on the Postgres job queue (P08), calling billing over gRPC.
//! - [`stock`]: reservations without oversell or deadlocks (P11).
//! - [`routes`]: the router that records its routes as it is built, so `tests/openapi.rs`
//!   checks `openapi.yaml` against the routes really served ([`App::routes`]).
//!
//! The HTTP API is described in `openapi.yaml` (served at `GET /openapi.yaml`). In short:
//! - `GET /v1/products` is public. The orders routes take an API key,
//!   `Authorization: Bearer keel_<id>_<secret>`, issued by an operator with
//!   `keelctl api-keys create --customer <id>` (printed once; only its SHA-256 is stored, in
//!   this database's `customer_api_keys`) and checked by the platform's extractor,
//!   [`keel_service::api_keys::ApiKey`]. A missing, malformed, unknown or revoked key is 401
//!   `unauthenticated` with `WWW-Authenticate: Bearer`.
//! - The key decides the customer: `POST /v1/orders` places the order for the key's customer
//!   (the body names none), and `GET /v1/orders/{id}` shows only that customer's orders;
//!   another customer's order is the same 404 as a nonexistent one.
//! - A body member the API does not define (`customer_id`, a typo, `lines[0].colour`) is 400
//!   `unknown-field`, naming each one; a body that breaks the rules is 422 with one error per
//!   field.
//! - `Idempotency-Key` is required on `POST` and scoped per customer (P13): a retry gets the
//!   stored answer, the same key with a changed body is 422, and two customers never share a
//!   key's answer.
//!
//! Order events leave through the outbox (P02): every state change writes its event in its
//! own transaction, and `keel_amqp::relay` publishes them to `keel.events`. RabbitMQ is not a
//! readiness check: while it is down orders are still taken and events wait in the outbox.

pub mod catalogue;
pub mod config;
pub mod error;
pub mod orders;
pub mod routes;
pub mod saga;
pub mod stock;

use std::future::Future;
use std::net::SocketAddr;

use http::{Method, header};
use keel_service::{BrokerReadiness, Drained, Service, ServiceError};

pub use config::Config;
/// Who calls the orders API: the platform's API keys. Re-exported because
/// [`orders::place_order`] takes its caller as an [`api_keys::Authenticated`], so code that
/// places orders without HTTP (benchmarks) names the type here.
pub use keel_service::api_keys;
pub use routes::{Route, Routes};
use saga::Saga;
use saga::billing::BillingEndpoint;

/// The checked-in configuration, embedded so the binary runs anywhere: `config/default.toml`
/// (no secret) and the development profile `config/dev.toml` (`KEEL_PROFILE=dev` only).
pub const DEFAULT_CONFIG: keel_config::Embedded = keel_config::embed!();

/// Migrations, embedded; `checkout migrate` and the test kit's template database run them.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The OpenAPI 3.1 description of checkout's HTTP API, served at `GET /openapi.yaml`.
pub const OPENAPI: &str = include_str!("../openapi.yaml");

/// The routes `keel_http::stack::build` adds to every service's (through `Service::http`).
/// keel-http builds them on a plain axum router, so they cannot be recorded like checkout's
/// own; `tests/openapi.rs` checks that each of them answers.
fn stack_routes() -> [Route; 3] {
    [
        Route::new(Method::GET, "/livez"),
        Route::new(Method::GET, "/readyz"),
        Route::new(Method::GET, "/metrics"),
    ]
}

/// Why checkout could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("billing client: {0}")]
    Billing(#[from] tonic::transport::Error),
}

/// A built, bound, not yet running checkout.
#[derive(Debug)]
pub struct App {
    service: Service,
    addr: SocketAddr,
    routes: Vec<Route>,
}

/// This process's name in the job queue's `locked_by` (host, pid, random suffix).
fn worker_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "checkout".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &suffix[..8])
}

impl App {
    /// Wires the capabilities and binds the listener. Connects to nothing yet: Postgres and
    /// billing are reached lazily (Postgres is reported by `/readyz`; billing is not, because
    /// orders are accepted while it is down), so the process starts while a dependency is.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let mut service = Service::new(
            "checkout",
            &config.http,
            &config.shutdown,
            &config.telemetry,
        );
        // With the pool comes the platform's retention (`[database.retention]`): expired
        // idempotency keys, sent outbox rows and finished jobs are purged by one recurring job.
        let pool = service.postgres(&config.database)?;
        // Publishing only goes through the outbox, whose rows wait for the broker: orders are
        // taken while RabbitMQ is down, so it is no readiness check.
        let broker = service.broker(&config.amqp, BrokerReadiness::NotRequired);
        service.relay(&pool, &broker, &config.relay);

        // A saga job cut off at shutdown hands its lease back, and another instance resumes it
        // from the persisted saga state. The billing channel is made when the worker starts.
        if config.saga.run_worker {
            let billing = BillingEndpoint::new(&config.billing)?;
            let (saga_pool, saga_config) = (pool.clone(), config.saga.clone());
            let name = worker_name();
            service.worker("saga worker", move |stop| {
                Saga::new(saga_pool, billing.connect_lazy(), saga_config).run_worker(name, stop)
            });
        }

        // Built through `Routes`, which records every route it adds: `App::routes` is the
        // router's own list, the one `openapi.yaml` must match.
        let (router, mut routes) = Routes::new()
            .merge(catalogue::routes(pool.clone()))
            .merge(orders::routes(orders::OrdersState {
                pool,
                orders: config.orders.clone(),
                saga: config.saga.clone(),
            }))
            .get("/openapi.yaml", || async {
                ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI)
            })
            .into_parts();
        let addr = service.http(router).await?;
        routes.extend(stack_routes());
        Ok(Self {
            service,
            addr,
            routes,
        })
    }

    /// Every route the HTTP listener serves: checkout's, recorded as the router was built, and
    /// the health and metrics routes of the Keel HTTP stack.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs until `signal`, then stops in stages (keel_service): HTTP, the saga and
    /// retention workers, the relay (publishes the events they wrote), broker, pool.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, ServiceError> {
        self.service.run(signal).await
    }
}

/// checkout's command line (`checkout serve|migrate|check-config`).
#[derive(Debug)]
pub struct Checkout;

impl keel_service::ServiceMain for Checkout {
    const NAME: &'static str = "checkout";
    const ABOUT: &'static str =
        "Keel checkout: the orders API, saga orchestrator, stock and catalogue";
    const DEFAULT_CONFIG: keel_config::Embedded = DEFAULT_CONFIG;
    type Config = Config;

    fn telemetry(config: &Config) -> &keel_telemetry::TelemetryConfig {
        &config.telemetry
    }

    fn migrations(
        config: &Config,
    ) -> Option<(&keel_pg::DatabaseConfig, &'static sqlx::migrate::Migrator)> {
        Some((&config.database, &MIGRATOR))
    }

    async fn serve(
        config: Config,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        App::build(config).await?.run(signal).await?;
        Ok(())
    }
}

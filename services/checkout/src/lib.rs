//! checkout: the orders API, saga orchestrator, stock and catalogue.
//!
//! [`App::build`] binds the listener (port 0 in tests) and wires every capability;
//! [`App::run`] serves until the shutdown signal, runs the background workers, and then
//! drains (P20). Tests start the `App` in-process; process-level tests start the real binary.
//!
//! Capabilities, one module each:
//! - [`catalogue`]: `GET /v1/products`, read from Postgres through pgbouncer.
//! - [`orders`]: `POST /v1/orders` (idempotency keys, P13) and `GET /v1/orders/{id}`.
//! - [`saga`]: the order saga (P04) on the Postgres job queue (P08), calling billing over gRPC.
//! - [`stock`]: reservations without oversell or deadlocks (P11).
//! - [`maintenance`]: the recurring purge of expired idempotency keys.
//!
//! The HTTP API is described in `openapi.yaml` (served at `GET /openapi.yaml`).
//!
//! Order events leave through the outbox (P02): every state change writes its event in its
//! own transaction, and `keel_amqp::relay` publishes them to `keel.events`. RabbitMQ is not a
//! readiness check: while it is down orders are still taken and events wait in the outbox.

pub mod catalogue;
pub mod config;
pub mod error;
pub mod maintenance;
pub mod money;
pub mod orders;
pub mod saga;
pub mod stock;

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use http::header;
use keel_amqp::Broker;
use keel_http::shutdown::Drained;
use keel_http::{Health, Lifecycle};
use keel_telemetry::LagMonitor;
use sqlx::PgPool;
use tokio::net::TcpListener;

pub use config::Config;
use maintenance::Maintenance;
use saga::Saga;
use saga::billing::Billing;

/// The checked-in defaults (`config/default.toml`), embedded so the binary runs anywhere.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// Migrations, embedded; `checkout migrate` and the test kit's template database run them.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The OpenAPI 3.1 description of checkout's HTTP API, served at `GET /openapi.yaml`.
pub const OPENAPI: &str = include_str!("../openapi.yaml");

/// Every route the router serves, as (method, path template). `tests/openapi.rs` checks that
/// `openapi.yaml` documents exactly these and that the router answers each one.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    let mut all = Vec::new();
    all.extend_from_slice(catalogue::ROUTES);
    all.extend_from_slice(orders::ROUTES);
    all.push(("GET", "/openapi.yaml"));
    // Added by keel_http::stack::build.
    all.extend_from_slice(&[("GET", "/livez"), ("GET", "/readyz"), ("GET", "/metrics")]);
    all
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
    #[error("billing client: {0}")]
    Billing(#[from] tonic::transport::Error),
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
    router: Router,
    lifecycle: Lifecycle,
    pool: PgPool,
    saga: Saga,
    run_saga_worker: bool,
    maintenance: Maintenance,
    broker: Broker,
    relay: keel_amqp::RelayConfig,
}

/// This process's name in the job queue's `locked_by` (host, pid, random suffix).
fn worker_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "checkout".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &suffix[..8])
}

impl App {
    /// Binds the listener and wires the capabilities. Connects to nothing yet: Postgres and
    /// billing are reached lazily (Postgres is reported by `/readyz`; billing is not, because
    /// orders are accepted while it is down), so the process starts while a dependency is.
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

        // The relay and its broker connection outlive the listener and the workers: the events
        // of the last sagas finished during shutdown are still published.
        let broker = Broker::spawn(config.amqp.clone(), "checkout", Default::default());
        let billing = Billing::connect_lazy(&config.billing)?;
        let saga = Saga::new(pool.clone(), billing, config.saga.clone());
        let maintenance = Maintenance::new(
            pool.clone(),
            config.orders.clone(),
            config.maintenance.clone(),
        );

        let routes = Router::new()
            .merge(catalogue::routes(pool.clone()))
            .merge(orders::routes(orders::OrdersState {
                pool: pool.clone(),
                orders: config.orders.clone(),
                saga: config.saga.clone(),
            }))
            .route(
                "/openapi.yaml",
                get(|| async { ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI) }),
            );
        let router = keel_http::stack::build(routes, health, &config.http);
        tracing::info!(addr = %listener.local_addr()?, "listening");
        Ok(Self {
            listener,
            router,
            lifecycle,
            pool,
            saga,
            run_saga_worker: config.saga.run_worker,
            maintenance,
            broker,
            relay: config.relay.clone(),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `signal` and runs the background workers; then drains HTTP, lets the
    /// workers finish their jobs in flight (bounded), and closes the pool.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, AppError> {
        // The workers stop taking jobs when the listener stops accepting (the stop token);
        // a job cut off by the bound below is safe: its lease expires and another instance
        // resumes it from the persisted saga state.
        let stop = self.lifecycle.stop_token();
        let worker = worker_name();
        let mut workers = Vec::new();
        if self.run_saga_worker {
            let saga = self.saga.clone();
            workers.push((
                "saga worker",
                tokio::spawn(saga.run_worker(worker.clone(), stop.clone())),
            ));
        }
        workers.push((
            "maintenance worker",
            tokio::spawn(self.maintenance.run_worker(worker, stop.clone())),
        ));
        // Its own token: the relay stops after the work that writes outbox rows.
        let relay_stop = tokio_util::sync::CancellationToken::new();
        let relay = keel_amqp::relay::spawn(
            self.pool.clone(),
            self.broker.clone(),
            self.relay.clone(),
            relay_stop.clone(),
        );

        let drained = self
            .lifecycle
            .run_http(self.listener, self.router, signal)
            .await;
        for (what, handle) in workers {
            keel_http::shutdown::close_within(what, async {
                if let Err(e) = handle.await {
                    tracing::error!(what, error = %e, "worker task failed");
                }
            })
            .await;
        }
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

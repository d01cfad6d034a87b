//! psp-sim: a stand-in for an external payment service provider (PSP).
//!
//! Keel's billing must be shown coping with a card processor that declines, is slow, fails
//! now and then, or never answers — and no real one can be called from a laptop or CI. This
//! process plays that provider, and only that: it is a *simulator*, not an example of how to
//! build a payment system. Its state lives in memory ([`store`]), bounded, lost on restart.
//!
//! Capabilities, one module each:
//! - [`authorizations`]: the card API billing calls (authorize, capture, void, read), every
//!   mutating call idempotent by key ([`idempotency`], P13 on the provider's side);
//! - [`faults`]: outcomes chosen by the payment token (`tok_decline`, `tok_flaky`, ...) and
//!   run-time knobs (`PUT /admin/faults`: latency, error rate);
//! - [`webhooks`]: after a capture, a `payment.captured` webhook signed the Standard Webhooks
//!   way and retried with backoff until billing answers 2xx (the sending side of P32), with
//!   `GET /admin/webhooks` and a redeliver endpoint for the replay demo.
//!
//! Routes: `POST /v1/authorizations`, `GET /v1/authorizations/{id}`,
//! `POST /v1/authorizations/{id}/capture`, `POST /v1/authorizations/{id}/void` (statuses in
//! [`authorizations`]); `GET`/`PUT /admin/faults`; `GET /admin/webhooks`,
//! `POST /admin/webhooks/{webhook_id}/redeliver`; plus the Keel stack's `/livez`, `/readyz`,
//! `/metrics`. Errors are problem+json ([`error::ApiError`]).
//!
//! The `/admin` routes are served on a listener of their own (`[admin]`, loopback
//! `127.0.0.1:8091` by default), never on the card API's: exposing the card API (to billing in
//! another container, say) must not expose the knobs that make it fail. They have no
//! authentication, so the admin address is the whole of their protection; the public listener
//! answers them 404 like any unknown path. Must not break: no `/admin` route is merged into
//! the public router.
//!
//! Metrics besides the stack's RED set: `psp_store_entries{store}`,
//! `psp_store_evictions_total{store}`, `psp_idempotent_replays_total`,
//! `psp_injected_errors_total`, `psp_held_requests`, `psp_webhook_queue_depth`,
//! `psp_webhook_queue_full_total`, `psp_webhook_deliveries_in_flight`,
//! `psp_webhook_attempts_total{outcome}`.
//!
//! [`App::build`] binds both listeners (port 0 in tests; each logs a `listening` line, the
//! admin one with `admin_addr`) and registers the webhook sender; [`App::run`] serves until the
//! shutdown signal, drains both listeners together (P20), and stops the sender.

pub mod authorizations;
pub mod error;
pub mod faults;
pub mod idempotency;
pub mod model;
pub mod store;
pub mod webhooks;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use keel_config::{ConfigError, Validate};
use keel_http::HttpConfig;
use keel_service::{Drained, Service, ServiceError, ShutdownConfig};
use keel_telemetry::TelemetryConfig;
use serde::Deserialize;

use crate::faults::{Faults, FaultsConfig};
use crate::store::StoreConfig;
use crate::webhooks::{WebhookConfig, WebhookError, Webhooks};

/// The checked-in configuration, embedded so the binary runs anywhere: `config/default.toml`
/// (no secret) and the development profile `config/dev.toml` (`KEEL_PROFILE=dev` only).
pub const DEFAULT_CONFIG: keel_config::Embedded = keel_config::embed!();

/// psp-sim's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub admin: AdminConfig,
    pub shutdown: ShutdownConfig,
    pub telemetry: TelemetryConfig,
    pub webhook: WebhookConfig,
    pub faults: FaultsConfig,
    pub store: StoreConfig,
}

/// `[admin]`: where the unauthenticated `/admin` routes (fault knobs, webhook replay) listen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Loopback by default: only a process on the same machine (or in the same pod) can turn
    /// the knobs. Another address is allowed (a test rig in another container) and logged.
    pub host: IpAddr,
    /// 0 picks a free port (tests); the bound address is logged as `admin_addr`.
    pub port: u16,
}

impl AdminConfig {
    /// The socket address to bind.
    pub fn addr(&self) -> SocketAddr {
        (self.host, self.port).into()
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        if self.admin.port != 0 && self.admin.addr() == self.http.addr() {
            return Err(ConfigError::invalid(
                "admin.port",
                "must differ from http.port: the admin routes never share the public listener",
            ));
        }
        self.shutdown.validate()?;
        self.shutdown
            .ensure_grace_covers("http.request_timeout", self.http.request_timeout)?;
        self.telemetry.validate()?;
        self.webhook.validate()?;
        self.faults.validate()?;
        self.store.validate()?;
        // Each deliberate wait must end before the server's own request timeout would cut it
        // (with a bare 503): the simulator, not the timeout layer, decides how a held request
        // ends. Raise `http.request_timeout` (and `shutdown.grace_period` with it) to hold longer.
        let limit = self.http.request_timeout;
        for (key, wait) in [
            ("faults.timeout_hold", self.faults.timeout_hold),
            ("faults.slow_delay", self.faults.slow_delay),
            ("faults.max_latency", self.faults.max_latency),
        ] {
            if wait >= limit {
                return Err(ConfigError::invalid(
                    key,
                    "must be shorter than http.request_timeout",
                ));
            }
        }
        Ok(())
    }
}

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Webhooks(#[from] WebhookError),
}

/// A bound, not yet running simulator.
#[derive(Debug)]
pub struct App {
    service: Service,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl App {
    /// Binds both listeners and wires the API; starts nothing.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let mut service =
            Service::new("psp-sim", &config.http, &config.shutdown, &config.telemetry);
        let (webhooks, sender) = Webhooks::new(&config.webhook, &config.store)?;
        // Stopped with the workers, after in-flight requests (which enqueue webhooks) are done;
        // what is still queued then is abandoned: this is a simulator.
        service.worker("webhook sender", move |stop| sender.run(stop));
        // Deliberate holds (timeouts, slow answers) end when listeners close.
        let faults = Arc::new(Faults::new(
            config.faults.clone(),
            service.listeners_closed(),
        ));
        let api =
            authorizations::Api::new(&config.store, Arc::clone(&faults), Arc::clone(&webhooks));
        let admin_routes = axum::Router::new()
            .merge(faults::admin_routes(faults))
            .merge(webhooks::admin_routes(webhooks));
        let admin = serve_admin(&mut service, &config, admin_routes).await?;
        let addr = service.http(authorizations::routes(api)).await?;
        Ok(Self {
            service,
            addr,
            admin,
        })
    }

    /// The bound address of the card API (`/v1`, health, metrics).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound address of the `/admin` routes.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Serves until `signal`, then stops in stages (keel_service).
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, ServiceError> {
        self.service.run(signal).await
    }
}

/// Binds `[admin]` and serves `routes` there inside the same Keel HTTP stack as the public
/// listener (body limit, timeouts, problem+json), stopped with it: listeners close together.
async fn serve_admin(
    service: &mut Service,
    config: &Config,
    routes: axum::Router,
) -> Result<SocketAddr, ServiceError> {
    let addr = service
        .http_on("admin http", config.admin.addr(), routes)
        .await?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the admin listener is not on loopback: anyone who reaches it can turn the fault knobs");
    }
    // A field other than `addr`: tools read the public address from `addr` of a `listening` line.
    tracing::info!(admin_addr = %addr, "listening");
    Ok(addr)
}

/// psp-sim's command line (`psp-sim serve|migrate|check-config`; it has no database).
#[derive(Debug)]
pub struct PspSim;

impl keel_service::ServiceMain for PspSim {
    const NAME: &'static str = "psp-sim";
    const ABOUT: &'static str = "A stand-in payment service provider with fault knobs";
    const DEFAULT_CONFIG: keel_config::Embedded = DEFAULT_CONFIG;
    type Config = Config;

    fn telemetry(config: &Config) -> &TelemetryConfig {
        &config.telemetry
    }

    async fn serve(
        config: Config,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        App::build(config).await?.run(signal).await?;
        Ok(())
    }
}
